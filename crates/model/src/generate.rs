//! Generation with a KV cache, and teacher-forced scoring of a given continuation.

use super::LoadedModel;
use super::lora::LoraAdapter;
use super::sampling::{Sampler, SamplingParams};
use anyhow::{Result, bail};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// How many alternatives (with log-probs) to record per sampled token; 0 = none.
    pub top_logprobs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The caller asked to stop (e.g. the client went away).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Every sampled token, the end-of-turn token included when one was sampled.
    pub ids: Vec<u32>,
    /// Untempered log-probability of each sampled token.
    pub logprobs: Vec<f32>,
    /// The most likely alternatives at each step (only when requested).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// The reply text: end-of-turn token excluded, cut before a stop string.
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    /// `prefill: 41 tokens, 85.3 tok/s; decode: 32 tokens, 24.1 tok/s`
    pub fn speed_line(&self) -> String {
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        // The first token comes out of the prefill step; decode speed counts the rest.
        let decoded = self.ids.len().saturating_sub(1);
        format!(
            "prefill: {} tokens, {:.1} tok/s; decode: {} tokens, {:.1} tok/s",
            self.prompt_tokens,
            rate(self.prompt_tokens, self.prefill_secs),
            decoded,
            rate(decoded, self.decode_secs)
        )
    }
}

/// One sequence being generated, advanced a token at a time by [`LoadedModel::decode_step`]
/// (so that a scheduler can interleave several).
pub struct Decoding {
    sampler: Sampler,
    stop: Vec<String>,
    top_logprobs: usize,
    budget: usize,
    /// Logits of the next token.
    logits: Vec<f32>,
    /// A sampled token the model has not seen yet.
    feed: Option<u32>,
    /// Sampled ids that are part of the text (no end-of-turn token).
    text_ids: Vec<u32>,
    /// Bytes of `out.text` already returned to the caller.
    emitted: usize,
    decode_start: Instant,
    pub cache: super::KvCache,
    /// Prompt tokens that came from a prefix cache instead of being computed.
    pub cached_tokens: usize,
    /// The adapter this sequence is decoded with, from its first token to its last (a swap
    /// of the live version never changes a generation in flight).
    pub adapter: Option<Arc<LoraAdapter>>,
    pub done: bool,
    pub out: Generation,
}

impl Decoding {
    /// Ends the generation; returns the text not yet handed out.
    fn finish(&mut self) -> String {
        self.done = true;
        self.out.decode_secs = if self.out.ids.len() > 1 {
            self.decode_start.elapsed().as_secs_f64()
        } else {
            0.0
        };
        let rest = self.out.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.out.text.len();
        rest
    }

    /// Stops early at the caller's request (e.g. the client went away).
    pub fn cancel(&mut self) {
        self.out.finish = FinishReason::Cancelled;
        self.finish();
    }
}

/// Tokens per forward pass when computing a prompt.
const PREFILL_CHUNK: usize = 256;

/// Checks that the prompt fits the context and returns how many tokens may be generated.
pub fn token_budget(context_length: usize, prompt_len: usize, max_tokens: usize) -> Result<usize> {
    if prompt_len == 0 {
        bail!("the prompt is empty");
    }
    if prompt_len >= context_length {
        bail!(
            "the prompt is {prompt_len} tokens, but the model's context is {context_length} tokens; shorten the conversation"
        );
    }
    Ok(max_tokens.min(context_length - prompt_len))
}

