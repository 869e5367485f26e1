//! A small typed tensor over Burn's backend op traits.
//!
//! `burn::Tensor` dispatches at run time and refuses nested autodiff, so model
//! code is written against the op traits of a type parameter `B: Level`, which
//! may be a plain backend, `Autodiff<B>` or `Autodiff<Autodiff<B>>`. The same
//! code then runs unchanged at every level. Every op checks its shapes and
//! names itself and both shapes when they do not fit, instead of failing deep
//! inside a kernel.

use burn::backend::ops::ConvOptions;
use burn::backend::tensor::{Device, FloatTensor, IntTensor};
use burn::backend::{
    AutodiffBackend, Backend, DType, FloatDType, Scalar, Shape,
    TensorData, TensorMetadata,
};
use burn::backend::Autodiff;

use crate::autodiff::kernels::{self, ConvNetOps};

/// Floating-point precision of a run. f64 exists on the CPU backend only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F64,
}

impl Precision {
    pub fn float_dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::F64 => FloatDType::F64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        }
    }

    fn of(dtype: DType) -> Precision {
        match dtype {
            DType::F64 => Precision::F64,
            _ => Precision::F32,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f64" => Ok(Precision::F64),
            other => Err(format!("unknown precision '{other}': expected f32 or f64")),
        }
    }
}

/// A backend reached from a plain (non-autodiff) base backend by zero or more
/// `Autodiff` wrappers. `Base` is where values live without any graph; moving
/// a tensor down to the base and back up is how constants are made at every
/// level at once (a plain `float_detach` only detaches the outermost level).
pub trait Level: ConvNetOps {
    type Base: Backend<Device = Self::Device>;
    fn from_base(t: FloatTensor<Self::Base>) -> FloatTensor<Self>;
    fn to_base(t: FloatTensor<Self>) -> FloatTensor<Self::Base>;
    fn int_from_base(t: IntTensor<Self::Base>) -> IntTensor<Self>;
    /// A base tensor as Burn's high-level tensor, for Burn's optimizers.
    fn base_to_burn(t: FloatTensor<Self::Base>) -> burn::tensor::Tensor<1>;
    fn base_from_burn(t: burn::tensor::Tensor<1>) -> FloatTensor<Self::Base>;
}

/// A backend without autodiff on which a run's values live: the level the
/// layers above this one name (`B: BaseBackend`); the autodiff levels above
/// it stay inside this module and `diff`.
pub trait BaseBackend: Level<Base = Self> {}

impl<B: Level<Base = B>> BaseBackend for B {}

macro_rules! base_level {
    ($backend:ty) => {
        impl Level for $backend {
            type Base = $backend;
            fn from_base(t: FloatTensor<Self>) -> FloatTensor<Self> {
                t
            }
            fn to_base(t: FloatTensor<Self>) -> FloatTensor<Self> {
                t
            }
            fn int_from_base(t: IntTensor<Self>) -> IntTensor<Self> {
                t
            }
            fn base_to_burn(t: FloatTensor<Self>) -> burn::tensor::Tensor<1> {
                burn::tensor::Tensor::<1>::from_primitive::<$backend>(t)
            }
            fn base_from_burn(t: burn::tensor::Tensor<1>) -> FloatTensor<Self> {
                t.try_into_primitive::<$backend>().expect("Burn's optimizer returns tensors of the backend it was given")
            }
        }
    };
}

base_level!(burn::backend::Flex);
base_level!(burn::backend::wgpu::CubeBackend);

impl<B: Level> Level for Autodiff<B> {
    type Base = B::Base;
    fn from_base(t: FloatTensor<Self::Base>) -> FloatTensor<Self> {
        <Autodiff<B> as AutodiffBackend>::from_inner(B::from_base(t))
    }
    fn to_base(t: FloatTensor<Self>) -> FloatTensor<Self::Base> {
        B::to_base(<Autodiff<B> as AutodiffBackend>::inner(t))
    }
    fn int_from_base(t: IntTensor<Self::Base>) -> IntTensor<Self> {
        <Autodiff<B> as AutodiffBackend>::int_from_inner(B::int_from_base(t))
    }
    fn base_to_burn(t: FloatTensor<Self::Base>) -> burn::tensor::Tensor<1> {
        B::base_to_burn(t)
    }
    fn base_from_burn(t: burn::tensor::Tensor<1>) -> FloatTensor<Self::Base> {
        B::base_from_burn(t)
    }
}

thread_local! {
    static HOST_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Reads from the device to the host made on this thread so far: each one
/// waits for the device, so a training step should make as few as it can.
pub fn host_reads() -> usize {
    HOST_READS.with(|n| n.get())
}

/// A float tensor of backend level `B`.
pub struct Tensor<B: Backend>(pub FloatTensor<B>);

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor(self.0.clone())
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.0.shape().to_vec())
    }
}

