//! Fast CPU kernels. The matrix product itself is the `gemm` crate's packed, cache-blocked,
//! SIMD, rayon-parallel f32 kernel (its micro-kernels reach MKL-class throughput; writing our own
//! would only re-derive them). What recfuse adds on the CPU is the same seam as on the GPUs:
//! strided batched operands, 16-bit storage widened once, and a fused, row-parallel epilogue.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::gemm::{act_f32, act_grad_f32, Gemm};
use crate::tensor::{CpuStorage, Tensor};

fn host<'a>(op: &'static str, arg: &'static str, t: &'a Tensor) -> Result<&'a CpuStorage> {
    t.cpu().ok_or_else(|| Error::DeviceMismatch {
        op,
        arg,
        expected: "cpu".into(),
        actual: t.device().describe(),
    })
}

/// f32 view of a host tensor: borrowed when it already is f32, widened once otherwise.
fn widened(s: &CpuStorage) -> std::borrow::Cow<'_, [f32]> {
    match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(v.as_slice()),
        other => std::borrow::Cow::Owned(other.to_f32()),
    }
}

/// Writes f32 values into storage of any dtype at the given indices (rounding once).
trait Store {
    fn get(&self, i: usize) -> f32;
}

impl Store for CpuStorage {
    fn get(&self, i: usize) -> f32 {
        match self {
            CpuStorage::F32(v) => v[i],
            CpuStorage::BF16(v) => v[i].to_f32(),
            CpuStorage::F16(v) => v[i].to_f32(),
        }
    }
}

/// A raw pointer to the output storage that rayon tasks write disjoint elements through.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut u8,
    dtype: crate::DType,
}
// SAFETY: every parallel task writes a disjoint set of elements (one output row of one batch),
// and the storage outlives the parallel region, so sharing the pointer across threads is sound.
unsafe impl Send for OutPtr {}
// SAFETY: as above; no element is written by two tasks.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn new(s: &mut CpuStorage) -> OutPtr {
        let dtype = s.dtype();
        let ptr = match s {
            CpuStorage::F32(v) => v.as_mut_ptr() as *mut u8,
            CpuStorage::BF16(v) => v.as_mut_ptr() as *mut u8,
            CpuStorage::F16(v) => v.as_mut_ptr() as *mut u8,
        };
        OutPtr { ptr, dtype }
    }

    /// # Safety
    /// `i` must be in bounds of the storage and written by no other thread concurrently.
    unsafe fn read(&self, i: usize) -> f32 {
        // SAFETY: the caller guarantees `i` is in bounds and not concurrently written.
        unsafe {
            match self.dtype {
                crate::DType::F32 => *(self.ptr as *const f32).add(i),
                crate::DType::BF16 => (*(self.ptr as *const half::bf16).add(i)).to_f32(),
                crate::DType::F16 => (*(self.ptr as *const half::f16).add(i)).to_f32(),
            }
        }
    }

    /// # Safety
    /// As for `read`.
    unsafe fn write(&self, i: usize, v: f32) {
        // SAFETY: the caller guarantees `i` is in bounds and owned by this thread.
        unsafe {
            match self.dtype {
                crate::DType::F32 => *(self.ptr as *mut f32).add(i) = v,
                crate::DType::BF16 => {
                    *(self.ptr as *mut half::bf16).add(i) = half::bf16::from_f32(v)
                }
                crate::DType::F16 => *(self.ptr as *mut half::f16).add(i) = half::f16::from_f32(v),
            }
        }
    }
}

