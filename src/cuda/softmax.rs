//! Launchers for the fused in-batch softmax (`kernels/cuda/inbatch_softmax.cu`, whose header
//! has the math, layouts and launch geometry). Per call: the O(B + N) metadata is uploaded,
//! the clamped norms are computed on the device when L2 normalisation is on, then
//!
//! - forward: `ibs_forward` (row tiles × column splits, partial (max, sum) pairs) and
//!   `ibs_combine` (the splits in order) → LSE and the target logit, downloaded (O(B));
//! - query gradients: `ibs_grad_rows` (row tiles × column splits) and `ibs_finish_rows`
//!   (splits in order, κ, L2 backward) → `dq`, and the per-row ∂L/∂κ summed on the host in row
//!   order;
//! - candidate gradients: `ibs_grad_cols` (column tiles of the range × row splits) and
//!   `ibs_finish_cols` → `dc`.
//!
//! The split count is a function of the shape only, so every bit of every result is the same
//! on every run (and every GPU): no float atomics anywhere.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use super::gemm::{dt_code, storage, storage_mut};
use super::launch::{self, blocks_for, Geometry};
use super::{backend_err, CudaDevice};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::gemm::MAX_INDEX_32;
use crate::ops::inbatch_softmax::SoftmaxArgs;
use crate::tensor::Tensor;

const FILE: &str = "inbatch_softmax.cu";
/// Tile width of both axes (`IBS_T`).
const TILE: usize = 64;
/// Blocks a launch aims for when the looped axis is split (a few per SM on an H200's 132),
/// a constant so that the split, and with it the summation order, depends on the shape only.
const TARGET_BLOCKS: usize = 512;
/// Most f32 elements of a split workspace (64 MiB); also keeps every workspace index < 2^31.
const WS_CAP: usize = 1 << 24;

const IBS_NONE: u32 = u32::MAX;
const IBS_LOGQ: u32 = 1;
const IBS_IDS: u32 = 2;
const IBS_VALID: u32 = 4;
const IBS_QID: u32 = 8;
const IBS_L2: u32 = 16;

/// Mirrors `struct IbsParams` in kernels/cuda/inbatch_softmax.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct IbsParams {
    q: u64,
    c: u64,
    target: u64,
    row_qid: u64,
    coef: u64,
    lse: u64,
    s_target: u64,
    log_q: u64,
    ids: u64,
    valid: u64,
    col_qid: u64,
    qnorm: u64,
    cnorm: u64,
    ws: u64,
    dk_ws: u64,
    out: u64,
    dk: u64,
    b: u32,
    n: u32,
    d: u32,
    col_lo: u32,
    col_hi: u32,
    splits: u32,
    tiles_per_split: u32,
    flags: u32,
    kappa: f32,
    eps: f32,
}
const _: () = assert!(std::mem::size_of::<IbsParams>() == 176);
const _: () = assert!(std::mem::offset_of!(IbsParams, b) == 136);
const _: () = assert!(std::mem::offset_of!(IbsParams, flags) == 164);
// SAFETY: #[repr(C)], only u64/u32/f32 fields with no implicit padding (17·8 + 10·4 = 176,
// asserted above and by a static_assert in the .cu), laid out exactly like the CUDA struct.
unsafe impl DeviceRepr for IbsParams {}

/// The compiled forms of inbatch_softmax.cu: one per (q dtype, c dtype), every kernel in each.
fn defines(q: DType, c: DType) -> Vec<(&'static str, u32)> {
    vec![("Q_DT", dt_code(q)), ("C_DT", dt_code(c))]
}

/// Every (file, defines) the launchers can request, for `tests/cuda_compile.rs`.
pub(crate) fn compile_variants() -> Vec<(&'static str, Vec<String>)> {
    let mut v = Vec::new();
    for q in DType::ALL {
        for c in DType::ALL {
            v.push((FILE, super::kernels::define_strings(&defines(q, c))));
        }
    }
    v
}

/// `(splits, tiles_per_split)` for a launch whose blocks own ⌈owned/64⌉ tiles and loop over
/// ⌈looped/64⌉ tiles (looped ≥ 1), each split needing `per_split` workspace elements: enough
/// splits for about `TARGET_BLOCKS` blocks, no empty split, the workspace within `WS_CAP`.
fn split(owned: usize, looped: usize, per_split: usize) -> (usize, usize) {
    let owned_tiles = owned.div_ceil(TILE).max(1);
    let tiles = looped.div_ceil(TILE).max(1);
    let cap = (WS_CAP / per_split.max(1)).max(1);
    let want = TARGET_BLOCKS.div_ceil(owned_tiles).min(cap).clamp(1, tiles);
    let tiles_per_split = tiles.div_ceil(want);
    (tiles.div_ceil(tiles_per_split), tiles_per_split)
}

