//! Choosing where tensors live: Flex on the CPU (f32 or f64), wgpu on the
//! GPU (f32), or CUDA on an NVIDIA GPU (f32, in builds with the `cuda`
//! feature). wgpu is the default when a hardware adapter exists; without one,
//! metagrad says so in one line and runs on the CPU instead of panicking.
//!
//! wgpu and CUDA are two runtimes of the same Burn backend type
//! (`CubeBackend`): only the device differs, so every job runs on either.

use std::sync::OnceLock;

use anyhow::{Result, bail};
use burn::backend::tensor::Device;
use burn::backend::wgpu::{CubeBackend, wgpu};
use burn::backend::{CubeDevice, Flex, FlexDevice, WgpuDevice, WgpuDeviceKind};

use crate::autodiff::tensor::{BaseBackend, Precision};

/// The environment variable that picks the backend when `--backend` is absent.
pub const BACKEND_ENV: &str = "METAGRAD_BACKEND";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Wgpu,
    /// Burn's CUDA runtime; present in every build so that asking for it in
    /// a build without the `cuda` feature says how to get it.
    Cuda,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether tensors of this backend live on a GPU (f32 only, lazy queue).
    pub fn is_gpu(self) -> bool {
        self != BackendKind::Cpu
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(BackendKind::Cpu),
            "wgpu" | "gpu" => Ok(BackendKind::Wgpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(format!("unknown backend '{other}': expected wgpu, cuda or cpu")),
        }
    }
}

/// One wgpu adapter as the driver describes it.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub name: String,
    pub api: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    /// lavapipe, llvmpipe, SwiftShader, WARP...: a CPU pretending to be a GPU.
    pub software: bool,
}

/// Every adapter wgpu finds: on Vulkan, Metal and DX12, or on OpenGL when
/// none of those has one (wgpu's own order of preference). Asked once per
/// process: instances that come and go can crash some Vulkan loaders.
pub fn wgpu_adapters() -> &'static [Adapter] {
    static ADAPTERS: OnceLock<Vec<Adapter>> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        let native = probe(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12);
        if native.is_empty() { probe(wgpu::Backends::GL) } else { native }
    })
}

fn probe(backends: wgpu::Backends) -> Vec<Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = burn::tensor::try_read_sync(instance.enumerate_adapters(backends)).unwrap_or_default();
    adapters
        .iter()
        .map(|a| {
            let info = a.get_info();
            let lower = format!("{} {}", info.name, info.driver).to_lowercase();
            let software = info.device_type == wgpu::DeviceType::Cpu
                || ["llvmpipe", "lavapipe", "swiftshader", "softpipe", "warp"].iter().any(|s| lower.contains(s));
            Adapter {
                name: info.name.clone(),
                api: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: info.driver.clone(),
                driver_info: info.driver_info.clone(),
                software,
            }
        })
        .collect()
}

/// A resolved choice of backend and precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub kind: BackendKind,
    pub precision: Precision,
}

impl Selection {
    pub fn describe(&self) -> String {
        format!("{} ({})", self.kind.name(), self.precision.name())
    }
}

/// Resolve `--backend` / `METAGRAD_BACKEND` and `--precision` into a choice
/// that can run here. Returns the selection and, when metagrad had to fall
/// back, the one line that says why.
pub fn select(requested: Option<BackendKind>, precision: Option<Precision>) -> Result<(Selection, Option<String>)> {
    let requested = match requested {
        Some(kind) => Some(kind),
        None => match std::env::var(BACKEND_ENV) {
            Ok(v) if !v.is_empty() => Some(v.parse::<BackendKind>().map_err(|e| anyhow::anyhow!("{BACKEND_ENV}: {e}"))?),
            _ => None,
        },
    };
    let has_adapter = || !wgpu_adapters().is_empty();
    let has_hardware_adapter = || wgpu_adapters().iter().any(|a| !a.software);
    match (requested, precision) {
        (Some(kind), Some(Precision::F64)) if kind.is_gpu() => bail!(
            "f64 is not available on {} (GPU kernels here compute in f32); use --backend cpu --precision f64, or --precision f32 on the GPU",
            kind.name()
        ),
        (Some(BackendKind::Cuda), _) if !cfg!(feature = "cuda") => bail!(
            "this metagrad was built without CUDA: rebuild with `cargo build --release --features cuda` (the NVIDIA driver and libnvrtc are loaded at run time), or use --backend wgpu"
        ),
        (Some(BackendKind::Wgpu), _) if !has_adapter() => bail!(
            "no wgpu adapter found (no Vulkan, Metal, DX12 or OpenGL driver): install a GPU driver (on Debian/Ubuntu without a GPU, `apt-get install mesa-vulkan-drivers` gives a software one) or use --backend cpu"
        ),
        (Some(kind), p) => Ok((Selection { kind, precision: p.unwrap_or(Precision::F32) }, None)),
        (None, Some(Precision::F64)) => Ok((Selection { kind: BackendKind::Cpu, precision: Precision::F64 }, None)),
        (None, _) if has_hardware_adapter() => Ok((Selection { kind: BackendKind::Wgpu, precision: Precision::F32 }, None)),
        (None, _) if has_adapter() => Ok((
            Selection { kind: BackendKind::Cpu, precision: Precision::F32 },
            Some("the only wgpu adapter is a software rasteriser, slower than the CPU backend; running on the CPU (Flex). Use --backend wgpu to run on it anyway".to_string()),
        )),
        (None, _) => Ok((
            Selection { kind: BackendKind::Cpu, precision: Precision::F32 },
            Some("no wgpu adapter found; running on the CPU backend (Flex) instead".to_string()),
        )),
    }
}

