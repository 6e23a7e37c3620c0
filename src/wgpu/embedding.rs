//! Launchers of `kernels/wgsl/embedding.wgsl` (the embedding bags of `ops::embedding`).

use std::sync::Arc;

use super::gemm::{dtype_code, fits_index, storage, to_u32};
use super::pipelines::{Binding, Kernel, Launch, EMBEDDING_WGSL};
use super::WgpuDevice;
use crate::error::{Error, Result};
use crate::ops::embedding::{EmbPlan, RowUpdate, LANES};
use crate::tensor::Tensor;

use Binding::{Read as R, ReadWrite as RW, Uniform as U};

const FWD: Kernel = Kernel {
    shader: EMBEDDING_WGSL,
    entry: "emb_fwd_main",
    bindings: &[U, R, R, R, RW],
};
const GRAD: Kernel = Kernel {
    shader: EMBEDDING_WGSL,
    entry: "emb_grad_main",
    bindings: &[U, R, R, R, RW],
};
const UPDATE: Kernel = Kernel {
    shader: EMBEDDING_WGSL,
    entry: "emb_update_main",
    bindings: &[U, R, R, R, RW, RW],
};

const FWD_THREADS: u64 = 256;

fn words<'a>(op: &'static str, arg: &'static str, t: Option<&'a Tensor>) -> Result<&'a Tensor> {
    t.ok_or_else(|| Error::invalid(op, arg, "no device copy of the layout/batch words"))
}

pub(crate) fn forward(
    d: &Arc<WgpuDevice>,
    p: &EmbPlan<'_>,
    weights: &Tensor,
    out: &mut Tensor,
) -> Result<()> {
    const OP: &str = "embedding_forward(wgpu)";
    let bt = p.batch;
    let n_out = out.numel();
    fits_index(OP, "out", n_out)?;
    fits_index(OP, "tables", weights.numel())?;
    let meta = storage(OP, "tables", d, words(OP, "tables", p.meta)?)?;
    let batch = storage(
        OP,
        "batch",
        d,
        words(OP, "batch", bt.device_words.as_ref())?,
    )?;
    let w = storage(OP, "weights", d, weights)?;
    let o = storage(OP, "out", d, out)?;
    let launch = Launch {
        kernel: FWD,
        constants: vec![("DT_W", dtype_code(weights.dtype()))],
        uniform: vec![
            to_u32(OP, "batch", "batch size", bt.batch)?,
            to_u32(OP, "tables", "table count", p.layout.len())?,
            to_u32(OP, "tables", "total width", p.total_dim)?,
            to_u32(OP, "out", "element count", n_out)?,
            to_u32(OP, "tables", "layout words", p.col_at())?,
            to_u32(OP, "batch", "offset", bt.at.bag_off)?,
            to_u32(OP, "batch", "offset", bt.at.idx)?,
            to_u32(OP, "batch", "offset", bt.at.wgt)?,
        ],
        buffers: vec![&meta.buffer, &batch.buffer, &w.buffer, &o.buffer],
        grid: [(n_out.div_ceil(2) as u64).div_ceil(FWD_THREADS), 1, 1],
        workgroup: [FWD_THREADS as u32, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}

fn row_uniform(
    op: &'static str,
    p: &EmbPlan<'_>,
    mode: u32,
    lr: f32,
    eps: f32,
    wd: f32,
) -> Result<Vec<u32>> {
    let bt = p.batch;
    Ok(vec![
        to_u32(op, "tables", "total width", p.total_dim)?,
        to_u32(op, "batch", "touched rows", bt.segments)?,
        to_u32(op, "batch", "offset", bt.at.seg_table)?,
        to_u32(op, "batch", "offset", bt.at.seg_row)?,
        to_u32(op, "batch", "offset", bt.at.seg_off)?,
        to_u32(op, "batch", "offset", bt.at.occ_bag)?,
        to_u32(op, "batch", "offset", bt.at.occ_wgt)?,
        mode,
        u32::from(wd != 0.0),
        lr.to_bits(),
        eps.to_bits(),
        wd.to_bits(),
    ])
}

pub(crate) fn grad(
    d: &Arc<WgpuDevice>,
    p: &EmbPlan<'_>,
    dy: &Tensor,
    grad: &mut Tensor,
) -> Result<()> {
    const OP: &str = "embedding_grad(wgpu)";
    fits_index(OP, "dy", dy.numel())?;
    fits_index(OP, "grad", grad.numel())?;
    let meta = storage(OP, "tables", d, words(OP, "tables", p.meta)?)?;
    let batch = storage(
        OP,
        "batch",
        d,
        words(OP, "batch", p.batch.device_words.as_ref())?,
    )?;
    let dy_s = storage(OP, "dy", d, dy)?;
    let g = storage(OP, "grad", d, grad)?;
    let launch = Launch {
        kernel: GRAD,
        constants: vec![("DT_DY", dtype_code(dy.dtype()))],
        uniform: row_uniform(OP, p, 0, 0.0, 0.0, 0.0)?,
        buffers: vec![&meta.buffer, &batch.buffer, &dy_s.buffer, &g.buffer],
        grid: [p.batch.segments as u64, 1, 1],
        workgroup: [LANES as u32, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}

pub(crate) fn update(
    d: &Arc<WgpuDevice>,
    p: &EmbPlan<'_>,
    upd: RowUpdate,
    dy: &Tensor,
    weights: &mut Tensor,
    state: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "embedding_update(wgpu)";
    fits_index(OP, "dy", dy.numel())?;
    fits_index(OP, "weights", weights.numel())?;
    let (mode, lr, eps, wd) = match upd {
        RowUpdate::Sgd { lr, weight_decay } => (0, lr, 0.0, weight_decay),
        RowUpdate::RowwiseAdagrad {
            lr,
            eps,
            weight_decay,
        } => (1, lr, eps, weight_decay),
    };
    if mode == 1 && state.is_none() {
        return Err(Error::invalid(
            OP,
            "state",
            "row-wise Adagrad needs its state",
        ));
    }
    let meta = storage(OP, "tables", d, words(OP, "tables", p.meta)?)?;
    let batch = storage(
        OP,
        "batch",
        d,
        words(OP, "batch", p.batch.device_words.as_ref())?,
    )?;
    let dy_s = storage(OP, "dy", d, dy)?;
    let w = storage(OP, "weights", d, weights)?;
    // SGD binds a small scratch buffer for the state it never touches (allocation only).
    let dummy;
    let st = match state.as_deref() {
        Some(s) => &storage(OP, "state", d, s)?.buffer,
        None => {
            dummy = d.alloc_zeros(16)?;
            &dummy.buffer
        }
    };
    let launch = Launch {
        kernel: UPDATE,
        constants: vec![
            ("DT_W", dtype_code(weights.dtype())),
            ("DT_DY", dtype_code(dy.dtype())),
        ],
        uniform: row_uniform(OP, p, mode, lr, eps, wd)?,
        buffers: vec![&meta.buffer, &batch.buffer, &dy_s.buffer, &w.buffer, st],
        grid: [p.batch.segments as u64, 1, 1],
        workgroup: [LANES as u32, 1, 1],
        workgroup_bytes: (LANES as u64 + 1) * 4,
    };
    d.run(&[launch])
}
