//! Per-turn rewards (the rating, else the judge's majority) with their moving average.

use super::{block, theme};
use crate::screen::Screen;
use clawrl_core::telemetry::moving_average;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::symbols::Marker;
use ratatui::text::Line;
use ratatui::widgets::{Axis, Chart, Dataset, GraphType, Paragraph};

/// Turns shown, and the moving-average window.
const SHOWN: usize = 120;
pub(crate) const WINDOW: usize = 10;

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let values: Vec<f64> = app.state.rewards.iter().map(|(_, r)| *r).collect();
    let n = values.len();
    let avg = moving_average(&values, WINDOW);
    let title = match avg.last() {
        Some(a) => format!("Rewards · {n} turns · avg{WINDOW} {a:+.2}"),
        None => "Rewards".to_string(),
    };
    if n == 0 {
        let p = Paragraph::new(vec![
            Line::raw(""),
            Line::styled(" No reward yet: a turn gets one when the", theme::dim()),
            Line::styled(" judge scores it or you rate it.", theme::dim()),
        ])
        .block(block(title, false));
        frame.render_widget(p, area);
        return;
    }
    let from = n.saturating_sub(SHOWN);
    let points: Vec<(f64, f64)> = (from..n).map(|i| ((i + 1) as f64, values[i])).collect();
    let line: Vec<(f64, f64)> = (from..n).map(|i| ((i + 1) as f64, avg[i])).collect();
    let x0 = (from + 1) as f64;
    let x1 = (n as f64).max(x0 + 1.0);
    let chart = Chart::new(vec![
        Dataset::default()
            .name("reward")
            .marker(Marker::Dot)
            .graph_type(GraphType::Scatter)
            .style(theme::user())
            .data(&points),
        Dataset::default()
            .name(format!("avg{WINDOW}"))
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(theme::accent())
            .data(&line),
    ])
    .block(block(title, false))
    .x_axis(
        Axis::default()
            .style(theme::dim())
            .bounds([x0, x1])
            .labels([format!("{}", from + 1), format!("{n}")]),
    )
    .y_axis(
        Axis::default()
            .style(theme::dim())
            .bounds([-1.1, 1.1])
            .labels(["-1", " 0", "+1"]),
    )
    .style(Style::new());
    frame.render_widget(chart, area);
}
