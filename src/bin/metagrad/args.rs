//! The command line's arguments (clap), one struct per command or shared group.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use metagrad::autodiff::backend::{self, BackendKind, Selection};
use metagrad::autodiff::tensor::Precision;
use metagrad::data::dataset::{DatasetKind, DatasetSpec};
use metagrad::data::episode::Episode;
use metagrad::data::{EpisodeSampler, EpisodeShape};
use metagrad::hypergrad::{AdaptiveQ, ImplicitVariant, InnerSolve, Mode, QRule};
use metagrad::models::conv4::Downsample;
use metagrad::train::config::{Config, InnerParams};

#[derive(Parser)]
#[command(name = "metagrad", version, about = "Deep meta-learning with exact hypergradients (MAML, FO-MAML, UFO-BLO, iMAML) on the GPU")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct BackendArgs {
    /// Where tensors live: wgpu (GPU) or cpu (Flex). Default: wgpu when an
    /// adapter exists, else cpu. Also read from METAGRAD_BACKEND.
    #[arg(long)]
    pub backend: Option<BackendKind>,
    /// f32 everywhere, or f64 on the cpu backend.
    #[arg(long)]
    pub precision: Option<Precision>,
}

impl BackendArgs {
    /// Put the flags that were given into a config's [run] section.
    pub fn apply_to(&self, config: &mut Config) {
        if let Some(kind) = self.backend {
            config.run.backend = kind.into();
        }
        if let Some(precision) = self.precision {
            config.run.precision = precision;
        }
    }

