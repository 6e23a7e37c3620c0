//! Dispatch from a validated op to the backend its tensors live on. Ops call these and never
//! match on devices themselves, so adding a backend touches only this file and the backend.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::gemm::{Activation, Gemm};
use crate::tensor::Tensor;

/// Checks that `t` lives on `dev`.
pub(crate) fn same_device(
    op: &'static str,
    arg: &'static str,
    dev: &Device,
    t: &Tensor,
) -> Result<()> {
    let td = t.device();
    if &td != dev {
        return Err(Error::DeviceMismatch {
            op,
            arg,
            expected: dev.describe(),
            actual: td.describe(),
        });
    }
    Ok(())
}

pub(crate) fn gemm(
    dev: &Device,
    p: &Gemm<'_>,
    c: &mut Tensor,
    pre: Option<&mut Tensor>,
) -> Result<()> {
    if p.m == 0 || p.n == 0 || p.batch == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => crate::cpu::fast::gemm(p, c, pre),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::gemm::gemm(d, p, c, pre),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::gemm::gemm(d, p, c, pre),
    }
}

/// dz = dy ⊙ act'(pre) over contiguous tensors of one size (pre is None for `Activation::None`).
pub(crate) fn act_backward(
    dev: &Device,
    dy: &Tensor,
    pre: Option<&Tensor>,
    act: Activation,
    dz: &mut Tensor,
) -> Result<()> {
    if dy.numel() == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => crate::cpu::fast::act_backward(dy, pre, act, dz),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::gemm::act_backward(d, dy, pre, act, dz),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::gemm::act_backward(d, dy, pre, act, dz),
    }
}

/// out[j] (+)= Σ_i x[i·cols + j], deterministic.
pub(crate) fn col_sum(
    dev: &Device,
    x: &Tensor,
    rows: usize,
    cols: usize,
    out: &mut Tensor,
    accumulate: bool,
    skip_odd: bool,
) -> Result<()> {
    if cols == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => crate::cpu::fast::col_sum(x, rows, cols, out, accumulate, skip_odd),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::gemm::col_sum(d, x, rows, cols, out, accumulate, skip_odd),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::gemm::col_sum(d, x, rows, cols, out, accumulate, skip_odd),
    }
}

/// The elementwise half of a cross layer's backward, one row block at a time:
/// ```text
/// gated:  s = σ(v);  ΔU = Ḡ·c0·s;  ΔV = Ḡ·c0·u·s·(1−s);  dX0 += Ḡ·u·s
/// DCN-V2:            ΔU = Ḡ·c0;                          dX0 += Ḡ·u
/// ```
/// `pre` and `delta` are `[rows, P]` (P = 2D interleaved (u, v) pairs when gated, else D),
/// `gbar`, `c0` and `dx0` are `[rows, D]`; `dx0` is accumulated.
pub(crate) fn gate_backward(
    dev: &Device,
    gbar: &Tensor,
    c0: &Tensor,
    pre: &Tensor,
    gated: bool,
    delta: &mut Tensor,
    dx0: &mut Tensor,
) -> Result<()> {
    if gbar.numel() == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => crate::cpu::fast::gate_backward(gbar, c0, pre, gated, delta, dx0),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::gemm::gate_backward(d, gbar, c0, pre, gated, delta, dx0),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::gemm::gate_backward(d, gbar, c0, pre, gated, delta, dx0),
    }
}

/// out = a (+ b), elementwise over equal sizes, converting dtypes as needed (also a cast).
pub(crate) fn add(dev: &Device, a: &Tensor, b: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
    if a.numel() == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => crate::cpu::fast::add(a, b, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::gemm::add(d, a, b, out),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::gemm::add(d, a, b, out),
    }
}

/// The attention core's forward: O and LSE (see `ops::attention`).
pub(crate) fn attention_forward(
    dev: &Device,
    a: &crate::ops::attention::AttnArgs<'_>,
    o: &mut Tensor,
    lse: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::attention::forward_t(a, o, lse),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::attention::forward(d, a, o, lse),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::attention::forward(d, a, o, lse),
    }
}

/// The attention core's backward: dQ, dK, dV (and d bias), P recomputed from LSE.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    dev: &Device,
    a: &crate::ops::attention::AttnArgs<'_>,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
    dbias: Option<&mut Tensor>,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::attention::backward_t(a, o, lse, d_o, dq, dk, dv, dbias),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::attention::backward(d, a, o, lse, d_o, dq, dk, dv, dbias),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::attention::backward(d, a, o, lse, d_o, dq, dk, dv, dbias),
    }
}

/// LayerNorm forward over rows of `x` (already x + residual): y, row mean and 1/σ (f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_forward(
    dev: &Device,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    tokens: usize,
    eps: f32,
    y: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::layernorm::forward_t(x, gamma, beta, tokens, eps, y, mean, rstd),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            crate::cuda::layernorm::forward(d, x, gamma, beta, tokens, eps, y, mean, rstd)
        }
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => {
            crate::wgpu::layernorm::forward(d, x, gamma, beta, tokens, eps, y, mean, rstd)
        }
    }
}

/// LayerNorm backward: dx, and dγ, dβ summed over rows in a fixed order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward(
    dev: &Device,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    tokens: usize,
    dx: &mut Tensor,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => {
            crate::cpu::layernorm::backward_t(x, gamma, mean, rstd, dy, tokens, dx, dgamma, dbeta)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            crate::cuda::layernorm::backward(d, x, gamma, mean, rstd, dy, tokens, dx, dgamma, dbeta)
        }
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => {
            crate::wgpu::layernorm::backward(d, x, gamma, mean, rstd, dy, tokens, dx, dgamma, dbeta)
        }
    }
}

