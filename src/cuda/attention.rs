//! Launchers for the attention core (`kernels/cuda/attention.cu`): forward (O, LSE), backward
//! (dQ, dK, dV, with P recomputed from LSE) and the deterministic d bias reduction.
//!
//! The head dims select a compiled variant: d_k and d_v are rounded up to the buckets
//! [`DK_BUCKETS`] × [`DV_BUCKETS`] (zero padding inside the kernel), except (64, 128), whose
//! backward would not fit the register file. Larger head dims report `Error::Unsupported`.

use std::sync::Arc;

use cudarc::driver::{DevicePtrMut, DeviceRepr};

use super::gemm::{dt_code, ptr, ptr_mut, storage, storage_mut, u32_of};
use super::launch::{self, blocks_for, Geometry};
use super::{backend_err, CudaDevice};
use crate::error::{Error, Result};
use crate::ops::attention::AttnArgs;
use crate::ops::gemm::MAX_INDEX_32;
use crate::tensor::Tensor;

const FILE: &str = "attention.cu";
/// Most threads per block (the kernels' `__launch_bounds__`).
const MAX_THREADS: usize = 128;
/// Query rows per d bias block (`RF_ATTN_DBIAS_ROWS`).
const DBIAS_ROWS: usize = 8;
/// Compiled d_k buckets.
pub(crate) const DK_BUCKETS: [usize; 3] = [16, 32, 64];
/// Compiled d_v buckets.
pub(crate) const DV_BUCKETS: [usize; 4] = [16, 32, 64, 128];

/// The compiled (DK, DV) bucket for runtime head dims, or `None` when unsupported.
pub(crate) fn variant(dk: usize, dv: usize) -> Option<(usize, usize)> {
    let bk = *DK_BUCKETS.iter().find(|&&b| dk <= b)?;
    let bv = *DV_BUCKETS.iter().find(|&&b| dv <= b)?;
    // Backward registers grow as 2·DK + DV (phase 1: q, dq, dO; phase 2 pass B: k, dk, v).
    (2 * bk + bv <= 192).then_some((bk, bv))
}

/// Every variant `variant` can return (for the offline compile check).
pub(crate) fn all_variants() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for &dk in &DK_BUCKETS {
        for &dv in &DV_BUCKETS {
            if variant(dk, dv) == Some((dk, dv)) {
                v.push((dk, dv));
            }
        }
    }
    v
}

pub(crate) fn defines(v: (usize, usize)) -> Vec<(&'static str, u32)> {
    vec![("DK", v.0 as u32), ("DV", v.1 as u32)]
}

/// Threads per block for `n` rows (or keys) handled one per thread: whole warps, at most
/// `MAX_THREADS` (more rows take several passes).
pub(crate) fn threads_for(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, MAX_THREADS) as u32
}

/// (splits S, samples per split) of the d bias reduction: a function of (B, H, Lq) only, so the
/// summation order, and every bit of d bias, is the same on every run and every GPU. Aims at
/// about 1024 blocks; S = 1 stores d bias directly.
pub(crate) fn dbias_splits(b: usize, h: usize, lq: usize) -> (usize, usize) {
    let blocks = (h * lq.div_ceil(DBIAS_ROWS)).max(1);
    let s = (1024 / blocks).clamp(1, b.max(1));
    let per = b.div_ceil(s).max(1);
    (b.div_ceil(per).max(1), per)
}

/// Mirrors `struct AttnParams` in kernels/cuda/attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    bias: u64,
    mask: u64,
    o: u64,
    lse: u64,
    d_o: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dws: u64,
    dbias: u64,
    dbias_ws: u64,
    b: u32,
    lq: u32,
    l: u32,
    h: u32,
    dk_: u32,
    dv_: u32,
    scale: f32,
    scale2: f32,
    splits: u32,
    b_per_split: u32,
    qkv_dt: u32,
    o_dt: u32,
    lse_dt: u32,
    do_dt: u32,
    bias_dt: u32,
    mask_dt: u32,
    dbias_dt: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<AttnParams>() == 184);
const _: () = assert!(std::mem::offset_of!(AttnParams, b) == 112);
const _: () = assert!(std::mem::offset_of!(AttnParams, scale) == 136);
const _: () = assert!(std::mem::offset_of!(AttnParams, qkv_dt) == 152);
// SAFETY: #[repr(C)], only integers and f32, no implicit padding (14·8 + 18·4 = 184 with the
// explicit `pad`, asserted above and by a static_assert in attention.cu), laid out exactly like
// the CUDA struct.
unsafe impl DeviceRepr for AttnParams {}

