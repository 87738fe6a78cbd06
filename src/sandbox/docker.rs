//! The Docker backend: each command runs in a container of its own, taken from a small pool
//! of containers started ahead of time with the profile's limits, and removed when the
//! command ends.
//!
//! Why single-use containers: the Docker API cannot kill an exec, and a command can leave
//! processes behind (a daemon, a `setsid` child, a fork bomb's last generation). Removing
//! the whole container is the one kill that always holds, so each command gets a fresh one
//! and nothing it started outlives it. Starting a container costs a few hundred
//! milliseconds; the pool pays that while the previous command runs, so a command only
//! waits for `exec` itself.
//!
//! What the code sees: the run's workspace at `/workspace` (a bind mount, so what it writes
//! is there for later tasks; the host's file tools refuse symlinks that lead out of it), a
//! read-only root, a size-capped `/tmp`, no network (only loopback), no capabilities,
//! `no-new-privileges`, a non-root user, an init process, and pids, memory (no extra swap)
//! and CPU limits. Its output goes to helix only: the log driver is `none`.
//!
//! Every container carries the labels in [`LABEL`], [`RUN_LABEL`], [`OWNER_LABEL`], so
//! `helix sandbox prune` and the next helix that starts can remove what a killed one left.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptions, RemoveContainerOptions, StatsOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use serde_json::Value as Json;
use tokio::sync::mpsc;

use super::{BoxFuture, Capture, ExecOutput, ExecRequest, Sandbox, SandboxError};
use crate::workflow::units::{human_duration, parse_duration, parse_size};

/// Every container helix starts carries this label.
pub const LABEL: &str = "io.helix.sandbox";
/// The run a container belongs to.
pub const RUN_LABEL: &str = "io.helix.run";
/// `<host>:<pid namespace>:<pid>` of the helix process that owns a container, so that an
/// orphan can be told from a container a live helix is using.
pub const OWNER_LABEL: &str = "io.helix.owner";

/// The image a profile uses when it names none.
pub const DEFAULT_IMAGE: &str = "helix-sandbox-python";
/// Where the workspace appears in the container.
pub const WORKSPACE: &str = "/workspace";
/// The hint every "Docker is not there" error ends with.
pub const DOCTOR_HINT: &str = "run `helix sandbox doctor` to see what is missing";

/// Output read past the kept part before the command is stopped as a flood: a chatty test
/// suite finishes, `yes` does not.
const FLOOD_FACTOR: u64 = 16;
const MIN_FLOOD_BYTES: u64 = 64 << 20;
/// Entries of the workspace given to the sandbox user per command, at most (helix as root).
const MAX_CHOWN_ENTRIES: usize = 100_000;
/// How long `close` waits for container starts and removals still in flight.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Network access of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Loopback only: no interface, no name resolution.
    None,
    Bridge,
    Host,
}

/// A sandbox profile with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub image: String,
    pub network: Network,
    pub memory: u64,
    pub cpus: f64,
    pub pids: i64,
    pub timeout: Duration,
    /// `uid:gid`, a uid or a user name; `None` picks one (see [`Profile::user_for_host`]).
    pub user: Option<String>,
    pub read_only: bool,
    pub env: Vec<(String, String)>,
    /// Extra read-only bind mounts: (host path, container path).
    pub mounts: Vec<(PathBuf, String)>,
    pub runtime: Option<String>,
    pub output_limit: usize,
    /// Size of the `/tmp` tmpfs.
    pub tmp: u64,
    /// Containers kept started and waiting.
    pub pool: usize,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            image: DEFAULT_IMAGE.into(),
            network: Network::None,
            memory: 512 << 20,
            cpus: 1.0,
            pids: 256,
            timeout: Duration::from_secs(60),
            user: None,
            read_only: true,
            env: Vec::new(),
            mounts: Vec::new(),
            runtime: None,
            output_limit: 1 << 20,
            tmp: 64 << 20,
            pool: 2,
        }
    }
}

