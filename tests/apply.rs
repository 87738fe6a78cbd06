//! `helix apply`, `resume`, `retry`, `runs` end to end: the real binary, a real journal in a
//! temporary `HELIX_HOME`, real host processes and scripts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// One scratch project: a directory with workflow files and its own journal.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    fn helix(&self, args: &[&str]) -> Run {
        self.helix_env(args, &[])
    }

    fn helix_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_helix"));
        cmd.args(args)
            .current_dir(self.path())
            .env("HELIX_HOME", self.path().join(".helix"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn helix");
        let t0 = Instant::now();
        let out = wait_bounded(child, Duration::from_secs(60));
        Run {
            out,
            took: t0.elapsed(),
        }
    }

    fn journal(&self) -> helix::store::Journal {
        helix::store::Journal::open(&self.path().join(".helix")).expect("journal")
    }

    fn latest_tasks(&self) -> Vec<helix::store::TaskRecord> {
        let j = self.journal();
        let run = j.find_run("latest").expect("query").expect("a run");
        j.tasks(&run.id).expect("tasks")
    }

    fn task(&self, key: &str) -> helix::store::TaskRecord {
        self.latest_tasks()
            .into_iter()
            .find(|t| t.key == key)
            .unwrap_or_else(|| panic!("no task {key} in the journal"))
    }
}

fn wait_bounded(mut child: std::process::Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "helix hung for {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Alive and not a zombie (a killed orphan may wait to be reaped by an init that never does).
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

struct Run {
    out: Output,
    took: Duration,
}

impl Run {
    fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    #[track_caller]
    fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code(),
            code,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
    fn events(&self) -> Vec<Json> {
        self.stdout()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

const HEAD: &str = "helix: 1\nname: t\nsandbox: host\n";

#[test]
fn the_example_workflow_runs_offline_and_writes_its_report() {
    let p = Project::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/hello.yaml");
    let run = p
        .helix(&[
            "apply",
            &example.to_string_lossy(),
            "-i",
            "who=team",
            "-i",
            "count=4",
        ])
        .expect(0);
    assert!(run.stderr().contains("succeeded"), "{}", run.stderr());
    let j = p.journal();
    let id = j.find_run("latest").expect("q").expect("run").id;
    let report = std::fs::read_to_string(
        p.path()
            .join(".helix/runs")
            .join(&id)
            .join("workspace/report.md"),
    )
    .expect("report");
    assert!(report.contains("# Greetings for team"), "{report}");
    assert!(report.contains("4 files"), "{report}");
    assert_eq!(
        p.task("greet").output,
        Some(serde_json::json!([
            {"exit_code": 0, "stdout": "Hello, team-1!\n", "stderr": ""},
            {"exit_code": 0, "stdout": "Hello, team-2!\n", "stderr": ""},
            {"exit_code": 0, "stdout": "Hello, team-3!\n", "stderr": ""},
            {"exit_code": 0, "stdout": "Hello, team-4!\n", "stderr": ""},
        ]))
    );
}

#[test]
fn outputs_flow_downstream_through_templates_and_script_globals() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!(
            "{HEAD}inputs:\n  n: {{ type: integer, default: 2 }}\ntasks:\n  numbers:\n    lang: lua\n    script: |\n      local t = {{}}\n      for i = 1, inputs.n * 2 do t[i] = i * 10 end\n      return {{ values = t }}\n  sum:\n    needs: [numbers]\n    script: |\n      let s = 0;\n      for v in tasks.numbers.output.values {{ s += v; }}\n      s\n  show:\n    needs: [sum]\n    run: echo total={{{{ tasks.sum.output }}}} of {{{{ tasks.numbers.output['values'] | length }}}}\n    output: {{ parse: text }}\n"
        ),
    );
    p.helix(&["apply", &w.to_string_lossy(), "-i", "n=3"])
        .expect(0);
    assert_eq!(p.task("sum").output, Some(serde_json::json!(210)));
    assert_eq!(
        p.task("show").output,
        Some(serde_json::json!("total=210 of 6"))
    );
}

#[test]
fn a_failure_skips_dependents_exits_1_and_retry_reruns_only_failed_work() {
    let p = Project::new();
    let flag = p.path().join("fixed");
    let w = p.file(
        "w.yaml",
        &format!(
            "{HEAD}tasks:\n  ok:\n    run: echo fine >> ok.log\n  flaky:\n    run: test -e {} || (echo 'not fixed yet' >&2; exit 3)\n  after:\n    needs: [flaky, ok]\n    run: echo after\n",
            flag.display()
        ),
    );
    let run = p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    assert!(run.stdout().contains("✗ flaky"), "{}", run.stdout());
    assert!(
        run.stdout().contains("exit code 3: not fixed yet"),
        "{}",
        run.stdout()
    );
    assert_eq!(p.task("after").status, "skipped");
    assert_eq!(p.task("after").reason.as_deref(), Some("`flaky` failed"));

    std::fs::write(&flag, "").expect("fix");
    let run = p.helix(&["retry", "latest"]).expect(0);
    assert!(run.stdout().contains("✓ ok (restored)"), "{}", run.stdout());
    assert_eq!(p.task("after").status, "succeeded");
    let id = p.journal().find_run("latest").expect("q").expect("run").id;
    let ok_runs = std::fs::read_to_string(
        p.path()
            .join(".helix/runs")
            .join(id)
            .join("workspace/ok.log"),
    )
    .expect("log");
    assert_eq!(
        ok_runs.lines().count(),
        1,
        "a succeeded task must not run again"
    );
}

#[test]
fn retries_back_off_and_the_second_attempt_succeeds() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}tasks:\n  twice:\n    run: echo x >> n; test $(wc -l < n) -ge 2\n    retry: {{ attempts: 3, backoff: 200ms, on: [exit_code] }}\n"),
    );
    let run = p.helix(&["apply", &w.to_string_lossy()]).expect(0);
    assert!(run.stdout().contains("↻ twice"), "{}", run.stdout());
    let t = p.task("twice");
    assert_eq!((t.status.as_str(), t.attempt), ("succeeded", 2));
}

