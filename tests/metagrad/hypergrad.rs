//! The hypergradient modes, verified numerically in f64 on Flex.

use burn::backend::Flex;
use metagrad::bench::random_batch;
use metagrad::autodiff::diff::{Objective, backward, dot_all, hvp, lift};
use metagrad::hypergrad::*;
use metagrad::data::Task;
use metagrad::models::{Conv4, FunctionalModel};
use metagrad::autodiff::tensor::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::*;

fn tiny() -> Conv4 {
    Conv4 { channels: 4, ..Conv4::omniglot(5) }
}

fn task(model: &Conv4, support: usize, query: usize, seed: u64) -> (Vec<Tensor<Flex>>, Task) {
    let theta = model.init::<Flex>(seed, F64, &DEV).into_tensors();
    let task = Task { support: random_batch(model, support, seed + 1), query: random_batch(model, query, seed + 2) };
    (theta, task)
}

#[test]
fn maml_unrolled_equals_maml_sweep_on_both_dataset_shapes() {
    for (model, support, query) in [(Conv4::omniglot(5), 5, 5), (Conv4::mini_imagenet(5), 5, 5)] {
        let (theta, task) = task(&model, support, query, 1);
        let (s, q) = task_losses(&model, &task);
        for steps in [1, 3, 5] {
            let inner = InnerLoop::new(steps, 0.1);
            let a = maml_unrolled(&s, &q, &theta, &inner);
            let b = maml(&s, &q, &theta, &inner);
            let err = relative_error(&flatten(&b.grad), &flatten(&a.grad));
            assert!(err < 1e-9, "{}×{} r={steps}: unrolled and sweep differ by {err:.2e}", model.image_size, model.image_size);
            assert!((a.query_loss() - b.query_loss()).abs() < 1e-12);
        }
    }
}

#[test]
fn maml_matches_finite_differences_of_the_meta_loss_at_three_steps() {
    let model = tiny();
    let (theta, task) = task(&model, 5, 10, 2);
    let (s, q) = task_losses(&model, &task);
    let inner = InnerLoop::new(3, 0.3);
    let g = maml(&s, &q, &theta, &inner).grad;
    let gnorm = norm(&flatten(&g));
    let mut r = rng(20);
    for _ in 0..4 {
        let d = random_unit_direction(&mut r, &theta);
        let numeric = fd_directional(&|p| meta_loss(&s, &q, p, &inner), &theta, &d);
        let err = (dot_all(&g, &d) - numeric).abs() / gnorm;
        assert!(err < 1e-6, "MAML (r=3) directional derivative off by {err:.2e}");
    }
}

#[test]
fn fomaml_equals_burns_single_level_gradient_at_the_adapted_weights() {
    let model = tiny();
    let (theta, task) = task(&model, 5, 10, 3);
    let (s, q) = task_losses(&model, &task);
    let inner = InnerLoop::new(2, 0.3);
    let fo = fomaml(&s, &q, &theta, &inner);
    // Independently: φ_r, then one plain Autodiff<Flex> backward of L_q.
    let phi_r = adapt(&s, &theta, &inner).pop().unwrap();
    let leaves = lift(&phi_r);
    let reference = backward(&q.eval(&leaves), &leaves);
    assert_eq!(flatten(&fo.grad), flatten(&reference));
    // And it is not the exact hypergradient.
    let exact = maml(&s, &q, &theta, &inner).grad;
    assert!(relative_error(&flatten(&fo.grad), &flatten(&exact)) > 1e-3);
}

