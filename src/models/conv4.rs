//! The Conv-4 few-shot learner of the MAML papers, written on the tensor
//! layer so one definition runs at every autodiff level.
//!
//! Four blocks of [3×3 conv (padding 1, bias) → batch norm → ReLU → 2×2
//! max-pool], then flatten and a linear head; or, as the MAML paper's
//! Omniglot network, four blocks of [3×3 conv with stride 2 (padding 1,
//! bias) → batch norm → ReLU], then the mean over the last feature map and
//! a linear head ([`Downsample`]). Batch norm always uses the
//! current batch's statistics (biased variance, ε = 1e-5) and keeps no running
//! statistics: the transductive setting of the MAML papers. Parameter names
//! and layouts are PyTorch's, so weights load into PyTorch unchanged.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::autodiff::tensor::{Level, Tensor};
use crate::data::store::HostTensor;
use crate::models::params::check_params;
use crate::models::{FunctionalModel, linear, stacked_linear};

pub const BATCH_NORM_EPS: f64 = 1e-5;
const BLOCKS: usize = 4;

/// How each block halves the image. Both networks have the same parameter
/// names and, on Omniglot's 28×28 images, the same shapes (64 features).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Downsample {
    /// A stride-1 convolution, then a 2×2 max-pool (stride 2, floor); the
    /// last feature map is flattened (64 features on Omniglot, 800 on
    /// Mini-ImageNet). The Conv-4 of most MAML reproductions and of the
    /// MAML paper's Mini-ImageNet network.
    #[default]
    MaxPool,
    /// A stride-2 convolution (28 → 14 → 7 → 4 → 2 on Omniglot) and no
    /// pooling; the last feature map is averaged over its positions, so the
    /// head sees one feature per channel. The MAML paper's Omniglot network
    /// (its reference code's default, as learn2learn's OmniglotCNN).
    Stride,
}

impl Downsample {
    pub fn name(self) -> &'static str {
        match self {
            Downsample::MaxPool => "max-pool",
            Downsample::Stride => "stride",
        }
    }

    pub const NAMES: &'static str = "max-pool or stride";

    /// A block's output size for an input of `size` pixels.
    fn block_output(self, size: usize) -> usize {
        match self {
            Downsample::MaxPool => size / 2,
            Downsample::Stride => (size - 1) / 2 + 1,
        }
    }
}

impl std::str::FromStr for Downsample {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "max-pool" => Ok(Downsample::MaxPool),
            "stride" => Ok(Downsample::Stride),
            other => Err(format!("unknown downsample '{other}': expected {}", Downsample::NAMES)),
        }
    }
}

/// The shape of a Conv-4 network: input image, width, number of classes,
/// and how its blocks downsample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv4 {
    pub in_channels: usize,
    pub image_size: usize,
    pub channels: usize,
    pub way: usize,
    pub downsample: Downsample,
}

impl Conv4 {
    /// 1×28×28 input, 64 channels, 64 features, max-pooling.
    pub fn omniglot(way: usize) -> Self {
        Conv4 { in_channels: 1, image_size: 28, channels: 64, way, downsample: Downsample::MaxPool }
    }

    /// 3×84×84 input, 32 channels, 800 features, max-pooling.
    pub fn mini_imagenet(way: usize) -> Self {
        Conv4 { in_channels: 3, image_size: 84, channels: 32, way, downsample: Downsample::MaxPool }
    }

    /// The same network with its blocks downsampling by `downsample`.
    pub fn with_downsample(self, downsample: Downsample) -> Self {
        Conv4 { downsample, ..self }
    }

