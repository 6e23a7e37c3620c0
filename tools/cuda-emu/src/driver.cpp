// A fake CUDA driver (libcuda.so.1) for cuda-emu: one emulated H200-like device whose memory is
// host memory, whose "CUBINs" are shared objects built by the fake NVRTC, and whose kernel
// launches run on the calling thread through the fiber runtime (runtime.cpp). Every stream
// operation completes before it returns, which is a valid execution of CUDA's stream order.
//
// Only the entry points cudarc 0.19 calls on recfuse's paths are defined (README.md lists them);
// cudarc resolves symbols lazily and names any missing one when it is first called.
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime.h"

namespace {

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

constexpr size_t kTotalMem = 143771287552ull;  // what an H200 reports
constexpr int kSmemOptin = 232448;              // 227 KiB
constexpr int kSmemDefault = 49152;

struct Module;

struct Function {
    const emu::KernelInfo* k;
    int max_dyn_smem;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    const Module* module;
    std::atomic<bool> traced{false};
};

struct Module {
    void* handle;
    std::vector<Function*> functions;
    std::string desc;  // "file.cu\tDEFINE=1,..." (cuda_emu_module_desc)
};

// CUDA_EMU_TRACE=path appends one line per module load ("module\tFILE\tDEFINES\tKERNELS") and
// per first launch of each function ("launch\tFILE\tDEFINES\tKERNEL"), so a run can be checked
// for kernels it never executed.
void trace(const std::string& line) {
    static const char* path = std::getenv("CUDA_EMU_TRACE");
    if (!path || !*path) return;
    static std::mutex mu;
    std::lock_guard<std::mutex> lk(mu);
    if (FILE* f = std::fopen(path, "a")) {
        std::fprintf(f, "%s\n", line.c_str());
        std::fclose(f);
    }
}

struct Context {
    int device = 0;
};

Context g_primary;
std::mutex g_mu;
std::map<uintptr_t, size_t> g_allocs;  // live device allocations (host memory)
bool g_init = false;
thread_local Context* t_current = nullptr;
thread_local std::string t_last_error;

// CUDA_EMU_CC=75 (say) makes the device report another compute capability, so that the paths
// recfuse takes on pre-Ampere GPUs (no bf16/f16/tf32 mma.sync) run too; default 9.0 (H200).
int compute_capability() {
    static const int cc = [] {
        const char* e = std::getenv("CUDA_EMU_CC");
        const int v = e && *e ? std::atoi(e) : 90;
        if (v < 70 || v > 120) {
            std::fprintf(stderr, "cuda-emu: CUDA_EMU_CC=%s is not a compute capability 70..120\n", e);
            std::abort();
        }
        return v;
    }();
    return cc;
}

std::string device_name() {
    std::string san;
    if (const char* s = std::getenv("CUDA_EMU_SANITIZE")) san = s;
    const int cc = compute_capability();
    const std::string what = cc == 90 ? "H200" : "sm_" + std::to_string(cc) + " device";
    return "cuda-emu: emulated " + what + " on the CPU (not a GPU; schedule " +
           emu::schedule_name() + ", sanitizers " + (san.empty() ? "none" : san) + ")";
}

CUresult report(CUresult r, const std::string& what) {
    t_last_error = what;
    std::fprintf(stderr, "%s\n", what.c_str());
    return r;
}

// Is [p, p + n) inside one live allocation?
bool in_allocation(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> lk(g_mu);
    auto it = g_allocs.upper_bound(uintptr_t(p));
    if (it == g_allocs.begin()) return false;
    --it;
    return uintptr_t(p) >= it->first && uintptr_t(p) + n <= it->first + it->second;
}

CUresult alloc(CUdeviceptr* dptr, size_t n) {
    if (!dptr || n == 0) return CUDA_ERROR_INVALID_VALUE;
    // Like the GPU: a request beyond the device's memory fails with OUT_OF_MEMORY (never
    // reaches the host allocator, which under ASan would abort instead of returning null).
    if (n > kTotalMem) return CUDA_ERROR_OUT_OF_MEMORY;
    void* p = std::malloc(n);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    {
        std::lock_guard<std::mutex> lk(g_mu);
        g_allocs[uintptr_t(p)] = n;
    }
    *dptr = CUdeviceptr(uintptr_t(p));
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr d) {
    {
        std::lock_guard<std::mutex> lk(g_mu);
        auto it = g_allocs.find(uintptr_t(d));
        if (it == g_allocs.end()) {
            return report(CUDA_ERROR_INVALID_VALUE,
                          "cuda-emu: cuMemFree of 0x" + std::to_string(d) +
                              ", which is not a live allocation");
        }
        g_allocs.erase(it);
    }
    std::free(reinterpret_cast<void*>(uintptr_t(d)));
    return CUDA_SUCCESS;
}

CUresult check_dev(const char* fn, CUdeviceptr p, size_t n) {
    if (n == 0 || in_allocation(p, n)) return CUDA_SUCCESS;
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "cuda-emu: %s: [0x%llx, +%zu) is not inside one live device allocation", fn, p,
                  n);
    return report(CUDA_ERROR_INVALID_VALUE, buf);
}

