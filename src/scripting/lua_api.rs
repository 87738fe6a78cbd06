//! The Lua API of custom agents and tools: `helix.agent {…}` and `helix.tool {…}` declare
//! one, and the `ctx` its `run` receives reaches the host (`ctx.llm`, `ctx.tools`,
//! `ctx.scratch`, `ctx:render`, `ctx.log`), all inside the sandbox of `lua.rs`.
//!
//! The API's shape lives in a small Lua prelude; the work behind it lives in host functions
//! that answer either a value or a complaint, which the prelude raises at the script's line,
//! as a string a script can `pcall` and read. Calls that wait on the host (the model, tools)
//! are async functions: a script waiting on a model holds no runtime thread. An agent's run
//! gets a VM of its own; a tool's calls borrow warm VMs of that tool (`call_tool`). Futures
//! are `Send`.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use mlua::{ChunkMode, FromLuaMulti, Function, Lua, LuaOptions, Table, Value, WeakLua};
use serde_json::{json, Map, Value as Json};

use super::lua::{self, Budget, Spent};
use super::{without_panics, Lang, Limits, ScriptError, ScriptErrorKind, ScriptSource};
use crate::diagnostic::did_you_mean;
use crate::llm::{BoxFuture, ChatRequest, Message, Provider, Role, ToolCall, ToolSpec, Usage};
use crate::workflow::spec::{Ty, PARAM_KEYS};

/// Runs a tool by name with an arguments object; the message of a failure goes to the script.
pub type ToolCaller =
    Arc<dyn Fn(String, Json) -> BoxFuture<'static, Result<Json, String>> + Send + Sync>;
/// Reads a key of the task's scratchpad.
pub type ScratchGet = Arc<dyn Fn(&str) -> Result<Option<Json>, String> + Send + Sync>;
/// Stores a key of the task's scratchpad.
pub type ScratchSet = Arc<dyn Fn(&str, &Json) -> Result<(), String> + Send + Sync>;
/// Renders a template (a template file's path, or the text itself) with variables.
pub type Render = Arc<dyn Fn(&str, &Json) -> Result<String, String> + Send + Sync>;
/// Receives what the script logs.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// What a script may reach on the host; the engine builds it per task.
#[derive(Clone)]
pub struct ScriptContext {
    /// `{id, prompt, item, inputs, needs: {id: output}}`: an agent's `task`. Its `id` names
    /// the task in model requests.
    pub task: Json,
    /// The agent's model; `None` for tools, whose `ctx.llm:chat` then fails.
    pub provider: Option<Arc<dyn Provider>>,
    /// The model id requests carry unless the script names another.
    pub model: String,
    /// Who is asking, in every model request.
    pub agent: String,
    pub call_tool: ToolCaller,
    /// The tools `ctx.tools` may call, with the schemas `ctx.llm:chat { tools = … }` offers
    /// the model.
    pub tools: Arc<[ToolSpec]>,
    pub scratch_get: ScratchGet,
    pub scratch_set: ScratchSet,
    pub render: Render,
    /// Where `ctx.log` and `helix.log` go.
    pub log: Log,
    /// Every `ctx.llm:chat` adds its tokens here.
    pub usage: Arc<Mutex<Usage>>,
    /// `ctx.memory`: called with `search` or `store` and the tool's arguments (`{query,
    /// kind, k}` or `{text, kind, metadata}`); `None` when the workflow has no memory.
    pub memory: Option<ToolCaller>,
}

impl ScriptContext {
    /// A context that reaches nothing: what an idle warm VM holds between calls.
    fn inert() -> Arc<ScriptContext> {
        static INERT: OnceLock<Arc<ScriptContext>> = OnceLock::new();
        let inert = INERT.get_or_init(|| {
            let nothing = || "no run is in progress".to_string();
            Arc::new(ScriptContext {
                task: Json::Null,
                provider: None,
                model: String::new(),
                agent: String::new(),
                call_tool: Arc::new(move |_, _| Box::pin(async move { Err(nothing()) })),
                tools: Arc::new([]),
                scratch_get: Arc::new(move |_| Err(nothing())),
                scratch_set: Arc::new(move |_, _| Err(nothing())),
                render: Arc::new(move |_, _| Err(nothing())),
                log: Arc::new(|_| {}),
                usage: Arc::default(),
                memory: None,
            })
        });
        Arc::clone(inert)
    }
}

/// What a script declares itself to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Agent,
    Tool,
}

impl Kind {
    /// The function that declares this kind, as scripts call it.
    fn api(self) -> &'static str {
        match self {
            Kind::Agent => "helix.agent",
            Kind::Tool => "helix.tool",
        }
    }

    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Agent => &["description", "run"],
            Kind::Tool => &["description", "params", "run"],
        }
    }

    fn run_signature(self) -> &'static str {
        match self {
            Kind::Agent => "function(task, ctx)",
            Kind::Tool => "function(args, ctx)",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Agent => "an agent",
            Kind::Tool => "a tool",
        }
    }
}

/// What a script declares, read without running it.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub kind: Kind,
    /// Empty when the script gives none.
    pub description: String,
    /// A tool's `params` as the script wrote them (`{name: {type, default, enum,
    /// description}}`), the shape `agents::script_spec` reads; an empty object for agents.
    pub params: Json,
}

/// Loads the file (sandboxed) and checks that it returns `helix.agent {…}` or
/// `helix.tool {…}`; for validation and `helix plan`. Runs the script's top level, under
/// the default limits, on the calling thread; `helix.log` there goes nowhere.
pub fn inspect(src: &ScriptSource) -> Result<Loaded, ScriptError> {
    without_panics(src, || {
        require_lua(src)?;
        let budget = new_budget(src, &Limits::default());
        let loaded = Vm::new(&budget, None)
            .map_err(|e| lua::lua_error(src, &budget.limits, e))
            .and_then(|vm| vm.load_definition(src))
            .map(|definition| definition.loaded);
        outranked_by_limits(src, &budget, loaded)
    })
}

/// Runs an agent's `run(task, ctx)` with `cx.task` and returns what it returns, as JSON.
pub async fn run_agent(
    src: &ScriptSource,
    cx: ScriptContext,
    limits: &Limits,
) -> Result<Json, ScriptError> {
    let task = cx.task.clone();
    run(src, Kind::Agent, task, cx, limits).await
}

