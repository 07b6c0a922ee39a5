//! Matrix products computed directly on a GGUF file's quantized blocks: the decode hot path.
//!
//! Decoding reads every weight once per token, so reading the file's 4.5–8.5 bits per weight
//! instead of a dequantized f32 copy's 32 is what sets its speed. The weights are unpacked in
//! registers and meet the f32 activations as they are (llama.cpp rounds activations to 8 bits,
//! which changes greedy replies; here the result is the dequantized matrix's own product up to
//! summation order). Each type has SIMD kernels for x86-64 (AVX2, AVX-512), chosen at run time,
//! and a portable one (dequantize a row, then dot); `CLAWRL_KERNELS=portable|avx2|avx512`
//! picks one.

pub mod prefetch;
pub mod team;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::quant::{GgmlType, dequantize_into};
use half::f16;
use std::sync::OnceLock;

/// The instruction sets a kernel may be written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    /// AVX2 + FMA + F16C (x86-64-v3).
    Avx2,
    /// AVX-512 F + BW (x86-64-v4).
    Avx512,
}

impl Isa {
    /// The kernels used: the best this CPU runs, or the one `CLAWRL_KERNELS` names
    /// (`portable`, `avx2`, `avx512`) when this CPU runs it.
    pub fn selected() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let wanted = std::env::var("CLAWRL_KERNELS").unwrap_or_default();
            let supported = Self::supported();
            match supported.iter().find(|i| i.name() == wanted) {
                Some(isa) => *isa,
                None => {
                    if !wanted.is_empty() {
                        tracing::warn!(
                            "CLAWRL_KERNELS={wanted:?} is not one this CPU runs ({}); using {}",
                            supported
                                .iter()
                                .map(|i| i.name())
                                .collect::<Vec<_>>()
                                .join(", "),
                            Self::best().name()
                        );
                    }
                    Self::best()
                }
            }
        })
    }

    /// The best kernels this CPU runs.
    pub fn best() -> Self {
        *Self::supported().last().expect("portable always runs")
    }

    /// Every instruction set this CPU runs kernels for, from the fallback to the best.
    pub fn supported() -> Vec<Self> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            isas.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Weight types with a SIMD kernel (others go through the portable path on every CPU).
pub const SIMD_TYPES: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

pub(crate) fn has_kernel(ty: GgmlType) -> bool {
    SIMD_TYPES.contains(&ty)
}

/// A `rows × cols` matrix of random `ty` blocks whose f16 scales are sane numbers (random bits
/// could be NaN or huge): what the kernel tests and `bench --kernels` multiply.
pub fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut impl rand::Rng) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..rows * ty.bytes_for(cols).expect("whole blocks"))
        .map(|_| rng.random())
        .collect();
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[0],
    };
    for block in bytes.chunks_exact_mut(ty.block_bytes()) {
        for &o in scale_offsets {
            let v = half::f16::from_f32(rng.random_range(-0.05f32..0.05));
            block[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// A low-rank update added to every output: `out[r][o] += Σ_k down[r][k] · up[k][o]` (a LoRA
/// pair's `s·(x·A)·B`, with `down` = s·(x·A) `[rows][rank]` already computed and `up` = B in
/// f16, in groups of 16 outputs ([`group_outputs`])). f16 halves the bytes each token reads
/// (a rank-16 adapter on all 7 projections of SmolLM2: 20 → 10 MB, beside 98 MB of weights).
pub struct LowRank<'a> {
    pub down: Vec<f32>,
    pub up: &'a [f16],
    pub rank: usize,
}

/// `[rank][outputs]` regrouped as `[outputs / 16][rank][16]` (the last group zero-padded): the
/// low-rank update of 16 outputs reads one contiguous block. (Rows of `[rank][outputs]` read
/// 16 strided streams per run of outputs: that layout measured slower than a dot product per
/// output.)
pub(crate) fn group_outputs(up: &[f32], rank: usize) -> Vec<f16> {
    let outputs = up.len() / rank.max(1);
    let groups = outputs.div_ceil(16);
    let mut grouped = vec![f16::ZERO; groups * rank * 16];
    for k in 0..rank {
        for (o, v) in up[k * outputs..(k + 1) * outputs].iter().enumerate() {
            grouped[((o / 16) * rank + k) * 16 + o % 16] = f16::from_f32(*v);
        }
    }
    grouped
}

/// Output rows computed per task: enough work to outweigh scheduling, enough tasks for 2+ cores.
const ROWS_PER_TASK: usize = 32;

/// From this many activation rows on (a prompt), a task dequantizes its weight rows once into
/// an f32 panel and multiplies every row by it with a dense matrix kernel, instead of
/// unpacking each block again for every 4 rows. Above what batched decoding reaches
/// (`server.max_active` streams), so decoded streams keep their bit-for-bit kernels.
pub const PANEL_MIN_ROWS: usize = 32;

/// Weight rows per task on the panel path: gemm packs the activations once per call, so a
/// panel of 32 rows spent a fifth of a prompt repacking them.
const PANEL_ROWS_PER_TASK: usize = 128;

/// Whether `n` activation rows go through [`panel_product`].
fn by_panel(n: usize) -> bool {
    cfg!(target_arch = "x86_64") && n >= PANEL_MIN_ROWS
}

/// One weight matrix to multiply: `row_bytes` bytes of `ty` blocks per row, plus an optional
/// low-rank update of its outputs.
pub struct Product<'a> {
    pub ty: GgmlType,
    pub weights: &'a [u8],
    pub row_bytes: usize,
    pub update: Option<&'a LowRank<'a>>,
}

impl Product<'_> {
    fn rows(&self) -> usize {
        self.weights.len() / self.row_bytes
    }
}

