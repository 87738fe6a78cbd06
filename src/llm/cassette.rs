//! Cassettes: every LLM call of a run, written to one file by `helix apply --record FILE` and
//! played back with no network by the `replay` provider or `helix apply --replay FILE`.
//!
//! ```json
//! {
//!   "version": 1,
//!   "entries": [
//!     {
//!       "agent": "coder", "task": "build", "turn": 1,
//!       "request_sha256": "9f2c…",
//!       "provider": "openai",
//!       "request": { "model": "…", "system": "…", "messages": […], "tools": […], "json": false },
//!       "response": { "content": "…", "tool_calls": […], "usage": {…}, "finish_reason": "stop" }
//!     }
//!   ]
//! }
//! ```
//!
//! How a replayed call finds its answer: by its agent, task and turn, and by the SHA-256 of
//! the canonical JSON of what decides the answer (model, system prompt, messages, tools and
//! the JSON flag), so a prompt changed since the recording is reported rather than answered
//! with a stale reply. A request made several times at one turn (a retried task) gets the
//! recorded answers in the order they were given, then the last one again.
//!
//! What the file must not hold: API keys travel in HTTP headers, which are not recorded at
//! all; values of declared secrets are replaced by `***` wherever they occur. Values that
//! differ from run to run (the run id in a prompt or a workspace path) are replaced by a
//! placeholder and put back on replay, so a recording stays valid for the next run. The key
//! is computed from that scrubbed text, so recording and replay must be given the same
//! [`Scrub`].

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{
    BoxFuture, ChatRequest, ChatResponse, LlmError, Message, Provider, Role, ToolCall, ToolSpec,
};
use crate::workflow::validate::hex_sha256;

/// The cassette format this build writes and reads.
pub const CASSETTE_VERSION: u32 = 1;

/// Replaces every occurrence of each secret in `text` by `***`. Longer secrets go first, so a
/// secret that contains another is replaced whole; empty strings are ignored.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut ordered: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    ordered.sort_by_key(|s| std::cmp::Reverse(s.len()));
    replace_each(text, ordered.into_iter().map(|secret| (secret, "***")))
}

/// `text` with each `from` replaced by its `to`, in the order given.
fn replace_each<'a>(text: &str, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = text.to_string();
    for (from, to) in pairs {
        if out.contains(from) {
            out = out.replace(from, to);
        }
    }
    out
}

/// What a cassette must not hold verbatim: secrets, replaced by `***` for good, and run
/// values (the run id, …), replaced by `<helix:NAME>` and put back on replay.
#[derive(Debug, Clone, Default)]
pub struct Scrub {
    secrets: Vec<String>,
    /// (placeholder, value), longest value first: a workspace path that contains the run id
    /// must become one placeholder, not a path around another.
    run_values: Vec<(String, String)>,
}

impl Scrub {
    pub fn new(secrets: Vec<String>) -> Scrub {
        Scrub {
            secrets,
            run_values: Vec::new(),
        }
    }

    /// Declares `value` as differing from run to run, written `<helix:NAME>` in the cassette.
    pub fn run_value(mut self, name: &str, value: impl Into<String>) -> Scrub {
        let value = value.into();
        if !value.is_empty() {
            self.run_values.push((format!("<helix:{name}>"), value));
            self.run_values
                .sort_by_key(|(_, value)| std::cmp::Reverse(value.len()));
        }
        self
    }

    fn scrubbed(&self, text: &str) -> String {
        let values = self.run_values.iter();
        replace_each(
            &redact(text, &self.secrets),
            values.map(|(placeholder, value)| (value.as_str(), placeholder.as_str())),
        )
    }

    fn restored(&self, text: &str) -> String {
        let values = self.run_values.iter();
        replace_each(
            text,
            values.map(|(placeholder, value)| (placeholder.as_str(), value.as_str())),
        )
    }

