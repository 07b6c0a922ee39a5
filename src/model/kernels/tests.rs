use super::*;
use crate::model::quant::dequantize;
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
        for n in [1, 3, 6] {
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
    let x: Vec<f32> = (0..64).map(|_| rng.random_range(-1f32..1.0)).collect();
    let got = matmul(Isa::best(), GgmlType::F16, &w, 128, 64, &x, None);
    let want = reference(GgmlType::F16, &w, 4, 64, &x);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{g} vs {w}");
    }
}

#[test]
fn a_low_rank_update_is_added_to_every_output_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, cols, rank, n) = (40, 64, 3, 6);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0] {
        let w = random_matrix(ty, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let down: Vec<f32> = (0..n * rank)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let up_t: Vec<f32> = (0..rows * rank)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let mut want = reference(ty, &w, rows, cols, &x);
        for r in 0..n {
            for o in 0..rows {
                let d = &down[r * rank..(r + 1) * rank];
                want[r * rows + o] += d
                    .iter()
                    .zip(&up_t[o * rank..])
                    .map(|(a, b)| a * b)
                    .sum::<f32>();
            }
        }
        let update = LowRank {
            down: down.clone(),
            up_t: &up_t,
            rank,
        };
        let row_bytes = ty.bytes_for(cols).unwrap();
        for isa in Isa::supported() {
            let got = matmul(isa, ty, &w, row_bytes, cols, &x, Some(&update));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-4,
                    "{ty:?} {}: element {i}: {g} vs {w}",
                    isa.name()
                );
            }
        }
    }
}
