//! OpenAI chat messages as they travel through clawrl (JSON values, as the client sent them).

use serde_json::Value;

/// The text of a message's `content`: a string, or the text parts of an array of parts.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str).or_else(|| p.as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}
