//! The wgpu backend: one adapter, its device and queue, a pipeline cache, a scratch-buffer pool
//! and checked launches of the WGSL kernels in `kernels/wgsl/`.
//!
//! Every tensor is one storage buffer whose size is rounded up to a multiple of 4 bytes (WGSL
//! sees it as `array<u32>`; 16-bit tensors hold two elements per word). All wgpu calls that can
//! fail run inside Validation + OutOfMemory error scopes, and what those scopes catch comes back
//! as an `Error`; an uncaptured-error handler replaces wgpu's default (a panic) and reports what
//! escaped the scopes at the next `synchronize`.

use std::sync::{mpsc, Arc, Mutex};

use crate::device::WgpuOptions;
use crate::error::{Error, Result};

pub(crate) mod attention;
pub(crate) mod bce;
mod buffers;
pub(crate) mod embedding;
pub(crate) mod gemm;
pub(crate) mod glue;
pub(crate) mod inplace;
pub(crate) mod layernorm;
pub(crate) mod optim;
mod pipelines;
pub(crate) mod softmax;

const BACKEND: &str = "wgpu";

/// A wgpu adapter opened as a compute device.
pub struct WgpuDevice {
    // Kept alive for as long as the device, which was created from it.
    _instance: wgpu::Instance,
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    shader_f16: bool,
    /// `RECFUSE_SYNC_CHECK=1`: wait after every launch so a fault names its kernel.
    sync_check: bool,
    /// Uniform or read-only storage buffers for the launch parameters (a lavapipe leak).
    params_in: pipelines::ParamsIn,
    pipelines: pipelines::PipelineCache,
    pool: buffers::BufferPool,
    /// Bound in place of absent optional inputs (bias, residual, pre) so every kernel variant
    /// keeps one bind-group layout. One read-only and one read-write, because wgpu rejects a
    /// buffer bound both ways in one dispatch.
    dummy_ro: wgpu::Buffer,
    dummy_rw: wgpu::Buffer,
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// Which device this is among those the process opened (1, 2, …): two devices on one
    /// adapter must not describe themselves identically in a `DeviceMismatch`.
    instance: u64,
}

static WGPU_INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl std::fmt::Debug for WgpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Device memory of one tensor.
#[derive(Debug)]
pub(crate) struct WgpuStorage {
    pub device: Arc<WgpuDevice>,
    pub(crate) buffer: wgpu::Buffer,
}

/// Bytes rounded up to whole u32 words (at least one: wgpu cannot bind an empty buffer).
pub(crate) fn padded(nbytes: usize) -> u64 {
    (nbytes.max(1) as u64).div_ceil(4) * 4
}

fn is_software(info: &wgpu::AdapterInfo) -> bool {
    let name = info.name.to_ascii_lowercase();
    info.device_type == wgpu::DeviceType::Cpu
        || ["llvmpipe", "lavapipe", "softpipe", "swiftshader"]
            .iter()
            .any(|s| name.contains(s))
}

/// Lower is better: hardware before software, discrete before integrated, native APIs before GL
/// (GL has no shader-f16 and weaker compute support).
fn rank(info: &wgpu::AdapterInfo) -> (bool, u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let api = u8::from(info.backend == wgpu::Backend::Gl);
    (is_software(info), kind, api)
}

fn adapter_line(info: &wgpu::AdapterInfo) -> String {
    format!("{} [{:?}, {:?}]", info.name, info.backend, info.device_type)
}

impl WgpuDevice {
    /// The wgpu device recfuse creates its buffers and pipelines on.
    ///
    /// Wrapping a caller's `wgpu::Buffer` as a `Tensor` is not supported yet; share data through
    /// `Tensor::from_slice` / `to_vec`, or encode your own passes on this device and queue.
    ///
    /// ```no_run
    /// let dev = recfuse::Device::wgpu(&Default::default())?;
    /// let w = dev.as_wgpu().expect("a wgpu device");
    /// let _limits = w.device().limits();
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue recfuse submits all of its work on: your submissions on it are ordered with
    /// recfuse's.
    ///
    /// ```no_run
    /// let dev = recfuse::Device::wgpu(&Default::default())?;
    /// let q = dev.as_wgpu().expect("a wgpu device").queue();
    /// q.submit([]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
}

