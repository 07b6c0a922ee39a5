//! The chat box: talk to the model from the screen. Its turns go through the same chat flow as
//! any client's (captured, judged, trained on), in a session of its own (`tui-…`).

use super::{PaneId, block};
use crate::keymap::Action;
use crate::screen::Screen;
use crossterm::event::{KeyCode, KeyEvent};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use tui_textarea::TextArea;

pub(crate) const COMMANDS: &[Action] = &[
    Action::Send,
    Action::Newline,
    Action::LeaveChat,
    Action::NewChat,
];

pub(crate) fn on_action(app: &mut Screen, a: Action) {
    match a {
        Action::Send => app.send_message(),
        Action::Newline => app.chat.input.insert_newline(),
        Action::LeaveChat => app.focus_on(PaneId::Conversation),
        Action::NewChat => app.new_chat(),
        _ => {}
    }
}

/// Keys that are not commands edit the message; ↑/↓ on a one-line message walk the history.
pub(crate) fn on_key(app: &mut Screen, e: KeyEvent) {
    let chat = &mut app.chat;
    let one_line = chat.input.lines().len() <= 1;
    let step = match e.code {
        KeyCode::Up if one_line => Some(-1isize),
        KeyCode::Down if one_line => Some(1),
        _ => None,
    };
    let Some(step) = step else {
        chat.input.input(e);
        return;
    };
    if chat.history.is_empty() {
        return;
    }
    let last = chat.history.len() as isize - 1;
    let pos = match chat.history_pos {
        None if step < 0 => Some(last),
        None => None,
        Some(p) => {
            let p = p as isize + step;
            (p <= last).then_some(p.max(0))
        }
    };
    chat.history_pos = pos.map(|p| p as usize);
    let text = pos.map_or(String::new(), |p| chat.history[p as usize].clone());
    chat.input = TextArea::from(text.split('\n').map(String::from));
    chat.input.move_cursor(tui_textarea::CursorMove::End);
    app.chat.style();
}

/// Rows the box takes: its lines (1 to 4) and the border.
pub fn height(app: &Screen) -> u16 {
    app.chat.input.lines().len().clamp(1, 4) as u16 + 2
}

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let focused = app.focus == PaneId::Chat;
    let status = if app.chat.awaiting {
        " · waiting for the reply…"
    } else {
        ""
    };
    let title = format!("{} · {}{status}", PaneId::Chat.title(), app.chat.session_id);
    let mut input = app.chat.input.clone();
    input.set_block(block(title, focused));
    if !focused {
        input.set_cursor_style(Style::new());
    }
    frame.render_widget(&input, area);
}
