//! Hypergradients: the outer gradient of a task's query loss after inner-loop
//! adaptation, by one of four modes.
//!
//! θ are the meta-parameters, L_s and L_q a task's support and query losses.
//! The inner loop is r steps of gradient descent with step α:
//! φ_0 = θ, φ_{j+1} = φ_j − α ∇L_s(φ_j); the meta-loss is L_q(φ_r), and H_j
//! is the Hessian of L_s at φ_j.
//!
//! - `maml`: g = (I − αH_0)…(I − αH_{r−1}) ∇L_q(φ_r), exact. Computed by a
//!   backward sweep over the stored fast weights (one Hessian-vector product
//!   per step, memory flat in r) or, for checking, by differentiating the
//!   unrolled graph (`maml-unrolled`).
//! - `fomaml`: g = ∇L_q(φ_r).
//! - `ufo`: per task ξ ~ Bernoulli(q), g = g_fo + (ξ/q)(g_maml − g_fo), so
//!   E[g] = g_maml; q fixed or adapted to minimise cost × second moment.
//! - `implicit` (iMAML): φ minimises L_s(φ) + (λ/2)‖φ − θ‖² approximately (r
//!   steps from θ), and g solves (I + H_s(φ)/λ) g = ∇L_q(φ) by K steps of
//!   conjugate gradient.

use anyhow::{Result, bail};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::autodiff::diff::{Objective, backward, dot_all, hvp, lift, value_and_grad};
use crate::models::conv4::{Batch, BatchLoss, Conv4, KeepLogits, accuracy};
use crate::autodiff::tensor::{Level, Tensor};

/// θ − α·g, tensor by tensor.
pub fn sgd_step<B: Level>(params: &[Tensor<B>], grads: &[Tensor<B>], lr: f64) -> Vec<Tensor<B>> {
    axpy(params, -lr, grads)
}

/// a + s·b, tensor by tensor.
pub fn axpy<B: Level>(a: &[Tensor<B>], s: f64, b: &[Tensor<B>]) -> Vec<Tensor<B>> {
    a.iter().zip(b).map(|(x, y)| x.add(&y.mul_scalar(s))).collect()
}

/// The inner loop: number of gradient steps on the support set, and their size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InnerLoop {
    pub steps: usize,
    pub lr: f64,
}

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
}

/// A hypergradient mode and its own settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    /// Exact, by the backward sweep (training uses this).
    Maml,
    /// Exact, by differentiating the unrolled inner loop (memory grows with r).
    MamlUnrolled,
    Fomaml,
    Ufo(QRule),
    Implicit { lambda: f64, cg_steps: usize },
}

impl Mode {
    pub const NAMES: &'static str = "maml, maml-unrolled, fomaml, ufo, ufo-adaptive, implicit";

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Maml => "maml",
            Mode::MamlUnrolled => "maml-unrolled",
            Mode::Fomaml => "fomaml",
            Mode::Ufo(_) => "ufo",
            Mode::Implicit { .. } => "implicit",
        }
    }

    /// Check the mode's settings and the inner loop it runs with; errors name
    /// the value and the allowed range.
    pub fn validate(&self, inner: &InnerLoop) -> Result<()> {
        if inner.steps == 0 {
            bail!("inner steps = 0: mode {} adapts on the support set and needs at least 1 inner step", self.name());
        }
        if !(inner.lr.is_finite() && inner.lr > 0.0) {
            bail!("inner learning rate = {}: it must be a finite number > 0", inner.lr);
        }
        match self {
            Mode::Ufo(QRule::Fixed(q)) if !(*q > 0.0 && *q <= 1.0) => {
                bail!("q = {q}: the exact-branch probability must be in (0, 1]")
            }
            Mode::Ufo(QRule::Adaptive(a)) if !(a.q_min > 0.0 && a.q_min <= 1.0) => {
                bail!("q_min = {}: the smallest exact-branch probability must be in (0, 1]", a.q_min)
            }
            Mode::Implicit { lambda, .. } if !(lambda.is_finite() && *lambda > 0.0) => {
                bail!("lambda = {lambda}: the proximal regularisation strength must be > 0")
            }
            Mode::Implicit { cg_steps: 0, .. } => bail!("cg steps = 0: implicit needs at least 1 conjugate-gradient step"),
            _ => Ok(()),
        }
    }
}