// The size of an ELF image from its headers (cuModuleLoadData gets no length).
size_t elf_size(const unsigned char* img) {
    Elf64_Ehdr h;
    std::memcpy(&h, img, sizeof h);
    size_t end = size_t(h.e_shoff) + size_t(h.e_shnum) * h.e_shentsize;
    const size_t ph = size_t(h.e_phoff) + size_t(h.e_phnum) * h.e_phentsize;
    if (ph > end) end = ph;
    return end;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    g_init = true;
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;  // what driver R580 reports (CUDA 13.0)
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    *n = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::snprintf(name, size_t(len), "%s", device_name().c_str());
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = kTotalMem;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::memcpy(uuid, "cuda-emu-device0", 16);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;                       // max threads per block
        case 2: case 3: *v = 1024; break;               // max block dim x, y
        case 4: *v = 64; break;                         // max block dim z
        case 5: *v = 2147483647; break;                 // max grid dim x
        case 6: case 7: *v = 65535; break;              // max grid dim y, z
        case 8: *v = kSmemDefault; break;               // shared memory per block
        case 9: *v = 65536; break;                      // total constant memory
        case 10: *v = 32; break;                        // warp size
        case 12: *v = 65536; break;                     // registers per block
        case 13: *v = 1980000; break;                   // clock rate (kHz)
        case 16: *v = 132; break;                       // multiprocessors
        case 38: *v = 52428800; break;                  // L2 bytes
        case 39: *v = 2048; break;                      // threads per multiprocessor
        case 75: *v = compute_capability() / 10; break;  // compute capability major
        case 76: *v = compute_capability() % 10; break;  // minor
        case 81: *v = 233472; break;                    // shared memory per multiprocessor
        case 82: *v = 65536; break;                     // registers per multiprocessor
        case 97: *v = kSmemOptin; break;                // shared memory per block, opt-in
        case 106: *v = 32; break;                       // max blocks per multiprocessor
        case 115: *v = 1; break;                        // memory pools supported
        default:
            return report(CUDA_ERROR_NOT_SUPPORTED,
                          "cuda-emu: cuDeviceGetAttribute(" + std::to_string(attr) +
                              ") is not emulated");
    }
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(Context** ctx, CUdevice d) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &g_primary;
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    return d == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}
API CUresult cuCtxGetCurrent(Context** ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = t_current;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSetCurrent(Context* ctx) {
    if (ctx && ctx != &g_primary) return CUDA_ERROR_INVALID_CONTEXT;
    t_current = ctx;
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }

// Streams and events: everything completes in order before its call returns.
API CUresult cuStreamCreate(void** s, unsigned) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = new int(0);
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) {
    return cuStreamCreate(s, flags);
}
API CUresult cuStreamDestroy_v2(void* s) {
    delete static_cast<int*>(s);
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(void*) { return CUDA_SUCCESS; }
API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }
API CUresult cuEventCreate(void** e, unsigned) {
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *e = new int(0);
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<int*>(e);
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(void*, void*) { return CUDA_SUCCESS; }
API CUresult cuEventSynchronize(void*) { return CUDA_SUCCESS; }
API CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }

