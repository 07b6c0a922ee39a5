//! The judge (PIPELINE.md §2–3): every main turn whose next state has arrived gets m votes
//! from the process reward model and m hint votes, in the background. Turns are read from
//! the store and their judgment written back in one transaction, so a turn pending when the
//! process dies is judged exactly once after the restart.

pub mod backend;
pub mod prompts;
pub mod teacher;
pub mod verdict;

use crate::capture::sessions::strip_internal;
use crate::config::{Config, JudgeBackend, JudgeMode};
use crate::engine::Engine;
use crate::events::{Event, EventBus, emit};
use crate::store::{Judgment, PendingTurn, Store, Vote, now_ms};
use crate::telemetry::Counters;
use anyhow::Result;
use backend::{Backend, BackendError, Endpoint};
use clawrl_model::messages::{Message, Role};
use prompts::{Prompts, TurnView};
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

/// Turns fetched from the store per pass.
const BATCH: usize = 8;
/// How long an idle judge waits before looking at the store again without being woken.
const POLL: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Turns a turn into votes, a score and a hint (no storage: see [`Judge`]).
pub struct Voter {
    backend: Arc<Backend>,
    prompts: Prompts,
    /// `Direct` or `Reason` (`Auto` resolved).
    mode: JudgeMode,
    votes: usize,
    temperature: f32,
    max_tokens: usize,
    hints: bool,
    hint_texts: usize,
    minus_threshold: f64,
    markers: Vec<String>,
}

/// The background worker: pending turns from the store, through the [`Voter`], back to it.
pub(crate) struct Judge {
    voter: Voter,
    /// The judge's own connection to the store (SQLite in WAL mode takes concurrent writers).
    store: Mutex<Store>,
    bus: EventBus,
    counters: Arc<Counters>,
}

