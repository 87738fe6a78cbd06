//! The in-process IVF index over int8 copies of the stored vectors (see the module root for
//! why it exists and what it trades). It does no I/O: the store loads it, persists what it
//! changes, and asks it for candidates.

use std::collections::HashMap;

/// The first training happens at this many memories; below it one cell is scanned whole.
pub(crate) const FIRST_TRAINING: usize = 1024;
/// Retrain when the store has grown this many times since the last training.
pub(crate) const RETRAIN_GROWTH: usize = 4;
/// Memories per cell right after training.
const CELL_TARGET: usize = 256;
const MAX_CELLS: usize = 4096;
/// k-means sees at most this many points per centroid; more barely moves the centroids.
const TRAIN_SAMPLE_PER_CELL: usize = 48;
const TRAIN_ITERATIONS: usize = 8;
/// Cells scanned at least, and matching entries seen at least (in cells' worth), per query.
pub(crate) const NPROBE: usize = 8;

/// At most this many cells are scanned for a new vector's near-duplicates: the nearest of
/// those that could hold one (see `Index::near`). More than four qualified in none of
/// 68,000 inserts at 32,000–100,000 memories, but in 40–80 % of them while the cells were
/// still coarse (7 or 31 cells); then the farthest are left out, and a near-duplicate there
/// is missed (none was, of 3,003 planted: BENCHMARKS.md). Uncapped, that range scanned
/// 10–11 cells per insert and the 100,000-memory bench ran ~20 % slower.
pub(crate) const DEDUP_CELLS: usize = 4;
/// Cells considered for the duplicate check, nearest first.
const DEDUP_LOOKAHEAD: usize = 32;
/// The duplicate check's bands, as multiples of the mean squared residual (see
/// `NearProbe`). Four bands keep ~65 % of a residual's squared length for the bound;
/// eight kept ~75 % but cost more per member than the few int8 scores they saved.
const BANDS: [f32; 4] = [4.0, 2.0, 1.0, 0.4];

/// A new vector, placed: see `Index::place`.
pub(crate) struct Placed {
    pub q: Quantized,
    /// Score with each centroid (one score of 1 while there is one untrained cell).
    scores: Vec<f32>,
    pub cell: usize,
    pub cos: f32,
}

/// A vector as int8 with one scale: `v ≈ scale × code`.
pub(crate) struct Quantized {
    pub scale: f32,
    pub code: Vec<i8>,
}

pub(crate) fn quantize(v: &[f32]) -> Quantized {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        return Quantized {
            scale: 0.0,
            code: vec![0; v.len()],
        };
    }
    let scale = max / 127.0;
    let inverse = 127.0 / max;
    // Rounds half away from zero like `f32::round`, without its libm call per coordinate.
    let code = v
        .iter()
        .map(|x| {
            let y = x * inverse;
            (y + 0.5f32.copysign(y)) as i8
        })
        .collect();
    Quantized { scale, code }
}

/// The members of one kind in one cell, column by column for the kernels.
#[derive(Default)]
struct Group {
    ids: Vec<i64>,
    scales: Vec<f32>,
    /// `ids.len() × dim` codes, row after row.
    codes: Vec<i8>,
    /// Per member, `words` u64s: the signs of its residual (vector − centroid), for `near`.
    signs: Vec<u64>,
}

impl Group {
    fn push(&mut self, id: i64, q: &Quantized, signs: &[u64]) -> usize {
        self.ids.push(id);
        self.scales.push(q.scale);
        self.codes.extend_from_slice(&q.code);
        self.signs.extend_from_slice(signs);
        self.ids.len() - 1
    }

    /// Removes member `pos` by moving the last one into its place; returns the moved id.
    fn swap_remove(&mut self, pos: usize, dim: usize) -> Option<i64> {
        let last = self.ids.len() - 1;
        self.ids.swap_remove(pos);
        self.scales.swap_remove(pos);
        let words = dim.div_ceil(64);
        if pos != last {
            let (head, tail) = self.codes.split_at_mut(last * dim);
            head[pos * dim..(pos + 1) * dim].copy_from_slice(&tail[..dim]);
            let (head, tail) = self.signs.split_at_mut(last * words);
            head[pos * words..(pos + 1) * words].copy_from_slice(&tail[..words]);
        }
        self.codes.truncate(last * dim);
        self.signs.truncate(last * words);
        (pos != last).then(|| self.ids[pos])
    }
}

/// One IVF cell. Its members are kept in one group per kind, so a kind filter and the
/// duplicate check (which is per kind) read only the members of that kind.
struct Cell {
    /// The lowest and highest cosine of a member with the centroid (bounds for `near`;
    /// removals do not narrow them, which only makes the bounds looser).
    min_cos: f32,
    max_cos: f32,
    /// The largest int8 scale of a member (also only ever grows).
    max_scale: f32,
    /// Indexed by the index's number for the kind.
    groups: Vec<Group>,
}

