//! The Conv-4 model: names and shapes, whole-model gradients at the outer
//! level against single-level autodiff, Hessian-vector products against
//! finite differences and symmetry, and MAML meta-gradients against finite
//! differences of θ ↦ L_q(φ_r(θ)).

use burn::backend::Flex;
use metagrad::bench::random_batch;
use metagrad::autodiff::diff::{Objective, dot_all, hvp, lift, value_and_grad};
use metagrad::hypergrad::{InnerLoop, fomaml, maml, maml_unrolled, meta_loss};
use metagrad::data::Examples;
use metagrad::hypergrad::TaskLoss;
use metagrad::models::conv4::Downsample;
use metagrad::models::{Conv4, FunctionalModel};
use metagrad::autodiff::tensor::Tensor;

use crate::common::*;

/// A narrow Conv-4 on Omniglot-shaped images keeps the f64 checks quick; the
/// full-width shapes are checked separately.
fn small_omniglot() -> Conv4 {
    Conv4 { channels: 8, ..Conv4::omniglot(5) }
}

fn task(model: &Conv4, support: usize, query: usize, seed: u64) -> (Vec<Tensor<Flex>>, Examples, Examples) {
    let theta = model.init::<Flex>(seed, F64, &DEV).into_tensors();
    (theta, random_batch(model, support, seed + 1), random_batch(model, query, seed + 2))
}

fn batch_loss<'a>(model: &'a Conv4, examples: &'a Examples) -> TaskLoss<'a, Conv4, Flex> {
    TaskLoss::single(model, examples, F64, &DEV)
}

