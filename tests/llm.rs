//! LLM providers against real HTTP on loopback: a server started by each test plays an
//! OpenAI- or Anthropic-compatible endpoint, faults included, and records what it received.

mod llm_support;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helix::llm::build::{provider, provider_with_env};
use helix::llm::{
    Anthropic, ApiKey, ChatRequest, ChatResponse, HttpOptions, LlmError, Message, OpenAi, Provider,
    RetryPolicy, Scripted, ToolCall, ToolSpec, Usage,
};
use helix::workflow::ModelDecl;
use llm_support::{Recorded, Response, Server};
use serde_json::{json, Value as Json};

/// Every test ends well within this, or fails as hung.
const TEST_LIMIT: Duration = Duration::from_secs(30);
const KEY: &str = "sk-test-0123456789-SECRET";
const KEY_ENV: &str = "HELIX_TEST_KEY";

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TEST_LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {TEST_LIMIT:?}"),
    }
}

/// Quick retries, so fault tests take milliseconds; a cap high enough that a one-second
/// `Retry-After` is honoured in full.
fn fast() -> HttpOptions {
    HttpOptions {
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_secs(2),
        },
    }
}

#[derive(Debug, Clone, Copy)]
enum Wire {
    OpenAi,
    Anthropic,
}

impl Wire {
    fn provider(self, server: &Server, model: &str, http: HttpOptions) -> Box<dyn Provider> {
        let key = Some(ApiKey::new(KEY));
        match self {
            Wire::OpenAi => Box::new(
                OpenAi::new(format!("{}/v1", server.url()), model)
                    .with_key(key, KEY_ENV)
                    .with_http(http),
            ),
            Wire::Anthropic => Box::new(
                Anthropic::new(server.url(), model)
                    .with_key(key, KEY_ENV)
                    .with_http(http),
            ),
        }
    }

    /// The base URL errors should name.
    fn base_url(self, server: &Server) -> String {
        match self {
            Wire::OpenAi => format!("{}/v1", server.url()),
            Wire::Anthropic => server.url(),
        }
    }

    fn path(self) -> &'static str {
        match self {
            Wire::OpenAi => "/v1/chat/completions",
            Wire::Anthropic => "/v1/messages",
        }
    }

    /// A plain text answer.
    fn reply(self, text: &str) -> Response {
        match self {
            Wire::OpenAi => Response::json(200, openai_reply(json!({ "content": text }), "stop")),
            Wire::Anthropic => Response::json(
                200,
                anthropic_reply(json!([{ "type": "text", "text": text }]), "end_turn"),
            ),
        }
    }

    /// The stream of "Hello" cut off right after "Hel", before any end marker.
    fn cut_stream(self) -> Response {
        let keep = match self {
            Wire::OpenAi => 1,
            Wire::Anthropic => 3,
        };
        self.stream(&["Hel", "lo"], Some(keep))
    }

    /// A streamed answer of `pieces`, cut off after the first `keep` events when `keep`
    /// is given.
    fn stream(self, pieces: &[&str], keep: Option<usize>) -> Response {
        let mut events = match self {
            Wire::OpenAi => {
                let mut events: Vec<String> = pieces
                    .iter()
                    .map(|p| openai_chunk(json!({ "content": p }), None))
                    .collect();
                events.push(openai_chunk(json!({}), Some("stop")));
                events.push("data: [DONE]".into());
                events
            }
            Wire::Anthropic => {
                let mut events = vec![
                    anthropic_event(
                        json!({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}}),
                    ),
                    anthropic_event(
                        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                    ),
                ];
                events.extend(pieces.iter().map(|p| {
                    anthropic_event(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}))
                }));
                events.push(anthropic_event(
                    json!({"type": "content_block_stop", "index": 0}),
                ));
                events.push(anthropic_event(json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}})));
                events.push(anthropic_event(json!({"type": "message_stop"})));
                events
            }
        };
        if let Some(keep) = keep {
            events.truncate(keep);
        }
        Response::sse(events)
    }
}

fn openai_reply(message: Json, finish_reason: &str) -> Json {
    let mut message = message;
    message["role"] = json!("assistant");
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{ "index": 0, "message": message, "finish_reason": finish_reason }],
        "usage": { "prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28 }
    })
}

fn openai_chunk(delta: Json, finish_reason: Option<&str>) -> String {
    let chunk = json!({
        "object": "chat.completion.chunk",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }]
    });
    format!("data: {chunk}")
}

fn anthropic_reply(content: Json, stop_reason: &str) -> Json {
    json!({
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": content,
        "stop_reason": stop_reason,
        "usage": { "input_tokens": 31, "output_tokens": 11 }
    })
}

fn anthropic_event(data: Json) -> String {
    format!(
        "event: {}\ndata: {data}",
        data["type"].as_str().unwrap_or("unknown")
    )
}

