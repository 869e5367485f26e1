//! Head-only adaptation on the trunk's features (ANIL; the
//! "hyper-representation" of the bilevel papers), at the cost of one
//! first-order pass through the trunk.
//!
//! When the inner loop adapts only a linear head, the support and query
//! losses depend on the trunk's parameters θ only through the features
//! F_s(θ) and F_q(θ). So every mode runs on the small problem whose
//! parameters are [F_s, F_q, W, b] with W, b adapted, and the trunk's
//! hypergradient is the pull-back J_sᵀ g_{F_s} + J_qᵀ g_{F_q} of the feature
//! cotangents it returns: one reverse pass through the trunk. By the chain
//! rule this is exactly the hypergradient of the whole model with the trunk
//! held out of the inner loop (second-order trunk–head terms included, since
//! H_{θw} = J_sᵀ H_{F_s w}); the inner steps and Hessian-vector products
//! never touch the trunk.
//!
//! One definition differs on purpose: the random subsets of `hvp_batch` and
//! `inner_batch` pick rows of the features of the whole support set. With
//! batch norm in the trunk that makes each subset loss an unbiased estimate
//! of the full-batch loss, which the whole model's subsets (batch statistics
//! of the subset) are not; without batch norm the two agree.

use burn::backend::tensor::Device;
use rand_chacha::ChaCha8Rng;

use crate::autodiff::diff::{Evaluation, Objective, backward, lift, lift_constant, lower};
use crate::autodiff::profile::{Phase, timed};
use crate::autodiff::tensor::{BaseBackend, Level, Precision, Tensor};
use crate::hypergrad::inner::{Adaptation, Adapted, InnerLoop, adapt_to};
use crate::hypergrad::mode::{Mode, estimate};
use crate::hypergrad::result::{Draws, Hypergradient};
use crate::hypergrad::task::{TaskLoss, TaskSubsets, draw_subset, stacked_loss};
use crate::models::FunctionalModel;

/// The slots of the feature problem's parameters.
const SUPPORT_FEATURES: usize = 0;
const QUERY_FEATURES: usize = 1;

/// A loss of T tasks' linear heads on features that are themselves
/// parameters: params = [support features [T·n_s, F], query features
/// [T·n_q, F], head weight, head bias], tasks stacked as everywhere.
pub struct HeadLoss<'a, M, Base: BaseBackend> {
    model: &'a M,
    /// Which feature parameter this loss reads.
    slot: usize,
    /// Rows per task of that parameter.
    rows: usize,
    /// Per task, its target rows (one-hot or values), and with a random
    /// subset the rows it keeps.
    targets: Vec<Vec<f64>>,
    picks: Option<Vec<Vec<usize>>>,
    classes: bool,
    precision: Precision,
    device: Device<Base>,
    /// `targets` (of the picked rows) [T·m, width], and the 0/1 matrix
    /// [T, m, rows] that picks them from the features.
    target_tensor: Tensor<Base>,
    pick_tensor: Option<Tensor<Base>>,
}

impl<'a, M: FunctionalModel, Base: BaseBackend> HeadLoss<'a, M, Base> {
    /// The head's loss on the examples of `loss`, reading feature slot `slot`.
    fn of(loss: &TaskLoss<'a, M, Base>, slot: usize) -> Self {
        let inputs = loss.inputs();
        let targets: Vec<Vec<f64>> = loss.examples().map(|e| e.targets.to_rows()).collect();
        let rows = loss.examples().next().expect("at least one task").len();
        Self::build(loss.model(), slot, rows, targets, None, loss.classes(), inputs.precision(), inputs.device())
    }

