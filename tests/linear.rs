//! `ops::linear` on every backend present, against the f64 reference: plain and grouped,
//! every dtype and activation, irregular shapes, accumulate, determinism, finite differences,
//! and typed errors for bad input.

mod common;

use common::{
    assert_close, assert_close_scaled, backends, finite_diff, random_tensor, rng, tolerance,
    Backend,
};
use recfuse::cpu::reference::{self, LinearDims};
use recfuse::ops::linear::{self, Linear, LinearForward, LinearGrads};
use recfuse::{Activation, DType, Device, Error, Tensor};

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    /// `Some(G)` for the grouped per-token form.
    groups: Option<usize>,
    inp: usize,
    out: usize,
    dtype: DType,
    out_dtype: Option<DType>,
    act: Activation,
    bias: bool,
    residual: bool,
    /// `Linear::allow_tf32`: f32 products on tf32 tensor cores where the backend has them.
    tf32: bool,
}

impl Case {
    fn new(rows: usize, inp: usize, out: usize, dtype: DType) -> Case {
        Case {
            rows,
            groups: None,
            inp,
            out,
            dtype,
            out_dtype: None,
            act: Activation::None,
            bias: false,
            residual: false,
            tf32: false,
        }
    }
    fn dims(&self) -> LinearDims {
        LinearDims {
            rows: self.rows,
            groups: self.groups.unwrap_or(1),
            inp: self.inp,
            out: self.out,
        }
    }
    fn x_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![self.rows, g, self.inp],
            None => vec![self.rows, self.inp],
        }
    }
    fn w_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![g, self.out, self.inp],
            None => vec![self.out, self.inp],
        }
    }
    fn b_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![g, self.out],
            None => vec![self.out],
        }
    }
    fn y_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![self.rows, g, self.out],
            None => vec![self.rows, self.out],
        }
    }
}

