//! The CUDA backend: a context and one stream per device, NVRTC JIT compilation of the kernels
//! in `kernels/cuda/` for the device's own architecture (cached in memory and on disk), and
//! typed, checked launchers.
//!
//! Nothing here needs CUDA at build time: cudarc loads libcuda and libnvrtc at run time, and
//! `CudaDevice::new` reports a missing driver, NVRTC or GPU as `Error::DeviceUnavailable`
//! instead of panicking (cudarc itself panics if a library is missing when first called, so
//! presence is checked before anything else touches it).

use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};

use crate::error::{Error, Result};

pub(crate) mod attention;
pub(crate) mod bce;
pub(crate) mod embedding;
pub(crate) mod gemm;
pub(crate) mod glue;
pub(crate) mod inplace;
pub mod interop;
mod kernels;
mod launch;
pub(crate) mod layernorm;
mod module_cache;
mod nvrtc;
pub(crate) mod optim;
pub(crate) mod softmax;

use launch::Limits;
use module_cache::ModuleCache;

/// A CUDA device: primary context, one non-blocking stream that all of recfuse's work on it is
/// ordered on, and its compiled-kernel cache.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    name: String,
    pub(crate) compute_capability: (i32, i32),
    /// NVRTC target, `sm_XY`.
    pub(crate) arch: String,
    total_mem: usize,
    pub(crate) limits: Limits,
    modules: ModuleCache,
    /// `RECFUSE_SYNC_CHECK=1`: synchronise after every launch.
    pub(crate) sync_check: bool,
    /// Opened with `Device::cuda_on_stream` (said in `describe`, so a `DeviceMismatch` between it
    /// and `Device::cuda` on the same GPU names two different things).
    callers_stream: bool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Device memory of one tensor (bytes; the tensor knows its dtype and shape).
#[derive(Debug)]
pub(crate) struct CudaStorage {
    pub device: Arc<CudaDevice>,
    /// At least one byte even for empty tensors (a zero-byte allocation is an error). Freed on
    /// drop only when `owned`: a tensor wrapping a caller's raw pointer must leave it alone.
    pub(crate) buf: ManuallyDrop<CudaSlice<u8>>,
    pub(crate) len: usize,
    owned: bool,
}

impl CudaStorage {
    /// Storage that owns `buf` (freed, stream-ordered, when the tensor drops).
    pub(crate) fn owned(device: Arc<CudaDevice>, buf: CudaSlice<u8>, len: usize) -> CudaStorage {
        CudaStorage {
            device,
            buf: ManuallyDrop::new(buf),
            len,
            owned: true,
        }
    }

    /// Storage over memory recfuse does not own: never freed by recfuse.
    pub(crate) fn borrowed(device: Arc<CudaDevice>, buf: CudaSlice<u8>, len: usize) -> CudaStorage {
        CudaStorage {
            device,
            buf: ManuallyDrop::new(buf),
            len,
            owned: false,
        }
    }

    /// Whether dropping this storage frees its memory.
    pub(crate) fn is_owned(&self) -> bool {
        self.owned
    }

    /// Gives up the allocation without freeing it: its device pointer. The storage's stream
    /// keeps the order of everything queued on it before.
    pub(crate) fn into_raw(self) -> u64 {
        let mut me = ManuallyDrop::new(self);
        // SAFETY: `me` is never dropped, so its `buf` and `device` are each moved out (or
        // dropped) exactly once, here.
        let buf = unsafe { ManuallyDrop::take(&mut me.buf) };
        // SAFETY: as above; `device` is not touched again.
        unsafe { std::ptr::drop_in_place(&mut me.device) };
        buf.leak()
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        // SAFETY: `buf` is taken exactly once, here, and never used again.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        if self.owned {
            drop(buf);
        } else {
            // Not ours: release cudarc's handle (its stream Arc) without freeing the memory.
            let _ = buf.leak();
        }
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::DeviceUnavailable {
        backend: "cuda",
        reason: reason.into(),
    }
}

pub(crate) fn backend_err(what: &str, e: DriverError) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!("{what}: {e}"),
    }
}

