//! `helix memory`: search, add, list, show, delete, export, import, stats, reindex.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{runtime, EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::memory::{Embedder, HashEmbedder, MemoryStore, NewMemory, SearchOptions};

#[derive(Subcommand)]
pub enum MemoryCommand {
    /// The memories most similar to QUERY.
    Search {
        query: String,
        /// Only memories of this kind (task_summary, error_resolution, fact, or your own).
        #[arg(long)]
        kind: Option<String>,
        #[arg(short = 'k', default_value_t = 5)]
        k: usize,
        #[command(flatten)]
        embedder: EmbedderArgs,
    },
    /// Store a memory.
    Add {
        text: String,
        #[arg(long, default_value = "fact")]
        kind: String,
        /// JSON object of metadata.
        #[arg(long)]
        metadata: Option<String>,
        #[command(flatten)]
        embedder: EmbedderArgs,
    },
    /// The newest memories.
    List {
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One memory with its metadata and provenance.
    Show { id: i64 },
    /// Delete a memory.
    Delete { id: i64 },
    /// Write every memory as JSON lines (to stdout, or FILE).
    Export { file: Option<PathBuf> },
    /// Add the memories of an export (JSON lines), embedding them again.
    Import {
        file: PathBuf,
        #[command(flatten)]
        embedder: EmbedderArgs,
    },
    /// Counts per kind, the embedder, the index and the file size.
    Stats,
    /// Embed every memory again (after changing embedder or dimension).
    Reindex {
        #[command(flatten)]
        embedder: EmbedderArgs,
    },
}

/// Which embedder to use: the built-in offline one unless a provider is named.
#[derive(Args, Clone)]
pub struct EmbedderArgs {
    /// OpenAI-compatible base URL (e.g. http://127.0.0.1:11434/v1 for Ollama) for provider
    /// embeddings; without it, the built-in offline embedder.
    #[arg(long, value_name = "URL")]
    embed_url: Option<String>,
    /// Embedding model at `--embed-url`.
    #[arg(long, value_name = "MODEL", requires = "embed_url")]
    embed_model: Option<String>,
    /// Dimension of the vectors (384 for the built-in embedder).
    #[arg(long, value_name = "N", default_value_t = crate::memory::DEFAULT_DIM)]
    embed_dim: usize,
    /// Environment variable holding the provider's API key.
    #[arg(long, value_name = "VAR", default_value = "OPENAI_API_KEY")]
    embed_key_env: String,
}

impl EmbedderArgs {
    fn build(&self) -> Box<dyn Embedder> {
        match &self.embed_url {
            Some(url) => Box::new(crate::memory::OpenAiEmbedder::new(
                url,
                self.embed_model.clone().unwrap_or_default(),
                self.embed_dim,
                self.embed_key_env.clone(),
            )),
            None => Box::new(HashEmbedder::new(self.embed_dim)),
        }
    }
}

pub fn memory(command: MemoryCommand) -> i32 {
    let home = crate::store::home();
    let mut store = match MemoryStore::open(&home) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    let Ok(rt) = runtime() else {
        return EXIT_FAILED;
    };
    let result = rt.block_on(run(&mut store, command));
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            EXIT_FAILED
        }
    }
}

async fn run(store: &mut MemoryStore, command: MemoryCommand) -> Result<i32, String> {
    let text = |e: crate::memory::MemoryError| e.to_string();
    match command {
        MemoryCommand::Search {
            query,
            kind,
            k,
            embedder,
        } => {
            let embedder = embedder.build();
            let mut options = SearchOptions::top(k);
            if let Some(kind) = kind {
                options = options.kind(kind);
            }
            let hits = store
                .search(embedder.as_ref(), &query, &options)
                .await
                .map_err(text)?;
            if hits.is_empty() {
                println!("no memories match");
            }
            for hit in hits {
                println!(
                    "#{} {:.3} [{}] {}",
                    hit.memory.id,
                    hit.score,
                    hit.memory.kind,
                    one_line(&hit.memory.text)
                );
            }
        }
        MemoryCommand::Add {
            text: memory,
            kind,
            metadata,
            embedder,
        } => {
            let mut item = NewMemory::new(kind, memory);
            if let Some(metadata) = metadata {
                item.metadata = serde_json::from_str(&metadata)
                    .map_err(|e| format!("--metadata must be a JSON object: {e}"))?;
                if !item.metadata.is_object() {
                    return Err("--metadata must be a JSON object".into());
                }
            }
            let embedder = embedder.build();
            let added = store.add(embedder.as_ref(), &[item]).await.map_err(text)?;
            for added in added {
                match added {
                    crate::memory::Added::Inserted(id) => println!("stored #{id}"),
                    crate::memory::Added::Duplicate(id) => {
                        println!("already remembered as #{id} (near-identical); not stored again")
                    }
                }
            }
        }
        MemoryCommand::List { kind, limit } => {
            for memory in store.list(kind.as_deref(), limit).map_err(text)? {
                println!(
                    "#{} [{}] {}",
                    memory.id,
                    memory.kind,
                    one_line(&memory.text)
                );
            }
        }
        MemoryCommand::Show { id } => match store.get(id).map_err(text)? {
            Some(memory) => println!(
                "{}",
                serde_json::to_string_pretty(&memory).map_err(|e| e.to_string())?
            ),
            None => {
                eprintln!("error: no memory #{id}");
                return Ok(EXIT_INVALID);
            }
        },
        MemoryCommand::Delete { id } => {
            if store.delete(id).map_err(text)? {
                println!("deleted #{id}");
            } else {
                eprintln!("error: no memory #{id}");
                return Ok(EXIT_INVALID);
            }
        }
        MemoryCommand::Export { file } => {
            let count = match file {
                Some(path) => {
                    let mut out = std::fs::File::create(&path)
                        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                    store.export(&mut out).map_err(text)?
                }
                None => store.export(&mut std::io::stdout().lock()).map_err(text)?,
            };
            eprintln!("exported {count} memories");
        }
        MemoryCommand::Import { file, embedder } => {
            let jsonl = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let embedder = embedder.build();
            let report = store
                .import(embedder.as_ref(), &jsonl)
                .await
                .map_err(text)?;
            println!(
                "imported {} memories ({} near-duplicates skipped)",
                report.inserted, report.duplicates
            );
        }
        MemoryCommand::Stats => {
            let stats = store.stats().map_err(text)?;
            println!("memories: {}", stats.count);
            for (kind, count) in &stats.kinds {
                println!("  {kind}: {count}");
            }
            match (&stats.embedder, stats.dim) {
                (Some(embedder), Some(dim)) => println!("embedder: {embedder} ({dim} dimensions)"),
                _ => println!("embedder: none yet"),
            }
            println!("index cells: {}", stats.cells);
            println!(
                "database: {} bytes ({})",
                stats.db_bytes,
                store.path().display()
            );
        }
        MemoryCommand::Reindex { embedder } => {
            let embedder = embedder.build();
            let count = store.reindex(embedder.as_ref()).await.map_err(text)?;
            println!("re-embedded {count} memories with {}", embedder.id());
        }
    }
    Ok(EXIT_OK)
}

fn one_line(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 100 {
        format!("{}…", line.chars().take(99).collect::<String>())
    } else {
        line
    }
}
