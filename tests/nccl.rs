//! `NcclComm`, the NCCL communicator (feature `nccl`).
//!
//! Without libnccl or a GPU (CI) the tests say `SKIPPED: nccl unavailable: <reason>` loudly and
//! pass, after checking that every entry point returns `DeviceUnavailable` instead of panicking.
//! With NCCL and one GPU: single-rank collectives. With two or more GPUs: the cross-device
//! equivalence check of `tests/dist.rs` over NCCL (one thread per GPU), uneven sizes, mismatch
//! detection, the id exchange of the multi-process path, and the collective deadline.
//! `RECFUSE_REQUIRE=nccl` turns an unusable NCCL into a failure.
#![cfg(feature = "nccl")]

mod common;

use std::sync::mpsc;
use std::time::Duration;

use recfuse::dist::{Communicator, NcclComm, NcclId};
use recfuse::{DType, Device, Error, Tensor};

fn required(token: &str) -> bool {
    std::env::var("RECFUSE_REQUIRE")
        .map(|v| v.split(',').any(|t| t.trim() == token))
        .unwrap_or(false)
}

/// NCCL and at least `min` CUDA devices, or `None` after saying loudly why not.
fn gpus(min: usize, test: &str) -> Option<Vec<Device>> {
    match NcclComm::library_info() {
        Ok(info) => eprintln!("[recfuse tests] nccl: {info}"),
        Err(e) => {
            let reason = match e {
                Error::DeviceUnavailable { reason, .. } => reason,
                other => other.to_string(),
            };
            assert!(
                !required("nccl"),
                "RECFUSE_REQUIRE has nccl but it is unavailable: {reason}"
            );
            eprintln!("[recfuse tests] SKIPPED: nccl unavailable: {reason} ({test})");
            return None;
        }
    }
    let devs: Vec<Device> = (0..64).map_while(|i| Device::cuda(i).ok()).collect();
    if devs.len() < min {
        eprintln!(
            "[recfuse tests] SKIPPED: nccl {test}: needs {min} GPU(s), found {}",
            devs.len()
        );
        return None;
    }
    Some(devs)
}

/// Runs `f` on its own thread and fails the test if it has not finished in `limit` (a hung
/// collective must fail the test, not the CI job's wall clock).
fn with_watchdog(limit: Duration, what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().unwrap(),
        // The closure panicked (sender dropped): re-raise its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p)
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after {limit:?}"),
    }
}

#[test]
fn unavailable_is_an_error_not_a_panic() {
    // The id's serialisation needs no library.
    let bytes: Vec<u8> = (0..NcclId::BYTES).map(|i| i as u8).collect();
    let id = NcclId::from_bytes(&bytes).unwrap();
    assert_eq!(id.to_bytes().to_vec(), bytes);
    assert!(matches!(
        NcclId::from_bytes(&bytes[..5]),
        Err(Error::InvalidArgument { .. })
    ));

    match NcclComm::library_info() {
        Err(Error::DeviceUnavailable { backend, reason }) => {
            assert_eq!(backend, "nccl");
            assert!(
                !required("nccl"),
                "RECFUSE_REQUIRE has nccl but it is unavailable: {reason}"
            );
            eprintln!("[recfuse tests] SKIPPED: nccl unavailable: {reason}");
            let cuda0 = Device::cuda(0).ok();
            // Twice: cudarc panics on every call once its library failed to load, so each
            // entry point must check first, every time.
            for _ in 0..2 {
                let unavailable = |r: recfuse::Result<()>, what: &str| match r {
                    Err(Error::DeviceUnavailable {
                        backend: "nccl", ..
                    }) => {}
                    other => panic!("{what}: expected DeviceUnavailable, got {other:?}"),
                };
                unavailable(NcclId::new().map(|_| ()), "NcclId::new");
                unavailable(
                    NcclComm::new(&Device::cpu(), 0, 2, id).map(|_| ()),
                    "NcclComm::new (cpu)",
                );
                if let Some(d) = &cuda0 {
                    unavailable(
                        NcclComm::new(d, 0, 1, id).map(|_| ()),
                        "NcclComm::new (cuda:0)",
                    );
                }
                unavailable(
                    NcclComm::local_group(&[Device::cpu()]).map(|_| ()),
                    "NcclComm::local_group",
                );
            }
        }
        Err(other) => panic!("expected DeviceUnavailable, got {other:?}"),
        Ok(info) => {
            eprintln!("[recfuse tests] nccl: {info}");
            // Arguments are checked before NCCL is called (a bad id is never used here: it
            // would make ncclCommInitRank wait for a root that does not exist).
            assert!(matches!(
                NcclComm::new(&Device::cpu(), 0, 2, id),
                Err(Error::DeviceMismatch { .. })
            ));
            assert!(matches!(
                NcclComm::local_group(&[]),
                Err(Error::InvalidArgument { .. })
            ));
            if let Ok(d) = Device::cuda(0) {
                assert!(matches!(
                    NcclComm::new(&d, 1, 1, id),
                    Err(Error::InvalidArgument { .. })
                ));
                assert!(matches!(
                    NcclComm::local_group(&[d.clone(), d]),
                    Err(Error::InvalidArgument { .. })
                ));
            }
        }
    }
}

