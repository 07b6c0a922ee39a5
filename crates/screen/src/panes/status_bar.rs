//! The top line (model, address, live version, training, judge, speed) and the bottom line
//! (the focused pane's keys, or the latest notice).

use super::{commands, theme};
use crate::keymap::Action;
use crate::screen::{Screen, View};
use clawrl_core::events::Level;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

/// How long a notice replaces the key hints.
const NOTICE_MS: i64 = 8000;

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let s = &app.state;
    let sep = || Span::styled(" │ ", theme::dim());
    let view = |v: View, label: &'static str| {
        if app.wide || app.view == v {
            Span::styled(label, Style::new().add_modifier(Modifier::REVERSED))
        } else {
            Span::styled(label, theme::dim())
        }
    };
    let mut left = vec![
        Span::styled(" clawrl ", Style::new().fg(Color::Black).bg(Color::Cyan)),
        Span::raw(" "),
        view(View::Conversations, "1 Conversations"),
        Span::raw(" "),
        view(View::Training, "2 Training"),
        sep(),
    ];
    if s.model.is_none() {
        left.push(Span::styled("loading the model…", theme::accent()));
        left.push(sep());
    }
    left.extend([
        Span::styled(
            format!("live v{}", s.live_version),
            theme::good().add_modifier(Modifier::BOLD),
        ),
        sep(),
        Span::styled(
            super::training::activity(app),
            if s.paused {
                theme::accent()
            } else {
                Style::new()
            },
        ),
        sep(),
        Span::raw(format!("judge {} queued", s.judge_pending)),
    ]);
    if let Some(speed) = s.decode_speed {
        left.push(sep());
        left.push(Span::raw(format!("{speed:.0} tok/s")));
    }
    let left = Line::from(left);
    // Model and address on the right, as far as they fit.
    let model = Span::raw(app.header.model_id.clone());
    let room = (area.width as usize).saturating_sub(left.width() + 1);
    let with_url = Line::from(vec![
        model.clone(),
        Span::styled(format!(" {} ", app.header.url), theme::dim()),
    ]);
    let right = if with_url.width() <= room {
        with_url
    } else {
        Line::from(vec![model, Span::raw(" ")])
    };
    frame.render_widget(Paragraph::new(left), area);
    if right.width() <= room {
        frame.render_widget(Paragraph::new(right).right_aligned(), area);
    }
}

/// `key name` pairs for the footer.
fn hints(app: &Screen, actions: &[Action]) -> Vec<Span<'static>> {
    let mut out = Vec::new();
    for a in actions {
        out.push(Span::styled(app.keymap.label(*a), theme::user()));
        out.push(Span::raw(format!(" {}  ", a.name().replace('_', " "))));
    }
    out
}

pub(crate) fn draw_footer(frame: &mut Frame, area: Rect, app: &Screen) {
    if let Some(n) = app
        .state
        .notices
        .last()
        .filter(|n| app.now_ms - n.at_ms < NOTICE_MS)
    {
        let style = match n.level {
            Level::Error => theme::bad().add_modifier(Modifier::BOLD),
            Level::Info => theme::accent(),
        };
        frame.render_widget(
            Paragraph::new(Line::styled(format!(" {}", n.text), style)),
            area,
        );
        return;
    }
    let mut spans = vec![Span::raw(" ")];
    spans.extend(hints(app, commands(app.focus)));
    spans.extend(hints(app, &[Action::NextPane, Action::Help, Action::Quit]));
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}
