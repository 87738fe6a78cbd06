//! Performing one attempt of a leaf task: a command, a script, a tool, a sub-workflow.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::executor::{run_child, ExecOptions};
use crate::sandbox::{ExecRequest, Sandbox};
use crate::scripting::{self, Limits, ScriptErrorKind, ScriptSource};
use crate::tools::{self, ToolContext};
use crate::workflow::units::human_duration;
use crate::workflow::ErrorClass;

/// Bytes of stdout and stderr kept per command on the host backend.
pub const OUTPUT_LIMIT: usize = 1 << 20;

/// Everything one attempt needs, rendered and owned, so it can run on another task.
pub enum Work {
    Run {
        command: String,
        env: Vec<(String, String)>,
        workdir: PathBuf,
        sandbox: std::sync::Arc<dyn Sandbox>,
    },
    Script {
        source: ScriptSource,
        globals: serde_json::Map<String, Json>,
        timeout: Option<Duration>,
        /// Rhai's host functions (tools, scratchpad, log).
        host: Option<crate::scripting::Host>,
    },
    /// A built-in tool.
    Tool {
        name: String,
        args: Json,
        workspace: PathBuf,
    },
    Workflow {
        path: PathBuf,
        inputs: Vec<(String, Json)>,
        run_id: String,
        parent: String,
        opts: ExecOptions,
    },
    Agent(Box<crate::agents::AgentJob>),
    /// A Lua agent: its source, its `ctx`, its limits.
    ScriptAgent(
        Box<(
            ScriptSource,
            crate::scripting::lua_api::ScriptContext,
            Limits,
        )>,
    ),
    /// A workflow-declared (script) tool called by a `tool:` task.
    CustomTool {
        env: crate::agents::ToolEnv,
        name: String,
        args: Json,
    },
}

#[derive(Debug, Clone)]
pub struct WorkError {
    pub class: ErrorClass,
    pub message: String,
}

type Logs = Vec<(String, String)>;

/// What one attempt left: its result, captured output, and the LLM tokens it used.
pub struct Finished {
    pub result: Result<Json, WorkError>,
    pub logs: Logs,
    pub usage: Option<crate::llm::Usage>,
}

impl Finished {
    fn of(result: Result<Json, WorkError>) -> Finished {
        Finished {
            result,
            logs: Vec::new(),
            usage: None,
        }
    }
}

/// Runs one attempt; dropping the future stops the work (processes killed, scripts cancelled).
pub async fn perform(work: Work, cancel: Arc<AtomicBool>) -> Finished {
    match work {
        Work::Run {
            command,
            env,
            workdir,
            sandbox,
        } => {
            let (result, logs) = run_command(&*sandbox, command, env, workdir).await;
            Finished {
                result,
                logs,
                usage: None,
            }
        }
        Work::Script {
            source,
            globals,
            timeout,
            host,
        } => Finished::of(run_script(source, globals, timeout, cancel, host).await),
        Work::Tool {
            name,
            args,
            workspace,
        } => Finished::of(run_tool(name, args, workspace).await),
        Work::Workflow {
            path,
            inputs,
            run_id,
            parent,
            opts,
        } => Finished::of(run_child(path, inputs, run_id, parent, opts).await),
        Work::ScriptAgent(job) => {
            let (source, cx, mut limits) = *job;
            limits.cancel = cancel;
            let usage = cx.usage.clone();
            let result = crate::scripting::lua_api::run_agent(&source, cx, &limits).await;
            let usage = usage.lock().map(|u| *u).ok().filter(|u| u.total() > 0);
            Finished {
                result: result.map_err(|e| WorkError {
                    class: if e.kind == ScriptErrorKind::Timeout {
                        ErrorClass::Timeout
                    } else {
                        ErrorClass::Script
                    },
                    message: e.to_string(),
                }),
                logs: Vec::new(),
                usage,
            }
        }
        Work::CustomTool { env, name, args } => Finished::of(
            crate::agents::invoke(&env, &name, &args)
                .await
                .map_err(|message| WorkError {
                    class: ErrorClass::Tool,
                    message,
                }),
        ),
        Work::Agent(job) => match crate::agents::run(*job).await {
            Ok(outcome) => Finished {
                result: Ok(outcome.output),
                logs: Vec::new(),
                usage: Some(outcome.usage),
            },
            Err(e) => Finished::of(Err(WorkError {
                class: if e.budget {
                    ErrorClass::Budget
                } else {
                    ErrorClass::Agent
                },
                message: e.message,
            })),
        },
    }
}

