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
    let code = v.iter().map(|x| (x / scale).round() as i8).collect();
    Quantized { scale, code }
}

struct Cell {
    /// The lowest and highest cosine of a member with the centroid (bounds for `near`;
    /// removals do not narrow them, which only makes the bounds looser).
    min_cos: f32,
    max_cos: f32,
    /// Per member, `words` u64s: the signs of its residual (vector − centroid), for `near`.
    signs: Vec<u64>,
    ids: Vec<i64>,
    kinds: Vec<u32>,
    scales: Vec<f32>,
    /// `ids.len() × dim` codes, row after row.
    codes: Vec<i8>,
}

impl Default for Cell {
    fn default() -> Cell {
        Cell {
            min_cos: f32::INFINITY,
            max_cos: f32::NEG_INFINITY,
            signs: Vec::new(),
            ids: Vec::new(),
            kinds: Vec::new(),
            scales: Vec::new(),
            codes: Vec::new(),
        }
    }
}

impl Cell {
    fn push(&mut self, id: i64, kind: u32, q: &Quantized, cos: f32, centroid: Option<&[f32]>) {
        self.min_cos = self.min_cos.min(cos);
        self.max_cos = self.max_cos.max(cos);
        let residual = q
            .code
            .iter()
            .enumerate()
            .map(|(i, c)| f32::from(*c) * q.scale - centroid.map_or(0.0, |c| c[i]));
        self.signs.extend(sign_words(residual, q.code.len()));
        self.ids.push(id);
        self.kinds.push(kind);
        self.scales.push(q.scale);
        self.codes.extend_from_slice(&q.code);
    }

    fn swap_remove(&mut self, pos: usize, dim: usize) -> Option<i64> {
        let last = self.ids.len() - 1;
        self.ids.swap_remove(pos);
        self.kinds.swap_remove(pos);
        let words = dim.div_ceil(64);
        for w in 0..words {
            self.signs.swap(pos * words + w, last * words + w);
        }
        self.signs.truncate(last * words);
        self.scales.swap_remove(pos);
        if pos != last {
            let (head, tail) = self.codes.split_at_mut(last * dim);
            head[pos * dim..(pos + 1) * dim].copy_from_slice(&tail[..dim]);
        }
        self.codes.truncate(last * dim);
        (pos != last).then(|| self.ids[pos])
    }
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
    place: HashMap<i64, (u32, u32)>,
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
            place: HashMap::new(),
            trained_at,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.place.len()
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

    /// The cell a vector joins (the one with the nearest centroid) and its cosine with
    /// that centroid.
    pub fn assign(&self, v: &[f32]) -> (usize, f32) {
        if self.centroids.is_empty() {
            return (0, f32::NEG_INFINITY);
        }
        let scores = kernels::dots(&self.centroids, v, self.dim);
        let best = argmax(&scores);
        (best, scores[best])
    }

    /// Adds an entry to `cell` (a stored cell whose index may be out of date is clamped).
    /// `cos` is the entry's cosine with the cell's centroid, if known.
    pub fn insert(&mut self, id: i64, kind: &str, cell: usize, q: &Quantized, cos: Option<f32>) {
        self.remove(id);
        let kind = self.intern(kind);
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
        self.cells[cell].push(id, kind, q, cos, centroid);
        let target = &self.cells[cell];
        self.place
            .insert(id, (cell as u32, (target.ids.len() - 1) as u32));
    }

