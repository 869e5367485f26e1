//! The training loop: meta-batches of tasks from the background sampler, a
//! `MetaLearner` step per meta-iteration, validation, checkpoints that are
//! written only once their parameters have shown a sane loss, a JSON-lines
//! metrics log and a progress bar.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use burn::backend::tensor::Device;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::autodiff::backend::OnBackend;
use crate::autodiff::profile;
use crate::autodiff::tensor::{BaseBackend, Precision};
use crate::data::store::write_atomic;
use crate::data::{BackgroundSampler, EpisodeSampler, EpisodeShape, Split, Task};
use crate::hypergrad::meta_batch::{Batching, TaskScores};
use crate::hypergrad::result::CurvatureWarning;
use crate::learner::{MetaAdam, MetaLearner};
use crate::models::{Conv4, FunctionalModel, Params};
use crate::train::checkpoint::{self, Checkpoint, FORMAT, RngState, RunLock, TrainState, prune, set_pointer, step_name};
use crate::train::config::Config;
use crate::train::evaluate::{evaluate, progress_bar};
use crate::train::metrics::{Metrics, StepTiming, divergence};

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
    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Result<Outcome> {
        let stop = self.stop.clone();
        Trainer::<B>::open(self, device, precision)?.run(&stop)
    }
}

/// Seeds of the independent random streams, derived from the run seed.
fn stream_seed(seed: u64, stream: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(stream)
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

/// A checkpoint taken at its step, and whether it is a new best.
type Pending = (Checkpoint, bool);

/// A training run in progress: the learner and everything a checkpoint
/// records about the run besides it.
pub struct Trainer<B: BaseBackend> {
    config: Config,
    learner: MetaLearner<Conv4, B>,
    run_dir: PathBuf,
    _lock: RunLock,
    sampler: BackgroundSampler,
    val_split: Option<Arc<Split>>,
    shape: EpisodeShape,
    /// The metrics log so far, as written into checkpoints, and its file.
    metrics: String,
    log: File,
    step: usize,
    best: Option<(usize, f64)>,
    /// Relative to the run's first meta-iteration loss.
    threshold: Option<f64>,
    elapsed_before: f64,
    clock: Instant,
    /// The episode RNG after the last meta-batch drawn.
    episode_rng: Option<RngState>,
    latest: Option<PathBuf>,
    /// A checkpoint is taken at its step but written only once its
    /// parameters have shown a sane loss (the next meta-iteration's, a
    /// validation's, or a check at the end), so the last written checkpoint
    /// is never a diverged one.
    pending: Option<Pending>,
    /// The step of the last checkpoint taken, written or pending.
    saved_at: usize,
    last_tasks: Vec<Task>,
    /// The step of the last curvature warning printed.
    last_curvature_warning: Option<usize>,
    bar: ProgressBar,
    timings: Vec<StepTiming>,
}

impl<B: BaseBackend> Trainer<B> {
    /// Take the run folder, load the data, and start fresh or from the checkpoint.
    pub fn open(job: TrainJob, device: Device<B>, precision: Precision) -> Result<Self> {
        let TrainJob { config, resume, progress, splits, task_batching, .. } = job;
        let model = config.model()?;
        let run_dir = config.run_dir();
        // Nothing below writes into the run folder unless this process owns it.
        let lock = RunLock::acquire(&run_dir)?;
        check_memory(&config, &model, task_batching)?;
        let (train_split, val_split) = match splits {
            Some(given) => given,
            None => load_splits(&config)?,
        };
        let shape = config.episode_shape();
        if let Some(val) = &val_split {
            val.check_request(&shape)?;
        }
        let mut sampler = EpisodeSampler::new(train_split, shape, stream_seed(config.run.seed, 1))?;
        let mut learner = MetaLearner::new(model, model.init::<B>(config.run.seed, precision, &device), config.mode()?, config.inner(), config.train.meta_lr)?;
        learner.optimizer = MetaAdam::with_epsilon(config.train.meta_lr, config.train.adam_epsilon, learner.params.len()).with_schedule(config.meta_lr_schedule());
        learner.batching = if task_batching { Batching::Stacked } else { Batching::TaskByTask };
        learner.rng = ChaCha8Rng::seed_from_u64(stream_seed(config.run.seed, 2));
        let (mut metrics, mut step, mut best, mut elapsed_before) = (String::new(), 0, None, 0.0);
        if let Some(c) = &resume {
            restore(&mut learner, c, precision, &device)?;
            sampler.set_rng(c.state.episode_rng.restore()?);
            (metrics, step, best, elapsed_before) = (c.metrics.clone(), c.state.step, c.state.best_step.zip(c.state.best_val_accuracy), c.state.elapsed_s);
            // Resuming from an older step: point `latest` back at it, so the
            // step folders about to be rewritten are never what `latest` names.
            if run_dir.join(step_name(step)).join("state.json").is_file() {
                set_pointer(&run_dir, "latest", &step_name(step))?;
            }
        }
        let threshold = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<Metrics>(l).ok())
            .find(|m| m.split == "train")
            .map(|m| config.divergence_threshold(m.loss));
        // The log restarts from what the checkpoint holds, so a resumed run's log equals an uninterrupted one's.
        write_atomic(&run_dir.join("metrics.jsonl"), metrics.as_bytes())?;
        write_atomic(&run_dir.join("config.toml"), config.to_toml().as_bytes())?;
        let log = OpenOptions::new().append(true).open(run_dir.join("metrics.jsonl"))?;
        let bar = progress_bar(config.train.meta_steps as u64, step as u64, progress, "{pos}/{len} {bar:30} {msg} {per_sec} ETA {eta}");
        Ok(Trainer {
            sampler: BackgroundSampler::start(sampler, config.data.prefetch),
            episode_rng: resume.as_ref().map(|c| c.state.episode_rng.clone()),
            latest: checkpoint::latest_of(&run_dir),
            config,
            learner,
            run_dir,
            _lock: lock,
            val_split,
            shape,
            metrics,
            log,
            saved_at: step,
            step,
            best,
            threshold,
            elapsed_before,
            clock: Instant::now(),
            pending: None,
            last_tasks: Vec::new(),
            last_curvature_warning: None,
            bar,
            timings: Vec::new(),
        })
    }

    /// Train to `train.meta_steps`, or until `stop` is set (then with a
    /// checkpoint of the step reached).
    pub fn run(mut self, stop: &AtomicBool) -> Result<Outcome> {
        let mut interrupted = false;
        while self.step < self.config.train.meta_steps {
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            self.meta_iteration()?;
        }
        if interrupted && self.saved_at != self.step {
            self.pending = Some((self.snapshot(), false));
        }
        self.finish()?;
        self.bar.finish_and_clear();
        Ok(Outcome { run_dir: self.run_dir, step: self.step, interrupted, latest: self.latest, best: self.best, timings: self.timings })
    }

    /// One meta-iteration: a meta-batch, its meta-gradient, the checks, the
    /// Adam step, the log, validation and checkpoints when due.
    fn meta_iteration(&mut self) -> Result<()> {
        let start = Instant::now();
        let tasks: Vec<Task> = (0..self.config.train.meta_batch).map(|_| self.sampler.next_episode().into_task()).collect();
        let refs: Vec<&Task> = tasks.iter().collect();
        let data_s = start.elapsed().as_secs_f64();
        let phases_before = profile::totals();
        let warmup = self.step < self.config.train.first_order_warmup;
        let meta = if warmup { self.learner.first_order_meta_gradient(&refs) } else { self.learner.meta_gradient(&refs) };
        // The one read of the step: losses, accuracies and the gradient norm together.
        let scores = meta.read();
        let phases = profile::totals().since(&phases_before);
        self.check_step(&scores)?;
        // The loss just measured is at θ_step: the pending checkpoint of that step is sound.
        if let Some(p) = self.pending.take() {
            self.latest = Some(self.commit(p)?);
        }
        let mut grad = meta.grad;
        let clip = self.config.train.grad_clip;
        if clip > 0.0 && scores.grad_norm > clip {
            grad = grad.iter().map(|g| g.mul_scalar(clip / scores.grad_norm)).collect();
        }
        let hypergradient_s = start.elapsed().as_secs_f64() - data_s;
        let meta_lr = (!self.learner.optimizer.schedule.is_constant()).then(|| self.learner.optimizer.rate());
        self.learner.apply(&grad);
        if profile::enabled() {
            // Wait for the device, so the step is timed, not just queued.
            let _ = B::sync(&self.learner.params.tensors()[0].device());
        }
        let optimizer_s = start.elapsed().as_secs_f64() - data_s - hypergradient_s;
        self.step += 1;
        self.episode_rng = self.sampler.rng_after_last().map(RngState::of);
        let ufo = (!warmup && matches!(self.learner.mode, crate::hypergrad::Mode::Ufo(_))).then_some((meta.q, &meta.exact));
        self.warn_on_curvature(meta.curvature);
        self.record(&scores, ufo, meta.curvature, meta_lr)?;
        self.last_tasks = tasks;
        let total_s = start.elapsed().as_secs_f64();
        self.timings.push(StepTiming { data_s, hypergradient_s, optimizer_s, other_s: total_s - data_s - hypergradient_s - optimizer_s, phases });
        Ok(())
    }

    /// Stop the run, keeping the last good checkpoint, when the meta-batch's
    /// loss or gradient is not finite or the loss has blown up.
    fn check_step(&mut self, scores: &TaskScores) -> Result<()> {
        let loss = scores.mean_loss();
        let threshold = *self.threshold.get_or_insert_with(|| self.config.divergence_threshold(loss));
        let why = divergence(loss, threshold).or_else(|| (!scores.grad_norm.is_finite()).then(|| format!("the meta-gradient norm is {}", scores.grad_norm)));
        match why {
            Some(why) => Err(self.diverged(self.step + 1, why)),
            None => Ok(()),
        }
    }

    /// Log the meta-iteration (and a validation when due), update the bar,
    /// and take a checkpoint when due.
    fn record(&mut self, scores: &TaskScores, ufo: Option<(Option<f64>, &Vec<bool>)>, curvature: Option<CurvatureWarning>, meta_lr: Option<f64>) -> Result<()> {
        let (loss, accuracy) = (scores.mean_loss(), scores.mean_accuracy().expect("episodes are classification tasks"));
        let exact_fraction = ufo.map(|(_, exact)| exact.iter().filter(|&&e| e).count() as f64 / scores.losses.len() as f64);
        let q = ufo.and_then(|(q, _)| q);
        let curvature_lambda = curvature.map(|c| c.lambda_needed);
        let moments = match &self.learner.mode {
            crate::hypergrad::Mode::Ufo(crate::hypergrad::QRule::Adaptive(rule)) if ufo.is_some() => rule.moments(),
            _ => None,
        };
        let (ufo_d2, ufo_v2) = moments.unzip();
        let mut lines = vec![Metrics { step: self.step, split: "train".into(), loss, accuracy, ci95: None, q, exact_fraction, ufo_d2, ufo_v2, curvature_lambda, meta_lr, elapsed_s: self.elapsed() }];
        let validation = self.validate_if_due()?;
        let improved = validation.as_ref().is_some_and(|(_, improved)| *improved);
        lines.extend(validation.as_ref().map(|(m, _)| m.clone()));
        for l in &lines {
            let json = serde_json::to_string(l)? + "\n";
            self.log.write_all(json.as_bytes())?;
            self.metrics.push_str(&json);
        }
        self.log.flush()?;
        self.bar.set_message(format!("loss {loss:.3} acc {accuracy:.3}{}", self.best.map_or(String::new(), |(_, a)| format!(" best val {a:.3}"))));
        self.bar.inc(1);
        let every = self.config.checkpoint.every;
        if improved || (every > 0 && self.step.is_multiple_of(every)) || self.step == self.config.train.meta_steps {
            let taken = (self.snapshot(), improved);
            // A validation has just measured θ_step itself.
            if validation.is_some() { self.latest = Some(self.commit(taken)?) } else { self.pending = Some(taken) }
            self.saved_at = self.step;
        }
        Ok(())
    }

    /// Say when an implicit mode's linear solve met non-positive curvature:
    /// at the first time, then at most once per 100 meta-iterations (every
    /// occurrence is in the metrics log).
    fn warn_on_curvature(&mut self, curvature: Option<CurvatureWarning>) {
        let (Some(c), Some(lambda)) = (curvature, self.learner.mode.system_lambda()) else { return };
        if self.last_curvature_warning.is_none_or(|s| self.step >= s + 100) {
            self.bar.suspend(|| eprintln!("warning at meta-iteration {}: {}", self.step + 1, c.describe(lambda)));
            self.last_curvature_warning = Some(self.step);
        }
    }

    /// Validation when it is due: its metrics line and whether it is a new best.
    fn validate_if_due(&mut self) -> Result<Option<(Metrics, bool)>> {
        let Some(val) = self.val_split.clone().filter(|_| self.step.is_multiple_of(self.config.eval.every)) else { return Ok(None) };
        let c = &self.config;
        let s = evaluate(&self.learner, val, self.shape, c.eval.episodes, stream_seed(c.run.seed, 3), &c.eval_inner(), &ProgressBar::hidden())?;
        if let Some(why) = divergence(s.loss, self.threshold.unwrap_or(f64::INFINITY)) {
            return Err(self.diverged(self.step, format!("at validation, {why}")));
        }
        let improved = self.best.is_none_or(|(_, a)| s.accuracy > a);
        if improved {
            self.best = Some((self.step, s.accuracy));
        }
        let line = Metrics { step: self.step, split: "val".into(), loss: s.loss, accuracy: s.accuracy, ci95: Some(s.ci95), q: None, exact_fraction: None, ufo_d2: None, ufo_v2: None, curvature_lambda: None, meta_lr: None, elapsed_s: self.elapsed() };
        Ok(Some((line, improved)))
    }

    /// The last parameters have no next meta-iteration to vouch for them:
    /// measure them on the last meta-batch before they are written.
    fn finish(&mut self) -> Result<()> {
        let Some(p) = self.pending.take() else { return Ok(()) };
        let inner = self.config.inner();
        let losses: Vec<f64> = self.last_tasks.iter().map(|t| self.learner.evaluate(t, &inner).0).collect();
        let loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        if let Some(why) = divergence(loss, self.threshold.unwrap_or(f64::INFINITY)) {
            return Err(self.diverged(self.step, format!("after the last update, {why}")));
        }
        self.latest = Some(self.commit(p)?);
        Ok(())
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.clock.elapsed().as_secs_f64()
    }

    /// Everything needed to continue from this step exactly.
    fn snapshot(&self) -> Checkpoint {
        let learner = &self.learner;
        let shapes = learner.model.parameter_shapes();
        Checkpoint {
            config: self.config.clone(),
            state: TrainState {
                format: FORMAT,
                step: self.step,
                episode_rng: self.episode_rng.clone().expect("an episode was drawn"),
                ufo_rng: RngState::of(&learner.rng),
                mode: learner.mode.clone(),
                adam_time: learner.optimizer.time(),
                best_step: self.best.map(|b| b.0),
                best_val_accuracy: self.best.map(|b| b.1),
                elapsed_s: self.elapsed(),
            },
            params: learner.params.to_host().into_iter().collect(),
            optimizer: learner.optimizer.to_host(&shapes),
            metrics: self.metrics.clone(),
        }
    }

    /// Write a checkpoint, move `best` to it if it improved, and prune old steps.
    fn commit(&self, (checkpoint, improved): Pending) -> Result<PathBuf> {
        let dir = checkpoint.write(&self.run_dir)?;
        if improved {
            set_pointer(&self.run_dir, "best", &step_name(checkpoint.state.step))?;
        }
        let best_dir = checkpoint.state.best_step.map(|s| self.run_dir.join(step_name(s)));
        prune(&self.run_dir, self.config.checkpoint.keep_last, &best_dir.into_iter().chain([dir.clone()]).collect::<Vec<_>>())?;
        Ok(dir)
    }

    fn diverged(&self, step: usize, why: String) -> anyhow::Error {
        self.bar.abandon();
        let keep = self.latest.as_ref().map_or("no checkpoint was written yet".to_string(), |p| format!("the last good checkpoint {} is kept", p.display()));
        anyhow::anyhow!("training diverged at step {step}: {why}; {keep}. Lower train.meta_lr or train.inner_lr, or set train.grad_clip, and resume from it")
    }
}

/// The training split, and the validation split when validation is on.
fn load_splits(config: &Config) -> Result<(Arc<Split>, Option<Arc<Split>>)> {
    let spec = config.dataset();
    let val = if config.eval.every > 0 { Some(Arc::new(spec.load_split(&config.eval.split)?)) } else { None };
    Ok((Arc::new(spec.load_split("train")?), val))
}

/// A checkpoint's parameters, Adam state, mode (adaptive q) and ufo RNG into a learner.
fn restore<B: BaseBackend>(learner: &mut MetaLearner<Conv4, B>, c: &Checkpoint, precision: Precision, device: &Device<B>) -> Result<()> {
    let shapes = learner.model.parameter_shapes();
    learner.params = Params::from_host(&learner.model, &c.params, "the checkpoint's parameters", precision, device)?;
    learner.optimizer.restore(&shapes, &c.optimizer, c.state.adam_time, precision, device)?;
    learner.mode = c.state.mode.clone();
    learner.rng = c.state.ufo_rng.restore()?;
    Ok(())
}
