//! Lua 5.4 scripts: a fresh VM per run with only the safe libraries, a memory cap, and an
//! instruction hook that also watches the deadline and the cancel flag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use mlua::{ChunkMode, Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};
use serde_json::{Map, Value as Json};

use super::{Limits, ScriptError, ScriptErrorKind, ScriptSource, MAX_RESULT_DEPTH};

/// Instructions between two hook calls: few enough to stop a runaway loop promptly, many
/// enough that the hook costs little.
const HOOK_INTERVAL: u32 = 1000;

/// The libraries a script gets besides the base library; io, package and debug are left out.
/// `os` is loaded only to keep its clock functions (see `SANDBOX`).
pub(super) fn libraries() -> StdLib {
    StdLib::COROUTINE | StdLib::TABLE | StdLib::STRING | StdLib::UTF8 | StdLib::MATH | StdLib::OS
}

/// Lua's LUA_IDSIZE: chunk names longer than this minus one are cut short in messages.
const LUA_IDSIZE: usize = 60;

const SANDBOX_NAME: &str = "helix sandbox";

/// Turns the fresh VM into the sandbox. Runs before the script, with three Rust helpers as
/// arguments. Wrappers keep the names of the functions they wrap as upvalue names so that
/// Lua's "bad argument #1 to 'pcall'" messages stay as users know them.
const SANDBOX: &str = r#"
local check_budget, hand_hook_to, charge_span = ...
local error, rawget, type, tointeger = error, rawget, type, math.tointeger

-- No files, processes, native code or stdout: scripts talk to the world through helix.
dofile, loadfile, print, warn = nil, nil, nil, nil
os = { time = os.time, clock = os.clock, date = os.date }
-- Binary chunks can crash the VM; there is no use in making them either.
string.dump = nil

-- Functions that catch errors would let a script swallow a limit error and carry on, so each
-- re-raises it once the budget is spent.
local function raise_if_spent(...)
  check_budget()
  return ...
end

do
  local pcall, xpcall, load = pcall, xpcall, load
  _G.pcall = function(...) return raise_if_spent(pcall(...)) end
  _G.xpcall = function(...) return raise_if_spent(xpcall(...)) end
  _G.load = function(chunk, chunkname, _mode, ...)
    return raise_if_spent(load(chunk, chunkname, "t", ...))
  end
end

do
  local collectgarbage = collectgarbage
  _G.collectgarbage = function(option)
    if option == "count" then return collectgarbage("count") end
    error("collectgarbage: only \"count\" is available to scripts", 2)
  end
end

-- Finalizers run with hooks switched off, so a looping __gc could never be stopped.
do
  local setmetatable = setmetatable
  _G.setmetatable = function(t, mt)
    if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
      error("setmetatable: __gc metamethods are not available to scripts", 2)
    end
    return setmetatable(t, mt)
  end
end

-- Loops that run inside C, where the instruction hook never fires.
do
  local rep, move = string.rep, table.move
  string.rep = function(s, n, sep)
    -- rep("", n) copies nothing n times.
    if s == "" and (sep == nil or sep == "") then return "" end
    return rep(s, n, sep)
  end
  table.move = function(a1, f, e, t, a2)
    charge_span(tointeger(f), tointeger(e))
    return move(a1, f, e, t, a2)
  end
end

-- The instruction hook is attached to one Lua thread at a time, so it is handed to each
-- coroutine on entry and taken back on exit.
do
  local create, resume, close = coroutine.create, coroutine.resume, coroutine.close
  local function take_hook_back(...)
    hand_hook_to(nil)
    return raise_if_spent(...)
  end
  local function resume_hooked(co, ...)
    hand_hook_to(co)
    return take_hook_back(resume(co, ...))
  end
  local function close_hooked(co)
    hand_hook_to(co)
    return take_hook_back(close(co))
  end
  local function wrapped_result(co, ok, ...)
    if ok then return ... end
    close_hooked(co)
    error((...), 0)
  end
  coroutine.resume = resume_hooked
  coroutine.close = close_hooked
  coroutine.wrap = function(f)
    local co = create(f)
    return function(...) return wrapped_result(co, resume_hooked(co, ...)) end
  end
end
"#;

pub(super) fn check_syntax(src: &ScriptSource) -> Result<(), ScriptError> {
    let fail = |e| lua_error(src, &Limits::default(), e);
    let lua = Lua::new_with(StdLib::NONE, LuaOptions::new()).map_err(fail)?;
    load(&lua, src).map(drop).map_err(fail)
}

