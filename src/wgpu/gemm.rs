//! Launchers for the GEMM core (`kernels/wgsl/gemm.wgsl`), the passes around it
//! (`kernels/wgsl/elementwise.wgsl`) and the cross layers' elementwise backward
//! (`kernels/wgsl/gated_cross.wgsl`): argument checks, u32 packing of views, variant selection.

use std::sync::Arc;

use super::pipelines::{Binding, Kernel, Launch, ELEMENTWISE_WGSL, GATED_CROSS_WGSL, GEMM_WGSL};
use super::{WgpuDevice, WgpuStorage, BACKEND};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::gemm::{Activation, Gemm, MatView, MAX_INDEX_32};
use crate::tensor::{Storage, Tensor};

/// The tile geometry documented in gemm.wgsl (and mirrored by the CUDA kernel).
const WG_X: u32 = 16;
const WG_Y: u32 = 16;
const BK: u32 = 16;
const BM: u32 = 4 * WG_Y;
const BN: u32 = 4 * WG_X;
const PAD: u32 = 4;
/// Threads per workgroup of the elementwise kernels (fixed in elementwise.wgsl).
pub(super) const EW_THREADS: u32 = 256;

use Binding::{Read as R, ReadWrite as RW, Uniform as U};

const GEMM: Kernel = Kernel {
    shader: GEMM_WGSL,
    entry: "gemm_main",
    bindings: &[U, R, R, R, R, R, RW, RW],
};
const PACK: Kernel = Kernel {
    shader: ELEMENTWISE_WGSL,
    entry: "pack_main",
    bindings: &[U, R, RW],
};
const ACT_BACKWARD: Kernel = Kernel {
    shader: ELEMENTWISE_WGSL,
    entry: "act_backward_main",
    bindings: &[U, R, R, RW],
};
const COL_SUM: Kernel = Kernel {
    shader: ELEMENTWISE_WGSL,
    entry: "col_sum_main",
    bindings: &[U, R, RW],
};
const GATE_BACKWARD: Kernel = Kernel {
    shader: GATED_CROSS_WGSL,
    entry: "gate_backward_main",
    bindings: &[U, R, R, R, RW, RW],
};
const ADD: Kernel = Kernel {
    shader: GATED_CROSS_WGSL,
    entry: "add_main",
    bindings: &[U, R, R, RW],
};

pub(super) fn dtype_code(d: DType) -> f64 {
    match d {
        DType::F32 => 0.0,
        DType::BF16 => 1.0,
        DType::F16 => 2.0,
    }
}

pub(super) fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The wgpu storage of `t`, which must live on `dev`.
pub(super) fn storage<'a>(
    op: &'static str,
    arg: &'static str,
    dev: &Arc<WgpuDevice>,
    t: &'a Tensor,
) -> Result<&'a WgpuStorage> {
    match &t.storage {
        Storage::Wgpu(s) if Arc::ptr_eq(&s.device, dev) => Ok(s),
        _ => Err(Error::DeviceMismatch {
            op,
            arg,
            expected: dev.describe(),
            actual: t.device().describe(),
        }),
    }
}

pub(super) fn to_u32(op: &'static str, arg: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::invalid(
            op,
            arg,
            format!("{what} = {v} does not fit the kernels' 32-bit index arithmetic"),
        )
    })
}

pub(super) fn fits_index(op: &'static str, arg: &'static str, n: usize) -> Result<()> {
    if n > MAX_INDEX_32 {
        return Err(Error::invalid(
            op,
            arg,
            format!("{n} elements exceed the 32-bit index limit {MAX_INDEX_32}"),
        ));
    }
    Ok(())
}

