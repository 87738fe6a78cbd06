//! Custom agents and tools in Lua, run for real: the scripts call a model over loopback HTTP
//! or the `scripted` provider, built-in tools on a temporary workspace, and templates through
//! helix's own renderer. Only the journal behind `ctx.scratch` is stood in for by a map: it
//! is the engine's to wire.

mod llm_support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helix::agents::builtin_spec;
use helix::llm::{BoxFuture, OpenAi, Provider, Scripted, ToolSpec, Usage};
use helix::scripting::lua_api::{
    call_tool, inspect, run_agent, run_tool, Kind, Loaded, ScriptContext, ToolCaller,
};
use helix::scripting::{Lang, Limits, ScriptError, ScriptErrorKind, ScriptSource};
use helix::tools::{call_builtin, ToolContext};
use llm_support::{Response, Server};
use serde_json::{json, Value as Json};

/// Every test ends well within this, or fails as hung.
const TEST_LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(TEST_LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {TEST_LIMIT:?}"),
    }
}

fn script(name: &str, code: &str) -> ScriptSource {
    ScriptSource {
        lang: Lang::Lua,
        code: code.into(),
        name: name.into(),
        first_line: 1,
    }
}

/// What a script did on the host, for the test to look at.
#[derive(Clone, Default)]
struct Seen {
    scratch: Arc<Mutex<HashMap<String, Json>>>,
    logs: Arc<Mutex<Vec<String>>>,
    usage: Arc<Mutex<Usage>>,
}

impl Seen {
    fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }
}

/// A context for task `task_id` of agent `reviewer`, with the given model and tools.
fn context(
    task: Json,
    provider: Option<Arc<dyn Provider>>,
    tools: Vec<ToolSpec>,
    call_tool: ToolCaller,
) -> (ScriptContext, Seen) {
    let seen = Seen::default();
    let (get, set) = (seen.scratch.clone(), seen.scratch.clone());
    let logs = seen.logs.clone();
    let env = helix::prompt::environment(None);
    let cx = ScriptContext {
        task,
        provider,
        model: "gpt-test".into(),
        agent: "reviewer".into(),
        call_tool,
        tools: tools.into(),
        scratch_get: Arc::new(move |key| {
            Ok(get.lock().map_err(|e| e.to_string())?.get(key).cloned())
        }),
        scratch_set: Arc::new(move |key, value| {
            set.lock()
                .map_err(|e| e.to_string())?
                .insert(key.to_string(), value.clone());
            Ok(())
        }),
        render: Arc::new(move |template, vars| {
            helix::prompt::render(&env, template, vars).map_err(|e| e.to_string())
        }),
        log: Arc::new(move |line| logs.lock().expect("logs").push(line.to_string())),
        usage: seen.usage.clone(),
        memory: None,
    };
    (cx, seen)
}

/// The built-in tools, confined to `workspace`, as the engine runs them.
fn builtins(workspace: &Path) -> (Vec<ToolSpec>, ToolCaller) {
    let specs = ["fs.read", "fs.write"]
        .into_iter()
        .filter_map(builtin_spec)
        .collect();
    let cx = ToolContext {
        workspace: workspace.to_path_buf(),
    };
    let call: ToolCaller = Arc::new(move |name, args| {
        let result = call_builtin(&name, &args, &cx).map_err(|e| e.to_string());
        Box::pin(async move { result })
    });
    (specs, call)
}

fn no_tools() -> (Vec<ToolSpec>, ToolCaller) {
    (Vec::new(), Arc::new(|name, _| unreachable_tool(name)))
}

fn unreachable_tool(name: String) -> BoxFuture<'static, Result<Json, String>> {
    Box::pin(async move { Err(format!("the test offers no tool, yet `{name}` was called")) })
}

/// A tool the test defines (not a stand-in for a helix one): `name` runs `work`.
fn test_tool<F>(name: &str, work: F) -> (Vec<ToolSpec>, ToolCaller)
where
    F: Fn(Json) -> BoxFuture<'static, Result<Json, String>> + Send + Sync + 'static,
{
    let spec = ToolSpec {
        name: name.into(),
        description: format!("{name}, for the test"),
        parameters: json!({ "type": "object" }),
    };
    (vec![spec], Arc::new(move |_, args| work(args)))
}

fn task(id: &str) -> Json {
    json!({ "id": id, "prompt": "Review it.", "item": null, "inputs": {}, "needs": {} })
}

fn scripted(replies: &str) -> Arc<dyn Provider> {
    match Scripted::parse(replies, Path::new("replies.yaml")) {
        Ok(provider) => Arc::new(provider),
        Err(e) => panic!("{e}"),
    }
}

