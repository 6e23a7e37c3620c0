//! Quickstart, the per-op correctness table: `cargo run --release --example quickstart`
//! (`-- --software` also runs a software wgpu adapter such as Mesa lavapipe, labelled; it is
//! slow, so only when asked).
//!
//! Opens every backend this machine has (the CPU always; a hardware wgpu adapter; CUDA when a
//! GPU and libnvrtc are present), says why the
//! others are missing, and runs on each, forward and backward, checked against a reference:
//! * one linear layer `gelu(x·Wᵀ + b)` in f32 and bf16, against the f64 CPU reference;
//! * a 3-layer gated cross stack (GDCN, width 189) in f32 and bf16, against the f64 reference;
//! * one Hiformer layer at the paper's shapes (L = 38, d = 128, H = 4, d_k = 16, d_v = 64,
//!   d_f = 512, r_k = 128, r_v = 1024), against the CPU backend;
//! * the in-batch softmax on a 4-rank in-process group, against one rank running the
//!   concatenated batch.
//!
//! It prints a table per op; the exit code is non-zero when any check fails.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use recfuse::cpu::reference::{self, LinearDims, RefBranch, RefCrossLayer};
use recfuse::dist::{CrossBatch, CrossDeviceSoftmax, LocalGroup};
use recfuse::ops::gated_cross::{BranchWeight, GatedCross, Init, SavePolicy};
use recfuse::ops::hiformer::{HiformerLayer, LayerConfig, LayerParams, QkvParams};
use recfuse::ops::inbatch_softmax::{InBatchSoftmax, RowKind};
use recfuse::ops::linear::{self, Linear};
use recfuse::{Activation, DType, Device, Tensor, WgpuOptions};

const M: usize = 512;
const K: usize = 256;
const N: usize = 128;

/// Normwise relative error each dtype must stay within: `max|got − ref| / max|ref|`, per output.
/// bf16 stores 8 significant bits (unit roundoff 2⁻⁸ ≈ 0.0039); its budget covers the rounding
/// of the output and of the stored pre-activation and `dZ`.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
    }
}

fn cfg() -> Linear {
    Linear {
        activation: Activation::Gelu,
        ..Default::default()
    }
}

/// Deterministic inputs in [-scale, scale) without a random-number crate.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |a, (g, w)| a.max((g - w).abs()));
    if got.iter().any(|v| !v.is_finite()) || got.len() != want.len() {
        f64::INFINITY
    } else {
        err / scale
    }
}

