//! Diagnostic for a known, unfixed problem (docs/TRAINING.md, "Known problem"): host memory
//! growth of the in-batch softmax on WGSL. Loops 200 fused forward(+backward) calls at
//! B = 512, N = 1024, d = 32 on a wgpu adapter (software allowed) and prints the resident set.
//! `cargo run --example wgpu_softmax_memory -- MODE`, MODE one of `alloc` (uploads only), `dl`
//! (uploads + a download), `fwd`, `both`, `l2` (both, L2-normalised). Linux only (reads
//! /proc/self/statm). Measured 2026-12-07 on lavapipe: alloc and dl stay flat (~75–113 MB),
//! fwd grows ~1.4 MB per call, fwd+bwd ~7.5 MB per call; the growth per forward is the same
//! for N = 64 and N = 4096 (`PROBE_N`, default 1024), and the pipeline cache misses only on the
//! first call, so it is a fixed cost per launch or per call, not data and not pipelines.

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
    let (b, d) = (512usize, 32usize);
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
    for it in 0..200 {
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
