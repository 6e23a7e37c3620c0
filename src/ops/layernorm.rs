//! LayerNorm fused with the residual add: `y = LN(x + r)·γ + β` per row of width d, statistics
//! in f32, with γ/β shared (`[d]`) or per token (`[T, d]`, where x is `[..., T, d]`). Forward
//! keeps (x + r, μ, rstd); backward returns dx — which is also the residual's gradient — and
//! dγ, dβ reduced over the batch in a fixed order.
//!
//! ```
//! use recfuse::ops::layernorm::LayerNorm;
//! use recfuse::{DType, Device, Tensor};
//! let dev = Device::cpu();
//! let x = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[1, 4], DType::F32, &dev)?;
//! let g = Tensor::full(&[4], 1.0, DType::F32, &dev)?;
//! let b = Tensor::zeros(&[4], DType::F32, &dev)?;
//! let fwd = LayerNorm::default().forward(&x, None, &g, &b)?;
//! let y = fwd.y.to_vec::<f32>()?;
//! assert!(y.iter().sum::<f32>().abs() < 1e-5); // zero mean
//! # Ok::<(), recfuse::Error>(())
//! ```

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend::same_device;
use crate::tensor::Tensor;

const OP: &str = "layernorm";

/// LayerNorm options.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub eps: f32,
}

impl Default for LayerNorm {
    fn default() -> Self {
        LayerNorm { eps: 1e-5 }
    }
}

/// Forward outputs and saved state.
#[derive(Debug)]
pub struct LayerNormForward {
    /// The output, in x's dtype.
    pub y: Tensor,
    /// x + r (what was normalised), in x's dtype.
    pub input: Tensor,
    /// Row means, f32.
    pub mean: Tensor,
    /// Row 1/σ, f32.
    pub rstd: Tensor,
}

/// Gradients.
#[derive(Debug)]
pub struct LayerNormGrads {
    /// ∂L/∂x, which is also ∂L/∂r.
    pub dx: Tensor,
    pub dgamma: Tensor,
    pub dbeta: Tensor,
}

fn tokens_of(
    op: &'static str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<(usize, usize)> {
    let xs = x.shape();
    let d = *xs
        .last()
        .ok_or_else(|| Error::shape(op, "x", "[..., d]", xs))?;
    let gs = gamma.shape();
    let tokens = match gs {
        [g] if *g == d => 1,
        [t, g] if *g == d && xs.len() >= 2 && xs[xs.len() - 2] == *t => *t,
        _ => {
            return Err(Error::shape(
                op,
                "gamma",
                format!("[{d}] or [T, {d}] with x = [..., T, {d}]"),
                gs,
            ))
        }
    };
    if beta.shape() != gs {
        return Err(Error::shape(op, "beta", format!("{gs:?}"), beta.shape()));
    }
    let dev = x.device();
    same_device(op, "gamma", &dev, gamma)?;
    same_device(op, "beta", &dev, beta)?;
    Ok((d, tokens))
}

impl LayerNorm {
    /// Forward of `LN(x + residual)·γ + β`.
    pub fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
    ) -> Result<LayerNormForward> {
        let (d, tokens) = tokens_of(OP, x, gamma, beta)?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid(
                OP,
                "eps",
                format!("{} (must be finite and > 0)", self.eps),
            ));
        }
        if let Some(r) = residual {
            same_device(OP, "residual", &x.device(), r)?;
            if r.shape() != x.shape() {
                return Err(Error::shape(
                    OP,
                    "residual",
                    format!("{:?}", x.shape()),
                    r.shape(),
                ));
            }
        }
        // x + r is materialised in x's dtype first (as a framework would), so the saved input
        // and the statistics computed from it agree bit for bit in backward.
        let dev = x.device();
        let mut input = Tensor::zeros(x.shape(), x.dtype(), &dev)?;
        crate::ops::backend::add(&dev, x, residual, &mut input)?;
        let rows = x.numel() / d.max(1);
        let mut out = LayerNormForward {
            y: Tensor::zeros(x.shape(), x.dtype(), &dev)?,
            input,
            mean: Tensor::zeros(&[rows], DType::F32, &dev)?,
            rstd: Tensor::zeros(&[rows], DType::F32, &dev)?,
        };
        if rows > 0 {
            crate::ops::backend::layernorm_forward(
                &dev,
                &out.input,
                gamma,
                beta,
                tokens,
                self.eps,
                &mut out.y,
                &mut out.mean,
                &mut out.rstd,
            )?;
        }
        Ok(out)
    }

    /// Backward from dy.
    pub fn backward(
        &self,
        gamma: &Tensor,
        beta: &Tensor,
        fwd: &LayerNormForward,
        dy: &Tensor,
    ) -> Result<LayerNormGrads> {
        let (d, tokens) = tokens_of("layernorm_backward", &fwd.input, gamma, beta)?;
        if dy.shape() != fwd.input.shape() {
            return Err(Error::shape(
                "layernorm_backward",
                "dy",
                format!("{:?}", fwd.input.shape()),
                dy.shape(),
            ));
        }
        const BWD: &str = "layernorm_backward";
        let dev = fwd.input.device();
        same_device(BWD, "dy", &dev, dy)?;
        // The statistics must be this forward's: one f32 per normalised row, on its device.
        let rows = fwd.input.numel() / d.max(1);
        for (arg, t) in [("fwd.mean", &fwd.mean), ("fwd.rstd", &fwd.rstd)] {
            same_device(BWD, arg, &dev, t)?;
            if t.shape() != [rows] {
                return Err(Error::shape(BWD, arg, format!("[{rows}]"), t.shape()));
            }
            if t.dtype() != DType::F32 {
                return Err(Error::DType {
                    op: BWD,
                    arg,
                    expected: DType::F32.to_string(),
                    actual: t.dtype(),
                });
            }
        }
        let mut g = LayerNormGrads {
            dx: Tensor::zeros(dy.shape(), dy.dtype(), &dev)?,
            dgamma: Tensor::zeros(gamma.shape(), gamma.dtype(), &dev)?,
            dbeta: Tensor::zeros(beta.shape(), beta.dtype(), &dev)?,
        };
        if dy.numel() > 0 {
            crate::ops::backend::layernorm_backward(
                &dev,
                &fwd.input,
                gamma,
                &fwd.mean,
                &fwd.rstd,
                dy,
                tokens,
                &mut g.dx,
                &mut g.dgamma,
                &mut g.dbeta,
            )?;
        }
        Ok(g)
    }
}
