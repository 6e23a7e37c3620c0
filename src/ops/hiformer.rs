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
    pub fn new(tokens: usize, width: usize, heads: usize, dk: usize, dv: usize, dff: usize) -> LayerConfig {
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
        let nonzero = [("tokens", self.tokens), ("width", self.width), ("heads", self.heads), ("dk", self.dk), ("dv", self.dv), ("dff", self.dff)];
        for (arg, v) in nonzero {
            if v == 0 {
                return Err(Error::invalid(OP, arg, "must be ≥ 1"));
            }
        }
        if let Some(t) = self.task_tokens {
            if t == 0 || t > self.tokens {
                return Err(Error::invalid(OP, "task_tokens", format!("{t} is not in 1..={}", self.tokens)));
            }
        }
        if let Some(m) = &self.group_map {
            if m.len() != self.tokens {
                return Err(Error::invalid(OP, "group_map", format!("{} entries for {} tokens", m.len(), self.tokens)));
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
    fn tok_forward(&self, dev: &Device, p: &TokLin<'_>, act: Activation, y: &mut Tensor, mut pre: Option<&mut Tensor>) -> Result<()> {
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
                ..Gemm::plain(p.out, p.inp, rows, dz, dz_view, p.x, MatView::new((p.xt0 + t) * p.inp, p.x_tokens * p.inp, 1, p.inp))
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
                    ..Gemm::plain(1, p.out, rows, ones, MatView::new(0, 0, 1, 0), dz, MatView::new(t * p.out, p.count * p.out, 1, p.out))
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
