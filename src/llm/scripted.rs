//! The `scripted` provider: replies read from a YAML file instead of a model, for demos and
//! for tests of workflows. Nothing leaves the machine.
//!
//! ```yaml
//! replies:
//!   - agent: architect          # matchers, all optional: agent, task (the task key), turn
//!     task: design
//!     turn: 1
//!     content: '{"files": ["app.py"]}'
//!     usage: { input_tokens: 120, output_tokens: 30 }
//!   - agent: coder
//!     tool_calls:
//!       - { name: fs.write, arguments: { path: app.py, content: "print('hi')\n" } }
//!   - agent: coder
//!     content: Done.
//! ```
//!
//! How a call finds its reply: each (agent, task) pair is a conversation, which a call with
//! turn 1 starts afresh (so a retried task replays its script). A call takes the first reply,
//! in file order, whose given matchers all equal the call's agent, task and turn and which
//! this conversation has not used yet. So replies without `turn` answer one turn each, in
//! order, and a reply with `turn: N` answers turn N.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{json, Value as Json};

use super::{BoxFuture, ChatRequest, ChatResponse, LlmError, Provider, ToolCall, Usage};

/// A provider that answers from a replies file.
#[derive(Debug)]
pub struct Scripted {
    file: PathBuf,
    replies: Vec<Reply>,
    conversations: Mutex<HashMap<(String, String), Conversation>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepliesFile {
    replies: Vec<Reply>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    agent: Option<String>,
    task: Option<String>,
    turn: Option<NonZeroU32>,
    /// Text, or any YAML value, which is sent as JSON: authors of structured answers need
    /// not quote them.
    content: Option<Json>,
    #[serde(default)]
    tool_calls: Vec<ScriptedCall>,
    usage: Option<ScriptedUsage>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedCall {
    name: String,
    #[serde(default)]
    arguments: Option<Json>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Debug, Default)]
struct Conversation {
    used: Vec<usize>,
    calls_made: u32,
}

impl Scripted {
    /// Reads and checks a replies file.
    pub fn load(file: &Path) -> Result<Scripted, LlmError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            LlmError::Scripted(format!(
                "cannot read scripted replies file {}: {e}",
                file.display()
            ))
        })?;
        Scripted::parse(&text, file)
    }

    /// Reads replies from `text`; `file` names it in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Scripted, LlmError> {
        let parsed: RepliesFile = serde_saphyr::from_str(text).map_err(|e| {
            let message = e.without_snippet().to_string();
            let message = message.lines().next().unwrap_or("invalid YAML");
            // saphyr appends the position in its own words; it is given up front instead.
            let message = message.split(" at line ").next().unwrap_or(message);
            let position = e
                .location()
                .map(|l| format!(":{}:{}", l.line(), l.column()))
                .unwrap_or_default();
            LlmError::Scripted(format!(
                "scripted replies file {}{position}: {message}",
                file.display()
            ))
        })?;
        Ok(Scripted {
            file: file.to_path_buf(),
            replies: parsed.replies,
            conversations: Mutex::new(HashMap::new()),
        })
    }

    /// Picks the reply for `request` and marks it used (see the module's rule).
    fn answer(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        // A panic elsewhere cannot leave a conversation half-updated, so a poisoned lock
        // still holds consistent state.
        let mut conversations = self
            .conversations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (request.agent.clone(), request.task.clone());
        let conversation = conversations.entry(key).or_default();
        if request.turn <= 1 {
            *conversation = Conversation::default();
        }
        let found = self.replies.iter().enumerate().find(|(index, reply)| {
            !conversation.used.contains(index)
                && reply.agent.as_ref().is_none_or(|a| *a == request.agent)
                && reply.task.as_ref().is_none_or(|t| *t == request.task)
                && reply.turn.is_none_or(|n| n.get() == request.turn)
        });
        let Some((index, reply)) = found else {
            return Err(LlmError::Scripted(format!(
                "scripted replies file {} has no reply for agent `{}`, task `{}`, turn {}",
                self.file.display(),
                request.agent,
                request.task,
                request.turn
            )));
        };
        conversation.used.push(index);
        let tool_calls: Vec<ToolCall> = reply
            .tool_calls
            .iter()
            .map(|call| {
                conversation.calls_made += 1;
                ToolCall {
                    id: format!("call_{}", conversation.calls_made),
                    name: call.name.clone(),
                    arguments: call.arguments.clone().unwrap_or_else(|| json!({})),
                }
            })
            .collect();
        let content = match &reply.content {
            None => String::new(),
            Some(Json::String(text)) => text.clone(),
            Some(value) => value.to_string(),
        };
        let usage = match &reply.usage {
            Some(u) => Usage {
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
            },
            None => estimate_usage(request, &content, &tool_calls),
        };
        let finish_reason = reply.finish_reason.clone().unwrap_or_else(|| {
            if tool_calls.is_empty() {
                "stop"
            } else {
                "tool_calls"
            }
            .to_string()
        });
        Ok(ChatResponse {
            content,
            tool_calls,
            usage,
            finish_reason,
        })
    }
}

