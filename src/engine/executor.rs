//! The executor: drives the state machine on tokio, performs its actions, journals every
//! transition before showing it, and turns work results into machine events.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::sync::mpsc;

use super::context::{script_tasks, template_context, ContextParts, Results, TaskResult};
use super::state::{Action, Event as MEvent, Machine, NodeId, Outcome, Status};
use super::work::{perform, Finished, Work, WorkError};
use crate::events::{now_ms, Event, EventSink, NullSink};
use crate::llm::Usage;
use crate::prompt;
use crate::store::{Journal, JournalError, NewRun, TaskRecord};
use crate::workflow::{ErrorClass, OutputParse, TaskKind, Workflow};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Succeeded,
    Failed,
    /// Ctrl-C or SIGTERM; resumable.
    Interrupted,
    /// Paused on a human gate; `helix resume RUN --approve TASK` continues it.
    AwaitingApproval,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::AwaitingApproval => "awaiting_approval",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: String,
    pub status: RunStatus,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
    pub awaiting: Vec<String>,
    pub duration: Duration,
    pub error: Option<String>,
    /// Outputs of the root tasks (a sub-workflow's output).
    pub outputs: serde_json::Map<String, Json>,
    /// LLM tokens used by the run so far (all sessions) and this session's priced cost.
    pub tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub home: PathBuf,
    pub max_parallel: usize,
    pub approve_all: bool,
    /// Ask approvals on the terminal.
    pub interactive: bool,
    /// Stop on Ctrl-C / SIGTERM (only the top-level run listens).
    pub handle_signals: bool,
    /// Stream LLM replies so the display can show them arriving.
    pub stream: bool,
    pub llm: LlmMode,
}

/// Where agents' LLM replies come from.
#[derive(Debug, Clone)]
pub enum LlmMode {
    Live,
    /// Call the models and record every call into the cassette at this path (created by the
    /// top-level run and shared with its sub-workflows).
    Record(PathBuf, Option<crate::llm::SharedCassette>),
    /// Answer every call from this cassette.
    Replay(PathBuf),
}

/// A run to start or continue.
pub struct RunSpec {
    pub workflow: Arc<Workflow>,
    pub run_id: String,
    pub parent: Option<String>,
    pub inputs: serde_json::Map<String, Json>,
    /// Succeeded tasks from earlier sessions of this run, by key.
    pub restored: HashMap<String, TaskRecord>,
    pub resumed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot create the run directory {path}: {message}")]
    RunDir { path: PathBuf, message: String },
    #[error("secret `{0}` is not set in the environment")]
    MissingSecret(String),
    #[error("cassette: {0}")]
    Cassette(String),
    /// The workflow needs a container sandbox that cannot be had (no engine, no image).
    #[error("{0}")]
    Sandbox(String),
    #[error("memory: {0}")]
    Memory(String),
}

enum Msg {
    Done {
        node: NodeId,
        attempt: u32,
        finished: Finished,
    },
    RetryDue(NodeId),
    Progress(NodeId, String),
}

/// The environment variable that tags every host process with its run id.
pub const RUN_TAG: &str = "HELIX_RUN_ID";

/// Kills host processes tagged with this run (or one of its sub-workflow runs). Host commands
/// run in their own session, so they outlive a `kill -9` of helix; the tag in their
/// environment (inherited by their children) finds them without trusting reusable pids.
pub fn reap_orphans(run_id: &str) -> usize {
    let exact = format!("{RUN_TAG}={run_id}");
    let child_prefix = format!("{RUN_TAG}={run_id}.");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut stopped = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let tagged = environ
            .split(|b| *b == 0)
            .any(|var| var == exact.as_bytes() || var.starts_with(child_prefix.as_bytes()));
        if tagged {
            // SAFETY: sending a signal to a process we identified by its environment.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                stopped += 1;
            }
        }
    }
    stopped
}

/// A fresh, sortable, readable run id: `20261126-093512-a3f9`.
pub fn new_run_id() -> String {
    let secs = now_ms() / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}{mo:02}{d:02}-{:02}{:02}{:02}-{:04x}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        fastrand::u16(..)
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn run_dir(home: &std::path::Path, run_id: &str) -> PathBuf {
    home.join("runs").join(run_id)
}

/// Executes (or continues) a run to its end, journaling every transition.
pub async fn execute(
    spec: RunSpec,
    opts: &ExecOptions,
    journal: &mut Journal,
    sink: &mut dyn EventSink,
) -> Result<RunSummary, EngineError> {
    let wf = spec.workflow.clone();
    let dir = run_dir(&opts.home, &spec.run_id);
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(&workspace).map_err(|e| EngineError::RunDir {
        path: workspace.clone(),
        message: e.to_string(),
    })?;
    let mut secrets = Vec::new();
    let mut env = serde_json::Map::new();
    for name in &wf.secrets {
        let value = std::env::var(name).map_err(|_| EngineError::MissingSecret(name.clone()))?;
        secrets.push(value.clone());
        env.insert(name.clone(), Json::String(value));
    }
    for (name, default) in &wf.env {
        if let Some(v) = std::env::var(name).ok().or_else(|| default.clone()) {
            env.insert(name.clone(), Json::String(v));
        }
    }
    // Longest first so a secret that contains another is redacted whole.
    secrets.retain(|s| s.len() >= 4);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    // What a cassette must not hold verbatim: secrets, and values that differ between runs.
    let scrub = crate::llm::Scrub::new(secrets.clone())
        .run_value("workspace", workspace.display().to_string())
        .run_value("run_id", spec.run_id.clone())
        .run_value("home", opts.home.display().to_string());
    let mut opts = opts.clone();
    let llm_error = |e: crate::llm::LlmError| EngineError::Cassette(e.to_string());
    let replay = match &opts.llm {
        LlmMode::Replay(path) => {
            Some(crate::llm::replay_all(path, scrub.clone()).map_err(llm_error)?)
        }
        LlmMode::Record(path, None) => {
            let cassette = crate::llm::SharedCassette::create(path.clone(), scrub.clone())
                .map_err(llm_error)?;
            opts.llm = LlmMode::Record(path.clone(), Some(cassette));
            None
        }
        _ => None,
    };
    let opts = &opts;

    let inputs_json = Json::Object(spec.inputs.clone());
    if !spec.resumed {
        let path = std::fs::canonicalize(&wf.file).unwrap_or_else(|_| wf.file.clone());
        journal.create_run(&NewRun {
            id: &spec.run_id,
            parent: spec.parent.as_deref(),
            workflow_path: &path.to_string_lossy(),
            workflow_name: &wf.name,
            workflow_hash: &wf.hash,
            inputs: &inputs_json,
        })?;
    } else {
        // Commands of a killed session may still run; they must not race their re-runs.
        let stopped = reap_orphans(&spec.run_id);
        if stopped > 0 {
            eprintln!(
                "stopped {stopped} process{} left running by an earlier session of run {}",
                if stopped == 1 { "" } else { "es" },
                spec.run_id
            );
        }
        journal.interrupt_running(&spec.run_id)?;
        journal.claim_run(&spec.run_id, &wf.hash)?;
    }

    let results: Results = Arc::new(RwLock::new(HashMap::new()));
    if let Ok(mut r) = results.write() {
        for (key, rec) in &spec.restored {
            r.insert(
                key.clone(),
                TaskResult {
                    status: "succeeded".into(),
                    output: rec.output.clone(),
                    error: None,
                    attempts: rec.attempt,
                },
            );
        }
    }
    let run_json = serde_json::json!({
        "id": spec.run_id,
        "dir": dir.display().to_string(),
        "workspace": workspace.display().to_string(),
        "workflow": wf.file.display().to_string(),
        "name": wf.name,
    });
    let restored_keys: HashSet<String> = spec.restored.keys().cloned().collect();
    let (input_tokens, output_tokens) = journal.run_usage(&spec.run_id)?;
    let prior_tokens = input_tokens + output_tokens;
    let rerun: HashSet<String> = if spec.resumed {
        journal
            .tasks(&spec.run_id)?
            .into_iter()
            // Failed, or succeeded but not restored (`retry --from`): ask the model again.
            .filter(|t| {
                t.status == "failed"
                    || (t.status == "succeeded" && !spec.restored.contains_key(&t.key))
            })
            .map(|t| t.key)
            .collect()
    } else {
        HashSet::new()
    };
    // Before anything runs: a workflow whose memory or containers cannot be had fails here,
    // not midway.
    let memory = crate::agents::memory::RunMemory::open(&opts.home, &wf, &spec.run_id, &secrets)
        .map_err(|e| EngineError::Memory(e.to_string()))?;
    let sandboxes = start_sandboxes(&wf, &workspace, &spec.run_id).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut ex = Executor {
        wf: wf.clone(),
        run_id: spec.run_id.clone(),
        opts: opts.clone(),
        journal,
        sink,
        results,
        inputs: inputs_json,
        run: run_json,
        env: Json::Object(env),
        secrets,
        workspace,
        templates: prompt::environment(Some(&wf.dir)),
        tx,
        running: HashMap::new(),
        started: HashMap::new(),
        failure: None,
        restored: restored_keys.clone(),
        pending: Vec::new(),
        deferred: Vec::new(),
        run_tokens: Arc::new(std::sync::atomic::AtomicU64::new(prior_tokens)),
        cost_usd: 0.0,
        providers: std::sync::Mutex::new(HashMap::new()),
        agent_journal: std::sync::OnceLock::new(),
        replay,
        scrub,
        rerun,
        sandboxes,
        memory,
        last_errors: HashMap::new(),
    };
    let mut machine = Machine::new(&wf, opts.max_parallel, restored_keys);
    let summary = ex.run_loop(&mut machine, rx, spec.resumed).await;
    for sandbox in ex.sandboxes.values() {
        sandbox.close().await;
    }
    summary
}

