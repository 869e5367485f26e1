//! A meta-batch's hypergradient: every task through `estimate`, either as
//! one stack of T tasks (one network, groups = T: fast on the GPU) or task
//! by task, one stack of 1 per core (fast on the CPU, whose grouped
//! convolutions are slower than separate ones). Both run the same estimator.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

use crate::autodiff::kernels::KernelSettings;
use crate::autodiff::profile::{Phase, timed};
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::data::task::Task;
use crate::hypergrad::head::estimate_head_only;
use crate::hypergrad::inner::{InnerLoop, axpy};
use crate::hypergrad::mode::{Mode, drawn, estimate};
use crate::hypergrad::result::{CurvatureWarning, Draws, Hypergradient};
use crate::hypergrad::stack::{replicate, task_sum};
use crate::hypergrad::task::{TaskLoss, accuracy, accuracy_of_rows};
use crate::models::FunctionalModel;

/// How a meta-batch's tasks are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batching {
    /// All tasks as one stacked network.
    Stacked,
    /// One task at a time, tasks in parallel over the cores.
    TaskByTask,
}

/// The mean hypergradient of a meta-batch, and the query results it read
/// nothing of yet: `read` fetches them from the device in one transfer.
pub struct MetaGradient<Base: BaseBackend> {
    /// The mean over tasks of the per-task hypergradients, in θ's shapes.
    pub grad: Vec<Tensor<Base>>,
    /// ufo: the q the draws used, and which tasks took the exact branch.
    pub q: Option<f64>,
    pub exact: Vec<bool>,
    /// The implicit modes: tasks whose linear solve met non-positive curvature.
    pub curvature: Option<CurvatureWarning>,
    /// [T] query losses and [T·n, outputs] query outputs after adaptation.
    task_losses: Tensor<Base>,
    outputs: Tensor<Base>,
    /// Per task, its query labels (classification only).
    labels: Vec<Option<Vec<usize>>>,
}

/// What a meta-batch measured, read back from the device.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskScores {
    /// Per task: query loss after adaptation, and accuracy for classification.
    pub losses: Vec<f64>,
    pub accuracies: Option<Vec<f64>>,
    /// ‖mean hypergradient‖.
    pub grad_norm: f64,
}

impl TaskScores {
    pub fn mean_loss(&self) -> f64 {
        self.losses.iter().sum::<f64>() / self.losses.len() as f64
    }

    pub fn mean_accuracy(&self) -> Option<f64> {
        self.accuracies.as_ref().map(|a| a.iter().sum::<f64>() / a.len() as f64)
    }
}

impl<Base: BaseBackend> MetaGradient<Base> {
    /// Losses, accuracies and the gradient norm in one read from the device.
    pub fn read(&self) -> TaskScores {
        let tasks = self.labels.len();
        let squared_norm = self.grad.iter().map(|g| g.dot(g)).reduce(|a, b| a.add(&b)).expect("at least one parameter");
        let flat_outputs = self.outputs.reshape(&[self.outputs.num_elements()]);
        let values = Tensor::cat(&[self.task_losses.clone(), squared_norm.reshape(&[1]), flat_outputs], 0).to_vec();
        let (losses, rest) = values.split_at(tasks);
        let (norm2, outputs) = rest.split_at(1);
        let per_task = outputs.len() / tasks;
        let classes = self.outputs.dims()[1];
        let accuracies = self
            .labels
            .iter()
            .enumerate()
            .map(|(t, labels)| labels.as_ref().map(|l| accuracy_of_rows(&outputs[t * per_task..(t + 1) * per_task], classes, l)))
            .collect();
        TaskScores { losses: losses.to_vec(), accuracies, grad_norm: norm2[0].sqrt() }
    }
}

/// Every task's hypergradient under `mode`, averaged. ufo draws one
/// Bernoulli(q) per task, in task order, with the q of the meta-batch's
/// start, and an adaptive rule observes the exact tasks in task order
/// afterwards, so results do not depend on thread timing.
pub fn meta_gradient<M: FunctionalModel, Base: BaseBackend>(
    mode: &mut Mode,
    model: &M,
    tasks: &[&Task],
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    batching: Batching,
    rng: &mut impl Rng,
) -> MetaGradient<Base> {
    let draws = mode.draw(tasks.len(), inner, rng);
    let (result, observations) = match batching {
        Batching::Stacked => stacked(mode, model, tasks, theta, inner, draws),
        Batching::TaskByTask => task_by_task(mode, model, tasks, theta, inner, draws),
    };
    mode.observe(&observations);
    result
}

/// The losses of one stack of tasks on the support and query examples.
fn losses<'a, M: FunctionalModel, Base: BaseBackend>(model: &'a M, tasks: &[&'a Task], theta: &[Tensor<Base>]) -> (TaskLoss<'a, M, Base>, TaskLoss<'a, M, Base>) {
    let (precision, device) = (theta[0].precision(), theta[0].device());
    let supports: Vec<_> = tasks.iter().map(|t| &t.support).collect();
    let queries: Vec<_> = tasks.iter().map(|t| &t.query).collect();
    (TaskLoss::new(model, &supports, precision, &device), TaskLoss::new(model, &queries, precision, &device))
}

