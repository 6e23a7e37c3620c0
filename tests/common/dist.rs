//! The cross-device in-batch softmax equivalence check, shared by the in-process group
//! (`tests/dist.rs`) and NCCL (`tests/nccl.rs`).

use rand::Rng;
use recfuse::dist::{Communicator, CrossBatch, CrossDeviceSoftmax, LocalGroup};
use recfuse::ops::inbatch_softmax::{InBatchSoftmax, RowKind};
use recfuse::{DType, Device, Tensor};

use super::{assert_close, rng};

/// One rank's raw data.
#[derive(Clone)]
pub struct RankData {
    q: Vec<f32>,
    pos: Vec<f32>,
    pos_ids: Vec<i64>,
    pos_lq: Vec<f32>,
    neg: Vec<f32>,
    neg_ids: Vec<i64>,
    neg_lq: Vec<f32>,
    kind: Vec<RowKind>,
    weight: Vec<f32>,
    qid: Vec<i64>,
}

pub fn make(r: &mut impl Rng, b: usize, m: usize, d: usize, qid_base: i64) -> RankData {
    RankData {
        q: super::uniform(r, b * d, 1.0),
        pos: super::uniform(r, b * d, 1.0),
        pos_ids: (0..b).map(|_| r.random_range(0..12)).collect(),
        pos_lq: (0..b).map(|_| r.random_range(-4.0..-0.5)).collect(),
        neg: super::uniform(r, m * d, 1.0),
        neg_ids: (0..m).map(|_| r.random_range(0..12)).collect(),
        neg_lq: (0..m).map(|_| r.random_range(-4.0..-0.5)).collect(),
        kind: (0..b)
            .map(|i| {
                if i % 4 == 3 {
                    RowKind::Ntr
                } else {
                    RowKind::Pos
                }
            })
            .collect(),
        weight: (0..b)
            .map(|i| {
                if i == 1 {
                    0.0
                } else {
                    r.random_range(0.5..1.5)
                }
            })
            .collect(),
        qid: (0..b).map(|i| qid_base + (i / 2) as i64).collect(),
    }
}

pub struct Out {
    loss: f64,
    global: f64,
    dq: Vec<f64>,
    d_pos: Vec<f64>,
    d_neg: Vec<f64>,
    dkappa: f32,
}

pub fn run_rank(
    comm: &dyn Communicator,
    data: &RankData,
    d: usize,
    cfg: &CrossDeviceSoftmax,
) -> Out {
    let dev = Device::cpu();
    let (b, m) = (data.pos_ids.len(), data.neg_ids.len());
    let q = Tensor::from_f32(&data.q, &[b, d], DType::F32, &dev).unwrap();
    let pos = Tensor::from_f32(&data.pos, &[b, d], DType::F32, &dev).unwrap();
    let neg = Tensor::from_f32(&data.neg, &[m, d], DType::F32, &dev).unwrap();
    let batch = CrossBatch {
        queries: &q,
        positives: &pos,
        pos_ids: &data.pos_ids,
        pos_log_q: Some(&data.pos_lq),
        negatives: Some(&neg),
        neg_ids: &data.neg_ids,
        neg_log_q: Some(&data.neg_lq),
        kind: &data.kind,
        weight: &data.weight,
        query_ids: Some(&data.qid),
    };
    let fwd = cfg.forward(comm, &batch).unwrap();
    let g = cfg.backward(comm, &batch, &fwd).unwrap();
    Out {
        loss: fwd.loss,
        global: fwd.global_loss,
        dq: g.dq.to_f64_vec().unwrap(),
        d_pos: g.d_pos.to_f64_vec().unwrap(),
        d_neg: g.d_neg.unwrap().to_f64_vec().unwrap(),
        dkappa: g.dkappa,
    }
}

pub fn concat(parts: &[RankData]) -> RankData {
    let mut all = parts[0].clone();
    for p in &parts[1..] {
        all.q.extend(&p.q);
        all.pos.extend(&p.pos);
        all.pos_ids.extend(&p.pos_ids);
        all.pos_lq.extend(&p.pos_lq);
        all.neg.extend(&p.neg);
        all.neg_ids.extend(&p.neg_ids);
        all.neg_lq.extend(&p.neg_lq);
        all.kind.extend(&p.kind);
        all.weight.extend(&p.weight);
        all.qid.extend(&p.qid);
    }
    all
}

