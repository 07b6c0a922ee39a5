//! Rotary position embeddings (RoPE), in the NEOX (rotate-half) or the interleaved layout:
//! the rotation frequencies are computed once per model; prompts rotate Burn tensors, decoding
//! rotates its one position's vectors in place.

use super::config::{ModelConfig, RopeLayout};
use burn::tensor::{DType, Device, Tensor, TensorData};

#[derive(Debug, Clone)]
pub(crate) struct Rope {
    inv_freq: Vec<f64>,
    layout: RopeLayout,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim as f64;
        Self {
            inv_freq: (0..cfg.head_dim / 2)
                .map(|i| cfg.rope_theta.powf(-(2.0 * i as f64) / d))
                .collect(),
            layout: cfg.rope_layout,
        }
    }

    /// cos and sin of pair `i`'s angle at position `p` (the one formula both paths use).
    fn angle(&self, p: usize, i: usize) -> (f32, f32) {
        let a = p as f64 * self.inv_freq[i];
        (a.cos() as f32, a.sin() as f32)
    }

    /// Rotates `x` `[b, heads, s, d]` for positions `start..start+s`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let [b, h, s, d] = x.dims();
        let (cos, sin) = self.tables(start, s, &x.device(), x.dtype());
        let half = d / 2;
        let cos = cos.unsqueeze::<4>();
        let sin = sin.unsqueeze::<4>();
        match self.layout {
            RopeLayout::Neox => {
                let x1 = x.clone().narrow(3, 0, half);
                let x2 = x.narrow(3, half, half);
                let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
                let r2 = x1 * sin + x2 * cos;
                Tensor::cat(vec![r1, r2], 3)
            }
            RopeLayout::Interleaved => {
                let pairs = x.reshape([b, h, s, half, 2]);
                let xe = pairs.clone().narrow(4, 0, 1).reshape([b, h, s, half]);
                let xo = pairs.narrow(4, 1, 1).reshape([b, h, s, half]);
                let re = xe.clone() * cos.clone() - xo.clone() * sin.clone();
                let ro = xe * sin + xo * cos;
                Tensor::stack::<5>(vec![re, ro], 4).reshape([b, h, s, d])
            }
        }
    }

    /// cos and sin for positions `start..start+len`, `[len, head_dim/2]`.
    fn tables(
        &self,
        start: usize,
        len: usize,
        device: &Device,
        dtype: DType,
    ) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(len * half),
            Vec::with_capacity(len * half),
        );
        for p in start..start + len {
            for i in 0..half {
                let (c, s) = self.angle(p, i);
                cos.push(c);
                sin.push(s);
            }
        }
        let make = |v| Tensor::<2>::from_data(TensorData::new(v, [len, half]), (device, dtype));
        (make(cos), make(sin))
    }

    /// Rotates every head of `x` (`[heads][head_dim]`) for position `p`, in place.
    pub(crate) fn rotate(&self, x: &mut [f32], p: usize) {
        let half = self.inv_freq.len();
        let angles: Vec<(f32, f32)> = (0..half).map(|i| self.angle(p, i)).collect();
        for head in x.chunks_exact_mut(2 * half) {
            for (i, &(c, s)) in angles.iter().enumerate() {
                let (a, b) = match self.layout {
                    RopeLayout::Neox => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (head[a], head[b]);
                head[a] = x1 * c - x2 * s;
                head[b] = x1 * s + x2 * c;
            }
        }
    }
}
