//! metagrad: deep meta-learning with exact hypergradients, on Burn.
//!
//! Layers, bottom up; each imports only from the ones above it in this list:
//! - [`autodiff`]: the tensor layer usable at every autodiff level, gradients
//!   that stay differentiable, Hessian-vector products, Conv-4's native kernels,
//!   backend selection and the timing observer.
//! - [`data`]: datasets, the episode sampler, caches, downloads, episodes on
//!   disk, and tasks on the host.
//! - [`models`]: the `FunctionalModel` trait, named parameters, Conv-4 and an MLP.
//! - [`hypergrad`]: the inner loop and one file per hypergradient estimator,
//!   each written once over a stack of tasks.
//! - [`learner`]: `MetaLearner` (adapt, meta-gradient, Adam step) for any model.
//! - [`train`]: the trainer, evaluation, checkpoints, configuration, curves.
//! - [`bench`]: benchmarks printed as tables and JSON.

pub mod autodiff;
pub mod bench;
pub mod data;
pub mod hypergrad;
pub mod learner;
pub mod models;
pub mod train;

/// What a program using metagrad as a library needs first.
pub mod prelude {
    pub use crate::autodiff::tensor::{BaseBackend, Precision, Tensor};
    pub use crate::data::{Examples, Targets, Task};
    pub use crate::hypergrad::{Adapted, Batching, InnerLoop, Mode, QRule, TaskScores};
    pub use crate::learner::{MetaAdam, MetaLearner, MetaLrSchedule};
    pub use crate::models::{Conv4, FunctionalModel, Mlp, Params};

    /// The CPU backend (Burn's Flex).
    pub type Cpu = burn::backend::Flex;
}