impl Provider for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn chat<'a>(
        &'a self,
        request: &'a ChatRequest,
        on_token: Option<&'a (dyn Fn(&str) + Send + Sync)>,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(async move {
            let response = self.answer(request)?;
            // Word by word, so a demo's progress display streams as it would with a model.
            if let Some(on_token) = on_token {
                for piece in response.content.split_inclusive(' ') {
                    on_token(piece);
                }
            }
            Ok(response)
        })
    }
}

/// Token counts for budgets and summaries when the file gives none: about four tokens for
/// every three words, as for English text with common tokenizers.
fn estimate_usage(request: &ChatRequest, content: &str, tool_calls: &[ToolCall]) -> Usage {
    let tokens = |words: usize| (words as u64 * 4).div_ceil(3);
    let words = |text: &str| text.split_whitespace().count();
    let input = words(&request.system)
        + request
            .messages
            .iter()
            .map(|m| {
                words(&m.content)
                    + m.tool_calls
                        .iter()
                        .map(|c| words(&c.arguments.to_string()) + 1)
                        .sum::<usize>()
            })
            .sum::<usize>();
    let output = words(content)
        + tool_calls
            .iter()
            .map(|c| words(&c.arguments.to_string()) + 1)
            .sum::<usize>();
    Usage {
        input_tokens: tokens(input),
        output_tokens: tokens(output),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(agent: &str, task: &str, turn: u32) -> ChatRequest {
        ChatRequest {
            agent: agent.into(),
            task: task.into(),
            turn,
            ..ChatRequest::default()
        }
    }

    fn scripted(text: &str) -> Scripted {
        match Scripted::parse(text, Path::new("replies.yaml")) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_turn_one_call_restarts_the_conversation() {
        let s = scripted("replies:\n  - content: first\n  - content: second\n");
        let first = s.answer(&request("a", "t", 1)).map(|r| r.content);
        let second = s.answer(&request("a", "t", 2)).map(|r| r.content);
        let again = s.answer(&request("a", "t", 1)).map(|r| r.content);
        assert_eq!(first.as_deref(), Ok("first"));
        assert_eq!(second.as_deref(), Ok("second"));
        assert_eq!(again.as_deref(), Ok("first"));
    }

    #[test]
    fn structured_content_is_sent_as_json() {
        let s = scripted("replies:\n  - content: { files: [app.py] }\n");
        let reply = s.answer(&request("a", "t", 1)).map(|r| r.content);
        assert_eq!(reply.as_deref(), Ok(r#"{"files":["app.py"]}"#));
    }

    #[test]
    fn usage_is_estimated_from_words() {
        let mut req = request("a", "t", 1);
        req.system = "one two three".into();
        let s = scripted("replies:\n  - content: a b c d e f\n");
        let usage = s.answer(&req).map(|r| r.usage);
        assert_eq!(
            usage,
            Ok(Usage {
                input_tokens: 4,
                output_tokens: 8
            })
        );
    }
}
