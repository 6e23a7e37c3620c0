//! Fused multi-tensor optimizers whose state lives on the device: SGD (momentum, dampening,
//! weight decay, Nesterov), Adam and AdamW (exactly `torch.optim.Adam` / `AdamW` with
//! `amsgrad=False, maximize=False`), and row-wise Adagrad (FBGEMM's `rowwise_adagrad`).
//!
//! One call updates a whole list of parameters. On CUDA that is one kernel launch per 32
//! tensors: the (param, grad, state…) addresses and sizes travel *by value* in the kernel's
//! parameter block (as PyTorch's `multi_tensor_apply` does), so nothing is uploaded per step;
//! each block finds its tensor from a table of block offsets. On wgpu, which has no device
//! pointers, it is one dispatch per tensor, all recorded into one command buffer and submitted
//! once (same per-thread work split as the CUDA kernel). On the CPU, one parallel pass per
//! tensor. Either way no tensor data crosses to the host, and the result is deterministic.
//!
//! Parameters may be f32, bf16 or f16 with gradients of any dtype; optimizer state (and the
//! optional f32 `master` copy of a 16-bit parameter, which is then the value updated, the
//! parameter receiving its rounding) is f32. The step count is the caller's host scalar
//! (`step` = 1 on the first update), so bias corrections need no device round trip.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend;
use crate::params::{check_aligned, Parameters};
use crate::tensor::Tensor;

/// SGD hyperparameters (`torch.optim.SGD`).
#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub lr: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

impl SgdConfig {
    /// Plain SGD with learning rate `lr` (no momentum, no decay).
    pub fn new(lr: f32) -> Self {
        SgdConfig {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// Adam / AdamW hyperparameters (`torch.optim.Adam`, `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// false: Adam (L2: g += wd·p); true: AdamW (p *= 1 − lr·wd before the update).
    pub decoupled_weight_decay: bool,
}

impl AdamConfig {
    /// PyTorch's Adam defaults: β = (0.9, 0.999), ε = 1e-8, no weight decay.
    pub fn adam(lr: f32) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
        }
    }

    /// PyTorch's AdamW defaults: β = (0.9, 0.999), ε = 1e-8, weight decay 0.01.
    pub fn adamw(lr: f32) -> Self {
        AdamConfig {
            weight_decay: 0.01,
            decoupled_weight_decay: true,
            ..Self::adam(lr)
        }
    }
}

/// Row-wise Adagrad hyperparameters (FBGEMM `EmbOptimType::EXACT_ROWWISE_ADAGRAD`, L2 decay).
#[derive(Clone, Copy, Debug)]
pub struct RowwiseAdagradConfig {
    pub lr: f32,
    pub eps: f32,
    /// L2 weight decay added to the gradient (FBGEMM `WeightDecayMode::L2`); 0 for none.
    pub weight_decay: f32,
}

/// One parameter of an SGD step.
pub struct SgdParam<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    /// f32, the shape of `param`; required when `momentum != 0` (initialised from the gradient
    /// at `step == 1`, as PyTorch's lazily created buffer).
    pub momentum_buffer: Option<&'a mut Tensor>,
    /// Optional f32 master copy of a 16-bit `param`.
    pub master: Option<&'a mut Tensor>,
}

/// One parameter of an Adam/AdamW step.
pub struct AdamParam<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    /// First moment, f32, the shape of `param` (zeros before the first step).
    pub exp_avg: &'a mut Tensor,
    /// Second moment, f32, the shape of `param` (zeros before the first step).
    pub exp_avg_sq: &'a mut Tensor,
    pub master: Option<&'a mut Tensor>,
}

/// One `[rows, dim]` parameter (an embedding table) of a row-wise Adagrad step.
pub struct RowwiseAdagradParam<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    /// `[rows]` f32: the running mean of squared gradients per row (zeros initially).
    pub state: &'a mut Tensor,
    pub master: Option<&'a mut Tensor>,
}

/// Which update a fused launch performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OptKind {
    Sgd,
    Adam,
    RowwiseAdagrad,
}

pub(crate) const F_SGD_MOMENTUM: u32 = 1;
pub(crate) const F_SGD_NESTEROV: u32 = 2;
pub(crate) const F_SGD_FIRST: u32 = 4;
pub(crate) const F_WEIGHT_DECAY: u32 = 8;
pub(crate) const F_ADAM_DECOUPLED: u32 = 16;