    #[allow(clippy::too_many_arguments)]
    fn build(model: &'a M, slot: usize, rows: usize, targets: Vec<Vec<f64>>, picks: Option<Vec<Vec<usize>>>, classes: bool, precision: Precision, device: Device<Base>) -> Self {
        let width = model.outputs();
        let tasks = targets.len();
        let (target_values, pick_tensor) = match &picks {
            None => (targets.concat(), None),
            Some(picks) => {
                let m = picks[0].len();
                let mut matrix = vec![0.0; tasks * m * rows];
                let mut values = Vec::with_capacity(tasks * m * width);
                for (t, chosen) in picks.iter().enumerate() {
                    for (i, &row) in chosen.iter().enumerate() {
                        matrix[(t * m + i) * rows + row] = 1.0;
                        values.extend_from_slice(&targets[t][row * width..(row + 1) * width]);
                    }
                }
                (values, Some(Tensor::from_f64(&matrix, &[tasks, m, rows], precision, &device)))
            }
        };
        let target_tensor = Tensor::from_f64(&target_values, &[target_values.len() / width, width], precision, &device);
        HeadLoss { model, slot, rows, targets, picks, classes, precision, device, target_tensor, pick_tensor }
    }
}

impl<M: FunctionalModel, Base: BaseBackend> Objective<Base> for HeadLoss<'_, M, Base> {
    fn eval<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Tensor<B> {
        self.evaluate(params).loss
    }

    fn evaluate<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Evaluation<B> {
        let tasks = self.targets.len();
        let features = &params[self.slot];
        let mut features = features.reshape(&[tasks, self.rows, features.dims()[1]]);
        if let Some(picks) = &self.pick_tensor {
            // A 0/1 matrix product picks rows exactly, at every level.
            features = Tensor::from_base(picks).matmul(&features);
        }
        let output = self.model.head(&features, &params[2], &params[3], tasks);
        let loss = stacked_loss(&output, &Tensor::from_base(&self.target_tensor), self.classes, tasks);
        Evaluation { loss, output: Some(output) }
    }

    fn tasks(&self) -> usize {
        self.targets.len()
    }
}

impl<M: FunctionalModel, Base: BaseBackend> TaskSubsets for HeadLoss<'_, M, Base> {
    fn select(&self, chosen: &[usize]) -> Self {
        let targets = chosen.iter().map(|&t| self.targets[t].clone()).collect();
        let picks = self.picks.as_ref().map(|p| chosen.iter().map(|&t| p[t].clone()).collect());
        Self::build(self.model, self.slot, self.rows, targets, picks, self.classes, self.precision, self.device.clone())
    }

    /// The same draws as `TaskLoss::subsample`, so both forms see the same examples.
    fn subsample(&self, size: usize, rngs: &mut [ChaCha8Rng]) -> Self {
        assert!(self.picks.is_none(), "a head loss is subsampled once, from all of its examples");
        let picks = rngs.iter_mut().map(|rng| draw_subset(rng, self.rows, size)).collect();
        Self::build(self.model, self.slot, self.rows, self.targets.clone(), Some(picks), self.classes, self.precision, self.device.clone())
    }
}

