//! The HTTP side of providers: one shared client, timeouts, and the retry loop both wire
//! formats go through, so every provider classifies and reports failures the same way.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use tokio::time::Instant;

use serde_json::Value as Json;

use super::{ChatRequest, LlmError, ToolSpec};

/// Receives streamed text as it arrives.
pub(crate) type OnToken<'a> = dyn Fn(&str) + Send + Sync + 'a;

/// How long one request may take (for a stream: until the headers, then between chunks).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long opening a connection may take. It is a property of the shared client, so it is
/// the same for every model; a shorter per-model `timeout` still bounds connecting too.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply body larger than this is refused rather than buffered: no chat reply is that big,
/// and a misbehaving server must not exhaust memory.
const MAX_BODY_BYTES: usize = 32 << 20;

/// Error bodies are only quoted, so a little is enough.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
const MAX_QUOTED_CHARS: usize = 400;

/// An API key. It is only ever written into a request header; `Debug` hides it so that a
/// provider printed in a log or an error report cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// A header value carrying the key, flagged so that HTTP-level logging redacts it.
    pub(crate) fn header(&self, prefix: &str, key_env: &str) -> Result<HeaderValue, LlmError> {
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", self.0)).map_err(|_| {
            // The message must not quote the key; say what is wrong with it instead.
            LlmError::MissingKey(format!(
                "{key_env} to a key without line breaks or control characters"
            ))
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// When and how often a failed call is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included (0 is read as 1).
    pub max_attempts: u32,
    /// The wait after the first failure; it doubles after each further one.
    pub base_delay: Duration,
    /// No wait is longer, a server's `Retry-After` included.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The wait after `failures` failed attempts. Exponential with "equal jitter": half of
    /// the step is fixed and half random, so that clients which failed together spread out
    /// but none retries at once. A server's `Retry-After` is a floor, within `max_delay`.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let step = self
            .base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay);
        let half = step / 2;
        let jittered = half + half.mul_f64(fastrand::f64());
        retry_after
            .map_or(jittered, |wait| wait.max(jittered))
            .min(self.max_delay)
    }
}

/// Per-model transport settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for HttpOptions {
    fn default() -> HttpOptions {
        HttpOptions {
            timeout: DEFAULT_TIMEOUT,
            retry: RetryPolicy::default(),
        }
    }
}

/// The process-wide client: one connection pool and one TLS setup for every model.
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("helix/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("cannot set up the HTTP client: {}", describe(&e)))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One POST of a wire format, with what error messages need to know about it.
pub(crate) struct Post<'a> {
    /// The configured base URL: errors name it, since it is what the user wrote.
    pub base_url: &'a str,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// A streamed reply is bounded per chunk rather than as a whole, since a long answer
    /// may legitimately take longer than the timeout to arrive.
    pub stream: bool,
    pub model: &'a str,
    /// Where the key comes from, for `Auth` errors.
    pub key_env: &'a str,
    /// Redacted from every message, in case a server quotes it back.
    pub key: Option<&'a ApiKey>,
}

/// Why reading a successful reply failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The body is not what the wire format promises; retrying would not help.
    Malformed(String),
    /// A stream ended before its end marker: the connection was cut, so it is retried.
    Truncated(String),
    /// The server reported an error in the middle of a stream (Anthropic's
    /// `overloaded_error`, say), with the HTTP status it stands for.
    Server { status: u16, message: String },
    /// The connection failed or stalled while the body was arriving.
    Transport(Transient),
}

