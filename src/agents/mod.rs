//! The agent loop: call the model, run the tools it asks for, feed back the results, until a
//! final answer (validated against `output.schema` when there is one) or a limit.
//!
//! Every completed message is journaled before the next call, so a resumed run continues
//! the conversation instead of paying for it again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::Value as Json;

use crate::engine::schema_check;
use crate::llm::{ChatRequest, Message, Provider, Role, ToolCall, ToolSpec, Usage};
use crate::store::Journal;
use crate::tools::{self, ToolContext};

pub mod memory;
mod sandbox_tools;
pub use sandbox_tools::{test_counts, TestCounts};

/// How many identical tool calls in a row mean the agent is stuck.
const MAX_IDENTICAL_CALLS: usize = 3;
/// Attempts to get an answer that matches `output.schema` after the first.
const MAX_REPAIRS: u32 = 2;
/// Tool results longer than this are cut before they go back to the model.
const MAX_TOOL_RESULT_CHARS: usize = 60_000;

/// A tool the agent may call: built-in, or a script.
#[derive(Debug, Clone)]
pub enum AgentTool {
    Builtin,
    /// `scratch.get` / `scratch.set`: the task's persistent scratchpad in the journal.
    Scratch,
    /// `http.request`, limited to the workflow's `http.allow` hosts.
    Http,
    Script {
        path: PathBuf,
        params: Json,
    },
    /// `sandbox.exec` / `sandbox.test`: commands in the task's sandbox.
    Sandbox {
        test: bool,
    },
    /// `memory.search` / `memory.store`: the run's long-term memory.
    Memory {
        store: bool,
    },
}

/// Everything one agent attempt needs, rendered and owned.
pub struct AgentJob {
    pub agent: String,
    pub task: String,
    pub run_id: String,
    /// The run's connection for agent conversations, shared by its agents.
    pub journal: SharedJournal,
    pub workflow_dir: PathBuf,
    pub model: String,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub system: String,
    pub prompt: String,
    pub tools: Vec<(ToolSpec, AgentTool)>,
    pub max_turns: u32,
    /// `tool_protocol: json`: tools described in the system prompt, calls parsed from replies.
    pub json_tools: bool,
    pub output_schema: Option<Json>,
    pub workspace: PathBuf,
    pub provider: Arc<dyn Provider>,
    /// Start over instead of continuing a journaled conversation.
    pub fresh: bool,
    /// Tokens used by the whole run so far, shared by all agents, for `budget.tokens`.
    pub run_tokens: Arc<AtomicU64>,
    pub token_budget: Option<u64>,
    /// Hosts `http.request` may reach.
    pub http_allow: Vec<String>,
    /// Set when someone watches: replies are then streamed and reported as they arrive.
    pub progress: Option<Progress>,
    /// Values replaced by `***` in everything journaled.
    pub secrets: Vec<String>,
    /// Tokens this task may use (the task's or the agent's `budget.tokens`, the smaller).
    pub task_token_budget: Option<u64>,
    /// Where `sandbox.exec` and `sandbox.test` run commands.
    pub sandbox: Option<Arc<dyn crate::sandbox::Sandbox>>,
    /// The run's long-term memory, when the workflow has one.
    pub memory: Option<Arc<memory::RunMemory>>,
    /// How `system` was made, to make it again with recalled memories.
    pub system_prompt: SystemPrompt,
    /// The error of the attempt before this one, for an `error_resolution` lesson.
    pub earlier_error: Option<String>,
}

/// An agent's system prompt before rendering: its template (or the default text) and the
/// variables it sees.
pub struct SystemPrompt {
    template: Option<crate::workflow::PromptRef>,
    dir: PathBuf,
    context: Json,
    default: String,
}

impl SystemPrompt {
    /// The prompt with `memory` as `{{ memory }}`; the default prompt lists the memories
    /// itself.
    pub fn render(&self, memory: &[Json]) -> Result<String, String> {
        use crate::workflow::PromptRef;
        let mut context = self.context.clone();
        context["memory"] = Json::Array(memory.to_vec());
        match &self.template {
            Some(PromptRef::File(path)) => {
                let dir = path.parent().unwrap_or(&self.dir);
                let env = crate::prompt::environment(Some(dir));
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                env.get_template(name)
                    .and_then(|t| t.render(&context))
                    .map_err(|e| format!("system prompt {}: {e}", path.display()))
            }
            Some(PromptRef::Inline(text)) => {
                let env = crate::prompt::environment(Some(&self.dir));
                crate::prompt::render(&env, text, &context)
                    .map_err(|e| format!("system prompt: {e}"))
            }
            None if memory.is_empty() => Ok(self.default.clone()),
            None => {
                let mut text = self.default.clone();
                text.push_str(
                    "\n\nRecalled memory (notes from earlier runs, most relevant first; they can be stale):",
                );
                for m in memory {
                    let kind = m["kind"].as_str().unwrap_or_default();
                    let note = m["text"].as_str().unwrap_or_default();
                    text.push_str(&format!("\n- [{kind}] {note}"));
                }
                Ok(text)
            }
        }
    }
}

/// Receives live detail ("turn 2 · 1.2k chars") while a call streams.
pub type Progress = Arc<dyn Fn(String) + Send + Sync>;

/// One journal connection shared by a run's agents (opening one per task costs more than
/// the rest of an agent step).
pub type SharedJournal = Arc<std::sync::Mutex<Journal>>;

/// What an agent task produces.
#[derive(Debug, Clone)]
pub struct AgentOutcome {
    pub output: Json,
    pub usage: Usage,
    pub turns: u32,
}