impl LoadedModel {
    /// Logits of the last position of `ids` after extending `cache` with them. Long inputs go
    /// through in chunks: attention scores of a chunk are `chunk × context`, not `n × n`
    /// (a 5 K-token prompt in one piece needs a 1 GB score matrix per layer).
    fn step(
        &self,
        ids: &[u32],
        cache: &mut super::KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Vec<f32> {
        // Whole chunks first, the remainder last (the chunking decides the float results).
        let (head, last) = ids.split_at((ids.len() - 1) / PREFILL_CHUNK * PREFILL_CHUNK);
        super::scoring::extend(&self.transformer, head, cache, adapter, PREFILL_CHUNK);
        let tokens = super::scoring::ids_tensor(&self.transformer, last);
        let hidden = self.transformer.forward(tokens, cache, adapter);
        let [_, s, h] = hidden.dims();
        let last = hidden.narrow(1, s - 1, 1).reshape([1, h]);
        self.transformer
            .logits(last)
            .into_data()
            .try_into_vec::<f32>()
            .expect("logits are f32")
    }

    /// Runs `ids` through the model into `cache` without computing logits: a prompt computed
    /// a piece at a time (the engine's background jobs).
    pub fn extend_cache(
        &self,
        ids: &[u32],
        cache: &mut super::KvCache,
        adapter: Option<&LoraAdapter>,
    ) {
        super::scoring::extend(&self.transformer, ids, cache, adapter, PREFILL_CHUNK);
    }

    /// Starts a generation: checks the budget and runs the prompt through the model. `prefix`
    /// is a KV cache already holding the first `prefix.len()` prompt tokens (prefix caching),
    /// computed with the same adapter.
    pub fn start_decoding(
        &self,
        req: &GenerateRequest,
        prefix: Option<super::KvCache>,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<Decoding> {
        let budget = token_budget(
            self.config.context_length,
            req.prompt_ids.len(),
            req.max_tokens,
        )?;
        let mut cache = match prefix {
            Some(c) if c.len() < req.prompt_ids.len() => c,
            _ => self.transformer.new_cache(),
        };
        let cached_tokens = cache.len();
        let mut d = Decoding {
            sampler: Sampler::new(req.sampling),
            stop: req.stop.clone(),
            top_logprobs: req.top_logprobs,
            budget,
            logits: Vec::new(),
            feed: None,
            text_ids: Vec::new(),
            emitted: 0,
            cached_tokens,
            adapter,
            done: budget == 0,
            decode_start: Instant::now(),
            out: Generation {
                ids: Vec::new(),
                logprobs: Vec::new(),
                top_logprobs: Vec::new(),
                text: String::new(),
                finish: FinishReason::Length,
                prompt_tokens: req.prompt_ids.len(),
                prefill_secs: 0.0,
                decode_secs: 0.0,
            },
            cache: self.transformer.new_cache(),
        };
        if !d.done {
            let t0 = Instant::now();
            // The prompt kept in the prefix cache then holds exactly its positions.
            cache.reserve(req.prompt_ids.len());
            d.logits = self.step(
                &req.prompt_ids[cached_tokens..],
                &mut cache,
                d.adapter.as_deref(),
            );
            d.out.prefill_secs = t0.elapsed().as_secs_f64();
            d.decode_start = Instant::now();
        }
        d.cache = cache;
        Ok(d)
    }

    /// Runs the token each of `ds` still has to feed through the model, several streams per
    /// forward pass (those sharing an adapter, up to [`super::linear::DECODE_ROWS`] at a time:
    /// the weights are read once for all of them). Each one's next [`Self::decode_step`] then
    /// only samples. Streams left alone are fed by `decode_step` as usual.
    pub fn feed_batch(&self, ds: &mut [&mut Decoding]) {
        let mut pending: Vec<&mut Decoding> = ds
            .iter_mut()
            .map(|d| &mut **d)
            .filter(|d| !d.done && d.feed.is_some())
            .collect();
        while let Some(first) = pending.first() {
            let key = first.adapter.as_ref().map(Arc::as_ptr);
            let (mut group, rest): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(|d| d.adapter.as_ref().map(Arc::as_ptr) == key);
            for batch in group.chunks_mut(super::linear::DECODE_ROWS) {
                if batch.len() > 1 {
                    self.feed_together(batch);
                }
            }
            pending = rest;
        }
    }

    /// One forward pass for the pending tokens of `batch` (same adapter).
    fn feed_together(&self, batch: &mut [&mut Decoding]) {
        let n = batch.len();
        let ids: Vec<i64> = batch
            .iter()
            .map(|d| d.feed.expect("pending") as i64)
            .collect();
        let tokens = Tensor::from_data(TensorData::new(ids, [n, 1]), &self.transformer.device());
        let adapter = batch[0].adapter.clone();
        let mut caches: Vec<&mut super::KvCache> = batch.iter_mut().map(|d| &mut d.cache).collect();
        let hidden = self
            .transformer
            .forward_batch(tokens, &mut caches, adapter.as_deref());
        let h = hidden.dims()[2];
        let logits = self
            .transformer
            .logits(hidden.reshape([n, h]))
            .into_data()
            .try_into_vec::<f32>()
            .expect("logits are f32");
        let vocab = logits.len() / n;
        for (d, row) in batch.iter_mut().zip(logits.chunks_exact(vocab)) {
            d.logits = row.to_vec();
            d.feed = None;
        }
    }

    /// Samples one token; returns the text that became final with it (may be empty).
    pub fn decode_step(&self, d: &mut Decoding) -> Result<String> {
        if d.done {
            return Ok(String::new());
        }
        if let Some(prev) = d.feed.take() {
            d.logits = self.step(&[prev], &mut d.cache, d.adapter.as_deref());
        }
        let (id, lp) = d.sampler.sample(&d.logits);
        if d.top_logprobs > 0 {
            d.out
                .top_logprobs
                .push(super::sampling::top_logprobs(&d.logits, d.top_logprobs));
        }
        d.out.ids.push(id);
        d.out.logprobs.push(lp);
        if self.tokenizer.stop_ids.contains(&id) {
            d.out.finish = FinishReason::Stop;
            return Ok(d.finish());
        }
        d.text_ids.push(id);
        let text = self.tokenizer.decode(&d.text_ids)?;
        if let Some(cut) = d
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            d.out.text = text[..cut].to_string();
            d.out.finish = FinishReason::Stop;
            return Ok(d.finish());
        }
        d.out.text = text;
        if d.out.ids.len() >= d.budget {
            d.out.finish = FinishReason::Length;
            return Ok(d.finish());
        }
        // The next call runs the model on this token: the piece goes out first.
        d.feed = Some(id);
        // Hold back an incomplete UTF-8 sequence and any tail that could start a stop string.
        let safe = safe_emit_len(&d.out.text, &d.stop);
        let piece = d.out.text.get(d.emitted..safe).unwrap_or("").to_string();
        d.emitted = d.emitted.max(safe);
        Ok(piece)
    }

    /// Generates a reply. `on_text` receives each new piece of text and returns `false` to stop.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut d = self.start_decoding(req, None, None)?;
        while !d.done {
            let piece = self.decode_step(&mut d)?;
            if !piece.is_empty() && !on_text(&piece) {
                d.cancel();
            }
        }
        Ok(d.out)
    }

