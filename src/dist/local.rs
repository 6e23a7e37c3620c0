//! `LocalGroup`: W ranks in one process, one thread each, meeting in shared memory. For tests
//! (multi-rank equivalence on one machine) and CPU training.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::tensors::{self, OP_GATHER, OP_REDUCE};
use super::Communicator;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// What one rank brought to one collective.
struct Post {
    op: &'static str,
    /// A size signature every rank must agree on (e.g. the element count of an all-reduce).
    signature: Vec<usize>,
    payload: Vec<u8>,
    /// Device copies of this rank's tensors (tensor collectives), shared with the other ranks
    /// by reference: they read them on the device, nothing crosses to the host.
    tensors: Option<Arc<Vec<Tensor>>>,
}

/// What one rank receives from one collective: every rank's post, in rank order.
struct Received {
    payloads: Vec<Vec<u8>>,
    tensors: Vec<Option<Arc<Vec<Tensor>>>>,
}

struct Round {
    posts: Vec<Option<Post>>,
    taken: usize,
}

struct State {
    rounds: HashMap<u64, Round>,
    /// Ranks that left the group (communicator dropped or aborted), with the reason.
    gone: Vec<Option<String>>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// Constructor of an in-process group.
pub struct LocalGroup;

impl LocalGroup {
    /// `world` communicators, one per rank; hand each to its own thread. A collective that
    /// not every rank joins within 60 s fails with an error.
    pub fn ranks(world: usize) -> Result<Vec<LocalComm>> {
        Self::ranks_with_timeout(world, Duration::from_secs(60))
    }

    /// As `ranks`, with the collective deadline given.
    pub fn ranks_with_timeout(world: usize, timeout: Duration) -> Result<Vec<LocalComm>> {
        if world == 0 {
            return Err(Error::invalid("LocalGroup::ranks", "world", "must be ≥ 1"));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                rounds: HashMap::new(),
                gone: vec![None; world],
            }),
            cv: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
                calls: Mutex::new(0),
            })
            .collect())
    }
}

/// One rank's end of a `LocalGroup`.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    /// How many collectives this rank has entered: rounds are matched by this index.
    calls: Mutex<u64>,
}

fn comm_err(reason: String) -> Error {
    Error::Backend {
        backend: "dist::LocalGroup",
        reason,
    }
}

impl LocalComm {
    /// Leaves the group: every pending and future collective on the other ranks fails with
    /// `reason` instead of waiting.
    pub fn abort(&self, reason: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.gone[self.rank] = Some(reason.to_string());
        self.shared.cv.notify_all();
    }