impl Profile {
    /// Reads a validated `sandbox:` mapping; relative mount sources are taken from `base`
    /// (the workflow's directory).
    pub fn from_json(profile: &Json, base: &Path) -> Result<Profile, String> {
        let mut out = Profile::default();
        let Some(map) = profile.as_object() else {
            return Err("a sandbox profile is a mapping".into());
        };
        let text = |key: &str, value: &Json| -> Result<String, String> {
            match value {
                Json::String(s) => Ok(s.clone()),
                Json::Number(n) => Ok(n.to_string()),
                other => Err(format!("`sandbox.{key}` must be text, found {other}")),
            }
        };
        for (key, value) in map {
            match key.as_str() {
                "image" => out.image = text(key, value)?,
                "network" => {
                    out.network = match text(key, value)?.as_str() {
                        "none" => Network::None,
                        "bridge" => Network::Bridge,
                        "host" => Network::Host,
                        other => return Err(format!("unknown `sandbox.network` `{other}`")),
                    }
                }
                "memory" => out.memory = parse_size(&text(key, value)?)?,
                "tmp" => out.tmp = parse_size(&text(key, value)?)?,
                "output_limit" => {
                    out.output_limit = usize::try_from(parse_size(&text(key, value)?)?)
                        .map_err(|_| "`sandbox.output_limit` is too large".to_string())?
                }
                "cpus" => {
                    out.cpus = value
                        .as_f64()
                        .filter(|c| *c > 0.0)
                        .ok_or("`sandbox.cpus` must be a positive number")?
                }
                "pids" => {
                    out.pids = value
                        .as_i64()
                        .filter(|p| *p > 0)
                        .ok_or("`sandbox.pids` must be a positive whole number")?
                }
                "pool" => {
                    out.pool = value
                        .as_u64()
                        .and_then(|p| usize::try_from(p).ok())
                        .ok_or("`sandbox.pool` must be a whole number")?
                }
                "timeout" => out.timeout = parse_duration(&text(key, value)?)?,
                "user" => out.user = Some(text(key, value)?),
                "read_only" => {
                    out.read_only = value
                        .as_bool()
                        .ok_or("`sandbox.read_only` must be true or false")?
                }
                "runtime" => out.runtime = Some(text(key, value)?),
                "env" => {
                    let vars = value.as_object().ok_or("`sandbox.env` must be a mapping")?;
                    for (name, value) in vars {
                        out.env
                            .push((name.clone(), text(&format!("env.{name}"), value)?));
                    }
                }
                "mounts" => {
                    let list = value.as_array().ok_or("`sandbox.mounts` must be a list")?;
                    for mount in list {
                        out.mounts.push(parse_mount(&text("mounts", mount)?, base)?);
                    }
                }
                other => return Err(format!("unknown sandbox key `{other}`")),
            }
        }
        Ok(out)
    }

    /// The user commands run as: the profile's, or else helix's own uid and gid, unless helix
    /// runs as root, in which case the images' unprivileged `sandbox` user (1000:1000).
    pub fn user_for_host(&self) -> String {
        if let Some(user) = &self.user {
            return user.clone();
        }
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        if uid == 0 {
            "1000:1000".into()
        } else {
            format!("{uid}:{gid}")
        }
    }

    /// One line for `helix plan` and errors.
    pub fn summary(&self) -> String {
        let network = match self.network {
            Network::None => "no network",
            Network::Bridge => "bridge network",
            Network::Host => "host network",
        };
        let mut text = format!(
            "docker `{}`: {network}, memory {}, {} cpu, {} processes, timeout {}, /tmp {}",
            self.image,
            crate::scripting::ByteSize(self.memory as usize),
            self.cpus,
            self.pids,
            human_duration(self.timeout),
            crate::scripting::ByteSize(self.tmp as usize),
        );
        if !self.read_only {
            text.push_str(", writable root");
        }
        if let Some(runtime) = &self.runtime {
            let _ = write!(text, ", runtime {runtime}");
        }
        text
    }
}