    pub fn select(&self) -> Result<Selection> {
        let (selection, note) = backend::select(self.backend, self.precision)?;
        if let Some(note) = note {
            eprintln!("metagrad: {note}");
        }
        Ok(selection)
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// List the compute devices metagrad can use.
    Devices,
    /// Write freshly initialised Conv-4 parameters (PyTorch names) as safetensors.
    Init {
        /// Input shape and width: omniglot (1×28×28, 64 channels) or mini-imagenet (3×84×84, 32 channels).
        #[arg(long, default_value = "omniglot")]
        dataset: String,
        /// Number of classes of the head.
        #[arg(long, default_value_t = 5)]
        way: usize,
        /// How the Conv-4 blocks downsample: max-pool, or stride (the MAML paper's Omniglot network).
        #[arg(long, default_value = "max-pool")]
        downsample: Downsample,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// f32 or f64 values in the file.
        #[arg(long, default_value = "f32")]
        precision: Precision,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write one episode sampled from a dataset as safetensors (support_x, support_y, query_x, query_y).
    ExportEpisode {
        #[command(flatten)]
        episode: EpisodeArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a few-shot learner (default config: configs/omniglot-5way-1shot.toml).
    Train(TrainArgs),
    /// Few-shot accuracy of a checkpoint on held-out episodes, mean ± 95% CI.
    Eval(EvalArgs),
    /// Draw a run's loss and accuracy curves (and ufo's q) as PNG.
    Plot {
        /// Run name, run folder or metrics.jsonl file.
        run: String,
        #[arg(long, default_value = "curves.png")]
        out: PathBuf,
        /// Folder holding the runs.
        #[arg(long, default_value = "checkpoints")]
        checkpoint_dir: PathBuf,
    },
    /// Where each run stands: meta-iterations, best validation, test result, training hours, and whether a process is training it now.
    Runs {
        /// Folders holding runs (each run a folder with a `latest` checkpoint), or run folders.
        #[arg(default_value = "checkpoints")]
        dirs: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Datasets: download, describe, preview.
    Data {
        #[command(subcommand)]
        which: DataCommand,
    },
    /// One task's hypergradient from a parameter file and an episode file.
    Hypergrad(HypergradArgs),
    /// Benchmarks, printed as a table (and JSON with --json).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Args)]
pub struct HypergradArgs {
    /// Conv-4 parameters (safetensors, PyTorch names), e.g. from `metagrad init`.
    #[arg(long)]
    pub params: PathBuf,
    /// Episode (safetensors: support_x, support_y, query_x, query_y).
    #[arg(long)]
    pub episode: PathBuf,
    /// How the Conv-4 blocks downsample: max-pool, or stride (the MAML paper's Omniglot network).
    #[arg(long, default_value = "max-pool")]
    pub downsample: Downsample,
    /// maml (exact, backward sweep), maml-unrolled (exact, unrolled graph), fomaml,
    /// ufo (fixed --q), ufo-adaptive (q from the running moments, starting at 0.05),
    /// implicit (conjugate gradient), neumann (Neumann series, step --neumann-lr),
    /// fixed-point (Neumann series with η = inner lr × λ).
    #[arg(long)]
    pub mode: String,
    /// Inner-loop gradient steps r.
    #[arg(long, default_value_t = 1)]
    pub inner_steps: usize,
    /// Inner-loop step size α.
    #[arg(long, default_value_t = 0.4)]
    pub inner_lr: f64,
    /// Which parameters the inner loop adapts: all, or only the linear head
    /// (ANIL; the trunk still gets its hypergradient through the outer path).
    #[arg(long, default_value = "all", value_parser = ["all", "head"])]
    pub inner_params: String,
    /// implicit, neumann, fixed-point: proximal regularisation λ.
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// implicit: conjugate-gradient steps K.
    #[arg(long, default_value_t = 5)]
    pub cg_steps: usize,
    /// implicit: the inner solve, proximal (the paper) or pull-back (iMAML's reference code).
    #[arg(long, default_value = "proximal", value_parser = ["proximal", "pull-back"])]
    pub inner_solve: String,
    /// implicit: c in the reference code's system ((1 + c)I + H/(λ + d)) x = ∇L_q.
    #[arg(long, default_value_t = 0.0)]
    pub cg_damping: f64,
    /// implicit: d in that system.
    #[arg(long, default_value_t = 0.0)]
    pub lambda_damping: f64,
    /// neumann, fixed-point: terms K of the Neumann series.
    #[arg(long, default_value_t = 10)]
    pub neumann_steps: usize,
    /// neumann: the series' step η.
    #[arg(long, default_value_t = 0.4)]
    pub neumann_lr: f64,
    /// neumann, fixed-point: random support examples per Hessian-vector product (stocBiO).
    #[arg(long)]
    pub hvp_batch: Option<usize>,
    /// neumann, fixed-point: random support examples per inner step.
    #[arg(long)]
    pub inner_batch: Option<usize>,
    /// ufo: probability of the exact branch.
    #[arg(long, default_value_t = 0.5)]
    pub q: f64,
    /// ufo: number of independent estimates to average.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// ufo: seed of the Bernoulli draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Where to write the hypergradient (one tensor per parameter, plus query_loss).
    #[arg(long)]
    pub out: PathBuf,
}

impl HypergradArgs {
    pub fn mode(&self) -> Result<Mode> {
        Ok(match self.mode.as_str() {
            "maml" => Mode::Maml,
            "maml-unrolled" => Mode::MamlUnrolled,
            "fomaml" => Mode::Fomaml,
            "ufo" => Mode::Ufo(QRule::Fixed(self.q)),
            "ufo-adaptive" => Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.05))),
            "implicit" => {
                let inner_solve = if self.inner_solve == "pull-back" { InnerSolve::PullBack } else { InnerSolve::Proximal };
                Mode::Implicit { lambda: self.lambda, cg_steps: self.cg_steps, variant: ImplicitVariant { inner_solve, cg_damping: self.cg_damping, lambda_damping: self.lambda_damping } }
            }
            "neumann" => Mode::Neumann { lambda: self.lambda, steps: self.neumann_steps, lr: self.neumann_lr, hvp_batch: self.hvp_batch, inner_batch: self.inner_batch },
            "fixed-point" => Mode::FixedPoint { lambda: self.lambda, steps: self.neumann_steps, hvp_batch: self.hvp_batch, inner_batch: self.inner_batch },
            other => bail!("unknown mode '{other}': expected one of {}", Mode::NAMES),
        })
    }

    /// `--inner-params`, as `train.inner_params` reads it.
    pub fn inner_params(&self) -> Result<InnerParams> {
        Ok(match self.inner_params.as_str() {
            "all" => InnerParams::All,
            "head" => InnerParams::Head,
            other => bail!("unknown --inner-params '{other}': expected all or head"),
        })
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// TOML config (see configs/). Default: configs/omniglot-5way-1shot.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a setting, e.g. --set train.meta_lr=0.0005 --set run.backend=cpu (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue a run: with no value the config's run, else a run name, run folder or step folder.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "RUN|CHECKPOINT")]
    pub resume: Option<String>,
    /// No progress bar (a log line per validation instead).
    #[arg(long)]
    pub quiet: bool,
    /// Time where each meta-iteration goes (data, forward, backward,
    /// Hessian-vector products, Adam) and print it at the end; this waits for
    /// the device around each phase, so it slows a GPU run down a little.
    #[arg(long)]
    pub profile: bool,
    /// Overrides run.backend and run.precision of the config.
    #[command(flatten)]
    pub backend: BackendArgs,
}

#[derive(Args)]
pub struct EvalArgs {
    /// A step folder, or a run (name or folder: its best checkpoint, else its latest).
    #[arg(long)]
    pub checkpoint: String,
    #[arg(long, default_value_t = 600)]
    pub episodes: usize,
    /// Test-time inner steps (default: the run's eval.inner_steps).
    #[arg(long)]
    pub inner_steps: Option<usize>,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Seed of the evaluation episodes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dataset root, when it is elsewhere than where the run was trained.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Evaluate fixed episodes from image folders instead of sampling:
    /// DIR/<episode>/support/<class>/*.png and DIR/<episode>/query/<class>/*.png,
    /// or Omniglot's one-shot runs (runNN/training, runNN/test, runNN/class_labels.txt).
    /// The images get the checkpoint's dataset preprocessing.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["split", "seed"])]
    pub episodes_from: Option<PathBuf>,
    /// Where to write the result as JSON (default:
    /// <checkpoint>/eval-<split>-<episodes>ep-<inner steps>steps-seed<seed>.json,
    /// so evaluations with other settings never replace each other).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "checkpoints")]
    pub checkpoint_dir: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Where a dataset is and which of its variants to use.
#[derive(Args, Clone)]
pub struct DatasetArgs {
    /// Dataset root. Default: $METAGRAD_DATA/<dataset> when METAGRAD_DATA is set, else datasets/<dataset>.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Omniglot split: vinyals (1100/100/423 characters, seeded) or lake (background/evaluation alphabets).
    #[arg(long, default_value = "vinyals")]
    pub split_scheme: String,
    /// Omniglot: do not add the 90/180/270-degree rotations as extra classes.
    #[arg(long)]
    pub no_rotations: bool,
    /// Seed of the Vinyals character shuffle and of the synthetic dataset.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
}

impl DatasetArgs {
    pub fn spec(&self, kind: DatasetKind) -> DatasetSpec {
        let mut spec = DatasetSpec::standard(kind, self.data_dir.as_deref());
        spec.split_scheme = self.split_scheme.clone();
        spec.rotations = !self.no_rotations;
        spec.seed = self.split_seed;
        spec
    }
}

/// One episode of a dataset split.
#[derive(Args, Clone)]
pub struct EpisodeArgs {
    /// synthetic, synthetic-rgb, omniglot or mini-imagenet.
    #[arg(long, default_value = "synthetic")]
    pub dataset: DatasetKind,
    #[command(flatten)]
    pub location: DatasetArgs,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value_t = 5)]
    pub way: usize,
    #[arg(long, default_value_t = 1)]
    pub shot: usize,
    /// Query images per class.
    #[arg(long, default_value_t = 15)]
    pub queries: usize,
    /// Seed of the episode stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl EpisodeArgs {
    /// The episode and the names of its classes, label by label.
    pub fn sample(&self) -> Result<(Episode, Vec<String>)> {
        let split = std::sync::Arc::new(self.location.spec(self.dataset).load_split(&self.split)?);
        let mut sampler = EpisodeSampler::new(split.clone(), EpisodeShape { way: self.way, shot: self.shot, queries: self.queries }, self.seed)?;
        let (episode, classes) = sampler.next_episode_with_classes();
        Ok((episode, classes.iter().map(|&c| split.classes[c].name.clone()).collect()))
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download a dataset (Omniglot), or explain how to obtain it (Mini-ImageNet).
    Fetch {
        /// omniglot or mini-imagenet.
        dataset: DatasetKind,
        /// Folder to put the files in. Default: $METAGRAD_DATA/<dataset> or datasets/<dataset>.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Base URL to download from instead of the official one (file names are appended).
        #[arg(long)]
        url: Option<String>,
        /// Copy the files from this folder instead of downloading them.
        #[arg(long)]
        from: Option<PathBuf>,
        /// sha256sum-style file with the digests to expect instead of the official ones.
        #[arg(long)]
        checksums: Option<PathBuf>,
    },
    /// Classes and images per split.
    Info {
        dataset: DatasetKind,
        #[command(flatten)]
        location: DatasetArgs,
    },
    /// Draw one episode as a PNG grid: support row(s), then query rows, labelled.
    Preview {
        /// synthetic, synthetic-rgb, omniglot or mini-imagenet.
        dataset: DatasetKind,
        #[command(flatten)]
        location: DatasetArgs,
        #[arg(long, default_value = "train")]
        split: String,
        #[arg(long, default_value_t = 5)]
        way: usize,
        #[arg(long, default_value_t = 1)]
        shot: usize,
        #[arg(long, default_value_t = 3)]
        queries: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "episode.png")]
        out: PathBuf,
    },
}

/// `metagrad bench train`.
#[derive(Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Meta-iterations to time per case (after one warm-up iteration).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Modes to measure, comma-separated; a mode with `-head` appended
    /// (maml-head) adapts only the linear head in the inner loop.
    #[arg(long, value_delimiter = ',', default_value = "maml,fomaml,ufo,implicit")]
    pub modes: Vec<String>,
    /// Workloads, comma-separated: omniglot-5w1s, omniglot-20w1s, mini-imagenet-5w1s (default: all).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Inner steps to run every case with, comma-separated (default: each workload's own).
    #[arg(long, value_delimiter = ',')]
    pub inner_steps: Vec<usize>,
    /// Task batching: auto (stacked on the GPU, task by task on the CPU), on or off.
    #[arg(long, default_value = "auto")]
    pub task_batching: String,
    /// Do not split the time into phases: the split waits for the device
    /// around every forward and reverse pass, which slows a GPU down.
    #[arg(long)]
    pub no_phase_split: bool,
    /// Tasks per meta-batch for every workload (default: each workload's own).
    #[arg(long)]
    pub meta_batch: Option<usize>,
    /// Query images per class for every workload (default: each workload's own, 15 or 5).
    #[arg(long)]
    pub queries: Option<usize>,
    /// Conv-4 kernels to time each case with, comma-separated: native (the
    /// CPU's own kernels) and burn (Burn's generic operations, for comparison).
    #[arg(long, value_delimiter = ',', default_value = "native")]
    pub kernels: Vec<metagrad::autodiff::kernels::KernelPath>,
    #[arg(long)]
    pub json: Option<PathBuf>,
    
}

