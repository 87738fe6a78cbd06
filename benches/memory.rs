//! Memory-store benchmarks, in-process: `cargo bench --bench memory`.
//!
//! Synthetic 384-dim unit vectors in 100 gaussian clusters of uneven size and spread (a
//! stand-in for embeddings of a few topics), five kinds of uneven frequency (50/20/15/10/5 %),
//! at 10,000 and 100,000 memories:
//!
//! - insert rate: `add_vectors` in batches of 1,000 (dedup check, IVF assignment, SQLite
//!   writes, cell training when a threshold is crossed; embedding excluded);
//! - query latency (p50/p99 of 200 queries, top-10, through `search_vector`: index, exact
//!   re-scoring from sqlite-vec, reading the rows) and recall@10 against an exact float
//!   cosine scan, without a filter and with a kind filter (`error_resolution`, 15 %).
//!   Queries are fresh draws from the clusters, not stored points;
//! - the first search of a freshly opened store, which loads the index from SQLite.
//!
//! Results and the command that produced them are recorded in BENCHMARKS.md.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use helix::memory::{BoxFuture, Embedder, MemoryError, MemoryStore, NewMemory, SearchOptions};

const DIM: usize = 384;
const CLUSTERS: usize = 100;
const QUERIES: usize = 200;
const K: usize = 10;
const BATCH: usize = 1000;
const KINDS: [(&str, f32); 5] = [
    ("task_summary", 0.50),
    ("fact", 0.20),
    ("error_resolution", 0.15),
    ("note", 0.10),
    ("lesson", 0.05),
];
const FILTER_KIND: &str = "error_resolution";

/// Stands for whatever made the vectors; the bench hands vectors in directly.
struct Synthetic;

impl Embedder for Synthetic {
    fn id(&self) -> String {
        "bench-synthetic".into()
    }

    fn dim(&self) -> usize {
        DIM
    }

    fn embed<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, MemoryError>> {
        unreachable!("the bench passes vectors")
    }
}

fn gauss(rng: &mut fastrand::Rng) -> f32 {
    let u1 = rng.f64().max(1e-12);
    let u2 = rng.f64();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

struct Clusters {
    centers: Vec<Vec<f32>>,
    /// Norm of the noise relative to the (unit) center: 0.5–1.0, so members have cosine
    /// ≈ 0.5–0.8 with each other and ≈ 0 with other clusters.
    spread: Vec<f32>,
    /// Cumulative, uneven (cluster i has weight 1 / (1 + i/20)).
    cumulative: Vec<f32>,
}

impl Clusters {
    fn new(rng: &mut fastrand::Rng) -> Clusters {
        let centers = (0..CLUSTERS)
            .map(|_| {
                let mut c: Vec<f32> = (0..DIM).map(|_| gauss(rng)).collect();
                normalize(&mut c);
                c
            })
            .collect();
        let spread = (0..CLUSTERS).map(|_| 0.5 + 0.5 * rng.f32()).collect();
        let mut total = 0.0;
        let cumulative = (0..CLUSTERS)
            .map(|i| {
                total += 1.0 / (1.0 + i as f32 / 20.0);
                total
            })
            .collect();
        Clusters {
            centers,
            spread,
            cumulative,
        }
    }

    fn sample(&self, rng: &mut fastrand::Rng) -> Vec<f32> {
        let r = rng.f32() * self.cumulative[CLUSTERS - 1];
        let c = self
            .cumulative
            .partition_point(|w| *w < r)
            .min(CLUSTERS - 1);
        let s = self.spread[c] / (DIM as f32).sqrt();
        let mut v: Vec<f32> = self.centers[c].iter().map(|x| x + s * gauss(rng)).collect();
        normalize(&mut v);
        v
    }
}

fn kind(rng: &mut fastrand::Rng) -> &'static str {
    let mut r = rng.f32();
    for (kind, share) in KINDS {
        if r < share {
            return kind;
        }
        r -= share;
    }
    KINDS[0].0
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn run(n: usize) {
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let clusters = Clusters::new(&mut rng);
    let vectors: Vec<Vec<f32>> = (0..n).map(|_| clusters.sample(&mut rng)).collect();
    let kinds: Vec<&str> = (0..n).map(|_| kind(&mut rng)).collect();
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|_| clusters.sample(&mut rng)).collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = MemoryStore::open(dir.path()).expect("open");
    let e = Synthetic;
    let mut ids = Vec::with_capacity(n);
    let started = Instant::now();
    for start in (0..n).step_by(BATCH) {
        let end = (start + BATCH).min(n);
        let items: Vec<NewMemory> = (start..end)
            .map(|i| NewMemory::new(kinds[i], format!("synthetic memory {i}")))
            .collect();
        let added = store
            .add_vectors(&e, &items, vectors[start..end].to_vec())
            .expect("add");
        ids.extend(added.into_iter().map(|a| a.id()));
    }
    let insert = started.elapsed();
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    let stats = store.stats().expect("stats");
    println!(
        "n = {n}: inserted in {:.2} s = {:.0} memories/s ({} distinct, {} cells, db {:.0} MB)",
        insert.as_secs_f64(),
        n as f64 / insert.as_secs_f64(),
        distinct.len(),
        stats.cells,
        stats.db_bytes as f64 / 1e6
    );

    for filter in [None, Some(FILTER_KIND)] {
        let mut times = Vec::with_capacity(QUERIES);
        let mut found = 0;
        let mut expected = 0;
        for q in &queries {
            let mut exact: Vec<(f32, i64)> = vectors
                .iter()
                .enumerate()
                .filter(|(i, _)| filter.is_none_or(|k| kinds[*i] == k))
                .map(|(i, v)| (dot(q, v), ids[i]))
                .collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let truth: HashSet<i64> = exact.iter().take(K).map(|x| x.1).collect();
            let mut options = SearchOptions::top(K);
            options.kind = filter.map(str::to_string);
            let t = Instant::now();
            let hits = store.search_vector(&e, q, &options).expect("search");
            times.push(t.elapsed());
            assert_eq!(hits.len(), K, "fewer than k results");
            found += hits.iter().filter(|h| truth.contains(&h.memory.id)).count();
            expected += truth.len();
        }
        times.sort();
        println!(
            "n = {n}, {:<22} p50 {}  p99 {}  recall@10 {:.3}",
            filter.map_or("no filter".to_string(), |k| format!("kind = {k}:")),
            ms(percentile(&times, 50)),
            ms(percentile(&times, 99)),
            found as f64 / expected as f64
        );
    }

    drop(store);
    let t = Instant::now();
    let mut reopened = MemoryStore::open(dir.path()).expect("reopen");
    reopened
        .search_vector(&e, &queries[0], &SearchOptions::top(K))
        .expect("search");
    println!(
        "n = {n}: open + first search (index load) {}",
        ms(t.elapsed())
    );
}

fn main() {
    let only: Option<usize> = std::env::args().skip(1).find_map(|a| a.parse().ok());
    for n in [10_000, 100_000] {
        if only.is_none_or(|o| o == n) {
            run(n);
        }
    }
}
