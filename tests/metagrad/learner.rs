//! The library API on a second model: an MLP on sinusoid regression tasks
//! is meta-trainable with every mode through `FunctionalModel` alone, its
//! hypergradients are exact, and a training step reads the device once.

use metagrad::autodiff::tensor::host_reads;
use metagrad::data::Task;
use metagrad::hypergrad::stack::replicate;
use metagrad::hypergrad::{AdaptiveQ, Batching, InnerLoop, Mode, QRule, TaskLoss, estimate, maml, meta_gradient, meta_loss};
use metagrad::learner::MetaLearner;
use metagrad::models::{FunctionalModel, Mlp};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::*;

fn every_mode() -> Vec<Mode> {
    vec![
        Mode::Maml,
        Mode::MamlUnrolled,
        Mode::Fomaml,
        Mode::Ufo(QRule::Fixed(0.5)),
        Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.5))),
        Mode::implicit(2.0, 4),
        Mode::Neumann { lambda: 2.0, steps: 4, lr: 0.02, hvp_batch: None, inner_batch: None },
        Mode::FixedPoint { lambda: 2.0, steps: 4, hvp_batch: None, inner_batch: None },
        Mode::Neumann { lambda: 2.0, steps: 4, lr: 0.02, hvp_batch: Some(3), inner_batch: Some(4) },
    ]
}

#[test]
fn mlp_parameters_have_pytorch_sequential_names() {
    let mlp = Mlp::sinusoid();
    let shapes = mlp.parameter_shapes();
    let names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias", "layers.4.weight", "layers.4.bias"]);
    assert_eq!(shapes[2].1, vec![40, 40]);
    assert_eq!(mlp.parameter_count(), 40 + 40 + 1600 + 40 + 40 + 1);
    let params = mlp.init::<Cpu>(0, F64, &DEV);
    assert_eq!(params.get("layers.4.weight").unwrap().dims(), vec![1, 40]);
}

#[test]
fn mlp_maml_hypergradient_matches_finite_differences() {
    let mlp = Mlp::new(&[1, 8, 8, 1]);
    let theta = mlp.init::<Cpu>(3, F64, &DEV);
    let task = &sinusoid_tasks(1, 5, 4)[0];
    let (s, q) = task_losses(&mlp, task);
    let inner = InnerLoop::new(2, 0.05);
    let g = maml(&s, &q, &theta, &inner).grad;
    let gnorm = norm(&flatten(&g));
    let mut r = rng(5);
    for _ in 0..3 {
        let d = random_unit_direction(&mut r, &theta);
        let numeric = fd_directional(&|p| meta_loss(&s, &q, p, &inner), &theta, &d);
        let err = (metagrad::autodiff::diff::dot_all(&g, &d) - numeric).abs() / gnorm;
        assert!(err < 1e-6, "MLP MAML directional derivative off by {err:.2e}");
    }
}

/// Every mode on the MLP: the stacked tasks give each task's own hypergradient.
#[test]
fn mlp_every_mode_stacked_equals_each_task_alone() {
    let mlp = Mlp::new(&[1, 8, 8, 1]);
    let theta = mlp.init::<Cpu>(1, F64, &DEV);
    let tasks = sinusoid_tasks(3, 5, 9);
    let inner = InnerLoop::new(2, 0.05);
    for mode in every_mode() {
        let refs: Vec<&Task> = tasks.iter().collect();
        let stacked = meta_gradient(&mut mode.clone(), &mlp, &refs, &theta, &inner, Batching::Stacked, &mut ChaCha8Rng::seed_from_u64(2));
        let alone = meta_gradient(&mut mode.clone(), &mlp, &refs, &theta, &inner, Batching::TaskByTask, &mut ChaCha8Rng::seed_from_u64(2));
        let err = relative_error(&flatten(&stacked.grad), &flatten(&alone.grad));
        assert!(err < 1e-10, "{}: stacked and task-by-task MLP hypergradients differ by {err:.2e}", mode.name());
        let (a, b) = (stacked.read(), alone.read());
        assert!(a.accuracies.is_none(), "regression has no accuracy");
        for (x, y) in a.losses.iter().zip(&b.losses) {
            assert!((x - y).abs() < 1e-10 * y.abs().max(1.0), "{}: query loss {x} vs {y}", mode.name());
        }
    }
    // One stack through the dispatch directly, for the exact modes: the same as task by task.
    let refs: Vec<&Task> = tasks.iter().collect();
    let supports: Vec<_> = refs.iter().map(|t| &t.support).collect();
    let queries: Vec<_> = refs.iter().map(|t| &t.query).collect();
    let (s, q) = (TaskLoss::new(&mlp, &supports, F64, &DEV), TaskLoss::new(&mlp, &queries, F64, &DEV));
    let h = estimate(&Mode::Maml, &s, &q, &replicate(&theta, 3), &inner, None);
    assert_eq!(h.grad[0].dims(), vec![3 * 8, 1], "per-task blocks stacked along the first dimension");
}

