//! LayerNorm on wgpu: not implemented yet (the op reports `Error::Unsupported`).

use std::sync::Arc;

use super::WgpuDevice;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn missing() -> Error {
    Error::Unsupported {
        op: "layernorm",
        backend: "wgpu",
        what: "the LayerNorm kernels are not written for this backend yet".into(),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    _d: &Arc<WgpuDevice>,
    _x: &Tensor,
    _gamma: &Tensor,
    _beta: &Tensor,
    _tokens: usize,
    _eps: f32,
    _y: &mut Tensor,
    _mean: &mut Tensor,
    _rstd: &mut Tensor,
) -> Result<()> {
    Err(missing())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    _d: &Arc<WgpuDevice>,
    _x: &Tensor,
    _gamma: &Tensor,
    _mean: &Tensor,
    _rstd: &Tensor,
    _dy: &Tensor,
    _tokens: usize,
    _dx: &mut Tensor,
    _dgamma: &mut Tensor,
    _dbeta: &mut Tensor,
) -> Result<()> {
    Err(missing())
}