#[derive(Debug, Clone)]
pub struct AgentError {
    pub message: String,
    /// The run must stop (a budget), not just this task.
    pub budget: bool,
}

impl AgentError {
    fn new(message: impl Into<String>) -> AgentError {
        AgentError {
            message: message.into(),
            budget: false,
        }
    }
}

/// Runs the conversation to its end.
/// Runs an agent task: recalls memories into its system prompt, holds the conversation,
/// and distils its lesson into memory when the workflow asks for that.
pub async fn run(mut job: AgentJob) -> Result<AgentOutcome, AgentError> {
    if let Some(memory) = job.memory.clone() {
        let memories = memory
            .recall(&job.prompt)
            .await
            .map_err(|e| AgentError::new(format!("memory: {e}")))?;
        if !memories.is_empty() {
            job.system = job
                .system_prompt
                .render(&memories)
                .map_err(AgentError::new)?;
        }
    }
    let mut outcome = converse(&job).await?;
    // A lesson is not worth a budget: none once the run's or the task's tokens are spent.
    let run_used = job.run_tokens.load(Ordering::Relaxed);
    let budget_left = job.token_budget.is_none_or(|b| run_used < b)
        && job
            .task_token_budget
            .is_none_or(|b| outcome.usage.total() < b);
    let lesson_memory = job.memory.as_deref().filter(|m| m.config.synthesize);
    if let Some(memory) = lesson_memory.filter(|_| budget_left) {
        let finished = memory::Finished {
            agent: &job.agent,
            task: &job.task,
            model: &job.model,
            prompt: &job.prompt,
            answer: &outcome.output,
            earlier_error: job.earlier_error.as_deref(),
        };
        // A lesson that cannot be had costs the task nothing but the note.
        match memory::synthesize(memory, job.provider.as_ref(), finished).await {
            Ok(usage) => {
                job.run_tokens.fetch_add(usage.total(), Ordering::Relaxed);
                outcome.usage.add(usage);
            }
            Err(e) => eprintln!("warning: task `{}`: {e}", job.task),
        }
    }
    Ok(outcome)
}

async fn converse(job: &AgentJob) -> Result<AgentOutcome, AgentError> {
    let journal_err = |e: crate::store::JournalError| AgentError::new(format!("journal: {e}"));
    // Continue a conversation an earlier session journaled. The connection is taken in a
    // block of its own: it must never be held across an await.
    let (mut messages, mut usage) = {
        let journal = job
            .journal
            .lock()
            .map_err(|_| AgentError::new("journal: the connection is unusable after a panic"))?;
        if job.fresh {
            journal
                .clear_turns(&job.run_id, &job.task)
                .map_err(journal_err)?;
        }
        let mut messages: Vec<Message> = Vec::new();
        let mut usage = Usage::default();
        for (m, input, output) in journal.turns(&job.run_id, &job.task).map_err(journal_err)? {
            if let Ok(message) = serde_json::from_value::<Message>(m) {
                messages.push(message);
                usage.add(Usage {
                    input_tokens: input,
                    output_tokens: output,
                });
            }
        }
        (messages, usage)
    };
    if messages.is_empty() {
        messages.push(Message::user(job.prompt.clone()));
        append(job, &messages, Usage::default()).map_err(journal_err)?;
    }
    let mut turn = messages
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .count() as u32;
    let mut repairs = 0;
    let mut recent_calls: Vec<String> = Vec::new();
    let specs: Vec<ToolSpec> = job.tools.iter().map(|(s, _)| s.clone()).collect();
    let env = ToolEnv::of(job);

    // A journaled conversation may end with tool calls whose results were not journaled yet.
    if let Some(last) = messages
        .last()
        .filter(|m| m.role == Role::Assistant && !m.tool_calls.is_empty())
    {
        let calls = last.tool_calls.clone();
        for call in calls {
            let result = call_tool(&env, &call).await;
            messages.push(Message::tool_result(call.id.clone(), result));
            append(job, &messages, Usage::default()).map_err(journal_err)?;
        }
    }

    loop {
        if let Some(last) = messages.last() {
            if last.role == Role::Assistant && last.tool_calls.is_empty() {
                // The conversation already ended with an answer (resumed after journaling it).
                match finish(job, &last.content) {
                    Ok(output) => return Ok(AgentOutcome { output, usage, turns: turn }),
                    Err(problems) if repairs < MAX_REPAIRS => {
                        repairs += 1;
                        messages.push(Message::user(repair_prompt(&problems)));
                        append(job, &messages, Usage::default()).map_err(journal_err)?;
                    }
                    Err(problems) => {
                        return Err(AgentError::new(format!(
                            "the answer does not match `output.schema` after {MAX_REPAIRS} repairs: {problems}"
                        )))
                    }
                }
            }
        }
        if turn >= job.max_turns {
            return Err(AgentError::new(format!(
                "agent `{}` reached max_turns ({}) without a final answer",
                job.agent, job.max_turns
            )));
        }
        if let Some(budget) = job.task_token_budget {
            if usage.total() >= budget {
                return Err(AgentError::new(format!(
                    "the task's token budget of {budget} is exhausted ({} used)",
                    usage.total()
                )));
            }
        }
        if let Some(budget) = job.token_budget {
            let used = job.run_tokens.load(Ordering::Relaxed);
            if used >= budget {
                return Err(AgentError {
                    message: format!("token budget of {budget} exhausted ({used} used)"),
                    budget: true,
                });
            }
        }
        turn += 1;
        let request = ChatRequest {
            model: job.model.clone(),
            system: if job.json_tools {
                json_tools_prompt(&job.system, &specs)
            } else {
                job.system.clone()
            },
            messages: if job.json_tools {
                plain_messages(&messages)
            } else {
                messages.clone()
            },
            tools: if job.json_tools {
                Vec::new()
            } else {
                specs.clone()
            },
            json: job.output_schema.is_some(),
            temperature: job.temperature,
            max_tokens: job.max_tokens,
            agent: job.agent.clone(),
            task: job.task.clone(),
            turn,
        };
        let streamed = AtomicU64::new(0);
        let last_report = std::sync::Mutex::new(std::time::Instant::now());
        let on_token = |text: &str| {
            let Some(progress) = &job.progress else {
                return;
            };
            let total = streamed.fetch_add(text.chars().count() as u64, Ordering::Relaxed);
            let Ok(mut last) = last_report.lock() else {
                return;
            };
            // A few updates a second are plenty for a progress line.
            if last.elapsed() >= std::time::Duration::from_millis(100) {
                *last = std::time::Instant::now();
                progress(format!(
                    "turn {turn} · {} chars",
                    total + text.chars().count() as u64
                ));
            }
        };
        if let Some(progress) = &job.progress {
            progress(format!("turn {turn}"));
        }
        let on_token: Option<&(dyn Fn(&str) + Send + Sync)> = if job.progress.is_some() {
            Some(&on_token)
        } else {
            None
        };
        let reply = job
            .provider
            .chat(&request, on_token)
            .await
            .map_err(|e| AgentError::new(format!("agent `{}`, turn {turn}: {e}", job.agent)))?;
        usage.add(reply.usage);
        job.run_tokens
            .fetch_add(reply.usage.total(), Ordering::Relaxed);
        let mut reply = reply;
        if job.json_tools && reply.tool_calls.is_empty() {
            if let Some(call) = parse_json_tool_call(&reply.content, turn) {
                reply.tool_calls.push(call);
            }
        }
        messages.push(Message::assistant(
            reply.content.clone(),
            reply.tool_calls.clone(),
        ));
        append(job, &messages, reply.usage).map_err(journal_err)?;

        for call in &reply.tool_calls {
            let signature = format!("{} {}", call.name, call.arguments);
            recent_calls.push(signature.clone());
            let streak = recent_calls
                .iter()
                .rev()
                .take_while(|s| **s == signature)
                .count();
            if streak >= MAX_IDENTICAL_CALLS {
                return Err(AgentError::new(format!(
                    "agent `{}` is stuck: it called {signature} {streak} times in a row",
                    job.agent
                )));
            }
            let result = call_tool(&env, call).await;
            messages.push(Message::tool_result(call.id.clone(), result));
            append(job, &messages, Usage::default()).map_err(journal_err)?;
        }
    }
}

