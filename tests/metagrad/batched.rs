//! The stacked meta-batch equals the task-by-task path, for every mode (f64).

use metagrad::autodiff::diff::{Objective, value_and_grad};
use metagrad::autodiff::tensor::Tensor;
use metagrad::data::Task;
use metagrad::data::episode::{Episode, LabelledImages};
use metagrad::hypergrad::stack::{replicate, task_sum};
use metagrad::hypergrad::{AdaptiveQ, Batching, InnerLoop, MetaGradient, Mode, QRule, TaskLoss, TaskScores, conjugate_gradient, meta_gradient, task_hypergradient};
use metagrad::models::conv4::Downsample;
use metagrad::models::{Conv4, FunctionalModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{Cpu, DEV, F64, random_episodes};

const MODEL: Conv4 = Conv4 { in_channels: 2, image_size: 16, channels: 4, way: 3, downsample: Downsample::MaxPool };

fn episodes(tasks: usize, seed: u64) -> Vec<Episode> {
    random_episodes(tasks, seed)
}

fn tasks(eps: &[Episode]) -> Vec<Task> {
    eps.iter().map(Episode::task).collect()
}

/// A meta-batch's mean hypergradient and what it measured.
fn meta(mode: &mut Mode, model: &Conv4, tasks: &[Task], theta: &[Tensor<Cpu>], inner: &InnerLoop, batching: Batching, rng: &mut ChaCha8Rng) -> (MetaGradient<Cpu>, TaskScores) {
    let refs: Vec<&Task> = tasks.iter().collect();
    let g = meta_gradient(mode, model, &refs, theta, inner, batching, rng);
    let scores = g.read();
    (g, scores)
}

fn close(a: &[Tensor<Cpu>], b: &[Tensor<Cpu>], what: &str) {
    // Relative to the largest entry over all parameters: some (conv biases
    // before batch norm) have gradients that are zero up to rounding.
    let (a, b): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (a.iter().map(|t| t.to_vec()).collect(), b.iter().map(|t| t.to_vec()).collect());
    assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), b.iter().map(Vec::len).collect::<Vec<_>>(), "{what}: shapes differ");
    let scale = b.iter().flatten().map(|v| v.abs()).fold(0.0, f64::max);
    let err = a.iter().flatten().zip(b.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
    assert!(scale > 0.0 && err <= 1e-10 * scale, "{what}: max difference {err} (largest entry {scale})");
}

/// Task by task: the mean hypergradient, per-task losses and accuracies.
fn one_by_one(mode: &mut Mode, eps: &[Episode], theta: &[Tensor<Cpu>], inner: &InnerLoop, rng: &mut ChaCha8Rng) -> (Vec<Tensor<Cpu>>, Vec<f64>, Vec<f64>) {
    let (mut sum, mut losses, mut accs) = (None::<Vec<Tensor<Cpu>>>, vec![], vec![]);
    for e in eps {
        let (h, accuracy) = task_hypergradient(mode, &MODEL, &e.task(), theta, inner, rng);
        losses.push(h.query_loss());
        accs.push(accuracy.unwrap());
        sum = Some(match sum {
            None => h.grad,
            Some(s) => s.iter().zip(&h.grad).map(|(a, b)| a.add(b)).collect(),
        });
    }
    (sum.unwrap().iter().map(|g| g.mul_scalar(1.0 / eps.len() as f64)).collect(), losses, accs)
}

