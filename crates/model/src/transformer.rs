//! The decoder-only transformer shared by the Llama, Qwen2 and Qwen3 families: RMSNorm,
//! RoPE (NEOX or interleaved), grouped-query attention with a KV cache, SwiGLU MLP, and a tied
//! or untied output head.

use super::config::ModelConfig;
use super::kernels;
use super::kv_cache::{self, KvCache, KvDtype, LayerCache};
use super::linear::{self, BlockWeight, DecodeBytes, Linear, LinearWeight};
use super::lora::{LayerLora, LoraAdapter, Target};
use super::rope::Rope;
use super::weights::WeightFile;
use anyhow::{Context, Result, bail, ensure};
use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};
use std::sync::Arc;

/// How projection weights are held after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    /// Dequantized to the compute dtype (needed for training).
    Dense,
    /// The GGUF's quantized blocks, computed on directly (GGUF only; other tensors stay dense).
    Blocks,
    /// Both: the dense copy for training and long prompts, the blocks for decoding (a few
    /// tokens at a time, where reading fewer bytes per weight is what counts).
    Both,
}

impl WeightMode {
    /// Whether Q5_0 blocks are widened to Q8_0 ([`linear::QuantMatrix::new`]: 55 % more
    /// bytes, decoded ~8 % faster on the Intel Xeon of 2026-12-07). With blocks alone (the
    /// leanest mode, the judge's default: prompts, little decoding) they stay as the file
    /// stores them: the judge holds 148 MB less and judges a turn no slower
    /// (docs/BENCHMARKS.md, "Prefetching the weight rows").
    pub fn widens_q5_0(self) -> bool {
        self != WeightMode::Blocks
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// Normalizes over the last axis, in f32 whatever the compute dtype (f16 squares overflow).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x32 = x.cast(FloatDType::F32);
        let inv = x32
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        let y = (x32 * inv).cast(float_dtype(dtype));
        y * self.weight.val().unsqueeze()
    }
}

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct Block {
    pub input_norm: RmsNorm,
    pub attn: Attention,
    pub post_attn_norm: RmsNorm,
    pub mlp: Mlp,
}

#[derive(Module, Debug)]
pub struct Transformer {
    /// `[vocab, hidden]`; `None` with `weights = "blocks"`, where tokens are looked up in
    /// `embed_blocks`.
    pub embed: Option<Param<Tensor<2>>>,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    /// The embedding's quantized blocks: a tied head's decoding form (blocks or both), and
    /// the lookup table where there is no dense copy (blocks).
    pub embed_blocks: Option<BlockWeight>,
    #[module(skip)]
    pub config: Arc<ModelConfig>,
    #[module(skip)]
    rope: Rope,
    /// What new KV caches store keys and values in (`model.kv_cache`).
    #[module(skip)]
    pub kv_dtype: KvDtype,
}

fn float_dtype(d: DType) -> FloatDType {
    match d {
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        DType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    // Tiles keep both sides cache-friendly.
    const T: usize = 32;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    out[c * rows + r] = v[r * cols + c];
                }
            }
        }
    }
    out
}