/// `metagrad bench estimators`.
#[derive(Args)]
pub struct EstimatorArgs {
    /// Conv-4 width (narrow keeps the f64 study quick).
    #[arg(long, default_value_t = 8)]
    pub channels: usize,
    #[arg(long, default_value_t = 5)]
    pub way: usize,
    /// Episodes the errors are averaged over.
    #[arg(long, default_value_t = 4)]
    pub episodes: usize,
    #[arg(long, default_value_t = 5)]
    pub inner_steps: usize,
    /// Inner step α; fixed-point's η is α·λ.
    #[arg(long, default_value_t = 0.008)]
    pub inner_lr: f64,
    /// λ of the implicit family's proximal problem: large enough here for
    /// I + H/λ to be positive definite (the rows say when it is not).
    #[arg(long, default_value_t = 100.0)]
    pub lambda: f64,
    /// Step η of the neumann rows.
    #[arg(long, default_value_t = 0.9)]
    pub neumann_lr: f64,
    /// K of the CG, neumann and fixed-point rows, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub steps: Vec<usize>,
    /// q of the ufo rows, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,1")]
    pub qs: Vec<f64>,
    /// Seeds of ufo's draws per q, and of each stochastic row's subsets.
    #[arg(long, default_value_t = 32)]
    pub seeds: u64,
    /// S of the averaged ufo rows (the mean of S estimates per task), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4,16")]
    pub ufo_samples: Vec<usize>,
    /// q of the averaged ufo rows.
    #[arg(long, default_value_t = 0.25)]
    pub ufo_samples_q: f64,
    /// Support examples per Hessian-vector product of the stochastic neumann rows.
    #[arg(long, value_delimiter = ',', default_value = "3,4")]
    pub hvp_batches: Vec<usize>,
    /// Terms of the stochastic neumann rows.
    #[arg(long, default_value_t = 16)]
    pub stochastic_steps: usize,
    /// Series step η of the stochastic neumann rows.
    #[arg(long, default_value_t = 0.5)]
    pub stochastic_lr: f64,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The error-against-cost figure.
    #[arg(long, default_value = "estimators.png")]
    pub png: PathBuf,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Meta-iterations per second of training, for each mode (random images of each workload's shape).
    Train(BenchTrainArgs),
    /// Relative error of every hypergradient estimator against the exact
    /// hypergradient, for its cost (f64, CPU, Conv-4 on random Omniglot-shaped episodes).
    Estimators(EstimatorArgs),
    /// Episodes per second drawn from the cached datasets, on one core.
    Data {
        #[command(flatten)]
        location: DatasetArgs,
        /// Seconds to sample each workload.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Gradient, Hessian-vector product and one exact MAML step of Conv-4.
    Autodiff {
        #[command(flatten)]
        backend: BackendArgs,
        /// Timed repetitions per case (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Time per task and peak memory of every hypergradient mode over a grid of inner steps.
    Hypergrad {
        #[command(flatten)]
        backend: BackendArgs,
        /// Inner steps to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,5,10,20")]
        steps: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// q of the ufo rows.
        #[arg(long, default_value_t = 0.1)]
        ufo_q: f64,
        /// Largest r at which to run the unrolled MAML (its memory grows with r).
        #[arg(long, default_value_t = 20)]
        unrolled_max_steps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

