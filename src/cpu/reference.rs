//! The f64 oracle. Naive loops, no blocking, no threads: slow and obviously right. Every test
//! compares a backend against these functions on the values the backend actually stored
//! (inputs are rounded to their dtype first, then widened exactly to f64).

use crate::ops::gemm::{erf_f64, Activation};

/// Activation in f64.
pub fn act(act: Activation, z: f64) -> f64 {
    match act {
        Activation::None => z,
        Activation::Relu => z.max(0.0),
        Activation::Gelu => 0.5 * z * (1.0 + erf_f64(z / std::f64::consts::SQRT_2)),
        Activation::Sigmoid => 1.0 / (1.0 + (-z).exp()),
    }
}

/// d act / dz in f64.
pub fn act_grad(act: Activation, z: f64) -> f64 {
    match act {
        Activation::None => 1.0,
        Activation::Relu => {
            if z > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + erf_f64(z / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + z * pdf
        }
        Activation::Sigmoid => {
            let s = 1.0 / (1.0 + (-z).exp());
            s * (1.0 - s)
        }
    }
}

/// Shapes of a (possibly grouped) linear layer: `x: [rows, groups, inp]`,
/// `w: [groups, out, inp]`, `b: [groups, out]`, `y: [rows, groups, out]`. A plain layer is
/// `groups = 1`.
#[derive(Clone, Copy, Debug)]
pub struct LinearDims {
    pub rows: usize,
    pub groups: usize,
    pub inp: usize,
    pub out: usize,
}

/// Forward: returns `(y, pre)` with `pre = x·Wᵀ + b` and `y = act(pre) + residual`.
pub fn linear_forward(
    d: LinearDims,
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    residual: Option<&[f64]>,
    activation: Activation,
) -> (Vec<f64>, Vec<f64>) {
    let LinearDims {
        rows,
        groups,
        inp,
        out,
    } = d;
    let mut y = vec![0.0; rows * groups * out];
    let mut pre = vec![0.0; rows * groups * out];
    for r in 0..rows {
        for g in 0..groups {
            for o in 0..out {
                let mut s = 0.0;
                for i in 0..inp {
                    s += x[(r * groups + g) * inp + i] * w[(g * out + o) * inp + i];
                }
                if let Some(b) = b {
                    s += b[g * out + o];
                }
                let idx = (r * groups + g) * out + o;
                pre[idx] = s;
                y[idx] = act(activation, s) + residual.map_or(0.0, |res| res[idx]);
            }
        }
    }
    (y, pre)
}

/// Backward of `linear_forward` given `dy`: returns `(dx, dw, db)`. The residual's gradient is
/// `dy` itself.
pub fn linear_backward(
    d: LinearDims,
    x: &[f64],
    w: &[f64],
    pre: &[f64],
    dy: &[f64],
    activation: Activation,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let LinearDims {
        rows,
        groups,
        inp,
        out,
    } = d;
    let dz: Vec<f64> = dy
        .iter()
        .zip(pre)
        .map(|(&g, &z)| g * act_grad(activation, z))
        .collect();
    let mut dx = vec![0.0; rows * groups * inp];
    let mut dw = vec![0.0; groups * out * inp];
    let mut db = vec![0.0; groups * out];
    for r in 0..rows {
        for g in 0..groups {
            for o in 0..out {
                let gz = dz[(r * groups + g) * out + o];
                db[g * out + o] += gz;
                for i in 0..inp {
                    dx[(r * groups + g) * inp + i] += gz * w[(g * out + o) * inp + i];
                    dw[(g * out + o) * inp + i] += gz * x[(r * groups + g) * inp + i];
                }
            }
        }
    }
    (dx, dw, db)
}
