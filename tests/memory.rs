//! Long-term memory end to end: the real `helix` binary against an OpenAI-compatible server
//! the test starts on 127.0.0.1, with the journal's SQLite file holding the memories.

mod llm_support;
mod project;

use std::path::PathBuf;

use llm_support::{Response, Server};
use project::{text, Project};
use serde_json::{json, Value as Json};

/// A project whose `default` model is the test server.
fn workflow(p: &Project, server: &Server, rest: &str) -> PathBuf {
    p.workflow(&format!(
        "helix: 1\nname: remember\nmodels:\n  default: {{ provider: openai, model: test-model, base_url: \"{}/v1\", api_key_env: HELIX_TEST_KEY, timeout: 20s }}\n{rest}",
        server.url()
    ))
}

fn answer(content: &str) -> Response {
    Response::json(
        200,
        json!({
            "id": "c", "object": "chat.completion", "model": "test-model",
            "choices": [{ "index": 0, "finish_reason": "stop",
                          "message": { "role": "assistant", "content": content } }],
            "usage": { "prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60 }
        }),
    )
}

/// The system prompt of a recorded chat request.
fn system_prompt(body: &Json) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "system"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

const LESSON: &str = "Run the parser tests with fixtures from tests/data, not inline strings.";

const MEMORY_WORKFLOW: &str = "memory:\n  synthesize: true\n  recall: { top_k: 3 }\nagents:\n  coder: { role: a careful engineer }\ntasks:\n  parse:\n    agent: coder\n    prompt: Write the parser tests for the config format.\n";

#[test]
fn a_lesson_from_the_first_run_is_in_the_second_runs_prompt() {
    let p = Project::new();
    let first = Server::start([answer("Tests written."), answer(LESSON)]);
    let out = p.apply(&workflow(&p, &first, MEMORY_WORKFLOW));
    assert!(out.status.success(), "{}", text(&out));
    let requests = first.requests();
    assert_eq!(requests.len(), 2, "the task's call and the lesson call");
    assert!(!system_prompt(&requests[0].body).contains(LESSON));
    // The lesson call sees the task and its answer.
    let lesson_request = requests[1].body.to_string();
    assert!(
        lesson_request.contains("Write the parser tests"),
        "{lesson_request}"
    );
    assert!(
        lesson_request.contains("Tests written."),
        "{lesson_request}"
    );

    let second = Server::start([answer("Done again."), answer("NONE")]);
    let out = p.apply(&workflow(&p, &second, MEMORY_WORKFLOW));
    assert!(out.status.success(), "{}", text(&out));
    let system = system_prompt(&second.requests()[0].body);
    assert!(
        system.contains(LESSON),
        "the recalled lesson is missing:\n{system}"
    );
    assert!(system.contains("[task_summary]"), "{system}");

    // Stored once, with where it came from; `NONE` stored nothing.
    let listed = text(&p.helix(&["memory", "list"]));
    assert_eq!(listed.matches(LESSON).count(), 1, "{listed}");
    let shown = text(&p.helix(&["memory", "show", "1"]));
    assert!(shown.contains("\"task_id\": \"parse\""), "{shown}");
    assert!(shown.contains("\"agent\": \"coder\""), "{shown}");
}

#[test]
fn a_task_that_failed_then_succeeded_leaves_an_error_resolution() {
    let p = Project::new();
    let server = Server::start([
        Response::json(400, json!({ "error": { "message": "context too long" } })),
        answer("Fixed by splitting the input."),
        answer("Split inputs over 8k tokens before sending them."),
    ]);
    let wf = workflow(
        &p,
        &server,
        "memory: { synthesize: true }\nagents:\n  coder: { role: an engineer }\ntasks:\n  big:\n    agent: coder\n    prompt: Summarise the log.\n    retry: { attempts: 2, backoff: 10ms }\n",
    );
    let out = p.apply(&wf);
    assert!(out.status.success(), "{}", text(&out));
    let found = text(&p.helix(&[
        "memory",
        "search",
        "split big inputs",
        "--kind",
        "error_resolution",
    ]));
    assert!(found.contains("#1 "), "{found}");
    assert!(found.contains("[error_resolution] Error:"), "{found}");
    let shown = text(&p.helix(&["memory", "show", "1"]));
    assert!(shown.contains("context too long"), "{shown}");
    assert!(
        shown.contains("Fix: Split inputs over 8k tokens before sending them."),
        "{shown}"
    );
}

#[test]
fn agents_search_and_store_memories_with_tools() {
    let p = Project::new();
    let call = |id: &str, name: &str, args: Json| {
        Response::json(
            200,
            json!({
                "id": "c", "object": "chat.completion", "model": "test-model",
                "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": null,
                    "tool_calls": [{ "id": id, "type": "function", "function": {
                        "name": name, "arguments": args.to_string() } }]
                }}],
                "usage": { "prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48 }
            }),
        )
    };
    let out = p.helix(&[
        "memory",
        "add",
        "The staging database is Postgres 15 on port 5433.",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let server = Server::start([
        call(
            "c1",
            "memory_search",
            json!({ "query": "which port does the staging database use" }),
        ),
        call(
            "c2",
            "memory_store",
            json!({ "text": "Migrations run with sqlx.", "kind": "fact" }),
        ),
        answer("Port 5433."),
    ]);
    let wf = workflow(
        &p,
        &server,
        "memory: {}\nagents:\n  ops: { tools: [memory.search, memory.store] }\ntasks:\n  ask:\n    agent: ops\n    prompt: Which port?\n",
    );
    let out = p.apply(&wf);
    assert!(out.status.success(), "{}", text(&out));
    let requests = server.requests();
    let search_result = requests[1].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(search_result.contains("port 5433"), "{search_result}");
    let listed = text(&p.helix(&["memory", "list", "--kind", "fact"]));
    assert!(listed.contains("Migrations run with sqlx."), "{listed}");
}

#[test]
fn a_dimension_mismatch_stops_the_run_before_it_starts_and_keeps_the_journal() {
    let p = Project::new();
    let server = Server::start([answer("ok"), answer(LESSON)]);
    let out = p.apply(&workflow(&p, &server, MEMORY_WORKFLOW));
    assert!(out.status.success(), "{}", text(&out));
    let runs_before = text(&p.helix(&["runs", "list"]));

    let other = Server::start([]);
    let wf = workflow(
        &p,
        &other,
        "memory: { dimensions: 128 }\nagents:\n  coder: { role: x }\ntasks:\n  t:\n    agent: coder\n    prompt: Go.\n",
    );
    let out = p.apply(&wf);
    let said = text(&out);
    assert_ne!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("384"), "{said}");
    assert!(said.contains("128"), "{said}");
    assert!(said.contains("helix memory reindex"), "{said}");
    assert!(other.requests().is_empty(), "a model was asked");
    // The journal still has the first run.
    let runs_after = text(&p.helix(&["runs", "list"]));
    let first_line = runs_before.lines().nth(1).unwrap_or_default().to_string();
    assert!(
        runs_after.contains(&first_line),
        "{runs_before}\n---\n{runs_after}"
    );
}