/// `out[r, o] = Σ_c x[r, c] · W[o, c]` (+ the low-rank update) for each product, all of the
/// same input `x` `[n, cols]` (one matrix; or q, k and v; gate and up); each result is
/// `[n, rows]`. Their rows are shared out in one pass over the calling serving thread's
/// [`team`] (else the current rayon pool: the trainer's own when called from training), so
/// the threads meet once per call.
pub fn matmul_many(isa: Isa, products: &[Product], cols: usize, x: &[f32]) -> Vec<Vec<f32>> {
    assert!(cols > 0 && x.len().is_multiple_of(cols), "activation shape");
    let n = x.len() / cols;
    // Calibrated here on first use, not inside a task while the team waits on it.
    prefetch::distance();
    // Σx of every 32 activations: the weights' offsets and minimums multiply it.
    let sums: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
    // A prompt's outputs (megabytes) are not zeroed first: its tasks write every one of them
    // through raw pointers (the set_len below); the few of decoding are.
    let panel = by_panel(n);
    let mut outs: Vec<Vec<f32>> = products
        .iter()
        .map(|p| match panel {
            true => Vec::with_capacity(p.rows() * n),
            false => vec![0f32; p.rows() * n],
        })
        .collect();
    let dests: Vec<Dest> = outs
        .iter_mut()
        .zip(products)
        .map(|(out, p)| Dest {
            at: out.as_mut_ptr(),
            rows: p.rows(),
        })
        .collect();
    let mut tasks = Vec::new();
    let per_task = if panel {
        PANEL_ROWS_PER_TASK
    } else {
        ROWS_PER_TASK
    };
    for (k, p) in products.iter().enumerate() {
        let weights = p.weights.chunks(per_task * p.row_bytes);
        tasks.extend(weights.enumerate().map(|(c, w)| (k, c * per_task, w)));
    }
    team::for_each_index(tasks.len(), |i| {
        let (k, first, w) = tasks[i];
        let (p, dest) = (&products[k], &dests[k]);
        let count = w.len() / p.row_bytes;
        #[cfg(target_arch = "x86_64")]
        if panel && p.update.is_none() {
            // SAFETY: the task's own columns `first..first + count` of the product's
            // [n, rows], which `outs` holds past for_each_index.
            let at = unsafe { dest.at.add(first) };
            unsafe { panel_product(p.ty, w, p.row_bytes, x, cols, n, at, (dest.rows, 1)) };
            return;
        }
        if n == 1 {
            // One activation row: the task's outputs are one run of the product's.
            // SAFETY: tasks cover disjoint rows `first..first + count` of each product, and
            // `outs` outlives for_each_index.
            let out = unsafe { std::slice::from_raw_parts_mut(dest.at.add(first), count) };
            return task(isa, p, first, w, x, &sums, cols, n, out);
        }
        // The task's outputs as [its rows, n] (each weight row meets all n activation rows;
        // `task` sets every one), then written to their places in the product's [n, rows].
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < count * n {
                scratch.resize(count * n, 0.0);
            }
            let out = &mut scratch[..count * n];
            task(isa, p, first, w, x, &sums, cols, n, out);
            for (o, values) in out.chunks_exact(n).enumerate() {
                for (r, v) in values.iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { *dest.at.add(r * dest.rows + first + o) = *v };
                }
            }
        });
    });
    if panel {
        for (out, p) in outs.iter_mut().zip(products) {
            // SAFETY: the tasks above wrote all `rows · n` outputs of every product (each
            // task its own rows for every activation row), within the reserved capacity.
            unsafe { out.set_len(p.rows() * n) };
        }
    }
    outs
}

