//! The selected session turn by turn: what was asked, the reply (streaming in), and what was
//! decided about it: the judge's votes and majority, the hint, the human rating, the version.

use super::{PaneId, block, theme};
use crate::keymap::Action;
use crate::screen::Screen;
use crate::state::TurnView;
use crate::text::{shorten, signed, wrap};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

pub(crate) const COMMANDS: &[Action] = &[
    Action::Up,
    Action::Down,
    Action::Top,
    Action::Bottom,
    Action::ThumbUp,
    Action::ThumbDown,
];

pub(crate) fn on_action(app: &mut Screen, a: Action) {
    let n = app
        .session_id()
        .and_then(|id| app.state.session(id))
        .map_or(0, |s| s.turns.len());
    if n == 0 {
        return;
    }
    let at = app.selected_turn.unwrap_or(n - 1).min(n - 1);
    // The last turn follows new ones (`None`).
    let select = |i: usize| (i + 1 < n).then_some(i);
    match a {
        Action::Up => app.selected_turn = select(at.saturating_sub(1)),
        Action::Down => app.selected_turn = select(at + 1),
        Action::Top => app.selected_turn = select(0),
        Action::Bottom => app.selected_turn = None,
        Action::ThumbUp => app.rate(1),
        Action::ThumbDown => app.rate(-1),
        _ => {}
    }
}

/// Where the columns start: `#12 you ` / `   v3   `.
const GUTTER: usize = 9;

fn turn_lines(t: &TurnView, width: usize, selected: bool) -> Vec<Line<'static>> {
    let text_width = width.saturating_sub(GUTTER + 1).max(8);
    let marker = if selected { "▌" } else { " " };
    let marker = Span::styled(marker, theme::user());
    let mut lines = Vec::new();
    let mut block = |label: String, label_style: Style, text: &str, style: Style| {
        for (i, piece) in wrap(text, text_width).into_iter().enumerate() {
            let gutter = if i == 0 { label.clone() } else { String::new() };
            lines.push(Line::from(vec![
                marker.clone(),
                Span::styled(format!("{gutter:<GUTTER$}"), label_style),
                Span::styled(piece, style),
            ]));
        }
    };
    let asked = if t.last_message.is_empty() {
        "(no text)"
    } else {
        t.last_message.as_str()
    };
    block(
        format!("#{} you", t.turn_index),
        theme::user(),
        asked,
        Style::new(),
    );
    let version = t.version.map_or("…".to_string(), |v| format!("v{v}"));
    let mut reply = t.reply.clone();
    if t.streaming {
        reply.push('▍');
    }
    let reply_style = if t.side { theme::dim() } else { Style::new() };
    block(
        format!("   {version}"),
        theme::accent(),
        &reply,
        reply_style,
    );
    let verdict = verdict(t);
    if !verdict.is_empty() {
        let mut spans = vec![marker.clone(), Span::raw(" ".repeat(GUTTER))];
        let mut used = GUTTER;
        for (i, s) in verdict.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { " · " };
            let w = s.content.chars().count() + sep.len();
            if used + w > width && i > 0 {
                lines.push(Line::from(std::mem::take(&mut spans)));
                spans = vec![marker.clone(), Span::raw(" ".repeat(GUTTER))];
                used = GUTTER;
            } else if i > 0 {
                spans.push(Span::styled(sep, theme::dim()));
            }
            used += w;
            spans.push(s);
        }
        lines.push(Line::from(spans));
    }
    lines.push(Line::raw(""));
    lines
}