fn request() -> ChatRequest {
    ChatRequest {
        system: "You are terse.".into(),
        messages: vec![Message::user("Say hi")],
        agent: "coder".into(),
        task: "greet".into(),
        turn: 1,
        ..ChatRequest::default()
    }
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

async fn chat(provider: &dyn Provider, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
    bounded(provider.chat(request, None)).await
}

/// Runs a streamed chat and returns the reply with the pieces `on_token` received.
async fn chat_streamed(
    provider: &dyn Provider,
    request: &ChatRequest,
) -> (Result<ChatResponse, LlmError>, Vec<String>) {
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let sink = tokens.clone();
    let on_token = move |text: &str| sink.lock().expect("tokens").push(text.to_string());
    let result = bounded(provider.chat(request, Some(&on_token))).await;
    let tokens = tokens.lock().expect("tokens").clone();
    (result, tokens)
}

fn expect_ok(result: Result<ChatResponse, LlmError>) -> ChatResponse {
    match result {
        Ok(reply) => reply,
        Err(e) => panic!("expected a reply, got: {e}"),
    }
}

fn expect_err(result: Result<ChatResponse, LlmError>) -> LlmError {
    match result {
        Ok(reply) => panic!("expected an error, got: {reply:?}"),
        Err(e) => e,
    }
}

fn body_of(recorded: &Recorded) -> &Json {
    &recorded.body
}

// --- Plain replies -------------------------------------------------------------------------

#[tokio::test]
async fn openai_plain_reply_with_usage() {
    let server = Server::start([Wire::OpenAi.reply("Hi.")]);
    let mut provider = OpenAi::new(format!("{}/v1", server.url()), "gpt-test")
        .with_key(Some(ApiKey::new(KEY)), KEY_ENV)
        .with_http(fast());
    provider.temperature = Some(0.2);
    let mut req = request();
    req.max_tokens = Some(100);

    let reply = expect_ok(chat(&provider, &req).await);

    assert_eq!(reply.content, "Hi.");
    assert_eq!(reply.finish_reason, "stop");
    assert_eq!(
        reply.usage,
        Usage {
            input_tokens: 21,
            output_tokens: 7
        }
    );
    assert!(reply.tool_calls.is_empty());
    let sent = server.single_request();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        body_of(&sent),
        &json!({
            "model": "gpt-test",
            "messages": [
                { "role": "system", "content": "You are terse." },
                { "role": "user", "content": "Say hi" }
            ],
            "temperature": 0.2,
            "max_tokens": 100
        })
    );
}

#[tokio::test]
async fn anthropic_plain_reply_with_usage() {
    let server = Server::start([Wire::Anthropic.reply("Hi.")]);
    let provider = Wire::Anthropic.provider(&server, "claude-test", fast());

    let reply = expect_ok(chat(provider.as_ref(), &request()).await);

    assert_eq!(reply.content, "Hi.");
    assert_eq!(reply.finish_reason, "end_turn");
    assert_eq!(
        reply.usage,
        Usage {
            input_tokens: 31,
            output_tokens: 11
        }
    );
    let sent = server.single_request();
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        body_of(&sent),
        &json!({
            "model": "claude-test",
            "max_tokens": 4096,
            "system": "You are terse.",
            "messages": [{ "role": "user", "content": [{ "type": "text", "text": "Say hi" }] }]
        })
    );
}

#[tokio::test]
async fn a_request_model_overrides_the_provider_default() {
    let server = Server::start([Wire::OpenAi.reply("ok")]);
    let provider = Wire::OpenAi.provider(&server, "gpt-default", fast());
    let mut req = request();
    req.model = "gpt-special".into();

    expect_ok(chat(provider.as_ref(), &req).await);

    assert_eq!(server.single_request().body["model"], "gpt-special");
}

// --- Tool calls ----------------------------------------------------------------------------

#[tokio::test]
async fn openai_tool_calls_round_trip() {
    let arguments = json!({ "path": "app.py", "content": "print('hi')\n" });
    let server = Server::start([Response::json(
        200,
        openai_reply(
            json!({
                "content": null,
                "tool_calls": [{
                    "id": "call_abc",
                    "type": "function",
                    "function": { "name": "fs_write", "arguments": arguments.to_string() }
                }]
            }),
            "tool_calls",
        ),
    )]);
    let provider = Wire::OpenAi.provider(&server, "gpt-test", fast());
    let mut req = request();
    req.tools = vec![write_tool()];
    req.messages.push(Message::assistant(
        "",
        vec![ToolCall {
            id: "call_1".into(),
            name: "fs.read".into(),
            arguments: json!({ "path": "spec.md" }),
        }],
    ));
    req.messages.push(Message::tool_result("call_1", "# Spec"));

    let reply = expect_ok(chat(provider.as_ref(), &req).await);

    assert_eq!(reply.finish_reason, "tool_calls");
    assert_eq!(
        reply.tool_calls,
        vec![ToolCall {
            id: "call_abc".into(),
            name: "fs.write".into(),
            arguments
        }]
    );
    let body = server.single_request().body;
    // Dots are not allowed in wire tool names; the schema goes as it is.
    assert_eq!(
        body["tools"],
        json!([{
            "type": "function",
            "function": {
                "name": "fs_write",
                "description": "Write a file in the workspace",
                "parameters": write_tool().parameters
            }
        }])
    );
    let history = &body["messages"];
    assert_eq!(history[2]["role"], "assistant");
    assert_eq!(history[2]["content"], Json::Null);
    let call = &history[2]["tool_calls"][0];
    assert_eq!(call["id"], "call_1");
    assert_eq!(call["function"]["name"], "fs_read");
    let sent_arguments = call["function"]["arguments"].as_str().unwrap_or_default();
    assert_eq!(
        serde_json::from_str::<Json>(sent_arguments).ok(),
        Some(json!({ "path": "spec.md" }))
    );
    assert_eq!(
        history[3],
        json!({ "role": "tool", "tool_call_id": "call_1", "content": "# Spec" })
    );
}

