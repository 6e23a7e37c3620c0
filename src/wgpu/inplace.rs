//! Launcher of `kernels/wgsl/inplace.wgsl` (the in-place element-wise update of
//! `ops::inplace`).

use std::sync::Arc;

use super::gemm::{dtype_code, fits_index, flag, storage, to_u32, EW_THREADS};
use super::pipelines::{Binding, Kernel, Launch, INPLACE_WGSL};
use super::WgpuDevice;
use crate::error::{Error, Result};
use crate::ops::inplace::Axpby;
use crate::tensor::Tensor;

const AXPBY: Kernel = Kernel {
    shader: INPLACE_WGSL,
    entry: "axpby_main",
    bindings: &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
};

/// Grid of one thread per element pair (the split of inplace.wgsl, optim.wgsl, bce.wgsl).
pub(super) fn pair_grid(n: usize) -> [u64; 3] {
    [(n.div_ceil(2) as u64).div_ceil(u64::from(EW_THREADS)), 1, 1]
}

pub(crate) fn axpby(
    d: &Arc<WgpuDevice>,
    x: Option<&Tensor>,
    k: &Axpby,
    y: &mut Tensor,
) -> Result<()> {
    const OP: &str = "axpby(wgpu)";
    let n = y.numel();
    fits_index(OP, "self", n)?;
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
    let x_s = match x {
        Some(t) => Some(storage(OP, "x", d, t)?),
        None => None,
    };
    let y_s = storage(OP, "self", d, y)?;
    let launch = Launch {
        kernel: AXPBY,
        constants: vec![
            ("DT_Y", dtype_code(y.dtype())),
            ("DT_X", dtype_code(x.map_or(y.dtype(), |t| t.dtype()))),
            ("READ_Y", flag(k.read_y)),
            ("HAS_X", flag(x.is_some())),
        ],
        uniform: vec![
            to_u32(OP, "self", "elements", n)?,
            to_u32(OP, "self", "pairs", n.div_ceil(2))?,
            k.alpha.to_bits(),
            k.beta.to_bits(),
            k.fill.to_bits(),
        ],
        buffers: vec![x_s.map_or(&d.dummy_ro, |s| &s.buffer), &y_s.buffer],
        grid: pair_grid(n),
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}
