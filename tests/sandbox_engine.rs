//! Container sandboxes through the engine: the real `helix` binary runs `run:` tasks and an
//! agent's `sandbox.exec` in Docker, against the images `docker/build-offline.sh` builds.
//! Without a Docker engine these tests skip, unless `HELIX_REQUIRE_DOCKER=1` (CI) makes that
//! a failure.

mod llm_support;
mod project;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llm_support::{Response, Server};
use project::{text, Project};
use serde_json::{json, Value as Json};

/// Whether Docker and the sandbox image are here; panics under `HELIX_REQUIRE_DOCKER=1`
/// when they are not.
fn docker_ready(test: &str) -> bool {
    let found = Command::new("docker")
        .args(["image", "inspect", "helix-sandbox-python"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("HELIX_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "{test}: HELIX_REQUIRE_DOCKER=1 but the Docker engine or the image \
             helix-sandbox-python is missing (run docker/build-offline.sh)"
        );
        eprintln!("{test}: skipped: no Docker engine or no helix-sandbox-python image");
    }
    found
}

/// Containers labelled with this run, waiting a little for background removal.
fn containers_of(run_id: &str) -> Vec<String> {
    let list = || {
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=io.helix.run={run_id}"))
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let t0 = Instant::now();
    loop {
        let left = list();
        if left.is_empty() || t0.elapsed() > Duration::from_secs(15) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const PROFILE: &str =
    "sandbox: { image: helix-sandbox-python, memory: 128MiB, pids: 64, timeout: 20s, pool: 1 }\n";

#[test]
fn run_tasks_execute_in_a_container_and_share_the_workspace() {
    if !docker_ready("run_tasks_execute_in_a_container_and_share_the_workspace") {
        return;
    }
    let p = Project::new();
    let wf = p.workflow(&format!(
        "helix: 1\nname: box\n{PROFILE}tasks:\n  write:\n    run: python3 -c \"open('made.txt','w').write('from the box')\" && id -u && cat /proc/self/status | grep -E 'NoNewPrivs|CapEff'\n  read:\n    needs: [write]\n    run: cat made.txt\n"
    ));
    let out = p.apply(&wf);
    assert!(out.status.success(), "{}", text(&out));
    let write = p.task("write");
    let stdout = write.output.as_ref().expect("output")["stdout"]
        .as_str()
        .expect("stdout")
        .to_string();
    // Not root, no new privileges, no capabilities.
    assert!(stdout.starts_with("1000\n"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    // What the code wrote is in the run's workspace, for the next task and for the host.
    assert_eq!(
        p.task("read").output.expect("output")["stdout"],
        json!("from the box")
    );
    let made = std::fs::read_to_string(p.workspace().join("made.txt")).expect("made.txt");
    assert_eq!(made, "from the box");
    assert!(containers_of(&p.run_id()).is_empty(), "containers left");
}

#[test]
fn a_task_over_its_memory_limit_fails_saying_so_while_its_sibling_succeeds() {
    if !docker_ready("a_task_over_its_memory_limit_fails_saying_so_while_its_sibling_succeeds") {
        return;
    }
    let p = Project::new();
    let wf = p.workflow(&format!(
        "helix: 1\nname: box\n{PROFILE}tasks:\n  balloon:\n    sandbox: {{ memory: 64MiB }}\n    run: python3 -c \"b = bytearray(400 * 1024 * 1024)\"\n  fine:\n    run: echo fine\n"
    ));
    let out = p.apply(&wf);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let balloon = p.task("balloon");
    let error = balloon.error.unwrap_or_default();
    assert!(error.contains("memory limit 64 MiB exceeded"), "{error}");
    assert_eq!(p.task("fine").status, "succeeded");
    assert!(containers_of(&p.run_id()).is_empty(), "containers left");
}

#[test]
fn without_a_docker_engine_the_run_fails_before_any_task_with_the_doctor_hint() {
    let p = Project::new();
    let marker = p.dir.path().join("ran");
    let wf = p.workflow(&format!(
        "helix: 1\nname: box\n{PROFILE}tasks:\n  first:\n    sandbox: host\n    run: touch {}\n  boxed:\n    needs: [first]\n    run: echo hi\n",
        marker.display()
    ));
    let out = p.helix_with(
        &["apply", wf.to_str().expect("path"), "--output", "plain"],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("task `boxed` needs a container sandbox"),
        "{said}"
    );
    assert!(said.contains("helix sandbox doctor"), "{said}");
    // Nothing ran, not even the host task that needs no container.
    assert!(
        !marker.exists(),
        "a task ran although the run could not start"
    );
}

#[test]
fn an_agent_runs_code_with_sandbox_exec_and_sees_the_result() {
    if !docker_ready("an_agent_runs_code_with_sandbox_exec_and_sees_the_result") {
        return;
    }
    let call = |id: &str, args: Json| {
        Response::json(
            200,
            json!({
                "id": "c", "object": "chat.completion", "model": "test-model",
                "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": null,
                    "tool_calls": [{ "id": id, "type": "function", "function": {
                        "name": "sandbox_exec", "arguments": args.to_string() } }]
                }}],
                "usage": { "prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48 }
            }),
        )
    };
    let answer = Response::json(
        200,
        json!({
            "id": "c", "object": "chat.completion", "model": "test-model",
            "choices": [{ "index": 0, "finish_reason": "stop",
                          "message": { "role": "assistant", "content": "done" } }],
            "usage": { "prompt_tokens": 60, "completion_tokens": 2, "total_tokens": 62 }
        }),
    );
    let server = Server::start([
        call(
            "c1",
            json!({ "code": "import os; print(6 * 7, os.getuid())" }),
        ),
        call(
            "c2",
            json!({ "command": "while :; do :; done", "timeout_s": 2 }),
        ),
        answer,
    ]);
    let p = Project::new();
    let wf = p.workflow(&format!(
        "helix: 1\nname: box\nmodels:\n  default: {{ provider: openai, model: test-model, base_url: \"{}/v1\", api_key_env: HELIX_TEST_KEY, timeout: 20s }}\n{PROFILE}agents:\n  coder: {{ tools: [sandbox.exec] }}\ntasks:\n  code:\n    agent: coder\n    prompt: Compute it.\n",
        server.url()
    ));
    let out = p.apply(&wf);
    assert!(out.status.success(), "{}", text(&out));
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    let tool_result = |index: usize| -> Json {
        let messages = requests[index].body["messages"].clone();
        let last = messages.as_array().and_then(|m| m.last()).cloned();
        let content = last.expect("a message")["content"]
            .as_str()
            .expect("text")
            .to_string();
        serde_json::from_str(&content).expect("tool result JSON")
    };
    let first = tool_result(1);
    assert_eq!(first["exit_code"], json!(0), "{first}");
    assert_eq!(first["stdout"], json!("42 1000\n"), "{first}");
    let second = tool_result(2);
    assert_eq!(second["timed_out"], json!(true), "{second}");
    assert!(
        second["limit"].as_str().unwrap_or("").contains("timeout"),
        "{second}"
    );
    assert!(containers_of(&p.run_id()).is_empty(), "containers left");
}

#[test]
fn validation_refuses_sandbox_tools_without_a_sandbox_and_bad_mounts() {
    let p = Project::new();
    let wf = p.workflow(
        "helix: 1\nname: box\nmodels:\n  default: { provider: scripted, replies: r.yaml }\nagents:\n  coder: { tools: [sandbox.exec] }\ntasks:\n  code:\n    agent: coder\n    prompt: Go.\n  other:\n    sandbox: { image: x, mounts: [\"data:relative\"] }\n    run: ls\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_helix"))
        .args(["validate", wf.to_str().expect("path")])
        .current_dir(p.dir.path())
        .output()
        .expect("validate");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("gives `coder` the tool `sandbox.exec`, but the task has no sandbox"),
        "{said}"
    );
    assert!(
        said.contains("the container path must be absolute"),
        "{said}"
    );
}

#[test]
fn the_sandbox_example_workflow_runs_its_tests_in_a_container() {
    if !docker_ready("the_sandbox_example_workflow_runs_its_tests_in_a_container") {
        return;
    }
    let p = Project::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/sandbox-tests.yaml");
    let out = p.apply(&example);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = p.task("pytest").output.expect("output")["stdout"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(containers_of(&p.run_id()).is_empty(), "containers left");
}