/// The host-computed scalars of one step, in the layout every kernel reads (`h[0..8]`):
/// * SGD: lr, momentum, 1 − dampening, wd
/// * Adam: lr/(1 − β1^t), √(1 − β2^t), 1 − β1, β2, 1 − β2, ε, wd, 1 − lr·wd
/// * Adagrad: lr, ε, wd
#[derive(Clone, Copy, Debug)]
pub(crate) struct OptHyper {
    pub kind: OptKind,
    pub h: [f32; 8],
    pub flags: u32,
}

impl OptHyper {
    /// One element of SGD or Adam in f32, in the order every backend computes it; returns
    /// (p, s1, s2). The CUDA and WGSL kernels spell out exactly these operations.
    #[inline]
    pub(crate) fn elem(&self, p: f32, g: f32, s1: f32, s2: f32) -> (f32, f32, f32) {
        let h = &self.h;
        let wd = self.flags & F_WEIGHT_DECAY != 0;
        match self.kind {
            OptKind::Sgd => {
                let mut d = g;
                if wd {
                    d += h[3] * p;
                }
                let mut b = s1;
                if self.flags & F_SGD_MOMENTUM != 0 {
                    b = if self.flags & F_SGD_FIRST != 0 {
                        d
                    } else {
                        h[1] * b + h[2] * d
                    };
                    d = if self.flags & F_SGD_NESTEROV != 0 {
                        d + h[1] * b
                    } else {
                        b
                    };
                }
                (p - h[0] * d, b, s2)
            }
            OptKind::Adam => {
                let mut g = g;
                let mut p = p;
                if self.flags & F_ADAM_DECOUPLED != 0 {
                    if wd {
                        p *= h[7];
                    }
                } else if wd {
                    g += h[6] * p;
                }
                let m = s1 + h[2] * (g - s1);
                let v = s2 * h[3] + h[4] * g * g;
                let denom = v.sqrt() / h[1] + h[5];
                (p - h[0] * (m / denom), m, v)
            }
            OptKind::RowwiseAdagrad => (p, s1, s2),
        }
    }
}

/// One parameter of a fused launch, validated (see the public param structs).
pub(crate) struct Slot<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub s1: Option<&'a mut Tensor>,
    pub s2: Option<&'a mut Tensor>,
    pub master: Option<&'a mut Tensor>,
    /// Rows and row length (row-wise Adagrad: the table's shape; otherwise (numel, 1)).
    pub rows: usize,
    pub dim: usize,
}

fn finite(op: &'static str, arg: &'static str, v: f32, lo: f32, hi: f32) -> Result<()> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            arg,
            format!("{v} is outside [{lo}, {hi}]"),
        ))
    }
}

fn check_state(
    op: &'static str,
    arg: &'static str,
    dev: &crate::Device,
    t: &Tensor,
    shape: &[usize],
) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(op, arg, format!("{shape:?}"), t.shape()));
    }
    if t.dtype() != DType::F32 {
        return Err(Error::DType {
            op,
            arg,
            expected: "f32 (optimizer state is f32)".into(),
            actual: t.dtype(),
        });
    }
    backend::same_device(op, arg, dev, t)
}

fn check_common(
    op: &'static str,
    dev: &crate::Device,
    param: &Tensor,
    grad: &Tensor,
    master: Option<&Tensor>,
) -> Result<()> {
    backend::same_device(op, "param", dev, param)?;
    if grad.shape() != param.shape() {
        return Err(Error::shape(
            op,
            "grad",
            format!("{:?} (the shape of param)", param.shape()),
            grad.shape(),
        ));
    }
    backend::same_device(op, "grad", dev, grad)?;
    if let Some(m) = master {
        check_state(op, "master", dev, m, param.shape())?;
    }
    Ok(())
}

