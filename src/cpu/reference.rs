//! The f64 oracle. Naive loops, no blocking, no threads: slow and obviously right. Every test
//! compares a backend against these functions on the values the backend actually stored
//! (inputs are rounded to their dtype first, then widened exactly to f64).

use crate::ops::gemm::{erf_f64, Activation};

/// Activation in f64.
pub fn act(act: Activation, z: f64) -> f64 {
    match act {
        Activation::None => z,
        Activation::Relu => {
            if z > 0.0 || z.is_nan() {
                z
            } else {
                0.0
            }
        }
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

/// One branch weight of a cross layer in the reference: full `[D, D]` or low rank
/// `W = U·V` with `U: [D, r]`, `V: [r, D]` (all `[out, in]`, row-major).
#[derive(Clone, Debug)]
pub enum RefBranch {
    Full(Vec<f64>),
    LowRank { u: Vec<f64>, v: Vec<f64>, r: usize },
}

/// One cross layer in the reference. `wg: None` is the ungated DCN-V2 layer.
#[derive(Clone, Debug)]
pub struct RefCrossLayer {
    pub wc: RefBranch,
    pub bc: Vec<f64>,
    pub wg: Option<RefBranch>,
    pub bg: Option<Vec<f64>>,
}

/// Gradients of one reference cross layer, shaped like its weights.
#[derive(Clone, Debug)]
pub struct RefCrossGrads {
    pub wc: RefBranch,
    pub bc: Vec<f64>,
    pub wg: Option<RefBranch>,
    pub bg: Option<Vec<f64>>,
}

/// y[b, o] = Σ_i x[b, i]·w[o, i] for `w: [out, inp]`.
fn matmul_t(x: &[f64], w: &[f64], rows: usize, inp: usize, out: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * out];
    for b in 0..rows {
        for o in 0..out {
            y[b * out + o] = (0..inp).map(|i| x[b * inp + i] * w[o * inp + i]).sum();
        }
    }
    y
}

/// x·Wᵀ for a branch, plus the low-rank intermediate Z = x·Vᵀ when there is one.
fn branch_forward(
    x: &[f64],
    br: &RefBranch,
    rows: usize,
    d: usize,
) -> (Vec<f64>, Option<Vec<f64>>) {
    match br {
        RefBranch::Full(w) => (matmul_t(x, w, rows, d, d), None),
        RefBranch::LowRank { u, v, r } => {
            let z = matmul_t(x, v, rows, d, *r);
            (matmul_t(&z, u, rows, *r, d), Some(z))
        }
    }
}

/// Backward of a branch given δ = ∂L/∂(x·Wᵀ): returns (∂W, ∂x contribution).
fn branch_backward(
    x: &[f64],
    br: &RefBranch,
    z: Option<&Vec<f64>>,
    delta: &[f64],
    rows: usize,
    d: usize,
) -> (RefBranch, Vec<f64>) {
    // ∂W[o, i] = Σ_b δ[b, o]·x[b, i];  ∂x[b, i] = Σ_o δ[b, o]·W[o, i].
    let outer = |a: &[f64], ac: usize, bm: &[f64], bc: usize| {
        let mut g = vec![0.0; ac * bc];
        for b in 0..rows {
            for o in 0..ac {
                for i in 0..bc {
                    g[o * bc + i] += a[b * ac + o] * bm[b * bc + i];
                }
            }
        }
        g
    };
    let back = |dl: &[f64], w: &[f64], out: usize, inp: usize| {
        let mut dx = vec![0.0; rows * inp];
        for b in 0..rows {
            for o in 0..out {
                for i in 0..inp {
                    dx[b * inp + i] += dl[b * out + o] * w[o * inp + i];
                }
            }
        }
        dx
    };
    match br {
        RefBranch::Full(w) => (RefBranch::Full(outer(delta, d, x, d)), back(delta, w, d, d)),
        RefBranch::LowRank { u, v, r } => {
            let z = z.expect("low-rank branch keeps Z");
            let du = outer(delta, d, z, *r);
            let dz = back(delta, u, d, *r);
            let dv = outer(&dz, *r, x, d);
            (
                RefBranch::LowRank {
                    u: du,
                    v: dv,
                    r: *r,
                },
                back(&dz, v, *r, d),
            )
        }
    }
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Forward of a stack of gated (or DCN-V2) cross layers over `x0: [rows, d]`:
/// `C_{l+1} = C_0 ⊙ (C_l·W_cᵀ + b_c) ⊙ σ(C_l·W_gᵀ + b_g) + C_l`, σ ≡ 1 without a gate.
pub fn gated_cross_forward(
    rows: usize,
    d: usize,
    x0: &[f64],
    layers: &[RefCrossLayer],
) -> Vec<f64> {
    let mut c = x0.to_vec();
    for l in layers {
        let (mut u, _) = branch_forward(&c, &l.wc, rows, d);
        let gate = l.wg.as_ref().map(|wg| branch_forward(&c, wg, rows, d).0);
        for b in 0..rows {
            for j in 0..d {
                let k = b * d + j;
                u[k] += l.bc[j];
                let s = match &gate {
                    Some(v) => sigmoid(v[k] + l.bg.as_ref().map_or(0.0, |bg| bg[j])),
                    None => 1.0,
                };
                u[k] = x0[k] * u[k] * s + c[k];
            }
        }
        c = u;
    }
    c
}

/// Backward of `gated_cross_forward` given `dy = ∂L/∂C_L`: `(∂L/∂x0, per-layer grads)`, the
/// spec's recurrence evaluated in f64.
pub fn gated_cross_backward(
    rows: usize,
    d: usize,
    x0: &[f64],
    layers: &[RefCrossLayer],
    dy: &[f64],
) -> (Vec<f64>, Vec<RefCrossGrads>) {
    // Re-run the forward keeping C_l, U_l, V_l and the low-rank Z's.
    let mut cs = vec![x0.to_vec()];
    let mut saved = Vec::new();
    for l in layers {
        let c = cs.last().expect("C_0 is there");
        let (mut u, zc) = branch_forward(c, &l.wc, rows, d);
        let g = l.wg.as_ref().map(|wg| branch_forward(c, wg, rows, d));
        let mut v = g.as_ref().map(|(v, _)| v.clone());
        let mut next = vec![0.0; rows * d];
        for b in 0..rows {
            for j in 0..d {
                let k = b * d + j;
                u[k] += l.bc[j];
                let s = match v.as_mut() {
                    Some(v) => {
                        v[k] += l.bg.as_ref().map_or(0.0, |bg| bg[j]);
                        sigmoid(v[k])
                    }
                    None => 1.0,
                };
                next[k] = x0[k] * u[k] * s + c[k];
            }
        }
        saved.push((u, v, zc, g.and_then(|(_, z)| z)));
        cs.push(next);
    }
    let mut gbar = dy.to_vec();
    let mut dx0 = vec![0.0; rows * d];
    let mut grads = Vec::new();
    for (li, l) in layers.iter().enumerate().rev() {
        let (u, v, zc, zg) = &saved[li];
        let c = &cs[li];
        let mut du = vec![0.0; rows * d];
        let mut dv = vec![0.0; rows * d];
        for k in 0..rows * d {
            let s = v.as_ref().map_or(1.0, |v| sigmoid(v[k]));
            du[k] = gbar[k] * x0[k] * s;
            dv[k] = du[k] * u[k] * (1.0 - s);
            dx0[k] += gbar[k] * u[k] * s;
        }
        let colsum = |m: &[f64]| {
            (0..d)
                .map(|j| (0..rows).map(|b| m[b * d + j]).sum())
                .collect::<Vec<f64>>()
        };
        let (gwc, dxc) = branch_backward(c, &l.wc, zc.as_ref(), &du, rows, d);
        let mut g = RefCrossGrads {
            wc: gwc,
            bc: colsum(&du),
            wg: None,
            bg: l.bg.as_ref().map(|_| colsum(&dv)),
        };
        for k in 0..rows * d {
            gbar[k] += dxc[k];
        }
        if let Some(wg) = &l.wg {
            let (gwg, dxg) = branch_backward(c, wg, zg.as_ref(), &dv, rows, d);
            g.wg = Some(gwg);
            for k in 0..rows * d {
                gbar[k] += dxg[k];
            }
        }
        grads.push(g);
    }
    grads.reverse();
    let dx: Vec<f64> = dx0.iter().zip(&gbar).map(|(a, b)| a + b).collect();
    (dx, grads)
}

/// Per-row kind in the in-batch softmax: a positive, or a "not-to-recommend" negative-feedback
/// row (the user disliked or skipped the target).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefRowKind {
    Pos,
    Ntr,
}

/// Everything the reference in-batch softmax needs, in f64, for one device's rows over all N
/// gathered columns.
#[derive(Clone, Debug)]
pub struct RefSoftmax<'a> {
    pub b: usize,
    pub n: usize,
    pub d: usize,
    pub queries: &'a [f64],
    pub cands: &'a [f64],
    pub target: &'a [usize],
    pub kind: &'a [RefRowKind],
    pub weight: &'a [f64],
    pub log_q: Option<&'a [f64]>,
    pub ids: Option<&'a [i64]>,
    pub valid: Option<&'a [bool]>,
    /// Per-row query (user) id and per-column owning query id (−1 for none).
    pub row_qid: Option<&'a [i64]>,
    pub col_qid: Option<&'a [i64]>,
    pub kappa: f64,
    pub l2: bool,
    pub eps: f64,
    /// The normaliser Z (Σw over all ranks for a mean, 1 for a sum).
    pub z: f64,
}