#[test]
fn stacked_forward_and_loss_equal_each_task_alone() {
    let eps = episodes(3, 1);
    let ts = tasks(&eps);
    let thetas: Vec<Vec<Tensor<Cpu>>> = (0..3).map(|s| MODEL.init::<Cpu>(s, F64, &DEV).into_tensors()).collect();
    let stacked: Vec<Tensor<Cpu>> = (0..thetas[0].len()).map(|i| Tensor::cat(&thetas.iter().map(|t| t[i].clone()).collect::<Vec<_>>(), 0)).collect();
    let queries: Vec<_> = ts.iter().map(|t| &t.query).collect();
    let supports: Vec<_> = ts.iter().map(|t| &t.support).collect();
    let query_loss = TaskLoss::<_, Cpu>::new(&MODEL, &queries, F64, &DEV);
    let evaluation = query_loss.evaluate(&stacked);
    let loss = evaluation.loss.item();
    let alone: Vec<f64> = ts.iter().zip(&thetas).map(|(t, th)| TaskLoss::<_, Cpu>::single(&MODEL, &t.query, F64, &DEV).eval(th).item()).collect();
    let total: f64 = alone.iter().sum();
    assert!((loss - total).abs() < 1e-12 * total.abs(), "{loss} vs {total}");
    // Each task's own loss from the stacked evaluation.
    for (x, y) in query_loss.task_losses(&evaluation).to_vec().iter().zip(&alone) {
        assert!((x - y).abs() < 1e-12 * y.abs(), "task loss {x} vs {y}");
    }
    // The gradient of the sum splits into each task's own gradient.
    let (_, g) = value_and_grad(&TaskLoss::<_, Cpu>::new(&MODEL, &supports, F64, &DEV), &replicate(&thetas[0], 3));
    let mut per_task = vec![];
    for t in &ts {
        per_task.push(value_and_grad(&TaskLoss::<_, Cpu>::single(&MODEL, &t.support, F64, &DEV), &thetas[0]).1);
    }
    let summed: Vec<Tensor<Cpu>> = (0..per_task[0].len()).map(|i| per_task.iter().map(|g| g[i].clone()).reduce(|a, b| a.add(&b)).unwrap()).collect();
    close(&task_sum(&g, 3), &summed, "gradient of the stacked loss");
}

#[test]
fn every_mode_equals_the_task_by_task_path() {
    let eps = episodes(4, 2);
    let ts = tasks(&eps);
    let theta = MODEL.init::<Cpu>(7, F64, &DEV);
    let cases: Vec<(Mode, InnerLoop)> = vec![
        (Mode::Maml, InnerLoop::new(2, 0.3)),
        (Mode::MamlUnrolled, InnerLoop::new(2, 0.3)),
        (Mode::Fomaml, InnerLoop::new(3, 0.3)),
        (Mode::Ufo(QRule::Fixed(0.5)), InnerLoop::new(2, 0.3)),
        (Mode::implicit(2.0, 4), InnerLoop::new(3, 0.1)),
        (Mode::Neumann { lambda: 2.0, steps: 4, lr: 0.3, hvp_batch: None, inner_batch: None }, InnerLoop::new(3, 0.1)),
        (Mode::FixedPoint { lambda: 2.0, steps: 4, hvp_batch: None, inner_batch: None }, InnerLoop::new(3, 0.1)),
    ];
    for (mode, inner) in cases {
        let (mut a, mut b) = (mode.clone(), mode.clone());
        let (want, losses, accs) = one_by_one(&mut a, &eps, &theta, &inner, &mut ChaCha8Rng::seed_from_u64(3));
        let (got, scores) = meta(&mut b, &MODEL, &ts, &theta, &inner, Batching::Stacked, &mut ChaCha8Rng::seed_from_u64(3));
        close(&got.grad, &want, mode.name());
        for (x, y) in scores.losses.iter().zip(&losses) {
            assert!((x - y).abs() < 1e-10, "{}: query loss {x} vs {y}", mode.name());
        }
        assert_eq!(scores.accuracies.unwrap(), accs, "{}", mode.name());
        if let Mode::Ufo(_) = mode {
            // Same draws, task by task: some tasks exact, some not, with this seed.
            assert!(got.exact.iter().any(|&e| e) && got.exact.iter().any(|&e| !e), "{:?}", got.exact);
        }
    }
}

