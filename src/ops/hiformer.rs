//! Composed feature-token layers: [`HeteroAttentionLayer`] (per-token Q/K/V projections) and
//! [`HiformerLayer`] (Q/K/V from one low-rank projection of all features concatenated), both
//! followed by the same per-token output projection, residual + LayerNorm, per-token GELU FFN,
//! residual + LayerNorm:
//! ```text
//! o   = attention(Q, K, V)                          (ops::attention)
//! y_i = LN(x_i + o_i·Wo_iᵀ + bo_i)                   (ops::layernorm, fused residual)
//! z_i = LN(y_i + GELU(y_i·W1_iᵀ + b1_i)·W2_iᵀ + b2_i)
//! ```
//! Weights are `[G, out, in]` (G weight sets; token i uses set `group_map[i]`, or i). With
//! `task_tokens = Some(t)` (the pruned last layer) queries, and everything after attention, are
//! computed only for the last t tokens; keys and values still come from all L tokens.
//!
//! Every per-token projection runs on the GEMM core as one batched GEMM over tokens (or one
//! GEMM per token when a group map makes the weight stride irregular), bias gradients as a GEMM
//! against a ones vector, so all batch reductions are deterministic.
//!
//! ```
//! use recfuse::ops::hiformer::{HeteroAttentionLayer, LayerConfig, LayerParams};
//! use recfuse::{DType, Device, Tensor};
//! let dev = Device::cpu();
//! let cfg = LayerConfig::new(5, 8, 2, 4, 6, 16); // L=5 tokens of width 8, 2 heads, d_k=4, d_v=6, d_f=16
//! let layer = HeteroAttentionLayer { cfg: cfg.clone() };
//! let params = layer.init(1, &dev)?;
//! let x = Tensor::full(&[3, 5, 8], 0.5, DType::F32, &dev)?;
//! let (z, saved) = layer.forward(&x, &params, None)?;
//! let (dx, grads) = layer.backward(&params, &saved, &Tensor::full(&[3, 5, 8], 1.0, DType::F32, &dev)?)?;
//! assert_eq!((z.shape(), dx.shape()), (&[3, 5, 8][..], &[3, 5, 8][..]));
//! assert_eq!(grads.w1.shape(), &[5, 16, 8]);
//! # Ok::<(), recfuse::Error>(())
//! ```

use rand::{Rng, SeedableRng};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::attention::{Attention, AttentionForward};
use crate::ops::backend::{self, same_device};
use crate::ops::gemm::{Activation, Gemm, MatView};
use crate::ops::layernorm::{LayerNorm, LayerNormForward};
use crate::ops::lowrank_qkv::{LowRankQkv, QkvOut, QkvWeights};
use crate::tensor::Tensor;

const OP: &str = "hiformer";

/// Shapes and options shared by both layers.
#[derive(Clone, Debug)]
pub struct LayerConfig {
    /// L, feature (and task) tokens.
    pub tokens: usize,
    /// d, token width.
    pub width: usize,
    pub heads: usize,
    pub dk: usize,
    pub dv: usize,
    /// FFN hidden width d_f.
    pub dff: usize,
    /// Pruned last layer: only the last t tokens are queries.
    pub task_tokens: Option<usize>,
    /// Token → weight-set map (several tokens share one set); `None` = one set per token.
    pub group_map: Option<Vec<usize>>,
    /// LayerNorm affine per token (`[L, d]`) instead of shared (`[d]`).
    pub per_token_ln: bool,
    pub eps: f32,
    pub dtype: DType,
    /// Attention scale; `None` = 1/√d_k.
    pub scale: Option<f32>,
}

impl LayerConfig {
    /// f32, no pruning, no group map, shared LayerNorm affine.
    pub fn new(
        tokens: usize,
        width: usize,
        heads: usize,
        dk: usize,
        dv: usize,
        dff: usize,
    ) -> LayerConfig {
        LayerConfig {
            tokens,
            width,
            heads,
            dk,
            dv,
            dff,
            task_tokens: None,
            group_map: None,
            per_token_ln: false,
            eps: 1e-5,
            dtype: DType::F32,
            scale: None,
        }
    }

