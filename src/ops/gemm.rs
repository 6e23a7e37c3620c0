//! The GEMM core's crate-internal seam: one strided, batched GEMM with a fused epilogue that
//! every backend implements once and every op family (linear, gated cross, attention
//! projections, in-batch softmax tiles) describes its matrix products with.
//!
//! ```text
//! for g in 0..batch, i in 0..m, j in 0..n:
//!     acc  = alpha · Σ_k A(g,i,k) · B(g,k,j)                    (f32 accumulation)
//!     z    = acc + bias[bias_offset + g·bias_stride + j]         (if bias)
//!     pre(g,i,j) = z                                             (if a pre-activation output)
//!     y    = act(z) · mul(g,i,j) + residual(g,i,j) + [accumulate] C(g,i,j)
//!     C(g,i,j) = y                                               (rounded to C's dtype)
//! ```
//! `mul` (an elementwise multiplier, e.g. DCN-V2's `x0 ⊙ (·)`) and `residual` default to 1
//! and 0; the old C is read before it is written.
//!
//! **Gated** epilogue (`gated = true`, the GDCN cross layer): the n columns come in pairs
//! `(2j, 2j+1)` = (cross, gate) of interleaved packed weights, and only `n/2` outputs exist:
//! ```text
//!     y(g,i,j) = mul(g,i,j) · z(2j) · σ(z(2j+1)) + residual(g,i,j) + [accumulate] C(g,i,j)
//! ```
//! `pre` then holds all n columns (`pre_view`), C, mul and residual hold n/2 (`c_view`).
//!
//! The output views (C, and pre) must map distinct (g, i, j) to distinct elements: backends write
//! them in parallel.
//!
//! `X(g,i,j)` lives at element `offset + g·batch_stride + i·row_stride + j·col_stride` of its
//! tensor. Strides let one kernel serve `x·Wᵀ` (forward), `dZ·W` (input gradient) and
//! `dZᵀ·X` (weight gradient) without transposing anything in memory; the weight-gradient
//! reduction over the batch runs along k inside one thread's accumulator, so it is
//! deterministic with no atomics.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The activation applied in an epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// max(z, 0).
    Relu,
    /// Exact GELU, `z·Φ(z)` with the erf form (not the tanh approximation).
    Gelu,
    /// Logistic sigmoid, computed in f32.
    Sigmoid,
}

impl Activation {
    /// Small integer id shared by the CPU, CUDA and WGSL epilogues.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub(crate) fn id(self) -> u32 {
        match self {
            Activation::None => 0,
            Activation::Relu => 1,
            Activation::Gelu => 2,
            Activation::Sigmoid => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::Sigmoid => "sigmoid",
        }
    }
}

/// Where the elements of one logical `[batch, rows, cols]` operand live in its tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MatView {
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
    pub batch_stride: usize,
}

impl MatView {
    pub(crate) fn new(
        offset: usize,
        row_stride: usize,
        col_stride: usize,
        batch_stride: usize,
    ) -> Self {
        MatView {
            offset,
            row_stride,
            col_stride,
            batch_stride,
        }
    }

    /// The largest element index touched by a `[batch, rows, cols]` view, plus one, or `None`
    /// when that overflows `usize`.
    pub(crate) fn checked_extent(&self, batch: usize, rows: usize, cols: usize) -> Option<usize> {
        if batch == 0 || rows == 0 || cols == 0 {
            return Some(0);
        }
        let span = |n: usize, s: usize| (n - 1).checked_mul(s);
        self.offset
            .checked_add(span(batch, self.batch_stride)?)?
            .checked_add(span(rows, self.row_stride)?)?
            .checked_add(span(cols, self.col_stride)?)?
            .checked_add(1)
    }

