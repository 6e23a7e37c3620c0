//! `NcclComm`: the [`Communicator`] over NCCL (through cudarc), one rank per GPU, for multi-GPU
//! and multi-node training. Built with the `nccl` feature.
//!
//! Everything a user needs to know (loading, semantics, uneven sizes, mismatch detection,
//! failures and timeouts) is on [`NcclComm`].

use std::ffi::{c_char, c_void, CStr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, DevicePtr, DevicePtrMut, DeviceRepr, DriverError};
use cudarc::nccl::{sys, NcclType};

use super::Communicator;
use crate::cuda::{CudaDevice, CudaStorage};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Storage, Tensor};

const BACKEND: &str = "nccl";

/// Default deadline for a collective to complete once enqueued.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Every libnccl symbol this module calls. cudarc resolves each on first use and panics if it
/// is missing, so all of them are checked when the library is first loaded.
const SYMBOLS: [&str; 13] = [
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclCommInitRank",
    "ncclCommInitAll",
    "ncclCommFinalize",
    "ncclCommDestroy",
    "ncclCommAbort",
    "ncclCommGetAsyncError",
    "ncclAllGather",
    "ncclAllReduce",
    "ncclReduceScatter",
];

fn unavailable(reason: impl Into<String>) -> Error {
    Error::DeviceUnavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

fn backend_err(reason: String) -> Error {
    Error::Backend {
        backend: BACKEND,
        reason,
    }
}

fn cuda_err(what: &str, step: &str, e: DriverError) -> Error {
    backend_err(format!("{what}: {step}: CUDA error: {e}"))
}

// --- The library ------------------------------------------------------------------------------

struct Library {
    /// `NCCL 2.27.3 (libnccl.so)`.
    info: String,
    /// Keeps the checked copy mapped; cudarc's own handle refers to the same object.
    _lib: libloading::Library,
}

static LIBRARY: OnceLock<std::result::Result<Library, String>> = OnceLock::new();

/// Loads and checks libnccl once per process. Never panics: anything missing is
/// `DeviceUnavailable`.
fn library() -> Result<&'static Library> {
    LIBRARY
        .get_or_init(load_library)
        .as_ref()
        .map_err(|reason| unavailable(reason.clone()))
}

fn nccl_candidates() -> Vec<String> {
    cudarc::get_lib_name_candidates("nccl")
        .into_iter()
        .filter(|n| n.starts_with("libnccl.so"))
        .collect()
}

fn load_library() -> std::result::Result<Library, String> {
    // SAFETY: only tries to dlopen libnccl, then libcuda, under cudarc's candidate names and
    // closes them again; no function is called. cudarc panics on first use of a missing one.
    let (nccl, cuda) = unsafe {
        (
            sys::is_culib_present(),
            cudarc::driver::sys::is_culib_present(),
        )
    };
    let no_cuda = "libcuda not found: NCCL needs the NVIDIA driver";
    if !nccl {
        // SAFETY: loading runs libnccl's initialisers, as any process using NCCL does; the
        // handle is closed at once and nothing is called through it.
        let so2 = unsafe { libloading::Library::new("libnccl.so.2") }.is_ok();
        let names = nccl_candidates().join(", ");
        let mut reason = if so2 {
            format!(
                "libnccl.so.2 is installed, but cudarc 0.19 opens only {names}: put a \
                 `libnccl.so` symlink to it on the dynamic loader's path (Debian/Ubuntu: install \
                 libnccl-dev)"
            )
        } else {
            format!(
                "libnccl not found on the dynamic loader's path (looked for {names}, and \
                 libnccl.so.2)"
            )
        };
        if !cuda {
            reason.push_str(&format!("; {no_cuda}"));
        }
        return Err(reason);
    }
    if !cuda {
        return Err(no_cuda.into());
    }
    // cudarc's loader takes the first candidate that opens; the same list in the same order
    // finds the same file, whose symbols are then checked.
    let (name, lib) = cudarc::get_lib_name_candidates("nccl")
        .into_iter()
        .find_map(|name| {
            // SAFETY: as above; this is the library cudarc itself will load.
            unsafe { libloading::Library::new(name.as_str()) }
                .ok()
                .map(|lib| (name, lib))
        })
        .ok_or_else(|| "libnccl opened once, then not again".to_string())?;
    for symbol in SYMBOLS {
        // SAFETY: only looks the symbol's address up; nothing is called through it.
        if unsafe { lib.get::<*const c_void>(symbol) }.is_err() {
            return Err(format!(
                "{name} has no `{symbol}`: recfuse needs NCCL 2.14 or newer"
            ));
        }
    }
    let mut code = 0;
    // SAFETY: libnccl is loadable and exports `ncclGetVersion` (checked above), so cudarc's
    // lazy symbol lookup cannot panic; `code` is a valid out-pointer.
    let r = unsafe { sys::ncclGetVersion(&mut code) };
    if r != sys::ncclResult_t::ncclSuccess {
        return Err(format!("{name}: ncclGetVersion failed: {r:?}"));
    }
    let (major, minor, patch) = decode_version(code);
    Ok(Library {
        info: format!("NCCL {major}.{minor}.{patch} ({name})"),
        _lib: lib,
    })
}

/// `NCCL_VERSION_CODE`: major·10000 + minor·100 + patch since 2.9, major·1000 + minor·100 +
/// patch before.
fn decode_version(code: i32) -> (i32, i32, i32) {
    if code >= 10_000 {
        (code / 10_000, code % 10_000 / 100, code % 100)
    } else {
        (code / 1000, code % 1000 / 100, code % 100)
    }
}

/// A C string NCCL returned (static or thread-local storage), copied; `None` for null.
fn c_string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null pointers from ncclGetErrorString / ncclGetLastError point to
    // NUL-terminated strings that stay valid at least until the next NCCL call on this thread;
    // the text is copied before any.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// `ncclInvalidUsage (invalid usage): <NCCL's last error message>`. Only called with a result