/// Median wall time of `f` (device synchronised), repeated for at most ~0.3 s. On the emulated
/// CUDA device a time means nothing, so the call runs once (for its result).
fn median_time(dev: &Device, mut f: impl FnMut() -> recfuse::Result<()>) -> recfuse::Result<f64> {
    let mut times = Vec::new();
    let start = Instant::now();
    let min_reps = if dev.is_emulated() { 1 } else { 3 };
    while times.len() < min_reps
        || (!dev.is_emulated() && start.elapsed() < Duration::from_millis(300) && times.len() < 50)
    {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

struct Row {
    fwd_ms: f64,
    fwd_bwd_ms: f64,
    err: f64,
}

fn run(dev: &Device, dtype: DType) -> recfuse::Result<Row> {
    let x = Tensor::from_f32(&values(M * K, 1, 1.0), &[M, K], dtype, dev)?;
    let w = Tensor::from_f32(&values(N * K, 2, 1.0 / 16.0), &[N, K], dtype, dev)?;
    let b = Tensor::from_f32(&values(N, 3, 0.1), &[N], dtype, dev)?;
    let dy = Tensor::from_f32(&values(M * N, 4, 1.0), &[M, N], dtype, dev)?;
    let cfg = cfg();

    // The checked run (it also warms up kernel caches and pipelines).
    let fwd = linear::forward(&x, &w, Some(&b), None, &cfg)?;
    let pre = fwd.pre.as_ref().expect("GELU keeps the pre-activation");
    let g = linear::backward(&x, &w, Some(pre), &dy, &cfg, true)?;

    // The oracle sees exactly the values the backend stored (rounded inputs, stored `pre`).
    let d = LinearDims {
        rows: M,
        groups: 1,
        inp: K,
        out: N,
    };
    let (x64, w64, b64) = (x.to_f64_vec()?, w.to_f64_vec()?, b.to_f64_vec()?);
    let (y_ref, _) = reference::linear_forward(d, &x64, &w64, Some(&b64), None, Activation::Gelu);
    let (dx_ref, dw_ref, db_ref) = reference::linear_backward(
        d,
        &x64,
        &w64,
        &pre.to_f64_vec()?,
        &dy.to_f64_vec()?,
        Activation::Gelu,
    );
    let db = g.db.as_ref().expect("asked for the bias gradient");
    let err = [
        rel_err(&fwd.y.to_f64_vec()?, &y_ref),
        rel_err(&g.dx.to_f64_vec()?, &dx_ref),
        rel_err(&g.dw.to_f64_vec()?, &dw_ref),
        rel_err(&db.to_f64_vec()?, &db_ref),
    ]
    .into_iter()
    .fold(0.0, f64::max);

    let fwd_s = median_time(dev, || {
        linear::forward(&x, &w, Some(&b), None, &cfg).map(drop)
    })?;
    let fwd_bwd_s = median_time(dev, || {
        let f = linear::forward(&x, &w, Some(&b), None, &cfg)?;
        linear::backward(&x, &w, f.pre.as_ref(), &dy, &cfg, true).map(drop)
    })?;
    Ok(Row {
        fwd_ms: fwd_s * 1e3,
        fwd_bwd_ms: fwd_bwd_s * 1e3,
        err,
    })
}

/// Prints one result line and counts failures; an unsupported op is reported, not failed.
fn report(
    label: &str,
    what: &str,
    res: recfuse::Result<Row>,
    tol: f64,
    flops: f64,
    failed: &mut usize,
) {
    match res {
        Ok(r) => {
            let ok = r.err <= tol;
            *failed += usize::from(!ok);
            let rate = if flops.is_nan() {
                "–".to_string()
            } else {
                format!("{:.2}", flops / (r.fwd_bwd_ms * 1e-3) / 1e9)
            };
            println!(
                "{label:<16} | {what:<22} | {:>9.3} | {:>12.3} | {rate:>9} | {:>11.2e} | {}",
                r.fwd_ms,
                r.fwd_bwd_ms,
                r.err,
                if ok { "yes" } else { "NO" }
            );
        }
        Err(e @ recfuse::Error::Unsupported { .. }) => {
            println!("{label:<16} | {what:<22} | not on this backend yet: {e}")
        }
        Err(e) => {
            *failed += 1;
            println!("{label:<16} | {what:<22} | ERROR: {e}");
        }
    }
}

fn header() {
    println!(
        "{:<16} | {:<22} | {:>9} | {:>12} | {:>9} | {:>11} | ok",
        "backend", "op", "fwd ms", "fwd+bwd ms", "GFLOP/s", "max rel err"
    );
    println!("{}", "-".repeat(103));
}

const GC_B: usize = 1024;
const GC_D: usize = 189;
const GC_L: usize = 3;

fn branch_ref(b: &BranchWeight) -> recfuse::Result<RefBranch> {
    Ok(match b {
        BranchWeight::Full(w) => RefBranch::Full(w.to_f64_vec()?),
        BranchWeight::LowRank { u, v } => RefBranch::LowRank {
            u: u.to_f64_vec()?,
            v: v.to_f64_vec()?,
            r: v.shape()[0],
        },
    })
}

/// A 3-layer GDCN stack at an FDO width, against the f64 reference.
fn gated(dev: &Device, dtype: DType) -> recfuse::Result<Row> {
    let net = GatedCross {
        dtype,
        ..GatedCross::new(GC_D, GC_L)
    };
    let weights = net.init(Init::Gdcn, 5, dev)?;
    let params = net.pack(&weights, dev)?;
    let x0 = Tensor::from_f32(&values(GC_B * GC_D, 6, 1.0), &[GC_B, GC_D], dtype, dev)?;
    let dy = Tensor::from_f32(&values(GC_B * GC_D, 7, 1.0), &[GC_B, GC_D], dtype, dev)?;
    let (y, saved) = net.forward(&x0, &params, SavePolicy::SaveAll)?;
    let (dx, _grads) = net.backward(&params, &saved, &dy)?;
    let layers: Vec<RefCrossLayer> = weights
        .iter()
        .map(|w| {
            Ok(RefCrossLayer {
                wc: branch_ref(&w.w_c)?,
                bc: w.b_c.to_f64_vec()?,
                wg: w.w_g.as_ref().map(branch_ref).transpose()?,
                bg: w.b_g.as_ref().map(|t| t.to_f64_vec()).transpose()?,
            })
        })
        .collect::<recfuse::Result<_>>()?;
    let x64 = x0.to_f64_vec()?;
    let y_ref = reference::gated_cross_forward(GC_B, GC_D, &x64, &layers);
    let (dx_ref, _) = reference::gated_cross_backward(GC_B, GC_D, &x64, &layers, &dy.to_f64_vec()?);
    let err = rel_err(&y.to_f64_vec()?, &y_ref).max(rel_err(&dx.to_f64_vec()?, &dx_ref));
    let fwd_s = median_time(dev, || {
        net.forward(&x0, &params, SavePolicy::SaveAll).map(drop)
    })?;
    let fwd_bwd_s = median_time(dev, || {
        let (_, s) = net.forward(&x0, &params, SavePolicy::SaveAll)?;
        net.backward(&params, &s, &dy).map(drop)
    })?;
    Ok(Row {
        fwd_ms: fwd_s * 1e3,
        fwd_bwd_ms: fwd_bwd_s * 1e3,
        err,
    })
}

const HF_B: usize = 64;

fn hiformer_cfg() -> HiformerLayer {
    HiformerLayer {
        cfg: LayerConfig::new(38, 128, 4, 16, 64, 512),
        rank_qk: 128,
        rank_v: 1024,
    }
}

/// One Hiformer layer at the paper's shapes; every backend against the CPU backend.
fn hiformer(dev: &Device, cpu_out: &mut Option<(Vec<f64>, Vec<f64>)>) -> recfuse::Result<Row> {
    let layer = hiformer_cfg();
    let host = layer.init(9, &Device::cpu())?;
    let on = |t: &Tensor| t.to_device(dev);
    let qkv = match &host.qkv {
        QkvParams::LowRank(w) => QkvParams::LowRank(recfuse::ops::lowrank_qkv::QkvWeights {
            a: on(&w.a)?,
            rq: on(&w.rq)?,
            rk: on(&w.rk)?,
            rv: on(&w.rv)?,
        }),
        QkvParams::PerToken { .. } => unreachable!("a Hiformer layer has low-rank weights"),
    };
    let p = LayerParams {
        qkv,
        wo: on(&host.wo)?,
        bo: on(&host.bo)?,
        w1: on(&host.w1)?,
        b1: on(&host.b1)?,
        w2: on(&host.w2)?,
        b2: on(&host.b2)?,
        ln1_g: on(&host.ln1_g)?,
        ln1_b: on(&host.ln1_b)?,
        ln2_g: on(&host.ln2_g)?,
        ln2_b: on(&host.ln2_b)?,
    };
    let (l, d) = (38, 128);
    let x = Tensor::from_f32(
        &values(HF_B * l * d, 10, 1.0),
        &[HF_B, l, d],
        DType::F32,
        dev,
    )?;
    let dz = Tensor::from_f32(
        &values(HF_B * l * d, 11, 1.0),
        &[HF_B, l, d],
        DType::F32,
        dev,
    )?;
    let (z, s) = layer.forward(&x, &p, None)?;
    let (dx, _) = layer.backward(&p, &s, &dz)?;
    let (z, dx) = (z.to_f64_vec()?, dx.to_f64_vec()?);
    let err = match cpu_out {
        Some((zc, dxc)) => rel_err(&z, zc).max(rel_err(&dx, dxc)),
        None => {
            *cpu_out = Some((z, dx));
            0.0
        }
    };
    let fwd_s = median_time(dev, || layer.forward(&x, &p, None).map(drop))?;
    let fwd_bwd_s = median_time(dev, || {
        let (_, s) = layer.forward(&x, &p, None)?;
        layer.backward(&p, &s, &dz).map(drop)
    })?;
    Ok(Row {
        fwd_ms: fwd_s * 1e3,
        fwd_bwd_ms: fwd_bwd_s * 1e3,
        err,
    })
}

/// One rank's loss share, query gradients and positive-item gradients.
type RankOut = (f64, Vec<f64>, Vec<f64>);

/// The in-batch softmax on 4 in-process ranks (uneven batches) against one rank running the
/// concatenated batch (CPU tensors: the collectives are in-process).
fn softmax_4_ranks() -> recfuse::Result<Row> {
    let (d, sizes) = (64, [300usize, 200, 260, 264]);
    let cfg = CrossDeviceSoftmax {
        loss: InBatchSoftmax {
            kappa: 20.0,
            l2_normalize: true,
            ..Default::default()
        },
        owner_computes: false,
    };
    let offs: Vec<usize> = sizes
        .iter()
        .scan(0, |a, &s| {
            let o = *a;
            *a += s;
            Some(o)
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let (qa, pa) = (values(total * d, 12, 1.0), values(total * d, 13, 1.0));
    let ids: Vec<i64> = (0..total as i64).map(|i| i % 900).collect();
    let lq: Vec<f32> = values(total, 14, 1.0).iter().map(|v| -3.0 + v).collect();
    let run = |comm: &dyn recfuse::dist::Communicator,
               lo: usize,
               n: usize|
     -> recfuse::Result<(f64, Vec<f64>, Vec<f64>)> {
        let cpu = Device::cpu();
        let q = Tensor::from_f32(&qa[lo * d..(lo + n) * d], &[n, d], DType::F32, &cpu)?;
        let p = Tensor::from_f32(&pa[lo * d..(lo + n) * d], &[n, d], DType::F32, &cpu)?;
        let kind = vec![RowKind::Pos; n];
        let w = vec![1.0f32; n];
        let batch = CrossBatch {
            queries: &q,
            positives: &p,
            pos_ids: &ids[lo..lo + n],
            pos_log_q: Some(&lq[lo..lo + n]),
            negatives: None,
            neg_ids: &[],
            neg_log_q: None,
            kind: &kind,
            weight: &w,
            query_ids: None,
        };
        let f = cfg.forward(comm, &batch)?;
        let g = cfg.backward(comm, &batch, &f)?;
        Ok((f.loss, g.dq.to_f64_vec()?, g.d_pos.to_f64_vec()?))
    };
    let t0 = Instant::now();
    let one = LocalGroup::ranks(1)?;
    let (l1, dq1, dp1) = run(&one[0], 0, total)?;
    let t_one = t0.elapsed().as_secs_f64();
    let comms = LocalGroup::ranks(4)?;
    let t0 = Instant::now();
    let outs: Vec<recfuse::Result<RankOut>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let (lo, n, run) = (offs[r], sizes[r], &run);
                s.spawn(move || run(c, lo, n))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(recfuse::Error::Backend {
                        backend: "quickstart",
                        reason: "a rank panicked".into(),
                    })
                })
            })
            .collect()
    });
    let t_four = t0.elapsed().as_secs_f64();
    let outs = outs.into_iter().collect::<recfuse::Result<Vec<_>>>()?;
    let loss: f64 = outs.iter().map(|o| o.0).sum();
    let dq: Vec<f64> = outs.iter().flat_map(|o| o.1.clone()).collect();
    let dp: Vec<f64> = outs.iter().flat_map(|o| o.2.clone()).collect();
    let err = ((loss - l1).abs() / l1.abs())
        .max(rel_err(&dq, &dq1))
        .max(rel_err(&dp, &dp1));
    Ok(Row {
        fwd_ms: t_one * 1e3,
        fwd_bwd_ms: t_four * 1e3,
        err,
    })
}

