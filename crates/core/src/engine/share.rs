//! The share of the engine's time that background work (the guard, teacher log-probs, a
//! judge on its own model) is owed while user requests would keep it busy
//! (`engine.background_share`).

/// Background work's guaranteed share of a busy engine's time. While user requests keep the
/// engine busy and background work waits (the engine's own: judge prompts, teacher and guard
/// scores; or another thread's: [`clawrl_model::background::demand`]), the time owed to background
/// work grows by `share / (1 − share)` of the time spent serving; once it reaches
/// [`MIN_SLICE`] the engine pauses serving for it, running its own background jobs or, with
/// none, sleeping so that the low-priority trainer and judge threads get the cores. User
/// requests then take up to 1 / (1 − share) as long; without it an agent sending requests
/// back to back stopped learning altogether (issue 25: a candidate waited 6 minutes).
pub(super) struct Share {
    share: f64,
    owed: std::time::Duration,
    last: std::time::Instant,
}

/// The shortest pause for background work (a decoding step of the default model takes ~5 ms).
const MIN_SLICE: std::time::Duration = std::time::Duration::from_millis(200);
/// The longest one.
const MAX_SLICE: std::time::Duration = std::time::Duration::from_millis(1000);
/// How often a pause checks that background work still waits (else serving resumes).
pub(super) const POLL_IN_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

impl Share {
    pub(super) fn new(share: f64) -> Self {
        Self {
            share: share.clamp(0.0, 0.9),
            owed: std::time::Duration::ZERO,
            last: std::time::Instant::now(),
        }
    }

    /// Accounts the time since the last call; returns how long to pause serving now, if at all.
    pub(super) fn pause(
        &mut self,
        now: std::time::Instant,
        users_busy: bool,
        background_waits: bool,
    ) -> Option<std::time::Duration> {
        let dt = now.duration_since(self.last);
        self.last = now;
        if self.share <= 0.0 || !background_waits {
            self.owed = std::time::Duration::ZERO;
            return None;
        }
        if !users_busy {
            return None;
        }
        self.owed += dt.mul_f64(self.share / (1.0 - self.share));
        (self.owed >= MIN_SLICE).then(|| self.owed.min(MAX_SLICE))
    }

    /// A pause of `took` ended at `now` (it is not serving time).
    pub(super) fn paused(&mut self, took: std::time::Duration, now: std::time::Instant) {
        self.owed = self.owed.saturating_sub(took);
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn background_is_owed_its_share_of_serving_time_and_nothing_without_demand() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = Share::new(0.2);
        s.last = t0;
        // 0.2 / 0.8 of serving time: 200 ms owed after 800 ms of serving.
        assert_eq!(s.pause(at(400), true, true), None);
        assert_eq!(
            s.pause(at(800), true, true),
            Some(Duration::from_millis(200))
        );
        s.paused(Duration::from_millis(200), at(1000));
        assert_eq!(s.pause(at(1400), true, true), None, "the pause paid it");
        // Idle serving owes nothing; no demand forgets what was owed.
        assert_eq!(s.pause(at(5000), false, true), None);
        assert_eq!(s.pause(at(5400), true, false), None);
        assert_eq!(s.pause(at(5800), true, true), None);
        // Long stretches are paid in pauses of at most MAX_SLICE.
        assert_eq!(s.pause(at(30_000), true, true), Some(MAX_SLICE));
        // Share 0: never.
        let mut off = Share::new(0.0);
        off.last = t0;
        assert_eq!(off.pause(at(60_000), true, true), None);
    }
}