fn check_case(be: &Backend, c: Case) {
    let dev = &be.device;
    let what = format!("{}: {c:?}", be.name);
    let mut r = rng(&what);
    let (x, xv) = random_tensor(&mut r, &c.x_shape(), 1.0, c.dtype, dev);
    let (w, wv) = random_tensor(
        &mut r,
        &c.w_shape(),
        1.0 / (c.inp as f32).sqrt(),
        c.dtype,
        dev,
    );
    let bias = c
        .bias
        .then(|| random_tensor(&mut r, &c.b_shape(), 0.5, c.dtype, dev));
    let out_dtype = c.out_dtype.unwrap_or(c.dtype);
    let residual = c
        .residual
        .then(|| random_tensor(&mut r, &c.y_shape(), 1.0, out_dtype, dev));
    let cfg = Linear {
        activation: c.act,
        out_dtype: c.out_dtype,
        allow_tf32: c.tf32,
    };
    // tf32 keeps 10 mantissa bits of each operand (round half away): every product carries a
    // relative error up to 2^-10, so f32 results get the half-precision budget.
    let tolerance = |dtype: DType, k: usize| {
        if c.tf32 && dtype == DType::F32 {
            tolerance(DType::F16, k) * 2.0
        } else {
            tolerance(dtype, k)
        }
    };

    // Forward into NaN-poisoned outputs: an element the kernel forgets stays NaN and fails.
    let mut fwd = LinearForward {
        y: Tensor::poisoned(&c.y_shape(), out_dtype, dev).unwrap(),
        pre: (c.act != Activation::None)
            .then(|| Tensor::poisoned(&c.y_shape(), out_dtype, dev).unwrap()),
    };
    linear::forward_into(
        &x,
        &w,
        bias.as_ref().map(|b| &b.0),
        residual.as_ref().map(|t| &t.0),
        &cfg,
        &mut fwd,
    )
    .unwrap_or_else(|e| panic!("{what}: forward failed: {e}"));
    let (y_ref, pre_ref) = reference::linear_forward(
        c.dims(),
        &xv,
        &wv,
        bias.as_ref().map(|b| b.1.as_slice()),
        residual.as_ref().map(|t| t.1.as_slice()),
        c.act,
    );
    let tol = tolerance(out_dtype, c.inp);
    // tf32 rounds each operand, so its error follows the size of the products, not of their
    // sum: a y that is a small difference of large terms (x·w cancelled by the bias) is
    // measured against the terms. Exact f32 and 16-bit paths keep the result-relative check.
    let amax = |v: &[f64]| v.iter().fold(0f64, |m, a| m.max(a.abs()));
    let tf32_floor = |a: &[f64], b: &[f64], k: usize| {
        if c.tf32 {
            amax(a) * amax(b) * k as f64
        } else {
            0.0
        }
    };
    assert_close_scaled(
        &format!("{what} y"),
        &fwd.y.to_f64_vec().unwrap(),
        &y_ref,
        tol,
        tf32_floor(&xv, &wv, c.inp),
    );
    let pre_got = match &fwd.pre {
        Some(p) => {
            let v = p.to_f64_vec().unwrap();
            assert_close_scaled(
                &format!("{what} pre"),
                &v,
                &pre_ref,
                tol,
                tf32_floor(&xv, &wv, c.inp),
            );
            v
        }
        None => pre_ref,
    };

    // Backward into poisoned gradients (overwrite), against the reference evaluated at the
    // pre-activation the backend stored, so a 16-bit rounding of pre cannot flip a ReLU.
    let (dy, dyv) = random_tensor(&mut r, &c.y_shape(), 1.0, out_dtype, dev);
    let mut grads = LinearGrads {
        dx: Tensor::poisoned(&c.x_shape(), c.dtype, dev).unwrap(),
        dw: Tensor::poisoned(&c.w_shape(), c.dtype, dev).unwrap(),
        db: c
            .bias
            .then(|| Tensor::poisoned(&c.b_shape(), c.dtype, dev).unwrap()),
    };
    linear::backward_into(&x, &w, fwd.pre.as_ref(), &dy, &cfg, &mut grads, false)
        .unwrap_or_else(|e| panic!("{what}: backward failed: {e}"));
    let (dx_ref, dw_ref, db_ref) =
        reference::linear_backward(c.dims(), &xv, &wv, &pre_got, &dyv, c.act);
    let dx_got = grads.dx.to_f64_vec().unwrap();
    let dw_got = grads.dw.to_f64_vec().unwrap();
    // |dz| ≤ 1.13·|dy| for every activation here, so dy bounds the product terms.
    let dx_floor = 1.13 * tf32_floor(&dyv, &wv, c.out);
    let dw_floor = 1.13 * tf32_floor(&dyv, &xv, c.rows);
    assert_close_scaled(
        &format!("{what} dx"),
        &dx_got,
        &dx_ref,
        tolerance(c.dtype, c.out),
        dx_floor,
    );
    assert_close_scaled(
        &format!("{what} dw"),
        &dw_got,
        &dw_ref,
        tolerance(c.dtype, c.rows),
        dw_floor,
    );
    if let Some(db) = &grads.db {
        let db_got = db.to_f64_vec().unwrap();
        assert_close(
            &format!("{what} db"),
            &db_got,
            &db_ref,
            tolerance(c.dtype, c.rows),
        );
    }

    // Accumulate: dw and db gain a second copy of the gradient, dx is overwritten.
    linear::backward_into(&x, &w, fwd.pre.as_ref(), &dy, &cfg, &mut grads, true).unwrap();
    let twice = |v: &[f64]| v.iter().map(|a| 2.0 * a).collect::<Vec<_>>();
    assert_close_scaled(
        &format!("{what} dx (2nd)"),
        &grads.dx.to_f64_vec().unwrap(),
        &dx_ref,
        tolerance(c.dtype, c.out),
        dx_floor,
    );
    assert_close_scaled(
        &format!("{what} dw accumulated"),
        &grads.dw.to_f64_vec().unwrap(),
        &twice(&dw_ref),
        tolerance(c.dtype, c.rows),
        2.0 * dw_floor,
    );
    if let Some(db) = &grads.db {
        assert_close(
            &format!("{what} db accumulated"),
            &db.to_f64_vec().unwrap(),
            &twice(&db_ref),
            tolerance(c.dtype, c.rows),
        );
    }
}

/// The irregular shapes every backend must get right: 1, primes, tile ± 1.
const SHAPES: [(usize, usize, usize); 5] = [
    (1, 1, 1),
    (7, 37, 129),
    (37, 61, 7),
    (129, 64, 65),
    (65, 129, 63),
];

#[test]
fn plain_every_dtype_irregular_shapes() {
    for be in backends() {
        for dtype in DType::ALL {
            for (rows, inp, out) in SHAPES {
                check_case(
                    &be,
                    Case {
                        bias: true,
                        ..Case::new(rows, inp, out, dtype)
                    },
                );
            }
        }
    }
}

