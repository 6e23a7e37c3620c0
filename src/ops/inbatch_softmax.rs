//! Fused in-batch softmax for two-tower retrieval (one device's rows over all gathered
//! columns). The B×N logits are never stored: forward keeps per row only the log-sum-exp, the
//! target logit and p; backward recomputes the logits tile by tile.
//!
//! ```text
//! s_ij = κ·⟨û_i, v̂_j⟩ − lq_j                 (û, v̂ L2-normalised when asked; lq = log Q)
//! D_i  = valid columns, minus accidental hits (same item id as the target, or — with query
//!        ids — another positive of the same user), the target itself always kept
//! ℓ_i  = LSE_i − s_i,t            (POS)      ℓ_i = −log(1 − p_i)   (NTR: not-to-recommend)
//! L    = Σ_i w_i ℓ_i / Z          (Z = Σ w over all ranks for a mean; 1 for a sum)
//! ```
//! Gradients use one formula for every row kind: `G_ij = a_i·(P_ij − δ_j,t(i))`, with
//! `a_i = w_i/Z` (POS) or `−(w_i/Z)·p_i/(1 − p_i)` (NTR).
//!
//! Rows with `w = 0`, an out-of-range or invalid target are inactive: zero loss, zero
//! gradients (padding). An NTR row whose domain holds only its target has p = 1 and an
//! unbounded loss; its `1 − p` is clamped at 1e-30 (loss ≤ 69·w) so nothing is NaN.
//!
//! NaN inputs propagate as through a materialised implementation, on every backend: the loss
//! is NaN when an active row's domain meets a NaN logit; the gradient products `G·V̂` and
//! `Gᵀ·Û` run dense over every row and column (a masked pair or a padding row has G = 0, and
//! 0 · NaN is NaN), so a NaN query makes every column's gradient NaN and a NaN candidate every
//! row's; with L2 a NaN row's own gradient is NaN. A padding row or a fully masked column never
//! reaches the loss. A NaN or infinite logQ is refused (`cols.log_q`).
//!
//! ```
//! use recfuse::ops::inbatch_softmax::{Columns, InBatchSoftmax, RowKind, Rows};
//! use recfuse::{DType, Device, Tensor};
//! let dev = Device::cpu();
//! let q = Tensor::from_f32(&[1.0, 0.0, 0.0, 1.0], &[2, 2], DType::F32, &dev)?;
//! let c = Tensor::from_f32(&[1.0, 0.0, 0.0, 1.0, 0.7, 0.7], &[3, 2], DType::F32, &dev)?;
//! let loss = InBatchSoftmax { kappa: 5.0, remove_accidental_hits: false, ..Default::default() };
//! let rows = Rows { queries: &q, target: &[0, 1], kind: &[RowKind::Pos; 2], weight: &[1.0, 1.0], query_ids: None };
//! let cols = Columns { emb: &c, log_q: None, ids: None, valid: None, query_ids: None };
//! let fwd = loss.forward(&rows, &cols, None)?;
//! let grads = loss.backward(&rows, &cols, &fwd)?;
//! assert!(fwd.loss > 0.0 && grads.dc.shape() == &[3, 2]);
//! # Ok::<(), recfuse::Error>(())
//! ```

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend;
use crate::tensor::Tensor;

const OP: &str = "inbatch_softmax";

/// What kind of feedback a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// A positive: minimise `LSE − s_t`.
    Pos,
    /// Negative feedback ("not to recommend"): maximise `log(1 − p)`.
    Ntr,
}

/// How the per-row losses combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// `Σ w ℓ / Σ w` with Σw over every rank (pass the global sum as `z`).
    #[default]
    Mean,
    /// `Σ w ℓ`.
    Sum,
}

