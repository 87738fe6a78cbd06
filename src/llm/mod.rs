//! LLM providers: one wire format per file behind the `Provider` trait the agent loop calls.
//!
//! Requests and replies are provider-neutral here; `openai` and `anthropic` translate them to
//! their wire formats, `scripted` plays replies from a file for demos and tests.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One message of a conversation. Assistant messages may carry tool calls; tool messages
/// answer one call by its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: Role::User,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Message {
        Message {
            role: Role::Assistant,
            content: content.into(),
            tool_calls,
            tool_call_id: None,
        }
    }

    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: Role::Tool,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments object (providers that send it as a JSON string are decoded).
    pub arguments: Json,
}

/// A tool offered to the model: its name, what it does, and a JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: Json,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub system: String,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    /// Ask for a JSON object reply (OpenAI's JSON mode; a prompt instruction elsewhere).
    pub json: bool,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// Who is asking, for providers that match on it (`scripted`) and for error messages.
    pub agent: String,
    pub task: String,
    /// 1 for the first call of a task, 2 for the next…
    pub turn: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    pub fn add(&mut self, other: Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    /// `stop`, `tool_calls`, `length`, … as the provider said it.
    pub finish_reason: String,
}

/// Why a call failed, classified for retries and for the user.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    #[error("API key rejected by {endpoint} (HTTP {status}): check {key_env}")]
    Auth {
        endpoint: String,
        status: u16,
        key_env: String,
    },
    #[error("model `{model}` not found at {endpoint}")]
    ModelNotFound { model: String, endpoint: String },
    #[error("request rejected by {endpoint} (HTTP 400): {message}")]
    BadRequest { endpoint: String, message: String },
    #[error("rate limited by {endpoint} after {attempts} attempts")]
    RateLimited { endpoint: String, attempts: u32 },
    #[error("{endpoint} failed with HTTP {status} after {attempts} attempts: {message}")]
    Server {
        endpoint: String,
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("cannot reach {endpoint} after {attempts} attempts: {message}")]
    Connect {
        endpoint: String,
        attempts: u32,
        message: String,
    },
    #[error("{endpoint} did not answer within {seconds}s ({attempts} attempts)")]
    Timeout {
        endpoint: String,
        seconds: u64,
        attempts: u32,
    },
    #[error("malformed reply from {endpoint}: {message}")]
    Malformed { endpoint: String, message: String },
    #[error("{0}")]
    Scripted(String),
    #[error("missing API key: set {0}")]
    MissingKey(String),
}

/// A reply's JSON, also when the model wrapped it in a Markdown fence (```json … ```).
pub fn parse_json_reply(content: &str) -> Result<Json, serde_json::Error> {
    let text = content.trim();
    let unfenced = text
        .strip_prefix("```json")
        .or_else(|| text.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(text);
    serde_json::from_str(unfenced.trim())
}

/// A source of chat completions.
pub trait Provider: Send + Sync {
    /// `openai`, `anthropic`, `scripted`, … for messages and the journal.
    fn name(&self) -> &str;

    /// One chat call. `on_token` receives streamed text as it arrives, where the provider
    /// streams.
    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>>;
}

pub mod anthropic;
pub mod build;
pub mod http;
pub mod openai;
pub mod scripted;

pub use anthropic::Anthropic;
pub use http::{ApiKey, HttpOptions, RetryPolicy};
pub use openai::OpenAi;
pub use scripted::Scripted;
pub mod cassette;

pub use cassette::{redact, replay_all, wrap_for_record, Recorder, Replay, Scrub, SharedCassette};
pub mod limit;
