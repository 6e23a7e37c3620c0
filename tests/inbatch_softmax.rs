//! The fused in-batch softmax against a naive f64 reference that materialises every logit;
//! finite differences for queries, candidates and κ; the logQ sign; the NTR gradient relation;
//! duplicates ≡ deduplicated columns; masked rows and padding; dtypes; determinism.

mod common;

use common::softmax::Problem;
use common::{assert_close, assert_close_scaled, backends, finite_diff, rng};
use rand::Rng;
use recfuse::cpu::reference::{self, RefRowKind, RefSoftmax};
use recfuse::ops::inbatch_softmax::{Columns, InBatchSoftmax, Reduction, RowKind, Rows};
use recfuse::{DType, Device, Error, Tensor};

/// The shared random problem plus one padding row (w = 0).
fn problem(r: &mut impl Rng, b: usize, n: usize, d: usize) -> Problem {
    let mut p = common::softmax::problem(r, b, n, d);
    p.weight[b - 1] = 0.0;
    p
}

#[derive(Clone, Copy)]
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

fn reference_of(
    p: &Problem,
    f: Features,
    kappa: f64,
    q: &[f64],
    c: &[f64],
) -> reference::RefSoftmaxOut {
    let lq: Vec<f64> = p.log_q.iter().map(|&v| v as f64).collect();
    let w: Vec<f64> = p.weight.iter().map(|&v| v as f64).collect();
    let t: Vec<usize> = p.target.iter().map(|&v| v as usize).collect();
    let kind: Vec<RefRowKind> = p
        .kind
        .iter()
        .map(|k| {
            if *k == RowKind::Pos {
                RefRowKind::Pos
            } else {
                RefRowKind::Ntr
            }
        })
        .collect();
    reference::inbatch_softmax(&RefSoftmax {
        b: p.b,
        n: p.n,
        d: p.d,
        queries: q,
        cands: c,
        target: &t,
        kind: &kind,
        weight: &w,
        log_q: f.logq.then_some(lq.as_slice()),
        ids: f.hits.then_some(p.ids.as_slice()),
        valid: f.valid.then_some(p.valid.as_slice()),
        row_qid: f.qid.then_some(p.row_qid.as_slice()),
        col_qid: f.qid.then_some(p.col_qid.as_slice()),
        kappa,
        l2: f.l2,
        eps: 1e-12,
        z: w.iter().sum(),
    })
}

type RunOut = (f64, Vec<f64>, Vec<f64>, f32, Vec<f64>, Vec<f64>);

fn try_run(
    p: &Problem,
    f: Features,
    loss: &InBatchSoftmax,
    dev: &Device,
    dtype: DType,
) -> recfuse::Result<RunOut> {
    try_run_mixed(p, f, loss, dev, dtype, dtype)
}

/// As `try_run`, with queries and candidates in their own dtypes.
fn try_run_mixed(
    p: &Problem,
    f: Features,
    loss: &InBatchSoftmax,
    dev: &Device,
    q_dtype: DType,
    c_dtype: DType,
) -> recfuse::Result<RunOut> {
    let q = Tensor::from_f32(&p.q, &[p.b, p.d], q_dtype, dev)?;
    let c = Tensor::from_f32(&p.c, &[p.n, p.d], c_dtype, dev)?;
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
    let fwd = loss.forward(&rows, &cols, None)?;
    let g = loss.backward(&rows, &cols, &fwd)?;
    Ok((
        fwd.loss,
        g.dq.to_f64_vec()?,
        g.dc.to_f64_vec()?,
        g.dkappa,
        q.to_f64_vec()?,
        c.to_f64_vec()?,
    ))
}

fn run(p: &Problem, f: Features, loss: &InBatchSoftmax, dev: &Device, dtype: DType) -> RunOut {
    try_run(p, f, loss, dev, dtype).unwrap()
}

