//! Launchers for the GEMM core (`kernels/cuda/gemm.cu`), its backward helpers
//! (`kernels/cuda/gemm_aux.cu`) and the element-wise half of the cross-layer backward
//! (`kernels/cuda/gated_cross.cu`). Each one re-validates what its kernel's index arithmetic
//! relies on, converts sizes to the kernel's 32-bit fields with checked conversions, picks the
//! variant, and launches through `launch::launch`.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop};

use super::launch::{self, blocks_for, Geometry};
use super::{backend_err, CudaDevice, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::gemm::{Activation, Gemm, MatView, MAX_INDEX_32};
use crate::tensor::{Storage, Tensor};

pub(super) fn dt_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// The CUDA storage of `t`, which must live on `dev`.
pub(super) fn storage<'t>(
    op: &'static str,
    arg: &'static str,
    dev: &Arc<CudaDevice>,
    t: &'t Tensor,
) -> Result<&'t CudaStorage> {
    match &t.storage {
        Storage::Cuda(s) if Arc::ptr_eq(&s.device, dev) => Ok(s),
        _ => Err(Error::DeviceMismatch {
            op,
            arg,
            expected: dev.describe(),
            actual: t.device().describe(),
        }),
    }
}

pub(super) fn storage_mut<'t>(
    op: &'static str,
    arg: &'static str,
    dev: &Arc<CudaDevice>,
    t: &'t mut Tensor,
) -> Result<&'t mut CudaStorage> {
    let actual = t.device().describe();
    match &mut t.storage {
        Storage::Cuda(s) if Arc::ptr_eq(&s.device, dev) => Ok(s),
        _ => Err(Error::DeviceMismatch {
            op,
            arg,
            expected: dev.describe(),
            actual,
        }),
    }
}

pub(super) fn ptr<'a>(s: &'a CudaStorage, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    s.buf.device_ptr(stream)
}

pub(super) fn ptr_mut<'a>(s: &'a mut CudaStorage, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    s.buf.device_ptr_mut(stream)
}

/// A size as a 32-bit kernel field.
pub(super) fn u32_of(op: &'static str, arg: &'static str, what: &str, v: usize) -> Result<u32> {
    if v > MAX_INDEX_32 {
        return Err(Error::invalid(
            op,
            arg,
            format!("{what} = {v} exceeds the 32-bit index limit {MAX_INDEX_32}"),
        ));
    }
    Ok(v as u32)
}

/// A stride as a 32-bit field; a stride along an axis of extent ≤ 1 never multiplies a
/// non-zero index, so it is sent as 0 rather than rejected when it is huge.
fn stride_of(op: &'static str, arg: &'static str, stride: usize, extent: usize) -> Result<u32> {
    if extent <= 1 {
        Ok(0)
    } else {
        u32_of(op, arg, "stride", stride)
    }
}

/// (offset, row stride, col stride, batch stride) of a `[batch, rows, cols]` view.
fn view32(
    op: &'static str,
    arg: &'static str,
    v: &MatView,
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<[u32; 4]> {
    if batch == 0 || rows == 0 || cols == 0 {
        // Nothing is read through an empty view (k = 0): send a null view.
        return Ok([0; 4]);
    }
    Ok([
        u32_of(op, arg, "offset", v.offset)?,
        stride_of(op, arg, v.row_stride, rows)?,
        stride_of(op, arg, v.col_stride, cols)?,
        stride_of(op, arg, v.batch_stride, batch)?,
    ])
}

/// Mirrors `struct GemmParams` in kernels/cuda/gemm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GemmParams {
    a: u64,
    b: u64,
    c: u64,
    bias: u64,
    residual: u64,
    pre: u64,
    mul: u64,
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_view: [u32; 4],
    b_view: [u32; 4],
    c_view: [u32; 4],
    pre_view: [u32; 4],
    bias_bs: u32,
    alpha: f32,
    act: u32,
    flags: u32,
    c_dt: u32,
    bias_dt: u32,
    res_dt: u32,
    pre_dt: u32,
    mul_dt: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<GemmParams>() == 176);
