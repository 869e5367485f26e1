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
}

impl<B: BaseBackend> Hypergradient<B> {
    pub fn new(grad: Vec<Tensor<B>>, query: Evaluation<B>, adapted: Vec<Tensor<B>>) -> Self {
        Hypergradient { grad, query, adapted, q: None, exact: vec![], observations: vec![] }
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

