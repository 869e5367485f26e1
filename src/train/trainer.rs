//! The training loop: meta-batches of tasks from the background sampler,
//! hypergradients from the selected mode averaged over the meta-batch, Adam
//! (Burn's optimizer) on the initialisation, validation, checkpoints, a
//! JSON-lines metrics log and a progress bar; and few-shot evaluation with
//! confidence intervals.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::tensor::Device;
use burn::optim::{Adam, AdamConfig, AdamState, AdaptiveMomentumState, Optimizer};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autodiff::backend::OnBackend;
use crate::batched::{batched_hypergradient, task_by_task_hypergradient};
use crate::data::episode::Episode;
use crate::train::checkpoint::{self, Checkpoint, FORMAT, RngState, RunLock, TrainState, prune, set_pointer, step_name};
use crate::train::config::Config;
use crate::data::{BackgroundSampler, EpisodeSampler, EpisodeShape, Split};
use crate::autodiff::diff::{Objective, norm_all};
use crate::hypergrad::{InnerLoop, Mode, adapt, adapted_accuracy, proximal_adapt};
use crate::models::conv4::{BatchLoss, Conv4};
use crate::data::store::{HostTensor, check_params, params_to_host};
use crate::autodiff::tensor::{Level, Precision, Tensor};

/// One line of the metrics log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Meta-iterations completed when this was measured.
    pub step: usize,
    /// train (the meta-batch's query loss and accuracy after adaptation) or val.
    pub split: String,
    pub loss: f64,
    pub accuracy: f64,
    /// val: half-width of the 95% confidence interval of the accuracy.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ci95: Option<f64>,
    /// ufo: the mean exact-branch probability and the fraction of tasks that took it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub q: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exact_fraction: Option<f64>,
    /// Wall-clock seconds of training so far (differs between runs, unlike the rest).
    pub elapsed_s: f64,
}

/// Accuracy over episodes as mean ± 1.96·σ/√n (σ the standard deviation over episodes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub episodes: usize,
    pub accuracy: f64,
    pub ci95: f64,
    pub loss: f64,
}

impl Summary {
    pub fn of(accuracies: &[f64], losses: &[f64]) -> Summary {
        let n = accuracies.len().max(1) as f64;
        let mean = accuracies.iter().sum::<f64>() / n;
        let var = accuracies.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
        Summary { episodes: accuracies.len(), accuracy: mean, ci95: 1.96 * var.sqrt() / n.sqrt(), loss: losses.iter().sum::<f64>() / n }
    }
}

/// Adapt to each of `episodes` episodes drawn with `seed` and measure the query set.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Level<Base = B>>(
    model: &Conv4,
    theta: &[Tensor<B>],
    split: Arc<Split>,
    shape: EpisodeShape,
    episodes: usize,
    seed: u64,
    inner: &InnerLoop,
    mode: &Mode,
    precision: Precision,
    device: &Device<B>,
    bar: &ProgressBar,
) -> Result<Summary> {
    let mut sampler = BackgroundSampler::start(EpisodeSampler::new(split, shape, seed)?, 16);
    let (mut accuracies, mut losses) = (Vec::with_capacity(episodes), Vec::with_capacity(episodes));
    for _ in 0..episodes {
        let task = sampler.next_episode().to_task::<B>(precision, device);
        let (loss, accuracy) = adapt_and_measure(model, theta, &task, inner, mode);
        losses.push(loss);
        accuracies.push(accuracy);
        bar.inc(1);
    }
    Ok(Summary::of(&accuracies, &losses))
}

/// Adapt to a task's support set from `theta` and measure the query set:
/// (query loss, query accuracy).
fn adapt_and_measure<B: Level<Base = B>>(model: &Conv4, theta: &[Tensor<B>], task: &crate::hypergrad::Task<B>, inner: &InnerLoop, mode: &Mode) -> (f64, f64) {
    let support = BatchLoss { model, batch: &task.support };
    // iMAML's learner at test time solves the same proximal problem it was trained with.
    let adapted = match mode {
        Mode::Implicit { lambda, .. } => proximal_adapt(&support, theta, inner, *lambda),
        _ => adapt(&support, theta, inner).pop().expect("φ_r"),
    };
    (BatchLoss { model, batch: &task.query }.eval(&adapted).item(), adapted_accuracy(model, &adapted, &task.query))
}

