//! The trainer end to end: learning on the synthetic dataset, exact resume,
//! surviving SIGKILL, Ctrl-C, evaluation, plots and every error path.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use metagrad::autodiff::backend::{self, BackendKind, Selection};
use metagrad::train::config::Config;
use metagrad::autodiff::tensor::Precision;
use metagrad::train::{Summary, TrainJob, read_metrics};

pub(crate) fn temp(name: &str) -> PathBuf {
    crate::common::fresh_dir(&format!("train-{name}"))
}

/// A small synthetic config whose checkpoints go under `dir`.
pub(crate) fn small_config(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "[run]\nname = \"small\"\nbackend = \"cpu\"\n[data]\ndataset = \"synthetic\"\nqueries = 3\nprefetch = 4\n[model]\nchannels = 8\n\
         [train]\nmeta_steps = 6\nmeta_batch = 2\nmeta_lr = 0.003\ninner_lr = 0.4\n[eval]\nevery = 2\nepisodes = 4\n\
         [checkpoint]\ndir = \"{}\"\nevery = 3\nkeep_last = 2\n{extra}",
        dir.join("checkpoints").display()
    );
    let path = dir.join("small.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The metagrad binary with `args`, on the backend its config names (not
/// the environment's), ready for more settings before it runs.
pub(crate) fn metagrad_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_metagrad"));
    command.args(args).env_remove("METAGRAD_BACKEND");
    command
}

pub(crate) fn metagrad(args: &[&str]) -> Output {
    metagrad_command(args).output().expect("metagrad runs")
}

pub(crate) fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn err(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure; stdout: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Metrics without their wall-clock field, which differs between runs.
fn metrics_without_time(path: &Path) -> Vec<String> {
    read_metrics(path).unwrap().into_iter().map(|mut m| {
        m.elapsed_s = 0.0;
        serde_json::to_string(&m).unwrap()
    }).collect()
}

#[test]
fn each_mode_learns_synthetic_5way_1shot() {
    for (mode, extra) in [("maml", ""), ("fomaml", ""), ("ufo", "q_rule = \"adaptive\"\nq_min = 0.2\n"), ("implicit", "lambda = 2.0\ncg_steps = 3\n")] {
        let dir = temp(&format!("learn-{mode}"));
        let inner = if mode == "implicit" { "inner_steps = 5\ninner_lr = 0.1\n" } else { "inner_steps = 1\ninner_lr = 0.4\n" };
        let text = format!(
            "[run]\nname = \"{mode}\"\nseed = 1\n[data]\ndataset = \"synthetic\"\nqueries = 5\n[model]\nchannels = 16\n\
             [train]\nmeta_steps = 200\nmeta_batch = 4\nmeta_lr = 0.003\n{inner}[mode]\nname = \"{mode}\"\n{extra}\
             [eval]\nevery = 100\nepisodes = 100\ninner_steps = 3\n[checkpoint]\ndir = \"{}\"\nevery = 0\n",
            dir.display()
        );
        let config = Config::parse(&text, &[], mode).unwrap();
        let job = TrainJob { config, resume: None, progress: false, stop: Arc::new(AtomicBool::new(false)), splits: None, task_batching: true };
        let outcome = backend::dispatch(Selection { kind: BackendKind::Cpu, precision: Precision::F32 }, job).unwrap();
        let (_, accuracy) = outcome.best.unwrap();
        eprintln!("{mode}: best validation accuracy {accuracy:.3} after 200 steps");
        // Chance is 0.2; an untrained Conv-4 adapted for 3 steps sits near 0.3.
        assert!(accuracy > 0.5, "{mode}: validation accuracy {accuracy} is not well above chance (0.2)");
    }
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let dir = temp("resume");
    // The stacked meta-batch path (the CPU default is task by task, which the other tests use).
    let config = small_config(&dir, "[mode]\nname = \"ufo\"\nq_rule = \"adaptive\"\nq_min = 0.3\n");
    let config_text = std::fs::read_to_string(&config).unwrap().replace("[train]\n", "[train]\ntask_batching = \"on\"\n");
    std::fs::write(&config, config_text).unwrap();
    let c = config.to_str().unwrap();
    ok(&metagrad(&["train", "--config", c, "--quiet", "--set", "run.name=whole"]));
    ok(&metagrad(&["train", "--config", c, "--quiet", "--set", "run.name=halves", "--set", "train.meta_steps=3"]));
    let out = ok(&metagrad(&["train", "--resume", dir.join("checkpoints/halves").to_str().unwrap(), "--quiet", "--set", "train.meta_steps=6"]));
    assert!(out.contains("finished after step 6"), "{out}");
    let (whole, halves) = (dir.join("checkpoints/whole"), dir.join("checkpoints/halves"));
    for file in ["params.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(whole.join("step-0000006").join(file)).unwrap();
        let b = std::fs::read(halves.join("step-0000006").join(file)).unwrap();
        assert!(a == b, "{file} differs between the uninterrupted and the resumed run");
    }
    let state = |d: &Path| -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("step-0000006/state.json")).unwrap()).unwrap();
        v["elapsed_s"] = 0.into();
        v
    };
    assert_eq!(state(&whole), state(&halves), "step, RNG streams and adaptive-q state continue exactly");
    assert_eq!(metrics_without_time(&whole.join("metrics.jsonl")), metrics_without_time(&halves.join("metrics.jsonl")));
    let logged = read_metrics(&whole.join("metrics.jsonl")).unwrap();
    assert_eq!(logged.len(), 6 + 3, "6 training lines and 3 validations");
    let moments: Vec<(f64, f64)> = logged.iter().filter(|m| m.split == "train").filter_map(|m| Some((m.ufo_d2?, m.ufo_v2?))).collect();
    assert!(!moments.is_empty() && moments.iter().all(|&(d2, v2)| d2 >= 0.0 && v2 > 0.0 && d2.is_finite() && v2.is_finite()), "adaptive q logs the moments it picks q from: {moments:?}");
    // Its curves add q and D²/V² to loss and accuracy.
    let png = dir.join("ufo.png");
    ok(&metagrad(&["plot", whole.to_str().unwrap(), "--out", png.to_str().unwrap()]));
    assert_eq!(image::image_dimensions(&png).unwrap(), (900, 4 * 330 + 40));
    // keep_last = 2, plus the best.
    let steps = std::fs::read_dir(&whole).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("step-")).count();
    assert!((2..=3).contains(&steps), "{steps} step folders kept");
}

