//! OpenAI chat messages, typed: what a client sends, what the engine renders, what capture
//! stores and the judge and trainer read. They become JSON values in one place only, where the
//! chat template is rendered (`ChatTemplate::render`).
//!
//! Fields clawrl does not use (`reasoning_content`, `cache_control`, …) are kept in `extra`, so
//! a message travels and is stored as the client sent it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::System,
        Role::Developer,
        Role::User,
        Role::Assistant,
        Role::Tool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A message's `content`: a string, or a list of text parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a list content. Only text parts are accepted ([`parse_messages`] refuses
/// images and audio); some clients send a bare string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Part {
    Bare(String),
    Text {
        #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(flatten)]
        extra: Map<String, Value>,
    },
}

impl Content {
    /// The text: the string, or the text parts joined.
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    Part::Bare(s) => Some(s.as_str()),
                    Part::Text { text, .. } => text.as_deref(),
                })
                .collect(),
        }
    }

    /// Appends `suffix` as text (to the string, or as one more text part).
    pub fn push_text(&mut self, suffix: &str) {
        match self {
            Content::Text(s) => s.push_str(suffix),
            Content::Parts(parts) => parts.push(Part::Text {
                kind: Some("text".into()),
                text: Some(suffix.into()),
                extra: Map::new(),
            }),
        }
    }

    /// Puts `prefix` before the text (at the start of the string, or as a first text part).
    pub fn prepend_text(&mut self, prefix: &str) {
        match self {
            Content::Text(s) => s.insert_str(0, prefix),
            Content::Parts(parts) => parts.insert(
                0,
                Part::Text {
                    kind: Some("text".into()),
                    text: Some(prefix.into()),
                    extra: Map::new(),
                },
            ),
        }
    }

    fn text_only(&self) -> bool {
        match self {
            Content::Text(_) => true,
            Content::Parts(parts) => parts.iter().all(|p| match p {
                Part::Bare(_) => true,
                Part::Text { kind, .. } => kind.as_deref().is_none_or(|k| k == "text"),
            }),
        }
    }
}

/// An OpenAI tool call: `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON string in OpenAI's API; some clients send the object itself, kept as sent.
    #[serde(default)]
    pub arguments: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ToolCall {
    /// A call with `arguments` as a JSON string, the way OpenAI's API returns them.
    pub fn function(id: String, name: String, arguments: String) -> Self {
        ToolCall {
            id: Some(id),
            kind: function_kind(),
            function: FunctionCall {
                name,
                arguments: Value::String(arguments),
                extra: Map::new(),
            },
            extra: Map::new(),
        }
    }

    /// The arguments as a JSON value (a string that holds JSON is parsed), for comparing calls.
    pub fn arguments_value(&self) -> Value {
        match &self.function.arguments {
            Value::String(s) => {
                serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
            }
            other => other.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    /// `None` (JSON `null`) only for an assistant turn that holds tool calls alone.
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `"tool_calls": null`, which some clients echo back, reads as no calls.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ToolCall>, D::Error> {
    Ok(Option::<Vec<ToolCall>>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
            extra: Map::new(),
        }
    }

    pub fn system(text: impl Into<String>) -> Self {
        Self::new(Role::System, text)
    }

    pub fn user(text: impl Into<String>) -> Self {
        Self::new(Role::User, text)
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new(Role::Assistant, text)
    }

    /// The content's text ("" when there is none).
    pub fn text(&self) -> String {
        self.content.as_ref().map(Content::text).unwrap_or_default()
    }

    /// The message as a chat template expects it: content always a string (tool-call-only
    /// turns get "", text parts are joined).
    pub(crate) fn template_value(&self) -> Value {
        let mut flat = self.clone();
        flat.content = Some(Content::Text(self.text()));
        serde_json::to_value(flat).expect("a message serializes")
    }
}

/// A [`Message`] from a JSON literal, `message!({"role": "user", "content": "Hi"})`, for tests
/// and fixed prompts; panics when the literal is not a message.
#[macro_export]
macro_rules! message {
    ($($json:tt)+) => {
        serde_json::from_value::<$crate::messages::Message>(serde_json::json!($($json)+))
            .expect("a chat message literal")
    };
}

/// Why a list of messages was refused, with the request field it concerns
/// (`messages[2].content`), for the API's `param`.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageError {
    pub param: String,
    pub message: String,
}

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MessageError {}

/// Parses a request's `messages`: each has a known role and text content (an assistant's may
/// be null when it holds tool calls); errors name the message and field.
pub fn parse_messages(messages: &[Value]) -> Result<Vec<Message>, MessageError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect()
}