/// Burn's Adam over the meta-parameters, one state per parameter (flattened:
/// Adam is elementwise, so rank 1 serves every parameter shape).
struct MetaAdam<B: Level> {
    adam: Adam,
    lr: f64,
    states: Vec<Option<AdamState<1>>>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Level<Base = B>> MetaAdam<B> {
    fn new(lr: f64, count: usize) -> Self {
        // ε as PyTorch's default; Burn's default (1e-5) damps small gradients.
        MetaAdam { adam: AdamConfig::new().with_epsilon(1e-8).build(), lr, states: vec![None; count], _backend: Default::default() }
    }

    fn to_burn(t: &Tensor<B>) -> burn::tensor::Tensor<1> {
        B::base_to_burn(t.reshape(&[t.dims().iter().product()]).0)
    }

    fn step(&mut self, params: &[Tensor<B>], grads: &[Tensor<B>]) -> Vec<Tensor<B>> {
        params
            .iter()
            .zip(grads)
            .zip(self.states.iter_mut())
            .map(|((p, g), state)| {
                let (updated, next) = self.adam.step(self.lr, Self::to_burn(p), Self::to_burn(g), state.take());
                *state = next;
                Tensor(B::base_from_burn(updated)).reshape(&p.dims())
            })
            .collect()
    }

    fn time(&self) -> usize {
        self.states.first().and_then(|s| s.as_ref()).map_or(0, |s| s.momentum.time)
    }

    /// Moments as named host tensors: moment_1.<param>, moment_2.<param>.
    fn to_host(&self, model: &Conv4) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for ((name, shape), state) in model.parameter_shapes().iter().zip(&self.states) {
            if let Some(s) = state {
                for (which, m) in [("moment_1", &s.momentum.moment_1), ("moment_2", &s.momentum.moment_2)] {
                    let t = Tensor::<B>(B::base_from_burn(m.clone())).reshape(shape);
                    out.insert(format!("{which}.{name}"), HostTensor::from_tensor(&t));
                }
            }
        }
        out
    }

    fn restore(&mut self, model: &Conv4, host: &BTreeMap<String, HostTensor>, time: usize, precision: Precision, device: &Device<B>) -> Result<()> {
        if time == 0 {
            return Ok(());
        }
        for ((name, shape), state) in model.parameter_shapes().iter().zip(self.states.iter_mut()) {
            let moment = |which: &str| -> Result<burn::tensor::Tensor<1>> {
                let t = host.get(&format!("{which}.{name}")).with_context(|| format!("the optimizer state has no {which}.{name}"))?;
                if &t.shape != shape {
                    bail!("the optimizer state's {which}.{name} has shape {:?}, the parameter {shape:?}", t.shape);
                }
                Ok(Self::to_burn(&t.to_tensor::<B>(precision, device)))
            };
            *state = Some(AdamState::new(AdaptiveMomentumState::new(time, moment("moment_1")?, moment("moment_2")?)));
        }
        Ok(())
    }
}

/// What a training run ended with.
#[derive(Debug)]
pub struct Outcome {
    pub run_dir: PathBuf,
    pub step: usize,
    pub interrupted: bool,
    pub latest: Option<PathBuf>,
    pub best: Option<(usize, f64)>,
    /// Where each meta-iteration of this process spent its time.
    pub timings: Vec<StepTiming>,
}

/// Seconds of one meta-iteration: waiting for episodes, hypergradients
/// (every task's forward, backward and Hessian-vector products), the Adam
/// step, and the rest (logging, validation, checkpoints).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StepTiming {
    pub data_s: f64,
    pub hypergradient_s: f64,
    pub optimizer_s: f64,
    pub other_s: f64,
    /// Thread time inside the hypergradients by phase (zero unless
    /// `profile` is on).
    pub phases: crate::autodiff::profile::PhaseTimes,
}

pub struct TrainJob {
    pub config: Config,
    pub resume: Option<Checkpoint>,
    pub progress: bool,
    /// Set (by Ctrl-C) to stop after the current meta-iteration with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Train on these splits instead of loading the config's dataset (benchmarks).
    pub splits: Option<(Arc<Split>, Option<Arc<Split>>)>,
    /// Run each meta-batch as one stacked network (`Config::task_batching`).
    pub task_batching: bool,
}