/// Runs a tool's `run(args, ctx)` and returns what it returns, as JSON. `args` is an object
/// (or null for none); missing arguments take their `default`, and an argument the tool does
/// not declare is refused.
pub async fn run_tool(
    src: &ScriptSource,
    args: Json,
    cx: ScriptContext,
    limits: &Limits,
) -> Result<Json, ScriptError> {
    run(src, Kind::Tool, args, cx, limits).await
}

/// Calls a tool the way the engine does, under the default limits, on a warm VM when one is
/// idle. A tool's VM is built, sandboxed and loaded once and then lent to one call at a time:
/// what the file's top level sets up persists between calls, like a module's state; each
/// call gets its own `ctx`, its own instruction budget, and the memory cap of the VM. A VM
/// that failed a call or reached a limit is dropped, and a changed file gets new VMs.
pub async fn call_tool(
    src: &ScriptSource,
    args: Json,
    cx: ScriptContext,
) -> Result<Json, ScriptError> {
    require_lua(src)?;
    let (tool, budget) = match take_warm(src) {
        Some(tool) => {
            tool.begin(cx);
            let budget = Arc::clone(&tool.vm.budget);
            (tool, budget)
        }
        None => {
            let budget = new_budget(src, &Limits::default());
            let loaded = guarded(src, async { load(src, Kind::Tool, cx, &budget) }).await;
            (outranked_by_limits(src, &budget, loaded)?, budget)
        }
    };
    let result = guarded(src, call(src, Kind::Tool, args, &tool)).await;
    let result = outranked_by_limits(src, &budget, result);
    if result.is_ok() {
        give_back(src, tool);
    }
    result
}

async fn run(
    src: &ScriptSource,
    kind: Kind,
    input: Json,
    cx: ScriptContext,
    limits: &Limits,
) -> Result<Json, ScriptError> {
    require_lua(src)?;
    let budget = new_budget(src, limits);
    let result = guarded(src, async {
        let loaded = load(src, kind, cx, &budget)?;
        call(src, kind, input, &loaded).await
    })
    .await;
    outranked_by_limits(src, &budget, result)
}

/// A panic in the VM or in one of the engine's callbacks fails this script, not the engine.
async fn guarded<T>(
    src: &ScriptSource,
    work: impl Future<Output = Result<T, ScriptError>>,
) -> Result<T, ScriptError> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(ScriptError::new(
                src,
                None,
                ScriptErrorKind::Runtime,
                format!("the script engine failed: {}", super::panic_reason(&*panic)),
            ))
        })
}

/// A VM with the script's definition loaded, ready for `run`.
struct Prepared {
    vm: Vm,
    definition: Definition,
}

fn load(
    src: &ScriptSource,
    kind: Kind,
    cx: ScriptContext,
    budget: &Arc<Budget>,
) -> Result<Prepared, ScriptError> {
    let vm = Vm::new(budget, Some(cx)).map_err(|e| lua::lua_error(src, &budget.limits, e))?;
    let definition = vm.load_definition(src)?;
    if definition.loaded.kind != kind {
        return Err(ScriptError::new(
            src,
            None,
            ScriptErrorKind::Runtime,
            format!(
                "the script declares {} ({} {{ … }}), not {}",
                definition.loaded.kind.noun(),
                definition.loaded.kind.api(),
                kind.noun()
            ),
        ));
    }
    Ok(Prepared { vm, definition })
}

impl Prepared {
    /// Hands a warm VM to a new call: its context and a full budget. Its `ctx` is read-only,
    /// so an earlier call cannot have left anything in it.
    fn begin(&self, cx: ScriptContext) {
        if let Some(host) = &self.vm.host {
            host.begin(cx);
        }
        self.vm.budget.used.store(0, Ordering::Relaxed);
    }
}

async fn call(
    src: &ScriptSource,
    kind: Kind,
    input: Json,
    loaded: &Prepared,
) -> Result<Json, ScriptError> {
    let Prepared { vm, definition } = loaded;
    let fail = |e| lua::lua_error(src, &vm.budget.limits, e);
    let input = match kind {
        Kind::Agent => input,
        Kind::Tool => tool_arguments(src, &definition.loaded.params, input)?,
    };
    let input = lua::json_to_lua(&vm.lua, &input, &vm.marks.array).map_err(fail)?;
    let ctx = vm.ctx.clone().map_or(Value::Nil, Value::Table);

    // The instruction hook belongs to one Lua thread: `run` gets a thread of its own, which
    // its async calls suspend and resume, and the hook goes with it.
    let thread = vm.lua.create_thread(definition.run.clone()).map_err(fail)?;
    thread.set_hook(lua::hook_triggers(), vm.budget.hook());
    let returned: Value = thread.into_async((input, ctx)).await.map_err(fail)?;
    lua::lua_to_json(&returned, &vm.marks.array, 0)
        .map_err(|message| ScriptError::new(src, None, ScriptErrorKind::Value, message))
}

/// Idle tool VMs kept per script.
const IDLE_TOOL_VMS: usize = 4;

/// Idle tool VMs by script name, each with the text it was loaded from.
type ToolPool = Mutex<HashMap<String, Vec<(String, Prepared)>>>;

fn tool_pool() -> &'static ToolPool {
    static POOL: OnceLock<ToolPool> = OnceLock::new();
    POOL.get_or_init(ToolPool::default)
}

/// An idle VM loaded from this very text of the script, if there is one.
fn take_warm(src: &ScriptSource) -> Option<Prepared> {
    let mut pool = tool_pool().lock().unwrap_or_else(PoisonError::into_inner);
    let idle = pool.get_mut(&src.name)?;
    // VMs of an older text of the file are dropped as they come up.
    while let Some((code, tool)) = idle.pop() {
        if code == src.code {
            return Some(tool);
        }
    }
    None
}

fn give_back(src: &ScriptSource, tool: Prepared) {
    // A VM that reached a limit is not reused, nor one near its memory cap (a memory error a
    // script caught with `pcall` leaves no other trace).
    let crowded = tool.vm.lua.used_memory() > tool.vm.budget.limits.memory_bytes / 2;
    if tool.vm.budget.spent.get().is_some() || crowded {
        return;
    }
    // An idle VM holds no run's context (its journal, its memory) alive.
    if let Some(host) = &tool.vm.host {
        *host.cx.lock().unwrap_or_else(PoisonError::into_inner) = ScriptContext::inert();
    }
    let mut pool = tool_pool().lock().unwrap_or_else(PoisonError::into_inner);
    let idle = pool.entry(src.name.clone()).or_default();
    if idle.len() < IDLE_TOOL_VMS {
        idle.push((src.code.clone(), tool));
    }
}

