//! Training: the trainer loop, evaluation, checkpoints, configuration and
//! training curves.

pub mod checkpoint;
pub mod config;
pub mod plot;
pub mod trainer;

pub use trainer::*;