    /// Log-probabilities of `continuation` given `context`, teacher-forced, under the base
    /// model plus `adapter`.
    pub fn score(
        &self,
        context: &[u32],
        continuation: &[u32],
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>> {
        Ok(self
            .continuation_logprobs(context, continuation, adapter, None)?
            .into_data()
            .try_into_vec::<f32>()?)
    }

    /// Log-probabilities `[n]` of `continuation` after `context`; `prefix` optionally holds the
    /// first tokens of `context` already computed with the same adapter.
    pub(crate) fn continuation_logprobs(
        &self,
        context: &[u32],
        continuation: &[u32],
        adapter: Option<&LoraAdapter>,
        prefix: Option<super::KvCache>,
    ) -> Result<Tensor<1>> {
        if continuation.is_empty() && !context.is_empty() {
            return Ok(Tensor::from_data(
                TensorData::new(Vec::<f32>::new(), [0]),
                &self.transformer.device(),
            ));
        }
        let logits = self.teacher_forced(context, continuation, adapter, prefix)?;
        Ok(super::scoring::gather_logprobs(logits, continuation))
    }

    /// The logits `[n, vocab]` predicting each continuation token, after checking the sizes;
    /// `prefix` optionally holds the first tokens of `context` (same adapter).
    pub fn teacher_forced(
        &self,
        context: &[u32],
        continuation: &[u32],
        adapter: Option<&LoraAdapter>,
        prefix: Option<super::KvCache>,
    ) -> Result<Tensor<2>> {
        if context.is_empty() {
            bail!("scoring needs a non-empty context");
        }
        if continuation.is_empty() {
            bail!("nothing to score");
        }
        token_budget(
            self.config.context_length,
            context.len() + continuation.len() - 1,
            0,
        )?;
        let mut cache = match prefix {
            Some(c) if c.len() < context.len() => c,
            _ => self.transformer.new_cache(),
        };
        Ok(super::scoring::continuation_logits(
            &self.transformer,
            context,
            continuation,
            &mut cache,
            adapter,
            PREFILL_CHUNK,
        )
        .expect("sizes checked above"))
    }
}

impl LoadedModel {
    /// The log-probability of each of several token sequences beyond their common prefix:
    /// one prefill of the shared prefix, then a step per remaining token of each sequence.
    /// Callers tokenize prompt + option text as a whole, so every option is scored in its
    /// natural tokenization (`{-1}` may merge across the prompt/option boundary). `prefix` is
    /// a KV cache already holding the first tokens. Returns the log-probs, the shared prefix
    /// and its KV cache (for the prefix cache).
    pub fn sequence_logprobs(
        &self,
        sequences: &[Vec<u32>],
        prefix: Option<super::KvCache>,
    ) -> Result<(Vec<f32>, Vec<u32>, super::KvCache)> {
        let Some(first) = sequences.first() else {
            bail!("nothing to score");
        };
        let shared = sequences.iter().fold(first.len(), |n, s| {
            n.min(first.iter().zip(s).take_while(|(a, b)| a == b).count())
        });
        // Each sequence needs at least one token of its own to score.
        let shared = shared.min(
            sequences
                .iter()
                .map(Vec::len)
                .min()
                .unwrap_or(0)
                .saturating_sub(1),
        );
        if shared == 0 {
            bail!("the sequences share no prompt");
        }
        let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
        token_budget(self.config.context_length, longest - 1, 0)?;
        let context = &first[..shared];
        // At least the last shared token is computed here: its logits score the options.
        let mut cache = match prefix {
            Some(c) if c.len() < shared => c,
            Some(c) => c.truncated(shared - 1),
            None => self.transformer.new_cache(),
        };
        cache.reserve(shared);
        let logits = self.step(&context[cache.len()..], &mut cache, None);
        let logp = |logits: &[f32], id: u32| {
            logits
                .get(id as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY)
                - super::sampling::log_sum_exp(logits)
        };
        let mut out = Vec::with_capacity(sequences.len());
        for seq in sequences {
            let own = &seq[shared..];
            let mut total = logp(&logits, own[0]);
            let mut branch = cache.truncated(cache.len());
            for pair in own.windows(2) {
                let next = self.step(&[pair[0]], &mut branch, None);
                total += logp(&next, pair[1]);
            }
            out.push(total);
        }
        Ok((out, context.to_vec(), cache))
    }
}

/// How much of `text` can be shown now: not a trailing partial character, not a trailing prefix
/// of a stop string (it may still complete into one).
fn safe_emit_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let whole = end;
    for s in stops.iter().filter(|s| !s.is_empty()) {
        if let Some(k) = (1..s.len())
            .rev()
            .find(|&k| s.is_char_boundary(k) && text[..whole].ends_with(&s[..k]))
        {
            end = end.min(whole - k);
        }
    }
    end
}
