//! Benchmarks: time and peak memory of a gradient, a Hessian-vector product
//! and one exact MAML step of Conv-4 on few-shot task shapes.
//!
//! Peak memory is measured by the device allocator on wgpu (bytes reserved by
//! Burn's memory pool, from a cleaned pool) and by the process high-water mark
//! on the CPU (VmHWM, reset through /proc/self/clear_refs before each case).

pub mod estimators;

use std::time::Instant;

use burn::backend::Backend;
use burn::backend::tensor::Device;
use serde::Serialize;

use crate::autodiff::backend::OnBackend;
use crate::autodiff::diff::{hvp, value_and_grad};
use crate::data::task::{Examples, Task};
use crate::hypergrad::{InnerLoop, Mode, QRule, TaskLoss, hypergradient, maml};
use crate::models::{Conv4, FunctionalModel};
use crate::autodiff::tensor::{BaseBackend, Precision, Tensor};

/// A task shape: model and number of support and query images.
#[derive(Clone, Copy, Debug)]
pub struct TaskShape {
    pub name: &'static str,
    pub model: Conv4,
    pub support: usize,
    pub query: usize,
}

pub fn autodiff_shapes() -> Vec<TaskShape> {
    vec![
        TaskShape { name: "omniglot 5-way 1-shot", model: Conv4::omniglot(5), support: 5, query: 5 },
        TaskShape { name: "mini-imagenet 5-way 1-shot", model: Conv4::mini_imagenet(5), support: 5, query: 75 },
    ]
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub workload: String,
    pub backend: String,
    pub operation: String,
    pub ms_median: f64,
    pub ms_min: f64,
    pub peak_memory_mib: Option<f64>,
    pub memory_source: String,
    /// Time relative to one gradient on the same batch.
    pub relative_to_gradient: f64,
}

/// A batch of random images with labels cycling through the classes.
pub fn random_batch(model: &Conv4, n: usize, seed: u64) -> Examples {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dims = vec![n, model.in_channels, model.image_size, model.image_size];
    let values: Vec<f32> = (0..dims.iter().product::<usize>()).map(|_| rng.random::<f64>() as f32).collect();
    Examples::classified(values, dims, (0..n).map(|i| i % model.way).collect(), model.way)
}

/// Give freed heap pages back to the OS so the next high-water mark starts
/// from live memory, not from what the allocator kept.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only returns unused heap pages to the OS.
        unsafe {
            malloc_trim(0);
        }
    }
}

fn current_rss_kib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
}

/// Measures peak memory of a closure on the device's allocator or the process.
pub(crate) struct MemoryProbe<B: Backend> {
    device: Device<B>,
    baseline: Option<f64>,
    on_device: bool,
}

impl<B: Backend> MemoryProbe<B> {
    pub(crate) fn start(device: &Device<B>) -> Self {
        B::memory_cleanup(device);
        if let Some(usage) = B::memory_pool_usage(device) {
            return MemoryProbe { device: device.clone(), baseline: Some(usage.bytes_reserved as f64), on_device: true };
        }
        release_free_heap();
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        MemoryProbe { device: device.clone(), baseline: current_rss_kib("VmRSS:").map(|k| k * 1024.0), on_device: false }
    }

    /// Peak bytes above the baseline, in MiB.
    pub(crate) fn peak_mib(&self) -> Option<f64> {
        let baseline = self.baseline?;
        let peak = if self.on_device {
            B::memory_pool_usage(&self.device)?.bytes_reserved as f64
        } else {
            current_rss_kib("VmHWM:")? * 1024.0
        };
        Some((peak - baseline).max(0.0) / (1024.0 * 1024.0))
    }

    fn source(&self) -> &'static str {
        if self.on_device { "device allocator (bytes reserved)" } else { "process high-water mark (VmHWM)" }
    }
}

/// Untimed runs first: kernels compile and autotune on the first calls.
fn warm_up<B: Backend>(device: &Device<B>, warmup: usize, f: &mut impl FnMut()) {
    for _ in 0..warmup {
        f();
        let _ = B::sync(device);
    }
}

/// Mean milliseconds of `f` over `iters` runs after `warmup` (the mean, not
/// the median, since UFO's cost is an expectation over its draws).
fn mean_ms<B: Backend>(device: &Device<B>, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    warm_up::<B>(device, warmup, &mut f);
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        f();
    }
    let _ = B::sync(device);
    start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64
}