#[tokio::test]
async fn anthropic_tool_calls_round_trip() {
    let server = Server::start([Response::json(
        200,
        anthropic_reply(
            json!([
                { "type": "text", "text": "Writing it." },
                { "type": "tool_use", "id": "toolu_1", "name": "fs_write",
                  "input": { "path": "app.py", "content": "x" } }
            ]),
            "tool_use",
        ),
    )]);
    let provider = Wire::Anthropic.provider(&server, "claude-test", fast());
    let mut req = request();
    req.tools = vec![write_tool()];
    let read = |id: &str, path: &str| ToolCall {
        id: id.into(),
        name: "fs.read".into(),
        arguments: json!({ "path": path }),
    };
    req.messages.push(Message::assistant(
        "Reading both.",
        vec![read("toolu_a", "a.md"), read("toolu_b", "b.md")],
    ));
    req.messages.push(Message::tool_result("toolu_a", "A"));
    req.messages.push(Message::tool_result("toolu_b", "B"));

    let reply = expect_ok(chat(provider.as_ref(), &req).await);

    assert_eq!(reply.content, "Writing it.");
    assert_eq!(reply.finish_reason, "tool_use");
    assert_eq!(
        reply.tool_calls,
        vec![ToolCall {
            id: "toolu_1".into(),
            name: "fs.write".into(),
            arguments: json!({ "path": "app.py", "content": "x" })
        }]
    );
    let body = server.single_request().body;
    assert_eq!(
        body["tools"],
        json!([{
            "name": "fs_write",
            "description": "Write a file in the workspace",
            "input_schema": write_tool().parameters
        }])
    );
    assert_eq!(
        body["messages"],
        json!([
            { "role": "user", "content": [{ "type": "text", "text": "Say hi" }] },
            { "role": "assistant", "content": [
                { "type": "text", "text": "Reading both." },
                { "type": "tool_use", "id": "toolu_a", "name": "fs_read", "input": { "path": "a.md" } },
                { "type": "tool_use", "id": "toolu_b", "name": "fs_read", "input": { "path": "b.md" } }
            ]},
            // Both results in one user message: the API wants roles to alternate.
            { "role": "user", "content": [
                { "type": "tool_result", "tool_use_id": "toolu_a", "content": "A" },
                { "type": "tool_result", "tool_use_id": "toolu_b", "content": "B" }
            ]}
        ])
    );
}

#[tokio::test]
async fn malformed_tool_arguments_are_an_error_naming_the_tool() {
    let server = Server::start([Response::json(
        200,
        openai_reply(
            json!({ "tool_calls": [{ "id": "c", "type": "function",
                    "function": { "name": "fs_write", "arguments": "{\"path\": " } }] }),
            "tool_calls",
        ),
    )]);
    let provider = Wire::OpenAi.provider(&server, "gpt-test", fast());
    let mut req = request();
    req.tools = vec![write_tool()];

    let error = expect_err(chat(provider.as_ref(), &req).await);

    assert!(matches!(error, LlmError::Malformed { .. }), "{error:?}");
    assert!(error.to_string().contains("`fs.write`"), "{error}");
}

// --- JSON mode -----------------------------------------------------------------------------