#[test]
fn retry_on_other_classes_does_not_retry_an_exit_code() {
    let p = Project::new();
    let w = p.file("w.yaml", &format!("{HEAD}tasks:\n  once:\n    run: exit 1\n    retry: {{ attempts: 3, backoff: 10ms, on: [timeout] }}\n"));
    p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    assert_eq!(p.task("once").attempt, 1);
}

#[test]
fn a_timeout_kills_the_whole_process_tree_promptly() {
    let p = Project::new();
    let pidfile = p.path().join("bg.pid");
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}tasks:\n  slow:\n    run: sh -c 'trap \"\" TERM; sleep 30' & echo $! > {}; sleep 30\n    timeout: 500ms\n", pidfile.display()),
    );
    let run = p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    assert!(run.took < Duration::from_secs(10), "took {:?}", run.took);
    assert!(p
        .task("slow")
        .error
        .unwrap_or_default()
        .contains("timed out after 500ms"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !is_running(pid),
        "background process {pid} survived the timeout"
    );
}

#[test]
fn when_false_skips_the_task_and_its_dependents() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}inputs:\n  deploy: {{ type: boolean, default: false }}\ntasks:\n  ship:\n    when: \"{{{{ inputs.deploy }}}}\"\n    run: echo shipping\n  announce:\n    needs: [ship]\n    run: echo announced\n  always:\n    run: echo yes\n"),
    );
    p.helix(&["apply", &w.to_string_lossy()]).expect(0);
    assert_eq!(p.task("ship").status, "skipped");
    assert_eq!(p.task("announce").status, "skipped");
    assert_eq!(p.task("always").status, "succeeded");
    p.helix(&["apply", &w.to_string_lossy(), "-i", "deploy=true"])
        .expect(0);
    assert_eq!(p.task("announce").status, "succeeded");
}