/// Median and minimum milliseconds of `f` over `iters` runs after `warmup`,
/// each run ending with a device sync so lazy backends are timed fully.
fn time_ms<B: Backend>(device: &Device<B>, warmup: usize, iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    warm_up::<B>(device, warmup, &mut f);
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            let _ = B::sync(device);
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

/// `metagrad bench autodiff`: gradient, Hessian-vector product and one exact
/// MAML step (inner step 0.4) for each task shape.
pub struct AutodiffBench {
    pub iters: usize,
    pub warmup: usize,
    pub backend_name: String,
}

impl OnBackend for AutodiffBench {
    type Output = Vec<BenchRow>;

    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Vec<BenchRow> {
        let mut rows = Vec::new();
        for shape in autodiff_shapes() {
            let model = shape.model;
            let theta = model.init::<B>(0, precision, &device);
            let support = random_batch(&model, shape.support, 1);
            let query = random_batch(&model, shape.query, 2);
            let support_loss = TaskLoss::single(&model, &support, precision, &device);
            let query_loss = TaskLoss::single(&model, &query, precision, &device);
            let direction: Vec<Tensor<B>> = model.init::<B>(3, precision, &device).into_tensors();

            let case = |operation: &str, f: &mut dyn FnMut()| {
                let probe = MemoryProbe::<B>::start(&device);
                let (median, min) = time_ms::<B>(&device, self.warmup, self.iters, f);
                (operation.to_string(), median, min, probe.peak_mib(), probe.source().to_string())
            };
            let cases = vec![
                case("gradient", &mut || {
                    let _ = value_and_grad(&support_loss, &theta);
                }),
                case("hessian-vector product", &mut || {
                    let _ = hvp(&support_loss, &theta, &direction);
                }),
                case("maml step (exact, r=1)", &mut || {
                    let _ = maml(&support_loss, &query_loss, &theta, &InnerLoop::new(1, 0.4));
                }),
            ];
            let gradient_ms = cases[0].1;
            for (operation, median, min, peak, source) in cases {
                let row = BenchRow {
                    workload: format!("{} ({}+{} images)", shape.name, shape.support, shape.query),
                    backend: format!("{} {}", self.backend_name, precision.name()),
                    operation,
                    ms_median: median,
                    ms_min: min,
                    peak_memory_mib: peak,
                    memory_source: source,
                    relative_to_gradient: median / gradient_ms,
                };
                show_progress(&format_table(std::slice::from_ref(&row)));
                rows.push(row);
            }
        }
        rows
    }
}

/// Print a one-row table's row to stderr as soon as it is measured: a long
/// benchmark shows its progress and keeps what it measured if stopped.
fn show_progress(one_row_table: &str) {
    if let Some(line) = one_row_table.lines().nth(1) {
        eprintln!("{line}");
    }
}

/// A fixed-width table of benchmark rows.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<42} {:<10} {:<26} {:>10} {:>10} {:>8} {:>12}\n",
        "workload", "backend", "operation", "median ms", "min ms", "× grad", "peak MiB"
    );
    for r in rows {
        let mem = r.peak_memory_mib.map(|m| format!("{m:.1}")).unwrap_or_else(|| "n/a".into());
        out.push_str(&format!(
            "{:<42} {:<10} {:<26} {:>10.2} {:>10.2} {:>8.2} {:>12}\n",
            r.workload, r.backend, r.operation, r.ms_median, r.ms_min, r.relative_to_gradient, mem
        ));
    }
    out
}

pub fn hypergrad_shapes() -> Vec<TaskShape> {
    vec![
        TaskShape { name: "omniglot 5-way 1-shot", model: Conv4::omniglot(5), support: 5, query: 5 },
        TaskShape { name: "mini-imagenet 5-way 5-shot", model: Conv4::mini_imagenet(5), support: 25, query: 75 },
    ]
}

#[derive(Clone, Debug, Serialize)]
pub struct HypergradRow {
    pub workload: String,
    pub backend: String,
    pub mode: String,
    pub inner_steps: usize,
    pub ms_per_task: f64,
    pub peak_memory_mib: Option<f64>,
    pub memory_source: String,
    /// For ufo: the fraction of tasks run (warm-up included) that took the exact branch.
    pub exact_fraction: Option<f64>,
}

