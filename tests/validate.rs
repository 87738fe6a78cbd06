//! `helix validate` against fixture workflows: valid ones pass, every kind of mistake is
//! reported with its code, its position and a snapshot-checked message, and hostile input
//! gets a clear error instead of a panic or a hang.
//!
//! Snapshots live next to the fixtures (`tests/fixtures/err_NAME.stderr`). To rewrite them
//! after an intended change: `HELIX_BLESS=1 cargo test --test validate`, then read the diff.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A run that takes longer than this is a hang: the process is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(20);

const FIXTURES: &str = "tests/fixtures";

/// Fixtures whose message is wrong today because of a bug in src/. Everything else about
/// them (exit code, error code, position, error count) is still checked, but they have no
/// snapshot yet. With the fix: remove the entry, correct the position in `error_fixtures!`
/// if it moved, bless, and read the new snapshot.
const PENDING_SNAPSHOTS: &[(&str, &str)] = &[];

/// Fixtures whose error points into another file (a script), not the workflow itself.
const REPORTED_IN: &[(&str, &str)] = &[("rhai_file_syntax", "tests/fixtures/scripts/broken.rhai")];

/// One invocation of the `helix` binary and what it must do, in the style of just's `Test`.
struct Test {
    args: Vec<OsString>,
    current_dir: PathBuf,
    home: TempDir,
    status: i32,
    stdout: Option<String>,
    stderr: Option<String>,
}

/// What a finished run printed.
struct Output {
    stdout: String,
    stderr: String,
}

impl Test {
    fn new() -> Test {
        Test {
            args: Vec::new(),
            current_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            home: TempDir::new().expect("temp dir for HELIX_HOME"),
            status: 0,
            stdout: None,
            stderr: None,
        }
    }

    fn args<I, S>(mut self, args: I) -> Test
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    fn current_dir(mut self, dir: &Path) -> Test {
        self.current_dir = dir.to_owned();
        self
    }

    fn status(mut self, status: i32) -> Test {
        self.status = status;
        self
    }

    fn stdout(mut self, stdout: impl Into<String>) -> Test {
        self.stdout = Some(stdout.into());
        self
    }

    fn stderr(mut self, stderr: impl Into<String>) -> Test {
        self.stderr = Some(stderr.into());
        self
    }

