//! The metagrad command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use burn::backend::tensor::Device;
use clap::{Args, Parser, Subcommand};

use metagrad::autodiff::backend::{self, BackendKind, OnBackend, Selection};
use metagrad::bench::{AutodiffBench, HypergradBench, format_hypergrad_table, format_table};
use metagrad::train::checkpoint::{self, Checkpoint};
use metagrad::train::config::Config;
use metagrad::data::{EpisodeSampler, EpisodeShape};
use metagrad::train::{EvalJob, TrainJob};
use metagrad::data::dataset::{DatasetKind, DatasetSpec, resolve_data_dir};
use metagrad::data::fetch::{self, Source};
use metagrad::data::mini_imagenet;
use metagrad::data::episode::Episode;
use metagrad::hypergrad::task::accuracy;
use metagrad::hypergrad::{AdaptiveQ, InnerLoop, Mode, QRule, TaskLoss, task_hypergradient, ufo_mean};
use metagrad::models::params::save_params;
use metagrad::models::{Conv4, FunctionalModel, Params, check_task_fits};
use metagrad::data::store::{HostTensor, read_safetensors, write_safetensors};
use metagrad::autodiff::tensor::{BaseBackend, Precision, Tensor};
use rand::SeedableRng;

#[derive(Parser)]
#[command(name = "metagrad", version, about = "Deep meta-learning with exact hypergradients (MAML, FO-MAML, UFO-BLO, iMAML) on the GPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct BackendArgs {
    /// Where tensors live: wgpu (GPU) or cpu (Flex). Default: wgpu when an
    /// adapter exists, else cpu. Also read from METAGRAD_BACKEND.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// f32 everywhere, or f64 on the cpu backend.
    #[arg(long)]
    precision: Option<Precision>,
}

impl BackendArgs {
    /// Put the flags that were given into a config's [run] section.
    fn apply_to(&self, config: &mut Config) {
        if let Some(kind) = self.backend {
            config.run.backend = kind.into();
        }
        if let Some(precision) = self.precision {
            config.run.precision = precision;
        }
    }

    fn select(&self) -> Result<Selection> {
        let (selection, note) = backend::select(self.backend, self.precision)?;
        if let Some(note) = note {
            eprintln!("metagrad: {note}");
        }
        Ok(selection)
    }
}

#[derive(Subcommand)]
enum Command {
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
struct HypergradArgs {
    /// Conv-4 parameters (safetensors, PyTorch names), e.g. from `metagrad init`.
    #[arg(long)]
    params: PathBuf,
    /// Episode (safetensors: support_x, support_y, query_x, query_y).
    #[arg(long)]
    episode: PathBuf,
    /// maml (exact, backward sweep), maml-unrolled (exact, unrolled graph), fomaml,
    /// ufo (fixed --q), ufo-adaptive (q from the running moments, starting at 0.05), implicit.
    #[arg(long)]
    mode: String,
    /// Inner-loop gradient steps r.
    #[arg(long, default_value_t = 1)]
    inner_steps: usize,
    /// Inner-loop step size α.
    #[arg(long, default_value_t = 0.4)]
    inner_lr: f64,
    /// implicit: proximal regularisation λ.
    #[arg(long, default_value_t = 1.0)]
    lambda: f64,
    /// implicit: conjugate-gradient steps K.
    #[arg(long, default_value_t = 5)]
    cg_steps: usize,
    /// ufo: probability of the exact branch.
    #[arg(long, default_value_t = 0.5)]
    q: f64,
    /// ufo: number of independent estimates to average.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// ufo: seed of the Bernoulli draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    backend: BackendArgs,
    /// Where to write the hypergradient (one tensor per parameter, plus query_loss).
    #[arg(long)]
    out: PathBuf,
}

impl HypergradArgs {
    fn mode(&self) -> Result<Mode> {
        Ok(match self.mode.as_str() {
            "maml" => Mode::Maml,
            "maml-unrolled" => Mode::MamlUnrolled,
            "fomaml" => Mode::Fomaml,
            "ufo" => Mode::Ufo(QRule::Fixed(self.q)),
            "ufo-adaptive" => Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.05))),
            "implicit" => Mode::Implicit { lambda: self.lambda, cg_steps: self.cg_steps },
            other => bail!("unknown mode '{other}': expected one of {}", Mode::NAMES),
        })
    }
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config (see configs/). Default: configs/omniglot-5way-1shot.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a setting, e.g. --set train.meta_lr=0.0005 --set run.backend=cpu (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue a run: with no value the config's run, else a run name, run folder or step folder.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "RUN|CHECKPOINT")]
    resume: Option<String>,
    /// No progress bar (a log line per validation instead).
    #[arg(long)]
    quiet: bool,
    /// Overrides run.backend and run.precision of the config.
    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(Args)]
