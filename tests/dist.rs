//! Cross-device in-batch softmax on an in-process group: W ranks with uneven batches give the
//! loss and gradients of one rank running the concatenated batch; failed or mismatched ranks
//! give errors, not hangs; the logQ estimator's state is identical on every rank.

mod common;

use std::time::Duration;

use common::{assert_close, rng};
use rand::Rng;
use recfuse::dist::Communicator;
use recfuse::dist::{CrossBatch, CrossDeviceSoftmax, LocalGroup, LogQEstimator};
use recfuse::ops::inbatch_softmax::{InBatchSoftmax, RowKind};
use recfuse::{DType, Device, Tensor};

/// One rank's raw data.
#[derive(Clone)]
struct RankData {
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

fn make(r: &mut impl Rng, b: usize, m: usize, d: usize, qid_base: i64) -> RankData {
    RankData {
        q: common::uniform(r, b * d, 1.0),
        pos: common::uniform(r, b * d, 1.0),
        pos_ids: (0..b).map(|_| r.random_range(0..12)).collect(),
        pos_lq: (0..b).map(|_| r.random_range(-4.0..-0.5)).collect(),
        neg: common::uniform(r, m * d, 1.0),
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

struct Out {
    loss: f64,
    global: f64,
    dq: Vec<f64>,
    d_pos: Vec<f64>,
    d_neg: Vec<f64>,
    dkappa: f32,
}

fn run_rank(comm: &dyn Communicator, data: &RankData, d: usize, cfg: &CrossDeviceSoftmax) -> Out {
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

fn concat(parts: &[RankData]) -> RankData {
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

#[test]
fn ranks_equal_one_rank_on_the_concatenated_batch() {
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
        let comms = LocalGroup::ranks(parts.len()).unwrap();
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
            let again: Vec<Out> = std::thread::scope(|s| {
                let comms = LocalGroup::ranks(parts.len()).unwrap();
                let hs: Vec<_> = comms
                    .into_iter()
                    .zip(&parts)
                    .map(|(c, p)| {
                        let cfg = &cfg;
                        s.spawn(move || run_rank(&c, p, d, cfg))
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
}

#[test]
fn mismatched_and_dead_ranks_error_instead_of_hanging() {
    // Mismatched collectives: rank 0 all-reduces 2 values, rank 1 3 values.
    let comms = LocalGroup::ranks_with_timeout(2, Duration::from_secs(10)).unwrap();
    let errs: Vec<bool> = std::thread::scope(|s| {
        let a = s.spawn(|| comms[0].all_reduce_sum(&mut [1.0, 2.0]).is_err());
        let b = s.spawn(|| comms[1].all_reduce_sum(&mut [1.0, 2.0, 3.0]).is_err());
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(errs, vec![true, true]);

    // A rank that never arrives: timeout error.
    let comms = LocalGroup::ranks_with_timeout(2, Duration::from_millis(200)).unwrap();
    let e = comms[0].all_gather_bytes(b"x").unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");

    // A rank whose thread dies: the other fails at once, naming it.
    let mut comms = LocalGroup::ranks_with_timeout(2, Duration::from_secs(30)).unwrap();
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || drop(c1));
        let e = c0.all_gather_bytes(b"x").unwrap_err();
        assert!(e.to_string().contains("rank 1 left the group"), "{e}");
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn logq_estimator_state_is_identical_on_every_rank() {
    let comms = LocalGroup::ranks(3).unwrap();
    let states: Vec<LogQEstimator> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(rank, c)| {
                s.spawn(move || {
                    let mut est = LogQEstimator::new(64, 0.05).unwrap();
                    let mut r = rand::rngs::StdRng::seed_from_u64(rank as u64);
                    for _ in 0..40 {
                        let ids: Vec<i64> = (0..5 + rank)
                            .map(|_| rand::Rng::random_range(&mut r, 0..30))
                            .collect();
                        est.update_gathered(c, &ids).unwrap();
                    }
                    est
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(states.windows(2).all(|w| w[0] == w[1]), "ranks disagree");
    assert_eq!(states[0].step(), 40);
    // Frequencies: an id seen every step has gap → 1, q → 1; a rare one, a larger gap.
    let mut est = LogQEstimator::new(1024, 0.2).unwrap();
    for t in 0..200 {
        let mut ids = vec![7];
        if t % 10 == 0 {
            ids.push(9);
        }
        est.update(&ids);
    }
    let q = est.q(&[7, 9]);
    assert!((q[0] - 1.0).abs() < 1e-3, "every-step item: q {}", q[0]);
    assert!(
        (q[1] - 0.1).abs() < 0.02,
        "every-10th-step item: q {}",
        q[1]
    );
}

use rand::SeedableRng;