impl Default for Cell {
    fn default() -> Cell {
        Cell {
            min_cos: f32::INFINITY,
            max_cos: f32::NEG_INFINITY,
            max_scale: 0.0,
            groups: Vec::new(),
        }
    }
}

impl Cell {
    /// Adds a member; returns its position in its kind's group.
    fn push(
        &mut self,
        id: i64,
        kind: u32,
        q: &Quantized,
        cos: f32,
        centroid: Option<&[f32]>,
    ) -> usize {
        self.min_cos = self.min_cos.min(cos);
        self.max_cos = self.max_cos.max(cos);
        self.max_scale = self.max_scale.max(q.scale);
        let mut residual: Vec<f32> = q.code.iter().map(|c| f32::from(*c) * q.scale).collect();
        if let Some(centroid) = centroid {
            residual.iter_mut().zip(centroid).for_each(|(r, c)| *r -= c);
        }
        let kind = kind as usize;
        if self.groups.len() <= kind {
            self.groups.resize_with(kind + 1, Group::default);
        }
        self.groups[kind].push(id, q, &sign_words(&residual))
    }
}

/// Where an entry is: cell, kind (its group in the cell) and position in the group.
#[derive(Clone, Copy)]
struct Slot {
    cell: u32,
    kind: u32,
    pos: u32,
}

/// Which entries a search may return.
pub(crate) struct Filter<'a> {
    pub kind: Option<u32>,
    pub ids: Option<&'a std::collections::HashSet<i64>>,
}

pub(crate) struct Index {
    dim: usize,
    /// `cells × dim` unit vectors; empty while there is one untrained cell.
    centroids: Vec<f32>,
    cells: Vec<Cell>,
    kinds: HashMap<String, u32>,
    slots: HashMap<i64, Slot>,
    /// The size of the store when the centroids were trained (0: never).
    pub trained_at: usize,
}

