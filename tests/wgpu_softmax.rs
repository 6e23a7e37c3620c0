//! The wgpu fused in-batch softmax against the f64 reference (`cpu::reference::inbatch_softmax`)
//! and the CPU backend, on what breaks its tiling: N not a multiple of the 64-wide tile (257,
//! 513), B = 1 (the column-split forward and query gradient), several row blocks, d past the
//! two register-resident 64-wide chunks (the read-modify-write path), inactive rows (padding,
//! invalid target, weight 0) and a row whose domain is only its target, every masking feature
//! on and off, L2 on and off, bf16/f16 inputs, and bitwise determinism across runs.
//!
//! Needs an adapter; a software one (Mesa lavapipe) is accepted. Without one every test prints
//! `SKIPPED: wgpu unavailable: <reason>` and passes, unless `RECFUSE_REQUIRE` names `wgpu`.

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use common::softmax::Problem;
use rand::rngs::StdRng;
use rand::SeedableRng;
use recfuse::cpu::reference::{self, RefRowKind, RefSoftmax};
use recfuse::ops::inbatch_softmax::{Columns, InBatchSoftmax, RowKind, Rows};
use recfuse::{DType, Device, Tensor, WgpuOptions};

fn device() -> Option<Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    let dev = DEV.get_or_init(|| {
        let d = Device::wgpu(&WgpuOptions {
            allow_software: true,
        })
        .map_err(|e| e.to_string());
        if let Ok(d) = &d {
            eprintln!("wgpu adapter: {}", d.describe());
        }
        d
    });
    match dev {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            let required = std::env::var("RECFUSE_REQUIRE").is_ok_and(|v| v.contains("wgpu"));
            assert!(!required, "RECFUSE_REQUIRE asks for wgpu, but: {e}");
            eprintln!("SKIPPED: wgpu unavailable: {e}");
            None
        }
    }
}

fn rng(tag: &str) -> StdRng {
    let seed = std::env::var("RECFUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_50f7);
    eprintln!("{tag}: RECFUSE_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

#[derive(Clone, Copy, Debug)]
struct Features {
    logq: bool,
    hits: bool,
    valid: bool,
    qid: bool,
    l2: bool,
}

const ALL: Features = Features {
    logq: true,
    hits: true,
    valid: true,
    qid: true,
    l2: true,
};
const NONE: Features = Features {
    logq: false,
    hits: false,
    valid: false,
    qid: false,
    l2: false,
};

/// The shared random problem (tests/common/softmax.rs) plus, when B > 2, one padding row
/// (w = 0) and one row with an invalid target.
fn problem(r: &mut StdRng, b: usize, n: usize, d: usize) -> Problem {
    let mut p = common::softmax::problem(r, b, n, d);
    if b > 2 {
        p.weight[b - 1] = 0.0;
        p.valid[p.target[1] as usize] = false;
    }
    p
}

struct Out {
    loss: f64,
    lse: Vec<f32>,
    s_t: Vec<f32>,
    dq: Vec<f32>,
    dc: Vec<f32>,
    dk: f32,
    /// The inputs as stored (rounded to the dtype), widened.
    qv: Vec<f64>,
    cv: Vec<f64>,
}

fn loss_of(f: Features, kappa: f32) -> InBatchSoftmax {
    InBatchSoftmax {
        kappa,
        learn_kappa: true,
        l2_normalize: f.l2,
        remove_accidental_hits: f.hits,
        ..Default::default()
    }
}

fn run(p: &Problem, f: Features, kappa: f32, dev: &Device, dtype: DType) -> Out {
    let q = Tensor::from_f32(&p.q, &[p.b, p.d], dtype, dev).unwrap();
    let c = Tensor::from_f32(&p.c, &[p.n, p.d], dtype, dev).unwrap();
    let rows = Rows {
        queries: &q,
        target: &p.target,
        kind: &p.kind,
        weight: &p.weight,
        query_ids: f.qid.then_some(p.row_qid.as_slice()),
    };
    let cols = Columns {
        emb: &c,
        log_q: f.logq.then_some(p.log_q.as_slice()),
        ids: f.hits.then_some(p.ids.as_slice()),
        valid: f.valid.then_some(p.valid.as_slice()),
        query_ids: f.qid.then_some(p.col_qid.as_slice()),
    };
    let loss = loss_of(f, kappa);
    let fwd = loss.forward(&rows, &cols, None).unwrap();
    let g = loss.backward(&rows, &cols, &fwd).unwrap();
    Out {
        loss: fwd.loss,
        lse: fwd.lse.clone(),
        s_t: fwd.s_target.clone(),
        dq: g.dq.to_f32_vec().unwrap(),
        dc: g.dc.to_f32_vec().unwrap(),
        dk: g.dkappa,
        qv: q.to_f64_vec().unwrap(),
        cv: c.to_f64_vec().unwrap(),
    }
}

fn reference_of(p: &Problem, f: Features, kappa: f32, o: &Out) -> reference::RefSoftmaxOut {
    let lq: Vec<f64> = p.log_q.iter().map(|&v| v as f64).collect();
    let w: Vec<f64> = p.weight.iter().map(|&v| v as f64).collect();
    let t: Vec<usize> = p.target.iter().map(|&v| v as usize).collect();
    let kind: Vec<RefRowKind> = p
        .kind
        .iter()
        .map(|k| match k {
            RowKind::Pos => RefRowKind::Pos,
            RowKind::Ntr => RefRowKind::Ntr,
        })
        .collect();
    reference::inbatch_softmax(&RefSoftmax {
        b: p.b,
        n: p.n,
        d: p.d,
        queries: &o.qv,
        cands: &o.cv,
        target: &t,
        kind: &kind,
        weight: &w,
        log_q: f.logq.then_some(lq.as_slice()),
        ids: f.hits.then_some(p.ids.as_slice()),
        valid: f.valid.then_some(p.valid.as_slice()),
        row_qid: f.qid.then_some(p.row_qid.as_slice()),
        col_qid: f.qid.then_some(p.col_qid.as_slice()),
        kappa: kappa as f64,
        l2: f.l2,
        eps: 1e-12,
        z: w.iter().sum(),
    })
}

/// max |got − want| relative to max |want|.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            assert!(g.is_finite(), "non-finite output {g} (want {w})");
            (g as f64 - w).abs() / scale
        })
        .fold(0.0, f64::max)
}

