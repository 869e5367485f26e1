//! Implicit differentiation of the proximal inner problem (iMAML, AID): φ
//! minimises L_s(φ) + (λ/2)‖φ − θ‖² approximately (r steps from θ), and g
//! solves (I + H_s(φ)/λ) g = ∇L_q(φ), one block per stacked task, by a linear
//! solver given as an argument: K steps of conjugate gradient (`implicit`),
//! or a truncated Neumann series (`neumann`, `fixed-point`; neumann.rs).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autodiff::diff::{Objective, evaluate_and_grad, hvp};
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::hypergrad::inner::{Adaptation, Adapted, InnerLoop, adapt_to, axpy, proximal_adapt, proximal_adapt_sampled};
use crate::hypergrad::neumann::{LinearMap, neumann_series_of};
use crate::hypergrad::result::{CurvatureWarning, Hypergradient};
use crate::hypergrad::task::TaskSubsets;
use crate::hypergrad::stack::{scale_tasks, task_dots};

/// How the linear system (I + H/λ) g = ∇L_q is solved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinearSolver {
    /// K steps of conjugate gradient from 0.
    ConjugateGradient { steps: usize },
    /// K terms of the Neumann series with step η.
    Neumann { steps: usize, lr: f64 },
}

/// iMAML with conjugate gradient, as the paper states it.
pub fn implicit<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, cg_steps: usize) -> Hypergradient<Base> {
    implicit_variant(support, query, theta, inner, lambda, cg_steps, &ImplicitVariant::default())
}

/// How iMAML's inner solve is run: the paper's gradient steps on the
/// proximal objective, or its reference code's plain steps then one step
/// back toward θ on the proximal term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InnerSolve {
    #[default]
    Proximal,
    PullBack,
}

/// Where iMAML's reference code departs from the paper (defaults: the
/// paper). Its conjugate gradient solves ((1 + c)I + H/(λ + d)) x = ∇L_q,
/// c = `cg_damping`, d = `lambda_damping`, which is (1 + c) times the
/// paper's system at λ' = (1 + c)(λ + d): so x is the paper's solution at λ'
/// divided by 1 + c, and positive definite down to curvature −λ' instead of −λ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImplicitVariant {
    pub inner_solve: InnerSolve,
    pub cg_damping: f64,
    pub lambda_damping: f64,
}

impl ImplicitVariant {
    /// How a task is adapted to in training.
    pub fn training_adaptation(&self, lambda: f64) -> Adaptation {
        match self.inner_solve {
            InnerSolve::Proximal => Adaptation::Proximal(lambda),
            InnerSolve::PullBack => Adaptation::PullBack(lambda),
        }
    }

    /// How a task is adapted to at validation and test time: the paper
    /// adapts as it trains; the reference code tests with plain steps (its
    /// measure_accuracy with λ = 0).
    pub fn test_adaptation(&self, lambda: f64) -> Adaptation {
        match self.inner_solve {
            InnerSolve::Proximal => Adaptation::Proximal(lambda),
            InnerSolve::PullBack => Adaptation::Plain,
        }
    }

    /// λ' of the equivalent undamped system.
    pub fn system_lambda(&self, lambda: f64) -> f64 {
        (1.0 + self.cg_damping) * (lambda + self.lambda_damping)
    }
}

/// iMAML with conjugate gradient, in `variant`'s inner solve and linear system.
pub fn implicit_variant<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, cg_steps: usize, variant: &ImplicitVariant) -> Hypergradient<Base> {
    let phi = adapt_to(support, theta, inner, variant.training_adaptation(lambda));
    let mut h = solved_at(support, query, phi, inner, variant.system_lambda(lambda), LinearSolver::ConjugateGradient { steps: cg_steps });
    if variant.cg_damping != 0.0 {
        h.grad = h.grad.iter().map(|g| g.mul_scalar(1.0 / (1.0 + variant.cg_damping))).collect();
    }
    h
}

/// Proximal adaptation, then the linear system by `solver`; the result says
/// when the solver met non-positive curvature.
pub fn implicit_with<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, solver: LinearSolver) -> Hypergradient<Base> {
    solved_at(support, query, proximal_adapt(support, theta, inner, lambda), inner, lambda, solver)
}

/// The linear system at the fast weights φ with the support loss's exact
/// Hessian products (`solved`).
fn solved_at<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, phi: Vec<Tensor<Base>>, inner: &InnerLoop, lambda: f64, solver: LinearSolver) -> Hypergradient<Base> {
    let mut hessian = |v: &[Tensor<Base>]| hvp(support, &phi, v).2;
    solved(query, phi.clone(), &mut hessian, support.tasks(), lambda, solver, inner)
}

/// Random example subsets for the stochastic implicit modes: each
/// Hessian-vector product (`hvp_batch`) and each inner step (`inner_batch`)
/// sees `size` random support examples of each task, drawn from the task's seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling<'a> {
    pub hvp_batch: Option<usize>,
    pub inner_batch: Option<usize>,
    pub seeds: &'a [u64],
}