async fn agent(code: &str) -> Result<Json, ScriptError> {
    let (tools, call) = no_tools();
    let (cx, _) = context(task("t"), None, tools, call);
    run_agent(&script("scripts/agent.lua", code), cx, &Limits::default()).await
}

fn expect_ok(result: Result<Json, ScriptError>) -> Json {
    result.unwrap_or_else(|e| panic!("the script failed: {e}"))
}

fn expect_error(result: Result<Json, ScriptError>, kind: ScriptErrorKind) -> ScriptError {
    match result {
        Ok(value) => panic!("expected a {kind:?} error, got {value}"),
        Err(error) => {
            assert_eq!(error.kind, kind, "{error}");
            error
        }
    }
}

#[tokio::test]
async fn an_agent_asks_the_model_for_json_over_http() {
    let server = Server::start([Response::json(
        200,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": "{\"verdict\": \"ok\", \"issues\": []}" },
                "finish_reason": "stop"
            }],
            "usage": { "prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28 }
        }),
    )]);
    let provider: Arc<dyn Provider> =
        Arc::new(OpenAi::new(format!("{}/v1", server.url()), "gpt-test"));
    let (tools, call) = no_tools();
    let (cx, seen) = context(task("review"), Some(provider), tools, call);
    let code = r#"
return helix.agent {
  description = "Reviews the task's prompt",
  run = function(task, ctx)
    local reply = ctx.llm:chat {
      system = ctx:render("You review {{ what }}.", { what = "code" }),
      messages = { { role = "user", content = task.prompt } },
      json = true,
    }
    helix.log("verdict:", reply.json.verdict, "tokens:", reply.usage.output_tokens)
    return { verdict = reply.json.verdict, issues = reply.json.issues, content = reply.content }
  end,
}
"#;
    let output = bounded(run_agent(
        &script("scripts/reviewer.lua", code),
        cx,
        &Limits::default(),
    ))
    .await;

    assert_eq!(
        expect_ok(output),
        json!({
            "verdict": "ok",
            "issues": [],
            "content": "{\"verdict\": \"ok\", \"issues\": []}"
        })
    );
    let sent = server.single_request();
    assert_eq!(
        sent.body["messages"],
        json!([
            { "role": "system", "content": "You review code." },
            { "role": "user", "content": "Review it." }
        ])
    );
    assert_eq!(
        sent.body["response_format"],
        json!({ "type": "json_object" })
    );
    assert_eq!(
        *seen.usage.lock().expect("usage"),
        Usage {
            input_tokens: 21,
            output_tokens: 7
        }
    );
    assert_eq!(seen.logs(), ["verdict: ok tokens: 7"]);
}

#[tokio::test]
async fn each_chat_is_the_next_turn_of_the_task() {
    let provider = scripted(
        "replies:\n  - { agent: reviewer, task: review, turn: 1, content: first }\n  \
         - { agent: reviewer, task: review, turn: 2, content: second, tool_calls: [{ name: fs.read, arguments: { path: a.txt } }] }\n",
    );
    let workspace = tempfile::tempdir().expect("a workspace");
    let (tools, call) = builtins(workspace.path());
    let (cx, _) = context(task("review"), Some(provider), tools, call);
    let code = r#"
return helix.agent {
  run = function(task, ctx)
    local first = ctx.llm:chat { messages = { { role = "user", content = "one" } } }
    local second = ctx.llm:chat {
      messages = { { role = "user", content = "two" } },
      tools = { "fs.read" },
    }
    return { first.content, second.content, second.tool_calls, first.json == nil }
  end,
}
"#;
    let output = bounded(run_agent(
        &script("scripts/turns.lua", code),
        cx,
        &Limits::default(),
    ))
    .await;
    assert_eq!(
        expect_ok(output),
        json!([
            "first",
            "second",
            [{ "id": "call_1", "name": "fs.read", "arguments": { "path": "a.txt" } }],
            true
        ])
    );
}

#[tokio::test]
async fn an_agent_uses_what_a_tool_returns() {
    let workspace = tempfile::tempdir().expect("a workspace");
    std::fs::write(
        workspace.path().join("app.py"),
        "print('hi')\nprint('bye')\n",
    )
    .expect("write app.py");
    let (tools, call) = builtins(workspace.path());
    let (cx, _) = context(
        json!({ "id": "count", "item": "app.py" }),
        None,
        tools,
        call,
    );
    let code = r#"
return helix.agent {
  run = function(task, ctx)
    local file = ctx.tools["fs.read"] { path = task.item }
    local _, lines = file.content:gsub("\n", "")
    ctx:tool("fs.write", { path = "count.txt", content = tostring(lines) })
    local ok, missing = pcall(ctx.tools["fs.read"], { path = "nope.txt" })
    return { path = file.path, lines = lines, caught = not ok, missing = missing }
  end,
}
"#;
    let output = bounded(run_agent(
        &script("scripts/counter.lua", code),
        cx,
        &Limits::default(),
    ))
    .await;
    assert_eq!(
        expect_ok(output),
        json!({
            "path": "app.py",
            "lines": 2,
            "caught": true,
            "missing": "fs.read: path `nope.txt` does not exist"
        })
    );
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("count.txt")).ok(),
        Some("2".into())
    );
}