#[test]
fn parameter_names_and_shapes_are_pytorchs() {
    let omniglot = Conv4::omniglot(5);
    assert_eq!(omniglot.features(), 64);
    let mini = Conv4::mini_imagenet(5);
    assert_eq!(mini.features(), 800);
    let names: Vec<String> = omniglot.parameter_shapes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(&names[..4], ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"]);
    assert_eq!(&names[16..], ["head.weight", "head.bias"]);
    let shapes = mini.parameter_shapes();
    assert_eq!(shapes[0].1, vec![32, 3, 3, 3]);
    assert_eq!(shapes[4].1, vec![32, 32, 3, 3]);
    assert_eq!(shapes[16].1, vec![5, 800]);
    // 4 blocks of conv (w, b) + bn (w, b) and the head.
    assert_eq!(omniglot.parameter_count(), (64 * 9 + 64 * 3) + 3 * (64 * 64 * 9 + 64 * 3) + 5 * 64 + 5);
}

#[test]
fn forward_gives_logits_per_image_for_both_dataset_shapes() {
    for model in [Conv4::omniglot(5), Conv4::mini_imagenet(5)] {
        let (theta, support, _) = task(&model, 5, 1, 1);
        let logits = model.forward(&theta, &model.inputs::<Flex>(&support, F64, &DEV), 1);
        assert_eq!(logits.dims(), vec![5, 5]);
        assert!(logits.to_vec().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn whole_model_gradient_at_outer_level_equals_single_level_gradient() {
    let model = Conv4::omniglot(5);
    let (theta, support, _) = task(&model, 5, 1, 2);
    let loss = batch_loss(&model, &support);
    let (value, single) = value_and_grad(&loss, &theta);
    let (nested_value, nested) = value_and_grad(&loss, &lift(&theta));
    let nested: Vec<Tensor<Flex>> = nested.iter().map(|g| g.to_base()).collect();
    let err = relative_error(&flatten(&nested), &flatten(&single));
    assert!(err < 1e-12, "outer-level gradient differs from Autodiff<Flex> gradient: {err:.2e}");
    assert!((value.item() - nested_value.item()).abs() < 1e-14);
    assert!(norm(&flatten(&single)) > 1e-3, "gradient should not vanish");
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    let model = small_omniglot();
    let (theta, support, _) = task(&model, 5, 1, 3);
    let loss = batch_loss(&model, &support);
    let (_, grad) = value_and_grad(&loss, &theta);
    let gnorm = norm(&flatten(&grad));
    let mut r = rng(30);
    for _ in 0..3 {
        let d = random_unit_direction(&mut r, &theta);
        let numeric = fd_directional(&|p| loss.eval(p).item(), &theta, &d);
        let err = (dot_all(&grad, &d) - numeric).abs() / gnorm;
        assert!(err < 1e-6, "directional derivative off by {err:.2e} (relative to ‖∇L‖)");
    }
}

#[test]
fn model_hessian_vector_products_match_finite_differences_and_are_symmetric() {
    let model = small_omniglot();
    let (theta, support, _) = task(&model, 5, 1, 4);
    let loss = batch_loss(&model, &support);
    let mut r = rng(40);
    let u = random_unit_direction(&mut r, &theta);
    let v = random_unit_direction(&mut r, &theta);
    let (_, _, hu) = hvp(&loss, &theta, &u);
    let (_, _, hv) = hvp(&loss, &theta, &v);
    let err = relative_error(&flatten(&hv), &fd_hvp(&loss, &theta, &v));
    assert!(err < 1e-6, "H·v differs from finite differences of gradients by {err:.2e}");
    let (uhv, vhu) = (dot_all(&u, &hv), dot_all(&v, &hu));
    assert!((uhv - vhu).abs() <= 1e-10 * uhv.abs().max(vhu.abs()).max(1e-8), "u·Hv = {uhv} but v·Hu = {vhu}");
}

#[test]
fn full_width_omniglot_hvp_matches_finite_differences() {
    let model = Conv4::omniglot(5);
    let (theta, support, _) = task(&model, 5, 1, 5);
    let loss = batch_loss(&model, &support);
    let v = random_unit_direction(&mut rng(50), &theta);
    let (_, _, hv) = hvp(&loss, &theta, &v);
    let err = relative_error(&flatten(&hv), &fd_hvp(&loss, &theta, &v));
    assert!(err < 1e-6, "H·v off by {err:.2e}");
}

/// MAML meta-gradients for r = 1 and 2, both implementations, against
/// central differences of θ ↦ L_q(φ_r(θ)); FO-MAML must be visibly off.
#[test]
fn maml_meta_gradients_match_finite_differences_of_the_meta_loss() {
    let model = small_omniglot();
    let (theta, support, query) = task(&model, 5, 10, 6);
    let s = batch_loss(&model, &support);
    let q = batch_loss(&model, &query);
    for steps in [1, 2] {
        let inner = InnerLoop::new(steps, 0.4);
        let unrolled = maml_unrolled(&s, &q, &theta, &inner).grad;
        let sweep = maml(&s, &q, &theta, &inner).grad;
        let first_order = fomaml(&s, &q, &theta, &inner).grad;
        let agree = relative_error(&flatten(&sweep), &flatten(&unrolled));
        assert!(agree < 1e-10, "r={steps}: sweep and unrolled MAML differ by {agree:.2e}");
        let gnorm = norm(&flatten(&unrolled));
        let mut r = rng(60 + steps as u64);
        for _ in 0..3 {
            let d = random_unit_direction(&mut r, &theta);
            let numeric = fd_directional(&|p| meta_loss(&s, &q, p, &inner), &theta, &d);
            let err = (dot_all(&unrolled, &d) - numeric).abs() / gnorm;
            assert!(err < 1e-6, "r={steps}: MAML meta-gradient off by {err:.2e} along a random direction");
        }
        let fo_total = relative_error(&flatten(&first_order), &flatten(&unrolled));
        assert!(fo_total > 1e-3, "r={steps}: FO-MAML should differ from exact MAML, got {fo_total:.2e}");
    }
}

/// The MAML paper's Omniglot network: stride-2 blocks (28 → 14 → 7 → 4 → 2)
/// and the mean of the last feature map, so its parameters have the
/// max-pool network's names and shapes but it computes another function.
#[test]
fn strided_conv4_has_the_papers_shapes_and_differs_from_the_max_pool_one() {
    let pooled = Conv4::omniglot(5);
    let strided = pooled.with_downsample(Downsample::Stride);
    assert_eq!((strided.final_size(), strided.features()), (2, 64));
    assert_eq!(strided.parameter_shapes(), pooled.parameter_shapes());
    let mini = Conv4::mini_imagenet(5).with_downsample(Downsample::Stride);
    assert_eq!((mini.final_size(), mini.features()), (6, 32));
    let (theta, support, _) = task(&strided, 5, 1, 7);
    let logits = |model: &Conv4| model.forward(&theta, &model.inputs::<Flex>(&support, F64, &DEV), 1).to_vec();
    let (a, b) = (logits(&strided), logits(&pooled));
    assert_eq!(a.len(), 25);
    assert!(relative_error(&a, &b) > 1e-2, "the strided network should compute other logits");
    assert!(strided.describe().contains("strided"), "{}", strided.describe());
}

/// The strided network at both autodiff levels: its gradient against finite
/// differences, its Hessian-vector products against finite differences of
/// gradients, and its MAML meta-gradient (r = 2) against finite differences
/// of the meta-loss, on both kernel paths.
#[test]
fn strided_conv4_gradients_hvps_and_meta_gradients_match_finite_differences() {
    let model = small_omniglot().with_downsample(Downsample::Stride);
    let (theta, support, query) = task(&model, 5, 5, 8);
    let (s, q) = (batch_loss(&model, &support), batch_loss(&model, &query));
    let check = |path: &str| {
        let (_, grad) = value_and_grad(&s, &theta);
        let mut r = rng(80);
        let d = random_unit_direction(&mut r, &theta);
        let numeric = fd_directional(&|p| s.eval(p).item(), &theta, &d);
        let first = (dot_all(&grad, &d) - numeric).abs() / norm(&flatten(&grad));
        assert!(first < 1e-6, "{path}: directional derivative off by {first:.2e}");
        let (_, _, hd) = hvp(&s, &theta, &d);
        let second = relative_error(&flatten(&hd), &fd_hvp(&s, &theta, &d));
        assert!(second < 1e-6, "{path}: H·v off by {second:.2e}");
        let inner = InnerLoop::new(2, 0.4);
        let sweep = maml(&s, &q, &theta, &inner).grad;
        let unrolled = maml_unrolled(&s, &q, &theta, &inner).grad;
        let agree = relative_error(&flatten(&sweep), &flatten(&unrolled));
        assert!(agree < 1e-10, "{path}: sweep and unrolled MAML differ by {agree:.2e}");
        let numeric = fd_directional(&|p| meta_loss(&s, &q, p, &inner), &theta, &d);
        let meta = (dot_all(&sweep, &d) - numeric).abs() / norm(&flatten(&sweep));
        assert!(meta < 1e-6, "{path}: MAML meta-gradient off by {meta:.2e}");
        (flatten(&grad), flatten(&sweep))
    };
    let (grad, meta) = check("native");
    let (ref_grad, ref_meta) = metagrad::autodiff::kernels::with_reference_ops(|| check("reference"));
    let (e_grad, e_meta) = (relative_error(&grad, &ref_grad), relative_error(&meta, &ref_meta));
    assert!(e_grad < 1e-10 && e_meta < 1e-10, "native and reference paths differ: gradient {e_grad:.2e}, meta-gradient {e_meta:.2e}");
}
