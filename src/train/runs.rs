//! Where each run stands (`metagrad runs`): how far it was trained, its best
//! validation, its test result, its training time, and whether a process is
//! training it now. Read from the run folders alone, so it works on runs
//! copied from other machines.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::train::checkpoint::{Checkpoint, RunLock, pointer};
use crate::train::config::InnerParams;
use crate::train::metrics::Metrics;

/// One run folder's state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunStatus {
    pub run: PathBuf,
    pub mode: String,
    pub dataset: String,
    pub way: usize,
    pub shot: usize,
    pub step: usize,
    pub meta_steps: usize,
    pub wall_s: f64,
    /// The best validation accuracy and its step.
    pub best: Option<Scored>,
    /// The run's headline test result (<run>/eval.json) and the step it evaluated.
    pub test: Option<Scored>,
    /// The pid of the process training it now (step and wall_s are then
    /// its latest meta-iteration, which may be past the latest checkpoint).
    pub training_pid: Option<String>,
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Scored {
    pub step: usize,
    pub accuracy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci95: Option<f64>,
}

impl RunStatus {
    /// The state of the run in `run` (a folder with a `latest` pointer).
    pub fn read(run: &Path) -> Result<RunStatus> {
        let latest = pointer(run, "latest").with_context(|| format!("{} has no latest checkpoint", run.display()))?;
        let (config, state) = Checkpoint::read_config_and_state(&latest)?;
        let test = std::fs::read_to_string(run.join("eval.json")).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).and_then(|v| {
            Some(Scored { step: v["step"].as_u64()? as usize, accuracy: v["accuracy"].as_f64()?, ci95: v["ci95"].as_f64() })
        });
        let training_pid = RunLock::owner(run);
        // A run being trained is ahead of its latest checkpoint: its log says where.
        let live = training_pid.as_ref().and_then(|_| last_train_record(run));
        Ok(RunStatus {
            run: run.to_path_buf(),
            mode: match config.train.inner_params {
                InnerParams::All => config.mode.name.to_string(),
                InnerParams::Head => format!("{}, head only", config.mode.name),
            },
            dataset: config.data.dataset.name().to_string(),
            way: config.data.way,
            shot: config.data.shot,
            step: live.as_ref().map_or(state.step, |m| m.step),
            meta_steps: config.train.meta_steps,
            wall_s: live.as_ref().map_or(state.elapsed_s, |m| m.elapsed_s),
            best: state.best_step.zip(state.best_val_accuracy).map(|(step, accuracy)| Scored { step, accuracy, ci95: None }),
            test,
            training_pid,
        })
    }

    /// training (pid), finished, or paused.
    pub fn activity(&self) -> String {
        match &self.training_pid {
            Some(pid) => format!("training (pid {pid})"),
            None if self.step >= self.meta_steps => "finished".into(),
            None => "paused".into(),
        }
    }
}

fn last_train_record(run: &Path) -> Option<Metrics> {
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
    log.lines().rev().filter_map(|l| serde_json::from_str::<Metrics>(l).ok()).find(|m| m.split == "train")
}

/// Every run directly under `root`, by name (folders without checkpoints are skipped).
pub fn runs_under(root: &Path) -> Result<Vec<RunStatus>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read the runs folder {}", root.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("latest").is_file())
        .collect();
    dirs.sort();
    dirs.iter().map(|d| RunStatus::read(d)).collect()
}