/// returned by libnccl, so the library is loaded and checked.
fn describe_result(r: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    // SAFETY: the library and both symbols are present (see above); both functions accept any
    // result code and any communicator handle, including null.
    let (text, last) = unsafe {
        (
            c_string(sys::ncclGetErrorString(r)),
            c_string(sys::ncclGetLastError(comm)),
        )
    };
    let mut s = format!("{r:?}");
    if let Some(t) = text {
        s.push_str(&format!(" ({t})"));
    }
    if let Some(l) = last.filter(|l| !l.is_empty()) {
        s.push_str(&format!(": {l}"));
    }
    s
}

// --- The unique id ----------------------------------------------------------------------------

/// The rendezvous token of one NCCL communicator: rank 0 creates it with [`NcclId::new`] and
/// sends [`to_bytes`](NcclId::to_bytes) to every other rank through the trainer's own channel
/// (a file, a TCP store, MPI, ...); they rebuild it with [`from_bytes`](NcclId::from_bytes).
/// It holds rank 0's bootstrap address, not a secret, but anyone who has it can join.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NcclId::BYTES]);

impl NcclId {
    /// Size of the serialised id (`NCCL_UNIQUE_ID_BYTES`).
    pub const BYTES: usize = 128;

    /// A fresh id (`ncclGetUniqueId`); call on rank 0 only. Opens rank 0's bootstrap socket.
    pub fn new() -> Result<NcclId> {
        library()?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: libnccl is loaded with this symbol (checked by `library()`); `id` is a valid
        // out-pointer of the size NCCL writes.
        let r = unsafe { sys::ncclGetUniqueId(&mut id) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(backend_err(format!(
                "ncclGetUniqueId: {}",
                describe_result(r, std::ptr::null_mut())
            )));
        }
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; NcclId::BYTES] {
        self.0
    }

    /// Rebuilds an id from [`to_bytes`](NcclId::to_bytes)'s output. Needs no library.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId> {
        <[u8; NcclId::BYTES]>::try_from(bytes)
            .map(NcclId)
            .map_err(|_| {
                Error::invalid(
                    "NcclId::from_bytes",
                    "bytes",
                    format!("{} bytes, expected {}", bytes.len(), NcclId::BYTES),
                )
            })
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:016x})", fnv1a64(&self.0))
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// --- The communicator -------------------------------------------------------------------------

/// Collective kinds, as sent in the header.
#[derive(Clone, Copy)]
enum Op {
    AllGatherBytes = 1,
    AllReduceSum = 2,
    ReduceScatterSum = 3,
    AllGatherTensor = 4,
    AllReduceSumTensor = 5,
}

fn op_name(code: u64) -> String {
    match code {
        1 => "all_gather_bytes".into(),
        2 => "all_reduce_sum".into(),
        3 => "reduce_scatter_sum".into(),
        4 => "all_gather_tensor".into(),
        5 => "all_reduce_sum_tensor".into(),
        c => format!("unknown collective {c}"),
    }
}

/// `b"rfNCCL01"`: marks a recfuse header (and its layout version).
const MAGIC: u64 = u64::from_le_bytes(*b"rfNCCL01");
/// Header words: magic, op, collective index, signature length, signature hash, signature[0],
/// signature[1], payload size. The first seven must agree on every rank.
const HEADER_WORDS: usize = 8;
const COMPARED_WORDS: usize = 7;

type Header = [u64; HEADER_WORDS];

fn describe_header(h: &Header) -> String {
    if h[0] != MAGIC {
        return "something other than a recfuse collective (no recfuse header)".into();
    }
    let sig = match h[3] {
        0 => String::new(),
        1 => format!("[{}]", h[5]),
        2 => format!("[{}, {}]", h[5], h[6]),
        n => format!("[{}, {}, … ({n} values, hash {:016x})]", h[5], h[6], h[4]),
    };
    format!("{}{sig} as its collective #{}", op_name(h[1]), h[2])
}

fn make_header(op: Op, call: u64, signature: &[u64], payload: u64) -> Header {
    let sig_bytes: Vec<u8> = signature.iter().flat_map(|v| v.to_le_bytes()).collect();
    [
        MAGIC,
        op as u64,
        call,
        signature.len() as u64,
        fnv1a64(&sig_bytes),
        signature.first().copied().unwrap_or(0),
        signature.get(1).copied().unwrap_or(0),
        payload,
    ]
}

fn split_headers(words: &[u64]) -> Vec<Header> {
    words
        .chunks_exact(HEADER_WORDS)
        .map(|c| {
            let mut h = [0u64; HEADER_WORDS];
            h.copy_from_slice(c);
            h
        })
        .collect()
}

/// Every rank runs this on the same gathered headers, so a mismatch fails all of them with
/// the same message (but their own rank number).
fn check_headers(rank: usize, call: u64, headers: &[Header]) -> Result<()> {
    for (r, h) in headers.iter().enumerate() {
        if h[..COMPARED_WORDS] != headers[0][..COMPARED_WORDS] {
            return Err(backend_err(format!(
                "rank {rank}: collective #{call} mismatch: rank 0 called {}, rank {r} called {}",
                describe_header(&headers[0]),
                describe_header(h)
            )));
        }
    }
    Ok(())
}

/// Every rank's payload size, from the headers.
fn payload_sizes(what: &str, headers: &[Header]) -> Result<Vec<usize>> {
    headers
        .iter()
        .map(|h| {
            let n = h[HEADER_WORDS - 1];
            usize::try_from(n).map_err(|_| backend_err(format!("{what}: a rank sent {n} bytes")))
        })
        .collect()
}

/// `local` followed by zeros up to `max` bytes.
fn pad_to(local: &[u8], max: usize) -> Vec<u8> {
    let mut padded = vec![0u8; max];
    padded[..local.len()].copy_from_slice(local);
    padded
}

