-- A static check of a Python file, written as a helix custom tool.
--
-- Scripts cannot start processes, so this does not run Python: it reads the file with
-- `fs.read` and checks what can be seen in the text. It is the `run_tests` tool of
-- workflows/lua-review.yaml, called by agents and by a `tool:` task alike:
--
--   tools:
--     run_tests: { script: ../scripts/check.lua }
--   tasks:
--     check:
--       tool: run_tests
--       with: { path: app.py, functions: "slugify, main" }
--
-- Result: { ok = true|false, output = "<a report, one line per check>", path = "app.py" }.
-- A file that cannot be read is a failed check (ok = false), not an error, so that an agent
-- calling this tool sees why and can write the file.

-- Lines of `text`, without their line ends.
local function lines_of(text)
  if text:sub(-1) ~= "\n" then
    text = text .. "\n"
  end
  local lines = {}
  for line in text:gmatch("(.-)\r?\n") do
    lines[#lines + 1] = line
  end
  return lines
end

-- A list of names from a list or a comma- or space-separated string ("a, b" or "a b").
local function names_of(value)
  local names = {}
  if type(value) == "string" then
    for name in value:gmatch("[^%s,]+") do
      names[#names + 1] = name
    end
  elseif type(value) == "table" then
    for _, name in ipairs(value) do
      names[#names + 1] = tostring(name)
    end
  end
  return names
end

-- The line number of the top-level `def name(` (or `async def name(`), or nil.
local function definition_line(lines, name)
  for number, line in ipairs(lines) do
    local defined = line:match("^def%s+([%w_]+)%s*%(") or line:match("^async%s+def%s+([%w_]+)%s*%(")
    if defined == name then
      return number
    end
  end
  return nil
end

return helix.tool {
  description = "Check a Python file: it exists, is not empty, defines the given top-level " ..
    "functions and has no forbidden markers such as TODO. Returns {ok, output}.",

  params = {
    path = { type = "string", description = "The Python file, relative to the workspace" },
    functions = {
      type = "string",
      default = "",
      description = "Top-level functions the file must define, comma-separated (e.g. \"slugify, main\")",
    },
    forbid = {
      type = "list",
      default = { "TODO", "FIXME", "NotImplementedError" },
      description = "Text that must not appear in the file",
    },
  },

  run = function(args, ctx)
    local report, failed = {}, 0
    local function check(ok, message)
      report[#report + 1] = (ok and "  ok   " or "  FAIL ") .. message
      if not ok then
        failed = failed + 1
      end
    end
    local function finish()
      local checks = #report
      table.insert(report, 1, "check " .. args.path)
      report[#report + 1] = string.format("%d of %d checks passed", checks - failed, checks)
      return { ok = failed == 0, output = table.concat(report, "\n"), path = args.path }
    end

    local read, file = pcall(ctx.tools["fs.read"], { path = args.path })
    check(read, read and "the file exists" or ("cannot read the file: " .. tostring(file)))
    if not read then
      return finish()
    end

    local content = file.content
    check(content:find("%S") ~= nil, "the file is not empty")

    local lines = lines_of(content)
    for _, name in ipairs(names_of(args.functions)) do
      if not name:match("^[%a_][%w_]*$") then
        check(false, string.format("`%s` is not a Python function name", name))
      else
        local line = definition_line(lines, name)
        check(line ~= nil, line and string.format("defines %s (line %d)", name, line)
          or string.format("defines %s: no top-level `def %s(` found", name, name))
      end
    end

    for _, marker in ipairs(names_of(args.forbid)) do
      local found = nil
      for number, line in ipairs(lines) do
        -- `find` with plain = true: the marker is text, not a pattern.
        if line:find(marker, 1, true) then
          found = number
          break
        end
      end
      check(found == nil, found and string.format("contains %q at line %d", marker, found)
        or string.format("has no %q", marker))
    end

    return finish()
  end,
}