#[test]
fn parallel_task_by_task_path_equals_the_stacked_one() {
    // Tasks run on parallel threads; ufo draws in task order with the q of the
    // meta-batch's start and an adaptive rule observes afterwards, exactly as
    // the stacked path does.
    let eps = episodes(5, 8);
    let ts = tasks(&eps);
    let theta = MODEL.init::<Cpu>(2, F64, &DEV);
    let inner = InnerLoop::new(2, 0.3);
    let cases = vec![
        Mode::Maml,
        Mode::Fomaml,
        Mode::Ufo(QRule::Fixed(0.5)),
        Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.5))),
        Mode::implicit(2.0, 3),
    ];
    for mode in cases {
        let (mut a, mut b) = (mode.clone(), mode.clone());
        let (got, got_scores) = meta(&mut a, &MODEL, &ts, &theta, &inner, Batching::TaskByTask, &mut ChaCha8Rng::seed_from_u64(9));
        let (want, want_scores) = meta(&mut b, &MODEL, &ts, &theta, &inner, Batching::Stacked, &mut ChaCha8Rng::seed_from_u64(9));
        close(&got.grad, &want.grad, mode.name());
        for (x, y) in got_scores.losses.iter().zip(&want_scores.losses) {
            assert!((x - y).abs() < 1e-10, "{}: query loss {x} vs {y}", mode.name());
        }
        assert_eq!(got_scores.accuracies, want_scores.accuracies, "{}", mode.name());
        assert!((got_scores.grad_norm - want_scores.grad_norm).abs() < 1e-10 * want_scores.grad_norm, "{}: gradient norm", mode.name());
        assert_eq!((got.q, &got.exact), (want.q, &want.exact), "{}", mode.name());
        if let (Mode::Ufo(QRule::Adaptive(x)), Mode::Ufo(QRule::Adaptive(y))) = (&a, &b) {
            assert!(x.samples > 0 && x.samples == y.samples, "{} vs {} exact samples", x.samples, y.samples);
            assert!((x.d2_avg - y.d2_avg).abs() <= 1e-9 * y.d2_avg.abs() && (x.v2_avg - y.v2_avg).abs() <= 1e-9 * y.v2_avg.abs());
        }
    }
}

#[test]
fn adaptive_ufo_observes_every_exact_task() {
    let eps = episodes(5, 4);
    let ts = tasks(&eps);
    let theta = MODEL.init::<Cpu>(1, F64, &DEV);
    let inner = InnerLoop::new(2, 0.3);
    let mut mode = Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.6)));
    let (got, _) = meta(&mut mode, &MODEL, &ts, &theta, &inner, Batching::Stacked, &mut ChaCha8Rng::seed_from_u64(5));
    // The same observations made from each exact task's own fomaml and maml gradients.
    let mut expected = AdaptiveQ::new(0.6);
    for (e, &exact) in eps.iter().zip(&got.exact) {
        if exact {
            let task = e.task();
            let fo = task_hypergradient(&mut Mode::Fomaml, &MODEL, &task, &theta, &inner, &mut ChaCha8Rng::seed_from_u64(0)).0.grad;
            let ex = task_hypergradient(&mut Mode::Maml, &MODEL, &task, &theta, &inner, &mut ChaCha8Rng::seed_from_u64(0)).0.grad;
            let d: Vec<Tensor<Cpu>> = ex.iter().zip(&fo).map(|(m, f)| m.sub(f)).collect();
            expected.observe(metagrad::autodiff::diff::dot_all(&d, &d), metagrad::autodiff::diff::dot_all(&ex, &ex));
        }
    }
    let Mode::Ufo(QRule::Adaptive(state)) = mode else { unreachable!() };
    assert!(state.samples > 0 && state.samples == expected.samples);
    assert!((state.d2_avg - expected.d2_avg).abs() < 1e-9 * expected.d2_avg.abs().max(1e-30));
    assert!((state.v2_avg - expected.v2_avg).abs() < 1e-9 * expected.v2_avg.abs());
}

#[test]
fn block_conjugate_gradient_equals_each_task_alone() {
    let eps = episodes(3, 6);
    let ts = tasks(&eps);
    let theta = MODEL.init::<Cpu>(2, F64, &DEV);
    let supports: Vec<_> = ts.iter().map(|t| &t.support).collect();
    let queries: Vec<_> = ts.iter().map(|t| &t.query).collect();
    let support = TaskLoss::<_, Cpu>::new(&MODEL, &supports, F64, &DEV);
    let phi = replicate(&theta, 3);
    let (_, b) = value_and_grad(&TaskLoss::<_, Cpu>::new(&MODEL, &queries, F64, &DEV), &phi);
    // Few steps (each task stops at its own point) and many (every task converges or stops on curvature).
    for steps in [2, 12] {
        let x = conjugate_gradient(&support, &phi, &b, 0.5, steps);
        let mut alone = vec![];
        for t in &ts {
            let s = TaskLoss::<_, Cpu>::single(&MODEL, &t.support, F64, &DEV);
            let (_, bq) = value_and_grad(&TaskLoss::<_, Cpu>::single(&MODEL, &t.query, F64, &DEV), &theta);
            alone.push(conjugate_gradient(&s, &theta, &bq, 0.5, steps));
        }
        let stacked: Vec<Tensor<Cpu>> = (0..alone[0].len()).map(|i| Tensor::cat(&alone.iter().map(|a| a[i].clone()).collect::<Vec<_>>(), 0)).collect();
        close(&x, &stacked, &format!("CG with {steps} steps"));
    }
}