/// The wgpu result against the f64 reference on the same (rounded) inputs, and against the
/// CPU backend's LSE and target logits row by row.
fn check(what: &str, p: &Problem, f: Features, dtype: DType) {
    let Some(dev) = device() else { return };
    let kappa = 4.0;
    let t0 = Instant::now();
    let o = run(p, f, kappa, &dev, dtype);
    let dt = t0.elapsed();
    let want = reference_of(p, f, kappa, &o);
    // Inputs are identical on both sides (rounded once), so only f32 summation order and the
    // device's exp differ: f32-level tolerances for every dtype, plus the final rounding of dq,
    // which comes back in the queries' dtype.
    let tol = 2e-5 * (p.n.max(p.d) as f64).sqrt().max(4.0);
    let dq_tol = tol
        + match dtype {
            DType::F32 => 0.0,
            DType::BF16 => 2f64.powi(-8),
            DType::F16 => 2f64.powi(-11),
        };
    let what = format!("{what} {dtype} b={} n={} d={} {f:?}", p.b, p.n, p.d);
    eprintln!("{what}: {dt:.2?}");
    assert!(
        (o.loss - want.loss).abs() <= tol * want.loss.abs().max(1.0),
        "{what}: loss {} vs {}",
        o.loss,
        want.loss
    );
    let e = rel_err(&o.dq, &want.dq);
    assert!(e <= dq_tol, "{what}: dq error {e:.3e} > {dq_tol:.1e}");
    let e = rel_err(&o.dc, &want.dc);
    assert!(e <= tol, "{what}: dc error {e:.3e} > {tol:.1e}");
    assert!(
        (o.dk as f64 - want.dkappa).abs() <= tol * want.dkappa.abs().max(1.0),
        "{what}: dκ {} vs {}",
        o.dk,
        want.dkappa
    );
    let cpu = run(p, f, kappa, &Device::cpu(), dtype);
    for i in 0..p.b {
        let (a, b) = (o.lse[i], cpu.lse[i]);
        if b == f32::NEG_INFINITY {
            assert_eq!(a, b, "{what}: inactive row {i} LSE");
            assert_eq!(o.s_t[i], 0.0, "{what}: inactive row {i} s_t");
            assert!(
                o.dq[i * p.d..(i + 1) * p.d].iter().all(|&v| v == 0.0),
                "{what}: inactive row {i} has a gradient"
            );
        } else {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{what}: LSE[{i}] {a} vs {b}"
            );
            let (s, sc) = (o.s_t[i], cpu.s_t[i]);
            assert!(
                (s - sc).abs() <= 1e-4 * sc.abs().max(1.0),
                "{what}: s_t[{i}] {s} vs {sc}"
            );
        }
    }
}

#[test]
fn ragged_n_every_feature_f32() {
    let mut r = rng("ragged");
    // 257 and 513: one column past a tile; B = 7 → split forward and query gradient.
    check("n=257", &problem(&mut r, 7, 257, 16), ALL, DType::F32);
    check("n=513", &problem(&mut r, 9, 513, 5), ALL, DType::F32);
    // Three row blocks (B = 130), one split (N ≤ 4 tiles), d not a multiple of 16.
    check(
        "row blocks",
        &problem(&mut r, 130, 200, 21),
        ALL,
        DType::F32,
    );
}

#[test]
fn single_row_uses_the_column_split() {
    let mut r = rng("b=1");
    // B = 1, N = 513: 9 column tiles in 3 splits.
    let mut p = problem(&mut r, 1, 513, 8);
    p.weight[0] = 1.0;
    for f in [ALL, NONE, Features { l2: false, ..ALL }] {
        check("b=1", &p, f, DType::F32);
    }
}

