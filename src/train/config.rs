//! Training configuration: a TOML file of sections with defaults, any field
//! overridable with `--set section.key=value`. Unknown keys and wrong types
//! are errors that name the key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::autodiff::backend::BackendKind;
use crate::autodiff::tensor::Precision;
use crate::data::EpisodeShape;
use crate::data::dataset::{DatasetKind, DatasetSpec, resolve_data_dir};
use crate::hypergrad::{AdaptiveQ, Adapted, ImplicitVariant, InnerLoop, InnerSolve, Mode, QRule};
use crate::learner::MetaLrSchedule;
use crate::models::FunctionalModel;
use crate::models::conv4::{Conv4, Downsample};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Checkpoints and logs go to <checkpoint.dir>/<name>.
    pub name: String,
    /// Seeds the initial parameters, the episode stream and UFO's draws.
    pub seed: u64,
    /// auto (wgpu when an adapter exists), cpu, wgpu or cuda.
    pub backend: BackendChoice,
    /// f32, or f64 on the cpu backend.
    pub precision: Precision,
}

/// The backend a config asks for: a definite one, or the best available.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// wgpu when an adapter exists, else cpu.
    Auto,
    Cpu,
    Wgpu,
    Cuda,
}

impl BackendChoice {
    /// The backend asked for, None for auto.
    pub fn kind(self) -> Option<BackendKind> {
        match self {
            BackendChoice::Auto => None,
            BackendChoice::Cpu => Some(BackendKind::Cpu),
            BackendChoice::Wgpu => Some(BackendKind::Wgpu),
            BackendChoice::Cuda => Some(BackendKind::Cuda),
        }
    }
}

impl From<BackendKind> for BackendChoice {
    fn from(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Cpu => BackendChoice::Cpu,
            BackendKind::Wgpu => BackendChoice::Wgpu,
            BackendKind::Cuda => BackendChoice::Cuda,
        }
    }
}

/// `train.inner_params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InnerParams {
    All,
    Head,
}

impl InnerParams {
    /// What the inner loop adapts, for a model whose head is its last
    /// `head_parameters` tensors.
    pub fn adapted(self, head_parameters: usize) -> Adapted {
        match self {
            InnerParams::All => Adapted::All,
            InnerParams::Head => Adapted::Last(head_parameters),
        }
    }
}

/// Whether a meta-batch runs as one stacked network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskBatching {
    /// Stacked on the GPU, task by task on the CPU.
    Auto,
    On,
    Off,
}

/// The `train.meta_lr_schedule` of a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetaLrScheduleName {
    Constant,
    Cosine,
    Step,
}

/// The `mode.name` of a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeName {
    Maml,
    MamlUnrolled,
    Fomaml,
    Ufo,
    Implicit,
    Neumann,
    FixedPoint,
}

impl std::fmt::Display for ModeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The name as configs spell it.
        let spelled = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(spelled.as_str().unwrap_or_default())
    }
}

