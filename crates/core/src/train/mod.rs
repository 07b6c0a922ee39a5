//! Online training (PIPELINE.md §4–§5): captured turns with a reward and/or a hint become
//! samples; a background thread turns them into LoRA updates, one micro-step (one sample's
//! forward and backward pass) at a time, yielding to serving between micro-steps.

pub mod hints;
pub mod loss;
pub mod optimizer;
pub mod policy;
pub mod trainer;

pub use crate::store::PAUSED_SETTING;
pub use trainer::{TrainerHandle, TrainerStatus, spawn};
