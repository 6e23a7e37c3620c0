//! The CUDA kernel sources, embedded at build time, and the NVRTC options every compile uses.
//!
//! NVRTC has no include path here (no toolkit headers ship with recfuse), so each `.cu` is
//! compiled as `common.cuh` + the file, with a `#line` directive so that NVRTC's error log
//! points at the right file and line.

/// Shared device helpers, prepended to every kernel file.
pub(crate) const COMMON: &str = include_str!("../../kernels/cuda/common.cuh");

/// Every kernel file: (name, text).
pub(crate) const FILES: &[(&str, &str)] = &[
    (
        "inbatch_softmax.cu",
        include_str!("../../kernels/cuda/inbatch_softmax.cu"),
    ),
    ("gemm.cu", include_str!("../../kernels/cuda/gemm.cu")),
    (
        "gemm_aux.cu",
        include_str!("../../kernels/cuda/gemm_aux.cu"),
    ),
    (
        "gated_cross.cu",
        include_str!("../../kernels/cuda/gated_cross.cu"),
    ),
    (
        "attention.cu",
        include_str!("../../kernels/cuda/attention.cu"),
    ),
    (
        "layernorm.cu",
        include_str!("../../kernels/cuda/layernorm.cu"),
    ),
    ("inplace.cu", include_str!("../../kernels/cuda/inplace.cu")),
    ("bce.cu", include_str!("../../kernels/cuda/bce.cu")),
    ("optim.cu", include_str!("../../kernels/cuda/optim.cu")),
    ("glue.cu", include_str!("../../kernels/cuda/glue.cu")),
    (
        "embedding.cu",
        include_str!("../../kernels/cuda/embedding.cu"),
    ),
];

/// A kernel file's complete compilation unit, or `None` for an unknown name.
pub(crate) fn source(file: &str) -> Option<String> {
    let (_, text) = FILES.iter().find(|(n, _)| *n == file)?;
    Some(format!(
        "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{file}\"\n{text}"
    ))
}

/// `-D` defines of one variant as a cache key (their order is fixed by the launchers).
pub(crate) fn defines_key(defines: &[(&'static str, u32)]) -> String {
    defines
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// NVRTC options for `arch` (`sm_90`): the real architecture, so NVRTC emits CUBIN and the
/// driver never JIT-compiles PTX; C++17 for `if constexpr`; line info for ncu and
/// compute-sanitizer (it does not change the generated code).
pub(crate) fn options(arch: &str, defines: &[String]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    o.extend(defines.iter().map(|d| format!("-D{d}")));
    o
}

pub(crate) fn define_strings(defines: &[(&'static str, u32)]) -> Vec<String> {
    defines.iter().map(|(k, v)| format!("{k}={v}")).collect()
}
