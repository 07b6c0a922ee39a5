//! The numbers of a run: proportions with a confidence interval, the interaction log as CSV,
//! and the report text.

use clawrl_core::telemetry::moving_average;
use std::collections::HashMap;
use std::fmt::Write as _;

/// A proportion k/n with its 95 % Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Proportion {
    pub k: usize,
    pub n: usize,
}

impl Proportion {
    pub fn rate(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.k as f64 / self.n as f64
        }
    }

    /// The 95 % Wilson score interval (sound for small n and for 0 or n successes).
    pub fn wilson(&self) -> (f64, f64) {
        if self.n == 0 {
            return (0.0, 1.0);
        }
        let z = 1.959_964f64;
        let n = self.n as f64;
        let p = self.rate();
        let denom = 1.0 + z * z / n;
        let centre = (p + z * z / (2.0 * n)) / denom;
        let half = z * ((p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt()) / denom;
        ((centre - half).max(0.0), (centre + half).min(1.0))
    }

    pub fn describe(&self) -> String {
        let (lo, hi) = self.wilson();
        format!(
            "{}/{} ({:.0} %, 95 % CI {:.0}–{:.0} %)",
            self.k,
            self.n,
            self.rate() * 100.0,
            lo * 100.0,
            hi * 100.0
        )
    }
}

/// The share of word trigrams that repeat an earlier one in the same reply, over `replies`: a
/// rule-independent sign that text degenerates into loops (SmolLM2-135M's base rate on the
/// held-out set is about 12 %).
pub fn repeated_trigrams<'a>(replies: impl IntoIterator<Item = &'a str>) -> f64 {
    let words: Vec<Vec<String>> = replies
        .into_iter()
        .map(|r| {
            r.split(|c: char| !(c.is_alphanumeric() || c == '\''))
                .filter(|w| !w.is_empty())
                .map(str::to_lowercase)
                .collect()
        })
        .collect();
    clawrl_core::gate::guard::repeated_ngram_share(&words, 3)
}

/// How the judge did on the run's main turns, against the simulated user's own verdicts (its
/// rule: what its thumbs say when it sends them, and still known when it does not).
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeSummary {
    pub model: String,
    pub judged: usize,
    pub mean_secs: f64,
    /// Judged turns of the user's, and those where the judge's score equals its verdict.
    pub rated: usize,
    pub agreed: usize,
    /// Replies the user disliked, and those the judge scored −1.
    pub rated_down: usize,
    pub down_and_minus: usize,
    pub hints: usize,
}

