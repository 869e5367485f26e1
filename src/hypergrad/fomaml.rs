//! First-order MAML: g = ∇L_q(φ_r), with φ_r treated as a constant of θ.

use crate::autodiff::diff::{Objective, evaluate_and_grad};
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::hypergrad::result::Hypergradient;
use crate::hypergrad::inner::{InnerLoop, adapted};

pub fn fomaml<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> Hypergradient<Base> {
    let phi_r = adapted(support, theta, inner);
    let (evaluation, grad) = evaluate_and_grad(query, &phi_r);
    Hypergradient::new(grad, evaluation, phi_r)
}