fn run(dev: &crate::Device, hyper: &OptHyper, slots: &mut [Slot<'_>]) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    backend::optim_step(dev, hyper, slots)
}

fn check_step(op: &'static str, step: u64) -> Result<()> {
    if step == 0 {
        return Err(Error::invalid(op, "step", "steps count from 1"));
    }
    Ok(())
}

/// One fused SGD step over `params` (all on one device), `step` = 1 on the first call.
///
/// ```
/// use recfuse::ops::optim::{sgd_step, SgdConfig, SgdParam};
/// use recfuse::{Device, DType, Tensor};
/// let dev = Device::cpu();
/// let mut w = Tensor::from_slice(&[1.0f32, 2.0], &[2], &dev)?;
/// let g = Tensor::from_slice(&[0.5f32, -1.0], &[2], &dev)?;
/// let mut buf = Tensor::zeros(&[2], DType::F32, &dev)?;
/// let cfg = SgdConfig { momentum: 0.9, ..SgdConfig::new(0.1) };
/// for step in 1..=2 {
///     let mut ps = [SgdParam { param: &mut w, grad: &g, momentum_buffer: Some(&mut buf), master: None }];
///     sgd_step(&mut ps, &cfg, step)?;
/// }
/// // step 1: buf = g, w -= 0.1·g; step 2: buf = 0.9·g + g, w -= 0.1·1.9·g
/// let w = w.to_vec::<f32>()?;
/// assert!((w[0] - (1.0 - 0.1 * 0.5 * 2.9)).abs() < 1e-6);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn sgd_step(params: &mut [SgdParam<'_>], cfg: &SgdConfig, step: u64) -> Result<()> {
    const OP: &str = "sgd_step";
    check_step(OP, step)?;
    finite(OP, "lr", cfg.lr, 0.0, f32::MAX)?;
    finite(OP, "momentum", cfg.momentum, 0.0, f32::MAX)?;
    finite(OP, "dampening", cfg.dampening, 0.0, 1.0)?;
    finite(OP, "weight_decay", cfg.weight_decay, 0.0, f32::MAX)?;
    if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
        return Err(Error::invalid(
            OP,
            "nesterov",
            "Nesterov momentum requires a momentum and zero dampening",
        ));
    }
    let Some(first) = params.first() else {
        return Ok(());
    };
    let dev = first.param.device();
    let mut flags = 0;
    if cfg.momentum != 0.0 {
        flags |= F_SGD_MOMENTUM;
    }
    if cfg.nesterov {
        flags |= F_SGD_NESTEROV;
    }
    if step == 1 {
        flags |= F_SGD_FIRST;
    }
    if cfg.weight_decay != 0.0 {
        flags |= F_WEIGHT_DECAY;
    }
    let hyper = OptHyper {
        kind: OptKind::Sgd,
        h: [
            cfg.lr,
            cfg.momentum,
            1.0 - cfg.dampening,
            cfg.weight_decay,
            0.0,
            0.0,
            0.0,
            0.0,
        ],
        flags,
    };
    let mut slots = Vec::with_capacity(params.len());
    for p in params.iter_mut() {
        check_common(OP, &dev, p.param, p.grad, p.master.as_deref())?;
        let s1 = match (&mut p.momentum_buffer, cfg.momentum != 0.0) {
            (Some(b), _) => {
                check_state(OP, "momentum_buffer", &dev, b, p.param.shape())?;
                Some(&mut **b)
            }
            (None, true) => {
                return Err(Error::invalid(
                    OP,
                    "momentum_buffer",
                    "required when momentum != 0",
                ))
            }
            (None, false) => None,
        };
        let n = p.param.numel();
        slots.push(Slot {
            param: &mut *p.param,
            grad: p.grad,
            s1,
            s2: None,
            master: p.master.as_deref_mut(),
            rows: n,
            dim: 1,
        });
    }
    run(&dev, &hyper, &mut slots)
}

