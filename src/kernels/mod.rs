//! The Conv-4 hot path as a small closed set of backend operations.
//!
//! Burn's generic convolution, batch norm and pooling are correct at every
//! autodiff level but slow on the CPU for Conv-4's shapes (a generic im2col
//! that converts layouts per call, a weight gradient that repacks, pooling by
//! index search plus scatter), and Burn's own fused batch norm and max-pool
//! cannot be differentiated twice. [`ConvNetOps`] is the set that replaces them:
//!
//! - `conv3x3` (stride 1, padding 1, grouped), its input gradient and its
//!   weight gradient. The three are closed under differentiation: each one's
//!   derivative is one of the others (all are bilinear), so
//!   `Autodiff<Autodiff<B>>` differentiates them exactly at both levels;
//! - `batch_norm` in training mode (per-channel batch statistics) and its
//!   gradient, fused into one pass each on the CPU; the gradient's own
//!   derivative is taken through its composite form;
//! - 2×2 max-pool that records the argmax, and the scatter and gather that
//!   move values through those positions (each the other's derivative).
//!
//! The base CPU backend (Flex) runs them as native kernels ([`flex`]); the
//! autodiff wrapper records them with their derivatives ([`autodiff`]); the
//! GPU keeps Burn's generic operations ([`reference`]) until a CubeCL kernel
//! pays off there, so GPU results are exactly what they were.
//! [`with_reference_ops`] runs a closure on the reference path on every backend:
//! tests check the native path against it, and `bench train --kernels burn`
//! measures the difference.

mod autodiff;
mod flex;
pub mod reference;

use std::cell::Cell;

use burn::backend::Backend;
use burn::backend::tensor::{FloatTensor, IntTensor};

/// The Conv-4 operations a backend provides. Shapes are NCHW; `groups` splits
/// the channels into that many independent networks (the stacked meta-batch).
/// Every method has Burn's generic implementation as its default.
pub trait ConvNetOps: Backend {
    /// Whether this backend has native kernels for the set. Backends without
    /// them run the reference path directly, exactly as before the set existed.
    const NATIVE: bool = false;

    /// y = x ⋆ w: x [N, G·Ci, H, W], w [G·Co, Ci, 3, 3] → y [N, G·Co, H, W].
    fn conv3x3(x: FloatTensor<Self>, w: FloatTensor<Self>, groups: usize) -> FloatTensor<Self> {
        reference::conv3x3::<Self>(x, w, groups)
    }

    /// ∂⟨dy, x ⋆ w⟩/∂x: dy [N, G·Co, H, W], w [G·Co, Ci, 3, 3] → [N, G·Ci, H, W].
    fn conv3x3_input_grad(dy: FloatTensor<Self>, w: FloatTensor<Self>, groups: usize) -> FloatTensor<Self> {
        reference::conv3x3_input_grad::<Self>(dy, w, groups)
    }

    /// ∂⟨dy, x ⋆ w⟩/∂w: x [N, G·Ci, H, W], dy [N, G·Co, H, W] → [G·Co, Ci, 3, 3].
    fn conv3x3_weight_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>, groups: usize) -> FloatTensor<Self> {
        reference::conv3x3_weight_grad::<Self>(x, dy, groups)
    }

    /// Batch norm with the batch's statistics (biased variance) per channel:
    /// x [N, C, H, W], gamma and beta [C].
    fn batch_norm_on_batch(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        reference::batch_norm::<Self>(x, gamma, beta, eps)
    }

    /// The gradients of ⟨dy, batch_norm(x, gamma, beta)⟩ for x, gamma and beta.
    fn batch_norm_on_batch_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f64,
    ) -> [FloatTensor<Self>; 3] {
        reference::batch_norm_grad::<Self>(x, gamma, dy, eps)
    }

    /// 2×2 max-pool, stride 2 (floor): the pooled values [N, C, H/2, W/2] and,
    /// for each, the flat position of its maximum in the input's H×W plane.
    fn max_pool2x2(x: FloatTensor<Self>) -> (FloatTensor<Self>, IntTensor<Self>) {
        reference::max_pool2x2::<Self>(x)
    }

    /// The values of x [N, C, H, W] at `indices` [N, C, h, w] (flat in-plane positions).
    fn pool_gather(x: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        reference::pool_gather::<Self>(x, indices)
    }

    /// The adjoint of [`pool_gather`](ConvNetOps::pool_gather): dy [N, C, h, w]
    /// added at `indices` into zeros of shape [N, C, height, width].
    fn pool_scatter(dy: FloatTensor<Self>, indices: IntTensor<Self>, height: usize, width: usize) -> FloatTensor<Self> {
        reference::pool_scatter::<Self>(dy, indices, height, width)
    }
}

impl ConvNetOps for burn::backend::wgpu::CubeBackend {}

/// How the kernels run on this thread: on the native or the reference path,
/// and whether a kernel may spread over the thread pool (not when the caller
/// already runs one task per core).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSettings {
    pub reference: bool,
    pub serial: bool,
}

thread_local! {
    static SETTINGS: Cell<KernelSettings> = const { Cell::new(KernelSettings { reference: false, serial: false }) };
}

impl KernelSettings {
    /// This thread's settings (to hand on to threads it starts).
    pub fn current() -> Self {
        SETTINGS.with(Cell::get)
    }

    /// Runs `f` with these settings on this thread, then restores the previous ones.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(KernelSettings);
        impl Drop for Restore {
            fn drop(&mut self) {
                SETTINGS.with(|s| s.set(self.0));
            }
        }
        let _restore = Restore(SETTINGS.with(|s| s.replace(self)));
        f()
    }
}

/// Runs `f` with the Conv-4 operations on Burn's generic path on this thread
/// (what the native kernels are tested and benchmarked against).
pub fn with_reference_ops<R>(f: impl FnOnce() -> R) -> R {
    KernelSettings { reference: true, ..KernelSettings::current() }.run(f)
}

/// Whether operations of backend `B` run on the native kernels here and now.
pub fn native<B: ConvNetOps>() -> bool {
    B::NATIVE && !KernelSettings::current().reference
}