/// Loss, dq (in the queries' dtype), dc and dκ of one run (κ = 4) against the reference at
/// the values the tensors held.
fn assert_matches_reference(what: &str, p: &Problem, f: Features, out: RunOut, q_dtype: DType) {
    let (l, dq, dc, dk, qv, cv) = out;
    let want = reference_of(p, f, 4.0, &qv, &cv);
    let tol = common::tolerance(DType::F32, p.d) * 10.0;
    assert!(
        (l - want.loss).abs() <= tol * want.loss.abs().max(1.0),
        "{what}: loss {l} vs {}",
        want.loss
    );
    // Gradients sum κ·a_i·(P − δ)·v̂ terms of size ≈ κ/B (a_i = w_i/Σw); one whose terms cancel
    // still carries their rounding, so measure against that size.
    let floor = 4.0 / p.b as f64;
    assert_close_scaled(
        &format!("{what} dq"),
        &dq,
        &want.dq,
        common::tolerance(q_dtype, p.n) * 10.0,
        floor,
    );
    assert_close_scaled(&format!("{what} dc"), &dc, &want.dc, tol, floor);
    assert!(
        ((dk as f64) - want.dkappa).abs() <= tol * want.dkappa.abs().max(1.0),
        "{what}: dκ {dk} vs {}",
        want.dkappa
    );
}

#[test]
fn fused_matches_naive_reference_every_dtype() {
    for be in backends() {
        for dtype in DType::ALL {
            for (b, n, d, f) in [
                (7, 300, 16, ALL),
                (33, 257, 8, Features { l2: false, ..ALL }),
                (
                    5,
                    513,
                    3,
                    Features {
                        logq: false,
                        qid: false,
                        ..ALL
                    },
                ),
                (
                    1,
                    1,
                    4,
                    Features {
                        hits: false,
                        valid: false,
                        qid: false,
                        ..ALL
                    },
                ),
            ] {
                let mut r = rng("softmax");
                let p = problem(&mut r, b.max(2), n.max(2), d);
                let loss = InBatchSoftmax {
                    kappa: 4.0,
                    learn_kappa: true,
                    l2_normalize: f.l2,
                    remove_accidental_hits: f.hits,
                    ..Default::default()
                };
                let what = format!("{} {dtype} b={b} n={n} d={d}", be.name);
                let mut out = None;
                let res = try_run(&p, f, &loss, &be.device, dtype).map(|v| out = Some(v));
                if !common::supported(&be, "inbatch_softmax", res) {
                    break;
                }
                let Some(out) = out else { unreachable!() };
                assert_matches_reference(&what, &p, f, out, dtype);
            }
        }
    }
}

/// Queries and candidates of different dtypes (a bf16 item tower against f32 queries, say):
/// every combination against the reference at the values the tensors hold.
#[test]
fn mixed_query_and_candidate_dtypes() {
    for be in backends() {
        'combos: for q_dtype in DType::ALL {
            for c_dtype in DType::ALL {
                let mut r = rng("softmax mixed");
                let p = problem(&mut r, 9, 70, 12);
                let loss = InBatchSoftmax {
                    kappa: 4.0,
                    learn_kappa: true,
                    l2_normalize: true,
                    remove_accidental_hits: true,
                    ..Default::default()
                };
                let what = format!("{} q {q_dtype} c {c_dtype}", be.name);
                let mut out = None;
                let res = try_run_mixed(&p, ALL, &loss, &be.device, q_dtype, c_dtype)
                    .map(|v| out = Some(v));
                if !common::supported(&be, "inbatch_softmax", res) {
                    break 'combos;
                }
                let Some(out) = out else { unreachable!() };
                assert_matches_reference(&what, &p, ALL, out, q_dtype);
            }
        }
    }
}

/// The reference's hand-derived gradients against central differences of its own loss.
#[test]
fn reference_gradients_match_finite_differences() {
    let mut r = rng("softmax fd");
    let p = problem(&mut r, 4, 9, 3);
    for f in [ALL, Features { l2: false, ..ALL }] {
        let q: Vec<f64> = p.q.iter().map(|&v| v as f64).collect();
        let c: Vec<f64> = p.c.iter().map(|&v| v as f64).collect();
        let out = reference_of(&p, f, 3.0, &q, &c);
        let h = 1e-6;
        assert_close(
            "dq vs fd",
            &out.dq,
            &finite_diff(&q, h, |x| reference_of(&p, f, 3.0, x, &c).loss),
            1e-6,
        );
        assert_close(
            "dc vs fd",
            &out.dc,
            &finite_diff(&c, h, |x| reference_of(&p, f, 3.0, &q, x).loss),
            1e-6,
        );
        let dk = finite_diff(&[3.0], h, |k| reference_of(&p, f, k[0], &q, &c).loss);
        assert_close("dκ vs fd", &[out.dkappa], &dk, 1e-6);
    }
}

