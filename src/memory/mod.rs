//! Long-term memory: lessons, facts and summaries that agents store and recall by meaning,
//! kept in the journal's SQLite file.
//!
//! # How it is stored
//!
//! Each memory is a row of `memories` (kind, text, JSON metadata, provenance, an int8 copy of
//! its vector and the IVF cell it belongs to) and a float vector in the sqlite-vec table
//! `memory_vectors` (same rowid). `memory_meta` records the schema version and the embedder
//! (id and dimension) that produced the vectors; `memory_cells` holds the IVF centroids. The
//! journal's own tables and its `user_version` are never touched.
//!
//! # How search works, and what it costs
//!
//! A plain sqlite-vec scan computes a float cosine against every vector (~100 ms at 100,000
//! 384-dim vectors here), and an IVF built on sqlite-vec's `partition key` costs ~0.4 ms per
//! probed cell; neither leaves room for the near-duplicate check each insert needs. So the
//! index is held in process memory and rebuilt from SQLite on first use:
//!
//! - **IVF cells**: spherical k-means centroids (≈ n/256 of them, trained on the int8 copies
//!   when the store first reaches 1,024 memories and again each time it has grown 4×; new
//!   memories join the nearest existing centroid). A query scores the centroids and scans the
//!   nearest cells until it has seen at least `nprobe` cells' worth of *matching* entries, so
//!   a kind or metadata filter makes it probe further instead of returning fewer than `k`
//!   (a filter matching few memories ends as an exact scan of those few).
//! - **int8 scoring**: entries are compared as per-vector-scaled int8 vectors (AVX2 when the
//!   CPU has it); the best few times `k` are re-scored with the exact float vectors read
//!   from sqlite-vec, so the reported scores are exact cosines.
//! - **Dedup**: a new vector is compared with the memories of its kind (a cell keeps one
//!   group per kind) in the cells that could hold one within the duplicate threshold: a
//!   cell whose centroid scores lower than the best by more than `|c_best − c| × r` cannot
//!   (every memory sits in the cell of its nearest centroid), nor one whose members'
//!   cosines with the centroid are all out of reach. At most the nearest four of those are
//!   scanned, skipping members by a bound on residual signs that no near-duplicate can
//!   fail. So the check is exact unless more than four cells qualify, and then a
//!   near-duplicate in a fifth is missed. More than four never qualified in 68,000
//!   inserts into a store of 32,000–100,000 memories (123 cells), but did for 40–80 % of
//!   inserts while the cells were coarse (trained at 2,000 or 8,000 memories: 7 or 31
//!   cells), where the farthest qualifying cells rarely hold one. Measured
//!   on planted near-duplicates, none was missed: 0 of 9,953 at 100,000 memories, 0 of
//!   3,003 at 10,000 (BENCHMARKS.md).
//!
//! Trade-offs: the index costs about `dim + 90` bytes of RAM per memory (≈ 47 MB at
//! 100,000 × 384) and its first use in a process reads every int8 vector (~0.17 s at
//! 100,000, ~16 ms at 10,000). Inserts run at ~26,000 a second at 100,000 memories on one
//! idle core (fewer when other work shares it); half of that time is SQLite (the row, the
//! sqlite-vec vector, WAL checkpoints) and a quarter the dedup check (BENCHMARKS.md).
//! Recall is approximate: a true neighbour in a cell that was not probed is missed
//! (measured recall@10 in BENCHMARKS.md). Another process's writes are noticed through a
//! generation counter and make the next search reload the index.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub mod embed;
mod index;
mod store;

pub use embed::{Embedder, HashEmbedder, OpenAiEmbedder, DEFAULT_DIM};
pub use store::{embed_all, MemoryStore};

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Kinds helix itself writes; any other `[a-z0-9_]+` kind is allowed too.
pub const TASK_SUMMARY: &str = "task_summary";
pub const ERROR_RESOLUTION: &str = "error_resolution";
pub const FACT: &str = "fact";

/// Where a memory came from. All optional: a memory added by hand has none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// A memory to store. `metadata` must be a JSON object (or null for none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMemory {
    pub kind: String,
    pub text: String,
    #[serde(default)]
    pub metadata: Json,
    #[serde(default, flatten)]
    pub provenance: Provenance,
    /// Milliseconds since the Unix epoch; now when not given (an import keeps the original).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
}