/// The system prompt with the tools described for `tool_protocol: json`.
fn json_tools_prompt(system: &str, tools: &[ToolSpec]) -> String {
    if tools.is_empty() {
        return system.to_string();
    }
    let mut s = format!("{system}\n\n## Tools\n\nYou can call these tools:\n");
    for t in tools {
        s.push_str(&format!(
            "- `{}`: {} Arguments (JSON Schema): {}\n",
            t.name, t.description, t.parameters
        ));
    }
    s.push_str(
        "\nTo call a tool, reply with only a JSON object: {\"tool\": \"<name>\", \"arguments\": {...}}. \
         The result comes back in the next message. When you are done, reply with your final answer instead.",
    );
    s
}

/// The conversation without native tool messages, for models that do not support them.
fn plain_messages(messages: &[Message]) -> Vec<Message> {
    let names: HashMap<&str, &str> = messages
        .iter()
        .flat_map(|m| m.tool_calls.iter())
        .map(|c| (c.id.as_str(), c.name.as_str()))
        .collect();
    messages
        .iter()
        .map(|m| match m.role {
            Role::Assistant => Message::assistant(m.content.clone(), Vec::new()),
            Role::Tool => {
                let id = m.tool_call_id.as_deref().unwrap_or_default();
                let name = names.get(id).copied().unwrap_or("the tool");
                Message::user(format!("Result of `{name}`:\n{}", m.content))
            }
            _ => m.clone(),
        })
        .collect()
}

/// A reply that is exactly `{"tool": NAME, "arguments": {...}}` (fenced or not) is a call.
fn parse_json_tool_call(content: &str, turn: u32) -> Option<ToolCall> {
    let value = crate::llm::parse_json_reply(content).ok()?;
    let name = value.get("tool")?.as_str()?.to_string();
    let arguments = value
        .get("arguments")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    Some(ToolCall {
        id: format!("call_{turn}"),
        name,
        arguments,
    })
}

/// Journals the last message of the conversation.
fn append(
    job: &AgentJob,
    messages: &[Message],
    usage: Usage,
) -> Result<(), crate::store::JournalError> {
    let seq = messages.len() as u32;
    // Secrets may reach the model (a prompt can use them) but never the journal.
    let text = crate::llm::redact(
        &serde_json::to_string(&messages.last()).unwrap_or_default(),
        &job.secrets,
    );
    let message = serde_json::from_str(&text).unwrap_or(Json::Null);
    let journal = job
        .journal
        .lock()
        .map_err(|_| crate::store::JournalError::Open {
            path: PathBuf::from("journal"),
            message: "the connection is unusable after a panic".into(),
        })?;
    journal.append_turn(
        &job.run_id,
        &job.task,
        seq,
        &message,
        (usage.input_tokens, usage.output_tokens),
    )
}

