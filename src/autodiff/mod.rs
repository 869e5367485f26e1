//! The tensor layer: a typed tensor usable at every autodiff level, gradients
//! that stay differentiable, Conv-4's custom operations, backend selection
//! and the optional timing observer. Everything about autodiff levels lives
//! here; the layers above write `B: Level` and nothing more.

pub mod backend;
pub mod diff;
pub mod kernels;
pub mod profile;
pub mod tensor;
