//! Gated cross layers (GDCN) and DCN-V2, stacked and fused: forward and backward.
//!
//! ```text
//! U_l = C_l·W_cᵀ + b_c      V_l = C_l·W_gᵀ (+ b_g)      C_{l+1} = C_0 ⊙ U_l ⊙ σ(V_l) + C_l
//! ```
//! (`CrossMode::DcnV2` drops the gate: σ ≡ 1.) Each layer's forward is **one** GEMM against
//! the interleaved packed weights `[2D, D]` (row 2j = W_c row j, row 2j+1 = W_g row j), so
//! every output tile holds matching cross and gate columns and the whole tail — bias, sigmoid,
//! the two products and the residual — runs in the GEMM's epilogue. Backward per layer is one
//! elementwise pass (ΔU, ΔV, dX0) and two GEMMs (∂W = Δᵀ·C_l over the batch, deterministic;
//! Ḡ += Δ·W), plus a fixed-order column sum for the bias.
//!
//! Trainers keep their parameters in PyTorch's `[out, in]` layout (`CrossLayerWeights`) and
//! convert with [`GatedCross::pack`] / [`GatedCross::unpack_grads`]; or they keep the packed
//! form and its gradients as their parameters.
//!
//! ```
//! use recfuse::ops::gated_cross::{GatedCross, Init, SavePolicy};
//! use recfuse::{DType, Device, Tensor};
//! let dev = Device::cpu();
//! let net = GatedCross::new(6, 3); // width 6, three gated layers
//! let weights = net.init(Init::Gdcn, 7, &dev)?;
//! let params = net.pack(&weights, &dev)?;
//! let x0 = Tensor::from_f32(&[0.1; 4 * 6], &[4, 6], DType::F32, &dev)?;
//! let (y, saved) = net.forward(&x0, &params, SavePolicy::SaveAll)?;
//! let dy = Tensor::full(&[4, 6], 1.0, DType::F32, &dev)?;
//! let (dx0, grads) = net.backward(&params, &saved, &dy)?;
//! assert_eq!(dx0.shape(), &[4, 6]);
//! let per_layer = net.unpack_grads(&grads)?; // back to [out, in] layout
//! assert_eq!(per_layer[0].w_c.full().unwrap().shape(), &[6, 6]);
//! # Ok::<(), recfuse::Error>(())
//! ```

use rand::{Rng, SeedableRng};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend::{self, same_device};
use crate::ops::gemm::{Gemm, MatView};
use crate::tensor::Tensor;

const OP: &str = "gated_cross";
const OP_BWD: &str = "gated_cross_backward";

/// Which cross layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CrossMode {
    /// GDCN: `C_0 ⊙ U ⊙ σ(V) + C_l` (the default).
    #[default]
    Gated,
    /// DCN-V2: `C_0 ⊙ U + C_l` (no gate branch).
    DcnV2,
}

/// What the forward pass keeps for backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SavePolicy {
    /// Keep C_l and the pre-activations U_l, V_l (the gate *pre*-activation, so σ' is computed
    /// from V in f32, never from a 16-bit σ). Fastest backward.
    #[default]
    SaveAll,
    /// Keep only C_l; backward re-runs each layer's forward GEMM. Identical gradients (the same
    /// kernel recomputes the same bits), about a third less activation memory.
    Recompute,
}

/// Weight initialisers matching the reference implementations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Official GDCN code: Xavier-normal weights, `b_c ~ U(0, 1)`, `b_g = 0`.
    Gdcn,
    /// DCN-V2: He-normal weights, zero biases.
    DcnV2,
}

/// One branch's weight in PyTorch layout.
#[derive(Debug)]
pub enum BranchWeight {
    /// `W: [D, D]`.
    Full(Tensor),
    /// `W ≈ U·V` with `u: [D, r]`, `v: [r, D]`.
    LowRank { u: Tensor, v: Tensor },
}

impl BranchWeight {
    /// The full matrix, if this branch is full rank.
    pub fn full(&self) -> Option<&Tensor> {
        match self {
            BranchWeight::Full(w) => Some(w),
            BranchWeight::LowRank { .. } => None,
        }
    }
}

