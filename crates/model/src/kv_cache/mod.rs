//! The KV cache: keys and values of every layer for the positions seen so far.
//!
//! For inference they live in buffers this module owns: per layer, segments of positions,
//! each `[kv_heads][capacity][head_dim]`. A decoding step writes its position in place and
//! attends over the segments directly ([`Buffers::attend`]: one pass over the keys, one over
//! the values, in parts merged exactly), so neither the cache nor the attention costs a copy
//! or an allocation per token; a segment nobody shares doubles when full. Clones (the prefix
//! cache's entries, the requests that continue them) share segments and never write in a
//! shared one: a new request on a cached 5 K-token prompt copies none of it. Prompts (several
//! positions at once) attend on the same kernels, a block of positions per pass over the keys
//! ([`Buffers::attend_positions`]); on a CPU without SIMD kernels, through the backend's fused
//! attention on views of the buffers. Training keeps Burn tensors throughout, so that gradients
//! flow through them. The buffers hold f32, or f16 (`model.kv_cache`): half the memory and
//! half the bytes a long context's decoding reads per token, rounded to 11 significant bits.
//! On a GPU the keys and values stay Burn tensors on the device (concatenated per step): the
//! buffers live in host memory, and reading them back per layer and token would cost a
//! device round trip each time.

mod attention;

use super::kernels::KvSlice;
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

    /// Bytes one position's keys and values take over all layers: what decoding reads per token
    /// of context, on top of the weights.
    pub fn bytes_per_position(self, config: &super::ModelConfig) -> usize {
        2 * config.num_layers * config.num_kv_heads * config.head_dim * self.size()
    }
}

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) len: usize,
    dtype: KvDtype,
}

// One per layer and cache: the tensors' size is no cost worth a box.
#[allow(clippy::large_enum_variant)]
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

/// Smallest capacity allocated for positions of unknown count, in positions.
const MIN_CAPACITY: usize = 256;
/// A layer's positions in more segments than this are merged into one (a copy) before the
/// next is added: a long conversation adds one or two per turn.
const MAX_SEGMENTS: usize = 16;

/// Shorter shared prefixes are copied (a few MB at most) rather than shared, so that short
/// contexts decode over one segment (Qwen2.5's 4 streams on a shared 46-token prompt decoded
/// 126 tok/s over two segments, 147 over one). Unit tests share from 4 positions, so that
/// the test model (128 positions at most) exercises sharing; the tests of the layers above
/// lower it with [`share_prefixes_from`].
static SHARE_FROM: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(if cfg!(test) { 4 } else { 1024 });

/// Shares prefixes from `positions` on instead of 1,024, process-wide: for tests on small
/// models. Sharing changes where keys and values live, never what attention computes.
pub fn share_prefixes_from(positions: usize) {
    SHARE_FROM.store(positions, std::sync::atomic::Ordering::Relaxed);
}

fn share_from() -> usize {
    SHARE_FROM.load(std::sync::atomic::Ordering::Relaxed)
}

/// Positions `start..start + len` of one layer's keys and values, `[heads][capacity][dim]`.
/// Clones share it; only its sole owner writes in it.
#[derive(Debug, Clone)]
struct Segment {
    k: Arc<Bytes>,
    v: Arc<Bytes>,
    start: usize,
    len: usize,
    capacity: usize,
}

impl Segment {
    fn new(heads: usize, dim: usize, start: usize, capacity: usize, dtype: KvDtype) -> Self {
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
            start,
            len: 0,
            capacity,
        }
    }

    fn end(&self) -> usize {
        self.start + self.len
    }

    /// Whether no clone shares it (it may be written in place).
    fn sole(&mut self) -> bool {
        Arc::get_mut(&mut self.k).is_some() && Arc::get_mut(&mut self.v).is_some()
    }

    fn bytes(&self) -> usize {
        self.k.len() + self.v.len()
    }
}