fn big(op: &'static str, arg: &'static str, what: &str, v: Option<usize>) -> Result<u32> {
    match v {
        Some(v) if v <= MAX_INDEX_32 => Ok(v as u32),
        _ => Err(Error::invalid(
            op,
            arg,
            format!("{what} exceeds the 32-bit index limit {MAX_INDEX_32}"),
        )),
    }
}

/// Re-checks everything the kernels' index arithmetic and loads rely on; returns the flags.
fn check(op: &'static str, a: &SoftmaxArgs<'_>) -> Result<u32> {
    let (b, n, d) = (a.b, a.n, a.d);
    let shape = |arg: &'static str, t: &Tensor, rows: usize| -> Result<()> {
        if t.shape() != [rows, d] {
            return Err(Error::shape(op, arg, format!("[{rows}, {d}]"), t.shape()));
        }
        Ok(())
    };
    shape("q", a.q, b)?;
    shape("c", a.c, n)?;
    big(op, "q", "B", Some(b))?;
    big(op, "c", "N", Some(n))?;
    big(op, "q", "B·d", b.checked_mul(d))?;
    big(op, "c", "N·d", n.checked_mul(d))?;
    len_of(op, "target", a.target.len(), b)?;
    for (arg, got, want) in [
        ("row_qid", a.row_qid.map(<[i64]>::len), b),
        ("log_q", a.log_q.map(<[f32]>::len), n),
        ("ids", a.ids.map(<[i64]>::len), n),
        ("valid", a.valid.map(<[bool]>::len), n),
        ("col_qid", a.col_qid.map(<[i64]>::len), n),
    ] {
        if let Some(got) = got {
            len_of(op, arg, got, want)?;
        }
    }
    // The kernels read ids[t] for every active row.
    if let Some(&t) = a.target.iter().find(|&&t| t != IBS_NONE && t as usize >= n) {
        return Err(Error::invalid(
            op,
            "target",
            format!("column {t} is outside the {n} columns"),
        ));
    }
    let mut flags = 0;
    if a.log_q.is_some() {
        flags |= IBS_LOGQ;
    }
    if a.ids.is_some() {
        flags |= IBS_IDS;
    }
    if a.valid.is_some() {
        flags |= IBS_VALID;
    }
    if a.row_qid.is_some() && a.col_qid.is_some() {
        flags |= IBS_QID;
    }
    if a.l2 {
        flags |= IBS_L2;
    }
    Ok(flags)
}

fn len_of(op: &'static str, arg: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::shape(op, arg, format!("[{want}]"), &[got]));
    }
    Ok(())
}

/// A gradient output: `[rows, d]` f32 on `d`.
fn check_out(op: &'static str, arg: &'static str, t: &Tensor, rows: usize, d: usize) -> Result<()> {
    if t.shape() != [rows, d] || t.dtype() != DType::F32 {
        return Err(Error::shape(
            op,
            arg,
            format!("[{rows}, {d}] f32 (got {})", t.dtype()),
            t.shape(),
        ));
    }
    Ok(())
}

/// The device address of a slice. With event tracking off (see `CudaDevice::new`) the guard
/// `device_ptr` returns does nothing, so it is dropped at once; every slice here lives until
/// the end of the launcher, and its free is queued on the same stream, after the kernels.
fn addr<T>(s: &CudaSlice<T>, d: &CudaDevice) -> u64 {
    s.device_ptr(&d.stream).0
}

fn upload<T: DeviceRepr>(d: &CudaDevice, what: &str, v: &[T]) -> Result<CudaSlice<T>> {
    // Never empty: the launchers return before any upload when B or N is 0.
    d.stream
        .clone_htod(v)
        .map_err(|e| backend_err(&format!("uploading {what} ({} values)", v.len()), e))
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    d: &CudaDevice,
    what: &str,
    n: usize,
) -> Result<CudaSlice<T>> {
    d.stream
        .alloc_zeros(n.max(1))
        .map_err(|e| backend_err(&format!("allocating {what} ({n} values)"), e))
}

/// The per-call device buffers behind `IbsParams`' metadata addresses, alive until the
/// launcher returns.
#[derive(Default)]
struct Meta {
    target: Option<CudaSlice<u32>>,
    row_qid: Option<CudaSlice<i64>>,
    col_qid: Option<CudaSlice<i64>>,
    log_q: Option<CudaSlice<f32>>,
    ids: Option<CudaSlice<i64>>,
    valid: Option<CudaSlice<u8>>,
    qnorm: Option<CudaSlice<f32>>,
    cnorm: Option<CudaSlice<f32>>,
}

