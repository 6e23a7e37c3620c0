//! What every bench binary shares: the backends to run (and what was skipped, said loudly) and
//! the timing loop (a batch of calls closed by one device synchronize, so GPU numbers are
//! completion times, not enqueue times).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use recfuse::{Device, WgpuOptions};

/// Runs `iters` calls back to back and one synchronize; returns the wall time of the batch.
pub fn timed(dev: &Device, iters: u64, mut call: impl FnMut() -> recfuse::Result<()>) -> Duration {
    dev.synchronize().expect("synchronize before the batch");
    let t0 = Instant::now();
    for _ in 0..iters {
        call().expect("an op that passed the probe failed while timing");
    }
    dev.synchronize().expect("synchronize after the batch");
    t0.elapsed()
}

/// Backends to benchmark, with a name for the group prefix, and lines saying what was skipped.
fn probe() -> (Vec<(String, Device)>, Vec<String>) {
    let mut run = vec![("cpu".to_string(), Device::cpu())];
    let mut skipped = Vec::new();
    match Device::wgpu(&WgpuOptions::default()) {
        Ok(d) => run.push(("wgpu".into(), d)),
        Err(hw) => {
            if std::env::var("RECFUSE_BENCH_SOFTWARE").as_deref() == Ok("1") {
                match Device::wgpu(&WgpuOptions {
                    allow_software: true,
                }) {
                    Ok(d) => run.push(("wgpu-sw".into(), d)),
                    Err(e) => skipped.push(format!("wgpu: {hw}; software adapter: {e}")),
                }
            } else {
                skipped.push(format!(
                    "wgpu: {hw} (software adapters only with RECFUSE_BENCH_SOFTWARE=1)"
                ));
            }
        }
    }
    match Device::cuda(0) {
        // tools/cuda-emu executes the kernels on the CPU: a time measured there is not a GPU
        // time, so it is never reported as one.
        Ok(d) if d.is_emulated() => skipped.push(format!(
            "cuda: {} is emulated; its times would mean nothing",
            d.describe()
        )),
        Ok(d) => run.push(("cuda".into(), d)),
        Err(e) => skipped.push(format!("cuda: {e}")),
    }
    (run, skipped)
}

/// The backends to benchmark (CPU always; a hardware wgpu adapter, or a software one with
/// `RECFUSE_BENCH_SOFTWARE=1`; CUDA when present), printed with the skipped ones.
pub fn backends() -> Vec<(String, Device)> {
    let (run, skipped) = probe();
    let names: Vec<String> = run
        .iter()
        .map(|(l, d)| format!("{l} [{}]", d.describe()))
        .collect();
    println!("recfuse bench: backends run: {}", names.join(", "));
    for s in &skipped {
        println!("recfuse bench: backend skipped: {s}");
    }
    run
}

/// `RECFUSE_BENCH_LARGE=1` adds the GPU-sized shapes to the CPU runs too.
pub fn large() -> bool {
    std::env::var("RECFUSE_BENCH_LARGE").as_deref() == Ok("1")
}
