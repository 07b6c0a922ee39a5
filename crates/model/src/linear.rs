//! The projection layer: one type whose weight is either a dense Burn tensor or the
//! checkpoint's own quantized GGUF blocks.
//!
//! Training and LoRA need the dense form; a memory-lean decode path can compute directly on the
//! blocks (faithful to what the file ships, no dequantized copy kept), and the default keeps both:
//! inputs of a few rows (decoding) read the blocks, longer ones and training the dense weight.
//! The rest of the model only calls [`Linear::forward`] / [`Linear::forward_adapted`], so it
//! never depends on the representation.

use super::gguf::{GgufFile, GgufTensorInfo};
use super::kernels;
use super::lora::LoraPair;
use super::quant::GgmlType;
use anyhow::{Result, ensure};
use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, TensorData};
use std::sync::Arc;

/// A `[out, in]` matrix kept as GGML blocks, one row after another.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    /// The type of the blocks as kept (Q5_0 may be kept as Q8_0: see [`QuantMatrix::new`]).
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    bytes: Vec<u8>,
    /// The checkpoint's own size of these blocks.
    file_bytes: usize,
}

impl QuantMatrix {
    /// A matrix's quantized blocks as the quantized kernels take them (`None` when the tensor
    /// is not a matrix or its type has no such kernel), Q5_0 widened to Q8_0 when `widen`.
    pub fn from_gguf(file: &GgufFile, info: &GgufTensorInfo, widen: bool) -> Option<Self> {
        let shape = info.shape();
        (shape.len() == 2)
            .then(|| {
                let bytes = file.tensor_bytes(info).to_vec();
                if widen {
                    Self::new(info.ty, shape[0], shape[1], bytes)
                } else {
                    Self::as_stored(info.ty, shape[0], shape[1], bytes)
                }
            })?
            .ok()
    }

    /// The blocks of a checkpoint's matrix. Q5_0 is rewritten as Q8_0 of the same values
    /// ([`super::quant::q5_0_as_q8_0`]): 55 % more bytes, read faster (Qwen2.5's decode).
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        let mut m = Self::as_stored(ty, rows, cols, bytes)?;
        if m.ty == GgmlType::Q5_0 {
            m.bytes = super::quant::q5_0_as_q8_0(&m.bytes);
            m.ty = GgmlType::Q8_0;
            m.row_bytes = m.ty.bytes_for(cols)?;
        }
        Ok(m)
    }

    /// The blocks of a checkpoint's matrix as the file stores them (the leanest form: a model
    /// that only reads prompts, such as the judge, decodes little).
    pub fn as_stored(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        let row_bytes = ty.bytes_for(cols)?;
        ensure!(
            rows.checked_mul(row_bytes) == Some(bytes.len()),
            "{ty:?} matrix {rows}x{cols} needs {rows} x {row_bytes} bytes, got {}",
            bytes.len()
        );
        let file_bytes = bytes.len();
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            bytes,
            file_bytes,
        })
    }

    /// `x` is `[n, cols]` row-major; returns `[n, rows]` = x · Wᵀ (+ `update`).
    pub fn matmul(&self, x: &[f32], update: Option<&kernels::LowRank>) -> Vec<f32> {
        let isa = kernels::Isa::selected();
        let product = self.product(update);
        kernels::matmul_many(isa, &[product], self.cols, x)
            .pop()
            .expect("one product")
    }

    /// This matrix as a kernel operand.
    pub fn product<'a>(&'a self, update: Option<&'a kernels::LowRank<'a>>) -> kernels::Product<'a> {
        kernels::Product {
            ty: self.ty,
            weights: &self.bytes,
            row_bytes: self.row_bytes,
            update,
        }
    }

    /// Rows `ids` dequantized, one after another (`[ids.len(), cols]`): an embedding lookup.
    pub(crate) fn rows_dense(&self, ids: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let row = &self.bytes[id * self.row_bytes..(id + 1) * self.row_bytes];
            super::quant::dequantize_into(self.ty, row, self.cols, &mut out)
                .expect("row length checked in new");
        }
        out
    }

    /// Bytes held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Bytes read to multiply by this matrix once: as held, and as the checkpoint has them.
    pub(crate) fn decode_bytes(&self) -> DecodeBytes {
        DecodeBytes {
            held: self.bytes.len(),
            file: self.file_bytes,
        }
    }

    #[cfg(test)]
    pub(crate) fn to_dense(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for row in self.bytes.chunks_exact(self.row_bytes) {
            super::quant::dequantize_into(self.ty, row, self.cols, &mut out)
                .expect("row length checked in new");
        }
        out
    }
}

/// Bytes of weights read per decoded token: as this engine holds them, and as the checkpoint
/// stores them (the least any engine reads: the physical bound of decoding).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeBytes {
    pub held: usize,
    pub file: usize,
}

impl DecodeBytes {
    pub fn same(bytes: usize) -> Self {
        Self {
            held: bytes,
            file: bytes,
        }
    }
}

