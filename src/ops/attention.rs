//! The attention core for many short sequences of feature tokens (heterogeneous attention,
//! Hiformer): Q `[B, L_q, H, d_k]`, K `[B, L, H, d_k]`, V `[B, L, H, d_v]` with `d_k ≠ d_v`
//! allowed, scale (default 1/√d_k), an optional additive bias `[H, L_q, L]`, a key-validity mask
//! `[B, L]` (non-zero = valid) and query pruning (pass only the last t tokens' queries:
//! `L_q = t`). Outputs O `[B, L_q, H, d_v]` and the row log-sum-exp LSE `[B, H, L_q]` (f32).
//! A row whose keys are all masked gives O = 0, LSE = −∞ and zero gradients, never NaN.
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

use crate::cpu::attention::{self as cpu, Attn};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend::same_device;
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
    if dev != Device::Cpu {
        return Err(Error::Unsupported {
            op: OP,
            backend: dev.backend(),
            what: "the attention-core kernels exist on the CPU only so far".into(),
        });
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

struct Host {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    bias: Option<Vec<f32>>,
    mask: Option<Vec<bool>>,
}

impl Attention {
    fn host(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Host> {
        Ok(Host {
            q: q.to_f32_vec()?,
            k: k.to_f32_vec()?,
            v: v.to_f32_vec()?,
            bias: bias.map(|t| t.to_f32_vec()).transpose()?,
            mask: mask
                .map(|t| {
                    t.to_f32_vec()
                        .map(|m| m.iter().map(|&x| x != 0.0).collect())
                })
                .transpose()?,
        })
    }

    fn attn<'a>(&self, d: &Dims, h: &'a Host) -> Attn<'a> {
        Attn {
            b: d.b,
            lq: d.lq,
            l: d.l,
            h: d.h,
            dk: d.dk,
            dv: d.dv,
            scale: self.scale.unwrap_or(1.0 / (d.dk.max(1) as f32).sqrt()),
            q: &h.q,
            k: &h.k,
            v: &h.v,
            bias: h.bias.as_deref(),
            mask: h.mask.as_deref(),
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
        let host = Self::host(q, k, v, bias, mask)?;
        let (o, lse) = cpu::forward(&self.attn(&d, &host));
        let dev = q.device();
        Ok(AttentionForward {
            o: Tensor::from_f32(&o, &[d.b, d.lq, d.h, d.dv], q.dtype(), &dev)?,
            lse: Tensor::from_f32(&lse, &[d.b, d.h, d.lq], DType::F32, &dev)?,
        })
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
        let host = Self::host(q, k, v, bias, mask)?;
        let (dq, dk, dv, db) = cpu::backward(
            &self.attn(&d, &host),
            &fwd.o.to_f32_vec()?,
            &fwd.lse.to_f32_vec()?,
            &d_o.to_f32_vec()?,
        );
        let dev = q.device();
        Ok(AttentionGrads {
            dq: Tensor::from_f32(&dq, q.shape(), q.dtype(), &dev)?,
            dk: Tensor::from_f32(&dk, k.shape(), k.dtype(), &dev)?,
            dv: Tensor::from_f32(&dv, v.shape(), v.dtype(), &dev)?,
            dbias: match (db, bias) {
                (Some(db), Some(bi)) => Some(Tensor::from_f32(&db, bi.shape(), bi.dtype(), &dev)?),
                _ => None,
            },
        })
    }
}
