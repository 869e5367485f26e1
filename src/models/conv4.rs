//! The Conv-4 few-shot learner of the MAML papers, written on the tensor
//! layer so one definition runs at every autodiff level.
//!
//! Four blocks of [3×3 conv (padding 1, bias) → batch norm → ReLU → 2×2
//! max-pool], then flatten and a linear head. Batch norm always uses the
//! current batch's statistics (biased variance, ε = 1e-5) and keeps no running
//! statistics: the transductive setting of the MAML papers. Parameter names
//! and layouts are PyTorch's, so weights load into PyTorch unchanged.

use std::sync::Mutex;

use burn::backend::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::autodiff::diff::Objective;
use crate::autodiff::tensor::{Level, Precision, Tensor, one_hot};

pub const BATCH_NORM_EPS: f64 = 1e-5;
const BLOCKS: usize = 4;

/// The shape of a Conv-4 network: input image, width, and number of classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv4 {
    pub in_channels: usize,
    pub image_size: usize,
    pub channels: usize,
    pub way: usize,
}

impl Conv4 {
    /// 1×28×28 input, 64 channels, 64 features.
    pub fn omniglot(way: usize) -> Self {
        Conv4 { in_channels: 1, image_size: 28, channels: 64, way }
    }

    /// 3×84×84 input, 32 channels, 800 features.
    pub fn mini_imagenet(way: usize) -> Self {
        Conv4 { in_channels: 3, image_size: 84, channels: 32, way }
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

    /// Spatial size after the four 2×2 pools (floor at each).
    pub fn final_size(&self) -> usize {
        (0..BLOCKS).fold(self.image_size, |s, _| s / 2)
    }

    pub fn features(&self) -> usize {
        self.channels * self.final_size() * self.final_size()
    }

    /// Names and shapes of every parameter, in the order the model uses them.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
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

    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Fresh parameters: convolution and head weights Xavier-uniform (gain 1,
    /// as in the MAML reference code), biases zero, batch-norm scale one.
    pub fn init<B: Level>(&self, seed: u64, precision: Precision, device: &Device<B>) -> Vec<Tensor<B>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.parameter_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f64> = if name.ends_with("weight") && shape.len() > 1 {
                    let receptive: usize = shape[2..].iter().product();
                    let fan_in = shape[1] * receptive;
                    let fan_out = shape[0] * receptive;
                    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                } else if name.starts_with("bn") && name.ends_with("weight") {
                    vec![1.0; n]
                } else {
                    vec![0.0; n]
                };
                Tensor::from_f64(&values, &shape, precision, device)
            })
            .collect()
    }

    /// Logits [N, way] for images [N, C, H, W].
    pub fn forward<B: Level>(&self, params: &[Tensor<B>], x: &Tensor<B>) -> Tensor<B> {
        let h = self.trunk(params, x, 1);
        let features = h.reshape(&[x.dims()[0], self.features()]);
        linear(&features, &params[4 * BLOCKS], &params[4 * BLOCKS + 1])
    }

    /// The four conv blocks of `tasks` networks side by side (groups = tasks),
    /// after checking the input and the parameter count.
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
        assert_eq!(params.len(), 4 * BLOCKS + 2, "Conv-4 forward: {} parameter tensors, expected {}", params.len(), 4 * BLOCKS + 2);
        let mut h = x.clone();
        for block in params[..4 * BLOCKS].chunks(4) {
            let [w, b, gamma, beta] = block else { unreachable!() };
            h = h.conv2d(w, b, 1, tasks).batch_norm(gamma, beta, BATCH_NORM_EPS).relu().max_pool2x2();
        }
        h
    }
}

impl Conv4 {
    /// Logits [T·n, way] of T Conv-4s at once. Each parameter holds the T
    /// tasks' values stacked along its first dimension; `x` [n, T·C, H, W]
    /// holds the tasks' n images side by side along channels. Convolutions
    /// with groups = T keep the tasks apart, batch norm's per-channel
    /// statistics are then per task, and the heads are one batched matmul.
    pub fn forward_stacked<B: Level>(&self, params: &[Tensor<B>], x: &Tensor<B>, tasks: usize) -> Tensor<B> {
        let h = self.trunk(params, x, tasks);
        let n = x.dims()[0];
        let features = h.reshape(&[n, tasks, self.features()]).swap_dims(0, 1);
        let weight = params[4 * BLOCKS].reshape(&[tasks, self.way, self.features()]).transpose();
        let bias = params[4 * BLOCKS + 1].reshape(&[tasks, 1, self.way]);
        features.matmul(&weight).add(&bias).reshape(&[tasks * n, self.way])
    }
}