/// Loss configuration.
#[derive(Clone, Debug)]
pub struct InBatchSoftmax {
    /// κ = 1/τ, the inverse temperature.
    pub kappa: f32,
    /// Learned temperature: κ is clamped to `kappa_max` and ∂L/∂κ is returned (0 while clamped).
    pub learn_kappa: bool,
    /// Upper clamp of a learned κ (CLIP's 100).
    pub kappa_max: f32,
    /// L2-normalise queries and candidates (fused into the loads on the GPUs).
    pub l2_normalize: bool,
    /// ε of `u / max(‖u‖, ε)`.
    pub eps: f32,
    /// Remove accidental hits: columns with the target's item id (needs `Columns::ids`).
    pub remove_accidental_hits: bool,
    pub reduction: Reduction,
}

impl Default for InBatchSoftmax {
    fn default() -> Self {
        InBatchSoftmax {
            kappa: 1.0,
            learn_kappa: false,
            kappa_max: 100.0,
            l2_normalize: false,
            eps: 1e-12,
            remove_accidental_hits: true,
            reduction: Reduction::Mean,
        }
    }
}

/// The N gathered columns. logQ correction is on exactly when `log_q` is given.
#[derive(Clone, Copy, Debug)]
pub struct Columns<'a> {
    /// `[N, d]` candidate embeddings.
    pub emb: &'a Tensor,
    /// `log q_j`: log of the expected count of item j among the columns.
    pub log_q: Option<&'a [f32]>,
    /// Item ids, for accidental-hit removal.
    pub ids: Option<&'a [i64]>,
    /// Column validity (false: padding).
    pub valid: Option<&'a [bool]>,
    /// The query (user) id owning each positive column, −1 for none (extra negatives).
    pub query_ids: Option<&'a [i64]>,
}

/// This device's rows.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    /// `[B, d]` query embeddings.
    pub queries: &'a Tensor,
    /// Target column per row (global column index).
    pub target: &'a [u32],
    pub kind: &'a [RowKind],
    /// Sample weights (0 for padding rows).
    pub weight: &'a [f32],
    /// Per-row query (user) id: its other positives are not negatives for it.
    pub query_ids: Option<&'a [i64]>,
}

/// Per-row statistics kept by forward (O(B)).
#[derive(Clone, Debug)]
pub struct SoftmaxForward {
    /// This call's loss: `Σ_{local rows} w ℓ / Z`. Summed over ranks it is the global loss.
    pub loss: f64,
    /// `Σ w` over this call's rows.
    pub weight_sum: f64,
    /// The normaliser used.
    pub z: f64,
    /// LSE over D_i per row (−∞ for inactive rows).
    pub lse: Vec<f32>,
    /// Target logit per row.
    pub s_target: Vec<f32>,
    /// Target probability per row.
    pub p_target: Vec<f32>,
}

/// Gradients of the loss.
#[derive(Debug)]
pub struct SoftmaxGrads {
    /// `[B, d]`, in the queries' dtype.
    pub dq: Tensor,
    /// `[N, d]` f32 (the cross-device reduce-scatter sums in f32).
    pub dc: Tensor,
    /// ∂L/∂κ (0 unless `learn_kappa`, and 0 while κ is clamped).
    pub dkappa: f32,
}

/// One validated call as the backends see it: raw embeddings (the backend normalises them
/// when `l2` is set and applies the L2 backward to what it returns) and per-row / per-column
/// metadata on the host (O(B + N), uploaded by GPU backends per call).
pub(crate) struct SoftmaxArgs<'a> {
    pub b: usize,
    pub n: usize,
    pub d: usize,
    /// `[B, d]`.
    pub q: &'a Tensor,
    /// `[N, d]`.
    pub c: &'a Tensor,
    pub kappa: f32,
    pub l2: bool,
    pub eps: f32,
    /// Target column per row; `u32::MAX` marks an inactive row (padding, invalid target).
    pub target: &'a [u32],
    pub log_q: Option<&'a [f32]>,
    /// Item ids when accidental hits are removed.
    pub ids: Option<&'a [i64]>,
    pub valid: Option<&'a [bool]>,
    pub row_qid: Option<&'a [i64]>,
    pub col_qid: Option<&'a [i64]>,
}

impl InBatchSoftmax {
    fn kappa_eff(&self) -> f32 {
        if self.learn_kappa {
            self.kappa.min(self.kappa_max)
        } else {
            self.kappa
        }
    }

