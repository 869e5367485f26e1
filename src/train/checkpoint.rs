//! Checkpoints: checkpoints/<run>/step-NNNNNNN/ holds everything a run needs
//! to continue exactly: parameters (safetensors, PyTorch names), Adam's
//! moments, the step, every RNG state, the mode's state (adaptive q), the
//! resolved config and the metrics so far. A checkpoint is written into a
//! temporary folder, each file fsynced, then renamed into place; the
//! `latest` and `best` pointers are small files replaced the same way.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::train::config::Config;
use crate::hypergrad::Mode;
use crate::data::store::{HostTensor, read_safetensors, write_atomic, write_safetensors};

pub const FORMAT: u32 = 1;
const PARAMS: &str = "params.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const CONFIG: &str = "config.toml";
const METRICS: &str = "metrics.jsonl";

/// A ChaCha8 stream position, exactly: seed, stream and word position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    /// u128, as a decimal string (JSON numbers stop at 2^53).
    pub word_pos: String,
}

impl RngState {
    pub fn of(rng: &ChaCha8Rng) -> Self {
        RngState {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        let bytes: Vec<u8> = (0..self.seed.len())
            .step_by(2)
            .map(|i| self.seed.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<_>>()
            .filter(|b: &Vec<u8>| b.len() == 32)
            .ok_or_else(|| anyhow::anyhow!("malformed RNG seed in the checkpoint"))?;
        let mut rng = ChaCha8Rng::from_seed(bytes.try_into().expect("32 bytes"));
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().context("malformed RNG position in the checkpoint")?);
        Ok(rng)
    }
}

/// Everything of a run that is not a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    /// Meta-iterations completed.
    pub step: usize,
    pub episode_rng: RngState,
    pub ufo_rng: RngState,
    /// The hypergradient mode with its state (adaptive q's moments).
    pub mode: Mode,
    /// Adam's step counter.
    pub adam_time: usize,
    pub best_step: Option<usize>,
    pub best_val_accuracy: Option<f64>,
    /// Training time so far, seconds.
    pub elapsed_s: f64,
}

/// One checkpoint in memory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub config: Config,
    pub state: TrainState,
    pub params: BTreeMap<String, HostTensor>,
    pub optimizer: BTreeMap<String, HostTensor>,
    /// The metrics log up to this step (JSON lines).
    pub metrics: String,
}

pub fn step_name(step: usize) -> String {
    format!("step-{step:07}")
}

impl Checkpoint {
    /// Write as run_dir/step-NNNNNNN (atomically) and point `latest` at it.
    pub fn write(&self, run_dir: &Path) -> Result<PathBuf> {
        let name = step_name(self.state.step);
        let dir = run_dir.join(&name);
        let tmp = run_dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let sorted = |m: &BTreeMap<String, HostTensor>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>();
        write_safetensors(&tmp.join(PARAMS), &sorted(&self.params), &meta)?;
        write_safetensors(&tmp.join(OPTIMIZER), &sorted(&self.optimizer), &meta)?;
        write_atomic(&tmp.join(STATE), serde_json::to_string_pretty(&self.state)?.as_bytes())?;
        write_atomic(&tmp.join(CONFIG), self.config.to_toml().as_bytes())?;
        write_atomic(&tmp.join(METRICS), self.metrics.as_bytes())?;
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot replace {}", dir.display()))?;
        }
        fs::rename(&tmp, &dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        if let Ok(d) = fs::File::open(run_dir) {
            let _ = d.sync_all();
        }
        set_pointer(run_dir, "latest", &name)?;
        Ok(dir)
    }

    /// Read a checkpoint folder, naming the file that is missing or broken.
    pub fn read(dir: &Path) -> Result<Checkpoint> {
        let (config, state) = Checkpoint::read_config_and_state(dir)?;
        let params = read_safetensors(&checkpoint_file(dir, PARAMS)?).with_context(|| format!("checkpoint {}: {REREAD_HINT}", dir.display()))?;
        let optimizer = read_safetensors(&checkpoint_file(dir, OPTIMIZER)?).with_context(|| format!("checkpoint {}: {REREAD_HINT}", dir.display()))?;
        let metrics = fs::read_to_string(checkpoint_file(dir, METRICS)?)
            .with_context(|| format!("checkpoint {}: {METRICS} is corrupt (not UTF-8 text); {REREAD_HINT}", dir.display()))?;
        Ok(Checkpoint { config, state, params, optimizer, metrics })
    }

    /// A checkpoint's config and training state alone (where it stands,
    /// without loading its tensors), with `read`'s checks and messages.
    pub fn read_config_and_state(dir: &Path) -> Result<(Config, TrainState)> {
        let state: TrainState = serde_json::from_slice(&fs::read(checkpoint_file(dir, STATE)?)?)
            .with_context(|| format!("checkpoint {}: {STATE} is corrupt or truncated; {REREAD_HINT}", dir.display()))?;
        if state.format != FORMAT {
            bail!("checkpoint {} has format {}, this metagrad reads format {FORMAT}", dir.display(), state.format);
        }
        let config = Config::load(&checkpoint_file(dir, CONFIG)?, &[]).with_context(|| format!("checkpoint {}: {CONFIG} is unreadable; {REREAD_HINT}", dir.display()))?;
        Ok((config, state))
    }
}

const REREAD_HINT: &str = "use an older step folder next to it instead";

/// `dir/name`, or an error saying the checkpoint is incomplete.
fn checkpoint_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() { Ok(p) } else { bail!("checkpoint {} is incomplete: {name} is missing; {REREAD_HINT}", dir.display()) }
}

