-- A self-correcting coder, written as a helix custom agent.
--
-- It asks the model for complete files as JSON, writes them to the workspace, and runs the
-- tests through the workflow's `run_tests` tool. While the tests fail and attempts remain,
-- it shows the model the failure and asks again. It returns
--
--   { ok = true|false,        -- did the last attempt pass?
--     attempts = 2,           -- model calls made, at most MAX_ATTEMPTS
--     files = { "app.py" },   -- paths written by the last attempt
--     output = "..." }        -- what the tests (or the checks of the reply) said last
--
-- Failing tests do not fail the task: `ok` says how it went, so a later task can decide
-- (`when: "{{ tasks.fix.output.ok }}"`). Errors that are not the model's doing (no
-- `run_tests` tool, a failed model call) fail the task.
--
-- The `run_tests` tool is the workflow's: any tool (Lua or Rhai) that takes `path` and
-- returns `{ ok = boolean, output = string }`. It is called once per written file, with
-- `{ path = <file> }` plus `functions = inputs.functions` when the workflow has an input
-- named `functions` (see scripts/check.lua).
--
--   tools:
--     run_tests: { script: ../scripts/check.lua }
--   agents:
--     fixer: { script: ../scripts/coder.lua, tools: [fs.read, fs.write, run_tests] }
--
-- Resume: `ctx.scratch.attempts` counts the attempts made and `ctx.scratch.last` keeps the
-- outcome of the latest one, so a resumed task goes on where it stopped, with the failure
-- in hand, instead of starting over with a fresh allowance of attempts.

local MAX_ATTEMPTS = 3

-- Text sent to the model is cut to this many characters.
local MAX_CONTEXT_CHARS = 20000

local SYSTEM = [[
You are a senior software engineer. Write complete, working files for the assignment.
Reply with only a JSON object:
{"files": [{"path": "relative/path.py", "content": "the complete file"}]}
Paths are relative to the workspace. Each file replaces what is there: always send the whole
file, never "..." or "rest unchanged". When tests fail, fix the code, not the tests.]]

-- An empty list that stays a list in JSON (a fresh `{}` would become an object).
local function empty_list()
  return helix.json.decode("[]")
end

local function clip(text)
  if #text <= MAX_CONTEXT_CHARS then
    return text
  end
  return text:sub(1, MAX_CONTEXT_CHARS) .. "\n[... cut]"
end