/// Input widths that are multiples of 8 (16-byte rows in bf16/f16), with ragged rows, outputs and
/// k tails: the shapes where the CUDA 16-bit forward may take `gemm_mma_v2` (cp.async 16-byte
/// chunks, zero-filled past the edges; RECFUSE_GEMM_MMA_VERSION=2 selects it).
#[test]
fn aligned_k_ragged_edges_every_dtype() {
    for be in backends() {
        for dtype in DType::ALL {
            for (rows, inp, out) in [(130, 40, 136), (3, 264, 9), (257, 8, 129), (1, 56, 1)] {
                check_case(
                    &be,
                    Case {
                        bias: true,
                        act: Activation::Relu,
                        ..Case::new(rows, inp, out, dtype)
                    },
                );
            }
            check_case(
                &be,
                Case {
                    groups: Some(3),
                    bias: true,
                    ..Case::new(33, 24, 40, dtype)
                },
            );
        }
    }
}

/// TF32 is opt-in; where a backend has no tf32 path the result is plain f32 (within the budget).
#[test]
fn tf32_opt_in_irregular_shapes() {
    for be in backends() {
        for (rows, inp, out) in SHAPES {
            check_case(
                &be,
                Case {
                    bias: true,
                    act: Activation::Gelu,
                    tf32: true,
                    ..Case::new(rows, inp, out, DType::F32)
                },
            );
        }
    }
}

#[test]
fn grouped_every_dtype() {
    for be in backends() {
        for dtype in DType::ALL {
            for (rows, g, inp, out) in [(1, 1, 5, 3), (5, 3, 37, 19), (9, 38, 16, 24)] {
                check_case(
                    &be,
                    Case {
                        groups: Some(g),
                        bias: true,
                        act: Activation::Gelu,
                        ..Case::new(rows, inp, out, dtype)
                    },
                );
            }
        }
    }
}

#[test]
fn every_epilogue() {
    for be in backends() {
        for dtype in DType::ALL {
            for act in [
                Activation::None,
                Activation::Relu,
                Activation::Gelu,
                Activation::Sigmoid,
            ] {
                for (bias, residual) in [(false, false), (true, true)] {
                    check_case(
                        &be,
                        Case {
                            act,
                            bias,
                            residual,
                            ..Case::new(33, 47, 29, dtype)
                        },
                    );
                }
            }
        }
    }
}

#[test]
fn output_cast_16bit_in_f32_out() {
    for be in backends() {
        for dtype in [DType::BF16, DType::F16] {
            check_case(
                &be,
                Case {
                    out_dtype: Some(DType::F32),
                    act: Activation::Sigmoid,
                    bias: true,
                    residual: true,
                    ..Case::new(17, 40, 23, dtype)
                },
            );
        }
    }
}

#[test]
fn large_irregular_f32() {
    for be in backends() {
        check_case(
            &be,
            Case {
                bias: true,
                ..Case::new(1823, 781, 16, DType::F32)
            },
        );
    }
}

