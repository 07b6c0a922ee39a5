//! Accepting connections without falling over: a cap on open connections (more clients wait
//! in the listen backlog), a pause that grows while `accept` keeps failing (out of file
//! descriptors: retrying at once spins a core), and a failure that repeats logged once in a
//! while with a count, not once per attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
/// A failure that repeats is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    pause: Duration,
    failures: RepeatedFailure,
}

/// An accepted connection and its place among the open ones (freed when dropped).
pub(crate) struct Accepted {
    pub stream: TcpStream,
    pub slot: OwnedSemaphorePermit,
}

impl Acceptor {
    pub fn new(listener: TcpListener, max_connections: usize) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            pause: Duration::ZERO,
            failures: RepeatedFailure::new("accept"),
        }
    }

    /// The next connection, once fewer than the maximum are open. Cancel-safe.
    pub async fn next(&mut self) -> Accepted {
        loop {
            let slot = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.pause = Duration::ZERO;
                    self.failures.recovered();
                    return Accepted { stream, slot };
                }
                Err(e) => {
                    drop(slot);
                    self.failures.failed(&e);
                    self.pause = (self.pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
                    tokio::time::sleep(self.pause).await;
                }
            }
        }
    }
}

/// Logs a failure, then at most one report (with a count) every [`LOG_EVERY`] however often
/// it fails or flaps between failing and working.
pub(crate) struct RepeatedFailure {
    what: &'static str,
    since_logged: u64,
    last_logged: Option<Instant>,
}

impl RepeatedFailure {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            since_logged: 0,
            last_logged: None,
        }
    }

    fn due(&self) -> bool {
        self.last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY)
    }

    /// Records a failure; returns whether it was logged.
    pub fn failed(&mut self, e: &dyn std::fmt::Display) -> bool {
        if !self.due() {
            self.since_logged += 1;
            return false;
        }
        let what = self.what;
        match self.since_logged {
            0 => tracing::warn!("{what}: {e}"),
            n => tracing::warn!("{what}: {e} ({n} more failures since the last report)"),
        }
        self.since_logged = 0;
        self.last_logged = Some(Instant::now());
        true
    }

    /// Records a success: failures not reported yet are, when a report is due.
    pub(crate) fn recovered(&mut self) {
        if self.since_logged > 0 && self.due() {
            let (what, n) = (self.what, self.since_logged);
            tracing::warn!("{what} works again ({n} more failures since the last report)");
            self.since_logged = 0;
            self.last_logged = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_repeats_or_flaps_is_logged_once_per_interval() {
        let mut f = RepeatedFailure::new("accept");
        let mut logged = 0;
        for i in 0..10_000 {
            logged += usize::from(f.failed(&"Too many open files"));
            if i % 16 == 0 {
                f.recovered(); // descriptors freed now and then
            }
        }
        assert_eq!(logged, 1);
        assert_eq!(f.since_logged, 9_999);
        f.last_logged = Instant::now().checked_sub(LOG_EVERY);
        f.recovered();
        assert_eq!(
            f.since_logged, 0,
            "the count is reported once a report is due"
        );
        assert!(!f.failed(&"again"), "and the next report waits its turn");
    }
}
