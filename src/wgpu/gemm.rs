//! STUB: wgpu GEMM core launchers.
use super::WgpuDevice;
use crate::error::{Error, Result};
use crate::ops::gemm::{Activation, Gemm};
use crate::tensor::Tensor;
use std::sync::Arc;

fn stub() -> Error {
    Error::Unsupported {
        op: "gemm",
        backend: "wgpu",
        what: "stub".into(),
    }
}
pub(crate) fn gemm(
    _d: &Arc<WgpuDevice>,
    _p: &Gemm<'_>,
    _c: &mut Tensor,
    _pre: Option<&mut Tensor>,
) -> Result<()> {
    Err(stub())
}
pub(crate) fn act_backward(
    _d: &Arc<WgpuDevice>,
    _dy: &Tensor,
    _pre: Option<&Tensor>,
    _act: Activation,
    _dz: &mut Tensor,
) -> Result<()> {
    Err(stub())
}
pub(crate) fn col_sum(
    _d: &Arc<WgpuDevice>,
    _x: &Tensor,
    _rows: usize,
    _cols: usize,
    _out: &mut Tensor,
    _accumulate: bool,
) -> Result<()> {
    Err(stub())
}
pub(crate) fn gate_backward(
    _d: &Arc<super::WgpuDevice>,
    _g: &Tensor,
    _c0: &Tensor,
    _pre: &Tensor,
    _gated: bool,
    _delta: &mut Tensor,
    _dx0: &mut Tensor,
) -> Result<()> {
    Err(Error::Unsupported {
        op: "gate_backward",
        backend: "wgpu",
        what: "not yet implemented".into(),
    })
}
pub(crate) fn add(
    _d: &Arc<super::WgpuDevice>,
    _a: &Tensor,
    _b: Option<&Tensor>,
    _out: &mut Tensor,
) -> Result<()> {
    Err(Error::Unsupported {
        op: "add",
        backend: "wgpu",
        what: "not yet implemented".into(),
    })
}
