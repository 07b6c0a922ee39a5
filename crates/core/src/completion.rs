//! Raw completions and adapters loaded by name: the subset of vLLM's API that a control plane
//! in front of replicas uses (token ids in; token ids, log-probs and prompt log-probs out;
//! `/v1/load_lora_adapter`), so that one clawrl can be the upstream of another.
//!
//! Nothing here is captured: a raw completion has no conversation, and the control plane in
//! front is the one that captures.

use crate::Core;
use crate::chat::ChatError;
use crate::engine::{
    AdapterCommand, EngineEvent, Job, Priority, Prompt, SubmitError, Task, VersionChoice,
};
use burn::tensor::Tensor;
use clawrl_model::sampling::SamplingParams;
use clawrl_model::{Generation, peft};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedReceiver;

/// A raw completion: exactly these prompt ids, under the base model's name (the live version)
/// or an adapter loaded by name.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Vec<u32>,
    pub version: VersionChoice,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub top_logprobs: usize,
    /// Log-probs of the prompt's own tokens, with this many alternatives each.
    pub prompt_logprobs: Option<usize>,
}

/// One prompt position's log-prob (vLLM's `prompt_logprobs` entry).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub id: u32,
    pub logprob: f32,
    /// 1 = the most likely token (known only when alternatives were asked for).
    pub rank: Option<usize>,
    /// The `n` most likely tokens at this position, best first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug)]
pub struct Completion {
    pub prompt_ids: Vec<u32>,
    pub generation: Generation,
    pub adapter_version: i64,
    /// Prompt tokens whose keys and values were reused from the prefix cache.
    pub cached_tokens: usize,
    /// One entry per prompt token after the first (the first has no context).
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
}

/// A raw completion in flight: its prompt's log-probs (when asked for) and the engine's
/// events for the generation (`Admitted`, `Text` pieces, `Finished` or `Failed`).
pub struct Started {
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    pub events: UnboundedReceiver<EngineEvent>,
    /// Set it to stop the generation (the client went away).
    pub cancel: Arc<AtomicBool>,
}

/// Scores the prompt when asked (under the same version), then queues the generation.
pub async fn start(core: &Core, req: CompletionRequest) -> Result<Started, ChatError> {
    let prompt_logprobs = match req.prompt_logprobs {
        Some(n) => Some(score_prompt(core, &req.prompt, req.version, n).await?),
        None => None,
    };
    let task = Task::Generate {
        max_tokens: req.max_tokens,
        sampling: req.sampling,
        stop: req.stop,
        top_logprobs: req.top_logprobs,
    };
    let (events, cancel) = submit(core, Prompt::Ids(req.prompt), task, req.version)?;
    Ok(Started {
        prompt_logprobs,
        events,
        cancel,
    })
}

/// Runs a raw completion to its end.
pub async fn complete(core: &Core, req: CompletionRequest) -> Result<Completion, ChatError> {
    let mut started = start(core, req).await?;
    loop {
        match started.events.recv().await {
            Some(EngineEvent::Finished {
                generation,
                prompt_ids,
                adapter_version,
                cached_tokens,
            }) => {
                return Ok(Completion {
                    prompt_ids,
                    generation,
                    adapter_version,
                    cached_tokens,
                    prompt_logprobs: started.prompt_logprobs,
                });
            }
            Some(EngineEvent::Failed(e)) => return Err(ChatError::Engine(e)),
            Some(_) => {}
            None => return Err(ChatError::EngineStopped),
        }
    }
}

fn submit(
    core: &Core,
    prompt: Prompt,
    task: Task,
    version: VersionChoice,
) -> Result<(UnboundedReceiver<EngineEvent>, Arc<AtomicBool>), ChatError> {
    let (job, rx) = Job::new(prompt, task, version, Priority::User);
    let cancel = job.cancel.clone();
    core.engine.submit(job).map_err(|e| match e {
        SubmitError::Overloaded => ChatError::Overloaded,
        SubmitError::Unavailable => ChatError::Unavailable,
    })?;
    Ok((rx, cancel))
}

