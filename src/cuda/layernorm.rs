//! Launchers for LayerNorm (`kernels/cuda/layernorm.cu`): forward (y, mean, rstd), the input
//! gradient, and dγ/dβ reduced over rows in a fixed order (the `col_sum` scheme on the
//! `[rows / T, T·d]` view).

use std::sync::Arc;

use cudarc::driver::{DevicePtrMut, DeviceRepr};

use super::gemm::{col_sum_splits, dt_code, ptr, ptr_mut, storage, storage_mut, u32_of};
use super::launch::{self, blocks_for, Geometry};
use super::{backend_err, CudaDevice};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const FILE: &str = "layernorm.cu";
/// Rows (warps) per 256-thread block (`LN_WARPS`).
const ROWS_PER_BLOCK: usize = 8;

/// Mirrors `struct LnParams` in kernels/cuda/layernorm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LnParams {
    x: u64,
    gamma: u64,
    beta: u64,
    y: u64,
    mean: u64,
    rstd: u64,
    dy: u64,
    dx: u64,
    dgamma: u64,
    dbeta: u64,
    ws: u64,
    rows: u32,
    d: u32,
    tokens: u32,
    groups: u32,
    splits: u32,
    groups_per_split: u32,
    eps: f32,
    x_dt: u32,
    g_dt: u32,
    b_dt: u32,
    y_dt: u32,
    dy_dt: u32,
    dx_dt: u32,
    dg_dt: u32,
    db_dt: u32,
    mean_dt: u32,
    rstd_dt: u32,
    inv_d: f32,
}
const _: () = assert!(std::mem::size_of::<LnParams>() == 160);
const _: () = assert!(std::mem::offset_of!(LnParams, rows) == 88);
const _: () = assert!(std::mem::offset_of!(LnParams, eps) == 112);
const _: () = assert!(std::mem::offset_of!(LnParams, rstd_dt) == 152);
// SAFETY: #[repr(C)], only integers and f32, no implicit padding (11·8 + 18·4 = 160,
// asserted above and by a static_assert in layernorm.cu), laid out exactly like
// the CUDA struct.
unsafe impl DeviceRepr for LnParams {}

/// (rows, d) of `x`, checked against γ (`[T, d]` elements) and the 32-bit index limit.
fn shape(op: &'static str, x: &Tensor, gamma: &Tensor, tokens: usize) -> Result<(usize, usize)> {
    let d = *x.shape().last().unwrap_or(&0);
    let rows = x.numel() / d.max(1);
    u32_of(op, "x", "element count", x.numel())?;
    if tokens == 0 || rows % tokens != 0 || gamma.numel() != tokens * d {
        return Err(Error::shape(
            op,
            "gamma",
            format!("[{tokens}, {d}] with {rows} rows a multiple of {tokens}"),
            gamma.shape(),
        ));
    }
    Ok((rows, d))
}

fn same_len(op: &'static str, arg: &'static str, t: &Tensor, n: usize) -> Result<()> {
    if t.numel() != n {
        return Err(Error::shape(op, arg, format!("{n} elements"), t.shape()));
    }
    Ok(())
}

