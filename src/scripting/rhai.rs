//! Rhai scripts: an engine with the standard library minus `eval`, `sleep` and printing,
//! bounded by Rhai's own limits plus a progress check for the deadline and the cancel flag.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rhai::packages::{Package, StandardPackage};
use rhai::{
    Dynamic, Engine, EvalAltResult, Module, ParseError, Position, Scope, Shared, AST, FLOAT, INT,
};
use serde_json::{Map, Value as Json};

use super::{ByteSize, Limits, ScriptError, ScriptErrorKind, ScriptSource, MAX_RESULT_DEPTH};

/// Function call depth: deep enough for real recursion, shallow enough for the script thread.
const MAX_CALL_LEVELS: usize = 64;
/// Expression nesting at top level and inside functions, which bounds the parser's recursion.
const MAX_EXPR_DEPTHS: (usize, usize) = (64, 32);
/// Items in one array, counting nested arrays too.
const MAX_ARRAY_SIZE: usize = 100_000;
/// Entries in one object map, counting nested maps too.
const MAX_MAP_SIZE: usize = 100_000;
/// Operations between two looks at the clock and the cancel flag. Small, because a single
/// operation can be slow: copying a large array is one operation.
const PROGRESS_INTERVAL: u64 = 16;

/// The standard library registers hundreds of functions; every engine shares one copy.
fn standard_library() -> Shared<Module> {
    static LIBRARY: OnceLock<Shared<Module>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| StandardPackage::new().as_shared_module())
        .clone()
}

/// An engine for one script under `limits`, with `host`'s functions when there is a host.
fn engine(limits: &Limits, host: Option<&super::Host>) -> Engine {
    let mut engine = base_engine();
    apply_limits(&mut engine, limits);
    let limits = limits.clone();
    engine.on_progress(move |operations| progress(operations, &limits));
    if let Some(host) = host.cloned() {
        register_host(&mut engine, move || Ok(host.clone()));
    }
    engine
}

/// What the thread's kept engine is running. Its progress check and host functions read it,
/// so the engine itself (its setup costs about as much as a short script) is made once per
/// thread.
struct Current {
    limits: Limits,
    host: Option<super::Host>,
}