impl Index {
    /// An index with these centroids (none: one cell) and no entries.
    pub fn new(dim: usize, centroids: Vec<f32>, trained_at: usize) -> Index {
        let cells = (centroids.len() / dim.max(1)).max(1);
        Index {
            dim,
            centroids,
            cells: (0..cells).map(|_| Cell::default()).collect(),
            kinds: HashMap::new(),
            slots: HashMap::new(),
            trained_at,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    pub fn cells(&self) -> usize {
        self.cells.len()
    }

    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// The number a kind is known by inside the index, if any entry ever had it.
    pub fn kind_id(&self, kind: &str) -> Option<u32> {
        self.kinds.get(kind).copied()
    }

    fn intern(&mut self, kind: &str) -> u32 {
        let next = self.kinds.len() as u32;
        *self.kinds.entry(kind.to_string()).or_insert(next)
    }

    /// What the index needs to know of a new vector, computed once for both the duplicate
    /// check and the insert: its int8 copy, its score with every centroid, and the cell it
    /// joins (the one with the nearest centroid) with its cosine with that centroid.
    pub fn place(&self, v: &[f32]) -> Placed {
        let q = quantize(v);
        if self.centroids.is_empty() {
            return Placed {
                q,
                scores: vec![1.0],
                cell: 0,
                cos: f32::NEG_INFINITY,
            };
        }
        let scores = kernels::dots(&self.centroids, v, self.dim);
        let cell = argmax(&scores);
        Placed {
            q,
            cos: scores[cell],
            scores,
            cell,
        }
    }

    /// Adds an entry to `cell` (a stored cell whose index may be out of date is clamped).
    /// `cos` is the entry's cosine with the cell's centroid, if known.
    pub fn insert(&mut self, id: i64, kind: &str, cell: usize, q: &Quantized, cos: Option<f32>) {
        let kind = self.intern(kind);
        self.insert_as(id, kind, cell, q, cos);
    }

    fn insert_as(&mut self, id: i64, kind: u32, cell: usize, q: &Quantized, cos: Option<f32>) {
        self.remove(id);
        let cell = cell.min(self.cells.len() - 1);
        let cos = match (cos, self.centroids.is_empty()) {
            (_, true) => f32::NEG_INFINITY,
            (Some(cos), false) => cos,
            (None, false) => {
                let centroid = &self.centroids[cell * self.dim..(cell + 1) * self.dim];
                let approx: Vec<f32> = q.code.iter().map(|c| f32::from(*c) * q.scale).collect();
                kernels::dots(centroid, &approx, self.dim)[0]
            }
        };
        let centroid = (!self.centroids.is_empty())
            .then(|| &self.centroids[cell * self.dim..(cell + 1) * self.dim]);
        let pos = self.cells[cell].push(id, kind, q, cos, centroid);
        self.slots.insert(
            id,
            Slot {
                cell: cell as u32,
                kind,
                pos: pos as u32,
            },
        );
    }

    pub fn remove(&mut self, id: i64) -> bool {
        let Some(slot) = self.slots.remove(&id) else {
            return false;
        };
        let group = &mut self.cells[slot.cell as usize].groups[slot.kind as usize];
        if let Some(moved) = group.swap_remove(slot.pos as usize, self.dim) {
            self.slots.insert(moved, slot);
        }
        true
    }

    /// The best `want` entries by approximate cosine (int8), best first. Cells are scanned
    /// nearest first until at least `NPROBE` cells and `NPROBE` cells' worth of entries that
    /// pass the filter have been seen, so a selective filter probes further.
    pub fn search(&self, query: &[f32], want: usize, filter: &Filter) -> Vec<(f32, i64)> {
        let q = quantize(query);
        if want == 0 || q.scale == 0.0 {
            return Vec::new();
        }
        let order = self.cell_order(query);
        let per_cell = self.len().div_ceil(self.cells.len()).max(1);
        let enough = NPROBE.saturating_mul(per_cell).max(want);
        let mut top = TopK::new(want);
        let mut seen = 0;
        for (probed, &(_, cell)) in order.iter().enumerate() {
            seen += self.scan(cell, &q, filter, &mut top);
            if probed + 1 >= NPROBE && seen >= enough {
                break;
            }
        }
        top.into_sorted()
    }

    /// Entries of `kind` whose approximate cosine to `v` is at least `min_cos`. If
    /// `cos(u, v) ≥ min_cos` then `|u − v| ≤ r = √(2 − 2·min_cos)`, and every test below
    /// follows from that, so nothing that could be a near-duplicate is skipped (int8 error
    /// is covered by slack) except in cells beyond the `DEDUP_CELLS` nearest that qualify:
    ///
    /// - **Which cells.** Every entry sits in the cell of its nearest centroid. If `u` is in
    ///   cell `j` while `v`'s nearest centroid is `b`, then
    ///   `c_b·v − c_j·v = (c_b − c_j)·u + (c_b − c_j)·(v − u) ≤ 0 + |c_b − c_j|·r`: a cell
    ///   whose score trails the best by more than that cannot hold one. On clustered data
    ///   that leaves one or two cells (the window on members' cosines with the centroid,
    ///   `|c·u − c·v| ≤ r`, also applied, leaves about half of them on its own).
    /// - **Which members.** Where the residuals `u − c` and `v − c` differ in sign at
    ///   coordinate i, `|u_i − v_i| ≥ |v_i − c_i|`, so the sum of `(v_i − c_i)²` over those
    ///   coordinates is at most `r²`. Members whose sum (bounded from below by bands, a few
    ///   XORs and popcounts) exceeds it are skipped; the rest are scored on int8 copies.
    pub fn near(&self, v: &[f32], placed: &Placed, kind: &str, min_cos: f32) -> Vec<(f32, i64)> {
        let Some(kind) = self.kind_id(kind) else {
            return Vec::new();
        };
        if placed.q.scale == 0.0 {
            return Vec::new();
        }
        let radius = (2.0 - 2.0 * min_cos).max(0.0).sqrt();
        // A member's stored form is its int8 copy, off by at most half a step per
        // coordinate: `√dim · scale / 2` in norm (≈ 0.015 for a typical 384-dim vector,
        // never more than `√dim / 254` for a unit vector).
        let half_steps = (self.dim as f32).sqrt() / 2.0;
        let widest = radius + half_steps / 127.0;
        let untrained = self.centroids.is_empty();
        let home = placed.cell;
        let mut found = Vec::new();
        let mut scanned = 0;
        for (score, cell) in nearest(&placed.scores, DEDUP_LOOKAHEAD) {
            let c = &self.cells[cell];
            // A cell without members of the kind costs nothing and counts for nothing.
            let Some(group) = c.groups.get(kind as usize).filter(|g| !g.ids.is_empty()) else {
                continue;
            };
            if !untrained {
                let gap = placed.cos - score;
                if gap > 2.0 * widest {
                    break; // |c_b − c_j| ≤ 2, and the cells come best first
                }
                let reach = radius + half_steps * c.max_scale;
                if cell != home && gap > self.centroid_distance(home, cell) * reach {
                    continue;
                }
                if score + widest < c.min_cos || score - widest > c.max_cos {
                    continue;
                }
            }
            if scanned == DEDUP_CELLS {
                break;
            }
            scanned += 1;
            let centroid = (!untrained).then(|| self.centroid(cell));
            let probe = kernels::NearProbe::new(v, centroid, radius, half_steps, min_cos);
            kernels::near(group, &probe, &placed.q, self.dim, &mut found);
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found
    }

    fn centroid(&self, cell: usize) -> &[f32] {
        &self.centroids[cell * self.dim..(cell + 1) * self.dim]
    }

    /// `|c_a − c_b|` for two (unit) centroids.
    fn centroid_distance(&self, a: usize, b: usize) -> f32 {
        let cos = kernels::dot(self.centroid(a), self.centroid(b));
        (2.0 - 2.0 * cos).max(0.0).sqrt()
    }

    /// Cells with their centroid's score for `v`, best first.
    fn cell_order(&self, v: &[f32]) -> Vec<(f32, usize)> {
        if self.centroids.is_empty() {
            return vec![(1.0, 0)];
        }
        nearest(&kernels::dots(&self.centroids, v, self.dim), usize::MAX)
    }

    /// Offers the entries of `cell` that pass `filter` to `top`; returns how many passed.
    fn scan(&self, cell: usize, q: &Quantized, filter: &Filter, top: &mut TopK) -> usize {
        let mut passed = 0;
        for (kind, group) in self.cells[cell].groups.iter().enumerate() {
            if filter.kind.is_some_and(|k| k as usize != kind) {
                continue;
            }
            let in_ids = |i: usize| filter.ids.is_none_or(|ids| ids.contains(&group.ids[i]));
            let pass: Option<&dyn Fn(usize) -> bool> = filter.ids.map(|_| &in_ids as _);
            kernels::scan(group, pass, q, self.dim, |i, cos| {
                passed += 1;
                top.offer(cos, group.ids[i])
            });
        }
        passed
    }

    /// Whether the store has grown enough since the last training to train (again).
    pub fn wants_training(&self) -> bool {
        let n = self.len();
        if self.trained_at == 0 {
            n >= FIRST_TRAINING
        } else {
            n >= self.trained_at.saturating_mul(RETRAIN_GROWTH)
        }
    }

    /// Trains new centroids on (a sample of) the entries and moves every entry to its
    /// nearest one. Returns every entry's new cell, for the store to persist.
    pub fn train(&mut self, seed: u64) -> Vec<(i64, u32)> {
        let n = self.len();
        let dim = self.dim;
        let cells = (n / CELL_TARGET).clamp(1, MAX_CELLS);
        let mut rng = fastrand::Rng::with_seed(seed);
        // Every entry, dequantized (the int8 error is far below what moves a centroid).
        let mut points: Vec<f32> = Vec::with_capacity(n * dim);
        let mut owners: Vec<(i64, u32, f32)> = Vec::with_capacity(n);
        let mut codes: Vec<i8> = Vec::with_capacity(n * dim);
        for cell in &self.cells {
            for (kind, group) in cell.groups.iter().enumerate() {
                for (i, &id) in group.ids.iter().enumerate() {
                    let scale = group.scales[i];
                    let code = &group.codes[i * dim..(i + 1) * dim];
                    points.extend(code.iter().map(|c| f32::from(*c) * scale));
                    codes.extend_from_slice(code);
                    owners.push((id, kind as u32, scale));
                }
            }
        }
        let sample_size = (cells * TRAIN_SAMPLE_PER_CELL).min(n);
        let mut sample_rows: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut sample_rows);
        sample_rows.truncate(sample_size);
        let sample: Vec<f32> = sample_rows
            .iter()
            .flat_map(|&r| points[r * dim..(r + 1) * dim].iter().copied())
            .collect();
        let centroids = kmeans(&sample, dim, cells, TRAIN_ITERATIONS, &mut rng);
        let assignment = kernels::assign_all(&centroids, &points, dim);
        drop(points);

        let mut fresh = Index::new(dim, centroids, n);
        fresh.kinds = std::mem::take(&mut self.kinds);
        let mut moves = Vec::with_capacity(n);
        for ((&(id, kind, scale), &(cell, cos)), code) in
            owners.iter().zip(&assignment).zip(codes.chunks_exact(dim))
        {
            let q = Quantized {
                scale,
                code: code.to_vec(),
            };
            fresh.insert_as(id, kind, cell, &q, Some(cos));
            moves.push((id, cell as u32));
        }
        *self = fresh;
        moves
    }
}

/// Bit i set where value i is ≥ 0.
fn sign_words(values: &[f32]) -> Vec<u64> {
    values
        .chunks(64)
        .map(|chunk| {
            let mut word = 0u64;
            for (bit, x) in chunk.iter().enumerate() {
                word |= u64::from(*x >= 0.0) << bit;
            }
            word
        })
        .collect()
}

/// The `m` best (score, position) pairs of `scores`, best first.
fn nearest(scores: &[f32], m: usize) -> Vec<(f32, usize)> {
    let mut order: Vec<(f32, usize)> = scores.iter().copied().zip(0..).collect();
    if m < order.len() {
        order.select_nth_unstable_by(m, |a, b| b.0.total_cmp(&a.0));
        order.truncate(m);
    }
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    order
}

fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best
}

/// Spherical k-means: unit centroids, assignment by largest dot product. Seeds are distinct
/// random points; an emptied cell is reseeded with a random point.
fn kmeans(
    points: &[f32],
    dim: usize,
    k: usize,
    iterations: usize,
    rng: &mut fastrand::Rng,
) -> Vec<f32> {
    let n = points.len() / dim;
    let k = k.min(n).max(1);
    let row = |r: usize| &points[r * dim..(r + 1) * dim];
    let mut seeds: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut seeds);
    let mut centroids: Vec<f32> = seeds[..k]
        .iter()
        .flat_map(|&r| row(r).iter().copied())
        .collect();
    for _ in 0..iterations {
        let assignment = kernels::assign_all(&centroids, points, dim);
        let mut sums = vec![0f32; k * dim];
        let mut counts = vec![0usize; k];
        for (r, &(c, _)) in assignment.iter().enumerate() {
            counts[c] += 1;
            for (s, x) in sums[c * dim..(c + 1) * dim].iter_mut().zip(row(r)) {
                *s += x;
            }
        }
        for c in 0..k {
            if counts[c] == 0 {
                sums[c * dim..(c + 1) * dim].copy_from_slice(row(rng.usize(..n)));
            }
            super::embed::normalize(&mut sums[c * dim..(c + 1) * dim]);
        }
        centroids = sums;
    }
    centroids
}

