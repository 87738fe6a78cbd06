//! Record and replay: calls recorded against an OpenAI-compatible server on loopback are
//! played back from the cassette with the server gone.

mod llm_support;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use helix::llm::build::provider;
use helix::llm::{
    replay_all, wrap_for_record, ApiKey, ChatRequest, ChatResponse, HttpOptions, LlmError, Message,
    OpenAi, Provider, Recorder, Replay, RetryPolicy, Scrub, SharedCassette, ToolSpec,
};
use helix::workflow::ModelDecl;
use llm_support::{Response, Server};
use serde_json::{json, Value as Json};

const TEST_LIMIT: Duration = Duration::from_secs(30);
const KEY: &str = "sk-test-0123456789-SECRET";
const SECRET: &str = "hunter2-db-password";

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TEST_LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {TEST_LIMIT:?}"),
    }
}

fn openai(server: &Server, model: &str) -> Arc<dyn Provider> {
    let http = HttpOptions {
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(10),
        },
    };
    Arc::new(
        OpenAi::new(format!("{}/v1", server.url()), model)
            .with_key(Some(ApiKey::new(KEY)), "HELIX_TEST_KEY")
            .with_http(http),
    )
}

fn reply(message: Json, finish_reason: &str) -> Response {
    let mut message = message;
    message["role"] = json!("assistant");
    Response::json(
        200,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{ "index": 0, "message": message, "finish_reason": finish_reason }],
            "usage": { "prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28 }
        }),
    )
}

fn text_reply(text: &str) -> Response {
    reply(json!({ "content": text }), "stop")
}

fn write_call_reply() -> Response {
    let arguments = json!({ "path": "app.py", "content": "print('hi')\n" });
    reply(
        json!({
            "content": null,
            "tool_calls": [{
                "id": "call_abc",
                "type": "function",
                "function": { "name": "fs_write", "arguments": arguments.to_string() }
            }]
        }),
        "tool_calls",
    )
}

fn write_tool() -> ToolSpec {
    ToolSpec {
        name: "fs.write".into(),
        description: "Write a file in the workspace".into(),
        parameters: json!({
            "type": "object",
            "properties": { "path": { "type": "string" }, "content": { "type": "string" } },
            "required": ["path", "content"]
        }),
    }
}

fn first_turn() -> ChatRequest {
    ChatRequest {
        system: "You are a coder.".into(),
        messages: vec![Message::user("Write app.py")],
        tools: vec![write_tool()],
        agent: "coder".into(),
        task: "build".into(),
        turn: 1,
        ..ChatRequest::default()
    }
}

/// The second turn of the conversation `first_turn` began, after the model's tool call.
fn second_turn(first_reply: &ChatResponse) -> ChatRequest {
    let mut request = first_turn();
    request.turn = 2;
    request.messages.push(Message::assistant(
        &first_reply.content,
        first_reply.tool_calls.clone(),
    ));
    for call in &first_reply.tool_calls {
        request
            .messages
            .push(Message::tool_result(&call.id, "wrote 12 bytes"));
    }
    request
}

async fn chat(provider: &dyn Provider, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
    bounded(provider.chat(request, None)).await
}

fn expect_ok(result: Result<ChatResponse, LlmError>) -> ChatResponse {
    result.unwrap_or_else(|e| panic!("expected a reply, got: {e}"))
}

fn expect_err(result: Result<ChatResponse, LlmError>) -> String {
    match result {
        Ok(reply) => panic!("expected an error, got: {reply:?}"),
        Err(e) => e.to_string(),
    }
}

fn load(path: &Path) -> Replay {
    Replay::load(path).unwrap_or_else(|e| panic!("{e}"))
}

fn cassette_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).expect("the cassette is readable");
    serde_json::from_str(&text).expect("the cassette is valid JSON")
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().expect("a temporary directory"))
    }

    fn cassette(&self) -> PathBuf {
        self.0.path().join("run.cassette.json")
    }
}

