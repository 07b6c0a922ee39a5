//! clawrl-tui: serve a local LLM, watch its conversations, and improve it from them.
//! See docs/ARCHITECTURE.md for how the modules fit together.

pub mod bench;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod device;
pub mod logging;
pub mod model;
