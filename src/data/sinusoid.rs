//! The sinusoid regression tasks of Finn et al. 2017 §5.1: y = A·sin(x − φ)
//! with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] per task, and inputs
//! x ~ U[−5, 5] per example.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::task::{Examples, Targets, Task};

/// One sinusoid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sinusoid {
    pub amplitude: f64,
    pub phase: f64,
}

impl Sinusoid {
    pub fn at(&self, x: f64) -> f64 {
        self.amplitude * (x - self.phase).sin()
    }

    /// The examples (x, sin value) at the given inputs: inputs [n, 1], targets [n, 1].
    pub fn examples(&self, xs: &[f64]) -> Examples {
        let inputs = xs.iter().map(|&x| x as f32).collect();
        let values = xs.iter().map(|&x| self.at(x) as f32).collect();
        Examples::new(inputs, vec![xs.len(), 1], Targets::Values { values, width: 1 })
    }
}

/// A seeded stream of sinusoid tasks.
pub struct SinusoidTasks {
    rng: ChaCha8Rng,
}

impl SinusoidTasks {
    pub const AMPLITUDE: (f64, f64) = (0.1, 5.0);
    pub const PHASE: (f64, f64) = (0.0, std::f64::consts::PI);
    pub const INPUT: (f64, f64) = (-5.0, 5.0);

    pub fn new(seed: u64) -> Self {
        SinusoidTasks { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The next sinusoid and a task on it: K support and `query` query points.
    pub fn next_task(&mut self, shot: usize, query: usize) -> (Sinusoid, Task) {
        let sinusoid = Sinusoid {
            amplitude: self.rng.random_range(Self::AMPLITUDE.0..Self::AMPLITUDE.1),
            phase: self.rng.random_range(Self::PHASE.0..Self::PHASE.1),
        };
        let mut points = |n: usize| -> Vec<f64> { (0..n).map(|_| self.rng.random_range(Self::INPUT.0..Self::INPUT.1)).collect() };
        let (support, query) = (points(shot), points(query));
        (sinusoid, Task { support: sinusoid.examples(&support), query: sinusoid.examples(&query) })
    }
}