impl std::ops::Add for DecodeBytes {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            held: self.held + o.held,
            file: self.file + o.file,
        }
    }
}

impl std::iter::Sum for DecodeBytes {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| a + b)
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
/// Measured (`bench --prompt-tokens N`) since the dense product uses gemm's AVX-512 kernels:
/// with 8 here instead of 16, Qwen2.5's 10 and 16 rows ran 1.15× and 1.85× faster, SmolLM2's
/// 0.97× and 1.07× (with the AVX2 kernels the quantized ones had won up to ~16 rows). Short
/// turns and the new tail of a cached conversation are this size.
pub(crate) const DECODE_ROWS: usize = 8;

impl Linear {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_adapted(x, None)
    }

    /// `x·W` (+ bias) plus the low-rank update of `lora` when given.
    pub(crate) fn forward_adapted<const D: usize>(
        &self,
        x: Tensor<D>,
        lora: Option<&LoraPair>,
    ) -> Tensor<D> {
        if let Some(m) = self.blocks().filter(|_| on_blocks(&x, lora)) {
            return blocks_forward_many(&[(self, lora)], &[m], x)
                .pop()
                .expect("one projection");
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

    /// Several projections of the same input (q, k and v; gate and up), each with its optional
    /// update: when decoding on blocks, one parallel pass over all their rows; else one by one.
    pub(crate) fn forward_many<const D: usize>(
        projections: &[(&Linear, Option<&LoraPair>)],
        x: Tensor<D>,
    ) -> Vec<Tensor<D>> {
        let blocks: Option<Vec<&QuantMatrix>> = projections
            .iter()
            .map(|(l, lora)| l.blocks().filter(|_| on_blocks(&x, *lora)))
            .collect();
        match blocks {
            Some(blocks) => blocks_forward_many(projections, &blocks, x),
            None => projections
                .iter()
                .map(|(l, lora)| l.forward_adapted(x.clone(), *lora))
                .collect(),
        }
    }

    /// The blocks this projection computes small batches on, if it has them.
    fn blocks(&self) -> Option<&QuantMatrix> {
        match (&self.weight, &self.decode_blocks) {
            (LinearWeight::Blocks(b), _) | (_, Some(b)) => Some(&b.matrix),
            _ => None,
        }
    }

    fn add_bias<const D: usize>(&self, y: Tensor<D>) -> Tensor<D> {
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
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
    pub(crate) fn decode_bytes(&self) -> DecodeBytes {
        let bias = DecodeBytes::same(self.bias_bytes());
        bias + match (&self.decode_blocks, &self.weight) {
            (Some(b), _) | (None, LinearWeight::Blocks(b)) => b.matrix.decode_bytes(),
            (None, LinearWeight::Dense(w)) => {
                DecodeBytes::same(w.shape().num_elements() * w.dtype().size())
            }
        }
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

/// Whether `x` goes through the quantized kernels with `lora`'s update (a served version's,
/// which has plain copies of its matrices).
fn on_blocks<const D: usize>(x: &Tensor<D>, lora: Option<&LoraPair>) -> bool {
    decodes_on_blocks(x) && lora.is_none_or(|p| p.plain.is_some())
}

/// x · Wᵀ on the quantized blocks; `x` leaves the backend as f32 and comes back in its dtype.
pub(crate) fn blocks_forward<const D: usize>(m: &QuantMatrix, x: Tensor<D>) -> Tensor<D> {
    let (device, dtype, mut dims) = (x.device(), x.dtype(), x.dims());
    let y = m.matmul(&to_vec(x), None);
    dims[D - 1] = m.rows;
    Tensor::from_data(TensorData::new(y, dims), (&device, dtype))
}

/// The projections of `x` on their `blocks`, with biases and plain-vector updates, in one
/// parallel pass.
fn blocks_forward_many<const D: usize>(
    projections: &[(&Linear, Option<&LoraPair>)],
    blocks: &[&QuantMatrix],
    x: Tensor<D>,
) -> Vec<Tensor<D>> {
    let (device, dtype, dims) = (x.device(), x.dtype(), x.dims());
    let rows = dims[..D - 1].iter().product();
    let xs = to_vec(x);
    let updates: Vec<_> = projections
        .iter()
        .map(|(_, lora)| lora.and_then(|p| p.plain_update(&xs, rows)))
        .collect();
    let products: Vec<_> = blocks
        .iter()
        .zip(&updates)
        .map(|(m, u)| m.product(u.as_ref()))
        .collect();
    let ys = kernels::matmul_many(kernels::Isa::selected(), &products, blocks[0].cols, &xs);
    ys.into_iter()
        .zip(blocks)
        .zip(projections)
        .map(|((y, m), (linear, _))| {
            let mut dims = dims;
            dims[D - 1] = m.rows;
            linear.add_bias(Tensor::from_data(
                TensorData::new(y, dims),
                (&device, dtype),
            ))
        })
        .collect()
}

fn to_vec<const D: usize>(x: Tensor<D>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}
