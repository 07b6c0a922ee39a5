//! Where votes come from: the local engine (the frozen base model, as background work below
//! user requests) or any OpenAI-compatible endpoint over HTTP.

use crate::config::JudgeEndpoint;
use crate::engine::{
    Engine, EngineError, EngineEvent, Job, Priority, Prompt, SubmitError, Task, VersionChoice,
};
use crate::http_client::{self, Target};
use clawrl_model::SamplingParams;
use clawrl_model::messages::Message;
use hyper::StatusCode;
use serde_json::json;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why a vote could not be obtained.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// Worth retrying later (the endpoint is down or busy, the engine is loading).
    #[error("{0}")]
    Transient(String),
    /// Retrying the same turn cannot help (e.g. the judge prompt exceeds the context).
    #[error("{0}")]
    Permanent(String),
}

pub(crate) enum Backend {
    Local(Engine),
    Openai(Endpoint),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Local(_) => "local",
            Self::Openai(_) => "openai",
        }
    }

    /// The judge model's name, as recorded with each judgment.
    pub fn model(&self) -> String {
        match self {
            Self::Local(e) => e.info().map_or_else(|| "local".into(), |i| i.name),
            Self::Openai(ep) => ep.model.clone(),
        }
    }

    /// Waits until the local engine has loaded, so that a judge starting with the server does
    /// not count the load time as backend failures; an engine that failed to load is an error.
    pub async fn wait_ready(&self) -> Result<(), String> {
        if let Self::Local(engine) = self {
            loop {
                match engine.status() {
                    crate::engine::Status::Loading => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    crate::engine::Status::Failed(e) => return Err(e),
                    crate::engine::Status::Ready => break,
                }
            }
        }
        Ok(())
    }

    /// A sampled reply to `messages`.
    pub async fn complete(
        &self,
        messages: Vec<Message>,
        temperature: f32,
        max_tokens: usize,
        seed: u64,
    ) -> Result<String, BackendError> {
        match self {
            Self::Local(_) => {
                self.complete_after(messages, "", Vec::new(), temperature, max_tokens, seed)
                    .await
            }
            Self::Openai(ep) => ep.chat(&messages, temperature, max_tokens, seed).await,
        }
    }

    /// A sampled continuation of a reply that starts with `reply_prefix`, cut before the first
    /// of `stop` (local engine only: an endpoint cannot be handed the start of its reply).
    pub(crate) async fn complete_after(
        &self,
        messages: Vec<Message>,
        reply_prefix: &str,
        stop: Vec<String>,
        temperature: f32,
        max_tokens: usize,
        seed: u64,
    ) -> Result<String, BackendError> {
        let Self::Local(engine) = self else {
            return Err(BackendError::Permanent(
                "continuing a reply needs the local judge".into(),
            ));
        };
        let task = Task::Generate {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p: 1.0,
                top_k: 0,
                seed: Some(seed),
            },
            stop,
            top_logprobs: 0,
        };
        let mut rx = submit(engine, messages, reply_prefix.into(), task)?;
        loop {
            match rx.recv().await {
                Some(EngineEvent::Finished { generation, .. }) => return Ok(generation.text),
                Some(EngineEvent::Failed(e)) => return Err(engine_failure(e)),
                Some(_) => {}
                None => return Err(BackendError::Transient("the engine stopped".into())),
            }
        }
    }

    /// Log-probabilities of each option as the start of the reply after `reply_prefix`
    /// (local engine only: one prefill).
    pub async fn choose(
        &self,
        messages: Vec<Message>,
        reply_prefix: &str,
        options: Vec<String>,
    ) -> Result<Vec<f32>, BackendError> {
        let Self::Local(engine) = self else {
            return Err(BackendError::Permanent(
                "the direct mode needs the local judge".into(),
            ));
        };
        let task = Task::Choose { options };
        let mut rx = submit(engine, messages, reply_prefix.into(), task)?;
        loop {
            match rx.recv().await {
                Some(EngineEvent::Chosen { logprobs }) => return Ok(logprobs),
                Some(EngineEvent::Failed(e)) => return Err(engine_failure(e)),
                Some(_) => {}
                None => return Err(BackendError::Transient("the engine stopped".into())),
            }
        }
    }
}

/// Submits a background job on the base model (the judge is never the trained policy).
fn submit(
    engine: &Engine,
    messages: Vec<Message>,
    reply_prefix: String,
    task: Task,
) -> Result<mpsc::UnboundedReceiver<EngineEvent>, BackendError> {
    let prompt = Prompt::Chat {
        messages,
        tools: None,
        reply_prefix,
    };
    let (job, rx) = Job::new(
        prompt,
        task,
        VersionChoice::Exactly(0),
        Priority::Background,
    );
    engine.submit(job).map_err(|e| match e {
        SubmitError::Overloaded | SubmitError::Unavailable => {
            BackendError::Transient("the engine is not ready".into())
        }
    })?;
    Ok(rx)
}

fn engine_failure(e: EngineError) -> BackendError {
    BackendError::Permanent(e.to_string())
}

/// An OpenAI-compatible chat completions endpoint reached over plain HTTP (a judge server on
/// this machine or the local network: llama.cpp, vLLM, another clawrl-tui).
pub(crate) struct Endpoint {
    target: Target,
    pub model: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl Endpoint {
    pub fn new(cfg: &JudgeEndpoint) -> anyhow::Result<Self> {
        let target = Target::parse(&cfg.base_url, "judge.openai.base_url")?;
        let api_key = (!cfg.api_key_env.is_empty())
            .then(|| std::env::var(&cfg.api_key_env).ok())
            .flatten()
            .filter(|k| !k.is_empty());
        Ok(Self {
            target,
            model: cfg.model.clone(),
            api_key,
            timeout: Duration::from_secs(cfg.timeout_secs.max(1)),
        })
    }

    async fn chat(
        &self,
        messages: &[Message],
        temperature: f32,
        max_tokens: usize,
        seed: u64,
    ) -> Result<String, BackendError> {
        let body = json!({
            "model": self.model, "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens, "seed": seed, "stream": false,
        });
        let sent = http_client::send(
            &self.target,
            hyper::Method::POST,
            "/chat/completions",
            self.api_key.as_deref(),
            Some(&body),
        );
        let (status, reply) = tokio::time::timeout(self.timeout, sent)
            .await
            .map_err(|_| {
                BackendError::Transient(format!(
                    "the judge endpoint {} did not answer within {} s",
                    self.target.authority,
                    self.timeout.as_secs()
                ))
            })?
            .map_err(|e| BackendError::Transient(format!("the judge endpoint: {e}")))?;
        let detail = || {
            reply["error"]["message"]
                .as_str()
                .map_or_else(|| reply.to_string(), str::to_owned)
        };
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(BackendError::Transient(format!(
                "the judge endpoint answered {status}: {}",
                detail()
            )));
        }
        if !status.is_success() {
            return Err(BackendError::Permanent(format!(
                "the judge endpoint answered {status}: {}",
                detail()
            )));
        }
        // Reasoning servers may put the text in `reasoning_content` and leave `content` empty.
        let message = &reply["choices"][0]["message"];
        match (
            message["content"].as_str(),
            message["reasoning_content"].as_str(),
        ) {
            (Some(c), _) if !c.trim().is_empty() => Ok(c.to_string()),
            (_, Some(r)) => Ok(r.to_string()),
            (Some(c), None) => Ok(c.to_string()),
            (None, None) => Err(BackendError::Permanent(format!(
                "the judge endpoint's reply has no choices[0].message.content: {reply}"
            ))),
        }
    }
}
