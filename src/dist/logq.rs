//! Streaming item-frequency estimation for the logQ correction: Yi et al. 2019
//! ("Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations", §4)
//! extended from "probability of appearing in a step" to "expected count per step", so an item
//! that occurs many times in one batch is counted by its rate instead of being capped at one.
//! Fed with the all-gathered ids of every step, in rank order, every rank holds bit-identical
//! state.

use super::Communicator;
use crate::error::{Error, Result};

/// The streaming logQ estimator: for every id, an estimate of its **expected count per step**
/// among the ids given to [`update`](Self::update) — with the all-gathered positives of every
/// rank, exactly what [`crate::ops::inbatch_softmax::Columns::log_q`] asks for (the log of the
/// expected count of the item among the columns).
///
/// # The estimator
/// Ids are hashed into `size` buckets. Bucket h keeps `A[h]` (the step it was last seen, 0 for
/// never), and two running sums over its *occurrences* that together estimate the mean gap
/// δ̂ between consecutive occurrences, in steps. At step t, a bucket seen `c ≥ 1` times, with
/// `g = t − A[h]` steps since its previous sighting (since the start of the stream on the
/// first), takes its c occurrences as c gaps of `g/c` each and folds them into exponential
/// moving averages with rate α per occurrence:
///
/// ```text
/// k    = (1 − α)^c                         (the weight left to older occurrences)
/// N[h] ← k·N[h] + (1 − k)·g/c               (EMA of the gap, per occurrence)
/// D[h] ← k·D[h] + (1 − k)                   (the same EMA of 1: its bias correction)
/// A[h] ← t
/// q̂    = D[h] / N[h]  = 1 / δ̂               (expected count per step)
/// ```
///
/// With `c = 1` every step this is Yi et al.'s `B ← (1−α)·B + α·(t − A)`, `q = 1/B`; the
/// division by D removes the start-up bias of an EMA started at 0 (as Adam's bias correction
/// does), so the first sighting already gives `q̂ = c/t`. The gaps of all occurrences sum to
/// the elapsed time, so `1/δ̂` is a ratio estimate (occurrences / steps) over roughly the
/// last `2/α` occurrences: relative noise ≈ `√(α/2)`, whatever the item's rate — a head item
/// seen 200 times per step and a tail item seen once per 1000 steps are both resolved. A
/// bucket never seen reads `q̂ = 1/(t + 1)` (below one occurrence in the t steps so far).
/// Hash collisions add the rates of the colliding ids; use `size` well above the catalogue.
///
/// [`log_q`](Self::log_q) is `ln q̂`. With extra negatives that are not in the update (mixed
/// negative sampling), combine the columns' counts yourself ([`mixed_log_q`]).
///
/// ```
/// use recfuse::dist::LogQEstimator;
/// let mut est = LogQEstimator::new(1 << 10, 0.05)?;
/// for t in 0..400 {
///     let mut ids = vec![2; 30]; // item 2: 30 times in every step
///     if t % 4 == 0 {
///         ids.push(1); // item 1: once every 4 steps
///     }
///     est.update(&ids);
/// }
/// let q = est.q(&[1, 2]);
/// assert!((q[0] - 0.25).abs() < 0.01, "{}", q[0]);
/// assert!((q[1] - 30.0).abs() < 0.01, "{}", q[1]);
/// let lq = est.log_q(&[1, 2]); // ready for Columns::log_q
/// assert!((lq[1] - 30f32.ln()).abs() < 1e-3);
/// # Ok::<(), recfuse::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LogQEstimator {
    /// A: the step a bucket was last seen (0: never).
    last: Vec<i64>,
    /// N: EMA over occurrences of the gap (steps per occurrence).
    gap: Vec<f32>,
    /// D: EMA over occurrences of 1 (N's bias correction).
    weight: Vec<f32>,
    alpha: f32,
    step: i64,
}

/// splitmix64: a fixed, well-mixed hash, so the same id lands in the same bucket everywhere.
fn bucket(id: i64, size: usize) -> usize {
    let mut z = (id as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % size as u64) as usize
}