impl Attention {
    /// `x` is `[b, s, hidden]`: `b` sequences, each with its own cache and start position.
    /// The projections run on all of them at once (one pass over the weights for a batch of
    /// decoding streams); attention runs per sequence.
    fn forward(
        &self,
        x: Tensor<3>,
        cfg: &ModelConfig,
        rope: &Rope,
        caches: &mut [&mut LayerCache],
        starts: &[usize],
        lora: Option<&LayerLora>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let pair = |t: Target| lora.and_then(|l| l.get(t));
        let qkv = Linear::forward_many(
            &[
                (&self.q_proj, pair(Target::QProj)),
                (&self.k_proj, pair(Target::KProj)),
                (&self.v_proj, pair(Target::VProj)),
            ],
            x,
        );
        let [mut q, mut k, v]: [Tensor<3>; 3] = qkv.try_into().expect("three projections");
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn
                .forward(q.reshape([b, s, nh, hd]))
                .reshape([b, s, nh * hd]);
            k = kn
                .forward(k.reshape([b, s, nkv, hd]))
                .reshape([b, s, nkv * hd]);
        }
        let out = if s == 1 && !q.is_autodiff() && kv_cache::on_host(&q) {
            // Decoding: rotation, cache write and attention on plain vectors, per sequence.
            let (device, dtype) = (q.device(), q.dtype());
            let (mut q, mut k, v) = (to_vec(q), to_vec(k), to_vec(v));
            let mut out = vec![0f32; b * nh * hd];
            let streams: Vec<Stream> = caches
                .iter_mut()
                .map(|c| &mut **c)
                .zip(q.chunks_mut(nh * hd).zip(k.chunks_mut(nkv * hd)))
                .zip(v.chunks(nkv * hd).zip(out.chunks_mut(nh * hd)))
                .zip(starts)
                .collect();
            let stream = |(((cache, (q, k)), (v, o)), &start): Stream| {
                rope.rotate(q, start);
                rope.rotate(k, start);
                cache.decode((k, v), q, start, nkv, o, b == 1);
            };
            if b > 1 {
                // Batched streams: one task each, shared with the team (a stream alone splits
                // its attention over the threads once its context is long enough, in
                // `decode`; a batch's streams keep theirs on their own task).
                let streams = kernels::team::Slots::new(streams);
                kernels::team::for_each_index(streams.len(), |r| {
                    // SAFETY: for_each_index runs each index once.
                    stream(unsafe { streams.take(r) })
                });
            } else {
                streams.into_iter().for_each(stream);
            }
            Tensor::from_data(TensorData::new(out, [b, 1, nh * hd]), (&device, dtype))
        } else {
            let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
            let (q, k, v) = (heads(q, nh), heads(k, nkv), heads(v, nkv));
            let row = |t: &Tensor<4>, r: usize| {
                if b == 1 {
                    t.clone()
                } else {
                    t.clone().narrow(0, r, 1)
                }
            };
            let mut outs = Vec::with_capacity(b);
            for (r, cache) in caches.iter_mut().enumerate() {
                let q = rope.apply(row(&q, r), starts[r]);
                let k = rope.apply(row(&k, r), starts[r]);
                let host = !q.is_autodiff() && kv_cache::on_host(&q);
                outs.push(
                    if host && kernels::attends_on_simd(kernels::Isa::selected(), hd) {
                        // The cache's kernels, over its segments in place (the backend's fused
                        // attention needed one contiguous cache, and ran a 5 K-token prompt's
                        // first turn in 13–15 s against 8 s here).
                        cache.attend_prompt(q, k, row(&v, r), starts[r])
                    } else if host {
                        // No SIMD kernels for this CPU or head width: the backend's fused
                        // attention (tiled, online softmax, grouped heads), on views of the cache.
                        let (k, v) = cache.append_viewed(k, row(&v, r), starts[r]);
                        let causal = AttentionModuleOptions {
                            scale: None,
                            softcap: None,
                            is_causal: true,
                        };
                        burn::tensor::module::attention(q, k, v, None, None, causal)
                    } else {
                        // Training, and GPUs (whose fused attention in Burn 0.22 takes no grouped
                        // heads): the explicit product.
                        let (k, v) = cache.append(k, row(&v, r), starts[r]);
                        attend(q, k, v, starts[r], nkv)
                    },
                );
            }
            let out = if b == 1 {
                outs.pop().expect("one row")
            } else {
                Tensor::cat(outs, 0)
            };
            out.swap_dims(1, 2).reshape([b, s, nh * hd])
        };
        self.o_proj.forward_adapted(out, pair(Target::OProj))
    }
}

/// One decoding stream's layer cache, query, key, value, output and position.
type Stream<'a> = (
    (
        (&'a mut LayerCache, (&'a mut [f32], &'a mut [f32])),
        (&'a [f32], &'a mut [f32]),
    ),
    &'a usize,
);

