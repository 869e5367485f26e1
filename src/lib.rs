//! metagrad: deep meta-learning with exact hypergradients, on Burn.
//!
//! Modules, one per concept:
//! - [`tensor`]: a typed tensor over Burn's op traits, usable at every autodiff level.
//! - [`diff`]: gradients that stay differentiable, and Hessian-vector products.
//! - [`model`]: the Conv-4 learner with PyTorch parameter names.
//! - [`hypergrad`]: inner-loop adaptation and meta-gradients.
//! - [`data`]: datasets in memory and the seeded episode sampler.
//! - [`synthetic`]: the embedded procedural dataset.
//! - [`omniglot`]: Omniglot from the official archives, with a binary cache.
//! - [`episode`]: episodes as safetensors files.
//! - [`store`]: safetensors files and atomic writes.
//! - [`backend`]: CPU (Flex) and GPU (wgpu) selection.
//! - [`bench`]: benchmarks printed as tables and JSON.

pub mod backend;
pub mod bench;
pub mod data;
pub mod diff;
pub mod episode;
pub mod hypergrad;
pub mod model;
pub mod omniglot;
pub mod store;
pub mod synthetic;
pub mod tensor;
