//! What each command does with its arguments: it configures the library,
//! runs it and reports, nothing more.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use metagrad::autodiff::backend::{self, BackendKind, Selection};
use metagrad::autodiff::profile;
use metagrad::autodiff::tensor::BaseBackend;
use metagrad::bench::{AutodiffBench, HypergradBench, format_hypergrad_table, format_table};
use metagrad::data::dataset::{DatasetKind, resolve_data_dir};
use metagrad::data::episode::Episode;
use metagrad::data::fetch::{self, Source};
use metagrad::data::store::{read_safetensors, write_atomic, write_safetensors};
use metagrad::data::{fixed_episodes, mini_imagenet};
use metagrad::hypergrad::{InnerLoop, Mode};
use metagrad::hypergrad::files::EpisodeHypergradient;
use metagrad::models::params::save_params;
use metagrad::models::conv4::Downsample;
use metagrad::models::{Conv4, FunctionalModel, check_task_fits};
use metagrad::train::checkpoint::{Checkpoint, TrainState, pointer};
use metagrad::train::config::Config;
use metagrad::train::resume::eval_checkpoint;
use metagrad::train::{EvalJob, EvalOutcome, Outcome, RunRequest, StepTiming, TrainJob, prepare_run};

use crate::args::{BackendArgs, EvalArgs, EpisodeArgs, HypergradArgs, TrainArgs, DatasetArgs};

/// `metagrad data fetch`.
pub fn data_fetch(dataset: DatasetKind, data_dir: Option<PathBuf>, url: Option<String>, from: Option<PathBuf>, checksums: Option<PathBuf>) -> Result<()> {
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

/// `metagrad eval`: evaluate, print, and write the result as JSON.
pub fn eval(args: EvalArgs) -> Result<()> {
    let dir = eval_checkpoint(&args.checkpoint, &args.checkpoint_dir)?;
    let mut saved = Checkpoint::read(&dir)?;
    let step = saved.state.step;
    match &args.data_dir {
        Some(data_dir) => saved.config.data.data_dir = data_dir.display().to_string(),
        None => {
            if let Some(note) = saved.config.use_local_data_when_moved() {
                eprintln!("{note}");
            }
        }
    }
    if args.episodes == 0 {
        bail!("--episodes 0: evaluate at least 1 episode");
    }
    let config = saved.config.clone();
    let training = training_record(&dir, &saved.state, &saved.metrics, &config);
    let selection = args.backend.select()?;
    let inner_steps = args.inner_steps.unwrap_or(config.eval.inner_steps);
    let fixed = args.episodes_from.as_deref().map(|d| fixed_episodes::read(d, config.data.dataset)).transpose()?;
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
    let summary = &outcome.summary;
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
    let mut record = eval_record(&dir, step, &config, inner_steps, &outcome, source)?;
    record["training"] = training;
    record["backend"] = selection.describe().into();
    let text = serde_json::to_string_pretty(&record)? + "\n";
    // A run's headline result: its test accuracy with its own test-time inner
    // steps, on sampled episodes, when `--checkpoint` named the run (so its
    // best checkpoint was picked), also goes to <run>/eval.json.
    let named_a_step = [PathBuf::from(&args.checkpoint), args.checkpoint_dir.join(&args.checkpoint)].iter().any(|p| p.join("state.json").is_file());
    let named_the_run = !named_a_step;
    let headline = named_the_run && args.out.is_none() && args.episodes_from.is_none() && args.split == "test" && inner_steps == config.eval.inner_steps;
    let out = args.out.unwrap_or_else(|| dir.join(default_name));
    write_atomic(&out, text.as_bytes())?;
    println!("wrote {}", out.display());
    if let (true, Some(run)) = (headline, dir.parent()) {
        write_atomic(&run.join("eval.json"), text.as_bytes())?;
        println!("wrote {}", run.join("eval.json").display());
    }
    Ok(())
}

/// How far the evaluated checkpoint was trained, and how far its run is now:
/// meta-iterations and training wall time (resumes included, pauses not).
fn training_record(dir: &Path, state: &TrainState, metrics: &str, config: &Config) -> serde_json::Value {
    let val_accuracy = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<metagrad::train::metrics::Metrics>(l).ok())
        .find(|m| m.split == "val" && m.step == state.step)
        .map(|m| m.accuracy);
    let mut training = serde_json::json!({
        "run": config.run.name,
        "meta_iterations": state.step,
        "of_meta_steps": config.train.meta_steps,
        "wall_s": state.elapsed_s,
        "val_accuracy": val_accuracy,
    });
    let latest = dir.parent().and_then(|run| pointer(run, "latest")).and_then(|l| Checkpoint::read_config_and_state(&l).ok());
    if let Some((_, latest)) = latest {
        training["run_meta_iterations"] = latest.step.into();
        training["run_wall_s"] = latest.elapsed_s.into();
    }
    training
}


