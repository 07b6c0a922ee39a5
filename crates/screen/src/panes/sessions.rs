//! Sessions from every client, most recently active first.

use super::{PaneId, block, theme};
use crate::keymap::Action;
use crate::screen::Screen;
use crate::text::{age, shorten};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{List, ListItem, ListState};

pub(crate) const COMMANDS: &[Action] = &[
    Action::Up,
    Action::Down,
    Action::Top,
    Action::Bottom,
    Action::Open,
];

pub(crate) fn on_action(app: &mut Screen, a: Action) {
    let ids: Vec<String> = app.state.sessions.iter().map(|s| s.id.clone()).collect();
    if ids.is_empty() {
        return;
    }
    let at = app
        .session_id()
        .and_then(|id| ids.iter().position(|s| s == id))
        .unwrap_or(0);
    let to = match a {
        Action::Up => at.saturating_sub(1),
        Action::Down => (at + 1).min(ids.len() - 1),
        Action::Top => 0,
        Action::Bottom => ids.len() - 1,
        Action::Open => {
            app.focus_on(PaneId::Conversation);
            return;
        }
        _ => return,
    };
    // The top of the list follows new sessions.
    app.selected_session = (to != 0).then(|| ids[to].clone());
    if to != at {
        app.selected_turn = None;
    }
}

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let focused = app.focus == PaneId::Sessions;
    let selected = app.session_id();
    // Inside the border, after the highlight symbol's column.
    let width = area.width.saturating_sub(3) as usize;
    let items: Vec<ListItem> = app
        .state
        .sessions
        .iter()
        .map(|s| {
            let (dot, style) = match &s.close_reason {
                None => ("● ", theme::good()),
                Some(_) => ("○ ", theme::dim()),
            };
            let turns = format!(" {}", s.turns.len());
            let when = format!("{:>4} ", age(app.now_ms, s.last_active_at));
            let room = width.saturating_sub(2 + when.len() + turns.len());
            let mut id = shorten(&s.id, room);
            while id.chars().count() < room {
                id.push(' ');
            }
            ListItem::new(Line::from(vec![
                Span::styled(dot, style),
                Span::styled(when, theme::dim()),
                Span::raw(id),
                Span::styled(turns, theme::dim()),
            ]))
        })
        .collect();
    let at = selected.and_then(|id| app.state.sessions.iter().position(|s| s.id == id));
    let title = format!(
        "{} ({})",
        PaneId::Sessions.title(),
        app.state.sessions.len()
    );
    let list = List::new(items)
        .block(block(title, focused))
        .highlight_style(theme::selected())
        .highlight_symbol("▌");
    let mut state = ListState::default().with_selected(at);
    frame.render_stateful_widget(list, area, &mut state);
}
