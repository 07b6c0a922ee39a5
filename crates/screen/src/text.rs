//! Text helpers for panes: wrapping to a width, shortening, and human units.

use unicode_width::UnicodeWidthChar;

/// Wraps `text` to `width` columns (words kept whole when they fit; newlines kept).
pub(crate) fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    for paragraph in text.split('\n') {
        let mut line = String::new();
        let mut used = 0;
        for word in paragraph.split_inclusive(' ') {
            let w: usize = word.chars().map(|c| c.width().unwrap_or(0)).sum();
            if used + w > width && used > 0 {
                lines.push(std::mem::take(&mut line).trim_end().to_string());
                used = 0;
            }
            for c in word.chars() {
                let cw = c.width().unwrap_or(0);
                if used + cw > width && used > 0 {
                    lines.push(std::mem::take(&mut line));
                    used = 0;
                }
                line.push(c);
                used += cw;
            }
        }
        lines.push(line.trim_end().to_string());
    }
    lines
}

/// `s` on one line, cut to `width` columns with an ellipsis.
pub fn shorten(s: &str, width: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    let mut used = 0;
    for c in one_line.chars() {
        let cw = c.width().unwrap_or(0);
        if used + cw + 1 > width && one_line.chars().count() > out.chars().count() + 1 {
            out.push('…');
            return out;
        }
        out.push(c);
        used += cw;
    }
    out
}

/// How long ago, in the largest unit: `12s`, `5m`, `3h`, `2d`.
pub(crate) fn age(now_ms: i64, then_ms: i64) -> String {
    let s = ((now_ms - then_ms) / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", n / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", n / (1u64 << 20) as f64)
    }
}

/// A score or rating: `+1`, `0`, `−1`.
pub fn signed(v: i8) -> &'static str {
    match v {
        1.. => "+1",
        0 => "0",
        _ => "−1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_and_cuts_long_ones() {
        assert_eq!(wrap("the quick brown fox", 10), ["the quick", "brown fox"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("a\n\nb", 5), ["a", "", "b"]);
        assert_eq!(shorten("hello   big\nworld", 8), "hello b…");
        assert_eq!(shorten("short", 8), "short");
        assert_eq!(age(100_000, 40_000), "1m");
    }
}
