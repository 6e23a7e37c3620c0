//! Launchers of `kernels/cuda/embedding.cu` (the embedding bags of `ops::embedding`).

use std::sync::Arc;

use cudarc::driver::DeviceRepr;

use super::gemm::{dt_code, ptr, ptr_mut, storage, storage_mut, u32_of};
use super::launch::{self, blocks_for, Geometry};
use super::CudaDevice;
use crate::error::{Error, Result};
use crate::ops::embedding::{EmbPlan, RowUpdate, LANES};
use crate::tensor::Tensor;

/// Mirrors `struct EmbFwdParams` in kernels/cuda/embedding.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EmbFwdParams {
    meta: u64,
    batch: u64,
    w: u64,
    out: u64,
    b: u32,
    n_tables: u32,
    total_dim: u32,
    n_out: u32,
    col_at: u32,
    bag_at: u32,
    idx_at: u32,
    wgt_at: u32,
    w_dt: u32,
    pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<EmbFwdParams>() == 80);
// SAFETY: #[repr(C)], plain integers, no implicit padding (4·8 + 12·4 = 80), the layout of the
// CUDA struct (size asserted on both sides).
unsafe impl DeviceRepr for EmbFwdParams {}

/// Mirrors `struct EmbRowParams` in kernels/cuda/embedding.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EmbRowParams {
    meta: u64,
    batch: u64,
    dy: u64,
    w: u64,
    state: u64,
    total_dim: u32,
    segments: u32,
    seg_table_at: u32,
    seg_row_at: u32,
    seg_off_at: u32,
    occ_bag_at: u32,
    occ_wgt_at: u32,
    dy_dt: u32,
    w_dt: u32,
    mode: u32,
    decay: u32,
    pad: u32,
    lr: f32,
    eps: f32,
    wd: f32,
    pad2: f32,
}
const _: () = assert!(std::mem::size_of::<EmbRowParams>() == 104);
// SAFETY: as for EmbFwdParams (5·8 + 12·4 + 4·4 = 104, no implicit padding).
unsafe impl DeviceRepr for EmbRowParams {}

const FWD_THREADS: u32 = 256;

fn words<'a>(op: &'static str, arg: &'static str, t: Option<&'a Tensor>) -> Result<&'a Tensor> {
    t.ok_or_else(|| Error::invalid(op, arg, "no device copy of the layout/batch words"))
}

pub(crate) fn forward(
    d: &Arc<CudaDevice>,
    p: &EmbPlan<'_>,
    weights: &Tensor,
    out: &mut Tensor,
) -> Result<()> {
    const OP: &str = "embedding_forward(cuda)";
    const KERNEL: &str = "emb_fwd";
    let bt = p.batch;
    let n_out = out.numel();
    let mut params = EmbFwdParams {
        b: u32_of(OP, "batch", "batch size", bt.batch)?,
        n_tables: u32_of(OP, "tables", "table count", p.layout.len())?,
        total_dim: u32_of(OP, "tables", "total width", p.total_dim)?,
        n_out: u32_of(OP, "out", "element count", n_out)?,
        col_at: u32_of(OP, "tables", "layout words", p.col_at())?,
        bag_at: u32_of(OP, "batch", "offset", bt.at.bag_off)?,
        idx_at: u32_of(OP, "batch", "offset", bt.at.idx)?,
        wgt_at: u32_of(OP, "batch", "offset", bt.at.wgt)?,
        w_dt: dt_code(weights.dtype()),
        ..Default::default()
    };
    u32_of(OP, "tables", "element count", weights.numel())?;
    let geometry = Geometry {
        grid: (
            blocks_for(KERNEL, "outputs", n_out.div_ceil(2), FWD_THREADS as usize)?,
            1,
            1,
        ),
        block: (FWD_THREADS, 1, 1),
        dyn_smem: 0,
    };
    let func = d.function("embedding.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let meta = words(OP, "tables", p.meta)?;
    let batch = words(OP, "batch", bt.device_words.as_ref())?;
    let (pm, _gm) = ptr(storage(OP, "tables", d, meta)?, &stream);
    let (pb, _gb) = ptr(storage(OP, "batch", d, batch)?, &stream);
    let (pw, _gw) = ptr(storage(OP, "weights", d, weights)?, &stream);
    let (po, _go) = ptr_mut(storage_mut(OP, "out", d, out)?, &stream);
    params.meta = pm;
    params.batch = pb;
    params.w = pw;
    params.out = po;
    // SAFETY: `params` mirrors EmbFwdParams (size asserted on both sides). The op built the
    // layout and batch words: every table entry, column map entry, bag offset and row index
    // lies inside the meta / batch buffers and every row element inside `weights`
    // (EmbeddingBags::batch checked each index against its table), all below 2^31; the kernel
    // writes out[k] for k < n_out = out.numel() only, one thread per element. out is an
    // exclusive borrow distinct from the inputs; all allocations outlive the kernel in stream
    // order.
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

fn row_params(op: &'static str, p: &EmbPlan<'_>, dy: &Tensor) -> Result<EmbRowParams> {
    let bt = p.batch;
    Ok(EmbRowParams {
        total_dim: u32_of(op, "tables", "total width", p.total_dim)?,
        segments: u32_of(op, "batch", "touched rows", bt.segments)?,
        seg_table_at: u32_of(op, "batch", "offset", bt.at.seg_table)?,
        seg_row_at: u32_of(op, "batch", "offset", bt.at.seg_row)?,
        seg_off_at: u32_of(op, "batch", "offset", bt.at.seg_off)?,
        occ_bag_at: u32_of(op, "batch", "offset", bt.at.occ_bag)?,
        occ_wgt_at: u32_of(op, "batch", "offset", bt.at.occ_wgt)?,
        dy_dt: dt_code(dy.dtype()),
        ..Default::default()
    })
}

fn row_geometry(kernel: &str, segments: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (blocks_for(kernel, "touched rows", segments, 1)?, 1, 1),
        block: (LANES as u32, 1, 1),
        dyn_smem: 0,
    })
}

