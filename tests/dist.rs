//! Cross-device in-batch softmax on an in-process group: W ranks with uneven batches give the
//! loss and gradients of one rank running the concatenated batch; failed or mismatched ranks
//! give errors, not hangs; the logQ estimator's state is identical on every rank.

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

use rand::SeedableRng;