/// Result of the reference: loss and gradients w.r.t. queries, candidates and κ.
#[derive(Clone, Debug)]
pub struct RefSoftmaxOut {
    pub loss: f64,
    pub dq: Vec<f64>,
    pub dc: Vec<f64>,
    pub dkappa: f64,
}

fn l2n(v: &[f64], eps: f64) -> (Vec<f64>, f64) {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(eps);
    (v.iter().map(|x| x / norm).collect(), norm)
}

/// The in-batch softmax loss the naive way: materialise every logit, mask, log-sum-exp,
/// and differentiate by hand (the spec's formulas, evaluated in f64).
pub fn inbatch_softmax(p: &RefSoftmax<'_>) -> RefSoftmaxOut {
    let (b, n, d) = (p.b, p.n, p.d);
    let norm = |v: &[f64]| {
        if p.l2 {
            l2n(v, p.eps)
        } else {
            (v.to_vec(), 1.0)
        }
    };
    let qn: Vec<(Vec<f64>, f64)> = (0..b).map(|i| norm(&p.queries[i * d..i * d + d])).collect();
    let cn: Vec<(Vec<f64>, f64)> = (0..n).map(|j| norm(&p.cands[j * d..j * d + d])).collect();
    let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>();
    let mut loss = 0.0;
    let mut dqh = vec![0.0; b * d];
    let mut dch = vec![0.0; n * d];
    let mut dkappa = 0.0;
    // The gradient products run dense, over every row and column, as a materialised
    // implementation's `Gᵀ·Q̂` and `G·Ĉ` do: a masked pair or an inactive row has G = 0, and
    // 0 · NaN is NaN, so a NaN query poisons every column's gradient (and a NaN candidate every
    // row's) while the loss sees only the active rows' domains. The fused kernels follow this
    // rule on every backend (tests/inbatch_softmax.rs, NaN inputs).
    let dense = |i: usize, j: usize, g: f64, dkappa: &mut f64, dqh: &mut [f64], dch: &mut [f64]| {
        *dkappa += g * dot(&qn[i].0, &cn[j].0);
        for k in 0..d {
            dqh[i * d + k] += p.kappa * g * cn[j].0[k];
            dch[j * d + k] += p.kappa * g * qn[i].0[k];
        }
    };
    for i in 0..b {
        let t = p.target[i];
        let valid_col = |j: usize| p.valid.is_none_or(|v| v[j]);
        if p.weight[i] == 0.0 || t >= n || !valid_col(t) {
            for j in 0..n {
                dense(i, j, 0.0, &mut dkappa, &mut dqh, &mut dch);
            }
            continue;
        }
        let in_d = |j: usize| {
            if !valid_col(j) {
                return false;
            }
            if j == t {
                return true;
            }
            if let Some(ids) = p.ids {
                if ids[j] == ids[t] {
                    return false;
                }
            }
            if let (Some(rq), Some(cq)) = (p.row_qid, p.col_qid) {
                if cq[j] >= 0 && cq[j] == rq[i] {
                    return false;
                }
            }
            true
        };
        let s: Vec<f64> = (0..n)
            .map(|j| p.kappa * dot(&qn[i].0, &cn[j].0) - p.log_q.map_or(0.0, |lq| lq[j]))
            .collect();
        let m = (0..n)
            .filter(|&j| in_d(j))
            .map(|j| s[j])
            .fold(f64::NEG_INFINITY, f64::max);
        let lse = m
            + (0..n)
                .filter(|&j| in_d(j))
                .map(|j| (s[j] - m).exp())
                .sum::<f64>()
                .ln();
        let pt = (s[t] - lse).exp();
        let w = p.weight[i] / p.z;
        let a = match p.kind[i] {
            RefRowKind::Pos => {
                loss += w * (lse - s[t]);
                w
            }
            RefRowKind::Ntr => {
                loss += -w * (1.0 - pt).ln();
                -w * pt / (1.0 - pt)
            }
        };
        for (j, &sj) in s.iter().enumerate() {
            let pij = if in_d(j) { (sj - lse).exp() } else { 0.0 };
            let g = a * (pij - if j == t { 1.0 } else { 0.0 });
            dense(i, j, g, &mut dkappa, &mut dqh, &mut dch);
        }
    }
    // Through the normalisation: ∂L/∂u = (g − û⟨û, g⟩)/‖u‖ (when ‖u‖ ≥ ε).
    let unnorm = |gh: &[f64], (vh, nrm): &(Vec<f64>, f64), raw: &[f64]| -> Vec<f64> {
        if !p.l2 {
            return gh.to_vec();
        }
        let rawn = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
        if rawn < p.eps {
            return gh.iter().map(|g| g / p.eps).collect();
        }
        let proj = dot(vh, gh);
        gh.iter()
            .zip(vh)
            .map(|(g, v)| (g - v * proj) / nrm)
            .collect()
    };
    let dq = (0..b)
        .flat_map(|i| unnorm(&dqh[i * d..i * d + d], &qn[i], &p.queries[i * d..i * d + d]))
        .collect();
    let dc = (0..n)
        .flat_map(|j| unnorm(&dch[j * d..j * d + d], &cn[j], &p.cands[j * d..j * d + d]))
        .collect();
    RefSoftmaxOut {
        loss,
        dq,
        dc,
        dkappa,
    }
}

