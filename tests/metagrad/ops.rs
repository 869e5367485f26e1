//! Every op the model uses: first derivatives against central finite
//! differences, second derivatives (Hessian-vector products through the
//! nested autodiff) against finite differences of gradients, in f64 on Flex.
//! These are the guard that a Burn upgrade has not broken double backward.

use burn::backend::ops::IntTensorOps;
use burn::backend::{TensorData, Flex};
use metagrad::autodiff::diff::{Objective, dot_all, hvp, value_and_grad};
use metagrad::models::conv4::BATCH_NORM_EPS;
use metagrad::models::linear;
use metagrad::autodiff::kernels::{self, Conv3x3Shape, reference};
use metagrad::autodiff::tensor::{Level, Tensor, one_hot};
use burn::backend::tensor::FloatTensor;

use crate::common::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Exp,
    Log,
    Sqrt,
    SumDim,
    MeanDim,
    Matmul,
    BatchedMatmul,
    Transpose,
    SwapDims,
    Cat,
    Reshape,
    Conv2d,
    Conv2dGroups,
    Conv2dStrided,
    Gather,
    Relu,
    MaxPool,
    BatchNorm,
    Linear,
    LogSoftmax,
    CrossEntropy,
    // The native kernels' own backward operations, which the second level differentiates.
    ConvInputGrad,
    ConvWeightGrad,
    ConvInputGradStrided,
    ConvWeightGradStrided,
    BatchNormGrad,
    PoolScatter,
    MaskPositive,
}

/// Input shapes of each op's test case, and whether inputs must be positive.
pub fn case(op: Op) -> (Vec<Vec<usize>>, bool) {
    use Op::*;
    match op {
        Add | Sub | Mul => (vec![vec![2, 3, 4], vec![1, 3, 1]], false),
        Div => (vec![vec![2, 3, 4], vec![2, 3, 4]], true),
        Exp => (vec![vec![3, 4]], false),
        Log | Sqrt => (vec![vec![3, 4]], true),
        SumDim | MeanDim => (vec![vec![2, 3, 4]], false),
        Matmul => (vec![vec![3, 4], vec![4, 5]], false),
        BatchedMatmul => (vec![vec![2, 3, 4], vec![2, 4, 5]], false),
        SwapDims => (vec![vec![2, 3, 4]], false),
        Cat => (vec![vec![2, 3], vec![1, 3]], false),
        Transpose | Reshape => (vec![vec![3, 4]], false),
        Conv2d => (vec![vec![2, 3, 6, 5], vec![4, 3, 3, 3], vec![4]], false),
        Conv2dGroups => (vec![vec![2, 4, 5, 5], vec![6, 2, 3, 3], vec![6]], false),
        // Stride 2, two groups, odd rows and even columns: 7×6 → 4×3.
        Conv2dStrided => (vec![vec![2, 4, 7, 6], vec![6, 2, 3, 3], vec![6]], false),
        Gather => (vec![vec![2, 3, 4]], false),
        Relu => (vec![vec![4, 5]], false),
        MaxPool => (vec![vec![2, 3, 6, 7]], false),
        BatchNorm => (vec![vec![3, 4, 3, 3], vec![4], vec![4]], false),
        Linear => (vec![vec![3, 6], vec![4, 6], vec![4]], false),
        LogSoftmax | CrossEntropy => (vec![vec![4, 5]], false),
        // dy and w; x and dy (grouped, two groups); x, gamma and dy; dy.
        ConvInputGrad => (vec![vec![2, 4, 5, 6], vec![4, 3, 3, 3]], false),
        ConvWeightGrad => (vec![vec![2, 4, 5, 5], vec![2, 6, 5, 5]], false),
        // Stride 2: dy 4×3 back to an 8×5 input (even rows, odd columns); x 7×6 and its dy 4×3.
        ConvInputGradStrided => (vec![vec![2, 4, 4, 3], vec![4, 3, 3, 3]], false),
        ConvWeightGradStrided => (vec![vec![2, 4, 7, 6], vec![2, 6, 4, 3]], false),
        BatchNormGrad => (vec![vec![3, 4, 3, 3], vec![4], vec![3, 4, 3, 3]], false),
        PoolScatter => (vec![vec![2, 3, 3, 3]], false),
        MaskPositive => (vec![vec![3, 4, 5], vec![3, 4, 5]], false),
    }
}