thread_local! {
    static KEPT_ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

fn kept_engine() -> Engine {
    let mut engine = base_engine();
    engine.on_progress(|operations| {
        CURRENT.with(|current| {
            let current = current.borrow();
            progress(operations, &current.as_ref()?.limits)
        })
    });
    register_host(&mut engine, || {
        CURRENT.with(|current| {
            current
                .borrow()
                .as_ref()
                .and_then(|current| current.host.clone())
                .ok_or_else(|| "host functions are not available to this script".to_string())
        })
    });
    engine
}

/// Runs `work` on this thread's kept engine, set up for `limits` and `host`; on a fresh
/// engine instead when the kept one is busy (a host function running a script).
fn with_engine<T>(
    limits: &Limits,
    host: Option<&super::Host>,
    work: impl FnOnce(&Engine) -> T,
) -> T {
    KEPT_ENGINE.with(|kept| match kept.try_borrow_mut() {
        Ok(mut kept) => {
            let engine = kept.get_or_insert_with(kept_engine);
            apply_limits(engine, limits);
            CURRENT.with(|current| {
                *current.borrow_mut() = Some(Current {
                    limits: limits.clone(),
                    host: host.cloned(),
                })
            });
            let result = work(engine);
            CURRENT.with(|current| current.borrow_mut().take());
            result
        }
        Err(_) => work(&engine(limits, host)),
    })
}

fn progress(operations: u64, limits: &Limits) -> Option<Dynamic> {
    if operations % PROGRESS_INTERVAL != 0 {
        return None;
    }
    limits.interruption().map(Dynamic::from)
}

fn apply_limits(engine: &mut Engine, limits: &Limits) {
    // Rhai reads 0 as "no limit".
    engine
        .set_max_operations(limits.max_instructions.max(1))
        .set_max_string_size(max_string_size(limits));
}

/// The engine with everything that does not depend on a script's limits or host.
fn base_engine() -> Engine {
    let mut engine = Engine::new_raw();
    engine.register_global_module(standard_library());
    engine
        .set_max_call_levels(MAX_CALL_LEVELS)
        .set_max_expr_depths(MAX_EXPR_DEPTHS.0, MAX_EXPR_DEPTHS.1)
        .set_max_array_size(MAX_ARRAY_SIZE)
        .set_max_map_size(MAX_MAP_SIZE)
        .set_max_modules(0);
    // `eval` would run code that was never checked; print and debug would write to helix's
    // own stdout.
    for keyword in ["eval", "print", "debug"] {
        engine.disable_symbol(keyword);
    }
    // `sleep` is a plain function, which the keyword switch cannot reach; functions registered
    // on the engine are found before the standard library's.
    engine.register_fn("sleep", |_: INT| sleep_refused());
    engine.register_fn("sleep", |_: FLOAT| sleep_refused());
    engine
}

/// `sleep` would block where neither the deadline nor the cancel flag can reach.
fn sleep_refused() -> Result<(), Box<EvalAltResult>> {
    Err("sleep is not available to scripts".into())
}

/// Rhai does not count memory; a quarter of the memory limit per string keeps a script's
/// data within sight of it.
fn max_string_size(limits: &Limits) -> usize {
    (limits.memory_bytes / 4).max(1)
}

// Rhai's tokenizer is slow over padding lines, so Rhai code is compiled as written and its
// line numbers are shifted to the workflow file afterwards.
pub(super) fn check_syntax(src: &ScriptSource) -> Result<(), ScriptError> {
    engine(&Limits::default(), None)
        .compile(&src.code)
        .map(drop)
        .map_err(|e| parse_error(src, &e))
}

pub(super) fn run(
    src: &ScriptSource,
    globals: &Map<String, Json>,
    limits: &Limits,
) -> Result<Json, ScriptError> {
    run_with_host(src, globals, limits, None)
}

/// Like `run`, with the host functions `tool(name, args)`, `scratch_get(key)`,
/// `scratch_set(key, value)` and `log(text)` when a host is given.
pub(super) fn run_with_host(
    src: &ScriptSource,
    globals: &Map<String, Json>,
    limits: &Limits,
    host: Option<&super::Host>,
) -> Result<Json, ScriptError> {
    let ast = compiled(src)?;
    let mut scope = Scope::new();
    for (name, value) in globals {
        scope.push_dynamic(name.as_str(), json_to_rhai(value));
    }
    let returned = with_engine(limits, host, |engine| {
        engine.eval_ast_with_scope::<Dynamic>(&mut scope, &ast)
    })
    .map_err(|e| eval_error(src, limits, *e))?;
    rhai_to_json(&returned, 0)
        .map_err(|message| ScriptError::new(src, None, ScriptErrorKind::Value, message))
}

/// Compiled scripts by their text: a tool called again, or a script task run for each item,
/// skips the compiler. Engines are all configured alike, so one engine's AST runs on another,
/// and an AST holds no file name or line offset: those come from `src` when errors are made.
fn compiled(src: &ScriptSource) -> Result<Arc<AST>, ScriptError> {
    type Cache = Mutex<HashMap<String, Arc<AST>>>;
    /// Past this many scripts the cache starts over, so it cannot grow without bound.
    const MAX_SCRIPTS: usize = 256;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(ast) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&src.code)
    {
        return Ok(Arc::clone(ast));
    }
    let ast = Arc::new(
        engine(&Limits::default(), None)
            .compile(&src.code)
            .map_err(|e| parse_error(src, &e))?,
    );
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if cache.len() >= MAX_SCRIPTS {
        cache.clear();
    }
    cache.insert(src.code.clone(), Arc::clone(&ast));
    Ok(ast)
}

