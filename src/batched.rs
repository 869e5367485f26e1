//! Task-batched execution: a meta-batch of T tasks runs as one network.
//! Every parameter holds the T tasks' fast weights stacked along its first
//! dimension, the tasks' images sit side by side along channels, and the
//! loss is the sum of the per-task losses, so one reverse pass (and one
//! Hessian-vector product per inner step) yields every task's gradient: the
//! Hessian of a sum of independent tasks is block-diagonal. Per-task
//! quantities (UFO's draws and moments, CG's step sizes) are kept per block.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::tensor::Device;
use rand::Rng;

use crate::autodiff::diff::{Objective, hvp, value_and_grad};
use crate::data::episode::{Episode, LabelledImages};
use crate::autodiff::kernels::KernelSettings;
use crate::hypergrad::{Hypergradient, InnerLoop, Mode, QRule, adapt, axpy, fomaml, hypergradient_drawn, maml, maml_unrolled, proximal_adapt, sweep};
use crate::autodiff::profile::{Phase, timed};
use crate::models::conv4::{BatchLoss, ClassifierLoss, Conv4, KeepLogits, accuracy, accuracy_of_rows};
use crate::autodiff::tensor::{Level, Precision, Tensor, one_hot};

/// The images of T tasks arranged for `Conv4::forward_stacked`.
pub struct StackedBatch<Base: Level> {
    /// [n, T·C, H, W]
    pub images: Tensor<Base>,
    /// [T·n, way], task by task.
    pub one_hot: Tensor<Base>,
    pub labels: Vec<Vec<usize>>,
    pub tasks: usize,
}

impl<Base: Level> StackedBatch<Base> {
    pub fn new(parts: &[&LabelledImages], way: usize, precision: Precision, device: &Device<Base>) -> Self {
        let tasks = parts.len();
        let [n, c, h, w] = parts[0].shape;
        assert!(parts.iter().all(|p| p.shape == parts[0].shape), "task batching needs tasks of one shape");
        let image = c * h * w;
        let mut values = vec![0.0f64; n * tasks * image];
        for (t, part) in parts.iter().enumerate() {
            for i in 0..n {
                let dst = (i * tasks + t) * image;
                for (v, &x) in values[dst..dst + image].iter_mut().zip(&part.images[i * image..(i + 1) * image]) {
                    *v = f64::from(x);
                }
            }
        }
        let images = Tensor::from_f64(&values, &[n, tasks * c, h, w], precision, device);
        let labels: Vec<Vec<usize>> = parts.iter().map(|p| p.labels.clone()).collect();
        let targets: Vec<f64> = labels.iter().flat_map(|l| one_hot(l, way)).collect();
        let one_hot = Tensor::from_f64(&targets, &[tasks * n, way], precision, device);
        StackedBatch { images, one_hot, labels, tasks }
    }
}

/// T tasks' support and query sets.
pub struct TaskBatch<Base: Level> {
    pub support: StackedBatch<Base>,
    pub query: StackedBatch<Base>,
}

impl<Base: Level> TaskBatch<Base> {
    pub fn new(episodes: &[&Episode], precision: Precision, device: &Device<Base>) -> Self {
        let way = episodes[0].way;
        let supports: Vec<&LabelledImages> = episodes.iter().map(|e| &e.support).collect();
        let queries: Vec<&LabelledImages> = episodes.iter().map(|e| &e.query).collect();
        TaskBatch { support: StackedBatch::new(&supports, way, precision, device), query: StackedBatch::new(&queries, way, precision, device) }
    }
}

/// Σ_t (mean cross-entropy of task t) for stacked parameters.
pub struct StackedLoss<'a, Base: Level> {
    pub model: &'a Conv4,
    pub batch: &'a StackedBatch<Base>,
}

impl<Base: Level<Base = Base>> Objective<Base> for StackedLoss<'_, Base> {
    fn eval<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Tensor<B> {
        self.logits_and_loss(params).1
    }
}

impl<Base: Level<Base = Base>> ClassifierLoss<Base> for StackedLoss<'_, Base> {
    fn logits_and_loss<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> (Tensor<B>, Tensor<B>) {
        let tasks = self.batch.tasks;
        let logits = self.model.forward_stacked(params, &Tensor::from_base(&self.batch.images), tasks);
        // The mean over all T·n rows, times T: every task has n rows.
        let loss = logits.cross_entropy(&Tensor::from_base(&self.batch.one_hot)).mul_scalar(tasks as f64);
        (logits, loss)
    }
}

/// θ repeated for T tasks: every parameter stacked T times along dimension 0.
pub fn replicate<B: Level>(theta: &[Tensor<B>], tasks: usize) -> Vec<Tensor<B>> {
    theta.iter().map(|p| Tensor::cat(&vec![p.clone(); tasks], 0)).collect()
}

