//! Serving through vLLM or SGLang replicas (`serving.backend = "upstream"`): clawrl renders
//! the chat template itself and sends **token ids** ([`vllm`]: `/v1/completions` with a
//! token-id prompt; [`sglang`]: `/generate` with `input_ids`), so the captured prompt and
//! reply ids are exactly what the replica computed; each version that goes live is loaded
//! into every replica (named `clawrl-v{N}`) before any request asks for it, all replicas or
//! none; a conversation sticks to one replica; a replica that does not answer is skipped (and
//! shown down) until it answers again. This file is what both engines share; each one's
//! routes and shapes are in its own module.
//!
//! The local engine stays: the trainer, the teacher and the guard compute on it.

mod sglang;
mod vllm;

use crate::config::{UpstreamKind, UpstreamSection};
use crate::engine::{EngineError, EngineEvent, Job, Task, VersionChoice};
use crate::http_client::{self, Target};
use clawrl_model::sampling::SamplingParams;
use clawrl_model::{FinishReason, Generation};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// The longest a replica may take to answer a check or an adapter load or unload.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A replica that failed is tried again after this long.
const RETRY_DOWN_AFTER: Duration = Duration::from_secs(5);

pub struct Upstream {
    kind: UpstreamKind,
    replicas: Vec<Replica>,
    api_key: Option<String>,
    /// Where the replicas read adapters (`None`: the local folder's path).
    adapter_dir: Option<PathBuf>,
    keep_loaded: usize,
    /// The served model's name at the replicas (vLLM's `/v1/models`, SGLang's `model_path`).
    base_name: Mutex<String>,
    /// The version requests are routed to.
    live: AtomicI64,
    /// Versions loaded in every replica, oldest first.
    loaded: Mutex<Vec<i64>>,
    /// Each loaded version's adapter folder as the replicas see it.
    paths: Mutex<std::collections::HashMap<i64, String>>,
    /// Checked and serving the live version.
    ready: AtomicBool,
    /// Where a replica going down or coming back is said.
    bus: crate::events::EventBus,
    /// The serving counters (tokens and decode time of the replies the replicas stream).
    counters: std::sync::Arc<crate::telemetry::Counters>,
}

struct Replica {
    url: String,
    target: Target,
    /// When it last failed, and why (`None`: up).
    down: Mutex<Option<(Instant, String)>>,
    /// The last version it refused to load, and why.
    refused: Mutex<Option<String>>,
    /// Its stream events carry only what is new (SGLang's `--incremental-streaming-output`;
    /// otherwise everything so far).
    incremental: AtomicBool,
}

/// What the screen and `ctl status` show of a replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStatus {
    pub url: String,
    pub up: bool,
    pub error: Option<String>,
}

/// The name requests use for a version at the replicas.
pub fn adapter_name(version: i64) -> String {
    format!("clawrl-v{version}")
}

