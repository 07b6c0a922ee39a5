//! The help overlay (every binding, from the same table the key handler uses) and the
//! confirmation box.

use super::{PaneId, commands, theme};
use crate::keymap::Action;
use crate::screen::{GLOBAL, Screen};
use crate::text::shorten;
use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    cell
}

/// The sections of the help: the keys that work everywhere, then each pane's.
fn sections() -> [(&'static str, &'static [Action]); 5] {
    [
        ("Everywhere", GLOBAL),
        (PaneId::Chat.title(), commands(PaneId::Chat)),
        (PaneId::Sessions.title(), commands(PaneId::Sessions)),
        (PaneId::Conversation.title(), commands(PaneId::Conversation)),
        (PaneId::Updates.title(), commands(PaneId::Updates)),
    ]
}

/// The lines of some sections, each description cut to fit `width`.
fn lines(app: &Screen, sections: &[(&str, &[Action])], width: usize) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    for (title, actions) in sections {
        out.push(Line::styled(
            title.to_string(),
            theme::accent().add_modifier(Modifier::BOLD),
        ));
        for a in *actions {
            out.push(Line::from(vec![
                Span::styled(format!(" {:<12}", app.keymap.label(*a)), theme::user()),
                Span::raw(shorten(a.description(), width.saturating_sub(13))),
            ]));
        }
    }
    out
}

const NOTE: &str = "Change keys in the config file, [tui.keys]. Any key closes this help.";

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let all = sections();
    let one_column = lines(app, &all, 74);
    let block = Block::bordered()
        .title(" Help ")
        .border_style(theme::user());
    // One column when it fits, else two.
    if one_column.len() as u16 + 3 <= area.height {
        let popup = centered(area, 78, one_column.len() as u16 + 3);
        frame.render_widget(Clear, popup);
        let mut text = one_column;
        text.push(Line::styled(NOTE, theme::dim()));
        frame.render_widget(Paragraph::new(text).block(block), popup);
        return;
    }
    let width = area.width.min(100);
    let half = (width.saturating_sub(3) / 2) as usize;
    let (left, right) = all.split_at(2);
    let left = lines(app, left, half);
    let right = lines(app, right, half);
    let height = left.len().max(right.len()) as u16 + 3;
    let popup = centered(area, width, height);
    frame.render_widget(Clear, popup);
    let inner = block.inner(popup);
    frame.render_widget(block, popup);
    let [columns, note] =
        Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    let [l, r] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
        .spacing(1)
        .areas(columns);
    frame.render_widget(Paragraph::new(left), l);
    frame.render_widget(Paragraph::new(right), r);
    frame.render_widget(Paragraph::new(Line::styled(NOTE, theme::dim())), note);
}

pub(crate) fn draw_confirm(frame: &mut Frame, area: Rect, question: &str) {
    let popup = centered(area, 60, 4);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(question.to_string())
            .wrap(Wrap { trim: true })
            .block(
                Block::bordered()
                    .title(" Confirm ")
                    .border_style(theme::accent()),
            ),
        popup,
    );
}