thread_local! {
    /// A task's outputs before they go to their places (no allocation per task).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's weight rows dequantized ([`panel_product`]), and the scalar dequantizer's row.
    static PANEL: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The `n` activation rows `x` times the weight rows `w`, dequantized once into an f32 panel
/// and multiplied by gemm (the dense path's kernel), written to `dst`: activation row `i`,
/// weight row `j` at `dst + i·dst_rs + j·dst_cs`. The result is the dequantized matrix's
/// product up to summation order, like the block kernels'.
///
/// # Safety
/// `dst` must be valid for writes at every such place, and no other thread may write there.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
) {
    PANEL.with_borrow_mut(|(panel, scratch)| {
        // The panel keeps its size between calls: rows are written over, never zeroed first.
        let count = w.len() / row_bytes;
        if panel.len() < count * cols {
            panel.resize(count * cols, 0.0);
        }
        let rows = panel.chunks_exact_mut(cols).zip(w.chunks_exact(row_bytes));
        for (out, row) in rows {
            dequantize_row(Isa::selected(), ty, row, out, scratch);
        }
        // SAFETY: lhs is x as [n × cols] row-major; rhs is the panel [count × cols] read as
        // its transpose [cols × count]; dst as the caller promised.
        unsafe {
            gemm::gemm(
                n,
                count,
                cols,
                dst,
                dst_cs as isize,
                dst_rs as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                panel.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

/// The weights of one row of `ty` blocks into `out` (as many as the row holds), through the
/// SIMD dequantizer of `isa` where there is one (the same numbers as [`dequantize_into`],
/// whose scalar loops were a fifth of the judge's time on prompts), else through `scratch`.
pub(crate) fn dequantize_row(
    isa: Isa,
    ty: GgmlType,
    row: &[u8],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: an Isa other than Portable is only chosen after detecting its instruction set
    // (Isa::supported).
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2::dequantize(ty, row, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::dequantize(ty, row, out) },
        _ => false,
    };
    if !done {
        scratch.clear();
        dequantize_into(ty, row, out.len(), scratch).expect("row length checked");
        out.copy_from_slice(scratch);
    }
}

/// Where a product's outputs `[n, rows]` go; tasks write disjoint rows of it.
struct Dest {
    at: *mut f32,
    rows: usize,
}

// SAFETY: tasks write through `at` only at their own rows (see matmul_many).
unsafe impl Sync for Dest {}

/// Weight rows `first..` of product `p` (their bytes `w`) times the `n` activation rows `x`
/// into `out` (`[rows of w, n]`), plus the product's low-rank update.
#[allow(clippy::too_many_arguments)]
fn task(
    isa: Isa,
    p: &Product,
    first: usize,
    w: &[u8],
    x: &[f32],
    sums: &[f32],
    cols: usize,
    n: usize,
    out: &mut [f32],
) {
    if by_panel(n) {
        // SAFETY: `out` is [rows of w, n], this task's own.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            panel_product(p.ty, w, p.row_bytes, x, cols, n, out.as_mut_ptr(), (1, n))
        };
    } else {
        dot_rows(isa, p, w, x, sums, cols, n, out, prefetch::distance());
    }
    if let Some(u) = p.update {
        let up = &u.up[first * u.rank..];
        if n == 1 {
            add_low_rank(isa, out, &u.down, up);
        } else {
            // Each batched row's outputs (strided here) through the same kernel as a lone
            // row's: a stream decodes bit for bit alike batched or alone.
            let mut run = vec![0f32; out.len() / n];
            for r in 0..n {
                run.iter_mut()
                    .zip(out.iter().skip(r).step_by(n))
                    .for_each(|(v, o)| *v = *o);
                add_low_rank(isa, &mut run, &u.down[r * u.rank..(r + 1) * u.rank], up);
                out.iter_mut()
                    .skip(r)
                    .step_by(n)
                    .zip(&run)
                    .for_each(|(o, v)| *o = *v);
            }
        }
    }
}

/// `out` (`[rows of w, n]`) = the weight rows `w` times the `n` activation rows `x`, each
/// block unpacked by the kernels of `isa` (groups of 4 rows share it), asking for the bytes
/// `ahead` of each row as it starts ([`prefetch`]).
#[allow(clippy::too_many_arguments)]
fn dot_rows(
    isa: Isa,
    p: &Product,
    w: &[u8],
    x: &[f32],
    sums: &[f32],
    cols: usize,
    n: usize,
    out: &mut [f32],
    ahead: usize,
) {
    let blocks = cols.div_ceil(32);
    // The blocks need a kernel for `isa` (the low-rank update runs on it whatever the type).
    let isa = if has_kernel(p.ty) { isa } else { Isa::Portable };
    let mut dense = Vec::new();
    let rows = out.chunks_exact_mut(n).zip(w.chunks_exact(p.row_bytes));
    for (o, wrow) in rows {
        if ahead > 0 {
            prefetch::lines(wrow.as_ptr().wrapping_add(ahead), wrow.len());
        }
        if isa == Isa::Portable {
            dense.clear();
            dequantize_into(p.ty, wrow, cols, &mut dense).expect("row length checked");
        }
        // Whole groups of 4 activation rows (batched decoding) share each unpacked block.
        let grouped = if n >= 4 {
            dot_groups_of_4(isa, p.ty, wrow, x, sums, cols, o)
        } else {
            0
        };
        for (r, y) in o.iter_mut().enumerate() {
            let xr = &x[r * cols..(r + 1) * cols];
            let sums = &sums[r * blocks..(r + 1) * blocks];
            if r >= grouped {
                *y = match isa {
                    Isa::Portable => dot_f32(&dense, xr),
                    // SAFETY: an Isa other than Portable is only chosen after detecting its
                    // instruction set (Isa::supported).
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { x86::avx2::dot(p.ty, wrow, xr, sums) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { x86::avx512::dot(p.ty, wrow, xr, sums) },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!(),
                };
            }
        }
    }
}

/// Fills `out[..4k]` with the dot products of `w` and the first 4k rows of `x` through the
/// 4-row kernels; returns 4k (0 where the type or instruction set has none).
fn dot_groups_of_4(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    x: &[f32],
    sums: &[f32],
    cols: usize,
    out: &mut [f32],
) -> usize {
    let blocks = cols.div_ceil(32);
    let row = |r: usize| &x[r * cols..(r + 1) * cols];
    let sum = |r: usize| &sums[r * blocks..(r + 1) * blocks];
    let mut done = 0;
    for (g, o) in out.chunks_exact_mut(4).enumerate() {
        let r = 4 * g;
        let (xs, ss) = (
            [row(r), row(r + 1), row(r + 2), row(r + 3)],
            [sum(r), sum(r + 1), sum(r + 2), sum(r + 3)],
        );
        // SAFETY: an Isa other than Portable is only chosen after detecting its instruction
        // set (Isa::supported).
        let four = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2::dot4(ty, w, xs, ss) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512::dot4(ty, w, xs, ss) },
            _ => None,
        };
        let Some(four) = four else { break };
        o.copy_from_slice(&four);
        done += 4;
    }
    done
}

/// Σ exp(x − max) over `xs` (a decoding step's log-sum-exp over the vocabulary: 152 K
/// exponentials a token on Qwen2.5, ~2 % of its step in f64), in f32 SIMD runs of 256 summed
/// in f64.
pub(crate) fn sum_exp_minus(isa: Isa, xs: &[f32], max: f32) -> f64 {
    match isa {
        // SAFETY: an Isa other than Portable is only chosen after detecting its instruction
        // set (Isa::supported).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2::sum_exp_minus(xs, max) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::sum_exp_minus(xs, max) },
        _ => xs.iter().map(|&l| ((l - max) as f64).exp()).sum(),
    }
}

/// `gate[i] = silu(gate[i]) · up[i]`: the MLP's activation, in SIMD (the tensor library's
/// runs a scalar `expf` per element: ~4 % of a step with 4 streams on SmolLM2).
pub(crate) fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up");
    match isa {
        // SAFETY: an Isa other than Portable is only chosen after detecting its instruction
        // set (Isa::supported).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2::silu_mul(gate, up) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::silu_mul(gate, up) },
        _ => gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu(*g) * u),
    }
}