/// Shapes of one attention call: Q `[b, lq, h, dk]`, K `[b, l, h, dk]`, V `[b, l, h, dv]`.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub lq: usize,
    pub l: usize,
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
}

/// `max` that keeps a NaN (f64::max drops it, which would read a NaN row as fully masked).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Softmax attention with an optional additive bias `[h, lq, l]` and key mask `[b, l]`:
/// returns O `[b, lq, h, dv]` and LSE `[b, h, lq]` (−∞ and O = 0 for a row with no valid key).
/// A masked key is never read; a NaN score of a valid key makes its row's O and LSE NaN.
pub fn attention_forward(
    d: AttnDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    bias: Option<&[f64]>,
    mask: Option<&[bool]>,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let AttnDims {
        b,
        lq,
        l,
        h,
        dk,
        dv,
    } = d;
    let mut o = vec![0.0; b * lq * h * dv];
    let mut lse = vec![f64::NEG_INFINITY; b * h * lq];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..lq {
                let s: Vec<Option<f64>> = (0..l)
                    .map(|j| {
                        if mask.is_some_and(|m| !m[bb * l + j]) {
                            return None;
                        }
                        let dot: f64 = (0..dk)
                            .map(|c| {
                                q[((bb * lq + i) * h + hh) * dk + c]
                                    * k[((bb * l + j) * h + hh) * dk + c]
                            })
                            .sum();
                        Some(scale * dot + bias.map_or(0.0, |bi| bi[(hh * lq + i) * l + j]))
                    })
                    .collect();
                let m = s
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |a, &x| nan_max(a, x));
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = s.iter().flatten().map(|x| (x - m).exp()).sum();
                lse[(bb * h + hh) * lq + i] = m + z.ln();
                for j in 0..l {
                    if let Some(sj) = s[j] {
                        let p = (sj - m).exp() / z;
                        for c in 0..dv {
                            o[((bb * lq + i) * h + hh) * dv + c] +=
                                p * v[((bb * l + j) * h + hh) * dv + c];
                        }
                    }
                }
            }
        }
    }
    (o, lse)
}