// Memory.
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return alloc(p, n); }
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) { return alloc(p, n); }
API CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
API CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return release(p); }
API CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    if (!free_b || !total) return CUDA_ERROR_INVALID_VALUE;
    *total = kTotalMem;
    size_t used = 0;
    {
        std::lock_guard<std::mutex> lk(g_mu);
        for (auto& a : g_allocs) used += a.second;
    }
    *free_b = kTotalMem - used;
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    if (CUresult r = check_dev("cuMemsetD8", p, n)) return r;
    std::memset(reinterpret_cast<void*>(uintptr_t(p)), v, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void*) {
    return cuMemsetD8_v2(p, v, n);
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (CUresult r = check_dev("cuMemcpyHtoD", dst, n)) return r;
    if (n) std::memcpy(reinterpret_cast<void*>(uintptr_t(dst)), src, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (CUresult r = check_dev("cuMemcpyDtoH", src, n)) return r;
    if (n) std::memcpy(dst, reinterpret_cast<const void*>(uintptr_t(src)), n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult r = check_dev("cuMemcpyDtoD (destination)", dst, n)) return r;
    if (CUresult r = check_dev("cuMemcpyDtoD (source)", src, n)) return r;
    if (n) {
        std::memmove(reinterpret_cast<void*>(uintptr_t(dst)),
                     reinterpret_cast<const void*>(uintptr_t(src)), n);
    }
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    return cuMemcpyDtoD_v2(dst, src, n);
}

// Modules: an image is the ELF shared object the fake NVRTC built.
API CUresult cuModuleLoadData(Module** out, const void* image) {
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    const unsigned char* img = static_cast<const unsigned char*>(image);
    if (std::memcmp(img, ELFMAG, SELFMAG) != 0) {
        return report(CUDA_ERROR_INVALID_IMAGE, "cuda-emu: cuModuleLoadData: not an ELF image");
    }
    Elf64_Ehdr h;
    std::memcpy(&h, img, sizeof h);
    if (h.e_machine != EM_X86_64 || h.e_type != ET_DYN) {
        return report(CUDA_ERROR_INVALID_IMAGE,
                      "cuda-emu: cuModuleLoadData: an ELF image for machine " +
                          std::to_string(h.e_machine) +
                          ", not a cuda-emu module (a real CUBIN from a cache shared with NVRTC?)");
    }
    const size_t n = elf_size(img);
    const char* tmp = std::getenv("TMPDIR");
    std::string path = std::string(tmp && *tmp ? tmp : "/tmp") + "/cuda-emu-module-XXXXXX";
    const int fd = mkstemp(&path[0]);
    if (fd < 0) return report(CUDA_ERROR_INVALID_IMAGE, "cuda-emu: cannot create a temporary file");
    size_t done = 0;
    while (done < n) {
        const ssize_t w = write(fd, img + done, n - done);
        if (w <= 0) break;
        done += size_t(w);
    }
    close(fd);
    void* handle = done == n ? dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL) : nullptr;
    unlink(path.c_str());
    if (!handle) {
        const char* e = dlerror();
        return report(CUDA_ERROR_INVALID_IMAGE,
                      std::string("cuda-emu: cuModuleLoadData: dlopen failed: ") +
                          (e ? e : "short write"));
    }
    if (!dlsym(handle, "cuda_emu_module_abi")) {
        dlclose(handle);
        return report(CUDA_ERROR_INVALID_IMAGE,
                      "cuda-emu: cuModuleLoadData: the object is not a cuda-emu module");
    }
    Module* m = new Module{handle, {}, "?\t?"};
    if (const char* d = static_cast<const char*>(dlsym(handle, "cuda_emu_module_desc"))) m->desc = d;
    using KernelsFn = const emu::ModuleKernels* (*)();
    std::string names;
    if (auto fn = reinterpret_cast<KernelsFn>(dlsym(handle, "cuda_emu_module_kernels"))) {
        const emu::ModuleKernels* ks = fn();
        for (unsigned i = 0; i < ks->n; ++i) names += std::string(i ? "," : "") + ks->k[i]->name;
    }
    trace("module\t" + m->desc + "\t" + names);
    *out = m;
    return CUDA_SUCCESS;
}

API CUresult cuModuleUnload(Module* m) {
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    for (Function* f : m->functions) delete f;
    dlclose(m->handle);
    delete m;
    return CUDA_SUCCESS;
}