impl OnBackend for TrainJob {
    type Output = Result<Outcome>;
    fn run<B: Level<Base = B>>(self, device: Device<B>, precision: Precision) -> Result<Outcome> {
        train::<B>(self, device, precision)
    }
}

fn progress_bar(total: u64, position: u64, show: bool, template: &str) -> ProgressBar {
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

/// Seeds of the independent random streams, derived from the run seed.
fn stream_seed(seed: u64, stream: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(stream)
}

/// Why a query loss means the run has diverged, if it does.
fn divergence(loss: f64, threshold: f64) -> Option<String> {
    if !loss.is_finite() {
        Some(format!("the query loss is {loss}"))
    } else if loss > threshold {
        Some(format!("the query loss {loss:.4e} is above the divergence threshold {threshold:.4e} (set by train.divergence_factor)"))
    } else {
        None
    }
}

/// Refuse a meta-batch whose episodes alone would not fit in memory, before
/// trying to allocate it. A lower bound: the episodes of one meta-batch
/// and the prefetch queue as f32, and with stacked tasks the first conv
/// layer's output for the whole meta-batch.
fn check_memory(config: &Config, model: &Conv4, task_batching: bool) -> Result<()> {
    let (c, h, w) = (model.in_channels, model.image_size, model.image_size);
    let images = (config.data.way * (config.data.shot + config.data.queries)) as f64;
    let per_task = images * (c * h * w) as f64 * 4.0;
    let activations = if task_batching { images * (model.channels * h * w) as f64 * 4.0 * 3.0 } else { 0.0 };
    let needed = config.train.meta_batch as f64 * (per_task + activations) + config.data.prefetch as f64 * per_task;
    let Some(available) = available_memory_bytes() else { return Ok(()) };
    if needed > available {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        bail!(
            "train.meta_batch = {} needs at least {:.1} GiB of memory ({} images of {c}×{h}×{w} per task{}), and this machine has {:.1} GiB available; lower train.meta_batch (the papers use 32 for Omniglot 5-way, 16 for 20-way, 4 for Mini-ImageNet)",
            config.train.meta_batch,
            gib(needed),
            images,
            if task_batching { ", stacked" } else { "" },
            gib(available)
        );
    }
    Ok(())
}

/// MemAvailable from /proc/meminfo, where there is one.
fn available_memory_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
}

/// The query loss after adapting to each episode from `theta`, averaged:
/// the check that parameters about to be saved have not diverged.
fn adapted_query_loss<B: Level<Base = B>>(model: &Conv4, theta: &[Tensor<B>], episodes: &[Episode], inner: &InnerLoop, mode: &Mode, precision: Precision, device: &Device<B>) -> f64 {
    let losses: Vec<f64> = episodes.iter().map(|e| adapt_and_measure(model, theta, &e.to_task::<B>(precision, device), inner, mode).0).collect();
    losses.iter().sum::<f64>() / losses.len().max(1) as f64
}

