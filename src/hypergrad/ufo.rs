//! UFO-BLO: per task ξ ~ Bernoulli(q), g = g_fo + (ξ/q)(g_maml − g_fo), so
//! E[g] = g_maml; q fixed or adapted to minimise cost × second moment. The
//! exact branch reuses the adaptation and g_fo, so it costs only the sweep's
//! r Hessian-vector products, and over a stack of tasks it runs for the
//! tasks that drew it only.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::autodiff::diff::{Objective, evaluate_and_grad};
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::hypergrad::inner::{InnerLoop, adapt, axpy};
use crate::hypergrad::maml::sweep;
use crate::hypergrad::stack::{place_tasks, select_tasks, task_dots};
use crate::hypergrad::task::TaskSubsets;
use crate::hypergrad::result::{Hypergradient, UfoDraws};

/// How q is chosen in `ufo`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum QRule {
    Fixed(f64),
    Adaptive(AdaptiveQ),
}

/// Adaptive q for UFO-BLO: bias-corrected moving averages (β = 0.99) of
/// D² = ‖g_fo − g_maml‖² and V² = ‖g_maml‖² over the tasks that took the
/// exact branch. The estimator's second moment is about V² + D²(1/q − 1) and
/// its expected cost per task C_fo + q·C_ex, so the q minimising their product
/// is q* = sqrt(C_fo·D² / (C_ex·(V² − D²))): 1 when V² ≤ D², clipped to
/// [q_min, 1], and q_min until the first exact sample.
///
/// Costs are counted in gradient evaluations, not timed, so a run's q sequence
/// is reproducible: C_fo = r + 1 (r support gradients, one query gradient),
/// C_ex = r · hvp_cost (the sweep's r Hessian-vector products).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveQ {
    pub q_min: f64,
    pub beta: f64,
    pub hvp_cost: f64,
    /// Uncorrected moving averages and the number of samples in them.
    pub d2_avg: f64,
    pub v2_avg: f64,
    pub samples: u64,
}

impl AdaptiveQ {
    pub fn new(q_min: f64) -> Self {
        AdaptiveQ { q_min, beta: 0.99, hvp_cost: 3.0, d2_avg: 0.0, v2_avg: 0.0, samples: 0 }
    }

    /// Bias-corrected (D², V²), once there is a sample.
    pub fn moments(&self) -> Option<(f64, f64)> {
        if self.samples == 0 {
            return None;
        }
        let correction = 1.0 - self.beta.powi(self.samples.min(i32::MAX as u64) as i32);
        Some((self.d2_avg / correction, self.v2_avg / correction))
    }

    pub fn q(&self, inner_steps: usize) -> f64 {
        let Some((d2, v2)) = self.moments() else { return self.q_min };
        if v2 <= d2 {
            return 1.0;
        }
        let c_fo = inner_steps as f64 + 1.0;
        let c_ex = inner_steps as f64 * self.hvp_cost;
        (c_fo * d2 / (c_ex * (v2 - d2))).sqrt().clamp(self.q_min, 1.0)
    }

    pub fn observe(&mut self, d2: f64, v2: f64) {
        self.d2_avg = self.beta * self.d2_avg + (1.0 - self.beta) * d2;
        self.v2_avg = self.beta * self.v2_avg + (1.0 - self.beta) * v2;
        self.samples += 1;
    }
}

impl QRule {
    pub fn q(&self, inner_steps: usize) -> f64 {
        match self {
            QRule::Fixed(q) => *q,
            QRule::Adaptive(a) => a.q(inner_steps),
        }
    }

    /// An adaptive rule takes in exact samples' (D², V²), in task order; a fixed q ignores them.
    pub fn observe_all(&mut self, observations: &[(f64, f64)]) {
        if let QRule::Adaptive(state) = self {
            for &(d2, v2) in observations {
                state.observe(d2, v2);
            }
        }
    }
}

