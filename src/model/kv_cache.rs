//! The KV cache: keys and values of every layer for the positions seen so far.
//!
//! For inference they live in buffers this module owns, `[kv_heads][capacity][head_dim]` per
//! layer: a decoding step writes its position in place and attends over the buffers directly
//! ([`Buffers::attend`]: one pass over the keys, one over the values), so neither the cache nor
//! the attention costs a copy or an allocation per token; the capacity doubles when full.
//! Clones share the buffers until one of them writes (the prefix cache's copies). Prompts
//! (several positions at once) read the cache as Burn tensors: on the CPU backend, views of
//! the same bytes (no copy). Training keeps Burn tensors throughout, so that gradients flow
//! through them. The buffers hold f32, or f16 (`model.kv_cache`): half the memory and half
//! the bytes a long context's decoding reads per token, rounded to 11 significant bits.
//! On a GPU the keys and values stay Burn tensors on the device (concatenated per step): the
//! buffers live in host memory, and reading them back per layer and token would cost a
//! device round trip each time.

use super::kernels::{self, KvSlice};
use burn::tensor::{Bytes, DType, FloatDType, Shape, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor, Layout};
use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

/// What the cache stores keys and values in (`model.kv_cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Exact: decoding equals the dense model's attention.
    #[default]
    F32,
    /// Half the memory; keys and values rounded to f16.
    F16,
}

impl KvDtype {
    fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) len: usize,
    dtype: KvDtype,
}

#[derive(Debug, Clone)]
pub(super) enum LayerCache {
    /// Nothing written yet; buffers will hold this type.
    Empty(KvDtype),
    Buffers(Buffers),
    /// Training (in the autodiff graph) and GPU devices: `[1, kv_heads, len, head_dim]` tensors.
    Graph(Tensor<4>, Tensor<4>),
}

impl Default for LayerCache {
    fn default() -> Self {
        LayerCache::Empty(KvDtype::default())
    }
}

/// Smallest capacity allocated, in positions.
const MIN_CAPACITY: usize = 256;

/// Keys and values `[heads][capacity][dim]`, the first `len` positions (the cache's) written.
#[derive(Debug, Clone)]
pub(super) struct Buffers {
    k: Arc<Bytes>,
    v: Arc<Bytes>,
    heads: usize,
    dim: usize,
    capacity: usize,
    dtype: KvDtype,
}

impl Buffers {
    fn new(heads: usize, dim: usize, capacity: usize, dtype: KvDtype) -> Self {
        let n = heads * capacity * dim;
        let zeros = || {
            Arc::new(match dtype {
                KvDtype::F32 => Bytes::from_elems(vec![0f32; n]),
                KvDtype::F16 => Bytes::from_elems(vec![f16::ZERO; n]),
            })
        };
        Self {
            k: zeros(),
            v: zeros(),
            heads,
            dim,
            capacity,
            dtype,
        }
    }