#[tokio::test]
async fn a_tool_outside_the_agents_tools_is_refused_by_name() {
    let workspace = tempfile::tempdir().expect("a workspace");
    let (tools, call) = builtins(workspace.path());
    let (cx, _) = context(task("t"), None, tools, call);
    let code = "return helix.agent {\n  run = function(task, ctx)\n    return ctx.tools[\"fs.wrte\"] { path = \"x\" }\n  end,\n}";
    let error = expect_error(
        bounded(run_agent(
            &script("scripts/typo.lua", code),
            cx,
            &Limits::default(),
        ))
        .await,
        ScriptErrorKind::Runtime,
    );
    assert_eq!(
        error.to_string(),
        "scripts/typo.lua:3: ctx.tools: `fs.wrte` is not among the tools this script may call (did you mean `fs.write`?)"
    );

    let (tools, call) = builtins(workspace.path());
    let (cx, _) = context(task("t"), None, tools, call);
    let code = "return helix.agent { run = function(task, ctx) return ctx:tool('shell', {}) end }";
    let error = expect_error(
        bounded(run_agent(
            &script("scripts/shell.lua", code),
            cx,
            &Limits::default(),
        ))
        .await,
        ScriptErrorKind::Runtime,
    );
    assert_eq!(
        error.message,
        "ctx.tools: `shell` is not among the tools this script may call (its tools are: fs.read, fs.write)"
    );
}

#[tokio::test]
async fn ctx_memory_searches_and_stores_through_the_host() {
    let code = r#"return helix.agent {
  run = function(task, ctx)
    local hits = ctx.memory:search("flaky tests", { k = 2, kind = "fact" })
    local stored = ctx.memory:store("Retry flaky tests once.", { metadata = { area = "ci" } })
    local ok, err = pcall(ctx.memory.search, ctx.memory, "x", { top = 3 })
    return { first = hits[1].text, stored = stored, refused = err }
  end,
}
"#;
    let calls: Arc<Mutex<Vec<(String, Json)>>> = Arc::default();
    let seen_calls = calls.clone();
    let (tools, call) = no_tools();
    let (mut cx, _) = context(task("t"), None, tools, call);
    cx.memory = Some(Arc::new(move |op: String, args: Json| {
        seen_calls.lock().expect("calls").push((op.clone(), args));
        let answer = if op == "search" {
            json!([{ "id": 7, "kind": "fact", "text": "CI retries are off.", "score": 0.8 }])
        } else {
            json!({ "stored": true, "id": 8 })
        };
        Box::pin(async move { Ok(answer) })
    }));
    let output =
        expect_ok(run_agent(&script("scripts/mem.lua", code), cx, &Limits::default()).await);
    assert_eq!(output["first"], json!("CI retries are off."));
    assert_eq!(output["stored"], json!({ "stored": true, "id": 8 }));
    let refused = output["refused"].as_str().unwrap_or_default();
    assert!(refused.contains("ctx.memory:search"), "{refused}");
    assert!(refused.contains("top"), "{refused}");
    assert_eq!(
        *calls.lock().expect("calls"),
        [
            (
                "search".to_string(),
                json!({ "query": "flaky tests", "k": 2, "kind": "fact" })
            ),
            (
                "store".to_string(),
                json!({ "text": "Retry flaky tests once.", "metadata": { "area": "ci" } })
            ),
        ]
    );

    // Without `memory:` in the workflow, the call says so.
    let (tools, call) = no_tools();
    let (cx, _) = context(task("t"), None, tools, call);
    let code = "return helix.agent { run = function(task, ctx) return ctx.memory:search('x') end }";
    let error = expect_error(
        run_agent(&script("scripts/mem.lua", code), cx, &Limits::default()).await,
        ScriptErrorKind::Runtime,
    );
    assert!(error.to_string().contains("has no `memory:`"), "{error}");
}