/// Block r of `all` (W blocks of `max` bytes), trimmed to `lens[r]`.
fn trim_blocks(all: &[u8], lens: &[usize], max: usize) -> Vec<Vec<u8>> {
    lens.iter()
        .enumerate()
        .map(|(r, &n)| all[r * max..r * max + n].to_vec())
        .collect()
}

/// `data` (blocks of `counts[r]` values, rank-major) with every block zero-padded to `max`.
fn pad_blocks(data: &[f32], counts: &[usize], max: usize) -> Vec<f32> {
    let mut padded = vec![0f32; max * counts.len()];
    let mut start = 0;
    for (r, &c) in counts.iter().enumerate() {
        padded[r * max..r * max + c].copy_from_slice(&data[start..start + c]);
        start += c;
    }
    padded
}

struct State {
    /// Null once aborted.
    comm: sys::ncclComm_t,
    /// Collectives entered so far; sent in each header so a skipped call is caught.
    calls: u64,
    /// Why the communicator was aborted, once it was.
    aborted: Option<String>,
    /// Recorded after each enqueue and polled, so a wait can time out.
    event: Option<CudaEvent>,
}

// SAFETY: an NCCL communicator handle may be used from any thread (NCCL's own single-process
// pattern creates all of them on one thread with ncclCommInitAll and drives each from its own
// thread); what NCCL forbids is concurrent calls on one communicator, and every use of the
// handle goes through `NcclComm::state`'s mutex.
unsafe impl Send for State {}

/// One rank of an NCCL communicator, bound to one CUDA device. Implements [`Communicator`]
/// (host slices) and offers device-tensor collectives
/// ([`all_gather_tensor`](NcclComm::all_gather_tensor),
/// [`all_reduce_sum_tensor`](NcclComm::all_reduce_sum_tensor)).
///
/// # Loading
/// cudarc opens libnccl at run time (nothing is linked at build time) and panics if it is
/// missing, so every entry point first checks, once per process, that libcuda and libnccl load
/// and that libnccl has every symbol used here; otherwise it returns
/// `Error::DeviceUnavailable { backend: "nccl", .. }`. cudarc 0.19 looks for `libnccl.so` and
/// `libnccl.so.{13,12,11,10,9,1}` only, not NCCL's own soname `libnccl.so.2`: a system with only
/// the runtime package (Debian/Ubuntu `libnccl2`, pip's `nvidia-nccl-cu12`) needs a `libnccl.so`
/// symlink on the loader's path (Debian/Ubuntu: `libnccl-dev` installs it). The error names
/// this case when it detects it.
///
/// # Semantics
/// The same as [`LocalComm`](super::LocalComm), on host slices: each call copies its input to
/// device buffers on the device's stream (the one stream every recfuse op on that device is
/// ordered on), runs the collective there, waits for it and copies the result back.
///
/// - **Mismatch detection.** Before every collective each rank all-gathers a 64-byte header
///   (collective kind, this rank's collective index, the size signature every rank must agree
///   on, and its payload size) and compares them. A rank that called another collective, or the
///   same one with other sizes, makes every rank return the same `Error::Backend` instead of
///   entering a mismatched NCCL call (which would hang or corrupt memory). The communicator
///   stays usable afterwards, as `LocalComm` does. The cost is one extra small all-gather (and
///   host round trip) per collective.
/// - **Uneven sizes.** `all_gather_bytes`: the header already carries every rank's byte count
///   (as `u64`), so each rank pads its payload to the largest count, one `ncclAllGather` moves
///   `W × max` bytes and each block is trimmed back to its rank's count. `reduce_scatter_sum`
///   with uneven `counts`: the blocks are laid out padded to the largest count (zeros in the
///   padding), one `ncclReduceScatter` of `max` elements per rank runs, and the result is
///   trimmed to this rank's count. Both cost `W × max` instead of `Σ` elements of traffic.
/// - **Sums** are NCCL's (ring or tree order), identical on every rank but not in rank order,
///   so they may differ from `LocalComm`'s by float reassociation.
///
/// # Failures, hangs and timeouts
/// Every NCCL error is `Error::Backend { backend: "nccl", .. }` naming the collective, the
/// `ncclResult_t` and NCCL's last error message; after an NCCL or CUDA error the communicator
/// is aborted (`ncclCommAbort`) and every later call on it fails at once: make a new one.
///
/// A collective waits until every rank has joined, so a rank that died or never calls it can
/// make the others wait. While waiting for a collective to finish on the GPU, each rank polls
/// `ncclCommGetAsyncError` (errors NCCL detects itself, e.g. a broken network connection) and
/// a deadline ([`NcclComm::set_timeout`], 10 minutes by default, `None` to wait forever); on
/// either it aborts its communicator, which stops its NCCL kernels, and returns an error.
/// What this does **not** cover: `NcclComm::new` / `local_group` (NCCL's bootstrap waits for
/// every rank, with its own socket timeouts), and the host-side enqueue of a collective, which
/// NCCL may block in while it connects to its peers on first use. A rank that never joins a
/// communicator, or that dies before the first collective completes, can therefore still block
/// the others there; run ranks under a supervisor that kills the job in that case. There is no
/// `NCCL_TIMEOUT` variable in NCCL itself; `NCCL_IB_TIMEOUT` / `NCCL_IB_RETRY_CNT` only govern
/// how fast InfiniBand failures surface as asynchronous errors.
///
/// Dropping an `NcclComm` aborts it (`ncclCommAbort`: never blocks, but network sends still in
/// flight are dropped and peers still in a collective with it fail at their deadline or when
/// NCCL notices the broken connection). For a clean shutdown call [`NcclComm::finalize`].
///
/// # Examples
/// One process driving every local GPU, one thread per rank (this runs anywhere: without NCCL
/// or a GPU it prints why and does nothing):
///
/// ```
/// use recfuse::dist::{Communicator, NcclComm};
/// use recfuse::{Device, Error};
///
/// let gpus: Vec<Device> = (0..16).map_while(|i| Device::cuda(i).ok()).collect();
/// match NcclComm::local_group(&gpus) {
///     Ok(comms) => std::thread::scope(|s| {
///         for c in &comms {
///             s.spawn(move || {
///                 let mut v = [c.rank() as f32, 1.0];
///                 c.all_reduce_sum(&mut v).unwrap();
///                 assert_eq!(v[1], c.world_size() as f32);
///                 let all = c.all_gather_bytes(&vec![7u8; c.rank() + 1]).unwrap();
///                 assert_eq!(all[0], vec![7u8]);
///             });
///         }
///     }),
///     Err(Error::DeviceUnavailable { reason, .. }) => println!("no NCCL here: {reason}"),
///     Err(Error::InvalidArgument { .. }) if gpus.is_empty() => println!("no GPU here"),
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), recfuse::Error>(())
/// ```
///
/// One process per GPU (possibly on several nodes): rank 0 makes the id and the trainer
/// broadcasts its bytes.
///
/// ```no_run
/// use recfuse::dist::{Communicator, NcclComm, NcclId};
/// use recfuse::Device;
/// # fn broadcast_from_rank0(_: &[u8]) -> Vec<u8> { unimplemented!() }
/// let (rank, world, local_gpu) = (0usize, 8usize, 0usize); // from the launcher
/// let id_bytes = if rank == 0 { NcclId::new()?.to_bytes().to_vec() } else { Vec::new() };
/// let id = NcclId::from_bytes(&broadcast_from_rank0(&id_bytes))?;
/// let comm = NcclComm::new(&Device::cuda(local_gpu)?, rank, world, id)?; // waits for all ranks
/// let mut loss_terms = [1.5f32, 4.0];
/// comm.all_reduce_sum(&mut loss_terms)?;
/// # Ok::<(), recfuse::Error>(())
/// ```
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: Arc<CudaDevice>,
    timeout: Option<Duration>,
    state: Mutex<State>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {} on {})",
            self.rank,
            self.world,
            self.device.describe()
        )
    }
}