pub(super) fn run(
    src: &ScriptSource,
    globals: &Map<String, Json>,
    limits: &Limits,
) -> Result<Json, ScriptError> {
    let budget = Arc::new(Budget {
        limits: limits.clone(),
        chunk_name: chunk_name(src),
        used: AtomicU64::new(0),
        spent: OnceLock::new(),
    });
    let result = execute(src, globals, &budget);
    // A spent budget outranks whatever error it caused on its way out of the script.
    match budget.spent.get() {
        Some(spent) => Err(ScriptError::new(
            src,
            spent.line,
            spent.kind,
            limits.exceeded(spent.kind),
        )),
        None => result,
    }
}

fn execute(
    src: &ScriptSource,
    globals: &Map<String, Json>,
    budget: &Arc<Budget>,
) -> Result<Json, ScriptError> {
    let fail = |e| lua_error(src, &budget.limits, e);
    let lua = Lua::new_with(libraries(), LuaOptions::new()).map_err(fail)?;
    lua.set_memory_limit(budget.limits.memory_bytes)
        .map_err(fail)?;
    install_sandbox(&lua, budget).map_err(fail)?;

    // JSON arrays are marked so that an empty one goes back out as `[]`, not `{}`.
    let array_marker = lua.create_table().map_err(fail)?;
    let lua_globals = lua.globals();
    for (name, value) in globals {
        let value = json_to_lua(&lua, value, &array_marker).map_err(fail)?;
        lua_globals.raw_set(name.as_str(), value).map_err(fail)?;
    }

    let chunk = load(&lua, src).map_err(fail)?;
    lua.set_hook(hook_triggers(), budget.hook());
    let returned: Value = chunk.call(()).map_err(fail)?;
    lua.remove_hook();
    lua_to_json(&returned, &array_marker, 0)
        .map_err(|message| ScriptError::new(src, None, ScriptErrorKind::Value, message))
}

pub(super) fn load(lua: &Lua, src: &ScriptSource) -> mlua::Result<Function> {
    lua.load(src.code_at_first_line())
        .set_name(chunk_name(src))
        .set_mode(ChunkMode::Text)
        .into_function()
}

/// A leading `=` makes Lua print the name as is, instead of `[string "..."]`.
pub(super) fn chunk_name(src: &ScriptSource) -> String {
    format!("={}", src.name)
}

pub(super) fn install_sandbox(lua: &Lua, budget: &Arc<Budget>) -> mlua::Result<()> {
    let check_budget = {
        let budget = Arc::clone(budget);
        lua.create_function(move |_, ()| budget.check())?
    };
    let hand_hook_to = {
        let budget = Arc::clone(budget);
        lua.create_function(move |lua, target: Value| {
            // Without this charge, ping-pong between coroutines would never reach a hook
            // call: each hand-over restarts the hook's count.
            budget.charge(HOOK_INTERVAL.into(), || budget.line_on_stack(lua))?;
            let thread = match target {
                Value::Thread(thread) => thread,
                // Not a coroutine: resume will say so; the hook stays where it is.
                _ => lua.current_thread(),
            };
            thread.set_hook(hook_triggers(), budget.hook());
            Ok(())
        })?
    };
    let charge_span = {
        let budget = Arc::clone(budget);
        lua.create_function(move |lua, (first, last): (Option<i64>, Option<i64>)| {
            match (first, last) {
                (Some(first), Some(last)) if last >= first => {
                    let span = last.abs_diff(first).saturating_add(1);
                    budget.charge(span, || budget.line_on_stack(lua))
                }
                _ => Ok(()),
            }
        })?
    };
    lua.load(SANDBOX)
        .set_name(format!("={SANDBOX_NAME}"))
        .set_mode(ChunkMode::Text)
        .call((check_budget, hand_hook_to, charge_span))
}

pub(super) fn hook_triggers() -> HookTriggers {
    HookTriggers::new().every_nth_instruction(HOOK_INTERVAL)
}