pub(super) fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// Keys or values of one KV head, `[len][d]`, as the cache stores them.
#[derive(Clone, Copy)]
pub(crate) enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl KvSlice<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            KvSlice::F32(x) => bytemuck::cast_slice(x),
            KvSlice::F16(x) => bytemuck::cast_slice(x),
        }
    }

    pub(crate) fn widened(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            KvSlice::F32(x) => (*x).into(),
            KvSlice::F16(x) => x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>().into(),
        }
    }
}

/// Whether attention of `d`-wide heads runs on SIMD kernels here (else the portable loops).
pub(crate) fn attends_on_simd(isa: Isa, d: usize) -> bool {
    isa != Isa::Portable && d.is_multiple_of(64)
}

/// Attention of `rep` query rows `qs` (`[rep][d]`) over the `len` positions of one KV head
/// (`keys`, `values`, of the same type), scores scaled by `scale`, into `out` (`[rep][d]`):
/// the decode step's attention, which at long contexts costs more than all the weights.
pub(crate) fn attend_group(
    isa: Isa,
    qs: &[f32],
    keys: KvSlice,
    values: KvSlice,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let stats = attend_part(isa, qs, keys, values, d, scale, out);
    for (o, (_, sum)) in out.chunks_exact_mut(d).zip(stats) {
        let inverse = 1.0 / sum;
        o.iter_mut().for_each(|v| *v *= inverse);
    }
}