    /// The request as the cassette holds it.
    fn request(&self, request: &ChatRequest) -> RecordedRequest {
        let text = |s: &str| self.scrubbed(s);
        RecordedRequest {
            model: text(&request.model),
            system: text(&request.system),
            messages: request
                .messages
                .iter()
                .map(|m| Message {
                    role: m.role,
                    content: text(&m.content),
                    tool_calls: m.tool_calls.iter().map(|c| map_call(c, &text)).collect(),
                    tool_call_id: m.tool_call_id.as_deref().map(text),
                })
                .collect(),
            tools: request
                .tools
                .iter()
                .map(|t| ToolSpec {
                    name: text(&t.name),
                    description: text(&t.description),
                    parameters: map_strings(&t.parameters, &text),
                })
                .collect(),
            json: request.json,
            temperature: request.temperature,
            max_tokens: request.max_tokens,
        }
    }

    fn site(&self, request: &ChatRequest) -> CallSite {
        CallSite {
            agent: self.scrubbed(&request.agent),
            task: self.scrubbed(&request.task),
            turn: request.turn,
        }
    }
}

impl From<Vec<String>> for Scrub {
    fn from(secrets: Vec<String>) -> Scrub {
        Scrub::new(secrets)
    }
}

/// `value` with `f` applied to every string in it, object keys included.
fn map_strings(value: &Json, f: &dyn Fn(&str) -> String) -> Json {
    match value {
        Json::String(s) => Json::String(f(s)),
        Json::Array(items) => Json::Array(items.iter().map(|v| map_strings(v, f)).collect()),
        Json::Object(map) => {
            Json::Object(map.iter().map(|(k, v)| (f(k), map_strings(v, f))).collect())
        }
        other => other.clone(),
    }
}

fn map_call(call: &ToolCall, f: &dyn Fn(&str) -> String) -> ToolCall {
    ToolCall {
        id: f(&call.id),
        name: f(&call.name),
        arguments: map_strings(&call.arguments, f),
    }
}

/// `response` with `f` applied to its text: scrubbing it for the cassette or restoring it.
fn map_response(response: &ChatResponse, f: &dyn Fn(&str) -> String) -> ChatResponse {
    ChatResponse {
        content: f(&response.content),
        tool_calls: response.tool_calls.iter().map(|c| map_call(c, f)).collect(),
        usage: response.usage,
        finish_reason: response.finish_reason.clone(),
    }
}

// --- The file ---------------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CassetteFile {
    version: u32,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    agent: String,
    task: String,
    turn: u32,
    /// With agent, task and turn, what a replayed call is matched by.
    request_sha256: String,
    /// Who answered, for readers of the file.
    provider: String,
    request: RecordedRequest,
    response: ChatResponse,
}

/// A request's fields, scrubbed. Temperature and token limit are kept for readers but are
/// not part of the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordedRequest {
    model: String,
    system: String,
    messages: Vec<Message>,
    tools: Vec<ToolSpec>,
    json: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
}

impl RecordedRequest {
    /// The SHA-256 of the canonical JSON (object keys sorted, no spaces) of the fields that
    /// decide the answer. Sorting keys keeps the key stable when a tool's schema is written
    /// with its keys in another order.
    fn sha256(&self) -> Result<String, LlmError> {
        #[derive(Serialize)]
        struct Identity<'a> {
            model: &'a str,
            system: &'a str,
            messages: &'a [Message],
            tools: &'a [ToolSpec],
            json: bool,
        }
        let identity = serde_json::to_value(Identity {
            model: &self.model,
            system: &self.system,
            messages: &self.messages,
            tools: &self.tools,
            json: self.json,
        })
        .map_err(|e| {
            LlmError::Scripted(format!("cannot encode a request for the cassette: {e}"))
        })?;
        Ok(hex_sha256(canonical(identity).to_string().as_bytes()))
    }

    /// What differs between this request and a recorded one, in the user's words.
    fn difference(&self, recorded: &RecordedRequest) -> String {
        if self.model != recorded.model {
            return format!("the model is `{}`, it was `{}`", self.model, recorded.model);
        }
        if self.system != recorded.system {
            return "the system prompt differs".into();
        }
        if self.tools != recorded.tools {
            return "the tools offered differ".into();
        }
        if self.json != recorded.json {
            return "the request for JSON output differs".into();
        }
        let pairs = self.messages.iter().zip(&recorded.messages);
        if let Some((index, (message, _))) = pairs.enumerate().find(|(_, (now, then))| now != then)
        {
            let role = match message.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            return format!("message {} ({role}) differs", index + 1);
        }
        if self.messages.len() != recorded.messages.len() {
            return format!(
                "the conversation has {} messages, the recording {}",
                self.messages.len(),
                recorded.messages.len()
            );
        }
        "the request differs".into()
    }
}