// Offsets of the fields added with the mul/gated epilogue, as the CUDA struct's natural
// layout puts them (a size check alone would not catch two swapped fields; NVRTC has no
// offsetof, so only this side can assert them).
const _: () = assert!(std::mem::offset_of!(GemmParams, mul) == 48);
const _: () = assert!(std::mem::offset_of!(GemmParams, pre_view) == 120);
const _: () = assert!(std::mem::offset_of!(GemmParams, flags) == 148);
const _: () = assert!(std::mem::offset_of!(GemmParams, mul_dt) == 168);

// SAFETY: #[repr(C)], only integers and f32, no implicit padding (176 bytes = 7·8 + 30·4 with
// the explicit `pad`, asserted above and by a static_assert in gemm.cu), laid out exactly like
// the CUDA struct.
unsafe impl DeviceRepr for GemmParams {}

const GEMM_FLAG_ACCUMULATE: u32 = 1;
/// The GDCN pair epilogue (`Gemm::gated`).
const GEMM_FLAG_GATED: u32 = 2;

/// A compiled form of gemm.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmVariant {
    /// f32 FFMA tiles, A and B of any dtypes.
    Ffma { a: DType, b: DType },
    /// `mma.sync` m16n8k16 bf16 (A, B bf16).
    MmaBf16,
    /// `mma.sync` m16n8k16 f16 (A, B f16).
    MmaF16,
    /// `mma.sync` m16n8k8 tf32 (A, B f32; only with `allow_tf32`).
    MmaTf32,
}

impl GemmVariant {
    /// Every variant `select` can return, on any device.
    pub(crate) fn all() -> Vec<GemmVariant> {
        let mut v = Vec::new();
        for a in DType::ALL {
            for b in DType::ALL {
                v.push(GemmVariant::Ffma { a, b });
            }
        }
        v.extend([
            GemmVariant::MmaBf16,
            GemmVariant::MmaF16,
            GemmVariant::MmaTf32,
        ]);
        v
    }

    pub(crate) fn select(a: DType, b: DType, allow_tf32: bool, has_mma: bool) -> GemmVariant {
        match (a, b) {
            (DType::BF16, DType::BF16) if has_mma => GemmVariant::MmaBf16,
            (DType::F16, DType::F16) if has_mma => GemmVariant::MmaF16,
            (DType::F32, DType::F32) if has_mma && allow_tf32 => GemmVariant::MmaTf32,
            _ => GemmVariant::Ffma { a, b },
        }
    }

    pub(crate) fn defines(self) -> Vec<(&'static str, u32)> {
        let (a, b, mma) = match self {
            GemmVariant::Ffma { a, b } => (a, b, 0),
            GemmVariant::MmaBf16 => (DType::BF16, DType::BF16, 1),
            GemmVariant::MmaF16 => (DType::F16, DType::F16, 2),
            GemmVariant::MmaTf32 => (DType::F32, DType::F32, 3),
        };
        vec![
            ("A_DT", dt_code(a)),
            ("B_DT", dt_code(b)),
            ("GEMM_MMA", mma),
        ]
    }

    /// (kernel name, block tile m, block tile n, block shape).
    fn geometry(self) -> (&'static str, usize, usize, (u32, u32, u32)) {
        match self {
            GemmVariant::Ffma { .. } => ("gemm_ffma", 64, 64, (16, 16, 1)),
            _ => ("gemm_mma", 128, 128, (256, 1, 1)),
        }
    }
}

/// Which `gemm_mma` the 16-bit tensor-core path uses: 1 (the default: plain loads) or 2
/// (`gemm_mma_v2`: cp.async pipeline + ldmatrix), from `RECFUSE_GEMM_MMA_VERSION`. Both stay
/// until an H200 run has raced them (docs/BENCHMARKS.md); the default follows that measurement.
fn mma_version() -> Result<u32> {
    static V: std::sync::OnceLock<std::result::Result<u32, String>> = std::sync::OnceLock::new();
    V.get_or_init(|| match std::env::var("RECFUSE_GEMM_MMA_VERSION") {
        Err(_) => Ok(1),
        Ok(v) if v == "1" || v.is_empty() => Ok(1),
        Ok(v) if v == "2" => Ok(2),
        Ok(v) => Err(v),
    })
    .clone()
    .map_err(|v| {
        Error::invalid(
            "gemm(cuda)",
            "RECFUSE_GEMM_MMA_VERSION",
            format!("{v:?} is not 1 or 2"),
        )
    })
}

