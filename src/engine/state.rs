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
    /// A planning agent's subtasks: (key suffix, item, indices of the subtasks each needs).
    Decomposed(NodeId, Vec<(String, Json, Vec<usize>)>),
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
    Launch {
        node: NodeId,
        attempt: u32,
    },
    /// Wait out the backoff, then report `RetryDue`.
    ScheduleRetry {
        node: NodeId,
        next_attempt: u32,
    },
    /// A status the executor did not cause itself: skips, restored nodes, groups finishing.
    Settled {
        node: NodeId,
        status: Status,
        reason: Option<String>,
    },
    /// Fan-out items were created (their ids are `children` of the node).
    Expanded {
        node: NodeId,
        count: usize,
    },
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
                self.settle(
                    n,
                    Status::Skipped,
                    Some("`when` is false".into()),
                    &mut actions,
                );
            }
            Event::PreparedRun(n) => {
                self.in_flight -= 1;
                self.begin(n, &mut actions);
            }
            Event::PreparedFanOut(n, items) => {
                self.in_flight -= 1;
                let base = self.nodes[n].key.clone();
                let children = items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| (format!("{base}[{i}]"), item, Vec::new()))
                    .collect();
                self.fan_out(n, children, &mut actions);
            }
            Event::Decomposed(n, subtasks) => {
                // The planner's work is done; the node now waits for its subtasks.
                self.release(n);
                self.nodes[n].is_leaf = false;
                let base = self.nodes[n].key.clone();
                let children = subtasks
                    .into_iter()
                    .map(|(id, item, needs)| (format!("{base}.{id}"), item, needs))
                    .collect();
                self.fan_out(n, children, &mut actions);
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
                if !self.cancelled
                    && attempt < decl.retry.attempts
                    && decl.retry.on.contains(&class)
                {
                    self.nodes[n].status = Status::RetryWait;
                    self.in_flight += 1;
                    actions.push(Action::ScheduleRetry {
                        node: n,
                        next_attempt: attempt + 1,
                    });
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
        if !self.is_quiescent() {
            return Outcome::Incomplete;
        }
        // A failure decides the outcome even while another branch waits for an approval.
        if self
            .roots
            .iter()
            .any(|&r| self.nodes[r].status == Status::Failed && !self.nodes[r].tolerated)
        {
            return Outcome::Failed;
        }
        let all_done = self
            .roots
            .iter()
            .all(|&r| self.nodes[r].status.is_terminal());
        if all_done {
            Outcome::Succeeded
        } else {
            Outcome::Incomplete
        }
    }

    pub fn awaiting_approval(&self) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&n| self.nodes[n].status == Status::AwaitingApproval)
            .collect()
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
            let ok =
                dep.status == Status::Succeeded || (dep.status == Status::Failed && dep.tolerated);
            if !ok && blocked_by.is_none() {
                blocked_by = Some(need);
            }
        }
        if let Some(dep) = blocked_by {
            let reason = format!(
                "`{}` {}",
                self.nodes[dep].key,
                self.nodes[dep].status.name()
            );
            self.settle(n, Status::Skipped, Some(reason), actions);
            return;
        }
        // Only leaves are restored as such: a group or fan-out is re-entered so that its
        // children are restored one by one (and a task needing one of them can start).
        if self.nodes[n].is_leaf && self.restored.contains(&self.nodes[n].key) {
            self.settle(
                n,
                Status::Succeeded,
                Some("restored from the journal".into()),
                actions,
            );
            return;
        }
        let decl = &self.workflow.tasks[self.nodes[n].decl];
        let needs_prepare =
            self.nodes[n].item.is_none() && (decl.when.is_some() || decl.for_each.is_some());
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
        // After a cancel nothing launches: the node stays not-done so the run can quiesce.
        if self.cancelled {
            self.nodes[n].status = Status::Pending;
            return;
        }
        self.nodes[n].status = Status::Ready;
        self.ready.push_back(n);
    }

    /// Creates children at run time: `(key, item, indices of siblings it needs)`.
    fn fan_out(
        &mut self,
        n: NodeId,
        items: Vec<(String, Json, Vec<usize>)>,
        actions: &mut Vec<Action>,
    ) {
        let decl = self.nodes[n].decl;
        let first = self.nodes.len();
        let mut children = Vec::with_capacity(items.len());
        for (key, item, needs) in items.into_iter() {
            let id = self.nodes.len();
            let needs: Vec<NodeId> = needs.into_iter().map(|i| first + i).collect();
            self.nodes.push(Node {
                key,
                decl,
                item: Some(item),
                parent: Some(n),
                children: Vec::new(),
                needs,
                dependents: Vec::new(),
                status: Status::Pending,
                attempt: 0,
                tolerated: false,
                is_leaf: true,
            });
            children.push(id);
        }
        for &c in &children {
            for need in self.nodes[c].needs.clone() {
                self.nodes[need].dependents.push(c);
            }
        }
        self.nodes[n].children = children.clone();
        self.nodes[n].status = Status::Running;
        actions.push(Action::Expanded {
            node: n,
            count: children.len(),
        });
        for c in children {
            self.check(c, actions);
        }
        self.maybe_complete_container(n, actions);
    }

    fn settle(
        &mut self,
        n: NodeId,
        status: Status,
        reason: Option<String>,
        actions: &mut Vec<Action>,
    ) {
        self.nodes[n].status = status;
        actions.push(Action::Settled {
            node: n,
            status,
            reason,
        });
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
                actions.push(Action::Settled {
                    node: n,
                    status: Status::Succeeded,
                    reason: None,
                });
            }
            Some(c) => {
                self.nodes[n].status = Status::Failed;
                self.nodes[n].tolerated = self.workflow.tasks[self.nodes[n].decl].continue_on_error;
                let reason = format!("`{}` failed", self.nodes[c].key);
                actions.push(Action::Settled {
                    node: n,
                    status: Status::Failed,
                    reason: Some(reason),
                });
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
                let cap = self
                    .workflow
                    .concurrency
                    .get(l)
                    .copied()
                    .unwrap_or(usize::MAX);
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
            actions.push(Action::Launch {
                node: n,
                attempt: node.attempt,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Validates a workflow from YAML text; `body` is everything after `helix:` and `name:`.
    fn workflow(body: &str) -> Workflow {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("workflow.yaml");
        std::fs::write(&path, format!("helix: 1\nname: test\n{body}")).expect("write workflow");
        match crate::workflow::load(&path) {
            Ok(wf) => wf,
            Err(report) => panic!("test workflow does not validate:\n{report}"),
        }
    }

    /// How the stand-in executor answers `Prepare` for a task.
    #[derive(Clone)]
    enum Prepared {
        Skip,
        Items(Vec<Json>),
    }

    /// Plays the executor: answers `Prepare` (run, unless told otherwise) and records what the
    /// machine asks for; the test decides when and how launched work ends.
    struct Driver<'w> {
        m: Machine<'w>,
        answers: HashMap<String, Prepared>,
        /// Every action of the last step, those caused by answered prepares included.
        last: Vec<Action>,
        /// Every `Settled` so far, by key: the status and the reason.
        settled: HashMap<String, (Status, Option<String>)>,
    }

    impl<'w> Driver<'w> {
        fn new(wf: &'w Workflow, max_parallel: usize) -> Self {
            Self::resumed(wf, max_parallel, &[])
        }

        fn resumed(wf: &'w Workflow, max_parallel: usize, restored: &[&str]) -> Self {
            let restored = restored.iter().map(|k| k.to_string()).collect();
            Driver {
                m: Machine::new(wf, max_parallel, restored),
                answers: HashMap::new(),
                last: Vec::new(),
                settled: HashMap::new(),
            }
        }

        fn answer(mut self, key: &str, prepared: Prepared) -> Self {
            self.answers.insert(key.to_string(), prepared);
            self
        }

        fn start(&mut self) {
            let actions = self.m.start();
            self.play(actions);
        }

        fn send(&mut self, event: Event) {
            let actions = self.m.handle(event);
            self.play(actions);
        }

        fn succeed(&mut self, key: &str) {
            self.send(Event::Succeeded(self.id(key)));
        }

        fn fail(&mut self, key: &str, class: ErrorClass) {
            self.send(Event::Failed(self.id(key), class));
        }

        /// Carries out actions like the executor does: the batch first, then the events its
        /// prepares produced, in order.
        fn play(&mut self, actions: Vec<Action>) {
            self.last.clear();
            let mut events = VecDeque::new();
            self.take(actions, &mut events);
            while let Some(event) = events.pop_front() {
                let actions = self.m.handle(event);
                self.take(actions, &mut events);
            }
        }

        fn take(&mut self, actions: Vec<Action>, events: &mut VecDeque<Event>) {
            for action in actions {
                match &action {
                    Action::Prepare(n) => {
                        let event = match self.answers.get(&self.m.nodes[*n].key) {
                            None => Event::PreparedRun(*n),
                            Some(Prepared::Skip) => Event::PreparedSkip(*n),
                            Some(Prepared::Items(items)) => {
                                Event::PreparedFanOut(*n, items.clone())
                            }
                        };
                        events.push_back(event);
                    }
                    Action::Settled {
                        node,
                        status,
                        reason,
                    } => {
                        let key = self.m.nodes[*node].key.clone();
                        self.settled.insert(key, (*status, reason.clone()));
                    }
                    _ => {}
                }
                self.last.push(action);
            }
        }

        fn id(&self, key: &str) -> NodeId {
            match self.m.nodes.iter().position(|n| n.key == key) {
                Some(n) => n,
                None => panic!("no node `{key}`"),
            }
        }

        fn status(&self, key: &str) -> Status {
            self.m.nodes[self.id(key)].status
        }

        /// Keys launched in the last step, in launch order.
        fn launched(&self) -> Vec<&str> {
            self.last
                .iter()
                .filter_map(|a| match a {
                    Action::Launch { node, .. } => Some(self.m.nodes[*node].key.as_str()),
                    _ => None,
                })
                .collect()
        }

        fn reason(&self, key: &str) -> Option<&str> {
            self.settled
                .get(key)
                .and_then(|(_, reason)| reason.as_deref())
        }
    }

    const INDEPENDENT_FOUR: &str = "
tasks:
  a: { script: '1' }
  b: { script: '1' }
  c: { script: '1' }
  d: { script: '1' }
";

    #[test]
    fn a_chain_runs_in_order() {
        let wf = workflow(
            "
tasks:
  first: { script: '1' }
  second: { script: '1', needs: [first] }
  third: { script: '1', needs: [second] }
",
        );
        let mut d = Driver::new(&wf, 4);
        d.start();
        assert_eq!(d.launched(), ["first"]);
        assert_eq!(d.status("second"), Status::Pending);
        d.succeed("first");
        assert_eq!(d.launched(), ["second"]);
        assert_eq!(d.status("third"), Status::Pending);
        d.succeed("second");
        assert_eq!(d.launched(), ["third"]);
        assert_eq!(d.m.outcome(), Outcome::Incomplete);
        d.succeed("third");
        assert!(d.last.is_empty());
        assert_eq!(d.m.outcome(), Outcome::Succeeded);
        assert!(d.m.is_quiescent());
    }

    #[test]
    fn independent_tasks_run_concurrently_up_to_max_parallel() {
        let wf = workflow(INDEPENDENT_FOUR);
        let mut d = Driver::new(&wf, 2);
        d.start();
        assert_eq!(d.launched(), ["a", "b"]);
        assert_eq!(d.status("c"), Status::Ready);
        assert_eq!(d.status("d"), Status::Ready);
    }

    #[test]
    fn a_finished_task_frees_its_slot_for_the_next() {
        let wf = workflow(INDEPENDENT_FOUR);
        let mut d = Driver::new(&wf, 2);
        d.start();
        d.succeed("b");
        assert_eq!(d.launched(), ["c"]);
        d.fail("a", ErrorClass::Script);
        assert_eq!(d.launched(), ["d"]);
        d.succeed("c");
        assert!(d.launched().is_empty());
    }

    #[test]
    fn a_named_concurrency_limit_is_shared_by_its_tasks() {
        let wf = workflow(
            "
concurrency: { llm: 1 }
tasks:
  ask1: { script: '1', concurrency: llm }
  ask2: { script: '1', concurrency: llm }
  local: { script: '1' }
",
        );
        let mut d = Driver::new(&wf, 4);
        d.start();
        assert_eq!(d.launched(), ["ask1", "local"]);
        assert_eq!(d.status("ask2"), Status::Ready);
        d.succeed("local");
        assert!(d.launched().is_empty());
        d.succeed("ask1");
        assert_eq!(d.launched(), ["ask2"]);
    }

    const FAN_OUT: &str = "
tasks:
  review:
    for_each: '[1, 2, 3]'
    max_parallel: 2
    script: '1'
  report: { script: '1', needs: [review] }
";

    fn three_items() -> Prepared {
        Prepared::Items(vec![json!("a.py"), json!("b.py"), json!("c.py")])
    }

    #[test]
    fn a_fan_out_runs_no_more_items_at_once_than_its_max_parallel() {
        let wf = workflow(FAN_OUT);
        let mut d = Driver::new(&wf, 8).answer("review", three_items());
        d.start();
        assert_eq!(d.launched(), ["review[0]", "review[1]"]);
        assert_eq!(d.status("review[2]"), Status::Ready);
        d.succeed("review[1]");
        assert_eq!(d.launched(), ["review[2]"]);
    }

    #[test]
    fn for_each_creates_one_child_per_item_and_succeeds_after_all_of_them() {
        let wf = workflow(FAN_OUT);
        let mut d = Driver::new(&wf, 8).answer("review", three_items());
        d.start();
        let review = d.id("review");
        assert_eq!(d.last[0], Action::Prepare(review));
        assert_eq!(
            d.last[1],
            Action::Expanded {
                node: review,
                count: 3
            }
        );
        let children: Vec<&str> = d.m.nodes[review]
            .children
            .iter()
            .map(|&c| d.m.nodes[c].key.as_str())
            .collect();
        assert_eq!(children, ["review[0]", "review[1]", "review[2]"]);
        assert_eq!(d.m.nodes[d.id("review[2]")].item, Some(json!("c.py")));

        d.succeed("review[0]");
        d.succeed("review[1]");
        assert_eq!(d.status("review"), Status::Running);
        assert_eq!(d.status("report"), Status::Pending);
        d.succeed("review[2]");
        assert_eq!(d.status("review"), Status::Succeeded);
        assert_eq!(d.launched(), ["report"]);
    }

    #[test]
    fn an_empty_for_each_succeeds_at_once() {
        let wf = workflow(FAN_OUT);
        let mut d = Driver::new(&wf, 8).answer("review", Prepared::Items(Vec::new()));
        d.start();
        let review = d.id("review");
        assert!(d.last.contains(&Action::Expanded {
            node: review,
            count: 0
        }));
        assert_eq!(d.settled["review"], (Status::Succeeded, None));
        assert_eq!(d.launched(), ["report"]);
    }

    #[test]
    fn a_failed_item_fails_the_fan_out_once_all_items_are_done() {
        let wf = workflow(FAN_OUT);
        let mut d = Driver::new(&wf, 8).answer("review", three_items());
        d.start();
        d.fail("review[1]", ErrorClass::Script);
        assert_eq!(d.launched(), ["review[2]"]);
        assert_eq!(d.status("review"), Status::Running);
        d.succeed("review[0]");
        d.succeed("review[2]");
        assert_eq!(d.status("review"), Status::Failed);
        assert_eq!(d.reason("review"), Some("`review[1]` failed"));
        assert_eq!(d.status("report"), Status::Skipped);
        assert_eq!(d.m.outcome(), Outcome::Failed);
    }

    #[test]
    fn a_false_when_skips_the_task_and_its_dependents() {
        let wf = workflow(
            "
tasks:
  deploy: { script: '1', when: 'false' }
  smoke: { script: '1', needs: [deploy] }
  notify: { script: '1', needs: [smoke] }
",
        );
        let mut d = Driver::new(&wf, 4).answer("deploy", Prepared::Skip);
        d.start();
        assert!(d.launched().is_empty());
        assert_eq!(d.status("deploy"), Status::Skipped);
        assert_eq!(d.reason("deploy"), Some("`when` is false"));
        assert_eq!(d.status("smoke"), Status::Skipped);
        assert_eq!(d.reason("smoke"), Some("`deploy` skipped"));
        assert_eq!(d.reason("notify"), Some("`smoke` skipped"));
        assert_eq!(d.m.outcome(), Outcome::Succeeded);
        assert!(d.m.is_quiescent());
    }

    #[test]
    fn a_skipped_group_reports_its_children_skipped() {
        let wf = workflow(
            "
tasks:
  qa:
    when: 'false'
    tasks:
      unit: { script: '1' }
      lint: { script: '1', needs: [unit] }
      deep:
        tasks:
          fuzz: { script: '1' }
",
        );
        let mut d = Driver::new(&wf, 4).answer("qa", Prepared::Skip);
        d.start();
        assert!(d.launched().is_empty());
        for key in ["qa.unit", "qa.lint", "qa.deep"] {
            assert_eq!(
                d.settled[key],
                (Status::Skipped, Some("group `qa` skipped".into())),
                "{key}"
            );
        }
        assert_eq!(
            d.settled["qa.deep.fuzz"],
            (Status::Skipped, Some("group `qa.deep` skipped".into()))
        );
        assert_eq!(d.m.outcome(), Outcome::Succeeded);
    }

    #[test]
    fn a_failure_skips_its_dependents_and_fails_the_run() {
        let wf = workflow(
            "
tasks:
  build: { script: '1' }
  test: { script: '1', needs: [build] }
  lint: { script: '1' }
",
        );
        let mut d = Driver::new(&wf, 4);
        d.start();
        d.fail("build", ErrorClass::Script);
        assert!(d.launched().is_empty());
        assert_eq!(d.status("test"), Status::Skipped);
        assert_eq!(d.reason("test"), Some("`build` failed"));
        assert_eq!(d.m.outcome(), Outcome::Incomplete, "lint is still running");
        d.succeed("lint");
        assert_eq!(d.m.outcome(), Outcome::Failed);
    }

    #[test]
    fn continue_on_error_lets_dependents_run_and_the_run_succeed() {
        let wf = workflow(
            "
tasks:
  lint: { script: '1', continue_on_error: true }
  ship: { script: '1', needs: [lint] }
",
        );
        let mut d = Driver::new(&wf, 4);
        d.start();
        d.fail("lint", ErrorClass::Script);
        assert_eq!(d.status("lint"), Status::Failed);
        assert_eq!(d.launched(), ["ship"]);
        d.succeed("ship");
        assert_eq!(d.m.outcome(), Outcome::Succeeded);
    }

    const FLAKY: &str = "
tasks:
  flaky: { script: '1', retry: 3 }
";

    #[test]
    fn a_failure_with_attempts_left_schedules_a_retry() {
        let wf = workflow(FLAKY);
        let mut d = Driver::new(&wf, 4);
        d.start();
        let flaky = d.id("flaky");
        assert_eq!(
            d.last,
            [Action::Launch {
                node: flaky,
                attempt: 1
            }]
        );
        d.fail("flaky", ErrorClass::Script);
        assert_eq!(
            d.last,
            [Action::ScheduleRetry {
                node: flaky,
                next_attempt: 2
            }]
        );
        assert_eq!(d.status("flaky"), Status::RetryWait);
        assert!(!d.m.is_quiescent(), "the retry is still to come");
        assert_eq!(d.m.outcome(), Outcome::Incomplete);
    }

    #[test]
    fn retry_due_launches_the_next_attempt() {
        let wf = workflow(FLAKY);
        let mut d = Driver::new(&wf, 4);
        d.start();
        d.fail("flaky", ErrorClass::Script);
        let flaky = d.id("flaky");
        d.send(Event::RetryDue(flaky));
        assert_eq!(
            d.last,
            [Action::Launch {
                node: flaky,
                attempt: 2
            }]
        );
        d.succeed("flaky");
        assert_eq!(d.m.outcome(), Outcome::Succeeded);
    }

    #[test]
    fn exhausting_the_attempts_fails_the_task() {
        let wf = workflow(FLAKY);
        let mut d = Driver::new(&wf, 4);
        d.start();
        let flaky = d.id("flaky");
        for attempt in 1..=2 {
            d.fail("flaky", ErrorClass::Script);
            assert_eq!(
                d.last,
                [Action::ScheduleRetry {
                    node: flaky,
                    next_attempt: attempt + 1
                }]
            );
            d.send(Event::RetryDue(flaky));
        }
        assert_eq!(
            d.last,
            [Action::Launch {
                node: flaky,
                attempt: 3
            }]
        );
        d.fail("flaky", ErrorClass::Script);
        assert!(d.last.is_empty());
        assert_eq!(d.status("flaky"), Status::Failed);
        assert_eq!(d.m.outcome(), Outcome::Failed);
        assert!(d.m.is_quiescent());
    }

    #[test]
    fn retry_on_timeout_does_not_retry_an_exit_code_failure() {
        let wf = workflow(
            "
sandbox: host
tasks:
  slow: { run: 'true', retry: { attempts: 3, on: [timeout] } }
  broken: { run: 'true', retry: { attempts: 3, on: [timeout] } }
",
        );
        let mut d = Driver::new(&wf, 4);
        d.start();
        d.fail("slow", ErrorClass::Timeout);
        assert_eq!(
            d.last,
            [Action::ScheduleRetry {
                node: d.id("slow"),
                next_attempt: 2
            }]
        );
        d.fail("broken", ErrorClass::ExitCode);
        assert!(d.last.is_empty());
        assert_eq!(d.status("broken"), Status::Failed);
    }

    const GROUPED: &str = "
tasks:
  build: { script: '1' }
  qa:
    needs: [build]
    tasks:
      unit: { script: '1' }
      lint: { script: '1' }
  ship: { script: '1', needs: [qa] }
";

    #[test]
    fn a_group_starts_its_children_only_after_its_needs() {
        let wf = workflow(GROUPED);
        let mut d = Driver::new(&wf, 4);
        d.start();
        assert_eq!(d.launched(), ["build"]);
        assert_eq!(d.status("qa"), Status::Pending);
        assert_eq!(d.status("qa.unit"), Status::Pending);
        d.succeed("build");
        assert_eq!(d.launched(), ["qa.unit", "qa.lint"]);
        assert_eq!(d.status("qa"), Status::Running);
    }

    #[test]
    fn a_group_succeeds_when_all_its_children_do_and_its_dependent_waits_for_it() {
        let wf = workflow(GROUPED);
        let mut d = Driver::new(&wf, 4);
        d.start();
        d.succeed("build");
        d.succeed("qa.unit");
        assert!(d.launched().is_empty(), "ship must wait for all of qa");
        assert_eq!(d.status("qa"), Status::Running);
        d.succeed("qa.lint");
        assert_eq!(d.settled["qa"], (Status::Succeeded, None));
        assert_eq!(d.launched(), ["ship"]);
    }

    #[test]
    fn a_failed_child_fails_its_group_and_skips_the_group_dependents() {
        let wf = workflow(GROUPED);
        let mut d = Driver::new(&wf, 4);
        d.start();
        d.succeed("build");
        d.fail("qa.lint", ErrorClass::Script);
        assert_eq!(d.status("qa"), Status::Running);
        d.succeed("qa.unit");
        assert_eq!(
            d.settled["qa"],
            (Status::Failed, Some("`qa.lint` failed".into()))
        );
        assert_eq!(d.reason("ship"), Some("`qa` failed"));
        assert_eq!(d.m.outcome(), Outcome::Failed);
    }

    #[test]
    fn an_approval_leaves_the_run_incomplete_and_quiescent() {
        let wf = workflow(
            "
tasks:
  gate: { approve: 'Ship it?' }
  ship: { script: '1', needs: [gate] }
  docs: { script: '1' }
",
        );
        let mut d = Driver::new(&wf, 1);
        d.start();
        assert_eq!(d.launched(), ["gate"]);
        d.send(Event::NeedsApproval(d.id("gate")));
        assert_eq!(d.launched(), ["docs"], "waiting for a human holds no slot");
        d.succeed("docs");
        assert_eq!(d.status("gate"), Status::AwaitingApproval);
        assert_eq!(d.status("ship"), Status::Pending);
        assert_eq!(d.m.awaiting_approval(), [d.id("gate")]);
        assert!(d.m.is_quiescent());
        assert_eq!(d.m.outcome(), Outcome::Incomplete);
    }

    #[test]
    fn after_cancel_nothing_new_launches() {
        let wf = workflow(
            "
tasks:
  a: { script: '1' }
  b: { script: '1' }
  after_a: { script: '1', needs: [a] }
",
        );
        let mut d = Driver::new(&wf, 1);
        d.start();
        assert_eq!(d.status("b"), Status::Ready);
        d.send(Event::Cancel);
        assert!(d.last.is_empty());
        assert_eq!(
            d.status("b"),
            Status::Pending,
            "queued work goes back to not done"
        );
        d.succeed("a");
        assert!(
            d.last.is_empty(),
            "neither the freed slot nor the dependent starts anything"
        );
        assert_eq!(d.status("after_a"), Status::Pending);
        assert!(d.m.is_quiescent());
        assert_eq!(d.m.outcome(), Outcome::Incomplete);
    }

    #[test]
    fn an_aborted_task_releases_its_slot_and_is_not_done() {
        let wf = workflow(
            "
tasks:
  long: { script: '1' }
  flaky: { script: '1', retry: 2 }
",
        );
        let mut d = Driver::new(&wf, 2);
        d.start();
        d.fail("flaky", ErrorClass::Script);
        assert_eq!(d.status("flaky"), Status::RetryWait);
        d.send(Event::Cancel);
        assert!(!d.m.is_quiescent());
        d.send(Event::Aborted(d.id("long")));
        d.send(Event::Aborted(d.id("flaky")));
        assert!(d.last.is_empty());
        assert_eq!(d.status("long"), Status::Pending);
        assert_eq!(d.status("flaky"), Status::Pending);
        assert!(d.m.is_quiescent());
        assert_eq!(d.m.outcome(), Outcome::Incomplete);
        d.send(Event::RetryDue(d.id("flaky")));
        assert!(
            d.last.is_empty(),
            "a late timer does not bring an aborted task back"
        );
        assert!(d.m.is_quiescent());
    }

    #[test]
    fn resume_settles_restored_tasks_without_launching_them() {
        let wf = workflow(
            "
tasks:
  plan: { script: '1' }
  build: { script: '1', needs: [plan] }
",
        );
        let mut d = Driver::resumed(&wf, 4, &["plan"]);
        d.start();
        assert_eq!(d.launched(), ["build"]);
        assert_eq!(
            d.settled["plan"],
            (Status::Succeeded, Some("restored from the journal".into()))
        );
        assert_eq!(d.m.nodes[d.id("plan")].attempt, 0, "never launched");
    }

    #[test]
    fn resume_relaunches_only_the_fan_out_items_that_did_not_succeed() {
        let wf = workflow(FAN_OUT);
        let mut d = Driver::resumed(&wf, 8, &["review[1]"]).answer("review", three_items());
        d.start();
        assert_eq!(d.launched(), ["review[0]", "review[2]"]);
        assert_eq!(d.status("review[1]"), Status::Succeeded);
        assert_eq!(d.reason("review[1]"), Some("restored from the journal"));
        d.succeed("review[0]");
        d.succeed("review[2]");
        assert_eq!(d.status("review"), Status::Succeeded);
    }

    #[test]
    fn resume_of_a_restored_group_lets_tasks_needing_its_children_run() {
        let wf = workflow(
            "
tasks:
  qa:
    tasks:
      unit: { script: '1' }
  report: { script: '1', needs: [qa.unit] }
",
        );
        // The journal of the first session: qa and qa.unit succeeded, report failed.
        let mut d = Driver::resumed(&wf, 4, &["qa", "qa.unit"]);
        d.start();
        assert_eq!(d.status("qa.unit"), Status::Succeeded);
        assert_eq!(d.launched(), ["report"]);
    }

    #[test]
    fn a_retry_timer_firing_after_cancel_does_not_keep_the_run_alive() {
        let wf = workflow(FLAKY);
        let mut d = Driver::new(&wf, 4);
        d.start();
        d.fail("flaky", ErrorClass::Script);
        d.send(Event::Cancel);
        // The timer fires before the executor got round to aborting the waiting task.
        d.send(Event::RetryDue(d.id("flaky")));
        assert!(d.last.is_empty());
        assert_eq!(d.status("flaky"), Status::Pending);
        assert!(d.m.is_quiescent());
    }

    #[test]
    fn is_quiescent_only_when_nothing_is_in_flight() {
        let wf = workflow(
            "
tasks:
  gated: { script: '1', when: 'true' }
",
        );
        let mut m = Machine::new(&wf, 1, HashSet::new());
        assert_eq!(m.start(), [Action::Prepare(0)]);
        assert!(!m.is_quiescent(), "a prepare is outstanding");
        assert_eq!(
            m.handle(Event::PreparedRun(0)),
            [Action::Launch {
                node: 0,
                attempt: 1
            }]
        );
        assert!(!m.is_quiescent(), "the task is running");
        assert!(m.handle(Event::Succeeded(0)).is_empty());
        assert!(m.is_quiescent());
        assert_eq!(m.outcome(), Outcome::Succeeded);
    }
}