/// UFO with its Bernoulli draws made (one per stacked task): g_fo for every
/// task, plus the exact correction weighted by 1/q for the tasks that drew
/// it. The result carries each exact task's (D², V²) for an adaptive rule.
pub fn ufo_drawn<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, draws: &UfoDraws) -> Hypergradient<Base>
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    let mut h = ufo_weighted(support, query, theta, inner, &draws.exact, 1.0 / draws.q, draws.observe);
    h.q = Some(draws.q);
    h
}

/// g_fo + w·(g_maml − g_fo) for the tasks marked `exact`, g_fo for the others.
fn ufo_weighted<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, exact: &[bool], weight: f64, observe: bool) -> Hypergradient<Base>
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    let tasks = support.tasks();
    assert_eq!(exact.len(), tasks, "ufo: {} draws for {tasks} tasks", exact.len());
    let mut iterates = adapt(support, theta, inner);
    let phi_r = iterates.pop().expect("φ_r");
    let (evaluation, g_fo) = evaluate_and_grad(query, &phi_r);
    let chosen: Vec<usize> = (0..tasks).filter(|&t| exact[t]).collect();
    let (grad, observations) = if chosen.is_empty() {
        (g_fo, vec![])
    } else if chosen.len() == tasks {
        let (correction, observations) = exact_correction(support, &iterates, &g_fo, inner, observe);
        (axpy(&g_fo, weight, &correction), observations)
    } else {
        // The sweep over the chosen tasks' support sets and stored iterates only.
        let chosen_iterates: Vec<Vec<Tensor<Base>>> = iterates.iter().map(|phi_j| select_tasks(phi_j, tasks, &chosen)).collect();
        let g_fo_chosen = select_tasks(&g_fo, tasks, &chosen);
        let (correction, observations) = exact_correction(&support.select(&chosen), &chosen_iterates, &g_fo_chosen, inner, observe);
        (axpy(&g_fo, weight, &place_tasks(&correction, tasks, &chosen)), observations)
    };
    let mut h = Hypergradient::new(grad, evaluation, phi_r);
    h.exact = exact.to_vec();
    h.observations = observations;
    h
}

/// g_maml − g_fo by MAML's sweep from g_fo, and when `observe`, per task
/// (D², V²) = (‖g_maml − g_fo‖², ‖g_maml‖²).
fn exact_correction<Base: BaseBackend, S: Objective<Base>>(support: &S, iterates: &[Vec<Tensor<Base>>], g_fo: &[Tensor<Base>], inner: &InnerLoop, observe: bool) -> (Vec<Tensor<Base>>, Vec<(f64, f64)>) {
    let tasks = support.tasks();
    let g_maml = sweep(support, iterates, g_fo.to_vec(), inner);
    let correction: Vec<Tensor<Base>> = g_maml.iter().zip(g_fo).map(|(m, f)| m.sub(f)).collect();
    let observations = if observe { task_dots(&correction, &correction, tasks).into_iter().zip(task_dots(&g_maml, &g_maml, tasks)).collect() } else { vec![] };
    (correction, observations)
}

/// One UFO estimate on one task: draw, estimate, and let an adaptive rule
/// observe an exact sample.
pub fn ufo<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, rule: &mut QRule, rng: &mut impl Rng) -> Hypergradient<Base>
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    let draws = UfoDraws::draw(rule.q(inner.steps), support.tasks(), matches!(rule, QRule::Adaptive(_)), rng);
    let h = ufo_drawn(support, query, theta, inner, &draws);
    rule.observe_all(&h.observations);
    h
}

/// The mean of `samples` independent UFO estimates on one task with a fixed
/// q. The Bernoulli draws are the only randomness, so g_fo and g_maml are
/// computed once and mixed by the number k of exact draws:
/// mean = g_fo + k/(S·q)·(g_maml − g_fo). Returns the mean and k.
pub fn ufo_mean<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, q: f64, samples: usize, rng: &mut impl Rng) -> (Hypergradient<Base>, usize)
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    let exact_draws = (0..samples).filter(|_| rng.random::<f64>() < q).count();
    let mut h = ufo_weighted(support, query, theta, inner, &[exact_draws > 0], exact_draws as f64 / (samples as f64 * q), false);
    h.q = Some(q);
    (h, exact_draws)
}