/// The fused CPU gradients (f32) against central differences of the f64 loss.
#[test]
fn fused_gradients_match_finite_differences() {
    let mut r = rng("softmax fused fd");
    let p = problem(&mut r, 5, 11, 4);
    let loss = InBatchSoftmax {
        kappa: 2.5,
        learn_kappa: true,
        l2_normalize: true,
        ..Default::default()
    };
    let (_, dq, dc, dk, qv, cv) = run(&p, ALL, &loss, &Device::cpu(), DType::F32);
    let h = 1e-5;
    assert_close(
        "dq vs fd",
        &dq,
        &finite_diff(&qv, h, |x| reference_of(&p, ALL, 2.5, x, &cv).loss),
        1e-5,
    );
    assert_close(
        "dc vs fd",
        &dc,
        &finite_diff(&cv, h, |x| reference_of(&p, ALL, 2.5, &qv, x).loss),
        1e-5,
    );
    let fd = finite_diff(&[2.5], h, |k| reference_of(&p, ALL, k[0], &qv, &cv).loss);
    // dκ = mean over rows of (E_p[s] − s_target): a cancelling difference of cosines, each
    // bounded by 1 under l2_normalize, so its f32 rounding is set by those terms (scale 1),
    // not by the small result (~1e-3 here; measured against itself it flaked ~1% of seeds).
    assert_close_scaled("dκ vs fd", &[dk as f64], &fd, 2e-6, 1.0);
}

/// logQ correction subtracts log q: a popular column (large q) gets a *smaller* logit, so
/// raising its q must lower the probability mass it takes from the positive (TFRS #219).
#[test]
fn logq_sign() {
    let dev = Device::cpu();
    let q = Tensor::from_f32(&[1.0, 0.0], &[1, 2], DType::F32, &dev).unwrap();
    let c = Tensor::from_f32(&[1.0, 0.0, 1.0, 0.0], &[2, 2], DType::F32, &dev).unwrap();
    let loss = InBatchSoftmax {
        remove_accidental_hits: false,
        ..Default::default()
    };
    let rows = Rows {
        queries: &q,
        target: &[0],
        kind: &[RowKind::Pos],
        weight: &[1.0],
        query_ids: None,
    };
    let at = |lq_neg: f32| {
        let lq = [0.0, lq_neg];
        let cols = Columns {
            emb: &c,
            log_q: Some(&lq),
            ids: None,
            valid: None,
            query_ids: None,
        };
        loss.forward(&rows, &cols, None).unwrap().loss
    };
    // Equal logits without correction: loss = ln 2. A popular negative (log q = 0 > −2) keeps
    // its logit; a rare one (log q = −2) is boosted by +2 and costs more.
    assert!((at(0.0) - 2f64.ln()).abs() < 1e-6);
    let rare = at(-2.0);
    assert!((rare - (1.0 + 2f64.exp()).ln()).abs() < 1e-5, "loss {rare}");
}

/// An NTR row's gradient is −p/(1−p) times the same row's POS gradient.
#[test]
fn ntr_gradient_relation() {
    let mut r = rng("ntr");
    let mut p = problem(&mut r, 3, 7, 4);
    p.weight = vec![1.0, 0.0, 0.0];
    let loss = InBatchSoftmax {
        kappa: 2.0,
        ..Default::default()
    };
    let f = Features { l2: false, ..ALL };
    p.kind[0] = RowKind::Pos;
    let (_, dq_pos, dc_pos, ..) = run(&p, f, &loss, &Device::cpu(), DType::F32);
    p.kind[0] = RowKind::Ntr;
    let dev = Device::cpu();
    let q = Tensor::from_f32(&p.q, &[3, 4], DType::F32, &dev).unwrap();
    let c = Tensor::from_f32(&p.c, &[7, 4], DType::F32, &dev).unwrap();
    let rows = Rows {
        queries: &q,
        target: &p.target,
        kind: &p.kind,
        weight: &p.weight,
        query_ids: Some(&p.row_qid),
    };
    let cols = Columns {
        emb: &c,
        log_q: Some(&p.log_q),
        ids: Some(&p.ids),
        valid: Some(&p.valid),
        query_ids: Some(&p.col_qid),
    };
    let fwd = loss.forward(&rows, &cols, None).unwrap();
    // p from the f32 statistics in f64 (as the kernel's row coefficient is): the stored f32 p
    // would lose 1 − p when p is near 1.
    let pt = ((fwd.s_target[0] - fwd.lse[0]) as f64).exp();
    assert!((pt - fwd.p_target[0] as f64).abs() < 1e-6);
    let g = loss.backward(&rows, &cols, &fwd).unwrap();
    let k = -pt / (1.0 - pt);
    let scaled = |v: &[f64]| v.iter().map(|x| x * k).collect::<Vec<_>>();
    assert_close(
        "NTR dq",
        &g.dq.to_f64_vec().unwrap(),
        &scaled(&dq_pos),
        1e-5,
    );
    assert_close(
        "NTR dc",
        &g.dc.to_f64_vec().unwrap(),
        &scaled(&dc_pos),
        1e-5,
    );
    let want = -(1.0 - pt).ln();
    assert!(
        (fwd.loss - want).abs() <= 1e-9 * want.abs().max(1.0),
        "NTR loss {} vs {want} (p = {pt})",
        fwd.loss
    );
}