fn shape_of(dims: &[usize]) -> Shape {
    Shape::from(dims.to_vec())
}

/// Same rank, and every pair of dimensions equal or one of them 1.
fn broadcast_dims(op: &str, a: &[usize], b: &[usize]) -> Vec<usize> {
    let fits = a.len() == b.len()
        && a.iter().zip(b).all(|(&x, &y)| x == y || x == 1 || y == 1);
    assert!(fits, "{op}: shapes {a:?} and {b:?} do not broadcast");
    a.iter().zip(b).map(|(&x, &y)| x.max(y)).collect()
}

impl<B: Level> Tensor<B> {
    /// A constant from host values, converted to `precision`.
    pub fn from_f64(values: &[f64], dims: &[usize], precision: Precision, device: &Device<B>) -> Self {
        let n: usize = dims.iter().product();
        assert_eq!(values.len(), n, "from_f64: {} values for shape {dims:?}", values.len());
        let data = match precision {
            Precision::F64 => TensorData::new(values.to_vec(), shape_of(dims)),
            Precision::F32 => {
                TensorData::new(values.iter().map(|&v| v as f32).collect::<Vec<f32>>(), shape_of(dims))
            }
        };
        Tensor(B::float_from_data(data, device))
    }

    /// A constant from a `TensorData` holding f32 or f64 values, cast to `precision`.
    pub fn from_data(data: TensorData, precision: Precision, device: &Device<B>) -> Self {
        let data = data.convert_dtype(DType::from(precision.float_dtype()));
        Tensor(B::float_from_data(data, device))
    }

    pub fn zeros(dims: &[usize], precision: Precision, device: &Device<B>) -> Self {
        Tensor(B::float_zeros(shape_of(dims), device, precision.float_dtype()))
    }

    pub fn dims(&self) -> Vec<usize> {
        self.0.shape().to_vec()
    }

    pub fn num_elements(&self) -> usize {
        self.dims().iter().product()
    }

    pub fn precision(&self) -> Precision {
        Precision::of(self.0.dtype())
    }

    pub fn device(&self) -> Device<B> {
        self.0.device()
    }

    /// The values, read back to the host (waits for the device).
    pub fn to_data(&self) -> TensorData {
        HOST_READS.with(|n| n.set(n.get() + 1));
        let data = burn::tensor::try_read_sync(B::float_into_data(self.0.clone()))
            .expect("synchronous read-back is supported on native targets");
        data.unwrap_or_else(|e| panic!("reading a tensor back from the device failed: {e:?}"))
    }