/// [`attend_group`] over some of the positions, unnormalized: `out` gets Σ_j exp(s_j − m)·v_j
/// per query row, and each row's `(m, Σ_j exp(s_j − m))` (m its largest score) is returned,
/// so that parts over disjoint positions combine exactly ([`merge_parts`]).
pub(crate) fn attend_part(
    isa: Isa,
    qs: &[f32],
    keys: KvSlice,
    values: KvSlice,
    d: usize,
    scale: f32,
    out: &mut [f32],
) -> Vec<RowStats> {
    let half = matches!(keys, KvSlice::F16(_));
    assert_eq!(
        half,
        matches!(values, KvSlice::F16(_)),
        "keys and values of one type"
    );
    let mut stats = vec![(0f32, 0f32); qs.len() / d];
    let (k, v) = (keys.bytes(), values.bytes());
    // SAFETY: an Isa other than Portable is only chosen after detecting its instruction set
    // (Isa::supported).
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if d.is_multiple_of(64) => unsafe {
            if half {
                x86::avx2::attend_part::<true>(qs, k, v, d, scale, out, &mut stats)
            } else {
                x86::avx2::attend_part::<false>(qs, k, v, d, scale, out, &mut stats)
            }
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if d == 64 => unsafe {
            if half {
                x86::avx512::attend_part64::<true>(qs, k, v, scale, out, &mut stats)
            } else {
                x86::avx512::attend_part64::<false>(qs, k, v, scale, out, &mut stats)
            }
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if d.is_multiple_of(64) => unsafe {
            if half {
                x86::avx512::attend_part::<true>(qs, k, v, d, scale, out, &mut stats)
            } else {
                x86::avx512::attend_part::<false>(qs, k, v, d, scale, out, &mut stats)
            }
        },
        _ => {
            let (keys, values) = (keys.widened(), values.widened());
            attend_part_portable(qs, &keys, &values, d, scale, out, &mut stats)
        }
    }
    stats
}

/// A query row's largest score and Σ exp(score − it) over some positions ([`attend_part`]).
pub(crate) type RowStats = (f32, f32);

/// One [`attend_part`]: its unnormalized rows (`[rep][d]`) and their stats.
pub type Part<'a> = (&'a [f32], &'a [RowStats]);

/// Attention over all positions from [`attend_part`]s over disjoint ranges of them. Each
/// part's sums rescale by exp(its maximum − the overall one).
pub(crate) fn merge_parts(parts: &[Part], d: usize, out: &mut [f32]) {
    for (r, o) in out.chunks_exact_mut(d).enumerate() {
        let max = parts
            .iter()
            .fold(f32::NEG_INFINITY, |m, (_, stats)| m.max(stats[r].0));
        let mut total = 0f32;
        o.fill(0.0);
        for (rows, stats) in parts {
            let (m, sum) = stats[r];
            let weight = (m - max).exp();
            total += weight * sum;
            let row = &rows[r * d..(r + 1) * d];
            o.iter_mut().zip(row).for_each(|(o, v)| *o += weight * v);
        }
        let inverse = 1.0 / total;
        o.iter_mut().for_each(|v| *v *= inverse);
    }
}

fn attend_part_portable(
    qs: &[f32],
    keys: &[f32],
    values: &[f32],
    d: usize,
    scale: f32,
    out: &mut [f32],
    stats: &mut [RowStats],
) {
    let len = keys.len() / d;
    let mut scores = vec![0f32; qs.len() / d * len];
    for (j, key) in keys.chunks_exact(d).enumerate() {
        for (r, q) in qs.chunks_exact(d).enumerate() {
            scores[r * len + j] = dot_f32(q, key) * scale;
        }
    }
    for (row, stat) in scores.chunks_exact_mut(len).zip(stats.iter_mut()) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        *stat = (max, sum);
    }
    out.fill(0.0);
    for (j, value) in values.chunks_exact(d).enumerate() {
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            let p = scores[r * len + j];
            o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
        }
    }
}

