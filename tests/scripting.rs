//! Custom agents and tools written in Lua and Rhai, end to end: the real `helix` binary, real
//! Lua and Rhai, a real journal, and the scripted provider or a loopback LLM server.

mod llm_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join(".helix")
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("HELIX_HOME", self.home())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut child = self.command(args).spawn().expect("spawn helix");
        let t0 = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(60), "helix hung");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().expect("output")
    }

    fn journal(&self) -> helix::store::Journal {
        helix::store::Journal::open(&self.home()).expect("journal")
    }

    fn task(&self, key: &str) -> helix::store::TaskRecord {
        let j = self.journal();
        let run = j.find_run("latest").expect("query").expect("a run");
        j.tasks(&run.id)
            .expect("tasks")
            .into_iter()
            .find(|t| t.key == key)
            .expect("task")
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_lua_review_example_runs_its_lua_agents_and_tools() {
    let p = Project::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/lua-review.yaml");
    let out = p.run(&["apply", &example.to_string_lossy(), "--output", "plain"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        p.task("summary").output,
        Some(json!({ "checks_pass": true, "findings": 1, "fix_attempts": 2, "lines": 6 }))
    );
    assert_eq!(
        p.task("stats").output.map(|o| o["lines"].clone()),
        Some(json!(6))
    );
}

#[test]
fn a_lua_agent_keeps_its_scratchpad_across_a_kill_and_resume() {
    // The agent records each step in its scratchpad before a slow call; after kill -9 and
    // resume it skips the steps it had finished.
    let server = llm_support::Server::start([
        llm_support::Response::slow(
            Duration::from_secs(30),
            llm_support::Response::json(200, json!({})),
        ),
        llm_support::Response::json(
            200,
            json!({ "id": "c", "object": "chat.completion", "model": "m",
                    "choices": [{ "index": 0, "message": { "role": "assistant", "content": "second" }, "finish_reason": "stop" }],
                    "usage": { "prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6 } }),
        ),
    ]);
    let p = Project::new();
    p.file(
        "scripts/steps.lua",
        r#"return helix.agent {
  description = "Counts its sessions in the scratchpad",
  run = function(task, ctx)
    local sessions = (ctx.scratch.sessions or 0) + 1
    ctx.scratch.sessions = sessions
    local reply = ctx.llm:chat { messages = { { role = "user", content = task.prompt } } }
    return { sessions = sessions, reply = reply.content }
  end,
}
"#,
    );
    let w = p.file(
        "w.yaml",
        &format!(
            "helix: 1\nname: steps\nmodels:\n  default: {{ provider: openai, model: m, base_url: \"{}/v1\", api_key_env: HELIX_TEST_KEY, timeout: 60s }}\nagents:\n  stepper: {{ script: scripts/steps.lua }}\ntasks:\n  go:\n    agent: stepper\n    prompt: Go\n",
            server.url()
        ),
    );
    let mut child = p
        .command(&["apply", &w.to_string_lossy(), "--output", "plain"])
        .env("HELIX_TEST_KEY", "k")
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    while server.requests().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent never called the model"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = p
        .command(&["resume", "latest", "--output", "plain"])
        .env("HELIX_TEST_KEY", "k")
        .output()
        .expect("resume");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        p.task("go").output,
        Some(json!({ "sessions": 2, "reply": "second" }))
    );
}

#[test]
fn hostile_scripts_are_contained_while_a_sibling_succeeds() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        "helix: 1\nname: hostile\ntasks:\n  spin:\n    script: \"loop { }\"\n    timeout: 2s\n  big:\n    script: |\n      let s = \"x\";\n      loop { s += s; }\n  escape:\n    lang: lua\n    script: \"return io.open('/etc/passwd'):read('a')\"\n  exec:\n    lang: lua\n    script: \"return os.execute('touch /tmp/helix-pwned')\"\n  fine:\n    script: \"40 + 2\"\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy(), "--output", "plain"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(p.task("fine").output, Some(json!(42)));
    for (task, expected) in [
        ("spin", "w.yaml:5"),
        ("big", "string size limit"),
        ("escape", "io"),
        ("exec", "execute"),
    ] {
        let error = p.task(task).error.unwrap_or_default();
        assert!(error.contains(expected), "{task}: {error}");
    }
    assert!(!Path::new("/tmp/helix-pwned").exists());
}

#[test]
fn a_lua_script_used_as_the_wrong_kind_is_a_validation_error() {
    let p = Project::new();
    p.file(
        "scripts/agent.lua",
        "return helix.agent { description = 'a', run = function(task, ctx) return 1 end }\n",
    );
    let w = p.file("w.yaml", "helix: 1\nname: kinds\ntools:\n  t: { script: scripts/agent.lua }\ntasks:\n  x:\n    tool: t\n");
    let out = p.run(&["validate", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("defines an agent"), "{}", text(&out));
}

#[test]
fn rhai_scripts_call_tools_and_keep_a_scratchpad() {
    let p = Project::new();
    p.file(
        "tools/wc.rhai",
        "let file = tool(\"fs.read\", #{ path: args.path });\nlet n = file.content.split(\"\\n\").len();\nscratch_set(\"last\", args.path);\nlog(`counted ${args.path}`);\n#{ lines: n, last: scratch_get(\"last\") }\n",
    );
    let w = p.file(
        "w.yaml",
        "helix: 1\nname: rhai-host\ntools:\n  wc:\n    script: tools/wc.rhai\n    params: { path: { type: string } }\ntasks:\n  write:\n    tool: fs.write\n    with: { path: notes.txt, content: \"a\\nb\\nc\" }\n  count:\n    needs: [write]\n    tool: wc\n    with: { path: notes.txt }\n  inline:\n    needs: [write]\n    script: |\n      let listing = tool(\"fs.list\", #{});\n      listing.entries.len()\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy(), "--output", "plain"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        p.task("count").output,
        Some(json!({ "lines": 3, "last": "notes.txt" }))
    );
    assert_eq!(p.task("inline").output, Some(json!(1)));
    let logs = p.run(&["runs", "logs", "latest"]);
    assert!(text(&logs).contains("counted notes.txt"), "{}", text(&logs));
}

fn completion(content: &str) -> llm_support::Response {
    llm_support::Response::json(
        200,
        json!({ "id": "c", "object": "chat.completion", "model": "m",
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
                "usage": { "prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6 } }),
    )
}

#[test]
fn a_resumed_lua_agent_does_not_ask_the_model_again_for_calls_it_made() {
    let server = llm_support::Server::start([
        completion("first"),
        llm_support::Response::slow(Duration::from_secs(30), completion("lost")),
        completion("second"),
    ]);
    let p = Project::new();
    p.file(
        "scripts/two.lua",
        r#"return helix.agent {
  description = "Two model calls in a row",
  run = function(task, ctx)
    local a = ctx.llm:chat { messages = { { role = "user", content = "one" } } }
    local b = ctx.llm:chat { messages = { { role = "user", content = "two" } } }
    return a.content .. "+" .. b.content
  end,
}
"#,
    );
    let w = p.file(
        "w.yaml",
        &format!(
            "helix: 1\nname: two\nmodels:\n  default: {{ provider: openai, model: m, base_url: \"{}/v1\", api_key_env: HELIX_TEST_KEY, timeout: 60s }}\nagents:\n  twice: {{ script: scripts/two.lua }}\ntasks:\n  go:\n    agent: twice\n    prompt: Go\n",
            server.url()
        ),
    );
    let mut child = p
        .command(&["apply", &w.to_string_lossy(), "--output", "plain"])
        .env("HELIX_TEST_KEY", "k")
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    while server.requests().len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the second call never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = p
        .command(&["resume", "latest", "--output", "plain"])
        .env("HELIX_TEST_KEY", "k")
        .output()
        .expect("resume");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(p.task("go").output, Some(json!("first+second")));
    assert_eq!(
        server.requests().len(),
        3,
        "the first call came from the journal"
    );
}

#[test]
fn rhai_scripts_render_templates_and_chat_with_the_default_model() {
    let p = Project::new();
    p.file(
        "replies.yaml",
        "replies:\n  - agent: script\n    content: '{\"verdict\": \"ship\"}'\n",
    );
    p.file("greeting.j2", "Hello {{ who }}!");
    let w = p.file(
        "w.yaml",
        "helix: 1\nname: rhai-llm\nmodels:\n  default: { provider: scripted, file: replies.yaml }\ntasks:\n  decide:\n    script: |\n      let hello = render(\"greeting.j2\", #{ who: \"team\" });\n      let reply = llm_chat(#{ messages: [#{ role: \"user\", content: hello }], json: true });\n      #{ hello: hello, verdict: reply.json.verdict }\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy(), "--output", "plain"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        p.task("decide").output,
        Some(json!({ "hello": "Hello team!", "verdict": "ship" }))
    );
}

#[test]
fn secrets_a_script_logs_are_masked_in_the_journal() {
    let p = Project::new();
    p.file(
        "scripts/leaky.lua",
        "return helix.agent { run = function(task, ctx)\n  ctx.log('deploying with ' .. task.prompt)\n  return 'ok'\nend }\n",
    );
    let w = p.file(
        "w.yaml",
        "helix: 1\nname: leak\nsecrets: [DEPLOY_TOKEN]\nagents:\n  deployer: { script: scripts/leaky.lua }\ntasks:\n  ship:\n    agent: deployer\n    prompt: \"token {{ env.DEPLOY_TOKEN }}\"\n",
    );
    let mut child = p
        .command(&["apply", w.to_str().expect("path"), "--output", "plain"])
        .env("DEPLOY_TOKEN", "tok-5f3a9c1e77")
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "helix hung");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "{}", text(&out));
    let logs = text(&p.run(&["runs", "logs", "latest", "ship"]));
    assert!(logs.contains("deploying with token ***"), "{logs}");
    assert!(!logs.contains("tok-5f3a9c1e77"), "{logs}");
}
