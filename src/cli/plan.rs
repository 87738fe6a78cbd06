//! `helix plan`: the resolved task tree, rendered where inputs make it possible; runs nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{parse_input_args, print_report, EXIT_INVALID, EXIT_OK};
use crate::engine::context::{template_context, ContextParts};
use crate::prompt;
use crate::workflow::{self, units::human_duration, SandboxChoice, TaskKind, Workflow};

pub fn plan(file: &std::path::Path, input_args: &[String]) -> i32 {
    let wf = match workflow::load(file) {
        Ok(w) => w,
        Err(report) => {
            print_report(&report);
            return EXIT_INVALID;
        }
    };
    let given = match parse_input_args(file, input_args) {
        Ok(g) => g,
        Err(report) => {
            print_report(&report);
            return EXIT_INVALID;
        }
    };
    // Missing inputs are shown, not fatal: a plan is for looking before running.
    let (inputs, missing) = match workflow::resolve_inputs(&wf, &given) {
        Ok(i) => (i, Vec::new()),
        Err(report) => {
            let mut known = serde_json::Map::new();
            for (k, d) in &wf.inputs {
                if let Some(v) = d.default.clone() {
                    known.insert(k.clone(), v);
                }
            }
            for (k, v) in &given {
                if let Some(d) = wf.inputs.get(k) {
                    if let Ok(value) = d.ty.from_cli(v) {
                        known.insert(k.clone(), value);
                    }
                }
            }
            (
                known,
                report.diagnostics.into_iter().map(|d| d.message).collect(),
            )
        }
    };
    print_plan(Arc::new(wf), &serde_json::Value::Object(inputs), &missing);
    EXIT_OK
}

fn print_plan(wf: Arc<Workflow>, inputs: &serde_json::Value, missing: &[String]) {
    println!("workflow {} ({})", wf.name, wf.file.display());
    if let Some(d) = &wf.description {
        println!("  {}", d.trim_end());
    }
    if !wf.inputs.is_empty() {
        println!("\ninputs:");
        for (k, d) in &wf.inputs {
            let value = inputs
                .get(k)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "<missing>".into());
            let about = d
                .description
                .as_ref()
                .map(|t| format!("  # {t}"))
                .unwrap_or_default();
            println!("  {k}: {} = {value}{about}", d.ty.name());
        }
    }
    for m in missing {
        println!("  ! {m}");
    }
    if !wf.secrets.is_empty() {
        let state: Vec<String> = wf
            .secrets
            .iter()
            .map(|s| {
                format!(
                    "{s} ({})",
                    if std::env::var_os(s).is_some() {
                        "set"
                    } else {
                        "NOT SET"
                    }
                )
            })
            .collect();
        println!("\nsecrets needed: {}", state.join(", "));
    }
    println!("\nsandbox: {}", sandbox_text(&wf.sandbox));
    if let Some(s) = &wf.schedule {
        println!(
            "schedule: {} (overlap {}, catchup {})",
            s.cron, s.overlap, s.catchup
        );
    }
    let results = Arc::new(RwLock::new(HashMap::new()));
    let run = serde_json::json!({"id": "<run>", "dir": "<run dir>", "workspace": "<workspace>", "workflow": wf.file.display().to_string(), "name": wf.name});
    let env = serde_json::json!({});
    let ctx = template_context(&ContextParts {
        workflow: &wf,
        results: &results,
        inputs,
        run: &run,
        env: &env,
        item: None,
    });
    let templates = prompt::environment(Some(&wf.dir));
    // Task outputs do not exist before a run: such templates are shown as written.
    let show = |text: &str| {
        let shown = if text.contains("tasks.") || text.contains("tasks[") || text.contains("item") {
            text.to_string()
        } else {
            prompt::render(&templates, text, &ctx).unwrap_or_else(|_| text.to_string())
        };
        shown.trim_end().to_string()
    };
    println!("\ntasks:");
    for t in &wf.tasks {
        let depth = {
            let mut d = 0;
            let mut p = t.parent;
            while let Some(x) = p {
                d += 1;
                p = wf.tasks[x].parent;
            }
            d
        };
        let indent = "  ".repeat(depth + 1);
        let needs: Vec<&str> = t.needs.iter().map(|&n| wf.tasks[n].id.as_str()).collect();
        let mut line = format!("{indent}{} [{}]", t.key(), t.kind.name());
        if !needs.is_empty() {
            line.push_str(&format!(" needs {}", needs.join(", ")));
        }
        println!("{line}");
        let detail = format!("{indent}    ");
        match &t.kind {
            TaskKind::Run { command, .. } => println!("{detail}run: {}", show(command)),
            TaskKind::Agent { agent, prompt, .. } => {
                println!("{detail}agent {agent}: {}", show(prompt))
            }
            TaskKind::Script { source } => println!(
                "{detail}script ({:?}): {}",
                source.lang,
                first_line(&source.code)
            ),
            TaskKind::Tool { tool, with } => println!("{detail}tool {tool} with {with}"),
            TaskKind::Workflow { path, .. } => println!("{detail}workflow {}", path.display()),
            TaskKind::Approve { message } => println!("{detail}approve: {}", show(message)),
            TaskKind::Group => {}
        }
        if let Some(w) = &t.when {
            println!("{detail}when: {w}");
        }
        if let Some(f) = &t.for_each {
            println!(
                "{detail}for_each: {f}{}",
                t.max_parallel
                    .map(|m| format!(" (max_parallel {m})"))
                    .unwrap_or_default()
            );
        }
        if t.retry.attempts > 1 {
            println!(
                "{detail}retry: {} attempts, backoff {}",
                t.retry.attempts,
                human_duration(t.retry.backoff)
            );
        }
        if let Some(to) = t.timeout {
            println!("{detail}timeout: {}", human_duration(to));
        }
        if t.continue_on_error {
            println!("{detail}continue_on_error");
        }
        if let Some(c) = &t.concurrency {
            println!("{detail}concurrency: {c}");
        }
        if matches!(t.kind, TaskKind::Run { .. }) && t.sandbox != wf.sandbox {
            println!("{detail}sandbox: {}", sandbox_text(&t.sandbox));
        }
    }
}

fn first_line(code: &str) -> String {
    let line = code
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let more = if code.trim().lines().count() > 1 {
        " …"
    } else {
        ""
    };
    format!("{line}{more}")
}

fn sandbox_text(s: &SandboxChoice) -> String {
    match s {
        SandboxChoice::Unset => "none declared".into(),
        SandboxChoice::Host => "host processes (explicit opt-in)".into(),
        SandboxChoice::Profile(p) => {
            match crate::sandbox::Profile::from_json(p, std::path::Path::new(".")) {
                Ok(profile) => {
                    format!("{}, runs as {}", profile.summary(), profile.user_for_host())
                }
                Err(e) => format!("container profile (invalid: {e})"),
            }
        }
    }
}
