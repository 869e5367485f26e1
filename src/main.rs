//! The metagrad command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::backend::tensor::Device;
use clap::{Args, Parser, Subcommand};

use metagrad::backend::{self, BackendKind, OnBackend, Selection};
use metagrad::bench::{AutodiffBench, format_table};
use metagrad::model::Conv4;
use metagrad::store::save_params;
use metagrad::tensor::{Level, Precision};

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
    /// Benchmarks, printed as a table (and JSON with --json).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
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
}

pub fn model_for(dataset: &str, way: usize) -> Result<Conv4> {
    if way < 2 {
        bail!("--way {way}: a few-shot task needs at least 2 classes");
    }
    match dataset {
        "omniglot" | "synthetic" => Ok(Conv4::omniglot(way)),
        "mini-imagenet" => Ok(Conv4::mini_imagenet(way)),
        other => bail!("unknown dataset '{other}': expected omniglot, mini-imagenet or synthetic"),
    }
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices => {
            print!("{}", backend::devices_report());
            Ok(())
        }
        Command::Init { dataset, way, seed, precision, out } => {
            let model = model_for(&dataset, way)?;
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
        Command::Bench { which: BenchCommand::Autodiff { backend: args, iters, warmup, json } } => {
            let selection = args.select()?;
            eprintln!("benchmarking on {}", selection.describe());
            let job = AutodiffBench { iters, warmup, backend_name: selection.kind.name().to_string() };
            let rows = backend::dispatch(selection, job);
            print!("{}", format_table(&rows));
            if let Some(path) = json {
                metagrad::store::write_atomic(&path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
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