impl Voter {
    /// The voter the configuration asks for (`None` when `judge.backend = "off"`). A local
    /// judge votes with `policy`'s frozen base model, or starts an engine of its own when
    /// `judge.model` names one (it loads in the background; its weights' bytes then go to
    /// `gauges`' `judge_weight_bytes`).
    pub fn from_config(
        cfg: &Config,
        policy: &Engine,
        gauges: Option<Arc<Counters>>,
    ) -> Result<Option<Self>> {
        let j = &cfg.judge;
        if j.backend == JudgeBackend::Off {
            return Ok(None);
        }
        // The cheap checks first: a bad prompt folder fails before a model starts loading.
        let prompts_dir = (!j.prompts_dir.is_empty()).then(|| Path::new(&j.prompts_dir));
        let prompts = Prompts::load(prompts_dir, j.max_field_chars)?;
        let mode = j.effective_mode()?;
        let backend = match j.backend {
            JudgeBackend::Off => return Ok(None),
            JudgeBackend::Local => match crate::engine::EngineConfig::judge(cfg)? {
                // Its own counters: the judge's tokens are not serving's throughput.
                Some(own) => Backend::Local(Engine::start(
                    own,
                    Arc::new(Counters::default()),
                    |_| (0, None),
                    move |info| {
                        tracing::info!("judge model ready: {}", info.summary);
                        if let Some(g) = &gauges {
                            g.judge_weight_bytes.store(
                                info.weight_bytes as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                    },
                )),
                None => Backend::Local(policy.clone()),
            },
            JudgeBackend::Openai => Backend::Openai(Endpoint::new(&j.openai)?),
        };
        Ok(Some(Self {
            backend: Arc::new(backend),
            prompts,
            mode,
            votes: j.votes,
            temperature: j.temperature,
            max_tokens: j.max_tokens,
            hints: j.hints,
            hint_texts: j.hint_texts,
            minus_threshold: j.minus_threshold,
            markers: cfg.server.internal_context_markers.clone(),
        }))
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            JudgeMode::Direct => "direct",
            _ => "reason",
        }
    }

    /// All votes for one turn. A failure worth retrying is an error; one that is not (the
    /// judge prompt cannot be served) becomes a judgment that records it, scored 0.
    pub async fn judge(&self, turn: &PendingTurn) -> Result<Judgment, BackendError> {
        let start = Instant::now();
        let view = turn_view(turn, &self.markers);
        let judgment = |score, hint, error, votes| Judgment {
            turn_id: turn.turn_id,
            backend: self.backend.name().into(),
            mode: self.mode_name().into(),
            judge_model: self.backend.model(),
            score,
            hint,
            error,
            votes,
            elapsed_ms: start.elapsed().as_millis() as i64,
            judged_at: now_ms(),
        };
        match self.votes(turn.turn_id, &view).await {
            Ok(votes) => {
                let scores: Vec<Option<i8>> = votes
                    .iter()
                    .filter(|v| v.kind == "score")
                    .map(|v| v.score)
                    .collect();
                let hints: Vec<String> = votes
                    .iter()
                    .filter(|v| v.kind == "hint")
                    .map(|v| v.raw.clone())
                    .collect();
                Ok(judgment(
                    verdict::majority(&scores),
                    verdict::best_hint(&hints, &view.response),
                    None,
                    votes,
                ))
            }
            Err(BackendError::Permanent(e)) => Ok(judgment(0, None, Some(e), Vec::new())),
            Err(e) => Err(e),
        }
    }

    async fn votes(&self, turn_id: i64, view: &TurnView) -> Result<Vec<Vote>, BackendError> {
        let prompt_error = |e: anyhow::Error| BackendError::Permanent(format!("{e:#}"));
        // Seeds follow the turn: a re-judged turn (after a crash) draws the same votes.
        let seed = (turn_id as u64).wrapping_mul(1_000_003);
        let mut votes = match self.mode {
            JudgeMode::Direct => {
                let chat = self.prompts.prm(view, true).map_err(prompt_error)?;
                // The closing brace keeps `1` from being read as the start of `10`.
                let options = verdict::DIRECT_OPTIONS.map(|s| format!("{s}}}"));
                let lp = self
                    .backend
                    .choose(chat, "\\boxed{", options.to_vec())
                    .await?;
                let probs = verdict::option_probs(&[lp[0], lp[1], lp[2]]);
                let record = json!({"1": probs[0], "0": probs[1], "-1": probs[2]});
                verdict::calibrated_votes(
                    &probs,
                    self.votes,
                    self.temperature,
                    seed,
                    self.minus_threshold,
                )
                .into_iter()
                .enumerate()
                .map(|(index, s)| Vote {
                    kind: "score",
                    index,
                    raw: format!("\\boxed{{{s}}}"),
                    score: Some(s),
                    hint: None,
                    probs: Some(record.clone()),
                })
                .collect()
            }
            _ => {
                let chat = self.prompts.prm(view, false).map_err(prompt_error)?;
                self.sample(chat, seed)
                    .await?
                    .into_iter()
                    .enumerate()
                    .map(|(index, raw)| Vote {
                        kind: "score",
                        index,
                        score: verdict::parse_score(&raw),
                        raw,
                        hint: None,
                        probs: None,
                    })
                    .collect::<Vec<_>>()
            }
        };
        if self.hints {
            let chat = self.prompts.hint(view).map_err(prompt_error)?;
            let texts = match self.mode {
                JudgeMode::Direct => self.direct_hints(chat, seed ^ 0x5eed).await?,
                _ => self.sample(chat, seed ^ 0x5eed).await?,
            };
            votes.extend(texts.into_iter().enumerate().map(|(index, raw)| Vote {
                kind: "hint",
                index,
                score: verdict::parse_score(&raw),
                hint: verdict::usable_hint(&raw),
                raw,
                probs: None,
            }));
        }
        Ok(votes)
    }

    /// Hint votes in direct mode: one prefill ending in `\boxed{` gives P(1) and P(-1), from
    /// which the m votes are drawn; only the first `judge.hint_texts` votes that draw 1
    /// generate their hint, started right after `[HINT_START]` and stopped at `[HINT_END]` (a
    /// small judge otherwise spends its tokens on preamble and rarely closes the hint: 0
    /// usable hints in 38 turns on SmolLM2). The other votes that draw 1 stay `\boxed{1}`.
    async fn direct_hints(
        &self,
        chat: Vec<Message>,
        seed: u64,
    ) -> Result<Vec<String>, BackendError> {
        let options = vec!["1}".to_string(), "-1}".to_string()];
        let lp = self
            .backend
            .choose(chat.clone(), "\\boxed{", options)
            .await?;
        let probs = verdict::option_probs(&[lp[0], f32::NEG_INFINITY, lp[1]]);
        let draws = verdict::draw_votes(&probs, self.votes, self.temperature, seed);
        let mut set = tokio::task::JoinSet::new();
        let writers: Vec<usize> = (0..draws.len())
            .filter(|&i| draws[i] == 1)
            .take(self.hint_texts)
            .collect();
        for &i in &writers {
            let (backend, chat) = (self.backend.clone(), chat.clone());
            let (t, n) = (
                self.temperature,
                self.max_tokens.min(verdict::HINT_MAX_TOKENS),
            );
            set.spawn(async move {
                let stop = vec![verdict::HINT_END.to_string()];
                let text = backend
                    .complete_after(
                        chat,
                        verdict::HINT_PREFIX,
                        stop,
                        t,
                        n,
                        seed.wrapping_add(i as u64),
                    )
                    .await;
                (i, text)
            });
        }
        let mut out: Vec<String> = draws.iter().map(|d| format!("\\boxed{{{d}}}")).collect();
        while let Some(done) = set.join_next().await {
            let (i, text) = done.map_err(|e| BackendError::Transient(e.to_string()))?;
            out[i] = format!(
                "{}{}{}",
                verdict::HINT_PREFIX,
                text?.trim_end(),
                verdict::HINT_END
            );
        }
        Ok(out)
    }

    /// m sampled judge texts, requested concurrently.
    async fn sample(&self, chat: Vec<Message>, seed: u64) -> Result<Vec<String>, BackendError> {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..self.votes {
            let (backend, chat) = (self.backend.clone(), chat.clone());
            let (t, n) = (self.temperature, self.max_tokens);
            set.spawn(async move {
                (
                    i,
                    backend
                        .complete(chat, t, n, seed.wrapping_add(i as u64))
                        .await,
                )
            });
        }
        let mut out = vec![String::new(); self.votes];
        let mut first_error = None;
        while let Some(done) = set.join_next().await {
            match done {
                Ok((i, Ok(text))) => out[i] = text,
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(BackendError::Transient(e.to_string()));
                }
            }
        }
        first_error.map_or(Ok(out), Err)
    }
}

