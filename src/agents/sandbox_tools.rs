//! `sandbox.exec` and `sandbox.test`: agents run commands and code in the task's sandbox
//! (a container, unless the workflow chose `sandbox: host`) and get back what a developer
//! would look at: exit code, output, timing, what was cut, and which limit stopped it.

use std::time::Duration;

use serde_json::{json, Value as Json};

use super::ToolEnv;
use crate::llm::ToolSpec;
use crate::sandbox::{ExecOutput, ExecRequest};

/// Output an agent gets back per stream; the model's context is the scarce part.
const TOOL_OUTPUT_LIMIT: usize = 64 * 1024;
/// Code passed in the environment; Linux caps one variable at 128 KiB.
const MAX_CODE_BYTES: usize = 100 * 1024;

pub fn exec_spec() -> ToolSpec {
    ToolSpec {
        name: "sandbox.exec".into(),
        description: "Run a shell command, or a code snippet, in the sandbox (no network unless \
                      the workflow allows it). The workspace is the current directory. Returns \
                      exit_code, stdout, stderr, duration_ms, and what was cut or which limit \
                      stopped it."
            .into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "command": { "type": "string", "description": "Shell command (sh -c)." },
                "code": { "type": "string", "description": "Source code to run instead of a command." },
                "language": { "type": "string", "enum": ["python", "sh", "bash"], "default": "python",
                              "description": "Language of `code`." },
                "timeout_s": { "type": "number", "description": "Seconds before the command is killed (at most the sandbox's timeout)." }
            }
        }),
    }
}

pub fn test_spec() -> ToolSpec {
    ToolSpec {
        name: "sandbox.test".into(),
        description: "Run the project's tests in the sandbox (default: pytest) and return \
                      passed/failed counts when the runner's summary can be read, the exit \
                      code, and the end of the output."
            .into(),
        parameters: json!({
            "type": "object",
            "properties": {
                "command": { "type": "string", "description": "Test command; default `python3 -m pytest -q`." },
                "timeout_s": { "type": "number" }
            }
        }),
    }
}

pub async fn exec(env: &ToolEnv, args: &Json) -> Result<Json, String> {
    let command = match (str_arg(args, "command")?, str_arg(args, "code")?) {
        (Some(_), Some(_)) => return Err("give `command` or `code`, not both".into()),
        (None, None) => return Err("`command` or `code` is required".into()),
        (Some(command), None) => (command.to_string(), Vec::new()),
        (None, Some(code)) => code_command(code, str_arg(args, "language")?.unwrap_or("python"))?,
    };
    let out = run(env, command, timeout(args)?).await?;
    Ok(report(&out))
}

pub async fn test(env: &ToolEnv, args: &Json) -> Result<Json, String> {
    let command = str_arg(args, "command")?
        .unwrap_or("python3 -m pytest -q")
        .to_string();
    let out = run(env, (command, Vec::new()), timeout(args)?).await?;
    let mut result = report(&out);
    let counts = test_counts(&format!("{}\n{}", out.stdout, out.stderr));
    result["passed"] = counts.passed.map_or(Json::Null, Json::from);
    result["failed"] = counts.failed.map_or(Json::Null, Json::from);
    result["errors"] = counts.errors.map_or(Json::Null, Json::from);
    result["skipped"] = counts.skipped.map_or(Json::Null, Json::from);
    result["ok"] = Json::Bool(out.exit_code == Some(0));
    Ok(result)
}

