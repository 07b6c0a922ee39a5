//! AVX2 kernels (x86-64-v3). A block's 32 weights are unpacked to bytes, widened to 4 × 8 f32,
//! and meet 32 activations in 4 fused multiply-adds; the block's scale multiplies the sum once.
//! Offsets and minimums multiply the activations' block sum (`Σ (q·d + m)·x = d·Σq·x + m·Σx`).

use crate::model::quant::{GgmlType, scale_min_k4};
use std::arch::x86_64::*;

/// `sums[b]` is the sum of `x[32b..32b+32]`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot(ty: GgmlType, w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    match ty {
        GgmlType::Q8_0 => q8_0(w, x),
        GgmlType::Q4_0 => q4_0(w, x, sums),
        GgmlType::Q4_1 => q4_1(w, x, sums),
        GgmlType::Q5_0 => q5_0(w, x, sums),
        GgmlType::Q4_K => q4_k(w, x, sums),
        GgmlType::Q6_K => q6_k(w, x),
        other => unreachable!("no AVX2 kernel for {other:?}"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn f16(b: &[u8], i: usize) -> f32 {
    let bits = u16::from_le_bytes([b[i], b[i + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load16(b: &[u8]) -> __m128i {
    assert!(b.len() >= 16);
    // SAFETY: 16 readable bytes checked above; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr() as *const __m128i) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load_x(x: &[f32], at: usize) -> __m256 {
    assert!(x.len() >= at + 8);
    // SAFETY: 8 readable floats checked above.
    unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) }
}

/// Σ q·x over 16 bytes (unsigned or signed) and the 16 activations from `x[at]`, as 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot16<const SIGNED: bool>(q: __m128i, x: &[f32], at: usize, acc: __m256) -> __m256 {
    let widen = |v: __m128i| {
        if SIGNED {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
        } else {
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
        }
    };
    let acc = _mm256_fmadd_ps(widen(q), load_x(x, at), acc);
    _mm256_fmadd_ps(widen(_mm_unpackhi_epi64(q, q)), load_x(x, at + 8), acc)
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

#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// acc + scale · block
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled(acc: __m256, scale: f32, block: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_set1_ps(scale), block, acc)
}

/// Σ over 32 unsigned 4-bit weights · x of one block.
#[target_feature(enable = "avx2,fma,f16c")]
fn nibble_block(qs: &[u8], x: &[f32], at: usize) -> __m256 {
    let (lo, hi) = nibbles(qs);
    let acc = dot16::<false>(lo, x, at, _mm256_setzero_ps());
    dot16::<false>(hi, x, at + 16, acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (i, b) in w.chunks_exact(34).enumerate() {
        let block = dot16::<true>(load16(&b[2..18]), x, 32 * i, _mm256_setzero_ps());
        let block = dot16::<true>(load16(&b[18..34]), x, 32 * i + 16, block);
        acc = scaled(acc, f16(b, 0), block);
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let (mut acc, mut offset) = (_mm256_setzero_ps(), 0f32);
    for (i, b) in w.chunks_exact(18).enumerate() {
        let d = f16(b, 0);
        acc = scaled(acc, d, nibble_block(&b[2..18], x, 32 * i));
        offset -= 8.0 * d * sums[i];
    }
    hsum(acc) + offset
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let (mut acc, mut offset) = (_mm256_setzero_ps(), 0f32);
    for (i, b) in w.chunks_exact(20).enumerate() {
        acc = scaled(acc, f16(b, 0), nibble_block(&b[4..20], x, 32 * i));
        offset += f16(b, 2) * sums[i];
    }
    hsum(acc) + offset
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q5_0(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let (mut acc, mut offset) = (_mm256_setzero_ps(), 0f32);
    let spread = _mm_set_epi64x(0x0101010101010101, 0);
    let probe = _mm_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let (ones, bit4) = (_mm_set1_epi64x(-1), _mm_set1_epi8(0x10));
    // Byte k of the result is 0x10 where bit k of `bits` is set (llama.cpp's bytes_from_bits).
    let fifth_bits = |bits: u32| {
        let b = _mm_shuffle_epi8(_mm_cvtsi32_si128(bits as i32), spread);
        _mm_and_si128(_mm_cmpeq_epi8(_mm_or_si128(b, probe), ones), bit4)
    };
    for (i, b) in w.chunks_exact(22).enumerate() {
        let d = f16(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (lo, hi) = nibbles(&b[6..22]);
        let lo = _mm_or_si128(lo, fifth_bits(qh & 0xFFFF));
        let hi = _mm_or_si128(hi, fifth_bits(qh >> 16));
        let block = dot16::<false>(lo, x, 32 * i, _mm256_setzero_ps());
        let block = dot16::<false>(hi, x, 32 * i + 16, block);
        acc = scaled(acc, d, block);
        offset -= 16.0 * d * sums[i];
    }
    hsum(acc) + offset
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let (mut acc, mut offset) = (_mm256_setzero_ps(), 0f32);
    let mask = _mm_set1_epi8(0x0F);
    for (i, b) in w.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16(b, 0), f16(b, 2));
        let scales = &b[4..16];
        // 4 groups of 32 bytes: the low nibbles are one sub-block of 32, the high ones the next.
        for (c, qs) in b[16..144].chunks_exact(32).enumerate() {
            let (a, z) = (load16(&qs[..16]), load16(&qs[16..]));
            for (h, shift) in [(0, false), (1, true)] {
                let (a, z) = if shift {
                    (_mm_srli_epi16(a, 4), _mm_srli_epi16(z, 4))
                } else {
                    (a, z)
                };
                let j = 2 * c + h;
                let at = 256 * i + 32 * j;
                let block = dot16::<false>(_mm_and_si128(a, mask), x, at, _mm256_setzero_ps());
                let block = dot16::<false>(_mm_and_si128(z, mask), x, at + 16, block);
                let (sc, m) = scale_min_k4(j, scales);
                acc = scaled(acc, d * sc as f32, block);
                offset -= dmin * m as f32 * sums[8 * i + j];
            }
        }
    }
    hsum(acc) + offset
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (low4, low2, bias) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(3), _mm_set1_epi8(32));
    for (i, b) in w.chunks_exact(210).enumerate() {
        let d = f16(b, 208);
        for h in 0..2 {
            let (ql, qh) = (&b[h * 64..h * 64 + 64], &b[128 + h * 32..128 + h * 32 + 32]);
            let sc = &b[192 + h * 8..192 + h * 8 + 8];
            // Quarter k holds weights 32k..32k+32 of this half: 4 bits from ql, 2 from qh.
            for k in 0..4 {
                let (lo_at, shift) = (32 * (k & 1), 4 * (k >> 1) as i32);
                for s in 0..2 {
                    let low = load16(&ql[lo_at + 16 * s..]);
                    let low = _mm_and_si128(_mm_srl_epi16(low, _mm_cvtsi32_si128(shift)), low4);
                    let high = load16(&qh[16 * s..]);
                    let high = _mm_srl_epi16(high, _mm_cvtsi32_si128(2 * k as i32));
                    let high = _mm_slli_epi16(_mm_and_si128(high, low2), 4);
                    let q = _mm_sub_epi8(_mm_or_si128(low, high), bias);
                    let at = 256 * i + 128 * h + 32 * k + 16 * s;
                    let sub = dot16::<true>(q, x, at, _mm256_setzero_ps());
                    // Every 16 weights have their own 8-bit scale.
                    acc = scaled(acc, d * (sc[2 * k + s] as i8) as f32, sub);
                }
            }
        }
    }
    hsum(acc)
}