/// Uploads the metadata, sets its addresses, the sizes and `flags` (from `check`) in `p`, and,
/// with L2, computes the norms of q's rows and of c's columns `cols` (`ibs_norms`).
fn prepare(
    d: &Arc<CudaDevice>,
    op: &'static str,
    a: &SoftmaxArgs<'_>,
    flags: u32,
    cols: std::ops::Range<usize>,
    p: &mut IbsParams,
) -> Result<Meta> {
    // Sizes fit 32 bits: `check` bounded B, N, B·d and N·d by 2^31 − 1.
    p.flags = flags;
    p.b = a.b as u32;
    p.n = a.n as u32;
    p.d = a.d as u32;
    p.col_lo = cols.start as u32;
    p.col_hi = cols.end as u32;
    p.kappa = a.kappa;
    p.eps = a.eps;
    let mut m = Meta::default();
    let target = m.target.insert(upload(d, "targets", a.target)?);
    p.target = addr(target, d);
    if let (Some(rq), Some(cq)) = (a.row_qid, a.col_qid) {
        p.row_qid = addr(m.row_qid.insert(upload(d, "row query ids", rq)?), d);
        p.col_qid = addr(m.col_qid.insert(upload(d, "column query ids", cq)?), d);
    }
    if let Some(lq) = a.log_q {
        p.log_q = addr(m.log_q.insert(upload(d, "log q", lq)?), d);
    }
    if let Some(ids) = a.ids {
        p.ids = addr(m.ids.insert(upload(d, "item ids", ids)?), d);
    }
    if let Some(valid) = a.valid {
        let v: Vec<u8> = valid.iter().map(|&v| v as u8).collect();
        p.valid = addr(m.valid.insert(upload(d, "column validity", &v)?), d);
    }
    p.q = storage(op, "q", d, a.q)?.buf.device_ptr(&d.stream).0;
    p.c = storage(op, "c", d, a.c)?.buf.device_ptr(&d.stream).0;
    if a.l2 {
        p.qnorm = addr(m.qnorm.insert(zeros(d, "query norms", a.b)?), d);
        p.cnorm = addr(m.cnorm.insert(zeros(d, "column norms", cols.len())?), d);
        // One warp each; the kernel's warp index stays below 2^31 + 8.
        let warps = a.b + cols.len();
        big(op, "c", "B + columns", Some(warps))?;
        // SAFETY: `p` mirrors IbsParams; q holds B·d and c N·d elements of their dtypes (shapes
        // checked, both ≤ 2^31 − 1 elements), qnorm B and cnorm col_hi − col_lo f32; the kernel
        // reads rows < B of q and columns in [col_lo, col_hi) ⊆ [0, N) of c, and writes
        // qnorm[w] (w < B) and cnorm[w − B] (w − B < col_hi − col_lo) only.
        unsafe {
            run(
                d,
                a,
                "ibs_norms",
                (blocks_for("ibs_norms", "rows", warps, 8)?, 1, 1),
                p,
            )?;
        }
    }
    Ok(m)
}

/// Launches one kernel of the module for `a`'s dtypes with 256 threads per block.
///
/// # Safety
/// As `launch::launch`: every address in `p` must be live and large enough for what the named
/// kernel indexes with `p`'s sizes.
unsafe fn run(
    d: &Arc<CudaDevice>,
    a: &SoftmaxArgs<'_>,
    kernel: &'static str,
    grid: (u32, u32, u32),
    p: &IbsParams,
) -> Result<()> {
    let func = d.function(FILE, &defines(a.q.dtype(), a.c.dtype()), kernel)?;
    let geometry = Geometry {
        grid,
        block: (256, 1, 1),
        dyn_smem: 0,
    };
    // SAFETY: forwarded to the caller.
    unsafe {
        launch::launch(
            kernel,
            &d.stream,
            &func,
            &d.limits,
            geometry,
            p,
            d.sync_check,
        )
    }
}

fn download(d: &CudaDevice, what: &str, s: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
    let mut v = d
        .stream
        .clone_dtoh(s)
        .map_err(|e| backend_err(&format!("copying {what} to the host"), e))?;
    // Also surfaces an error an earlier asynchronous launch left behind.
    d.synchronize()?;
    v.truncate(n);
    Ok(v)
}