/// Fused in-batch softmax forward: per-row LSE over the domain and the target logit.
pub(crate) fn softmax_forward(
    dev: &Device,
    a: &crate::ops::inbatch_softmax::SoftmaxArgs<'_>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if a.b == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    match dev {
        Device::Cpu => crate::cpu::softmax::forward_t(a),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::softmax::forward(d, a),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::softmax::forward(d, a),
    }
}

/// Query gradients `[B, d]` f32 (after the L2 backward) into `dq`; returns ∂L/∂κ summed over
/// the rows in order.
pub(crate) fn softmax_grad_queries(
    dev: &Device,
    a: &crate::ops::inbatch_softmax::SoftmaxArgs<'_>,
    coef: &[f32],
    lse: &[f32],
    dq: &mut Tensor,
) -> Result<f32> {
    if a.b == 0 {
        return Ok(0.0);
    }
    match dev {
        Device::Cpu => crate::cpu::softmax::grad_queries_t(a, coef, lse, dq),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::softmax::grad_queries(d, a, coef, lse, dq),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::softmax::grad_queries(d, a, coef, lse, dq),
    }
}

/// Candidate gradients `[range.len(), d]` f32 (after the L2 backward) from every row, each
/// column summed over the rows in a fixed order.
pub(crate) fn softmax_grad_columns(
    dev: &Device,
    a: &crate::ops::inbatch_softmax::SoftmaxArgs<'_>,
    coef: &[f32],
    lse: &[f32],
    range: std::ops::Range<usize>,
    dc: &mut Tensor,
) -> Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    match dev {
        Device::Cpu => crate::cpu::softmax::grad_columns_t(a, coef, lse, range, dc),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::softmax::grad_columns(d, a, coef, lse, range, dc),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::softmax::grad_columns(d, a, coef, lse, range, dc),
    }
}

/// y = α·y + β·x (or a fill) in place, element-wise over equal sizes (see `ops::inplace`).
pub(crate) fn axpby(
    dev: &Device,
    x: Option<&Tensor>,
    k: &crate::ops::inplace::Axpby,
    y: &mut Tensor,
) -> Result<()> {
    if y.numel() == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => crate::cpu::inplace::axpby(x, k, y),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::inplace::axpby(d, x, k, y),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::inplace::axpby(d, x, k, y),
    }
}

/// Fused BCE-with-logits: the loss into the scalar `loss`, ∂L/∂logits into `dlogits`.
pub(crate) fn bce(
    dev: &Device,
    a: &crate::ops::bce::BceArgs<'_>,
    dlogits: Option<&mut Tensor>,
    loss: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::bce::bce(a, dlogits, loss),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::bce::bce(d, a, dlogits, loss),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::bce::bce(d, a, dlogits, loss),
    }
}

/// One fused optimizer step over validated slots (see `ops::optim`).
pub(crate) fn optim_step(
    dev: &Device,
    hyper: &crate::ops::optim::OptHyper,
    slots: &mut [crate::ops::optim::Slot<'_>],
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::optim::step(hyper, slots),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::optim::step(d, hyper, slots),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::optim::step(d, hyper, slots),
    }
}

/// A strided box copy between two tensors of one dtype (see `ops::glue::Copy3`).
pub(crate) fn copy3(
    dev: &Device,
    p: &crate::ops::glue::Copy3,
    src: &Tensor,
    dst: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::glue::copy3(p, src, dst),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::glue::copy3(d, p, src, dst),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::glue::copy3(d, p, src, dst),
    }
}

/// out[o, c] = Σ_a x[o, a, c] over contiguous tensors, f32, fixed order (see `ops::glue`).
pub(crate) fn sum_mid(
    dev: &Device,
    p: &crate::ops::glue::SumMid,
    x: &Tensor,
    out: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::glue::sum_mid(p, x, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::glue::sum_mid(d, p, x, out),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::glue::sum_mid(d, p, x, out),
    }
}

/// Pooled embedding bags into `out` `[B, total_dim]` (see `ops::embedding`).
pub(crate) fn embedding_forward(
    dev: &Device,
    p: &crate::ops::embedding::EmbPlan<'_>,
    weights: &Tensor,
    out: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::embedding::forward(p, weights, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::embedding::forward(d, p, weights, out),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::embedding::forward(d, p, weights, out),
    }
}

/// The touched rows' f32 gradients written into the zeroed flat `grad`.
pub(crate) fn embedding_grad(
    dev: &Device,
    p: &crate::ops::embedding::EmbPlan<'_>,
    dy: &Tensor,
    grad: &mut Tensor,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::embedding::grad(p, dy, grad),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::embedding::grad(d, p, dy, grad),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::embedding::grad(d, p, dy, grad),
    }
}

/// The fused backward + optimizer update of the touched rows.
pub(crate) fn embedding_update(
    dev: &Device,
    p: &crate::ops::embedding::EmbPlan<'_>,
    upd: crate::ops::embedding::RowUpdate,
    dy: &Tensor,
    weights: &mut Tensor,
    state: Option<&mut Tensor>,
) -> Result<()> {
    match dev {
        Device::Cpu => crate::cpu::embedding::update(p, upd, dy, weights, state),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::embedding::update(d, p, upd, dy, weights, state),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => crate::wgpu::embedding::update(d, p, upd, dy, weights, state),
    }
}