#[test]
fn empty_batch_is_legal() {
    for be in backends() {
        let dev = &be.device;
        let x = Tensor::zeros(&[0, 8], DType::F32, dev).unwrap();
        let w = Tensor::full(&[3, 8], 1.0, DType::F32, dev).unwrap();
        let fwd = linear::forward(&x, &w, None, None, &Linear::default()).unwrap();
        assert_eq!(fwd.y.shape(), &[0, 3]);
        let dy = Tensor::zeros(&[0, 3], DType::F32, dev).unwrap();
        let g = linear::backward(&x, &w, None, &dy, &Linear::default(), true).unwrap();
        assert_eq!(
            g.dw.to_vec::<f32>().unwrap(),
            vec![0.0; 24],
            "{}: dW of an empty batch",
            be.name
        );
        assert_eq!(g.db.unwrap().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    }
}

#[test]
fn backward_is_deterministic() {
    for be in backends() {
        let dev = &be.device;
        let mut r = rng("determinism");
        let (x, _) = random_tensor(&mut r, &[257, 3, 33], 1.0, DType::F32, dev);
        let (w, _) = random_tensor(&mut r, &[3, 17, 33], 0.2, DType::F32, dev);
        let (dy, _) = random_tensor(&mut r, &[257, 3, 17], 1.0, DType::F32, dev);
        let cfg = Linear::default();
        let a = linear::backward(&x, &w, None, &dy, &cfg, true).unwrap();
        let b = linear::backward(&x, &w, None, &dy, &cfg, true).unwrap();
        assert_eq!(
            a.dw.to_bytes().unwrap(),
            b.dw.to_bytes().unwrap(),
            "{}: dW bits",
            be.name
        );
        assert_eq!(
            a.db.unwrap().to_bytes().unwrap(),
            b.db.unwrap().to_bytes().unwrap(),
            "{}: db bits",
            be.name
        );
        assert_eq!(
            a.dx.to_bytes().unwrap(),
            b.dx.to_bytes().unwrap(),
            "{}: dX bits",
            be.name
        );
    }
}

/// The reference backward itself against central differences of the reference forward, and
/// the f32 CPU backend against the same differences (an oracle independent of any backward).
#[test]
fn gradients_match_finite_differences() {
    let d = LinearDims {
        rows: 4,
        groups: 2,
        inp: 5,
        out: 3,
    };
    let mut r = rng("finite differences");
    let n = |s: &[usize]| s.iter().product::<usize>();
    let xv: Vec<f64> = common::uniform(&mut r, n(&[4, 2, 5]), 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let wv: Vec<f64> = common::uniform(&mut r, n(&[2, 3, 5]), 0.7)
        .into_iter()
        .map(f64::from)
        .collect();
    let bv: Vec<f64> = common::uniform(&mut r, 6, 0.5)
        .into_iter()
        .map(f64::from)
        .collect();
    let gv: Vec<f64> = common::uniform(&mut r, 24, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    for act in [Activation::Gelu, Activation::Sigmoid, Activation::None] {
        // loss = Σ g ⊙ y, so ∂loss/∂y = g.
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let (y, _) = reference::linear_forward(d, x, w, Some(b), None, act);
            y.iter().zip(&gv).map(|(a, g)| a * g).sum::<f64>()
        };
        let (_, pre) = reference::linear_forward(d, &xv, &wv, Some(&bv), None, act);
        let (dx, dw, db) = reference::linear_backward(d, &xv, &wv, &pre, &gv, act);
        let h = 1e-5;
        assert_close(
            "ref dx vs fd",
            &dx,
            &finite_diff(&xv, h, |x| loss(x, &wv, &bv)),
            1e-7,
        );
        assert_close(
            "ref dw vs fd",
            &dw,
            &finite_diff(&wv, h, |w| loss(&xv, w, &bv)),
            1e-7,
        );
        assert_close(
            "ref db vs fd",
            &db,
            &finite_diff(&bv, h, |b| loss(&xv, &wv, b)),
            1e-7,
        );

        // Every backend in f32 against the finite differences.
        for be in backends() {
            let dev = &be.device;
            let up = |v: &[f64], s: &[usize]| {
                let f: Vec<f32> = v.iter().map(|&a| a as f32).collect();
                Tensor::from_f32(&f, s, DType::F32, dev).unwrap()
            };
            let (x, w, b, g) = (
                up(&xv, &[4, 2, 5]),
                up(&wv, &[2, 3, 5]),
                up(&bv, &[2, 3]),
                up(&gv, &[4, 2, 3]),
            );
            let cfg = Linear {
                activation: act,
                ..Default::default()
            };
            let fwd = linear::forward(&x, &w, Some(&b), None, &cfg).unwrap();
            let grads = linear::backward(&x, &w, fwd.pre.as_ref(), &g, &cfg, true).unwrap();
            let fd_w = finite_diff(&wv, h, |w| loss(&xv, w, &bv));
            assert_close(
                &format!("{} dw vs fd", be.name),
                &grads.dw.to_f64_vec().unwrap(),
                &fd_w,
                1e-5,
            );
            let fd_x = finite_diff(&xv, h, |x| loss(x, &wv, &bv));
            assert_close(
                &format!("{} dx vs fd", be.name),
                &grads.dx.to_f64_vec().unwrap(),
                &fd_x,
                1e-5,
            );
        }
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    for be in backends() {
        let dev = &be.device;
        let f = |s: &[usize], dt: DType| Tensor::zeros(s, dt, dev).unwrap();
        let cfg = Linear::default();
        let x = f(&[4, 8], DType::F32);
        let w = f(&[3, 8], DType::F32);

        let e = linear::forward(&f(&[4, 7], DType::F32), &w, None, None, &cfg).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
        let e = linear::forward(&x, &f(&[1, 3, 8, 1], DType::F32), None, None, &cfg).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "w", .. }), "{e}");
        let e = linear::forward(&x, &f(&[3, 8], DType::BF16), None, None, &cfg).unwrap_err();
        assert!(matches!(e, Error::DType { arg: "w", .. }), "{e}");
        let e = linear::forward(&x, &w, Some(&f(&[4], DType::F32)), None, &cfg).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "b", .. }), "{e}");
        let e = linear::forward(&x, &w, None, Some(&f(&[4, 4], DType::F32)), &cfg).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Shape {
                    arg: "residual",
                    ..
                }
            ),
            "{e}"
        );
        // Grouped: x's token axis must match w's group axis.
        let e = linear::forward(
            &f(&[2, 5, 8], DType::F32),
            &f(&[4, 3, 8], DType::F32),
            None,
            None,
            &cfg,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
        // GELU backward without the saved pre-activation.
        let gelu = Linear {
            activation: Activation::Gelu,
            ..Default::default()
        };
        let e = linear::backward(&x, &w, None, &f(&[4, 3], DType::F32), &gelu, false).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "pre", .. }),
            "{e}"
        );
        let e = linear::backward(&x, &w, None, &f(&[4, 4], DType::F32), &cfg, false).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "dy", .. }), "{e}");
        // Mixed devices.
        if be.name != "cpu" {
            let wc = Tensor::zeros(&[3, 8], DType::F32, &Device::cpu()).unwrap();
            let e = linear::forward(&x, &wc, None, None, &cfg).unwrap_err();
            assert!(matches!(e, Error::DeviceMismatch { arg: "w", .. }), "{e}");
        }
    }
    // Bad tensor construction.
    let e = Tensor::from_f32(&[1.0, 2.0], &[3], DType::F32, &Device::cpu()).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "data", .. }), "{e}");
    let t = Tensor::zeros(&[2], DType::BF16, &Device::cpu()).unwrap();
    assert!(matches!(
        t.to_vec::<f32>().unwrap_err(),
        Error::DType { .. }
    ));
    assert!(matches!(
        Device::from_name("tpu").unwrap_err(),
        Error::InvalidArgument { .. }
    ));
}

