//! The OPD teacher context (PIPELINE.md §3): the turn's messages with the hint added to the
//! last user message (before it by default, `train.hint_placement`), rendered with the chat
//! template, followed by the student's response token ids exactly as sampled (never
//! re-tokenized text), so that teacher and student score the identical tokens.

use crate::config::HintPlacement;
use anyhow::{Result, bail};
use clawrl_model::LoadedModel;
use clawrl_model::messages::{Content, Message, Role};
use serde_json::Value;

/// What separates the user's message from a hint placed after it (the published framing).
pub const HINT_HEADER: &str = "\n\n[user's hint / instruction]\n";

/// What separates a hint placed before the user's message from it.
pub const HINT_BEFORE_SEPARATOR: &str = "\n\n";

/// A user message's text with `hint` placed as the teacher reads it.
pub fn hinted_text(text: &str, hint: &str, placement: HintPlacement) -> String {
    match placement {
        HintPlacement::Before => format!("{hint}{HINT_BEFORE_SEPARATOR}{text}"),
        HintPlacement::After => format!("{text}{HINT_HEADER}{hint}"),
    }
}

/// A copy of `messages` with `hint` added to the last user message.
pub(crate) fn hinted_messages(
    messages: &[Message],
    hint: &str,
    placement: HintPlacement,
) -> Result<Vec<Message>> {
    let mut out = messages.to_vec();
    let Some(last_user) = out.iter_mut().rev().find(|m| m.role == Role::User) else {
        bail!("the turn has no user message to attach the hint to");
    };
    // Parts are joined without separators when rendered: a text part first or last does what
    // the string's prefix or suffix does.
    let added = hinted_text("", hint, placement);
    match (&mut last_user.content, placement) {
        (Some(content), HintPlacement::Before) => content.prepend_text(&added),
        (Some(content), HintPlacement::After) => content.push_text(&added),
        (None, _) => last_user.content = Some(Content::Text(added.trim().into())),
    }
    Ok(out)
}

/// The token sequence the teacher scores.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherContext {
    pub ids: Vec<u32>,
    /// Where the student's response starts in `ids`.
    pub response_start: usize,
}

impl TeacherContext {
    pub fn prompt(&self) -> &[u32] {
        &self.ids[..self.response_start]
    }
    pub fn response(&self) -> &[u32] {
        &self.ids[self.response_start..]
    }
}

/// Builds the teacher's sequence for a turn with a hint.
pub fn teacher_context(
    model: &LoadedModel,
    messages: &[Message],
    tools: Option<&Value>,
    hint: &str,
    placement: HintPlacement,
    response_ids: &[u32],
) -> Result<TeacherContext> {
    let mut ids = model.chat_prompt(&hinted_messages(messages, hint, placement)?, tools)?;
    let response_start = ids.len();
    ids.extend_from_slice(response_ids);
    Ok(TeacherContext {
        ids,
        response_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawrl_model::message;

    #[test]
    fn the_hint_goes_to_the_last_user_message_only() {
        let messages = vec![
            message!({"role": "system", "content": "Be helpful."}),
            message!({"role": "user", "content": "first"}),
            message!({"role": "assistant", "content": "ok"}),
            message!({"role": "user", "content": "Convert 5 miles."}),
        ];
        for (placement, want) in [
            (HintPlacement::Before, "Use kilometres.\n\nConvert 5 miles."),
            (
                HintPlacement::After,
                "Convert 5 miles.\n\n[user's hint / instruction]\nUse kilometres.",
            ),
        ] {
            let out = hinted_messages(&messages, "Use kilometres.", placement).unwrap();
            assert_eq!(out[3].text(), want);
            assert_eq!(out[..3], messages[..3], "earlier messages are untouched");
        }
        assert_eq!(
            messages[3].text(),
            "Convert 5 miles.",
            "the input is not modified"
        );
    }

    #[test]
    fn text_parts_get_the_hint_as_a_first_or_last_part() {
        let messages = vec![
            message!({"role": "user", "content": [{"type": "text", "text": "Hi"}]}),
            message!({"role": "tool", "content": "result", "tool_call_id": "c1"}),
        ];
        for placement in [HintPlacement::Before, HintPlacement::After] {
            let out = hinted_messages(&messages, "Say hello back.", placement).unwrap();
            let Some(Content::Parts(parts)) = &out[0].content else {
                panic!("the content stays a list of parts: {:?}", out[0]);
            };
            assert_eq!(parts.len(), 2);
            assert_eq!(
                out[0].text(),
                hinted_text("Hi", "Say hello back.", placement)
            );
            assert_eq!(out[1], messages[1]);
        }
    }

    #[test]
    fn a_user_message_without_content_gets_the_hint_alone() {
        let messages = vec![message!({"role": "user"})];
        let out = hinted_messages(&messages, "Say hi.", HintPlacement::Before).unwrap();
        assert_eq!(out[0].text(), "Say hi.");
        let out = hinted_messages(&messages, "Say hi.", HintPlacement::After).unwrap();
        assert_eq!(out[0].text(), "[user's hint / instruction]\nSay hi.");
    }

    #[test]
    fn a_turn_without_a_user_message_has_no_teacher_context() {
        let err = hinted_messages(
            &[message!({"role": "system", "content": "x"})],
            "hint",
            HintPlacement::Before,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no user message"), "{err}");
    }
}
