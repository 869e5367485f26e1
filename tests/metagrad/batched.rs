//! The stacked meta-batch equals the task-by-task path, for every mode (f64).

use metagrad::batched::{batched_hypergradient, conjugate_gradient_tasks, replicate, StackedLoss, TaskBatch, task_by_task_hypergradient, task_sum};
use metagrad::data::episode::{Episode, LabelledImages};
use metagrad::hypergrad::{AdaptiveQ, InnerLoop, Mode, QRule, conjugate_gradient, task_hypergradient};
use metagrad::models::conv4::{BatchLoss, Conv4};
use metagrad::autodiff::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{Cpu, DEV, F64};

const MODEL: Conv4 = Conv4 { in_channels: 2, image_size: 16, channels: 4, way: 3 };

fn episodes(tasks: usize, seed: u64) -> Vec<Episode> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut part = |n: usize| LabelledImages {
        images: (0..n * 2 * 16 * 16).map(|_| rng.random::<f32>()).collect(),
        shape: [n, 2, 16, 16],
        labels: (0..n).map(|i| i % 3).collect(),
    };
    (0..tasks).map(|_| Episode { way: 3, support: part(6), query: part(9) }).collect()
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
        let r = task_hypergradient(mode, &MODEL, &e.to_task::<Cpu>(F64, &DEV), theta, inner, rng);
        losses.push(r.hypergradient.query_loss);
        accs.push(r.query_accuracy);
        sum = Some(match sum {
            None => r.hypergradient.grad,
            Some(s) => s.iter().zip(&r.hypergradient.grad).map(|(a, b)| a.add(b)).collect(),
        });
    }
    (sum.unwrap().iter().map(|g| g.mul_scalar(1.0 / eps.len() as f64)).collect(), losses, accs)
}

#[test]
fn stacked_forward_and_loss_equal_each_task_alone() {
    let eps = episodes(3, 1);
    let thetas: Vec<Vec<Tensor<Cpu>>> = (0..3).map(|s| MODEL.init::<Cpu>(s, F64, &DEV)).collect();
    let stacked: Vec<Tensor<Cpu>> = (0..thetas[0].len()).map(|i| Tensor::cat(&thetas.iter().map(|t| t[i].clone()).collect::<Vec<_>>(), 0)).collect();
    let refs: Vec<&Episode> = eps.iter().collect();
    let batch = TaskBatch::<Cpu>::new(&refs, F64, &DEV);
    let loss = metagrad::autodiff::diff::Objective::eval(&StackedLoss { model: &MODEL, batch: &batch.query }, &stacked).item();
    let alone: f64 = eps
        .iter()
        .zip(&thetas)
        .map(|(e, t)| metagrad::autodiff::diff::Objective::eval(&BatchLoss { model: &MODEL, batch: &e.to_task::<Cpu>(F64, &DEV).query }, t).item())
        .sum();
    assert!((loss - alone).abs() < 1e-12 * alone.abs(), "{loss} vs {alone}");
    // The gradient of the sum splits into each task's own gradient.
    let (_, g) = metagrad::autodiff::diff::value_and_grad(&StackedLoss { model: &MODEL, batch: &batch.support }, &replicate(&thetas[0], 3));
    let mut per_task = vec![];
    for e in &eps {
        let task = e.to_task::<Cpu>(F64, &DEV);
        per_task.push(metagrad::autodiff::diff::value_and_grad(&BatchLoss { model: &MODEL, batch: &task.support }, &thetas[0]).1);
    }
    let summed: Vec<Tensor<Cpu>> = (0..per_task[0].len()).map(|i| per_task.iter().map(|g| g[i].clone()).reduce(|a, b| a.add(&b)).unwrap()).collect();
    close(&task_sum(&g, 3), &summed, "gradient of the stacked loss");
}