impl JudgeSummary {
    /// From `clawrl-tui export` records (side turns are never judged) and the user's verdict
    /// on each of its replies, by response id.
    pub fn from_export(
        records: &[serde_json::Value],
        verdicts: &HashMap<String, bool>,
    ) -> Option<Self> {
        let judged: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| r["judgment"].is_object() && r["judgment"]["error"].is_null())
            .collect();
        let first = judged.first()?;
        let score = |r: &serde_json::Value| r["judgment"]["score"].as_i64();
        let rating = |r: &serde_json::Value| {
            let satisfied = verdicts.get(r["response_id"].as_str()?)?;
            Some(if *satisfied { 1 } else { -1 })
        };
        let rated: Vec<_> = judged.iter().filter(|r| rating(r).is_some()).collect();
        let down: Vec<_> = rated.iter().filter(|r| rating(r) == Some(-1)).collect();
        Some(Self {
            model: first["judgment"]["judge_model"]
                .as_str()
                .unwrap_or("?")
                .into(),
            judged: judged.len(),
            mean_secs: judged
                .iter()
                .map(|r| r["judgment"]["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0)
                .sum::<f64>()
                / judged.len() as f64,
            rated: rated.len(),
            agreed: rated.iter().filter(|r| score(r) == rating(r)).count(),
            rated_down: down.len(),
            down_and_minus: down.iter().filter(|r| score(r) == Some(-1)).count(),
            hints: judged
                .iter()
                .filter(|r| r["judgment"]["hint"].is_string())
                .count(),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} judged {} turns, {:.1} s a turn; agreed with the user on {}/{}, scored −1 on {} of the {} replies it disliked; {} hints",
            self.model,
            self.judged,
            self.mean_secs,
            self.agreed,
            self.rated,
            self.down_and_minus,
            self.rated_down,
            self.hints
        )
    }
}

/// One interaction of the simulated user.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub index: usize,
    pub prompt: String,
    pub satisfied: bool,
    pub words: usize,
    /// The version live after the interaction.
    pub live_version: i64,
    pub seconds: f64,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The interactions as CSV, with the reward (+1 satisfied, -1 not) and its moving average.
pub fn csv(rows: &[Interaction], window: usize) -> String {
    let mut out =
        String::from("interaction,reward,moving_average,words,live_version,seconds,prompt\n");
    let rewards: Vec<f64> = rows
        .iter()
        .map(|r| if r.satisfied { 1.0 } else { -1.0 })
        .collect();
    let averages = moving_average(&rewards, window);
    for ((r, reward), avg) in rows.iter().zip(&rewards).zip(averages) {
        let _ = writeln!(
            out,
            "{},{reward},{avg:.3},{},{},{:.1},{}",
            r.index,
            r.words,
            r.live_version,
            r.seconds,
            csv_field(&r.prompt)
        );
    }
    out
}

/// Reads back what [`csv`] wrote (the prompt is not needed for plots and is left empty).
pub fn parse_csv(text: &str) -> anyhow::Result<Vec<Interaction>> {
    text.lines()
        .skip(1)
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.splitn(7, ',').collect();
            let bad = || anyhow::anyhow!("interactions.csv line {}: {line:?}", i + 2);
            if f.len() < 6 {
                return Err(bad());
            }
            Ok(Interaction {
                index: f[0].parse().map_err(|_| bad())?,
                prompt: String::new(),
                satisfied: f[1] == "1",
                words: f[3].parse().map_err(|_| bad())?,
                live_version: f[4].parse().map_err(|_| bad())?,
                seconds: f[5].parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_intervals_match_the_textbook_values() {
        // 3/20: 5.2 %–36.0 % (Wilson, z = 1.96).
        let (lo, hi) = Proportion { k: 3, n: 20 }.wilson();
        assert!(
            (lo - 0.0524).abs() < 1e-3 && (hi - 0.3604).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo, hi) = Proportion { k: 0, n: 10 }.wilson();
        assert!(lo == 0.0 && (hi - 0.2775).abs() < 1e-3, "{hi}");
        assert!(
            Proportion { k: 3, n: 20 }
                .describe()
                .starts_with("3/20 (15 %, 95 % CI 5–36 %)")
        );
    }

    #[test]
    fn the_judge_summary_compares_scores_with_the_users_verdicts() {
        use serde_json::json;
        let turn = |id: &str, score: i64, hint: Option<&str>| {
            json!({
                "response_id": id,
                "judgment": {"judge_model": "Qwen", "score": score, "hint": hint, "error": null, "elapsed_ms": 2000},
            })
        };
        let records = [
            turn("a", 1, None),
            turn("b", -1, Some("No lists.")),
            turn("c", 1, None),
            // A turn that is not one of the user's (a side turn of another client).
            turn("d", 0, None),
            json!({"response_id": "e", "judgment": null}),
        ];
        let verdicts: HashMap<String, bool> =
            [("a", true), ("b", false), ("c", false), ("e", true)]
                .into_iter()
                .map(|(id, v)| (id.to_string(), v))
                .collect();
        let s = JudgeSummary::from_export(&records, &verdicts).unwrap();
        assert_eq!(
            (
                s.judged,
                s.rated,
                s.agreed,
                s.rated_down,
                s.down_and_minus,
                s.hints
            ),
            (4, 3, 2, 2, 1, 1)
        );
        assert!((s.mean_secs - 2.0).abs() < 1e-9);
        assert!(
            s.describe().contains("agreed with the user on 2/3"),
            "{}",
            s.describe()
        );
        assert!(JudgeSummary::from_export(&records[4..], &verdicts).is_none());
    }

    #[test]
    fn repeated_trigrams_count_loops_within_a_reply() {
        assert_eq!(repeated_trigrams(["a b c d"]), 0.0);
        // "a b c" three times: 7 trigrams, 3 distinct -> 4 repeats.
        let r = repeated_trigrams(["a b c a b c a b c"]);
        assert!((r - 4.0 / 7.0).abs() < 1e-9, "{r}");
        // Not across replies.
        assert_eq!(repeated_trigrams(["a b c", "a b c"]), 0.0);
    }

    #[test]
    fn the_csv_quotes_prompts_and_averages_rewards() {
        let row = |i, ok| Interaction {
            index: i,
            prompt: "Hi, \"you\"".into(),
            satisfied: ok,
            words: 3,
            live_version: 1,
            seconds: 2.0,
        };
        let csv = csv(&[row(1, false), row(2, true)], 10);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[1], "1,-1,-1.000,3,1,2.0,\"Hi, \"\"you\"\"\"");
        assert_eq!(lines[2], "2,1,0.000,3,1,2.0,\"Hi, \"\"you\"\"\"");
        let back = parse_csv(&csv).unwrap();
        assert_eq!(
            (back[0].satisfied, back[1].satisfied, back[1].live_version),
            (false, true, 1)
        );
        assert!(parse_csv("header\n1,x").is_err());
    }
}
