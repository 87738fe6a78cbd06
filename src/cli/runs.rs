//! `helix runs`: list, show, logs and prune runs from the journal.

use clap::Subcommand;

use super::{open_journal, EXIT_INVALID, EXIT_OK};
use crate::codes::Code;
use crate::store::{Journal, RunRecord};
use crate::workflow::units::human_duration;

#[derive(Subcommand)]
pub enum RunsCommand {
    /// The newest runs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One run's tasks, statuses, attempts and errors.
    Show {
        run_id: String,
        /// Print the run's events as NDJSON instead.
        #[arg(long)]
        events: bool,
    },
    /// stdout/stderr captured from a run's commands.
    Logs {
        run_id: String,
        task: Option<String>,
    },
    /// Delete old finished runs.
    Prune {
        /// Keep this many of the newest finished runs.
        #[arg(long)]
        keep: Option<usize>,
        /// Delete finished runs older than this many days.
        #[arg(long)]
        keep_days: Option<u32>,
    },
}

fn when(ms: u64) -> String {
    let age = crate::events::now_ms().saturating_sub(ms);
    format!(
        "{} ago",
        human_duration(std::time::Duration::from_millis(age))
    )
}

fn find(journal: &Journal, run_ref: &str) -> Result<RunRecord, i32> {
    match journal.find_run(run_ref) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => {
            eprintln!(
                "error[{}]: no run `{run_ref}` in {}",
                Code::RunNotFound,
                journal.path().display()
            );
            Err(EXIT_INVALID)
        }
        Err(e) => {
            eprintln!("error[{}]: {e}", Code::Journal);
            Err(EXIT_INVALID)
        }
    }
}

pub fn runs(command: RunsCommand) -> i32 {
    let (mut journal, _) = match open_journal() {
        Ok(j) => j,
        Err(code) => return code,
    };
    let result = match command {
        RunsCommand::List { limit } => journal.runs(limit).map(|runs| {
            if runs.is_empty() {
                println!("no runs yet; start one with `helix apply FILE`");
            }
            for r in runs {
                println!(
                    "{:<22} {:<18} {:<24} {}",
                    r.id,
                    r.status,
                    r.workflow_name,
                    when(r.created_ms)
                );
            }
        }),
        RunsCommand::Show { run_id, events } => {
            let run = match find(&journal, &run_id) {
                Ok(r) => r,
                Err(code) => return code,
            };
            if events {
                journal
                    .events(&run.id)
                    .map(|evs| evs.iter().for_each(|e| println!("{e}")))
            } else {
                println!(
                    "run       {}\nworkflow  {} ({})\nstatus    {}\nstarted   {}",
                    run.id,
                    run.workflow_name,
                    run.workflow_path,
                    run.status,
                    when(run.created_ms)
                );
                if let Some(e) = &run.error {
                    println!("error     {e}");
                }
                println!("inputs    {}", run.inputs);
                let usage = journal.task_usage(&run.id).unwrap_or_default();
                if let Ok((input, output)) = journal.run_usage(&run.id) {
                    if input + output > 0 {
                        println!("tokens    {} in, {} out", input, output);
                    }
                }
                journal.tasks(&run.id).map(|tasks| {
                    println!();
                    for t in tasks {
                        let took = t
                            .duration_ms
                            .map(|d| human_duration(std::time::Duration::from_millis(d)))
                            .unwrap_or_default();
                        let tokens = usage
                            .get(&t.key)
                            .map(|(i, o)| format!("  {} tokens", i + o))
                            .unwrap_or_default();
                        println!(
                            "{:<32} {:<18} attempt {:<3} {took}{tokens}",
                            t.key, t.status, t.attempt
                        );
                        if let Some(e) = &t.error {
                            println!("    error: {}", e.lines().next().unwrap_or(""));
                        }
                        if let Some(r) = t.reason.as_ref().filter(|_| t.status == "skipped") {
                            println!("    reason: {r}");
                        }
                        if let Some(o) = &t.output {
                            let text = o.to_string();
                            let shown: String = text.chars().take(200).collect();
                            println!(
                                "    output: {shown}{}",
                                if shown.len() < text.len() { "…" } else { "" }
                            );
                        }
                    }
                })
            }
        }
        RunsCommand::Logs { run_id, task } => {
            let run = match find(&journal, &run_id) {
                Ok(r) => r,
                Err(code) => return code,
            };
            journal.logs(&run.id, task.as_deref()).map(|logs| {
                if logs.is_empty() {
                    eprintln!(
                        "no output captured for run {}{}",
                        run.id,
                        task.map(|t| format!(" task {t}")).unwrap_or_default()
                    );
                }
                for (t, attempt, stream, text) in logs {
                    println!("── {t} (attempt {attempt}, {stream})");
                    print!("{text}");
                    if !text.ends_with('\n') {
                        println!();
                    }
                }
            })
        }
        RunsCommand::Prune { keep, keep_days } => {
            if keep.is_none() && keep_days.is_none() {
                eprintln!("error: say what to keep: `--keep N` and/or `--keep-days D`");
                return EXIT_INVALID;
            }
            journal
                .prune(keep, keep_days, None)
                .map(|n| println!("pruned {n} run{}", if n == 1 { "" } else { "s" }))
        }
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error[{}]: {e}", Code::Journal);
            EXIT_INVALID
        }
    }
}
