//! Starting or continuing a run: which config, which checkpoint, and the
//! checks that keep a resumed run on its own model, task and folder.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::train::checkpoint::{self, Checkpoint};
use crate::train::config::Config;

/// The config `metagrad train` uses without `--config`.
pub const DEFAULT_CONFIG: &str = "configs/omniglot-5way-1shot.toml";

/// The default config: configs/omniglot-5way-1shot.toml when it is there,
/// else the copy built into the binary (so training works from any folder).
pub fn default_config(overrides: &[String]) -> Result<Config> {
    let path = Path::new(DEFAULT_CONFIG);
    if path.is_file() {
        Config::load(path, overrides)
    } else {
        Config::parse(include_str!("../../configs/omniglot-5way-1shot.toml"), overrides, "the built-in omniglot-5way-1shot config")
    }
}

/// What to train: a config file (or the default) with overrides, optionally
/// continuing a run, and a last adjustment of the config (backend flags).
pub struct RunRequest<'a> {
    pub config: Option<&'a Path>,
    pub overrides: &'a [String],
    /// None: a new run. Some(""): the config's own run. Else a run name, run
    /// folder or step folder.
    pub resume: Option<&'a str>,
    pub adjust: &'a dyn Fn(&mut Config),
}

/// The config to train with and the checkpoint to continue from, if any.
pub fn prepare_run(request: &RunRequest) -> Result<(Config, Option<Checkpoint>)> {
    let fresh = request.config.map(|p| Config::load(p, request.overrides)).transpose()?;
    match request.resume {
        None => {
            let mut config = match fresh {
                Some(c) => c,
                None => default_config(request.overrides)?,
            };
            (request.adjust)(&mut config);
            if checkpoint::latest_of(&config.run_dir()).is_some() {
                bail!(
                    "run '{}' already has checkpoints in {}; continue it with --resume {}, or start another with --set run.name=<new name>",
                    config.run.name,
                    config.run_dir().display(),
                    config.run.name
                );
            }
            Ok((config, None))
        }
        Some(arg) => {
            let reference = match &fresh {
                Some(c) => c.clone(),
                None => default_config(&[])?,
            };
            let root = PathBuf::from(&reference.checkpoint.dir);
            let dir = checkpoint::resolve((!arg.is_empty()).then_some(arg), &root, &reference.run_dir())?;
            let saved = Checkpoint::read(&dir)?;
            let mut config = match fresh {
                Some(c) => c,
                None => Config::parse(&saved.config.to_toml(), request.overrides, &format!("{}/config.toml", dir.display()))?,
            };
            (request.adjust)(&mut config);
            if let Some(note) = config.use_local_data_when_moved() {
                eprintln!("{note}");
            }
            continue_in_place(&mut config, &saved, &dir)?;
            Ok((config, Some(saved)))
        }
    }
}

/// Refuse a config that changes the model or the task of the run being
/// resumed, and point the config at the checkpoint's own run folder: a
/// copied or moved run never writes into the original.
fn continue_in_place(config: &mut Config, saved: &Checkpoint, dir: &Path) -> Result<()> {
    if let Some((key, saved_value, value)) = saved.config.identity_differences(config).into_iter().next() {
        bail!(
            "cannot resume {}: it was trained with {key} = {saved_value}, but the config asks for {key} = {value}, which changes the model or the task; resume with the run's own value (leave out --config, or --set {key}={saved_value}), or start a new run",
            dir.display()
        );
    }
    let run_dir = checkpoint::run_dir_of(dir);
    config.run.name = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| config.run.name.clone());
    config.checkpoint.dir = run_dir.parent().map_or_else(|| ".".to_string(), |p| p.display().to_string());
    Ok(())
}

/// The checkpoint `metagrad eval --checkpoint ARG` means: a step folder, or a
/// run (name or folder): its best checkpoint, else its latest.
pub fn eval_checkpoint(arg: &str, checkpoint_root: &Path) -> Result<PathBuf> {
    let given = PathBuf::from(arg);
    let run = if given.is_dir() { given } else { checkpoint_root.join(arg) };
    if run.join("state.json").is_file() {
        Ok(run)
    } else if let Some(best) = checkpoint::pointer(&run, "best") {
        Ok(best)
    } else {
        checkpoint::resolve(Some(arg), checkpoint_root, &run)
    }
}