/// Version 2 copies 16-byte chunks along k: both operands need k contiguous (A's column and
/// B's row stride 1) and every row to start 16-byte aligned (offsets and strides multiples of
/// 8 elements; allocations are 256-byte aligned). Other views keep version 1.
fn v2_applies(p: &Gemm<'_>) -> bool {
    let a = &p.a_view;
    let b = &p.b_view;
    let batch_ok = |bs: usize| p.batch <= 1 || bs % 8 == 0;
    a.col_stride == 1
        && b.row_stride == 1
        && a.offset % 8 == 0
        && a.row_stride % 8 == 0
        && batch_ok(a.batch_stride)
        && b.offset % 8 == 0
        && b.col_stride % 8 == 0
        && batch_ok(b.batch_stride)
}

pub(crate) fn gemm(
    d: &Arc<CudaDevice>,
    p: &Gemm<'_>,
    c: &mut Tensor,
    pre: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "gemm(cuda)";
    if p.m == 0 || p.n == 0 || p.batch == 0 {
        return Ok(());
    }
    // Re-checked here because the kernel's 32-bit index arithmetic depends on it, whoever the
    // caller is.
    p.check(OP, c, pre.as_deref())?;

    let variant = GemmVariant::select(p.a.dtype(), p.b.dtype(), p.allow_tf32, d.has_mma());
    let (kernel, tile_m, tile_n, block) = variant.geometry();
    let kernel = if matches!(variant, GemmVariant::MmaBf16 | GemmVariant::MmaF16)
        && mma_version()? == 2
        && v2_applies(p)
    {
        "gemm_mma_v2"
    } else {
        kernel
    };
    let geometry = Geometry {
        grid: (
            blocks_for(kernel, "m", p.m, tile_m)?,
            blocks_for(kernel, "n", p.n, tile_n)?,
            blocks_for(kernel, "batch", p.batch, 1)?,
        ),
        block,
        dyn_smem: 0,
    };

    let a = storage(OP, "a", d, p.a)?;
    let b = storage(OP, "b", d, p.b)?;
    let bias = match p.bias {
        Some((t, bs)) => Some((storage(OP, "bias", d, t)?, t.dtype(), bs)),
        None => None,
    };
    let residual = match p.residual {
        Some(t) => Some((storage(OP, "residual", d, t)?, t.dtype())),
        None => None,
    };
    let mul = match p.mul {
        Some(t) => Some((storage(OP, "mul", d, t)?, t.dtype())),
        None => None,
    };
    // Outputs per row: the gated epilogue folds each (cross, gate) column pair into one.
    let out_n = if p.gated { p.n / 2 } else { p.n };
    let mut flags = 0;
    if p.accumulate {
        flags |= GEMM_FLAG_ACCUMULATE;
    }
    if p.gated {
        flags |= GEMM_FLAG_GATED;
    }
    let c_dtype = c.dtype();
    let pre_dtype = pre.as_ref().map(|t| t.dtype());

    let mut params = GemmParams {
        m: u32_of(OP, "m", "m", p.m)?,
        n: u32_of(OP, "n", "n", p.n)?,
        k: u32_of(OP, "k", "k", p.k)?,
        batch: u32_of(OP, "batch", "batch", p.batch)?,
        a_view: view32(OP, "a", &p.a_view, p.batch, p.m, p.k)?,
        b_view: view32(OP, "b", &p.b_view, p.batch, p.k, p.n)?,
        c_view: view32(OP, "c", &p.c_view, p.batch, p.m, out_n)?,
        pre_view: if pre.is_some() {
            view32(OP, "pre", &p.pre_view, p.batch, p.m, p.n)?
        } else {
            [0; 4]
        },
        bias_bs: match bias {
            Some((_, _, bs)) => stride_of(OP, "bias", bs, p.batch)?,
            None => 0,
        },
        alpha: p.alpha,
        act: p.act.id(),
        flags,
        c_dt: dt_code(c_dtype),
        bias_dt: bias.map(|(_, dt, _)| dt_code(dt)).unwrap_or(0),
        res_dt: residual.map(|(_, dt)| dt_code(dt)).unwrap_or(0),
        pre_dt: pre_dtype.map(dt_code).unwrap_or(0),
        mul_dt: mul.map(|(_, dt)| dt_code(dt)).unwrap_or(0),
        ..Default::default()
    };

    let func = d.function("gemm.cu", &variant.defines(), kernel)?;
    let stream = d.stream.clone();
    let (pa, _ga) = ptr(a, &stream);
    let (pb, _gb) = ptr(b, &stream);
    params.a = pa;
    params.b = pb;
    let _gbias = bias.map(|(s, dt, _)| {
        let (ptr0, g) = ptr(s, &stream);
        // A run of weight sets starting past set 0: offset the base address (the kernel's
        // indices stay relative), bounds already checked by `Gemm::check`.
        params.bias = ptr0 + (p.bias_offset * dt.size()) as u64;
        g
    });
    let _gres = residual.map(|(s, _)| {
        let (p, g) = ptr(s, &stream);
        params.residual = p;
        g
    });
    let _gmul = mul.map(|(s, _)| {
        let (p, g) = ptr(s, &stream);
        params.mul = p;
        g
    });
    let _gpre = match pre {
        Some(t) => {
            let s = storage_mut(OP, "pre", d, t)?;
            let (p, g) = ptr_mut(s, &stream);
            params.pre = p;
            Some(g)
        }
        None => None,
    };
    let cs = storage_mut(OP, "c", d, c)?;
    let (pc, _gc) = ptr_mut(cs, &stream);
    params.c = pc;

    // SAFETY: `params` mirrors gemm.cu's GemmParams (size asserted on both sides). Every
    // address is a live allocation on this device, borrowed until this function returns and
    // freed only in stream order after the kernel. `p.check` proved every view's extent fits
    // its tensor (C, mul and residual over n/2 columns when gated, pre over n) and every tensor
    // has ≤ 2^31 − 1 elements, and that a gated n is even, so each index the kernel forms for
    // an in-range (g, i, j, k) is in bounds and exact in 32-bit arithmetic.
    unsafe {
        launch::launch(
            kernel,
            &stream,
            &func,
            &d.limits,
            geometry,
            &params,
            d.sync_check,
        )
    }
}