/// y = x·Wᵀ + b for x [N, F], W [K, F], b [K], from matmul and add (Burn's
/// fused linear cannot be differentiated twice).
pub fn linear<B: Level>(x: &Tensor<B>, weight: &Tensor<B>, bias: &Tensor<B>) -> Tensor<B> {
    let k = weight.dims()[0];
    x.matmul(&weight.transpose()).add(&bias.reshape(&[1, k]))
}

/// A labelled batch of images on the base backend.
pub struct Batch<Base: Level> {
    pub images: Tensor<Base>,
    pub one_hot: Tensor<Base>,
    pub labels: Vec<usize>,
}

impl<Base: Level> Batch<Base> {
    pub fn new(images: Tensor<Base>, labels: Vec<usize>, classes: usize) -> Self {
        assert_eq!(images.dims()[0], labels.len(), "batch: {} images but {} labels", images.dims()[0], labels.len());
        let targets = one_hot(&labels, classes);
        let one_hot = Tensor::from_f64(&targets, &[labels.len(), classes], images.precision(), &images.device());
        Batch { images, one_hot, labels }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Mean cross-entropy of a Conv-4 on one batch, as a function of its parameters.
pub struct BatchLoss<'a, Base: Level> {
    pub model: &'a Conv4,
    pub batch: &'a Batch<Base>,
}

impl<Base: Level<Base = Base>> Objective<Base> for BatchLoss<'_, Base> {
    fn eval<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Tensor<B> {
        self.logits_and_loss(params).1
    }
}

impl<Base: Level<Base = Base>> ClassifierLoss<Base> for BatchLoss<'_, Base> {
    fn logits_and_loss<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> (Tensor<B>, Tensor<B>) {
        let logits = self.model.forward(params, &Tensor::from_base(&self.batch.images));
        let loss = logits.cross_entropy(&Tensor::from_base(&self.batch.one_hot));
        (logits, loss)
    }
}

/// A loss computed from logits, which it can hand over too.
pub trait ClassifierLoss<Base> {
    fn logits_and_loss<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> (Tensor<B>, Tensor<B>);
}

/// A classifier loss that keeps the logits of its latest evaluation (values
/// only, no graph). Every mode evaluates the query loss last at the adapted
/// parameters, so the query accuracy then needs no extra forward pass.
pub struct KeepLogits<Base: Level, L> {
    pub loss: L,
    latest: Mutex<Option<Tensor<Base>>>,
}

impl<Base: Level, L> KeepLogits<Base, L> {
    pub fn new(loss: L) -> Self {
        KeepLogits { loss, latest: Mutex::new(None) }
    }

    /// The logits of the latest evaluation.
    pub fn latest(&self) -> Option<Tensor<Base>> {
        self.latest.lock().expect("logits lock").clone()
    }
}

impl<Base: Level<Base = Base>, L: ClassifierLoss<Base>> Objective<Base> for KeepLogits<Base, L> {
    fn eval<B: Level<Base = Base>>(&self, params: &[Tensor<B>]) -> Tensor<B> {
        let (logits, loss) = self.loss.logits_and_loss(params);
        *self.latest.lock().expect("logits lock") = Some(logits.to_base());
        loss
    }
}

/// Fraction of rows whose largest logit is at the label.
pub fn accuracy<B: Level>(logits: &Tensor<B>, labels: &[usize]) -> f64 {
    accuracy_of_rows(&logits.to_vec(), logits.dims()[1], labels)
}

/// `accuracy` on host logits: row-major rows of `classes` values, one per label.
pub fn accuracy_of_rows(values: &[f64], classes: usize, labels: &[usize]) -> f64 {
    let correct = labels
        .iter()
        .enumerate()
        .filter(|&(row, &label)| {
            let r = &values[row * classes..(row + 1) * classes];
            let best = (0..classes).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap_or(0);
            best == label
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}