#[test]
fn single_rank_collectives() {
    let Some(devs) = gpus(1, "single_rank_collectives") else {
        return;
    };
    let dev = devs[0].clone();
    with_watchdog(
        Duration::from_secs(120),
        "single_rank_collectives",
        move || {
            // The multi-process path, with the id round-tripped through bytes.
            let id = NcclId::from_bytes(&NcclId::new().unwrap().to_bytes()).unwrap();
            let comm = NcclComm::new(&dev, 0, 1, id).unwrap();
            assert_eq!((comm.rank(), comm.world_size()), (0, 1));
            assert_eq!(
                comm.all_gather_bytes(b"abc").unwrap(),
                vec![b"abc".to_vec()]
            );
            assert_eq!(comm.all_gather_bytes(b"").unwrap(), vec![Vec::<u8>::new()]);
            let mut v = [1.0f32, -2.5, 3.25];
            comm.all_reduce_sum(&mut v).unwrap();
            assert_eq!(v, [1.0, -2.5, 3.25]);
            comm.all_reduce_sum(&mut []).unwrap();
            assert_eq!(
                comm.reduce_scatter_sum(&[1.0, 2.0, 3.0], &[3]).unwrap(),
                vec![1.0, 2.0, 3.0]
            );
            assert!(matches!(
                comm.reduce_scatter_sum(&[1.0, 2.0], &[3]),
                Err(Error::InvalidArgument { .. })
            ));
            // Still usable after an argument error.
            assert_eq!(
                comm.reduce_scatter_sum(&[], &[0]).unwrap(),
                Vec::<f32>::new()
            );

            let vals = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
            let mut t = Tensor::from_f32(&vals, &[2, 3], DType::F32, &dev).unwrap();
            let g = comm.all_gather_tensor(&t).unwrap();
            assert_eq!(g.shape(), &[1, 2, 3]);
            assert_eq!(g.to_f32_vec().unwrap(), vals);
            comm.all_reduce_sum_tensor(&mut t).unwrap();
            assert_eq!(t.to_f32_vec().unwrap(), vals);
            let cpu = Tensor::from_f32(&vals, &[6], DType::F32, &Device::cpu()).unwrap();
            assert!(matches!(
                comm.all_gather_tensor(&cpu),
                Err(Error::DeviceMismatch { .. })
            ));
            let mut b = Tensor::from_f32(&vals, &[6], DType::BF16, &dev).unwrap();
            assert!(matches!(
                comm.all_reduce_sum_tensor(&mut b),
                Err(Error::DType { .. })
            ));
            comm.finalize().unwrap();

            // The single-process constructor with one device.
            let group = NcclComm::local_group(std::slice::from_ref(&dev)).unwrap();
            assert_eq!(group.len(), 1);
            assert_eq!(
                group[0].all_gather_bytes(b"x").unwrap(),
                vec![b"x".to_vec()]
            );
        },
    );
}

/// Rank r's payload for the uneven all-gather: rank 1 sends nothing.
fn payload(r: usize) -> Vec<u8> {
    if r == 1 {
        Vec::new()
    } else {
        (0..3 * r + 1).map(|i| (10 * r + i) as u8).collect()
    }
}