    fn lq(&self) -> usize {
        self.task_tokens.unwrap_or(self.tokens)
    }

    /// Number of weight sets G.
    pub fn groups(&self) -> usize {
        match &self.group_map {
            Some(m) => m.iter().copied().max().map_or(0, |g| g + 1),
            None => self.tokens,
        }
    }

    fn validate(&self) -> Result<()> {
        let nonzero = [
            ("tokens", self.tokens),
            ("width", self.width),
            ("heads", self.heads),
            ("dk", self.dk),
            ("dv", self.dv),
            ("dff", self.dff),
        ];
        for (arg, v) in nonzero {
            if v == 0 {
                return Err(Error::invalid(OP, arg, "must be ≥ 1"));
            }
        }
        if let Some(t) = self.task_tokens {
            if t == 0 || t > self.tokens {
                return Err(Error::invalid(
                    OP,
                    "task_tokens",
                    format!("{t} is not in 1..={}", self.tokens),
                ));
            }
        }
        if let Some(m) = &self.group_map {
            if m.len() != self.tokens {
                return Err(Error::invalid(
                    OP,
                    "group_map",
                    format!("{} entries for {} tokens", m.len(), self.tokens),
                ));
            }
        }
        Ok(())
    }

    fn group(&self, token: usize) -> usize {
        self.group_map.as_ref().map_or(token, |m| m[token])
    }
}

/// Q/K/V projection weights.
#[derive(Debug)]
pub enum QkvParams {
    /// Heterogeneous: `wq, wk: [G, H·d_k, d]`, `wv: [G, H·d_v, d]`.
    PerToken { wq: Tensor, wk: Tensor, wv: Tensor },
    /// Hiformer: the low-rank composite projection.
    LowRank(QkvWeights),
}

/// All of one layer's parameters (gradients use the same type).
#[derive(Debug)]
pub struct LayerParams {
    pub qkv: QkvParams,
    /// `[G, d, H·d_v]`, `[G, d]`.
    pub wo: Tensor,
    pub bo: Tensor,
    /// `[G, d_f, d]`, `[G, d_f]`.
    pub w1: Tensor,
    pub b1: Tensor,
    /// `[G, d, d_f]`, `[G, d]`.
    pub w2: Tensor,
    pub b2: Tensor,
    /// `[d]` or `[L_q, d]`.
    pub ln1_g: Tensor,
    pub ln1_b: Tensor,
    pub ln2_g: Tensor,
    pub ln2_b: Tensor,
}

/// What forward keeps.
#[derive(Debug)]
pub struct LayerSaved {
    x: Tensor,
    qkv: Option<QkvOut>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    att: AttentionForward,
    ln1: LayerNormForward,
    h_pre: Tensor,
    h: Tensor,
    ln2: LayerNormForward,
    mask: Option<Tensor>,
}

/// One per-token projection: `y[b, t] = act(x[b, xt0 + t]·W[g(wt0 + t)]ᵀ + bias)` for
/// t < count, with x holding `x_tokens` tokens per sample.
struct TokLin<'a> {
    x: &'a Tensor,
    x_tokens: usize,
    xt0: usize,
    wt0: usize,
    count: usize,
    inp: usize,
    out: usize,
    w: &'a Tensor,
    b: Option<&'a Tensor>,
}

impl LayerConfig {
    /// Runs of tokens whose weight sets are consecutive, as (first token, count, first set):
    /// one run without a map; one token per run with one.
    fn runs(&self, wt0: usize, count: usize) -> Vec<(usize, usize, usize)> {
        match &self.group_map {
            None => vec![(0, count, wt0)],
            Some(_) => (0..count).map(|t| (t, 1, self.group(wt0 + t))).collect(),
        }
    }

