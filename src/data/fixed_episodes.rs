//! Fixed benchmark episodes given as image folders, preprocessed as the
//! checkpoint's dataset is (`metagrad eval --episodes-from DIR`). Two layouts:
//!
//! - DIR/<episode>/support/<class>/*.png and DIR/<episode>/query/<class>/*.png
//!   (or DIR/support, DIR/query for one episode): any number of classes and
//!   images; labels follow the sorted class folder names.
//! - The one-shot classification runs that accompany the Omniglot archives
//!   (brendenlake/omniglot, all_runs.zip): DIR/runNN/training/classKK.png (one
//!   image per class), DIR/runNN/test/itemKK.png and DIR/runNN/class_labels.txt,
//!   whose lines pair a test item with its training image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::data::dataset::DatasetKind;
use crate::data::episode::{Episode, LabelledImages};

/// One episode read from a folder, with the name it is reported under.
pub struct FixedEpisode {
    pub name: String,
    pub episode: Episode,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    entries.sort();
    Ok(entries)
}

fn is_image(p: &Path) -> bool {
    p.extension().is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

/// One image file as the dataset's loader would store it (u8, CHW).
fn load_image(path: &Path, dataset: DatasetKind) -> Result<Vec<u8>> {
    let size = dataset.default_image_size() as u32;
    match dataset {
        DatasetKind::Omniglot | DatasetKind::Synthetic => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            crate::data::omniglot::decode(&path.display().to_string(), &bytes, size)
        }
        DatasetKind::MiniImagenet | DatasetKind::SyntheticRgb => crate::data::mini_imagenet::decode(path, size),
    }
}

/// Images of labelled files as one batch, pixels scaled to [0, 1] as the sampler does.
fn labelled(files: &[(PathBuf, usize)], dataset: DatasetKind) -> Result<LabelledImages> {
    let size = dataset.default_image_size();
    let channels = match dataset {
        DatasetKind::Omniglot | DatasetKind::Synthetic => 1,
        DatasetKind::MiniImagenet | DatasetKind::SyntheticRgb => 3,
    };
    let mut images = Vec::with_capacity(files.len() * channels * size * size);
    for (path, _) in files {
        images.extend(load_image(path, dataset)?.into_iter().map(|v| f32::from(v) / 255.0));
    }
    Ok(LabelledImages { images, shape: [files.len(), channels, size, size], labels: files.iter().map(|(_, l)| *l).collect() })
}

/// support/<class>/* and query/<class>/* under `dir`.
fn class_folders(dir: &Path, dataset: DatasetKind) -> Result<Episode> {
    let classes: Vec<String> = sorted_entries(&dir.join("support"))?
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    if classes.len() < 2 {
        bail!("{}/support holds {} class folder(s); an episode needs at least 2", dir.display(), classes.len());
    }
    let label_of: BTreeMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let files = |part: &str| -> Result<Vec<(PathBuf, usize)>> {
        let mut files = Vec::new();
        for class_dir in sorted_entries(&dir.join(part))?.into_iter().filter(|p| p.is_dir()) {
            let class = class_dir.file_name().unwrap().to_string_lossy().into_owned();
            let Some(&label) = label_of.get(class.as_str()) else {
                bail!("{}/{part}/{class} has no support images: every query class needs a support/{class} folder", dir.display());
            };
            files.extend(sorted_entries(&class_dir)?.into_iter().filter(|p| is_image(p)).map(|p| (p, label)));
        }
        if files.is_empty() {
            bail!("{}/{part} holds no images (png, jpg or bmp in one folder per class)", dir.display());
        }
        Ok(files)
    };
    let (support, query) = (files("support")?, files("query")?);
    if let Some(c) = classes.iter().enumerate().find(|(i, _)| !support.iter().any(|(_, l)| l == i)) {
        bail!("{}/support/{} holds no images", dir.display(), c.1);
    }
    Ok(Episode { way: classes.len(), support: labelled(&support, dataset)?, query: labelled(&query, dataset)? })
}

/// runNN/training, runNN/test and runNN/class_labels.txt (paths in it are
/// relative to the folder holding the run).
fn lake_run(dir: &Path, dataset: DatasetKind) -> Result<Episode> {
    let training: Vec<PathBuf> = sorted_entries(&dir.join("training"))?.into_iter().filter(|p| is_image(p)).collect();
    let label_of: BTreeMap<String, usize> =
        training.iter().enumerate().map(|(i, p)| (p.file_name().unwrap().to_string_lossy().into_owned(), i)).collect();
    let key = dir.join("class_labels.txt");
    let text = std::fs::read_to_string(&key).with_context(|| format!("cannot read {}", key.display()))?;
    let mut query = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (test, train) = line
            .split_once(char::is_whitespace)
            .with_context(|| format!("{} line {}: expected `<test image> <training image>`", key.display(), n + 1))?;
        let name = |p: &str| Path::new(p.trim()).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let label = *label_of
            .get(&name(train))
            .with_context(|| format!("{} line {}: {} is not in {}/training", key.display(), n + 1, train.trim(), dir.display()))?;
        query.push((dir.join("test").join(name(test)), label));
    }
    if query.is_empty() {
        bail!("{} pairs no test images with training images", key.display());
    }
    let support: Vec<(PathBuf, usize)> = training.into_iter().enumerate().map(|(i, p)| (p, i)).collect();
    Ok(Episode { way: support.len(), support: labelled(&support, dataset)?, query: labelled(&query, dataset)? })
}

/// Every episode under `dir` (or `dir` itself when it is one), in name order.
pub fn read(dir: &Path, dataset: DatasetKind) -> Result<Vec<FixedEpisode>> {
    let read_one = |d: &Path| -> Result<Option<Episode>> {
        if d.join("support").is_dir() {
            Ok(Some(class_folders(d, dataset)?))
        } else if d.join("class_labels.txt").is_file() {
            Ok(Some(lake_run(d, dataset)?))
        } else {
            Ok(None)
        }
    };
    if let Some(episode) = read_one(dir)? {
        return Ok(vec![FixedEpisode { name: dir.file_name().map_or_else(|| ".".into(), |n| n.to_string_lossy().into_owned()), episode }]);
    }
    let mut out = Vec::new();
    for sub in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
        if let Some(episode) = read_one(&sub)? {
            out.push(FixedEpisode { name: sub.file_name().unwrap().to_string_lossy().into_owned(), episode });
        }
    }
    if out.is_empty() {
        bail!(
            "{} holds no episodes: expected <episode>/support/<class>/*.png with <episode>/query/<class>/*.png, or Omniglot's one-shot runs (runNN/training, runNN/test, runNN/class_labels.txt)",
            dir.display()
        );
    }
    Ok(out)
}
