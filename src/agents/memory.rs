//! A run's long-term memory, as the workflow's `memory:` configures it: recall before an
//! agent task, lessons distilled after one, and the `memory.search` / `memory.store` tools.

use std::sync::Arc;

use serde_json::{json, Value as Json};

use crate::llm::{ChatRequest, Message, Provider, Usage};
use crate::memory::{
    embed_all, Added, Embedder, HashEmbedder, MemoryError, MemoryStore, NewMemory, OpenAiEmbedder,
    Provenance, SearchOptions, ERROR_RESOLUTION, TASK_SUMMARY,
};
use crate::workflow::Workflow;

/// Recalled text is cut to about this many tokens unless `recall.max_tokens` says otherwise.
const DEFAULT_RECALL_TOKENS: usize = 1_000;
const DEFAULT_TOP_K: usize = 5;
/// How much of a task's answer the lesson call sees.
const ANSWER_CHARS: usize = 4_000;

/// What `memory:` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryConfig {
    pub top_k: usize,
    /// Recall only these kinds; all kinds when empty.
    pub kinds: Vec<String>,
    pub max_tokens: usize,
    pub synthesize: bool,
}

impl MemoryConfig {
    fn from_json(memory: &Json) -> MemoryConfig {
        let recall = &memory["recall"];
        MemoryConfig {
            top_k: recall["top_k"]
                .as_u64()
                .and_then(|k| usize::try_from(k).ok())
                .unwrap_or(DEFAULT_TOP_K),
            kinds: recall["kinds"]
                .as_array()
                .map(|kinds| {
                    kinds
                        .iter()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            max_tokens: recall["max_tokens"]
                .as_u64()
                .and_then(|k| usize::try_from(k).ok())
                .unwrap_or(DEFAULT_RECALL_TOKENS),
            synthesize: memory["synthesize"].as_bool().unwrap_or(false),
        }
    }
}

/// The store and embedder of one run, shared by its agents.
pub struct RunMemory {
    store: tokio::sync::Mutex<MemoryStore>,
    embedder: Box<dyn Embedder>,
    pub config: MemoryConfig,
    run_id: String,
    /// Replaced by `***` in everything stored: memories outlive the run and reach other
    /// runs' prompts.
    secrets: Vec<String>,
}

impl RunMemory {
    /// The run's memory, or `None` when the workflow declares no `memory:`. Fails when the
    /// file cannot hold memories (corrupt, foreign) or was built by another embedder.
    pub fn open(
        home: &std::path::Path,
        wf: &Workflow,
        run_id: &str,
        secrets: &[String],
    ) -> Result<Option<Arc<RunMemory>>, MemoryError> {
        if wf.memory.is_null() {
            return Ok(None);
        }
        let embedder = embedder_for(wf)?;
        let store = MemoryStore::open(home)?;
        store.check_embedder(embedder.as_ref())?;
        Ok(Some(Arc::new(RunMemory {
            store: tokio::sync::Mutex::new(store),
            embedder,
            config: MemoryConfig::from_json(&wf.memory),
            run_id: run_id.to_string(),
            secrets: secrets.to_vec(),
        })))
    }

    /// The memories most relevant to `query` for a prompt's `{{ memory }}`: the top `top_k`
    /// of the configured kinds, cut to the token budget, as `{id, kind, text, score}`.
    pub async fn recall(&self, query: &str) -> Result<Vec<Json>, MemoryError> {
        let cfg = &self.config;
        let mut hits = Vec::new();
        if cfg.kinds.is_empty() {
            hits = self.search(query, None, cfg.top_k).await?;
        } else {
            for kind in &cfg.kinds {
                hits.extend(self.search(query, Some(kind), cfg.top_k).await?);
            }
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
            hits.truncate(cfg.top_k);
        }
        let mut budget = cfg.max_tokens;
        let mut recalled = Vec::new();
        for hit in hits {
            // About four characters a token, as the budgets elsewhere count.
            let cost = hit.memory.text.chars().count().div_ceil(4);
            if cost > budget {
                break;
            }
            budget -= cost;
            recalled.push(json!({
                "id": hit.memory.id,
                "kind": hit.memory.kind,
                "text": hit.memory.text,
                "score": hit.score,
            }));
        }
        Ok(recalled)
    }

    pub async fn search(
        &self,
        query: &str,
        kind: Option<&str>,
        k: usize,
    ) -> Result<Vec<crate::memory::Hit>, MemoryError> {
        let mut options = SearchOptions::top(k);
        if let Some(kind) = kind {
            options = options.kind(kind);
        }
        // Embedded before the store is locked: a slow embedding server holds up no one else.
        let vector = self.embed(query).await?;
        self.store
            .lock()
            .await
            .search_vector(self.embedder.as_ref(), &vector, &options)
    }

    async fn embed(&self, text: &str) -> Result<Vec<f32>, MemoryError> {
        let mut vectors = embed_all(self.embedder.as_ref(), &[text.to_string()]).await?;
        // One text, one vector: `embed_all` checked the count.
        Ok(vectors.pop().unwrap_or_default())
    }

    /// Stores one memory with this run as its provenance.
    pub async fn store(
        &self,
        kind: &str,
        text: &str,
        metadata: Json,
        task: &str,
        agent: &str,
    ) -> Result<Added, MemoryError> {
        let mut item = NewMemory::new(kind, crate::llm::redact(text, &self.secrets));
        item.metadata = if self.secrets.is_empty() {
            metadata
        } else {
            let masked = crate::llm::redact(&metadata.to_string(), &self.secrets);
            serde_json::from_str(&masked).unwrap_or(metadata)
        };
        item.provenance = Provenance {
            run_id: Some(self.run_id.clone()),
            task_id: Some(task.to_string()),
            agent: Some(agent.to_string()),
        };
        let vector = self.embed(&item.text).await?;
        let added =
            self.store
                .lock()
                .await
                .add_vectors(self.embedder.as_ref(), &[item], vec![vector])?;
        added
            .into_iter()
            .next()
            // One result per item, so this is the one.
            .ok_or(MemoryError::EmptyText)
    }
}

/// `memory.embedder`: a model under `models:` (OpenAI-compatible `/v1/embeddings`, which
/// covers Ollama), or the built-in offline embedder when unset or `builtin`.
fn embedder_for(wf: &Workflow) -> Result<Box<dyn Embedder>, MemoryError> {
    let dim = wf.memory["dimensions"]
        .as_u64()
        .and_then(|d| usize::try_from(d).ok())
        .unwrap_or(crate::memory::DEFAULT_DIM);
    let named = wf.memory["embedder"].as_str().filter(|n| *n != "builtin");
    match named.and_then(|name| wf.models.get(name)) {
        Some(model) => {
            let base_url =
                model.settings["base_url"]
                    .as_str()
                    .unwrap_or(match model.provider.as_str() {
                        "ollama" => crate::llm::openai::OLLAMA_BASE_URL,
                        _ => crate::llm::openai::DEFAULT_BASE_URL,
                    });
            // As for chat models: OpenAI's key variable by default; local servers need none.
            let key_env =
                model.settings["api_key_env"]
                    .as_str()
                    .unwrap_or(match model.provider.as_str() {
                        "ollama" => "",
                        _ => crate::llm::openai::KEY_ENV,
                    });
            let http = crate::llm::build::http_options(&model.settings)?;
            Ok(Box::new(
                OpenAiEmbedder::new(
                    base_url,
                    model.model.clone().unwrap_or_default(),
                    dim,
                    key_env,
                )
                .with_http(http),
            ))
        }
        None => Ok(Box::new(HashEmbedder::new(dim))),
    }
}

/// What a finished agent task leaves for the lesson call.
pub struct Finished<'a> {
    pub agent: &'a str,
    pub task: &'a str,
    pub model: &'a str,
    pub prompt: &'a str,
    pub answer: &'a Json,
    /// The error of the attempt before, when this one is a retry that succeeded.
    pub earlier_error: Option<&'a str>,
}

/// Asks the model for the lesson of a finished task and stores it: a `task_summary`, or an
/// `error_resolution` (error and fix) when an earlier attempt had failed. Returns the tokens
/// the call used; a model that answers `NONE` stores nothing.
pub async fn synthesize(
    memory: &RunMemory,
    provider: &dyn Provider,
    done: Finished<'_>,
) -> Result<Usage, String> {
    let answer = match done.answer {
        Json::String(text) => text.clone(),
        other => other.to_string(),
    };
    let answer: String = answer.chars().take(ANSWER_CHARS).collect();
    let mut request = format!("Task:\n{}\n\nFinal answer:\n{answer}\n", done.prompt.trim());
    if let Some(error) = done.earlier_error {
        request.push_str(&format!(
            "\nAn earlier attempt at this task failed with:\n{error}\n\nState what fixed it."
        ));
    }
    request.push_str(
        "\nWrite the one lesson from this task most useful for similar tasks later, in at most \
         two sentences, as plain text. If there is nothing worth remembering, reply NONE.",
    );
    let reply = provider
        .chat(
            &ChatRequest {
                model: done.model.to_string(),
                system: "You keep a team's long-term memory: short, specific, reusable lessons."
                    .into(),
                messages: vec![Message::user(request)],
                agent: done.agent.to_string(),
                // A key of its own, so that scripted replies and cassettes can tell this call
                // from the task's conversation.
                task: format!("{}#lesson", done.task),
                turn: 1,
                ..ChatRequest::default()
            },
            None,
        )
        .await
        .map_err(|e| format!("lesson for memory: {e}"))?;
    let lesson = reply.content.trim();
    if lesson.is_empty() || lesson.eq_ignore_ascii_case("none") {
        return Ok(reply.usage);
    }
    let (kind, text) = match done.earlier_error {
        Some(error) => (
            ERROR_RESOLUTION,
            format!("Error: {}\nFix: {lesson}", first_line(error)),
        ),
        None => (TASK_SUMMARY, lesson.to_string()),
    };
    memory
        .store(kind, &text, json!({}), done.task, done.agent)
        .await
        .map_err(|e| format!("storing the lesson: {e}"))?;
    Ok(reply.usage)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// The schema of `memory.search` or (with `store`) `memory.store`.
pub fn tool_spec(store: bool) -> crate::llm::ToolSpec {
    if store {
        crate::llm::ToolSpec {
            name: "memory.store".into(),
            description: "Remember something for later runs: a fact, a decision, or a lesson. \
                          Near-duplicates of what is already remembered are not stored twice."
                .into(),
            parameters: json!({
                "type": "object",
                "required": ["text"],
                "properties": {
                    "text": { "type": "string" },
                    "kind": { "type": "string", "default": "fact",
                              "description": "fact, task_summary, error_resolution, or your own [a-z0-9_]+ kind" },
                    "metadata": { "type": "object" }
                }
            }),
        }
    } else {
        crate::llm::ToolSpec {
            name: "memory.search".into(),
            description: "Search long-term memory (lessons, facts and fixes from earlier runs) \
                          by meaning. Returns the best matches with their kind and score."
                .into(),
            parameters: json!({
                "type": "object",
                "required": ["query"],
                "properties": {
                    "query": { "type": "string" },
                    "kind": { "type": "string" },
                    "k": { "type": "integer", "default": 5, "minimum": 1, "maximum": 50 }
                }
            }),
        }
    }
}

/// `memory.search` / `memory.store` for an agent or a script.
pub async fn tool(env: &super::ToolEnv, store: bool, args: &Json) -> Result<Json, String> {
    let memory = env
        .memory
        .as_ref()
        .ok_or("this workflow has no `memory:`; declare one to use memory tools")?;
    let text_arg = |name: &str| -> Result<String, String> {
        args.get(name)
            .and_then(Json::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("`{name}` (a string) is required"))
    };
    let kind = match args.get("kind") {
        None | Some(Json::Null) => None,
        Some(Json::String(kind)) => Some(kind.clone()),
        Some(other) => return Err(format!("`kind` must be a string, got {other}")),
    };
    if store {
        let text = text_arg("text")?;
        let metadata = args.get("metadata").cloned().unwrap_or_else(|| json!({}));
        let added = memory
            .store(
                kind.as_deref().unwrap_or(crate::memory::FACT),
                &text,
                metadata,
                &env.task,
                &env.agent,
            )
            .await
            .map_err(|e| e.to_string())?;
        return Ok(match added {
            Added::Inserted(id) => json!({ "stored": true, "id": id }),
            Added::Duplicate(id) => json!({ "stored": false, "duplicate_of": id }),
        });
    }
    let query = text_arg("query")?;
    let k = args
        .get("k")
        .and_then(Json::as_u64)
        .map_or(5, |k| k.clamp(1, 50) as usize);
    let hits = memory
        .search(&query, kind.as_deref(), k)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Json::Array(
        hits.into_iter()
            .map(|hit| {
                json!({
                    "id": hit.memory.id,
                    "kind": hit.memory.kind,
                    "text": hit.memory.text,
                    "score": hit.score,
                    "metadata": hit.memory.metadata,
                })
            })
            .collect(),
    ))
}
