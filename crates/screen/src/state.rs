//! What the screen knows: the history loaded from the store, folded forward with every event
//! from the core. Pure data: no terminal, no clock (the caller passes the time), no core.

use clawrl_core::events::{Event, Level};
use clawrl_core::store::HintCandidate;
use clawrl_core::store::VersionState;
use clawrl_core::store::{JudgmentSummary, Snapshot, TurnSummary, VersionRow};
use clawrl_core::telemetry::hardware::Hardware;
use std::collections::VecDeque;

/// Sessions and turns the screen keeps (the oldest are forgotten).
pub const MAX_SESSIONS: usize = 200;
pub const MAX_TURNS: usize = 2000;
/// Seconds of serving speed kept for the sparkline.
const SPEED_HISTORY: usize = 120;
/// Seconds the decode speed is averaged over.
const SPEED_WINDOW: usize = 30;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Session {
    pub id: String,
    pub source: String,
    pub last_active_at: i64,
    pub close_reason: Option<String>,
    pub turns: Vec<TurnView>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnView {
    pub turn_id: Option<i64>,
    pub turn_index: i64,
    /// While it streams: the chat completion id.
    pub request_id: Option<String>,
    pub side: bool,
    pub last_message: String,
    pub reply: String,
    pub streaming: bool,
    /// Why the request failed or was cancelled.
    pub error: Option<String>,
    /// The version that wrote it.
    pub version: Option<i64>,
    pub next_state: Option<String>,
    pub no_signal: bool,
    pub judgment: Option<JudgmentSummary>,
    pub rating: Option<i8>,
    /// The hint its distillation read, once trained on.
    pub distilled: Option<HintCandidate>,
}

impl TurnView {
    /// The reward training uses (`clawrl_core::store::reward`).
    pub fn reward(&self) -> Option<i8> {
        let judged = self.judgment.as_ref().filter(|j| j.error.is_none());
        clawrl_core::store::reward(self.rating, judged.map(|j| j.score))
    }
}

impl From<TurnSummary> for TurnView {
    fn from(t: TurnSummary) -> Self {
        Self {
            turn_id: Some(t.turn_id),
            turn_index: t.turn_index,
            request_id: None,
            side: t.turn_type == clawrl_core::store::TurnType::Side,
            last_message: t.last_message,
            reply: t.reply,
            streaming: false,
            error: None,
            version: Some(t.adapter_version),
            next_state: t.next_state_role,
            no_signal: t.no_signal,
            judgment: t.judgment,
            rating: t.rating,
            distilled: t.distilled,
        }
    }
}

/// A version as the updates pane shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionView {
    pub id: i64,
    pub parent: i64,
    /// candidate | live | vetoed | retired
    pub state: VersionState,
    pub samples: usize,
    pub loss: f64,
    pub kl_base: Option<f64>,
    pub kl_live: Option<f64>,
    pub mean_reward: Option<f64>,
    /// The learning rate its step used.
    pub learning_rate: Option<f64>,
    pub guard_passed: bool,
    pub reasons: Vec<String>,
}

impl From<&VersionRow> for VersionView {
    fn from(v: &VersionRow) -> Self {
        Self {
            id: v.id,
            parent: v.parent,
            state: v.state,
            samples: v.metrics.samples,
            loss: v.metrics.loss,
            kl_base: v.kl_base,
            kl_live: v.kl_live,
            mean_reward: v.metrics.mean_reward,
            learning_rate: v.metrics.learning_rate,
            guard_passed: v.guard_passed,
            reasons: v.guard_report["reasons"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(String::from))
                .chain(v.error.clone())
                .collect(),
        }
    }
}

/// The update in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub parent: i64,
    pub done: usize,
    pub samples: usize,
    pub loss: Option<f64>,
}

