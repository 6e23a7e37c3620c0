//! The attention core on cuda: not implemented yet (the op reports `Error::Unsupported`).

use std::sync::Arc;

use super::CudaDevice;
use crate::error::{Error, Result};
use crate::ops::attention::AttnArgs;
use crate::tensor::Tensor;

fn missing() -> Error {
    Error::Unsupported {
        op: "attention",
        backend: "cuda",
        what: "the attention-core kernels are not written for this backend yet".into(),
    }
}

pub(crate) fn forward(
    _d: &Arc<CudaDevice>,
    _a: &AttnArgs<'_>,
    _o: &mut Tensor,
    _lse: &mut Tensor,
) -> Result<()> {
    Err(missing())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    _d: &Arc<CudaDevice>,
    _a: &AttnArgs<'_>,
    _o: &Tensor,
    _lse: &Tensor,
    _d_o: &Tensor,
    _dq: &mut Tensor,
    _dk: &mut Tensor,
    _dv: &mut Tensor,
    _dbias: Option<&mut Tensor>,
) -> Result<()> {
    Err(missing())
}