/// How ufo's q is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QRuleName {
    Fixed,
    Adaptive,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub dataset: DatasetKind,
    /// Empty: $METAGRAD_DATA/<dataset>, else datasets/<dataset>.
    pub data_dir: String,
    /// Omniglot: vinyals or lake.
    pub split_scheme: String,
    /// Omniglot: rotated characters as extra classes.
    pub rotations: bool,
    /// Seeds the Vinyals character shuffle and the synthetic dataset.
    pub split_seed: u64,
    pub way: usize,
    pub shot: usize,
    /// Query images per class.
    pub queries: usize,
    /// Episodes the background sampler keeps ready.
    pub prefetch: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Conv-4 width; 0 takes the dataset's standard (64 Omniglot, 32 Mini-ImageNet).
    pub channels: usize,
    /// How the Conv-4 blocks downsample: max-pool (a stride-1 conv, then a
    /// 2×2 max-pool) or stride (a stride-2 conv, and the mean of the last
    /// feature map: the MAML paper's Omniglot network).
    pub downsample: Downsample,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Meta-iterations (outer Adam steps).
    pub meta_steps: usize,
    /// Tasks per meta-iteration.
    pub meta_batch: usize,
    /// Adam's step size on the initialisation.
    pub meta_lr: f64,
    /// Adam's ε (PyTorch's 1e-8 by default; iMAML's reference code uses 1e-3).
    pub adam_epsilon: f64,
    /// How meta_lr changes over the run: constant (the papers); cosine (MAML++:
    /// annealed to meta_lr_min over meta_steps); step (times meta_lr_gamma
    /// after each meta-iteration listed in meta_lr_milestones).
    pub meta_lr_schedule: MetaLrScheduleName,
    pub meta_lr_min: f64,
    pub meta_lr_milestones: Vec<usize>,
    pub meta_lr_gamma: f64,
    pub inner_steps: usize,
    pub inner_lr: f64,
    /// Clip the meta-gradient's global norm to this value; 0 turns clipping off.
    pub grad_clip: f64,
    /// Which parameters the inner loop adapts: all, or only the head (the
    /// final linear layer; ANIL). The trunk is then trained by the outer
    /// update alone, through the hypergradient.
    pub inner_params: InnerParams,
    /// Meta-iterations of first-order (fomaml) updates before the selected mode takes over.
    pub first_order_warmup: usize,
    /// on: run the meta-batch as one stacked network (grouped convolutions);
    /// off: task by task; auto: stacked on the GPU, task by task on the CPU,
    /// where Flex's grouped convolution is slower than separate ones.
    pub task_batching: TaskBatching,
    /// Divergence guard: a meta-iteration or validation whose query loss is
    /// above this many times the run's first meta-iteration loss (or not
    /// finite) stops training with an error, and no checkpoint is written
    /// for parameters that have not passed the check. 0 keeps only the
    /// non-finite check.
    pub divergence_factor: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModeConfig {
    /// maml, maml-unrolled, fomaml, ufo or implicit.
    pub name: ModeName,
    /// ufo: fixed (probability q) or adaptive (q from running moments, at least q_min).
    pub q_rule: QRuleName,
    pub q: f64,
    pub q_min: f64,
    /// implicit: proximal regularisation strength.
    pub lambda: f64,
    /// implicit: conjugate-gradient steps.
    pub cg_steps: usize,
    /// implicit: the inner solve, proximal (the paper: every step on the
    /// proximal objective; tests the same way) or pull-back (the reference
    /// code: plain steps, then one step on the proximal term; tests with
    /// plain steps).
    pub inner_solve: InnerSolve,
    /// implicit: c in the reference code's system ((1 + c)I + H/(λ + d)) x = ∇L_q; 0: the paper.
    pub cg_damping: f64,
    /// implicit: d in that system; 0: the paper.
    pub lambda_damping: f64,
    /// neumann and fixed-point: terms of the Neumann series (one
    /// Hessian-vector product each).
    pub neumann_steps: usize,
    /// neumann: the series' step η (fixed-point uses η = train.inner_lr · lambda).
    pub neumann_lr: f64,
    /// neumann, fixed-point: support examples per task in each Hessian-vector
    /// product, drawn at random (stocBiO); 0 uses them all.
    pub hvp_batch: usize,
    /// neumann, fixed-point: support examples per task in each inner step,
    /// drawn at random (stochastic implicit differentiation); 0 uses them all.
    pub inner_batch: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Validate every this many meta-iterations; 0 turns validation off.
    pub every: usize,
    /// Validation episodes (the same ones each time).
    pub episodes: usize,
    /// Inner steps at validation and test time.
    pub inner_steps: usize,
    /// Split to validate on.
    pub split: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub dir: String,
    /// Write a checkpoint every this many meta-iterations (and at the end, and on Ctrl-C).
    pub every: usize,
    /// Step checkpoints to keep besides the best.
    pub keep_last: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub mode: ModeConfig,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { name: "run".into(), seed: 0, backend: BackendChoice::Auto, precision: Precision::F32 }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: DatasetKind::Omniglot,
            data_dir: String::new(),
            split_scheme: "vinyals".into(),
            rotations: true,
            split_seed: 0,
            way: 5,
            shot: 1,
            queries: 15,
            prefetch: 64,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            meta_steps: 60000,
            meta_batch: 32,
            meta_lr: 1e-3,
            adam_epsilon: 1e-8,
            meta_lr_schedule: MetaLrScheduleName::Constant,
            meta_lr_min: 0.0,
            meta_lr_milestones: Vec::new(),
            meta_lr_gamma: 0.1,
            inner_steps: 1,
            inner_lr: 0.4,
            grad_clip: 0.0,
            inner_params: InnerParams::All,
            first_order_warmup: 0,
            task_batching: TaskBatching::Auto,
            divergence_factor: 1e4,
        }
    }
}

