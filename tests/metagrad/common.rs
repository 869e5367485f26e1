//! Shared helpers: f64 CPU backend, random data, finite differences, temporary folders.

use burn::backend::{Flex, FlexDevice};
use metagrad::autodiff::diff::{Objective, value_and_grad};
use metagrad::autodiff::tensor::{Precision, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type Cpu = Flex;
pub const DEV: FlexDevice = FlexDevice;
pub const F64: Precision = Precision::F64;

/// A fresh, empty folder for one test, unique to this test process.
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("metagrad-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn random_values(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

pub fn random_tensor(rng: &mut ChaCha8Rng, dims: &[usize], scale: f64) -> Tensor<Cpu> {
    Tensor::from_f64(&random_values(rng, dims.iter().product(), scale), dims, F64, &DEV)
}

/// Random tensors shaped like `like`, scaled to unit norm over the whole list.
pub fn random_unit_direction(rng: &mut ChaCha8Rng, like: &[Tensor<Cpu>]) -> Vec<Tensor<Cpu>> {
    let raw: Vec<Vec<f64>> = like.iter().map(|t| random_values(rng, t.num_elements(), 1.0)).collect();
    let norm = raw.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    raw.iter()
        .zip(like)
        .map(|(v, t)| Tensor::from_f64(&v.iter().map(|x| x / norm).collect::<Vec<_>>(), &t.dims(), F64, &DEV))
        .collect()
}

/// x + h·d, tensor by tensor.
pub fn axpy(x: &[Tensor<Cpu>], h: f64, d: &[Tensor<Cpu>]) -> Vec<Tensor<Cpu>> {
    x.iter().zip(d).map(|(a, b)| a.add(&b.mul_scalar(h))).collect()
}

pub fn flatten(ts: &[Tensor<Cpu>]) -> Vec<f64> {
    ts.iter().flat_map(|t| t.to_vec()).collect()
}

pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖a − b‖ / ‖b‖, one number over all parameters together (a true gradient
/// of exactly zero in one tensor must not make the comparison meaningless).
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b).max(1e-300)
}

/// Step for central differences in f64: small enough not to cross the
/// ReLU and max-pool kinks, large enough to stay above rounding.
pub const FD_STEP: f64 = 1e-6;

/// Central difference of f along a direction.
pub fn fd_directional(f: &dyn Fn(&[Tensor<Cpu>]) -> f64, x: &[Tensor<Cpu>], d: &[Tensor<Cpu>]) -> f64 {
    (f(&axpy(x, FD_STEP, d)) - f(&axpy(x, -FD_STEP, d))) / (2.0 * FD_STEP)
}

/// Central difference of the gradient along a direction: ≈ H·d.
pub fn fd_hvp<F: Objective<Cpu>>(f: &F, x: &[Tensor<Cpu>], d: &[Tensor<Cpu>]) -> Vec<f64> {
    let (_, gp) = value_and_grad(f, &axpy(x, FD_STEP, d));
    let (_, gm) = value_and_grad(f, &axpy(x, -FD_STEP, d));
    flatten(&gp).iter().zip(flatten(&gm)).map(|(p, m)| (p - m) / (2.0 * FD_STEP)).collect()
}

/// Random episodes for a Conv-4 on 2×16×16 images with 3 classes: 6
/// support and 9 query images each, labels cycling through the classes.
pub fn random_episodes(tasks: usize, seed: u64) -> Vec<metagrad::data::episode::Episode> {
    use metagrad::data::episode::{Episode, LabelledImages};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut part = |n: usize| LabelledImages {
        images: (0..n * 2 * 16 * 16).map(|_| rng.random::<f32>()).collect(),
        shape: [n, 2, 16, 16],
        labels: (0..n).map(|i| i % 3).collect(),
    };
    (0..tasks).map(|_| Episode { way: 3, support: part(6), query: part(9) }).collect()
}

/// The mean of random estimates (one flattened vector each) lies within 4
/// standard errors of `expected`, the standard error from the sample
/// variance, which must not be zero.
pub fn assert_mean_within_4_standard_errors(draws: &[Vec<f64>], expected: &[f64], what: &str) {
    let n = draws.len() as f64;
    let mean: Vec<f64> = (0..expected.len()).map(|i| draws.iter().map(|d| d[i]).sum::<f64>() / n).collect();
    let variance: f64 = draws.iter().map(|d| d.iter().zip(&mean).map(|(a, m)| (a - m).powi(2)).sum::<f64>()).sum::<f64>() / (n - 1.0);
    let standard_error = (variance / n).sqrt();
    let error = norm(&mean.iter().zip(expected).map(|(a, b)| a - b).collect::<Vec<_>>());
    assert!(variance > 0.0, "{what}: the random draws made no difference");
    assert!(error <= 4.0 * standard_error, "{what}: ‖mean − expected‖ = {error:.3e} exceeds 4 standard errors ({standard_error:.3e})");
}

/// A task's support and query losses, f64 on the CPU.
pub fn task_losses<'a, M: metagrad::models::FunctionalModel>(model: &'a M, task: &'a metagrad::data::Task) -> (metagrad::hypergrad::TaskLoss<'a, M, Cpu>, metagrad::hypergrad::TaskLoss<'a, M, Cpu>) {
    use metagrad::hypergrad::TaskLoss;
    (TaskLoss::single(model, &task.support, F64, &DEV), TaskLoss::single(model, &task.query, F64, &DEV))
}

/// Head-only adaptation (ANIL): the inner loop adapts the last layer only.
pub fn head_only(steps: usize, lr: f64) -> metagrad::hypergrad::InnerLoop {
    metagrad::hypergrad::InnerLoop { steps, lr, adapted: metagrad::hypergrad::Adapted::Last(2) }
}

/// Sinusoid regression tasks (Finn et al. 2017 §5.1), `shots` support and
/// 7 query points each.
pub fn sinusoid_tasks(tasks: usize, shots: usize, seed: u64) -> Vec<metagrad::data::Task> {
    let mut stream = metagrad::data::sinusoid::SinusoidTasks::new(seed);
    (0..tasks).map(|_| stream.next_task(shots, 7).1).collect()
}
