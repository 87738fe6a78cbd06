//! `kill -9` at random moments, then `helix resume`: no finished task runs again, every task
//! ends succeeded, and what downstream tasks consumed is what the journal recorded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use helix::store::Journal;

const TASKS_PER_CHAIN: usize = 5;
const CHAINS: usize = 4;

/// Each task logs `start NAME consumed VALUE…` as it begins, then prints a fresh random value
/// as its output. The log lives outside the journal, so it sees every execution.
fn workflow(log: &Path) -> String {
    let mut y = String::from("helix: 1\nname: durable\nsandbox: host\ntasks:\n");
    let task = |name: &str, needs: &[String]| {
        let consumed: Vec<String> = needs
            .iter()
            .map(|n| format!("{n}={{{{ tasks.{n}.output }}}}"))
            .collect();
        let needs_line = if needs.is_empty() {
            String::new()
        } else {
            format!("    needs: [{}]\n", needs.join(", "))
        };
        format!(
            "  {name}:\n{needs_line}    run: 'echo \"start {name} {}\" >> {}; sleep 0.0$((RANDOM % 6 + 1)); echo $RANDOM$RANDOM'\n    output: {{ parse: text }}\n",
            consumed.join(" "),
            log.display()
        )
    };
    for c in 0..CHAINS {
        for i in 0..TASKS_PER_CHAIN {
            let needs = if i == 0 {
                Vec::new()
            } else {
                vec![format!("c{c}_{}", i - 1)]
            };
            y.push_str(&task(&format!("c{c}_{i}"), &needs));
        }
    }
    let ends: Vec<String> = (0..CHAINS)
        .map(|c| format!("c{c}_{}", TASKS_PER_CHAIN - 1))
        .collect();
    y.push_str(&task("join", &ends));
    y.push_str(&task("after_join", &["join".to_string()]));
    y
}

struct Harness {
    dir: tempfile::TempDir,
    home: PathBuf,
    log: PathBuf,
    file: PathBuf,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        let log = dir.path().join("executions.log");
        let file = dir.path().join("durable.yaml");
        std::fs::write(&file, workflow(&log)).expect("write workflow");
        std::fs::write(&log, "").expect("log");
        Harness {
            dir,
            home,
            log,
            file,
        }
    }

    fn helix(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix"));
        cmd.args(args)
            .args(["--output", "plain", "--max-parallel", "3"])
            .env("HELIX_HOME", &self.home)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    fn start(&self) -> std::process::Child {
        let has_run = Journal::open(&self.home)
            .ok()
            .and_then(|j| j.find_run("latest").ok().flatten())
            .is_some();
        let file = self.file.to_string_lossy().to_string();
        let args: Vec<&str> = if has_run {
            vec!["resume", "latest"]
        } else {
            vec!["apply", &file]
        };
        self.helix(&args).spawn().expect("spawn helix")
    }

    fn journal_tasks(&self) -> HashMap<String, (String, Option<serde_json::Value>)> {
        let Ok(journal) = Journal::open(&self.home) else {
            return HashMap::new();
        };
        let Ok(Some(run)) = journal.find_run("latest") else {
            return HashMap::new();
        };
        journal
            .tasks(&run.id)
            .expect("tasks")
            .into_iter()
            .map(|t| (t.key, (t.status, t.output)))
            .collect()
    }

    fn mark(&self, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("open log");
        writeln!(f, "{text}").expect("mark");
    }
}

#[test]
fn kill_9_at_random_moments_then_resume_loses_and_repeats_nothing() {
    let h = Harness::new();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    // Tasks recorded as succeeded before each kill, in kill order.
    let mut succeeded_before_kill: Vec<Vec<String>> = Vec::new();
    for round in 0..12 {
        let mut child = h.start();
        std::thread::sleep(Duration::from_millis(rng.u64(15..350)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let done: Vec<String> = h
            .journal_tasks()
            .into_iter()
            .filter(|(_, (status, _))| status == "succeeded")
            .map(|(k, _)| k)
            .collect();
        h.mark(&format!("--- kill {round}"));
        succeeded_before_kill.push(done);
    }
    // A last session without interference must finish the run.
    let out = h.start().wait_with_output().expect("final resume");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "final session failed: {stderr}");

    let tasks = h.journal_tasks();
    assert_eq!(tasks.len(), CHAINS * TASKS_PER_CHAIN + 2, "{tasks:?}");
    for (key, (status, _)) in &tasks {
        assert_eq!(status, "succeeded", "task {key}");
    }

    let log = std::fs::read_to_string(&h.log).expect("log");
    // No task recorded as succeeded before a kill started again after it.
    let mut kills_seen = 0;
    let mut finished: std::collections::HashSet<String> = Default::default();
    for line in log.lines() {
        if line.starts_with("--- kill") {
            finished.extend(succeeded_before_kill[kills_seen].iter().cloned());
            kills_seen += 1;
            continue;
        }
        let name = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            !finished.contains(name),
            "{name} ran again after it was journaled as succeeded:\n{log}"
        );
    }

    // The last execution of each task consumed exactly the journaled outputs of its needs.
    let mut last_start: HashMap<String, &str> = HashMap::new();
    for line in log.lines().filter(|l| l.starts_with("start ")) {
        let name = line.split_whitespace().nth(1).unwrap_or_default();
        last_start.insert(name.to_string(), line);
    }
    for (name, line) in &last_start {
        for pair in line.split_whitespace().skip(2) {
            let (need, value) = pair.split_once('=').expect("need=value");
            let journaled = tasks[need].1.clone().expect("output");
            assert_eq!(
                journaled.as_str(),
                Some(value),
                "{name} consumed {need}={value}, journal has {journaled}"
            );
        }
    }
    assert_eq!(last_start.len(), tasks.len());
}

#[test]
fn interrupt_with_sigint_exits_130_and_resume_finishes() {
    let h = Harness::new();
    let file = h.file.to_string_lossy().to_string();
    let child = h.helix(&["apply", &file]).spawn().expect("spawn");
    std::thread::sleep(Duration::from_millis(150));
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let t0 = Instant::now();
    let out = child.wait_with_output().expect("wait");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "interrupt took too long"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(0) {
        // The run finished before the signal arrived on a fast machine: nothing to resume.
        return;
    }
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("helix resume"),
        "the message says how to continue: {stderr}"
    );
    let out = h.helix(&["resume", "latest"]).output().expect("resume");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(h.journal_tasks().values().all(|(s, _)| s == "succeeded"));
}

#[test]
fn resume_stops_commands_a_killed_session_left_running() {
    let h = Harness::new();
    let bg = h.dir.path().join("bg.pid");
    let file = h.dir.path().join("orphan.yaml");
    std::fs::write(
        &file,
        format!(
            "helix: 1\nname: orphan\nsandbox: host\ntasks:\n  long:\n    run: test -e again && exit 0; touch again; sleep 30 & echo $! > {}; sleep 30\n",
            bg.display()
        ),
    )
    .expect("write");
    let mut child = h
        .helix(&["apply", &file.to_string_lossy()])
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    while !bg.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill(); // SIGKILL: the command outlives helix
    let _ = child.wait();
    let pid: i32 = std::fs::read_to_string(&bg)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        running(pid),
        "the background command should still run after kill -9"
    );
    let out = h.helix(&["resume", "latest"]).output().expect("resume");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("left running by an earlier session"),
        "{stderr}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !running(pid),
        "resume must stop the old session's command {pid}"
    );
}

/// Alive and not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}
