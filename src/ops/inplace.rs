//! In-place device operations on a [`Tensor`]: the parameter-update vocabulary a trainer needs
//! between kernels (`copy_from`, `fill`, `scale`, `axpy`, `add_`), executed where the tensor
//! lives (a kernel on CUDA and wgpu, threads on the CPU), never through the host.
//!
//! Every one is the same element-wise form, `y = α·y + β·x` (or `y = c` for `fill`), with
//! 16-bit storage widened to f32, the arithmetic in f32, and one rounding on the store.

use crate::error::{Error, Result};
use crate::ops::backend;
use crate::tensor::Tensor;

/// What an in-place element-wise update computes, for the backends:
/// `y = (read_y ? alpha·y : 0) + (x ? beta·x : 0)`, or `y = fill` when neither is read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Axpby {
    pub alpha: f32,
    pub beta: f32,
    pub fill: f32,
    pub read_y: bool,
}

impl Axpby {
    /// The f32 arithmetic every backend performs for one element (the CPU runs exactly this;
    /// the CUDA and WGSL kernels spell out the same operations in the same order).
    #[inline]
    pub(crate) fn apply(&self, y: f32, x: Option<f32>) -> f32 {
        match (self.read_y, x) {
            (true, Some(x)) => self.alpha * y + self.beta * x,
            (true, None) => self.alpha * y,
            (false, Some(x)) => self.beta * x,
            (false, None) => self.fill,
        }
    }
}

fn check_like(op: &'static str, arg: &'static str, y: &Tensor, x: &Tensor) -> Result<()> {
    if x.shape() != y.shape() {
        return Err(Error::shape(
            op,
            arg,
            format!("{:?} (the shape of self)", y.shape()),
            x.shape(),
        ));
    }
    backend::same_device(op, arg, &y.device(), x)
}

fn check_scalar(op: &'static str, arg: &'static str, v: f32) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(op, arg, format!("{v} is not finite")))
    }
}

impl Tensor {
    /// Copies `src` (same shape, same dtype, same device) into `self`, on the device.
    ///
    /// Use [`Tensor::to_dtype`] for a conversion; a copy between dtypes is rejected so that a
    /// silent rounding never happens here.
    ///
    /// ```
    /// use recfuse::{Device, DType, Tensor};
    /// let dev = Device::cpu();
    /// let src = Tensor::from_slice(&[1.0f32, 2.0, 3.0], &[3], &dev)?;
    /// let mut dst = Tensor::zeros(&[3], DType::F32, &dev)?;
    /// dst.copy_from(&src)?;
    /// assert_eq!(dst.to_vec::<f32>()?, vec![1.0, 2.0, 3.0]);
    /// // A wrong dtype is an error naming the argument.
    /// let half = Tensor::zeros(&[3], DType::BF16, &dev)?;
    /// assert!(matches!(dst.copy_from(&half), Err(recfuse::Error::DType { arg: "src", .. })));
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        const OP: &str = "Tensor::copy_from";
        check_like(OP, "src", self, src)?;
        if src.dtype() != self.dtype() {
            return Err(Error::DType {
                op: OP,
                arg: "src",
                expected: format!(
                    "{} (the dtype of self; convert with to_dtype)",
                    self.dtype()
                ),
                actual: src.dtype(),
            });
        }
        let k = Axpby {
            alpha: 0.0,
            beta: 1.0,
            fill: 0.0,
            read_y: false,
        };
        backend::axpby(&self.device(), Some(src), &k, self)
    }

    /// Sets every element to `value` (rounded to the dtype), on the device. NaN and ±∞ are
    /// allowed (a poisoned buffer is a legitimate use).
    ///
    /// ```
    /// use recfuse::{Device, DType, Tensor};
    /// let mut t = Tensor::zeros(&[2, 2], DType::BF16, &Device::cpu())?;
    /// t.fill(0.5)?;
    /// assert_eq!(t.to_f32_vec()?, vec![0.5; 4]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn fill(&mut self, value: f32) -> Result<()> {
        let k = Axpby {
            alpha: 0.0,
            beta: 0.0,
            fill: value,
            read_y: false,
        };
        backend::axpby(&self.device(), None, &k, self)
    }

    /// `self *= a`, on the device (as PyTorch's `mul_`: a NaN already in `self` stays NaN even
    /// for `a = 0`). `a` must be finite.
    ///
    /// ```
    /// use recfuse::{Device, Tensor};
    /// let mut t = Tensor::from_slice(&[1.0f32, -2.0], &[2], &Device::cpu())?;
    /// t.scale(3.0)?;
    /// assert_eq!(t.to_vec::<f32>()?, vec![3.0, -6.0]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn scale(&mut self, a: f32) -> Result<()> {
        check_scalar("Tensor::scale", "a", a)?;
        let k = Axpby {
            alpha: a,
            beta: 0.0,
            fill: 0.0,
            read_y: true,
        };
        backend::axpby(&self.device(), None, &k, self)
    }

    /// `self += a·x` (x of the same shape and device; any dtype: it is widened to f32), on the
    /// device. `a` must be finite.
    ///
    /// ```
    /// use recfuse::{Device, DType, Tensor};
    /// let dev = Device::cpu();
    /// let mut w = Tensor::from_slice(&[1.0f32, 1.0], &[2], &dev)?;
    /// let g = Tensor::from_f32(&[2.0, -4.0], &[2], DType::BF16, &dev)?;
    /// w.axpy(-0.5, &g)?;
    /// assert_eq!(w.to_vec::<f32>()?, vec![0.0, 3.0]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn axpy(&mut self, a: f32, x: &Tensor) -> Result<()> {
        const OP: &str = "Tensor::axpy";
        check_scalar(OP, "a", a)?;
        check_like(OP, "x", self, x)?;
        let k = Axpby {
            alpha: 1.0,
            beta: a,
            fill: 0.0,
            read_y: true,
        };
        backend::axpby(&self.device(), Some(x), &k, self)
    }

    /// `self += x` (x of the same shape and device, any dtype), on the device.
    ///
    /// ```
    /// use recfuse::{Device, Tensor};
    /// let dev = Device::cpu();
    /// let mut a = Tensor::from_slice(&[1.0f32, 2.0], &[2], &dev)?;
    /// a.add_(&Tensor::from_slice(&[0.5f32, 0.25], &[2], &dev)?)?;
    /// assert_eq!(a.to_vec::<f32>()?, vec![1.5, 2.25]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn add_(&mut self, x: &Tensor) -> Result<()> {
        const OP: &str = "Tensor::add_";
        check_like(OP, "x", self, x)?;
        let k = Axpby {
            alpha: 1.0,
            beta: 1.0,
            fill: 0.0,
            read_y: true,
        };
        backend::axpby(&self.device(), Some(x), &k, self)
    }
}