/// `estimate` for a stack of tasks whose inner loop adapts only the model's
/// linear head, on the trunk's features: the same hypergradient as the
/// whole model with `inner.adapted` = Last(2), stacked like θ (random
/// subsets: see the module's note). None when
/// this does not apply: the inner loop adapts more than the head, the model
/// has no trunk–head split, or the mode measures norms over all parameters
/// (adaptive ufo's moments), and the caller runs the whole model instead.
pub fn estimate_head_only<M, Base>(mode: &Mode, support: &TaskLoss<M, Base>, query: &TaskLoss<M, Base>, theta: &[Tensor<Base>], inner: &InnerLoop, draws: Option<&Draws>) -> Option<Hypergradient<Base>>
where
    M: FunctionalModel,
    Base: BaseBackend,
{
    let model = support.model();
    if !applies(model, theta, inner) || matches!(draws, Some(Draws::Ufo(d)) if d.observe) {
        return None;
    }
    let tasks = support.tasks();
    let split = theta.len() - 2;
    let device = theta[0].device();
    // The trunk once, recorded one level up for the pull-back.
    let trunk = lift(&theta[..split]);
    let features = |loss: &TaskLoss<M, Base>| stacked_features(model, &trunk, &Tensor::from_base(loss.inputs()), tasks);
    let (f_s, f_q) = timed::<Base, _>(Phase::Forward, &device, || Some((features(support)?, features(query)?)))?;
    let (params, head_inner) = head_problem(lower(f_s.clone()), lower(f_q.clone()), theta, inner);
    let h = estimate(mode, &HeadLoss::of(support, SUPPORT_FEATURES), &HeadLoss::of(query, QUERY_FEATURES), &params, &head_inner, draws);
    let cotangents = lift_constant(&h.grad[..2]);
    let pullback = f_s.dot(&cotangents[SUPPORT_FEATURES]).add(&f_q.dot(&cotangents[QUERY_FEATURES]));
    let trunk_grad = timed::<Base, _>(Phase::Backward, &device, || backward(&pullback, &trunk));
    let grad = [trunk_grad, h.grad[2..].to_vec()].concat();
    let adapted = with_head(theta, &h.adapted);
    Some(Hypergradient { grad, adapted, ..h })
}

/// The inner loop's fast weights when it adapts only the linear head (the
/// proximal problem with `lambda`): the trunk's features once, every step on
/// the head alone, the trunk returned as it is. None where the model has
/// no trunk–head split or more than the head is adapted.
pub fn adapt_head_only<M, Base>(support: &TaskLoss<M, Base>, theta: &[Tensor<Base>], inner: &InnerLoop, how: Adaptation) -> Option<Vec<Tensor<Base>>>
where
    M: FunctionalModel,
    Base: BaseBackend,
{
    let model = support.model();
    if !applies(model, theta, inner) {
        return None;
    }
    let split = theta.len() - 2;
    let features = stacked_features(model, &theta[..split], support.inputs(), support.tasks())?;
    // The query slot is not read by a support loss: the support features stand in.
    let (params, head_inner) = head_problem(features.clone(), features, theta, inner);
    let fast = adapt_to(&HeadLoss::of(support, SUPPORT_FEATURES), &params, &head_inner, how);
    Some(with_head(theta, &fast))
}

/// The feature problem's parameters [F_s, F_q, W, b] and its inner loop,
/// which adapts W and b.
fn head_problem<B: Level>(support_features: Tensor<B>, query_features: Tensor<B>, theta: &[Tensor<B>], inner: &InnerLoop) -> (Vec<Tensor<B>>, InnerLoop) {
    let head = &theta[theta.len() - 2..];
    (vec![support_features, query_features, head[0].clone(), head[1].clone()], InnerLoop { adapted: Adapted::Last(2), ..*inner })
}

/// θ's trunk with the head of a feature problem's parameters.
fn with_head<B: Level>(theta: &[Tensor<B>], problem: &[Tensor<B>]) -> Vec<Tensor<B>> {
    [&theta[..theta.len() - 2], &problem[2..]].concat()
}

/// Whether the inner loop adapts exactly the model's linear head.
fn applies<M: FunctionalModel, B: Level>(model: &M, theta: &[Tensor<B>], inner: &InnerLoop) -> bool {
    let head = model.head_parameters();
    head == 2 && inner.adapted == Adapted::Last(head) && theta.len() > head
}

/// The trunk's features of T tasks as one parameter [T·n, F], task by task.
fn stacked_features<M: FunctionalModel, B: Level>(model: &M, trunk: &[Tensor<B>], inputs: &Tensor<B>, tasks: usize) -> Option<Tensor<B>> {
    let features = model.trunk_features(trunk, inputs, tasks)?;
    let [t, n, width] = features.dims()[..] else { panic!("{}: trunk features of shape {:?}, expected [T, n, F]", model.describe(), features.dims()) };
    Some(features.reshape(&[t * n, width]))
}
