//! The projection layer: one type whose weight is either a dense Burn tensor or the
//! checkpoint's own quantized GGUF blocks.
//!
//! Training and LoRA need the dense form; a memory-lean decode path can compute directly on the
//! blocks (faithful to what the file ships, no dequantized copy kept), and the default keeps both:
//! inputs of a few rows (decoding) read the blocks, longer ones and training the dense weight.
//! The rest of the model only calls [`Linear::forward`] / [`Linear::forward_adapted`], so it
//! never depends on the representation.

use super::kernels;
use super::lora::LoraPair;
use super::quant::{GgmlType, dequantize_into};
use anyhow::{Result, ensure};
use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, TensorData};
use std::sync::Arc;

/// A `[out, in]` matrix kept as GGML blocks, one row after another.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    bytes: Vec<u8>,
}

impl QuantMatrix {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        let row_bytes = ty.bytes_for(cols)?;
        ensure!(
            rows.checked_mul(row_bytes) == Some(bytes.len()),
            "{ty:?} matrix {rows}x{cols} needs {rows} x {row_bytes} bytes, got {}",
            bytes.len()
        );
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            bytes,
        })
    }

    /// `x` is `[n, cols]` row-major; returns `[n, rows]` = x · Wᵀ (+ `update`).
    pub fn matmul(&self, x: &[f32], update: Option<&kernels::LowRank>) -> Vec<f32> {
        let isa = kernels::Isa::selected();
        kernels::matmul(
            isa,
            self.ty,
            &self.bytes,
            self.row_bytes,
            self.cols,
            x,
            update,
        )
    }

    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for row in self.bytes.chunks_exact(self.row_bytes) {
            dequantize_into(self.ty, row, self.cols, &mut out).expect("row length checked in new");
        }
        out
    }
}

/// Quantized blocks as a (parameter-free) module field.
#[derive(Module, Debug)]
pub struct BlockWeight {
    #[module(skip)]
    pub matrix: Arc<QuantMatrix>,
}

#[derive(Module, Debug)]
pub enum LinearWeight {
    /// `[in, out]`, so that the forward pass is a plain `x · W`.
    Dense(Param<Tensor<2>>),
    Blocks(BlockWeight),
}

#[derive(Module, Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    /// The checkpoint's own blocks kept beside a dense weight ([`super::WeightMode::Both`]):
    /// a few rows at a time (decoding) read these, which is 4–7× fewer bytes per token.
    pub decode_blocks: Option<BlockWeight>,
    pub bias: Option<Param<Tensor<1>>>,
}

/// Up to this many rows (tokens) go through the quantized kernels when a dense weight is also
/// kept; longer inputs (prompts, scoring) use the dense matrix product, which wins there.
pub const DECODE_ROWS: usize = 8;

impl Linear {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_adapted(x, None)
    }

    /// `x·W` (+ bias) plus the low-rank update of `lora` when given.
    pub fn forward_adapted<const D: usize>(
        &self,
        x: Tensor<D>,
        lora: Option<&LoraPair>,
    ) -> Tensor<D> {
        let blocks = match (&self.weight, &self.decode_blocks) {
            (LinearWeight::Blocks(b), _) | (_, Some(b)) => Some(&b.matrix),
            _ => None,
        };
        if let Some(m) = blocks.filter(|_| decodes_on_blocks(&x)) {
            return self.add_bias(blocks_forward_adapted(m, x, lora));
        }
        let y = match &self.weight {
            LinearWeight::Dense(w) => burn::tensor::module::linear(x.clone(), w.val(), None),
            LinearWeight::Blocks(b) => blocks_forward(&b.matrix, x.clone()),
        };
        let y = match lora {
            Some(pair) => y + pair.delta(x),
            None => y,
        };
        self.add_bias(y)
    }

    fn add_bias<const D: usize>(&self, y: Tensor<D>) -> Tensor<D> {
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[1],
            LinearWeight::Blocks(b) => b.matrix.rows,
        }
    }

    /// Bytes the weight and bias occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        let w = match &self.weight {
            LinearWeight::Dense(w) => w.shape().num_elements() * w.dtype().size(),
            LinearWeight::Blocks(b) => b.matrix.byte_len(),
        };
        let kept = self
            .decode_blocks
            .as_ref()
            .map_or(0, |b| b.matrix.byte_len());
        w + kept + self.bias_bytes()
    }

    /// Bytes read per decoded token: the blocks when decoding uses them, else the weight.
    pub fn decode_bytes(&self) -> usize {
        let w = match (&self.decode_blocks, &self.weight) {
            (Some(b), _) | (None, LinearWeight::Blocks(b)) => b.matrix.byte_len(),
            (None, LinearWeight::Dense(w)) => w.shape().num_elements() * w.dtype().size(),
        };
        w + self.bias_bytes()
    }

    fn bias_bytes(&self) -> usize {
        self.bias
            .as_ref()
            .map_or(0, |b| b.shape().num_elements() * b.dtype().size())
    }

    pub fn dtype(&self) -> Option<DType> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w.dtype()),
            LinearWeight::Blocks(_) => None,
        }
    }
}

/// Whether an input is small enough for the quantized kernels to beat the dense product, and
/// needs no gradient (gradients flow only through dense weights).
pub(crate) fn decodes_on_blocks<const D: usize>(x: &Tensor<D>) -> bool {
    let rows: usize = x.dims()[..D - 1].iter().product();
    rows <= DECODE_ROWS && !x.is_autodiff()
}

/// x · Wᵀ on the quantized blocks; `x` leaves the backend as f32 and comes back in its dtype.
pub(crate) fn blocks_forward<const D: usize>(m: &QuantMatrix, x: Tensor<D>) -> Tensor<D> {
    blocks_forward_adapted(m, x, None)
}

/// [`blocks_forward`] plus the low-rank update of `lora`, added on the plain vectors when the
/// pair has plain copies (a serving version), else with tensor ops.
fn blocks_forward_adapted<const D: usize>(
    m: &QuantMatrix,
    x: Tensor<D>,
    lora: Option<&LoraPair>,
) -> Tensor<D> {
    let (device, dtype) = (x.device(), x.dtype());
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    let xs = x
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    let update = lora.and_then(|pair| pair.plain_update(&xs, rows));
    let y = m.matmul(&xs, update.as_ref());
    let added = lora.is_none() || update.is_some();
    dims[D - 1] = m.rows;
    let y = Tensor::from_data(TensorData::new(y, dims), (&device, dtype));
    match lora {
        Some(pair) if !added => y + pair.delta(x),
        _ => y,
    }
}
