//! Docker sandbox benchmarks, against the local engine: `cargo bench --bench sandbox`.
//!
//! - latency of `python3 -c 'print(1)'` through helix's `DockerSandbox` with its pool warm:
//!   before each timed command the bench waits until the run has exactly its pool of
//!   containers, all running (the previous command's container removed, its replacement
//!   started), so the command finds a started container and an idle engine;
//! - the same command as `docker run --rm` with the hardening helix applies (same image, same
//!   limits, the workspace bind-mounted), timed as a process, interleaved with the helix
//!   samples and also started on an idle engine;
//! - throughput: 100 commands through helix, 2 at a time, with the default pool of 2;
//! - for where the time goes, without helix: a bare exec through the Docker API as the first
//!   in a freshly started container and repeated in one container, the start of an idle
//!   container, and Python's own start-up inside a container.
//!
//! Needs the `helix-sandbox-python` image (`docker/build-offline.sh`); without Docker the
//! bench says so and exits. Results and the command that produced them are in BENCHMARKS.md.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use bollard::Docker;
use futures_util::StreamExt;
use helix::sandbox::docker::{connect, RUN_LABEL};
use helix::sandbox::{DockerSandbox, ExecRequest, Profile, Sandbox};

const IMAGE: &str = "helix-sandbox-python";
const COMMAND: &str = "python3 -c 'print(1)'";
const SAMPLES: usize = 40;
/// Fresh containers started for the first-exec figures.
const FRESH_SAMPLES: usize = 20;
const WARM_UP: usize = 3;
const THROUGHPUT_COMMANDS: usize = 100;
const PARALLEL: usize = 2;
/// Python start-ups timed in one exec, to take the exec's own cost out.
const PYTHON_STARTS: usize = 20;

/// Per-command times of one measurement.
struct Latency {
    p50: Duration,
    p95: Duration,
    min: Duration,
    samples: usize,
}

impl Latency {
    fn of(mut times: Vec<Duration>) -> Latency {
        times.sort_unstable();
        let samples = times.len();
        Latency {
            p50: times[samples / 2],
            p95: times[(samples * 95).div_ceil(100) - 1],
            min: times[0],
            samples,
        }
    }

