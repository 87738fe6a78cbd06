//! Agent-task benchmarks, run against the real `helix` binary: `cargo bench --bench agents`.
//!
//! The bench serves an OpenAI-compatible Chat Completions endpoint on 127.0.0.1 from this
//! process, answering every request at once with a fixed reply, and adds up the time it spends
//! on each request. Against it, `helix apply` runs:
//!
//! - a one-agent-task workflow, the baseline (process start, journal, HTTP client, one step);
//! - a chain of 1,000 agent tasks, each needing the one before;
//! - one agent task fanned out 100 wide with `for_each`, all items at once.
//!
//! Engine overhead per agent step is (wall − server time − the baseline's wall net of its
//! server time) / steps: what helix itself costs per LLM call, with the model made free.
//!
//! Results and the command that produced them are recorded in BENCHMARKS.md.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::Measured;

const REPLY: &str = r#"{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;

const KEY_ENV: &str = "BENCH_KEY";

const REPETITIONS: usize = 10;

/// What the server did since it was last asked.
#[derive(Default)]
struct ServerStats {
    connections: AtomicU64,
    requests: AtomicU64,
    not_ok: AtomicU64,
    busy_nanos: AtomicU64,
}

struct Tally {
    connections: u64,
    requests: u64,
    not_ok: u64,
    busy: Duration,
}

impl ServerStats {
    /// Reads and resets the counters, so each run is counted on its own.
    fn take(&self) -> Tally {
        Tally {
            connections: self.connections.swap(0, Ordering::SeqCst),
            requests: self.requests.swap(0, Ordering::SeqCst),
            not_ok: self.not_ok.swap(0, Ordering::SeqCst),
            busy: Duration::from_nanos(self.busy_nanos.swap(0, Ordering::SeqCst)),
        }
    }
}

/// Starts the loopback model server: a thread per connection, many requests per connection.
fn start_server(stats: Arc<ServerStats>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            stats.connections.fetch_add(1, Ordering::SeqCst);
            let stats = Arc::clone(&stats);
            thread::spawn(move || serve_connection(stream, &stats));
        }
    });
    addr
}

/// Serves requests on one connection until the client closes it. A request is timed from the
/// moment its first byte can be read to the moment the whole response has been written.
fn serve_connection(stream: TcpStream, stats: &ServerStats) {
    let _ = stream.set_nodelay(true);
    let ok = response(200, "OK", REPLY);
    let not_found = response(404, "Not Found", r#"{"error":{"message":"not found"}}"#);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        match reader.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(_) => {}
        }
        let t0 = Instant::now();
        let Some(request) = read_request(&mut reader, &mut line, &mut body) else {
            return;
        };
        let is_chat = request.method == "POST" && request.path.ends_with("/chat/completions");
        let reply = if is_chat { &ok } else { &not_found };
        if reader.get_mut().write_all(reply).is_err() {
            return;
        }
        stats
            .busy_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::SeqCst);
        stats.requests.fetch_add(1, Ordering::SeqCst);
        if !is_chat {
            stats.not_ok.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct RequestHead {
    method: String,
    path: String,
}

/// Reads the request line, the headers and a `Content-Length` body (left in `body`).
fn read_request(
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
    body: &mut Vec<u8>,
) -> Option<RequestHead> {
    line.clear();
    reader.read_line(line).ok()?;
    let mut parts = line.split_whitespace();
    let head = RequestHead {
        method: parts.next()?.to_string(),
        path: parts.next()?.to_string(),
    };
    let mut content_length = 0;
    loop {
        line.clear();
        if reader.read_line(line).ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().ok()?;
            }
        }
    }
    body.resize(content_length, 0);
    reader.read_exact(body).ok()?;
    Some(head)
}

fn response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn header(addr: SocketAddr) -> String {
    format!(
        "helix: 1\nname: bench\nmodels:\n  default: {{ provider: openai, model: m, base_url: \"http://{addr}/v1\", api_key_env: {KEY_ENV} }}\nagents:\n  a: {{ role: Worker }}\ntasks:\n"
    )
}

fn chain_workflow(addr: SocketAddr, length: usize) -> String {
    let mut y = header(addr);
    for i in 0..length {
        y.push_str(&format!(
            "  t{i}:\n    agent: a\n    prompt: \"step {i}\"\n"
        ));
        if i > 0 {
            y.push_str(&format!("    needs: [t{}]\n", i - 1));
        }
    }
    y
}

fn fan_out_workflow(addr: SocketAddr, width: usize) -> String {
    header(addr)
        + &format!(
            "  each:\n    for_each: \"range({width}) | list\"\n    max_parallel: {width}\n    agent: a\n    prompt: \"item {{{{ item }}}}\"\n"
        )
}

