//! LayerNorm + residual against the f64 reference; gradients against finite differences of the
//! reference; shared and per-token affine; every dtype.

mod common;

use common::{assert_close, backends, finite_diff, random_tensor, rng};
use recfuse::cpu::reference;
use recfuse::ops::layernorm::LayerNorm;
use recfuse::DType;

fn check(
    be: &common::Backend,
    rows: usize,
    tokens: usize,
    d: usize,
    per_token: bool,
    dtype: DType,
) -> recfuse::Result<()> {
    let dev = &be.device;
    let what = format!(
        "{} rows={rows} T={tokens} d={d} per_token={per_token} {dtype}",
        be.name
    );
    let mut r = rng(&what);
    let xs = [rows, tokens, d];
    let gs: Vec<usize> = if per_token { vec![tokens, d] } else { vec![d] };
    let (x, xv) = random_tensor(&mut r, &xs, 2.0, dtype, dev);
    let (res, rv) = random_tensor(&mut r, &xs, 1.0, dtype, dev);
    let (g, gv) = random_tensor(&mut r, &gs, 1.0, dtype, dev);
    let (b, bv) = random_tensor(&mut r, &gs, 1.0, dtype, dev);
    let ln = LayerNorm::default();
    let fwd = ln.forward(&x, Some(&res), &g, &b)?;
    let nrows = rows * tokens;
    let want = reference::layernorm_forward(nrows, d, &xv, Some(&rv), &gv, &bv, tokens, 1e-5);
    assert_close(
        &format!("{what} y"),
        &fwd.y.to_f64_vec()?,
        &want,
        common::tolerance(dtype, d) * 4.0,
    );
    let (dy, dyv) = random_tensor(&mut r, &xs, 1.0, dtype, dev);
    let grads = ln.backward(&g, &b, &fwd, &dy)?;
    // Oracle: central differences of the f64 reference forward (small shapes only).
    let loss = |x: &[f64], g: &[f64], b: &[f64]| {
        reference::layernorm_forward(nrows, d, x, Some(&rv), g, b, tokens, 1e-5)
            .iter()
            .zip(&dyv)
            .map(|(a, c)| a * c)
            .sum::<f64>()
    };
    let h = 1e-5;
    let tol = if dtype == DType::F32 {
        1e-4
    } else {
        common::tolerance(dtype, d) * 4.0
    };
    assert_close(
        &format!("{what} dx"),
        &grads.dx.to_f64_vec()?,
        &finite_diff(&xv, h, |x| loss(x, &gv, &bv)),
        tol,
    );
    assert_close(
        &format!("{what} dγ"),
        &grads.dgamma.to_f64_vec()?,
        &finite_diff(&gv, h, |g| loss(&xv, g, &bv)),
        tol,
    );
    assert_close(
        &format!("{what} dβ"),
        &grads.dbeta.to_f64_vec()?,
        &finite_diff(&bv, h, |b| loss(&xv, &gv, b)),
        tol,
    );
    Ok(())
}

#[test]
fn shared_and_per_token_every_dtype() {
    for be in backends() {
        'dt: for dtype in DType::ALL {
            for (rows, tokens, d, per_token) in
                [(3, 5, 7, false), (2, 4, 16, true), (1, 1, 1, false)]
            {
                if !common::supported(
                    &be,
                    "layernorm",
                    check(&be, rows, tokens, d, per_token, dtype),
                ) {
                    break 'dt;
                }
            }
        }
    }
}

/// Enough rows that the parameter gradients are reduced in several splits (a partial pass and a
/// finishing pass on the GPUs): dγ, dβ and dx against the analytic f64 gradients.
#[test]
fn parameter_gradients_over_many_rows() {
    for be in backends() {
        'dt: for dtype in [DType::F32, DType::BF16] {
            for (rows, tokens, d, per_token) in [(150, 4, 24, false), (300, 2, 9, true)] {
                let res = many_rows(&be, rows, tokens, d, per_token, dtype);
                if !common::supported(&be, "layernorm", res) {
                    break 'dt;
                }
            }
        }
    }
}

fn many_rows(
    be: &common::Backend,
    rows: usize,
    tokens: usize,
    d: usize,
    per_token: bool,
    dtype: DType,
) -> recfuse::Result<()> {
    let dev = &be.device;
    let what = format!(
        "{} many rows={rows} T={tokens} d={d} per_token={per_token} {dtype}",
        be.name
    );
    let mut r = rng(&what);
    let xs = [rows, tokens, d];
    let gs: Vec<usize> = if per_token { vec![tokens, d] } else { vec![d] };
    let (x, xv) = random_tensor(&mut r, &xs, 2.0, dtype, dev);
    let (g, gv) = random_tensor(&mut r, &gs, 1.0, dtype, dev);
    let (b, _) = random_tensor(&mut r, &gs, 1.0, dtype, dev);
    let (dy, dyv) = random_tensor(&mut r, &xs, 1.0, dtype, dev);
    let ln = LayerNorm::default();
    let fwd = ln.forward(&x, None, &g, &b)?;
    let grads = ln.backward(&g, &b, &fwd, &dy)?;
    // x̂ from the reference with γ = 1, β = 0; then the textbook gradients in f64.
    let n = rows * tokens;
    let ones = vec![1.0; gv.len()];
    let zeros = vec![0.0; gv.len()];
    let xhat = reference::layernorm_forward(n, d, &xv, None, &ones, &zeros, tokens, 1e-5);
    let mut dgamma = vec![0.0; gv.len()];
    let mut dbeta = vec![0.0; gv.len()];
    let mut dx = vec![0.0; xv.len()];
    for row in 0..n {
        let p0 = if per_token { (row % tokens) * d } else { 0 };
        let xr = &xv[row * d..(row + 1) * d];
        let mean = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        let (mut m1, mut m2) = (0.0, 0.0);
        for j in 0..d {
            let gdy = gv[p0 + j] * dyv[row * d + j];
            m1 += gdy / d as f64;
            m2 += gdy * xhat[row * d + j] / d as f64;
            dgamma[p0 + j] += dyv[row * d + j] * xhat[row * d + j];
            dbeta[p0 + j] += dyv[row * d + j];
        }
        for j in 0..d {
            let gdy = gv[p0 + j] * dyv[row * d + j];
            dx[row * d + j] = rstd * (gdy - m1 - xhat[row * d + j] * m2);
        }
    }
    let tol = common::tolerance(dtype, d) * 4.0;
    assert_close(&format!("{what} dx"), &grads.dx.to_f64_vec()?, &dx, tol);
    let tol_sum = common::tolerance(dtype, n) * 4.0;
    assert_close(
        &format!("{what} dγ"),
        &grads.dgamma.to_f64_vec()?,
        &dgamma,
        tol_sum,
    );
    assert_close(
        &format!("{what} dβ"),
        &grads.dbeta.to_f64_vec()?,
        &dbeta,
        tol_sum,
    );
    Ok(())
}