/// `host:container` (read-only); the container side must be absolute and not `/workspace`.
fn parse_mount(text: &str, base: &Path) -> Result<(PathBuf, String), String> {
    let Some((host, container)) = text.rsplit_once(':') else {
        return Err(format!("mount `{text}` must be `host-path:container-path`"));
    };
    let container = container.trim_end_matches("/ro").to_string();
    if !container.starts_with('/') {
        return Err(format!(
            "mount `{text}`: the container path must be absolute"
        ));
    }
    if container == WORKSPACE || container.starts_with("/workspace/") || container == "/" {
        return Err(format!(
            "mount `{text}`: `{container}` is where helix mounts the workspace"
        ));
    }
    let host = base.join(host);
    Ok((host, container))
}

/// Connects to the engine `DOCKER_HOST` names (or the local socket) and checks it answers.
pub async fn connect() -> Result<Docker, SandboxError> {
    let unreachable = |detail: String| {
        SandboxError::Docker(format!(
            "cannot reach the Docker engine{}: {detail}; {DOCTOR_HINT}",
            std::env::var("DOCKER_HOST")
                .map(|h| format!(" at {h}"))
                .unwrap_or_default()
        ))
    };
    let docker = Docker::connect_with_defaults().map_err(|e| unreachable(e.to_string()))?;
    let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
        .await
        .map_err(|_| unreachable("no answer within 10s".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(docker)
}

/// `<hostname>:<pid namespace>:<pid>` of this process. Two helix processes in containers
/// that share a hostname (host networking) still differ in their pid namespace.
fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    // `pid:[4026531836]`
    let namespace = std::fs::read_link("/proc/self/ns/pid")
        .map(|link| {
            link.to_string_lossy()
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
        })
        .unwrap_or_default();
    format!("{host}:{namespace}:{}", std::process::id())
}

/// Whether the helix that labelled a container `owner` is gone: it ran on this host, in this
/// pid namespace, and its pid is no longer alive. Other containers are left alone.
fn owner_is_gone(owner: &str) -> bool {
    let this = self::owner();
    let split = |text: &str| -> Option<(String, String)> {
        let (place, pid) = text.rsplit_once(':')?;
        Some((place.to_string(), pid.to_string()))
    };
    let (Some((place, pid)), Some((this_place, _))) = (split(owner), split(&this)) else {
        return false;
    };
    if place != this_place {
        return false;
    }
    match pid.parse::<libc::pid_t>() {
        Ok(pid) => {
            // SAFETY: signal 0 only checks that the process exists.
            let status = unsafe { libc::kill(pid, 0) };
            status == -1 && io_errno() == Some(libc::ESRCH)
        }
        Err(_) => false,
    }
}

fn io_errno() -> Option<i32> {
    std::io::Error::last_os_error().raw_os_error()
}

/// Removes helix's containers: with `all`, every one; otherwise those whose helix is gone.
/// Returns how many were removed.
pub async fn prune(docker: &Docker, all: bool) -> Result<usize, SandboxError> {
    let filters = HashMap::from([("label".to_string(), vec![LABEL.to_string()])]);
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(docker_error)?;
    let mut removed = 0;
    for container in containers {
        let owner = container
            .labels
            .as_ref()
            .and_then(|l| l.get(OWNER_LABEL))
            .cloned()
            .unwrap_or_default();
        if !(all || owner_is_gone(&owner)) {
            continue;
        }
        if let Some(id) = container.id {
            if remove(docker, &id).await.is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

fn docker_error(error: bollard::errors::Error) -> SandboxError {
    SandboxError::Docker(format!("Docker engine: {error}"))
}

async fn remove(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
}

/// Runs commands in single-use containers of one profile, for one run's workspace.
pub struct DockerSandbox {
    inner: Arc<Inner>,
}

struct Inner {
    docker: Docker,
    profile: Profile,
    user: String,
    /// Canonical, so the bind mount is the directory itself, not a link to it.
    workspace: PathBuf,
    run_id: String,
    owner: String,
    /// Started containers, ready for one command each (or why one could not start).
    ready: tokio::sync::Mutex<mpsc::Receiver<Result<String, String>>>,
    ready_tx: mpsc::Sender<Result<String, String>>,
    /// Every container this sandbox created and has not removed yet.
    live: Mutex<HashSet<String>>,
    /// Container starts and removals running in the background; `close` waits for them.
    in_flight: Arc<AtomicUsize>,
    /// Commands waiting for a container.
    waiting: Arc<AtomicUsize>,
    closed: AtomicBool,
}

impl DockerSandbox {
    /// Checks the image once, removes orphans of dead helix processes, and starts filling the
    /// pool. Fails with a clear message when the engine or the image is missing.
    pub async fn start(
        docker: Docker,
        profile: Profile,
        workspace: &Path,
        run_id: &str,
    ) -> Result<DockerSandbox, SandboxError> {
        if let Err(error) = docker.inspect_image(&profile.image).await {
            let missing = matches!(
                error,
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                }
            );
            return Err(SandboxError::Docker(if missing {
                format!(
                    "sandbox image `{}` is not present in the Docker engine; build it with \
                     `helix sandbox build` (no registry needed) or pull it, then {DOCTOR_HINT}",
                    profile.image
                )
            } else {
                format!(
                    "cannot inspect image `{}`: {error}; {DOCTOR_HINT}",
                    profile.image
                )
            }));
        }
        // Best effort: a failure here must not stop the run.
        let _ = prune(&docker, false).await;
        let workspace = workspace
            .canonicalize()
            .map_err(|source| SandboxError::Io {
                command: format!("the workspace {}", workspace.display()),
                source,
            })?;
        let (ready_tx, ready) = mpsc::channel(profile.pool.max(1) + 1);
        let inner = Arc::new(Inner {
            user: profile.user_for_host(),
            docker,
            profile,
            workspace,
            run_id: run_id.to_string(),
            owner: owner(),
            ready: tokio::sync::Mutex::new(ready),
            ready_tx,
            live: Mutex::default(),
            in_flight: Arc::default(),
            waiting: Arc::default(),
            closed: false.into(),
        });
        for _ in 0..inner.profile.pool.max(1) {
            Inner::refill(&inner);
        }
        Ok(DockerSandbox { inner })
    }

    pub fn profile(&self) -> &Profile {
        &self.inner.profile
    }

    /// Removes every container this sandbox still has, and waits for those still starting or
    /// being removed in the background: a process that exits right after leaves none behind.
    /// Later commands fail.
    pub async fn close(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        let give_up = Instant::now() + CLOSE_WAIT;
        loop {
            let ids: Vec<String> = inner.live().drain().collect();
            for id in ids {
                let _ = remove(&inner.docker, &id).await;
            }
            let settled = inner.in_flight.load(Ordering::SeqCst) == 0 && inner.live().is_empty();
            if settled || Instant::now() >= give_up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many containers this sandbox has right now (started, waiting or running).
    pub fn live_containers(&self) -> usize {
        self.inner.live().len()
    }
}

/// A sandbox dropped without `close` (its run aborted, a sub-workflow cancelled) still
/// removes its containers, in the background.
impl Drop for DockerSandbox {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let ids: Vec<String> = self.inner.live().drain().collect();
        for id in ids {
            self.inner.remove_later(id);
        }
    }
}

impl Sandbox for DockerSandbox {
    fn name(&self) -> &str {
        "docker"
    }

    fn exec<'a>(&'a self, req: ExecRequest) -> BoxFuture<'a, Result<ExecOutput, SandboxError>> {
        Box::pin(Inner::exec(Arc::clone(&self.inner), req))
    }
}

/// What one command's container says about the limits it reached.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    oom_kills: u64,
    pid_limit_hits: u64,
}

impl Inner {
    fn live(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Starts one container in the background and hands it to the pool.
    fn refill(inner: &Arc<Inner>) {
        let inner = Arc::clone(inner);
        let in_flight = InFlight::new(&inner.in_flight);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let started = inner.start_container().await;
            if inner.is_closed() {
                if let Ok(id) = started {
                    inner.discard(id);
                }
                return;
            }
            if let Err(mpsc::error::SendError(Ok(id))) = inner.ready_tx.send(started).await {
                inner.discard(id);
            }
        });
    }

    async fn start_container(&self) -> Result<String, String> {
        let p = &self.profile;
        let mut binds = vec![format!("{}:{WORKSPACE}:rw", self.workspace.display())];
        for (host, container) in &p.mounts {
            binds.push(format!("{}:{container}:ro", host.display()));
        }
        let mut tmpfs = HashMap::from([(
            "/tmp".to_string(),
            format!("rw,nosuid,nodev,exec,size={},mode=1777", p.tmp),
        )]);
        if !p.read_only {
            tmpfs.clear();
        }
        let network_mode = match p.network {
            Network::None => "none",
            Network::Bridge => "bridge",
            Network::Host => "host",
        };
        let labels = HashMap::from([
            (LABEL.to_string(), "1".to_string()),
            (RUN_LABEL.to_string(), self.run_id.clone()),
            (OWNER_LABEL.to_string(), self.owner.clone()),
        ]);
        let memory = i64::try_from(p.memory).unwrap_or(i64::MAX);
        let body = ContainerCreateBody {
            image: Some(p.image.clone()),
            // A keeper that does nothing: commands arrive through `exec`.
            entrypoint: Some(vec!["sleep".into()]),
            cmd: Some(vec!["infinity".into()]),
            user: Some(self.user.clone()),
            env: Some(self.env(&[])),
            working_dir: Some(WORKSPACE.into()),
            network_disabled: Some(p.network == Network::None),
            labels: Some(labels),
            host_config: Some(HostConfig {
                binds: Some(binds),
                network_mode: Some(network_mode.into()),
                readonly_rootfs: Some(p.read_only),
                init: Some(true),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                pids_limit: Some(p.pids),
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some((p.cpus * 1e9) as i64),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("none".into()),
                    config: None,
                }),
                tmpfs: Some(tmpfs),
                ipc_mode: Some("private".into()),
                runtime: p.runtime.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(None, body)
            .await
            .map_err(|e| format!("cannot create a container from `{}`: {e}", p.image))?;
        self.live().insert(created.id.clone());
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.discard(created.id);
            return Err(format!("cannot start a container from `{}`: {e}", p.image));
        }
        Ok(created.id)
    }

    /// Removes a container in the background.
    fn discard(&self, id: String) {
        self.live().remove(&id);
        self.remove_later(id);
    }

    /// Removes a container in the background; without a runtime to do it on, the next
    /// helix's orphan pruning will.
    fn remove_later(&self, id: String) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let docker = self.docker.clone();
        let in_flight = InFlight::new(&self.in_flight);
        runtime.spawn(async move {
            let _in_flight = in_flight;
            let _ = remove(&docker, &id).await;
        });
    }

    /// The profile's environment, then the request's; `HOME` is `/tmp` on a read-only root.
    fn env(&self, extra: &[(String, String)]) -> Vec<String> {
        let mut vars: Vec<(String, String)> = Vec::new();
        if self.profile.read_only {
            vars.push(("HOME".into(), "/tmp".into()));
        }
        vars.extend(self.profile.env.iter().cloned());
        vars.extend(extra.iter().cloned());
        vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Where `workdir` (a host path) is in the container: inside the workspace, or its root.
    fn container_dir(&self, workdir: &Path) -> String {
        let workdir = workdir
            .canonicalize()
            .unwrap_or_else(|_| workdir.to_path_buf());
        match workdir.strip_prefix(&self.workspace) {
            Ok(rel) if !rel.as_os_str().is_empty() => {
                format!("{WORKSPACE}/{}", rel.display())
            }
            _ => WORKSPACE.into(),
        }
    }

    /// A started container, and whether its replacement is still owed to the pool.
    async fn take(self: &Arc<Self>) -> Result<(String, bool), SandboxError> {
        if self.is_closed() {
            return Err(SandboxError::Docker("the sandbox is closed".into()));
        }
        // Counted while waiting, also if this future is dropped meanwhile.
        let waiting = InFlight::new(&self.waiting);
        let next = self.ready.lock().await.recv().await;
        let others_waiting = self.waiting.load(Ordering::SeqCst) > 1;
        drop(waiting);
        // Starting a container slows a command that runs beside it (both load the engine),
        // so the replacement starts when the command is done, unless other commands are
        // already waiting for one, or this start failed.
        let refill_now = others_waiting || !matches!(next, Some(Ok(_)));
        if refill_now {
            Inner::refill(self);
        }
        match next {
            Some(Ok(id)) => Ok((id, !refill_now)),
            Some(Err(message)) => Err(SandboxError::Docker(format!("{message}; {DOCTOR_HINT}"))),
            None => Err(SandboxError::Docker("the sandbox is closed".into())),
        }
    }

    async fn exec(self: Arc<Self>, req: ExecRequest) -> Result<ExecOutput, SandboxError> {
        let (id, refill_owed) = self.take().await?;
        // The container goes whatever happens, even if this future is dropped midway.
        let guard = Discard {
            inner: &self,
            id: Some(id.clone()),
            refill_owed,
        };
        let started = Instant::now();
        let result = self.run_in(&id, &req, started).await;
        drop(guard);
        result
    }

    async fn run_in(
        &self,
        id: &str,
        req: &ExecRequest,
        started: Instant,
    ) -> Result<ExecOutput, SandboxError> {
        let docker_failed = |e: bollard::errors::Error| {
            SandboxError::Docker(format!("running `{}` in the sandbox: {e}", req.command))
        };
        if is_root() {
            let (workspace, user) = (self.workspace.clone(), self.user.clone());
            let _ = tokio::task::spawn_blocking(move || give_workspace_to(&workspace, &user)).await;
        }
        let exec = self
            .docker
            .create_exec(
                id,
                CreateExecOptions::<String> {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(vec!["/bin/sh".into(), "-c".into(), req.command.clone()]),
                    env: Some(self.env(&req.env)),
                    user: Some(self.user.clone()),
                    working_dir: Some(self.container_dir(&req.workdir)),
                    ..Default::default()
                },
            )
            .await
            .map_err(docker_failed)?;
        let output = self
            .docker
            .start_exec(
                &exec.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(docker_failed)?;
        let StartExecResults::Attached { mut output, .. } = output else {
            return Err(SandboxError::Docker("the exec did not attach".into()));
        };

        let limit = req.output_limit.min(self.profile.output_limit);
        let timeout = req
            .timeout
            .map_or(self.profile.timeout, |t| t.min(self.profile.timeout));
        let flood = (limit as u64 * FLOOD_FACTOR).max(MIN_FLOOD_BYTES);
        let (mut stdout, mut stderr) = (Capture::new(limit), Capture::new(limit));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ended = Ended::Exited;
        loop {
            match tokio::time::timeout_at(deadline, output.next()).await {
                Err(_) => {
                    ended = Ended::TimedOut;
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(docker_failed(e)),
                Ok(Some(Ok(chunk))) => {
                    match chunk {
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            stdout.keep(&message)
                        }
                        LogOutput::StdErr { message } => stderr.keep(&message),
                        LogOutput::StdIn { .. } => {}
                    }
                    if stdout.seen + stderr.seen > flood {
                        ended = Ended::Flooded;
                        break;
                    }
                }
            }
        }
        drop(output);

        // Read before a kill: the container's cgroup, and its counters, go with its processes.
        let counters = self.counters(id).await;
        let (exit_code, signal) = match ended {
            Ended::Exited => {
                let inspect = self
                    .docker
                    .inspect_exec(&exec.id)
                    .await
                    .map_err(docker_failed)?;
                match inspect.exit_code {
                    // The shell reports a child killed by signal N as 128 + N.
                    Some(code) if code > 128 && code < 160 => (None, Some((code - 128) as i32)),
                    Some(code) => (Some(code as i32), None),
                    None => (None, None),
                }
            }
            Ended::TimedOut | Ended::Flooded => {
                // Everything the command started dies with the container's processes.
                let _ = self
                    .docker
                    .kill_container(
                        id,
                        Some(KillContainerOptions {
                            signal: "KILL".into(),
                        }),
                    )
                    .await;
                (None, Some(libc::SIGKILL))
            }
        };
        let limit_hit = self.limit_reached(ended, counters, limit, timeout);
        let (stdout_truncated, stderr_truncated) = (stdout.truncated, stderr.truncated);
        Ok(ExecOutput {
            exit_code,
            signal,
            stdout: stdout.into_text(),
            stderr: stderr.into_text(),
            timed_out: ended == Ended::TimedOut,
            stdout_truncated,
            stderr_truncated,
            duration: started.elapsed(),
            limit: limit_hit,
        })
    }

    /// The limit that ended or hampered the command, in words, if one did.
    fn limit_reached(
        &self,
        ended: Ended,
        counters: Counters,
        output_limit: usize,
        timeout: Duration,
    ) -> Option<String> {
        let p = &self.profile;
        let memory = crate::scripting::ByteSize(p.memory as usize);
        let mut reasons = Vec::new();
        if counters.oom_kills > 0 {
            reasons.push(format!("memory limit {memory} exceeded"));
        }
        if counters.pid_limit_hits > 0 {
            reasons.push(format!("process limit {} reached", p.pids));
        }
        match ended {
            Ended::TimedOut => {
                reasons.push(format!("timeout {} exceeded", human_duration(timeout)))
            }
            Ended::Flooded => reasons.push(format!(
                "output limit {} exceeded; the command was stopped",
                crate::scripting::ByteSize(output_limit)
            )),
            Ended::Exited => {}
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// OOM kills and refused forks, from the container's cgroup when the engine runs on this
    /// machine, else from the engine's stats (which only tell that memory reached the limit).
    async fn counters(&self, id: &str) -> Counters {
        if let Some(counters) = cgroup_counters(id) {
            return counters;
        }
        let stats = self
            .docker
            .stats(
                id,
                Some(StatsOptions {
                    stream: false,
                    one_shot: true,
                }),
            )
            .next()
            .await;
        let mut counters = Counters::default();
        if let Some(Ok(stats)) = stats {
            if let Some(memory) = stats.memory_stats {
                if let (Some(max), Some(limit)) = (memory.max_usage, memory.limit) {
                    if limit > 0 && max >= limit {
                        counters.oom_kills = 1;
                    }
                }
            }
            if let Some(pids) = stats.pids_stats {
                if let (Some(current), Some(limit)) = (pids.current, pids.limit) {
                    if limit > 0 && current >= limit {
                        counters.pid_limit_hits = 1;
                    }
                }
            }
        }
        counters
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Exited,
    TimedOut,
    Flooded,
}

/// One background start or removal, counted while it lives (also when its task is dropped).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Removes the container when the command is done with it, however it ends.
struct Discard<'a> {
    inner: &'a Arc<Inner>,
    id: Option<String>,
    /// Start the container's replacement too.
    refill_owed: bool,
}

impl Drop for Discard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.inner.discard(id);
        }
        if self.refill_owed {
            Inner::refill(self.inner);
        }
    }
}