#[test]
fn mlp_is_meta_trainable_with_every_mode() {
    let mlp = Mlp::new(&[1, 20, 20, 1]);
    let test = sinusoid_tasks(20, 5, 77);
    let mut stream = metagrad::data::sinusoid::SinusoidTasks::new(3);
    let batches: Vec<Vec<Task>> = (0..400).map(|_| (0..8).map(|_| stream.next_task(5, 7).1).collect()).collect();
    for mode in every_mode() {
        // iMAML's hypergradient assumes the proximal problem solved: it gets a few steps.
        let inner = if mode.proximal_lambda().is_some() { InnerLoop::new(5, 0.01) } else { InnerLoop::new(1, 0.02) };
        let mut learner = MetaLearner::new(mlp.clone(), mlp.init::<Cpu>(0, F64, &DEV), mode.clone(), inner, 1e-2).unwrap();
        learner.batching = Batching::Stacked;
        let mse = |l: &MetaLearner<Mlp, Cpu>| test.iter().map(|t| l.evaluate(t, &inner).0).sum::<f64>() / test.len() as f64;
        let before = mse(&learner);
        for batch in &batches {
            learner.step(&batch.iter().collect::<Vec<_>>());
        }
        let after = mse(&learner);
        assert!(after < 0.75 * before, "{}: post-adaptation MSE {before:.3} → {after:.3}", mode.name());
    }
}

#[test]
fn a_training_step_reads_the_device_once() {
    let mlp = Mlp::new(&[1, 8, 8, 1]);
    let tasks = sinusoid_tasks(4, 5, 1);
    let refs: Vec<&Task> = tasks.iter().collect();
    for mode in [Mode::Maml, Mode::Fomaml, Mode::Ufo(QRule::Fixed(0.5))] {
        let mut learner = MetaLearner::new(mlp.clone(), mlp.init::<Cpu>(0, F64, &DEV), mode.clone(), InnerLoop::new(2, 0.05), 1e-3).unwrap();
        learner.batching = Batching::Stacked;
        let before = host_reads();
        let scores = learner.step(&refs);
        let reads = host_reads() - before;
        // ufo's exact branch reads each exact task's (D², V²) for an adaptive rule; fixed q needs none.
        assert_eq!(reads, 1, "{}: {reads} reads from the device in one step", mode.name());
        assert_eq!(scores.losses.len(), 4);
        assert!(scores.grad_norm.is_finite() && scores.grad_norm > 0.0);
    }
}

/// iMAML on the MLP: with the proximal inner problem solved, `implicit` is
/// the gradient of θ ↦ L_q(φ*(θ)).
#[test]
fn mlp_implicit_is_exact_when_the_proximal_problem_converges() {
    let mlp = Mlp::new(&[1, 8, 8, 1]);
    let theta = mlp.init::<Cpu>(0, F64, &DEV);
    let task = &sinusoid_tasks(1, 5, 4)[0];
    let (s, q) = task_losses(&mlp, task);
    for lambda in [10.0, 30.0] {
        let inner = InnerLoop::new(2000, 0.3 / lambda);
        let g = metagrad::hypergrad::implicit(&s, &q, &theta, &inner, lambda, 100).grad;
        let meta = |t: &[metagrad::autodiff::tensor::Tensor<Cpu>]| metagrad::autodiff::diff::Objective::eval(&q, &metagrad::hypergrad::proximal_adapt(&s, t, &inner, lambda)).item();
        let gnorm = norm(&flatten(&g));
        let d = random_unit_direction(&mut rng(3), &theta);
        let numeric = fd_directional(&meta, &theta, &d);
        let err = (metagrad::autodiff::diff::dot_all(&g, &d) - numeric).abs() / gnorm;
        assert!(err < 1e-6, "λ = {lambda}: implicit hypergradient off the finite differences by {err:.2e}");
    }
}

