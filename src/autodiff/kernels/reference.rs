//! The Conv-4 operations written with Burn's generic backend operations: what
//! a backend without native kernels runs, and what the native kernels are
//! checked against. At an autodiff level each of these is differentiated by
//! Burn's own autodiff (the convolution, gather and scatter differentiate
//! twice; batch norm is written from means so that it does too).

use burn::backend::ops::ConvOptions;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, FloatDType, IntDType, Scalar, Shape, TensorMetadata, get_device_settings};

use super::Conv3x3Shape;

fn options(shape: Conv3x3Shape) -> ConvOptions<2> {
    ConvOptions::new([shape.stride; 2], [1, 1], [1, 1], shape.groups)
}

fn dims<B: Backend>(t: &FloatTensor<B>) -> Vec<usize> {
    t.shape().to_vec()
}

fn float_dtype<B: Backend>(t: &FloatTensor<B>) -> FloatDType {
    match t.dtype() {
        burn::backend::DType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

pub fn conv3x3<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, shape: Conv3x3Shape) -> FloatTensor<B> {
    B::conv2d(x, w, None, options(shape))
}

pub fn conv3x3_input_grad<B: Backend>(dy: FloatTensor<B>, w: FloatTensor<B>, shape: Conv3x3Shape) -> FloatTensor<B> {
    // Burn reads only the input's shape.
    let (d, k) = (dims::<B>(&dy), dims::<B>(&w));
    let [h, wd] = shape.input;
    let x = B::float_empty(Shape::from(vec![d[0], k[1] * shape.groups, h, wd]), &dy.device(), float_dtype::<B>(&dy));
    B::conv2d_x_backward(x, w, dy, options(shape))
}

pub fn conv3x3_weight_grad<B: Backend>(x: FloatTensor<B>, dy: FloatTensor<B>, shape: Conv3x3Shape) -> FloatTensor<B> {
    // Burn reads only the weight's shape.
    let (d, i) = (dims::<B>(&dy), dims::<B>(&x));
    let w = B::float_empty(Shape::from(vec![d[1], i[1] / shape.groups, 3, 3]), &x.device(), float_dtype::<B>(&x));
    B::conv2d_weight_backward(x, w, dy, options(shape))
}

/// Per-channel mean over N, H and W, shape [1, C, 1, 1].
fn channel_mean<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mean_dim(B::float_mean_dim(B::float_mean_dim(x, 0), 2), 3)
}

fn channel_sum<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_sum_dim(B::float_sum_dim(B::float_sum_dim(x, 0), 2), 3)
}

fn as_channels<B: Backend>(v: FloatTensor<B>) -> FloatTensor<B> {
    let c = dims::<B>(&v)[0];
    B::float_reshape(v, Shape::from(vec![1, c, 1, 1]))
}

/// (x − mean) and sqrt(var + eps), per channel.
fn normalise<B: Backend>(x: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let centered = B::float_sub(x.clone(), channel_mean::<B>(x));
    let var = channel_mean::<B>(B::float_mul(centered.clone(), centered.clone()));
    let std = B::float_sqrt(B::float_add_scalar(var, Scalar::Float(eps)));
    (centered, std)
}

pub fn batch_norm<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, beta: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let (centered, std) = normalise::<B>(x, eps);
    let scale = B::float_div(as_channels::<B>(gamma), std);
    B::float_add(B::float_mul(centered, scale), as_channels::<B>(beta))
}

/// dβ = Σ dy, dγ = Σ dy·x̂, dx = γ/σ · (dy − dβ/m − x̂·dγ/m) with m = N·H·W.
pub fn batch_norm_grad<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    dy: FloatTensor<B>,
    eps: f64,
) -> [FloatTensor<B>; 3] {
    let d = dims::<B>(&x);
    let m = (d[0] * d[2] * d[3]) as f64;
    let (centered, std) = normalise::<B>(x, eps);
    let x_hat = B::float_div(centered, std.clone());
    let d_beta = channel_sum::<B>(dy.clone());
    let d_gamma = channel_sum::<B>(B::float_mul(dy.clone(), x_hat.clone()));
    let correction = B::float_add(
        B::float_mul_scalar(d_beta.clone(), Scalar::Float(1.0 / m)),
        B::float_mul(x_hat, B::float_mul_scalar(d_gamma.clone(), Scalar::Float(1.0 / m))),
    );
    let scale = B::float_div(as_channels::<B>(gamma), std);
    let dx = B::float_mul(scale, B::float_sub(dy, correction));
    let c = d[1];
    let flat = |t: FloatTensor<B>| B::float_reshape(t, Shape::from(vec![c]));
    [dx, flat(d_gamma), flat(d_beta)]
}

pub fn max_pool2x2<B: Backend>(x: FloatTensor<B>) -> (FloatTensor<B>, IntTensor<B>) {
    let pooled = B::max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], false, IntDType::I32);
    (pooled.output, pooled.indices)
}

/// x [N, C, H, W] and indices [N, C, h, w] as [N, C, H·W] and [N, C, h·w].
fn planes<B: Backend>(x: FloatTensor<B>, indices: IntTensor<B>) -> (FloatTensor<B>, IntTensor<B>, Vec<usize>) {
    let (d, i) = (dims::<B>(&x), indices.shape().to_vec());
    let x = B::float_reshape(x, Shape::from(vec![d[0], d[1], d[2] * d[3]]));
    let indices = B::int_reshape(indices, Shape::from(vec![i[0], i[1], i[2] * i[3]]));
    (x, indices, i)
}

pub fn pool_gather<B: Backend>(x: FloatTensor<B>, indices: IntTensor<B>) -> FloatTensor<B> {
    let (x, indices, i) = planes::<B>(x, indices);
    B::float_reshape(B::float_gather(2, x, indices), Shape::from(i))
}

pub fn pool_scatter<B: Backend>(dy: FloatTensor<B>, indices: IntTensor<B>, height: usize, width: usize) -> FloatTensor<B> {
    let d = dims::<B>(&dy);
    let zeros = B::float_zeros(Shape::from(vec![d[0], d[1], height, width]), &dy.device(), float_dtype::<B>(&dy));
    let (zeros, indices, _) = planes::<B>(zeros, indices);
    let dy = B::float_reshape(dy, Shape::from(vec![d[0], d[1], d[2] * d[3]]));
    let dx = B::float_scatter(2, zeros, indices, dy, burn::backend::tensor::IndexingUpdateOp::Add);
    B::float_reshape(dx, Shape::from(vec![d[0], d[1], height, width]))
}

/// v · [x > 0], elementwise: ReLU's derivative applied to v.
pub fn mask_positive<B: Backend>(v: FloatTensor<B>, x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(v, positive_mask::<B>(x))
}

/// [x > 0] as 0/1 floats of x's precision.
pub fn positive_mask<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let bool_dtype = get_device_settings::<B>(&x.device()).bool_dtype;
    let dtype = float_dtype::<B>(&x);
    let positive = B::float_greater_elem(x, Scalar::Float(0.0), bool_dtype);
    B::bool_into_float(positive, dtype)
}