    fn validate(&self, rows: &Rows<'_>, cols: &Columns<'_>) -> Result<(usize, usize, usize)> {
        if !(self.kappa.is_finite() && self.kappa > 0.0) {
            return Err(Error::invalid(
                OP,
                "kappa",
                format!("{} is not a positive finite number", self.kappa),
            ));
        }
        if self.learn_kappa && !(self.kappa_max.is_finite() && self.kappa_max > 0.0) {
            return Err(Error::invalid(
                OP,
                "kappa_max",
                format!("{} is not a positive finite number", self.kappa_max),
            ));
        }
        if self.l2_normalize && !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid(
                OP,
                "eps",
                format!("{} is not a positive finite number", self.eps),
            ));
        }
        let qs = rows.queries.shape();
        let cs = cols.emb.shape();
        if qs.len() != 2 {
            return Err(Error::shape(OP, "rows.queries", "[B, d]", qs));
        }
        let (b, d) = (qs[0], qs[1]);
        if cs.len() != 2 || cs[1] != d {
            return Err(Error::shape(OP, "cols.emb", format!("[N, {d}]"), cs));
        }
        let n = cs[0];
        let dev = rows.queries.device();
        crate::ops::backend::same_device(OP, "cols.emb", &dev, cols.emb)?;
        let len = |arg: &'static str, got: usize, want: usize| -> Result<()> {
            if got != want {
                return Err(Error::shape(OP, arg, format!("[{want}]"), &[got]));
            }
            Ok(())
        };
        len("rows.target", rows.target.len(), b)?;
        len("rows.kind", rows.kind.len(), b)?;
        len("rows.weight", rows.weight.len(), b)?;
        if let Some(v) = rows.query_ids {
            len("rows.query_ids", v.len(), b)?;
        }
        if let Some(v) = cols.log_q {
            len("cols.log_q", v.len(), n)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(OP, "cols.log_q", "contains NaN or infinity"));
            }
        }
        if let Some(v) = cols.ids {
            len("cols.ids", v.len(), n)?;
        }
        if let Some(v) = cols.valid {
            len("cols.valid", v.len(), n)?;
        }
        if let Some(v) = cols.query_ids {
            len("cols.query_ids", v.len(), n)?;
        }
        if rows.query_ids.is_some() != cols.query_ids.is_some() {
            return Err(Error::invalid(
                OP,
                "query_ids",
                "give both rows.query_ids and cols.query_ids, or neither",
            ));
        }
        if self.remove_accidental_hits && cols.ids.is_none() {
            return Err(Error::invalid(
                OP,
                "cols.ids",
                "needed to remove accidental hits",
            ));
        }
        if rows.weight.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(Error::invalid(
                OP,
                "rows.weight",
                "weights must be finite and ≥ 0",
            ));
        }
        if n > u32::MAX as usize || b > u32::MAX as usize {
            return Err(Error::invalid(OP, "cols.emb", "more than 2^32 rows"));
        }
        Ok((b, n, d))
    }

    /// Each row's target column, or `u32::MAX` for an inactive row.
    fn targets(&self, rows: &Rows<'_>, cols: &Columns<'_>) -> Vec<u32> {
        let n = cols.emb.shape()[0];
        rows.target
            .iter()
            .zip(rows.weight)
            .map(|(&t, &w)| {
                let ok = w > 0.0 && (t as usize) < n && cols.valid.is_none_or(|v| v[t as usize]);
                if ok {
                    t
                } else {
                    u32::MAX
                }
            })
            .collect()
    }

    fn args<'a>(
        &self,
        rows: &Rows<'a>,
        cols: &Columns<'a>,
        target: &'a [u32],
        (b, n, d): (usize, usize, usize),
    ) -> SoftmaxArgs<'a> {
        SoftmaxArgs {
            b,
            n,
            d,
            q: rows.queries,
            c: cols.emb,
            kappa: self.kappa_eff(),
            l2: self.l2_normalize,
            eps: self.eps,
            target,
            log_q: cols.log_q,
            ids: if self.remove_accidental_hits {
                cols.ids
            } else {
                None
            },
            valid: cols.valid,
            row_qid: rows.query_ids,
            col_qid: cols.query_ids,
        }
    }

    /// Forward. `z` is the normaliser for `Reduction::Mean` (the global Σw over every rank);
    /// `None` uses this call's own Σw (single device).
    pub fn forward(
        &self,
        rows: &Rows<'_>,
        cols: &Columns<'_>,
        z: Option<f64>,
    ) -> Result<SoftmaxForward> {
        let dims = self.validate(rows, cols)?;
        let b = dims.0;
        let target = self.targets(rows, cols);
        let (lse, s_target) = backend::softmax_forward(
            &rows.queries.device(),
            &self.args(rows, cols, &target, dims),
        )?;
        let weight_sum: f64 = rows.weight.iter().map(|&w| w as f64).sum();
        let z = match self.reduction {
            Reduction::Sum => 1.0,
            Reduction::Mean => z.unwrap_or(weight_sum),
        };
        if !(z.is_finite() && z > 0.0) && weight_sum > 0.0 {
            return Err(Error::invalid(
                OP,
                "z",
                format!("normaliser {z} must be > 0"),
            ));
        }
        let mut loss = 0.0f64;
        let mut p_target = vec![0f32; b];
        for i in 0..b {
            if target[i] == u32::MAX {
                continue;
            }
            let logp = (s_target[i] - lse[i]) as f64;
            p_target[i] = logp.exp() as f32;
            let l = match rows.kind[i] {
                RowKind::Pos => -logp,
                RowKind::Ntr => -log1mexp_clamped(logp),
            };
            loss += rows.weight[i] as f64 * l / z;
        }
        Ok(SoftmaxForward {
            loss,
            weight_sum,
            z,
            lse,
            s_target,
            p_target,
        })
    }

    /// Row coefficients a_i of `G_ij = a_i·(P_ij − δ)`.
    pub(crate) fn row_coeffs(
        &self,
        rows: &Rows<'_>,
        fwd: &SoftmaxForward,
        target: &[u32],
    ) -> Vec<f32> {
        (0..target.len())
            .map(|i| {
                if target[i] == u32::MAX {
                    return 0.0;
                }
                let w = rows.weight[i] as f64 / fwd.z;
                match rows.kind[i] {
                    RowKind::Pos => w as f32,
                    RowKind::Ntr => {
                        // p/(1 − p) = exp(s_t − LSE_excl), LSE_excl = LSE + log1mexp(s_t − LSE).
                        let logp = (fwd.s_target[i] - fwd.lse[i]) as f64;
                        let lse_excl = fwd.lse[i] as f64 + log1mexp_clamped(logp);
                        (-w * (fwd.s_target[i] as f64 - lse_excl).exp()) as f32
                    }
                }
            })
            .collect()
    }

    /// Backward: gradients for this call's queries and for every column.
    pub fn backward(
        &self,
        rows: &Rows<'_>,
        cols: &Columns<'_>,
        fwd: &SoftmaxForward,
    ) -> Result<SoftmaxGrads> {
        let (dq, dkappa) = self.query_grads(rows, cols, fwd)?;
        let (_, n, _) = self.validate(rows, cols)?;
        let a = self.coeffs(rows, cols, fwd)?;
        let dc = self.column_grads(rows, cols, &fwd.lse, &a, 0..n)?;
        Ok(SoftmaxGrads { dq, dc, dkappa })
    }

    /// Query gradients (in the queries' dtype) and ∂L/∂κ of this call's rows.
    pub(crate) fn query_grads(
        &self,
        rows: &Rows<'_>,
        cols: &Columns<'_>,
        fwd: &SoftmaxForward,
    ) -> Result<(Tensor, f32)> {
        let dims = self.validate(rows, cols)?;
        let (b, _, d) = dims;
        check_fwd(b, fwd, rows.weight)?;
        let dev = rows.queries.device();
        if d == 0 {
            // Every logit is κ·0 (+ log q): nothing depends on κ or on an embedding.
            return Ok((Tensor::zeros(&[b, 0], rows.queries.dtype(), &dev)?, 0.0));
        }
        let target = self.targets(rows, cols);
        let a = self.row_coeffs(rows, fwd, &target);
        let mut dq = Tensor::zeros(&[b, d], DType::F32, &dev)?;
        let dk = backend::softmax_grad_queries(
            &dev,
            &self.args(rows, cols, &target, dims),
            &a,
            &fwd.lse,
            &mut dq,
        )?;
        let dkappa = if self.learn_kappa && self.kappa < self.kappa_max {
            dk
        } else {
            0.0
        };
        Ok((dq.to_dtype(rows.queries.dtype())?, dkappa))
    }

    /// Candidate gradients `[cols.len(), d]` f32 (after the L2 backward) for one column range,
    /// from every row in `rows` with coefficients `a` and statistics `lse` — also the
    /// owner-computes path, where a rank has gathered all ranks' rows and computes only its own
    /// columns.
    pub(crate) fn column_grads(
        &self,
        rows: &Rows<'_>,
        cols: &Columns<'_>,
        lse: &[f32],
        a: &[f32],
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let dims = self.validate(rows, cols)?;
        let (b, n, d) = dims;
        if lse.len() != b || a.len() != b {
            return Err(Error::shape(OP, "lse", format!("[{b}]"), &[lse.len()]));
        }
        if range.start > range.end || range.end > n {
            return Err(Error::invalid(
                OP,
                "range",
                format!("{range:?} is not within {n} columns"),
            ));
        }
        let target = self.targets(rows, cols);
        let dev = rows.queries.device();
        let mut dc = Tensor::zeros(&[range.len(), d], DType::F32, &dev)?;
        if d == 0 || range.is_empty() {
            return Ok(dc);
        }
        backend::softmax_grad_columns(
            &dev,
            &self.args(rows, cols, &target, dims),
            a,
            lse,
            range,
            &mut dc,
        )?;
        Ok(dc)
    }

    /// The row coefficients a_i for `rows` given forward statistics (for gathering).
    pub(crate) fn coeffs(
        &self,
        rows: &Rows<'_>,
        cols: &Columns<'_>,
        fwd: &SoftmaxForward,
    ) -> Result<Vec<f32>> {
        let (b, _, _) = self.validate(rows, cols)?;
        check_fwd(b, fwd, rows.weight)?;
        Ok(self.row_coeffs(rows, fwd, &self.targets(rows, cols)))
    }
}

