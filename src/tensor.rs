//! `Tensor`: a shape, a storage dtype and storage on one device. Host↔device copies happen only
//! when asked for (`from_slice`, `to_vec`, `to_device`), never behind an op's back.

use half::{bf16, f16};

use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// Host storage: one typed vector per dtype so slices are always correctly aligned.
#[derive(Clone, Debug)]
pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A host vector of `n` copies of `value`, or `Error::OutOfMemory` (never an abort or a
/// capacity-overflow panic) when it cannot be allocated.
pub(crate) fn try_host_vec<T: Copy>(
    op: &'static str,
    arg: &'static str,
    n: usize,
    value: T,
) -> Result<Vec<T>> {
    let mut v = Vec::new();
    let bytes = n as u128 * std::mem::size_of::<T>() as u128;
    if bytes > isize::MAX as u128 || v.try_reserve_exact(n).is_err() {
        return Err(Error::oom(op, arg, bytes, "the host"));
    }
    v.resize(n, value);
    Ok(v)
}

/// `n` zeros of a storage dtype, allocated zeroed (pages the OS zero-fills lazily, like
/// `vec![0.0; n]`), or `Error::OutOfMemory`.
fn try_zeroed_vec<T: Element>(op: &'static str, arg: &'static str, n: usize) -> Result<Vec<T>> {
    let bytes = n as u128 * std::mem::size_of::<T>() as u128;
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout =
        std::alloc::Layout::array::<T>(n).map_err(|_| Error::oom(op, arg, bytes, "the host"))?;
    // SAFETY: `layout` has non-zero size (n > 0, T is 2 or 4 bytes).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(Error::oom(op, arg, bytes, "the host"));
    }
    // SAFETY: `ptr` was allocated by the global allocator with `Layout::array::<T>(n)`, which is
    // what a Vec<T> of capacity n uses; all-zero bits are a valid f32 / bf16 / f16 (+0.0), so
    // all n elements are initialised.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

impl CpuStorage {
    pub(crate) fn from_bytes(dtype: DType, bytes: &[u8]) -> CpuStorage {
        // pod_collect_to_vec copies, so the (unaligned) byte slice is never reinterpreted in place.
        match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
        }
    }

    pub(crate) fn to_f32(&self) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub(crate) fn from_f32(dtype: DType, v: &[f32]) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(v.to_vec()),
            DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }

    fn try_filled(op: &'static str, dtype: DType, n: usize, v: f32) -> Result<CpuStorage> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(try_host_vec(op, "shape", n, v)?),
            DType::BF16 => CpuStorage::BF16(try_host_vec(op, "shape", n, bf16::from_f32(v))?),
            DType::F16 => CpuStorage::F16(try_host_vec(op, "shape", n, f16::from_f32(v))?),
        })
    }

    fn try_zeros(op: &'static str, dtype: DType, n: usize) -> Result<CpuStorage> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(try_zeroed_vec(op, "shape", n)?),
            DType::BF16 => CpuStorage::BF16(try_zeroed_vec(op, "shape", n)?),
            DType::F16 => CpuStorage::F16(try_zeroed_vec(op, "shape", n)?),
        })
    }
}

#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
    #[cfg(feature = "wgpu")]
    Wgpu(crate::wgpu::WgpuStorage),
}

/// A dense row-major tensor on one device.
///
/// ```
/// use recfuse::{Device, DType, Tensor};
/// let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &Device::cpu())?;
/// assert_eq!(t.shape(), &[2, 3]);
/// assert_eq!(t.dtype(), DType::F32);
/// assert_eq!(t.to_vec::<f32>()?, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// # Ok::<(), recfuse::Error>(())
/// ```
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    pub(crate) storage: Storage,
}

/// The element count of `shape`, or `InvalidArgument` on `shape` when it overflows `usize`.
pub(crate) fn numel_of(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, "shape", format!("{shape:?} overflows usize")))
}