/// The final answer: JSON checked against the schema when one is set, else the text.
fn finish(job: &AgentJob, content: &str) -> Result<Json, String> {
    let Some(schema) = &job.output_schema else {
        return Ok(Json::String(content.trim().to_string()));
    };
    let value = crate::llm::parse_json_reply(content)
        .map_err(|e| format!("the reply is not JSON ({e})"))?;
    let problems = schema_check::check(schema, &value);
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(problems.join("; "))
    }
}

fn repair_prompt(problems: &str) -> String {
    format!(
        "Your answer does not match the required JSON Schema: {problems}. Reply again with only the corrected JSON object."
    )
}

/// Runs one tool call; failures go back to the model as text so it can correct itself.
/// What a tool call can reach: the workspace, the journal (scratchpad), the allowed hosts and
/// the tools an agent (or script) may call.
#[derive(Clone)]
pub struct ToolEnv {
    pub workspace: PathBuf,
    /// Where templates rendered by scripts are looked up.
    pub workflow_dir: PathBuf,
    pub journal: SharedJournal,
    pub run_id: String,
    pub task: String,
    pub http_allow: Vec<String>,
    /// Shared: a script tool's environment is made per call.
    pub tools: Arc<HashMap<String, AgentTool>>,
    pub sandbox: Option<Arc<dyn crate::sandbox::Sandbox>>,
    pub memory: Option<Arc<memory::RunMemory>>,
    /// Who stores memories, for their provenance.
    pub agent: String,
    /// Replaced by `***` in what scripts log.
    pub secrets: Arc<[String]>,
}

impl ToolEnv {
    fn of(job: &AgentJob) -> ToolEnv {
        ToolEnv {
            workspace: job.workspace.clone(),
            workflow_dir: job.workflow_dir.clone(),
            journal: job.journal.clone(),
            run_id: job.run_id.clone(),
            task: job.task.clone(),
            http_allow: job.http_allow.clone(),
            tools: Arc::new(
                job.tools
                    .iter()
                    .map(|(s, t)| (s.name.clone(), t.clone()))
                    .collect(),
            ),
            sandbox: job.sandbox.clone(),
            memory: job.memory.clone(),
            agent: job.agent.clone(),
            secrets: job.secrets.clone().into(),
        }
    }
}

impl ToolEnv {
    /// A value of this task's scratchpad.
    pub fn scratch_get(&self, key: &str) -> Result<Option<Json>, String> {
        let j = self
            .journal
            .lock()
            .map_err(|_| "journal unusable".to_string())?;
        j.scratch_get(&self.run_id, &self.task, key)
            .map_err(|e| e.to_string())
    }

    pub fn scratch_set(&self, key: &str, value: &Json) -> Result<(), String> {
        let j = self
            .journal
            .lock()
            .map_err(|_| "journal unusable".to_string())?;
        j.scratch_set(&self.run_id, &self.task, key, value)
            .map_err(|e| e.to_string())
    }

    /// A line in this task's log (`helix runs logs`).
    pub fn log(&self, text: &str) {
        if let Ok(j) = self.journal.lock() {
            let text = crate::llm::redact(text, &self.secrets);
            let _ = j.append_log(&self.run_id, &self.task, 1, "log", &text);
        }
    }
}

