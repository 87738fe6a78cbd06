//! OpenAI's Chat Completions wire format, which most servers speak too: OpenAI itself,
//! Ollama, vLLM, llama.cpp's server, LM Studio, OpenRouter.

use std::collections::BTreeMap;

use reqwest::header::AUTHORIZATION;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::http::{self, ApiKey, HttpOptions, OnToken, Post, ReadError, Reply, ToolNames};
use super::{
    BoxFuture, ChatRequest, ChatResponse, LlmError, Message, Provider, Role, ToolCall, Usage,
};

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
pub const OLLAMA_BASE_URL: &str = "http://127.0.0.1:11434/v1";
/// Where the key comes from unless a model names another variable.
pub const KEY_ENV: &str = "OPENAI_API_KEY";
/// Overrides the default base URL, as in OpenAI's own SDKs.
pub const BASE_URL_ENV: &str = "OPENAI_BASE_URL";

/// A model behind an OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct OpenAi {
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
    /// `openai` or `ollama`: the same wire format under the name the user chose.
    name: &'static str,
}

impl OpenAi {
    /// A model at an OpenAI-compatible `base_url` (up to and including `/v1`), no key yet.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> OpenAi {
        OpenAi {
            base_url: http::trim_base_url(&base_url.into()),
            api_key: None,
            key_env: KEY_ENV.to_string(),
            model: model.into(),
            temperature: None,
            max_tokens: None,
            http: HttpOptions::default(),
            name: "openai",
        }
    }

    /// A local Ollama model: the same wire format, no key needed.
    pub fn ollama(base_url: impl Into<String>, model: impl Into<String>) -> OpenAi {
        OpenAi {
            name: "ollama",
            ..OpenAi::new(base_url, model)
        }
    }

    /// Sends `key` and names `key_env` when the server rejects it.
    pub fn with_key(mut self, key: Option<ApiKey>, key_env: impl Into<String>) -> OpenAi {
        self.api_key = key;
        self.key_env = key_env.into();
        self
    }

    pub fn with_http(mut self, http: HttpOptions) -> OpenAi {
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
        if let Some(key) = &self.api_key {
            headers.insert(AUTHORIZATION, key.header("Bearer ", &self.key_env)?);
        }
        let post = Post {
            base_url: &self.base_url,
            url: format!("{}/chat/completions", self.base_url),
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
                    parse_completion(reply.json().await?, names)
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
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        if !request.system.is_empty() {
            messages.push(json!({ "role": "system", "content": request.system }));
        }
        messages.extend(request.messages.iter().map(|m| wire_message(m, names)));
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        body.insert("messages".into(), Json::Array(messages));
        if !request.tools.is_empty() {
            let tools = request
                .tools
                .iter()
                .map(|tool| {
                    json!({
                        "type": "function",
                        "function": {
                            "name": names.wire(&tool.name),
                            "description": tool.description,
                            "parameters": tool.parameters,
                        }
                    })
                })
                .collect();
            body.insert("tools".into(), Json::Array(tools));
        }
        if request.json {
            body.insert("response_format".into(), json!({ "type": "json_object" }));
        }
        if let Some(t) = request.temperature.or(self.temperature) {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(n) = request.max_tokens.or(self.max_tokens) {
            body.insert("max_tokens".into(), json!(n));
        }
        if stream {
            body.insert("stream".into(), json!(true));
            // Without this a stream carries no token counts at all.
            body.insert("stream_options".into(), json!({ "include_usage": true }));
        }
        Json::Object(body)
    }
}

impl Provider for OpenAi {
    fn name(&self) -> &str {
        self.name
    }

    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(self.call(request, on_token))
    }
}

fn wire_message(message: &Message, names: &ToolNames) -> Json {
    match message.role {
        Role::System => json!({ "role": "system", "content": message.content }),
        Role::User => json!({ "role": "user", "content": message.content }),
        Role::Assistant => {
            let mut wire = Map::new();
            wire.insert("role".into(), json!("assistant"));
            // An assistant turn that only calls tools has no content, which the API wants
            // as null rather than "".
            let content = if message.content.is_empty() && !message.tool_calls.is_empty() {
                Json::Null
            } else {
                json!(message.content)
            };
            wire.insert("content".into(), content);
            if !message.tool_calls.is_empty() {
                let calls = message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        json!({
                            "id": call.id,
                            "type": "function",
                            "function": {
                                "name": names.wire(&call.name),
                                // The wire format wants the arguments as a JSON string.
                                "arguments": call.arguments.to_string(),
                            }
                        })
                    })
                    .collect();
                wire.insert("tool_calls".into(), Json::Array(calls));
            }
            Json::Object(wire)
        }
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": message.tool_call_id.as_deref().unwrap_or_default(),
            "content": message.content,
        }),
    }
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
    error: Option<Json>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: Option<String>,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    /// A JSON string per the spec; some compatible servers send the object itself.
    #[serde(default)]
    arguments: Json,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Usage {
        Usage {
            input_tokens: u.prompt_tokens.unwrap_or(0),
            output_tokens: u.completion_tokens.unwrap_or(0),
        }
    }
}