fn main() -> ExitCode {
    recfuse::prepare_headless();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let software = args.iter().any(|a| a == "--software");
    if let Some(a) = args.iter().find(|a| *a != "--software") {
        eprintln!("unknown argument {a:?}; usage: quickstart [--software]");
        return ExitCode::FAILURE;
    }
    let mut found: Vec<(String, Device)> = vec![("cpu".into(), Device::cpu())];
    let mut missing: Vec<String> = Vec::new();
    match Device::wgpu(&WgpuOptions::default()) {
        Ok(d) => found.push(("wgpu".into(), d)),
        Err(hw) if !software => missing.push(format!(
            "wgpu: {hw} (pass --software to run a software adapter)"
        )),
        Err(hw) => match Device::wgpu(&WgpuOptions {
            allow_software: true,
        }) {
            Ok(d) => found.push(("wgpu (software)".into(), d)),
            Err(e) => missing.push(format!("wgpu: {hw}; software adapter: {e}")),
        },
    }
    match Device::cuda(0) {
        // tools/cuda-emu runs the CUDA kernels on the CPU: its rows check them, its times are
        // not GPU times.
        Ok(d) if d.is_emulated() => found.push(("cuda (emulated)".into(), d)),
        Ok(d) => found.push(("cuda".into(), d)),
        Err(e) => missing.push(format!("cuda: {e}")),
    }

    println!("recfuse quickstart: linear {M}x{K} -> {N}, bias + GELU, forward and backward");
    for (label, d) in &found {
        println!("  found    {label}: {}", d.describe());
    }
    for m in &missing {
        println!("  missing  {m}");
    }
    println!();
    println!(
        "{:<16} | {:<5} | {:>9} | {:>12} | {:>9} | {:>11} | ok",
        "backend", "dtype", "fwd ms", "fwd+bwd ms", "GFLOP/s", "max rel err"
    );
    println!("{}", "-".repeat(86));
    let flops = 6.0 * (M * K * N) as f64;
    let mut failed = 0;
    for (label, dev) in &found {
        for dtype in [DType::F32, DType::BF16] {
            match run(dev, dtype) {
                Ok(r) => {
                    let ok = r.err <= tolerance(dtype);
                    failed += usize::from(!ok);
                    println!(
                        "{label:<16} | {:<5} | {:>9.3} | {:>12.3} | {:>9.2} | {:>11.2e} | {}",
                        dtype.name(),
                        r.fwd_ms,
                        r.fwd_bwd_ms,
                        flops / (r.fwd_bwd_ms * 1e-3) / 1e9,
                        r.err,
                        if ok { "yes" } else { "NO" }
                    );
                }
                // An op a backend does not implement for a dtype says so; it is not a wrong answer.
                Err(e @ recfuse::Error::Unsupported { .. }) => {
                    println!("{label:<16} | {:<5} | unsupported: {e}", dtype.name());
                }
                Err(e) => {
                    failed += 1;
                    println!("{label:<16} | {:<5} | ERROR: {e}", dtype.name());
                }
            }
        }
    }
    println!();
    println!("GFLOP/s counts the three matrix products of forward+backward (6·M·K·N).");

    println!();
    println!("gated cross (GDCN): {GC_L} layers, width {GC_D} (an FDO width), batch {GC_B}; against the f64 reference");
    header();
    let gflops = 12.0 * (GC_B * GC_D * GC_D * GC_L) as f64;
    for (label, dev) in &found {
        for dtype in [DType::F32, DType::BF16] {
            report(
                label,
                &format!("gated_cross {}", dtype.name()),
                gated(dev, dtype),
                tolerance(dtype) * 4.0,
                gflops,
                &mut failed,
            );
        }
    }
    println!("GFLOP/s counts 12·B·D²·L (forward 4, backward 8 per layer).");

    println!();
    println!("Hiformer layer, paper shapes (L=38, d=128, H=4, d_k=16, d_v=64, d_f=512, r_k=128, r_v=1024), batch {HF_B}, f32; against the CPU backend (the CPU row is the reference)");
    header();
    let mut cpu_out = None;
    for (label, dev) in &found {
        report(
            label,
            "hiformer f32",
            hiformer(dev, &mut cpu_out),
            1e-4,
            f64::NAN,
            &mut failed,
        );
    }

    println!();
    println!("in-batch softmax, 4 in-process ranks (uneven 300/200/260/264 rows, d=64, logQ, L2) vs one rank on the concatenated batch");
    println!("(the 'fwd ms' column is the 1-rank run, 'fwd+bwd ms' the 4-rank run; both forward+backward)");
    header();
    report(
        "cpu x4 ranks",
        "inbatch_softmax f32",
        softmax_4_ranks(),
        1e-5,
        f64::NAN,
        &mut failed,
    );
    if failed == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{failed} check(s) FAILED");
        ExitCode::FAILURE
    }
}
