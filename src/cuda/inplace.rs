//! Launcher of `kernels/cuda/inplace.cu` (the in-place element-wise update of `ops::inplace`).

use std::sync::Arc;

use cudarc::driver::DeviceRepr;

use super::gemm::{dt_code, ptr, ptr_mut, storage, storage_mut, u32_of};
use super::launch::{self, blocks_for, Geometry};
use super::CudaDevice;
use crate::error::{Error, Result};
use crate::ops::inplace::Axpby;
use crate::tensor::Tensor;

/// Mirrors `struct AxpbyParams` in kernels/cuda/inplace.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AxpbyParams {
    y: u64,
    x: u64,
    alpha: f32,
    beta: f32,
    fill: f32,
    n: u32,
    y_dt: u32,
    x_dt: u32,
    read_y: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<AxpbyParams>() == 48);
// SAFETY: #[repr(C)], plain integers and floats, no implicit padding (2·8 + 8·4 = 48), same
// layout as the CUDA struct (size asserted on both sides).
unsafe impl DeviceRepr for AxpbyParams {}

/// Threads per block of the element-pair kernels (inplace.cu, and the same split in
/// optim.cu / bce.cu); each thread owns two consecutive elements.
pub(super) const PAIR_THREADS: u32 = 256;

/// Grid of one thread per element pair.
pub(super) fn pair_geometry(kernel: &str, n: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (
            blocks_for(kernel, "n", n.div_ceil(2), PAIR_THREADS as usize)?,
            1,
            1,
        ),
        block: (PAIR_THREADS, 1, 1),
        dyn_smem: 0,
    })
}

pub(crate) fn axpby(
    d: &Arc<CudaDevice>,
    x: Option<&Tensor>,
    k: &Axpby,
    y: &mut Tensor,
) -> Result<()> {
    const OP: &str = "axpby(cuda)";
    const KERNEL: &str = "axpby";
    let n = y.numel();
    if n == 0 {
        return Ok(());
    }
    if let Some(x) = x {
        if x.numel() != n {
            return Err(Error::shape(
                OP,
                "x",
                format!("{n} elements like self"),
                x.shape(),
            ));
        }
    }
    let mut params = AxpbyParams {
        alpha: k.alpha,
        beta: k.beta,
        fill: k.fill,
        n: u32_of(OP, "self", "element count", n)?,
        y_dt: dt_code(y.dtype()),
        x_dt: x.map_or(0, |t| dt_code(t.dtype())),
        read_y: k.read_y as u32,
        ..Default::default()
    };
    let geometry = pair_geometry(KERNEL, n)?;
    let func = d.function("inplace.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let _gx = match x {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "x", d, t)?, &stream);
            params.x = p;
            Some(g)
        }
        None => None,
    };
    let (py, _gy) = ptr_mut(storage_mut(OP, "self", d, y)?, &stream);
    params.y = py;
    // SAFETY: `params` mirrors AxpbyParams in inplace.cu (size asserted on both sides); y and x
    // hold exactly n ≤ 2^31 − 1 elements of their dtypes (checked above) and the kernel touches
    // only k < n. y is an exclusive borrow, so x cannot alias it. Both allocations outlive the
    // kernel in stream order.
    unsafe {
        launch::launch(
            KERNEL,
            &stream,
            &func,
            &d.limits,
            geometry,
            &params,
            d.sync_check,
        )
    }
}