impl Judge {
    /// The judge the configuration asks for (`None` when `judge.backend = "off"`).
    pub fn from_config(
        cfg: &Config,
        engine: &Engine,
        bus: EventBus,
        counters: Arc<Counters>,
    ) -> Result<Option<Arc<Self>>> {
        let Some(voter) = Voter::from_config(cfg, engine, Some(counters.clone()))? else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Self {
            voter,
            store: Mutex::new(Store::open(&cfg.store_path())?),
            bus,
            counters,
        })))
    }

    /// Turns whose next state arrived and that are not judged yet, read from the store (the
    /// queue-depth counter says 0 until the judge's model has loaded and it first looks).
    pub fn pending(&self) -> Result<usize> {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count_pending_judgments()
    }

    async fn with_store<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            f(&mut me.store.lock().unwrap_or_else(|p| p.into_inner()))
        })
        .await?
    }

    /// Judges pending turns forever: woken by new next states, backing off while the judge
    /// backend is unreachable.
    pub async fn run(self: Arc<Self>) {
        let mut events = self.bus.subscribe();
        if let Err(e) = self.voter.backend.wait_ready().await {
            crate::events::alert(
                &self.bus,
                format!("the judge stopped: its model failed to load ({e}); turns stay unjudged"),
            );
            return;
        }
        let mut backoff = Duration::from_secs(1);
        let mut last_depth = None;
        loop {
            let listed = self
                .with_store(|s| Ok((s.pending_judgments(BATCH)?, s.count_pending_judgments()?)))
                .await;
            let (pending, depth) = match listed {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("judge: reading the store: {e:#}");
                    tokio::time::sleep(MAX_BACKOFF).await;
                    continue;
                }
            };
            self.publish_depth(depth, &mut last_depth);
            if pending.is_empty() {
                tokio::select! {
                    _ = next_state_arrives(&mut events) => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            for (done, turn) in pending.into_iter().enumerate() {
                match self.voter.judge(&turn).await {
                    Ok(judgment) => {
                        backoff = Duration::from_secs(1);
                        if let Err(e) = self.record(judgment, turn.session_id.clone()).await {
                            tracing::warn!("judge: {e:#}");
                            tokio::time::sleep(MAX_BACKOFF).await;
                            break;
                        }
                        self.publish_depth(depth.saturating_sub(done + 1), &mut last_depth);
                    }
                    Err(e) => {
                        Counters::add(&self.counters.judge_errors, 1);
                        tracing::warn!(
                            turn = turn.turn_id,
                            "judge unavailable, retrying in {backoff:?}: {e}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        break;
                    }
                }
            }
        }
    }

    fn publish_depth(&self, depth: usize, last: &mut Option<usize>) {
        self.counters
            .judge_queue_depth
            .store(depth as u64, std::sync::atomic::Ordering::Relaxed);
        if *last != Some(depth) {
            *last = Some(depth);
            emit(&self.bus, Event::JudgeQueue { pending: depth });
        }
    }

    async fn record(self: &Arc<Self>, j: Judgment, session_id: String) -> Result<()> {
        let (turn_id, score, hint, error, elapsed_ms) = (
            j.turn_id,
            j.score,
            j.hint.clone(),
            j.error.clone(),
            j.elapsed_ms,
        );
        let votes: Vec<Option<i8>> = j
            .votes
            .iter()
            .filter(|v| v.kind == "score")
            .map(|v| v.score)
            .collect();
        let saved = self.with_store(move |s| s.save_judgment(&j)).await?;
        if saved {
            let c = &self.counters;
            Counters::add(&c.judge_turns, 1);
            Counters::add(&c.judge_votes, votes.len() as u64);
            Counters::add(
                &c.judge_invalid_votes,
                votes.iter().filter(|v| v.is_none()).count() as u64,
            );
            Counters::add(&c.judge_micros, elapsed_ms.max(0) as u64 * 1000);
            emit(
                &self.bus,
                Event::TurnJudged {
                    turn_id,
                    session_id,
                    score,
                    votes,
                    hint,
                    error,
                },
            );
        }
        Ok(())
    }
}

/// Waits until some turn gets its next state (or the bus lags: look anyway).
async fn next_state_arrives(events: &mut tokio::sync::broadcast::Receiver<Event>) {
    loop {
        match events.recv().await {
            Ok(Event::NextStateAttached { .. }) | Err(RecvError::Lagged(_)) => return,
            Ok(_) => {}
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// What the judge sees of a turn: the last user request, the reply (with its tool calls),
/// and the next state.
pub(crate) fn turn_view(turn: &PendingTurn, markers: &[String]) -> TurnView {
    let request = strip_internal(&turn.request_messages, markers)
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(Message::text)
        .unwrap_or_default();
    let mut response = turn.response_text.clone();
    for call in &turn.tool_calls {
        let args = &call.function.arguments;
        response.push_str(&format!(
            "\n[tool call] {}({})",
            call.function.name,
            args.as_str()
                .map_or_else(|| args.to_string(), str::to_owned)
        ));
    }
    let next_state = turn
        .next_state
        .iter()
        .map(Message::text)
        .collect::<Vec<_>>()
        .join("\n\n");
    TurnView {
        request,
        response: response.trim().to_string(),
        next_state,
        next_state_role: turn.next_state_role.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawrl_model::message;
    use clawrl_model::messages::ToolCall;

    #[test]
    fn the_judge_sees_the_last_real_user_request_the_reply_with_tool_calls_and_the_next_state() {
        let turn = PendingTurn {
            turn_id: 1,
            session_id: "s".into(),
            request_messages: serde_json::from_value(json!([
                {"role": "user", "content": "old question"},
                {"role": "assistant", "content": "old answer"},
                {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},
                {"role": "user", "content": "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>> runtime notes"},
            ]))
            .unwrap(),
            response_text: "Let me check.".into(),
            tool_calls: vec![ToolCall::function(
                "c1".into(),
                "weather".into(),
                "{\"city\":\"Oslo\"}".into(),
            )],
            next_state: vec![
                message!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
                message!({"role": "tool", "tool_call_id": "c2", "content": "12 C"}),
            ],
            next_state_role: "tool".into(),
        };
        let v = turn_view(
            &turn,
            &["<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>".to_string()],
        );
        assert_eq!(v.request, "What is the weather?");
        assert_eq!(
            v.response,
            "Let me check.\n[tool call] weather({\"city\":\"Oslo\"})"
        );
        assert_eq!(v.next_state, "sunny\n\n12 C");
        assert_eq!(v.next_state_role, "tool");
    }
}
