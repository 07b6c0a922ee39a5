//! From judge texts to a score and a hint (PIPELINE.md §2–3): the last `\boxed{}` of a vote
//! counts, the majority of valid votes wins, a tie for the top count scores 0, and the longest
//! hint of a `\boxed{1}` hint vote is kept.

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// The score of the last `\boxed{...}` in `text`: `Some(-1 | 0 | 1)`, or `None` when there is
/// no boxed value or the last one is anything else (an invalid vote).
pub(crate) fn parse_score(text: &str) -> Option<i8> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let end = text[start..].find('}')? + start;
    match text[start..end].trim() {
        "1" | "+1" => Some(1),
        "0" => Some(0),
        "-1" => Some(-1),
        _ => None,
    }
}

/// The majority of the valid votes; a tie for the top count, or no valid vote, gives 0.
pub fn majority(votes: &[Option<i8>]) -> i8 {
    let count = |s: i8| votes.iter().filter(|v| **v == Some(s)).count();
    let counts = [(1, count(1)), (0, count(0)), (-1, count(-1))];
    let top = counts.iter().map(|c| c.1).max().unwrap_or(0);
    let leaders: Vec<i8> = counts
        .iter()
        .filter(|c| c.1 == top && top > 0)
        .map(|c| c.0)
        .collect();
    match leaders.as_slice() {
        [only] => *only,
        _ => 0,
    }
}

/// The text between `[HINT_START]` and `[HINT_END]` (the last such pair), trimmed.
pub(crate) fn extract_hint(text: &str) -> Option<String> {
    let start = text.rfind("[HINT_START]")? + "[HINT_START]".len();
    let end = text[start..].find("[HINT_END]")? + start;
    let hint = text[start..end].trim();
    (!hint.is_empty()).then(|| hint.to_string())
}

/// How a direct-mode hint vote begins: the score, then the hint's opening marker.
pub(crate) const HINT_PREFIX: &str = "\\boxed{1}\n[HINT_START]";
pub const HINT_END: &str = "[HINT_END]";
/// Tokens a direct-mode hint may take (1 to 3 sentences).
pub(crate) const HINT_MAX_TOKENS: usize = 96;

/// Hints shorter than this carry no usable information.
pub(crate) const MIN_HINT_CHARS: usize = 10;

/// The hint of a hint vote, when it counts: the vote says `\boxed{1}` and its hint is longer
/// than [`MIN_HINT_CHARS`].
pub fn usable_hint(text: &str) -> Option<String> {
    if parse_score(text) != Some(1) {
        return None;
    }
    extract_hint(text).filter(|h| h.chars().count() > MIN_HINT_CHARS)
}

/// Lowercase words of letters and digits.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether `hint` merely restates `reply`: at least half of its word pairs occur in the reply
/// (a copy), or at least three quarters of its longer words do (a rewrite of the same content).
/// Small judges write such hints on most corrections (issue 25: Qwen2.5-Coder-0.5B on 15 of
/// 15), and a teacher reading one prefers the very reply the user refused, so distilling from
/// it trains toward what the user asked to change.
pub fn restates(hint: &str, reply: &str) -> bool {
    let (h, r) = (words(hint), words(reply));
    let reply_pairs: std::collections::HashSet<(&str, &str)> = r
        .windows(2)
        .map(|w| (w[0].as_str(), w[1].as_str()))
        .collect();
    let pairs: Vec<(&str, &str)> = h
        .windows(2)
        .map(|w| (w[0].as_str(), w[1].as_str()))
        .collect();
    let copied = pairs.iter().filter(|p| reply_pairs.contains(p)).count();
    if !pairs.is_empty() && copied * 2 >= pairs.len() {
        return true;
    }
    let reply_words: std::collections::HashSet<&str> = r.iter().map(String::as_str).collect();
    let long: Vec<&str> = h
        .iter()
        .map(String::as_str)
        .filter(|w| w.chars().count() >= 4)
        .collect();
    let shared = long.iter().filter(|w| reply_words.contains(*w)).count();
    long.len() >= 4 && shared * 4 >= long.len() * 3
}

