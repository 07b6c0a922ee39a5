//! Fault injection for the fault tests: with `CLAWRL_FAILPOINT=<name>` in the environment the
//! named point fails, so a test can prove what a failure there leaves behind. Unset (always,
//! in normal use) a point costs one cached comparison.

use std::sync::OnceLock;

fn armed(name: &str) -> bool {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("CLAWRL_FAILPOINT").ok())
        .as_deref()
        == Some(name)
}

/// Panics when `CLAWRL_FAILPOINT` names this point (a bug).
pub fn hit(name: &str) {
    if armed(name) {
        panic!("failpoint `{name}` hit (CLAWRL_FAILPOINT)");
    }
}

/// Ends the process at once when `CLAWRL_FAILPOINT` names this point, as `kill -9` or a power
/// cut would: no unwinding, no flushing.
pub fn crash(name: &str) {
    if armed(name) {
        std::process::abort();
    }
}
