//! x86-64 kernels. A block's weights are unpacked to bytes in 128-bit registers (16 at a
//! time), widened to f32 and meet 16 activations in fused multiply-adds; the block's scale
//! multiplies the sum once. Offsets and minimums multiply the activations' block sum
//! (`Σ (q·d + m)·x = d·Σq·x + m·Σx`). The kernel bodies are written once (`kernels!`) and
//! compiled twice: for AVX2 (8 lanes) and for AVX-512 (16 lanes), each with its own widening.

use crate::blocks::{Q4_0, Q4_1, Q4K, Q5_0, Q6K, Q8_0, blocks};
use crate::quant::{GgmlType, scale_min_k4};
use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma,f16c")]
fn f16(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load16(b: &[u8]) -> __m128i {
    assert!(b.len() >= 16);
    // SAFETY: 16 readable bytes checked above; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) }
}

/// Low nibbles (weights 0..16) and high nibbles (16..32) of a 16-byte group.
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles(qs: &[u8]) -> (__m128i, __m128i) {
    let v = load16(qs);
    let mask = _mm_set1_epi8(0x0F);
    (
        _mm_and_si128(v, mask),
        _mm_and_si128(_mm_srli_epi16(v, 4), mask),
    )
}

/// Byte k of the result is 0x10 where bit k of `bits` (16 bits) is set (Q5_0's fifth bits).
#[target_feature(enable = "avx2,fma,f16c")]
fn fifth_bits(bits: u32) -> __m128i {
    let spread = _mm_set_epi64x(0x0101010101010101, 0);
    let b = _mm_shuffle_epi8(_mm_cvtsi32_si128(bits as i32), spread);
    let probe = _mm_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let set = _mm_cmpeq_epi8(_mm_or_si128(b, probe), _mm_set1_epi64x(-1));
    _mm_and_si128(set, _mm_set1_epi8(0x10))
}

/// A row of Q4_0 or Q4_1 blocks, cut into its blocks once (not once per block).
#[derive(Clone, Copy)]
enum Q4Row<'a> {
    Q4_0(&'a [[u8; Q4_0::BYTES]]),
    Q4_1(&'a [[u8; Q4_1::BYTES]]),
}

impl<'a> Q4Row<'a> {
    fn new(ty: GgmlType, w: &'a [u8]) -> Self {
        if ty == GgmlType::Q4_0 {
            Self::Q4_0(blocks(w))
        } else {
            Self::Q4_1(blocks(w))
        }
    }

    fn len(self) -> usize {
        match self {
            Self::Q4_0(q) => q.len(),
            Self::Q4_1(q) => q.len(),
        }
    }
}

/// ln 2 in two parts (Cephes): n·C1 is exact in f32, so x − n·ln 2 keeps its low bits.
const EXP_C1: f32 = 0.693_359_4;
const EXP_C2: f32 = -2.121_944_4e-4;
/// exp(r) ≈ 1 + r + r²·P(r) on |r| ≤ ln 2 / 2, highest power first (Cephes' expf).
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
/// Positions per pass of decoding attention's weighted sum (64 × 64 floats: 16 KB of values).
const ATTEND_CHUNK: usize = 64;

/// The six kernels and their dispatcher, for one instruction set. Expects in scope: `Acc`
/// (the accumulator vector), `zero()`, `dot16::<SIGNED>(bytes, x, at, acc)` (acc + 16 bytes ·
/// x[at..at+16]), `widen16_5(nibbles, bits)` (16 Q5_0 weights), `times(w, s)` (widened weights · s), `scaled(acc, s, block)` (acc + s·block), `add(a, b)`, `hsum(acc)`, and for
/// attention `load_w`/`store_w` (16 floats), `load_kv::<HALF>(bytes, at)` (16 cached f32 or
/// f16 values), `fma_w(p, w, acc)` (acc + p·w),
/// `exp_minus16(w, m)` (exp(w − m)) and `sum16(w, acc)` (acc + w), `scores16::<HALF>(keys,
/// q, d)` (q · 16 cached keys), `mul_w(a, b)` and `silu16(w)`
/// (w / (1 + exp(−w))); `BY_TABLE`, `indexes(bytes)`, `table(scale, offset)` and
/// `lookup::<HIGH>(indexes, table)` choose how 4 rows meet 4-bit blocks.
macro_rules! kernels {
    ($features:literal) => {
        /// `sums[b]` is the sum of `x[32b..32b+32]`.
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub unsafe fn dot(ty: GgmlType, w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
            match ty {
                GgmlType::Q8_0 => q8_0(w, x),
                GgmlType::Q4_0 => q4_0(w, x, sums),
                GgmlType::Q4_1 => q4_1(w, x, sums),
                GgmlType::Q5_0 => q5_0(w, x, sums),
                GgmlType::Q4_K => q4_k(w, x, sums),
                GgmlType::Q6_K => q6_k(w, x),
                other => unreachable!("no SIMD kernel for {other:?}"),
            }
        }

        /// The weights of row `w` into `out[..its length]`: the same numbers as
        /// [`crate::quant::dequantize_into`] (each lane rounded as its scalar expression is);
        /// false for a type without a SIMD form here.
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub unsafe fn dequantize(ty: GgmlType, w: &[u8], out: &mut [f32]) -> bool {
            let mut put = |at: usize, lo: W, hi: W| {
                store_w(out, at, lo);
                store_w(out, at + 16, hi);
            };
            match ty {
                GgmlType::Q8_0 => {
                    for (i, b) in blocks(w).iter().map(Q8_0).enumerate() {
                        let (d, qs) = (f16(b.d()), b.qs());
                        let lo = times(widen16::<true>(load16(&qs[..16])), d);
                        put(32 * i, lo, times(widen16::<true>(load16(&qs[16..])), d));
                    }
                }
                GgmlType::Q4_0 => {
                    for (i, b) in blocks(w).iter().map(Q4_0).enumerate() {
                        let d = f16(b.d());
                        let (lo, hi) = nibbles(b.qs());
                        let weights = |q| times(plus(widen16::<false>(q), -8.0), d);
                        put(32 * i, weights(lo), weights(hi));
                    }
                }
                GgmlType::Q4_1 => {
                    for (i, b) in blocks(w).iter().map(Q4_1).enumerate() {
                        let (d, m) = (f16(b.d()), f16(b.m()));
                        let (lo, hi) = nibbles(b.qs());
                        let weights = |q| plus(times(widen16::<false>(q), d), m);
                        put(32 * i, weights(lo), weights(hi));
                    }
                }
                GgmlType::Q5_0 => {
                    for (i, b) in blocks(w).iter().map(Q5_0).enumerate() {
                        let (d, qh) = (f16(b.d()), b.qh());
                        let (lo, hi) = nibbles(b.qs());
                        let weights = |q, bits| times(plus(widen16_5(q, bits), -16.0), d);
                        put(32 * i, weights(lo, qh & 0xFFFF), weights(hi, qh >> 16));
                    }
                }
                GgmlType::Q4_K => {
                    let mask = _mm_set1_epi8(0x0F);
                    for (i, b) in blocks::<{ Q4K::BYTES }>(w).iter().map(Q4K).enumerate() {
                        let (d, dmin) = (f16(b.d()), f16(b.dmin()));
                        for c in 0..4 {
                            let qs = b.chunk(c);
                            let (a, z) = (load16(&qs[..16]), load16(&qs[16..]));
                            // Sub-block 2c: the chunk's low nibbles; 2c + 1: its high ones.
                            for h in 0..2 {
                                let (a, z) = if h == 1 {
                                    (_mm_srli_epi16(a, 4), _mm_srli_epi16(z, 4))
                                } else {
                                    (a, z)
                                };
                                let j = 2 * c + h;
                                let (sc, m) = scale_min_k4(j, b.scales());
                                let (scale, min) = (d * sc as f32, dmin * m as f32);
                                let weights = |q| {
                                    plus(
                                        times(widen16::<false>(_mm_and_si128(q, mask)), scale),
                                        -min,
                                    )
                                };
                                put(256 * i + 32 * j, weights(a), weights(z));
                            }
                        }
                    }
                }
                GgmlType::Q6_K => {
                    for (i, b) in blocks::<{ Q6K::BYTES }>(w).iter().map(Q6K).enumerate() {
                        let d = f16(b.d());
                        for (h, k, s) in (0..16).map(|t| (t / 8, t / 2 % 4, t % 2)) {
                            let (q, sc) = q6_k_16(b, h, k, s);
                            let weights = times(widen16::<true>(q), d * sc as f32);
                            store_w(out, 256 * i + 128 * h + 32 * k + 16 * s, weights);
                        }
                    }
                }
                _ => return false,
            }
            true
        }

        #[target_feature(enable = $features)]
        fn dot16<const SIGNED: bool>(q: __m128i, x: &[f32], at: usize, acc: Acc) -> Acc {
            fma16(widen16::<SIGNED>(q), x, at, acc)
        }

        /// Block `i` of a row of Q4_0 or Q4_1 blocks: its scale, minimum and nibbles (Q4_0's
        /// weights are d·(q − 8): a minimum of −8d).
        #[target_feature(enable = $features)]
        fn q4_fields<'a>(row: Q4Row<'a>, i: usize) -> (f32, f32, &'a [u8; 16]) {
            match row {
                Q4Row::Q4_0(q) => {
                    let b = Q4_0(&q[i]);
                    let d = f16(b.d());
                    (d, -8.0 * d, b.qs())
                }
                Q4Row::Q4_1(q) => {
                    let b = Q4_1(&q[i]);
                    (f16(b.d()), f16(b.m()), b.qs())
                }
            }
        }

        /// Block `i` of a row of Q4_0 or Q4_1 blocks as its weights, low and high 16, looked
        /// up in the block's table.
        #[target_feature(enable = $features)]
        fn q4_block(row: Q4Row, i: usize) -> (W, W) {
            let (d, m, qs) = q4_fields(row, i);
            let (x, t) = (indexes(qs), table(d, m));
            (lookup::<false>(x, t), lookup::<true>(x, t))
        }

        /// Sub-block `j` of a Q4_K block by table: the low (even `j`) or high nibbles of the
        /// 32 bytes of chunk j / 2.
        #[target_feature(enable = $features)]
        fn q4_k_sub_block(b: Q4K, j: usize) -> (W, W) {
            let (d, dmin) = (f16(b.d()), f16(b.dmin()));
            let (sc, m) = scale_min_k4(j, b.scales());
            let t = table(d * sc as f32, -dmin * m as f32);
            let qs = b.chunk(j / 2);
            let (a, z) = (indexes(&qs[..16]), indexes(&qs[16..]));
            if j % 2 == 0 {
                (lookup::<false>(a, t), lookup::<false>(z, t))
            } else {
                (lookup::<true>(a, t), lookup::<true>(z, t))
            }
        }

        /// 4 rows of activations times a row of `blocks` 32-weight blocks, `block(i)` giving
        /// block i's weights: two multiply-adds a row and block (no scale or minimum per row).
        /// The high halves get accumulators of their own, so that no row waits on two
        /// dependent multiply-adds a block.
        #[target_feature(enable = $features)]
        fn rows4_by_table(
            blocks: usize,
            block: impl Fn(usize) -> (W, W),
            x: [&[f32]; 4],
        ) -> (Acc, Acc, Acc, Acc) {
            let (mut a0, mut a1, mut a2, mut a3) = (zero(), zero(), zero(), zero());
            let (mut h0, mut h1, mut h2, mut h3) = (zero(), zero(), zero(), zero());
            for i in 0..blocks {
                let (lo, hi) = block(i);
                let (at, at_hi) = (32 * i, 32 * i + 16);
                a0 = fma16(lo, x[0], at, a0);
                h0 = fma16(hi, x[0], at_hi, h0);
                a1 = fma16(lo, x[1], at, a1);
                h1 = fma16(hi, x[1], at_hi, h1);
                a2 = fma16(lo, x[2], at, a2);
                h2 = fma16(hi, x[2], at_hi, h2);
                a3 = fma16(lo, x[3], at, a3);
                h3 = fma16(hi, x[3], at_hi, h3);
            }
            (add(a0, h0), add(a1, h1), add(a2, h2), add(a3, h3))
        }

        /// Dot products of the weight row `w` with 4 activation rows at once (batched
        /// decoding): each block is unpacked once for the 4 rows. `None` for types without
        /// one.
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot4(
            ty: GgmlType,
            w: &[u8],
            x: [&[f32]; 4],
            sums: [&[f32]; 4],
        ) -> Option<[f32; 4]> {
            // Four named accumulators, the four rows' lines written out in every arm: an
            // array, const generics, or a closure over a tuple of the four each measured
            // 17–125 % slower (`bench --kernels`), the compiler no longer keeping them in
            // registers.
            let (mut a0, mut a1, mut a2, mut a3) = (zero(), zero(), zero(), zero());
            let mut offset = [0f32; 4];
            // acc + scale · Σ over the block's 32 widened weights (lo, hi) · x's block `i`.
            let block = |acc: Acc, scale: f32, lo: W, hi: W, x: &[f32], i: usize| {
                scaled(
                    acc,
                    scale,
                    fma16(hi, x, 32 * i + 16, fma16(lo, x, 32 * i, zero())),
                )
            };
            match ty {
                // 4-bit blocks by table: the block's weights themselves meet the rows.
                GgmlType::Q4_0 | GgmlType::Q4_1 if BY_TABLE => {
                    let row = Q4Row::new(ty, w);
                    let block = |i: usize| q4_block(row, i);
                    (a0, a1, a2, a3) = rows4_by_table(row.len(), block, x);
                }
                GgmlType::Q4_K if BY_TABLE => {
                    let q = blocks::<{ Q4K::BYTES }>(w);
                    let block = |i: usize| q4_k_sub_block(Q4K(&q[i / 8]), i % 8);
                    (a0, a1, a2, a3) = rows4_by_table(q.len() * 8, block, x);
                }
                GgmlType::Q4_0 | GgmlType::Q4_1 => {
                    let row = Q4Row::new(ty, w);
                    for i in 0..row.len() {
                        let (d, m, qs) = q4_fields(row, i);
                        let (lo, hi) = nibbles(qs);
                        let (lo, hi) = (widen16::<false>(lo), widen16::<false>(hi));
                        a0 = block(a0, d, lo, hi, x[0], i);
                        a1 = block(a1, d, lo, hi, x[1], i);
                        a2 = block(a2, d, lo, hi, x[2], i);
                        a3 = block(a3, d, lo, hi, x[3], i);
                        for (o, s) in offset.iter_mut().zip(&sums) {
                            *o += m * s[i];
                        }
                    }
                }
                GgmlType::Q8_0 => {
                    for (i, b) in blocks(w).iter().map(Q8_0).enumerate() {
                        let (d, qs) = (f16(b.d()), b.qs());
                        let lo = widen16::<true>(load16(&qs[..16]));
                        let hi = widen16::<true>(load16(&qs[16..]));
                        a0 = block(a0, d, lo, hi, x[0], i);
                        a1 = block(a1, d, lo, hi, x[1], i);
                        a2 = block(a2, d, lo, hi, x[2], i);
                        a3 = block(a3, d, lo, hi, x[3], i);
                    }
                }
                GgmlType::Q5_0 => {
                    for (i, b) in blocks(w).iter().map(Q5_0).enumerate() {
                        let (d, qh) = (f16(b.d()), b.qh());
                        let (lo, hi) = nibbles(b.qs());
                        let (lo, hi) = (widen16_5(lo, qh & 0xFFFF), widen16_5(hi, qh >> 16));
                        a0 = block(a0, d, lo, hi, x[0], i);
                        a1 = block(a1, d, lo, hi, x[1], i);
                        a2 = block(a2, d, lo, hi, x[2], i);
                        a3 = block(a3, d, lo, hi, x[3], i);
                        for (o, s) in offset.iter_mut().zip(&sums) {
                            *o -= 16.0 * d * s[i];
                        }
                    }
                }
                GgmlType::Q4_K => {
                    let mask = _mm_set1_epi8(0x0F);
                    for (i, b) in blocks::<{ Q4K::BYTES }>(w).iter().map(Q4K).enumerate() {
                        let (d, dmin) = (f16(b.d()), f16(b.dmin()));
                        // Sub-block j = 2c + h: the low (h = 0) or high nibbles of chunk c.
                        for c in 0..4 {
                            let qs = b.chunk(c);
                            let (a, z) = (load16(&qs[..16]), load16(&qs[16..]));
                            for h in 0..2 {
                                let (a, z) = if h == 1 {
                                    (_mm_srli_epi16(a, 4), _mm_srli_epi16(z, 4))
                                } else {
                                    (a, z)
                                };
                                let j = 2 * c + h;
                                let lo = widen16::<false>(_mm_and_si128(a, mask));
                                let hi = widen16::<false>(_mm_and_si128(z, mask));
                                let (sc, m) = scale_min_k4(j, b.scales());
                                let (scale, min) = (d * sc as f32, dmin * m as f32);
                                // Sub-block j of block i is 32-weight block 8i + j.
                                let k = 8 * i + j;
                                a0 = block(a0, scale, lo, hi, x[0], k);
                                a1 = block(a1, scale, lo, hi, x[1], k);
                                a2 = block(a2, scale, lo, hi, x[2], k);
                                a3 = block(a3, scale, lo, hi, x[3], k);
                                for (o, s) in offset.iter_mut().zip(&sums) {
                                    *o -= min * s[k];
                                }
                            }
                        }
                    }
                }
                GgmlType::Q6_K => {
                    let (low4, low2, bias) =
                        (_mm_set1_epi8(0x0F), _mm_set1_epi8(3), _mm_set1_epi8(32));
                    for (i, b) in blocks::<{ Q6K::BYTES }>(w).iter().map(Q6K).enumerate() {
                        let d = f16(b.d());
                        for h in 0..2 {
                            let (ql, qh, sc) = (b.ql(h), b.qh(h), b.scales(h));
                            for k in 0..4 {
                                let lo_at = 32 * (k & 1);
                                let shift = _mm_cvtsi32_si128(4 * (k >> 1) as i32);
                                for s in 0..2 {
                                    let low = _mm_and_si128(
                                        _mm_srl_epi16(load16(&ql[lo_at + 16 * s..]), shift),
                                        low4,
                                    );
                                    let high = _mm_srl_epi16(
                                        load16(&qh[16 * s..]),
                                        _mm_cvtsi32_si128(2 * k as i32),
                                    );
                                    let high = _mm_slli_epi16(_mm_and_si128(high, low2), 4);
                                    let q = _mm_sub_epi8(_mm_or_si128(low, high), bias);
                                    // Every 16 weights have their own scale: applied to the
                                    // weights once, then one multiply-add per row.
                                    let scale = d * (sc[2 * k + s] as i8) as f32;
                                    let q = times(widen16::<true>(q), scale);
                                    let at = 256 * i + 128 * h + 32 * k + 16 * s;
                                    a0 = fma16(q, x[0], at, a0);
                                    a1 = fma16(q, x[1], at, a1);
                                    a2 = fma16(q, x[2], at, a2);
                                    a3 = fma16(q, x[3], at, a3);
                                }
                            }
                        }
                    }
                }
                _ => return None,
            }
            Some([
                hsum(a0) + offset[0],
                hsum(a1) + offset[1],
                hsum(a2) + offset[2],
                hsum(a3) + offset[3],
            ])
        }

        /// Attention of `rep` query rows `qs` (`[rep][d]`) over the `len` positions of one KV
        /// head (`keys`, `values`: `[len][d]` of f32, or of f16 when `HALF`, as bytes) into
        /// `out` (`[rep][d]`), unnormalized (`kernels::attend_part`): each row's (maximum
        /// score, Σ exp(score − maximum)) go to `stats`; `d` a multiple of 64.
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn attend_part<const HALF: bool>(
            qs: &[f32],
            keys: &[u8],
            values: &[u8],
            d: usize,
            scale: f32,
            out: &mut [f32],
            stats: &mut [(f32, f32)],
        ) {
            assert!(d.is_multiple_of(64) && qs.len().is_multiple_of(d) && out.len() == qs.len());
            let row_bytes = d * if HALF { 2 } else { 4 };
            let len = keys.len() / row_bytes;
            let mut scores = vec![0f32; qs.len() / d * len];
            // 16 keys at a time: their sums across lanes come out of one reduction.
            let whole = len / 16 * 16;
            for j in (0..whole).step_by(16) {
                let sixteen = &keys[j * row_bytes..(j + 16) * row_bytes];
                for (r, q) in qs.chunks_exact(d).enumerate() {
                    let s = times(scores16::<HALF>(sixteen, q, d), scale);
                    store_w(&mut scores[r * len..], j, s);
                }
            }
            for (j, key) in keys.chunks_exact(row_bytes).enumerate().skip(whole) {
                for (r, q) in qs.chunks_exact(d).enumerate() {
                    let (mut a, mut b) = (zero(), zero());
                    for at in (0..d).step_by(32) {
                        a = fma16(load_kv::<HALF>(key, at), q, at, a);
                        b = fma16(load_kv::<HALF>(key, at + 16), q, at + 16, b);
                    }
                    scores[r * len + j] = hsum(add(a, b)) * scale;
                }
            }
            // Softmax without its division: the caller divides each output row by its sum.
            exponentiate(&mut scores, len, stats);
            // Σ_j p_j · value_j, 64 positions at a time (their values stay in the L1 cache for
            // every query row), 64 outputs in registers across them.
            out.fill(0.0);
            for (c, chunk) in values.chunks(ATTEND_CHUNK * row_bytes).enumerate() {
                for (r, o) in out.chunks_exact_mut(d).enumerate() {
                    let p = &scores[r * len + c * ATTEND_CHUNK..];
                    for at in (0..d).step_by(64) {
                        let (mut a0, mut a1) = (load_w(o, at), load_w(o, at + 16));
                        let (mut a2, mut a3) = (load_w(o, at + 32), load_w(o, at + 48));
                        for (value, &p) in chunk.chunks_exact(row_bytes).zip(p) {
                            a0 = fma_w(p, load_kv::<HALF>(value, at), a0);
                            a1 = fma_w(p, load_kv::<HALF>(value, at + 16), a1);
                            a2 = fma_w(p, load_kv::<HALF>(value, at + 32), a2);
                            a3 = fma_w(p, load_kv::<HALF>(value, at + 48), a3);
                        }
                        store_w(o, at, a0);
                        store_w(o, at + 16, a1);
                        store_w(o, at + 32, a2);
                        store_w(o, at + 48, a3);
                    }
                }
            }
        }

        /// Each row of `scores` (`[row][len]`) as exp(score − the row's maximum), with the row's
        /// (maximum, Σ of them) into `stats`: a softmax without its division.
        #[target_feature(enable = $features)]
        fn exponentiate(scores: &mut [f32], len: usize, stats: &mut [(f32, f32)]) {
            for (row, stat) in scores.chunks_exact_mut(len.max(1)).zip(stats.iter_mut()) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut total = zero();
                let mut chunks = row.chunks_exact_mut(16);
                for c in chunks.by_ref() {
                    let e = exp_minus16(load_w(c, 0), max);
                    store_w(c, 0, e);
                    total = sum16(e, total);
                }
                let mut sum = hsum(total);
                for v in chunks.into_remainder() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                *stat = (max, sum);
            }
        }

        /// `gate[i] = silu(gate[i]) · up[i]` (the MLP's activation), 16 at a time; the
        /// exponential clamped to ±87 (an f32 overflows past 88), which moves no result.
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
            let whole = gate.len() / 16 * 16;
            for at in (0..whole).step_by(16) {
                let g = load_w(gate, at);
                store_w(gate, at, mul_w(silu16(g), load_w(up, at)));
            }
            for (g, u) in gate[whole..].iter_mut().zip(&up[whole..]) {
                *g = crate::kernels::silu(*g) * u;
            }
        }

        /// Σ exp(x − max) over `xs`: runs of 256 in f32 registers, added up in f64.
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn sum_exp_minus(xs: &[f32], max: f32) -> f64 {
            let mut chunks = xs.chunks_exact(256);
            let mut total = 0f64;
            for run in chunks.by_ref() {
                let mut acc = zero();
                for at in (0..256).step_by(16) {
                    acc = sum16(exp_minus16(load_w(run, at), max), acc);
                }
                total += hsum(acc) as f64;
            }
            let tail: f64 = chunks
                .remainder()
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum();
            total + tail
        }

        /// Σ x[i]·w[i] of an f32 vector and an f16 one of the same length (a LoRA input times
        /// a row of A).
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot_half(x: &[f32], w: &[half::f16]) -> f32 {
            assert_eq!(x.len(), w.len());
            let bytes: &[u8] = bytemuck::cast_slice(w);
            let whole = x.len() / 32 * 32;
            let (mut a, mut b) = (zero(), zero());
            for at in (0..whole).step_by(32) {
                a = fma16(load_kv::<true>(bytes, at), x, at, a);
                b = fma16(load_kv::<true>(bytes, at + 16), x, at + 16, b);
            }
            let tail: f32 = x[whole..]
                .iter()
                .zip(&w[whole..])
                .map(|(x, w)| x * w.to_f32())
                .sum();
            hsum(add(a, b)) + tail
        }

        /// A run of outputs' low-rank update: `y[16g + j] += Σ_k down[k] · up[(g·rank + k)·16 + j]`
        /// (`up` in groups of 16 outputs, each `[rank][16]`: contiguous reads, and one
        /// multiply-add per rank for 16 outputs, no horizontal sums).
        ///
        /// # Safety
        /// The CPU must support the module's instruction set.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn add_low_rank(y: &mut [f32], down: &[f32], up: &[half::f16]) {
            let rank = down.len();
            let whole = y.len() / 16 * 16;
            for at in (0..whole).step_by(16) {
                let group: &[u8] = bytemuck::cast_slice(&up[at * rank..(at + 16) * rank]);
                let mut acc = load_w(y, at);
                for (k, &d) in down.iter().enumerate() {
                    acc = fma_w(d, load_kv::<true>(group, 16 * k), acc);
                }
                store_w(y, at, acc);
            }
            for (i, y) in y.iter_mut().enumerate().skip(whole) {
                let (g, j) = (i / 16, i % 16);
                *y += (0..rank)
                    .map(|k| down[k] * up[(g * rank + k) * 16 + j].to_f32())
                    .sum::<f32>();
            }
        }

        /// Σ over 32 unsigned 4-bit weights · x of one block.
        #[target_feature(enable = $features)]
        fn nibble_block(qs: &[u8], x: &[f32], at: usize) -> Acc {
            let (lo, hi) = nibbles(qs);
            dot16::<false>(hi, x, at + 16, dot16::<false>(lo, x, at, zero()))
        }

        /// Σ over the blocks of `w` of scale · block + offset, as `block(bytes, index)` returns
        /// them. Two independent accumulators: one chain of fused multiply-adds would wait on
        /// each one's latency (it halved the kernels' speed).
        #[target_feature(enable = $features)]
        fn sum_blocks<const N: usize>(
            w: &[u8],
            block: impl Fn(&[u8; N], usize) -> (f32, Acc, f32),
        ) -> f32 {
            let (mut acc, mut offset) = ([zero(), zero()], [0f32, 0f32]);
            let mut pairs = blocks::<N>(w).chunks_exact(2);
            let mut i = 0;
            for pair in pairs.by_ref() {
                let (s0, v0, o0) = block(&pair[0], i);
                let (s1, v1, o1) = block(&pair[1], i + 1);
                acc = [scaled(acc[0], s0, v0), scaled(acc[1], s1, v1)];
                offset = [offset[0] + o0, offset[1] + o1];
                i += 2;
            }
            if let Some(b) = pairs.remainder().first() {
                let (s, v, o) = block(b, i);
                acc[0] = scaled(acc[0], s, v);
                offset[0] += o;
            }
            hsum(add(acc[0], acc[1])) + offset[0] + offset[1]
        }

        #[target_feature(enable = $features)]
        fn q8_0(w: &[u8], x: &[f32]) -> f32 {
            sum_blocks::<{ Q8_0::BYTES }>(w, |b, i| {
                let (d, qs) = (Q8_0(b).d(), Q8_0(b).qs());
                let lo = dot16::<true>(load16(&qs[..16]), x, 32 * i, zero());
                (
                    f16(d),
                    dot16::<true>(load16(&qs[16..]), x, 32 * i + 16, lo),
                    0.0,
                )
            })
        }

        #[target_feature(enable = $features)]
        fn q4_0(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
            sum_blocks::<{ Q4_0::BYTES }>(w, |b, i| {
                let b = Q4_0(b);
                let d = f16(b.d());
                (d, nibble_block(b.qs(), x, 32 * i), -8.0 * d * sums[i])
            })
        }

        #[target_feature(enable = $features)]
        fn q4_1(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
            sum_blocks::<{ Q4_1::BYTES }>(w, |b, i| {
                let b = Q4_1(b);
                (
                    f16(b.d()),
                    nibble_block(b.qs(), x, 32 * i),
                    f16(b.m()) * sums[i],
                )
            })
        }

        #[target_feature(enable = $features)]
        fn q5_0(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
            sum_blocks::<{ Q5_0::BYTES }>(w, |b, i| {
                let b = Q5_0(b);
                let (d, qh) = (f16(b.d()), b.qh());
                let (lo, hi) = nibbles(b.qs());
                let (lo, hi) = (widen16_5(lo, qh & 0xFFFF), widen16_5(hi, qh >> 16));
                let block = fma16(hi, x, 32 * i + 16, fma16(lo, x, 32 * i, zero()));
                (d, block, -16.0 * d * sums[i])
            })
        }

        #[target_feature(enable = $features)]
        fn q4_k(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
            let (mut acc, mut offset) = ([zero(), zero()], 0f32);
            let mask = _mm_set1_epi8(0x0F);
            for (i, b) in blocks::<{ Q4K::BYTES }>(w).iter().map(Q4K).enumerate() {
                let (d, dmin, scales) = (f16(b.d()), f16(b.dmin()), b.scales());
                // 4 groups of 32 bytes: the low nibbles are a sub-block of 32, the high ones
                // the next.
                for c in 0..4 {
                    let qs = b.chunk(c);
                    let (a, z) = (load16(&qs[..16]), load16(&qs[16..]));
                    for h in 0..2 {
                        let (a, z) = if h == 1 {
                            (_mm_srli_epi16(a, 4), _mm_srli_epi16(z, 4))
                        } else {
                            (a, z)
                        };
                        let j = 2 * c + h;
                        let at = 256 * i + 32 * j;
                        let block = dot16::<false>(_mm_and_si128(a, mask), x, at, zero());
                        let block = dot16::<false>(_mm_and_si128(z, mask), x, at + 16, block);
                        let (sc, m) = scale_min_k4(j, scales);
                        acc[h] = scaled(acc[h], d * sc as f32, block);
                        offset -= dmin * m as f32 * sums[8 * i + j];
                    }
                }
            }
            hsum(add(acc[0], acc[1])) + offset
        }

        #[target_feature(enable = $features)]
        fn q6_k(w: &[u8], x: &[f32]) -> f32 {
            let mut acc = [zero(), zero()];
            for (i, b) in blocks::<{ Q6K::BYTES }>(w).iter().map(Q6K).enumerate() {
                let d = f16(b.d());
                for h in 0..2 {
                    for k in 0..4 {
                        for s in 0..2 {
                            let (q, sc) = q6_k_16(b, h, k, s);
                            let at = 256 * i + 128 * h + 32 * k + 16 * s;
                            let sub = dot16::<true>(q, x, at, zero());
                            acc[s] = scaled(acc[s], d * sc as f32, sub);
                        }
                    }
                }
            }
            hsum(add(acc[0], acc[1]))
        }

        /// Weights `128h + 32k + 16s ..` (16 of them) of a Q6_K block: their 6-bit values
        /// minus 32 as signed bytes (4 bits from `ql`, 2 from `qh`) and their 8-bit scale.
        #[target_feature(enable = $features)]
        fn q6_k_16(b: Q6K, h: usize, k: usize, s: usize) -> (__m128i, i8) {
            let (ql, qh, sc) = (b.ql(h), b.qh(h), b.scales(h));
            let (lo_at, shift) = (32 * (k & 1), _mm_cvtsi32_si128(4 * (k >> 1) as i32));
            let low = _mm_and_si128(
                _mm_srl_epi16(load16(&ql[lo_at + 16 * s..]), shift),
                _mm_set1_epi8(0x0F),
            );
            let high = _mm_srl_epi16(load16(&qh[16 * s..]), _mm_cvtsi32_si128(2 * k as i32));
            let high = _mm_slli_epi16(_mm_and_si128(high, _mm_set1_epi8(3)), 4);
            let q = _mm_sub_epi8(_mm_or_si128(low, high), _mm_set1_epi8(32));
            (q, sc[2 * k + s] as i8)
        }
    };
}

