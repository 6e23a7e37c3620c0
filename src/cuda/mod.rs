//! STUB: the cuda backend (to be implemented).
use crate::error::{Error, Result};
use std::sync::Arc;

pub(crate) mod gemm;

/// A cuda device.
#[derive(Debug)]
pub struct CudaDevice {}

/// Device memory of one tensor.
#[derive(Debug)]
pub(crate) struct CudaStorage {
    pub device: Arc<CudaDevice>,
}

impl CudaDevice {
    pub fn describe(&self) -> String {
        "cuda".into()
    }
    pub(crate) fn upload(self: &Arc<Self>, _bytes: &[u8]) -> Result<CudaStorage> {
        Err(Error::DeviceUnavailable {
            backend: "cuda",
            reason: "stub".into(),
        })
    }
    pub(crate) fn download(&self, _s: &CudaStorage, _nbytes: usize) -> Result<Vec<u8>> {
        Err(Error::DeviceUnavailable {
            backend: "cuda",
            reason: "stub".into(),
        })
    }
    pub fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
impl CudaDevice {
    pub(crate) fn new(_ordinal: usize) -> Result<Arc<Self>> {
        Err(Error::DeviceUnavailable {
            backend: "cuda",
            reason: "stub".into(),
        })
    }
}
