//! Meta learning-rate schedules. The rate of each Adam step is a function of
//! the steps already taken, which every checkpoint holds (Adam's step
//! count), so a resumed run continues its schedule exactly.

/// How the meta learning rate changes over training, as PyTorch's
/// schedulers stepped once per meta-iteration.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum MetaLrSchedule {
    /// The base rate throughout (the MAML and iMAML papers).
    #[default]
    Constant,
    /// Cosine annealing from the base rate down to `min_lr` over `steps`
    /// meta-iterations, then `min_lr` (MAML++; PyTorch's CosineAnnealingLR).
    Cosine { steps: usize, min_lr: f64 },
    /// The base rate times `gamma` for every milestone already reached
    /// (PyTorch's MultiStepLR): with a milestone at m, steps 1..=m use the
    /// base rate and step m + 1 on the decayed one.
    MultiStep { milestones: Vec<usize>, gamma: f64 },
}

impl MetaLrSchedule {
    /// The rate of the next Adam step, after `taken` steps, for base rate `base`.
    pub fn rate(&self, base: f64, taken: usize) -> f64 {
        match self {
            MetaLrSchedule::Constant => base,
            MetaLrSchedule::Cosine { steps, min_lr } => {
                let progress = taken.min(*steps) as f64 / (*steps).max(1) as f64;
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            MetaLrSchedule::MultiStep { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| m <= taken).count();
                base * gamma.powi(passed as i32)
            }
        }
    }

    pub fn is_constant(&self) -> bool {
        matches!(self, MetaLrSchedule::Constant)
    }
}