fn filled<T: Clone>(size: usize, v: T) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(size).map_err(|_| {
        Error::invalid(
            "LogQEstimator::new",
            "size",
            format!("cannot allocate {size} buckets"),
        )
    })?;
    out.resize(size, v);
    Ok(out)
}

impl LogQEstimator {
    /// `size` hash buckets, learning rate `alpha` ∈ (0, 1] per occurrence (the estimate
    /// averages over about the last `2/α` occurrences of each id).
    pub fn new(size: usize, alpha: f32) -> Result<LogQEstimator> {
        if size == 0 {
            return Err(Error::invalid("LogQEstimator::new", "size", "must be ≥ 1"));
        }
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::invalid(
                "LogQEstimator::new",
                "alpha",
                format!("{alpha} is not in (0, 1]"),
            ));
        }
        Ok(LogQEstimator {
            last: filled(size, 0)?,
            gap: filled(size, 0.0)?,
            weight: filled(size, 0.0)?,
            alpha,
            step: 0,
        })
    }

    /// One training step that saw `ids` (all ranks' ids, in rank order; repeats count).
    pub fn update(&mut self, ids: &[i64]) {
        self.step += 1;
        let t = self.step;
        let mut hs: Vec<usize> = ids.iter().map(|&id| bucket(id, self.last.len())).collect();
        // Sorted, so each bucket is updated once with its count, in a fixed order.
        hs.sort_unstable();
        let mut i = 0;
        while i < hs.len() {
            let h = hs[i];
            let c = hs[i..].iter().take_while(|&&x| x == h).count();
            i += c;
            let g = (t - self.last[h]) as f64;
            let keep = (1.0 - self.alpha as f64).powi(c.min(i32::MAX as usize) as i32);
            self.gap[h] = (keep * self.gap[h] as f64 + (1.0 - keep) * g / c as f64) as f32;
            self.weight[h] = (keep * self.weight[h] as f64 + (1.0 - keep)) as f32;
            self.last[h] = t;
        }
    }

    /// All-gathers this rank's ids and updates with every rank's (the same state everywhere).
    pub fn update_gathered(&mut self, comm: &dyn Communicator, local_ids: &[i64]) -> Result<()> {
        let all = comm.all_gather_bytes(bytemuck::cast_slice(local_ids))?;
        let ids: Vec<i64> = all
            .iter()
            .flat_map(|b| bytemuck::pod_collect_to_vec::<u8, i64>(b))
            .collect();
        self.update(&ids);
        Ok(())
    }

    /// Estimated expected count per step `q̂` of each id (see the type's docs).
    pub fn q(&self, ids: &[i64]) -> Vec<f32> {
        ids.iter()
            .map(|&id| {
                let h = bucket(id, self.gap.len());
                // A seen bucket has N > 0 (every gap is ≥ 1/c steps).
                if self.last[h] == 0 {
                    1.0 / (self.step + 1) as f32
                } else {
                    self.weight[h] / self.gap[h]
                }
            })
            .collect()
    }

    /// `ln q̂` per id: the log expected count per step, ready for `Columns::log_q`.
    pub fn log_q(&self, ids: &[i64]) -> Vec<f32> {
        self.q(ids).into_iter().map(f32::ln).collect()
    }

    /// Steps seen so far.
    pub fn step(&self) -> i64 {
        self.step
    }
}

/// Mixed negative sampling's logQ (Yang et al. 2020): `ln(N_b·f_j + N_u/|C|)` for `N_b`
/// in-batch and `N_u` uniform negatives over a corpus of `corpus` items, given the in-batch
/// frequency `f_j` of each column's item.
pub fn mixed_log_q(
    freq: &[f32],
    n_batch: usize,
    n_uniform: usize,
    corpus: usize,
) -> Result<Vec<f32>> {
    if corpus == 0 {
        return Err(Error::invalid("mixed_log_q", "corpus", "must be ≥ 1"));
    }
    Ok(freq
        .iter()
        .map(|&f| (n_batch as f32 * f + n_uniform as f32 / corpus as f32).ln())
        .collect())
}