impl Upstream {
    pub fn new(
        cfg: &UpstreamSection,
        bus: crate::events::EventBus,
        counters: std::sync::Arc<crate::telemetry::Counters>,
    ) -> anyhow::Result<Self> {
        let replicas = cfg
            .urls
            .iter()
            .map(|url| {
                Ok(Replica {
                    url: url.clone(),
                    target: Target::parse(url, "upstream.urls:")?,
                    down: Mutex::new(None),
                    refused: Mutex::new(None),
                    incremental: AtomicBool::new(false),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            kind: cfg.kind,
            replicas,
            api_key: (!cfg.api_key.is_empty()).then(|| cfg.api_key.clone()),
            adapter_dir: (!cfg.adapter_dir.is_empty()).then(|| PathBuf::from(&cfg.adapter_dir)),
            keep_loaded: cfg.keep_loaded.max(1),
            base_name: Mutex::new(String::new()),
            live: AtomicI64::new(0),
            loaded: Mutex::new(Vec::new()),
            paths: Mutex::new(std::collections::HashMap::new()),
            ready: AtomicBool::new(false),
            bus,
            counters,
        })
    }

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .map(|r| {
                let down = lock(&r.down).clone();
                ReplicaStatus {
                    url: r.url.clone(),
                    up: down.is_none(),
                    error: down
                        .map(|(_, why)| why)
                        .or_else(|| lock(&r.refused).clone()),
                }
            })
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn live_version(&self) -> i64 {
        self.live.load(Ordering::SeqCst)
    }

    async fn send(
        &self,
        r: &Replica,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), String> {
        let call = http_client::send(&r.target, method, path, self.api_key.as_deref(), body);
        // A replica that hangs must not hold the gate (which waits for every load) forever.
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no answer to {path} within {} s",
                CALL_TIMEOUT.as_secs()
            )),
        }
    }

    /// Checks every replica at start: it answers, names its model, returns token ids for a
    /// token-id prompt, and has runtime LoRA loading. A replica that lacks one is refused
    /// with what it needs. Every replica must serve the same base model.
    pub async fn check(&self, probe_prompt: &[u32]) -> anyhow::Result<()> {
        for r in &self.replicas {
            let name = match self.kind {
                UpstreamKind::Vllm => vllm::check(self, r, probe_prompt).await?,
                UpstreamKind::Sglang => sglang::check(self, r, probe_prompt).await?,
            };
            let mut base = lock(&self.base_name);
            if base.is_empty() {
                *base = name;
            } else if *base != name {
                anyhow::bail!(
                    "upstream {} serves {name:?}, the others {:?}: every replica must serve the same base model",
                    r.url,
                    *base
                );
            }
        }
        Ok(())
    }

    /// `send`, with a failure to get an answer as an error that names the replica.
    async fn ask(
        &self,
        r: &Replica,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.send(r, method, path, body)
            .await
            .map_err(|e| anyhow::anyhow!("upstream {}: {e}", r.url))
    }

    /// Replicas in the order a conversation with `key` tries them: its own first (a prefix
    /// cache hit), then the next ones; replicas down recently last.
    fn order(&self, key: &str) -> Vec<&Replica> {
        let n = self.replicas.len();
        let start = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        }) as usize
            % n.max(1);
        let (mut up, mut down): (Vec<&Replica>, Vec<&Replica>) = (0..n)
            .map(|i| &self.replicas[(start + i) % n])
            .partition(|r| {
                lock(&r.down)
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= RETRY_DOWN_AFTER)
            });
        up.append(&mut down);
        up
    }

    fn model_name(&self, version: i64) -> String {
        if version == 0 {
            lock(&self.base_name).clone()
        } else {
            adapter_name(version)
        }
    }

    /// Generates `job` (a user's `Task::Generate`) on a replica and answers it with the
    /// engine's events as the replica streams: `Admitted` once a replica answered (so
    /// nothing is captured for a request no replica served), the text as it comes, then
    /// `Finished` with the ids and log-probs the replica sampled.
    pub async fn generate(&self, job: Job, prompt_ids: Vec<u32>, key: String) {
        let Task::Generate {
            max_tokens,
            sampling,
            stop,
            top_logprobs,
        } = &job.task
        else {
            let _ = job.events.send(EngineEvent::Failed(EngineError::Internal(
                "upstream: only generation".into(),
            )));
            return;
        };
        let version = match job.version {
            VersionChoice::Live => self.live_version(),
            VersionChoice::Exactly(v) => v,
        };
        let request = Request {
            prompt_ids,
            max_tokens: *max_tokens,
            sampling: *sampling,
            stop: stop.clone(),
            top_logprobs: *top_logprobs,
        };
        let (path, body) = self.generate_request(&request, version);
        let prompt_ids = request.prompt_ids;
        let fail = |e: EngineError| {
            let _ = job.events.send(EngineEvent::Failed(e));
        };
        let mut why = Vec::new();
        'replicas: for r in self.order(&key) {
            let mut reloaded = false;
            let response = loop {
                let key = self.api_key.as_deref();
                let opened =
                    http_client::open(&r.target, Method::POST, path, key, Some(&body)).await;
                let response = match opened {
                    Ok(response) => response,
                    Err(e) => {
                        self.mark_down(r, e.to_string(), &mut why);
                        continue 'replicas;
                    }
                };
                let status = response.status();
                if status.is_success() {
                    break response;
                }
                let bytes = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let answer: String = String::from_utf8_lossy(&bytes).chars().take(500).collect();
                // A replica that lost the version's adapter (restarted) gets it again, once.
                if self.lost_adapter(status, &answer) && version != 0 && !reloaded {
                    reloaded = true;
                    if self.reload(r, version).await {
                        continue;
                    }
                }
                if status.is_client_error() {
                    // The replica answered: the request itself is wrong (too long, bad version).
                    return fail(EngineError::BadRequest(format!(
                        "upstream {}: {answer}",
                        r.url
                    )));
                }
                self.mark_down(r, format!("{status}: {answer}"), &mut why);
                continue 'replicas;
            };
            self.mark_up(r);
            let relayed = self
                .relay(&job, r, response.into_body(), prompt_ids, version)
                .await;
            if let Ok(timing) = &relayed {
                // Counted like the local engine's decoding: what the screen's speed reads.
                let c = &self.counters;
                crate::telemetry::Counters::add(&c.tokens_out, timing.tokens);
                crate::telemetry::Counters::add(&c.decode_micros, timing.decode_micros);
            }
            if let Err(e) = relayed {
                fail(EngineError::Internal(format!("upstream {}: {e}", r.url)));
            }
            return;
        }
        fail(EngineError::Unavailable(format!(
            "every upstream replica is down: {}",
            why.join("; ")
        )));
    }

    /// The log-probs of `continuation` after `prompt` under `version`, computed by a replica
    /// (the teacher of the sampled-token form, `train.teacher_from = "upstream"`), and which
    /// replica computed them. Blocking.
    pub fn score(
        &self,
        prompt: &[u32],
        continuation: &[u32],
        version: i64,
    ) -> anyhow::Result<(Vec<f32>, String)> {
        let (path, body) = match self.kind {
            UpstreamKind::Vllm => (
                vllm::GENERATE,
                vllm::score_body(prompt, continuation, &self.model_name(version)),
            ),
            UpstreamKind::Sglang => {
                let adapter = (version != 0).then(|| adapter_name(version));
                (
                    sglang::GENERATE,
                    sglang::score_body(prompt, continuation, adapter),
                )
            }
        };
        block_on(async {
            let mut why = Vec::new();
            for r in self.order("teacher") {
                let (status, answer) = match self.send(r, Method::POST, path, Some(&body)).await {
                    Ok(answered) => answered,
                    Err(e) => {
                        self.mark_down(r, e, &mut why);
                        continue;
                    }
                };
                if status.is_server_error() {
                    self.mark_down(r, format!("{status}: {answer}"), &mut why);
                    continue;
                }
                self.mark_up(r);
                if !status.is_success() {
                    anyhow::bail!(
                        "upstream {} refused the teacher's scoring: {status}: {answer}",
                        r.url
                    );
                }
                let scored = match self.kind {
                    UpstreamKind::Vllm => vllm::scored(&answer, prompt.len(), continuation),
                    UpstreamKind::Sglang => sglang::scored(&answer, continuation),
                };
                return scored
                    .map(|lps| (lps, r.url.clone()))
                    .map_err(|e| anyhow::anyhow!("upstream {}: {e}", r.url));
            }
            anyhow::bail!("every upstream replica is down: {}", why.join("; "))
        })
    }

    /// The route and body that stream `req` under `version` from a replica.
    fn generate_request(&self, req: &Request, version: i64) -> (&'static str, Value) {
        match self.kind {
            UpstreamKind::Vllm => (
                vllm::GENERATE,
                vllm::generate_body(req, &self.model_name(version)),
            ),
            UpstreamKind::Sglang => {
                let adapter = (version != 0).then(|| adapter_name(version));
                (sglang::GENERATE, sglang::generate_body(req, adapter))
            }
        }
    }

    /// Where adapters are loaded (`load`) or unloaded.
    fn adapter_route(&self, load: bool) -> &'static str {
        match (self.kind, load) {
            (UpstreamKind::Vllm, true) => vllm::LOAD,
            (UpstreamKind::Vllm, false) => vllm::UNLOAD,
            (UpstreamKind::Sglang, true) => sglang::LOAD,
            (UpstreamKind::Sglang, false) => sglang::UNLOAD,
        }
    }

    /// Why an adapter load or unload was refused (`None`: done).
    fn refusal(&self, status: StatusCode, answer: &Value) -> Option<String> {
        match self.kind {
            UpstreamKind::Vllm => vllm::refusal(status, answer),
            UpstreamKind::Sglang => sglang::refusal(status, answer),
        }
    }

    /// The replica answered that it does not hold the adapter asked for (restarted).
    fn lost_adapter(&self, status: StatusCode, answer: &str) -> bool {
        match self.kind {
            UpstreamKind::Vllm => vllm::lost_adapter(status, answer),
            UpstreamKind::Sglang => sglang::lost_adapter(status, answer),
        }
    }

    fn mark_down(&self, r: &Replica, why: String, all: &mut Vec<String>) {
        all.push(format!("{}: {why}", r.url));
        let was_up = lock(&r.down)
            .replace((Instant::now(), why.clone()))
            .is_none();
        if was_up {
            // Said once when it goes down, not at every skipped request.
            crate::events::alert(
                &self.bus,
                format!(
                    "upstream replica {} is down ({why}); conversations move to the others until it answers",
                    r.url
                ),
            );
        }
    }

    /// Loads `version`'s adapter into `r` again (it answered that it does not know it).
    async fn reload(&self, r: &Replica, version: i64) -> bool {
        let Some(path) = lock(&self.paths).get(&version).cloned() else {
            return false;
        };
        let load = json!({"lora_name": adapter_name(version), "lora_path": path});
        let loaded = matches!(
            self.send(r, Method::POST, self.adapter_route(true), Some(&load)).await,
            Ok((st, answer)) if self.refusal(st, &answer).is_none()
        );
        tracing::warn!(replica = %r.url, version, loaded, "a replica had lost a version's adapter (restarted?): loaded it again");
        loaded
    }

    fn mark_up(&self, r: &Replica) {
        if lock(&r.down).take().is_some() {
            tracing::info!(replica = %r.url, "upstream replica answers again");
            let text = format!("upstream replica {} answers again", r.url);
            crate::events::emit(
                &self.bus,
                crate::events::Event::Notice {
                    level: crate::events::Level::Info,
                    text,
                },
            );
        }
    }

    /// Loads `version` (its PEFT folder `local_dir` here) into every replica and routes new
    /// requests to it; all or none: if one replica fails, those that loaded it unload it and
    /// the old version stays live everywhere. Versions beyond `upstream.keep_loaded` are
    /// unloaded. Blocking.
    pub fn make_live(&self, version: i64, local_dir: &Path) -> anyhow::Result<()> {
        block_on(async {
            if version != 0 && !lock(&self.loaded).contains(&version) {
                let dir = match &self.adapter_dir {
                    Some(d) => d.join(local_dir.file_name().unwrap_or_default()),
                    None => local_dir.to_path_buf(),
                };
                let name = adapter_name(version);
                let load = json!({"lora_name": name, "lora_path": dir.display().to_string()});
                let mut done = Vec::new();
                for r in &self.replicas {
                    let answer = self
                        .send(r, Method::POST, self.adapter_route(true), Some(&load))
                        .await;
                    let refused = match &answer {
                        Ok((st, a)) => self.refusal(*st, a),
                        Err(e) => Some(e.clone()),
                    };
                    match refused {
                        None => done.push(r),
                        Some(why) => {
                            let answered = answer.is_ok();
                            let unload = json!({"lora_name": name});
                            for r in done {
                                let route = self.adapter_route(false);
                                let _ = self.send(r, Method::POST, route, Some(&unload)).await;
                            }
                            let why_here = format!("loading {name}: {why}");
                            if answered {
                                // It serves on (the old version); what it refused is said.
                                *lock(&r.refused) = Some(why_here);
                            } else {
                                self.mark_down(r, why_here, &mut Vec::new());
                            }
                            anyhow::bail!(
                                "upstream {} could not load {name} from {}: {why}; the live version stays on every replica",
                                r.url,
                                dir.display()
                            );
                        }
                    }
                }
                lock(&self.loaded).push(version);
                lock(&self.paths).insert(version, dir.display().to_string());
                self.replicas.iter().for_each(|r| *lock(&r.refused) = None);
            }
            self.live.store(version, Ordering::SeqCst);
            self.unload_beyond_keep(version).await;
            Ok(())
        })
    }

    async fn unload_beyond_keep(&self, live: i64) {
        let evicted: Vec<i64> = {
            let mut loaded = lock(&self.loaded);
            loaded.retain(|&v| v != live);
            loaded.push(live); // the live one is the newest use
            let excess = loaded.len().saturating_sub(self.keep_loaded);
            loaded.drain(..excess).collect()
        };
        for v in evicted {
            lock(&self.paths).remove(&v);
            let unload = json!({"lora_name": adapter_name(v)});
            for r in &self.replicas {
                let route = self.adapter_route(false);
                let _ = self.send(r, Method::POST, route, Some(&unload)).await;
            }
        }
    }
}

