//! Scripting: runs `script:` tasks written in Lua 5.4 or Rhai inside a sandbox with an
//! instruction budget, a memory cap, a deadline and a cancel flag, and returns their result
//! as JSON.
//!
//! Each language lives in its own file with one way in (`check_syntax` and `run`); this file
//! owns what both share: the source, the limits, the error and the thread a script runs on.

mod lua;
pub mod lua_api;
// Referred to as `self::rhai`, since the crate it wraps has the same name.
mod rhai;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value as Json};

/// A returned value nested deeper than this is refused rather than followed: a table that
/// contains itself would otherwise be followed forever.
const MAX_RESULT_DEPTH: usize = 128;

/// Scripts run on a thread of their own so that the engines' own recursion limits, not the
/// caller's (often 2 MiB) stack, decide where deep recursion stops. The stack is only
/// reserved; pages are committed as they are touched.
pub const SCRIPT_STACK_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Lua,
    Rhai,
}

impl Lang {
    /// The language of a script file, told by its extension (`.lua`, `.rhai`).
    pub fn from_path(path: &Path) -> Option<Lang> {
        match path.extension()?.to_str()? {
            "lua" => Some(Lang::Lua),
            "rhai" => Some(Lang::Rhai),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScriptSource {
    pub lang: Lang,
    pub code: String,
    /// Shown in errors: a file path like `scripts/x.lua`, or the workflow file for inline code.
    pub name: String,
    /// 1 for files; for inline code, the line of the workflow file where the code starts, so
    /// that error lines point into that file.
    pub first_line: u32,
}

/// How long a script file read from disk is used without looking at the file again.
const SCRIPT_RECHECK: Duration = Duration::from_secs(1);

/// A script file as last read. Tools are read on every call, and a call costs a few
/// microseconds: the file is looked at again (size and modification time) at most once a
/// second, and read again only when it changed, so an edit is picked up within a second.
pub fn read_script(path: &Path) -> Result<Arc<ScriptSource>, String> {
    struct Cached {
        checked: Instant,
        stamp: (SystemTime, u64),
        source: Arc<ScriptSource>,
    }
    type Cache = Mutex<HashMap<std::path::PathBuf, Cached>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    let now = Instant::now();
    if let Some(cached) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(path)
        .filter(|cached| now.duration_since(cached.checked) < SCRIPT_RECHECK)
    {
        return Ok(Arc::clone(&cached.source));
    }
    let cannot_read = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(cannot_read)?;
    let stamp = (meta.modified().map_err(cannot_read)?, meta.len());
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(cached) = cache.get_mut(path).filter(|cached| cached.stamp == stamp) {
        cached.checked = now;
        return Ok(Arc::clone(&cached.source));
    }
    let source = Arc::new(ScriptSource {
        lang: Lang::from_path(path).unwrap_or(Lang::Rhai),
        code: std::fs::read_to_string(path).map_err(cannot_read)?,
        name: path.display().to_string(),
        first_line: 1,
    });
    cache.insert(
        path.to_path_buf(),
        Cached {
            checked: now,
            stamp,
            source: Arc::clone(&source),
        },
    );
    Ok(source)
}

impl ScriptSource {
    /// The code preceded by `first_line - 1` empty lines, so that every line an engine reports
    /// (in errors, tracebacks and nested functions alike) is already a line of the file the
    /// code was written in.
    fn code_at_first_line(&self) -> String {
        let mut code = "\n".repeat(self.first_line.saturating_sub(1) as usize);
        code.push_str(&self.code);
        code
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Lua VM instructions, or Rhai operations.
    pub max_instructions: u64,
    /// Lua heap size. Rhai has no heap accounting: a quarter of this caps its strings.
    pub memory_bytes: usize,
    pub deadline: Option<Instant>,
    /// Set from any thread to stop the script at its next check.
    pub cancel: Arc<AtomicBool>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instructions: 100_000_000,
            memory_bytes: 64 << 20,
            deadline: None,
            cancel: Arc::default(),
        }
    }
}

impl Limits {
    /// Why the script must stop now whatever its budget says, if it must.
    fn interruption(&self) -> Option<ScriptErrorKind> {
        if self.cancel.load(Ordering::Relaxed) {
            Some(ScriptErrorKind::Cancelled)
        } else if self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            Some(ScriptErrorKind::Timeout)
        } else {
            None
        }
    }

    /// What to tell the user when a limit of `kind` stopped the script.
    fn exceeded(&self, kind: ScriptErrorKind) -> String {
        match kind {
            ScriptErrorKind::InstructionLimit => {
                format!("instruction limit of {} exceeded", self.max_instructions)
            }
            ScriptErrorKind::MemoryLimit => {
                format!("memory limit of {} exceeded", ByteSize(self.memory_bytes))
            }
            ScriptErrorKind::Timeout => "deadline exceeded".into(),
            ScriptErrorKind::Cancelled => "cancelled".into(),
            // Not limits: nothing stops a script for these, so there is nothing to name.
            ScriptErrorKind::Syntax | ScriptErrorKind::Runtime | ScriptErrorKind::Value => {
                "stopped".into()
            }
        }
    }
}

/// A byte count in the largest binary unit that divides it exactly ("64 MiB", "1000 bytes").
pub struct ByteSize(pub usize);

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let units = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match units
            .iter()
            .find(|(size, _)| self.0 >= *size && self.0 % size == 0)
        {
            Some((size, unit)) => write!(f, "{} {unit}", self.0 / size),
            None => write!(f, "{} bytes", self.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptErrorKind {
    Syntax,
    Runtime,
    InstructionLimit,
    MemoryLimit,
    Timeout,
    Cancelled,
    /// The result cannot be represented as JSON.
    Value,
}

/// `scripts/x.lua:12: attempt to index a nil value`, or without the line when it is unknown.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{name}{}: {message}", .line.map(|line| format!(":{line}")).unwrap_or_default())]
pub struct ScriptError {
    pub name: String,
    pub line: Option<u32>,
    pub kind: ScriptErrorKind,
    pub message: String,
}

impl ScriptError {
    fn new(
        src: &ScriptSource,
        line: Option<u32>,
        kind: ScriptErrorKind,
        message: impl Into<String>,
    ) -> Self {
        ScriptError {
            name: src.name.clone(),
            line,
            kind,
            message: message.into(),
        }
    }
}

/// Compiles the script without running it (`helix validate`). Both parsers bound their own
/// nesting, so this runs on the caller's thread: a workflow may hold thousands of scripts.
pub fn check_syntax(src: &ScriptSource) -> Result<(), ScriptError> {
    without_panics(src, || match src.lang {
        Lang::Lua => lua::check_syntax(src),
        Lang::Rhai => self::rhai::check_syntax(src),
    })
}

/// Like [`run`], on the calling thread, which must have a stack of [`SCRIPT_STACK_BYTES`]
/// (the engine's runtime gives its threads one). Saves a thread per script.
pub fn run_on_current_thread(
    src: &ScriptSource,
    globals: &Map<String, Json>,
    limits: &Limits,
) -> Result<Json, ScriptError> {
    without_panics(src, || match src.lang {
        Lang::Lua => lua::run(src, globals, limits),
        Lang::Rhai => self::rhai::run(src, globals, limits),
    })
}

/// Host functions for Rhai: synchronous, because Rhai runs on a blocking thread.
pub type HostToolCall = Arc<dyn Fn(&str, Json) -> Result<Json, String> + Send + Sync>;
pub type HostScratchGet = Arc<dyn Fn(&str) -> Result<Option<Json>, String> + Send + Sync>;
pub type HostScratchSet = Arc<dyn Fn(&str, &Json) -> Result<(), String> + Send + Sync>;
pub type HostLog = Arc<dyn Fn(&str) + Send + Sync>;
/// Renders a template file (relative to the workflow) or template text with variables.
pub type HostRender = Arc<dyn Fn(&str, &Json) -> Result<String, String> + Send + Sync>;
/// One chat call: `{system, messages, json}` in, `{content, json, usage}` out.
pub type HostChat = Arc<dyn Fn(Json) -> Result<Json, String> + Send + Sync>;

/// What a Rhai script may call on the host (Rhai runs synchronously, on a blocking thread).
#[derive(Clone)]
pub struct Host {
    pub call_tool: HostToolCall,
    pub scratch_get: HostScratchGet,
    pub scratch_set: HostScratchSet,
    pub log: HostLog,
    pub render: HostRender,
    /// The workflow's `default` model, when it declares one.
    pub chat: Option<HostChat>,
}

/// Runs a Rhai script with the host functions `tool`, `scratch_get`, `scratch_set`, `log`;
/// other languages ignore the host. Call it from `spawn_blocking`, on a large stack.
pub fn run_rhai_with_host(
    src: &ScriptSource,
    globals: &Map<String, Json>,
    limits: &Limits,
    host: &Host,
) -> Result<Json, ScriptError> {
    without_panics(src, || match src.lang {
        Lang::Lua => lua::run(src, globals, limits),
        Lang::Rhai => self::rhai::run_with_host(src, globals, limits, Some(host)),
    })
}

/// What a caught panic said.
pub(crate) fn panic_reason(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown cause")
}

/// A panic inside an engine becomes an error instead of taking the caller down.
fn without_panics<T>(
    src: &ScriptSource,
    work: impl FnOnce() -> Result<T, ScriptError>,
) -> Result<T, ScriptError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let reason = panic_reason(panic.as_ref());
        Err(ScriptError::new(
            src,
            None,
            ScriptErrorKind::Runtime,
            format!("the script engine failed: {reason}"),
        ))
    })
}