/// A failure that another attempt may not repeat.
#[derive(Debug)]
pub(crate) enum Transient {
    RateLimited {
        retry_after: Option<Duration>,
    },
    Server {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    Connect(String),
    Timeout,
    Truncated(String),
}

impl Transient {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Transient::RateLimited { retry_after } | Transient::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    fn into_error(self, post: &Post, attempts: u32, timeout: Duration) -> LlmError {
        let endpoint = post.base_url.to_string();
        match self {
            Transient::RateLimited { .. } => LlmError::RateLimited { endpoint, attempts },
            Transient::Server {
                status, message, ..
            } => LlmError::Server {
                endpoint,
                status,
                attempts,
                message,
            },
            Transient::Connect(message) => LlmError::Connect {
                endpoint,
                attempts,
                message,
            },
            Transient::Timeout => LlmError::Timeout {
                endpoint,
                // Rounded up: "within 0s" would read as no time at all.
                seconds: timeout.as_secs_f64().ceil() as u64,
                attempts,
            },
            Transient::Truncated(detail) => LlmError::Malformed {
                endpoint,
                message: format!("truncated stream: {detail} ({attempts} attempts)"),
            },
        }
    }
}

enum Failure {
    Fatal(LlmError),
    Transient(Transient),
}

impl From<Transient> for Failure {
    fn from(t: Transient) -> Failure {
        Failure::Transient(t)
    }
}

/// Sends `post`, reads the reply with `read`, and retries transient failures (429, 5xx,
/// connection errors, timeouts, truncated streams) per `options.retry`. Client errors
/// (400, 401, 403, 404) are reported at once. Messages never contain the API key.
///
/// A retried stream is read again from its start, so a token sink may see the text of a
/// cut-off attempt before the whole reply.
pub(crate) async fn send_with_retry<T, F, Fut>(
    options: &HttpOptions,
    post: &Post<'_>,
    read: F,
) -> Result<T, LlmError>
where
    F: Fn(Reply) -> Fut,
    Fut: Future<Output = Result<T, ReadError>>,
{
    let result = retry_loop(options, post, read).await;
    result.map_err(|e| redact_error(e, post.key))
}

async fn retry_loop<T, F, Fut>(
    options: &HttpOptions,
    post: &Post<'_>,
    read: F,
) -> Result<T, LlmError>
where
    F: Fn(Reply) -> Fut,
    Fut: Future<Output = Result<T, ReadError>>,
{
    let client = client().map_err(|message| LlmError::Connect {
        endpoint: post.base_url.to_string(),
        attempts: 0,
        message,
    })?;
    let max_attempts = options.retry.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        let transient = match attempt_once(client, options, post, &read).await {
            Ok(value) => return Ok(value),
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Transient(transient)) => transient,
        };
        if attempt >= max_attempts {
            return Err(transient.into_error(post, attempt, options.timeout));
        }
        tokio::time::sleep(options.retry.delay(attempt, transient.retry_after())).await;
        attempt += 1;
    }
}

async fn attempt_once<T, F, Fut>(
    client: &reqwest::Client,
    options: &HttpOptions,
    post: &Post<'_>,
    read: &F,
) -> Result<T, Failure>
where
    F: Fn(Reply) -> Fut,
    Fut: Future<Output = Result<T, ReadError>>,
{
    let deadline = Instant::now() + options.timeout;
    let request = client
        .post(&post.url)
        .headers(post.headers.clone())
        .body(post.body.clone());
    let response = match tokio::time::timeout_at(deadline, request.send()).await {
        Err(_) => return Err(Transient::Timeout.into()),
        Ok(Err(e)) if e.is_builder() => {
            // A malformed URL or header: no attempt can succeed.
            return Err(Failure::Fatal(LlmError::Connect {
                endpoint: post.base_url.to_string(),
                attempts: 1,
                message: describe(&e),
            }));
        }
        Ok(Err(e)) => return Err(transport_failure(&e).into()),
        Ok(Ok(response)) => response,
    };
    let limit = if post.stream {
        Limit::Idle(options.timeout)
    } else {
        Limit::Deadline(deadline)
    };
    let mut reply = Reply { response, limit };
    let status = reply.response.status();
    if !status.is_success() {
        return Err(classify_status(status, &mut reply, post).await);
    }
    read(reply).await.map_err(|e| match e {
        ReadError::Malformed(message) => Failure::Fatal(LlmError::Malformed {
            endpoint: post.base_url.to_string(),
            message,
        }),
        ReadError::Truncated(detail) => Transient::Truncated(detail).into(),
        ReadError::Server { status: 429, .. } => {
            Transient::RateLimited { retry_after: None }.into()
        }
        ReadError::Server { status, message } => Transient::Server {
            status,
            message,
            retry_after: None,
        }
        .into(),
        ReadError::Transport(t) => t.into(),
    })
}

