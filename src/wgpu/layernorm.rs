//! LayerNorm on wgpu (`kernels/wgsl/layernorm.wgsl`): forward = row statistics (one workgroup
//! per row) + an apply pass (one thread per output word); backward = row sums (one workgroup
//! per row) + dx (one thread per output word) + dγ/dβ column sums in a fixed row order (one
//! thread per element pair).

use std::sync::Arc;

use super::gemm::{dtype_code, fits_index, storage, to_u32, words, EW_THREADS};
use super::pipelines::{Binding, Kernel, Launch, LAYERNORM_WGSL};
use super::WgpuDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use Binding::{Read as R, ReadWrite as RW, Uniform as U};

/// Threads per workgroup of the row kernels (fixed in layernorm.wgsl).
const ROW_THREADS: u32 = 64;
/// Their workgroup memory: the 64-float reduction tree.
const ROW_BYTES: u64 = 4 * ROW_THREADS as u64;

const STATS: Kernel = Kernel {
    shader: LAYERNORM_WGSL,
    entry: "ln_stats_main",
    bindings: &[U, R, RW, RW],
};
const APPLY: Kernel = Kernel {
    shader: LAYERNORM_WGSL,
    entry: "ln_apply_main",
    bindings: &[U, R, R, R, R, R, RW],
};
const BWD_ROWS: Kernel = Kernel {
    shader: LAYERNORM_WGSL,
    entry: "ln_bwd_rows_main",
    bindings: &[U, R, R, R, R, R, RW],
};
const DX: Kernel = Kernel {
    shader: LAYERNORM_WGSL,
    entry: "ln_dx_main",
    bindings: &[U, R, R, R, R, R, R, RW],
};
const DPARAMS: Kernel = Kernel {
    shader: LAYERNORM_WGSL,
    entry: "ln_dparams_main",
    bindings: &[U, R, R, R, R, R, RW, RW],
};

fn numel_is(op: &'static str, arg: &'static str, t: &Tensor, want: usize) -> Result<()> {
    if t.numel() != want {
        return Err(Error::shape(op, arg, format!("{want} elements"), t.shape()));
    }
    Ok(())
}

/// Rows, width and the uniform block `[rows, d, tokens, eps, numel, nwords, npairs, 0]` for a
/// `[rows, d]` x whose outputs (y or dx) have dtype `out`.
fn geometry(
    op: &'static str,
    x: &Tensor,
    gamma: &Tensor,
    tokens: usize,
    eps: f32,
    out: DType,
) -> Result<(usize, Vec<u32>)> {
    let numel = x.numel();
    fits_index(op, "x", numel)?;
    let d = x.shape().last().copied().unwrap_or(1).max(1);
    let rows = numel / d;
    if tokens == 0 || gamma.numel() != tokens * d {
        return Err(Error::shape(
            op,
            "gamma",
            format!("{tokens}·{d} elements"),
            gamma.shape(),
        ));
    }
    let pairs = gamma.numel().div_ceil(2);
    let uniform = vec![
        to_u32(op, "x", "rows", rows)?,
        to_u32(op, "x", "width", d)?,
        to_u32(op, "gamma", "tokens", tokens)?,
        eps.to_bits(),
        to_u32(op, "x", "elements", numel)?,
        to_u32(op, "x", "words", words(out, numel))?,
        to_u32(op, "gamma", "element pairs", pairs)?,
        0,
    ];
    Ok((rows, uniform))
}

fn f32_output(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType {
            op,
            arg,
            expected: "f32".into(),
            actual: t.dtype(),
        });
    }
    Ok(())
}

