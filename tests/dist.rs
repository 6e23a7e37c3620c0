//! Cross-device in-batch softmax on an in-process group: W ranks with uneven batches give the
//! loss and gradients of one rank running the concatenated batch; failed or mismatched ranks
//! give errors, not hangs; the logQ estimator's state is identical on every rank; the tensor
//! collectives (all-reduce of dense gradients, all-gather along axis 0) are right on every
//! backend, on the device (LocalGroup) and through the host (the trait's default methods).

mod common;

use std::time::Duration;

use recfuse::dist::Communicator;
use recfuse::dist::{LocalGroup, LogQEstimator};

#[test]
fn ranks_equal_one_rank_on_the_concatenated_batch() {
    let ran = common::dist::ranks_equal_one_rank(4, |w| LocalGroup::ranks(w).unwrap());
    assert_eq!(ran, 5);
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

#[test]
fn batches_without_extra_negatives_need_no_neg_log_q() {
    // Issue 11: a batch with no extra negatives and no logQ was rejected (inverted check).
    // Every combination on one rank: accepted exactly when it is consistent.
    use recfuse::dist::{CrossBatch, CrossDeviceSoftmax};
    use recfuse::ops::inbatch_softmax::RowKind;
    let comms = LocalGroup::ranks(1).unwrap();
    let dev = Device::cpu();
    let q = Tensor::from_f32(&[0.3, -1.0, 0.5, 0.2, 0.9, -0.4], &[3, 2], DType::F32, &dev).unwrap();
    let p = Tensor::from_f32(&[1.0, 0.1, -0.2, 0.7, 0.4, 0.4], &[3, 2], DType::F32, &dev).unwrap();
    let neg = Tensor::from_f32(&[0.5, 0.5], &[1, 2], DType::F32, &dev).unwrap();
    let (lq, nlq) = ([-1.0f32, -2.0, -0.5], [-3.0f32]);
    let loss = CrossDeviceSoftmax::default();
    for (with_neg, pos_lq, neg_lq, ok) in [
        (false, false, false, true),
        (false, true, false, true),
        (true, false, false, true),
        (true, true, true, true),
        (true, true, false, false),
        (true, false, true, false),
    ] {
        let batch = CrossBatch {
            queries: &q,
            positives: &p,
            pos_ids: &[1, 2, 3],
            pos_log_q: pos_lq.then_some(&lq[..]),
            negatives: with_neg.then_some(&neg),
            neg_ids: if with_neg { &[4] } else { &[] },
            neg_log_q: neg_lq.then_some(&nlq[..]),
            kind: &[RowKind::Pos; 3],
            weight: &[1.0; 3],
            query_ids: None,
        };
        let got = loss.forward(&comms[0], &batch).map(|f| f.loss);
        assert_eq!(
            got.is_ok(),
            ok,
            "negatives {with_neg}, pos logQ {pos_lq}, neg logQ {neg_lq}: {got:?}"
        );
        if let Ok(l) = got {
            assert!(l.is_finite() && l > 0.0, "{l}");
        }
    }
}

/// A communicator that forwards only the required methods, so the trait's default (host)
/// tensor collectives run.
struct HostOnly<'a>(&'a recfuse::dist::LocalComm);

impl Communicator for HostOnly<'_> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_gather_bytes(&self, local: &[u8]) -> recfuse::Result<Vec<Vec<u8>>> {
        self.0.all_gather_bytes(local)
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> recfuse::Result<()> {
        self.0.all_reduce_sum(data)
    }
    fn reduce_scatter_sum(&self, data: &[f32], counts: &[usize]) -> recfuse::Result<Vec<f32>> {
        self.0.reduce_scatter_sum(data, counts)
    }
}

/// One rank's result of the tensor collectives: the all-reduced tensors (f32, bf16), the
/// gathered tensor, and the host copies the calling thread made.
struct TensorOut {
    reduced_f32: Vec<f32>,
    reduced_bf16: Vec<f32>,
    gathered: Vec<f32>,
    gathered_shape: Vec<usize>,
    transfers: u64,
}

