//! The host backend: commands run as ordinary processes on this machine, each in a process
//! group of its own, so that a timeout or a cancelled step can kill everything it started.
//!
//! Nothing is isolated beyond the environment; choosing this backend means trusting the
//! workflow. A descendant that leaves the group on purpose (`setsid`, a daemon) escapes the
//! kill, and `exec` stops waiting for its output after a short grace.

use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::{BoxFuture, Capture, ExecOutput, ExecRequest, Sandbox, SandboxError};

/// Passed through from helix's own environment. Anything else a command needs must be in
/// its request, so a workflow cannot silently depend on who happened to run it.
const KEPT_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "TERM", "TMPDIR", "USER"];

/// How long to keep reading once the command's process group is dead. Only a descendant
/// that left the group can still hold the pipes open by then, and it may do so forever.
const PIPE_DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Runs commands with `/bin/sh -c` directly on the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSandbox;

impl Sandbox for HostSandbox {
    fn name(&self) -> &str {
        "host"
    }

    fn exec<'a>(&'a self, req: ExecRequest) -> BoxFuture<'a, Result<ExecOutput, SandboxError>> {
        Box::pin(run(req))
    }
}

async fn run(req: ExecRequest) -> Result<ExecOutput, SandboxError> {
    let started = Instant::now();
    let mut child = spawn(&req)?;
    let mut group = ProcessGroup::led_by(&child);

    let mut stdout = Capture::new(req.output_limit);
    let mut stderr = Capture::new(req.output_limit);
    let (stdout_pipe, stderr_pipe) = (child.stdout.take(), child.stderr.take());
    let reading = async {
        tokio::join!(stdout.fill_from(stdout_pipe), stderr.fill_from(stderr_pipe));
    };
    let reaping = reap(&mut child, &mut group, req.timeout);
    let (status, timed_out) = reap_while_reading(reaping, reading).await;

    let io_error = |source| SandboxError::Io {
        command: req.command.clone(),
        source,
    };
    let status = status.map_err(io_error)?;
    if let Some(source) = stdout.error.take().or_else(|| stderr.error.take()) {
        return Err(io_error(source));
    }
    let (stdout_truncated, stderr_truncated) = (stdout.truncated, stderr.truncated);
    Ok(ExecOutput {
        exit_code: status.code(),
        signal: status.signal(),
        stdout: stdout.into_text(),
        stderr: stderr.into_text(),
        timed_out,
        stdout_truncated,
        stderr_truncated,
        duration: started.elapsed(),
        limit: timed_out.then(|| "timeout exceeded".to_string()),
    })
}

fn spawn(req: &ExecRequest) -> Result<Child, SandboxError> {
    // An absolute path, so a `PATH` in the request cannot change which shell runs.
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&req.command)
        .current_dir(&req.workdir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for name in KEPT_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(req.env.iter().map(|(name, value)| (name, value)));
    // A new session makes the child the leader of a new process group whose id is its pid,
    // so one `killpg` reaches every descendant that stays in it. It also detaches the command
    // from helix's terminal: it cannot read the user's keystrokes, and Ctrl-C reaches helix,
    // which decides what to cancel.
    //
    // SAFETY: the closure runs in the forked child before `exec`, where only
    // async-signal-safe calls are allowed. `setsid` is one, building an `io::Error` from an
    // errno does not allocate, and the closure captures nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    command.spawn().map_err(|source| spawn_error(req, source))
}

/// The OS reports a missing working directory exactly like a missing shell (`ENOENT`), so
/// look at the directory before blaming the command.
fn spawn_error(req: &ExecRequest, source: io::Error) -> SandboxError {
    match std::fs::metadata(&req.workdir) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            SandboxError::MissingWorkdir(req.workdir.clone())
        }
        Ok(meta) if !meta.is_dir() => SandboxError::NotADirectory(req.workdir.clone()),
        _ => SandboxError::Spawn {
            command: req.command.clone(),
            workdir: req.workdir.clone(),
            source,
        },
    }
}

/// Waits for the command's main process, killing its group at the deadline. Returns the
/// exit status and whether the deadline passed.
async fn reap(
    child: &mut Child,
    group: &mut ProcessGroup,
    timeout: Option<Duration>,
) -> (io::Result<ExitStatus>, bool) {
    let finished = match timeout {
        Some(limit) => tokio::time::timeout(limit, child.wait()).await.ok(),
        None => Some(child.wait().await),
    };
    let timed_out = finished.is_none();
    let status = match finished {
        Some(status) => status,
        None => {
            group.kill();
            child.wait().await
        }
    };
    // Whatever the command left in the background still holds the output pipes; left
    // alone it would keep `exec` waiting for as long as it runs.
    group.kill_and_forget();
    (status, timed_out)
}

