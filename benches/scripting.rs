//! Scripting benchmarks, in-process: `cargo bench --bench scripting` (add `-- vm`, `-- rhai`
//! or `-- lua` for one section).
//!
//! - creating a sandboxed Lua VM: a whole run of `return 1` through `run_on_current_thread`
//!   (each run creates, sandboxes and drops a VM of its own), next to a bare mlua VM with the
//!   same standard libraries and nothing else, and `lua_api::inspect` of a tool (the VM with
//!   the `helix` API, the tool's top level run, no call);
//! - a Rhai tool called the way the engine calls a declared tool, `agents::invoke` awaited by
//!   a task on the runtime, and the same script through `run_on_current_thread`;
//! - a Lua tool (`helix.tool {…}`) through `agents::invoke`, and through `lua_api::run_tool`
//!   with its source and context made once.
//!
//! Lines marked "for scale" or "floor" measure parts of a call (a thread hop, a file read)
//! or what a call would cost with the engine or VM kept between calls, using rhai and mlua
//! directly. Each call is timed on its own with `Instant`; the mean, p50 and p99 are printed.
//! Results and the command that produced them are recorded in BENCHMARKS.md.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helix::agents::{invoke, script_context, AgentTool, ToolEnv};
use helix::scripting::lua_api::{inspect, run_tool};
use helix::scripting::{run_on_current_thread, Lang, Limits, ScriptSource, SCRIPT_STACK_BYTES};
use serde_json::{json, Map, Value as Json};

const CALLS: usize = 20_000;
const VMS: usize = 2_000;

const RHAI_TOOL: &str = r#"let text = args.text;
#{ lines: text.split("\n").len(), chars: text.len() }
"#;
const RHAI_TEXT: &str = "fn main() {\n    println!(\"hi\");\n}";

const LUA_TOOL: &str = r#"return helix.tool {
  description = "Doubles an integer",
  params = { x = { type = "integer" } },
  run = function(args, ctx) return args.x * 2 end,
}
"#;

/// Per-call times of one measurement.
struct Timing {
    mean: Duration,
    p50: Duration,
    p99: Duration,
    calls: usize,
}

impl Timing {
    fn of(mut times: Vec<Duration>) -> Timing {
        times.sort_unstable();
        let calls = times.len();
        Timing {
            mean: times.iter().sum::<Duration>() / calls as u32,
            p50: times[calls / 2],
            p99: times[calls * 99 / 100],
            calls,
        }
    }

    fn print(&self, what: &str) {
        println!(
            "{what}: mean {:.2} µs, p50 {:.2} µs, p99 {:.2} µs ({} calls)",
            micros(self.mean),
            micros(self.p50),
            micros(self.p99),
            self.calls
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Times `calls` calls of `work` one by one, after a tenth as many unmeasured ones.
fn time_each<T>(calls: usize, mut work: impl FnMut() -> T) -> Timing {
    for _ in 0..calls / 10 {
        std::hint::black_box(work());
    }
    let times = (0..calls)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(work());
            t0.elapsed()
        })
        .collect();
    Timing::of(times)
}

/// Like [`time_each`] for an async call, awaited in a loop by a task on a runtime worker,
/// where the engine's tasks call tools.
fn time_each_async<F>(
    runtime: &tokio::runtime::Runtime,
    calls: usize,
    mut work: impl FnMut() -> F + Send + 'static,
) -> Timing
where
    F: Future + Send,
{
    let task = runtime.spawn(async move {
        for _ in 0..calls / 10 {
            std::hint::black_box(work().await);
        }
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t0 = Instant::now();
            std::hint::black_box(work().await);
            times.push(t0.elapsed());
        }
        Timing::of(times)
    });
    runtime.block_on(task).expect("bench task")
}

fn source(lang: Lang, name: &str, code: &str) -> ScriptSource {
    ScriptSource {
        lang,
        code: code.into(),
        name: name.into(),
        first_line: 1,
    }
}

/// The runtime as `helix` builds it: scripts run on its threads and get their stack.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(SCRIPT_STACK_BYTES)
        .build()
        .expect("runtime")
}