pub(crate) fn grad(
    d: &Arc<CudaDevice>,
    p: &EmbPlan<'_>,
    dy: &Tensor,
    grad: &mut Tensor,
) -> Result<()> {
    const OP: &str = "embedding_grad(cuda)";
    const KERNEL: &str = "emb_grad";
    let mut params = row_params(OP, p, dy)?;
    u32_of(OP, "dy", "element count", dy.numel())?;
    u32_of(OP, "grad", "element count", grad.numel())?;
    let geometry = row_geometry(KERNEL, p.batch.segments)?;
    let func = d.function("embedding.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let meta = words(OP, "tables", p.meta)?;
    let batch = words(OP, "batch", p.batch.device_words.as_ref())?;
    let (pm, _gm) = ptr(storage(OP, "tables", d, meta)?, &stream);
    let (pb, _gb) = ptr(storage(OP, "batch", d, batch)?, &stream);
    let (pd, _gd) = ptr(storage(OP, "dy", d, dy)?, &stream);
    let (pg, _gg) = ptr_mut(storage_mut(OP, "grad", d, grad)?, &stream);
    params.meta = pm;
    params.batch = pb;
    params.dy = pd;
    params.w = pg;
    // SAFETY: `params` mirrors EmbRowParams (size asserted on both sides). Segment entries,
    // occurrence samples and columns come from the op's validated batch: dy indices are
    // sample·total_dim + column < dy.numel() (its shape was checked to be [B, total_dim]) and
    // grad indices are rows of the layout < grad.numel() (the flat table size). Each segment is
    // a distinct row, written by one block only. grad is an exclusive f32 borrow distinct from
    // the inputs; all allocations outlive the kernel in stream order.
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

pub(crate) fn update(
    d: &Arc<CudaDevice>,
    p: &EmbPlan<'_>,
    upd: RowUpdate,
    dy: &Tensor,
    weights: &mut Tensor,
    state: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "embedding_update(cuda)";
    const KERNEL: &str = "emb_update";
    let mut params = row_params(OP, p, dy)?;
    u32_of(OP, "dy", "element count", dy.numel())?;
    u32_of(OP, "weights", "element count", weights.numel())?;
    params.w_dt = dt_code(weights.dtype());
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
    params.mode = mode;
    params.lr = lr;
    params.eps = eps;
    params.wd = wd;
    params.decay = u32::from(wd != 0.0);
    let geometry = row_geometry(KERNEL, p.batch.segments)?;
    let func = d.function("embedding.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let meta = words(OP, "tables", p.meta)?;
    let batch = words(OP, "batch", p.batch.device_words.as_ref())?;
    let (pm, _gm) = ptr(storage(OP, "tables", d, meta)?, &stream);
    let (pb, _gb) = ptr(storage(OP, "batch", d, batch)?, &stream);
    let (pd, _gd) = ptr(storage(OP, "dy", d, dy)?, &stream);
    let (pw, _gw) = ptr_mut(storage_mut(OP, "weights", d, weights)?, &stream);
    params.meta = pm;
    params.batch = pb;
    params.dy = pd;
    params.w = pw;
    let _gs = match state {
        Some(s) => {
            let (ps, g) = ptr_mut(storage_mut(OP, "state", d, s)?, &stream);
            params.state = ps;
            Some(g)
        }
        None => None,
    };
    // SAFETY: as for `grad`: every dy / weight index comes from the validated batch and layout
    // and lies inside its tensor; state indices are rows_off + row < total_rows (the op checked
    // state's shape) and are only touched in mode 1, where state is present (checked above).
    // Each segment is a distinct row, read and written by one block only; within the block each
    // element has one owning thread. weights and state are exclusive borrows distinct from the
    // inputs; all allocations outlive the kernel in stream order.
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
