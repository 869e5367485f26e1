//! Few-shot episodes on the host, and their safetensors form: `support_x`
//! (f32, [N·K, C, H, W]), `support_y` (i64, [N·K], labels 0..N−1), `query_x`,
//! `query_y`, readable by `safetensors.torch.load_file`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::data::store::{HostTensor, Values, read_safetensors, write_safetensors};
use crate::data::task::{Examples, Task};

/// Images [n, C, H, W] in f32 and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelledImages {
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub labels: Vec<usize>,
}

impl LabelledImages {
    /// The images as classified examples over `classes` classes.
    pub fn to_examples(&self, classes: usize) -> Examples {
        self.clone().into_examples(classes)
    }

    pub fn into_examples(self, classes: usize) -> Examples {
        Examples::classified(self.images, self.shape.to_vec(), self.labels, classes)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Episode {
    pub way: usize,
    pub support: LabelledImages,
    pub query: LabelledImages,
}

impl Episode {
    /// The episode as a task of `way`-class examples.
    pub fn task(&self) -> Task {
        self.clone().into_task()
    }

    /// The episode as a task, without copying its images.
    pub fn into_task(self) -> Task {
        Task { support: self.support.into_examples(self.way), query: self.query.into_examples(self.way) }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let part = |p: &LabelledImages| {
            (
                HostTensor { shape: p.shape.to_vec(), values: Values::F32(p.images.clone()) },
                HostTensor { shape: vec![p.labels.len()], values: Values::I64(p.labels.iter().map(|&l| l as i64).collect()) },
            )
        };
        let (sx, sy) = part(&self.support);
        let (qx, qy) = part(&self.query);
        let tensors = vec![
            ("support_x".to_string(), sx),
            ("support_y".to_string(), sy),
            ("query_x".to_string(), qx),
            ("query_y".to_string(), qy),
        ];
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string()), ("way".to_string(), self.way.to_string())]);
        write_safetensors(path, &tensors, &metadata)
    }

    /// Read and validate an episode file; the way is the number of distinct
    /// support labels, which must be exactly 0..way−1.
    pub fn read(path: &Path) -> Result<Episode> {
        let source = path.display().to_string();
        let mut tensors = read_safetensors(path)?;
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .with_context(|| format!("{source}: tensor '{name}' is missing; an episode holds support_x, support_y, query_x and query_y"))
        };
        let (sx, sy, qx, qy) = (take("support_x")?, take("support_y")?, take("query_x")?, take("query_y")?);
        let support = labelled(&source, "support", sx, sy)?;
        let query = labelled(&source, "query", qx, qy)?;
        let way = support.labels.iter().max().map_or(0, |m| m + 1);
        if way < 2 || (0..way).any(|c| !support.labels.contains(&c)) {
            bail!("{source}: support labels {:?} must cover every class 0..N−1 of an N-way task (N ≥ 2)", support.labels);
        }
        if let Some(bad) = query.labels.iter().find(|&&l| l >= way) {
            bail!("{source}: query label {bad} is outside the support's classes 0..{}", way - 1);
        }
        if support.shape[1..] != query.shape[1..] {
            bail!("{source}: support images {:?} and query images {:?} differ in shape", &support.shape[1..], &query.shape[1..]);
        }
        Ok(Episode { way, support, query })
    }
}

fn labelled(source: &str, part: &str, x: HostTensor, y: HostTensor) -> Result<LabelledImages> {
    let shape: [usize; 4] = x
        .shape
        .clone()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{source}: {part}_x has shape {:?}; expected [n, C, H, W]", x.shape))?;
    let images: Vec<f32> = match x.values {
        Values::F32(v) => v,
        Values::F64(v) => v.iter().map(|&a| a as f32).collect(),
        Values::I64(_) => bail!("{source}: {part}_x must be float images, found i64"),
    };
    let labels = match y.values {
        Values::I64(v) if y.shape == [shape[0]] => v,
        Values::I64(_) => bail!("{source}: {part}_y has shape {:?}; expected [{}], one label per image", y.shape, shape[0]),
        _ => bail!("{source}: {part}_y must hold i64 labels"),
    };
    if shape[0] == 0 {
        bail!("{source}: the {part} set is empty");
    }
    let labels = labels
        .into_iter()
        .map(|l| usize::try_from(l).map_err(|_| anyhow::anyhow!("{source}: {part}_y has a negative label {l}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(LabelledImages { images, shape, labels })
}
