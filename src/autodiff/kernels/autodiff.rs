//! The Conv-4 operations at an autodiff level: each forward runs the level
//! below's operation and records a backward step written with the level
//! below's operations of the same set. When the level below is itself an
//! autodiff level, that backward step is recorded in turn, which is what makes
//! the second derivatives exact.
//!
//! Derivatives (all but batch norm are linear in each argument):
//! - conv3x3(x, w):            dx = input_grad(dy, w),   dw = weight_grad(x, dy)
//! - input_grad(dy, w):        d(dy) = conv3x3(g, w),    dw = weight_grad(g, dy)
//! - weight_grad(x, dy):       dx = input_grad(dy, g),   d(dy) = conv3x3(x, g)
//! - batch_norm(x, γ, β):      batch_norm_grad (composite one level down, so
//!   its own derivative comes from the operations it is written with)
//! - mask_positive(v, x):     dv = mask_positive(dy, x) (x: a constant mask)
//! - max_pool2x2, pool_gather: dx = pool_scatter(dy)
//! - pool_scatter:             d(dy) = pool_gather(g)

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, TensorMetadata};

use super::{Conv3x3Shape, ConvNetOps};

#[derive(Debug)]
struct Conv3x3;
#[derive(Debug)]
struct Conv3x3InputGrad;
#[derive(Debug)]
struct Conv3x3WeightGrad;
#[derive(Debug)]
struct BatchNorm;
#[derive(Debug)]
struct MaskPositive;
#[derive(Debug)]
struct PoolGather;
#[derive(Debug)]
struct PoolScatter;

/// A bilinear operation f(a, b): its state keeps both arguments (each is
/// needed for the other's gradient) and the convolution's geometry.
type BilinearState<B> = (FloatTensor<B>, FloatTensor<B>, Conv3x3Shape);

/// The backward step of a bilinear operation, given the gradient rules for
/// its first and second argument.
fn bilinear_backward<B: ConvNetOps>(
    ops: Ops<BilinearState<B>, 2>,
    grads: &mut Gradients,
    grad_a: impl FnOnce(FloatTensor<B>, FloatTensor<B>, Conv3x3Shape) -> FloatTensor<B>,
    grad_b: impl FnOnce(FloatTensor<B>, FloatTensor<B>, Conv3x3Shape) -> FloatTensor<B>,
) {
    let [node_a, node_b] = ops.parents;
    let grad = grads.consume::<B>(&ops.node);
    let (a, b, shape) = ops.state;
    if let Some(node) = node_a {
        grads.register::<B>(node.id, grad_a(grad.clone(), b, shape));
    }
    if let Some(node) = node_b {
        grads.register::<B>(node.id, grad_b(grad, a, shape));
    }
}

impl<B: ConvNetOps> Backward<B, 2> for Conv3x3 {
    type State = BilinearState<B>;
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        // a = x, b = w
        bilinear_backward::<B>(ops, grads, |g, w, k| B::conv3x3_input_grad(g, w, k), |g, x, k| {
            B::conv3x3_weight_grad(x, g, k)
        });
    }
}

impl<B: ConvNetOps> Backward<B, 2> for Conv3x3InputGrad {
    type State = BilinearState<B>;
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        // a = dy, b = w
        bilinear_backward::<B>(ops, grads, |g, w, k| B::conv3x3(g, w, k), |g, dy, k| B::conv3x3_weight_grad(g, dy, k));
    }
}

impl<B: ConvNetOps> Backward<B, 2> for Conv3x3WeightGrad {
    type State = BilinearState<B>;
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        // a = x, b = dy
        bilinear_backward::<B>(ops, grads, |g, dy, k| B::conv3x3_input_grad(dy, g, k), |g, x, k| B::conv3x3(x, g, k));
    }
}

impl<B: ConvNetOps> Backward<B, 3> for BatchNorm {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, eps) = ops.state;
        let gradients = B::batch_norm_on_batch_grad(x, gamma, grad, eps);
        for (node, g) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: ConvNetOps> Backward<B, 1> for MaskPositive {
    /// The tensor whose sign makes the mask.
    type State = FloatTensor<B>;
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::mask_positive(grad, ops.state));
        }
    }
}

