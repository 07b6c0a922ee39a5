//! Layered configuration: built-in defaults ← `config/default.toml` (compiled in) ← the user's
//! file in the platform config directory ← `CLAWRL__SECTION__KEY` environment variables ←
//! command-line flags (applied by the caller).

use anyhow::{Context, Result, bail};
use clawrl_model::KvDtype;
use clawrl_model::WeightMode;
use clawrl_model::device::DeviceChoice;
use directories::ProjectDirs;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub(crate) const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    pub model: ModelSection,
    pub generation: GenerationSection,
    pub server: ServerSection,
    pub engine: EngineSection,
    pub store: StoreSection,
    pub paths: PathsSection,
    pub log: LogSection,
    pub judge: JudgeSection,
    pub train: TrainSection,
    pub gate: GateSection,
    pub tui: TuiSection,
    pub serving: ServingSection,
    pub upstream: UpstreamSection,
}

/// Where user requests are generated.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServingSection {
    pub backend: ServingBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServingBackend {
    /// This process's engine.
    #[default]
    Local,
    /// vLLM or SGLang replicas (`[upstream]`): clawrl renders, captures, judges, trains and gates; the
    /// replicas generate, each version loaded into all of them.
    Upstream,
}

/// The replicas that generate when `serving.backend = "upstream"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    pub kind: UpstreamKind,
    /// Each replica's base URL (`http://gpu1:8000`); a conversation sticks to one.
    pub urls: Vec<String>,
    /// The folder of clawrl's adapters as the replicas see it (empty: the same path as here).
    pub adapter_dir: String,
    /// Versions kept loaded in every replica, the live one included (a rollback among them is
    /// a routing change).
    pub keep_loaded: usize,
    /// Sent as `Authorization: Bearer` to the replicas (vLLM's and SGLang's `--api-key`).
    pub api_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    #[default]
    Vllm,
    Sglang,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            kind: UpstreamKind::Vllm,
            urls: Vec::new(),
            adapter_dir: String::new(),
            keep_loaded: 3,
            api_key: String::new(),
        }
    }
}

/// The control center.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TuiSection {
    /// Replaces an action's keys: `approve = ["a", "ctrl-a"]` (the help lists the actions).
    pub keys: std::collections::BTreeMap<String, Vec<String>>,
}

/// Online training (PIPELINE.md §4–§5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub enabled: bool,
    pub method: Method,
    pub min_samples: usize,
    pub max_wait_secs: u64,
    pub max_samples: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<clawrl_model::Target>,
    pub learning_rate: f64,
    pub weight_decay: f32,
    pub betas: [f32; 2],
    pub max_grad_norm: f64,
    /// Updates over which the learning rate grows to `learning_rate` after the optimizer
    /// starts fresh (first update, restart, rollback).
    pub warmup_updates: usize,
    pub clip_low: f64,
    pub clip_high: f64,
    pub w_rl: f64,
    pub w_opd: f64,
    /// Subtract a batch's mean reward when it is negative (`train::loss::balanced_rewards`).
    pub balance_rewards: bool,
    /// Size each update's step by the weight of the signals it carries
    /// (`train::loss::LossConfig::step_scale`).
    pub signal_sized_steps: bool,
    pub kl_coef: f64,
    /// Weight of the unlikelihood of repeats (`train::loss::Repeats`; 0: off).
    pub unlikelihood: f64,
    pub max_staleness: i64,
    pub teacher: Teacher,
    /// Where the teacher's log-probs are computed: here, or by a replica (serving upstream,
    /// the sampled-token form only).
    pub teacher_from: TeacherFrom,
    /// The distillation term's form: over the sampling policy's top-K tokens, or the sampled one.
    pub opd: OpdForm,
    /// K of the top-K form (and of the hint selection's overlap).
    pub topk: usize,
    /// The top-K form's clip on each token's teacher − student log-prob difference (0: none).
    pub opd_clip: f64,
    /// How the top-K form weighs the tokens of S_t (`train::loss::TopkWeights`).
    pub topk_weights: TopkWeights,
    /// S_t also holds the end-of-turn tokens (`train::loss::TopK::select_with`; off by
    /// default: docs/LEARNING.md measured it worse).
    pub topk_end_of_turn: bool,
    /// Which hint candidate a sample distils from (`train::hints`).
    pub hint_selection: HintSelection,
    /// Where the chosen hint goes in the teacher's context.
    pub hint_placement: HintPlacement,
    pub max_response_tokens: usize,
    pub grad_context_tokens: usize,
    pub seed: u64,
}

