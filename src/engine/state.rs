//! The scheduling state machine: events in, actions out, no I/O.
//!
//! It knows the task tree, dependencies, statuses, attempts and limits; it does not know
//! outputs, templates, processes or the journal. The executor feeds it what happened and
//! carries out what it asks for, so every scheduling rule is tested here without a runtime.

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::Value as Json;

use crate::workflow::{ErrorClass, TaskIx, TaskKind, Workflow};

pub type NodeId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for its dependencies or its group.
    Pending,
    /// Its `when`/`for_each` is being evaluated by the executor.
    Preparing,
    /// Dependencies met, waiting for a free slot.
    Ready,
    Running,
    /// Failed an attempt; waiting out the backoff before the next.
    RetryWait,
    AwaitingApproval,
    Succeeded,
    Failed,
    Skipped,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Skipped)
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Preparing => "preparing",
            Status::Ready => "ready",
            Status::Running => "running",
            Status::RetryWait => "retrying",
            Status::AwaitingApproval => "awaiting_approval",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// One unit of the run: a declared task, or one item of a `for_each` fan-out.
#[derive(Debug, Clone)]
pub struct Node {
    /// Journal key: the task id, with `[i]` for fan-out items (`review[2]`).
    pub key: String,
    pub decl: TaskIx,
    pub item: Option<Json>,
    pub parent: Option<NodeId>,
    pub children: Vec<NodeId>,
    pub needs: Vec<NodeId>,
    pub dependents: Vec<NodeId>,
    pub status: Status,
    pub attempt: u32,
    /// A failure that `continue_on_error` lets dependents and groups ignore.
    pub tolerated: bool,
    /// Whether this node runs work itself (false for groups and fan-outs).
    pub is_leaf: bool,
}

/// What the executor reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// `when` evaluated false.
    PreparedSkip(NodeId),
    PreparedRun(NodeId),
    /// `for_each` evaluated to these items.
    PreparedFanOut(NodeId, Vec<Json>),
    PrepareFailed(NodeId),
    Succeeded(NodeId),
    Failed(NodeId, ErrorClass),
    /// The backoff before the next attempt is over.
    RetryDue(NodeId),
    NeedsApproval(NodeId),
    /// Stop launching work (Ctrl-C, budget); running work is being stopped by the executor.
    Cancel,
    /// The executor stopped this node's work after `Cancel`; it is not done.
    Aborted(NodeId),
}

/// What the machine asks the executor to do or record.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Evaluate `when` / `for_each` and report back with a `Prepared*` event.
    Prepare(NodeId),
    Launch { node: NodeId, attempt: u32 },
    /// Wait out the backoff, then report `RetryDue`.
    ScheduleRetry { node: NodeId, next_attempt: u32 },
    /// A status the executor did not cause itself: skips, restored nodes, groups finishing.
    Settled { node: NodeId, status: Status, reason: Option<String> },
    /// Fan-out items were created (their ids are `children` of the node).
    Expanded { node: NodeId, count: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    /// Stopped before the end: cancelled, or waiting for an approval.
    Incomplete,
}

pub struct Machine<'w> {
    pub workflow: &'w Workflow,
    pub nodes: Vec<Node>,
    roots: Vec<NodeId>,
    max_parallel: usize,
    running_leaves: usize,
    running_by_limit: HashMap<String, usize>,
    running_by_fanout: HashMap<NodeId, usize>,
    ready: VecDeque<NodeId>,
    /// Keys that succeeded in an earlier session of this run (resume).
    restored: HashSet<String>,
    cancelled: bool,
    in_flight: usize,
}