/// See `ops::backend::softmax_forward`.
pub(crate) fn forward(d: &Arc<CudaDevice>, a: &SoftmaxArgs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "inbatch_softmax forward(cuda)";
    let b = a.b;
    if b == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let flags = check(OP, a)?;
    if a.n == 0 {
        // No column: every target is inactive (checked).
        return Ok((vec![f32::NEG_INFINITY; b], vec![0.0; b]));
    }
    let mut p = IbsParams::default();
    let _meta = prepare(d, OP, a, flags, 0..a.n, &mut p)?;
    let (splits, tps) = split(b, a.n, 2 * b);
    p.splits = splits as u32;
    p.tiles_per_split = tps as u32;
    let ws = zeros::<f32>(d, "(max, sum) partials", 2 * splits * b)?;
    let lse = zeros::<f32>(d, "lse", b)?;
    let s_t = zeros::<f32>(d, "target logits", b)?;
    p.ws = addr(&ws, d);
    p.lse = addr(&lse, d);
    p.s_target = addr(&s_t, d);
    // SAFETY: `p` mirrors IbsParams; the metadata arrays hold B (per row) or N (per column)
    // values, every active target is < N (checked), q/c hold B·d/N·d elements, norms B and N
    // f32. ibs_forward writes ws[s·B + i] (float2, s < splits, i < B: splits·2B ≤ WS_CAP) and
    // s_target[i] (i < B); ibs_combine reads those pairs and writes lse[i], i < B.
    unsafe {
        run(
            d,
            a,
            "ibs_forward",
            (blocks_for("ibs_forward", "B", b, TILE)?, splits as u32, 1),
            &p,
        )?;
        run(
            d,
            a,
            "ibs_combine",
            (blocks_for("ibs_combine", "B", b, 256)?, 1, 1),
            &p,
        )?;
    }
    Ok((
        download(d, "lse", &lse, b)?,
        download(d, "target logits", &s_t, b)?,
    ))
}

/// See `ops::backend::softmax_grad_queries`.
pub(crate) fn grad_queries(
    d: &Arc<CudaDevice>,
    a: &SoftmaxArgs<'_>,
    coef: &[f32],
    lse: &[f32],
    dq: &mut Tensor,
) -> Result<f32> {
    const OP: &str = "inbatch_softmax grad_queries(cuda)";
    let (b, dd) = (a.b, a.d);
    let flags = check(OP, a)?;
    check_out(OP, "dq", dq, b, dd)?;
    len_of(OP, "coef", coef.len(), b)?;
    len_of(OP, "lse", lse.len(), b)?;
    let sdq = storage_mut(OP, "dq", d, dq)?;
    d.stream
        .memset_zeros(&mut *sdq.buf)
        .map_err(|e| backend_err("clearing dq", e))?;
    if b == 0 || a.n == 0 {
        return Ok(0.0); // no active row: zero gradients
    }
    let mut p = IbsParams::default();
    let _meta = prepare(d, OP, a, flags, 0..a.n, &mut p)?;
    let coef_d = upload(d, "row coefficients", coef)?;
    let lse_d = upload(d, "lse", lse)?;
    p.coef = addr(&coef_d, d);
    p.lse = addr(&lse_d, d);
    let (splits, tps) = split(b, a.n, b * dd.max(1));
    p.splits = splits as u32;
    p.tiles_per_split = tps as u32;
    p.out = sdq.buf.device_ptr_mut(&d.stream).0;
    // One split accumulates straight into dq (cleared above).
    let ws = if splits > 1 {
        Some(zeros::<f32>(d, "dq partials", splits * b * dd)?)
    } else {
        None
    };
    p.ws = ws.as_ref().map_or(p.out, |w| addr(w, d));
    let dk_ws = zeros::<f32>(d, "dκ partials", splits * b)?;
    let dk = zeros::<f32>(d, "dκ", b)?;
    p.dk_ws = addr(&dk_ws, d);
    p.dk = addr(&dk, d);
    // SAFETY: `p` mirrors IbsParams; metadata as in `forward`, coef and lse hold B f32. ws holds
    // splits·B·d f32 (dq itself, B·d, when splits = 1; ≤ WS_CAP otherwise), dk_ws splits·B,
    // dk B. ibs_grad_rows reads and writes ws[(s·B + i)·d + f] (i < B, f < d) and writes
    // dk_ws[s·B + i]; ibs_finish_rows reads those and writes dq[i·d + f] and dk[i]. dq is an
    // exclusive borrow, so it aliases no input.
    unsafe {
        run(
            d,
            a,
            "ibs_grad_rows",
            (blocks_for("ibs_grad_rows", "B", b, TILE)?, splits as u32, 1),
            &p,
        )?;
        run(
            d,
            a,
            "ibs_finish_rows",
            (blocks_for("ibs_finish_rows", "B", b, 8)?, 1, 1),
            &p,
        )?;
    }
    let dk = download(d, "dκ", &dk, b)?;
    // Rows in order: a fixed summation order, as on the CPU.
    Ok(dk.iter().map(|&v| v as f64).sum::<f64>() as f32)
}

