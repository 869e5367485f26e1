//! Exact MAML: g = (I − αH_0)…(I − αH_{r−1}) ∇L_q(φ_r).

use crate::autodiff::diff::{Objective, backward, evaluate_and_grad, hvp, lift, value_and_grad};
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::hypergrad::result::Hypergradient;
use crate::hypergrad::inner::{InnerLoop, adapt, inner_step, sgd_step};

/// By a backward sweep over the stored fast weights: one Hessian-vector
/// product per inner step, and only one step's activations alive at a time.
pub fn maml<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> Hypergradient<Base> {
    let mut iterates = adapt(support, theta, inner);
    let phi_r = iterates.pop().expect("φ_r");
    let (evaluation, g_query) = evaluate_and_grad(query, &phi_r);
    let grad = sweep(support, &iterates, g_query, inner);
    Hypergradient::new(grad, evaluation, phi_r)
}

/// The sweep v ← v − α H_j M v for j = r−1..0 over stored iterates
/// φ_0..φ_{r−1}, M the mask of adapted parameters: the transpose of the
/// inner step's Jacobian I − αMH_j (M = I when every parameter adapts).
pub fn sweep<Base: BaseBackend, S: Objective<Base>>(support: &S, iterates: &[Vec<Tensor<Base>>], mut v: Vec<Tensor<Base>>, inner: &InnerLoop) -> Vec<Tensor<Base>> {
    for phi_j in iterates.iter().rev() {
        let (_, _, hv) = hvp(support, phi_j, &inner.adapted.mask(&v));
        v = sgd_step(&v, &hv, inner.lr);
    }
    v
}

/// By differentiating the unrolled inner loop (`maml-unrolled`, for
/// checking; memory grows with r): θ is a leaf of `Autodiff<Base>`, each
/// inner gradient is taken one level up and stays recorded, and the query
/// loss is differentiated back to θ.
pub fn maml_unrolled<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> Hypergradient<Base> {
    let theta_leaves = lift(theta);
    let mut phi = theta_leaves.clone();
    for _ in 0..inner.steps {
        let (_, g) = value_and_grad(support, &phi);
        phi = inner_step(&phi, &g, inner);
    }
    let evaluation = query.evaluate(&phi);
    let grad = backward(&evaluation.loss, &theta_leaves);
    Hypergradient::new(grad, evaluation.to_base(), phi.iter().map(|p| p.to_base()).collect())
}