/// One fused Adam or AdamW step (per `cfg.decoupled_weight_decay`) over `params`; `step` = 1 on
/// the first call (it sets the bias corrections 1 − β^step, computed on the host in f64).
///
/// ```
/// use recfuse::ops::optim::{adam_step, AdamConfig, AdamParam};
/// use recfuse::{Device, DType, Tensor};
/// let dev = Device::cpu();
/// let mut w = Tensor::from_slice(&[1.0f32, -1.0], &[2], &dev)?;
/// let g = Tensor::from_slice(&[0.3f32, -0.2], &[2], &dev)?;
/// let mut m = Tensor::zeros(&[2], DType::F32, &dev)?;
/// let mut v = Tensor::zeros(&[2], DType::F32, &dev)?;
/// let mut ps = [AdamParam { param: &mut w, grad: &g, exp_avg: &mut m, exp_avg_sq: &mut v, master: None }];
/// adam_step(&mut ps, &AdamConfig::adam(0.01), 1)?;
/// // The first bias-corrected Adam step moves each weight by ≈ lr against its gradient's sign.
/// let w = w.to_vec::<f32>()?;
/// assert!((w[0] - 0.99).abs() < 1e-5 && (w[1] + 0.99).abs() < 1e-5);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn adam_step(params: &mut [AdamParam<'_>], cfg: &AdamConfig, step: u64) -> Result<()> {
    const OP: &str = "adam_step";
    check_step(OP, step)?;
    finite(OP, "lr", cfg.lr, 0.0, f32::MAX)?;
    finite(OP, "beta1", cfg.beta1, 0.0, 1.0 - f32::EPSILON)?;
    finite(OP, "beta2", cfg.beta2, 0.0, 1.0 - f32::EPSILON)?;
    finite(OP, "eps", cfg.eps, 0.0, f32::MAX)?;
    finite(OP, "weight_decay", cfg.weight_decay, 0.0, f32::MAX)?;
    let Some(first) = params.first() else {
        return Ok(());
    };
    let dev = first.param.device();
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - f64::from(cfg.beta1).powi(t);
    let bc2 = 1.0 - f64::from(cfg.beta2).powi(t);
    let mut flags = 0;
    if cfg.weight_decay != 0.0 {
        flags |= F_WEIGHT_DECAY;
    }
    if cfg.decoupled_weight_decay {
        flags |= F_ADAM_DECOUPLED;
    }
    let hyper = OptHyper {
        kind: OptKind::Adam,
        h: [
            (f64::from(cfg.lr) / bc1) as f32,
            bc2.sqrt() as f32,
            1.0 - cfg.beta1,
            cfg.beta2,
            1.0 - cfg.beta2,
            cfg.eps,
            cfg.weight_decay,
            (1.0 - f64::from(cfg.lr) * f64::from(cfg.weight_decay)) as f32,
        ],
        flags,
    };
    let mut slots = Vec::with_capacity(params.len());
    for p in params.iter_mut() {
        check_common(OP, &dev, p.param, p.grad, p.master.as_deref())?;
        check_state(OP, "exp_avg", &dev, p.exp_avg, p.param.shape())?;
        check_state(OP, "exp_avg_sq", &dev, p.exp_avg_sq, p.param.shape())?;
        let n = p.param.numel();
        slots.push(Slot {
            param: &mut *p.param,
            grad: p.grad,
            s1: Some(&mut *p.exp_avg),
            s2: Some(&mut *p.exp_avg_sq),
            master: p.master.as_deref_mut(),
            rows: n,
            dim: 1,
        });
    }
    run(&dev, &hyper, &mut slots)
}

