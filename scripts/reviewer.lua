-- A code reviewer, written as a helix custom agent.
--
-- It reads each file it is given, asks the model for findings as JSON, and returns them:
--
--   { findings = { { file, line, severity, message }, ... },
--     reviewed = { "app.py", ... },                      -- files it reviewed
--     skipped  = { { file = "gone.py", reason = "..." } } } -- files it could not read
--
-- Which files it reviews, in this order of preference:
--   1. `task.item`, in a `for_each` task: a path, or a list of paths;
--   2. every `files` list in the outputs of the tasks this one needs
--      (`task.needs.implement.files`), as paths or as `{ path = ... }` tables;
--   3. the workflow input `files`.
--
-- In a workflow:
--
--   agents:
--     reviewer: { script: ../scripts/reviewer.lua, tools: [fs.read] }
--   tasks:
--     review:
--       needs: [implement]
--       for_each: "{{ tasks.implement.output.files }}"
--       agent: reviewer
--       prompt: Look for bugs and unclear code.     # optional: what to focus on
--
-- Resume: each file's findings are kept in the task's scratchpad with a fingerprint of the
-- content reviewed, so a resumed or retried task does not ask the model again about a file
-- that has not changed. `ctx.scratch.last_reviewed` names the last file reviewed.

local SEVERITIES = { error = true, warning = true, info = true }

-- The system prompt, rendered by `ctx:render` (minijinja) for each file.
local SYSTEM = [[
You are a careful code reviewer. Review the file `{{ file }}` for real defects: bugs,
unhandled errors, security problems, and code that does not do what it claims.
{% if focus %}Focus: {{ focus }}
{% endif %}
Each line of the file is shown with its number. Reply with only a JSON object:
{"findings": [{"file": "{{ file }}", "line": 12, "severity": "error", "message": "what is wrong and why"}]}
severity is "error" (wrong behaviour), "warning" (likely problem) or "info" (style, clarity).
Report each problem once, with the line it is on. No findings is a good answer: {"findings": []}
]]

-- An empty list that stays a list: a fresh `{}` would become the JSON object `{}`, while a
-- decoded `[]` keeps its mark as an array even while empty.
local function empty_list()
  return helix.json.decode("[]")
end

