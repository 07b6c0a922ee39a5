//! clawrl's core: everything between the model and the faces (the HTTP server, the screen,
//! the CLI). Built from the configuration by [`app::build`], it serves through the engine,
//! captures every turn into the store, has the judge vote on it, trains LoRA updates in the
//! background and gates each new version. docs/ARCHITECTURE.md draws how the modules fit.

pub mod app;
pub mod capture;
pub mod catalog;
pub mod config;
pub mod engine;
pub mod events;
pub mod gate;
pub mod http_client;
pub mod judge;
pub mod logging;
pub mod messages;
pub mod store;
pub mod telemetry;
pub mod train;