/// The container sandboxes this run's tasks use, one per distinct profile, each with its pool
/// warming up. `sandbox: host` needs nothing; a workflow that uses no container needs no
/// Docker engine.
async fn start_sandboxes(
    wf: &Workflow,
    workspace: &std::path::Path,
    run_id: &str,
) -> Result<HashMap<String, Arc<crate::sandbox::DockerSandbox>>, EngineError> {
    let mut profiles: Vec<(String, &Json, &str)> = Vec::new();
    for task in &wf.tasks {
        let crate::workflow::SandboxChoice::Profile(profile) = &task.sandbox else {
            continue;
        };
        if !crate::agents::needs_sandbox(wf, &task.kind) {
            continue;
        }
        let key = profile.to_string();
        if !profiles.iter().any(|(k, _, _)| *k == key) {
            profiles.push((key, profile, &task.id));
        }
    }
    let mut sandboxes = HashMap::new();
    if profiles.is_empty() {
        return Ok(sandboxes);
    }
    let failed = |task: &str, message: String| {
        EngineError::Sandbox(format!(
            "task `{task}` needs a container sandbox: {message}"
        ))
    };
    let docker = crate::sandbox::docker::connect()
        .await
        .map_err(|e| failed(profiles[0].2, e.to_string()))?;
    for (key, profile, task) in profiles {
        let started = match crate::sandbox::Profile::from_json(profile, &wf.dir) {
            Ok(profile) => {
                crate::sandbox::DockerSandbox::start(docker.clone(), profile, workspace, run_id)
                    .await
                    .map_err(|e| failed(task, e.to_string()))
            }
            Err(e) => Err(failed(task, e)),
        };
        match started {
            Ok(sandbox) => {
                sandboxes.insert(key, Arc::new(sandbox));
            }
            Err(e) => {
                // The pools already warming up for other profiles go too.
                for sandbox in sandboxes.values() {
                    sandbox.close().await;
                }
                return Err(e);
            }
        }
    }
    Ok(sandboxes)
}

struct Executor<'a> {
    wf: Arc<Workflow>,
    run_id: String,
    opts: ExecOptions,
    journal: &'a mut Journal,
    sink: &'a mut dyn EventSink,
    results: Results,
    inputs: Json,
    run: Json,
    env: Json,
    secrets: Vec<String>,
    workspace: PathBuf,
    templates: minijinja::Environment<'static>,
    tx: mpsc::UnboundedSender<Msg>,
    running: HashMap<NodeId, tokio::task::AbortHandle>,
    started: HashMap<NodeId, Instant>,
    failure: Option<String>,
    restored: HashSet<String>,
    /// Events of this turn of the loop, committed together (group commit) before they are
    /// shown and before the work they announce starts.
    pending: Vec<Event>,
    deferred: Vec<(NodeId, WorkFuture)>,
    /// LLM tokens used by the run (all sessions), shared with running agents.
    run_tokens: Arc<std::sync::atomic::AtomicU64>,
    cost_usd: f64,
    /// The connection agents journal their turns on, opened when the first agent starts.
    agent_journal: std::sync::OnceLock<crate::agents::SharedJournal>,
    /// Every model's provider under `--replay`.
    replay: Option<Arc<dyn crate::llm::Provider>>,
    scrub: crate::llm::Scrub,
    /// One provider per model, built when an agent first needs it.
    providers: std::sync::Mutex<HashMap<String, Arc<dyn crate::llm::Provider>>>,
    /// Tasks whose last journaled attempt failed: their agent conversations start afresh.
    rerun: HashSet<String>,
    /// Container sandboxes by profile (its JSON text).
    sandboxes: HashMap<String, Arc<crate::sandbox::DockerSandbox>>,
    /// Long-term memory, when the workflow declares `memory:`.
    memory: Option<Arc<crate::agents::memory::RunMemory>>,
    /// The error of each task's latest failed attempt in this session.
    last_errors: HashMap<String, String>,
}

type WorkFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Work outlives nothing: when a run is dropped (a sub-workflow timing out, an error), the
/// tasks it spawned are aborted, which kills their processes and cancels their scripts.
impl Drop for Executor<'_> {
    fn drop(&mut self) {
        for handle in self.running.values() {
            handle.abort();
        }
    }
}