/// Each stacked parameter as [T, rest].
fn rows<B: Level>(p: &Tensor<B>, tasks: usize) -> Tensor<B> {
    p.reshape(&[tasks, p.num_elements() / tasks])
}

/// Σ_t of the T blocks, in θ's shapes.
pub fn task_sum<B: Level>(stacked: &[Tensor<B>], tasks: usize) -> Vec<Tensor<B>> {
    stacked
        .iter()
        .map(|p| {
            let mut dims = p.dims();
            dims[0] /= tasks;
            rows(p, tasks).sum_dim(0).reshape(&dims)
        })
        .collect()
}

/// ⟨a_t, b_t⟩ for every task t.
pub fn task_dots<B: Level>(a: &[Tensor<B>], b: &[Tensor<B>], tasks: usize) -> Vec<f64> {
    let mut out = vec![0.0; tasks];
    for (x, y) in a.iter().zip(b) {
        for (o, v) in out.iter_mut().zip(rows(&x.mul(y), tasks).sum_dim(1).to_vec()) {
            *o += v;
        }
    }
    out
}

/// Block t multiplied by weights[t].
pub fn scale_tasks<B: Level>(stacked: &[Tensor<B>], weights: &[f64]) -> Vec<Tensor<B>> {
    let tasks = weights.len();
    let first = &stacked[0];
    let w = Tensor::<B>::from_f64(weights, &[tasks, 1], first.precision(), &first.device());
    stacked.iter().map(|p| rows(p, tasks).mul(&w).reshape(&p.dims())).collect()
}

/// Blocks moved between stacked lists: block `to` of the result (of
/// `to_tasks`) is block `from` of `stacked` (of `from_tasks`) for each pair,
/// zeros elsewhere. A 0/1 matrix product moves them exactly (products by 1,
/// sums with 0).
fn move_tasks<B: Level>(stacked: &[Tensor<B>], from_tasks: usize, to_tasks: usize, pairs: impl Iterator<Item = (usize, usize)>) -> Vec<Tensor<B>> {
    let first = &stacked[0];
    let mut matrix = vec![0.0; to_tasks * from_tasks];
    for (to, from) in pairs {
        matrix[to * from_tasks + from] = 1.0;
    }
    let matrix = Tensor::<B>::from_f64(&matrix, &[to_tasks, from_tasks], first.precision(), &first.device());
    stacked
        .iter()
        .map(|p| {
            let mut dims = p.dims();
            dims[0] = dims[0] / from_tasks * to_tasks;
            matrix.matmul(&rows(p, from_tasks)).reshape(&dims)
        })
        .collect()
}

/// The blocks of the `chosen` tasks, in order.
fn select_tasks<B: Level>(stacked: &[Tensor<B>], tasks: usize, chosen: &[usize]) -> Vec<Tensor<B>> {
    move_tasks(stacked, tasks, chosen.len(), chosen.iter().copied().enumerate())
}

/// The inverse of `select_tasks`: chosen blocks placed at their tasks, zeros elsewhere.
fn place_tasks<B: Level>(selected: &[Tensor<B>], tasks: usize, chosen: &[usize]) -> Vec<Tensor<B>> {
    move_tasks(selected, chosen.len(), tasks, chosen.iter().enumerate().map(|(i, &t)| (t, i)))
}

/// CG on (I + H/λ) x = b for every task at once, with each task's own step
/// sizes and stopping rule (exactly the single-task iteration, per block).
pub fn conjugate_gradient_tasks<Base, S>(support: &S, phi: &[Tensor<Base>], b: &[Tensor<Base>], lambda: f64, steps: usize, tasks: usize) -> Vec<Tensor<Base>>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
{
    let apply = |v: &[Tensor<Base>]| -> Vec<Tensor<Base>> {
        let (_, _, hv) = hvp(support, phi, v);
        axpy(v, 1.0 / lambda, &hv)
    };
    let mut x: Vec<Tensor<Base>> = b.iter().map(|t| t.mul_scalar(0.0)).collect();
    let mut residual = b.to_vec();
    let mut direction = b.to_vec();
    let mut rs = task_dots(&residual, &residual, tasks);
    let stop: Vec<f64> = rs.iter().map(|r| r * 1e-24).collect();
    let mut done: Vec<bool> = rs.iter().zip(&stop).map(|(r, s)| *r <= *s || *r == 0.0).collect();
    for _ in 0..steps {
        if done.iter().all(|&d| d) {
            break;
        }
        let a_dir = apply(&direction);
        let curvature = task_dots(&direction, &a_dir, tasks);
        for t in 0..tasks {
            // Not positive definite along this direction: keep the solution so far.
            done[t] |= curvature[t] <= 0.0;
        }
        let alpha: Vec<f64> = (0..tasks).map(|t| if done[t] { 0.0 } else { rs[t] / curvature[t] }).collect();
        x = x.iter().zip(scale_tasks(&direction, &alpha)).map(|(a, d)| a.add(&d)).collect();
        residual = residual.iter().zip(scale_tasks(&a_dir, &alpha)).map(|(r, d)| r.sub(&d)).collect();
        let rs_next = task_dots(&residual, &residual, tasks);
        let beta: Vec<f64> = (0..tasks).map(|t| if done[t] { 0.0 } else { rs_next[t] / rs[t] }).collect();
        direction = residual.iter().zip(scale_tasks(&direction, &beta)).map(|(r, d)| r.add(&d)).collect();
        for t in 0..tasks {
            if !done[t] {
                rs[t] = rs_next[t];
                done[t] = rs[t] <= stop[t] || rs[t] == 0.0;
            }
        }
    }
    x
}