/// The whole GEMM + epilogue on the CPU.
pub(crate) fn gemm(p: &Gemm<'_>, c: &mut Tensor, pre: Option<&mut Tensor>) -> Result<()> {
    const OP: &str = "gemm(cpu)";
    let a = widened(host(OP, "a", p.a)?);
    let b = widened(host(OP, "b", p.b)?);
    let bias = match p.bias {
        Some((t, bs)) => Some((widened(host(OP, "bias", t)?), bs)),
        None => None,
    };
    let residual = match p.residual {
        Some(t) => Some(host(OP, "residual", t)?),
        None => None,
    };
    let mul = match p.mul {
        Some(t) => Some(host(OP, "mul", t)?),
        None => None,
    };
    let out = OutPtr::new(c.cpu_mut().ok_or_else(|| Error::DeviceMismatch {
        op: OP,
        arg: "c",
        expected: "cpu".into(),
        actual: "another device".into(),
    })?);
    let pre_out = match pre {
        Some(t) => Some(OutPtr::new(t.cpu_mut().ok_or_else(|| {
            Error::DeviceMismatch {
                op: OP,
                arg: "pre",
                expected: "cpu".into(),
                actual: "another device".into(),
            }
        })?)),
        None => None,
    };
    let (m, n) = (p.m, p.n);
    // One batch entry: its product into `acc`, then the fused epilogue row by row. `inner`
    // says whether the product and the rows may use the thread pool themselves.
    let run = |g: usize, acc: &mut Vec<f32>, inner: bool| {
        acc.resize(m * n, 0.0);
        let (av, bv) = (p.a_view, p.b_view);
        // With k = 0 the operands are never read (and may be empty): `get` instead of slicing
        // keeps an offset past their end from panicking.
        matmul_f32(
            (m, n, p.k),
            acc,
            n,
            false,
            (
                a.get(av.offset + g * av.batch_stride..).unwrap_or(&[]),
                av.row_stride,
                av.col_stride,
            ),
            (
                b.get(bv.offset + g * bv.batch_stride..).unwrap_or(&[]),
                bv.row_stride,
                bv.col_stride,
            ),
            inner,
        );
        let (cv, pv) = (p.c_view, p.pre_view);
        let epilogue = |(i, row): (usize, &[f32])| {
            let z_at = |j: usize| -> f32 {
                let mut z = p.alpha * row[j];
                if let Some((bias, bs)) = &bias {
                    z += bias[p.bias_offset + g * bs + j];
                }
                z
            };
            if let Some(po) = &pre_out {
                for j in 0..n {
                    // SAFETY: `Gemm::check` verified pre_view's extent against `pre`; element
                    // (g, i, j) is written only by the task that owns row i of batch g.
                    unsafe { po.write(pv.at(g, i, j), z_at(j)) };
                }
            }
            let out_n = if p.gated { n / 2 } else { n };
            for j in 0..out_n {
                let idx = cv.at(g, i, j);
                let mut y = if p.gated {
                    z_at(2 * j) * act_f32(crate::Activation::Sigmoid, z_at(2 * j + 1))
                } else {
                    act_f32(p.act, z_at(j))
                };
                if let Some(mv) = mul {
                    y *= mv.get(idx);
                }
                if let Some(r) = residual {
                    y += r.get(idx);
                }
                // SAFETY: `Gemm::check` verified c_view's extent against C; element (g, i, j)
                // is read and written only by the task that owns row i of batch g.
                unsafe {
                    if p.accumulate {
                        y += out.read(idx);
                    }
                    out.write(idx, y);
                }
            }
        };
        if inner {
            acc.par_chunks(n.max(1)).enumerate().for_each(epilogue);
        } else {
            acc.chunks(n.max(1)).enumerate().for_each(epilogue);
        }
    };
    // Many small products (grouped per-token layers): one batch entry per task. Only when the
    // batch entries' outputs are disjoint (non-zero batch strides), so no two tasks share an
    // element; otherwise (and for big products) batches run in order with threaded GEMMs.
    let disjoint =
        p.c_view.batch_stride != 0 && (pre_out.is_none() || p.pre_view.batch_stride != 0);
    let small = m * n * p.k < 1 << 22;
    if p.batch > 1 && small && disjoint {
        (0..p.batch)
            .into_par_iter()
            .for_each_init(Vec::new, |acc, g| run(g, acc, false));
    } else {
        let mut acc = Vec::new();
        for g in 0..p.batch {
            run(g, &mut acc, true);
        }
    }
    Ok(())
}

/// dz = dy ⊙ act'(pre), elementwise over contiguous tensors of equal size.
pub(crate) fn act_backward(
    dy: &Tensor,
    pre: Option<&Tensor>,
    act: crate::Activation,
    dz: &mut Tensor,
) -> Result<()> {
    const OP: &str = "act_backward(cpu)";
    let dyv = widened(host(OP, "dy", dy)?);
    let prev = match pre {
        Some(p) => Some(widened(host(OP, "pre", p)?)),
        None => None,
    };
    let out = OutPtr::new(
        dz.cpu_mut()
            .ok_or_else(|| Error::invalid(OP, "dz", "not on the cpu"))?,
    );
    dyv.par_chunks(4096).enumerate().for_each(|(c, chunk)| {
        for (o, &d) in chunk.iter().enumerate() {
            let i = c * 4096 + o;
            let gz = match &prev {
                Some(pv) => act_grad_f32(act, pv[i]),
                None => 1.0,
            };
            // SAFETY: i < numel (dz has dy's size, checked by the caller); chunks are disjoint.
            unsafe { out.write(i, d * gz) };
        }
    });
    Ok(())
}