API CUresult cuModuleGetFunction(Function** out, Module* m, const char* name) {
    if (!out || !m || !name) return CUDA_ERROR_INVALID_VALUE;
    const std::string sym = std::string("cuda_emu_kernel_") + name;
    const auto* k = static_cast<const emu::KernelInfo*>(dlsym(m->handle, sym.c_str()));
    if (!k) {
        return report(CUDA_ERROR_NOT_FOUND,
                      std::string("cuda-emu: no __global__ function `") + name + "` in the module");
    }
    Function* f = new Function{k, int(kSmemDefault - int(k->static_smem)), m};
    if (f->max_dyn_smem < 0) f->max_dyn_smem = 0;
    std::lock_guard<std::mutex> lk(g_mu);
    m->functions.push_back(f);
    *out = f;
    return CUDA_SUCCESS;
}

API CUresult cuFuncGetAttribute(int* v, int attr, Function* f) {
    if (!v || !f) return CUDA_ERROR_INVALID_VALUE;
    switch (attr) {
        case 0: *v = int(f->k->max_threads); break;      // max threads per block
        case 1: *v = int(f->k->static_smem); break;      // static shared bytes
        case 2: case 3: *v = 0; break;                   // const, local bytes
        case 4: *v = 0; break;                           // registers: unknown to the emulator
        case 5: case 6: *v = 90; break;                  // PTX / binary version
        case 8: *v = f->max_dyn_smem; break;
        default:
            return report(CUDA_ERROR_NOT_SUPPORTED,
                          "cuda-emu: cuFuncGetAttribute(" + std::to_string(attr) +
                              ") is not emulated");
    }
    return CUDA_SUCCESS;
}

API CUresult cuFuncSetAttribute(Function* f, int attr, int v) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (attr == 8) {
        if (v < 0 || size_t(v) + f->k->static_smem > size_t(kSmemOptin)) {
            return report(CUDA_ERROR_INVALID_VALUE,
                          "cuda-emu: kernel `" + std::string(f->k->name) + "`: " +
                              std::to_string(v) + " bytes of dynamic shared memory + " +
                              std::to_string(f->k->static_smem) + " static exceed 227 KiB");
        }
        f->max_dyn_smem = v;
    }
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetCacheConfig(Function*, int) { return CUDA_SUCCESS; }

API CUresult cuLaunchKernel(Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned smem, void* /*stream*/,
                            void** params, void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    const std::string k = f->k->name;
    if (!params || extra) {
        return report(CUDA_ERROR_INVALID_VALUE,
                      "cuda-emu: kernel `" + k + "`: launch without kernelParams (or with extra)");
    }
    const unsigned long long threads = 1ull * bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 || gx > 2147483647u ||
        bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 || threads > 1024) {
        return report(CUDA_ERROR_INVALID_VALUE,
                      "cuda-emu: kernel `" + k + "`: invalid launch geometry grid (" +
                          std::to_string(gx) + "," + std::to_string(gy) + "," + std::to_string(gz) +
                          ") block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                          std::to_string(bz) + ")");
    }
    if (threads > f->k->max_threads) {
        return report(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                      "cuda-emu: kernel `" + k + "`: " + std::to_string(threads) +
                          " threads per block exceed its __launch_bounds__ of " +
                          std::to_string(f->k->max_threads));
    }
    if (int(smem) > f->max_dyn_smem) {
        return report(CUDA_ERROR_INVALID_VALUE,
                      "cuda-emu: kernel `" + k + "`: " + std::to_string(smem) +
                          " bytes of dynamic shared memory, but the function allows " +
                          std::to_string(f->max_dyn_smem) +
                          " (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES opts in)");
    }
    if (!f->traced.exchange(true)) {
        trace("launch\t" + f->module->desc + "\t" + k);
    }
    emu::LaunchDims d{{gx, gy, gz}, {bx, by, bz}, smem};
    std::string error;
    if (!emu::run_kernel(*f->k, d, params, error)) return report(CUDA_ERROR_LAUNCH_FAILED, error);
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorName(CUresult r, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    switch (r) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

// The message of the calling thread's last emulator error, so that the error recfuse reports
// (through cudarc's DriverError) says what the emulator found.
API CUresult cuGetErrorString(CUresult r, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    if (r != CUDA_SUCCESS && !t_last_error.empty()) {
        *s = t_last_error.c_str();
        return CUDA_SUCCESS;
    }
    return cuGetErrorName(r, s);
}