/// One layer's keys and values for inference: segments holding positions `0..len` in order.
///
/// A clone (a prefix cache entry, a request continuing it) shares the segments. Writing never
/// copies what others hold: positions past a shared segment go into a new one, so a request
/// on a cached 5 K-token prompt costs no copy of it, and neither does caching that request's
/// prompt in turn. Attention runs over the segments in parts and merges them exactly.
#[derive(Debug, Clone)]
pub(super) struct Buffers {
    segments: Vec<Segment>,
    heads: usize,
    dim: usize,
    dtype: KvDtype,
    /// Positions the layer will hold (a prompt's length, when known): a new segment makes
    /// room for exactly these, so that a cached prompt holds no spare capacity.
    reserved: usize,
}

impl Buffers {
    fn new(heads: usize, dim: usize, dtype: KvDtype) -> Self {
        Self {
            segments: Vec::new(),
            heads,
            dim,
            dtype,
            reserved: 0,
        }
    }

    fn len(&self) -> usize {
        self.segments.last().map_or(0, Segment::end)
    }

    /// Positions `range` (within segment `s`) of KV head `h`, keys and values, as stored.
    fn run<'a>(&self, s: &'a Segment, h: usize, range: Range<usize>) -> (KvSlice<'a>, KvSlice<'a>) {
        let at = h * s.capacity * self.dim;
        let (a, b) = (
            at + (range.start - s.start) * self.dim,
            at + (range.end - s.start) * self.dim,
        );
        let dtype = self.dtype;
        let slice = |buffer: &'a Bytes| -> KvSlice<'a> {
            match dtype {
                KvDtype::F32 => KvSlice::F32(&bytemuck::cast_slice(&buffer[..])[a..b]),
                KvDtype::F16 => KvSlice::F16(&bytemuck::cast_slice(&buffer[..])[a..b]),
            }
        };
        (slice(&s.k), slice(&s.v))
    }

    /// The runs of KV head `h` over positions `range`: one per segment, split so that none is
    /// longer than `piece` positions.
    fn runs(&self, h: usize, range: Range<usize>, piece: usize) -> Vec<(KvSlice<'_>, KvSlice<'_>)> {
        let mut out = Vec::new();
        for s in self.segments.iter().take_while(|s| s.start < range.end) {
            let (from, to) = (s.start.max(range.start), s.end().min(range.end));
            if from >= to {
                continue;
            }
            let parts = (to - from).div_ceil(piece.max(1));
            for p in 0..parts {
                let (a, b) = (
                    from + p * (to - from) / parts,
                    from + (p + 1) * (to - from) / parts,
                );
                out.push(self.run(s, h, a..b));
            }
        }
        out
    }

    /// Positions `0..len` of the keys (or values) as f32, `[heads][len][dim]`.
    fn widened(&self, values: bool, len: usize) -> Vec<f32> {
        (0..self.heads)
            .flat_map(|h| {
                self.runs(h, 0..len, usize::MAX)
                    .into_iter()
                    .flat_map(|(k, v)| if values { v } else { k }.widened().into_owned())
            })
            .collect()
    }

    /// Forgets positions from `n` on (what others share stays theirs).
    fn truncate(&mut self, n: usize) {
        while self.segments.last().is_some_and(|s| s.start >= n) {
            self.segments.pop();
        }
        if let Some(last) = self.segments.last_mut() {
            last.len = last.len.min(n - last.start);
        }
    }

    /// The segment that positions `start..start + s` go into, written in place: the last one
    /// if nobody shares it (grown if needed: a copy of its own positions only), else a new one.
    fn room(&mut self, start: usize, s: usize) -> &mut Segment {
        let (heads, dim, dtype, reserved) = (self.heads, self.dim, self.dtype, self.reserved);
        let wanted = |from: usize| {
            let need = start + s - from;
            if reserved >= start + s {
                need.max(reserved - from)
            } else {
                need.next_power_of_two().max(MIN_CAPACITY)
            }
        };
        let sole = self.segments.last_mut().is_some_and(Segment::sole);
        if sole {
            let last = self.segments.last_mut().expect("checked");
            if start + s - last.start > last.capacity {
                let capacity = wanted(last.start);
                let mut grown = Segment::new(heads, dim, last.start, capacity, dtype);
                copy_positions(last, &mut grown, heads, dim * dtype.size());
                *last = grown;
            }
        } else if self.segments.len() >= MAX_SEGMENTS || start < share_from() {
            self.merge(wanted(0));
        } else {
            let capacity = wanted(start);
            self.segments
                .push(Segment::new(heads, dim, start, capacity, dtype));
        }
        self.segments.last_mut().expect("made above")
    }

    /// One segment of its own with all positions, with room for `end` of them.
    fn merge(&mut self, end: usize) {
        let len = self.len();
        let mut one = Segment::new(self.heads, self.dim, 0, end.max(len), self.dtype);
        for s in &self.segments {
            copy_positions(s, &mut one, self.heads, self.dim * self.dtype.size());
        }
        self.segments = vec![one];
    }

    /// Writes `s` positions from `start` (at most the current length); `k`, `v` are
    /// `[heads][s][dim]`.
    fn write(&mut self, start: usize, s: usize, k: &[f32], v: &[f32]) {
        debug_assert!(start <= self.len(), "positions are written in order");
        self.truncate(start);
        let (d, heads, dtype) = (self.dim, self.heads, self.dtype);
        let seg = self.room(start, s);
        let (at, cap) = (start - seg.start, seg.capacity);
        seg.len = at + s;
        let (kb, vb) = (
            &mut Arc::get_mut(&mut seg.k).expect("sole")[..],
            &mut Arc::get_mut(&mut seg.v).expect("sole")[..],
        );
        for (buffer, from) in [(kb, k), (vb, v)] {
            for h in 0..heads {
                let (dst, src) = ((h * cap + at) * d, &from[h * s * d..(h + 1) * s * d]);
                match dtype {
                    KvDtype::F32 => bytemuck::cast_slice_mut::<u8, f32>(buffer)[dst..dst + s * d]
                        .copy_from_slice(src),
                    KvDtype::F16 => bytemuck::cast_slice_mut::<u8, f16>(buffer)[dst..dst + s * d]
                        .convert_from_f32_slice(src),
                }
            }
        }
    }

    /// Keys and values of positions `0..len` as `[1, heads, len, dim]` tensors like `like`'s
    /// (copies: a prompt computed without gradients, continued with them).
    fn tensors(&self, len: usize, like: &Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let take = |values: bool| {
            Tensor::<4>::from_data(
                TensorData::new(self.widened(values, len), [1, self.heads, len, self.dim]),
                (&like.device(), like.dtype()),
            )
        };
        (take(false), take(true))
    }

    /// Keys and values of positions `0..len` as `[1, heads, len, dim]` views of one segment's
    /// bytes on the CPU backend (segments are merged into one first: a copy).
    fn views(&mut self, len: usize, like: &Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        if self.segments.len() > 1 {
            self.merge(len);
        }
        let (h, d, seg) = (self.heads, self.dim, &self.segments[0]);
        let stored = match self.dtype {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        };
        let view = |data: &Arc<Bytes>| {
            let cap = seg.capacity;
            let strides = vec![(h * cap * d) as isize, (cap * d) as isize, d as isize, 1];
            let layout = Layout::new(Shape::new([1, h, len, d]), strides, 0);
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
        (view(&seg.k), view(&seg.v))
    }

    /// A copy of positions `0..len` in one segment, sharing nothing.
    #[cfg(test)]
    fn compacted(&self, len: usize) -> Self {
        let mut c = Self::new(self.heads, self.dim, self.dtype);
        let mut one = Segment::new(self.heads, self.dim, 0, len, self.dtype);
        for s in self.segments.iter().take_while(|s| s.start < len) {
            let mut s = s.clone();
            s.len = s.len.min(len - s.start);
            copy_positions(&s, &mut one, self.heads, self.dim * self.dtype.size());
        }
        c.segments.push(one);
        c
    }

    fn bytes(&self) -> usize {
        self.segments.iter().map(Segment::bytes).sum()
    }
}

