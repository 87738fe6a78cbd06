//! `helix sandbox`: build the sandbox images, check the Docker setup, remove orphans.

use clap::Subcommand;

use super::{runtime, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::sandbox::docker::{self, DEFAULT_IMAGE};

/// The offline image recipe, shipped inside the binary so `helix sandbox build` works
/// outside a checkout.
const BUILD_SCRIPT: &str = include_str!("../../docker/build-offline.sh");
const PYTHON_DOCKERFILE: &str = include_str!("../../docker/python.Dockerfile");

/// Images `helix sandbox build` makes.
const IMAGES: [&str; 2] = [DEFAULT_IMAGE, "helix-sandbox-busybox"];

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Check the Docker engine, the sandbox images and the runtimes; say how to fix what is
    /// missing. Exits 1 when sandboxed workflows could not run.
    Doctor,
    /// Build the sandbox images without a registry, from Debian packages (needs root,
    /// mmdebstrap and apt sources); a no-op when they are up to date.
    Build {
        /// Rebuild even if up to date.
        #[arg(long)]
        force: bool,
        /// Build one image only.
        #[arg(long, value_parser = ["python", "busybox"])]
        only: Option<String>,
    },
    /// Remove containers left behind by helix processes that are gone.
    Prune {
        /// Remove every helix container, including those of running helix processes.
        #[arg(long)]
        all: bool,
    },
}

pub fn sandbox(command: SandboxCommand) -> i32 {
    match command {
        SandboxCommand::Doctor => doctor(),
        SandboxCommand::Build { force, only } => build(force, only.as_deref()),
        SandboxCommand::Prune { all } => prune(all),
    }
}

fn doctor() -> i32 {
    let Ok(rt) = runtime() else {
        return EXIT_FAILED;
    };
    rt.block_on(async {
        let mut ok = true;
        let docker = match docker::connect().await {
            Ok(docker) => docker,
            Err(e) => {
                println!("✗ Docker engine: {e}");
                println!(
                    "  fix: start the Docker daemon (e.g. `sudo systemctl start docker`), or set \
                     DOCKER_HOST to a reachable engine; check with `docker info`"
                );
                return EXIT_FAILED;
            }
        };
        match docker.version().await {
            Ok(v) => println!(
                "✓ Docker engine {} (API {}) reachable{}",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default(),
                std::env::var("DOCKER_HOST")
                    .map(|h| format!(" at {h}"))
                    .unwrap_or_default()
            ),
            Err(e) => println!("✓ Docker engine reachable (version unknown: {e})"),
        }
        for image in IMAGES {
            match docker.inspect_image(image).await {
                Ok(found) => {
                    let mib = found.size.unwrap_or(0) / (1 << 20);
                    println!("✓ image {image} ({mib} MiB)");
                }
                Err(_) if image == DEFAULT_IMAGE => {
                    ok = false;
                    println!("✗ image {image}: missing (the default sandbox image)");
                    println!("  fix: `helix sandbox build` (offline, from Debian packages), or with a registry `docker build -f docker/python.Dockerfile -t {image} docker`");
                }
                Err(_) => {
                    println!("- image {image}: missing (optional; `helix sandbox build --only busybox`)");
                }
            }
        }
        match docker.info().await {
            Ok(info) => {
                let runtimes: Vec<String> = info
                    .runtimes
                    .map(|r| r.into_keys().collect())
                    .unwrap_or_default();
                println!("✓ runtimes: {}", runtimes.join(", "));
                if !runtimes.iter().any(|r| r == "runsc") {
                    println!(
                        "- gVisor (runsc) not installed: optional, for `runtime: runsc` (stronger isolation)"
                    );
                }
                println!(
                    "✓ cgroups v{}, security options: {}",
                    info.cgroup_version
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "?".into()),
                    info.security_options.unwrap_or_default().join(", ")
                );
            }
            Err(e) => println!("- engine details unavailable: {e}"),
        }
        match docker::prune(&docker, false).await {
            Ok(0) => println!("✓ no orphaned helix containers"),
            Ok(n) => println!("✓ removed {n} orphaned helix container(s)"),
            Err(e) => println!("- could not list helix containers: {e}"),
        }
        if ok {
            EXIT_OK
        } else {
            EXIT_FAILED
        }
    })
}

fn build(force: bool, only: Option<&str>) -> i32 {
    let dir = match tempfile_dir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: cannot prepare the build recipe: {e}");
            return EXIT_FAILED;
        }
    };
    let script = dir.join("build-offline.sh");
    let written = std::fs::write(&script, BUILD_SCRIPT)
        .and_then(|()| std::fs::write(dir.join("python.Dockerfile"), PYTHON_DOCKERFILE));
    if let Err(e) = written {
        eprintln!(
            "error: cannot write the build recipe to {}: {e}",
            dir.display()
        );
        return EXIT_FAILED;
    }
    let mut command = std::process::Command::new("bash");
    command.arg(&script);
    if force {
        command.arg("--force");
    }
    if let Some(only) = only {
        command.args(["--only", only]);
    }
    let status = command.status();
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Ok(status) if status.success() => EXIT_OK,
        Ok(_) => EXIT_FAILED,
        Err(e) => {
            eprintln!("error: cannot run bash: {e}");
            EXIT_INVALID
        }
    }
}

/// A private directory for the recipe files.
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "helix-sandbox-build-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

fn prune(all: bool) -> i32 {
    let Ok(rt) = runtime() else {
        return EXIT_FAILED;
    };
    rt.block_on(async {
        let docker = match docker::connect().await {
            Ok(docker) => docker,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_FAILED;
            }
        };
        match docker::prune(&docker, all).await {
            Ok(n) => {
                println!("removed {n} helix container(s)");
                EXIT_OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_FAILED
            }
        }
    })
}
