//! Collectives for cross-device training: the [`Communicator`] trait, its in-process
//! implementation [`LocalGroup`] (one thread per rank) and, with the `nccl` feature, its NCCL
//! implementation `NcclComm` (one GPU per rank, any number of processes and nodes), the
//! cross-device in-batch softmax ([`CrossDeviceSoftmax`]), the streaming logQ estimator
//! ([`LogQEstimator`]) and the tensor collectives of data-parallel training
//! ([`Communicator::all_reduce_sum_tensors`] for dense gradients,
//! [`Communicator::all_gather_tensors`]; `examples/train_two_tower.rs` uses both).
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
mod tensors;

pub use local::{LocalComm, LocalGroup};
pub use logq::{mixed_log_q, LogQEstimator};
#[cfg(feature = "nccl")]
pub use nccl::{NcclComm, NcclId};
pub use softmax::{CrossBatch, CrossDeviceSoftmax, CrossForward, CrossGrads};

use crate::error::Result;
use crate::tensor::Tensor;

/// The collectives the cross-device ops need. The byte and f32 collectives take host slices
/// (a device implementation, NCCL, moves device memory with the same semantics); the tensor
/// collectives take tensors on any device.
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

    /// Element-wise sum over ranks of each tensor, in place: the all-reduce of a
    /// data-parallel trainer's dense gradients. Every rank passes the same number of tensors
    /// with the same dtypes and shapes, in the same order (else every rank gets an error);
    /// sums are in f32 in rank order, so every rank holds identical bits.
    ///
    /// This default goes through the host (one download and one upload per tensor, one
    /// `all_reduce_sum` for them all); [`LocalComm`] sums on the device when the ranks share
    /// one (no host copy).
    ///
    /// ```
    /// use recfuse::dist::{Communicator, LocalGroup};
    /// use recfuse::{Device, Tensor};
    /// let comms = LocalGroup::ranks(2)?;
    /// let sums = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms.iter().enumerate().map(|(r, c)| s.spawn(move || {
    ///         let mut g = Tensor::from_slice(&[r as f32, 1.0], &[2], &Device::cpu())?;
    ///         c.all_reduce_sum_tensors(&mut [&mut g])?;
    ///         g.to_vec::<f32>()
    ///     })).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect::<recfuse::Result<Vec<_>>>()
    /// })?;
    /// assert_eq!(sums, vec![vec![1.0, 2.0]; 2]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    fn all_reduce_sum_tensors(&self, tensors: &mut [&mut Tensor]) -> Result<()> {
        tensors::host_all_reduce(self, tensors)
    }

    /// Every rank's `[n_r, …]` tensor concatenated along axis 0 in rank order
    /// (`[Σ n_r, …]`, on this rank's device). The dtype and the other dims must agree on every
    /// rank; `n_r` may differ. The default goes through the host; [`LocalComm`] gathers on
    /// the device when the ranks share one.
    fn all_gather_tensors(&self, t: &Tensor) -> Result<Tensor> {
        tensors::host_all_gather(self, t)
    }
}