#[tokio::test]
async fn the_scratchpad_reads_and_writes_through_the_host() {
    let (tools, call) = no_tools();
    let (cx, seen) = context(task("t"), None, tools, call);
    seen.scratch
        .lock()
        .expect("scratch")
        .insert("earlier".into(), json!({ "files": ["a.rs"] }));
    let code = r#"
return helix.agent {
  run = function(task, ctx)
    local before = ctx.scratch.missing
    ctx.scratch.count = 1
    ctx.scratch.count = ctx.scratch.count + 1
    local earlier = ctx.scratch.earlier
    -- A read is a copy: changing it changes nothing until it is stored again.
    table.insert(earlier.files, "b.rs")
    local unchanged = #ctx.scratch.earlier.files
    ctx.scratch.earlier = earlier
    ctx.scratch.empty = helix.json.decode("[]")
    return {
      before = before == nil,
      count = ctx.scratch.count,
      unchanged = unchanged,
      files = ctx.scratch.earlier.files,
      metatable = getmetatable(ctx.scratch),
      raw = rawget(ctx.scratch, "count") == nil,
    }
  end,
}
"#;
    let output = bounded(run_agent(
        &script("scripts/scratch.lua", code),
        cx,
        &Limits::default(),
    ))
    .await;
    assert_eq!(
        expect_ok(output),
        json!({
            "before": true, "count": 2, "unchanged": 1, "files": ["a.rs", "b.rs"],
            "metatable": false, "raw": true
        })
    );
    let stored = seen.scratch.lock().expect("scratch").clone();
    assert_eq!(stored.get("count"), Some(&json!(2)));
    assert_eq!(
        stored.get("earlier"),
        Some(&json!({ "files": ["a.rs", "b.rs"] }))
    );
    assert_eq!(stored.get("empty"), Some(&json!([])));

    for (code, expected) in [
        (
            "ctx.scratch[1] = 'x'",
            "scripts/scratch.lua:2: ctx.scratch: a key must be a string, got a number",
        ),
        (
            "ctx.scratch.f = function() end",
            "scripts/scratch.lua:2: ctx.scratch.f: a function cannot be converted to JSON",
        ),
    ] {
        let (tools, call) = no_tools();
        let (cx, _) = context(task("t"), None, tools, call);
        let code = format!("return helix.agent {{ run = function(task, ctx)\n{code}\nend }}");
        let error = expect_error(
            bounded(run_agent(
                &script("scripts/scratch.lua", &code),
                cx,
                &Limits::default(),
            ))
            .await,
            ScriptErrorKind::Runtime,
        );
        assert_eq!(error.to_string(), expected);
    }
}

const LOC_TOOL: &str = r#"
return helix.tool {
  description = "Counts lines matching a pattern",
  params = {
    text = { type = "string", description = "The text" },
    pattern = { type = "string", default = "." },
  },
  run = function(args, ctx)
    local n = 0
    for line in args.text:gmatch("[^\n]+") do
      if line:find(args.pattern) then n = n + 1 end
    end
    ctx.log("counted " .. n)
    return { lines = n, pattern = args.pattern }
  end,
}
"#;

#[tokio::test]
async fn a_tool_gets_its_defaults_and_refuses_unknown_arguments() {
    let src = script("scripts/loc.lua", LOC_TOOL);
    let (tools, call) = no_tools();
    let (cx, seen) = context(Json::Null, None, tools, call);
    let output = run_tool(&src, json!({ "text": "a\nb\n\nc" }), cx, &Limits::default()).await;
    assert_eq!(expect_ok(output), json!({ "lines": 3, "pattern": "." }));
    assert_eq!(seen.logs(), ["counted 3"]);

    let (tools, call) = no_tools();
    let (cx, _) = context(Json::Null, None, tools, call);
    let output = run_tool(
        &src,
        json!({ "text": "ab\nb", "pattern": "a" }),
        cx,
        &Limits::default(),
    )
    .await;
    assert_eq!(expect_ok(output), json!({ "lines": 1, "pattern": "a" }));

    for (args, expected) in [
        (
            json!({ "text": "a", "x": 1 }),
            "scripts/loc.lua: tool `loc` has no parameter `x`",
        ),
        (
            json!({ "pattern": "a" }),
            "scripts/loc.lua: tool `loc` needs the argument `text`",
        ),
        (
            json!(["a"]),
            "scripts/loc.lua: tool `loc` takes an object of named arguments, got [\"a\"]",
        ),
    ] {
        let (tools, call) = no_tools();
        let (cx, _) = context(Json::Null, None, tools, call);
        let error = expect_error(
            run_tool(&src, args, cx, &Limits::default()).await,
            ScriptErrorKind::Runtime,
        );
        assert_eq!(error.to_string(), expected);
    }
}

