//! Finding, preloading and calling NVRTC.
//!
//! cudarc opens libnvrtc by bare name (`libnvrtc.so`, `libnvrtc.so.13`, ...), so only the
//! loader's search path is consulted, and `LD_LIBRARY_PATH` cannot be changed from inside a
//! running process. We therefore dlopen `libnvrtc-builtins.so.13.*` and then `libnvrtc.so.13`
//! by absolute path with `RTLD_GLOBAL` first: the loader then resolves cudarc's later
//! `dlopen("libnvrtc.so.13")` (and NVRTC's own `dlopen` of its builtins) to the copies already
//! in the process by their SONAME. Search order: `RECFUSE_NVRTC_DIR`, `$CUDA_PATH/lib64`,
//! `/usr/local/cuda/lib64`, the loader's own paths, then Python's
//! `site-packages/nvidia/cu13/lib` (where the `nvidia-cuda-nvrtc` wheel, and PyTorch, put it).
//!
//! Compilation goes through cudarc's `nvrtc::sys` layer directly: its `result`/`safe` layers
//! panic on some failures (a log that cannot be fetched, an interior NUL), and do not expose
//! `nvrtcGetCUBIN`.

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;

use crate::error::{Error, Result};

/// The NVRTC major version the kernels and the cudarc bindings (`cuda-13000`) target.
const NVRTC_SONAME: &str = "libnvrtc.so.13";
const BUILTINS_PREFIX: &str = "libnvrtc-builtins.so.13";

/// What was loaded, kept for the process lifetime (the handles keep the libraries mapped).
pub(crate) struct Nvrtc {
    pub version: (i32, i32),
    /// Where libnvrtc came from, for `describe()` and error messages.
    pub origin: String,
    #[cfg(unix)]
    _libs: Vec<libloading::os::unix::Library>,
}

static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

/// Loads NVRTC once per process. Never panics: a missing library is `DeviceUnavailable`.
pub(crate) fn nvrtc() -> Result<&'static Nvrtc> {
    NVRTC
        .get_or_init(load)
        .as_ref()
        .map_err(|reason| Error::DeviceUnavailable {
            backend: "cuda",
            reason: reason.clone(),
        })
}

enum Candidate {
    Dir(PathBuf, &'static str),
    Loader,
}

fn candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    if let Some(d) = std::env::var_os("CUDA_PATH") {
        out.push(Candidate::Dir(
            PathBuf::from(d).join("lib64"),
            "$CUDA_PATH/lib64",
        ));
    }
    out.push(Candidate::Dir(
        PathBuf::from("/usr/local/cuda/lib64"),
        "/usr/local/cuda/lib64",
    ));
    out.push(Candidate::Loader);
    // Only directories that hold the library are listed, so a miss here adds nothing to the
    // "searched" message beyond this one line.
    for d in python_nvrtc_dirs() {
        out.push(Candidate::Dir(d, "python site-packages"));
    }
    out
}

/// `.../site-packages/nvidia/cu13/lib` under the usual Python prefixes, found by listing
/// directories (no interpreter is spawned).
fn python_nvrtc_dirs() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            prefixes.push(PathBuf::from(p).join("lib"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        prefixes.push(home.join(".local/lib"));
        if let Ok(rd) = std::fs::read_dir(home.join(".pyenv/versions")) {
            for e in rd.flatten() {
                prefixes.push(e.path().join("lib"));
            }
        }
    }
    prefixes.push(PathBuf::from("/usr/local/lib"));
    prefixes.push(PathBuf::from("/usr/lib"));
    prefixes.push(PathBuf::from("/opt/conda/lib"));

    let mut out = Vec::new();
    for prefix in prefixes {
        let Ok(rd) = std::fs::read_dir(&prefix) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pys.sort();
        for py in pys {
            for sp in ["site-packages", "dist-packages"] {
                let d = py.join(sp).join("nvidia/cu13/lib");
                if d.join(NVRTC_SONAME).is_file() {
                    out.push(d);
                }
            }
        }
    }
    out
}

