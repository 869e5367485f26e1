//! metagrad: deep meta-learning with exact hypergradients, on Burn.
//!
//! Modules, one per concept:
//! - [`tensor`]: a typed tensor over Burn's op traits, usable at every autodiff level.
//! - [`kernels`]: Conv-4's convolution, batch norm and pooling as native CPU kernels that differentiate twice.
//! - [`diff`]: gradients that stay differentiable, and Hessian-vector products.
//! - [`model`]: the Conv-4 learner with PyTorch parameter names.
//! - [`hypergrad`]: inner-loop adaptation and meta-gradients.
//! - [`batched`]: a whole meta-batch as one stacked network.
//! - [`data`]: datasets in memory and the seeded episode sampler.
//! - [`dataset`]: dataset names, roots and split loading.
//! - [`synthetic`]: the embedded procedural dataset.
//! - [`omniglot`]: Omniglot from the official archives.
//! - [`mini_imagenet`]: Mini-ImageNet in the Ravi & Larochelle layout.
//! - [`cache`]: the binary cache of decoded images.
//! - [`fetch`]: verified, resumable downloads.
//! - [`plot`]: episode previews and training curves as PNG.
//! - [`profile`]: where hypergradient time goes (forward, backward, HVP).
//! - [`config`]: training configuration (TOML with overrides).
//! - [`train`]: the training loop, Adam, validation and evaluation.
//! - [`checkpoint`]: complete, atomic checkpoints and resume.
//! - [`episode`]: episodes as safetensors files.
//! - [`store`]: safetensors files and atomic writes.
//! - [`backend`]: CPU (Flex) and GPU (wgpu) selection.
//! - [`bench`]: benchmarks printed as tables and JSON.

pub mod backend;
pub mod batched;
pub mod bench;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dataset;
pub mod diff;
pub mod episode;
pub mod fetch;
pub mod fixed_episodes;

pub mod hypergrad;
pub mod kernels;
pub mod mini_imagenet;
pub mod model;
pub mod omniglot;
pub mod plot;
pub mod profile;
pub mod store;
pub mod synthetic;
pub mod tensor;
pub mod train;
