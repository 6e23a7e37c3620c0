//! Launchers of `kernels/cuda/glue.cu` (the strided box copy and the middle-axis sum of
//! `ops::glue`).

use std::sync::Arc;

use cudarc::driver::DeviceRepr;

use super::gemm::{dt_code, ptr, ptr_mut, storage, storage_mut, u32_of};
use super::inplace::pair_geometry;
use super::launch::{self, blocks_for, Geometry};
use super::CudaDevice;
use crate::error::Result;
use crate::ops::glue::{Copy3, SumMid};
use crate::tensor::Tensor;

/// Mirrors `struct Copy3Params` in kernels/cuda/glue.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Copy3Params {
    src: u64,
    dst: u64,
    mid: u32,
    inner: u32,
    rows: u32,
    ppr: u32,
    s_off: u32,
    s_outer: u32,
    s_mid: u32,
    d_off: u32,
    d_outer: u32,
    d_mid: u32,
    elem_bytes: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<Copy3Params>() == 64);
// SAFETY: #[repr(C)], plain integers, no implicit padding (2·8 + 12·4 = 64), the layout of the
// CUDA struct (size asserted on both sides).
unsafe impl DeviceRepr for Copy3Params {}

/// Mirrors `struct SumMidParams` in kernels/cuda/glue.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SumMidParams {
    x: u64,
    out: u64,
    mid: u32,
    inner: u32,
    n_out: u32,
    x_dt: u32,
    out_dt: u32,
    pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<SumMidParams>() == 48);
// SAFETY: as for Copy3Params (2·8 + 8·4 = 48, no implicit padding).
unsafe impl DeviceRepr for SumMidParams {}

const THREADS: u32 = 256;

pub(crate) fn copy3(d: &Arc<CudaDevice>, p: &Copy3, src: &Tensor, dst: &mut Tensor) -> Result<()> {
    const OP: &str = "copy3(cuda)";
    const KERNEL: &str = "copy3";
    let rows = p.rows();
    let ppr = p.inner / 2 + 1;
    // Every index the kernel forms is below the tensors' sizes (Copy3::check ran in the op),
    // so 32 bits suffice when the sizes and the thread count do.
    u32_of(OP, "src", "element count", src.numel())?;
    u32_of(OP, "dst", "element count", dst.numel())?;
    let threads = rows.saturating_mul(ppr);
    let mut params = Copy3Params {
        mid: u32_of(OP, "src", "mid extent", p.mid)?,
        inner: u32_of(OP, "src", "row length", p.inner)?,
        rows: u32_of(OP, "src", "row count", rows)?,
        ppr: u32_of(OP, "src", "pairs per row", ppr)?,
        s_off: u32_of(OP, "src", "offset", p.src.offset)?,
        s_outer: u32_of(OP, "src", "outer stride", p.src.s_outer)?,
        s_mid: u32_of(OP, "src", "mid stride", p.src.s_mid)?,
        d_off: u32_of(OP, "dst", "offset", p.dst.offset)?,
        d_outer: u32_of(OP, "dst", "outer stride", p.dst.s_outer)?,
        d_mid: u32_of(OP, "dst", "mid stride", p.dst.s_mid)?,
        elem_bytes: dst.dtype().size() as u32,
        ..Default::default()
    };
    u32_of(OP, "dst", "thread count", threads)?;
    let geometry = Geometry {
        grid: (blocks_for(KERNEL, "rows", threads, THREADS as usize)?, 1, 1),
        block: (THREADS, 1, 1),
        dyn_smem: 0,
    };
    let func = d.function("glue.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let (ps, _gs) = ptr(storage(OP, "src", d, src)?, &stream);
    let (pd, _gd) = ptr_mut(storage_mut(OP, "dst", d, dst)?, &stream);
    params.src = ps;
    params.dst = pd;
    // SAFETY: `params` mirrors Copy3Params in glue.cu (size asserted on both sides). The op
    // checked that both boxes lie inside their tensors and that the destination rows are
    // disjoint, so every access is in bounds and each destination element has one writer; all
    // indices fit 32 bits (checked above). dst is an exclusive borrow (no aliasing with src);
    // both allocations outlive the kernel in stream order.
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

pub(crate) fn sum_mid(d: &Arc<CudaDevice>, p: &SumMid, x: &Tensor, out: &mut Tensor) -> Result<()> {
    const OP: &str = "sum_mid(cuda)";
    const KERNEL: &str = "sum_mid";
    let n_out = p.outer * p.inner;
    u32_of(OP, "x", "element count", x.numel())?;
    let mut params = SumMidParams {
        mid: u32_of(OP, "x", "reduced extent", p.mid)?,
        inner: u32_of(OP, "x", "inner extent", p.inner)?,
        n_out: u32_of(OP, "out", "element count", n_out)?,
        x_dt: dt_code(x.dtype()),
        out_dt: dt_code(out.dtype()),
        ..Default::default()
    };
    let geometry = pair_geometry(KERNEL, n_out)?;
    let func = d.function("glue.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let (px, _gx) = ptr(storage(OP, "x", d, x)?, &stream);
    let (po, _go) = ptr_mut(storage_mut(OP, "out", d, out)?, &stream);
    params.x = px;
    params.out = po;
    // SAFETY: `params` mirrors SumMidParams in glue.cu (size asserted on both sides); x holds
    // outer·mid·inner < 2^31 elements and out outer·inner (shapes built by the op), the kernel
    // reads i < x.numel() and writes k < n_out once each; out is an exclusive borrow; both
    // allocations outlive the kernel in stream order.
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