/// A meta-batch's hypergradients, computed as one stacked network.
pub struct BatchHypergradient<Base: Level> {
    /// The mean over tasks of the per-task hypergradients, in θ's shapes.
    pub grad: Vec<Tensor<Base>>,
    /// Per task: query loss and accuracy after adaptation.
    pub query_losses: Vec<f64>,
    pub query_accuracies: Vec<f64>,
    /// ufo: the q the draws used, and which tasks took the exact branch.
    pub q: Option<f64>,
    pub exact: Vec<bool>,
}

/// Per-task query loss and accuracy from the stacked query logits [T·n, way].
fn per_task_scores<Base: Level>(model: &Conv4, logits: &Tensor<Base>, query: &StackedBatch<Base>) -> (Vec<f64>, Vec<f64>) {
    let n = query.labels[0].len();
    // Σ over each task's rows of the log-probability of the label.
    let picked = logits.log_softmax().mul(&query.one_hot).reshape(&[query.tasks, n * model.way]).sum_dim(1).to_vec();
    let values = logits.to_vec();
    let rows = n * model.way;
    let losses = picked.iter().map(|p| -p / n as f64).collect();
    let accuracies = query.labels.iter().enumerate().map(|(t, labels)| accuracy_of_rows(&values[t * rows..(t + 1) * rows], model.way, labels)).collect();
    (losses, accuracies)
}

/// The same as `batched_hypergradient`, one network per task: faster on
/// Flex, whose grouped convolution is slower than separate ones. Tasks run in
/// parallel, one per core; ufo's draws are made first, in task order, with the
/// q of the meta-batch's start, and an adaptive rule observes the exact tasks
/// in task order afterwards, so results do not depend on thread timing.
#[allow(clippy::too_many_arguments)]
pub fn task_by_task_hypergradient<Base: Level<Base = Base>>(
    mode: &mut Mode,
    model: &Conv4,
    episodes: &[&Episode],
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    precision: Precision,
    device: &Device<Base>,
    rng: &mut impl Rng,
) -> BatchHypergradient<Base> {
    let tasks = episodes.len();
    let q = match mode {
        Mode::Ufo(rule) => Some(rule.q(inner.steps)),
        _ => None,
    };
    let draws: Vec<Option<(f64, bool)>> = (0..tasks).map(|_| q.map(|q| (q, rng.random::<f64>() < q))).collect();
    let shared_mode: &Mode = mode;
    let results = parallel_map(tasks, |t| {
        timed::<Base, _>(Phase::Task, device, || {
            let task = episodes[t].to_task::<Base>(precision, device);
            let support = BatchLoss { model, batch: &task.support };
            let query = KeepLogits::new(BatchLoss { model, batch: &task.query });
            let (h, observation) = hypergradient_drawn(shared_mode, &support, &query, theta, inner, draws[t]);
            // Every mode evaluated the query loss last at the adapted parameters.
            let accuracy = accuracy(&query.latest().expect("the query loss was evaluated"), &task.query.labels);
            (h, accuracy, observation)
        })
    });
    let (mut sum, mut query_losses, mut query_accuracies, mut exact) = (None::<Vec<Tensor<Base>>>, vec![], vec![], vec![]);
    for (h, accuracy, observation) in results {
        if let (Mode::Ufo(QRule::Adaptive(state)), Some((d2, v2))) = (&mut *mode, observation) {
            state.observe(d2, v2);
        }
        query_losses.push(h.query_loss);
        query_accuracies.push(accuracy);
        exact.extend(h.exact_branch);
        sum = Some(match sum {
            None => h.grad,
            Some(s) => axpy(&s, 1.0, &h.grad),
        });
    }
    let grad = sum.expect("at least one task").iter().map(|g| g.mul_scalar(1.0 / tasks as f64)).collect();
    BatchHypergradient { grad, query_losses, query_accuracies, q, exact }
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
                settings.run(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let value = f(i);
                    *slots[i].lock().expect("a task thread panicked") = Some(value);
                })
            });
        }
    });
    slots.into_iter().map(|slot| slot.into_inner().expect("a task thread panicked").expect("every index ran")).collect()
}

