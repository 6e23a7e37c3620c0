//! The fused in-batch softmax on wgpu: not implemented yet (the op reports `Error::Unsupported`).

use std::sync::Arc;

use super::WgpuDevice;
use crate::error::{Error, Result};
use crate::ops::inbatch_softmax::SoftmaxArgs;
use crate::tensor::Tensor;

fn missing() -> Error {
    Error::Unsupported {
        op: "inbatch_softmax",
        backend: "wgpu",
        what: "the fused in-batch softmax kernels are not written for this backend yet".into(),
    }
}

pub(crate) fn forward(_d: &Arc<WgpuDevice>, _a: &SoftmaxArgs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
    Err(missing())
}

pub(crate) fn grad_queries(
    _d: &Arc<WgpuDevice>,
    _a: &SoftmaxArgs<'_>,
    _coef: &[f32],
    _lse: &[f32],
    _dq: &mut Tensor,
) -> Result<f32> {
    Err(missing())
}

pub(crate) fn grad_columns(
    _d: &Arc<WgpuDevice>,
    _a: &SoftmaxArgs<'_>,
    _coef: &[f32],
    _lse: &[f32],
    _range: std::ops::Range<usize>,
    _dc: &mut Tensor,
) -> Result<()> {
    Err(missing())
}
