//! `linear`: `y = act(x·Wᵀ + b) + residual`, plain or grouped per token, forward and backward.
//!
//! * Plain: `x: [..., in]`, `w: [out, in]`, `b: [out]` → `y: [..., out]`.
//! * Grouped (one weight set per token, the per-feature projections of heterogeneous
//!   attention): `x: [..., G, in]`, `w: [G, out, in]`, `b: [G, out]` → `y: [..., G, out]`.
//!
//! Weights use PyTorch's `nn.Linear` layout `[out, in]`, so parameters port without transposes.
//! Accumulation is f32 for every storage dtype; the output dtype defaults to `x`'s.
//!
//! ```
//! use recfuse::{ops::linear::{self, Linear}, Activation, DType, Device, Tensor};
//! let dev = Device::cpu();
//! let x = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2], DType::F32, &dev)?;
//! let w = Tensor::from_f32(&[1.0, 0.0, 0.0, -1.0, 1.0, 1.0], &[3, 2], DType::F32, &dev)?;
//! let b = Tensor::from_f32(&[0.5, 0.5, 0.5], &[3], DType::F32, &dev)?;
//! let cfg = Linear { activation: Activation::Relu, ..Default::default() };
//! let fwd = linear::forward(&x, &w, Some(&b), None, &cfg)?;
//! assert_eq!(fwd.y.to_vec::<f32>()?, vec![1.5, 0.0, 3.5, 3.5, 0.0, 7.5]);
//!
//! let dy = Tensor::full(&[2, 3], 1.0, DType::F32, &dev)?;
//! let g = linear::backward(&x, &w, fwd.pre.as_ref(), &dy, &cfg, true)?;
//! assert_eq!(g.dw.shape(), &[3, 2]);
//! assert_eq!(g.db.unwrap().to_vec::<f32>()?, vec![2.0, 0.0, 2.0]);
//! # Ok::<(), recfuse::Error>(())
//! ```

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend::{self, same_device};
use crate::ops::gemm::{Activation, Gemm, MatView};
use crate::tensor::Tensor;

const OP: &str = "linear";
const OP_BWD: &str = "linear_backward";

/// Configuration of a linear layer's epilogue.
#[derive(Clone, Debug, Default)]
pub struct Linear {
    /// Activation applied after the bias.
    pub activation: Activation,
    /// Output storage dtype; `None` keeps `x`'s dtype.
    pub out_dtype: Option<DType>,
    /// Allow TF32 tensor cores for f32 inputs on CUDA (10-bit mantissa products). Off by
    /// default so f32 stays f32-accurate; ignored on other backends.
    pub allow_tf32: bool,
}

/// The forward result. `pre` (the pre-activation `x·Wᵀ + b`) is kept whenever the activation
/// is not the identity, because the backward pass needs it.
#[derive(Debug)]
pub struct LinearForward {
    pub y: Tensor,
    pub pre: Option<Tensor>,
}

/// Gradients of a linear layer.
#[derive(Debug)]
pub struct LinearGrads {
    /// Gradient of `x`, shaped like `x`.
    pub dx: Tensor,
    /// Gradient of `w`, shaped like `w`, in `w`'s dtype.
    pub dw: Tensor,
    /// Gradient of `b` (when asked for), shaped `[out]` or `[G, out]`, in `w`'s dtype.
    pub db: Option<Tensor>,
}

/// Validated dimensions of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    rows: usize,
    groups: usize,
    inp: usize,
    out: usize,
    grouped: bool,
}

fn dims(op: &'static str, x: &Tensor, w: &Tensor) -> Result<Dims> {
    let ws = w.shape();
    let xs = x.shape();
    match ws.len() {
        2 => {
            let (out, inp) = (ws[0], ws[1]);
            if xs.is_empty() || xs[xs.len() - 1] != inp {
                return Err(Error::shape(
                    op,
                    "x",
                    format!("[..., {inp}] (w is {ws:?})"),
                    xs,
                ));
            }
            Ok(Dims {
                rows: xs[..xs.len() - 1].iter().product(),
                groups: 1,
                inp,
                out,
                grouped: false,
            })
        }
        3 => {
            let (g, out, inp) = (ws[0], ws[1], ws[2]);
            if xs.len() < 2 || xs[xs.len() - 1] != inp || xs[xs.len() - 2] != g {
                return Err(Error::shape(
                    op,
                    "x",
                    format!("[..., {g}, {inp}] (w is {ws:?})"),
                    xs,
                ));
            }
            Ok(Dims {
                rows: xs[..xs.len() - 2].iter().product(),
                groups: g,
                inp,
                out,
                grouped: true,
            })
        }
        _ => Err(Error::shape(op, "w", "[out, in] or [G, out, in]", ws)),
    }
}

