//! A multi-layer perceptron with ReLU between its linear layers: the
//! regression network of MAML's sinusoid experiment (1 → 40 → 40 → 1), and
//! a second `FunctionalModel` to show a new model needs nothing else.

use std::collections::BTreeMap;

use crate::autodiff::tensor::{Level, Tensor};
use crate::models::{FunctionalModel, stacked_linear};

/// Layer widths from input to output, e.g. [1, 40, 40, 1]. Parameters are
/// named like PyTorch's `nn.Sequential` of `Linear` and `ReLU` modules:
/// `layers.0.weight`, `layers.0.bias`, `layers.2.weight`, …
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mlp {
    pub widths: Vec<usize>,
}

impl Mlp {
    pub fn new(widths: &[usize]) -> Self {
        assert!(widths.len() >= 2 && widths.iter().all(|&w| w > 0), "an MLP needs at least an input and an output width, all > 0: {widths:?}");
        Mlp { widths: widths.to_vec() }
    }

    /// The sinusoid regressor of Finn et al. 2017 §5.1: 1 → 40 → 40 → 1.
    pub fn sinusoid() -> Self {
        Mlp::new(&[1, 40, 40, 1])
    }

    fn layers(&self) -> usize {
        self.widths.len() - 1
    }
}

impl FunctionalModel for Mlp {
    fn describe(&self) -> String {
        format!("an MLP with widths {:?}", self.widths)
    }

    fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        (0..self.layers())
            .flat_map(|l| {
                let (fan_in, fan_out) = (self.widths[l], self.widths[l + 1]);
                // Sequential numbering counts the ReLU modules between the linears.
                [(format!("layers.{}.weight", 2 * l), vec![fan_out, fan_in]), (format!("layers.{}.bias", 2 * l), vec![fan_out])]
            })
            .collect()
    }

    fn example_dims(&self) -> Vec<usize> {
        vec![self.widths[0]]
    }

    fn outputs(&self) -> usize {
        self.widths[self.layers()]
    }

    /// Inputs [T, n, in] (the default task-major layout) to outputs [T·n, out].
    fn forward<B: Level>(&self, params: &[Tensor<B>], inputs: &Tensor<B>, tasks: usize) -> Tensor<B> {
        assert_eq!(params.len(), 2 * self.layers(), "MLP forward: {} parameter tensors, expected {}", params.len(), 2 * self.layers());
        let (trunk, head) = params.split_at(params.len() - 2);
        let features = self.trunk_features(trunk, inputs, tasks).expect("an MLP is a trunk and a linear head");
        self.head(&features, &head[0], &head[1], tasks)
    }

    /// The last hidden layer's activations [T, n, width] (the inputs
    /// themselves for a single linear layer).
    fn trunk_features<B: Level>(&self, trunk: &[Tensor<B>], inputs: &Tensor<B>, tasks: usize) -> Option<Tensor<B>> {
        let dims = inputs.dims();
        assert!(
            dims.len() == 3 && dims[0] == tasks && dims[2] == self.widths[0],
            "MLP forward: inputs of shape {dims:?} do not match [{tasks}, n, {}]",
            self.widths[0]
        );
        assert_eq!(trunk.len(), 2 * (self.layers() - 1), "MLP trunk: {} parameter tensors, expected {}", trunk.len(), 2 * (self.layers() - 1));
        let n = dims[1];
        let mut h = inputs.clone();
        for (l, pair) in trunk.chunks(2).enumerate() {
            h = stacked_linear(&h, &pair[0], &pair[1], tasks).relu().reshape(&[tasks, n, self.widths[l + 1]]);
        }
        Some(h)
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let widths = self.widths.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        BTreeMap::from([("architecture".to_string(), "mlp".to_string()), ("widths".to_string(), widths)])
    }
}
