//! Chat templates: the checkpoint's own Jinja template rendered with minijinja, the way
//! Hugging Face `apply_chat_template` does (trim/lstrip blocks, `raise_exception`, Python
//! string methods, tools passed through).

use crate::messages::Message;
use anyhow::{Context, Result, anyhow};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

/// Instructions one render may execute (minijinja's fuel).
const RENDER_FUEL: u64 = 20_000_000;
/// `tojson(indent)` wider than this is clamped (the argument comes from the template).
const MAX_INDENT: usize = 16;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // A template comes with the checkpoint, not from us: a loop that never ends is an
        // error after this many instructions (a 500-message chat with tools renders in ~10^5).
        env.set_fuel(Some(RENDER_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date" lines; a fixed-format UTC date keeps it simple.
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let days = secs / 86_400;
            let (y, m, d) = civil_from_days(days as i64);
            fmt.replace("%Y", &y.to_string())
                .replace("%m", &format!("{m:02}"))
                .replace("%d", &format!("{d:02}"))
                .replace("%B", MONTHS[(m - 1) as usize])
                .replace("%b", &MONTHS[(m - 1) as usize][..3])
        });
        // Hugging Face's `tojson` does not HTML-escape (minijinja's does): match the model's training.
        env.add_filter(
            "tojson",
            |v: Value, indent: Option<usize>| -> Result<String, Error> {
                let j: Json = serde_json::to_value(&v)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
                let s = match indent {
                    Some(n) => {
                        let mut buf = Vec::new();
                        let ind = vec![b' '; n.min(MAX_INDENT)];
                        let fmt = serde_json::ser::PrettyFormatter::with_indent(&ind);
                        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
                        serde::Serialize::serialize(&j, &mut ser)
                            .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
                        String::from_utf8(buf).unwrap_or_default()
                    }
                    None => python_json(&j),
                };
                Ok(s)
            },
        );
        env.add_template_owned("chat", source.to_string())
            .context("the chat template does not parse")?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or("").into(),
            eos_token: eos_token.unwrap_or("").into(),
        })
    }

    /// Renders `messages` and optional `tools` (JSON schema list).
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let values: Vec<Json> = messages.iter().map(Message::template_value).collect();
        self.render_values(&values, tools, add_generation_prompt)
    }

    /// Renders messages already turned into template values ([`Message::template_value`]).
    pub(crate) fn render_values(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat")?;
        let tools = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| anyhow!("rendering the chat template: {e:#}"))
    }
}

/// `json.dumps` spacing (", " and ": "), which the chat templates' training data used.
fn python_json(v: &Json) -> String {
    match v {
        Json::Array(a) => format!(
            "[{}]",
            a.iter().map(python_json).collect::<Vec<_>>().join(", ")
        ),
        Json::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", Json::String(k.clone()), python_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