/// Mirrors `struct ActBackwardParams` in kernels/cuda/gemm_aux.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ActBackwardParams {
    dy: u64,
    pre: u64,
    dz: u64,
    n: u32,
    act: u32,
    dy_dt: u32,
    pre_dt: u32,
    dz_dt: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<ActBackwardParams>() == 48);
// SAFETY: #[repr(C)], integers only, no implicit padding (explicit `pad`), same layout as the
// CUDA struct (size asserted on both sides).
unsafe impl DeviceRepr for ActBackwardParams {}

pub(crate) fn act_backward(
    d: &Arc<CudaDevice>,
    dy: &Tensor,
    pre: Option<&Tensor>,
    act: Activation,
    dz: &mut Tensor,
) -> Result<()> {
    const OP: &str = "act_backward(cuda)";
    const KERNEL: &str = "act_backward";
    let n = dy.numel();
    if n == 0 {
        return Ok(());
    }
    if dz.numel() != n {
        return Err(Error::shape(
            OP,
            "dz",
            format!("{n} elements like dy"),
            dz.shape(),
        ));
    }
    if let Some(p) = pre {
        if p.numel() != n {
            return Err(Error::shape(
                OP,
                "pre",
                format!("{n} elements like dy"),
                p.shape(),
            ));
        }
    }
    let pre = if act == Activation::None { None } else { pre };
    if act != Activation::None && pre.is_none() {
        return Err(Error::invalid(
            OP,
            "pre",
            format!("activation {} needs the pre-activation", act.name()),
        ));
    }
    let mut params = ActBackwardParams {
        n: u32_of(OP, "dy", "element count", n)?,
        act: act.id(),
        dy_dt: dt_code(dy.dtype()),
        pre_dt: pre.map(|t| dt_code(t.dtype())).unwrap_or(0),
        dz_dt: dt_code(dz.dtype()),
        ..Default::default()
    };
    // Grid-stride: enough blocks to fill the device several times over; the stride stays far
    // below 2^31, so the kernel's `i += stride` cannot wrap.
    let blocks = blocks_for(KERNEL, "n", n, 256)?.min(d.limits.sm_count.max(1) * 32);
    let geometry = Geometry {
        grid: (blocks, 1, 1),
        block: (256, 1, 1),
        dyn_smem: 0,
    };
    let func = d.function("gemm_aux.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let sdy = storage(OP, "dy", d, dy)?;
    let (pdy, _gdy) = ptr(sdy, &stream);
    params.dy = pdy;
    let _gpre = match pre {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "pre", d, t)?, &stream);
            params.pre = p;
            Some(g)
        }
        None => None,
    };
    let sdz = storage_mut(OP, "dz", d, dz)?;
    let (pdz, _gdz) = ptr_mut(sdz, &stream);
    params.dz = pdz;
    // SAFETY: `params` mirrors ActBackwardParams in gemm_aux.cu; dy, pre and dz each hold at
    // least n elements of their dtypes (checked above), and the kernel indexes only i < n.
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

