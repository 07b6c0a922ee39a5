//! The judge's prompt templates (minijinja): built-in copies of `assets/prompts/`, or a folder
//! of edited ones named by `judge.prompts_dir`, read once at start.

use anyhow::{Context, Result, bail};
use clawrl_model::messages::Message;
use minijinja::Environment;
use std::path::Path;

const FILES: [(&str, &str); 4] = [
    (
        "prm_system.md",
        include_str!("../../../../assets/prompts/prm_system.md"),
    ),
    (
        "prm_user.md",
        include_str!("../../../../assets/prompts/prm_user.md"),
    ),
    (
        "hint_system.md",
        include_str!("../../../../assets/prompts/hint_system.md"),
    ),
    (
        "hint_user.md",
        include_str!("../../../../assets/prompts/hint_user.md"),
    ),
];

/// What the judge is shown about one turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnView {
    /// The last user message of the turn's request.
    pub request: String,
    /// The assistant's reply (text, and its tool calls if any).
    pub response: String,
    /// The next state's messages as text.
    pub next_state: String,
    /// `user` or `tool`.
    pub next_state_role: String,
}

pub struct Prompts {
    env: Environment<'static>,
    max_field_chars: usize,
}

impl Prompts {
    /// The templates from `dir` (every file must be there), or the built-in ones.
    pub fn load(dir: Option<&Path>, max_field_chars: usize) -> Result<Self> {
        let mut env = Environment::new();
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, builtin) in FILES {
            let text = match dir {
                Some(d) => {
                    let p = d.join(name);
                    std::fs::read_to_string(&p).with_context(|| {
                        format!(
                            "judge.prompts_dir: cannot read {} (the folder needs {})",
                            p.display(),
                            FILES.map(|f| f.0).join(", ")
                        )
                    })?
                }
                None => builtin.to_string(),
            };
            env.add_template_owned(name.to_string(), text)
                .with_context(|| format!("judge prompt {name} is not a valid template"))?;
        }
        let prompts = Self {
            env,
            max_field_chars: max_field_chars.max(200),
        };
        // Fail at start, not on the first turn, when a template uses an unknown variable.
        let probe = TurnView {
            request: "r".into(),
            response: "a".into(),
            next_state: "n".into(),
            next_state_role: "user".into(),
        };
        for direct in [false, true] {
            prompts.prm(&probe, direct)?;
        }
        prompts.hint(&probe)?;
        Ok(prompts)
    }

    fn render(
        &self,
        system: &str,
        user: &str,
        turn: &TurnView,
        direct: bool,
    ) -> Result<Vec<Message>> {
        let cut = |s: &str| cut_middle(s, self.max_field_chars);
        let ctx = minijinja::context! {
            request => cut(&turn.request),
            response => cut(&turn.response),
            next_state => cut(&turn.next_state),
            next_state_role => turn.next_state_role,
            direct => direct,
        };
        let render = |name: &str| -> Result<String> {
            let text = self
                .env
                .get_template(name)?
                .render(&ctx)
                .with_context(|| format!("rendering judge prompt {name}"))?;
            if text.trim().is_empty() {
                bail!("judge prompt {name} renders empty");
            }
            Ok(text)
        };
        Ok(vec![
            Message::system(render(system)?),
            Message::user(render(user)?),
        ])
    }

    /// The evaluative (PRM) chat for a turn.
    pub fn prm(&self, turn: &TurnView, direct: bool) -> Result<Vec<Message>> {
        self.render("prm_system.md", "prm_user.md", turn, direct)
    }

    /// The hint-extraction chat for a turn.
    pub fn hint(&self, turn: &TurnView) -> Result<Vec<Message>> {
        self.render("hint_system.md", "hint_user.md", turn, false)
    }
}

/// `s` cut to about `max` characters, keeping its start and end.
pub(crate) fn cut_middle(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    let keep = max.saturating_sub(20) / 2;
    let head: String = s.chars().take(keep).collect();
    let tail: String = s.chars().skip(n - keep).collect();
    format!("{head}\n[… {} characters cut …]\n{tail}", n - 2 * keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> TurnView {
        TurnView {
            request: "Convert 5 miles to km.".into(),
            response: "5 miles is 8.05 km.".into(),
            next_state: "Thanks!".into(),
            next_state_role: "user".into(),
        }
    }

    #[test]
    fn builtin_prompts_show_request_reply_and_next_state_with_its_role() {
        let p = Prompts::load(None, 2000).unwrap();
        let chat = p.prm(&view(), false).unwrap();
        let user = &chat[1].text();
        for part in [
            "Convert 5 miles to km.",
            "5 miles is 8.05 km.",
            "Thanks!",
            "(user)",
        ] {
            assert!(user.contains(part), "{part} missing from {user}");
        }
        assert!(user.contains("Reason briefly"));
        let direct = p.prm(&view(), true).unwrap()[1].text();
        assert!(direct.contains("score only") && !direct.contains("Reason briefly"));
        assert!(
            chat[0]
                .text()
                .contains("A change request IS negative feedback")
        );
        let hint = p.hint(&view()).unwrap();
        assert!(hint[0].text().contains("[HINT_START]"));
    }

    #[test]
    fn edited_prompts_are_read_from_a_folder_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in FILES {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        std::fs::write(
            dir.path().join("prm_user.md"),
            "Judge: {{ response }} / {{ next_state }}",
        )
        .unwrap();
        let p = Prompts::load(Some(dir.path()), 2000).unwrap();
        assert_eq!(
            p.prm(&view(), false).unwrap()[1].text(),
            "Judge: 5 miles is 8.05 km. / Thanks!"
        );

        std::fs::write(dir.path().join("prm_user.md"), "{{ no_such_field }}").unwrap();
        let err = Prompts::load(Some(dir.path()), 2000).err().unwrap();
        assert!(format!("{err:#}").contains("prm_user.md"), "{err:#}");
        std::fs::remove_file(dir.path().join("hint_user.md")).unwrap();
        let err = Prompts::load(Some(dir.path()), 2000).err().unwrap();
        assert!(format!("{err:#}").contains("hint_user.md"), "{err:#}");
    }

    #[test]
    fn long_fields_are_cut_in_the_middle() {
        let s: String = (0..5000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let cut = cut_middle(&s, 1000);
        assert!(cut.chars().count() < 1100);
        assert!(cut.starts_with("abc") && cut.ends_with(&s[s.len() - 10..]));
        assert_eq!(cut_middle("short", 1000), "short");
    }
}
