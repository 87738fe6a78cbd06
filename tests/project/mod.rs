//! A temporary helix project for end-to-end tests: a directory with its own `HELIX_HOME`,
//! the real `helix` binary run in it, and its journal to look into.

// Each test binary uses the part it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A run that takes longer than this counts as hung.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The key the tests' model declarations read through `api_key_env: HELIX_TEST_KEY`.
pub const TEST_KEY: &str = "sk-test-0123456789abcdef";

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join(".helix")
    }

    /// Writes `w.yaml` in the project.
    pub fn workflow(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("w.yaml");
        std::fs::write(&path, text).expect("write workflow");
        path
    }

    /// Runs `helix ARGS` in the project with `vars` added to its environment.
    pub fn helix_with(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_helix"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("HELIX_HOME", self.home())
            .env("HELIX_TEST_KEY", TEST_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in vars {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn helix");
        let t0 = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            assert!(t0.elapsed() < RUN_LIMIT, "helix {args:?} hung");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().expect("output")
    }

    pub fn helix(&self, args: &[&str]) -> Output {
        self.helix_with(args, &[])
    }

    /// `helix apply FILE --output plain`.
    pub fn apply(&self, workflow: &Path) -> Output {
        let file = workflow.to_str().expect("path");
        self.helix(&["apply", file, "--output", "plain"])
    }

    /// The newest run's id.
    pub fn run_id(&self) -> String {
        let journal = helix::store::Journal::open(&self.home()).expect("journal");
        journal
            .find_run("latest")
            .expect("query")
            .expect("a run")
            .id
    }

    /// A task of the newest run.
    pub fn task(&self, key: &str) -> helix::store::TaskRecord {
        let journal = helix::store::Journal::open(&self.home()).expect("journal");
        journal
            .tasks(&self.run_id())
            .expect("tasks")
            .into_iter()
            .find(|t| t.key == key)
            .expect("task")
    }

    /// The newest run's workspace.
    pub fn workspace(&self) -> PathBuf {
        self.home()
            .join("runs")
            .join(self.run_id())
            .join("workspace")
    }
}

/// stdout and stderr together, for assertions and their messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