/// Every task's hypergradient under `mode`, averaged, in one stacked
/// computation. ufo draws one Bernoulli(q) per task, in task order, with the q
/// of the meta-batch's start; the exact branch runs as a stacked sweep over
/// the tasks that drew it, and an adaptive rule observes each of them.
pub fn batched_hypergradient<Base: Level<Base = Base>>(
    mode: &mut Mode,
    model: &Conv4,
    episodes: &[&Episode],
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    precision: Precision,
    device: &Device<Base>,
    rng: &mut impl Rng,
) -> BatchHypergradient<Base> {
    timed::<Base, _>(Phase::Task, device, || stacked_hypergradient(mode, model, episodes, theta, inner, precision, device, rng))
}

#[allow(clippy::too_many_arguments)]
fn stacked_hypergradient<Base: Level<Base = Base>>(
    mode: &mut Mode,
    model: &Conv4,
    episodes: &[&Episode],
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    precision: Precision,
    device: &Device<Base>,
    rng: &mut impl Rng,
) -> BatchHypergradient<Base> {
    let tasks = episodes.len();
    let batch = TaskBatch::new(episodes, precision, device);
    let support = StackedLoss { model, batch: &batch.support };
    let query = KeepLogits::new(StackedLoss { model, batch: &batch.query });
    let phi0 = replicate(theta, tasks);
    let (stacked, q, exact): (Vec<Tensor<Base>>, Option<f64>, Vec<bool>) = match mode {
        Mode::Maml => {
            let h: Hypergradient<Base> = maml(&support, &query, &phi0, inner);
            (h.grad, None, vec![])
        }
        Mode::MamlUnrolled => {
            let h = maml_unrolled(&support, &query, &phi0, inner);
            (h.grad, None, vec![])
        }
        Mode::Fomaml => {
            let h = fomaml(&support, &query, &phi0, inner);
            (h.grad, None, vec![])
        }
        Mode::Implicit { lambda, cg_steps } => {
            let phi = proximal_adapt(&support, &phi0, inner, *lambda);
            let (_, g_query) = value_and_grad(&query, &phi);
            (conjugate_gradient_tasks(&support, &phi, &g_query, *lambda, *cg_steps, tasks), None, vec![])
        }
        Mode::Ufo(rule) => {
            let q = rule.q(inner.steps);
            let exact: Vec<bool> = (0..tasks).map(|_| rng.random::<f64>() < q).collect();
            let mut iterates = adapt(&support, &phi0, inner);
            let phi = iterates.pop().expect("φ_r");
            let (_, g_fo) = value_and_grad(&query, &phi);
            let chosen: Vec<usize> = (0..tasks).filter(|&t| exact[t]).collect();
            let grad = if chosen.is_empty() {
                g_fo
            } else {
                let sub_episodes: Vec<&Episode> = chosen.iter().map(|&t| episodes[t]).collect();
                let sub = TaskBatch::new(&sub_episodes, precision, device);
                let sub_support = StackedLoss { model, batch: &sub.support };
                // MAML's sweep over the chosen tasks' stored iterates, from their g_fo.
                let g_fo_chosen = select_tasks(&g_fo, tasks, &chosen);
                let chosen_iterates: Vec<Vec<Tensor<Base>>> = iterates.iter().map(|phi_j| select_tasks(phi_j, tasks, &chosen)).collect();
                let v = sweep(&sub_support, &chosen_iterates, g_fo_chosen.clone(), inner.lr);
                let correction: Vec<Tensor<Base>> = v.iter().zip(&g_fo_chosen).map(|(m, f)| m.sub(f)).collect();
                if let QRule::Adaptive(state) = rule {
                    let d2 = task_dots(&correction, &correction, chosen.len());
                    let v2 = task_dots(&v, &v, chosen.len());
                    for (d, m) in d2.iter().zip(&v2) {
                        state.observe(*d, *m);
                    }
                }
                let weighted: Vec<Tensor<Base>> = correction.iter().map(|c| c.mul_scalar(1.0 / q)).collect();
                axpy(&g_fo, 1.0, &place_tasks(&weighted, tasks, &chosen))
            };
            (grad, Some(q), exact)
        }
    };
    // Every mode evaluated the query loss last at the adapted parameters.
    let logits = query.latest().expect("the query loss was evaluated");
    let (query_losses, query_accuracies) = per_task_scores(model, &logits, &batch.query);
    let grad = task_sum(&stacked, tasks).iter().map(|g| g.mul_scalar(1.0 / tasks as f64)).collect();
    BatchHypergradient { grad, query_losses, query_accuracies, q, exact }
}
