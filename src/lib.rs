//! clawrl-tui: serve a local LLM, watch its conversations, and improve it from them. This
//! crate is the command line over the layers below (`clawrl-model`, `clawrl-core`,
//! `clawrl-server`, `clawrl-screen`); docs/ARCHITECTURE.md draws how they fit together.

#[cfg(feature = "lab")]
pub mod bench;
pub mod cli;
pub mod ctl;
pub mod sim;
