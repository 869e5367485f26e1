//! `metagrad bench estimators`: how far each hypergradient estimator is from
//! the exact hypergradient for what it costs. For fixed Conv-4 parameters
//! and a set of episodes (f64 on the CPU): the exact references (maml for
//! the unrolled family; implicit with conjugate gradient run to convergence
//! for the implicit family, the same proximal problem), then each estimator
//! at each setting of its cost knob, with its relative error (mean over
//! episodes, spread over seeds for ufo), Hessian-vector products, wall time
//! and peak memory. ufo has two knobs: q, and S, the number of estimates
//! averaged per task.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use burn::backend::Flex;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::autodiff::diff::{dot_all, hvp_count};
use crate::autodiff::tensor::{Precision, Tensor};
use crate::bench::{MemoryProbe, random_batch};
use crate::data::task::Task;
use crate::hypergrad::{CurvatureWarning, InnerLoop, Mode, QRule, TaskLoss, hypergradient, ufo_mean};
use crate::models::{Conv4, FunctionalModel};
use crate::train::plot::{Series, xy_plot};

/// The study's settings.
pub struct EstimatorStudy {
    pub model: Conv4,
    pub episodes: usize,
    pub inner: InnerLoop,
    /// λ of the implicit family's proximal problem.
    pub lambda: f64,
    /// The Neumann series' step η.
    pub neumann_lr: f64,
    /// Cost knob values: K for CG and the series.
    pub steps: Vec<usize>,
    /// ufo's q values, and the seeds each (and each stochastic row) is drawn with.
    pub qs: Vec<f64>,
    pub seeds: u64,
    /// The averaged ufo rows: the mean of S independent estimates at q =
    /// `ufo_samples_q`, for each S.
    pub ufo_samples: Vec<usize>,
    pub ufo_samples_q: f64,
    /// The stochastic neumann rows: random support examples per
    /// Hessian-vector product (stocBiO), at `stochastic_steps` terms.
    pub hvp_batches: Vec<usize>,
    pub stochastic_steps: usize,
    /// Their series step: subset Hessians have larger curvature than the
    /// full one, so they need a smaller η (the rows say when it is too large).
    pub stochastic_lr: f64,
}

/// One estimator at one setting of its knob.
#[derive(Clone, Debug, Serialize)]
pub struct EstimatorRow {
    pub estimator: String,
    /// The knob and its value, e.g. "K = 8" or "q = 0.3".
    pub setting: String,
    /// The exact hypergradient it estimates (maml or implicit-cg-converged).
    pub reference: String,
    /// ‖g − g_ref‖ / ‖g_ref‖, mean over episodes (and seeds), and its
    /// standard deviation over seeds (0 for deterministic estimators).
    pub relative_error: f64,
    pub error_spread: f64,
    /// Hessian-vector products per task (mean over seeds).
    pub hvps: f64,
    pub ms_per_task: f64,
    pub peak_memory_mib: Option<f64>,
    /// Runs whose linear solve stopped early (non-positive curvature or a
    /// growing series), and what the solver said to change.
    pub stopped_early: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_warning: Option<String>,
}

impl EstimatorStudy {
    fn tasks(&self) -> Vec<Task> {
        (0..self.episodes).map(|e| Task { support: random_batch(&self.model, self.model.way, 10 + e as u64), query: random_batch(&self.model, 3 * self.model.way, 100 + e as u64) }).collect()
    }

    /// Every row of the study.
    pub fn run(&self) -> Vec<EstimatorRow> {
        let theta = self.model.init::<Flex>(0, Precision::F64, &Default::default());
        let tasks = self.tasks();
        let maml_ref: Vec<Vec<Tensor<Flex>>> = tasks.iter().map(|t| self.estimate(Mode::Maml, t, &theta, 0).0).collect();
        let implicit_ref: Vec<Vec<Tensor<Flex>>> = tasks.iter().map(|t| self.estimate(Mode::implicit(self.lambda, 500), t, &theta, 0).0).collect();
        let mut rows = vec![self.row("fomaml", "-", Mode::Fomaml, &tasks, &theta, ("maml", &maml_ref), 1)];
        rows.push(self.row("maml", &format!("r = {}", self.inner.steps), Mode::Maml, &tasks, &theta, ("maml", &maml_ref), 1));
        for &q in &self.qs {
            rows.push(self.row("ufo", &format!("q = {q}"), Mode::Ufo(QRule::Fixed(q)), &tasks, &theta, ("maml", &maml_ref), self.seeds));
        }
        let q = self.ufo_samples_q;
        for &samples in &self.ufo_samples {
            let estimator = Estimator::UfoMean { q, samples };
            rows.push(self.row("ufo (mean of S)", &format!("q = {q}, S = {samples}"), estimator, &tasks, &theta, ("maml", &maml_ref), self.seeds));
        }
        let lambda = self.lambda;
        for &k in &self.steps {
            let reference = ("implicit (CG to convergence)", implicit_ref.as_slice());
            rows.push(self.row("implicit (CG)", &format!("K = {k}"), Mode::implicit(lambda, k), &tasks, &theta, reference, 1));
            rows.push(self.row("neumann", &format!("K = {k}"), Mode::Neumann { lambda, steps: k, lr: self.neumann_lr, hvp_batch: None, inner_batch: None }, &tasks, &theta, reference, 1));
            rows.push(self.row("fixed-point", &format!("K = {k}"), Mode::FixedPoint { lambda, steps: k, hvp_batch: None, inner_batch: None }, &tasks, &theta, reference, 1));
        }
        for &b in &self.hvp_batches {
            let mode = Mode::Neumann { lambda, steps: self.stochastic_steps, lr: self.stochastic_lr, hvp_batch: Some(b), inner_batch: None };
            let setting = format!("K = {}, b = {b}, η = {}", self.stochastic_steps, self.stochastic_lr);
            rows.push(self.row("neumann (stochastic)", &setting, mode, &tasks, &theta, ("implicit (CG to convergence)", implicit_ref.as_slice()), self.seeds));
        }
        rows
    }