/// A dot product in 8 independent lanes, so that the compiler vectorizes it (one running f32
/// sum would force strict left-to-right order).
/// `x · w` of an f32 vector and an f16 one, on `isa`'s registers.
pub(crate) fn dot_half(isa: Isa, x: &[f32], w: &[f16]) -> f32 {
    // SAFETY: an Isa other than Portable is only chosen after detecting its instruction set
    // (Isa::supported).
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2::dot_half(x, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::dot_half(x, w) },
        _ => x.iter().zip(w).map(|(x, w)| x * w.to_f32()).sum(),
    }
}

/// A run of outputs' low-rank update (`y` starts at a multiple of 16 outputs; `up` at its
/// group in [`group_outputs`]' layout).
pub(crate) fn add_low_rank(isa: Isa, y: &mut [f32], down: &[f32], up: &[f16]) {
    assert!(up.len() >= y.len().div_ceil(16) * 16 * down.len());
    // SAFETY: as in dot_half.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::avx2::add_low_rank(y, down, up) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::add_low_rank(y, down, up) },
        _ => {
            let rank = down.len();
            for (i, y) in y.iter_mut().enumerate() {
                let (g, j) = (i / 16, i % 16);
                *y += (0..rank)
                    .map(|k| down[k] * up[(g * rank + k) * 16 + j].to_f32())
                    .sum::<f32>();
            }
        }
    }
}

pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests;