/// A tool that counts its calls in a file-level local and logs what it was given.
const COUNTING_TOOL: &str = r#"local calls = 0
return helix.tool {
  params = { word = { type = "string" }, spin = { type = "boolean", default = false } },
  run = function(args, ctx)
    calls = calls + 1
    -- No call can leave anything in ctx for the next one.
    local ok, err = pcall(function() ctx.left_behind = true end)
    assert(not ok and err:find("ctx cannot be changed"), "ctx could be changed")
    assert(not pcall(function() ctx.llm.chat = nil end), "ctx.llm could be changed")
    ctx.log(args.word)
    while args.spin do end
    return calls
  end,
}
"#;

#[tokio::test]
async fn warm_tool_calls_keep_module_state_and_reach_their_own_context() {
    // Named for this test alone: warm VMs are kept per script.
    let src = script("scripts/pool_counter.lua", COUNTING_TOOL);
    let call = |word: &str| {
        let (tools, caller) = no_tools();
        let (cx, seen) = context(Json::Null, None, tools, caller);
        let src = src.clone();
        let word = word.to_string();
        async move {
            let result = call_tool(&src, json!({ "word": word }), cx).await;
            (result, seen)
        }
    };
    let (first, first_seen) = call("one").await;
    let (second, second_seen) = call("two").await;
    // The second call ran on the first one's VM: the file's state carried over.
    assert_eq!(expect_ok(first), json!(1));
    assert_eq!(expect_ok(second), json!(2));
    // Each call's log went to the context it was called with.
    assert_eq!(first_seen.logs(), ["one"]);
    assert_eq!(second_seen.logs(), ["two"]);

    // A call that runs out of instructions fails alone, and its VM is not reused.
    let (tools, caller) = no_tools();
    let (cx, _) = context(Json::Null, None, tools, caller);
    let spun = call_tool(&src, json!({ "word": "spin", "spin": true }), cx).await;
    let error = expect_error(spun, ScriptErrorKind::InstructionLimit);
    assert!(
        error
            .to_string()
            .starts_with("scripts/pool_counter.lua:11:"),
        "{error}"
    );
    let (after, _) = call("three").await;
    // The spent VM was dropped, so a fresh one, counting from zero, answers.
    assert_eq!(expect_ok(after), json!(1));

    // A changed file gets a fresh VM.
    let edited = script(
        "scripts/pool_counter.lua",
        &COUNTING_TOOL.replace("calls + 1", "calls + 100"),
    );
    let (tools, caller) = no_tools();
    let (cx, _) = context(Json::Null, None, tools, caller);
    let fresh = call_tool(&edited, json!({ "word": "x" }), cx).await;
    assert_eq!(expect_ok(fresh), json!(100));
}

#[tokio::test]
async fn a_tool_has_no_model() {
    let (tools, call) = no_tools();
    let (cx, _) = context(Json::Null, None, tools, call);
    let code = "return helix.tool { run = function(args, ctx)\n  local reply = ctx.llm:chat { messages = {} }\n  return reply\nend }";
    let error = expect_error(
        run_tool(
            &script("scripts/ask.lua", code),
            json!({}),
            cx,
            &Limits::default(),
        )
        .await,
        ScriptErrorKind::Runtime,
    );
    assert_eq!(
        error.to_string(),
        "scripts/ask.lua:2: ctx.llm:chat: tools have no model; only agents can chat"
    );
}

#[tokio::test]
async fn a_script_of_the_other_kind_is_refused() {
    let (tools, call) = no_tools();
    let (cx, _) = context(task("t"), None, tools, call);
    let error = expect_error(
        run_agent(&script("scripts/loc.lua", LOC_TOOL), cx, &Limits::default()).await,
        ScriptErrorKind::Runtime,
    );
    assert_eq!(
        error.to_string(),
        "scripts/loc.lua: the script declares a tool (helix.tool { … }), not an agent"
    );
}

#[tokio::test]
async fn errors_name_the_file_and_line() {
    let code = "local helper = {}\n\nreturn helix.agent {\n  run = function(task, ctx)\n    local n = 1\n    error('no findings for ' .. task.id)\n  end,\n}";
    let error = expect_error(agent(code).await, ScriptErrorKind::Runtime);
    assert_eq!(error.to_string(), "scripts/agent.lua:6: no findings for t");

    let code =
        "return helix.agent {\n  run = function(task, ctx)\n    return task.item.path\n  end,\n}";
    let error = expect_error(agent(code).await, ScriptErrorKind::Runtime);
    assert_eq!(
        error.to_string(),
        "scripts/agent.lua:3: attempt to index a nil value (field 'item')"
    );

    let error = expect_error(
        agent("return helix.agent {\n  run = function(task, ctx)\n    return 1 +\n  end,\n}").await,
        ScriptErrorKind::Syntax,
    );
    assert_eq!(error.line, Some(4));
}

