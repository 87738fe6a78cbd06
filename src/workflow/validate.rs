//! Raw YAML nodes → `Workflow`, collecting every problem in the file as a diagnostic.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::model::*;
use super::spec::{self, Key};
use super::units::{parse_duration, parse_size};
use super::yaml::{self, Node, Value};
use crate::codes::Code;
use crate::diagnostic::{did_you_mean, Diagnostic, Pos, Report};
use crate::prompt;
use crate::scripting::{self, Lang, ScriptSource};

/// The format version this build reads.
pub const FORMAT_VERSION: i64 = 1;

/// Task keys reserved because templates use them as attributes of `tasks.<id>`.
const RESERVED_TASK_KEYS: &[&str] = &["output", "status", "error", "attempts"];

/// Loads and validates a workflow file; on failure the report holds every problem found.
pub fn load(path: &Path) -> Result<Workflow, Report> {
    load_nested(path, &mut Vec::new())
}

fn load_nested(path: &Path, stack: &mut Vec<PathBuf>) -> Result<Workflow, Report> {
    let text = read_text(path).map_err(Report::single)?;
    let mut report = Report::default();
    report.add_source(path, &text);
    let root = match yaml::parse(&text) {
        Ok(root) => root,
        Err(e) => {
            let width = e.pos.map_or(1, |p| token_width(&text, p));
            report
                .push(Diagnostic::new(Code::YamlSyntax, path, e.pos, e.message).with_width(width));
            return Err(report);
        }
    };
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    stack.push(canonical);
    let mut cx = Cx {
        file: path.to_path_buf(),
        dir,
        source: &text,
        line_starts: std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        report,
        templates: Vec::new(),
        stack,
        http_uses: Vec::new(),
    };
    let workflow = cx.workflow(&root, &text);
    cx.stack.pop();
    match workflow {
        Some(w) if cx.report.is_empty() => Ok(w),
        _ => Err(cx.report),
    }
}