fn train<B: Level<Base = B>>(job: TrainJob, device: Device<B>, precision: Precision) -> Result<Outcome> {
    let TrainJob { config, resume, progress, stop, splits, task_batching } = job;
    let model = config.model()?;
    let run_dir = config.run_dir();
    // Nothing below writes into the run folder unless this process owns it.
    let _lock = RunLock::acquire(&run_dir)?;
    check_memory(&config, &model, task_batching)?;
    let (train_split, val_split) = match splits {
        Some(given) => given,
        None => {
            let spec = config.dataset();
            let val = if config.eval.every > 0 { Some(Arc::new(spec.load_split(&config.eval.split)?)) } else { None };
            (Arc::new(spec.load_split("train")?), val)
        }
    };
    let shape = config.episode_shape();
    if let Some(val) = &val_split {
        val.check_request(&shape)?;
    }
    let seed = config.run.seed;
    let inner = config.inner();

    let mut adam = MetaAdam::<B>::new(config.train.meta_lr, model.parameter_shapes().len());
    let mut sampler = EpisodeSampler::new(train_split, shape, stream_seed(seed, 1))?;
    let (mut theta, mut mode, mut ufo_rng, mut metrics, start_step, mut best, elapsed_before) = match &resume {
        Some(c) => {
            check_params(&model, &c.params, "the checkpoint's parameters")?;
            adam.restore(&model, &c.optimizer, c.state.adam_time, precision, &device)?;
            sampler.set_rng(c.state.episode_rng.restore()?);
            let theta: Vec<Tensor<B>> = model.parameter_shapes().iter().map(|(n, _)| c.params[n].to_tensor(precision, &device)).collect();
            let best = c.state.best_step.zip(c.state.best_val_accuracy);
            (theta, c.state.mode.clone(), c.state.ufo_rng.restore()?, c.metrics.clone(), c.state.step, best, c.state.elapsed_s)
        }
        None => {
            let theta = model.init::<B>(seed, precision, &device);
            (theta, config.mode()?, ChaCha8Rng::seed_from_u64(stream_seed(seed, 2)), String::new(), 0, None, 0.0)
        }
    };
    // The divergence threshold is relative to the run's first meta-iteration loss.
    let mut threshold = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Metrics>(l).ok())
        .find(|m| m.split == "train")
        .map(|m| config.divergence_threshold(m.loss));
    // Resuming from an older step: point `latest` back at it, so the step
    // folders about to be rewritten are never what `latest` names.
    if let Some(c) = &resume
        && run_dir.join(step_name(c.state.step)).join("state.json").is_file()
    {
        set_pointer(&run_dir, "latest", &step_name(c.state.step))?;
    }
    // The log restarts from what the checkpoint holds, so a resumed run's log equals an uninterrupted one's.
    crate::data::store::write_atomic(&run_dir.join("metrics.jsonl"), metrics.as_bytes())?;
    crate::data::store::write_atomic(&run_dir.join("config.toml"), config.to_toml().as_bytes())?;
    let mut log = OpenOptions::new().append(true).open(run_dir.join("metrics.jsonl"))?;
    let mut sampler = BackgroundSampler::start(sampler, config.data.prefetch);
    let mut episode_rng = resume.as_ref().map(|c| c.state.episode_rng.clone());

    let total = config.train.meta_steps;
    let bar = progress_bar(total as u64, start_step as u64, progress, "{pos}/{len} {bar:30} {msg} {per_sec} ETA {eta}");
    let clock = Instant::now();
    let mut timings = Vec::new();
    let mut latest = checkpoint::latest_of(&run_dir);
    let mut step = start_step;
    let mut interrupted = false;
    // The step of the last checkpoint taken, written or pending.
    let mut saved_at = start_step;
    // A checkpoint is taken at its step but written only once its
    // parameters have shown a sane loss (the next meta-iteration's, a
    // validation's, or a check at the end), so the last written checkpoint
    // is never a diverged one.
    let mut pending: Option<(Checkpoint, bool)> = None;
    let mut last_episodes: Vec<Episode> = Vec::new();

    let snapshot = |step: usize, theta: &[Tensor<B>], adam: &MetaAdam<B>, mode: &Mode, ufo_rng: &ChaCha8Rng, episode_rng: &RngState, metrics: &str, best: Option<(usize, f64)>| Checkpoint {
        config: config.clone(),
        state: TrainState {
            format: FORMAT,
            step,
            episode_rng: episode_rng.clone(),
            ufo_rng: RngState::of(ufo_rng),
            mode: mode.clone(),
            adam_time: adam.time(),
            best_step: best.map(|b| b.0),
            best_val_accuracy: best.map(|b| b.1),
            elapsed_s: elapsed_before + clock.elapsed().as_secs_f64(),
        },
        params: params_to_host(&model, theta).into_iter().collect(),
        optimizer: adam.to_host(&model),
        metrics: metrics.to_string(),
    };
    let commit = |(checkpoint, improved): (Checkpoint, bool)| -> Result<PathBuf> {
        let dir = checkpoint.write(&run_dir)?;
        if improved {
            set_pointer(&run_dir, "best", &step_name(checkpoint.state.step))?;
        }
        let best_dir = checkpoint.state.best_step.map(|s| run_dir.join(step_name(s)));
        prune(&run_dir, config.checkpoint.keep_last, &best_dir.into_iter().chain([dir.clone()]).collect::<Vec<_>>())?;
        Ok(dir)
    };
    let diverged = |step: usize, why: String, latest: &Option<PathBuf>| -> anyhow::Error {
        let keep = latest.as_ref().map_or("no checkpoint was written yet".to_string(), |p| format!("the last good checkpoint {} is kept", p.display()));
        anyhow::anyhow!("training diverged at step {step}: {why}; {keep}. Lower train.meta_lr or train.inner_lr, or set train.grad_clip, and resume from it")
    };

    while step < total {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let warmup = step < config.train.first_order_warmup;
        let mut fo = Mode::Fomaml;
        let active = if warmup { &mut fo } else { &mut mode };
        let step_start = Instant::now();
        let episodes: Vec<Episode> = (0..config.train.meta_batch).map(|_| sampler.next_episode()).collect();
        let data_s = step_start.elapsed().as_secs_f64();
        let refs: Vec<&Episode> = episodes.iter().collect();
        let meta_batch = if task_batching { batched_hypergradient } else { task_by_task_hypergradient };
        let phases_before = crate::autodiff::profile::totals();
        let r = meta_batch(active, &model, &refs, &theta, &inner, precision, &device, &mut ufo_rng);
        let phases = crate::autodiff::profile::totals().since(&phases_before);
        let t = config.train.meta_batch as f64;
        let mut grad = r.grad;
        let (loss, accuracy) = (r.query_losses.iter().sum::<f64>() / t, r.query_accuracies.iter().sum::<f64>() / t);
        let norm = norm_all(&grad);
        let threshold_now = *threshold.get_or_insert_with(|| config.divergence_threshold(loss));
        let why = divergence(loss, threshold_now).or_else(|| (!norm.is_finite()).then(|| format!("the meta-gradient norm is {norm}")));
        if let Some(why) = why {
            bar.abandon();
            return Err(diverged(step + 1, why, &latest));
        }
        // The loss just measured is at θ_step: the pending checkpoint of that step is sound.
        if let Some(p) = pending.take() {
            latest = Some(commit(p)?);
        }
        if config.train.grad_clip > 0.0 && norm > config.train.grad_clip {
            grad = grad.iter().map(|g| g.mul_scalar(config.train.grad_clip / norm)).collect();
        }
        let hypergradient_s = step_start.elapsed().as_secs_f64() - data_s;
        theta = adam.step(&theta, &grad);
        // Reading one value waits for the device, so the step is timed, not just queued.
        let _ = theta[0].sum().item();
        let optimizer_s = step_start.elapsed().as_secs_f64() - data_s - hypergradient_s;
        step += 1;
        episode_rng = sampler.rng_after_last().map(RngState::of);
        let is_ufo = matches!(active, Mode::Ufo(_));
        let line = Metrics {
            step,
            split: "train".into(),
            loss,
            accuracy,
            ci95: None,
            q: r.q,
            exact_fraction: is_ufo.then(|| r.exact.iter().filter(|&&e| e).count() as f64 / t),
            elapsed_s: elapsed_before + clock.elapsed().as_secs_f64(),
        };
        let mut lines = vec![line];
        let mut improved = false;
        let mut validated = false;
        if let Some(val) = &val_split
            && step % config.eval.every == 0
        {
            let s = evaluate(&model, &theta, val.clone(), shape, config.eval.episodes, stream_seed(seed, 3), &config.eval_inner(), &mode, precision, &device, &ProgressBar::hidden())?;
            if let Some(why) = divergence(s.loss, threshold_now) {
                bar.abandon();
                return Err(diverged(step, format!("at validation, {why}"), &latest));
            }
            validated = true;
            improved = best.is_none_or(|(_, a)| s.accuracy > a);
            if improved {
                best = Some((step, s.accuracy));
            }
            lines.push(Metrics { step, split: "val".into(), loss: s.loss, accuracy: s.accuracy, ci95: Some(s.ci95), q: None, exact_fraction: None, elapsed_s: elapsed_before + clock.elapsed().as_secs_f64() });
        }
        for l in &lines {
            let json = serde_json::to_string(l)? + "\n";
            log.write_all(json.as_bytes())?;
            metrics.push_str(&json);
        }
        log.flush()?;
        bar.set_message(format!("loss {loss:.3} acc {accuracy:.3}{}", best.map_or(String::new(), |(_, a)| format!(" best val {a:.3}"))));
        bar.inc(1);
        let every = config.checkpoint.every;
        if improved || (every > 0 && step % every == 0) || step == total {
            let rng = episode_rng.clone().expect("an episode was drawn");
            let taken = (snapshot(step, &theta, &adam, &mode, &ufo_rng, &rng, &metrics, best), improved);
            // A validation has just measured θ_step itself.
            if validated { latest = Some(commit(taken)?) } else { pending = Some(taken) }
            saved_at = step;
        }
        last_episodes = episodes;
        let total_s = step_start.elapsed().as_secs_f64();
        timings.push(StepTiming { data_s, hypergradient_s, optimizer_s, other_s: total_s - data_s - hypergradient_s - optimizer_s, phases });
    }
    if interrupted && saved_at != step {
        let rng = episode_rng.clone().expect("an episode was drawn");
        pending = Some((snapshot(step, &theta, &adam, &mode, &ufo_rng, &rng, &metrics, best), false));
    }
    // The last parameters have no next meta-iteration to vouch for them:
    // measure them on the last meta-batch before they are written.
    if let Some(p) = pending.take() {
        let loss = adapted_query_loss(&model, &theta, &last_episodes, &inner, &mode, precision, &device);
        if let Some(why) = divergence(loss, threshold.unwrap_or(f64::INFINITY)) {
            bar.abandon();
            return Err(diverged(step, format!("after the last update, {why}"), &latest));
        }
        latest = Some(commit(p)?);
    }
    bar.finish_and_clear();
    Ok(Outcome { run_dir, step, interrupted, latest, best, timings })
}

