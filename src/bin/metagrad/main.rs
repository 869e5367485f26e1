//! The metagrad command line: parse the arguments and hand them to the
//! command that configures the library (commands.rs).

mod args;
mod commands;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use args::{BenchCommand, Cli, Command, DataCommand, EpisodeArgs};

fn run(cli: Cli) -> Result<ExitCode> {
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cli.command {
        // Training has exit codes of its own (130 when interrupted).
        Command::Train(args) => commands::train(args),
        Command::Devices => {
            print!("{}", metagrad::autodiff::backend::devices_report());
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { dataset, way, downsample, seed, precision, out } => done(commands::init(&dataset, way, downsample, seed, precision, &out)),
        Command::ExportEpisode { episode, out } => done(commands::export_episode(&episode, &out)),
        Command::Hypergrad(args) => done(commands::hypergrad(args)),
        Command::Eval(args) => done(commands::eval(args)),
        Command::Plot { run, out, checkpoint_dir } => done(commands::plot(&run, &out, &checkpoint_dir)),
        Command::Runs { dirs, json } => done(commands::runs(&dirs, json)),
        Command::Data { which } => done(data(which)),
        Command::Bench { which } => done(bench(which)),
    }
}

fn data(which: DataCommand) -> Result<()> {
    match which {
        DataCommand::Fetch { dataset, data_dir, url, from, checksums } => commands::data_fetch(dataset, data_dir, url, from, checksums),
        DataCommand::Info { dataset, location } => commands::data_info(dataset, &location),
        DataCommand::Preview { dataset, location, split, way, shot, queries, seed, out } => {
            commands::data_preview(&EpisodeArgs { dataset, location, split, way, shot, queries, seed }, &out)
        }
    }
}

fn bench(which: BenchCommand) -> Result<()> {
    match which {
        BenchCommand::Train(args) => commands::bench_train(args),
        BenchCommand::Estimators(args) => commands::bench_estimators(args),
        BenchCommand::Data { location, seconds, json } => commands::bench_data(&location, seconds, json),
        BenchCommand::Hypergrad { backend, steps, iters, warmup, ufo_q, unrolled_max_steps, json } => {
            commands::bench_hypergrad(&backend, steps, iters, warmup, ufo_q, unrolled_max_steps, json)
        }
        BenchCommand::Autodiff { backend, iters, warmup, json } => commands::bench_autodiff(&backend, iters, warmup, json),
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