fn parse_message(i: usize, m: &Value) -> Result<Message, MessageError> {
    let err = |field: &str, message: String| MessageError {
        param: format!("messages[{i}]{field}"),
        message,
    };
    let role = match m.get("role") {
        None => return Err(err(".role", format!("messages[{i}] has no `role`."))),
        Some(r) => r.as_str().and_then(Role::parse).ok_or_else(|| {
            let shown = r.as_str().map_or_else(|| r.to_string(), str::to_owned);
            err(
                ".role",
                format!(
                    "messages[{i}].role `{shown}` is not one of system, developer, user, assistant, tool."
                ),
            )
        })?,
    };
    let content_error = || {
        err(
            ".content",
            format!("messages[{i}].content must be a string or a list of text parts."),
        )
    };
    match m.get("content") {
        None | Some(Value::Null) if role == Role::Assistant => {}
        Some(Value::String(_) | Value::Array(_)) => {}
        _ => return Err(content_error()),
    }
    // Read in place (no copy); a content that does not parse is named as such.
    let message = Message::deserialize(m).map_err(|e| {
        let bad_content = m
            .get("content")
            .is_some_and(|c| !c.is_null() && Content::deserialize(c).is_err());
        if bad_content {
            content_error()
        } else {
            err("", format!("messages[{i}]: {e}."))
        }
    })?;
    if message.content.as_ref().is_some_and(|c| !c.text_only()) {
        return Err(err(
            ".content",
            format!("messages[{i}].content: only text parts are supported."),
        ));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_round_trip_as_sent_and_unknown_fields_are_kept() {
        let sent = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, "there", {"type": "text", "text": "!", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}], "reasoning_content": "because"},
            {"role": "tool", "content": "ok", "tool_call_id": "c1"}
        ]);
        let parsed = parse_messages(sent.as_array().unwrap()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), sent);
        assert_eq!(parsed[1].text(), "Hi there!");
        assert_eq!(parsed[2].text(), "");
        assert_eq!(parsed[2].tool_calls[0].arguments_value(), json!({"a": 1}));
        assert_eq!(parsed[2].template_value()["content"], json!(""));
        assert_eq!(parsed[2].extra["reasoning_content"], json!("because"));
    }

    #[test]
    fn bad_messages_are_refused_naming_the_field() {
        let refuse =
            |m: Value| parse_messages(&[json!({"role": "user", "content": "ok"}), m]).unwrap_err();
        let e = refuse(json!({"role": "robot", "content": "x"}));
        assert_eq!(e.param, "messages[1].role");
        assert!(e.message.contains("`robot` is not one of"), "{e}");
        assert_eq!(refuse(json!({"content": "x"})).param, "messages[1].role");
        assert_eq!(refuse(json!({"role": "user"})).param, "messages[1].content");
        assert_eq!(
            refuse(json!({"role": "user", "content": 5})).param,
            "messages[1].content"
        );
        let image = refuse(
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
        );
        assert!(image.message.contains("only text parts"), "{image}");
        let call =
            refuse(json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}));
        assert_eq!(call.param, "messages[1]");
        assert!(call.message.contains("function"), "{call}");
        // An assistant turn may carry tool calls alone.
        assert!(parse_messages(&[json!({"role": "assistant"})]).is_ok());
    }
}