-- The first user message: the task's prompt and what it is given to work with.
local function assignment(task)
  local parts = { task.prompt or "Write the code the task describes." }
  if task.item ~= nil then
    parts[#parts + 1] = "Item: " .. helix.json.encode(task.item)
  end
  if task.needs and next(task.needs) ~= nil then
    parts[#parts + 1] = "Results of earlier tasks (JSON):\n" .. clip(helix.json.encode(task.needs))
  end
  return table.concat(parts, "\n\n")
end

-- The reply's JSON object (decoded by helix, or from the text here), or nil.
local function reply_object(reply)
  if type(reply.json) == "table" then
    return reply.json
  end
  local text = reply.content or ""
  text = text:match("^%s*```%w*%s*\n(.-)\n%s*```%s*$") or text
  local ok, value = pcall(helix.json.decode, text)
  return ok and type(value) == "table" and value or nil
end

-- The files of a reply as { { path, content } }, or nil and what is wrong with the reply.
local function files_of(reply)
  local object = reply_object(reply)
  if not object or type(object.files) ~= "table" or #object.files == 0 then
    return nil, 'The reply is not a JSON object with a non-empty "files" list.'
  end
  for i, file in ipairs(object.files) do
    if type(file) ~= "table" or type(file.path) ~= "string" or type(file.content) ~= "string" then
      return nil, string.format('files[%d] needs a "path" and a "content", both strings.', i - 1)
    end
  end
  return object.files
end

-- Writes the files, then runs the tests on each. Returns the attempt's outcome:
-- { ok, output, files = { paths written } }.
local function write_and_test(ctx, task, files)
  local written, report, ok = empty_list(), {}, true

  for _, file in ipairs(files) do
    -- A refused path (absolute, `..`) is the model's mistake: it is told, not fatal.
    local wrote, err = pcall(ctx.tools["fs.write"], { path = file.path, content = file.content })
    if wrote then
      written[#written + 1] = file.path
    else
      ok = false
      report[#report + 1] = string.format("cannot write %s: %s", file.path, tostring(err))
    end
  end

  for _, path in ipairs(written) do
    -- Not protected: a broken or missing test tool is not something the model can fix.
    local result = ctx.tools.run_tests { path = path, functions = (task.inputs or {}).functions }
    if type(result) ~= "table" or type(result.ok) ~= "boolean" then
      error("run_tests must return { ok = boolean, output = string }, got " ..
        helix.json.encode(result))
    end
    ok = ok and result.ok
    report[#report + 1] = tostring(result.output or (result.ok and "passed" or "failed"))
  end

  return { ok = ok, output = table.concat(report, "\n"), files = written }
end

-- What the model is told after a failed attempt.
local function feedback(outcome, attempts)
  return string.format(
    "Attempt %d of %d failed:\n\n%s\n\nFix the problem and reply again with the complete files as JSON.",
    attempts, MAX_ATTEMPTS, clip(outcome.output))
end

-- After a resume the model's earlier replies are gone: show it the files as they are now.
local function files_as_they_are(ctx, paths)
  local parts = {}
  for _, path in ipairs(paths or {}) do
    local ok, file = pcall(ctx.tools["fs.read"], { path = path })
    if ok then
      local content = file.content:gsub("\n$", "")
      parts[#parts + 1] = string.format("`%s`:\n```\n%s\n```", path, content)
    end
  end
  return clip(table.concat(parts, "\n\n"))
end

local function result(attempts, outcome)
  return { ok = outcome.ok, attempts = attempts, files = outcome.files, output = outcome.output }
end

return helix.agent {
  description = "Writes code, runs the tests with the run_tests tool, and fixes failures (up to 3 attempts)",

  run = function(task, ctx)
    -- Naming a tool the agent may not use raises an error; say what to do about it.
    if not pcall(function() return ctx.tools.run_tests end) then
      error("this agent needs a tool named `run_tests`: declare one under `tools:` " ..
        "and list it in the agent's `tools`")
    end

    local attempts = ctx.scratch.attempts or 0
    local last = ctx.scratch.last
    -- A resumed task whose work was finished before the interruption.
    if last and (last.ok or attempts >= MAX_ATTEMPTS) then
      return result(attempts, last)
    end

    local first = assignment(task)
    if last then
      first = first .. "\n\nYour earlier attempt wrote these files:\n\n" ..
        files_as_they_are(ctx, last.files) .. "\n\n" .. feedback(last, attempts)
    end
    local messages = { { role = "user", content = first } }
    local outcome = last

    while attempts < MAX_ATTEMPTS do
      -- Counted before the call: a call made (and paid for) is an attempt, even if the
      -- run is interrupted before its files are written.
      attempts = attempts + 1
      ctx.scratch.attempts = attempts

      local reply = ctx.llm:chat { system = SYSTEM, messages = messages, json = true }
      messages[#messages + 1] = { role = "assistant", content = reply.content or "" }

      local files, problem = files_of(reply)
      if files then
        outcome = write_and_test(ctx, task, files)
      else
        outcome = { ok = false, output = problem, files = empty_list() }
      end
      ctx.scratch.last = outcome
      ctx.log(string.format("attempt %d: %s", attempts, outcome.ok and "tests pass" or "tests fail"))

      if outcome.ok then
        return result(attempts, outcome)
      end
      messages[#messages + 1] = { role = "user", content = feedback(outcome, attempts) }
    end

    -- Nil only when a resumed task had used its last attempt without finishing it.
    outcome = outcome or { ok = false, output = "no attempt finished", files = empty_list() }
    return result(attempts, outcome)
  end,
}