fn canonical(value: Json) -> Json {
    match value {
        Json::Object(map) => {
            let mut fields: Vec<(String, Json)> =
                map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(fields.into_iter().collect())
        }
        Json::Array(items) => Json::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// Where in a run a call is made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CallSite {
    agent: String,
    task: String,
    turn: u32,
}

impl std::fmt::Display for CallSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "agent `{}`, task `{}`, turn {}",
            self.agent, self.task, self.turn
        )
    }
}

/// Writes the whole cassette to a temporary file beside `path`, then renames it over `path`:
/// a run killed at any moment leaves the previous complete cassette or the new one.
fn write_atomically(path: &Path, cassette: &CassetteFile) -> Result<(), LlmError> {
    let failed = |e: &dyn std::fmt::Display| {
        LlmError::Scripted(format!("cannot write cassette {}: {e}", path.display()))
    };
    let mut text = serde_json::to_string_pretty(cassette).map_err(|e| failed(&e))?;
    text.push('\n');
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cassette".into());
    // Hidden, and per process, so two runs recording side by side cannot interleave writes.
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = File::create(&temp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        failed(&e)
    })
}

// --- Recording --------------------------------------------------------------------------------

/// The cassette a run is recording: one file shared by the recorders of all its models.
#[derive(Debug, Clone)]
pub struct SharedCassette(Arc<Recording>);

#[derive(Debug)]
struct Recording {
    path: PathBuf,
    scrub: Scrub,
    file: Mutex<CassetteFile>,
}

impl SharedCassette {
    /// Starts an empty cassette at `path`, written at once: a path that cannot be written
    /// fails before any model is paid for.
    pub fn create(
        path: impl Into<PathBuf>,
        scrub: impl Into<Scrub>,
    ) -> Result<SharedCassette, LlmError> {
        let recording = Recording {
            path: path.into(),
            scrub: scrub.into(),
            file: Mutex::new(CassetteFile {
                version: CASSETTE_VERSION,
                entries: Vec::new(),
            }),
        };
        {
            let file = recording.lock();
            write_atomically(&recording.path, &file)?;
        }
        Ok(SharedCassette(Arc::new(recording)))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// How many calls have been recorded.
    pub fn len(&self) -> usize {
        self.0.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one call and rewrites the file. The disk work runs off the async workers.
    async fn append(
        &self,
        provider: &str,
        request: &ChatRequest,
        response: &ChatResponse,
    ) -> Result<(), LlmError> {
        let scrub = &self.0.scrub;
        let site = scrub.site(request);
        let recorded = scrub.request(request);
        let entry = Entry {
            request_sha256: recorded.sha256()?,
            agent: site.agent,
            task: site.task,
            turn: site.turn,
            provider: provider.to_string(),
            request: recorded,
            response: map_response(response, &|s| scrub.scrubbed(s)),
        };
        let recording = self.0.clone();
        tokio::task::spawn_blocking(move || recording.append(entry))
            .await
            .map_err(|e| {
                LlmError::Scripted(format!(
                    "writing cassette {} failed: {e}",
                    self.0.path.display()
                ))
            })?
    }
}

impl Recording {
    // Appending and writing cannot leave the entries half-updated, so a lock poisoned by a
    // panic elsewhere still guards a consistent cassette.
    fn lock(&self) -> std::sync::MutexGuard<'_, CassetteFile> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock is held while writing, so that files are written in the order entries are
    /// added and the last write holds them all.
    fn append(&self, entry: Entry) -> Result<(), LlmError> {
        let mut file = self.lock();
        file.entries.push(entry);
        let written = write_atomically(&self.path, &file);
        if written.is_err() {
            // The caller sees the call fail, so the cassette must not claim it was answered.
            file.entries.pop();
        }
        written
    }
}

/// A provider that passes calls to another and records each successful one.
pub struct Recorder {
    inner: Arc<dyn Provider>,
    cassette: SharedCassette,
    name: String,
}

impl Recorder {
    /// Records `inner`'s calls into a cassette of its own at `path`. `redact` is the
    /// secrets (a `Vec<String>`) or a full [`Scrub`].
    pub fn new(
        inner: Arc<dyn Provider>,
        path: impl Into<PathBuf>,
        redact: impl Into<Scrub>,
    ) -> Result<Recorder, LlmError> {
        Ok(Recorder::sharing(
            inner,
            &SharedCassette::create(path, redact)?,
        ))
    }

    /// Records `inner`'s calls into `cassette`, beside those of other models.
    pub fn sharing(inner: Arc<dyn Provider>, cassette: &SharedCassette) -> Recorder {
        Recorder {
            name: format!("recording {}", inner.name()),
            inner,
            cassette: cassette.clone(),
        }
    }

    pub fn cassette(&self) -> &SharedCassette {
        &self.cassette
    }
}

/// [`Recorder::sharing`] as a provider: what `helix apply --record` puts in front of each
/// model.
pub fn wrap_for_record(inner: Arc<dyn Provider>, cassette: &SharedCassette) -> Arc<dyn Provider> {
    Arc::new(Recorder::sharing(inner, cassette))
}

impl Provider for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(async move {
            let response = self.inner.chat(request, on_token).await?;
            self.cassette
                .append(self.inner.name(), request, &response)
                .await?;
            Ok(response)
        })
    }
}

