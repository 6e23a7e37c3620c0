//! LayerNorm fused with the residual add, on the CPU: one task per row block for the forward
//! and the input gradient; the γ/β gradients are column sums over rows in a fixed order.

use rayon::prelude::*;

/// Forward over rows of width d: y = (x − μ)·rstd·γ + β. γ/β are `[tokens, d]`
/// (row i uses token i mod tokens; tokens = 1 for a shared affine).
pub(crate) fn forward(
    d: usize,
    tokens: usize,
    eps: f32,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / d.max(1);
    let mut y = vec![0f32; x.len()];
    let mut mean = vec![0f32; rows];
    let mut rstd = vec![0f32; rows];
    y.par_chunks_mut(d.max(1))
        .zip(x.par_chunks(d.max(1)))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(i, ((y, s), (mu, rs)))| {
            // Two passes in f32 over an L1-resident row: mean, then centred variance.
            let m = s.iter().sum::<f32>() / d as f32;
            let var = s.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            let off = (i % tokens) * d;
            for c in 0..d {
                y[c] = (s[c] - m) * inv * gamma[off + c] + beta[off + c];
            }
            *mu = m;
            *rs = inv;
        });
    (y, mean, rstd)
}

/// Backward: dx (= the residual's gradient too), dγ, dβ (`[tokens, d]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    d: usize,
    tokens: usize,
    s: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = s.len() / d.max(1);
    let mut dx = vec![0f32; s.len()];
    dx.par_chunks_mut(d.max(1)).enumerate().for_each(|(i, dx)| {
        let off = (i % tokens) * d;
        let (m, inv) = (mean[i], rstd[i]);
        let (row, g) = (&s[i * d..][..d], &dy[i * d..][..d]);
        // dx = rstd·(γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂)).
        let mut a = 0f32;
        let mut b = 0f32;
        for c in 0..d {
            let gd = g[c] * gamma[off + c];
            a += gd;
            b += gd * (row[c] - m) * inv;
        }
        a /= d as f32;
        b /= d as f32;
        for c in 0..d {
            let xh = (row[c] - m) * inv;
            dx[c] = inv * (g[c] * gamma[off + c] - a - xh * b);
        }
    });
    let mut dgamma = vec![0f32; tokens * d];
    let mut dbeta = vec![0f32; tokens * d];
    dgamma
        .par_chunks_mut(d.max(1))
        .zip(dbeta.par_chunks_mut(d.max(1)))
        .enumerate()
        .for_each(|(t, (dg, db))| {
            for i in (t..rows).step_by(tokens) {
                let (m, inv) = (mean[i], rstd[i]);
                for c in 0..d {
                    dg[c] += dy[i * d + c] * (s[i * d + c] - m) * inv;
                    db[c] += dy[i * d + c];
                }
            }
        });
    (dx, dgamma, dbeta)
}

fn store(out: &mut crate::tensor::Tensor, v: &[f32]) -> crate::error::Result<()> {
    *out = crate::tensor::Tensor::from_f32(v, out.shape(), out.dtype(), &out.device())?;
    Ok(())
}

/// Seam entry point of the forward (see `ops::backend::layernorm_forward`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_t(
    x: &crate::tensor::Tensor,
    gamma: &crate::tensor::Tensor,
    beta: &crate::tensor::Tensor,
    tokens: usize,
    eps: f32,
    y: &mut crate::tensor::Tensor,
    mean: &mut crate::tensor::Tensor,
    rstd: &mut crate::tensor::Tensor,
) -> crate::error::Result<()> {
    let d = *x.shape().last().unwrap_or(&1);
    let (yv, m, r) = forward(
        d,
        tokens,
        eps,
        &x.to_f32_vec()?,
        &gamma.to_f32_vec()?,
        &beta.to_f32_vec()?,
    );
    store(y, &yv)?;
    store(mean, &m)?;
    store(rstd, &r)
}

/// Seam entry point of the backward (see `ops::backend::layernorm_backward`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_t(
    x: &crate::tensor::Tensor,
    gamma: &crate::tensor::Tensor,
    mean: &crate::tensor::Tensor,
    rstd: &crate::tensor::Tensor,
    dy: &crate::tensor::Tensor,
    tokens: usize,
    dx: &mut crate::tensor::Tensor,
    dgamma: &mut crate::tensor::Tensor,
    dbeta: &mut crate::tensor::Tensor,
) -> crate::error::Result<()> {
    let d = *x.shape().last().unwrap_or(&1);
    let (gx, gg, gb) = backward(
        d,
        tokens,
        &x.to_f32_vec()?,
        &gamma.to_f32_vec()?,
        &mean.to_f32_vec()?,
        &rstd.to_f32_vec()?,
        &dy.to_f32_vec()?,
    );
    store(dx, &gx)?;
    store(dgamma, &gg)?;
    store(dbeta, &gb)
}
