//! Named parameters: a model's tensors with their (PyTorch) names, and their
//! host form for safetensors files and checkpoints.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use burn::backend::tensor::Device;

use crate::autodiff::tensor::{Level, Precision, Tensor};
use crate::data::store::{HostTensor, Values, read_safetensors, write_safetensors};
use crate::models::FunctionalModel;

/// A model's parameters in its order, each with its name.
pub struct Params<B: Level> {
    names: Arc<[String]>,
    tensors: Vec<Tensor<B>>,
}

impl<B: Level> Clone for Params<B> {
    fn clone(&self) -> Self {
        Params { names: self.names.clone(), tensors: self.tensors.clone() }
    }
}

impl<B: Level> std::fmt::Debug for Params<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.named().map(|(n, t)| (n, t.dims()))).finish()
    }
}

impl<'a, B: Level> IntoIterator for &'a Params<B> {
    type Item = &'a Tensor<B>;
    type IntoIter = std::slice::Iter<'a, Tensor<B>>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.iter()
    }
}

/// The tensors, in the model's order: what estimators and `forward` take.
impl<B: Level> std::ops::Deref for Params<B> {
    type Target = [Tensor<B>];
    fn deref(&self) -> &[Tensor<B>] {
        &self.tensors
    }
}

impl<B: Level> Params<B> {
    pub fn new(names: Vec<String>, tensors: Vec<Tensor<B>>) -> Self {
        assert_eq!(names.len(), tensors.len(), "params: {} names for {} tensors", names.len(), tensors.len());
        Params { names: names.into(), tensors }
    }

    /// The same names with other tensors (fast weights, gradients).
    pub fn with_tensors(&self, tensors: Vec<Tensor<B>>) -> Self {
        assert_eq!(tensors.len(), self.names.len(), "params: {} tensors for {} names", tensors.len(), self.names.len());
        Params { names: self.names.clone(), tensors }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn tensors(&self) -> &[Tensor<B>] {
        &self.tensors
    }

    pub fn into_tensors(self) -> Vec<Tensor<B>> {
        self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&Tensor<B>> {
        self.names.iter().position(|n| n == name).map(|i| &self.tensors[i])
    }

    /// (name, tensor) pairs in the model's order.
    pub fn named(&self) -> impl Iterator<Item = (&str, &Tensor<B>)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Every tensor as a named host tensor (reads the values back).
    pub fn to_host(&self) -> Vec<(String, HostTensor)> {
        self.named().map(|(n, t)| (n.to_string(), HostTensor::from_tensor(t))).collect()
    }

    /// A model's parameters from named host tensors, checked against it.
    pub fn from_host(
        model: &impl FunctionalModel,
        tensors: &BTreeMap<String, HostTensor>,
        source: &str,
        precision: Precision,
        device: &Device<B>,
    ) -> Result<Self> {
        check_params(model, tensors, source)?;
        let names: Vec<String> = model.parameter_shapes().into_iter().map(|(n, _)| n).collect();
        let values = names.iter().map(|n| tensors[n].to_tensor(precision, device)).collect();
        Ok(Params::new(names, values))
    }
}

/// Check named host tensors against a model: every parameter present with
/// its shape, nothing extra. Errors name the parameter and both shapes.
pub fn check_params(model: &impl FunctionalModel, tensors: &BTreeMap<String, HostTensor>, source: &str) -> Result<()> {
    let expected = model.parameter_shapes();
    let describe = model.describe();
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => bail!("{source}: parameter '{name}' (shape {shape:?}) is missing; expected {describe}"),
            Some(t) if &t.shape != shape => bail!(
                "{source}: parameter '{name}' has shape {:?} but {describe} needs {shape:?}; the file was made for another architecture or way",
                t.shape
            ),
            Some(t) if matches!(t.values, Values::I64(_)) => {
                bail!("{source}: parameter '{name}' has dtype {}; parameters must be f32 or f64", t.dtype_name())
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.iter().any(|(n, _)| n == *k)) {
        bail!("{source}: unexpected parameter '{extra}', which {describe} does not have");
    }
    Ok(())
}

/// Save a model's parameters with their names and layouts (a safetensors
/// file PyTorch reads), with the model's own metadata.
pub fn save_params<B: Level>(path: &Path, model: &impl FunctionalModel, params: &Params<B>) -> Result<()> {
    let mut metadata = model.metadata();
    metadata.insert("format".to_string(), "pt".to_string());
    write_safetensors(path, &params.to_host(), &metadata)
}

/// Load a model's parameters from a safetensors file, checked against it.
pub fn load_params<B: Level>(path: &Path, model: &impl FunctionalModel, precision: Precision, device: &Device<B>) -> Result<Params<B>> {
    Params::from_host(model, &read_safetensors(path)?, &path.display().to_string(), precision, device)
}