/// Warp-per-row geometry: 8 rows per block, grid-stride beyond 32 blocks per SM (the stride
/// stays far below 2^31, so `row += stride` over rows < 2^31 cannot wrap).
fn row_geometry(d: &CudaDevice, kernel: &str, rows: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (
            blocks_for(kernel, "rows", rows, ROWS_PER_BLOCK)?.min(d.limits.sm_count.max(1) * 32),
            1,
            1,
        ),
        block: (256, 1, 1),
        dyn_smem: 0,
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    d: &Arc<CudaDevice>,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    tokens: usize,
    eps: f32,
    y: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
) -> Result<()> {
    const OP: &str = "layernorm(cuda)";
    const KERNEL: &str = "ln_fwd";
    let (rows, dd) = shape(OP, x, gamma, tokens)?;
    if rows == 0 || dd == 0 {
        return Ok(());
    }
    same_len(OP, "beta", beta, gamma.numel())?;
    same_len(OP, "y", y, x.numel())?;
    same_len(OP, "mean", mean, rows)?;
    same_len(OP, "rstd", rstd, rows)?;
    let mut params = LnParams {
        rows: rows as u32,
        d: dd as u32,
        tokens: tokens as u32,
        groups: (rows / tokens) as u32,
        eps,
        inv_d: 1.0 / dd as f32,
        x_dt: dt_code(x.dtype()),
        g_dt: dt_code(gamma.dtype()),
        b_dt: dt_code(beta.dtype()),
        y_dt: dt_code(y.dtype()),
        mean_dt: dt_code(mean.dtype()),
        rstd_dt: dt_code(rstd.dtype()),
        ..Default::default()
    };
    let geometry = row_geometry(d, KERNEL, rows)?;
    let func = d.function(FILE, &[], KERNEL)?;
    let stream = d.stream.clone();
    let (px, _gx) = ptr(storage(OP, "x", d, x)?, &stream);
    let (pg, _gg) = ptr(storage(OP, "gamma", d, gamma)?, &stream);
    let (pb, _gb) = ptr(storage(OP, "beta", d, beta)?, &stream);
    params.x = px;
    params.gamma = pg;
    params.beta = pb;
    let (py, _gy) = ptr_mut(storage_mut(OP, "y", d, y)?, &stream);
    let (pm, _gm) = ptr_mut(storage_mut(OP, "mean", d, mean)?, &stream);
    let (pr, _gr) = ptr_mut(storage_mut(OP, "rstd", d, rstd)?, &stream);
    params.y = py;
    params.mean = pm;
    params.rstd = pr;
    // SAFETY: `params` mirrors LnParams in layernorm.cu (size and offsets asserted). x and y hold
    // rows·d < 2^31 elements, γ and β T·d, mean and rstd `rows` (checked above); the kernel
    // indexes only row < rows, c < d and (row mod T)·d + c < T·d. y, mean and rstd are
    // exclusive borrows, distinct from the inputs. Every allocation outlives the kernel in
    // stream order.
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
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    tokens: usize,
    dx: &mut Tensor,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Result<()> {
    const OP: &str = "layernorm_backward(cuda)";
    let (rows, dd) = shape(OP, x, gamma, tokens)?;
    if rows == 0 || dd == 0 {
        return Ok(());
    }
    same_len(OP, "dy", dy, x.numel())?;
    same_len(OP, "dx", dx, x.numel())?;
    same_len(OP, "mean", mean, rows)?;
    same_len(OP, "rstd", rstd, rows)?;
    same_len(OP, "dgamma", dgamma, gamma.numel())?;
    same_len(OP, "dbeta", dbeta, gamma.numel())?;
    let groups = rows / tokens;
    let cols = tokens * dd;
    let (splits, per) = col_sum_splits(groups, cols);
    let mut params = LnParams {
        rows: rows as u32,
        d: dd as u32,
        tokens: tokens as u32,
        groups: groups as u32,
        inv_d: 1.0 / dd as f32,
        splits: splits as u32,
        groups_per_split: u32_of(OP, "x", "groups per split", per)?,
        x_dt: dt_code(x.dtype()),
        g_dt: dt_code(gamma.dtype()),
        dy_dt: dt_code(dy.dtype()),
        dx_dt: dt_code(dx.dtype()),
        dg_dt: dt_code(dgamma.dtype()),
        db_dt: dt_code(dbeta.dtype()),
        mean_dt: dt_code(mean.dtype()),
        rstd_dt: dt_code(rstd.dtype()),
        ..Default::default()
    };
    let dx_geometry = row_geometry(d, "ln_bwd_dx", rows)?;
    let fdx = d.function(FILE, &[], "ln_bwd_dx")?;
    let fpart = d.function(FILE, &[], "ln_bwd_param_partial")?;
    let ffin = d.function(FILE, &[], "ln_bwd_param_finish")?;
    let stream = d.stream.clone();
    // f32 partials [2][S][T·d]; S·T·d ≤ 1024·32·⌈T·d/32⌉/⌈T·d/32⌉ stays small (col_sum_splits).
    let mut ws = if splits > 1 {
        let n = 2 * splits * cols;
        u32_of(OP, "x", "workspace size", n)?;
        // SAFETY: uninitialised, but ln_bwd_param_partial writes every [k, s, j] (k < 2, s < S,
        // j < T·d) before ln_bwd_param_finish, queued after it on the same stream, reads any.
        Some(unsafe { stream.alloc::<f32>(n) }.map_err(|e| {
            backend_err(&format!("allocating the LayerNorm workspace ({n} f32)"), e)
        })?)
    } else {
        None
    };
    let (px, _gx) = ptr(storage(OP, "x", d, x)?, &stream);
    let (pg, _gg) = ptr(storage(OP, "gamma", d, gamma)?, &stream);
    let (pm, _gm) = ptr(storage(OP, "mean", d, mean)?, &stream);
    let (pr, _gr) = ptr(storage(OP, "rstd", d, rstd)?, &stream);
    let (pdy, _gdy) = ptr(storage(OP, "dy", d, dy)?, &stream);
    params.x = px;
    params.gamma = pg;
    params.mean = pm;
    params.rstd = pr;
    params.dy = pdy;
    let (pdx, _gdx) = ptr_mut(storage_mut(OP, "dx", d, dx)?, &stream);
    let (pdg, _gdg) = ptr_mut(storage_mut(OP, "dgamma", d, dgamma)?, &stream);
    let (pdb, _gdb) = ptr_mut(storage_mut(OP, "dbeta", d, dbeta)?, &stream);
    params.dx = pdx;
    params.dgamma = pdg;
    params.dbeta = pdb;
    let _gws = ws.as_mut().map(|w| {
        let (p, g) = w.device_ptr_mut(&stream);
        params.ws = p;
        g
    });
    let strips = blocks_for("ln_bwd_param_partial", "T·d", cols, 32)?;
    // SAFETY: `params` mirrors LnParams (size and offsets asserted). x, dy and dx hold
    // rows·d < 2^31 elements, γ, dγ and dβ T·d, mean and rstd `rows`, the workspace 2·S·T·d f32
    // (checked above); rows = G·T, so every index g·T·d + j (g < G, j < T·d) is < rows·d.
    // The kernels index only row < rows, c < d, j < T·d, s < S. dx, dγ, dβ are exclusive
    // borrows, distinct from the inputs. Every allocation outlives the kernels in stream order.
    unsafe {
        launch::launch(
            "ln_bwd_dx",
            &stream,
            &fdx,
            &d.limits,
            dx_geometry,
            &params,
            d.sync_check,
        )?;
        launch::launch(
            "ln_bwd_param_partial",
            &stream,
            &fpart,
            &d.limits,
            Geometry {
                grid: (strips, splits as u32, 1),
                block: (32, 8, 1),
                dyn_smem: 0,
            },
            &params,
            d.sync_check,
        )?;
        if splits > 1 {
            launch::launch(
                "ln_bwd_param_finish",
                &stream,
                &ffin,
                &d.limits,
                Geometry {
                    grid: (blocks_for("ln_bwd_param_finish", "T·d", cols, 256)?, 1, 1),
                    block: (256, 1, 1),
                    dyn_smem: 0,
                },
                &params,
                d.sync_check,
            )?;
        }
    }
    // `ws` is freed here with cuMemFreeAsync on the same stream, after the kernels.
    Ok(())
}