fn require_lua(src: &ScriptSource) -> Result<(), ScriptError> {
    match src.lang {
        Lang::Lua => Ok(()),
        Lang::Rhai => Err(ScriptError::new(
            src,
            None,
            ScriptErrorKind::Runtime,
            "custom agents and tools declared with helix.agent or helix.tool are written in Lua",
        )),
    }
}

fn new_budget(src: &ScriptSource, limits: &Limits) -> Arc<Budget> {
    Arc::new(Budget {
        limits: limits.clone(),
        chunk_name: lua::chunk_name(src),
        used: AtomicU64::new(0),
        spent: OnceLock::new(),
    })
}

/// A spent budget outranks whatever error it caused on its way out of the script.
fn outranked_by_limits<T>(
    src: &ScriptSource,
    budget: &Budget,
    result: Result<T, ScriptError>,
) -> Result<T, ScriptError> {
    match budget.spent.get() {
        Some(spent) => Err(ScriptError::new(
            src,
            spent.line,
            spent.kind,
            budget.limits.exceeded(spent.kind),
        )),
        None => result,
    }
}

/// A tool's arguments with defaults applied, as the engine applies them to tools declared
/// in YAML. The tool is named after its file (`scripts/loc.lua` is `loc`).
fn tool_arguments(src: &ScriptSource, params: &Json, args: Json) -> Result<Json, ScriptError> {
    let refuse = |message| ScriptError::new(src, None, ScriptErrorKind::Runtime, message);
    let name = Path::new(&src.name).file_stem().map_or_else(
        || src.name.clone(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    let mut given = match args {
        Json::Object(given) => given,
        Json::Null => Map::new(),
        other => {
            return Err(refuse(format!(
                "tool `{name}` takes an object of named arguments, got {other}"
            )))
        }
    };
    crate::engine::executor::apply_param_defaults(&name, params, &mut given).map_err(refuse)?;
    Ok(Json::Object(given))
}

/// The `helix` API and the `ctx` of a run, over host functions that answer a value, or nil
/// and a complaint. Called with the VM's host functions; returns `new_context`.
const PRELUDE: &str = r#"
local host = ...
local error, rawequal, select, setmetatable, tostring = error, rawequal, select, setmetatable, tostring
local concat, pack = table.concat, table.pack

-- Raises a host's complaint at the line of the script that called the API: level 3 is past
-- `unwrap` and the API function. Callers write `return (unwrap(...))`: without the
-- parentheses that would be a tail call, which drops the API function's level.
local function unwrap(value, complaint)
  if complaint ~= nil then error(complaint, 3) end
  return value
end

-- What `print` would show, separated by spaces.
local function message(...)
  local parts = pack(...)
  for i = 1, parts.n do parts[i] = tostring(parts[i]) end
  return concat(parts, " ", 1, parts.n)
end

helix = {
  -- Host functions themselves: `return helix.agent {…}` is a tail call, which leaves a Lua
  -- wrapper no line of the script to blame, but keeps the caller of a host function.
  agent = host.define_agent,
  tool = host.define_tool,
  json = {
    encode = function(value) return (unwrap(host.json_encode(value))) end,
    decode = function(text) return (unwrap(host.json_decode(text))) end,
  },
  log = function(...) host.log(message(...)) end,
}

local function method_of(object, self, usage)
  if not rawequal(self, object) then
    error(usage .. ": call it with a colon, as in " .. usage .. "(…)", 3)
  end
end

-- A read-only view of `fields`: a tool's VM serves many calls, so no call may leave
-- anything in the `ctx` the next one gets.
local function frozen(fields, what)
  return setmetatable({}, {
    __index = fields,
    __newindex = function() error(what .. " cannot be changed", 2) end,
    __metatable = false,
  })
end

-- The `ctx` of one run, over that run's host functions.
local function new_context(run)
  local fields, llm_fields, memory_fields = {}, {}, {}
  local ctx = frozen(fields, "ctx")
  local llm = frozen(llm_fields, "ctx.llm")
  local memory = frozen(memory_fields, "ctx.memory")

  function llm_fields.chat(self, options)
    method_of(llm, self, "ctx.llm:chat")
    return (unwrap(run.chat(options)))
  end
  fields.llm = llm

  fields.tools = setmetatable({}, {
    __index = function(_, name)
      unwrap(run.check_tool(name))
      return function(args) return (unwrap(run.call_tool(name, args))) end
    end,
    __newindex = function() error("ctx.tools cannot be changed", 2) end,
    __metatable = false,
  })
  function fields.tool(self, name, args)
    method_of(ctx, self, "ctx:tool")
    return (unwrap(run.call_tool(name, args)))
  end

  -- Reads and writes go to the task's scratchpad; a read gives a copy.
  fields.scratch = setmetatable({}, {
    __index = function(_, key) return (unwrap(run.scratch_get(key))) end,
    __newindex = function(_, key, value) unwrap(run.scratch_set(key, value)) end,
    __metatable = false,
  })

  function memory_fields.search(self, query, options)
    method_of(memory, self, "ctx.memory:search")
    return (unwrap(run.memory("search", query, options)))
  end
  function memory_fields.store(self, text, options)
    method_of(memory, self, "ctx.memory:store")
    return (unwrap(run.memory("store", text, options)))
  end
  fields.memory = memory

  function fields.render(self, template, vars)
    method_of(ctx, self, "ctx:render")
    return (unwrap(run.render(template, vars)))
  end

  -- Written `ctx.log(…)`; `ctx:log(…)` is forgiven.
  function fields.log(...)
    if rawequal((...), ctx) then
      run.log(message(select(2, ...)))
    else
      run.log(message(...))
    end
  end

  return ctx
end

return new_context
"#;

const PRELUDE_NAME: &str = "=helix api";

/// One sandboxed VM with the `helix` API, and the `ctx` its run receives.
struct Vm {
    lua: Lua,
    budget: Arc<Budget>,
    marks: Marks,
    /// `None` when the script is only inspected.
    ctx: Option<Table>,
    /// What `ctx` reaches; `None` when the script is only inspected.
    host: Option<Arc<Host>>,
}

/// Metatables that tell where a table came from.
#[derive(Clone)]
struct Marks {
    /// Tables that came in as JSON arrays, so that an empty one goes back out as `[]`.
    array: Table,
    /// What `helix.agent` returns; protected, so a script cannot forge or strip the mark.
    agent: Table,
    /// What `helix.tool` returns.
    tool: Table,
}

impl Marks {
    fn new(lua: &Lua) -> mlua::Result<Marks> {
        let protected = |kind: Kind| -> mlua::Result<Table> {
            let mark = lua.create_table()?;
            mark.raw_set("__metatable", kind.api())?;
            Ok(mark)
        };
        Ok(Marks {
            array: lua.create_table()?,
            agent: protected(Kind::Agent)?,
            tool: protected(Kind::Tool)?,
        })
    }

    fn of(&self, kind: Kind) -> &Table {
        match kind {
            Kind::Agent => &self.agent,
            Kind::Tool => &self.tool,
        }
    }

    fn kind_of(&self, table: &Table) -> Option<Kind> {
        let mark = table.metatable()?;
        [Kind::Agent, Kind::Tool]
            .into_iter()
            .find(|kind| mark == *self.of(*kind))
    }
}

/// A declaration read back from the table `helix.agent` or `helix.tool` made.
struct Definition {
    loaded: Loaded,
    run: Function,
}

impl Vm {
    fn new(budget: &Arc<Budget>, cx: Option<ScriptContext>) -> mlua::Result<Vm> {
        let lua = Lua::new_with(lua::libraries(), LuaOptions::new())?;
        lua.set_memory_limit(budget.limits.memory_bytes)?;
        lua::install_sandbox(&lua, budget)?;
        let marks = Marks::new(&lua)?;

        let host = cx.map(|cx| Arc::new(Host::new(cx, budget, &marks)));
        let log: Log = match &host {
            Some(host) => host.current_log(),
            None => Arc::new(|_: &str| {}),
        };
        let api = lua.create_table()?;
        for (name, kind) in [("define_agent", Kind::Agent), ("define_tool", Kind::Tool)] {
            let marks = marks.clone();
            api.raw_set(
                name,
                lua.create_function(move |lua, definition: Value| {
                    define(lua, &marks, kind, definition).map_err(|fault| match fault {
                        Fault::Complaint(message) => at_caller(lua, &message),
                        Fault::Vm(error) => error,
                    })
                })?,
            )?;
        }
        let array = marks.array.clone();
        api.raw_set(
            "json_encode",
            host_fn(&lua, move |lua, value: Value| {
                let json = lua::lua_to_json(&value, &array, 0)
                    .map_err(|e| format!("helix.json.encode: {e}"))?;
                Ok(Value::String(lua.create_string(json.to_string())?))
            })?,
        )?;
        let array = marks.array.clone();
        api.raw_set(
            "json_decode",
            host_fn(&lua, move |lua, text: Value| {
                let text = string_arg(&text, "helix.json.decode: the text", "a string")?;
                let json: Json =
                    serde_json::from_str(&text).map_err(|e| format!("helix.json.decode: {e}"))?;
                Ok(lua::json_to_lua(lua, &json, &array)?)
            })?,
        )?;
        api.raw_set("log", log_fn(&lua, log)?)?;

        // Made before the script runs, so that nothing the script does to its globals
        // (`coroutine`, `table`…) can reach the API.
        let new_context: Function = lua
            .load(PRELUDE)
            .set_name(PRELUDE_NAME)
            .set_mode(ChunkMode::Text)
            .call(api)?;
        let ctx = match &host {
            Some(host) => Some(new_context.call(host.functions(&lua)?)?),
            None => None,
        };
        Ok(Vm {
            lua,
            budget: Arc::clone(budget),
            marks,
            ctx,
            host,
        })
    }

    /// Runs the script's top level, which must return what `helix.agent` or `helix.tool`
    /// made.
    fn load_definition(&self, src: &ScriptSource) -> Result<Definition, ScriptError> {
        let fail = |e| lua::lua_error(src, &self.budget.limits, e);
        let chunk = lua::load(&self.lua, src).map_err(fail)?;
        self.lua.set_hook(lua::hook_triggers(), self.budget.hook());
        let returned: Value = chunk.call(()).map_err(fail)?;
        self.lua.remove_hook();

        let definition = match &returned {
            Value::Table(table) => match self.marks.kind_of(table) {
                Some(kind) => read_definition(&self.marks, kind, table),
                None => Err(not_a_definition(&returned)),
            },
            _ => Err(not_a_definition(&returned)),
        };
        definition.map_err(|fault| match fault {
            Fault::Complaint(message) => {
                ScriptError::new(src, None, ScriptErrorKind::Runtime, message)
            }
            Fault::Vm(e) => fail(e),
        })
    }
}

fn not_a_definition(returned: &Value) -> Fault {
    let hint = match returned {
        Value::Nil => " (is `return` missing?)",
        _ => "",
    };
    Fault::Complaint(format!(
        "the script must end with `return helix.agent {{ … }}` or `return helix.tool {{ … }}`, \
         but it returns {}{hint}",
        describe(returned)
    ))
}

/// `helix.agent` / `helix.tool`: checks the declaration and returns a marked copy of it.
fn define(lua: &Lua, marks: &Marks, kind: Kind, definition: Value) -> HostResult {
    let Value::Table(table) = definition else {
        return Err(Fault::Complaint(format!(
            "{api}: expected a table, as in {api} {{ description = …, run = {} … end }}, got {}",
            kind.run_signature(),
            describe(&definition),
            api = kind.api(),
        )));
    };
    let definition = read_definition(marks, kind, &table)?;
    let marked = lua.create_table()?;
    marked.raw_set("description", definition.loaded.description)?;
    marked.raw_set("run", definition.run)?;
    if kind == Kind::Tool {
        marked.raw_set(
            "params",
            lua::json_to_lua(lua, &definition.loaded.params, &marks.array)?,
        )?;
    }
    marked.set_metatable(Some(marks.of(kind).clone()));
    Ok(Value::Table(marked))
}

/// Reads a declaration's fields, refusing unknown ones and wrong types; used both on the
/// table a script gives `helix.agent` and on the one the script finally returns.
fn read_definition(marks: &Marks, kind: Kind, table: &Table) -> Result<Definition, Fault> {
    let api = kind.api();
    check_fields(api, table, kind.fields())?;
    let description = match table.raw_get("description")? {
        Value::Nil => String::new(),
        other => string_arg(&other, &format!("{api}: `description`"), "a string")?,
    };
    let run = match table.raw_get("run")? {
        Value::Function(run) => run,
        other => {
            return Err(wrong_type(
                &format!("{api}: `run`"),
                &format!("a {}", kind.run_signature()),
                &other,
            ))
        }
    };
    let params = match kind {
        Kind::Agent => Json::Object(Map::new()),
        Kind::Tool => read_params(marks, table.raw_get("params")?)?,
    };
    Ok(Definition {
        loaded: Loaded {
            kind,
            description,
            params,
        },
        run,
    })
}

/// A tool's `params`, checked as a workflow's `tools.<name>.params` are.
fn read_params(marks: &Marks, params: Value) -> Result<Json, Fault> {
    let what = "helix.tool: `params`";
    let table = match params {
        Value::Nil => return Ok(Json::Object(Map::new())),
        Value::Table(table) => table,
        other => {
            return Err(wrong_type(
                what,
                "a table of parameters, as in { path = { type = \"string\" } }",
                &other,
            ))
        }
    };
    let param_fields: Vec<&str> = PARAM_KEYS.iter().map(|key| key.name).collect();
    for pair in table.pairs::<Value, Value>() {
        let (name, spec) = pair?;
        let name = match name {
            Value::String(name) => name.to_string_lossy(),
            other => {
                return Err(Fault::Complaint(format!(
                    "{what}: parameters are named, as in {{ path = {{ type = \"string\" }} }}; got {} key",
                    describe(&other)
                )))
            }
        };
        let what = format!("helix.tool: parameter `{name}`");
        let Value::Table(spec) = spec else {
            return Err(wrong_type(
                &what,
                "a table, as in { type = \"string\" }",
                &spec,
            ));
        };
        check_fields(&what, &spec, &param_fields)?;
        match spec.raw_get("type")? {
            Value::Nil => {}
            Value::String(ty) => {
                let ty = ty.to_string_lossy();
                let types = param_types();
                if !types.contains(&ty.as_str()) {
                    return Err(Fault::Complaint(format!(
                        "{what}: unknown type \"{ty}\"{}",
                        suggestion(&ty, types, "the types are")
                    )));
                }
            }
            other => return Err(wrong_type(&format!("{what}: `type`"), "a string", &other)),
        }
    }
    lua::lua_to_json(&Value::Table(table), &marks.array, 0)
        .map_err(|e| Fault::Complaint(format!("{what}: {e}")))
}

/// The types a tool parameter may have, as workflows declare them.
fn param_types() -> &'static [&'static str] {
    PARAM_KEYS
        .iter()
        .find_map(|key| match key.ty {
            Ty::Enum(types) if key.name == "type" => Some(types),
            _ => None,
        })
        .unwrap_or(&[])
}

/// Why a host function has no value for the script.
enum Fault {
    /// The script misused the API or the host refused: raised at the script's line, as a
    /// string the script may catch.
    Complaint(String),
    /// The VM failed (out of memory, a spent budget): ends the script as it is.
    Vm(mlua::Error),
}

impl From<mlua::Error> for Fault {
    fn from(error: mlua::Error) -> Fault {
        Fault::Vm(error)
    }
}

impl From<String> for Fault {
    fn from(message: String) -> Fault {
        Fault::Complaint(message)
    }
}

type HostResult<T = Value> = Result<T, Fault>;

/// How the prelude receives an answer: the value, or nil and the complaint to raise.
fn answer(result: HostResult) -> mlua::Result<(Value, Option<String>)> {
    match result {
        Ok(value) => Ok((value, None)),
        Err(Fault::Complaint(message)) => Ok((Value::Nil, Some(message))),
        Err(Fault::Vm(error)) => Err(error),
    }
}

/// An error that starts with the place of the host function's caller, as Lua's own errors
/// do, for host functions the script calls directly.
fn at_caller(lua: &Lua, message: &str) -> mlua::Error {
    // Level 0 is the host function itself.
    let place = lua.inspect_stack(1).and_then(|caller| {
        let line = u32::try_from(caller.curr_line()).ok()?;
        let source = caller.source().short_src?.into_owned();
        Some(format!("{source}:{line}: "))
    });
    mlua::Error::runtime(format!("{}{message}", place.unwrap_or_default()))
}

fn host_fn<A: FromLuaMulti>(
    lua: &Lua,
    work: impl Fn(&Lua, A) -> HostResult + Send + 'static,
) -> mlua::Result<Function> {
    lua.create_function(move |lua, args| answer(work(lua, args)))
}

/// A host function that waits on the host without holding the thread: the script's Lua
/// thread is suspended until `work` is done.
fn async_host_fn<A, F>(
    lua: &Lua,
    work: impl Fn(&Lua, A) -> F + Send + 'static,
) -> mlua::Result<Function>
where
    A: FromLuaMulti,
    F: Future<Output = HostResult> + Send + 'static,
{
    lua.create_async_function(move |lua, args| {
        let work = work(&lua, args);
        async move { answer(work.await) }
    })
}

fn log_fn(lua: &Lua, log: Log) -> mlua::Result<Function> {
    lua.create_function(move |_, message: mlua::String| {
        log(&message.to_string_lossy());
        Ok(())
    })
}

/// What the `ctx` functions of one run share.
struct Host {
    /// The context of the run in progress: a pooled tool VM gets a new one per call.
    cx: Mutex<Arc<ScriptContext>>,
    /// Model calls made so far: a request is turn `turns + 1`.
    turns: AtomicU32,
    budget: Arc<Budget>,
    array: Table,
}

/// How often a script waiting on the host looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(50);

const CHAT_OPTIONS: &[&str] = &[
    "system",
    "messages",
    "json",
    "tools",
    "model",
    "temperature",
    "max_tokens",
];
const MESSAGE_FIELDS: &[&str] = &["role", "content", "tool_calls", "tool_call_id"];
const MESSAGES_SHAPE: &str = "a list of {role, content} tables";

impl Host {
    fn new(cx: ScriptContext, budget: &Arc<Budget>, marks: &Marks) -> Host {
        Host {
            cx: Mutex::new(Arc::new(cx)),
            turns: AtomicU32::new(0),
            budget: Arc::clone(budget),
            array: marks.array.clone(),
        }
    }

    fn cx(&self) -> Arc<ScriptContext> {
        Arc::clone(&self.cx.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Hands the VM to a new run: its context, and model calls counted from one again.
    fn begin(&self, cx: ScriptContext) {
        *self.cx.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(cx);
        self.turns.store(0, Ordering::Relaxed);
    }

    /// Names the task in model requests.
    fn task_id(&self) -> String {
        let cx = self.cx();
        cx.task
            .get("id")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string()
    }

    /// The host functions `new_context` builds the run's `ctx` from.
    fn functions(self: &Arc<Self>, lua: &Lua) -> mlua::Result<Table> {
        let functions = lua.create_table()?;
        let host = Arc::clone(self);
        functions.raw_set(
            "chat",
            async_host_fn(lua, move |lua, options: Value| {
                // Read now: the options are the script's to change once it is resumed.
                let request = host.chat_request(&options);
                let line = host.budget.line_on_stack(lua);
                Arc::clone(&host).chat(lua.weak(), request, line)
            })?,
        )?;
        let host = Arc::clone(self);
        functions.raw_set(
            "check_tool",
            host_fn(lua, move |_, name: Value| {
                host.tool_named(&name)?;
                Ok(Value::Boolean(true))
            })?,
        )?;
        let host = Arc::clone(self);
        functions.raw_set(
            "call_tool",
            async_host_fn(lua, move |lua, (name, args): (Value, Value)| {
                let call = host.tool_call(&name, &args);
                let line = host.budget.line_on_stack(lua);
                Arc::clone(&host).call_tool(lua.weak(), call, line)
            })?,
        )?;
        let host = Arc::clone(self);
        functions.raw_set(
            "memory",
            async_host_fn(
                lua,
                move |lua, (op, text, options): (String, Value, Value)| {
                    let call = host.memory_call(&op, &text, &options);
                    let line = host.budget.line_on_stack(lua);
                    Arc::clone(&host).call_memory(lua.weak(), call, line)
                },
            )?,
        )?;
        let host = Arc::clone(self);
        functions.raw_set(
            "scratch_get",
            host_fn(lua, move |lua, key: Value| host.scratch_get(lua, &key))?,
        )?;
        let host = Arc::clone(self);
        functions.raw_set(
            "scratch_set",
            host_fn(lua, move |_, (key, value): (Value, Value)| {
                host.scratch_set(&key, &value)
            })?,
        )?;
        let host = Arc::clone(self);
        functions.raw_set(
            "render",
            host_fn(lua, move |lua, (template, vars): (Value, Value)| {
                host.render(lua, &template, &vars)
            })?,
        )?;
        functions.raw_set("log", log_fn(lua, self.current_log())?)?;
        Ok(functions)
    }

    /// Logs through whichever run is in progress when the script logs.
    fn current_log(self: &Arc<Self>) -> Log {
        let host = Arc::clone(self);
        Arc::new(move |line: &str| (host.cx().log)(line))
    }

    fn chat_request(&self, options: &Value) -> HostResult<ChatRequest> {
        let api = "ctx.llm:chat";
        let Value::Table(options) = options else {
            return Err(wrong_type(
                api,
                "a table of options, as in { messages = { … } }",
                options,
            ));
        };
        check_fields(api, options, CHAT_OPTIONS)?;
        let system = optional(options, "system", |value| {
            string_arg(value, &format!("{api}: `system`"), "a string")
        })?;
        let json = optional(options, "json", |value| match value {
            Value::Boolean(json) => Ok(*json),
            other => Err(wrong_type(
                &format!("{api}: `json`"),
                "true or false",
                other,
            )),
        })?;
        let model = optional(options, "model", |value| {
            string_arg(value, &format!("{api}: `model`"), "a model name")
        })?;
        let temperature = optional(options, "temperature", |value| match value {
            Value::Integer(t) => Ok(*t as f64),
            Value::Number(t) => Ok(*t),
            other => Err(wrong_type(
                &format!("{api}: `temperature`"),
                "a number",
                other,
            )),
        })?;
        let max_tokens = optional(options, "max_tokens", |value| {
            whole_number(value)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| wrong_type(&format!("{api}: `max_tokens`"), "a whole number", value))
        })?;
        Ok(ChatRequest {
            model: model.unwrap_or_else(|| self.cx().model.clone()),
            system: system.unwrap_or_default(),
            messages: self.messages(options.raw_get("messages")?)?,
            tools: self.offered_tools(options.raw_get("tools")?)?,
            json: json.unwrap_or(false),
            temperature,
            max_tokens,
            agent: self.cx().agent.clone(),
            task: self.task_id(),
            turn: self.turns.fetch_add(1, Ordering::Relaxed).saturating_add(1),
        })
    }

    fn messages(&self, messages: Value) -> HostResult<Vec<Message>> {
        let items = list_items(&messages)?
            .ok_or_else(|| wrong_type("ctx.llm:chat: `messages`", MESSAGES_SHAPE, &messages))?;
        items
            .iter()
            .enumerate()
            .map(|(index, item)| self.message(&format!("messages[{}]", index + 1), item))
            .collect()
    }

    fn message(&self, what: &str, item: &Value) -> HostResult<Message> {
        let api = "ctx.llm:chat";
        let Value::Table(fields) = item else {
            return Err(wrong_type(
                &format!("{api}: {what}"),
                "a {role, content} table",
                item,
            ));
        };
        check_fields(&format!("{api}: {what}"), fields, MESSAGE_FIELDS)?;
        let role = match fields.raw_get("role")? {
            Value::String(role) => match role.to_string_lossy().as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(Fault::Complaint(format!(
                        "{api}: {what}.role must be \"user\", \"assistant\" or \"tool\", got \"{other}\""
                    )))
                }
            },
            other => {
                return Err(wrong_type(
                    &format!("{api}: {what}.role"),
                    "\"user\", \"assistant\" or \"tool\"",
                    &other,
                ))
            }
        };
        // Anything but text is sent as its JSON, as the `scripted` provider does with
        // structured content: a tool's result can go to the model as it is.
        let content = match fields.raw_get("content")? {
            Value::Nil => String::new(),
            Value::String(text) => text.to_string_lossy(),
            other => lua::lua_to_json(&other, &self.array, 0)
                .map_err(|e| {
                    Fault::Complaint(format!(
                        "{api}: {what}.content must be a string or a JSON value: {e}"
                    ))
                })?
                .to_string(),
        };
        let tool_calls = match fields.raw_get("tool_calls")? {
            Value::Nil => Vec::new(),
            calls => lua::lua_to_json(&calls, &self.array, 0)
                .ok()
                .and_then(|calls| serde_json::from_value::<Vec<ToolCall>>(calls).ok())
                .ok_or_else(|| {
                    wrong_type(
                        &format!("{api}: {what}.tool_calls"),
                        "a list of {id, name, arguments} tables, as reply.tool_calls gives them",
                        &calls,
                    )
                })?,
        };
        let tool_call_id = optional(fields, "tool_call_id", |value| {
            string_arg(value, &format!("{api}: {what}.tool_call_id"), "a string")
        })?;
        if role == Role::Tool && tool_call_id.is_none() {
            return Err(Fault::Complaint(format!(
                "{api}: {what} is a tool message and needs the `tool_call_id` of the call it answers"
            )));
        }
        Ok(Message {
            role,
            content,
            tool_calls,
            tool_call_id,
        })
    }

    /// The schemas of the tools a request offers the model.
    fn offered_tools(&self, names: Value) -> HostResult<Vec<ToolSpec>> {
        if names.is_nil() {
            return Ok(Vec::new());
        }
        let what = "ctx.llm:chat: `tools`";
        let items =
            list_items(&names)?.ok_or_else(|| wrong_type(what, "a list of tool names", &names))?;
        items
            .iter()
            .map(|name| {
                let name = string_arg(name, what, "a list of tool names")?;
                self.tool(&name)
                    .map_err(|e| Fault::Complaint(format!("{what}: {e}")))
            })
            .collect()
    }

    fn tool(&self, name: &str) -> Result<ToolSpec, String> {
        let cx = self.cx();
        cx.tools
            .iter()
            .find(|tool| tool.name == name)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = cx.tools.iter().map(|t| t.name.as_str()).collect();
                let hint = if names.is_empty() {
                    " (it may call none)".to_string()
                } else {
                    suggestion(name, &names, "its tools are")
                };
                format!("`{name}` is not among the tools this script may call{hint}")
            })
    }

    fn tool_named(&self, name: &Value) -> HostResult<String> {
        let name = string_arg(name, "ctx.tools: a tool name", "a string")?;
        self.tool(&name)
            .map_err(|e| Fault::Complaint(format!("ctx.tools: {e}")))?;
        Ok(name)
    }

    /// A checked tool call: the name and the arguments object.
    fn tool_call(&self, name: &Value, args: &Value) -> HostResult<(String, Json)> {
        let name = self.tool_named(name)?;
        let what = format!("ctx.tools[\"{name}\"]");
        let args = match args {
            Value::Nil => Json::Object(Map::new()),
            Value::Table(_) => lua::lua_to_json(args, &self.array, 0)
                .map_err(|e| Fault::Complaint(format!("{what}: {e}")))?,
            other => return Err(wrong_type(&what, ARGS_SHAPE, other)),
        };
        if !args.is_object() {
            return Err(Fault::Complaint(format!(
                "{what}: arguments must be {ARGS_SHAPE}, got a list"
            )));
        }
        Ok((name, args))
    }

    async fn chat(
        self: Arc<Self>,
        lua: WeakLua,
        request: HostResult<ChatRequest>,
        line: Option<u32>,
    ) -> HostResult {
        let request = request?;
        let cx = self.cx();
        let provider = cx.provider.clone().ok_or_else(|| {
            Fault::Complaint("ctx.llm:chat: tools have no model; only agents can chat".into())
        })?;
        let reply = self
            .unless_stopped(line, provider.chat(&request, None))
            .await?
            .map_err(|e| Fault::Complaint(format!("ctx.llm:chat: {e}")))?;
        cx.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(reply.usage);
        let mut out = json!({
            "content": reply.content,
            "tool_calls": reply.tool_calls,
            "usage": reply.usage,
            "finish_reason": reply.finish_reason,
        });
        if let Ok(decoded) = crate::llm::parse_json_reply(&reply.content) {
            out["json"] = decoded;
        }
        Ok(lua::json_to_lua(&upgrade(&lua)?, &out, &self.array)?)
    }

    /// `ctx.memory:search(query, {kind, k})` or `ctx.memory:store(text, {kind, metadata})`,
    /// checked: the operation and its tool arguments.
    fn memory_call(&self, op: &str, text: &Value, options: &Value) -> HostResult<(String, Json)> {
        let api = format!("ctx.memory:{op}");
        let (field, allowed): (&str, &[&str]) = match op {
            "search" => ("query", &["kind", "k"]),
            _ => ("text", &["kind", "metadata"]),
        };
        let text = string_arg(text, &format!("{api}: the {field}"), "a string")?;
        let mut args = match options {
            Value::Nil => Map::new(),
            Value::Table(table) => {
                check_fields(&api, table, allowed)?;
                match lua::lua_to_json(options, &self.array, 0)
                    .map_err(|e| Fault::Complaint(format!("{api}: {e}")))?
                {
                    Json::Object(map) => map,
                    _ => Map::new(),
                }
            }
            other => return Err(wrong_type(&format!("{api}: the options"), "a table", other)),
        };
        args.insert(field.into(), Json::String(text));
        Ok((op.to_string(), Json::Object(args)))
    }

    async fn call_memory(
        self: Arc<Self>,
        lua: WeakLua,
        call: HostResult<(String, Json)>,
        line: Option<u32>,
    ) -> HostResult {
        let (op, args) = call?;
        let memory = self.cx().memory.clone().ok_or_else(|| {
            Fault::Complaint(format!(
                "ctx.memory:{op}: this workflow has no `memory:`; declare one to use memory"
            ))
        })?;
        let result = self
            .unless_stopped(line, memory(op.clone(), args))
            .await?
            .map_err(|e| Fault::Complaint(format!("ctx.memory:{op}: {e}")))?;
        Ok(lua::json_to_lua(&upgrade(&lua)?, &result, &self.array)?)
    }

    async fn call_tool(
        self: Arc<Self>,
        lua: WeakLua,
        call: HostResult<(String, Json)>,
        line: Option<u32>,
    ) -> HostResult {
        let (name, args) = call?;
        let result = self
            .unless_stopped(line, (self.cx().call_tool)(name.clone(), args))
            .await?
            .map_err(|e| Fault::Complaint(format!("{name}: {e}")))?;
        Ok(lua::json_to_lua(&upgrade(&lua)?, &result, &self.array)?)
    }

    fn scratch_get(&self, lua: &Lua, key: &Value) -> HostResult {
        let key = string_arg(key, "ctx.scratch: a key", "a string")?;
        match (self.cx().scratch_get)(&key) {
            Ok(Some(value)) => Ok(lua::json_to_lua(lua, &value, &self.array)?),
            Ok(None) => Ok(Value::Nil),
            Err(e) => Err(Fault::Complaint(format!("ctx.scratch.{key}: {e}"))),
        }
    }

    fn scratch_set(&self, key: &Value, value: &Value) -> HostResult {
        let key = string_arg(key, "ctx.scratch: a key", "a string")?;
        let value = lua::lua_to_json(value, &self.array, 0)
            .map_err(|e| Fault::Complaint(format!("ctx.scratch.{key}: {e}")))?;
        (self.cx().scratch_set)(&key, &value)
            .map_err(|e| Fault::Complaint(format!("ctx.scratch.{key}: {e}")))?;
        Ok(Value::Nil)
    }

    fn render(&self, lua: &Lua, template: &Value, vars: &Value) -> HostResult {
        let api = "ctx:render";
        let template = string_arg(
            template,
            &format!("{api}: the template"),
            "a template file's path or a template's text",
        )?;
        let vars = match vars {
            Value::Nil => Json::Object(Map::new()),
            Value::Table(_) => lua::lua_to_json(vars, &self.array, 0)
                .map_err(|e| Fault::Complaint(format!("{api}: {e}")))?,
            other => return Err(wrong_type(&format!("{api}: `vars`"), "a table", other)),
        };
        if !vars.is_object() {
            return Err(Fault::Complaint(format!(
                "{api}: `vars` must be a table of named values, got a list"
            )));
        }
        let text = (self.cx().render)(&template, &vars)
            .map_err(|e| Fault::Complaint(format!("{api}: {e}")))?;
        Ok(Value::String(lua.create_string(text)?))
    }

    /// Awaits `work` unless a limit stops the script first: the instruction hook cannot fire
    /// while the script waits on the host, so the deadline and the cancel flag are watched
    /// here. `line` is where the script waits.
    async fn unless_stopped<T>(
        &self,
        line: Option<u32>,
        work: impl Future<Output = T>,
    ) -> mlua::Result<T> {
        tokio::select! {
            done = work => Ok(done),
            kind = stopped(&self.budget.limits) => {
                // The first limit reached is the one reported.
                let _ = self.budget.spent.set(Spent { kind, line });
                Err(mlua::Error::runtime(self.budget.limits.exceeded(kind)))
            }
        }
    }
}