fn to_vec(t: Tensor<3>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// Causal attention of one sequence: `q` `[1, heads, s, d]` at positions `start..start+s`,
/// over `k`, `v` `[1, kv_heads, t, d]`; returns `[1, heads, s, d]`.
fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, start: usize, nkv: usize) -> Tensor<4> {
    let [b, nh, s, hd] = q.dims();
    let t = k.dims()[2];
    let rep = nh / nkv;
    // Grouped-query attention without copying K/V per query head: fold the `rep` query
    // heads of each KV group into the row axis.
    let qg = q.reshape([b, nkv, rep * s, hd]);
    let scores = qg
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (hd as f64).sqrt());
    let mut scores = scores.reshape([b, nh, s, t]);
    if s > 1 {
        // Query i (absolute position start+i) may see keys 0..=start+i.
        let mask = Tensor::<2, Bool>::tril_mask([s, t], start as i64, &scores.device());
        scores = scores.mask_fill(
            mask.unsqueeze::<4>().expand([b, nh, s, t]),
            f32::NEG_INFINITY,
        );
    }
    let probs = softmax(scores, 3).reshape([b, nkv, rep * s, t]);
    probs.matmul(v).reshape([b, nh, s, hd])
}

impl Mlp {
    fn forward(&self, x: Tensor<3>, lora: Option<&LayerLora>) -> Tensor<3> {
        let pair = |t: Target| lora.and_then(|l| l.get(t));
        let gate_up = Linear::forward_many(
            &[
                (&self.gate_proj, pair(Target::GateProj)),
                (&self.up_proj, pair(Target::UpProj)),
            ],
            x,
        );
        let [gate, up]: [Tensor<3>; 2] = gate_up.try_into().expect("two projections");
        let hidden =
            if !gate.is_autodiff() && kv_cache::on_host(&gate) && gate.dtype() == DType::F32 {
                let (shape, device) = (gate.dims(), gate.device());
                let (mut gate, up) = (to_vec(gate), to_vec(up));
                kernels::silu_mul(kernels::Isa::selected(), &mut gate, &up);
                Tensor::from_data(TensorData::new(gate, shape), (&device, DType::F32))
            } else {
                silu(gate) * up
            };
        self.down_proj
            .forward_adapted(hidden, pair(Target::DownProj))
    }
}