/// The instruction budget and the reason it ran out, shared by the hook and the sandbox's
/// helpers.
pub(super) struct Budget {
    pub(super) limits: Limits,
    pub(super) chunk_name: String,
    pub(super) used: AtomicU64,
    pub(super) spent: OnceLock<Spent>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Spent {
    pub(super) kind: ScriptErrorKind,
    pub(super) line: Option<u32>,
}

impl Budget {
    pub(super) fn hook(
        self: &Arc<Self>,
    ) -> impl Fn(&Lua, mlua::Debug) -> mlua::Result<VmState> + Send {
        let budget = Arc::clone(self);
        move |lua, debug| {
            budget.charge(HOOK_INTERVAL.into(), || {
                budget.line_of(&debug).or_else(|| budget.line_on_stack(lua))
            })?;
            Ok(VmState::Continue)
        }
    }

    /// Counts `instructions` against the budget, then fails if any limit has been reached.
    fn charge(&self, instructions: u64, line: impl FnOnce() -> Option<u32>) -> mlua::Result<()> {
        if self.spent.get().is_none() {
            let used = self
                .used
                .fetch_add(instructions, Ordering::Relaxed)
                .saturating_add(instructions);
            let exceeded = (used > self.limits.max_instructions)
                .then_some(ScriptErrorKind::InstructionLimit)
                .or_else(|| self.limits.interruption());
            if let Some(kind) = exceeded {
                let _ = self.spent.set(Spent { kind, line: line() });
            }
        }
        self.check()
    }

    /// Once spent, the budget stays spent: every later check fails too.
    fn check(&self) -> mlua::Result<()> {
        match self.spent.get() {
            Some(spent) => Err(mlua::Error::runtime(self.limits.exceeded(spent.kind))),
            None => Ok(()),
        }
    }

    /// The line being run, if it is in the script itself (not in a chunk it loaded).
    fn line_of(&self, debug: &mlua::Debug) -> Option<u32> {
        let in_script = debug.source().source.as_deref() == Some(self.chunk_name.as_str());
        in_script
            .then(|| u32::try_from(debug.curr_line()).ok())
            .flatten()
    }

    /// The innermost line of the script on the call stack.
    pub(super) fn line_on_stack(&self, lua: &Lua) -> Option<u32> {
        (0..)
            .map_while(|level| lua.inspect_stack(level))
            .find_map(|debug| self.line_of(&debug))
    }
}

/// Reads Lua's "name:line: message", dropping the traceback mlua appends.
pub(super) fn lua_error(src: &ScriptSource, limits: &Limits, error: mlua::Error) -> ScriptError {
    let (kind, message) = match error {
        mlua::Error::SyntaxError { message, .. } => (ScriptErrorKind::Syntax, message),
        mlua::Error::RuntimeError(message) => (ScriptErrorKind::Runtime, message),
        // Lua only says "not enough memory": say which limit it was.
        mlua::Error::MemoryError(_) => (
            ScriptErrorKind::MemoryLimit,
            limits.exceeded(ScriptErrorKind::MemoryLimit),
        ),
        mlua::Error::CallbackError { cause, .. } => {
            return lua_error(src, limits, (*cause).clone())
        }
        other => (ScriptErrorKind::Runtime, other.to_string()),
    };
    let (message, traceback) = message
        .split_once("\nstack traceback:")
        .unwrap_or((&message, ""));
    // A bad argument to a wrapped function is reported at the wrapper, which is of no use to
    // the user; the traceback still leads to the script's line.
    let message = located_in(SANDBOX_NAME, message).map_or(message, |(_, text)| text);
    let (line, message) = match located_in(&src.name, message) {
        Some((line, text)) => (Some(line), text),
        None => {
            let mut frames = traceback.lines().map(str::trim_start);
            let line = frames.find_map(|frame| located_in(&src.name, frame));
            (line.map(|(line, _)| line), message)
        }
    };
    ScriptError::new(src, line, kind, message)
}

/// Splits "name:12: text" into 12 and "text" when it starts with the name as Lua prints it.
fn located_in<'m>(name: &str, message: &'m str) -> Option<(u32, &'m str)> {
    let printed_name = if name.len() < LUA_IDSIZE {
        name
    } else {
        name.get(..LUA_IDSIZE - 1)?
    };
    let (line, text) = message
        .strip_prefix(printed_name)?
        .strip_prefix(':')?
        .split_once(": ")?;
    Some((line.parse().ok()?, text))
}

pub(super) fn json_to_lua(lua: &Lua, json: &Json, array_marker: &Table) -> mlua::Result<Value> {
    Ok(match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => n.as_f64().map_or(Value::Nil, Value::Number),
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for (index, item) in items.iter().enumerate() {
                table.raw_set(index + 1, json_to_lua(lua, item, array_marker)?)?;
            }
            table.set_metatable(Some(array_marker.clone()));
            Value::Table(table)
        }
        Json::Object(fields) => {
            let table = lua.create_table_with_capacity(0, fields.len())?;
            for (key, value) in fields {
                table.raw_set(key.as_str(), json_to_lua(lua, value, array_marker)?)?;
            }
            Value::Table(table)
        }
    })
}