struct EvalArgs {
    /// A step folder, or a run (name or folder: its best checkpoint, else its latest).
    #[arg(long)]
    checkpoint: String,
    #[arg(long, default_value_t = 600)]
    episodes: usize,
    /// Test-time inner steps (default: the run's eval.inner_steps).
    #[arg(long)]
    inner_steps: Option<usize>,
    #[arg(long, default_value = "test")]
    split: String,
    /// Seed of the evaluation episodes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dataset root, when it is elsewhere than where the run was trained.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Evaluate fixed episodes from image folders instead of sampling:
    /// DIR/<episode>/support/<class>/*.png and DIR/<episode>/query/<class>/*.png,
    /// or Omniglot's one-shot runs (runNN/training, runNN/test, runNN/class_labels.txt).
    /// The images get the checkpoint's dataset preprocessing.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["split", "seed"])]
    episodes_from: Option<PathBuf>,
    /// Where to write the result as JSON (default:
    /// <checkpoint>/eval-<split>-<episodes>ep-<inner steps>steps-seed<seed>.json,
    /// so evaluations with other settings never replace each other).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "checkpoints")]
    checkpoint_dir: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Where a dataset is and which of its variants to use.
#[derive(Args, Clone)]
struct DatasetArgs {
    /// Dataset root. Default: $METAGRAD_DATA/<dataset> when METAGRAD_DATA is set, else datasets/<dataset>.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Omniglot split: vinyals (1100/100/423 characters, seeded) or lake (background/evaluation alphabets).
    #[arg(long, default_value = "vinyals")]
    split_scheme: String,
    /// Omniglot: do not add the 90/180/270-degree rotations as extra classes.
    #[arg(long)]
    no_rotations: bool,
    /// Seed of the Vinyals character shuffle and of the synthetic dataset.
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
}

impl DatasetArgs {
    fn spec(&self, kind: DatasetKind) -> DatasetSpec {
        let mut spec = DatasetSpec::standard(kind, self.data_dir.as_deref());
        spec.split_scheme = self.split_scheme.clone();
        spec.rotations = !self.no_rotations;
        spec.seed = self.split_seed;
        spec
    }
}

/// One episode of a dataset split.
#[derive(Args, Clone)]
struct EpisodeArgs {
    /// synthetic, synthetic-rgb, omniglot or mini-imagenet.
    #[arg(long, default_value = "synthetic")]
    dataset: DatasetKind,
    #[command(flatten)]
    location: DatasetArgs,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    split: String,
    #[arg(long, default_value_t = 5)]
    way: usize,
    #[arg(long, default_value_t = 1)]
    shot: usize,
    /// Query images per class.
    #[arg(long, default_value_t = 15)]
    queries: usize,
    /// Seed of the episode stream.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl EpisodeArgs {
    /// The episode and the names of its classes, label by label.
    fn sample(&self) -> Result<(Episode, Vec<String>)> {
        let split = std::sync::Arc::new(self.location.spec(self.dataset).load_split(&self.split)?);
        let mut sampler = EpisodeSampler::new(split.clone(), EpisodeShape { way: self.way, shot: self.shot, queries: self.queries }, self.seed)?;
        let (episode, classes) = sampler.next_episode_with_classes();
        Ok((episode, classes.iter().map(|&c| split.classes[c].name.clone()).collect()))
    }
}

#[derive(Subcommand)]
enum DataCommand {
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Meta-iterations per second of training, for each mode (random images of each workload's shape).
    Train {
        #[command(flatten)]
        backend: BackendArgs,
        /// Meta-iterations to time per case (after one warm-up iteration).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Modes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "maml,fomaml,ufo,implicit")]
        modes: Vec<String>,
        /// Workloads, comma-separated: omniglot-5w1s, omniglot-20w1s, mini-imagenet-5w1s (default: all).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Inner steps to run every case with, comma-separated (default: each workload's own).
        #[arg(long, value_delimiter = ',')]
        inner_steps: Vec<usize>,
        /// Task batching: auto (stacked on the GPU, task by task on the CPU), on or off.
        #[arg(long, default_value = "auto")]
        task_batching: String,
        /// Do not split the time into phases: the split waits for the device
        /// around every forward and reverse pass, which slows a GPU down.
        #[arg(long)]
        no_phase_split: bool,
        /// Tasks per meta-batch for every workload (default: each workload's own).
        #[arg(long)]
        meta_batch: Option<usize>,
        /// Query images per class for every workload (default: each workload's own, 15 or 5).
        #[arg(long)]
        queries: Option<usize>,
        /// Conv-4 kernels to time each case with, comma-separated: native (the
        /// CPU's own kernels) and burn (Burn's generic operations, for comparison).
        #[arg(long, value_delimiter = ',', default_value = "native")]
        kernels: Vec<metagrad::autodiff::kernels::KernelPath>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
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

struct InitJob {
    model: Conv4,
    seed: u64,
    out: PathBuf,
}

impl OnBackend for InitJob {
    type Output = Result<()>;
    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Result<()> {
        let params = self.model.init::<B>(self.seed, precision, &device);
        save_params(&self.out, &self.model, &params)
    }
}

struct HypergradJob {
    args: HypergradArgs,
    mode: Mode,
    inner: InnerLoop,
    model: Conv4,
    params: std::collections::BTreeMap<String, HostTensor>,
    episode: Episode,
}

impl OnBackend for HypergradJob {
    type Output = Result<()>;
    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Result<()> {
        let HypergradJob { args, mut mode, inner, model, params, episode } = self;
        let theta = Params::<B>::from_host(&model, &params, "the parameters", precision, &device)?;
        let task = episode.task();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
        let (h, accuracy_after, note) = match mode {
            Mode::Ufo(QRule::Fixed(q)) => {
                let support = TaskLoss::single(&model, &task.support, precision, &device);
                let query = TaskLoss::single(&model, &task.query, precision, &device);
                let (h, exact) = ufo_mean(&support, &query, &theta, &inner, q, args.samples, &mut rng);
                let acc = accuracy(h.query.output.as_ref().expect("logits"), &episode.query.labels);
                (h, acc, format!(", mean of {} estimates, {exact} took the exact branch", args.samples))
            }
            _ => {
                let (h, accuracy) = task_hypergradient(&mut mode, &model, &task, &theta, &inner, &mut rng);
                (h, accuracy.expect("episodes are classification tasks"), String::new())
            }
        };
        let mut tensors = theta.with_tensors(h.grad.clone()).to_host();
        let query_loss = h.query_loss();
        let loss = Tensor::<B>::from_f64(&[query_loss], &[1], precision, &device);
        tensors.push(("query_loss".to_string(), HostTensor::from_tensor(&loss)));
        let metadata = std::collections::BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("mode".to_string(), mode.name().to_string()),
            ("inner_steps".to_string(), inner.steps.to_string()),
            ("inner_lr".to_string(), inner.lr.to_string()),
        ]);
        write_safetensors(&args.out, &tensors, &metadata)?;
        println!(
            "{}: query loss {:.6}, query accuracy {:.4} after {} inner steps{note}; wrote {}",
            mode.name(),
            query_loss,
            accuracy_after,
            inner.steps,
            args.out.display()
        );
        Ok(())
    }
}

fn hypergrad(args: HypergradArgs) -> Result<()> {
    let mode = args.mode()?;
    let inner = InnerLoop { steps: args.inner_steps, lr: args.inner_lr };
    mode.validate(&inner)?;
    if matches!(mode, Mode::Ufo(_)) && args.samples == 0 {
        bail!("samples = 0: ufo averages at least 1 estimate");
    }
    let episode = Episode::read(&args.episode)?;
    let params = read_safetensors(&args.params)?;
    let model = Conv4::infer(&params, episode.support.shape[2], &args.params.display().to_string())?;
    check_task_fits(&model, &episode.task(), &args.episode.display().to_string())?;
    let selection = args.backend.select()?;
    backend::dispatch(selection, HypergradJob { args, mode, inner, model, params, episode })
}

/// Print a benchmark table and, when asked, write its rows as JSON.
fn report(table: &str, rows: &impl serde::Serialize, json: Option<PathBuf>) -> Result<()> {
    print!("{table}");
    if let Some(path) = json {
        metagrad::data::store::write_atomic(&path, serde_json::to_string_pretty(rows)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn data(which: DataCommand) -> Result<()> {
    match which {
        DataCommand::Fetch { dataset, data_dir, url, from, checksums } => {
            let dir = resolve_data_dir(dataset, data_dir.as_deref());
            let source = Source {
                url: url.unwrap_or_else(|| fetch::OMNIGLOT_URL.to_string()),
                from,
                checksums: checksums.as_deref().map(fetch::read_checksums).transpose()?.unwrap_or_default(),
                progress: true,
            };
            match dataset {
                DatasetKind::Omniglot => {
                    let manual = format!(
                        "To install Omniglot by hand, download {0}images_background.zip and {0}images_evaluation.zip and put them in {{dir}} (or run again with --from DIR, DIR holding the two archives)",
                        fetch::OMNIGLOT_URL
                    );
                    for line in fetch::fetch_all(&dir, &fetch::OMNIGLOT_FILES, &source, &manual)? {
                        println!("{line}");
                    }
                    println!("Omniglot is ready: `metagrad data info omniglot --data-dir {}`", dir.display());
                    Ok(())
                }
                DatasetKind::MiniImagenet => {
                    if source.from.is_some() {
                        for line in fetch::fetch_all(&dir, &fetch::MINI_IMAGENET_FILES, &source, "")? {
                            println!("{line}");
                        }
                    }
                    println!("{}", mini_imagenet::INSTRUCTIONS.replace("<data-dir>", &dir.display().to_string()));
                    let missing = mini_imagenet::missing_files(&dir);
                    if missing.is_empty() {
                        println!("\n{} is complete.", dir.display());
                        Ok(())
                    } else {
                        bail!("Mini-ImageNet in {} is not complete yet: {}", dir.display(), missing)
                    }
                }
                DatasetKind::Synthetic | DatasetKind::SyntheticRgb => {
                    println!("the {} dataset is built into metagrad; there is nothing to fetch", dataset.name());
                    Ok(())
                }
            }
        }
        DataCommand::Info { dataset, location } => {
            print!("{}", location.spec(dataset).info()?);
            Ok(())
        }
        DataCommand::Preview { dataset, location, split, way, shot, queries, seed, out } => {
            let args = EpisodeArgs { dataset, location, split, way, shot, queries, seed };
            let (episode, names) = args.sample()?;
            metagrad::train::plot::episode_grid(&episode, &names, &out)?;
            println!("wrote {} ({} {way}-way {shot}-shot, {queries} queries per class)", out.display(), dataset.name());
            Ok(())
        }
    }
}

const DEFAULT_CONFIG: &str = "configs/omniglot-5way-1shot.toml";

/// The default config: configs/omniglot-5way-1shot.toml when it is there,
/// else the copy built into the binary (so `metagrad train` works anywhere).
fn default_config(overrides: &[String]) -> Result<Config> {
    let path = std::path::Path::new(DEFAULT_CONFIG);
    if path.is_file() {
        Config::load(path, overrides)
    } else {
        Config::parse(include_str!("../configs/omniglot-5way-1shot.toml"), overrides, "the built-in omniglot-5way-1shot config")
    }
}

fn backend_of(config: &Config) -> Result<Selection> {
    BackendArgs { backend: config.run.backend.kind(), precision: Some(config.run.precision) }.select()
}

fn train(args: TrainArgs) -> Result<ExitCode> {
    let fresh = args.config.as_deref().map(|p| Config::load(p, &args.set)).transpose()?;
    let (config, resume) = match &args.resume {
        None => {
            let mut config = match fresh {
                Some(c) => c,
                None => default_config(&args.set)?,
            };
            args.backend.apply_to(&mut config);
            if checkpoint::latest_of(&config.run_dir()).is_some() {
                bail!(
                    "run '{}' already has checkpoints in {}; continue it with --resume {}, or start another with --set run.name=<new name>",
                    config.run.name,
                    config.run_dir().display(),
                    config.run.name
                );
            }
            (config, None)
        }
        Some(arg) => {
            let reference = match &fresh {
                Some(c) => c.clone(),
                None => default_config(&[])?,
            };
            let root = PathBuf::from(&reference.checkpoint.dir);
            let dir = checkpoint::resolve((!arg.is_empty()).then_some(arg.as_str()), &root, &reference.run_dir())?;
            let saved = Checkpoint::read(&dir)?;
            let mut config = match fresh {
                Some(c) => c,
                None => Config::parse(&saved.config.to_toml(), &args.set, &format!("{}/config.toml", dir.display()))?,
            };
            args.backend.apply_to(&mut config);
            if let Some((key, saved_value, value)) = saved.config.identity_differences(&config).into_iter().next() {
                bail!(
                    "cannot resume {}: it was trained with {key} = {saved_value}, but the config asks for {key} = {value}, which changes the model or the task; resume with the run's own value (leave out --config, or --set {key}={saved_value}), or start a new run",
                    dir.display()
                );
            }
            // The run continues where its checkpoint is, whatever name or
            // folder its config (or the one given) says: a copied or moved
            // run never writes into the original.
            let run_dir = checkpoint::run_dir_of(&dir);
            config.run.name = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| config.run.name.clone());
            config.checkpoint.dir = run_dir.parent().map_or_else(|| ".".to_string(), |p| p.display().to_string());
            eprintln!("resuming {} from step {}", dir.display(), saved.state.step);
            (config, Some(saved))
        }
    };
    let selection = backend_of(&config)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopping now, without a checkpoint of this step");
            std::process::exit(130);
        }
        eprintln!("\nfinishing this meta-iteration and writing a checkpoint (Ctrl-C again to stop at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    eprintln!(
        "training {} ({} {}-way {}-shot, {} mode, {} meta-iterations of {} tasks) on {}",
        config.run.name,
        config.data.dataset.name(),
        config.data.way,
        config.data.shot,
        config.mode.name,
        config.train.meta_steps,
        config.train.meta_batch,
        selection.describe()
    );
    let task_batching = config.task_batching(selection.kind);
    let job = TrainJob { config: config.clone(), resume, progress: !args.quiet, stop, splits: None, task_batching };
    let outcome = backend::dispatch(selection, job)?;
    let best = outcome.best.map_or(String::new(), |(s, a)| format!(", best validation accuracy {:.2}% at step {s}", 100.0 * a));
    println!("{} after step {}{best}", if outcome.interrupted { "stopped" } else { "finished" }, outcome.step);
    if let Some(latest) = &outcome.latest {
        println!("checkpoint: {}", latest.display());
    }
    println!("metrics:    {}", outcome.run_dir.join("metrics.jsonl").display());
    let run_dir = std::path::absolute(&outcome.run_dir).unwrap_or(outcome.run_dir.clone());
    if !outcome.interrupted {
        println!("evaluate with: metagrad eval --checkpoint {}", run_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    if outcome.latest.is_some() {
        println!("continue with: metagrad train --resume {}", run_dir.display());
    } else {
        println!("stopped before the first meta-iteration finished: nothing was saved, so start the run again with the same command");
    }
    // 128 + SIGINT, as shells report a process stopped by Ctrl-C.
    Ok(ExitCode::from(130))
}

fn eval(args: EvalArgs) -> Result<()> {
    let given = PathBuf::from(&args.checkpoint);
    let run = if given.is_dir() { given.clone() } else { args.checkpoint_dir.join(&args.checkpoint) };
    let dir = if run.join("state.json").is_file() {
        run
    } else if let Some(best) = checkpoint::pointer(&run, "best") {
        best
    } else {
        checkpoint::resolve(Some(&args.checkpoint), &args.checkpoint_dir, &run)?
    };
    let mut saved = Checkpoint::read(&dir)?;
    let step = saved.state.step;
    if let Some(data_dir) = &args.data_dir {
        saved.config.data.data_dir = data_dir.display().to_string();
    }
    if args.episodes == 0 {
        bail!("--episodes 0: evaluate at least 1 episode");
    }
    let config = saved.config.clone();
    let selection = args.backend.select()?;
    let inner_steps = args.inner_steps.unwrap_or(config.eval.inner_steps);
    let fixed = args.episodes_from.as_deref().map(|d| metagrad::data::fixed_episodes::read(d, config.data.dataset)).transpose()?;
    // What was evaluated: the split's sampled episodes, or the fixed ones given.
    let (what, default_name, source) = match &args.episodes_from {
        Some(d) => {
            let name = d.file_name().map_or_else(|| "episodes".to_string(), |n| n.to_string_lossy().into_owned());
            (format!("fixed episodes ({})", d.display()), format!("eval-fixed-{name}-{inner_steps}steps.json"), serde_json::json!({ "episodes_from": d.display().to_string() }))
        }
        None => (
            format!("{} {} {}-way {}-shot", args.split, config.data.dataset.name(), config.data.way, config.data.shot),
            format!("eval-{}-{}ep-{inner_steps}steps-seed{}.json", args.split, args.episodes, args.seed),
            serde_json::json!({ "split": args.split, "seed": args.seed, "way": config.data.way, "shot": config.data.shot, "queries": config.data.queries }),
        ),
    };
    eprintln!("evaluating {} (step {step}) on {what}, {inner_steps} inner steps, {}", dir.display(), selection.describe());
    let job = EvalJob { checkpoint: saved, split: args.split.clone(), episodes: args.episodes, fixed, inner_steps: args.inner_steps, seed: args.seed, progress: true };
    let outcome = backend::dispatch(selection, job)?;
    let summary = outcome.summary;
    for e in &outcome.per_episode {
        println!("  {:<24} {:>3}-way, {:>3} queries: accuracy {:6.2}%, query loss {:.4}", e.name, e.way, e.queries, 100.0 * e.accuracy, e.loss);
    }
    println!(
        "{what}: accuracy {:.2}% ± {:.2}% (95% CI over {} episodes, {inner_steps} inner steps), query loss {:.4}",
        100.0 * summary.accuracy,
        100.0 * summary.ci95,
        summary.episodes,
        summary.loss
    );
    let out = args.out.unwrap_or_else(|| dir.join(default_name));
    let mut record = serde_json::json!({
        "checkpoint": dir.display().to_string(),
        "step": step,
        "dataset": config.data.dataset.name(),
        "mode": config.mode.name,
        "inner_steps": inner_steps,
        "inner_lr": config.train.inner_lr,
        "episodes": summary.episodes,
        "accuracy": summary.accuracy,
        "ci95": summary.ci95,
        "loss": summary.loss,
    });
    record.as_object_mut().expect("an object").extend(source.as_object().expect("an object").clone());
    if !outcome.per_episode.is_empty() {
        record["per_episode"] = serde_json::to_value(&outcome.per_episode)?;
    }
    metagrad::data::store::write_atomic(&out, (serde_json::to_string_pretty(&record)? + "\n").as_bytes())?;
    println!("wrote {}", out.display());
    Ok(())
}

fn plot(run: &str, out: &std::path::Path, checkpoint_dir: &std::path::Path) -> Result<()> {
    let given = PathBuf::from(run);
    let path = if given.is_file() {
        given
    } else if given.is_dir() {
        given.join("metrics.jsonl")
    } else {
        checkpoint_dir.join(run).join("metrics.jsonl")
    };
    let metrics = metagrad::train::read_metrics(&path)?;
    metagrad::train::plot::training_curves(&metrics, &format!("{run}"), out)?;
    println!("wrote {} ({} records from {})", out.display(), metrics.len(), path.display());
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        // Training has exit codes of its own (130 when interrupted).
        Command::Train(args) => train(args),
        command => run_command(command).map(|()| ExitCode::SUCCESS),
    }
}

fn run_command(command: Command) -> Result<()> {
    match command {
        Command::Devices => {
            print!("{}", backend::devices_report());
            Ok(())
        }
        Command::Init { dataset, way, seed, precision, out } => {
            let model = Conv4::for_dataset(&dataset, way)?;
            // Initial values are drawn on the host, so the CPU backend gives the same file everywhere.
            let selection = Selection { kind: BackendKind::Cpu, precision };
            backend::dispatch(selection, InitJob { model, seed, out: out.clone() })?;
            println!(
                "wrote {} ({} parameters, Conv-4 {}×{}×{} input, {} classes)",
                out.display(),
                model.parameter_count(),
                model.in_channels,
                model.image_size,
                model.image_size,
                model.way
            );
            Ok(())
        }
        Command::Hypergrad(args) => hypergrad(args),
        Command::ExportEpisode { episode, out } => {
            let (e, _) = episode.sample()?;
            e.write(&out)?;
            println!(
                "wrote {} ({} {}-way {}-shot, {} queries per class, {} split)",
                out.display(),
                episode.dataset.name(),
                episode.way,
                episode.shot,
                episode.queries,
                episode.split
            );
            Ok(())
        }
        Command::Data { which } => data(which),
        Command::Train(args) => train(args).map(drop),
        Command::Eval(args) => eval(args),
        Command::Plot { run, out, checkpoint_dir } => plot(&run, &out, &checkpoint_dir),
        Command::Bench { which: BenchCommand::Train { backend: args, steps, modes, workloads, inner_steps, task_batching, no_phase_split, meta_batch, queries, kernels, json } } => {
            if inner_steps.contains(&0) {
                bail!("--inner-steps: every mode needs at least 1 inner step");
            }
            if meta_batch == Some(0) {
                bail!("--meta-batch: a meta-batch needs at least 1 task");
            }
            if queries == Some(0) {
                bail!("--queries: each class needs at least 1 query image");
            }
            let selection = args.select()?;
            let batched = match task_batching.as_str() {
                "on" => true,
                "off" => false,
                "auto" => selection.kind.is_gpu(),
                other => bail!("--task-batching {other}: expected auto, on or off"),
            };
            eprintln!("benchmarking training on {}{}", selection.describe(), if batched { ", stacked meta-batches" } else { ", task by task" });
            let bench = metagrad::bench::TrainBench { selection, steps: steps.max(1), modes, workloads, inner_steps, batched, phase_split: !no_phase_split, meta_batch, queries, kernels };
            let rows = metagrad::bench::train_bench(&bench)?;
            report(&metagrad::bench::format_train_table(&rows), &rows, json)
        }
        Command::Bench { which: BenchCommand::Data { location, seconds, json } } => {
            let rows = metagrad::bench::data_bench(&location.spec(DatasetKind::Omniglot), &location.spec(DatasetKind::MiniImagenet), seconds)?;
            report(&metagrad::bench::format_data_table(&rows), &rows, json)
        }
        Command::Bench { which: BenchCommand::Hypergrad { backend: args, steps, iters, warmup, ufo_q, unrolled_max_steps, json } } => {
            if steps.contains(&0) {
                bail!("--steps: every mode needs at least 1 inner step");
            }
            let selection = args.select()?;
            eprintln!("benchmarking hypergradient modes on {}", selection.describe());
            let job = HypergradBench { steps, iters, warmup, ufo_q, backend_name: selection.kind.name().to_string(), unrolled_max_steps };
            let rows = backend::dispatch(selection, job);
            report(&format_hypergrad_table(&rows), &rows, json)
        }
        Command::Bench { which: BenchCommand::Autodiff { backend: args, iters, warmup, json } } => {
            let selection = args.select()?;
            eprintln!("benchmarking on {}", selection.describe());
            let job = AutodiffBench { iters, warmup, backend_name: selection.kind.name().to_string() };
            let rows = backend::dispatch(selection, job);
            report(&format_table(&rows), &rows, json)
        }
    }
}

fn main() -> ExitCode {
    metagrad::autodiff::backend::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