/// One fused row-wise Adagrad step over `[rows, dim]` tables (FBGEMM's exact row-wise
/// Adagrad): per row, `state += mean(g²)`, `w −= lr·g/(√state + ε)`.
///
/// ```
/// use recfuse::ops::optim::{rowwise_adagrad_step, RowwiseAdagradConfig, RowwiseAdagradParam};
/// use recfuse::{Device, DType, Tensor};
/// let dev = Device::cpu();
/// let mut w = Tensor::zeros(&[1, 2], DType::F32, &dev)?;
/// let g = Tensor::from_slice(&[3.0f32, 4.0], &[1, 2], &dev)?;
/// let mut s = Tensor::zeros(&[1], DType::F32, &dev)?;
/// let cfg = RowwiseAdagradConfig { lr: 1.0, eps: 0.0, weight_decay: 0.0 };
/// let mut ps = [RowwiseAdagradParam { param: &mut w, grad: &g, state: &mut s, master: None }];
/// rowwise_adagrad_step(&mut ps, &cfg, 1)?;
/// assert_eq!(s.to_vec::<f32>()?, vec![12.5]); // (9 + 16) / 2
/// let w = w.to_vec::<f32>()?;
/// assert!((w[0] + 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn rowwise_adagrad_step(
    params: &mut [RowwiseAdagradParam<'_>],
    cfg: &RowwiseAdagradConfig,
    step: u64,
) -> Result<()> {
    const OP: &str = "rowwise_adagrad_step";
    check_step(OP, step)?;
    finite(OP, "lr", cfg.lr, 0.0, f32::MAX)?;
    finite(OP, "eps", cfg.eps, 0.0, f32::MAX)?;
    finite(OP, "weight_decay", cfg.weight_decay, 0.0, f32::MAX)?;
    let Some(first) = params.first() else {
        return Ok(());
    };
    let dev = first.param.device();
    let hyper = OptHyper {
        kind: OptKind::RowwiseAdagrad,
        h: [cfg.lr, cfg.eps, cfg.weight_decay, 0.0, 0.0, 0.0, 0.0, 0.0],
        flags: if cfg.weight_decay != 0.0 {
            F_WEIGHT_DECAY
        } else {
            0
        },
    };
    let mut slots = Vec::with_capacity(params.len());
    for p in params.iter_mut() {
        let &[rows, dim] = p.param.shape() else {
            return Err(Error::shape(
                OP,
                "param",
                "[rows, dim] (an embedding table)",
                p.param.shape(),
            ));
        };
        check_common(OP, &dev, p.param, p.grad, p.master.as_deref())?;
        check_state(OP, "state", &dev, p.state, &[rows])?;
        slots.push(Slot {
            param: &mut *p.param,
            grad: p.grad,
            s1: Some(&mut *p.state),
            s2: None,
            master: p.master.as_deref_mut(),
            rows,
            dim,
        });
    }
    run(&dev, &hyper, &mut slots)
}

/// Adam / AdamW over a whole [`Parameters`] set, with its state on the parameters' device:
/// one fused launch per 32 tensors per step, no host copies.
///
/// ```
/// use recfuse::ops::linear::LinearParams;
/// use recfuse::ops::optim::{Adam, AdamConfig};
/// use recfuse::params::Parameters;
/// use recfuse::{DType, Device};
/// let dev = Device::cpu();
/// let mut p = LinearParams::init(3, 2, true, DType::F32, 1, &dev)?;
/// let mut g = p.zeros_like(None)?;
/// for (_, t) in g.named_tensors_mut() {
///     t.fill(1.0)?;
/// }
/// let before = p.weight.to_vec::<f32>()?;
/// let mut opt = Adam::new(&p, AdamConfig::adam(0.1), false)?;
/// opt.step(&mut p, &g)?;
/// // Adam's first step moves every weight by lr against the sign of its gradient.
/// let after = p.weight.to_vec::<f32>()?;
/// assert!(before.iter().zip(&after).all(|(b, a)| (b - a - 0.1).abs() < 1e-6));
/// assert_eq!(opt.steps(), 1);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub struct Adam<P: Parameters> {
    pub cfg: AdamConfig,
    exp_avg: P,
    exp_avg_sq: P,
    master: Option<P>,
    step: u64,
}

