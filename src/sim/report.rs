//! The numbers of a run: proportions with a confidence interval, the interaction log as CSV,
//! and the report text.

use crate::telemetry::moving_average;
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
    crate::gate::guard::repeated_ngram_share(&words, 3)
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
