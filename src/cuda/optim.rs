//! Launchers of `kernels/cuda/optim.cu`: one launch per 32 tensors, the tensor table passed by
//! value in the kernel's parameter block (nothing is uploaded per step).

use std::sync::Arc;

use cudarc::driver::{DeviceRepr, SyncOnDrop};

use super::gemm::{dt_code, ptr, ptr_mut, storage, storage_mut, u32_of};
use super::launch::{self, launch_err, Geometry};
use super::CudaDevice;
use crate::error::Result;
use crate::ops::optim::{OptHyper, OptKind, Slot};

/// Tensors per launch (optim.cu's OPT_MAX_TENSORS).
const MAX_TENSORS: usize = 32;
const THREADS: u32 = 256;

/// Mirrors `struct OptEntry` in kernels/cuda/optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct OptEntry {
    p: u64,
    g: u64,
    s1: u64,
    s2: u64,
    m: u64,
    n: u32,
    dim: u32,
    block0: u32,
    dts: u32,
}
const _: () = assert!(std::mem::size_of::<OptEntry>() == 56);

/// Mirrors `struct OptParams` in kernels/cuda/optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct OptParams {
    h: [f32; 8],
    flags: u32,
    count: u32,
    pad0: u32,
    pad1: u32,
    e: [OptEntry; MAX_TENSORS],
}
const _: () = assert!(std::mem::size_of::<OptParams>() == 1840);
// SAFETY: #[repr(C)], plain integers and floats, no implicit padding (8·4 + 4·4 + 32·56 =
// 1840), same layout as the CUDA struct (size asserted on both sides).
unsafe impl DeviceRepr for OptParams {}

pub(crate) fn step(d: &Arc<CudaDevice>, hyper: &OptHyper, slots: &mut [Slot<'_>]) -> Result<()> {
    const OP: &str = "optim_step(cuda)";
    let kernel = match hyper.kind {
        OptKind::Sgd => "sgd_step",
        OptKind::Adam => "adam_step",
        OptKind::RowwiseAdagrad => "rowwise_adagrad_step",
    };
    let func = d.function("optim.cu", &[], kernel)?;
    let stream = d.stream.clone();
    for chunk in slots.chunks_mut(MAX_TENSORS) {
        let mut params = OptParams {
            h: hyper.h,
            flags: hyper.flags,
            count: 0,
            pad0: 0,
            pad1: 0,
            e: [OptEntry::default(); MAX_TENSORS],
        };
        // The pointer guards must live until the launch has been queued.
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::new();
        let mut blocks: u64 = 0;
        for (i, s) in chunk.iter_mut().enumerate() {
            let numel = s.param.numel();
            u32_of(OP, "param", "element count", numel)?;
            let (n, per) = match hyper.kind {
                OptKind::RowwiseAdagrad => (s.rows, if numel == 0 { 0 } else { s.rows as u64 }),
                _ => (
                    numel,
                    (numel.div_ceil(2) as u64).div_ceil(u64::from(THREADS)),
                ),
            };
            let mut e = OptEntry {
                n: n as u32,
                dim: s.dim as u32,
                block0: u32::try_from(blocks)
                    .map_err(|_| launch_err(kernel, "more than 2^32 blocks in one launch"))?,
                dts: dt_code(s.param.dtype()) | (dt_code(s.grad.dtype()) << 8),
                ..Default::default()
            };
            blocks += per;
            let (pg, gg) = ptr(storage(OP, "grad", d, s.grad)?, &stream);
            e.g = pg;
            guards.push(gg);
            let (pp, gp) = ptr_mut(storage_mut(OP, "param", d, s.param)?, &stream);
            e.p = pp;
            guards.push(gp);
            if let Some(t) = s.s1.as_deref_mut() {
                let (p, g) = ptr_mut(storage_mut(OP, "state", d, t)?, &stream);
                e.s1 = p;
                guards.push(g);
            }
            if let Some(t) = s.s2.as_deref_mut() {
                let (p, g) = ptr_mut(storage_mut(OP, "state", d, t)?, &stream);
                e.s2 = p;
                guards.push(g);
            }
            if let Some(t) = s.master.as_deref_mut() {
                let (p, g) = ptr_mut(storage_mut(OP, "master", d, t)?, &stream);
                e.m = p;
                guards.push(g);
            }
            params.e[i] = e;
            params.count = i as u32 + 1;
        }
        if blocks == 0 {
            continue;
        }
        let grid = u32::try_from(blocks)
            .ok()
            .filter(|&b| b <= d.limits.max_grid[0])
            .ok_or_else(|| launch_err(kernel, format!("{blocks} blocks exceed grid.x")))?;
        // An empty tensor owns no blocks but keeps its table slot; the kernel's scan picks the
        // last entry whose block0 ≤ blockIdx, i.e. never an empty one that precedes a
        // non-empty one at the same block0 — entries are ordered, so later wins.
        // SAFETY: `params` mirrors OptParams in optim.cu (size asserted on both sides). Entry i
        // owns blocks [block0_i, block0_i + per_i) and the kernel forms only element indices
        // < n_i (SGD/Adam) or rows·dim (Adagrad) of that entry's tensors, which hold exactly
        // that many elements (validated by ops::optim: grad, states and master have param's
        // shape, the Adagrad state has `rows`). Every tensor is a distinct exclusive borrow
        // (or the shared grad), so no output aliases another. Allocations outlive the kernel
        // in stream order.
        unsafe {
            launch::launch(
                kernel,
                &stream,
                &func,
                &d.limits,
                Geometry {
                    grid: (grid, 1, 1),
                    block: (THREADS, 1, 1),
                    dyn_smem: 0,
                },
                &params,
                d.sync_check,
            )?;
        }
        drop(guards);
    }
    Ok(())
}
