//! What templates and scripts see: `inputs`, `tasks`, `item`, `run`, `env`.
//!
//! `tasks` is a live view over the results map rather than a copy, so rendering one
//! template costs the same in a 10-task and a 10,000-task workflow.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use minijinja::value::{Enumerator, Object, Value};
use serde_json::Value as Json;

use crate::workflow::{TaskIx, Workflow};

/// The recorded result of one task (by journal key).
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub status: String,
    pub output: Option<Json>,
    pub error: Option<String>,
    pub attempts: u32,
}

pub type Results = Arc<RwLock<HashMap<String, TaskResult>>>;

#[derive(Debug)]
struct TasksView {
    workflow: Arc<Workflow>,
    results: Results,
}

#[derive(Debug)]
struct TaskView {
    workflow: Arc<Workflow>,
    results: Results,
    task: TaskIx,
}

impl Object for TasksView {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let task = self.workflow.task_by_id(name)?;
        Some(Value::from_object(TaskView {
            workflow: self.workflow.clone(),
            results: self.results.clone(),
            task,
        }))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys: Vec<Value> = self
            .workflow
            .roots
            .iter()
            .map(|&r| Value::from(self.workflow.tasks[r].key()))
            .collect();
        Enumerator::Values(keys)
    }
}

impl Object for TaskView {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let decl = &self.workflow.tasks[self.task];
        let results = self.results.read().ok()?;
        let result = results.get(&decl.id);
        match name {
            "status" => Some(Value::from(
                result.map(|r| r.status.as_str()).unwrap_or("pending"),
            )),
            "output" => Some(
                result
                    .and_then(|r| r.output.as_ref())
                    .map(Value::from_serialize)
                    .unwrap_or(Value::from(())),
            ),
            "error" => Some(
                result
                    .and_then(|r| r.error.as_deref())
                    .map(Value::from)
                    .unwrap_or(Value::from(())),
            ),
            "attempts" => Some(Value::from(result.map(|r| r.attempts).unwrap_or(0))),
            child => {
                let c = decl
                    .children
                    .iter()
                    .copied()
                    .find(|&c| self.workflow.tasks[c].key() == child)?;
                Some(Value::from_object(TaskView {
                    workflow: self.workflow.clone(),
                    results: self.results.clone(),
                    task: c,
                }))
            }
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["status", "output", "error", "attempts"])
    }
}

/// Everything a template of one task can read.
pub struct ContextParts<'a> {
    pub workflow: &'a Arc<Workflow>,
    pub results: &'a Results,
    pub inputs: &'a Json,
    pub run: &'a Json,
    pub env: &'a Json,
    pub item: Option<&'a Json>,
}

pub fn template_context(parts: &ContextParts) -> Value {
    let tasks = Value::from_object(TasksView {
        workflow: parts.workflow.clone(),
        results: parts.results.clone(),
    });
    let mut map: Vec<(&str, Value)> = vec![
        ("inputs", Value::from_serialize(parts.inputs)),
        ("tasks", tasks),
        ("run", Value::from_serialize(parts.run)),
        ("env", Value::from_serialize(parts.env)),
    ];
    if let Some(item) = parts.item {
        map.push(("item", Value::from_serialize(item)));
    }
    Value::from_iter(map)
}

/// The `tasks` global for scripts: results of the tasks this one (or its groups) needs.
pub fn script_tasks(workflow: &Workflow, results: &Results, task: TaskIx) -> Json {
    let mut out = serde_json::Map::new();
    let Ok(results) = results.read() else {
        return Json::Object(out);
    };
    let mut cur = Some(task);
    while let Some(c) = cur {
        for &need in &workflow.tasks[c].needs {
            let id = &workflow.tasks[need].id;
            if let Some(r) = results.get(id) {
                out.insert(
                    id.clone(),
                    serde_json::json!({ "status": r.status, "output": r.output, "error": r.error }),
                );
            }
        }
        cur = workflow.tasks[c].parent;
    }
    Json::Object(out)
}