/// `metagrad bench hypergrad`: time per task and peak memory of every mode
/// over a grid of inner steps.
pub struct HypergradBench {
    pub steps: Vec<usize>,
    pub iters: usize,
    pub warmup: usize,
    pub ufo_q: f64,
    pub backend_name: String,
    /// Largest r for the unrolled MAML, whose memory grows with r.
    pub unrolled_max_steps: usize,
}

impl OnBackend for HypergradBench {
    type Output = Vec<HypergradRow>;

    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Vec<HypergradRow> {
        use rand::SeedableRng;
        let mut rows = Vec::new();
        for shape in hypergrad_shapes() {
            let model = shape.model;
            let theta = model.init::<B>(0, precision, &device);
            let task = Task { support: random_batch(&model, shape.support, 1), query: random_batch(&model, shape.query, 2) };
            for &steps in &self.steps {
                let inner = InnerLoop::new(steps, 0.1);
                let mut modes = vec![Mode::Maml, Mode::Fomaml, Mode::Ufo(QRule::Fixed(self.ufo_q)), Mode::implicit(2.0, 5)];
                if steps <= self.unrolled_max_steps {
                    modes.insert(1, Mode::MamlUnrolled);
                }
                for mut mode in modes {
                    let support = TaskLoss::single(&model, &task.support, precision, &device);
                    let query = TaskLoss::single(&model, &task.query, precision, &device);
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(steps as u64);
                    let (mut exact, mut total) = (0usize, 0usize);
                    let probe = MemoryProbe::<B>::start(&device);
                    let ms = mean_ms::<B>(&device, self.warmup, self.iters, || {
                        let h = hypergradient(&mut mode, &support, &query, &theta, &inner, &mut rng);
                        total += 1;
                        exact += usize::from(h.exact_branch() == Some(true));
                    });
                    let is_ufo = matches!(mode, Mode::Ufo(_));
                    let row = HypergradRow {
                        workload: format!("{} ({}+{} images)", shape.name, shape.support, shape.query),
                        backend: format!("{} {}", self.backend_name, precision.name()),
                        mode: if is_ufo { format!("ufo (q={})", self.ufo_q) } else { mode.name().to_string() },
                        inner_steps: steps,
                        ms_per_task: ms,
                        peak_memory_mib: probe.peak_mib(),
                        memory_source: probe.source().to_string(),
                        exact_fraction: is_ufo.then(|| exact as f64 / total.max(1) as f64),
                    };
                    show_progress(&format_hypergrad_table(std::slice::from_ref(&row)));
                    rows.push(row);
                }
            }
        }
        rows
    }
}

pub fn format_hypergrad_table(rows: &[HypergradRow]) -> String {
    let mut out = format!(
        "{:<44} {:<10} {:<16} {:>3} {:>12} {:>10} {:>7}\n",
        "workload", "backend", "mode", "r", "ms/task", "peak MiB", "exact"
    );
    for r in rows {
        let mem = r.peak_memory_mib.map(|m| format!("{m:.1}")).unwrap_or_else(|| "n/a".into());
        let exact = r.exact_fraction.map(|f| format!("{f:.2}")).unwrap_or_default();
        out.push_str(&format!(
            "{:<44} {:<10} {:<16} {:>3} {:>12.1} {:>10} {:>7}\n",
            r.workload, r.backend, r.mode, r.inner_steps, r.ms_per_task, mem, exact
        ));
    }
    out
}

/// Episodes per second one sampler thread draws from a split in memory.
#[derive(Clone, Debug, Serialize)]
pub struct DataRow {
    pub workload: String,
    /// Where the images came from: the dataset cache, or random images of the
    /// same shape when the dataset is not installed (sampling cost depends
    /// only on the shapes).
    pub source: String,
    pub episodes_per_second: f64,
}

/// A split of random images with the given shape, standing in for a dataset that is not installed.
fn stand_in_split(classes: usize, per_class: usize, image_shape: [usize; 3]) -> crate::data::Split {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let n: usize = image_shape.iter().product();
    crate::data::Split {
        name: "train".to_string(),
        image_shape,
        classes: (0..classes)
            .map(|c| crate::data::Class { name: format!("random{c}"), pixels: (0..n * per_class).map(|_| rng.random()).collect(), count: per_class })
            .collect(),
    }
}

