---@meta helix
-- LuaLS (lua-language-server) annotation stubs for the helix script API.
--
-- Nothing here runs: helix provides the real `helix` table to every Lua script it loads.
-- This file only tells the editor what exists, so that `helix.`, `ctx.` and `task.`
-- complete with documentation and type checks. See docs/scripting.md; editor setup is in
-- scripts/.luarc.json.
--
-- The API is new: names marked "(may change)" are not settled yet.

-------------------------------------------------------------------------------------------
-- Values shared by agents and tools
-------------------------------------------------------------------------------------------

---A value that converts to JSON: nil, a boolean, a number (not NaN or infinite), a UTF-8
---string, or a table of these. A table with keys exactly 1..n is a JSON array; any other
---table is an object. An empty table `{}` becomes the object `{}`.
---@alias helix.Json nil|boolean|number|string|table

---The type of a tool argument, as declared in `params`.
---@alias helix.ParamType
---| "string"
---| "integer"
---| "number"
---| "boolean"
---| "list"    # a JSON array (a Lua sequence)
---| "object"  # a JSON object (a Lua table with string keys)

---One argument of a custom tool.
---@class helix.Param
---The argument's type; models are told it in the tool's JSON Schema (`list` is an `array`).
---Not checked when the tool is called (may change).
---@field type? helix.ParamType
---The value used when a call leaves the argument out. An argument without a default is
---required.
---@field default? helix.Json
---What the argument means; shown to models.
---@field description? string
---The values the argument may take; shown to models.
---@field enum? helix.Json[]

-------------------------------------------------------------------------------------------
-- helix.agent / helix.tool
-------------------------------------------------------------------------------------------

---The work an agent task is given.
---@class helix.Task
---The task key: `review`, or `review[2]` for the third child of a `for_each`.
---@field id string
---The task's rendered `prompt:` (nil when it has none).
---@field prompt string?
---The current element in a `for_each` task, nil otherwise.
---@field item any
---The run's resolved workflow inputs, by name.
---@field inputs table<string, any>
---The outputs of the tasks this one needs, keyed by task id:
---`task.needs.implement.files`, `task.needs["qa.unit"]`.
---@field needs table<string, any>

---A custom agent, as written with `helix.agent { ... }`.
---@class helix.AgentDef
---What the agent does; shown by `helix plan`.
---@field description? string
---Does the task's work. Its return value (converted to JSON) is the task's output; an
---error fails the task with the script's file and line.
---@field run fun(task: helix.Task, ctx: helix.Context): helix.Json

---A custom tool, as written with `helix.tool { ... }`.
---@class helix.ToolDef
---What the tool does; shown to models that may call it.
---@field description? string
---The arguments the tool takes, by name. Missing arguments take their `default`; an
---argument not listed here, or a missing one without a default, is refused before `run`
---is called.
---@field params? table<string, helix.Param>
---Does the work. `args` holds every declared argument (defaults applied); the return value
---(converted to JSON) is the tool's result.
---@field run fun(args: table<string, any>, ctx: helix.Context): helix.Json

---The value `helix.agent` returns; the script returns it to helix.
---@class helix.Agent

---The value `helix.tool` returns; the script returns it to helix.
---@class helix.Tool

-------------------------------------------------------------------------------------------
-- ctx.llm
-------------------------------------------------------------------------------------------

---@alias helix.Role
---| "user"
---| "assistant"
---| "tool"       # the result of a tool call (may change)

---One message of a conversation.
---@class helix.Message
---@field role helix.Role
---@field content string
---Assistant messages: the tool calls the model made, as `reply.tool_calls` gave them
---(may change).
---@field tool_calls? helix.ToolCall[]
---Tool messages: the `id` of the call this message answers (may change).
---@field tool_call_id? string

