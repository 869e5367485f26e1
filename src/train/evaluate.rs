//! Few-shot evaluation: adapt to held-out episodes' support sets and measure
//! their query sets, as mean accuracy ± 95 % confidence interval.

use std::sync::Arc;

use anyhow::{Result, bail};
use burn::backend::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::autodiff::backend::OnBackend;
use crate::autodiff::tensor::{BaseBackend, Precision};
use crate::data::fixed_episodes::FixedEpisode;
use crate::data::{BackgroundSampler, EpisodeSampler, EpisodeShape, Split};
use crate::hypergrad::inner::InnerLoop;
use crate::learner::MetaLearner;
use crate::models::{Conv4, FunctionalModel};
use crate::train::checkpoint::Checkpoint;
use crate::train::metrics::{Summary, divergence};

pub(crate) fn progress_bar(total: u64, position: u64, show: bool, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_position(position);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar
}

pub(crate) fn eval_bar(total: u64, show: bool) -> ProgressBar {
    progress_bar(total, 0, show, "eval {pos}/{len} {bar:30} {per_sec} ETA {eta}")
}

/// Adapt to each of `episodes` episodes drawn from `split` with `seed` and
/// measure the query set.
pub fn evaluate<M: FunctionalModel, B: BaseBackend>(
    learner: &MetaLearner<M, B>,
    split: Arc<Split>,
    shape: EpisodeShape,
    episodes: usize,
    seed: u64,
    inner: &InnerLoop,
    bar: &ProgressBar,
) -> Result<Summary> {
    let mut sampler = BackgroundSampler::start(EpisodeSampler::new(split, shape, seed)?, 16);
    let (mut accuracies, mut losses) = (Vec::with_capacity(episodes), Vec::with_capacity(episodes));
    for _ in 0..episodes {
        let (loss, accuracy) = learner.evaluate(&sampler.next_episode().task(), inner);
        losses.push(loss);
        accuracies.push(accuracy.expect("episodes are classification tasks"));
        bar.inc(1);
    }
    Ok(Summary::of(&accuracies, &losses))
}

/// Few-shot accuracy of a checkpoint on held-out episodes: sampled from a
/// split, or the fixed episodes given.
pub struct EvalJob {
    pub checkpoint: Checkpoint,
    pub split: String,
    pub episodes: usize,
    /// Evaluate these instead of sampling `episodes` from `split`.
    pub fixed: Option<Vec<FixedEpisode>>,
    /// Test-time inner steps; the config's eval.inner_steps when absent.
    pub inner_steps: Option<usize>,
    pub seed: u64,
    pub progress: bool,
}

/// One fixed episode's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpisodeScore {
    pub name: String,
    pub way: usize,
    pub queries: usize,
    pub accuracy: f64,
    pub loss: f64,
}

/// An evaluation: the summary over episodes, and each fixed episode's result.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOutcome {
    pub summary: Summary,
    pub per_episode: Vec<EpisodeScore>,
}

impl OnBackend for EvalJob {
    type Output = Result<EvalOutcome>;
    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Result<EvalOutcome> {
        let config = &self.checkpoint.config;
        let learner = checkpoint_learner::<B>(&self.checkpoint, precision, &device)?;
        let mut inner = config.eval_inner();
        if let Some(steps) = self.inner_steps {
            inner.steps = steps;
        }
        learner.mode.validate(&inner)?;
        let (summary, per_episode) = match &self.fixed {
            Some(fixed) => evaluate_fixed(&learner, fixed, &inner, self.progress)?,
            None => {
                let split = Arc::new(config.dataset().load_split(&self.split)?);
                let bar = eval_bar(self.episodes as u64, self.progress);
                let summary = evaluate(&learner, split, config.episode_shape(), self.episodes, self.seed, &inner, &bar)?;
                bar.finish_and_clear();
                (summary, vec![])
            }
        };
        // Relative to a chance-level classifier's loss, ln(way): no first loss is at hand here.
        if let Some(why) = divergence(summary.loss, config.divergence_threshold((config.data.way as f64).ln())) {
            bail!(
                "the checkpoint's parameters have diverged: over {} episodes {why} (accuracy {:.2} %); evaluate an earlier step folder of the run instead",
                summary.episodes,
                100.0 * summary.accuracy
            );
        }
        Ok(EvalOutcome { summary, per_episode })
    }
}

/// A checkpoint's parameters and mode as a learner (no optimizer state).
fn checkpoint_learner<B: BaseBackend>(checkpoint: &Checkpoint, precision: Precision, device: &Device<B>) -> Result<MetaLearner<Conv4, B>> {
    let config = &checkpoint.config;
    let model = config.model()?;
    let params = crate::models::Params::from_host(&model, &checkpoint.params, "the checkpoint's parameters", precision, device)?;
    MetaLearner::new(model, params, config.mode()?, config.inner(), config.train.meta_lr)
}

fn evaluate_fixed<B: BaseBackend>(learner: &MetaLearner<Conv4, B>, fixed: &[FixedEpisode], inner: &InnerLoop, progress: bool) -> Result<(Summary, Vec<EpisodeScore>)> {
    let way = learner.model.way;
    if let Some(f) = fixed.iter().find(|f| f.episode.way != way) {
        bail!("episode {} has {} classes, but the checkpoint is a {way}-way learner; evaluate it with a {}-way checkpoint", f.name, f.episode.way, f.episode.way);
    }
    let bar = eval_bar(fixed.len() as u64, progress);
    let mut per_episode = Vec::new();
    for f in fixed {
        let (loss, accuracy) = learner.evaluate(&f.episode.task(), inner);
        let accuracy = accuracy.expect("episodes are classification tasks");
        per_episode.push(EpisodeScore { name: f.name.clone(), way: f.episode.way, queries: f.episode.query.labels.len(), accuracy, loss });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summary = Summary::of(&per_episode.iter().map(|e| e.accuracy).collect::<Vec<_>>(), &per_episode.iter().map(|e| e.loss).collect::<Vec<_>>());
    Ok((summary, per_episode))
}
