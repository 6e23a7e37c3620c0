//! Launchers of `kernels/wgsl/glue.wgsl` (the strided box copy and the middle-axis sum of
//! `ops::glue`).

use std::sync::Arc;

use super::gemm::{dtype_code, fits_index, flag, storage, to_u32, EW_THREADS};
use super::inplace::pair_grid;
use super::pipelines::{Binding, Kernel, Launch, GLUE_WGSL};
use super::WgpuDevice;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::glue::{Copy3, SumMid};
use crate::tensor::Tensor;

const COPY3: Kernel = Kernel {
    shader: GLUE_WGSL,
    entry: "copy3_main",
    bindings: &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
};

const SUM_MID: Kernel = Kernel {
    shader: GLUE_WGSL,
    entry: "sum_mid_main",
    bindings: &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
};

pub(crate) fn copy3(d: &Arc<WgpuDevice>, p: &Copy3, src: &Tensor, dst: &mut Tensor) -> Result<()> {
    const OP: &str = "copy3(wgpu)";
    // Copy3::check (in the op) put both boxes inside their tensors: indices fit 32 bits when
    // the sizes and the thread count do.
    fits_index(OP, "src", src.numel())?;
    fits_index(OP, "dst", dst.numel())?;
    let rows = p.rows();
    let ppr = p.inner / 2 + 1;
    let threads = rows.saturating_mul(ppr);
    fits_index(OP, "dst", threads)?;
    let src_s = storage(OP, "src", d, src)?;
    let dst_s = storage(OP, "dst", d, dst)?;
    let launch = Launch {
        kernel: COPY3,
        constants: vec![("WIDE", flag(dst.dtype() == DType::F32))],
        uniform: vec![
            to_u32(OP, "src", "mid extent", p.mid)?,
            to_u32(OP, "src", "row length", p.inner)?,
            to_u32(OP, "src", "row count", rows)?,
            to_u32(OP, "src", "pairs per row", ppr)?,
            to_u32(OP, "src", "offset", p.src.offset)?,
            to_u32(OP, "src", "outer stride", p.src.s_outer)?,
            to_u32(OP, "src", "mid stride", p.src.s_mid)?,
            to_u32(OP, "dst", "offset", p.dst.offset)?,
            to_u32(OP, "dst", "outer stride", p.dst.s_outer)?,
            to_u32(OP, "dst", "mid stride", p.dst.s_mid)?,
            0,
            0,
        ],
        buffers: vec![&src_s.buffer, &dst_s.buffer],
        grid: [(threads as u64).div_ceil(u64::from(EW_THREADS)), 1, 1],
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}

pub(crate) fn sum_mid(d: &Arc<WgpuDevice>, p: &SumMid, x: &Tensor, out: &mut Tensor) -> Result<()> {
    const OP: &str = "sum_mid(wgpu)";
    fits_index(OP, "x", x.numel())?;
    let n_out = p.outer * p.inner;
    let x_s = storage(OP, "x", d, x)?;
    let out_s = storage(OP, "out", d, out)?;
    let launch = Launch {
        kernel: SUM_MID,
        constants: vec![
            ("DT_X", dtype_code(x.dtype())),
            ("DT_OUT", dtype_code(out.dtype())),
        ],
        uniform: vec![
            to_u32(OP, "x", "reduced extent", p.mid)?,
            to_u32(OP, "x", "inner extent", p.inner)?,
            to_u32(OP, "out", "element count", n_out)?,
            to_u32(OP, "out", "pairs", n_out.div_ceil(2))?,
        ],
        buffers: vec![&x_s.buffer, &out_s.buffer],
        grid: pair_grid(n_out),
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}
