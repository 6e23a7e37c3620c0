//! The fused in-batch softmax on the CPU: logits are produced a tile at a time (a
//! `ROWS × COLS` block from the blocked GEMM), consumed by an online log-sum-exp, and dropped;
//! the B×N matrix never exists. Backward recomputes the tiles in two deterministic passes:
//! one over row blocks (query gradients, κ), one over column tiles (candidate gradients), each
//! output owned by exactly one task and summed in a fixed order.

use rayon::prelude::*;

use crate::cpu::fast::matmul_f32;

/// Rows per task and columns per tile: a 32×256 f32 tile is 32 KiB, an L1/L2-resident block.
const ROWS: usize = 32;
const COLS: usize = 256;

/// Everything a kernel needs, already normalised (when L2 is on) and widened to f32.
pub(crate) struct Problem<'a> {
    pub b: usize,
    pub n: usize,
    pub d: usize,
    /// `[B, d]` queries û.
    pub q: &'a [f32],
    /// `[N, d]` candidates v̂.
    pub c: &'a [f32],
    pub kappa: f32,
    pub log_q: Option<&'a [f32]>,
    pub ids: Option<&'a [i64]>,
    pub valid: Option<&'a [bool]>,
    pub row_qid: Option<&'a [i64]>,
    pub col_qid: Option<&'a [i64]>,
    /// Target column per row; `u32::MAX` marks an inactive row.
    pub target: &'a [u32],
}

impl Problem<'_> {
    /// Is column j in row i's softmax domain D_i (valid, and not an accidental hit)?
    #[inline]
    fn in_domain(&self, i: usize, j: usize) -> bool {
        let t = self.target[i] as usize;
        if let Some(v) = self.valid {
            if !v[j] {
                return false;
            }
        }
        if j == t {
            return true;
        }
        if let Some(ids) = self.ids {
            if ids[j] == ids[t] {
                return false;
            }
        }
        if let (Some(rq), Some(cq)) = (self.row_qid, self.col_qid) {
            if cq[j] >= 0 && cq[j] == rq[i] {
                return false;
            }
        }
        true
    }

    #[inline]
    fn logit(&self, dot: f32, j: usize) -> f32 {
        self.kappa * dot - self.log_q.map_or(0.0, |lq| lq[j])
    }

    /// Raw dot products ⟨û_i, v̂_j⟩ for rows r0..r0+rb and columns c0..c0+cb into `tile`.
    fn dots(&self, r0: usize, rb: usize, c0: usize, cb: usize, tile: &mut [f32]) {
        let d = self.d;
        matmul_f32(
            (rb, cb, d),
            tile,
            cb,
            false,
            (&self.q[r0 * d..], d, 1),
            (&self.c[c0 * d..], 1, d),
            false,
        );
    }
}

/// Per-row statistics: LSE over D_i and the target logit (f32, O(B)).
pub(crate) fn forward_stats(p: &Problem<'_>) -> (Vec<f32>, Vec<f32>) {
    let mut lse = vec![f32::NEG_INFINITY; p.b];
    let mut s_t = vec![0f32; p.b];
    lse.par_chunks_mut(ROWS)
        .zip(s_t.par_chunks_mut(ROWS))
        .enumerate()
        .for_each(|(blk, (lse, s_t))| {
            let r0 = blk * ROWS;
            let rb = lse.len();
            let mut tile = vec![0f32; ROWS * COLS];
            // Online log-sum-exp in base 2: running max m and sum s of 2^(x − m), x = s·log2 e.
            let mut m = vec![f32::NEG_INFINITY; rb];
            let mut sum = vec![0f32; rb];
            for c0 in (0..p.n).step_by(COLS) {
                let cb = COLS.min(p.n - c0);
                p.dots(r0, rb, c0, cb, &mut tile);
                for r in 0..rb {
                    let i = r0 + r;
                    if p.target[i] == u32::MAX {
                        continue;
                    }
                    let row = &tile[r * cb..r * cb + cb];
                    for (jj, &dot) in row.iter().enumerate() {
                        let j = c0 + jj;
                        if !p.in_domain(i, j) {
                            continue;
                        }
                        let s = p.logit(dot, j);
                        if j == p.target[i] as usize {
                            s_t[r] = s;
                        }
                        let x = s * std::f32::consts::LOG2_E;
                        if x > m[r] {
                            sum[r] = sum[r] * (m[r] - x).exp2() + 1.0;
                            m[r] = x;
                        } else {
                            sum[r] += (x - m[r]).exp2();
                        }
                    }
                }
            }
            for r in 0..rb {
                if sum[r] > 0.0 {
                    lse[r] = (m[r] + sum[r].log2()) * std::f32::consts::LN_2;
                }
            }
        });
    (lse, s_t)
}