/// `[offset, row_stride, col_stride, batch_stride]` as u32. The stride of an axis of size 1 is
/// never multiplied by anything but 0, so it is zeroed rather than rejected when large.
fn view_words(
    op: &'static str,
    arg: &'static str,
    v: &MatView,
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<[u32; 4]> {
    let keep = |stride: usize, size: usize| if size > 1 { stride } else { 0 };
    Ok([
        to_u32(op, arg, "offset", v.offset)?,
        to_u32(op, arg, "row stride", keep(v.row_stride, rows))?,
        to_u32(op, arg, "column stride", keep(v.col_stride, cols))?,
        to_u32(op, arg, "batch stride", keep(v.batch_stride, batch))?,
    ])
}

/// The uniform block of `pack_main`: a `[b, m, n]` view as three (stride, size, compact stride)
/// axes, largest stride first. The shader decodes an element index greedily, which is exact
/// only when the axes nest (each stride exceeds the span of all smaller ones); anything else is
/// refused here.
fn pack_uniform(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    v: &MatView,
    (b, m, n): (usize, usize, usize),
) -> Result<Vec<u32>> {
    let mut axes: Vec<(usize, usize, usize)> = [
        (v.batch_stride, b, m * n),
        (v.row_stride, m, n),
        (v.col_stride, n, 1),
    ]
    .into_iter()
    .filter(|a| a.1 > 1)
    .collect();
    axes.sort_by_key(|a| std::cmp::Reverse(a.0));
    let interleaved = || Error::Unsupported {
        op: "gemm",
        backend: BACKEND,
        what: format!(
            "a {} `{arg}` whose view (strides row {}, col {}, batch {}) interleaves its axes",
            t.dtype(),
            v.row_stride,
            v.col_stride,
            v.batch_stride
        ),
    };
    // Nesting is exactly `MatView::is_injective`'s test (each stride past the smaller spans).
    if !v.is_injective(b, m, n) {
        return Err(interleaved());
    }
    let numel = t.numel();
    let nwords = if t.dtype() == DType::F32 {
        numel
    } else {
        numel.div_ceil(2)
    };
    let mut u = vec![
        to_u32(op, arg, "elements", numel)?,
        to_u32(op, arg, "words", nwords)?,
        to_u32(op, arg, "offset", v.offset)?,
        0,
    ];
    for i in 0..3 {
        let (s, size, q) = axes.get(i).copied().unwrap_or((0, 1, 0));
        u.extend([
            to_u32(op, arg, "stride", s)?,
            to_u32(op, arg, "size", size)?,
            to_u32(op, arg, "compact stride", q)?,
            0,
        ]);
    }
    Ok(u)
}

/// Rounds the compact `[b, m, n]` f32 scratch `src` into the view `v` of `dst` (adding its old
/// values when `accumulate`).
#[allow(clippy::too_many_arguments)]
fn pack_launch<'a>(
    op: &'static str,
    arg: &'static str,
    dst: &Tensor,
    dst_s: &'a WgpuStorage,
    src: &'a wgpu::Buffer,
    v: &MatView,
    dims: (usize, usize, usize),
    accumulate: bool,
) -> Result<Launch<'a>> {
    let uniform = pack_uniform(op, arg, dst, v, dims)?;
    let words = u64::from(uniform[1]);
    Ok(Launch {
        kernel: PACK,
        constants: vec![
            ("DT_DST", dtype_code(dst.dtype())),
            ("ACCUMULATE", flag(accumulate)),
        ],
        uniform,
        buffers: vec![src, &dst_s.buffer],
        grid: [words.div_ceil(u64::from(EW_THREADS)), 1, 1],
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    })
}