/// Replace the pointer file `run_dir/<which>` (latest or best) atomically.
pub fn set_pointer(run_dir: &Path, which: &str, name: &str) -> Result<()> {
    write_atomic(&run_dir.join(which), format!("{name}\n").as_bytes())
}

/// The checkpoint folder a pointer names, if it exists.
pub fn pointer(run_dir: &Path, which: &str) -> Option<PathBuf> {
    let name = fs::read_to_string(run_dir.join(which)).ok()?;
    let dir = run_dir.join(name.trim());
    dir.is_dir().then_some(dir)
}

/// The newest complete step folder of a run (one with its state written
/// last), whatever `latest` says: a process killed between renaming a step
/// folder into place and updating `latest` leaves exactly this case.
pub fn newest_step(run_dir: &Path) -> Option<PathBuf> {
    let mut steps: Vec<PathBuf> = fs::read_dir(run_dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .map(|e| e.path())
        .filter(|p| p.join(STATE).is_file())
        .collect();
    steps.sort();
    steps.pop()
}

/// The checkpoint a run continues from: what `latest` names, or the newest
/// complete step folder when `latest` is missing or names none. (A newer
/// folder than `latest` may also be an abandoned branch, after a resume from
/// an older step, so `latest` wins when it is valid.)
pub fn latest_of(run_dir: &Path) -> Option<PathBuf> {
    pointer(run_dir, "latest").filter(|d| d.join(STATE).is_file()).or_else(|| newest_step(run_dir))
}

/// The run folder a checkpoint folder belongs to: the folder that holds it.
pub fn run_dir_of(checkpoint_dir: &Path) -> PathBuf {
    let absolute = std::path::absolute(checkpoint_dir).unwrap_or_else(|_| checkpoint_dir.to_path_buf());
    absolute.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A checkpoint folder from what the user typed: a checkpoint folder, a run
/// folder or a run name (their `latest`), or, with nothing, `default_run`'s latest.
pub fn resolve(arg: Option<&str>, checkpoint_root: &Path, default_run: &Path) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match arg {
        None => vec![default_run.to_path_buf()],
        Some(a) => vec![PathBuf::from(a), checkpoint_root.join(a)],
    };
    for c in &candidates {
        if c.join(STATE).is_file() {
            return Ok(c.clone());
        }
        if let Some(dir) = latest_of(c) {
            return Ok(dir);
        }
        if c.join("latest").is_file() {
            bail!("{}/latest names a checkpoint folder that does not exist, and the run has no complete step folder", c.display());
        }
    }
    bail!(
        "no checkpoint to resume at {}: expected a step folder (with {STATE}) or a run folder with a `latest` pointer under {}",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(" or "),
        checkpoint_root.display()
    )
}

/// Delete all but the newest `keep` step folders, never the ones in `protect`;
/// also clears temporary folders left by an interrupted write. Evaluations
/// of a pruned checkpoint (`metagrad eval`'s JSON files) are results, not
/// checkpoint state: they move to `<run>/evals/<step>-<file>` first.
pub fn prune(run_dir: &Path, keep: usize, protect: &[PathBuf]) -> Result<()> {
    let mut steps = Vec::new();
    for entry in fs::read_dir(run_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover = name.starts_with(".step-") || name.starts_with(".latest.tmp-") || name.starts_with(".best.tmp-");
        if leftover && !name.ends_with(&format!("tmp-{}", std::process::id())) {
            // Another process's temporary: only the lock holder writes here, so it is dead.
            let _ = fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
        } else if name.starts_with("step-") {
            steps.push(entry.path());
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for dir in steps.into_iter().take(excess) {
        if !protect.contains(&dir) {
            keep_evaluations(&dir, run_dir)?;
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove the old checkpoint {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Move a step folder's evaluation records to `<run>/evals/`.
fn keep_evaluations(step_dir: &Path, run_dir: &Path) -> Result<()> {
    let step = step_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for entry in fs::read_dir(step_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("eval-") && name.ends_with(".json") {
            let evals = run_dir.join("evals");
            fs::create_dir_all(&evals).with_context(|| format!("cannot create {}", evals.display()))?;
            let to = evals.join(format!("{step}-{name}"));
            fs::rename(entry.path(), &to).with_context(|| format!("cannot keep the evaluation {} as {}", entry.path().display(), to.display()))?;
        }
    }
    Ok(())
}

/// Exclusive ownership of a run folder for the life of a training process:
/// an advisory lock on `<run>/lock` (released by the OS when the process
/// ends, however it ends), with the owner's pid written inside for the
/// message another process gets.
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    /// The pid of the process that holds `run_dir`'s lock now, if one does.
    /// (Probing takes the lock for an instant when it is free.)
    pub fn owner(run_dir: &Path) -> Option<String> {
        use std::io::Read;
        let mut file = fs::OpenOptions::new().read(true).write(true).open(run_dir.join("lock")).ok()?;
        match file.try_lock() {
            Err(fs::TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                Some(owner.trim().to_string())
            }
            _ => None,
        }
    }

    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        fs::create_dir_all(run_dir).with_context(|| format!("cannot create the run folder {}", run_dir.display()))?;
        let path = run_dir.join("lock");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the run lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)?;
                file.seek(std::io::SeekFrom::Start(0))?;
                write!(file, "{}", std::process::id())?;
                Ok(RunLock { _file: file })
            }
            Err(fs::TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                bail!(
                    "run {} is being trained by another metagrad process (pid {}); wait for it to finish or stop it (Ctrl-C, or kill {}) before training this run again",
                    run_dir.display(),
                    owner.trim(),
                    owner.trim()
                )
            }
            Err(fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
    }
}
