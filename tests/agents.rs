//! Agent tasks end to end: the real `helix` binary against an OpenAI-compatible server that
//! the test starts on 127.0.0.1, with a real journal.

mod llm_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use llm_support::{Response, Server};
use serde_json::{json, Value as Json};

const KEY: &str = "sk-test-0123456789abcdef";

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

    /// A workflow whose `default` model is the test server.
    fn workflow(&self, server: &Server, rest: &str) -> PathBuf {
        let text = format!(
            "helix: 1\nname: agents\nmodels:\n  default: {{ provider: openai, model: test-model, base_url: \"{}/v1\", api_key_env: HELIX_TEST_KEY, timeout: 20s }}\n{rest}",
            server.url()
        );
        let path = self.dir.path().join("w.yaml");
        std::fs::write(&path, text).expect("write workflow");
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix"));
        cmd.args(args);
        if matches!(
            args.first(),
            Some(&"apply") | Some(&"resume") | Some(&"retry")
        ) {
            cmd.args(["--output", "plain"]);
        }
        cmd.current_dir(self.dir.path())
            .env("HELIX_HOME", self.home())
            .env("HELIX_TEST_KEY", KEY)
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

    fn task(&self, key: &str) -> helix::store::TaskRecord {
        let j = helix::store::Journal::open(&self.home()).expect("journal");
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

/// An OpenAI chat completion with text content.
fn answer(content: &str) -> Response {
    Response::json(
        200,
        json!({
            "id": "c", "object": "chat.completion", "model": "test-model",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
            "usage": { "prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60 }
        }),
    )
}

/// An OpenAI chat completion asking for one tool call (names travel as `fs_write`).
fn tool_call(id: &str, wire_name: &str, arguments: Json) -> Response {
    Response::json(
        200,
        json!({
            "id": "c", "object": "chat.completion", "model": "test-model",
            "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{ "id": id, "type": "function", "function": { "name": wire_name, "arguments": arguments.to_string() } }]
            }}],
            "usage": { "prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48 }
        }),
    )
}

fn roles(request: &Json) -> Vec<String> {
    request["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| x["role"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

const CODER: &str = "agents:\n  coder:\n    role: Senior engineer\n    tools: [fs.write, fs.read]\n    max_turns: 6\ntasks:\n  implement:\n    agent: coder\n    prompt: Write hello.py\n";

#[test]
fn an_agent_writes_files_with_tool_calls_and_answers() {
    let server = Server::start([
        tool_call(
            "c1",
            "fs_write",
            json!({ "path": "hello.py", "content": "print('hi')\n" }),
        ),
        answer("Wrote hello.py."),
    ]);
    let p = Project::new();
    let w = p.workflow(&server, CODER);
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(p.task("implement").output, Some(json!("Wrote hello.py.")));
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(
        first.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    let tools: Vec<&str> = first.body["tools"]
        .as_array()
        .expect("tools offered")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert_eq!(tools, ["fs_write", "fs_read"]);
    // The tool result went back to the model with the call's id.
    let second = &requests[1].body["messages"];
    assert_eq!(
        roles(&requests[1].body),
        ["system", "user", "assistant", "tool"]
    );
    assert_eq!(second[3]["tool_call_id"], json!("c1"));
    let workspace = std::fs::read_dir(p.home().join("runs"))
        .expect("runs")
        .next()
        .expect("a run")
        .expect("entry")
        .path();
    assert_eq!(
        std::fs::read_to_string(workspace.join("workspace/hello.py")).expect("file"),
        "print('hi')\n"
    );
}

#[test]
fn kill_during_the_third_turn_then_resume_does_not_send_turns_one_and_two_again() {
    let server = Server::start([
        tool_call(
            "c1",
            "fs_write",
            json!({ "path": "a.txt", "content": "one" }),
        ),
        tool_call("c2", "fs_read", json!({ "path": "a.txt" })),
        // The third call hangs: helix is killed while waiting for it.
        Response::slow(Duration::from_secs(30), answer("too late")),
        answer("Done after resume."),
    ]);
    let p = Project::new();
    let w = p.workflow(&server, CODER);
    let mut child = p
        .command(&["apply", &w.to_string_lossy()])
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    while server.requests().len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the third turn never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill(); // SIGKILL during turn three
    let _ = child.wait();

    let out = p.run(&["resume", "latest"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let requests = server.requests();
    assert_eq!(
        requests.len(),
        4,
        "turns one and two must not be sent again"
    );
    // The resumed call carries the journaled conversation: both tool calls and their results.
    assert_eq!(
        roles(&requests[3].body),
        ["system", "user", "assistant", "tool", "assistant", "tool"]
    );
    assert_eq!(
        requests[3].body["messages"][5]["content"],
        requests[2].body["messages"][5]["content"]
    );
    assert_eq!(
        p.task("implement").output,
        Some(json!("Done after resume."))
    );
}

#[test]
fn an_answer_that_breaks_the_output_schema_is_sent_back_for_repair() {
    let server = Server::start([
        answer("Sure! Here is the design."),
        answer("{\"files\": [\"app.py\"]}"),
    ]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "agents:\n  architect: { role: Architect }\ntasks:\n  design:\n    agent: architect\n    prompt: Design it\n    output:\n      schema: { type: object, required: [files] }\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        p.task("design").output,
        Some(json!({ "files": ["app.py"] }))
    );
    let requests = server.requests();
    assert_eq!(
        requests[0].body["response_format"],
        json!({ "type": "json_object" })
    );
    let repair = requests[1].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or_default();
    assert!(
        repair["content"]
            .as_str()
            .unwrap_or("")
            .contains("does not match the required JSON Schema"),
        "{repair}"
    );
}

#[test]
fn an_agent_repeating_the_same_tool_call_is_stopped() {
    let same = || tool_call("c", "fs_read", json!({ "path": "missing.txt" }));
    let server = Server::start([same(), same(), same(), same()]);
    let p = Project::new();
    let w = p.workflow(&server, CODER);
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let error = p.task("implement").error.unwrap_or_default();
    assert!(
        error.contains("is stuck") && error.contains("fs.read"),
        "{error}"
    );
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn a_spent_token_budget_stops_the_run() {
    let server = Server::start([answer("first"), answer("second")]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "budget: { tokens: 50 }\nagents:\n  writer: { role: Writer }\ntasks:\n  one:\n    agent: writer\n    prompt: One\n  two:\n    needs: [one]\n    agent: writer\n    prompt: Two\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("token budget of 50 exhausted"),
        "{}",
        text(&out)
    );
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn api_keys_never_reach_the_journal_or_the_output() {
    let server = Server::start([Response::json(
        401,
        json!({ "error": { "message": format!("Incorrect API key provided: {KEY}") } }),
    )]);
    let p = Project::new();
    let w = p.workflow(&server, CODER);
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("HELIX_TEST_KEY"),
        "the error names the variable: {}",
        text(&out)
    );
    assert!(!text(&out).contains(KEY));
    for file in ["helix.db", "helix.db-wal"] {
        let bytes = std::fs::read(p.home().join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "API key found in {file}"
        );
    }
}

#[test]
fn the_quickstart_runs_offline() {
    let p = Project::new();
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/quickstart.yaml");
    let out = p.run(&["apply", &quickstart.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(p.task("check").output, Some(json!("add(2, 3) = 5")));
    assert_eq!(
        p.task("design").output,
        Some(
            json!({ "files": ["calc.py"], "notes": "One module with add(a, b) returning a + b." })
        )
    );
}

#[test]
fn the_scratchpad_keeps_values_between_turns() {
    let server = Server::start([
        tool_call(
            "c1",
            "scratch_set",
            json!({ "key": "plan", "value": { "step": 2 } }),
        ),
        tool_call("c2", "scratch_get", json!({ "key": "plan" })),
        answer("done"),
    ]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "agents:\n  a:\n    role: Planner\n    tools: [scratch.get, scratch.set]\ntasks:\n  t:\n    agent: a\n    prompt: Plan\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let requests = server.requests();
    let last_tool = requests[2].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last_tool["content"], json!("{\"step\":2}"));
    let j = helix::store::Journal::open(&p.home()).expect("journal");
    let run = j.find_run("latest").expect("q").expect("run");
    assert_eq!(
        j.scratch_get(&run.id, "t", "plan").expect("get"),
        Some(json!({ "step": 2 }))
    );
}

#[test]
fn http_request_reaches_only_allowed_hosts() {
    let api = Server::start([Response::json(200, json!({ "weather": "sunny" }))]);
    let api_host = api.url().trim_start_matches("http://").to_string();
    let server = Server::start([
        tool_call(
            "c1",
            "http_request",
            json!({ "url": format!("{}/today", api.url()) }),
        ),
        tool_call(
            "c2",
            "http_request",
            json!({ "url": "http://169.254.169.254/latest/meta-data" }),
        ),
        answer("sunny"),
    ]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        &format!("http: {{ allow: [\"{api_host}\"] }}\nagents:\n  a:\n    role: Researcher\n    tools: [http.request]\ntasks:\n  t:\n    agent: a\n    prompt: Weather?\n"),
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let requests = server.requests();
    let allowed = requests[1].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or_default();
    assert!(
        allowed["content"].as_str().unwrap_or("").contains("sunny"),
        "{allowed}"
    );
    let refused = requests[2].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or_default();
    assert!(
        refused["content"]
            .as_str()
            .unwrap_or("")
            .contains("is not in this workflow's `http.allow`"),
        "{refused}"
    );
    assert_eq!(api.requests().len(), 1, "only the allowed request went out");
}

#[test]
fn http_request_without_an_allow_list_is_a_validation_error() {
    let server = Server::start([]);
    let p = Project::new();
    let w = p.workflow(&server, "agents:\n  a:\n    role: R\n    tools: [http.request]\ntasks:\n  t:\n    agent: a\n    prompt: P\n");
    let out = p.run(&["validate", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("`http.request` can reach no host"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_secret_in_an_agent_prompt_reaches_the_model_but_not_the_journal() {
    let secret = "hunter2-very-secret";
    let server = Server::start([answer(&format!("I was told {secret}"))]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "secrets: [DEPLOY_TOKEN]\nagents:\n  a: { role: Deployer }\ntasks:\n  t:\n    agent: a\n    prompt: \"Deploy with token {{ env.DEPLOY_TOKEN }}\"\n",
    );
    let out = p
        .command(&["apply", &w.to_string_lossy()])
        .env("DEPLOY_TOKEN", secret)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        server.single_request().body.to_string().contains(secret),
        "the model needs it"
    );
    assert!(!text(&out).contains(secret));
    assert_eq!(p.task("t").output, Some(json!("I was told ***")));
    for file in ["helix.db", "helix.db-wal"] {
        let bytes = std::fs::read(p.home().join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret found in {file}"
        );
    }
}

#[test]
fn record_then_replay_gives_the_same_outputs_without_the_network() {
    let p = Project::new();
    let cassette = p.dir.path().join("run.cassette.json");
    let w = {
        let server = Server::start([
            tool_call(
                "c1",
                "fs_write",
                json!({ "path": "hello.py", "content": "print('hi')\n" }),
            ),
            answer("Wrote hello.py."),
        ]);
        let w = p.workflow(&server, CODER);
        let out = p.run(&[
            "apply",
            &w.to_string_lossy(),
            "--record",
            &cassette.to_string_lossy(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        w
        // The server stops here: the replay below has nothing to call.
    };
    let recorded = p.task("implement").output;
    let text_of_cassette = std::fs::read_to_string(&cassette).expect("cassette written");
    assert!(
        !text_of_cassette.contains(KEY),
        "no API key in the cassette"
    );
    let out = p.run(&[
        "apply",
        &w.to_string_lossy(),
        "--replay",
        &cassette.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(p.task("implement").output, recorded);

    // A changed prompt is not in the cassette: a clear error, not a silent call.
    let changed = std::fs::read_to_string(&w)
        .expect("read")
        .replace("Write hello.py", "Write bye.py");
    std::fs::write(&w, changed).expect("write");
    let out = p.run(&[
        "apply",
        &w.to_string_lossy(),
        "--replay",
        &cassette.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("changed since cassette"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_planner_decomposes_its_task_into_subtasks_that_run_as_children() {
    let plan = json!({ "subtasks": [
        { "id": "api", "agent": "coder", "prompt": "Write the API" },
        { "id": "tests", "agent": "coder", "prompt": "Test the API", "needs": ["api"] }
    ]});
    let server = Server::start([
        answer(&plan.to_string()),
        answer("api done"),
        answer("tests done"),
    ]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "agents:\n  planner: { role: Planner }\n  coder: { role: Coder }\ntasks:\n  build:\n    agent: planner\n    prompt: Build a todo API\n    decompose: true\n  report:\n    needs: [build]\n    script: \"tasks.build.output.tests\"\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        p.task("build").output,
        Some(json!({ "api": "api done", "tests": "tests done" }))
    );
    assert_eq!(p.task("build.tests").status, "succeeded");
    assert_eq!(p.task("report").output, Some(json!("tests done")));
    let requests = server.requests();
    // The planner was asked for JSON matching the plan schema, with the agents to choose from.
    assert_eq!(
        requests[0].body["response_format"],
        json!({ "type": "json_object" })
    );
    // `tests` needs `api`, so it ran second, and each subtask knows the larger task.
    let last_user = |r: &llm_support::Recorded| {
        r.body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map(|m| m["content"].to_string())
            .unwrap_or_default()
    };
    assert!(last_user(&requests[1]).contains("Write the API"));
    assert!(
        last_user(&requests[2]).contains("Test the API")
            && last_user(&requests[2]).contains("Build a todo API")
    );
}

#[test]
fn a_plan_naming_an_unknown_agent_fails_the_task_clearly() {
    let plan = json!({ "subtasks": [{ "id": "x", "agent": "ghost", "prompt": "Boo" }] });
    let server = Server::start([
        answer(&plan.to_string()),
        answer(&plan.to_string()),
        answer(&plan.to_string()),
    ]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "agents:\n  planner: { role: Planner }\ntasks:\n  build:\n    agent: planner\n    prompt: Build\n    decompose: true\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let error = p.task("build").error.unwrap_or_default();
    assert!(error.contains("ghost"), "{error}");
}

#[test]
fn tool_protocol_json_describes_tools_in_the_prompt_and_parses_calls_from_replies() {
    let server = Server::start([
        answer(
            "{\"tool\": \"fs.write\", \"arguments\": {\"path\": \"n.txt\", \"content\": \"42\"}}",
        ),
        answer("Saved."),
    ]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "agents:\n  local:\n    role: Helper\n    tools: [fs.write]\n    tool_protocol: json\ntasks:\n  t:\n    agent: local\n    prompt: Save 42\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(p.task("t").output, Some(json!("Saved.")));
    let requests = server.requests();
    assert!(requests[0]
        .body
        .get("tools")
        .is_none_or(|t| t.as_array().is_none_or(Vec::is_empty)));
    assert!(requests[0].body["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .contains("\"tool\": \"<name>\""));
    assert_eq!(
        roles(&requests[1].body),
        ["system", "user", "assistant", "user"]
    );
    assert!(requests[1].body["messages"][3]["content"]
        .as_str()
        .unwrap_or("")
        .starts_with("Result of `fs.write`"));
}

#[test]
fn a_task_token_budget_fails_only_that_task() {
    let server = Server::start([
        tool_call("c1", "fs_read", json!({ "path": "x" })),
        answer("never asked"),
        answer("other task"),
    ]);
    let p = Project::new();
    let w = p.workflow(
        &server,
        "agents:\n  a:\n    role: R\n    tools: [fs.read]\ntasks:\n  small:\n    agent: a\n    prompt: Read x\n    budget: { tokens: 40 }\n    continue_on_error: true\n  other:\n    needs: [small]\n    agent: a\n    prompt: Go on\n",
    );
    let out = p.run(&["apply", &w.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let error = p.task("small").error.unwrap_or_default();
    assert!(
        error.contains("token budget of 40 is exhausted (48 used)"),
        "{error}"
    );
    assert_eq!(p.task("other").status, "succeeded");
}

#[test]
fn an_anthropic_agent_uses_tools_and_answers() {
    let reply = |content: Json, stop: &str| {
        Response::json(
            200,
            json!({ "id": "msg", "type": "message", "role": "assistant", "content": content,
                    "stop_reason": stop, "usage": { "input_tokens": 30, "output_tokens": 10 } }),
        )
    };
    let server = Server::start([
        reply(
            json!([{ "type": "tool_use", "id": "toolu_1", "name": "fs_write", "input": { "path": "a.md", "content": "# A" } }]),
            "tool_use",
        ),
        reply(
            json!([{ "type": "text", "text": "Wrote a.md." }]),
            "end_turn",
        ),
    ]);
    let p = Project::new();
    let path = p.dir.path().join("w.yaml");
    std::fs::write(
        &path,
        format!(
            "helix: 1\nname: claude\nmodels:\n  default: {{ provider: anthropic, model: claude-test, base_url: \"{}\", api_key_env: HELIX_TEST_KEY }}\nagents:\n  writer:\n    role: Writer\n    tools: [fs.write]\ntasks:\n  doc:\n    agent: writer\n    prompt: Write a.md\n",
            server.url()
        ),
    )
    .expect("write");
    let out = p.run(&["apply", &path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(p.task("doc").output, Some(json!("Wrote a.md.")));
    let requests = server.requests();
    assert_eq!(requests[0].path, "/v1/messages");
    assert_eq!(requests[0].header("x-api-key"), Some(KEY));
    // The tool result went back as a tool_result block answering toolu_1.
    let last = requests[1].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["content"][0]["type"], json!("tool_result"));
    assert_eq!(last["content"][0]["tool_use_id"], json!("toolu_1"));
}
