//! A model's loss on the support or query examples of T tasks at once.
//!
//! The tasks' inputs are laid out for the model's stacked forward, their
//! targets stacked task by task, and the loss is the sum of the per-task mean
//! losses: one reverse pass (and one Hessian-vector product per inner step)
//! then yields every task's gradient, since the Hessian of a sum of
//! independent tasks is block-diagonal. One task is the case T = 1.

use std::borrow::Cow;

use burn::backend::tensor::Device;
use rand_chacha::ChaCha8Rng;

use crate::autodiff::diff::{Evaluation, Objective};
use crate::autodiff::tensor::{BaseBackend, Level, Precision, Tensor};
use crate::data::task::{Examples, Targets};
use crate::models::FunctionalModel;

/// An objective over stacked tasks that can be narrowed to some of them,
/// or to random subsets of each task's examples.
pub trait TaskSubsets: Sized {
    /// The same objective over the `chosen` tasks only, in that order.
    fn select(&self, chosen: &[usize]) -> Self;

    /// The same objective on `size` examples of each task drawn without
    /// replacement, task t's with `rngs[t]`: an unbiased estimate of a
    /// mean-over-examples loss, its gradient and its Hessian.
    fn subsample(&self, size: usize, rngs: &mut [ChaCha8Rng]) -> Self;
}

/// Σ_t (mean loss of task t on its examples): cross-entropy for class
/// targets, squared error for values.
pub struct TaskLoss<'a, M, Base: Level> {
    model: &'a M,
    parts: Vec<Cow<'a, Examples>>,
    inputs: Tensor<Base>,
    /// One-hot rows or target values, [T·n, outputs], task by task.
    targets: Tensor<Base>,
    classes: bool,
}

impl<'a, M: FunctionalModel, Base: BaseBackend> TaskLoss<'a, M, Base> {
    /// The loss over `parts`, one batch of examples per task, all of one size.
    pub fn new(model: &'a M, parts: &[&'a Examples], precision: Precision, device: &Device<Base>) -> Self {
        Self::from_parts(model, parts.iter().map(|p| Cow::Borrowed(*p)).collect(), precision, device)
    }

    fn from_parts(model: &'a M, parts: Vec<Cow<'a, Examples>>, precision: Precision, device: &Device<Base>) -> Self {
        let n = parts[0].len();
        assert!(parts.iter().all(|p| p.dims == parts[0].dims), "stacked tasks need examples of one shape and number");
        let width = parts[0].targets.width();
        assert_eq!(width, model.outputs(), "targets of width {width} for {} with {} outputs", model.describe(), model.outputs());
        let inputs: Vec<&[f32]> = parts.iter().map(|p| p.inputs.as_slice()).collect();
        let (values, dims) = model.stack_inputs(&inputs, n);
        let targets: Vec<f64> = parts.iter().flat_map(|p| p.targets.to_rows()).collect();
        let (inputs, targets) = (Tensor::from_f64(&values, &dims, precision, device), Tensor::from_f64(&targets, &[parts.len() * n, width], precision, device));
        let classes = matches!(parts[0].targets, Targets::Classes { .. });
        TaskLoss { model, parts, inputs, targets, classes }
    }

    /// The loss on one task's examples.
    pub fn single(model: &'a M, examples: &'a Examples, precision: Precision, device: &Device<Base>) -> Self {
        TaskLoss::new(model, &[examples], precision, device)
    }

    pub fn examples(&self) -> impl Iterator<Item = &Examples> {
        self.parts.iter().map(|p| p.as_ref())
    }

    /// Each task's mean loss [T] from an evaluation of this objective (the
    /// evaluated loss itself for one task).
    pub fn task_losses(&self, evaluation: &Evaluation<Base>) -> Tensor<Base> {
        if self.parts.len() == 1 {
            return evaluation.loss.reshape(&[1]);
        }
        let output = evaluation.output.as_ref().expect("a task loss evaluation carries its outputs");
        per_task_losses(output, &self.targets, self.classes, self.parts.len())
    }

    /// The model, and the stacked inputs and targets, for an objective over
    /// the same examples in another form (the head on features, head.rs).
    pub(crate) fn model(&self) -> &'a M {
        self.model
    }

    pub(crate) fn inputs(&self) -> &Tensor<Base> {
        &self.inputs
    }

    pub(crate) fn classes(&self) -> bool {
        self.classes
    }
}