/// Polls `reading` alongside `reaping` so the pipes never fill up and stall the command,
/// then gives the readers a bounded grace to collect what is still buffered.
async fn reap_while_reading<R>(
    reaping: impl Future<Output = R>,
    reading: impl Future<Output = ()>,
) -> R {
    tokio::pin!(reaping, reading);
    let mut read_all = false;
    let outcome = loop {
        tokio::select! {
            outcome = &mut reaping => break outcome,
            () = &mut reading, if !read_all => read_all = true,
        }
    };
    if !read_all {
        // Dropping the readers closes our ends of the pipes; a writer that escaped the group
        // gets EPIPE rather than blocking.
        let _ = tokio::time::timeout(PIPE_DRAIN_GRACE, reading).await;
    }
    outcome
}

/// The command's process group. Dropping it kills the group, which is what makes a
/// cancelled `exec` (its future dropped by a `select!` or a timeout) leave nothing running.
struct ProcessGroup {
    id: Option<libc::pid_t>,
}

impl ProcessGroup {
    fn led_by(child: &Child) -> Self {
        // `id` is only `None` after the child has been reaped, and nothing has waited yet.
        let id = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());
        Self { id }
    }

    fn kill(&self) {
        if let Some(id) = self.id {
            // SAFETY: `killpg` takes plain integers and touches no memory of ours. It fails
            // harmlessly (ESRCH) when the group is already empty.
            unsafe {
                libc::killpg(id, libc::SIGKILL);
            }
        }
    }

    /// Kills the group for the last time. Once its leader is reaped and its members are
    /// dead, the id is free for the OS to hand out again, so it must not be signalled later.
    fn kill_and_forget(&mut self) {
        self.kill();
        self.id = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Far beyond anything these commands need; only a hang exceeds it. Not a speed check.
    const HANG_GUARD: Duration = Duration::from_secs(5);

    fn request(command: &str, workdir: &Path) -> ExecRequest {
        ExecRequest {
            command: command.to_owned(),
            workdir: workdir.to_owned(),
            env: Vec::new(),
            timeout: None,
            output_limit: 64 * 1024,
        }
    }

    async fn exec(req: ExecRequest) -> ExecOutput {
        match HostSandbox.exec(req).await {
            Ok(output) => output,
            Err(error) => panic!("exec failed: {error}"),
        }
    }

    /// Waits for a command to write its pid file.
    async fn read_pid(path: &Path) -> libc::pid_t {
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(path) {
                if let Ok(pid) = text.trim().parse() {
                    return pid;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{} was never written", path.display());
    }

    /// A killed process may linger briefly as a zombie until its new parent reaps it; that
    /// counts as gone.
    fn is_running(pid: libc::pid_t) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } == -1 {
            return io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.trim().chars().next());
        state != Some('Z')
    }

    async fn assert_gone(pid: libc::pid_t) {
        for _ in 0..80 {
            if !is_running(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("process {pid} is still running");
    }

    #[tokio::test]
    async fn exit_code_and_both_streams_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = exec(request("echo out; echo err >&2; exit 3", dir.path())).await;
        assert_eq!(output.exit_code, Some(3));
        assert_eq!(output.signal, None);
        assert_eq!(output.stdout, "out\n");
        assert_eq!(output.stderr, "err\n");
        assert!(!output.timed_out);
    }

    #[tokio::test]
    async fn runs_in_the_requested_workdir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = exec(request("pwd -P", dir.path())).await;
        let expected = dir.path().canonicalize().expect("canonical tempdir");
        assert_eq!(output.stdout.trim_end(), expected.to_string_lossy());
    }

    #[tokio::test]
    async fn a_command_killed_by_a_signal_reports_the_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = exec(request("kill -TERM $$", dir.path())).await;
        assert_eq!(output.exit_code, None);
        assert_eq!(output.signal, Some(libc::SIGTERM));
    }

    #[tokio::test]
    async fn environment_holds_only_kept_variables_and_the_request_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut req = request("env", dir.path());
        req.env.push(("HELIX_TEST_VALUE".into(), "42".into()));
        let output = exec(req).await;
        assert!(output
            .stdout
            .lines()
            .any(|line| line == "HELIX_TEST_VALUE=42"));
        for line in output.stdout.lines() {
            let name = line.split('=').next().unwrap_or(line);
            // The shell exports `PWD` itself.
            let allowed = KEPT_ENV.contains(&name) || name == "HELIX_TEST_VALUE" || name == "PWD";
            assert!(
                allowed,
                "unexpected variable in the command's environment: {line}"
            );
        }
    }

    #[tokio::test]
    async fn a_missing_workdir_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-such-dir");
        let error = HostSandbox
            .exec(request("true", &missing))
            .await
            .expect_err("spawning in a missing directory must fail");
        assert!(matches!(error, SandboxError::MissingWorkdir(_)));
        assert!(error.to_string().contains(&*missing.to_string_lossy()));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The whole group ignores SIGTERM, and the background `sleep` outlives `sh`'s own.
        let mut req = request(
            "trap '' TERM; sleep 30 & echo $! > bg.pid; echo $$ > sh.pid; sleep 30",
            dir.path(),
        );
        req.timeout = Some(Duration::from_millis(300));
        let started = Instant::now();
        let output = exec(req).await;
        assert!(
            started.elapsed() < HANG_GUARD,
            "took {:?}",
            started.elapsed()
        );
        assert!(output.timed_out);
        assert_eq!(output.signal, Some(libc::SIGKILL));
        assert_gone(read_pid(&dir.path().join("sh.pid")).await).await;
        assert_gone(read_pid(&dir.path().join("bg.pid")).await).await;
    }

    #[tokio::test]
    async fn dropping_the_exec_future_kills_the_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let req = request(
            "sleep 30 & echo $! > bg.pid; echo $$ > sh.pid; sleep 30",
            dir.path(),
        );
        let sh_pid = tokio::select! {
            _ = HostSandbox.exec(req) => panic!("the command finished on its own"),
            // Once both pids are written, this branch wins and the exec future is dropped.
            pid = async {
                read_pid(&dir.path().join("bg.pid")).await;
                read_pid(&dir.path().join("sh.pid")).await
            } => pid,
        };
        assert_gone(sh_pid).await;
        assert_gone(read_pid(&dir.path().join("bg.pid")).await).await;
    }

    #[tokio::test]
    async fn a_background_process_holding_the_pipes_does_not_keep_exec_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let started = Instant::now();
        let output = exec(request(
            "(sleep 0.2; echo late; sleep 30) & echo $! > bg.pid; echo done",
            dir.path(),
        ))
        .await;
        assert!(
            started.elapsed() < HANG_GUARD,
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(output.exit_code, Some(0));
        // Killed when `sh` exited, before it could print.
        assert_eq!(output.stdout, "done\n");
        assert_gone(read_pid(&dir.path().join("bg.pid")).await).await;
    }

    #[tokio::test]
    async fn a_process_that_left_the_group_cannot_keep_exec_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let started = Instant::now();
        // `sh` waits until the escapee has its own session, or the kill could beat it there.
        let output = exec(request(
            "setsid sh -c 'echo $$ > escaped.pid; exec sleep 30' &
             while [ ! -s escaped.pid ]; do sleep 0.01; done
             echo done",
            dir.path(),
        ))
        .await;
        let elapsed = started.elapsed();
        // It escaped our kill on purpose, so clean it up by hand.
        let escaped = read_pid(&dir.path().join("escaped.pid")).await;
        // SAFETY: `kill` takes plain integers.
        unsafe {
            libc::kill(escaped, libc::SIGKILL);
        }
        assert!(elapsed < HANG_GUARD, "took {elapsed:?}");
        assert_eq!(output.stdout, "done\n");
    }

    #[tokio::test]
    async fn a_flood_of_output_is_capped_and_drained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut req = request(
            "head -c 10000000 /dev/zero; head -c 10000000 /dev/zero >&2; echo finished >&2",
            dir.path(),
        );
        req.output_limit = 1024;
        let started = Instant::now();
        let output = exec(req).await;
        assert!(
            started.elapsed() < HANG_GUARD,
            "took {:?}",
            started.elapsed()
        );
        // The command ran to its end, so the pipes kept being drained past the limit.
        assert_eq!(output.exit_code, Some(0));
        assert!(output.stdout_truncated && output.stderr_truncated);
        assert!(output.stdout.len() <= 1024 && output.stderr.len() <= 1024);
        assert_eq!(output.stdout.len(), 1024);
    }

    #[tokio::test]
    async fn invalid_utf8_is_decoded_lossily() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = exec(request(r"printf '\377ok'", dir.path())).await;
        assert_eq!(output.stdout, "\u{FFFD}ok");
        assert!(!output.stdout_truncated);
    }

    #[test]
    fn the_limit_never_leaves_half_a_character() {
        let mut capture = Capture::new(2);
        capture.keep("aé".as_bytes());
        assert!(capture.truncated);
        assert_eq!(capture.into_text(), "a");
    }

    #[test]
    fn invalid_bytes_from_the_command_are_kept_when_truncating() {
        let mut capture = Capture::new(2);
        capture.keep(b"a\xffb");
        assert_eq!(capture.into_text(), "a\u{FFFD}");
    }
}