/// Serving numbers sampled from the counters once a second.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ServingSample {
    pub tokens_out: u64,
    pub decode_micros: u64,
    pub queue_depth: u64,
    pub active: u64,
    pub prefix_cache_bytes: u64,
    /// Weights held by the policy's model and the judge's own (0: none or loading).
    pub policy_weight_bytes: u64,
    pub judge_weight_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub at_ms: i64,
    pub level: Level,
    pub text: String,
}

#[derive(Debug, Clone, Default)]
pub struct State {
    /// The served model once loaded.
    pub model: Option<String>,
    /// Most recently active first.
    pub sessions: Vec<Session>,
    /// Newest last.
    pub versions: Vec<VersionView>,
    pub live_version: i64,
    pub paused: bool,
    pub training: Option<Progress>,
    pub samples_waiting: usize,
    pub judge_pending: usize,
    /// (turn id, reward) in the order the rewards arrived; a later rating replaces the value.
    pub rewards: Vec<(i64, f64)>,
    pub hardware: Option<Hardware>,
    pub serving: ServingSample,
    /// Tokens generated per second (counted when a reply completes), newest last.
    pub tokens_per_sec: VecDeque<u64>,
    /// Microseconds spent decoding per second, aligned with `tokens_per_sec`.
    decode_micros: VecDeque<u64>,
    /// Decode speed over the last `SPEED_WINDOW` seconds (tokens per decoding second).
    pub decode_speed: Option<f64>,
    pub notices: Vec<Notice>,
}

impl State {
    pub(crate) fn from_snapshot(s: Snapshot) -> Self {
        let mut state = State {
            live_version: s.live_version,
            paused: s.training_paused,
            versions: s.versions.iter().map(VersionView::from).collect(),
            ..Self::default()
        };
        state.sessions = s
            .sessions
            .into_iter()
            .map(|s| Session {
                id: s.id,
                source: s.source,
                last_active_at: s.last_active_at,
                close_reason: s.close_reason,
                turns: Vec::new(),
            })
            .collect();
        for t in s.turns {
            let session_id = t.session_id.clone();
            let turn = TurnView::from(t);
            if let Some(r) = turn.reward() {
                state.rewards.push((turn.turn_id.unwrap_or(0), r as f64));
            }
            // A turn of a session older than the list: listed anyway, at the end.
            let i = match state.sessions.iter().position(|s| s.id == session_id) {
                Some(i) => i,
                None => {
                    state.sessions.push(Session {
                        id: session_id,
                        source: String::new(),
                        ..Session::default()
                    });
                    state.sessions.len() - 1
                }
            };
            state.sessions[i].turns.push(turn);
        }
        state
    }