/// Runs the script with `globals` as global variables and returns what it returns. Blocks
/// until the script ends or a limit stops it; call it from `spawn_blocking`.
pub fn run(
    src: &ScriptSource,
    globals: &Map<String, Json>,
    limits: &Limits,
) -> Result<Json, ScriptError> {
    on_script_thread(src, || match src.lang {
        Lang::Lua => lua::run(src, globals, limits),
        Lang::Rhai => self::rhai::run(src, globals, limits),
    })
}

/// Runs `work` on a fresh thread with a large stack; a panic in an engine becomes an error
/// instead of taking the caller down.
fn on_script_thread<T: Send>(
    src: &ScriptSource,
    work: impl FnOnce() -> Result<T, ScriptError> + Send,
) -> Result<T, ScriptError> {
    let runtime_error =
        |message: String| ScriptError::new(src, None, ScriptErrorKind::Runtime, message);
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("helix-script".into())
            .stack_size(SCRIPT_STACK_BYTES)
            .spawn_scoped(scope, work)
            .map_err(|e| runtime_error(format!("cannot start a thread for the script: {e}")))?;
        thread.join().unwrap_or_else(|panic| {
            let reason = panic_reason(panic.as_ref());
            Err(runtime_error(format!("the script engine failed: {reason}")))
        })
    })
}