/// Gradients of `attention_forward` given dO: `(dq, dk, dv, dbias)`, by the plain softmax
/// Jacobian (no LSE trick: an independent derivation from the kernels').
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    d: AttnDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    bias: Option<&[f64]>,
    mask: Option<&[bool]>,
    scale: f64,
    d_o: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let AttnDims {
        b,
        lq,
        l,
        h,
        dk,
        dv,
    } = d;
    let mut dq = vec![0.0; q.len()];
    let mut dkk = vec![0.0; k.len()];
    let mut dvv = vec![0.0; v.len()];
    let mut db = vec![0.0; h * lq * l];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..lq {
                let valid = |j: usize| mask.is_none_or(|m| m[bb * l + j]);
                let s: Vec<f64> = (0..l)
                    .map(|j| {
                        let dot: f64 = (0..dk)
                            .map(|c| {
                                q[((bb * lq + i) * h + hh) * dk + c]
                                    * k[((bb * l + j) * h + hh) * dk + c]
                            })
                            .sum();
                        scale * dot + bias.map_or(0.0, |bi| bi[(hh * lq + i) * l + j])
                    })
                    .collect();
                if !(0..l).any(valid) {
                    continue;
                }
                let m = (0..l)
                    .filter(|&j| valid(j))
                    .map(|j| s[j])
                    .fold(f64::NEG_INFINITY, nan_max);
                let z: f64 = (0..l).filter(|&j| valid(j)).map(|j| (s[j] - m).exp()).sum();
                let p: Vec<f64> = (0..l)
                    .map(|j| if valid(j) { (s[j] - m).exp() / z } else { 0.0 })
                    .collect();
                let go = &d_o[((bb * lq + i) * h + hh) * dv..((bb * lq + i) * h + hh) * dv + dv];
                // dP_j = ⟨dO, v_j⟩; dS_j = P_j (dP_j − Σ_k P_k dP_k).
                let dp: Vec<f64> = (0..l)
                    .map(|j| {
                        (0..dv)
                            .map(|c| go[c] * v[((bb * l + j) * h + hh) * dv + c])
                            .sum()
                    })
                    .collect();
                // A masked key is never read, in the backward as in the forward: its K and V
                // (even a NaN there) reach no output.
                let pdp: f64 = (0..l).filter(|&j| valid(j)).map(|j| p[j] * dp[j]).sum();
                for j in (0..l).filter(|&j| valid(j)) {
                    let ds = p[j] * (dp[j] - pdp);
                    db[(hh * lq + i) * l + j] += ds;
                    for c in 0..dv {
                        dvv[((bb * l + j) * h + hh) * dv + c] += p[j] * go[c];
                    }
                    for c in 0..dk {
                        dq[((bb * lq + i) * h + hh) * dk + c] +=
                            scale * ds * k[((bb * l + j) * h + hh) * dk + c];
                        dkk[((bb * l + j) * h + hh) * dk + c] +=
                            scale * ds * q[((bb * lq + i) * h + hh) * dk + c];
                    }
                }
            }
        }
    }
    (dq, dkk, dvv, db)
}

/// `y = LN(x + r)·γ + β` per row of width d, with γ, β either shared `[d]` or per token
/// `[tokens, d]` (row i uses token i mod tokens). Returns y.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    rows: usize,
    d: usize,
    x: &[f64],
    r: Option<&[f64]>,
    gamma: &[f64],
    beta: &[f64],
    tokens: usize,
    eps: f64,
) -> Vec<f64> {
    let mut y = vec![0.0; rows * d];
    for i in 0..rows {
        let s: Vec<f64> = (0..d)
            .map(|c| x[i * d + c] + r.map_or(0.0, |r| r[i * d + c]))
            .collect();
        let mean = s.iter().sum::<f64>() / d as f64;
        let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        let t = i % tokens.max(1);
        let off = if gamma.len() == d { 0 } else { t * d };
        for c in 0..d {
            y[i * d + c] = (s[c] - mean) * rstd * gamma[off + c] + beta[off + c];
        }
    }
    y
}