/// The number of worker threads changes no bit of a run (so runs may share
/// the cores with `RAYON_NUM_THREADS=1`): kernels split work into chunks of
/// fixed size, whatever the number of workers.
#[test]
fn the_thread_count_changes_no_result() {
    let dir = temp("threads");
    let config = small_config(&dir, "");
    let c = config.to_str().unwrap();
    for batching in ["off", "on"] {
        let params = |threads: &str| -> Vec<u8> {
            let name = format!("{batching}-{threads}");
            let (run, batching) = (format!("run.name={name}"), format!("train.task_batching=\"{batching}\""));
            let args = ["train", "--config", c, "--quiet", "--set", &run, "--set", "train.meta_steps=3", "--set", &batching, "--set", "eval.every=0"];
            ok(&metagrad_command(&args).env("RAYON_NUM_THREADS", threads).output().unwrap());
            std::fs::read(dir.join("checkpoints").join(name).join("step-0000003/params.safetensors")).unwrap()
        };
        assert!(params("1") == params("3"), "task_batching = {batching}: one thread and three give different parameters");
    }
}

#[test]
fn sigkill_while_checkpointing_resumes_from_the_last_complete_checkpoint() {
    let dir = temp("kill");
    let config = small_config(&dir, "");
    let c = config.to_str().unwrap();
    let run = dir.join("checkpoints/small");
    let args = ["train", "--config", c, "--quiet", "--set", "train.meta_steps=400", "--set", "checkpoint.every=1", "--set", "eval.every=0"];
    let latest_step = || metagrad::train::checkpoint::pointer(&run, "latest").map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
    // Every step writes a checkpoint, so a kill a few milliseconds after one
    // lands while the next step runs or its checkpoint is being written.
    for (round, wait_ms) in [(0, 0u64), (1, 3), (2, 7), (3, 12)] {
        let resume = if round == 0 { vec![] } else { vec!["--resume", run.to_str().unwrap()] };
        let before = latest_step();
        let mut child = Command::new(env!("CARGO_BIN_EXE_metagrad")).args(args).args(&resume).spawn().unwrap();
        let start = std::time::Instant::now();
        while latest_step() == before && start.elapsed().as_secs() < 120 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_ne!(latest_step(), before, "round {round}: training progressed");
        let latest = metagrad::train::checkpoint::pointer(&run, "latest").expect("latest names a complete checkpoint");
        metagrad::train::checkpoint::Checkpoint::read(&latest).expect("the checkpoint latest names is complete");
    }
    let out = ok(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=20", "--set", "checkpoint.every=1"]));
    assert!(out.contains("after step 20"), "{out}");
    let metrics = read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<usize> = metrics.iter().map(|m| m.step).collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>(), "the log continues without gaps or repeats");
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits_with_130() {
    let dir = temp("sigint");
    let config = small_config(&dir, "");
    let run = dir.join("checkpoints/small");
    let child = Command::new(env!("CARGO_BIN_EXE_metagrad"))
        .args(["train", "--config", config.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=100000", "--set", "checkpoint.every=1000", "--set", "eval.every=0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training runs (the metrics log grows), then interrupt.
    let start = std::time::Instant::now();
    while read_metrics(&run.join("metrics.jsonl")).map_or(0, |m| m.len()) < 3 && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // 128 + SIGINT: a script can tell an interrupted run from a finished one.
    assert_eq!(out.status.code(), Some(130), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("stopped after step") && text.contains("--resume"), "{text}");
    let latest = metagrad::train::checkpoint::pointer(&run, "latest").expect("Ctrl-C wrote a checkpoint");
    let saved = metagrad::train::checkpoint::Checkpoint::read(&latest).unwrap();
    assert_eq!(saved.state.step, read_metrics(&run.join("metrics.jsonl")).unwrap().len());
}

#[test]
fn eval_reports_a_reproducible_confidence_interval() {
    let s = Summary::of(&[1.0, 0.0, 1.0, 0.0], &[0.5; 4]);
    assert_eq!((s.accuracy, s.episodes), (0.5, 4));
    assert!((s.ci95 - 1.96 * 0.5 / 2.0).abs() < 1e-12);
    let values: Vec<f64> = (0..50).map(|i| ((i * 37) % 11) as f64 / 10.0).collect();
    let mean = values.iter().sum::<f64>() / 50.0;
    let sigma = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 50.0).sqrt();
    assert!((Summary::of(&values, &values).ci95 - 1.96 * sigma / 50f64.sqrt()).abs() < 1e-12);

    let dir = temp("eval");
    let config = small_config(&dir, "");
    ok(&metagrad(&["train", "--config", config.to_str().unwrap(), "--quiet"]));
    let run = dir.join("checkpoints/small");
    let eval = |seed: &str, out: &Path| {
        let text = ok(&metagrad(&["eval", "--checkpoint", run.to_str().unwrap(), "--episodes", "20", "--seed", seed, "--backend", "cpu", "--out", out.to_str().unwrap()]));
        assert!(text.contains("test synthetic 5-way 1-shot: accuracy") && text.contains("95% CI over 20 episodes"), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
        (v["accuracy"].as_f64().unwrap(), v["ci95"].as_f64().unwrap())
    };
    let a = eval("5", &dir.join("a.json"));
    assert_eq!(a, eval("5", &dir.join("b.json")), "same checkpoint and seed, same result");
    assert!((0.0..=1.0).contains(&a.0) && a.1 > 0.0);
    assert!(!run.join("eval.json").exists(), "--out writes only where it says");

    // Named by its run, the best checkpoint's test result is also the run's
    // eval.json, with how far it and the run were trained.
    ok(&metagrad(&["eval", "--checkpoint", run.to_str().unwrap(), "--episodes", "20", "--backend", "cpu"]));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("eval.json")).unwrap()).unwrap();
    let best = std::fs::read_to_string(run.join("best")).unwrap();
    let best_step: u64 = best.trim().trim_start_matches("step-").parse().unwrap();
    let t = &v["training"];
    assert_eq!((t["meta_iterations"].as_u64(), t["run_meta_iterations"].as_u64(), t["of_meta_steps"].as_u64()), (Some(best_step), Some(6), Some(6)), "{v}");
    assert!(t["wall_s"].as_f64().unwrap() > 0.0 && t["run_wall_s"].as_f64().unwrap() >= t["wall_s"].as_f64().unwrap(), "{v}");
    assert!((0.0..=1.0).contains(&t["val_accuracy"].as_f64().unwrap()), "{v}");
    // Other settings, or a step folder, leave the run's headline alone.
    std::fs::remove_file(run.join("eval.json")).unwrap();
    ok(&metagrad(&["eval", "--checkpoint", run.to_str().unwrap(), "--episodes", "20", "--inner-steps", "2", "--backend", "cpu"]));
    ok(&metagrad(&["eval", "--checkpoint", run.join(best.trim()).to_str().unwrap(), "--episodes", "20", "--backend", "cpu"]));
    assert!(!run.join("eval.json").exists());

    let png = dir.join("curves.png");
    ok(&metagrad(&["plot", run.to_str().unwrap(), "--out", png.to_str().unwrap()]));
    let image = image::open(&png).unwrap();
    assert_eq!((image.width(), image.height()), (900, 2 * 330 + 40));
}

#[test]
fn bad_configs_and_checkpoints_say_what_is_wrong() {
    let dir = temp("errors");
    let config = small_config(&dir, "");
    let c = config.to_str().unwrap();
    let e = err(&metagrad(&["train", "--config", c, "--set", "train.meta_lrr=0.1"]));
    assert!(e.contains("meta_lrr") && e.contains("unknown field"), "{e}");
    let e = err(&metagrad(&["train", "--config", c, "--set", "train.meta_batch=many"]));
    assert!(e.contains("train.meta_batch") && e.contains("invalid type"), "{e}");
    let e = err(&metagrad(&["train", "--config", c, "--set", "mode.name=reptile"]));
    assert!(e.contains("mode.name") && e.contains("reptile"), "{e}");
    let e = err(&metagrad(&["train", "--config", c, "--set", "data.dataset=omniglot", "--set", &format!("data.data_dir={}", dir.join("none").display())]));
    assert!(e.contains("does not exist") && e.contains("metagrad data fetch omniglot"), "{e}");
    let e = err(&metagrad(&["train", "--config", c, "--set", "data.way=400"]));
    assert!(e.contains("400-way"), "{e}");

    // NaN: a huge meta step size blows the parameters up after step 1, and
    // those parameters are never saved (faults.rs covers the rest).
    let e = err(&metagrad(&["train", "--config", c, "--quiet", "--set", "run.name=diverging", "--set", "train.meta_lr=1e30", "--set", "checkpoint.every=1", "--set", "eval.every=0"]));
    assert!(e.contains("diverged at step 2") && e.contains("no checkpoint was written yet"), "{e}");
    assert!(metagrad::train::checkpoint::latest_of(&dir.join("checkpoints/diverging")).is_none());
    ok(&metagrad(&["train", "--config", c, "--quiet", "--set", "train.meta_steps=1", "--set", "checkpoint.every=1"]));
    let run = dir.join("checkpoints/small");
    assert!(metagrad::train::checkpoint::pointer(&run, "latest").unwrap().ends_with("step-0000001"));

    // A second fresh run under the same name would mix two runs.
    let e = err(&metagrad(&["train", "--config", c]));
    assert!(e.contains("already has checkpoints") && e.contains("--resume"), "{e}");
    // Another architecture.
    let other = dir.join("other.toml");
    std::fs::write(&other, std::fs::read_to_string(&config).unwrap().replace("[data]\n", "[data]\nway = 10\n")).unwrap();
    let e = err(&metagrad(&["train", "--config", other.to_str().unwrap(), "--resume"]));
    assert!(e.contains("data.way = 5") && e.contains("data.way = 10") && e.contains("changes the model or the task"), "{e}");
    let e = err(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--set", "model.downsample=stride"]));
    assert!(e.contains("model.downsample = max-pool") && e.contains("model.downsample = stride"), "{e}");
    // A truncated checkpoint file.
    let params = run.join("step-0000001/params.safetensors");
    let bytes = std::fs::read(&params).unwrap();
    std::fs::write(&params, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&metagrad(&["train", "--resume", run.to_str().unwrap()]));
    assert!(e.contains("params.safetensors") && e.contains("older step folder"), "{e}");
    let e = err(&metagrad(&["eval", "--checkpoint", dir.join("nowhere").to_str().unwrap()]));
    assert!(e.contains("no checkpoint"), "{e}");
}

#[test]
fn every_shipped_config_loads_and_the_implicit_ones_say_which_algorithm() {
    use metagrad::hypergrad::{ImplicitVariant, InnerSolve, Mode};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let load = |name: &str, overrides: &[&str]| Config::load(&dir.join(name), &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let mut shipped = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = Config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            config.mode().unwrap().validate(&config.inner()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            shipped += 1;
        }
    }
    assert!(shipped >= 10, "only {shipped} configs found in {}", dir.display());
    let reference = load("omniglot-5way-1shot-implicit-reference.toml", &[]).unwrap();
    let variant = ImplicitVariant { inner_solve: InnerSolve::PullBack, cg_damping: 1.0, lambda_damping: 10.0 };
    assert_eq!(reference.mode().unwrap(), Mode::Implicit { lambda: 2.0, cg_steps: 5, variant });
    assert_eq!(reference.train.adam_epsilon, 1e-3);
    let paper = load("omniglot-5way-1shot-implicit.toml", &[]).unwrap();
    assert_eq!(paper.mode().unwrap(), Mode::implicit(2.0, 5));
    assert_eq!(paper.train.adam_epsilon, 1e-8);
    let e = format!("{:#}", load("omniglot-5way-1shot-implicit.toml", &["mode.inner_solve=pullback"]).unwrap_err());
    assert!(e.contains("mode.inner_solve") && e.contains("pull-back"), "{e}");
    let e = format!("{:#}", load("omniglot-5way-1shot-implicit.toml", &["train.adam_epsilon=0"]).unwrap_err());
    assert!(e.contains("train.adam_epsilon") && e.contains("> 0"), "{e}");
    // The decayed fomaml is the paper-setting fomaml but for its name and its schedule.
    let decay = load("omniglot-5way-1shot-fomaml-decay.toml", &[]).unwrap();
    assert_eq!(decay.meta_lr_schedule(), metagrad::learner::MetaLrSchedule::MultiStep { milestones: vec![18500], gamma: 0.1 });
    let fomaml = load("omniglot-5way-1shot-fomaml.toml", &["run.name=\"omniglot-5way-1shot-fomaml-decay\"", "train.meta_lr_schedule=step", "train.meta_lr_milestones=[18500]", "train.meta_lr_gamma=0.1"]).unwrap();
    assert_eq!(decay, fomaml);
    // The strided configs are their max-pool twins but for the name and the paper's Omniglot network.
    for (strided, twin) in [
        ("omniglot-5way-1shot-strided", "omniglot-5way-1shot"),
        ("omniglot-5way-1shot-fomaml-strided", "omniglot-5way-1shot-fomaml"),
        ("omniglot-20way-1shot-strided", "omniglot-20way-1shot"),
        ("omniglot-5way-1shot-implicit-reference-strided", "omniglot-5way-1shot-implicit-reference"),
    ] {
        let config = load(&format!("{strided}.toml"), &[]).unwrap();
        assert_eq!(config.model().unwrap().downsample, metagrad::models::conv4::Downsample::Stride, "{strided}");
        let twin = load(&format!("{twin}.toml"), &[&format!("run.name=\"{strided}\""), "model.downsample=\"stride\""]).unwrap();
        assert_eq!(config, twin, "{strided}");
    }
    let e = format!("{:#}", load("omniglot-5way-1shot.toml", &["model.downsample=\"avg-pool\""]).unwrap_err());
    assert!(e.contains("model.downsample") && e.contains("stride"), "{e}");
}
