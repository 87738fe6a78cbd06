//! The `helix` command line: parses arguments, runs a command, maps outcomes to exit codes.
//!
//! Exit codes: 0 success, 1 a task failed, 2 invalid input or usage, 3 waiting for an
//! approval, 130 interrupted.

mod init;
mod memory;
mod plan;
mod runs;
mod sandbox;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::codes::Code;
use crate::diagnostic::{Diagnostic, Report};
use crate::engine::{self, ExecOptions, RunSpec, RunStatus, RunSummary};
use crate::store::{self, Journal};
use crate::ui::{self, OutputMode};
use crate::workflow::{self, units::human_duration, Workflow};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
pub const EXIT_WAITING: i32 = 3;
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser)]
#[command(
    name = "helix",
    version,
    about = "Declarative multi-agent workflows",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// How many tasks run at once.
    #[arg(long, default_value_t = 8)]
    max_parallel: usize,
    /// Approve every `approve:` gate without asking.
    #[arg(long)]
    approve_all: bool,
    /// Output: live progress (tty), plain lines, or NDJSON events (json).
    #[arg(long, value_enum)]
    output: Option<OutputMode>,
    /// Record every LLM request and reply of the run into this cassette file.
    #[arg(long, value_name = "FILE", conflicts_with = "replay")]
    record: Option<PathBuf>,
    /// Answer every LLM request from this cassette instead of the models (no network).
    #[arg(long, value_name = "FILE")]
    replay: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check workflow files; exit 2 on errors.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show the resolved task tree without running anything.
    Plan {
        file: PathBuf,
        /// Input value, `name=value` (repeatable).
        #[arg(short = 'i', long = "input", value_name = "NAME=VALUE")]
        inputs: Vec<String>,
    },
    /// Run a workflow.
    Apply {
        file: PathBuf,
        #[arg(short = 'i', long = "input", value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Continue a run after a crash, an interruption or an approval gate.
    Resume {
        /// Run id (a unique prefix works; `latest` for the newest run).
        run_id: String,
        /// Approve this waiting gate (repeatable).
        #[arg(long, value_name = "TASK")]
        approve: Vec<String>,
        /// Reject this waiting gate (repeatable).
        #[arg(long, value_name = "TASK")]
        reject: Vec<String>,
        /// Resume even though the workflow file changed since the run started.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Re-run failed work of a finished run, keeping successes.
    Retry {
        run_id: String,
        /// Also re-run this task and everything that depends on it.
        #[arg(long, value_name = "TASK")]
        from: Option<String>,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run history from the journal.
    Runs {
        #[command(subcommand)]
        command: Option<runs::RunsCommand>,
    },
    /// Inspect and manage long-term memory.
    Memory {
        #[command(subcommand)]
        command: memory::MemoryCommand,
    },
    /// Sandbox images, checks and orphan cleanup.
    Sandbox {
        #[command(subcommand)]
        command: sandbox::SandboxCommand,
    },
    /// Print the JSON Schema of the workflow format.
    Schema,
    /// Explain an error code, e.g. `helix explain HX0010`.
    Explain { code: Option<String> },
    /// Create a project with a working example workflow.
    Init {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                EXIT_INVALID
            } else {
                EXIT_OK
            };
        }
    };
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Plan { file, inputs } => plan::plan(&file, &inputs),
        Command::Apply { file, inputs, run } => apply(&file, &inputs, &run),
        Command::Resume {
            run_id,
            approve,
            reject,
            force,
            run,
        } => resume(&run_id, &approve, &reject, force, None, &run),
        Command::Retry {
            run_id,
            from,
            force,
            run,
        } => resume(&run_id, &[], &[], force, from.as_deref(), &run),
        Command::Runs { command } => {
            runs::runs(command.unwrap_or(runs::RunsCommand::List { limit: 20 }))
        }
        Command::Sandbox { command } => sandbox::sandbox(command),
        Command::Memory { command } => memory::memory(command),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&workflow::spec::json_schema()).unwrap_or_default()
            );
            EXIT_OK
        }
        Command::Explain { code } => explain(code.as_deref()),
        Command::Init { dir } => init::init(&dir),
    }
}

fn explain(code: Option<&str>) -> i32 {
    match code {
        None => {
            for c in Code::ALL {
                println!("{c}  {}", c.title());
            }
            EXIT_OK
        }
        Some(text) => match Code::parse(text) {
            Some(c) => {
                println!("{c}: {}\n\n{}", c.title(), c.page());
                EXIT_OK
            }
            None => {
                eprintln!("error: unknown error code `{text}`; `helix explain` lists them");
                EXIT_INVALID
            }
        },
    }
}

pub(crate) fn print_report(report: &Report) {
    eprint!("{}", report.render());
}

fn validate(files: &[PathBuf]) -> i32 {
    let mut failed = false;
    for file in files {
        match workflow::load(file) {
            Ok(w) => println!(
                "{}: ok ({} task{})",
                file.display(),
                w.tasks.len(),
                if w.tasks.len() == 1 { "" } else { "s" }
            ),
            Err(report) => {
                failed = true;
                print_report(&report);
            }
        }
    }
    if failed {
        EXIT_INVALID
    } else {
        EXIT_OK
    }
}

