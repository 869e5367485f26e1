//! Adam on the meta-parameters: Burn's Adam, one state per parameter, with
//! its moments as named host tensors for checkpoints.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use burn::backend::tensor::Device;
use burn::optim::{Adam, AdamConfig, AdamState, AdaptiveMomentumState, Optimizer};

use crate::autodiff::tensor::{BaseBackend, Precision, Tensor};
use crate::data::store::HostTensor;
use crate::learner::schedule::MetaLrSchedule;

/// Adam over a list of parameter tensors. Each state is kept flattened:
/// Adam is elementwise, so rank 1 serves every parameter shape.
pub struct MetaAdam<B: BaseBackend> {
    adam: Adam,
    /// The base rate, which `schedule` scales step by step.
    pub lr: f64,
    pub schedule: MetaLrSchedule,
    states: Vec<Option<AdamState<1>>>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: BaseBackend> MetaAdam<B> {
    /// Adam with β = (0.9, 0.999) and ε = 1e-8 (PyTorch's defaults; Burn's
    /// default ε of 1e-5 damps small gradients) for `count` parameters.
    pub fn new(lr: f64, count: usize) -> Self {
        Self::with_epsilon(lr, 1e-8, count)
    }

    /// `new` with another ε (a larger one damps the steps of parameters whose gradients are small).
    pub fn with_epsilon(lr: f64, epsilon: f64, count: usize) -> Self {
        MetaAdam { adam: AdamConfig::new().with_epsilon(epsilon as f32).build(), lr, schedule: MetaLrSchedule::Constant, states: vec![None; count], _backend: Default::default() }
    }

    /// The same optimiser with its rate following `schedule`.
    pub fn with_schedule(self, schedule: MetaLrSchedule) -> Self {
        MetaAdam { schedule, ..self }
    }

    /// The rate the next step takes.
    pub fn rate(&self) -> f64 {
        self.schedule.rate(self.lr, self.time())
    }

    fn to_burn(t: &Tensor<B>) -> burn::tensor::Tensor<1> {
        B::base_to_burn(t.reshape(&[t.dims().iter().product()]).0)
    }

    /// One Adam step: the updated parameters.
    pub fn step(&mut self, params: &[Tensor<B>], grads: &[Tensor<B>]) -> Vec<Tensor<B>> {
        assert_eq!(params.len(), self.states.len(), "Adam: {} parameters for {} states", params.len(), self.states.len());
        let lr = self.rate();
        params
            .iter()
            .zip(grads)
            .zip(self.states.iter_mut())
            .map(|((p, g), state)| {
                let (updated, next) = self.adam.step(lr, Self::to_burn(p), Self::to_burn(g), state.take());
                *state = next;
                Tensor(B::base_from_burn(updated)).reshape(&p.dims())
            })
            .collect()
    }

    /// Steps taken so far.
    pub fn time(&self) -> usize {
        self.states.first().and_then(|s| s.as_ref()).map_or(0, |s| s.momentum.time)
    }

    /// Moments as named host tensors, `moment_1.<param>` and
    /// `moment_2.<param>`, for parameters of the given names and shapes.
    pub fn to_host(&self, shapes: &[(String, Vec<usize>)]) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for ((name, shape), state) in shapes.iter().zip(&self.states) {
            if let Some(s) = state {
                for (which, m) in [("moment_1", &s.momentum.moment_1), ("moment_2", &s.momentum.moment_2)] {
                    let t = Tensor::<B>(B::base_from_burn(m.clone())).reshape(shape);
                    out.insert(format!("{which}.{name}"), HostTensor::from_tensor(&t));
                }
            }
        }
        out
    }

    /// The state `to_host` wrote, after `time` steps.
    pub fn restore(&mut self, shapes: &[(String, Vec<usize>)], host: &BTreeMap<String, HostTensor>, time: usize, precision: Precision, device: &Device<B>) -> Result<()> {
        if time == 0 {
            return Ok(());
        }
        for ((name, shape), state) in shapes.iter().zip(self.states.iter_mut()) {
            let moment = |which: &str| -> Result<burn::tensor::Tensor<1>> {
                let t = host.get(&format!("{which}.{name}")).with_context(|| format!("the optimizer state has no {which}.{name}"))?;
                if &t.shape != shape {
                    bail!("the optimizer state's {which}.{name} has shape {:?}, the parameter {shape:?}", t.shape);
                }
                Ok(Self::to_burn(&t.to_tensor::<B>(precision, device)))
            };
            *state = Some(AdamState::new(AdaptiveMomentumState::new(time, moment("moment_1")?, moment("moment_2")?)));
        }
        Ok(())
    }
}
