//! Stable error codes (HX0001…) and the page `helix explain CODE` prints for each.

use std::fmt;

macro_rules! codes {
    ($( $variant:ident = $num:literal, $title:literal, $page:literal; )*) => {
        /// A stable identifier for each kind of user-facing error.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code { $( $variant, )* }

        impl Code {
            pub const ALL: &'static [Code] = &[ $( Code::$variant, )* ];

            pub fn number(self) -> u16 {
                match self { $( Code::$variant => $num, )* }
            }

            pub fn title(self) -> &'static str {
                match self { $( Code::$variant => $title, )* }
            }

            /// The explanation page: why the error happens and how to fix it.
            pub fn page(self) -> &'static str {
                match self { $( Code::$variant => $page, )* }
            }
        }
    };
}

codes! {
    YamlSyntax = 1, "YAML syntax error",
"The file is not valid YAML, or it breaks one of the limits helix sets on YAML documents
(nesting deeper than 64 levels, too many aliases or anchors, alias expansion bombs,
more than one document, duplicate keys in a mapping).

Fix the YAML at the position shown. Duplicate keys are always an error because the
second one would silently replace the first.";

    UnknownKey = 2, "unknown key",
"A mapping has a key that helix does not know at this place in the workflow. Misspelled
keys are never ignored, because a silently ignored `timout:` would leave a task without
its intended limit. The message suggests the closest known key.";

    WrongType = 3, "wrong type",
"A value has the wrong type, e.g. a string where a number is expected:

    max_parallel: four   # wrong: a positive integer
    max_parallel: 4      # right";

    MissingKey = 4, "missing required key",
"A required key is absent. A workflow needs `helix: 1`, `name` and `tasks`; inputs with
no default must be given with `-i name=value`.";

    Version = 5, "unsupported format version",
"The `helix:` key gives the version of the workflow format. This build reads version 1.
Write `helix: 1` at the top of the file; a newer version needs a newer helix.";

    Duration = 6, "invalid duration",
"Durations are a number followed by a unit: `500ms`, `30s`, `5m`, `2h`, `1d`, or a
combination such as `1m30s`. A bare number is read as seconds.";

    Size = 7, "invalid size",
"Sizes are a number with an optional unit: `512MiB`, `1GiB`, `64KiB`, `100MB`, `1G`.
Binary (KiB, MiB, GiB) and decimal (KB, MB, GB) units are accepted; a bare number is bytes.";

    TaskKind = 8, "task has no kind or several kinds",
"A task is exactly one of: `agent`, `run`, `script`, `tool`, `workflow`, `approve`, or a
group (only `tasks:`). A task with none of these, or with two of them, is ambiguous.
Split it into two tasks joined by `needs:`.";

    UnknownNeed = 9, "unknown task in `needs`",
"`needs:` names a task that does not exist. Names resolve first among the task's siblings,
then as a full dotted id (`qa.unit`). The message suggests the closest task id.";

    Cycle = 10, "dependency cycle",
"The `needs:` edges form a cycle, so no task in it could ever start. The message prints
the cycle; remove one of its edges.";

    SelfNeed = 11, "task needs itself",
"A task lists itself in `needs:`. Remove the entry.";

    UnknownName = 12, "unknown agent, tool, model or concurrency name",
"A task or agent refers to an agent, tool, model or concurrency limit that is not declared.
Declare it under `agents:`, `tools:`, `models:` or `concurrency:`, or use one of the
built-in tools: fs.read, fs.write, fs.list, fs.search. The message suggests the closest
declared name.";

    MissingFile = 13, "file not found",
"A prompt template, script or sub-workflow file does not exist. Paths are relative to the
directory of the workflow file that names them.";

    TemplateSyntax = 14, "template syntax error",
"Every string field is a minijinja template, and `when:`/`for_each:` are expressions.
This one does not parse. Check the `{{ … }}` and `{% … %}` delimiters and filter names.";

    UndefinedVariable = 15, "undefined template variable",
"A template uses a variable that does not exist. Templates see `inputs.<name>` (declared
inputs), `tasks.<id>.output|status|error|attempts` (tasks this one needs, directly or not),
`item` (inside `for_each` tasks), `run.id|dir|workspace|workflow|name`, and `env.<NAME>`
(only names listed under `secrets:` or `env:`). Undefined variables are errors, never
empty strings.";

    Cron = 16, "invalid cron expression",
"`schedule.cron` takes a five-field cron expression (minute hour day-of-month month
day-of-week), e.g. `*/15 * * * *`, or a six-field one with seconds first.";

    InvalidValue = 17, "invalid value",
"A value has the right type but is not allowed here: a non-positive `max_parallel` or
`attempts`, a value outside an input's `enum`, an unknown `overlap` policy, an invalid
name.";

    Input = 18, "invalid workflow input",
"An input given with `-i name=value` is unknown, does not convert to the declared type,
or is not in the declared `enum`; or a required input (one without a default) is missing.";

    NoSandbox = 19, "no sandbox for `run`",
"`run:` tasks execute commands. helix never silently runs them on your machine: set
`sandbox: host` (on the task or the workflow) to run them as host processes explicitly,
or declare a sandbox profile (`sandbox: { image: helix-sandbox-python }`) to run them in
a Docker container with no network and tight limits. The same holds for agents given the
`sandbox.exec` or `sandbox.test` tool.";

    Unreadable = 20, "file cannot be read",
"The file does not exist, cannot be read, is not UTF-8 text, or is larger than the 16 MiB
limit for workflow files.";

    ScriptSyntax = 21, "script syntax error",
"A Lua or Rhai script does not compile. The position points into the script file, or into
the workflow for inline scripts.";

    NotANeed = 22, "template reads a task that is not a dependency",
"A template reads `tasks.<id>` of a task that this task does not depend on, directly or
through other tasks. Its output might not exist yet when this task runs. Add the task to
`needs:`.";

    RunNotFound = 30, "run not found",
"No run with this id exists in the journal (`.helix/helix.db`, or `$HELIX_HOME`).
`helix runs list` shows the runs.";

    WorkflowChanged = 31, "workflow changed since the run started",
"`helix resume` continues a run with the workflow it started with. The workflow file has
changed since; resuming could mix outputs of two different workflows. Pass `--force` to
resume with the new file anyway (tasks keep their ids; succeeded tasks are not re-run),
or start a new run with `helix apply`.";

    RunBusy = 32, "run is still active",
"Another helix process (its pid is shown) is still executing this run. Wait for it, or stop
it, before resuming.";

    Journal = 33, "journal error",
"The journal database could not be opened or written: it may be corrupt, not a helix
database, on a read-only or full disk, or locked by another program.";
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HX{:04}", self.number())
    }
}

impl Code {
    /// Parses `HX0001`, `hx1` or `1`.
    pub fn parse(text: &str) -> Option<Code> {
        let t = text.trim();
        let digits = t
            .strip_prefix("HX")
            .or_else(|| t.strip_prefix("hx"))
            .unwrap_or(t);
        let n: u16 = digits.parse().ok()?;
        Code::ALL.iter().copied().find(|c| c.number() == n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_parse_back() {
        for c in Code::ALL {
            assert_eq!(Code::parse(&c.to_string()), Some(*c));
            assert_eq!(
                Code::ALL
                    .iter()
                    .filter(|o| o.number() == c.number())
                    .count(),
                1
            );
        }
        assert_eq!(Code::parse("hx2"), Some(Code::UnknownKey));
        assert_eq!(Code::parse("HX9999"), None);
    }
}