#[tokio::test]
async fn openai_json_mode_asks_for_a_json_object() {
    let server = Server::start([Wire::OpenAi.reply(r#"{"ok": true}"#)]);
    let provider = Wire::OpenAi.provider(&server, "gpt-test", fast());
    let mut req = request();
    req.json = true;

    let reply = expect_ok(chat(provider.as_ref(), &req).await);

    assert_eq!(reply.content, r#"{"ok": true}"#);
    assert_eq!(
        server.single_request().body["response_format"],
        json!({ "type": "json_object" })
    );
}

#[tokio::test]
async fn anthropic_json_mode_is_an_instruction_in_the_system_prompt() {
    let server = Server::start([Wire::Anthropic.reply(r#"{"ok": true}"#)]);
    let provider = Wire::Anthropic.provider(&server, "claude-test", fast());
    let mut req = request();
    req.json = true;

    expect_ok(chat(provider.as_ref(), &req).await);

    let body = server.single_request().body;
    let system = body["system"].as_str().unwrap_or_default();
    assert!(system.starts_with("You are terse.\n\n"), "{system}");
    assert!(system.contains("single JSON object"), "{system}");
    assert_eq!(body.get("response_format"), None);
}

// --- Streaming -----------------------------------------------------------------------------

#[tokio::test]
async fn openai_streaming_delivers_tokens_in_order_and_assembles_tool_calls() {
    let call_delta = |index: u64, id: Option<&str>, name: Option<&str>, arguments: &str| {
        let mut function = json!({ "arguments": arguments });
        if let Some(name) = name {
            function["name"] = json!(name);
        }
        let mut call = json!({ "index": index, "type": "function", "function": function });
        if let Some(id) = id {
            call["id"] = json!(id);
        }
        openai_chunk(json!({ "tool_calls": [call] }), None)
    };
    let server = Server::start([Response::sse([
        openai_chunk(json!({ "role": "assistant", "content": "" }), None),
        openai_chunk(json!({ "content": "Hel" }), None),
        openai_chunk(json!({ "content": "lo, " }), None),
        openai_chunk(json!({ "content": "wörld ✓" }), None),
        call_delta(0, Some("call_a"), Some("fs_write"), ""),
        call_delta(0, None, None, "{\"path\": \"a.py\", "),
        call_delta(
            1,
            Some("call_b"),
            Some("fs_write"),
            "{\"path\": \"b.py\", \"content\": \"\"}",
        ),
        call_delta(0, None, None, "\"content\": \"é\"}"),
        openai_chunk(json!({}), Some("tool_calls")),
        format!(
            "data: {}",
            json!({ "choices": [], "usage": { "prompt_tokens": 40, "completion_tokens": 12 } })
        ),
        "data: [DONE]".to_string(),
    ])]);
    let provider = Wire::OpenAi.provider(&server, "gpt-test", fast());
    let mut req = request();
    req.tools = vec![write_tool()];

    let (result, tokens) = chat_streamed(provider.as_ref(), &req).await;
    let reply = expect_ok(result);

    assert_eq!(tokens, ["Hel", "lo, ", "wörld ✓"]);
    assert_eq!(reply.content, "Hello, wörld ✓");
    assert_eq!(reply.finish_reason, "tool_calls");
    assert_eq!(
        reply.usage,
        Usage {
            input_tokens: 40,
            output_tokens: 12
        }
    );
    let call = |id: &str, arguments: Json| ToolCall {
        id: id.into(),
        name: "fs.write".into(),
        arguments,
    };
    assert_eq!(
        reply.tool_calls,
        vec![
            call("call_a", json!({ "path": "a.py", "content": "é" })),
            call("call_b", json!({ "path": "b.py", "content": "" })),
        ]
    );
    let sent = server.single_request();
    assert_eq!(sent.body["stream"], json!(true));
    assert_eq!(
        sent.body["stream_options"],
        json!({ "include_usage": true })
    );
    assert_eq!(sent.header("accept"), Some("text/event-stream"));
}

#[tokio::test]
async fn anthropic_streaming_delivers_tokens_in_order_and_assembles_tool_calls() {
    let event = anthropic_event;
    let server = Server::start([Response::sse([
        event(
            json!({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ),
        event(
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        "event: ping\ndata: {\"type\": \"ping\"}".to_string(),
        event(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Writing "}}),
        ),
        event(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ça ✓"}}),
        ),
        event(json!({"type": "content_block_stop", "index": 0})),
        event(
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "fs_write", "input": {}}}),
        ),
        event(
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ),
        event(
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"path\": \"app.py\","}}),
        ),
        event(
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " \"content\": \"x\"}"}}),
        ),
        event(json!({"type": "content_block_stop", "index": 1})),
        event(
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 15}}),
        ),
        event(json!({"type": "message_stop"})),
    ])]);
    let provider = Wire::Anthropic.provider(&server, "claude-test", fast());
    let mut req = request();
    req.tools = vec![write_tool()];

    let (result, tokens) = chat_streamed(provider.as_ref(), &req).await;
    let reply = expect_ok(result);

    assert_eq!(tokens, ["Writing ", "ça ✓"]);
    assert_eq!(reply.content, "Writing ça ✓");
    assert_eq!(reply.finish_reason, "tool_use");
    assert_eq!(
        reply.usage,
        Usage {
            input_tokens: 25,
            output_tokens: 15
        }
    );
    assert_eq!(
        reply.tool_calls,
        vec![ToolCall {
            id: "toolu_9".into(),
            name: "fs.write".into(),
            arguments: json!({ "path": "app.py", "content": "x" })
        }]
    );
    let sent = server.single_request();
    assert_eq!(sent.body["stream"], json!(true));
}