fn unsupported(dk: usize, dv: usize) -> Error {
    Error::Unsupported {
        op: "attention",
        backend: "cuda",
        what: format!(
            "head dims d_k = {dk}, d_v = {dv}: the CUDA kernels take d_k ≤ 64 and d_v ≤ 128 \
             (rounded up to {DK_BUCKETS:?} × {DV_BUCKETS:?}) with 2·d_k' + d_v' ≤ 192 for the \
             rounded dims (register budget of the backward)"
        ),
    }
}

/// `t` holds exactly `n` elements, and every index into it fits the kernels' 32-bit arithmetic.
fn check_len(op: &'static str, arg: &'static str, t: &Tensor, n: usize) -> Result<()> {
    if t.numel() != n {
        return Err(Error::shape(op, arg, format!("{n} elements"), t.shape()));
    }
    u32_of(op, arg, "element count", n).map(|_| ())
}

/// Validates the call and fills the shape part of the parameters.
fn base_params(op: &'static str, a: &AttnArgs<'_>) -> Result<(AttnParams, (usize, usize))> {
    let v = variant(a.dk, a.dv).ok_or_else(|| unsupported(a.dk, a.dv))?;
    check_len(op, "q", a.q, a.b * a.lq * a.h * a.dk)?;
    check_len(op, "k", a.k, a.b * a.l * a.h * a.dk)?;
    check_len(op, "v", a.v, a.b * a.l * a.h * a.dv)?;
    if let Some(t) = a.bias {
        check_len(op, "bias", t, a.h * a.lq * a.l)?;
    }
    if let Some(t) = a.mask {
        check_len(op, "mask", t, a.b * a.l)?;
    }
    // O / dO [B, Lq, H, dv] and LSE / D [B, H, Lq] are checked by the callers; B·H blocks.
    let bh = a.b.checked_mul(a.h).filter(|&x| x <= MAX_INDEX_32);
    if bh.is_none() || a.lq > a.l {
        return Err(Error::invalid(
            op,
            "q",
            format!("B·H = {}·{} blocks, Lq = {} ≤ L = {}", a.b, a.h, a.lq, a.l),
        ));
    }
    for (arg, t) in [("k", a.k), ("v", a.v)] {
        if t.dtype() != a.q.dtype() {
            return Err(Error::DType {
                op,
                arg,
                expected: a.q.dtype().to_string(),
                actual: t.dtype(),
            });
        }
    }
    let p = AttnParams {
        b: a.b as u32,
        lq: a.lq as u32,
        l: a.l as u32,
        h: a.h as u32,
        dk_: a.dk as u32,
        dv_: a.dv as u32,
        scale: a.scale,
        scale2: a.scale * std::f32::consts::LOG2_E,
        splits: 1,
        b_per_split: a.b as u32,
        qkv_dt: dt_code(a.q.dtype()),
        bias_dt: a.bias.map(|t| dt_code(t.dtype())).unwrap_or(0),
        mask_dt: a.mask.map(|t| dt_code(t.dtype())).unwrap_or(0),
        ..Default::default()
    };
    Ok((p, v))
}

