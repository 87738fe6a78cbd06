//! The keys of the workflow format, in one table that drives both validation (unknown keys,
//! "did you mean") and the published JSON Schema (`helix schema`).

use serde_json::{json, Map, Value as Json};

#[derive(Debug, Clone, Copy)]
pub enum Ty {
    Str,
    /// A string rendered by minijinja.
    Template,
    /// A minijinja expression (`{{ … }}` around it is optional).
    Expr,
    Bool,
    PosInt,
    Num,
    Duration,
    Size,
    StrList,
    Any,
    Enum(&'static [&'static str]),
    Object(&'static [Key]),
    MapOf(&'static Ty),
    OneOf(&'static [Ty]),
    /// The recursive `tasks:` map.
    Tasks,
}

#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
    pub doc: &'static str,
}

const fn key(name: &'static str, ty: Ty, doc: &'static str) -> Key {
    Key {
        name,
        ty,
        required: false,
        doc,
    }
}

const fn required(name: &'static str, ty: Ty, doc: &'static str) -> Key {
    Key {
        name,
        ty,
        required: true,
        doc,
    }
}

pub const TOP_KEYS: &[Key] = &[
    required("helix", Ty::PosInt, "Format version; this build reads 1."),
    required("name", Ty::Str, "Workflow name."),
    key("description", Ty::Str, "What the workflow does."),
    key("inputs", Ty::MapOf(&Ty::Object(INPUT_KEYS)), "Typed parameters, given with `-i name=value`."),
    key("models", Ty::MapOf(&Ty::Object(MODEL_KEYS)), "Named model configurations; `default` is used unless an agent names another."),
    key("agents", Ty::MapOf(&Ty::Object(AGENT_KEYS)), "Agent roles, or custom agents written as scripts."),
    key("tools", Ty::MapOf(&Ty::Object(TOOL_KEYS)), "Custom tools written as scripts."),
    key("sandbox", Ty::OneOf(&[Ty::Enum(&["host"]), Ty::Object(SANDBOX_KEYS)]), "Default sandbox for `run` tasks: `host` (explicit opt-in to host processes) or a container profile."),
    key("secrets", Ty::StrList, "Environment variables holding secrets; readable as `env.NAME`, never journaled."),
    key("env", Ty::OneOf(&[Ty::StrList, Ty::MapOf(&Ty::Str)]), "Non-secret environment variables templates may read as `env.NAME` (a list, or a map of defaults)."),
    key("budget", Ty::Object(BUDGET_KEYS), "Hard limits for the run."),
    key("schedule", Ty::Object(SCHEDULE_KEYS), "When `helix schedule` runs this workflow."),
    key("history", Ty::Object(HISTORY_KEYS), "Retention of finished runs."),
    key("memory", Ty::Object(MEMORY_KEYS), "Long-term memory recall and synthesis."),
    key("concurrency", Ty::MapOf(&Ty::PosInt), "Named concurrency limits that tasks share, e.g. `{ llm: 2 }`."),
    key("http", Ty::Object(HTTP_KEYS), "What the `http.request` tool may reach."),
    required("tasks", Ty::Tasks, "The task tree: a map from task id to task; nesting makes groups."),
];

pub const INPUT_KEYS: &[Key] = &[
    key(
        "type",
        Ty::Enum(&["string", "integer", "number", "boolean", "list", "object"]),
        "Value type (default string).",
    ),
    key(
        "default",
        Ty::Any,
        "Value when not given; an input without a default is required.",
    ),
    key("enum", Ty::OneOf(&[]), "Allowed values."),
    key("description", Ty::Str, "Shown by `helix plan`."),
];

pub const MODEL_KEYS: &[Key] = &[
    required(
        "provider",
        Ty::Enum(&["openai", "anthropic", "ollama", "scripted", "replay"]),
        "Wire format / source of replies.",
    ),
    key("model", Ty::Str, "Model name at the provider."),
    key("base_url", Ty::Str, "Endpoint override."),
    key(
        "api_key_env",
        Ty::Str,
        "Environment variable holding the API key.",
    ),
    key("temperature", Ty::Num, "Sampling temperature."),
    key("max_tokens", Ty::PosInt, "Maximum tokens per reply."),
    key(
        "concurrency",
        Ty::PosInt,
        "Calls to this model in flight at once, across all agents of a run.",
    ),
    key(
        "rpm",
        Ty::PosInt,
        "Calls to this model per minute, at most.",
    ),
    key("timeout", Ty::Duration, "Request timeout."),
    key(
        "file",
        Ty::Str,
        "Replies file (scripted) or cassette (replay).",
    ),
    key(
        "price",
        Ty::Object(PRICE_KEYS),
        "USD per million tokens, for cost accounting.",
    ),
];

pub const PRICE_KEYS: &[Key] = &[
    key("input", Ty::Num, "USD per million input tokens."),
    key("output", Ty::Num, "USD per million output tokens."),
];

pub const AGENT_KEYS: &[Key] = &[
    key("role", Ty::Template, "The role the agent plays."),
    key("goal", Ty::Template, "What the agent aims for."),
    key(
        "backstory",
        Ty::Template,
        "Extra context for the system prompt.",
    ),
    key(
        "prompt",
        Ty::Str,
        "System prompt template: inline text or a file path (.j2, .jinja, .md, .txt).",
    ),
    key("tools", Ty::StrList, "Tools the agent may call."),
    key(
        "model",
        Ty::Str,
        "Name under `models:` (default: `default`).",
    ),
    key(
        "max_turns",
        Ty::PosInt,
        "Maximum LLM calls per task (default 10).",
    ),
    key("script", Ty::Str, "A custom agent written in Lua (.lua)."),
    key("description", Ty::Str, "What the agent does."),
    key("budget", Ty::Object(TOKEN_BUDGET_KEYS), "Tokens each task of this agent may use."),
    key("tool_protocol", Ty::Enum(&["native", "json"]), "How tools are offered: the API's tool calling (native, default) or described in the prompt and called with JSON replies (json), for models without reliable tool calling."),
];

pub const TOOL_KEYS: &[Key] = &[
    required(
        "script",
        Ty::Str,
        "Lua (.lua) or Rhai (.rhai) file implementing the tool.",
    ),
    key("description", Ty::Str, "Shown to the model."),
    key(
        "params",
        Ty::MapOf(&Ty::Object(PARAM_KEYS)),
        "Arguments the tool takes.",
    ),
];

pub const PARAM_KEYS: &[Key] = &[
    key(
        "type",
        Ty::Enum(&["string", "integer", "number", "boolean", "list", "object"]),
        "Argument type.",
    ),
    key("default", Ty::Any, "Value when omitted."),
    key("enum", Ty::OneOf(&[]), "Allowed values."),
    key("description", Ty::Str, "Shown to the model."),
];

pub const SANDBOX_KEYS: &[Key] = &[
    key("image", Ty::Str, "Container image."),
    key(
        "network",
        Ty::Enum(&["none", "bridge", "host"]),
        "Network access (default none).",
    ),
    key("memory", Ty::Size, "Memory limit, e.g. 512MiB."),
    key("cpus", Ty::Num, "CPU limit."),
    key("pids", Ty::PosInt, "Process limit."),
    key("timeout", Ty::Duration, "Default timeout per command."),
    key("user", Ty::Str, "User in the container."),
    key(
        "read_only",
        Ty::Bool,
        "Read-only root filesystem (default true).",
    ),
    key("env", Ty::MapOf(&Ty::Str), "Environment variables."),
    key(
        "mounts",
        Ty::StrList,
        "Extra read-only mounts (host:container).",
    ),
    key("runtime", Ty::Str, "Container runtime, e.g. runsc."),
    key(
        "output_limit",
        Ty::Size,
        "Bytes of stdout/stderr kept per command (default 1MiB).",
    ),
    key("tmp", Ty::Size, "Size of the /tmp tmpfs (default 64MiB)."),
    key(
        "pool",
        Ty::PosInt,
        "Containers started ahead of time, each used for one command (default 2).",
    ),
];

pub const BUDGET_KEYS: &[Key] = &[
    key("tokens", Ty::PosInt, "Total LLM tokens."),
    key("usd", Ty::Num, "Total cost in USD."),
    key("wall", Ty::Duration, "Wall-clock time of the run."),
];

pub const SCHEDULE_KEYS: &[Key] = &[
    required(
        "cron",
        Ty::Str,
        "Cron expression (5 fields, or 6 with seconds).",
    ),
    key(
        "overlap",
        Ty::Enum(&["skip", "queue", "allow"]),
        "What to do when the previous run is still going.",
    ),
    key(
        "catchup",
        Ty::Enum(&["none", "latest", "all"]),
        "Missed runs to make up.",
    ),
];

pub const HISTORY_KEYS: &[Key] = &[
    key(
        "keep_days",
        Ty::PosInt,
        "Delete finished runs older than this.",
    ),
    key(
        "keep_runs",
        Ty::PosInt,
        "Keep at most this many finished runs.",
    ),
];

pub const TOKEN_BUDGET_KEYS: &[Key] = &[key("tokens", Ty::PosInt, "LLM tokens, input and output.")];

pub const HTTP_KEYS: &[Key] = &[
    key("allow", Ty::StrList, "Hosts (`api.example.com`, `127.0.0.1:8080`) agents may call with `http.request`; nothing else is reachable."),
];

pub const MEMORY_KEYS: &[Key] = &[
    key(
        "recall",
        Ty::Object(RECALL_KEYS),
        "Memories put into agent prompts.",
    ),
    key(
        "synthesize",
        Ty::Bool,
        "Store a lesson after each agent task.",
    ),
    key(
        "embedder",
        Ty::Str,
        "`builtin` (the offline embedder, default) or a model under `models:` serving OpenAI-compatible /v1/embeddings.",
    ),
    key(
        "dimensions",
        Ty::PosInt,
        "Vector dimension (default 384); must match the embedder's.",
    ),
];

pub const RECALL_KEYS: &[Key] = &[
    key("top_k", Ty::PosInt, "How many memories."),
    key("kinds", Ty::StrList, "Kinds to recall."),
    key("max_tokens", Ty::PosInt, "Token budget for recalled text."),
];

pub const RETRY_KEYS: &[Key] = &[
    key(
        "attempts",
        Ty::PosInt,
        "Total attempts, the first included.",
    ),
    key(
        "backoff",
        Ty::Duration,
        "Delay before the first retry; doubles each time.",
    ),
    key("max_backoff", Ty::Duration, "Upper bound of the delay."),
    key(
        "jitter",
        Ty::Bool,
        "Randomize delays by ±25% (default true).",
    ),
    key(
        "on",
        Ty::StrList,
        "Error classes retried: any, timeout, exit_code, script, tool, workflow, agent, output.",
    ),
];

pub const OUTPUT_KEYS: &[Key] = &[
    key("parse", Ty::Enum(&["text", "json", "lines"]), "For run tasks: the output is stdout parsed this way instead of {exit_code, stdout, stderr}."),
    key("schema", Ty::Any, "JSON Schema the output must satisfy."),
];

/// The keys that make a task what it is; exactly one per task.
pub const KIND_KEYS: &[&str] = &[
    "agent", "run", "script", "tool", "workflow", "approve", "tasks",
];

pub const TASK_KEYS: &[Key] = &[
    key(
        "agent",
        Ty::Str,
        "Kind: an agent (from `agents:`) works on `prompt`.",
    ),
    key(
        "run",
        Ty::Template,
        "Kind: a shell command run in the sandbox.",
    ),
    key(
        "script",
        Ty::Str,
        "Kind: inline Rhai/Lua code, or a .rhai/.lua file, returning the output.",
    ),
    key(
        "tool",
        Ty::Str,
        "Kind: call one tool with `with:` arguments.",
    ),
    key(
        "workflow",
        Ty::Str,
        "Kind: run a sub-workflow file with `with:` inputs.",
    ),
    key(
        "approve",
        Ty::Template,
        "Kind: a human gate with this question.",
    ),
    key(
        "tasks",
        Ty::Tasks,
        "Kind: a group of child tasks; succeeds when they all do.",
    ),
    key("description", Ty::Str, "What the task is for."),
    key("prompt", Ty::Template, "Agent tasks: the request."),
    key(
        "budget",
        Ty::Object(TOKEN_BUDGET_KEYS),
        "Agent tasks: tokens this task may use.",
    ),
    key(
        "decompose",
        Ty::Bool,
        "Agent tasks: the agent plans subtasks (JSON) that run as this task's children.",
    ),
    key(
        "lang",
        Ty::Enum(&["rhai", "lua"]),
        "Script tasks: language of inline code (default rhai).",
    ),
    key(
        "with",
        Ty::MapOf(&Ty::Any),
        "Tool and workflow tasks: arguments; strings are templates.",
    ),
    key(
        "env",
        Ty::MapOf(&Ty::Template),
        "Run tasks: environment variables.",
    ),
    key(
        "needs",
        Ty::OneOf(&[Ty::Str, Ty::StrList]),
        "Tasks that must finish first.",
    ),
    key(
        "when",
        Ty::Expr,
        "Run only when this expression is true; otherwise skipped.",
    ),
    key(
        "for_each",
        Ty::Expr,
        "Fan out over this list; each child sees `item`.",
    ),
    key(
        "max_parallel",
        Ty::PosInt,
        "Fan-out children running at once.",
    ),
    key(
        "retry",
        Ty::OneOf(&[Ty::PosInt, Ty::Object(RETRY_KEYS)]),
        "Attempts and backoff.",
    ),
    key("timeout", Ty::Duration, "Per-attempt time limit."),
    key(
        "continue_on_error",
        Ty::Bool,
        "A failure does not fail the run or stop dependents.",
    ),
    key(
        "concurrency",
        Ty::Str,
        "A named limit from the top-level `concurrency:`.",
    ),
    key(
        "output",
        Ty::Object(OUTPUT_KEYS),
        "How the output is extracted and checked.",
    ),
    key(
        "sandbox",
        Ty::OneOf(&[Ty::Enum(&["host"]), Ty::Object(SANDBOX_KEYS)]),
        "Sandbox override for this task.",
    ),
];

/// The JSON Schema of the workflow format, generated from the tables above.
pub fn json_schema() -> Json {
    let mut schema = object_schema(TOP_KEYS);
    if let Json::Object(m) = &mut schema {
        m.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        m.insert("title".into(), json!("helix workflow"));
        m.insert("$defs".into(), json!({ "task": object_schema(TASK_KEYS) }));
    }
    schema
}

fn object_schema(keys: &[Key]) -> Json {
    let mut props = Map::new();
    for k in keys {
        let mut s = ty_schema(k.ty);
        if let Json::Object(m) = &mut s {
            m.insert("description".into(), json!(k.doc));
        }
        props.insert(k.name.into(), s);
    }
    let required: Vec<&str> = keys.iter().filter(|k| k.required).map(|k| k.name).collect();
    let mut m = Map::new();
    m.insert("type".into(), json!("object"));
    m.insert("properties".into(), Json::Object(props));
    m.insert("additionalProperties".into(), json!(false));
    if !required.is_empty() {
        m.insert("required".into(), json!(required));
    }
    Json::Object(m)
}

fn ty_schema(ty: Ty) -> Json {
    match ty {
        Ty::Str | Ty::Template | Ty::Expr => json!({ "type": "string" }),
        Ty::Bool => json!({ "type": "boolean" }),
        Ty::PosInt => json!({ "type": "integer", "minimum": 1 }),
        Ty::Num => json!({ "type": "number" }),
        Ty::Duration => {
            json!({ "type": ["string", "number"], "pattern": "^ *([0-9.]+ *(ms|s|secs?|m|mins?|h|hrs?|d|days?)? *)+$" })
        }
        Ty::Size => {
            json!({ "type": ["string", "integer"], "pattern": "^[0-9.]+ *([KMGT]i?B?|[kmgt]i?b?|B)?$" })
        }
        Ty::StrList => json!({ "type": "array", "items": { "type": "string" } }),
        Ty::Any => json!({}),
        Ty::Enum(values) => json!({ "enum": values }),
        Ty::Object(keys) => object_schema(keys),
        Ty::MapOf(inner) => json!({ "type": "object", "additionalProperties": ty_schema(*inner) }),
        Ty::OneOf([]) => json!({ "type": "array" }),
        Ty::OneOf(options) => {
            json!({ "anyOf": options.iter().map(|t| ty_schema(*t)).collect::<Vec<_>>() })
        }
        Ty::Tasks => {
            json!({ "type": "object", "additionalProperties": { "$ref": "#/$defs/task" } })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_lists_every_task_key() {
        let schema = json_schema();
        let props = &schema["$defs"]["task"]["properties"];
        for k in TASK_KEYS {
            assert!(props.get(k.name).is_some(), "{} missing", k.name);
        }
        assert_eq!(schema["required"], json!(["helix", "name", "tasks"]));
    }
}
