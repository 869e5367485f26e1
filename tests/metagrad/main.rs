//! metagrad's integration tests, in one binary so Burn is linked once.

mod common;
mod batched;
mod cli;
mod data;
mod faults;
mod fetch;
mod fixed_episodes;
mod head_only;
mod hypergrad;
mod implicit;
mod learner;
mod mini_imagenet;
mod model;
mod omniglot;
mod schedule;
mod ops;
mod store;
mod train;
mod wgpu;