#[test]
fn continue_on_error_lets_dependents_run_and_the_run_succeed() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}tasks:\n  qa:\n    tasks:\n      lint:\n        run: exit 4\n        continue_on_error: true\n      unit:\n        run: echo tests pass\n  ship:\n    needs: [qa]\n    run: echo \"lint was {{{{ tasks.qa.lint.status }}}}\"\n    output: {{ parse: text }}\n"),
    );
    p.helix(&["apply", &w.to_string_lossy()]).expect(0);
    assert_eq!(p.task("qa.lint").status, "failed");
    assert_eq!(p.task("qa").status, "succeeded");
    assert_eq!(
        p.task("ship").output,
        Some(serde_json::json!("lint was failed"))
    );
}

#[test]
fn an_approval_gate_pauses_without_a_terminal_and_resume_answers_it() {
    let p = Project::new();
    let w = p.file("w.yaml", &format!("{HEAD}tasks:\n  build:\n    run: echo built\n  ship:\n    needs: [build]\n    approve: Ship it?\n  done:\n    needs: [ship]\n    run: echo shipped\n"));
    let run = p.helix(&["apply", &w.to_string_lossy()]).expect(3);
    assert!(run.stderr().contains("--approve ship"), "{}", run.stderr());
    assert_eq!(p.task("ship").status, "awaiting_approval");
    p.helix(&["resume", "latest", "--approve", "build"])
        .expect(2);
    let run = p
        .helix(&["resume", "latest", "--approve", "ship"])
        .expect(0);
    assert!(
        run.stdout().contains("✓ build (restored)"),
        "{}",
        run.stdout()
    );
    assert_eq!(p.task("done").status, "succeeded");

    p.helix(&["apply", &w.to_string_lossy()]).expect(3);
    p.helix(&["resume", "latest", "--reject", "ship"]).expect(1);
    assert_eq!(p.task("done").status, "skipped");
    p.helix(&["apply", &w.to_string_lossy(), "--approve-all"])
        .expect(0);
}

#[test]
fn json_output_streams_one_event_per_line() {
    let p = Project::new();
    let w = p.file("w.yaml", &format!("{HEAD}tasks:\n  a:\n    script: \"40 + 2\"\n  b:\n    needs: [a]\n    for_each: \"[1, 2]\"\n    script: \"item * tasks.a.output\"\n"));
    let run = p
        .helix(&["apply", &w.to_string_lossy(), "--output", "json"])
        .expect(0);
    let events = run.events();
    assert_eq!(
        events.first().map(|e| e["event"].clone()),
        Some(Json::from("run_started"))
    );
    assert_eq!(
        events.last().map(|e| e["event"].clone()),
        Some(Json::from("run_finished"))
    );
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(Json::from("succeeded"))
    );
    let b = events
        .iter()
        .find(|e| e["event"] == "task_finished" && e["task"] == "b")
        .expect("b finished");
    assert_eq!(b["output"], serde_json::json!([42, 84]));
    assert!(events
        .iter()
        .all(|e| e["ts"].is_u64() && e["run"].is_string()));
    // The journal holds the same events.
    let id = events[0]["run"].as_str().expect("id").to_string();
    assert_eq!(p.journal().events(&id).expect("events").len(), events.len());
}