    /// Runs helix with a deadline and checks the exit status, that nothing panicked, and
    /// the expected output when one was given.
    fn run(self) -> Output {
        let shown = format!(
            "helix {}",
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_helix"))
            .args(&self.args)
            .current_dir(&self.current_dir)
            .env("HELIX_HOME", self.home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{shown}`: {e}"));
        let stdout = read_in_background(child.stdout.take());
        let stderr = read_in_background(child.stderr.take());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for helix") {
                break status;
            }
            if started.elapsed() > TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{shown}` did not finish within {TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let output = Output {
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        };
        let report = || {
            format!(
                "`{shown}`\n--- stdout\n{}\n--- stderr\n{}",
                output.stdout, output.stderr
            )
        };
        assert!(
            !output.stdout.contains("panicked") && !output.stderr.contains("panicked"),
            "{} panicked",
            report()
        );
        let code = status
            .code()
            .unwrap_or_else(|| panic!("{} was killed by a signal", report()));
        assert_eq!(code, self.status, "exit status of {}", report());
        if let Some(expected) = &self.stdout {
            assert_eq!(&output.stdout, expected, "stdout of {}", report());
        }
        if let Some(expected) = &self.stderr {
            assert_eq!(&output.stderr, expected, "stderr of {}", report());
        }
        output
    }
}

fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

impl Output {
    /// Each diagnostic as `HX0002 at file:line:col` (or `at file` when it has no position).
    fn diagnostics(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut lines = self.stderr.lines();
        while let Some(line) = lines.next() {
            let Some(rest) = line.strip_prefix("error[") else {
                continue;
            };
            let code = rest.split(']').next().unwrap_or_default();
            let location = lines
                .next()
                .and_then(|l| l.trim_start().strip_prefix("--> "))
                .unwrap_or("(no location)");
            found.push(format!("{code} at {location}"));
        }
        found
    }
}

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn blessing() -> bool {
    std::env::var_os("HELIX_BLESS").is_some_and(|v| v == "1")
}

/// Valid fixtures, each with the number of tasks `helix validate` reports.
macro_rules! valid_fixtures {
    ($($name:ident: $tasks:literal tasks,)*) => {
        const VALID_FIXTURES: &[&str] = &[$(stringify!($name)),*];

        mod valid {
            $(
                #[test]
                fn $name() {
                    super::check_valid_fixture(stringify!($name), $tasks);
                }
            )*
        }
    };
}

valid_fixtures! {
    inputs_and_groups: 8 tasks,
    fan_out: 4 tasks,
    tools_and_scripts: 4 tasks,
    sub_workflow: 2 tasks,
    agents_and_schedule: 2 tasks,
}

fn check_valid_fixture(name: &str, tasks: usize) {
    let path = format!("{FIXTURES}/ok_{name}.yaml");
    Test::new()
        .args(["validate", &path])
        .stdout(format!("{path}: ok ({tasks} tasks)\n"))
        .stderr("")
        .run();
}

/// Invalid fixtures, each with every diagnostic it must produce, in the order printed.
macro_rules! error_fixtures {
    ($($name:ident: [$($code:ident at $line:literal:$col:literal),+ $(,)?],)*) => {
        const ERROR_FIXTURES: &[&str] = &[$(stringify!($name)),*];

        mod error {
            $(
                #[test]
                fn $name() {
                    super::check_error_fixture(
                        stringify!($name),
                        &[$((stringify!($code), $line, $col)),+],
                    );
                }
            )*
        }
    };
}

error_fixtures! {
    yaml_syntax: [HX0001 at 6:4],
    unknown_key: [HX0002 at 5:5],
    wrong_type: [HX0003 at 6:24],
    bad_duration: [HX0006 at 6:14],
    bad_size: [HX0007 at 5:11],
    missing_helix: [HX0005 at 1:1],
    future_version: [HX0005 at 1:8],
    duplicate_key: [HX0001 at 8:3],
    task_no_kind: [HX0008 at 6:3],
    task_two_kinds: [HX0008 at 7:5],
    unknown_need: [HX0009 at 7:13],
    cycle: [HX0010 at 4:3],
    self_need: [HX0011 at 5:13],
    unknown_agent: [HX0012 at 10:12],
    unknown_tool: [HX0012 at 5:11],
    unknown_model: [HX0012 at 9:12],
    missing_prompt_file: [HX0013 at 8:13],
    missing_script_file: [HX0013 at 5:13],
    template_syntax: [HX0014 at 13:16],
    undefined_input: [HX0015 at 10:16],
    item_outside_for_each: [HX0015 at 7:13],
    not_a_need: [HX0022 at 11:16],
    invalid_cron: [HX0016 at 3:19],
    max_parallel_zero: [HX0017 at 6:19],
    run_without_sandbox: [HX0019 at 5:10],
    lua_syntax: [HX0021 at 10:7],
    rhai_file_syntax: [HX0021 at 5:1],
    unknown_input_type: [HX0017 at 4:18],
    sub_workflow_missing_input: [HX0018 at 5:15],
    many: [HX0002 at 9:5, HX0009 at 11:13, HX0017 at 13:24, HX0015 at 19:16],
}

fn check_error_fixture(name: &str, expected: &[(&str, u32, u32)]) {
    let path = format!("{FIXTURES}/err_{name}.yaml");
    let output = Test::new()
        .args(["validate", &path])
        .status(2)
        .stdout("")
        .run();
    let reported_in = REPORTED_IN
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(path.as_str(), |(_, file)| file);
    let wanted: Vec<String> = expected
        .iter()
        .map(|(code, line, col)| format!("{code} at {reported_in}:{line}:{col}"))
        .collect();
    assert_eq!(output.diagnostics(), wanted, "stderr:\n{}", output.stderr);
    let count = match expected.len() {
        1 => "1 error found\n".to_string(),
        n => format!("{n} errors found\n"),
    };
    assert!(
        output.stderr.ends_with(&count),
        "the report must end with `{}`:\n{}",
        count.trim_end(),
        output.stderr
    );
    check_snapshot(name, &output.stderr);
}

/// Compares stderr with `err_NAME.stderr`, or writes it when blessing.
fn check_snapshot(name: &str, stderr: &str) {
    let snapshot = crate_root()
        .join(FIXTURES)
        .join(format!("err_{name}.stderr"));
    if let Some((_, bug)) = PENDING_SNAPSHOTS.iter().find(|(n, _)| *n == name) {
        if blessing() || !snapshot.exists() {
            eprintln!("err_{name}: snapshot pending a fix in src/: {bug}");
            return;
        }
    }
    if blessing() {
        std::fs::write(&snapshot, stderr).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&snapshot).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nrun `HELIX_BLESS=1 cargo test --test validate` to create it",
            snapshot.display()
        )
    });
    if stderr != expected {
        panic!(
            "stderr differs from {}{}\n--- expected\n{expected}--- actual\n{stderr}---\n\
             if the change is intended, run `HELIX_BLESS=1 cargo test --test validate` \
             and read the new snapshot",
            snapshot.display(),
            first_difference(&expected, stderr),
        );
    }
}

