//! `MemoryStore`: memories in the journal's SQLite file, under their own tables and their own
//! schema version, searched through the in-process `Index`.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Once;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::Value as Json;

use super::embed::normalize;
use super::index::{quantize, Filter, Index, Placed};
use super::{
    valid_kind, Added, Embedder, Hit, ImportReport, Memory, MemoryError, NewMemory, Provenance,
    SearchOptions, Stats,
};
use crate::events::now_ms;

/// The memory tables' own version, in `memory_meta`; the journal's `user_version` is not ours.
const SCHEMA_VERSION: i64 = 1;

/// Cosine at or above which a new memory repeats an existing one of its kind.
pub const DUPLICATE_COSINE: f32 = 0.97;

/// Candidates re-scored with exact float vectors, beyond `k`.
const RESCORE_EXTRA: usize = 10;

/// Vectors per sqlite-vec chunk. Reading one vector walks its chunk's overflow pages from
/// the start, so the default of 1,024 (1.5 MB at 384 dims) made each exact re-scoring read
/// cost ~0.3 ms; 64 keeps a chunk at ~24 pages.
const VECTOR_CHUNK: usize = 64;

/// Texts per embedder call during import and reindex.
const EMBED_BATCH: usize = 256;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS memory_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    run_id TEXT,
    task_id TEXT,
    agent TEXT,
    created_at INTEGER NOT NULL,
    cell INTEGER NOT NULL,
    scale REAL NOT NULL,
    code BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS memories_by_kind ON memories (kind, created_at);
CREATE INDEX IF NOT EXISTS memories_by_time ON memories (created_at);
CREATE TABLE IF NOT EXISTS memory_cells (cell INTEGER PRIMARY KEY, centroid BLOB NOT NULL);
";

/// The columns `memories` must have for a file to be ours.
const MEMORY_COLUMNS: &[&str] = &[
    "id",
    "kind",
    "text",
    "metadata",
    "run_id",
    "task_id",
    "agent",
    "created_at",
    "cell",
    "scale",
    "code",
];

const MEMORY_ROW: &str = "id, kind, text, metadata, run_id, task_id, agent, created_at";

/// Registers sqlite-vec with every connection opened afterwards in this process.
fn register_sqlite_vec() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: `sqlite3_vec_init` has the signature SQLite's auto-extension mechanism
        // calls; the transmute only erases it to the generic entry point type.
        #[allow(clippy::missing_transmute_annotations)]
        unsafe {
            rusqlite::ffi::sqlite3_auto_extension(Some(std::mem::transmute(
                sqlite_vec::sqlite3_vec_init as *const (),
            )));
        }
    });
}

pub struct MemoryStore {
    conn: Connection,
    path: PathBuf,
    /// Loaded on first use, and again when another process has written.
    index: Option<Index>,
    /// The `generation` of `memory_meta` the index reflects.
    generation: i64,
}

