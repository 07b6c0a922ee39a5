//! Training: the update in progress, then loss and KL from the base per version.

use super::{block, theme};
use crate::screen::Screen;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::symbols::Marker;
use ratatui::text::Line;
use ratatui::widgets::{Axis, Chart, Dataset, GraphType, Paragraph};

/// One line on what the trainer is doing.
pub(crate) fn activity(app: &Screen) -> String {
    let s = &app.state;
    match &s.training {
        _ if s.paused => "paused (p resumes)".to_string(),
        Some(p) => {
            let loss = p.loss.map_or(String::new(), |l| format!(", loss {l:.3}"));
            format!(
                "training from v{}: {}/{} samples{loss}",
                p.parent, p.done, p.samples
            )
        }
        None => match s.held_candidate() {
            Some(c) => format!("v{c} waits for a decision (a/v)"),
            None => format!("idle · {} samples waiting", s.samples_waiting),
        },
    }
}

/// A value for an axis label: 3 decimals, or scientific when smaller.
fn number(v: f64) -> String {
    if v == 0.0 || v.abs() >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

fn chart<'a>(name: &'a str, points: &'a [(f64, f64)], x: [f64; 2]) -> Chart<'a> {
    // Losses can be negative (the RL term): the axis spans the values and zero.
    let low = points.iter().map(|p| p.1).fold(0.0f64, f64::min);
    let high = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let pad = if high > low { (high - low) * 0.1 } else { 1.0 };
    let (low, high) = (if low < 0.0 { low - pad } else { 0.0 }, high + pad);
    Chart::new(vec![
        Dataset::default()
            .name(name)
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(theme::accent())
            .data(points),
    ])
    .x_axis(
        Axis::default()
            .title(Line::styled(name, theme::accent()))
            .style(theme::dim())
            .bounds(x),
    )
    .y_axis(
        Axis::default()
            .style(theme::dim())
            .bounds([low, high])
            .labels([number(low), number(high)]),
    )
}

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let versions = &app.state.versions;
    let title = format!("Training · {}", activity(app));
    let outer = block(title, false);
    let inner = outer.inner(area);
    frame.render_widget(outer, area);
    if versions.is_empty() {
        let p = Paragraph::new(vec![
            Line::raw(""),
            Line::styled(" No update yet. Rated and judged turns", theme::dim()),
            Line::styled(" become samples; updates follow.", theme::dim()),
        ]);
        frame.render_widget(p, inner);
        return;
    }
    let loss: Vec<(f64, f64)> = versions.iter().map(|v| (v.id as f64, v.loss)).collect();
    let kl: Vec<(f64, f64)> = versions
        .iter()
        .filter_map(|v| v.kl_base.map(|k| (v.id as f64, k)))
        .collect();
    let first = versions.first().map_or(0, |v| v.id) as f64;
    let last = versions.last().map_or(1, |v| v.id) as f64;
    let x = [first, last.max(first + 1.0)];
    let [top, bottom] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    frame.render_widget(chart("loss/update", &loss, x), top);
    frame.render_widget(chart("KL from base", &kl, x), bottom);
}