impl Executor<'_> {
    async fn run_loop(
        &mut self,
        m: &mut Machine<'_>,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        resumed: bool,
    ) -> Result<RunSummary, EngineError> {
        let t0 = Instant::now();
        self.record(Event::RunStarted {
            run: self.run_id.clone(),
            ts: now_ms(),
            workflow: self.wf.file.display().to_string(),
            name: self.wf.name.clone(),
            resumed,
            tasks: self.wf.tasks.len(),
        })?;
        let mut queue: VecDeque<MEvent> = VecDeque::new();
        let actions = m.start();
        self.apply(m, actions, &mut queue)?;
        let wall = self.wf.budget.wall;
        let deadline = tokio::time::sleep(wall.unwrap_or(Duration::from_secs(86_400 * 365)));
        tokio::pin!(deadline);
        let mut interrupted = false;
        let mut signals = Signals::new(self.opts.handle_signals);
        loop {
            while let Some(ev) = queue.pop_front() {
                let actions = m.handle(ev);
                self.apply(m, actions, &mut queue)?;
            }
            self.flush()?;
            if m.is_quiescent() {
                break;
            }
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.on_message(m, msg, &mut queue)?;
                    // Take whatever else finished meanwhile into the same commit.
                    while let Ok(more) = rx.try_recv() {
                        self.on_message(m, more, &mut queue)?;
                    }
                }
                _ = &mut deadline, if wall.is_some() && self.failure.is_none() => {
                    let limit = wall.map(crate::workflow::units::human_duration).unwrap_or_default();
                    self.failure = Some(format!("wall-clock budget of {limit} exhausted"));
                    self.stop_all(m, &mut queue)?;
                }
                _ = signals.recv(), if !interrupted => {
                    interrupted = true;
                    self.stop_all(m, &mut queue)?;
                }
            }
        }
        self.finish(m, t0.elapsed(), interrupted)
    }

    /// Cancels the machine and stops running work; tasks go back to "not done" for resume.
    fn stop_all(
        &mut self,
        m: &mut Machine,
        queue: &mut VecDeque<MEvent>,
    ) -> Result<(), EngineError> {
        queue.push_back(MEvent::Cancel);
        // Work announced this turn but not started never starts; what was announced is kept
        // (and marked interrupted below) so the journal tells the truth.
        self.deferred.clear();
        self.flush()?;
        // Aborting drops the work future, which kills its processes and stops its scripts.
        for (_, handle) in self.running.drain() {
            handle.abort();
        }
        for n in 0..m.nodes.len() {
            if matches!(m.nodes[n].status, Status::Running | Status::RetryWait) {
                queue.push_back(MEvent::Aborted(n));
            }
        }
        self.journal.interrupt_running(&self.run_id)?;
        Ok(())
    }

    fn finish(
        &mut self,
        m: &Machine,
        duration: Duration,
        interrupted: bool,
    ) -> Result<RunSummary, EngineError> {
        let (mut succeeded, mut failed, mut skipped) = (0, 0, 0);
        for n in &m.nodes {
            match n.status {
                Status::Succeeded if n.is_leaf => succeeded += 1,
                Status::Failed if n.is_leaf => failed += 1,
                Status::Skipped => skipped += 1,
                _ => {}
            }
        }
        let awaiting: Vec<String> = if interrupted {
            Vec::new()
        } else {
            m.awaiting_approval()
                .into_iter()
                .map(|n| m.nodes[n].key.clone())
                .collect()
        };
        let status = if interrupted {
            RunStatus::Interrupted
        } else if self.failure.is_some() {
            RunStatus::Failed
        } else {
            match m.outcome() {
                Outcome::Succeeded => RunStatus::Succeeded,
                Outcome::Failed => RunStatus::Failed,
                Outcome::Incomplete if !awaiting.is_empty() => RunStatus::AwaitingApproval,
                Outcome::Incomplete => RunStatus::Failed,
            }
        };
        let error = match status {
            RunStatus::Interrupted => Some("interrupted".to_string()),
            _ => self.failure.clone(),
        };
        self.record(Event::RunFinished {
            run: self.run_id.clone(),
            ts: now_ms(),
            status: status.name().into(),
            duration_ms: duration.as_millis() as u64,
            succeeded,
            failed,
            skipped,
            error: error.clone(),
        })?;
        self.flush()?;
        self.sink.finish();
        let mut outputs = serde_json::Map::new();
        if let Ok(results) = self.results.read() {
            for &r in &self.wf.roots {
                let id = &self.wf.tasks[r].id;
                if let Some(out) = results.get(id).and_then(|r| r.output.clone()) {
                    outputs.insert(id.clone(), out);
                }
            }
        }
        Ok(RunSummary {
            run_id: self.run_id.clone(),
            status,
            succeeded,
            failed,
            skipped,
            awaiting,
            duration,
            error,
            outputs,
            tokens: self.run_tokens.load(std::sync::atomic::Ordering::Relaxed),
            cost_usd: self.cost_usd,
        })
    }

    /// Journals an event, then shows it.
    /// Queues an event for this turn's commit.
    fn record(&mut self, event: Event) -> Result<(), EngineError> {
        self.pending.push(event);
        Ok(())
    }

    /// Commits this turn's events in one transaction, then shows them, then starts the work
    /// they announced: nothing is visible or running before it is durable.
    fn flush(&mut self) -> Result<(), EngineError> {
        if !self.pending.is_empty() {
            let events = std::mem::take(&mut self.pending);
            self.journal.record_all(&events)?;
            for e in &events {
                self.sink.emit(e);
            }
        }
        for (n, work) in self.deferred.drain(..) {
            let handle = tokio::spawn(work);
            self.running.insert(n, handle.abort_handle());
        }
        Ok(())
    }

    fn redact(&self, text: &str) -> String {
        crate::llm::redact(text, &self.secrets)
    }

    fn redact_json(&self, value: Json) -> Json {
        if self.secrets.is_empty() {
            return value;
        }
        match value {
            Json::String(s) => Json::String(self.redact(&s)),
            Json::Array(items) => {
                Json::Array(items.into_iter().map(|v| self.redact_json(v)).collect())
            }
            Json::Object(map) => Json::Object(
                map.into_iter()
                    .map(|(k, v)| (self.redact(&k), self.redact_json(v)))
                    .collect(),
            ),
            other => other,
        }
    }

    fn context(&self, m: &Machine, n: NodeId) -> minijinja::Value {
        template_context(&ContextParts {
            workflow: &self.wf,
            results: &self.results,
            inputs: &self.inputs,
            run: &self.run,
            env: &self.env,
            item: m.nodes[n].item.as_ref(),
        })
    }

    fn apply(
        &mut self,
        m: &mut Machine,
        actions: Vec<Action>,
        queue: &mut VecDeque<MEvent>,
    ) -> Result<(), EngineError> {
        for action in actions {
            match action {
                Action::Prepare(n) => self.prepare(m, n, queue)?,
                Action::Launch { node, attempt } => self.launch(m, node, attempt, queue)?,
                Action::ScheduleRetry { node, next_attempt } => {
                    let wf = self.wf.clone();
                    let decl = &wf.tasks[m.nodes[node].decl];
                    let delay = decl.retry.delay_before(next_attempt, fastrand::f64());
                    let error = self
                        .results
                        .read()
                        .ok()
                        .and_then(|r| r.get(&m.nodes[node].key).and_then(|r| r.error.clone()))
                        .unwrap_or_default();
                    self.record(Event::TaskRetrying {
                        run: self.run_id.clone(),
                        ts: now_ms(),
                        task: m.nodes[node].key.clone(),
                        attempt: next_attempt,
                        delay_ms: delay.as_millis() as u64,
                        error,
                    })?;
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = tx.send(Msg::RetryDue(node));
                    });
                }
                Action::Settled {
                    node,
                    status,
                    reason,
                } => self.settled(m, node, status, reason)?,
                Action::Expanded { node, count } => {
                    self.record(Event::TaskExpanded {
                        run: self.run_id.clone(),
                        ts: now_ms(),
                        task: m.nodes[node].key.clone(),
                        items: count,
                    })?;
                }
            }
        }
        Ok(())
    }

    fn prepare(
        &mut self,
        m: &mut Machine,
        n: NodeId,
        queue: &mut VecDeque<MEvent>,
    ) -> Result<(), EngineError> {
        self.started.insert(n, Instant::now());
        let wf = self.wf.clone();
        let decl = &wf.tasks[m.nodes[n].decl];
        let ctx = self.context(m, n);
        if let Some(when) = &decl.when {
            match prompt::eval_condition(&self.templates, when, &ctx) {
                Ok(false) => {
                    queue.push_back(MEvent::PreparedSkip(n));
                    return Ok(());
                }
                Ok(true) => {}
                Err(e) => {
                    self.fail_now(m, n, format!("`when` failed: {e}"))?;
                    queue.push_back(MEvent::PrepareFailed(n));
                    return Ok(());
                }
            }
        }
        match &decl.for_each {
            None => queue.push_back(MEvent::PreparedRun(n)),
            Some(expr) => match prompt::eval(&self.templates, expr, &ctx) {
                Ok(Json::Array(items)) => queue.push_back(MEvent::PreparedFanOut(n, items)),
                Ok(other) => {
                    let shown: String = other.to_string().chars().take(80).collect();
                    self.fail_now(m, n, format!("`for_each` must give a list, got {shown}"))?;
                    queue.push_back(MEvent::PrepareFailed(n));
                }
                Err(e) => {
                    self.fail_now(m, n, format!("`for_each` failed: {e}"))?;
                    queue.push_back(MEvent::PrepareFailed(n));
                }
            },
        }
        Ok(())
    }

    /// Records a failure that happened before any work started (templates, prepare).
    fn fail_now(&mut self, m: &Machine, n: NodeId, error: String) -> Result<(), EngineError> {
        let error = Some(self.redact(&error));
        self.remember(m, n, Status::Failed, None, error.clone());
        let event = self.finished_event(m, n, Status::Failed, None, error, None);
        self.record(event)
    }

    /// Keeps a task's result where templates and later tasks read it.
    fn remember(
        &self,
        m: &Machine,
        n: NodeId,
        status: Status,
        output: Option<Json>,
        error: Option<String>,
    ) {
        if let Ok(mut r) = self.results.write() {
            let result = TaskResult {
                status: status.name().into(),
                output,
                error,
                attempts: m.nodes[n].attempt,
            };
            r.insert(m.nodes[n].key.clone(), result);
        }
    }

    fn finished_event(
        &self,
        m: &Machine,
        n: NodeId,
        status: Status,
        output: Option<Json>,
        error: Option<String>,
        reason: Option<String>,
    ) -> Event {
        Event::TaskFinished {
            run: self.run_id.clone(),
            ts: now_ms(),
            task: m.nodes[n].key.clone(),
            status: status.name().into(),
            attempt: m.nodes[n].attempt,
            duration_ms: self
                .started
                .get(&n)
                .map_or(0, |t| t.elapsed().as_millis() as u64),
            output,
            error,
            reason,
            usage: None,
        }
    }

    fn settled(
        &mut self,
        m: &Machine,
        n: NodeId,
        status: Status,
        reason: Option<String>,
    ) -> Result<(), EngineError> {
        let node = &m.nodes[n];
        let restored = status == Status::Succeeded && self.restored.contains(&node.key);
        let output = if restored {
            self.results
                .read()
                .ok()
                .and_then(|r| r.get(&node.key).and_then(|r| r.output.clone()))
        } else if status == Status::Succeeded && !node.is_leaf {
            Some(self.container_output(m, n))
        } else {
            None
        };
        // A container's failure reason ("`x` failed") is its error.
        let (error, reason) = match status {
            Status::Failed => (reason, None),
            _ => (None, reason),
        };
        self.remember(m, n, status, output.clone(), error.clone());
        let event = self.finished_event(m, n, status, output, error, reason);
        if restored {
            // Already in the journal from the session that ran it: show, don't rewrite.
            self.sink.emit(&event);
            Ok(())
        } else {
            self.record(event)
        }
    }

    /// A group's output maps child keys to outputs; a fan-out's is the list in item order.
    fn container_output(&self, m: &Machine, n: NodeId) -> Json {
        let Ok(results) = self.results.read() else {
            return Json::Null;
        };
        let node = &m.nodes[n];
        let output_of = |key: &str| {
            results
                .get(key)
                .and_then(|r| r.output.clone())
                .unwrap_or(Json::Null)
        };
        if matches!(
            self.wf.tasks[node.decl].kind,
            TaskKind::Agent {
                decompose: true,
                ..
            }
        ) {
            // Subtask id → output.
            let prefix = format!("{}.", node.key);
            Json::Object(
                node.children
                    .iter()
                    .map(|&c| {
                        let key = &m.nodes[c].key;
                        (
                            key.strip_prefix(&prefix).unwrap_or(key).to_string(),
                            output_of(key),
                        )
                    })
                    .collect(),
            )
        } else if matches!(self.wf.tasks[node.decl].kind, TaskKind::Group) {
            Json::Object(
                node.children
                    .iter()
                    .map(|&c| {
                        (
                            self.wf.tasks[m.nodes[c].decl].key().to_string(),
                            output_of(&m.nodes[c].key),
                        )
                    })
                    .collect(),
            )
        } else {
            Json::Array(
                node.children
                    .iter()
                    .map(|&c| output_of(&m.nodes[c].key))
                    .collect(),
            )
        }
    }

    fn launch(
        &mut self,
        m: &mut Machine,
        n: NodeId,
        attempt: u32,
        queue: &mut VecDeque<MEvent>,
    ) -> Result<(), EngineError> {
        let wf = self.wf.clone();
        let decl = &wf.tasks[m.nodes[n].decl];
        let key = m.nodes[n].key.clone();
        if attempt == 1 {
            self.started.insert(n, Instant::now());
        }
        if let TaskKind::Approve { message } = &decl.kind {
            return self.approval(m, n, message.clone(), queue);
        }
        self.record(Event::TaskStarted {
            run: self.run_id.clone(),
            ts: now_ms(),
            task: key.clone(),
            kind: decl.kind.name().into(),
            attempt,
        })?;
        let work = match self.build_work(m, n) {
            Ok(w) => w,
            Err(e) => {
                let result = Err(WorkError {
                    class: ErrorClass::Script,
                    message: e,
                });
                return self.on_message(
                    m,
                    Msg::Done {
                        node: n,
                        attempt,
                        finished: Finished {
                            result,
                            logs: Vec::new(),
                            usage: None,
                        },
                    },
                    queue,
                );
            }
        };
        // Scripts enforce their own deadline and report where they stopped; the outer
        // timeout is only a backstop for them.
        let timeout = match decl.kind {
            TaskKind::Script { .. } => decl.timeout.map(|t| t + Duration::from_secs(1)),
            _ => decl.timeout,
        };
        let tx = self.tx.clone();
        let work: WorkFuture = Box::pin(async move {
            let cancel = Arc::new(AtomicBool::new(false));
            let _guard = CancelOnDrop(cancel.clone());
            let fut = perform(work, cancel.clone());
            let finished = match timeout {
                Some(limit) => match tokio::time::timeout(limit, fut).await {
                    Ok(r) => r,
                    Err(_) => {
                        cancel.store(true, Ordering::Relaxed);
                        let message = format!(
                            "timed out after {}",
                            crate::workflow::units::human_duration(limit)
                        );
                        Finished {
                            result: Err(WorkError {
                                class: ErrorClass::Timeout,
                                message,
                            }),
                            logs: Vec::new(),
                            usage: None,
                        }
                    }
                },
                None => fut.await,
            };
            let _ = tx.send(Msg::Done {
                node: n,
                attempt,
                finished,
            });
        });
        self.deferred.push((n, work));
        Ok(())
    }

    fn approval(
        &mut self,
        m: &mut Machine,
        n: NodeId,
        message: String,
        queue: &mut VecDeque<MEvent>,
    ) -> Result<(), EngineError> {
        let key = m.nodes[n].key.clone();
        let ctx = self.context(m, n);
        let question = match prompt::render(&self.templates, &message, &ctx) {
            Ok(q) => self.redact(&q),
            Err(e) => {
                self.fail_now(m, n, format!("approval message: {e}"))?;
                queue.push_back(MEvent::Failed(n, ErrorClass::Script));
                return Ok(());
            }
        };
        let decision = if let Some(d) = self.journal.approval(&self.run_id, &key)? {
            Some((d, "journal"))
        } else if self.opts.approve_all {
            Some((true, "--approve-all"))
        } else if self.opts.interactive {
            self.flush()?;
            let mut answer = None;
            let q = question.clone();
            self.sink.suspend(&mut || {
                answer = ask_yes_no(&format!("? {q} [y/N] "));
            });
            answer.map(|a| (a, "terminal"))
        } else {
            None
        };
        match decision {
            Some((approved, by)) => {
                self.journal.set_approval(&self.run_id, &key, approved)?;
                if approved {
                    let output = serde_json::json!({ "approved": true, "by": by });
                    self.succeed(m, n, output, None)?;
                    queue.push_back(MEvent::Succeeded(n));
                } else {
                    self.fail_now(m, n, format!("not approved ({by})"))?;
                    queue.push_back(MEvent::Failed(n, ErrorClass::Tool));
                }
            }
            None => {
                self.record(Event::ApprovalRequested {
                    run: self.run_id.clone(),
                    ts: now_ms(),
                    task: key,
                    message: question,
                })?;
                queue.push_back(MEvent::NeedsApproval(n));
            }
        }
        Ok(())
    }

    fn build_work(&self, m: &Machine, n: NodeId) -> Result<Work, String> {
        let decl = &self.wf.tasks[m.nodes[n].decl];
        // Scripts get globals, not templates: skip building the template context for them.
        let ctx = match decl.kind {
            TaskKind::Script { .. } => minijinja::Value::UNDEFINED,
            _ => self.context(m, n),
        };
        let render = |what: &str, text: &str| {
            prompt::render(&self.templates, text, &ctx).map_err(|e| format!("{what}: {e}"))
        };
        Ok(match &decl.kind {
            TaskKind::Run { command, env } => {
                let command = render("`run`", command)?;
                // Tags every process of the run, so a later session can find the ones a
                // killed helix left behind (see `reap_orphans`).
                let mut vars = vec![
                    (RUN_TAG.to_string(), self.run_id.clone()),
                    ("HELIX_TASK".to_string(), m.nodes[n].key.clone()),
                ];
                for (k, v) in env {
                    vars.push((k.clone(), render(&format!("env `{k}`"), v)?));
                }
                Work::Run {
                    command,
                    env: vars,
                    workdir: self.workspace.clone(),
                    sandbox: self.sandbox_for(&decl.sandbox)?,
                }
            }
            TaskKind::Script { source } => {
                let mut globals = serde_json::Map::new();
                globals.insert("inputs".into(), self.inputs.clone());
                globals.insert(
                    "tasks".into(),
                    script_tasks(&self.wf, &self.results, m.nodes[n].decl),
                );
                globals.insert("run".into(), self.run.clone());
                if let Some(item) = &m.nodes[n].item {
                    globals.insert("item".into(), item.clone());
                }
                // Rhai scripts may call the built-in tools and use the task's scratchpad.
                let host = match source.lang {
                    crate::scripting::Lang::Rhai => {
                        // `llm_chat` uses the workflow's `default` model; only scripts that call it
                        // need one (and its key).
                        let model = match self.wf.models.get("default") {
                            Some(d) if source.code.contains("llm_chat") => Some((
                                self.provider("default")?,
                                d.model.clone().unwrap_or_default(),
                            )),
                            _ => None,
                        };
                        Some(crate::agents::rhai_host(
                            crate::agents::builtin_env(&self.tool_env(&m.nodes[n].key, &[])?),
                            model,
                        ))
                    }
                    crate::scripting::Lang::Lua => None,
                };
                Work::Script {
                    source: source.clone(),
                    globals,
                    timeout: decl.timeout,
                    host,
                }
            }
            TaskKind::Tool { tool, with } => {
                let mut args = prompt::render_json(&self.templates, with, &ctx)
                    .map_err(|e| format!("`with`: {e}"))?;
                let decl = self.wf.tools.get(tool);
                if let (Some(decl), Json::Object(given)) = (decl, &mut args) {
                    apply_param_defaults(tool, &decl.params, given)?;
                }
                match decl {
                    // A declared tool runs like an agent's tool call (Lua tools get `ctx`).
                    Some(_) => Work::CustomTool {
                        env: {
                            let mut env =
                                self.tool_env(&m.nodes[n].key, std::slice::from_ref(tool))?;
                            env.sandbox = self
                                .sandbox_for(&self.wf.tasks[m.nodes[n].decl].sandbox)
                                .ok();
                            env
                        },
                        name: tool.clone(),
                        args,
                    },
                    None => Work::Tool {
                        name: tool.clone(),
                        args,
                        workspace: self.workspace.clone(),
                    },
                }
            }
            TaskKind::Workflow { path, with } => {
                let mut inputs = Vec::new();
                for (k, v) in with {
                    let value = prompt::render_json(&self.templates, v, &ctx)
                        .map_err(|e| format!("`with.{k}`: {e}"))?;
                    inputs.push((k.clone(), value));
                }
                Work::Workflow {
                    path: path.clone(),
                    inputs,
                    run_id: format!("{}.{}", self.run_id, m.nodes[n].key),
                    parent: self.run_id.clone(),
                    opts: ExecOptions {
                        handle_signals: false,
                        interactive: false,
                        stream: false,
                        ..self.opts.clone()
                    },
                }
            }
            TaskKind::Agent {
                agent,
                prompt,
                decompose,
                token_budget,
            } if self
                .wf
                .agents
                .get(agent)
                .is_some_and(|a| a.script.is_some()) =>
            {
                let _ = (decompose, token_budget);
                let prompt = render("`prompt`", prompt)?;
                self.script_agent(m, n, agent, prompt)?
            }
            TaskKind::Agent {
                agent,
                prompt,
                decompose,
                token_budget,
            } => {
                let prompt = render("`prompt`", prompt)?;
                // A planned subtask names its own agent and request; the planner plans.
                let (agent, prompt, output_schema) = match (&m.nodes[n].item, decompose) {
                    (Some(sub), true) => {
                        let agent = sub["agent"].as_str().unwrap_or_default().to_string();
                        let request = sub["prompt"].as_str().unwrap_or_default();
                        (
                            agent,
                            format!("{request}\n\n(Part of a larger task: {prompt})"),
                            None,
                        )
                    }
                    (_, true) => (agent.clone(), prompt, Some(plan_schema(&self.wf))),
                    _ => (
                        agent.clone(),
                        prompt,
                        decl.output.as_ref().and_then(|o| o.schema.clone()),
                    ),
                };
                let agent = &agent;
                let model = self
                    .wf
                    .agents
                    .get(agent)
                    .map(|a| a.model.clone())
                    .unwrap_or_default();
                let key = m.nodes[n].key.clone();
                let job = crate::agents::build_job(crate::agents::JobParts {
                    workflow: &self.wf,
                    agent,
                    task: &key,
                    prompt,
                    output_schema,
                    inputs: &self.inputs,
                    run: &self.run,
                    run_id: &self.run_id,
                    journal: self.agent_journal()?,
                    workspace: self.workspace.clone(),
                    provider: self.provider(&model)?,
                    // A conversation continues after a crash, not after a failure.
                    fresh: m.nodes[n].attempt > 1 || self.rerun.contains(&key),
                    run_tokens: self.run_tokens.clone(),
                    secrets: self.secrets.clone(),
                    task_token_budget: *token_budget,
                    sandbox: self.sandbox_for(&decl.sandbox).ok(),
                    memory: self.memory.clone(),
                    earlier_error: (m.nodes[n].attempt > 1)
                        .then(|| self.last_errors.get(&key).cloned())
                        .flatten(),
                    progress: self.opts.stream.then(|| {
                        let tx = self.tx.clone();
                        Arc::new(move |detail: String| {
                            let _ = tx.send(Msg::Progress(n, detail));
                        }) as crate::agents::Progress
                    }),
                })?;
                Work::Agent(Box::new(job))
            }
            TaskKind::Approve { .. } | TaskKind::Group => {
                return Err("internal: not a leaf task".into())
            }
        })
    }

    fn on_message(
        &mut self,
        m: &mut Machine,
        msg: Msg,
        queue: &mut VecDeque<MEvent>,
    ) -> Result<(), EngineError> {
        match msg {
            Msg::RetryDue(n) => queue.push_back(MEvent::RetryDue(n)),
            Msg::Progress(n, detail) => {
                if m.nodes[n].status == Status::Running {
                    self.sink.progress(&m.nodes[n].key, &detail);
                }
            }
            Msg::Done {
                node: n,
                attempt,
                finished:
                    Finished {
                        result,
                        logs,
                        usage,
                    },
            } => {
                self.running.remove(&n);
                if m.nodes[n].status != Status::Running || m.nodes[n].attempt != attempt {
                    return Ok(());
                }
                let key = m.nodes[n].key.clone();
                for (stream, text) in &logs {
                    let text = self.redact(text);
                    self.journal
                        .append_log(&self.run_id, &key, attempt, stream, &text)?;
                }
                let wf = self.wf.clone();
                let decl = &wf.tasks[m.nodes[n].decl];
                let result = result.and_then(|out| {
                    shape_output(
                        out,
                        decl.output.as_ref(),
                        matches!(decl.kind, TaskKind::Run { .. }),
                    )
                });
                if let Some(u) = usage {
                    self.charge(&decl.kind, u);
                }
                let planner = matches!(
                    decl.kind,
                    TaskKind::Agent {
                        decompose: true,
                        ..
                    }
                ) && m.nodes[n].item.is_none();
                // A planner's answer becomes its subtasks, or an `output` failure like any
                // other failed attempt.
                let mut plan = None;
                let result = match result {
                    Ok(answer) if planner => match subtasks(&self.wf, &answer) {
                        Ok(children) => {
                            plan = Some(children);
                            Ok(Json::Null)
                        }
                        Err(problem) => Err(WorkError {
                            class: ErrorClass::Output,
                            message: format!("the plan is not usable: {problem}"),
                        }),
                    },
                    other => other,
                };
                if let Err(e) = &result {
                    self.last_errors.insert(key.clone(), e.message.clone());
                }
                match (result, plan) {
                    (Ok(_), Some(children)) => {
                        // The plan is durable in the planner's journaled conversation; the
                        // task finishes when its subtasks do.
                        self.record(Event::TaskExpanded {
                            run: self.run_id.clone(),
                            ts: now_ms(),
                            task: m.nodes[n].key.clone(),
                            items: children.len(),
                        })?;
                        queue.push_back(MEvent::Decomposed(n, children));
                    }
                    (Ok(output), None) => {
                        self.succeed(m, n, output, usage)?;
                        queue.push_back(MEvent::Succeeded(n));
                    }
                    (Err(e), _) => {
                        let error = Some(self.redact(&e.message));
                        self.remember(m, n, Status::Failed, None, error.clone());
                        let actions = m.handle(MEvent::Failed(n, e.class));
                        if m.nodes[n].status == Status::Failed {
                            let mut event =
                                self.finished_event(m, n, Status::Failed, None, error, None);
                            with_usage(&mut event, usage);
                            self.record(event)?;
                        }
                        self.apply(m, actions, queue)?;
                        if e.class == ErrorClass::Budget && self.failure.is_none() {
                            // A spent budget stops the whole run, resumable with a bigger one.
                            self.failure = Some(self.redact(&e.message));
                            self.stop_all(m, queue)?;
                        }
                    }
                }
                if self.failure.is_none() {
                    if let Some(limit) = self.wf.budget.usd.filter(|l| self.cost_usd > *l) {
                        self.failure = Some(format!(
                            "cost budget of ${limit:.2} exhausted (${:.4} spent)",
                            self.cost_usd
                        ));
                        self.stop_all(m, queue)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn succeed(
        &mut self,
        m: &Machine,
        n: NodeId,
        output: Json,
        usage: Option<Usage>,
    ) -> Result<(), EngineError> {
        let output = Some(self.redact_json(output));
        self.remember(m, n, Status::Succeeded, output.clone(), None);
        let mut event = self.finished_event(m, n, Status::Succeeded, output, None, None);
        with_usage(&mut event, usage);
        self.record(event)
    }

    /// What tools called for this task can reach.
    /// Where a task's commands run.
    fn sandbox_for(
        &self,
        choice: &crate::workflow::SandboxChoice,
    ) -> Result<Arc<dyn crate::sandbox::Sandbox>, String> {
        match choice {
            crate::workflow::SandboxChoice::Host => Ok(Arc::new(crate::sandbox::HostSandbox)),
            crate::workflow::SandboxChoice::Profile(profile) => self
                .sandboxes
                .get(&profile.to_string())
                .map(|s| Arc::clone(s) as Arc<dyn crate::sandbox::Sandbox>)
                .ok_or_else(|| "the task's container sandbox was not started".to_string()),
            crate::workflow::SandboxChoice::Unset => {
                Err("the task has no sandbox (`sandbox: host` or a profile)".into())
            }
        }
    }

    fn tool_env(&self, key: &str, tools: &[String]) -> Result<crate::agents::ToolEnv, String> {
        Ok(crate::agents::ToolEnv {
            workspace: self.workspace.clone(),
            workflow_dir: self.wf.dir.clone(),
            journal: self.agent_journal()?,
            run_id: self.run_id.clone(),
            task: key.to_string(),
            http_allow: self.wf.http_allow.clone(),
            tools: Arc::new(
                crate::agents::agent_tools(&self.wf, tools)?
                    .into_iter()
                    .map(|(s, t)| (s.name, t))
                    .collect(),
            ),
            sandbox: None,
            memory: self.memory.clone(),
            agent: String::new(),
            secrets: self.secrets.clone().into(),
        })
    }

    /// A Lua agent (`agents.<name>.script`): its `run(task, ctx)` with the host API.
    fn script_agent(
        &self,
        m: &Machine,
        n: NodeId,
        agent: &str,
        prompt: String,
    ) -> Result<Work, String> {
        let decl = self
            .wf
            .agents
            .get(agent)
            .ok_or_else(|| format!("unknown agent `{agent}`"))?;
        let path = decl.script.clone().unwrap_or_default();
        let code = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let source = crate::scripting::ScriptSource {
            lang: crate::scripting::Lang::Lua,
            code,
            name: path.display().to_string(),
            first_line: 1,
        };
        let key = m.nodes[n].key.clone();
        let node_decl = m.nodes[n].decl;
        let needs: serde_json::Map<String, Json> = script_tasks(&self.wf, &self.results, node_decl)
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v["output"].clone()))
                    .collect()
            })
            .unwrap_or_default();
        let task = serde_json::json!({
            "id": key,
            "prompt": prompt,
            "item": m.nodes[n].item,
            "inputs": self.inputs,
            "needs": needs,
        });
        let journal = self.agent_journal()?;
        if m.nodes[n].attempt > 1 || self.rerun.contains(&key) {
            // A new attempt after a failure asks the model afresh.
            if let Ok(j) = journal.lock() {
                j.clear_turns(&self.run_id, &key)
                    .map_err(|e| e.to_string())?;
            }
        }
        let (provider, model) = match self.wf.models.get(&decl.model) {
            Some(model) => (
                Some(Arc::new(crate::agents::JournaledProvider {
                    inner: self.provider(&decl.model)?,
                    journal,
                    run_id: self.run_id.clone(),
                    task: key.clone(),
                    secrets: self.secrets.clone(),
                }) as Arc<dyn crate::llm::Provider>),
                model.model.clone().unwrap_or_default(),
            ),
            None => (None, String::new()),
        };
        let mut env = self.tool_env(&key, &decl.tools)?;
        env.agent = agent.to_string();
        env.sandbox = self
            .sandbox_for(&self.wf.tasks[m.nodes[n].decl].sandbox)
            .ok();
        let specs = crate::agents::agent_tools(&self.wf, &decl.tools)?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let cx =
            crate::agents::script_context(&env, provider, model, agent.to_string(), task, specs);
        let limits = crate::scripting::Limits {
            deadline: self.wf.tasks[node_decl]
                .timeout
                .map(|t| std::time::Instant::now() + t),
            ..crate::scripting::Limits::default()
        };
        Ok(Work::ScriptAgent(Box::new((source, cx, limits))))
    }

    fn agent_journal(&self) -> Result<crate::agents::SharedJournal, String> {
        if let Some(j) = self.agent_journal.get() {
            return Ok(j.clone());
        }
        let journal = Journal::open(&self.opts.home).map_err(|e| e.to_string())?;
        Ok(self
            .agent_journal
            .get_or_init(|| Arc::new(std::sync::Mutex::new(journal)))
            .clone())
    }

    /// The provider of a named model, built once per run.
    fn provider(&self, model: &str) -> Result<Arc<dyn crate::llm::Provider>, String> {
        if let Some(replay) = &self.replay {
            return Ok(replay.clone());
        }
        let mut cache = self
            .providers
            .lock()
            .map_err(|_| "provider cache poisoned")?;
        if let Some(p) = cache.get(model) {
            return Ok(p.clone());
        }
        let decl = self
            .wf
            .models
            .get(model)
            .ok_or_else(|| format!("model `{model}` is not declared"))?;
        let provider: Arc<dyn crate::llm::Provider> = if decl.provider == "replay" {
            // A cassette named in the workflow, matched with this run's values scrubbed.
            let file = decl
                .settings
                .get("file")
                .and_then(Json::as_str)
                .unwrap_or_default();
            let replay = crate::llm::Replay::load(&self.wf.dir.join(file))
                .map_err(|e| format!("model `{model}`: {e}"))?;
            Arc::new(replay.with_scrub(self.scrub.clone()))
        } else {
            crate::llm::build::provider(decl, &self.wf.dir)
                .map_err(|e| format!("model `{model}`: {e}"))?
        };
        let limit = |k: &str| decl.settings.get(k).and_then(serde_json::Value::as_u64);
        let provider = crate::llm::limit::Limited::wrap(
            provider,
            limit("concurrency").map(|n| n as usize),
            limit("rpm").map(|n| n.min(u32::MAX as u64) as u32),
        );
        let provider = match &self.opts.llm {
            LlmMode::Record(_, Some(cassette)) => crate::llm::wrap_for_record(provider, cassette),
            _ => provider,
        };
        cache.insert(model.to_string(), provider.clone());
        Ok(provider)
    }

    /// Adds an agent task's tokens to the run's cost, priced by its model's `price`.
    fn charge(&mut self, kind: &TaskKind, usage: Usage) {
        let TaskKind::Agent { agent, .. } = kind else {
            return;
        };
        if self
            .wf
            .agents
            .get(agent)
            .is_some_and(|a| a.script.is_some())
        {
            // LLM agents count their tokens as they go; scripts report them at the end.
            self.run_tokens
                .fetch_add(usage.total(), std::sync::atomic::Ordering::Relaxed);
        }
        let price = self
            .wf
            .agents
            .get(agent)
            .and_then(|a| self.wf.models.get(&a.model))
            .and_then(|model| model.settings.get("price"));
        if let Some(price) = price {
            let per_million = |k: &str| price.get(k).and_then(Json::as_f64).unwrap_or(0.0);
            self.cost_usd += usage.input_tokens as f64 * per_million("input") / 1e6
                + usage.output_tokens as f64 * per_million("output") / 1e6;
        }
    }
}