impl<P: Parameters> Adam<P> {
    /// Zeroed f32 moments shaped like `params`; with `f32_master`, an f32 copy of every
    /// parameter that the update runs on (16-bit parameters then receive its rounding).
    pub fn new(params: &P, cfg: AdamConfig, f32_master: bool) -> Result<Self> {
        Ok(Adam {
            cfg,
            exp_avg: params.zeros_like(Some(DType::F32))?,
            exp_avg_sq: params.zeros_like(Some(DType::F32))?,
            master: master_of(params, f32_master)?,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first and second moments (for checkpoints).
    pub fn state(&self) -> (&P, &P) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// One update of `params` from `grads` (same type, same names and shapes).
    pub fn step(&mut self, params: &mut P, grads: &P) -> Result<()> {
        const OP: &str = "Adam::step";
        let g = grads.named_tensors();
        check_aligned(OP, "grads", &params.named_tensors(), &g)?;
        check_aligned(
            OP,
            "state",
            &params.named_tensors(),
            &self.exp_avg.named_tensors(),
        )?;
        let mut p = params.named_tensors_mut();
        let mut m = self.exp_avg.named_tensors_mut();
        let mut v = self.exp_avg_sq.named_tensors_mut();
        let mut master: Vec<Option<&mut Tensor>> = match &mut self.master {
            Some(ms) => ms
                .named_tensors_mut()
                .into_iter()
                .map(|(_, t)| Some(t))
                .collect(),
            None => (0..p.len()).map(|_| None).collect(),
        };
        let mut list: Vec<AdamParam<'_>> = p
            .iter_mut()
            .zip(&g)
            .zip(m.iter_mut().zip(v.iter_mut()))
            .zip(master.iter_mut())
            .map(
                |((((_, param), (_, grad)), ((_, m), (_, v))), ms)| AdamParam {
                    param,
                    grad,
                    exp_avg: m,
                    exp_avg_sq: v,
                    master: ms.as_deref_mut(),
                },
            )
            .collect();
        adam_step(&mut list, &self.cfg, self.step + 1)?;
        self.step += 1;
        Ok(())
    }
}

/// SGD (momentum, dampening, weight decay, Nesterov) over a whole [`Parameters`] set, state on
/// the device.
///
/// ```
/// use recfuse::ops::optim::{Sgd, SgdConfig};
/// use recfuse::params::Parameters;
/// use recfuse::{DType, Device, Tensor};
/// let dev = Device::cpu();
/// let mut p = vec![("w".to_string(), Tensor::from_slice(&[1.0f32, 2.0], &[2], &dev)?)];
/// let g = vec![("w".to_string(), Tensor::from_slice(&[0.5f32, -1.0], &[2], &dev)?)];
/// let mut opt = Sgd::new(&p, SgdConfig::new(0.1), false)?;
/// opt.step(&mut p, &g)?;
/// assert_eq!(p[0].1.to_vec::<f32>()?, vec![0.95, 2.1]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub struct Sgd<P: Parameters> {
    pub cfg: SgdConfig,
    momentum: Option<P>,
    master: Option<P>,
    step: u64,
}

impl<P: Parameters> Sgd<P> {
    /// Momentum buffers (f32) when `cfg.momentum != 0`; optional f32 master copies.
    pub fn new(params: &P, cfg: SgdConfig, f32_master: bool) -> Result<Self> {
        let momentum = if cfg.momentum != 0.0 {
            Some(params.zeros_like(Some(DType::F32))?)
        } else {
            None
        };
        Ok(Sgd {
            cfg,
            momentum,
            master: master_of(params, f32_master)?,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of `params` from `grads` (same type, same names and shapes).
    pub fn step(&mut self, params: &mut P, grads: &P) -> Result<()> {
        const OP: &str = "Sgd::step";
        let g = grads.named_tensors();
        check_aligned(OP, "grads", &params.named_tensors(), &g)?;
        let mut p = params.named_tensors_mut();
        let mut mom: Vec<Option<&mut Tensor>> = match &mut self.momentum {
            Some(ms) => ms
                .named_tensors_mut()
                .into_iter()
                .map(|(_, t)| Some(t))
                .collect(),
            None => (0..p.len()).map(|_| None).collect(),
        };
        let mut master: Vec<Option<&mut Tensor>> = match &mut self.master {
            Some(ms) => ms
                .named_tensors_mut()
                .into_iter()
                .map(|(_, t)| Some(t))
                .collect(),
            None => (0..p.len()).map(|_| None).collect(),
        };
        let mut list: Vec<SgdParam<'_>> = p
            .iter_mut()
            .zip(&g)
            .zip(mom.iter_mut().zip(master.iter_mut()))
            .map(|(((_, param), (_, grad)), (mb, ms))| SgdParam {
                param,
                grad,
                momentum_buffer: mb.as_deref_mut(),
                master: ms.as_deref_mut(),
            })
            .collect();
        sgd_step(&mut list, &self.cfg, self.step + 1)?;
        self.step += 1;
        Ok(())
    }
}

/// What a checkpoint needs of an optimizer to resume it bit-identically: every state tensor
/// and the step count ([`crate::checkpoint::Checkpoint::add_optimizer`] stores them as
/// `optim.{kind}.{parameter}` and `optim.step`). Hyperparameters are the caller's config and
/// are not part of the state.
///
/// ```
/// use recfuse::ops::optim::{Adam, AdamConfig, OptimizerState};
/// use recfuse::{Device, Tensor};
/// let dev = Device::cpu();
/// let p = vec![("w".to_string(), Tensor::from_slice(&[1.0f32, 2.0], &[2], &dev)?)];
/// let mut opt = Adam::new(&p, AdamConfig::adam(0.1), true)?;
/// let kinds: Vec<(&str, String)> = opt.state_tensors().into_iter().map(|(k, n, _)| (k, n)).collect();
/// assert_eq!(kinds, [("exp_avg", "w".to_string()), ("exp_avg_sq", "w".into()), ("master", "w".into())]);
/// opt.set_steps(41); // as a restored checkpoint does: the next step is step 42
/// assert_eq!(opt.steps(), 41);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub trait OptimizerState {
    /// Every state tensor as (kind, parameter name, tensor), in a fixed order. Kinds are
    /// PyTorch's state names (`exp_avg`, `exp_avg_sq`, `momentum_buffer`) and `master` (the
    /// f32 master copy of a 16-bit parameter).
    fn state_tensors(&self) -> Vec<(&'static str, String, &Tensor)>;

    /// The same tensors, mutably, in the same order.
    fn state_tensors_mut(&mut self) -> Vec<(&'static str, String, &mut Tensor)>;

    /// Steps taken so far (the next update is step `steps() + 1`).
    fn steps(&self) -> u64;

    /// Sets the step count (a restore; bias corrections and SGD's first-step rule follow it).
    fn set_steps(&mut self, steps: u64);
}

fn state_of<'a, P: Parameters>(
    kind: &'static str,
    p: &'a P,
) -> impl Iterator<Item = (&'static str, String, &'a Tensor)> {
    p.named_tensors()
        .into_iter()
        .map(move |(n, t)| (kind, n, t))
}

fn state_of_mut<'a, P: Parameters>(
    kind: &'static str,
    p: &'a mut P,
) -> impl Iterator<Item = (&'static str, String, &'a mut Tensor)> {
    p.named_tensors_mut()
        .into_iter()
        .map(move |(n, t)| (kind, n, t))
}

/// State kinds `exp_avg`, `exp_avg_sq` and, with f32 masters, `master`.
impl<P: Parameters> OptimizerState for Adam<P> {
    fn state_tensors(&self) -> Vec<(&'static str, String, &Tensor)> {
        state_of("exp_avg", &self.exp_avg)
            .chain(state_of("exp_avg_sq", &self.exp_avg_sq))
            .chain(self.master.iter().flat_map(|m| state_of("master", m)))
            .collect()
    }

    fn state_tensors_mut(&mut self) -> Vec<(&'static str, String, &mut Tensor)> {
        state_of_mut("exp_avg", &mut self.exp_avg)
            .chain(state_of_mut("exp_avg_sq", &mut self.exp_avg_sq))
            .chain(
                self.master
                    .iter_mut()
                    .flat_map(|m| state_of_mut("master", m)),
            )
            .collect()
    }

    fn steps(&self) -> u64 {
        self.step
    }

    fn set_steps(&mut self, steps: u64) {
        self.step = steps;
    }
}

/// State kinds `momentum_buffer` (with momentum) and, with f32 masters, `master`.
impl<P: Parameters> OptimizerState for Sgd<P> {
    fn state_tensors(&self) -> Vec<(&'static str, String, &Tensor)> {
        self.momentum
            .iter()
            .flat_map(|m| state_of("momentum_buffer", m))
            .chain(self.master.iter().flat_map(|m| state_of("master", m)))
            .collect()
    }

    fn state_tensors_mut(&mut self) -> Vec<(&'static str, String, &mut Tensor)> {
        self.momentum
            .iter_mut()
            .flat_map(|m| state_of_mut("momentum_buffer", m))
            .chain(
                self.master
                    .iter_mut()
                    .flat_map(|m| state_of_mut("master", m)),
            )
            .collect()
    }

    fn steps(&self) -> u64 {
        self.step
    }

    fn set_steps(&mut self, steps: u64) {
        self.step = steps;
    }
}

fn master_of<P: Parameters>(params: &P, f32_master: bool) -> Result<Option<P>> {
    if f32_master {
        Ok(Some(params.try_map(&mut |_, t| t.to_dtype(DType::F32))?))
    } else {
        Ok(None)
    }
}
