//! Launchers of `kernels/wgsl/optim.wgsl`: one dispatch per tensor (WGSL has no device
//! pointers), all recorded into one command buffer and submitted once.

use std::sync::Arc;

use super::gemm::{dtype_code, fits_index, flag, storage, to_u32, EW_THREADS};
use super::inplace::pair_grid;
use super::pipelines::{Binding, Kernel, Launch, OPTIM_WGSL};
use super::{WgpuDevice, WgpuStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::optim::{OptHyper, OptKind, Slot};

use Binding::{Read as R, ReadWrite as RW, Uniform as U};

const BINDINGS: &[Binding] = &[U, RW, R, RW, RW, RW];
const SGD: Kernel = Kernel {
    shader: OPTIM_WGSL,
    entry: "sgd_main",
    bindings: BINDINGS,
};
const ADAM: Kernel = Kernel {
    shader: OPTIM_WGSL,
    entry: "adam_main",
    bindings: BINDINGS,
};
const ADAGRAD: Kernel = Kernel {
    shader: OPTIM_WGSL,
    entry: "adagrad_main",
    bindings: BINDINGS,
};

/// The buffer of an optional tensor, or its dummy.
fn optional<'a>(
    d: &Arc<WgpuDevice>,
    t: Option<&'a crate::Tensor>,
    arg: &'static str,
    dummy: &'a WgpuStorage,
) -> Result<&'a wgpu::Buffer> {
    Ok(match t {
        Some(t) => &storage("optim_step(wgpu)", arg, d, t)?.buffer,
        None => &dummy.buffer,
    })
}

pub(crate) fn step(d: &Arc<WgpuDevice>, hyper: &OptHyper, slots: &mut [Slot<'_>]) -> Result<()> {
    const OP: &str = "optim_step(wgpu)";
    let kernel = match hyper.kind {
        OptKind::Sgd => SGD,
        OptKind::Adam => ADAM,
        OptKind::RowwiseAdagrad => ADAGRAD,
    };
    // Absent states bind these (three distinct buffers: wgpu rejects one buffer bound twice as
    // read_write in a dispatch). Allocation only: no host data.
    let dummies: Vec<WgpuStorage> = (0..3).map(|_| d.alloc_zeros(16)).collect::<Result<_>>()?;
    let mut launches = Vec::with_capacity(slots.len());
    for s in slots.iter() {
        let n = s.param.numel();
        fits_index(OP, "param", n)?;
        if n == 0 {
            continue;
        }
        if hyper.kind == OptKind::RowwiseAdagrad && s.param.dtype() != DType::F32 && s.dim % 2 == 1
        {
            return Err(Error::Unsupported {
                op: "rowwise_adagrad_step",
                backend: "wgpu",
                what: format!(
                    "a {} table with an odd row length {} (a 32-bit word would straddle two \
                     rows); use an even dim or f32",
                    s.param.dtype(),
                    s.dim
                ),
            });
        }
        let p_s = storage(OP, "param", d, s.param)?;
        let g_s = storage(OP, "grad", d, s.grad)?;
        let s1 = optional(d, s.s1.as_deref(), "state", &dummies[0])?;
        let s2 = optional(d, s.s2.as_deref(), "state", &dummies[1])?;
        let m = optional(d, s.master.as_deref(), "master", &dummies[2])?;
        let (count, grid) = match hyper.kind {
            OptKind::RowwiseAdagrad => (s.rows, [s.rows as u64, 1, 1]),
            _ => (n, pair_grid(n)),
        };
        let mut uniform: Vec<u32> = hyper.h.iter().map(|v| v.to_bits()).collect();
        uniform.extend([
            hyper.flags,
            to_u32(OP, "param", "elements", count)?,
            to_u32(OP, "param", "dim", s.dim)?,
        ]);
        launches.push(Launch {
            kernel,
            constants: vec![
                ("DT_P", dtype_code(s.param.dtype())),
                ("DT_G", dtype_code(s.grad.dtype())),
                ("HAS_MASTER", flag(s.master.is_some())),
            ],
            uniform,
            buffers: vec![&p_s.buffer, &g_s.buffer, s1, s2, m],
            grid,
            workgroup: [EW_THREADS, 1, 1],
            workgroup_bytes: u64::from(EW_THREADS) * 4,
        });
    }
    d.run(&launches)
}