fn parse_completion(completion: Completion, names: &ToolNames) -> Result<ChatResponse, ReadError> {
    if let Some(error) = completion.error {
        return Err(embedded_error(&error));
    }
    let Some(choice) = completion.choices.into_iter().next() else {
        return Err(ReadError::Malformed("the reply has no choices".into()));
    };
    let tool_calls = choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, call)| {
            let name = names.neutral(&call.function.name);
            Ok(ToolCall {
                id: call.id.unwrap_or_else(|| generated_id(i)),
                arguments: decode_arguments(&call.function.arguments, &name)?,
                name,
            })
        })
        .collect::<Result<_, ReadError>>()?;
    Ok(ChatResponse {
        content: choice.message.content.unwrap_or_default(),
        tool_calls,
        usage: completion.usage.unwrap_or_default().into(),
        finish_reason: choice.finish_reason.unwrap_or_default(),
    })
}

/// Local servers do not always give tool calls ids; the agent loop needs one per call.
fn generated_id(index: usize) -> String {
    format!("call_{}", index + 1)
}

fn decode_arguments(arguments: &Json, tool: &str) -> Result<Json, ReadError> {
    match arguments {
        Json::String(text) => http::tool_arguments(text, tool),
        Json::Null => Ok(json!({})),
        other => Ok(other.clone()),
    }
}

/// Some servers (OpenRouter, proxies) report failures inside a 200 reply. A code that is an
/// HTTP status worth retrying is treated as one.
fn embedded_error(error: &Json) -> ReadError {
    let message = error["message"]
        .as_str()
        .or_else(|| error.as_str())
        .unwrap_or("no message")
        .to_string();
    match error["code"].as_u64() {
        Some(status @ (429 | 500..=599)) => ReadError::Server {
            status: status as u16,
            message,
        },
        _ => ReadError::Malformed(format!("the server reported an error: {message}")),
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<WireUsage>,
    error: Option<Json>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<DeltaCall>>,
}

#[derive(Deserialize)]
struct DeltaCall {
    index: Option<u64>,
    id: Option<String>,
    function: Option<DeltaFunction>,
}

#[derive(Deserialize)]
struct DeltaFunction {
    name: Option<String>,
    arguments: Option<Json>,
}

/// A tool call whose pieces are still arriving.
#[derive(Default)]
struct PartialCall {
    id: Option<String>,
    name: String,
    arguments: String,
}

async fn read_stream(
    reply: Reply,
    names: &ToolNames,
    on_token: &OnToken<'_>,
) -> Result<ChatResponse, ReadError> {
    let mut events = reply.events();
    let mut content = String::new();
    let mut calls: BTreeMap<u64, PartialCall> = BTreeMap::new();
    let mut usage = Usage::default();
    let mut finish_reason = None;
    let mut done = false;
    while let Some(event) = events.next().await? {
        let data = event.data.trim();
        if data == "[DONE]" {
            done = true;
            break;
        }
        if data.is_empty() {
            continue;
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            ReadError::Malformed(format!("a stream chunk is not the expected JSON ({e})"))
        })?;
        if let Some(error) = chunk.error {
            return Err(embedded_error(&error));
        }
        if let Some(u) = chunk.usage {
            usage = u.into();
        }
        for choice in chunk.choices {
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                on_token(&text);
                content.push_str(&text);
            }
            for (position, delta) in choice
                .delta
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                // Deltas name their call by index; servers that send each call whole may not.
                let call = calls
                    .entry(delta.index.unwrap_or(position as u64))
                    .or_default();
                if let Some(id) = delta.id.filter(|id| !id.is_empty()) {
                    call.id = Some(id);
                }
                if let Some(function) = delta.function {
                    // The name comes once; some servers repeat it, so it is set, not appended.
                    if let Some(name) = function.name.filter(|n| !n.is_empty()) {
                        call.name = name;
                    }
                    match function.arguments {
                        Some(Json::String(piece)) => call.arguments.push_str(&piece),
                        Some(Json::Null) | None => {}
                        Some(whole) => call.arguments = whole.to_string(),
                    }
                }
            }
            if let Some(reason) = choice.finish_reason {
                finish_reason = Some(reason);
            }
        }
    }
    // `[DONE]` ends a stream; a finish_reason is accepted too, for servers that omit it.
    if !done && finish_reason.is_none() {
        return Err(ReadError::Truncated(
            "the stream ended before `[DONE]`".into(),
        ));
    }
    let tool_calls = calls
        .into_values()
        .enumerate()
        .map(|(i, call)| {
            let name = names.neutral(&call.name);
            Ok(ToolCall {
                id: call.id.unwrap_or_else(|| generated_id(i)),
                arguments: decode_arguments(&Json::String(call.arguments), &name)?,
                name,
            })
        })
        .collect::<Result<_, ReadError>>()?;
    Ok(ChatResponse {
        content,
        tool_calls,
        usage,
        finish_reason: finish_reason.unwrap_or_default(),
    })
}