/// Mirrors `struct ColSumParams` in kernels/cuda/gemm_aux.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ColSumParams {
    x: u64,
    out: u64,
    ws: u64,
    rows: u32,
    cols: u32,
    splits: u32,
    rows_per_split: u32,
    x_dt: u32,
    out_dt: u32,
    accumulate: u32,
    skip_odd: u32,
}
const _: () = assert!(std::mem::size_of::<ColSumParams>() == 56);
// SAFETY: #[repr(C)], integers only, no implicit padding, same layout as the CUDA struct.
unsafe impl DeviceRepr for ColSumParams {}

/// Row splits for `col_sum`: a function of (rows, cols) only, so the summation order, and
/// hence every bit of the result, is the same on every run and every GPU.
pub(crate) fn col_sum_splits(rows: usize, cols: usize) -> (usize, usize) {
    let strips = cols.div_ceil(32).max(1);
    let splits = rows
        .div_ceil(256)
        .min((1024 / strips).max(1))
        .clamp(1, 1024);
    let rows_per_split = rows.div_ceil(splits);
    (splits, rows_per_split)
}

pub(crate) fn col_sum(
    d: &Arc<CudaDevice>,
    x: &Tensor,
    rows: usize,
    cols: usize,
    out: &mut Tensor,
    accumulate: bool,
    skip_odd: bool,
) -> Result<()> {
    const OP: &str = "col_sum(cuda)";
    if cols == 0 {
        return Ok(());
    }
    let need = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid(OP, "x", format!("{rows} × {cols} overflows")))?;
    if x.numel() < need {
        return Err(Error::shape(
            OP,
            "x",
            format!("at least {rows} × {cols} elements"),
            x.shape(),
        ));
    }
    if out.numel() < cols {
        return Err(Error::shape(
            OP,
            "out",
            format!("at least {cols} elements"),
            out.shape(),
        ));
    }
    u32_of(OP, "x", "element count", need)?;
    let (splits, rows_per_split) = col_sum_splits(rows, cols);
    let mut params = ColSumParams {
        rows: u32_of(OP, "x", "rows", rows)?,
        cols: u32_of(OP, "x", "cols", cols)?,
        splits: splits as u32,
        rows_per_split: u32_of(OP, "x", "rows per split", rows_per_split)?,
        x_dt: dt_code(x.dtype()),
        out_dt: dt_code(out.dtype()),
        accumulate: accumulate as u32,
        skip_odd: skip_odd as u32,
        ..Default::default()
    };
    let partial = d.function("gemm_aux.cu", &[], "col_sum_partial")?;
    let finish = d.function("gemm_aux.cu", &[], "col_sum_finish")?;
    let stream = d.stream.clone();
    // f32 partial sums [splits, cols]; splits·cols ≤ 1024·32·⌈cols/32⌉/⌈cols/32⌉ stays small.
    let mut ws =
        if splits > 1 {
            let n = splits * cols;
            u32_of(OP, "x", "workspace size", n)?;
            // SAFETY: uninitialised, but col_sum_partial writes every [s, j] (s < splits, j < cols)
            // before col_sum_finish, queued after it on the same stream, reads any.
            Some(unsafe { stream.alloc::<f32>(n) }.map_err(|e| {
                backend_err(&format!("allocating the col_sum workspace ({n} f32)"), e)
            })?)
        } else {
            None
        };
    let sx = storage(OP, "x", d, x)?;
    let (px, _gx) = ptr(sx, &stream);
    params.x = px;
    let sout = storage_mut(OP, "out", d, out)?;
    let (pout, _gout) = ptr_mut(sout, &stream);
    params.out = pout;
    let _gws = ws.as_mut().map(|w| {
        let (p, g) = w.device_ptr_mut(&stream);
        params.ws = p;
        g
    });
    let strips = blocks_for("col_sum_partial", "cols", cols, 32)?;
    // SAFETY: `params` mirrors ColSumParams; x holds rows·cols elements and out ≥ cols
    // elements (checked above), the workspace holds splits·cols f32; the kernels index only
    // rows < rows, j < cols, s < splits.
    unsafe {
        launch::launch(
            "col_sum_partial",
            &stream,
            &partial,
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
                "col_sum_finish",
                &stream,
                &finish,
                &d.limits,
                Geometry {
                    grid: (blocks_for("col_sum_finish", "cols", cols, 256)?, 1, 1),
                    block: (256, 1, 1),
                    dyn_smem: 0,
                },
                &params,
                d.sync_check,
            )?;
        }
    }
    // `ws` is freed here with cuMemFreeAsync on the same stream, i.e. after both kernels.
    Ok(())
}

