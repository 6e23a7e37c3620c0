//! Collectives over tensors, the data-parallel trainer's pair: an all-reduce (sum) of dense
//! gradients and an all-gather along axis 0 (e.g. the pooled-embedding gradients every rank
//! needs for a replicated table's sparse update).
//!
//! Here: the shape checks every implementation shares, and the host implementations that
//! [`Communicator`]'s default methods use (one download and one upload per tensor, through the
//! byte collectives). [`super::LocalComm`] overrides both with device-side versions when the
//! ranks share a device.

use super::Communicator;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{CpuStorage, Tensor};

pub(crate) const OP_REDUCE: &str = "all_reduce_sum_tensors";
pub(crate) const OP_GATHER: &str = "all_gather_tensors";

pub(crate) fn dtype_code(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// What every rank must agree on for an all-reduce: per tensor, its dtype and shape.
pub(crate) fn reduce_signature(tensors: &[&mut Tensor]) -> Vec<usize> {
    let mut sig = vec![tensors.len()];
    for t in tensors {
        sig.push(dtype_code(t.dtype()));
        sig.push(t.shape().len());
        sig.extend_from_slice(t.shape());
    }
    sig
}

/// What every rank must agree on for an all-gather: the dtype and every dim but the first.
pub(crate) fn gather_signature(t: &Tensor) -> Result<Vec<usize>> {
    if t.shape().is_empty() {
        return Err(Error::shape(
            OP_GATHER,
            "t",
            "[n_r, …] (rank ≥ 1)",
            t.shape(),
        ));
    }
    let mut sig = vec![dtype_code(t.dtype()), t.shape().len()];
    sig.extend_from_slice(&t.shape()[1..]);
    Ok(sig)
}

/// Fails every rank identically when the ranks' signatures differ (an all-gather of them).
fn agree<C: Communicator + ?Sized>(comm: &C, op: &'static str, sig: &[usize]) -> Result<()> {
    let words: Vec<u64> = sig.iter().map(|&v| v as u64).collect();
    let all = comm.all_gather_bytes(bytemuck::cast_slice(&words))?;
    for (r, b) in all.iter().enumerate() {
        let theirs: Vec<u64> = bytemuck::pod_collect_to_vec(b);
        if theirs != words {
            return Err(Error::invalid(
                op,
                "tensors",
                format!(
                    "rank {r} passed (count or dtype, shape…) {theirs:?}, rank {} passed {words:?}",
                    comm.rank()
                ),
            ));
        }
    }
    Ok(())
}

/// The host all-reduce: every tensor downloaded, one `all_reduce_sum` of them all, uploaded
/// back (rounded to each tensor's dtype).
pub(crate) fn host_all_reduce<C: Communicator + ?Sized>(
    comm: &C,
    tensors: &mut [&mut Tensor],
) -> Result<()> {
    agree(comm, OP_REDUCE, &reduce_signature(tensors))?;
    let mut flat = Vec::new();
    for t in tensors.iter() {
        flat.extend(t.to_f32_vec()?);
    }
    comm.all_reduce_sum(&mut flat)?;
    let mut at = 0;
    for t in tensors.iter_mut() {
        let n = t.numel();
        let summed = Tensor::from_f32(&flat[at..at + n], t.shape(), t.dtype(), &t.device())?;
        t.copy_from(&summed)?;
        at += n;
    }
    Ok(())
}

/// The host all-gather: every rank's row count and bytes, concatenated, uploaded to `t`'s
/// device.
pub(crate) fn host_all_gather<C: Communicator + ?Sized>(comm: &C, t: &Tensor) -> Result<Tensor> {
    agree(comm, OP_GATHER, &gather_signature(t)?)?;
    let mut msg = (t.shape()[0] as u64).to_le_bytes().to_vec();
    msg.extend(t.to_bytes()?);
    let all = comm.all_gather_bytes(&msg)?;
    let mut rows = 0usize;
    let mut bytes = Vec::new();
    for m in &all {
        let (n, b) = m.split_at(8.min(m.len()));
        let mut w = [0u8; 8];
        w[..n.len()].copy_from_slice(n);
        rows += u64::from_le_bytes(w) as usize;
        bytes.extend_from_slice(b);
    }
    let mut shape = t.shape().to_vec();
    shape[0] = rows;
    let host = CpuStorage::from_bytes(t.dtype(), &bytes);
    if host.len() != shape.iter().product::<usize>() {
        return Err(Error::invalid(
            OP_GATHER,
            "t",
            "the gathered bytes do not match the gathered row counts",
        ));
    }
    Tensor::from_f32(&host.to_f32(), &shape, t.dtype(), &t.device())
}