    /// Keys and values for writing, as bytes (copied first if shared).
    fn both_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        (
            &mut Arc::make_mut(&mut self.k)[..],
            &mut Arc::make_mut(&mut self.v)[..],
        )
    }

    /// Positions `0..len` of KV head `h` in `buffer` (the keys or the values), as stored.
    fn head<'a>(&self, buffer: &'a [u8], h: usize, len: usize) -> KvSlice<'a> {
        self.positions(buffer, h, 0..len)
    }

    /// Positions `range` of KV head `h` in `buffer`, as stored.
    fn positions<'a>(&self, buffer: &'a [u8], h: usize, range: Range<usize>) -> KvSlice<'a> {
        let at = h * self.capacity * self.dim;
        let range = at + range.start * self.dim..at + range.end * self.dim;
        match self.dtype {
            KvDtype::F32 => KvSlice::F32(&bytemuck::cast_slice(buffer)[range]),
            KvDtype::F16 => KvSlice::F16(&bytemuck::cast_slice(buffer)[range]),
        }
    }

    /// Positions `0..len` of `buffer` (the keys or the values) as f32, `[heads][len][dim]`.
    fn widened(&self, buffer: &[u8], len: usize) -> Vec<f32> {
        (0..self.heads)
            .flat_map(|h| self.head(buffer, h, len).widened().into_owned())
            .collect()
    }

    /// Makes room for `end` positions, keeping the first `keep`; unshares the buffers.
    fn reserve(&mut self, end: usize, keep: usize) {
        if end > self.capacity {
            let mut grown = Self::new(
                self.heads,
                self.dim,
                end.next_power_of_two().max(MIN_CAPACITY),
                self.dtype,
            );
            grown.copy_prefix(self, keep);
            *self = grown;
        }
    }

    fn copy_prefix(&mut self, from: &Buffers, n: usize) {
        debug_assert_eq!(self.dtype, from.dtype, "a byte copy needs one element type");
        let es = self.dtype.size();
        let (d, n, cap) = (self.dim * es, n.min(from.capacity), self.capacity);
        let (fk, fv) = (&from.k[..], &from.v[..]);
        let (k, v) = self.both_mut();
        for h in 0..from.heads {
            let (dst, src) = (h * cap * d, h * from.capacity * d);
            k[dst..dst + n * d].copy_from_slice(&fk[src..src + n * d]);
            v[dst..dst + n * d].copy_from_slice(&fv[src..src + n * d]);
        }
    }

    /// Writes `s` positions from `start`; `k`, `v` are `[heads][s][dim]`.
    fn write(&mut self, start: usize, s: usize, k: &[f32], v: &[f32]) {
        self.reserve(start + s, start);
        let (d, cap, heads, dtype) = (self.dim, self.capacity, self.heads, self.dtype);
        let (kb, vb) = self.both_mut();
        for (buffer, from) in [(kb, k), (vb, v)] {
            for h in 0..heads {
                let (dst, src) = ((h * cap + start) * d, &from[h * s * d..(h + 1) * s * d]);
                match dtype {
                    KvDtype::F32 => bytemuck::cast_slice_mut::<u8, f32>(buffer)[dst..dst + s * d]
                        .copy_from_slice(src),
                    KvDtype::F16 => bytemuck::cast_slice_mut::<u8, f16>(buffer)[dst..dst + s * d]
                        .convert_from_f32_slice(src),
                }
            }
        }
    }

    /// Keys and values of positions `0..len` as `[1, heads, len, dim]` tensors like `like`'s.
    fn tensors(&self, len: usize, like: &Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (h, d, cap) = (self.heads, self.dim, self.capacity);
        if like.clone().try_into_primitive::<Flex>().is_ok() {
            // The CPU backend reads the buffers in place: strided views, no copy.
            let view = |data: &Arc<Bytes>| {
                let strides = vec![(h * cap * d) as isize, (cap * d) as isize, d as isize, 1];
                let layout = Layout::new(Shape::new([1, h, len, d]), strides, 0);
                let stored = match self.dtype {
                    KvDtype::F32 => DType::F32,
                    KvDtype::F16 => DType::F16,
                };
                let t = Tensor::<4>::from_primitive::<Flex>(FlexTensor::from_arc(
                    data.clone(),
                    layout,
                    stored,
                ));
                match like.dtype() {
                    same if same == stored => t,
                    DType::F16 => t.cast(FloatDType::F16),
                    DType::BF16 => t.cast(FloatDType::BF16),
                    _ => t.cast(FloatDType::F32),
                }
            };
            return (view(&self.k), view(&self.v));
        }
        let take = |b: &[u8]| {
            Tensor::<4>::from_data(
                TensorData::new(self.widened(b, len), [1, self.heads, len, d]),
                (&like.device(), like.dtype()),
            )
        };
        (take(&self.k), take(&self.v))
    }

    /// Attention of one query position over positions `0..len`: `q` and `out` are
    /// `[query_heads][dim]`; query head `h` reads KV head `h / (query_heads / heads)`.
    fn attend(&self, q: &[f32], len: usize, out: &mut [f32]) {
        let d = self.dim;
        let rep = q.len() / d / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let isa = kernels::Isa::selected();
        let queries = |g: usize| &q[g * rep * d..(g + 1) * rep * d];
        // Long contexts: every KV head in parts of its positions, all in parallel, so that
        // the threads get equal work whatever the number of heads (SmolLM2's 3 heads split
        // 2 : 1 over 2 threads decoded 96–98 tok/s at 3.7 K tokens, in parts 110–111).
        if len * self.heads >= 4096 {
            let threads = rayon::current_num_threads();
            let parts = (2 * threads).div_ceil(self.heads).min(len / 512).max(1);
            let tasks = self.heads * parts;
            let mut rows = vec![0f32; tasks * rep * d];
            let mut stats = vec![Vec::new(); tasks];
            let slots =
                kernels::team::Slots::new(rows.chunks_mut(rep * d).zip(stats.iter_mut()).collect());
            kernels::team::for_each_index(tasks, |t| {
                // SAFETY: for_each_index runs each index once.
                let (rows, stats) = unsafe { slots.take(t) };
                let (g, part) = (t / parts, t % parts);
                let range = part * len / parts..(part + 1) * len / parts;
                let (k, v) = (
                    self.positions(&self.k, g, range.clone()),
                    self.positions(&self.v, g, range),
                );
                *stats = kernels::attend_part(isa, queries(g), k, v, d, scale, rows);
            });
            for (g, out) in out.chunks_mut(rep * d).enumerate() {
                let of_head: Vec<kernels::Part> = (g * parts..(g + 1) * parts)
                    .map(|t| (&rows[t * rep * d..(t + 1) * rep * d], &stats[t][..]))
                    .collect();
                kernels::merge_parts(&of_head, d, out);
            }
        } else {
            for (g, out) in out.chunks_mut(rep * d).enumerate() {
                let (k, v) = (self.head(&self.k, g, len), self.head(&self.v, g, len));
                kernels::attend_group(isa, queries(g), k, v, d, scale, out);
            }
        }
    }

    fn compacted(&self, len: usize) -> Self {
        let mut c = Self::new(self.heads, self.dim, len, self.dtype);
        c.copy_prefix(self, len);
        c
    }

    fn bytes(&self) -> usize {
        self.k.len() + self.v.len()
    }
}

