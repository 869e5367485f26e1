//! metagrad's integration tests, in one binary so Burn is linked once.

mod common;
mod cli;
mod data;
mod hypergrad;
mod model;
mod omniglot;
mod ops;
mod store;
mod wgpu;
