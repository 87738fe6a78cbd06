//! Engine benchmarks, run against the real `helix` binary: `cargo bench --bench engine`.
//!
//! - `helix validate` of a generated 1,000-task workflow (median of 10 runs);
//! - `helix apply` of a generated 10,000-task workflow of trivial script tasks, shaped as a
//!   100-wide fan-out of 100-long chains: wall time, per-task cost, peak RSS;
//! - the same script executed 10,000 times in-process without the engine, and an apply of a
//!   one-task workflow, to separate the engine's overhead from script and startup time.
//!
//! Results and the command that produced them are recorded in BENCHMARKS.md.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::Measured;

fn chains_workflow(chains: usize, length: usize, with_templates: bool) -> String {
    let mut y = String::with_capacity(chains * length * 80);
    y.push_str("helix: 1\nname: bench\ninputs:\n  factor: { type: integer, default: 2 }\ntasks:\n");
    for c in 0..chains {
        for i in 0..length {
            y.push_str(&format!("  c{c}_{i}:\n    script: \"1 + 1\"\n"));
            if i > 0 {
                y.push_str(&format!("    needs: [c{c}_{}]\n", i - 1));
                if with_templates {
                    y.push_str(&format!("    when: \"{{{{ tasks.c{c}_{}.status == 'succeeded' and inputs.factor > 1 }}}}\"\n", i - 1));
                }
            }
        }
    }
    y
}

/// Runs the binary with its own journal.
fn measure(args: &[&str], home: &Path) -> Measured {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix"));
    cmd.args(args).env("HELIX_HOME", home);
    support::measure(cmd)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");

    let validate_file = dir.path().join("validate-1000.yaml");
    std::fs::write(&validate_file, chains_workflow(100, 10, true)).expect("write");
    let v = validate_file.to_string_lossy().to_string();
    let runs: Vec<Duration> = (0..10)
        .map(|_| {
            let m = measure(&["validate", &v], &home);
            assert_eq!(m.status, 0, "validate failed");
            m.wall
        })
        .collect();
    println!(
        "validate 1,000 tasks: median {:.1} ms (min {:.1} ms)",
        ms(median(runs.clone())),
        ms(*runs.iter().min().unwrap_or(&Duration::ZERO))
    );

    let one = dir.path().join("one.yaml");
    std::fs::write(&one, chains_workflow(1, 1, false)).expect("write");
    let o = one.to_string_lossy().to_string();
    let startup = median(
        (0..5)
            .map(|_| measure(&["apply", &o, "--output", "plain"], &home).wall)
            .collect(),
    );
    println!(
        "apply of a 1-task workflow (startup + journal setup): {:.1} ms",
        ms(startup)
    );

    // The script alone, in-process, as many times as the big workflow runs it.
    let source = helix::scripting::ScriptSource {
        lang: helix::scripting::Lang::Rhai,
        code: "1 + 1".into(),
        name: "bench".into(),
        first_line: 1,
    };
    let globals = serde_json::Map::new();
    let limits = helix::scripting::Limits::default();
    let t0 = Instant::now();
    for _ in 0..10_000 {
        helix::scripting::run_on_current_thread(&source, &globals, &limits).expect("script");
    }
    let scripts = t0.elapsed();
    println!(
        "10,000 script executions in-process, no engine: {:.0} ms ({:.1} µs each)",
        ms(scripts),
        scripts.as_secs_f64() * 1e6 / 10_000.0
    );

    let big = dir.path().join("apply-10000.yaml");
    std::fs::write(&big, chains_workflow(100, 100, false)).expect("write");
    let b = big.to_string_lossy().to_string();
    for parallel in ["8", "100"] {
        let m = measure(
            &["apply", &b, "--output", "plain", "--max-parallel", parallel],
            &home,
        );
        assert_eq!(m.status, 0, "apply failed");
        let per_task = m.wall.as_secs_f64() * 1e6 / 10_000.0;
        let overhead =
            (m.wall.saturating_sub(startup).saturating_sub(scripts)).as_secs_f64() * 1e6 / 10_000.0;
        println!(
            "apply 10,000 tasks (--max-parallel {parallel}): {:.2} s wall, {per_task:.0} µs/task, engine overhead ≈ {overhead:.0} µs/task, peak RSS {:.1} MB",
            m.wall.as_secs_f64(),
            m.max_rss_kib as f64 / 1024.0
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