/// Grid-stride geometry for the element-wise kernels: 256 threads per block, enough blocks to
/// fill the device several times over. The grid stride stays far below 2^31, so a kernel's
/// `k += stride` over k < n ≤ 2^31 − 1 cannot wrap.
fn elementwise_geometry(d: &CudaDevice, kernel: &str, n: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (
            blocks_for(kernel, "n", n, 256)?.min(d.limits.sm_count.max(1) * 32),
            1,
            1,
        ),
        block: (256, 1, 1),
        dyn_smem: 0,
    })
}

/// Mirrors `struct GateBackwardParams` in kernels/cuda/gated_cross.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GateBackwardParams {
    gbar: u64,
    c0: u64,
    pre: u64,
    delta: u64,
    dx0: u64,
    n: u32,
    gated: u32,
    gbar_dt: u32,
    c0_dt: u32,
    pre_dt: u32,
    delta_dt: u32,
    dx0_dt: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<GateBackwardParams>() == 72);
// SAFETY: #[repr(C)], integers only, no implicit padding (explicit `pad`), same layout as the
// CUDA struct (size asserted on both sides).
unsafe impl DeviceRepr for GateBackwardParams {}

/// See `ops::backend::gate_backward`: `gbar`, `c0`, `dx0` hold rows·D elements, `pre` and
/// `delta` P·rows (P = 2D gated, else D); `dx0` is accumulated.
pub(crate) fn gate_backward(
    d: &Arc<CudaDevice>,
    gbar: &Tensor,
    c0: &Tensor,
    pre: &Tensor,
    gated: bool,
    delta: &mut Tensor,
    dx0: &mut Tensor,
) -> Result<()> {
    const OP: &str = "gate_backward(cuda)";
    const KERNEL: &str = "gate_backward";
    let n = gbar.numel();
    if n == 0 {
        return Ok(());
    }
    let pairs = if gated { 2 } else { 1 };
    // Every index the kernel forms (up to pairs·n − 1) must fit its 32-bit arithmetic.
    let np = n
        .checked_mul(pairs)
        .filter(|&np| np <= MAX_INDEX_32)
        .ok_or_else(|| {
            Error::invalid(
                OP,
                "pre",
                format!("{pairs}·{n} elements exceed the 32-bit index limit {MAX_INDEX_32}"),
            )
        })?;
    let like = |arg: &'static str, t: &Tensor, want: usize| -> Result<()> {
        if t.numel() != want {
            return Err(Error::shape(OP, arg, format!("{want} elements"), t.shape()));
        }
        Ok(())
    };
    like("c0", c0, n)?;
    like("dx0", dx0, n)?;
    like("pre", pre, np)?;
    like("delta", delta, np)?;
    let mut params = GateBackwardParams {
        n: n as u32,
        gated: gated as u32,
        gbar_dt: dt_code(gbar.dtype()),
        c0_dt: dt_code(c0.dtype()),
        pre_dt: dt_code(pre.dtype()),
        delta_dt: dt_code(delta.dtype()),
        dx0_dt: dt_code(dx0.dtype()),
        ..Default::default()
    };
    let geometry = elementwise_geometry(d, KERNEL, n)?;
    let func = d.function("gated_cross.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let (pg, _gg) = ptr(storage(OP, "gbar", d, gbar)?, &stream);
    let (pc, _gc) = ptr(storage(OP, "c0", d, c0)?, &stream);
    let (pp, _gp) = ptr(storage(OP, "pre", d, pre)?, &stream);
    params.gbar = pg;
    params.c0 = pc;
    params.pre = pp;
    let (pd, _gd) = ptr_mut(storage_mut(OP, "delta", d, delta)?, &stream);
    params.delta = pd;
    let (px, _gx) = ptr_mut(storage_mut(OP, "dx0", d, dx0)?, &stream);
    params.dx0 = px;
    // SAFETY: `params` mirrors GateBackwardParams in gated_cross.cu (size asserted on both
    // sides). gbar, c0 and dx0 hold exactly n elements and pre and delta exactly pairs·n of their
    // dtypes (checked above, pairs·n ≤ 2^31 − 1); the kernel reads and writes only k < n and
    // pairs·k + {0, 1} < pairs·n. delta and dx0 are distinct exclusive borrows, so no input
    // aliases an output. Every allocation outlives the kernel in stream order.
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

/// Mirrors `struct AddParams` in kernels/cuda/gated_cross.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AddParams {
    a: u64,
    b: u64,
    out: u64,
    n: u32,
    a_dt: u32,
    b_dt: u32,
    out_dt: u32,
}
const _: () = assert!(std::mem::size_of::<AddParams>() == 40);
// SAFETY: #[repr(C)], integers only, no padding (3·8 + 4·4 = 40), same layout as the CUDA
// struct (size asserted on both sides).
unsafe impl DeviceRepr for AddParams {}