#[test]
fn every_mode_equals_the_task_by_task_path() {
    let eps = episodes(4, 2);
    let refs: Vec<&Episode> = eps.iter().collect();
    let theta = MODEL.init::<Cpu>(7, F64, &DEV);
    let cases: Vec<(Mode, InnerLoop)> = vec![
        (Mode::Maml, InnerLoop { steps: 2, lr: 0.3 }),
        (Mode::MamlUnrolled, InnerLoop { steps: 2, lr: 0.3 }),
        (Mode::Fomaml, InnerLoop { steps: 3, lr: 0.3 }),
        (Mode::Ufo(QRule::Fixed(0.5)), InnerLoop { steps: 2, lr: 0.3 }),
        (Mode::Implicit { lambda: 2.0, cg_steps: 4 }, InnerLoop { steps: 3, lr: 0.1 }),
    ];
    for (mode, inner) in cases {
        let (mut a, mut b) = (mode.clone(), mode.clone());
        let (want, losses, accs) = one_by_one(&mut a, &eps, &theta, &inner, &mut ChaCha8Rng::seed_from_u64(3));
        let got = batched_hypergradient(&mut b, &MODEL, &refs, &theta, &inner, F64, &DEV, &mut ChaCha8Rng::seed_from_u64(3));
        close(&got.grad, &want, mode.name());
        for (x, y) in got.query_losses.iter().zip(&losses) {
            assert!((x - y).abs() < 1e-10, "{}: query loss {x} vs {y}", mode.name());
        }
        assert_eq!(got.query_accuracies, accs, "{}", mode.name());
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
    let refs: Vec<&Episode> = eps.iter().collect();
    let theta = MODEL.init::<Cpu>(2, F64, &DEV);
    let inner = InnerLoop { steps: 2, lr: 0.3 };
    let cases = vec![
        Mode::Maml,
        Mode::Fomaml,
        Mode::Ufo(QRule::Fixed(0.5)),
        Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.5))),
        Mode::Implicit { lambda: 2.0, cg_steps: 3 },
    ];
    for mode in cases {
        let (mut a, mut b) = (mode.clone(), mode.clone());
        let got = task_by_task_hypergradient(&mut a, &MODEL, &refs, &theta, &inner, F64, &DEV, &mut ChaCha8Rng::seed_from_u64(9));
        let want = batched_hypergradient(&mut b, &MODEL, &refs, &theta, &inner, F64, &DEV, &mut ChaCha8Rng::seed_from_u64(9));
        close(&got.grad, &want.grad, mode.name());
        for (x, y) in got.query_losses.iter().zip(&want.query_losses) {
            assert!((x - y).abs() < 1e-10, "{}: query loss {x} vs {y}", mode.name());
        }
        assert_eq!(got.query_accuracies, want.query_accuracies, "{}", mode.name());
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
    let refs: Vec<&Episode> = eps.iter().collect();
    let theta = MODEL.init::<Cpu>(1, F64, &DEV);
    let inner = InnerLoop { steps: 2, lr: 0.3 };
    let mut mode = Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.6)));
    let got = batched_hypergradient(&mut mode, &MODEL, &refs, &theta, &inner, F64, &DEV, &mut ChaCha8Rng::seed_from_u64(5));
    // The same observations made from each exact task's own fomaml and maml gradients.
    let mut expected = AdaptiveQ::new(0.6);
    for (e, &exact) in eps.iter().zip(&got.exact) {
        if exact {
            let task = e.to_task::<Cpu>(F64, &DEV);
            let fo = task_hypergradient(&mut Mode::Fomaml, &MODEL, &task, &theta, &inner, &mut ChaCha8Rng::seed_from_u64(0)).hypergradient.grad;
            let ex = task_hypergradient(&mut Mode::Maml, &MODEL, &task, &theta, &inner, &mut ChaCha8Rng::seed_from_u64(0)).hypergradient.grad;
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
    let refs: Vec<&Episode> = eps.iter().collect();
    let theta = MODEL.init::<Cpu>(2, F64, &DEV);
    let batch = TaskBatch::<Cpu>::new(&refs, F64, &DEV);
    let support = StackedLoss { model: &MODEL, batch: &batch.support };
    let phi = replicate(&theta, 3);
    let (_, b) = metagrad::autodiff::diff::value_and_grad(&StackedLoss { model: &MODEL, batch: &batch.query }, &phi);
    // Few steps (each task stops at its own point) and many (every task converges or stops on curvature).
    for steps in [2, 12] {
        let x = conjugate_gradient_tasks(&support, &phi, &b, 0.5, steps, 3);
        let mut alone = vec![];
        for e in &eps {
            let task = e.to_task::<Cpu>(F64, &DEV);
            let s = BatchLoss { model: &MODEL, batch: &task.support };
            let (_, bq) = metagrad::autodiff::diff::value_and_grad(&BatchLoss { model: &MODEL, batch: &task.query }, &theta);
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
    const WIDE: Conv4 = Conv4 { in_channels: 1, image_size: 20, channels: 16, way: 3 };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut part = |n: usize| LabelledImages {
        images: (0..n * 20 * 20).map(|_| rng.random::<f32>()).collect(),
        shape: [n, 1, 20, 20],
        labels: (0..n).map(|i| i % 3).collect(),
    };
    let eps: Vec<Episode> = (0..3).map(|_| Episode { way: 3, support: part(3), query: part(6) }).collect();
    let refs: Vec<&Episode> = eps.iter().collect();
    let theta = WIDE.init::<Cpu>(5, F64, &DEV);
    let cases: Vec<(Mode, InnerLoop)> = vec![
        (Mode::Maml, InnerLoop { steps: 2, lr: 0.3 }),
        (Mode::Fomaml, InnerLoop { steps: 2, lr: 0.3 }),
        (Mode::Ufo(QRule::Fixed(0.5)), InnerLoop { steps: 2, lr: 0.3 }),
        (Mode::Implicit { lambda: 2.0, cg_steps: 3 }, InnerLoop { steps: 2, lr: 0.1 }),
    ];
    for (mode, inner) in cases {
        for stacked in [false, true] {
            let run = || {
                let mut m = mode.clone();
                let mut rng = ChaCha8Rng::seed_from_u64(4);
                if stacked {
                    batched_hypergradient(&mut m, &WIDE, &refs, &theta, &inner, F64, &DEV, &mut rng)
                } else {
                    task_by_task_hypergradient(&mut m, &WIDE, &refs, &theta, &inner, F64, &DEV, &mut rng)
                }
            };
            let native = run();
            let reference = metagrad::autodiff::kernels::with_reference_ops(run);
            let what = format!("{} ({})", mode.name(), if stacked { "stacked" } else { "task by task" });
            close(&native.grad, &reference.grad, &what);
            for (x, y) in native.query_losses.iter().zip(&reference.query_losses) {
                assert!((x - y).abs() < 1e-10, "{what}: query loss {x} vs {y}");
            }
        }
    }
}