#[test]
fn inputs_are_typed_and_required() {
    let p = Project::new();
    let w = p.file("w.yaml", &format!("{HEAD}inputs:\n  name: {{ type: string }}\n  n: {{ type: integer, default: 1, enum: [1, 2] }}\ntasks:\n  a:\n    run: echo {{{{ inputs.name }}}} {{{{ inputs.n }}}}\n"));
    let f = w.to_string_lossy().to_string();
    let run = p.helix(&["apply", &f]).expect(2);
    assert!(
        run.stderr().contains("missing required input `name`"),
        "{}",
        run.stderr()
    );
    let run = p
        .helix(&["apply", &f, "-i", "name=x", "-i", "n=three"])
        .expect(2);
    assert!(
        run.stderr().contains("expected integer"),
        "{}",
        run.stderr()
    );
    let run = p
        .helix(&["apply", &f, "-i", "name=x", "-i", "n=3"])
        .expect(2);
    assert!(run.stderr().contains("must be one of"), "{}", run.stderr());
    let run = p.helix(&["apply", &f, "-i", "nmae=x"]).expect(2);
    assert!(
        run.stderr().contains("did you mean `name`?"),
        "{}",
        run.stderr()
    );
    p.helix(&["apply", &f, "-i", "name=x", "-i", "n=2"])
        .expect(0);
}

#[test]
fn resume_refuses_a_changed_workflow_unless_forced() {
    let p = Project::new();
    let w = p.file("w.yaml", &format!("{HEAD}tasks:\n  a:\n    run: exit 1\n"));
    p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    p.file("w.yaml", &format!("{HEAD}tasks:\n  a:\n    run: exit 0\n"));
    let run = p.helix(&["resume", "latest"]).expect(2);
    assert!(
        run.stderr().contains("HX0031") && run.stderr().contains("changed since run"),
        "{}",
        run.stderr()
    );
    p.helix(&["resume", "latest", "--force"]).expect(0);
    let run = p.helix(&["resume", "no-such-run"]).expect(2);
    assert!(run.stderr().contains("HX0030"), "{}", run.stderr());
}

#[test]
fn secrets_never_reach_the_journal_events_or_logs() {
    let p = Project::new();
    let secret = "s3cr3t-T0KEN-value";
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}secrets: [API_TOKEN]\ntasks:\n  leak:\n    run: echo token={{{{ env.API_TOKEN }}}}; echo $TOKEN >&2; exit 1\n    env: {{ TOKEN: \"{{{{ env.API_TOKEN }}}}\" }}\n  print:\n    run: echo token={{{{ env.API_TOKEN }}}}\n"),
    );
    let run = p
        .helix_env(
            &["apply", &w.to_string_lossy(), "--output", "json"],
            &[("API_TOKEN", secret)],
        )
        .expect(1);
    assert!(!run.stdout().contains(secret) && !run.stderr().contains(secret));
    assert!(run.stdout().contains("token=***"), "{}", run.stdout());
    let db = std::fs::read(p.path().join(".helix/helix.db")).expect("db");
    let wal = std::fs::read(p.path().join(".helix/helix.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret found in the journal files"
        );
    }
    let logs = p.helix(&["runs", "logs", "latest"]).expect(0);
    assert!(
        logs.stdout().contains("***") && !logs.stdout().contains(secret),
        "{}",
        logs.stdout()
    );
    let missing = p.helix(&["apply", &w.to_string_lossy()]).expect(2);
    assert!(
        missing
            .stderr()
            .contains("secret not set in the environment: API_TOKEN"),
        "{}",
        missing.stderr()
    );
}

#[test]
fn sub_workflows_run_as_child_runs_and_return_their_outputs() {
    let p = Project::new();
    p.file("lib/double.yaml", "helix: 1\nname: double\ninputs:\n  x: { type: integer }\ntasks:\n  result:\n    script: \"inputs.x * 2\"\n");
    let w = p.file("main.yaml", "helix: 1\nname: main\ntasks:\n  twice:\n    workflow: lib/double.yaml\n    with: { x: 21 }\n  use:\n    needs: [twice]\n    script: \"tasks.twice.output.result + 0\"\n");
    p.helix(&["apply", &w.to_string_lossy()]).expect(0);
    assert_eq!(p.task("use").output, Some(serde_json::json!(42)));
    let j = p.journal();
    let id = j.find_run("latest").expect("q").expect("run").id;
    let child = j
        .run(&format!("{id}.twice"))
        .expect("q")
        .expect("child run");
    assert_eq!(child.parent.as_deref(), Some(id.as_str()));
    assert_eq!(child.status, "succeeded");
}

