//! Head-only adaptation on the trunk's features (hypergrad/head.rs) equals
//! head-only adaptation through the whole model, for every mode, stacked
//! and alone, on a Conv-4 (batch norm in the trunk) and an MLP (f64).

use metagrad::autodiff::tensor::Tensor;
use metagrad::data::Task;
use metagrad::data::episode::Episode;
use metagrad::hypergrad::stack::replicate;
use metagrad::hypergrad::{Adaptation, Adapted, AdaptiveQ, Draws, InnerLoop, Mode, QRule, TaskLoss, adapt_head_only, adapt_to, adapted, estimate, estimate_head_only, proximal_adapt};
use metagrad::models::conv4::Downsample;
use metagrad::models::{Conv4, FunctionalModel, Mlp};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::{Cpu, DEV, F64, assert_mean_within_4_standard_errors, flatten, head_only, random_episodes, sinusoid_tasks, task_losses};

const CONV: Conv4 = Conv4 { in_channels: 2, image_size: 16, channels: 4, way: 3, downsample: Downsample::MaxPool };

fn conv_tasks(tasks: usize, seed: u64) -> Vec<Task> {
    random_episodes(tasks, seed).iter().map(Episode::task).collect()
}


/// The deterministic modes and fixed-q ufo (whose draws are given).
fn modes() -> Vec<Mode> {
    vec![
        Mode::Maml,
        Mode::MamlUnrolled,
        Mode::Fomaml,
        Mode::Ufo(QRule::Fixed(0.5)),
        Mode::implicit(4.0, 4),
        Mode::Neumann { lambda: 4.0, steps: 4, lr: 0.3, hvp_batch: None, inner_batch: None },
        Mode::FixedPoint { lambda: 4.0, steps: 4, hvp_batch: None, inner_batch: None },
    ]
}

fn max_relative_difference(a: &[Tensor<Cpu>], b: &[Tensor<Cpu>]) -> f64 {
    assert_eq!(a.iter().map(|t| t.dims()).collect::<Vec<_>>(), b.iter().map(|t| t.dims()).collect::<Vec<_>>(), "shapes differ");
    let (a, b): (Vec<f64>, Vec<f64>) = (a.iter().flat_map(|t| t.to_vec()).collect(), b.iter().flat_map(|t| t.to_vec()).collect());
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max);
    assert!(scale > 0.0, "an all-zero hypergradient proves nothing");
    a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max) / scale
}

/// For each mode, on T stacked tasks and on one: the feature path's
/// hypergradient, query loss and adapted head against the whole model's.
fn check_equal<M: FunctionalModel>(model: &M, tasks: &[Task], modes: &[Mode], inner: &InnerLoop) {
    let theta = model.init::<Cpu>(3, F64, &DEV).into_tensors();
    for count in [tasks.len(), 1] {
        let supports: Vec<_> = tasks[..count].iter().map(|t| &t.support).collect();
        let queries: Vec<_> = tasks[..count].iter().map(|t| &t.query).collect();
        let (s, q) = (TaskLoss::<_, Cpu>::new(model, &supports, F64, &DEV), TaskLoss::<_, Cpu>::new(model, &queries, F64, &DEV));
        let stacked = replicate(&theta, count);
        for mode in modes {
            // Seed 5 makes ufo draw the exact branch for some tasks and not others.
            let draws = mode.draw(count, inner, &mut ChaCha8Rng::seed_from_u64(5));
            let fast = estimate_head_only(mode, &s, &q, &stacked, inner, draws.as_ref()).expect("a trunk and a linear head");
            let whole = estimate(mode, &s, &q, &stacked, inner, draws.as_ref());
            let what = format!("{} on {} ({count} task(s))", mode.name(), model.describe());
            let err = max_relative_difference(&fast.grad, &whole.grad);
            assert!(err < 1e-10, "{what}: features and whole model differ by {err:.2e}");
            assert!(max_relative_difference(&fast.adapted, &whole.adapted) < 1e-12, "{what}: adapted parameters differ");
            let (a, b) = (fast.query.loss.item(), whole.query.loss.item());
            assert!((a - b).abs() < 1e-12 * b.abs(), "{what}: query loss {a} vs {b}");
            assert_eq!(fast.exact, whole.exact, "{what}: ufo branches");
        }
    }
}

#[test]
fn head_only_on_features_equals_the_whole_model_on_a_conv4() {
    check_equal(&CONV, &conv_tasks(3, 1), &modes(), &head_only(2, 0.1));
}

#[test]
fn head_only_on_features_equals_the_whole_model_on_an_mlp() {
    // An MLP has no batch norm, so the random-subset modes see the same
    // examples in both forms and agree too.
    let mut all = modes();
    all.push(Mode::Neumann { lambda: 4.0, steps: 4, lr: 0.3, hvp_batch: Some(3), inner_batch: Some(4) });
    all.push(Mode::FixedPoint { lambda: 4.0, steps: 4, hvp_batch: Some(2), inner_batch: None });
    check_equal(&Mlp::new(&[1, 8, 8, 1]), &sinusoid_tasks(3, 6, 2), &all, &head_only(3, 0.05));
}