    /// Whether distinct (g, i, j) of a `[batch, rows, cols]` view address distinct elements
    /// (sufficient test: ordered by stride, each axis of size > 1 steps past everything the
    /// smaller axes span). Output views must be, or two threads would write one element.
    pub(crate) fn is_injective(&self, batch: usize, rows: usize, cols: usize) -> bool {
        let mut axes: Vec<(usize, usize)> = [
            (self.batch_stride, batch),
            (self.row_stride, rows),
            (self.col_stride, cols),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .collect();
        axes.sort_unstable();
        let mut spanned = 0usize; // the largest offset the smaller axes reach
        for (stride, n) in axes {
            if stride <= spanned {
                return false;
            }
            match (n - 1)
                .checked_mul(stride)
                .and_then(|s| s.checked_add(spanned))
            {
                Some(s) => spanned = s,
                None => return false,
            }
        }
        true
    }

    #[inline]
    pub(crate) fn at(&self, g: usize, i: usize, j: usize) -> usize {
        self.offset + g * self.batch_stride + i * self.row_stride + j * self.col_stride
    }
}

/// One batched GEMM with its epilogue. Validation of user-facing shapes happens in the ops;
/// `check` here only guards the index arithmetic every backend relies on.
pub(crate) struct Gemm<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub alpha: f32,
    pub a: &'a Tensor,
    pub a_view: MatView,
    pub b: &'a Tensor,
    pub b_view: MatView,
    /// Bias indexed `bias[bias_offset + g·bias_batch_stride + j]`.
    pub bias: Option<(&'a Tensor, usize)>,
    /// Element offset of the bias (a run of weight sets that starts past set 0).
    pub bias_offset: usize,
    pub act: Activation,
    /// Elementwise multiplier applied after the activation, laid out like C.
    pub mul: Option<&'a Tensor>,
    /// Residual, laid out like C.
    pub residual: Option<&'a Tensor>,
    /// The GDCN pair epilogue (see the module docs); requires `act == None` and even `n`.
    pub gated: bool,
    /// Add into C's existing values instead of overwriting them.
    pub accumulate: bool,
    /// Layout of C, and of `mul` and `residual` when present.
    pub c_view: MatView,
    /// Layout of the pre-activation output (equal to `c_view` unless `gated`).
    pub pre_view: MatView,
    /// f32 operands may use TF32 tensor cores (CUDA only; others ignore it).
    pub allow_tf32: bool,
}

/// The widest element index that the 32-bit kernels can address.
pub(crate) const MAX_INDEX_32: usize = i32::MAX as usize;

impl<'a> Gemm<'a> {
    /// A single (batch = 1) product `C[m, n] = A·B` with no epilogue, C row-major contiguous;
    /// callers add epilogue fields with struct-update syntax.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plain(
        m: usize,
        n: usize,
        k: usize,
        a: &'a Tensor,
        a_view: MatView,
        b: &'a Tensor,
        b_view: MatView,
    ) -> Gemm<'a> {
        Gemm {
            m,
            n,
            k,
            batch: 1,
            alpha: 1.0,
            a,
            a_view,
            b,
            b_view,
            bias: None,
            bias_offset: 0,
            act: Activation::None,
            mul: None,
            residual: None,
            gated: false,
            accumulate: false,
            c_view: MatView::new(0, n, 1, 0),
            pre_view: MatView::new(0, n, 1, 0),
            allow_tf32: false,
        }
    }

    /// Checks that every view stays inside its tensor and that all indices fit the 32-bit index
    /// arithmetic of the GPU kernels.
    pub(crate) fn check(&self, op: &'static str, c: &Tensor, pre: Option<&Tensor>) -> Result<()> {
        let fits =
            |arg: &'static str, t: &Tensor, v: &MatView, r: usize, cl: usize| -> Result<()> {
                let ext = v.checked_extent(self.batch, r, cl).ok_or_else(|| {
                    Error::invalid(op, arg, "view offsets overflow usize".to_string())
                })?;
                if ext > t.numel() {
                    return Err(Error::invalid(
                        op,
                        arg,
                        format!("view needs {ext} elements, tensor has {}", t.numel()),
                    ));
                }
                if t.numel() > MAX_INDEX_32 {
                    return Err(Error::invalid(
                        op,
                        arg,
                        format!(
                            "{} elements exceed the 32-bit index limit {MAX_INDEX_32}",
                            t.numel()
                        ),
                    ));
                }
                Ok(())
            };
        fits("a", self.a, &self.a_view, self.m, self.k)?;
        fits("b", self.b, &self.b_view, self.k, self.n)?;
        let out_n = if self.gated { self.n / 2 } else { self.n };
        if self.gated && (self.n % 2 != 0 || self.act != Activation::None) {
            return Err(Error::invalid(
                op,
                "gated",
                format!(
                    "needs an even n (got {}) and no activation (got {})",
                    self.n,
                    self.act.name()
                ),
            ));
        }
        fits("c", c, &self.c_view, self.m, out_n)?;
        // The backends write outputs from many threads without synchronisation (and the CPU
        // epilogue's `unsafe` writes rely on it): each output element must be one thread's.
        let empty = self.batch == 0 || self.m == 0 || out_n == 0;
        if !empty && !self.c_view.is_injective(self.batch, self.m, out_n) {
            return Err(Error::invalid(
                op,
                "c",
                format!("output view {:?} addresses an element twice", self.c_view),
            ));
        }
        if pre.is_some() && !empty && !self.pre_view.is_injective(self.batch, self.m, self.n) {
            return Err(Error::invalid(
                op,
                "pre",
                format!("output view {:?} addresses an element twice", self.pre_view),
            ));
        }
        if let Some(r) = self.residual {
            fits("residual", r, &self.c_view, self.m, out_n)?;
        }
        if let Some(r) = self.mul {
            fits("mul", r, &self.c_view, self.m, out_n)?;
        }
        if let Some(p) = pre {
            fits("pre", p, &self.pre_view, self.m, self.n)?;
        }
        if let Some((bias, bs)) = self.bias {
            let bv = MatView::new(self.bias_offset, 0, 1, bs);
            fits("bias", bias, &bv, 1, self.n)?;
        }
        Ok(())
    }
}