/// Host calls fail as Rhai runtime errors carrying the host's message. `host` gives the host
/// of the script being run.
fn register_host(
    engine: &mut Engine,
    host: impl Fn() -> Result<super::Host, String> + Clone + Send + Sync + 'static,
) {
    fn fail(message: String) -> Box<EvalAltResult> {
        message.into()
    }
    let h = host.clone();
    engine.register_fn(
        "tool",
        move |name: &str, args: rhai::Map| -> Result<Dynamic, Box<EvalAltResult>> {
            let args = rhai_to_json(&Dynamic::from_map(args), 0).map_err(fail)?;
            let result = (h().map_err(fail)?.call_tool)(name, args)
                .map_err(|e| fail(format!("{name}: {e}")))?;
            Ok(json_to_rhai(&result))
        },
    );
    let h = host.clone();
    engine.register_fn(
        "scratch_get",
        move |key: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            Ok((h().map_err(fail)?.scratch_get)(key)
                .map_err(fail)?
                .map_or(Dynamic::UNIT, |v| json_to_rhai(&v)))
        },
    );
    let h = host.clone();
    engine.register_fn(
        "scratch_set",
        move |key: &str, value: Dynamic| -> Result<(), Box<EvalAltResult>> {
            let value = rhai_to_json(&value, 0).map_err(fail)?;
            (h().map_err(fail)?.scratch_set)(key, &value).map_err(fail)
        },
    );
    let h = host.clone();
    engine.register_fn("log", move |text: &str| -> Result<(), Box<EvalAltResult>> {
        (h().map_err(fail)?.log)(text);
        Ok(())
    });
    let h = host.clone();
    engine.register_fn(
        "render",
        move |template: &str, vars: rhai::Map| -> Result<String, Box<EvalAltResult>> {
            let vars = rhai_to_json(&Dynamic::from_map(vars), 0).map_err(fail)?;
            (h().map_err(fail)?.render)(template, &vars).map_err(fail)
        },
    );
    engine.register_fn(
        "llm_chat",
        move |request: rhai::Map| -> Result<Dynamic, Box<EvalAltResult>> {
            let Some(chat) = host().map_err(fail)?.chat else {
                return Err(fail(
                    "llm_chat needs a `default` model under `models:`".into(),
                ));
            };
            let request = rhai_to_json(&Dynamic::from_map(request), 0).map_err(fail)?;
            Ok(json_to_rhai(&chat(request).map_err(fail)?))
        },
    );
}

fn line_of(src: &ScriptSource, position: Position) -> Option<u32> {
    let line = u32::try_from(position.line()?).ok()?;
    Some(line + src.first_line.saturating_sub(1))
}

fn parse_error(src: &ScriptSource, error: &ParseError) -> ScriptError {
    ScriptError::new(
        src,
        line_of(src, error.position()),
        ScriptErrorKind::Syntax,
        error.err_type().to_string(),
    )
}

fn eval_error(src: &ScriptSource, limits: &Limits, error: EvalAltResult) -> ScriptError {
    // An error inside a function arrives wrapped once per call; the innermost one says what
    // happened and where.
    let mut error = error;
    while let EvalAltResult::ErrorInFunctionCall(.., inner, _)
    | EvalAltResult::ErrorInModule(_, inner, _) = error
    {
        error = *inner;
    }
    let line = line_of(src, error.position());
    let (kind, message) = match error {
        EvalAltResult::ErrorParsing(error, _) => (ScriptErrorKind::Syntax, error.to_string()),
        EvalAltResult::ErrorTooManyOperations(_) => {
            let kind = ScriptErrorKind::InstructionLimit;
            (kind, limits.exceeded(kind))
        }
        EvalAltResult::ErrorTerminated(reason, _) => {
            let kind = reason
                .try_cast::<ScriptErrorKind>()
                .unwrap_or(ScriptErrorKind::Cancelled);
            (kind, limits.exceeded(kind))
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => (
            ScriptErrorKind::MemoryLimit,
            data_limit_message(&what, limits),
        ),
        EvalAltResult::ErrorTooManyModules(_) => (
            ScriptErrorKind::Runtime,
            "scripts cannot import modules".to_string(),
        ),
        EvalAltResult::ErrorStackOverflow(_) => (
            ScriptErrorKind::Runtime,
            format!("call depth limit of {MAX_CALL_LEVELS} exceeded (endless recursion?)"),
        ),
        EvalAltResult::ErrorRuntime(thrown, _) if !thrown.is_unit() => {
            (ScriptErrorKind::Runtime, thrown.to_string())
        }
        mut other => {
            other.clear_position();
            (ScriptErrorKind::Runtime, other.to_string())
        }
    };
    ScriptError::new(src, line, kind, message)
}

/// Rhai names the value that grew too large; say which limit it hit.
fn data_limit_message(what: &str, limits: &Limits) -> String {
    match what {
        "Length of string" => format!(
            "string size limit of {} exceeded",
            ByteSize(max_string_size(limits))
        ),
        "Size of array/BLOB" => format!("array size limit of {MAX_ARRAY_SIZE} items exceeded"),
        "Size of object map" => format!("map size limit of {MAX_MAP_SIZE} entries exceeded"),
        other => format!("{other} too large"),
    }
}

fn json_to_rhai(json: &Json) -> Dynamic {
    match json {
        Json::Null => Dynamic::UNIT,
        Json::Bool(b) => Dynamic::from_bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => n.as_f64().map_or(Dynamic::UNIT, Dynamic::from_float),
        },
        Json::String(s) => Dynamic::from(s.clone()),
        Json::Array(items) => Dynamic::from_array(items.iter().map(json_to_rhai).collect()),
        Json::Object(fields) => Dynamic::from_map(
            fields
                .iter()
                .map(|(key, value)| (key.as_str().into(), json_to_rhai(value)))
                .collect(),
        ),
    }
}