/// Without logQ, a row whose positive item appears several times among the columns (another
/// user clicked it too) has the same loss and query gradient as over the deduplicated set:
/// accidental-hit removal drops the copies of its target and nothing else.
#[test]
fn duplicates_equal_deduplicated_set() {
    let dev = Device::cpu();
    let mut r = rng("dups");
    let d = 5;
    let items = common::uniform(&mut r, 4 * d, 1.0); // items 0..4
    let qv = common::uniform(&mut r, 2 * d, 1.0);
    let q = Tensor::from_f32(&qv, &[2, d], DType::F32, &dev).unwrap();
    let loss = InBatchSoftmax {
        kappa: 3.0,
        ..Default::default()
    };
    let cols_of = |order: &[usize]| {
        let v: Vec<f32> = order
            .iter()
            .flat_map(|&i| items[i * d..i * d + d].iter().copied())
            .collect();
        let ids: Vec<i64> = order.iter().map(|&i| i as i64).collect();
        (
            Tensor::from_f32(&v, &[order.len(), d], DType::F32, &dev).unwrap(),
            ids,
        )
    };
    // Both rows target item 0, which sits in columns 0, 3 and 5 of the duplicated set.
    let (dup, dup_ids) = cols_of(&[0, 1, 2, 0, 3, 0]);
    let (ded, ded_ids) = cols_of(&[0, 1, 2, 3]);
    let run = |c: &Tensor, ids: &[i64], targets: &[u32]| {
        let rows = Rows {
            queries: &q,
            target: targets,
            kind: &[RowKind::Pos, RowKind::Ntr],
            weight: &[1.0, 0.7],
            query_ids: None,
        };
        let cols = Columns {
            emb: c,
            log_q: None,
            ids: Some(ids),
            valid: None,
            query_ids: None,
        };
        let f = loss.forward(&rows, &cols, None).unwrap();
        let g = loss.backward(&rows, &cols, &f).unwrap();
        (f.loss, g.dq.to_f64_vec().unwrap())
    };
    let (l_dup, dq_dup) = run(&dup, &dup_ids, &[0, 3]);
    let (l_ded, dq_ded) = run(&ded, &ded_ids, &[0, 0]);
    assert!(
        (l_dup - l_ded).abs() < 1e-6 * l_ded.abs().max(1.0),
        "{l_dup} vs {l_ded}"
    );
    assert_close("dq with duplicates", &dq_dup, &dq_ded, 1e-5);
    // Without removal the two extra copies of each row's target are negatives with the target's
    // own logit: each positive row's LSE grows by exactly ln(1 + 2·p_t).
    let keep = InBatchSoftmax {
        remove_accidental_hits: false,
        ..loss.clone()
    };
    let pos = [RowKind::Pos, RowKind::Pos];
    let forward = |l: &InBatchSoftmax, c: &Tensor, ids: &[i64], t: &[u32]| {
        let rows = Rows {
            queries: &q,
            target: t,
            kind: &pos,
            weight: &[1.0, 0.7],
            query_ids: None,
        };
        l.forward(
            &rows,
            &Columns {
                emb: c,
                log_q: None,
                ids: Some(ids),
                valid: None,
                query_ids: None,
            },
            None,
        )
        .unwrap()
    };
    let ded_pos = forward(&loss, &ded, &ded_ids, &[0, 0]);
    let kept = forward(&keep, &dup, &dup_ids, &[0, 3]);
    let want: f64 = ded_pos.loss
        + [1.0, 0.7]
            .iter()
            .zip(&ded_pos.p_target)
            .map(|(w, p)| w * (1.0 + 2.0 * *p as f64).ln())
            .sum::<f64>()
            / 1.7;
    assert!(
        (kept.loss - want).abs() <= 1e-5 * want.abs().max(1.0),
        "without removal: {} vs {want}",
        kept.loss
    );
}

