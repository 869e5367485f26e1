//! The implicit-differentiation estimators (CG, Neumann series, fixed point)
//! against closed forms, against each other, and their curvature guard.

use burn::backend::Flex;
use metagrad::autodiff::diff::{Objective, value_and_grad};
use metagrad::autodiff::tensor::{Level, Tensor};
use metagrad::bench::random_batch;
use metagrad::hypergrad::implicit::conjugate_gradient_checked;
use metagrad::hypergrad::neumann::neumann_series;
use metagrad::hypergrad::{InnerLoop, LinearSolver, Mode, TaskSubsets, TaskLoss, estimate, fomaml, implicit_with, maml, proximal_adapt};
use metagrad::models::{Conv4, FunctionalModel};

use crate::common::*;

/// ½ Σ d_i φ_i²: its Hessian is diag(d), exactly.
struct Quadratic<'a> {
    d: &'a Tensor<Flex>,
}

impl Objective<Flex> for Quadratic<'_> {
    fn eval<B: Level<Base = Flex>>(&self, p: &[Tensor<B>]) -> Tensor<B> {
        p[0].square().mul(&Tensor::from_base(self.d)).sum().mul_scalar(0.5)
    }
}

/// One task: its only selection is itself; it has no examples to subsample.
impl TaskSubsets for Quadratic<'_> {
    fn select(&self, chosen: &[usize]) -> Self {
        assert_eq!(chosen, [0], "a single task");
        Quadratic { d: self.d }
    }

    fn subsample(&self, _: usize, _: &mut [rand_chacha::ChaCha8Rng]) -> Self {
        panic!("the quadratic test objective has no examples to subsample")
    }
}

/// ⟨c, φ⟩: its gradient is c everywhere.
struct Linear<'a> {
    c: &'a Tensor<Flex>,
}

impl Objective<Flex> for Linear<'_> {
    fn eval<B: Level<Base = Flex>>(&self, p: &[Tensor<B>]) -> Tensor<B> {
        p[0].mul(&Tensor::from_base(self.c)).sum()
    }
}

fn vector(values: &[f64]) -> Tensor<Flex> {
    Tensor::from_f64(values, &[values.len()], F64, &DEV)
}

fn close(got: &[f64], want: &[f64], what: &str) {
    let err = relative_error(got, want);
    assert!(err < 1e-12, "{what}: relative error {err:.2e}\n got {got:?}\nwant {want:?}");
}

#[test]
fn every_estimator_matches_its_closed_form_at_finite_steps() {
    let d_values = [0.5, 1.0, 2.0, 3.0, 4.0];
    let c_values = [0.3, -1.2, 0.7, 2.0, -0.4];
    let (d, c) = (vector(&d_values), vector(&c_values));
    let (support, query) = (Quadratic { d: &d }, Linear { c: &c });
    let theta = vec![vector(&[1.0, -2.0, 0.5, 0.1, 3.0])];
    let (alpha, r, lambda, k, eta) = (0.1, 3, 2.0, 4, 0.3);
    let inner = InnerLoop::new(r, alpha);
    let per_coordinate = |f: &dyn Fn(f64, f64) -> f64| -> Vec<f64> { d_values.iter().zip(&c_values).map(|(&d, &c)| f(d, c)).collect() };
    // MAML: (I − αD)^r c; first order: c.
    close(&maml(&support, &query, &theta, &inner).grad[0].to_vec(), &per_coordinate(&|d, c| (1.0 - alpha * d).powi(r as i32) * c), "maml");
    close(&fomaml(&support, &query, &theta, &inner).grad[0].to_vec(), &c_values, "fomaml");
    // Neumann: v_K = η Σ_{i<K} (1 − ηa)^i c = c (1 − (1 − ηa)^K) / a per coordinate, a = 1 + d/λ.
    let series = |eta: f64| per_coordinate(&|d, c| {
        let a = 1.0 + d / lambda;
        c * (1.0 - (1.0 - eta * a).powi(k as i32)) / a
    });
    let neumann = estimate(&Mode::Neumann { lambda, steps: k, lr: eta, hvp_batch: None, inner_batch: None }, &support, &query, &theta, &inner, None);
    close(&neumann.grad[0].to_vec(), &series(eta), "neumann");
    let fixed_point = estimate(&Mode::FixedPoint { lambda, steps: k, hvp_batch: None, inner_batch: None }, &support, &query, &theta, &inner, None);
    close(&fixed_point.grad[0].to_vec(), &series(alpha * lambda), "fixed-point (η = αλ)");
    // CG on 5 distinct eigenvalues is exact after 5 steps: (I + D/λ)⁻¹ c; after 2 it is not.
    let solve = per_coordinate(&|d, c| c / (1.0 + d / lambda));
    let cg = estimate(&Mode::implicit(lambda, 5), &support, &query, &theta, &inner, None);
    close(&cg.grad[0].to_vec(), &solve, "implicit (CG, 5 steps)");
    let rough = estimate(&Mode::implicit(lambda, 2), &support, &query, &theta, &inner, None);
    assert!(relative_error(&rough.grad[0].to_vec(), &solve) > 1e-3, "2 CG steps cannot solve a 5-eigenvalue system");
    assert!(neumann.curvature.is_none() && cg.curvature.is_none());
}