/// Reads the container's cgroup counters (v1 or v2, cgroupfs or systemd layout).
fn cgroup_counters(id: &str) -> Option<Counters> {
    let roots = [
        format!("docker/{id}"),
        format!("system.slice/docker-{id}.scope"),
    ];
    let read = |path: String| std::fs::read_to_string(path).ok();
    let field = |text: &str, name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<u64>().ok())?
        })
    };
    for root in &roots {
        // cgroup v1: one hierarchy per controller.
        if let Some(pids) = read(format!("/sys/fs/cgroup/pids/{root}/pids.events")) {
            let oom = read(format!("/sys/fs/cgroup/memory/{root}/memory.oom_control"))
                .and_then(|t| field(&t, "oom_kill"))
                .unwrap_or(0);
            return Some(Counters {
                oom_kills: oom,
                pid_limit_hits: field(&pids, "max").unwrap_or(0),
            });
        }
        // cgroup v2: one tree.
        if let Some(pids) = read(format!("/sys/fs/cgroup/{root}/pids.events")) {
            let oom = read(format!("/sys/fs/cgroup/{root}/memory.events"))
                .and_then(|t| field(&t, "oom_kill"))
                .unwrap_or(0);
            return Some(Counters {
                oom_kills: oom,
                pid_limit_hits: field(&pids, "max").unwrap_or(0),
            });
        }
    }
    None
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// When helix runs as root, files it wrote to the workspace belong to root, and the sandbox
/// user could not change them: they are handed to that user (numeric `uid[:gid]` only).
///
/// Code in another container may be changing the workspace meanwhile (swapping a directory
/// for a symlink to `/etc`, say), so the walk never resolves a path: each directory is opened
/// relative to its parent's descriptor with `O_NOFOLLOW`, and each entry is inspected and
/// changed relative to that descriptor without following a symlink. Up to
/// [`MAX_CHOWN_ENTRIES`] entries and [`MAX_CHOWN_DEPTH`] levels.
fn give_workspace_to(workspace: &Path, user: &str) {
    use std::os::unix::ffi::OsStrExt;
    let mut ids = user.split(':').map(|part| part.parse::<u32>().ok());
    let (Some(Some(uid)), gid) = (ids.next(), ids.next()) else {
        return;
    };
    let gid = gid.flatten().unwrap_or(uid);
    if uid == 0 {
        return;
    }
    let Ok(path) = std::ffi::CString::new(workspace.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a plain open of a NUL-terminated path; the descriptor is checked.
    let root = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if root < 0 {
        return;
    }
    // SAFETY: `root` is an open directory descriptor, inspected and changed through itself.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(root, &mut st) == 0 && st.st_uid == 0 {
            libc::fchown(root, uid, gid);
        }
    }
    let mut budget = MAX_CHOWN_ENTRIES;
    chown_below(root, uid, gid, 0, &mut budget);
}

/// Levels below the workspace the ownership walk goes.
const MAX_CHOWN_DEPTH: usize = 64;

/// Gives root-owned entries of the open directory `dir` (consumed) to `uid:gid`, then its
/// subdirectories'.
fn chown_below(dir: libc::c_int, uid: u32, gid: u32, depth: usize, budget: &mut usize) {
    // SAFETY: `dir` is an open directory descriptor that `fdopendir` takes over; on failure
    // it is closed here. Every name comes from `readdir` of that stream and is used relative
    // to its descriptor, with symlinks never followed.
    unsafe {
        let stream = libc::fdopendir(dir);
        if stream.is_null() {
            libc::close(dir);
            return;
        }
        let fd = libc::dirfd(stream);
        loop {
            let entry = libc::readdir(stream);
            if entry.is_null() || *budget == 0 {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr());
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            *budget -= 1;
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstatat(fd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
                continue;
            }
            if st.st_uid == 0 {
                libc::fchownat(fd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW);
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR && depth < MAX_CHOWN_DEPTH {
                let sub = libc::openat(
                    fd,
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                );
                if sub >= 0 {
                    chown_below(sub, uid, gid, depth + 1, budget);
                }
            }
        }
        libc::closedir(stream);
    }
}