#[test]
fn collectives_with_uneven_sizes_and_mismatches() {
    let Some(devs) = gpus(2, "collectives_with_uneven_sizes_and_mismatches") else {
        return;
    };
    with_watchdog(Duration::from_secs(300), "uneven collectives", move || {
        let comms = NcclComm::local_group(&devs).unwrap();
        let w = comms.len();
        // Uneven reduce-scatter blocks, one of them empty.
        let counts: Vec<usize> = (0..w).map(|r| if r == 1 { 0 } else { r + 2 }).collect();
        let n: usize = counts.iter().sum();
        std::thread::scope(|s| {
            for c in &comms {
                let counts = &counts;
                s.spawn(move || {
                    let r = c.rank();
                    let all = c.all_gather_bytes(&payload(r)).unwrap();
                    assert_eq!(all, (0..w).map(payload).collect::<Vec<_>>(), "rank {r}");

                    let mut v = vec![r as f32 + 1.0, 0.5, -(r as f32)];
                    c.all_reduce_sum(&mut v).unwrap();
                    let wf = w as f32;
                    assert_eq!(
                        v,
                        vec![wf * (wf + 1.0) / 2.0, 0.5 * wf, -wf * (wf - 1.0) / 2.0]
                    );

                    let data: Vec<f32> = (0..n).map(|j| (r * 100 + j) as f32).collect();
                    let got = c.reduce_scatter_sum(&data, counts).unwrap();
                    let start: usize = counts[..r].iter().sum();
                    let want: Vec<f32> = (start..start + counts[r])
                        .map(|j| (0..w).map(|q| (q * 100 + j) as f32).sum())
                        .collect();
                    assert_eq!(got, want, "rank {r} reduce_scatter");

                    let dev = c.device();
                    let tv: Vec<f32> = (0..6).map(|j| (10 * r + j) as f32).collect();
                    let mut t = Tensor::from_f32(&tv, &[2, 3], DType::F32, &dev).unwrap();
                    let g = c.all_gather_tensor(&t).unwrap();
                    assert_eq!(g.shape(), &[w, 2, 3]);
                    let want: Vec<f32> = (0..w)
                        .flat_map(|q| (0..6).map(move |j| (10 * q + j) as f32))
                        .collect();
                    assert_eq!(g.to_f32_vec().unwrap(), want);
                    c.all_reduce_sum_tensor(&mut t).unwrap();
                    let want: Vec<f32> = (0..6)
                        .map(|j| (0..w).map(|q| (10 * q + j) as f32).sum())
                        .collect();
                    assert_eq!(t.to_f32_vec().unwrap(), want);

                    // Mismatched sizes, then mismatched collectives: an error on every rank,
                    // and the communicator stays usable.
                    let mut m = vec![1.0f32; if r == 0 { 2 } else { 3 }];
                    let e = c.all_reduce_sum(&mut m).unwrap_err();
                    assert!(e.to_string().contains("mismatch"), "rank {r}: {e}");
                    let e = if r == 0 {
                        c.all_gather_bytes(b"x").map(|_| ()).unwrap_err()
                    } else {
                        c.all_reduce_sum(&mut [1.0]).unwrap_err()
                    };
                    assert!(e.to_string().contains("mismatch"), "rank {r}: {e}");
                    let mut one = [1.0f32];
                    c.all_reduce_sum(&mut one).unwrap();
                    assert_eq!(one[0], w as f32);
                });
            }
        });
    });
}

#[test]
fn ranks_equal_one_rank_on_the_concatenated_batch() {
    let Some(devs) = gpus(2, "ranks_equal_one_rank_on_the_concatenated_batch") else {
        return;
    };
    with_watchdog(Duration::from_secs(600), "equivalence", move || {
        let ran = common::dist::ranks_equal_one_rank(devs.len(), |w| {
            NcclComm::local_group(&devs[..w]).unwrap()
        });
        assert!(ran >= 1);
        eprintln!(
            "[recfuse tests] nccl equivalence: {ran} case(s) on {} GPUs",
            devs.len()
        );
    });
}

#[test]
fn id_exchange_across_threads() {
    let Some(devs) = gpus(2, "id_exchange_across_threads") else {
        return;
    };
    with_watchdog(Duration::from_secs(120), "id exchange", move || {
        let w = devs.len();
        // Rank 0 makes the id; the others get only its bytes, as over a trainer's channel.
        let bytes = NcclId::new().unwrap().to_bytes();
        std::thread::scope(|s| {
            for (r, d) in devs.iter().enumerate() {
                s.spawn(move || {
                    let id = NcclId::from_bytes(&bytes).unwrap();
                    let comm = NcclComm::new(d, r, w, id).unwrap();
                    let mut v = [1.0f32, r as f32];
                    comm.all_reduce_sum(&mut v).unwrap();
                    assert_eq!(v, [w as f32, (w * (w - 1) / 2) as f32]);
                    // Every rank has returned from the collective before any finalises.
                    comm.finalize().unwrap();
                });
            }
        });
    });
}

#[test]
fn a_missing_rank_times_out_instead_of_hanging() {
    let Some(devs) = gpus(2, "a_missing_rank_times_out_instead_of_hanging") else {
        return;
    };
    with_watchdog(Duration::from_secs(120), "timeout", move || {
        let mut comms = NcclComm::local_group(&devs[..2]).unwrap();
        // The same collective once on both ranks first: NCCL connects peers lazily on first
        // use, inside the enqueue call, which the deadline does not cover.
        std::thread::scope(|s| {
            for c in &comms {
                s.spawn(move || c.all_gather_bytes(b"warm-up").unwrap());
            }
        });
        comms[0].set_timeout(Some(Duration::from_secs(2)));
        let t0 = std::time::Instant::now();
        // Rank 1 never joins.
        let e = comms[0].all_gather_bytes(b"warm-up").unwrap_err();
        assert!(e.to_string().contains("did not complete within"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(30));
        // Aborted: later calls fail at once.
        let e = comms[0].all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(e.to_string().contains("aborted"), "{e}");
    });
}
