//! Devices and how one is chosen. `Device::auto()` prefers CUDA, then a hardware wgpu adapter,
//! then the CPU, and always says which it took and why; nothing falls back silently.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::Arc;

use crate::error::{Error, Result};

/// Options for opening a wgpu device.
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Accept a software adapter (Mesa lavapipe / llvmpipe). Off by default: a software adapter
    /// is far slower than the CPU backend and is only useful for testing the WGSL kernels.
    pub allow_software: bool,
}

/// Where tensors live and kernels run. Cheap to clone (backends are reference-counted).
#[derive(Clone)]
pub enum Device {
    /// The host CPU (multi-threaded with rayon).
    Cpu,
    /// An NVIDIA GPU through the CUDA driver API; kernels are JIT-compiled by NVRTC.
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaDevice>),
    /// A GPU (or software adapter) through wgpu; kernels are WGSL compute shaders.
    #[cfg(feature = "wgpu")]
    Wgpu(Arc<crate::wgpu::WgpuDevice>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            #[cfg(feature = "cuda")]
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "wgpu")]
            (Device::Wgpu(a), Device::Wgpu(b)) => Arc::ptr_eq(a, b),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// Quiets the Vulkan loader on a headless machine; call it first thing in `main`, before any
/// thread starts (it may set an environment variable).
///
/// Without a session (`XDG_RUNTIME_DIR` unset: CI, containers, ssh), Mesa's `device_select`
/// Vulkan layer tries to reach a Wayland display while adapters are enumerated and prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` for nothing. The layer
/// only reorders adapters, which recfuse ranks itself, so on such a machine this sets
/// `NODEVICE_SELECT=1` (Mesa's switch for it). It does nothing where a session exists or the
/// variable is already set. The library never changes the environment by itself.
///
/// ```
/// recfuse::device::prepare_headless();
/// let (dev, why) = recfuse::Device::auto()?;
/// println!("{} ({why})", dev.describe());
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn prepare_headless() {
    let session = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| std::path::Path::new(&d).is_dir())
        .unwrap_or(false);
    if !session && std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

thread_local! {
    static HOST_TRANSFERS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts one host↔device tensor copy made by the calling thread.
#[allow(dead_code)]
pub(crate) fn count_host_transfer() {
    HOST_TRANSFERS.with(|c| c.set(c.get() + 1));
}

impl Device {
    /// The CPU backend; always available.
    pub fn cpu() -> Device {
        Device::Cpu
    }

    /// CUDA device `ordinal`. Returns `Error::DeviceUnavailable` (never panics) when libcuda,
    /// libnvrtc or the device is missing.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            Ok(Device::Cuda(crate::cuda::CudaDevice::new(ordinal)?))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::DeviceUnavailable {
                backend: "cuda",
                reason: "recfuse was built without the `cuda` feature".into(),
            })
        }
    }

    /// A wgpu device. Hardware adapters only, unless `opts.allow_software`.
    pub fn wgpu(opts: &WgpuOptions) -> Result<Device> {
        #[cfg(feature = "wgpu")]
        {
            Ok(Device::Wgpu(crate::wgpu::WgpuDevice::new(opts)?))
        }
        #[cfg(not(feature = "wgpu"))]
        {
            let _ = opts;
            Err(Error::DeviceUnavailable {
                backend: "wgpu",
                reason: "recfuse was built without the `wgpu` feature".into(),
            })
        }
    }

    /// Parses a device name: `cpu`, `cuda`, `cuda:N`, `wgpu` (hardware only) or `wgpu-sw`
    /// (software adapter allowed).
    pub fn from_name(name: &str) -> Result<Device> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            "wgpu" => Device::wgpu(&WgpuOptions::default()),
            "wgpu-sw" => Device::wgpu(&WgpuOptions {
                allow_software: true,
            }),
            s if s.starts_with("cuda:") => {
                let n = s[5..].parse::<usize>().map_err(|_| {
                    Error::invalid("Device::from_name", "name", format!("bad ordinal in `{s}`"))
                })?;
                Device::cuda(n)
            }
            s => Err(Error::invalid(
                "Device::from_name",
                "name",
                format!("`{s}` is not one of cpu, cuda, cuda:N, wgpu, wgpu-sw"),
            )),
        }
    }

    /// Picks the best device and explains the choice. `RECFUSE_DEVICE` overrides it (an
    /// override that cannot be honoured is an error, not a fallback).
    pub fn auto() -> Result<(Device, String)> {
        let var = std::env::var("RECFUSE_DEVICE");
        if let Err(std::env::VarError::NotUnicode(raw)) = &var {
            return Err(Error::invalid(
                "Device::auto",
                "RECFUSE_DEVICE",
                format!("{raw:?} is not valid UTF-8 (expected cpu, cuda[:N], wgpu or wgpu-sw)"),
            ));
        }
        if let Ok(name) = var {
            let d = Device::from_name(&name)?;
            let why = format!("RECFUSE_DEVICE={name} chose {}", d.describe());
            return Ok((d, why));
        }
        let mut why = Vec::new();
        match Device::cuda(0) {
            Ok(d) => {
                let msg = format!("chose {} (CUDA is preferred)", d.describe());
                return Ok((d, msg));
            }
            Err(e) => why.push(format!("no CUDA ({e})")),
        }
        match Device::wgpu(&WgpuOptions::default()) {
            Ok(d) => {
                why.push(format!("chose {}", d.describe()));
                return Ok((d, why.join("; ")));
            }
            Err(e) => why.push(format!("no hardware wgpu adapter ({e})")),
        }
        why.push("chose the CPU".into());
        Ok((Device::Cpu, why.join("; ")))
    }

    /// Short backend name: `cpu`, `cuda` or `wgpu`.
    pub fn backend(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => "cuda",
            #[cfg(feature = "wgpu")]
            Device::Wgpu(_) => "wgpu",
        }
    }

    /// True for the CUDA device of `tools/cuda-emu` (CUDA kernels executed on the CPU): its
    /// results check the kernels, its timings mean nothing.
    ///
    /// ```
    /// assert!(!recfuse::Device::cpu().is_emulated());
    /// ```
    pub fn is_emulated(&self) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.is_emulated(),
            _ => false,
        }
    }

    /// How many tensor copies between the host and a GPU device (uploads plus downloads, any
    /// GPU device) the calling thread has made so far. Per thread, so that parallel tests do
    /// not see each other's copies. For tests that check a step stays on the device.
    #[doc(hidden)]
    pub fn host_transfer_count(&self) -> u64 {
        HOST_TRANSFERS.with(|c| c.get())
    }

    /// A human-readable description: backend, adapter or GPU name, architecture.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.describe(),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => d.describe(),
        }
    }

    /// Waits until all work queued on this device has finished (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.synchronize(),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => d.synchronize(),
        }
    }
}
