//! Shader modules, pipelines and checked launches.
//!
//! Modules are created once per WGSL file (with `common.wgsl` prepended: WGSL has no include),
//! pipelines once per (file, entry point, override constants). Bind-group layouts are explicit
//! per binding signature, so an override that makes a binding dead does not change the layout.
//! Every launch is checked against the device limits before wgpu sees it: wgpu does not
//! validate workgroup sizes or workgroup memory that derive from overrides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use super::{WgpuDevice, BACKEND};
use crate::error::{Error, Result};

const COMMON_WGSL: &str = include_str!("../../kernels/wgsl/common.wgsl");

/// One WGSL source file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

pub(crate) const GEMM_WGSL: Shader = Shader {
    name: "gemm.wgsl",
    source: include_str!("../../kernels/wgsl/gemm.wgsl"),
};

pub(crate) const ELEMENTWISE_WGSL: Shader = Shader {
    name: "elementwise.wgsl",
    source: include_str!("../../kernels/wgsl/elementwise.wgsl"),
};

pub(crate) const GATED_CROSS_WGSL: Shader = Shader {
    name: "gated_cross.wgsl",
    source: include_str!("../../kernels/wgsl/gated_cross.wgsl"),
};

pub(crate) const ATTENTION_WGSL: Shader = Shader {
    name: "attention.wgsl",
    source: include_str!("../../kernels/wgsl/attention.wgsl"),
};

pub(crate) const LAYERNORM_WGSL: Shader = Shader {
    name: "layernorm.wgsl",
    source: include_str!("../../kernels/wgsl/layernorm.wgsl"),
};

pub(crate) const INPLACE_WGSL: Shader = Shader {
    name: "inplace.wgsl",
    source: include_str!("../../kernels/wgsl/inplace.wgsl"),
};

pub(crate) const BCE_WGSL: Shader = Shader {
    name: "bce.wgsl",
    source: include_str!("../../kernels/wgsl/bce.wgsl"),
};

pub(crate) const GLUE_WGSL: Shader = Shader {
    name: "glue.wgsl",
    source: include_str!("../../kernels/wgsl/glue.wgsl"),
};

pub(crate) const EMBEDDING_WGSL: Shader = Shader {
    name: "embedding.wgsl",
    source: include_str!("../../kernels/wgsl/embedding.wgsl"),
};

pub(crate) const OPTIM_WGSL: Shader = Shader {
    name: "optim.wgsl",
    source: include_str!("../../kernels/wgsl/optim.wgsl"),
};

/// Where the launch parameters (binding 0 of every kernel) live.
///
/// Mesa's lavapipe (checked: 22.3.6, Debian 12) leaks host memory on every dispatch of some
/// shaders whose branches read a `var<uniform>` block (~1.4 MB per in-batch softmax forward:
/// the two-tower trainer on lavapipe grew 8 MB per step until the OOM killer stopped it at
/// 24 GB; examples/wgpu_softmax_memory bisects it). The same block read as a read-only
/// storage buffer does not leak and costs nothing measurable there, so software adapters get
/// `Storage`: the shaders' `var<uniform>` becomes `var<storage, read>` and the layouts and
/// buffers follow. Hardware adapters keep uniforms (the constant-cache path).
/// `RECFUSE_WGPU_PARAMS=uniform|storage` overrides the choice (the tests use it to run both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParamsIn {
    Uniform,
    Storage,
}

impl ParamsIn {
    /// The choice for an adapter: `RECFUSE_WGPU_PARAMS` when set, else `Storage` on software.
    pub(crate) fn choose(software: bool) -> Result<ParamsIn> {
        match std::env::var("RECFUSE_WGPU_PARAMS") {
            Err(std::env::VarError::NotPresent) => Ok(if software {
                ParamsIn::Storage
            } else {
                ParamsIn::Uniform
            }),
            Ok(v) if v == "uniform" => Ok(ParamsIn::Uniform),
            Ok(v) if v == "storage" => Ok(ParamsIn::Storage),
            Ok(v) => Err(Error::invalid(
                "Device::wgpu",
                "RECFUSE_WGPU_PARAMS",
                format!("must be `uniform` or `storage`, not `{v}`"),
            )),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::invalid(
                "Device::wgpu",
                "RECFUSE_WGPU_PARAMS",
                "is not UTF-8 (must be `uniform` or `storage`)",
            )),
        }
    }

    /// The WGSL source as this device compiles it.
    fn source(self, wgsl: String) -> String {
        match self {
            ParamsIn::Uniform => wgsl,
            ParamsIn::Storage => wgsl.replace("var<uniform>", "var<storage, read>"),
        }
    }

    fn binding(self) -> wgpu::BufferBindingType {
        match self {
            ParamsIn::Uniform => wgpu::BufferBindingType::Uniform,
            ParamsIn::Storage => wgpu::BufferBindingType::Storage { read_only: true },
        }
    }

    fn usage(self) -> wgpu::BufferUsages {
        match self {
            ParamsIn::Uniform => wgpu::BufferUsages::UNIFORM,
            ParamsIn::Storage => wgpu::BufferUsages::STORAGE,
        }
    }
}

