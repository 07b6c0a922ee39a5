//! GGML tensor types and their dequantization to f32.
//!
//! Block layouts follow ggml (`ggml-common.h`); every block stores its scales as f16. The
//! formulas are checked against the PyPI `gguf` package's dequantizer in
//! `tests/dequant_reference.rs`.

use anyhow::{Context, Result, bail};
use half::{bf16, f16};

/// The GGML tensor types the loader understands (ids as written in GGUF files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4_K,
    Q6_K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            other => bail!(
                "unsupported GGML tensor type id {other} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)"
            ),
        })
    }

    /// Number of weights in one block.
    pub(crate) fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q8_0 => 32,
            Self::Q4_K | Self::Q6_K => 256,
        }
    }

    /// Bytes used by one block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q6_K => 210,
        }
    }

    /// Bytes needed for `n` weights (n must be a multiple of the block length).
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        if !n.is_multiple_of(self.block_len()) {
            bail!(
                "{n} weights is not a multiple of the {self:?} block length {}",
                self.block_len()
            );
        }
        (n / self.block_len())
            .checked_mul(self.block_bytes())
            .with_context(|| format!("{n} {self:?} weights do not fit in memory"))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` weights of type `ty` from `bytes` into `out` (appending).
pub(crate) fn dequantize_into(
    ty: GgmlType,
    bytes: &[u8],
    n: usize,
    out: &mut Vec<f32>,
) -> Result<()> {
    let need = ty.bytes_for(n)?;
    if bytes.len() < need {
        bail!(
            "truncated {ty:?} data: need {need} bytes for {n} weights, have {}",
            bytes.len()
        );
    }
    let bytes = &bytes[..need];
    out.reserve(n);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
                out.extend_from_slice(&y);
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
                out.extend_from_slice(&y);
            }
        }
        GgmlType::Q5_0 => {
            for b in bytes.chunks_exact(22) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
                }
                out.extend_from_slice(&y);
            }
        }
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_K => {
            for b in bytes.chunks_exact(144) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (chunk, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                    let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&v| d1 * (v & 0x0F) as f32 - m1));
                    out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - m2));
                }
            }
        }
        GgmlType::Q6_K => {
            for b in bytes.chunks_exact(210) {
                let d = f16_at(b, 208);
                for half_block in 0..2 {
                    let ql = &b[half_block * 64..half_block * 64 + 64];
                    let qh = &b[128 + half_block * 32..128 + half_block * 32 + 32];
                    let sc = &b[192 + half_block * 8..192 + half_block * 8 + 8];
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
    Ok(())
}

/// Q5_0 blocks rewritten as Q8_0 blocks of the same values: each 5-bit weight minus 16 as a
/// signed byte, the same f16 scale, so both dequantize to the same numbers. 34 bytes per 32
/// weights instead of 22, but the Q8_0 kernel skips gathering each weight's fifth bit, which
/// made Q5_0 the slowest kernel per weight (docs/BENCHMARKS.md).
pub(crate) fn q5_0_as_q8_0(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() / 22 * 34);
    for b in bytes.chunks_exact(22) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let fifth = |j: usize| (((qh >> j) & 1) << 4) as u8;
        out.extend_from_slice(&b[..2]);
        out.extend((0..16).map(|j| ((qs[j] & 0x0F) | fifth(j)).wrapping_sub(16)));
        out.extend((0..16).map(|j| ((qs[j] >> 4) | fifth(j + 16)).wrapping_sub(16)));
    }
    out
}

/// Convenience wrapper returning a fresh vector.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n);
    dequantize_into(ty, bytes, n, &mut out)?;
    Ok(out)
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block (ggml's `get_scale_min_k4`).
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::QuantMatrix;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn q5_0_kept_as_q8_0_holds_the_same_weights() {
        let (rows, cols) = (8, 96);
        let file = crate::kernels::random_matrix(
            GgmlType::Q5_0,
            rows,
            cols,
            &mut StdRng::seed_from_u64(5),
        );
        let want = dequantize(GgmlType::Q5_0, &file, rows * cols).unwrap();
        // Every fifth bit and every nibble value occurs, so a wrong bit would show.
        assert!(want.iter().filter(|v| **v != 0.0).count() > rows * cols / 2);
        let kept = q5_0_as_q8_0(&file);
        assert_eq!(kept.len(), file.len() / 22 * 34);
        assert_eq!(
            dequantize(GgmlType::Q8_0, &kept, rows * cols).unwrap(),
            want
        );

        let m = QuantMatrix::new(GgmlType::Q5_0, rows, cols, file.clone()).unwrap();
        assert_eq!(m.ty, GgmlType::Q8_0);
        assert_eq!(m.to_dense(), want);
        let bytes = m.decode_bytes();
        assert_eq!((bytes.file, bytes.held), (file.len(), kept.len()));
    }
}