    pub fn remove(&mut self, id: i64) -> bool {
        let Some((cell, pos)) = self.place.remove(&id) else {
            return false;
        };
        if let Some(moved) = self.cells[cell as usize].swap_remove(pos as usize, self.dim) {
            self.place.insert(moved, (cell, pos));
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

    /// Entries of `kind` whose approximate cosine to `v` is at least `min_cos`, looked for
    /// among every entry that could be one (so dedup is exact up to int8 error, which a
    /// slack covers). If `cos(u, v) ≥ min_cos` then `|u − v| ≤ r = √(2 − 2·min_cos)`, hence:
    ///
    /// - for a unit centroid `c`, `|c·u − c·v| ≤ r`: cells whose members' cosines with the
    ///   centroid are all out of that window are skipped whole;
    /// - where the residuals `u − c` and `v − c` differ in sign at coordinate i,
    ///   `|u_i − v_i| ≥ |v_i − c_i|`; so among the coordinates where `(v_i − c_i)² ≥ τ`, at
    ///   most `r²/τ` can differ in sign. Counting them is a few XORs and popcounts per
    ///   member, and rules out almost every member that is not a near-duplicate.
    pub fn near(&self, v: &[f32], kind: &str, min_cos: f32) -> Vec<(f32, i64)> {
        let Some(kind) = self.kind_id(kind) else {
            return Vec::new();
        };
        let q = quantize(v);
        if q.scale == 0.0 {
            return Vec::new();
        }
        let radius = (2.0 - 2.0 * min_cos).max(0.0).sqrt();
        // The members' signs come from their int8 copies, off by at most half a step per
        // coordinate: `√dim · scale / 2` in norm (≈ 0.01 for a typical 384-dim vector).
        let half_steps = (self.dim as f32).sqrt() / 2.0;
        let widest = radius + half_steps / 127.0;
        let untrained = self.centroids.is_empty();
        let words = self.dim.div_ceil(64);
        let mut found = Vec::new();
        for (score, cell) in self.cell_order(v) {
            let c = &self.cells[cell];
            if c.ids.is_empty()
                || (!untrained && (score + widest < c.min_cos || score - widest > c.max_cos))
            {
                continue;
            }
            let centroid =
                (!untrained).then(|| &self.centroids[cell * self.dim..(cell + 1) * self.dim]);
            let residual: Vec<f32> = v
                .iter()
                .enumerate()
                .map(|(i, x)| x - centroid.map_or(0.0, |c| c[i]))
                .collect();
            let norm2: f32 = residual.iter().map(|x| x * x).sum();
            let tau = 1.5 * norm2 / self.dim as f32;
            let probe = kernels::NearProbe {
                kind,
                signs: sign_words(residual.iter().copied(), self.dim),
                big: sign_words(residual.iter().map(|x| x * x - tau), self.dim),
                tau,
                radius,
                half_steps,
                min_cos: min_cos - 0.02,
            };
            kernels::near(c, &probe, &q, self.dim, words, &mut found);
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found
    }

    /// Cells with their centroid's score for `v`, best first.
    fn cell_order(&self, v: &[f32]) -> Vec<(f32, usize)> {
        if self.centroids.is_empty() {
            return vec![(1.0, 0)];
        }
        let scores = kernels::dots(&self.centroids, v, self.dim);
        let mut order: Vec<(f32, usize)> = scores.into_iter().zip(0..).collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        order
    }

    /// Offers the entries of `cell` that pass `filter` to `top`; returns how many passed.
    fn scan(&self, cell: usize, q: &Quantized, filter: &Filter, top: &mut TopK) -> usize {
        let c = &self.cells[cell];
        let mut passed = 0;
        let pass = |i: usize| {
            filter.kind.is_none_or(|k| c.kinds[i] == k)
                && filter.ids.is_none_or(|ids| ids.contains(&c.ids[i]))
        };
        let unfiltered = filter.kind.is_none() && filter.ids.is_none();
        let pass: Option<&dyn Fn(usize) -> bool> = if unfiltered { None } else { Some(&pass) };
        kernels::scan(c, pass, q, self.dim, |i, cos| {
            passed += 1;
            top.offer(cos, c.ids[i])
        });
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
        for cell in &self.cells {
            for i in 0..cell.ids.len() {
                let scale = cell.scales[i];
                points.extend(
                    cell.codes[i * dim..(i + 1) * dim]
                        .iter()
                        .map(|c| f32::from(*c) * scale),
                );
                owners.push((cell.ids[i], cell.kinds[i], scale));
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

        let mut fresh = Index::new(dim, centroids, n);
        fresh.kinds = std::mem::take(&mut self.kinds);
        let mut moves = Vec::with_capacity(n);
        for (&(id, kind, scale), &(cell, cos)) in owners.iter().zip(&assignment) {
            let code = self.code_of(id).to_vec();
            let centroid = &fresh.centroids[cell * dim..(cell + 1) * dim];
            let target = &mut fresh.cells[cell];
            target.push(id, kind, &Quantized { scale, code }, cos, Some(centroid));
            fresh
                .place
                .insert(id, (cell as u32, (target.ids.len() - 1) as u32));
            moves.push((id, cell as u32));
        }
        *self = fresh;
        moves
    }

    fn code_of(&self, id: i64) -> &[i8] {
        let (cell, pos) = self.place[&id];
        let c = &self.cells[cell as usize];
        &c.codes[pos as usize * self.dim..(pos as usize + 1) * self.dim]
    }
}

/// Bit i set where value i is ≥ 0 (a sign bit, or "is big" for `x² − τ`).
fn sign_words(values: impl Iterator<Item = f32>, dim: usize) -> Vec<u64> {
    let mut words = vec![0u64; dim.div_ceil(64)];
    for (i, x) in values.enumerate() {
        if x >= 0.0 {
            words[i / 64] |= 1 << (i % 64);
        }
    }
    words
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
    use super::{Cell, Quantized};

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
        cell: &Cell,
        pass: Option<&dyn Fn(usize) -> bool>,
        q: &Quantized,
        dim: usize,
        f: &mut dyn FnMut(usize, f32),
    ) {
        for (i, code) in cell.codes.chunks_exact(dim).enumerate() {
            if pass.is_none_or(|pass| pass(i)) {
                f(i, dot_i8(code, &q.code) as f32 * cell.scales[i] * q.scale);
            }
        }
    }

    #[inline(always)]
    fn dots_generic(rows: &[f32], v: &[f32], dim: usize) -> Vec<f32> {
        rows.chunks_exact(dim).map(|r| dot_f32(r, v)).collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scan_avx2(
        cell: &Cell,
        pass: Option<&dyn Fn(usize) -> bool>,
        q: &Quantized,
        dim: usize,
        f: &mut dyn FnMut(usize, f32),
    ) {
        scan_generic(cell, pass, q, dim, f)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_avx2(rows: &[f32], v: &[f32], dim: usize) -> Vec<f32> {
        dots_generic(rows, v, dim)
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

    /// What `Index::near` looks for in one cell.
    pub struct NearProbe {
        pub kind: u32,
        /// Signs of the residual of the new vector, and where its square is ≥ `tau`.
        pub signs: Vec<u64>,
        pub big: Vec<u64>,
        pub tau: f32,
        pub radius: f32,
        pub half_steps: f32,
        pub min_cos: f32,
    }

    #[inline(always)]
    fn near_generic(
        cell: &Cell,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        words: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        for i in 0..cell.ids.len() {
            if cell.kinds[i] != p.kind {
                continue;
            }
            let member = &cell.signs[i * words..(i + 1) * words];
            let differ: u32 = member
                .iter()
                .zip(&p.signs)
                .zip(&p.big)
                .map(|((m, s), b)| ((m ^ s) & b).count_ones())
                .sum();
            let reach = p.radius + p.half_steps * cell.scales[i];
            if p.tau > 0.0 && differ as f32 * p.tau > reach * reach {
                continue;
            }
            let code = &cell.codes[i * dim..(i + 1) * dim];
            let cos = dot_i8(code, &q.code) as f32 * cell.scales[i] * q.scale;
            if cos >= p.min_cos {
                found.push((cos, cell.ids[i]));
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt")]
    unsafe fn near_avx2(
        cell: &Cell,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        words: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        near_generic(cell, p, q, dim, words, found)
    }

    /// Pushes the members of `cell` that may be near-duplicates (see `Index::near`).
    pub fn near(
        cell: &Cell,
        p: &NearProbe,
        q: &Quantized,
        dim: usize,
        words: usize,
        found: &mut Vec<(f32, i64)>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { near_avx2(cell, p, q, dim, words, found) };
        }
        near_generic(cell, p, q, dim, words, found)
    }

    /// Calls `f(entry, approximate cosine)` for every entry of `cell` that passes `pass`.
    pub fn scan(
        cell: &Cell,
        pass: Option<&dyn Fn(usize) -> bool>,
        q: &Quantized,
        dim: usize,
        mut f: impl FnMut(usize, f32),
    ) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { scan_avx2(cell, pass, q, dim, &mut f) };
        }
        scan_generic(cell, pass, q, dim, &mut f)
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
            let (cell, cos) = index.assign(v);
            index.insert(i as i64, kind, cell, &quantize(v), Some(cos));
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
        let mut index = Index::new(dim, Vec::new(), 0);
        for (i, v) in vectors.iter().enumerate() {
            index.insert(i as i64, "fact", 0, &quantize(v), None);
        }
        assert!(index.remove(3));
        assert!(!index.remove(3));
        assert_eq!(index.len(), 9);
        let filter = Filter {
            kind: None,
            ids: None,
        };
        for (i, v) in vectors.iter().enumerate().filter(|(i, _)| *i != 3) {
            assert_eq!(index.search(v, 1, &filter)[0].1, i as i64);
        }
        assert!(index.near(&vectors[3], "fact", 0.97).is_empty());
        assert_eq!(index.near(&vectors[9], "fact", 0.97)[0].1, 9);
        assert!(index.near(&vectors[9], "other", 0.97).is_empty());
    }
}