    /// y (and pre) `[B, count, out]` = act(x·Wᵀ + b) per token.
    fn tok_forward(
        &self,
        dev: &Device,
        p: &TokLin<'_>,
        act: Activation,
        y: &mut Tensor,
        mut pre: Option<&mut Tensor>,
    ) -> Result<()> {
        let rows = p.x.shape()[0];
        for (t, n, g) in self.runs(p.wt0, p.count) {
            let c_view = MatView::new(t * p.out, p.count * p.out, 1, p.out);
            let gm = Gemm {
                batch: n,
                bias: p.b.map(|b| (b, p.out)),
                bias_offset: g * p.out,
                act,
                c_view,
                pre_view: c_view,
                ..Gemm::plain(
                    rows,
                    p.out,
                    p.inp,
                    p.x,
                    MatView::new((p.xt0 + t) * p.inp, p.x_tokens * p.inp, 1, p.inp),
                    p.w,
                    MatView::new(g * p.out * p.inp, 1, p.inp, p.out * p.inp),
                )
            };
            gm.check(OP, y, pre.as_deref())?;
            backend::gemm(dev, &gm, y, pre.as_deref_mut())?;
        }
        Ok(())
    }

    /// Backward of `tok_forward` (without activation) from dz `[B, count, out]`: dW (and db)
    /// accumulate into the weight sets (first touch overwrites unless `accumulate`), and dx
    /// `[B, x_tokens, inp]` (f32) gains dz·W at the right tokens.
    #[allow(clippy::too_many_arguments)]
    fn tok_backward(
        &self,
        dev: &Device,
        p: &TokLin<'_>,
        dz: &Tensor,
        ones: &Tensor,
        dw: &mut Tensor,
        db: Option<&mut Tensor>,
        dx: Option<&mut Tensor>,
        accumulate: bool,
    ) -> Result<()> {
        let rows = p.x.shape()[0];
        let mut touched = vec![accumulate; dw.shape()[0]];
        let mut db = db;
        let mut dx = dx;
        for (t, n, g) in self.runs(p.wt0, p.count) {
            let acc = touched[g];
            let dz_view = MatView::new(t * p.out, 1, p.count * p.out, p.out);
            // dW[g] (+)= dZᵀ·X over the batch.
            let gw = Gemm {
                batch: n,
                accumulate: acc,
                c_view: MatView::new(g * p.out * p.inp, p.inp, 1, p.out * p.inp),
                pre_view: MatView::new(g * p.out * p.inp, p.inp, 1, p.out * p.inp),
                ..Gemm::plain(
                    p.out,
                    p.inp,
                    rows,
                    dz,
                    dz_view,
                    p.x,
                    MatView::new((p.xt0 + t) * p.inp, p.x_tokens * p.inp, 1, p.inp),
                )
            };
            gw.check(OP, dw, None)?;
            backend::gemm(dev, &gw, dw, None)?;
            if let Some(db) = db.as_deref_mut() {
                // db[g] (+)= 1ᵀ·dZ: a GEMM against a ones vector keeps the order fixed.
                let gb = Gemm {
                    batch: n,
                    accumulate: acc,
                    c_view: MatView::new(g * p.out, 0, 1, p.out),
                    pre_view: MatView::new(g * p.out, 0, 1, p.out),
                    ..Gemm::plain(
                        1,
                        p.out,
                        rows,
                        ones,
                        MatView::new(0, 0, 1, 0),
                        dz,
                        MatView::new(t * p.out, p.count * p.out, 1, p.out),
                    )
                };
                gb.check(OP, db, None)?;
                backend::gemm(dev, &gb, db, None)?;
            }
            for s in &mut touched[g..g + n] {
                *s = true;
            }
            if let Some(dx) = dx.as_deref_mut() {
                // dX[b, xt0 + t] += dZ·W[g].
                let v = MatView::new((p.xt0 + t) * p.inp, p.x_tokens * p.inp, 1, p.inp);
                let gx = Gemm {
                    batch: n,
                    accumulate: true,
                    c_view: v,
                    pre_view: v,
                    ..Gemm::plain(
                        rows,
                        p.inp,
                        p.out,
                        dz,
                        MatView::new(t * p.out, p.count * p.out, 1, p.out),
                        p.w,
                        MatView::new(g * p.out * p.inp, p.inp, 1, p.out * p.inp),
                    )
                };
                gx.check(OP, dx, None)?;
                backend::gemm(dev, &gx, dx, None)?;
            }
        }
        Ok(())
    }
}

fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A host-side slice of tokens `[B, L, d] → [B, count, d]` (used for the pruned residual).
fn token_slice(x: &Tensor, t0: usize, count: usize) -> Result<Tensor> {
    let s = x.shape();
    let (b, l, d) = (s[0], s[1], s[2]);
    if t0 == 0 && count == l {
        return x.try_clone();
    }
    let v = x.to_f32_vec()?;
    let out: Vec<f32> = (0..b)
        .flat_map(|i| {
            v[(i * l + t0) * d..(i * l + t0 + count) * d]
                .iter()
                .copied()
        })
        .collect();
    Tensor::from_f32(&out, &[b, count, d], x.dtype(), &x.device())
}

/// The layer body shared by both layer types; `lowrank` selects the Q/K/V projection.
struct Body<'a> {
    cfg: &'a LayerConfig,
    lowrank: Option<(usize, usize)>,
}

impl Body<'_> {
    fn lr(&self) -> Option<LowRankQkv> {
        self.lowrank.map(|(rank_qk, rank_v)| LowRankQkv {
            tokens: self.cfg.tokens,
            width: self.cfg.width,
            heads: self.cfg.heads,
            dk: self.cfg.dk,
            dv: self.cfg.dv,
            q_tokens: self.cfg.lq(),
            rank_qk,
            rank_v,
        })
    }

    fn ln_shape(&self) -> Vec<usize> {
        if self.cfg.per_token_ln {
            vec![self.cfg.lq(), self.cfg.width]
        } else {
            vec![self.cfg.width]
        }
    }

    fn init(&self, seed: u64, dev: &Device) -> Result<LayerParams> {
        let c = self.cfg;
        c.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let g = c.groups();
        let (d, hk, hv) = (c.width, c.heads * c.dk, c.heads * c.dv);
        let mut mat = |shape: &[usize], fan_in: usize| -> Result<Tensor> {
            let std = (1.0 / fan_in.max(1) as f32).sqrt();
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| std * normal(&mut rng)).collect();
            Tensor::from_f32(&v, shape, c.dtype, dev)
        };
        let qkv = match self.lr() {
            None => QkvParams::PerToken {
                wq: mat(&[g, hk, d], d)?,
                wk: mat(&[g, hk, d], d)?,
                wv: mat(&[g, hv, d], d)?,
            },
            Some(lr) => QkvParams::LowRank(QkvWeights {
                a: mat(&[2 * lr.rank_qk + lr.rank_v, c.tokens * d], c.tokens * d)?,
                rq: mat(&[c.lq() * hk, lr.rank_qk], lr.rank_qk)?,
                rk: mat(&[c.tokens * hk, lr.rank_qk], lr.rank_qk)?,
                rv: mat(&[c.tokens * hv, lr.rank_v], lr.rank_v)?,
            }),
        };
        let ln = self.ln_shape();
        Ok(LayerParams {
            qkv,
            wo: mat(&[g, d, hv], hv)?,
            bo: Tensor::zeros(&[g, d], c.dtype, dev)?,
            w1: mat(&[g, c.dff, d], d)?,
            b1: Tensor::zeros(&[g, c.dff], c.dtype, dev)?,
            w2: mat(&[g, d, c.dff], c.dff)?,
            b2: Tensor::zeros(&[g, d], c.dtype, dev)?,
            ln1_g: Tensor::full(&ln, 1.0, c.dtype, dev)?,
            ln1_b: Tensor::zeros(&ln, c.dtype, dev)?,
            ln2_g: Tensor::full(&ln, 1.0, c.dtype, dev)?,
            ln2_b: Tensor::zeros(&ln, c.dtype, dev)?,
        })
    }

    fn check(&self, op: &'static str, p: &LayerParams, dev: &Device) -> Result<()> {
        let c = self.cfg;
        c.validate()?;
        let g = c.groups();
        let (d, hk, hv) = (c.width, c.heads * c.dk, c.heads * c.dv);
        let ln = self.ln_shape();
        let mut want: Vec<(&'static str, &Tensor, Vec<usize>)> = vec![
            ("wo", &p.wo, vec![g, d, hv]),
            ("bo", &p.bo, vec![g, d]),
            ("w1", &p.w1, vec![g, c.dff, d]),
            ("b1", &p.b1, vec![g, c.dff]),
            ("w2", &p.w2, vec![g, d, c.dff]),
            ("b2", &p.b2, vec![g, d]),
            ("ln1_g", &p.ln1_g, ln.clone()),
            ("ln1_b", &p.ln1_b, ln.clone()),
            ("ln2_g", &p.ln2_g, ln.clone()),
            ("ln2_b", &p.ln2_b, ln),
        ];
        match (&p.qkv, self.lowrank) {
            (QkvParams::PerToken { wq, wk, wv }, None) => {
                want.push(("wq", wq, vec![g, hk, d]));
                want.push(("wk", wk, vec![g, hk, d]));
                want.push(("wv", wv, vec![g, hv, d]));
            }
            (QkvParams::LowRank(_), Some(_)) => {}
            _ => {
                return Err(Error::invalid(
                    op,
                    "params.qkv",
                    "per-token weights for the heterogeneous layer, low-rank ones for Hiformer",
                ))
            }
        }
        for (arg, t, s) in want {
            same_device(op, arg, dev, t)?;
            if t.shape() != s.as_slice() {
                return Err(Error::shape(op, arg, format!("{s:?}"), t.shape()));
            }
            if t.dtype() != c.dtype {
                return Err(Error::DType {
                    op,
                    arg,
                    expected: c.dtype.to_string(),
                    actual: t.dtype(),
                });
            }
        }
        Ok(())
    }

    fn forward(
        &self,
        x: &Tensor,
        p: &LayerParams,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, LayerSaved)> {
        let c = self.cfg;
        let dev = x.device();
        self.check(OP, p, &dev)?;
        let (l, d, lq) = (c.tokens, c.width, c.lq());
        let xs = x.shape();
        if xs.len() != 3 || xs[1] != l || xs[2] != d {
            return Err(Error::shape(OP, "x", format!("[B, {l}, {d}]"), xs));
        }
        if x.dtype() != c.dtype {
            return Err(Error::DType {
                op: OP,
                arg: "x",
                expected: c.dtype.to_string(),
                actual: x.dtype(),
            });
        }
        let b = xs[0];
        let (h, dk, dv, dt) = (c.heads, c.dk, c.dv, c.dtype);
        let q0 = l - lq;
        let (q, k, v, qkv) = match &p.qkv {
            QkvParams::PerToken { wq, wk, wv } => {
                let proj = |w: &Tensor, t0: usize, count: usize, out: usize| -> Result<Tensor> {
                    let mut y = Tensor::zeros(&[b, count, h, out / h], dt, &dev)?;
                    let tl = TokLin {
                        x,
                        x_tokens: l,
                        xt0: t0,
                        wt0: t0,
                        count,
                        inp: d,
                        out,
                        w,
                        b: None,
                    };
                    c.tok_forward(&dev, &tl, Activation::None, &mut y, None)?;
                    Ok(y)
                };
                (
                    proj(wq, q0, lq, h * dk)?,
                    proj(wk, 0, l, h * dk)?,
                    proj(wv, 0, l, h * dv)?,
                    None,
                )
            }
            QkvParams::LowRank(w) => {
                let lr = self.lr().ok_or_else(|| {
                    Error::invalid(OP, "params.qkv", "low-rank weights need ranks")
                })?;
                let out = lr.forward(x, w)?;
                (
                    out.q.try_clone()?,
                    out.k.try_clone()?,
                    out.v.try_clone()?,
                    Some(out),
                )
            }
        };
        let att = Attention { scale: c.scale }.forward(&q, &k, &v, None, mask)?;
        // Output projection, per query token: [B, Lq, H·dv] → [B, Lq, d].
        let mut proj = Tensor::zeros(&[b, lq, d], dt, &dev)?;
        let tl = TokLin {
            x: &att.o,
            x_tokens: lq,
            xt0: 0,
            wt0: q0,
            count: lq,
            inp: h * dv,
            out: d,
            w: &p.wo,
            b: Some(&p.bo),
        };
        c.tok_forward(&dev, &tl, Activation::None, &mut proj, None)?;
        let ln = LayerNorm { eps: c.eps };
        let xq = token_slice(x, q0, lq)?;
        let ln1 = ln.forward(&proj, Some(&xq), &p.ln1_g, &p.ln1_b)?;
        // FFN: GELU(y·W1ᵀ + b1)·W2ᵀ + b2.
        let mut h_act = Tensor::zeros(&[b, lq, c.dff], dt, &dev)?;
        let mut h_pre = Tensor::zeros(&[b, lq, c.dff], dt, &dev)?;
        let tl = TokLin {
            x: &ln1.y,
            x_tokens: lq,
            xt0: 0,
            wt0: q0,
            count: lq,
            inp: d,
            out: c.dff,
            w: &p.w1,
            b: Some(&p.b1),
        };
        c.tok_forward(&dev, &tl, Activation::Gelu, &mut h_act, Some(&mut h_pre))?;
        let mut f = Tensor::zeros(&[b, lq, d], dt, &dev)?;
        let tl = TokLin {
            x: &h_act,
            x_tokens: lq,
            xt0: 0,
            wt0: q0,
            count: lq,
            inp: c.dff,
            out: d,
            w: &p.w2,
            b: Some(&p.b2),
        };
        c.tok_forward(&dev, &tl, Activation::None, &mut f, None)?;
        let ln2 = ln.forward(&f, Some(&ln1.y), &p.ln2_g, &p.ln2_b)?;
        let z = ln2.y.try_clone()?;
        let mask = mask.map(|m| m.try_clone()).transpose()?;
        Ok((
            z,
            LayerSaved {
                x: x.try_clone()?,
                qkv,
                q,
                k,
                v,
                att,
                ln1,
                h_pre,
                h: h_act,
                ln2,
                mask,
            },
        ))
    }

    fn backward(
        &self,
        p: &LayerParams,
        s: &LayerSaved,
        dz: &Tensor,
    ) -> Result<(Tensor, LayerParams)> {
        const OP_B: &str = "hiformer_backward";
        let c = self.cfg;
        let dev = s.x.device();
        self.check(OP_B, p, &dev)?;
        let (l, d, lq) = (c.tokens, c.width, c.lq());
        let b = s.x.shape()[0];
        if dz.shape() != [b, lq, d] {
            return Err(Error::shape(
                OP_B,
                "dz",
                format!("[{b}, {lq}, {d}]"),
                dz.shape(),
            ));
        }
        let (h, dk, dv, dt) = (c.heads, c.dk, c.dv, c.dtype);
        let q0 = l - lq;
        // The ones vector of the bias-gradient GEMMs, filled on the device (`Tensor::full` would
        // upload it: a host copy in every training step).
        let mut ones = Tensor::zeros(&[b], dt, &dev)?;
        ones.fill(1.0)?;
        let zeros_like = |t: &Tensor| Tensor::zeros(t.shape(), t.dtype(), &dev);
        let ln = LayerNorm { eps: c.eps };
        // LN2: d2 is the gradient of both y (residual) and f.
        let g2 = ln.backward(&p.ln2_g, &p.ln2_b, &s.ln2, dz)?;
        let mut dw2 = zeros_like(&p.w2)?;
        let mut db2 = zeros_like(&p.b2)?;
        let mut dh = Tensor::zeros(&[b, lq, c.dff], DType::F32, &dev)?;
        let tl = TokLin {
            x: &s.h,
            x_tokens: lq,
            xt0: 0,
            wt0: q0,
            count: lq,
            inp: c.dff,
            out: d,
            w: &p.w2,
            b: None,
        };
        c.tok_backward(
            &dev,
            &tl,
            &g2.dx,
            &ones,
            &mut dw2,
            Some(&mut db2),
            Some(&mut dh),
            false,
        )?;
        let mut dh_pre = Tensor::zeros(&[b, lq, c.dff], dt, &dev)?;
        backend::act_backward(&dev, &dh, Some(&s.h_pre), Activation::Gelu, &mut dh_pre)?;
        let mut dw1 = zeros_like(&p.w1)?;
        let mut db1 = zeros_like(&p.b1)?;
        let mut dy = Tensor::zeros(&[b, lq, d], DType::F32, &dev)?;
        let tl = TokLin {
            x: &s.ln1.y,
            x_tokens: lq,
            xt0: 0,
            wt0: q0,
            count: lq,
            inp: d,
            out: c.dff,
            w: &p.w1,
            b: None,
        };
        c.tok_backward(
            &dev,
            &tl,
            &dh_pre,
            &ones,
            &mut dw1,
            Some(&mut db1),
            Some(&mut dy),
            false,
        )?;
        let mut dy_total = Tensor::zeros(&[b, lq, d], dt, &dev)?;
        backend::add(&dev, &dy, Some(&g2.dx), &mut dy_total)?;
        // LN1: d1 is the gradient of the query tokens' residual and of the projection.
        let g1 = ln.backward(&p.ln1_g, &p.ln1_b, &s.ln1, &dy_total)?;
        let mut dwo = zeros_like(&p.wo)?;
        let mut dbo = zeros_like(&p.bo)?;
        let mut d_o = Tensor::zeros(&[b, lq, h, dv], DType::F32, &dev)?;
        let tl = TokLin {
            x: &s.att.o,
            x_tokens: lq,
            xt0: 0,
            wt0: q0,
            count: lq,
            inp: h * dv,
            out: d,
            w: &p.wo,
            b: None,
        };
        c.tok_backward(
            &dev,
            &tl,
            &g1.dx,
            &ones,
            &mut dwo,
            Some(&mut dbo),
            Some(&mut d_o),
            false,
        )?;
        let d_o = d_o.to_dtype(dt)?;
        let ga = Attention { scale: c.scale }.backward(
            &s.q,
            &s.k,
            &s.v,
            None,
            s.mask.as_ref(),
            &s.att,
            &d_o,
        )?;
        // Q/K/V projections.
        let mut dx = Tensor::zeros(&[b, l, d], DType::F32, &dev)?;
        let qkv = match (&p.qkv, &s.qkv) {
            (QkvParams::PerToken { wq, wk, wv }, _) => {
                let mut grads = Vec::new();
                for (w, t0, count, out, dtn) in [
                    (wq, q0, lq, h * dk, &ga.dq),
                    (wk, 0, l, h * dk, &ga.dk),
                    (wv, 0, l, h * dv, &ga.dv),
                ] {
                    let mut dw = zeros_like(w)?;
                    let tl = TokLin {
                        x: &s.x,
                        x_tokens: l,
                        xt0: t0,
                        wt0: t0,
                        count,
                        inp: d,
                        out,
                        w,
                        b: None,
                    };
                    c.tok_backward(&dev, &tl, dtn, &ones, &mut dw, None, Some(&mut dx), false)?;
                    grads.push(dw);
                }
                let wv = grads
                    .pop()
                    .ok_or_else(|| Error::invalid(OP_B, "wv", "missing"))?;
                let wk = grads
                    .pop()
                    .ok_or_else(|| Error::invalid(OP_B, "wk", "missing"))?;
                let wq = grads
                    .pop()
                    .ok_or_else(|| Error::invalid(OP_B, "wq", "missing"))?;
                QkvParams::PerToken { wq, wk, wv }
            }
            (QkvParams::LowRank(w), Some(out)) => {
                let lr = self.lr().ok_or_else(|| {
                    Error::invalid(OP_B, "params.qkv", "low-rank weights need ranks")
                })?;
                let mut g = QkvWeights {
                    a: zeros_like(&w.a)?,
                    rq: zeros_like(&w.rq)?,
                    rk: zeros_like(&w.rk)?,
                    rv: zeros_like(&w.rv)?,
                };
                let dxp = lr.backward(&s.x, w, out, &ga.dq, &ga.dk, &ga.dv, &mut g, false)?;
                let mut acc = Tensor::zeros(&[b, l, d], DType::F32, &dev)?;
                backend::add(&dev, &dx, Some(&dxp), &mut acc)?;
                dx = acc;
                QkvParams::LowRank(g)
            }
            (QkvParams::LowRank(_), None) => {
                return Err(Error::invalid(
                    OP_B,
                    "saved",
                    "missing the low-rank intermediates",
                ))
            }
        };
        // The residual: the query tokens' rows gain d1 (a device add when every token is a
        // query; the pruned layer's token slice is gathered on the host for now).
        let dx = if q0 == 0 {
            let mut out = Tensor::zeros(&[b, l, d], dt, &dev)?;
            backend::add(&dev, &dx, Some(&g1.dx), &mut out)?;
            out
        } else {
            let mut dxv = dx.to_f32_vec()?;
            let d1 = g1.dx.to_f32_vec()?;
            for i in 0..b {
                for t in 0..lq {
                    for e in 0..d {
                        dxv[(i * l + q0 + t) * d + e] += d1[(i * lq + t) * d + e];
                    }
                }
            }
            Tensor::from_f32(&dxv, &[b, l, d], dt, &dev)?
        };
        Ok((
            dx,
            LayerParams {
                qkv,
                wo: dwo,
                bo: dbo,
                w1: dw1,
                b1: db1,
                w2: dw2,
                b2: db2,
                ln1_g: g1.dgamma,
                ln1_b: g1.dbeta,
                ln2_g: g2.dgamma,
                ln2_b: g2.dbeta,
            },
        ))
    }
}