/// The best log-probs at one position, asked at two temperatures, differ: the replica
/// returns them after temperature (the captured log-probs must be the model's own). Halving
/// the temperature doubles the gap between them, so the tolerance can leave room for a GPU's
/// bf16 noise between two requests.
fn tempered(at_1: &[f64], at_half: &[f64]) -> bool {
    let mut a = at_1.to_vec();
    let mut b = at_half.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let differ = |x: f64, y: f64| (x - y).abs() > 0.05 + 0.02 * x.abs().max(y.abs());
    a.len() != b.len() || a.iter().zip(&b).any(|(&x, &y)| differ(x, y))
}

/// How long a relayed reply took to decode after its first token.
struct Relayed {
    tokens: u64,
    decode_micros: u64,
}

/// A generation as the replicas are asked for it.
struct Request {
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    top_logprobs: usize,
}

/// What one stream event adds to the reply.
#[derive(Debug, Default)]
struct Delta {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    finish: Option<FinishReason>,
    cached_tokens: Option<usize>,
}

impl Upstream {
    /// Reads replica `r`'s event stream: forwards the text as it comes and assembles the
    /// generation from the events' ids and log-probs.
    async fn relay(
        &self,
        job: &Job,
        r: &Replica,
        body: Incoming,
        prompt_ids: Vec<u32>,
        version: i64,
    ) -> Result<Relayed, String> {
        let started = Instant::now();
        let mut reply = Assembled::default();
        let mut events = http_client::Events::new(body);
        let admitted = |cached_tokens| EngineEvent::Admitted {
            prompt_ids: prompt_ids.clone(),
            cached_tokens,
        };
        let incremental = r.incremental.load(Ordering::SeqCst);
        let mut said_admitted = false;
        let mut first_text = None;
        while let Some(event) = events.next().await {
            if job.cancel.load(Ordering::Relaxed) {
                reply.finish = Some(FinishReason::Cancelled);
                break; // dropping the body closes the connection: the replica stops
            }
            let event = event.map_err(|e| e.to_string())?;
            let Some(payload) = http_client::event_data(&event) else {
                continue;
            };
            if payload == "[DONE]" {
                break;
            }
            let chunk: Value =
                serde_json::from_str(payload).map_err(|e| format!("a stream event: {e}"))?;
            if let Some(message) = chunk["error"]["message"].as_str() {
                return Err(message.to_string());
            }
            let delta = match self.kind {
                UpstreamKind::Vllm => vllm::delta(&chunk, &prompt_ids)?,
                UpstreamKind::Sglang => sglang::delta(&chunk, &reply, incremental)?,
            };
            let piece = reply.add(delta);
            if !said_admitted {
                said_admitted = true;
                let _ = job.events.send(admitted(reply.cached_tokens));
            }
            if !piece.is_empty() {
                first_text.get_or_insert_with(Instant::now);
                let _ = job.events.send(EngineEvent::Text(piece));
            }
        }
        if !said_admitted {
            let _ = job.events.send(admitted(reply.cached_tokens));
        }
        let cached_tokens = reply.cached_tokens;
        let generation = reply.finish(prompt_ids.len(), started.elapsed().as_secs_f64())?;
        let relayed = Relayed {
            // The first token comes with the prompt; decode speed counts the rest.
            tokens: generation.ids.len().saturating_sub(1) as u64,
            decode_micros: first_text.map_or(0, |t| t.elapsed().as_micros() as u64),
        };
        let _ = job.events.send(EngineEvent::Finished {
            generation,
            prompt_ids,
            cached_tokens,
            adapter_version: version,
        });
        Ok(relayed)
    }
}