/// Turns an error status into a failure: what is worth another attempt, and a clear message
/// for what is not.
async fn classify_status(status: StatusCode, reply: &mut Reply, post: &Post<'_>) -> Failure {
    let retry_after = retry_after(reply.response.headers());
    // The body only improves the message; if it cannot be read the status still decides.
    let body = reply
        .read_to_end(MAX_ERROR_BODY_BYTES)
        .await
        .unwrap_or_default();
    let message = error_message(&String::from_utf8_lossy(&body), status);
    let endpoint = post.base_url.to_string();
    let model_not_found = || LlmError::ModelNotFound {
        model: post.model.to_string(),
        endpoint: endpoint.clone(),
    };
    match status.as_u16() {
        401 | 403 => Failure::Fatal(LlmError::Auth {
            endpoint: endpoint.clone(),
            status: status.as_u16(),
            key_env: post.key_env.to_string(),
        }),
        404 => Failure::Fatal(model_not_found()),
        400 | 422 if mentions_missing_model(&message) => Failure::Fatal(model_not_found()),
        400 => Failure::Fatal(LlmError::BadRequest { endpoint, message }),
        // OpenAI answers an exhausted quota with 429 too, and no wait will fix that.
        429 if String::from_utf8_lossy(&body).contains("insufficient_quota") => {
            Failure::Fatal(LlmError::Server {
                endpoint,
                status: 429,
                attempts: 1,
                message,
            })
        }
        429 => Transient::RateLimited { retry_after }.into(),
        408 | 500..=599 => Transient::Server {
            status: status.as_u16(),
            message,
            retry_after,
        }
        .into(),
        other => Failure::Fatal(LlmError::Server {
            endpoint,
            status: other,
            attempts: 1,
            message,
        }),
    }
}

fn transport_failure(e: &reqwest::Error) -> Transient {
    if e.is_timeout() {
        Transient::Timeout
    } else {
        Transient::Connect(describe(e))
    }
}

/// `Retry-After` in seconds (an HTTP date is rare from APIs and is ignored), or the
/// millisecond variant some OpenAI-compatible servers send.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    number("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| number(RETRY_AFTER.as_str()).map(|s| Duration::from_secs_f64(s.min(1e6))))
}

/// The human part of an error body: `error.message` (OpenAI, Anthropic), `error` (Ollama),
/// `message` or `detail` (other servers), or the text itself, on one line and shortened.
fn error_message(body: &str, status: StatusCode) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|json| {
            let pick = |v: &serde_json::Value| v.as_str().map(str::to_string);
            pick(&json["error"]["message"])
                .or_else(|| pick(&json["error"]))
                .or_else(|| pick(&json["message"]))
                .or_else(|| pick(&json["detail"]))
        });
    let text = from_json.unwrap_or_else(|| body.to_string());
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        return status.to_string();
    }
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Servers that answer an unknown model with 400 rather than 404 (LM Studio, some proxies)
/// still say so in words.
fn mentions_missing_model(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("model")
        && [
            "not found",
            "does not exist",
            "not exist",
            "unknown model",
            "no such model",
        ]
        .iter()
        .any(|phrase| m.contains(phrase))
}

/// A transport error with its causes: reqwest's own message ("error sending request") says
/// little without them.
fn describe(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Removes the key from every message of `error`, should a server have quoted it.
fn redact_error(error: LlmError, key: Option<&ApiKey>) -> LlmError {
    let Some(key) = key.map(ApiKey::expose).filter(|k| !k.is_empty()) else {
        return error;
    };
    let clean = |s: String| {
        if s.contains(key) {
            s.replace(key, "<redacted>")
        } else {
            s
        }
    };
    match error {
        LlmError::BadRequest { endpoint, message } => LlmError::BadRequest {
            endpoint,
            message: clean(message),
        },
        LlmError::Server {
            endpoint,
            status,
            attempts,
            message,
        } => LlmError::Server {
            endpoint,
            status,
            attempts,
            message: clean(message),
        },
        LlmError::Connect {
            endpoint,
            attempts,
            message,
        } => LlmError::Connect {
            endpoint,
            attempts,
            message: clean(message),
        },
        LlmError::Malformed { endpoint, message } => LlmError::Malformed {
            endpoint,
            message: clean(message),
        },
        other => other,
    }
}

/// How long reading a reply may take.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// The whole reply must have arrived by then.
    Deadline(Instant),
    /// Each chunk must arrive within this long of the previous one.
    Idle(Duration),
}

/// A successful response whose body is still to be read, under the attempt's time limit.
pub(crate) struct Reply {
    response: reqwest::Response,
    limit: Limit,
}