/// 8 lanes: 16 bytes widen to two 8 × f32 vectors.
pub mod avx2 {
    use super::*;
    type Acc = __m256;

    #[target_feature(enable = "avx2,fma,f16c")]
    fn zero() -> Acc {
        _mm256_setzero_ps()
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_x(x: &[f32], at: usize) -> __m256 {
        assert!(x.len() >= at + 8);
        // SAFETY: 8 readable floats checked above.
        unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) }
    }

    /// 16 weights as two 8-lane halves.
    type W = (__m256, __m256);

    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen16<const SIGNED: bool>(q: __m128i) -> W {
        let widen = |v: __m128i| {
            if SIGNED {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
            } else {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
            }
        };
        (widen(q), widen(_mm_unpackhi_epi64(q, q)))
    }

    /// Scaling each block once for the 4 rows measured slower here (`bench --kernels`, Q4_1:
    /// 0.62 → 0.76 ns a row) than scaling each row's sum: AVX2 has no 16-float permute for a
    /// table of a block's weights.
    const BY_TABLE: bool = false;

    /// Never called ([`BY_TABLE`] is false), nor the two below.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn indexes(_: &[u8]) {
        unreachable!("AVX2 scales 4-bit blocks' sums per row")
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn table(_: f32, _: f32) {
        unreachable!("AVX2 scales 4-bit blocks' sums per row")
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn lookup<const HIGH: bool>(_: (), _: ()) -> W {
        unreachable!("AVX2 scales 4-bit blocks' sums per row")
    }

    /// 16 Q5_0 weights: 4-bit values, plus 16 where bit k of `bits` is set.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen16_5(q: __m128i, bits: u32) -> W {
        widen16::<false>(_mm_or_si128(q, fifth_bits(bits)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn fma16(w: W, x: &[f32], at: usize, acc: Acc) -> Acc {
        _mm256_fmadd_ps(
            w.1,
            load_x(x, at + 8),
            _mm256_fmadd_ps(w.0, load_x(x, at), acc),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn times(w: W, s: f32) -> W {
        let s = _mm256_set1_ps(s);
        (_mm256_mul_ps(w.0, s), _mm256_mul_ps(w.1, s))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_w(x: &[f32], at: usize) -> W {
        (load_x(x, at), load_x(x, at + 8))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_kv<const HALF: bool>(b: &[u8], at: usize) -> W {
        if HALF {
            assert!(b.len() >= 2 * at + 32);
            // SAFETY: 32 readable bytes checked above; loadu has no alignment requirement.
            unsafe {
                let p = b.as_ptr().add(2 * at);
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
                )
            }
        } else {
            assert!(b.len() >= 4 * at + 64);
            // SAFETY: 64 readable bytes checked above.
            unsafe {
                let p = b.as_ptr().add(4 * at) as *const f32;
                (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
            }
        }
    }

    /// The dot products of `q` (`d` floats) with 16 cached keys (`keys`: 16 rows).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scores16<const HALF: bool>(keys: &[u8], q: &[f32], d: usize) -> W {
        let mut s = [0f32; 16];
        for (k, key) in keys.chunks_exact(keys.len() / 16).enumerate() {
            let (mut a, mut b) = (zero(), zero());
            for at in (0..d).step_by(16) {
                let w = load_kv::<HALF>(key, at);
                a = _mm256_fmadd_ps(w.0, load_x(q, at), a);
                b = _mm256_fmadd_ps(w.1, load_x(q, at + 8), b);
            }
            s[k] = hsum(add(a, b));
        }
        load_w(&s, 0)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn store_w(out: &mut [f32], at: usize, w: W) {
        assert!(out.len() >= at + 16);
        // SAFETY: 16 writable floats checked above.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr().add(at), w.0);
            _mm256_storeu_ps(out.as_mut_ptr().add(at + 8), w.1);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn fma_w(p: f32, w: W, acc: W) -> W {
        let p = _mm256_set1_ps(p);
        (
            _mm256_fmadd_ps(p, w.0, acc.0),
            _mm256_fmadd_ps(p, w.1, acc.1),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn sum16(w: W, acc: Acc) -> Acc {
        _mm256_add_ps(acc, _mm256_add_ps(w.0, w.1))
    }

    /// exp(w − m) by Cephes' single-precision polynomial (about 1 ulp); inputs more than 87
    /// below `m` give ~1e-38 (softmax after its maximum needs no less).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp_minus16(w: W, m: f32) -> W {
        let exp8 = |x: __m256| {
            let x = _mm256_max_ps(_mm256_sub_ps(x, _mm256_set1_ps(m)), _mm256_set1_ps(-87.0));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_C1), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_C2), r);
            let mut y = _mm256_set1_ps(EXP_P[0]);
            for c in &EXP_P[1..] {
                y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
            }
            let one_r = _mm256_add_ps(r, _mm256_set1_ps(1.0));
            let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), one_r);
            let pow2 = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
        };
        (exp8(w.0), exp8(w.1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn mul_w(a: W, b: W) -> W {
        (_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1))
    }

    /// g / (1 + exp(−g)).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn silu16(g: W) -> W {
        let (lo, hi) = (_mm256_set1_ps(-87.0), _mm256_set1_ps(87.0));
        let minus =
            |v: __m256| _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), v), lo), hi);
        let e = exp_minus16((minus(g.0), minus(g.1)), 0.0);
        let one = _mm256_set1_ps(1.0);
        (
            _mm256_div_ps(g.0, _mm256_add_ps(one, e.0)),
            _mm256_div_ps(g.1, _mm256_add_ps(one, e.1)),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn plus(w: W, s: f32) -> W {
        let s = _mm256_set1_ps(s);
        (_mm256_add_ps(w.0, s), _mm256_add_ps(w.1, s))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn scaled(acc: Acc, scale: f32, block: Acc) -> Acc {
        _mm256_fmadd_ps(_mm256_set1_ps(scale), block, acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn add(a: Acc, b: Acc) -> Acc {
        _mm256_add_ps(a, b)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: Acc) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    kernels!("avx2,fma,f16c");
}

/// 16 lanes: 16 bytes widen to one 16 × f32 vector.
pub mod avx512 {
    use super::*;
    type Acc = __m512;

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn zero() -> Acc {
        _mm512_setzero_ps()
    }

    type W = __m512;

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn widen16<const SIGNED: bool>(q: __m128i) -> W {
        if SIGNED {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))
        } else {
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q))
        }
    }

    /// With 4 rows, a 4-bit block's weights are looked up once in a table of its 16 values
    /// (`bench --kernels`, Q4_1: 0.50 → 0.40–0.42 ns a row); one row keeps scaling its sum (by
    /// table: 0.87 → 1.28–1.37 ns).
    const BY_TABLE: bool = true;

    /// 16 bytes of packed nibbles as 16 lane indexes for [`lookup`].
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn indexes(b: &[u8]) -> __m512i {
        _mm512_cvtepu8_epi32(load16(b))
    }

    /// The 16 values `scale · q + offset` of 4-bit weights q (a block's or sub-block's).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn table(scale: f32, offset: f32) -> W {
        let iota = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        _mm512_fmadd_ps(iota, _mm512_set1_ps(scale), _mm512_set1_ps(offset))
    }

    /// The weights of the low (or `HIGH`) nibbles of `indexes`, looked up in `table`: one
    /// permute (it reads only each lane's low 4 bits).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn lookup<const HIGH: bool>(indexes: __m512i, table: W) -> W {
        let i = if HIGH {
            _mm512_srli_epi32::<4>(indexes)
        } else {
            indexes
        };
        _mm512_permutexvar_ps(i, table)
    }

    /// 16 Q5_0 weights: 4-bit values, plus 16 where bit k of `bits` is set (one masked add
    /// after widening; the byte shuffles of [`fifth_bits`] made Q5_0 the slowest kernel).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn widen16_5(q: __m128i, bits: u32) -> W {
        let w = widen16::<false>(q);
        _mm512_mask_add_ps(w, bits as __mmask16, w, _mm512_set1_ps(16.0))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn fma16(w: W, x: &[f32], at: usize, acc: Acc) -> Acc {
        assert!(x.len() >= at + 16);
        // SAFETY: 16 readable floats checked above.
        let xs = unsafe { _mm512_loadu_ps(x.as_ptr().add(at)) };
        _mm512_fmadd_ps(w, xs, acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn times(w: W, s: f32) -> W {
        _mm512_mul_ps(w, _mm512_set1_ps(s))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn load_w(x: &[f32], at: usize) -> W {
        assert!(x.len() >= at + 16);
        // SAFETY: 16 readable floats checked above.
        unsafe { _mm512_loadu_ps(x.as_ptr().add(at)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn load_kv<const HALF: bool>(b: &[u8], at: usize) -> W {
        if HALF {
            assert!(b.len() >= 2 * at + 32);
            // SAFETY: 32 readable bytes checked above; loadu has no alignment requirement.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().add(2 * at) as *const __m256i)) }
        } else {
            assert!(b.len() >= 4 * at + 64);
            // SAFETY: 64 readable bytes checked above.
            unsafe { _mm512_loadu_ps(b.as_ptr().add(4 * at) as *const f32) }
        }
    }

    /// The dot products of `q` (`d` floats) with 16 cached keys (`keys`: 16 rows): each
    /// key's 16 lanes of partial sums, then one transposing reduction for all 16 (a full
    /// horizontal sum per key cost more than its multiply-adds at short contexts).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn scores16<const HALF: bool>(keys: &[u8], q: &[f32], d: usize) -> W {
        let row = keys.len() / 16;
        let key = |k: usize| {
            let key = &keys[k * row..(k + 1) * row];
            let (mut a, mut b) = (zero(), zero());
            for at in (0..d).step_by(32) {
                a = fma16(load_kv::<HALF>(key, at), q, at, a);
                b = fma16(load_kv::<HALF>(key, at + 16), q, at + 16, b);
            }
            _mm512_add_ps(a, b)
        };
        // Keys 4g..4g+4: 128-bit lane L of the result holds their 4 sums over lane L.
        let four = |g: usize| {
            let (a, b, c, e) = (key(4 * g), key(4 * g + 1), key(4 * g + 2), key(4 * g + 3));
            let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let ce = _mm512_add_ps(_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(ab, ce),
                _mm512_shuffle_ps::<0xEE>(ab, ce),
            )
        };
        let (u0, u1, u2, u3) = (four(0), four(1), four(2), four(3));
        // The four 128-bit lanes of each summed, keys in order.
        let halves = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            )
        };
        let (y01, y23) = (halves(u0, u1), halves(u2, u3));
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(y01, y23),
            _mm512_shuffle_f32x4::<0xDD>(y01, y23),
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn store_w(out: &mut [f32], at: usize, w: W) {
        assert!(out.len() >= at + 16);
        // SAFETY: 16 writable floats checked above.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), w) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn fma_w(p: f32, w: W, acc: W) -> W {
        _mm512_fmadd_ps(_mm512_set1_ps(p), w, acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn sum16(w: W, acc: Acc) -> Acc {
        _mm512_add_ps(acc, w)
    }

    /// exp(w − m), as the AVX2 one; 2ⁿ by `scalef`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn exp_minus16(w: W, m: f32) -> W {
        let x = _mm512_max_ps(_mm512_sub_ps(w, _mm512_set1_ps(m)), _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_C1), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_C2), r);
        let mut y = _mm512_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_fmadd_ps(
            y,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(y, n)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn mul_w(a: W, b: W) -> W {
        _mm512_mul_ps(a, b)
    }

    /// g / (1 + exp(−g)).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn silu16(g: W) -> W {
        let minus = _mm512_min_ps(
            _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(87.0),
        );
        let e = exp_minus16(minus, 0.0);
        _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn plus(w: W, s: f32) -> W {
        _mm512_add_ps(w, _mm512_set1_ps(s))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn scaled(acc: Acc, scale: f32, block: Acc) -> Acc {
        _mm512_fmadd_ps(_mm512_set1_ps(scale), block, acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn add(a: Acc, b: Acc) -> Acc {
        _mm512_add_ps(a, b)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn hsum(v: Acc) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    /// One key or value row of 64 (f32, or f16 when `HALF`) at `at` bytes: 4 registers.
    ///
    /// # Safety
    /// `at` plus the row's bytes must be within the caller's slice.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn row64<const HALF: bool>(base: *const u8, at: usize) -> [__m512; 4] {
        // SAFETY: the caller's bounds.
        unsafe {
            let p = base.add(at);
            if HALF {
                let h =
                    |i: usize| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32 * i) as *const __m256i));
                [h(0), h(1), h(2), h(3)]
            } else {
                let f = |i: usize| _mm512_loadu_ps((p as *const f32).add(16 * i));
                [f(0), f(1), f(2), f(3)]
            }
        }
    }

    /// 4 vectors' lanes summed: 128-bit lane L of the result holds their 4 sums over lane L
    /// (`scores16`'s first step).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn four_sums(a: __m512, b: __m512, c: __m512, e: __m512) -> __m512 {
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let ce = _mm512_add_ps(_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(ab, ce),
            _mm512_shuffle_ps::<0xEE>(ab, ce),
        )
    }

    /// 4 [`four_sums`] (keys 0–3, 4–7, …) as the 16 keys' sums in order.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn sixteen_sums(u: [__m512; 4]) -> __m512 {
        let halves = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            )
        };
        let (y01, y23) = (halves(u[0], u[1]), halves(u[2], u[3]));
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(y01, y23),
            _mm512_shuffle_f32x4::<0xDD>(y01, y23),
        )
    }

    /// `attend_part` for 64-wide heads, query rows `R` at a time: each key and value is
    /// loaded once for the `R` rows, the queries and the output rows stay in registers, and
    /// no load is bounds-checked on its own (one check up front). A prompt's block of
    /// positions brings up to 64 rows; decoding 3 (SmolLM2) or 7 (Qwen2.5).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(crate) unsafe fn attend_part64<const HALF: bool>(
        qs: &[f32],
        keys: &[u8],
        values: &[u8],
        scale: f32,
        out: &mut [f32],
        stats: &mut [(f32, f32)],
    ) {
        let row_bytes = 64 * if HALF { 2 } else { 4 };
        let (rows, len) = (qs.len() / 64, keys.len() / row_bytes);
        let ahead = super::super::prefetch::distance();
        assert!(
            qs.len() == rows * 64
                && out.len() == qs.len()
                && stats.len() == rows
                && keys.len() == len * row_bytes
                && values.len() == keys.len()
        );
        let mut scores = vec![0f32; rows * len];
        let mut r = 0;
        while r < rows {
            // SAFETY: rows r..r+R and every key row are within the slices checked above.
            unsafe {
                if rows - r >= 2 {
                    scores64::<HALF, 2>(qs, r, keys, len, scale, &mut scores, ahead);
                    r += 2;
                } else {
                    scores64::<HALF, 1>(qs, r, keys, len, scale, &mut scores, ahead);
                    r += 1;
                }
            }
        }
        // Softmax without its division (as the general kernel).
        exponentiate(&mut scores, len, stats);
        let mut r = 0;
        while r < rows {
            // SAFETY: as above.
            unsafe {
                match rows - r {
                    1 => weigh64::<HALF, 1>(&scores, r, values, len, out, ahead),
                    2 => weigh64::<HALF, 2>(&scores, r, values, len, out, ahead),
                    3 => weigh64::<HALF, 3>(&scores, r, values, len, out, ahead),
                    _ => weigh64::<HALF, 4>(&scores, r, values, len, out, ahead),
                }
            }
            r += 4;
        }
    }

    /// Scaled scores of query rows `first..first + R` against every key, into `scores`
    /// (`[row][len]`): 16 keys per transposing reduction, 4 keys per partial one.
    ///
    /// # Safety
    /// Rows `first..first + R` of `qs` and `len` key rows must exist.
    // Registers indexed by row and position: the loops are over both.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn scores64<const HALF: bool, const R: usize>(
        qs: &[f32],
        first: usize,
        keys: &[u8],
        len: usize,
        scale: f32,
        scores: &mut [f32],
        ahead: usize,
    ) {
        let row_bytes = 64 * if HALF { 2 } else { 4 };
        let q: [[__m512; 4]; R] =
            std::array::from_fn(|r| std::array::from_fn(|i| load_w(qs, (first + r) * 64 + 16 * i)));
        // SAFETY (every key load): j < len rows of `keys`, per the caller.
        let dot = |j: usize| -> [__m512; R] {
            let k = unsafe { row64::<HALF>(keys.as_ptr(), j * row_bytes) };
            std::array::from_fn(|r| {
                let a = _mm512_fmadd_ps(q[r][1], k[1], _mm512_mul_ps(q[r][0], k[0]));
                let b = _mm512_fmadd_ps(q[r][3], k[3], _mm512_mul_ps(q[r][2], k[2]));
                _mm512_add_ps(a, b)
            })
        };
        let whole = len / 16 * 16;
        let s = _mm512_set1_ps(scale);
        for j in (0..whole).step_by(16) {
            if ahead > 0 {
                let at = keys.as_ptr().wrapping_add(j * row_bytes + ahead);
                super::super::prefetch::lines(at, 16 * row_bytes);
            }
            let mut u = [[zero(); 4]; R];
            for g in 0..4 {
                let (a, b, c, e) = (
                    dot(j + 4 * g),
                    dot(j + 4 * g + 1),
                    dot(j + 4 * g + 2),
                    dot(j + 4 * g + 3),
                );
                for r in 0..R {
                    u[r][g] = four_sums(a[r], b[r], c[r], e[r]);
                }
            }
            for (r, u) in u.into_iter().enumerate() {
                store_w(
                    scores,
                    (first + r) * len + j,
                    _mm512_mul_ps(sixteen_sums(u), s),
                );
            }
        }
        for j in whole..len {
            for (r, v) in dot(j).into_iter().enumerate() {
                scores[(first + r) * len + j] = _mm512_reduce_add_ps(v) * scale;
            }
        }
    }

    /// Σ_j p_j · value_j for rows `first..first + R` (at most the rows left), 64 outputs a
    /// row in registers over all positions.
    ///
    /// # Safety
    /// `len` value rows must exist; `scores` holds `[row][len]`.
    // Registers indexed by row and position: the loops are over both.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn weigh64<const HALF: bool, const R: usize>(
        scores: &[f32],
        first: usize,
        values: &[u8],
        len: usize,
        out: &mut [f32],
        ahead: usize,
    ) {
        let row_bytes = 64 * if HALF { 2 } else { 4 };
        let p: [&[f32]; R] =
            std::array::from_fn(|r| &scores[(first + r) * len..(first + r + 1) * len]);
        let mut acc = [[zero(); 4]; R];
        for j in 0..len {
            if ahead > 0 {
                let at = values.as_ptr().wrapping_add(j * row_bytes + ahead);
                super::super::prefetch::lines(at, row_bytes);
            }
            // SAFETY: j < len rows of `values`, per the caller.
            let v = unsafe { row64::<HALF>(values.as_ptr(), j * row_bytes) };
            for r in 0..R {
                let w = _mm512_set1_ps(p[r][j]);
                for i in 0..4 {
                    acc[r][i] = _mm512_fmadd_ps(w, v[i], acc[r][i]);
                }
            }
        }
        for (r, acc) in acc.into_iter().enumerate() {
            for (i, a) in acc.into_iter().enumerate() {
                store_w(out, (first + r) * 64 + 16 * i, a);
            }
        }
    }

    kernels!("avx512f,avx512bw,avx2,fma,f16c");
}
