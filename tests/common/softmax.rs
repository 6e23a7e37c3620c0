//! The random in-batch softmax problem both softmax test files draw from.

use rand::Rng;
use recfuse::ops::inbatch_softmax::RowKind;

/// B rows over N columns: rows target columns 0..B (the in-batch positives), ids from a small
/// pool (accidental hits happen), pairs of rows share a query id, ~10% invalid columns (never a
/// target), logQ, and mixed POS/NTR rows. Callers add their own padding rows.
#[derive(Clone)]
pub struct Problem {
    pub b: usize,
    pub n: usize,
    pub d: usize,
    pub q: Vec<f32>,
    pub c: Vec<f32>,
    pub target: Vec<u32>,
    pub kind: Vec<RowKind>,
    pub weight: Vec<f32>,
    pub log_q: Vec<f32>,
    pub ids: Vec<i64>,
    pub valid: Vec<bool>,
    pub row_qid: Vec<i64>,
    pub col_qid: Vec<i64>,
}

pub fn problem(r: &mut impl Rng, b: usize, n: usize, d: usize) -> Problem {
    assert!(n >= b);
    let q = super::uniform(r, b * d, 1.0);
    let c = super::uniform(r, n * d, 1.0);
    let target: Vec<u32> = (0..b as u32).collect();
    let kind = (0..b)
        .map(|i| {
            if i % 3 == 2 {
                RowKind::Ntr
            } else {
                RowKind::Pos
            }
        })
        .collect();
    let weight: Vec<f32> = (0..b).map(|_| r.random_range(0.5..1.5)).collect();
    let log_q = (0..n).map(|_| r.random_range(-3.0..0.0)).collect();
    let ids = (0..n)
        .map(|_| r.random_range(0..(n as i64 / 2).max(2)))
        .collect();
    let mut valid: Vec<bool> = (0..n).map(|_| r.random_range(0.0..1.0) > 0.1).collect();
    for &t in &target {
        valid[t as usize] = true;
    }
    let row_qid: Vec<i64> = (0..b).map(|i| (i / 2) as i64).collect();
    let col_qid = (0..n)
        .map(|j| if j < b { row_qid[j] } else { -1 })
        .collect();
    Problem {
        b,
        n,
        d,
        q,
        c,
        target,
        kind,
        weight,
        log_q,
        ids,
        valid,
        row_qid,
        col_qid,
    }
}
