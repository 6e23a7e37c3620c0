//! Launchers of `kernels/cuda/bce.cu` (fused BCE-with-logits of `ops::bce`).

use std::sync::Arc;

use cudarc::driver::DeviceRepr;

use super::gemm::{dt_code, ptr, ptr_mut, storage, storage_mut, u32_of};
use super::launch::{self, Geometry};
use super::CudaDevice;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::bce::BceArgs;
use crate::tensor::Tensor;

/// Threads per block and the most partial sums (bce.cu's RF_BCE_THREADS).
const THREADS: usize = 256;

/// Mirrors `struct BceParams` in kernels/cuda/bce.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BceParams {
    x: u64,
    y: u64,
    w: u64,
    g: u64,
    partial: u64,
    loss: u64,
    n: u32,
    nblocks: u32,
    x_dt: u32,
    y_dt: u32,
    w_dt: u32,
    g_dt: u32,
    scale: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<BceParams>() == 80);
// SAFETY: #[repr(C)], plain integers and one float, no implicit padding (6·8 + 8·4 = 80), same
// layout as the CUDA struct (size asserted on both sides).
unsafe impl DeviceRepr for BceParams {}

/// Blocks of the partial pass: depends only on n (so the summation tree, and the result, do
/// not depend on the device).
pub(super) fn partial_blocks(n: usize) -> usize {
    n.div_ceil(2).div_ceil(THREADS).clamp(1, THREADS)
}

pub(crate) fn bce(
    d: &Arc<CudaDevice>,
    a: &BceArgs<'_>,
    dlogits: Option<&mut Tensor>,
    loss: &mut Tensor,
) -> Result<()> {
    const OP: &str = "bce_with_logits(cuda)";
    let n = a.logits.numel();
    let nblocks = partial_blocks(n);
    let dev = crate::Device::Cuda(d.clone());
    let mut partial = Tensor::zeros(&[THREADS], DType::F32, &dev)?;
    let mut params = BceParams {
        n: u32_of(OP, "logits", "element count", n)?,
        nblocks: nblocks as u32,
        x_dt: dt_code(a.logits.dtype()),
        y_dt: dt_code(a.targets.dtype()),
        w_dt: a.weight.map_or(0, |t| dt_code(t.dtype())),
        g_dt: dlogits.as_deref().map_or(0, |t| dt_code(t.dtype())),
        scale: a.scale,
        ..Default::default()
    };
    let partial_fn = d.function("bce.cu", &[], "bce_partial")?;
    let finish_fn = d.function("bce.cu", &[], "bce_finish")?;
    let stream = d.stream.clone();
    let (px, _gx) = ptr(storage(OP, "logits", d, a.logits)?, &stream);
    let (py, _gy) = ptr(storage(OP, "targets", d, a.targets)?, &stream);
    params.x = px;
    params.y = py;
    let _gw = match a.weight {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "weight", d, t)?, &stream);
            params.w = p;
            Some(g)
        }
        None => None,
    };
    let _gg = match dlogits {
        Some(t) => {
            let (p, g) = ptr_mut(storage_mut(OP, "dlogits", d, t)?, &stream);
            params.g = p;
            Some(g)
        }
        None => None,
    };
    let (pp, _gp) = ptr_mut(storage_mut(OP, "partial", d, &mut partial)?, &stream);
    params.partial = pp;
    let (pl, _gl) = ptr_mut(storage_mut(OP, "loss", d, loss)?, &stream);
    params.loss = pl;
    let geometry = |blocks: usize| Geometry {
        grid: (blocks as u32, 1, 1),
        block: (THREADS as u32, 1, 1),
        dyn_smem: 0,
    };
    // SAFETY: `params` mirrors BceParams in bce.cu (size asserted on both sides). logits,
    // targets, weight and dlogits hold exactly n ≤ 2^31 − 1 elements (checked by the op and
    // u32_of) and the kernel indexes only i < n; partial holds 256 ≥ nblocks f32 and loss one.
    // dlogits, partial and loss are exclusive borrows, distinct from the inputs. Every
    // allocation outlives both kernels in stream order (partial is freed asynchronously on the
    // same stream after them).
    unsafe {
        launch::launch(
            "bce_partial",
            &stream,
            &partial_fn,
            &d.limits,
            geometry(nblocks),
            &params,
            d.sync_check,
        )?;
        launch::launch(
            "bce_finish",
            &stream,
            &finish_fn,
            &d.limits,
            geometry(1),
            &params,
            d.sync_check,
        )
    }
}