const ARGS_SHAPE: &str = "a table of named arguments, as in { path = \"x\" }";

/// Resolves when the deadline passes or the cancel flag is set.
async fn stopped(limits: &Limits) -> ScriptErrorKind {
    loop {
        if let Some(kind) = limits.interruption() {
            return kind;
        }
        let nap = limits.deadline.map_or(CANCEL_POLL, |deadline| {
            deadline
                .saturating_duration_since(Instant::now())
                .min(CANCEL_POLL)
        });
        tokio::time::sleep(nap).await;
    }
}

/// The VM a future started in; it is only gone if the run was dropped mid-call.
fn upgrade(lua: &WeakLua) -> mlua::Result<Lua> {
    lua.try_upgrade()
        .ok_or_else(|| mlua::Error::runtime("the script's VM is gone"))
}

/// Refuses keys of `table` outside `allowed`, suggesting the one a typo meant.
fn check_fields(what: &str, table: &Table, allowed: &[&str]) -> Result<(), Fault> {
    for pair in table.pairs::<Value, Value>() {
        let (key, _) = pair?;
        let Value::String(key) = key else {
            return Err(Fault::Complaint(format!(
                "{what}: fields are named ({}); got {} key",
                allowed.join(", "),
                describe(&key)
            )));
        };
        let key = key.to_string_lossy();
        if !allowed.contains(&key.as_str()) {
            return Err(Fault::Complaint(format!(
                "{what}: unknown field `{key}`{}",
                suggestion(&key, allowed, "the fields are")
            )));
        }
    }
    Ok(())
}

