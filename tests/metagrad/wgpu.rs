//! The same derivatives on wgpu (f32) as on Flex (f64). Kept to one test:
//! on a software rasteriser the first call compiles kernels for a minute.

use burn::backend::Flex;
use burn::backend::wgpu::CubeBackend;
use metagrad::autodiff::backend::{wgpu_adapters, wgpu_device};
use metagrad::bench::random_batch;
use metagrad::autodiff::diff::{hvp, value_and_grad};
use metagrad::data::Task;
use metagrad::hypergrad::{InnerLoop, Mode, QRule, TaskLoss, task_hypergradient};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use metagrad::models::{Conv4, FunctionalModel};
use metagrad::data::store::HostTensor;
use metagrad::autodiff::tensor::{Precision, Tensor};

use crate::common::*;
use crate::ops::{ALL_OPS, host_case};

/// Whether wgpu can run here; CI sets METAGRAD_REQUIRE_WGPU=1 so a missing
/// driver fails instead of skipping.
fn wgpu_available() -> bool {
    if !wgpu_adapters().is_empty() {
        return true;
    }
    assert!(std::env::var_os("METAGRAD_REQUIRE_WGPU").is_none(), "METAGRAD_REQUIRE_WGPU is set but no wgpu adapter was found");
    eprintln!("skipping wgpu test: no wgpu adapter on this machine");
    false
}

fn host<B: metagrad::autodiff::tensor::Level>(ts: &[Tensor<B>]) -> Vec<f64> {
    ts.iter().flat_map(|t| HostTensor::from_tensor(t).to_f64()).collect()
}

#[test]
fn wgpu_f32_derivatives_agree_with_flex_f64() {
    if !wgpu_available() {
        return;
    }
    let device = wgpu_device();
    let mut failures = Vec::new();
    for (k, op) in ALL_OPS.iter().enumerate() {
        let case = host_case(*op, 500 + k as u64);
        let (loss64, x64) = case.load::<Flex>(*op, F64, &DEV);
        let (loss32, x32) = case.load::<CubeBackend>(*op, Precision::F32, &device);
        let d64 = random_unit_direction(&mut rng(600 + k as u64), &x64);
        let d32: Vec<Tensor<CubeBackend>> = d64.iter().map(|d| HostTensor::from_tensor(d).to_tensor(Precision::F32, &device)).collect();
        let (_, g64, h64) = hvp(&loss64, &x64, &d64);
        let (_, g32, h32) = hvp(&loss32, &x32, &d32);
        let eg = relative_error(&host(&g32), &host(&g64));
        let eh = relative_error(&host(&h32), &host(&h64));
        if !(eg < 1e-4 && eh < 1e-3) {
            failures.push(format!("{op:?}: gradient error {eg:.2e}, Hessian-vector error {eh:.2e}"));
        }
    }
    assert!(failures.is_empty(), "wgpu f32 vs Flex f64:\n{}", failures.join("\n"));

    // The whole Conv-4 loss: gradient and H·v.
    let model = Conv4 { channels: 16, ..Conv4::omniglot(5) };
    let theta64 = model.init::<Flex>(1, F64, &DEV);
    let theta32 = model.init::<CubeBackend>(1, Precision::F32, &device);
    let support = random_batch(&model, 5, 2);
    let (s64, s32) = (TaskLoss::single(&model, &support, F64, &DEV), TaskLoss::single(&model, &support, Precision::F32, &device));
    let v64 = random_unit_direction(&mut rng(3), &theta64);
    let v32: Vec<Tensor<CubeBackend>> = v64.iter().map(|d| HostTensor::from_tensor(d).to_tensor(Precision::F32, &device)).collect();
    let (l64, g64) = value_and_grad(&s64, &theta64);
    let (l32, g32) = value_and_grad(&s32, &theta32);
    assert!((l64.item() - l32.item()).abs() < 1e-4 * l64.item().abs(), "loss {} vs {}", l32.item(), l64.item());
    let eg = relative_error(&host(&g32), &host(&g64));
    assert!(eg < 1e-4, "Conv-4 gradient on wgpu off by {eg:.2e}");
    let (_, _, h64) = hvp(&s64, &theta64, &v64);
    let (_, _, h32) = hvp(&s32, &theta32, &v32);
    let eh = relative_error(&host(&h32), &host(&h64));
    assert!(eh < 1e-3, "Conv-4 Hessian-vector product on wgpu off by {eh:.2e}");

    // One smoke test per hypergradient mode: wgpu f32 against Flex f64.
    let task = Task { support: support.clone(), query: random_batch(&model, 5, 4) };
    let inner = InnerLoop::new(2, 0.1);
    let modes = [
        Mode::Maml,
        Mode::MamlUnrolled,
        Mode::Fomaml,
        Mode::Ufo(QRule::Fixed(0.5)),
        Mode::implicit(2.0, 3),
    ];
    let mut failures = Vec::new();
    for mode in modes {
        // The same seed gives the same Bernoulli draws on both backends (they are drawn on the host).
        let (r64, _) = task_hypergradient(&mut mode.clone(), &model, &task, &theta64, &inner, &mut ChaCha8Rng::seed_from_u64(5));
        let (r32, _) = task_hypergradient(&mut mode.clone(), &model, &task, &theta32, &inner, &mut ChaCha8Rng::seed_from_u64(5));
        let err = relative_error(&host(&r32.grad), &host(&r64.grad));
        let loss_err = (r32.query_loss() - r64.query_loss()).abs();
        if !(err < 1e-3 && loss_err < 1e-4 && r32.exact_branch() == r64.exact_branch()) {
            failures.push(format!("{}: hypergradient error {err:.2e}, query-loss error {loss_err:.2e}", mode.name()));
        }
    }
    assert!(failures.is_empty(), "modes on wgpu f32 vs Flex f64:\n{}", failures.join("\n"));
}

/// The GPU check's dry run (benches/gpu_check.sh --dry-run): every step of
/// the script runs with tiny meta-batches, so the script that a GPU machine
/// runs once is known to work. Its "GPU" here is the CPU backend: on
/// lavapipe each process compiles and autotunes its kernels for minutes
/// (wgpu's agreement with the CPU is the test above).
#[test]
fn gpu_check_script_dry_run_passes() {
    let out_dir = fresh_dir("gpu-check");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join("benches/gpu_check.sh"))
        .arg("--dry-run")
        .env("METAGRAD_BIN", env!("CARGO_BIN_EXE_metagrad"))
        .env("OUT", &out_dir)
        .env("GPU_CHECK_DRY_BACKEND", "cpu")
        .env_remove("METAGRAD_BACKEND")
        .output()
        .expect("bash runs");
    let log = std::fs::read_to_string(out_dir.join("log.txt")).unwrap_or_default();
    assert!(out.status.success(), "gpu_check.sh --dry-run failed:\n{log}\n{}", String::from_utf8_lossy(&out.stderr));
    // The dry run checks one mode per step (a software adapter compiles every kernel on the CPU).
    let hypergrad = std::fs::read_to_string(out_dir.join("hypergrad.txt")).unwrap();
    assert!(hypergrad.contains("cpu maml: max |gpu - cpu|") && hypergrad.contains(": ok"), "{hypergrad}");
    let summary = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(summary.contains("| omniglot 5-way 1-shot | maml | metagrad-cpu | 2 | 1 | 1 |"), "{summary}");
}