impl Transformer {
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.kv_dtype)
    }

    pub fn device(&self) -> Device {
        self.norm.weight.device()
    }

    pub fn dtype(&self) -> DType {
        self.norm.weight.dtype()
    }

    /// Bytes of the dense embedding table (0 without one).
    fn embed_bytes(&self) -> usize {
        self.embed
            .as_ref()
            .map_or(0, |e| e.shape().num_elements() * e.dtype().size())
    }

    /// Bytes held by the weights (projections as stored: dense and/or quantized blocks).
    pub fn weight_bytes(&self) -> usize {
        let blocks = self
            .embed_blocks
            .as_ref()
            .map_or(0, |b| b.matrix.byte_len());
        self.embed_bytes()
            + blocks
            + self.norm_bytes()
            + self.linears().map(Linear::weight_bytes).sum::<usize>()
    }

    /// Bytes of weights read to decode one token: each projection's decoding form, the head,
    /// the norms and one embedding row (the physical bound of decoding is bandwidth / the
    /// checkpoint's count).
    pub fn decode_bytes_per_token(&self) -> DecodeBytes {
        let embed_bytes = match &self.embed_blocks {
            Some(b) if self.embed.is_none() => b.matrix.byte_len(),
            _ => self.embed_bytes(),
        };
        let head = match (&self.lm_head, &self.embed_blocks) {
            (Some(_), _) => DecodeBytes::default(), // among the linears
            (None, Some(b)) => b.matrix.decode_bytes(),
            (None, None) => DecodeBytes::same(embed_bytes),
        };
        let row = embed_bytes / self.config.vocab_size.max(1);
        DecodeBytes::same(row + self.norm_bytes())
            + head
            + self
                .linears()
                .map(Linear::decode_bytes)
                .sum::<DecodeBytes>()
    }

    /// Every projection, the untied head included.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let a = &l.attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
                    .into_iter()
                    .chain([&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj])
            })
            .chain(self.lm_head.as_ref())
    }

    fn norm_bytes(&self) -> usize {
        let norm = |n: &RmsNorm| n.weight.shape().num_elements() * n.weight.dtype().size();
        self.layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                norm(&l.input_norm)
                    + norm(&l.post_attn_norm)
                    + a.q_norm.as_ref().map_or(0, norm)
                    + a.k_norm.as_ref().map_or(0, norm)
            })
            .sum::<usize>()
            + norm(&self.norm)
    }

    /// Runs `tokens` `[1, seq]` after the cached positions, with `adapter`'s low-rank
    /// updates when given; returns the final-norm hidden states `[1, seq, hidden]` and
    /// extends the cache.
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Tensor<3> {
        self.forward_batch(tokens, &mut [cache], adapter)
    }

    /// Runs `tokens` `[b, seq]`: row `r` continues `caches[r]`, whatever its length (batched
    /// decoding of several streams reads the weights once for all). Returns `[b, seq, hidden]`.
    pub(crate) fn forward_batch(
        &self,
        tokens: Tensor<2, Int>,
        caches: &mut [&mut KvCache],
        adapter: Option<&LoraAdapter>,
    ) -> Tensor<3> {
        let [b, s] = tokens.dims();
        assert_eq!(b, caches.len(), "one cache per sequence");
        let starts: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let mut x = self.lookup(tokens);
        for i in 0..self.layers.len() {
            let mut layer_caches: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            x = self.block(i, x, &mut layer_caches, &starts, adapter);
        }
        for c in caches.iter_mut() {
            c.len += s;
        }
        self.norm.forward(x)
    }

    /// Layer `i` on `x` `[b, s, hidden]`, row `r` after `starts[r]` positions of `caches[r]`
    /// (which it extends); returns the layer's output (its residual stream).
    fn block(
        &self,
        i: usize,
        x: Tensor<3>,
        caches: &mut [&mut LayerCache],
        starts: &[usize],
        adapter: Option<&LoraAdapter>,
    ) -> Tensor<3> {
        let layer = &self.layers[i];
        let lora = adapter.and_then(|a| a.layers.get(i));
        let h = layer.attn.forward(
            layer.input_norm.forward(x.clone()),
            &self.config,
            &self.rope,
            caches,
            starts,
            lora,
        );
        let x = x + h;
        x.clone() + layer.mlp.forward(layer.post_attn_norm.forward(x), lora)
    }

    /// Runs `tokens` `[1, seq]` after the cached positions like [`Self::forward`] and returns
    /// each layer's input and the last layer's output (before the final norm): what training
    /// needs to recompute one layer at a time ([`Self::layer_again`]) instead of holding every
    /// layer's activations for the backward pass.
    pub fn forward_recording(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> (Vec<Tensor<3>>, Tensor<3>) {
        let [_, s] = tokens.dims();
        let start = cache.len;
        let mut x = self.lookup(tokens);
        let mut inputs = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            inputs.push(x.clone());
            x = self.block(i, x, &mut [&mut cache.layers[i]], &[start], adapter);
        }
        cache.len += s;
        (inputs, x)
    }

    /// Layer `i` once more on `x` `[1, s, hidden]` at positions `start..start+s`, over a copy
    /// of its cached first `start` positions (`cache` is left as it is).
    pub fn layer_again(
        &self,
        i: usize,
        x: Tensor<3>,
        cache: &KvCache,
        start: usize,
        adapter: Option<&LoraAdapter>,
    ) -> Tensor<3> {
        let mut layer = cache.layers[i].clone();
        self.block(i, x, &mut [&mut layer], &[start], adapter)
    }

    /// The final norm of the residual stream (what [`Self::forward`] returns).
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        self.norm.forward(x)
    }

    /// Logits `[n, vocab]` (f32) of hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        let logits = match (&self.lm_head, &self.embed_blocks, &self.embed) {
            (Some(head), _, _) => head.forward(hidden),
            // E·hᵀ reads the embedding in place; h·Eᵀ would copy it per call.
            (None, _, Some(e))
                if !linear::decodes_on_blocks(&hidden) || self.embed_blocks.is_none() =>
            {
                e.val().matmul(hidden.transpose()).transpose()
            }
            (None, Some(b), _) => linear::blocks_forward(&b.matrix, hidden),
            (None, None, _) => unreachable!("an embedding is loaded dense or as blocks"),
        };
        logits.cast(FloatDType::F32)
    }

    /// The embeddings of `tokens` `[b, s]`: rows of the dense table, or rows of its blocks
    /// dequantized as they are looked up.
    fn lookup(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        match (&self.embed, &self.embed_blocks) {
            (Some(e), _) => burn::tensor::module::embedding(e.val(), tokens),
            (None, Some(b)) => {
                let [batch, seq] = tokens.dims();
                let ids: Vec<usize> = tokens
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .expect("token ids")
                    .into_iter()
                    .map(|id| id as usize)
                    .collect();
                let rows = b.matrix.rows_dense(&ids);
                let data = TensorData::new(rows, [batch, seq, b.matrix.cols]);
                Tensor::from_data(data, (&self.device(), self.dtype()))
            }
            (None, None) => unreachable!("an embedding is loaded dense or as blocks"),
        }
    }

    /// Loads a checkpoint into a model on `device`, weights in `dtype` (F32 or F16).
    pub fn load(
        file: &WeightFile,
        config: ModelConfig,
        device: &Device,
        dtype: DType,
        mode: WeightMode,
    ) -> Result<Self> {
        config.validate()?;
        ensure!(
            matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
            "unsupported compute dtype {dtype:?}"
        );
        ensure!(
            device.supports_dtype(dtype),
            "this device cannot compute in {dtype:?} (set model.dtype = \"f32\")"
        );
        // The quantized kernels run on this CPU: on a GPU, decoding on them would ship every
        // activation to the host and back, so there the dense weights do all the work.
        let on_cpu = crate::device::is_host(device);
        let mode = match mode {
            WeightMode::Both if !on_cpu => WeightMode::Dense,
            WeightMode::Blocks if !on_cpu => {
                bail!("weights = \"blocks\" runs on the CPU kernels only; use \"dense\" on a GPU")
            }
            mode => mode,
        };
        let load = Loader {
            file,
            config: &config,
            device,
            dtype,
            mode,
        };
        let h = config.hidden_size;
        let layers = (0..config.num_layers)
            .map(|i| load.block(i))
            .collect::<Result<Vec<_>>>()?;
        // A tied head decodes on the embedding's own blocks: the largest matrix of a small
        // model. With blocks alone they are the lookup table too (a dense copy of Qwen2.5's
        // 152 K × 896 embedding is 545 MB in f32).
        let blocks = file
            .quant_blocks("model.embed_tokens.weight", mode.widens_q5_0())
            .filter(|m| (m.rows, m.cols) == (config.vocab_size, h));
        let (embed_blocks, dense) = match (mode, config.tie_embeddings, blocks) {
            (WeightMode::Blocks, _, Some(m)) => (Some(m), false),
            (WeightMode::Both, true, Some(m)) if kernels::has_kernel(m.ty) => (Some(m), true),
            _ => (None, true),
        };
        let embed_blocks = embed_blocks.map(|m| BlockWeight {
            matrix: Arc::new(m),
        });
        let embed = if dense {
            Some(Param::from_tensor(
                load.tensor("model.embed_tokens.weight", &[config.vocab_size, h])
                    .context("embedding")?,
            ))
        } else {
            None
        };
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(load.linear("lm_head", h, config.vocab_size)?)
        };
        let norm = load.norm("model.norm.weight", h)?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            embed_blocks,
            rope: Rope::new(&config),
            kv_dtype: KvDtype::F32,
            config: Arc::new(config),
        })
    }
}

