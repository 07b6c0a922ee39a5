//! The OPD teacher context (PIPELINE.md §3): the turn's messages with the hint appended to the
//! last user message, rendered with the chat template, followed by the student's response
//! token ids exactly as sampled (never re-tokenized text), so that teacher and student score
//! the identical tokens.

use anyhow::{Result, bail};
use clawrl_model::LoadedModel;
use clawrl_model::messages::{Content, Message, Role};
use serde_json::Value;

/// What separates the user's message from the hint in the teacher's context.
pub const HINT_HEADER: &str = "\n\n[user's hint / instruction]\n";

/// A copy of `messages` with `hint` appended to the last user message.
pub(crate) fn hinted_messages(messages: &[Message], hint: &str) -> Result<Vec<Message>> {
    let mut out = messages.to_vec();
    let Some(last_user) = out.iter_mut().rev().find(|m| m.role == Role::User) else {
        bail!("the turn has no user message to attach the hint to");
    };
    let suffix = format!("{HINT_HEADER}{hint}");
    match &mut last_user.content {
        // Parts are joined without separators when rendered: a trailing text part appends.
        Some(content) => content.push_text(&suffix),
        None => last_user.content = Some(Content::Text(suffix.trim_start().into())),
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
    response_ids: &[u32],
) -> Result<TeacherContext> {
    let mut ids = model.chat_prompt(&hinted_messages(messages, hint)?, tools)?;
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
        let out = hinted_messages(&messages, "Use kilometres.").unwrap();
        assert_eq!(
            out[3].text(),
            "Convert 5 miles.\n\n[user's hint / instruction]\nUse kilometres."
        );
        assert_eq!(out[..3], messages[..3], "earlier messages are untouched");
        assert_eq!(
            messages[3].text(),
            "Convert 5 miles.",
            "the input is not modified"
        );
    }

    #[test]
    fn text_parts_get_the_hint_as_a_last_part() {
        let messages = vec![
            message!({"role": "user", "content": [{"type": "text", "text": "Hi"}]}),
            message!({"role": "tool", "content": "result", "tool_call_id": "c1"}),
        ];
        let out = hinted_messages(&messages, "Say hello back.").unwrap();
        let Some(Content::Parts(parts)) = &out[0].content else {
            panic!("the content stays a list of parts: {:?}", out[0]);
        };
        assert_eq!(parts.len(), 2);
        assert_eq!(out[0].text(), format!("Hi{HINT_HEADER}Say hello back."));
        assert_eq!(out[1], messages[1]);
    }

    #[test]
    fn a_turn_without_a_user_message_has_no_teacher_context() {
        let err = hinted_messages(&[message!({"role": "system", "content": "x"})], "hint")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no user message"), "{err}");
    }
}
