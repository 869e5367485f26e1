//! Hypergradients: the outer gradient of a task's query loss after inner-loop
//! adaptation, by one of four modes, each written once over a stack of T
//! tasks (one task is T = 1). The mode dispatch is `estimate`, here only.
//!
//! θ are the meta-parameters, L_s and L_q a task's support and query losses.
//! The inner loop is r steps of gradient descent with step α:
//! φ_0 = θ, φ_{j+1} = φ_j − α ∇L_s(φ_j); the meta-loss is L_q(φ_r), and H_j
//! is the Hessian of L_s at φ_j.
//!
//! - `maml`: g = (I − αH_0)…(I − αH_{r−1}) ∇L_q(φ_r), exact. Computed by a
//!   backward sweep over the stored fast weights (one Hessian-vector product
//!   per step, memory flat in r) or, for checking, by differentiating the
//!   unrolled graph (`maml-unrolled`).
//! - `fomaml`: g = ∇L_q(φ_r).
//! - `ufo`: per task ξ ~ Bernoulli(q), g = g_fo + (ξ/q)(g_maml − g_fo), so
//!   E[g] = g_maml; q fixed or adapted to minimise cost × second moment.
//! - `implicit` (iMAML): φ minimises L_s(φ) + (λ/2)‖φ − θ‖² approximately (r
//!   steps from θ), and g solves (I + H_s(φ)/λ) g = ∇L_q(φ) by K steps of
//!   conjugate gradient. Its reference code's variant (plain inner steps, one
//!   step back toward θ, a damped system) is a setting of the same mode.
//! - `neumann` (AID-NS, as in stocBiO) and `fixed-point` (AID-FP): the same
//!   system by a truncated Neumann series, with step η or with η = αλ.
//!
//! With head-only adaptation (`Adapted::Last(2)`) on a model with a
//! trunk–head split, training and test-time adaptation run on the trunk's
//! features, computed once per task (head.rs); adaptive ufo, whose moments
//! are norms over all parameters, runs through the whole model.

pub mod files;
pub mod fomaml;
pub mod head;
pub mod implicit;
pub mod inner;
pub mod maml;
pub mod meta_batch;
pub mod mode;
pub mod neumann;
pub mod result;
pub mod stack;
pub mod task;
pub mod ufo;

pub use fomaml::fomaml;
pub use head::{HeadLoss, adapt_head_only, estimate_head_only};
pub use implicit::{ImplicitVariant, InnerSolve, LinearSolver, Sampling, conjugate_gradient, implicit, implicit_sampled, implicit_variant, implicit_with};
pub use inner::{Adaptation, Adapted, InnerLoop, adapt, adapt_to, adapted, axpy, inner_step, meta_loss, proximal_adapt, sgd_step};
pub use maml::{maml, maml_unrolled};
pub use meta_batch::{Batching, MetaGradient, TaskScores, meta_gradient, task_hypergradient};
pub use mode::{Mode, estimate, hypergradient};
pub use result::{CurvatureWarning, Draws, Hypergradient, UfoDraws};
pub use task::{TaskSubsets, TaskLoss};
pub use ufo::{AdaptiveQ, QRule, ufo, ufo_mean};
