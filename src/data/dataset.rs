//! Which dataset, where it lives, and how to load one of its splits: the one
//! place the CLI, the trainer and the benchmarks turn a dataset name into
//! classes of images.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::Split;
use crate::data::{mini_imagenet, omniglot, synthetic};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Synthetic,
    SyntheticRgb,
    Omniglot,
    MiniImagenet,
}

impl DatasetKind {
    pub const NAMES: &str = "synthetic, synthetic-rgb, omniglot, mini-imagenet";

    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Synthetic => "synthetic",
            DatasetKind::SyntheticRgb => "synthetic-rgb",
            DatasetKind::Omniglot => "omniglot",
            DatasetKind::MiniImagenet => "mini-imagenet",
        }
    }

    /// Image side length the standard Conv-4 expects.
    pub fn default_image_size(self) -> usize {
        match self {
            DatasetKind::Synthetic => synthetic::IMAGE_SIZE,
            DatasetKind::SyntheticRgb => synthetic::RGB_IMAGE_SIZE,
            DatasetKind::Omniglot => 28,
            DatasetKind::MiniImagenet => mini_imagenet::IMAGE_SIZE,
        }
    }
}

impl std::str::FromStr for DatasetKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "synthetic" => DatasetKind::Synthetic,
            "synthetic-rgb" => DatasetKind::SyntheticRgb,
            "omniglot" => DatasetKind::Omniglot,
            "mini-imagenet" | "miniimagenet" => DatasetKind::MiniImagenet,
            other => bail!("unknown dataset '{other}': expected one of {}", DatasetKind::NAMES),
        })
    }
}

/// The dataset root: `--data-dir`, else $METAGRAD_DATA/<name>, else datasets/<name>.
pub fn resolve_data_dir(kind: DatasetKind, flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    let base = std::env::var_os("METAGRAD_DATA").map_or_else(|| PathBuf::from("datasets"), PathBuf::from);
    base.join(kind.name())
}

/// Everything that decides which images a split holds.
#[derive(Clone, Debug)]
pub struct DatasetSpec {
    pub kind: DatasetKind,
    pub data_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Omniglot: vinyals or lake.
    pub split_scheme: String,
    /// Omniglot: rotations by 90/180/270 degrees as extra classes.
    pub rotations: bool,
    pub image_size: usize,
    /// Seeds the synthetic dataset and the Vinyals character shuffle.
    pub seed: u64,
}

impl DatasetSpec {
    /// The standard settings for `kind`, reading from `data_dir` (or the default root).
    pub fn standard(kind: DatasetKind, data_dir: Option<&Path>) -> Self {
        DatasetSpec {
            kind,
            data_dir: resolve_data_dir(kind, data_dir),
            cache_dir: crate::data::cache::default_dir(),
            split_scheme: "vinyals".to_string(),
            rotations: true,
            image_size: kind.default_image_size(),
            seed: 0,
        }
    }

    pub fn load_split(&self, which: &str) -> Result<Split> {
        match self.kind {
            DatasetKind::Synthetic | DatasetKind::SyntheticRgb => {
                let size = self.kind.default_image_size();
                if self.image_size != size {
                    bail!("the {} dataset has {size}×{size} images; image_size = {} is not available", self.kind.name(), self.image_size);
                }
                synthetic::split(which, self.seed, self.kind == DatasetKind::SyntheticRgb)
            }
            DatasetKind::Omniglot => {
                check_dir(&self.data_dir, self.kind)?;
                let characters = omniglot::load_characters(&self.data_dir, &self.cache_dir, self.image_size)?;
                omniglot::split(&characters, &self.split_scheme, which, self.seed, self.rotations)
            }
            DatasetKind::MiniImagenet => {
                check_dir(&self.data_dir, self.kind)?;
                mini_imagenet::load_split(&self.data_dir, &self.cache_dir, which, self.image_size)
            }
        }
    }

    /// The splits this dataset has under its settings.
    pub fn split_names(&self) -> &'static [&'static str] {
        if self.kind == DatasetKind::Omniglot && self.split_scheme == "lake" { &["train", "test"] } else { &["train", "val", "test"] }
    }

    /// A human-readable summary: source, then classes and images per split.
    pub fn info(&self) -> Result<String> {
        let mut out = String::new();
        match self.kind {
            DatasetKind::Synthetic | DatasetKind::SyntheticRgb => {
                let shape = if self.kind == DatasetKind::Synthetic { "grey, 1×28×28" } else { "coloured, 3×84×84 (Mini-ImageNet's shape)" };
                out.push_str(&format!("{} (embedded, seed {}): procedural glyphs, {shape}\n", self.kind.name(), self.seed));
                for which in self.split_names() {
                    out.push_str(&split_line(which, &self.load_split(which)?));
                }
            }
            DatasetKind::Omniglot => {
                check_dir(&self.data_dir, self.kind)?;
                let characters = omniglot::load_characters(&self.data_dir, &self.cache_dir, self.image_size)?;
                let count = |bg: bool| characters.iter().filter(move |c| c.background == bg);
                let alphabets = |bg: bool| count(bg).map(|c| c.name.split('/').next().unwrap_or("")).collect::<std::collections::BTreeSet<_>>().len();
                let images: usize = characters.iter().map(|c| c.count).sum();
                out.push_str(&format!(
                    "omniglot at {}: {} characters, {images} images ({}×{} after resize)\n  background: {} alphabets, {} characters\n  evaluation: {} alphabets, {} characters\n",
                    self.data_dir.display(),
                    characters.len(),
                    self.image_size,
                    self.image_size,
                    alphabets(true),
                    count(true).count(),
                    alphabets(false),
                    count(false).count()
                ));
                out.push_str(&format!("  split scheme {}, rotations {}:\n", self.split_scheme, if self.rotations { "on (4 classes per character)" } else { "off" }));
                // Split the characters loaded above rather than reading the cache once per split.
                for which in self.split_names() {
                    out.push_str(&split_line(which, &omniglot::split(&characters, &self.split_scheme, which, self.seed, self.rotations)?));
                }
            }
            DatasetKind::MiniImagenet => {
                check_dir(&self.data_dir, self.kind)?;
                out.push_str(&format!("mini-imagenet at {}:\n", self.data_dir.display()));
                for which in mini_imagenet::SPLITS {
                    let (classes, listed, present) = mini_imagenet::image_counts(&self.data_dir, which)?;
                    out.push_str(&format!(
                        "  {which:5}: {classes} classes, {listed} images listed, {present} present in {}\n",
                        self.data_dir.join("images").display()
                    ));
                }
            }
        }
        Ok(out)
    }
}

fn split_line(which: &str, split: &Split) -> String {
    format!("  {which:5}: {} classes, {} images\n", split.classes.len(), split.image_count())
}

fn check_dir(dir: &Path, kind: DatasetKind) -> Result<()> {
    let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none());
    match empty {
        Err(_) => bail!(
            "the {} dataset directory {} does not exist; run `metagrad data fetch {} --data-dir {}`, or point --data-dir (or METAGRAD_DATA) at where it is",
            kind.name(),
            dir.display(),
            kind.name(),
            dir.display()
        ),
        Ok(true) => bail!(
            "the {} dataset directory {} is empty; run `metagrad data fetch {} --data-dir {}` to fill it",
            kind.name(),
            dir.display(),
            kind.name(),
            dir.display()
        ),
        Ok(false) => Ok(()),
    }
}
