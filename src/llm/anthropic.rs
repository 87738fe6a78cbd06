//! Anthropic's Messages API: content blocks instead of tool-call fields, the system prompt
//! beside the messages, and a stream of typed events.

use std::collections::BTreeMap;

use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::http::{self, ApiKey, HttpOptions, OnToken, Post, ReadError, Reply, ToolNames};
use super::{
    BoxFuture, ChatRequest, ChatResponse, LlmError, Message, Provider, Role, ToolCall, Usage,
};

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
pub const KEY_ENV: &str = "ANTHROPIC_API_KEY";
/// Overrides the default base URL, as in Anthropic's own SDKs.
pub const BASE_URL_ENV: &str = "ANTHROPIC_BASE_URL";
pub const API_VERSION: &str = "2023-06-01";
/// The API requires a limit on every request; this one is used when nothing sets it.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The Messages API has no JSON mode, so the system prompt asks for it.
const JSON_INSTRUCTION: &str = "Reply with a single JSON object and nothing else: \
    no prose before or after it, no code fences.";

/// A model behind the Anthropic Messages API (or a server that speaks it).
#[derive(Debug, Clone)]
pub struct Anthropic {
    /// Without the `/v1` the API's paths start with.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    /// Named in `Auth` errors, so the user knows which key to check.
    pub key_env: String,
    /// Used when a request names no model.
    pub model: String,
    /// Defaults for requests that do not set their own.
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub http: HttpOptions,
}

impl Anthropic {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Anthropic {
        Anthropic {
            base_url: http::trim_base_url(&base_url.into()),
            api_key: None,
            key_env: KEY_ENV.to_string(),
            model: model.into(),
            temperature: None,
            max_tokens: None,
            http: HttpOptions::default(),
        }
    }

    /// Sends `key` and names `key_env` when the server rejects it.
    pub fn with_key(mut self, key: Option<ApiKey>, key_env: impl Into<String>) -> Anthropic {
        self.api_key = key;
        self.key_env = key_env.into();
        self
    }

    pub fn with_http(mut self, http: HttpOptions) -> Anthropic {
        self.http = http;
        self
    }

    async fn call(
        &self,
        request: &ChatRequest,
        on_token: Option<&OnToken<'_>>,
    ) -> Result<ChatResponse, LlmError> {
        let names = ToolNames::new(&request.tools);
        let model = http::model_for(request, &self.model);
        let body = self.body(request, model, &names, on_token.is_some());
        let mut headers = http::json_headers(on_token.is_some());
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(API_VERSION),
        );
        if let Some(key) = &self.api_key {
            headers.insert(
                HeaderName::from_static("x-api-key"),
                key.header("", &self.key_env)?,
            );
        }
        let post = Post {
            base_url: &self.base_url,
            url: format!("{}/v1/messages", self.base_url),
            headers,
            body: body.to_string().into_bytes(),
            stream: on_token.is_some(),
            model,
            key_env: &self.key_env,
            key: self.api_key.as_ref(),
        };
        let names = &names;
        match on_token {
            None => {
                http::send_with_retry(&self.http, &post, |reply| async move {
                    parse_message(reply.json().await?, names)
                })
                .await
            }
            Some(on_token) => {
                http::send_with_retry(&self.http, &post, |reply| {
                    read_stream(reply, names, on_token)
                })
                .await
            }
        }
    }

    fn body(&self, request: &ChatRequest, model: &str, names: &ToolNames, stream: bool) -> Json {
        let mut system = request.system.clone();
        let mut turns = Turns::default();
        for message in &request.messages {
            match message.role {
                // The API has one system prompt, beside the messages.
                Role::System => append_paragraph(&mut system, &message.content),
                Role::User => turns.push("user", text_block(&message.content)),
                Role::Assistant => assistant_blocks(message, names, &mut turns),
                Role::Tool => turns.push(
                    "user",
                    Some(json!({
                        "type": "tool_result",
                        "tool_use_id": message.tool_call_id.as_deref().unwrap_or_default(),
                        "content": message.content,
                    })),
                ),
            }
        }
        if request.json {
            append_paragraph(&mut system, JSON_INSTRUCTION);
        }
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        body.insert(
            "max_tokens".into(),
            json!(request
                .max_tokens
                .or(self.max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS)),
        );
        if !system.is_empty() {
            body.insert("system".into(), json!(system));
        }
        body.insert("messages".into(), turns.into_json());
        if !request.tools.is_empty() {
            let tools = request
                .tools
                .iter()
                .map(|tool| {
                    json!({
                        "name": names.wire(&tool.name),
                        "description": tool.description,
                        "input_schema": tool.parameters,
                    })
                })
                .collect();
            body.insert("tools".into(), Json::Array(tools));
        }
        if let Some(t) = request.temperature.or(self.temperature) {
            body.insert("temperature".into(), json!(t));
        }
        if stream {
            body.insert("stream".into(), json!(true));
        }
        Json::Object(body)
    }
}