/// Sampling speed for Omniglot 5-way 1-shot 15-query and 20-way 5-shot, and
/// Mini-ImageNet 5-way 5-shot 15-query, each for about `seconds`.
pub fn data_bench(omniglot: &crate::data::dataset::DatasetSpec, mini: &crate::data::dataset::DatasetSpec, seconds: f64) -> anyhow::Result<Vec<DataRow>> {
    use crate::data::{EpisodeSampler, EpisodeShape};
    use std::sync::Arc;
    let load = |spec: &crate::data::dataset::DatasetSpec, classes, per_class, shape| match spec.load_split("train") {
        Ok(split) => (Arc::new(split), format!("{} cache", spec.kind.name())),
        Err(e) => {
            eprintln!("{} not loaded ({e:#}); timing random images of the same shape", spec.kind.name());
            (Arc::new(stand_in_split(classes, per_class, shape)), "random stand-in".to_string())
        }
    };
    let omni = load(omniglot, 4400, 20, [1, 28, 28]);
    let mini_split = load(mini, 64, 600, [3, 84, 84]);
    let workloads = [
        ("omniglot 5-way 1-shot 15-query", &omni, EpisodeShape { way: 5, shot: 1, queries: 15 }),
        ("omniglot 20-way 5-shot 15-query", &omni, EpisodeShape { way: 20, shot: 5, queries: 15 }),
        ("mini-imagenet 5-way 5-shot 15-query", &mini_split, EpisodeShape { way: 5, shot: 5, queries: 15 }),
    ];
    let mut rows = Vec::new();
    for (workload, (split, source), shape) in workloads {
        let mut sampler = EpisodeSampler::new(split.clone(), shape, 0)?;
        let start = Instant::now();
        let mut episodes = 0usize;
        while start.elapsed().as_secs_f64() < seconds || episodes < 10 {
            std::hint::black_box(sampler.next_episode());
            episodes += 1;
        }
        let row = DataRow { workload: workload.to_string(), source: source.clone(), episodes_per_second: episodes as f64 / start.elapsed().as_secs_f64() };
        eprintln!("{}: {:.0} episodes/s", row.workload, row.episodes_per_second);
        rows.push(row);
    }
    Ok(rows)
}

pub fn format_data_table(rows: &[DataRow]) -> String {
    let mut out = format!("{:<38} {:<18} {:>12}\n", "workload", "images", "episodes/s");
    for r in rows {
        out.push_str(&format!("{:<38} {:<18} {:>12.0}\n", r.workload, r.source, r.episodes_per_second));
    }
    out
}

/// Training speed of one mode on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct TrainRow {
    pub workload: String,
    pub backend: String,
    pub mode: String,
    /// The meta-batch as one stacked network (true) or task by task.
    pub batched: bool,
    pub meta_batch: usize,
    /// Query images per class.
    pub queries: usize,
    pub inner_steps: usize,
    pub meta_iterations_per_second: f64,
    pub seconds_per_meta_iteration: f64,
    /// Mean seconds per meta-iteration spent waiting for episodes, in
    /// hypergradients, in the Adam step, and in the rest (logging, the final
    /// checkpoint).
    pub data_s: f64,
    pub hypergradient_s: f64,
    pub optimizer_s: f64,
    pub other_s: f64,
    /// `hypergradient_s` split into forward passes, first-order reverse
    /// passes, the second reverse pass of Hessian-vector products, and the
    /// rest (inner-loop updates, conjugate-gradient vector algebra, reading
    /// losses back). Parallel tasks' thread time is scaled to wall time.
    pub forward_s: f64,
    pub backward_s: f64,
    pub hvp_reverse_s: f64,
    pub hypergradient_other_s: f64,
    /// Whether the four fields above were measured (`--no-phase-split` leaves them 0).
    pub phase_split: bool,
    /// Seconds of the first (warm-up) meta-iteration: on a GPU, kernel
    /// compilation and autotuning land here.
    pub first_iteration_s: f64,
    /// Wall seconds of the timed meta-iterations, which ended at
    /// `finished_unix_s` (Unix time): the window in which to read GPU
    /// utilisation sampled beside the run.
    pub timed_s: f64,
    pub finished_unix_s: f64,
    /// The Conv-4 kernels: native or burn (Burn's generic operations).
    pub kernels: String,
    pub precision: String,
    /// Seconds the cores spent in the native convolutions per meta-iteration,
    /// and the GFLOP/s they achieved per core there (native CPU kernels only).
    pub conv_core_s: Option<f64>,
    pub conv_gflops_per_core: Option<f64>,
    /// Peak memory of the training run above its start, and where it was read.
    pub peak_memory_mib: Option<f64>,
    pub memory_source: String,
}