pub(crate) fn parse_input_args(
    file: &Path,
    args: &[String],
) -> Result<Vec<(String, String)>, Report> {
    let mut out = Vec::new();
    let mut report = Report::default();
    for a in args {
        match a.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => out.push((k.trim().to_string(), v.to_string())),
            _ => report.push(Diagnostic::new(
                Code::Input,
                file,
                None,
                format!("input `{a}` must be written `name=value`"),
            )),
        }
    }
    if report.is_empty() {
        Ok(out)
    } else {
        Err(report)
    }
}

fn output_mode(requested: Option<OutputMode>) -> OutputMode {
    requested.unwrap_or_else(|| {
        if std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
            OutputMode::Tty
        } else {
            OutputMode::Plain
        }
    })
}

fn open_journal() -> Result<(Journal, PathBuf), i32> {
    // Absolute, so `run.dir` and `run.workspace` stay right inside a task's working directory.
    let home = std::path::absolute(store::home()).unwrap_or_else(|_| store::home());
    match Journal::open(&home) {
        Ok(j) => Ok((j, home)),
        Err(e) => {
            eprintln!("error[{}]: {e}", Code::Journal);
            Err(EXIT_INVALID)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Scripts run on the blocking pool's threads and need room for deep recursion.
        .thread_stack_size(crate::scripting::SCRIPT_STACK_BYTES)
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            EXIT_FAILED
        })
}

fn apply(file: &Path, input_args: &[String], args: &RunArgs) -> i32 {
    let wf = match workflow::load(file) {
        Ok(w) => w,
        Err(report) => {
            print_report(&report);
            return EXIT_INVALID;
        }
    };
    let inputs = match parse_input_args(file, input_args)
        .and_then(|given| workflow::resolve_inputs(&wf, &given))
    {
        Ok(i) => i,
        Err(report) => {
            print_report(&report);
            return EXIT_INVALID;
        }
    };
    let missing: Vec<&str> = wf
        .secrets
        .iter()
        .filter(|s| std::env::var_os(s).is_none())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        let d = Diagnostic::new(
            Code::Input,
            file,
            None,
            format!(
                "secret{} not set in the environment: {}",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", ")
            ),
        )
        .with_help(
            "export them before `helix apply`; their values never reach the journal or the output",
        );
        print_report(&Report::single(d));
        return EXIT_INVALID;
    }
    let (journal, home) = match open_journal() {
        Ok(j) => j,
        Err(code) => return code,
    };
    let spec = RunSpec {
        workflow: Arc::new(wf),
        run_id: engine::new_run_id(),
        parent: None,
        inputs,
        restored: HashMap::new(),
        resumed: false,
    };
    execute(spec, journal, home, args)
}

fn execute(spec: RunSpec, mut journal: Journal, home: PathBuf, args: &RunArgs) -> i32 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let mode = output_mode(args.output);
    let opts = ExecOptions {
        home,
        max_parallel: args.max_parallel.max(1),
        approve_all: args.approve_all,
        interactive: std::io::stdin().is_terminal() && mode != OutputMode::Json,
        handle_signals: true,
        stream: mode == OutputMode::Tty,
        llm: match (&args.record, &args.replay) {
            (Some(path), _) => engine::LlmMode::Record(path.clone(), None),
            (None, Some(path)) => engine::LlmMode::Replay(path.clone()),
            (None, None) => engine::LlmMode::Live,
        },
    };
    let mut sink = ui::sink(mode);
    let history = spec.workflow.history.clone();
    let name = spec.workflow.name.clone();
    let result = rt.block_on(engine::execute(spec, &opts, &mut journal, sink.as_mut()));
    if history.keep_runs.is_some() || history.keep_days.is_some() {
        // Retention declared by the workflow (`history:`) applies to its own runs.
        let keep = history.keep_runs.map(|k| k as usize);
        if let Err(e) = journal.prune(keep, history.keep_days, Some(&name)) {
            eprintln!("warning: pruning old runs failed: {e}");
        }
    }
    // Work that ignores cancellation must not keep the process alive after the run ended.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(summary) => {
            if mode != OutputMode::Json {
                print_summary(&summary);
            }
            match summary.status {
                RunStatus::Succeeded => EXIT_OK,
                RunStatus::Failed => EXIT_FAILED,
                RunStatus::AwaitingApproval => EXIT_WAITING,
                RunStatus::Interrupted => EXIT_INTERRUPTED,
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    }
}