/// A task's hypergradient and what adaptation achieved on its query set.
pub struct Hypergradient<B: Level> {
    pub grad: Vec<Tensor<B>>,
    /// L_q at the adapted parameters.
    pub query_loss: f64,
    /// The adapted parameters (φ_r, or the proximal solution for `implicit`).
    pub adapted: Vec<Tensor<B>>,
    /// For `ufo`: whether the exact branch ran, and the q it was drawn with.
    pub exact_branch: Option<bool>,
    pub q: Option<f64>,
}

/// φ_0..φ_r by r plain gradient steps on the support loss (no second-order graph).
pub fn adapt<Base, S>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop) -> Vec<Vec<Tensor<Base>>>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
{
    let mut iterates = vec![theta.to_vec()];
    for _ in 0..inner.steps {
        let phi = iterates.last().expect("at least θ");
        let (_, g) = value_and_grad(support, phi);
        iterates.push(sgd_step(phi, &g, inner.lr));
    }
    iterates
}

/// The meta-loss θ ↦ L_q(φ_r(θ)), evaluated without any graph.
pub fn meta_loss<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> f64
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let phi = adapt(support, theta, inner).pop().expect("φ_r");
    query.eval(&phi).item()
}

/// Exact MAML by differentiating the unrolled inner loop: θ is a leaf of
/// `Autodiff<Base>`, each inner gradient is taken one level up and stays
/// recorded, and the query loss is differentiated back to θ.
pub fn maml_unrolled<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> Hypergradient<Base>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let theta_leaves = lift(theta);
    let mut phi = theta_leaves.clone();
    for _ in 0..inner.steps {
        let (_, g) = value_and_grad(support, &phi);
        phi = sgd_step(&phi, &g, inner.lr);
    }
    let loss = query.eval(&phi);
    let grad = backward(&loss, &theta_leaves);
    Hypergradient {
        grad,
        query_loss: loss.item(),
        adapted: phi.iter().map(|p| p.to_base()).collect(),
        exact_branch: None,
        q: None,
    }
}

/// The sweep v ← v − α H_j v for j = r−1..0 over stored iterates φ_0..φ_{r−1}.
pub(crate) fn sweep<Base, S>(support: &S, iterates: &[Vec<Tensor<Base>>], mut v: Vec<Tensor<Base>>, lr: f64) -> Vec<Tensor<Base>>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
{
    for phi_j in iterates.iter().rev() {
        let (_, _, hv) = hvp(support, phi_j, &v);
        v = sgd_step(&v, &hv, lr);
    }
    v
}

/// Exact MAML by a backward sweep over the stored fast weights: only one
/// step's activations are alive at a time.
pub fn maml<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> Hypergradient<Base>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let mut iterates = adapt(support, theta, inner);
    let phi_r = iterates.pop().expect("φ_r");
    let (loss, g_query) = value_and_grad(query, &phi_r);
    let grad = sweep(support, &iterates, g_query, inner.lr);
    Hypergradient { grad, query_loss: loss.item(), adapted: phi_r, exact_branch: None, q: None }
}

/// First-order MAML: ∇L_q at φ_r, with φ_r treated as a constant of θ.
pub fn fomaml<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> Hypergradient<Base>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let phi_r = adapt(support, theta, inner).pop().expect("φ_r");
    let (loss, grad) = value_and_grad(query, &phi_r);
    Hypergradient { grad, query_loss: loss.item(), adapted: phi_r, exact_branch: None, q: None }
}

/// What UFO mixes: the adaptation, g_fo = ∇L_q(φ_r), and, when the exact
/// branch runs, g_maml from the sweep (which reuses the adaptation and g_fo,
/// so the exact branch costs only the r Hessian-vector products).
struct UfoParts<Base: Level> {
    query_loss: f64,
    adapted: Vec<Tensor<Base>>,
    g_fo: Vec<Tensor<Base>>,
    g_maml: Option<Vec<Tensor<Base>>>,
}

impl<Base: Level> UfoParts<Base> {
    /// g_fo + w·(g_maml − g_fo); g_fo alone when the exact branch did not run.
    fn mix(&self, weight: f64) -> Vec<Tensor<Base>> {
        match &self.g_maml {
            Some(g_maml) => self.g_fo.iter().zip(g_maml).map(|(f, m)| f.add(&m.sub(f).mul_scalar(weight))).collect(),
            None => self.g_fo.clone(),
        }
    }
}

