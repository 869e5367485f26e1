//! Files: safetensors tensors (readable by `safetensors.torch.load_file`)
//! and atomic writes, so an interrupted write never leaves a half file under
//! the final name.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::backend::tensor::Device;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::autodiff::tensor::{Level, Precision, Tensor};

/// Write `bytes` to `path` through a temporary file in the same directory,
/// fsync it, rename it over the target, then fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    fs::create_dir_all(&dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Move a fully written temporary file to its final name: fsync it, rename,
/// fsync the directory, so the final name never holds a partial file.
pub fn commit_file(tmp: &Path, path: &Path) -> Result<()> {
    File::open(tmp).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", tmp.display()))?;
    fs::rename(tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Host-side tensor values in one of the dtypes metagrad writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Values,
}

impl HostTensor {
    pub fn from_tensor<B: Level>(t: &Tensor<B>) -> Self {
        let shape = t.dims();
        let values = t.to_vec();
        let values = match t.precision() {
            Precision::F64 => Values::F64(values),
            Precision::F32 => Values::F32(values.iter().map(|&v| v as f32).collect()),
        };
        HostTensor { shape, values }
    }

    pub fn to_f64(&self) -> Vec<f64> {
        match &self.values {
            Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Values::F64(v) => v.clone(),
            Values::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    pub fn to_tensor<B: Level>(&self, precision: Precision, device: &Device<B>) -> Tensor<B> {
        Tensor::from_f64(&self.to_f64(), &self.shape, precision, device)
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.values {
            Values::F32(_) => "f32",
            Values::F64(_) => "f64",
            Values::I64(_) => "i64",
        }
    }
}

fn to_bytes(values: &Values) -> (Dtype, Vec<u8>) {
    match values {
        Values::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Values::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Values::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    }
}

/// Write named tensors as one safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = to_bytes(&t.values);
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .with_context(|| format!("tensor '{name}' has {} bytes for shape {shape:?}", bytes.len()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(metadata))
        .with_context(|| format!("cannot encode {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Read every tensor of a safetensors file (f32, f64 or i64).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({e}); it may be truncated or of another format: write it again",
            path.display()
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => Values::F32(data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::F64 => Values::F64(data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::I64 => Values::I64(data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            other => bail!("{}: tensor '{name}' has dtype {other:?}; metagrad reads f32, f64 and i64", path.display()),
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), values });
    }
    Ok(out)
}
