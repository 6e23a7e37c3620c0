//! One error type for the whole crate. Every variant names the operation and the argument (or
//! kernel) involved, so a trainer can tell what to fix without a debugger.

use crate::dtype::DType;

/// Result alias used throughout recfuse.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in recfuse. Nothing in the library panics on user input: bad
/// shapes, dtypes, devices and missing backends all come back as one of these.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor argument has the wrong shape.
    #[error("{op}: argument `{arg}` has shape {actual:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        expected: String,
        actual: Vec<usize>,
    },
    /// A tensor argument has the wrong dtype.
    #[error("{op}: argument `{arg}` has dtype {actual}, expected {expected}")]
    DType {
        op: &'static str,
        arg: &'static str,
        expected: String,
        actual: DType,
    },
    /// A tensor argument lives on another device than the operation runs on.
    #[error("{op}: argument `{arg}` is on {actual}, expected {expected}")]
    DeviceMismatch {
        op: &'static str,
        arg: &'static str,
        expected: String,
        actual: String,
    },
    /// A scalar or structural argument is out of range.
    #[error("{op}: argument `{arg}`: {reason}")]
    InvalidArgument {
        op: &'static str,
        arg: &'static str,
        reason: String,
    },
    /// The requested backend cannot be used on this machine (no driver, no adapter, ...).
    #[error("device unavailable: {backend}: {reason}")]
    DeviceUnavailable {
        backend: &'static str,
        reason: String,
    },
    /// The operation exists but not for this backend / dtype / mode. Never silently rerouted.
    #[error("{op} is not supported on {backend}: {what}")]
    Unsupported {
        op: &'static str,
        backend: &'static str,
        what: String,
    },
    /// A kernel failed to compile (NVRTC or WGSL validation).
    #[error("compiling kernel `{kernel}` for {target} failed: {log}")]
    Compile {
        kernel: String,
        target: String,
        log: String,
    },
    /// A launch was rejected before it reached the driver, or the driver reported an error.
    #[error("{backend}: kernel `{kernel}`: {reason}")]
    Launch {
        backend: &'static str,
        kernel: String,
        reason: String,
    },
    /// An allocation of `bytes` failed (or could not even be sized): nothing was allocated, the
    /// process keeps running.
    #[error("{op}: argument `{arg}`: cannot allocate {bytes} bytes on {device}")]
    OutOfMemory {
        op: &'static str,
        arg: &'static str,
        bytes: u128,
        device: String,
    },
    /// Any other driver / runtime failure (allocation, copy, synchronisation).
    #[error("{backend}: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },
    /// Reading or writing a file failed (a checkpoint's path that does not exist, a directory
    /// that cannot be written).
    #[error("{op}: argument `{arg}` ({path}): {source}")]
    Io {
        op: &'static str,
        arg: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint's bytes are not a valid safetensors file, or hold a tensor that cannot
    /// become a parameter (an integer dtype where a float is needed, a missing step count).
    #[error("{op}: argument `{arg}` is not a usable checkpoint: {reason}")]
    Malformed {
        op: &'static str,
        arg: &'static str,
        reason: String,
    },
    /// A checkpoint's tensor names or shapes do not match the parameters restored from it.
    /// Every difference is listed, as PyTorch's `load_state_dict` does: keys the parameters
    /// have and the checkpoint lacks, keys the checkpoint has (in the restored scope) and the
    /// parameters lack (both only in strict mode), and shape mismatches (always).
    #[error(
        "{op}: argument `{arg}` does not match the checkpoint: {}",
        crate::error::describe_mismatch(missing, unexpected, shapes)
    )]
    CheckpointMismatch {
        op: &'static str,
        arg: &'static str,
        missing: Vec<String>,
        unexpected: Vec<String>,
        shapes: Vec<ShapeMismatch>,
    },
}

/// One tensor whose shape differs between a checkpoint and the parameter restored from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The checkpoint key.
    pub name: String,
    /// The parameter's shape.
    pub expected: Vec<usize>,
    /// The checkpoint's shape.
    pub found: Vec<usize>,
}

pub(crate) fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    shapes: &[ShapeMismatch],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing keys {missing:?}"));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected keys {unexpected:?}"));
    }
    for s in shapes {
        parts.push(format!(
            "`{}` has shape {:?} in the checkpoint, {:?} in the parameters",
            s.name, s.found, s.expected
        ));
    }
    parts.join("; ")
}

impl Error {
    pub(crate) fn invalid(op: &'static str, arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            arg,
            reason: reason.into(),
        }
    }

    pub(crate) fn oom(op: &'static str, arg: &'static str, bytes: u128, device: &str) -> Self {
        Error::OutOfMemory {
            op,
            arg,
            bytes,
            device: device.to_string(),
        }
    }

    pub(crate) fn shape(
        op: &'static str,
        arg: &'static str,
        expected: impl Into<String>,
        actual: &[usize],
    ) -> Self {
        Error::Shape {
            op,
            arg,
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }
}
