//! Caller-owned CUDA memory and streams as recfuse tensors and devices, without copies.
//!
//! * [`Tensor::from_cuda_slice`] takes ownership of a cudarc `CudaSlice<T>`;
//!   [`Tensor::into_cuda_slice`] hands a tensor's allocation back as one.
//! * [`Tensor::from_raw_cuda`] (`unsafe`: the caller vouches for the pointer) *borrows* a raw
//!   device pointer: the tensor reads and writes it in place and never frees it.
//! * [`Tensor::cuda_ptr`] gives the device pointer of a tensor to pass to another library.
//! * [`Device::cuda_on_stream`] opens a device whose work all goes on the caller's stream.
//!
//! Ordering rule: everything recfuse does on a device is ordered on that device's one stream
//! ([`CudaDevice::stream`](super::CudaDevice::stream)). `from_cuda_slice` makes that stream wait
//! for the slice's own stream, so a slice written on another stream may be handed over at once;
//! for raw pointers and `cuda_ptr`, work the caller queues on any other stream must be joined
//! with recfuse's stream by the caller (an event, `CudaStream::join`, or a synchronise).
//!
//! Alignment: recfuse's kernels use vector accesses of up to 16 bytes, so wrapped memory must
//! be 16-byte aligned (every `cuMemAlloc` / cudarc allocation is 256-byte aligned; a view into
//! the middle of one may not be).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use super::{backend_err, CudaDevice, CudaStorage};
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::tensor::{numel_of, Storage, Tensor};

/// Alignment every wrapped device pointer must have (the widest vector access of any kernel).
pub const CUDA_PTR_ALIGN: u64 = 16;

fn cuda_of<'a>(op: &'static str, device: &'a Device) -> Result<&'a Arc<CudaDevice>> {
    device.as_cuda().ok_or_else(|| Error::DeviceMismatch {
        op,
        arg: "device",
        expected: "a CUDA device".into(),
        actual: device.describe(),
    })
}