#[test]
fn native_kernels_give_the_reference_hypergradient_for_every_mode() {
    // Wide enough (16 channels) for the convolution to split output channels
    // between workers, and 20 pixels wide so that one pooling floors (5 → 2).
    const WIDE: Conv4 = Conv4 { in_channels: 1, image_size: 20, channels: 16, way: 3, downsample: Downsample::MaxPool };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut part = |n: usize| LabelledImages {
        images: (0..n * 20 * 20).map(|_| rng.random::<f32>()).collect(),
        shape: [n, 1, 20, 20],
        labels: (0..n).map(|i| i % 3).collect(),
    };
    let eps: Vec<Episode> = (0..3).map(|_| Episode { way: 3, support: part(3), query: part(6) }).collect();
    let ts = tasks(&eps);
    let theta = WIDE.init::<Cpu>(5, F64, &DEV);
    let cases: Vec<(Mode, InnerLoop)> = vec![
        (Mode::Maml, InnerLoop::new(2, 0.3)),
        (Mode::Fomaml, InnerLoop::new(2, 0.3)),
        (Mode::Ufo(QRule::Fixed(0.5)), InnerLoop::new(2, 0.3)),
        (Mode::implicit(2.0, 3), InnerLoop::new(2, 0.1)),
    ];
    for (mode, inner) in cases {
        for stacked in [false, true] {
            let run = || {
                let mut m = mode.clone();
                let mut rng = ChaCha8Rng::seed_from_u64(4);
                meta(&mut m, &WIDE, &ts, &theta, &inner, if stacked { Batching::Stacked } else { Batching::TaskByTask }, &mut rng)
            };
            let (native, native_scores) = run();
            let (reference, reference_scores) = metagrad::autodiff::kernels::with_reference_ops(run);
            let what = format!("{} ({})", mode.name(), if stacked { "stacked" } else { "task by task" });
            close(&native.grad, &reference.grad, &what);
            for (x, y) in native_scores.losses.iter().zip(&reference_scores.losses) {
                assert!((x - y).abs() < 1e-10, "{what}: query loss {x} vs {y}");
            }
        }
    }
}

#[test]
fn strided_network_stacked_equals_task_by_task() {
    // Stride-2 convolutions with groups = tasks, and the per-task mean of the last map.
    const STRIDED: Conv4 = Conv4 { downsample: Downsample::Stride, ..MODEL };
    let eps = episodes(3, 4);
    let ts = tasks(&eps);
    let theta = STRIDED.init::<Cpu>(5, F64, &DEV);
    let inner = InnerLoop::new(2, 0.3);
    for mode in [Mode::Maml, Mode::Fomaml, Mode::implicit(2.0, 3)] {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let alone: Vec<Vec<Tensor<Cpu>>> = eps.iter().map(|e| task_hypergradient(&mut mode.clone(), &STRIDED, &e.task(), &theta, &inner, &mut rng).0.grad).collect();
        let mean: Vec<Tensor<Cpu>> = (0..alone[0].len())
            .map(|i| alone.iter().map(|g| g[i].clone()).reduce(|a, b| a.add(&b)).unwrap().mul_scalar(1.0 / alone.len() as f64))
            .collect();
        let (stacked, _) = meta(&mut mode.clone(), &STRIDED, &ts, &theta, &inner, Batching::Stacked, &mut ChaCha8Rng::seed_from_u64(1));
        close(&stacked.grad, &mean, mode.name());
    }
}
