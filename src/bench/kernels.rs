//! `clawrl-tui bench --kernels`: the decode kernels on their own. Every weight type with a
//! SIMD kernel multiplies a 4864 × 1024 matrix (Qwen2.5's MLP width) by 1 activation row (one
//! stream) and by 4 (four streams decoded together), on every instruction set this CPU runs,
//! on the serving pool; printed as ns per 32 weights per activation row, GB/s of weights read,
//! the speed-up over the portable kernel (the baseline), and for 4 rows how much cheaper
//! each row is than alone (what batching can give the streams).

use super::median;
use anyhow::Result;
use clawrl_model::kernels::{self, Isa, Product};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::time::Instant;

const ROWS: usize = 4864;
const COLS: usize = 1024;
/// Products per timed run (one product takes 0.1–5 ms).
const CALLS: usize = 10;

pub fn run(runs: usize) -> Result<()> {
    let pool = clawrl_model::background::serving_pool("clawrl-bench")?;
    let mut rng = StdRng::seed_from_u64(1);
    println!(
        "{ROWS} x {COLS} matrix, {} threads, median of {runs} runs of {CALLS} products",
        pool.current_num_threads()
    );
    println!(
        "{:<6} {:>4}  {:<9} {:>14} {:>8} {:>12} {:>10}",
        "type", "rows", "kernels", "ns/32 w/row", "GB/s", "vs portable", "vs 1 row"
    );
    for ty in kernels::SIMD_TYPES {
        let w = kernels::random_matrix(ty, ROWS, COLS, &mut rng);
        let row_bytes = ty.bytes_for(COLS)?;
        let product = [Product {
            ty,
            weights: &w,
            row_bytes,
            update: None,
        }];
        // ns per 32 weights per row of each instruction set, with 1 row.
        let mut alone: Vec<f64> = Vec::new();
        for n in [1, 4] {
            let x: Vec<f32> = (0..n * COLS)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let mut portable = None;
            for (i, isa) in Isa::supported().into_iter().enumerate() {
                let mut times: Vec<f64> = (0..=runs)
                    .map(|_| {
                        let t = Instant::now();
                        for _ in 0..CALLS {
                            std::hint::black_box(
                                pool.install(|| kernels::matmul_many(isa, &product, COLS, &x)),
                            );
                        }
                        t.elapsed().as_secs_f64() / CALLS as f64
                    })
                    .collect();
                let secs = median(&mut times[1..]); // the first run warms up
                let ns = secs * 1e9 / (ROWS * COLS / 32 * n) as f64;
                let portable = *portable.get_or_insert(ns);
                let batching = if n == 1 {
                    alone.push(ns);
                    "—".to_string()
                } else {
                    format!("{:.2}x", alone[i] / ns)
                };
                println!(
                    "{:<6} {:>4}  {:<9} {:>14.2} {:>8.1} {:>11.2}x {:>10}",
                    format!("{ty:?}"),
                    n,
                    isa.name(),
                    ns,
                    w.len() as f64 / secs / 1e9,
                    portable / ns,
                    batching
                );
            }
        }
    }
    Ok(())
}