/// Runs the tensor collectives on `world` ranks on `dev` (through `LocalComm` itself, or
/// through the host defaults) with each rank's inputs from `inputs[r]`.
fn tensor_collectives(
    dev: &Device,
    world: usize,
    host_path: bool,
    inputs: &[(Vec<f32>, Vec<f32>, Vec<f32>)],
    gather_rows: &[usize],
) -> Vec<TensorOut> {
    let comms = LocalGroup::ranks_with_timeout(world, Duration::from_secs(30)).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let (a, b, g) = &inputs[r];
                let rows = gather_rows[r];
                s.spawn(move || {
                    let mut ta = Tensor::from_f32(a, &[37, 5], DType::F32, dev).unwrap();
                    let mut tb = Tensor::from_f32(b, &[3], DType::BF16, dev).unwrap();
                    let tg = Tensor::from_f32(g, &[rows, 3], DType::F32, dev).unwrap();
                    let comm: &dyn Communicator = if host_path { &HostOnly(c) } else { c };
                    let before = dev.host_transfer_count();
                    comm.all_reduce_sum_tensors(&mut [&mut ta, &mut tb])
                        .unwrap();
                    let gathered = comm.all_gather_tensors(&tg).unwrap();
                    let transfers = dev.host_transfer_count() - before;
                    TensorOut {
                        reduced_f32: ta.to_f32_vec().unwrap(),
                        reduced_bf16: tb.to_f32_vec().unwrap(),
                        gathered_shape: gathered.shape().to_vec(),
                        gathered: gathered.to_f32_vec().unwrap(),
                        transfers,
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tensor_all_reduce_and_all_gather_on_every_backend() {
    let mut r = common::rng("dist tensor collectives");
    let world = 3;
    let gather_rows = [2usize, 0, 5];
    let bf = |v: f32| half::bf16::from_f32(v).to_f32();
    let inputs: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..world)
        .map(|rank| {
            (
                common::uniform(&mut r, 37 * 5, 1.0),
                common::uniform(&mut r, 3, 4.0)
                    .into_iter()
                    .map(bf)
                    .collect(),
                common::uniform(&mut r, gather_rows[rank] * 3, 1.0),
            )
        })
        .collect();
    // f64 references: the element-wise sums, and the rank-order concatenation.
    let sum = |k: usize, n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| inputs.iter().map(|x| f64::from([&x.0, &x.1][k][i])).sum())
            .collect()
    };
    let (sum_a, sum_b) = (sum(0, 37 * 5), sum(1, 3));
    let concat: Vec<f32> = inputs.iter().flat_map(|x| x.2.clone()).collect();
    for be in common::backends() {
        let gpu = be.device != Device::cpu();
        for host_path in [false, true] {
            let path = if host_path {
                "host default"
            } else {
                "LocalComm device"
            };
            let outs = tensor_collectives(&be.device, world, host_path, &inputs, &gather_rows);
            for (rank, o) in outs.iter().enumerate() {
                let got: Vec<f64> = o.reduced_f32.iter().map(|&v| f64::from(v)).collect();
                common::assert_close(&format!("{} {path} f32 sum", be.name), &got, &sum_a, 1e-6);
                let got: Vec<f64> = o.reduced_bf16.iter().map(|&v| f64::from(v)).collect();
                common::assert_close(&format!("{} {path} bf16 sum", be.name), &got, &sum_b, 2e-2);
                assert_eq!(o.gathered_shape, vec![7, 3], "{} {path}", be.name);
                assert_eq!(o.gathered, concat, "{} {path} rank {rank}: gather", be.name);
                // Identical bits on every rank.
                assert_eq!(o.reduced_f32, outs[0].reduced_f32, "{} {path}", be.name);
                assert_eq!(o.reduced_bf16, outs[0].reduced_bf16, "{} {path}", be.name);
                if gpu && !host_path {
                    assert_eq!(o.transfers, 0, "{} {path}: host copies", be.name);
                }
                if gpu && host_path {
                    assert!(o.transfers > 0, "{}: the transfer counter counts", be.name);
                }
            }
            eprintln!(
                "[recfuse tests] tensor collectives: {} via {path}: ok (rank 0 made {} host copies)",
                be.name, outs[0].transfers
            );
        }
        // Both paths sum f32 in rank order: the same bits.
        let dev_path = tensor_collectives(&be.device, world, false, &inputs, &gather_rows);
        let host = tensor_collectives(&be.device, world, true, &inputs, &gather_rows);
        assert_eq!(dev_path[0].reduced_f32, host[0].reduced_f32, "{}", be.name);
    }
}

#[test]
fn tensor_collectives_with_mismatched_shapes_fail_every_rank() {
    for be in common::backends() {
        for host_path in [false, true] {
            let comms = LocalGroup::ranks_with_timeout(2, Duration::from_secs(20)).unwrap();
            let dev = &be.device;
            let errs: Vec<(bool, bool)> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter()
                    .enumerate()
                    .map(|(rank, c)| {
                        s.spawn(move || {
                            let comm: &dyn Communicator = if host_path { &HostOnly(c) } else { c };
                            // Rank 1's tensor is [4, 2], rank 0's [2, 4]: same count, other shape.
                            let shape = if rank == 0 { [2, 4] } else { [4, 2] };
                            let mut t = Tensor::zeros(&shape, DType::F32, dev).unwrap();
                            let reduce = comm.all_reduce_sum_tensors(&mut [&mut t]).is_err();
                            let gather = comm.all_gather_tensors(&t).is_err();
                            (reduce, gather)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(
                errs,
                vec![(true, true); 2],
                "{} host_path={host_path}",
                be.name
            );
        }
    }
}

use recfuse::{DType, Device, Tensor};

use rand::SeedableRng;