fn first_difference(expected: &str, actual: &str) -> String {
    let mut e = expected.lines();
    let mut a = actual.lines();
    for number in 1.. {
        match (e.next(), a.next()) {
            (None, None) => break,
            (x, y) if x == y => {}
            (x, y) => {
                return format!(" at line {number}:\n  expected: {x:?}\n  actual:   {y:?}");
            }
        }
    }
    String::new()
}

#[test]
fn every_fixture_is_checked() {
    let dir = crate_root().join(FIXTURES);
    for entry in std::fs::read_dir(&dir).expect("fixtures dir") {
        let file = entry.expect("dir entry").file_name();
        let file = file.to_string_lossy();
        if let Some(name) = file
            .strip_prefix("ok_")
            .and_then(|f| f.strip_suffix(".yaml"))
        {
            assert!(
                VALID_FIXTURES.contains(&name),
                "{file} is not listed in valid_fixtures!"
            );
        }
        let error_name = file.strip_prefix("err_").and_then(|f| {
            f.strip_suffix(".yaml")
                .or_else(|| f.strip_suffix(".stderr"))
        });
        if let Some(name) = error_name {
            assert!(
                ERROR_FIXTURES.contains(&name),
                "{file} is not listed in error_fixtures!"
            );
        }
    }
    for (name, _) in PENDING_SNAPSHOTS {
        assert!(
            ERROR_FIXTURES.contains(name),
            "pending snapshot `{name}` is no fixture"
        );
    }
}

#[test]
fn validates_several_files_and_reports_each_failure() {
    let ok = format!("{FIXTURES}/ok_fan_out.yaml");
    let output = Test::new()
        .args([
            "validate",
            &ok,
            &format!("{FIXTURES}/err_unknown_key.yaml"),
            &format!("{FIXTURES}/err_cycle.yaml"),
        ])
        .status(2)
        .stdout(format!("{ok}: ok (4 tasks)\n"))
        .run();
    assert_eq!(
        output.diagnostics(),
        [
            format!("HX0002 at {FIXTURES}/err_unknown_key.yaml:5:5"),
            format!("HX0010 at {FIXTURES}/err_cycle.yaml:4:3"),
        ]
    );
}

#[test]
fn misspelled_key_suggests_the_right_one() {
    let output = Test::new()
        .args(["validate", "tests/fixtures/err_unknown_key.yaml"])
        .status(2)
        .run();
    assert!(
        output.stderr.contains("help: did you mean `needs`?"),
        "{}",
        output.stderr
    );
}

#[test]
fn cycle_is_printed_with_arrows() {
    let output = Test::new()
        .args(["validate", "tests/fixtures/err_cycle.yaml"])
        .status(2)
        .run();
    assert!(
        output
            .stderr
            .contains("dependency cycle: design → implement → review → design"),
        "{}",
        output.stderr
    );
}

/// Where a hostile document's diagnostic must point.
enum At {
    Pos(u32, u32),
    Line(u32),
    SomeLine,
    /// The file as a whole: there is no line to point at.
    File,
}

/// A hostile document, created at run time in a temp dir (never committed).
enum Doc {
    Bytes(Vec<u8>),
    Directory,
    Missing,
}

fn check_hostile(doc: Doc, code: &str, at: At) {
    let dir = TempDir::new().expect("temp dir");
    let file = "hostile.yaml";
    match doc {
        Doc::Bytes(bytes) => std::fs::write(dir.path().join(file), bytes).expect("write doc"),
        Doc::Directory => std::fs::create_dir(dir.path().join(file)).expect("create dir"),
        Doc::Missing => {}
    }
    let output = Test::new()
        .args(["validate", file])
        .current_dir(dir.path())
        .status(2)
        .stdout("")
        .run();
    let diagnostics = output.diagnostics();
    assert_eq!(diagnostics.len(), 1, "stderr:\n{}", output.stderr);
    let location = diagnostics[0]
        .strip_prefix(&format!("{code} at {file}"))
        .unwrap_or_else(|| panic!("expected {code} at {file}, got {}", diagnostics[0]));
    let position: Vec<u32> = location
        .split(':')
        .skip(1)
        .map(|n| n.parse().expect("line and column are numbers"))
        .collect();
    match at {
        At::Pos(line, col) => assert_eq!(position, [line, col], "{}", diagnostics[0]),
        At::Line(line) => assert_eq!(position.first(), Some(&line), "{}", diagnostics[0]),
        At::SomeLine => assert_eq!(position.len(), 2, "{}", diagnostics[0]),
        At::File => assert!(position.is_empty(), "{}", diagnostics[0]),
    }
    assert!(
        output.stderr.len() < 4096,
        "the error must not echo the document back ({} bytes of stderr)",
        output.stderr.len()
    );
}

