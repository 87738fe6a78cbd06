//! The sandbox seam: where a step's shell command runs, and what comes back from it.
//!
//! The engine only sees the `Sandbox` trait, so a backend (the host, a container) can be
//! chosen per workflow without the executor knowing how a command is isolated.

use std::path::PathBuf;
use std::time::Duration;

pub mod host;

pub use host::HostSandbox;

/// A boxed future, so `Sandbox` stays object-safe and backends can be picked at run time.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One shell command to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Passed to `sh -c`.
    pub command: String,
    pub workdir: PathBuf,
    /// Added on top of the backend's minimal environment; later entries win.
    pub env: Vec<(String, String)>,
    /// When it passes, everything the command started is killed.
    pub timeout: Option<Duration>,
    /// Bytes kept from each of stdout and stderr; the rest is read and discarded.
    pub output_limit: usize,
}

/// What a finished (or killed) command left behind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExecOutput {
    /// `None` when the command was ended by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Decoded lossily: invalid UTF-8 becomes U+FFFD.
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    #[serde(rename = "duration_ms", serialize_with = "serialize_millis")]
    pub duration: Duration,
}

fn serialize_millis<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    serializer.serialize_u64(millis)
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("working directory `{}` does not exist", .0.display())]
    MissingWorkdir(PathBuf),
    #[error("working directory `{}` is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot start `{command}` in `{}`: {source}", workdir.display())]
    Spawn {
        command: String,
        workdir: PathBuf,
        source: std::io::Error,
    },
    #[error("i/o error while running `{command}`: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
}

/// Somewhere commands can run.
pub trait Sandbox: Send + Sync {
    /// Short backend name for logs and events, e.g. `host`.
    fn name(&self) -> &str;

    /// Runs `req.command` to completion, to its timeout, or until the returned future is
    /// dropped; in the last two cases everything the command started is killed.
    fn exec<'a>(&'a self, req: ExecRequest) -> BoxFuture<'a, Result<ExecOutput, SandboxError>>;
}