/// Reads a file as UTF-8 text, with a clear error for missing, huge or binary files.
pub fn read_text(path: &Path) -> Result<String, Diagnostic> {
    let unreadable = |msg: String| Diagnostic::new(Code::Unreadable, path, None, msg);
    let meta = std::fs::metadata(path)
        .map_err(|e| unreadable(format!("cannot read `{}`: {e}", path.display())))?;
    if meta.is_dir() {
        return Err(unreadable(format!(
            "`{}` is a directory, not a workflow file",
            path.display()
        )));
    }
    if meta.len() > yaml::MAX_FILE_BYTES as u64 {
        return Err(unreadable(format!(
            "`{}` is {} bytes, over the {} MiB limit for workflow files",
            path.display(),
            meta.len(),
            yaml::MAX_FILE_BYTES >> 20
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| unreadable(format!("cannot read `{}`: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() as u32 + 1;
        let col = valid.iter().rev().take_while(|b| **b != b'\n').count() as u32 + 1;
        Diagnostic::new(
            Code::Unreadable,
            path,
            Some(Pos::new(line, col)),
            "the file is not valid UTF-8 text",
        )
    })
}

/// A template field waiting to be checked once all task ids are known.
struct TemplateUse {
    text: String,
    pos: Pos,
    is_expr: bool,
    task: Option<TaskIx>,
    /// Prompts may also read `memory`, `agent` and `task`.
    is_prompt: bool,
    /// Inside a `for_each` task, `item` is defined.
    has_item: bool,
}

struct Cx<'a> {
    file: PathBuf,
    dir: PathBuf,
    source: &'a str,
    /// Byte offset where each line starts, for O(1) line lookups in large files.
    line_starts: Vec<usize>,
    report: Report,
    templates: Vec<TemplateUse>,
    stack: &'a mut Vec<PathBuf>,
    /// Where agents list `http.request`, checked once `http.allow` is known.
    http_uses: Vec<Pos>,
}

/// The entries of a mapping, by known key name.
struct Fields<'n> {
    entries: Vec<(&'static str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, _, v)| *v)
    }

    fn key_node(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, k, _)| *k)
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

impl<'a> Cx<'a> {
    fn err(&mut self, code: Code, pos: Pos, message: impl Into<String>) -> &mut Diagnostic {
        let width = self.token_width(pos);
        self.report
            .push(Diagnostic::new(code, &self.file, Some(pos), message).with_width(width));
        let last = self.report.diagnostics.len() - 1;
        &mut self.report.diagnostics[last]
    }

    /// Underlines the token at `pos` (up to the next delimiter) in the caret excerpt.
    fn token_width(&self, pos: Pos) -> usize {
        token_width(self.source, pos)
    }

    /// The text of a 1-based line, without its line break.
    fn line(&self, line: u32) -> &str {
        let i = line.saturating_sub(1) as usize;
        let Some(&start) = self.line_starts.get(i) else {
            return "";
        };
        let end = self
            .line_starts
            .get(i + 1)
            .map_or(self.source.len(), |e| e - 1);
        self.source[start..end].trim_end_matches('\r')
    }

    fn relative(&self, path: &str) -> PathBuf {
        self.dir.join(path)
    }

    /// Reads a mapping against a key table: unknown keys and missing required keys are reported.
    fn fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        keys: &'static [Key],
    ) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.err(
                Code::WrongType,
                node.pos,
                format!("{what} must be a mapping, found {}", node.type_name()),
            );
            return None;
        };
        let mut fields = Fields {
            entries: Vec::new(),
        };
        for (k, v) in entries {
            let Some(name) = k.as_str() else {
                self.err(
                    Code::WrongType,
                    k.pos,
                    format!("keys of {what} must be strings, found {}", k.type_name()),
                );
                continue;
            };
            match keys.iter().find(|key| key.name == name) {
                Some(key) => fields.entries.push((key.name, k, v)),
                None => {
                    let suggestion = did_you_mean(name, keys.iter().map(|k| k.name));
                    let d = self.err(
                        Code::UnknownKey,
                        k.pos,
                        format!("unknown key `{name}` in {what}"),
                    );
                    match suggestion {
                        Some(s) => d.help = Some(format!("did you mean `{s}`?")),
                        None => {
                            let names: Vec<&str> = keys.iter().map(|k| k.name).collect();
                            d.help = Some(format!("known keys: {}", names.join(", ")));
                        }
                    }
                }
            }
        }
        for key in keys.iter().filter(|k| k.required) {
            if !fields.has(key.name) {
                self.err(
                    Code::MissingKey,
                    node.pos,
                    format!("{what} is missing the required key `{}`", key.name),
                );
            }
        }
        Some(fields)
    }

    /// The entries of a mapping whose keys are user-chosen names.
    fn named_map<'n>(&mut self, node: &'n Node, what: &str) -> Vec<(String, &'n Node, &'n Node)> {
        match &node.value {
            Value::Map(entries) => entries
                .iter()
                .filter_map(|(k, v)| match k.scalar_text() {
                    Some(name) => Some((name, k, v)),
                    None => {
                        self.err(
                            Code::WrongType,
                            k.pos,
                            format!("names in {what} must be strings"),
                        );
                        None
                    }
                })
                .collect(),
            Value::Null => Vec::new(),
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!("{what} must be a mapping, found {}", node.type_name()),
                );
                Vec::new()
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => node.scalar_text(),
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!("{what} must be a string, found {}", node.type_name()),
                );
                None
            }
        }
    }

    fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.value {
            Value::Bool(b) => Some(b),
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!("{what} must be true or false, found {}", node.type_name()),
                );
                None
            }
        }
    }

    fn positive(&mut self, node: &Node, what: &str) -> Option<u64> {
        match node.value {
            Value::Int(i) if i > 0 => Some(i as u64),
            Value::Int(i) => {
                self.err(
                    Code::InvalidValue,
                    node.pos,
                    format!("{what} must be a positive integer, found {i}"),
                );
                None
            }
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!(
                        "{what} must be a positive integer, found {}",
                        node.type_name()
                    ),
                );
                None
            }
        }
    }

    fn number(&mut self, node: &Node, what: &str) -> Option<f64> {
        match node.value {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!("{what} must be a number, found {}", node.type_name()),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<std::time::Duration> {
        let text = match &node.value {
            Value::Str(s) => s.clone(),
            Value::Int(_) | Value::Float(_) => node.scalar_text()?,
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!(
                        "{what} must be a duration like `30s`, found {}",
                        node.type_name()
                    ),
                );
                return None;
            }
        };
        match parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(Code::Duration, node.pos, format!("invalid {what}: {e}"));
                None
            }
        }
    }

    fn size(&mut self, node: &Node, what: &str) -> Option<u64> {
        let text = match &node.value {
            Value::Str(s) => s.clone(),
            Value::Int(_) => node.scalar_text()?,
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!(
                        "{what} must be a size like `512MiB`, found {}",
                        node.type_name()
                    ),
                );
                return None;
            }
        };
        match parse_size(&text) {
            Ok(n) => Some(n),
            Err(e) => {
                self.err(Code::Size, node.pos, format!("invalid {what}: {e}"));
                None
            }
        }
    }

    /// A list of strings; a single string counts as a one-item list.
    fn str_list(&mut self, node: &Node, what: &str) -> Vec<(String, Pos)> {
        match &node.value {
            Value::Str(s) => vec![(s.clone(), node.pos)],
            Value::Seq(items) => items
                .iter()
                .filter_map(|item| {
                    self.string(item, &format!("each entry of {what}"))
                        .map(|s| (s, item.pos))
                })
                .collect(),
            Value::Null => Vec::new(),
            _ => {
                self.err(
                    Code::WrongType,
                    node.pos,
                    format!(
                        "{what} must be a list of strings, found {}",
                        node.type_name()
                    ),
                );
                Vec::new()
            }
        }
    }

    fn one_of(&mut self, node: &Node, what: &str, allowed: &[&str]) -> Option<String> {
        let value = self.string(node, what)?;
        if allowed.contains(&value.as_str()) {
            return Some(value);
        }
        let suggestion = did_you_mean(&value, allowed.iter().copied());
        let d = self.err(
            Code::InvalidValue,
            node.pos,
            format!("invalid {what} `{value}`"),
        );
        d.help = Some(match suggestion {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("expected one of: {}", allowed.join(", ")),
        });
        None
    }

    fn template(
        &mut self,
        node: &Node,
        what: &str,
        task: Option<TaskIx>,
        has_item: bool,
        is_prompt: bool,
    ) -> Option<String> {
        let text = self.string(node, what)?;
        self.templates.push(TemplateUse {
            text: text.clone(),
            pos: node.pos,
            is_expr: false,
            task,
            is_prompt,
            has_item,
        });
        Some(text)
    }

    fn workflow(&mut self, root: &Node, text: &str) -> Option<Workflow> {
        if !matches!(root.value, Value::Map(_)) {
            self.err(
                Code::WrongType,
                root.pos,
                format!(
                    "a workflow must be a mapping with `helix: 1`, `name` and `tasks`, found {}",
                    root.type_name()
                ),
            );
            return None;
        }
        let fields = self.fields(root, "the workflow", spec::TOP_KEYS)?;
        match fields.get("helix") {
            Some(n) => match n.value {
                Value::Int(FORMAT_VERSION) => {}
                Value::Int(v) if v > FORMAT_VERSION => {
                    self.err(Code::Version, n.pos, format!("format version {v} is newer than this helix understands (it reads version {FORMAT_VERSION})"))
                        .help = Some("upgrade helix, or write `helix: 1`".into());
                }
                _ => {
                    self.err(
                        Code::Version,
                        n.pos,
                        format!(
                            "unsupported format version `{}`",
                            n.scalar_text().unwrap_or_default()
                        ),
                    )
                    .help = Some("write `helix: 1`".into());
                }
            },
            None => {
                // Reported as a missing key by `fields`; add the version-specific hint.
                if let Some(d) = self
                    .report
                    .diagnostics
                    .iter_mut()
                    .rev()
                    .find(|d| d.message.contains("`helix`"))
                {
                    d.code = Code::Version;
                    d.help = Some("add `helix: 1` as the first line".into());
                }
            }
        }
        let name = fields
            .get("name")
            .and_then(|n| self.string(n, "`name`"))
            .unwrap_or_default();
        let description = fields
            .get("description")
            .and_then(|n| self.string(n, "`description`"));
        let inputs = fields
            .get("inputs")
            .map(|n| self.inputs(n))
            .unwrap_or_default();
        let models = fields
            .get("models")
            .map(|n| self.models(n))
            .unwrap_or_default();
        let tools = fields
            .get("tools")
            .map(|n| self.tools(n))
            .unwrap_or_default();
        let agents = fields
            .get("agents")
            .map(|n| self.agents(n, &models, &tools))
            .unwrap_or_default();
        let sandbox = fields
            .get("sandbox")
            .map(|n| self.sandbox(n))
            .unwrap_or_default();
        let secrets: Vec<String> = fields
            .get("secrets")
            .map(|n| {
                self.str_list(n, "`secrets`")
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect()
            })
            .unwrap_or_default();
        let env = fields
            .get("env")
            .map(|n| self.env_decl(n))
            .unwrap_or_default();
        let budget = fields
            .get("budget")
            .map(|n| self.budget(n))
            .unwrap_or_default();
        let schedule = fields.get("schedule").and_then(|n| self.schedule(n));
        let history = fields
            .get("history")
            .map(|n| self.history(n))
            .unwrap_or_default();
        let memory = fields.get("memory").map(|n| {
            if let Some(f) = self.fields(n, "`memory`", spec::MEMORY_KEYS) {
                if let Some(e) = f.get("embedder") {
                    let name = self.string(e, "`memory.embedder`");
                    if let Some(name) = name.filter(|n| n != "builtin" && !models.contains_key(n)) {
                        self.err(
                            Code::UnknownName,
                            e.pos,
                            format!("`memory.embedder` names model `{name}`, which is not declared under `models:`"),
                        )
                        .help = Some("use `builtin` (the offline embedder) or declare the embedding model under `models:`".into());
                    }
                }
                if let Some(d) = f.get("dimensions") {
                    self.positive(d, "`memory.dimensions`");
                }
            }
            n.to_json()
        });
        let concurrency = fields
            .get("concurrency")
            .map(|n| self.concurrency(n))
            .unwrap_or_default();
        let http_allow: Vec<String> = fields
            .get("http")
            .and_then(|n| self.fields(n, "`http`", spec::HTTP_KEYS))
            .and_then(|f| f.get("allow"))
            .map(|n| {
                self.str_list(n, "`http.allow`")
                    .into_iter()
                    .map(|(h, _)| h.to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        if http_allow.is_empty() {
            for pos in std::mem::take(&mut self.http_uses) {
                self.err(Code::InvalidValue, pos, "`http.request` can reach no host: the workflow has no `http: { allow: [...] }`")
                    .help = Some("list the hosts agents may call, e.g. `http: { allow: [api.github.com] }`".into());
            }
        }

        let mut w = Workflow {
            file: self.file.clone(),
            dir: self.dir.clone(),
            source: text.to_string(),
            hash: hex_sha256(text.as_bytes()),
            name,
            description,
            inputs,
            models,
            agents,
            tools,
            sandbox,
            secrets,
            env,
            budget,
            schedule,
            history,
            memory: memory.unwrap_or(Json::Null),
            concurrency,
            http_allow,
            tasks: Vec::new(),
            roots: Vec::new(),
            index: HashMap::new(),
        };
        let mut pending_needs = Vec::new();
        if let Some(tasks) = fields.get("tasks") {
            if matches!(&tasks.value, Value::Map(m) if m.is_empty())
                || matches!(tasks.value, Value::Null)
            {
                self.err(
                    Code::InvalidValue,
                    tasks.pos,
                    "`tasks` is empty; a workflow needs at least one task",
                );
            }
            w.roots = self.tasks(tasks, None, &mut w, &mut pending_needs);
        }
        w.index = w
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        self.resolve_needs(&mut w, pending_needs);
        self.check_cycles(&w);
        self.check_templates(&w);
        Some(w)
    }

    fn inputs(&mut self, node: &Node) -> IndexMap<String, InputDecl> {
        let mut out = IndexMap::new();
        for (name, key, value) in self.named_map(node, "`inputs`") {
            let what = format!("input `{name}`");
            check_name(self, &name, key.pos, "input");
            // `name: string` is shorthand for `name: { type: string }`.
            if let Value::Str(t) = &value.value {
                match InputType::parse(t) {
                    Some(ty) => {
                        out.insert(
                            name,
                            InputDecl {
                                ty,
                                default: None,
                                choices: None,
                                description: None,
                            },
                        );
                    }
                    None => {
                        let suggestion = did_you_mean(t, InputType::NAMES.iter().copied());
                        let d = self.err(
                            Code::InvalidValue,
                            value.pos,
                            format!("unknown type `{t}` for {what}"),
                        );
                        d.help = Some(match suggestion {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("types: {}", InputType::NAMES.join(", ")),
                        });
                    }
                }
                continue;
            }
            let Some(f) = self.fields(value, &what, spec::INPUT_KEYS) else {
                continue;
            };
            let ty = match f.get("type") {
                Some(n) => match self.one_of(n, &format!("type of {what}"), InputType::NAMES) {
                    Some(t) => InputType::parse(&t).unwrap_or(InputType::String),
                    None => continue,
                },
                None => InputType::String,
            };
            let default = f.get("default").map(Node::to_json);
            if let (Some(d), Some(n)) = (&default, f.get("default")) {
                if !ty.accepts(d) {
                    self.err(
                        Code::WrongType,
                        n.pos,
                        format!(
                            "the default of {what} must be {}, found {}",
                            ty.name(),
                            n.type_name()
                        ),
                    );
                }
            }
            let choices = f.get("enum").and_then(|n| match &n.value {
                Value::Seq(items) => Some(items.iter().map(Node::to_json).collect::<Vec<_>>()),
                _ => {
                    self.err(
                        Code::WrongType,
                        n.pos,
                        format!("`enum` of {what} must be a list"),
                    );
                    None
                }
            });
            if let (Some(c), Some(d), Some(n)) = (&choices, &default, f.get("default")) {
                if !c.contains(d) {
                    self.err(
                        Code::InvalidValue,
                        n.pos,
                        format!("the default of {what} is not one of its `enum` values"),
                    );
                }
            }
            let description = f
                .get("description")
                .and_then(|n| self.string(n, "`description`"));
            out.insert(
                name,
                InputDecl {
                    ty,
                    default,
                    choices,
                    description,
                },
            );
        }
        out
    }

    fn models(&mut self, node: &Node) -> IndexMap<String, ModelDecl> {
        let mut out = IndexMap::new();
        for (name, _, value) in self.named_map(node, "`models`") {
            let what = format!("model `{name}`");
            let Some(f) = self.fields(value, &what, spec::MODEL_KEYS) else {
                continue;
            };
            let provider = f
                .get("provider")
                .and_then(|n| {
                    self.one_of(
                        n,
                        &format!("provider of {what}"),
                        &["openai", "anthropic", "ollama", "scripted", "replay"],
                    )
                })
                .unwrap_or_default();
            let model = f.get("model").and_then(|n| self.string(n, "`model`"));
            if let Some(n) = f.get("temperature") {
                self.number(n, "`temperature`");
            }
            for k in ["max_tokens", "concurrency", "rpm"] {
                if let Some(n) = f.get(k) {
                    self.positive(n, &format!("`{k}`"));
                }
            }
            if let Some(n) = f.get("timeout") {
                self.duration(n, "`timeout`");
            }
            if let Some(n) = f.get("price") {
                if let Some(p) = self.fields(n, "`price`", spec::PRICE_KEYS) {
                    for k in ["input", "output"] {
                        if let Some(v) = p.get(k) {
                            self.number(v, "a price");
                        }
                    }
                }
            }
            if matches!(provider.as_str(), "scripted" | "replay") {
                match f.get("file") {
                    Some(n) => {
                        if let Some(file) = self.string(n, "`file`") {
                            if provider == "scripted" && !self.relative(&file).is_file() {
                                self.err(
                                    Code::MissingFile,
                                    n.pos,
                                    format!(
                                        "replies file `{file}` not found (relative to {})",
                                        self.dir.display()
                                    ),
                                );
                            }
                        }
                    }
                    None => {
                        self.err(
                            Code::MissingKey,
                            value.pos,
                            format!("{what} uses the `{provider}` provider and needs `file`"),
                        );
                    }
                }
            }
            out.insert(
                name,
                ModelDecl {
                    provider,
                    model,
                    settings: value.to_json(),
                },
            );
        }
        out
    }

    fn tools(&mut self, node: &Node) -> IndexMap<String, ToolDecl> {
        let mut out = IndexMap::new();
        for (name, key, value) in self.named_map(node, "`tools`") {
            let what = format!("tool `{name}`");
            if crate::tools::is_builtin(&name) {
                self.err(
                    Code::InvalidValue,
                    key.pos,
                    format!("`{name}` is a built-in tool; choose another name"),
                );
            }
            let Some(f) = self.fields(value, &what, spec::TOOL_KEYS) else {
                continue;
            };
            let script = f.get("script").and_then(|n| self.script_file(n, &what));
            let description = f
                .get("description")
                .and_then(|n| self.string(n, "`description`"));
            let params = f.get("params").map(|n| {
                for (pname, _, pnode) in self.named_map(n, "`params`") {
                    self.fields(pnode, &format!("parameter `{pname}`"), spec::PARAM_KEYS);
                }
                n.to_json()
            });
            if let Some(script) = script {
                // A Lua tool declares itself (`helix.tool{description, params}`); the YAML
                // may override either.
                let loaded = f
                    .get("script")
                    .and_then(|n| self.lua_kind(&script, n.pos, "tool"));
                let description =
                    description.or_else(|| loaded.as_ref().map(|l| l.description.clone()));
                let params = params
                    .or_else(|| loaded.map(|l| l.params))
                    .unwrap_or(Json::Null);
                out.insert(
                    name,
                    ToolDecl {
                        script,
                        description,
                        params,
                    },
                );
            }
        }
        out
    }

    /// A `.lua`/`.rhai` file that must exist and compile.
    fn script_file(&mut self, node: &Node, what: &str) -> Option<PathBuf> {
        let file = self.string(node, &format!("script of {what}"))?;
        let path = self.relative(&file);
        let Some(lang) = Lang::from_path(&path) else {
            self.err(
                Code::InvalidValue,
                node.pos,
                format!("script `{file}` of {what} must end in .lua or .rhai"),
            );
            return None;
        };
        match std::fs::read_to_string(&path) {
            Ok(code) => {
                let source = ScriptSource {
                    lang,
                    code,
                    name: path.display().to_string(),
                    first_line: 1,
                };
                self.check_script(&source, node.pos, Some(&path));
                Some(path)
            }
            Err(e) => {
                self.err(
                    Code::MissingFile,
                    node.pos,
                    format!("script `{file}` {}", io_problem(&e)),
                )
                .help = Some(format!("paths are relative to {}", self.dir.display()));
                None
            }
        }
    }

    /// Loads a Lua script (sandboxed) to check it returns `helix.agent{}` or `helix.tool{}`.
    fn lua_kind(
        &mut self,
        path: &Path,
        pos: Pos,
        want: &str,
    ) -> Option<scripting::lua_api::Loaded> {
        if Lang::from_path(path) != Some(Lang::Lua) {
            return None;
        }
        let code = std::fs::read_to_string(path).ok()?;
        let source = ScriptSource {
            lang: Lang::Lua,
            code,
            name: path.display().to_string(),
            first_line: 1,
        };
        match scripting::lua_api::inspect(&source) {
            Ok(loaded) => {
                let is = match loaded.kind {
                    scripting::lua_api::Kind::Agent => "agent",
                    scripting::lua_api::Kind::Tool => "tool",
                };
                if is != want {
                    self.err(
                        Code::InvalidValue,
                        pos,
                        format!(
                            "`{}` defines {} (helix.{is}{{…}}), but it is used as {}",
                            path.display(),
                            article(is),
                            article(want)
                        ),
                    );
                    return None;
                }
                Some(loaded)
            }
            Err(e) if e.kind == scripting::ScriptErrorKind::Syntax => None, // reported by check_script
            Err(e) => {
                self.err(
                    Code::ScriptSyntax,
                    pos,
                    format!("script cannot be loaded: {e}"),
                );
                None
            }
        }
    }

    /// Compiles a script; an error points at its line, in the script file or (for inline
    /// code) in the workflow.
    fn check_script(&mut self, source: &ScriptSource, pos: Pos, file: Option<&Path>) {
        let Err(e) = scripting::check_syntax(source) else {
            return;
        };
        let code_lines = source.code.lines().count().max(1) as u32;
        let first = source.first_line;
        // Engines may report the line after the last one for an unexpected end of input.
        let line = e.line.map(|l| l.clamp(first, first + code_lines - 1));
        let message = format!("script does not compile: {}", e.message);
        let column_of = |text: &str, line: u32| {
            let l = text
                .lines()
                .nth(line.saturating_sub(1) as usize)
                .unwrap_or("");
            (l.chars().take_while(|c| c.is_whitespace()).count() + 1) as u32
        };
        match (file, line) {
            (Some(path), line) => {
                let at = line.map(|l| Pos::new(l, column_of(&source.code, l)));
                let d = Diagnostic::new(Code::ScriptSyntax, path, at, message).with_note(format!(
                    "used by `script:` at {}:{}:{}",
                    self.file.display(),
                    pos.line,
                    pos.col
                ));
                self.report.add_source(path, &source.code);
                self.report.push(d);
            }
            (None, Some(l)) => {
                let at = Pos::new(l, column_of(self.source, l));
                self.err(Code::ScriptSyntax, at, message);
            }
            (None, None) => {
                self.err(Code::ScriptSyntax, pos, message);
            }
        }
    }

    fn agents(
        &mut self,
        node: &Node,
        models: &IndexMap<String, ModelDecl>,
        tools: &IndexMap<String, ToolDecl>,
    ) -> IndexMap<String, AgentDecl> {
        let mut out = IndexMap::new();
        for (name, _, value) in self.named_map(node, "`agents`") {
            let what = format!("agent `{name}`");
            let Some(f) = self.fields(value, &what, spec::AGENT_KEYS) else {
                continue;
            };
            for k in ["role", "goal", "backstory"] {
                if let Some(n) = f.get(k) {
                    self.template(n, &format!("`{k}`"), None, false, true);
                }
            }
            let prompt = f.get("prompt").and_then(|n| self.prompt_ref(n));
            let script = f.get("script").and_then(|n| self.script_file(n, &what));
            if let (Some(path), Some(n)) = (&script, f.get("script")) {
                if Lang::from_path(path) != Some(Lang::Lua) {
                    self.err(
                        Code::InvalidValue,
                        n.pos,
                        format!("{what}: custom agents are written in Lua (.lua)"),
                    );
                } else {
                    self.lua_kind(path, n.pos, "agent");
                }
            }
            let model_node = f.get("model");
            let model = model_node
                .and_then(|n| self.string(n, "`model`"))
                .unwrap_or_else(|| "default".into());
            // A scripted agent needs a model only if it names one (for `ctx.llm`).
            if (script.is_none() || model_node.is_some()) && !models.contains_key(&model) {
                let pos = model_node.map(|n| n.pos).unwrap_or(value.pos);
                let suggestion = did_you_mean(&model, models.keys().map(String::as_str));
                let d = self.err(
                    Code::UnknownName,
                    pos,
                    format!("{what} uses model `{model}`, which is not declared under `models:`"),
                );
                d.help = Some(match suggestion {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "declare it, e.g. `models: { default: { provider: openai, model: gpt-4o-mini } }`".into(),
                });
            }
            let mut tool_names = Vec::new();
            if let Some(n) = f.get("tools") {
                for (t, pos) in self.str_list(n, "`tools`") {
                    let agent_only = crate::agents::AGENT_TOOLS.contains(&t.as_str());
                    if t == "http.request" {
                        self.http_uses.push(pos);
                    }
                    if !crate::tools::is_builtin(&t) && !agent_only && !tools.contains_key(&t) {
                        let known: Vec<&str> = crate::tools::builtins()
                            .iter()
                            .map(|b| b.name)
                            .chain(crate::agents::AGENT_TOOLS.iter().copied())
                            .chain(tools.keys().map(String::as_str))
                            .collect();
                        let suggestion = did_you_mean(&t, known.iter().copied());
                        let d = self.err(
                            Code::UnknownName,
                            pos,
                            format!("unknown tool `{t}` in {what}"),
                        );
                        d.help = Some(match suggestion {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("known tools: {}", known.join(", ")),
                        });
                    }
                    tool_names.push(t);
                }
            }
            let max_turns = f
                .get("max_turns")
                .and_then(|n| self.positive(n, "`max_turns`"))
                .unwrap_or(10) as u32;
            let token_budget = f.get("budget").and_then(|n| self.token_budget(n));
            let json_tools = f
                .get("tool_protocol")
                .and_then(|n| self.one_of(n, "`tool_protocol`", &["native", "json"]))
                .is_some_and(|p| p == "json");
            out.insert(
                name,
                AgentDecl {
                    role: f.get("role").and_then(|n| n.scalar_text()),
                    goal: f.get("goal").and_then(|n| n.scalar_text()),
                    backstory: f.get("backstory").and_then(|n| n.scalar_text()),
                    prompt,
                    tools: tool_names,
                    model,
                    max_turns,
                    json_tools,
                    token_budget,
                    script,
                    description: f.get("description").and_then(|n| n.scalar_text()),
                },
            );
        }
        out
    }

    fn prompt_ref(&mut self, node: &Node) -> Option<PromptRef> {
        let text = self.string(node, "`prompt`")?;
        let looks_like_file = !text.contains('\n')
            && [".j2", ".jinja", ".md", ".txt"]
                .iter()
                .any(|ext| text.ends_with(ext));
        if looks_like_file {
            let path = self.relative(&text);
            match std::fs::read_to_string(&path) {
                Ok(body) => {
                    // Parse with includes resolved from the template's own directory.
                    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                    let env = prompt::environment(Some(&base));
                    if let Err(e) = prompt::check(&env, &body, false) {
                        let line = e.line.map(|l| format!(":{l}")).unwrap_or_default();
                        self.err(
                            Code::TemplateSyntax,
                            node.pos,
                            format!("template `{text}{line}` does not parse: {}", e.message),
                        );
                    }
                    Some(PromptRef::File(path))
                }
                Err(e) => {
                    self.err(
                        Code::MissingFile,
                        node.pos,
                        format!("prompt template `{text}` {}", io_problem(&e)),
                    )
                    .help = Some(format!("paths are relative to {}", self.dir.display()));
                    None
                }
            }
        } else {
            self.templates.push(TemplateUse {
                text: text.clone(),
                pos: node.pos,
                is_expr: false,
                task: None,
                is_prompt: true,
                has_item: false,
            });
            Some(PromptRef::Inline(text))
        }
    }

    fn sandbox(&mut self, node: &Node) -> SandboxChoice {
        if let Value::Str(s) = &node.value {
            if s == "host" {
                return SandboxChoice::Host;
            }
            self.err(
                Code::InvalidValue,
                node.pos,
                format!("`sandbox` must be `host` or a profile mapping, found `{s}`"),
            );
            return SandboxChoice::Unset;
        }
        let reported = self.report.diagnostics.len();
        let Some(f) = self.fields(node, "`sandbox`", spec::SANDBOX_KEYS) else {
            return SandboxChoice::Unset;
        };
        for (name, _, v) in &f.entries {
            let what = format!("`sandbox.{name}`");
            match *name {
                "memory" | "output_limit" | "tmp" => {
                    self.size(v, &what);
                }
                "timeout" => {
                    self.duration(v, &what);
                }
                "pids" | "pool" => {
                    self.positive(v, &what);
                }
                "cpus" => {
                    if self.number(v, &what).is_some_and(|c| c <= 0.0) {
                        self.err(Code::InvalidValue, v.pos, "`sandbox.cpus` must be positive");
                    }
                }
                "read_only" => {
                    self.bool(v, &what);
                }
                "network" => {
                    self.one_of(v, &what, &["none", "bridge", "host"]);
                }
                "mounts" => {
                    self.str_list(v, &what);
                }
                "env" => {
                    self.named_map(v, &what);
                }
                _ => {
                    self.string(v, &what);
                }
            }
        }
        let profile = node.to_json();
        // What the key checks above did not already report (mount shapes, for one).
        let checked = self.report.diagnostics.len() == reported;
        if let (true, Err(message)) = (
            checked,
            crate::sandbox::Profile::from_json(&profile, Path::new(".")),
        ) {
            self.err(
                Code::InvalidValue,
                node.pos,
                format!("sandbox profile: {message}"),
            );
        }
        SandboxChoice::Profile(profile)
    }

    fn env_decl(&mut self, node: &Node) -> IndexMap<String, Option<String>> {
        match &node.value {
            Value::Map(_) => self
                .named_map(node, "`env`")
                .into_iter()
                .map(|(name, _, v)| {
                    let default = match v.value {
                        Value::Null => None,
                        _ => self.string(v, &format!("default of env `{name}`")),
                    };
                    (name, default)
                })
                .collect(),
            _ => self
                .str_list(node, "`env`")
                .into_iter()
                .map(|(s, _)| (s, None))
                .collect(),
        }
    }

    fn token_budget(&mut self, node: &Node) -> Option<u64> {
        let f = self.fields(node, "`budget`", spec::TOKEN_BUDGET_KEYS)?;
        f.get("tokens")
            .and_then(|n| self.positive(n, "`budget.tokens`"))
    }

    fn budget(&mut self, node: &Node) -> Budget {
        let mut b = Budget::default();
        if let Some(f) = self.fields(node, "`budget`", spec::BUDGET_KEYS) {
            b.tokens = f
                .get("tokens")
                .and_then(|n| self.positive(n, "`budget.tokens`"));
            b.usd = f.get("usd").and_then(|n| self.number(n, "`budget.usd`"));
            b.wall = f
                .get("wall")
                .and_then(|n| self.duration(n, "`budget.wall`"));
        }
        b
    }

    fn schedule(&mut self, node: &Node) -> Option<Schedule> {
        let f = self.fields(node, "`schedule`", spec::SCHEDULE_KEYS)?;
        let cron_node = f.get("cron")?;
        let cron = self.string(cron_node, "`schedule.cron`")?;
        if let Err(e) = crate::workflow::cron_check(&cron) {
            self.err(
                Code::Cron,
                cron_node.pos,
                format!("invalid cron expression `{cron}`: {e}"),
            )
            .help = Some(
                "five fields: minute hour day-of-month month day-of-week, e.g. `*/15 * * * *`"
                    .into(),
            );
        }
        let overlap = f
            .get("overlap")
            .and_then(|n| self.one_of(n, "`schedule.overlap`", &["skip", "queue", "allow"]))
            .unwrap_or_else(|| "skip".into());
        let catchup = f
            .get("catchup")
            .and_then(|n| self.one_of(n, "`schedule.catchup`", &["none", "latest", "all"]))
            .unwrap_or_else(|| "none".into());
        Some(Schedule {
            cron,
            overlap,
            catchup,
        })
    }

    fn history(&mut self, node: &Node) -> History {
        let mut h = History::default();
        if let Some(f) = self.fields(node, "`history`", spec::HISTORY_KEYS) {
            h.keep_days = f
                .get("keep_days")
                .and_then(|n| self.positive(n, "`history.keep_days`"))
                .map(|n| n.min(u32::MAX as u64) as u32);
            h.keep_runs = f
                .get("keep_runs")
                .and_then(|n| self.positive(n, "`history.keep_runs`"))
                .map(|n| n.min(u32::MAX as u64) as u32);
        }
        h
    }

    fn concurrency(&mut self, node: &Node) -> IndexMap<String, usize> {
        let mut out = IndexMap::new();
        for (name, _, v) in self.named_map(node, "`concurrency`") {
            if let Some(n) = self.positive(v, &format!("concurrency limit `{name}`")) {
                out.insert(name, n.min(usize::MAX as u64) as usize);
            }
        }
        out
    }

    /// Reads a `tasks:` map; returns the indices of its direct children.
    fn tasks(
        &mut self,
        node: &Node,
        parent: Option<TaskIx>,
        w: &mut Workflow,
        needs: &mut Vec<(TaskIx, Vec<(String, Pos)>)>,
    ) -> Vec<TaskIx> {
        let mut children = Vec::new();
        for (key, key_node, value) in self.named_map(node, "`tasks`") {
            check_name(self, &key, key_node.pos, "task");
            if RESERVED_TASK_KEYS.contains(&key.as_str()) {
                self.err(
                    Code::InvalidValue,
                    key_node.pos,
                    format!("`{key}` cannot be a task id: templates use it as `tasks.<id>.{key}`"),
                );
            }
            let id = match parent {
                Some(p) => format!("{}.{key}", w.tasks[p].id),
                None => key.clone(),
            };
            if let Some(ix) = self.task(&id, key_node.pos, value, parent, w, needs) {
                children.push(ix);
            }
        }
        children
    }

    fn task(
        &mut self,
        id: &str,
        pos: Pos,
        node: &Node,
        parent: Option<TaskIx>,
        w: &mut Workflow,
        needs: &mut Vec<(TaskIx, Vec<(String, Pos)>)>,
    ) -> Option<TaskIx> {
        let what = format!("task `{id}`");
        let f = self.fields(node, &what, spec::TASK_KEYS)?;
        let kinds: Vec<&str> = spec::KIND_KEYS
            .iter()
            .copied()
            .filter(|k| f.has(k))
            .collect();
        if kinds.is_empty() {
            self.err(Code::TaskKind, pos, format!("{what} has no kind"))
                .help = Some("give it exactly one of: agent, run, script, tool, workflow, approve, or a `tasks:` group".into());
        } else if kinds.len() > 1 {
            let second = f.key_node(kinds[1]).map(|n| n.pos).unwrap_or(pos);
            self.err(
                Code::TaskKind,
                second,
                format!("{what} has two kinds: `{}` and `{}`", kinds[0], kinds[1]),
            )
            .help = Some(
                "a task is exactly one kind; split it into two tasks joined by `needs:`".into(),
            );
        }
        let ix = w.tasks.len();
        let has_item = f.has("for_each");
        let inherited_sandbox = parent
            .map(|p| w.tasks[p].sandbox.clone())
            .unwrap_or_else(|| w.sandbox.clone());
        let mut decl = TaskDecl {
            id: id.to_string(),
            pos,
            parent,
            children: Vec::new(),
            needs: Vec::new(),
            when: None,
            for_each: None,
            max_parallel: None,
            retry: Retry::default(),
            timeout: None,
            continue_on_error: false,
            concurrency: None,
            output: None,
            // A task's profile mapping overrides keys of the profile it inherits.
            sandbox: match (f.get("sandbox").map(|n| self.sandbox(n)), inherited_sandbox) {
                (None, inherited) => inherited,
                (
                    Some(SandboxChoice::Profile(Json::Object(own))),
                    SandboxChoice::Profile(Json::Object(mut base)),
                ) => {
                    base.extend(own);
                    SandboxChoice::Profile(Json::Object(base))
                }
                (Some(own), _) => own,
            },
            kind: TaskKind::Group,
        };
        if let Some(n) = f.get("needs") {
            needs.push((ix, self.str_list(n, "`needs`")));
        }
        for (k, is_expr) in [("when", true), ("for_each", true)] {
            if let Some(n) = f.get(k) {
                if let Some(text) = self.string(n, &format!("`{k}`")) {
                    self.templates.push(TemplateUse {
                        text: text.clone(),
                        pos: n.pos,
                        is_expr,
                        task: Some(ix),
                        is_prompt: false,
                        has_item: false,
                    });
                    if k == "when" {
                        decl.when = Some(text)
                    } else {
                        decl.for_each = Some(text)
                    }
                }
            }
        }
        if let Some(n) = f.get("max_parallel") {
            decl.max_parallel = self
                .positive(n, "`max_parallel`")
                .map(|v| v.min(usize::MAX as u64) as usize);
            if !has_item {
                self.err(
                    Code::InvalidValue,
                    n.pos,
                    "`max_parallel` applies to `for_each` fan-outs",
                );
            }
        }
        if let Some(n) = f.get("retry") {
            decl.retry = self.retry(n);
        }
        decl.timeout = f.get("timeout").and_then(|n| self.duration(n, "`timeout`"));
        decl.continue_on_error = f
            .get("continue_on_error")
            .and_then(|n| self.bool(n, "`continue_on_error`"))
            .unwrap_or(false);
        if let Some(n) = f.get("concurrency") {
            if let Some(name) = self.string(n, "`concurrency`") {
                if !w.concurrency.contains_key(&name) {
                    let suggestion = did_you_mean(&name, w.concurrency.keys().map(String::as_str));
                    let d = self.err(
                        Code::UnknownName,
                        n.pos,
                        format!("concurrency limit `{name}` is not declared"),
                    );
                    d.help = Some(match suggestion {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => {
                            format!("declare it at the top level: `concurrency: {{ {name}: 2 }}`")
                        }
                    });
                }
                decl.concurrency = Some(name);
            }
        }
        if let Some(n) = f.get("output") {
            decl.output = self.output(n);
        }
        let applies = |cx: &mut Cx, key: &str, kinds_ok: &[&str]| {
            if let Some(k) = f.key_node(key) {
                if !kinds.is_empty() && !kinds_ok.contains(&kinds[0]) {
                    cx.err(
                        Code::InvalidValue,
                        k.pos,
                        format!(
                            "`{key}` applies to {} tasks, not to `{}` tasks",
                            kinds_ok.join(" and "),
                            kinds[0]
                        ),
                    );
                }
            }
        };
        applies(self, "prompt", &["agent"]);
        applies(self, "decompose", &["agent"]);
        applies(self, "budget", &["agent"]);
        applies(self, "lang", &["script"]);
        applies(self, "with", &["tool", "workflow"]);
        applies(self, "env", &["run"]);
        if let (Some(Value::Map(entries)), Some(kind)) =
            (f.get("output").map(|o| &o.value), kinds.first())
        {
            if *kind != "run" {
                if let Some((k, _)) = entries.iter().find(|(k, _)| k.as_str() == Some("parse")) {
                    self.err(
                        Code::InvalidValue,
                        k.pos,
                        format!("`output.parse` applies to run tasks (it parses stdout), not to `{kind}` tasks"),
                    );
                }
            }
        }
        w.tasks.push(decl);

        let kind = match kinds.first().copied() {
            Some("agent") => self.agent_task(&f, ix, has_item, w),
            Some("run") => self.run_task(&f, ix, has_item, w),
            Some("script") => self.script_task(&f, &what),
            Some("tool") => self.tool_task(&f, ix, has_item, w),
            Some("workflow") => self.workflow_task(&f, ix, has_item),
            Some("approve") => f
                .get("approve")
                .and_then(|n| self.template(n, "`approve`", Some(ix), has_item, false))
                .map(|message| TaskKind::Approve { message }),
            Some("tasks") => {
                for key in ["for_each", "retry", "output", "concurrency", "timeout"] {
                    if let Some(k) = f.key_node(key) {
                        self.err(
                            Code::InvalidValue,
                            k.pos,
                            format!(
                                "`{key}` is not supported on a group; put it on the tasks inside"
                            ),
                        );
                    }
                }
                let children = f
                    .get("tasks")
                    .map(|n| self.tasks(n, Some(ix), w, needs))
                    .unwrap_or_default();
                if children.is_empty() {
                    self.err(
                        Code::InvalidValue,
                        pos,
                        format!("group {what} has no tasks"),
                    );
                }
                w.tasks[ix].children = children;
                Some(TaskKind::Group)
            }
            _ => None,
        };
        if let Some(kind) = kind {
            w.tasks[ix].kind = kind;
        }
        Some(ix)
    }

    fn agent_task(
        &mut self,
        f: &Fields,
        ix: TaskIx,
        has_item: bool,
        w: &Workflow,
    ) -> Option<TaskKind> {
        let n = f.get("agent")?;
        let agent = self.string(n, "`agent`")?;
        if !w.agents.contains_key(&agent) {
            let suggestion = did_you_mean(&agent, w.agents.keys().map(String::as_str));
            let d = self.err(Code::UnknownName, n.pos, format!("unknown agent `{agent}`"));
            d.help = Some(match suggestion {
                Some(s) => format!("did you mean `{s}`?"),
                None if w.agents.is_empty() => "declare it under `agents:`".into(),
                None => format!(
                    "declared agents: {}",
                    w.agents.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        let prompt = match f.get("prompt") {
            Some(p) => self.template(p, "`prompt`", Some(ix), has_item, false)?,
            None => {
                self.err(
                    Code::MissingKey,
                    n.pos,
                    format!("agent task `{}` needs a `prompt`", w.tasks[ix].id),
                );
                return None;
            }
        };
        let decompose = f
            .get("decompose")
            .and_then(|n| self.bool(n, "`decompose`"))
            .unwrap_or(false);
        if decompose && w.agents.get(&agent).is_some_and(|a| a.script.is_some()) {
            if let Some(k) = f.key_node("decompose") {
                self.err(
                    Code::InvalidValue,
                    k.pos,
                    format!("`decompose` needs an LLM agent; `{agent}` is a script"),
                );
            }
        }
        if decompose && has_item {
            if let Some(k) = f.key_node("decompose") {
                self.err(
                    Code::InvalidValue,
                    k.pos,
                    "`decompose` cannot be combined with `for_each`",
                );
            }
        }
        let sandbox_tool = w.agents.get(&agent).and_then(|a| {
            a.tools
                .iter()
                .find(|t| crate::agents::SANDBOX_TOOLS.contains(&t.as_str()))
        });
        if let (Some(tool), SandboxChoice::Unset) = (sandbox_tool, &w.tasks[ix].sandbox) {
            self.err(
                Code::NoSandbox,
                n.pos,
                format!(
                    "agent task `{}` gives `{agent}` the tool `{tool}`, but the task has no sandbox",
                    w.tasks[ix].id
                ),
            )
            .help = Some(
                "declare a `sandbox:` profile (e.g. `sandbox: { image: helix-sandbox-python }`) on the workflow or the task, or `sandbox: host` to run commands as host processes".into(),
            );
        }
        let token_budget = f.get("budget").and_then(|n| self.token_budget(n));
        Some(TaskKind::Agent {
            agent,
            prompt,
            decompose,
            token_budget,
        })
    }

    fn run_task(
        &mut self,
        f: &Fields,
        ix: TaskIx,
        has_item: bool,
        w: &Workflow,
    ) -> Option<TaskKind> {
        let n = f.get("run")?;
        let command = self.template(n, "`run`", Some(ix), has_item, false)?;
        match &w.tasks[ix].sandbox {
            SandboxChoice::Host => {}
            SandboxChoice::Unset => {
                self.err(Code::NoSandbox, n.pos, format!("`run` task `{}` has no sandbox", w.tasks[ix].id))
                    .help = Some("add `sandbox: host` to the task or the workflow to run it as a host process (an explicit opt-in)".into());
            }
            SandboxChoice::Profile(_) => {}
        }
        let mut env = IndexMap::new();
        if let Some(e) = f.get("env") {
            for (name, _, v) in self.named_map(e, "`env`") {
                if let Some(t) =
                    self.template(v, &format!("env `{name}`"), Some(ix), has_item, false)
                {
                    env.insert(name, t);
                }
            }
        }
        Some(TaskKind::Run { command, env })
    }

    fn script_task(&mut self, f: &Fields, what: &str) -> Option<TaskKind> {
        let n = f.get("script")?;
        let text = self.string(n, "`script`")?;
        let is_file = !text.contains('\n') && Lang::from_path(Path::new(text.trim())).is_some();
        if is_file {
            if let Some(k) = f.key_node("lang") {
                self.err(
                    Code::InvalidValue,
                    k.pos,
                    "`lang` applies to inline scripts; a file's extension gives its language",
                );
            }
            let path = self.script_file(n, what)?;
            let code = std::fs::read_to_string(&path).ok()?;
            let lang = Lang::from_path(&path)?;
            return Some(TaskKind::Script {
                source: ScriptSource {
                    lang,
                    code,
                    name: path.display().to_string(),
                    first_line: 1,
                },
            });
        }
        let lang = match f.get("lang") {
            Some(l) => match self.one_of(l, "`lang`", &["rhai", "lua"])?.as_str() {
                "lua" => Lang::Lua,
                _ => Lang::Rhai,
            },
            None => Lang::Rhai,
        };
        // Block scalars (`|`) start on the line after the indicator.
        let indicator = self
            .line(n.pos.line)
            .chars()
            .nth(n.pos.col.saturating_sub(1) as usize);
        let first_line = if matches!(indicator, Some('|') | Some('>')) {
            n.pos.line + 1
        } else {
            n.pos.line
        };
        let source = ScriptSource {
            lang,
            code: text,
            name: self.file.display().to_string(),
            first_line,
        };
        self.check_script(&source, n.pos, None);
        Some(TaskKind::Script { source })
    }

    fn tool_task(
        &mut self,
        f: &Fields,
        ix: TaskIx,
        has_item: bool,
        w: &Workflow,
    ) -> Option<TaskKind> {
        let n = f.get("tool")?;
        let tool = self.string(n, "`tool`")?;
        if !crate::tools::is_builtin(&tool) && !w.tools.contains_key(&tool) {
            let known: Vec<&str> = crate::tools::builtins()
                .iter()
                .map(|b| b.name)
                .chain(w.tools.keys().map(String::as_str))
                .collect();
            let suggestion = did_you_mean(&tool, known.iter().copied());
            let d = self.err(Code::UnknownName, n.pos, format!("unknown tool `{tool}`"));
            d.help = Some(match suggestion {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("known tools: {}", known.join(", ")),
            });
        }
        let with = match f.get("with") {
            Some(wn) => {
                self.collect_json_templates(wn, ix, has_item);
                wn.to_json()
            }
            None => Json::Object(Default::default()),
        };
        Some(TaskKind::Tool { tool, with })
    }

    fn collect_json_templates(&mut self, node: &Node, ix: TaskIx, has_item: bool) {
        match &node.value {
            Value::Str(s) => self.templates.push(TemplateUse {
                text: s.clone(),
                pos: node.pos,
                is_expr: false,
                task: Some(ix),
                is_prompt: false,
                has_item,
            }),
            Value::Seq(items) => items
                .iter()
                .for_each(|i| self.collect_json_templates(i, ix, has_item)),
            Value::Map(entries) => entries
                .iter()
                .for_each(|(_, v)| self.collect_json_templates(v, ix, has_item)),
            _ => {}
        }
    }

    fn workflow_task(&mut self, f: &Fields, ix: TaskIx, has_item: bool) -> Option<TaskKind> {
        let n = f.get("workflow")?;
        let file = self.string(n, "`workflow`")?;
        let path = self.relative(&file);
        if !path.is_file() {
            self.err(
                Code::MissingFile,
                n.pos,
                format!("sub-workflow `{file}` not found"),
            )
            .help = Some(format!("paths are relative to {}", self.dir.display()));
            return None;
        }
        let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if self.stack.contains(&canonical) {
            self.err(
                Code::Cycle,
                n.pos,
                format!(
                    "sub-workflow `{file}` includes itself, directly or through other workflows"
                ),
            );
            return None;
        }
        let mut with = IndexMap::new();
        let with_node = f.get("with");
        if let Some(wn) = with_node {
            for (name, _, v) in self.named_map(wn, "`with`") {
                self.collect_json_templates(v, ix, has_item);
                with.insert(name, v.to_json());
            }
        }
        match load_nested(&path, self.stack) {
            Ok(sub) => {
                let with_entries: Vec<(String, Pos)> = with_node
                    .map(|wn| {
                        self.named_map(wn, "`with`")
                            .into_iter()
                            .map(|(k, kn, _)| (k, kn.pos))
                            .collect()
                    })
                    .unwrap_or_default();
                for (name, pos) in &with_entries {
                    if !sub.inputs.contains_key(name) {
                        let suggestion = did_you_mean(name, sub.inputs.keys().map(String::as_str));
                        let d = self.err(
                            Code::Input,
                            *pos,
                            format!("sub-workflow `{file}` has no input `{name}`"),
                        );
                        if let Some(s) = suggestion {
                            d.help = Some(format!("did you mean `{s}`?"));
                        }
                    }
                }
                for (name, decl) in &sub.inputs {
                    if decl.default.is_none() && !with.contains_key(name) {
                        self.err(Code::Input, n.pos, format!("sub-workflow `{file}` requires input `{name}`; pass it under `with:`"));
                    }
                }
            }
            Err(sub_report) => self.report.merge(sub_report),
        }
        Some(TaskKind::Workflow { path, with })
    }

    fn retry(&mut self, node: &Node) -> Retry {
        let mut r = Retry::default();
        if let Value::Int(_) = node.value {
            r.attempts = self.positive(node, "`retry`").unwrap_or(1).min(1000) as u32;
            return r;
        }
        let Some(f) = self.fields(node, "`retry`", spec::RETRY_KEYS) else {
            return r;
        };
        if let Some(n) = f.get("attempts") {
            r.attempts = self.positive(n, "`retry.attempts`").unwrap_or(1).min(1000) as u32;
        }
        if let Some(d) = f
            .get("backoff")
            .and_then(|n| self.duration(n, "`retry.backoff`"))
        {
            r.backoff = d;
        }
        if let Some(d) = f
            .get("max_backoff")
            .and_then(|n| self.duration(n, "`retry.max_backoff`"))
        {
            r.max_backoff = d;
        }
        if let Some(b) = f.get("jitter").and_then(|n| self.bool(n, "`retry.jitter`")) {
            r.jitter = b;
        }
        if let Some(n) = f.get("on") {
            let mut on = Vec::new();
            for (name, pos) in self.str_list(n, "`retry.on`") {
                match ErrorClass::parse(&name) {
                    Some(classes) => on.extend(classes),
                    None => {
                        let s = did_you_mean(&name, ErrorClass::NAMES.iter().copied());
                        let d = self.err(
                            Code::InvalidValue,
                            pos,
                            format!("unknown error class `{name}` in `retry.on`"),
                        );
                        d.help = Some(match s {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("expected one of: {}", ErrorClass::NAMES.join(", ")),
                        });
                    }
                }
            }
            r.on = on;
        }
        r
    }

    fn output(&mut self, node: &Node) -> Option<OutputSpec> {
        let f = self.fields(node, "`output`", spec::OUTPUT_KEYS)?;
        let parse = f
            .get("parse")
            .and_then(|n| self.one_of(n, "`output.parse`", &["text", "json", "lines"]))
            .map(|p| match p.as_str() {
                "json" => OutputParse::Json,
                "lines" => OutputParse::Lines,
                _ => OutputParse::Text,
            });
        let schema = f.get("schema").map(|n| {
            if !matches!(n.value, Value::Map(_)) {
                self.err(
                    Code::WrongType,
                    n.pos,
                    "`output.schema` must be a JSON Schema mapping",
                );
            }
            n.to_json()
        });
        Some(OutputSpec { parse, schema })
    }

    fn resolve_needs(&mut self, w: &mut Workflow, pending: Vec<(TaskIx, Vec<(String, Pos)>)>) {
        // Lookups by id and by (group, key), built once: workflows may have 10,000 tasks.
        let by_id: HashMap<String, TaskIx> = w
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        let by_key: HashMap<(Option<TaskIx>, String), TaskIx> = w
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| ((t.parent, t.key().to_string()), i))
            .collect();
        for (ix, names) in pending {
            let mut resolved = Vec::new();
            for (name, pos) in names {
                let parent = w.tasks[ix].parent;
                let target = by_key
                    .get(&(parent, name.clone()))
                    .or_else(|| by_id.get(&name))
                    .copied();
                match target {
                    Some(t) if t == ix => {
                        self.err(
                            Code::SelfNeed,
                            pos,
                            format!("task `{}` needs itself", w.tasks[ix].id),
                        )
                        .help = Some("remove it from `needs`".into());
                    }
                    Some(t) if is_ancestor(w, t, ix) => {
                        self.err(
                            Code::Cycle,
                            pos,
                            format!(
                                "task `{}` needs its own group `{}`, which cannot finish before it",
                                w.tasks[ix].id, w.tasks[t].id
                            ),
                        );
                    }
                    Some(t) if is_ancestor(w, ix, t) => {
                        self.err(Code::Cycle, pos, format!("group `{}` needs its own task `{}`, which cannot start before the group", w.tasks[ix].id, w.tasks[t].id));
                    }
                    Some(t) => {
                        if !resolved.contains(&t) {
                            resolved.push(t);
                        }
                    }
                    None => {
                        let siblings: Vec<TaskIx> = match parent {
                            Some(p) => w.tasks[p].children.clone(),
                            None => w.roots.clone(),
                        };
                        let candidates: Vec<&str> = siblings
                            .iter()
                            .map(|&s| w.tasks[s].key())
                            .chain(w.tasks.iter().map(|t| t.id.as_str()))
                            .collect();
                        let suggestion = did_you_mean(&name, candidates.iter().copied());
                        let d = self.err(
                            Code::UnknownNeed,
                            pos,
                            format!(
                                "task `{}` needs `{name}`, which does not exist",
                                w.tasks[ix].id
                            ),
                        );
                        if let Some(s) = suggestion {
                            d.help = Some(format!("did you mean `{s}`?"));
                        }
                    }
                }
            }
            w.tasks[ix].needs = resolved;
        }
    }

    /// Finds cycles in `needs` with an iterative depth-first search (chains can be long).
    fn check_cycles(&mut self, w: &Workflow) {
        // 0 = unvisited, 1 = on the path, 2 = done
        let mut state = vec![0u8; w.tasks.len()];
        let mut reported = HashSet::new();
        for start in 0..w.tasks.len() {
            if state[start] != 0 {
                continue;
            }
            // (task, index of the next need to look at)
            let mut path: Vec<(TaskIx, usize)> = vec![(start, 0)];
            state[start] = 1;
            while let Some(&mut (ix, ref mut next)) = path.last_mut() {
                let Some(&dep) = w.tasks[ix].needs.get(*next) else {
                    state[ix] = 2;
                    path.pop();
                    continue;
                };
                *next += 1;
                match state[dep] {
                    0 => {
                        state[dep] = 1;
                        path.push((dep, 0));
                    }
                    1 => {
                        let from = path.iter().position(|&(t, _)| t == dep).unwrap_or(0);
                        let mut cycle: Vec<TaskIx> = path[from..].iter().map(|&(t, _)| t).collect();
                        let mut key = cycle.clone();
                        key.sort_unstable();
                        if reported.insert(key) {
                            cycle.push(dep);
                            let names: Vec<&str> = cycle
                                .iter()
                                .rev()
                                .map(|&t| w.tasks[t].id.as_str())
                                .collect();
                            self.err(
                                Code::Cycle,
                                w.tasks[dep].pos,
                                format!("dependency cycle: {}", names.join(" → ")),
                            )
                            .help = Some("remove one of these `needs` entries".into());
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn check_templates(&mut self, w: &Workflow) {
        let env = prompt::environment(None);
        let upstream: HashMap<TaskIx, HashSet<TaskIx>> = HashMap::new();
        let mut upstream = upstream;
        let uses = std::mem::take(&mut self.templates);
        for u in &uses {
            let vars = match prompt::check(&env, &u.text, u.is_expr) {
                Ok(v) => v,
                Err(e) => {
                    let line = e
                        .line
                        .filter(|_| u.text.contains('\n'))
                        .map(|l| format!(" (template line {l})"))
                        .unwrap_or_default();
                    let kind = if u.is_expr { "expression" } else { "template" };
                    self.err(
                        Code::TemplateSyntax,
                        u.pos,
                        format!("{kind} does not parse: {}{line}", e.message),
                    );
                    continue;
                }
            };
            for var in vars {
                self.check_variable(w, u, &var, &mut upstream);
            }
        }
    }

    fn check_variable(
        &mut self,
        w: &Workflow,
        u: &TemplateUse,
        var: &str,
        upstream: &mut HashMap<TaskIx, HashSet<TaskIx>>,
    ) {
        let parts: Vec<&str> = var.split('.').collect();
        let mut roots = vec!["inputs", "tasks", "run", "env"];
        if u.has_item {
            roots.push("item");
        }
        if u.is_prompt {
            roots.extend(["memory", "agent", "task"]);
        }
        let head = parts[0];
        if !roots.contains(&head) {
            let suggestion = did_you_mean(head, roots.iter().copied());
            let d = self.err(
                Code::UndefinedVariable,
                u.pos,
                format!("undefined variable `{head}`"),
            );
            d.help = Some(match (head, suggestion) {
                ("item", _) => "`item` is defined only in tasks with `for_each`".into(),
                (_, Some(s)) => format!("did you mean `{s}`?"),
                _ => format!("templates here can read: {}", roots.join(", ")),
            });
            return;
        }
        let Some(second) = parts.get(1).copied() else {
            return;
        };
        match head {
            "inputs" if !w.inputs.contains_key(second) => {
                let suggestion = did_you_mean(second, w.inputs.keys().map(String::as_str));
                let d = self.err(
                    Code::UndefinedVariable,
                    u.pos,
                    format!("undefined input `inputs.{second}`"),
                );
                d.help = Some(match suggestion {
                    Some(s) => format!("did you mean `inputs.{s}`?"),
                    None => "declare it under `inputs:`".into(),
                });
            }
            "env" if !w.secrets.iter().any(|s| s == second) && !w.env.contains_key(second) => {
                self.err(Code::UndefinedVariable, u.pos, format!("`env.{second}` is not declared"))
                    .help = Some(format!("list `{second}` under `secrets:` (for secrets) or `env:` so templates may read it"));
            }
            "run" if !["id", "dir", "workspace", "workflow", "name"].contains(&second) => {
                self.err(
                    Code::UndefinedVariable,
                    u.pos,
                    format!("undefined variable `run.{second}`"),
                )
                .help = Some("`run` has: id, dir, workspace, workflow, name".into());
            }
            "tasks" => self.check_task_reference(w, u, &parts[1..], upstream),
            _ => {}
        }
    }

    fn check_task_reference(
        &mut self,
        w: &Workflow,
        u: &TemplateUse,
        path: &[&str],
        upstream: &mut HashMap<TaskIx, HashSet<TaskIx>>,
    ) {
        let Some(root) = w
            .roots
            .iter()
            .copied()
            .find(|&r| w.tasks[r].key() == path[0])
        else {
            let suggestion = did_you_mean(path[0], w.roots.iter().map(|&r| w.tasks[r].key()));
            let d = self.err(
                Code::UndefinedVariable,
                u.pos,
                format!("`tasks.{}` is not a task", path[0]),
            );
            if let Some(s) = suggestion {
                d.help = Some(format!("did you mean `tasks.{s}`?"));
            }
            return;
        };
        // Descend into groups: `tasks.qa.unit.output`.
        let mut target = root;
        for part in &path[1..] {
            match w.tasks[target]
                .children
                .iter()
                .copied()
                .find(|&c| w.tasks[c].key() == *part)
            {
                Some(c) => target = c,
                None => {
                    if !RESERVED_TASK_KEYS.contains(part) {
                        let mut options: Vec<&str> = RESERVED_TASK_KEYS.to_vec();
                        options.extend(w.tasks[target].children.iter().map(|&c| w.tasks[c].key()));
                        let suggestion = did_you_mean(part, options.iter().copied());
                        let d = self.err(
                            Code::UndefinedVariable,
                            u.pos,
                            format!("`tasks.{}` has no `{part}`", w.tasks[target].id),
                        );
                        d.help = Some(match suggestion {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("a task has: {}", options.join(", ")),
                        });
                    }
                    break;
                }
            }
        }
        let Some(reader) = u.task else { return };
        if !reads_allowed(w, reader, target, upstream) {
            let d = self.err(
                Code::NotANeed,
                u.pos,
                format!(
                    "task `{}` reads `tasks.{}` but does not depend on it",
                    w.tasks[reader].id, w.tasks[target].id
                ),
            );
            d.help = Some(format!(
                "add `{}` to the `needs` of `{}`",
                w.tasks[target].id, w.tasks[reader].id
            ));
        }
    }
}

/// How many characters of the token at `pos` the caret underlines.
fn token_width(source: &str, pos: Pos) -> usize {
    let Some(line) = source.lines().nth(pos.line.saturating_sub(1) as usize) else {
        return 1;
    };
    let rest: String = line
        .chars()
        .skip(pos.col.saturating_sub(1) as usize)
        .collect();
    let quoted = rest.starts_with('"') || rest.starts_with('\'');
    let width = if quoted {
        let q = rest.chars().next().unwrap_or('"');
        rest.chars()
            .skip(1)
            .position(|c| c == q)
            .map(|n| n + 2)
            .unwrap_or(rest.chars().count())
    } else {
        // A plain block value (`timeout: 5 parsecs`) runs to the end of the line or a
        // comment; a key or a value inside `{…}`/`[…]` ends at the next delimiter.
        let before: String = line
            .chars()
            .take(pos.col.saturating_sub(1) as usize)
            .collect();
        let before = before.trim_end();
        let in_flow = before.contains('{') || before.contains('[');
        if !in_flow && (before.ends_with(':') || before.ends_with('-')) {
            let value = rest.split(" #").next().unwrap_or(&rest).trim_end();
            value.chars().count()
        } else {
            rest.chars()
                .position(|c| matches!(c, ':' | ',' | ']' | '}' | '#') || c.is_whitespace())
                .unwrap_or(rest.chars().count())
        }
    };
    width.clamp(1, 80)
}

fn article(kind: &str) -> String {
    match kind {
        "agent" => "an agent".into(),
        other => format!("a {other}"),
    }
}

/// "not found" reads better than "No such file or directory (os error 2)".
fn io_problem(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "not found".to_string(),
        std::io::ErrorKind::InvalidData => "is not UTF-8 text".to_string(),
        _ => format!("cannot be read: {e}"),
    }
}

fn check_name(cx: &mut Cx, name: &str, pos: Pos, what: &str) {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        let d = cx.err(
            Code::InvalidValue,
            pos,
            format!("invalid {what} name `{name}`: use letters, digits and `_`"),
        );
        if name.contains('-') {
            d.help = Some(format!(
                "`{}` would work; templates would read `{name}` as a subtraction",
                name.replace('-', "_")
            ));
        }
    }
}

fn is_ancestor(w: &Workflow, ancestor: TaskIx, mut ix: TaskIx) -> bool {
    while let Some(p) = w.tasks[ix].parent {
        if p == ancestor {
            return true;
        }
        ix = p;
    }
    false
}

/// Whether `reader` may read `target`'s results: `target` (or a group containing it) finishes
/// before `reader` (or a group containing it) starts.
fn reads_allowed(
    w: &Workflow,
    reader: TaskIx,
    target: TaskIx,
    cache: &mut HashMap<TaskIx, HashSet<TaskIx>>,
) -> bool {
    let done_before = cache
        .entry(reader)
        .or_insert_with(|| finished_before(w, reader));
    done_before.contains(&target)
}

/// Every task guaranteed finished when `ix` starts: its needs, their descendants, their
/// needs in turn, and the same for every group `ix` is in.
fn finished_before(w: &Workflow, ix: TaskIx) -> HashSet<TaskIx> {
    let mut out = HashSet::new();
    let mut todo: Vec<TaskIx> = Vec::new();
    let mut cur = Some(ix);
    while let Some(c) = cur {
        todo.extend(&w.tasks[c].needs);
        cur = w.tasks[c].parent;
    }
    while let Some(t) = todo.pop() {
        if !out.insert(t) {
            continue;
        }
        todo.extend(&w.tasks[t].needs);
        todo.extend(&w.tasks[t].children);
        let mut p = w.tasks[t].parent;
        while let Some(g) = p {
            todo.extend(&w.tasks[g].needs);
            p = w.tasks[g].parent;
        }
    }
    out
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `-i key=value` pairs against the declared inputs and fills defaults.
pub fn resolve_inputs(
    w: &Workflow,
    given: &[(String, String)],
) -> Result<serde_json::Map<String, Json>, Report> {
    let mut report = Report::default();
    let mut out = serde_json::Map::new();
    let err = |msg: String| Diagnostic::new(Code::Input, &w.file, None, msg);
    for (k, v) in given {
        match w.inputs.get(k) {
            None => {
                let mut d = err(format!("unknown input `{k}`"));
                d.help = Some(match did_you_mean(k, w.inputs.keys().map(String::as_str)) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None if w.inputs.is_empty() => "this workflow declares no inputs".into(),
                    None => format!(
                        "declared inputs: {}",
                        w.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                });
                report.push(d);
            }
            Some(decl) => match decl.ty.from_cli(v) {
                Ok(value) => {
                    if let Some(choices) = &decl.choices {
                        if !choices.contains(&value) {
                            let list: Vec<String> = choices.iter().map(|c| c.to_string()).collect();
                            report.push(err(format!(
                                "input `{k}` must be one of {}, got `{v}`",
                                list.join(", ")
                            )));
                            continue;
                        }
                    }
                    out.insert(k.clone(), value);
                }
                Err(e) => report.push(err(format!("input `{k}`: {e}"))),
            },
        }
    }
    for (k, decl) in &w.inputs {
        if out.contains_key(k) {
            continue;
        }
        match &decl.default {
            Some(d) => {
                out.insert(k.clone(), d.clone());
            }
            None => report.push(
                err(format!("missing required input `{k}`")).with_help(format!(
                    "pass it with `-i {k}=…`{}",
                    decl.description
                        .as_ref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                )),
            ),
        }
    }
    if report.is_empty() {
        Ok(out)
    } else {
        Err(report)
    }
}
