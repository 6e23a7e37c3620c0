//! Attention over short sequences of feature tokens on the CPU: one sample's H·Lq·L scores are
//! computed, used and dropped inside one task (parallel over samples); nothing B·H·L² is
//! stored. Backward is the FlashAttention-2 form with P recomputed from the saved LSE.

use rayon::prelude::*;

/// Shapes and options of one call (f32 data, already widened).
pub(crate) struct Attn<'a> {
    pub b: usize,
    pub lq: usize,
    pub l: usize,
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
    pub scale: f32,
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// `[h, lq, l]`.
    pub bias: Option<&'a [f32]>,
    /// `[b, l]`, true = valid key.
    pub mask: Option<&'a [bool]>,
}

impl Attn<'_> {
    /// Scores of query i, head h, sample b against every key (None = masked).
    fn scores(&self, bb: usize, hh: usize, i: usize, out: &mut [f32]) {
        let (lq, l, h, dk) = (self.lq, self.l, self.h, self.dk);
        let qrow = &self.q[((bb * lq + i) * h + hh) * dk..][..dk];
        for (j, o) in out.iter_mut().enumerate() {
            if self.mask.is_some_and(|m| !m[bb * l + j]) {
                *o = f32::NEG_INFINITY;
                continue;
            }
            let krow = &self.k[((bb * l + j) * h + hh) * dk..][..dk];
            let dot: f32 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
            *o = self.scale * dot + self.bias.map_or(0.0, |bi| bi[(hh * lq + i) * l + j]);
        }
    }
}

/// Forward: O `[b, lq, h, dv]` and LSE `[b, h, lq]`.
pub(crate) fn forward(a: &Attn<'_>) -> (Vec<f32>, Vec<f32>) {
    let (lq, l, h, dv) = (a.lq, a.l, a.h, a.dv);
    let mut o = vec![0f32; a.b * lq * h * dv];
    let mut lse = vec![f32::NEG_INFINITY; a.b * h * lq];
    o.par_chunks_mut((lq * h * dv).max(1))
        .zip(lse.par_chunks_mut((h * lq).max(1)))
        .enumerate()
        .for_each(|(bb, (o, lse))| {
            let mut s = vec![0f32; l];
            for hh in 0..h {
                for i in 0..lq {
                    a.scores(bb, hh, i, &mut s);
                    // f32::max drops a NaN, which would read a NaN row as fully masked.
                    let m = s.iter().fold(f32::NEG_INFINITY, |x, &y| {
                        if x.is_nan() || y.is_nan() {
                            f32::NAN
                        } else {
                            x.max(y)
                        }
                    });
                    if m == f32::NEG_INFINITY {
                        continue; // every key masked: O = 0, LSE = −∞
                    }
                    let z: f32 = s.iter().map(|&x| (x - m).exp()).sum();
                    lse[hh * lq + i] = m + z.ln();
                    let orow = &mut o[(i * h + hh) * dv..][..dv];
                    for (j, &sj) in s.iter().enumerate() {
                        let p = (sj - m).exp() / z;
                        if p == 0.0 {
                            continue;
                        }
                        let vrow = &a.v[((bb * l + j) * h + hh) * dv..][..dv];
                        orow.iter_mut().zip(vrow).for_each(|(x, y)| *x += p * y);
                    }
                }
            }
        });
    (o, lse)
}

/// Backward: `(dq, dk, dv)` and, when there is a bias, `dbias [h, lq, l]` (summed over the
/// batch in a fixed order).
pub(crate) fn backward(
    a: &Attn<'_>,
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let (lq, l, h, dk, dv) = (a.lq, a.l, a.h, a.dk, a.dv);
    let mut dq = vec![0f32; a.b * lq * h * dk];
    let mut dkk = vec![0f32; a.b * l * h * dk];
    let mut dvv = vec![0f32; a.b * l * h * dv];
    // dS_ij = P_ij·(dP_ij − D_i), D_i = ⟨dO_i, O_i⟩, P_ij = exp(S_ij − LSE_i).
    let ds_row = |bb: usize, hh: usize, i: usize, s: &mut [f32], dp: &mut [f32]| -> bool {
        let lse_i = lse[(bb * h + hh) * lq + i];
        if lse_i == f32::NEG_INFINITY {
            return false;
        }
        a.scores(bb, hh, i, s);
        let go = &d_o[((bb * lq + i) * h + hh) * dv..][..dv];
        let oi = &o[((bb * lq + i) * h + hh) * dv..][..dv];
        let di: f32 = go.iter().zip(oi).map(|(x, y)| x * y).sum();
        for j in 0..l {
            // A masked key is never read (P = 0 exactly, even when LSE is NaN).
            if a.mask.is_some_and(|m| !m[bb * l + j]) {
                s[j] = 0.0;
                dp[j] = 0.0;
                continue;
            }
            let p = (s[j] - lse_i).exp();
            let vrow = &a.v[((bb * l + j) * h + hh) * dv..][..dv];
            let dpj: f32 = go.iter().zip(vrow).map(|(x, y)| x * y).sum();
            s[j] = p; // reuse: P
            dp[j] = p * (dpj - di); // dS
        }
        true
    };
    dq.par_chunks_mut((lq * h * dk).max(1))
        .zip(dkk.par_chunks_mut((l * h * dk).max(1)))
        .zip(dvv.par_chunks_mut((l * h * dv).max(1)))
        .enumerate()
        .for_each(|(bb, ((dq, dkb), dvb))| {
            let (mut s, mut ds) = (vec![0f32; l], vec![0f32; l]);
            for hh in 0..h {
                for i in 0..lq {
                    if !ds_row(bb, hh, i, &mut s, &mut ds) {
                        continue;
                    }
                    let go = &d_o[((bb * lq + i) * h + hh) * dv..][..dv];
                    let qrow = &a.q[((bb * lq + i) * h + hh) * dk..][..dk];
                    for j in 0..l {
                        if s[j] == 0.0 && ds[j] == 0.0 {
                            continue;
                        }
                        let dvrow = &mut dvb[(j * h + hh) * dv..][..dv];
                        dvrow.iter_mut().zip(go).for_each(|(x, g)| *x += s[j] * g);
                        let krow = &a.k[((bb * l + j) * h + hh) * dk..][..dk];
                        let dqrow = &mut dq[(i * h + hh) * dk..][..dk];
                        dqrow
                            .iter_mut()
                            .zip(krow)
                            .for_each(|(x, kk)| *x += a.scale * ds[j] * kk);
                        let dkrow = &mut dkb[(j * h + hh) * dk..][..dk];
                        dkrow
                            .iter_mut()
                            .zip(qrow)
                            .for_each(|(x, qq)| *x += a.scale * ds[j] * qq);
                    }
                }
            }
        });
    let dbias = a.bias.map(|_| {
        let mut db = vec![0f32; h * lq * l];
        db.par_chunks_mut((lq * l).max(1))
            .enumerate()
            .for_each(|(hh, db)| {
                let (mut s, mut ds) = (vec![0f32; l], vec![0f32; l]);
                for bb in 0..a.b {
                    for i in 0..lq {
                        if ds_row(bb, hh, i, &mut s, &mut ds) {
                            db[i * l..][..l]
                                .iter_mut()
                                .zip(&ds)
                                .for_each(|(x, d)| *x += d);
                        }
                    }
                }
            });
        db
    });
    (dq, dkk, dvv, dbias)
}

