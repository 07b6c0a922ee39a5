//! Tool-call markup in model output (`<tool_call>{"name": .., "arguments": {..}}</tool_call>`,
//! the Qwen/Hermes convention the chat templates teach) turned into OpenAI `tool_calls`.

use clawrl_model::messages::ToolCall;
use serde_json::Value;

pub(crate) const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// Text outside the tool-call blocks, trimmed; `None` when nothing is left.
    pub content: Option<String>,
    /// OpenAI-shaped `tool_calls` (`arguments` as a JSON string).
    pub tool_calls: Vec<ToolCall>,
}

/// Extracts well-formed tool calls; malformed blocks stay in the content untouched. Small
/// models often drop the tags and answer with the bare call object: a reply that is exactly
/// `{"name": <one of tool_names>, "arguments": {..}}` counts as a call too.
pub fn parse(text: &str, tool_names: &[&str], new_id: &mut dyn FnMut() -> String) -> Parsed {
    if !text.contains(OPEN)
        && let Ok(v) = serde_json::from_str::<Value>(text.trim())
        && v.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| tool_names.contains(&n))
    {
        return Parsed {
            content: None,
            tool_calls: vec![call(&v, new_id)],
        };
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        // A block cut off by the end of generation runs to the end of the text.
        let (body, block_end) = match after.find(CLOSE) {
            Some(end) => (&after[..end], start + OPEN.len() + end + CLOSE.len()),
            None => (after, rest.len()),
        };
        match serde_json::from_str::<Value>(body.trim()) {
            Ok(v) if v.get("name").and_then(Value::as_str).is_some() => {
                content.push_str(&rest[..start]);
                calls.push(call(&v, new_id));
            }
            _ => content.push_str(&rest[..block_end]),
        }
        rest = &rest[block_end..];
    }
    content.push_str(rest);
    let content = content.trim().to_string();
    Parsed {
        content: (!content.is_empty()).then_some(content),
        tool_calls: calls,
    }
}

/// `{"name", "arguments"}` → an OpenAI tool call (`arguments` as a JSON string).
fn call(v: &Value, new_id: &mut dyn FnMut() -> String) -> ToolCall {
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
        None => "{}".into(),
    };
    let name = v["name"].as_str().unwrap_or_default().to_string();
    ToolCall::function(new_id(), name, args)
}

/// How much of a growing `text` can be streamed as plain content when tools are on: everything
/// before a tool-call block, minus a tail that may still become one.
pub fn streamable_len(text: &str) -> usize {
    // A reply opening with `{` may be a bare call object: hold it until the end.
    if text.trim_start().starts_with('{') {
        return 0;
    }
    if let Some(p) = text.find(OPEN) {
        return p;
    }
    (1..OPEN.len())
        .rev()
        .find(|&k| text.ends_with(&OPEN[..k]))
        .map_or(text.len(), |k| text.len() - k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> impl FnMut() -> String {
        crate::capture::numbered_ids("call_")
    }

    #[test]
    fn extracts_calls_and_keeps_surrounding_text() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>";
        let p = parse(t, &["get_weather", "now"], &mut ids());
        assert_eq!(p.content.as_deref(), Some("Let me check."));
        assert_eq!(p.tool_calls.len(), 2);
        assert_eq!(p.tool_calls[0].function.name, "get_weather");
        assert_eq!(p.tool_calls[0].function.arguments, "{\"city\":\"Paris\"}");
        assert_eq!(p.tool_calls[1].id.as_deref(), Some("call_2"));
    }

    #[test]
    fn malformed_blocks_stay_text_and_plain_text_is_untouched() {
        let p = parse("<tool_call>{not json}</tool_call> ok", &[], &mut ids());
        assert!(p.tool_calls.is_empty());
        assert_eq!(
            p.content.as_deref(),
            Some("<tool_call>{not json}</tool_call> ok")
        );
        let p = parse("  just text ", &[], &mut ids());
        assert_eq!(
            (p.content.as_deref(), p.tool_calls.len()),
            (Some("just text"), 0)
        );
        // A block cut off by max_tokens but holding complete JSON still counts.
        let p = parse(
            "<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1}}",
            &["a"],
            &mut ids(),
        );
        assert_eq!(p.tool_calls.len(), 1);
        assert_eq!(p.content, None);
    }

    #[test]
    fn a_bare_call_object_naming_a_given_tool_is_a_call() {
        let bare = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
        let p = parse(bare, &["get_weather"], &mut ids());
        assert_eq!((p.content, p.tool_calls.len()), (None, 1));
        // Not a tool we offered, or JSON the user asked for: plain content.
        assert!(parse(bare, &["other"], &mut ids()).tool_calls.is_empty());
        assert!(
            parse("{\"a\": 1}", &["get_weather"], &mut ids())
                .tool_calls
                .is_empty()
        );
        assert_eq!(streamable_len(" {\"name\""), 0);
    }

    #[test]
    fn streaming_holds_back_what_may_become_a_call() {
        assert_eq!(streamable_len("Hello <tool"), 6);
        assert_eq!(streamable_len("Hello <tool_call>{"), 6);
        assert_eq!(streamable_len("Hello"), 5);
        assert_eq!(streamable_len("a < b"), 5);
    }
}