#[test]
fn head_only_maml_is_the_gradient_of_the_head_only_meta_loss() {
    let mlp = Mlp::new(&[1, 8, 8, 1]);
    let theta = mlp.init::<Cpu>(2, F64, &DEV);
    let task = &sinusoid_tasks(1, 5, 6)[0];
    let (s, q) = task_losses(&mlp, task);
    let inner = head_only(3, 0.05);
    let sweep = maml(&s, &q, &theta, &inner);
    let unrolled = metagrad::hypergrad::maml_unrolled(&s, &q, &theta, &inner);
    let agree = relative_error(&flatten(&sweep.grad), &flatten(&unrolled.grad));
    assert!(agree < 1e-10, "head-only sweep and unrolled MAML differ by {agree:.2e}");
    // Only the head moved in the inner loop.
    for (i, (a, t)) in sweep.adapted.iter().zip(theta.iter()).enumerate() {
        assert_eq!(a.to_vec() == t.to_vec(), i < 4, "parameter {i}");
    }
    let gnorm = norm(&flatten(&sweep.grad));
    let mut r = rng(8);
    for _ in 0..3 {
        let d = random_unit_direction(&mut r, &theta);
        let numeric = fd_directional(&|p| meta_loss(&s, &q, p, &inner), &theta, &d);
        let err = (metagrad::autodiff::diff::dot_all(&sweep.grad, &d) - numeric).abs() / gnorm;
        assert!(err < 1e-6, "head-only MAML off the finite differences by {err:.2e}");
    }
    // The trunk's hypergradient carries its effect through the head's adaptation.
    let fo = metagrad::hypergrad::fomaml(&s, &q, &theta, &inner).grad;
    assert!(relative_error(&flatten(&sweep.grad[..4]), &flatten(&fo[..4])) > 1e-4);
}

#[test]
fn head_only_implicit_is_exact_when_the_proximal_problem_converges() {
    let mlp = Mlp::new(&[1, 8, 8, 1]);
    let theta = mlp.init::<Cpu>(0, F64, &DEV);
    let task = &sinusoid_tasks(1, 5, 4)[0];
    let (s, q) = task_losses(&mlp, task);
    let lambda = 10.0;
    let inner = head_only(2000, 0.3 / lambda);
    for mode in [Mode::implicit(lambda, 100), Mode::Neumann { lambda, steps: 400, lr: 0.5, hvp_batch: None, inner_batch: None }] {
        let g = estimate(&mode, &s, &q, &theta, &inner, None).grad;
        let meta = |t: &[metagrad::autodiff::tensor::Tensor<Cpu>]| metagrad::autodiff::diff::Objective::eval(&q, &metagrad::hypergrad::proximal_adapt(&s, t, &inner, lambda)).item();
        let d = random_unit_direction(&mut rng(3), &theta);
        let numeric = fd_directional(&meta, &theta, &d);
        let err = (metagrad::autodiff::diff::dot_all(&g, &d) - numeric).abs() / norm(&flatten(&g));
        assert!(err < 1e-6, "{}: head-only implicit hypergradient off the finite differences by {err:.2e}", mode.name());
    }
}

#[test]
fn head_only_every_mode_stacked_equals_each_task_alone() {
    let mlp = Mlp::new(&[1, 8, 8, 1]);
    let theta = mlp.init::<Cpu>(1, F64, &DEV);
    let tasks = sinusoid_tasks(3, 5, 10);
    let refs: Vec<&Task> = tasks.iter().collect();
    let inner = head_only(2, 0.05);
    for mode in every_mode() {
        let stacked = meta_gradient(&mut mode.clone(), &mlp, &refs, &theta, &inner, Batching::Stacked, &mut ChaCha8Rng::seed_from_u64(2));
        let alone = meta_gradient(&mut mode.clone(), &mlp, &refs, &theta, &inner, Batching::TaskByTask, &mut ChaCha8Rng::seed_from_u64(2));
        let err = relative_error(&flatten(&stacked.grad), &flatten(&alone.grad));
        assert!(err < 1e-10, "{} (head only): stacked and task by task differ by {err:.2e}", mode.name());
    }
}