/// Reads a checkpoint's tensors into the model's parts, checking each shape against the
/// configuration.
struct Loader<'a> {
    file: &'a WeightFile,
    config: &'a ModelConfig,
    device: &'a Device,
    dtype: DType,
    mode: WeightMode,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, expect: &[usize]) -> Result<Tensor<2>> {
        let (v, shape) = self.file.f32(name)?;
        ensure!(
            shape == expect,
            "tensor {name} has shape {shape:?}, the config implies {expect:?}"
        );
        Ok(Tensor::from_data(
            TensorData::new(v, [shape[0], shape[1]]),
            (self.device, self.dtype),
        ))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Param<Tensor<1>>> {
        let (v, shape) = self.file.f32(name)?;
        ensure!(
            shape == [len],
            "tensor {name} has shape {shape:?}, the config implies [{len}]"
        );
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [len]),
            (self.device, self.dtype),
        )))
    }

    fn norm(&self, name: &str, len: usize) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.vector(name, len)?,
            eps: self.config.rms_norm_eps,
        })
    }

    fn linear(&self, prefix: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let wname = format!("{prefix}.weight");
        let mut decode_blocks = None;
        let blocks = self.file.quant_blocks(&wname, self.mode.widens_q5_0());
        let weight = match (self.mode, blocks) {
            (WeightMode::Blocks, Some(m)) => {
                ensure!(
                    (m.rows, m.cols) == (d_out, d_in),
                    "tensor {wname} has shape [{}, {}], expected [{d_out}, {d_in}]",
                    m.rows,
                    m.cols
                );
                LinearWeight::Blocks(BlockWeight {
                    matrix: Arc::new(m),
                })
            }
            // HF layout is [out, in]; store [in, out] contiguously so the forward pass is a
            // plain x·W (a lazily transposed view would be re-copied on every matmul).
            (mode, blocks) => {
                if mode == WeightMode::Both {
                    decode_blocks =
                        blocks
                            .filter(|m| kernels::has_kernel(m.ty))
                            .map(|m| BlockWeight {
                                matrix: Arc::new(m),
                            });
                }
                let (v, shape) = self.file.f32(&wname)?;
                ensure!(
                    shape == [d_out, d_in],
                    "tensor {wname} has shape {shape:?}, the config implies [{d_out}, {d_in}]"
                );
                let t = Tensor::from_data(
                    TensorData::new(transpose(&v, d_out, d_in), [d_in, d_out]),
                    (self.device, self.dtype),
                );
                LinearWeight::Dense(Param::from_tensor(t))
            }
        };
        let bname = format!("{prefix}.bias");
        let bias = if self.file.contains(&bname) {
            Some(self.vector(&bname, d_out)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            decode_blocks,
            bias,
        })
    }

    /// Layer `i`: attention (with per-head QK norms where the family has them) and the MLP.
    fn block(&self, i: usize) -> Result<Block> {
        let c = self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let p = format!("model.layers.{i}");
        let qk_norm = |which: &str| -> Result<Option<RmsNorm>> {
            c.family
                .qk_norm()
                .then(|| self.norm(&format!("{p}.self_attn.{which}_norm.weight"), hd))
                .transpose()
        };
        let attn = Attention {
            q_proj: self.linear(&format!("{p}.self_attn.q_proj"), h, c.num_heads * hd)?,
            k_proj: self.linear(&format!("{p}.self_attn.k_proj"), h, c.num_kv_heads * hd)?,
            v_proj: self.linear(&format!("{p}.self_attn.v_proj"), h, c.num_kv_heads * hd)?,
            o_proj: self.linear(&format!("{p}.self_attn.o_proj"), c.num_heads * hd, h)?,
            q_norm: qk_norm("q")?,
            k_norm: qk_norm("k")?,
        };
        let mlp = Mlp {
            gate_proj: self.linear(&format!("{p}.mlp.gate_proj"), h, c.intermediate_size)?,
            up_proj: self.linear(&format!("{p}.mlp.up_proj"), h, c.intermediate_size)?,
            down_proj: self.linear(&format!("{p}.mlp.down_proj"), c.intermediate_size, h)?,
        };
        Ok(Block {
            input_norm: self.norm(&format!("{p}.input_layernorm.weight"), h)?,
            attn,
            post_attn_norm: self.norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
            mlp,
        })
    }
}