impl Default for ModeConfig {
    fn default() -> Self {
        ModeConfig { name: ModeName::Maml, q_rule: QRuleName::Fixed, q: 0.1, q_min: 0.05, lambda: 1.0, cg_steps: 5, inner_solve: InnerSolve::Proximal, cg_damping: 0.0, lambda_damping: 0.0, neumann_steps: 10, neumann_lr: 0.4, hvp_batch: 0, inner_batch: 0 }
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { every: 500, episodes: 100, inner_steps: 3, split: "val".into() }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { dir: "checkpoints".into(), every: 500, keep_last: 3 }
    }
}

/// Set `path` (dotted) in a TOML table to `raw`, read as a TOML value when
/// it parses as one (numbers, booleans, quoted strings) and as a string otherwise.
fn set_path(table: &mut toml::Table, path: &str, raw: &str) -> Result<()> {
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}")).ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut keys: Vec<&str> = path.split('.').collect();
    let last = keys.pop().filter(|k| !k.is_empty()).ok_or_else(|| anyhow::anyhow!("--set {path}={raw}: empty key"))?;
    let mut at = table;
    for key in keys {
        at = at
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| anyhow::anyhow!("--set {path}: {key} is not a section"))?;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

impl Config {
    /// Parse TOML text and apply `key=value` overrides; `source` names the text in errors.
    pub fn parse(text: &str, overrides: &[String], source: &str) -> Result<Config> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        for o in overrides {
            let (key, value) = o.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {o}: expected section.key=value, e.g. train.meta_lr=0.0005"))?;
            set_path(&mut table, key.trim(), value.trim())?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("{source}: key `{path}`: {}", e.into_inner())
        })?;
        config.validate().with_context(|| format!("{source}: invalid settings"))?;
        Ok(config)
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the config {}; the shipped ones are in configs/", path.display()))?;
        Config::parse(&text, overrides, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serialises")
    }

    pub fn mode(&self) -> Result<Mode> {
        let m = &self.mode;
        let batch = |b: usize| (b > 0).then_some(b);
        let support = self.data.way * self.data.shot;
        for (key, b) in [("mode.hvp_batch", m.hvp_batch), ("mode.inner_batch", m.inner_batch)] {
            if b > support {
                bail!("key `{key}` = {b}: a task has only {support} support examples (data.way × data.shot); use at most {support}, or 0 for all");
            }
        }
        Ok(match m.name {
            ModeName::Maml => Mode::Maml,
            ModeName::MamlUnrolled => Mode::MamlUnrolled,
            ModeName::Fomaml => Mode::Fomaml,
            ModeName::Ufo => match m.q_rule {
                QRuleName::Fixed => Mode::Ufo(QRule::Fixed(m.q)),
                QRuleName::Adaptive => Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(m.q_min))),
            },
            ModeName::Implicit => Mode::Implicit { lambda: m.lambda, cg_steps: m.cg_steps, variant: ImplicitVariant { inner_solve: m.inner_solve, cg_damping: m.cg_damping, lambda_damping: m.lambda_damping } },
            ModeName::Neumann => Mode::Neumann { lambda: m.lambda, steps: m.neumann_steps, lr: m.neumann_lr, hvp_batch: batch(m.hvp_batch), inner_batch: batch(m.inner_batch) },
            ModeName::FixedPoint => Mode::FixedPoint { lambda: m.lambda, steps: m.neumann_steps, hvp_batch: batch(m.hvp_batch), inner_batch: batch(m.inner_batch) },
        })
    }

    /// The schedule of the meta learning rate (`train.meta_lr_schedule`).
    pub fn meta_lr_schedule(&self) -> MetaLrSchedule {
        let t = &self.train;
        match t.meta_lr_schedule {
            MetaLrScheduleName::Constant => MetaLrSchedule::Constant,
            MetaLrScheduleName::Cosine => MetaLrSchedule::Cosine { steps: t.meta_steps, min_lr: t.meta_lr_min },
            MetaLrScheduleName::Step => MetaLrSchedule::MultiStep { milestones: t.meta_lr_milestones.clone(), gamma: t.meta_lr_gamma },
        }
    }

    pub fn inner(&self) -> InnerLoop {
        InnerLoop { steps: self.train.inner_steps, lr: self.train.inner_lr, adapted: self.adapted() }
    }

    pub fn eval_inner(&self) -> InnerLoop {
        InnerLoop { steps: self.eval.inner_steps, lr: self.train.inner_lr, adapted: self.adapted() }
    }

    fn adapted(&self) -> Adapted {
        self.train.inner_params.adapted(self.model().map_or(2, |m| m.head_parameters()))
    }

    pub fn episode_shape(&self) -> EpisodeShape {
        EpisodeShape { way: self.data.way, shot: self.data.shot, queries: self.data.queries }
    }

    pub fn model(&self) -> Result<Conv4> {
        let mut model = Conv4::for_dataset(self.data.dataset.name(), self.data.way)?.with_downsample(self.model.downsample);
        if self.model.channels > 0 {
            model.channels = self.model.channels;
        }
        Ok(model)
    }

    /// A run that came from another machine records a data folder that is
    /// not here: read the default one (METAGRAD_DATA, else datasets/) instead
    /// when the dataset is there, so a cloned run evaluates and resumes after
    /// `metagrad data fetch`. Returns what moved, for the user.
    pub fn use_local_data_when_moved(&mut self) -> Option<String> {
        if self.data.data_dir.is_empty() || Path::new(&self.data.data_dir).exists() {
            return None;
        }
        let local = resolve_data_dir(self.data.dataset, None);
        if !local.is_dir() {
            return None;
        }
        let note = format!("the run's data folder {} is not on this machine; reading {} instead", self.data.data_dir, local.display());
        self.data.data_dir = String::new();
        Some(note)
    }

    pub fn dataset(&self) -> DatasetSpec {
        let dir = (!self.data.data_dir.is_empty()).then(|| PathBuf::from(&self.data.data_dir));
        let mut spec = DatasetSpec::standard(self.data.dataset, dir.as_deref());
        spec.split_scheme = self.data.split_scheme.clone();
        spec.rotations = self.data.rotations;
        spec.seed = self.data.split_seed;
        spec
    }

    /// Whether training on `backend` stacks the meta-batch into one network.
    pub fn task_batching(&self, backend: BackendKind) -> bool {
        match self.train.task_batching {
            TaskBatching::On => true,
            TaskBatching::Off => false,
            TaskBatching::Auto => backend.is_gpu(),
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(&self.checkpoint.dir).join(&self.run.name)
    }

    fn validate(&self) -> Result<()> {
        let mode = self.mode()?;
        mode.validate(&self.inner())?;
        let t = &self.train;
        if t.meta_batch == 0 {
            bail!("key `train.meta_batch` = 0: a meta-batch needs at least 1 task");
        }
        if !(t.meta_lr.is_finite() && t.meta_lr > 0.0) {
            bail!("key `train.meta_lr` = {}: it must be a finite number > 0", t.meta_lr);
        }
        if !(t.adam_epsilon.is_finite() && t.adam_epsilon > 0.0) {
            bail!("key `train.adam_epsilon` = {}: it must be a finite number > 0 (1e-8 is the usual value)", t.adam_epsilon);
        }
        match t.meta_lr_schedule {
            MetaLrScheduleName::Constant => {}
            MetaLrScheduleName::Cosine => {
                if !(t.meta_lr_min.is_finite() && t.meta_lr_min >= 0.0 && t.meta_lr_min < t.meta_lr) {
                    bail!("key `train.meta_lr_min` = {}: the cosine schedule anneals meta_lr = {} down to it, so it must be ≥ 0 and below meta_lr", t.meta_lr_min, t.meta_lr);
                }
            }
            MetaLrScheduleName::Step => {
                if t.meta_lr_milestones.is_empty() || t.meta_lr_milestones.contains(&0) || !t.meta_lr_milestones.is_sorted_by(|a, b| a < b) {
                    bail!(
                        "key `train.meta_lr_milestones` = {:?}: the step schedule needs the meta-iterations after which meta_lr decays, increasing and ≥ 1, e.g. [20000, 40000]",
                        t.meta_lr_milestones
                    );
                }
                if !(t.meta_lr_gamma.is_finite() && t.meta_lr_gamma > 0.0) {
                    bail!("key `train.meta_lr_gamma` = {}: the factor applied at each milestone must be a finite number > 0 (0.1 is usual)", t.meta_lr_gamma);
                }
            }
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            bail!("key `train.grad_clip` = {}: use a norm > 0, or 0 for no clipping", t.grad_clip);
        }
        if !(t.divergence_factor.is_finite() && (t.divergence_factor == 0.0 || t.divergence_factor > 1.0)) {
            bail!("key `train.divergence_factor` = {}: use a factor > 1 (default 1e4), or 0 to check only for non-finite losses", t.divergence_factor);
        }
        if self.eval.every > 0 && (self.eval.episodes == 0 || self.eval.inner_steps == 0) {
            bail!("keys `eval.episodes` and `eval.inner_steps` must be ≥ 1 when `eval.every` > 0");
        }
        if self.run.name.is_empty() || self.run.name.contains(['/', '\\']) || self.run.name.starts_with('.') {
            bail!("key `run.name` = '{}': use a plain folder name", self.run.name);
        }
        Ok(())
    }

    /// The settings that define the model and the task, which a run must
    /// keep when it resumes: each one that differs, as (key, this run's
    /// value, other's value).
    pub fn identity_differences(&self, other: &Config) -> Vec<(&'static str, String, String)> {
        let (a, b) = (self, other);
        let keys: [(&'static str, String, String); 10] = [
            ("data.dataset", a.data.dataset.name().to_string(), b.data.dataset.name().to_string()),
            ("data.way", a.data.way.to_string(), b.data.way.to_string()),
            ("data.shot", a.data.shot.to_string(), b.data.shot.to_string()),
            ("data.queries", a.data.queries.to_string(), b.data.queries.to_string()),
            ("data.split_scheme", a.data.split_scheme.clone(), b.data.split_scheme.clone()),
            ("data.rotations", a.data.rotations.to_string(), b.data.rotations.to_string()),
            ("data.split_seed", a.data.split_seed.to_string(), b.data.split_seed.to_string()),
            ("model.channels", a.model.channels.to_string(), b.model.channels.to_string()),
            ("model.downsample", a.model.downsample.name().to_string(), b.model.downsample.name().to_string()),
            ("run.precision", a.run.precision.name().to_string(), b.run.precision.name().to_string()),
        ];
        keys.into_iter().filter(|(_, x, y)| x != y).collect()
    }

    /// The loss above which training counts as diverged, given the run's
    /// first meta-iteration loss.
    pub fn divergence_threshold(&self, reference_loss: f64) -> f64 {
        if self.train.divergence_factor > 0.0 { self.train.divergence_factor * reference_loss.max(1e-3) } else { f64::INFINITY }
    }
}