#[test]
fn fixed_point_is_the_neumann_series_with_eta_alpha_lambda() {
    let model = Conv4 { channels: 4, ..Conv4::omniglot(3) };
    let theta = model.init::<Flex>(2, F64, &DEV);
    let (sx, qx) = (random_batch(&model, 3, 5), random_batch(&model, 6, 6));
    let (s, q) = (TaskLoss::single(&model, &sx, F64, &DEV), TaskLoss::single(&model, &qx, F64, &DEV));
    let inner = InnerLoop::new(2, 0.1);
    let a = estimate(&Mode::FixedPoint { lambda: 3.0, steps: 6, hvp_batch: None, inner_batch: None }, &s, &q, &theta, &inner, None).grad;
    let b = estimate(&Mode::Neumann { lambda: 3.0, steps: 6, lr: 0.1 * 3.0, hvp_batch: None, inner_batch: None }, &s, &q, &theta, &inner, None).grad;
    assert_eq!(flatten(&a), flatten(&b));
}

#[test]
fn neumann_with_many_terms_equals_conjugate_gradient_to_convergence() {
    let model = Conv4 { channels: 2, ..Conv4::omniglot(3) };
    let theta = model.init::<Flex>(9, F64, &DEV);
    let (sx, qx) = (random_batch(&model, 3, 10), random_batch(&model, 6, 11));
    let (s, q) = (TaskLoss::single(&model, &sx, F64, &DEV), TaskLoss::single(&model, &qx, F64, &DEV));
    let inner = InnerLoop::new(3, 0.05);
    // λ three times the largest |eigenvalue| of H at φ (power iteration) puts
    // the spectrum of I + H/λ in [2/3, 4/3]: positive definite, and η = 1
    // contracts the series by 1/3 a term.
    let phi = proximal_adapt(&s, &theta, &inner, 1.0);
    let mut v = random_unit_direction(&mut rng(4), &theta);
    let mut largest = 0.0;
    for _ in 0..40 {
        let (_, _, hv) = metagrad::autodiff::diff::hvp(&s, &phi, &v);
        largest = norm(&flatten(&hv));
        v = hv.iter().map(|t| t.mul_scalar(1.0 / largest)).collect();
    }
    let lambda = 3.0 * largest;
    let cg = implicit_with(&s, &q, &theta, &inner, lambda, LinearSolver::ConjugateGradient { steps: 200 });
    let series = implicit_with(&s, &q, &theta, &inner, lambda, LinearSolver::Neumann { steps: 60, lr: 1.0 });
    let err = relative_error(&flatten(&series.grad), &flatten(&cg.grad));
    assert!(err < 1e-8, "Neumann (60 terms) and CG to convergence differ by {err:.2e} (λ = {lambda:.3})");
    assert!(cg.curvature.is_none() && series.curvature.is_none());
    // A short series is visibly short of it: the comparison can fail.
    let short = implicit_with(&s, &q, &theta, &inner, lambda, LinearSolver::Neumann { steps: 1, lr: 1.0 });
    assert!(relative_error(&flatten(&short.grad), &flatten(&cg.grad)) > 1e-4);
}