/// A streamed reply put together from its events.
#[derive(Default)]
struct Assembled {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
    finish: Option<FinishReason>,
    cached_tokens: usize,
}

impl Assembled {
    /// Adds an event's new part; returns its new text.
    fn add(&mut self, d: Delta) -> String {
        self.ids.extend(d.ids);
        self.logprobs.extend(d.logprobs);
        self.top_logprobs.extend(d.top.into_iter().map(|mut alts| {
            alts.sort_by(|a, b| b.1.total_cmp(&a.1));
            alts
        }));
        self.finish = d.finish.or(self.finish);
        self.cached_tokens = d.cached_tokens.unwrap_or(self.cached_tokens);
        self.text.push_str(&d.text);
        d.text
    }

    fn finish(self, prompt_tokens: usize, secs: f64) -> Result<Generation, String> {
        if self.logprobs.len() != self.ids.len() {
            return Err(format!(
                "{} token ids but {} log-probs",
                self.ids.len(),
                self.logprobs.len()
            ));
        }
        Ok(Generation {
            text: self.text,
            ids: self.ids,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
            finish: self.finish.unwrap_or(FinishReason::Stop),
            prompt_tokens,
            prefill_secs: 0.0,
            decode_secs: secs,
        })
    }
}

/// Runs `f` to its end from any thread (a runtime's or not): on a thread of its own.
fn block_on<T: Send>(f: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for upstream calls")
                .block_on(f)
        })
        .join()
        .expect("upstream call thread")
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(urls: &[&str]) -> Upstream {
        let cfg = UpstreamSection {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            ..UpstreamSection::default()
        };
        let counters = std::sync::Arc::new(crate::telemetry::Counters::default());
        Upstream::new(&cfg, crate::events::bus(), counters).unwrap()
    }

    fn order<'a>(up: &'a Upstream, key: &str) -> Vec<&'a str> {
        up.order(key).iter().map(|r| r.url.as_str()).collect()
    }

    #[test]
    fn a_conversation_keeps_its_replica_and_a_replica_down_goes_last_until_retried() {
        let up = upstream(&["http://a:1", "http://b:1", "http://c:1"]);
        let first = order(&up, "session-7");
        assert_eq!(
            first,
            order(&up, "session-7"),
            "the same key, the same order"
        );
        let mut all = first.clone();
        all.sort();
        assert_eq!(all, ["http://a:1", "http://b:1", "http://c:1"]);
        let spread: std::collections::HashSet<&str> =
            (0..30).map(|i| order(&up, &format!("s{i}"))[0]).collect();
        assert_eq!(spread.len(), 3, "conversations spread over the replicas");

        let own = &up.replicas.iter().find(|r| r.url == first[0]).unwrap();
        up.mark_down(own, "refused".into(), &mut Vec::new());
        let now = order(&up, "session-7");
        assert_eq!(now.last(), Some(&first[0]), "tried last while down");
        assert_eq!(&now[..2], &first[1..], "the others keep their order");
        let status = up.replicas();
        assert!(
            status
                .iter()
                .any(|r| !r.up && r.error.as_deref() == Some("refused"))
        );

        // Retried first again once RETRY_DOWN_AFTER has passed.
        *lock(&own.down) = Some((Instant::now() - RETRY_DOWN_AFTER, "refused".into()));
        assert_eq!(order(&up, "session-7"), first);
        up.mark_up(own);
        assert!(up.replicas().iter().all(|r| r.up));
    }

    #[test]
    fn log_probs_after_temperature_are_told_from_noise() {
        // The model's own: the same at both temperatures, up to bf16 noise.
        assert!(!tempered(&[-0.31, -1.52], &[-0.30, -1.55]));
        // After temperature 0.5 the runner-up falls twice as far (logits / 0.5).
        assert!(tempered(&[-0.31, -1.52], &[-0.07, -2.69]));
        // A confident first token hides it; the second shows it.
        assert!(tempered(&[-0.001, -7.2], &[-0.000001, -14.4]));
        assert!(tempered(&[-0.3], &[-0.3, -1.5]), "a missing entry");
    }

    #[test]
    fn versions_are_named_for_the_replicas() {
        let up = upstream(&["http://a:1"]);
        *lock(&up.base_name) = "base-model".into();
        assert_eq!(up.model_name(0), "base-model");
        assert_eq!(up.model_name(12), "clawrl-v12");
    }
}
