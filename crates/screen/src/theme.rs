//! Colours shared by the panes.

use ratatui::style::{Color, Modifier, Style};
pub fn dim() -> Style {
    Style::new().fg(Color::DarkGray)
}
pub fn good() -> Style {
    Style::new().fg(Color::Green)
}
pub fn bad() -> Style {
    Style::new().fg(Color::Red)
}
pub fn user() -> Style {
    Style::new().fg(Color::Cyan)
}
pub(crate) fn accent() -> Style {
    Style::new().fg(Color::Yellow)
}
pub fn selected() -> Style {
    Style::new()
        .bg(Color::Rgb(40, 44, 52))
        .add_modifier(Modifier::BOLD)
}
/// +1 green, -1 red, 0 plain.
pub fn score(v: i8) -> Style {
    match v {
        1.. => good(),
        0 => Style::new(),
        _ => bad(),
    }
}