/// Calls one tool and returns its result.
pub async fn invoke(env: &ToolEnv, name: &str, args: &Json) -> Result<Json, String> {
    match env.tools.get(name) {
        None => Err(unknown_tool(env, name)),
        Some(AgentTool::Builtin) => {
            let (name, args) = (name.to_string(), args.clone());
            let cx = ToolContext {
                workspace: env.workspace.clone(),
            };
            tokio::task::spawn_blocking(move || tools::call_builtin(&name, &args, &cx))
                .await
                .map_err(|e| format!("tool failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Some(AgentTool::Scratch) => scratch(env, name, args),
        Some(AgentTool::Http) => http_request(&env.http_allow, args).await,
        Some(AgentTool::Sandbox { test: false }) => sandbox_tools::exec(env, args).await,
        Some(AgentTool::Sandbox { test: true }) => sandbox_tools::test(env, args).await,
        Some(AgentTool::Memory { store }) => memory::tool(env, *store, args).await,
        Some(AgentTool::Script { path, params }) => {
            run_script_tool(env, name, path, params, args).await
        }
    }
}

fn unknown_tool(env: &ToolEnv, name: &str) -> String {
    let mut names: Vec<&str> = env.tools.keys().map(String::as_str).collect();
    names.sort_unstable();
    format!("unknown tool `{name}`; available: {}", names.join(", "))
}

/// Runs one tool call for the model: failures go back as text so it can correct itself.
async fn call_tool(env: &ToolEnv, call: &ToolCall) -> String {
    let text = match invoke(env, &call.name, &call.arguments).await {
        Ok(Json::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(e) => format!("error: {e}"),
    };
    if text.chars().count() > MAX_TOOL_RESULT_CHARS {
        let cut: String = text.chars().take(MAX_TOOL_RESULT_CHARS).collect();
        format!("{cut}\n[… cut at {MAX_TOOL_RESULT_CHARS} characters]")
    } else {
        text
    }
}

/// Runs a tool written in Lua or Rhai on the calling worker: a Lua tool on a warm VM of its
/// own, a Rhai tool from its compiled form, with the built-in file tools as its only tools.
async fn run_script_tool(
    env: &ToolEnv,
    name: &str,
    path: &std::path::Path,
    params: &Json,
    args: &Json,
) -> Result<Json, String> {
    let mut given = match args {
        Json::Object(m) => m.clone(),
        _ => return Err(format!("tool `{name}` takes an arguments object")),
    };
    crate::engine::executor::apply_param_defaults(name, params, &mut given)?;
    let source = crate::scripting::read_script(path)?;
    let source = &*source;
    if source.lang == crate::scripting::Lang::Lua {
        let cx = script_context(
            env,
            None,
            String::new(),
            String::new(),
            serde_json::json!({}),
            Vec::new(),
        );
        return crate::scripting::lua_api::call_tool(source, Json::Object(given), cx)
            .await
            .map_err(|e| e.to_string());
    }
    let mut globals = serde_json::Map::new();
    globals.insert("args".into(), Json::Object(given));
    let limits = crate::scripting::Limits::default();
    let host = rhai_host(builtin_env(env), None);
    crate::scripting::run_rhai_with_host(source, &globals, &limits, &host)
        .map_err(|e| e.to_string())
}

/// What the executor knows when it starts an agent task.
pub struct JobParts<'a> {
    pub workflow: &'a crate::workflow::Workflow,
    pub agent: &'a str,
    pub task: &'a str,
    /// The task's `prompt`, already rendered.
    pub prompt: String,
    pub output_schema: Option<Json>,
    pub inputs: &'a Json,
    pub run: &'a Json,
    pub run_id: &'a str,
    pub journal: SharedJournal,
    pub workspace: PathBuf,
    pub provider: Arc<dyn Provider>,
    pub fresh: bool,
    pub run_tokens: Arc<AtomicU64>,
    pub progress: Option<Progress>,
    pub secrets: Vec<String>,
    pub task_token_budget: Option<u64>,
    pub sandbox: Option<Arc<dyn crate::sandbox::Sandbox>>,
    pub memory: Option<Arc<memory::RunMemory>>,
    pub earlier_error: Option<String>,
}

/// The tools named in an agent's `tools:`, with the schemas the model sees.
pub fn agent_tools(
    wf: &crate::workflow::Workflow,
    names: &[String],
) -> Result<Vec<(ToolSpec, AgentTool)>, String> {
    let mut tools = Vec::new();
    for name in names {
        match wf.tools.get(name) {
            Some(t) => tools.push((
                script_spec(name, t.description.as_deref(), &t.params),
                AgentTool::Script {
                    path: t.script.clone(),
                    params: t.params.clone(),
                },
            )),
            None if name == "http.request" => tools.push((http_spec(), AgentTool::Http)),
            None if name == "memory.search" || name == "memory.store" => {
                let store = name == "memory.store";
                tools.push((memory::tool_spec(store), AgentTool::Memory { store }));
            }
            None if name == "sandbox.exec" => {
                tools.push((
                    sandbox_tools::exec_spec(),
                    AgentTool::Sandbox { test: false },
                ));
            }
            None if name == "sandbox.test" => {
                tools.push((
                    sandbox_tools::test_spec(),
                    AgentTool::Sandbox { test: true },
                ));
            }
            None if AGENT_TOOLS.contains(&name.as_str()) => {
                tools.push((scratch_spec(name), AgentTool::Scratch));
            }
            None => {
                let spec = builtin_spec(name).ok_or_else(|| format!("unknown tool `{name}`"))?;
                tools.push((spec, AgentTool::Builtin));
            }
        }
    }
    Ok(tools)
}

/// Renders the agent's system prompt and collects its tools and model settings.
pub fn build_job(parts: JobParts) -> Result<AgentJob, String> {
    let wf = parts.workflow;
    let decl = wf
        .agents
        .get(parts.agent)
        .ok_or_else(|| format!("unknown agent `{}`", parts.agent))?;
    let model = wf
        .models
        .get(&decl.model)
        .ok_or_else(|| format!("model `{}` is not declared", decl.model))?;
    let tools = agent_tools(wf, &decl.tools)?;
    let env = crate::prompt::environment(Some(&wf.dir));
    let base = serde_json::json!({ "inputs": parts.inputs, "run": parts.run, "memory": [] });
    let render = |text: &str| crate::prompt::render(&env, text, &base).map_err(|e| e.to_string());
    let role = decl
        .role
        .as_deref()
        .map(render)
        .transpose()?
        .unwrap_or_else(|| parts.agent.to_string());
    let goal = decl.goal.as_deref().map(render).transpose()?;
    let backstory = decl.backstory.as_deref().map(render).transpose()?;
    let tool_list: Vec<Json> = tools
        .iter()
        .map(|(s, _)| serde_json::json!({ "name": s.name, "description": s.description }))
        .collect();
    let mut context = base.clone();
    context["agent"] = serde_json::json!({
        "name": parts.agent, "role": role, "goal": goal,
        "backstory": backstory, "tools": tool_list,
    });
    context["task"] = serde_json::json!({ "id": parts.task, "prompt": parts.prompt });
    if let Some(schema) = &parts.output_schema {
        context["task"]["output_schema"] = schema.clone();
    }
    let system_prompt = SystemPrompt {
        template: decl.prompt.clone(),
        dir: wf.dir.clone(),
        context,
        default: default_system_prompt(&role, goal.as_deref(), parts.output_schema.as_ref()),
    };
    let system = system_prompt.render(&[])?;
    let settings = &model.settings;
    Ok(AgentJob {
        agent: parts.agent.to_string(),
        task: parts.task.to_string(),
        run_id: parts.run_id.to_string(),
        journal: parts.journal,
        workflow_dir: wf.dir.clone(),
        model: model.model.clone().unwrap_or_default(),
        temperature: settings.get("temperature").and_then(Json::as_f64),
        max_tokens: settings
            .get("max_tokens")
            .and_then(Json::as_u64)
            .map(|t| t.min(u32::MAX as u64) as u32),
        system,
        prompt: parts.prompt,
        tools,
        max_turns: decl.max_turns,
        json_tools: decl.json_tools,
        output_schema: parts.output_schema,
        workspace: parts.workspace,
        provider: parts.provider,
        fresh: parts.fresh,
        run_tokens: parts.run_tokens,
        token_budget: wf.budget.tokens,
        http_allow: wf.http_allow.clone(),
        progress: parts.progress,
        secrets: parts.secrets,
        task_token_budget: match (parts.task_token_budget, decl.token_budget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        sandbox: parts.sandbox,
        memory: parts.memory,
        system_prompt,
        earlier_error: parts.earlier_error,
    })
}

fn default_system_prompt(role: &str, goal: Option<&str>, schema: Option<&Json>) -> String {
    let mut s = format!("You are {role}.");
    if let Some(g) = goal {
        s.push_str(&format!(" Your goal: {g}."));
    }
    s.push_str(" Use the tools you are given when they help; when you are done, reply with the final answer only.");
    if let Some(schema) = schema {
        s.push_str(&format!(
            " The final answer must be a JSON object matching this JSON Schema: {schema}"
        ));
    }
    s
}

/// Tools only agents have, because they need the run's journal or its sandbox.
pub const AGENT_TOOLS: &[&str] = &[
    "scratch.get",
    "scratch.set",
    "http.request",
    "sandbox.exec",
    "sandbox.test",
    "memory.search",
    "memory.store",
];

/// Tools that run commands in the task's sandbox.
pub const SANDBOX_TOOLS: &[&str] = &["sandbox.exec", "sandbox.test"];

/// Whether a task of this kind runs commands in its sandbox: a `run` task, or an agent
/// with a sandbox tool.
pub fn needs_sandbox(wf: &crate::workflow::Workflow, kind: &crate::workflow::TaskKind) -> bool {
    match kind {
        crate::workflow::TaskKind::Run { .. } => true,
        crate::workflow::TaskKind::Agent { agent, .. } => wf
            .agents
            .get(agent)
            .is_some_and(|a| a.tools.iter().any(|t| SANDBOX_TOOLS.contains(&t.as_str()))),
        _ => false,
    }
}

/// Response bodies longer than this are cut (the model sees a note saying so).
const MAX_HTTP_BODY: usize = 256 * 1024;

fn http_spec() -> ToolSpec {
    ToolSpec {
        name: "http.request".into(),
        description: "Make an HTTP request to one of the hosts this workflow allows. Returns status, headers and the body as text.".into(),
        parameters: serde_json::json!({
            "type": "object",
            "required": ["url"],
            "properties": {
                "method": { "type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"], "default": "GET" },
                "url": { "type": "string", "description": "http:// or https:// URL" },
                "headers": { "type": "object", "additionalProperties": { "type": "string" } },
                "body": { "type": "string" }
            }
        }),
    }
}

/// `http.request`: only to allowed hosts, no redirects (they could lead elsewhere), bounded
/// in time and size.
async fn http_request(allow: &[String], args: &Json) -> Result<Json, String> {
    let url = args
        .get("url")
        .and_then(Json::as_str)
        .ok_or("`url` (a string) is required")?;
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid url `{url}`: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "only http and https URLs are allowed, not `{}`",
            parsed.scheme()
        ));
    }
    let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
    let with_port = parsed.port().map(|p| format!("{host}:{p}"));
    let allowed = allow
        .iter()
        .any(|a| *a == host || Some(a) == with_port.as_ref());
    if !allowed {
        return Err(format!(
            "host `{}` is not in this workflow's `http.allow` ({})",
            with_port.unwrap_or(host),
            allow.join(", ")
        ));
    }
    let method = args
        .get("method")
        .and_then(Json::as_str)
        .unwrap_or("GET")
        .to_ascii_uppercase();
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("invalid method `{method}`"))?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = client.request(method, parsed);
    if let Some(Json::Object(headers)) = args.get("headers") {
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str().unwrap_or_default());
        }
    }
    if let Some(body) = args.get("body").and_then(Json::as_str) {
        request = request.body(body.to_string());
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    let headers: serde_json::Map<String, Json> = response
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.to_string(), Json::String(v.to_str().ok()?.to_string()))))
        .collect();
    // Read at most MAX_HTTP_BODY bytes: a huge response must not exhaust memory.
    let mut bytes = Vec::new();
    let mut truncated = false;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the body failed: {e}"))?
    {
        let room = MAX_HTTP_BODY - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        bytes.extend_from_slice(&chunk);
    }
    let body = String::from_utf8_lossy(&bytes).into_owned();
    Ok(
        serde_json::json!({ "status": status, "headers": headers, "body": body, "truncated": truncated }),
    )
}