/// The sum over T tasks of their mean loss, from outputs [T·n, K] and
/// targets of the same shape: cross-entropy for classes (one-hot targets),
/// squared error for values.
pub(crate) fn stacked_loss<B: Level>(output: &Tensor<B>, targets: &Tensor<B>, classes: bool, tasks: usize) -> Tensor<B> {
    let mean = if classes {
        output.cross_entropy(targets)
    } else {
        let d = output.dims();
        output.sub(targets).square().sum().mul_scalar(1.0 / (d[0] * d[1]) as f64)
    };
    // The mean over all T·n rows, times T: the sum of the per-task means.
    if tasks == 1 { mean } else { mean.mul_scalar(tasks as f64) }
}

/// Each task's mean loss [T], as `stacked_loss` sums them.
pub(crate) fn per_task_losses<B: Level>(output: &Tensor<B>, targets: &Tensor<B>, classes: bool, tasks: usize) -> Tensor<B> {
    let [rows, per_row] = output.dims()[..] else { unreachable!("outputs are [T·n, K]") };
    let n = rows / tasks;
    let per_task = |t: Tensor<B>| t.reshape(&[tasks, n * per_row]).sum_dim(1).reshape(&[tasks]);
    if classes {
        per_task(output.log_softmax().mul(targets)).mul_scalar(-1.0 / n as f64)
    } else {
        per_task(output.sub(targets).square()).mul_scalar(1.0 / (n * per_row) as f64)
    }
}

/// `size` of a task's `n` examples drawn without replacement, in order: the
/// one way the stochastic modes subsample, whatever form the loss takes.
pub(crate) fn draw_subset(rng: &mut ChaCha8Rng, n: usize, size: usize) -> Vec<usize> {
    assert!(size >= 1 && size <= n, "a subset of {size} of a task's {n} examples");
    let mut chosen = rand::seq::index::sample(rng, n, size).into_vec();
    chosen.sort_unstable();
    chosen
}

impl<M: FunctionalModel, Base: BaseBackend> Objective<Base> for TaskLoss<'_, M, Base> {
    fn eval<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Tensor<B> {
        self.evaluate(params).loss
    }

    fn evaluate<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Evaluation<B> {
        let tasks = self.parts.len();
        let output = self.model.forward(params, &Tensor::from_base(&self.inputs), tasks);
        let loss = stacked_loss(&output, &Tensor::from_base(&self.targets), self.classes, tasks);
        Evaluation { loss, output: Some(output) }
    }

    fn tasks(&self) -> usize {
        self.parts.len()
    }
}

impl<M: FunctionalModel, Base: BaseBackend> TaskSubsets for TaskLoss<'_, M, Base> {
    fn select(&self, chosen: &[usize]) -> Self {
        let parts = chosen.iter().map(|&t| self.parts[t].clone()).collect();
        TaskLoss::from_parts(self.model, parts, self.inputs.precision(), &self.inputs.device())
    }

    fn subsample(&self, size: usize, rngs: &mut [ChaCha8Rng]) -> Self {
        let parts = self
            .parts
            .iter()
            .zip(rngs)
            .map(|(part, rng)| Cow::Owned(part.subset(&draw_subset(rng, part.len(), size))))
            .collect();
        TaskLoss::from_parts(self.model, parts, self.inputs.precision(), &self.inputs.device())
    }
}

/// Fraction of rows whose largest output is at the label.
pub fn accuracy<B: Level>(logits: &Tensor<B>, labels: &[usize]) -> f64 {
    accuracy_of_rows(&logits.to_vec(), logits.dims()[1], labels)
}

/// `accuracy` on host logits: row-major rows of `classes` values, one per label.
pub fn accuracy_of_rows(values: &[f64], classes: usize, labels: &[usize]) -> f64 {
    let correct = labels
        .iter()
        .enumerate()
        .filter(|&(row, &label)| {
            let r = &values[row * classes..(row + 1) * classes];
            let best = (0..classes).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap_or(0);
            best == label
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}