#[cfg(unix)]
fn open_global(path: &Path) -> std::result::Result<libloading::os::unix::Library, String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading NVRTC runs its ELF initialisers, which only set up NVRTC's own state; we
    // never unload it (the handle lives in a process-wide static), so its finalisers cannot
    // run while cudarc still holds function pointers into it.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Preloads NVRTC from `dir`. `Ok(None)` when the directory has no libnvrtc.so.13.
#[cfg(unix)]
fn preload_dir(
    dir: &Path,
) -> std::result::Result<Option<Vec<libloading::os::unix::Library>>, String> {
    let nvrtc = dir.join(NVRTC_SONAME);
    if !nvrtc.is_file() {
        return Ok(None);
    }
    let mut libs = Vec::new();
    // The builtins library is what libnvrtc dlopens at compile time; load it first so that
    // dlopen is satisfied from memory. Prefer the plain name over NVIDIA's `.alt` variant.
    let mut builtins: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with(BUILTINS_PREFIX))
                .unwrap_or(false)
        })
        .collect();
    builtins.sort();
    if let Some(b) = builtins.first() {
        libs.push(open_global(b)?);
    }
    libs.push(open_global(&nvrtc)?);
    Ok(Some(libs))
}

#[cfg(unix)]
fn load() -> std::result::Result<Nvrtc, String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

    let mut tried = Vec::new();
    let mut found: Option<(Vec<Library>, String)> = None;

    // An explicit directory is a request, not a hint: failing to load from it is an error.
    if let Some(dir) = std::env::var_os("RECFUSE_NVRTC_DIR") {
        let dir = PathBuf::from(dir);
        match preload_dir(&dir)? {
            Some(libs) => found = Some((libs, format!("RECFUSE_NVRTC_DIR={}", dir.display()))),
            None => {
                return Err(format!(
                    "RECFUSE_NVRTC_DIR={} has no {NVRTC_SONAME}",
                    dir.display()
                ))
            }
        }
    }
    if found.is_none() {
        for c in candidates() {
            match c {
                Candidate::Dir(dir, why) => {
                    let shown = dir.display().to_string();
                    tried.push(if shown == why {
                        shown
                    } else {
                        format!("{shown} ({why})")
                    });
                    match preload_dir(&dir) {
                        Ok(Some(libs)) => {
                            found = Some((libs, format!("{} ({why})", dir.display())));
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => tried.push(format!("  failed: {e}")),
                    }
                }
                Candidate::Loader => {
                    tried.push("the dynamic loader's search path".into());
                    // SAFETY: as in `open_global`; the handle is kept for the process lifetime.
                    if let Ok(lib) =
                        unsafe { Library::open(Some(NVRTC_SONAME), RTLD_NOW | RTLD_GLOBAL) }
                    {
                        found = Some((vec![lib], "the dynamic loader's search path".into()));
                        break;
                    }
                }
            }
        }
    }
    let Some((libs, origin)) = found else {
        return Err(format!(
            "{NVRTC_SONAME} not found (set RECFUSE_NVRTC_DIR, or `pip install --no-deps \
             nvidia-cuda-nvrtc==13.0.88`); searched: {}, python site-packages/nvidia/cu13/lib",
            tried.join(", ")
        ));
    };
    finish(origin, libs)
}

#[cfg(not(unix))]
fn load() -> std::result::Result<Nvrtc, String> {
    finish("the system library search path".into())
}

fn finish(
    origin: String,
    #[cfg(unix)] libs: Vec<libloading::os::unix::Library>,
) -> std::result::Result<Nvrtc, String> {
    // SAFETY: only probes whether cudarc's library names can be dlopened; no NVRTC symbol is
    // called. It must run before any `sys::nvrtc*` call, which panics when the library is absent.
    if !unsafe { sys::is_culib_present() } {
        return Err(format!(
            "loaded NVRTC from {origin}, but cudarc could not open it by name"
        ));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is present (checked above); both out-pointers are valid locals.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    // cudarc opens the first of `libnvrtc.so`, ..., `libnvrtc.so.13` that the loader finds, so a
    // stray unversioned libnvrtc.so of another release would win over our preload; the bindings
    // are for 13.x, so refuse anything else instead of calling into it.
    if major != 13 {
        return Err(format!(
            "NVRTC {major}.{minor} was loaded (preloaded from {origin}), but recfuse needs 13.x"
        ));
    }
    Ok(Nvrtc {
        version: (major, minor),
        origin,
        #[cfg(unix)]
        _libs: libs,
    })
}

/// What to take out of a compiled program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Device code for the exact architecture, loaded without any driver JIT.
    Cubin,
    /// PTX text (for the offline `ptxas -v` check).
    Ptx,
}