impl Provider for Anthropic {
    fn name(&self) -> &str {
        "anthropic"
    }

    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(self.call(request, on_token))
    }
}

fn append_paragraph(text: &mut String, paragraph: &str) {
    if paragraph.is_empty() {
        return;
    }
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(paragraph);
}

/// The API rejects empty text blocks.
fn text_block(text: &str) -> Option<Json> {
    (!text.is_empty()).then(|| json!({ "type": "text", "text": text }))
}

fn assistant_blocks(message: &Message, names: &ToolNames, turns: &mut Turns) {
    turns.push("assistant", text_block(&message.content));
    for call in &message.tool_calls {
        // `input` must be an object; a call recorded without arguments has none.
        let input = if call.arguments.is_object() {
            call.arguments.clone()
        } else {
            json!({})
        };
        turns.push(
            "assistant",
            Some(json!({
                "type": "tool_use",
                "id": call.id,
                "name": names.wire(&call.name),
                "input": input,
            })),
        );
    }
}

/// Messages as the API wants them: roles alternate, so consecutive messages of one role
/// (the results of several tool calls, say, then the user's next words) become one message
/// with several content blocks.
#[derive(Default)]
struct Turns(Vec<(&'static str, Vec<Json>)>);

impl Turns {
    fn push(&mut self, role: &'static str, block: Option<Json>) {
        match self.0.last_mut() {
            Some((last, blocks)) if *last == role => blocks.extend(block),
            _ => self.0.push((role, block.into_iter().collect())),
        }
    }

    fn into_json(self) -> Json {
        self.0
            .into_iter()
            .filter(|(_, blocks)| !blocks.is_empty())
            .map(|(role, blocks)| json!({ "role": role, "content": blocks }))
            .collect()
    }
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
    error: Option<Json>,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Block {
    #[serde(rename = "text")]
    Text { text: String },
    #[serde(rename = "tool_use")]
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Json,
    },
    /// Thinking and other blocks carry nothing the agent loop uses.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Cached prompt tokens are counted apart by the API but are input all the same.
    fn input(&self) -> Option<u64> {
        let parts = [
            self.input_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ];
        parts
            .iter()
            .any(Option::is_some)
            .then(|| parts.iter().flatten().sum())
    }
}

fn parse_message(reply: WireMessage, names: &ToolNames) -> Result<ChatResponse, ReadError> {
    if let Some(error) = reply.error {
        return Err(stream_error(&error));
    }
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    for block in reply.content {
        match block {
            Block::Text { text } => content.push_str(&text),
            Block::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                name: names.neutral(&name),
                arguments: if input.is_null() { json!({}) } else { input },
            }),
            Block::Other => {}
        }
    }
    let usage = reply.usage.unwrap_or_default();
    Ok(ChatResponse {
        content,
        tool_calls,
        usage: Usage {
            input_tokens: usage.input().unwrap_or(0),
            output_tokens: usage.output_tokens.unwrap_or(0),
        },
        finish_reason: reply.stop_reason.unwrap_or_default(),
    })
}