fn out_shape(x: &Tensor, last: usize) -> Vec<usize> {
    let mut s = x.shape().to_vec();
    let n = s.len();
    s[n - 1] = last;
    s
}

fn bias_shape(d: &Dims) -> Vec<usize> {
    if d.grouped {
        vec![d.groups, d.out]
    } else {
        vec![d.out]
    }
}

fn check_bias(
    op: &'static str,
    dev: &Device,
    d: &Dims,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<()> {
    if let Some(b) = b {
        same_device(op, "b", dev, b)?;
        let want = bias_shape(d);
        if b.shape() != want.as_slice() {
            return Err(Error::shape(op, "b", format!("{want:?}"), b.shape()));
        }
        if b.dtype() != w.dtype() {
            return Err(Error::DType {
                op,
                arg: "b",
                expected: w.dtype().to_string(),
                actual: b.dtype(),
            });
        }
    }
    Ok(())
}

/// `x·Wᵀ` on the GEMM core: A(m, k) = x[m, g, k], B(k, n) = W[g, n, k], C(m, n) = y[m, g, n].
fn forward_gemm<'a>(
    d: &Dims,
    x: &'a Tensor,
    w: &'a Tensor,
    b: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
    act: Activation,
) -> Gemm<'a> {
    let Dims {
        rows,
        groups,
        inp,
        out,
        ..
    } = *d;
    Gemm {
        m: rows,
        n: out,
        k: inp,
        batch: groups,
        alpha: 1.0,
        a: x,
        a_view: MatView::new(0, groups * inp, 1, inp),
        b: w,
        b_view: MatView::new(0, 1, inp, out * inp),
        bias: b.map(|t| (t, out)),
        bias_offset: 0,
        act,
        mul: None,
        residual,
        gated: false,
        accumulate: false,
        c_view: MatView::new(0, groups * out, 1, out),
        pre_view: MatView::new(0, groups * out, 1, out),
        allow_tf32: false,
    }
}

/// Forward pass. `residual` (shaped like `y`, in the output dtype) is added after the
/// activation.
pub fn forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    cfg: &Linear,
) -> Result<LinearForward> {
    let dev = x.device();
    let d = dims(OP, x, w)?;
    let out_dtype = cfg.out_dtype.unwrap_or(x.dtype());
    let yshape = out_shape(x, d.out);
    let mut out = LinearForward {
        y: Tensor::zeros(&yshape, out_dtype, &dev)?,
        pre: if cfg.activation != Activation::None {
            Some(Tensor::zeros(&yshape, out_dtype, &dev)?)
        } else {
            None
        },
    };
    forward_into(x, w, b, residual, cfg, &mut out)?;
    Ok(out)
}

/// Forward pass into preallocated outputs (every element of `out.y`, and of `out.pre` when
/// present, is overwritten). `out.pre` must be present when the activation is not the identity
/// and `backward` will be called; it may be omitted for inference.
pub fn forward_into(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    cfg: &Linear,
    out: &mut LinearForward,
) -> Result<()> {
    let dev = x.device();
    same_device(OP, "w", &dev, w)?;
    let d = dims(OP, x, w)?;
    if x.dtype() != w.dtype() {
        return Err(Error::DType {
            op: OP,
            arg: "w",
            expected: x.dtype().to_string(),
            actual: w.dtype(),
        });
    }
    check_bias(OP, &dev, &d, w, b)?;
    let out_dtype = cfg.out_dtype.unwrap_or(x.dtype());
    let yshape = out_shape(x, d.out);
    let check_out = |arg: &'static str, t: &Tensor| -> Result<()> {
        same_device(OP, arg, &dev, t)?;
        if t.shape() != yshape.as_slice() {
            return Err(Error::shape(OP, arg, format!("{yshape:?}"), t.shape()));
        }
        if t.dtype() != out_dtype {
            return Err(Error::DType {
                op: OP,
                arg,
                expected: out_dtype.to_string(),
                actual: t.dtype(),
            });
        }
        Ok(())
    };
    if let Some(r) = residual {
        check_out("residual", r)?;
    }
    check_out("out.y", &out.y)?;
    if let Some(p) = &out.pre {
        check_out("out.pre", p)?;
    }
    let mut g = forward_gemm(&d, x, w, b, residual, cfg.activation);
    g.allow_tf32 = cfg.allow_tf32;
    g.check(OP, &out.y, out.pre.as_ref())?;
    backend::gemm(&dev, &g, &mut out.y, out.pre.as_mut())
}