/// The longest usable hint among the votes (the first of equally long ones) that does not
/// merely restate `reply` ([`restates`]).
pub(crate) fn best_hint(votes: &[String], reply: &str) -> Option<String> {
    votes
        .iter()
        .filter_map(|v| usable_hint(v))
        .filter(|h| !restates(h, reply))
        .fold(None, |best: Option<String>, h| match best {
            Some(b) if b.chars().count() >= h.chars().count() => Some(b),
            _ => Some(h),
        })
}

/// The scores the direct mode reads, in the order their probabilities are given.
pub(crate) const DIRECT_OPTIONS: [i8; 3] = [1, 0, -1];

/// The probabilities of `1`, `0`, `-1` renormalized over the three (from log-probabilities).
pub(crate) fn option_probs(logprobs: &[f32; 3]) -> [f64; 3] {
    let max = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return [1.0 / 3.0; 3];
    }
    let e = logprobs.map(|l| (l as f64 - max).exp());
    let sum: f64 = e.iter().sum();
    e.map(|x| x / sum)
}

/// Direct-mode votes with a calibrated threshold on p(−1) (`judge.minus_threshold`): all −1
/// once p(−1) reaches `minus_threshold`, else drawn from p(+1) and p(0) alone; with a
/// threshold of 0, [`draw_votes`] from all three.
pub(crate) fn calibrated_votes(
    probs: &[f64; 3],
    m: usize,
    temperature: f32,
    seed: u64,
    minus_threshold: f64,
) -> Vec<i8> {
    if minus_threshold <= 0.0 {
        return draw_votes(probs, m, temperature, seed);
    }
    if probs[2] >= minus_threshold {
        return vec![-1; m];
    }
    draw_votes(&[probs[0], probs[1], 0.0], m, temperature, seed)
}