/// Gather and scatter through fixed positions: linear, each the other's adjoint.
/// The state keeps the positions and the input plane's height and width.
type PoolState<B> = (IntTensor<B>, usize, usize);

impl<B: ConvNetOps> Backward<B, 1> for PoolGather {
    type State = PoolState<B>;
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (indices, height, width) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::pool_scatter(grad, indices, height, width));
        }
    }
}

impl<B: ConvNetOps> Backward<B, 1> for PoolScatter {
    type State = PoolState<B>;
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (indices, _, _) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::pool_gather(grad, indices));
        }
    }
}

/// Records `forward(a, b)` with a bilinear backward step `op`.
fn bilinear<B, C, Op>(
    op: Op,
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
    shape: Conv3x3Shape,
    forward: fn(FloatTensor<B>, FloatTensor<B>, Conv3x3Shape) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: ConvNetOps,
    C: CheckpointStrategy,
    Op: Backward<B, 2, State = BilinearState<B>>,
{
    let nodes = [a.node(), b.node()];
    let (a, b) = (a.into_primitive(), b.into_primitive());
    match op.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((a.clone(), b.clone(), shape), forward(a, b, shape)),
        OpsKind::UnTracked(prep) => prep.finish(forward(a, b, shape)),
    }
}

impl<B: ConvNetOps, C: CheckpointStrategy> ConvNetOps for Autodiff<B, C> {
    const NATIVE: bool = B::NATIVE;

    fn conv3x3(x: FloatTensor<Self>, w: FloatTensor<Self>, shape: Conv3x3Shape) -> FloatTensor<Self> {
        bilinear::<B, C, _>(Conv3x3, x, w, shape, B::conv3x3)
    }

    fn conv3x3_input_grad(dy: FloatTensor<Self>, w: FloatTensor<Self>, shape: Conv3x3Shape) -> FloatTensor<Self> {
        bilinear::<B, C, _>(Conv3x3InputGrad, dy, w, shape, B::conv3x3_input_grad)
    }

    fn conv3x3_weight_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>, shape: Conv3x3Shape) -> FloatTensor<Self> {
        bilinear::<B, C, _>(Conv3x3WeightGrad, x, dy, shape, B::conv3x3_weight_grad)
    }

    fn batch_norm_on_batch(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
        match BatchNorm.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                prep.finish((x.clone(), gamma.clone(), eps), B::batch_norm_on_batch(x, gamma, beta, eps))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::batch_norm_on_batch(x, gamma, beta, eps)),
        }
    }

    // batch_norm_grad: the composite default, recorded operation by operation
    // at this level, so that it differentiates once more.

    fn mask_positive(v: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = [v.node()];
        let (v, x) = (v.into_primitive(), x.into_primitive());
        match MaskPositive.prepare::<C>(node).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(x.clone(), B::mask_positive(v, x)),
            OpsKind::UnTracked(prep) => prep.finish(B::mask_positive(v, x)),
        }
    }

    fn max_pool2x2(x: FloatTensor<Self>) -> (FloatTensor<Self>, IntTensor<Self>) {
        let dims = x.shape().to_vec();
        let node = [x.node()];
        let (pooled, indices) = B::max_pool2x2(x.into_primitive());
        let out = match PoolGather.prepare::<C>(node).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((indices.clone(), dims[2], dims[3]), pooled),
            OpsKind::UnTracked(prep) => prep.finish(pooled),
        };
        (out, indices)
    }

    fn pool_gather(x: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        let dims = x.shape().to_vec();
        let node = [x.node()];
        let x = x.into_primitive();
        match PoolGather.prepare::<C>(node).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((indices.clone(), dims[2], dims[3]), B::pool_gather(x, indices)),
            OpsKind::UnTracked(prep) => prep.finish(B::pool_gather(x, indices)),
        }
    }

    fn pool_scatter(dy: FloatTensor<Self>, indices: IntTensor<Self>, height: usize, width: usize) -> FloatTensor<Self> {
        let node = [dy.node()];
        let dy = dy.into_primitive();
        match PoolScatter.prepare::<C>(node).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                prep.finish((indices.clone(), height, width), B::pool_scatter(dy, indices, height, width))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::pool_scatter(dy, indices, height, width)),
        }
    }
}
