//! The one place that chooses the Burn device the model runs on.
//!
//! `auto` takes the first CUDA GPU when the binary was built with `--features cuda` and an
//! NVIDIA driver answers, otherwise the Flex CPU backend. (Burn's `Device::default()` would
//! pick CUDA whenever the feature is compiled in, even with no driver, and panic on first use.)
//! `wgpu` (built with `--features wgpu`) runs the same model code on any Vulkan, Metal or DX12
//! GPU; it is asked for by name only, since wgpu falls back to a software renderer when there
//! is no GPU, which would be far slower than Flex.

use anyhow::{Result, bail};
use burn::tensor::{DType, Device};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
    Wgpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "cpu" | "flex" => Self::Cpu,
            "cuda" | "gpu" => Self::Cuda,
            "wgpu" | "vulkan" => Self::Wgpu,
            other => bail!("unknown device {other:?} (expected auto, cpu, cuda or wgpu)"),
        })
    }
}

/// Whether `device` is the CPU backend (Flex), where the quantized kernels, the KV cache's
/// buffers and the SIMD attention work on host memory.
pub fn is_host(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// Whether an NVIDIA driver answers and reports at least one GPU.
pub fn cuda_driver_present() -> bool {
    nvml_wrapper::Nvml::init()
        .ok()
        .and_then(|n| n.device_count().ok())
        .is_some_and(|c| c > 0)
}

/// Resolves the choice (`BURN_DEVICE` in the environment overrides `auto`).
pub fn select(choice: DeviceChoice) -> Result<Device> {
    let choice = match (choice, std::env::var("BURN_DEVICE").ok()) {
        (DeviceChoice::Auto, Some(v)) if !v.is_empty() => v.parse()?,
        _ => choice,
    };
    match choice {
        DeviceChoice::Cpu => Ok(Device::flex()),
        DeviceChoice::Cuda => cuda(true),
        DeviceChoice::Wgpu => wgpu(),
        DeviceChoice::Auto => cuda(false).or_else(|_| Ok(Device::flex())),
    }
}

#[cfg(feature = "cuda")]
fn cuda(_required: bool) -> Result<Device> {
    if cuda_driver_present() {
        Ok(Device::cuda(0))
    } else {
        bail!("device = \"cuda\" but no NVIDIA driver or GPU was found")
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(required: bool) -> Result<Device> {
    if required {
        bail!(
            "device = \"cuda\" but this binary was built without CUDA support; rebuild with `cargo build --release --features cuda`"
        )
    }
    bail!("no CUDA support built in")
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Device> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Device> {
    bail!(
        "device = \"wgpu\" but this binary was built without wgpu support; rebuild with `cargo build --release --features wgpu`"
    )
}

/// The compute dtype named in the config.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown dtype {other:?} (expected f32, f16 or bf16)"),
    })
}
