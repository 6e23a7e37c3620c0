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
