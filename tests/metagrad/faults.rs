//! Fault injection: the guarantees a run folder gives (README, "What metagrad
//! guarantees"). Each test breaks something on purpose, then checks the
//! message the user gets and that no file outside the run was touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::train::{err, metagrad, metagrad_command, ok, small_config, temp};
use metagrad::train::checkpoint::{Checkpoint, RunLock, pointer};

/// Every file under `root` (except those under `skip`) with its bytes: a
/// snapshot to prove that nothing else changed.
fn tree(root: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if skip.iter().any(|s| dir.starts_with(s)) {
            continue;
        }
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if !skip.iter().any(|s| p.starts_with(s)) {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn steps_of(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    v.sort();
    v
}

/// A finished 6-step run `name` under `dir`/checkpoints, checkpoints at 3 and 6.
fn trained(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let config = small_config(dir, "");
    ok(&metagrad(&["train", "--config", config.to_str().unwrap(), "--quiet", "--set", &format!("run.name={name}")]));
    (config, dir.join("checkpoints").join(name))
}

#[test]
fn resume_writes_into_the_run_it_was_given_and_nowhere_else() {
    let dir = temp("fault-copy");
    let (config, a) = trained(&dir, "a");
    // A copy of run a, resumed: everything goes into the copy.
    let b = dir.join("checkpoints/b");
    assert!(Command::new("cp").args(["-r", a.to_str().unwrap(), b.to_str().unwrap()]).status().unwrap().success());
    let before = tree(&dir, &[&b]);
    let out = ok(&metagrad(&["train", "--resume", b.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=9"]));
    assert!(out.contains("finished after step 9") && out.contains("checkpoints/b"), "{out}");
    assert!(steps_of(&b).contains(&"step-0000009".to_string()), "{:?}", steps_of(&b));
    assert_eq!(before, tree(&dir, &[&b]), "resuming the copy touched files outside it (run a)");

    // Resumed with another run's config: still into the run resumed; the other run's folder is not made.
    let other = dir.join("other.toml");
    std::fs::write(&other, std::fs::read_to_string(&config).unwrap().replace("name = \"small\"", "name = \"unrelated\"")).unwrap();
    let before = tree(&dir, &[&b]);
    ok(&metagrad(&["train", "--resume", b.to_str().unwrap(), "--config", other.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=12"]));
    assert!(steps_of(&b).contains(&"step-0000012".to_string()));
    assert!(!dir.join("checkpoints/unrelated").exists(), "the config's run name got a folder");
    assert_eq!(before, tree(&dir, &[&b]));

    // By absolute path from another working directory: into the run, not a new one under the cwd.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metagrad"))
        .args(["train", "--resume", b.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=15"])
        .current_dir(&elsewhere)
        .env_remove("METAGRAD_BACKEND")
        .output()
        .unwrap();
    ok(&out);
    assert!(steps_of(&b).contains(&"step-0000015".to_string()));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "resuming from another folder wrote there");
}

#[test]
fn a_run_is_owned_by_one_process() {
    let dir = temp("fault-lock");
    let (_, run) = trained(&dir, "small");
    let before = tree(&dir, &[]);
    let lock = RunLock::acquire(&run).unwrap();
    let e = err(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=9"]));
    assert!(e.contains("being trained by another metagrad process") && e.contains(&std::process::id().to_string()), "{e}");
    // The refused process wrote nothing (the lock file's pid is this test's).
    assert_eq!(before.len(), tree(&dir, &[]).len());
    assert_eq!(before.iter().filter(|(p, _)| !p.ends_with("lock")).collect::<Vec<_>>(), tree(&dir, &[]).iter().filter(|(p, _)| !p.ends_with("lock")).collect::<Vec<_>>());
    drop(lock);
    ok(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=9"]));
}

#[test]
fn divergence_never_becomes_the_last_good_checkpoint() {
    let dir = temp("fault-diverge");
    let (_, run) = trained(&dir, "small");
    let good = pointer(&run, "latest").unwrap();
    assert!(good.ends_with("step-0000006"));
    // A step size that sends the parameters to 1e30 in one update: that
    // step's checkpoint must never be written, however often they are due.
    let e = err(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=20", "--set", "train.meta_lr=1e30", "--set", "checkpoint.every=1", "--set", "eval.every=0"]));
    assert!(e.contains("diverged at step 8") && e.contains("step-0000006") && e.contains("kept") && e.contains("train.meta_lr"), "{e}");
    assert_eq!(pointer(&run, "latest").unwrap(), good);
    assert!(!run.join("step-0000007").exists(), "the diverged parameters of step 7 were saved");
    // Huge but finite losses count as divergence too.
    let e = err(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=30", "--set", "train.meta_lr=1e6", "--set", "eval.every=0"]));
    assert!(e.contains("diverged") && e.contains("divergence threshold"), "{e}");
    // The last good checkpoint is good: it resumes and trains on with a sane step size.
    let out = ok(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=9"]));
    assert!(out.contains("finished after step 9"), "{out}");
}

#[test]
fn a_diverged_checkpoint_fails_evaluation() {
    let dir = temp("fault-nan-eval");
    let (_, run) = trained(&dir, "small");
    let step = pointer(&run, "latest").unwrap();
    let mut params = metagrad::data::store::read_safetensors(&step.join("params.safetensors")).unwrap();
    let head = params.get_mut("head.weight").unwrap();
    head.values = metagrad::data::store::Values::F32(vec![f32::NAN; head.shape.iter().product()]);
    let sorted: Vec<_> = params.into_iter().collect();
    metagrad::data::store::write_safetensors(&step.join("params.safetensors"), &sorted, &Default::default()).unwrap();
    let out = dir.join("eval.json");
    let e = err(&metagrad(&["eval", "--checkpoint", step.to_str().unwrap(), "--episodes", "5", "--backend", "cpu", "--out", out.to_str().unwrap()]));
    assert!(e.contains("diverged") && e.contains("NaN") && e.contains("earlier step folder"), "{e}");
    assert!(!out.exists(), "a failed evaluation wrote a result");
}

#[test]
fn a_kill_between_checkpoint_writes_resumes_from_the_newest_complete_step() {
    let dir = temp("fault-pointer");
    let (_, run) = trained(&dir, "small");
    // Killed after the step folder was renamed into place, before `latest`
    // was replaced: no pointer, a stray temporary, a half-written folder.
    std::fs::remove_file(run.join("latest")).unwrap();
    std::fs::write(run.join(".latest.tmp-999999"), "step-0000003\n").unwrap();
    std::fs::create_dir_all(run.join(".step-0000009.tmp-999999")).unwrap();
    std::fs::write(run.join(".step-0000009.tmp-999999/params.safetensors"), b"partial").unwrap();
    let out = metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=9"]);
    let text = ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("step-0000006 from step 6"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("finished after step 9"), "{text}");
    assert!(!run.join(".latest.tmp-999999").exists() && !run.join(".step-0000009.tmp-999999").exists(), "leftovers stay");
    assert!(pointer(&run, "latest").unwrap().ends_with("step-0000009"));
    // Nor may a fresh run start over the top of such a run.
    std::fs::remove_file(run.join("latest")).unwrap();
    let e = err(&metagrad(&["train", "--config", dir.join("small.toml").to_str().unwrap(), "--set", "run.name=small"]));
    assert!(e.contains("already has checkpoints") && e.contains("--resume small"), "{e}");
}

#[test]
fn corrupt_metrics_and_cache_are_named_or_rebuilt() {
    let dir = temp("fault-corrupt");
    let (_, run) = trained(&dir, "small");
    let step = pointer(&run, "latest").unwrap();
    std::fs::write(step.join("metrics.jsonl"), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let e = err(&metagrad(&["train", "--resume", step.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=9"]));
    assert!(e.contains("metrics.jsonl") && e.contains(step.to_str().unwrap()) && e.contains("older step folder"), "{e}");
    std::fs::write(run.join("metrics.jsonl"), [0xff, 0xfe]).unwrap();
    let e = err(&metagrad(&["plot", run.to_str().unwrap(), "--out", dir.join("c.png").to_str().unwrap()]));
    assert!(e.contains("metrics.jsonl"), "{e}");

    // A cache with one flipped byte is rebuilt, not used.
    use metagrad::data::cache::{CachedClass, load_or_build};
    let path = dir.join("cache.bin");
    let classes = vec![CachedClass { name: "a".into(), tag: 0, count: 2, pixels: (0..32).collect() }];
    let built = std::cell::Cell::new(0);
    let build = || {
        built.set(built.get() + 1);
        Ok(classes.clone())
    };
    assert_eq!(load_or_build(&path, 7, 16, build).unwrap(), classes);
    assert_eq!(load_or_build(&path, 7, 16, build).unwrap(), classes);
    assert_eq!(built.get(), 1, "an intact cache is used");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() - 20;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(load_or_build(&path, 7, 16, build).unwrap(), classes);
    assert_eq!(built.get(), 2, "a corrupted cache was trusted");
}

#[test]
fn impossible_requests_are_errors_that_say_what_to_change() {
    let dir = temp("fault-requests");
    let config = small_config(&dir, "");
    let c = config.to_str().unwrap();
    let e = err(&metagrad(&["train", "--config", c, "--quiet", "--set", "train.meta_batch=100000000"]));
    assert!(e.contains("GiB") && e.contains("lower train.meta_batch") && !e.contains("panicked"), "{e}");
    let e = err(&metagrad(&["train", "--config", c, "--quiet", "--set", "data.way=400"]));
    assert!(e.contains("400-way") && e.contains("data.way"), "{e}");
    // Resuming with settings that change the model or the task.
    ok(&metagrad(&["train", "--config", c, "--quiet"]));
    let run = dir.join("checkpoints/small");
    let e = err(&metagrad(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "data.queries=5"]));
    assert!(e.contains("data.queries = 3") && e.contains("data.queries = 5"), "{e}");
    // Each evaluation keeps its own file.
    for episodes in ["3", "4"] {
        ok(&metagrad(&["eval", "--checkpoint", run.to_str().unwrap(), "--episodes", episodes, "--backend", "cpu"]));
    }
    let best = pointer(&run, "best").unwrap();
    for name in ["eval-test-3ep-3steps-seed0.json", "eval-test-4ep-3steps-seed0.json"] {
        assert!(best.join(name).is_file(), "{name} missing in {}", best.display());
    }
    // --backend works on train as on every command that runs a model.
    let out = ok(&metagrad(&["train", "--config", c, "--quiet", "--backend", "cpu", "--set", "run.name=flag", "--set", "train.meta_steps=1"]));
    assert!(out.contains("finished after step 1"), "{out}");
}

#[test]
fn stopping_before_the_first_step_saves_nothing_and_says_so() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let dir = temp("fault-early-stop");
    let config = metagrad::train::config::Config::load(&small_config(&dir, ""), &[]).unwrap();
    let job = metagrad::train::TrainJob { config, resume: None, progress: false, stop: Arc::new(AtomicBool::new(true)), splits: None, task_batching: false };
    let selection = metagrad::autodiff::backend::Selection { kind: metagrad::autodiff::backend::BackendKind::Cpu, precision: metagrad::autodiff::tensor::Precision::F32 };
    let outcome = metagrad::autodiff::backend::dispatch(selection, job).unwrap();
    assert!(outcome.interrupted && outcome.latest.is_none() && outcome.step == 0);
    assert!(Checkpoint::read(&outcome.run_dir.join("step-0000000")).is_err());
}

#[test]
fn pruning_a_checkpoint_keeps_its_evaluations() {
    use metagrad::train::checkpoint::prune;
    let run = crate::common::fresh_dir("prune-evals");
    for step in ["step-0000003", "step-0000006", "step-0000009"] {
        std::fs::create_dir_all(run.join(step)).unwrap();
        std::fs::write(run.join(step).join("params.safetensors"), b"weights").unwrap();
    }
    std::fs::write(run.join("step-0000003/eval-test-600ep-3steps-seed0.json"), b"{\"accuracy\": 0.99}\n").unwrap();
    prune(&run, 1, &[]).unwrap();
    assert!(!run.join("step-0000003").exists() && !run.join("step-0000006").exists() && run.join("step-0000009").exists());
    let kept = run.join("evals/step-0000003-eval-test-600ep-3steps-seed0.json");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "{\"accuracy\": 0.99}\n", "the evaluation of a pruned checkpoint is lost");
}

#[test]
fn a_stop_signal_delivered_twice_at_once_still_writes_the_checkpoint() {
    // `timeout` sends SIGTERM to the process and then to its process group,
    // so the trainer receives it twice within microseconds: that is one
    // request to stop cleanly, not "Ctrl-C again".
    let dir = temp("fault-double-term");
    let config = small_config(&dir, "");
    let child = Command::new(env!("CARGO_BIN_EXE_metagrad"))
        .args(["train", "--config", config.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=100000", "--set", "checkpoint.every=0"])
        .env_remove("METAGRAD_BACKEND")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = dir.join("checkpoints/small");
    let started = std::time::Instant::now();
    // Stop once it has trained a step (before that, a stop saves nothing).
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(true, |m| m.is_empty()) && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid, &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(130), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("finishing this meta-iteration") && !stderr.contains("without a checkpoint"), "{stderr}");
    assert!(stdout.contains("stopped after step"), "{stdout}");
    // The checkpoint of the step it stopped at is there and complete.
    let latest = pointer(&run, "latest").unwrap();
    let step: usize = stdout.split("stopped after step ").nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
    assert_eq!(latest, run.join(format!("step-{step:07}")), "{stdout}");
    Checkpoint::read(&latest).unwrap();
}

#[test]
fn a_run_from_another_machine_reads_the_local_data_folder() {
    // A run trained where the data lived at a path that is not here (a
    // cloned results/runs/ folder): eval and resume read the default data
    // folder instead, and say so.
    let dir = temp("fault-moved-data");
    let config = small_config(&dir, "");
    let gone = dir.join("elsewhere/synthetic");
    ok(&metagrad(&["train", "--config", config.to_str().unwrap(), "--quiet", "--set", &format!("data.data_dir={}", gone.display())]));
    let run = dir.join("checkpoints/small");
    let local = dir.join("local-data");
    std::fs::create_dir_all(local.join("synthetic")).unwrap();
    let with_local = |args: &[&str]| metagrad_command(args).env("METAGRAD_DATA", &local).output().unwrap();
    let out = with_local(&["eval", "--checkpoint", run.to_str().unwrap(), "--episodes", "4", "--backend", "cpu", "--out", dir.join("e.json").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("is not on this machine") && stderr.contains("local-data"), "{stderr}");
    let out = with_local(&["train", "--resume", run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=7"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("is not on this machine"), "{stderr}");
    // The continued run records the local (default) folder from then on.
    let saved = Checkpoint::read(&pointer(&run, "latest").unwrap()).unwrap();
    assert_eq!((saved.state.step, saved.config.data.data_dir.as_str()), (7, ""));
    // Where neither folder exists, nothing is guessed: the recorded one stays.
    let mut moved = saved.config.clone();
    moved.data.data_dir = gone.display().to_string();
    std::fs::remove_dir_all(&local).unwrap();
    assert_eq!(moved.use_local_data_when_moved(), None);
    assert_eq!(moved.data.data_dir, gone.display().to_string());
}

#[test]
fn runs_says_where_each_run_stands() {
    let dir = temp("runs-status");
    let (config, run) = trained(&dir, "small");
    // A name longer than any fixed column: the columns still line up.
    let long = "a-run-whose-name-is-longer-than-forty-characters";
    ok(&metagrad(&["train", "--config", config.to_str().unwrap(), "--quiet", "--set", &format!("run.name={long}"), "--set", "train.meta_steps=9"]));
    let long_run = dir.join("checkpoints").join(long);
    ok(&metagrad(&["train", "--resume", long_run.to_str().unwrap(), "--quiet", "--set", "train.meta_steps=12"]));
    ok(&metagrad(&["eval", "--checkpoint", run.to_str().unwrap(), "--episodes", "4", "--backend", "cpu"]));
    let table = ok(&metagrad(&["runs", dir.join("checkpoints").to_str().unwrap()]));
    let line = |name: &str| table.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{table}")).to_string();
    assert!(line("small").contains("6 / 6") && line("small").ends_with("finished") && line("small").contains(" ± "), "{table}");
    assert!(line(long).contains("12 / 12"), "{table}");
    let mode_column = table.lines().next().unwrap().find(" mode").unwrap() + 1;
    for row in [line("small"), line(long)] {
        assert!(row[..mode_column].ends_with(' ') && row[mode_column..].starts_with("maml"), "columns out of line:\n{table}");
    }
    // Held by a process: the table names it.
    let lock = RunLock::acquire(&run).unwrap();
    let table = ok(&metagrad(&["runs", run.to_str().unwrap()]));
    assert!(table.contains(&format!("training (pid {})", std::process::id())), "{table}");
    drop(lock);
    let json: serde_json::Value = serde_json::from_str(&ok(&metagrad(&["runs", dir.join("checkpoints").to_str().unwrap(), "--json"]))).unwrap();
    let small = json.as_array().unwrap().iter().find(|r| r["run"].as_str().unwrap().ends_with("small")).unwrap();
    assert_eq!((small["step"].as_u64(), small["training_pid"].is_null(), small["test"]["step"].as_u64().is_some()), (Some(6), true, true), "{small}");
    let e = err(&metagrad(&["runs", dir.join("nowhere").to_str().unwrap()]));
    assert!(e.contains("cannot read the runs folder"), "{e}");
}