fn print_summary(s: &RunSummary) {
    let mut parts = vec![format!("{} succeeded", s.succeeded)];
    if s.failed > 0 {
        parts.push(format!("{} failed", s.failed));
    }
    if s.skipped > 0 {
        parts.push(format!("{} skipped", s.skipped));
    }
    if s.tokens > 0 {
        parts.push(format!("{} LLM tokens", s.tokens));
    }
    if s.cost_usd > 0.0 {
        parts.push(format!("${:.4}", s.cost_usd));
    }
    eprintln!(
        "run {} {} in {}: {}",
        s.run_id,
        s.status.name(),
        human_duration(s.duration),
        parts.join(", ")
    );
    if let Some(e) = &s.error {
        eprintln!("  {e}");
    }
    for t in &s.awaiting {
        eprintln!(
            "  waiting for approval: {t} — `helix resume {} --approve {t}` (or --reject)",
            s.run_id
        );
    }
    match s.status {
        RunStatus::AwaitingApproval => {}
        RunStatus::Interrupted => eprintln!("  continue with `helix resume {}`", s.run_id),
        RunStatus::Failed => eprintln!(
            "  see `helix runs show {}`; re-run failed work with `helix retry {}`",
            s.run_id, s.run_id
        ),
        RunStatus::Succeeded => {}
    }
}

fn resume(
    run_ref: &str,
    approve: &[String],
    reject: &[String],
    force: bool,
    from: Option<&str>,
    args: &RunArgs,
) -> i32 {
    let (journal, home) = match open_journal() {
        Ok(j) => j,
        Err(code) => return code,
    };
    let run = match journal.find_run(run_ref) {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!(
                "error[{}]: no run `{run_ref}` in {}",
                Code::RunNotFound,
                journal.path().display()
            );
            return EXIT_INVALID;
        }
        Err(e) => {
            eprintln!("error[{}]: {e}", Code::Journal);
            return EXIT_INVALID;
        }
    };
    if run.status == "running"
        && run
            .pid
            .is_some_and(|p| p != i64::from(std::process::id()) && store::pid_alive(p))
    {
        eprintln!(
            "error[{}]: run {} is still being executed by process {}",
            Code::RunBusy,
            run.id,
            run.pid.unwrap_or(0)
        );
        return EXIT_INVALID;
    }
    if run.status == "succeeded" && from.is_none() {
        eprintln!("run {} already succeeded; nothing to do (use `helix retry {} --from TASK` to re-run part of it)", run.id, run.id);
        return EXIT_OK;
    }
    let path = PathBuf::from(&run.workflow_path);
    let wf: Workflow = match workflow::load(&path) {
        Ok(w) => w,
        Err(report) => {
            print_report(&report);
            return EXIT_INVALID;
        }
    };
    if wf.hash != run.workflow_hash && !force {
        eprintln!(
            "error[{}]: {} changed since run {} started\n  = help: pass --force to continue with the new file (succeeded tasks are kept), or start a new run with `helix apply`",
            Code::WorkflowChanged,
            path.display(),
            run.id
        );
        return EXIT_INVALID;
    }
    let tasks = match journal.tasks(&run.id) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error[{}]: {e}", Code::Journal);
            return EXIT_INVALID;
        }
    };
    for (list, approved) in [(approve, true), (reject, false)] {
        for t in list {
            if !tasks
                .iter()
                .any(|r| &r.key == t && r.status == "awaiting_approval")
            {
                eprintln!(
                    "error[{}]: task `{t}` of run {} is not waiting for approval",
                    Code::InvalidValue,
                    run.id
                );
                return EXIT_INVALID;
            }
            if let Err(e) = journal.set_approval(&run.id, t, approved) {
                eprintln!("error[{}]: {e}", Code::Journal);
                return EXIT_INVALID;
            }
        }
    }
    let mut restored: HashMap<String, store::TaskRecord> = tasks
        .into_iter()
        .filter(|t| t.status == "succeeded")
        .map(|t| (t.key.clone(), t))
        .collect();
    if let Some(task) = from {
        let Some(ix) = wf.task_by_id(task) else {
            eprintln!(
                "error[{}]: run {} has no task `{task}`",
                Code::UnknownNeed,
                run.id
            );
            return EXIT_INVALID;
        };
        for id in downstream_of(&wf, ix) {
            restored.retain(|k, _| k != &id && !k.starts_with(&format!("{id}[")));
        }
    }
    let inputs = match run.inputs {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let spec = RunSpec {
        workflow: Arc::new(wf),
        run_id: run.id,
        parent: None,
        inputs,
        restored,
        resumed: true,
    };
    execute(spec, journal, home, args)
}

/// The ids of a task, its descendants, the groups containing it, and everything that
/// depends on any of those: what must run again for `retry --from`.
fn downstream_of(wf: &Workflow, start: usize) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    // (task, whether its children re-run too): a containing group re-runs as a container,
    // but its other children keep their results.
    let mut todo = vec![(start, true)];
    let mut expanded = std::collections::HashSet::new();
    while let Some((t, with_children)) = todo.pop() {
        out.insert(t);
        if with_children && expanded.insert(t) {
            todo.extend(wf.tasks[t].children.iter().map(|&c| (c, true)));
        }
        if let Some(p) = wf.tasks[t].parent {
            if !out.contains(&p) {
                todo.push((p, false));
            }
        }
        for (i, other) in wf.tasks.iter().enumerate() {
            if other.needs.contains(&t) && !expanded.contains(&i) {
                todo.push((i, true));
            }
        }
    }
    out.into_iter().map(|t| wf.tasks[t].id.clone()).collect()
}
