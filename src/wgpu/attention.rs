//! The attention core on wgpu (`kernels/wgsl/attention.wgsl`, whose header documents the
//! tiling): the tile size picked from the adapter's workgroup-memory limit, argument checks,
//! the forward (online softmax over key tiles), the FlashAttention-2 backward and the
//! deterministic d bias. 16-bit outputs are computed into f32 scratch and rounded by
//! `cast_main`, one whole output word per thread.

use std::sync::Arc;

use super::gemm::{dtype_code, fits_index, flag, storage, to_u32, words, EW_THREADS};
use super::pipelines::{Binding, Kernel, Launch, ATTENTION_WGSL};
use super::{WgpuDevice, WgpuStorage, BACKEND};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::attention::AttnArgs;
use crate::tensor::Tensor;

use Binding::{Read as R, ReadWrite as RW, Uniform as U};

/// Threads per workgroup of the three tile kernels (fixed in attention.wgsl).
const WG: u32 = 64;
/// Candidate tile sizes (QT = KT), largest first.
const TILES: [usize; 6] = [32, 16, 8, 4, 2, 1];

const FORWARD: Kernel = Kernel {
    shader: ATTENTION_WGSL,
    entry: "attn_forward_main",
    bindings: &[U, R, R, R, R, R, RW, RW],
};
const BW_STATS: Kernel = Kernel {
    shader: ATTENTION_WGSL,
    entry: "attn_bw_stats_main",
    bindings: &[U, R, R, R, RW],
};
const BACKWARD: Kernel = Kernel {
    shader: ATTENTION_WGSL,
    entry: "attn_backward_main",
    bindings: &[U, R, R, R, R, R, R, R, RW],
};
const DBIAS: Kernel = Kernel {
    shader: ATTENTION_WGSL,
    entry: "attn_dbias_main",
    bindings: &[U, R, R, R, R, R, R, R, RW],
};
const CAST: Kernel = Kernel {
    shader: ATTENTION_WGSL,
    entry: "cast_main",
    bindings: &[U, R, RW],
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
    Dbias,
}

/// f32 words of workgroup memory `pass` uses at tile size t (the formulas of the
/// attention.wgsl header; a zero width still gets one-word arrays).
fn workgroup_floats(pass: Pass, t: usize, dk: usize, dv: usize) -> u64 {
    let (t, dk, dv) = (t as u64, dk.max(1) as u64, dv.max(1) as u64);
    let (qk, qv, kk, kv, s) = (t * dk, t * dv, t * dk, t * dv, t * t);
    let rows = 3 * t + t;
    match pass {
        Pass::Forward => qk + kk + kv + s + qv + rows,
        Pass::Backward => 2 * qk + qv + kk + kv + 2 * s + rows,
        Pass::Dbias => qk + qv + kk + kv + s + rows,
    }
}