#[test]
fn non_positive_curvature_is_reported_with_the_lambda_that_fixes_it() {
    // H = diag(d) with one negative eigenvalue, −3: I + H/λ is indefinite for λ ≤ 3.
    let d = vector(&[1.0, -3.0, 2.0]);
    let c = vector(&[0.5, 1.0, -0.5]);
    let (support, query) = (Quadratic { d: &d }, Linear { c: &c });
    let phi = vec![vector(&[0.0, 0.0, 0.0])];
    let (_, b) = value_and_grad(&query, &phi);
    for lambda in [1.0, 2.0] {
        let (_, cg) = conjugate_gradient_checked(&support, &phi, &b, lambda, 10);
        let (_, series) = neumann_series(&support, &phi, &b, lambda, 10, 0.1);
        for (solver, warning) in [("CG", cg), ("Neumann", series)] {
            let w = warning.unwrap_or_else(|| panic!("{solver} at λ = {lambda}: no warning for an indefinite system"));
            assert_eq!(w.tasks, 1);
            assert!(w.lambda_needed > lambda && w.lambda_needed <= 3.0 + 1e-9, "{solver}: λ needed {} at λ = {lambda}", w.lambda_needed);
            assert!(w.describe(lambda).contains("set mode.lambda above"));
        }
    }
    // A step too large for the positive curvature met: the terms would grow.
    let (_, big_step) = neumann_series(&support, &phi, &b, 4.0, 10, 1.9);
    let w = big_step.expect("η = 1.9 with A's eigenvalue 1.5 grows the series");
    // Between 2/λ_max(A) = 2/1.5 and the η that grew it.
    assert!(w.step_tasks == 1 && w.lr_below >= 2.0 / 1.5 - 1e-9 && w.lr_below < 1.9, "η below {}", w.lr_below);
    assert!(w.describe(4.0).contains("neumann_lr below"));
    // Above the most negative curvature, with a small step, no warning.
    assert!(conjugate_gradient_checked(&support, &phi, &b, 4.0, 10).1.is_none());
    assert!(neumann_series(&support, &phi, &b, 4.0, 10, 0.1).1.is_none());
    // And through a mode, the hypergradient carries it.
    let theta = vec![vector(&[0.1, 0.1, 0.1])];
    let h = estimate(&Mode::Neumann { lambda: 1.0, steps: 10, lr: 0.1, hvp_batch: None, inner_batch: None }, &support, &query, &theta, &InnerLoop::new(1, 0.01), None);
    assert!(h.curvature.is_some());
    let _ = proximal_adapt(&support, &theta, &InnerLoop::new(1, 0.01), 1.0);
}

