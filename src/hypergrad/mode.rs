//! The modes, their settings and checks, and the one dispatch from a mode
//! to its estimator.

use anyhow::{Result, bail};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::autodiff::diff::Objective;
use crate::autodiff::tensor::{BaseBackend, Tensor};
use crate::hypergrad::fomaml::fomaml;
use crate::hypergrad::implicit::{ImplicitVariant, LinearSolver, Sampling, implicit_sampled, implicit_variant, implicit_with};
use crate::hypergrad::inner::{Adaptation, InnerLoop};
use crate::hypergrad::maml::{maml, maml_unrolled};
use crate::hypergrad::result::{Draws, Hypergradient, UfoDraws};
use crate::hypergrad::task::TaskSubsets;
use crate::hypergrad::ufo::{self, QRule};

/// A hypergradient mode and its own settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    /// Exact, by the backward sweep (training uses this).
    Maml,
    /// Exact, by differentiating the unrolled inner loop (memory grows with r).
    MamlUnrolled,
    Fomaml,
    Ufo(QRule),
    /// iMAML: the proximal problem's linear system by conjugate gradient,
    /// as the paper states it or (`variant`) as its reference code runs it.
    Implicit {
        lambda: f64,
        cg_steps: usize,
        #[serde(default)]
        variant: ImplicitVariant,
    },
    /// The same system by `steps` terms of the Neumann series with step `lr`
    /// (η); with `hvp_batch` each Hessian-vector product sees that many random
    /// support examples per task (stocBiO), with `inner_batch` each inner step.
    Neumann {
        lambda: f64,
        steps: usize,
        lr: f64,
        #[serde(default)]
        hvp_batch: Option<usize>,
        #[serde(default)]
        inner_batch: Option<usize>,
    },
    /// AID-FP: the Neumann series with η = αλ (α the inner step); with
    /// `inner_batch`, Grazzi et al.'s stochastic implicit differentiation.
    FixedPoint {
        lambda: f64,
        steps: usize,
        #[serde(default)]
        hvp_batch: Option<usize>,
        #[serde(default)]
        inner_batch: Option<usize>,
    },
}

impl Mode {
    pub const NAMES: &'static str = "maml, maml-unrolled, fomaml, ufo, ufo-adaptive, implicit, neumann, fixed-point";

    /// iMAML as the paper states it.
    pub fn implicit(lambda: f64, cg_steps: usize) -> Mode {
        Mode::Implicit { lambda, cg_steps, variant: ImplicitVariant::default() }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Maml => "maml",
            Mode::MamlUnrolled => "maml-unrolled",
            Mode::Fomaml => "fomaml",
            Mode::Ufo(_) => "ufo",
            Mode::Implicit { .. } => "implicit",
            Mode::Neumann { .. } => "neumann",
            Mode::FixedPoint { .. } => "fixed-point",
        }
    }

    /// The stochastic implicit modes' (hvp_batch, inner_batch).
    pub fn sampling(&self) -> (Option<usize>, Option<usize>) {
        match self {
            Mode::Neumann { hvp_batch, inner_batch, .. } | Mode::FixedPoint { hvp_batch, inner_batch, .. } => (*hvp_batch, *inner_batch),
            _ => (None, None),
        }
    }

    /// λ of the proximal inner problem, for the implicit-differentiation modes
    /// (which adapt by it at test time too).
    pub fn proximal_lambda(&self) -> Option<f64> {
        match self {
            Mode::Implicit { lambda, .. } | Mode::Neumann { lambda, .. } | Mode::FixedPoint { lambda, .. } => Some(*lambda),
            _ => None,
        }
    }

    /// How the mode adapts to a task at validation and test time.
    pub fn test_adaptation(&self) -> Adaptation {
        match self {
            Mode::Implicit { lambda, variant, .. } => variant.test_adaptation(*lambda),
            _ => self.proximal_lambda().map_or(Adaptation::Plain, Adaptation::Proximal),
        }
    }

    /// λ of the linear system the implicit modes solve, I + H/λ (differs
    /// from the proximal λ with the reference code's damping).
    pub fn system_lambda(&self) -> Option<f64> {
        match self {
            Mode::Implicit { lambda, variant, .. } => Some(variant.system_lambda(*lambda)),
            _ => self.proximal_lambda(),
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
            _ if self.proximal_lambda().is_some_and(|l| !(l.is_finite() && l > 0.0)) => {
                bail!("lambda = {}: the proximal regularisation strength must be > 0", self.proximal_lambda().unwrap_or_default())
            }
            Mode::Implicit { cg_steps: 0, .. } => bail!("cg steps = 0: implicit needs at least 1 conjugate-gradient step"),
            Mode::Implicit { variant, .. } if !(variant.cg_damping.is_finite() && variant.cg_damping >= 0.0 && variant.lambda_damping.is_finite() && variant.lambda_damping >= 0.0) => {
                bail!("cg damping = {}, lambda damping = {}: both must be finite numbers ≥ 0 (0 is the paper's system)", variant.cg_damping, variant.lambda_damping)
            }
            Mode::Neumann { steps: 0, .. } | Mode::FixedPoint { steps: 0, .. } => {
                bail!("neumann steps = 0: {} needs at least 1 term of the series", self.name())
            }
            Mode::Neumann { lr, .. } if !(lr.is_finite() && *lr > 0.0) => bail!("neumann lr = {lr}: the series step η must be a finite number > 0"),
            _ if matches!(self.sampling(), (Some(0), _) | (_, Some(0))) => {
                bail!("hvp batch or inner batch = 0: a random subset needs at least 1 support example per task")
            }
            _ => Ok(()),
        }
    }
}