    /// Posts this rank's contribution and returns every rank's, once all have posted.
    fn exchange(
        &self,
        op: &'static str,
        signature: Vec<usize>,
        payload: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange_with(op, signature, payload, None)?.payloads)
    }

    /// As `exchange`, with device tensors beside the bytes.
    fn exchange_with(
        &self,
        op: &'static str,
        signature: Vec<usize>,
        payload: Vec<u8>,
        tensors: Option<Arc<Vec<Tensor>>>,
    ) -> Result<Received> {
        let world = self.shared.world;
        let round_id = {
            let mut c = self.calls.lock().unwrap_or_else(|p| p.into_inner());
            *c += 1;
            *c
        };
        let deadline = Instant::now() + self.shared.timeout;
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let round = st.rounds.entry(round_id).or_insert_with(|| Round {
            posts: (0..world).map(|_| None).collect(),
            taken: 0,
        });
        round.posts[self.rank] = Some(Post {
            op,
            signature,
            payload,
            tensors,
        });
        self.shared.cv.notify_all();
        loop {
            let round = st
                .rounds
                .get(&round_id)
                .ok_or_else(|| comm_err("collective state lost".into()))?;
            if round.posts.iter().all(|p| p.is_some()) {
                break;
            }
            // A rank that left can no longer post: if it has not posted here, nobody will.
            let dead = st.gone.iter().enumerate().find_map(|(r, g)| {
                g.as_ref()
                    .filter(|_| round.posts[r].is_none())
                    .map(|w| (r, w.clone()))
            });
            if let Some((r, why)) = dead {
                return Err(comm_err(format!(
                    "rank {}: {op}: rank {r} left the group ({why})",
                    self.rank
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> =
                    (0..world).filter(|&r| round.posts[r].is_none()).collect();
                return Err(comm_err(format!(
                    "rank {}: {op} (collective #{round_id}) timed out after {:?} waiting for ranks {missing:?}",
                    self.rank, self.shared.timeout
                )));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let round = st
            .rounds
            .get_mut(&round_id)
            .ok_or_else(|| comm_err("collective state lost".into()))?;
        // Every rank checks the same posts, so a mismatch fails all of them identically.
        let posts: Vec<&Post> = round.posts.iter().flatten().collect();
        let first = posts[0];
        for (r, p) in posts.iter().enumerate() {
            if p.op != first.op || p.signature != first.signature {
                let msg = format!(
                    "rank {}: collective #{round_id} mismatch: rank 0 called {}{:?}, rank {r} called {}{:?}",
                    self.rank, first.op, first.signature, p.op, p.signature
                );
                return Err(comm_err(msg));
            }
        }
        let out = Received {
            payloads: posts.iter().map(|p| p.payload.clone()).collect(),
            tensors: posts.iter().map(|p| p.tensors.clone()).collect(),
        };
        round.taken += 1;
        if round.taken == world {
            st.rounds.remove(&round_id);
        }
        Ok(out)
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.gone[self.rank].is_none() {
            st.gone[self.rank] = Some(if std::thread::panicking() {
                "its thread panicked".to_string()
            } else {
                "its communicator was dropped".to_string()
            });
        }
        self.shared.cv.notify_all();
    }
}

/// Another rank's tensor copied onto `dev` when it lives elsewhere (a host round trip only
/// when the ranks' devices differ); `None` when it is already there.
fn moved_to(t: &Tensor, dev: &crate::device::Device) -> Result<Option<Tensor>> {
    if t.device() == *dev {
        Ok(None)
    } else {
        t.to_device(dev).map(Some)
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(bytes)
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.exchange("all_gather", Vec::new(), local.to_vec())
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let all = self.exchange(
            "all_reduce_sum",
            vec![data.len()],
            bytemuck::cast_slice(data).to_vec(),
        )?;
        // Summed in rank order on every rank: identical bits everywhere.
        data.iter_mut().for_each(|v| *v = 0.0);
        for p in &all {
            for (d, s) in data.iter_mut().zip(f32s(p)) {
                *d += s;
            }
        }
        Ok(())
    }

    fn reduce_scatter_sum(&self, data: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let world = self.shared.world;
        if counts.len() != world || counts.iter().sum::<usize>() != data.len() {
            return Err(Error::invalid(
                "reduce_scatter_sum",
                "counts",
                format!(
                    "{} counts summing to {} for {} values and {world} ranks",
                    counts.len(),
                    counts.iter().sum::<usize>(),
                    data.len()
                ),
            ));
        }
        let mut sig = counts.to_vec();
        sig.push(data.len());
        let all = self.exchange(
            "reduce_scatter_sum",
            sig,
            bytemuck::cast_slice(data).to_vec(),
        )?;
        let start: usize = counts[..self.rank].iter().sum();
        let mut out = vec![0f32; counts[self.rank]];
        for p in &all {
            let v = f32s(p);
            for (o, s) in out.iter_mut().zip(&v[start..start + counts[self.rank]]) {
                *o += s;
            }
        }
        Ok(out)
    }

    /// On the device: each rank posts device copies of its tensors, then every rank sums all
    /// ranks' copies into its own tensors in rank order (`copy_from` rank 0, `add_` the rest:
    /// the same f32 operations everywhere, so identical bits). No host copy when the ranks
    /// share a device; a tensor on another rank's device is fetched with `to_device`.
    fn all_reduce_sum_tensors(&self, tensors: &mut [&mut Tensor]) -> Result<()> {
        let sig = tensors::reduce_signature(tensors);
        let copies = tensors
            .iter()
            .map(|t| t.try_clone())
            .collect::<Result<Vec<_>>>()?;
        let got = self.exchange_with(OP_REDUCE, sig, Vec::new(), Some(Arc::new(copies)))?;
        let all: Vec<&Arc<Vec<Tensor>>> = got
            .tensors
            .iter()
            .map(|t| {
                t.as_ref()
                    .ok_or_else(|| comm_err(format!("{OP_REDUCE}: a rank posted no tensors")))
            })
            .collect::<Result<_>>()?;
        for (k, t) in tensors.iter_mut().enumerate() {
            let dev = t.device();
            let first = moved_to(&all[0][k], &dev)?;
            t.copy_from(first.as_ref().unwrap_or(&all[0][k]))?;
            for theirs in &all[1..] {
                let x = moved_to(&theirs[k], &dev)?;
                t.add_(x.as_ref().unwrap_or(&theirs[k]))?;
            }
        }
        Ok(())
    }

    /// On the device: each rank posts a device copy of its tensor; every rank writes all of
    /// them, in rank order, into one new tensor along axis 0.
    fn all_gather_tensors(&self, t: &Tensor) -> Result<Tensor> {
        let sig = tensors::gather_signature(t)?;
        let got = self.exchange_with(
            OP_GATHER,
            sig,
            Vec::new(),
            Some(Arc::new(vec![t.try_clone()?])),
        )?;
        let parts: Vec<&Tensor> = got
            .tensors
            .iter()
            .map(|p| {
                p.as_ref()
                    .and_then(|v| v.first())
                    .ok_or_else(|| comm_err(format!("{OP_GATHER}: a rank posted no tensor")))
            })
            .collect::<Result<_>>()?;
        let dev = t.device();
        let mut shape = t.shape().to_vec();
        shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
        let mut out = Tensor::zeros(&shape, t.dtype(), &dev)?;
        let mut at = 0;
        for p in parts {
            if p.shape()[0] > 0 {
                let x = moved_to(p, &dev)?;
                crate::ops::glue::write_slice(&mut out, 0, at, x.as_ref().unwrap_or(p))?;
            }
            at += p.shape()[0];
        }
        Ok(out)
    }
}