/// The oldest driver API version (`cuDriverGetVersion`, 1000·major + 10·minor) that loads the
/// CUBINs NVRTC 13.0 emits: CUDA 13.0, i.e. driver R580 or newer.
const MIN_DRIVER_VERSION: i32 = 13000;

/// A driver older than the NVRTC that compiles the kernels rejects every CUBIN at load time with
/// an error that looks like a compiler bug; name the real cause before anything is compiled.
fn check_driver_version() -> Result<()> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: libcuda is present (checked by the caller); `v` is a valid out-pointer, and
    // cuDriverGetVersion may be called before cuInit.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(unavailable(format!("cuDriverGetVersion failed: {r:?}")));
    }
    if v < MIN_DRIVER_VERSION {
        return Err(unavailable(format!(
            "the NVIDIA driver supports CUDA {}.{} (cuDriverGetVersion = {v}), but recfuse's \
             kernels are compiled by NVRTC 13.0, whose CUBINs need a driver for CUDA 13.0 or \
             newer (R580+); upgrade the driver",
            v / 1000,
            (v % 1000) / 10
        )));
    }
    Ok(())
}

impl CudaDevice {
    /// Opens device `ordinal`. Missing libcuda, missing NVRTC, no GPU or a bad ordinal are all
    /// `Error::DeviceUnavailable`; nothing panics.
    pub(crate) fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only tries to dlopen libcuda under cudarc's candidate names and closes it
        // again; no driver function is called. Every other cudarc driver call panics when the
        // library is missing, so this must come first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable(
                "libcuda not found: no NVIDIA driver is installed (or it is not on the \
                 dynamic loader's path)",
            ));
        }
        // Without NVRTC no kernel can be built, so the device is unusable: say so now, not at
        // the first op.
        nvrtc::nvrtc()?;
        check_driver_version()?;
        let count = CudaContext::device_count()
            .map_err(|e| unavailable(format!("cuInit / cuDeviceGetCount: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "cuda:{ordinal} requested, but the driver reports {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("creating a context on cuda:{ordinal}: {e}")))?;
        // SAFETY: recfuse orders all of its allocations, copies, launches and frees on the one
        // stream created below, so stream order already provides the synchronisation that
        // cudarc's per-allocation events would (and event tracking would add two events per
        // tensor and event waits on every launch). The flag lives in this `CudaContext` value,
        // not in the driver's primary context, so other cudarc users in the process keep
        // theirs; it is set before anything is allocated through this value.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable(format!("creating a stream on cuda:{ordinal}: {e}")))?;
        Self::with_stream(ordinal, ctx, stream, false)
    }

    /// A device that orders all of recfuse's work on the caller's `stream` (and its context).
    /// The context's event-tracking setting is left as the caller chose it.
    pub(crate) fn on_stream(stream: Arc<CudaStream>) -> Result<Arc<Self>> {
        // A stream exists, so libcuda is loaded and initialised; NVRTC is still needed.
        nvrtc::nvrtc()?;
        check_driver_version()?;
        let ctx = stream.context().clone();
        ctx.bind_to_thread()
            .map_err(|e| unavailable(format!("binding the stream's context: {e}")))?;
        Self::with_stream(ctx.ordinal(), ctx, stream, true)
    }

    fn with_stream(
        ordinal: usize,
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        callers_stream: bool,
    ) -> Result<Arc<Self>> {
        let q = |what: &str, e: DriverError| {
            unavailable(format!("querying cuda:{ordinal} {what}: {e}"))
        };
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| q("compute capability", e))?;
        let name = ctx.name().map_err(|e| q("name", e))?;
        let total_mem = ctx.total_mem().map_err(|e| q("memory size", e))?;
        let limits = Limits::query(&ctx).map_err(|e| q("limits", e))?;
        let arch = format!("sm_{}{}", compute_capability.0, compute_capability.1);
        let sync_check = std::env::var("RECFUSE_SYNC_CHECK")
            .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
            .unwrap_or(false);
        Ok(Arc::new(CudaDevice {
            ordinal,
            ctx,
            stream,
            name,
            compute_capability,
            arch,
            total_mem,
            limits,
            modules: ModuleCache::default(),
            sync_check,
            callers_stream,
        }))
    }

    /// `cuda:0 NVIDIA H200 (sm_90, 140 GiB)`.
    pub fn describe(&self) -> String {
        let on = if self.callers_stream {
            format!(" on the caller's stream {:?}", self.stream.cu_stream())
        } else {
            String::new()
        };
        format!(
            "cuda:{} {} ({}, {:.0} GiB){on}",
            self.ordinal,
            self.name,
            self.arch,
            self.total_mem as f64 / (1u64 << 30) as f64
        )
    }

    /// The cudarc context recfuse created this device on (the device's primary context, so
    /// memory allocated through any cudarc `CudaContext` on the same ordinal is valid here).
    ///
    /// recfuse disabled cudarc's per-allocation event tracking on this `CudaContext` value
    /// (everything recfuse does is ordered on [`CudaDevice::stream`]), so slices you allocate
    /// through it are ordered by stream order only: if you use them on another stream,
    /// synchronise that stream with this one yourself.
    ///
    /// ```no_run
    /// let dev = recfuse::Device::cuda(0)?;
    /// let cuda = dev.as_cuda().expect("a CUDA device");
    /// let ctx = cuda.context();
    /// println!("{}", ctx.name().unwrap_or_default());
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The one stream all of recfuse's allocations, copies, launches and frees on this device
    /// are ordered on. Work you queue on it is ordered with recfuse's; work on your other
    /// streams is not (join them with an event first).
    ///
    /// ```no_run
    /// let dev = recfuse::Device::cuda(0)?;
    /// let stream = dev.as_cuda().expect("a CUDA device").stream().clone();
    /// // A buffer allocated on recfuse's stream, ordered with everything recfuse does.
    /// let buf = stream.alloc_zeros::<f32>(1024).expect("alloc");
    /// assert_eq!(buf.len(), 1024);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA device ordinal (`N` in `cuda:N`).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// True when the driver is `tools/cuda-emu`'s emulated device (kernels executed on the CPU):
    /// correct results there prove indexing and synchronisation, never speed.
    pub fn is_emulated(&self) -> bool {
        self.name.starts_with("cuda-emu")
    }

    /// Copies host bytes into a new device allocation (ordered on the device's stream).
    pub(crate) fn upload(self: &Arc<Self>, bytes: &[u8]) -> Result<CudaStorage> {
        crate::device::count_host_transfer();
        // SAFETY: the allocation is uninitialised; the `bytes.len()` bytes any reader may see
        // are overwritten by the copy below, on the same stream, before anything else runs.
        let mut buf = unsafe { self.stream.alloc::<u8>(bytes.len().max(1)) }
            .map_err(|e| backend_err(&format!("allocating {} bytes", bytes.len()), e))?;
        if !bytes.is_empty() {
            self.stream.memcpy_htod(bytes, &mut buf).map_err(|e| {
                backend_err(&format!("copying {} bytes to the device", bytes.len()), e)
            })?;
        }
        Ok(CudaStorage::owned(self.clone(), buf, bytes.len()))
    }

    /// A zero-filled allocation of `nbytes` (a device memset: no host buffer, no copy).
    pub(crate) fn alloc_zeros(self: &Arc<Self>, nbytes: usize) -> Result<CudaStorage> {
        let buf = self
            .stream
            .alloc_zeros::<u8>(nbytes.max(1))
            .map_err(|e| backend_err(&format!("allocating {nbytes} zeroed bytes"), e))?;
        Ok(CudaStorage::owned(self.clone(), buf, nbytes))
    }

    /// Copies host bytes over the start of an existing allocation (ordered on the stream, so
    /// after every launch queued before): a checkpoint restore writes a parameter in place.
    pub(crate) fn write(&self, s: &mut CudaStorage, bytes: &[u8]) -> Result<()> {
        crate::device::count_host_transfer();
        if bytes.len() > s.len {
            return Err(Error::invalid(
                "Tensor::write_bytes",
                "bytes",
                format!("{} bytes into a {}-byte allocation", bytes.len(), s.len),
            ));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let mut dst = s.buf.slice_mut(0..bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut dst)
            .map_err(|e| backend_err(&format!("copying {} bytes to the device", bytes.len()), e))
    }

    /// Copies the first `nbytes` of `s` to the host, after all work queued before it.
    pub(crate) fn download(&self, s: &CudaStorage, nbytes: usize) -> Result<Vec<u8>> {
        crate::device::count_host_transfer();
        if nbytes > s.len {
            return Err(Error::invalid(
                "Tensor::to_bytes",
                "nbytes",
                format!("{nbytes} bytes requested from a {}-byte allocation", s.len),
            ));
        }
        let mut out = vec![0u8; nbytes];
        if nbytes > 0 {
            self.stream
                .memcpy_dtoh(&s.buf.slice(0..nbytes), &mut out)
                .map_err(|e| backend_err(&format!("copying {nbytes} bytes to the host"), e))?;
        }
        // A copy into pageable memory is synchronous already; this also surfaces any error an
        // earlier asynchronous launch left behind.
        self.synchronize()?;
        Ok(out)
    }

    /// Waits for all work queued on this device's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| backend_err("synchronising the stream (a kernel may have faulted; rerun with RECFUSE_SYNC_CHECK=1 to name it)", e))
    }

    /// Compute capability ≥ 8.0: bf16/f16/tf32 `mma.sync` is available.
    pub(crate) fn has_mma(&self) -> bool {
        self.compute_capability.0 >= 8
    }

    pub(crate) fn function(
        &self,
        file: &'static str,
        defines: &[(&'static str, u32)],
        name: &'static str,
    ) -> Result<cudarc::driver::CudaFunction> {
        self.modules
            .function(&self.ctx, &self.arch, file, defines, name)
    }
}

/// Every (kernel file, `-D` defines) combination the launchers can request, for the
/// offline compile check (`tests/cuda_compile.rs`).
#[doc(hidden)]
pub fn compile_variants() -> Vec<(&'static str, Vec<String>)> {
    let mut v: Vec<(&'static str, Vec<String>)> = gemm::GemmVariant::all()
        .into_iter()
        .map(|g| ("gemm.cu", kernels::define_strings(&g.defines())))
        .collect();
    v.extend(softmax::compile_variants());
    v.push(("gemm_aux.cu", Vec::new()));
    v.push(("gated_cross.cu", Vec::new()));
    for a in attention::all_variants() {
        v.push((
            "attention.cu",
            kernels::define_strings(&attention::defines(a)),
        ));
    }
    v.push(("layernorm.cu", Vec::new()));
    v.push(("inplace.cu", Vec::new()));
    v.push(("bce.cu", Vec::new()));
    v.push(("optim.cu", Vec::new()));
    v.push(("glue.cu", Vec::new()));
    v.push(("embedding.cu", Vec::new()));
    // Every embedded file must be covered, so a new file cannot silently escape the check.
    for (file, _) in kernels::FILES {
        if !v.iter().any(|(f, _)| f == file) {
            v.push((file, Vec::new()));
        }
    }
    v
}

/// Compiles one variant to PTX for `arch` with exactly the options the runtime uses (minus the
/// CUBIN step), so `ptxas -v` can check registers and spills without a GPU.
#[doc(hidden)]
pub fn compile_ptx_for_check(src_name: &str, defines: &[String], arch: &str) -> Result<String> {
    let src = kernels::source(src_name).ok_or_else(|| Error::Compile {
        kernel: src_name.to_string(),
        target: arch.to_string(),
        log: "no such kernel file is embedded".into(),
    })?;
    let options = kernels::options(arch, defines);
    let ptx = nvrtc::compile(src_name, arch, &src, &options, nvrtc::Output::Ptx)?;
    Ok(String::from_utf8_lossy(&ptx).into_owned())
}

/// `NVRTC 13.0 (from ...)`, or `DeviceUnavailable` when NVRTC cannot be loaded.
#[doc(hidden)]
pub fn nvrtc_info() -> Result<String> {
    let nv = nvrtc::nvrtc()?;
    Ok(format!(
        "NVRTC {}.{} (from {})",
        nv.version.0, nv.version.1, nv.origin
    ))
}

#[cfg(test)]
mod tests {
    use crate::{Device, Error};

    /// The offline compile check covers every attention bucket and the LayerNorm module.
    #[test]
    fn compile_variants_cover_attention_and_layernorm() {
        let v = super::compile_variants();
        let has = |file: &str, defs: &[&str]| {
            v.iter()
                .any(|(f, d)| *f == file && d.iter().map(String::as_str).eq(defs.iter().copied()))
        };
        for (dk, dv) in super::attention::all_variants() {
            assert!(has(
                "attention.cu",
                &[&format!("DK={dk}"), &format!("DV={dv}")]
            ));
        }
        assert!(
            has("attention.cu", &["DK=16", "DV=64"]),
            "the paper's head dims"
        );
        assert!(has("layernorm.cu", &[]));
        assert_eq!(v.iter().filter(|(f, _)| *f == "attention.cu").count(), 11);
    }

    /// Every (file, defines) variant the launchers can request was loaded, and every kernel in
    /// each loaded module was launched, during an emulated-CUDA test run: reads the launch trace
    /// that `tools/cuda-emu` writes to `CUDA_EMU_TRACE` (scripts/test runs this after the
    /// emulated pass; it needs no device itself).
    #[test]
    #[ignore = "reads the launch trace of an emulated-CUDA run (scripts/test runs it)"]
    fn every_variant_ran_on_the_emulated_device() {
        use std::collections::{BTreeMap, BTreeSet};
        let path = std::env::var("CUDA_EMU_TRACE").expect("CUDA_EMU_TRACE names the trace file");
        let text = std::fs::read_to_string(&path).expect("read the trace");
        let mut modules: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        let mut launched: BTreeSet<(String, String, String)> = BTreeSet::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f.as_slice() {
                ["module", file, defs, kernels] => {
                    let ks = kernels.split(',').filter(|k| !k.is_empty());
                    modules
                        .entry((file.to_string(), defs.to_string()))
                        .or_default()
                        .extend(ks.map(str::to_string));
                }
                ["launch", file, defs, kernel] => {
                    launched.insert((file.to_string(), defs.to_string(), kernel.to_string()));
                }
                _ => panic!("unexpected trace line {line:?}"),
            }
        }
        let mut missing = Vec::new();
        for (file, defines) in super::compile_variants() {
            let key = (file.to_string(), defines.join(","));
            if !modules.contains_key(&key) {
                missing.push(format!("{file} [{}]: never compiled or loaded", key.1));
            }
        }
        for ((file, defs), kernels) in &modules {
            for k in kernels {
                if !launched.contains(&(file.clone(), defs.clone(), k.clone())) {
                    missing.push(format!("{file} [{defs}]: kernel {k} never launched"));
                }
            }
        }
        let n_launched = launched.len();
        println!(
            "{n_launched} kernels launched in {} module variants",
            modules.len()
        );
        assert!(
            missing.is_empty(),
            "the emulated run did not execute:\n  {}",
            missing.join("\n  ")
        );
    }

    /// On a machine without libcuda (or without a GPU) opening a device is a typed error, never
    /// a panic; with a GPU it succeeds. A nonexistent ordinal is an error everywhere.
    #[test]
    fn missing_device_is_unavailable_not_a_panic() {
        match Device::cuda(0) {
            Ok(d) => println!("cuda:0 present: {}", d.describe()),
            Err(Error::DeviceUnavailable { backend, reason }) => {
                assert_eq!(backend, "cuda");
                println!("cuda:0 unavailable (expected without a GPU): {reason}");
            }
            Err(other) => panic!("expected DeviceUnavailable, got {other:?}"),
        }
        match Device::cuda(4096) {
            Err(Error::DeviceUnavailable {
                backend: "cuda", ..
            }) => {}
            other => panic!("expected DeviceUnavailable for cuda:4096, got {other:?}"),
        }
        // A second attempt must not panic either (cudarc panics on every call once its library
        // load failed, so the presence check has to guard every entry).
        assert!(Device::cuda(0).is_ok() || Device::cuda(0).is_err());
    }
}