#[test]
fn masked_rows_and_padding_are_zero_not_nan() {
    let dev = Device::cpu();
    let q = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2], DType::F32, &dev).unwrap();
    let c = Tensor::from_f32(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2], DType::F32, &dev).unwrap();
    let loss = InBatchSoftmax {
        remove_accidental_hits: false,
        ..Default::default()
    };
    // Row 0: target column invalid → inactive. Row 1: weight 0. Row 2: NTR whose domain is
    // only its target (p = 1) → clamped, finite.
    let rows = Rows {
        queries: &q,
        target: &[0, 1, 2],
        kind: &[RowKind::Pos, RowKind::Pos, RowKind::Ntr],
        weight: &[1.0, 0.0, 1.0],
        query_ids: None,
    };
    let valid = [false, false, true];
    let cols = Columns {
        emb: &c,
        log_q: None,
        ids: None,
        valid: Some(&valid),
        query_ids: None,
    };
    let fwd = loss.forward(&rows, &cols, None).unwrap();
    assert!(fwd.loss.is_finite());
    let g = loss.backward(&rows, &cols, &fwd).unwrap();
    let dq = g.dq.to_f32_vec().unwrap();
    assert!(dq.iter().all(|v| v.is_finite()));
    assert_eq!(&dq[..4], &[0.0; 4], "inactive rows get zero gradient");
    // All rows padding: zero loss, zero gradients.
    let rows0 = Rows {
        weight: &[0.0; 3],
        ..rows
    };
    let fwd = loss.forward(&rows0, &cols, None).unwrap();
    assert_eq!(fwd.loss, 0.0);
    let g = loss.backward(&rows0, &cols, &fwd).unwrap();
    assert!(g.dc.to_f32_vec().unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn deterministic_and_sum_reduction() {
    let mut r = rng("det");
    let p = problem(&mut r, 70, 600, 8);
    let loss = InBatchSoftmax {
        kappa: 5.0,
        l2_normalize: true,
        ..Default::default()
    };
    let a = run(&p, ALL, &loss, &Device::cpu(), DType::F32);
    let b = run(&p, ALL, &loss, &Device::cpu(), DType::F32);
    assert!(a.1 == b.1 && a.2 == b.2 && a.0 == b.0, "two runs differ");
    let sum = InBatchSoftmax {
        reduction: Reduction::Sum,
        ..loss
    };
    let s = run(&p, ALL, &sum, &Device::cpu(), DType::F32);
    let z: f64 = p.weight.iter().map(|&w| w as f64).sum();
    assert!((s.0 - a.0 * z).abs() < 1e-4 * s.0.abs());
}

#[test]
fn bad_input() {
    let dev = Device::cpu();
    let q = Tensor::zeros(&[2, 3], DType::F32, &dev).unwrap();
    let c = Tensor::zeros(&[4, 2], DType::F32, &dev).unwrap();
    let loss = InBatchSoftmax {
        remove_accidental_hits: false,
        ..Default::default()
    };
    let rows = Rows {
        queries: &q,
        target: &[0, 1],
        kind: &[RowKind::Pos; 2],
        weight: &[1.0; 2],
        query_ids: None,
    };
    let cols = Columns {
        emb: &c,
        log_q: None,
        ids: None,
        valid: None,
        query_ids: None,
    };
    assert!(matches!(
        loss.forward(&rows, &cols, None).unwrap_err(),
        Error::Shape {
            arg: "cols.emb",
            ..
        }
    ));
    let c = Tensor::zeros(&[4, 3], DType::F32, &dev).unwrap();
    let cols = Columns { emb: &c, ..cols };
    let bad = Rows {
        target: &[0],
        ..rows
    };
    assert!(matches!(
        loss.forward(&bad, &cols, None).unwrap_err(),
        Error::Shape {
            arg: "rows.target",
            ..
        }
    ));
    let lq = [0.0, f32::NAN, 0.0, 0.0];
    let e = loss
        .forward(
            &rows,
            &Columns {
                log_q: Some(&lq),
                ..cols
            },
            None,
        )
        .unwrap_err();
    assert!(matches!(
        e,
        Error::InvalidArgument {
            arg: "cols.log_q",
            ..
        }
    ));
    let e = InBatchSoftmax::default()
        .forward(&rows, &cols, None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "cols.ids",
                ..
            }
        ),
        "{e}"
    );
    let e = InBatchSoftmax {
        kappa: -1.0,
        ..loss.clone()
    }
    .forward(&rows, &cols, None)
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "kappa", .. }));
}

