//! The test harness shared by every kernel family: each check is written once and run on every
//! backend present; absent backends are reported loudly, and `RECFUSE_REQUIRE=wgpu,cuda`
//! turns an absent one into a failure.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use recfuse::{DType, Device, Tensor, WgpuOptions};

pub mod dist;
pub mod softmax;

/// A backend the tests run on.
#[derive(Clone)]
pub struct Backend {
    pub name: &'static str,
    pub device: Device,
}

fn required(token: &str) -> bool {
    std::env::var("RECFUSE_REQUIRE")
        .map(|v| v.split(',').any(|t| t.trim() == token))
        .unwrap_or(false)
}

/// `RECFUSE_TEST_BACKENDS=cuda` (a comma list of cpu, wgpu, cuda) restricts the backends the
/// tests run on, e.g. for the emulated-CUDA pass, which need not repeat the CPU and WGSL runs.
fn selected(name: &str) -> bool {
    match std::env::var("RECFUSE_TEST_BACKENDS") {
        Ok(v) if !v.trim().is_empty() => {
            let on = v.split(',').any(|t| t.trim() == name);
            if !on {
                eprintln!(
                    "[recfuse tests] backend {name} not selected (RECFUSE_TEST_BACKENDS={v})"
                );
            }
            on
        }
        _ => true,
    }
}

fn open_backends() -> Vec<Backend> {
    // Before any adapter is enumerated, while the other test threads wait on the OnceLock.
    recfuse::device::prepare_headless();
    let mut out = Vec::new();
    if selected("cpu") {
        out.push(Backend {
            name: "cpu",
            device: Device::cpu(),
        });
    }
    if selected("wgpu") {
        out.extend(open_wgpu());
    }
    if selected("cuda") {
        out.extend(open_cuda());
    }
    assert!(
        !out.is_empty(),
        "RECFUSE_TEST_BACKENDS selects no backend that is present"
    );
    out
}

fn open_wgpu() -> Option<Backend> {
    match Device::wgpu(&WgpuOptions {
        allow_software: true,
    }) {
        Ok(d) => {
            eprintln!("[recfuse tests] backend wgpu: {}", d.describe());
            Some(Backend {
                name: "wgpu",
                device: d,
            })
        }
        Err(e) => {
            assert!(
                !required("wgpu"),
                "RECFUSE_REQUIRE has wgpu but it is unavailable: {e}"
            );
            eprintln!("[recfuse tests] SKIPPED backend wgpu: {e}");
            None
        }
    }
}

fn open_cuda() -> Option<Backend> {
    match Device::cuda(0) {
        Ok(d) => {
            eprintln!("[recfuse tests] backend cuda: {}", d.describe());
            Some(Backend {
                name: "cuda",
                device: d,
            })
        }
        Err(e) => {
            assert!(
                !required("cuda"),
                "RECFUSE_REQUIRE has cuda but it is unavailable: {e}"
            );
            eprintln!("[recfuse tests] SKIPPED backend cuda: {e}");
            None
        }
    }
}

/// Every backend present on this machine (opened once per test binary).
pub fn backends() -> Vec<Backend> {
    static CELL: OnceLock<Vec<Backend>> = OnceLock::new();
    let v = CELL.get_or_init(open_backends).clone();
    let names: Vec<_> = v.iter().map(|b| b.name).collect();
    eprintln!("[recfuse tests] running on: {}", names.join(", "));
    v
}

/// A fresh random generator; the seed comes from `RECFUSE_SEED` or the clock and is printed so
/// a failure can be replayed.
pub fn rng(tag: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("RECFUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("[recfuse tests] {tag}: RECFUSE_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// `n` values uniform in [-scale, scale).
pub fn uniform(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A tensor of random values rounded to `dtype`, plus the exact f64 values it holds.
pub fn random_tensor(
    rng: &mut impl Rng,
    shape: &[usize],
    scale: f32,
    dtype: DType,
    dev: &Device,
) -> (Tensor, Vec<f64>) {
    let n = shape.iter().product();
    let t = Tensor::from_f32(&uniform(rng, n, scale), shape, dtype, dev).expect("upload");
    let v = t.to_f64_vec().expect("download");
    (t, v)
}

/// The tolerance policy: allowed error, relative to the largest reference magnitude, for a
/// result stored in `dtype` after an f32 sum of `k` terms. f32 results differ from f64 only
/// by summation order (grows like √k); 16-bit results by the final rounding plus rounded
/// intermediates (dZ in the storage dtype).
pub fn tolerance(dtype: DType, k: usize) -> f64 {
    let acc = 2e-7 * (k.max(1) as f64).sqrt();
    match dtype {
        DType::F32 => 1e-5f64.max(4.0 * acc),
        DType::BF16 => 1.6e-2,
        DType::F16 => 2e-3,
    }
}

/// Compares every element (NaN anywhere fails: outputs are poisoned before kernels write).
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_close_scaled(what, got, want, tol, 0.0);
}

/// As `assert_close`, with the error measured against at least `floor`: for results that are
/// small differences of O(floor) terms (a cancelling gradient), whose rounding error is set by
/// the terms, not by the result.
pub fn assert_close_scaled(what: &str, got: &[f64], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs())).max(1e-30);
    let mut worst = (0usize, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g} (want {w}) — unwritten or overflow"
        );
        let e = (g - w).abs() / scale;
        if e > worst.1 {
            worst = (i, e);
        }
    }
    assert!(
        worst.1 <= tol,
        "{what}: max error {:.3e} (relative to max |ref| {scale:.3e}) at element {} (got {}, want {}) exceeds {tol:.1e}",
        worst.1,
        worst.0,
        got[worst.0],
        want[worst.0]
    );
}

/// Central finite differences of a scalar f64 function: ∂f/∂x_i for every i.
pub fn finite_diff(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xs[i];
            xs[i] = x0 + h;
            let fp = f(&xs);
            xs[i] = x0 - h;
            let fm = f(&xs);
            xs[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// For ops that do not exist on every backend yet: `Ok` runs the check's assertions; an
/// `Error::Unsupported` on a non-CPU backend is reported loudly (and is a failure under
/// `RECFUSE_REQUIRE=all-ops`); any other error fails the test.
pub fn supported(be: &Backend, what: &str, res: recfuse::Result<()>) -> bool {
    match res {
        Ok(()) => true,
        Err(recfuse::Error::Unsupported { op, what: why, .. }) if be.name != "cpu" => {
            assert!(
                !required("all-ops"),
                "{what}: {op} unsupported on {}: {why}",
                be.name
            );
            eprintln!(
                "[recfuse tests] NOT RUN on {}: {what}: {op} is not implemented there yet ({why})",
                be.name
            );
            false
        }
        Err(e) => panic!("{what} on {}: {e}", be.name),
    }
}