/// How a binding is declared in WGSL; binding i of a kernel is `bindings[i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Binding {
    Uniform,
    Read,
    ReadWrite,
}

/// One entry point and what the host must know about it to check a launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    pub shader: Shader,
    pub entry: &'static str,
    pub bindings: &'static [Binding],
}

impl Kernel {
    pub(crate) fn id(&self) -> String {
        format!("{}:{}", self.shader.name, self.entry)
    }
}

type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u64)>);

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    layouts: Mutex<HashMap<Vec<Binding>, Arc<Layout>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
}

struct Layout {
    group: wgpu::BindGroupLayout,
    pipeline: wgpu::PipelineLayout,
}

pub(crate) struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: Arc<Layout>,
}

/// One dispatch: a kernel variant, its uniform block (u32 words), the buffers for bindings
/// 1.. (binding 0 is always the uniform block), the grid, and the workgroup shape and memory
/// the chosen overrides imply (for the limit checks).
pub(crate) struct Launch<'a> {
    pub kernel: Kernel,
    pub constants: Vec<(&'static str, f64)>,
    pub uniform: Vec<u32>,
    pub buffers: Vec<&'a wgpu::Buffer>,
    /// Preferred grid; folded (same linear order, x fastest) when a dimension is too large.
    pub grid: [u64; 3],
    pub workgroup: [u32; 3],
    pub workgroup_bytes: u64,
}

fn launch_err(kernel: &Kernel, reason: impl Into<String>) -> Error {
    Error::Launch {
        backend: BACKEND,
        kernel: kernel.id(),
        reason: reason.into(),
    }
}

/// Fits a grid into `max` workgroups per dimension without changing the linear workgroup
/// order the shaders decode (x fastest, then y, then z).
pub(crate) fn fold_grid(grid: [u64; 3], max: u64) -> Option<[u32; 3]> {
    if grid.contains(&0) {
        return Some([0, 0, 0]);
    }
    let total = grid[0].checked_mul(grid[1])?.checked_mul(grid[2])?;
    // The shaders decode a linear workgroup index in u32.
    if total > u64::from(u32::MAX) {
        return None;
    }
    if grid.iter().all(|&g| g <= max) {
        return Some(grid.map(|g| g as u32));
    }
    let x = total.min(max);
    let y = total.div_ceil(x).min(max);
    let z = total.div_ceil(x * y);
    if z > max || x * y * z > u64::from(u32::MAX) {
        return None;
    }
    Some([x as u32, y as u32, z as u32])
}