pub(crate) fn forward(
    d: &Arc<CudaDevice>,
    a: &AttnArgs<'_>,
    o: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    const OP: &str = "attention(cuda)";
    const KERNEL: &str = "attn_fwd";
    if a.b * a.lq * a.h == 0 {
        return Ok(());
    }
    let (mut params, v) = base_params(OP, a)?;
    check_len(OP, "o", o, a.b * a.lq * a.h * a.dv)?;
    check_len(OP, "lse", lse, a.b * a.h * a.lq)?;
    params.o_dt = dt_code(o.dtype());
    params.lse_dt = dt_code(lse.dtype());
    let threads = threads_for(a.lq);
    let geometry = Geometry {
        grid: (blocks_for(KERNEL, "B·H", a.b * a.h, 1)?, 1, 1),
        block: (threads, 1, 1),
        // The current key tile's scores, one f32 column per thread.
        dyn_smem: 32 * threads * 4,
    };
    let func = d.function(FILE, &defines(v), KERNEL)?;
    let stream = d.stream.clone();
    let (pq, _gq) = ptr(storage(OP, "q", d, a.q)?, &stream);
    let (pk, _gk) = ptr(storage(OP, "k", d, a.k)?, &stream);
    let (pv, _gv) = ptr(storage(OP, "v", d, a.v)?, &stream);
    params.q = pq;
    params.k = pk;
    params.v = pv;
    let _gbias = match a.bias {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "bias", d, t)?, &stream);
            params.bias = p;
            Some(g)
        }
        None => None,
    };
    let _gmask = match a.mask {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "mask", d, t)?, &stream);
            params.mask = p;
            Some(g)
        }
        None => None,
    };
    let (po, _go) = ptr_mut(storage_mut(OP, "o", d, o)?, &stream);
    params.o = po;
    let (pl, _gl) = ptr_mut(storage_mut(OP, "lse", d, lse)?, &stream);
    params.lse = pl;
    // SAFETY: `params` mirrors AttnParams in attention.cu (size and offsets asserted). Q, K, V,
    // O, LSE, bias and mask hold exactly B·Lq·H·dk, B·L·H·dk, B·L·H·dv, B·Lq·H·dv, B·H·Lq,
    // H·Lq·L and B·L elements of their dtypes, each < 2^31 (checked above), and the kernel
    // forms indices only for b < B, h < H, i < Lq, j < L, c < dk (dv), so every access is in
    // bounds and exact in 32-bit arithmetic. O and LSE are exclusive borrows, distinct from
    // every input. Every allocation outlives the kernel in stream order.
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

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    d: &Arc<CudaDevice>,
    a: &AttnArgs<'_>,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
    dbias: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "attention_backward(cuda)";
    if a.b * a.lq * a.h == 0 {
        return Ok(());
    }
    let (mut params, v) = base_params(OP, a)?;
    let rows = a.b * a.h * a.lq;
    check_len(OP, "o", o, a.b * a.lq * a.h * a.dv)?;
    check_len(OP, "d_o", d_o, a.b * a.lq * a.h * a.dv)?;
    check_len(OP, "lse", lse, rows)?;
    check_len(OP, "dq", dq, a.q.numel())?;
    check_len(OP, "dk", dk, a.k.numel())?;
    check_len(OP, "dv", dv, a.v.numel())?;
    for (arg, t) in [("dq", &*dq), ("dk", &*dk), ("dv", &*dv)] {
        if t.dtype() != a.q.dtype() {
            return Err(Error::DType {
                op: OP,
                arg,
                expected: a.q.dtype().to_string(),
                actual: t.dtype(),
            });
        }
    }
    params.o_dt = dt_code(o.dtype());
    params.lse_dt = dt_code(lse.dtype());
    params.do_dt = dt_code(d_o.dtype());
    let nbias = a.h * a.lq * a.l;
    let (splits, per) = dbias_splits(a.b, a.h, a.lq);
    if let Some(t) = dbias.as_deref() {
        if a.bias.is_none() {
            return Err(Error::invalid(OP, "dbias", "given without a bias"));
        }
        check_len(OP, "dbias", t, nbias)?;
        params.dbias_dt = dt_code(t.dtype());
        params.splits = splits as u32;
        params.b_per_split = per as u32;
        if splits > 1 {
            u32_of(OP, "dbias", "partial-sum workspace", splits * nbias)?;
        }
    }

    let bwd = d.function(FILE, &defines(v), "attn_bwd")?;
    let stream = d.stream.clone();
    // SAFETY: uninitialised f32 [B, H, Lq]; attn_bwd's phase 1 writes D for every row before its
    // phase 2 (after a __syncthreads) or attn_dbias_partial (later on the same stream) reads it.
    let mut dws = unsafe { stream.alloc::<f32>(rows) }
        .map_err(|e| backend_err(&format!("allocating the D workspace ({rows} f32)"), e))?;
    let mut ws =
        if dbias.is_some() && splits > 1 {
            let n = splits * nbias;
            // SAFETY: uninitialised; attn_dbias_partial writes every [s, e] (s < S, e < H·Lq·L)
            // before attn_dbias_finish, queued after it on the same stream, reads any.
            Some(unsafe { stream.alloc::<f32>(n) }.map_err(|e| {
                backend_err(&format!("allocating the d bias workspace ({n} f32)"), e)
            })?)
        } else {
            None
        };
    let (pq, _gq) = ptr(storage(OP, "q", d, a.q)?, &stream);
    let (pk, _gk) = ptr(storage(OP, "k", d, a.k)?, &stream);
    let (pv, _gv) = ptr(storage(OP, "v", d, a.v)?, &stream);
    let (po, _go) = ptr(storage(OP, "o", d, o)?, &stream);
    let (pl, _gl) = ptr(storage(OP, "lse", d, lse)?, &stream);
    let (pdo, _gdo) = ptr(storage(OP, "d_o", d, d_o)?, &stream);
    params.q = pq;
    params.k = pk;
    params.v = pv;
    params.o = po;
    params.lse = pl;
    params.d_o = pdo;
    let _gbias = match a.bias {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "bias", d, t)?, &stream);
            params.bias = p;
            Some(g)
        }
        None => None,
    };
    let _gmask = match a.mask {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "mask", d, t)?, &stream);
            params.mask = p;
            Some(g)
        }
        None => None,
    };
    let (pdq, _gdq) = ptr_mut(storage_mut(OP, "dq", d, dq)?, &stream);
    let (pdk, _gdk) = ptr_mut(storage_mut(OP, "dk", d, dk)?, &stream);
    let (pdv, _gdv) = ptr_mut(storage_mut(OP, "dv", d, dv)?, &stream);
    params.dq = pdq;
    params.dk = pdk;
    params.dv = pdv;
    let (pdws, _gdws) = dws.device_ptr_mut(&stream);
    params.dws = pdws;
    let _gws = ws.as_mut().map(|w| {
        let (p, g) = w.device_ptr_mut(&stream);
        params.dbias_ws = p;
        g
    });
    let with_dbias = dbias.is_some();
    let _gdb = match dbias {
        Some(t) => {
            let (p, g) = ptr_mut(storage_mut(OP, "dbias", d, t)?, &stream);
            params.dbias = p;
            Some(g)
        }
        None => None,
    };

    let bh = blocks_for("attn_bwd", "B·H", a.b * a.h, 1)?;
    let keys = threads_for(a.l);
    // SAFETY: `params` mirrors AttnParams (size and offsets asserted). Every input tensor holds
    // exactly the element count its [B, ., H, .] or [H, Lq, L] / [B, L] shape implies, each
    // < 2^31 (checked above and in `base_params`); dQ/dK/dV are exclusive borrows shaped like
    // Q/K/V; the D workspace holds B·H·Lq f32 and the d bias workspace S·H·Lq·L f32 (< 2^31).
    // The kernels index only b < B, h < H, i < Lq, j < L, c < dk (dv), s < S, so every access
    // is in bounds and exact in 32-bit arithmetic. Outputs never alias inputs (exclusive
    // borrows and fresh workspaces). Every allocation outlives the kernels in stream order.
    unsafe {
        launch::launch(
            "attn_bwd",
            &stream,
            &bwd,
            &d.limits,
            Geometry {
                grid: (bh, 1, 1),
                block: (keys, 1, 1),
                dyn_smem: 0,
            },
            &params,
            d.sync_check,
        )?;
        if with_dbias {
            let partial = d.function(FILE, &defines(v), "attn_dbias_partial")?;
            let tiles = blocks_for(
                "attn_dbias_partial",
                "H·⌈Lq/8⌉",
                a.h * a.lq.div_ceil(DBIAS_ROWS),
                1,
            )?;
            launch::launch(
                "attn_dbias_partial",
                &stream,
                &partial,
                &d.limits,
                Geometry {
                    grid: (tiles, splits as u32, 1),
                    block: (keys, 1, 1),
                    dyn_smem: 0,
                },
                &params,
                d.sync_check,
            )?;
            if splits > 1 {
                let finish = d.function(FILE, &defines(v), "attn_dbias_finish")?;
                launch::launch(
                    "attn_dbias_finish",
                    &stream,
                    &finish,
                    &d.limits,
                    Geometry {
                        grid: (blocks_for("attn_dbias_finish", "H·Lq·L", nbias, 256)?, 1, 1),
                        block: (256, 1, 1),
                        dyn_smem: 0,
                    },
                    &params,
                    d.sync_check,
                )?;
            }
        }
    }
    // The workspaces are freed here with cuMemFreeAsync on the same stream, after the kernels.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dim_buckets() {
        assert_eq!(variant(16, 64), Some((16, 64)));
        assert_eq!(variant(3, 5), Some((16, 16)));
        assert_eq!(variant(0, 0), Some((16, 16)));
        assert_eq!(variant(17, 64), Some((32, 64)));
        assert_eq!(variant(64, 64), Some((64, 64)));
        assert_eq!(variant(32, 128), Some((32, 128)));
        assert_eq!(variant(64, 65), None);
        assert_eq!(variant(65, 16), None);
        assert_eq!(variant(16, 129), None);
        // Every selectable variant is in the compile-check list, and nothing else is.
        let all = all_variants();
        assert_eq!(all.len(), 11);
        for dk in 0..=70 {
            for dv in 0..=130 {
                if let Some(v) = variant(dk, dv) {
                    assert!(all.contains(&v), "{dk} {dv}");
                    assert!(v.0 >= dk && v.1 >= dv);
                }
            }
        }
    }

    #[test]
    fn threads_cover_rows_in_whole_warps() {
        assert_eq!(threads_for(1), 32);
        assert_eq!(threads_for(38), 64);
        assert_eq!(threads_for(128), 128);
        assert_eq!(threads_for(1000), 128);
    }

    #[test]
    fn dbias_splits_cover_the_batch() {
        for (b, h, lq) in [
            (1, 1, 1),
            (2, 2, 38),
            (1024, 4, 38),
            (3, 4, 2),
            (7, 1, 61),
            (100_000, 8, 200),
        ] {
            let (s, per) = dbias_splits(b, h, lq);
            assert!(s >= 1 && per >= 1);
            assert!(s * per >= b, "{b} {h} {lq}");
            assert!((s - 1) * per < b, "an empty split for {b} {h} {lq}");
            assert!(s <= 1024);
        }
        assert_eq!(dbias_splits(1024, 4, 38), (49, 21));
    }
}
