use super::*;
use crate::quant::dequantize;
use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// One product through [`matmul_many`].
fn matmul(
    isa: Isa,
    ty: GgmlType,
    weights: &[u8],
    row_bytes: usize,
    cols: usize,
    x: &[f32],
    update: Option<&LowRank>,
) -> Vec<f32> {
    let product = Product {
        ty,
        weights,
        row_bytes,
        update,
    };
    matmul_many(isa, &[product], cols, x)
        .pop()
        .expect("one product")
}

/// The dequantized matrix times the activations, in f64.
/// `n` values uniform in [-1, 1).
fn uniform(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1f32..1.0)).collect()
}

fn reference(ty: GgmlType, w: &[u8], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let dense = dequantize(ty, w, rows * cols).unwrap();
    let n = x.len() / cols;
    let mut out = vec![0f32; n * rows];
    for r in 0..n {
        let xr = &x[r * cols..(r + 1) * cols];
        for o in 0..rows {
            let wr = &dense[o * cols..(o + 1) * cols];
            out[r * rows + o] = wr
                .iter()
                .zip(xr)
                .map(|(w, x)| *w as f64 * *x as f64)
                .sum::<f64>() as f32;
        }
    }
    out
}

#[test]
fn every_kernel_equals_the_dequantized_product_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (70, 512); // 70 rows: a partial last task
    for ty in SIMD_TYPES {
        let w = random_matrix(ty, rows, cols, &mut rng);
        // 1, 3, 6 rows: the block kernels; a prompt's rows: the dequantized panel (gemm).
        for n in [1, 3, 6, PANEL_MIN_ROWS + 5] {
            let x: Vec<f32> = (0..n * cols)
                .map(|_| rng.random_range(-2f32..2.0))
                .collect();
            let want = reference(ty, &w, rows, cols, &x);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let row_bytes = ty.bytes_for(cols).unwrap();
            for isa in Isa::supported() {
                let got = matmul(isa, ty, &w, row_bytes, cols, &x, None);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * scale,
                        "{ty:?} n={n} {}: element {i}: {g} vs {w}",
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn types_without_a_simd_kernel_fall_back_to_the_portable_path() {
    let mut rng = StdRng::seed_from_u64(1);
    let w: Vec<u8> = (0..4 * 64)
        .flat_map(|_| half::f16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
        .collect();
    let x: Vec<f32> = uniform(64, &mut rng);
    let got = matmul(Isa::best(), GgmlType::F16, &w, 128, 64, &x, None);
    let want = reference(GgmlType::F16, &w, 4, 64, &x);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{g} vs {w}");
    }
}

#[test]
fn a_low_rank_update_is_added_to_every_output_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(11);
    // 40 rows: a task of 32 outputs (two SIMD runs of 16) and one of 8 (the scalar tail); one
    // row (decoding) and 6 (batched, strided outputs).
    let (rows, cols, rank) = (40, 64, 3);
    for (ty, n) in [
        (GgmlType::Q4_1, 6),
        (GgmlType::Q8_0, 1),
        (GgmlType::Q4_0, 6),
        (GgmlType::Q4_1, 1),
        (GgmlType::Q4_1, PANEL_MIN_ROWS + 1),
    ] {
        let w = random_matrix(ty, rows, cols, &mut rng);
        let x: Vec<f32> = uniform(n * cols, &mut rng);
        let down: Vec<f32> = uniform(n * rank, &mut rng);
        let up: Vec<f32> = uniform(rank * rows, &mut rng);
        let mut want = reference(ty, &w, rows, cols, &x);
        for r in 0..n {
            for o in 0..rows {
                // The update's matrix is kept in f16: the reference uses the rounded values.
                want[r * rows + o] += (0..rank)
                    .map(|k| down[r * rank + k] * f16::from_f32(up[k * rows + o]).to_f32())
                    .sum::<f32>();
            }
        }
        let grouped = group_outputs(&up, rank);
        let update = LowRank {
            down: down.clone(),
            up: &grouped,
            rank,
        };
        let row_bytes = ty.bytes_for(cols).unwrap();
        for isa in Isa::supported() {
            let got = matmul(isa, ty, &w, row_bytes, cols, &x, Some(&update));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-4,
                    "{ty:?} n={n} {}: element {i}: {g} vs {w}",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn a_batched_row_gets_the_same_update_bits_as_the_row_alone() {
    // Fewer than 4 rows take the one-row kernel: the base products are the same alone and
    // batched, so any difference would be the update's (a version must decode alike batched
    // or not).
    let mut rng = StdRng::seed_from_u64(13);
    let (ty, rows, cols, rank, n) = (GgmlType::Q4_0, 72, 64, 16, 3);
    let w = random_matrix(ty, rows, cols, &mut rng);
    let x: Vec<f32> = uniform(n * cols, &mut rng);
    let down: Vec<f32> = uniform(n * rank, &mut rng);
    let up: Vec<f32> = uniform(rank * rows, &mut rng);
    let grouped = group_outputs(&up, rank);
    let row_bytes = ty.bytes_for(cols).unwrap();
    for isa in Isa::supported() {
        let all = LowRank {
            down: down.clone(),
            up: &grouped,
            rank,
        };
        let batched = matmul(isa, ty, &w, row_bytes, cols, &x, Some(&all));
        for r in 0..n {
            let one = LowRank {
                down: down[r * rank..(r + 1) * rank].to_vec(),
                up: &grouped,
                rank,
            };
            let alone = matmul(
                isa,
                ty,
                &w,
                row_bytes,
                cols,
                &x[r * cols..(r + 1) * cols],
                Some(&one),
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&batched[r * rows..(r + 1) * rows]),
                bits(&alone),
                "{} row {r}",
                isa.name()
            );
        }
    }
}

#[test]
fn f32_by_f16_dot_products_match_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(12);
    for len in [1, 16, 50, 576, 1536] {
        let x: Vec<f32> = uniform(len, &mut rng);
        let w: Vec<f16> = (0..len)
            .map(|_| f16::from_f32(rng.random_range(-1f32..1.0)))
            .collect();
        let want: f64 = x.iter().zip(&w).map(|(a, b)| *a as f64 * b.to_f64()).sum();
        for isa in Isa::supported() {
            let got = dot_half(isa, &x, &w);
            assert!(
                (got as f64 - want).abs() < 1e-4 * len as f64,
                "{} len {len}: {got} vs {want}",
                isa.name()
            );
        }
    }
}

/// Softmax attention in f64: `qs` `[rep][d]` over `keys`, `values` `[len][d]`.
fn attention_reference(qs: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32) -> Vec<f32> {
    let len = keys.len() / d;
    let mut out = Vec::new();
    for q in qs.chunks_exact(d) {
        let scores: Vec<f64> = keys
            .chunks_exact(d)
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = e.iter().sum();
        for c in 0..d {
            out.push(
                (0..len)
                    .map(|j| e[j] * values[j * d + c] as f64)
                    .sum::<f64>()
                    / total,
            );
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// `rep` query rows and `len` keys and values of `d`. Scores spread widely: softmax must
/// subtract its maximum, and positions far below it must count as (almost) nothing, not NaN.
fn attention_inputs(
    rep: usize,
    d: usize,
    len: usize,
    rng: &mut StdRng,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut random = |n: usize, spread: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-spread..spread)).collect()
    };
    (
        random(rep * d, 3.0),
        random(len * d, 3.0),
        random(len * d, 1.0),
    )
}

#[test]
fn decode_attention_equals_the_exact_softmax_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(5);
    // Lengths around the 64-position chunks and the 16-wide softmax; d = 48 is not a
    // multiple of 64: the portable path on every instruction set.
    for (rep, d, len) in [
        (3, 64, 1),
        (3, 64, 17),
        (7, 64, 64),
        (7, 64, 300),
        (2, 128, 129),
        (3, 48, 20),
        // A prompt block's rows (the 64-wide kernel takes rows 2 and up to 4 at a time).
        (1, 64, 33),
        (5, 64, 16),
        (63, 64, 100),
    ] {
        let (qs, keys, values) = attention_inputs(rep, d, len, &mut rng);
        let scale = 1.0 / (d as f32).sqrt();
        let want = attention_reference(&qs, &keys, &values, d, scale);
        // Stored in f16: the same attention over the rounded keys and values.
        let half = |x: &[f32]| -> Vec<f16> { x.iter().map(|&v| f16::from_f32(v)).collect() };
        let (keys_h, values_h) = (half(&keys), half(&values));
        let wide = |x: &[f16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
        let want_h = attention_reference(&qs, &wide(&keys_h), &wide(&values_h), d, scale);
        for isa in Isa::supported() {
            let mut out = vec![f32::NAN; rep * d];
            let (k, v) = (KvSlice::F32(&keys), KvSlice::F32(&values));
            attend_group(isa, &qs, k, v, d, scale, &mut out);
            let mut out_h = vec![f32::NAN; rep * d];
            let (k, v) = (KvSlice::F16(&keys_h), KvSlice::F16(&values_h));
            attend_group(isa, &qs, k, v, d, scale, &mut out_h);
            for (what, out, want) in [("f32", &out, &want), ("f16", &out_h, &want_h)] {
                for (i, (g, w)) in out.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5,
                        "{what} rep {rep} d {d} len {len} {}: element {i}: {g} vs {w}",
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn the_sum_of_exponentials_matches_f64_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(13);
    // A vocabulary's logits: a few large, most far below the maximum, some masked out.
    for len in [1, 255, 256, 1000, 151_936] {
        let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-30f32..12.0)).collect();
        if len > 1 {
            x[len / 2] = f32::NEG_INFINITY;
        }
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want: f64 = x.iter().map(|&l| ((l - max) as f64).exp()).sum();
        for isa in Isa::supported() {
            let got = sum_exp_minus(isa, &x, max);
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "{} len {len}: {got} vs {want}",
                isa.name()
            );
        }
    }
}

#[test]
fn silu_times_up_matches_the_scalar_formula_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(11);
    // 1,541: whole vectors and a tail; extremes where exp(−g) overflows an f32.
    let mut gate: Vec<f32> = (0..1541).map(|_| rng.random_range(-12f32..12.0)).collect();
    gate[..4].copy_from_slice(&[-1000.0, -90.0, 90.0, 1000.0]);
    let up = uniform(gate.len(), &mut rng);
    let want: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
        .collect();
    for isa in Isa::supported() {
        let mut got = gate.clone();
        silu_mul(isa, &mut got, &up);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                ((*g as f64) - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{} element {i} (gate {}): {g} vs {w}",
                isa.name(),
                gate[i]
            );
        }
    }
}

#[test]
fn attention_in_parts_merges_to_attention_over_all_positions_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(17);
    let (rep, d, len) = (3, 64, 1000);
    let (qs, keys, values) = attention_inputs(rep, d, len, &mut rng);
    let scale = 1.0 / (d as f32).sqrt();
    for isa in Isa::supported() {
        let mut whole = vec![0f32; rep * d];
        attend_group(
            isa,
            &qs,
            KvSlice::F32(&keys),
            KvSlice::F32(&values),
            d,
            scale,
            &mut whole,
        );
        // Three unequal parts, each with its own maximum.
        let bounds = [0, 100, 640, len];
        let parts: Vec<(Vec<f32>, Vec<RowStats>)> = bounds
            .windows(2)
            .map(|b| {
                let (k, v) = (&keys[b[0] * d..b[1] * d], &values[b[0] * d..b[1] * d]);
                let mut rows = vec![0f32; rep * d];
                let stats = attend_part(
                    isa,
                    &qs,
                    KvSlice::F32(k),
                    KvSlice::F32(v),
                    d,
                    scale,
                    &mut rows,
                );
                (rows, stats)
            })
            .collect();
        let views: Vec<Part> = parts.iter().map(|(r, s)| (&r[..], &s[..])).collect();
        let mut merged = vec![f32::NAN; rep * d];
        merge_parts(&views, d, &mut merged);
        for (i, (m, w)) in merged.iter().zip(&whole).enumerate() {
            assert!(
                (m - w).abs() <= 1e-5,
                "{} element {i}: {m} vs {w}",
                isa.name()
            );
        }
    }
}