/// Copies `from`'s positions into `to` (which starts at or before it and has room);
/// `row` is the bytes of one position of one head.
fn copy_positions(from: &Segment, to: &mut Segment, heads: usize, row: usize) {
    let (at, n) = (from.start - to.start, from.len);
    let (fk, fv) = (&from.k[..], &from.v[..]);
    let (k, v) = (
        &mut Arc::get_mut(&mut to.k).expect("a new segment")[..],
        &mut Arc::get_mut(&mut to.v).expect("a new segment")[..],
    );
    for h in 0..heads {
        let dst = (h * to.capacity + at) * row;
        let src = h * from.capacity * row;
        k[dst..dst + n * row].copy_from_slice(&fk[src..src + n * row]);
        v[dst..dst + n * row].copy_from_slice(&fv[src..src + n * row]);
    }
    to.len = to.len.max(at + n);
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
    /// Training and GPUs: appends `k`, `v` (`[1, kv_heads, s, head_dim]`) after the first
    /// `start` positions by concatenation (it keeps the graph simple: few, long chunks, no
    /// decoding; on a GPU the tensors stay on the device); returns the keys and values of
    /// positions `0..start+s`.
    pub(super) fn append(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        start: usize,
    ) -> (Tensor<4>, Tensor<4>) {
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
        (k, v)
    }

    /// The CPU without SIMD kernels (`Isa::Portable`): appends `k`, `v` (`[1, kv_heads, s,
    /// head_dim]`) after the first `start` positions and returns positions `0..start+s` as
    /// views of the buffers for the backend's fused attention (vectorized by the compiler
    /// for the machine: a 4 K-token prompt ran at 386 tok/s through it, 211 through the
    /// portable kernels).
    pub(super) fn append_viewed(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        start: usize,
    ) -> (Tensor<4>, Tensor<4>) {
        let [_, h, s, d] = k.dims();
        let b = self.buffers(h, d, start);
        b.write(start, s, &to_vec(k.clone()), &to_vec(v));
        b.views(start + s, &k)
    }

    /// Appends `k`, `v` (`[1, kv_heads, s, head_dim]`) after the first `start` positions and
    /// returns the causal attention of `q` (`[1, heads, s, head_dim]`, at positions
    /// `start..start+s`) over them, on the cache's own kernels (the CPU, without gradients).
    pub(super) fn attend_prompt(
        &mut self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        start: usize,
    ) -> Tensor<4> {
        let ([_, h, s, d], [_, nh, ..]) = (k.dims(), q.dims());
        let (device, dtype) = (q.device(), q.dtype());
        let b = self.buffers(h, d, start);
        b.write(start, s, &to_vec(k), &to_vec(v));
        let mut out = vec![0f32; nh * s * d];
        b.attend_positions(&to_vec(q), start, s, &mut out);
        Tensor::from_data(TensorData::new(out, [1, nh, s, d]), (&device, dtype))
    }

    /// Decodes one position: appends its key and value (`[kv_heads][dim]`) at `start` and
    /// returns the attention output for `q` (`[query_heads][dim]`) into `out`.
    /// `parallel`: whether the attention may use the other threads (a stream decoding alone).
    pub(super) fn decode(
        &mut self,
        (k, v): (&[f32], &[f32]),
        q: &[f32],
        start: usize,
        heads: usize,
        out: &mut [f32],
        parallel: bool,
    ) {
        let dim = k.len() / heads;
        let b = self.buffers(heads, dim, start);
        b.write(start, 1, k, v);
        b.attend(q, start + 1, out, parallel);
    }

    /// The buffers, holding the first `start` positions of whatever held them before.
    fn buffers(&mut self, heads: usize, dim: usize, start: usize) -> &mut Buffers {
        match std::mem::take(self) {
            LayerCache::Buffers(mut b) => {
                if b.segments.is_empty() {
                    // Reserved before its shape was known.
                    (b.heads, b.dim) = (heads, dim);
                }
                *self = LayerCache::Buffers(b)
            }
            LayerCache::Graph(k, v) if start > 0 => {
                let mut b = Buffers::new(heads, dim, KvDtype::F32);
                let (k, v) = (k.narrow(2, 0, start), v.narrow(2, 0, start));
                b.write(0, start, &to_vec(k), &to_vec(v));
                *self = LayerCache::Buffers(b);
            }
            LayerCache::Empty(dtype) => {
                *self = LayerCache::Buffers(Buffers::new(heads, dim, dtype))
            }
            LayerCache::Graph(..) => {
                *self = LayerCache::Buffers(Buffers::new(heads, dim, KvDtype::F32))
            }
        }
        match self {
            LayerCache::Buffers(b) => b,
            _ => unreachable!("set above"),
        }
    }

    /// Makes new segments hold exactly `n` positions (a prompt's length).
    fn reserve(&mut self, n: usize) {
        match self {
            LayerCache::Empty(dtype) => {
                let mut b = Buffers::new(0, 0, *dtype);
                b.reserved = n;
                *self = LayerCache::Buffers(b);
            }
            LayerCache::Buffers(b) => b.reserved = n,
            LayerCache::Graph(..) => {}
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

    /// Lets the next positions written go into segments sized for `n` positions in all (a
    /// prompt's length), instead of doubling ones: a prompt kept in the prefix cache then
    /// holds no spare capacity.
    pub fn reserve(&mut self, n: usize) {
        self.layers.iter_mut().for_each(|l| l.reserve(n));
    }

    /// The cache of the first `n` positions (shares the buffers, which nobody writes in
    /// while shared: the positions after `n` go into new ones).
    pub fn truncated(&self, n: usize) -> Self {
        Self {
            layers: self.layers.clone(),
            len: n.min(self.len),
            dtype: self.dtype,
        }
    }

    /// Bytes held by the keys and values (allocated capacity).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// The allocations behind the keys and values, as (identity, bytes): clones share them,
    /// so memory held by several caches is the sum over distinct identities. `None`: an
    /// allocation this cache may not share (tensors).
    pub fn allocations(&self) -> Vec<(Option<usize>, usize)> {
        self.layers
            .iter()
            .flat_map(|l| match l {
                LayerCache::Buffers(b) => b
                    .segments
                    .iter()
                    .map(|s| (Some(Arc::as_ptr(&s.k) as usize), s.bytes()))
                    .collect(),
                other => vec![(None, other.bytes())],
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels;

    fn keys(b: &Buffers, len: usize) -> Vec<f32> {
        b.widened(false, len)
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
    fn a_clone_writing_leaves_the_original_alone_and_growth_keeps_it() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let (heads, dim) = (2, 4);
            // Integers below 2048: exact in f16 too.
            let rows = |n: usize, base: f32| -> Vec<f32> {
                (0..heads * n * dim)
                    .map(|i| base + (i % 1000) as f32)
                    .collect()
            };
            let mut a = Buffers::new(heads, dim, dtype);
            a.write(0, 3, &rows(3, 0.0), &rows(3, 0.0));
            let before = keys(&a, 3);
            assert_eq!(before, rows(3, 0.0));
            // A copy writing over position 2 (a truncated prefix) leaves the original alone.
            let mut b = a.clone();
            b.write(2, 1, &rows(1, 100.0), &rows(1, 100.0));
            assert_eq!(keys(&a, 3), before);
            assert_ne!(keys(&b, 3), before);
            assert_eq!(keys(&b, 2), keys(&a, 2));
            drop(b);
            // Writing past the capacity of a segment nobody shares doubles it and keeps what
            // was written.
            a.write(
                3,
                MIN_CAPACITY,
                &rows(MIN_CAPACITY, 7.0),
                &rows(MIN_CAPACITY, 7.0),
            );
            assert_eq!(a.segments.len(), 1);
            assert_eq!(a.segments[0].capacity, 2 * MIN_CAPACITY);
            assert_eq!(keys(&a, 3), before);
            let c = a.compacted(3);
            assert_eq!((c.segments[0].capacity, keys(&c, 3)), (3, before));
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
        let mut half = Buffers::new(heads, dim, KvDtype::F16);
        half.write(0, len, &k, &v);
        let mut exact = Buffers::new(heads, dim, KvDtype::F32);
        exact.write(0, len, &rounded(&k), &rounded(&v));
        assert_eq!(keys(&half, len), rounded(&k));
        let q: Vec<f32> = (0..2 * heads * dim)
            .map(|i| (i % 7) as f32 * 0.3 - 0.9)
            .collect();
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        half.attend(&q, len, &mut a, true);
        exact.attend(&q, len, &mut b, true);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn a_long_context_attends_in_parallel_parts_like_one_pass_per_head() {
        // 3 KV heads × 1,500 positions: past the parallel threshold, split into parts.
        let (heads, dim, len, rep) = (3, 64, 1500, 3);
        let mut b = Buffers::new(heads, dim, KvDtype::F32);
        let n = heads * len * dim;
        b.write(0, len, &spread(n, 1), &spread(n, 2));
        let q: Vec<f32> = (0..rep * heads * dim)
            .map(|i| (i % 11) as f32 * 0.2 - 1.0)
            .collect();
        let mut parallel = vec![0f32; q.len()];
        b.attend(&q, len, &mut parallel, true);
        let isa = kernels::Isa::selected();
        for (g, want_out) in parallel.chunks(rep * dim).enumerate() {
            let mut one_pass = vec![0f32; rep * dim];
            let [(k, v)] = b.runs(g, 0..len, usize::MAX)[..] else {
                panic!("one segment")
            };
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
        let mut b = Buffers::new(heads, dim, KvDtype::F32);
        let k = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        b.write(0, len, &k, &v);
        // Two query heads share the one KV head.
        let q = [2.0, 0.0, 0.0, 2.0];
        let mut out = [0f32; 4];
        b.attend(&q, len, &mut out, true);
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

    /// A cache built the way the prefix cache builds them: a prompt shared by two clones, each
    /// continuing it in segments of its own, one of them reserved for its prompt's length.
    fn segmented(heads: usize, dim: usize, len: usize) -> (Buffers, Buffers) {
        let at = |n: usize, seed: u32| spread(heads * n * dim, seed);
        let shared_len = len * 3 / 5;
        let mut prompt = Buffers::new(heads, dim, KvDtype::F32);
        prompt.write(0, shared_len, &at(shared_len, 1), &at(shared_len, 2));
        let mut other = prompt.clone();
        other.write(shared_len - 7, 9, &at(9, 3), &at(9, 4));
        let mut cache = prompt.clone();
        cache.reserved = len - 40;
        // The rest in chunks, then positions one at a time (a reply).
        let mut start = shared_len - 5;
        for n in [20, len - 40 - (shared_len - 5) - 20] {
            cache.write(start, n, &at(n, start as u32), &at(n, start as u32 + 1));
            start += n;
        }
        // The prompt goes into the prefix cache: the reply into a new segment.
        let entry = cache.clone();
        while start < len {
            cache.write(start, 1, &at(1, start as u32), &at(1, start as u32 + 1));
            start += 1;
        }
        let one = cache.compacted(len);
        assert_eq!(keys(&entry, len - 40), keys(&one, len - 40));
        (cache, one)
    }

    #[test]
    fn attention_over_segments_equals_attention_over_one_copy() {
        let (dim, rep) = (64, 3);
        // Short (one pass per head) and long (parts in parallel) contexts, with shared prefixes
        // long enough to stay shared.
        for (heads, len) in [(1, 2000), (3, 2000)] {
            let (cache, one) = segmented(heads, dim, len);
            assert!(
                cache.segments.len() >= 3,
                "{} segments",
                cache.segments.len()
            );
            assert_eq!(cache.len(), len);
            assert_eq!(keys(&cache, len), keys(&one, len));
            // The prompt's reserved segment holds exactly its positions.
            assert_eq!(cache.segments[1].capacity, cache.segments[1].len);
            let q: Vec<f32> = (0..rep * heads * dim)
                .map(|i| (i % 13) as f32 * 0.15 - 0.9)
                .collect();
            let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            cache.attend(&q, len, &mut a, true);
            one.attend(&q, len, &mut b, true);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "len {len}: {x} vs {y}");
            }
            // Prompt positions: each query over the positions up to its own (in 3 blocks of
            // positions, 21 a block with 3 query heads a KV head).
            let s = 50;
            let qs: Vec<f32> = (0..rep * heads * s * dim)
                .map(|i| (i % 17) as f32 * 0.1 - 0.8)
                .collect();
            let mut out = vec![0f32; qs.len()];
            cache.attend_positions(&qs, len - s, s, &mut out);
            for i in 0..s {
                // Query position i alone, `[query_heads][dim]`.
                let row = |x: &[f32]| -> Vec<f32> {
                    (0..rep * heads)
                        .flat_map(|h| x[(h * s + i) * dim..(h * s + i + 1) * dim].to_vec())
                        .collect()
                };
                let mut want = vec![0f32; rep * heads * dim];
                one.attend(&row(&qs), len - s + i + 1, &mut want, true);
                for (x, y) in row(&out).iter().zip(&want) {
                    assert!((x - y).abs() < 1e-5, "len {len}, position {i}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn views_for_the_fused_attention_hold_the_positions_of_every_segment() {
        let (heads, dim, len) = (3, 64, 2000);
        let (mut cache, one) = segmented(heads, dim, len);
        let like = Tensor::<4>::zeros([1, heads, 1, dim], &burn::tensor::Device::flex());
        let (k, v) = cache.views(len, &like);
        assert_eq!(cache.segments.len(), 1, "merged for the views");
        assert_eq!(to_vec(k), keys(&one, len));
        assert_eq!(to_vec(v), one.widened(true, len));
    }

    #[test]
    fn short_prefixes_are_copied_and_too_many_segments_merged() {
        let (heads, dim) = (1, 4);
        let row = |p: usize| vec![p as f32; dim];
        let mut b = Buffers::new(heads, dim, KvDtype::F32);
        b.write(0, 1, &row(0), &row(0));
        let short = b.clone();
        b.write(1, 1, &row(1), &row(1));
        assert_eq!(
            b.segments.len(),
            1,
            "a shared prefix under SHARE_FROM is copied"
        );
        assert!(!Arc::ptr_eq(&b.segments[0].k, &short.segments[0].k));
        let n = share_from() + 2 * MAX_SEGMENTS;
        let mut clones = Vec::new();
        let mut most = 0;
        for p in 2..n {
            b.write(p, 1, &row(p), &row(p));
            // Someone shares every segment written: the next position needs a new one.
            clones.push(b.clone());
            most = most.max(b.segments.len());
        }
        assert_eq!(most, MAX_SEGMENTS);
        assert!(b.segments.len() < MAX_SEGMENTS, "merged on the way");
        let want: Vec<f32> = (0..n).flat_map(row).collect();
        assert_eq!(keys(&b, n), want);
        assert_eq!(b.widened(true, n), want);
    }
}