#[test]
fn named_concurrency_limits_serialize_tasks() {
    let p = Project::new();
    let mut y = format!("{HEAD}concurrency: {{ one: 1 }}\ntasks:\n");
    for i in 0..4 {
        y.push_str(&format!("  t{i}:\n    concurrency: one\n    run: 'mkdir lock || exit 9; sleep 0.1; rmdir lock'\n"));
    }
    let w = p.file("w.yaml", &y);
    p.helix(&["apply", &w.to_string_lossy(), "--max-parallel", "4"])
        .expect(0);
}

#[test]
fn fan_out_respects_max_parallel() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}tasks:\n  each:\n    for_each: \"range(6) | list\"\n    max_parallel: 2\n    run: 'n=$(ls -d slot* 2>/dev/null | wc -l); test $n -lt 2 || exit 9; mkdir slot{{{{ item }}}}; sleep 0.15; rmdir slot{{{{ item }}}}'\n"),
    );
    p.helix(&["apply", &w.to_string_lossy(), "--max-parallel", "6"])
        .expect(0);
    assert_eq!(
        p.task("each").output.map(|o| o.as_array().map(Vec::len)),
        Some(Some(6))
    );
}

#[test]
fn script_limits_stop_a_runaway_task_while_siblings_succeed() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}tasks:\n  spin:\n    lang: lua\n    script: \"while true do end\"\n    timeout: 1s\n  bomb:\n    lang: lua\n    script: |\n      local s = 'x'\n      while true do s = s .. s end\n  fine:\n    script: \"[1, 2, 3].len()\"\n"),
    );
    let run = p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    assert!(run.took < Duration::from_secs(30));
    assert_eq!(p.task("fine").output, Some(serde_json::json!(3)));
    // Stopped by its instruction budget or its 1s deadline, whichever comes first, and the
    // error points at the script's line in the workflow file.
    let spin = p.task("spin").error.unwrap_or_default();
    assert!(
        spin.contains("w.yaml:7:")
            && (spin.contains("instruction limit") || spin.contains("timed out")),
        "{spin}"
    );
    assert!(
        p.task("bomb")
            .error
            .unwrap_or_default()
            .contains("memory limit"),
        "{:?}",
        p.task("bomb").error
    );
}

#[test]
fn runs_list_show_logs_and_prune() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}tasks:\n  hello:\n    run: echo hello from the log\n"),
    );
    for _ in 0..3 {
        p.helix(&["apply", &w.to_string_lossy()]).expect(0);
        std::thread::sleep(Duration::from_millis(5));
    }
    let list = p.helix(&["runs", "list"]).expect(0);
    assert_eq!(list.stdout().lines().count(), 3, "{}", list.stdout());
    let show = p.helix(&["runs", "show", "latest"]).expect(0);
    assert!(
        show.stdout().contains("hello") && show.stdout().contains("succeeded"),
        "{}",
        show.stdout()
    );
    let logs = p.helix(&["runs", "logs", "latest", "hello"]).expect(0);
    assert!(
        logs.stdout().contains("hello from the log"),
        "{}",
        logs.stdout()
    );
    p.helix(&["runs", "prune", "--keep", "1"]).expect(0);
    assert_eq!(
        p.helix(&["runs", "list"])
            .expect(0)
            .stdout()
            .lines()
            .count(),
        1
    );
}