/// The best `k` (score, id) pairs seen.
struct TopK {
    k: usize,
    items: Vec<(f32, i64)>,
    /// The worst score kept once `items` is full.
    floor: f32,
}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK {
            k,
            items: Vec::with_capacity(k * 2),
            floor: f32::NEG_INFINITY,
        }
    }

    #[inline]
    fn offer(&mut self, score: f32, id: i64) {
        if score <= self.floor {
            return;
        }
        self.items.push((score, id));
        // Amortized: let the buffer fill to 2k, then keep the best k.
        if self.items.len() >= self.k * 2 {
            self.shrink();
        }
    }

    fn shrink(&mut self) {
        self.items
            .select_nth_unstable_by(self.k - 1, |a, b| b.0.total_cmp(&a.0));
        self.items.truncate(self.k);
        self.floor = self.items[self.k - 1].0;
    }

    fn into_sorted(mut self) -> Vec<(f32, i64)> {
        self.items.sort_by(|a, b| b.0.total_cmp(&a.0));
        self.items.truncate(self.k);
        self.items
    }
}

/// The arithmetic, compiled twice: for AVX2+FMA (chosen at run time where the CPU has them)
/// and for the baseline target, so one binary runs anywhere and is fast where it can be.
mod kernels {
    use super::{Group, Quantized};

