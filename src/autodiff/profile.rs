//! Where hypergradient time goes: forward passes, first-order reverse
//! passes, and the second reverse pass of each Hessian-vector product.
//!
//! Off unless a benchmark turns it on. When on, each timed phase waits for
//! the device before and after, so work a lazy backend (wgpu) queued lands in
//! the phase that queued it; that serialises host and device, so wgpu runs
//! are a little slower with it on. Counters are process-wide and add up over
//! threads: with tasks running in parallel they sum thread time, not wall time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use burn::backend::tensor::Device;

use crate::autodiff::tensor::Level;

#[derive(Clone, Copy, Debug)]
pub enum Phase {
    /// Evaluating an objective (recording its graph), at any level.
    Forward,
    /// A reverse pass that yields a gradient (recorded or not).
    Backward,
    /// The reverse pass through a recorded gradient: the second half of H·v.
    HvpReverse,
    /// One task's (or one stacked meta-batch's) whole hypergradient.
    Task,
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Thread-seconds spent in each phase since the last `reset`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PhaseTimes {
    pub forward_s: f64,
    pub backward_s: f64,
    pub hvp_reverse_s: f64,
    pub task_s: f64,
}

impl PhaseTimes {
    /// The time spent between `earlier` and these totals.
    pub fn since(&self, earlier: &PhaseTimes) -> PhaseTimes {
        PhaseTimes {
            forward_s: self.forward_s - earlier.forward_s,
            backward_s: self.backward_s - earlier.backward_s,
            hvp_reverse_s: self.hvp_reverse_s - earlier.hvp_reverse_s,
            task_s: self.task_s - earlier.task_s,
        }
    }
}

/// Whether an observer asked for timings (`bench`, `--profile`).
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::SeqCst);
}

pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::SeqCst);
    }
}

pub fn totals() -> PhaseTimes {
    let s = |p: Phase| NANOS[p as usize].load(Ordering::SeqCst) as f64 * 1e-9;
    PhaseTimes { forward_s: s(Phase::Forward), backward_s: s(Phase::Backward), hvp_reverse_s: s(Phase::HvpReverse), task_s: s(Phase::Task) }
}

/// Runs `f`, charging its time to `phase` when profiling is on.
pub fn timed<B: Level, T>(phase: Phase, device: &Device<B>, f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let _ = B::sync(device);
    let start = Instant::now();
    let out = f();
    let _ = B::sync(device);
    NANOS[phase as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}
