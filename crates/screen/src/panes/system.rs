//! Hardware and serving: GPUs (NVML) or a clear "no GPU", CPU, RAM, this process, tokens/s.

use super::{block, theme};
use crate::screen::Screen;
use crate::text::bytes;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Sparkline};

/// `[#####.....]` for a percentage.
fn bar(percent: f64, width: usize) -> String {
    let filled = ((percent / 100.0) * width as f64)
        .round()
        .clamp(0.0, width as f64) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

pub fn draw(frame: &mut Frame, area: Rect, app: &Screen) {
    let s = &app.state;
    let mut lines = Vec::new();
    match &s.hardware {
        None => lines.push(Line::styled("reading the hardware…", theme::dim())),
        Some(h) => {
            for g in &h.gpus {
                let util = g
                    .utilization_percent
                    .map_or("-".into(), |u| format!("{u}%"));
                let mem = match (g.memory_used, g.memory_total) {
                    (Some(u), Some(t)) => format!("{}/{}", bytes(u), bytes(t)),
                    _ => "-".into(),
                };
                let temp = g.temperature_c.map_or(String::new(), |t| format!(" {t}°C"));
                lines.push(Line::raw(format!("GPU{} {util} {mem}{temp}", g.index)));
                lines.push(Line::styled(format!("  {}", g.name), theme::dim()));
            }
            if let Some(note) = &h.gpu_note {
                lines.push(Line::styled(note.clone(), theme::dim()));
            }
            lines.push(Line::from(vec![
                Span::raw(format!("CPU {:>3.0}% ", h.cpu_percent)),
                Span::styled(bar(h.cpu_percent as f64, 10), theme::accent()),
                Span::styled(format!(" {} cores", h.cpu_cores), theme::dim()),
            ]));
            lines.push(Line::raw(format!(
                "RAM {}/{}",
                bytes(h.ram_used),
                bytes(h.ram_total)
            )));
            lines.push(Line::raw(format!("clawrl RSS {}", bytes(h.process_rss))));
            // What holds it: the models' weights and the prefix cache; the rest is the
            // runtime, decoding's buffers and, during an update, training.
            let v = &s.serving;
            let held = v.policy_weight_bytes + v.judge_weight_bytes + v.prefix_cache_bytes;
            let mut parts = format!("  policy {}", bytes(v.policy_weight_bytes));
            if v.judge_weight_bytes > 0 {
                parts += &format!(" · judge {}", bytes(v.judge_weight_bytes));
            }
            lines.push(Line::styled(parts, theme::dim()));
            lines.push(Line::styled(
                format!(
                    "  KV {} · other {}",
                    bytes(v.prefix_cache_bytes),
                    bytes(h.process_rss.saturating_sub(held))
                ),
                theme::dim(),
            ));
        }
    }
    let speed = s
        .decode_speed
        .map_or("-".into(), |v| format!("{v:.0} tok/s"));
    lines.push(Line::raw(format!(
        "decode {speed} · queue {} · active {}",
        s.serving.queue_depth, s.serving.active
    )));
    let outer = block("System".to_string(), false);
    let inner = outer.inner(area);
    frame.render_widget(outer, area);
    let text_rows = (lines.len() as u16).min(inner.height.saturating_sub(2));
    let [text, spark] =
        Layout::vertical([Constraint::Length(text_rows), Constraint::Max(3)]).areas(inner);
    frame.render_widget(Paragraph::new(lines), text);
    if spark.height > 0 {
        let data: Vec<u64> = s.tokens_per_sec.iter().copied().collect();
        let shown = &data[data.len().saturating_sub(spark.width as usize)..];
        frame.render_widget(Sparkline::default().data(shown).style(theme::good()), spark);
    }
}
