//! Diagnostic for a found and worked-around Mesa lavapipe leak (docs/TRAINING.md): host memory
//! of the in-batch softmax on WGSL. Loops PROBE_IT (default 200) fused forward(+backward) calls
//! at B = PROBE_B (512), N = PROBE_N (1024), d = 32 on a wgpu adapter (software allowed) and
//! prints the resident set. `cargo run --example wgpu_softmax_memory -- MODE`, MODE one of
//! `alloc` (uploads only), `dl` (uploads + a download), `fwd`, `both`, `l2` (both,
//! L2-normalised). Linux only (reads /proc/self/statm).
//!
//! Measured 2026-12-07 on lavapipe (Mesa 22.3.6, LLVM 15): with the launch parameters in
//! uniform blocks (`RECFUSE_WGPU_PARAMS=uniform`) fwd grew ~1.4 MB per call and fwd+bwd
//! ~7.5 MB, the same for N = 64 and 4096, with no pipeline rebuilt. Bisected by editing the
//! shader: the growth came only from `fwd_main` (and the gradient kernels), and within it
//! only from a branch on the uniform `P.flags` guarding a storage read (`if (has(F_L2)) { x /=
//! norms[i]; }`); heaptrack saw just ~1 MB of malloc leaks in the driver's threads, so the rest
//! is mapped memory inside lavapipe. The same block bound as a read-only storage buffer does
//! not grow (fwd+bwd 166 → 172 MB over 100 calls), which is now the software-adapter default.

use recfuse::ops::inbatch_softmax::{Columns, InBatchSoftmax, RowKind, Rows};
use recfuse::{DType, Device, Tensor, WgpuOptions};
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4 / 1024
}
fn main() {
    // A diagnostic: panicking on a missing adapter or a failed call is the right report.
    recfuse::prepare_headless();
    let dev = Device::wgpu(&WgpuOptions {
        allow_software: true,
    })
    .unwrap();
    let which = std::env::args().nth(1).unwrap_or_default();
    let n: usize = std::env::var("PROBE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let b: usize = std::env::var("PROBE_B")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let d = 32usize;
    let qv: Vec<f32> = (0..b * d)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let cv: Vec<f32> = (0..n * d)
        .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let target: Vec<u32> = (0..b as u32).collect();
    let kind = vec![RowKind::Pos; b];
    let weight = vec![1.0f32; b];
    let ids: Vec<i64> = (0..n as i64).collect();
    let lq: Vec<f32> = vec![-3.0; n];
    let cfg = InBatchSoftmax {
        l2_normalize: which.contains("l2"),
        kappa: 20.0,
        ..Default::default()
    };
    let iters: usize = std::env::var("PROBE_IT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for it in 0..iters {
        let q = Tensor::from_f32(&qv, &[b, d], DType::F32, &dev).unwrap();
        let c = Tensor::from_f32(&cv, &[n, d], DType::F32, &dev).unwrap();
        if which.contains("alloc") {
            continue;
        }
        if which.contains("dl") {
            let _ = q.to_vec::<f32>().unwrap();
            if it % 50 == 0 {
                println!("{which} it {it} rss {} MB", rss());
            }
            continue;
        }
        let rows = Rows {
            queries: &q,
            target: &target,
            kind: &kind,
            weight: &weight,
            query_ids: None,
        };
        let cols = Columns {
            emb: &c,
            log_q: Some(&lq),
            ids: Some(&ids),
            valid: None,
            query_ids: None,
        };
        let f = cfg.forward(&rows, &cols, None).unwrap();
        if !which.contains("fwd") {
            let _g = cfg.backward(&rows, &cols, &f).unwrap();
        }
        if it % 50 == 0 {
            println!("{which} it {it} rss {} MB", rss());
        }
    }
    println!("{which} end rss {} MB", rss());
}