/// Backward pass: new gradient tensors for `x`, `w` and (if `with_bias`) `b`.
/// `pre` is `LinearForward::pre` (required when the activation is not the identity).
pub fn backward(
    x: &Tensor,
    w: &Tensor,
    pre: Option<&Tensor>,
    dy: &Tensor,
    cfg: &Linear,
    with_bias: bool,
) -> Result<LinearGrads> {
    let dev = x.device();
    let d = dims(OP_BWD, x, w)?;
    let mut grads = LinearGrads {
        dx: Tensor::zeros(x.shape(), x.dtype(), &dev)?,
        dw: Tensor::zeros(w.shape(), w.dtype(), &dev)?,
        db: if with_bias {
            Some(Tensor::zeros(&bias_shape(&d), w.dtype(), &dev)?)
        } else {
            None
        },
    };
    backward_into(x, w, pre, dy, cfg, &mut grads, false)?;
    Ok(grads)
}

/// Backward pass into existing gradient buffers: overwrites `dx`, and overwrites or (with
/// `accumulate`) adds into `dw` and `db` — the usual gradient-accumulation contract. The
/// weight and bias reductions over the batch are deterministic (identical bits every run).
pub fn backward_into(
    x: &Tensor,
    w: &Tensor,
    pre: Option<&Tensor>,
    dy: &Tensor,
    cfg: &Linear,
    grads: &mut LinearGrads,
    accumulate: bool,
) -> Result<()> {
    let dev = x.device();
    same_device(OP_BWD, "w", &dev, w)?;
    same_device(OP_BWD, "dy", &dev, dy)?;
    let d = dims(OP_BWD, x, w)?;
    if x.dtype() != w.dtype() {
        return Err(Error::DType {
            op: OP_BWD,
            arg: "w",
            expected: x.dtype().to_string(),
            actual: w.dtype(),
        });
    }
    let yshape = out_shape(x, d.out);
    if dy.shape() != yshape.as_slice() {
        return Err(Error::shape(
            OP_BWD,
            "dy",
            format!("{yshape:?}"),
            dy.shape(),
        ));
    }
    let expect = |arg: &'static str, t: &Tensor, shape: &[usize]| -> Result<()> {
        same_device(OP_BWD, arg, &dev, t)?;
        if t.shape() != shape {
            return Err(Error::shape(OP_BWD, arg, format!("{shape:?}"), t.shape()));
        }
        Ok(())
    };
    expect("grads.dx", &grads.dx, x.shape())?;
    expect("grads.dw", &grads.dw, w.shape())?;
    if let Some(db) = &grads.db {
        expect("grads.db", db, &bias_shape(&d))?;
    }
    let pre = match (cfg.activation, pre) {
        (Activation::None, _) => None,
        (_, Some(p)) => {
            expect("pre", p, &yshape)?;
            Some(p)
        }
        (a, None) => {
            return Err(Error::invalid(
                OP_BWD,
                "pre",
                format!("activation {} needs the saved pre-activation", a.name()),
            ))
        }
    };
    let Dims {
        rows,
        groups,
        inp,
        out,
        ..
    } = d;

    // dZ = dY ⊙ act'(pre), stored in dY's dtype (as autograd would).
    let dz_owned;
    let dz: &Tensor = if cfg.activation == Activation::None {
        dy
    } else {
        let mut t = Tensor::zeros(dy.shape(), dy.dtype(), &dev)?;
        backend::act_backward(&dev, dy, pre, cfg.activation, &mut t)?;
        dz_owned = t;
        &dz_owned
    };

    // dX[m, g, :] = dZ[m, g, :]·W[g]: A(m, k=o) = dZ, B(k=o, n=i) = W[g, o, i].
    let gx = Gemm {
        m: rows,
        n: inp,
        k: out,
        batch: groups,
        alpha: 1.0,
        a: dz,
        a_view: MatView::new(0, groups * out, 1, out),
        b: w,
        b_view: MatView::new(0, inp, 1, out * inp),
        bias: None,
        bias_offset: 0,
        act: Activation::None,
        mul: None,
        residual: None,
        gated: false,
        accumulate: false,
        c_view: MatView::new(0, groups * inp, 1, inp),
        pre_view: MatView::new(0, groups * inp, 1, inp),
        allow_tf32: cfg.allow_tf32,
    };
    gx.check(OP_BWD, &grads.dx, None)?;
    backend::gemm(&dev, &gx, &mut grads.dx, None)?;

    // dW[g] = dZ[:, g, :]ᵀ·X[:, g, :]: the batch is the reduction axis k, so each output element
    // is one thread's ordered sum — deterministic without atomics.
    let gw = Gemm {
        m: out,
        n: inp,
        k: rows,
        batch: groups,
        alpha: 1.0,
        a: dz,
        a_view: MatView::new(0, 1, groups * out, out),
        b: x,
        b_view: MatView::new(0, groups * inp, 1, inp),
        bias: None,
        bias_offset: 0,
        act: Activation::None,
        mul: None,
        residual: None,
        gated: false,
        accumulate,
        c_view: MatView::new(0, inp, 1, out * inp),
        pre_view: MatView::new(0, inp, 1, out * inp),
        allow_tf32: cfg.allow_tf32,
    };
    gw.check(OP_BWD, &grads.dw, None)?;
    backend::gemm(&dev, &gw, &mut grads.dw, None)?;

    if let Some(db) = grads.db.as_mut() {
        backend::col_sum(&dev, dz, rows, groups * out, db, accumulate, false)?;
    }
    Ok(())
}