fn ufo_parts<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, exact: bool) -> UfoParts<Base>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let mut iterates = adapt(support, theta, inner);
    let adapted = iterates.pop().expect("φ_r");
    let (loss, g_fo) = value_and_grad(query, &adapted);
    let g_maml = exact.then(|| sweep(support, &iterates, g_fo.clone(), inner.lr));
    UfoParts { query_loss: loss.item(), adapted, g_fo, g_maml }
}

/// UFO-BLO: g_fo always, the exact correction with probability q, weighted
/// by 1/q so the estimate is unbiased. With an adaptive rule, exact samples
/// update its moving averages.
pub fn ufo<Base, S, Q>(
    support: &S,
    query: &Q,
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    rule: &mut QRule,
    rng: &mut impl Rng,
) -> Hypergradient<Base>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let q = rule.q(inner.steps);
    let (h, observation) = ufo_drawn(support, query, theta, inner, q, rng.random::<f64>() < q);
    if let (QRule::Adaptive(state), Some((d2, v2))) = (rule, observation) {
        state.observe(d2, v2);
    }
    h
}

/// One UFO estimate whose Bernoulli(q) draw is already made (`exact`), and
/// for an exact sample the (D², V²) an adaptive rule observes.
pub fn ufo_drawn<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, q: f64, exact: bool) -> (Hypergradient<Base>, Option<(f64, f64)>)
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let parts = ufo_parts(support, query, theta, inner, exact);
    let observation = parts.g_maml.as_ref().map(|g_maml| {
        let correction: Vec<Tensor<Base>> = g_maml.iter().zip(&parts.g_fo).map(|(m, f)| m.sub(f)).collect();
        (dot_all(&correction, &correction), dot_all(g_maml, g_maml))
    });
    let grad = parts.mix(1.0 / q);
    (Hypergradient { grad, query_loss: parts.query_loss, adapted: parts.adapted, exact_branch: Some(exact), q: Some(q) }, observation)
}

/// The mean of `samples` independent UFO estimates on one task with a fixed
/// q. The Bernoulli draws are the only randomness, so g_fo and g_maml are
/// computed once and mixed by the number k of exact draws:
/// mean = g_fo + k/(S·q)·(g_maml − g_fo). Returns the mean and k.
pub fn ufo_mean<Base, S, Q>(
    support: &S,
    query: &Q,
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    q: f64,
    samples: usize,
    rng: &mut impl Rng,
) -> (Hypergradient<Base>, usize)
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let exact_draws = (0..samples).filter(|_| rng.random::<f64>() < q).count();
    let parts = ufo_parts(support, query, theta, inner, exact_draws > 0);
    let grad = parts.mix(exact_draws as f64 / (samples as f64 * q));
    let hypergradient = Hypergradient { grad, query_loss: parts.query_loss, adapted: parts.adapted, exact_branch: Some(exact_draws > 0), q: Some(q) };
    (hypergradient, exact_draws)
}

/// The proximal objective L_s(φ) + (λ/2)‖φ − θ‖², θ a constant.
struct Proximal<'a, Base: Level<Base = Base>, S> {
    support: &'a S,
    theta: &'a [Tensor<Base>],
    lambda: f64,
}

impl<Base: Level<Base = Base>, S: Objective<Base>> Objective<Base> for Proximal<'_, Base, S> {
    fn eval<B: Level<Base = Base>>(&self, phi: &[Tensor<B>]) -> Tensor<B> {
        let distance = phi
            .iter()
            .zip(self.theta)
            .map(|(p, t)| p.sub(&Tensor::from_base(t)).square().sum())
            .reduce(|a, b| a.add(&b))
            .expect("at least one parameter");
        self.support.eval(phi).add(&distance.mul_scalar(self.lambda / 2.0))
    }
}

/// The approximate proximal solution: r gradient steps on
/// L_s(φ) + (λ/2)‖φ − θ‖² from θ.
pub fn proximal_adapt<Base, S>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64) -> Vec<Tensor<Base>>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
{
    let objective = Proximal { support, theta, lambda };
    let mut phi = theta.to_vec();
    for _ in 0..inner.steps {
        let (_, g) = value_and_grad(&objective, &phi);
        phi = sgd_step(&phi, &g, inner.lr);
    }
    phi
}