#[tokio::test]
async fn wrong_argument_types_say_what_was_expected_and_given() {
    for (body, expected) in [
        (
            "ctx.llm:chat { messages = 'hi' }",
            "ctx.llm:chat: `messages` must be a list of {role, content} tables, got a string",
        ),
        (
            "ctx.llm:chat { mesages = {} }",
            "ctx.llm:chat: unknown field `mesages` (did you mean `messages`?)",
        ),
        (
            "ctx.llm:chat { messages = { { role = 'bot', content = 'x' } } }",
            "ctx.llm:chat: messages[1].role must be \"user\", \"assistant\" or \"tool\", got \"bot\"",
        ),
        (
            "ctx.llm:chat { messages = {}, json = 'yes' }",
            "ctx.llm:chat: `json` must be true or false, got a string",
        ),
        (
            "ctx.llm:chat { messages = { 'hi' } }",
            "ctx.llm:chat: messages[1] must be a {role, content} table, got a string",
        ),
        (
            "ctx.llm.chat { messages = {} }",
            "ctx.llm:chat: call it with a colon, as in ctx.llm:chat(…)",
        ),
        (
            "ctx.llm:chat 'hi'",
            "ctx.llm:chat must be a table of options, as in { messages = { … } }, got a string",
        ),
        (
            "ctx:render(42)",
            "ctx:render: the template must be a template file's path or a template's text, got a number",
        ),
        (
            "ctx:render('{{ x }}', 'x')",
            "ctx:render: `vars` must be a table, got a string",
        ),
        (
            "helix.json.decode({})",
            "helix.json.decode: the text must be a string, got a table",
        ),
        (
            "helix.json.encode({ f = print or function() end })",
            "helix.json.encode: a function cannot be converted to JSON",
        ),
    ] {
        // Not `return {body}`: a tail call leaves no line of the script on the stack to blame.
        let code = format!(
            "return helix.agent {{\n  run = function(task, ctx)\n    local result = {body}\n    return result\n  end,\n}}"
        );
        let error = expect_error(agent(&code).await, ScriptErrorKind::Runtime);
        assert_eq!(
            (error.line, error.message.as_str()),
            (Some(3), expected),
            "{body}"
        );
    }

    for (code, expected) in [
        (
            "return helix.agent { run = 5 }",
            "scripts/agent.lua:1: helix.agent: `run` must be a function(task, ctx), got a number",
        ),
        (
            "return helix.agent { descripton = 'x', run = function() end }",
            "scripts/agent.lua:1: helix.agent: unknown field `descripton` (did you mean `description`?)",
        ),
        (
            "return helix.agent 'reviewer'",
            "scripts/agent.lua:1: helix.agent: expected a table, as in helix.agent { description = …, run = function(task, ctx) … end }, got a string",
        ),
        (
            "return helix.tool { params = { n = { type = 'int' } }, run = function() end }",
            "scripts/agent.lua:1: helix.tool: parameter `n`: unknown type \"int\" (the types are: string, integer, number, boolean, list, object)",
        ),
        (
            "return helix.tool { params = { n = { typ = 'integer' } }, run = function() end }",
            "scripts/agent.lua:1: helix.tool: parameter `n`: unknown field `typ` (did you mean `type`?)",
        ),
    ] {
        let error = inspect(&script("scripts/agent.lua", code));
        assert_eq!(error.err().map(|e| e.to_string()).as_deref(), Some(expected), "{code}");
    }
}

/// Limits under which only the deadline or the cancel flag can stop an endless loop.
fn with_deadline(after: Duration) -> Limits {
    Limits {
        max_instructions: u64::MAX,
        deadline: Some(Instant::now() + after),
        ..Limits::default()
    }
}

fn echo_tool() -> (Vec<ToolSpec>, ToolCaller) {
    test_tool("echo", |args| {
        Box::pin(async move {
            // A real wait, so the script is suspended and resumed on the runtime.
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(args)
        })
    })
}

/// Loops forever after an async call, after a coroutine has had the hook, and in a loop of
/// its own: the hook must be on the Lua thread `run` resumes on every time.
const SPINNING_AGENT: &str = r#"
return helix.agent {
  run = function(task, ctx)
    ctx.tools.echo { n = 1 }
    coroutine.wrap(function() return 1 end)()
    ctx.tools.echo { n = 2 }
    local n = 0
    while true do n = n + 1 end
  end,
}
"#;