/// The log-prob of each prompt token after the ones before it; with `top > 0` also its rank
/// and the `top` most likely tokens (the full distributions: vocab × 4 bytes per position).
async fn score_prompt(
    core: &Core,
    prompt: &[u32],
    version: VersionChoice,
    top: usize,
) -> Result<Vec<PromptLogprob>, ChatError> {
    let Some((first, rest)) = prompt.split_first() else {
        return Ok(Vec::new());
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let task = Task::Score {
        continuation: rest.to_vec(),
        distributions: top > 0,
    };
    let (mut rx, _) = submit(core, Prompt::Ids(vec![*first]), task, version)?;
    let (logprobs, distributions) = loop {
        match rx.recv().await {
            Some(EngineEvent::Scored {
                logprobs,
                distributions,
            }) => break (logprobs, distributions),
            Some(EngineEvent::Failed(e)) => return Err(ChatError::Engine(e)),
            Some(_) => {}
            None => return Err(ChatError::EngineStopped),
        }
    };
    let rows = distributions.map(|d| rows_top(d, rest, top));
    Ok(rest
        .iter()
        .zip(logprobs)
        .enumerate()
        .map(|(i, (&id, logprob))| {
            let (rank, top) = match &rows {
                Some(rows) => (Some(rows[i].0), rows[i].1.clone()),
                None => (None, Vec::new()),
            };
            PromptLogprob {
                id,
                logprob,
                rank,
                top,
            }
        })
        .collect())
}

/// Per row of `[n, vocab]` log-distributions: the rank of `ids[row]` and the `top` best.
fn rows_top(dist: Tensor<2>, ids: &[u32], top: usize) -> Vec<(usize, Vec<(u32, f32)>)> {
    let vocab = dist.dims()[1];
    let values = clawrl_model::lora::values(&dist);
    values
        .chunks(vocab)
        .zip(ids)
        .map(|(row, &id)| {
            let own = row[id as usize];
            let rank = 1 + row.iter().filter(|&&v| v > own).count();
            let mut best: Vec<(u32, f32)> = row
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u32, v))
                .collect();
            let k = top.min(best.len());
            best.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.1.total_cmp(&a.1));
            best.truncate(k);
            best.sort_by(|a, b| b.1.total_cmp(&a.1));
            (rank, best)
        })
        .collect()
}

/// Adapters loaded by name at run time (vLLM's `/v1/load_lora_adapter`), each installed in
/// the engine under a version id of its own below 0, out of the way of trained versions.
#[derive(Default)]
pub struct NamedAdapters {
    by_name: Mutex<BTreeMap<String, i64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("The lora adapter '{0}' has already been loaded.")]
    AlreadyLoaded(String),
    #[error("The lora adapter '{0}' cannot be found.")]
    NotFound(String),
    #[error("The lora adapter '{name}' could not be loaded from {path}: {why}")]
    Unreadable {
        name: String,
        path: String,
        why: String,
    },
    #[error("The model is not loaded yet (or failed to load); see GET /health.")]
    Unavailable,
}

impl NamedAdapters {
    /// The version that serves requests naming `name`, if it is loaded.
    pub fn version(&self, name: &str) -> Option<i64> {
        self.by_name
            .lock()
            .expect("not poisoned")
            .get(name)
            .copied()
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect()
    }
}

impl Core {
    /// Reads the PEFT adapter in `path` and serves it to requests naming `name`. Blocking
    /// (reads the file).
    pub fn load_named_adapter(&self, name: &str, path: &Path) -> Result<(), AdapterError> {
        if self.named_adapters.version(name).is_some() {
            return Err(AdapterError::AlreadyLoaded(name.into()));
        }
        let model = self.engine.model().ok_or(AdapterError::Unavailable)?;
        let adapter =
            peft::load(path, &model.config, &model.transformer.device(), None).map_err(|e| {
                AdapterError::Unreadable {
                    name: name.into(),
                    path: path.display().to_string(),
                    why: format!("{e:#}"),
                }
            })?;
        let mut names = self.named_adapters.by_name.lock().expect("not poisoned");
        if names.contains_key(name) {
            return Err(AdapterError::AlreadyLoaded(name.into()));
        }
        let version = names.values().min().map_or(-1, |v| v.min(&0) - 1);
        self.engine
            .command(AdapterCommand::Install {
                version,
                adapter: Arc::new(adapter),
            })
            .map_err(|_| AdapterError::Unavailable)?;
        names.insert(name.to_string(), version);
        tracing::info!(name, version, path = %path.display(), "adapter loaded by name");
        Ok(())
    }

    /// Stops serving the adapter loaded as `name` (requests decoding with it finish).
    pub fn unload_named_adapter(&self, name: &str) -> Result<(), AdapterError> {
        let version = self
            .named_adapters
            .by_name
            .lock()
            .expect("not poisoned")
            .remove(name)
            .ok_or_else(|| AdapterError::NotFound(name.into()))?;
        let _ = self.engine.command(AdapterCommand::Remove { version });
        tracing::info!(name, version, "adapter unloaded");
        Ok(())
    }

    /// The version a request naming `model` runs with: the served model's names → the live
    /// version; an adapter loaded by name → that adapter; else `None` (an unknown model).
    pub fn version_for_model(&self, model: &str) -> Option<VersionChoice> {
        if self.serves_model(model) {
            return Some(VersionChoice::Live);
        }
        self.named_adapters
            .version(model)
            .map(VersionChoice::Exactly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn rows_top_ranks_the_given_token_and_keeps_the_best_in_order() {
        let device = Default::default();
        let dist = Tensor::<2>::from_data(
            TensorData::new(
                vec![-3.0f32, -0.5, -1.0, -2.0, -0.1, -4.0, -2.5, -0.7],
                [2, 4],
            ),
            &device,
        );
        let rows = rows_top(dist, &[2, 0], 2);
        assert_eq!(rows[0], (2, vec![(1, -0.5), (2, -1.0)]));
        assert_eq!(rows[1], (1, vec![(0, -0.1), (3, -0.7)]));
    }
}
