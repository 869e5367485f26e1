//! What an estimator returns, and ufo's draws that some estimators take.

use rand::Rng;

use crate::autodiff::diff::Evaluation;
use crate::autodiff::tensor::{BaseBackend, Tensor};

/// ufo's Bernoulli(q) draws, one per stacked task, made before the tasks run
/// so results do not depend on the order tasks finish in.
#[derive(Clone, Debug, PartialEq)]
pub struct UfoDraws {
    pub q: f64,
    pub exact: Vec<bool>,
    /// Measure each exact task's (D², V²) for an adaptive rule (a read
    /// from the device that a fixed q does not need).
    pub observe: bool,
}

/// The random choices a mode makes for a stack of tasks before they run, so
/// that results do not depend on the order tasks finish in.
#[derive(Clone, Debug, PartialEq)]
pub enum Draws {
    /// ufo's Bernoulli branches.
    Ufo(UfoDraws),
    /// One seed per task for the random example subsets of the stochastic
    /// implicit modes (`hvp_batch`, `inner_batch`).
    Subsets(Vec<u64>),
}

impl Draws {
    /// The draws of tasks start..start+len.
    pub fn slice(&self, start: usize, len: usize) -> Self {
        match self {
            Draws::Ufo(u) => Draws::Ufo(u.slice(start, len)),
            Draws::Subsets(seeds) => Draws::Subsets(seeds[start..start + len].to_vec()),
        }
    }

    /// ufo's q.
    pub fn q(&self) -> Option<f64> {
        match self {
            Draws::Ufo(u) => Some(u.q),
            Draws::Subsets(_) => None,
        }
    }
}

impl UfoDraws {
    pub fn draw(q: f64, tasks: usize, observe: bool, rng: &mut impl Rng) -> Self {
        UfoDraws { q, exact: (0..tasks).map(|_| rng.random::<f64>() < q).collect(), observe }
    }

    /// The draws of tasks start..start+len.
    pub fn slice(&self, start: usize, len: usize) -> Self {
        UfoDraws { q: self.q, exact: self.exact[start..start + len].to_vec(), observe: self.observe }
    }
}

/// The hypergradients of a stack of tasks, and what adaptation achieved.
pub struct Hypergradient<B: BaseBackend> {
    /// Per task, stacked like the parameters (θ's shapes for one task).
    pub grad: Vec<Tensor<B>>,
    /// The query loss (summed over tasks) and outputs at the adapted parameters.
    pub query: Evaluation<B>,
    /// The adapted parameters (φ_r, or the proximal solution for `implicit`).
    pub adapted: Vec<Tensor<B>>,
    /// ufo: the q of the draws, which tasks took the exact branch, and
    /// (D², V²) of each of those, in task order.
    pub q: Option<f64>,
    pub exact: Vec<bool>,
    pub observations: Vec<(f64, f64)>,
    /// implicit, neumann, fixed-point: non-positive curvature met on the way.
    pub curvature: Option<CurvatureWarning>,
}

impl<B: BaseBackend> Hypergradient<B> {
    pub fn new(grad: Vec<Tensor<B>>, query: Evaluation<B>, adapted: Vec<Tensor<B>>) -> Self {
        Hypergradient { grad, query, adapted, q: None, exact: vec![], observations: vec![], curvature: None }
    }

    /// L_q at the adapted parameters (reads the value back).
    pub fn query_loss(&self) -> f64 {
        self.query.loss.item()
    }

    /// ufo on one task: whether the exact branch ran.
    pub fn exact_branch(&self) -> Option<bool> {
        self.q.map(|_| self.exact.iter().any(|&e| e))
    }
}


/// What an implicit solver met that keeps its linear solve from converging,
/// per task: non-positive curvature (I + H/λ is not positive definite, so
/// the system has no meaningful solution there), or for the Neumann series a
/// step η too large for the curvature met (the terms grow). Those tasks stop
/// early, with their solution so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CurvatureWarning {
    /// Tasks that met non-positive curvature.
    pub tasks: usize,
    /// The λ above which I + H/λ is positive along every direction met.
    pub lambda_needed: f64,
    /// Tasks whose series step was too large.
    pub step_tasks: usize,
    /// The Neumann step η below which the terms met shrink.
    pub lr_below: f64,
}

impl CurvatureWarning {
    /// A task met ⟨p, Ap⟩ = `curvature` ≤ 0 along p, ‖p‖² = `squared`, at λ:
    /// ⟨p, Hp⟩ = λ(⟨p, Ap⟩ − ‖p‖²), so A is positive along p for λ > −⟨p, Hp⟩/‖p‖².
    pub fn observe(&mut self, lambda: f64, curvature: f64, squared: f64) {
        self.tasks += 1;
        let needed = if squared > 0.0 { lambda * (squared - curvature) / squared } else { lambda };
        self.lambda_needed = self.lambda_needed.max(needed);
    }

    /// A task's Neumann term grows: ‖(I − ηA)p‖ > ‖p‖ along a direction of
    /// Rayleigh quotient ρ = ⟨p, Ap⟩/‖p‖² > 2/η; the terms shrink for η < 2/ρ.
    pub fn observe_step(&mut self, rayleigh: f64) {
        let below = 2.0 / rayleigh;
        self.lr_below = if self.step_tasks == 0 { below } else { self.lr_below.min(below) };
        self.step_tasks += 1;
    }

    /// Some, when a task met either.
    pub fn found(self) -> Option<Self> {
        (self.tasks + self.step_tasks > 0).then_some(self)
    }

    /// The warnings of two sets of tasks together.
    pub fn merge(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(x), Some(y)) => Some(CurvatureWarning {
                tasks: x.tasks + y.tasks,
                lambda_needed: x.lambda_needed.max(y.lambda_needed),
                step_tasks: x.step_tasks + y.step_tasks,
                lr_below: match (x.step_tasks, y.step_tasks) {
                    (0, _) => y.lr_below,
                    (_, 0) => x.lr_below,
                    _ => x.lr_below.min(y.lr_below),
                },
            }),
            (x, y) => x.or(y),
        }
    }

    /// What happened and what to do, for logs and messages.
    pub fn describe(&self, lambda: f64) -> String {
        let mut parts = Vec::new();
        if self.tasks > 0 {
            parts.push(format!(
                "{} task(s) met non-positive curvature: I + H/λ is not positive definite at λ = {lambda}, so their linear solve stopped early; set mode.lambda above {:.4} (e.g. {:.4})",
                self.tasks,
                self.lambda_needed,
                2.0 * self.lambda_needed
            ));
        }
        if self.step_tasks > 0 {
            parts.push(format!(
                "{} task(s) stopped their Neumann series because its terms grew: set mode.neumann_lr below {:.4} (for fixed-point, train.inner_lr × lambda below it)",
                self.step_tasks, self.lr_below
            ));
        }
        parts.join("; ")
    }
}