#[cfg(test)]
thread_local! {
    /// Tests cap the tile to exercise many query blocks and key tiles on small shapes.
    static TILE_CAP: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

fn tile_cap() -> usize {
    #[cfg(test)]
    return TILE_CAP.with(|c| c.get());
    #[cfg(not(test))]
    usize::MAX
}

/// The largest tile whose workgroup arrays fit `limit` bytes in every pass of `passes`.
fn pick_tile(passes: &[Pass], dk: usize, dv: usize, limit: u64) -> Result<usize> {
    TILES
        .into_iter()
        .filter(|&t| t <= tile_cap())
        .find(|&t| {
            passes
                .iter()
                .all(|&p| 4 * workgroup_floats(p, t, dk, dv) <= limit)
        })
        .ok_or_else(|| Error::Unsupported {
            op: "attention",
            backend: BACKEND,
            what: format!(
                "d_k = {dk}, d_v = {dv}: even a 1×1 tile needs {} bytes of workgroup memory, \
                 the adapter allows {limit}",
                passes
                    .iter()
                    .map(|&p| 4 * workgroup_floats(p, 1, dk, dv))
                    .max()
                    .unwrap_or(0)
            ),
        })
}

/// Override constants of the tile geometry.
fn tile_constants(t: usize, dk: usize, dv: usize) -> Vec<(&'static str, f64)> {
    let f = |x: usize| x as f64;
    vec![
        ("QT", f(t)),
        ("KT", f(t)),
        ("DK", f(dk)),
        ("DV", f(dv)),
        ("QK_LEN", f(t * dk.max(1))),
        ("QV_LEN", f(t * dv.max(1))),
        ("KK_LEN", f(t * dk.max(1))),
        ("KV_LEN", f(t * dv.max(1))),
        ("S_LEN", f(t * t)),
        ("DK_DIV", f(dk.max(1))),
        ("DV_DIV", f(dv.max(1))),
    ]
}

/// The validated sizes of one call, all within the kernels' 32-bit index arithmetic.
struct Sizes {
    /// Elements of Q (= dQ), K (= dK), V (= dV), O (= dO).
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    /// LSE rows B·H·Lq.
    rows: usize,
}

fn sizes(op: &'static str, a: &AttnArgs<'_>) -> Result<Sizes> {
    let prod = |arg: &'static str, xs: &[usize]| -> Result<usize> {
        let n = xs
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .ok_or_else(|| Error::invalid(op, arg, "the element count overflows usize"))?;
        fits_index(op, arg, n)?;
        Ok(n)
    };
    let s = Sizes {
        q: prod("q", &[a.b, a.lq, a.h, a.dk])?,
        k: prod("k", &[a.b, a.l, a.h, a.dk])?,
        v: prod("v", &[a.b, a.l, a.h, a.dv])?,
        o: prod("o", &[a.b, a.lq, a.h, a.dv])?,
        rows: prod("lse", &[a.b, a.h, a.lq])?,
    };
    prod("bias", &[a.h, a.lq, a.l])?;
    prod("mask", &[a.b, a.l])?;
    // The backward's scratch holds dQ, dK and dV back to back (each fits, so no overflow).
    fits_index(op, "q", s.q + s.k + s.v)?;
    Ok(s)
}

fn numel_is(op: &'static str, arg: &'static str, t: &Tensor, want: usize) -> Result<()> {
    if t.numel() != want {
        return Err(Error::shape(op, arg, format!("{want} elements"), t.shape()));
    }
    Ok(())
}

/// `[b, lq, l, h, nqb, scale, rows, 0, dq_off, dk_off, dv_off, 0]`.
fn uniform(
    op: &'static str,
    a: &AttnArgs<'_>,
    t: usize,
    rows: usize,
    offs: [usize; 3],
) -> Result<Vec<u32>> {
    Ok(vec![
        to_u32(op, "q", "batch", a.b)?,
        to_u32(op, "q", "query tokens", a.lq)?,
        to_u32(op, "k", "tokens", a.l)?,
        to_u32(op, "q", "heads", a.h)?,
        to_u32(op, "q", "query blocks", a.lq.div_ceil(t))?,
        a.scale.to_bits(),
        to_u32(op, "lse", "rows", rows)?,
        0,
        to_u32(op, "dq", "offset", offs[0])?,
        to_u32(op, "dk", "offset", offs[1])?,
        to_u32(op, "dv", "offset", offs[2])?,
        0,
    ])
}

/// The constants shared by the three tile kernels: geometry, input dtypes, bias and mask.
fn constants(a: &AttnArgs<'_>, t: usize) -> Vec<(&'static str, f64)> {
    let mut c = tile_constants(t, a.dk, a.dv);
    c.extend([
        ("DT_QKV", dtype_code(a.q.dtype())),
        (
            "DT_BIAS",
            dtype_code(a.bias.map_or(DType::F32, |b| b.dtype())),
        ),
        (
            "DT_MASK",
            dtype_code(a.mask.map_or(DType::F32, |m| m.dtype())),
        ),
        ("HAS_BIAS", flag(a.bias.is_some())),
        ("HAS_MASK", flag(a.mask.is_some())),
    ]);
    c
}

/// Rounds `numel` f32 words of `src` from word `src_off` into `dst` (one thread per word).
fn cast_launch<'a>(
    op: &'static str,
    arg: &'static str,
    src: &'a wgpu::Buffer,
    src_off: usize,
    dst: &Tensor,
    dst_s: &'a WgpuStorage,
) -> Result<Launch<'a>> {
    let numel = dst.numel();
    let nwords = words(dst.dtype(), numel);
    Ok(Launch {
        kernel: CAST,
        constants: vec![("DT_DST", dtype_code(dst.dtype()))],
        uniform: vec![
            to_u32(op, arg, "elements", numel)?,
            to_u32(op, arg, "words", nwords)?,
            to_u32(op, arg, "offset", src_off)?,
        ],
        buffers: vec![src, &dst_s.buffer],
        grid: [(nwords as u64).div_ceil(u64::from(EW_THREADS)), 1, 1],
        workgroup: [EW_THREADS, 1, 1],
        workgroup_bytes: 0,
    })
}

