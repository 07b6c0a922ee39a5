//! Software prefetch of the weight rows ahead of the decode kernels, at a distance measured on
//! the CPU it runs on.
//!
//! Decoding streams every weight row once per token. On the 2-core Intel Xeon of 2026-12-07
//! (480 MB of L3) the hardware prefetchers left the kernels waiting on their loads (`perf`:
//! most of `dot`'s samples on the instructions after a block's load) and SmolLM2 decoded at
//! 70 tok/s, a third of the bandwidth bound; asking for the lines 1–2 KB ahead of the row
//! being multiplied took it to 110–118. Whether and how far ahead pays differs by CPU
//! (prefetchers, cache sizes, latency), so the distance is chosen by a short calibration
//! ([`calibrate`]: 0.1–0.3 s) the first time a process decodes, or read from the file a
//! previous run wrote for the same CPU ([`init`]). `CLAWRL_PREFETCH=<bytes>` (0: off) sets
//! it. Decoding attention prefetches its keys and values at the same distance.

use super::{Isa, Product, dot_rows};
use crate::quant::GgmlType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

/// The distances tried, in bytes ahead of the row being multiplied (0: no prefetch).
pub const CANDIDATES: [usize; 6] = [0, 256, 512, 1024, 2048, 4096];

/// Weights streamed per calibration pass: more than the last private cache level of any x86
/// CPU (a decode reads ~100 MB a token on the smallest model), so the pass waits on the
/// shared cache or memory as decoding does.
const CALIBRATION_BYTES: usize = 64 << 20;
/// Columns of the calibration's Q8_0 rows (a typical projection's width).
const CALIBRATION_COLS: usize = 1024;
/// Passes per candidate (interleaved; the fastest counts).
const ROUNDS: usize = 3;
/// A farther distance must be this much faster to be chosen over a nearer one.
const MARGIN: f64 = 0.03;

static DISTANCE: OnceLock<usize> = OnceLock::new();

/// What a calibration measured and chose, as cached on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    /// The CPU it was measured on ([`cpu_id`]); the cache keeps one entry per CPU.
    pub cpu: String,
    /// The chosen distance in bytes.
    pub distance: usize,
    /// Nanoseconds per calibration row at each candidate distance, in [`CANDIDATES`]' order.
    pub ns_per_row: Vec<(usize, f64)>,
}

/// The prefetch distance the decode kernels use (calibrated on first call unless [`init`] or
/// `CLAWRL_PREFETCH` set it).
pub fn distance() -> usize {
    *DISTANCE.get_or_init(|| from_env().unwrap_or_else(|| calibrate(Isa::selected()).distance))
}

/// Sets the distance from `cache` when it was measured on this CPU, else calibrates and writes
/// it there (a cache that cannot be read or written is measured again, with a warning: the
/// distance is a speed setting, never a reason not to serve). Call before the first decode;
/// later calls keep the first distance. Returns the distance in use and where it came from.
pub fn init(cache: &Path) -> (usize, &'static str) {
    let mut source = "set earlier in this process";
    let d = *DISTANCE.get_or_init(|| {
        let (d, s) = load_or_calibrate(cache);
        source = s;
        d
    });
    (d, source)
}

/// The cache holds one calibration per CPU (model, instruction set, threads): switching
/// `CLAWRL_KERNELS` does not measure again each time.
fn load_or_calibrate(cache: &Path) -> (usize, &'static str) {
    if let Some(d) = from_env() {
        return (d, "CLAWRL_PREFETCH");
    }
    let cpu = cpu_id(Isa::selected());
    let mut known =
        match std::fs::read(cache).map(|b| serde_json::from_slice::<Vec<Calibration>>(&b)) {
            Ok(Ok(known)) => known,
            Ok(Err(e)) => {
                tracing::warn!(
                    "{}: not a list of prefetch calibrations ({e}); measuring again",
                    cache.display()
                );
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
    if let Some(c) = known.iter().find(|c| c.cpu == cpu) {
        return (c.distance, "cached");
    }
    let c = calibrate(Isa::selected());
    let distance = c.distance;
    known.push(c);
    if let Err(e) = write_atomically(cache, &known) {
        tracing::warn!(
            "could not cache the prefetch calibration at {}: {e:#}",
            cache.display()
        );
    }
    (distance, "measured")
}

fn from_env() -> Option<usize> {
    let v = std::env::var("CLAWRL_PREFETCH").ok()?;
    match v.parse() {
        Ok(d) => Some(d),
        Err(_) => {
            tracing::warn!("CLAWRL_PREFETCH={v:?} is not a number of bytes; calibrating");
            None
        }
    }
}

fn write_atomically(path: &Path, c: &[Calibration]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(c)?)?;
    std::fs::rename(&tmp, path)
}

/// The CPU a calibration holds for: its model name, the kernels' instruction set and its
/// threads.
pub fn cpu_id(isa: Isa) -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{name} / {} / {threads} threads", isa.name())
}