impl Reply {
    /// Appends the next chunk of the body to `buf`; false at the end of the body.
    async fn read_chunk(&mut self, buf: &mut Vec<u8>) -> Result<bool, ReadError> {
        let next = self.response.chunk();
        let chunk = match self.limit {
            Limit::Deadline(deadline) => tokio::time::timeout_at(deadline, next).await,
            Limit::Idle(idle) => tokio::time::timeout(idle, next).await,
        };
        match chunk {
            Err(_) => Err(ReadError::Transport(Transient::Timeout)),
            Ok(Err(e)) => Err(ReadError::Transport(transport_failure(&e))),
            Ok(Ok(None)) => Ok(false),
            Ok(Ok(Some(bytes))) => {
                buf.extend_from_slice(&bytes);
                Ok(true)
            }
        }
    }

    async fn read_to_end(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        while self.read_chunk(&mut body).await? {
            if body.len() > max {
                return Err(ReadError::Malformed(format!(
                    "the reply is larger than {} MiB",
                    max >> 20
                )));
            }
        }
        Ok(body)
    }

    /// The whole body as JSON.
    pub async fn json<T: serde::de::DeserializeOwned>(mut self) -> Result<T, ReadError> {
        let body = self.read_to_end(MAX_BODY_BYTES).await?;
        serde_json::from_slice(&body).map_err(|e| {
            let start = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
            ReadError::Malformed(format!(
                "the body is not the expected JSON ({e}); it starts with {start:?}"
            ))
        })
    }

    /// The body as a stream of server-sent events.
    pub fn events(self) -> SseReader {
        SseReader {
            reply: self,
            buf: Vec::new(),
            event: String::new(),
            data: Vec::new(),
            ended: false,
        }
    }
}

/// One server-sent event: its `event:` name (may be empty) and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Reads server-sent events as they arrive, however the bytes were split into chunks.
pub(crate) struct SseReader {
    reply: Reply,
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
    ended: bool,
}

impl SseReader {
    /// The next event, or None at the end of the body. An incomplete last line is dropped,
    /// as the SSE spec says; the caller notices the missing end marker.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, ReadError> {
        loop {
            while let Some(newline) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=newline).collect();
                if let Some(event) = self.feed_line(&line)? {
                    return Ok(Some(event));
                }
            }
            if self.ended {
                // Lenient about a missing blank line after the last complete event.
                return Ok(self.dispatch());
            }
            if !self.reply.read_chunk(&mut self.buf).await? {
                self.ended = true;
            } else if self.buf.len() > MAX_BODY_BYTES {
                return Err(ReadError::Malformed(
                    "an event stream line is too long".into(),
                ));
            }
        }
    }

    fn feed_line(&mut self, line: &[u8]) -> Result<Option<SseEvent>, ReadError> {
        let line = std::str::from_utf8(line)
            .map_err(|_| ReadError::Malformed("the event stream is not UTF-8".into()))?
            .trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_string(),
            "data" => self.data.push(value.to_string()),
            // Comments (`: keep-alive`), `id:` and `retry:` mean nothing to a chat reply.
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        if self.data.is_empty() && self.event.is_empty() {
            return None;
        }
        let event = SseEvent {
            event: std::mem::take(&mut self.event),
            data: std::mem::take(&mut self.data).join("\n"),
        };
        Some(event)
    }
}

/// Tool names as the wire allows them. OpenAI and Anthropic accept only `[A-Za-z0-9_-]{1,64}`,
/// while helix's built-in tools are named like `fs.write`; each request maps its tools to
/// valid, distinct names and maps the model's calls back.
pub(crate) struct ToolNames {
    to_wire: HashMap<String, String>,
    to_neutral: HashMap<String, String>,
}

impl ToolNames {
    pub fn new(tools: &[ToolSpec]) -> ToolNames {
        let mut names = ToolNames {
            to_wire: HashMap::new(),
            to_neutral: HashMap::new(),
        };
        for tool in tools {
            if names.to_wire.contains_key(&tool.name) {
                continue;
            }
            let base = sanitize_tool_name(&tool.name);
            let mut wire = base.clone();
            let mut n = 2;
            while names.to_neutral.contains_key(&wire) {
                let suffix = format!("_{n}");
                let keep = base.len().min(64 - suffix.len());
                wire = format!("{}{suffix}", &base[..keep]);
                n += 1;
            }
            names.to_neutral.insert(wire.clone(), tool.name.clone());
            names.to_wire.insert(tool.name.clone(), wire);
        }
        names
    }

