//! Key bindings: one table of actions with their default keys and descriptions. The key handler
//! looks keys up in it, the footer and the help overlay are generated from it, and the config
//! file's `[tui.keys]` replaces an action's keys.

use anyhow::{Result, bail};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::collections::BTreeMap;

/// Everything a key can do. Panes list the ones they handle (`COMMANDS`); the rest are global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Quit,
    Help,
    NextPane,
    PrevPane,
    ShowConversations,
    ShowTraining,
    FocusChat,
    Up,
    Down,
    Top,
    Bottom,
    Open,
    ThumbUp,
    ThumbDown,
    Approve,
    Veto,
    Rollback,
    PauseTraining,
    Send,
    Newline,
    LeaveChat,
    NewChat,
}

/// (action, config name, default keys, what it does)
const TABLE: &[(Action, &str, &[&str], &str)] = &[
    (
        Action::Quit,
        "quit",
        &["q", "ctrl-c"],
        "quit (requests in flight finish)",
    ),
    (Action::Help, "help", &["?"], "show or hide this help"),
    (
        Action::NextPane,
        "next_pane",
        &["tab"],
        "focus the next pane",
    ),
    (
        Action::PrevPane,
        "prev_pane",
        &["backtab"],
        "focus the previous pane",
    ),
    (
        Action::ShowConversations,
        "show_conversations",
        &["1"],
        "conversations view",
    ),
    (
        Action::ShowTraining,
        "show_training",
        &["2"],
        "training view",
    ),
    (
        Action::FocusChat,
        "focus_chat",
        &["i", "c"],
        "type in the chat box",
    ),
    (Action::Up, "up", &["k", "up"], "previous item"),
    (Action::Down, "down", &["j", "down"], "next item"),
    (Action::Top, "top", &["g", "home"], "first item"),
    (Action::Bottom, "bottom", &["G", "end"], "last item"),
    (
        Action::Open,
        "open",
        &["enter", "l", "right"],
        "open the selected session",
    ),
    (
        Action::ThumbUp,
        "thumb_up",
        &["+", "u"],
        "rate the selected turn up",
    ),
    (
        Action::ThumbDown,
        "thumb_down",
        &["-", "d"],
        "rate the selected turn down",
    ),
    (Action::Approve, "approve", &["a"], "approve the candidate"),
    (Action::Veto, "veto", &["v"], "veto the candidate"),
    (
        Action::Rollback,
        "rollback",
        &["R"],
        "roll back (selected or previous version)",
    ),
    (
        Action::PauseTraining,
        "pause_training",
        &["p"],
        "pause or resume training",
    ),
    (Action::Send, "send", &["enter"], "send the message"),
    (
        Action::Newline,
        "newline",
        &["alt-enter"],
        "new line in the message",
    ),
    (
        Action::LeaveChat,
        "leave_chat",
        &["esc"],
        "leave the chat box",
    ),
    (
        Action::NewChat,
        "new_chat",
        &["ctrl-n"],
        "start a new conversation",
    ),
];

impl Action {
    fn row(self) -> &'static (Action, &'static str, &'static [&'static str], &'static str) {
        TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every action is in the table")
    }
    pub fn name(self) -> &'static str {
        self.row().1
    }
    pub fn description(self) -> &'static str {
        self.row().3
    }
}

/// A key as written in the config and shown on screen: `a`, `R`, `?`, `enter`, `ctrl-c`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    code: KeyCode,
    mods: KeyModifiers,
}

impl Key {
    /// The key of a terminal event (Shift is part of the character, not a modifier).
    pub fn of(e: &KeyEvent) -> Self {
        let mut mods =
            e.modifiers & (KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT);
        if matches!(e.code, KeyCode::Char(_) | KeyCode::BackTab) {
            mods.remove(KeyModifiers::SHIFT);
        }
        Self { code: e.code, mods }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let mut mods = KeyModifiers::NONE;
        let mut rest = s;
        loop {
            if let Some(r) = rest.strip_prefix("ctrl-") {
                mods |= KeyModifiers::CONTROL;
                rest = r;
            } else if let Some(r) = rest.strip_prefix("alt-") {
                mods |= KeyModifiers::ALT;
                rest = r;
            } else {
                break;
            }
        }
        let code = match rest {
            "enter" => KeyCode::Enter,
            "esc" => KeyCode::Esc,
            "tab" => KeyCode::Tab,
            "backtab" | "shift-tab" => KeyCode::BackTab,
            "up" => KeyCode::Up,
            "down" => KeyCode::Down,
            "left" => KeyCode::Left,
            "right" => KeyCode::Right,
            "home" => KeyCode::Home,
            "end" => KeyCode::End,
            "pageup" => KeyCode::PageUp,
            "pagedown" => KeyCode::PageDown,
            "backspace" => KeyCode::Backspace,
            "delete" => KeyCode::Delete,
            "space" => KeyCode::Char(' '),
            f if f.len() > 1 && f.starts_with('f') && f[1..].parse::<u8>().is_ok() => {
                KeyCode::F(f[1..].parse()?)
            }
            c if c.chars().count() == 1 => KeyCode::Char(c.chars().next().unwrap_or(' ')),
            _ => bail!(
                "unknown key {s:?} (keys are written like a, R, ?, enter, esc, tab, backtab, up, pageup, f1, space, ctrl-c, alt-enter)"
            ),
        };
        Ok(Self { code, mods })
    }