    /// The Conv-4 for a dataset's images: `omniglot` and `synthetic` (1×28×28,
    /// 64 channels) or `mini-imagenet` and `synthetic-rgb` (3×84×84, 32 channels).
    pub fn for_dataset(dataset: &str, way: usize) -> anyhow::Result<Self> {
        if way < 2 {
            anyhow::bail!("way = {way}: a few-shot task needs at least 2 classes");
        }
        match dataset {
            "omniglot" | "synthetic" => Ok(Conv4::omniglot(way)),
            "mini-imagenet" | "synthetic-rgb" => Ok(Conv4::mini_imagenet(way)),
            other => anyhow::bail!("unknown dataset '{other}': expected omniglot, mini-imagenet, synthetic or synthetic-rgb"),
        }
    }

    /// Spatial size of the last feature map (after four 2×2 pools, floor at
    /// each, or four stride-2 convolutions).
    pub fn final_size(&self) -> usize {
        (0..BLOCKS).fold(self.image_size, |s, _| self.downsample.block_output(s))
    }

    /// The head's input width: the flattened last feature map, or with
    /// strided blocks its mean per channel.
    pub fn features(&self) -> usize {
        match self.downsample {
            Downsample::MaxPool => self.channels * self.final_size() * self.final_size(),
            Downsample::Stride => self.channels,
        }
    }

    /// The Conv-4 with `downsample` blocks that named host tensors describe,
    /// for images of `image_size`: width and input channels from
    /// `conv1.weight`, classes from `head.weight`.
    pub fn infer(tensors: &BTreeMap<String, HostTensor>, image_size: usize, downsample: Downsample, source: &str) -> Result<Self> {
        let shape = |name: &str| {
            tensors
                .get(name)
                .map(|t| t.shape.clone())
                .with_context(|| format!("{source}: parameter '{name}' is missing; this is not a Conv-4 parameter file"))
        };
        let (conv1, head) = (shape("conv1.weight")?, shape("head.weight")?);
        if conv1.len() != 4 || head.len() != 2 {
            bail!("{source}: conv1.weight {conv1:?} or head.weight {head:?} is not a Conv-4 layout");
        }
        let model = Conv4 { in_channels: conv1[1], image_size, channels: conv1[0], way: head[0], downsample };
        check_params(&model, tensors, source)?;
        Ok(model)
    }

    /// The four conv blocks of `tasks` networks side by side (groups = tasks),
    /// from the trunk's parameters, after checking the input and their count.
    fn trunk<B: Level>(&self, params: &[Tensor<B>], x: &Tensor<B>, tasks: usize) -> Tensor<B> {
        let expected = [tasks * self.in_channels, self.image_size, self.image_size];
        let dims = x.dims();
        assert!(
            dims.len() == 4 && dims[1..] == expected,
            "Conv-4 forward: images of shape {dims:?} do not match the input [N, {}, {}, {}] of {tasks} network(s)",
            expected[0],
            expected[1],
            expected[2]
        );
        assert_eq!(params.len(), 4 * BLOCKS, "Conv-4 trunk: {} parameter tensors, expected {}", params.len(), 4 * BLOCKS);
        let mut h = x.clone();
        for block in params.chunks(4) {
            let [w, b, gamma, beta] = block else { unreachable!() };
            h = match self.downsample {
                Downsample::MaxPool => h.conv2d(w, b, 1, 1, tasks).batch_norm(gamma, beta, BATCH_NORM_EPS).relu().max_pool2x2(),
                Downsample::Stride => h.conv2d(w, b, 2, 1, tasks).batch_norm(gamma, beta, BATCH_NORM_EPS).relu(),
            };
        }
        h
    }
}

impl FunctionalModel for Conv4 {
    fn describe(&self) -> String {
        let blocks = match self.downsample {
            Downsample::MaxPool => "",
            Downsample::Stride => ", strided convolutions",
        };
        format!(
            "a Conv-4 with {} input channel(s), {}×{} images, {} channels{blocks} and {} classes",
            self.in_channels, self.image_size, self.image_size, self.channels, self.way
        )
    }

    fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Vec::new();
        let mut c_in = self.in_channels;
        for block in 1..=BLOCKS {
            let c = self.channels;
            shapes.push((format!("conv{block}.weight"), vec![c, c_in, 3, 3]));
            shapes.push((format!("conv{block}.bias"), vec![c]));
            shapes.push((format!("bn{block}.weight"), vec![c]));
            shapes.push((format!("bn{block}.bias"), vec![c]));
            c_in = c;
        }
        shapes.push(("head.weight".into(), vec![self.way, self.features()]));
        shapes.push(("head.bias".into(), vec![self.way]));
        shapes
    }


    fn example_dims(&self) -> Vec<usize> {
        vec![self.in_channels, self.image_size, self.image_size]
    }

    fn outputs(&self) -> usize {
        self.way
    }

    /// Logits [T·n, way]. Each parameter holds the T tasks' values stacked
    /// along its first dimension; the inputs [n, T·C, H, W] hold the tasks'
    /// n images side by side along channels. Convolutions with groups = T
    /// keep the tasks apart, batch norm's per-channel statistics are then per
    /// task, and the heads are one batched matmul.
    fn forward<B: Level>(&self, params: &[Tensor<B>], inputs: &Tensor<B>, tasks: usize) -> Tensor<B> {
        assert_eq!(params.len(), 4 * BLOCKS + 2, "Conv-4 forward: {} parameter tensors, expected {}", params.len(), 4 * BLOCKS + 2);
        let features = self.trunk_features(&params[..4 * BLOCKS], inputs, tasks).expect("a Conv-4 is a trunk and a linear head");
        self.head(&features, &params[4 * BLOCKS], &params[4 * BLOCKS + 1], tasks)
    }

    /// The flattened output of the conv blocks, [T, n, features].
    fn trunk_features<B: Level>(&self, trunk: &[Tensor<B>], inputs: &Tensor<B>, tasks: usize) -> Option<Tensor<B>> {
        let h = self.trunk(trunk, inputs, tasks);
        let n = inputs.dims()[0];
        let h = match self.downsample {
            Downsample::MaxPool => h,
            Downsample::Stride => {
                let positions = self.final_size() * self.final_size();
                h.reshape(&[n, tasks * self.channels, positions]).mean_dim(2)
            }
        };
        Some(h.reshape(&[n, tasks, self.features()]).swap_dims(0, 1))
    }

    /// One task's head as a plain matmul, T tasks' as a batched one.
    fn head<B: Level>(&self, features: &Tensor<B>, weight: &Tensor<B>, bias: &Tensor<B>, tasks: usize) -> Tensor<B> {
        if tasks == 1 {
            let [_, n, f] = features.dims()[..] else { unreachable!("features are [T, n, F]") };
            return linear(&features.reshape(&[n, f]), weight, bias);
        }
        stacked_linear(features, weight, bias, tasks)
    }

    /// Image i of task t goes to channels t·C..(t+1)·C of row i.
    fn stack_inputs(&self, tasks: &[&[f32]], n: usize) -> (Vec<f64>, Vec<usize>) {
        let t_count = tasks.len();
        let image = self.in_channels * self.image_size * self.image_size;
        let mut values = vec![0.0f64; n * t_count * image];
        for (t, task) in tasks.iter().enumerate() {
            for i in 0..n {
                let dst = (i * t_count + t) * image;
                for (v, &x) in values[dst..dst + image].iter_mut().zip(&task[i * image..(i + 1) * image]) {
                    *v = f64::from(x);
                }
            }
        }
        (values, vec![n, t_count * self.in_channels, self.image_size, self.image_size])
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("architecture".to_string(), "conv4".to_string()),
            ("in_channels".to_string(), self.in_channels.to_string()),
            ("image_size".to_string(), self.image_size.to_string()),
            ("channels".to_string(), self.channels.to_string()),
            ("way".to_string(), self.way.to_string()),
            ("downsample".to_string(), self.downsample.name().to_string()),
        ])
    }
}
