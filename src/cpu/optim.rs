//! CPU fused optimizer step (`ops::optim`): one parallel pass per tensor, the per-element f32
//! math of `OptHyper::elem` (shared with the kernels), row-wise Adagrad one row per task.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::optim::{OptHyper, OptKind, Slot, F_WEIGHT_DECAY};
use crate::tensor::{CpuStorage, Tensor};

const OP: &str = "optim_step(cpu)";

fn read(arg: &'static str, t: &Tensor) -> Result<Vec<f32>> {
    t.cpu()
        .map(|s| s.to_f32())
        .ok_or_else(|| Error::invalid(OP, arg, "not on the cpu"))
}

fn write(arg: &'static str, t: &mut Tensor, v: &[f32]) -> Result<()> {
    let dt = t.dtype();
    let s = t
        .cpu_mut()
        .ok_or_else(|| Error::invalid(OP, arg, "not on the cpu"))?;
    *s = CpuStorage::from_f32(dt, v);
    Ok(())
}

pub(crate) fn step(h: &OptHyper, slots: &mut [Slot<'_>]) -> Result<()> {
    for s in slots.iter_mut() {
        let g = read("grad", s.grad)?;
        // The master copy, when present, is the value updated.
        let mut p = match s.master.as_deref() {
            Some(m) => read("master", m)?,
            None => read("param", s.param)?,
        };
        let n = p.len();
        let mut s1 = match s.s1.as_deref() {
            Some(t) => read("state", t)?,
            None => vec![
                0.0;
                if h.kind == OptKind::RowwiseAdagrad {
                    0
                } else {
                    n
                }
            ],
        };
        let mut s2 = match s.s2.as_deref() {
            Some(t) => read("state", t)?,
            None => vec![0.0; n],
        };
        if h.kind == OptKind::RowwiseAdagrad {
            let (lr, eps, wd) = (h.h[0], h.h[1], h.h[2]);
            let l2 = h.flags & F_WEIGHT_DECAY != 0;
            let dim = s.dim;
            if dim > 0 {
                p.par_chunks_mut(dim)
                    .zip(g.par_chunks(dim))
                    .zip(s1.par_iter_mut())
                    .for_each(|((pr, gr), st)| {
                        let gi: Vec<f32> = (0..dim)
                            .map(|j| if l2 { gr[j] + wd * pr[j] } else { gr[j] })
                            .collect();
                        let sumsq: f32 = gi.iter().map(|v| v * v).sum();
                        *st += sumsq / dim as f32;
                        let mult = lr / (st.sqrt() + eps);
                        for (pj, gj) in pr.iter_mut().zip(&gi) {
                            *pj -= mult * gj;
                        }
                    });
            }
        } else {
            p.par_iter_mut()
                .zip(s1.par_iter_mut())
                .zip(s2.par_iter_mut())
                .enumerate()
                .with_min_len(4096)
                .for_each(|(i, ((pv, a), b))| {
                    let (np, na, nb) = h.elem(*pv, g[i], *a, *b);
                    *pv = np;
                    *a = na;
                    *b = nb;
                });
        }
        if let Some(m) = s.master.as_deref_mut() {
            write("master", m, &p)?;
        }
        write("param", s.param, &p)?;
        if let Some(t) = s.s1.as_deref_mut() {
            write("state", t, &s1)?;
        }
        if let Some(t) = s.s2.as_deref_mut() {
            write("state", t, &s2)?;
        }
    }
    Ok(())
}