/// An evaluation as the JSON record written next to the checkpoint.
fn eval_record(dir: &Path, step: usize, config: &Config, inner_steps: usize, outcome: &EvalOutcome, source: serde_json::Value) -> Result<serde_json::Value> {
    let summary = &outcome.summary;
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
    Ok(record)
}

/// `metagrad runs`: one line per run folder found in `dirs`.
pub fn runs(dirs: &[PathBuf], json: bool) -> Result<()> {
    use metagrad::train::runs::{RunStatus, runs_under};
    let mut all = Vec::new();
    for dir in dirs {
        if dir.join("latest").is_file() {
            all.push(RunStatus::read(dir)?);
        } else {
            all.extend(runs_under(dir)?);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no runs in {} (a run is a folder with a `latest` checkpoint)", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "));
        return Ok(());
    }
    let count = |n: usize| n.to_string().as_bytes().rchunks(3).rev().map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(",");
    let name_of = |r: &RunStatus| r.run.file_name().map_or_else(|| r.run.display().to_string(), |n| n.to_string_lossy().into_owned());
    // The name column fits the longest run name, so the columns line up.
    let width = all.iter().map(|r| name_of(r).chars().count()).max().unwrap_or(0).max(20);
    println!("{:<width$} {:<22} {:<22} {:>17} {:>19} {:>25} {:>7}  state", "run", "mode", "task", "meta-iterations", "best validation", "test (run's eval.json)", "hours");
    for r in &all {
        let name = name_of(r);
        let best = r.best.map_or("-".into(), |b| format!("{:.2} % at {}", 100.0 * b.accuracy, count(b.step)));
        let test = r.test.map_or("-".into(), |t| format!("{:.2} ± {:.2} % at {}", 100.0 * t.accuracy, 100.0 * t.ci95.unwrap_or(0.0), count(t.step)));
        let task = format!("{} {}-way {}-shot", r.dataset, r.way, r.shot);
        let progress = format!("{} / {}", count(r.step), count(r.meta_steps));
        println!("{name:<width$} {:<22} {task:<22} {progress:>17} {best:>19} {test:>25} {:>7.2}  {}", r.mode, r.wall_s / 3600.0, r.activity());
    }
    Ok(())
}

/// `metagrad plot`.
pub fn plot(run: &str, out: &Path, checkpoint_dir: &Path) -> Result<()> {
    let given = PathBuf::from(run);
    let path = if given.is_file() {
        given
    } else if given.is_dir() {
        given.join("metrics.jsonl")
    } else {
        checkpoint_dir.join(run).join("metrics.jsonl")
    };
    let metrics = metagrad::train::read_metrics(&path)?;
    metagrad::train::plot::training_curves(&metrics, run, out)?;
    println!("wrote {} ({} records from {})", out.display(), metrics.len(), path.display());
    Ok(())
}


