//! Collectives for cross-device training: the [`Communicator`] trait, its in-process
//! implementation [`LocalGroup`] (one thread per rank) and, with the `nccl` feature, its NCCL
//! implementation `NcclComm` (one GPU per rank, any number of processes and nodes), the
//! cross-device in-batch softmax ([`CrossDeviceSoftmax`]) and the streaming logQ estimator
//! ([`LogQEstimator`]).
//!
//! A failed or mismatched rank yields an `Error` on every rank, never a hang: each collective
//! waits with a deadline, checks that every rank called the same collective with consistent
//! sizes, and a rank that leaves the group (its communicator dropped, e.g. by a panicking
//! thread) fails the others at once. `NcclComm` gives the same errors for failed and mismatched
//! collectives; a dead rank is caught by a deadline (see its docs for what that covers).

mod local;
mod logq;
#[cfg(feature = "nccl")]
mod nccl;
mod softmax;

pub use local::{LocalComm, LocalGroup};
pub use logq::{mixed_log_q, LogQEstimator};
#[cfg(feature = "nccl")]
pub use nccl::{NcclComm, NcclId};
pub use softmax::{CrossBatch, CrossDeviceSoftmax, CrossForward, CrossGrads};

use crate::error::Result;

/// The collectives the cross-device ops need. Buffers are host slices here; a device
/// implementation (NCCL) moves device memory with the same semantics.
pub trait Communicator: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Every rank's bytes, in rank order (sizes may differ between ranks).
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Element-wise sum over ranks, in place; every rank passes the same length.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// `data` is `Σ counts` values laid out rank-major (block r belongs to rank r); returns the
    /// sum over ranks of this rank's block. Every rank passes the same `counts`.
    fn reduce_scatter_sum(&self, data: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
}