#[test]
fn an_unreachable_embedding_server_fails_the_task_naming_the_url() {
    let p = Project::new();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = dead.local_addr().expect("addr").port();
    drop(dead);
    let server = Server::start([answer("never")]);
    let wf = workflow(
        &p,
        &server,
        &format!("  embed: {{ provider: openai, model: embed-test, base_url: \"http://127.0.0.1:{port}/v1\", timeout: 2s }}\nmemory: {{ embedder: embed }}\nagents:\n  coder: {{ role: x }}\ntasks:\n  t:\n    agent: coder\n    prompt: Go.\n"),
    );
    let out = p.apply(&wf);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
}

#[test]
fn the_offline_memory_example_recalls_its_lesson_on_the_second_run() {
    let p = Project::new();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/remember.yaml");
    let example = example.to_str().expect("path");
    let out = p.helix(&["apply", example, "--output", "plain"]);
    assert!(out.status.success(), "{}", text(&out));
    let cassette = p.dir.path().join("second.json");
    let out = p.helix(&[
        "apply",
        example,
        "--output",
        "plain",
        "--record",
        cassette.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let recorded: Json =
        serde_json::from_str(&std::fs::read_to_string(&cassette).expect("cassette"))
            .expect("cassette JSON");
    let system = recorded["entries"][0]["request"]["system"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(system.contains("## Recalled memory"), "{system}");
    assert!(
        system.contains("Run the parser's fuzz corpus before every release"),
        "{system}"
    );
    // The second run's lesson was the same: stored once.
    let listed = text(&p.helix(&["memory", "list"]));
    assert_eq!(listed.lines().count(), 1, "{listed}");
}

#[test]
fn secrets_never_reach_long_term_memory() {
    let p = Project::new();
    let token = "tok-9e1c3b77d2";
    let server = Server::start([
        answer("Deployed."),
        answer(&format!(
            "Deploy with the token {token} and the --atomic flag."
        )),
    ]);
    let wf = workflow(
        &p,
        &server,
        "secrets: [DEPLOY_TOKEN]\nmemory: { synthesize: true }\nagents:\n  ops: { role: deployer }\ntasks:\n  ship:\n    agent: ops\n    prompt: \"Deploy using {{ env.DEPLOY_TOKEN }}.\"\n",
    );
    let out = p.helix_with(
        &["apply", wf.to_str().expect("path"), "--output", "plain"],
        &[("DEPLOY_TOKEN", token)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let exported = text(&p.helix(&["memory", "export"]));
    assert!(
        exported.contains("Deploy with the token *** and the --atomic flag."),
        "{exported}"
    );
    assert!(!exported.contains(token), "{exported}");
}
