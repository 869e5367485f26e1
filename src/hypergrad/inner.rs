//! The inner loop: gradient steps on the support loss, plain or proximal.

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autodiff::diff::{Objective, value_and_grad};
use crate::autodiff::tensor::{BaseBackend, Level, Tensor};
use crate::hypergrad::task::TaskSubsets;

/// The inner loop: number of gradient steps on the support set, their size,
/// and which parameters they adapt.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InnerLoop {
    pub steps: usize,
    pub lr: f64,
    #[serde(default)]
    pub adapted: Adapted,
}

impl InnerLoop {
    /// `steps` steps of size `lr` on every parameter.
    pub fn new(steps: usize, lr: f64) -> Self {
        InnerLoop { steps, lr, adapted: Adapted::All }
    }
}

/// Which parameters the inner loop adapts; the others stay at θ in the inner
/// loop and are trained by the outer update alone (through the hypergradient,
/// which includes their effect on the adapted ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Adapted {
    #[default]
    All,
    /// The last n parameter tensors: a model's head (ANIL, hyper-representation).
    Last(usize),
}

impl Adapted {
    /// Whether parameter `index` of `count` is adapted.
    pub fn includes(self, index: usize, count: usize) -> bool {
        match self {
            Adapted::All => true,
            Adapted::Last(n) => index + n >= count,
        }
    }

    /// M·v: `v` with the tensors that are not adapted zeroed (`v` itself for All).
    pub fn mask<B: Level>(self, v: &[Tensor<B>]) -> Vec<Tensor<B>> {
        match self {
            Adapted::All => v.to_vec(),
            Adapted::Last(_) => v.iter().enumerate().map(|(i, t)| if self.includes(i, v.len()) { t.clone() } else { t.mul_scalar(0.0) }).collect(),
        }
    }
}

/// θ − α·g, tensor by tensor.
pub fn sgd_step<B: Level>(params: &[Tensor<B>], grads: &[Tensor<B>], lr: f64) -> Vec<Tensor<B>> {
    axpy(params, -lr, grads)
}

/// One inner step: φ − α·g on the adapted parameters, the rest unchanged.
pub fn inner_step<B: Level>(phi: &[Tensor<B>], grads: &[Tensor<B>], inner: &InnerLoop) -> Vec<Tensor<B>> {
    let n = phi.len();
    phi.iter().zip(grads).enumerate().map(|(i, (p, g))| if inner.adapted.includes(i, n) { p.add(&g.mul_scalar(-inner.lr)) } else { p.clone() }).collect()
}

/// a + s·b, tensor by tensor.
pub fn axpy<B: Level>(a: &[Tensor<B>], s: f64, b: &[Tensor<B>]) -> Vec<Tensor<B>> {
    a.iter().zip(b).map(|(x, y)| x.add(&y.mul_scalar(s))).collect()
}

/// φ_0..φ_r by r plain gradient steps on the support loss (no second-order graph).
pub fn adapt<Base: BaseBackend, S: Objective<Base>>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop) -> Vec<Vec<Tensor<Base>>> {
    let mut iterates = vec![theta.to_vec()];
    for _ in 0..inner.steps {
        let phi = iterates.last().expect("at least θ");
        let (_, g) = value_and_grad(support, phi);
        iterates.push(inner_step(phi, &g, inner));
    }
    iterates
}

/// φ_r alone, keeping no iterate before it.
pub fn adapted<Base: BaseBackend, S: Objective<Base>>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop) -> Vec<Tensor<Base>> {
    let mut phi = theta.to_vec();
    for _ in 0..inner.steps {
        let (_, g) = value_and_grad(support, &phi);
        phi = inner_step(&phi, &g, inner);
    }
    phi
}

/// The meta-loss θ ↦ L_q(φ_r(θ)), evaluated without any graph.
pub fn meta_loss<Base: BaseBackend, S: Objective<Base>, Q: Objective<Base>>(support: &S, query: &Q, theta: &[Tensor<Base>], inner: &InnerLoop) -> f64 {
    query.eval(&adapted(support, theta, inner)).item()
}

/// The proximal objective L_s(φ) + (λ/2)‖φ − θ‖², θ a constant.
pub struct Proximal<'a, Base: BaseBackend, S> {
    pub support: &'a S,
    pub theta: &'a [Tensor<Base>],
    pub lambda: f64,
}

impl<Base: BaseBackend, S: Objective<Base>> Objective<Base> for Proximal<'_, Base, S> {
    fn eval<B: Level<Base = Base>>(&self, phi: &[Tensor<B>]) -> Tensor<B> {
        let distance = phi
            .iter()
            .zip(self.theta)
            .map(|(p, t)| p.sub(&Tensor::from_base(t)).square().sum())
            .reduce(|a, b| a.add(&b))
            .expect("at least one parameter");
        self.support.eval(phi).add(&distance.mul_scalar(self.lambda / 2.0))
    }

    fn tasks(&self) -> usize {
        self.support.tasks()
    }
}

/// The approximate proximal solution: r gradient steps on
/// L_s(φ) + (λ/2)‖φ − θ‖² from θ.
pub fn proximal_adapt<Base: BaseBackend, S: Objective<Base>>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64) -> Vec<Tensor<Base>> {
    let objective = Proximal { support, theta, lambda };
    adapted(&objective, theta, inner)
}

/// How a mode adapts to a task's support set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Adaptation {
    /// r gradient steps on the support loss (MAML and its estimators).
    Plain,
    /// r gradient steps on the proximal objective with this λ (iMAML's paper).
    Proximal(f64),
    /// r plain steps, then one step of size α on the proximal term alone,
    /// φ ← φ − αλ(φ − θ) (iMAML's reference code).
    PullBack(f64),
}

/// The fast weights by `how`.
pub fn adapt_to<Base: BaseBackend, S: Objective<Base>>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop, how: Adaptation) -> Vec<Tensor<Base>> {
    match how {
        Adaptation::Plain => adapted(support, theta, inner),
        Adaptation::Proximal(lambda) => proximal_adapt(support, theta, inner, lambda),
        Adaptation::PullBack(lambda) => pulled_back(&adapted(support, theta, inner), theta, inner, lambda),
    }
}

/// φ − αλ(φ − θ): one gradient step of size α on (λ/2)‖φ − θ‖² (held
/// parameters sit at θ, so they stay there).
pub fn pulled_back<B: Level>(phi: &[Tensor<B>], theta: &[Tensor<B>], inner: &InnerLoop, lambda: f64) -> Vec<Tensor<B>> {
    let displacement: Vec<Tensor<B>> = phi.iter().zip(theta).map(|(p, t)| p.sub(t)).collect();
    axpy(phi, -inner.lr * lambda, &displacement)
}

/// `proximal_adapt` with each inner step on `size` random examples of each
/// task (stochastic implicit differentiation's inner solve).
pub fn proximal_adapt_sampled<Base: BaseBackend, S: Objective<Base> + TaskSubsets>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, size: usize, rngs: &mut [ChaCha8Rng]) -> Vec<Tensor<Base>> {
    let mut phi = theta.to_vec();
    for _ in 0..inner.steps {
        let sampled = support.subsample(size, rngs);
        let (_, g) = value_and_grad(&Proximal { support: &sampled, theta, lambda }, &phi);
        phi = inner_step(&phi, &g, inner);
    }
    phi
}
