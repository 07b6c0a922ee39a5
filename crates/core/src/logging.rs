//! Logging to a daily-rotated file in the data directory (a TUI owns the terminal, so logs
//! never go to it). `RUST_LOG` overrides the configured level.

use anyhow::{Context, Result};
use std::io::{self, Write};
use std::path::Path;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Starts file logging; keep the guard alive until exit so buffered lines are flushed.
pub fn init(log_dir: &Path, level: &str) -> Result<WorkerGuard> {
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("cannot create log directory {}", log_dir.display()))?;
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("clawrl")
        .filename_suffix("log")
        .max_log_files(14)
        .build(log_dir)
        .context("cannot open the log file")?;
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_writer(move || OneLine(writer.clone()))
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init()
        .ok();
    Ok(guard)
}

/// Keeps each log record on one line: a newline or other control character inside it (say, in
/// a client's `model` or session id) is written escaped, so no request can forge a log line.
/// The formatter hands over one whole record, newline included, per write.
struct OneLine<W>(W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let record = buf.strip_suffix(b"\n").unwrap_or(buf);
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in record {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.push(b),
                c if c < 0x20 || c == 0x7f => {
                    out.extend_from_slice(format!("\\x{c:02x}").as_bytes())
                }
                c => out.push(c),
            }
        }
        if record.len() != buf.len() {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_stays_on_one_line_whatever_its_values_hold() {
        let mut w = OneLine(Vec::new());
        w.write_all(b"INFO refused model=\"x\nINFO forged\r\x1b[2J\"\n")
            .unwrap();
        w.write_all(b"INFO next\n").unwrap();
        let text = String::from_utf8(w.0).unwrap();
        assert_eq!(
            text,
            "INFO refused model=\"x\\nINFO forged\\r\\x1b[2J\"\nINFO next\n"
        );
        assert_eq!(text.lines().count(), 2);
    }
}

/// Lets a repeated log line through at most once per interval (per message), so that a loop
/// meeting the same condition every second does not fill the log with it.
pub(crate) struct Repeats {
    every: std::time::Duration,
    /// Per message: when it was last let through, and how often it was held back since.
    last: std::collections::HashMap<String, (std::time::Instant, u64)>,
}

impl Repeats {
    pub fn new(every: std::time::Duration) -> Self {
        Self {
            every,
            last: Default::default(),
        }
    }

    /// `Some(held back since the last time)` when `message` may be logged now.
    pub fn fresh(&mut self, message: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last.get_mut(message) {
            Some((at, held)) if now.duration_since(*at) < self.every => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                self.last.insert(message.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod repeats_tests {
    use super::Repeats;
    use std::time::Duration;

    #[test]
    fn a_repeated_message_passes_once_per_interval_with_the_count_held_back() {
        let mut r = Repeats::new(Duration::from_millis(200));
        assert_eq!(r.fresh("set aside"), Some(0));
        assert_eq!(r.fresh("set aside"), None);
        assert_eq!(r.fresh("set aside"), None);
        assert_eq!(r.fresh("another"), Some(0), "each message on its own");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(r.fresh("set aside"), Some(2));
        assert_eq!(r.fresh("set aside"), None);
    }
}