fn scratch_spec(name: &str) -> ToolSpec {
    let (description, parameters) = if name == "scratch.set" {
        (
            "Store a value under a key in this task's scratchpad; it survives a resumed run.",
            serde_json::json!({ "type": "object", "required": ["key", "value"], "properties": {
                "key": { "type": "string" }, "value": { "description": "any JSON value" } } }),
        )
    } else {
        (
            "Read a value stored with scratch.set in this task's scratchpad (null when absent).",
            serde_json::json!({ "type": "object", "required": ["key"], "properties": {
                "key": { "type": "string" } } }),
        )
    };
    ToolSpec {
        name: name.to_string(),
        description: description.to_string(),
        parameters,
    }
}

fn scratch(env: &ToolEnv, name: &str, args: &Json) -> Result<Json, String> {
    let key = args
        .get("key")
        .and_then(Json::as_str)
        .ok_or("`key` (a string) is required")?;
    if name == "scratch.set" {
        let value = args.get("value").cloned().unwrap_or(Json::Null);
        env.scratch_set(key, &value)?;
        Ok(serde_json::json!({ "stored": key }))
    } else {
        Ok(env.scratch_get(key)?.unwrap_or(Json::Null))
    }
}

/// The host side of a script's `ctx`: tools through [`invoke`], the scratchpad and logs in the
/// journal, templates from the workflow's directory.
pub fn script_context(
    env: &ToolEnv,
    provider: Option<Arc<dyn Provider>>,
    model: String,
    agent: String,
    task: Json,
    tools: Vec<ToolSpec>,
) -> crate::scripting::lua_api::ScriptContext {
    // Without a declared tool list a script may use the built-in file tools.
    let (env, specs) = if tools.is_empty() {
        (builtin_env(env), Arc::clone(builtin_specs()))
    } else {
        (env.clone(), tools.into())
    };
    let env = Arc::new(env);
    let call_env = env.clone();
    let (get_env, set_env, log_env, memory_env) =
        (env.clone(), env.clone(), env.clone(), env.clone());
    let dir = env.workflow_dir.clone();
    crate::scripting::lua_api::ScriptContext {
        task,
        provider,
        model,
        agent,
        call_tool: Arc::new(move |name, args| {
            let env = call_env.clone();
            Box::pin(async move { invoke(&env, &name, &args).await })
        }),
        tools: specs,
        scratch_get: Arc::new(move |key| get_env.scratch_get(key)),
        scratch_set: Arc::new(move |key, value| set_env.scratch_set(key, value)),
        render: Arc::new(move |template, vars| render_for_script(&dir, template, vars)),
        log: Arc::new(move |text| log_env.log(text)),
        usage: Arc::new(std::sync::Mutex::new(Usage::default())),
        memory: memory_env.memory.is_some().then(|| {
            Arc::new(move |op: String, args: Json| {
                let env = memory_env.clone();
                Box::pin(async move { memory::tool(&env, op == "store", &args).await })
                    as crate::llm::BoxFuture<'static, Result<Json, String>>
            }) as crate::scripting::lua_api::ToolCaller
        }),
    }
}

