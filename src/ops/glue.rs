//! Glue between layers, on the device: concatenation along the feature (last) axis and its
//! backward ([`split`]), [`slice`] along any axis and its backward, and [`sum`] over an axis
//! and its backward (a broadcast). With these a model's forward and backward stay on the
//! device between the kernels (embedding bags → concat → gated cross → head).
//!
//! Every op here is one of two kernels:
//! * a strided box copy `dst[o, a, c] = src[o, a, c]` over an `(outer, mid, inner)` box whose
//!   inner axis is contiguous on both sides (concat, split, slice and its backward, broadcast:
//!   a source stride of 0 along `mid`);
//! * a reduction over the middle axis of a contiguous `[outer, mid, inner]` tensor,
//!   `out[o, c] = Σ_a x[o, a, c]`, in f32, in a fixed order (deterministic, no atomics).
//!
//! Copies never convert dtypes (use [`Tensor::to_dtype`]); a reduction rounds once on the store.

use crate::error::{Error, Result};
use crate::ops::backend;
use crate::tensor::Tensor;

/// Where a box lives in a flat buffer: element `(o, a, c)` is at
/// `offset + o·s_outer + a·s_mid + c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout3 {
    pub offset: usize,
    pub s_outer: usize,
    pub s_mid: usize,
}

/// `dst[o, a, c] = src[o, a, c]` for `o < outer, a < mid, c < inner` (validated by the op:
/// both boxes in bounds, the destination injective with rows in increasing address order).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Copy3 {
    pub outer: usize,
    pub mid: usize,
    pub inner: usize,
    pub src: Layout3,
    pub dst: Layout3,
}

impl Copy3 {
    pub(crate) fn rows(&self) -> usize {
        self.outer * self.mid
    }

    /// Start of destination (or source) row `r = o·mid + a`.
    pub(crate) fn row_start(l: &Layout3, mid: usize, r: usize) -> usize {
        l.offset + (r / mid) * l.s_outer + (r % mid) * l.s_mid
    }

    /// One past the last element a layout touches (0 for an empty box).
    fn end(&self, l: &Layout3) -> Option<usize> {
        if self.outer == 0 || self.mid == 0 || self.inner == 0 {
            return Some(0);
        }
        let last_o = (self.outer - 1).checked_mul(l.s_outer)?;
        let last_a = (self.mid - 1).checked_mul(l.s_mid)?;
        l.offset
            .checked_add(last_o)?
            .checked_add(last_a)?
            .checked_add(self.inner)
    }

    /// Bounds of both boxes, and a destination whose rows never overlap and increase in
    /// address (what the kernels' one-writer-per-element argument rests on).
    fn check(&self, op: &'static str, src: &Tensor, dst: &Tensor) -> Result<()> {
        let bad = |arg: &'static str, why: String| Err(Error::invalid(op, arg, why));
        match self.end(&self.src) {
            Some(e) if e <= src.numel() => {}
            _ => return bad("src", "the region read is outside the tensor".into()),
        }
        match self.end(&self.dst) {
            Some(e) if e <= dst.numel() => {}
            _ => return bad("dst", "the region written is outside the tensor".into()),
        }
        let d = &self.dst;
        if self.mid > 1 && d.s_mid < self.inner {
            return bad("dst", "rows of the written region overlap".into());
        }
        if self.outer > 1
            && d.s_outer
                < (self.mid - 1)
                    .saturating_mul(d.s_mid)
                    .saturating_add(self.inner)
        {
            return bad("dst", "blocks of the written region overlap".into());
        }
        Ok(())
    }
}

/// `out[o, c] = Σ_a x[o, a, c]` over a contiguous `[outer, mid, inner]` x and a contiguous
/// `[outer, inner]` out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SumMid {
    pub outer: usize,
    pub mid: usize,
    pub inner: usize,
}

fn same_dtype(op: &'static str, arg: &'static str, want: &Tensor, t: &Tensor) -> Result<()> {
    if t.dtype() != want.dtype() {
        return Err(Error::DType {
            op,
            arg,
            expected: format!("{} (copies never convert; use to_dtype)", want.dtype()),
            actual: t.dtype(),
        });
    }
    Ok(())
}

fn check_axis(op: &'static str, arg: &'static str, shape: &[usize], axis: usize) -> Result<()> {
    if axis >= shape.len() {
        return Err(Error::invalid(
            op,
            arg,
            format!("axis {axis} out of range for a rank-{} tensor", shape.len()),
        ));
    }
    Ok(())
}

/// (outer, dim, inner) of `shape` around `axis`.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