/// Forward: y (x's dtype), mean and rstd (f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    d: &Arc<WgpuDevice>,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    tokens: usize,
    eps: f32,
    y: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
) -> Result<()> {
    const OP: &str = "layernorm(wgpu)";
    let (y, mean, rstd): (&Tensor, &Tensor, &Tensor) = (y, mean, rstd);
    let (rows, uniform) = geometry(OP, x, gamma, tokens, eps, y.dtype())?;
    numel_is(OP, "beta", beta, gamma.numel())?;
    numel_is(OP, "y", y, x.numel())?;
    numel_is(OP, "mean", mean, rows)?;
    numel_is(OP, "rstd", rstd, rows)?;
    // One thread writes a row's statistic: whole words only in f32.
    f32_output(OP, "mean", mean)?;
    f32_output(OP, "rstd", rstd)?;
    if rows == 0 {
        return Ok(());
    }
    let x_s = storage(OP, "x", d, x)?;
    let g_s = storage(OP, "gamma", d, gamma)?;
    let b_s = storage(OP, "beta", d, beta)?;
    let y_s = storage(OP, "y", d, y)?;
    let m_s = storage(OP, "mean", d, mean)?;
    let r_s = storage(OP, "rstd", d, rstd)?;
    let nwords = u64::from(uniform[5]);
    let launches = [
        Launch {
            kernel: STATS,
            constants: vec![("DT_X", dtype_code(x.dtype()))],
            uniform: uniform.clone(),
            buffers: vec![&x_s.buffer, &m_s.buffer, &r_s.buffer],
            grid: [rows as u64, 1, 1],
            workgroup: [ROW_THREADS, 1, 1],
            workgroup_bytes: ROW_BYTES,
        },
        Launch {
            kernel: APPLY,
            constants: vec![
                ("DT_X", dtype_code(x.dtype())),
                ("DT_G", dtype_code(gamma.dtype())),
                ("DT_B", dtype_code(beta.dtype())),
                ("DT_DST", dtype_code(y.dtype())),
            ],
            uniform,
            buffers: vec![
                &x_s.buffer,
                &g_s.buffer,
                &b_s.buffer,
                &m_s.buffer,
                &r_s.buffer,
                &y_s.buffer,
            ],
            grid: [nwords.div_ceil(u64::from(EW_THREADS)), 1, 1],
            workgroup: [EW_THREADS, 1, 1],
            workgroup_bytes: 0,
        },
    ];
    d.run(&launches)
}

/// Backward: dx (dy's dtype), dγ and dβ (γ's and β's dtypes) summed over rows in order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    d: &Arc<WgpuDevice>,
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
    const OP: &str = "layernorm_backward(wgpu)";
    let (dx, dgamma, dbeta): (&Tensor, &Tensor, &Tensor) = (dx, dgamma, dbeta);
    let (rows, uniform) = geometry(OP, x, gamma, tokens, 0.0, dx.dtype())?;
    numel_is(OP, "dy", dy, x.numel())?;
    numel_is(OP, "dx", dx, x.numel())?;
    numel_is(OP, "mean", mean, rows)?;
    numel_is(OP, "rstd", rstd, rows)?;
    numel_is(OP, "dgamma", dgamma, gamma.numel())?;
    numel_is(OP, "dbeta", dbeta, gamma.numel())?;
    if rows == 0 {
        return Ok(());
    }
    let x_s = storage(OP, "x", d, x)?;
    let g_s = storage(OP, "gamma", d, gamma)?;
    let m_s = storage(OP, "mean", d, mean)?;
    let r_s = storage(OP, "rstd", d, rstd)?;
    let dy_s = storage(OP, "dy", d, dy)?;
    let dx_s = storage(OP, "dx", d, dx)?;
    let dg_s = storage(OP, "dgamma", d, dgamma)?;
    let db_s = storage(OP, "dbeta", d, dbeta)?;
    let ab = d.pool.take(d, 8 * rows as u64)?;
    let constants = vec![
        ("DT_X", dtype_code(x.dtype())),
        ("DT_G", dtype_code(gamma.dtype())),
        ("DT_DY", dtype_code(dy.dtype())),
        ("DT_MEAN", dtype_code(mean.dtype())),
        ("DT_RSTD", dtype_code(rstd.dtype())),
        ("DT_DST", dtype_code(dx.dtype())),
        ("DT_DG", dtype_code(dgamma.dtype())),
        ("DT_DB", dtype_code(dbeta.dtype())),
    ];
    let inputs = [
        &x_s.buffer,
        &g_s.buffer,
        &m_s.buffer,
        &r_s.buffer,
        &dy_s.buffer,
    ];
    let (nwords, npairs) = (u64::from(uniform[5]), u64::from(uniform[6]));
    let ew = u64::from(EW_THREADS);
    let launches = [
        Launch {
            kernel: BWD_ROWS,
            constants: constants.clone(),
            uniform: uniform.clone(),
            buffers: [&inputs[..], &[&ab]].concat(),
            grid: [rows as u64, 1, 1],
            workgroup: [ROW_THREADS, 1, 1],
            workgroup_bytes: ROW_BYTES,
        },
        Launch {
            kernel: DX,
            constants: constants.clone(),
            uniform: uniform.clone(),
            buffers: [&inputs[..], &[&ab, &dx_s.buffer]].concat(),
            grid: [nwords.div_ceil(ew), 1, 1],
            workgroup: [EW_THREADS, 1, 1],
            workgroup_bytes: 0,
        },
        Launch {
            kernel: DPARAMS,
            constants,
            uniform,
            buffers: [&inputs[..], &[&dg_s.buffer, &db_s.buffer]].concat(),
            grid: [npairs.div_ceil(ew), 1, 1],
            workgroup: [EW_THREADS, 1, 1],
            workgroup_bytes: 0,
        },
    ];
    let result = d.run(&launches);
    drop(launches);
    d.pool.give(ab);
    result
}