/// Records the two turns of `first_turn`'s conversation (a tool call, then a final answer)
/// and returns them with their replies.
async fn record_conversation(path: &Path) -> Vec<(ChatRequest, ChatResponse)> {
    let server = Server::start([write_call_reply(), text_reply("Done: app.py written.")]);
    let recorder = Recorder::new(openai(&server, "gpt-test"), path, Vec::<String>::new())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recorder.name(), "recording openai");
    let first = first_turn();
    let first_reply = expect_ok(chat(&recorder, &first).await);
    let second = second_turn(&first_reply);
    let second_reply = expect_ok(chat(&recorder, &second).await);
    assert_eq!(server.requests().len(), 2);
    vec![(first, first_reply), (second, second_reply)]
}

#[tokio::test]
async fn a_recorded_conversation_replays_identically_without_the_server() {
    let dir = Dir::new();
    let recorded = record_conversation(&dir.cassette()).await;
    assert_eq!(recorded[0].1.tool_calls[0].name, "fs.write");

    let replay = load(&dir.cassette());
    assert_eq!(replay.len(), 2);
    for (request, response) in &recorded {
        assert_eq!(&expect_ok(chat(&replay, request).await), response);
    }

    let file = cassette_json(&dir.cassette());
    assert_eq!(file["version"], 1);
    let entries = file["entries"].as_array().expect("entries");
    assert_eq!(entries[0]["turn"], 1);
    assert_eq!(entries[1]["turn"], 2);
    assert_eq!(entries[0]["provider"], "openai");
    assert_eq!(entries[0]["response"]["usage"]["input_tokens"], 21);
    assert_eq!(entries[1]["response"]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_request_not_in_the_cassette_is_named() {
    let dir = Dir::new();
    let recorded = record_conversation(&dir.cassette()).await;
    let replay = load(&dir.cassette());
    let path = dir.cassette().display().to_string();

    let mut other_task = first_turn();
    other_task.task = "test".into();
    let error = expect_err(chat(&replay, &other_task).await);
    assert_eq!(
        error,
        format!(
            "cassette {path} has no recorded call for agent `coder`, task `test`, turn 1: \
             it holds no call of this agent and task"
        )
    );

    let mut third = second_turn(&recorded[1].1);
    third.turn = 3;
    let error = expect_err(chat(&replay, &third).await);
    assert_eq!(
        error,
        format!(
            "cassette {path} has no recorded call for agent `coder`, task `build`, turn 3: \
             it holds turns 1 to 2 of this task"
        )
    );
}

#[tokio::test]
async fn a_changed_prompt_is_reported_as_changed() {
    let dir = Dir::new();
    record_conversation(&dir.cassette()).await;
    let replay = load(&dir.cassette());
    let path = dir.cassette().display().to_string();

    let mut request = first_turn();
    request.system = "You are a careful coder.".into();
    let error = expect_err(chat(&replay, &request).await);
    assert_eq!(
        error,
        format!(
            "the request of agent `coder`, task `build`, turn 1 changed since cassette {path} \
             was recorded (the system prompt differs); record the run again"
        )
    );

    let mut request = first_turn();
    request.messages = vec![Message::user("Write main.py")];
    let error = expect_err(chat(&replay, &request).await);
    assert!(error.contains("changed") && error.contains("(message 1 (user) differs)"));
}

#[tokio::test]
async fn the_cassette_holds_neither_the_api_key_nor_declared_secrets() {
    let dir = Dir::new();
    let server = Server::start([text_reply(&format!("Connected with {SECRET}."))]);
    let recorder = Recorder::new(
        openai(&server, "gpt-test"),
        dir.cassette(),
        vec![SECRET.to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut request = first_turn();
    request.messages = vec![Message::user(format!("The password is {SECRET}."))];
    request.tools[0].parameters["properties"]["path"]["default"] = json!(SECRET);

    let live = expect_ok(chat(&recorder, &request).await);
    assert_eq!(live.content, format!("Connected with {SECRET}."));
    // The key did go over the wire: it is the cassette that must not have it.
    let sent = server.single_request();
    assert_eq!(
        sent.header("authorization").map(str::to_string),
        Some(format!("Bearer {KEY}"))
    );
    drop(server);

    let text = std::fs::read_to_string(dir.cassette()).expect("the cassette is readable");
    assert!(!text.contains(KEY), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(text.contains("The password is ***."), "{text}");

    // The same request, secret and all, matches when replay is told the same secrets; the
    // secret itself cannot come back.
    let replay = load(&dir.cassette()).with_scrub(vec![SECRET.to_string()]);
    let replayed = expect_ok(chat(&replay, &request).await);
    assert_eq!(replayed.content, "Connected with ***.");
}

#[tokio::test]
async fn run_values_in_prompts_and_replies_follow_the_new_run() {
    let dir = Dir::new();
    let server = Server::start([text_reply("Wrote /runs/R1/workspace/app.py")]);
    let scrub = |run: &str| Scrub::new(Vec::new()).run_value("run_id", run);
    let request = |run: &str| {
        let mut request = first_turn();
        request.system = format!("You are a coder in run `{run}`.");
        request
    };
    let recorder = Recorder::new(openai(&server, "gpt-test"), dir.cassette(), scrub("R1"))
        .unwrap_or_else(|e| panic!("{e}"));
    expect_ok(chat(&recorder, &request("R1")).await);
    drop(server);

    let replay = load(&dir.cassette()).with_scrub(scrub("R2"));
    let replayed = expect_ok(chat(&replay, &request("R2")).await);
    assert_eq!(replayed.content, "Wrote /runs/R2/workspace/app.py");
}

#[tokio::test]
async fn a_recording_cut_short_is_a_valid_cassette_of_the_calls_made() {
    let dir = Dir::new();
    // The second call fails for good, as if the run died during it.
    let server = Server::start([write_call_reply(), Response::HangUp, Response::HangUp]);
    let recorder = Recorder::new(openai(&server, "gpt-test"), dir.cassette(), Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let first = first_turn();
    let first_reply = expect_ok(chat(&recorder, &first).await);
    let second = second_turn(&first_reply);
    expect_err(chat(&recorder, &second).await);
    drop(recorder);
    drop(server);

    let entries = cassette_json(&dir.cassette())["entries"].clone();
    assert_eq!(entries.as_array().map(Vec::len), Some(1));
    let leftovers: Vec<_> = std::fs::read_dir(dir.0.path())
        .expect("the directory")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("run.cassette.json")]
    );

    let replay = load(&dir.cassette());
    assert_eq!(expect_ok(chat(&replay, &first).await), first_reply);
    assert!(expect_err(chat(&replay, &second).await).contains("no recorded call"));
}

#[tokio::test]
async fn many_agents_of_two_models_record_into_one_cassette_and_replay_concurrently() {
    const TASKS: usize = 24;
    let dir = Dir::new();
    // Replies are handed out in arrival order, so which task gets which is up to the race;
    // replay must give each task the reply it got.
    let server = Server::start((0..TASKS).map(|i| text_reply(&format!("answer {i}"))));
    let cassette =
        SharedCassette::create(dir.cassette(), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
    let models = [
        wrap_for_record(openai(&server, "fast"), &cassette),
        wrap_for_record(openai(&server, "smart"), &cassette),
    ];
    let request = |i: usize| {
        let mut request = first_turn();
        request.model = if i % 2 == 0 { "fast" } else { "smart" }.into();
        request.task = format!("item-{i}");
        request
    };

    let recording = (0..TASKS).map(|i| {
        let provider = models[i % 2].clone();
        tokio::spawn(async move { (i, chat(provider.as_ref(), &request(i)).await) })
    });
    let mut live = HashMap::new();
    for task in recording {
        let (i, result) = task.await.expect("a recording task");
        live.insert(i, expect_ok(result));
    }
    assert_eq!(cassette.len(), TASKS);
    drop(models);
    drop(server);

    let replay = replay_all(&dir.cassette(), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
    let replaying = (0..TASKS).map(|i| {
        let replay = replay.clone();
        tokio::spawn(async move { (i, chat(replay.as_ref(), &request(i)).await) })
    });
    for task in replaying {
        let (i, result) = task.await.expect("a replaying task");
        assert_eq!(Some(&expect_ok(result)), live.get(&i), "task item-{i}");
    }
}

#[tokio::test]
async fn a_retried_request_gets_the_recorded_answers_in_order() {
    let dir = Dir::new();
    let server = Server::start([text_reply("not JSON"), text_reply("{\"ok\": true}")]);
    let recorder = Recorder::new(openai(&server, "gpt-test"), dir.cassette(), Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let request = first_turn();
    let first = expect_ok(chat(&recorder, &request).await);
    let second = expect_ok(chat(&recorder, &request).await);
    drop(server);

    let replay = load(&dir.cassette());
    assert_eq!(expect_ok(chat(&replay, &request).await), first);
    assert_eq!(expect_ok(chat(&replay, &request).await), second);
    assert_eq!(expect_ok(chat(&replay, &request).await), second);
}

#[tokio::test]
async fn the_replay_provider_reads_its_cassette_beside_the_workflow() {
    let dir = Dir::new();
    let recorded = record_conversation(&dir.cassette()).await;
    let decl = |settings: Json| ModelDecl {
        provider: "replay".into(),
        model: None,
        settings,
    };

    let built = provider(
        &decl(json!({ "provider": "replay", "file": "run.cassette.json" })),
        dir.0.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(built.name(), "replay");
    assert_eq!(
        &expect_ok(chat(built.as_ref(), &recorded[0].0).await),
        &recorded[0].1
    );

    let missing = provider(
        &decl(json!({ "provider": "replay", "file": "gone.json" })),
        dir.0.path(),
    );
    let error = missing.err().map(|e| e.to_string()).unwrap_or_default();
    let gone = dir.0.path().join("gone.json");
    assert!(
        error.starts_with(&format!("cannot read cassette {}", gone.display())),
        "{error}"
    );
}

#[test]
fn a_cassette_of_another_version_or_edited_by_hand_is_refused() {
    let dir = Dir::new();
    let path = dir.cassette();
    let load_err = |text: &str| {
        std::fs::write(&path, text).expect("write the cassette");
        Replay::load(&path).err().map(|e| e.to_string())
    };
    assert_eq!(
        load_err(r#"{ "version": 2, "entries": [] }"#),
        Some(format!(
            "cassette {} has version 2; this helix reads version 1",
            path.display()
        ))
    );

    let edited = json!({ "version": 1, "entries": [{
        "agent": "coder", "task": "build", "turn": 1,
        "request_sha256": "0000", "provider": "openai",
        "request": { "model": "", "system": "edited", "messages": [], "tools": [], "json": false },
        "response": { "content": "hi", "tool_calls": [], "usage": { "input_tokens": 1, "output_tokens": 1 }, "finish_reason": "stop" }
    }]});
    let error = load_err(&edited.to_string()).unwrap_or_default();
    assert!(
        error.contains("entry 1 (agent `coder`, task `build`, turn 1)"),
        "{error}"
    );

    let error = load_err("{ not json").unwrap_or_default();
    assert!(error.contains("is not a cassette"), "{error}");
}

#[test]
fn an_unwritable_cassette_fails_before_any_call() {
    let error = SharedCassette::create("/nonexistent-dir/run.json", Vec::new())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.starts_with("cannot write cassette /nonexistent-dir/run.json"),
        "{error}"
    );
}
