//! Hiformer's low-rank composite projection: Q, K and V are computed from all features
//! concatenated, through a low-rank factorisation:
//! ```text
//! x̄   = reshape(X, [B, L·d])              (a free view)
//! Z   = x̄·Aᵀ      A = [A_Q; A_K; A_V]: [r_q + r_k + r_v, L·d]    (one GEMM for all three)
//! T   = Z_T·R_Tᵀ  R_T: [L_T·H·d_T, r_T]  → written straight into [B, L_T, H, d_T]
//! ```
//! Backward: `dR_T = dTᵀ·Z_T`, `dZ_T = dT·R_T`, `dA = dZᵀ·x̄`, `dx̄ = dZ·A` — all on the GEMM
//! core, so every backend that has the GEMM has this op; the batch reductions (dR, dA) run along
//! the GEMM's k axis and are deterministic.
//!
//! ```
//! use recfuse::ops::lowrank_qkv::{LowRankQkv, QkvWeights};
//! use recfuse::{DType, Device, Tensor};
//! let dev = Device::cpu();
//! let cfg = LowRankQkv { tokens: 3, width: 4, heads: 2, dk: 2, dv: 5, q_tokens: 3, rank_qk: 6, rank_v: 7 };
//! let w = QkvWeights {
//!     a: Tensor::full(&[6 + 6 + 7, 12], 0.01, DType::F32, &dev)?,
//!     rq: Tensor::full(&[3 * 2 * 2, 6], 0.1, DType::F32, &dev)?,
//!     rk: Tensor::full(&[3 * 2 * 2, 6], 0.1, DType::F32, &dev)?,
//!     rv: Tensor::full(&[3 * 2 * 5, 7], 0.1, DType::F32, &dev)?,
//! };
//! let x = Tensor::full(&[8, 3, 4], 1.0, DType::F32, &dev)?;
//! let out = cfg.forward(&x, &w)?;
//! assert_eq!(out.v.shape(), &[8, 3, 2, 5]);
//! # Ok::<(), recfuse::Error>(())
//! ```

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend::{self, same_device};
use crate::ops::gemm::{Gemm, MatView};
use crate::tensor::Tensor;

const OP: &str = "lowrank_qkv";

/// Shapes of the composite projection.
#[derive(Clone, Debug)]
pub struct LowRankQkv {
    /// L, feature tokens (keys and values are made for all of them).
    pub tokens: usize,
    /// d, token width.
    pub width: usize,
    pub heads: usize,
    pub dk: usize,
    pub dv: usize,
    /// L_q: queries are made for the last `q_tokens` tokens (L for a full layer, t when pruned).
    pub q_tokens: usize,
    /// r_q = r_k.
    pub rank_qk: usize,
    pub rank_v: usize,
}

/// Weights: `a: [2·r_qk + r_v, L·d]`, `rq: [L_q·H·d_k, r_qk]`, `rk: [L·H·d_k, r_qk]`,
/// `rv: [L·H·d_v, r_v]` (all `[out, in]`).
#[derive(Debug)]
pub struct QkvWeights {
    pub a: Tensor,
    pub rq: Tensor,
    pub rk: Tensor,
    pub rv: Tensor,
}

/// Forward outputs: Q `[B, L_q, H, d_k]`, K `[B, L, H, d_k]`, V `[B, L, H, d_v]`, and the
/// intermediate Z `[B, 2·r_qk + r_v]` that backward needs.
#[derive(Debug)]
pub struct QkvOut {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub z: Tensor,
}

impl LowRankQkv {
    fn r_total(&self) -> usize {
        2 * self.rank_qk + self.rank_v
    }

    /// Shapes of Q, K, V for a batch of `b`.
    fn out_shapes(&self, b: usize) -> [[usize; 4]; 3] {
        [
            [b, self.q_tokens, self.heads, self.dk],
            [b, self.tokens, self.heads, self.dk],
            [b, self.tokens, self.heads, self.dv],
        ]
    }

    /// (rows of R, rank, column offset of Z) for Q, K, V.
    fn parts(&self) -> [(usize, usize, usize); 3] {
        let (h, r) = (self.heads, self.rank_qk);
        [
            (self.q_tokens * h * self.dk, r, 0),
            (self.tokens * h * self.dk, r, r),
            (self.tokens * h * self.dv, self.rank_v, 2 * r),
        ]
    }

