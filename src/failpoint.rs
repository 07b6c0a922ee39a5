//! Fault injection for the fault tests: with `CLAWRL_FAILPOINT=<name>` in the environment the
//! named point panics, so a test can prove what a crash there leaves behind. Unset (always, in
//! normal use) it costs one cached comparison.

use std::sync::OnceLock;

/// Panics when `CLAWRL_FAILPOINT` names this point.
pub fn hit(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("CLAWRL_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        panic!("failpoint `{name}` hit (CLAWRL_FAILPOINT)");
    }
}