impl Tensor {
    pub(crate) fn from_parts(shape: Vec<usize>, dtype: DType, storage: Storage) -> Tensor {
        Tensor {
            shape,
            dtype,
            storage,
        }
    }

    /// Copies host data of any storage type onto `device`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = numel_of("Tensor::from_slice", shape)?;
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::from_slice",
                "data",
                format!("{n} elements for shape {shape:?}"),
                &[data.len()],
            ));
        }
        Self::from_bytes(bytemuck::cast_slice(data), T::DTYPE, shape, device)
    }

    /// Rounds f32 host data to `dtype` and copies it onto `device`.
    pub fn from_f32(
        data: &[f32],
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n = numel_of("Tensor::from_f32", shape)?;
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::from_f32",
                "data",
                format!("{n} elements for shape {shape:?}"),
                &[data.len()],
            ));
        }
        let host = CpuStorage::from_f32(dtype, data);
        Self::from_bytes(host.as_bytes(), dtype, shape, device)
    }

    fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize], device: &Device) -> Result<Tensor> {
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::from_bytes(dtype, bytes)),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Storage::Cuda(d.upload(bytes)?),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => Storage::Wgpu(d.upload(bytes)?),
        };
        Ok(Tensor::from_parts(shape.to_vec(), dtype, storage))
    }

    /// A tensor whose every element is `value` (rounded to `dtype`). On a GPU it is allocated
    /// and filled there (no host buffer, no copy). Too large to allocate: `Error::OutOfMemory`.
    ///
    /// ```
    /// use recfuse::{DType, Device, Error, Tensor};
    /// let t = Tensor::full(&[2, 2], 0.5, DType::BF16, &Device::cpu())?;
    /// assert_eq!(t.to_f32_vec()?, vec![0.5; 4]);
    /// // A size that cannot exist is an error, not an abort.
    /// let huge = Tensor::full(&[1 << 46], 1.0, DType::F32, &Device::cpu()); // 256 TiB
    /// assert!(matches!(huge, Err(Error::OutOfMemory { .. })));
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn full(shape: &[usize], value: f32, dtype: DType, device: &Device) -> Result<Tensor> {
        const OP: &str = "Tensor::full";
        let n = numel_of(OP, shape)?;
        if !matches!(device, Device::Cpu) {
            let mut t = Self::zeros_op(OP, shape, dtype, device)?;
            t.fill(value)?;
            return Ok(t);
        }
        let storage = Storage::Cpu(CpuStorage::try_filled(OP, dtype, n, value)?);
        Ok(Tensor::from_parts(shape.to_vec(), dtype, storage))
    }

    /// A tensor of zeros (allocated zeroed on the device: no host buffer, no copy). Too large
    /// to allocate: `Error::OutOfMemory`.
    ///
    /// ```
    /// use recfuse::{DType, Device, Error, Tensor};
    /// let huge = Tensor::zeros(&[1 << 46], DType::F32, &Device::cpu()); // 256 TiB
    /// assert!(matches!(huge, Err(Error::OutOfMemory { .. })));
    /// ```
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Self::zeros_op("Tensor::zeros", shape, dtype, device)
    }

    fn zeros_op(
        op: &'static str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n = numel_of(op, shape)?;
        let bytes = n
            .checked_mul(dtype.size())
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::oom(
                    op,
                    "shape",
                    n as u128 * dtype.size() as u128,
                    &device.describe(),
                )
            })?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::try_zeros(op, dtype, n)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Storage::Cuda(d.alloc_zeros(bytes)?),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => Storage::Wgpu(d.alloc_zeros(bytes)?),
        };
        let _ = bytes; // only the GPU arms need the byte count
        Ok(Tensor::from_parts(shape.to_vec(), dtype, storage))
    }

    /// A tensor filled with NaN: for tests, so an element a kernel forgot to write fails the
    /// comparison instead of passing by luck.
    pub fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Self::full(shape, f32::NAN, dtype, device)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the storage in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// The device this tensor's storage lives on.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.device.clone()),
            #[cfg(feature = "wgpu")]
            Storage::Wgpu(s) => Device::Wgpu(s.device.clone()),
        }
    }

    /// Same data, new shape (element count must match). Free: no copy.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let n = numel_of("Tensor::reshape", shape)?;
        if n != self.numel() {
            return Err(Error::shape(
                "Tensor::reshape",
                "shape",
                format!("{} elements", self.numel()),
                shape,
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Raw little-endian bytes of the storage, copied to the host (waits for the device).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match &self.storage {
            Storage::Cpu(c) => Ok(c.as_bytes().to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.device.download(s, self.size_in_bytes()),
            #[cfg(feature = "wgpu")]
            Storage::Wgpu(s) => s.device.download(s, self.size_in_bytes()),
        }
    }

    pub(crate) fn to_host(&self) -> Result<CpuStorage> {
        match &self.storage {
            Storage::Cpu(c) => Ok(c.clone()),
            #[allow(unreachable_patterns)]
            _ => Ok(CpuStorage::from_bytes(self.dtype, &self.to_bytes()?)),
        }
    }

    /// Copies the elements to the host as `T`, which must be the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                op: "Tensor::to_vec",
                arg: "T",
                expected: self.dtype.to_string(),
                actual: T::DTYPE,
            });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes()?))
    }

    /// Copies the elements to the host, widened to f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_host()?.to_f32())
    }

    /// Copies the elements to the host, widened to f64 (exactly: every storage value is).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        Ok(self.to_f32_vec()?.into_iter().map(f64::from).collect())
    }

    /// An explicit copy onto `device` (any direction).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        Self::from_bytes(&self.to_bytes()?, self.dtype, &self.shape, device)
    }

    /// A deep copy on the same device (a device-side copy on the GPUs).
    pub fn try_clone(&self) -> Result<Tensor> {
        self.to_dtype(self.dtype)
    }

    /// This tensor converted to another storage dtype (a new tensor on the same device,
    /// rounded to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        match &self.storage {
            Storage::Cpu(c) if dtype == self.dtype => Ok(Tensor::from_parts(
                self.shape.clone(),
                self.dtype,
                Storage::Cpu(c.clone()),
            )),
            _ => {
                let dev = self.device();
                let mut out = Tensor::zeros(&self.shape, dtype, &dev)?;
                crate::ops::backend::add(&dev, self, None, &mut out)?;
                Ok(out)
            }
        }
    }

    /// Overwrites the whole storage with `bytes` (exactly `size_in_bytes`, little-endian, of
    /// this dtype) in place: one host→device copy, no reallocation, bit-exact (no arithmetic
    /// touches the values, so NaN payloads and subnormals survive).
    pub(crate) fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.size_in_bytes() {
            return Err(Error::invalid(
                "Tensor::write_bytes",
                "bytes",
                format!(
                    "{} bytes for a {:?} {} tensor of {} bytes",
                    bytes.len(),
                    self.shape,
                    self.dtype,
                    self.size_in_bytes()
                ),
            ));
        }
        match &mut self.storage {
            Storage::Cpu(c) => {
                // In place: a CPU tensor may wrap the caller's vector (interop).
                let dst: &mut [u8] = match c {
                    CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
                    CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
                    CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
                };
                dst.copy_from_slice(bytes);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let d = s.device.clone();
                d.write(s, bytes)
            }
            #[cfg(feature = "wgpu")]
            Storage::Wgpu(s) => s.device.write(s, bytes),
        }
    }

    pub(crate) fn cpu(&self) -> Option<&CpuStorage> {
        match &self.storage {
            Storage::Cpu(c) => Some(c),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    pub(crate) fn cpu_mut(&mut self) -> Option<&mut CpuStorage> {
        match &mut self.storage {
            Storage::Cpu(c) => Some(c),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}