fn copy3(op: &'static str, p: &Copy3, src: &Tensor, dst: &mut Tensor) -> Result<()> {
    backend::same_device(op, "src", &dst.device(), src)?;
    same_dtype(op, "src", dst, src)?;
    p.check(op, src, dst)?;
    if p.rows() == 0 || p.inner == 0 {
        return Ok(());
    }
    backend::copy3(&dst.device(), p, src, dst)
}

/// Writes `src` into `dst` at `start` along `axis`: `dst[.., start..start+len, ..] = src`
/// (`src` has `dst`'s shape except `len` along `axis`). The in-place building block of
/// [`concat_into`] and [`slice_backward`]; the rest of `dst` is left as it is.
///
/// ```
/// use recfuse::ops::glue::write_slice;
/// use recfuse::{Device, DType, Tensor};
/// let dev = Device::cpu();
/// let mut dst = Tensor::zeros(&[2, 4], DType::F32, &dev)?;
/// let src = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2], &dev)?;
/// write_slice(&mut dst, 1, 1, &src)?;
/// assert_eq!(dst.to_vec::<f32>()?, vec![0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn write_slice(dst: &mut Tensor, axis: usize, start: usize, src: &Tensor) -> Result<()> {
    const OP: &str = "glue::write_slice";
    check_axis(OP, "axis", dst.shape(), axis)?;
    if src.shape().len() != dst.shape().len()
        || src
            .shape()
            .iter()
            .zip(dst.shape())
            .enumerate()
            .any(|(i, (s, d))| i != axis && s != d)
    {
        return Err(Error::shape(
            OP,
            "src",
            format!("{:?} with any size along axis {axis}", dst.shape()),
            src.shape(),
        ));
    }
    let len = src.shape()[axis];
    let (outer, dim, inner) = split_at_axis(dst.shape(), axis);
    if start.checked_add(len).is_none_or(|e| e > dim) {
        return Err(Error::invalid(
            OP,
            "start",
            format!("{start} + {len} (src's size along axis {axis}) exceeds {dim}"),
        ));
    }
    let p = Copy3 {
        outer,
        mid: 1,
        inner: len * inner,
        src: Layout3 {
            offset: 0,
            s_outer: len * inner,
            s_mid: 0,
        },
        dst: Layout3 {
            offset: start * inner,
            s_outer: dim * inner,
            s_mid: 0,
        },
    };
    copy3(OP, &p, src, dst)
}

/// `x[.., start..start+len, ..]` along `axis`, as a new contiguous tensor on x's device.
///
/// ```
/// use recfuse::ops::glue::slice;
/// use recfuse::{Device, Tensor};
/// let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &Device::cpu())?;
/// assert_eq!(slice(&x, 1, 1, 2)?.to_vec::<f32>()?, vec![2.0, 3.0, 5.0, 6.0]);
/// assert_eq!(slice(&x, 0, 1, 1)?.to_vec::<f32>()?, vec![4.0, 5.0, 6.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn slice(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    const OP: &str = "glue::slice";
    check_axis(OP, "axis", x.shape(), axis)?;
    let (outer, dim, inner) = split_at_axis(x.shape(), axis);
    if start.checked_add(len).is_none_or(|e| e > dim) {
        return Err(Error::invalid(
            OP,
            "start",
            format!("{start} + {len} (len) exceeds {dim}, the size of axis {axis}"),
        ));
    }
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    let mut out = Tensor::zeros(&shape, x.dtype(), &x.device())?;
    let p = Copy3 {
        outer,
        mid: 1,
        inner: len * inner,
        src: Layout3 {
            offset: start * inner,
            s_outer: dim * inner,
            s_mid: 0,
        },
        dst: Layout3 {
            offset: 0,
            s_outer: len * inner,
            s_mid: 0,
        },
    };
    copy3(OP, &p, x, &mut out)?;
    Ok(out)
}

/// The backward of [`slice`]: a tensor of `x_shape` that is zero except `dy` at `start`
/// along `axis`.
///
/// ```
/// use recfuse::ops::glue::slice_backward;
/// use recfuse::{Device, Tensor};
/// let dy = Tensor::from_slice(&[1.0f32, 2.0], &[2, 1], &Device::cpu())?;
/// let dx = slice_backward(&dy, &[2, 3], 1, 2)?;
/// assert_eq!(dx.to_vec::<f32>()?, vec![0.0, 0.0, 1.0, 0.0, 0.0, 2.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn slice_backward(dy: &Tensor, x_shape: &[usize], axis: usize, start: usize) -> Result<Tensor> {
    const OP: &str = "glue::slice_backward";
    check_axis(OP, "axis", x_shape, axis)?;
    let mut dx = Tensor::zeros(x_shape, dy.dtype(), &dy.device())?;
    write_slice(&mut dx, axis, start, dy).map_err(|e| rename(e, OP))?;
    Ok(dx)
}