impl Tensor {
    /// A CUDA tensor that takes ownership of a cudarc slice (no copy; it is freed, ordered on
    /// recfuse's stream, when the tensor drops). `slice` must belong to `device`'s context and
    /// hold exactly `shape`'s element count; the dtype is `T`'s. recfuse's stream first waits
    /// for the work already queued on the slice's stream.
    ///
    /// ```no_run
    /// use recfuse::{Device, Tensor};
    /// let dev = Device::cuda(0)?;
    /// let stream = dev.as_cuda().expect("a CUDA device").stream().clone();
    /// let slice = stream.clone_htod(&[1.0f32, 2.0, 3.0, 4.0]).expect("upload");
    /// let t = Tensor::from_cuda_slice(&dev, slice, &[2, 2])?;
    /// let back = t.into_cuda_slice::<f32>()?; // the same allocation, as a CudaSlice again
    /// assert_eq!(back.len(), 4);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn from_cuda_slice<T: Element + DeviceRepr>(
        device: &Device,
        slice: CudaSlice<T>,
        shape: &[usize],
    ) -> Result<Tensor> {
        const OP: &str = "Tensor::from_cuda_slice";
        let d = cuda_of(OP, device)?;
        let n = numel_of(OP, shape)?;
        if slice.len() != n {
            return Err(Error::shape(
                OP,
                "slice",
                format!("{n} elements for shape {shape:?}"),
                &[slice.len()],
            ));
        }
        if slice.context().cu_ctx() != d.context().cu_ctx() {
            return Err(Error::invalid(
                OP,
                "slice",
                format!("allocated in another CUDA context than {}", d.describe()),
            ));
        }
        let nbytes = n * std::mem::size_of::<T>();
        if n == 0 {
            // cudarc may hold no real allocation for an empty slice; recfuse keeps ≥ 1 byte.
            return Tensor::zeros(shape, T::DTYPE, device);
        }
        if !Arc::ptr_eq(slice.stream(), &d.stream) {
            d.stream
                .join(slice.stream())
                .map_err(|e| backend_err("ordering recfuse's stream after the slice's", e))?;
        }
        let ptr = slice.leak();
        // SAFETY: `ptr` is the live allocation of `nbytes` bytes the slice owned (its handle
        // was leaked above, so nothing else frees it); from here the storage owns it and frees
        // it once, on recfuse's stream, which already waits for the slice's pending work.
        let buf = unsafe { d.stream.upgrade_device_ptr::<u8>(ptr, nbytes) };
        Ok(Tensor::from_parts(
            shape.to_vec(),
            T::DTYPE,
            Storage::Cuda(CudaStorage::owned(d.clone(), buf, nbytes)),
        ))
    }

    /// The tensor's allocation as a cudarc slice of its elements (no copy), on recfuse's stream.
    /// `T` must be the tensor's dtype. A tensor that borrows caller memory
    /// ([`Tensor::from_raw_cuda`]) cannot be turned into an owning slice: `Error::InvalidArgument`.
    pub fn into_cuda_slice<T: Element + DeviceRepr>(self) -> Result<CudaSlice<T>> {
        const OP: &str = "Tensor::into_cuda_slice";
        if T::DTYPE != self.dtype() {
            return Err(crate::interop::dtype_err::<T>(OP, &self));
        }
        let n = self.numel();
        let actual = self.device().describe();
        let s = match self.storage {
            Storage::Cuda(s) => s,
            #[allow(unreachable_patterns)]
            _ => {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    arg: "self",
                    expected: "a CUDA tensor".into(),
                    actual,
                });
            }
        };
        if !s.is_owned() {
            return Err(Error::invalid(
                OP,
                "self",
                "wraps caller memory (Tensor::from_raw_cuda), which recfuse does not own",
            ));
        }
        let stream = s.device.stream.clone();
        let ptr = s.into_raw();
        // SAFETY: `ptr` is the storage's allocation (≥ max(n·size, 1) bytes), released above
        // without being freed; the slice becomes its only owner and covers its first n elements.
        Ok(unsafe { stream.upgrade_device_ptr::<T>(ptr, n) })
    }

    /// A CUDA tensor over caller-owned device memory, without a copy: ops read and write `ptr`
    /// in place, and dropping the tensor leaves the memory alone.
    ///
    /// Checked: `device` is CUDA, `ptr` is non-null and 16-byte aligned ([`CUDA_PTR_ALIGN`]),
    /// the byte size fits. An empty shape gets a fresh (owned) allocation instead.
    ///
    /// # Safety
    /// `ptr` must point to at least `numel(shape) · dtype.size()` bytes of device memory valid in
    /// `device`'s context for as long as the tensor (or any view of it) lives, and nothing else
    /// may free it or access it concurrently except through work ordered with recfuse's stream
    /// (see the module docs).
    ///
    /// ```no_run
    /// use cudarc::driver::DevicePtr;
    /// use recfuse::{DType, Device, Tensor};
    /// let dev = Device::cuda(0)?;
    /// let stream = dev.as_cuda().expect("a CUDA device").stream().clone();
    /// let mine = stream.clone_htod(&[1.0f32; 8]).expect("upload");
    /// let (ptr, _guard) = mine.device_ptr(&stream);
    /// // SAFETY: `mine` outlives `t`, holds 8 f32, and is only used on recfuse's stream.
    /// let mut t = unsafe { Tensor::from_raw_cuda(&dev, ptr, &[8], DType::F32)? };
    /// t.scale(2.0)?; // written into `mine` in place
    /// drop(t);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub unsafe fn from_raw_cuda(
        device: &Device,
        ptr: u64,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        const OP: &str = "Tensor::from_raw_cuda";
        let d = cuda_of(OP, device)?;
        let n = numel_of(OP, shape)?;
        let nbytes = n
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::invalid(OP, "shape", format!("{shape:?} bytes overflow")))?;
        if n == 0 {
            return Tensor::zeros(shape, dtype, device);
        }
        if ptr == 0 {
            return Err(Error::invalid(OP, "ptr", "null"));
        }
        if ptr % CUDA_PTR_ALIGN != 0 {
            return Err(Error::invalid(
                OP,
                "ptr",
                format!("{ptr:#x} is not {CUDA_PTR_ALIGN}-byte aligned"),
            ));
        }
        if ptr.checked_add(nbytes as u64).is_none() {
            return Err(Error::invalid(OP, "ptr", "ptr + size overflows"));
        }
        // SAFETY: the caller vouches that `ptr` addresses `nbytes` valid bytes for the tensor's
        // lifetime; the storage is `borrowed`, so its drop never frees them.
        let buf = unsafe { d.stream.upgrade_device_ptr::<u8>(ptr, nbytes) };
        Ok(Tensor::from_parts(
            shape.to_vec(),
            dtype,
            Storage::Cuda(CudaStorage::borrowed(d.clone(), buf, nbytes)),
        ))
    }

    /// The device pointer of a CUDA tensor's first element (`None` on other backends), for a
    /// library that takes raw pointers. Valid while the tensor lives; order your use of it with
    /// recfuse's stream.
    pub fn cuda_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Cuda(s) => {
                let (p, _guard) = s.buf.device_ptr(&s.device.stream);
                Some(p)
            }
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl Device {
    /// A CUDA device whose work all goes on the caller's `stream` (and its context): ops,
    /// allocations, copies and frees are ordered with whatever the caller queues there, so a
    /// trainer that owns a stream needs no extra synchronisation. Tensors of this device are
    /// not interchangeable with those of a [`Device::cuda`] on the same GPU (another stream:
    /// `Error::DeviceMismatch`), but memory moves between them with
    /// [`Tensor::into_cuda_slice`] / [`Tensor::from_cuda_slice`].
    ///
    /// ```no_run
    /// let base = recfuse::Device::cuda(0)?;
    /// let mine = base.as_cuda().expect("a CUDA device").context().new_stream().expect("stream");
    /// let dev = recfuse::Device::cuda_on_stream(mine.clone())?;
    /// assert!(std::sync::Arc::ptr_eq(dev.as_cuda().unwrap().stream(), &mine));
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn cuda_on_stream(stream: Arc<CudaStream>) -> Result<Device> {
        Ok(Device::Cuda(CudaDevice::on_stream(stream)?))
    }
}