/// `m` votes drawn from the direct-mode probabilities, tempered by `temperature` (0 = the most
/// likely score every time), reproducibly from `seed`.
pub(crate) fn draw_votes(probs: &[f64; 3], m: usize, temperature: f32, seed: u64) -> Vec<i8> {
    let best = (0..3)
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
        .unwrap_or(1);
    if temperature <= 0.0 {
        return vec![DIRECT_OPTIONS[best]; m];
    }
    let w = probs.map(|p| p.max(1e-12).powf(1.0 / temperature as f64));
    let sum: f64 = w.iter().sum();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..m)
        .map(|_| {
            let mut x = rng.random::<f64>() * sum;
            for (i, wi) in w.iter().enumerate() {
                if x < *wi {
                    return DIRECT_OPTIONS[i];
                }
                x -= wi;
            }
            DIRECT_OPTIONS[2]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_boxed_value_is_the_vote() {
        assert_eq!(
            parse_score("first \\boxed{-1}, on reflection \\boxed{1}"),
            Some(1)
        );
        assert_eq!(parse_score("\\boxed{ -1 }"), Some(-1));
        assert_eq!(parse_score("so \\boxed{0}."), Some(0));
        assert_eq!(parse_score("\\boxed{+1}"), Some(1));
    }

    #[test]
    fn anything_else_is_an_invalid_vote() {
        assert_eq!(parse_score("no box here: 1"), None);
        assert_eq!(parse_score("\\boxed{2}"), None);
        assert_eq!(parse_score("\\boxed{yes}"), None);
        assert_eq!(
            parse_score("\\boxed{1} then \\boxed{maybe}"),
            None,
            "the last box counts"
        );
        assert_eq!(parse_score("\\boxed{1"), None, "unterminated");
        assert_eq!(parse_score(""), None);
    }

    #[test]
    fn majority_drops_invalid_votes_and_ties_score_zero() {
        assert_eq!(majority(&[Some(1), Some(1), Some(-1)]), 1);
        assert_eq!(
            majority(&[Some(-1), None, None]),
            -1,
            "invalid votes are dropped"
        );
        assert_eq!(majority(&[Some(1), Some(-1), None]), 0, "a tie scores 0");
        assert_eq!(
            majority(&[Some(1), Some(-1), Some(0)]),
            0,
            "a three-way tie scores 0"
        );
        assert_eq!(majority(&[Some(0), Some(0), Some(1)]), 0);
        assert_eq!(majority(&[None, None, None]), 0, "no valid vote scores 0");
        assert_eq!(majority(&[]), 0);
    }

    #[test]
    fn hints_need_a_positive_vote_and_more_than_ten_characters() {
        let long = "\\boxed{1} [HINT_START]Use metric units, the user is in Europe.[HINT_END]";
        let longer = "\\boxed{1}\n[HINT_START]The user wants metric units and short answers without lists.[HINT_END]";
        let negative = "\\boxed{-1} [HINT_START]A long hint that must not count at all.[HINT_END]";
        let short = "\\boxed{1} [HINT_START]Be brief.[HINT_END]";
        let unterminated = "\\boxed{1} [HINT_START]Something long enough but never closed";
        assert_eq!(extract_hint(short).as_deref(), Some("Be brief."));
        assert_eq!(usable_hint(short), None, "10 characters or fewer");
        assert_eq!(usable_hint(negative), None);
        assert_eq!(usable_hint(unterminated), None);
        let votes: Vec<String> = [long, negative, longer, short]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            best_hint(&votes, "5 miles is 8 km.").as_deref(),
            Some("The user wants metric units and short answers without lists.")
        );
        assert_eq!(best_hint(&votes[1..2], ""), None);
        // A hint that restates the reply is no hint.
        let reply = "The user wants short answers without lists.";
        assert_eq!(
            best_hint(&votes, reply).as_deref(),
            Some("Use metric units, the user is in Europe.")
        );
    }

    #[test]
    fn a_copy_or_rewrite_of_the_reply_restates_it_and_a_wish_does_not() {
        // Hints of Qwen2.5-Coder-0.5B on corrections (issue 25), and wishes.
        let reply = "Cats – they're the most versatile pets on the planet! They are independent, \
            clean, and affectionate. Here's why: 1. Cats groom themselves. 2. They adapt to small flats.";
        assert!(restates(
            "Cats – they're the most versatile pets on the planet…",
            reply
        ));
        let packing = "Packing for a weekend hike: 1. A lightweight tent that is waterproof. \
            2. A warm sleeping bag. 3. Water bottles and a filter. 4. Snacks and a first aid kit.";
        assert!(restates(
            "Pack a lightweight waterproof tent, a warm sleeping bag, water bottles and snacks.",
            packing
        ));
        for wish in [
            "Answer in under 20 words.",
            "Keep it to three items and skip the explanations.",
            "The user wants plain sentences without lists or bold text.",
            "End the reply with a question to the user.",
            "Pack only three things: a tent, water and a map.",
        ] {
            assert!(!restates(wish, packing), "{wish}");
            assert!(!restates(wish, reply), "{wish}");
        }
        assert!(!restates("", reply));
    }

    #[test]
    fn direct_votes_follow_the_option_probabilities() {
        let p = option_probs(&[(0.7f32).ln(), (0.2f32).ln(), (0.05f32).ln()]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((p[0] - 0.7 / 0.95).abs() < 1e-6, "{p:?}");
        assert_eq!(
            draw_votes(&p, 3, 0.0, 7),
            vec![1, 1, 1],
            "temperature 0 is greedy"
        );
        let votes = draw_votes(&p, 20_000, 1.0, 7);
        let share = |s: i8| votes.iter().filter(|v| **v == s).count() as f64 / 20_000.0;
        assert!((share(1) - p[0]).abs() < 0.02, "{}", share(1));
        assert!((share(-1) - p[2]).abs() < 0.02, "{}", share(-1));
        assert_eq!(
            draw_votes(&p, 5, 0.6, 42),
            draw_votes(&p, 5, 0.6, 42),
            "seeded"
        );
        assert_eq!(option_probs(&[f32::NEG_INFINITY; 3]), [1.0 / 3.0; 3]);
    }

    #[test]
    fn a_calibrated_threshold_makes_a_likely_enough_minus_one_unanimous() {
        let p = [0.55, 0.15, 0.30];
        assert_eq!(calibrated_votes(&p, 3, 0.6, 1, 0.25), vec![-1, -1, -1]);
        // Below it, −1 is never drawn, whatever the seed.
        let p = [0.60, 0.20, 0.20];
        for seed in 0..50 {
            assert!(!calibrated_votes(&p, 3, 1.0, seed, 0.25).contains(&-1));
        }
        // Off: the plain draw.
        assert_eq!(
            calibrated_votes(&p, 5, 0.6, 9, 0.0),
            draw_votes(&p, 5, 0.6, 9)
        );
    }
}