#[cfg(test)]
mod tests {
    //! Edge cases against the CPU backend: odd widths (16-bit rows share words), a width
    //! above the 64 threads of a row workgroup, one element per row, per-token affine with
    //! mixed dtypes; and bitwise determinism of the column sums across runs.
    use super::*;
    use crate::device::{Device, WgpuOptions};
    use crate::ops::layernorm::LayerNorm;

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

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Runs forward + backward on `dev` and the CPU; returns both sets of outputs.
    fn run(
        dev: &Device,
        shape: &[usize],
        tokens: Option<usize>,
        dt: DType,
        pdt: DType,
    ) -> Vec<Vec<Vec<f32>>> {
        let n: usize = shape.iter().product();
        let d = shape[shape.len() - 1];
        let gs: Vec<usize> = tokens.map_or(vec![d], |t| vec![t, d]);
        let gn: usize = gs.iter().product();
        let (xv, rv, gv, bv, dyv) = (
            values(n, 1),
            values(n, 2),
            values(gn, 3),
            values(gn, 4),
            values(n, 5),
        );
        [dev, &Device::Cpu]
            .iter()
            .map(|dd| {
                let t = |v: &[f32], s: &[usize], dt| Tensor::from_f32(v, s, dt, dd).unwrap();
                let (x, r) = (t(&xv, shape, dt), t(&rv, shape, DType::F32));
                let (g, b) = (t(&gv, &gs, pdt), t(&bv, &gs, DType::F16));
                let dy = t(&dyv, shape, DType::BF16);
                let ln = LayerNorm::default();
                let f = ln.forward(&x, Some(&r), &g, &b).unwrap();
                let gr = ln.backward(&g, &b, &f, &dy).unwrap();
                [f.y, f.mean, f.rstd, gr.dx, gr.dgamma, gr.dbeta]
                    .iter()
                    .map(|t| t.to_f32_vec().unwrap())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn edge_shapes_match_the_cpu() {
        let Some(dev) = device() else { return };
        let cases: [(&[usize], Option<usize>, DType, DType); 5] = [
            (&[3, 5, 7], None, DType::BF16, DType::F32),
            (&[2, 3, 129], Some(3), DType::F16, DType::BF16),
            (&[4, 1], None, DType::F32, DType::F32),
            (&[5, 3, 2], Some(3), DType::BF16, DType::F16),
            (&[67, 1, 33], Some(1), DType::F32, DType::BF16),
        ];
        let names = ["y", "mean", "rstd", "dx", "dγ", "dβ"];
        // One 16-bit ulp (of the largest value) or an f32 summation-order difference.
        let tol = |t: DType| match t {
            DType::F32 => 2e-5,
            DType::BF16 => 1.6e-2,
            DType::F16 => 2e-3,
        };
        for (shape, tokens, dt, pdt) in cases {
            let outs = run(&dev, shape, tokens, dt, pdt);
            // y in x's dtype, f32 statistics, dx in dy's (bf16), dγ in γ's, dβ in β's (f16).
            let dtypes = [dt, DType::F32, DType::F32, DType::BF16, pdt, DType::F16];
            for (((name, got), want), odt) in names.iter().zip(&outs[0]).zip(&outs[1]).zip(dtypes) {
                let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                let tol = tol(odt);
                for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= tol * scale,
                        "{shape:?} {dt} {name}[{e}]: wgpu {g}, cpu {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn column_sums_are_deterministic() {
        let Some(dev) = device() else { return };
        let a = run(&dev, &[40, 4, 24], Some(4), DType::F32, DType::F32);
        let b = run(&dev, &[40, 4, 24], Some(4), DType::F32, DType::F32);
        for (x, y) in a[0].iter().zip(&b[0]) {
            let (x, y): (Vec<u32>, Vec<u32>) = (
                x.iter().map(|v| v.to_bits()).collect(),
                y.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(x, y);
        }
    }
}
