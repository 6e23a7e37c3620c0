//! STUB: the wgpu backend (to be implemented).
use crate::error::{Error, Result};
use std::sync::Arc;

pub(crate) mod gemm;

/// A wgpu device.
#[derive(Debug)]
pub struct WgpuDevice {}

/// Device memory of one tensor.
#[derive(Debug)]
pub(crate) struct WgpuStorage {
    pub device: Arc<WgpuDevice>,
}

impl WgpuDevice {
    pub fn describe(&self) -> String {
        "wgpu".into()
    }
    pub(crate) fn upload(self: &Arc<Self>, _bytes: &[u8]) -> Result<WgpuStorage> {
        Err(Error::DeviceUnavailable {
            backend: "wgpu",
            reason: "stub".into(),
        })
    }
    pub(crate) fn download(&self, _s: &WgpuStorage, _nbytes: usize) -> Result<Vec<u8>> {
        Err(Error::DeviceUnavailable {
            backend: "wgpu",
            reason: "stub".into(),
        })
    }
    pub fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
impl WgpuDevice {
    pub(crate) fn new(_opts: &crate::device::WgpuOptions) -> Result<Arc<Self>> {
        Err(Error::DeviceUnavailable {
            backend: "wgpu",
            reason: "stub".into(),
        })
    }
}