#[tokio::test]
async fn an_endless_loop_in_an_async_agent_stops_at_the_instruction_limit() {
    let (tools, call) = echo_tool();
    let (cx, _) = context(task("t"), None, tools, call);
    let limits = Limits {
        max_instructions: 1_000_000,
        ..Limits::default()
    };
    let error = expect_error(
        bounded(run_agent(
            &script("scripts/spin.lua", SPINNING_AGENT),
            cx,
            &limits,
        ))
        .await,
        ScriptErrorKind::InstructionLimit,
    );
    assert_eq!(
        error.to_string(),
        "scripts/spin.lua:8: instruction limit of 1000000 exceeded"
    );
}

#[tokio::test]
async fn an_endless_loop_in_an_async_agent_stops_at_the_deadline() {
    let (tools, call) = echo_tool();
    let (cx, _) = context(task("t"), None, tools, call);
    let error = expect_error(
        bounded(run_agent(
            &script("scripts/spin.lua", SPINNING_AGENT),
            cx,
            &with_deadline(Duration::from_millis(300)),
        ))
        .await,
        ScriptErrorKind::Timeout,
    );
    assert_eq!(error.line, Some(8));
}

#[tokio::test]
async fn a_script_waiting_on_the_host_stops_at_the_deadline_or_when_cancelled() {
    let code = "return helix.agent {\n  run = function(task, ctx)\n    local result = ctx.tools.hang {}\n    return result\n  end,\n}";
    let hang = || {
        test_tool("hang", |_| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Json::Null)
            })
        })
    };

    let (tools, call) = hang();
    let (cx, _) = context(task("t"), None, tools, call);
    let error = expect_error(
        bounded(run_agent(
            &script("scripts/wait.lua", code),
            cx,
            &with_deadline(Duration::from_millis(200)),
        ))
        .await,
        ScriptErrorKind::Timeout,
    );
    assert_eq!(error.to_string(), "scripts/wait.lua:3: deadline exceeded");

    let (tools, call) = hang();
    let (cx, _) = context(task("t"), None, tools, call);
    let limits = Limits::default();
    let cancel = limits.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let error = expect_error(
        bounded(run_agent(&script("scripts/wait.lua", code), cx, &limits)).await,
        ScriptErrorKind::Cancelled,
    );
    assert_eq!(error.to_string(), "scripts/wait.lua:3: cancelled");
}

#[tokio::test]
async fn a_memory_bomb_stops_at_the_memory_limit() {
    let (tools, call) = echo_tool();
    let (cx, _) = context(task("t"), None, tools, call);
    let code = "return helix.agent {\n  run = function(task, ctx)\n    local s = ctx.tools.echo { s = 'x' }.s\n    while true do s = s .. s end\n  end,\n}";
    let limits = Limits {
        memory_bytes: 8 << 20,
        ..Limits::default()
    };
    let error = expect_error(
        bounded(run_agent(&script("scripts/bomb.lua", code), cx, &limits)).await,
        ScriptErrorKind::MemoryLimit,
    );
    assert_eq!(error.message, "memory limit of 8 MiB exceeded");
}

#[tokio::test]
async fn the_top_level_cannot_unsettle_the_api() {
    let (tools, call) = echo_tool();
    let (cx, _) = context(task("t"), None, tools, call);
    let code = r#"
coroutine = nil
table = nil
tostring = nil
error = nil
return helix.agent {
  run = function(task, ctx)
    ctx.log("still", "here")
    return ctx.tools.echo { ok = true }
  end,
}
"#;
    let output = bounded(run_agent(
        &script("scripts/rude.lua", code),
        cx,
        &Limits::default(),
    ))
    .await;
    assert_eq!(expect_ok(output), json!({ "ok": true }));
}

#[test]
fn twenty_agents_run_at_once() {
    const AGENTS: usize = 20;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime");
    // Every agent waits at the barrier inside a tool call, so the test only ends if all
    // twenty are suspended in their scripts at the same time.
    let barrier = Arc::new(tokio::sync::Barrier::new(AGENTS));
    let provider = scripted("replies:\n  - content: '{\"done\": true}'\n");
    let code = r#"
return helix.agent {
  run = function(task, ctx)
    local met = ctx.tools.meet {}
    local reply = ctx.llm:chat { messages = { { role = "user", content = task.id } }, json = true }
    ctx.scratch.seen = task.id
    return { id = task.id, met = met, done = reply.json.done, scratch = ctx.scratch.seen }
  end,
}
"#;
    let src = script("scripts/many.lua", code);
    let outputs = runtime.block_on(bounded(async {
        let runs: Vec<_> = (0..AGENTS)
            .map(|i| {
                let barrier = barrier.clone();
                let (tools, call) = test_tool("meet", move |_| {
                    let barrier = barrier.clone();
                    Box::pin(async move {
                        barrier.wait().await;
                        Ok(json!(true))
                    })
                });
                let (cx, _) = context(
                    task(&format!("review[{i}]")),
                    Some(provider.clone()),
                    tools,
                    call,
                );
                let src = src.clone();
                tokio::spawn(async move { run_agent(&src, cx, &Limits::default()).await })
            })
            .collect();
        let mut outputs = Vec::new();
        for run in runs {
            outputs.push(expect_ok(run.await.expect("the run's task")));
        }
        outputs
    }));
    for (i, output) in outputs.into_iter().enumerate() {
        let id = format!("review[{i}]");
        assert_eq!(
            output,
            json!({ "id": id, "met": true, "done": true, "scratch": id })
        );
    }
}

