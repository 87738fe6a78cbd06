//! Built-in tools an agent can call by name, each confined to the step's workspace.
//!
//! A tool takes a JSON object of arguments, as a model produces it, and returns a JSON value.
//! The argument schema each tool publishes is also what its arguments are checked against,
//! so the two cannot drift apart.

use std::path::PathBuf;

use serde_json::{Map, Value};

pub mod fs;

/// What a tool call may touch.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// Every path a tool receives is relative to this directory and may not leave it.
    pub workspace: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool `{0}`")]
    Unknown(String),
    #[error("invalid arguments for `{tool}`: {message}")]
    InvalidArgs { tool: String, message: String },
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Io(String),
}

type Run = fn(&Args<'_>, &ToolContext) -> Result<Value, ToolError>;

#[derive(Debug)]
pub struct BuiltinTool {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema of the arguments object.
    pub params: fn() -> Value,
    run: Run,
}

static BUILTINS: &[BuiltinTool] = &[
    BuiltinTool {
        name: "fs.read",
        description: "Read a UTF-8 text file (at most 1 MiB) from the workspace.",
        params: fs::read_params,
        run: fs::read,
    },
    BuiltinTool {
        name: "fs.write",
        description: "Write text to a file in the workspace, creating parent directories; \
                      `append` adds to the end instead of replacing the file.",
        params: fs::write_params,
        run: fs::write,
    },
    BuiltinTool {
        name: "fs.list",
        description: "List the entries of a workspace directory, optionally recursively.",
        params: fs::list_params,
        run: fs::list,
    },
    BuiltinTool {
        name: "fs.search",
        description: "Find lines containing a plain substring in the workspace's text files \
                      (at most 200 matches).",
        params: fs::search_params,
        run: fs::search,
    },
];

pub fn builtins() -> &'static [BuiltinTool] {
    BUILTINS
}

pub fn is_builtin(name: &str) -> bool {
    find(name).is_some()
}

pub fn call_builtin(name: &str, args: &Value, cx: &ToolContext) -> Result<Value, ToolError> {
    let tool = find(name).ok_or_else(|| ToolError::Unknown(name.to_owned()))?;
    let args = Args::check(tool, args)?;
    (tool.run)(&args, cx)
}

fn find(name: &str) -> Option<&'static BuiltinTool> {
    BUILTINS.iter().find(|tool| tool.name == name)
}

/// A tool's arguments, known to be an object whose keys all appear in the tool's schema.
/// The getters check each value's type as the tool reads it.
pub(crate) struct Args<'a> {
    tool: &'static str,
    values: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    fn check(tool: &'static BuiltinTool, args: &'a Value) -> Result<Self, ToolError> {
        let invalid = |message: String| ToolError::InvalidArgs {
            tool: tool.name.to_owned(),
            message,
        };
        let values = match args {
            Value::Object(values) => values,
            other => {
                return Err(invalid(format!(
                    "expected an object, got {}",
                    type_name(other)
                )))
            }
        };
        let schema = (tool.params)();
        let known: Vec<&str> = schema["properties"]
            .as_object()
            .map(|properties| properties.keys().map(String::as_str).collect())
            .unwrap_or_default();
        if let Some(unknown) = values.keys().find(|key| !known.contains(&key.as_str())) {
            let hint = closest(unknown, &known)
                .map(|name| format!("; did you mean `{name}`?"))
                .unwrap_or_default();
            return Err(invalid(format!("unknown argument `{unknown}`{hint}")));
        }
        let required = schema["required"].as_array().into_iter().flatten();
        if let Some(missing) = required
            .filter_map(Value::as_str)
            .find(|name| !values.contains_key(*name))
        {
            return Err(invalid(format!("missing argument `{missing}`")));
        }
        Ok(Self {
            tool: tool.name,
            values,
        })
    }

    pub(crate) fn invalid(&self, message: String) -> ToolError {
        ToolError::InvalidArgs {
            tool: self.tool.to_owned(),
            message,
        }
    }

    pub(crate) fn str(&self, name: &str) -> Result<&'a str, ToolError> {
        self.opt_str(name)?
            .ok_or_else(|| self.invalid(format!("missing argument `{name}`")))
    }

    pub(crate) fn opt_str(&self, name: &str) -> Result<Option<&'a str>, ToolError> {
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(self.wrong_type(name, "a string", other)),
        }
    }

    pub(crate) fn opt_bool(&self, name: &str) -> Result<Option<bool>, ToolError> {
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(*flag)),
            Some(other) => Err(self.wrong_type(name, "a boolean", other)),
        }
    }

    fn wrong_type(&self, name: &str, expected: &str, got: &Value) -> ToolError {
        self.invalid(format!(
            "argument `{name}` must be {expected}, got {}",
            type_name(got)
        ))
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Models misspell argument names; name the one they most likely meant.
fn closest<'n>(name: &str, known: &[&'n str]) -> Option<&'n str> {
    known
        .iter()
        .map(|candidate| (strsim::jaro_winkler(name, candidate), *candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cx() -> ToolContext {
        ToolContext {
            workspace: PathBuf::from("/nonexistent-workspace"),
        }
    }

    fn invalid_message(name: &str, args: Value) -> String {
        match call_builtin(name, &args, &cx()) {
            Err(ToolError::InvalidArgs { tool, message }) => {
                assert_eq!(tool, name);
                message
            }
            other => panic!("expected invalid arguments, got {other:?}"),
        }
    }

    #[test]
    fn every_builtin_publishes_an_object_schema() {
        for tool in builtins() {
            let schema = (tool.params)();
            assert_eq!(schema["type"], "object", "{}", tool.name);
            assert!(schema["properties"].is_object(), "{}", tool.name);
            assert!(is_builtin(tool.name));
        }
    }

    #[test]
    fn an_unknown_tool_is_named() {
        let error = call_builtin("fs.delete", &json!({}), &cx()).expect_err("unknown");
        assert_eq!(error.to_string(), "unknown tool `fs.delete`");
        assert!(!is_builtin("fs.delete"));
    }

    #[test]
    fn a_missing_argument_is_named() {
        assert_eq!(
            invalid_message("fs.read", json!({})),
            "missing argument `path`"
        );
    }

    #[test]
    fn an_argument_of_the_wrong_type_is_named() {
        assert_eq!(
            invalid_message("fs.read", json!({"path": 3})),
            "argument `path` must be a string, got a number"
        );
        assert_eq!(
            invalid_message(
                "fs.write",
                json!({"path": "a", "content": "", "append": "yes"})
            ),
            "argument `append` must be a boolean, got a string"
        );
    }

    #[test]
    fn an_unknown_argument_is_named_with_a_suggestion() {
        assert_eq!(
            invalid_message("fs.read", json!({"pth": "a"})),
            "unknown argument `pth`; did you mean `path`?"
        );
        assert_eq!(
            invalid_message("fs.read", json!({"path": "a", "zzz": 1})),
            "unknown argument `zzz`"
        );
    }

    #[test]
    fn arguments_must_be_an_object() {
        assert_eq!(
            invalid_message("fs.list", json!(["."])),
            "expected an object, got an array"
        );
    }
}