#[test]
fn ufo_with_q_one_is_maml() {
    let model = tiny();
    let (theta, task) = task(&model, 5, 10, 4);
    let (s, q) = task_losses(&model, &task);
    let inner = InnerLoop::new(2, 0.3);
    let mut rule = QRule::Fixed(1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for _ in 0..3 {
        let u = ufo(&s, &q, &theta, &inner, &mut rule, &mut rng);
        assert_eq!(u.exact_branch(), Some(true));
        let err = relative_error(&flatten(&u.grad), &flatten(&maml(&s, &q, &theta, &inner).grad));
        assert!(err < 1e-12, "ufo(q=1) differs from maml by {err:.2e}");
    }
}

/// With small q the mean of N estimates converges to maml: the error of the
/// mean stays within 4 standard errors estimated from the sample variance,
/// while the first-order gradient (biased) lies far outside that bound.
#[test]
fn ufo_is_unbiased_mean_of_many_estimates_converges_to_maml() {
    let model = tiny();
    let (theta, task) = task(&model, 5, 10, 5);
    let (s, q) = task_losses(&model, &task);
    let inner = InnerLoop::new(2, 0.3);
    let exact = flatten(&maml(&s, &q, &theta, &inner).grad);
    let first_order = flatten(&fomaml(&s, &q, &theta, &inner).grad);
    let mut rule = QRule::Fixed(0.2);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 400;
    let samples: Vec<Vec<f64>> = (0..n).map(|_| flatten(&ufo(&s, &q, &theta, &inner, &mut rule, &mut rng).grad)).collect();
    let dim = exact.len();
    let mean: Vec<f64> = (0..dim).map(|i| samples.iter().map(|x| x[i]).sum::<f64>() / n as f64).collect();
    // Total sample variance tr(Σ̂) and the standard error of the mean's norm.
    let variance: f64 = samples.iter().map(|x| x.iter().zip(&mean).map(|(a, m)| (a - m).powi(2)).sum::<f64>()).sum::<f64>() / (n - 1) as f64;
    let standard_error = (variance / n as f64).sqrt();
    let error = norm(&mean.iter().zip(&exact).map(|(a, b)| a - b).collect::<Vec<_>>());
    assert!(variance > 0.0, "both branches must have been drawn");
    assert!(error <= 4.0 * standard_error, "‖mean − maml‖ = {error:.3e} exceeds 4 standard errors ({standard_error:.3e})");
    let bias = norm(&first_order.iter().zip(&exact).map(|(a, b)| a - b).collect::<Vec<_>>());
    assert!(bias > 4.0 * standard_error, "the test cannot tell a biased estimator apart: bias {bias:.3e}");
}

#[test]
fn ufo_mean_helper_matches_averaging_individual_estimates() {
    let model = tiny();
    let (theta, task) = task(&model, 5, 10, 6);
    let (s, q) = task_losses(&model, &task);
    let inner = InnerLoop::new(1, 0.3);
    let (mean, exact_draws) = ufo_mean(&s, &q, &theta, &inner, 0.3, 50, &mut ChaCha8Rng::seed_from_u64(1));
    let mut rule = QRule::Fixed(0.3);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let estimates: Vec<Vec<f64>> = (0..50).map(|_| flatten(&ufo(&s, &q, &theta, &inner, &mut rule, &mut rng).grad)).collect();
    let average: Vec<f64> = (0..estimates[0].len()).map(|i| estimates.iter().map(|e| e[i]).sum::<f64>() / 50.0).collect();
    assert!(exact_draws > 0 && exact_draws < 50);
    assert!(relative_error(&flatten(&mean.grad), &average) < 1e-12);
}

#[test]
fn adaptive_q_follows_the_closed_form() {
    let mut a = AdaptiveQ::new(0.05);
    assert_eq!(a.q(5), 0.05, "q_min until the first exact sample");
    a.observe(1.0, 0.5);
    assert_eq!(a.q(5), 1.0, "V² ≤ D² takes the exact branch always");
    let mut a = AdaptiveQ::new(0.05);
    a.observe(0.02, 1.0);
    a.observe(0.04, 3.0);
    // Bias-corrected averages of the two samples.
    let w = [0.99 * 0.01, 0.01];
    let c = 1.0 - 0.99f64.powi(2);
    let (d2, v2) = ((w[0] * 0.02 + w[1] * 0.04) / c, (w[0] * 1.0 + w[1] * 3.0) / c);
    let (got_d2, got_v2) = a.moments().unwrap();
    assert!((got_d2 - d2).abs() < 1e-12 * d2 && (got_v2 - v2).abs() < 1e-12 * v2);
    let r = 5.0;
    let expected = ((r + 1.0) * d2 / (r * 3.0 * (v2 - d2))).sqrt();
    assert!((a.q(5) - expected).abs() < 1e-12 * expected, "q = {} but the closed form gives {expected}", a.q(5));
    // Clipped to [q_min, 1].
    let mut tiny_d = AdaptiveQ::new(0.05);
    tiny_d.observe(1e-12, 1.0);
    assert_eq!(tiny_d.q(5), 0.05);
}

#[test]
fn adaptive_ufo_updates_its_state_on_exact_samples_only() {
    let model = tiny();
    let (theta, task) = task(&model, 5, 10, 8);
    let (s, q) = task_losses(&model, &task);
    let inner = InnerLoop::new(1, 0.3);
    let mut rule = QRule::Adaptive(AdaptiveQ::new(0.5));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut exact = 0;
    for _ in 0..8 {
        exact += usize::from(ufo(&s, &q, &theta, &inner, &mut rule, &mut rng).exact_branch() == Some(true));
    }
    let QRule::Adaptive(state) = &rule else { unreachable!() };
    assert_eq!(state.samples as usize, exact);
    assert!(exact > 0);
    let q_now = rule.q(1);
    assert!((0.5..=1.0).contains(&q_now), "q = {q_now}");
}

/// The explicit Hessian of a scalar objective, column by column from HVPs.
fn explicit_hessian<F: Objective<Flex>>(f: &F, at: &[Tensor<Flex>]) -> Vec<Vec<f64>> {
    let n: usize = at.iter().map(|t| t.num_elements()).sum();
    (0..n)
        .map(|j| {
            let mut offset = 0;
            let e: Vec<Tensor<Flex>> = at
                .iter()
                .map(|t| {
                    let k = t.num_elements();
                    let v: Vec<f64> = (0..k).map(|i| if offset + i == j { 1.0 } else { 0.0 }).collect();
                    offset += k;
                    Tensor::from_f64(&v, &t.dims(), F64, &DEV)
                })
                .collect();
            flatten(&hvp(f, at, &e).2)
        })
        .collect()
}

/// Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap();
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (pivot_rows, rest) = a.split_at_mut(col + 1);
        let pivot_row = &pivot_rows[col];
        for (i, row) in rest.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            row[col..].iter_mut().zip(&pivot_row[col..]).for_each(|(x, p)| *x -= f * p);
            b[col + 1 + i] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        x[row] = (b[row] - (row + 1..n).map(|k| a[row][k] * x[k]).sum::<f64>()) / a[row][row];
    }
    x
}