/// A tool environment as an agent task gets one: a real journal, a workspace, and the two
/// script tools declared with the params their YAML would give.
fn tool_env(dir: &Path, rhai: &Path, lua: &Path) -> ToolEnv {
    let journal = helix::store::Journal::open(&dir.join("home")).expect("journal");
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(&workspace).expect("workspace");
    let tools = HashMap::from([
        (
            "loc".to_string(),
            AgentTool::Script {
                path: rhai.to_path_buf(),
                params: json!({ "text": { "type": "string" } }),
            },
        ),
        (
            "double".to_string(),
            AgentTool::Script {
                path: lua.to_path_buf(),
                params: json!({ "x": { "type": "integer" } }),
            },
        ),
    ]);
    ToolEnv {
        workspace,
        workflow_dir: dir.to_path_buf(),
        journal: Arc::new(Mutex::new(journal)),
        run_id: "bench".into(),
        task: "bench".into(),
        http_allow: Vec::new(),
        tools: Arc::new(tools),
        sandbox: None,
        memory: None,
        agent: String::new(),
        secrets: Arc::new([]),
    }
}

/// What every section uses: the two tool files, their environment, the runtime.
struct Fixture {
    /// Holds the files, the journal and the workspace until the end.
    _dir: tempfile::TempDir,
    rhai_path: PathBuf,
    lua_path: PathBuf,
    env: Arc<ToolEnv>,
    runtime: tokio::runtime::Runtime,
    limits: Limits,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let rhai_path = dir.path().join("loc.rhai");
        let lua_path = dir.path().join("double.lua");
        std::fs::write(&rhai_path, RHAI_TOOL).expect("write");
        std::fs::write(&lua_path, LUA_TOOL).expect("write");
        let env = Arc::new(tool_env(dir.path(), &rhai_path, &lua_path));
        Fixture {
            _dir: dir,
            rhai_path,
            lua_path,
            env,
            runtime: runtime(),
            limits: Limits::default(),
        }
    }

    fn lua_tool(&self) -> ScriptSource {
        source(Lang::Lua, &self.lua_path.display().to_string(), LUA_TOOL)
    }

    /// Times `invoke(env, tool, args)` as the engine awaits it.
    fn time_invoke(&self, tool: &'static str, args: Json) -> Timing {
        let result = self.runtime.block_on(invoke(&self.env, tool, &args));
        assert!(result.is_ok(), "{tool}: {result:?}");
        let (env, args) = (Arc::clone(&self.env), Arc::new(args));
        time_each_async(&self.runtime, CALLS, move || {
            let (env, args) = (Arc::clone(&env), Arc::clone(&args));
            async move { invoke(&env, tool, &args).await.expect("tool") }
        })
    }
}

/// A VM with the libraries helix gives scripts and its memory cap, without the sandbox.
fn bare_lua(limits: &Limits) -> mlua::Lua {
    let libraries = mlua::StdLib::COROUTINE
        | mlua::StdLib::TABLE
        | mlua::StdLib::STRING
        | mlua::StdLib::UTF8
        | mlua::StdLib::MATH
        | mlua::StdLib::OS;
    let lua = mlua::Lua::new_with(libraries, mlua::LuaOptions::new()).expect("vm");
    lua.set_memory_limit(limits.memory_bytes).expect("limit");
    lua
}

fn lua_vm(fx: &Fixture) {
    println!("== Lua VM ==");
    let trivial = source(Lang::Lua, "bench.lua", "return 1");
    let no_globals = Map::new();
    assert_eq!(
        run_on_current_thread(&trivial, &no_globals, &fx.limits).ok(),
        Some(json!(1))
    );
    time_each(VMS, || {
        run_on_current_thread(&trivial, &no_globals, &fx.limits).expect("lua");
    })
    .print("script run of `return 1` (new sandboxed VM, load, run, drop)");

    // What the sandbox adds to a VM, set against a VM with the same libraries and no sandbox.
    time_each(VMS, || {
        bare_lua(&fx.limits);
    })
    .print("bare mlua VM, same libraries, no sandbox (new, drop)");

    let tool = fx.lua_tool();
    inspect(&tool).expect("inspect");
    time_each(VMS, || {
        inspect(&tool).expect("inspect");
    })
    .print("lua_api::inspect of the tool (sandboxed VM + helix API, top level, drop)");
}