impl WgpuDevice {
    /// Opens the best adapter (see `rank`); software adapters only with `opts.allow_software`.
    pub(crate) fn new(opts: &WgpuOptions) -> Result<Arc<Self>> {
        let unavailable = |reason: String| Error::DeviceUnavailable {
            backend: BACKEND,
            reason,
        };
        let mut found = Vec::new();
        let mut candidates = Vec::new();
        // GL is the last resort (no shader-f16, weaker compute, and probing it without a
        // display prints errors), so it is enumerated only when the native APIs offer nothing
        // usable. A GL-only GPU therefore loses to a software Vulkan adapter when software is
        // allowed; every GPU with a current driver has Vulkan.
        // An instance per stage: creating one with GL enabled probes EGL even if GL is never
        // enumerated.
        for backends in [wgpu::Backends::PRIMARY, wgpu::Backends::SECONDARY] {
            if !candidates.is_empty() {
                break;
            }
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
            desc.backends = backends;
            let instance = wgpu::Instance::new(desc);
            for a in pollster::block_on(instance.enumerate_adapters(backends)) {
                let info = a.get_info();
                let compute = a
                    .get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS);
                let sw = is_software(&info);
                let note = match (compute, sw, opts.allow_software) {
                    (false, _, _) => " (no compute shaders)",
                    (true, true, false) => " (software; needs allow_software)",
                    _ => "",
                };
                found.push(format!("{}{note}", adapter_line(&info)));
                if compute && (!sw || opts.allow_software) {
                    candidates.push((rank(&info), a, info, instance.clone()));
                }
            }
        }
        if candidates.is_empty() {
            let seen = if found.is_empty() {
                "no adapters at all (is a Vulkan driver such as mesa-vulkan-drivers installed?)"
                    .to_string()
            } else {
                format!("found {}", found.join("; "))
            };
            let want = if opts.allow_software {
                "no adapter with compute shaders"
            } else {
                "no hardware adapter with compute shaders"
            };
            return Err(unavailable(format!("{want}: {seen}")));
        }
        candidates.sort_by_key(|c| c.0);
        let mut failures = Vec::new();
        for (_, adapter, info, instance) in candidates {
            let shader_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
            let features = if shader_f16 {
                wgpu::Features::SHADER_F16
            } else {
                wgpu::Features::empty()
            };
            let desc = wgpu::DeviceDescriptor {
                label: Some("recfuse"),
                required_features: features,
                // The adapter's own limits: the WebGPU defaults (16 KiB workgroup memory, 128 MiB
                // bindings) are far below what real GPUs allow.
                required_limits: adapter.limits(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            };
            match pollster::block_on(adapter.request_device(&desc)) {
                Ok((device, queue)) => {
                    return Ok(Arc::new(Self::from_parts(
                        instance, device, queue, info, shader_f16,
                    )?))
                }
                Err(e) => failures.push(format!("{}: {e}", adapter_line(&info))),
            }
        }
        Err(unavailable(format!(
            "every candidate adapter refused a device: {}",
            failures.join("; ")
        )))
    }

