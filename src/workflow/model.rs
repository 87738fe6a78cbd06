//! The validated workflow: every name resolved, every file found, every template parsed.

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use serde_json::Value as Json;

use crate::diagnostic::Pos;
use crate::scripting::ScriptSource;

/// Index of a task in `Workflow::tasks`.
pub type TaskIx = usize;

#[derive(Debug, Clone)]
pub struct Workflow {
    /// The path as the user gave it, for messages.
    pub file: PathBuf,
    /// Directory that relative paths in the workflow are resolved against.
    pub dir: PathBuf,
    pub source: String,
    /// SHA-256 of the file text, to detect a workflow changed under a run.
    pub hash: String,
    pub name: String,
    pub description: Option<String>,
    pub inputs: IndexMap<String, InputDecl>,
    pub models: IndexMap<String, ModelDecl>,
    pub agents: IndexMap<String, AgentDecl>,
    pub tools: IndexMap<String, ToolDecl>,
    pub sandbox: SandboxChoice,
    pub secrets: Vec<String>,
    /// Non-secret environment variables templates may read, with optional defaults.
    pub env: IndexMap<String, Option<String>>,
    pub budget: Budget,
    pub schedule: Option<Schedule>,
    pub history: History,
    pub memory: Json,
    /// Named concurrency limits shared by tasks (`concurrency: { llm: 2 }`).
    pub concurrency: IndexMap<String, usize>,
    /// Hosts the `http.request` tool may reach (`http: { allow: [...] }`).
    pub http_allow: Vec<String>,
    /// All tasks in declaration order (a parent before its children).
    pub tasks: Vec<TaskDecl>,
    pub roots: Vec<TaskIx>,
    /// Task index by full id.
    pub index: std::collections::HashMap<String, TaskIx>,
}

