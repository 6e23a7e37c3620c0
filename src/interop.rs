//! Interop with memory and handles owned by the caller.
//!
//! * CPU: [`Tensor::from_vec`] takes a `Vec<T>` without copying it, [`Tensor::into_vec`] gives it
//!   back, and [`Tensor::as_slice`] / [`Tensor::as_mut_slice`] borrow the host data in place.
//! * CUDA: [`Device::as_cuda`] gives the [`crate::cuda::CudaDevice`], whose `context()` and
//!   `stream()` are the cudarc handles recfuse orders all of its work on; a caller's cudarc
//!   `CudaSlice` becomes a tensor and back without a copy, a raw device pointer can be borrowed,
//!   and a device can run on the caller's stream (see [`crate::cuda::interop`]).
//! * WGSL: [`Device::as_wgpu`] gives the [`crate::wgpu::WgpuDevice`], whose `device()` and
//!   `queue()` are the wgpu handles recfuse submits on. Wrapping caller-owned buffers is not
//!   supported yet.
//!
//! Ownership and ordering: recfuse's work on a GPU device is ordered on that device's one stream
//! (CUDA) or queue (wgpu). Work the caller puts on the same stream / queue is ordered with it;
//! work on any other stream must be synchronised by the caller (events or a stream sync) before
//! recfuse reads what it wrote, and before the caller reads what recfuse wrote.

use std::any::Any;

use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::{CpuStorage, Storage, Tensor};

/// Moves a `Vec<T>` of a storage dtype into `CpuStorage` without copying it.
fn storage_from_vec<T: Element>(v: Vec<T>) -> Result<CpuStorage> {
    let any: Box<dyn Any> = Box::new(v);
    // Each downcast is a move of the Vec header, never of its elements. `Element` is a public
    // trait, so a caller's own type falls through to a typed error.
    let any = match any.downcast::<Vec<f32>>() {
        Ok(v) => return Ok(CpuStorage::F32(*v)),
        Err(a) => a,
    };
    let any = match any.downcast::<Vec<half::bf16>>() {
        Ok(v) => return Ok(CpuStorage::BF16(*v)),
        Err(a) => a,
    };
    match any.downcast::<Vec<half::f16>>() {
        Ok(v) => Ok(CpuStorage::F16(*v)),
        Err(_) => Err(Error::invalid(
            "Tensor::from_vec",
            "T",
            format!(
                "`{}` is not f32, half::bf16 or half::f16",
                std::any::type_name::<T>()
            ),
        )),
    }
}

pub(crate) fn dtype_err<T: Element>(op: &'static str, t: &Tensor) -> Error {
    Error::DType {
        op,
        arg: "T",
        expected: t.dtype().to_string(),
        actual: T::DTYPE,
    }
}

fn not_cpu(op: &'static str, t: &Tensor) -> Error {
    Error::DeviceMismatch {
        op,
        arg: "self",
        expected: Device::Cpu.describe(),
        actual: t.device().describe(),
    }
}