// --- Faults that end in success --------------------------------------------------------------

async fn rate_limited_then_success(wire: Wire) {
    let server = Server::start([
        Response::json(429, json!({ "error": { "message": "slow down" } }))
            .with_header("Retry-After", "1"),
        wire.reply("Hi."),
    ]);
    let provider = wire.provider(&server, "m", fast());
    let started = Instant::now();

    let reply = expect_ok(chat(provider.as_ref(), &request()).await);

    assert_eq!(reply.content, "Hi.");
    assert_eq!(server.requests().len(), 2);
    // The retry waited as the server asked, not the millisecond backoff of `fast()`.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn openai_429_with_retry_after_then_success() {
    rate_limited_then_success(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_429_with_retry_after_then_success() {
    rate_limited_then_success(Wire::Anthropic).await;
}

async fn server_error_then_success(wire: Wire) {
    let server = Server::start([
        Response::json(500, json!({ "error": { "message": "internal" } })),
        Response::text(503, "upstream unavailable"),
        wire.reply("Hi."),
    ]);
    let provider = wire.provider(&server, "m", fast());

    let reply = expect_ok(chat(provider.as_ref(), &request()).await);

    assert_eq!(reply.content, "Hi.");
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.path == wire.path()));
    // A retry sends the same request again.
    assert_eq!(requests[0].body, requests[2].body);
}