/// Most subtasks one plan may create.
const MAX_SUBTASKS: usize = 20;

/// The JSON Schema a planning agent's answer must satisfy.
fn plan_schema(wf: &Workflow) -> Json {
    let agents: Vec<&str> = wf
        .agents
        .iter()
        .filter(|(_, a)| a.script.is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    serde_json::json!({
        "type": "object",
        "required": ["subtasks"],
        "properties": {
            "subtasks": {
                "type": "array", "minItems": 1, "maxItems": MAX_SUBTASKS,
                "items": {
                    "type": "object",
                    "required": ["id", "agent", "prompt"],
                    "properties": {
                        "id": { "type": "string" },
                        "agent": { "type": "string", "enum": agents },
                        "prompt": { "type": "string" },
                        "needs": { "type": "array", "items": { "type": "string" } }
                    }
                }
            }
        }
    })
}

/// Checks a plan beyond its schema (ids, agents, needs in order) and turns it into children.
fn subtasks(wf: &Workflow, plan: &Json) -> Result<Vec<(String, Json, Vec<usize>)>, String> {
    let items = plan["subtasks"].as_array().ok_or("no `subtasks` list")?;
    if items.is_empty() || items.len() > MAX_SUBTASKS {
        return Err(format!(
            "{} subtasks (1 to {MAX_SUBTASKS} allowed)",
            items.len()
        ));
    }
    let mut ids: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for item in items {
        let id = item["id"].as_str().unwrap_or_default().to_string();
        let valid = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || ids.contains(&id) {
            return Err(format!("subtask id `{id}` is empty, invalid or repeated"));
        }
        let agent = item["agent"].as_str().unwrap_or_default();
        if !wf.agents.contains_key(agent) {
            return Err(format!("subtask `{id}` names unknown agent `{agent}`"));
        }
        let mut needs = Vec::new();
        for need in item["needs"].as_array().into_iter().flatten() {
            let need = need.as_str().unwrap_or_default();
            match ids.iter().position(|i| i == need) {
                Some(ix) => needs.push(ix),
                None => {
                    return Err(format!(
                        "subtask `{id}` needs `{need}`, which is not listed before it"
                    ))
                }
            }
        }
        ids.push(id.clone());
        out.push((id, item.clone(), needs));
    }
    Ok(out)
}

fn with_usage(event: &mut Event, usage: Option<Usage>) {
    if let Event::TaskFinished { usage: slot, .. } = event {
        *slot = usage;
    }
}

/// Fills a custom tool's missing arguments from its `params` defaults and refuses unknown
/// or missing ones, so the script sees exactly what the tool declares.
pub(crate) fn apply_param_defaults(
    tool: &str,
    params: &Json,
    given: &mut serde_json::Map<String, Json>,
) -> Result<(), String> {
    let Json::Object(params) = params else {
        return Ok(());
    };
    if let Some(unknown) = given.keys().find(|k| !params.contains_key(*k)) {
        return Err(format!("tool `{tool}` has no parameter `{unknown}`"));
    }
    for (name, spec) in params {
        if given.contains_key(name) {
            continue;
        }
        match spec.get("default") {
            Some(d) => {
                given.insert(name.clone(), d.clone());
            }
            None => return Err(format!("tool `{tool}` needs the argument `{name}`")),
        }
    }
    Ok(())
}

/// Applies `output.parse` and `output.schema` to a task's raw output.
fn shape_output(
    raw: Json,
    spec: Option<&crate::workflow::OutputSpec>,
    is_run: bool,
) -> Result<Json, WorkError> {
    let Some(spec) = spec else { return Ok(raw) };
    let invalid = |message: String| WorkError {
        class: ErrorClass::Output,
        message,
    };
    let value = match (spec.parse, is_run) {
        (Some(parse), true) => {
            let stdout = raw.get("stdout").and_then(Json::as_str).unwrap_or_default();
            match parse {
                OutputParse::Text => Json::String(stdout.trim_end().to_string()),
                OutputParse::Lines => Json::Array(
                    stdout
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(|l| Json::String(l.to_string()))
                        .collect(),
                ),
                OutputParse::Json => serde_json::from_str(stdout.trim())
                    .map_err(|e| invalid(format!("stdout is not JSON: {e}")))?,
            }
        }
        _ => raw,
    };
    if let Some(schema) = &spec.schema {
        let problems = super::schema_check::check(schema, &value);
        if !problems.is_empty() {
            return Err(invalid(format!(
                "output does not match `output.schema`: {}",
                problems.join("; ")
            )));
        }
    }
    Ok(value)
}

struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn ask_yes_no(question: &str) -> Option<bool> {
    use std::io::Write;
    let mut err = std::io::stderr();
    let _ = write!(err, "{question}");
    let _ = err.flush();
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(matches!(
            line.trim().to_ascii_lowercase().as_str(),
            "y" | "yes"
        )),
    }
}