    /// The name to send; a name not among the request's tools (an old call in the history)
    /// is sanitized the same way.
    pub fn wire<'n>(&'n self, name: &'n str) -> Cow<'n, str> {
        match self.to_wire.get(name) {
            Some(wire) => Cow::Borrowed(wire),
            None => Cow::Owned(sanitize_tool_name(name)),
        }
    }

    /// The helix name of a tool the model called.
    pub fn neutral(&self, wire: &str) -> String {
        self.to_neutral
            .get(wire)
            .cloned()
            .unwrap_or_else(|| wire.to_string())
    }
}

fn sanitize_tool_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "tool".to_string()
    } else {
        clean
    }
}

/// The model a request goes to: its own, or else the provider's.
pub(crate) fn model_for<'r>(request: &'r ChatRequest, default: &'r str) -> &'r str {
    if request.model.is_empty() {
        default
    } else {
        &request.model
    }
}

/// The headers of every JSON call; the caller adds its key.
pub(crate) fn json_headers(stream: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if stream {
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    }
    headers
}

/// A tool call's arguments from the JSON text the model wrote (whole, or assembled from a
/// stream); no text at all means no arguments.
pub(crate) fn tool_arguments(text: &str, tool: &str) -> Result<Json, ReadError> {
    if text.trim().is_empty() {
        return Ok(Json::Object(Default::default()));
    }
    serde_json::from_str(text).map_err(|e| {
        ReadError::Malformed(format!(
            "the arguments of the call to tool `{tool}` are not valid JSON ({e})"
        ))
    })
}

/// The base URL as written, without the trailing slash that would double up in paths.
pub(crate) fn trim_base_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stays_under_the_cap() {
        let policy = RetryPolicy::default();
        for failures in 1..=10 {
            let step = Duration::from_millis(500)
                .saturating_mul(1 << (failures - 1))
                .min(Duration::from_secs(20));
            let delay = policy.delay(failures, None);
            assert!(delay >= step / 2 && delay <= step, "{failures}: {delay:?}");
        }
    }

    #[test]
    fn retry_after_is_a_floor_within_the_cap() {
        let policy = RetryPolicy::default();
        let three = Duration::from_secs(3);
        assert!(policy.delay(1, Some(three)) >= three);
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn retry_after_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
        let mut dated = HeaderMap::new();
        dated.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&dated), None);
    }

    #[test]
    fn error_messages_come_from_the_usual_fields() {
        let status = StatusCode::BAD_REQUEST;
        assert_eq!(
            error_message(r#"{"error": {"message": "bad  tools\nfield"}}"#, status),
            "bad tools field"
        );
        assert_eq!(
            error_message(r#"{"error": "model 'x' not found"}"#, status),
            "model 'x' not found"
        );
        assert_eq!(error_message("", status), "400 Bad Request");
        assert!(error_message(&"x".repeat(1000), status).ends_with('…'));
        assert!(mentions_missing_model("The model `gpt-9` does not exist"));
        assert!(!mentions_missing_model("messages: field required"));
    }

    #[test]
    fn tool_names_are_mapped_to_valid_distinct_wire_names() {
        let spec = |name: &str| ToolSpec {
            name: name.into(),
            description: String::new(),
            parameters: serde_json::json!({}),
        };
        let names = ToolNames::new(&[spec("fs.write"), spec("fs_write"), spec("search")]);
        assert_eq!(names.wire("fs.write"), "fs_write");
        assert_eq!(names.wire("fs_write"), "fs_write_2");
        assert_eq!(names.wire("search"), "search");
        assert_eq!(names.neutral("fs_write"), "fs.write");
        assert_eq!(names.neutral("fs_write_2"), "fs_write");
        assert_eq!(names.neutral("unknown"), "unknown");
        assert_eq!(names.wire("memory.search"), "memory_search");
    }

    #[test]
    fn api_keys_do_not_print() {
        let key = ApiKey::new("sk-secret");
        assert!(!format!("{key:?}").contains("sk-secret"));
        let error = redact_error(
            LlmError::BadRequest {
                endpoint: "http://x".into(),
                message: "Incorrect API key provided: sk-secret".into(),
            },
            Some(&key),
        );
        assert!(!error.to_string().contains("sk-secret"));
    }
}