/// `ctx:render` / Rhai's `render`: a template file below the workflow's directory, or text.
fn render_for_script(dir: &std::path::Path, template: &str, vars: &Json) -> Result<String, String> {
    let templates = crate::prompt::environment(Some(dir));
    if !template.contains('\n') && dir.join(template).is_file() {
        let name = template.replace('\\', "/");
        templates
            .get_template(&name)
            .and_then(|t| t.render(vars))
            .map_err(|e| format!("{template}: {e}"))
    } else {
        crate::prompt::render(&templates, template, vars).map_err(|e| e.to_string())
    }
}

/// A Lua agent's model calls, journaled like an LLM agent's turns: a resumed script gets
/// the replies of calls it had already made (by call number) without asking the model again.
pub struct JournaledProvider {
    pub inner: Arc<dyn Provider>,
    pub journal: SharedJournal,
    pub run_id: String,
    pub task: String,
    pub secrets: Vec<String>,
}

impl Provider for JournaledProvider {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn chat<'a>(
        &'a self,
        request: &'a crate::llm::ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> crate::llm::BoxFuture<'a, Result<crate::llm::ChatResponse, crate::llm::LlmError>> {
        Box::pin(async move {
            let journal_error = |e: String| crate::llm::LlmError::Scripted(format!("journal: {e}"));
            let earlier = {
                let j = self
                    .journal
                    .lock()
                    .map_err(|_| journal_error("unusable".into()))?;
                j.turns(&self.run_id, &self.task)
                    .map_err(|e| journal_error(e.to_string()))?
            };
            if let Some((stored, _, _)) = earlier.get(request.turn.saturating_sub(1) as usize) {
                if let Ok(reply) =
                    serde_json::from_value::<crate::llm::ChatResponse>(stored["reply"].clone())
                {
                    return Ok(reply);
                }
            }
            let reply = self.inner.chat(request, on_token).await?;
            let text = crate::llm::redact(
                &serde_json::json!({ "reply": reply }).to_string(),
                &self.secrets,
            );
            let stored: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
            let j = self
                .journal
                .lock()
                .map_err(|_| journal_error("unusable".into()))?;
            j.append_turn(
                &self.run_id,
                &self.task,
                request.turn,
                &stored,
                (reply.usage.input_tokens, reply.usage.output_tokens),
            )
            .map_err(|e| journal_error(e.to_string()))?;
            Ok(reply)
        })
    }
}

/// The environment with only the built-in file tools (what scripted tools may call).
pub fn builtin_env(env: &ToolEnv) -> ToolEnv {
    static BUILTINS: OnceLock<Arc<HashMap<String, AgentTool>>> = OnceLock::new();
    let builtins = BUILTINS.get_or_init(|| {
        Arc::new(
            tools::builtins()
                .iter()
                .map(|b| (b.name.to_string(), AgentTool::Builtin))
                .collect(),
        )
    });
    ToolEnv {
        workspace: env.workspace.clone(),
        workflow_dir: env.workflow_dir.clone(),
        journal: env.journal.clone(),
        run_id: env.run_id.clone(),
        task: env.task.clone(),
        http_allow: env.http_allow.clone(),
        tools: Arc::clone(builtins),
        sandbox: None,
        memory: env.memory.clone(),
        agent: env.agent.clone(),
        secrets: Arc::clone(&env.secrets),
    }
}