#[test]
fn the_simd_dequantizers_give_the_scalar_numbers_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, cols) = (3, 512);
    for ty in SIMD_TYPES {
        let w = random_matrix(ty, rows, cols, &mut rng);
        let want = dequantize(ty, &w, rows * cols).unwrap();
        for isa in Isa::supported() {
            // One weight past the rows, which no row may write.
            let mut got = vec![7.0f32; rows * cols + 1];
            let mut scratch = Vec::new();
            let row_bytes = ty.bytes_for(cols).unwrap();
            for (out, row) in got.chunks_exact_mut(cols).zip(w.chunks_exact(row_bytes)) {
                dequantize_row(isa, ty, row, out, &mut scratch);
            }
            assert_eq!(
                got[rows * cols],
                7.0,
                "{ty:?} on {isa:?} wrote past its rows"
            );
            let differ = got[..rows * cols]
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{ty:?} on {isa:?}: {differ} weights differ");
            // Compared above with a SIMD form, not with the scalar fallback.
            #[cfg(target_arch = "x86_64")]
            let simd = match isa {
                // SAFETY: Isa::supported detected the instruction set.
                Isa::Avx2 => unsafe { super::x86::avx2::dequantize(ty, &w[..row_bytes], &mut got) },
                Isa::Avx512 => unsafe {
                    super::x86::avx512::dequantize(ty, &w[..row_bytes], &mut got)
                },
                _ => true,
            };
            #[cfg(target_arch = "x86_64")]
            assert!(simd, "{ty:?} has no SIMD dequantizer on {isa:?}");
        }
    }
}

#[test]
fn the_prefetch_distance_changes_no_product() {
    let mut rng = StdRng::seed_from_u64(12);
    let (rows, cols) = (40, 256);
    for ty in SIMD_TYPES {
        let w = random_matrix(ty, rows, cols, &mut rng);
        let x = uniform(cols, &mut rng);
        let sums: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
        let row_bytes = ty.bytes_for(cols).unwrap();
        let p = Product {
            ty,
            weights: &w,
            row_bytes,
            update: None,
        };
        let run = |ahead| {
            let mut out = vec![0f32; rows];
            dot_rows(Isa::best(), &p, &w, &x, &sums, cols, 1, &mut out, ahead);
            out
        };
        let plain = run(0);
        for ahead in prefetch::CANDIDATES {
            assert_eq!(run(ahead), plain, "{ty:?}, {ahead} bytes ahead");
        }
        let want = reference(ty, &w, rows, cols, &x);
        for (a, b) in plain.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                "{ty:?}: {a} vs {b}"
            );
        }
    }
}