-- Adds the paths found in `value` (a path, a list of paths, or a list of `{ path = ... }`)
-- to `out`, once each.
local function add_paths(out, seen, value)
  if type(value) == "string" then
    value = { value }
  end
  if type(value) ~= "table" then
    return
  end
  for _, entry in ipairs(value) do
    local path = type(entry) == "table" and entry.path or entry
    if type(path) == "string" and path ~= "" and not seen[path] then
      seen[path] = true
      out[#out + 1] = path
    end
  end
end

-- The files to review (see the header).
local function files_to_review(task)
  local files, seen = {}, {}
  add_paths(files, seen, task.item)
  if #files == 0 then
    -- Needed tasks in a fixed order, so the same run always reviews in the same order.
    local ids = {}
    for id in pairs(task.needs or {}) do
      ids[#ids + 1] = id
    end
    table.sort(ids)
    for _, id in ipairs(ids) do
      local output = task.needs[id]
      if type(output) == "table" then
        add_paths(files, seen, output.files)
      end
    end
  end
  if #files == 0 and task.inputs then
    add_paths(files, seen, task.inputs.files)
  end
  return files
end

-- A 32-bit FNV-1a hash of the text: enough to tell whether a file changed since it was
-- reviewed. About 7 VM instructions a byte: a 100 KB file uses 0.7% of the budget.
local function fingerprint(text)
  local hash = 2166136261
  for i = 1, #text do
    hash = ((hash ~ text:byte(i)) * 16777619) & 0xffffffff
  end
  return string.format("%d:%08x", #text, hash)
end

-- The text with a line number in front of each line, so the model can cite lines.
local function numbered(text)
  if text:sub(-1) ~= "\n" then
    text = text .. "\n"
  end
  local lines = {}
  for line in text:gmatch("(.-)\r?\n") do
    lines[#lines + 1] = string.format("%4d | %s", #lines + 1, line)
  end
  return table.concat(lines, "\n")
end

-- A finding as the model gave it, checked and tidied; nil when it has no message.
local function tidy(finding, path)
  if type(finding) ~= "table" or finding.message == nil or finding.message == "" then
    return nil
  end
  local severity = string.lower(tostring(finding.severity or "warning"))
  return {
    file = type(finding.file) == "string" and finding.file or path,
    line = math.tointeger(tonumber(finding.line)), -- nil when absent or not a whole number
    severity = SEVERITIES[severity] and severity or "warning",
    message = tostring(finding.message),
  }
end

-- The reply's JSON object, or nil: `reply.json` when helix decoded it, otherwise the text
-- decoded here (a model may wrap its JSON in a ```json fence).
local function reply_object(reply)
  if type(reply.json) == "table" then
    return reply.json
  end
  local text = reply.content or ""
  text = text:match("^%s*```%w*%s*\n(.-)\n%s*```%s*$") or text
  local ok, value = pcall(helix.json.decode, text)
  if ok and type(value) == "table" then
    return value
  end
  return nil
end

-- Asks the model about one file and returns its findings, tidied. A reply that is not the
-- JSON asked for gets one request to correct it; a second bad reply is an error.
local function review(ctx, task, path, content)
  local messages = {
    {
      role = "user",
      content = string.format("File `%s`:\n\n%s", path, numbered(content)),
    },
  }
  local system = ctx:render(SYSTEM, { file = path, focus = task.prompt or "" })
  for _ = 1, 2 do
    local reply = ctx.llm:chat { system = system, messages = messages, json = true }
    local object = reply_object(reply)
    if object and type(object.findings) == "table" then
      local findings = empty_list()
      for _, finding in ipairs(object.findings) do
        findings[#findings + 1] = tidy(finding, path)
      end
      return findings
    end
    messages[#messages + 1] = { role = "assistant", content = reply.content or "" }
    messages[#messages + 1] = {
      role = "user",
      content = 'That is not the JSON object asked for. Reply with only {"findings": [...]}.',
    }
  end
  error(string.format("the model gave no findings as JSON for %s, twice", path))
end

return helix.agent {
  description = "Reviews files one by one and reports findings as JSON: file, line, severity, message",

  run = function(task, ctx)
    local files = files_to_review(task)
    if #files == 0 then
      error("nothing to review: give the task a for_each over paths, or need a task " ..
        "whose output has a `files` list")
    end

    -- Findings from an earlier attempt of this task, by file: { fingerprint, findings }.
    local done = ctx.scratch.reviewed or {}
    local findings, reviewed, skipped = empty_list(), empty_list(), empty_list()

    for _, path in ipairs(files) do
      -- A file that cannot be read is reported and skipped, not fatal: the others are
      -- still worth reviewing.
      local ok, file = pcall(ctx.tools["fs.read"], { path = path })
      if not ok then
        ctx.log(string.format("skipping %s: %s", path, tostring(file)))
        skipped[#skipped + 1] = { file = path, reason = tostring(file) }
      else
        local stamp = fingerprint(file.content)
        local cached = done[path]
        local found
        if cached and cached.fingerprint == stamp then
          ctx.log(string.format("%s: unchanged since its review, findings kept", path))
          found = cached.findings
        else
          found = review(ctx, task, path, file.content)
          -- A scratchpad value is a copy: update the table, then store it again.
          done[path] = { fingerprint = stamp, findings = found }
          ctx.scratch.reviewed = done
          ctx.scratch.last_reviewed = path
        end
        for _, finding in ipairs(found) do
          findings[#findings + 1] = finding
        end
        reviewed[#reviewed + 1] = path
      end
    end

    ctx.log(string.format("%d finding(s) in %d file(s), %d skipped",
      #findings, #reviewed, #skipped))
    return { findings = findings, reviewed = reviewed, skipped = skipped }
  end,
}
