//! The panes: one module each, each declaring the key commands it handles (`COMMANDS`), which
//! feed the footer and the help. This module lays them out and routes actions to the focused one.

pub(crate) mod chat_box;
pub mod conversation;
pub mod help;
pub mod rewards;
pub mod sessions;
pub(crate) mod status_bar;
pub mod system;
pub mod training;
pub mod updates;

use super::keymap::Action;
use super::screen::{Screen, View};
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::widgets::{Block, BorderType};

pub use crate::screen::PaneId;

/// The key commands a pane handles when focused.
pub fn commands(pane: PaneId) -> &'static [Action] {
    match pane {
        PaneId::Sessions => sessions::COMMANDS,
        PaneId::Conversation => conversation::COMMANDS,
        PaneId::Chat => chat_box::COMMANDS,
        PaneId::Updates => updates::COMMANDS,
    }
}

pub(crate) fn on_action(app: &mut Screen, a: Action) {
    match app.focus {
        PaneId::Sessions => sessions::on_action(app, a),
        PaneId::Conversation => conversation::on_action(app, a),
        PaneId::Chat => chat_box::on_action(app, a),
        PaneId::Updates => updates::on_action(app, a),
    }
}

/// Terminals at least this wide show both views side by side.
pub(crate) const WIDE: u16 = 150;

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &mut Screen) {
    let area = frame.area();
    app.wide = area.width >= WIDE;
    if !app.focusable().contains(&app.focus) {
        app.focus = app.focusable()[0];
    }
    let [top, body, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    status_bar::draw(frame, top, app);
    if app.wide {
        let [left, right] =
            Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
                .areas(body);
        draw_conversations(frame, left, app);
        draw_training(frame, right, app);
    } else {
        match app.view {
            View::Conversations => draw_conversations(frame, body, app),
            View::Training => draw_training(frame, body, app),
        }
    }
    status_bar::draw_footer(frame, bottom, app);
    if let Some(c) = &app.confirm {
        help::draw_confirm(frame, area, &c.question);
    }
    if app.help {
        help::draw(frame, area, app);
    }
}

fn draw_conversations(frame: &mut Frame, area: Rect, app: &Screen) {
    let chat_height = chat_box::height(app);
    let [main, chat] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(chat_height)]).areas(area);
    let list_width = (main.width * 3 / 10).clamp(22, 34);
    let [list, conversation] =
        Layout::horizontal([Constraint::Length(list_width), Constraint::Min(20)]).areas(main);
    sessions::draw(frame, list, app);
    conversation::draw(frame, conversation, app);
    chat_box::draw(frame, chat, app);
}

fn draw_training(frame: &mut Frame, area: Rect, app: &Screen) {
    let [charts, lower] =
        Layout::vertical([Constraint::Percentage(45), Constraint::Min(8)]).areas(area);
    let [reward_area, training_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    rewards::draw(frame, reward_area, app);
    training::draw(frame, training_area, app);
    let [updates_area, system_area] =
        Layout::horizontal([Constraint::Percentage(58), Constraint::Percentage(42)]).areas(lower);
    updates::draw(frame, updates_area, app);
    system::draw(frame, system_area, app);
}

/// A pane's frame: its title, highlighted when focused.
pub fn block(title: String, focused: bool) -> Block<'static> {
    let style = if focused {
        Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)
    } else {
        Style::new().fg(Color::DarkGray)
    };
    Block::bordered()
        .border_type(if focused {
            BorderType::Thick
        } else {
            BorderType::Plain
        })
        .border_style(style)
        .title(format!(" {title} "))
        .title_style(style)
}