/// Print a benchmark table and, when asked, write its rows as JSON.
pub fn report(table: &str, rows: &impl serde::Serialize, json: Option<PathBuf>) -> Result<()> {
    print!("{table}");
    if let Some(path) = json {
        write_atomic(&path, serde_json::to_string_pretty(rows)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}


/// `metagrad train`: prepare the run, train until done or Ctrl-C, report.
pub fn train(args: TrainArgs) -> Result<ExitCode> {
    let request = RunRequest { config: args.config.as_deref(), overrides: &args.set, resume: args.resume.as_deref(), adjust: &|c: &mut Config| args.backend.apply_to(c) };
    let (config, resume) = prepare_run(&request)?;
    if let Some(saved) = &resume {
        eprintln!("resuming {} from step {}", config.run_dir().join(metagrad::train::checkpoint::step_name(saved.state.step)).display(), saved.state.step);
    }
    let selection = BackendArgs { backend: config.run.backend.kind(), precision: Some(config.run.precision) }.select()?;
    let stop = stop_on_ctrl_c()?;
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
    profile::set_enabled(args.profile);
    let task_batching = config.task_batching(selection.kind);
    let job = TrainJob { config, resume, progress: !args.quiet, stop, splits: None, task_batching };
    let outcome = backend::dispatch(selection, job)?;
    if args.profile {
        print_profile(&outcome.timings);
    }
    Ok(report_outcome(&outcome))
}

/// A flag that Ctrl-C (or SIGTERM) sets: training then stops after the
/// current meta-iteration with a checkpoint; a second one stops at once.
/// Signals within a second of the first are the same request: `timeout`
/// sends SIGTERM to the process and then to its group, and batch schedulers
/// and terminals can deliver one stop more than once. Counting those as
/// "again" would stop the run without its checkpoint.
fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    const SAME_REQUEST: std::time::Duration = std::time::Duration::from_secs(1);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mut first: Option<std::time::Instant> = None;
    ctrlc::set_handler(move || match first {
        None => {
            first = Some(std::time::Instant::now());
            flag.store(true, Ordering::SeqCst);
            eprintln!("\nfinishing this meta-iteration and writing a checkpoint (Ctrl-C again to stop at once)");
        }
        Some(at) if at.elapsed() >= SAME_REQUEST => {
            eprintln!("\nstopping now, without a checkpoint of this step");
            std::process::exit(130);
        }
        Some(_) => {}
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(stop)
}

/// Mean seconds per meta-iteration by phase, for `--profile`.
fn print_profile(timings: &[StepTiming]) {
    let n = timings.len().max(1) as f64;
    let mean = |f: fn(&StepTiming) -> f64| timings.iter().map(f).sum::<f64>() / n;
    println!("profile over {} meta-iterations (mean seconds each; forward, backward and HVP are thread time over the tasks):", timings.len());
    println!("  data {:.4}  hypergradient {:.4}  adam {:.4}  other {:.4}", mean(|t| t.data_s), mean(|t| t.hypergradient_s), mean(|t| t.optimizer_s), mean(|t| t.other_s));
    println!(
        "  forward {:.4}  backward {:.4}  hvp reverse {:.4}  tasks {:.4}",
        mean(|t| t.phases.forward_s),
        mean(|t| t.phases.backward_s),
        mean(|t| t.phases.hvp_reverse_s),
        mean(|t| t.phases.task_s)
    );
}

/// Where the run ended and how to go on; 130 (as a shell reports Ctrl-C) when interrupted.
fn report_outcome(outcome: &Outcome) -> ExitCode {
    let best = outcome.best.map_or(String::new(), |(s, a)| format!(", best validation accuracy {:.2}% at step {s}", 100.0 * a));
    println!("{} after step {}{best}", if outcome.interrupted { "stopped" } else { "finished" }, outcome.step);
    if let Some(latest) = &outcome.latest {
        println!("checkpoint: {}", latest.display());
    }
    println!("metrics:    {}", outcome.run_dir.join("metrics.jsonl").display());
    let run_dir = std::path::absolute(&outcome.run_dir).unwrap_or(outcome.run_dir.clone());
    if !outcome.interrupted {
        println!("evaluate with: metagrad eval --checkpoint {}", run_dir.display());
        return ExitCode::SUCCESS;
    }
    if outcome.latest.is_some() {
        println!("continue with: metagrad train --resume {}", run_dir.display());
    } else {
        println!("stopped before the first meta-iteration finished: nothing was saved, so start the run again with the same command");
    }
    ExitCode::from(130)
}

/// `metagrad init`: fresh Conv-4 parameters as safetensors.
pub fn init(dataset: &str, way: usize, downsample: Downsample, seed: u64, precision: metagrad::autodiff::tensor::Precision, out: &Path) -> Result<()> {
    struct InitJob<'a> {
        model: Conv4,
        seed: u64,
        out: &'a Path,
    }
    impl metagrad::autodiff::backend::OnBackend for InitJob<'_> {
        type Output = Result<()>;
        fn run<B: BaseBackend>(self, device: burn::backend::tensor::Device<B>, precision: metagrad::autodiff::tensor::Precision) -> Result<()> {
            save_params(self.out, &self.model, &self.model.init::<B>(self.seed, precision, &device))
        }
    }
    let model = Conv4::for_dataset(dataset, way)?.with_downsample(downsample);
    // Initial values are drawn on the host, so the CPU backend gives the same file everywhere.
    backend::dispatch(Selection { kind: BackendKind::Cpu, precision }, InitJob { model, seed, out })?;
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

/// `metagrad hypergrad`: one task's hypergradient, written as safetensors.
pub fn hypergrad(args: HypergradArgs) -> Result<()> {
    let mode = args.mode()?;
    if matches!(mode, Mode::Ufo(_)) && args.samples == 0 {
        bail!("samples = 0: ufo averages at least 1 estimate");
    }
    let episode = Episode::read(&args.episode)?;
    let params = read_safetensors(&args.params)?;
    let model = Conv4::infer(&params, episode.support.shape[2], args.downsample, &args.params.display().to_string())?;
    let inner = InnerLoop { adapted: args.inner_params()?.adapted(model.head_parameters()), ..InnerLoop::new(args.inner_steps, args.inner_lr) };
    mode.validate(&inner)?;
    check_task_fits(&model, &episode.task(), &args.episode.display().to_string())?;
    let selection = args.backend.select()?;
    let name = mode.name();
    let job = EpisodeHypergradient { model, params, episode, mode, inner, samples: args.samples, seed: args.seed };
    let report = backend::dispatch(selection, job)?;
    let metadata = std::collections::BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("mode".to_string(), name.to_string()),
        ("inner_steps".to_string(), inner.steps.to_string()),
        ("inner_lr".to_string(), inner.lr.to_string()),
        ("inner_params".to_string(), args.inner_params.clone()),
    ]);
    write_safetensors(&args.out, &report.tensors, &metadata)?;
    let note = report.exact_draws.map_or(String::new(), |k| format!(", mean of {} estimates, {k} took the exact branch", args.samples));
    println!("{name}: query loss {:.6}, query accuracy {:.4} after {} inner steps{note}; wrote {}", report.query_loss, report.query_accuracy, inner.steps, args.out.display());
    if let Some(warning) = &report.curvature {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// `metagrad export-episode`.
pub fn export_episode(episode: &EpisodeArgs, out: &Path) -> Result<()> {
    let (e, _) = episode.sample()?;
    e.write(out)?;
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

/// `metagrad data preview`.
pub fn data_preview(args: &EpisodeArgs, out: &Path) -> Result<()> {
    let (episode, names) = args.sample()?;
    metagrad::train::plot::episode_grid(&episode, &names, out)?;
    println!("wrote {} ({} {}-way {}-shot, {} queries per class)", out.display(), args.dataset.name(), args.way, args.shot, args.queries);
    Ok(())
}

/// `metagrad data info`.
pub fn data_info(dataset: DatasetKind, location: &DatasetArgs) -> Result<()> {
    print!("{}", location.spec(dataset).info()?);
    Ok(())
}

/// `metagrad bench train`.
pub fn bench_train(args: crate::args::BenchTrainArgs) -> Result<()> {
    let crate::args::BenchTrainArgs { backend: backend_args, steps, modes, workloads, inner_steps, task_batching, no_phase_split, meta_batch, queries, kernels, json } = args;
    if inner_steps.contains(&0) {
        bail!("--inner-steps: every mode needs at least 1 inner step");
    }
    if meta_batch == Some(0) {
        bail!("--meta-batch: a meta-batch needs at least 1 task");
    }
    if queries == Some(0) {
        bail!("--queries: each class needs at least 1 query image");
    }
    let selection = backend_args.select()?;
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

/// `metagrad bench data`.
pub fn bench_data(location: &DatasetArgs, seconds: f64, json: Option<PathBuf>) -> Result<()> {
    let rows = metagrad::bench::data_bench(&location.spec(DatasetKind::Omniglot), &location.spec(DatasetKind::MiniImagenet), seconds)?;
    report(&metagrad::bench::format_data_table(&rows), &rows, json)
}

/// `metagrad bench hypergrad`.
pub fn bench_hypergrad(args: &BackendArgs, steps: Vec<usize>, iters: usize, warmup: usize, ufo_q: f64, unrolled_max_steps: usize, json: Option<PathBuf>) -> Result<()> {
    if steps.contains(&0) {
        bail!("--steps: every mode needs at least 1 inner step");
    }
    let selection = args.select()?;
    eprintln!("benchmarking hypergradient modes on {}", selection.describe());
    let job = HypergradBench { steps, iters, warmup, ufo_q, backend_name: selection.kind.name().to_string(), unrolled_max_steps };
    let rows = backend::dispatch(selection, job);
    report(&format_hypergrad_table(&rows), &rows, json)
}

/// `metagrad bench autodiff`.
pub fn bench_autodiff(args: &BackendArgs, iters: usize, warmup: usize, json: Option<PathBuf>) -> Result<()> {
    let selection = args.select()?;
    eprintln!("benchmarking on {}", selection.describe());
    let job = AutodiffBench { iters, warmup, backend_name: selection.kind.name().to_string() };
    let rows = backend::dispatch(selection, job);
    report(&format_table(&rows), &rows, json)
}

/// `metagrad bench estimators`: the table, the JSON rows and the figure.
pub fn bench_estimators(args: crate::args::EstimatorArgs) -> Result<()> {
    use metagrad::bench::estimators::{EstimatorStudy, format_estimator_table, plot_estimators};
    let inner = InnerLoop::new(args.inner_steps, args.inner_lr);
    for lr in [args.neumann_lr, args.stochastic_lr] {
        Mode::Neumann { lambda: args.lambda, steps: 1, lr, hvp_batch: None, inner_batch: None }.validate(&inner)?;
    }
    if args.episodes == 0 || args.seeds == 0 || args.stochastic_steps == 0 || args.steps.contains(&0) || args.ufo_samples.contains(&0) {
        bail!("--episodes, --seeds, --stochastic-steps and every --steps and --ufo-samples value must be at least 1");
    }
    if let Some(b) = args.hvp_batches.iter().find(|&&b| b == 0 || b > args.way) {
        bail!("--hvp-batches: b = {b}; a task has {} support examples (1-shot), so use 1 to {}", args.way, args.way);
    }
    if let Some(q) = args.qs.iter().chain([&args.ufo_samples_q]).find(|q| !(**q > 0.0 && **q <= 1.0)) {
        bail!("--qs or --ufo-samples-q: q = {q} is not in (0, 1]");
    }
    let model = Conv4 { channels: args.channels, ..Conv4::omniglot(args.way) };
    eprintln!("comparing hypergradient estimators on {} (f64, cpu), {} episodes", model.describe(), args.episodes);
    let study = EstimatorStudy { model, episodes: args.episodes, inner, lambda: args.lambda, neumann_lr: args.neumann_lr, steps: args.steps, qs: args.qs, seeds: args.seeds, ufo_samples: args.ufo_samples, ufo_samples_q: args.ufo_samples_q, hvp_batches: args.hvp_batches, stochastic_steps: args.stochastic_steps, stochastic_lr: args.stochastic_lr };
    let rows = study.run();
    plot_estimators(&rows, &args.png)?;
    eprintln!("wrote {}", args.png.display());
    report(&format_estimator_table(&rows), &rows, args.json)
}