/// G_ij = a_i·(P_ij − δ_j,t(i)) for one tile, in place over the dot products (returns the
/// tile's contribution to ∂L/∂κ per row when asked).
#[inline]
#[allow(clippy::too_many_arguments)]
fn grad_tile(
    p: &Problem<'_>,
    a: &[f32],
    lse: &[f32],
    r0: usize,
    rb: usize,
    c0: usize,
    cb: usize,
    tile: &mut [f32],
    dk: Option<&mut [f32]>,
) {
    let mut dk = dk;
    for r in 0..rb {
        let i = r0 + r;
        let row = &mut tile[r * cb..r * cb + cb];
        if a[i] == 0.0 || p.target[i] == u32::MAX {
            // G = 0 here, but dκ's dense Σ G·dot still meets a NaN dot (as every backend's).
            if let Some(dk) = dk.as_deref_mut() {
                if row.iter().any(|v| v.is_nan()) {
                    dk[r] = f32::NAN;
                }
            }
            row.iter_mut().for_each(|v| *v = 0.0);
            continue;
        }
        let mut acc = 0f32;
        for (jj, v) in row.iter_mut().enumerate() {
            let j = c0 + jj;
            let dot = *v;
            let pij = if p.in_domain(i, j) {
                (p.logit(dot, j) - lse[i]).exp()
            } else {
                0.0
            };
            let g = a[i] * (pij - if j == p.target[i] as usize { 1.0 } else { 0.0 });
            acc += g * dot;
            *v = g;
        }
        if let Some(dk) = dk.as_deref_mut() {
            dk[r] += acc;
        }
    }
}

/// Query gradients ∂L/∂û (before the L2 backward) and ∂L/∂κ per row.
pub(crate) fn grad_queries(p: &Problem<'_>, a: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = p.d;
    let mut dq = vec![0f32; p.b * d];
    let mut dk = vec![0f32; p.b];
    dq.par_chunks_mut(ROWS * d)
        .zip(dk.par_chunks_mut(ROWS))
        .enumerate()
        .for_each(|(blk, (dq, dk))| {
            let r0 = blk * ROWS;
            let rb = dk.len();
            let mut tile = vec![0f32; ROWS * COLS];
            for c0 in (0..p.n).step_by(COLS) {
                let cb = COLS.min(p.n - c0);
                p.dots(r0, rb, c0, cb, &mut tile);
                grad_tile(p, a, lse, r0, rb, c0, cb, &mut tile, Some(dk));
                // dQ̂_blk += G·V̂_tile (κ applied once at the end).
                matmul_f32(
                    (rb, d, cb),
                    dq,
                    d,
                    true,
                    (&tile, cb, 1),
                    (&p.c[c0 * d..], d, 1),
                    false,
                );
            }
            dq.iter_mut().for_each(|v| *v *= p.kappa);
        });
    (dq, dk)
}

/// Candidate gradients ∂L/∂v̂_j (before the L2 backward) for columns `cols`, from every row.
pub(crate) fn grad_columns(
    p: &Problem<'_>,
    a: &[f32],
    lse: &[f32],
    cols: std::ops::Range<usize>,
) -> Vec<f32> {
    let d = p.d;
    let mut dc = vec![0f32; cols.len() * d];
    dc.par_chunks_mut(COLS * d).enumerate().for_each(|(t, dc)| {
        let c0 = cols.start + t * COLS;
        let cb = dc.len() / d;
        let mut tile = vec![0f32; ROWS * COLS];
        // Rows in a fixed order: the same bits every run.
        for r0 in (0..p.b).step_by(ROWS) {
            let rb = ROWS.min(p.b - r0);
            p.dots(r0, rb, c0, cb, &mut tile);
            grad_tile(p, a, lse, r0, rb, c0, cb, &mut tile, None);
            // dV̂_tile += Gᵀ·Û_blk.
            matmul_f32(
                (cb, d, rb),
                dc,
                d,
                true,
                (&tile, 1, cb),
                (&p.q[r0 * d..], d, 1),
                false,
            );
        }
        dc.iter_mut().for_each(|v| *v *= p.kappa);
    });
    dc
}

