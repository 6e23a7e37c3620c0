//! Streaming item-frequency estimation (Yi et al. 2019, "Sampling-Bias-Corrected Neural
//! Modeling"): hashed arrays A (the step an item was last seen) and B (the estimated gap
//! between its appearances), `B ← (1−α)·B + α·(t − A)`, `A ← t`, `q = 1/B`. Fed with the
//! all-gathered ids of every step, in rank order, every rank holds bit-identical state.

use super::Communicator;
use crate::error::{Error, Result};

/// The streaming logQ estimator.
///
/// ```
/// use recfuse::dist::LogQEstimator;
/// let mut est = LogQEstimator::new(1 << 10, 0.1)?;
/// for _ in 0..50 {
///     est.update(&[1, 2, 2]); // item 2 appears every step, item 1 too
///     est.update(&[2]); // only item 2
/// }
/// let lq = est.log_q(&[1, 2]);
/// assert!(lq[1] > lq[0]); // the more frequent item has the larger q
/// # Ok::<(), recfuse::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LogQEstimator {
    last: Vec<i64>,
    gap: Vec<f32>,
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

impl LogQEstimator {
    /// `size` hash buckets, learning rate `alpha` ∈ (0, 1].
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
            last: vec![0; size],
            // An unseen bucket's gap starts at 1 step (q = 1): conservative, never infinite.
            gap: vec![1.0; size],
            alpha,
            step: 0,
        })
    }

    /// One training step that saw `ids` (all ranks' ids, in rank order).
    pub fn update(&mut self, ids: &[i64]) {
        self.step += 1;
        let t = self.step;
        for &id in ids {
            let h = bucket(id, self.last.len());
            if self.last[h] != t {
                // The first sighting of a bucket in a step updates the gap; repeats in the
                // same step do not shrink it to 0.
                if self.last[h] != 0 {
                    self.gap[h] =
                        (1.0 - self.alpha) * self.gap[h] + self.alpha * (t - self.last[h]) as f32;
                }
                self.last[h] = t;
            }
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

    /// Estimated per-step probability q of each id.
    pub fn q(&self, ids: &[i64]) -> Vec<f32> {
        ids.iter()
            .map(|&id| 1.0 / self.gap[bucket(id, self.gap.len())].max(1.0))
            .collect()
    }

    /// `log q` per id, ready for `Columns::log_q`.
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
