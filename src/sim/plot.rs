//! The reward curve of a run as a PNG (plotters): each interaction's reward (+1 / -1), its
//! moving average, and a mark where a new version went live. Text needs a font: the first
//! system TrueType font found (or `$CLAWRL_FONT`); without one the curve is drawn unlabelled.

use super::report::Interaction;
use anyhow::{Result, anyhow};
use clawrl_core::telemetry::moving_average;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font for plotters once; whether one was found.
fn font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let candidates = std::env::var("CLAWRL_FONT")
            .ok()
            .into_iter()
            .chain(FONTS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn plotting<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow!("drawing the reward curve: {e}")
}

/// Writes the curve to `path`. Returns whether it has labels (a font was found).
pub fn reward_curve(path: &Path, rows: &[Interaction], window: usize, title: &str) -> Result<bool> {
    let labelled = font();
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plotting)?;
    let n = rows.len().max(1) as f64;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labelled {
        builder
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(0.5f64..n + 0.5, -1.2f64..1.2)
        .map_err(plotting)?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0));
    if labelled {
        mesh.x_desc("interaction")
            .y_desc("reward (+1 preferred, -1 not)");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(plotting)?;
    // Versions going live: a vertical line where the live version changed.
    let mut last = rows.first().map_or(0, |r| r.live_version);
    for r in rows {
        if r.live_version != last {
            last = r.live_version;
            let x = r.index as f64;
            chart
                .draw_series(LineSeries::new(vec![(x, -1.2), (x, 1.2)], GREEN.mix(0.4)))
                .map_err(plotting)?;
        }
    }
    let rewards: Vec<f64> = rows
        .iter()
        .map(|r| if r.satisfied { 1.0 } else { -1.0 })
        .collect();
    chart
        .draw_series(
            rows.iter()
                .zip(&rewards)
                .map(|(r, v)| Circle::new((r.index as f64, *v), 4, BLUE.filled())),
        )
        .map_err(plotting)?;
    let avg = moving_average(&rewards, window);
    let line = chart
        .draw_series(LineSeries::new(
            rows.iter().zip(avg).map(|(r, a)| (r.index as f64, a)),
            RED.stroke_width(2),
        ))
        .map_err(plotting)?;
    if labelled {
        line.label(format!("moving average ({window})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plotting)?;
    }
    root.present().map_err(plotting)?;
    Ok(labelled)
}
