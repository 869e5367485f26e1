//! One task's hypergradient from files: Conv-4 parameters and an episode,
//! as `metagrad hypergrad` computes it (and other programs can).

use std::collections::BTreeMap;

use anyhow::Result;
use burn::backend::tensor::Device;
use rand::SeedableRng;

use crate::autodiff::backend::OnBackend;
use crate::autodiff::tensor::{BaseBackend, Precision, Tensor};
use crate::data::episode::Episode;
use crate::data::store::HostTensor;
use crate::hypergrad::inner::InnerLoop;
use crate::hypergrad::meta_batch::task_hypergradient;
use crate::hypergrad::mode::Mode;
use crate::hypergrad::task::{TaskLoss, accuracy};
use crate::hypergrad::ufo::{QRule, ufo_mean};
use crate::models::{Conv4, Params};

/// The hypergradient of `mode` for one episode at given parameters. With a
/// fixed-q ufo, the mean of `samples` independent estimates.
pub struct EpisodeHypergradient {
    pub model: Conv4,
    pub params: BTreeMap<String, HostTensor>,
    pub episode: Episode,
    pub mode: Mode,
    pub inner: InnerLoop,
    pub samples: usize,
    /// Seeds ufo's Bernoulli draws.
    pub seed: u64,
}

/// The result: one tensor per parameter plus `query_loss`, and what the
/// adapted parameters scored.
pub struct EpisodeHypergradientReport {
    pub tensors: Vec<(String, HostTensor)>,
    pub query_loss: f64,
    pub query_accuracy: f64,
    /// Fixed-q ufo: how many of the samples took the exact branch.
    pub exact_draws: Option<usize>,
    /// The implicit modes: what the linear solve met, described.
    pub curvature: Option<String>,
}

impl OnBackend for EpisodeHypergradient {
    type Output = Result<EpisodeHypergradientReport>;
    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Result<EpisodeHypergradientReport> {
        let EpisodeHypergradient { model, params, episode, mut mode, inner, samples, seed } = self;
        let theta = Params::<B>::from_host(&model, &params, "the parameters", precision, &device)?;
        let task = episode.task();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (h, exact_draws) = match mode {
            Mode::Ufo(QRule::Fixed(q)) => {
                let support = TaskLoss::single(&model, &task.support, precision, &device);
                let query = TaskLoss::single(&model, &task.query, precision, &device);
                let (h, exact) = ufo_mean(&support, &query, &theta, &inner, q, samples, &mut rng);
                (h, Some(exact))
            }
            _ => (task_hypergradient(&mut mode, &model, &task, &theta, &inner, &mut rng).0, None),
        };
        let logits = h.query.output.as_ref().expect("a task loss evaluation carries its outputs");
        let query_accuracy = accuracy(logits, &episode.query.labels);
        let query_loss = h.query_loss();
        let curvature = h.curvature.zip(mode.system_lambda()).map(|(c, lambda)| c.describe(lambda));
        let mut tensors = theta.with_tensors(h.grad).to_host();
        tensors.push(("query_loss".to_string(), HostTensor::from_tensor(&Tensor::<B>::from_f64(&[query_loss], &[1], precision, &device))));
        Ok(EpisodeHypergradientReport { tensors, query_loss, query_accuracy, exact_draws, curvature })
    }
}