/// The whole GEMM + epilogue: one `gemm_main` dispatch, plus a `pack_main` pass for each of C
/// and pre that is 16-bit (see gemm.wgsl for why 16-bit outputs go through f32 scratch).
pub(crate) fn gemm(
    d: &Arc<WgpuDevice>,
    p: &Gemm<'_>,
    c: &mut Tensor,
    pre: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "gemm(wgpu)";
    let c: &Tensor = c;
    let pre: Option<&Tensor> = pre.map(|t| &*t);
    if p.gated && (p.n % 2 != 0 || p.act != Activation::None) {
        return Err(Error::invalid(
            OP,
            "gated",
            format!(
                "needs an even n (got {}) and no activation (got {})",
                p.n,
                p.act.name()
            ),
        ));
    }
    let a_s = storage(OP, "a", d, p.a)?;
    let b_s = storage(OP, "b", d, p.b)?;
    let c_s = storage(OP, "c", d, c)?;
    let bias_s = match p.bias {
        Some((t, _)) => Some(storage(OP, "bias", d, t)?),
        None => None,
    };
    let res_s = match p.residual {
        Some(t) => Some(storage(OP, "residual", d, t)?),
        None => None,
    };
    let mul_s = match p.mul {
        Some(t) => Some(storage(OP, "mul", d, t)?),
        None => None,
    };
    let pre_s = match pre {
        Some(t) => Some(storage(OP, "pre", d, t)?),
        None => None,
    };

    let (m, n, k, batch) = (p.m, p.n, p.k, p.batch);
    // Columns of C (and of mul and residual): the gated epilogue folds each pair into one.
    let n_out = if p.gated { n / 2 } else { n };
    let outputs = batch
        .checked_mul(m)
        .and_then(|x| x.checked_mul(n))
        .ok_or_else(|| Error::invalid(OP, "c", "batch·m·n overflows usize"))?;
    fits_index(OP, "c", outputs)?;
    let a_w = view_words(OP, "a", &p.a_view, batch, m, k)?;
    let b_w = view_words(OP, "b", &p.b_view, batch, k, n)?;
    let c_w = view_words(OP, "c", &p.c_view, batch, m, n_out)?;
    let bias_bs = match p.bias {
        Some((_, bs)) if batch > 1 => to_u32(OP, "bias", "batch stride", bs)?,
        _ => 0,
    };
    let tiles_n = n.div_ceil(BN as usize);
    let tiles_m = m.div_ceil(BM as usize);

    // An f32 C or pre is written in place; a 16-bit one goes through compact f32 scratch.
    let c_direct = c.dtype() == DType::F32;
    let pre_direct = pre.is_none_or(|t| t.dtype() == DType::F32);
    let compact = |cols: usize| MatView::new(0, cols, 1, m * cols);
    let c_scratch = if c_direct {
        None
    } else {
        Some(d.pool.take(d, (batch * m * n_out) as u64 * 4)?)
    };
    // (On an error below, scratch buffers are dropped rather than returned to the pool.)
    let pre_scratch = if pre_direct {
        None
    } else {
        Some(d.pool.take(d, outputs as u64 * 4)?)
    };
    let (c_out, o_w) = match &c_scratch {
        None => (&c_s.buffer, c_w),
        Some(buf) => (buf, view_words(OP, "c", &compact(n_out), batch, m, n_out)?),
    };
    let (pre_out, q_w) = match (&pre_scratch, pre_s) {
        (Some(buf), _) => (buf, view_words(OP, "pre", &compact(n), batch, m, n)?),
        (None, Some(s)) => (&s.buffer, view_words(OP, "pre", &p.pre_view, batch, m, n)?),
        (None, None) => (&d.dummy_rw, [0; 4]),
    };

    let mut uniform = vec![
        to_u32(OP, "c", "m", m)?,
        to_u32(OP, "c", "n", n)?,
        to_u32(OP, "a", "k", k)?,
        to_u32(OP, "c", "batch", batch)?,
    ];
    uniform.extend(a_w);
    uniform.extend(b_w);
    uniform.extend(c_w);
    uniform.extend(o_w);
    uniform.extend(q_w);
    uniform.extend([
        bias_bs,
        p.alpha.to_bits(),
        to_u32(OP, "c", "column tiles", tiles_n)?,
        to_u32(OP, "c", "row tiles", tiles_m)?,
        to_u32(OP, "bias", "offset", p.bias_offset)?,
    ]);

    let dt_or_f32 = |t: Option<&Tensor>| dtype_code(t.map_or(DType::F32, |t| t.dtype()));
    let constants = vec![
        ("WG_X", f64::from(WG_X)),
        ("WG_Y", f64::from(WG_Y)),
        ("BK", f64::from(BK)),
        ("DT_A", dtype_code(p.a.dtype())),
        ("DT_B", dtype_code(p.b.dtype())),
        ("DT_BIAS", dt_or_f32(p.bias.map(|b| b.0))),
        ("DT_RES", dt_or_f32(p.residual)),
        ("DT_MUL", dt_or_f32(p.mul)),
        ("ACT", f64::from(p.act.id())),
        ("HAS_BIAS", flag(p.bias.is_some())),
        ("HAS_RES", flag(p.residual.is_some())),
        ("HAS_MUL", flag(p.mul.is_some())),
        ("HAS_PRE", flag(pre.is_some())),
        ("ACCUMULATE", flag(c_direct && p.accumulate)),
        ("GATED", flag(p.gated)),
    ];
    let mut launches = vec![Launch {
        kernel: GEMM,
        constants,
        uniform,
        buffers: vec![
            &a_s.buffer,
            &b_s.buffer,
            bias_s.map_or(&d.dummy_ro, |s| &s.buffer),
            res_s.map_or(&d.dummy_ro, |s| &s.buffer),
            mul_s.map_or(&d.dummy_ro, |s| &s.buffer),
            c_out,
            pre_out,
        ],
        grid: [tiles_n as u64, tiles_m as u64, batch as u64],
        workgroup: [WG_X, WG_Y, 1],
        workgroup_bytes: 4 * u64::from(BK * (BM + PAD) + BK * (BN + PAD)),
    }];
    if let Some(src) = &c_scratch {
        let dims = (batch, m, n_out);
        let l = pack_launch(OP, "c", c, c_s, src, &p.c_view, dims, p.accumulate)?;
        launches.push(l);
    }
    if let (Some(t), Some(s), Some(src)) = (pre, pre_s, &pre_scratch) {
        let dims = (batch, m, n);
        launches.push(pack_launch(OP, "pre", t, s, src, &p.pre_view, dims, false)?);
    }
    let result = d.run(&launches);
    drop(launches);
    for b in c_scratch.into_iter().chain(pre_scratch) {
        d.pool.give(b);
    }
    result
}

