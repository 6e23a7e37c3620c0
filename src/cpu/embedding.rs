//! CPU embedding bags (`ops::embedding`): the same per-element arithmetic and summation order
//! as kernels/cuda/embedding.cu and kernels/wgsl/embedding.wgsl — bag sums in lookup order,
//! row gradients in occurrence order, row-wise Adagrad's sum of squares over 64 lanes reduced
//! with a fixed tree — threaded with rayon over samples (forward) or touched rows (updates).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::embedding::{EmbPlan, RowUpdate, TableLayout, LANES};
use crate::tensor::{CpuStorage, Tensor};

/// Element access to a table of any storage dtype, widened to f32 (the dtype branch is the
/// same for every element, so it predicts perfectly).
#[derive(Clone, Copy)]
enum TableRef<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl TableRef<'_> {
    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            TableRef::F32(v) => v[i],
            TableRef::BF16(v) => v[i].to_f32(),
            TableRef::F16(v) => v[i].to_f32(),
        }
    }
}

fn host<'a>(op: &'static str, arg: &'static str, t: &'a Tensor) -> Result<&'a CpuStorage> {
    t.cpu()
        .ok_or_else(|| Error::invalid(op, arg, "not on the cpu"))
}

fn with_table<R>(s: &CpuStorage, f: impl FnOnce(TableRef<'_>) -> R) -> R {
    match s {
        CpuStorage::F32(v) => f(TableRef::F32(v)),
        CpuStorage::BF16(v) => f(TableRef::BF16(v)),
        CpuStorage::F16(v) => f(TableRef::F16(v)),
    }
}

pub(crate) fn forward(p: &EmbPlan<'_>, weights: &Tensor, out: &mut Tensor) -> Result<()> {
    const OP: &str = "embedding_forward(cpu)";
    let bt = p.batch;
    let (b, td) = (bt.batch, p.total_dim);
    let mut acc = vec![0f32; b * td];
    with_table(host(OP, "weights", weights)?, |w| {
        acc.par_chunks_mut(td).enumerate().for_each(|(s, row)| {
            for (t, l) in p.layout.iter().enumerate() {
                let bag = t * b + s;
                let lo = bt.word(bt.at.bag_off, bag) as usize;
                let hi = bt.word(bt.at.bag_off, bag + 1) as usize;
                let o = &mut row[l.col_off..l.col_off + l.dim];
                for j in lo..hi {
                    let base = l.elem_off + bt.word(bt.at.idx, j) as usize * l.pitch;
                    let wj = bt.f32_at(bt.at.wgt, j);
                    for (c, oc) in o.iter_mut().enumerate() {
                        *oc += wj * w.get(base + c);
                    }
                }
            }
        })
    });
    let dtype = out.dtype();
    let o = out
        .cpu_mut()
        .ok_or_else(|| Error::invalid(OP, "out", "not on the cpu"))?;
    *o = CpuStorage::from_f32(dtype, &acc);
    Ok(())
}

/// The gradient of segment u's row, column by column, in occurrence order.
fn row_grad(p: &EmbPlan<'_>, dy: &[f32], u: usize) -> (TableLayout, usize, Vec<f32>) {
    let bt = p.batch;
    let l = p.layout[bt.word(bt.at.seg_table, u) as usize];
    let row = bt.word(bt.at.seg_row, u) as usize;
    let lo = bt.word(bt.at.seg_off, u) as usize;
    let hi = bt.word(bt.at.seg_off, u + 1) as usize;
    let mut g = vec![0f32; l.dim];
    for k in lo..hi {
        let s = bt.word(bt.at.occ_bag, k) as usize;
        let wk = bt.f32_at(bt.at.occ_wgt, k);
        let d = &dy[s * p.total_dim + l.col_off..][..l.dim];
        for (gc, dc) in g.iter_mut().zip(d) {
            *gc += wk * dc;
        }
    }
    (l, l.elem_off + row * l.pitch, g)
}

pub(crate) fn grad(p: &EmbPlan<'_>, dy: &Tensor, grad: &mut Tensor) -> Result<()> {
    const OP: &str = "embedding_grad(cpu)";
    let dyv = host(OP, "dy", dy)?.to_f32();
    let rows: Vec<(usize, Vec<f32>)> = (0..p.batch.segments)
        .into_par_iter()
        .map(|u| {
            let (_, base, g) = row_grad(p, &dyv, u);
            (base, g)
        })
        .collect();
    let Some(CpuStorage::F32(gv)) = grad.cpu_mut() else {
        return Err(Error::invalid(OP, "grad", "not an f32 cpu tensor"));
    };
    for (base, g) in rows {
        gv[base..base + g.len()].copy_from_slice(&g);
    }
    Ok(())
}

/// Σ g² over a row the way the kernels reduce it: lane m mod 64 sums its column pairs in
/// order, then a tree halves the lanes 32, 16, …, 1.
fn lane_sumsq(g: &[f32]) -> f32 {
    let mut part = [0f32; LANES];
    for (m, pair) in g.chunks(2).enumerate() {
        for v in pair {
            part[m % LANES] += v * v;
        }
    }
    let mut s = LANES / 2;
    while s > 0 {
        for l in 0..s {
            part[l] += part[l + s];
        }
        s /= 2;
    }
    part[0]
}

/// A touched row's new values: (element offset, values, (state index, new state)).
type NewRow = (usize, Vec<f32>, Option<(usize, f32)>);

pub(crate) fn update(
    p: &EmbPlan<'_>,
    upd: RowUpdate,
    dy: &Tensor,
    weights: &mut Tensor,
    state: Option<&mut Tensor>,
) -> Result<()> {
    const OP: &str = "embedding_update(cpu)";
    let dyv = host(OP, "dy", dy)?.to_f32();
    let st: Option<&Vec<f32>> = match &state {
        Some(t) => match t.cpu() {
            Some(CpuStorage::F32(v)) => Some(v),
            _ => return Err(Error::invalid(OP, "state", "not an f32 cpu tensor")),
        },
        None => None,
    };
    // New row values (and state) from the old ones, in parallel over the touched rows (which
    // are distinct), then written back in one pass.
    let rows: Vec<NewRow> = with_table(host(OP, "weights", weights)?, |w| {
        (0..p.batch.segments)
            .into_par_iter()
            .map(|u| {
                let (l, base, g) = row_grad(p, &dyv, u);
                let old: Vec<f32> = (0..l.dim).map(|c| w.get(base + c)).collect();
                match upd {
                    RowUpdate::Sgd { lr, weight_decay } => {
                        let new = old
                            .iter()
                            .zip(&g)
                            .map(|(&wc, &gc)| {
                                let gc = if weight_decay != 0.0 {
                                    gc + weight_decay * wc
                                } else {
                                    gc
                                };
                                wc - lr * gc
                            })
                            .collect();
                        (base, new, None)
                    }
                    RowUpdate::RowwiseAdagrad {
                        lr,
                        eps,
                        weight_decay,
                    } => {
                        let g: Vec<f32> = if weight_decay != 0.0 {
                            g.iter()
                                .zip(&old)
                                .map(|(&gc, &wc)| gc + weight_decay * wc)
                                .collect()
                        } else {
                            g
                        };
                        let row = l.rows_off + p.batch.word(p.batch.at.seg_row, u) as usize;
                        let s_old = st.map_or(0.0, |s| s[row]);
                        let s_new = s_old + lane_sumsq(&g) / l.dim as f32;
                        let mult = lr / (s_new.sqrt() + eps);
                        let new = old
                            .iter()
                            .zip(&g)
                            .map(|(&wc, &gc)| wc - mult * gc)
                            .collect();
                        (base, new, Some((row, s_new)))
                    }
                }
            })
            .collect()
    });
    let wv = weights
        .cpu_mut()
        .ok_or_else(|| Error::invalid(OP, "weights", "not on the cpu"))?;
    for (base, new, _) in &rows {
        match wv {
            CpuStorage::F32(v) => v[*base..*base + new.len()].copy_from_slice(new),
            CpuStorage::BF16(v) => {
                for (d, &x) in v[*base..].iter_mut().zip(new) {
                    *d = bf16::from_f32(x);
                }
            }
            CpuStorage::F16(v) => {
                for (d, &x) in v[*base..].iter_mut().zip(new) {
                    *d = f16::from_f32(x);
                }
            }
        }
    }
    if let Some(t) = state {
        let Some(CpuStorage::F32(sv)) = t.cpu_mut() else {
            return Err(Error::invalid(OP, "state", "not an f32 cpu tensor"));
        };
        for (_, _, s) in rows {
            if let Some((row, v)) = s {
                sv[row] = v;
            }
        }
    }
    Ok(())
}