/// Work written once for any base backend; `dispatch` runs it on the
/// selected one.
pub trait OnBackend {
    type Output;
    fn run<B: BaseBackend>(self, device: Device<B>, precision: Precision) -> Self::Output;
}

pub fn wgpu_device() -> CubeDevice {
    CubeDevice::from(WgpuDevice::new(WgpuDeviceKind::DefaultDevice))
}

/// The first CUDA device (the GPU that `CUDA_VISIBLE_DEVICES` puts first).
#[cfg(feature = "cuda")]
pub fn cuda_device() -> CubeDevice {
    CubeDevice::Cuda(burn::backend::cuda::CudaDevice::new(0))
}

pub fn dispatch<J: OnBackend>(selection: Selection, job: J) -> J::Output {
    match selection.kind {
        BackendKind::Cpu => job.run::<Flex>(FlexDevice, selection.precision),
        BackendKind::Wgpu => job.run::<CubeBackend>(wgpu_device(), selection.precision),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<CubeBackend>(cuda_device(), selection.precision),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => unreachable!("select() refuses cuda in a build without the cuda feature"),
    }
}

/// The GPU backends compiled into this binary, as `metagrad devices` names them.
pub fn gpu_builds() -> Vec<&'static str> {
    let mut built = vec![if cfg!(feature = "vulkan") {
        "wgpu (SPIR-V on Vulkan adapters, WGSL elsewhere; `vulkan` feature)"
    } else {
        "wgpu (WGSL shaders)"
    }];
    if cfg!(feature = "cuda") {
        built.push("cuda (`cuda` feature)");
    }
    built
}

/// The CUDA device's name, or why there is none: initialising the runtime
/// panics without a driver, so the attempt is fenced.
#[cfg(feature = "cuda")]
fn cuda_report() -> String {
    let probe = std::panic::catch_unwind(|| {
        let client = cuda_device().client();
        client.properties().identity.name.clone()
    });
    match probe {
        Ok(name) => format!("cuda  [0] {name}  (use --backend cuda)\n"),
        Err(_) => "cuda  no CUDA device: the NVIDIA driver (libcuda) or libnvrtc could not be loaded\n".to_string(),
    }
}

/// The report `metagrad devices` prints.
pub fn devices_report() -> String {
    let mut out = format!("built with: cpu (Flex), {}\n", gpu_builds().join(", "));
    out.push_str("cpu   Flex (Burn's CPU backend): f32 and f64, always available\n");
    #[cfg(feature = "cuda")]
    out.push_str(&cuda_report());
    let adapters = wgpu_adapters();
    if adapters.is_empty() {
        out.push_str(
            "wgpu  no adapter found (no Vulkan, Metal, DX12 or OpenGL driver); metagrad will run on the CPU backend\n",
        );
        return out;
    }
    for (i, a) in adapters.iter().enumerate() {
        let driver = if a.driver_info.is_empty() { a.driver.clone() } else { format!("{} ({})", a.driver, a.driver_info) };
        out.push_str(&format!(
            "wgpu  [{i}] {}  api: {}  type: {}  driver: {}\n",
            a.name, a.api, a.device_type, driver
        ));
        if a.software {
            out.push_str(
                "      warning: this is a software rasteriser running on the CPU; it is slower than the cpu backend (use --backend cpu)\n",
            );
        }
    }
    out
}

/// Keep freed memory in the process rather than hand it back to the OS after
/// every op. Each op allocates its output; with glibc's defaults, large
/// buffers are fresh mappings and a shrinking heap is trimmed, so the kernel
/// zeroes the same pages again and again (a fifth of the CPU time of a
/// Mini-ImageNet MAML step). Buffers up to 32 MiB (glibc's limit) then come
/// from the heap and are reused.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes glibc's allocation thresholds; it is
        // called at start-up before other threads allocate.
        unsafe {
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 64 << 20);
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
        }
    }
}