fn str_arg<'a>(args: &'a Json, name: &str) -> Result<Option<&'a str>, String> {
    match args.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{name}` must be a string, got {other}")),
    }
}

fn timeout(args: &Json) -> Result<Option<Duration>, String> {
    match args.get("timeout_s") {
        None | Some(Json::Null) => Ok(None),
        Some(value) => value
            .as_f64()
            .filter(|s| *s > 0.0 && s.is_finite())
            .map(|s| Some(Duration::from_secs_f64(s.min(86_400.0))))
            .ok_or_else(|| format!("`timeout_s` must be a positive number, got {value}")),
    }
}

/// A command that runs `code` from the environment, so no quoting can break it.
fn code_command(code: &str, language: &str) -> Result<(String, Vec<(String, String)>), String> {
    if code.len() > MAX_CODE_BYTES {
        return Err(format!(
            "`code` is {} bytes; at most {MAX_CODE_BYTES} can be passed (write it to a file with fs.write and run that)",
            code.len()
        ));
    }
    let command = match language {
        "python" => r#"exec python3 -c "$HELIX_CODE""#,
        "sh" => r#"exec sh -c "$HELIX_CODE""#,
        "bash" => r#"exec bash -c "$HELIX_CODE""#,
        other => return Err(format!("unknown `language` `{other}` (python, sh or bash)")),
    };
    Ok((
        command.to_string(),
        vec![("HELIX_CODE".to_string(), code.to_string())],
    ))
}

async fn run(
    env: &ToolEnv,
    (command, vars): (String, Vec<(String, String)>),
    timeout: Option<Duration>,
) -> Result<ExecOutput, String> {
    let sandbox = env
        .sandbox
        .as_ref()
        .ok_or("this task has no sandbox to run commands in")?;
    sandbox
        .exec(ExecRequest {
            command,
            workdir: env.workspace.clone(),
            env: vars,
            timeout,
            output_limit: TOOL_OUTPUT_LIMIT,
        })
        .await
        .map_err(|e| e.to_string())
}

fn report(out: &ExecOutput) -> Json {
    let mut cut = Vec::new();
    if out.stdout_truncated {
        cut.push("stdout");
    }
    if out.stderr_truncated {
        cut.push("stderr");
    }
    json!({
        "exit_code": out.exit_code,
        "signal": out.signal,
        "stdout": out.stdout,
        "stderr": out.stderr,
        "duration_ms": u64::try_from(out.duration.as_millis()).unwrap_or(u64::MAX),
        "timed_out": out.timed_out,
        "cut": cut,
        "limit": out.limit,
    })
}

/// Counts read from a test runner's summary line; `None` where it says nothing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: Option<u64>,
    pub failed: Option<u64>,
    pub errors: Option<u64>,
    pub skipped: Option<u64>,
}

/// Reads pytest (`3 passed, 1 failed in 0.12s`), cargo (`test result: ok. 5 passed; 0
/// failed; 1 ignored`), unittest (`Ran 4 tests` … `FAILED (failures=1, errors=1)`) and
/// jest-style (`Tests: 1 failed, 3 passed, 4 total`) summaries; the last summary wins.
pub fn test_counts(output: &str) -> TestCounts {
    let mut counts = TestCounts::default();
    for line in output.lines() {
        let line = line.trim().trim_matches('=').trim();
        let lower = line.to_ascii_lowercase();
        if let Some(total) = lower
            .strip_prefix("ran ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            // unittest: everything ran passed unless the FAILED line says otherwise.
            counts = TestCounts {
                passed: Some(total),
                failed: Some(0),
                errors: Some(0),
                skipped: Some(0),
            };
            continue;
        }
        if lower.starts_with("failed (") || lower.starts_with("ok (") {
            let mut failed = 0;
            for part in lower
                .trim_start_matches(|c| c != '(')
                .trim_matches(['(', ')'])
                .split(',')
            {
                let Some((key, n)) = part.trim().split_once('=') else {
                    continue;
                };
                let n: u64 = n.trim().parse().unwrap_or(0);
                match key {
                    "failures" => {
                        counts.failed = Some(n);
                        failed += n;
                    }
                    "errors" => {
                        counts.errors = Some(n);
                        failed += n;
                    }
                    "skipped" => counts.skipped = Some(n),
                    _ => {}
                }
            }
            if let Some(passed) = counts.passed {
                counts.passed = Some(passed.saturating_sub(failed + counts.skipped.unwrap_or(0)));
            }
            continue;
        }
        let mut found = TestCounts::default();
        let words: Vec<&str> = lower
            .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .collect();
        for pair in words.windows(2) {
            let Ok(n) = pair[0].parse::<u64>() else {
                continue;
            };
            match pair[1].trim_end_matches('.') {
                "passed" => found.passed = Some(n),
                "failed" => found.failed = Some(n),
                "error" | "errors" => found.errors = Some(n),
                "skipped" | "ignored" => found.skipped = Some(n),
                _ => {}
            }
        }
        let summary = lower.contains(" in ")
            || lower.starts_with("test result:")
            || lower.starts_with("tests:");
        if summary && (found.passed.is_some() || found.failed.is_some()) {
            counts = found;
            if lower.starts_with("test result:") {
                counts.errors = counts.errors.or(Some(0));
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(passed: u64, failed: u64, errors: Option<u64>, skipped: Option<u64>) -> TestCounts {
        TestCounts {
            passed: Some(passed),
            failed: Some(failed),
            errors,
            skipped,
        }
    }

    #[test]
    fn pytest_summaries_are_read() {
        let out = "....F.\n=== 1 failed, 5 passed, 2 skipped in 0.31s ===";
        assert_eq!(test_counts(out), counts(5, 1, None, Some(2)));
        let out = "=========== 3 passed in 0.01s ===========";
        assert_eq!(
            test_counts(out),
            TestCounts {
                passed: Some(3),
                ..TestCounts::default()
            }
        );
    }

    #[test]
    fn cargo_and_jest_summaries_are_read() {
        let out = "test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured";
        assert_eq!(test_counts(out), counts(5, 2, Some(0), Some(1)));
        let out = "Tests:       1 failed, 3 passed, 4 total";
        assert_eq!(
            test_counts(out),
            TestCounts {
                passed: Some(3),
                failed: Some(1),
                ..TestCounts::default()
            }
        );
    }

    #[test]
    fn unittest_summaries_are_read() {
        let out = "Ran 6 tests in 0.002s\n\nFAILED (failures=1, errors=2)";
        assert_eq!(test_counts(out), counts(3, 1, Some(2), Some(0)));
        let out = "Ran 4 tests in 0.001s\n\nOK";
        assert_eq!(test_counts(out), counts(4, 0, Some(0), Some(0)));
    }

    #[test]
    fn output_without_a_summary_gives_no_counts() {
        assert_eq!(
            test_counts("hello\n2 apples in a basket"),
            TestCounts::default()
        );
    }

    #[test]
    fn code_is_passed_in_the_environment_not_the_command() {
        let (command, vars) = code_command("print(\"a'b\")", "python").expect("python");
        assert_eq!(command, r#"exec python3 -c "$HELIX_CODE""#);
        assert_eq!(
            vars,
            [("HELIX_CODE".to_string(), "print(\"a'b\")".to_string())]
        );
        assert!(code_command("x", "ruby").is_err());
    }
}
