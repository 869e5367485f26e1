//! What a run records: the metrics log (JSON lines), accuracy summaries,
//! per-step timings, and the divergence rule.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One line of the metrics log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Meta-iterations completed when this was measured.
    pub step: usize,
    /// train (the meta-batch's query loss and accuracy after adaptation) or val.
    pub split: String,
    pub loss: f64,
    pub accuracy: f64,
    /// val: half-width of the 95% confidence interval of the accuracy.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ci95: Option<f64>,
    /// ufo: the mean exact-branch probability and the fraction of tasks that took it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub q: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exact_fraction: Option<f64>,
    /// ufo with adaptive q, after the step: its bias-corrected moving averages of
    /// D² = ‖g_fo − g_maml‖² and V² = ‖g_maml‖² per exact task, from which it
    /// picks q (1 while D² ≥ V², where the first-order part is no cheaper bargain).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ufo_d2: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ufo_v2: Option<f64>,
    /// The implicit modes, when some task's linear solve met non-positive
    /// curvature: the λ above which I + H/λ is positive along what was met.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub curvature_lambda: Option<f64>,
    /// train, when `train.meta_lr_schedule` is not constant: the meta learning rate of this step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub meta_lr: Option<f64>,
    /// Wall-clock seconds of training so far (differs between runs, unlike the rest).
    pub elapsed_s: f64,
}

/// Accuracy over episodes as mean ± 1.96·σ/√n (σ the standard deviation over episodes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub episodes: usize,
    pub accuracy: f64,
    pub ci95: f64,
    pub loss: f64,
}

impl Summary {
    pub fn of(accuracies: &[f64], losses: &[f64]) -> Summary {
        let n = accuracies.len().max(1) as f64;
        let mean = accuracies.iter().sum::<f64>() / n;
        let var = accuracies.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
        Summary { episodes: accuracies.len(), accuracy: mean, ci95: 1.96 * var.sqrt() / n.sqrt(), loss: losses.iter().sum::<f64>() / n }
    }
}

/// Seconds of one meta-iteration: waiting for episodes, hypergradients
/// (every task's forward, backward and Hessian-vector products), the Adam
/// step, and the rest (logging, validation, checkpoints).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StepTiming {
    pub data_s: f64,
    pub hypergradient_s: f64,
    pub optimizer_s: f64,
    pub other_s: f64,
    /// Thread time inside the hypergradients by phase (zero unless
    /// `profile` is on).
    pub phases: crate::autodiff::profile::PhaseTimes,
}

/// Why a query loss means the run has diverged, if it does.
pub fn divergence(loss: f64, threshold: f64) -> Option<String> {
    if !loss.is_finite() {
        Some(format!("the query loss is {loss}"))
    } else if loss > threshold {
        Some(format!("the query loss {loss:.4e} is above the divergence threshold {threshold:.4e} (set by train.divergence_factor)"))
    } else {
        None
    }
}

/// Read a metrics log (JSON lines), naming the line that does not parse.
pub fn read_metrics(path: &std::path::Path) -> Result<Vec<Metrics>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the metrics log {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}: not a metrics record", path.display(), i + 1)))
        .collect()
}