/// out[j] (+)= Σ_i x[i·cols + j]: a deterministic column sum (fixed order per column). With
/// `skip_odd` the odd columns of x count as zeros (structural zeros of an interleaved layout).
pub(crate) fn col_sum(
    x: &Tensor,
    rows: usize,
    cols: usize,
    out: &mut Tensor,
    accumulate: bool,
    skip_odd: bool,
) -> Result<()> {
    const OP: &str = "col_sum(cpu)";
    let xv = widened(host(OP, "x", x)?);
    let o = OutPtr::new(
        out.cpu_mut()
            .ok_or_else(|| Error::invalid(OP, "out", "not on the cpu"))?,
    );
    (0..cols).into_par_iter().with_min_len(64).for_each(|j| {
        let mut s = 0f32;
        if !(skip_odd && j % 2 == 1) {
            for i in 0..rows {
                s += xv[i * cols + j];
            }
        }
        // SAFETY: j < cols ≤ out.numel() (checked by the caller); each j has one task.
        unsafe {
            if accumulate {
                s += o.read(j);
            }
            o.write(j, s);
        }
    });
    Ok(())
}

/// See `ops::backend::gate_backward`.
pub(crate) fn gate_backward(
    gbar: &Tensor,
    c0: &Tensor,
    pre: &Tensor,
    gated: bool,
    delta: &mut Tensor,
    dx0: &mut Tensor,
) -> Result<()> {
    const OP: &str = "gate_backward(cpu)";
    let g = widened(host(OP, "gbar", gbar)?);
    let c0 = widened(host(OP, "c0", c0)?);
    let pre = widened(host(OP, "pre", pre)?);
    let dl = OutPtr::new(
        delta
            .cpu_mut()
            .ok_or_else(|| Error::invalid(OP, "delta", "not on the cpu"))?,
    );
    let dx = OutPtr::new(
        dx0.cpu_mut()
            .ok_or_else(|| Error::invalid(OP, "dx0", "not on the cpu"))?,
    );
    let p = if gated { 2 } else { 1 };
    (0..g.len())
        .into_par_iter()
        .with_min_len(1024)
        .for_each(|k| {
            let (gk, ck) = (g[k], c0[k]);
            let u = pre[p * k];
            // SAFETY: k < rows·D; delta has rows·P = p·(rows·D) elements and dx0 rows·D (checked by
            // the op); each k is owned by one task.
            unsafe {
                if gated {
                    let s = 1.0 / (1.0 + (-pre[p * k + 1]).exp());
                    let du = gk * ck * s;
                    dl.write(2 * k, du);
                    dl.write(2 * k + 1, du * u * (1.0 - s));
                    dx.write(k, dx.read(k) + gk * u * s);
                } else {
                    dl.write(k, gk * ck);
                    dx.write(k, dx.read(k) + gk * u);
                }
            }
        });
    Ok(())
}

/// out = a (+ b).
pub(crate) fn add(a: &Tensor, b: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
    const OP: &str = "add(cpu)";
    let av = widened(host(OP, "a", a)?);
    let bv = match b {
        Some(t) => Some(widened(host(OP, "b", t)?)),
        None => None,
    };
    let o = OutPtr::new(
        out.cpu_mut()
            .ok_or_else(|| Error::invalid(OP, "out", "not on the cpu"))?,
    );
    (0..av.len())
        .into_par_iter()
        .with_min_len(4096)
        .for_each(|k| {
            let v = av[k] + bv.as_ref().map_or(0.0, |b| b[k]);
            // SAFETY: k < numel of a = numel of out (checked by the caller); one task per k.
            unsafe { o.write(k, v) };
        });
    Ok(())
}

/// `dst[m×n] (+)= A·B` on f32 slices with explicit strides (row, col), threads when large.
/// Every extent is checked against its slice, so this helper is safe to call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let ext = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs + 1;
    assert!(
        ext(dst_rs, 1, m, n) <= dst.len(),
        "matmul_f32: dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n]
                    .iter_mut()
                    .for_each(|v| *v = 0.0);
            }
        }
        return;
    }
    assert!(
        ext(a_rs, a_cs, m, k) <= a.len(),
        "matmul_f32: a out of bounds"
    );
    assert!(
        ext(b_rs, b_cs, k, n) <= b.len(),
        "matmul_f32: b out of bounds"
    );
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k > 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the product touches in dst, a and b; dst is
    // exclusively borrowed, a and b are shared borrows that outlive the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
