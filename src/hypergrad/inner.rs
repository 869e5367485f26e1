//! The inner loop: gradient steps on the support loss, plain or proximal.

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autodiff::diff::{Objective, value_and_grad};
use crate::autodiff::tensor::{BaseBackend, Level, Tensor};
use crate::hypergrad::task::TaskSubsets;

/// The inner loop: number of gradient steps on the support set, and their size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InnerLoop {
    pub steps: usize,
    pub lr: f64,
}

/// θ − α·g, tensor by tensor.
pub fn sgd_step<B: Level>(params: &[Tensor<B>], grads: &[Tensor<B>], lr: f64) -> Vec<Tensor<B>> {
    axpy(params, -lr, grads)
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
        iterates.push(sgd_step(phi, &g, inner.lr));
    }
    iterates
}

/// φ_r alone, keeping no iterate before it.
pub fn adapted<Base: BaseBackend, S: Objective<Base>>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop) -> Vec<Tensor<Base>> {
    let mut phi = theta.to_vec();
    for _ in 0..inner.steps {
        let (_, g) = value_and_grad(support, &phi);
        phi = sgd_step(&phi, &g, inner.lr);
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

/// `proximal_adapt` with each inner step on `size` random examples of each
/// task (stochastic implicit differentiation's inner solve).
pub fn proximal_adapt_sampled<Base: BaseBackend, S: Objective<Base> + TaskSubsets>(support: &S, theta: &[Tensor<Base>], inner: &InnerLoop, lambda: f64, size: usize, rngs: &mut [ChaCha8Rng]) -> Vec<Tensor<Base>> {
    let mut phi = theta.to_vec();
    for _ in 0..inner.steps {
        let sampled = support.subsample(size, rngs);
        let (_, g) = value_and_grad(&Proximal { support: &sampled, theta, lambda }, &phi);
        phi = sgd_step(&phi, &g, inner.lr);
    }
    phi
}