    /// One task's hypergradient by `estimator`, its Hessian-vector products and milliseconds.
    fn estimate(&self, estimator: impl Into<Estimator>, task: &Task, theta: &[Tensor<Flex>], seed: u64) -> (Vec<Tensor<Flex>>, usize, f64, Option<CurvatureWarning>) {
        let device = Default::default();
        let (s, q) = (TaskLoss::single(&self.model, &task.support, Precision::F64, &device), TaskLoss::single(&self.model, &task.query, Precision::F64, &device));
        let (before, start) = (hvp_count(), Instant::now());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let h = match estimator.into() {
            Estimator::Mode(mut mode) => hypergradient(&mut mode, &s, &q, theta, &self.inner, &mut rng),
            Estimator::UfoMean { q: prob, samples } => ufo_mean(&s, &q, theta, &self.inner, prob, samples, &mut rng).0,
        };
        (h.grad, hvp_count() - before, start.elapsed().as_secs_f64() * 1e3, h.curvature)
    }

    #[allow(clippy::too_many_arguments)]
    fn row(&self, name: &str, setting: &str, estimator: impl Into<Estimator>, tasks: &[Task], theta: &[Tensor<Flex>], (reference, exact): (&str, &[Vec<Tensor<Flex>>]), seeds: u64) -> EstimatorRow {
        let estimator = estimator.into();
        let probe = MemoryProbe::<Flex>::start(&Default::default());
        let (mut per_seed, mut hvps, mut ms, mut stopped, mut warning) = (vec![], 0.0, 0.0, 0, None);
        for seed in 0..seeds {
            let mut error = 0.0;
            for (task, g_ref) in tasks.iter().zip(exact) {
                let (g, n, t, curvature) = self.estimate(estimator.clone(), task, theta, seed);
                stopped += usize::from(curvature.is_some());
                warning = CurvatureWarning::merge(warning, curvature);
                let diff: Vec<Tensor<Flex>> = g.iter().zip(g_ref).map(|(a, b)| a.sub(b)).collect();
                error += (dot_all(&diff, &diff) / dot_all(g_ref, g_ref)).sqrt();
                hvps += n as f64;
                ms += t;
            }
            per_seed.push(error / tasks.len() as f64);
        }
        let runs = (seeds as usize * tasks.len()) as f64;
        let mean = per_seed.iter().sum::<f64>() / per_seed.len() as f64;
        let spread = (per_seed.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / per_seed.len() as f64).sqrt();
        EstimatorRow {
            estimator: name.into(),
            setting: setting.into(),
            reference: reference.into(),
            relative_error: mean,
            error_spread: spread,
            hvps: hvps / runs,
            ms_per_task: ms / runs,
            peak_memory_mib: probe.peak_mib(),
            stopped_early: stopped,
            solver_warning: warning.zip(estimator.proximal_lambda()).map(|(w, lambda)| w.describe(lambda)),
        }
    }
}

/// What a row runs: a mode as training runs it, or the mean of S fixed-q
/// ufo estimates on one task (which shares g_fo and g_maml between them).
#[derive(Clone, Debug)]
enum Estimator {
    Mode(Mode),
    UfoMean { q: f64, samples: usize },
}

impl From<Mode> for Estimator {
    fn from(mode: Mode) -> Self {
        Estimator::Mode(mode)
    }
}

impl Estimator {
    fn proximal_lambda(&self) -> Option<f64> {
        match self {
            Estimator::Mode(mode) => mode.proximal_lambda(),
            Estimator::UfoMean { .. } => None,
        }
    }
}

pub fn format_estimator_table(rows: &[EstimatorRow]) -> String {
    let mut out = format!("{:<20} {:<20} {:>12} {:>10} {:>7} {:>9} {:>9} {:>8}  reference\n", "estimator", "setting", "rel. error", "spread", "HVPs", "ms/task", "peak MiB", "stopped");
    for r in rows {
        let memory = r.peak_memory_mib.map_or("-".to_string(), |m| format!("{m:.0}"));
        out += &format!(
            "{:<20} {:<20} {:>12.3e} {:>10.1e} {:>7.1} {:>9.1} {:>9} {:>8}  {}\n",
            r.estimator, r.setting, r.relative_error, r.error_spread, r.hvps, r.ms_per_task, memory, r.stopped_early, r.reference
        );
    }
    for w in rows.iter().filter_map(|r| r.solver_warning.as_ref().map(|w| (r, w))) {
        out += &format!("  {} {}: {}\n", w.0.estimator, w.0.setting, w.1);
    }
    out
}

/// Error against cost, log-log, one line per estimator (fomaml as a point;
/// exact results, error 0, have no logarithm and are left out).
pub fn plot_estimators(rows: &[EstimatorRow], path: &Path) -> Result<()> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.estimator.as_str()) {
            names.push(&r.estimator);
        }
    }
    let series = names
        .iter()
        .map(|name| {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.estimator == *name && r.relative_error > 0.0)
                .map(|r| ((r.hvps.max(0.5)).log10(), r.relative_error.log10()))
                .collect();
            Series { label: name.to_string(), markers: points.len() == 1, points }
        })
        .filter(|s| !s.points.is_empty())
        .collect::<Vec<_>>();
    xy_plot(&series, "Hypergradient estimators: relative error against cost", ("log10 Hessian-vector products per task (0.5 for none)", "log10 relative error"), path)
}
