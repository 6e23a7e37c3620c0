//! The attention core for many short sequences of feature tokens (heterogeneous attention,
//! Hiformer): Q `[B, L_q, H, d_k]`, K `[B, L, H, d_k]`, V `[B, L, H, d_v]` with `d_k ≠ d_v`
//! allowed, scale (default 1/√d_k), an optional additive bias `[H, L_q, L]`, a key-validity mask
//! `[B, L]` (non-zero = valid) and query pruning (pass only the last t tokens' queries:
//! `L_q = t`). Outputs O `[B, L_q, H, d_v]` and the row log-sum-exp LSE `[B, H, L_q]` (f32).
//! A row whose keys are all masked gives O = 0, LSE = −∞ and zero gradients, never NaN. A masked
//! key is never read: a NaN in its K or V reaches no output. A NaN in a valid key, a query, the
//! bias or dO propagates as in a materialised softmax over the valid keys (the f64 reference).
//! Backward recomputes P from LSE (FlashAttention-2 form): dV = Pᵀ·dO, dS = P ⊙ (dP − D),
//! dQ = scale·dS·K, dK = scale·dSᵀ·Q, d bias = Σ_batch dS (fixed order).
//!
//! ```
//! use recfuse::ops::attention::Attention;
//! use recfuse::{DType, Device, Tensor};
//! let dev = Device::cpu();
//! let (b, l, h, dk, dv) = (2, 5, 2, 4, 8);
//! let q = Tensor::full(&[b, l, h, dk], 0.1, DType::F32, &dev)?;
//! let k = Tensor::full(&[b, l, h, dk], 0.2, DType::F32, &dev)?;
//! let v = Tensor::full(&[b, l, h, dv], 1.0, DType::F32, &dev)?;
//! let fwd = Attention::default().forward(&q, &k, &v, None, None)?;
//! assert_eq!(fwd.o.shape(), &[b, l, h, dv]);
//! assert!((fwd.o.to_vec::<f32>()?[0] - 1.0).abs() < 1e-6); // a convex mix of equal values
//! # Ok::<(), recfuse::Error>(())
//! ```

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend::{self, same_device};
use crate::tensor::Tensor;

const OP: &str = "attention";

/// Attention options.
#[derive(Clone, Debug, Default)]
pub struct Attention {
    /// Score scale; `None` = 1/√d_k.
    pub scale: Option<f32>,
}

/// Forward outputs.
#[derive(Debug)]
pub struct AttentionForward {
    /// `[B, L_q, H, d_v]`, in Q's dtype.
    pub o: Tensor,
    /// `[B, H, L_q]` f32.
    pub lse: Tensor,
}

/// Gradients.
#[derive(Debug)]
pub struct AttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    /// `[H, L_q, L]` when a bias was given.
    pub dbias: Option<Tensor>,
}

struct Dims {
    b: usize,
    lq: usize,
    l: usize,
    h: usize,
    dk: usize,
    dv: usize,
}

