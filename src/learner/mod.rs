//! `MetaLearner`: meta-learning for any `FunctionalModel`.
//!
//! ```no_run
//! # use metagrad::prelude::*;
//! # fn demo(tasks: Vec<Task>) -> anyhow::Result<()> {
//! let device = Default::default();
//! let model = Mlp::sinusoid();
//! let theta = model.init::<Cpu>(0, Precision::F32, &device);
//! let inner = InnerLoop::new(1, 0.01);
//! let mut learner = MetaLearner::new(model, theta, Mode::Maml, inner, 1e-3)?;
//! let batch: Vec<&Task> = tasks.iter().collect();
//! let scores = learner.step(&batch);          // meta-gradient + Adam
//! let fast = learner.adapt(&tasks[0].support); // fast weights for one task
//! # Ok(()) }
//! ```

pub mod adam;
pub mod schedule;

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::autodiff::diff::Objective;
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::data::task::{Examples, Task};
use crate::hypergrad::head::adapt_head_only;
use crate::hypergrad::inner::{InnerLoop, adapt_to};
use crate::hypergrad::meta_batch::{Batching, MetaGradient, TaskScores, meta_gradient};
use crate::hypergrad::mode::Mode;
use crate::hypergrad::task::{TaskLoss, accuracy};
use crate::models::{FunctionalModel, Params};

pub use adam::MetaAdam;
pub use schedule::MetaLrSchedule;

/// A model's meta-parameters θ, the mode that computes their hypergradient,
/// the inner loop, and Adam on θ.
pub struct MetaLearner<M: FunctionalModel, B: BaseBackend> {
    pub model: M,
    pub params: Params<B>,
    /// Carries ufo's adaptive-q state.
    pub mode: Mode,
    pub inner: InnerLoop,
    pub batching: Batching,
    pub optimizer: MetaAdam<B>,
    /// ufo's Bernoulli draws.
    pub rng: ChaCha8Rng,
}

impl<M: FunctionalModel, B: BaseBackend> MetaLearner<M, B> {
    /// A learner with Adam at `meta_lr`, tasks run task by task (on the GPU
    /// set `batching` to `Batching::Stacked`). Fails when the mode's settings
    /// do not fit the inner loop.
    pub fn new(model: M, params: Params<B>, mode: Mode, inner: InnerLoop, meta_lr: f64) -> Result<Self> {
        mode.validate(&inner)?;
        let optimizer = MetaAdam::new(meta_lr, params.len());
        Ok(MetaLearner { model, params, mode, inner, batching: Batching::TaskByTask, optimizer, rng: ChaCha8Rng::seed_from_u64(0) })
    }

    /// Fast weights for a task: the inner loop on its support examples from
    /// θ, as the mode adapts at validation and test time (`Mode::test_adaptation`).
    pub fn adapt(&self, support: &Examples) -> Params<B> {
        self.adapt_with(support, &self.inner)
    }

    /// `adapt` with another inner loop (e.g. more steps at test time). When
    /// it adapts only the head, the trunk runs once (`adapt_head_only`).
    pub fn adapt_with(&self, support: &Examples, inner: &InnerLoop) -> Params<B> {
        let theta = self.params.tensors();
        let loss = TaskLoss::single(&self.model, support, theta[0].precision(), &theta[0].device());
        let how = self.mode.test_adaptation();
        let fast = adapt_head_only(&loss, theta, inner, how).unwrap_or_else(|| adapt_to(&loss, theta, inner, how));
        self.params.with_tensors(fast)
    }

    /// The model's outputs [n, outputs] for examples, with given parameters.
    pub fn predict(&self, params: &Params<B>, examples: &Examples) -> Tensor<B> {
        let first = &params.tensors()[0];
        self.model.forward(params.tensors(), &self.model.inputs(examples, first.precision(), &first.device()), 1)
    }

    /// Adapt to a task's support set and measure its query set: (loss,
    /// accuracy for classification).
    pub fn evaluate(&self, task: &Task, inner: &InnerLoop) -> (f64, Option<f64>) {
        let fast = self.adapt_with(&task.support, inner);
        let first = &fast.tensors()[0];
        let query = TaskLoss::single(&self.model, &task.query, first.precision(), &first.device());
        let evaluation = query.evaluate(fast.tensors());
        let logits = evaluation.output.as_ref().expect("a task loss evaluation carries its outputs");
        (evaluation.loss.item(), task.query.targets.labels().map(|l| accuracy(logits, l)))
    }

    /// The mean hypergradient of a meta-batch under the learner's mode.
    pub fn meta_gradient(&mut self, tasks: &[&Task]) -> MetaGradient<B> {
        meta_gradient(&mut self.mode, &self.model, tasks, self.params.tensors(), &self.inner, self.batching, &mut self.rng)
    }

    /// The first-order (FO-MAML) meta-gradient, whatever the mode: for warm-up.
    pub fn first_order_meta_gradient(&mut self, tasks: &[&Task]) -> MetaGradient<B> {
        meta_gradient(&mut Mode::Fomaml, &self.model, tasks, self.params.tensors(), &self.inner, self.batching, &mut self.rng)
    }

    /// One Adam step on θ with a (meta-)gradient in θ's shapes.
    pub fn apply(&mut self, grad: &[Tensor<B>]) {
        let updated = self.optimizer.step(self.params.tensors(), grad);
        self.params = self.params.with_tensors(updated);
    }

    /// A meta-iteration: the meta-gradient of `tasks`, then an Adam step.
    /// Returns what the meta-batch measured before the step.
    pub fn step(&mut self, tasks: &[&Task]) -> TaskScores {
        let g = self.meta_gradient(tasks);
        let scores = g.read();
        self.apply(&g.grad);
        scores
    }
}
