//! clawrl-tui: serve a local LLM, watch its conversations, and improve it from them.
//! See docs/ARCHITECTURE.md for how the modules fit together.

pub mod app;
pub mod background;
pub mod bench;
pub mod capture;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod device;
pub mod engine;
pub mod events;
pub mod failpoint;
pub mod gate;
pub mod http_client;
pub mod judge;
pub mod logging;
pub mod messages;
pub mod model;
pub mod server;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod train;
pub mod tui;