/// A training workload of `bench train`: a dataset's image shape, an episode
/// shape, a meta-batch and the inner loop of its paper.
struct TrainWorkload {
    key: &'static str,
    name: &'static str,
    dataset: &'static str,
    way: usize,
    queries: usize,
    meta_batch: usize,
    inner_steps: usize,
    inner_lr: f64,
    /// iMAML's proximal inner steps and step size on this dataset.
    implicit_steps: usize,
    implicit_lr: f64,
    image_shape: [usize; 3],
    classes: usize,
    per_class: usize,
}

const TRAIN_WORKLOADS: [TrainWorkload; 3] = [
    TrainWorkload { key: "omniglot-5w1s", name: "omniglot 5-way 1-shot", dataset: "omniglot", way: 5, queries: 15, meta_batch: 32, inner_steps: 1, inner_lr: 0.4, implicit_steps: 16, implicit_lr: 0.1, image_shape: [1, 28, 28], classes: 4400, per_class: 20 },
    TrainWorkload { key: "omniglot-20w1s", name: "omniglot 20-way 1-shot", dataset: "omniglot", way: 20, queries: 5, meta_batch: 16, inner_steps: 5, inner_lr: 0.1, implicit_steps: 16, implicit_lr: 0.1, image_shape: [1, 28, 28], classes: 4400, per_class: 20 },
    TrainWorkload { key: "mini-imagenet-5w1s", name: "mini-imagenet 5-way 1-shot", dataset: "mini-imagenet", way: 5, queries: 15, meta_batch: 4, inner_steps: 5, inner_lr: 0.01, implicit_steps: 10, implicit_lr: 0.01, image_shape: [3, 84, 84], classes: 64, per_class: 40 },
];

pub const TRAIN_WORKLOAD_KEYS: &str = "omniglot-5w1s, omniglot-20w1s, mini-imagenet-5w1s";

/// What `bench train` measures.
pub struct TrainBench {
    pub selection: crate::autodiff::backend::Selection,
    /// Meta-iterations timed per case, after one warm-up iteration.
    pub steps: usize,
    pub modes: Vec<String>,
    /// Workload keys (`TRAIN_WORKLOAD_KEYS`); empty means all.
    pub workloads: Vec<String>,
    /// Inner steps to run every case with; empty means each workload's own
    /// (and iMAML's proximal steps for implicit).
    pub inner_steps: Vec<usize>,
    pub batched: bool,
    /// Split each meta-iteration's hypergradient time into forward, backward
    /// and HVP (waits for the device at every phase boundary).
    pub phase_split: bool,
    /// Tasks per meta-batch instead of each workload's own (smoke runs).
    pub meta_batch: Option<usize>,
    /// Query images per class instead of each workload's own (15): the MAML
    /// paper's Omniglot runs use as many queries as shots.
    pub queries: Option<usize>,
    /// The Conv-4 kernels to time each case with (native first is the default).
    pub kernels: Vec<crate::autodiff::kernels::KernelPath>,
}

/// A training job that also reports its peak memory on the backend it runs on.
struct MeasuredTrain(crate::train::TrainJob);

impl crate::autodiff::backend::OnBackend for MeasuredTrain {
    type Output = anyhow::Result<(crate::train::Outcome, Option<f64>, String)>;
    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Self::Output {
        let probe = MemoryProbe::<B>::start(&device);
        let outcome = crate::autodiff::backend::OnBackend::run::<B>(self.0, device, precision)?;
        Ok((outcome, probe.peak_mib(), probe.source().to_string()))
    }
}

