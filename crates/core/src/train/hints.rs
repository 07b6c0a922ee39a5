//! A sample's hint candidates and which one its teacher reads (PIPELINE.md §4b).
//!
//! Candidates: the judge's hint (the judge has already dropped one that merely restates the
//! reply) and, when the reply was not approved and the next state is the user's message, that
//! message itself: "Shorter please." is the clearest hint there is, and at small model sizes
//! the judge's hints restate the reply instead (measured: issue 25). A reply the user approved
//! gets no user candidate: their next message is then a new request, and a teacher reading it
//! would pull the reply toward answering a question that had not been asked.
//!
//! The trainer scores each candidate's teacher and keeps, by `train.hint_selection`, the one
//! whose top-K tokens overlap the student's most over the reply (`overlap`, the published
//! `sequence_optimal` rule), the first (`first`: the judge's), or the user's (`user`).

use crate::config::HintSelection;
use clawrl_model::messages::{Message, Role};

pub use crate::store::{HintCandidate, HintChoice, HintSource};

/// A sample's candidates, the judge's first. `reward` is the turn's (its rating, else the
/// judge's score); `markers` flag client-internal context, which is never a hint.
pub fn candidates(
    judge_hint: Option<&str>,
    next_state: &[Message],
    next_state_role: Option<&str>,
    reward: Option<i8>,
    markers: &[String],
) -> Vec<HintCandidate> {
    let mut out = Vec::new();
    let mut push = |source, text: &str| {
        let text = text.trim();
        if !text.is_empty() && !out.iter().any(|c: &HintCandidate| c.text == text) {
            out.push(HintCandidate {
                source,
                text: text.to_string(),
                overlap: None,
                error: None,
                scored_by: None,
            });
        }
    };
    if let Some(h) = judge_hint {
        push(HintSource::Judge, h);
    }
    if next_state_role == Some("user") && reward.is_none_or(|r| r <= 0) {
        let said: Vec<String> = next_state
            .iter()
            .filter(|m| m.role == Role::User)
            .map(Message::text)
            .filter(|t| {
                !markers
                    .iter()
                    .any(|k| !k.is_empty() && t.contains(k.as_str()))
            })
            .collect();
        push(HintSource::User, &said.join("\n\n"));
    }
    out
}

/// The candidate `rule` picks without scoring (`first`, `user`), or `None` when it needs the
/// overlaps (`overlap` with several candidates).
pub(crate) fn pick_unscored(rule: HintSelection, candidates: &[HintCandidate]) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    match rule {
        HintSelection::First => Some(0),
        HintSelection::User => Some(
            candidates
                .iter()
                .position(|c| c.source == HintSource::User)
                .unwrap_or(0),
        ),
        HintSelection::Overlap if candidates.len() == 1 => Some(0),
        HintSelection::Overlap => None,
    }
}

/// The scored candidate with the largest overlap (the first of equal ones); `None` when none
/// could be scored.
pub(crate) fn pick_by_overlap(candidates: &[HintCandidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.overlap.map(|o| (i, o)))
        .fold(None, |best: Option<(usize, f64)>, (i, o)| match best {
            Some((_, b)) if b >= o => best,
            _ => Some((i, o)),
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MARKER: &str = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>";

    fn messages(v: serde_json::Value) -> Vec<Message> {
        serde_json::from_value(v).unwrap()
    }

    fn texts(c: &[HintCandidate]) -> Vec<(HintSource, &str)> {
        c.iter().map(|c| (c.source, c.text.as_str())).collect()
    }

    #[test]
    fn a_correction_is_a_candidate_unless_the_reply_was_approved() {
        let next = messages(json!([{"role": "user", "content": "Too long. Three items only."}]));
        let markers = [MARKER.to_string()];
        let both = candidates(
            Some("List fewer items."),
            &next,
            Some("user"),
            Some(-1),
            &markers,
        );
        assert_eq!(
            texts(&both),
            [
                (HintSource::Judge, "List fewer items."),
                (HintSource::User, "Too long. Three items only.")
            ]
        );
        // Unrated and unjudged (the judge said 0 and wrote a hint): still a correction.
        assert_eq!(
            candidates(None, &next, Some("user"), None, &markers).len(),
            1
        );
        // Approved: the next message is a new request, not a hint about this reply.
        let approved = candidates(Some("x y z"), &next, Some("user"), Some(1), &markers);
        assert_eq!(texts(&approved), [(HintSource::Judge, "x y z")]);
        // A tool result is no user's words.
        let tool = messages(
            json!([{"role": "tool", "tool_call_id": "c", "content": "error: no such file"}]),
        );
        assert!(candidates(None, &tool, Some("tool"), Some(-1), &markers).is_empty());
    }

    #[test]
    fn client_internal_context_and_empty_messages_are_never_hints() {
        let next = messages(json!([
            {"role": "user", "content": [{"type": "text", "text": "No lists, "}, {"type": "text", "text": "please."}]},
            {"role": "user", "content": format!("{MARKER} runtime notes")},
            {"role": "user", "content": "   "},
        ]));
        let c = candidates(None, &next, Some("user"), Some(-1), &[MARKER.into()]);
        assert_eq!(texts(&c), [(HintSource::User, "No lists, please.")]);
        let only_internal = messages(json!([{"role": "user", "content": format!("{MARKER} x")}]));
        assert!(
            candidates(
                None,
                &only_internal,
                Some("user"),
                Some(-1),
                &[MARKER.into()]
            )
            .is_empty()
        );
        // The same words from the judge and the user count once (the judge's).
        let same = messages(json!([{"role": "user", "content": "Shorter please."}]));
        let c = candidates(Some("Shorter please."), &same, Some("user"), Some(-1), &[]);
        assert_eq!(texts(&c), [(HintSource::Judge, "Shorter please.")]);
    }

    #[test]
    fn the_rules_pick_the_first_the_users_or_the_largest_overlap() {
        let c = |source, overlap| HintCandidate {
            source,
            text: "t".into(),
            overlap,
            error: None,
            scored_by: None,
        };
        let both = [
            c(HintSource::Judge, Some(9.5)),
            c(HintSource::User, Some(11.0)),
        ];
        assert_eq!(pick_unscored(HintSelection::First, &both), Some(0));
        assert_eq!(pick_unscored(HintSelection::User, &both), Some(1));
        assert_eq!(pick_unscored(HintSelection::Overlap, &both), None);
        assert_eq!(pick_unscored(HintSelection::Overlap, &both[..1]), Some(0));
        assert_eq!(
            pick_unscored(HintSelection::User, &both[..1]),
            Some(0),
            "no user's message: the judge's"
        );
        assert_eq!(pick_by_overlap(&both), Some(1));
        // Ties go to the first; an unscored candidate is never picked.
        assert_eq!(
            pick_by_overlap(&[
                c(HintSource::Judge, Some(3.0)),
                c(HintSource::User, Some(3.0))
            ]),
            Some(0)
        );
        assert_eq!(
            pick_by_overlap(&[c(HintSource::Judge, None), c(HintSource::User, Some(0.0))]),
            Some(1)
        );
        assert_eq!(pick_by_overlap(&[c(HintSource::Judge, None)]), None);
    }
}