impl Workflow {
    pub fn task_by_id(&self, id: &str) -> Option<TaskIx> {
        self.index.get(id).copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputType {
    String,
    Integer,
    Number,
    Boolean,
    List,
    Object,
}

impl InputType {
    pub const NAMES: &'static [&'static str] =
        &["string", "integer", "number", "boolean", "list", "object"];

    pub fn parse(name: &str) -> Option<InputType> {
        Some(match name {
            "string" => InputType::String,
            "integer" => InputType::Integer,
            "number" => InputType::Number,
            "boolean" => InputType::Boolean,
            "list" => InputType::List,
            "object" => InputType::Object,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            InputType::String => "string",
            InputType::Integer => "integer",
            InputType::Number => "number",
            InputType::Boolean => "boolean",
            InputType::List => "list",
            InputType::Object => "object",
        }
    }

    pub fn accepts(self, value: &Json) -> bool {
        match self {
            InputType::String => value.is_string(),
            InputType::Integer => value.is_i64() || value.is_u64(),
            InputType::Number => value.is_number(),
            InputType::Boolean => value.is_boolean(),
            InputType::List => value.is_array(),
            InputType::Object => value.is_object(),
        }
    }

    /// Converts command-line text (`-i key=value`) to a value of this type.
    pub fn from_cli(self, text: &str) -> Result<Json, String> {
        let expected = || format!("expected {}, got `{text}`", self.name());
        match self {
            InputType::String => Ok(Json::String(text.to_string())),
            InputType::Integer => text
                .trim()
                .parse::<i64>()
                .map(Json::from)
                .map_err(|_| expected()),
            InputType::Number => match text.trim().parse::<i64>() {
                // Whole numbers stay integers so they compare equal to `enum: [1, 2]`.
                Ok(i) => Ok(Json::from(i)),
                Err(_) => text
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Json::Number)
                    .ok_or_else(expected),
            },
            InputType::Boolean => match text.trim() {
                "true" | "yes" | "1" => Ok(Json::Bool(true)),
                "false" | "no" | "0" => Ok(Json::Bool(false)),
                _ => Err(expected()),
            },
            InputType::List | InputType::Object => {
                let v: Json = serde_json::from_str(text)
                    .map_err(|e| format!("expected a JSON {}: {e}", self.name()))?;
                if self.accepts(&v) {
                    Ok(v)
                } else {
                    Err(expected())
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct InputDecl {
    pub ty: InputType,
    pub default: Option<Json>,
    pub choices: Option<Vec<Json>>,
    pub description: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ModelDecl {
    pub provider: String,
    pub model: Option<String>,
    pub settings: Json,
}

#[derive(Debug, Clone)]
pub struct AgentDecl {
    pub role: Option<String>,
    pub goal: Option<String>,
    pub backstory: Option<String>,
    pub prompt: Option<PromptRef>,
    pub tools: Vec<String>,
    pub model: String,
    pub max_turns: u32,
    /// Tools described in the prompt and called with JSON replies, not the API's tool calling.
    pub json_tools: bool,
    /// Tokens each task of this agent may use.
    pub token_budget: Option<u64>,
    pub script: Option<PathBuf>,
    pub description: Option<String>,
}

#[derive(Debug, Clone)]
pub enum PromptRef {
    Inline(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ToolDecl {
    pub script: PathBuf,
    pub description: Option<String>,
    pub params: Json,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum SandboxChoice {
    /// No sandbox declared: `run` tasks are refused at validation.
    #[default]
    Unset,
    /// `sandbox: host`: explicit opt-in to host processes.
    Host,
    /// A container profile (executed by the Docker backend).
    Profile(Json),
}

#[derive(Debug, Clone, Default)]
pub struct Budget {
    pub tokens: Option<u64>,
    pub usd: Option<f64>,
    pub wall: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub cron: String,
    pub overlap: String,
    pub catchup: String,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    pub keep_days: Option<u32>,
    pub keep_runs: Option<u32>,
}

/// Which failures a retry applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Timeout,
    ExitCode,
    Script,
    Tool,
    Workflow,
    Agent,
    Output,
    /// A run budget ran out: never retried, and the run stops.
    Budget,
}

impl ErrorClass {
    pub const NAMES: &'static [&'static str] = &[
        "any",
        "timeout",
        "exit_code",
        "script",
        "tool",
        "workflow",
        "agent",
        "output",
    ];

    pub fn parse(name: &str) -> Option<Vec<ErrorClass>> {
        use ErrorClass::*;
        Some(match name {
            "any" => vec![Timeout, ExitCode, Script, Tool, Workflow, Agent, Output],
            "timeout" => vec![Timeout],
            "exit_code" => vec![ExitCode],
            "script" => vec![Script],
            "tool" => vec![Tool],
            "workflow" => vec![Workflow],
            "agent" => vec![Agent],
            "output" => vec![Output],
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Timeout => "timeout",
            ErrorClass::ExitCode => "exit_code",
            ErrorClass::Script => "script",
            ErrorClass::Tool => "tool",
            ErrorClass::Workflow => "workflow",
            ErrorClass::Agent => "agent",
            ErrorClass::Output => "output",
            ErrorClass::Budget => "budget",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    /// Total attempts, the first included (1 = no retry).
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub jitter: bool,
    pub on: Vec<ErrorClass>,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 1,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            jitter: true,
            on: ErrorClass::parse("any").unwrap_or_default(),
        }
    }
}

impl Retry {
    /// Exponential backoff before attempt `next_attempt` (2 = first retry), with ±25% jitter.
    pub fn delay_before(&self, next_attempt: u32, jitter_unit: f64) -> Duration {
        let exponent = next_attempt.saturating_sub(2).min(30);
        let base = self
            .backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff);
        let delay = if self.jitter {
            base.mul_f64(0.75 + 0.5 * jitter_unit.clamp(0.0, 1.0))
        } else {
            base
        };
        delay.min(self.max_backoff)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputParse {
    Text,
    Json,
    Lines,
}

#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub parse: Option<OutputParse>,
    pub schema: Option<Json>,
}

#[derive(Debug, Clone)]
pub enum TaskKind {
    Agent {
        agent: String,
        prompt: String,
        /// The agent plans subtasks that become this task's children at run time.
        decompose: bool,
        /// Tokens this task may use.
        token_budget: Option<u64>,
    },
    Run {
        command: String,
        env: IndexMap<String, String>,
    },
    Script {
        source: ScriptSource,
    },
    Tool {
        tool: String,
        with: Json,
    },
    Workflow {
        path: PathBuf,
        with: IndexMap<String, Json>,
    },
    Approve {
        message: String,
    },
    Group,
}

impl TaskKind {
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Agent { .. } => "agent",
            TaskKind::Run { .. } => "run",
            TaskKind::Script { .. } => "script",
            TaskKind::Tool { .. } => "tool",
            TaskKind::Workflow { .. } => "workflow",
            TaskKind::Approve { .. } => "approve",
            TaskKind::Group => "group",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TaskDecl {
    /// Full dotted id (`qa.unit`); unique in the workflow.
    pub id: String,
    pub pos: Pos,
    pub parent: Option<TaskIx>,
    pub children: Vec<TaskIx>,
    pub needs: Vec<TaskIx>,
    pub when: Option<String>,
    pub for_each: Option<String>,
    pub max_parallel: Option<usize>,
    pub retry: Retry,
    pub timeout: Option<Duration>,
    pub continue_on_error: bool,
    pub concurrency: Option<String>,
    pub output: Option<OutputSpec>,
    pub sandbox: SandboxChoice,
    pub kind: TaskKind,
}

impl TaskDecl {
    /// The last segment of the id: the key under `tasks:`.
    pub fn key(&self) -> &str {
        self.id.rsplit('.').next().unwrap_or(&self.id)
    }
}