/// The inputs every tile kernel binds (1..=5): Q, K, V, bias, mask.
fn inputs<'a>(
    op: &'static str,
    d: &'a Arc<WgpuDevice>,
    a: &AttnArgs<'a>,
) -> Result<[&'a wgpu::Buffer; 5]> {
    Ok([
        &storage(op, "q", d, a.q)?.buffer,
        &storage(op, "k", d, a.k)?.buffer,
        &storage(op, "v", d, a.v)?.buffer,
        match a.bias {
            Some(t) => &storage(op, "bias", d, t)?.buffer,
            None => &d.dummy_ro,
        },
        match a.mask {
            Some(t) => &storage(op, "mask", d, t)?.buffer,
            None => &d.dummy_ro,
        },
    ])
}

/// Forward: O (Q's dtype) and LSE (f32), see `attn_forward_main`.
pub(crate) fn forward(
    d: &Arc<WgpuDevice>,
    a: &AttnArgs<'_>,
    o: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    const OP: &str = "attention(wgpu)";
    let o: &Tensor = o;
    let lse: &Tensor = lse;
    let sz = sizes(OP, a)?;
    numel_is(OP, "o", o, sz.o)?;
    numel_is(OP, "lse", lse, sz.rows)?;
    if lse.dtype() != DType::F32 {
        return Err(Error::DType {
            op: OP,
            arg: "lse",
            expected: "f32".into(),
            actual: lse.dtype(),
        });
    }
    if sz.rows == 0 {
        return Ok(());
    }
    let limit = u64::from(d.limits.max_compute_workgroup_storage_size);
    let t = pick_tile(&[Pass::Forward], a.dk, a.dv, limit)?;
    let [q_b, k_b, v_b, bias_b, mask_b] = inputs(OP, d, a)?;
    let o_s = storage(OP, "o", d, o)?;
    let lse_s = storage(OP, "lse", d, lse)?;
    let scratch = if o.dtype() == DType::F32 {
        None
    } else {
        Some(d.pool.take(d, 4 * sz.o as u64)?)
    };
    let mut launches = vec![Launch {
        kernel: FORWARD,
        constants: constants(a, t),
        uniform: uniform(OP, a, t, sz.rows, [0; 3])?,
        buffers: vec![
            q_b,
            k_b,
            v_b,
            bias_b,
            mask_b,
            scratch.as_ref().unwrap_or(&o_s.buffer),
            &lse_s.buffer,
        ],
        grid: [a.lq.div_ceil(t) as u64, a.h as u64, a.b as u64],
        workgroup: [WG, 1, 1],
        workgroup_bytes: 4 * workgroup_floats(Pass::Forward, t, a.dk, a.dv),
    }];
    if let Some(src) = &scratch {
        launches.push(cast_launch(OP, "o", src, 0, o, o_s)?);
    }
    let result = d.run(&launches);
    drop(launches);
    if let Some(b) = scratch {
        d.pool.give(b);
    }
    result
}