    fn row(&self, what: &str) {
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            millis(self.p50),
            millis(self.p95),
            millis(self.min),
            self.samples
        );
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The profile helix uses when a workflow says only `sandbox: docker`.
fn profile() -> Profile {
    Profile {
        image: IMAGE.into(),
        ..Profile::default()
    }
}

fn request(workspace: &Path) -> ExecRequest {
    ExecRequest {
        command: COMMAND.into(),
        workdir: workspace.to_path_buf(),
        env: Vec::new(),
        timeout: None,
        output_limit: 64 << 10,
    }
}

/// The `docker run` flags that give a container what helix gives one of `profile`.
fn hardening(profile: &Profile, workspace: &Path) -> Vec<String> {
    let flags = format!(
        "--network none --read-only --cap-drop ALL --security-opt no-new-privileges --init \
         --pids-limit {pids} --memory {memory} --memory-swap {memory} --cpus {cpus} \
         --user {user} --log-driver none --ipc private \
         --tmpfs /tmp:rw,nosuid,nodev,exec,size={tmp},mode=1777 -e HOME=/tmp \
         -v {workspace}:/workspace:rw -w /workspace",
        pids = profile.pids,
        memory = profile.memory,
        cpus = profile.cpus,
        user = profile.user_for_host(),
        tmp = profile.tmp,
        workspace = workspace.display(),
    );
    // The workspace is a tempdir: no spaces in its path.
    flags.split_whitespace().map(String::from).collect()
}

fn docker_run(profile: &Profile, workspace: &Path) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(["run", "--rm"])
        .args(hardening(profile, workspace))
        .args([IMAGE, "python3", "-c", "print(1)"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

fn time_docker_run(profile: &Profile, workspace: &Path) -> Duration {
    let started = Instant::now();
    let out = docker_run(profile, workspace)
        .output()
        .expect("run the docker CLI");
    let took = started.elapsed();
    assert!(
        out.status.success() && out.stdout == b"1\n",
        "docker run failed: {out:?}"
    );
    took
}

async fn containers_of(docker: &Docker, run_id: &str, only_running: bool) -> Vec<String> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{RUN_LABEL}={run_id}")])]);
    docker
        .list_containers(Some(ListContainersOptions {
            all: !only_running,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Waits until the run has exactly `pool` containers and all of them run: nothing is being
/// started or removed, and the next command finds a ready container.
async fn wait_warm(docker: &Docker, run_id: &str, pool: usize) {
    loop {
        let all = containers_of(docker, run_id, false).await.len();
        let running = containers_of(docker, run_id, true).await.len();
        if all == pool && running == pool {
            // The container is handed to the pool just after it starts.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn time_helix(sandbox: &DockerSandbox, workspace: &Path) -> Duration {
    let started = Instant::now();
    let out = sandbox.exec(request(workspace)).await.expect("exec");
    let took = started.elapsed();
    assert!(
        out.exit_code == Some(0) && out.stdout == "1\n",
        "helix exec failed: {out:?}"
    );
    took
}

/// One exec through the Docker API in a running container, the way helix runs one, minus
/// helix: create, start attached, read to the end, inspect the exit code.
async fn time_bare_exec(docker: &Docker, container: &str, command: &str) -> (Duration, String) {
    let started = Instant::now();
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["/bin/sh".into(), "-c".into(), command.into()]),
                ..Default::default()
            },
        )
        .await
        .expect("create exec");
    let mut text = String::new();
    if let StartExecResults::Attached { mut output, .. } =
        docker.start_exec(&exec.id, None).await.expect("start exec")
    {
        while let Some(chunk) = output.next().await {
            text.push_str(&chunk.expect("exec output").to_string());
        }
    }
    let code = docker.inspect_exec(&exec.id).await.expect("inspect exec");
    assert_eq!(code.exit_code, Some(0), "bare exec failed: {text}");
    (started.elapsed(), text)
}

async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    docker
        .remove_container(id, Some(options))
        .await
        .expect("remove a container");
}

/// A container started by hand with the profile's hardening, idle, for the bare-exec figures.
fn start_keeper(profile: &Profile, workspace: &Path) -> String {
    let out = Command::new("docker")
        .args(["run", "-d", "--rm"])
        .args(hardening(profile, workspace))
        .args([IMAGE, "sleep", "600"])
        .output()
        .expect("docker run -d");
    assert!(out.status.success(), "cannot start a keeper: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let docker = match connect().await {
        Ok(docker) => docker,
        Err(error) => {
            eprintln!("sandbox bench skipped: {error}");
            return;
        }
    };
    if docker.inspect_image(IMAGE).await.is_err() {
        eprintln!("sandbox bench skipped: image `{IMAGE}` is missing (docker/build-offline.sh)");
        return;
    }
    let workspace = tempfile::tempdir().expect("workspace");
    let profile = profile();
    let run_id = format!("bench-sandbox-{}", std::process::id());
    let sandbox = DockerSandbox::start(docker.clone(), profile.clone(), workspace.path(), &run_id)
        .await
        .expect("sandbox");

    // Latency, one command at a time, interleaved.
    let (mut helix_times, mut run_times) = (Vec::new(), Vec::new());
    for sample in 0..WARM_UP + SAMPLES {
        wait_warm(&docker, &run_id, profile.pool).await;
        let helix = time_helix(&sandbox, workspace.path()).await;
        wait_warm(&docker, &run_id, profile.pool).await;
        let run = time_docker_run(&profile, workspace.path());
        if sample >= WARM_UP {
            helix_times.push(helix);
            run_times.push(run);
        }
    }
    let helix = Latency::of(helix_times);
    let run = Latency::of(run_times);

    // Throughput: the pool is not waited for; this is what a fan-out of commands sees.
    wait_warm(&docker, &run_id, profile.pool).await;
    let started = Instant::now();
    let results: Vec<Duration> = futures_util::stream::iter(0..THROUGHPUT_COMMANDS)
        .map(|_| time_helix(&sandbox, workspace.path()))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let wall = started.elapsed();
    let per_command = Latency::of(results);
    sandbox.close().await;
    assert!(containers_of(&docker, &run_id, false).await.is_empty());

    // Where the time goes. A container's first exec, like every command helix runs, reads
    // Python through a fresh root filesystem mount; later execs in the same container find it
    // cached. Starting the idle container is what the pool pays per command.
    let (mut starts, mut firsts) = (Vec::new(), Vec::new());
    for sample in 0..WARM_UP + FRESH_SAMPLES {
        let started = Instant::now();
        let keeper = start_keeper(&profile, workspace.path());
        let start = started.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (first, text) = time_bare_exec(&docker, &keeper, COMMAND).await;
        assert_eq!(text, "1\n");
        remove(&docker, &keeper).await;
        if sample >= WARM_UP {
            starts.push(start);
            firsts.push(first);
        }
    }
    let (starts, firsts) = (Latency::of(starts), Latency::of(firsts));

    let keeper = start_keeper(&profile, workspace.path());
    let mut repeated = Vec::new();
    for sample in 0..WARM_UP + SAMPLES {
        let (took, text) = time_bare_exec(&docker, &keeper, COMMAND).await;
        assert_eq!(text, "1\n");
        if sample >= WARM_UP {
            repeated.push(took);
        }
    }
    let repeated = Latency::of(repeated);
    let (noop, _) = time_bare_exec(&docker, &keeper, "true").await;
    let loop_command = format!(
        "i=0; while [ $i -lt {PYTHON_STARTS} ]; do python3 -c 'print(1)' >/dev/null; i=$((i+1)); done"
    );
    let (pythons, _) = time_bare_exec(&docker, &keeper, &loop_command).await;
    remove(&docker, &keeper).await;

    println!("| what | p50 | p95 | min | samples |");
    println!("|---|---|---|---|---|");
    helix.row("helix `DockerSandbox::exec`, pool warm");
    run.row("`docker run --rm`, same image and hardening");
    per_command.row(&format!(
        "helix, {THROUGHPUT_COMMANDS} commands {PARALLEL} at a time (each command)"
    ));
    firsts.row("bare Docker API exec, the first in a fresh idle container (no helix)");
    repeated.row("bare Docker API exec, repeated in one container (no helix)");
    starts.row("`docker run -d` of an idle container (CLI), what a pool refill costs");
    println!();
    println!(
        "throughput: {THROUGHPUT_COMMANDS} commands, {PARALLEL} at a time: {:.2} s wall, {:.1} commands/s",
        wall.as_secs_f64(),
        THROUGHPUT_COMMANDS as f64 / wall.as_secs_f64()
    );
    println!(
        "python3 start-up inside a container: {:.1} ms each ({PYTHON_STARTS} in one exec); an exec of `true`: {:.1} ms",
        millis(pythons) / PYTHON_STARTS as f64,
        millis(noop)
    );
    println!(
        "helix p50 {:.1} ms (target < 150 ms); docker run --rm p50 / helix p50 = {:.1}x (target >= 3x)",
        millis(helix.p50),
        run.p50.as_secs_f64() / helix.p50.as_secs_f64()
    );
}
