//! The kinds of things the store keeps that several layers name: a turn's type and what a
//! trained sample distilled from.

use crate::config::HintSelection;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnType {
    /// User-facing and trainable.
    Main,
    /// Housekeeping (memory flushes, heartbeats): served and logged, never trained.
    Side,
}

impl TurnType {
    /// Unknown or missing values are `main` (upstream defaulted to side and trained nothing).
    pub fn parse(s: Option<&str>) -> Self {
        match s.map(|s| s.trim().to_ascii_lowercase()) {
            Some(s) if s == "side" => Self::Side,
            _ => Self::Main,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Side => "side",
        }
    }
}

/// Where a hint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HintSource {
    Judge,
    User,
}

impl HintSource {
    /// "from the judge" / "from the user", for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Judge => "from the judge",
            Self::User => "from the user",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HintCandidate {
    pub source: HintSource,
    pub text: String,
    /// Σ_t |S^q_t ∩ S^p_t| / n: how many of the student's top-K tokens this candidate's
    /// teacher keeps in its own top-K, on average over the reply (when it was scored).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub overlap: Option<f64>,
    /// Why its teacher could not be scored (e.g. the hinted context is too long).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// What a sample distilled from: every candidate, the chosen one and the rule that chose it
/// (stored with the version that trained on it; shown in the export and on the screen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HintChoice {
    pub rule: HintSelection,
    /// Index into `candidates`.
    pub chosen: usize,
    /// K of the overlap.
    pub k: usize,
    pub candidates: Vec<HintCandidate>,
}

impl HintChoice {
    pub fn chosen(&self) -> &HintCandidate {
        &self.candidates[self.chosen]
    }
}