/// Which signals train the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Rewards only (Binary RL).
    Rl,
    /// Hints only (on-policy distillation).
    Opd,
    /// Both, summed (the default).
    Combined,
}

/// Which form the distillation term takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpdForm {
    /// Over the sampling policy's top-K tokens at every position (PIPELINE.md §4b).
    Topk,
    /// On the sampled token alone (PIPELINE.md §4).
    Sampled,
}

/// How the top-K form weighs each token of S_t in its advantage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopkWeights {
    /// Softmax over S_t of the sampling policy's log-probs (the published rule): a token the
    /// student gives little probability gets little weight, however much the teacher wants it.
    Student,
    /// The mean of the student's and the hinted teacher's probabilities, each renormalised over
    /// S_t: a token either of them expects is moved, so the teacher can raise the end of the
    /// turn or a question where the student barely considers it.
    Mixture,
}

/// Which of a sample's hint candidates (the judge's hint, the user's next message) its
/// teacher reads (PIPELINE.md §4b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HintSelection {
    /// The one whose teacher's top-K tokens overlap the student's most over the reply (the
    /// published `sequence_optimal` rule).
    Overlap,
    /// The first: the judge's hint when there is one (before candidates, the only hint).
    First,
    /// The user's own next message when there is one.
    User,
}

/// Where the hint goes in the teacher's context (`judge::teacher::hinted_messages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HintPlacement {
    /// Before the last user message, a blank line between: the teacher reads the wish first,
    /// then the request (docs/LEARNING.md: SmolLM2 follows it more and loops less so).
    Before,
    /// After it, under a "[user's hint / instruction]" header (the published framing).
    After,
}

/// Who scores a hinted turn for distillation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Teacher {
    /// The frozen base model (upstream's choice: a stable teacher).
    Base,
    /// The live policy.
    Policy,
}

/// Where the OPD teacher's log-probs are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherFrom {
    /// This process's engine (any form, any hint selection).
    #[default]
    Local,
    /// An upstream replica's prompt log-probs (vLLM `prompt_logprobs`, SGLang
    /// `logprob_start_len`): the sampled tokens' only, so `train.opd = "sampled"`.
    Upstream,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            enabled: true,
            method: Method::Combined,
            min_samples: 4,
            max_wait_secs: 30,
            max_samples: 16,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_targets: clawrl_model::Target::ALL.to_vec(),
            learning_rate: 3e-4,
            weight_decay: 0.1,
            betas: [0.9, 0.98],
            max_grad_norm: 1.0,
            warmup_updates: 4,
            clip_low: 0.2,
            clip_high: 0.28,
            w_rl: 1.0,
            w_opd: 1.0,
            balance_rewards: true,
            signal_sized_steps: true,
            kl_coef: 0.0,
            unlikelihood: 1.0,
            max_staleness: 4,
            teacher: Teacher::Base,
            teacher_from: TeacherFrom::Local,
            opd: OpdForm::Topk,
            topk: 16,
            opd_clip: 2.0,
            topk_weights: TopkWeights::Mixture,
            topk_end_of_turn: false,
            hint_selection: HintSelection::User,
            hint_placement: HintPlacement::Before,
            max_response_tokens: 256,
            grad_context_tokens: 256,
            seed: 0,
        }
    }
}

/// Which candidates go live (PIPELINE.md §6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateSection {
    pub policy: GatePolicy,
    pub max_kl_base: f64,
    pub max_kl_live: f64,
    pub max_approved_drop: f64,
    pub probes_file: String,
    pub probe_tokens: usize,
    pub approved_answers: usize,
    /// Tokens of the candidate's own greedy reply to each probe checked for loops (0 = off).
    pub repetition_tokens: usize,
    /// How far the share of repeated token 4-grams in those replies may rise above the base
    /// model's (0.2 = twenty percentage points).
    pub max_repetition_rise: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatePolicy {
    /// A candidate that passes the guard goes live at once.
    Auto,
    /// Every candidate waits for approve or veto.
    Manual,
}