/// Re-labels an error from a building block with the public op the caller called.
fn rename(e: Error, op: &'static str) -> Error {
    match e {
        Error::Shape {
            arg,
            expected,
            actual,
            ..
        } => Error::Shape {
            op,
            arg: if arg == "src" { "dy" } else { arg },
            expected,
            actual,
        },
        Error::InvalidArgument { arg, reason, .. } => Error::InvalidArgument {
            op,
            arg: if arg == "src" { "dy" } else { arg },
            reason,
        },
        other => other,
    }
}

fn check_parts(op: &'static str, parts: &[&Tensor]) -> Result<(Vec<usize>, usize)> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid(op, "parts", "no tensors to concatenate"));
    };
    if first.shape().is_empty() {
        return Err(Error::shape(op, "parts", "rank ≥ 1", first.shape()));
    }
    let lead = &first.shape()[..first.shape().len() - 1];
    let dev = first.device();
    let mut width = 0usize;
    for p in parts {
        let s = p.shape();
        if s.len() != first.shape().len() || &s[..s.len() - 1] != lead {
            return Err(Error::shape(
                op,
                "parts",
                format!("[{lead:?}…, any] like parts[0] (concat joins the last axis)"),
                s,
            ));
        }
        backend::same_device(op, "parts", &dev, p)?;
        same_dtype(op, "parts", first, p)?;
        width = width
            .checked_add(s[s.len() - 1])
            .ok_or_else(|| Error::invalid(op, "parts", "total width overflows usize"))?;
    }
    let mut shape = first.shape().to_vec();
    *shape.last_mut().expect("rank ≥ 1 checked") = width;
    Ok((shape, width))
}

/// Concatenates `parts` along the last (feature) axis: `[.., d_0] ‖ [.., d_1] ‖ …` →
/// `[.., Σ d_i]`. All parts share the leading dims, the dtype and the device.
///
/// ```
/// use recfuse::ops::glue::concat;
/// use recfuse::{Device, Tensor};
/// let dev = Device::cpu();
/// let a = Tensor::from_slice(&[1.0f32, 2.0], &[2, 1], &dev)?;
/// let b = Tensor::from_slice(&[3.0f32, 4.0, 5.0, 6.0], &[2, 2], &dev)?;
/// assert_eq!(concat(&[&a, &b])?.to_vec::<f32>()?, vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn concat(parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "glue::concat";
    let (shape, _) = check_parts(OP, parts)?;
    let mut out = Tensor::zeros(&shape, parts[0].dtype(), &parts[0].device())?;
    concat_into(parts, &mut out)?;
    Ok(out)
}

/// [`concat`] into a caller-owned `out` (every element of `out` is written).
pub fn concat_into(parts: &[&Tensor], out: &mut Tensor) -> Result<()> {
    const OP: &str = "glue::concat_into";
    let (shape, _) = check_parts(OP, parts)?;
    if out.shape() != shape.as_slice() {
        return Err(Error::shape(OP, "out", format!("{shape:?}"), out.shape()));
    }
    backend::same_device(OP, "out", &parts[0].device(), out)?;
    same_dtype(OP, "out", parts[0], out)?;
    let axis = shape.len() - 1;
    let mut start = 0;
    for p in parts {
        write_slice(out, axis, start, p)?;
        start += p.shape()[axis];
    }
    Ok(())
}

/// Splits `x` along its last axis into pieces of `widths` (which must sum to that axis): the
/// backward of [`concat`].
///
/// ```
/// use recfuse::ops::glue::split;
/// use recfuse::{Device, Tensor};
/// let x = Tensor::from_slice(&[1.0f32, 3.0, 4.0, 2.0, 5.0, 6.0], &[2, 3], &Device::cpu())?;
/// let parts = split(&x, &[1, 2])?;
/// assert_eq!(parts[0].to_vec::<f32>()?, vec![1.0, 2.0]);
/// assert_eq!(parts[1].to_vec::<f32>()?, vec![3.0, 4.0, 5.0, 6.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn split(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    const OP: &str = "glue::split";
    let Some(&last) = x.shape().last() else {
        return Err(Error::shape(OP, "x", "rank ≥ 1", x.shape()));
    };
    let total = widths
        .iter()
        .try_fold(0usize, |a, &w| a.checked_add(w))
        .ok_or_else(|| Error::invalid(OP, "widths", "sum overflows usize"))?;
    if total != last {
        return Err(Error::invalid(
            OP,
            "widths",
            format!("sum to {total}, expected {last} (x's last axis)"),
        ));
    }
    let axis = x.shape().len() - 1;
    let mut start = 0;
    widths
        .iter()
        .map(|&w| {
            let t = slice(x, axis, start, w);
            start += w;
            t
        })
        .collect()
}

