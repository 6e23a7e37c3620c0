//! Quickstart: `cargo run --release --example quickstart`.
//!
//! Opens every backend this machine has (the CPU always; wgpu, with a software adapter such as
//! Mesa lavapipe allowed but labelled; CUDA when a GPU and libnvrtc are present), says why the
//! others are missing, runs one linear layer `gelu(x·Wᵀ + b)` forward and backward in f32 and
//! bf16 on each, checks every output against the f64 CPU reference, and prints a table. The
//! exit code is non-zero when any check fails.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use recfuse::cpu::reference::{self, LinearDims};
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

/// Median wall time of `f` (device synchronised), repeated for at most ~0.3 s.
fn median_time(dev: &Device, mut f: impl FnMut() -> recfuse::Result<()>) -> recfuse::Result<f64> {
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < Duration::from_millis(300) && times.len() < 50) {
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

fn main() -> ExitCode {
    let mut found: Vec<(String, Device)> = vec![("cpu".into(), Device::cpu())];
    let mut missing: Vec<String> = Vec::new();
    match Device::wgpu(&WgpuOptions::default()) {
        Ok(d) => found.push(("wgpu".into(), d)),
        Err(hw) => match Device::wgpu(&WgpuOptions {
            allow_software: true,
        }) {
            Ok(d) => found.push(("wgpu (software)".into(), d)),
            Err(e) => missing.push(format!("wgpu: {hw}; software adapter: {e}")),
        },
    }
    match Device::cuda(0) {
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
    if failed == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{failed} check(s) FAILED");
        ExitCode::FAILURE
    }
}