impl Default for GateSection {
    fn default() -> Self {
        Self {
            policy: GatePolicy::Auto,
            max_kl_base: 0.5,
            max_kl_live: 0.25,
            max_approved_drop: 0.5,
            probes_file: String::new(),
            probe_tokens: 32,
            approved_answers: 4,
            repetition_tokens: 96,
            max_repetition_rise: 0.2,
        }
    }
}

/// Who judges turns (PIPELINE.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeBackend {
    /// Nobody: turns are captured but not judged.
    Off,
    /// A local model: the policy's frozen base (below user requests) or `judge.model`.
    Local,
    /// Any OpenAI-compatible endpoint (`[judge.openai]`).
    Openai,
}

/// How a vote is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeMode {
    /// `direct` for the local judge, `reason` for an endpoint.
    Auto,
    /// The prompt ends in `\boxed{`; votes are drawn from the next-token probabilities.
    Direct,
    /// Each vote samples a short reasoning and a boxed score (upstream's way).
    Reason,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeSection {
    pub backend: JudgeBackend,
    /// The local judge's own model (a catalog id, GGUF file or HF directory), loaded in the
    /// same process beside the policy and run at the lowest CPU priority; empty = the policy's
    /// frozen base model. Not used by other backends.
    pub model: String,
    /// How the judge's own model holds its projection weights: `blocks` (the GGUF's quantized
    /// blocks alone: it never trains, so no dense copy), `both` or `dense`.
    pub weights: WeightMode,
    /// The judge's own model's dtype for its dense tensors (`f32` or `f16`).
    pub dtype: String,
    pub mode: JudgeMode,
    pub votes: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    pub hints: bool,
    /// In direct mode, how many of the hint votes that draw 1 write their hint (each is a
    /// generation, the costliest part of judging); the others count as votes without a text.
    pub hint_texts: usize,
    /// Direct mode: every vote is −1 when p(−1) reaches this (0: votes drawn from all three
    /// probabilities). Small judges rarely make −1 the likeliest answer to a polite correction.
    pub minus_threshold: f64,
    pub prompts_dir: String,
    pub max_field_chars: usize,
    pub openai: JudgeEndpoint,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeEndpoint {
    pub base_url: String,
    pub model: String,
    pub api_key_env: String,
    pub timeout_secs: u64,
}

impl Default for JudgeSection {
    fn default() -> Self {
        Self {
            backend: JudgeBackend::Local,
            model: "qwen2.5-coder-0.5b-instruct".into(),
            weights: WeightMode::Blocks,
            dtype: "f32".into(),
            mode: JudgeMode::Auto,
            votes: 3,
            temperature: 0.6,
            max_tokens: 256,
            hints: true,
            hint_texts: 1,
            minus_threshold: 0.25,
            prompts_dir: String::new(),
            max_field_chars: 2000,
            openai: JudgeEndpoint::default(),
        }
    }
}

impl Default for JudgeEndpoint {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080/v1".into(),
            model: String::new(),
            api_key_env: "CLAWRL_JUDGE_API_KEY".into(),
            timeout_secs: 120,
        }
    }
}