#[test]
fn inspect_reads_what_a_script_declares() {
    let reviewer =
        "return helix.agent { description = 'Reviews one file', run = function(task, ctx) end }";
    assert_eq!(
        inspect(&script("scripts/reviewer.lua", reviewer)).ok(),
        Some(Loaded {
            kind: Kind::Agent,
            description: "Reviews one file".into(),
            params: json!({}),
        })
    );
    assert_eq!(
        inspect(&script("scripts/loc.lua", LOC_TOOL)).ok(),
        Some(Loaded {
            kind: Kind::Tool,
            description: "Counts lines matching a pattern".into(),
            params: json!({
                "pattern": { "default": ".", "type": "string" },
                "text": { "description": "The text", "type": "string" },
            }),
        })
    );

    for (code, expected) in [
        (
            "return 42",
            "scripts/x.lua: the script must end with `return helix.agent { … }` or `return helix.tool { … }`, but it returns a number",
        ),
        (
            "helix.agent { run = function() end }",
            "scripts/x.lua: the script must end with `return helix.agent { … }` or `return helix.tool { … }`, but it returns nil (is `return` missing?)",
        ),
        (
            "return { description = 'x', run = function() end }",
            "scripts/x.lua: the script must end with `return helix.agent { … }` or `return helix.tool { … }`, but it returns a table",
        ),
        (
            "local a = helix.agent { run = function() end }\na.run = nil\nreturn a",
            "scripts/x.lua: helix.agent: `run` must be a function(task, ctx), got nil",
        ),
        (
            "local a = helix.agent { run = function() end }\nsetmetatable(a, nil)\nreturn a",
            "scripts/x.lua:2: cannot change a protected metatable",
        ),
        ("return helix.agent {\n  run = function(\n}", "scripts/x.lua:3: <name> or '...' expected near '}'"),
    ] {
        let error = inspect(&script("scripts/x.lua", code));
        assert_eq!(error.err().map(|e| e.to_string()).as_deref(), Some(expected), "{code}");
    }

    let mut rhai = script("scripts/x.rhai", "42");
    rhai.lang = Lang::Rhai;
    assert!(inspect(&rhai).is_err());
}

#[test]
fn a_runaway_top_level_stops_at_the_instruction_limit() {
    let error = inspect(&script("scripts/x.lua", "while true do end"));
    assert_eq!(
        error.map_err(|e| (e.kind, e.line)).err(),
        Some((ScriptErrorKind::InstructionLimit, Some(1)))
    );
}

#[test]
fn runs_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (tools, call) = no_tools();
    let (cx, _) = context(task("t"), None, tools, call);
    let src = script("scripts/x.lua", "");
    let limits = Limits::default();
    assert_send(&run_agent(&src, cx.clone(), &limits));
    assert_send(&run_tool(&src, Json::Null, cx, &limits));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_in_an_agent_is_a_clean_error() {
    for body in [
        "local function f(n) return 1 + f(n + 1) end\n    return f(1)",
        "local t = setmetatable({}, { __index = function(t, k) return t[k] end })\n    return t.x",
    ] {
        let (tools, call) = echo_tool();
        let (cx, _) = context(task("t"), None, tools, call);
        let code =
            format!("return helix.agent {{\n  run = function(task, ctx)\n    {body}\n  end,\n}}");
        let src = script("scripts/deep.lua", &code);
        // On a runtime worker, with the stack a worker has.
        let run = tokio::spawn(async move { run_agent(&src, cx, &Limits::default()).await });
        let error = expect_error(
            bounded(run).await.expect("the run's task"),
            ScriptErrorKind::Runtime,
        );
        assert!(error.message.contains("stack overflow"), "{error}");
    }
}

#[tokio::test]
async fn a_run_sees_only_the_sandbox() {
    let code = r#"
return helix.agent {
  run = function(task, ctx)
    return { io == nil, os.execute == nil, require == nil, debug == nil, string.dump == nil,
             package == nil, print == nil, load("\27Lua") == nil }
  end,
}
"#;
    assert_eq!(
        expect_ok(agent(code).await),
        json!([true, true, true, true, true, true, true, true])
    );
}
