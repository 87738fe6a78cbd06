//! What the benches share: running the real `helix` binary and reading its peak memory.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One run of the binary.
pub struct Measured {
    pub wall: Duration,
    pub max_rss_kib: i64,
    pub status: i32,
}

/// Runs `helix ARGS` (with the caller's environment and directory set on `cmd`) and reads its
/// peak RSS from `wait4`, which also reaps the child.
#[allow(clippy::zombie_processes)]
pub fn measure(mut cmd: Command) -> Measured {
    let t0 = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn helix");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; both out-pointers are valid for writes.
    unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    Measured {
        wall: t0.elapsed(),
        max_rss_kib: usage.ru_maxrss,
        status: libc::WEXITSTATUS(status),
    }
}