impl WgpuDevice {
    fn module(&self, shader: Shader) -> Result<Arc<wgpu::ShaderModule>> {
        let mut modules = self
            .pipelines
            .modules
            .lock()
            .expect("wgpu module cache lock poisoned");
        if let Some(m) = modules.get(shader.name) {
            return Ok(m.clone());
        }
        let source = self
            .params_in
            .source(format!("{COMMON_WGSL}\n{}", shader.source));
        let (module, err) = self.scoped(|| {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(shader.name),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                })
        });
        if let Some(log) = err {
            return Err(Error::Compile {
                kernel: shader.name.into(),
                target: format!("{} (common.wgsl prepended)", self.describe()),
                log,
            });
        }
        let m = Arc::new(module);
        modules.insert(shader.name, m.clone());
        Ok(m)
    }

    fn layout(&self, bindings: &[Binding]) -> Result<Arc<Layout>> {
        let mut layouts = self
            .pipelines
            .layouts
            .lock()
            .expect("wgpu layout cache lock poisoned");
        if let Some(l) = layouts.get(bindings) {
            return Ok(l.clone());
        }
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b {
                        Binding::Uniform => self.params_in.binding(),
                        Binding::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Binding::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let (layout, err) = self.scoped(|| {
            let group = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("recfuse"),
                    entries: &entries,
                });
            let pipeline = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some("recfuse"),
                    bind_group_layouts: &[Some(&group)],
                    immediate_size: 0,
                });
            Layout { group, pipeline }
        });
        if let Some(e) = err {
            return Err(Error::Backend {
                backend: BACKEND,
                reason: format!("creating a bind-group layout {bindings:?}: {e}"),
            });
        }
        let l = Arc::new(layout);
        layouts.insert(bindings.to_vec(), l.clone());
        Ok(l)
    }

    fn pipeline(
        &self,
        kernel: &Kernel,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<Pipeline>> {
        let key: PipelineKey = (
            kernel.shader.name,
            kernel.entry,
            constants.iter().map(|&(k, v)| (k, v.to_bits())).collect(),
        );
        if let Some(p) = self
            .pipelines
            .pipelines
            .lock()
            .expect("wgpu pipeline cache lock poisoned")
            .get(&key)
        {
            return Ok(p.clone());
        }
        let module = self.module(kernel.shader)?;
        let layout = self.layout(kernel.bindings)?;
        let (pipeline, err) = self.scoped(|| {
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.entry),
                    layout: Some(&layout.pipeline),
                    module: &module,
                    entry_point: Some(kernel.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        zero_initialize_workgroup_memory: true,
                    },
                    cache: None,
                })
        });
        if let Some(log) = err {
            return Err(Error::Compile {
                kernel: format!("{} {constants:?}", kernel.id()),
                target: self.describe(),
                log,
            });
        }
        let p = Arc::new(Pipeline { pipeline, layout });
        self.pipelines
            .pipelines
            .lock()
            .expect("wgpu pipeline cache lock poisoned")
            .insert(key, p.clone());
        Ok(p)
    }

    /// Checks a launch against the device limits and returns the grid to dispatch.
    fn check_launch(&self, l: &Launch<'_>) -> Result<[u32; 3]> {
        let lim = &self.limits;
        let k = &l.kernel;
        let [wx, wy, wz] = l.workgroup;
        let invocations = u64::from(wx) * u64::from(wy) * u64::from(wz);
        if wx > lim.max_compute_workgroup_size_x
            || wy > lim.max_compute_workgroup_size_y
            || wz > lim.max_compute_workgroup_size_z
            || invocations > u64::from(lim.max_compute_invocations_per_workgroup)
            || invocations == 0
        {
            return Err(launch_err(
                k,
                format!(
                    "workgroup {wx}×{wy}×{wz} exceeds the device limits ({}×{}×{}, {} invocations)",
                    lim.max_compute_workgroup_size_x,
                    lim.max_compute_workgroup_size_y,
                    lim.max_compute_workgroup_size_z,
                    lim.max_compute_invocations_per_workgroup
                ),
            ));
        }
        if l.workgroup_bytes > u64::from(lim.max_compute_workgroup_storage_size) {
            return Err(launch_err(
                k,
                format!(
                    "needs {} bytes of workgroup memory, the device allows {}",
                    l.workgroup_bytes, lim.max_compute_workgroup_storage_size
                ),
            ));
        }
        if l.buffers.len() + 1 != k.bindings.len() {
            return Err(launch_err(
                k,
                format!(
                    "{} buffers for {} storage bindings",
                    l.buffers.len(),
                    k.bindings.len() - 1
                ),
            ));
        }
        for (i, b) in l.buffers.iter().enumerate() {
            if b.size() > lim.max_storage_buffer_binding_size {
                return Err(launch_err(
                    k,
                    format!(
                        "binding {}: a {}-byte buffer exceeds max_storage_buffer_binding_size {}",
                        i + 1,
                        b.size(),
                        lim.max_storage_buffer_binding_size
                    ),
                ));
            }
        }
        let max = u64::from(lim.max_compute_workgroups_per_dimension);
        fold_grid(l.grid, max).ok_or_else(|| {
            launch_err(
                k,
                format!(
                    "grid {:?} does not fit max_compute_workgroups_per_dimension {max} even when folded",
                    l.grid
                ),
            )
        })
    }

    /// Checks, records and submits launches in order, in one command buffer (wgpu orders
    /// dependent dispatches within a pass). Errors caught while recording or submitting name
    /// the kernels.
    pub(crate) fn run(&self, launches: &[Launch<'_>]) -> Result<()> {
        let mut prepared = Vec::with_capacity(launches.len());
        for l in launches {
            let grid = self.check_launch(l)?;
            let pipeline = self.pipeline(&l.kernel, &l.constants)?;
            prepared.push((l, grid, pipeline));
        }
        let names = launches
            .iter()
            .map(|l| l.kernel.id())
            .collect::<Vec<_>>()
            .join(" + ");
        let (_, err) = self.scoped(|| {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("recfuse"),
                });
            let mut keep = Vec::new();
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("recfuse"),
                    timestamp_writes: None,
                });
                for (l, grid, p) in &prepared {
                    if grid.contains(&0) {
                        continue;
                    }
                    let mut words = l.uniform.clone();
                    // Uniform blocks are sized in 16-byte steps.
                    words.resize(l.uniform.len().div_ceil(4).max(1) * 4, 0);
                    let ubuf = self
                        .device
                        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                            label: Some("recfuse params"),
                            contents: bytemuck::cast_slice(&words),
                            usage: self.params_in.usage(),
                        });
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: ubuf.as_entire_binding(),
                    }];
                    for (i, b) in l.buffers.iter().enumerate() {
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource: b.as_entire_binding(),
                        });
                    }
                    let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(l.kernel.entry),
                        layout: &p.layout.group,
                        entries: &entries,
                    });
                    pass.set_pipeline(&p.pipeline);
                    pass.set_bind_group(0, &group, &[]);
                    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                    keep.push(ubuf);
                }
            }
            self.queue.submit([encoder.finish()]);
            keep
        });
        if let Some(reason) = err {
            return Err(Error::Launch {
                backend: BACKEND,
                kernel: names,
                reason,
            });
        }
        if self.sync_check {
            self.synchronize().map_err(|e| Error::Launch {
                backend: BACKEND,
                kernel: names,
                reason: format!("RECFUSE_SYNC_CHECK: {e}"),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{fold_grid, COMMON_WGSL};
    use crate::ops::gemm::erf_f64;

    /// The coefficients of `erf_f32` in common.wgsl, read from the shader source itself so this
    /// check cannot drift from what the GPU runs: (P in x², Q in |x|), highest degree first.
    fn erf_coefficients() -> (Vec<f32>, Vec<f32>) {
        let body = COMMON_WGSL
            .split("fn erf_f32")
            .nth(1)
            .and_then(|s| s.split("\nfn ").next())
            .expect("erf_f32 in common.wgsl");
        let (mut p, mut q) = (Vec::new(), Vec::new());
        for line in body.lines().map(str::trim) {
            let num = |prefix: &str| {
                line.strip_prefix(prefix)
                    .map(|rest| rest.trim_end_matches([')', ';']).parse::<f32>())
            };
            if let Some(v) = num("var r = ").or_else(|| num("r = fma(r, s, ")) {
                p.push(v.expect("P coefficient"));
            }
            // The last step, `q = fma(q, a, a)`, is the `a + a·Q(a)` the port adds itself.
            if line == "q = fma(q, a, a);" {
                continue;
            }
            if let Some(v) = num("var q = ").or_else(|| num("q = fma(q, a, ")) {
                q.push(v.expect("Q coefficient"));
            }
        }
        (p, q)
    }

    /// A line-for-line f32 port of the WGSL `erf_f32` (fma = mul_add).
    fn erf_wgsl_port(x: f32, p: &[f32], q: &[f32]) -> f32 {
        let a = x.abs();
        if a < 0.921875 {
            let s = x * x;
            let r = p[1..].iter().fold(p[0], |r, &c| r.mul_add(s, c));
            return r.mul_add(x, x);
        }
        if a >= 4.0 {
            return x.signum();
        }
        let t = q[1..].iter().fold(q[0], |r, &c| r.mul_add(a, c));
        let r = 1.0 - (-t.mul_add(a, a)).exp();
        if x < 0.0 {
            -r
        } else {
            r
        }
    }

    #[test]
    fn wgsl_erf_is_accurate_to_1e7() {
        let (p, q) = erf_coefficients();
        assert_eq!((p.len(), q.len()), (6, 7), "parsed {p:?} {q:?}");
        let mut worst = (0.0f64, 0.0f32);
        for i in 0..=400_000 {
            let x = -7.0 + 14.0 * i as f32 / 400_000.0;
            let e = (f64::from(erf_wgsl_port(x, &p, &q)) - erf_f64(f64::from(x))).abs();
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(
            worst.0 < 1e-7,
            "max |error| {:.3e} at x = {}",
            worst.0,
            worst.1
        );
    }

    #[test]
    fn folding_keeps_small_grids_and_covers_big_ones() {
        assert_eq!(fold_grid([3, 2, 5], 65535), Some([3, 2, 5]));
        assert_eq!(fold_grid([0, 2, 5], 65535), Some([0, 0, 0]));
        let g = fold_grid([100_000, 1, 1], 65535).expect("fits");
        assert_eq!(g, [65535, 2, 1]);
        let g = fold_grid([70_000, 60_000, 1], 65535).expect("fits");
        assert!(g.iter().all(|&d| d <= 65535));
        assert!(u64::from(g[0]) * u64::from(g[1]) * u64::from(g[2]) >= 70_000 * 60_000);
        assert_eq!(fold_grid([65535, 65535, 2], 65535), None);
        assert_eq!(fold_grid([1 << 40, 1 << 20, 1], 65535), None);
    }
}