---@class helix.ChatRequest
---The system prompt.
---@field system? string
---The conversation so far; the last message is usually the user's.
---@field messages helix.Message[]
---Ask the model for one JSON object; the decoded reply is then in `reply.json`.
---@field json? boolean
---Names of tools the model may ask for (`"fs.read"`, a workflow's custom tools). The
---script runs the calls it gets back in `reply.tool_calls` itself.
---@field tools? string[]
---The model's name at the provider, instead of the agent's model's (may change).
---@field model? string
---Sampling temperature for this call.
---@field temperature? number
---Maximum tokens of the reply.
---@field max_tokens? integer

---@class helix.ToolCall
---The call's id, to answer it with a `tool` message.
---@field id string
---The tool's name.
---@field name string
---The arguments the model gave.
---@field arguments table<string, any>

---@class helix.Usage
---@field input_tokens integer
---@field output_tokens integer

---@class helix.ChatReply
---The reply's text ("" when the model only called tools).
---@field content string
---The reply decoded, when it is JSON (also inside one ```json fence); nil otherwise.
---Ask for JSON with `json = true`.
---@field json any
---The tools the model asked to call, in order (empty when none).
---@field tool_calls helix.ToolCall[]
---Tokens of this call; they count against the task's and the run's budgets.
---@field usage helix.Usage
---Why the reply ended, as the provider says: "stop", "tool_calls", "length"…
---@field finish_reason string

---The agent's model.
---@class helix.Llm
local Llm = {}

---Calls the model once and returns its reply. Each call is one turn of the task (the
---first is turn 1), which the `scripted` provider matches with `turn:`; its tokens count
---against the task's and the run's budgets. A failed call raises an error. Only agents
---can chat: in a tool, this raises an error.
---
---```lua
---local reply = ctx.llm:chat {
---  system = "You review code.",
---  messages = { { role = "user", content = source } },
---  json = true,
---}
---local findings = reply.json and reply.json.findings
---```
---@param request helix.ChatRequest
---@return helix.ChatReply
function Llm:chat(request) end

-------------------------------------------------------------------------------------------
-- ctx.tools: built-in tools
-------------------------------------------------------------------------------------------

---@class helix.fs.ReadArgs
---A path relative to the run's workspace.
---@field path string

---@class helix.fs.ReadResult
---@field path string
---The file's text (files of at most 1 MiB; invalid UTF-8 becomes U+FFFD).
---@field content string

---@class helix.fs.WriteArgs
---A path relative to the run's workspace; parent directories are created.
---@field path string
---@field content string
---Append instead of replacing the file (default false).
---@field append? boolean

---@class helix.fs.WriteResult
---@field path string
---Bytes written.
---@field bytes integer

---@class helix.fs.ListArgs
---A directory relative to the run's workspace (default ".").
---@field path? string
---List subdirectories too (default false).
---@field recursive? boolean

---@class helix.fs.Entry
---@field path string
---@field kind "file"|"dir"|"symlink"|"other"
---@field size integer

---@class helix.fs.ListResult
---@field entries helix.fs.Entry[]
---True when the listing stopped at 10,000 entries.
---@field truncated boolean

---@class helix.fs.SearchArgs
---A plain substring (not a pattern), non-empty.
---@field pattern string
---A file or directory relative to the workspace (default ".").
---@field path? string

---@class helix.fs.Match
---@field path string
---1-based line number.
---@field line integer
---The line (cut at 500 characters).
---@field text string

---@class helix.fs.SearchResult
---@field matches helix.fs.Match[]
---True when the search stopped at 200 matches.
---@field truncated boolean

---The tools a script may call, by name: the built-ins below and the workflow's custom
---tools (`ctx.tools.run_tests { ... }`). A call returns the tool's result; a failed call
---(a missing file, a refused path, bad arguments) raises an error, which `pcall` catches.
---@class helix.Tools
---Reads a UTF-8 text file of the workspace.
---@field ["fs.read"] fun(args: helix.fs.ReadArgs): helix.fs.ReadResult
---Writes a file of the workspace, creating parent directories.
---@field ["fs.write"] fun(args: helix.fs.WriteArgs): helix.fs.WriteResult
---Lists a workspace directory.
---@field ["fs.list"] fun(args?: helix.fs.ListArgs): helix.fs.ListResult
---Finds lines containing a substring in the workspace's text files.
---@field ["fs.search"] fun(args: helix.fs.SearchArgs): helix.fs.SearchResult
---A custom tool declared under the workflow's `tools:`.
---@field [string] fun(args?: table<string, any>): any

-------------------------------------------------------------------------------------------
-- ctx
-------------------------------------------------------------------------------------------

---What an agent or tool can reach while it runs.
---@class helix.Context
---The agent's model.
---@field llm helix.Llm
---Tools by name: `ctx.tools["fs.read"] { path = "app.py" }`.
---@field tools helix.Tools
---The task's persistent scratchpad: `ctx.scratch.key` reads a value, `ctx.scratch.key = v`
---stores one. Values are JSON and kept in the run's journal per task, so they survive
---`helix resume` and retries. A read gives a copy: change a table, then assign it again.
---@field scratch table<string, any>
---Long-term memory, when the workflow declares `memory:` (calling it otherwise raises).
---@field memory helix.Memory
local Context = {}

---@class helix.MemorySearchOptions
---Only memories of this kind (task_summary, error_resolution, fact, or your own).
---@field kind? string
---How many (default 5, at most 50).
---@field k? integer

---@class helix.MemoryHit
---@field id integer
---@field kind string
---@field text string
---Cosine similarity to the query (1 is identical).
---@field score number
---@field metadata table<string, any>

---@class helix.MemoryStoreOptions
---Default "fact".
---@field kind? string
---@field metadata? table<string, any>

---@class helix.MemoryStored
---False when a near-identical memory of the kind was already there.
---@field stored boolean
---@field id? integer
---@field duplicate_of? integer

---@class helix.Memory
local Memory = {}

---Searches long-term memory by meaning: `ctx.memory:search("flaky tests", { k = 3 })`.
---@param query string
---@param options? helix.MemorySearchOptions
---@return helix.MemoryHit[]
function Memory:search(query, options) end

---Stores a memory with this run, task and agent as its provenance.
---@param text string
---@param options? helix.MemoryStoreOptions
---@return helix.MemoryStored
function Memory:store(text, options) end

---Calls a tool by name; the same as `ctx.tools[name](args)`.
---@param name string
---@param args? table<string, any>
---@return any result
function Context:tool(name, args) end

---Renders a minijinja template with `vars`: a template file's path (relative to the
---workflow file; may change) or the template text itself. Undefined variables are errors.
---@param template string
---@param vars? table<string, any>
---@return string
function Context:render(template, vars) end

---Logs a message for this task (where it is shown may change). Note the dot:
---`ctx.log("message")`.
---@param message string
function Context.log(message) end

-------------------------------------------------------------------------------------------
-- helix
-------------------------------------------------------------------------------------------

---The helix script API. A script file ends by returning `helix.agent { ... }` or
---`helix.tool { ... }`.
---@class helix
helix = {}

---Declares a custom agent. Return it from the script:
---
---```lua
---return helix.agent {
---  description = "Summarizes a file",
---  run = function(task, ctx)
---    local file = ctx.tools["fs.read"] { path = task.item }
---    return ctx.llm:chat { messages = { { role = "user", content = file.content } } }.content
---  end,
---}
---```
---@param def helix.AgentDef
---@return helix.Agent
function helix.agent(def) end

---Declares a custom tool. Return it from the script:
---
---```lua
---return helix.tool {
---  description = "Counts the lines of a workspace file",
---  params = { path = { type = "string", description = "A workspace file" } },
---  run = function(args, ctx)
---    local _, n = ctx.tools["fs.read"] { path = args.path }.content:gsub("\n", "")
---    return { lines = n }
---  end,
---}
---```
---@param def helix.ToolDef
---@return helix.Tool
function helix.tool(def) end

---Logs its arguments, converted with `tostring` and separated by spaces (where the
---message is shown may change).
---@param ... any
function helix.log(...) end

---JSON in and out of Lua values.
---@class helix.jsonlib
helix.json = {}

---Encodes a value as JSON text.
---@param value helix.Json
---@return string
function helix.json.encode(value) end

---Decodes JSON text; raises an error when the text is not JSON. JSON `null` becomes nil.
---@param text string
---@return any
function helix.json.decode(text) end

-------------------------------------------------------------------------------------------
-- The sandbox's `os`: only the clock functions are left
-------------------------------------------------------------------------------------------

---In helix scripts `os` holds only `time`, `clock` and `date`.
os = {}

---The fields of a date, as `os.date("*t")` gives them and `os.time` takes them.
---@class helix.osdate
---@field year integer
---@field month integer
---@field day integer
---@field hour? integer
---@field min? integer
---@field sec? integer
---@field wday? integer
---@field yday? integer
---@field isdst? boolean

---The current time in seconds since the epoch, or the time `date` describes.
---@param date? helix.osdate
---@return integer
function os.time(date) end

---CPU time used by the program, in seconds.
---@return number
function os.clock() end

---Formats a time (default: now) with `strftime`-style directives; `"*t"` gives a table.
---@param format? string
---@param time? integer
---@return string|helix.osdate
function os.date(format, time) end