/// `Tensor::zeros` allocates zeroed memory on the device (no host copy): check it really is
/// zero on every backend, for every dtype and an odd byte count.
#[test]
fn zeros_are_zero_on_every_backend() {
    for be in backends() {
        for dtype in DType::ALL {
            for _ in 0..3 {
                let t = Tensor::zeros(&[7, 13], dtype, &be.device).unwrap();
                assert!(
                    t.to_f32_vec().unwrap().iter().all(|&v| v == 0.0),
                    "{} {dtype}",
                    be.name
                );
            }
        }
    }
}

/// NaN in x or in the bias reaches every output it feeds, through every activation (ReLU used to
/// map it to 0, as `max(z, 0)` does) and every dtype; everything else stays finite.
#[test]
fn nan_propagates_through_every_epilogue() {
    for be in backends() {
        let dev = &be.device;
        for dtype in [DType::F32, DType::BF16] {
            for act in [
                Activation::None,
                Activation::Relu,
                Activation::Gelu,
                Activation::Sigmoid,
            ] {
                let what = format!("{} {dtype:?} {act:?}", be.name);
                let mut r = rng(&what);
                let (rows, inp, out) = (5, 12, 7);
                let mut xv = common::uniform(&mut r, rows * inp, 1.0);
                xv[2 * inp + 3] = f32::NAN;
                let mut bv = common::uniform(&mut r, out, 1.0);
                bv[4] = f32::NAN;
                let wv = common::uniform(&mut r, out * inp, 1.0);
                let x = Tensor::from_f32(&xv, &[rows, inp], dtype, dev).unwrap();
                let w = Tensor::from_f32(&wv, &[out, inp], dtype, dev).unwrap();
                let b = Tensor::from_f32(&bv, &[out], dtype, dev).unwrap();
                let cfg = Linear {
                    activation: act,
                    ..Default::default()
                };
                let y = linear::forward(&x, &w, Some(&b), None, &cfg)
                    .unwrap()
                    .y
                    .to_f64_vec()
                    .unwrap();
                for i in 0..rows {
                    for j in 0..out {
                        let v = y[i * out + j];
                        assert_eq!(v.is_nan(), i == 2 || j == 4, "{what}: y[{i}, {j}] = {v}");
                    }
                }
            }
        }
    }
}