fn rhai_tool(fx: &Fixture) {
    println!("== Rhai tool `loc` ==");
    let args = json!({ "text": RHAI_TEXT });
    let result = fx.runtime.block_on(invoke(&fx.env, "loc", &args));
    assert_eq!(result, Ok(json!({ "lines": 3, "chars": 33 })));
    fx.time_invoke("loc", args.clone()).print(
        "agents::invoke (cached source, thread's kept engine, cached AST, run on the worker)",
    );

    let tool = source(Lang::Rhai, &fx.rhai_path.display().to_string(), RHAI_TOOL);
    let mut globals = Map::new();
    globals.insert("args".into(), args);
    time_each(CALLS, || {
        run_on_current_thread(&tool, &globals, &fx.limits).expect("loc");
    })
    .print("run_on_current_thread (new engine, compile, run)");

    time_each_async(&fx.runtime, CALLS, || async {
        tokio::task::spawn_blocking(|| ()).await.expect("join");
    })
    .print("spawn_blocking of nothing, for scale");

    time_each(CALLS, || {
        std::fs::read_to_string(&fx.rhai_path).expect("read");
    })
    .print("reading the tool file, for scale");

    // The floor for a Rhai call: one engine kept, the script compiled once.
    let mut engine = rhai::Engine::new();
    engine
        .set_max_operations(fx.limits.max_instructions)
        .on_progress(|_| None);
    let ast = engine.compile(RHAI_TOOL).expect("compile");
    time_each(CALLS, || {
        let mut args = rhai::Map::new();
        args.insert("text".into(), RHAI_TEXT.into());
        let mut scope = rhai::Scope::new();
        scope.push("args", args);
        engine
            .eval_ast_with_scope::<rhai::Dynamic>(&mut scope, &ast)
            .expect("eval")
    })
    .print("floor: rhai alone, engine (with limits) kept and script compiled once (eval only)");
}

fn lua_tool(fx: &Fixture) {
    println!("== Lua tool `double` ==");
    let args = json!({ "x": 21 });
    let result = fx.runtime.block_on(invoke(&fx.env, "double", &args));
    assert_eq!(result, Ok(json!(42)));
    fx.time_invoke("double", args.clone())
        .print("agents::invoke (cached source, ctx, a warm pooled VM, run)");

    let cx = script_context(
        &fx.env,
        None,
        String::new(),
        String::new(),
        json!({}),
        vec![],
    );
    let (tool, limits) = (Arc::new(fx.lua_tool()), fx.limits.clone());
    time_each_async(&fx.runtime, CALLS, move || {
        let (tool, args, cx, limits) =
            (Arc::clone(&tool), args.clone(), cx.clone(), limits.clone());
        async move { run_tool(&tool, args, cx, &limits).await.expect("double") }
    })
    .print("lua_api::run_tool, source and ctx made once (new VM + helix API, top level, run)");

    // The floor for a Lua call: one VM kept with the tool's `run` loaded; per call, what a
    // run needs to stay bounded and async (a coroutine with the instruction hook) and the
    // arguments as a table.
    let lua = bare_lua(&fx.limits);
    let run: mlua::Function = lua
        .load("return function(args, ctx) return args.x * 2 end")
        .eval()
        .expect("load");
    time_each_async(&fx.runtime, CALLS, move || {
        let thread = lua.create_thread(run.clone()).expect("thread");
        thread.set_hook(
            mlua::HookTriggers::new().every_nth_instruction(1000),
            |_, _| Ok(mlua::VmState::Continue),
        );
        let args = lua.create_table().expect("table");
        args.raw_set("x", 21).expect("set");
        async move {
            let doubled: i64 = thread
                .into_async((args, mlua::Value::Nil))
                .await
                .expect("run");
            doubled
        }
    })
    .print("floor: mlua alone, VM kept and `run` loaded once (coroutine + hook + call)");

    time_each_async(&fx.runtime, CALLS, || async {
        std::hint::black_box(21) * 2
    })
    .print("the timer around an empty await, for scale");
}

/// One part of the bench, run on the fixture.
type Section = fn(&Fixture);

/// `cargo bench --bench scripting -- rhai` runs only that section (`vm`, `rhai`, `lua`).
fn main() {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let sections: [(&str, Section); 3] = [("vm", lua_vm), ("rhai", rhai_tool), ("lua", lua_tool)];
    // `run_on_current_thread` wants the stack the engine's threads have.
    std::thread::Builder::new()
        .name("bench".into())
        .stack_size(SCRIPT_STACK_BYTES)
        .spawn(move || {
            let fixture = Fixture::new();
            for (name, section) in sections {
                if only.is_empty() || only.iter().any(|o| o == name) {
                    section(&fixture);
                }
            }
        })
        .expect("thread")
        .join()
        .expect("bench");
}
