//! Counters shared by the server and the engine, rendered as Prometheus text on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Counters {
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub tokens_in: AtomicU64,
    pub tokens_out: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Microseconds spent decoding (for tokens/s).
    pub decode_micros: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active_sequences: AtomicU64,
    pub active_sessions: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn prometheus(&self) -> String {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let secs = g(&self.decode_micros) as f64 / 1e6;
        let tps = if secs > 0.0 {
            g(&self.tokens_out) as f64 / secs
        } else {
            0.0
        };
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "clawrl_requests_total",
            "counter",
            "Chat completion requests received.",
            g(&self.requests).to_string(),
        );
        metric(
            "clawrl_request_errors_total",
            "counter",
            "Requests answered with an error.",
            g(&self.request_errors).to_string(),
        );
        metric(
            "clawrl_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            g(&self.tokens_in).to_string(),
        );
        metric(
            "clawrl_cached_prompt_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            g(&self.cached_tokens).to_string(),
        );
        metric(
            "clawrl_completion_tokens_total",
            "counter",
            "Tokens generated.",
            g(&self.tokens_out).to_string(),
        );
        metric(
            "clawrl_decode_tokens_per_second",
            "gauge",
            "Generated tokens per second of decoding time (since start).",
            format!("{tps:.3}"),
        );
        metric(
            "clawrl_queue_depth",
            "gauge",
            "Requests waiting for the engine.",
            g(&self.queue_depth).to_string(),
        );
        metric(
            "clawrl_active_sequences",
            "gauge",
            "Requests being generated.",
            g(&self.active_sequences).to_string(),
        );
        metric(
            "clawrl_active_sessions",
            "gauge",
            "Open conversation sessions.",
            g(&self.active_sessions).to_string(),
        );
        out
    }
}