    /// Whether typing this key in the chat box is text (not a command).
    pub(crate) fn is_text(&self) -> bool {
        matches!(self.code, KeyCode::Char(_))
            && !self.mods.contains(KeyModifiers::CONTROL)
            && !self.mods.contains(KeyModifiers::ALT)
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mods.contains(KeyModifiers::CONTROL) {
            f.write_str("ctrl-")?;
        }
        if self.mods.contains(KeyModifiers::ALT) {
            f.write_str("alt-")?;
        }
        match self.code {
            KeyCode::Char(' ') => f.write_str("space"),
            KeyCode::Char(c) => write!(f, "{c}"),
            KeyCode::Enter => f.write_str("enter"),
            KeyCode::Esc => f.write_str("esc"),
            KeyCode::Tab => f.write_str("tab"),
            KeyCode::BackTab => f.write_str("shift-tab"),
            KeyCode::Up => f.write_str("↑"),
            KeyCode::Down => f.write_str("↓"),
            KeyCode::Left => f.write_str("←"),
            KeyCode::Right => f.write_str("→"),
            KeyCode::F(n) => write!(f, "f{n}"),
            KeyCode::Home => f.write_str("home"),
            KeyCode::End => f.write_str("end"),
            KeyCode::PageUp => f.write_str("pageup"),
            KeyCode::PageDown => f.write_str("pagedown"),
            KeyCode::Backspace => f.write_str("backspace"),
            KeyCode::Delete => f.write_str("delete"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// Which keys trigger which actions.
#[derive(Debug, Clone)]
pub struct Keymap {
    bindings: Vec<(Action, Vec<Key>)>,
}

impl Default for Keymap {
    fn default() -> Self {
        Self::new(&BTreeMap::new()).expect("the default bindings parse")
    }
}

impl Keymap {
    /// The defaults with `overrides` (config name -> keys) applied.
    pub fn new(overrides: &BTreeMap<String, Vec<String>>) -> Result<Self> {
        for name in overrides.keys() {
            if !TABLE.iter().any(|r| r.1 == name) {
                let names: Vec<&str> = TABLE.iter().map(|r| r.1).collect();
                bail!(
                    "tui.keys: unknown action {name:?}; the actions are {}",
                    names.join(", ")
                );
            }
        }
        let mut bindings = Vec::new();
        for &(action, name, defaults, _) in TABLE {
            let keys = match overrides.get(name) {
                Some(keys) => keys
                    .iter()
                    .map(|k| Key::parse(k).map_err(|e| e.context(format!("tui.keys.{name}"))))
                    .collect::<Result<Vec<_>>>()?,
                None => defaults
                    .iter()
                    .map(|k| Key::parse(k))
                    .collect::<Result<_>>()?,
            };
            bindings.push((action, keys));
        }
        Ok(Self { bindings })
    }

    /// The first of `candidates` bound to `key` (a key may serve several panes: `enter` opens
    /// a session and sends a message).
    pub fn action(&self, key: Key, candidates: &[Action]) -> Option<Action> {
        candidates
            .iter()
            .copied()
            .find(|a| self.keys(*a).contains(&key))
    }

    pub fn keys(&self, action: Action) -> &[Key] {
        self.bindings
            .iter()
            .find(|(a, _)| *a == action)
            .map(|(_, k)| k.as_slice())
            .unwrap_or(&[])
    }

    /// The keys of `action` as shown on screen (`j/↓`).
    pub fn label(&self, action: Action) -> String {
        self.keys(action)
            .iter()
            .map(Key::to_string)
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(code: KeyCode, mods: KeyModifiers) -> Key {
        Key::of(&KeyEvent::new(code, mods))
    }

    #[test]
    fn keys_parse_and_print_as_the_config_writes_them() {
        for s in [
            "a",
            "R",
            "?",
            "+",
            "enter",
            "esc",
            "tab",
            "ctrl-c",
            "alt-enter",
            "f2",
            "space",
        ] {
            assert_eq!(Key::parse(s).unwrap().to_string(), s);
        }
        assert!(Key::parse("ctrl-").is_err());
        assert!(
            Key::parse("hyper-x")
                .unwrap_err()
                .to_string()
                .contains("unknown key")
        );
        // A terminal reports `R` with Shift; the binding is the character.
        assert_eq!(
            press(KeyCode::Char('R'), KeyModifiers::SHIFT),
            Key::parse("R").unwrap()
        );
    }

    #[test]
    fn the_config_replaces_an_actions_keys_and_names_its_mistakes() {
        let mut o = BTreeMap::new();
        o.insert(
            "approve".to_string(),
            vec!["y".to_string(), "ctrl-a".to_string()],
        );
        let map = Keymap::new(&o).unwrap();
        let all = [Action::Approve, Action::Veto];
        assert_eq!(
            map.action(Key::parse("y").unwrap(), &all),
            Some(Action::Approve)
        );
        assert_eq!(map.action(Key::parse("a").unwrap(), &all), None);
        assert_eq!(map.label(Action::Approve), "y/ctrl-a");
        o.insert("aprove".to_string(), vec!["a".to_string()]);
        let e = Keymap::new(&o).unwrap_err().to_string();
        assert!(
            e.contains("unknown action \"aprove\"") && e.contains("approve"),
            "{e}"
        );
        let mut bad = BTreeMap::new();
        bad.insert("veto".to_string(), vec!["shift-hyper".to_string()]);
        let e = format!("{:#}", Keymap::new(&bad).unwrap_err());
        assert!(
            e.contains("tui.keys.veto") && e.contains("unknown key"),
            "{e}"
        );
    }
}
