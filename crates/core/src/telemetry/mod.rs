//! Counters shared by the server and the engine, rendered as Prometheus text on `/metrics`, and
//! hardware readings (`hardware`).

pub mod hardware;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Counters {
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    /// Turns served but not captured (the store could not be written: a full disk).
    pub capture_errors: AtomicU64,
    pub tokens_in: AtomicU64,
    pub tokens_out: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Microseconds spent decoding (for tokens/s).
    pub decode_micros: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active_sequences: AtomicU64,
    pub active_sessions: AtomicU64,
    /// Bytes held by the prefix KV cache.
    pub prefix_cache_bytes: AtomicU64,
    /// Bytes of weights the policy's model holds, and the judge's own model (0: none).
    pub policy_weight_bytes: AtomicU64,
    pub judge_weight_bytes: AtomicU64,
    /// Turns with a next state waiting for the judge.
    pub judge_queue_depth: AtomicU64,
    pub judge_turns: AtomicU64,
    /// Score votes (PRM) cast, and those without a valid boxed score.
    pub judge_votes: AtomicU64,
    pub judge_invalid_votes: AtomicU64,
    /// Times the judge backend was unreachable (the turn is retried).
    pub judge_errors: AtomicU64,
    /// Microseconds spent judging (for votes/s).
    pub judge_micros: AtomicU64,
    pub feedback: AtomicU64,
}

/// The moving average of `values` over the last `window` points, point by point (the screen's
/// reward curve, the simulation's CSV and plot).
pub fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    (0..values.len())
        .map(|i| {
            let slice = &values[(i + 1).saturating_sub(window)..=i];
            slice.iter().sum::<f64>() / slice.len() as f64
        })
        .collect()
}

/// Appends one metric in Prometheus' text format.
pub fn push_metric(out: &mut String, name: &str, kind: &str, help: &str, value: &str) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    ));
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Every counter in Prometheus' text format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, kind, help, value) in self
            .serving_metrics()
            .into_iter()
            .chain(self.signal_metrics())
        {
            push_metric(&mut out, name, kind, help, &value);
        }
        out
    }

    /// Requests, tokens, the prefix cache, the queue and sessions.
    fn serving_metrics(&self) -> Vec<Metric> {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let tps = per_second(g(&self.tokens_out), g(&self.decode_micros));
        vec![
            (
                "clawrl_requests_total",
                "counter",
                "Chat completion requests received.",
                g(&self.requests).to_string(),
            ),
            (
                "clawrl_request_errors_total",
                "counter",
                "Requests answered with an error.",
                g(&self.request_errors).to_string(),
            ),
            (
                "clawrl_capture_errors_total",
                "counter",
                "Turns served but not captured because the store could not be written.",
                g(&self.capture_errors).to_string(),
            ),
            (
                "clawrl_prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                g(&self.tokens_in).to_string(),
            ),
            (
                "clawrl_cached_prompt_tokens_total",
                "counter",
                "Prompt tokens served from the prefix cache.",
                g(&self.cached_tokens).to_string(),
            ),
            (
                "clawrl_prefix_cache_bytes",
                "gauge",
                "Bytes of KV cache kept for prompt prefixes (server.prefix_cache_mb bounds it).",
                g(&self.prefix_cache_bytes).to_string(),
            ),
            (
                "clawrl_policy_weight_bytes",
                "gauge",
                "Bytes of weights the policy's model holds (dense and/or quantized blocks).",
                g(&self.policy_weight_bytes).to_string(),
            ),
            (
                "clawrl_judge_weight_bytes",
                "gauge",
                "Bytes of weights the judge's own model holds (0: it judges with the policy's base).",
                g(&self.judge_weight_bytes).to_string(),
            ),
            (
                "clawrl_completion_tokens_total",
                "counter",
                "Tokens generated.",
                g(&self.tokens_out).to_string(),
            ),
            (
                "clawrl_decode_tokens_per_second",
                "gauge",
                "Generated tokens per second of decoding time (since start).",
                format!("{tps:.3}"),
            ),
            (
                "clawrl_queue_depth",
                "gauge",
                "Requests waiting for the engine.",
                g(&self.queue_depth).to_string(),
            ),
            (
                "clawrl_active_sequences",
                "gauge",
                "Requests being generated.",
                g(&self.active_sequences).to_string(),
            ),
            (
                "clawrl_active_sessions",
                "gauge",
                "Open conversation sessions.",
                g(&self.active_sessions).to_string(),
            ),
        ]
    }

    /// The judge's work and the ratings people gave.
    fn signal_metrics(&self) -> Vec<Metric> {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let votes = g(&self.judge_votes);
        let votes_per_sec = per_second(votes, g(&self.judge_micros));
        let invalid_ratio = if votes > 0 {
            g(&self.judge_invalid_votes) as f64 / votes as f64
        } else {
            0.0
        };
        vec![
            (
                "clawrl_judge_queue_depth",
                "gauge",
                "Turns with a next state waiting for the judge.",
                g(&self.judge_queue_depth).to_string(),
            ),
            (
                "clawrl_judge_turns_total",
                "counter",
                "Turns judged.",
                g(&self.judge_turns).to_string(),
            ),
            (
                "clawrl_judge_votes_total",
                "counter",
                "Score votes cast by the judge.",
                votes.to_string(),
            ),
            (
                "clawrl_judge_invalid_votes_total",
                "counter",
                "Score votes without a valid boxed score.",
                g(&self.judge_invalid_votes).to_string(),
            ),
            (
                "clawrl_judge_invalid_vote_ratio",
                "gauge",
                "Invalid share of the score votes (since start).",
                format!("{invalid_ratio:.4}"),
            ),
            (
                "clawrl_judge_votes_per_second",
                "gauge",
                "Score votes per second of judging time (since start).",
                format!("{votes_per_sec:.3}"),
            ),
            (
                "clawrl_judge_errors_total",
                "counter",
                "Times the judge backend failed and the turn was retried later.",
                g(&self.judge_errors).to_string(),
            ),
            (
                "clawrl_feedback_total",
                "counter",
                "Human ratings recorded.",
                g(&self.feedback).to_string(),
            ),
        ]
    }
}

/// A metric's name, type, help and value.
type Metric = (&'static str, &'static str, &'static str, String);

/// Events per second of `micros` of work (0 before any).
fn per_second(n: u64, micros: u64) -> f64 {
    if micros > 0 {
        n as f64 / (micros as f64 / 1e6)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_moving_average_covers_the_last_window() {
        let avg = super::moving_average(&[1.0, -1.0, 1.0, 1.0], 2);
        assert_eq!(avg, vec![1.0, 0.0, 0.0, 1.0]);
    }
}
