//! What a key press does: answers a pending confirmation, else the focused pane's command,
//! else an action that works everywhere, else typing into the chat box.

use crate::keymap::Key;
use crate::panes;
use crate::screen::{GLOBAL, PaneId, Screen};
use clawrl_core::events::Level;
use crossterm::event::{KeyEvent, KeyEventKind};

/// Handles one key press.
pub(crate) fn on_key(screen: &mut Screen, e: KeyEvent) {
    if e.kind == KeyEventKind::Release {
        return;
    }
    let key = Key::of(&e);
    if screen.help {
        screen.help = false;
        return;
    }
    if let Some(c) = screen.confirm.take() {
        if key == Key::parse("y").expect("a key") || key == Key::parse("enter").expect("a key") {
            screen.send(c.command);
        } else {
            screen.notice(Level::Info, "Cancelled.");
        }
        return;
    }
    let pane_commands = panes::commands(screen.focus);
    if let Some(a) = screen.keymap.action(key, pane_commands) {
        panes::on_action(screen, a);
        return;
    }
    let typing = screen.focus == PaneId::Chat;
    if !(typing && key.is_text())
        && let Some(a) = screen.keymap.action(key, GLOBAL)
    {
        screen.on_global(a);
        return;
    }
    if typing {
        panes::chat_box::on_key(screen, e);
    }
}
