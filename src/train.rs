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

use crate::backend::OnBackend;
use crate::batched::{batched_hypergradient, task_by_task_hypergradient};
use crate::episode::Episode;
use crate::checkpoint::{Checkpoint, FORMAT, RngState, TrainState, pointer, prune, set_pointer, step_name};
use crate::config::Config;
use crate::data::{BackgroundSampler, EpisodeSampler, EpisodeShape, Split};
use crate::diff::{Objective, norm_all};
use crate::hypergrad::{InnerLoop, Mode, adapt, adapted_accuracy, proximal_adapt};
use crate::model::{BatchLoss, Conv4};
use crate::store::{HostTensor, check_params, params_to_host};
use crate::tensor::{Level, Precision, Tensor};

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
        let support = BatchLoss { model, batch: &task.support };
        // iMAML's learner at test time solves the same proximal problem it was trained with.
        let adapted = match mode {
            Mode::Implicit { lambda, .. } => proximal_adapt(&support, theta, inner, *lambda),
            _ => adapt(&support, theta, inner).pop().expect("φ_r"),
        };
        losses.push(BatchLoss { model, batch: &task.query }.eval(&adapted).item());
        accuracies.push(adapted_accuracy(model, &adapted, &task.query));
        bar.inc(1);
    }
    Ok(Summary::of(&accuracies, &losses))
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
    pub phases: crate::profile::PhaseTimes,
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

fn train<B: Level<Base = B>>(job: TrainJob, device: Device<B>, precision: Precision) -> Result<Outcome> {
    let TrainJob { config, resume, progress, stop, splits, task_batching } = job;
    let model = config.model()?;
    let run_dir = config.run_dir();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create the run folder {}", run_dir.display()))?;
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
    // Resuming from an older step: point `latest` back at it, so the step
    // folders about to be rewritten are never what `latest` names.
    if let Some(c) = &resume
        && run_dir.join(step_name(c.state.step)).join("state.json").is_file()
    {
        set_pointer(&run_dir, "latest", &step_name(c.state.step))?;
    }
    // The log restarts from what the checkpoint holds, so a resumed run's log equals an uninterrupted one's.
    crate::store::write_atomic(&run_dir.join("metrics.jsonl"), metrics.as_bytes())?;
    crate::store::write_atomic(&run_dir.join("config.toml"), config.to_toml().as_bytes())?;
    let mut log = OpenOptions::new().append(true).open(run_dir.join("metrics.jsonl"))?;
    let mut sampler = BackgroundSampler::start(sampler, config.data.prefetch);
    let mut episode_rng = resume.as_ref().map(|c| c.state.episode_rng.clone());

    let total = config.train.meta_steps;
    let bar = progress_bar(total as u64, start_step as u64, progress, "{pos}/{len} {bar:30} {msg} {per_sec} ETA {eta}");
    let clock = Instant::now();
    let mut timings = Vec::new();
    let mut latest = pointer(&run_dir, "latest");
    let mut step = start_step;
    let mut interrupted = false;
    let mut saved_at = start_step;

    let save = |step: usize,
                theta: &[Tensor<B>],
                adam: &MetaAdam<B>,
                mode: &Mode,
                ufo_rng: &ChaCha8Rng,
                episode_rng: &RngState,
                metrics: &str,
                best: Option<(usize, f64)>|
     -> Result<PathBuf> {
        let checkpoint = Checkpoint {
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
        let dir = checkpoint.write(&run_dir)?;
        let best_dir = best.map(|(s, _)| run_dir.join(step_name(s)));
        prune(&run_dir, config.checkpoint.keep_last, &best_dir.into_iter().chain([dir.clone()]).collect::<Vec<_>>())?;
        Ok(dir)
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
        let phases_before = crate::profile::totals();
        let r = meta_batch(active, &model, &refs, &theta, &inner, precision, &device, &mut ufo_rng);
        let phases = crate::profile::totals().since(&phases_before);
        let t = config.train.meta_batch as f64;
        let mut grad = r.grad;
        let (loss, accuracy) = (r.query_losses.iter().sum::<f64>() / t, r.query_accuracies.iter().sum::<f64>() / t);
        let norm = norm_all(&grad);
        if !loss.is_finite() || !norm.is_finite() {
            bar.abandon();
            let keep = latest.as_ref().map_or("no checkpoint was written yet".to_string(), |p| format!("the last good checkpoint {} is kept", p.display()));
            bail!(
                "training diverged at step {}: the {} is {}; {keep}. Lower train.meta_lr or train.inner_lr, or set train.grad_clip, and resume",
                step + 1,
                if loss.is_finite() { "meta-gradient norm" } else { "query loss" },
                if loss.is_finite() { norm } else { loss }
            );
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
        if let Some(val) = &val_split
            && step % config.eval.every == 0
        {
            let s = evaluate(&model, &theta, val.clone(), shape, config.eval.episodes, stream_seed(seed, 3), &config.eval_inner(), &mode, precision, &device, &ProgressBar::hidden())?;
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
            let dir = save(step, &theta, &adam, &mode, &ufo_rng, &rng, &metrics, best)?;
            if improved {
                set_pointer(&run_dir, "best", &step_name(step))?;
            }
            saved_at = step;
            latest = Some(dir);
        }
        let total_s = step_start.elapsed().as_secs_f64();
        timings.push(StepTiming { data_s, hypergradient_s, optimizer_s, other_s: total_s - data_s - hypergradient_s - optimizer_s, phases });
    }
    if interrupted && saved_at != step {
        let rng = episode_rng.clone().expect("an episode was drawn");
        latest = Some(save(step, &theta, &adam, &mode, &ufo_rng, &rng, &metrics, best)?);
    }
    bar.finish_and_clear();
    Ok(Outcome { run_dir, step, interrupted, latest, best, timings })
}

/// Few-shot accuracy of a checkpoint on held-out episodes.
pub struct EvalJob {
    pub checkpoint: Checkpoint,
    pub split: String,
    pub episodes: usize,
    /// Test-time inner steps; the config's eval.inner_steps when absent.
    pub inner_steps: Option<usize>,
    pub seed: u64,
    pub progress: bool,
}

impl OnBackend for EvalJob {
    type Output = Result<Summary>;
    fn run<B: Level<Base = B>>(self, device: Device<B>, precision: Precision) -> Result<Summary> {
        let config = &self.checkpoint.config;
        let model = config.model()?;
        check_params(&model, &self.checkpoint.params, "the checkpoint's parameters")?;
        let theta: Vec<Tensor<B>> =
            model.parameter_shapes().iter().map(|(n, _)| self.checkpoint.params[n].to_tensor(precision, &device)).collect();
        let split = Arc::new(config.dataset().load_split(&self.split)?);
        let mut inner = config.eval_inner();
        if let Some(steps) = self.inner_steps {
            inner.steps = steps;
        }
        let mode = config.mode()?;
        mode.validate(&inner)?;
        let bar = eval_bar(self.episodes as u64, self.progress);
        let summary = evaluate(&model, &theta, split, config.episode_shape(), self.episodes, self.seed, &inner, &mode, precision, &device, &bar)?;
        bar.finish_and_clear();
        Ok(summary)
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