/// `implicit_with` on random subsets of the support examples (stocBiO with
/// the Neumann series and `hvp_batch`; Grazzi et al.'s stochastic implicit
/// differentiation with the fixed point and `inner_batch`).
pub fn implicit_sampled<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, solver: LinearSolver, sampling: Sampling) -> Hypergradient<Base>
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    assert_eq!(sampling.seeds.len(), support.tasks(), "one subset seed per task");
    let mut rngs: Vec<ChaCha8Rng> = sampling.seeds.iter().map(|&s| ChaCha8Rng::seed_from_u64(s)).collect();
    let phi = match sampling.inner_batch {
        Some(size) => proximal_adapt_sampled(support, theta, inner, lambda, size, &mut rngs),
        None => proximal_adapt(support, theta, inner, lambda),
    };
    let mut hessian = |v: &[Tensor<Base>]| match sampling.hvp_batch {
        Some(size) => hvp(&support.subsample(size, &mut rngs), &phi, v).2,
        None => hvp(support, &phi, v).2,
    };
    solved(query, phi.clone(), &mut hessian, support.tasks(), lambda, solver, inner)
}

/// ∇L_q at φ, and the system (I + MHM/λ) x = M∇L_q solved by `solver` with
/// the Hessian product `hessian`, M the mask of adapted parameters. With
/// every parameter adapted g = x; otherwise the parameters held at θ in the
/// inner loop get ∇L_q − (Hx)/λ, their effect through the adapted ones.
fn solved<Base: BaseBackend, Q: Objective<Base>>(query: &Q, phi: Vec<Tensor<Base>>, hessian: &mut LinearMap<Base>, tasks: usize, lambda: f64, solver: LinearSolver, inner: &InnerLoop) -> Hypergradient<Base> {
    let (evaluation, g_query) = evaluate_and_grad(query, &phi);
    let adapted = inner.adapted;
    let b = adapted.mask(&g_query);
    let (x, curvature) = {
        let mut apply = proximal_system(&mut *hessian, lambda, adapted);
        match solver {
            LinearSolver::ConjugateGradient { steps } => conjugate_gradient_of(&mut apply, tasks, &b, lambda, steps),
            LinearSolver::Neumann { steps, lr } => neumann_series_of(&mut apply, tasks, &b, lambda, steps, lr),
        }
    };
    let grad = match adapted {
        Adapted::All => x,
        Adapted::Last(_) => {
            let held = axpy(&g_query, -1.0 / lambda, &hessian(&x));
            let n = x.len();
            x.into_iter().zip(held).enumerate().map(|(i, (xi, hi))| if adapted.includes(i, n) { xi } else { hi }).collect()
        }
    };
    let mut h = Hypergradient::new(grad, evaluation, phi);
    h.curvature = curvature;
    h
}

/// K steps of conjugate gradient from 0 on (I + H/λ) x = b, H the Hessian of
/// L_s at φ applied by Hessian-vector products, for every stacked task at
/// once with each task's own step sizes and stopping rule (the Hessian of a
/// sum of independent tasks is block-diagonal). A task stops early on
/// convergence, and on non-positive curvature with its best solution so far
/// rather than diverge.
pub fn conjugate_gradient<Base: BaseBackend, S: Objective<Base>>(support: &S, phi: &[Tensor<Base>], b: &[Tensor<Base>], lambda: f64, steps: usize) -> Vec<Tensor<Base>> {
    conjugate_gradient_checked(support, phi, b, lambda, steps).0
}

/// `conjugate_gradient`, and a warning when a task met non-positive curvature.
pub fn conjugate_gradient_checked<Base: BaseBackend, S: Objective<Base>>(support: &S, phi: &[Tensor<Base>], b: &[Tensor<Base>], lambda: f64, steps: usize) -> (Vec<Tensor<Base>>, Option<CurvatureWarning>) {
    let mut apply = proximal_system(|v| hvp(support, phi, v).2, lambda, Adapted::All);
    conjugate_gradient_of(&mut apply, support.tasks(), b, lambda, steps)
}

/// The proximal system's product v ↦ v + MHv/λ from a Hessian product H,
/// M the mask of adapted parameters (v itself lies in their block).
pub(crate) fn proximal_system<Base: BaseBackend>(mut hessian: impl FnMut(&[Tensor<Base>]) -> Vec<Tensor<Base>>, lambda: f64, adapted: Adapted) -> impl FnMut(&[Tensor<Base>]) -> Vec<Tensor<Base>> {
    move |v| axpy(v, 1.0 / lambda, &adapted.mask(&hessian(v)))
}

/// Conjugate gradient for any product v ↦ Av = v + Hv/λ, per stacked task.
fn conjugate_gradient_of<Base: BaseBackend>(apply: &mut LinearMap<Base>, tasks: usize, b: &[Tensor<Base>], lambda: f64, steps: usize) -> (Vec<Tensor<Base>>, Option<CurvatureWarning>) {
    let mut x: Vec<Tensor<Base>> = b.iter().map(|t| t.mul_scalar(0.0)).collect();
    let mut residual = b.to_vec();
    let mut direction = b.to_vec();
    let mut rs = task_dots(&residual, &residual, tasks);
    let stop: Vec<f64> = rs.iter().map(|r| r * 1e-24).collect();
    let mut done: Vec<bool> = rs.iter().zip(&stop).map(|(r, s)| *r <= *s || *r == 0.0).collect();
    let mut warning = CurvatureWarning::default();
    for _ in 0..steps {
        if done.iter().all(|&d| d) {
            break;
        }
        let a_dir = apply(&direction);
        let curvature = task_dots(&direction, &a_dir, tasks);
        if (0..tasks).any(|t| !done[t] && curvature[t] <= 0.0) {
            // Not positive definite along this direction: keep the solution so far, and say so.
            let squared = task_dots(&direction, &direction, tasks);
            for t in 0..tasks {
                if !done[t] && curvature[t] <= 0.0 {
                    warning.observe(lambda, curvature[t], squared[t]);
                    done[t] = true;
                }
            }
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
    (x, warning.found())
}