// --- Replay -----------------------------------------------------------------------------------

/// A provider that answers from a cassette.
#[derive(Debug)]
pub struct Replay {
    path: PathBuf,
    entries: Vec<Entry>,
    /// Entry indices by call site, in recorded order.
    by_site: HashMap<CallSite, Vec<usize>>,
    scrub: Scrub,
    /// How often each (site, request hash) has been answered.
    served: Mutex<HashMap<(CallSite, String), usize>>,
}

impl Replay {
    /// Reads and checks a cassette. Requests are matched unscrubbed until
    /// [`with_scrub`](Replay::with_scrub) says what the recording scrubbed.
    pub fn load(path: &Path) -> Result<Replay, LlmError> {
        let invalid =
            |message: String| LlmError::Scripted(format!("cassette {} {message}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| {
            LlmError::Scripted(format!("cannot read cassette {}: {e}", path.display()))
        })?;
        // The version first, so a newer format is named as such rather than as a shape error.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let Version { version } =
            serde_json::from_str(&text).map_err(|e| invalid(format!("is not a cassette: {e}")))?;
        if version != CASSETTE_VERSION {
            return Err(invalid(format!(
                "has version {version}; this helix reads version {CASSETTE_VERSION}"
            )));
        }
        let file: CassetteFile = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("is not a valid cassette: {e}")))?;
        let mut by_site: HashMap<CallSite, Vec<usize>> = HashMap::new();
        for (index, entry) in file.entries.iter().enumerate() {
            // A request edited by hand would never match again; say so now, not at replay.
            if entry.request.sha256()? != entry.request_sha256 {
                return Err(invalid(format!(
                    "entry {} ({}) has a request that does not match its `request_sha256`: \
                     was it edited? Record the run again",
                    index + 1,
                    Replay::site_of(entry)
                )));
            }
            by_site
                .entry(Replay::site_of(entry))
                .or_default()
                .push(index);
        }
        Ok(Replay {
            path: path.to_path_buf(),
            entries: file.entries,
            by_site,
            scrub: Scrub::default(),
            served: Mutex::new(HashMap::new()),
        })
    }

    /// Matches requests scrubbed as the recording was: the same secrets and run values.
    pub fn with_scrub(mut self, scrub: impl Into<Scrub>) -> Replay {
        self.scrub = scrub.into();
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many calls the cassette holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn site_of(entry: &Entry) -> CallSite {
        CallSite {
            agent: entry.agent.clone(),
            task: entry.task.clone(),
            turn: entry.turn,
        }
    }

    fn answer(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        let site = self.scrub.site(request);
        let recorded = self.scrub.request(request);
        let sha = recorded.sha256()?;
        let Some(indices) = self.by_site.get(&site) else {
            return Err(self.not_recorded(&site));
        };
        let same: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| self.entries[i].request_sha256 == sha)
            .collect();
        let Some(&last) = same.last() else {
            let then = &self.entries[indices[0]].request;
            return Err(LlmError::Scripted(format!(
                "the request of {site} changed since cassette {} was recorded ({}); \
                 record the run again",
                self.path.display(),
                recorded.difference(then)
            )));
        };
        // Counting and picking under one lock keeps concurrent repeats of one request from
        // being given the same recorded answer.
        let index = {
            let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
            let count = served.entry((site, sha)).or_insert(0);
            let index = same.get(*count).copied().unwrap_or(last);
            *count += 1;
            index
        };
        let recorded = &self.entries[index].response;
        Ok(map_response(recorded, &|s| self.scrub.restored(s)))
    }

    /// The error for a call site the cassette never saw, with the turns it did see of that
    /// task, which tell a longer conversation from a task that was not run.
    fn not_recorded(&self, site: &CallSite) -> LlmError {
        let mut turns: Vec<u32> = self
            .by_site
            .keys()
            .filter(|s| s.agent == site.agent && s.task == site.task)
            .map(|s| s.turn)
            .collect();
        turns.sort_unstable();
        let seen = match (turns.first(), turns.last()) {
            (Some(first), Some(last)) if first == last => {
                format!("it holds only turn {first} of this task")
            }
            (Some(first), Some(last)) => {
                format!("it holds turns {first} to {last} of this task")
            }
            _ => "it holds no call of this agent and task".into(),
        };
        LlmError::Scripted(format!(
            "cassette {} has no recorded call for {site}: {seen}",
            self.path.display()
        ))
    }
}