/// Billion laughs: ten levels of ten aliases each would expand to 10^10 nodes.
fn alias_bomb() -> Vec<u8> {
    let mut text = String::from("helix: 1\nname: laughs\ninputs:\n  lol:\n    default:\n");
    text.push_str("      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for level in 1..10 {
        let refs = vec![format!("*l{}", level - 1); 10].join(", ");
        let _ = writeln!(text, "      l{level}: &l{level} [{refs}]");
    }
    text.push_str("tasks:\n  t:\n    script: \"1\"\n");
    text.into_bytes()
}

const DEPTH: usize = 5000;

#[test]
fn alias_bomb_is_refused() {
    check_hostile(Doc::Bytes(alias_bomb()), "HX0001", At::SomeLine);
}

#[test]
fn deep_flow_nesting_is_refused() {
    let text = format!(
        "helix: 1\nname: deep\ntasks: {}{}\n",
        "[".repeat(DEPTH),
        "]".repeat(DEPTH)
    );
    check_hostile(Doc::Bytes(text.into_bytes()), "HX0001", At::Line(3));
}

#[test]
fn deep_block_nesting_is_refused() {
    let mut text = String::from("helix: 1\nname: deep\ntasks:\n");
    for depth in 1..=DEPTH {
        let _ = writeln!(text, "{}k:", " ".repeat(depth));
    }
    check_hostile(Doc::Bytes(text.into_bytes()), "HX0001", At::SomeLine);
}

#[test]
fn invalid_utf8_points_at_the_first_bad_byte() {
    let bytes = b"helix: 1\nname: bytes\ntasks:\n  t:\n    script: \"\xff\xfe\"\n".to_vec();
    check_hostile(Doc::Bytes(bytes), "HX0020", At::Pos(5, 14));
}

#[test]
fn empty_file_is_refused() {
    check_hostile(Doc::Bytes(Vec::new()), "HX0001", At::Pos(1, 1));
}

#[test]
fn top_level_list_is_refused() {
    let text = b"- helix: 1\n- name: list\n- tasks: {}\n".to_vec();
    check_hostile(Doc::Bytes(text), "HX0003", At::Pos(1, 1));
}

#[test]
fn huge_file_is_refused() {
    let mut text = String::from("helix: 1\nname: huge\ndescription: \"");
    text.push_str(&"x".repeat(20 << 20));
    text.push_str("\"\ntasks:\n  t:\n    script: \"1\"\n");
    check_hostile(Doc::Bytes(text.into_bytes()), "HX0020", At::File);
}

#[test]
fn directory_is_refused() {
    check_hostile(Doc::Directory, "HX0020", At::File);
}

#[test]
fn missing_file_is_refused() {
    check_hostile(Doc::Missing, "HX0020", At::File);
}

#[test]
fn explain_prints_the_cycle_page() {
    let output = Test::new().args(["explain", "HX0010"]).stderr("").run();
    assert!(
        output.stdout.starts_with("HX0010: dependency cycle\n"),
        "{}",
        output.stdout
    );
    assert!(
        output.stdout.contains("remove one of its edges"),
        "{}",
        output.stdout
    );
}

#[test]
fn explain_refuses_an_unknown_code() {
    let output = Test::new()
        .args(["explain", "HX9999"])
        .status(2)
        .stdout("")
        .run();
    assert!(output.stderr.contains("HX9999"), "{}", output.stderr);
}

#[test]
fn schema_is_json_with_the_task_tree() {
    let output = Test::new().args(["schema"]).stderr("").run();
    let schema: serde_json::Value =
        serde_json::from_str(&output.stdout).expect("`helix schema` prints JSON");
    assert_eq!(
        schema["properties"]["tasks"]["type"], "object",
        "{schema:#}"
    );
    assert!(
        schema["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|k| k == "tasks")),
        "{schema:#}"
    );
}