impl Tensor {
    /// A CPU tensor that takes ownership of `data` (no copy: the vector's allocation becomes the
    /// tensor's storage). The dtype is `T`'s.
    ///
    /// ```
    /// use recfuse::{DType, Tensor};
    /// let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    /// assert_eq!(t.dtype(), DType::F32);
    /// assert_eq!(t.as_slice::<f32>()?, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    /// // A wrong element count is an error, not a panic.
    /// assert!(Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).is_err());
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        const OP: &str = "Tensor::from_vec";
        let n = crate::tensor::numel_of(OP, shape)?;
        if n != data.len() {
            return Err(Error::shape(
                OP,
                "data",
                format!("{n} elements for shape {shape:?}"),
                &[data.len()],
            ));
        }
        Ok(Tensor::from_parts(
            shape.to_vec(),
            T::DTYPE,
            Storage::Cpu(storage_from_vec(data)?),
        ))
    }

    /// The elements as a `Vec<T>`; `T` must be the tensor's dtype (else `Error::DType`). On the
    /// CPU this hands back the storage itself (no copy); on a GPU device it is a download,
    /// like [`Tensor::to_vec`].
    ///
    /// ```
    /// use recfuse::Tensor;
    /// let v = vec![0.5f32; 6];
    /// let ptr = v.as_ptr();
    /// let t = Tensor::from_vec(v, &[3, 2])?;
    /// let back = t.into_vec::<f32>()?;
    /// assert_eq!(back.as_ptr(), ptr); // the same allocation came back
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn into_vec<T: Element>(self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return Err(dtype_err::<T>("Tensor::into_vec", &self));
        }
        if self.cpu().is_none() {
            return self.to_vec();
        }
        let host = match self.storage {
            Storage::Cpu(c) => c,
            #[allow(unreachable_patterns)]
            _ => {
                return Err(Error::invalid(
                    "Tensor::into_vec",
                    "self",
                    "not a CPU tensor",
                ))
            }
        };
        let any: Box<dyn Any> = match host {
            CpuStorage::F32(v) => Box::new(v),
            CpuStorage::BF16(v) => Box::new(v),
            CpuStorage::F16(v) => Box::new(v),
        };
        any.downcast::<Vec<T>>()
            .map(|b| *b)
            .map_err(|_| Error::invalid("Tensor::into_vec", "T", "storage type mismatch"))
    }

    /// The host data in place (CPU tensors only: `Error::DeviceMismatch` elsewhere; `T` must be
    /// the dtype).
    ///
    /// ```
    /// use recfuse::Tensor;
    /// let t = Tensor::from_vec(vec![1.0f32, 2.0], &[2])?;
    /// assert_eq!(t.as_slice::<f32>()?[1], 2.0);
    /// assert!(t.as_slice::<half::bf16>().is_err());
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        const OP: &str = "Tensor::as_slice";
        if T::DTYPE != self.dtype() {
            return Err(dtype_err::<T>(OP, self));
        }
        let c = self.cpu().ok_or_else(|| not_cpu(OP, self))?;
        // For f32 / bf16 / f16 the dtype match makes the storage a Vec<T>, so the cast is exact;
        // a caller's own `Element` type of another size gets an error, not a panic.
        bytemuck::try_cast_slice(c.as_bytes())
            .map_err(|e| Error::invalid(OP, "T", format!("cannot view the storage as T: {e}")))
    }

    /// The host data in place, writable (CPU tensors only; `T` must be the dtype).
    ///
    /// ```
    /// use recfuse::Tensor;
    /// let mut t = Tensor::from_vec(vec![1.0f32, 2.0], &[2])?;
    /// t.as_mut_slice::<f32>()?[0] = 7.0;
    /// assert_eq!(t.into_vec::<f32>()?, vec![7.0, 2.0]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        const OP: &str = "Tensor::as_mut_slice";
        if T::DTYPE != self.dtype() {
            return Err(dtype_err::<T>(OP, self));
        }
        let err = not_cpu(OP, self);
        let c = self.cpu_mut().ok_or(err)?;
        let bytes: &mut [u8] = match c {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
        };
        bytemuck::try_cast_slice_mut(bytes)
            .map_err(|e| Error::invalid(OP, "T", format!("cannot view the storage as T: {e}")))
    }
}

impl Device {
    /// The CUDA backend of this device, or `None` for another backend. Its `context()` and
    /// `stream()` are the cudarc handles recfuse works on.
    ///
    /// ```
    /// assert!(recfuse::Device::cpu().as_cuda().is_none());
    /// ```
    #[cfg(feature = "cuda")]
    pub fn as_cuda(&self) -> Option<&std::sync::Arc<crate::cuda::CudaDevice>> {
        match self {
            Device::Cuda(d) => Some(d),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The wgpu backend of this device, or `None` for another backend. Its `device()` and
    /// `queue()` are the wgpu handles recfuse works on.
    ///
    /// ```
    /// assert!(recfuse::Device::cpu().as_wgpu().is_none());
    /// ```
    #[cfg(feature = "wgpu")]
    pub fn as_wgpu(&self) -> Option<&std::sync::Arc<crate::wgpu::WgpuDevice>> {
        match self {
            Device::Wgpu(d) => Some(d),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}
