//! LoRA adapters (Hu et al., 2021): beside each frozen projection W, a low-rank update
//! ΔW = s·A·B (A `[in, r]`, B `[r, out]`, s = alpha / r), computed as `x·W + s·(x·A)·B` so that
//! neither serving nor training ever materializes W + ΔW.
//!
//! An adapter is held apart from the base weights: the engine keeps one per version and each
//! request decodes with the one it started with; the trainer holds a trainable copy whose
//! parameters are the only ones with gradients (the base is shared, never copied).

use super::config::ModelConfig;
use super::kernels::LowRank;
use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Tensor, TensorData};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The projections an adapter can sit beside (PEFT's `target_modules` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The module name in Hugging Face / PEFT checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The parent module in the checkpoint (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            _ => "mlp",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// `(in, out)` features of the projection in a model of this shape.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, ffn) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        match self {
            Self::QProj => (h, q),
            Self::KProj | Self::VProj => (h, kv),
            Self::OProj => (q, h),
            Self::GateProj | Self::UpProj => (h, ffn),
            Self::DownProj => (ffn, h),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Rank, scaling and placement of an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Target>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 256 {
            bail!("the LoRA rank must be within 1..=256, got {}", self.rank);
        }
        if !(self.alpha > 0.0) {
            bail!("the LoRA alpha must be positive, got {}", self.alpha);
        }
        if self.targets.is_empty() {
            bail!("LoRA needs at least one target module");
        }
        Ok(())
    }
}

/// One low-rank update: `s·(x·A)·B`.
#[derive(Module, Debug)]
pub struct LoraPair {
    /// `[in, rank]`
    pub a: Param<Tensor<2>>,
    /// `[rank, out]`
    pub b: Param<Tensor<2>>,
    #[module(skip)]
    pub scale: f64,
    /// A and B as plain vectors, for decoding without tensor ops; only in the copies the engine
    /// serves ([`LoraAdapter::for_serving`]), never in one whose values are still trained.
    #[module(skip)]
    pub plain: Option<Arc<PlainPair>>,
}

/// A pair's matrices in f16 (half the bytes a decoded token reads): `a_t` = Aᵀ `[rank][in]`
/// (x·A as contiguous dot products, scaled by s) and `up` = B in groups of 16 outputs
/// (`kernels::group_outputs`: each rank's contribution added to 16 outputs at once, from
/// contiguous memory).
#[derive(Debug, Clone)]
pub struct PlainPair {
    a_t: Vec<f16>,
    up: Vec<f16>,
    rank: usize,
}

impl LoraPair {
    /// The update for inputs `x` `[.., in]`.
    pub fn delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let down = burn::tensor::module::linear(x, self.a.val(), None);
        burn::tensor::module::linear(down, self.b.val(), None).mul_scalar(self.scale)
    }

    /// The low-rank update of `x` (`[rows][in]`) from the plain copies, for the kernels to
    /// add to each output as they compute it: `None` when this pair has no plain copies.
    pub(crate) fn plain_update(&self, x: &[f32], rows: usize) -> Option<LowRank<'_>> {
        let p = self.plain.as_ref()?;
        let din = x.len() / rows;
        let isa = super::kernels::Isa::selected();
        let scale = self.scale as f32;
        let down = x
            .chunks_exact(din)
            .flat_map(|xr| {
                p.a_t
                    .chunks_exact(din)
                    .map(move |a| super::kernels::dot_half(isa, xr, a) * scale)
            })
            .collect();
        Some(LowRank {
            down,
            up: &p.up,
            rank: p.rank,
        })
    }
}

/// The adapters of one transformer block, indexed by [`Target`].
#[derive(Module, Debug)]
pub struct LayerLora {
    pub pairs: Vec<Option<LoraPair>>,
}

impl LayerLora {
    pub fn get(&self, t: Target) -> Option<&LoraPair> {
        self.pairs.get(t.index()).and_then(Option::as_ref)
    }
}