pub const ALL_OPS: [Op; 32] = [
    Op::Add,
    Op::Sub,
    Op::Mul,
    Op::Div,
    Op::Exp,
    Op::Log,
    Op::Sqrt,
    Op::SumDim,
    Op::MeanDim,
    Op::Matmul,
    Op::BatchedMatmul,
    Op::Transpose,
    Op::SwapDims,
    Op::Cat,
    Op::Reshape,
    Op::Conv2d,
    Op::Conv2dGroups,
    Op::Conv2dStrided,
    Op::Gather,
    Op::Relu,
    Op::MaxPool,
    Op::BatchNorm,
    Op::Linear,
    Op::LogSoftmax,
    Op::CrossEntropy,
    Op::ConvInputGrad,
    Op::ConvWeightGrad,
    Op::ConvInputGradStrided,
    Op::ConvWeightGradStrided,
    Op::BatchNormGrad,
    Op::PoolScatter,
    Op::MaskPositive,
];

/// Apply `op` at any level; `aux` holds base-level constants the op needs.
fn apply<B: Level<Base = Base>, Base: Level<Base = Base>>(op: Op, p: &[Tensor<B>], aux: &[Tensor<Base>]) -> Tensor<B> {
    use Op::*;
    match op {
        Add => p[0].add(&p[1]),
        Sub => p[0].sub(&p[1]),
        Mul => p[0].mul(&p[1]),
        Div => p[0].div(&p[1]),
        Exp => p[0].exp(),
        Log => p[0].log(),
        Sqrt => p[0].sqrt(),
        SumDim => p[0].sum_dim(1),
        MeanDim => p[0].mean_dim(2),
        Matmul | BatchedMatmul => p[0].matmul(&p[1]),
        SwapDims => p[0].swap_dims(0, 1),
        Cat => Tensor::cat(&[p[0].clone(), p[1].clone()], 0),
        Transpose => p[0].transpose(),
        Reshape => p[0].reshape(&[2, 6]),
        Conv2d => p[0].conv2d(&p[1], &p[2], 1, 1, 1),
        Conv2dGroups => p[0].conv2d(&p[1], &p[2], 1, 1, 2),
        Conv2dStrided => p[0].conv2d(&p[1], &p[2], 2, 1, 2),
        Gather => {
            let idx = Tensor::<Base>::to_vec(&aux[0]).iter().map(|&v| v as i32).collect::<Vec<_>>();
            let data = TensorData::new(idx, [2, 3, 2]);
            let indices = <Base as IntTensorOps<Base>>::int_from_data(data, &aux[0].device());
            p[0].gather(2, B::int_from_base(indices))
        }
        Relu => p[0].relu(),
        MaxPool => p[0].max_pool2x2(),
        BatchNorm => p[0].batch_norm(&p[1], &p[2], BATCH_NORM_EPS),
        Linear => linear(&p[0], &p[1], &p[2]),
        LogSoftmax => p[0].log_softmax(),
        CrossEntropy => p[0].cross_entropy(&Tensor::from_base(&aux[0])),
        ConvInputGrad | ConvInputGradStrided => {
            let shape = match op {
                ConvInputGrad => Conv3x3Shape { groups: 1, stride: 1, input: [5, 6] },
                _ => Conv3x3Shape { groups: 1, stride: 2, input: [8, 5] },
            };
            on_path::<B>(|| B::conv3x3_input_grad(p[0].0.clone(), p[1].0.clone(), shape), || {
                reference::conv3x3_input_grad::<B>(p[0].0.clone(), p[1].0.clone(), shape)
            })
        }
        ConvWeightGrad | ConvWeightGradStrided => {
            let shape = match op {
                ConvWeightGrad => Conv3x3Shape { groups: 2, stride: 1, input: [5, 5] },
                _ => Conv3x3Shape { groups: 2, stride: 2, input: [7, 6] },
            };
            on_path::<B>(|| B::conv3x3_weight_grad(p[0].0.clone(), p[1].0.clone(), shape), || {
                reference::conv3x3_weight_grad::<B>(p[0].0.clone(), p[1].0.clone(), shape)
            })
        }
        BatchNormGrad => {
            let args = || (p[0].0.clone(), p[1].0.clone(), p[2].0.clone());
            let [dx, dg, db] = if kernels::native::<B>() {
                let (x, g, dy) = args();
                B::batch_norm_on_batch_grad(x, g, dy, BATCH_NORM_EPS)
            } else {
                let (x, g, dy) = args();
                reference::batch_norm_grad::<B>(x, g, dy, BATCH_NORM_EPS)
            };
            let dx = Tensor(dx);
            let n = dx.num_elements();
            Tensor::cat(&[dx.reshape(&[n]), Tensor(dg), Tensor(db)], 0)
        }
        MaskPositive => on_path::<B>(|| B::mask_positive(p[0].0.clone(), p[1].0.clone()), || {
            reference::mask_positive::<B>(p[0].0.clone(), p[1].0.clone())
        }),
        PoolScatter => {
            // The argmax positions of a fixed 6×7 input (base level, no graph).
            let indices = if kernels::native::<Base>() {
                Base::max_pool2x2(aux[0].0.clone()).1
            } else {
                reference::max_pool2x2::<Base>(aux[0].0.clone()).1
            };
            let indices = B::int_from_base(indices);
            on_path::<B>(|| B::pool_scatter(p[0].0.clone(), indices.clone(), 6, 7), || {
                reference::pool_scatter::<B>(p[0].0.clone(), indices.clone(), 6, 7)
            })
        }
    }
}

