//! Inner-loop adaptation and exact MAML meta-gradients.
//!
//! θ are the meta-parameters, L_s and L_q a task's support and query losses.
//! The inner loop is r steps of gradient descent with step α:
//! φ_0 = θ, φ_{j+1} = φ_j − α ∇L_s(φ_j); the meta-loss is L_q(φ_r).

use crate::diff::{Objective, backward, hvp, lift, value_and_grad};
use crate::tensor::{Level, Tensor};

/// θ − α·g, tensor by tensor.
pub fn sgd_step<B: Level>(params: &[Tensor<B>], grads: &[Tensor<B>], lr: f64) -> Vec<Tensor<B>> {
    params.iter().zip(grads).map(|(p, g)| p.sub(&g.mul_scalar(lr))).collect()
}

/// φ_r by r plain gradient steps on the support loss (no second-order graph),
/// returning every iterate φ_0..φ_r.
pub fn adapt<Base, S>(support: &S, theta: &[Tensor<Base>], steps: usize, lr: f64) -> Vec<Vec<Tensor<Base>>>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
{
    let mut iterates = vec![theta.to_vec()];
    for _ in 0..steps {
        let phi = iterates.last().expect("at least θ");
        let (_, g) = value_and_grad(support, phi);
        iterates.push(sgd_step(phi, &g, lr));
    }
    iterates
}

/// The meta-loss θ ↦ L_q(φ_r(θ)), evaluated without any graph.
pub fn meta_loss<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], steps: usize, lr: f64) -> f64
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let phi = adapt(support, theta, steps, lr).pop().expect("φ_r");
    query.eval(&phi).item()
}

/// Exact MAML hypergradient by differentiating the unrolled inner loop: θ is
/// a leaf of `Autodiff<Base>`, each inner gradient is taken one level up and
/// stays recorded, and the query loss is differentiated back to θ.
/// Memory grows with r (every step's activations are kept).
pub fn maml_unrolled<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], steps: usize, lr: f64) -> (f64, Vec<Tensor<Base>>)
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let theta_leaves = lift(theta);
    let mut phi = theta_leaves.clone();
    for _ in 0..steps {
        let (_, g) = value_and_grad(support, &phi);
        phi = sgd_step(&phi, &g, lr);
    }
    let loss = query.eval(&phi);
    let value = loss.item();
    (value, backward(&loss, &theta_leaves))
}

/// Exact MAML hypergradient by a backward sweep over the stored fast weights:
/// v ← ∇L_q(φ_r), then v ← v − α H_j v for j = r−1..0, one Hessian-vector
/// product per step. Only one step's activations are alive at a time.
pub fn maml_sweep<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], steps: usize, lr: f64) -> (f64, Vec<Tensor<Base>>)
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let mut iterates = adapt(support, theta, steps, lr);
    let phi_r = iterates.pop().expect("φ_r");
    let (loss, mut v) = value_and_grad(query, &phi_r);
    drop(phi_r);
    while let Some(phi_j) = iterates.pop() {
        let (_, _, hv) = hvp(support, &phi_j, &v);
        v = sgd_step(&v, &hv, lr);
    }
    (loss.item(), v)
}

/// First-order MAML: ∇L_q at φ_r, with φ_r treated as a constant of θ.
pub fn fomaml<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], steps: usize, lr: f64) -> (f64, Vec<Tensor<Base>>)
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let phi_r = adapt(support, theta, steps, lr).pop().expect("φ_r");
    let (loss, g) = value_and_grad(query, &phi_r);
    (loss.item(), g)
}
