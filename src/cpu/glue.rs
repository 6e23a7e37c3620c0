//! CPU glue kernels (`ops::glue`): the strided box copy and the fixed-order middle-axis sum.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::glue::{Copy3, SumMid};
use crate::tensor::{CpuStorage, Tensor};

fn copy_rows<T: Copy + Send + Sync>(p: &Copy3, src: &[T], dst: &mut [T]) {
    // Rows are disjoint and in increasing address order (Copy3::check), so a sequential walk
    // is exact; the work is memory-bound and small next to the kernels it glues.
    for r in 0..p.rows() {
        let s = Copy3::row_start(&p.src, p.mid, r);
        let d = Copy3::row_start(&p.dst, p.mid, r);
        dst[d..d + p.inner].copy_from_slice(&src[s..s + p.inner]);
    }
}

pub(crate) fn copy3(p: &Copy3, src: &Tensor, dst: &mut Tensor) -> Result<()> {
    const OP: &str = "copy3(cpu)";
    let s = src
        .cpu()
        .ok_or_else(|| Error::invalid(OP, "src", "not on the cpu"))?;
    let d = dst
        .cpu_mut()
        .ok_or_else(|| Error::invalid(OP, "dst", "not on the cpu"))?;
    match (s, d) {
        (CpuStorage::F32(s), CpuStorage::F32(d)) => copy_rows(p, s, d),
        (CpuStorage::BF16(s), CpuStorage::BF16(d)) => copy_rows(p, s, d),
        (CpuStorage::F16(s), CpuStorage::F16(d)) => copy_rows(p, s, d),
        _ => return Err(Error::invalid(OP, "src", "dtype differs from dst")),
    }
    Ok(())
}

pub(crate) fn sum_mid(p: &SumMid, x: &Tensor, out: &mut Tensor) -> Result<()> {
    const OP: &str = "sum_mid(cpu)";
    let xv = x
        .cpu()
        .ok_or_else(|| Error::invalid(OP, "x", "not on the cpu"))?
        .to_f32();
    let dtype = out.dtype();
    let mut acc = vec![0f32; p.outer * p.inner];
    // One task per output element, each summing a = 0, 1, … in order: the same order as the
    // GPU kernels, so every backend rounds the same partial sums.
    acc.par_iter_mut()
        .with_min_len(256)
        .enumerate()
        .for_each(|(k, o)| {
            let (oi, c) = (k / p.inner, k % p.inner);
            let base = oi * p.mid * p.inner + c;
            let mut s = 0f32;
            for a in 0..p.mid {
                s += xv[base + a * p.inner];
            }
            *o = s;
        });
    let o = out
        .cpu_mut()
        .ok_or_else(|| Error::invalid(OP, "out", "not on the cpu"))?;
    *o = CpuStorage::from_f32(dtype, &acc);
    Ok(())
}