fn rhai_to_json(value: &Dynamic, depth: usize) -> Result<Json, String> {
    if depth >= MAX_RESULT_DEPTH {
        return Err(format!(
            "values are nested more than {MAX_RESULT_DEPTH} levels deep"
        ));
    }
    if value.is_unit() {
        return Ok(Json::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(Json::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(Json::from(i));
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f)
            .map(Json::Number)
            .ok_or_else(|| format!("the number {f} has no JSON form"));
    }
    if let Ok(c) = value.as_char() {
        return Ok(Json::String(c.to_string()));
    }
    if let Ok(s) = value.as_immutable_string_ref() {
        return Ok(Json::String(s.to_string()));
    }
    if let Ok(items) = value.as_array_ref() {
        return items
            .iter()
            .map(|item| rhai_to_json(item, depth + 1))
            .collect::<Result<_, _>>()
            .map(Json::Array);
    }
    if let Ok(bytes) = value.as_blob_ref() {
        return Ok(Json::Array(bytes.iter().map(|&b| Json::from(b)).collect()));
    }
    if let Ok(fields) = value.as_map_ref() {
        return fields
            .iter()
            .map(|(key, value)| Ok((key.to_string(), rhai_to_json(value, depth + 1)?)))
            .collect::<Result<Map<_, _>, String>>()
            .map(Json::Object);
    }
    Err(format!(
        "a {} cannot be converted to JSON",
        value.type_name()
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::super::testing::{failure, run_with, source, unbounded_instructions};
    use super::super::{check_syntax, run, Lang};
    use super::*;

    fn rhai(code: &str) -> Result<Json, ScriptError> {
        run_with(Lang::Rhai, code, Json::Null, &Limits::default())
    }

    fn rhai_failure(code: &str, kind: ScriptErrorKind) -> ScriptError {
        failure(Lang::Rhai, code, &Limits::default(), kind)
    }

    #[test]
    fn json_globals_come_back_unchanged() {
        let value = json!({
            "int": 42, "float": 1.5, "text": "héllo", "yes": true, "nothing": null,
            "list": [1, "two", [3.5, false, null]], "empty_list": [], "empty_map": {},
            "nested": { "a": { "b": ["c"] } },
        });
        let returned = run_with(Lang::Rhai, "v", json!({ "v": value }), &Limits::default());
        assert_eq!(returned.ok(), Some(value));
    }

    #[test]
    fn rhai_values_become_json() {
        assert_eq!(rhai("()").ok(), Some(Json::Null));
        assert_eq!(rhai("let x = 1;").ok(), Some(Json::Null));
        assert_eq!(rhai("return 'c';").ok(), Some(json!("c")));
        assert_eq!(rhai("blob(2, 7)").ok(), Some(json!([7, 7])));
        assert_eq!(
            rhai("#{ b: [1, 2.5], a: `x` }").ok(),
            Some(json!({ "a": "x", "b": [1, 2.5] }))
        );
        rhai_failure("|x| x + 1", ScriptErrorKind::Value);
        rhai_failure("0.0 / 0.0", ScriptErrorKind::Value);
    }

    #[test]
    fn a_single_expression_is_a_script() {
        let doubled = run_with(
            Lang::Rhai,
            "inputs.count * 2",
            json!({ "inputs": { "count": 21 } }),
            &Limits::default(),
        );
        assert_eq!(doubled.ok(), Some(json!(42)));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let src = source(Lang::Rhai, "scripts/x.rhai", 1, "let x = 1;\nlet y = ;\n");
        let error = check_syntax(&src).err();
        assert_eq!(
            error.map(|e| (e.kind, e.line)),
            Some((ScriptErrorKind::Syntax, Some(2)))
        );

        let src = source(
            Lang::Rhai,
            "workflows/build.yaml",
            12,
            "let x = 1;\nlet y = ;\n",
        );
        let error = check_syntax(&src).err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.starts_with("workflows/build.yaml:13: ")),
            "{error:?}"
        );
    }

    #[test]
    fn runtime_error_names_the_line() {
        let src = source(
            Lang::Rhai,
            "workflows/build.yaml",
            12,
            "let x = 1;\n\nthrow `boom ${x}`;",
        );
        let error = run(&src, &Map::new(), &Limits::default())
            .err()
            .map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("workflows/build.yaml:14: boom 1"));

        let error = rhai_failure(
            "fn f(x) {\n  x.missing()\n}\nf(1)",
            ScriptErrorKind::Runtime,
        );
        assert_eq!(error.line, Some(2), "{error}");
    }

    #[test]
    fn endless_loop_stops_at_the_instruction_limit() {
        let limits = Limits {
            max_instructions: 1_000_000,
            ..Limits::default()
        };
        let error = failure(
            Lang::Rhai,
            "let n = 0;\nloop { n += 1; }",
            &limits,
            ScriptErrorKind::InstructionLimit,
        );
        assert_eq!(error.message, "instruction limit of 1000000 exceeded");
        assert_eq!(error.line, Some(2));
    }

    #[test]
    fn endless_loop_stops_at_the_deadline() {
        let limits = Limits {
            deadline: Some(Instant::now() + Duration::from_millis(200)),
            ..unbounded_instructions()
        };
        failure(Lang::Rhai, "loop {}", &limits, ScriptErrorKind::Timeout);
    }

    #[test]
    fn endless_loop_stops_when_cancelled() {
        let limits = unbounded_instructions();
        let cancel = Arc::clone(&limits.cancel);
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.store(true, Ordering::Relaxed);
        });
        failure(Lang::Rhai, "loop {}", &limits, ScriptErrorKind::Cancelled);
        let _ = canceller.join();
    }

    #[test]
    fn growing_data_stops_at_its_size_limit() {
        let error = rhai_failure(
            r#"let s = "x"; loop { s += s; }"#,
            ScriptErrorKind::MemoryLimit,
        );
        assert_eq!(error.message, "string size limit of 16 MiB exceeded");
        let error = rhai_failure(
            "let a = []; a.pad(1_000_000, 0);",
            ScriptErrorKind::MemoryLimit,
        );
        assert_eq!(error.message, "array size limit of 100000 items exceeded");
    }

    #[test]
    fn deep_recursion_is_a_clean_error() {
        let error = rhai_failure("fn f(n) { f(n + 1) }\nf(0)", ScriptErrorKind::Runtime);
        assert_eq!(
            error.message,
            "call depth limit of 64 exceeded (endless recursion?)"
        );
        let nested = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        rhai_failure(&nested, ScriptErrorKind::Syntax);
    }

    #[test]
    fn eval_sleep_and_print_are_refused() {
        for code in ["eval(\"1 + 1\")", "print(1)", "debug(1)"] {
            let error = rhai_failure(code, ScriptErrorKind::Syntax);
            assert!(error.message.ends_with("is disabled"), "{error}");
        }
        for (code, expected) in [
            ("sleep(1)", "sleep is not available to scripts"),
            ("sleep(0.5)", "sleep is not available to scripts"),
            (
                "import \"other\" as other;",
                "scripts cannot import modules",
            ),
        ] {
            assert_eq!(
                rhai_failure(code, ScriptErrorKind::Runtime).message,
                expected
            );
        }
    }
}