/// An `error` event, with the HTTP status its type stands for when it is worth a retry.
fn stream_error(error: &Json) -> ReadError {
    let message = error["message"]
        .as_str()
        .unwrap_or("no message")
        .to_string();
    let status = match error["type"].as_str() {
        Some("overloaded_error") => 529,
        Some("api_error") => 500,
        Some("rate_limit_error") => 429,
        _ => return ReadError::Malformed(format!("the server reported an error: {message}")),
    };
    ReadError::Server { status, message }
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Event {
    #[serde(rename = "message_start")]
    MessageStart { message: StartMessage },
    #[serde(rename = "content_block_start")]
    BlockStart { index: u64, content_block: Json },
    #[serde(rename = "content_block_delta")]
    BlockDelta { index: u64, delta: Json },
    #[serde(rename = "message_delta")]
    MessageDelta {
        #[serde(default)]
        delta: Json,
        usage: Option<WireUsage>,
    },
    #[serde(rename = "message_stop")]
    MessageStop,
    #[serde(rename = "error")]
    Error { error: Json },
    /// `ping`, `content_block_stop` and event types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartMessage {
    usage: Option<WireUsage>,
}

/// A content block whose pieces are still arriving.
enum PartialBlock {
    Text,
    Tool {
        id: String,
        name: String,
        /// The input given whole at the start, used when no `input_json_delta` follows.
        start_input: Json,
        json: String,
    },
    Other,
}

async fn read_stream(
    reply: Reply,
    names: &ToolNames,
    on_token: &OnToken<'_>,
) -> Result<ChatResponse, ReadError> {
    let mut events = reply.events();
    let mut content = String::new();
    let mut blocks: BTreeMap<u64, PartialBlock> = BTreeMap::new();
    let mut usage = Usage::default();
    let mut stop_reason = String::new();
    let mut stopped = false;
    let emit = |text: &str, content: &mut String| {
        if !text.is_empty() {
            on_token(text);
            content.push_str(text);
        }
    };
    while let Some(event) = events.next().await? {
        if event.data.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&event.data).map_err(|e| {
            ReadError::Malformed(format!("a stream event is not the expected JSON ({e})"))
        })?;
        match event {
            Event::MessageStart { message } => {
                let start = message.usage.unwrap_or_default();
                usage.input_tokens = start.input().unwrap_or(0);
                usage.output_tokens = start.output_tokens.unwrap_or(0);
            }
            Event::BlockStart {
                index,
                content_block,
            } => {
                let block = match content_block["type"].as_str() {
                    Some("text") => {
                        emit(
                            content_block["text"].as_str().unwrap_or_default(),
                            &mut content,
                        );
                        PartialBlock::Text
                    }
                    Some("tool_use") => PartialBlock::Tool {
                        id: content_block["id"].as_str().unwrap_or_default().to_string(),
                        name: content_block["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        start_input: content_block["input"].clone(),
                        json: String::new(),
                    },
                    _ => PartialBlock::Other,
                };
                blocks.insert(index, block);
            }
            Event::BlockDelta { index, delta } => {
                match (blocks.get_mut(&index), delta["type"].as_str()) {
                    (Some(PartialBlock::Text), Some("text_delta")) => {
                        emit(delta["text"].as_str().unwrap_or_default(), &mut content);
                    }
                    (Some(PartialBlock::Tool { json, .. }), Some("input_json_delta")) => {
                        json.push_str(delta["partial_json"].as_str().unwrap_or_default());
                    }
                    (None, _) => {
                        return Err(ReadError::Malformed(format!(
                            "a delta for content block {index}, which never started"
                        )));
                    }
                    _ => {}
                }
            }
            Event::MessageDelta { delta, usage: end } => {
                if let Some(reason) = delta["stop_reason"].as_str() {
                    stop_reason = reason.to_string();
                }
                if let Some(end) = end {
                    // Counts here are cumulative, so they replace the opening ones.
                    if let Some(input) = end.input() {
                        usage.input_tokens = input;
                    }
                    if let Some(output) = end.output_tokens {
                        usage.output_tokens = output;
                    }
                }
            }
            Event::MessageStop => {
                stopped = true;
                break;
            }
            Event::Error { error } => return Err(stream_error(&error)),
            Event::Other => {}
        }
    }
    if !stopped {
        return Err(ReadError::Truncated(
            "the stream ended before `message_stop`".into(),
        ));
    }
    let mut tool_calls = Vec::new();
    for block in blocks.into_values() {
        let PartialBlock::Tool {
            id,
            name,
            start_input,
            json,
        } = block
        else {
            continue;
        };
        let name = names.neutral(&name);
        let arguments = if json.trim().is_empty() && start_input.is_object() {
            start_input
        } else {
            http::tool_arguments(&json, &name)?
        };
        tool_calls.push(ToolCall {
            id,
            name,
            arguments,
        });
    }
    Ok(ChatResponse {
        content,
        tool_calls,
        usage,
        finish_reason: stop_reason,
    })
}