    fn from_parts(
        instance: wgpu::Instance,
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        shader_f16: bool,
    ) -> Result<Self> {
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            // A poisoned lock only means another thread panicked mid-push; keep recording.
            let mut v = sink.lock().unwrap_or_else(|p| p.into_inner());
            v.push(e.to_string());
        }));
        let limits = device.limits();
        let dummy = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        let dummy_ro = dummy("recfuse dummy (read)", wgpu::BufferUsages::STORAGE);
        let dummy_rw = dummy("recfuse dummy (read_write)", wgpu::BufferUsages::STORAGE);
        let sync_check = std::env::var("RECFUSE_SYNC_CHECK").is_ok_and(|v| v == "1");
        let params_in = pipelines::ParamsIn::choose(is_software(&info))?;
        let d = WgpuDevice {
            _instance: instance,
            device,
            queue,
            info,
            limits,
            shader_f16,
            sync_check,
            params_in,
            pipelines: pipelines::PipelineCache::default(),
            pool: buffers::BufferPool::default(),
            dummy_ro,
            dummy_rw,
            uncaptured,
            instance: WGPU_INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
        };
        d.take_uncaptured()?;
        Ok(d)
    }

    /// `wgpu: <adapter name> [<API>, <device type>]`.
    pub fn describe(&self) -> String {
        let f16 = if self.shader_f16 { ", shader-f16" } else { "" };
        // The instance number appears from the second device on, so the usual one-device
        // output stays as it was.
        let nth = if self.instance > 1 {
            format!(" #{}", self.instance)
        } else {
            String::new()
        };
        format!(
            "wgpu{nth}: {} [{:?}, {:?}{f16}]",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// Whether the adapter is a software rasteriser (lavapipe, llvmpipe, SwiftShader).
    pub fn is_software(&self) -> bool {
        is_software(&self.info)
    }

    /// Runs `f` inside Validation and OutOfMemory error scopes and returns what they caught.
    pub(crate) fn scoped<T>(&self, f: impl FnOnce() -> T) -> (T, Option<String>) {
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let out = f();
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        let err = match (oom, validation) {
            (Some(o), _) => Some(format!("out of memory: {o}")),
            (None, Some(v)) => Some(v.to_string()),
            (None, None) => None,
        };
        (out, err)
    }

    fn take_uncaptured(&self) -> Result<()> {
        let mut v = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("; ");
        v.clear();
        Err(Error::Backend {
            backend: BACKEND,
            reason: format!("uncaptured device error: {msg}"),
        })
    }

    /// A buffer of `size` bytes (a multiple of 4), checked against the device's limits.
    pub(crate) fn create_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        mapped_at_creation: bool,
    ) -> Result<wgpu::Buffer> {
        if size > self.limits.max_buffer_size {
            return Err(Error::Backend {
                backend: BACKEND,
                reason: format!(
                    "{label}: {size} bytes exceed the device's max_buffer_size {}",
                    self.limits.max_buffer_size
                ),
            });
        }
        let (buf, err) = self.scoped(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation,
            })
        });
        match err {
            Some(e) => Err(Error::Backend {
                backend: BACKEND,
                reason: format!("allocating {label} ({size} bytes): {e}"),
            }),
            None => Ok(buf),
        }
    }

    /// A storage buffer holding `bytes` (zero-padded to whole words).
    pub(crate) fn upload(self: &Arc<Self>, bytes: &[u8]) -> Result<WgpuStorage> {
        crate::device::count_host_transfer();
        let buffer = self.create_buffer(
            "recfuse tensor",
            padded(bytes.len()),
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            true,
        )?;
        if !bytes.is_empty() {
            let mut view = buffer
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| Error::Backend {
                    backend: BACKEND,
                    reason: format!("mapping a new tensor buffer for upload: {e}"),
                })?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        buffer.unmap();
        Ok(WgpuStorage {
            device: self.clone(),
            buffer,
        })
    }

    /// A zero-filled tensor buffer of `nbytes`: WebGPU zero-initialises every new buffer, so no
    /// host data is built or copied.
    pub(crate) fn alloc_zeros(self: &Arc<Self>, nbytes: usize) -> Result<WgpuStorage> {
        let buffer = self.create_buffer(
            "recfuse tensor",
            padded(nbytes),
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            false,
        )?;
        Ok(WgpuStorage {
            device: self.clone(),
            buffer,
        })
    }

    /// Writes host bytes over the start of an existing buffer (`queue.write_buffer`: ordered
    /// after all work submitted before and before any submitted after). A partial last word is
    /// zero-padded: the buffer's pad bytes past the tensor are never read.
    pub(crate) fn write(&self, s: &WgpuStorage, bytes: &[u8]) -> Result<()> {
        crate::device::count_host_transfer();
        if bytes.is_empty() {
            return Ok(());
        }
        let size = padded(bytes.len());
        if size > s.buffer.size() {
            return Err(Error::Backend {
                backend: BACKEND,
                reason: format!(
                    "write of {} bytes into a {}-byte buffer",
                    bytes.len(),
                    s.buffer.size()
                ),
            });
        }
        let mut words = bytes.to_vec();
        words.resize(size as usize, 0);
        let (_, err) = self.scoped(|| self.queue.write_buffer(&s.buffer, 0, &words));
        match err {
            Some(e) => Err(Error::Backend {
                backend: BACKEND,
                reason: format!("writing {} bytes to a tensor: {e}", bytes.len()),
            }),
            None => Ok(()),
        }
    }

    /// Copies the first `nbytes` of `s` to the host through a MAP_READ staging buffer (waits for
    /// all work queued before).
    pub(crate) fn download(&self, s: &WgpuStorage, nbytes: usize) -> Result<Vec<u8>> {
        crate::device::count_host_transfer();
        if nbytes == 0 {
            return Ok(Vec::new());
        }
        let size = padded(nbytes);
        if size > s.buffer.size() {
            return Err(Error::Backend {
                backend: BACKEND,
                reason: format!(
                    "download of {nbytes} bytes from a {}-byte buffer",
                    s.buffer.size()
                ),
            });
        }
        let staging = self.create_buffer(
            "recfuse readback",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            false,
        )?;
        let (_, err) = self.scoped(|| {
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("recfuse readback"),
                });
            enc.copy_buffer_to_buffer(&s.buffer, 0, &staging, 0, size);
            self.queue.submit([enc.finish()]);
        });
        if let Some(e) = err {
            return Err(Error::Backend {
                backend: BACKEND,
                reason: format!("readback copy: {e}"),
            });
        }
        let (tx, rx) = mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            // The receiver outlives the poll loop below; a failed send cannot happen.
            let _ = tx.send(r);
        });
        // A wait returns once the queue is idle; the map callback normally runs inside it, but
        // may land on the next poll, so poll a bounded number of times rather than block on
        // the channel (a callback that never comes must not hang the caller).
        let mut mapped = None;
        for _ in 0..1000 {
            self.poll_wait("readback")?;
            match rx.try_recv() {
                Ok(r) => {
                    mapped = Some(r);
                    break;
                }
                Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        }
        let mapped = mapped.ok_or_else(|| Error::Backend {
            backend: BACKEND,
            reason: "readback: the buffer mapping never completed".into(),
        })?;
        mapped.map_err(|e| Error::Backend {
            backend: BACKEND,
            reason: format!("readback: mapping failed: {e}"),
        })?;
        let out = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Backend {
                    backend: BACKEND,
                    reason: format!("readback: {e}"),
                })?;
            view[..nbytes].to_vec()
        };
        staging.unmap();
        self.take_uncaptured()?;
        Ok(out)
    }

    fn poll_wait(&self, what: &str) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Backend {
                backend: BACKEND,
                reason: format!("{what}: waiting for the device: {e}"),
            })
    }

    /// Waits for all submitted work, then reports any device error that escaped the scopes.
    pub fn synchronize(&self) -> Result<()> {
        self.poll_wait("synchronize")?;
        self.take_uncaptured()
    }
}