#[test]
fn head_only_on_features_applies_only_where_it_is_exact() {
    let tasks = conv_tasks(1, 4);
    let theta = CONV.init::<Cpu>(0, F64, &DEV).into_tensors();
    let (s, q) = task_losses(&CONV, &tasks[0]);
    let inner = head_only(1, 0.1);
    assert!(estimate_head_only(&Mode::Maml, &s, &q, &theta, &InnerLoop::new(1, 0.1), None).is_none(), "every parameter adapted");
    assert!(estimate_head_only(&Mode::Maml, &s, &q, &theta, &InnerLoop { adapted: Adapted::Last(4), ..inner }, None).is_none(), "more than the head adapted");
    // Adaptive ufo measures its moments over all parameters: the whole model runs.
    let adaptive = Mode::Ufo(QRule::Adaptive(AdaptiveQ::new(0.5)));
    let draws = adaptive.draw(1, &inner, &mut ChaCha8Rng::seed_from_u64(0));
    assert!(estimate_head_only(&adaptive, &s, &q, &theta, &inner, draws.as_ref()).is_none());
    assert!(estimate_head_only(&Mode::Maml, &s, &q, &theta, &inner, None).is_some());
}

#[test]
fn head_only_adaptation_on_features_equals_the_whole_model() {
    let tasks = conv_tasks(1, 6);
    let theta = CONV.init::<Cpu>(2, F64, &DEV).into_tensors();
    let s = TaskLoss::<_, Cpu>::single(&CONV, &tasks[0].support, F64, &DEV);
    let inner = head_only(10, 0.1);
    let fast = adapt_head_only(&s, &theta, &inner, Adaptation::Plain).expect("a trunk and a linear head");
    assert!(max_relative_difference(&fast, &adapted(&s, &theta, &inner)) < 1e-12, "plain inner loop");
    let fast = adapt_head_only(&s, &theta, &inner, Adaptation::PullBack(3.0)).expect("a trunk and a linear head");
    assert!(max_relative_difference(&fast, &adapt_to(&s, &theta, &inner, Adaptation::PullBack(3.0))) < 1e-12, "pulled-back inner loop");
    let fast = adapt_head_only(&s, &theta, &inner, Adaptation::Proximal(3.0)).expect("a trunk and a linear head");
    assert!(max_relative_difference(&fast, &proximal_adapt(&s, &theta, &inner, 3.0)) < 1e-12, "proximal inner loop");
    // The head moved, the trunk did not.
    assert!(max_relative_difference(&fast[16..], &theta[16..]) > 1e-6);
    assert_eq!(fast[..16].iter().map(|t| t.to_vec()).collect::<Vec<_>>(), theta[..16].iter().map(|t| t.to_vec()).collect::<Vec<_>>());
    assert!(adapt_head_only(&s, &theta, &InnerLoop::new(1, 0.1), Adaptation::Plain).is_none());
}

#[test]
fn head_only_random_subsets_average_to_the_full_batch_on_a_conv4() {
    // Batch norm in the trunk: the subsets pick rows of the full-batch
    // features, so each Hessian-vector product's subset Hessian is an
    // unbiased estimate of the full-batch head's, and the series' mean is
    // the deterministic series (independent subsets per product).
    let tasks = conv_tasks(1, 8);
    let theta = CONV.init::<Cpu>(4, F64, &DEV).into_tensors();
    let (s, q) = task_losses(&CONV, &tasks[0]);
    let inner = head_only(2, 0.02);
    let deterministic = Mode::Neumann { lambda: 10.0, steps: 4, lr: 0.3, hvp_batch: None, inner_batch: None };
    let stochastic = Mode::Neumann { lambda: 10.0, steps: 4, lr: 0.3, hvp_batch: Some(3), inner_batch: None };
    let exact = estimate_head_only(&deterministic, &s, &q, &theta, &inner, None).expect("a trunk and a linear head");
    assert!(exact.curvature.is_none(), "the deterministic series must converge cleanly");
    let draws: Vec<Vec<f64>> = (0..300)
        .map(|seed| {
            let h = estimate_head_only(&stochastic, &s, &q, &theta, &inner, Some(&Draws::Subsets(vec![seed]))).expect("a trunk and a linear head");
            assert!(h.curvature.is_none(), "seed {seed}: a stochastic series stopped early");
            flatten(&h.grad)
        })
        .collect();
    assert_mean_within_4_standard_errors(&draws, &flatten(&exact.grad), "head-only neumann with hvp_batch on a Conv-4");
}