/// Shorthands for the engines' tests.
#[cfg(test)]
mod testing {
    use super::*;

    pub fn source(lang: Lang, name: &str, first_line: u32, code: &str) -> ScriptSource {
        ScriptSource {
            lang,
            code: code.into(),
            name: name.into(),
            first_line,
        }
    }

    pub fn run_with(
        lang: Lang,
        code: &str,
        globals: Json,
        limits: &Limits,
    ) -> Result<Json, ScriptError> {
        let globals = globals.as_object().cloned().unwrap_or_default();
        run(&source(lang, "test", 1, code), &globals, limits)
    }

    /// Runs `code` with no globals under `limits`, expecting it to fail with `kind`.
    pub fn failure(lang: Lang, code: &str, limits: &Limits, kind: ScriptErrorKind) -> ScriptError {
        match run_with(lang, code, Json::Null, limits) {
            Ok(value) => panic!("expected a {kind:?} error, got {value}"),
            Err(error) => {
                assert_eq!(error.kind, kind, "{error}");
                error
            }
        }
    }

    /// Limits that let an endless loop run until the deadline or the cancel flag stops it.
    pub fn unbounded_instructions() -> Limits {
        Limits {
            max_instructions: u64::MAX,
            ..Limits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn language_is_told_by_extension() {
        assert_eq!(Lang::from_path(Path::new("scripts/x.lua")), Some(Lang::Lua));
        assert_eq!(Lang::from_path(Path::new("x.rhai")), Some(Lang::Rhai));
        assert_eq!(Lang::from_path(Path::new("x.py")), None);
        assert_eq!(Lang::from_path(Path::new("lua")), None);
    }

    #[test]
    fn error_shows_line_only_when_known() {
        let src = testing::source(Lang::Lua, "scripts/x.lua", 1, "");
        let with_line = ScriptError::new(&src, Some(12), ScriptErrorKind::Runtime, "boom");
        assert_eq!(with_line.to_string(), "scripts/x.lua:12: boom");
        let without = ScriptError::new(&src, None, ScriptErrorKind::Runtime, "boom");
        assert_eq!(without.to_string(), "scripts/x.lua: boom");
    }

    #[test]
    fn limit_messages_name_the_limit() {
        let limits = Limits::default();
        assert_eq!(
            limits.exceeded(ScriptErrorKind::InstructionLimit),
            "instruction limit of 100000000 exceeded"
        );
        assert_eq!(
            limits.exceeded(ScriptErrorKind::MemoryLimit),
            "memory limit of 64 MiB exceeded"
        );
        assert_eq!(ByteSize(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn both_languages_see_the_same_globals_and_return_the_same_json() {
        let globals = json!({ "inputs": { "files": ["a.rs", "b.rs"], "count": 2 } });
        for (lang, code) in [
            (
                Lang::Lua,
                "return { n = inputs.count * 2, first = inputs.files[1] }",
            ),
            (
                Lang::Rhai,
                "#{ n: inputs.count * 2, first: inputs.files[0] }",
            ),
        ] {
            let value = testing::run_with(lang, code, globals.clone(), &Limits::default());
            assert_eq!(
                value.ok(),
                Some(json!({ "first": "a.rs", "n": 4 })),
                "{lang:?}"
            );
        }
    }
}