#[test]
fn implicit_matches_the_exact_solution_of_the_linear_system() {
    let model = Conv4 { channels: 2, ..Conv4::omniglot(3) };
    let (theta, task) = task(&model, 3, 6, 9);
    let (s, q) = task_losses(&model, &task);
    let h0 = explicit_hessian(&s, &theta);
    let n = h0.len();
    let spectral_bound = h0.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    // λ above ‖H‖ keeps the proximal problem strongly convex, as iMAML assumes.
    let lambda = 1.5 * spectral_bound;
    let inner = InnerLoop::new(200, 1.0 / (lambda + spectral_bound));
    let implicit_result = implicit(&s, &q, &theta, &inner, lambda, n);
    let phi = proximal_adapt(&s, &theta, &inner, lambda);
    let h = explicit_hessian(&s, &phi);
    let system: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| f64::from(i == j) + h[i][j] / lambda).collect()).collect();
    let (_, b) = metagrad::autodiff::diff::value_and_grad(&q, &phi);
    let exact = solve(system, flatten(&b));
    let err = relative_error(&flatten(&implicit_result.grad), &exact);
    assert!(err < 1e-8, "CG solution differs from the direct solve by {err:.2e} (n = {n})");
}

#[test]
fn the_reference_code_variant_solves_its_damped_system_at_the_pulled_back_weights() {
    let model = Conv4 { channels: 2, ..Conv4::omniglot(3) };
    let (theta, task) = task(&model, 3, 6, 9);
    let (s, q) = task_losses(&model, &task);
    let spectral_bound = explicit_hessian(&s, &theta).iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    let (lambda, c, d) = (2.0, 1.0, 1.5 * spectral_bound);
    let inner = InnerLoop::new(3, 0.1);
    let variant = ImplicitVariant { inner_solve: InnerSolve::PullBack, cg_damping: c, lambda_damping: d };
    let n = flatten(&theta).len();
    let result = implicit_variant(&s, &q, &theta, &inner, lambda, n, &variant);
    // Three plain steps, then φ ← φ − αλ(φ − θ), written out in f64.
    let plain = flatten(adapt(&s, &theta, &inner).last().unwrap());
    let start = flatten(&theta);
    let phi_expected: Vec<f64> = plain.iter().zip(&start).map(|(p, t)| p - inner.lr * lambda * (p - t)).collect();
    assert!(relative_error(&flatten(&result.adapted), &phi_expected) < 1e-12, "pulled-back fast weights");
    let h = explicit_hessian(&s, &result.adapted);
    let system: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| (1.0 + c) * f64::from(i == j) + h[i][j] / (lambda + d)).collect()).collect();
    let (_, b) = metagrad::autodiff::diff::value_and_grad(&q, &result.adapted);
    let exact = solve(system, flatten(&b));
    let err = relative_error(&flatten(&result.grad), &exact);
    assert!(err < 1e-8, "the damped CG solution differs from the direct solve by {err:.2e} (n = {n})");
    // The paper's variant at the same λ is a different estimate: the test can fail.
    let paper = implicit(&s, &q, &theta, &inner, lambda, n);
    assert!(relative_error(&flatten(&paper.grad), &exact) > 1e-2);
    // The reference code tests with plain steps, the paper with its proximal problem.
    let mode = Mode::Implicit { lambda, cg_steps: 5, variant };
    assert_eq!(mode.test_adaptation(), Adaptation::Plain);
    assert_eq!(Mode::implicit(lambda, 5).test_adaptation(), Adaptation::Proximal(lambda));
    assert_eq!(mode.system_lambda(), Some((1.0 + c) * (lambda + d)));
}