/// See `ops::backend::softmax_grad_columns`.
pub(crate) fn grad_columns(
    d: &Arc<CudaDevice>,
    a: &SoftmaxArgs<'_>,
    coef: &[f32],
    lse: &[f32],
    range: std::ops::Range<usize>,
    dc: &mut Tensor,
) -> Result<()> {
    const OP: &str = "inbatch_softmax grad_columns(cuda)";
    let (b, dd, len) = (a.b, a.d, range.len());
    if range.start > range.end || range.end > a.n {
        return Err(Error::invalid(
            OP,
            "range",
            format!("{range:?} is not within {} columns", a.n),
        ));
    }
    let flags = check(OP, a)?;
    check_out(OP, "dc", dc, len, dd)?;
    len_of(OP, "coef", coef.len(), b)?;
    len_of(OP, "lse", lse.len(), b)?;
    let sdc = storage_mut(OP, "dc", d, dc)?;
    d.stream
        .memset_zeros(&mut *sdc.buf)
        .map_err(|e| backend_err("clearing dc", e))?;
    if b == 0 || len == 0 {
        return Ok(()); // no rows: zero gradients
    }
    let mut p = IbsParams::default();
    let _meta = prepare(d, OP, a, flags, range.clone(), &mut p)?;
    let coef_d = upload(d, "row coefficients", coef)?;
    let lse_d = upload(d, "lse", lse)?;
    p.coef = addr(&coef_d, d);
    p.lse = addr(&lse_d, d);
    let (splits, tps) = split(len, b, len * dd.max(1));
    p.splits = splits as u32;
    p.tiles_per_split = tps as u32;
    p.out = sdc.buf.device_ptr_mut(&d.stream).0;
    let ws = if splits > 1 {
        Some(zeros::<f32>(d, "dc partials", splits * len * dd)?)
    } else {
        None
    };
    p.ws = ws.as_ref().map_or(p.out, |w| addr(w, d));
    // SAFETY: `p` mirrors IbsParams; metadata as in `forward` (per-column arrays over all N,
    // [col_lo, col_hi) = range ⊆ [0, N) checked), coef and lse hold B f32, cnorm holds
    // range.len() norms. ws holds splits·len·d f32 (dc itself when splits = 1). ibs_grad_cols
    // reads and writes ws[(s·len + j − col_lo)·d + f] (j in range, f < d); ibs_finish_cols
    // reads those and writes dc[(j − col_lo)·d + f]. dc is an exclusive borrow.
    unsafe {
        run(
            d,
            a,
            "ibs_grad_cols",
            (
                blocks_for("ibs_grad_cols", "columns", len, TILE)?,
                splits as u32,
                1,
            ),
            &p,
        )?;
        run(
            d,
            a,
            "ibs_finish_cols",
            (blocks_for("ibs_finish_cols", "columns", len, 8)?, 1, 1),
            &p,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile in exactly one split, no split empty, the workspace within its cap.
    #[test]
    fn splits_cover_every_tile_once() {
        for owned in [1, 63, 64, 65, 1000, 8192, 1 << 20] {
            for looped in [1, 64, 65, 257, 4096, 262_144, 1 << 22] {
                for per_split in [2 * owned, owned * 128, owned * 4096] {
                    let (s, tps) = split(owned, looped, per_split);
                    let tiles = looped.div_ceil(TILE);
                    assert!(s >= 1 && tps >= 1, "{owned} {looped}");
                    assert!(s * tps >= tiles, "{owned} {looped}: tiles left over");
                    assert!((s - 1) * tps < tiles, "{owned} {looped}: an empty split");
                    assert!(s <= TARGET_BLOCKS, "grid.y");
                    assert!(s == 1 || s * per_split <= WS_CAP, "{owned} {looped}");
                }
            }
        }
        // A small batch is split; a large one is not.
        assert_eq!(split(64, 262_144, 64 * 128).0, 512);
        assert_eq!(split(65_536, 262_144, 2 * 65_536).0, 1);
    }

    #[test]
    fn every_dtype_pair_is_a_compile_variant() {
        let v = compile_variants();
        assert_eq!(v.len(), 9);
        for q in DType::ALL {
            for c in DType::ALL {
                let want = super::super::kernels::define_strings(&defines(q, c));
                assert!(v.iter().any(|(f, d)| *f == FILE && *d == want));
            }
        }
    }
}