/// `fwd` must be a forward of `b` rows with a usable normaliser (it is a public struct, so a
/// caller can hand backward one from another call or build one).
fn check_fwd(b: usize, fwd: &SoftmaxForward, weight: &[f32]) -> Result<()> {
    for (arg, len) in [
        ("fwd.lse", fwd.lse.len()),
        ("fwd.s_target", fwd.s_target.len()),
        ("fwd.p_target", fwd.p_target.len()),
    ] {
        if len != b {
            return Err(Error::shape(
                OP,
                arg,
                format!("[{b}] (one per row)"),
                &[len],
            ));
        }
    }
    // z = 0 is what a forward of all-zero weights returns; it is never divided by then.
    let unused = fwd.z == 0.0 && weight.iter().all(|&w| w == 0.0);
    if !(unused || fwd.z.is_finite() && fwd.z > 0.0) {
        return Err(Error::invalid(
            OP,
            "fwd.z",
            format!("{} is not a positive finite normaliser", fwd.z),
        ));
    }
    Ok(())
}

/// log(1 − eˣ) clamped away from log 0 (at log 1e-30), for the not-to-recommend loss and its
/// coefficients alike; NaN stays NaN (`f64::max` would drop it).
fn log1mexp_clamped(x: f64) -> f64 {
    let l = log1mexp(x);
    if l.is_nan() {
        l
    } else {
        l.max(1e-30f64.ln())
    }
}

/// log(1 − eˣ) for x ≤ 0, stable at both ends (Mächler's rule).
pub(crate) fn log1mexp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}
