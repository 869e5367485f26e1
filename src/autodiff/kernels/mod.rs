//! The Conv-4 hot path as a small closed set of backend operations.
//!
//! Burn's generic convolution, batch norm and pooling are correct at every
//! autodiff level but slow on the CPU for Conv-4's shapes (a generic im2col
//! that converts layouts per call, a weight gradient that repacks, pooling by
//! index search plus scatter), and Burn's own fused batch norm and max-pool
//! cannot be differentiated twice. [`ConvNetOps`] is the set that replaces them:
//!
//! - `conv3x3` (padding 1, grouped, stride 1 or more), its input gradient
//!   and its weight gradient. The three are closed under differentiation: each one's
//!   derivative is one of the others (all are bilinear), so
//!   `Autodiff<Autodiff<B>>` differentiates them exactly at both levels;
//! - `batch_norm` in training mode (per-channel batch statistics) and its
//!   gradient, fused into one pass each on the CPU; the gradient's own
//!   derivative is taken through its composite form;
//! - ReLU's mask, applied to any tensor (its own derivative);
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::backend::Backend;
use burn::backend::tensor::{FloatTensor, IntTensor};

/// The geometry of a 3×3, padding-1 convolution: `groups` splits the channels
/// into that many independent networks (the stacked meta-batch), `stride` is
/// 1 (the max-pool Conv-4) or 2 (the strided one), and `input` is the input's
/// height and width. The input gradient needs them: with stride 2, inputs of
/// 2h − 1 and 2h rows both give h output rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3x3Shape {
    pub groups: usize,
    pub stride: usize,
    pub input: [usize; 2],
}

impl Conv3x3Shape {
    /// The output's height and width: ⌊(s − 1) / stride⌋ + 1 for each input size s.
    pub fn output(&self) -> [usize; 2] {
        self.input.map(|s| (s - 1) / self.stride + 1)
    }
}

/// The Conv-4 operations a backend provides. Shapes are NCHW. Every method
/// has Burn's generic implementation as its default.
pub trait ConvNetOps: Backend {
    /// Whether this backend has native kernels for the set. Backends without
    /// them run the reference path directly, exactly as before the set existed.
    const NATIVE: bool = false;

    /// y = x ⋆ w: x [N, G·Ci, H, W], w [G·Co, Ci, 3, 3] → y [N, G·Co, h, w]
    /// (h, w = `shape.output()`).
    fn conv3x3(x: FloatTensor<Self>, w: FloatTensor<Self>, shape: Conv3x3Shape) -> FloatTensor<Self> {
        reference::conv3x3::<Self>(x, w, shape)
    }

    /// ∂⟨dy, x ⋆ w⟩/∂x: dy [N, G·Co, h, w], w [G·Co, Ci, 3, 3] → [N, G·Ci, H, W].
    fn conv3x3_input_grad(dy: FloatTensor<Self>, w: FloatTensor<Self>, shape: Conv3x3Shape) -> FloatTensor<Self> {
        reference::conv3x3_input_grad::<Self>(dy, w, shape)
    }

    /// ∂⟨dy, x ⋆ w⟩/∂w: x [N, G·Ci, H, W], dy [N, G·Co, h, w] → [G·Co, Ci, 3, 3].
    fn conv3x3_weight_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>, shape: Conv3x3Shape) -> FloatTensor<Self> {
        reference::conv3x3_weight_grad::<Self>(x, dy, shape)
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

    /// v · 1[x > 0]: ReLU is `mask_positive(x, x)`. The mask is a constant
    /// (its derivative is zero almost everywhere, as in PyTorch), so the
    /// operation is linear in `v` and its derivative is itself.
    fn mask_positive(v: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::mask_positive::<Self>(v, x)
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
    KernelPath::Burn.run(f)
}

/// Whether operations of backend `B` run on the native kernels here and now.
pub fn native<B: ConvNetOps>() -> bool {
    B::NATIVE && !KernelSettings::current().reference
}

/// Which implementation of the Conv-4 operations a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// The backend's native kernels where it has them (the CPU), else Burn's.
    Native,
    /// Burn's generic operations everywhere.
    Burn,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Native => "native",
            KernelPath::Burn => "burn",
        }
    }

    /// Runs `f` on this path (on this thread and the task threads it starts).
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        KernelSettings { reference: self == KernelPath::Burn, ..KernelSettings::current() }.run(f)
    }
}

impl std::str::FromStr for KernelPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(KernelPath::Native),
            "burn" => Ok(KernelPath::Burn),
            other => Err(format!("unknown kernels '{other}': expected native or burn")),
        }
    }
}

/// Convolution work done by the native kernels while counting is on: floating
/// point operations, and the seconds the cores spent on them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConvWork {
    pub flop: f64,
    pub core_seconds: f64,
}

impl ConvWork {
    /// Achieved GFLOP/s per core inside the convolutions.
    pub fn gflops_per_core(&self) -> Option<f64> {
        (self.core_seconds > 0.0).then(|| self.flop / self.core_seconds / 1e9)
    }
}

static COUNTING: AtomicBool = AtomicBool::new(false);
static FLOP: AtomicU64 = AtomicU64::new(0);
static CORE_NANOS: AtomicU64 = AtomicU64::new(0);

/// Starts counting convolution work from zero (`bench train`); off by default,
/// when a convolution costs one relaxed atomic load more.
pub fn start_counting_convolutions() {
    FLOP.store(0, Ordering::Relaxed);
    CORE_NANOS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
}

/// Stops counting and returns the work counted since the start.
pub fn stop_counting_convolutions() -> ConvWork {
    COUNTING.store(false, Ordering::Relaxed);
    ConvWork { flop: FLOP.load(Ordering::Relaxed) as f64, core_seconds: CORE_NANOS.load(Ordering::Relaxed) as f64 * 1e-9 }
}

/// Runs one convolution of `flop` operations on `cores` cores, counting it
/// when counting is on.
fn count_convolution<R>(flop: usize, cores: usize, f: impl FnOnce() -> R) -> R {
    if !COUNTING.load(Ordering::Relaxed) {
        return f();
    }
    let start = std::time::Instant::now();
    let out = f();
    CORE_NANOS.fetch_add(start.elapsed().as_nanos() as u64 * cores as u64, Ordering::Relaxed);
    FLOP.fetch_add(flop as u64, Ordering::Relaxed);
    out
}

/// The peak FLOP/s of one core of this CPU, estimated from its vector units
/// (fused multiply-add lanes × 2 per cycle) and its maximum clock, with how it
/// was estimated. None off x86-64 or when the clock cannot be read.
pub fn peak_gflops_per_core(f64_precision: bool) -> Option<(f64, String)> {
    #[cfg(target_arch = "x86_64")]
    {
        let (flop_per_cycle, units) = if std::arch::is_x86_feature_detected!("avx512f") {
            (64.0, "AVX-512")
        } else if std::arch::is_x86_feature_detected!("fma") {
            (32.0, "AVX2 FMA")
        } else {
            (8.0, "SSE")
        };
        let flop_per_cycle = if f64_precision { flop_per_cycle / 2.0 } else { flop_per_cycle };
        let ghz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(|khz| khz / 1e6)
            .or_else(|| {
                let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
                let line = info.lines().find(|l| l.starts_with("cpu MHz"))?;
                line.split(':').nth(1)?.trim().parse::<f64>().ok().map(|mhz| mhz / 1e3)
            })?;
        Some((flop_per_cycle * ghz, format!("{units}, {flop_per_cycle:.0} FLOP/cycle at {ghz:.2} GHz")))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = f64_precision;
        None
    }
}