/// A linear layer's parameters in `nn.Linear` layout: `weight: [out, in]` (or `[G, out, in]`
/// grouped), `bias: [out]` (or `[G, out]`). Gradients use the same type
/// ([`Parameters::zeros_like`]), so an optimizer zips the two by name.
///
/// ```
/// use recfuse::ops::linear::{self, Linear, LinearParams};
/// use recfuse::{DType, Device, Tensor};
/// let dev = Device::cpu();
/// let p = LinearParams::init(4, 3, true, DType::F32, 42, &dev)?;
/// // nn.Linear's default: U(−1/√in, 1/√in) for the weight and the bias.
/// assert!(p.weight.to_vec::<f32>()?.iter().all(|w| w.abs() <= 0.5));
/// let x = Tensor::full(&[2, 4], 1.0, DType::F32, &dev)?;
/// let y = linear::forward(&x, &p.weight, p.bias.as_ref(), None, &Linear::default())?.y;
/// assert_eq!(y.shape(), &[2, 3]);
/// # Ok::<(), recfuse::Error>(())
/// ```
#[derive(Debug)]
pub struct LinearParams {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl LinearParams {
    /// `nn.Linear`'s default initialisation (Kaiming-uniform with a = √5, i.e.
    /// `U(−1/√in, 1/√in)`, for the weight and the bias), from `seed`.
    pub fn init(
        inp: usize,
        out: usize,
        bias: bool,
        dtype: DType,
        seed: u64,
        device: &Device,
    ) -> Result<LinearParams> {
        Self::init_shaped(&[], inp, out, bias, dtype, seed, device)
    }

    /// As [`init`](Self::init) for a grouped layer: one `[out, in]` weight per group.
    pub fn init_grouped(
        groups: usize,
        inp: usize,
        out: usize,
        bias: bool,
        dtype: DType,
        seed: u64,
        device: &Device,
    ) -> Result<LinearParams> {
        Self::init_shaped(&[groups], inp, out, bias, dtype, seed, device)
    }

    fn init_shaped(
        lead: &[usize],
        inp: usize,
        out: usize,
        bias: bool,
        dtype: DType,
        seed: u64,
        device: &Device,
    ) -> Result<LinearParams> {
        const OP: &str = "LinearParams::init";
        if inp == 0 {
            return Err(Error::invalid(
                OP,
                "inp",
                "must be ≥ 1 (the bound is 1/√in)",
            ));
        }
        let w_shape: Vec<usize> = lead.iter().copied().chain([out, inp]).collect();
        let b_shape: Vec<usize> = lead.iter().copied().chain([out]).collect();
        let bound = 1.0 / (inp as f32).sqrt();
        let mut rng = crate::ops::init::Uniform::new(seed, bound);
        let weight = rng.tensor(OP, &w_shape, dtype, device)?;
        let bias = if bias {
            Some(rng.tensor(OP, &b_shape, dtype, device)?)
        } else {
            None
        };
        Ok(LinearParams { weight, bias })
    }
}

impl crate::params::Parameters for LinearParams {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = vec![("weight".to_string(), &self.weight)];
        v.extend(self.bias.iter().map(|b| ("bias".to_string(), b)));
        v
    }
    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = vec![("weight".to_string(), &mut self.weight)];
        v.extend(self.bias.iter_mut().map(|b| ("bias".to_string(), b)));
        v
    }
    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(LinearParams {
            weight: f("weight", &self.weight)?,
            bias: self.bias.as_ref().map(|b| f("bias", b)).transpose()?,
        })
    }
}
