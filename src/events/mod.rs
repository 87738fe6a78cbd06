//! Events: every outcome of a run, journaled first and then shown (progress, NDJSON).
//!
//! The serialized form is the stable `--output json` schema (documented in docs/events.md):
//! one object per line with an `event` tag, the run id, and a Unix-millisecond `ts`.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run: String,
        ts: u64,
        workflow: String,
        name: String,
        resumed: bool,
        tasks: usize,
    },
    TaskStarted {
        run: String,
        ts: u64,
        task: String,
        kind: String,
        attempt: u32,
    },
    TaskRetrying {
        run: String,
        ts: u64,
        task: String,
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    TaskExpanded {
        run: String,
        ts: u64,
        task: String,
        items: usize,
    },
    ApprovalRequested {
        run: String,
        ts: u64,
        task: String,
        message: String,
    },
    TaskFinished {
        run: String,
        ts: u64,
        task: String,
        status: String,
        attempt: u32,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        output: Option<Json>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// LLM tokens this task used (agent tasks).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<crate::llm::Usage>,
    },
    RunFinished {
        run: String,
        ts: u64,
        status: String,
        duration_ms: u64,
        succeeded: usize,
        failed: usize,
        skipped: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RunStarted { .. } => "run_started",
            Event::TaskStarted { .. } => "task_started",
            Event::TaskRetrying { .. } => "task_retrying",
            Event::TaskExpanded { .. } => "task_expanded",
            Event::ApprovalRequested { .. } => "approval_requested",
            Event::TaskFinished { .. } => "task_finished",
            Event::RunFinished { .. } => "run_finished",
        }
    }

    pub fn task(&self) -> Option<&str> {
        match self {
            Event::TaskStarted { task, .. }
            | Event::TaskRetrying { task, .. }
            | Event::TaskExpanded { task, .. }
            | Event::ApprovalRequested { task, .. }
            | Event::TaskFinished { task, .. } => Some(task),
            _ => None,
        }
    }
}

/// Where events go after the journal: the progress display, NDJSON, or nothing.
pub trait EventSink: Send {
    fn emit(&mut self, event: &Event);
    /// Runs `f` with the display paused (for interactive prompts).
    fn suspend(&mut self, f: &mut dyn FnMut()) {
        f()
    }
    fn finish(&mut self) {}
    /// Live detail of a running task (tokens streaming in); not journaled, not an event.
    fn progress(&mut self, _task: &str, _detail: &str) {}
}

/// Discards events (sub-workflows report through their parent's task line).
pub struct NullSink;

impl EventSink for NullSink {
    fn emit(&mut self, _event: &Event) {}
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