/// Backward: dQ, dK, dV (and d bias), see `attn_bw_stats_main`, `attn_backward_main` and
/// `attn_dbias_main`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    d: &Arc<WgpuDevice>,
    a: &AttnArgs<'_>,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
    dbias: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "attention_backward(wgpu)";
    let (dq, dk, dv): (&Tensor, &Tensor, &Tensor) = (dq, dk, dv);
    let dbias: Option<&Tensor> = dbias.map(|t| &*t);
    let sz = sizes(OP, a)?;
    numel_is(OP, "o", o, sz.o)?;
    numel_is(OP, "d_o", d_o, sz.o)?;
    numel_is(OP, "lse", lse, sz.rows)?;
    numel_is(OP, "dq", dq, sz.q)?;
    numel_is(OP, "dk", dk, sz.k)?;
    numel_is(OP, "dv", dv, sz.v)?;
    let dbias = match (a.bias, dbias) {
        (Some(bias), Some(db)) => {
            numel_is(OP, "dbias", db, bias.numel())?;
            Some(db)
        }
        (None, Some(_)) => {
            return Err(Error::invalid(OP, "dbias", "given without a bias"));
        }
        (_, None) => None,
    };
    if sz.rows == 0 {
        return Ok(());
    }
    let limit = u64::from(d.limits.max_compute_workgroup_storage_size);
    let passes: &[Pass] = if dbias.is_some() {
        &[Pass::Backward, Pass::Dbias]
    } else {
        &[Pass::Backward]
    };
    let t = pick_tile(passes, a.dk, a.dv, limit)?;
    let [q_b, k_b, v_b, bias_b, mask_b] = inputs(OP, d, a)?;
    let o_s = storage(OP, "o", d, o)?;
    let do_s = storage(OP, "d_o", d, d_o)?;
    let lse_s = storage(OP, "lse", d, lse)?;
    let dq_s = storage(OP, "dq", d, dq)?;
    let dk_s = storage(OP, "dk", d, dk)?;
    let dv_s = storage(OP, "dv", d, dv)?;
    let db_s = dbias.map(|t| storage(OP, "dbias", d, t)).transpose()?;

    // (On an error below, scratch buffers are dropped rather than returned to the pool.)
    let stats = d.pool.take(d, 8 * sz.rows as u64)?;
    let grads = d.pool.take(d, 4 * (sz.q + sz.k + sz.v).max(1) as u64)?;
    let db_scratch = match dbias {
        Some(t) if t.dtype() != DType::F32 => Some(d.pool.take(d, 4 * t.numel() as u64)?),
        _ => None,
    };
    let offs = [0, sz.q, sz.q + sz.k];
    let uni = uniform(OP, a, t, sz.rows, offs)?;
    let mut consts = constants(a, t);
    consts.extend([
        ("DT_O", dtype_code(o.dtype())),
        ("DT_DO", dtype_code(d_o.dtype())),
        ("DT_LSE", dtype_code(lse.dtype())),
    ]);
    let tile_inputs = vec![q_b, k_b, v_b, bias_b, mask_b, &stats, &do_s.buffer];
    let mut launches = vec![
        Launch {
            kernel: BW_STATS,
            constants: consts.clone(),
            uniform: uni.clone(),
            buffers: vec![&o_s.buffer, &do_s.buffer, &lse_s.buffer, &stats],
            grid: [(sz.rows as u64).div_ceil(u64::from(EW_THREADS)), 1, 1],
            workgroup: [EW_THREADS, 1, 1],
            workgroup_bytes: 0,
        },
        Launch {
            kernel: BACKWARD,
            constants: consts.clone(),
            uniform: uni.clone(),
            buffers: [tile_inputs.as_slice(), &[&grads]].concat(),
            grid: [a.h as u64, a.b as u64, 1],
            workgroup: [WG, 1, 1],
            workgroup_bytes: 4 * workgroup_floats(Pass::Backward, t, a.dk, a.dv),
        },
    ];
    if let (Some(db), Some(db_s)) = (dbias, db_s) {
        launches.push(Launch {
            kernel: DBIAS,
            constants: consts,
            uniform: uni,
            buffers: [
                tile_inputs.as_slice(),
                &[db_scratch.as_ref().unwrap_or(&db_s.buffer)],
            ]
            .concat(),
            grid: [a.lq.div_ceil(t) as u64, a.h as u64, 1],
            workgroup: [WG, 1, 1],
            workgroup_bytes: 4 * workgroup_floats(Pass::Dbias, t, a.dk, a.dv),
        });
        if let Some(src) = &db_scratch {
            launches.push(cast_launch(OP, "dbias", src, 0, db, db_s)?);
        }
    }
    launches.push(cast_launch(OP, "dq", &grads, offs[0], dq, dq_s)?);
    launches.push(cast_launch(OP, "dk", &grads, offs[1], dk, dk_s)?);
    launches.push(cast_launch(OP, "dv", &grads, offs[2], dv, dv_s)?);
    let result = d.run(&launches);
    drop(launches);
    drop(tile_inputs);
    d.pool.give(stats);
    d.pool.give(grads);
    if let Some(b) = db_scratch {
        d.pool.give(b);
    }
    result
}