async fn run_command(
    sandbox: &dyn Sandbox,
    command: String,
    env: Vec<(String, String)>,
    workdir: PathBuf,
) -> (Result<Json, WorkError>, Logs) {
    let request = ExecRequest {
        command,
        workdir,
        env,
        timeout: None,
        output_limit: OUTPUT_LIMIT,
    };
    let out = match sandbox.exec(request).await {
        Ok(out) => out,
        Err(e) => {
            return (
                Err(WorkError {
                    class: ErrorClass::ExitCode,
                    message: e.to_string(),
                }),
                Vec::new(),
            )
        }
    };
    let logs = vec![
        ("stdout".to_string(), out.stdout.clone()),
        ("stderr".to_string(), out.stderr.clone()),
    ];
    let value = serde_json::json!({
        "exit_code": out.exit_code,
        "stdout": out.stdout,
        "stderr": out.stderr,
    });
    let failure = match (out.exit_code, out.signal) {
        (Some(0), _) => None,
        (Some(code), _) => Some(format!("exit code {code}")),
        (None, Some(sig)) => Some(format!("killed by signal {sig}")),
        (None, None) => Some("the command ended without an exit status".to_string()),
    };
    let result = match failure {
        None => Ok(value),
        Some(what) => {
            // A limit the sandbox saw says more than the signal it killed with.
            let what = match &out.limit {
                Some(limit) => format!("{what}, {limit}"),
                None => what,
            };
            Err(WorkError {
                class: if out.timed_out {
                    ErrorClass::Timeout
                } else {
                    ErrorClass::ExitCode
                },
                message: exit_message(&what, &out.stderr),
            })
        }
    };
    (result, logs)
}

/// The failure with the last lines of stderr, which usually say why.
fn exit_message(what: &str, stderr: &str) -> String {
    let tail: Vec<&str> = stderr
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect();
    if tail.is_empty() {
        what.to_string()
    } else {
        let lines: Vec<&str> = tail.into_iter().rev().collect();
        format!("{what}: {}", lines.join(" | "))
    }
}

async fn run_script(
    source: ScriptSource,
    globals: serde_json::Map<String, Json>,
    timeout: Option<Duration>,
    cancel: Arc<AtomicBool>,
    host: Option<scripting::Host>,
) -> Result<Json, WorkError> {
    let limits = Limits {
        deadline: timeout.map(|t| Instant::now() + t),
        cancel,
        ..Limits::default()
    };
    let joined = tokio::task::spawn_blocking(move || match &host {
        Some(host) => scripting::run_rhai_with_host(&source, &globals, &limits, host),
        None => scripting::run_on_current_thread(&source, &globals, &limits),
    })
    .await;
    match joined {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) if e.kind == ScriptErrorKind::Timeout => Err(WorkError {
            class: ErrorClass::Timeout,
            message: format!(
                "timed out after {} ({e})",
                human_duration(timeout.unwrap_or_default())
            ),
        }),
        Ok(Err(e)) => Err(WorkError {
            class: ErrorClass::Script,
            message: e.to_string(),
        }),
        Err(e) => Err(WorkError {
            class: ErrorClass::Script,
            message: format!("script thread failed: {e}"),
        }),
    }
}

/// A built-in tool called by a `tool:` task (declared tools run as `CustomTool`).
async fn run_tool(name: String, args: Json, workspace: PathBuf) -> Result<Json, WorkError> {
    let tool_error = |message: String| WorkError {
        class: ErrorClass::Tool,
        message,
    };
    let joined = tokio::task::spawn_blocking(move || {
        tools::call_builtin(&name, &args, &ToolContext { workspace })
    })
    .await;
    match joined {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(tool_error(e.to_string())),
        Err(e) => Err(tool_error(format!("tool thread failed: {e}"))),
    }
}