/// Meta-iterations per second of the real training loop (sampler, every
/// task's hypergradient, Adam) on random images of each workload's shape, with
/// the time split into data, forward, backward, HVP, Adam and the rest, and
/// the run's peak memory.
pub fn train_bench(bench: &TrainBench) -> anyhow::Result<Vec<TrainRow>> {
    use std::sync::Arc;
    for key in &bench.workloads {
        if !TRAIN_WORKLOADS.iter().any(|w| w.key == key) {
            anyhow::bail!("unknown workload '{key}': expected one of {TRAIN_WORKLOAD_KEYS}");
        }
    }
    let dir = std::env::temp_dir().join(format!("metagrad-bench-train-{}", std::process::id()));
    let mut rows = Vec::new();
    crate::autodiff::profile::set_enabled(bench.phase_split);
    for w in TRAIN_WORKLOADS.iter().filter(|w| bench.workloads.is_empty() || bench.workloads.iter().any(|k| k == w.key)) {
        let split = Arc::new(stand_in_split(w.classes, w.per_class, w.image_shape));
        for mode in &bench.modes {
            // `maml-head`: the mode with head-only adaptation.
            let (name, inner_params) = mode.strip_suffix("-head").map_or((mode.as_str(), "all"), |m| (m, "head"));
            let own_steps = if name == "implicit" { w.implicit_steps } else { w.inner_steps };
            let grid = if bench.inner_steps.is_empty() { vec![own_steps] } else { bench.inner_steps.clone() };
            for r in grid {
                let (mode_keys, lr) = match name {
                    "ufo" => ("name = \"ufo\"\nq_rule = \"adaptive\"\n".to_string(), w.inner_lr),
                    "implicit" => ("name = \"implicit\"\nlambda = 2.0\ncg_steps = 5\n".to_string(), w.implicit_lr),
                    m => (format!("name = \"{m}\"\n"), w.inner_lr),
                };
                let text = format!(
                    "[run]\nname = \"{}-{mode}-{r}\"\n[data]\ndataset = \"{}\"\nway = {}\nqueries = {}\n[train]\ntask_batching = \"{}\"\nmeta_steps = {}\nmeta_batch = {}\ninner_steps = {r}\ninner_lr = {lr}\ninner_params = \"{inner_params}\"\n[mode]\n{mode_keys}[eval]\nevery = 0\n[checkpoint]\ndir = \"{}\"\nevery = 0\n",
                    w.key,
                    w.dataset,
                    w.way,
                    bench.queries.unwrap_or(w.queries),
                    if bench.batched { "on" } else { "off" },
                    bench.steps + 1,
                    bench.meta_batch.unwrap_or(w.meta_batch),
                    dir.display()
                );
                let config = crate::train::config::Config::parse(&text, &[], "benchmark")?;
                for &kernels in &bench.kernels {
                    let _ = std::fs::remove_dir_all(config.run_dir());
                    let job = crate::train::TrainJob {
                        config: config.clone(),
                        resume: None,
                        progress: false,
                        stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                        splits: Some((split.clone(), None)),
                        task_batching: bench.batched,
                    };
                    crate::autodiff::kernels::start_counting_convolutions();
                    let measured = kernels.run(|| crate::autodiff::backend::dispatch(bench.selection, MeasuredTrain(job)));
                    let conv = crate::autodiff::kernels::stop_counting_convolutions();
                    let (outcome, peak_memory_mib, memory_source) = measured?;
                    let mut row = train_row(w, mode, r, bench, &outcome.timings, peak_memory_mib, memory_source);
                    row.kernels = kernels.name().to_string();
                    if conv.core_seconds > 0.0 {
                        row.conv_core_s = Some(conv.core_seconds / outcome.timings.len() as f64);
                        row.conv_gflops_per_core = conv.gflops_per_core();
                    }
                    eprintln!(
                        "{} {mode} r={r} ({} kernels): {:.3} meta-iterations/s (first meta-iteration {:.1} s)",
                        w.name,
                        row.kernels,
                        row.meta_iterations_per_second,
                        row.first_iteration_s
                    );
                    rows.push(row);
                }
            }
        }
    }
    crate::autodiff::profile::set_enabled(false);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

/// Means over the timed meta-iterations; the first one, a warm-up (on a GPU
/// it compiles and autotunes the kernels), is reported on its own.
fn train_row(w: &TrainWorkload, mode: &str, r: usize, bench: &TrainBench, timings: &[crate::train::StepTiming], peak_memory_mib: Option<f64>, memory_source: String) -> TrainRow {
    let total = |t: &crate::train::StepTiming| t.data_s + t.hypergradient_s + t.optimizer_s + t.other_s;
    let first_iteration_s = total(&timings[0]);
    let timed = &timings[1..];
    let mean = |f: &dyn Fn(&crate::train::StepTiming) -> f64| timed.iter().map(f).sum::<f64>() / timed.len() as f64;
    let (data_s, hypergradient_s, optimizer_s, other_s) = (mean(&|t| t.data_s), mean(&|t| t.hypergradient_s), mean(&|t| t.optimizer_s), mean(&|t| t.other_s));
    // Phase counters hold thread time; the tasks' own total scales them to wall time.
    let task_s = mean(&|t| t.phases.task_s);
    let to_wall = if task_s > 0.0 { hypergradient_s / task_s } else { 0.0 };
    let (forward_s, backward_s, hvp_reverse_s) = (mean(&|t| t.phases.forward_s) * to_wall, mean(&|t| t.phases.backward_s) * to_wall, mean(&|t| t.phases.hvp_reverse_s) * to_wall);
    let seconds = data_s + hypergradient_s + optimizer_s + other_s;
    TrainRow {
        workload: w.name.to_string(),
        backend: bench.selection.kind.name().to_string(),
        mode: mode.to_string(),
        batched: bench.batched,
        meta_batch: bench.meta_batch.unwrap_or(w.meta_batch),
        queries: bench.queries.unwrap_or(w.queries),
        inner_steps: r,
        meta_iterations_per_second: 1.0 / seconds,
        seconds_per_meta_iteration: seconds,
        data_s,
        hypergradient_s,
        optimizer_s,
        other_s,
        forward_s,
        backward_s,
        hvp_reverse_s,
        hypergradient_other_s: (hypergradient_s - forward_s - backward_s - hvp_reverse_s).max(0.0),
        phase_split: bench.phase_split,
        first_iteration_s,
        timed_s: timed.iter().map(total).sum(),
        // Called as the run returns: its timed meta-iterations ended now.
        finished_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        kernels: String::new(),
        precision: bench.selection.precision.name().to_string(),
        conv_core_s: None,
        conv_gflops_per_core: None,
        peak_memory_mib,
        memory_source,
    }
}

pub fn format_train_table(rows: &[TrainRow]) -> String {
    let mut out = format!(
        "{:<27} {:<7} {:<8} {:<7} {:<7} {:>5} {:>3} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9} {:>8}\n",
        "workload", "backend", "mode", "kernels", "batched", "tasks", "r", "meta-it/s", "s/meta-it", "data", "fwd", "bwd", "hvp", "hg-oth", "adam", "other", "conv", "conv GF/s", "peak MiB", "first s"
    );
    for r in rows {
        let pct = |v: f64| format!("{:.0}%", 100.0 * v / r.seconds_per_meta_iteration);
        let split = |v: f64| if r.phase_split { pct(v) } else { "-".to_string() };
        let mem = r.peak_memory_mib.map(|m| format!("{m:.0}")).unwrap_or_else(|| "n/a".into());
        // Core seconds in convolutions against the cores' wall seconds.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
        let conv_share = r.conv_core_s.map_or("-".to_string(), |c| format!("{:.0}%", 100.0 * c / (cores * r.seconds_per_meta_iteration)));
        let conv_rate = r.conv_gflops_per_core.map_or("-".to_string(), |g| format!("{g:.1}"));
        out.push_str(&format!(
            "{:<27} {:<7} {:<8} {:<7} {:<7} {:>5} {:>3} {:>9.3} {:>9.2} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9} {:>8.1}\n",
            r.workload,
            r.backend,
            r.mode,
            r.kernels,
            r.batched,
            r.meta_batch,
            r.inner_steps,
            r.meta_iterations_per_second,
            r.seconds_per_meta_iteration,
            pct(r.data_s),
            split(r.forward_s),
            split(r.backward_s),
            split(r.hvp_reverse_s),
            split(r.hypergradient_other_s),
            pct(r.optimizer_s),
            pct(r.other_s),
            conv_share,
            conv_rate,
            mem,
            r.first_iteration_s
        ));
    }
    if rows.iter().any(|r| r.conv_gflops_per_core.is_some()) {
        let f64_run = rows.iter().any(|r| r.precision == "f64");
        if let Some((peak, how)) = crate::autodiff::kernels::peak_gflops_per_core(f64_run) {
            out.push_str(&format!(
                "conv: share of the cores' time in the native convolutions; conv GF/s: their achieved GFLOP/s per core, against a peak of about {peak:.0} per core ({how})\n"
            ));
        }
    }
    out
}
