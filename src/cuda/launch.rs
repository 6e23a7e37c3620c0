//! Checked kernel launches: every geometry is validated against the device's limits before the
//! driver sees it, every driver error names the kernel, and `RECFUSE_SYNC_CHECK=1` makes each
//! launch synchronous so an asynchronous fault is reported by the kernel that caused it.

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
};

use crate::error::{Error, Result};

/// Static shared memory a block may use without opting in (the CUDA-wide default).
const SMEM_DEFAULT_LIMIT: u32 = 48 * 1024;

/// The device limits launches are checked against.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub max_threads_per_block: u32,
    pub max_block: [u32; 3],
    pub max_grid: [u32; 3],
    /// Largest shared memory per block after opting in (`..._PER_BLOCK_OPTIN`).
    pub max_smem_optin: u32,
    pub sm_count: u32,
}

impl Limits {
    pub(crate) fn query(ctx: &CudaContext) -> std::result::Result<Limits, DriverError> {
        use CUdevice_attribute::*;
        let get = |a| ctx.attribute(a).map(|v| v.max(0) as u32);
        Ok(Limits {
            max_threads_per_block: get(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
            max_block: [
                get(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)?,
                get(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)?,
                get(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)?,
            ],
            max_grid: [
                get(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
                get(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
                get(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)?,
            ],
            max_smem_optin: get(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            sm_count: get(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        })
    }
}

/// One launch's geometry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub dyn_smem: u32,
}

pub(crate) fn launch_err(kernel: &str, reason: impl Into<String>) -> Error {
    Error::Launch {
        backend: "cuda",
        kernel: kernel.to_string(),
        reason: reason.into(),
    }
}

/// `ceil(n / tile)` as a grid dimension, or a launch error naming the kernel.
pub(crate) fn blocks_for(kernel: &str, axis: &str, n: usize, tile: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(tile)).map_err(|_| {
        launch_err(
            kernel,
            format!("{axis} = {n} needs more than 2^32 blocks of {tile}"),
        )
    })
}

/// Checks a launch against the device limits (a CUTLASS-style `can_implement`).
pub(crate) fn validate(
    kernel: &str,
    limits: &Limits,
    g: &Geometry,
    static_smem: u32,
) -> Result<()> {
    let grid = [g.grid.0, g.grid.1, g.grid.2];
    let block = [g.block.0, g.block.1, g.block.2];
    for (axis, (&n, &max)) in ["x", "y", "z"]
        .iter()
        .zip(grid.iter().zip(&limits.max_grid))
    {
        if n == 0 || n > max {
            return Err(launch_err(
                kernel,
                format!("grid.{axis} = {n} is outside 1..={max} (grid {:?})", g.grid),
            ));
        }
    }
    for (axis, (&n, &max)) in ["x", "y", "z"]
        .iter()
        .zip(block.iter().zip(&limits.max_block))
    {
        if n == 0 || n > max {
            return Err(launch_err(
                kernel,
                format!(
                    "block.{axis} = {n} is outside 1..={max} (block {:?})",
                    g.block
                ),
            ));
        }
    }
    let threads = block.iter().map(|&b| b as u64).product::<u64>();
    if threads > limits.max_threads_per_block as u64 {
        return Err(launch_err(
            kernel,
            format!(
                "{threads} threads per block exceed the device limit {}",
                limits.max_threads_per_block
            ),
        ));
    }
    let smem = static_smem as u64 + g.dyn_smem as u64;
    if smem > limits.max_smem_optin as u64 {
        return Err(launch_err(
            kernel,
            format!(
                "{smem} bytes of shared memory per block ({static_smem} static + {} dynamic) \
                 exceed the device limit {}",
                g.dyn_smem, limits.max_smem_optin
            ),
        ));
    }
    Ok(())
}

/// Launches `func` with one by-value parameter struct.
///
/// # Safety
/// `P` must match, field for field, the parameter struct the kernel is compiled with, and every
/// device address inside it must point to live memory large enough for every index the kernel
/// can form with those parameters.
pub(crate) unsafe fn launch<P: DeviceRepr>(
    kernel: &str,
    stream: &CudaStream,
    func: &CudaFunction,
    limits: &Limits,
    g: Geometry,
    params: &P,
    sync_check: bool,
) -> Result<()> {
    let static_smem = func
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .map_err(|e| {
            launch_err(
                kernel,
                format!("cuFuncGetAttribute(SHARED_SIZE_BYTES): {e}"),
            )
        })?
        .max(0) as u32;
    validate(kernel, limits, &g, static_smem)?;
    if static_smem + g.dyn_smem > SMEM_DEFAULT_LIMIT {
        // Above 48 KiB per block the kernel must opt in, per function, to the larger carve-out.
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            g.dyn_smem as i32,
        )
        .map_err(|e| {
            launch_err(
                kernel,
                format!(
                    "opting in to {} bytes of dynamic shared memory: {e}",
                    g.dyn_smem
                ),
            )
        })?;
    }
    let cfg = LaunchConfig {
        grid_dim: g.grid,
        block_dim: g.block,
        shared_mem_bytes: g.dyn_smem,
    };
    let mut builder = stream.launch_builder(func);
    builder.arg(params);
    // SAFETY: forwarded to the caller (parameter layout and device memory extents); the
    // geometry was validated against the device limits above.
    unsafe { builder.launch(cfg) }
        .map_err(|e| launch_err(kernel, format!("cuLaunchKernel {cfg:?}: {e}")))?;
    if sync_check {
        stream.synchronize().map_err(|e| {
            launch_err(
                kernel,
                format!(
                    "failed during execution (RECFUSE_SYNC_CHECK=1 synchronised after it): {e}"
                ),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h200_like() -> Limits {
        Limits {
            max_threads_per_block: 1024,
            max_block: [1024, 1024, 64],
            max_grid: [i32::MAX as u32, 65535, 65535],
            max_smem_optin: 227 * 1024,
            sm_count: 132,
        }
    }

    fn geo(grid: (u32, u32, u32), block: (u32, u32, u32), dyn_smem: u32) -> Geometry {
        Geometry {
            grid,
            block,
            dyn_smem,
        }
    }

    #[test]
    fn accepts_a_normal_launch() {
        let l = h200_like();
        assert!(validate("k", &l, &geo((10, 3, 2), (16, 16, 1), 0), 8704).is_ok());
    }

    #[test]
    fn rejects_bad_geometry_with_the_kernel_name() {
        let l = h200_like();
        for (g, smem, needle) in [
            (geo((1, 65536, 1), (256, 1, 1), 0), 0, "grid.y"),
            (geo((0, 1, 1), (256, 1, 1), 0), 0, "grid.x"),
            (geo((1, 1, 1), (2048, 1, 1), 0), 0, "block.x"),
            (geo((1, 1, 1), (64, 32, 1), 0), 0, "threads per block"),
            (
                geo((1, 1, 1), (256, 1, 1), 200 * 1024),
                40 * 1024,
                "shared memory",
            ),
        ] {
            match validate("my_kernel", &l, &g, smem) {
                Err(Error::Launch { kernel, reason, .. }) => {
                    assert_eq!(kernel, "my_kernel");
                    assert!(reason.contains(needle), "{reason}");
                }
                other => panic!("expected a launch error for {g:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn blocks_for_rejects_overflow() {
        assert_eq!(blocks_for("k", "m", 65, 64).ok(), Some(2));
        assert!(blocks_for("k", "m", usize::MAX, 1).is_err());
    }
}