/// Ctrl-C and SIGTERM, when this run listens for them.
struct Signals {
    enabled: bool,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new(enabled: bool) -> Self {
        let term = if enabled {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
        } else {
            None
        };
        Signals { enabled, term }
    }

    async fn recv(&mut self) {
        if !self.enabled {
            return std::future::pending().await;
        }
        match &mut self.term {
            Some(term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Runs a sub-workflow as a child run in the same journal; resumes it if it exists.
pub async fn run_child(
    path: PathBuf,
    inputs: Vec<(String, Json)>,
    run_id: String,
    parent: String,
    opts: ExecOptions,
) -> Result<Json, WorkError> {
    let fail = |message: String| WorkError {
        class: ErrorClass::Workflow,
        message,
    };
    let wf = crate::workflow::load(&path).map_err(|r| {
        fail(format!(
            "sub-workflow `{}` is invalid:\n{}",
            path.display(),
            r.render()
        ))
    })?;
    let mut given = serde_json::Map::new();
    for (k, v) in inputs {
        given.insert(k, v);
    }
    for (k, decl) in &wf.inputs {
        if !given.contains_key(k) {
            match &decl.default {
                Some(d) => {
                    given.insert(k.clone(), d.clone());
                }
                None => return Err(fail(format!("sub-workflow input `{k}` is missing"))),
            }
        }
    }
    let mut journal = Journal::open(&opts.home).map_err(|e| fail(e.to_string()))?;
    let existing = journal.run(&run_id).map_err(|e| fail(e.to_string()))?;
    let restored: HashMap<String, TaskRecord> = match &existing {
        Some(_) => journal
            .tasks(&run_id)
            .map_err(|e| fail(e.to_string()))?
            .into_iter()
            .filter(|t| t.status == "succeeded")
            .map(|t| (t.key.clone(), t))
            .collect(),
        None => HashMap::new(),
    };
    let spec = RunSpec {
        workflow: Arc::new(wf),
        run_id: run_id.clone(),
        parent: Some(parent),
        inputs: given,
        restored,
        resumed: existing.is_some(),
    };
    let summary = Box::pin(execute(spec, &opts, &mut journal, &mut NullSink))
        .await
        .map_err(|e| fail(e.to_string()))?;
    match summary.status {
        RunStatus::Succeeded => Ok(Json::Object(summary.outputs)),
        other => Err(fail(format!(
            "sub-workflow run {run_id} {}{}",
            other.name(),
            summary.error.map(|e| format!(": {e}")).unwrap_or_default()
        ))),
    }
}