/// Multinomial logistic regression: smooth and convex, so the proximal inner
/// problem converges and the implicit hypergradient must equal the gradient
/// of θ ↦ L_q(φ*(θ)). (Conv-4's ReLU and max-pool kinks keep plain gradient
/// descent from converging tightly enough for this check.)
struct Softmax<'a> {
    features: &'a Tensor<Flex>,
    one_hot: &'a Tensor<Flex>,
}

impl Objective<Flex> for Softmax<'_> {
    fn eval<B: metagrad::autodiff::tensor::Level<Base = Flex>>(&self, p: &[Tensor<B>]) -> Tensor<B> {
        let logits = metagrad::models::linear(&Tensor::from_base(self.features), &p[0], &p[1]);
        logits.cross_entropy(&Tensor::from_base(self.one_hot))
    }
}

#[test]
fn implicit_is_the_exact_hypergradient_when_the_inner_problem_converges() {
    let mut r = rng(11);
    let (classes, dim) = (3, 6);
    let labelled = |r: &mut rand_chacha::ChaCha8Rng, n: usize| {
        let x = random_tensor(r, &[n, dim], 1.0);
        let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
        let y = Tensor::from_f64(&metagrad::autodiff::tensor::one_hot(&labels, classes), &[n, classes], F64, &DEV);
        (x, y)
    };
    let (xs, ys) = labelled(&mut r, 9);
    let (xq, yq) = labelled(&mut r, 12);
    let s = Softmax { features: &xs, one_hot: &ys };
    let q = Softmax { features: &xq, one_hot: &yq };
    let theta = vec![random_tensor(&mut r, &[classes, dim], 0.5), random_tensor(&mut r, &[classes], 0.5)];
    let lambda = 0.5;
    let inner = InnerLoop::new(400, 0.5);
    let result = implicit(&s, &q, &theta, &inner, lambda, 40);
    let meta = |t: &[Tensor<Flex>]| q.eval(&proximal_adapt(&s, t, &inner, lambda)).item();
    let gnorm = norm(&flatten(&result.grad));
    for seed in 0..3 {
        let d = random_unit_direction(&mut rng(90 + seed), &theta);
        let numeric = fd_directional(&meta, &theta, &d);
        let fd_err = (dot_all(&result.grad, &d) - numeric).abs() / gnorm;
        assert!(fd_err < 1e-6, "implicit hypergradient off the finite differences of the proximal meta-loss by {fd_err:.2e}");
    }
    // Too few CG steps give a visibly different answer: the test can fail.
    let rough = implicit(&s, &q, &theta, &inner, lambda, 1);
    assert!(relative_error(&flatten(&rough.grad), &flatten(&result.grad)) > 1e-4);
}

#[test]
fn bad_settings_are_named_with_their_allowed_range() {
    let ok = InnerLoop::new(1, 0.1);
    let msg = |m: Mode, i: InnerLoop| format!("{:#}", m.validate(&i).unwrap_err());
    assert!(msg(Mode::Ufo(QRule::Fixed(0.0)), ok).contains("q = 0: the exact-branch probability must be in (0, 1]"));
    assert!(msg(Mode::Ufo(QRule::Fixed(1.5)), ok).contains("q = 1.5"));
    assert!(msg(Mode::implicit(0.0, 5), ok).contains("lambda = 0"));
    assert!(msg(Mode::implicit(-1.0, 5), ok).contains("must be > 0"));
    assert!(msg(Mode::implicit(1.0, 0), ok).contains("cg steps = 0"));
    let damped = |c, d| Mode::Implicit { lambda: 1.0, cg_steps: 5, variant: ImplicitVariant { inner_solve: InnerSolve::PullBack, cg_damping: c, lambda_damping: d } };
    assert!(msg(damped(-1.0, 0.0), ok).contains("cg damping = -1"));
    assert!(msg(damped(0.0, f64::NAN), ok).contains("must be finite numbers ≥ 0"));
    assert!(msg(Mode::Maml, InnerLoop::new(0, 0.1)).contains("inner steps = 0"));
    assert!(msg(Mode::Fomaml, InnerLoop::new(1, -0.1)).contains("inner learning rate = -0.1"));
    assert!(Mode::Ufo(QRule::Fixed(1.0)).validate(&ok).is_ok());
}