/// The cross-device equivalence check, for any communicator: for every case with at most
/// `max_world` ranks, W ranks (from `group(W)`, one thread each) give the loss and gradients of
/// one in-process rank running the concatenated batch, and owner-computes gives the same bits
/// twice. Returns how many cases ran.
pub fn ranks_equal_one_rank<C: Communicator>(
    max_world: usize,
    group: impl Fn(usize) -> Vec<C>,
) -> usize {
    let mut ran = 0;
    let d = 6;
    let cfg_base = InBatchSoftmax {
        kappa: 3.0,
        learn_kappa: true,
        l2_normalize: true,
        ..Default::default()
    };
    for (sizes, owner) in [
        (vec![(3, 2), (5, 0)], false),
        (vec![(2, 1), (4, 3), (1, 2)], false),
        (vec![(3, 2), (1, 0), (4, 1), (2, 2)], false),
        (vec![(3, 2), (1, 0), (4, 1), (2, 2)], true),
        (vec![(2, 1), (4, 3), (1, 2)], true),
    ] {
        if sizes.len() > max_world {
            eprintln!(
                "[recfuse tests] SKIPPED dist case W={} owner={owner}: only {max_world} ranks available",
                sizes.len()
            );
            continue;
        }
        ran += 1;
        let mut r = rng("dist");
        let parts: Vec<RankData> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(b, m))| make(&mut r, b, m, d, 100 * i as i64))
            .collect();
        let cfg = CrossDeviceSoftmax {
            loss: cfg_base.clone(),
            owner_computes: owner,
        };
        let single = {
            let g = LocalGroup::ranks(1).unwrap();
            run_rank(&g[0], &concat(&parts), d, &cfg)
        };
        let comms = group(parts.len());
        let outs: Vec<Out> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .zip(&parts)
                .map(|(c, p)| {
                    let cfg = &cfg;
                    s.spawn(move || run_rank(c, p, d, cfg))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let what = format!("W={} owner={owner}", parts.len());
        let loss_sum: f64 = outs.iter().map(|o| o.loss).sum();
        assert!(
            (loss_sum - single.loss).abs() < 1e-5 * single.loss.abs().max(1.0),
            "{what}: Σ loss {loss_sum} vs {}",
            single.loss
        );
        for o in &outs {
            assert!(
                (o.global - single.loss).abs() < 1e-5 * single.loss.abs().max(1.0),
                "{what}: global loss"
            );
            assert!(
                (o.dkappa - single.dkappa).abs() < 1e-5 * single.dkappa.abs().max(1.0),
                "{what}: dκ {} vs {}",
                o.dkappa,
                single.dkappa
            );
        }
        let cat = |f: &dyn Fn(&Out) -> &Vec<f64>| {
            outs.iter().flat_map(|o| f(o).clone()).collect::<Vec<f64>>()
        };
        assert_close(&format!("{what} dq"), &cat(&|o| &o.dq), &single.dq, 1e-5);
        assert_close(
            &format!("{what} d_pos"),
            &cat(&|o| &o.d_pos),
            &single.d_pos,
            1e-5,
        );
        assert_close(
            &format!("{what} d_neg"),
            &cat(&|o| &o.d_neg),
            &single.d_neg,
            1e-5,
        );
        if owner {
            // Owner-computes is bitwise reproducible: a second run gives the same bits.
            // Fresh communicators, borrowed by the threads: each is dropped only after every
            // rank has finished (an NCCL communicator is aborted when dropped).
            let comms = group(parts.len());
            let again: Vec<Out> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter()
                    .zip(&parts)
                    .map(|(c, p)| {
                        let cfg = &cfg;
                        s.spawn(move || run_rank(c, p, d, cfg))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let cat2 = |f: &dyn Fn(&Out) -> &Vec<f64>| {
                again
                    .iter()
                    .flat_map(|o| f(o).clone())
                    .collect::<Vec<f64>>()
            };
            assert_eq!(
                cat(&|o| &o.d_pos),
                cat2(&|o| &o.d_pos),
                "{what}: owner-computes bits"
            );
            assert_eq!(
                cat(&|o| &o.d_neg),
                cat2(&|o| &o.d_neg),
                "{what}: owner-computes bits"
            );
        }
    }
    ran
}