/// The native operation, or its reference form inside `with_reference_ops`.
fn on_path<B: Level>(native: impl FnOnce() -> FloatTensor<B>, reference: impl FnOnce() -> FloatTensor<B>) -> Tensor<B> {
    Tensor(if kernels::native::<B>() { native() } else { reference() })
}

/// s(x) = Σ w⊙op(x) + ½ Σ c⊙op(x)²: the square term puts the op's Jacobian
/// into the Hessian too, so both its first and second derivatives are tested.
pub struct OpLoss<Base: Level<Base = Base>> {
    pub op: Op,
    pub w: Tensor<Base>,
    pub c: Tensor<Base>,
    pub aux: Vec<Tensor<Base>>,
}

impl<Base: Level<Base = Base>> Objective<Base> for OpLoss<Base> {
    fn eval<B: Level<Base = Base>>(&self, p: &[Tensor<B>]) -> Tensor<B> {
        let y = apply(self.op, p, &self.aux);
        let linear = y.mul(&Tensor::from_base(&self.w)).sum();
        let quadratic = y.square().mul(&Tensor::from_base(&self.c)).sum().mul_scalar(0.5);
        linear.add(&quadratic)
    }
}

/// The op's test inputs and loss, as host values (so any backend can load them).
pub struct HostCase {
    pub inputs: Vec<(Vec<f64>, Vec<usize>)>,
    pub w: (Vec<f64>, Vec<usize>),
    pub c: (Vec<f64>, Vec<usize>),
    pub aux: Vec<(Vec<f64>, Vec<usize>)>,
}

