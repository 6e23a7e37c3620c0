//! Binary cross-entropy with logits, forward and backward fused in one pass (PyTorch's
//! `BCEWithLogitsLoss` with an optional per-element `weight`; `pos_weight` is not supported):
//!
//! ```text
//! ℓ_i  = w_i · (max(x_i, 0) − x_i·y_i + log1p(exp(−|x_i|)))        (stable for any x_i)
//! L    = Σ ℓ_i  (Sum)   or   Σ ℓ_i / N  (Mean, N = number of elements, as PyTorch)
//! ∂L/∂x_i = w_i · (σ(x_i) − y_i) · (1 or 1/N)
//! ```
//! The loss stays on the device as a 0-dimensional f32 tensor (reading it is the caller's
//! choice: [`bce_with_logits_value`] does it for you), summed in a fixed order (deterministic).
//! A NaN in a logit or target makes the loss NaN. All arithmetic is f32.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend;
use crate::tensor::Tensor;

/// How the per-element losses are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Σ ℓ_i / N (PyTorch's default; N counts every element, not the weights).
    #[default]
    Mean,
    /// Σ ℓ_i.
    Sum,
}

/// What the backends compute (validated by `bce_with_logits`).
pub(crate) struct BceArgs<'a> {
    pub logits: &'a Tensor,
    pub targets: &'a Tensor,
    pub weight: Option<&'a Tensor>,
    /// 1 (Sum) or 1/N (Mean), applied to the loss and to the gradient.
    pub scale: f32,
}

/// ℓ and ∂ℓ/∂x (unscaled, unweighted) of one element in f32, in the order every backend
/// uses: e = exp(−|x|), log1p(e) by the compensated `log(1+e)·e/((1+e)−1)` (WGSL has no
/// log1p, so all backends use this form), σ(x) from the same e.
#[inline]
pub(crate) fn bce_elem(x: f32, y: f32) -> (f32, f32) {
    let e = (-x.abs()).exp();
    let u = 1.0 + e;
    let l1p = if u == 1.0 {
        e
    } else {
        u.ln() * (e / (u - 1.0))
    };
    let loss = x.max(0.0) - x * y + l1p;
    let s = if x >= 0.0 { 1.0 / u } else { e / u };
    // σ(NaN) must stay NaN: the comparison above sends NaN to the e/u branch, which is NaN.
    (loss, s - y)
}

fn check(op: &'static str, arg: &'static str, logits: &Tensor, t: &Tensor) -> Result<()> {
    if t.shape() != logits.shape() {
        return Err(Error::shape(
            op,
            arg,
            format!("{:?} (the shape of logits)", logits.shape()),
            t.shape(),
        ));
    }
    backend::same_device(op, arg, &logits.device(), t)
}

/// The BCE-with-logits loss as a device scalar (shape `[]`, f32), and, when `dlogits` is given
/// (same shape as `logits`, any dtype, overwritten), its gradient ∂L/∂logits from the same
/// pass. `targets` and `weight` have the shape of `logits`; every tensor may be f32, bf16 or
/// f16.
///
/// ```
/// use recfuse::ops::bce::{bce_with_logits, Reduction};
/// use recfuse::{Device, DType, Tensor};
/// let dev = Device::cpu();
/// let x = Tensor::from_slice(&[0.0f32, 2.0], &[2], &dev)?;
/// let y = Tensor::from_slice(&[1.0f32, 0.0], &[2], &dev)?;
/// let mut dx = Tensor::zeros(&[2], DType::F32, &dev)?;
/// let loss = bce_with_logits(&x, &y, None, Reduction::Mean, Some(&mut dx))?;
/// let want = (2f64.ln() + (1.0 + 2f64.exp()).ln()) / 2.0;
/// assert!((loss.to_vec::<f32>()?[0] as f64 - want).abs() < 1e-6);
/// let s2 = 1.0 / (1.0 + (-2.0f32).exp());
/// let g = dx.to_vec::<f32>()?;
/// assert!((g[0] - (0.5 - 1.0) / 2.0).abs() < 1e-6 && (g[1] - s2 / 2.0).abs() < 1e-6);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn bce_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    dlogits: Option<&mut Tensor>,
) -> Result<Tensor> {
    const OP: &str = "bce_with_logits";
    check(OP, "targets", logits, targets)?;
    if let Some(w) = weight {
        check(OP, "weight", logits, w)?;
    }
    if let Some(g) = dlogits.as_deref() {
        check(OP, "dlogits", logits, g)?;
    }
    let dev = logits.device();
    let n = logits.numel();
    let mut loss = Tensor::zeros(&[], DType::F32, &dev)?;
    if n == 0 {
        // PyTorch: the mean of nothing is NaN, the sum is 0.
        if reduction == Reduction::Mean {
            loss.fill(f32::NAN)?;
        }
        return Ok(loss);
    }
    let scale = match reduction {
        Reduction::Sum => 1.0,
        Reduction::Mean => (1.0 / n as f64) as f32,
    };
    let args = BceArgs {
        logits,
        targets,
        weight,
        scale,
    };
    backend::bce(&dev, &args, dlogits, &mut loss)?;
    Ok(loss)
}

/// [`bce_with_logits`], then the loss read back to the host (one 4-byte copy and a wait).
///
/// ```
/// use recfuse::ops::bce::{bce_with_logits_value, Reduction};
/// use recfuse::{Device, Tensor};
/// let dev = Device::cpu();
/// let x = Tensor::from_slice(&[0.0f32], &[1], &dev)?;
/// let y = Tensor::from_slice(&[0.0f32], &[1], &dev)?;
/// let l = bce_with_logits_value(&x, &y, None, Reduction::Sum, None)?;
/// assert!((l - std::f32::consts::LN_2).abs() < 1e-6);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn bce_with_logits_value(
    logits: &Tensor,
    targets: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    dlogits: Option<&mut Tensor>,
) -> Result<f32> {
    let loss = bce_with_logits(logits, targets, weight, reduction, dlogits)?;
    Ok(loss.to_vec::<f32>()?[0])
}