    /// Keeps what the live session has that the store cannot know (the model, speeds,
    /// hardware, notices, the update in progress) across a resync.
    pub(crate) fn resync(&mut self, s: Snapshot) {
        let mut fresh = Self::from_snapshot(s);
        fresh.model = self.model.take();
        fresh.hardware = self.hardware.take();
        fresh.serving = self.serving;
        fresh.tokens_per_sec = std::mem::take(&mut self.tokens_per_sec);
        fresh.decode_micros = std::mem::take(&mut self.decode_micros);
        fresh.decode_speed = self.decode_speed;
        fresh.notices = std::mem::take(&mut self.notices);
        fresh.training = self.training.take();
        fresh.samples_waiting = self.samples_waiting;
        fresh.judge_pending = self.judge_pending;
        *self = fresh;
    }

    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.iter().find(|s| s.id == id)
    }

    /// The session, moved to the top of the list as the most recently active.
    fn touch_session(&mut self, id: &str, now_ms: i64) -> &mut Session {
        let session = match self.sessions.iter().position(|s| s.id == id) {
            Some(i) => self.sessions.remove(i),
            None => Session {
                id: id.to_string(),
                ..Session::default()
            },
        };
        self.sessions.insert(0, session);
        self.sessions.truncate(MAX_SESSIONS);
        let s = &mut self.sessions[0];
        s.last_active_at = now_ms;
        s.close_reason = None;
        s
    }

    fn turn_mut(&mut self, find: impl Fn(&TurnView) -> bool) -> Option<&mut TurnView> {
        self.sessions
            .iter_mut()
            .flat_map(|s| s.turns.iter_mut().rev())
            .find(|t| find(t))
    }

    fn by_request(&mut self, request_id: &str) -> Option<&mut TurnView> {
        self.turn_mut(|t| t.request_id.as_deref() == Some(request_id))
    }

    fn by_id(&mut self, turn_id: i64) -> Option<&mut TurnView> {
        self.turn_mut(|t| t.turn_id == Some(turn_id))
    }

    /// A turn's reward changed: the rewards chart follows.
    fn reward_changed(&mut self, turn_id: i64) {
        let Some(reward) = self.by_id(turn_id).and_then(|t| t.reward()) else {
            return;
        };
        match self.rewards.iter_mut().find(|(id, _)| *id == turn_id) {
            Some(r) => r.1 = reward as f64,
            None => self.rewards.push((turn_id, reward as f64)),
        }
    }

    fn version_mut(&mut self, id: i64) -> Option<&mut VersionView> {
        self.versions.iter_mut().find(|v| v.id == id)
    }

    /// The version now live: the one before is retired (a candidate that went live stops
    /// being one).
    fn set_live(&mut self, id: i64) {
        for v in &mut self.versions {
            if v.state == VersionState::Live {
                v.state = VersionState::Retired;
            }
        }
        if let Some(v) = self.version_mut(id) {
            v.state = VersionState::Live;
        }
        self.live_version = id;
    }

    pub(crate) fn notice(&mut self, level: Level, text: impl Into<String>, now_ms: i64) {
        self.notices.push(Notice {
            at_ms: now_ms,
            level,
            text: text.into(),
        });
        if self.notices.len() > 50 {
            self.notices.remove(0);
        }
    }

    /// Folds one event from the core into the state.
    pub fn apply(&mut self, event: &Event, now_ms: i64) {
        match event {
            Event::EngineReady { model } => self.model = Some(model.clone()),
            Event::Notice { level, text } => self.notice(*level, text.clone(), now_ms),
            Event::RequestStarted { .. }
            | Event::RequestText { .. }
            | Event::RequestFinished { .. }
            | Event::RequestFailed { .. }
            | Event::RequestCancelled { .. }
            | Event::RequestRefused { .. } => self.on_requests(event, now_ms),
            Event::TurnCaptured { .. }
            | Event::NextStateAttached { .. }
            | Event::SessionClosed { .. } => self.on_capture(event),
            Event::TurnJudged { .. }
            | Event::HintChosen { .. }
            | Event::JudgeQueue { .. }
            | Event::FeedbackRecorded { .. } => self.on_signals(event),
            Event::SamplesWaiting { .. }
            | Event::SamplesSetAside { .. }
            | Event::TrainingStarted { .. }
            | Event::TrainingStep { .. }
            | Event::TrainingFailed { .. }
            | Event::TrainingPaused
            | Event::TrainingResumed => self.on_training(event, now_ms),
            Event::CandidateReady { .. }
            | Event::VersionLive { .. }
            | Event::VersionVetoed { .. }
            | Event::RolledBack { .. } => self.on_versions(event),
        }
    }

    /// A request's life: its turn appears, streams, ends.
    fn on_requests(&mut self, event: &Event, now_ms: i64) {
        match event {
            Event::RequestStarted {
                request_id,
                session_id,
                turn_index,
                last_message,
                ..
            } => {
                let s = self.touch_session(session_id, now_ms);
                s.turns.push(TurnView {
                    turn_index: *turn_index,
                    request_id: Some(request_id.clone()),
                    last_message: last_message.clone(),
                    streaming: true,
                    ..TurnView::default()
                });
                let total: usize = self.sessions.iter().map(|s| s.turns.len()).sum();
                if total > MAX_TURNS
                    && let Some(oldest) =
                        self.sessions.iter_mut().rev().find(|s| !s.turns.is_empty())
                {
                    oldest.turns.remove(0);
                }
            }
            Event::RequestText { request_id, text } => {
                if let Some(t) = self.by_request(request_id) {
                    t.reply.push_str(text);
                }
            }
            Event::RequestFinished {
                request_id,
                adapter_version,
                ..
            } => {
                if let Some(t) = self.by_request(request_id) {
                    t.streaming = false;
                    t.version = Some(*adapter_version);
                }
            }
            Event::RequestFailed {
                request_id,
                message,
                ..
            } => {
                if let Some(t) = self.by_request(request_id) {
                    t.streaming = false;
                    t.error = Some(message.clone());
                }
            }
            Event::RequestCancelled { request_id } => {
                if let Some(t) = self.by_request(request_id) {
                    t.streaming = false;
                    t.error = Some("cancelled: the client went away".into());
                }
            }
            Event::RequestRefused { message, .. } => {
                self.notice(Level::Error, format!("Refused: {message}"), now_ms)
            }
            _ => {}
        }
    }

    /// Capture: a turn stored, its next state, its session closed.
    fn on_capture(&mut self, event: &Event) {
        match event {
            Event::TurnCaptured {
                turn_id,
                session_id,
                turn_index,
                turn_type,
            } => {
                let turn = self
                    .sessions
                    .iter_mut()
                    .find(|s| &s.id == session_id)
                    .and_then(|s| {
                        s.turns
                            .iter_mut()
                            .rev()
                            .find(|t| t.turn_index == *turn_index)
                    });
                if let Some(t) = turn {
                    t.turn_id = Some(*turn_id);
                    t.side = *turn_type == clawrl_core::events::TurnType::Side;
                }
            }
            Event::NextStateAttached { turn_id, role, .. } => {
                if let Some(t) = self.by_id(*turn_id) {
                    t.next_state = Some(role.as_str().into());
                }
            }
            Event::SessionClosed {
                session_id,
                reason,
                no_signal_turns,
            } => {
                if let Some(s) = self.sessions.iter_mut().find(|s| &s.id == session_id) {
                    s.close_reason = Some(reason.as_str().into());
                    if *no_signal_turns > 0
                        && let Some(t) = s.turns.iter_mut().rev().find(|t| !t.side)
                        && t.next_state.is_none()
                    {
                        t.no_signal = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// A turn's signals: the judge's votes, the hint distilled, a rating.
    fn on_signals(&mut self, event: &Event) {
        match event {
            Event::TurnJudged {
                turn_id,
                score,
                votes,
                hint,
                error,
                ..
            } => {
                if let Some(t) = self.by_id(*turn_id) {
                    t.judgment = Some(JudgmentSummary {
                        score: *score,
                        votes: votes.clone(),
                        hint: hint.clone(),
                        error: error.clone(),
                    });
                }
                self.reward_changed(*turn_id);
            }
            Event::HintChosen {
                turn_id,
                source,
                hint,
                overlap,
                ..
            } => {
                if let Some(t) = self.by_id(*turn_id) {
                    t.distilled = Some(HintCandidate {
                        source: *source,
                        text: hint.clone(),
                        overlap: *overlap,
                        error: None,
                        scored_by: None,
                    });
                }
            }
            Event::JudgeQueue { pending } => self.judge_pending = *pending,
            Event::FeedbackRecorded {
                turn_id, rating, ..
            } => {
                if let Some(t) = self.by_id(*turn_id) {
                    t.rating = Some(*rating);
                }
                self.reward_changed(*turn_id);
            }
            _ => {}
        }
    }

    /// The trainer: samples waiting, an update's progress, pause.
    fn on_training(&mut self, event: &Event, now_ms: i64) {
        match event {
            Event::SamplesWaiting { samples } => self.samples_waiting = *samples,
            Event::SamplesSetAside { samples, reason } => {
                self.notice(
                    Level::Info,
                    format!("Set aside {samples} sample(s), not trained on: {reason}"),
                    now_ms,
                );
            }
            Event::TrainingStarted {
                parent, samples, ..
            } => {
                self.training = Some(Progress {
                    parent: *parent,
                    done: 0,
                    samples: *samples,
                    loss: None,
                })
            }
            Event::TrainingStep {
                done,
                samples,
                loss,
                ..
            } => {
                if let Some(p) = &mut self.training {
                    p.done = *done;
                    p.samples = *samples;
                    p.loss = Some(*loss);
                }
            }
            Event::TrainingFailed { error } => {
                self.training = None;
                self.notice(Level::Error, format!("Training failed: {error}"), now_ms);
            }
            Event::TrainingPaused => {
                self.paused = true;
                self.training = None;
            }
            Event::TrainingResumed => self.paused = false,
            _ => {}
        }
    }

    /// Versions: a candidate, one going live, vetoed, rolled back to.
    fn on_versions(&mut self, event: &Event) {
        match event {
            Event::CandidateReady {
                version,
                parent,
                samples,
                loss,
                kl_base,
                kl_live,
                mean_reward,
                learning_rate,
                guard_passed,
                reasons,
            } => {
                self.training = None;
                self.versions.retain(|v| v.id != *version);
                self.versions.push(VersionView {
                    id: *version,
                    parent: *parent,
                    state: VersionState::Candidate,
                    samples: *samples,
                    loss: *loss,
                    kl_base: *kl_base,
                    kl_live: *kl_live,
                    mean_reward: *mean_reward,
                    learning_rate: *learning_rate,
                    guard_passed: *guard_passed,
                    reasons: reasons.clone(),
                });
            }
            Event::VersionLive { version, .. } => self.set_live(*version),
            Event::VersionVetoed { version } => {
                if let Some(v) = self.version_mut(*version) {
                    v.state = VersionState::Vetoed;
                }
            }
            Event::RolledBack { to, .. } => self.set_live(*to),
            _ => {}
        }
    }
    /// A new second of serving numbers.
    pub fn sampled(&mut self, now: ServingSample) {
        let before = self.serving;
        let tokens = now.tokens_out.saturating_sub(before.tokens_out);
        let micros = now.decode_micros.saturating_sub(before.decode_micros);
        self.tokens_per_sec.push_back(tokens);
        self.decode_micros.push_back(micros);
        if self.tokens_per_sec.len() > SPEED_HISTORY {
            self.tokens_per_sec.pop_front();
            self.decode_micros.pop_front();
        }
        // Tokens are counted when a reply completes, decoding time as it passes: only a
        // window of several seconds lines the two up.
        let recent = self.tokens_per_sec.len().saturating_sub(SPEED_WINDOW);
        let tokens: u64 = self.tokens_per_sec.iter().skip(recent).sum();
        let micros: u64 = self.decode_micros.iter().skip(recent).sum();
        if tokens > 0 && micros > 0 {
            self.decode_speed = Some(tokens as f64 / (micros as f64 / 1e6));
        }
        self.serving = now;
    }

    /// The candidate waiting for a decision (the newest).
    pub(crate) fn held_candidate(&self) -> Option<i64> {
        self.versions
            .iter()
            .rev()
            .find(|v| v.state == VersionState::Candidate)
            .map(|v| v.id)
    }

    /// What a plain rollback returns to: the version the live one was trained from.
    pub(crate) fn rollback_default(&self) -> Option<i64> {
        let live = self.live_version;
        (live > 0).then(|| {
            self.versions
                .iter()
                .find(|v| v.id == live)
                .map_or(0, |v| v.parent)
        })
    }
}