#[test]
fn each_feature_alone_and_l2_on_off() {
    let mut r = rng("features");
    let p = problem(&mut r, 12, 257, 8);
    for l2 in [false, true] {
        for f in [
            Features { l2, ..NONE },
            Features {
                logq: true,
                l2,
                ..NONE
            },
            Features {
                hits: true,
                l2,
                ..NONE
            },
            Features {
                valid: true,
                l2,
                ..NONE
            },
            Features {
                qid: true,
                l2,
                ..NONE
            },
        ] {
            check("feature", &p, f, DType::F32);
        }
    }
}

#[test]
fn half_precision_inputs() {
    let mut r = rng("16-bit");
    for dtype in [DType::BF16, DType::F16] {
        // Odd d: rows start in the middle of a u32 word.
        check("16-bit", &problem(&mut r, 5, 257, 7), ALL, dtype);
        check("16-bit", &problem(&mut r, 3, 70, 9), NONE, dtype);
    }
}

/// d > 128: chunks 0 and 1 of d stay in registers, chunk 2 goes through the
/// read-modify-write path (query and column gradients).
#[test]
fn wide_embeddings() {
    let mut r = rng("wide");
    check("d=150", &problem(&mut r, 66, 300, 150), ALL, DType::F32);
    // Exactly one and exactly two register chunks; one element past them.
    check("d=64", &problem(&mut r, 5, 130, 64), ALL, DType::F32);
    check("d=128", &problem(&mut r, 5, 130, 128), NONE, DType::F32);
    check("d=129", &problem(&mut r, 70, 80, 129), ALL, DType::F32);
}

/// Padding rows, rows with an invalid target, a row whose domain is only its target (p = 1),
/// and a call where every row is inactive: −∞ LSE, zero gradients, nothing NaN.
#[test]
fn masked_and_padding_rows() {
    let Some(dev) = device() else { return };
    let mut r = rng("masked");
    // From `problem`: row 1's target is invalid, row 5 has w = 0. Also w = 0 for row 4, and
    // row 0 sees only its target: every other column belongs to its query id.
    let mut p = problem(&mut r, 6, 70, 4);
    p.weight[4] = 0.0;
    p.kind[0] = RowKind::Pos;
    p.row_qid = vec![5, 101, 102, 103, 104, 105];
    p.col_qid = (0..p.n).map(|j| if j == 0 { -1 } else { 5 }).collect();
    check("masked", &p, ALL, DType::F32);
    // As an NTR row, p = 1 makes the loss unbounded; the op clamps 1 − p at 1e-30 (the f64
    // reference does not). Whether 1 − p rounds to 0 or to a few ulps depends on the last bit
    // of LSE − s_t, so that row's loss and gradient scale are ill-conditioned by design: ask
    // only that nothing is NaN or infinite there, and that the other rows are unaffected.
    p.kind[0] = RowKind::Ntr;
    let (o, cpu) = (
        run(&p, ALL, 4.0, &dev, DType::F32),
        run(&p, ALL, 4.0, &Device::cpu(), DType::F32),
    );
    assert!(
        o.loss.is_finite() && o.dk.is_finite(),
        "NTR p = 1: loss {}, dκ {}",
        o.loss,
        o.dk
    );
    assert!(
        o.dq.iter().chain(&o.dc).all(|v| v.is_finite()),
        "NTR p = 1: gradients"
    );
    let d = p.d;
    let want: Vec<f64> = cpu.dq[d..].iter().map(|&v| v as f64).collect();
    assert!(
        rel_err(&o.dq[d..], &want) <= 1e-5,
        "NTR p = 1: the other rows' dq"
    );
    // Every row inactive.
    let mut p0 = problem(&mut r, 5, 90, 6);
    p0.weight = vec![0.0; p0.b];
    let o = run(&p0, ALL, 3.0, &dev, DType::F32);
    assert_eq!(o.loss, 0.0);
    assert!(o.lse.iter().all(|&v| v == f32::NEG_INFINITY));
    assert!(o.dq.iter().chain(&o.dc).all(|&v| v == 0.0));
    assert_eq!(o.dk, 0.0);
}

#[test]
fn two_runs_are_bitwise_identical() {
    let Some(dev) = device() else { return };
    let mut r = rng("determinism");
    for (b, n, d) in [(1, 513, 16), (70, 300, 8)] {
        let p = problem(&mut r, b, n, d);
        let t0 = Instant::now();
        let a = run(&p, ALL, 5.0, &dev, DType::F32);
        let t1 = Instant::now();
        let c = run(&p, ALL, 5.0, &dev, DType::F32);
        eprintln!(
            "b={b} n={n} d={d}: two runs {:.2?} and {:.2?}",
            t1 - t0,
            t1.elapsed()
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.lse), bits(&c.lse), "LSE");
        assert_eq!(bits(&a.s_t), bits(&c.s_t), "s_t");
        assert_eq!(bits(&a.dq), bits(&c.dq), "dq");
        assert_eq!(bits(&a.dc), bits(&c.dc), "dc");
        assert_eq!(a.dk.to_bits(), c.dk.to_bits(), "dκ");
        assert_eq!(a.loss.to_bits(), c.loss.to_bits(), "loss");
    }
}
