//! Launchers of `kernels/wgsl/bce.wgsl` (fused BCE-with-logits of `ops::bce`).

use std::sync::Arc;

use super::gemm::{dtype_code, fits_index, flag, storage, to_u32};
use super::pipelines::{Binding, Kernel, Launch, BCE_WGSL};
use super::WgpuDevice;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::bce::BceArgs;
use crate::tensor::Tensor;

use Binding::{Read as R, ReadWrite as RW, Uniform as U};

const THREADS: usize = 256;

const PARTIAL: Kernel = Kernel {
    shader: BCE_WGSL,
    entry: "partial_main",
    bindings: &[U, R, R, R, RW, RW],
};
const FINISH: Kernel = Kernel {
    shader: BCE_WGSL,
    entry: "finish_main",
    bindings: &[U, R, RW],
};

pub(crate) fn bce(
    d: &Arc<WgpuDevice>,
    a: &BceArgs<'_>,
    dlogits: Option<&mut Tensor>,
    loss: &mut Tensor,
) -> Result<()> {
    const OP: &str = "bce_with_logits(wgpu)";
    let n = a.logits.numel();
    fits_index(OP, "logits", n)?;
    // The same n-only block count as the CUDA kernel (bce.cu), so both sum in the same tree.
    let nblocks = n.div_ceil(2).div_ceil(THREADS).clamp(1, THREADS);
    let dev = crate::Device::Wgpu(d.clone());
    let partial = Tensor::zeros(&[THREADS], DType::F32, &dev)?;
    let x_s = storage(OP, "logits", d, a.logits)?;
    let y_s = storage(OP, "targets", d, a.targets)?;
    let w_s = match a.weight {
        Some(t) => Some(storage(OP, "weight", d, t)?),
        None => None,
    };
    let g_dt = dlogits.as_deref().map_or(DType::F32, |t| t.dtype());
    let g_s = match dlogits.as_deref() {
        Some(t) => Some(storage(OP, "dlogits", d, t)?),
        None => None,
    };
    let p_s = storage(OP, "partial", d, &partial)?;
    let l_s = storage(OP, "loss", d, loss)?;
    let uniform = vec![
        to_u32(OP, "logits", "elements", n)?,
        nblocks as u32,
        a.scale.to_bits(),
    ];
    let launches = [
        Launch {
            kernel: PARTIAL,
            constants: vec![
                ("DT_X", dtype_code(a.logits.dtype())),
                ("DT_Y", dtype_code(a.targets.dtype())),
                (
                    "DT_W",
                    dtype_code(a.weight.map_or(DType::F32, |t| t.dtype())),
                ),
                ("DT_G", dtype_code(g_dt)),
                ("HAS_W", flag(a.weight.is_some())),
                ("HAS_G", flag(g_s.is_some())),
            ],
            uniform: uniform.clone(),
            buffers: vec![
                &x_s.buffer,
                &y_s.buffer,
                w_s.map_or(&d.dummy_ro, |s| &s.buffer),
                g_s.map_or(&d.dummy_rw, |s| &s.buffer),
                &p_s.buffer,
            ],
            grid: [nblocks as u64, 1, 1],
            workgroup: [THREADS as u32, 1, 1],
            workgroup_bytes: (THREADS * 4) as u64,
        },
        Launch {
            kernel: FINISH,
            constants: vec![],
            uniform,
            buffers: vec![&p_s.buffer, &l_s.buffer],
            grid: [1, 1, 1],
            workgroup: [THREADS as u32, 1, 1],
            workgroup_bytes: (THREADS * 4) as u64,
        },
    ];
    d.run(&launches)
}