/// Times the Q8_0 decode kernel on every thread of the current pool over [`CALIBRATION_BYTES`]
/// of rows at every candidate distance and picks the nearest within [`MARGIN`] of the fastest.
pub fn calibrate(isa: Isa) -> Calibration {
    let started = Instant::now();
    let ty = GgmlType::Q8_0;
    let row_bytes = ty.bytes_for(CALIBRATION_COLS).expect("whole blocks");
    let rows = CALIBRATION_BYTES / row_bytes;
    // Every block: scale 2^-10 (f16 0x1400, a normal number), weights 1..: a sane product.
    let mut weights = vec![1u8; rows * row_bytes];
    for block in weights.chunks_exact_mut(ty.block_bytes()) {
        block[..2].copy_from_slice(&0x1400u16.to_le_bytes());
    }
    let x = vec![0.5f32; CALIBRATION_COLS];
    let sums: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
    let product = Product {
        ty,
        weights: &weights,
        row_bytes,
        update: None,
    };
    let mut out = vec![0f32; rows];
    // One contiguous share of the rows per thread, all threads at once, as a decoding step
    // splits a product (the threads share the cache and memory bandwidth).
    let share = rows.div_ceil(rayon::current_num_threads());
    let mut best = [f64::INFINITY; CANDIDATES.len()];
    for _ in 0..ROUNDS {
        for (b, &d) in best.iter_mut().zip(&CANDIDATES) {
            let t = Instant::now();
            weights
                .par_chunks(share * row_bytes)
                .zip(out.par_chunks_mut(share))
                .for_each(|(w, out)| {
                    dot_rows(isa, &product, w, &x, &sums, CALIBRATION_COLS, 1, out, d)
                });
            *b = b.min(t.elapsed().as_secs_f64() * 1e9 / rows as f64);
            std::hint::black_box(&out);
        }
    }
    let fastest = best.iter().copied().fold(f64::INFINITY, f64::min);
    let chosen = CANDIDATES
        .iter()
        .zip(&best)
        .find(|(_, t)| **t <= fastest * (1.0 + MARGIN))
        .map_or(0, |(d, _)| *d);
    let c = Calibration {
        cpu: cpu_id(isa),
        distance: chosen,
        ns_per_row: CANDIDATES.iter().copied().zip(best).collect(),
    };
    tracing::info!(
        "prefetch calibrated in {:.2} s: {} bytes ahead ({})",
        started.elapsed().as_secs_f64(),
        c.distance,
        c.ns_per_row
            .iter()
            .map(|(d, t)| format!("{d}: {t:.0} ns/row"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    c
}

/// Asks for the cache lines of `len` bytes from `at` (a hint: it never faults, whatever the
/// address).
#[inline(always)]
pub(super) fn lines(at: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(64) {
        // SAFETY: a prefetch only hints the cache; it reads nothing and faults on no address.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line) as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Vec<Calibration> {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn a_calibration_is_measured_once_per_cpu_cached_beside_others_and_remeasured_when_unreadable()
    {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("sub").join("prefetch-calibration.json");
        let (d, source) = load_or_calibrate(&cache);
        assert_eq!(source, "measured");
        assert!(CANDIDATES.contains(&d), "{d} is a candidate");
        let written = read(&cache);
        assert_eq!(written.len(), 1);
        let mine = written[0].clone();
        assert_eq!(
            (mine.distance, mine.cpu.as_str()),
            (d, cpu_id(Isa::selected()).as_str())
        );
        assert_eq!(mine.ns_per_row.len(), CANDIDATES.len());
        assert!(
            mine.ns_per_row
                .iter()
                .all(|(_, t)| t.is_finite() && *t > 0.0)
        );

        // This CPU's entry is read back without measuring (a distance no calibration picks
        // proves it came from the file), beside another CPU's, which is kept.
        let other = Calibration {
            cpu: "another CPU".into(),
            distance: 512,
            ..mine.clone()
        };
        let planted = Calibration {
            distance: 3000,
            ..mine.clone()
        };
        std::fs::write(
            &cache,
            serde_json::to_vec(&[other.clone(), planted]).unwrap(),
        )
        .unwrap();
        assert_eq!(load_or_calibrate(&cache), (3000, "cached"));

        // Only another CPU's entry: this one is measured and added beside it.
        std::fs::write(
            &cache,
            serde_json::to_vec(std::slice::from_ref(&other)).unwrap(),
        )
        .unwrap();
        let (d, source) = load_or_calibrate(&cache);
        assert_eq!(source, "measured");
        assert!(CANDIDATES.contains(&d));
        let both = read(&cache);
        assert_eq!(both.len(), 2);
        assert_eq!(both[0], other);
        assert_eq!(both[1].cpu, cpu_id(Isa::selected()));

        // A file that is not a calibration list is measured again and replaced.
        std::fs::write(&cache, b"{not json").unwrap();
        let (d, source) = load_or_calibrate(&cache);
        assert_eq!(source, "measured");
        assert!(CANDIDATES.contains(&d));
        assert_eq!(read(&cache).len(), 1);

        // A cache that cannot be written still gives a distance.
        let blocked = dir.path().join("a file").join("prefetch-calibration.json");
        std::fs::write(dir.path().join("a file"), b"").unwrap();
        let (d, source) = load_or_calibrate(&blocked);
        assert_eq!(source, "measured");
        assert!(CANDIDATES.contains(&d));
    }
}