impl<'w> Machine<'w> {
    pub fn new(workflow: &'w Workflow, max_parallel: usize, restored: HashSet<String>) -> Self {
        let mut nodes: Vec<Node> = workflow
            .tasks
            .iter()
            .enumerate()
            .map(|(ix, t)| Node {
                key: t.id.clone(),
                decl: ix,
                item: None,
                parent: t.parent,
                children: t.children.clone(),
                needs: t.needs.clone(),
                dependents: Vec::new(),
                status: Status::Pending,
                attempt: 0,
                tolerated: false,
                is_leaf: !matches!(t.kind, TaskKind::Group) && t.for_each.is_none(),
            })
            .collect();
        for ix in 0..nodes.len() {
            for need in nodes[ix].needs.clone() {
                nodes[need].dependents.push(ix);
            }
        }
        Machine {
            workflow,
            nodes,
            roots: workflow.roots.clone(),
            max_parallel: max_parallel.max(1),
            running_leaves: 0,
            running_by_limit: HashMap::new(),
            running_by_fanout: HashMap::new(),
            ready: VecDeque::new(),
            restored,
            cancelled: false,
            in_flight: 0,
        }
    }

    /// Starts the run: every root whose dependencies are met gets going.
    pub fn start(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let roots = self.roots.clone();
        for r in roots {
            self.check(r, &mut actions);
        }
        self.fill_slots(&mut actions);
        actions
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::PreparedSkip(n) => {
                self.in_flight -= 1;
                self.settle(n, Status::Skipped, Some("`when` is false".into()), &mut actions);
            }
            Event::PreparedRun(n) => {
                self.in_flight -= 1;
                self.begin(n, &mut actions);
            }
            Event::PreparedFanOut(n, items) => {
                self.in_flight -= 1;
                self.fan_out(n, items, &mut actions);
            }
            Event::PrepareFailed(n) => {
                self.in_flight -= 1;
                self.finish_failed(n, &mut actions);
            }
            Event::Succeeded(n) => {
                self.release(n);
                self.nodes[n].status = Status::Succeeded;
                self.after_terminal(n, &mut actions);
            }
            Event::Failed(n, class) => {
                self.release(n);
                let decl = &self.workflow.tasks[self.nodes[n].decl];
                let attempt = self.nodes[n].attempt;
                if !self.cancelled && attempt < decl.retry.attempts && decl.retry.on.contains(&class) {
                    self.nodes[n].status = Status::RetryWait;
                    self.in_flight += 1;
                    actions.push(Action::ScheduleRetry { node: n, next_attempt: attempt + 1 });
                } else {
                    self.finish_failed(n, &mut actions);
                }
            }
            Event::RetryDue(n) => {
                if self.nodes[n].status == Status::RetryWait {
                    self.in_flight -= 1;
                    self.enqueue(n);
                }
            }
            Event::NeedsApproval(n) => {
                self.release(n);
                self.nodes[n].status = Status::AwaitingApproval;
            }
            Event::Cancel => {
                self.cancelled = true;
                for n in std::mem::take(&mut self.ready) {
                    self.nodes[n].status = Status::Pending;
                }
            }
            Event::Aborted(n) => {
                match self.nodes[n].status {
                    Status::Running => self.release(n),
                    Status::RetryWait => self.in_flight -= 1,
                    _ => {}
                }
                self.nodes[n].status = Status::Pending;
            }
        }
        self.fill_slots(&mut actions);
        actions
    }

    /// Whether nothing more can happen: all done, or stuck on approvals, or cancelled and idle.
    pub fn is_quiescent(&self) -> bool {
        self.running_leaves == 0 && self.in_flight == 0 && self.ready.is_empty()
    }

    pub fn outcome(&self) -> Outcome {
        let all_done = self.roots.iter().all(|&r| self.nodes[r].status.is_terminal());
        if !all_done {
            return Outcome::Incomplete;
        }
        if self.roots.iter().any(|&r| self.nodes[r].status == Status::Failed && !self.nodes[r].tolerated) {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        }
    }

    pub fn awaiting_approval(&self) -> Vec<NodeId> {
        (0..self.nodes.len()).filter(|&n| self.nodes[n].status == Status::AwaitingApproval).collect()
    }

    fn finish_failed(&mut self, n: NodeId, actions: &mut Vec<Action>) {
        self.nodes[n].status = Status::Failed;
        self.nodes[n].tolerated = self.workflow.tasks[self.nodes[n].decl].continue_on_error;
        self.after_terminal(n, actions);
    }

    fn release(&mut self, n: NodeId) {
        if self.nodes[n].status != Status::Running {
            return;
        }
        self.running_leaves -= 1;
        if let Some(limit) = &self.workflow.tasks[self.nodes[n].decl].concurrency {
            if let Some(c) = self.running_by_limit.get_mut(limit) {
                *c = c.saturating_sub(1);
            }
        }
        if let Some(p) = self.fanout_parent(n) {
            if let Some(c) = self.running_by_fanout.get_mut(&p) {
                *c = c.saturating_sub(1);
            }
        }
    }

    fn fanout_parent(&self, n: NodeId) -> Option<NodeId> {
        let p = self.nodes[n].parent?;
        (self.nodes[n].item.is_some() && self.nodes[p].decl == self.nodes[n].decl).then_some(p)
    }

    /// Re-examines a pending node: can it start, or must it be skipped?
    fn check(&mut self, n: NodeId, actions: &mut Vec<Action>) {
        if self.nodes[n].status != Status::Pending || self.cancelled {
            return;
        }
        if let Some(p) = self.nodes[n].parent {
            if self.nodes[p].status != Status::Running {
                return;
            }
        }
        let mut blocked_by = None;
        for &need in &self.nodes[n].needs {
            let dep = &self.nodes[need];
            if !dep.status.is_terminal() {
                return;
            }
            let ok = dep.status == Status::Succeeded || (dep.status == Status::Failed && dep.tolerated);
            if !ok && blocked_by.is_none() {
                blocked_by = Some(need);
            }
        }
        if let Some(dep) = blocked_by {
            let reason = format!("`{}` {}", self.nodes[dep].key, self.nodes[dep].status.name());
            self.settle(n, Status::Skipped, Some(reason), actions);
            return;
        }
        if self.restored.contains(&self.nodes[n].key) {
            self.settle(n, Status::Succeeded, Some("restored from the journal".into()), actions);
            return;
        }
        let decl = &self.workflow.tasks[self.nodes[n].decl];
        let needs_prepare = self.nodes[n].item.is_none() && (decl.when.is_some() || decl.for_each.is_some());
        if needs_prepare {
            self.nodes[n].status = Status::Preparing;
            self.in_flight += 1;
            actions.push(Action::Prepare(n));
        } else {
            self.begin(n, actions);
        }
    }

    fn begin(&mut self, n: NodeId, actions: &mut Vec<Action>) {
        let decl = &self.workflow.tasks[self.nodes[n].decl];
        if decl.for_each.is_some() && self.nodes[n].item.is_none() {
            // A fan-out reached `begin` without items: the executor must prepare it.
            self.nodes[n].status = Status::Preparing;
            self.in_flight += 1;
            actions.push(Action::Prepare(n));
            return;
        }
        if matches!(decl.kind, TaskKind::Group) {
            self.nodes[n].status = Status::Running;
            let children = self.nodes[n].children.clone();
            for c in children {
                self.check(c, actions);
            }
            self.maybe_complete_container(n, actions);
        } else {
            self.enqueue(n);
        }
    }

    fn enqueue(&mut self, n: NodeId) {
        self.nodes[n].status = Status::Ready;
        self.ready.push_back(n);
    }

    fn fan_out(&mut self, n: NodeId, items: Vec<Json>, actions: &mut Vec<Action>) {
        let decl = self.nodes[n].decl;
        let base = self.nodes[n].key.clone();
        let mut children = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let id = self.nodes.len();
            self.nodes.push(Node {
                key: format!("{base}[{i}]"),
                decl,
                item: Some(item),
                parent: Some(n),
                children: Vec::new(),
                needs: Vec::new(),
                dependents: Vec::new(),
                status: Status::Pending,
                attempt: 0,
                tolerated: false,
                is_leaf: true,
            });
            children.push(id);
        }
        self.nodes[n].children = children.clone();
        self.nodes[n].status = Status::Running;
        actions.push(Action::Expanded { node: n, count: children.len() });
        for c in children {
            self.check(c, actions);
        }
        self.maybe_complete_container(n, actions);
    }

    fn settle(&mut self, n: NodeId, status: Status, reason: Option<String>, actions: &mut Vec<Action>) {
        self.nodes[n].status = status;
        actions.push(Action::Settled { node: n, status, reason });
        if status == Status::Skipped {
            // Children of a skipped group will never start: report them as skipped too.
            let children = self.nodes[n].children.clone();
            for c in children {
                if self.nodes[c].status == Status::Pending {
                    let reason = format!("group `{}` skipped", self.nodes[n].key);
                    self.settle(c, Status::Skipped, Some(reason), actions);
                }
            }
        }
        self.after_terminal(n, actions);
    }

    fn after_terminal(&mut self, n: NodeId, actions: &mut Vec<Action>) {
        let dependents = self.nodes[n].dependents.clone();
        for d in dependents {
            self.check(d, actions);
        }
        if let Some(p) = self.nodes[n].parent {
            self.maybe_complete_container(p, actions);
        }
    }

    fn maybe_complete_container(&mut self, n: NodeId, actions: &mut Vec<Action>) {
        if self.nodes[n].status != Status::Running || self.nodes[n].is_leaf {
            return;
        }
        let children = &self.nodes[n].children;
        if !children.iter().all(|&c| self.nodes[c].status.is_terminal()) {
            return;
        }
        let failed = children
            .iter()
            .find(|&&c| self.nodes[c].status == Status::Failed && !self.nodes[c].tolerated)
            .copied();
        match failed {
            None => {
                self.nodes[n].status = Status::Succeeded;
                actions.push(Action::Settled { node: n, status: Status::Succeeded, reason: None });
            }
            Some(c) => {
                self.nodes[n].status = Status::Failed;
                self.nodes[n].tolerated = self.workflow.tasks[self.nodes[n].decl].continue_on_error;
                let reason = format!("`{}` failed", self.nodes[c].key);
                actions.push(Action::Settled { node: n, status: Status::Failed, reason: Some(reason) });
            }
        }
        self.after_terminal(n, actions);
    }

    /// Launches ready work while global, named and fan-out limits allow.
    fn fill_slots(&mut self, actions: &mut Vec<Action>) {
        if self.cancelled {
            return;
        }
        let mut i = 0;
        while i < self.ready.len() && self.running_leaves < self.max_parallel {
            let n = self.ready[i];
            let decl = &self.workflow.tasks[self.nodes[n].decl];
            let limit_ok = decl.concurrency.as_ref().is_none_or(|l| {
                let cap = self.workflow.concurrency.get(l).copied().unwrap_or(usize::MAX);
                self.running_by_limit.get(l).copied().unwrap_or(0) < cap
            });
            let fanout = self.fanout_parent(n);
            let fanout_ok = fanout.is_none_or(|p| {
                let cap = decl.max_parallel.unwrap_or(usize::MAX);
                self.running_by_fanout.get(&p).copied().unwrap_or(0) < cap
            });
            if !(limit_ok && fanout_ok) {
                i += 1;
                continue;
            }
            self.ready.remove(i);
            if let Some(l) = &decl.concurrency {
                *self.running_by_limit.entry(l.clone()).or_default() += 1;
            }
            if let Some(p) = fanout {
                *self.running_by_fanout.entry(p).or_default() += 1;
            }
            self.running_leaves += 1;
            let node = &mut self.nodes[n];
            node.status = Status::Running;
            node.attempt += 1;
            actions.push(Action::Launch { node: n, attempt: node.attempt });
        }
    }
}
