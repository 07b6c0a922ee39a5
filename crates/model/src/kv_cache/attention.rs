//! Attention over the cache's segments, on the CPU kernels: one query position (decoding),
//! in parts on all threads for a long context, merged exactly; and blocks of prompt positions,
//! each key and value read once per block.

use super::Buffers;
use crate::kernels::{self, KvSlice};
use std::ops::Range;

impl Buffers {
    /// Attention of KV head `g`'s query rows `qs` (`[rep][dim]`) over positions `0..len`, on
    /// the calling thread.
    fn attend_head(&self, qs: &[f32], g: usize, len: usize, out: &mut [f32]) {
        let (d, isa) = (self.dim, kernels::Isa::selected());
        let scale = 1.0 / (d as f32).sqrt();
        if let [one] = &self.segments[..] {
            // Decoding a short context: no allocation.
            let (k, v) = self.run(one, g, 0..len);
            return kernels::attend_group(isa, qs, k, v, d, scale, out);
        }
        let runs = self.runs(g, 0..len, usize::MAX);
        let mut rows = vec![0f32; runs.len() * qs.len()];
        let stats: Vec<Vec<kernels::RowStats>> = runs
            .into_iter()
            .zip(rows.chunks_mut(qs.len()))
            .map(|((k, v), rows)| kernels::attend_part(isa, qs, k, v, d, scale, rows))
            .collect();
        let parts: Vec<kernels::Part> = rows
            .chunks(qs.len())
            .zip(&stats)
            .map(|(r, s)| (r, &s[..]))
            .collect();
        kernels::merge_parts(&parts, d, out);
    }

    /// Attention of one query position over positions `0..len`: `q` and `out` are
    /// `[query_heads][dim]`; query head `h` reads KV head `h / (query_heads / heads)`. On the
    /// calling thread alone unless `parallel`.
    pub(super) fn attend(&self, q: &[f32], len: usize, out: &mut [f32], parallel: bool) {
        let d = self.dim;
        let rep = q.len() / d / self.heads;
        let queries = |g: usize| &q[g * rep * d..(g + 1) * rep * d];
        // Longer contexts: every KV head in parts of its positions, all in parallel, so that
        // the threads get equal work whatever the number of heads (SmolLM2's 3 heads split
        // 2 : 1 over 2 threads decoded 96–98 tok/s at 3.7 K tokens, in parts 110–111). From
        // 768 head-positions, not 4,096: SmolLM2 at 512 and 1,024 tokens decoded 167 → 184
        // and 152 → 179 tok/s. A stream of a batch is one task of its own already.
        if !parallel || len * self.heads < 768 {
            for (g, out) in out.chunks_mut(rep * d).enumerate() {
                self.attend_head(queries(g), g, len, out);
            }
            return;
        }
        let threads = rayon::current_num_threads();
        let parts = (2 * threads).div_ceil(self.heads).min(len / 512).max(1);
        let runs: Vec<_> = (0..self.heads)
            .flat_map(|g| {
                self.runs(g, 0..len, len.div_ceil(parts))
                    .into_iter()
                    .map(move |r| (g, r))
            })
            .collect();
        let (isa, scale) = (kernels::Isa::selected(), 1.0 / (d as f32).sqrt());
        let mut rows = vec![0f32; runs.len() * rep * d];
        let mut stats = vec![Vec::new(); runs.len()];
        let slots =
            kernels::team::Slots::new(rows.chunks_mut(rep * d).zip(stats.iter_mut()).collect());
        kernels::team::for_each_index(runs.len(), |t| {
            // SAFETY: for_each_index runs each index once.
            let (rows, stats) = unsafe { slots.take(t) };
            let (g, (k, v)) = runs[t];
            *stats = kernels::attend_part(isa, queries(g), k, v, d, scale, rows);
        });
        for (g, out) in out.chunks_mut(rep * d).enumerate() {
            let of_head: Vec<kernels::Part> = (0..runs.len())
                .filter(|&t| runs[t].0 == g)
                .map(|t| (&rows[t * rep * d..(t + 1) * rep * d], &stats[t][..]))
                .collect();
            kernels::merge_parts(&of_head, d, out);
        }
    }