/// f32 activation shared by the CPU backends (the GPU kernels implement the same formulas).
#[inline]
pub(crate) fn act_f32(act: Activation, z: f32) -> f32 {
    match act {
        Activation::None => z,
        // NaN stays NaN (PyTorch's rule; `f32::max` drops it).
        Activation::Relu => {
            if z > 0.0 || z.is_nan() {
                z
            } else {
                0.0
            }
        }
        Activation::Gelu => 0.5 * z * (1.0 + erf_f32(z * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::Sigmoid => 1.0 / (1.0 + (-z).exp()),
    }
}

/// d act / dz at the pre-activation z, in f32.
#[inline]
pub(crate) fn act_grad_f32(act: Activation, z: f32) -> f32 {
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
            let cdf = 0.5 * (1.0 + erf_f32(z * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * z * z).exp() * 0.398_942_3;
            cdf + z * pdf
        }
        Activation::Sigmoid => {
            let s = 1.0 / (1.0 + (-z).exp());
            s * (1.0 - s)
        }
    }
}

/// erf for the f32 CPU epilogue, evaluated in f64: cheap next to the GEMM, and it keeps the
/// CPU backend's error budget to the rounding of its inputs and outputs.
#[inline]
pub(crate) fn erf_f32(x: f32) -> f32 {
    erf_f64(x as f64) as f32
}

/// erf in f64 to ~1e-15 (used by the reference and the CPU epilogue).
pub(crate) fn erf_f64(x: f64) -> f64 {
    // Series for small |x|, continued fraction (Lentz) for erfc at large |x|.
    let ax = x.abs();
    let r = if ax < 2.5 {
        let mut sum = ax;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let x2 = ax * ax;
        let mut f = 0.0f64;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        1.0 - (-x2).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::MatView;

    #[test]
    fn views_injective_and_extent_checked() {
        // Row-major, padded rows, transposed, batched: injective.
        assert!(MatView::new(0, 8, 1, 0).is_injective(1, 4, 8));
        assert!(MatView::new(3, 10, 1, 0).is_injective(1, 4, 8));
        assert!(MatView::new(0, 1, 4, 0).is_injective(1, 4, 8));
        assert!(MatView::new(0, 8, 1, 32).is_injective(2, 4, 8));
        // Zero stride, overlapping rows, overlapping batches: not.
        assert!(!MatView::new(0, 0, 1, 0).is_injective(1, 4, 8));
        assert!(!MatView::new(0, 4, 1, 0).is_injective(1, 4, 8));
        assert!(!MatView::new(0, 8, 1, 16).is_injective(2, 4, 8));
        // Size-1 axes may have any stride.
        assert!(MatView::new(0, 0, 1, 0).is_injective(1, 1, 8));
        // Overflowing offsets are None, not a wrapped index.
        assert_eq!(MatView::new(0, 8, 1, 0).checked_extent(1, 4, 8), Some(32));
        assert_eq!(
            MatView::new(usize::MAX, 1, 1, 0).checked_extent(1, 2, 2),
            None
        );
        assert_eq!(
            MatView::new(0, usize::MAX / 2, 1, 0).checked_extent(1, 4, 1),
            None
        );
    }
}