pub fn host_case(op: Op, seed: u64) -> HostCase {
    let mut r = rng(seed);
    let (shapes, positive) = case(op);
    let inputs: Vec<(Vec<f64>, Vec<usize>)> = shapes
        .iter()
        .map(|s| {
            let n = s.iter().product();
            let v = random_values(&mut r, n, 1.0);
            let v = if positive { v.iter().map(|x| 0.5 + x.abs()).collect() } else { v };
            (v, s.clone())
        })
        .collect();
    let aux = match op {
        Op::Gather => vec![((0..12).map(|i| ((i * 7 + 3) % 4) as f64).collect(), vec![2, 3, 2])],
        Op::CrossEntropy => vec![(one_hot(&[0, 3, 1, 4], 5), vec![4, 5])],
        Op::PoolScatter => vec![(random_values(&mut r, 2 * 3 * 6 * 7, 1.0), vec![2, 3, 6, 7])],
        _ => vec![],
    };
    let out_dims = {
        let p: Vec<Tensor<Flex>> = inputs.iter().map(|(v, s)| Tensor::from_f64(v, s, F64, &DEV)).collect();
        let aux_t: Vec<Tensor<Flex>> = aux.iter().map(|(v, s)| Tensor::from_f64(v, s, F64, &DEV)).collect();
        apply(op, &p, &aux_t).dims()
    };
    let n = out_dims.iter().product();
    let w = (random_values(&mut r, n, 1.0), out_dims.clone());
    let c = (random_values(&mut r, n, 1.0).iter().map(|x| x.abs()).collect(), out_dims);
    HostCase { inputs, w, c, aux }
}

impl HostCase {
    pub fn load<B: Level<Base = B>>(&self, op: Op, precision: metagrad::autodiff::tensor::Precision, device: &burn::backend::tensor::Device<B>) -> (OpLoss<B>, Vec<Tensor<B>>) {
        let t = |(v, s): &(Vec<f64>, Vec<usize>)| Tensor::from_f64(v, s, precision, device);
        let loss = OpLoss { op, w: t(&self.w), c: t(&self.c), aux: self.aux.iter().map(t).collect() };
        (loss, self.inputs.iter().map(t).collect())
    }
}

/// Runs `f` on the native kernels and on the reference path, with the path's name.
fn on_both_paths(mut f: impl FnMut(&str)) {
    f("native");
    kernels::with_reference_ops(|| f("reference"));
}

#[test]
fn every_op_first_and_second_derivatives_match_finite_differences_in_f64() {
    let mut failures = Vec::new();
    on_both_paths(|path| for (k, op) in ALL_OPS.iter().enumerate() {
        let (loss, x) = host_case(*op, 100 + k as u64).load::<Flex>(*op, F64, &DEV);
        let (_, grad) = value_and_grad(&loss, &x);
        let grad_norm = norm(&flatten(&grad));
        let mut r = rng(200 + k as u64);
        for _ in 0..2 {
            let d = random_unit_direction(&mut r, &x);
            // First derivative along d; normalised by ‖∇f‖ ≥ |∇f·d|.
            let analytic = dot_all(&grad, &d);
            let numeric = fd_directional(&|p| loss.eval(p).item(), &x, &d);
            let first = (analytic - numeric).abs() / grad_norm.max(1e-12);
            // Second derivative: H·d through nested autodiff against FD of gradients.
            let (_, _, hd) = hvp(&loss, &x, &d);
            let second = relative_error(&flatten(&hd), &fd_hvp(&loss, &x, &d));
            if !(first < 1e-6 && second < 1e-6) {
                failures.push(format!("{op:?} ({path}): first-derivative error {first:.2e}, Hessian-vector error {second:.2e}"));
            }
        }
    });
    assert!(failures.is_empty(), "derivatives off:\n{}", failures.join("\n"));
}

#[test]
fn every_op_on_the_native_kernels_equals_the_reference_path_in_f64() {
    // Value, gradient and Hessian-vector product, through both autodiff levels.
    for (k, op) in ALL_OPS.iter().enumerate() {
        let (loss, x) = host_case(*op, 500 + k as u64).load::<Flex>(*op, F64, &DEV);
        let d = random_unit_direction(&mut rng(600 + k as u64), &x);
        let run = || {
            let (value, grad, hd) = hvp(&loss, &x, &d);
            (value.item(), flatten(&grad), flatten(&hd))
        };
        let (value, grad, hd) = run();
        let (ref_value, ref_grad, ref_hd) = kernels::with_reference_ops(run);
        assert!((value - ref_value).abs() <= 1e-12 * ref_value.abs().max(1.0), "{op:?}: value {value} vs {ref_value}");
        let (e_grad, e_hvp) = (relative_error(&grad, &ref_grad), relative_error(&hd, &ref_hd));
        assert!(e_grad < 1e-10 && e_hvp < 1e-10, "{op:?}: gradient off by {e_grad:.2e}, Hessian-vector product by {e_hvp:.2e}");
    }
}