/// out = a (+ b), element-wise over equal sizes, any dtypes (also a plain cast).
pub(crate) fn add(
    d: &Arc<CudaDevice>,
    a: &Tensor,
    b: Option<&Tensor>,
    out: &mut Tensor,
) -> Result<()> {
    const OP: &str = "add(cuda)";
    const KERNEL: &str = "elementwise_add";
    let n = a.numel();
    if n == 0 {
        return Ok(());
    }
    for (arg, t) in [("b", b), ("out", Some(&*out))] {
        if let Some(t) = t {
            if t.numel() != n {
                return Err(Error::shape(
                    OP,
                    arg,
                    format!("{n} elements like a"),
                    t.shape(),
                ));
            }
        }
    }
    let mut params = AddParams {
        n: u32_of(OP, "a", "element count", n)?,
        a_dt: dt_code(a.dtype()),
        b_dt: b.map(|t| dt_code(t.dtype())).unwrap_or(0),
        out_dt: dt_code(out.dtype()),
        ..Default::default()
    };
    let geometry = elementwise_geometry(d, KERNEL, n)?;
    let func = d.function("gated_cross.cu", &[], KERNEL)?;
    let stream = d.stream.clone();
    let (pa, _ga) = ptr(storage(OP, "a", d, a)?, &stream);
    params.a = pa;
    let _gb = match b {
        Some(t) => {
            let (p, g) = ptr(storage(OP, "b", d, t)?, &stream);
            params.b = p;
            Some(g)
        }
        None => None,
    };
    let (po, _go) = ptr_mut(storage_mut(OP, "out", d, out)?, &stream);
    params.out = po;
    // SAFETY: `params` mirrors AddParams in gated_cross.cu (size asserted on both sides); a, b
    // and out each hold exactly n ≤ 2^31 − 1 elements of their dtypes (checked above) and the
    // kernel touches only k < n; out is an exclusive borrow, so it aliases neither input. Every
    // allocation outlives the kernel in stream order.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The FFMA kernel with mixed operand dtypes (every A × B pair the selector can return),
    /// through the GEMM seam on a CUDA device, against an f64 product of the values the
    /// operands hold; transposed B view, ragged shape. Skipped loudly without a CUDA device
    /// (a failure when RECFUSE_REQUIRE lists cuda).
    #[test]
    fn mixed_operand_dtypes_on_the_device() {
        use crate::ops::gemm::{Gemm, MatView};
        use crate::{Device, Tensor};
        let dev = match Device::cuda(0) {
            Ok(d) => d,
            Err(e) => {
                let require = std::env::var("RECFUSE_REQUIRE").unwrap_or_default();
                assert!(
                    !require.split(',').any(|t| t == "cuda"),
                    "no CUDA device: {e}"
                );
                eprintln!("SKIPPED: mixed_operand_dtypes_on_the_device: {e}");
                return;
            }
        };
        let (m, n, k) = (37usize, 29usize, 45usize);
        let vals = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0
                })
                .collect()
        };
        for a_dt in DType::ALL {
            for b_dt in DType::ALL {
                let a = Tensor::from_f32(&vals(m * k, 7), &[m, k], a_dt, &dev).unwrap();
                // B stored [n, k] and read as its transpose (the x·Wᵀ layout).
                let b = Tensor::from_f32(&vals(n * k, 11), &[n, k], b_dt, &dev).unwrap();
                let av = a.to_f64_vec().unwrap();
                let bv = b.to_f64_vec().unwrap();
                let g = Gemm::plain(
                    m,
                    n,
                    k,
                    &a,
                    MatView::new(0, k, 1, 0),
                    &b,
                    MatView::new(0, 1, k, 0),
                );
                let mut c = Tensor::poisoned(&[m, n], DType::F32, &dev).unwrap();
                crate::ops::backend::gemm(&dev, &g, &mut c, None).unwrap();
                let got = c.to_f64_vec().unwrap();
                let mut worst = 0.0f64;
                let mut scale = 0.0f64;
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|l| av[i * k + l] * bv[j * k + l]).sum();
                        scale = scale.max(want.abs());
                        worst = worst.max((got[i * n + j] - want).abs());
                    }
                }
                assert!(
                    worst.is_finite() && worst <= 1e-5 * scale.max(1.0),
                    "A {a_dt} × B {b_dt}: max error {worst:e} (scale {scale:e})"
                );
            }
        }
    }

    #[test]
    fn variant_selection() {
        use DType::*;
        assert_eq!(
            GemmVariant::select(BF16, BF16, false, true),
            GemmVariant::MmaBf16
        );
        assert_eq!(
            GemmVariant::select(F16, F16, false, true),
            GemmVariant::MmaF16
        );
        assert_eq!(
            GemmVariant::select(F32, F32, true, true),
            GemmVariant::MmaTf32
        );
        assert_eq!(
            GemmVariant::select(F32, F32, false, true),
            GemmVariant::Ffma { a: F32, b: F32 }
        );
        assert_eq!(
            GemmVariant::select(BF16, F16, true, true),
            GemmVariant::Ffma { a: BF16, b: F16 }
        );
        assert_eq!(
            GemmVariant::select(BF16, BF16, false, false),
            GemmVariant::Ffma { a: BF16, b: BF16 }
        );
        // Every selectable variant is in the compile-check list.
        let all = GemmVariant::all();
        for a in DType::ALL {
            for b in DType::ALL {
                for tf32 in [false, true] {
                    for mma in [false, true] {
                        assert!(all.contains(&GemmVariant::select(a, b, tf32, mma)));
                    }
                }
            }
        }
    }

    #[test]
    fn col_sum_splits_cover_all_rows() {
        for (rows, cols) in [
            (0, 1),
            (1, 1),
            (255, 7),
            (256, 7),
            (257, 7),
            (65536, 256),
            (1 << 20, 1),
            (1823, 1 << 16),
        ] {
            let (s, rps) = col_sum_splits(rows, cols);
            assert!((1..=1024).contains(&s));
            assert!(s * rps >= rows, "{rows} {cols}");
            assert!(
                s == 1 || s * cols <= 1024 * 32,
                "workspace too big for {rows} {cols}"
            );
        }
    }

    #[test]
    fn stride_of_extent_one_is_zero() {
        assert_eq!(stride_of("op", "a", usize::MAX, 1).ok(), Some(0));
        assert!(stride_of("op", "a", usize::MAX, 2).is_err());
        assert_eq!(
            view32("op", "a", &MatView::new(7, 3, 1, 99), 1, 2, 3).ok(),
            Some([7, 3, 1, 0])
        );
    }
}