    pub fn to_vec(&self) -> Vec<f64> {
        self.to_data().convert::<f64>().try_into_vec::<f64>().expect("float data converts to f64")
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> f64 {
        let v = self.to_vec();
        assert_eq!(v.len(), 1, "item: tensor of shape {:?} is not a scalar", self.dims());
        v[0]
    }

    /// The same values with no graph at any autodiff level.
    pub fn constant(&self) -> Self {
        Tensor(B::from_base(B::to_base(self.0.clone())))
    }

    pub fn to_base(&self) -> Tensor<B::Base> {
        Tensor(B::to_base(self.0.clone()))
    }

    pub fn from_base(t: &Tensor<B::Base>) -> Self {
        Tensor(B::from_base(t.0.clone()))
    }

    fn binary(
        &self,
        other: &Self,
        op: &str,
        f: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
    ) -> Self {
        broadcast_dims(op, &self.dims(), &other.dims());
        Tensor(f(self.0.clone(), other.0.clone()))
    }

    pub fn add(&self, other: &Self) -> Self {
        self.binary(other, "add", B::float_add)
    }

    pub fn sub(&self, other: &Self) -> Self {
        self.binary(other, "sub", B::float_sub)
    }

    pub fn mul(&self, other: &Self) -> Self {
        self.binary(other, "mul", B::float_mul)
    }

    pub fn div(&self, other: &Self) -> Self {
        self.binary(other, "div", B::float_div)
    }

    pub fn add_scalar(&self, v: f64) -> Self {
        Tensor(B::float_add_scalar(self.0.clone(), Scalar::Float(v)))
    }

    pub fn mul_scalar(&self, v: f64) -> Self {
        Tensor(B::float_mul_scalar(self.0.clone(), Scalar::Float(v)))
    }

    pub fn neg(&self) -> Self {
        Tensor(B::float_neg(self.0.clone()))
    }

    pub fn exp(&self) -> Self {
        Tensor(B::float_exp(self.0.clone()))
    }

    pub fn log(&self) -> Self {
        Tensor(B::float_log(self.0.clone()))
    }

    pub fn sqrt(&self) -> Self {
        Tensor(B::float_sqrt(self.0.clone()))
    }

    pub fn square(&self) -> Self {
        self.mul(self)
    }

    /// Sum of all elements, shape [1].
    pub fn sum(&self) -> Self {
        Tensor(B::float_sum(self.0.clone()))
    }

    /// Sum over `dim`, keeping it with size 1.
    pub fn sum_dim(&self, dim: usize) -> Self {
        self.check_dim("sum_dim", dim);
        Tensor(B::float_sum_dim(self.0.clone(), dim))
    }

    /// Mean over `dim`, keeping it with size 1.
    pub fn mean_dim(&self, dim: usize) -> Self {
        self.check_dim("mean_dim", dim);
        Tensor(B::float_mean_dim(self.0.clone(), dim))
    }

    /// Maximum over `dim`, keeping it with size 1.
    pub fn max_dim(&self, dim: usize) -> Self {
        self.check_dim("max_dim", dim);
        Tensor(B::float_max_dim(self.0.clone(), dim))
    }

    fn check_dim(&self, op: &str, dim: usize) {
        let dims = self.dims();
        assert!(dim < dims.len(), "{op}: dimension {dim} out of range for shape {dims:?}");
    }

    /// Σ self·other over all elements, shape [1].
    pub fn dot(&self, other: &Self) -> Self {
        assert_eq!(self.dims(), other.dims(), "dot: shapes {:?} and {:?} differ", self.dims(), other.dims());
        self.mul(other).sum()
    }

    pub fn reshape(&self, dims: &[usize]) -> Self {
        let from = self.dims();
        assert_eq!(
            from.iter().product::<usize>(),
            dims.iter().product::<usize>(),
            "reshape: cannot reshape {from:?} into {dims:?}"
        );
        Tensor(B::float_reshape(self.0.clone(), shape_of(dims)))
    }

    /// Swap dimensions `a` and `b`.
    pub fn swap_dims(&self, a: usize, b: usize) -> Self {
        let rank = self.dims().len();
        assert!(a < rank && b < rank, "swap_dims: dimensions {a} and {b} of shape {:?}", self.dims());
        Tensor(B::float_swap_dims(self.0.clone(), a, b))
    }

    /// Concatenate along dimension `dim`; every other dimension must agree.
    pub fn cat(parts: &[Self], dim: usize) -> Self {
        let first = parts.first().expect("cat: nothing to concatenate").dims();
        for p in parts {
            let d = p.dims();
            let fits = d.len() == first.len() && d.iter().zip(&first).enumerate().all(|(i, (a, b))| i == dim || a == b);
            assert!(fits, "cat: shapes {first:?} and {d:?} do not fit along dimension {dim}");
        }
        Tensor(B::float_cat(parts.iter().map(|p| p.0.clone()).collect(), dim))
    }

    /// Swap the last two dimensions.
    pub fn transpose(&self) -> Self {
        assert!(self.dims().len() >= 2, "transpose: shape {:?} has fewer than 2 dimensions", self.dims());
        Tensor(B::float_transpose(self.0.clone()))
    }

    /// Matrix product of [.., m, k] and [.., k, n].
    pub fn matmul(&self, other: &Self) -> Self {
        let (a, b) = (self.dims(), other.dims());
        let fits = a.len() >= 2
            && a.len() == b.len()
            && a[a.len() - 1] == b[b.len() - 2]
            && a[..a.len() - 2] == b[..b.len() - 2];
        assert!(fits, "matmul: shapes {a:?} and {b:?} do not multiply");
        Tensor(B::float_matmul(self.0.clone(), other.0.clone()))
    }

    /// 2-D convolution of x [N, C_in, H, W] with weight [C_out, C_in/groups, kh, kw]
    /// and bias [C_out], with the same stride and zero padding along both axes.
    pub fn conv2d(&self, weight: &Self, bias: &Self, stride: usize, padding: usize, groups: usize) -> Self {
        let (x, w, b) = (self.dims(), weight.dims(), bias.dims());
        let fits = x.len() == 4
            && w.len() == 4
            && groups > 0
            && stride > 0
            && x[1] == w[1] * groups
            && w[0] % groups == 0
            && b == [w[0]]
            && x[2] + 2 * padding >= w[2]
            && x[3] + 2 * padding >= w[3];
        assert!(fits, "conv2d: input {x:?}, weight {w:?} and bias {b:?} do not fit (stride {stride}, groups {groups})");
        if kernels::native::<B>() && w[2..] == [3, 3] && padding == 1 {
            let shape = kernels::Conv3x3Shape { groups, stride, input: [x[2], x[3]] };
            let y = Tensor(B::conv3x3(self.0.clone(), weight.0.clone(), shape));
            return y.add(&bias.reshape(&[1, b[0], 1, 1]));
        }
        let options = ConvOptions::new([stride, stride], [padding, padding], [1, 1], groups);
        Tensor(B::conv2d(self.0.clone(), weight.0.clone(), Some(bias.0.clone()), options))
    }

    /// Batch norm with the batch's own statistics per channel (biased
    /// variance, no running statistics): x [N, C, H, W], gamma and beta [C].
    pub fn batch_norm(&self, gamma: &Self, beta: &Self, eps: f64) -> Self {
        let (x, g, b) = (self.dims(), gamma.dims(), beta.dims());
        assert!(
            x.len() == 4 && g == [x[1]] && b == [x[1]],
            "batch_norm: input {x:?}, scale {g:?} and shift {b:?} do not fit"
        );
        let (x, gamma, beta) = (self.0.clone(), gamma.0.clone(), beta.0.clone());
        Tensor(if kernels::native::<B>() {
            B::batch_norm_on_batch(x, gamma, beta, eps)
        } else {
            kernels::reference::batch_norm::<B>(x, gamma, beta, eps)
        })
    }

    /// Elements of `self` along `dim` at `indices` (same rank; other dims equal).
    pub fn gather(&self, dim: usize, indices: IntTensor<B>) -> Self {
        let (x, i) = (self.dims(), indices.shape().to_vec());
        let fits = dim < x.len()
            && x.len() == i.len()
            && x.iter().zip(&i).enumerate().all(|(d, (a, b))| d == dim || a == b);
        assert!(fits, "gather: input {x:?} and indices {i:?} do not fit along dimension {dim}");
        Tensor(B::float_gather(dim, self.0.clone(), indices))
    }

    /// ReLU as x · 1[x > 0] with the mask a constant, so its second derivative
    /// is zero almost everywhere, as in PyTorch.
    pub fn relu(&self) -> Self {
        if kernels::native::<B>() {
            return Tensor(B::mask_positive(self.0.clone(), self.0.clone()));
        }
        // The mask is a constant: ReLU's second derivative is zero.
        let mask = kernels::reference::positive_mask::<B::Base>(B::to_base(self.0.clone()));
        self.mul(&Tensor(B::from_base(mask)))
    }

    /// 2×2 max-pool with stride 2 (floor), written so that it differentiates
    /// twice: natively, a pooling that records its argmax and differentiates
    /// through gather and scatter; on the reference path, the argmax
    /// positions come from Burn's pooling on a graph-free copy and the values
    /// are gathered from the input, whose gather differentiates at every level.
    pub fn max_pool2x2(&self) -> Self {
        let x = self.dims();
        assert!(x.len() == 4 && x[2] >= 2 && x[3] >= 2, "max_pool2x2: input {x:?} is not [N, C, H>=2, W>=2]");
        if kernels::native::<B>() {
            return Tensor(B::max_pool2x2(self.0.clone()).0);
        }
        let (_, indices) = kernels::reference::max_pool2x2::<B::Base>(B::to_base(self.0.clone()));
        Tensor(kernels::reference::pool_gather::<B>(self.0.clone(), B::int_from_base(indices)))
    }

    /// Row-wise log-softmax of [N, K] logits. The max shift is a constant: the
    /// value does not depend on it, so neither do the derivatives.
    pub fn log_softmax(&self) -> Self {
        let dims = self.dims();
        assert_eq!(dims.len(), 2, "log_softmax: expected [N, K] logits, got {dims:?}");
        let shifted = self.sub(&self.max_dim(1).constant());
        let log_norm = shifted.exp().sum_dim(1).log();
        shifted.sub(&log_norm)
    }

    /// Mean cross-entropy of [N, K] logits against one-hot targets [N, K].
    pub fn cross_entropy(&self, one_hot: &Self) -> Self {
        assert_eq!(self.dims(), one_hot.dims(), "cross_entropy: logits {:?} and targets {:?} differ", self.dims(), one_hot.dims());
        let n = self.dims()[0] as f64;
        self.log_softmax().mul(one_hot).sum().mul_scalar(-1.0 / n)
    }
}

/// One-hot rows for `labels` in `0..classes`, as host values.
pub fn one_hot(labels: &[usize], classes: usize) -> Vec<f64> {
    let mut v = vec![0.0; labels.len() * classes];
    for (row, &label) in labels.iter().enumerate() {
        assert!(label < classes, "one_hot: label {label} is not below {classes}");
        v[row * classes + label] = 1.0;
    }
    v
}