/// " (did you mean `x`?)" for a likely typo, else " (<list>: a, b, c)".
fn suggestion(word: &str, candidates: &[&str], list: &str) -> String {
    match did_you_mean(word, candidates.iter().copied()) {
        Some(close) => format!(" (did you mean `{close}`?)"),
        None => format!(" ({list}: {})", candidates.join(", ")),
    }
}

/// The field's value read by `read`, or `None` when it is absent.
fn optional<T>(
    table: &Table,
    field: &str,
    read: impl FnOnce(&Value) -> HostResult<T>,
) -> HostResult<Option<T>> {
    match table.raw_get::<Value>(field)? {
        Value::Nil => Ok(None),
        value => read(&value).map(Some),
    }
}

fn string_arg(value: &Value, what: &str, expected: &str) -> HostResult<String> {
    match value {
        Value::String(text) => Ok(text.to_string_lossy()),
        other => Err(wrong_type(what, expected, other)),
    }
}

fn whole_number(value: &Value) -> Option<i64> {
    match value {
        Value::Integer(n) => Some(*n),
        Value::Number(n) if n.fract() == 0.0 => Some(*n as i64),
        _ => None,
    }
}

fn wrong_type(what: &str, expected: &str, got: &Value) -> Fault {
    Fault::Complaint(format!("{what} must be {expected}, got {}", describe(got)))
}

/// The items of a table whose keys are exactly 1..n (`Some(vec![])` for an empty one);
/// `None` for any other value.
fn list_items(value: &Value) -> HostResult<Option<Vec<Value>>> {
    let Value::Table(table) = value else {
        return Ok(None);
    };
    let entries = table
        .pairs::<Value, Value>()
        .collect::<mlua::Result<Vec<_>>>()?;
    Ok(lua::sequence(&entries).map(|items| items.into_iter().cloned().collect()))
}

/// A value's type as error messages name it: "nil", "a string", "a table"…
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) | Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Table(_) => "a table",
        Value::Function(_) => "a function",
        Value::Thread(_) => "a coroutine",
        Value::LightUserData(_) | Value::UserData(_) => "a userdata",
        Value::Error(_) => "an error",
        _ => "a value of another type",
    }
}
