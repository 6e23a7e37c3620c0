//! Compiled-module caches: in memory per device, keyed by (kernel file, defines), and on disk
//! keyed by a hash of everything that determines the CUBIN (source, options, NVRTC version,
//! architecture), so a second process skips NVRTC entirely.
//!
//! The disk cache is best effort: any failure to read, write or load a cached CUBIN falls back
//! to compiling (and a corrupt entry is overwritten). `RECFUSE_CACHE_DIR` chooses the
//! directory (empty: disabled); the default is `$XDG_CACHE_HOME/recfuse/cubin` or
//! `~/.cache/recfuse/cubin`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::kernels;
use super::nvrtc::{self, Output};
use crate::error::{Error, Result};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64_extend(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a, 64-bit, over `parts` with a 0xff byte after each: a stable hash (unlike
/// `DefaultHasher`, whose output may change between Rust releases), good enough to key a cache
/// whose entries the driver validates again on load. The separator (never a byte of UTF-8
/// text) keeps ("ab", "c") and ("a", "bc") apart.
pub(crate) fn fnv1a64(parts: &[&[u8]]) -> u64 {
    parts.iter().fold(FNV_OFFSET, |h, p| {
        fnv1a64_extend(fnv1a64_extend(h, p), &[0xff])
    })
}

type ModuleKey = (&'static str, String);

#[derive(Default)]
pub(crate) struct ModuleCache {
    modules: Mutex<HashMap<ModuleKey, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(ModuleKey, &'static str), CudaFunction>>,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.modules.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "ModuleCache({n} modules)")
    }
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("RECFUSE_CACHE_DIR") {
        return if d.is_empty() {
            None
        } else {
            Some(PathBuf::from(d))
        };
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("recfuse/cubin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/recfuse/cubin"))
}

fn lock_err(what: &str) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!("{what} lock poisoned by a panic on another thread"),
    }
}

impl ModuleCache {
    /// The function `name` from `file` compiled with `defines` for this device, compiling and
    /// loading the module on first use.
    pub(crate) fn function(
        &self,
        ctx: &Arc<CudaContext>,
        arch: &str,
        file: &'static str,
        defines: &[(&'static str, u32)],
        name: &'static str,
    ) -> Result<CudaFunction> {
        let key: ModuleKey = (file, kernels::defines_key(defines));
        {
            let funcs = self
                .functions
                .lock()
                .map_err(|_| lock_err("function cache"))?;
            if let Some(f) = funcs.get(&(key.clone(), name)) {
                return Ok(f.clone());
            }
        }
        let module = self.module(ctx, arch, file, defines, &key)?;
        let func = module.load_function(name).map_err(|e| Error::Launch {
            backend: "cuda",
            kernel: name.to_string(),
            reason: format!("cuModuleGetFunction in {file} [{}]: {e}", key.1),
        })?;
        self.functions
            .lock()
            .map_err(|_| lock_err("function cache"))?
            .insert((key, name), func.clone());
        Ok(func)
    }

    fn module(
        &self,
        ctx: &Arc<CudaContext>,
        arch: &str,
        file: &'static str,
        defines: &[(&'static str, u32)],
        key: &ModuleKey,
    ) -> Result<Arc<CudaModule>> {
        // Held across compilation on purpose: two threads asking for the same module at once
        // would otherwise both run NVRTC for nothing.
        let mut modules = self.modules.lock().map_err(|_| lock_err("module cache"))?;
        if let Some(m) = modules.get(key) {
            return Ok(m.clone());
        }
        let dir = cache_dir();
        let load = |cubin: Vec<u8>| ctx.load_module(Ptx::from_binary(cubin));
        let compiled = cubin(file, defines, arch, dir.as_deref(), false)?;
        let m = match load(compiled.bytes) {
            Ok(m) => m,
            // A cached CUBIN the driver rejects (truncated, or written by another NVRTC under a
            // colliding key) is replaced by a fresh compile.
            Err(_) if compiled.from_cache => {
                let fresh = cubin(file, defines, arch, dir.as_deref(), true)?;
                load(fresh.bytes).map_err(|e| rejected(file, key, arch, &fresh.path, e))?
            }
            Err(e) => return Err(rejected(file, key, arch, &compiled.path, e)),
        };
        modules.insert(key.clone(), m.clone());
        Ok(m)
    }
}

fn rejected(
    file: &str,
    key: &ModuleKey,
    arch: &str,
    path: &Option<PathBuf>,
    e: cudarc::driver::DriverError,
) -> Error {
    let cached = path
        .as_ref()
        .map(|p| format!(" (cached at {})", p.display()))
        .unwrap_or_default();
    Error::Compile {
        kernel: format!("{file} [{}]", key.1),
        target: arch.to_string(),
        log: format!("the driver rejected the CUBIN NVRTC produced{cached}: {e}"),
    }
}

/// A CUBIN and where it came from.
pub(crate) struct Cubin {
    pub bytes: Vec<u8>,
    pub from_cache: bool,
    pub path: Option<PathBuf>,
}

/// The CUBIN of `file` with `defines` for `arch`: from the disk cache in `dir` when present
/// (unless `fresh`), else compiled by NVRTC and written to the cache. Needs no GPU.
pub(crate) fn cubin(
    file: &'static str,
    defines: &[(&'static str, u32)],
    arch: &str,
    dir: Option<&std::path::Path>,
    fresh: bool,
) -> Result<Cubin> {
    let src = kernels::source(file).ok_or_else(|| Error::Compile {
        kernel: file.to_string(),
        target: arch.to_string(),
        log: "no such kernel file is embedded".into(),
    })?;
    let options = kernels::options(arch, &kernels::define_strings(defines));
    let nv = nvrtc::nvrtc()?;
    let version = format!("nvrtc {}.{}", nv.version.0, nv.version.1);
    let mut parts: Vec<&[u8]> = vec![b"recfuse-cubin-v1", src.as_bytes()];
    parts.extend(options.iter().map(|o| o.as_bytes()));
    parts.push(version.as_bytes());
    parts.push(arch.as_bytes());
    let hash = fnv1a64(&parts);
    let stem = file.trim_end_matches(".cu");
    let path = dir.map(|d| d.join(format!("{stem}-{arch}-{hash:016x}.cubin")));

    if let (Some(p), false) = (&path, fresh) {
        if let Ok(bytes) = std::fs::read(p) {
            // An ELF header is the least a CUBIN has; the driver validates the rest on load.
            if bytes.starts_with(b"\x7fELF") {
                return Ok(Cubin {
                    bytes,
                    from_cache: true,
                    path,
                });
            }
        }
    }
    let bytes = nvrtc::compile(file, arch, &src, &options, Output::Cubin)?;
    if let Some(p) = &path {
        write_atomic(p, &bytes);
    }
    Ok(Cubin {
        bytes,
        from_cache: false,
        path,
    })
}

/// Writes via a unique temporary file and a rename, so a concurrent reader sees either no
/// file or a complete one. Errors are ignored: the cache is an optimisation.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else {
        return;
    };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.{}.{nanos}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let ok = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .is_ok();
    if !ok || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::{cubin, fnv1a64, fnv1a64_extend, FNV_OFFSET};

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64_extend(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64_extend(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64_extend(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a64(&[b"a"]), fnv1a64_extend(FNV_OFFSET, b"a\xff"));
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }

    /// Compiles a real variant to CUBIN through the disk cache (no GPU needed) and checks the
    /// second request is served from the cache with identical bytes.
    #[test]
    fn cubin_disk_cache_round_trip() {
        if let Err(e) = crate::cuda::nvrtc::nvrtc() {
            let require = std::env::var("RECFUSE_REQUIRE").unwrap_or_default();
            assert!(
                !require.contains("nvrtc"),
                "RECFUSE_REQUIRE has nvrtc, but: {e}"
            );
            eprintln!("SKIPPED: cubin_disk_cache_round_trip: NVRTC unavailable: {e}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("recfuse-cubin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = cubin("gemm_aux.cu", &[], "sm_90", Some(&dir), false).expect("compile");
        assert!(!first.from_cache);
        assert!(first.bytes.starts_with(b"\x7fELF"), "not an ELF CUBIN");
        let path = first.path.clone().expect("a cache path");
        assert!(path.is_file(), "cache file {} not written", path.display());
        let second = cubin("gemm_aux.cu", &[], "sm_90", Some(&dir), false).expect("cached");
        assert!(second.from_cache);
        assert_eq!(first.bytes, second.bytes);
        // A corrupt entry is not trusted: it is recompiled and overwritten.
        std::fs::write(&path, b"garbage").expect("write");
        let third = cubin("gemm_aux.cu", &[], "sm_90", Some(&dir), false).expect("recompile");
        assert!(!third.from_cache);
        assert_eq!(std::fs::read(&path).ok(), Some(first.bytes.clone()));
        // Different defines are a different entry.
        let other = cubin(
            "gemm.cu",
            &[("A_DT", 0), ("B_DT", 0), ("GEMM_MMA", 0)],
            "sm_90",
            Some(&dir),
            false,
        )
        .expect("compile gemm");
        assert_ne!(other.path, first.path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compile_errors_carry_the_nvrtc_log() {
        if crate::cuda::nvrtc::nvrtc().is_err() {
            eprintln!("SKIPPED: compile_errors_carry_the_nvrtc_log: NVRTC unavailable");
            return;
        }
        let err = crate::cuda::nvrtc::compile(
            "broken.cu",
            "sm_90",
            "extern \"C\" __global__ void k() { undeclared_thing(); }",
            &["--gpu-architecture=sm_90".to_string()],
            crate::cuda::nvrtc::Output::Cubin,
        )
        .expect_err("must not compile");
        match err {
            crate::Error::Compile {
                kernel,
                target,
                log,
            } => {
                assert_eq!(kernel, "broken.cu");
                assert_eq!(target, "sm_90");
                assert!(log.contains("undeclared_thing"), "{log}");
            }
            other => panic!("expected Error::Compile, got {other:?}"),
        }
    }
}