/// Normalises rows of width d in place; returns the (clamped) norms.
fn normalise(v: &mut [f32], d: usize, eps: f32) -> Vec<f32> {
    v.chunks_mut(d.max(1))
        .map(|r| {
            let s = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            // f32::max would drop a NaN norm (and with it the NaN of this row's gradient).
            let n = if s.is_nan() { s } else { s.max(eps) };
            r.iter_mut().for_each(|x| *x /= n);
            n
        })
        .collect()
}

/// ∂L/∂u from ∂L/∂û: `(g − û⟨û, g⟩)/‖u‖`, or `g/ε` where the norm was clamped.
fn l2_backward(g: &mut [f32], unit: &[f32], norms: &[f32], d: usize, eps: f32) {
    for ((gr, ur), &n) in g.chunks_mut(d.max(1)).zip(unit.chunks(d.max(1))).zip(norms) {
        if n <= eps {
            gr.iter_mut().for_each(|x| *x /= eps);
            continue;
        }
        let proj: f32 = gr.iter().zip(ur).map(|(a, b)| a * b).sum();
        gr.iter_mut()
            .zip(ur)
            .for_each(|(x, u)| *x = (*x - u * proj) / n);
    }
}

/// The seam entry points: widen (and normalise) once on the host, run the tiled kernels.
mod seam {
    use super::*;
    use crate::error::Result;
    use crate::ops::inbatch_softmax::SoftmaxArgs;
    use crate::tensor::Tensor;

    struct Host {
        q: Vec<f32>,
        c: Vec<f32>,
        q_norm: Vec<f32>,
        c_norm: Vec<f32>,
    }

    fn host(a: &SoftmaxArgs<'_>) -> Result<Host> {
        let (mut q, mut c) = (a.q.to_f32_vec()?, a.c.to_f32_vec()?);
        let (q_norm, c_norm) = if a.l2 {
            (normalise(&mut q, a.d, a.eps), normalise(&mut c, a.d, a.eps))
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Host {
            q,
            c,
            q_norm,
            c_norm,
        })
    }

    fn problem<'a>(a: &SoftmaxArgs<'a>, h: &'a Host) -> Problem<'a> {
        Problem {
            b: a.b,
            n: a.n,
            d: a.d,
            q: &h.q,
            c: &h.c,
            kappa: a.kappa,
            log_q: a.log_q,
            ids: a.ids,
            valid: a.valid,
            row_qid: a.row_qid,
            col_qid: a.col_qid,
            target: a.target,
        }
    }

    pub(crate) fn forward(a: &SoftmaxArgs<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
        let h = host(a)?;
        Ok(forward_stats(&problem(a, &h)))
    }

    pub(crate) fn grad_queries(
        a: &SoftmaxArgs<'_>,
        coef: &[f32],
        lse: &[f32],
        dq: &mut Tensor,
    ) -> Result<f32> {
        let h = host(a)?;
        let (mut g, dk) = super::grad_queries(&problem(a, &h), coef, lse);
        if a.l2 {
            l2_backward(&mut g, &h.q, &h.q_norm, a.d, a.eps);
        }
        *dq = Tensor::from_f32(&g, dq.shape(), dq.dtype(), &dq.device())?;
        // Rows in order: a fixed summation order for ∂L/∂κ.
        Ok(dk.iter().map(|&v| v as f64).sum::<f64>() as f32)
    }

    pub(crate) fn grad_columns(
        a: &SoftmaxArgs<'_>,
        coef: &[f32],
        lse: &[f32],
        range: std::ops::Range<usize>,
        dc: &mut Tensor,
    ) -> Result<()> {
        let h = host(a)?;
        let mut g = super::grad_columns(&problem(a, &h), coef, lse, range.clone());
        if a.l2 {
            l2_backward(
                &mut g,
                &h.c[range.start * a.d..range.end * a.d],
                &h.c_norm[range],
                a.d,
                a.eps,
            );
        }
        *dc = Tensor::from_f32(&g, dc.shape(), dc.dtype(), &dc.device())?;
        Ok(())
    }
}

pub(crate) use seam::{
    forward as forward_t, grad_columns as grad_columns_t, grad_queries as grad_queries_t,
};
