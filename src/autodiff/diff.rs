//! Gradients and Hessian-vector products through Burn's autodiff, nested.
//!
//! Burn records and differentiates; this module only arranges the levels.
//! `value_and_grad::<B>` evaluates a scalar objective one level above `B`
//! (on `Autodiff<B>`) and returns the gradient as tensors of level `B`. When
//! `B` is itself an autodiff backend, the backward pass of the upper level ran
//! as recorded operations of `B`, so that gradient can be differentiated again
//! ("create_graph"). `hvp` uses exactly that to form H·v.

use burn::backend::ops::FloatTensorOps;
use burn::backend::{Autodiff, AutodiffBackend};

use crate::autodiff::profile::{Phase, timed};
use crate::autodiff::tensor::{Level, Tensor};

/// A scalar function of a list of parameter tensors, written once for every
/// level that shares the base backend `Base` (its data lives at `Base`).
pub trait Objective<Base> {
    fn eval<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Tensor<B>;

    /// The loss together with the model outputs it was computed from, when
    /// the objective has any (a model's loss on a batch: its logits).
    fn evaluate<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Evaluation<B> {
        Evaluation { loss: self.eval(params), output: None }
    }

    /// How many independent problems the objective sums: T for T tasks
    /// stacked (their Hessian is block-diagonal, one block per task), 1 otherwise.
    fn tasks(&self) -> usize {
        1
    }
}

/// A loss and the outputs it was computed from, at one level.
pub struct Evaluation<B: Level> {
    pub loss: Tensor<B>,
    pub output: Option<Tensor<B>>,
}

impl<B: Level> Evaluation<B> {
    /// Values only: the same evaluation on the base backend, no graph.
    pub fn to_base(&self) -> Evaluation<B::Base>
    where
        B::Base: Level,
    {
        Evaluation { loss: self.loss.to_base(), output: self.output.as_ref().map(|o| o.to_base()) }
    }
}

impl<B: Level> Evaluation<Autodiff<B>> {
    /// Drop the top level, keeping the graph of the levels below.
    pub fn lower(self) -> Evaluation<B> {
        Evaluation { loss: lower(self.loss), output: self.output.map(lower) }
    }
}

/// Fresh leaves of `Autodiff<B>` holding the values (and the graph, at lower
/// levels) of `xs`.
pub fn lift<B: Level>(xs: &[Tensor<B>]) -> Vec<Tensor<Autodiff<B>>> {
    xs.iter()
        .map(|x| {
            let lifted = <Autodiff<B> as AutodiffBackend>::from_inner(x.0.clone());
            Tensor(<Autodiff<B> as FloatTensorOps<Autodiff<B>>>::float_set_require_grad(lifted, true))
        })
        .collect()
}

/// `xs` at level `Autodiff<B>` as constants of that level (their graph at
/// lower levels is kept).
pub fn lift_constant<B: Level>(xs: &[Tensor<B>]) -> Vec<Tensor<Autodiff<B>>> {
    xs.iter().map(|x| Tensor(<Autodiff<B> as AutodiffBackend>::from_inner(x.0.clone()))).collect()
}

/// Drop the top level of a tensor, keeping the graph of the levels below.
pub fn lower<B: Level>(x: Tensor<Autodiff<B>>) -> Tensor<B> {
    Tensor(<Autodiff<B> as AutodiffBackend>::inner(x.0))
}

/// Gradients of a scalar `loss` with respect to `leaves`, at level `B`; a leaf
/// the loss does not depend on gets zeros.
pub fn backward<B: Level>(loss: &Tensor<Autodiff<B>>, leaves: &[Tensor<Autodiff<B>>]) -> Vec<Tensor<B>> {
    assert_eq!(loss.num_elements(), 1, "backward: loss of shape {:?} is not a scalar", loss.dims());
    let grads = <Autodiff<B> as AutodiffBackend>::backward(loss.0.clone());
    leaves
        .iter()
        .map(|leaf| match <Autodiff<B> as AutodiffBackend>::grad(&leaf.0, &grads) {
            Some(g) => Tensor(g),
            None => Tensor::zeros(&leaf.dims(), leaf.precision(), &leaf.device()),
        })
        .collect()
}

/// The objective's value and gradient at `params`, both at level `B`. With `B`
/// a plain backend this is an ordinary gradient; with `B = Autodiff<_>` the
/// result is still recorded at `B` and can be differentiated again.
pub fn value_and_grad<B, F>(f: &F, params: &[Tensor<B>]) -> (Tensor<B>, Vec<Tensor<B>>)
where
    B: Level,
    F: Objective<B::Base>,
{
    let (evaluation, grads) = evaluate_and_grad(f, params);
    (evaluation.loss, grads)
}

/// `value_and_grad` that also keeps the outputs the loss was computed from.
pub fn evaluate_and_grad<B, F>(f: &F, params: &[Tensor<B>]) -> (Evaluation<B>, Vec<Tensor<B>>)
where
    B: Level,
    F: Objective<B::Base>,
{
    let device = params[0].device();
    let leaves = lift(params);
    let evaluation = timed::<B, _>(Phase::Forward, &device, || f.evaluate(&leaves));
    let grads = timed::<B, _>(Phase::Backward, &device, || backward(&evaluation.loss, &leaves));
    (evaluation.lower(), grads)
}

/// Value, gradient and Hessian-vector product H·v of the objective at
/// `params`: the gradient is taken at `Autodiff<Autodiff<B>>`, stays recorded
/// at `Autodiff<B>`, and ⟨∇f, v⟩ is differentiated there.
pub fn hvp<B, F>(f: &F, params: &[Tensor<B>], v: &[Tensor<B>]) -> (Tensor<B>, Vec<Tensor<B>>, Vec<Tensor<B>>)
where
    B: Level,
    F: Objective<B::Base>,
{
    assert_eq!(params.len(), v.len(), "hvp: {} parameters but {} direction tensors", params.len(), v.len());
    HVPS.with(|n| n.set(n.get() + 1));
    let leaves = lift(params);
    let (loss, grads) = value_and_grad(f, &leaves);
    let directions = lift_constant(v);
    let inner = grads
        .iter()
        .zip(&directions)
        .map(|(g, d)| g.dot(d))
        .reduce(|a, b| a.add(&b))
        .expect("hvp: at least one parameter");
    let hv = timed::<B, _>(Phase::HvpReverse, &params[0].device(), || backward(&inner, &leaves));
    let grads = grads.into_iter().map(lower).collect();
    (lower(loss), grads, hv)
}

thread_local! {
    static HVPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Hessian-vector products computed on this thread so far: the cost unit
/// the estimators are compared in.
pub fn hvp_count() -> usize {
    HVPS.with(|n| n.get())
}

/// Σ_i ⟨a_i, b_i⟩ over lists of tensors, summed on the device and read back
/// once (a read per tensor would wait for a GPU once per parameter).
pub fn dot_all<B: Level>(a: &[Tensor<B>], b: &[Tensor<B>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.dot(y)).reduce(|s, d| s.add(&d)).map_or(0.0, |s| s.item())
}

/// ‖a‖ over a list of tensors.
pub fn norm_all<B: Level>(a: &[Tensor<B>]) -> f64 {
    dot_all(a, a).sqrt()
}