    #[inline(always)]
    pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| i32::from(*x) * i32::from(*y))
            .sum()
    }

    #[inline(always)]
    fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        // Independent accumulators, so the sum vectorizes (float addition is not reordered
        // by the compiler on its own).
        let mut acc = [0f32; 32];
        let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..32 {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn scan_generic(
        group: &Group,
        pass: Option<&dyn Fn(usize) -> bool>,
        q: &Quantized,
        dim: usize,
        f: &mut dyn FnMut(usize, f32),
    ) {
        for (i, code) in group.codes.chunks_exact(dim).enumerate() {
            if pass.is_none_or(|pass| pass(i)) {
                f(i, dot_i8(code, &q.code) as f32 * group.scales[i] * q.scale);
            }
        }
    }

    #[inline(always)]
    fn dots_generic(rows: &[f32], v: &[f32], dim: usize) -> Vec<f32> {
        // A plain loop, not `map(..).collect()`: the collect's fold is a generic function of
        // its own that is not inlined here, so under `dots_avx2` it ran without AVX2.
        let mut out = Vec::with_capacity(rows.len() / dim.max(1));
        for row in rows.chunks_exact(dim) {
            out.push(dot_f32(row, v));
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scan_avx2(
        group: &Group,
        pass: Option<&dyn Fn(usize) -> bool>,
        q: &Quantized,
        dim: usize,
        f: &mut dyn FnMut(usize, f32),
    ) {
        scan_generic(group, pass, q, dim, f)
    }

    /// Written with intrinsics: left to the compiler, the loop ran without AVX2 or kept its
    /// accumulators on the stack.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_avx2(rows: &[f32], v: &[f32], dim: usize) -> Vec<f32> {
        use std::arch::x86_64::*;
        let v = &v[..dim];
        let mut out = Vec::with_capacity(rows.len() / dim.max(1));
        for row in rows.chunks_exact(dim) {
            // Four named accumulators: as an array they were kept on the stack.
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let mut i = 0;
            while i + 32 <= dim {
                // SAFETY: i + 32 ≤ dim, the length of both slices.
                unsafe {
                    let (r, w) = (row.as_ptr().add(i), v.as_ptr().add(i));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r), _mm256_loadu_ps(w), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r.add(8)), _mm256_loadu_ps(w.add(8)), a1);
                    a2 =
                        _mm256_fmadd_ps(_mm256_loadu_ps(r.add(16)), _mm256_loadu_ps(w.add(16)), a2);
                    a3 =
                        _mm256_fmadd_ps(_mm256_loadu_ps(r.add(24)), _mm256_loadu_ps(w.add(24)), a3);
                }
                i += 32;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
            let tail: f32 = row[i..].iter().zip(&v[i..]).map(|(x, y)| x * y).sum();
            out.push(lanes.iter().sum::<f32>() + tail);
        }
        out
    }

    fn avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("popcnt")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// What `Index::near` looks for in one cell: the new vector's residual `v − c`, as
    /// its signs, and its squared coordinates sorted into bands (`BANDS` × their mean). A
    /// member whose residual's signs differ at coordinate i contributes at least the
    /// band's lower edge to `|u − v|²`, so `Σ mismatches × edge` is a lower bound on it.
    pub struct NearProbe {
        signs: Vec<u64>,
        /// `words` u64s per band, heaviest band first: the coordinates in the band.
        bands: Vec<u64>,
        /// The lower edge of each band.
        edges: Vec<f32>,
        radius: f32,
        half_steps: f32,
        /// The int8 cosine a member needs to be reported (the threshold less int8 error).
        min_cos: f32,
    }

    impl NearProbe {
        pub fn new(
            v: &[f32],
            centroid: Option<&[f32]>,
            radius: f32,
            half_steps: f32,
            min_cos: f32,
        ) -> NearProbe {
            let mut residual = v.to_vec();
            if let Some(centroid) = centroid {
                residual.iter_mut().zip(centroid).for_each(|(r, c)| *r -= c);
            }
            let signs = super::sign_words(&residual);
            residual.iter_mut().for_each(|x| *x *= *x);
            let mean = residual.iter().sum::<f32>() / residual.len().max(1) as f32;
            let edges: Vec<f32> = super::BANDS.iter().map(|b| b * mean).collect();
            let words = residual.len().div_ceil(64);
            // Each coordinate goes into the heaviest band whose edge it reaches; those below
            // every edge into one more that is dropped. Branch-free: which band a coordinate
            // falls in is as good as random.
            let mut bands = vec![0u64; (edges.len() + 1) * words];
            for (i, x) in residual.iter().enumerate() {
                let band: usize = edges.iter().map(|edge| usize::from(x < edge)).sum();
                bands[band * words + i / 64] |= 1 << (i % 64);
            }
            bands.truncate(edges.len() * words);
            NearProbe {
                signs,
                bands,
                edges,
                radius,
                half_steps,
                min_cos: min_cos - 0.02,
            }
        }
    }

    #[inline(always)]
    fn near_generic(
        group: &Group,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        let words = dim.div_ceil(64);
        // Fixed-size arrays for the common dimensions: the same loops over slices, even of
        // a length known at compile time, made inserts ~15 % slower at 384 dims.
        match words {
            6 => near_words::<6>(group, p, q, dim, found),
            12 => near_words::<12>(group, p, q, dim, found),
            16 => near_words::<16>(group, p, q, dim, found),
            24 => near_words::<24>(group, p, q, dim, found),
            _ => near_any(group, p, q, dim, words, found),
        }
    }

    /// The members of `group` whose band bound leaves room for a near-duplicate, scored.
    #[inline(always)]
    fn near_words<const W: usize>(
        group: &Group,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        let mut signs = [0u64; W];
        signs.copy_from_slice(&p.signs[..W]);
        for (i, member) in group.signs.chunks_exact(W).enumerate() {
            let mut differ = [0u64; W];
            for w in 0..W {
                differ[w] = member[w] ^ signs[w];
            }
            let reach = p.radius + p.half_steps * group.scales[i];
            let reach2 = reach * reach;
            // A lower bound on |u − v|² (see `NearProbe`). Every band is counted: stopping
            // early cost more in mispredicted branches than the popcounts it saved.
            let mut bound = 0f32;
            for (band, edge) in p.bands.chunks_exact(W).zip(&p.edges) {
                let mut count = 0;
                for w in 0..W {
                    count += (differ[w] & band[w]).count_ones();
                }
                bound += count as f32 * edge;
            }
            if bound <= reach2 {
                check(group, i, p, q, dim, found);
            }
        }
    }

    /// `near_words` for any number of words.
    #[inline(always)]
    fn near_any(
        group: &Group,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        words: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        for (i, member) in group.signs.chunks_exact(words).enumerate() {
            let reach = p.radius + p.half_steps * group.scales[i];
            let reach2 = reach * reach;
            let mut bound = 0f32;
            for (band, edge) in p.bands.chunks_exact(words).zip(&p.edges) {
                let count: u32 = member
                    .iter()
                    .zip(&p.signs)
                    .zip(band)
                    .map(|((m, s), b)| ((m ^ s) & b).count_ones())
                    .sum();
                bound += count as f32 * edge;
            }
            if bound <= reach2 {
                check(group, i, p, q, dim, found);
            }
        }
    }

    /// Scores member `i` on its int8 copy; a possible near-duplicate goes to `found`.
    #[inline(always)]
    fn check(
        group: &Group,
        i: usize,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        let code = &group.codes[i * dim..(i + 1) * dim];
        let cos = dot_i8(code, &q.code) as f32 * group.scales[i] * q.scale;
        if cos >= p.min_cos {
            found.push((cos, group.ids[i]));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt")]
    unsafe fn near_avx2(
        group: &Group,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        near_generic(group, p, q, dim, found)
    }

    /// Pushes the members of `group` that may be near-duplicates (see `Index::near`).
    pub fn near(
        group: &Group,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { near_avx2(group, p, q, dim, found) };
        }
        near_generic(group, p, q, dim, found)
    }

    /// Calls `f(entry, approximate cosine)` for every entry of `group` that passes `pass`.
    pub fn scan(
        group: &Group,
        pass: Option<&dyn Fn(usize) -> bool>,
        q: &Quantized,
        dim: usize,
        mut f: impl FnMut(usize, f32),
    ) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { scan_avx2(group, pass, q, dim, &mut f) };
        }
        scan_generic(group, pass, q, dim, &mut f)
    }

    /// `a · b`.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        dots(a, b, a.len())[0]
    }

    /// `v` dotted with each `dim`-long row of `rows`.
    pub fn dots(rows: &[f32], v: &[f32], dim: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: as above.
            return unsafe { dots_avx2(rows, v, dim) };
        }
        dots_generic(rows, v, dim)
    }

    /// The nearest centroid of every point and its cosine with it, on all cores.
    pub fn assign_all(centroids: &[f32], points: &[f32], dim: usize) -> Vec<(usize, f32)> {
        let n = points.len() / dim;
        let threads = std::thread::available_parallelism()
            .map_or(1, |p| p.get())
            .min(n.div_ceil(1024).max(1));
        let per = n.div_ceil(threads).max(1);
        let mut out = vec![(0usize, 0f32); n];
        std::thread::scope(|s| {
            for (chunk, slots) in points.chunks(per * dim).zip(out.chunks_mut(per)) {
                s.spawn(move || {
                    for (p, slot) in chunk.chunks_exact(dim).zip(slots) {
                        let scores = dots(centroids, p, dim);
                        let best = super::argmax(&scores);
                        *slot = (best, scores[best]);
                    }
                });
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(rng: &mut fastrand::Rng, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| rng.f32() - 0.5).collect();
        super::super::embed::normalize(&mut v);
        v
    }

    #[test]
    fn search_finds_exact_neighbours_before_and_after_training() {
        let mut rng = fastrand::Rng::with_seed(1);
        let dim = 64;
        let vectors: Vec<Vec<f32>> = (0..3000).map(|_| unit(&mut rng, dim)).collect();
        let mut index = Index::new(dim, Vec::new(), 0);
        for (i, v) in vectors.iter().enumerate() {
            let kind = if i % 5 == 0 { "fact" } else { "task_summary" };
            let placed = index.place(v);
            index.insert(i as i64, kind, placed.cell, &placed.q, Some(placed.cos));
        }
        let no_filter = Filter {
            kind: None,
            ids: None,
        };
        for trained in [false, true] {
            if trained {
                assert!(index.wants_training());
                let moves = index.train(7);
                assert_eq!(moves.len(), 3000);
                assert_eq!(index.cells(), 3000 / CELL_TARGET);
            }
            // A stored vector is its own nearest neighbour.
            let hits = index.search(&vectors[42], 3, &no_filter);
            assert_eq!(hits[0].1, 42, "trained: {trained}");
            assert!((hits[0].0 - 1.0).abs() < 0.02);
            let fact = index.kind_id("fact");
            let filtered = index.search(
                &vectors[42],
                10,
                &Filter {
                    kind: fact,
                    ids: None,
                },
            );
            assert_eq!(filtered.len(), 10);
            assert!(filtered.iter().all(|(_, id)| id % 5 == 0));
        }
    }

    #[test]
    fn removal_keeps_the_other_entries_findable() {
        let mut rng = fastrand::Rng::with_seed(2);
        let dim = 32;
        let vectors: Vec<Vec<f32>> = (0..10).map(|_| unit(&mut rng, dim)).collect();
        let kind = |i: usize| if i % 3 == 0 { "note" } else { "fact" };
        let mut index = Index::new(dim, Vec::new(), 0);
        for (i, v) in vectors.iter().enumerate() {
            index.insert(i as i64, kind(i), 0, &quantize(v), None);
        }
        // 3 is a note in the middle of its group, 4 a fact: the last of each group moves.
        for gone in [3, 4] {
            assert!(index.remove(gone));
            assert!(!index.remove(gone));
        }
        assert_eq!(index.len(), 8);
        let all = Filter {
            kind: None,
            ids: None,
        };
        let notes = Filter {
            kind: index.kind_id("note"),
            ids: None,
        };
        let kept = |i: &usize| *i != 3 && *i != 4;
        for (i, v) in vectors.iter().enumerate().filter(|(i, _)| kept(i)) {
            assert_eq!(index.search(v, 1, &all)[0].1, i as i64);
            let best_note = index.search(v, 1, &notes)[0].1;
            assert_eq!(best_note % 3, 0, "{best_note} is not a note");
        }
        let near = |v: &[f32], kind: &str| index.near(v, &index.place(v), kind, 0.97);
        assert!(near(&vectors[3], "note").is_empty());
        assert!(near(&vectors[4], "fact").is_empty());
        assert_eq!(near(&vectors[9], "note")[0].1, 9);
        assert_eq!(near(&vectors[8], "fact")[0].1, 8);
        assert!(near(&vectors[9], "fact").is_empty());
        assert!(near(&vectors[9], "other").is_empty());
    }

    /// A unit vector at cosine `cos` with the unit vector `u`, in a random direction.
    fn at_cosine(rng: &mut fastrand::Rng, u: &[f32], cos: f32) -> Vec<f32> {
        let w = unit(rng, u.len());
        let along: f32 = w.iter().zip(u).map(|(a, b)| a * b).sum();
        let mut w: Vec<f32> = w.iter().zip(u).map(|(a, b)| a - along * b).collect();
        super::super::embed::normalize(&mut w);
        let sin = (1.0 - cos * cos).sqrt();
        let mut v: Vec<f32> = u.iter().zip(&w).map(|(a, b)| cos * a + sin * b).collect();
        super::super::embed::normalize(&mut v);
        v
    }

    #[test]
    fn near_duplicates_are_found_in_whichever_cell_they_sit() {
        let mut rng = fastrand::Rng::with_seed(5);
        let dim = 64;
        // Clustered, so the cells have boundaries that near-duplicates straddle.
        let centers: Vec<Vec<f32>> = (0..6).map(|_| unit(&mut rng, dim)).collect();
        let vectors: Vec<Vec<f32>> = (0..3000)
            .map(|i| {
                let noise = unit(&mut rng, dim);
                let mut v: Vec<f32> = centers[i % centers.len()]
                    .iter()
                    .zip(&noise)
                    .map(|(c, n)| c + 0.8 * n)
                    .collect();
                super::super::embed::normalize(&mut v);
                v
            })
            .collect();
        let mut index = Index::new(dim, Vec::new(), 0);
        for (i, v) in vectors.iter().enumerate() {
            let placed = index.place(v);
            index.insert(i as i64, "fact", placed.cell, &placed.q, Some(placed.cos));
        }
        index.train(11);
        let mut elsewhere = 0;
        for i in (0..vectors.len()).step_by(7) {
            let cos = 0.971 + 0.028 * rng.f32();
            let v = at_cosine(&mut rng, &vectors[i], cos);
            let placed = index.place(&v);
            if index.slots[&(i as i64)].cell as usize != placed.cell {
                elsewhere += 1;
            }
            let found: Vec<i64> = index
                .near(&v, &placed, "fact", 0.97)
                .into_iter()
                .map(|(_, id)| id)
                .collect();
            assert!(found.contains(&(i as i64)), "{i} was not found");
        }
        // The case the cell bound is for: the original is not in the new vector's cell.
        assert!(elsewhere >= 10, "only {elsewhere} across a cell boundary");
    }
}