fn dims(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Dims> {
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    if qs.len() != 4 {
        return Err(Error::shape(OP, "q", "[B, L_q, H, d_k]", qs));
    }
    let (b, lq, h, dk) = (qs[0], qs[1], qs[2], qs[3]);
    if ks.len() != 4 || ks[0] != b || ks[2] != h || ks[3] != dk {
        return Err(Error::shape(OP, "k", format!("[{b}, L, {h}, {dk}]"), ks));
    }
    let l = ks[1];
    if vs.len() != 4 || vs[0] != b || vs[1] != l || vs[2] != h {
        return Err(Error::shape(OP, "v", format!("[{b}, {l}, {h}, d_v]"), vs));
    }
    if lq > l {
        return Err(Error::shape(
            OP,
            "q",
            format!("at most L = {l} query tokens"),
            qs,
        ));
    }
    let dev = q.device();
    for (arg, t) in [("k", k), ("v", v)] {
        same_device(OP, arg, &dev, t)?;
        if t.dtype() != q.dtype() {
            return Err(Error::DType {
                op: OP,
                arg,
                expected: q.dtype().to_string(),
                actual: t.dtype(),
            });
        }
    }
    if let Some(bi) = bias {
        same_device(OP, "bias", &dev, bi)?;
        if bi.shape() != [h, lq, l] {
            return Err(Error::shape(
                OP,
                "bias",
                format!("[{h}, {lq}, {l}]"),
                bi.shape(),
            ));
        }
    }
    if let Some(m) = mask {
        same_device(OP, "mask", &dev, m)?;
        if m.shape() != [b, l] {
            return Err(Error::shape(OP, "mask", format!("[{b}, {l}]"), m.shape()));
        }
    }
    Ok(Dims {
        b,
        lq,
        l,
        h,
        dk,
        dv: vs[3],
    })
}

/// One validated attention call, as the backends see it.
pub(crate) struct AttnArgs<'a> {
    pub b: usize,
    pub lq: usize,
    pub l: usize,
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
    pub scale: f32,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// `[h, lq, l]`.
    pub bias: Option<&'a Tensor>,
    /// `[b, l]`, non-zero = valid key.
    pub mask: Option<&'a Tensor>,
}

impl Attention {
    fn args<'a>(
        &self,
        d: &Dims,
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        bias: Option<&'a Tensor>,
        mask: Option<&'a Tensor>,
    ) -> AttnArgs<'a> {
        AttnArgs {
            b: d.b,
            lq: d.lq,
            l: d.l,
            h: d.h,
            dk: d.dk,
            dv: d.dv,
            scale: self.scale.unwrap_or(1.0 / (d.dk.max(1) as f32).sqrt()),
            q,
            k,
            v,
            bias,
            mask,
        }
    }

    /// Forward.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<AttentionForward> {
        let d = dims(q, k, v, bias, mask)?;
        let dev = q.device();
        let mut out = AttentionForward {
            o: Tensor::zeros(&[d.b, d.lq, d.h, d.dv], q.dtype(), &dev)?,
            lse: Tensor::zeros(&[d.b, d.h, d.lq], DType::F32, &dev)?,
        };
        if d.b * d.lq * d.h > 0 {
            backend::attention_forward(
                &dev,
                &self.args(&d, q, k, v, bias, mask),
                &mut out.o,
                &mut out.lse,
            )?;
        }
        Ok(out)
    }

    /// Backward from dO.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        mask: Option<&Tensor>,
        fwd: &AttentionForward,
        d_o: &Tensor,
    ) -> Result<AttentionGrads> {
        let d = dims(q, k, v, bias, mask)?;
        if d_o.shape() != fwd.o.shape() || fwd.o.shape() != [d.b, d.lq, d.h, d.dv] {
            return Err(Error::shape(
                OP,
                "d_o",
                format!("{:?}", [d.b, d.lq, d.h, d.dv]),
                d_o.shape(),
            ));
        }
        if fwd.lse.shape() != [d.b, d.h, d.lq] {
            return Err(Error::shape(
                OP,
                "fwd.lse",
                format!("{:?}", [d.b, d.h, d.lq]),
                fwd.lse.shape(),
            ));
        }
        let dev = q.device();
        same_device(OP, "d_o", &dev, d_o)?;
        let mut g = AttentionGrads {
            dq: Tensor::zeros(q.shape(), q.dtype(), &dev)?,
            dk: Tensor::zeros(k.shape(), k.dtype(), &dev)?,
            dv: Tensor::zeros(v.shape(), v.dtype(), &dev)?,
            dbias: bias
                .map(|bi| Tensor::zeros(bi.shape(), bi.dtype(), &dev))
                .transpose()?,
        };
        if d.b * d.lq * d.h > 0 {
            let args = self.args(&d, q, k, v, bias, mask);
            backend::attention_backward(
                &dev,
                &args,
                &fwd.o,
                &fwd.lse,
                d_o,
                &mut g.dq,
                &mut g.dk,
                &mut g.dv,
                g.dbias.as_mut(),
            )?;
        }
        Ok(g)
    }
}