impl JudgeSection {
    /// The voting mode once `auto` is resolved; `direct` needs the local engine.
    pub(crate) fn effective_mode(&self) -> Result<JudgeMode> {
        match (self.mode, self.backend) {
            (JudgeMode::Auto, JudgeBackend::Openai) => Ok(JudgeMode::Reason),
            (JudgeMode::Auto, _) => Ok(JudgeMode::Direct),
            (JudgeMode::Direct, JudgeBackend::Openai) => bail!(
                "judge.mode = \"direct\" reads next-token probabilities from the local engine; with judge.backend = \"openai\" use mode \"reason\" (or \"auto\")"
            ),
            (m, _) => Ok(m),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    pub api_key: String,
    pub model_id: String,
    pub max_body_bytes: usize,
    pub max_active: usize,
    pub max_queue: usize,
    pub prefix_cache_mb: usize,
    pub prefix_cache_min_tokens: usize,
    pub session_idle_secs: u64,
    pub internal_context_markers: Vec<String>,
    /// Seconds a client may take to send a request's headers, and then its body.
    pub read_timeout_secs: u64,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Web origins (`https://app.example`) whose pages may call the API; `*` allows any.
    /// A request carrying any other `Origin` is refused: a web page must not be able to write
    /// into the training data.
    pub allowed_origins: Vec<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 30000,
            api_key: String::new(),
            model_id: String::new(),
            max_body_bytes: 16 << 20,
            max_active: 4,
            max_queue: 16,
            prefix_cache_mb: 192,
            prefix_cache_min_tokens: 32,
            session_idle_secs: 1800,
            internal_context_markers: vec!["<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>".into()],
            read_timeout_secs: 30,
            max_connections: 256,
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    pub path: String,
    pub default: String,
    pub device: DeviceChoice,
    pub dtype: String,
    pub weights: WeightMode,
    pub max_context: usize,
    pub kv_cache: KvDtype,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationSection {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PathsSection {
    pub data_dir: String,
}

/// How the engine divides its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// The share of the engine's time background work (the judge, the trainer, the guard) gets
    /// while user requests would keep it busy (0: only when no user request waits).
    pub background_share: f64,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            background_share: 0.2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub level: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            default: crate::catalog::DEFAULT_MODEL.into(),
            device: DeviceChoice::Auto,
            dtype: "f32".into(),
            weights: WeightMode::Both,
            max_context: 0,
            kv_cache: KvDtype::F16,
        }
    }
}
impl Default for GenerationSection {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            temperature: 0.7,
            top_p: 0.95,
            top_k: 0,
        }
    }
}
impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

fn project_dirs() -> Option<ProjectDirs> {
    ProjectDirs::from("", "clawrl", "clawrl-tui")
}

/// The user's config file: `$CLAWRL_CONFIG`, else `<platform config dir>/config.toml`.
pub fn user_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CLAWRL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    project_dirs().map(|d| d.config_dir().join("config.toml"))
}

/// Deep-merges `over` into `base` (tables merge key by key; anything else replaces).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// `CLAWRL__MODEL__DTYPE=f16` → `{model = {dtype = "f16"}}`; values parse as TOML when they can.
fn env_layer(vars: impl Iterator<Item = (String, String)>) -> toml::Value {
    let mut root = toml::Value::Table(Default::default());
    for (key, raw) in vars {
        let Some(path) = key.strip_prefix("CLAWRL__") else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let mut layer = value;
        for p in parts.iter().rev() {
            let mut t = toml::Table::new();
            t.insert(p.clone(), layer);
            layer = toml::Value::Table(t);
        }
        merge(&mut root, layer);
    }
    root
}

impl Config {
    fn validate_upstream(&self) -> Result<()> {
        if self.serving.backend != ServingBackend::Upstream {
            return Ok(());
        }
        let u = &self.upstream;
        if u.urls.is_empty() {
            bail!(
                "serving.backend = \"upstream\" needs upstream.urls (each replica's base URL, e.g. http://gpu1:8000)"
            );
        }
        for url in &u.urls {
            crate::http_client::Target::parse(url, "upstream.urls:")?;
        }
        if u.keep_loaded == 0 {
            bail!("upstream.keep_loaded must be at least 1 (the live version)");
        }
        Ok(())
    }

    /// The model file the configuration names (`model.path`, else the default catalog model).
    pub fn model_path(&self) -> Result<PathBuf> {
        let spec = if self.model.path.is_empty() {
            &self.model.default
        } else {
            &self.model.path
        };
        crate::catalog::resolve(spec, &self.data_dir())
    }

    /// How the policy's model is loaded (device, dtype, weights, context, KV cache).
    pub(crate) fn load_options(&self) -> Result<clawrl_model::LoadOptions> {
        Ok(clawrl_model::LoadOptions {
            device: clawrl_model::device::select(self.model.device)?,
            dtype: clawrl_model::device::parse_dtype(&self.model.dtype)?,
            weights: self.model.weights,
            max_context: self.model.max_context,
            kv_cache: self.model.kv_cache,
        })
    }