/// Destroys an NVRTC program on every exit path.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from a successful nvrtcCreateProgram and is destroyed once.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn nv_err(what: &str, r: sys::nvrtcResult) -> String {
    format!("{what} failed: {r:?}")
}

/// Compiles `src` (already complete: common.cuh prepended) with `options`.
/// A compilation error is `Error::Compile` with NVRTC's log.
pub(crate) fn compile(
    kernel: &str,
    arch: &str,
    src: &str,
    options: &[String],
    output: Output,
) -> Result<Vec<u8>> {
    nvrtc()?;
    let compile_err = |log: String| Error::Compile {
        kernel: kernel.to_string(),
        target: arch.to_string(),
        log,
    };
    let c_src = CString::new(src).map_err(|_| compile_err("source contains a NUL byte".into()))?;
    let c_name =
        CString::new(kernel).map_err(|_| compile_err("kernel name contains a NUL byte".into()))?;
    let c_opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| compile_err("an option contains a NUL byte".into()))?;
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    let n_opts =
        c_int::try_from(opt_ptrs.len()).map_err(|_| compile_err("too many options".into()))?;

    let mut raw: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NVRTC is loaded (`nvrtc()` above); `c_src` and `c_name` are NUL-terminated and
    // outlive the program; zero headers means the two header arrays are never read.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            c_src.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(compile_err(nv_err("nvrtcCreateProgram", r)));
    }
    let prog = Program(raw);

    // SAFETY: `prog.0` is a live program; `opt_ptrs` holds `n_opts` NUL-terminated strings
    // owned by `c_opts`, which outlives the call.
    let r = unsafe { sys::nvrtcCompileProgram(prog.0, n_opts, opt_ptrs.as_ptr()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        let log = program_log(&prog).unwrap_or_else(|e| e);
        return Err(compile_err(format!("{r:?}\n{log}")));
    }

    type SizeFn = unsafe fn(sys::nvrtcProgram, *mut usize) -> sys::nvrtcResult;
    type GetFn = unsafe fn(sys::nvrtcProgram, *mut c_char) -> sys::nvrtcResult;
    let (size_fn, get_fn, what): (SizeFn, GetFn, &str) = match output {
        Output::Cubin => (sys::nvrtcGetCUBINSize, sys::nvrtcGetCUBIN, "nvrtcGetCUBIN"),
        Output::Ptx => (sys::nvrtcGetPTXSize, sys::nvrtcGetPTX, "nvrtcGetPTX"),
    };
    let mut size = 0usize;
    // SAFETY: `prog.0` was compiled successfully; `size` is a valid out-pointer.
    let r = unsafe { size_fn(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(compile_err(nv_err(what, r)));
    }
    if size == 0 {
        return Err(compile_err(format!(
            "{what} returned nothing (was the architecture `{arch}` a real sm_XY?)"
        )));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` has exactly the `size` bytes NVRTC reported for this program.
    let r = unsafe { get_fn(prog.0, buf.as_mut_ptr().cast()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(compile_err(nv_err(what, r)));
    }
    if output == Output::Ptx {
        // The PTX size includes its terminating NUL.
        while buf.last() == Some(&0) {
            buf.pop();
        }
    }
    Ok(buf)
}

fn program_log(prog: &Program) -> std::result::Result<String, String> {
    let mut size = 0usize;
    // SAFETY: `prog.0` is a live program; `size` is a valid out-pointer.
    let r = unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nv_err("nvrtcGetProgramLogSize", r));
    }
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: `buf` holds at least the `size` bytes NVRTC reported.
    let r = unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr().cast()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nv_err("nvrtcGetProgramLog", r));
    }
    while buf.last() == Some(&0) {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