/// `estimate` on a model's tasks: on the trunk's features when only the
/// linear head is adapted and the mode allows it (head.rs), else through
/// the whole model.
fn estimate_tasks<M: FunctionalModel, Base: BaseBackend>(mode: &Mode, support: &TaskLoss<M, Base>, query: &TaskLoss<M, Base>, theta: &[Tensor<Base>], inner: &InnerLoop, draws: Option<&Draws>) -> Hypergradient<Base> {
    estimate_head_only(mode, support, query, theta, inner, draws).unwrap_or_else(|| estimate(mode, support, query, theta, inner, draws))
}

fn query_labels(tasks: &[&Task]) -> Vec<Option<Vec<usize>>> {
    tasks.iter().map(|t| t.query.targets.labels().map(<[usize]>::to_vec)).collect()
}

fn stacked<M: FunctionalModel, Base: BaseBackend>(mode: &Mode, model: &M, tasks: &[&Task], theta: &[Tensor<Base>], inner: &InnerLoop, draws: Option<Draws>) -> (MetaGradient<Base>, Vec<(f64, f64)>) {
    let count = tasks.len();
    let h = timed::<Base, _>(Phase::Task, &theta[0].device(), || {
        let (support, query) = losses(model, tasks, theta);
        let h = estimate_tasks(mode, &support, &query, &replicate(theta, count), inner, draws.as_ref());
        let task_losses = query.task_losses(&h.query);
        (h, task_losses)
    });
    let (h, task_losses) = h;
    let grad = task_sum(&h.grad, count).iter().map(|g| g.mul_scalar(1.0 / count as f64)).collect();
    let outputs = h.query.output.expect("a task loss evaluation carries its outputs");
    (MetaGradient { grad, q: h.q, exact: h.exact, curvature: h.curvature, task_losses, outputs, labels: query_labels(tasks) }, h.observations)
}

fn task_by_task<M: FunctionalModel, Base: BaseBackend>(mode: &Mode, model: &M, tasks: &[&Task], theta: &[Tensor<Base>], inner: &InnerLoop, draws: Option<Draws>) -> (MetaGradient<Base>, Vec<(f64, f64)>) {
    let count = tasks.len();
    let results: Vec<Hypergradient<Base>> = parallel_map(count, |t| {
        timed::<Base, _>(Phase::Task, &theta[0].device(), || {
            let (support, query) = losses(model, &tasks[t..t + 1], theta);
            estimate_tasks(mode, &support, &query, theta, inner, draws.as_ref().map(|d| d.slice(t, 1)).as_ref())
        })
    });
    let mut sum: Option<Vec<Tensor<Base>>> = None;
    let (mut task_losses, mut outputs, mut exact, mut observations, mut curvature) = (vec![], vec![], vec![], vec![], None);
    for h in results {
        curvature = CurvatureWarning::merge(curvature, h.curvature);
        task_losses.push(h.query.loss.reshape(&[1]));
        outputs.push(h.query.output.expect("a task loss evaluation carries its outputs"));
        exact.extend(h.exact);
        observations.extend(h.observations);
        sum = Some(match sum {
            None => h.grad,
            Some(s) => axpy(&s, 1.0, &h.grad),
        });
    }
    let grad = sum.expect("at least one task").iter().map(|g| g.mul_scalar(1.0 / count as f64)).collect();
    let result = MetaGradient {
        grad,
        q: draws.as_ref().and_then(Draws::q),
        exact,
        curvature,
        task_losses: Tensor::cat(&task_losses, 0),
        outputs: Tensor::cat(&outputs, 0),
        labels: query_labels(tasks),
    };
    (result, observations)
}

/// `f(0)..f(n−1)` on one thread per core, results in index order. Each
/// thread takes the next index when it finishes one, so at most one task per
/// thread is in memory at a time.
fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get()).min(n);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    // The cores are taken by the tasks: each task's kernels run on its own thread.
    let settings = KernelSettings { serial: true, ..KernelSettings::current() };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                settings.run(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let value = f(i);
                        *slots[i].lock().expect("a task thread panicked") = Some(value);
                    }
                })
            });
        }
    });
    slots.into_iter().map(|slot| slot.into_inner().expect("a task thread panicked").expect("every index ran")).collect()
}

/// One task's hypergradient for a model, with its query accuracy after
/// adaptation (classification; None for regression targets).
pub fn task_hypergradient<M: FunctionalModel, Base: BaseBackend>(mode: &mut Mode, model: &M, task: &Task, theta: &[Tensor<Base>], inner: &InnerLoop, rng: &mut impl Rng) -> (Hypergradient<Base>, Option<f64>) {
    let (support, query) = losses(model, &[task], theta);
    let h = drawn(mode, 1, inner, rng, |mode, draws| estimate_tasks(mode, &support, &query, theta, inner, draws));
    let logits = h.query.output.as_ref().expect("a task loss evaluation carries its outputs");
    let accuracy = task.query.targets.labels().map(|labels| accuracy(logits, labels));
    (h, accuracy)
}