    /// Loads every layer except the command line. `file` replaces the user config path.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut value = toml::Value::try_from(Config::default())?;
        merge(
            &mut value,
            toml::from_str(DEFAULT_TOML).context("built-in config/default.toml")?,
        );
        let user = file.map(Path::to_path_buf).or_else(user_config_path);
        if let Some(path) = user.filter(|p| p.exists() || file.is_some()) {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let layer: toml::Value = toml::from_str(&text)
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            merge(&mut value, layer);
        }
        merge(&mut value, env_layer(std::env::vars()));
        let cfg: Config = value
            .try_into()
            .context("invalid configuration (config file or CLAWRL__* variables)")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        clawrl_model::device::parse_dtype(&self.model.dtype)?;
        clawrl_model::device::parse_dtype(&self.judge.dtype)
            .map_err(|e| anyhow::anyhow!("judge.dtype: {e:#}"))?;
        self.validate_upstream()?;
        let g = &self.generation;
        if !(0.0..=2.0).contains(&g.temperature) {
            bail!(
                "generation.temperature must be within 0..=2, got {}",
                g.temperature
            );
        }
        if !(0.0..=1.0).contains(&g.top_p) || g.top_p == 0.0 {
            bail!("generation.top_p must be within (0, 1], got {}", g.top_p);
        }
        let s = &self.server;
        if s.read_timeout_secs == 0 || s.max_connections == 0 {
            bail!("server.read_timeout_secs and server.max_connections must be at least 1");
        }
        let j = &self.judge;
        if j.votes == 0 || j.votes > 16 {
            bail!("judge.votes must be within 1..=16, got {}", j.votes);
        }
        if j.hint_texts == 0 || j.hint_texts > j.votes {
            bail!(
                "judge.hint_texts must be within 1..=judge.votes ({}), got {}",
                j.votes,
                j.hint_texts
            );
        }
        if !(0.0..=2.0).contains(&j.temperature) {
            bail!(
                "judge.temperature must be within 0..=2, got {}",
                j.temperature
            );
        }
        if j.backend == JudgeBackend::Openai && j.openai.model.is_empty() {
            bail!(
                "judge.backend = \"openai\" needs judge.openai.model (the model id the endpoint serves)"
            );
        }
        j.effective_mode()?;
        let t = &self.train;
        self.lora()
            .validate()
            .map_err(|e| anyhow::anyhow!("train.lora_*: {e}"))?;
        if t.min_samples == 0 || t.max_samples < t.min_samples {
            bail!(
                "train.min_samples must be at least 1 and at most train.max_samples ({}), got {}",
                t.max_samples,
                t.min_samples
            );
        }
        if !(t.learning_rate > 0.0 && t.learning_rate < 1.0) {
            bail!(
                "train.learning_rate must be within (0, 1), got {}",
                t.learning_rate
            );
        }
        if !(0.0..1.0).contains(&t.clip_low) || t.clip_high <= 0.0 {
            bail!(
                "train.clip_low must be within [0, 1) and train.clip_high positive, got {} and {}",
                t.clip_low,
                t.clip_high
            );
        }
        if !(0.0..1.0).contains(&j.minus_threshold) {
            bail!(
                "judge.minus_threshold must be within [0, 1) (0: off), got {}",
                j.minus_threshold
            );
        }
        let share = self.engine.background_share;
        if !(0.0..=0.5).contains(&share) {
            bail!("engine.background_share must be within [0, 0.5], got {share}");
        }
        if !(1..=256).contains(&t.topk) {
            bail!("train.topk must be within 1..=256, got {}", t.topk);
        }
        if !(t.opd_clip >= 0.0) {
            bail!(
                "train.opd_clip must be a non-negative number (0: no clip), got {}",
                t.opd_clip
            );
        }
        if t.teacher_from == TeacherFrom::Upstream {
            if self.serving.backend != ServingBackend::Upstream {
                bail!(
                    "train.teacher_from = \"upstream\" needs serving.backend = \"upstream\" (replicas to score on)"
                );
            }
            if t.opd != OpdForm::Sampled || t.hint_selection == HintSelection::Overlap {
                bail!(
                    "train.teacher_from = \"upstream\" needs train.opd = \"sampled\" and train.hint_selection \"user\" or \"first\": the top-K form and the overlap selection need the teacher's whole distribution at the student's top-K tokens, which a replica's prompt log-probs do not give"
                );
            }
        }
        if t.max_response_tokens == 0 || t.grad_context_tokens == 0 {
            bail!("train.max_response_tokens and train.grad_context_tokens must be at least 1");
        }
        if t.enabled && self.model.weights == WeightMode::Blocks {
            bail!(
                "training needs dense weights: set model.weights = \"both\" or \"dense\" (or train.enabled = false to serve from the quantized blocks alone)"
            );
        }
        let g = &self.gate;
        for (k, v) in [
            ("gate.max_kl_base", g.max_kl_base),
            ("gate.max_kl_live", g.max_kl_live),
            ("gate.max_approved_drop", g.max_approved_drop),
            ("gate.max_repetition_rise", g.max_repetition_rise),
        ] {
            if !(v >= 0.0) {
                bail!("{k} must be a non-negative number, got {v}");
            }
        }
        if g.probe_tokens == 0 {
            bail!("gate.probe_tokens must be at least 1");
        }
        Ok(())
    }

    /// Where models and logs live: `$CLAWRL_DATA_DIR`, `paths.data_dir`, or the platform's.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(p) = std::env::var_os("CLAWRL_DATA_DIR").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        if !self.paths.data_dir.is_empty() {
            return PathBuf::from(&self.paths.data_dir);
        }
        project_dirs()
            .map(|d| d.data_dir().to_path_buf())
            .unwrap_or_else(|| PathBuf::from(".clawrl"))
    }

    pub fn store_path(&self) -> PathBuf {
        if self.store.path.is_empty() {
            self.data_dir().join("clawrl.sqlite")
        } else {
            PathBuf::from(&self.store.path)
        }
    }

    /// The LoRA settings of new adapters.
    pub fn lora(&self) -> clawrl_model::LoraConfig {
        clawrl_model::LoraConfig {
            rank: self.train.lora_rank,
            alpha: self.train.lora_alpha,
            targets: self.train.lora_targets.clone(),
        }
    }

    /// Where adapter versions are written (one PEFT folder each).
    pub(crate) fn adapters_dir(&self) -> PathBuf {
        self.data_dir().join("adapters")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.data_dir().join("logs")
    }

    /// Where the decode kernels' prefetch distance, measured once per CPU, is kept.
    pub fn prefetch_calibration_path(&self) -> PathBuf {
        self.data_dir().join("prefetch-calibration.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_layer_builds_nested_tables_and_typed_values() {
        let v = env_layer(
            [
                ("CLAWRL__MODEL__DTYPE".to_string(), "f16".to_string()),
                ("CLAWRL__GENERATION__TOP_K".into(), "40".into()),
                ("OTHER".into(), "x".into()),
            ]
            .into_iter(),
        );
        assert_eq!(v["model"]["dtype"].as_str(), Some("f16"));
        assert_eq!(v["generation"]["top_k"].as_integer(), Some(40));
        assert!(v.get("other").is_none());
    }

    #[test]
    fn layers_override_in_order() {
        let mut base = toml::Value::try_from(Config::default()).unwrap();
        merge(&mut base, toml::from_str(DEFAULT_TOML).unwrap());
        merge(
            &mut base,
            toml::from_str("[generation]\ntemperature = 0.2\n").unwrap(),
        );
        merge(
            &mut base,
            env_layer([("CLAWRL__GENERATION__TOP_P".to_string(), "0.5".to_string())].into_iter()),
        );
        let cfg: Config = base.try_into().unwrap();
        assert_eq!(cfg.generation.temperature, 0.2);
        assert_eq!(cfg.generation.top_p, 0.5);
        assert_eq!(
            cfg.generation.max_tokens, 512,
            "untouched keys keep the default"
        );
    }

    #[test]
    fn default_toml_matches_builtin_defaults() {
        let parsed: Config = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let err = toml::from_str::<Config>("[model]\ndtyp = \"f16\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dtyp"), "{err}");
        let mut cfg = Config::default();
        cfg.model.dtype = "f8".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("f8"));
    }

    #[test]
    fn a_teacher_from_the_replicas_needs_replicas_and_the_sampled_token_form() {
        let mut cfg = Config::default();
        cfg.train.teacher_from = TeacherFrom::Upstream;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("serving.backend"), "{err}");
        cfg.serving.backend = ServingBackend::Upstream;
        cfg.upstream.urls = vec!["http://gpu1:8000".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("train.opd = \"sampled\""), "{err}");
        cfg.train.opd = OpdForm::Sampled;
        cfg.validate().unwrap();
        cfg.train.hint_selection = HintSelection::Overlap;
        assert!(cfg.validate().is_err());
    }
}