/// The seam entry points: widen the tensors once, run the f32 kernels, store in each output's
/// dtype.
mod seam {
    use super::Attn;
    use crate::error::Result;
    use crate::ops::attention::AttnArgs;
    use crate::tensor::Tensor;

    fn store(out: &mut Tensor, v: &[f32]) -> Result<()> {
        *out = Tensor::from_f32(v, out.shape(), out.dtype(), &out.device())?;
        Ok(())
    }

    struct Host {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        bias: Option<Vec<f32>>,
        mask: Option<Vec<bool>>,
    }

    fn host(a: &AttnArgs<'_>) -> Result<Host> {
        Ok(Host {
            q: a.q.to_f32_vec()?,
            k: a.k.to_f32_vec()?,
            v: a.v.to_f32_vec()?,
            bias: a.bias.map(|t| t.to_f32_vec()).transpose()?,
            mask: a
                .mask
                .map(|t| {
                    t.to_f32_vec()
                        .map(|m| m.iter().map(|&x| x != 0.0).collect())
                })
                .transpose()?,
        })
    }

    fn attn<'a>(a: &AttnArgs<'_>, h: &'a Host) -> Attn<'a> {
        Attn {
            b: a.b,
            lq: a.lq,
            l: a.l,
            h: a.h,
            dk: a.dk,
            dv: a.dv,
            scale: a.scale,
            q: &h.q,
            k: &h.k,
            v: &h.v,
            bias: h.bias.as_deref(),
            mask: h.mask.as_deref(),
        }
    }

    /// A zero head width is legal (scores are then the bias alone, or O is empty); the row
    /// loops chunk by head width, so run it as width 1 with zero padding, which is the same
    /// math, and drop the padding.
    fn pad(v: Vec<f32>, rows: usize, w: usize) -> Vec<f32> {
        if w == 0 {
            vec![0.0; rows]
        } else {
            v
        }
    }

    fn padded(a: &AttnArgs<'_>, h: Host) -> (Host, usize, usize) {
        let (nq, nk) = (a.b * a.lq * a.h, a.b * a.l * a.h);
        let h = Host {
            q: pad(h.q, nq, a.dk),
            k: pad(h.k, nk, a.dk),
            v: pad(h.v, nk, a.dv),
            ..h
        };
        (h, a.dk.max(1), a.dv.max(1))
    }

    pub(crate) fn forward(a: &AttnArgs<'_>, o: &mut Tensor, lse: &mut Tensor) -> Result<()> {
        let (h, dk, dv) = padded(a, host(a)?);
        let (ov, lv) = super::forward(&Attn {
            dk,
            dv,
            ..attn(a, &h)
        });
        store(o, if a.dv == 0 { &[] } else { &ov })?;
        store(lse, &lv)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        a: &AttnArgs<'_>,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
        dq: &mut Tensor,
        dk: &mut Tensor,
        dv: &mut Tensor,
        dbias: Option<&mut Tensor>,
    ) -> Result<()> {
        let (h, wk, wv) = padded(a, host(a)?);
        let rows_o = a.b * a.lq * a.h;
        let (ov, dov) = (
            pad(o.to_f32_vec()?, rows_o, a.dv),
            pad(d_o.to_f32_vec()?, rows_o, a.dv),
        );
        let (gq, gk, gv, gb) = super::backward(
            &Attn {
                dk: wk,
                dv: wv,
                ..attn(a, &h)
            },
            &ov,
            &lse.to_f32_vec()?,
            &dov,
        );
        let empty: &[f32] = &[];
        store(dq, if a.dk == 0 { empty } else { &gq })?;
        store(dk, if a.dk == 0 { empty } else { &gk })?;
        store(dv, if a.dv == 0 { empty } else { &gv })?;
        if let (Some(t), Some(v)) = (dbias, gb) {
            store(t, &v)?;
        }
        Ok(())
    }
}

pub(crate) use seam::{backward as backward_t, forward as forward_t};