    /// Causal attention of `s` query positions from `start` (`q`, `out`: `[query_heads][s][dim]`)
    /// over the positions written, query `i` over `0..=start + i`.
    ///
    /// The queries go in blocks of positions. Every query of a block sees all positions before
    /// the block's first, so the block's rows (all its positions' query heads of one KV head)
    /// attend over them together, in pieces run in parallel: each key and value is read once
    /// per block, not once per position (a cached 5 K-token prompt's new 12-token tail read
    /// it 12 times). Then each position adds the block's own positions up to itself, and its
    /// parts are merged exactly.
    pub(super) fn attend_positions(&self, q: &[f32], start: usize, s: usize, out: &mut [f32]) {
        let (d, heads) = (self.dim, self.heads);
        let rep = q.len() / d / s / heads;
        let (isa, scale) = (kernels::Isa::selected(), 1.0 / (d as f32).sqrt());
        // ≤ 64 rows a block; pieces of ≤ 1,024 positions keep a task's scores in L2.
        let per_block = (64 / rep).max(1);
        let blocks = s.div_ceil(per_block);
        let block = |b: usize| b * per_block..((b + 1) * per_block).min(s);
        // The rows of KV head g for positions `range`, `[position][rep][dim]`.
        let rows_of = |g: usize, range: Range<usize>| -> Vec<f32> {
            let mut rows = Vec::with_capacity(range.len() * rep * d);
            for i in range {
                for h in g * rep..(g + 1) * rep {
                    rows.extend_from_slice(&q[(h * s + i) * d..(h * s + i + 1) * d]);
                }
            }
            rows
        };
        let earlier: Vec<(usize, usize, (KvSlice, KvSlice))> = (0..heads)
            .flat_map(|g| (0..blocks).map(move |b| (g, b)))
            .flat_map(|(g, b)| {
                self.runs(g, 0..start + block(b).start, 1024)
                    .into_iter()
                    .map(move |run| (g, b, run))
            })
            .collect();
        let mut parts: Vec<(Vec<f32>, Vec<kernels::RowStats>)> =
            vec![Default::default(); earlier.len()];
        let slots = kernels::team::Slots::new(parts.iter_mut().collect());
        kernels::team::for_each_index(earlier.len(), |t| {
            // SAFETY: for_each_index runs each index once.
            let part = unsafe { slots.take(t) };
            let (g, b, (k, v)) = earlier[t];
            let qs = rows_of(g, block(b));
            let mut rows = vec![0f32; qs.len()];
            let stats = kernels::attend_part(isa, &qs, k, v, d, scale, &mut rows);
            *part = (rows, stats);
        });
        // Each block's positions: their own part, merged with the block's earlier ones.
        let mut merged = vec![Vec::new(); heads * blocks];
        let slots = kernels::team::Slots::new(merged.iter_mut().collect());
        kernels::team::for_each_index(heads * blocks, |t| {
            // SAFETY: for_each_index runs each index once.
            let merged = unsafe { slots.take(t) };
            let (g, b) = (t / blocks, t % blocks);
            let range = block(b);
            let of_block: Vec<_> = (0..earlier.len())
                .filter(|&e| earlier[e].0 == g && earlier[e].1 == b)
                .map(|e| &parts[e])
                .collect();
            let qs = rows_of(g, range.clone());
            merged.resize(qs.len(), 0.0);
            for (n, i) in range.clone().enumerate() {
                let at = n * rep * d..(n + 1) * rep * d;
                let (stats_at, own) = (n * rep..(n + 1) * rep, start + range.start..start + i + 1);
                let own_parts: Vec<(Vec<f32>, Vec<kernels::RowStats>)> = self
                    .runs(g, own, usize::MAX)
                    .into_iter()
                    .map(|(k, v)| {
                        let mut rows = vec![0f32; rep * d];
                        let stats =
                            kernels::attend_part(isa, &qs[at.clone()], k, v, d, scale, &mut rows);
                        (rows, stats)
                    })
                    .collect();
                let all: Vec<kernels::Part> = of_block
                    .iter()
                    .map(|(rows, stats)| (&rows[at.clone()], &stats[stats_at.clone()]))
                    .chain(
                        own_parts
                            .iter()
                            .map(|(rows, stats)| (&rows[..], &stats[..])),
                    )
                    .collect();
                kernels::merge_parts(&all, d, &mut merged[at]);
            }
        });
        for (t, rows) in merged.iter().enumerate() {
            let (g, b) = (t / blocks, t % blocks);
            for (n, i) in block(b).enumerate() {
                for r in 0..rep {
                    let (h, from) = (g * rep + r, (n * rep + r) * d);
                    out[(h * s + i) * d..(h * s + i + 1) * d]
                        .copy_from_slice(&rows[from..from + d]);
                }
            }
        }
    }
}
