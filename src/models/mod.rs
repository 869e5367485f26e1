//! Models meta-learned by metagrad: anything that computes outputs from an
//! explicit list of named parameters, at any autodiff level.
//!
//! A model never owns its weights. The inner loop makes fast weights by
//! arithmetic on the parameter tensors and calls `forward` with them, so the
//! same definition serves the plain forward pass, the recorded one whose
//! gradient is differentiated again, and T tasks' networks side by side.

pub mod conv4;
pub mod mlp;
pub mod params;

use std::collections::BTreeMap;

use burn::backend::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use anyhow::{Result, bail};

use crate::autodiff::tensor::{Level, Precision, Tensor};
use crate::data::{Examples, Task};

pub use conv4::Conv4;
pub use mlp::Mlp;
pub use params::Params;

/// A model as a function of its parameters.
///
/// Implement `parameter_shapes`, `example_dims`, `outputs` and `forward`;
/// every hypergradient mode, the `MetaLearner` and the trainer then work with
/// it. `forward` receives the parameters of `tasks` networks stacked along
/// each parameter's first dimension and the inputs laid out by
/// `stack_inputs`; with `tasks = 1` they are the plain parameters and inputs.
pub trait FunctionalModel: Sync {
    /// A short description for messages, e.g. "a Conv-4 with 64 channels".
    fn describe(&self) -> String;

    /// Names (PyTorch's, for models that mirror a PyTorch module) and shapes
    /// of every parameter, in the order `forward` takes them.
    fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)>;

    /// The dimensions of one input example, e.g. [1, 28, 28].
    fn example_dims(&self) -> Vec<usize>;

    /// The width of one output row (classes, or regression targets).
    fn outputs(&self) -> usize;

    /// Outputs [T·n, outputs] of T networks, task by task: task t's rows are
    /// t·n..(t+1)·n.
    fn forward<B: Level>(&self, params: &[Tensor<B>], inputs: &Tensor<B>, tasks: usize) -> Tensor<B>;

    /// T tasks' inputs, n examples each, as one host array and its
    /// dimensions. The default lays them out task-major, [T, n, example...];
    /// a model whose forward keeps tasks apart differently overrides it.
    fn stack_inputs(&self, tasks: &[&[f32]], n: usize) -> (Vec<f64>, Vec<usize>) {
        let values = tasks.iter().flat_map(|t| t.iter().map(|&v| f64::from(v))).collect();
        let dims = [vec![tasks.len(), n], self.example_dims()].concat();
        (values, dims)
    }

    /// One task's inputs as a tensor for `forward` with `tasks = 1`.
    fn inputs<B: Level>(&self, examples: &Examples, precision: Precision, device: &Device<B>) -> Tensor<B> {
        let (values, dims) = self.stack_inputs(&[&examples.inputs], examples.len());
        Tensor::from_f64(&values, &dims, precision, device)
    }

    /// Fresh parameters: weights of rank ≥ 2 Xavier-uniform (gain 1, as in the
    /// MAML reference code), batch-norm scales (`bn*.weight`) one, the rest zero.
    fn init<B: Level>(&self, seed: u64, precision: Precision, device: &Device<B>) -> Params<B> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shapes = self.parameter_shapes();
        let tensors = shapes
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f64> = if name.ends_with("weight") && shape.len() > 1 {
                    let receptive: usize = shape[2..].iter().product();
                    let bound = (6.0 / ((shape[1] + shape[0]) * receptive) as f64).sqrt();
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                } else if name.starts_with("bn") && name.ends_with("weight") {
                    vec![1.0; n]
                } else {
                    vec![0.0; n]
                };
                Tensor::from_f64(&values, shape, precision, device)
            })
            .collect();
        Params::new(shapes.into_iter().map(|(n, _)| n).collect(), tensors)
    }

    /// How many of the last parameter tensors form the head that head-only
    /// adaptation adapts (ANIL): the final linear layer's weight and bias.
    fn head_parameters(&self) -> usize {
        2
    }

    /// For a model that is a trunk followed by a linear head (the last two
    /// parameters, weight [K, F] and bias [K] per task): the trunk's features
    /// [T, n, F] from the other parameters, such that `forward` is `head`
    /// of them. Head-only adaptation then runs the trunk once per task
    /// instead of in every inner step and Hessian-vector product. None (the
    /// default): head-only adaptation runs through the whole model.
    fn trunk_features<B: Level>(&self, trunk: &[Tensor<B>], inputs: &Tensor<B>, tasks: usize) -> Option<Tensor<B>> {
        let _ = (trunk, inputs, tasks);
        None
    }

    /// The linear head on features [T, n, F]: outputs [T·n, K], task by task.
    fn head<B: Level>(&self, features: &Tensor<B>, weight: &Tensor<B>, bias: &Tensor<B>, tasks: usize) -> Tensor<B> {
        stacked_linear(features, weight, bias, tasks)
    }

    /// Key-value pairs written into saved parameter files, describing the model.
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn parameter_count(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// y = x·Wᵀ + b for x [N, F], W [K, F], b [K], from matmul and add (Burn's
/// fused linear cannot be differentiated twice).
pub fn linear<B: Level>(x: &Tensor<B>, weight: &Tensor<B>, bias: &Tensor<B>) -> Tensor<B> {
    let k = weight.dims()[0];
    x.matmul(&weight.transpose()).add(&bias.reshape(&[1, k]))
}

/// T linear layers at once: x [T, n, F], W stacked [T·K, F], b stacked [T·K]
/// give [T·n, K], task by task.
pub fn stacked_linear<B: Level>(x: &Tensor<B>, weight: &Tensor<B>, bias: &Tensor<B>, tasks: usize) -> Tensor<B> {
    let [k, f] = [weight.dims()[0] / tasks, weight.dims()[1]];
    let n = x.dims()[1];
    let w = weight.reshape(&[tasks, k, f]).transpose();
    x.matmul(&w).add(&bias.reshape(&[tasks, 1, k])).reshape(&[tasks * n, k])
}

/// Check a task fits a model: example shapes and the number of classes or
/// target values. `source` names where the task came from.
pub fn check_task_fits(model: &impl FunctionalModel, task: &Task, source: &str) -> Result<()> {
    let expected = model.example_dims();
    for (name, part) in [("support_x", &task.support), ("query_x", &task.query)] {
        if part.example_dims() != expected {
            bail!("{source}: {name} holds examples of shape {:?}, but the parameters are for {expected:?} inputs", part.example_dims());
        }
    }
    let width = task.support.targets.width();
    if width != model.outputs() {
        bail!(
            "{source}: the task is {width}-way but the parameters are {}-way ({}); use parameters made with --way {width}",
            model.outputs(),
            model.describe()
        );
    }
    Ok(())
}