/// The heterogeneous attention layer: per-token Q/K/V projections.
#[derive(Clone, Debug)]
pub struct HeteroAttentionLayer {
    pub cfg: LayerConfig,
}

/// The Hiformer layer: Q/K/V from the low-rank composite projection of all tokens.
#[derive(Clone, Debug)]
pub struct HiformerLayer {
    pub cfg: LayerConfig,
    /// r_q = r_k.
    pub rank_qk: usize,
    pub rank_v: usize,
}

impl HeteroAttentionLayer {
    fn body(&self) -> Body<'_> {
        Body {
            cfg: &self.cfg,
            lowrank: None,
        }
    }
    /// Random weights (fan-in scaled normal, zero biases, unit LayerNorm gains).
    pub fn init(&self, seed: u64, dev: &Device) -> Result<LayerParams> {
        self.body().init(seed, dev)
    }
    /// Forward over `x: [B, L, d]` (optional key mask `[B, L]`): `z: [B, L_q, d]`.
    pub fn forward(
        &self,
        x: &Tensor,
        params: &LayerParams,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, LayerSaved)> {
        self.body().forward(x, params, mask)
    }
    /// Backward from `dz`: `dx: [B, L, d]` and the parameter gradients.
    pub fn backward(
        &self,
        params: &LayerParams,
        saved: &LayerSaved,
        dz: &Tensor,
    ) -> Result<(Tensor, LayerParams)> {
        self.body().backward(params, saved, dz)
    }
}

impl HiformerLayer {
    fn body(&self) -> Body<'_> {
        Body {
            cfg: &self.cfg,
            lowrank: Some((self.rank_qk, self.rank_v)),
        }
    }
    /// Random weights (fan-in scaled normal, zero biases, unit LayerNorm gains).
    pub fn init(&self, seed: u64, dev: &Device) -> Result<LayerParams> {
        self.body().init(seed, dev)
    }
    /// Forward over `x: [B, L, d]` (optional key mask `[B, L]`): `z: [B, L_q, d]`.
    pub fn forward(
        &self,
        x: &Tensor,
        params: &LayerParams,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, LayerSaved)> {
        self.body().forward(x, params, mask)
    }
    /// Backward from `dz`: `dx: [B, L, d]` and the parameter gradients.
    pub fn backward(
        &self,
        params: &LayerParams,
        saved: &LayerSaved,
        dz: &Tensor,
    ) -> Result<(Tensor, LayerParams)> {
        self.body().backward(params, saved, dz)
    }
}