pub(super) fn lua_to_json(
    value: &Value,
    array_marker: &Table,
    depth: usize,
) -> Result<Json, String> {
    match value {
        Value::Nil => Ok(Json::Null),
        Value::Boolean(b) => Ok(Json::Bool(*b)),
        Value::Integer(i) => Ok(Json::from(*i)),
        Value::Number(n) => serde_json::Number::from_f64(*n)
            .map(Json::Number)
            .ok_or_else(|| format!("the number {n} has no JSON form")),
        Value::String(s) => s
            .to_str()
            .map(|s| Json::String(s.to_string()))
            .map_err(|_| "a returned string is not valid UTF-8".to_string()),
        Value::Table(table) => table_to_json(table, array_marker, depth),
        other => Err(format!(
            "a {} cannot be converted to JSON",
            other.type_name()
        )),
    }
}

/// Tables with keys 1..n become arrays, as do empty tables that came in as JSON arrays;
/// other tables become objects with sorted keys, so the same table always gives the same JSON.
fn table_to_json(table: &Table, array_marker: &Table, depth: usize) -> Result<Json, String> {
    if depth >= MAX_RESULT_DEPTH {
        return Err(format!(
            "tables are nested more than {MAX_RESULT_DEPTH} levels deep (does a table contain itself?)"
        ));
    }
    let mut entries = Vec::new();
    table
        .for_each(|key: Value, value: Value| {
            entries.push((key, value));
            Ok(())
        })
        .map_err(|e| e.to_string())?;

    let came_as_array = table.metatable().is_some_and(|mt| mt == *array_marker);
    if let Some(items) = sequence(&entries).filter(|items| !items.is_empty() || came_as_array) {
        return items
            .into_iter()
            .map(|item| lua_to_json(item, array_marker, depth + 1))
            .collect::<Result<_, _>>()
            .map(Json::Array);
    }

    let mut fields = entries
        .iter()
        .map(|(key, value)| Ok((object_key(key)?, value)))
        .collect::<Result<Vec<_>, String>>()?;
    fields.sort_by(|(a, _), (b, _)| a.cmp(b));
    if let Some(pair) = fields.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(format!(
            "the key \"{}\" appears both as a number and as a string",
            pair[0].0
        ));
    }
    fields
        .into_iter()
        .map(|(key, value)| Ok((key, lua_to_json(value, array_marker, depth + 1)?)))
        .collect::<Result<Map<_, _>, String>>()
        .map(Json::Object)
}

/// The values in key order if the keys are exactly 1..n.
pub(super) fn sequence(entries: &[(Value, Value)]) -> Option<Vec<&Value>> {
    let mut items = vec![None; entries.len()];
    for (key, value) in entries {
        let index = key
            .as_integer()
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| (1..=items.len()).contains(i))?;
        items[index - 1] = Some(value);
    }
    items.into_iter().collect()
}

