//! The metagrad command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::backend::tensor::Device;
use clap::{Args, Parser, Subcommand};

use metagrad::backend::{self, BackendKind, OnBackend, Selection};
use metagrad::bench::{AutodiffBench, HypergradBench, format_hypergrad_table, format_table};
use metagrad::data::{EpisodeSampler, EpisodeShape};
use metagrad::episode::Episode;
use metagrad::hypergrad::{AdaptiveQ, InnerLoop, Mode, QRule, adapted_accuracy, task_hypergradient, ufo_mean};
use metagrad::model::{BatchLoss, Conv4};
use metagrad::store::{HostTensor, infer_conv4, read_safetensors, save_params, write_safetensors};
use metagrad::tensor::{Level, Precision, Tensor};
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
        /// The dataset to sample from (the embedded `synthetic` dataset).
        #[arg(long, default_value = "synthetic")]
        dataset: String,
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
        /// Seed of the episode stream (and of the synthetic dataset).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
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

#[derive(Subcommand)]
enum BenchCommand {
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
    fn run<B: Level<Base = B>>(self, device: Device<B>, precision: Precision) -> Result<()> {
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
    fn run<B: Level<Base = B>>(self, device: Device<B>, precision: Precision) -> Result<()> {
        let HypergradJob { args, mut mode, inner, model, params, episode } = self;
        let theta: Vec<Tensor<B>> =
            model.parameter_shapes().iter().map(|(name, _)| params[name].to_tensor(precision, &device)).collect();
        let task = episode.to_task::<B>(precision, &device);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
        let (h, accuracy_after, note) = match mode {
            Mode::Ufo(QRule::Fixed(q)) => {
                let support = BatchLoss { model: &model, batch: &task.support };
                let query = BatchLoss { model: &model, batch: &task.query };
                let (h, exact) = ufo_mean(&support, &query, &theta, &inner, q, args.samples, &mut rng);
                let acc = adapted_accuracy(&model, &h.adapted, &task.query);
                (h, acc, format!(", mean of {} estimates, {exact} took the exact branch", args.samples))
            }
            _ => {
                let r = task_hypergradient(&mut mode, &model, &task, &theta, &inner, &mut rng);
                (r.hypergradient, r.query_accuracy, String::new())
            }
        };
        let mut tensors = metagrad::store::params_to_host(&model, &h.grad);
        let loss = Tensor::<B>::from_f64(&[h.query_loss], &[1], precision, &device);
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
            h.query_loss,
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
    let model = infer_conv4(&params, episode.support.shape[2], &args.params.display().to_string())?;
    episode.check_fits(&model, &args.episode.display().to_string())?;
    let selection = args.backend.select()?;
    backend::dispatch(selection, HypergradJob { args, mode, inner, model, params, episode })
}

/// Print a benchmark table and, when asked, write its rows as JSON.
fn report(table: &str, rows: &impl serde::Serialize, json: Option<PathBuf>) -> Result<()> {
    print!("{table}");
    if let Some(path) = json {
        metagrad::store::write_atomic(&path, serde_json::to_string_pretty(rows)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
        Command::ExportEpisode { dataset, split, way, shot, queries, seed, out } => {
            if dataset != "synthetic" {
                bail!("unknown dataset '{dataset}' for export-episode: this version exports from the embedded 'synthetic' dataset");
            }
            let split = std::sync::Arc::new(metagrad::synthetic::split(&split, seed)?);
            let mut sampler = EpisodeSampler::new(split, EpisodeShape { way, shot, queries }, seed)?;
            sampler.next_episode().write(&out)?;
            println!("wrote {} ({way}-way {shot}-shot, {queries} queries per class)", out.display());
            Ok(())
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
