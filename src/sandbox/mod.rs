//! The sandbox seam: where a step's shell command runs, and what comes back from it.
//!
//! The engine only sees the `Sandbox` trait, so a backend (the host, a container) can be
//! chosen per workflow without the executor knowing how a command is isolated.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub mod docker;
pub mod host;

pub use docker::{DockerSandbox, Profile};
pub use host::HostSandbox;

const READ_CHUNK: usize = 16 * 1024;

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
    /// The limit that stopped or hampered the command, in words ("memory limit 512MiB
    /// exceeded"), when a backend can tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
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
    /// The container engine is missing, refused, or failed; the message says what to do.
    #[error("{0}")]
    Docker(String),
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

/// One output stream: the first `limit` bytes are kept, the rest is read and discarded so
/// the command never blocks on a full pipe.
pub(crate) struct Capture {
    kept: Vec<u8>,
    limit: usize,
    pub(crate) truncated: bool,
    pub(crate) error: Option<io::Error>,
    /// Every byte seen, kept or not.
    pub(crate) seen: u64,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            kept: Vec::new(),
            limit,
            truncated: false,
            error: None,
            seen: 0,
        }
    }

    pub(crate) async fn fill_from(&mut self, pipe: Option<impl AsyncRead + Unpin>) {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = vec![0; READ_CHUNK];
        loop {
            match pipe.read(&mut chunk).await {
                Ok(0) => return,
                Ok(read) => self.keep(&chunk[..read]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.error = Some(error);
                    return;
                }
            }
        }
    }

    pub(crate) fn keep(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        let room = self.limit.saturating_sub(self.kept.len());
        let kept = bytes.len().min(room);
        self.kept.extend_from_slice(&bytes[..kept]);
        self.truncated |= kept < bytes.len();
    }

    pub(crate) fn into_text(mut self) -> String {
        if self.truncated {
            drop_cut_character(&mut self.kept);
        }
        match String::from_utf8(self.kept) {
            Ok(text) => text,
            Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
        }
    }
}

/// The limit may cut a multi-byte character in half. Those bytes are ours to drop, not the
/// command's invalid output, and decoding them would push the text past the limit.
fn drop_cut_character(bytes: &mut Vec<u8>) {
    let Some(last) = bytes.utf8_chunks().last() else {
        return;
    };
    let tail = last.invalid();
    let incomplete = std::str::from_utf8(tail).is_err_and(|error| error.error_len().is_none());
    if incomplete {
        bytes.truncate(bytes.len() - tail.len());
    }
}