#[test]
fn history_retention_in_the_workflow_prunes_old_runs() {
    let p = Project::new();
    let w = p.file(
        "w.yaml",
        &format!("{HEAD}history: {{ keep_runs: 2 }}\ntasks:\n  a:\n    script: \"1\"\n"),
    );
    for _ in 0..4 {
        p.helix(&["apply", &w.to_string_lossy()]).expect(0);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(p.journal().runs(100).expect("runs").len(), 2);
}

#[test]
fn init_scaffolds_a_project_that_validates_and_runs() {
    let p = Project::new();
    p.helix(&["init", "proj"]).expect(0);
    p.helix(&["validate", "proj/workflows/hello.yaml"])
        .expect(0);
    p.helix(&["apply", "proj/workflows/hello.yaml"]).expect(0);
    let again = p.helix(&["init", "proj"]).expect(1);
    assert!(
        again.stderr().contains("already exists"),
        "{}",
        again.stderr()
    );
}

#[test]
fn plan_shows_the_tree_with_rendered_fields_and_runs_nothing() {
    let p = Project::new();
    let w = p.file("w.yaml", &format!("{HEAD}inputs:\n  who: {{ type: string }}\nsecrets: [TOKEN]\ntasks:\n  greet:\n    run: echo hi {{{{ inputs.who }}}} > marker\n  later:\n    needs: [greet]\n    for_each: \"[1,2]\"\n    max_parallel: 1\n    script: \"item\"\n"));
    let run = p
        .helix(&["plan", &w.to_string_lossy(), "-i", "who=ann"])
        .expect(0);
    let out = run.stdout();
    assert!(out.contains("run: echo hi ann > marker"), "{out}");
    assert!(out.contains("later [script] needs greet"), "{out}");
    assert!(out.contains("TOKEN (NOT SET)"), "{out}");
    assert!(
        !p.path().join(".helix/runs").exists(),
        "plan must not run anything"
    );
    let missing = p.helix(&["plan", &w.to_string_lossy()]).expect(0);
    assert!(
        missing.stdout().contains("missing required input `who`"),
        "{}",
        missing.stdout()
    );
}

#[test]
fn an_agent_without_its_api_key_fails_naming_the_variable() {
    let p = Project::new();
    let w = p.file("w.yaml", "helix: 1\nname: a\nmodels:\n  default: { provider: openai, model: gpt-4o-mini, api_key_env: HELIX_TEST_NO_SUCH_KEY }\nagents:\n  writer: { role: Writer }\ntasks:\n  draft:\n    agent: writer\n    prompt: Write a haiku\n");
    p.helix(&["validate", &w.to_string_lossy()]).expect(0);
    let run = p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    assert!(
        run.stdout().contains("HELIX_TEST_NO_SUCH_KEY"),
        "{}",
        run.stdout()
    );
}

#[test]
fn a_sub_workflow_timeout_stops_the_child_runs_processes() {
    let p = Project::new();
    let pidfile = p.path().join("child.pid");
    p.file(
        "slow.yaml",
        &format!(
            "{HEAD}tasks:\n  wait:\n    run: echo $$ > {}; sleep 30\n",
            pidfile.display()
        ),
    );
    let w = p.file(
        "main.yaml",
        "helix: 1\nname: main\ntasks:\n  call:\n    workflow: slow.yaml\n    timeout: 700ms\n",
    );
    let run = p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    assert!(run.took < Duration::from_secs(15), "took {:?}", run.took);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !is_running(pid),
        "the sub-workflow's command {pid} survived the timeout"
    );
}

#[test]
fn a_custom_rhai_tool_gets_its_declared_defaults() {
    let p = Project::new();
    p.file("tools/greet.rhai", "`${args.greeting}, ${args.name}!`\n");
    let w = p.file(
        "w.yaml",
        "helix: 1\nname: t\ntools:\n  greet:\n    script: tools/greet.rhai\n    params:\n      name: { type: string }\n      greeting: { type: string, default: Hello }\ntasks:\n  hi:\n    tool: greet\n    with: { name: Ada }\n  bad:\n    tool: greet\n    with: { nme: Ada }\n",
    );
    p.helix(&["apply", &w.to_string_lossy()]).expect(1);
    assert_eq!(p.task("hi").output, Some(serde_json::json!("Hello, Ada!")));
    assert!(p
        .task("bad")
        .error
        .unwrap_or_default()
        .contains("has no parameter `nme`"));
}