/// Runs the binary in `dir` with its own journal and the bench's API key.
fn measure(args: &[&str], dir: &Path, home: &Path) -> Measured {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix"));
    cmd.args(args)
        .current_dir(dir)
        .env("HELIX_HOME", home)
        .env(KEY_ENV, "sk-bench");
    support::measure(cmd)
}

/// One apply of a workflow, with what the server saw during it.
struct Run {
    wall: Duration,
    server: Tally,
    max_rss_kib: i64,
}

impl Run {
    /// The wall time helix did not spend waiting on the server.
    fn net(&self) -> Duration {
        self.wall.saturating_sub(self.server.busy)
    }
}

struct Bench<'a> {
    dir: &'a Path,
    stats: &'a ServerStats,
    runs: usize,
}

impl Bench<'_> {
    /// Applies `workflow` with a fresh `HELIX_HOME`, checking that it succeeded and that the
    /// server answered exactly `steps` requests, all with a 200.
    fn apply(&mut self, workflow: &str, steps: u64, extra: &[&str]) -> Run {
        self.runs += 1;
        let file = self.dir.join(format!("run-{}.yaml", self.runs));
        std::fs::write(&file, workflow).expect("write workflow");
        let home = self.dir.join(format!("home-{}", self.runs));
        let file = file.to_string_lossy();
        let mut args = vec!["apply", &file, "--output", "plain"];
        args.extend_from_slice(extra);
        self.stats.take();
        let m = measure(&args, self.dir, &home);
        let server = self.stats.take();
        assert_eq!(m.status, 0, "helix {args:?} exited {}", m.status);
        assert_eq!(server.not_ok, 0, "requests not answered with a 200");
        assert_eq!(server.requests, steps, "requests sent for {steps} steps");
        Run {
            wall: m.wall,
            server,
            max_rss_kib: m.max_rss_kib,
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs one shape `REPETITIONS` times and prints each run and the medians.
fn report(
    bench: &mut Bench,
    label: &str,
    workflow: &str,
    steps: u64,
    extra: &[&str],
    baseline: Duration,
) {
    let runs: Vec<Run> = (0..REPETITIONS)
        .map(|_| bench.apply(workflow, steps, extra))
        .collect();
    let overhead = |r: &Run| r.net().saturating_sub(baseline) / steps as u32;
    for (i, r) in runs.iter().enumerate() {
        println!(
            "  {label} run {}: wall {:.0} ms, server {:.1} ms, {} requests, {} connections, overhead {:.0} µs/step, peak RSS {:.1} MB",
            i + 1,
            ms(r.wall),
            ms(r.server.busy),
            r.server.requests,
            r.server.connections,
            overhead(r).as_secs_f64() * 1e6,
            mb(r.max_rss_kib),
        );
    }
    let wall = median(runs.iter().map(|r| r.wall).collect());
    let server = median(runs.iter().map(|r| r.server.busy).collect());
    let per_step = median(runs.iter().map(overhead).collect());
    let rss = runs.iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
    println!(
        "{label}: median wall {:.0} ms, server {:.1} ms ({:.1} µs/request); engine overhead ≈ {:.0} µs/step (target < 1,000 µs); peak RSS {:.1} MB (max of {REPETITIONS})",
        ms(wall),
        ms(server),
        server.as_secs_f64() * 1e6 / steps as f64,
        per_step.as_secs_f64() * 1e6,
        mb(rss),
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = Arc::new(ServerStats::default());
    let addr = start_server(Arc::clone(&stats));
    println!("model server: http://{addr}/v1 (keep-alive, a thread per connection, fixed reply)");
    let mut bench = Bench {
        dir: dir.path(),
        stats: &stats,
        runs: 0,
    };

    let one = chain_workflow(addr, 1);
    let baselines: Vec<Run> = (0..REPETITIONS)
        .map(|_| bench.apply(&one, 1, &[]))
        .collect();
    let baseline = median(baselines.iter().map(Run::net).collect());
    println!(
        "baseline, apply of a 1-agent-task workflow: median wall {:.1} ms, {:.1} ms net of server time; peak RSS {:.1} MB",
        ms(median(baselines.iter().map(|r| r.wall).collect())),
        ms(baseline),
        mb(baselines.iter().map(|r| r.max_rss_kib).max().unwrap_or(0)),
    );

    report(
        &mut bench,
        "chain of 1,000 agent tasks",
        &chain_workflow(addr, 1000),
        1000,
        &[],
        baseline,
    );
    report(
        &mut bench,
        "fan-out of 100 agent tasks (--max-parallel 100)",
        &fan_out_workflow(addr, 100),
        100,
        &["--max-parallel", "100"],
        baseline,
    );
}