/// A NaN in one input makes NaN exactly the outputs the f64 reference makes NaN, and leaves
/// the others equal to it, on every backend. The gradient products run dense over every row
/// and column, as a materialised `Gᵀ·Q̂` / `G·Ĉ` does (a masked pair or a padding row has
/// G = 0, and 0 · NaN is NaN): a NaN query makes every column's gradient NaN, a NaN candidate
/// every row's, and the row or rows whose domain holds the NaN logit make the loss NaN. A
/// padding row (w = 0) or a column masked for every row never reaches the loss. A NaN logQ is
/// refused by name. Cases: a NaN query element in a positive, a not-to-recommend and a padding
/// row; a NaN candidate element in a valid and an invalid column; a NaN logQ; with and without
/// L2 normalisation.
#[test]
fn nan_inputs_are_nan_exactly_where_the_reference_is() {
    let mut r = rng("softmax nan");
    let base = problem(&mut r, 6, 15, 5);
    let (b, n, d) = (base.b, base.n, base.d);
    let valid_col = (b..n)
        .find(|&j| base.valid[j])
        .expect("a valid non-target column");
    let invalid_col = (0..n).find(|&j| !base.valid[j]);
    type Poison = Box<dyn Fn(&mut Problem)>;
    let mut cases: Vec<(&str, Poison)> = vec![
        (
            "query of a positive row",
            Box::new(move |p| p.q[1] = f32::NAN),
        ),
        (
            "query of an NTR row",
            Box::new(move |p| p.q[2 * d + 3] = f32::NAN),
        ),
        (
            "query of a padding row",
            Box::new(move |p| p.q[(b - 1) * d] = f32::NAN),
        ),
        (
            "a valid candidate",
            Box::new(move |p| p.c[valid_col * d + 2] = f32::NAN),
        ),
        (
            "a logQ entry",
            Box::new(move |p| p.log_q[valid_col] = f32::NAN),
        ),
    ];
    if let Some(j) = invalid_col {
        cases.push((
            "an invalid candidate",
            Box::new(move |p| p.c[j * d + 1] = f32::NAN),
        ));
    }
    for be in backends() {
        for f in [ALL, Features { l2: false, ..ALL }] {
            for (what, poison) in &cases {
                let mut p = base.clone();
                poison(&mut p);
                let loss = InBatchSoftmax {
                    kappa: 2.0,
                    learn_kappa: true,
                    l2_normalize: f.l2,
                    ..Default::default()
                };
                let what = format!("{} l2={}: NaN in {what}", be.name, f.l2);
                let mut out = None;
                let res = try_run(&p, f, &loss, &be.device, DType::F32).map(|v| out = Some(v));
                if what.contains("logQ") {
                    // logQ is validated: a NaN there is refused by name, not propagated.
                    match res {
                        Err(Error::InvalidArgument {
                            arg: "cols.log_q", ..
                        }) => continue,
                        other => panic!("{what}: {other:?}"),
                    }
                }
                if !common::supported(&be, "inbatch_softmax", res) {
                    break;
                }
                let Some((l, dq, dc, dk, qv, cv)) = out else {
                    unreachable!()
                };
                let want = reference_of(&p, f, 2.0, &qv, &cv);
                let same = |name: &str, got: &[f64], want: &[f64]| {
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        assert_eq!(
                            g.is_nan(),
                            w.is_nan(),
                            "{what}: {name}[{i}] is {g}, the reference's {w}"
                        );
                        if !w.is_nan() {
                            assert!(
                                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "{what}: {name}[{i}] is {g}, the reference's {w}"
                            );
                        }
                    }
                };
                same("loss", &[l], &[want.loss]);
                same("dκ", &[dk as f64], &[want.dkappa]);
                same("dq", &dq, &want.dq);
                same("dc", &dc, &want.dc);
                assert!(
                    want.loss.is_nan() || what.contains("padding") || what.contains("invalid"),
                    "{what}: the case should poison the loss"
                );
            }
        }
    }
}
