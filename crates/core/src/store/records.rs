//! The kinds of things the store keeps that several layers name: a turn's type and what a
//! trained sample distilled from.

use crate::config::{HintPlacement, HintSelection};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnType {
    /// User-facing and trainable.
    #[default]
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

impl rusqlite::types::ToSql for TurnType {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for TurnType {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Ok(Self::parse(Some(v.as_str()?)))
    }
}

/// The reward a turn trains with: the latest human rating, else the judge's score when it
/// is not 0 (a tie is no reward). The one rule: the trainer's samples and the screen's chart
/// both take it from here.
pub fn reward(rating: Option<i8>, judge_score: Option<i8>) -> Option<i8> {
    rating.or(judge_score.filter(|&s| s != 0))
}

/// Where a version stands (`versions.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Trained and guarded, waiting for a decision (or the auto policy).
    Candidate,
    /// Serving new requests.
    Live,
    /// Refused for good: never served.
    Vetoed,
    /// Live before, replaced since (a rollback can serve it again).
    Retired,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Candidate => "candidate",
            Self::Live => "live",
            Self::Vetoed => "vetoed",
            Self::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Candidate, Self::Live, Self::Vetoed, Self::Retired]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for VersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl rusqlite::types::FromSql for VersionState {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = v.as_str()?;
        Self::parse(s).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(format!("unknown version state {s:?}").into())
        })
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
    /// The upstream replica that computed its teacher's log-probs (`None`: this process).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scored_by: Option<String>,
}

/// What a sample distilled from: every candidate, the chosen one and the rule that chose it
/// (stored with the version that trained on it; shown in the export and on the screen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HintChoice {
    pub rule: HintSelection,
    /// Where the teacher read the chosen hint (records from before the setting: after).
    #[serde(default = "placed_after")]
    pub placement: HintPlacement,
    /// Index into `candidates`.
    pub chosen: usize,
    /// K of the overlap.
    pub k: usize,
    pub candidates: Vec<HintCandidate>,
}

fn placed_after() -> HintPlacement {
    HintPlacement::After
}

impl HintChoice {
    pub fn chosen(&self) -> &HintCandidate {
        &self.candidates[self.chosen]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_choice_stored_before_the_placement_setting_reads_as_after() {
        let old = r#"{"rule":"user","chosen":0,"k":16,"candidates":[{"source":"user","text":"Shorter."}]}"#;
        let choice: HintChoice = serde_json::from_str(old).unwrap();
        assert_eq!(choice.placement, HintPlacement::After);
        assert_eq!(choice.chosen().text, "Shorter.");
        let new = HintChoice {
            placement: HintPlacement::Before,
            ..choice
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""placement":"before""#), "{json}");
        assert_eq!(serde_json::from_str::<HintChoice>(&json).unwrap(), new);
    }
}
