//! Memory-store benchmarks, in-process: `cargo bench --bench memory`.
//!
//! Synthetic 384-dim unit vectors in 100 gaussian clusters of uneven size and spread (a
//! stand-in for embeddings of a few topics), five kinds of uneven frequency (50/20/15/10/5 %),
//! at 10,000 and 100,000 memories:
//!
//! - insert rate: `add_vectors` in batches of 1,000 (dedup check, IVF assignment, SQLite
//!   writes, cell training when a threshold is crossed; embedding excluded), by the wall
//!   clock and by the CPU time the process used (the machine may be shared);
//! - near-duplicate misses: 1 % of the inserts (`--planted` sets another share) repeat an
//!   earlier memory of the same kind, in equal shares verbatim, with isotropic noise and
//!   drifted towards another memory, the perturbed ones at a cosine drawn from
//!   0.971–0.999 with the original; each one the store inserts instead of reporting as a
//!   duplicate is a miss. Recall is measured against what was stored;
//! - query latency (p50/p99 of 200 queries, top-10, through `search_vector`: index, exact
//!   re-scoring from sqlite-vec, reading the rows) and recall@10 against an exact float
//!   cosine scan, without a filter and with a kind filter (`error_resolution`, 15 %).
//!   Queries are fresh draws from the clusters, not stored points;
//! - the first search of a freshly opened store, which loads the index from SQLite.
//!
//! Results and the command that produced them are recorded in BENCHMARKS.md.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use helix::memory::{
    Added, BoxFuture, Embedder, MemoryError, MemoryStore, NewMemory, SearchOptions,
};

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
/// Share of the inserts that repeat an earlier memory, unless `--planted` says otherwise.
const PLANTED: f64 = 0.01;
const MODELS: [&str; 3] = ["verbatim", "isotropic noise", "drift to another memory"];

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

/// A unit vector at cosine `cos` with the unit vector `u`, displaced towards `towards`
/// (made orthogonal to `u`).
fn at_cosine(u: &[f32], towards: &[f32], cos: f32) -> Vec<f32> {
    let along = dot(u, towards);
    let mut w: Vec<f32> = towards.iter().zip(u).map(|(t, x)| t - along * x).collect();
    normalize(&mut w);
    let sin = (1.0 - cos * cos).sqrt();
    let mut v: Vec<f32> = u.iter().zip(&w).map(|(x, y)| cos * x + sin * y).collect();
    normalize(&mut v);
    v
}

/// A memory of the data set; `planted` is the `MODELS` index if it repeats an earlier one.
struct Item {
    vector: Vec<f32>,
    kind: &'static str,
    text: String,
    planted: Option<usize>,
}

fn data(n: usize, planted: f64, clusters: &Clusters, rng: &mut fastrand::Rng) -> Vec<Item> {
    let mut items: Vec<Item> = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 && rng.f64() < planted {
            // An earlier memory that is not itself a repeat.
            let mut j = rng.usize(..i);
            while items[j].planted.is_some() {
                j = rng.usize(..i);
            }
            let model = rng.usize(..MODELS.len());
            let original = &items[j].vector;
            let cos = 0.971 + 0.028 * rng.f32();
            let vector = match model {
                0 => original.clone(),
                1 => {
                    let noise: Vec<f32> = (0..DIM).map(|_| gauss(rng)).collect();
                    at_cosine(original, &noise, cos)
                }
                _ => at_cosine(original, &clusters.sample(rng), cos),
            };
            let text = if model == 0 {
                items[j].text.clone()
            } else {
                format!("synthetic memory {i}, nearly {j}")
            };
            items.push(Item {
                vector,
                kind: items[j].kind,
                text,
                planted: Some(model),
            });
        } else {
            items.push(Item {
                vector: clusters.sample(rng),
                kind: kind(rng),
                text: format!("synthetic memory {i}"),
                planted: None,
            });
        }
    }
    items
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

/// User + system CPU time of the process so far (all threads: cell training uses every
/// core). On a machine shared with other work it tells what the inserts cost, where the
/// wall-clock rate also reflects how much of the CPU they got.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn run(n: usize, planted: f64) {
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let clusters = Clusters::new(&mut rng);
    let items = data(n, planted, &clusters, &mut rng);
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|_| clusters.sample(&mut rng)).collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = MemoryStore::open(dir.path()).expect("open");
    let e = Synthetic;
    let mut added = Vec::with_capacity(n);
    let cpu_before = cpu_time();
    let started = Instant::now();
    for batch in items.chunks(BATCH) {
        let memories: Vec<NewMemory> = batch
            .iter()
            .map(|it| NewMemory::new(it.kind, it.text.clone()))
            .collect();
        let vectors = batch.iter().map(|it| it.vector.clone()).collect();
        added.extend(store.add_vectors(&e, &memories, vectors).expect("add"));
    }
    let insert = started.elapsed();
    let cpu = cpu_time() - cpu_before;
    let stats = store.stats().expect("stats");
    println!(
        "n = {n}: inserted in {:.2} s = {:.0} memories/s; CPU {:.2} s = {:.0} memories per CPU-second ({} stored, {} cells, db {:.0} MB)",
        insert.as_secs_f64(),
        n as f64 / insert.as_secs_f64(),
        cpu.as_secs_f64(),
        n as f64 / cpu.as_secs_f64(),
        stats.count,
        stats.cells,
        stats.db_bytes as f64 / 1e6
    );
    let mut repeats = [0; MODELS.len()];
    let mut missed = [0; MODELS.len()];
    let mut unplanted = 0;
    for (it, a) in items.iter().zip(&added) {
        match (it.planted, a) {
            (Some(model), a) => {
                repeats[model] += 1;
                missed[model] += usize::from(matches!(a, Added::Inserted(_)));
            }
            (None, Added::Duplicate(_)) => unplanted += 1,
            (None, Added::Inserted(_)) => {}
        }
    }
    let report: Vec<String> = MODELS
        .iter()
        .enumerate()
        .map(|(m, name)| format!("{name} {}/{}", missed[m], repeats[m]))
        .collect();
    println!(
        "n = {n}: near-duplicates missed {}/{} ({}); unplanted duplicates {unplanted}",
        missed.iter().sum::<usize>(),
        repeats.iter().sum::<usize>(),
        report.join(", ")
    );

    // Recall is measured against what was stored.
    let stored: Vec<(i64, &Item)> = items
        .iter()
        .zip(&added)
        .filter_map(|(it, a)| match a {
            Added::Inserted(id) => Some((*id, it)),
            Added::Duplicate(_) => None,
        })
        .collect();
    for filter in [None, Some(FILTER_KIND)] {
        let mut times = Vec::with_capacity(QUERIES);
        let mut found = 0;
        let mut expected = 0;
        for q in &queries {
            let mut exact: Vec<(f32, i64)> = stored
                .iter()
                .filter(|(_, it)| filter.is_none_or(|k| it.kind == k))
                .map(|(id, it)| (dot(q, &it.vector), *id))
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

/// `cargo bench --bench memory -- [SIZE] [--planted SHARE]`: one size instead of both, and
/// another share of planted near-duplicates (a larger one measures the miss rate closer).
fn main() {
    let mut only: Option<usize> = None;
    let mut planted = PLANTED;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--planted" {
            planted = args
                .next()
                .and_then(|p| p.parse().ok())
                .expect("--planted takes a share, e.g. 0.1");
        } else if let Ok(n) = arg.parse() {
            only = Some(n);
        }
    }
    for n in [10_000, 100_000] {
        if only.is_none_or(|o| o == n) {
            run(n, planted);
        }
    }
}