impl Mode {
    /// The random choices for `tasks` tasks: ufo's branches with the rule's
    /// current q, or a subset seed per task for the stochastic implicit
    /// modes; None for deterministic modes.
    pub fn draw(&self, tasks: usize, inner: &InnerLoop, rng: &mut impl Rng) -> Option<Draws> {
        match self {
            Mode::Ufo(rule) => Some(Draws::Ufo(UfoDraws::draw(rule.q(inner.steps), tasks, matches!(rule, QRule::Adaptive(_)), rng))),
            _ if self.sampling() != (None, None) => Some(Draws::Subsets((0..tasks).map(|_| rng.random()).collect())),
            _ => None,
        }
    }

    /// An adaptive ufo rule takes in the exact tasks' (D², V²), in task order.
    pub fn observe(&mut self, observations: &[(f64, f64)]) {
        if let Mode::Ufo(rule) = self {
            rule.observe_all(observations);
        }
    }
}

/// Any mode on a stack of tasks: the one dispatch from a mode to its
/// estimator. ufo's draws are made beforehand (`Mode::draw`), so nothing is
/// mutated and stacks can run in parallel.
pub fn estimate<Base, S, Q>(mode: &Mode, support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, draws: Option<&Draws>) -> Hypergradient<Base>
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    match mode {
        Mode::Maml => maml(support, query, theta, inner),
        Mode::MamlUnrolled => maml_unrolled(support, query, theta, inner),
        Mode::Fomaml => fomaml(support, query, theta, inner),
        Mode::Ufo(_) => match draws {
            Some(Draws::Ufo(draws)) => ufo::ufo_drawn(support, query, theta, inner, draws),
            _ => panic!("ufo: the Bernoulli draws are made before the tasks run (Mode::draw)"),
        },
        Mode::Implicit { lambda, cg_steps, variant } => implicit_variant(support, query, theta, inner, *lambda, *cg_steps, variant),
        Mode::Neumann { lambda, steps, lr, .. } => series(mode, support, query, theta, inner, *lambda, LinearSolver::Neumann { steps: *steps, lr: *lr }, draws),
        Mode::FixedPoint { lambda, steps, .. } => {
            series(mode, support, query, theta, inner, *lambda, LinearSolver::Neumann { steps: *steps, lr: inner.lr * lambda }, draws)
        }
    }
}

/// The Neumann-series modes, on random subsets when the mode asks for them.
#[allow(clippy::too_many_arguments)]
fn series<Base, S, Q>(mode: &Mode, support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, solver: LinearSolver, draws: Option<&Draws>) -> Hypergradient<Base>
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    let (hvp_batch, inner_batch) = mode.sampling();
    match draws {
        Some(Draws::Subsets(seeds)) => implicit_sampled(support, query, theta, inner, lambda, solver, Sampling { hvp_batch, inner_batch, seeds }),
        _ => {
            assert!(hvp_batch.is_none() && inner_batch.is_none(), "{}: the subset seeds are drawn before the tasks run (Mode::draw)", mode.name());
            implicit_with(support, query, theta, inner, lambda, solver)
        }
    }
}

/// Any mode on a stack of tasks, drawing ufo's branches from `rng` and
/// letting an adaptive rule observe the exact ones.
pub fn hypergradient<Base, S, Q>(mode: &mut Mode, support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop, rng: &mut impl Rng) -> Hypergradient<Base>
where
    Base: BaseBackend,
    S: Objective<Base> + TaskSubsets,
    Q: Objective<Base>,
{
    drawn(mode, support.tasks(), inner, rng, |mode, draws| estimate(mode, support, query, theta, inner, draws))
}

/// Draw the mode's random choices for `tasks` tasks, run `estimator` with
/// them, and let an adaptive rule observe what it measured.
pub fn drawn<Base: BaseBackend>(mode: &mut Mode, tasks: usize, inner: &InnerLoop, rng: &mut impl Rng, estimator: impl FnOnce(&Mode, Option<&Draws>) -> Hypergradient<Base>) -> Hypergradient<Base> {
    let draws = mode.draw(tasks, inner, rng);
    let h = estimator(mode, draws.as_ref());
    mode.observe(&h.observations);
    h
}
