//! AID with a truncated Neumann series (the estimator of stocBiO): for the
//! proximal inner problem of `implicit`, with A = I + H/λ,
//! v_K = η Σ_{i<K} (I − ηA)^i ∇L_q, one Hessian-vector product per term.
//!
//! AID-FP from a zero start, the fixed-point iteration w ← w − αλ(Aw − b)
//! of the inner gradient-descent map with step α (its Jacobian is
//! I − α(H + λI) = I − αλA), is this series with η = αλ: the `fixed-point` mode.

use crate::autodiff::diff::{Objective, hvp};
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::hypergrad::implicit::proximal_system;
use crate::hypergrad::inner::{Adapted, axpy};
use crate::hypergrad::result::CurvatureWarning;
use crate::hypergrad::stack::{scale_tasks, task_dots_many};

/// A linear map on per-parameter tensors: a (damped) Hessian-vector product.
pub type LinearMap<'a, Base> = dyn FnMut(&[Tensor<Base>]) -> Vec<Tensor<Base>> + 'a;

/// v_K = η Σ_{i<K} (I − ηA)^i b for every stacked task, A = I + H/λ with H
/// the Hessian of L_s at φ. A task whose term meets ⟨p, Ap⟩ ≤ 0 (A is not
/// positive definite there) or ⟨p, Ap⟩ > 2‖p‖²/η (the terms grow) stops
/// adding terms, and the warning names the λ or η it would take.
pub fn neumann_series<Base: BaseBackend, S: Objective<Base>>(support: &S, phi: &[Tensor<Base>], b: &[Tensor<Base>], lambda: f64, steps: usize, lr: f64) -> (Vec<Tensor<Base>>, Option<CurvatureWarning>) {
    let mut apply = proximal_system(|v| hvp(support, phi, v).2, lambda, Adapted::All);
    neumann_series_of(&mut apply, support.tasks(), b, lambda, steps, lr)
}

/// The series for any product v ↦ Av (a stochastic one draws a fresh
/// Hessian estimate per call: stocBiO); `lambda` only names what a warning asks for.
pub fn neumann_series_of<Base: BaseBackend>(apply: &mut LinearMap<Base>, tasks: usize, b: &[Tensor<Base>], lambda: f64, steps: usize, lr: f64) -> (Vec<Tensor<Base>>, Option<CurvatureWarning>) {
    let mut term = b.to_vec();
    let mut sum: Vec<Tensor<Base>> = b.iter().map(|t| t.mul_scalar(lr)).collect();
    let mut active = vec![1.0; tasks];
    let mut warning = CurvatureWarning::default();
    for _ in 1..steps {
        let a_term = apply(&term);
        let [curvature, squared]: [Vec<f64>; 2] = task_dots_many(&[(&term, &a_term), (&term, &term)], tasks).try_into().expect("two pairs");
        for t in 0..tasks {
            if active[t] == 0.0 {
                continue;
            }
            if curvature[t] <= 0.0 {
                active[t] = 0.0;
                warning.observe(lambda, curvature[t], squared[t]);
            } else if lr * curvature[t] > 2.0 * squared[t] {
                // ‖(I − ηA)p‖ > ‖p‖ along p: the series would blow up from here.
                active[t] = 0.0;
                warning.observe_step(curvature[t] / squared[t]);
            }
        }
        // p ← p − ηAp; a task that stopped gets zero terms from here on.
        term = axpy(&term, -lr, &a_term);
        if active.contains(&0.0) {
            term = scale_tasks(&term, &active);
        }
        sum = axpy(&sum, lr, &term);
    }
    (sum, warning.found())
}