/// K steps of conjugate gradient from 0 on (I + H/λ) x = b, H the Hessian of
/// L_s at φ, applied by Hessian-vector products: the block iteration of
/// `batched` with one block. It stops early on convergence, and on
/// non-positive curvature with the best solution so far rather than diverge.
pub fn conjugate_gradient<Base, S>(support: &S, phi: &[Tensor<Base>], b: &[Tensor<Base>], lambda: f64, steps: usize) -> Vec<Tensor<Base>>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
{
    crate::batched::conjugate_gradient_tasks(support, phi, b, lambda, steps, 1)
}

/// iMAML: proximal adaptation, then conjugate gradient on (I + H/λ) g = ∇L_q(φ).
pub fn implicit<Base, S, Q>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, cg_steps: usize) -> Hypergradient<Base>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    let phi = proximal_adapt(support, theta, inner, lambda);
    let (loss, g_query) = value_and_grad(query, &phi);
    let grad = conjugate_gradient(support, &phi, &g_query, lambda, cg_steps);
    Hypergradient { grad, query_loss: loss.item(), adapted: phi, exact_branch: None, q: None }
}

/// Any mode on generic objectives. `rule` state (adaptive q) lives in `mode`.
pub fn hypergradient<Base, S, Q>(
    mode: &mut Mode,
    support: &S,
    query: &Q,
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    rng: &mut impl Rng,
) -> Hypergradient<Base>
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    match mode {
        Mode::Ufo(rule) => ufo(support, query, theta, inner, rule, rng),
        other => hypergradient_drawn(other, support, query, theta, inner, None).0,
    }
}

/// Any mode, with ufo's draw made beforehand: `ufo_draw` = (q, exact branch).
/// Returns the hypergradient and, for an exact ufo sample, the (D², V²) an
/// adaptive q observes. Nothing is mutated, so tasks can run in parallel.
pub fn hypergradient_drawn<Base, S, Q>(
    mode: &Mode,
    support: &S,
    query: &Q,
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    ufo_draw: Option<(f64, bool)>,
) -> (Hypergradient<Base>, Option<(f64, f64)>)
where
    Base: Level<Base = Base>,
    S: Objective<Base>,
    Q: Objective<Base>,
{
    match mode {
        Mode::Maml => (maml(support, query, theta, inner), None),
        Mode::MamlUnrolled => (maml_unrolled(support, query, theta, inner), None),
        Mode::Fomaml => (fomaml(support, query, theta, inner), None),
        Mode::Ufo(_) => {
            let (q, exact) = ufo_draw.expect("ufo: the Bernoulli draw must be made before the task runs");
            ufo_drawn(support, query, theta, inner, q, exact)
        }
        Mode::Implicit { lambda, cg_steps } => (implicit(support, query, theta, inner, *lambda, *cg_steps), None),
    }
}

/// One few-shot task: support and query batches with labels in 0..way.
pub struct Task<Base: Level> {
    pub support: Batch<Base>,
    pub query: Batch<Base>,
}

/// A task's hypergradient for the Conv-4, with the query accuracy after adaptation.
pub struct TaskResult<Base: Level> {
    pub hypergradient: Hypergradient<Base>,
    pub query_accuracy: f64,
}

/// Accuracy of the Conv-4 with adapted parameters on a batch.
pub fn adapted_accuracy<Base: Level>(model: &Conv4, adapted: &[Tensor<Base>], batch: &Batch<Base>) -> f64 {
    accuracy(&model.forward(adapted, &batch.images), &batch.labels)
}

pub fn task_hypergradient<Base: Level<Base = Base>>(
    mode: &mut Mode,
    model: &Conv4,
    task: &Task<Base>,
    theta: &[Tensor<Base>],
    inner: &InnerLoop,
    rng: &mut impl Rng,
) -> TaskResult<Base> {
    let support = BatchLoss { model, batch: &task.support };
    let query = KeepLogits::new(BatchLoss { model, batch: &task.query });
    let hypergradient = hypergradient(mode, &support, &query, theta, inner, rng);
    // Every mode evaluated the query loss last at the adapted parameters.
    let query_accuracy = accuracy(&query.latest().expect("the query loss was evaluated"), &task.query.labels);
    TaskResult { hypergradient, query_accuracy }
}