fn cuda_device(op: &'static str, device: &Device) -> Result<Arc<CudaDevice>> {
    match device {
        Device::Cuda(d) => Ok(d.clone()),
        #[allow(unreachable_patterns)]
        other => Err(Error::DeviceMismatch {
            op,
            arg: "device",
            expected: "a CUDA device".into(),
            actual: other.describe(),
        }),
    }
}

impl NcclComm {
    /// The NCCL library in use, e.g. `NCCL 2.27.3 (libnccl.so)`, or `DeviceUnavailable` with
    /// the reason it cannot be used.
    pub fn library_info() -> Result<String> {
        library().map(|l| l.info.clone())
    }

    /// Joins communicator `id` as `rank` of `world` on `device` (`ncclCommInitRank`). Blocks
    /// until all `world` ranks have called it, so call it on every rank concurrently (one
    /// process or thread each). Each rank needs its own GPU.
    pub fn new(device: &Device, rank: usize, world: usize, id: NcclId) -> Result<NcclComm> {
        library()?;
        let dev = cuda_device("NcclComm::new", device)?;
        if world == 0 || world > i32::MAX as usize {
            return Err(Error::invalid(
                "NcclComm::new",
                "world",
                format!("{world} is not in 1..=2^31-1"),
            ));
        }
        if rank >= world {
            return Err(Error::invalid(
                "NcclComm::new",
                "rank",
                format!("{rank} is not below world = {world}"),
            ));
        }
        let what = format!(
            "ncclCommInitRank (rank {rank} of {world} on {})",
            dev.describe()
        );
        // NCCL attaches the communicator to the calling thread's current device.
        dev.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err(&what, "making the device current", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: libnccl is loaded with this symbol (checked by `library()`); `comm` is a
        // valid out-pointer; `world` and `rank` fit in i32 (checked above). On failure the
        // handle is not used (NCCL frees or nulls what it allocated).
        let r = unsafe { sys::ncclCommInitRank(&mut comm, world as i32, id.raw(), rank as i32) };
        if r != sys::ncclResult_t::ncclSuccess || comm.is_null() {
            return Err(backend_err(format!(
                "{what}: {}",
                describe_result(r, std::ptr::null_mut())
            )));
        }
        Ok(Self::wrap(dev, comm, rank, world))
    }

    /// One communicator per device, all in this process (`ncclCommInitAll`): rank `i` is
    /// `devices[i]`. Hand each to its own thread. The devices must be distinct CUDA devices.
    pub fn local_group(devices: &[Device]) -> Result<Vec<NcclComm>> {
        library()?;
        let devs = devices
            .iter()
            .map(|d| cuda_device("NcclComm::local_group", d))
            .collect::<Result<Vec<_>>>()?;
        if devs.is_empty() || devs.len() > i32::MAX as usize {
            return Err(Error::invalid(
                "NcclComm::local_group",
                "devices",
                format!("{} devices; need at least one", devs.len()),
            ));
        }
        let ordinals: Vec<i32> = devs.iter().map(|d| d.ordinal() as i32).collect();
        for (i, o) in ordinals.iter().enumerate() {
            if ordinals[..i].contains(o) {
                return Err(Error::invalid(
                    "NcclComm::local_group",
                    "devices",
                    format!("cuda:{o} appears twice; NCCL needs one GPU per rank"),
                ));
            }
        }
        let n = devs.len();
        let what = format!("ncclCommInitAll (devices {ordinals:?})");
        devs[0]
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err(&what, "making a device current", e))?;
        let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); n];
        // SAFETY: libnccl is loaded with this symbol; `comms` has room for `n` handles and
        // `ordinals` holds `n` distinct valid ordinals (each opened as a `CudaDevice`).
        let r = unsafe { sys::ncclCommInitAll(comms.as_mut_ptr(), n as i32, ordinals.as_ptr()) };
        if r != sys::ncclResult_t::ncclSuccess || comms.iter().any(|c| c.is_null()) {
            return Err(backend_err(format!(
                "{what}: {}",
                describe_result(r, std::ptr::null_mut())
            )));
        }
        Ok(devs
            .into_iter()
            .zip(comms)
            .enumerate()
            .map(|(rank, (dev, comm))| Self::wrap(dev, comm, rank, n))
            .collect())
    }

    fn wrap(device: Arc<CudaDevice>, comm: sys::ncclComm_t, rank: usize, world: usize) -> Self {
        NcclComm {
            rank,
            world,
            device,
            timeout: Some(DEFAULT_TIMEOUT),
            state: Mutex::new(State {
                comm,
                calls: 0,
                aborted: None,
                event: None,
            }),
        }
    }

    /// The device this rank runs on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    /// How long a collective may take on the GPU before this rank aborts the communicator and
    /// returns an error (`None`: wait forever). Default 10 minutes. Covers only the wait for
    /// completion, not communicator creation or NCCL's first-use connection setup (see [`NcclComm`]).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The collective deadline in force.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Shuts the communicator down cleanly: `ncclCommFinalize` (completes this rank's
    /// outstanding NCCL work, including network sends still in flight; blocks until then), then
    /// `ncclCommDestroy`. Call it on every rank once the last collective has returned; dropping
    /// instead aborts. Fails (and aborts) if the communicator was already aborted or NCCL
    /// reports an error.
    pub fn finalize(self) -> Result<()> {
        let what = "ncclCommFinalize";
        let mut st = self.begin(what)?;
        let comm = self.live(&st)?;
        // SAFETY: `comm` is live; finalize is called once (the object is consumed, and `Drop`
        // sees a live handle only if finalize failed, which it then aborts).
        let r = unsafe { sys::ncclCommFinalize(comm) };
        self.check(&mut st, what, r)?;
        st.comm = std::ptr::null_mut();
        // SAFETY: `comm` was finalised above and is never used again (`st.comm` is null, so
        // `Drop` does nothing).
        let r = unsafe { sys::ncclCommDestroy(comm) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(backend_err(format!(
                "rank {}: ncclCommDestroy: {}",
                self.rank,
                describe_result(r, std::ptr::null_mut())
            )));
        }
        Ok(())
    }

    /// Locks the communicator for one collective, checks that it is still usable and makes the
    /// device current on this thread.
    fn begin(&self, what: &str) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.live(&st)?;
        self.device
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err(what, "making the device current", e))?;
        Ok(st)
    }

    fn live(&self, st: &State) -> Result<sys::ncclComm_t> {
        match &st.aborted {
            Some(why) => Err(backend_err(format!(
                "rank {}: the communicator was aborted after an earlier failure ({why}); \
                 create a new one",
                self.rank
            ))),
            None => Ok(st.comm),
        }
    }

    /// Aborts the communicator (its pending NCCL work is cancelled) and remembers why.
    fn abort(&self, st: &mut State, why: &str) {
        if !st.comm.is_null() {
            // SAFETY: `st.comm` is a live communicator created by this object, never used again
            // (nulled below); abort cancels this rank's outstanding NCCL operations.
            let _ = unsafe { sys::ncclCommAbort(st.comm) };
            st.comm = std::ptr::null_mut();
        }
        st.aborted.get_or_insert_with(|| why.to_string());
    }

    /// Turns an NCCL enqueue result into an error (aborting the communicator: the peers that
    /// did enqueue would otherwise wait for this rank).
    fn check(&self, st: &mut State, what: &str, r: sys::ncclResult_t) -> Result<()> {
        if r == sys::ncclResult_t::ncclSuccess {
            return Ok(());
        }
        let msg = format!(
            "rank {}: {what}: {}",
            self.rank,
            describe_result(r, st.comm)
        );
        Err(self.fail(st, msg))
    }

    /// Aborts and returns the error for `msg`.
    fn fail(&self, st: &mut State, msg: String) -> Error {
        self.abort(st, &msg);
        backend_err(format!("{msg}; the communicator was aborted"))
    }

    /// Waits for everything enqueued on the stream, polling NCCL's asynchronous error state
    /// and the deadline.
    fn wait(&self, st: &mut State, what: &str) -> Result<()> {
        let stream = &self.device.stream;
        let event = match st.event.take() {
            Some(e) => e,
            None => match stream.context().new_event(None) {
                Ok(e) => e,
                Err(e) => {
                    let msg = format!("rank {}: {what}: creating an event: {e}", self.rank);
                    return Err(self.fail(st, msg));
                }
            },
        };
        let result = self.poll(st, what, &event);
        st.event = Some(event);
        result
    }

    fn poll(&self, st: &mut State, what: &str, event: &CudaEvent) -> Result<()> {
        if let Err(e) = event.record(&self.device.stream) {
            return Err(self.fail(
                st,
                format!("rank {}: {what}: recording an event: {e}", self.rank),
            ));
        }
        let start = Instant::now();
        let mut rounds = 0u32;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    return Err(self.fail(
                        st,
                        format!("rank {}: {what}: CUDA error while waiting: {e}", self.rank),
                    ))
                }
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `st.comm` is live (checked in `begin`, and every abort path returns);
            // `async_err` is a valid out-pointer.
            let r = unsafe { sys::ncclCommGetAsyncError(st.comm, &mut async_err) };
            let bad = if r != sys::ncclResult_t::ncclSuccess {
                Some(r)
            } else if async_err != sys::ncclResult_t::ncclSuccess
                && async_err != sys::ncclResult_t::ncclInProgress
            {
                Some(async_err)
            } else {
                None
            };
            if let Some(code) = bad {
                let msg = format!(
                    "rank {}: {what}: NCCL reported an asynchronous error: {}",
                    self.rank,
                    describe_result(code, st.comm)
                );
                return Err(self.fail(st, msg));
            }
            if let Some(limit) = self.timeout {
                if start.elapsed() >= limit {
                    let msg = format!(
                        "rank {}: {what} did not complete within {limit:?} (a rank may have \
                         died or not joined this collective)",
                        self.rank
                    );
                    return Err(self.fail(st, msg));
                }
            }
            // Spin briefly (small collectives finish in microseconds), then back off to 1 ms.
            rounds = rounds.saturating_add(1);
            if rounds < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(
                    (u64::from(rounds - 64) * 10).clamp(10, 1000),
                ));
            }
        }
    }

    /// `ncclAllGather` of host data: returns `W × send.len()` elements, rank-major.
    fn all_gather_raw<T: NcclType + DeviceRepr>(
        &self,
        st: &mut State,
        what: &str,
        send: &[T],
    ) -> Result<Vec<T>> {
        let comm = self.live(st)?;
        let stream = &self.device.stream;
        let n = send.len();
        let total = n.checked_mul(self.world).ok_or_else(|| {
            Error::invalid(
                "NcclComm",
                "data",
                format!("{n} × {} overflows", self.world),
            )
        })?;
        let sendbuf = stream
            .clone_htod(send)
            .map_err(|e| cuda_err(what, "copying to the device", e))?;
        // SAFETY: uninitialised; the all-gather writes all W·n elements before anything reads
        // them, and nothing does if it fails.
        let mut recvbuf = unsafe { stream.alloc::<T>(total) }
            .map_err(|e| cuda_err(what, "allocating the receive buffer", e))?;
        {
            let (src, _src_guard) = sendbuf.device_ptr(stream);
            let (dst, _dst_guard) = recvbuf.device_ptr_mut(stream);
            // SAFETY: `comm` is live and belongs to this device; `src` holds n and `dst` W·n
            // elements of T, both allocated on `stream`, the stream NCCL enqueues on; both
            // buffers outlive the `wait` below, which returns only once the collective is done
            // (or the communicator has been aborted, cancelling it).
            let r = unsafe {
                sys::ncclAllGather(
                    src as *const c_void,
                    dst as *mut c_void,
                    n,
                    T::as_nccl_type(),
                    comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            };
            self.check(st, what, r)?;
        }
        self.wait(st, what)?;
        stream
            .clone_dtoh(&recvbuf)
            .map_err(|e| cuda_err(what, "copying to the host", e))
    }

    /// All-gathers this rank's header and checks that every rank called the same collective
    /// with the same signature as the same collective index. Returns every rank's header.
    fn exchange(
        &self,
        st: &mut State,
        op: Op,
        signature: &[u64],
        payload: u64,
    ) -> Result<Vec<Header>> {
        st.calls += 1;
        let mine = make_header(op, st.calls, signature, payload);
        let what = format!("ncclAllGather ({} header)", op_name(op as u64));
        let words = self.all_gather_raw(st, &what, &mine)?;
        let headers = split_headers(&words);
        check_headers(self.rank, st.calls, &headers)?;
        Ok(headers)
    }

    /// Gathers a CUDA tensor on this rank's device from every rank without a host copy of the
    /// data: the result has shape `[W, ...t.shape()]` (rank-major; `reshape` to concatenate).
    /// Every rank passes the same shape and dtype. Waits for the collective like the host
    /// variants (so errors and the deadline apply), but moves no data through the host.
    pub fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "NcclComm::all_gather_tensor";
        let what = "ncclAllGather (all_gather_tensor)";
        let src = self.cuda_storage(OP, t)?;
        let mut out_shape = vec![self.world];
        out_shape.extend_from_slice(t.shape());
        let nbytes = t.size_in_bytes();
        let mut st = self.begin(what)?;
        self.exchange(
            &mut st,
            Op::AllGatherTensor,
            &tensor_signature(t),
            nbytes as u64,
        )?;
        if nbytes == 0 {
            drop(st);
            return Tensor::zeros(&out_shape, t.dtype(), &self.device());
        }
        let comm = self.live(&st)?;
        let stream = &self.device.stream;
        let total = nbytes * self.world;
        // SAFETY: uninitialised; the all-gather writes all W·nbytes bytes before the tensor is
        // returned, and it is dropped unread if the collective fails.
        let mut buf = unsafe { stream.alloc::<u8>(total) }
            .map_err(|e| cuda_err(what, "allocating the output", e))?;
        {
            let (s, _sg) = src.buf.device_ptr(stream);
            let (d, _dg) = buf.device_ptr_mut(stream);
            // SAFETY: `comm` is live on this device; `s` holds at least `nbytes` bytes (the
            // tensor's storage) and `d` W·nbytes; both are on `stream` and stay alive through
            // the `wait` below.
            let r = unsafe {
                sys::ncclAllGather(
                    s as *const c_void,
                    d as *mut c_void,
                    nbytes,
                    sys::ncclDataType_t::ncclUint8,
                    comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            };
            self.check(&mut st, what, r)?;
        }
        self.wait(&mut st, what)?;
        Ok(Tensor::from_parts(
            out_shape,
            t.dtype(),
            Storage::Cuda(CudaStorage::owned(self.device.clone(), buf, total)),
        ))
    }

    /// Element-wise sum over ranks of an f32 CUDA tensor, in place on the device (no host
    /// copy). Every rank passes the same shape.
    pub fn all_reduce_sum_tensor(&self, t: &mut Tensor) -> Result<()> {
        const OP: &str = "NcclComm::all_reduce_sum_tensor";
        let what = "ncclAllReduce (all_reduce_sum_tensor)";
        if t.dtype() != DType::F32 {
            return Err(Error::DType {
                op: OP,
                arg: "t",
                expected: "f32 (sums are reduced in f32)".into(),
                actual: t.dtype(),
            });
        }
        self.cuda_storage(OP, t)?;
        let sig = tensor_signature(t);
        let n = t.numel();
        let mut st = self.begin(what)?;
        self.exchange(&mut st, Op::AllReduceSumTensor, &sig, n as u64)?;
        if n == 0 {
            return Ok(());
        }
        let comm = self.live(&st)?;
        let stream = &self.device.stream;
        let Storage::Cuda(s) = &mut t.storage else {
            return Err(backend_err(format!("{what}: storage changed")));
        };
        {
            let (p, _g) = s.buf.device_ptr_mut(stream);
            // SAFETY: `comm` is live on this device; `p` holds the tensor's n f32 values (4n
            // bytes) on `stream`; NCCL allows the in-place form (same send and receive
            // pointer); the tensor is borrowed mutably until the `wait` below.
            let r = unsafe {
                sys::ncclAllReduce(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            };
            self.check(&mut st, what, r)?;
        }
        self.wait(&mut st, what)
    }

    fn cuda_storage<'t>(&self, op: &'static str, t: &'t Tensor) -> Result<&'t CudaStorage> {
        match &t.storage {
            Storage::Cuda(s) if Arc::ptr_eq(&s.device, &self.device) => Ok(s),
            _ => Err(Error::DeviceMismatch {
                op,
                arg: "t",
                expected: format!("{} (this communicator's device)", self.device.describe()),
                actual: t.device().describe(),
            }),
        }
    }
}

/// dtype and shape, which every rank must agree on.
fn tensor_signature(t: &Tensor) -> Vec<u64> {
    let dtype = match t.dtype() {
        DType::F32 => 1,
        DType::BF16 => 2,
        DType::F16 => 3,
    };
    std::iter::once(dtype)
        .chain(t.shape().iter().map(|&d| d as u64))
        .collect()
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if !st.comm.is_null() {
            let _ = self.device.stream.context().bind_to_thread();
            // SAFETY: the handle is live and never used again; abort frees this rank's
            // resources without waiting for the peers (ncclCommDestroy could block on them).
            let _ = unsafe { sys::ncclCommAbort(st.comm) };
            st.comm = std::ptr::null_mut();
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// Every rank's bytes, in rank order; sizes may differ. The header exchange carries each
    /// rank's byte count, each payload is padded to the largest, one `ncclAllGather` moves
    /// `W × max` bytes, and each block is trimmed back to its rank's count.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let what = "ncclAllGather (all_gather_bytes)";
        let mut st = self.begin(what)?;
        let headers = self.exchange(&mut st, Op::AllGatherBytes, &[], local.len() as u64)?;
        let lens = payload_sizes(what, &headers)?;
        let max = lens.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let all = self.all_gather_raw(&mut st, what, &pad_to(local, max))?;
        Ok(trim_blocks(&all, &lens, max))
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let what = "ncclAllReduce (all_reduce_sum)";
        let mut st = self.begin(what)?;
        let n = data.len();
        self.exchange(&mut st, Op::AllReduceSum, &[n as u64], n as u64)?;
        if n == 0 {
            return Ok(());
        }
        let comm = self.live(&st)?;
        let stream = &self.device.stream;
        let mut buf = stream
            .clone_htod(&*data)
            .map_err(|e| cuda_err(what, "copying to the device", e))?;
        {
            let (p, _g) = buf.device_ptr_mut(stream);
            // SAFETY: `comm` is live on this device; `p` holds n f32 on `stream`; in place
            // (same send and receive pointer) is allowed; `buf` outlives the `wait` below.
            let r = unsafe {
                sys::ncclAllReduce(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            };
            self.check(&mut st, what, r)?;
        }
        self.wait(&mut st, what)?;
        stream
            .memcpy_dtoh(&buf, data)
            .map_err(|e| cuda_err(what, "copying to the host", e))
    }

    /// As [`Communicator::reduce_scatter_sum`]; uneven `counts` are padded to the largest
    /// count per block for the one `ncclReduceScatter`, and the result trimmed.
    fn reduce_scatter_sum(&self, data: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let what = "ncclReduceScatter (reduce_scatter_sum)";
        let mut st = self.begin(what)?;
        let mut sig: Vec<u64> = counts.iter().map(|&c| c as u64).collect();
        sig.push(data.len() as u64);
        // The signature goes first, so a rank with other counts fails every rank (the
        // validation below then gives the same answer everywhere).
        self.exchange(&mut st, Op::ReduceScatterSum, &sig, data.len() as u64)?;
        let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
        if counts.len() != self.world || total != Some(data.len()) {
            return Err(Error::invalid(
                "reduce_scatter_sum",
                "counts",
                format!(
                    "{} counts summing to {} for {} values and {} ranks",
                    counts.len(),
                    total.map_or("more than usize::MAX".into(), |t| t.to_string()),
                    data.len(),
                    self.world
                ),
            ));
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return Ok(Vec::new());
        }
        if max.checked_mul(self.world).is_none() {
            return Err(Error::invalid(
                "reduce_scatter_sum",
                "counts",
                "the padded size overflows usize",
            ));
        }
        let padded = pad_blocks(data, counts, max);
        let comm = self.live(&st)?;
        let stream = &self.device.stream;
        let sendbuf = stream
            .clone_htod(&padded)
            .map_err(|e| cuda_err(what, "copying to the device", e))?;
        // SAFETY: uninitialised; the reduce-scatter writes all `max` elements before they are
        // read, and nothing reads them if it fails.
        let mut recvbuf = unsafe { stream.alloc::<f32>(max) }
            .map_err(|e| cuda_err(what, "allocating the receive buffer", e))?;
        {
            let (s, _sg) = sendbuf.device_ptr(stream);
            let (d, _dg) = recvbuf.device_ptr_mut(stream);
            // SAFETY: `comm` is live on this device; `s` holds W·max and `d` max f32 on
            // `stream`; both outlive the `wait` below.
            let r = unsafe {
                sys::ncclReduceScatter(
                    s as *const c_void,
                    d as *mut c_void,
                    max,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            };
            self.check(&mut st, what, r)?;
        }
        self.wait(&mut st, what)?;
        let mut out = stream
            .clone_dtoh(&recvbuf)
            .map_err(|e| cuda_err(what, "copying to the host", e))?;
        out.truncate(counts[self.rank]);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    //! The host-side protocol (headers, padding, trimming), checked against a host model of
    //! NCCL's all-gather and reduce-scatter; the NCCL calls themselves need GPUs
    //! (`tests/nccl.rs`).
    use super::*;

    /// NCCL's all-gather on the host: the ranks' equal-length buffers, concatenated.
    fn model_all_gather<T: Clone>(sends: &[Vec<T>]) -> Vec<T> {
        sends.concat()
    }

    #[test]
    fn uneven_all_gather_round_trips() {
        let payloads: Vec<Vec<u8>> = vec![b"abc".to_vec(), Vec::new(), b"defghij".to_vec()];
        let headers: Vec<Header> = payloads
            .iter()
            .map(|p| make_header(Op::AllGatherBytes, 4, &[], p.len() as u64))
            .collect();
        let gathered = split_headers(&model_all_gather(
            &headers.iter().map(|h| h.to_vec()).collect::<Vec<_>>(),
        ));
        assert_eq!(gathered, headers);
        for r in 0..3 {
            check_headers(r, 4, &gathered).unwrap();
        }
        let lens = payload_sizes("t", &gathered).unwrap();
        assert_eq!(lens, vec![3, 0, 7]);
        let max = 7;
        let padded: Vec<Vec<u8>> = payloads.iter().map(|p| pad_to(p, max)).collect();
        assert!(padded.iter().all(|p| p.len() == max));
        assert_eq!(
            trim_blocks(&model_all_gather(&padded), &lens, max),
            payloads
        );
    }

    #[test]
    fn uneven_reduce_scatter_matches_the_local_group() {
        let counts = [2usize, 0, 3, 1];
        let n: usize = counts.iter().sum();
        let max = 3;
        let data: Vec<Vec<f32>> = (0..4)
            .map(|r| (0..n).map(|j| (r * 100 + j) as f32).collect())
            .collect();
        // NCCL's reduce-scatter on the host: element-wise sum, block r (of `max`) to rank r.
        let padded: Vec<Vec<f32>> = data.iter().map(|d| pad_blocks(d, &counts, max)).collect();
        let mut start = 0;
        for (r, &c) in counts.iter().enumerate() {
            let mut got: Vec<f32> = (0..max)
                .map(|j| padded.iter().map(|p| p[r * max + j]).sum())
                .collect();
            got.truncate(c);
            let want: Vec<f32> = (start..start + c)
                .map(|j| data.iter().map(|d| d[j]).sum())
                .collect();
            assert_eq!(got, want, "rank {r}");
            start += c;
        }
    }

    #[test]
    fn mismatches_are_named_on_every_rank() {
        // Different sizes.
        let hs = vec![
            make_header(Op::AllReduceSum, 1, &[2], 2),
            make_header(Op::AllReduceSum, 1, &[3], 3),
        ];
        for r in 0..2 {
            let e = check_headers(r, 1, &hs).unwrap_err().to_string();
            assert!(
                e.contains(&format!("rank {r}: collective #1 mismatch"))
                    && e.contains("all_reduce_sum[2]")
                    && e.contains("all_reduce_sum[3]"),
                "{e}"
            );
        }
        // Different collectives, a skipped call, and long signatures differing past the shown
        // values.
        let e = check_headers(
            0,
            5,
            &[
                make_header(Op::AllGatherBytes, 5, &[], 9),
                make_header(Op::AllReduceSum, 5, &[1], 1),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("all_gather_bytes") && e.contains("all_reduce_sum[1]"),
            "{e}"
        );
        assert!(check_headers(
            0,
            5,
            &[
                make_header(Op::AllReduceSum, 5, &[1], 1),
                make_header(Op::AllReduceSum, 4, &[1], 1),
            ],
        )
        .is_err());
        let e = check_headers(
            1,
            2,
            &[
                make_header(Op::ReduceScatterSum, 2, &[1, 2, 3, 6], 6),
                make_header(Op::ReduceScatterSum, 2, &[1, 2, 4, 7], 7),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("4 values, hash"), "{e}");
        // The payload size may differ (all_gather_bytes), and a foreign header is named.
        check_headers(
            0,
            3,
            &[
                make_header(Op::AllGatherBytes, 3, &[], 1),
                make_header(Op::AllGatherBytes, 3, &[], 100),
            ],
        )
        .unwrap();
        let e = check_headers(0, 3, &[make_header(Op::AllGatherBytes, 3, &[], 1), [0; 8]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no recfuse header"), "{e}");
    }

    #[test]
    fn ids_versions_and_tensor_signatures() {
        assert_eq!(decode_version(22703), (2, 27, 3));
        assert_eq!(decode_version(2708), (2, 7, 8));
        let id = NcclId::from_bytes(&[3u8; NcclId::BYTES]).unwrap();
        assert!(id.raw().internal.iter().all(|&c| c == 3));
        assert!(format!("{id:?}").starts_with("NcclId("));
        let t = Tensor::from_f32(&[0.0; 6], &[2, 3], DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(tensor_signature(&t), vec![2, 2, 3]);
    }

    #[test]
    fn missing_library_is_unavailable_not_a_panic() {
        match NcclComm::library_info() {
            Ok(info) => {
                println!("{info}");
                // NCCL's own error text is picked up (no GPU needed for this).
                let s = describe_result(sys::ncclResult_t::ncclInvalidUsage, std::ptr::null_mut());
                assert!(s.starts_with("ncclInvalidUsage ("), "{s}");
                println!("{s}");
            }
            Err(Error::DeviceUnavailable { backend, reason }) => {
                assert_eq!(backend, "nccl");
                assert!(!reason.is_empty());
                println!("nccl unavailable (expected without NCCL): {reason}");
                // Cached: a second call gives the same answer without touching cudarc.
                assert!(NcclComm::library_info().is_err());
            }
            Err(other) => panic!("expected DeviceUnavailable, got {other:?}"),
        }
    }
}