#[cfg(test)]
mod tests {
    //! Edge cases against the CPU backend: L = 1, L one past and one short of the tile, a
    //! query block of a single row, a fully masked sample (O = 0, LSE = −∞, zero gradients),
    //! a tile forced down to 8 by a small workgroup-memory budget, and the tile choice itself.
    use super::*;
    use crate::device::{Device, WgpuOptions};
    use crate::ops::attention::Attention;

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
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[derive(Clone, Copy)]
    struct Case {
        b: usize,
        lq: usize,
        l: usize,
        h: usize,
        dk: usize,
        dv: usize,
        dtype: DType,
        bias: bool,
        /// Sample 0 has no valid key; the others lose every third key.
        mask: bool,
    }

    /// Runs forward and backward on `dev` and on the CPU and compares everything.
    fn compare(dev: &Device, c: &Case, seed: u64) {
        let what = format!(
            "b={} lq={} l={} h={} dk={} dv={} {} bias={} mask={}",
            c.b, c.lq, c.l, c.h, c.dk, c.dv, c.dtype, c.bias, c.mask
        );
        // A zero width runs on the CPU as width 1 holding zeros (Q for d_k, V and dO for d_v),
        // which is the same math: the CPU kernels do no work at all when a width is 0 (they
        // zip the chunks of an empty tensor). Outputs empty on the device are then skipped.
        let w = Case {
            dk: c.dk.max(1),
            dv: c.dv.max(1),
            ..*c
        };
        let widen = |v: Vec<f32>, zero: bool| if zero { vec![0.0; v.len()] } else { v };
        let qv = values(w.b * w.lq * w.h * w.dk, seed);
        let kv = values(w.b * w.l * w.h * w.dk, seed + 1);
        let vv = values(w.b * w.l * w.h * w.dv, seed + 2);
        let bv = values(w.h * w.lq * w.l, seed + 3);
        let gv = values(w.b * w.lq * w.h * w.dv, seed + 4);
        let mv: Vec<f32> = (0..c.b * c.l)
            .map(|e| f32::from(u8::from(e >= c.l && e % 3 != 0)))
            .collect();
        let cpu = (
            widen(qv.clone(), c.dk == 0),
            widen(vv.clone(), c.dv == 0),
            widen(gv.clone(), c.dv == 0),
        );
        let mut outs = Vec::new();
        for (dd, c, (qv, vv, gv)) in [(dev, c, (qv, vv, gv)), (&Device::Cpu, &w, cpu)] {
            let t = |v: &[f32], s: &[usize], dt| Tensor::from_f32(v, s, dt, dd).unwrap();
            let nk = c.b * c.l * c.h * c.dk;
            let q = t(
                &qv[..c.b * c.lq * c.h * c.dk],
                &[c.b, c.lq, c.h, c.dk],
                c.dtype,
            );
            let k = t(&kv[..nk], &[c.b, c.l, c.h, c.dk], c.dtype);
            let v = t(
                &vv[..c.b * c.l * c.h * c.dv],
                &[c.b, c.l, c.h, c.dv],
                c.dtype,
            );
            let bias = c.bias.then(|| t(&bv, &[c.h, c.lq, c.l], DType::BF16));
            let mask = c.mask.then(|| t(&mv, &[c.b, c.l], DType::F16));
            let ng = c.b * c.lq * c.h * c.dv;
            let d_o = t(&gv[..ng], &[c.b, c.lq, c.h, c.dv], DType::F32);
            let att = Attention::default();
            let f = att
                .forward(&q, &k, &v, bias.as_ref(), mask.as_ref())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let g = att
                .backward(&q, &k, &v, bias.as_ref(), mask.as_ref(), &f, &d_o)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut v = vec![f.o, f.lse, g.dq, g.dk, g.dv];
            v.extend(g.dbias);
            outs.push(
                v.iter()
                    .map(|t| t.to_f32_vec().unwrap())
                    .collect::<Vec<_>>(),
            );
        }
        let names = ["o", "lse", "dq", "dk", "dv", "dbias"];
        let tol = match c.dtype {
            DType::F32 => 2e-5,
            DType::BF16 => 1.6e-2,
            DType::F16 => 2e-3,
        };
        for ((name, got), want) in names.iter().zip(&outs[0]).zip(&outs[1]) {
            if got.is_empty() {
                continue;
            }
            assert_eq!(got.len(), want.len(), "{what} {name}");
            let scale = want
                .iter()
                .filter(|x| x.is_finite())
                .fold(1e-3f32, |m, x| m.max(x.abs()));
            for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
                if w.is_infinite() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{what} {name}[{e}]");
                    continue;
                }
                // A masked sample's outputs are exact zeros on both backends.
                assert!(
                    (g - w).abs() <= tol * scale,
                    "{what} {name}[{e}]: wgpu {g}, cpu {w}"
                );
            }
        }
        if c.mask {
            // Sample 0: O = 0, LSE = −∞, dQ = dK = dV = 0, exactly.
            let (o, lse) = (&outs[0][0], &outs[0][1]);
            assert!(o[..c.lq * c.h * c.dv].iter().all(|&x| x == 0.0), "{what}");
            assert!(lse[..c.h * c.lq]
                .iter()
                .all(|&x| x.to_bits() == 0xff80_0000));
            for (g, n) in [
                (&outs[0][2], c.lq * c.h * c.dk),
                (&outs[0][3], c.l * c.h * c.dk),
            ] {
                assert!(g[..n].iter().all(|&x| x == 0.0), "{what}");
            }
            assert!(outs[0][4][..c.l * c.h * c.dv].iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn edge_shapes_match_the_cpu() {
        let Some(dev) = device() else { return };
        let base = Case {
            b: 2,
            lq: 1,
            l: 1,
            h: 1,
            dk: 3,
            dv: 5,
            dtype: DType::F32,
            bias: true,
            mask: false,
        };
        let cases = [
            // L = 1: one key, P = 1.
            Case { ..base },
            // One past and one short of a 32 tile, d_v odd (16-bit words straddle rows).
            Case {
                lq: 33,
                l: 33,
                h: 2,
                dtype: DType::BF16,
                mask: true,
                ..base
            },
            Case {
                lq: 31,
                l: 31,
                h: 3,
                dk: 16,
                dv: 7,
                dtype: DType::F16,
                ..base
            },
            // Zero-width heads: scores are the bias alone; O and dV are empty.
            Case {
                lq: 3,
                l: 5,
                dk: 0,
                ..base
            },
            Case {
                lq: 3,
                l: 5,
                dv: 0,
                dtype: DType::BF16,
                mask: true,
                ..base
            },
            // Pruned to one query row, three key tiles, a masked sample.
            Case {
                b: 3,
                lq: 1,
                l: 70,
                h: 2,
                dk: 16,
                dv: 64,
                mask: true,
                ..base
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            compare(&dev, c, 100 * i as u64);
        }
        // Tiles of 8: five query blocks (dK/dV read-modify-written by later blocks) and five
        // key tiles, the last holding a single key.
        TILE_CAP.with(|t| t.set(8));
        compare(
            &dev,
            &Case {
                lq: 33,
                l: 33,
                h: 2,
                dk: 16,
                dv: 9,
                mask: true,
                ..base
            },
            7,
        );
        compare(
            &dev,
            &Case {
                lq: 2,
                l: 33,
                dtype: DType::F16,
                ..base
            },
            8,
        );
        TILE_CAP.with(|t| t.set(usize::MAX));
    }

    #[test]
    fn tiles_follow_the_workgroup_memory_limit() {
        // The paper's heads: 32 fits 32 KiB for every pass, the WebGPU default forces 16.
        let all = [Pass::Forward, Pass::Backward, Pass::Dbias];
        assert_eq!(pick_tile(&all, 16, 64, 32 << 10).unwrap(), 32);
        assert_eq!(pick_tile(&all, 16, 64, 16 << 10).unwrap(), 16);
        assert_eq!(pick_tile(&[Pass::Forward], 16, 64, 16 << 10).unwrap(), 16);
        assert_eq!(pick_tile(&all, 128, 128, 16 << 10).unwrap(), 4);
        assert!(matches!(
            pick_tile(&all, 4096, 4096, 16 << 10),
            Err(Error::Unsupported { .. })
        ));
        // Zero widths still size one-word arrays.
        assert_eq!(
            workgroup_floats(Pass::Forward, 1, 0, 0),
            1 + 1 + 1 + 1 + 1 + 4
        );
    }
}