/// A whole adapter: one [`LayerLora`] per transformer block.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    pub layers: Vec<LayerLora>,
    #[module(skip)]
    pub config: Arc<LoraConfig>,
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initializes one: A uniform in ±1/√in (Kaiming, a = √5), B zero,
    /// so the adapted model starts out identical to the base.
    pub fn init(model: &ModelConfig, config: LoraConfig, device: &Device, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let values = |_: usize, _: Target, din: usize, dout: usize, rank: usize| {
            let bound = 1.0 / (din as f32).sqrt();
            let a = (0..din * rank)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            Ok((a, vec![0.0; rank * dout]))
        };
        Self::build(model, config, values, device).expect("a validated config")
    }

    /// Builds an adapter from `values(layer, target, in, out, rank) -> (A [in·rank],
    /// B [rank·out])`, called per layer and target in order.
    pub fn build(
        model: &ModelConfig,
        config: LoraConfig,
        mut values: impl FnMut(usize, Target, usize, usize, usize) -> Result<(Vec<f32>, Vec<f32>)>,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let (rank, scale) = (config.rank, config.scale());
        let mut layers = Vec::with_capacity(model.num_layers);
        for layer in 0..model.num_layers {
            let mut pairs: Vec<Option<LoraPair>> = (0..Target::ALL.len()).map(|_| None).collect();
            for &t in &config.targets {
                let (din, dout) = t.dims(model);
                let (a, b) = values(layer, t, din, dout, rank)?;
                let tensor = |v: Vec<f32>, shape: [usize; 2]| {
                    Param::from_tensor(Tensor::<2>::from_data(
                        TensorData::new(v, shape),
                        (device, DType::F32),
                    ))
                };
                pairs[t.index()] = Some(LoraPair {
                    a: tensor(a, [din, rank]),
                    b: tensor(b, [rank, dout]),
                    scale,
                    plain: None,
                });
            }
            layers.push(LayerLora { pairs });
        }
        Ok(Self {
            layers,
            config: Arc::new(config),
        })
    }

    /// Every pair with its layer index and target, in a fixed order.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| l.get(t).map(|p| (i, t, p)))
        })
    }

    /// A copy whose parameters track gradients (for the trainer). The values are shared.
    pub fn trainable(&self) -> Self {
        self.map_tensors(|t| t.autodiff().require_grad())
    }

    /// A copy without autodiff (for serving, or for computing a prompt without gradients).
    pub fn frozen(&self) -> Self {
        self.map_tensors(|t| t.detach().without_autodiff())
    }

    /// A frozen copy that also holds every pair's matrices as plain vectors: decoding then
    /// adds the updates on the vectors it already has, instead of 4 tensor ops per projection
    /// (which cost a version 28 % of its decoding speed). For the versions the engine serves.
    /// The matrices are rounded to f16 (the plain copies are kept in f16: half the bytes per
    /// token), the tensors too, so that prompts and decoding compute the same version.
    pub fn for_serving(&self) -> Self {
        let plain = |t: Tensor<2>| {
            t.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data")
        };
        // Rebuilt from their values (contiguous, whatever the source's layout), so that a
        // version served after training and the same version read back from disk compute
        // bit for bit alike.
        let rounded = |t: Tensor<2>| {
            let (device, dtype, dims) = (t.device(), t.dtype(), t.dims());
            let v: Vec<f32> = plain(t)
                .into_iter()
                .map(|x| f16::from_f32(x).to_f32())
                .collect();
            Tensor::<2>::from_data(TensorData::new(v, dims), (&device, dtype))
        };
        let mut out = self.frozen();
        for layer in &mut out.layers {
            for pair in layer.pairs.iter_mut().flatten() {
                let (a, b) = (rounded(pair.a.val()), rounded(pair.b.val()));
                let rank = a.dims()[1];
                pair.plain = Some(Arc::new(PlainPair {
                    a_t: plain(a.clone().transpose())
                        .into_iter()
                        .map(f16::from_f32)
                        .collect(),
                    up: super::kernels::group_outputs(&plain(b.clone()), rank),
                    rank,
                }));
                pair.a = Param::from_tensor(a);
                pair.b = Param::from_tensor(b);
            }
        }
        out
    }

    fn map_tensors(&self, f: impl Fn(Tensor<2>) -> Tensor<2>) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerLora {
                pairs: l
                    .pairs
                    .iter()
                    .map(|p| {
                        p.as_ref().map(|p| LoraPair {
                            a: Param::from_tensor(f(p.a.val())),
                            b: Param::from_tensor(f(p.b.val())),
                            scale: p.scale,
                            plain: None,
                        })
                    })
                    .collect(),
            })
            .collect();
        Self {
            layers,
            config: self.config.clone(),
        }
    }

    /// Number of trainable values.
    pub(crate) fn num_values(&self) -> usize {
        self.pairs()
            .map(|(_, _, p)| p.a.shape().num_elements() + p.b.shape().num_elements())
            .sum()
    }

    /// Bytes the adapter occupies (f32).
    pub fn bytes(&self) -> usize {
        self.num_values() * 4
    }
}

/// Reads a 2-D tensor's values as f32, row-major.
pub fn values(t: &Tensor<2>) -> Vec<f32> {
    t.clone()
        .without_autodiff()
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 data")
}