impl MemoryStore {
    /// Opens (creating if needed) the memory tables in `<home>/helix.db`, the journal's file.
    pub fn open(home: &Path) -> Result<MemoryStore, MemoryError> {
        register_sqlite_vec();
        let path = home.join("helix.db");
        let open_err = |message: String| MemoryError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(home)
            .map_err(|e| open_err(format!("cannot create {}: {e}", home.display())))?;
        check_header(&path)?;
        let conn = Connection::open(&path).map_err(|e| open_err(e.to_string()))?;
        let not_db = |e: rusqlite::Error| MemoryError::NotADatabase {
            path: path.clone(),
            message: e.to_string(),
        };
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| open_err(e.to_string()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(not_db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(not_db)?;
        // Exact re-scoring reads vectors from sqlite-vec's chunks; a 32 MiB page cache
        // (instead of 2) keeps the hot ones out of system calls.
        conn.pragma_update(None, "cache_size", -32768)
            .map_err(not_db)?;
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(not_db)?;
        check_ours(&conn, &path, &tables)?;
        let journal_version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(not_db)?;
        if journal_version == 0 {
            // The journal refuses a fresh file that already has other tables, so it must
            // exist before ours do.
            crate::store::Journal::open(home).map_err(|e| open_err(e.to_string()))?;
        }
        conn.execute_batch(SCHEMA)?;
        let found: Option<i64> = meta(&conn, "schema")?.and_then(|v| v.parse().ok());
        match found {
            Some(found) if found > SCHEMA_VERSION => {
                return Err(MemoryError::Newer {
                    path,
                    found,
                    supported: SCHEMA_VERSION,
                })
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT OR REPLACE INTO memory_meta (key, value) VALUES ('schema', ?1), ('generation', '0')",
                    params![SCHEMA_VERSION.to_string()],
                )?;
            }
        }
        Ok(MemoryStore {
            conn,
            path,
            index: None,
            generation: -1,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The embedder and dimension the stored vectors were made with (`None` when no vector
    /// has been stored yet).
    pub fn embedder(&self) -> Result<Option<(String, usize)>, MemoryError> {
        let id = meta(&self.conn, "embedder")?;
        let dim = meta(&self.conn, "dim")?.and_then(|d| d.parse().ok());
        Ok(id.zip(dim))
    }

    /// Fails with a message that says to reindex when `embedder` is not the one the stored
    /// vectors were made with.
    pub fn check_embedder(&self, embedder: &dyn Embedder) -> Result<(), MemoryError> {
        match self.embedder()? {
            Some((stored, stored_dim))
                if stored != embedder.id() || stored_dim != embedder.dim() =>
            {
                Err(MemoryError::EmbedderMismatch {
                    stored,
                    stored_dim,
                    current: embedder.id(),
                    current_dim: embedder.dim(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Embeds and stores `items` in one transaction. A memory near-identical to an existing
    /// one of its kind (or to an earlier one of the batch) is not stored again.
    pub async fn add(
        &mut self,
        embedder: &dyn Embedder,
        items: &[NewMemory],
    ) -> Result<Vec<Added>, MemoryError> {
        self.check_embedder(embedder)?;
        for item in items {
            validate(item)?;
        }
        let texts: Vec<String> = items.iter().map(|m| m.text.clone()).collect();
        let vectors = embed_all(embedder, &texts).await?;
        self.add_vectors(embedder, items, vectors)
    }

    /// `add` with vectors made elsewhere by `embedder` (one per item, in order).
    pub fn add_vectors(
        &mut self,
        embedder: &dyn Embedder,
        items: &[NewMemory],
        vectors: Vec<Vec<f32>>,
    ) -> Result<Vec<Added>, MemoryError> {
        self.check_embedder(embedder)?;
        if vectors.len() != items.len() {
            return Err(MemoryError::EmbeddingCount {
                embedder: embedder.id(),
                expected: items.len(),
                got: vectors.len(),
            });
        }
        for (item, vector) in items.iter().zip(&vectors) {
            validate(item)?;
            check_vector(embedder, vector)?;
        }
        let result = self.insert(embedder, items, vectors);
        if result.is_err() {
            // The transaction rolled back; the index may hold entries that are not stored.
            self.index = None;
        }
        let added = result?;
        self.train_if_due()?;
        Ok(added)
    }

    fn insert(
        &mut self,
        embedder: &dyn Embedder,
        items: &[NewMemory],
        vectors: Vec<Vec<f32>>,
    ) -> Result<Vec<Added>, MemoryError> {
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        if meta(&tx, "embedder")?.is_none() {
            adopt_embedder(&tx, embedder)?;
        }
        let generation = generation(&tx)?;
        if self.index.is_none() || generation != self.generation {
            self.index = Some(load_index(&tx, embedder.dim())?);
        }
        let index = self.index.as_mut().expect("loaded above");
        let now = now_ms();
        let mut added = Vec::with_capacity(items.len());
        {
            let mut insert_row = tx.prepare_cached(
                "INSERT INTO memories (kind, text, metadata, run_id, task_id, agent, created_at, cell, scale, code)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let mut insert_vector =
                tx.prepare_cached("INSERT INTO memory_vectors (rowid, embedding) VALUES (?1, ?2)")?;
            let mut vectors = vectors;
            vectors.iter_mut().for_each(|v| normalize(v));
            // Placed all at once, while the centroids are in cache (the SQLite writes in
            // between pushed them out: ~2.5 µs a memory at 123 cells).
            let placed_all: Vec<Placed> = vectors.iter().map(|v| index.place(v)).collect();
            for ((item, vector), placed) in items.iter().zip(vectors).zip(placed_all) {
                if let Some(existing) = duplicate_of(&tx, index, &vector, &placed, &item.kind)? {
                    added.push(Added::Duplicate(existing));
                    continue;
                }
                let metadata = match &item.metadata {
                    Json::Null => "{}".to_string(),
                    other => other.to_string(),
                };
                insert_row.execute(params![
                    item.kind,
                    item.text,
                    metadata,
                    item.provenance.run_id,
                    item.provenance.task_id,
                    item.provenance.agent,
                    item.created_at.unwrap_or(now) as i64,
                    placed.cell as i64,
                    placed.q.scale,
                    i8_bytes(&placed.q.code),
                ])?;
                let id = tx.last_insert_rowid();
                insert_vector.execute(params![id, f32_bytes(&vector)])?;
                index.insert(id, &item.kind, placed.cell, &placed.q, Some(placed.cos));
                added.push(Added::Inserted(id));
            }
        }
        self.generation = bump_generation(&tx)?;
        tx.commit()?;
        Ok(added)
    }

    /// Trains the IVF cells when the store has grown past the next threshold.
    fn train_if_due(&mut self) -> Result<(), MemoryError> {
        let Some(index) = self.index.as_mut() else {
            return Ok(());
        };
        if !index.wants_training() {
            return Ok(());
        }
        let moves = index.train(index.len() as u64);
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let result = (|| {
            if generation(&tx)? != self.generation {
                // Someone else wrote meanwhile; they (or the next add) will train.
                return Ok(false);
            }
            tx.execute("DELETE FROM memory_cells", [])?;
            {
                let mut cell_row =
                    tx.prepare_cached("INSERT INTO memory_cells (cell, centroid) VALUES (?1, ?2)")?;
                for (i, centroid) in index.centroids().chunks_exact(index.dim()).enumerate() {
                    cell_row.execute(params![i as i64, f32_bytes(centroid)])?;
                }
                let mut move_row =
                    tx.prepare_cached("UPDATE memories SET cell = ?2 WHERE id = ?1")?;
                for (id, cell) in &moves {
                    move_row.execute(params![id, cell])?;
                }
            }
            set_meta(&tx, "trained_at", &index.trained_at.to_string())?;
            self.generation = bump_generation(&tx)?;
            Ok::<_, MemoryError>(true)
        })();
        match result {
            Ok(true) => Ok(tx.commit()?),
            Ok(false) => {
                self.index = None;
                Ok(())
            }
            Err(e) => {
                self.index = None;
                Err(e)
            }
        }
    }

    /// The `options.k` memories most similar to `text`, best first.
    pub async fn search(
        &mut self,
        embedder: &dyn Embedder,
        text: &str,
        options: &SearchOptions,
    ) -> Result<Vec<Hit>, MemoryError> {
        self.check_embedder(embedder)?;
        let texts = [text.to_string()];
        let mut vectors = embed_all(embedder, &texts).await?;
        let vector = vectors.pop().unwrap_or_default();
        self.search_vector(embedder, &vector, options)
    }

    /// `search` with a query vector made elsewhere by `embedder`.
    pub fn search_vector(
        &mut self,
        embedder: &dyn Embedder,
        vector: &[f32],
        options: &SearchOptions,
    ) -> Result<Vec<Hit>, MemoryError> {
        self.check_embedder(embedder)?;
        if self.embedder()?.is_none() || options.k == 0 {
            return Ok(Vec::new());
        }
        check_vector(embedder, vector)?;
        let mut query = vector.to_vec();
        normalize(&mut query);
        let generation = generation(&self.conn)?;
        if self.index.is_none() || generation != self.generation {
            self.index = Some(load_index(&self.conn, embedder.dim())?);
            self.generation = generation;
        }
        let index = self.index.as_ref().expect("loaded above");
        let kind = match &options.kind {
            Some(kind) => match index.kind_id(kind) {
                Some(id) => Some(id),
                None => return Ok(Vec::new()),
            },
            None => None,
        };
        let ids = if options.metadata.is_empty() {
            None
        } else {
            Some(metadata_matches(&self.conn, options)?)
        };
        let filter = Filter {
            kind,
            ids: ids.as_ref(),
        };
        let candidates = index.search(&query, options.k + RESCORE_EXTRA, &filter);
        // Exact cosines for the candidates, from the float vectors.
        let mut scored = Vec::with_capacity(candidates.len());
        let mut read_vector = self
            .conn
            .prepare_cached("SELECT embedding FROM memory_vectors WHERE rowid = ?1")?;
        for (_, id) in candidates {
            let bytes: Vec<u8> = read_vector.query_row(params![id], |r| r.get(0))?;
            scored.push((cosine(&query, &bytes_f32(&bytes)), id));
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.truncate(options.k);
        let mut hits = Vec::with_capacity(scored.len());
        for (score, id) in scored {
            if let Some(memory) = self.get(id)? {
                hits.push(Hit { memory, score });
            }
        }
        Ok(hits)
    }

    pub fn get(&self, id: i64) -> Result<Option<Memory>, MemoryError> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {MEMORY_ROW} FROM memories WHERE id = ?1"))?
            .query_row(params![id], memory_row)
            .optional()?)
    }

    /// The newest `limit` memories, of one kind or of all.
    pub fn list(&self, kind: Option<&str>, limit: usize) -> Result<Vec<Memory>, MemoryError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {MEMORY_ROW} FROM memories WHERE ?1 IS NULL OR kind = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(params![kind, limit as i64], memory_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Deletes a memory; false if there was none with that id.
    pub fn delete(&mut self, id: i64) -> Result<bool, MemoryError> {
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let stale = generation(&tx)? != self.generation;
        let deleted = tx.execute("DELETE FROM memories WHERE id = ?1", params![id])? > 0;
        if deleted {
            tx.execute("DELETE FROM memory_vectors WHERE rowid = ?1", params![id])?;
            self.generation = bump_generation(&tx)?;
        }
        tx.commit()?;
        match self.index.as_mut() {
            Some(index) if !stale => {
                index.remove(id);
            }
            _ => self.index = None,
        }
        Ok(deleted)
    }

    pub fn stats(&self) -> Result<Stats, MemoryError> {
        let kinds: Vec<(String, u64)> = self
            .conn
            .prepare(
                "SELECT kind, count(*) FROM memories GROUP BY kind ORDER BY count(*) DESC, kind",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        let cells: i64 = self
            .conn
            .query_row("SELECT count(*) FROM memory_cells", [], |r| r.get(0))?;
        let db_bytes: i64 = self.conn.query_row(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |r| r.get(0),
        )?;
        let embedder = self.embedder()?;
        Ok(Stats {
            count: kinds.iter().map(|(_, n)| n).sum(),
            kinds,
            embedder: embedder.as_ref().map(|(id, _)| id.clone()),
            dim: embedder.map(|(_, dim)| dim),
            cells: (cells as usize).max(1),
            db_bytes: db_bytes as u64,
        })
    }

    /// Writes every memory as one JSON object per line (kind, text, metadata, provenance,
    /// created_at; no vectors: `import` embeds again). Returns how many were written.
    pub fn export(&self, out: &mut dyn Write) -> Result<usize, MemoryError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {MEMORY_ROW} FROM memories ORDER BY id"))?;
        let mut rows = stmt.query([])?;
        let mut count = 0;
        while let Some(row) = rows.next()? {
            let memory = memory_row(row)?;
            let line = NewMemory {
                kind: memory.kind,
                text: memory.text,
                metadata: memory.metadata,
                provenance: memory.provenance,
                created_at: Some(memory.created_at),
            };
            serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
            count += 1;
        }
        out.flush()?;
        Ok(count)
    }

    /// Adds the memories of an `export` (JSON lines), embedding them with `embedder`.
    /// Nothing is stored if any line is invalid.
    pub async fn import(
        &mut self,
        embedder: &dyn Embedder,
        jsonl: &str,
    ) -> Result<ImportReport, MemoryError> {
        let mut items = Vec::new();
        for (n, line) in jsonl.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let import_err = |message: String| MemoryError::Import {
                line: n + 1,
                message,
            };
            let item: NewMemory =
                serde_json::from_str(line).map_err(|e| import_err(e.to_string()))?;
            validate(&item).map_err(|e| import_err(e.to_string()))?;
            items.push(item);
        }
        let added = self.add(embedder, &items).await?;
        let inserted = added
            .iter()
            .filter(|a| matches!(a, Added::Inserted(_)))
            .count();
        Ok(ImportReport {
            inserted,
            duplicates: added.len() - inserted,
        })
    }

    /// Embeds every memory again with `embedder` (after a change of embedder or dimension)
    /// and rebuilds the index. Returns how many memories were re-embedded.
    pub async fn reindex(&mut self, embedder: &dyn Embedder) -> Result<usize, MemoryError> {
        let rows: Vec<(i64, String)> = self
            .conn
            .prepare("SELECT id, text FROM memories ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let texts: Vec<String> = rows.iter().map(|(_, t)| t.clone()).collect();
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            vectors.extend(embed_all(embedder, batch).await?);
        }
        for vector in &vectors {
            check_vector(embedder, vector)?;
        }
        self.index = None;
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        tx.execute_batch("DROP TABLE IF EXISTS memory_vectors; DELETE FROM memory_cells;")?;
        tx.execute("DELETE FROM memory_meta WHERE key = 'trained_at'", [])?;
        adopt_embedder(&tx, embedder)?;
        {
            let mut insert_vector =
                tx.prepare_cached("INSERT INTO memory_vectors (rowid, embedding) VALUES (?1, ?2)")?;
            let mut update_row = tx.prepare_cached(
                "UPDATE memories SET cell = 0, scale = ?2, code = ?3 WHERE id = ?1",
            )?;
            for ((id, _), mut vector) in rows.iter().zip(vectors) {
                normalize(&mut vector);
                let q = quantize(&vector);
                insert_vector.execute(params![id, f32_bytes(&vector)])?;
                update_row.execute(params![id, q.scale, i8_bytes(&q.code)])?;
            }
        }
        self.generation = bump_generation(&tx)?;
        tx.commit()?;
        self.index = Some(load_index(&self.conn, embedder.dim())?);
        self.train_if_due()?;
        Ok(rows.len())
    }
}

/// A file that exists but does not start like a SQLite database is refused before SQLite
/// sees it (SQLite would only fail later, on the first query).
fn check_header(path: &Path) -> Result<(), MemoryError> {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(());
    };
    let mut header = [0u8; 16];
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => {
                return Err(MemoryError::Open {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })
            }
        }
    }
    if read == 0 || header[..read] == b"SQLite format 3\0"[..read] && read == 16 {
        return Ok(());
    }
    Err(MemoryError::NotADatabase {
        path: path.to_path_buf(),
        message: "it does not start with the SQLite header".to_string(),
    })
}

/// Refuses a file whose memory tables were made by something else.
fn check_ours(conn: &Connection, path: &Path, tables: &[String]) -> Result<(), MemoryError> {
    let has = |name: &str| tables.iter().any(|t| t == name);
    let foreign = |table: &str, detail: String| MemoryError::Foreign {
        path: path.to_path_buf(),
        table: table.to_string(),
        detail,
    };
    let ours = ["memories", "memory_cells", "memory_vectors"];
    if !has("memory_meta") {
        if let Some(table) = ours.into_iter().find(|t| has(t)) {
            return Err(foreign(table, "there is no `memory_meta` table".into()));
        }
    }
    if has("memory_meta") {
        let columns = table_columns(conn, "memory_meta")?;
        if columns != ["key", "value"] {
            return Err(foreign(
                "memory_meta",
                format!("its columns are {}", columns.join(", ")),
            ));
        }
        if meta(conn, "schema")?.is_none() {
            return Err(foreign("memory_meta", "it has no `schema` entry".into()));
        }
    }
    if has("memories") {
        let columns = table_columns(conn, "memories")?;
        if let Some(missing) = MEMORY_COLUMNS
            .iter()
            .find(|c| !columns.iter().any(|k| k == *c))
        {
            return Err(foreign("memories", format!("it has no `{missing}` column")));
        }
    }
    Ok(())
}

fn table_columns(conn: &Connection, table: &str) -> Result<Vec<String>, MemoryError> {
    Ok(conn
        .prepare(&format!(
            "SELECT name FROM pragma_table_info('{table}') ORDER BY cid"
        ))?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

fn meta(conn: &Connection, key: &str) -> Result<Option<String>, MemoryError> {
    Ok(conn
        .prepare_cached("SELECT value FROM memory_meta WHERE key = ?1")?
        .query_row(params![key], |r| r.get(0))
        .optional()?)
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<(), MemoryError> {
    conn.execute(
        "INSERT OR REPLACE INTO memory_meta (key, value) VALUES (?1, ?2)",
        params![key, value],
    )?;
    Ok(())
}

/// Counts writes to the memory tables, so a process notices another's and reloads.
fn generation(conn: &Connection) -> Result<i64, MemoryError> {
    Ok(meta(conn, "generation")?
        .and_then(|g| g.parse().ok())
        .unwrap_or(0))
}

fn bump_generation(conn: &Connection) -> Result<i64, MemoryError> {
    let next = generation(conn)? + 1;
    set_meta(conn, "generation", &next.to_string())?;
    Ok(next)
}

/// Records `embedder` as the store's and creates the vector table of its dimension.
fn adopt_embedder(conn: &Connection, embedder: &dyn Embedder) -> Result<(), MemoryError> {
    set_meta(conn, "embedder", &embedder.id())?;
    set_meta(conn, "dim", &embedder.dim().to_string())?;
    conn.execute_batch(&format!(
        "CREATE VIRTUAL TABLE IF NOT EXISTS memory_vectors USING vec0(embedding float[{}] distance_metric=cosine, chunk_size={VECTOR_CHUNK})",
        embedder.dim()
    ))?;
    Ok(())
}

fn load_index(conn: &Connection, dim: usize) -> Result<Index, MemoryError> {
    let centroids: Vec<f32> = conn
        .prepare("SELECT centroid FROM memory_cells ORDER BY cell")?
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .map(|b| b.map(|b| bytes_f32(&b)))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    let trained_at = meta(conn, "trained_at")?
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let mut index = Index::new(dim, centroids, trained_at);
    let mut stmt = conn.prepare("SELECT id, kind, cell, scale, code FROM memories")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let code: Vec<u8> = row.get(4)?;
        let q = super::index::Quantized {
            scale: row.get::<_, f64>(3)? as f32,
            code: code.into_iter().map(|b| b as i8).collect(),
        };
        if q.code.len() != dim {
            continue;
        }
        let kind: String = row.get(1)?;
        index.insert(row.get(0)?, &kind, row.get::<_, i64>(2)? as usize, &q, None);
    }
    Ok(index)
}

/// An existing memory of `kind` whose vector has cosine ≥ `DUPLICATE_COSINE` with `vector`,
/// looked for in the cells nearest to it (see `Index::near`).
fn duplicate_of(
    conn: &Connection,
    index: &Index,
    vector: &[f32],
    placed: &Placed,
    kind: &str,
) -> Result<Option<i64>, MemoryError> {
    let candidates = index.near(vector, placed, kind, DUPLICATE_COSINE);
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut read_vector =
        conn.prepare_cached("SELECT embedding FROM memory_vectors WHERE rowid = ?1")?;
    for (_, id) in candidates {
        let bytes: Vec<u8> = read_vector.query_row(params![id], |r| r.get(0))?;
        if cosine(vector, &bytes_f32(&bytes)) >= DUPLICATE_COSINE {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Ids of the memories whose metadata has every key of the filter with an equal value (and
/// of the filter's kind, if any).
fn metadata_matches(
    conn: &Connection,
    options: &SearchOptions,
) -> Result<HashSet<i64>, MemoryError> {
    let mut sql = String::from("SELECT id FROM memories WHERE (?1 IS NULL OR kind = ?1)");
    let mut values: Vec<String> = Vec::new();
    for (key, value) in &options.metadata {
        if key.contains('"') {
            return Err(MemoryError::InvalidFilterKey(key.clone()));
        }
        let path = format!("$.\"{key}\"");
        let n = values.len() + 2;
        // json_type tells a stored null from a missing key; json_extract compares values
        // (objects and arrays as minified JSON text).
        sql.push_str(&format!(
            " AND json_type(metadata, ?{n}) IS NOT NULL AND json_extract(metadata, ?{n}) IS json_extract(?{}, '$')",
            n + 1
        ));
        values.push(path);
        values.push(value.to_string());
    }
    let mut stmt = conn.prepare(&sql)?;
    let mut bind: Vec<&dyn rusqlite::ToSql> = vec![&options.kind];
    bind.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
    let ids = stmt
        .query_map(bind.as_slice(), |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(ids)
}

fn memory_row(row: &rusqlite::Row) -> rusqlite::Result<Memory> {
    let metadata: String = row.get(3)?;
    Ok(Memory {
        id: row.get(0)?,
        kind: row.get(1)?,
        text: row.get(2)?,
        metadata: serde_json::from_str(&metadata).unwrap_or(Json::Null),
        provenance: Provenance {
            run_id: row.get(4)?,
            task_id: row.get(5)?,
            agent: row.get(6)?,
        },
        created_at: row.get::<_, i64>(7)? as u64,
    })
}

fn validate(item: &NewMemory) -> Result<(), MemoryError> {
    if !valid_kind(&item.kind) {
        return Err(MemoryError::InvalidKind(item.kind.clone()));
    }
    if item.text.trim().is_empty() {
        return Err(MemoryError::EmptyText);
    }
    match &item.metadata {
        Json::Object(_) | Json::Null => Ok(()),
        other => Err(MemoryError::InvalidMetadata(other.to_string())),
    }
}

fn check_vector(embedder: &dyn Embedder, vector: &[f32]) -> Result<(), MemoryError> {
    if vector.len() != embedder.dim() {
        return Err(MemoryError::VectorDim {
            expected: embedder.dim(),
            got: vector.len(),
        });
    }
    if !vector.iter().all(|x| x.is_finite()) || vector.iter().all(|x| *x == 0.0) {
        return Err(MemoryError::ZeroVector(embedder.id()));
    }
    Ok(())
}

/// One vector per text, or an error naming the embedder when it gave another count.
pub async fn embed_all(
    embedder: &dyn Embedder,
    texts: &[String],
) -> Result<Vec<Vec<f32>>, MemoryError> {
    let vectors = embedder.embed(texts).await?;
    if vectors.len() != texts.len() {
        return Err(MemoryError::EmbeddingCount {
            embedder: embedder.id(),
            expected: texts.len(),
            got: vectors.len(),
        });
    }
    Ok(vectors)
}

/// Cosine of a unit vector with any vector.
fn cosine(unit: &[f32], other: &[f32]) -> f32 {
    let dot: f32 = unit.iter().zip(other).map(|(a, b)| a * b).sum();
    let norm = other.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        0.0
    } else {
        dot / norm
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn i8_bytes(v: &[i8]) -> Vec<u8> {
    v.iter().map(|x| *x as u8).collect()
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write as _};
    use std::net::TcpListener;

    use serde_json::json;

    use super::*;
    use crate::llm::{HttpOptions, RetryPolicy};
    use crate::memory::{HashEmbedder, OpenAiEmbedder, ERROR_RESOLUTION, FACT, TASK_SUMMARY};

    fn memory(kind: &str, text: &str) -> NewMemory {
        NewMemory::new(kind, text)
    }

    fn lessons() -> Vec<NewMemory> {
        vec![
            memory(
                ERROR_RESOLUTION,
                "cargo build failed with a linker error; installing clang fixed it",
            ),
            memory(
                TASK_SUMMARY,
                "Wrote the REST handler for user signup and its tests",
            ),
            memory(FACT, "The staging database is PostgreSQL 16 on port 5433"),
            memory(
                ERROR_RESOLUTION,
                "pytest timed out on the network test; raising the timeout to 60s fixed it",
            ),
            memory(FACT, "Deploys go through the release branch, never main"),
        ]
    }

    async fn store_with_lessons(home: &Path) -> MemoryStore {
        let mut store = MemoryStore::open(home).unwrap();
        let added = store
            .add(&HashEmbedder::default(), &lessons())
            .await
            .unwrap();
        assert!(added.iter().all(|a| matches!(a, Added::Inserted(_))));
        store
    }

    #[tokio::test]
    async fn a_query_sharing_words_with_a_memory_ranks_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_lessons(dir.path()).await;
        let e = HashEmbedder::default();
        let hits = store
            .search(
                &e,
                "which port does the staging database use?",
                &SearchOptions::top(3),
            )
            .await
            .unwrap();
        assert_eq!(hits.len(), 3);
        assert_eq!(
            hits[0].memory.text,
            "The staging database is PostgreSQL 16 on port 5433"
        );
        assert!(hits[0].score > hits[1].score);
        let hits = store
            .search(&e, "linker error in cargo build", &SearchOptions::top(1))
            .await
            .unwrap();
        assert_eq!(hits[0].memory.kind, ERROR_RESOLUTION);
        assert!(hits[0].memory.text.starts_with("cargo build failed"));
    }

    #[tokio::test]
    async fn kind_and_metadata_filters_restrict_results() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = MemoryStore::open(dir.path()).unwrap();
        let e = HashEmbedder::default();
        let mut items = lessons();
        items[0].metadata = json!({ "repo": "helix", "lang": "rust" });
        items[3].metadata = json!({ "repo": "other", "lang": "python" });
        items[2].metadata = json!({ "repo": "helix" });
        store.add(&e, &items).await.unwrap();

        let facts = store
            .search(&e, "fixed it", &SearchOptions::top(10).kind(FACT))
            .await
            .unwrap();
        assert_eq!(facts.len(), 2);
        assert!(facts.iter().all(|h| h.memory.kind == FACT));

        let helix = store
            .search(
                &e,
                "fixed it",
                &SearchOptions::top(10).metadata("repo", json!("helix")),
            )
            .await
            .unwrap();
        let mut texts: Vec<&str> = helix.iter().map(|h| h.memory.text.as_str()).collect();
        texts.sort();
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert!(texts[0].starts_with("The staging"));
        assert!(texts[1].starts_with("cargo build"));

        let both = SearchOptions::top(10)
            .kind(ERROR_RESOLUTION)
            .metadata("repo", json!("helix"))
            .metadata("lang", json!("rust"));
        let hits = store.search(&e, "anything", &both).await.unwrap();
        assert_eq!(hits.len(), 1);
        assert!(hits[0].memory.text.starts_with("cargo build"));

        let none = store
            .search(&e, "fixed it", &SearchOptions::top(10).kind("no_such_kind"))
            .await
            .unwrap();
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn near_identical_text_is_reported_as_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_lessons(dir.path()).await;
        let e = HashEmbedder::default();
        let first = store.list(Some(FACT), 10).unwrap();
        let original = first
            .iter()
            .find(|m| m.text.starts_with("Deploys"))
            .unwrap()
            .id;
        let again = store
            .add(
                &e,
                &[
                    memory(FACT, "deploys go through the release branch, never main."),
                    // Same text, other kind: not a duplicate.
                    memory(
                        TASK_SUMMARY,
                        "Deploys go through the release branch, never main",
                    ),
                    memory(FACT, "Deploys go through the hotfix branch on Fridays"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(again[0], Added::Duplicate(original));
        assert!(matches!(again[1], Added::Inserted(_)));
        assert!(matches!(again[2], Added::Inserted(_)));
        assert_eq!(store.stats().unwrap().count, 7);

        // Within one batch, too.
        let batch = store
            .add(
                &e,
                &[
                    memory(FACT, "Lint with clippy"),
                    memory(FACT, "lint with Clippy!"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(batch[1], Added::Duplicate(batch[0].id()));
    }

    #[tokio::test]
    async fn deleted_memories_are_gone_from_search_and_get() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_lessons(dir.path()).await;
        let e = HashEmbedder::default();
        let hits = store
            .search(&e, "staging database port", &SearchOptions::top(1))
            .await
            .unwrap();
        let id = hits[0].memory.id;
        assert!(store.delete(id).unwrap());
        assert!(!store.delete(id).unwrap());
        assert_eq!(store.get(id).unwrap(), None);
        let hits = store
            .search(&e, "staging database port", &SearchOptions::top(5))
            .await
            .unwrap();
        assert_eq!(hits.len(), 4);
        assert!(hits.iter().all(|h| h.memory.id != id));
        // The text can be stored again: it is no longer a duplicate.
        let again = store
            .add(
                &e,
                &[memory(
                    FACT,
                    "The staging database is PostgreSQL 16 on port 5433",
                )],
            )
            .await
            .unwrap();
        assert!(matches!(again[0], Added::Inserted(_)));
    }

    #[tokio::test]
    async fn list_is_newest_first_and_filters_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_lessons(dir.path()).await;
        let mut old = memory(FACT, "An old fact");
        old.created_at = Some(1);
        store.add(&HashEmbedder::default(), &[old]).await.unwrap();
        let facts = store.list(Some(FACT), 10).unwrap();
        assert_eq!(facts.len(), 3);
        assert_eq!(facts[2].text, "An old fact");
        assert_eq!(store.list(None, 2).unwrap().len(), 2);
        let stats = store.stats().unwrap();
        assert_eq!(stats.count, 6);
        assert_eq!(stats.kinds[0], (FACT.to_string(), 3));
        assert_eq!(stats.embedder.as_deref(), Some("helix-hash-v1"));
        assert_eq!(stats.dim, Some(384));
        assert!(stats.db_bytes > 0);
    }

    #[tokio::test]
    async fn export_then_import_into_a_fresh_store_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_lessons(dir.path()).await;
        let mut with_provenance = memory(TASK_SUMMARY, "Reviewed the sandbox limits");
        with_provenance.metadata = json!({ "pr": 42 });
        with_provenance.provenance = Provenance {
            run_id: Some("r1".into()),
            task_id: Some("review".into()),
            agent: Some("reviewer".into()),
        };
        store
            .add(&HashEmbedder::default(), &[with_provenance])
            .await
            .unwrap();
        let mut out = Vec::new();
        assert_eq!(store.export(&mut out).unwrap(), 6);

        let other = tempfile::tempdir().unwrap();
        let mut fresh = MemoryStore::open(other.path()).unwrap();
        let e = HashEmbedder::default();
        let report = fresh
            .import(&e, std::str::from_utf8(&out).unwrap())
            .await
            .unwrap();
        assert_eq!(
            report,
            ImportReport {
                inserted: 6,
                duplicates: 0
            }
        );
        let mut a = store.list(None, 100).unwrap();
        let mut b = fresh.list(None, 100).unwrap();
        for m in a.iter_mut().chain(b.iter_mut()) {
            m.id = 0;
        }
        a.sort_by(|x, y| x.text.cmp(&y.text));
        b.sort_by(|x, y| x.text.cmp(&y.text));
        assert_eq!(a, b);
        let hit = fresh
            .search(&e, "sandbox limits review", &SearchOptions::top(1))
            .await
            .unwrap();
        assert_eq!(hit[0].memory.provenance.agent.as_deref(), Some("reviewer"));
        // Importing the same again only finds duplicates.
        let report = fresh
            .import(&e, std::str::from_utf8(&out).unwrap())
            .await
            .unwrap();
        assert_eq!(
            report,
            ImportReport {
                inserted: 0,
                duplicates: 6
            }
        );
        // A bad line is reported with its number, and nothing is stored.
        let err = fresh
            .import(
                &e,
                "{\"kind\":\"fact\",\"text\":\"ok\"}\n{\"kind\":\"Bad Kind\",\"text\":\"x\"}\n",
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("import line 2: memory kind `Bad Kind`"),
            "{err}"
        );
        assert_eq!(fresh.stats().unwrap().count, 6);
    }

    #[tokio::test]
    async fn another_embedder_is_refused_until_reindex() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_lessons(dir.path()).await;
        let wide = HashEmbedder::new(512);
        let err = store
            .search(&wide, "database", &SearchOptions::top(1))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory was built with embedder helix-hash-v1 (384 dims); this run uses helix-hash-v1 (512 dims); run `helix memory reindex`"
        );
        assert!(store.add(&wide, &[memory(FACT, "x")]).await.is_err());

        assert_eq!(store.reindex(&wide).await.unwrap(), 5);
        let hits = store
            .search(&wide, "staging database port", &SearchOptions::top(1))
            .await
            .unwrap();
        assert!(hits[0].memory.text.starts_with("The staging database"));
        assert!((hits[0].score - 1.0).abs() < 0.5);
        assert_eq!(store.stats().unwrap().dim, Some(512));
        // Now the old one is the stranger, also for a store opened afresh.
        let mut reopened = MemoryStore::open(dir.path()).unwrap();
        assert!(matches!(
            reopened
                .search(&HashEmbedder::default(), "database", &SearchOptions::top(1))
                .await,
            Err(MemoryError::EmbedderMismatch {
                stored_dim: 512,
                current_dim: 384,
                ..
            })
        ));
    }

    #[test]
    fn a_corrupt_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helix.db");
        let mut rng = fastrand::Rng::with_seed(3);
        let junk: Vec<u8> = (0..8192).map(|_| rng.u8(..)).collect();
        std::fs::write(&path, &junk).unwrap();
        let err = MemoryStore::open(dir.path()).err().expect("refused");
        assert!(matches!(err, MemoryError::NotADatabase { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), junk, "the file was modified");

        // A SQLite header followed by garbage fails on the first read, also clearly.
        let mut fake = b"SQLite format 3\0".to_vec();
        fake.extend(&junk);
        std::fs::write(&path, &fake).unwrap();
        let err = MemoryStore::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_foreign_table_named_like_ours_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helix.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE memories (id INTEGER PRIMARY KEY, note TEXT);
                 INSERT INTO memories (note) VALUES ('mine');",
            )
            .unwrap();
        }
        let err = MemoryStore::open(dir.path()).err().expect("refused");
        assert!(
            matches!(&err, MemoryError::Foreign { table, .. } if table == "memories"),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));

        // Also with a meta table of ours in name only.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE memory_meta (k TEXT, v TEXT, w TEXT)")
            .unwrap();
        let err = MemoryStore::open(dir.path()).err().expect("refused");
        assert!(
            matches!(&err, MemoryError::Foreign { table, .. } if table == "memory_meta"),
            "{err:?}"
        );
        let note: String = conn
            .query_row("SELECT note FROM memories", [], |r| r.get(0))
            .unwrap();
        assert_eq!(note, "mine");
    }

    #[tokio::test]
    async fn the_journal_is_untouched_by_memory_operations() {
        let dir = tempfile::tempdir().unwrap();
        {
            let journal = crate::store::Journal::open(dir.path()).unwrap();
            journal
                .create_run(&crate::store::NewRun {
                    id: "run-1",
                    parent: None,
                    workflow_path: "w.yaml",
                    workflow_name: "w",
                    workflow_hash: "h",
                    inputs: &json!({}),
                })
                .unwrap();
        }
        let version = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        };
        let before = version(&dir.path().join("helix.db"));
        let mut store = store_with_lessons(dir.path()).await;
        let id = store.list(None, 1).unwrap()[0].id;
        store.delete(id).unwrap();
        store.reindex(&HashEmbedder::new(256)).await.unwrap();
        drop(store);
        assert_eq!(version(&dir.path().join("helix.db")), before);
        let journal = crate::store::Journal::open(dir.path()).unwrap();
        let run = journal
            .run("run-1")
            .unwrap()
            .expect("the run is still there");
        assert_eq!(run.workflow_name, "w");
    }

    #[tokio::test]
    async fn memory_first_then_journal_both_open() {
        // The journal refuses a fresh file with foreign tables; memory must not cause that.
        let dir = tempfile::tempdir().unwrap();
        let _store = store_with_lessons(dir.path()).await;
        crate::store::Journal::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn a_second_store_sees_the_first_ones_writes() {
        let dir = tempfile::tempdir().unwrap();
        let e = HashEmbedder::default();
        let mut a = store_with_lessons(dir.path()).await;
        let mut b = MemoryStore::open(dir.path()).unwrap();
        assert_eq!(
            b.search(&e, "signup handler", &SearchOptions::top(9))
                .await
                .unwrap()
                .len(),
            5
        );
        a.add(
            &e,
            &[memory(FACT, "Signup emails are sent by the mailer service")],
        )
        .await
        .unwrap();
        let hits = b
            .search(&e, "signup mailer", &SearchOptions::top(9))
            .await
            .unwrap();
        assert_eq!(hits.len(), 6);
        assert!(hits[0].memory.text.starts_with("Signup emails"));
    }

    #[test]
    fn near_duplicates_are_reported_once_the_cells_are_trained() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = MemoryStore::open(dir.path()).unwrap();
        let e = HashEmbedder::new(64);
        let mut rng = fastrand::Rng::with_seed(9);
        let mut unit = |dim: usize| {
            let mut v: Vec<f32> = (0..dim).map(|_| rng.f32() - 0.5).collect();
            normalize(&mut v);
            v
        };
        // A few topics, so the trained cells split them and have boundaries.
        let topics: Vec<Vec<f32>> = (0..5).map(|_| unit(64)).collect();
        let vectors: Vec<Vec<f32>> = (0..2500)
            .map(|i| {
                let noise = unit(64);
                let mut v: Vec<f32> = topics[i % 5]
                    .iter()
                    .zip(&noise)
                    .map(|(t, n)| t + 0.8 * n)
                    .collect();
                normalize(&mut v);
                v
            })
            .collect();
        let items: Vec<NewMemory> = (0..vectors.len())
            .map(|i| memory(FACT, &format!("fact {i}")))
            .collect();
        let mut ids = Vec::new();
        for (chunk, vs) in items.chunks(500).zip(vectors.chunks(500)) {
            ids.extend(store.add_vectors(&e, chunk, vs.to_vec()).unwrap());
        }
        assert!(store.stats().unwrap().cells > 1);

        // Each a rewording of a stored fact (cosine 0.975 with it), or of a fact as another
        // kind (not a duplicate).
        let mut again = Vec::new();
        let mut again_vectors = Vec::new();
        for i in (0..vectors.len()).step_by(25) {
            let u = &vectors[i];
            let w = unit(64);
            let along: f32 = w.iter().zip(u).map(|(a, b)| a * b).sum();
            let mut w: Vec<f32> = w.iter().zip(u).map(|(a, b)| a - along * b).collect();
            normalize(&mut w);
            let sin = (1.0f32 - 0.975 * 0.975).sqrt();
            again_vectors.push(u.iter().zip(&w).map(|(a, b)| 0.975 * a + sin * b).collect());
            again.push(memory(FACT, &format!("fact {i}, reworded")));
        }
        again_vectors.push(vectors[0].clone());
        again.push(memory(TASK_SUMMARY, "fact 0, as a summary"));
        let added = store.add_vectors(&e, &again, again_vectors).unwrap();
        for (n, a) in added[..added.len() - 1].iter().enumerate() {
            assert_eq!(*a, Added::Duplicate(ids[n * 25].id()), "fact {}", n * 25);
        }
        assert!(matches!(added.last(), Some(Added::Inserted(_))));
    }

    #[tokio::test]
    async fn cells_are_trained_as_the_store_grows_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let e = HashEmbedder::new(64);
        let mut store = MemoryStore::open(dir.path()).unwrap();
        let topics = [
            "database", "network", "compiler", "deploy", "review", "docker", "python", "rust",
        ];
        let items: Vec<NewMemory> = (0..3000)
            .map(|i| {
                let topic = topics[i % topics.len()];
                memory(
                    FACT,
                    &format!(
                        "note {i} about the {topic} topic, item number {}",
                        i * 7919 % 10007
                    ),
                )
            })
            .collect();
        for chunk in items.chunks(500) {
            let added = store.add(&e, chunk).await.unwrap();
            assert!(added.iter().all(|a| matches!(a, Added::Inserted(_))));
        }
        let stats = store.stats().unwrap();
        assert_eq!(stats.count, 3000);
        assert!(stats.cells > 1, "trained: {stats:?}");
        let query = "note 1234 about the compiler topic, item number 6892";
        let hits = store
            .search(&e, query, &SearchOptions::top(3))
            .await
            .unwrap();
        let expected = format!(
            "note 1234 about the compiler topic, item number {}",
            1234 * 7919 % 10007
        );
        assert_eq!(hits[0].memory.text, expected);
        let mut reopened = MemoryStore::open(dir.path()).unwrap();
        let again = reopened
            .search(&e, query, &SearchOptions::top(3))
            .await
            .unwrap();
        assert_eq!(again, hits);
    }

    #[test]
    fn invalid_input_is_refused_before_anything_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = MemoryStore::open(dir.path()).unwrap();
        let e = HashEmbedder::default();
        let v = e.vector("x");
        let bad = |item: NewMemory, vector: Vec<f32>| {
            MemoryStore::open(dir.path())
                .unwrap()
                .add_vectors(&e, &[item], vec![vector])
                .unwrap_err()
                .to_string()
        };
        assert!(bad(memory("Fact", "x"), v.clone()).contains("kind `Fact` is invalid"));
        assert_eq!(bad(memory(FACT, "  "), v.clone()), "memory text is empty");
        let mut listy = memory(FACT, "x");
        listy.metadata = json!([1]);
        assert!(bad(listy, v.clone()).contains("must be a JSON object"));
        assert!(bad(memory(FACT, "x"), vec![0.0; 384]).contains("zeros"));
        assert!(bad(memory(FACT, "x"), vec![1.0; 3]).contains("3 dims"));
        assert_eq!(store.stats().unwrap().count, 0);
        assert!(store.add_vectors(&e, &[memory(FACT, "x")], vec![v]).is_ok());
    }

    /// Serves `/v1/embeddings` on 127.0.0.1: each input's vector is `[len, 1, 0, …]`
    /// (`dim` numbers). Records the request bodies.
    fn embeddings_server(dim: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Json>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                let mut line = String::new();
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let request: Json = serde_json::from_slice(&body).unwrap();
                let (status, reply) = if request_line.starts_with("POST /v1/embeddings ") {
                    let data: Vec<Json> = request["input"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .enumerate()
                        .map(|(i, text)| {
                            let mut v = vec![0f32; dim];
                            v[0] = text.as_str().unwrap().len() as f32;
                            v[1] = 1.0;
                            json!({ "object": "embedding", "index": i, "embedding": v })
                        })
                        .rev()
                        .collect();
                    ("200 OK", json!({ "object": "list", "data": data }))
                } else {
                    (
                        "404 Not Found",
                        json!({ "error": { "message": "no such route" } }),
                    )
                };
                log.lock().unwrap().push(request);
                let body = reply.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, seen)
    }

    fn one_attempt() -> HttpOptions {
        HttpOptions {
            timeout: std::time::Duration::from_secs(10),
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
        }
    }

    #[tokio::test]
    async fn vectors_from_an_embeddings_server_are_stored() {
        let (url, seen) = embeddings_server(8);
        let mut e = OpenAiEmbedder::new(&url, "tiny-embed", 8, "HELIX_TEST_NO_SUCH_KEY")
            .with_http(one_attempt());
        e.batch = 2;
        let dir = tempfile::tempdir().unwrap();
        let mut store = MemoryStore::open(dir.path()).unwrap();
        let added = store
            .add(
                &e,
                &[
                    memory(FACT, "a"),
                    memory(FACT, "bbbbbbbbbbbbbbbbbbbb"),
                    memory(FACT, "cc"),
                ],
            )
            .await
            .unwrap();
        assert!(
            added.iter().all(|a| matches!(a, Added::Inserted(_))),
            "{added:?}"
        );
        let requests = seen.lock().unwrap().clone();
        assert_eq!(requests.len(), 2, "two batches of at most 2");
        assert_eq!(requests[0]["model"], "tiny-embed");
        assert_eq!(requests[0]["input"], json!(["a", "bbbbbbbbbbbbbbbbbbbb"]));
        let stats = store.stats().unwrap();
        assert_eq!(stats.embedder.as_deref(), Some("openai:tiny-embed"));
        assert_eq!(stats.dim, Some(8));
        // [20, 1] points the same way as the 20-char memory's vector, not the 1-char one's.
        let hits = store
            .search(&e, "dddddddddddddddddddd", &SearchOptions::top(1))
            .await
            .unwrap();
        assert_eq!(hits[0].memory.text, "bbbbbbbbbbbbbbbbbbbb");
        assert!(hits[0].score > 0.999);
    }

    #[tokio::test]
    async fn an_unreachable_embeddings_server_is_named_in_the_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/v1");
        let e =
            OpenAiEmbedder::new(&url, "m", 8, "HELIX_TEST_NO_SUCH_KEY").with_http(one_attempt());
        let dir = tempfile::tempdir().unwrap();
        let mut store = MemoryStore::open(dir.path()).unwrap();
        let err = store.add(&e, &[memory(FACT, "x")]).await.unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("embedding failed: cannot reach"),
            "{message}"
        );
        assert!(message.contains(&url), "{message}");
        assert_eq!(store.stats().unwrap().count, 0);
    }

    #[tokio::test]
    async fn a_wrong_route_or_size_is_a_clear_error_without_the_key() {
        let (url, _) = embeddings_server(8);
        let secret = "sk-test-very-secret";
        let key_env = "HELIX_TEST_MEMORY_EMBED_KEY";
        std::env::set_var(key_env, secret);
        let wrong_dim = OpenAiEmbedder::new(&url, "m", 16, key_env).with_http(one_attempt());
        let wrong_route =
            OpenAiEmbedder::new(&format!("{url}/nope"), "m", 8, key_env).with_http(one_attempt());
        std::env::remove_var(key_env);
        let texts = vec!["hello".to_string()];
        let err = wrong_dim.embed(&texts).await.unwrap_err().to_string();
        assert!(err.contains("returned 8-dim vectors, but 16 dims"), "{err}");
        assert!(err.contains(&url) && !err.contains(secret), "{err}");
        let err = wrong_route.embed(&texts).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("{url}/nope")) && !err.contains(secret),
            "{err}"
        );
    }
}