#[test]
fn estimator_study_rows_fall_to_their_references() {
    use metagrad::bench::estimators::{EstimatorStudy, format_estimator_table};
    let study = EstimatorStudy {
        model: Conv4 { channels: 2, ..Conv4::omniglot(3) },
        episodes: 1,
        inner: InnerLoop::new(2, 0.008),
        lambda: 100.0,
        neumann_lr: 0.8,
        steps: vec![1, 4, 40],
        qs: vec![0.5, 1.0],
        seeds: 2,
        ufo_samples: vec![8],
        ufo_samples_q: 1.0,
        hvp_batches: vec![2],
        stochastic_steps: 4,
        stochastic_lr: 0.3,
    };
    let rows = study.run();
    let row = |estimator: &str, setting: &str| rows.iter().find(|r| r.estimator == estimator && r.setting == setting).unwrap_or_else(|| panic!("no row {estimator} {setting}"));
    assert_eq!(row("maml", "r = 2").relative_error, 0.0);
    assert_eq!(row("maml", "r = 2").hvps, 2.0);
    assert!(row("ufo", "q = 1").relative_error < 1e-12);
    // At q = 1 every one of the S estimates is exact, and they share one sweep.
    let averaged = row("ufo (mean of S)", "q = 1, S = 8");
    assert!(averaged.relative_error < 1e-12 && averaged.hvps == 2.0, "ufo mean of 8: error {}, {} HVPs", averaged.relative_error, averaged.hvps);
    assert!(row("fomaml", "-").relative_error > 1e-3 && row("fomaml", "-").hvps == 0.0);
    for name in ["implicit (CG)", "neumann", "fixed-point"] {
        let (one, many) = (row(name, "K = 1"), row(name, "K = 40"));
        assert!(many.relative_error < 1e-6 && many.relative_error < one.relative_error, "{name}: {} → {}", one.relative_error, many.relative_error);
        assert_eq!(many.stopped_early, 0);
    }
    let stochastic = row("neumann (stochastic)", "K = 4, b = 2, η = 0.3");
    assert!(stochastic.error_spread > 0.0 && stochastic.hvps == 3.0, "random subsets: spread {}", stochastic.error_spread);
    assert!(format_estimator_table(&rows).contains("implicit (CG to convergence)"));
}

/// The mean of many stochastic estimates against their deterministic
/// counterpart: within 4 standard errors (from the sample variance), with a
/// variance that is not zero.
fn averages_to(mode: &Mode, deterministic: &Mode, model: &metagrad::models::Mlp, inner: &InnerLoop, samples: usize) {
    use metagrad::hypergrad::Draws;
    let mut stream = metagrad::data::sinusoid::SinusoidTasks::new(5);
    let (_, task) = stream.next_task(10, 10);
    let theta = model.init::<Flex>(1, F64, &DEV);
    let (s, q) = task_losses(model, &task);
    let exact = estimate(deterministic, &s, &q, &theta, inner, None);
    assert!(exact.curvature.is_none(), "the deterministic solve must converge cleanly");
    let exact = flatten(&exact.grad);
    let draws: Vec<Vec<f64>> = (0..samples as u64)
        .map(|seed| {
            let h = estimate(mode, &s, &q, &theta, inner, Some(&Draws::Subsets(vec![seed])));
            assert!(h.curvature.is_none(), "seed {seed}: a stochastic solve stopped early");
            flatten(&h.grad)
        })
        .collect();
    assert_mean_within_4_standard_errors(&draws, &exact, mode.name());
}

#[test]
fn stochastic_hessian_products_average_to_the_deterministic_series() {
    // stocBiO: E over independent random Hessians of each term is the full one.
    let mlp = metagrad::models::Mlp::new(&[1, 8, 8, 1]);
    let inner = InnerLoop::new(2, 0.005);
    let (lambda, steps, lr) = (50.0, 5, 0.5);
    let stochastic = Mode::Neumann { lambda, steps, lr, hvp_batch: Some(4), inner_batch: None };
    averages_to(&stochastic, &Mode::Neumann { lambda, steps, lr, hvp_batch: None, inner_batch: None }, &mlp, &inner, 300);
}

#[test]
fn stochastic_inner_steps_average_to_the_deterministic_fixed_point_on_a_quadratic_problem() {
    // A linear model's squared loss has a constant Hessian and a gradient
    // linear in the parameters: random inner steps are unbiased there.
    let linear = metagrad::models::Mlp::new(&[1, 1]);
    let inner = InnerLoop::new(3, 0.02);
    let stochastic = Mode::FixedPoint { lambda: 5.0, steps: 5, hvp_batch: None, inner_batch: Some(3) };
    averages_to(&stochastic, &Mode::FixedPoint { lambda: 5.0, steps: 5, hvp_batch: None, inner_batch: None }, &linear, &inner, 300);
}