/// What was decided about a turn, as short styled pieces.
fn verdict(t: &TurnView) -> Vec<Span<'static>> {
    let mut out = Vec::new();
    if let Some(e) = &t.error {
        out.push(Span::styled(
            format!("failed: {}", shorten(e, 60)),
            theme::bad(),
        ));
        return out;
    }
    if t.streaming {
        return out;
    }
    if t.side {
        out.push(Span::styled(
            "side turn: served, never trained",
            theme::dim(),
        ));
        return out;
    }
    match &t.judgment {
        Some(j) if j.error.is_some() => out.push(Span::styled(
            format!(
                "judge failed: {}",
                shorten(j.error.as_deref().unwrap_or(""), 40)
            ),
            theme::bad(),
        )),
        Some(j) => {
            let votes: Vec<&str> = j.votes.iter().map(|v| v.map_or("?", signed)).collect();
            out.push(Span::styled(
                format!("votes {} → {}", votes.join(" "), signed(j.score)),
                theme::score(j.score),
            ));
        }
        None if t.next_state.is_some() => out.push(Span::styled("judging…", theme::dim())),
        None if t.no_signal => {
            out.push(Span::styled("no signal: the session closed", theme::dim()))
        }
        None => out.push(Span::styled("waiting for the next message", theme::dim())),
    }
    if let Some(r) = t.rating {
        let (text, style) = if r > 0 {
            ("rated ▲ up", theme::good())
        } else {
            ("rated ▼ down", theme::bad())
        };
        out.push(Span::styled(text, style.add_modifier(Modifier::BOLD)));
    }
    // What distillation read once trained on (the judge's hint or the user's own words), else
    // the judge's hint, a candidate.
    match (
        &t.distilled,
        t.judgment.as_ref().and_then(|j| j.hint.as_deref()),
    ) {
        (Some(d), _) => out.push(Span::styled(
            format!("learned {} “{}”", d.source.describe(), shorten(&d.text, 18)),
            theme::accent(),
        )),
        (None, Some(h)) => out.push(Span::styled(
            format!("hint “{}”", shorten(h, 48)),
            theme::accent(),
        )),
        (None, None) => {}
    }
    if let Some(r) = t.reward() {
        out.push(Span::styled(
            format!("reward {}", signed(r)),
            theme::score(r),
        ));
    }
    out
}

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let focused = app.focus == PaneId::Conversation;
    let session = app.session_id().and_then(|id| app.state.session(id));
    let title = match session {
        Some(s) if s.source.is_empty() => s.id.clone(),
        Some(s) => format!("{} · {}", s.id, s.source),
        None => PaneId::Conversation.title().to_string(),
    };
    let inner_width = area.width.saturating_sub(2) as usize;
    let height = area.height.saturating_sub(2) as usize;
    let Some(session) = session.filter(|s| !s.turns.is_empty()) else {
        let empty = Paragraph::new(vec![
            Line::raw(""),
            Line::styled(
                format!(
                    "No conversation yet. Type in the chat box below, or point a client at {}",
                    app.header.url
                ),
                theme::dim(),
            ),
        ])
        .wrap(ratatui::widgets::Wrap { trim: true })
        .block(block(title, focused));
        frame.render_widget(empty, area);
        return;
    };
    let n = session.turns.len();
    let selected = app.selected_turn.unwrap_or(n - 1).min(n - 1);
    let render = |i: usize| turn_lines(&session.turns[i], inner_width, i == selected && focused);
    // Only the turns that can be seen are laid out (a long agent session has thousands): the
    // selected one, the ones before it that fill the pane, then any after it that still fit.
    let mut before = Vec::new();
    let (mut i, mut above) = (selected, 0);
    while i > 0 && above < height {
        i -= 1;
        let l = render(i);
        above += l.len();
        before.push(l);
    }
    let mut lines: Vec<Line> = before.into_iter().rev().flatten().collect();
    let start = lines.len();
    lines.extend(render(selected));
    let end = lines.len();
    // Show the selected turn's end (its newest text); its start if it is taller than the pane.
    let scroll = end.saturating_sub(height).min(start);
    let mut next = selected + 1;
    while next < n && lines.len() < scroll + height {
        lines.extend(render(next));
        next += 1;
    }
    let paragraph = Paragraph::new(lines)
        .block(block(title, focused))
        .scroll((scroll as u16, 0));
    frame.render_widget(paragraph, area);
}