/// Whether `t` lives on the CPU backend, where the cache's buffers and kernels work in place.
pub(super) fn on_host<const D: usize>(t: &Tensor<D>) -> bool {
    crate::device::is_host(&t.device())
}

fn to_vec(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

impl LayerCache {
    /// Appends `k`, `v` (`[1, kv_heads, s, head_dim]`) after the first `start` positions;
    /// returns the keys and values of positions `0..start+s` as tensors.
    pub(super) fn append(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        start: usize,
    ) -> (Tensor<4>, Tensor<4>) {
        let [_, h, s, d] = k.dims();
        if k.is_autodiff() || !on_host(&k) {
            // Training: concatenation keeps the graph simple (few, long chunks; no decoding).
            // A GPU: the tensors stay on the device.
            let earlier = match std::mem::take(self) {
                LayerCache::Graph(pk, pv) => Some((pk.narrow(2, 0, start), pv.narrow(2, 0, start))),
                // A prompt head computed without gradients, continued with them.
                LayerCache::Buffers(b) if start > 0 => Some(b.tensors(start, &k)),
                _ => None,
            };
            let (k, v) = match earlier {
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                None => (k, v),
            };
            *self = LayerCache::Graph(k.clone(), v.clone());
            return (k, v);
        }
        let like = k.clone();
        self.buffers(h, d, start)
            .write(start, s, &to_vec(k), &to_vec(v));
        match self {
            LayerCache::Buffers(b) => b.tensors(start + s, &like),
            _ => unreachable!("written above"),
        }
    }

    /// Decodes one position: appends its key and value (`[kv_heads][dim]`) at `start` and
    /// returns the attention output for `q` (`[query_heads][dim]`) into `out`.
    pub(super) fn decode(
        &mut self,
        k: &[f32],
        v: &[f32],
        q: &[f32],
        start: usize,
        heads: usize,
        out: &mut [f32],
    ) {
        let dim = k.len() / heads;
        let b = self.buffers(heads, dim, start);
        b.write(start, 1, k, v);
        b.attend(q, start + 1, out);
    }

    /// The buffers, holding the first `start` positions of whatever held them before.
    fn buffers(&mut self, heads: usize, dim: usize, start: usize) -> &mut Buffers {
        match std::mem::take(self) {
            LayerCache::Buffers(b) => *self = LayerCache::Buffers(b),
            LayerCache::Graph(k, v) if start > 0 => {
                let mut b = Buffers::new(heads, dim, MIN_CAPACITY, KvDtype::F32);
                let (k, v) = (k.narrow(2, 0, start), v.narrow(2, 0, start));
                b.write(0, start, &to_vec(k), &to_vec(v));
                *self = LayerCache::Buffers(b);
            }
            LayerCache::Empty(dtype) => {
                *self = LayerCache::Buffers(Buffers::new(heads, dim, MIN_CAPACITY, dtype))
            }
            LayerCache::Graph(..) => {
                *self = LayerCache::Buffers(Buffers::new(heads, dim, MIN_CAPACITY, KvDtype::F32))
            }
        }
        match self {
            LayerCache::Buffers(b) => b,
            _ => unreachable!("set above"),
        }
    }

    fn compacted(&self, len: usize) -> Self {
        match self {
            LayerCache::Buffers(b) if len > 0 => LayerCache::Buffers(b.compacted(len)),
            LayerCache::Graph(k, v) if len > 0 => {
                LayerCache::Graph(k.clone().narrow(2, 0, len), v.clone().narrow(2, 0, len))
            }
            LayerCache::Buffers(b) => LayerCache::Empty(b.dtype),
            LayerCache::Empty(dtype) => LayerCache::Empty(*dtype),
            LayerCache::Graph(..) => LayerCache::Empty(KvDtype::F32),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            LayerCache::Empty(_) => 0,
            LayerCache::Buffers(b) => b.bytes(),
            LayerCache::Graph(k, v) => {
                (k.shape().num_elements() + v.shape().num_elements()) * k.dtype().size()
            }
        }
    }
}

impl KvCache {
    pub(super) fn new(layers: usize, dtype: KvDtype) -> Self {
        Self {
            layers: vec![LayerCache::Empty(dtype); layers],
            len: 0,
            dtype,
        }
    }

    /// What keys and values are stored in.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of the first `n` positions (shares the buffers; the first write copies).
    pub fn truncated(&self, n: usize) -> Self {
        Self {
            layers: self.layers.clone(),
            len: n.min(self.len),
            dtype: self.dtype,
        }
    }

    /// A copy of exactly the written positions, sharing nothing (what the prefix cache keeps:
    /// no spare capacity, and the original goes on writing in place).
    pub fn compacted(&self) -> Self {
        Self {
            layers: self.layers.iter().map(|l| l.compacted(self.len)).collect(),
            len: self.len,
            dtype: self.dtype,
        }
    }

    /// Bytes held by the keys and values (allocated capacity).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(b: &Buffers, len: usize) -> Vec<f32> {
        b.widened(&b.k, len)
    }

    /// `n` values in [−1.5, 1.5), scattered by `seed`.
    fn spread(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 333.3 - 1.5
            })
            .collect()
    }

    #[test]
    fn clones_share_until_written_and_growth_keeps_the_written_part() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let (heads, dim) = (2, 4);
            // Integers below 2048: exact in f16 too.
            let rows = |n: usize, base: f32| -> Vec<f32> {
                (0..heads * n * dim)
                    .map(|i| base + (i % 1000) as f32)
                    .collect()
            };
            let mut a = Buffers::new(heads, dim, MIN_CAPACITY, dtype);
            a.write(0, 3, &rows(3, 0.0), &rows(3, 0.0));
            let before = keys(&a, 3);
            assert_eq!(before, rows(3, 0.0));
            // A copy writing over position 2 (a truncated prefix) leaves the original alone.
            let mut b = a.clone();
            b.write(2, 1, &rows(1, 100.0), &rows(1, 100.0));
            assert_eq!(keys(&a, 3), before);
            assert_ne!(keys(&b, 3), before);
            assert_eq!(keys(&b, 2), keys(&a, 2));
            // Writing past the capacity doubles it and keeps what was written.
            a.write(
                3,
                MIN_CAPACITY,
                &rows(MIN_CAPACITY, 7.0),
                &rows(MIN_CAPACITY, 7.0),
            );
            assert_eq!(a.capacity, 2 * MIN_CAPACITY);
            assert_eq!(keys(&a, 3), before);
            let c = a.compacted(3);
            assert_eq!((c.capacity, keys(&c, 3)), (3, before));
            // An f16 cache holds half the bytes.
            assert_eq!(c.bytes(), 2 * heads * 3 * dim * dtype.size());
        }
    }

    #[test]
    fn an_f16_cache_rounds_to_f16_and_attends_like_f32_over_the_rounded_values() {
        let (heads, dim, len) = (2, 64, 40);
        let (k, v) = (spread(heads * len * dim, 1), spread(heads * len * dim, 2));
        let rounded =
            |x: &[f32]| -> Vec<f32> { x.iter().map(|&x| f16::from_f32(x).to_f32()).collect() };
        let mut half = Buffers::new(heads, dim, MIN_CAPACITY, KvDtype::F16);
        half.write(0, len, &k, &v);
        let mut exact = Buffers::new(heads, dim, MIN_CAPACITY, KvDtype::F32);
        exact.write(0, len, &rounded(&k), &rounded(&v));
        assert_eq!(keys(&half, len), rounded(&k));
        let q: Vec<f32> = (0..2 * heads * dim)
            .map(|i| (i % 7) as f32 * 0.3 - 0.9)
            .collect();
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        half.attend(&q, len, &mut a);
        exact.attend(&q, len, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn a_long_context_attends_in_parallel_parts_like_one_pass_per_head() {
        // 3 KV heads × 1,500 positions: past the parallel threshold, split into parts.
        let (heads, dim, len, rep) = (3, 64, 1500, 3);
        let mut b = Buffers::new(heads, dim, MIN_CAPACITY, KvDtype::F32);
        let n = heads * len * dim;
        b.write(0, len, &spread(n, 1), &spread(n, 2));
        let q: Vec<f32> = (0..rep * heads * dim)
            .map(|i| (i % 11) as f32 * 0.2 - 1.0)
            .collect();
        let mut parallel = vec![0f32; q.len()];
        b.attend(&q, len, &mut parallel);
        let isa = kernels::Isa::selected();
        for (g, want_out) in parallel.chunks(rep * dim).enumerate() {
            let mut one_pass = vec![0f32; rep * dim];
            let (k, v) = (b.head(&b.k, g, len), b.head(&b.v, g, len));
            let qs = &q[g * rep * dim..(g + 1) * rep * dim];
            kernels::attend_group(isa, qs, k, v, dim, 0.125, &mut one_pass);
            for (x, y) in want_out.iter().zip(&one_pass) {
                assert!((x - y).abs() < 1e-5, "head {g}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn attention_of_one_position_equals_the_softmax_formula() {
        let (heads, dim, len) = (1, 2, 3);
        let mut b = Buffers::new(heads, dim, MIN_CAPACITY, KvDtype::F32);
        let k = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        b.write(0, len, &k, &v);
        // Two query heads share the one KV head.
        let q = [2.0, 0.0, 0.0, 2.0];
        let mut out = [0f32; 4];
        b.attend(&q, len, &mut out);
        let s = 1.0 / 2f32.sqrt();
        for (h, qh) in q.chunks(2).enumerate() {
            let scores: Vec<f32> = k
                .chunks(2)
                .map(|k| (qh[0] * k[0] + qh[1] * k[1]) * s)
                .collect();
            let z: f32 = scores.iter().map(|x| x.exp()).sum();
            for c in 0..2 {
                let want: f32 = (0..len).map(|j| scores[j].exp() / z * v[2 * j + c]).sum();
                assert!((out[2 * h + c] - want).abs() < 1e-5, "head {h}: {out:?}");
            }
        }
    }
}