    fn check(&self, op: &'static str, x: &Tensor, w: &QkvWeights) -> Result<usize> {
        let (l, d) = (self.tokens, self.width);
        if self.q_tokens > l || self.q_tokens == 0 {
            return Err(Error::invalid(
                op,
                "q_tokens",
                format!("{} is not in 1..={l}", self.q_tokens),
            ));
        }
        let xs = x.shape();
        if xs.len() != 3 || xs[1] != l || xs[2] != d {
            return Err(Error::shape(op, "x", format!("[B, {l}, {d}]"), xs));
        }
        let dev = x.device();
        let chk = |arg: &'static str, t: &Tensor, s: [usize; 2]| -> Result<()> {
            same_device(op, arg, &dev, t)?;
            if t.shape() != s {
                return Err(Error::shape(op, arg, format!("{s:?}"), t.shape()));
            }
            if t.dtype() != x.dtype() {
                return Err(Error::DType {
                    op,
                    arg,
                    expected: x.dtype().to_string(),
                    actual: t.dtype(),
                });
            }
            Ok(())
        };
        chk("w.a", &w.a, [self.r_total(), l * d])?;
        let [pq, pk, pv] = self.parts();
        chk("w.rq", &w.rq, [pq.0, pq.1])?;
        chk("w.rk", &w.rk, [pk.0, pk.1])?;
        chk("w.rv", &w.rv, [pv.0, pv.1])?;
        Ok(xs[0])
    }

    /// Forward: one GEMM for Z, then one per T written in the attention layout.
    pub fn forward(&self, x: &Tensor, w: &QkvWeights) -> Result<QkvOut> {
        let b = self.check(OP, x, w)?;
        let dev = x.device();
        let (ld, rt) = (self.tokens * self.width, self.r_total());
        let mut z = Tensor::zeros(&[b, rt], x.dtype(), &dev)?;
        let shapes = self.out_shapes(b);
        let g = Gemm::plain(
            b,
            rt,
            ld,
            x,
            MatView::new(0, ld, 1, 0),
            &w.a,
            MatView::new(0, 1, ld, 0),
        );
        g.check(OP, &z, None)?;
        backend::gemm(&dev, &g, &mut z, None)?;
        let mut outs = Vec::with_capacity(3);
        for ((n, r, off), (rm, shape)) in self
            .parts()
            .into_iter()
            .zip([&w.rq, &w.rk, &w.rv].into_iter().zip(shapes))
        {
            let mut t = Tensor::zeros(&shape, x.dtype(), &dev)?;
            let g = Gemm::plain(
                b,
                n,
                r,
                &z,
                MatView::new(off, rt, 1, 0),
                rm,
                MatView::new(0, 1, r, 0),
            );
            g.check(OP, &t, None)?;
            backend::gemm(&dev, &g, &mut t, None)?;
            outs.push(t);
        }
        let v = outs
            .pop()
            .ok_or_else(|| Error::invalid(OP, "v", "missing"))?;
        let k = outs
            .pop()
            .ok_or_else(|| Error::invalid(OP, "k", "missing"))?;
        let q = outs
            .pop()
            .ok_or_else(|| Error::invalid(OP, "q", "missing"))?;
        Ok(QkvOut { q, k, v, z })
    }

    /// Backward from dQ, dK, dV: returns dx `[B, L, d]` and the weight gradients (written, or
    /// added into `grads` with `accumulate`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &Tensor,
        w: &QkvWeights,
        out: &QkvOut,
        dq: &Tensor,
        dk: &Tensor,
        dv: &Tensor,
        grads: &mut QkvWeights,
        accumulate: bool,
    ) -> Result<Tensor> {
        const OP_B: &str = "lowrank_qkv_backward";
        let b = self.check(OP_B, x, w)?;
        self.check(OP_B, x, grads)?;
        let dev = x.device();
        let (ld, rt) = (self.tokens * self.width, self.r_total());
        // `out` must be this batch's forward (it is a public struct), and the gradients its
        // shapes: a bigger batch's used to be read silently in its first rows.
        same_device(OP_B, "out.z", &dev, &out.z)?;
        if out.z.shape() != [b, rt] {
            return Err(Error::shape(
                OP_B,
                "out.z",
                format!("[{b}, {rt}]"),
                out.z.shape(),
            ));
        }
        let [sq, sk, sv] = self.out_shapes(b);
        for (arg, t, s) in [
            ("out.q", &out.q, &sq),
            ("out.k", &out.k, &sk),
            ("out.v", &out.v, &sv),
            ("dq", dq, &sq),
            ("dk", dk, &sk),
            ("dv", dv, &sv),
        ] {
            same_device(OP_B, arg, &dev, t)?;
            if t.shape() != s {
                return Err(Error::shape(OP_B, arg, format!("{s:?}"), t.shape()));
            }
        }
        // dZ in f32: its three column blocks are written by three GEMMs, then feed two more.
        let mut dz = Tensor::zeros(&[b, rt], DType::F32, &dev)?;
        let gm = [&mut grads.rq, &mut grads.rk, &mut grads.rv];
        for (((n, r, off), (rm, gr)), dt) in self
            .parts()
            .into_iter()
            .zip([&w.rq, &w.rk, &w.rv].into_iter().zip(gm))
            .zip([dq, dk, dv])
        {
            // dR = dTᵀ·Z_T: [n, r], the batch is the reduction.
            let g = Gemm {
                accumulate,
                ..Gemm::plain(
                    n,
                    r,
                    b,
                    dt,
                    MatView::new(0, 1, n, 0),
                    &out.z,
                    MatView::new(off, rt, 1, 0),
                )
            };
            g.check(OP_B, gr, None)?;
            backend::gemm(&dev, &g, gr, None)?;
            // dZ_T = dT·R_T, into Z's column block.
            let g = Gemm {
                c_view: MatView::new(off, rt, 1, 0),
                pre_view: MatView::new(off, rt, 1, 0),
                ..Gemm::plain(
                    b,
                    r,
                    n,
                    dt,
                    MatView::new(0, n, 1, 0),
                    rm,
                    MatView::new(0, r, 1, 0),
                )
            };
            g.check(OP_B, &dz, None)?;
            backend::gemm(&dev, &g, &mut dz, None)?;
        }
        // dA = dZᵀ·x̄: [rt, L·d].
        let g = Gemm {
            accumulate,
            ..Gemm::plain(
                rt,
                ld,
                b,
                &dz,
                MatView::new(0, 1, rt, 0),
                x,
                MatView::new(0, ld, 1, 0),
            )
        };
        g.check(OP_B, &grads.a, None)?;
        backend::gemm(&dev, &g, &mut grads.a, None)?;
        // dx̄ = dZ·A.
        let mut dx = Tensor::zeros(x.shape(), x.dtype(), &dev)?;
        let g = Gemm::plain(
            b,
            ld,
            rt,
            &dz,
            MatView::new(0, rt, 1, 0),
            &w.a,
            MatView::new(0, ld, 1, 0),
        );
        g.check(OP_B, &dx, None)?;
        backend::gemm(&dev, &g, &mut dx, None)?;
        Ok(dx)
    }
}