/// dz = dy ⊙ act'(pre) elementwise (pre is None for `Activation::None`).
pub(crate) fn act_backward(
    d: &Arc<WgpuDevice>,
    dy: &Tensor,
    pre: Option<&Tensor>,
    act: Activation,
    dz: &mut Tensor,
) -> Result<()> {
    const OP: &str = "act_backward(wgpu)";
    let numel = dy.numel();
    fits_index(OP, "dy", numel)?;
    if dz.numel() != numel {
        return Err(Error::shape(
            OP,
            "dz",
            format!("{numel} elements like dy"),
            dz.shape(),
        ));
    }
    if let Some(p) = pre {
        if p.numel() != numel {
            return Err(Error::shape(
                OP,
                "pre",
                format!("{numel} elements like dy"),
                p.shape(),
            ));
        }
    }
    let dy_s = storage(OP, "dy", d, dy)?;
    let pre_s = match pre {
        Some(t) => Some(storage(OP, "pre", d, t)?),
        None => None,
    };
    let dz_s = storage(OP, "dz", d, dz)?;
    let nwords = if dz.dtype() == DType::F32 {
        numel
    } else {
        numel.div_ceil(2)
    };
    let launch = Launch {
        kernel: ACT_BACKWARD,
        constants: vec![
            ("DT_DY", dtype_code(dy.dtype())),
            ("DT_PRE", dtype_code(pre.map_or(DType::F32, |t| t.dtype()))),
            ("DT_DST", dtype_code(dz.dtype())),
            ("ACT", f64::from(act.id())),
            ("HAS_PRE", flag(pre.is_some() && act != Activation::None)),
        ],
        uniform: vec![
            to_u32(OP, "dy", "elements", numel)?,
            to_u32(OP, "dz", "words", nwords)?,
        ],
        buffers: vec![
            &dy_s.buffer,
            pre_s.map_or(&d.dummy_ro, |s| &s.buffer),
            &dz_s.buffer,
        ],
        grid: [(nwords as u64).div_ceil(u64::from(EW_THREADS)), 1, 1],
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}

/// out[j] (+)= Σ_i x[i·cols + j], one thread per output word looping rows in order.
pub(crate) fn col_sum(
    d: &Arc<WgpuDevice>,
    x: &Tensor,
    rows: usize,
    cols: usize,
    out: &mut Tensor,
    accumulate: bool,
    skip_odd: bool,
) -> Result<()> {
    const OP: &str = "col_sum(wgpu)";
    let needed = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid(OP, "x", "rows·cols overflows usize"))?;
    if needed > x.numel() {
        return Err(Error::invalid(
            OP,
            "x",
            format!("{rows}×{cols} elements needed, tensor has {}", x.numel()),
        ));
    }
    if cols > out.numel() {
        return Err(Error::invalid(
            OP,
            "out",
            format!("{cols} columns, tensor has {} elements", out.numel()),
        ));
    }
    fits_index(OP, "x", x.numel())?;
    let x_s = storage(OP, "x", d, x)?;
    let out_s = storage(OP, "out", d, out)?;
    let nwords = if out.dtype() == DType::F32 {
        cols
    } else {
        cols.div_ceil(2)
    };
    let launch = Launch {
        kernel: COL_SUM,
        constants: vec![
            ("DT_X", dtype_code(x.dtype())),
            ("DT_DST", dtype_code(out.dtype())),
            ("ACCUMULATE", flag(accumulate)),
            ("SKIP_ODD", flag(skip_odd)),
        ],
        uniform: vec![
            to_u32(OP, "x", "rows", rows)?,
            to_u32(OP, "x", "cols", cols)?,
            to_u32(OP, "out", "words", nwords)?,
        ],
        buffers: vec![&x_s.buffer, &out_s.buffer],
        grid: [(nwords as u64).div_ceil(u64::from(EW_THREADS)), 1, 1],
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}

/// Words of a tensor of `numel` elements of dtype `dt` (two 16-bit elements per word).
pub(super) fn words(dt: DType, numel: usize) -> usize {
    if dt == DType::F32 {
        numel
    } else {
        numel.div_ceil(2)
    }
}

/// Checks that `t` has `want` elements.
fn numel_is(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    want: usize,
    like: &str,
) -> Result<()> {
    if t.numel() != want {
        return Err(Error::shape(
            op,
            arg,
            format!("{want} elements ({like})"),
            t.shape(),
        ));
    }
    Ok(())
}

/// The cross layers' elementwise backward (see `ops::backend::gate_backward`): one
/// `gate_backward_main` dispatch, one thread per pair of `[rows, D]` elements.
pub(crate) fn gate_backward(
    d: &Arc<WgpuDevice>,
    gbar: &Tensor,
    c0: &Tensor,
    pre: &Tensor,
    gated: bool,
    delta: &mut Tensor,
    dx0: &mut Tensor,
) -> Result<()> {
    const OP: &str = "gate_backward(wgpu)";
    let numel = gbar.numel();
    let p_numel = if gated {
        numel
            .checked_mul(2)
            .ok_or_else(|| Error::invalid(OP, "pre", "2·numel overflows usize"))?
    } else {
        numel
    };
    numel_is(OP, "c0", c0, numel, "like gbar")?;
    numel_is(OP, "dx0", dx0, numel, "like gbar")?;
    let like = if gated { "twice gbar" } else { "like gbar" };
    numel_is(OP, "pre", pre, p_numel, like)?;
    numel_is(OP, "delta", delta, p_numel, like)?;
    fits_index(OP, "pre", p_numel)?;
    let g_s = storage(OP, "gbar", d, gbar)?;
    let c0_s = storage(OP, "c0", d, c0)?;
    let pre_s = storage(OP, "pre", d, pre)?;
    let delta_s = storage(OP, "delta", d, delta)?;
    let dx0_s = storage(OP, "dx0", d, dx0)?;
    let pairs = numel.div_ceil(2);
    let launch = Launch {
        kernel: GATE_BACKWARD,
        constants: vec![
            ("DT_G", dtype_code(gbar.dtype())),
            ("DT_C0", dtype_code(c0.dtype())),
            ("DT_PRE", dtype_code(pre.dtype())),
            ("DT_DELTA", dtype_code(delta.dtype())),
            ("DT_DX0", dtype_code(dx0.dtype())),
            ("GATED", flag(gated)),
        ],
        uniform: vec![
            to_u32(OP, "gbar", "elements", numel)?,
            to_u32(OP, "gbar", "pairs", pairs)?,
        ],
        buffers: vec![
            &g_s.buffer,
            &c0_s.buffer,
            &pre_s.buffer,
            &delta_s.buffer,
            &dx0_s.buffer,
        ],
        grid: [(pairs as u64).div_ceil(u64::from(EW_THREADS)), 1, 1],
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}

/// out = a (+ b) elementwise, converting dtypes (also a cast): one `add_main` dispatch, one
/// thread per output word.
pub(crate) fn add(
    d: &Arc<WgpuDevice>,
    a: &Tensor,
    b: Option<&Tensor>,
    out: &mut Tensor,
) -> Result<()> {
    const OP: &str = "add(wgpu)";
    let numel = a.numel();
    fits_index(OP, "a", numel)?;
    numel_is(OP, "out", out, numel, "like a")?;
    if let Some(b) = b {
        numel_is(OP, "b", b, numel, "like a")?;
    }
    let a_s = storage(OP, "a", d, a)?;
    let b_s = match b {
        Some(t) => Some(storage(OP, "b", d, t)?),
        None => None,
    };
    let out_s = storage(OP, "out", d, out)?;
    let nwords = words(out.dtype(), numel);
    let launch = Launch {
        kernel: ADD,
        constants: vec![
            ("DT_A", dtype_code(a.dtype())),
            ("DT_B", dtype_code(b.map_or(DType::F32, |t| t.dtype()))),
            ("DT_DST", dtype_code(out.dtype())),
            ("HAS_B", flag(b.is_some())),
        ],
        uniform: vec![
            to_u32(OP, "a", "elements", numel)?,
            to_u32(OP, "out", "words", nwords)?,
        ],
        buffers: vec![
            &a_s.buffer,
            b_s.map_or(&d.dummy_ro, |s| &s.buffer),
            &out_s.buffer,
        ],
        grid: [(nwords as u64).div_ceil(u64::from(EW_THREADS)), 1, 1],
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    };
    d.run(&[launch])
}

#[cfg(test)]
mod tests {
    //! The seam itself on views the `linear` op never produces: strided and transposed C,
    //! elements of C outside the view (must be left untouched), alpha ≠ 1, k = 0, accumulate,
    //! a pre of another dtype than C, the multiplier and the gated pair epilogue with a pre view
    //! of its own, and the elementwise cross-layer backward and add. The CPU backend runs the
    //! same calls as the oracle.
    use super::*;
    use crate::device::{Device, WgpuOptions};
    use crate::ops::backend;

    fn device() -> Option<Device> {
        match WgpuDevice::new(&WgpuOptions {
            allow_software: true,
        }) {
            Ok(d) => Some(Device::Wgpu(d)),
            Err(e) => {
                let required = std::env::var("RECFUSE_REQUIRE").is_ok_and(|v| v.contains("wgpu"));
                assert!(!required, "RECFUSE_REQUIRE asks for wgpu, but: {e}");
                eprintln!("SKIPPED: wgpu unavailable: {e}");
                None
            }
        }
    }

    /// Deterministic values in (-1, 1) without a dev-dependency in the library.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Spec {
        dtype: DType,
        pre_dtype: Option<DType>,
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
        a_view: MatView,
        b_view: MatView,
        c_view: MatView,
        /// Defaults to `c_view` when None.
        pre_view: Option<MatView>,
        alpha: f32,
        accumulate: bool,
        act: Activation,
        mul: bool,
        residual: bool,
        gated: bool,
    }

    fn numel(v: &MatView, batch: usize, rows: usize, cols: usize) -> usize {
        v.checked_extent(batch, rows, cols)
            .expect("test views fit usize")
            + 3
    }

    fn check(dev: &Device, s: &Spec, seed: u64) -> Result<()> {
        let na = numel(&s.a_view, s.batch, s.m, s.k);
        let nb = numel(&s.b_view, s.batch, s.k, s.n);
        let n_out = if s.gated { s.n / 2 } else { s.n };
        let nc = numel(&s.c_view, s.batch, s.m, n_out);
        let pre_view = s.pre_view.unwrap_or(s.c_view);
        let np = numel(&pre_view, s.batch, s.m, s.n);
        let (av, bv, cv, pv) = (
            values(na, seed),
            values(nb, seed + 1),
            values(nc, seed + 2),
            values(np, seed + 3),
        );
        let biasv = values(s.batch * s.n, seed + 4);
        let (mulv, resv) = (values(nc, seed + 5), values(nc, seed + 6));
        let mut outs = Vec::new();
        for d in [dev, &Device::Cpu] {
            let a = Tensor::from_f32(&av, &[na], s.dtype, d)?;
            let b = Tensor::from_f32(&bv, &[nb], s.dtype, d)?;
            let bias = Tensor::from_f32(&biasv, &[s.batch * s.n], s.dtype, d)?;
            let mut c = Tensor::from_f32(&cv, &[nc], s.dtype, d)?;
            let mul = Tensor::from_f32(&mulv, &[nc], DType::BF16, d)?;
            let res = Tensor::from_f32(&resv, &[nc], DType::F16, d)?;
            let mut pre = match s.pre_dtype {
                Some(pd) => Some(Tensor::from_f32(&pv, &[np], pd, d)?),
                None => None,
            };
            let g = Gemm {
                m: s.m,
                n: s.n,
                k: s.k,
                batch: s.batch,
                alpha: s.alpha,
                a: &a,
                a_view: s.a_view,
                b: &b,
                b_view: s.b_view,
                bias: Some((&bias, s.n)),
                bias_offset: 0,
                act: s.act,
                mul: s.mul.then_some(&mul),
                residual: s.residual.then_some(&res),
                gated: s.gated,
                accumulate: s.accumulate,
                c_view: s.c_view,
                pre_view,
                allow_tf32: false,
            };
            g.check("test", &c, pre.as_ref())?;
            backend::gemm(d, &g, &mut c, pre.as_mut())?;
            outs.push((c.to_f32_vec()?, pre.map(|p| p.to_f32_vec()).transpose()?));
        }
        let mask = |v: &MatView, len: usize, cols: usize| {
            let mut in_view = vec![false; len];
            for g in 0..s.batch {
                for i in 0..s.m {
                    for j in 0..cols {
                        in_view[v.at(g, i, j)] = true;
                    }
                }
            }
            in_view
        };
        let (c_mask, pre_mask) = (mask(&s.c_view, nc, n_out), mask(&pre_view, np, s.n));
        let tol_of = |d: DType| match d {
            DType::F32 => 1e-5,
            DType::BF16 => 1e-2,
            DType::F16 => 2e-3,
        };
        let compare = |what: &str, in_view: &[bool], got: &[f32], want: &[f32], tol: f32| {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-3;
            for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
                if in_view[e] {
                    assert!(
                        (g - w).abs() <= tol * scale,
                        "{what}[{e}]: wgpu {g}, cpu {w}"
                    );
                } else {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{what}[{e}] outside the view changed"
                    );
                }
            }
        };
        compare("c", &c_mask, &outs[0].0, &outs[1].0, tol_of(s.dtype));
        if let (Some(p0), Some(p1), Some(pd)) = (&outs[0].1, &outs[1].1, s.pre_dtype) {
            compare("pre", &pre_mask, p0, p1, tol_of(pd));
        }
        Ok(())
    }

    #[test]
    fn strided_views_match_the_cpu() {
        let Some(dev) = device() else { return };
        let (m, n, k, batch) = (67, 70, 19, 2);
        for (i, dtype) in DType::ALL.into_iter().enumerate() {
            // C rows padded by 3, batches by 2 more, starting at element 5; A read transposed.
            let padded = Spec {
                dtype,
                pre_dtype: Some(dtype),
                m,
                n,
                k,
                batch,
                a_view: MatView::new(1, 1, m, m * k),
                b_view: MatView::new(0, n, 1, k * n),
                c_view: MatView::new(5, n + 3, 1, (n + 3) * m + 2),
                pre_view: None,
                alpha: 0.5,
                accumulate: true,
                act: Activation::Gelu,
                mul: false,
                residual: false,
                gated: false,
            };
            check(&dev, &padded, 10 * i as u64).expect("padded C");
            // C written transposed (column-major), pre in f16 next to any C.
            let transposed = Spec {
                pre_dtype: Some(DType::F16),
                c_view: MatView::new(0, 1, m, m * n),
                accumulate: false,
                act: Activation::Sigmoid,
                ..padded
            };
            check(&dev, &transposed, 10 * i as u64 + 5).expect("transposed C");
            // k = 0: z is the bias alone.
            let empty_k = Spec {
                k: 0,
                pre_dtype: None,
                act: Activation::Relu,
                ..transposed
            };
            check(&dev, &empty_k, 10 * i as u64 + 7).expect("k = 0");
            // Every other element of C: each 16-bit word holds one element in the view and one
            // outside it, which must survive the read-modify-write of the pack pass.
            let every_other = Spec {
                pre_dtype: Some(dtype),
                c_view: MatView::new(1, 2 * n + 1, 2, (2 * n + 1) * m),
                accumulate: true,
                ..padded
            };
            check(&dev, &every_other, 10 * i as u64 + 9).expect("every other element");
            // The multiplier and a residual (of other dtypes than C) on the transposed C.
            let mul_res = Spec {
                mul: true,
                residual: true,
                act: Activation::Relu,
                ..transposed
            };
            check(&dev, &mul_res, 10 * i as u64 + 11).expect("multiplier");
            // Gated: n/2 outputs in a padded, strided C (every other element, so 16-bit words
            // are shared with elements outside the view), pre with all n columns in a
            // transposed view of its own, in another dtype; accumulate into C.
            let gated = Spec {
                pre_dtype: Some(DType::ALL[(i + 1) % 3]),
                c_view: MatView::new(3, n + 1, 2, (n + 1) * m + 1),
                pre_view: Some(MatView::new(2, 1, m, m * n + 5)),
                act: Activation::None,
                mul: true,
                residual: true,
                gated: true,
                ..padded
            };
            check(&dev, &gated, 10 * i as u64 + 13).expect("gated");
            // Gated, C written in place (f32 C), no pre, no residual, overwrite.
            let gated_plain = Spec {
                pre_dtype: None,
                c_view: MatView::new(0, n / 2, 1, m * n / 2),
                pre_view: None,
                residual: false,
                accumulate: false,
                ..gated
            };
            check(&dev, &gated_plain, 10 * i as u64 + 15).expect("gated, no pre");
        }
    }

    #[test]
    fn gate_backward_and_add_match_the_cpu_bitwise() {
        let Some(dev) = device() else { return };
        // Odd element counts: the last 16-bit word of dX0 (and of a DCN-V2 Δ) is half outside.
        let (rows, dd) = (7, 13);
        let nn = rows * dd;
        for (i, &dt) in DType::ALL.iter().enumerate() {
            let other = DType::ALL[(i + 1) % 3];
            for gated in [true, false] {
                let np = if gated { 2 * nn } else { nn };
                let (gv, cv, pv) = (values(nn, 1), values(nn, 2), values(np, 3));
                let (dv, xv) = (values(np, 4), values(nn, 5));
                let mut outs = Vec::new();
                for d in [&dev, &Device::Cpu] {
                    let g = Tensor::from_f32(&gv, &[rows, dd], DType::F32, d).unwrap();
                    let c0 = Tensor::from_f32(&cv, &[rows, dd], dt, d).unwrap();
                    let pre = Tensor::from_f32(&pv, &[np], other, d).unwrap();
                    let mut delta = Tensor::from_f32(&dv, &[np], dt, d).unwrap();
                    let mut dx0 = Tensor::from_f32(&xv, &[nn], other, d).unwrap();
                    backend::gate_backward(d, &g, &c0, &pre, gated, &mut delta, &mut dx0).unwrap();
                    let mut sum = Tensor::from_f32(&xv, &[nn], dt, d).unwrap();
                    backend::add(d, &dx0, Some(&c0), &mut sum).unwrap();
                    let mut cast = Tensor::from_f32(&xv, &[nn], other, d).unwrap();
                    backend::add(d, &g, None, &mut cast).unwrap();
                    outs.push([delta, dx0, sum, cast].map(|t| t.to_f32_vec().unwrap()));
                }
                // σ uses the device's exp: a few f32 ulps, which a 16-bit rounding may turn into
                // one 16-bit ulp. The sum and the cast are exact f32 operations: bitwise.
                let rel = |t: DType| match t {
                    DType::F32 => 1e-5,
                    DType::BF16 => 1e-2,
                    DType::F16 => 2e-3,
                };
                let checks = [
                    ("delta", rel(dt)),
                    ("dx0", rel(other)),
                    ("sum", 0.0),
                    ("cast", 0.0),
                ];
                for ((name, r), (got, want)) in checks.iter().zip(outs[0].iter().zip(&outs[1])) {
                    for (e, (&a, &b)) in got.iter().zip(want).enumerate() {
                        let tol = r * b.abs().max(1e-3);
                        assert!(
                            (a - b).abs() <= tol,
                            "{dt} gated={gated} {name}[{e}]: wgpu {a}, cpu {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn interleaved_16_bit_output_is_refused() {
        let Some(dev) = device() else { return };
        let s = Spec {
            dtype: DType::BF16,
            pre_dtype: None,
            m: 4,
            n: 4,
            k: 3,
            batch: 1,
            a_view: MatView::new(0, 3, 1, 0),
            b_view: MatView::new(0, 4, 1, 0),
            // Rows 2 elements apart but 4 wide: the view covers elements twice.
            c_view: MatView::new(0, 2, 1, 0),
            pre_view: None,
            alpha: 1.0,
            accumulate: false,
            act: Activation::None,
            mul: false,
            residual: false,
            gated: false,
        };
        // `Gemm::check` refuses it for every backend now (an output element written twice),
        // before the WGSL packer's own interleave check is reached.
        match check(&dev, &s, 1) {
            Err(Error::InvalidArgument {
                arg: "c", reason, ..
            }) => {
                assert!(reason.contains("twice"), "{reason}")
            }
            other => panic!("expected the overlapping view refused, got {other:?}"),
        }
    }
}
