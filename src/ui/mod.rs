//! How a run looks: a live indicatif tree on a terminal, plain lines otherwise, or NDJSON.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::events::{Event, EventSink};
use crate::workflow::units::human_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputMode {
    /// Live progress (the default on a terminal).
    Tty,
    /// One line per event (the default when output is not a terminal).
    Plain,
    /// One JSON event per line (NDJSON), see docs/events.md.
    Json,
}

pub fn sink(mode: OutputMode) -> Box<dyn EventSink> {
    match mode {
        OutputMode::Tty => Box::new(TtySink::new()),
        OutputMode::Plain => Box::new(PlainSink::default()),
        OutputMode::Json => Box::new(JsonSink),
    }
}

fn short_error(e: &str) -> String {
    let first = e.lines().next().unwrap_or(e);
    let mut s: String = first.chars().take(160).collect();
    if s.len() < first.len() || e.lines().count() > 1 {
        s.push('…');
    }
    s
}

/// A line that describes a finished task, shared by the terminal and plain modes.
fn finished_line(
    task: &str,
    status: &str,
    attempt: u32,
    duration_ms: u64,
    error: Option<&str>,
    reason: Option<&str>,
) -> String {
    let took = human_duration(Duration::from_millis(duration_ms));
    let attempts = if attempt > 1 {
        format!(", attempt {attempt}")
    } else {
        String::new()
    };
    match status {
        "succeeded" if reason == Some("restored from the journal") => {
            format!("✓ {task} (restored)")
        }
        "succeeded" => format!("✓ {task} ({took}{attempts})"),
        "failed" => format!(
            "✗ {task} ({took}{attempts}): {}",
            short_error(error.or(reason).unwrap_or("failed"))
        ),
        "skipped" => format!(
            "○ {task} skipped{}",
            reason.map(|r| format!(": {r}")).unwrap_or_default()
        ),
        other => format!("· {task} {other}"),
    }
}

pub struct JsonSink;

impl EventSink for JsonSink {
    fn emit(&mut self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }
}

#[derive(Default)]
pub struct PlainSink {
    start: Option<Instant>,
}

impl PlainSink {
    fn line(&mut self, text: &str) {
        let t = self
            .start
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs_f64();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[{t:7.2}s] {text}");
    }
}

impl EventSink for PlainSink {
    fn emit(&mut self, event: &Event) {
        match event {
            Event::RunStarted {
                run, name, resumed, ..
            } => {
                let verb = if *resumed { "resuming" } else { "run" };
                self.line(&format!("{verb} {run} ({name})"));
            }
            Event::TaskStarted {
                task,
                attempt,
                kind,
                ..
            } => {
                let a = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                self.line(&format!("▶ {task} [{kind}]{a}"));
            }
            Event::TaskRetrying {
                task,
                attempt,
                delay_ms,
                error,
                ..
            } => {
                let d = human_duration(Duration::from_millis(*delay_ms));
                self.line(&format!(
                    "↻ {task}: {} — attempt {attempt} in {d}",
                    short_error(error)
                ));
            }
            Event::TaskExpanded { task, items, .. } => {
                self.line(&format!("⑂ {task}: {items} items"))
            }
            Event::ApprovalRequested { task, message, .. } => {
                self.line(&format!("? {task} awaits approval: {message}"))
            }
            Event::TaskFinished {
                task,
                status,
                attempt,
                duration_ms,
                error,
                reason,
                ..
            } => {
                let line = finished_line(
                    task,
                    status,
                    *attempt,
                    *duration_ms,
                    error.as_deref(),
                    reason.as_deref(),
                );
                self.line(&line);
            }
            Event::RunFinished { .. } => {}
        }
    }
}

/// The live terminal display: one spinner per running task under an overall bar.
pub struct TtySink {
    multi: MultiProgress,
    overall: ProgressBar,
    running: HashMap<String, ProgressBar>,
    total: u64,
}

impl TtySink {
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(12));
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template(
                "{spinner:.cyan} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} tasks {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        overall.enable_steady_tick(Duration::from_millis(120));
        TtySink {
            multi,
            overall,
            running: HashMap::new(),
            total: 0,
        }
    }

    fn task_style() -> ProgressStyle {
        ProgressStyle::with_template("  {spinner:.green} {prefix:.bold} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
    }

    fn done(&mut self, task: &str) {
        if let Some(bar) = self.running.remove(task) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }
}

impl Default for TtySink {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for TtySink {
    fn emit(&mut self, event: &Event) {
        match event {
            Event::RunStarted {
                run,
                name,
                tasks,
                resumed,
                ..
            } => {
                self.total = *tasks as u64;
                self.overall.set_length(self.total);
                let verb = if *resumed { "resuming" } else { "running" };
                self.overall.set_message(format!("{verb} {name} · {run}"));
            }
            Event::TaskStarted {
                task,
                attempt,
                kind,
                ..
            } => {
                let bar = self.running.entry(task.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new_spinner());
                    bar.set_style(Self::task_style());
                    bar.enable_steady_tick(Duration::from_millis(100));
                    bar.set_prefix(task.clone());
                    bar
                });
                let a = if *attempt > 1 {
                    format!("attempt {attempt}")
                } else {
                    String::new()
                };
                bar.set_message(format!("{kind} {a}"));
            }
            Event::TaskRetrying {
                task,
                attempt,
                delay_ms,
                error,
                ..
            } => {
                if let Some(bar) = self.running.get(task) {
                    let d = human_duration(Duration::from_millis(*delay_ms));
                    bar.set_message(format!("retry {attempt} in {d}: {}", short_error(error)));
                }
            }
            Event::TaskExpanded { items, .. } => {
                self.total += *items as u64;
                self.overall.set_length(self.total);
            }
            Event::ApprovalRequested { task, message, .. } => {
                self.done(task);
                let _ = self
                    .multi
                    .println(format!("? {task} awaits approval: {message}"));
            }
            Event::TaskFinished {
                task,
                status,
                attempt,
                duration_ms,
                error,
                reason,
                ..
            } => {
                self.done(task);
                self.overall.inc(1);
                let line = finished_line(
                    task,
                    status,
                    *attempt,
                    *duration_ms,
                    error.as_deref(),
                    reason.as_deref(),
                );
                let _ = self.multi.println(line);
            }
            Event::RunFinished { .. } => {}
        }
    }

    fn suspend(&mut self, f: &mut dyn FnMut()) {
        self.multi.suspend(f);
    }

    fn progress(&mut self, task: &str, detail: &str) {
        if let Some(bar) = self.running.get(task) {
            bar.set_message(detail.to_string());
        }
    }

    fn finish(&mut self) {
        for (_, bar) in self.running.drain() {
            bar.finish_and_clear();
        }
        self.overall.finish_and_clear();
        let _ = self.multi.clear();
    }
}