/// The schemas of the built-in file tools, made once.
fn builtin_specs() -> &'static Arc<[ToolSpec]> {
    static SPECS: OnceLock<Arc<[ToolSpec]>> = OnceLock::new();
    SPECS.get_or_init(|| {
        tools::builtins()
            .iter()
            .filter_map(|b| builtin_spec(b.name))
            .collect()
    })
}

/// Rhai's host functions over a tool environment. Built-in file tools are called directly;
/// other tools are async, and are driven to completion on the runtime, which only a script
/// on a blocking thread may do (a Rhai tool, which runs on a worker, has only built-ins).
pub fn rhai_host(
    env: ToolEnv,
    model: Option<(Arc<dyn Provider>, String)>,
) -> crate::scripting::Host {
    let env = Arc::new(env);
    let handle = tokio::runtime::Handle::try_current().ok();
    let dir = env.workflow_dir.clone();
    let chat: Option<crate::scripting::HostChat> = match (model, handle.clone()) {
        (Some((provider, model)), Some(handle)) => {
            let task = env.task.clone();
            let turn = Arc::new(std::sync::atomic::AtomicU32::new(0));
            Some(Arc::new(move |request: Json| {
                let messages = match request.get("messages") {
                    Some(m) => serde_json::from_value::<Vec<Message>>(m.clone()).map_err(|e| {
                        format!("llm_chat: `messages` must be [#{{role, content}}]: {e}")
                    })?,
                    None => Vec::new(),
                };
                let request = ChatRequest {
                    model: model.clone(),
                    system: request
                        .get("system")
                        .and_then(Json::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    messages,
                    json: request.get("json").and_then(Json::as_bool).unwrap_or(false),
                    task: task.clone(),
                    agent: "script".into(),
                    turn: turn.fetch_add(1, Ordering::Relaxed) + 1,
                    ..ChatRequest::default()
                };
                let reply = handle
                    .block_on(provider.chat(&request, None))
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({
                    "content": reply.content,
                    "json": crate::llm::parse_json_reply(&reply.content).ok(),
                    "usage": reply.usage,
                }))
            }))
        }
        _ => None,
    };
    let (call_env, get_env, set_env, log_env) = (env.clone(), env.clone(), env.clone(), env);
    crate::scripting::Host {
        call_tool: Arc::new(
            move |name, args| match (call_env.tools.get(name), &handle) {
                (None, _) => Err(unknown_tool(&call_env, name)),
                (Some(AgentTool::Builtin), _) => {
                    let cx = ToolContext {
                        workspace: call_env.workspace.clone(),
                    };
                    tools::call_builtin(name, &args, &cx).map_err(|e| e.to_string())
                }
                (_, Some(handle)) => handle.block_on(invoke(&call_env, name, &args)),
                (_, None) => Err("tools need the engine's runtime".into()),
            },
        ),
        scratch_get: Arc::new(move |key| get_env.scratch_get(key)),
        scratch_set: Arc::new(move |key, value| set_env.scratch_set(key, value)),
        log: Arc::new(move |text| log_env.log(text)),
        render: Arc::new(move |template, vars| render_for_script(&dir, template, vars)),
        chat,
    }
}

/// The schema the model sees for each built-in tool.
pub fn builtin_spec(name: &str) -> Option<ToolSpec> {
    tools::builtins()
        .iter()
        .find(|b| b.name == name)
        .map(|b| ToolSpec {
            name: b.name.to_string(),
            description: b.description.to_string(),
            parameters: (b.params)(),
        })
}

/// The schema of a scripted tool from its declared `params`.
pub fn script_spec(name: &str, description: Option<&str>, params: &Json) -> ToolSpec {
    let mut properties = serde_json::Map::new();
    let mut required = Vec::new();
    if let Json::Object(p) = params {
        for (k, v) in p {
            let ty = match v.get("type").and_then(Json::as_str).unwrap_or("string") {
                "list" => "array",
                "object" => "object",
                other => other,
            };
            let mut prop = serde_json::json!({ "type": ty });
            if let Some(d) = v.get("description") {
                prop["description"] = d.clone();
            }
            if let Some(e) = v.get("enum") {
                prop["enum"] = e.clone();
            }
            if v.get("default").is_none() {
                required.push(Json::String(k.clone()));
            }
            properties.insert(k.clone(), prop);
        }
    }
    ToolSpec {
        name: name.to_string(),
        description: description.unwrap_or("").to_string(),
        parameters: serde_json::json!({ "type": "object", "properties": properties, "required": required }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_json_answers_are_accepted() {
        assert_eq!(
            crate::llm::parse_json_reply("```json\n{\"a\": 1}\n```").ok(),
            Some(serde_json::json!({"a": 1}))
        );
        assert!(crate::llm::parse_json_reply("sure! {\"a\": 1}").is_err());
    }

    #[test]
    fn script_tools_publish_required_params() {
        let spec = script_spec(
            "loc",
            Some("Count lines"),
            &serde_json::json!({"glob": {"type": "string", "default": "*"}, "dir": {"type": "string"}}),
        );
        assert_eq!(spec.parameters["required"], serde_json::json!(["dir"]));
    }
}