/// `Σ` over `axis` (which is removed from the shape), accumulated in f32 in a fixed order
/// (deterministic on every backend), rounded once to x's dtype.
///
/// ```
/// use recfuse::ops::glue::sum;
/// use recfuse::{Device, Tensor};
/// let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &Device::cpu())?;
/// assert_eq!(sum(&x, 0)?.to_vec::<f32>()?, vec![5.0, 7.0, 9.0]);
/// assert_eq!(sum(&x, 1)?.to_vec::<f32>()?, vec![6.0, 15.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn sum(x: &Tensor, axis: usize) -> Result<Tensor> {
    const OP: &str = "glue::sum";
    check_axis(OP, "axis", x.shape(), axis)?;
    let (outer, mid, inner) = split_at_axis(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape.remove(axis);
    let mut out = Tensor::zeros(&shape, x.dtype(), &x.device())?;
    if outer == 0 || inner == 0 {
        return Ok(out);
    }
    let p = SumMid { outer, mid, inner };
    backend::sum_mid(&x.device(), &p, x, &mut out)?;
    Ok(out)
}

/// The backward of [`sum`]: `dy` broadcast back along `axis` to `size` copies.
///
/// ```
/// use recfuse::ops::glue::sum_backward;
/// use recfuse::{Device, Tensor};
/// let dy = Tensor::from_slice(&[1.0f32, 2.0], &[2], &Device::cpu())?;
/// assert_eq!(sum_backward(&dy, 1, 3)?.to_vec::<f32>()?, vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
pub fn sum_backward(dy: &Tensor, axis: usize, size: usize) -> Result<Tensor> {
    const OP: &str = "glue::sum_backward";
    if axis > dy.shape().len() {
        return Err(Error::invalid(
            OP,
            "axis",
            format!(
                "{axis} out of range for inserting into a rank-{} tensor",
                dy.shape().len()
            ),
        ));
    }
    let mut shape = dy.shape().to_vec();
    shape.insert(axis, size);
    let (outer, _, inner) = split_at_axis(&shape, axis);
    let mut dx = Tensor::zeros(&shape, dy.dtype(), &dy.device())?;
    let p = Copy3 {
        outer,
        mid: size,
        inner,
        src: Layout3 {
            offset: 0,
            s_outer: inner,
            s_mid: 0,
        },
        dst: Layout3 {
            offset: 0,
            s_outer: size * inner,
            s_mid: inner,
        },
    };
    copy3(OP, &p, dy, &mut dx)?;
    Ok(dx)
}

/// Copies a contiguous `[rows, dim]` `src` into the flat `dst` at element `offset`, rows
/// `pitch` elements apart (the embedding bags' packed layout).
pub(crate) fn write_rows(
    dst: &mut Tensor,
    offset: usize,
    pitch: usize,
    src: &Tensor,
) -> Result<()> {
    const OP: &str = "glue::write_rows";
    let &[rows, dim] = src.shape() else {
        return Err(Error::shape(OP, "src", "[rows, dim]", src.shape()));
    };
    let p = Copy3 {
        outer: rows,
        mid: 1,
        inner: dim,
        src: Layout3 {
            offset: 0,
            s_outer: dim,
            s_mid: 0,
        },
        dst: Layout3 {
            offset,
            s_outer: pitch,
            s_mid: 0,
        },
    };
    copy3(OP, &p, src, dst)
}

/// The `[rows, dim]` block of the flat `src` at element `offset`, rows `pitch` apart, as a new
/// contiguous tensor (the inverse of [`write_rows`]).
pub(crate) fn read_rows(
    src: &Tensor,
    offset: usize,
    pitch: usize,
    rows: usize,
    dim: usize,
) -> Result<Tensor> {
    const OP: &str = "glue::read_rows";
    let mut out = Tensor::zeros(&[rows, dim], src.dtype(), &src.device())?;
    let p = Copy3 {
        outer: rows,
        mid: 1,
        inner: dim,
        src: Layout3 {
            offset,
            s_outer: pitch,
            s_mid: 0,
        },
        dst: Layout3 {
            offset: 0,
            s_outer: dim,
            s_mid: 0,
        },
    };
    copy3(OP, &p, src, &mut out)?;
    Ok(out)
}