fn object_key(key: &Value) -> Result<String, String> {
    match key {
        Value::String(s) => s
            .to_str()
            .map(|s| s.to_string())
            .map_err(|_| "a table key is not valid UTF-8".to_string()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "a table key of type {} cannot be a JSON object key",
            other.type_name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::super::testing::{failure, run_with, source, unbounded_instructions};
    use super::super::{check_syntax, run, Lang};
    use super::*;

    fn lua(code: &str) -> Result<Json, ScriptError> {
        run_with(Lang::Lua, code, Json::Null, &Limits::default())
    }

    fn lua_failure(code: &str, kind: ScriptErrorKind) -> ScriptError {
        failure(Lang::Lua, code, &Limits::default(), kind)
    }

    #[test]
    fn json_globals_come_back_unchanged() {
        let value = json!({
            "int": 42, "float": 1.5, "negative": -7, "text": "héllo", "yes": true,
            "list": [1, "two", [3.5, false]], "empty_list": [], "empty_map": {},
            "nested": { "a": { "b": ["c"] } },
        });
        let returned = run_with(
            Lang::Lua,
            "return v",
            json!({ "v": value }),
            &Limits::default(),
        );
        assert_eq!(returned.ok(), Some(value));
    }

    #[test]
    fn lua_values_become_json() {
        assert_eq!(lua("return nil").ok(), Some(Json::Null));
        assert_eq!(lua("return {}").ok(), Some(json!({})));
        assert_eq!(lua("return {1, 2, 3}").ok(), Some(json!([1, 2, 3])));
        assert_eq!(lua("return 7 // 2, 'ignored'").ok(), Some(json!(3)));
        assert_eq!(
            lua("return { [1] = 'a', [3] = 'c', name = 'x' }").ok(),
            Some(json!({ "1": "a", "3": "c", "name": "x" }))
        );
        let received_array_grows = run_with(
            Lang::Lua,
            "table.insert(items, 'b'); return items",
            json!({ "items": [] }),
            &Limits::default(),
        );
        assert_eq!(received_array_grows.ok(), Some(json!(["b"])));
    }

    #[test]
    fn unrepresentable_results_are_value_errors() {
        lua_failure("return function() end", ScriptErrorKind::Value);
        lua_failure(
            "return coroutine.create(function() end)",
            ScriptErrorKind::Value,
        );
        lua_failure("return 0/0", ScriptErrorKind::Value);
        lua_failure("return { [true] = 1 }", ScriptErrorKind::Value);
        let cycle = lua_failure("local t = {}; t.me = t; return t", ScriptErrorKind::Value);
        assert!(cycle.message.contains("nested more than"), "{cycle}");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let src = source(
            Lang::Lua,
            "scripts/x.lua",
            1,
            "local x = 1\nlocal y = = 2\n",
        );
        let error = check_syntax(&src).err();
        let error = error.map(|e| (e.kind, e.to_string()));
        assert_eq!(
            error,
            Some((
                ScriptErrorKind::Syntax,
                "scripts/x.lua:2: unexpected symbol near '='".into()
            ))
        );
    }

    #[test]
    fn inline_code_errors_point_into_the_workflow_file() {
        let src = source(
            Lang::Lua,
            "workflows/build.yaml",
            12,
            "local x = 1\nreturn x +\n",
        );
        let error = check_syntax(&src).err();
        assert_eq!(
            error.map(|e| (e.kind, e.line)),
            Some((ScriptErrorKind::Syntax, Some(14)))
        );

        let src = source(Lang::Lua, "workflows/build.yaml", 12, "local t\nreturn t.x");
        let error = run(&src, &Map::new(), &Limits::default()).err();
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("workflows/build.yaml:13: attempt to index a nil value (local 't')")
        );
    }

    #[test]
    fn runtime_error_names_the_line() {
        let error = lua_failure("local a = 1\n\nerror('boom')", ScriptErrorKind::Runtime);
        assert_eq!((error.line, error.message.as_str()), (Some(3), "boom"));
    }

    #[test]
    fn long_script_names_still_give_lines() {
        let name = format!("scripts/{}.lua", "deeply_nested_directory/".repeat(4));
        let src = source(Lang::Lua, &name, 1, "\nerror('boom')");
        let error = run(&src, &Map::new(), &Limits::default()).err();
        assert_eq!(
            error.map(|e| (e.name == name, e.line)),
            Some((true, Some(2)))
        );
    }

    #[test]
    fn endless_loop_stops_at_the_instruction_limit() {
        let limits = Limits {
            max_instructions: 1_000_000,
            ..Limits::default()
        };
        let error = failure(
            Lang::Lua,
            "local n = 0\nwhile true do n = n + 1 end",
            &limits,
            ScriptErrorKind::InstructionLimit,
        );
        assert_eq!(
            error.to_string(),
            "test:2: instruction limit of 1000000 exceeded"
        );
    }

    #[test]
    fn endless_loop_stops_at_the_deadline() {
        let limits = Limits {
            deadline: Some(Instant::now() + Duration::from_millis(200)),
            ..unbounded_instructions()
        };
        failure(
            Lang::Lua,
            "while true do end",
            &limits,
            ScriptErrorKind::Timeout,
        );
    }

    #[test]
    fn endless_loop_stops_when_cancelled() {
        let limits = unbounded_instructions();
        let cancel = Arc::clone(&limits.cancel);
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.store(true, Ordering::Relaxed);
        });
        failure(
            Lang::Lua,
            "while true do end",
            &limits,
            ScriptErrorKind::Cancelled,
        );
        let _ = canceller.join();
    }

    #[test]
    fn limit_errors_cannot_be_caught() {
        let limits = Limits {
            max_instructions: 1_000_000,
            ..Limits::default()
        };
        for code in [
            "while true do pcall(function() while true do end end) end",
            "while true do xpcall(function() while true do end end, function() end) end",
            "while true do load(function() while true do end end) end",
            "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
        ] {
            failure(Lang::Lua, code, &limits, ScriptErrorKind::InstructionLimit);
        }
    }

    #[test]
    fn coroutines_run_within_the_budget() {
        let limits = Limits {
            max_instructions: 1_000_000,
            ..Limits::default()
        };
        for code in [
            "coroutine.wrap(function() while true do end end)()",
            "local co = coroutine.wrap(function() while true do coroutine.yield() end end)
             while true do co() end",
        ] {
            failure(Lang::Lua, code, &limits, ScriptErrorKind::InstructionLimit);
        }
        let generator =
            "local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
                         return { gen(), gen(), gen() }";
        assert_eq!(lua(generator).ok(), Some(json!([1, 2, 3])));
    }

    #[test]
    fn loops_inside_c_are_bounded() {
        assert_eq!(
            lua("return #string.rep('', math.maxinteger)").ok(),
            Some(json!(0))
        );
        lua_failure(
            "table.move({}, 1, math.maxinteger, 2)",
            ScriptErrorKind::InstructionLimit,
        );
        let finalizer = lua_failure(
            "setmetatable({}, { __gc = function() while true do end end })",
            ScriptErrorKind::Runtime,
        );
        assert!(finalizer.message.contains("__gc"), "{finalizer}");
    }

    #[test]
    fn memory_bombs_stop_at_the_memory_limit() {
        for code in [
            "local s = string.rep('x', 1e9)",
            "local s = 'x'\nwhile true do s = s .. s end",
            "local t, i = {}, 0\nwhile true do i = i + 1; t[i] = i end",
        ] {
            let error = lua_failure(code, ScriptErrorKind::MemoryLimit);
            assert_eq!(error.message, "memory limit of 64 MiB exceeded");
        }
    }

    #[test]
    fn deep_recursion_is_a_clean_error() {
        let error = lua_failure(
            "local function f(n) return 1 + f(n + 1) end\nreturn f(1)",
            ScriptErrorKind::Runtime,
        );
        assert!(error.message.contains("stack overflow"), "{error}");
        // Recursion through metamethods nests C calls, which Lua counts separately.
        let error = lua_failure(
            "local t = setmetatable({}, { __index = function(t, k) return t[k] end })\nreturn t.x",
            ScriptErrorKind::Runtime,
        );
        assert!(error.message.contains("stack overflow"), "{error}");
    }

    #[test]
    fn the_host_is_out_of_reach() {
        for (code, expected) in [
            (
                "os.execute('true')",
                "attempt to call a nil value (field 'execute')",
            ),
            ("os.exit(1)", "attempt to call a nil value (field 'exit')"),
            (
                "io.open('/etc/passwd')",
                "attempt to index a nil value (global 'io')",
            ),
            (
                "require 'ffi'",
                "attempt to call a nil value (global 'require')",
            ),
            (
                "package.loadlib('libc.so.6', 'system')",
                "attempt to index a nil value (global 'package')",
            ),
            (
                "debug.getinfo(1)",
                "attempt to index a nil value (global 'debug')",
            ),
            (
                "dofile('/etc/passwd')",
                "attempt to call a nil value (global 'dofile')",
            ),
            (
                "string.dump(print)",
                "attempt to call a nil value (field 'dump')",
            ),
            (
                "collectgarbage('stop')",
                "collectgarbage: only \"count\" is available to scripts",
            ),
        ] {
            let error = lua_failure(code, ScriptErrorKind::Runtime);
            assert_eq!(error.message, expected, "{code}");
        }
        let binary = lua("local f, err = load('\\27LuaT\\0\\25\\147') return err");
        assert_eq!(
            binary.ok(),
            Some(json!("attempt to load a binary chunk (mode is 't')"))
        );
        let misuse = lua_failure(
            "local n = 1\nlocal s = string.rep()",
            ScriptErrorKind::Runtime,
        );
        assert_eq!(
            misuse.to_string(),
            "test:2: bad argument #1 to 'rep' (string expected, got nil)"
        );
        assert_eq!(
            lua("return type(os.time()) == 'number' and os.getenv == nil").ok(),
            Some(json!(true))
        );
    }
}