/// Few-shot accuracy of a checkpoint on held-out episodes: sampled from a
/// split, or the fixed episodes given.
pub struct EvalJob {
    pub checkpoint: Checkpoint,
    pub split: String,
    pub episodes: usize,
    /// Evaluate these instead of sampling `episodes` from `split`.
    pub fixed: Option<Vec<crate::data::fixed_episodes::FixedEpisode>>,
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
    fn run<B: Level<Base = B>>(self, device: Device<B>, precision: Precision) -> Result<EvalOutcome> {
        let config = &self.checkpoint.config;
        let model = config.model()?;
        check_params(&model, &self.checkpoint.params, "the checkpoint's parameters")?;
        let theta: Vec<Tensor<B>> =
            model.parameter_shapes().iter().map(|(n, _)| self.checkpoint.params[n].to_tensor(precision, &device)).collect();
        let mut inner = config.eval_inner();
        if let Some(steps) = self.inner_steps {
            inner.steps = steps;
        }
        let mode = config.mode()?;
        mode.validate(&inner)?;
        let mut per_episode = Vec::new();
        let summary = match &self.fixed {
            Some(fixed) => {
                if let Some(f) = fixed.iter().find(|f| f.episode.way != model.way) {
                    bail!("episode {} has {} classes, but the checkpoint is a {}-way learner; evaluate it with a {}-way checkpoint", f.name, f.episode.way, model.way, f.episode.way);
                }
                let bar = eval_bar(fixed.len() as u64, self.progress);
                for f in fixed {
                    let (loss, accuracy) = adapt_and_measure(&model, &theta, &f.episode.to_task::<B>(precision, &device), &inner, &mode);
                    per_episode.push(EpisodeScore { name: f.name.clone(), way: f.episode.way, queries: f.episode.query.labels.len(), accuracy, loss });
                    bar.inc(1);
                }
                bar.finish_and_clear();
                Summary::of(&per_episode.iter().map(|e| e.accuracy).collect::<Vec<_>>(), &per_episode.iter().map(|e| e.loss).collect::<Vec<_>>())
            }
            None => {
                let split = Arc::new(config.dataset().load_split(&self.split)?);
                let bar = eval_bar(self.episodes as u64, self.progress);
                let summary = evaluate(&model, &theta, split, config.episode_shape(), self.episodes, self.seed, &inner, &mode, precision, &device, &bar)?;
                bar.finish_and_clear();
                summary
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

/// Read a metrics log (JSON lines), naming the line that does not parse.
pub fn read_metrics(path: &std::path::Path) -> Result<Vec<Metrics>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the metrics log {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}: not a metrics record", path.display(), i + 1)))
        .collect()
}