impl NewMemory {
    pub fn new(kind: impl Into<String>, text: impl Into<String>) -> NewMemory {
        NewMemory {
            kind: kind.into(),
            text: text.into(),
            metadata: Json::Object(Default::default()),
            provenance: Provenance::default(),
            created_at: None,
        }
    }
}

/// A stored memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub id: i64,
    pub kind: String,
    pub text: String,
    pub metadata: Json,
    #[serde(flatten)]
    pub provenance: Provenance,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
}

/// What `add` did with one memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Inserted(i64),
    /// A memory of the same kind with a near-identical vector (cosine ≥ 0.97) already
    /// existed; nothing was stored.
    Duplicate(i64),
}

impl Added {
    pub fn id(self) -> i64 {
        match self {
            Added::Inserted(id) | Added::Duplicate(id) => id,
        }
    }
}

/// What to search for besides similarity.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOptions {
    pub k: usize,
    pub kind: Option<String>,
    /// Equality on top-level keys of the metadata object; all must match.
    pub metadata: serde_json::Map<String, Json>,
}

impl Default for SearchOptions {
    fn default() -> SearchOptions {
        SearchOptions {
            k: 5,
            kind: None,
            metadata: Default::default(),
        }
    }
}

impl SearchOptions {
    pub fn top(k: usize) -> SearchOptions {
        SearchOptions {
            k,
            ..SearchOptions::default()
        }
    }

    pub fn kind(mut self, kind: impl Into<String>) -> SearchOptions {
        self.kind = Some(kind.into());
        self
    }

    pub fn metadata(mut self, key: impl Into<String>, value: Json) -> SearchOptions {
        self.metadata.insert(key.into(), value);
        self
    }
}

/// A search result: the memory and its cosine similarity to the query (1 is identical).
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub memory: Memory,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub count: u64,
    /// Count per kind, by kind name.
    pub kinds: Vec<(String, u64)>,
    /// The embedder the vectors were made with; `None` while the store is empty.
    pub embedder: Option<String>,
    pub dim: Option<usize>,
    /// IVF cells (1 until the store is large enough to train them).
    pub cells: usize,
    /// The whole database file (journal included), in bytes.
    pub db_bytes: u64,
}

/// What `import` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub inserted: usize,
    pub duplicates: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory store `{path}`: {message}")]
    Open { path: PathBuf, message: String },
    #[error("`{path}` is not a SQLite database or is corrupt ({message}); move it away or set HELIX_HOME to another directory")]
    NotADatabase { path: PathBuf, message: String },
    #[error("`{path}` has a table `{table}` that is not helix's memory store ({detail}); move the file away or set HELIX_HOME to another directory")]
    Foreign {
        path: PathBuf,
        table: String,
        detail: String,
    },
    #[error("memory store `{path}` was written by a newer helix (memory schema {found}, this build reads {supported})")]
    Newer {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("memory was built with embedder {stored} ({stored_dim} dims); this run uses {current} ({current_dim} dims); run `helix memory reindex`")]
    EmbedderMismatch {
        stored: String,
        stored_dim: usize,
        current: String,
        current_dim: usize,
    },
    #[error("memory kind `{0}` is invalid: use lowercase letters, digits and `_` (e.g. `task_summary`, `fact`)")]
    InvalidKind(String),
    #[error("memory text is empty")]
    EmptyText,
    #[error("memory metadata must be a JSON object, not {0}")]
    InvalidMetadata(String),
    #[error("metadata filter key `{0}` cannot be searched: it contains a double quote")]
    InvalidFilterKey(String),
    #[error("embedder {embedder} returned {got} vectors for {expected} texts")]
    EmbeddingCount {
        embedder: String,
        expected: usize,
        got: usize,
    },
    #[error("embedding model `{model}` at {endpoint} returned {got}-dim vectors, but {expected} dims are configured")]
    EmbeddingShape {
        endpoint: String,
        model: String,
        expected: usize,
        got: usize,
    },
    #[error("embedder {0} returned a vector of zeros or non-finite numbers")]
    ZeroVector(String),
    #[error("a vector has {got} dims, but the store's embedder makes {expected}")]
    VectorDim { expected: usize, got: usize },
    #[error("embedding failed: {0}")]
    Embedding(#[from] crate::llm::LlmError),
    #[error("import line {line}: {message}")]
    Import { line: usize, message: String },
    #[error("export failed: {0}")]
    Export(#[from] std::io::Error),
    #[error("memory store query failed: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// A kind is a lowercase identifier, so it can be used in filters and CLI flags as typed.
pub fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