/// One cross layer's parameters (or gradients) in PyTorch `[out, in]` layout.
#[derive(Debug)]
pub struct CrossLayerWeights {
    pub w_c: BranchWeight,
    pub b_c: Tensor,
    /// Present in `Gated` mode.
    pub w_g: Option<BranchWeight>,
    /// Present when the config has `gate_bias`.
    pub b_g: Option<Tensor>,
}

/// One layer in the kernel layout. With `P = 2D` (gated, interleaved) or `D` (DCN-V2), and
/// `R = 2r` or `r`:
/// * full rank: `w: [P, D]`, `u: None`;
/// * low rank: `w: [R, D]` holds the stacked down-projections (V_c rows, then V_g rows) and
///   `u: [P, R]` the up-projections, block-interleaved (row 2j = [U_c row j, 0], row 2j+1 =
///   [0, U_g row j]) so the second GEMM feeds the same gated epilogue;
/// * `b: [P]`, interleaved (b_c, b_g) pairs (b_g = 0 when there is no gate bias).
#[derive(Debug)]
pub struct PackedCrossLayer {
    pub w: Tensor,
    pub u: Option<Tensor>,
    pub b: Tensor,
}

/// All layers, packed. Gradients use the same type.
#[derive(Debug)]
pub struct PackedCross {
    pub layers: Vec<PackedCrossLayer>,
}

/// What forward keeps for backward.
#[derive(Debug)]
pub struct CrossSaved {
    /// The configuration whose forward made this: backward checks it is its own.
    made_by: GatedCross,
    policy: SavePolicy,
    /// C_0 … C_{L−1}.
    c: Vec<Tensor>,
    /// Pre-activations `[B, P]` per layer (SaveAll).
    pre: Vec<Tensor>,
    /// Low-rank intermediates Z = C_l·W_downᵀ `[B, R]` per layer (SaveAll, low rank).
    z: Vec<Tensor>,
}

/// A stack of cross layers: the configuration. Cheap to clone; holds no tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatedCross {
    /// Width D (any value: FDO widths like 189 or 307 are fine).
    pub width: usize,
    /// Number of layers L ≥ 1.
    pub layers: usize,
    pub mode: CrossMode,
    /// Low rank r of each branch (`W ≈ U·V`), or full rank.
    pub rank: Option<usize>,
    /// A bias on the gate branch (off by default, as in the paper).
    pub gate_bias: bool,
    /// Storage dtype of activations and weights (accumulation and sigmoid are f32).
    pub dtype: DType,
}

