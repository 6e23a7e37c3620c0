//! Where the WGSL launch parameters live (`RECFUSE_WGPU_PARAMS`, src/wgpu/pipelines.rs
//! `ParamsIn`): both choices give the same bits, a bad value is refused by name, and the
//! default on this adapter does not grow host memory per call. Mesa lavapipe leaked ~7.5 MB
//! per in-batch softmax forward + backward with uniform parameter blocks (the two-tower
//! trainer was OOM-killed at 24 GB); storage buffers, the software-adapter default, do not.
//! (Its own test binary: it sets an environment variable, which no other thread may read then,
//! and it reads the process's resident set. Named `wgpu_*` so the emulated-CUDA pass skips it.)

use recfuse::ops::inbatch_softmax::{Columns, InBatchSoftmax, RowKind, Rows};
use recfuse::{DType, Device, Error, Tensor, WgpuOptions};

/// Resident set in MiB (Linux).
fn rss_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm resident field");
    pages * 4096 / (1 << 20)
}

fn open(params: Option<&str>) -> recfuse::Result<Device> {
    match params {
        Some(v) => std::env::set_var("RECFUSE_WGPU_PARAMS", v),
        None => std::env::remove_var("RECFUSE_WGPU_PARAMS"),
    }
    let dev = Device::wgpu(&WgpuOptions {
        allow_software: true,
    });
    std::env::remove_var("RECFUSE_WGPU_PARAMS");
    dev
}

struct Inputs {
    b: usize,
    n: usize,
    d: usize,
    q: Vec<f32>,
    c: Vec<f32>,
    target: Vec<u32>,
    kind: Vec<RowKind>,
    weight: Vec<f32>,
    ids: Vec<i64>,
    log_q: Vec<f32>,
}

fn inputs() -> Inputs {
    use rand::{Rng, SeedableRng};
    let (b, n, d) = (512, 1024, 32);
    let mut r = rand::rngs::StdRng::seed_from_u64(0x5eed_9a7a);
    Inputs {
        b,
        n,
        d,
        q: (0..b * d).map(|_| r.random_range(-1.0..1.0)).collect(),
        c: (0..n * d).map(|_| r.random_range(-1.0..1.0)).collect(),
        target: (0..b).map(|i| (i * 3 % n) as u32).collect(),
        kind: (0..b)
            .map(|i| {
                if i % 7 == 3 {
                    RowKind::Ntr
                } else {
                    RowKind::Pos
                }
            })
            .collect(),
        weight: (0..b).map(|_| r.random_range(0.5..1.5)).collect(),
        // Every tenth column repeats an earlier id: accidental hits to mask.
        ids: (0..n as i64)
            .map(|j| if j % 10 == 9 { j - 5 } else { j })
            .collect(),
        log_q: (0..n).map(|_| r.random_range(-8.0..-2.0)).collect(),
    }
}

/// One fused forward + backward (L2, logQ, ids, NTR rows): loss, dq, dc, dκ as bits.
fn step(dev: &Device, x: &Inputs) -> (u64, Vec<u32>, Vec<u32>, u32) {
    let q = Tensor::from_f32(&x.q, &[x.b, x.d], DType::F32, dev).expect("q");
    let c = Tensor::from_f32(&x.c, &[x.n, x.d], DType::F32, dev).expect("c");
    let rows = Rows {
        queries: &q,
        target: &x.target,
        kind: &x.kind,
        weight: &x.weight,
        query_ids: None,
    };
    let cols = Columns {
        emb: &c,
        log_q: Some(&x.log_q),
        ids: Some(&x.ids),
        valid: None,
        query_ids: None,
    };
    let cfg = InBatchSoftmax {
        l2_normalize: true,
        kappa: 12.0,
        learn_kappa: true,
        ..Default::default()
    };
    let f = cfg.forward(&rows, &cols, None).expect("forward");
    let g = cfg.backward(&rows, &cols, &f).expect("backward");
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_vec::<f32>()
            .expect("download")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    (
        f.loss.to_bits(),
        bits(&g.dq),
        bits(&g.dc),
        g.dkappa.to_bits(),
    )
}

#[test]
fn parameter_blocks_agree_are_checked_and_do_not_leak() {
    recfuse::prepare_headless();
    match open(Some("sideways")) {
        Err(Error::InvalidArgument {
            arg: "RECFUSE_WGPU_PARAMS",
            ..
        }) => {}
        Err(Error::DeviceUnavailable { .. }) => {}
        other => panic!("RECFUSE_WGPU_PARAMS=sideways: {other:?}"),
    }
    let dev = match open(None) {
        Ok(d) => d,
        Err(e) => {
            let required = std::env::var("RECFUSE_REQUIRE").unwrap_or_default();
            assert!(
                !required.split(',').any(|b| b.trim() == "wgpu"),
                "RECFUSE_REQUIRE has wgpu, but it did not open: {e}"
            );
            eprintln!("[recfuse tests] wgpu absent, parameter-block checks not run: {e}");
            return;
        }
    };
    eprintln!(
        "[recfuse tests] wgpu parameter blocks on {}",
        dev.describe()
    );
    let x = inputs();

    // The same kernels with uniform and with storage parameter blocks: the same bits.
    let want = step(&dev, &x);
    for mode in ["uniform", "storage"] {
        let other = open(Some(mode)).expect("a second device on the same adapter");
        assert!(
            step(&other, &x) == want,
            "RECFUSE_WGPU_PARAMS={mode} changed the results"
        );
    }

    // Host memory of the default: flat after a warm-up (pipelines compiled, pools filled).
    for _ in 0..4 {
        step(&dev, &x);
    }
    let before = rss_mib();
    let calls = 24;
    for _ in 0..calls {
        step(&dev, &x);
    }
    let grown = rss_mib().saturating_sub(before);
    eprintln!("[recfuse tests] {calls} softmax fwd+bwd calls grew the resident set {grown} MiB");
    // The lavapipe leak was ~7.5 MB per call here (the uniform blocks grew 319 MiB over 40 calls at this shape; 0 at B = 96, N = 320).
    assert!(
        grown < 32,
        "{calls} calls grew the resident set by {grown} MiB on {}",
        dev.describe()
    );
}