#[tokio::test]
async fn openai_500_then_success() {
    server_error_then_success(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_500_then_success() {
    server_error_then_success(Wire::Anthropic).await;
}

async fn connection_reset_then_success(wire: Wire) {
    let server = Server::start([Response::HangUp, wire.reply("Hi.")]);
    let provider = wire.provider(&server, "m", fast());

    let reply = expect_ok(chat(provider.as_ref(), &request()).await);

    assert_eq!(reply.content, "Hi.");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn openai_connection_reset_then_success() {
    connection_reset_then_success(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_connection_reset_then_success() {
    connection_reset_then_success(Wire::Anthropic).await;
}

async fn truncated_stream_then_success(wire: Wire) {
    let server = Server::start([wire.cut_stream(), wire.stream(&["Hel", "lo"], None)]);
    let provider = wire.provider(&server, "m", fast());

    let (result, tokens) = chat_streamed(provider.as_ref(), &request()).await;

    assert_eq!(expect_ok(result).content, "Hello");
    assert_eq!(server.requests().len(), 2);
    // The display sees the cut-off attempt's text, then the whole reply again.
    assert_eq!(tokens.concat(), "HelHello");
}

#[tokio::test]
async fn openai_truncated_stream_is_retried() {
    truncated_stream_then_success(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_truncated_stream_is_retried() {
    truncated_stream_then_success(Wire::Anthropic).await;
}

// --- Faults that end in a clear error --------------------------------------------------------

async fn stream_always_truncated(wire: Wire) {
    let cut = wire.cut_stream();
    let server = Server::start([cut.clone(), cut.clone(), cut]);
    let provider = wire.provider(&server, "m", fast());

    let (result, _) = chat_streamed(provider.as_ref(), &request()).await;
    let error = expect_err(result);

    assert!(matches!(error, LlmError::Malformed { .. }), "{error:?}");
    assert!(error.to_string().contains("truncated stream"), "{error}");
    assert!(error.to_string().contains("3 attempts"), "{error}");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn openai_stream_truncated_every_time_is_an_error() {
    stream_always_truncated(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_stream_truncated_every_time_is_an_error() {
    stream_always_truncated(Wire::Anthropic).await;
}

async fn slow_response_times_out(wire: Wire) {
    let slow = Response::slow(Duration::from_secs(3), wire.reply("too late"));
    let server = Server::start([slow.clone(), slow]);
    let http = HttpOptions {
        timeout: Duration::from_millis(200),
        retry: RetryPolicy {
            max_attempts: 2,
            ..fast().retry
        },
    };
    let provider = wire.provider(&server, "m", http);
    let started = Instant::now();

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert_eq!(
        error,
        LlmError::Timeout {
            endpoint: wire.base_url(&server),
            seconds: 1,
            attempts: 2
        }
    );
    assert_eq!(server.requests().len(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn openai_slow_response_past_the_timeout() {
    slow_response_times_out(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_slow_response_past_the_timeout() {
    slow_response_times_out(Wire::Anthropic).await;
}

#[tokio::test]
async fn a_stream_that_stalls_past_the_timeout_is_retried() {
    let wire = Wire::OpenAi;
    let stalled = wire
        .stream(&["Hel", "lo"], None)
        .stalling_after(1, Duration::from_secs(3));
    let server = Server::start([stalled, wire.stream(&["Hel", "lo"], None)]);
    let http = HttpOptions {
        timeout: Duration::from_millis(300),
        ..fast()
    };
    let provider = wire.provider(&server, "m", http);

    let (result, _) = chat_streamed(provider.as_ref(), &request()).await;

    assert_eq!(expect_ok(result).content, "Hello");
    assert_eq!(server.requests().len(), 2);
}

async fn malformed_body(wire: Wire) {
    let server = Server::start([Response::Full {
        status: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: b"{\"choices\": [{\"message\": ".to_vec(),
    }]);
    let provider = wire.provider(&server, "m", fast());

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert!(matches!(error, LlmError::Malformed { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&wire.base_url(&server)),
        "{error}"
    );
    // A garbled reply would come back garbled: not retried.
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn openai_malformed_json_body() {
    malformed_body(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_malformed_json_body() {
    malformed_body(Wire::Anthropic).await;
}

async fn key_rejected(wire: Wire) {
    // Servers quote (part of) a rejected key; none of it may reach the user's screen.
    let server = Server::start([Response::json(
        401,
        json!({ "error": { "message": format!("Incorrect API key provided: {KEY}") } }),
    )]);
    let provider = wire.provider(&server, "m", fast());

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert_eq!(
        error,
        LlmError::Auth {
            endpoint: wire.base_url(&server),
            status: 401,
            key_env: KEY_ENV.into()
        }
    );
    assert!(error.to_string().contains(KEY_ENV), "{error}");
    for shown in [error.to_string(), format!("{error:?}")] {
        assert!(!shown.contains(KEY), "{shown}");
    }
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn openai_401_names_the_key_variable_not_the_key() {
    key_rejected(Wire::OpenAi).await;
}

#[tokio::test]
async fn anthropic_401_names_the_key_variable_not_the_key() {
    key_rejected(Wire::Anthropic).await;
}

#[tokio::test]
async fn providers_do_not_print_their_key() {
    let openai =
        OpenAi::new("http://127.0.0.1:1/v1", "m").with_key(Some(ApiKey::new(KEY)), KEY_ENV);
    let anthropic =
        Anthropic::new("http://127.0.0.1:1", "m").with_key(Some(ApiKey::new(KEY)), KEY_ENV);
    assert!(!format!("{openai:?}").contains(KEY));
    assert!(!format!("{anthropic:?}").contains(KEY));
}

async fn unknown_model(wire: Wire, body: Json) {
    let server = Server::start([Response::json(404, body)]);
    let provider = wire.provider(&server, "no-such-model", fast());

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert_eq!(
        error.to_string(),
        format!(
            "model `no-such-model` not found at {}",
            wire.base_url(&server)
        )
    );
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn openai_404_is_an_unknown_model() {
    let body = json!({ "error": { "message": "The model `no-such-model` does not exist", "code": "model_not_found" } });
    unknown_model(Wire::OpenAi, body).await;
}

#[tokio::test]
async fn anthropic_404_is_an_unknown_model() {
    let body = json!({ "type": "error", "error": { "type": "not_found_error", "message": "model: no-such-model" } });
    unknown_model(Wire::Anthropic, body).await;
}

#[tokio::test]
async fn a_400_naming_a_missing_model_is_an_unknown_model() {
    let server = Server::start([Response::json(
        400,
        json!({ "error": "model 'qwen9' not found, try pulling it first" }),
    )]);
    let provider = Wire::OpenAi.provider(&server, "qwen9", fast());

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert!(matches!(error, LlmError::ModelNotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn a_400_is_reported_at_once_without_the_key() {
    let server = Server::start([Response::json(
        400,
        json!({ "error": { "message": format!("'tools' is invalid (key {KEY})") } }),
    )]);
    let provider = Wire::OpenAi.provider(&server, "m", fast());

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert!(matches!(error, LlmError::BadRequest { .. }), "{error:?}");
    assert!(error.to_string().contains("'tools' is invalid"), "{error}");
    assert!(!error.to_string().contains(KEY), "{error}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn rate_limits_that_persist_end_in_an_error() {
    let limited = Response::json(429, json!({ "error": { "message": "slow down" } }));
    let server = Server::start([limited.clone(), limited.clone(), limited]);
    let provider = Wire::OpenAi.provider(&server, "m", fast());

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert!(
        matches!(error, LlmError::RateLimited { attempts: 3, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_exhausted_quota_is_not_retried() {
    let server = Server::start([Response::json(
        429,
        json!({ "error": { "message": "You exceeded your current quota", "code": "insufficient_quota" } }),
    )]);
    let provider = Wire::OpenAi.provider(&server, "m", fast());

    let error = expect_err(chat(provider.as_ref(), &request()).await);

    assert!(
        matches!(error, LlmError::Server { status: 429, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("current quota"), "{error}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_after_the_attempts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let provider = OpenAi::new(format!("http://127.0.0.1:{port}/v1"), "m").with_http(fast());

    let error = expect_err(chat(&provider, &request()).await);

    assert!(
        matches!(error, LlmError::Connect { attempts: 3, .. }),
        "{error:?}"
    );
}

// --- Scripted replies --------------------------------------------------------------------------

const REPLIES: &str = r#"replies:
  - agent: architect
    task: design
    turn: 1
    content: '{"files": ["app.py"]}'
    usage: { input_tokens: 120, output_tokens: 30 }
  - agent: coder
    tool_calls:
      - { name: fs.write, arguments: { path: app.py, content: "print('hi')\n" } }
      - { name: fs.list }
  - agent: coder
    content: Done.
"#;

fn scripted(text: &str) -> Scripted {
    match Scripted::parse(text, Path::new("replies.yaml")) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn turn(agent: &str, task: &str, turn: u32) -> ChatRequest {
    ChatRequest {
        agent: agent.into(),
        task: task.into(),
        turn,
        messages: vec![Message::user("go")],
        ..ChatRequest::default()
    }
}

#[tokio::test]
async fn scripted_replies_match_agent_task_and_turn() {
    let provider = scripted(REPLIES);

    let design = expect_ok(chat(&provider, &turn("architect", "design", 1)).await);
    let first = expect_ok(chat(&provider, &turn("coder", "implement", 1)).await);
    let second = expect_ok(chat(&provider, &turn("coder", "implement", 2)).await);

    assert_eq!(provider.name(), "scripted");
    assert_eq!(design.content, r#"{"files": ["app.py"]}"#);
    assert_eq!(
        design.usage,
        Usage {
            input_tokens: 120,
            output_tokens: 30
        }
    );
    assert_eq!(design.finish_reason, "stop");
    assert_eq!(
        first.tool_calls,
        vec![
            ToolCall {
                id: "call_1".into(),
                name: "fs.write".into(),
                arguments: json!({ "path": "app.py", "content": "print('hi')\n" })
            },
            ToolCall {
                id: "call_2".into(),
                name: "fs.list".into(),
                arguments: json!({})
            },
        ]
    );
    assert_eq!(first.finish_reason, "tool_calls");
    assert_eq!(second.content, "Done.");
    assert!(
        second.usage.total() > 0,
        "an estimate when the file gives none"
    );
}

#[tokio::test]
async fn scripted_without_a_matching_reply_is_a_clear_error() {
    let provider = scripted(REPLIES);
    expect_ok(chat(&provider, &turn("coder", "implement", 1)).await);
    expect_ok(chat(&provider, &turn("coder", "implement", 2)).await);

    let error = expect_err(chat(&provider, &turn("coder", "implement", 3)).await);
    let other = expect_err(chat(&provider, &turn("architect", "design", 2)).await);

    assert_eq!(
        error,
        LlmError::Scripted(
            "scripted replies file replies.yaml has no reply for agent `coder`, task `implement`, turn 3"
                .into()
        )
    );
    assert!(
        other
            .to_string()
            .contains("agent `architect`, task `design`, turn 2"),
        "{other}"
    );
}

#[tokio::test]
async fn scripted_turn_matchers_answer_their_turn() {
    let provider = scripted(
        "replies:\n  - { agent: a, turn: 2, content: second }\n  - { agent: a, content: any }\n",
    );

    let first = expect_ok(chat(&provider, &turn("a", "t", 1)).await);
    let second = expect_ok(chat(&provider, &turn("a", "t", 2)).await);

    assert_eq!(first.content, "any");
    assert_eq!(second.content, "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripted_conversations_run_at_once_without_mixing() {
    let provider = Arc::new(scripted(
        "replies:\n  - { agent: coder, turn: 1, content: first }\n  - { agent: coder, turn: 2, content: second }\n",
    ));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let provider = provider.clone();
            tokio::spawn(async move {
                let task = format!("item[{i}]");
                let one = provider.chat(&turn("coder", &task, 1), None).await;
                let two = provider.chat(&turn("coder", &task, 2), None).await;
                (one.map(|r| r.content), two.map(|r| r.content))
            })
        })
        .collect();
    for task in tasks {
        let (one, two) = bounded(task).await.expect("the task ran");
        assert_eq!(one.as_deref(), Ok("first"));
        assert_eq!(two.as_deref(), Ok("second"));
    }
}

#[tokio::test]
async fn scripted_replies_stream_their_words() {
    let provider = scripted("replies:\n  - content: one two three\n");
    let (result, tokens) = chat_streamed(&provider, &turn("a", "t", 1)).await;
    assert_eq!(expect_ok(result).content, "one two three");
    assert_eq!(tokens, ["one ", "two ", "three"]);
}

#[test]
fn scripted_yaml_errors_name_file_line_and_column() {
    let error = Scripted::parse(
        "replies:\n  - agent: coder\n    contnt: Done.\n",
        Path::new("replies.yaml"),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        error.starts_with("scripted replies file replies.yaml:3:5: "),
        "{error}"
    );
    assert!(error.contains("contnt"), "{error}");

    let error = Scripted::parse("replies:\n  - turn: 0\n", Path::new("r.yaml"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.starts_with("scripted replies file r.yaml:2:"),
        "{error}"
    );
}

#[test]
fn a_missing_replies_file_is_named() {
    let error = Scripted::load(Path::new("/nonexistent/replies.yaml"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.starts_with("cannot read scripted replies file /nonexistent/replies.yaml"),
        "{error}"
    );
}

// --- Building providers from `models:` ---------------------------------------------------------

fn decl(provider: &str, model: Option<&str>, settings: Json) -> ModelDecl {
    let mut settings = settings;
    settings["provider"] = json!(provider);
    ModelDecl {
        provider: provider.into(),
        model: model.map(str::to_string),
        settings,
    }
}

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }
}

fn build_err(result: Result<Arc<dyn Provider>, LlmError>) -> LlmError {
    match result {
        Ok(p) => panic!("expected an error, built {}", p.name()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn built_openai_model_uses_its_settings_and_key_variable() {
    let server = Server::start([Wire::OpenAi.reply("Hi.")]);
    let model = decl(
        "openai",
        Some("gpt-test"),
        json!({
            "base_url": format!("{}/v1/", server.url()),
            "api_key_env": "TEAM_KEY",
            "temperature": 0.3,
            "max_tokens": 50,
            "timeout": "2s"
        }),
    );
    let provider = provider_with_env(&model, Path::new("."), &env_of(&[("TEAM_KEY", KEY)]))
        .map_err(|e| e.to_string())
        .expect("a provider");

    expect_ok(chat(provider.as_ref(), &request()).await);

    let sent = server.single_request();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(sent.body["model"], "gpt-test");
    assert_eq!(sent.body["temperature"], json!(0.3));
    assert_eq!(sent.body["max_tokens"], json!(50));
}

#[tokio::test]
async fn built_ollama_model_sends_no_key() {
    let server = Server::start([Wire::OpenAi.reply("Hi.")]);
    let model = decl(
        "ollama",
        Some("qwen2.5-coder"),
        json!({ "base_url": format!("{}/v1", server.url()) }),
    );
    let provider = provider_with_env(&model, Path::new("."), &env_of(&[("OPENAI_API_KEY", KEY)]))
        .map_err(|e| e.to_string())
        .expect("a provider");

    expect_ok(chat(provider.as_ref(), &request()).await);

    assert_eq!(provider.name(), "ollama");
    assert_eq!(server.single_request().header("authorization"), None);
}

#[tokio::test]
async fn built_anthropic_model_reads_its_key() {
    let server = Server::start([Wire::Anthropic.reply("Hi.")]);
    let model = decl(
        "anthropic",
        Some("claude-test"),
        json!({ "base_url": server.url() }),
    );
    let provider = provider_with_env(
        &model,
        Path::new("."),
        &env_of(&[("ANTHROPIC_API_KEY", KEY)]),
    )
    .map_err(|e| e.to_string())
    .expect("a provider");

    expect_ok(chat(provider.as_ref(), &request()).await);

    assert_eq!(server.single_request().header("x-api-key"), Some(KEY));
}

#[test]
fn building_a_hosted_model_without_its_key_names_the_variable() {
    let none = env_of(&[]);
    let openai = build_err(provider_with_env(
        &decl("openai", Some("gpt-4o-mini"), json!({})),
        Path::new("."),
        &none,
    ));
    let custom = build_err(provider_with_env(
        &decl(
            "openai",
            Some("gpt-4o-mini"),
            json!({ "api_key_env": "TEAM_KEY" }),
        ),
        Path::new("."),
        &none,
    ));
    let anthropic = build_err(provider_with_env(
        &decl("anthropic", Some("claude"), json!({})),
        Path::new("."),
        &none,
    ));
    assert_eq!(openai, LlmError::MissingKey("OPENAI_API_KEY".into()));
    assert_eq!(custom, LlmError::MissingKey("TEAM_KEY".into()));
    assert_eq!(anthropic, LlmError::MissingKey("ANTHROPIC_API_KEY".into()));
}

#[tokio::test]
async fn built_scripted_model_reads_its_file_beside_the_workflow() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("replies.yaml"), REPLIES).expect("write replies");
    let model = decl("scripted", None, json!({ "file": "replies.yaml" }));

    let provider = provider(&model, dir.path())
        .map_err(|e| e.to_string())
        .expect("a provider");
    let reply = expect_ok(chat(provider.as_ref(), &turn("coder", "implement", 2)).await);

    assert_eq!(provider.name(), "scripted");
    assert!(!reply.tool_calls.is_empty());
}

#[test]
fn replay_of_a_missing_cassette_names_the_file() {
    let error = build_err(provider(
        &decl("replay", None, json!({ "file": "no-such.cassette" })),
        Path::new("."),
    ));
    assert!(error.to_string().contains("no-such.cassette"), "{error}");
}