/// One replaying provider for every model of a run: what `helix apply --replay` uses.
pub fn replay_all(path: &Path, scrub: impl Into<Scrub>) -> Result<Arc<dyn Provider>, LlmError> {
    Ok(Arc::new(Replay::load(path)?.with_scrub(scrub)))
}

impl Provider for Replay {
    fn name(&self) -> &str {
        "replay"
    }

    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(async move {
            let response = self.answer(request)?;
            // In one piece: the recording kept the text, not how it arrived.
            if let Some(on_token) = on_token.filter(|_| !response.content.is_empty()) {
                on_token(&response.content);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_secret_containing_another_is_redacted_whole() {
        let secrets = vec!["abcd".to_string(), "abcdef".to_string(), String::new()];
        assert_eq!(redact("x abcdef abcd", &secrets), "x *** ***");
    }

    #[test]
    fn run_values_are_replaced_and_restored() {
        let scrub = Scrub::new(vec![])
            .run_value("run_id", "R1")
            .run_value("workspace", "/h/runs/R1/ws");
        let stored = scrub.scrubbed("in /h/runs/R1/ws/a.py for R1");
        assert_eq!(stored, "in <helix:workspace>/a.py for <helix:run_id>");
        let next = Scrub::new(vec![])
            .run_value("run_id", "R2")
            .run_value("workspace", "/h/runs/R2/ws");
        assert_eq!(next.restored(&stored), "in /h/runs/R2/ws/a.py for R2");
    }

    #[test]
    fn the_key_ignores_the_order_of_schema_keys() {
        let tool = |parameters| ToolSpec {
            name: "fs.read".into(),
            description: "Read".into(),
            parameters,
        };
        let request = |parameters| ChatRequest {
            tools: vec![tool(parameters)],
            ..ChatRequest::default()
        };
        let scrub = Scrub::default();
        let one = scrub.request(&request(json!({ "type": "object", "required": [] })));
        let two = scrub.request(&request(json!({ "required": [], "type": "object" })));
        assert_eq!(one.sha256(), two.sha256());
    }
}