fn normal(rng: &mut impl Rng) -> f32 {
    // Box–Muller: two uniforms → one standard normal (the second is discarded for simplicity).
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl GatedCross {
    /// `layers` gated cross layers of width `width`, f32, full rank, no gate bias.
    pub fn new(width: usize, layers: usize) -> GatedCross {
        GatedCross {
            width,
            layers,
            mode: CrossMode::Gated,
            rank: None,
            gate_bias: false,
            dtype: DType::F32,
        }
    }

    fn gated(&self) -> bool {
        self.mode == CrossMode::Gated
    }

    /// Packed columns per layer: 2D gated, D otherwise.
    fn p(&self) -> usize {
        if self.gated() {
            2 * self.width
        } else {
            self.width
        }
    }

    /// Packed low-rank width: 2r gated, r otherwise.
    fn r_packed(&self) -> Option<usize> {
        self.rank.map(|r| if self.gated() { 2 * r } else { r })
    }

    fn validate(&self, op: &'static str) -> Result<()> {
        if self.width == 0 {
            return Err(Error::invalid(op, "width", "must be ≥ 1"));
        }
        if self.layers == 0 {
            return Err(Error::invalid(op, "layers", "must be ≥ 1"));
        }
        if self.rank == Some(0) {
            return Err(Error::invalid(op, "rank", "must be ≥ 1 when set"));
        }
        if self.gate_bias && !self.gated() {
            return Err(Error::invalid(op, "gate_bias", "DCN-V2 has no gate branch"));
        }
        Ok(())
    }

    /// Fresh weights in PyTorch layout, initialised as `init` prescribes, from `seed`.
    pub fn init(&self, init: Init, seed: u64, device: &Device) -> Result<Vec<CrossLayerWeights>> {
        self.validate("GatedCross::init")?;
        let d = self.width;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mat = |rows: usize, cols: usize, rng: &mut rand::rngs::StdRng| -> Result<Tensor> {
            // Xavier-normal: std = √(2/(fan_in + fan_out)); He-normal: √(2/fan_in).
            let std = match init {
                Init::Gdcn => (2.0 / (rows + cols) as f32).sqrt(),
                Init::DcnV2 => (2.0 / cols as f32).sqrt(),
            };
            let n = rows.checked_mul(cols).ok_or_else(|| {
                Error::invalid(
                    "GatedCross::init",
                    "width",
                    format!("{rows} × {cols} overflows"),
                )
            })?;
            let mut v = crate::tensor::try_host_vec("GatedCross::init", "width", n, 0f32)?;
            v.iter_mut().for_each(|x| *x = std * normal(rng));
            Tensor::from_f32(&v, &[rows, cols], self.dtype, device)
        };
        let branch = |rng: &mut rand::rngs::StdRng| -> Result<BranchWeight> {
            Ok(match self.rank {
                None => BranchWeight::Full(mat(d, d, rng)?),
                Some(r) => BranchWeight::LowRank {
                    u: mat(d, r, rng)?,
                    v: mat(r, d, rng)?,
                },
            })
        };
        let mut out = Vec::with_capacity(self.layers);
        for _ in 0..self.layers {
            let w_c = branch(&mut rng)?;
            let b_c = match init {
                Init::Gdcn => {
                    let v: Vec<f32> = (0..d).map(|_| rng.random::<f32>()).collect();
                    Tensor::from_f32(&v, &[d], self.dtype, device)?
                }
                Init::DcnV2 => Tensor::zeros(&[d], self.dtype, device)?,
            };
            let w_g = if self.gated() {
                Some(branch(&mut rng)?)
            } else {
                None
            };
            let b_g = if self.gate_bias {
                Some(Tensor::zeros(&[d], self.dtype, device)?)
            } else {
                None
            };
            out.push(CrossLayerWeights { w_c, b_c, w_g, b_g });
        }
        Ok(out)
    }

    /// PyTorch-layout weights → the kernel's packed layout on `device` (a host round trip:
    /// do it once, or when loading a checkpoint, not every step).
    pub fn pack(&self, weights: &[CrossLayerWeights], device: &Device) -> Result<PackedCross> {
        const P_OP: &str = "GatedCross::pack";
        self.validate(P_OP)?;
        if weights.len() != self.layers {
            return Err(Error::invalid(
                P_OP,
                "weights",
                format!("{} layers, expected {}", weights.len(), self.layers),
            ));
        }
        let (d, p, gated) = (self.width, self.p(), self.gated());
        let host = |arg: &'static str, t: &Tensor, shape: &[usize]| -> Result<Vec<f32>> {
            if t.shape() != shape {
                return Err(Error::shape(P_OP, arg, format!("{shape:?}"), t.shape()));
            }
            if t.dtype() != self.dtype {
                return Err(Error::DType {
                    op: P_OP,
                    arg,
                    expected: self.dtype.to_string(),
                    actual: t.dtype(),
                });
            }
            t.to_f32_vec()
        };
        let mut layers = Vec::with_capacity(self.layers);
        for lw in weights {
            let mut b = vec![0f32; p];
            let bc = host("b_c", &lw.b_c, &[d])?;
            let bg = match (&lw.b_g, self.gate_bias) {
                (Some(t), true) => Some(host("b_g", t, &[d])?),
                (None, false) => None,
                (Some(_), false) => {
                    return Err(Error::invalid(
                        P_OP,
                        "b_g",
                        "given but the config has no gate bias",
                    ))
                }
                (None, true) => {
                    return Err(Error::invalid(
                        P_OP,
                        "b_g",
                        "missing: the config has a gate bias",
                    ))
                }
            };
            for j in 0..d {
                if gated {
                    b[2 * j] = bc[j];
                    b[2 * j + 1] = bg.as_ref().map_or(0.0, |g| g[j]);
                } else {
                    b[j] = bc[j];
                }
            }
            let wg = match (&lw.w_g, gated) {
                (Some(w), true) => Some(w),
                (None, false) => None,
                (Some(_), false) => {
                    return Err(Error::invalid(P_OP, "w_g", "given in DCN-V2 mode"))
                }
                (None, true) => return Err(Error::invalid(P_OP, "w_g", "missing in gated mode")),
            };
            let packed = match self.rank {
                None => {
                    let full = |arg, bw: &BranchWeight| match bw {
                        BranchWeight::Full(t) => host(arg, t, &[d, d]),
                        BranchWeight::LowRank { .. } => Err(Error::invalid(
                            P_OP,
                            arg,
                            "low-rank weight in a full-rank config",
                        )),
                    };
                    let wc = full("w_c", &lw.w_c)?;
                    let wgv = wg.map(|w| full("w_g", w)).transpose()?;
                    let mut w = vec![0f32; p * d];
                    for j in 0..d {
                        let (dst_c, dst_g) = if gated {
                            (2 * j, 2 * j + 1)
                        } else {
                            (j, usize::MAX)
                        };
                        w[dst_c * d..dst_c * d + d].copy_from_slice(&wc[j * d..j * d + d]);
                        if let Some(g) = &wgv {
                            w[dst_g * d..dst_g * d + d].copy_from_slice(&g[j * d..j * d + d]);
                        }
                    }
                    PackedCrossLayer {
                        w: Tensor::from_f32(&w, &[p, d], self.dtype, device)?,
                        u: None,
                        b: Tensor::from_f32(&b, &[p], self.dtype, device)?,
                    }
                }
                Some(r) => {
                    let lowrank = |arg, bw: &BranchWeight| match bw {
                        BranchWeight::LowRank { u, v } => {
                            Ok((host(arg, u, &[d, r])?, host(arg, v, &[r, d])?))
                        }
                        BranchWeight::Full(_) => Err(Error::invalid(
                            P_OP,
                            arg,
                            "full weight in a low-rank config",
                        )),
                    };
                    let (uc, vc) = lowrank("w_c", &lw.w_c)?;
                    let g = wg.map(|w| lowrank("w_g", w)).transpose()?;
                    let rp = if gated { 2 * r } else { r };
                    let mut down = vc.clone();
                    let mut up = vec![0f32; p * rp];
                    if let Some((ug, vg)) = &g {
                        down.extend_from_slice(vg);
                        for j in 0..d {
                            up[(2 * j) * rp..(2 * j) * rp + r]
                                .copy_from_slice(&uc[j * r..j * r + r]);
                            up[(2 * j + 1) * rp + r..(2 * j + 1) * rp + 2 * r]
                                .copy_from_slice(&ug[j * r..j * r + r]);
                        }
                    } else {
                        up.copy_from_slice(&uc);
                    }
                    PackedCrossLayer {
                        w: Tensor::from_f32(&down, &[rp, d], self.dtype, device)?,
                        u: Some(Tensor::from_f32(&up, &[p, rp], self.dtype, device)?),
                        b: Tensor::from_f32(&b, &[p], self.dtype, device)?,
                    }
                }
            };
            layers.push(packed);
        }
        Ok(PackedCross { layers })
    }

    /// Packed gradients (or parameters) → PyTorch layout, on the packed tensors' device. Gate
    /// positions of the packed bias are dropped when the config has no gate bias.
    pub fn unpack_grads(&self, packed: &PackedCross) -> Result<Vec<CrossLayerWeights>> {
        const U_OP: &str = "GatedCross::unpack_grads";
        self.check_packed(U_OP, packed)?;
        let (d, gated) = (self.width, self.gated());
        let mut out = Vec::with_capacity(self.layers);
        for pl in &packed.layers {
            let dev = pl.w.device();
            let dt = pl.w.dtype();
            let mk = |v: &[f32], s: &[usize]| Tensor::from_f32(v, s, dt, &dev);
            let b = pl.b.to_f32_vec()?;
            let pick = |v: &[f32], stride: usize, off: usize, n: usize| {
                (0..n).map(|j| v[j * stride + off]).collect::<Vec<f32>>()
            };
            let (b_c, b_g) = if gated {
                (
                    mk(&pick(&b, 2, 0, d), &[d])?,
                    if self.gate_bias {
                        Some(mk(&pick(&b, 2, 1, d), &[d])?)
                    } else {
                        None
                    },
                )
            } else {
                (mk(&b, &[d])?, None)
            };
            let w = pl.w.to_f32_vec()?;
            let (w_c, w_g) = match (&pl.u, self.rank) {
                (None, None) => {
                    let rows = |off: usize| -> Vec<f32> {
                        let step = if gated { 2 } else { 1 };
                        (0..d)
                            .flat_map(|j| {
                                w[(step * j + off) * d..(step * j + off) * d + d]
                                    .iter()
                                    .copied()
                            })
                            .collect()
                    };
                    (
                        BranchWeight::Full(mk(&rows(0), &[d, d])?),
                        if gated {
                            Some(BranchWeight::Full(mk(&rows(1), &[d, d])?))
                        } else {
                            None
                        },
                    )
                }
                (Some(u), Some(r)) => {
                    let up = u.to_f32_vec()?;
                    let rp = if gated { 2 * r } else { r };
                    let ublock = |row_off: usize, col_off: usize| -> Vec<f32> {
                        let step = if gated { 2 } else { 1 };
                        (0..d)
                            .flat_map(|j| {
                                let base = (step * j + row_off) * rp + col_off;
                                up[base..base + r].iter().copied()
                            })
                            .collect()
                    };
                    let wc = BranchWeight::LowRank {
                        u: mk(&ublock(0, 0), &[d, r])?,
                        v: mk(&w[..r * d], &[r, d])?,
                    };
                    let wg = if gated {
                        Some(BranchWeight::LowRank {
                            u: mk(&ublock(1, r), &[d, r])?,
                            v: mk(&w[r * d..2 * r * d], &[r, d])?,
                        })
                    } else {
                        None
                    };
                    (wc, wg)
                }
                _ => {
                    return Err(Error::invalid(
                        U_OP,
                        "packed",
                        "rank does not match the config",
                    ))
                }
            };
            out.push(CrossLayerWeights { w_c, b_c, w_g, b_g });
        }
        Ok(out)
    }

    fn check_packed(&self, op: &'static str, packed: &PackedCross) -> Result<()> {
        self.validate(op)?;
        if packed.layers.len() != self.layers {
            return Err(Error::invalid(
                op,
                "params",
                format!("{} layers, expected {}", packed.layers.len(), self.layers),
            ));
        }
        let (d, p) = (self.width, self.p());
        for pl in &packed.layers {
            let chk = |arg: &'static str, t: &Tensor, s: &[usize]| -> Result<()> {
                if t.shape() != s {
                    return Err(Error::shape(op, arg, format!("{s:?}"), t.shape()));
                }
                Ok(())
            };
            chk("params.b", &pl.b, &[p])?;
            match (self.r_packed(), &pl.u) {
                (None, None) => chk("params.w", &pl.w, &[p, d])?,
                (Some(rp), Some(u)) => {
                    chk("params.w", &pl.w, &[rp, d])?;
                    chk("params.u", u, &[p, rp])?;
                }
                (None, Some(_)) => {
                    return Err(Error::invalid(
                        op,
                        "params.u",
                        "present in a full-rank config",
                    ))
                }
                (Some(_), None) => {
                    return Err(Error::invalid(
                        op,
                        "params.u",
                        "missing in a low-rank config",
                    ))
                }
            }
        }
        Ok(())
    }

    fn check_params_on(&self, op: &'static str, dev: &Device, params: &PackedCross) -> Result<()> {
        self.check_packed(op, params)?;
        for pl in &params.layers {
            for (arg, t) in [
                ("params.w", Some(&pl.w)),
                ("params.u", pl.u.as_ref()),
                ("params.b", Some(&pl.b)),
            ] {
                if let Some(t) = t {
                    same_device(op, arg, dev, t)?;
                    if t.dtype() != self.dtype {
                        return Err(Error::DType {
                            op,
                            arg,
                            expected: self.dtype.to_string(),
                            actual: t.dtype(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// A layer's forward: `next = C_0 ⊙ U ⊙ σ(V) + c` (into `next`), with the pre-activations
    /// written to `pre` and the low-rank Z to `z` when given.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        dev: &Device,
        x0: &Tensor,
        c: &Tensor,
        pl: &PackedCrossLayer,
        next: &mut Tensor,
        pre: Option<&mut Tensor>,
        z: Option<&mut Tensor>,
        rows: usize,
    ) -> Result<()> {
        let (d, p) = (self.width, self.p());
        let plain = Gemm::plain;
        // Low rank: Z = C_l·W_downᵀ first, then the gated GEMM reads Z instead of C_l.
        let mut z_local;
        let (a, k, wmat) = match (&pl.u, self.r_packed()) {
            (Some(u), Some(rp)) => {
                let zt: &mut Tensor = match z {
                    Some(zt) => zt,
                    None => {
                        z_local = Tensor::zeros(&[rows, rp], self.dtype, dev)?;
                        &mut z_local
                    }
                };
                let g = plain(
                    rows,
                    rp,
                    d,
                    c,
                    MatView::new(0, d, 1, 0),
                    &pl.w,
                    MatView::new(0, 1, d, 0),
                );
                g.check(OP, zt, None)?;
                backend::gemm(dev, &g, zt, None)?;
                (&*zt, rp, u)
            }
            _ => (c, d, &pl.w),
        };
        let g = Gemm {
            bias: Some((&pl.b, 0)),
            mul: Some(x0),
            residual: Some(c),
            gated: self.gated(),
            c_view: MatView::new(0, d, 1, 0),
            pre_view: MatView::new(0, p, 1, 0),
            ..plain(
                rows,
                p,
                k,
                a,
                MatView::new(0, k, 1, 0),
                wmat,
                MatView::new(0, 1, k, 0),
            )
        };
        g.check(OP, next, pre.as_deref())?;
        backend::gemm(dev, &g, next, pre)
    }

    /// Forward over `x0: [B, D]`: returns `C_L` and what backward needs.
    pub fn forward(
        &self,
        x0: &Tensor,
        params: &PackedCross,
        policy: SavePolicy,
    ) -> Result<(Tensor, CrossSaved)> {
        self.validate(OP)?;
        let dev = x0.device();
        let d = self.width;
        if x0.shape().len() != 2 || x0.shape()[1] != d {
            return Err(Error::shape(OP, "x0", format!("[B, {d}]"), x0.shape()));
        }
        if x0.dtype() != self.dtype {
            return Err(Error::DType {
                op: OP,
                arg: "x0",
                expected: self.dtype.to_string(),
                actual: x0.dtype(),
            });
        }
        self.check_params_on(OP, &dev, params)?;
        let rows = x0.shape()[0];
        let mut saved = CrossSaved {
            made_by: self.clone(),
            policy,
            c: vec![x0.try_clone()?],
            pre: Vec::new(),
            z: Vec::new(),
        };
        for (l, pl) in params.layers.iter().enumerate() {
            let mut next = Tensor::zeros(&[rows, d], self.dtype, &dev)?;
            let mut pre = match policy {
                SavePolicy::SaveAll => Some(Tensor::zeros(&[rows, self.p()], self.dtype, &dev)?),
                SavePolicy::Recompute => None,
            };
            let mut z = match (policy, self.r_packed()) {
                (SavePolicy::SaveAll, Some(rp)) => {
                    Some(Tensor::zeros(&[rows, rp], self.dtype, &dev)?)
                }
                _ => None,
            };
            self.layer_forward(
                &dev,
                &saved.c[0],
                &saved.c[l],
                pl,
                &mut next,
                pre.as_mut(),
                z.as_mut(),
                rows,
            )?;
            saved.pre.extend(pre);
            saved.z.extend(z);
            if l + 1 == self.layers {
                return Ok((next, saved));
            }
            saved.c.push(next);
        }
        Err(Error::invalid(OP, "layers", "must be ≥ 1"))
    }

    /// Zeroed packed gradients shaped like `params`.
    pub fn zero_grads(&self, params: &PackedCross) -> Result<PackedCross> {
        let z = |t: &Tensor| Tensor::zeros(t.shape(), t.dtype(), &t.device());
        Ok(PackedCross {
            layers: params
                .layers
                .iter()
                .map(|pl| {
                    Ok(PackedCrossLayer {
                        w: z(&pl.w)?,
                        u: pl.u.as_ref().map(z).transpose()?,
                        b: z(&pl.b)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        })
    }

    /// Backward from `dy = ∂L/∂C_L`: returns `∂L/∂x0` and fresh packed gradients.
    pub fn backward(
        &self,
        params: &PackedCross,
        saved: &CrossSaved,
        dy: &Tensor,
    ) -> Result<(Tensor, PackedCross)> {
        let mut grads = self.zero_grads(params)?;
        let dx = self.backward_into(params, saved, dy, &mut grads, false)?;
        Ok((dx, grads))
    }

    /// Backward into existing packed gradients: overwritten, or added to with `accumulate`.
    /// Deterministic: every reduction over the batch has a fixed order, no float atomics.
    pub fn backward_into(
        &self,
        params: &PackedCross,
        saved: &CrossSaved,
        dy: &Tensor,
        grads: &mut PackedCross,
        accumulate: bool,
    ) -> Result<Tensor> {
        self.validate(OP_BWD)?;
        let x0 = saved
            .c
            .first()
            .ok_or_else(|| Error::invalid(OP_BWD, "saved", "empty"))?;
        let dev = x0.device();
        let (d, p) = (self.width, self.p());
        let rows = x0.shape()[0];
        self.check_params_on(OP_BWD, &dev, params)?;
        self.check_packed(OP_BWD, grads)?;
        if saved.made_by != *self {
            return Err(Error::invalid(
                OP_BWD,
                "saved",
                format!(
                    "comes from the forward of another configuration ({:?}), not of {self:?}",
                    saved.made_by
                ),
            ));
        }
        if saved.c.len() != self.layers
            || (saved.policy == SavePolicy::SaveAll && saved.pre.len() != self.layers)
        {
            return Err(Error::invalid(
                OP_BWD,
                "saved",
                "does not come from this configuration's forward",
            ));
        }
        same_device(OP_BWD, "dy", &dev, dy)?;
        if dy.shape() != [rows, d] {
            return Err(Error::shape(
                OP_BWD,
                "dy",
                format!("[{rows}, {d}]"),
                dy.shape(),
            ));
        }
        // Ḡ and dX0 accumulate over layers: keep them in f32 whatever the storage dtype.
        let mut gbar = Tensor::zeros(&[rows, d], DType::F32, &dev)?;
        backend::add(&dev, dy, None, &mut gbar)?;
        let mut dx0 = Tensor::zeros(&[rows, d], DType::F32, &dev)?;
        let mut delta = Tensor::zeros(&[rows, p], self.dtype, &dev)?;
        // Weight-gradient products honour `accumulate`; the others always overwrite.
        for l in (0..self.layers).rev() {
            let pl = &params.layers[l];
            let gl = &mut grads.layers[l];
            let c = &saved.c[l];
            // U, V (and Z) of this layer: saved, or recomputed by the forward kernel itself.
            let (pre_re, z_re);
            let (pre, z): (&Tensor, Option<&Tensor>) = match saved.policy {
                SavePolicy::SaveAll => (&saved.pre[l], saved.z.get(l)),
                SavePolicy::Recompute => {
                    let mut scratch = Tensor::zeros(&[rows, d], self.dtype, &dev)?;
                    let mut pt = Tensor::zeros(&[rows, p], self.dtype, &dev)?;
                    let mut zt = match self.r_packed() {
                        Some(rp) => Some(Tensor::zeros(&[rows, rp], self.dtype, &dev)?),
                        None => None,
                    };
                    self.layer_forward(
                        &dev,
                        x0,
                        c,
                        pl,
                        &mut scratch,
                        Some(&mut pt),
                        zt.as_mut(),
                        rows,
                    )?;
                    pre_re = pt;
                    z_re = zt;
                    (&pre_re, z_re.as_ref())
                }
            };
            backend::gate_backward(&dev, &gbar, x0, pre, self.gated(), &mut delta, &mut dx0)?;
            // Without a gate bias the odd (b_g) slots of the packed bias are structural zeros: their
            // gradient must stay exactly 0, or an optimizer would grow a gate bias that
            // `unpack_grads` drops (a trainer keeping the packed form would train one model and
            // export another).
            let skip_odd = self.gated() && !self.gate_bias;
            backend::col_sum(&dev, &delta, rows, p, &mut gl.b, accumulate, skip_odd)?;
            let mut next = Tensor::zeros(&[rows, d], DType::F32, &dev)?;
            match (&pl.u, z, self.r_packed()) {
                (None, _, _) => {
                    // ∂W = Δᵀ·C_l: [P, D], the batch is the reduction axis.
                    let g = Gemm {
                        accumulate,
                        ..Gemm::plain(
                            p,
                            d,
                            rows,
                            &delta,
                            MatView::new(0, 1, p, 0),
                            c,
                            MatView::new(0, d, 1, 0),
                        )
                    };
                    g.check(OP_BWD, &gl.w, None)?;
                    backend::gemm(&dev, &g, &mut gl.w, None)?;
                    // Ḡ ← Ḡ + Δ·W.
                    let g = Gemm {
                        residual: Some(&gbar),
                        ..Gemm::plain(
                            rows,
                            d,
                            p,
                            &delta,
                            MatView::new(0, p, 1, 0),
                            &pl.w,
                            MatView::new(0, d, 1, 0),
                        )
                    };
                    g.check(OP_BWD, &next, None)?;
                    backend::gemm(&dev, &g, &mut next, None)?;
                }
                (Some(u), Some(z), Some(rp)) => {
                    let gu = grads.layers[l]
                        .u
                        .as_mut()
                        .ok_or_else(|| Error::invalid(OP_BWD, "grads.u", "missing"))?;
                    // ∂U = Δᵀ·Z, only on U's non-zero blocks (gated: rows 2j see the first r
                    // columns of Z, rows 2j+1 the last r), so the structural zeros of the packed
                    // U never receive gradient and a trainer may step the packed form directly.
                    let (branches, r) = if self.gated() { (2, rp / 2) } else { (1, rp) };
                    for br in 0..branches {
                        let g = Gemm {
                            c_view: MatView::new(br * rp + br * r, branches * rp, 1, 0),
                            pre_view: MatView::new(br * rp + br * r, branches * rp, 1, 0),
                            accumulate,
                            ..Gemm::plain(
                                d,
                                r,
                                rows,
                                &delta,
                                MatView::new(br, branches, p, 0),
                                z,
                                MatView::new(br * r, rp, 1, 0),
                            )
                        };
                        g.check(OP_BWD, gu, None)?;
                        backend::gemm(&dev, &g, gu, None)?;
                    }
                    // δZ = Δ·U: [B, R].
                    let mut dz = Tensor::zeros(&[rows, rp], self.dtype, &dev)?;
                    let g = Gemm::plain(
                        rows,
                        rp,
                        p,
                        &delta,
                        MatView::new(0, p, 1, 0),
                        u,
                        MatView::new(0, rp, 1, 0),
                    );
                    g.check(OP_BWD, &dz, None)?;
                    backend::gemm(&dev, &g, &mut dz, None)?;
                    // ∂W_down = δZᵀ·C_l: [R, D].
                    let gl = &mut grads.layers[l];
                    let g = Gemm {
                        accumulate,
                        ..Gemm::plain(
                            rp,
                            d,
                            rows,
                            &dz,
                            MatView::new(0, 1, rp, 0),
                            c,
                            MatView::new(0, d, 1, 0),
                        )
                    };
                    g.check(OP_BWD, &gl.w, None)?;
                    backend::gemm(&dev, &g, &mut gl.w, None)?;
                    // Ḡ ← Ḡ + δZ·W_down.
                    let g = Gemm {
                        residual: Some(&gbar),
                        ..Gemm::plain(
                            rows,
                            d,
                            rp,
                            &dz,
                            MatView::new(0, rp, 1, 0),
                            &pl.w,
                            MatView::new(0, d, 1, 0),
                        )
                    };
                    g.check(OP_BWD, &next, None)?;
                    backend::gemm(&dev, &g, &mut next, None)?;
                }
                _ => {
                    return Err(Error::invalid(
                        OP_BWD,
                        "saved",
                        "low-rank intermediates missing",
                    ))
                }
            }
            gbar = next;
        }
        let mut dx = Tensor::zeros(&[rows, d], self.dtype, &dev)?;
        backend::add(&dev, &dx0, Some(&gbar), &mut dx)?;
        Ok(dx)
    }
}