#[test]
fn outer_level_gradient_equals_single_level_gradient_for_every_op() {
    on_both_paths(|path| for (k, op) in ALL_OPS.iter().enumerate() {
        let (loss, x) = host_case(*op, 300 + k as u64).load::<Flex>(*op, F64, &DEV);
        let (_, single) = value_and_grad(&loss, &x);
        // The same gradient taken one level up, through Autodiff<Autodiff<Flex>>.
        let lifted = metagrad::autodiff::diff::lift(&x);
        let (_, nested) = value_and_grad(&loss, &lifted);
        let nested: Vec<Tensor<Flex>> = nested.iter().map(|g| g.to_base()).collect();
        let err = relative_error(&flatten(&nested), &flatten(&single));
        assert!(err < 1e-12, "{op:?} ({path}): nested gradient differs from single-level gradient by {err:.2e}");
    });
}

#[test]
fn gather_max_pool_equals_burns_max_pool() {
    use burn::backend::ops::ModuleOps;
    let mut r = rng(7);
    let x = random_tensor(&mut r, &[2, 3, 7, 6], 1.0);
    let ours = x.max_pool2x2();
    let native = Tensor::<Flex>(<Flex as ModuleOps<Flex>>::max_pool2d(x.0.clone(), [2, 2], [2, 2], [0, 0], [1, 1], false));
    assert_eq!(ours.dims(), vec![2, 3, 3, 3]);
    assert_eq!(ours.to_vec(), native.to_vec());
}

#[test]
fn relu_and_max_pool_have_zero_curvature_of_their_own() {
    // A piecewise-linear function of x alone: its Hessian must be exactly zero.
    struct Pl;
    impl Objective<Flex> for Pl {
        fn eval<B: Level<Base = Flex>>(&self, p: &[Tensor<B>]) -> Tensor<B> {
            p[0].relu().max_pool2x2().sum()
        }
    }
    let mut r = rng(8);
    let x = vec![random_tensor(&mut r, &[1, 2, 4, 4], 1.0)];
    let d = random_unit_direction(&mut r, &x);
    let (_, _, hd) = hvp(&Pl, &x, &d);
    assert!(flatten(&hd).iter().all(|&v| v == 0.0));
}

#[test]
#[should_panic(expected = "add: shapes [2, 3] and [4, 3] do not broadcast")]
fn mismatched_shapes_name_the_op_and_both_shapes() {
    let mut r = rng(9);
    let a = random_tensor(&mut r, &[2, 3], 1.0);
    let b = random_tensor(&mut r, &[4, 3], 1.0);
    let _ = a.add(&b);
}

#[test]
#[should_panic(expected = "matmul: shapes [2, 3] and [4, 5] do not multiply")]
fn matmul_shape_mismatch_is_named() {
    let mut r = rng(10);
    let _ = random_tensor(&mut r, &[2, 3], 1.0).matmul(&random_tensor(&mut r, &[4, 5], 1.0));
}

#[test]
#[should_panic(expected = "conv2d: input [1, 2, 5, 5], weight [4, 3, 3, 3]")]
fn conv_shape_mismatch_is_named() {
    let mut r = rng(11);
    let x = random_tensor(&mut r, &[1, 2, 5, 5], 1.0);
    let _ = x.conv2d(&random_tensor(&mut r, &[4, 3, 3, 3], 1.0), &random_tensor(&mut r, &[4], 1.0), 1, 1, 1);
}
