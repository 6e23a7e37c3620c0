// cuda-emu's own tests, through the fake NVRTC and driver exactly as recfuse uses them: small
// kernels that must pass, and mutations of them that the emulator must catch (a swapped MMA
// fragment register, a removed barrier, a read of unwritten shared memory, out-of-bounds
// writes), plus the defects it reports by name (divergent barriers and collectives, partial
// masks, exited lanes) and the PTX conversions against hand-checked bit patterns.
//
// Run through tools/cuda-emu/run (make check), once per schedule; with --asan the
// out-of-bounds cases must end the child process with an AddressSanitizer/UBSan report.
#include <dlfcn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

extern "C" {
int nvrtcCreateProgram(void** prog, const char* src, const char* name, int, const char* const*,
                       const char* const*);
int nvrtcCompileProgram(void* prog, int n, const char* const* opts);
int nvrtcGetProgramLogSize(void* prog, size_t* n);
int nvrtcGetProgramLog(void* prog, char* log);
int nvrtcGetCUBINSize(void* prog, size_t* n);
int nvrtcGetCUBIN(void* prog, char* out);
int nvrtcDestroyProgram(void** prog);
int cuInit(unsigned);
int cuModuleLoadData(void** m, const void* img);
int cuModuleGetFunction(void** f, void* m, const char* name);
int cuMemAlloc_v2(unsigned long long* p, size_t n);
int cuMemFree_v2(unsigned long long p);
int cuMemcpyHtoD_v2(unsigned long long dst, const void* src, size_t n);
int cuMemcpyDtoH_v2(void* dst, unsigned long long src, size_t n);
int cuLaunchKernel(void* f, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                   void*, void**, void**);
int cuGetErrorString(int r, const char** s);
}

namespace {

int g_failures = 0;
std::string g_schedule;

void check(bool ok, const std::string& what) {
    std::printf("  %s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
    if (!ok) ++g_failures;
}

// Compiles `src` (module name `name`, -D defines); returns the module, or null with `log`.
void* build(const std::string& name, const std::string& src, std::vector<std::string> defines,
            std::string* log = nullptr) {
    void* prog = nullptr;
    nvrtcCreateProgram(&prog, src.c_str(), name.c_str(), 0, nullptr, nullptr);
    defines.insert(defines.begin(), {"--gpu-architecture=sm_90", "-std=c++17"});
    std::vector<const char*> opts;
    for (auto& d : defines) opts.push_back(d.c_str());
    const int rc = nvrtcCompileProgram(prog, int(opts.size()), opts.data());
    size_t n = 0;
    nvrtcGetProgramLogSize(prog, &n);
    std::string l(n, '\0');
    nvrtcGetProgramLog(prog, &l[0]);
    if (log) *log = l;
    void* module = nullptr;
    if (rc == 0) {
        nvrtcGetCUBINSize(prog, &n);
        std::vector<char> cubin(n);
        nvrtcGetCUBIN(prog, cubin.data());
        if (cuModuleLoadData(&module, cubin.data()) != 0) module = nullptr;
    } else if (!log) {
        std::printf("compile of %s failed:\n%s\n", name.c_str(), l.c_str());
    }
    nvrtcDestroyProgram(&prog);
    return module;
}

struct Dev {
    unsigned long long p = 0;
    size_t n = 0;
    explicit Dev(size_t bytes) : n(bytes) { cuMemAlloc_v2(&p, bytes); }
    ~Dev() { cuMemFree_v2(p); }
    template <class T>
    void put(const std::vector<T>& v) { cuMemcpyHtoD_v2(p, v.data(), v.size() * sizeof(T)); }
    template <class T>
    std::vector<T> get() {
        std::vector<T> v(n / sizeof(T));
        cuMemcpyDtoH_v2(v.data(), p, n);
        return v;
    }
};

struct Params {
    unsigned long long a, b, c;
    unsigned n;
};

// Launches `kernel` with one Params argument; returns the driver's result and its message.
int launch(void* module, const char* kernel, unsigned grid, unsigned block, Params p,
           std::string* msg = nullptr) {
    void* f = nullptr;
    if (cuModuleGetFunction(&f, module, kernel) != 0) return -1;
    void* args[] = {&p};
    const int rc = cuLaunchKernel(f, grid, 1, 1, block, 1, 1, 0, nullptr, args, nullptr);
    if (msg) {
        const char* s = "";
        cuGetErrorString(rc, &s);
        *msg = s;
    }
    return rc;
}

bool asan_active() { return dlsym(RTLD_DEFAULT, "__asan_init") != nullptr; }

// Runs `body` in a child process; true when the child died with a sanitizer report.
bool dies_with_report(const std::function<void()>& body) {
    int fds[2];
    if (pipe(fds) != 0) return false;
    const pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        body();
        _exit(0);
    }
    close(fds[1]);
    std::string err;
    char buf[4096];
    ssize_t r;
    while ((r = read(fds[0], buf, sizeof buf)) > 0) err.append(buf, size_t(r));
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const bool died = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    const bool reported = err.find("AddressSanitizer") != std::string::npos ||
                          err.find("runtime error") != std::string::npos;
    return died && reported;
}

// ---- kernels -------------------------------------------------------------------------------

const char* kMmaSrc = R"(
struct Params { unsigned long long a, b, c; unsigned n; };
__device__ __forceinline__ void mma_bf16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                        unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_tf32(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// One warp: D[16][8] = A[16][K] (row-major) * B[K][8] (stored [n][k], "col") with 16-bit A/B
// packed two per word along k, fragments as in the PTX ISA tables.
extern "C" __global__ void __launch_bounds__(32) mma16(const Params p) {
    const unsigned* A = reinterpret_cast<const unsigned*>(p.a);  // [16][8] words
    const unsigned* B = reinterpret_cast<const unsigned*>(p.b);  // [8][8] words ([n][kword])
    float* D = reinterpret_cast<float*>(p.c);
    const unsigned lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    unsigned a0 = A[g * 8 + t], a1 = A[(g + 8) * 8 + t], a2 = A[g * 8 + t + 4],
             a3 = A[(g + 8) * 8 + t + 4];
#ifdef SWAP_A12
    unsigned tmp = a1; a1 = a2; a2 = tmp;
#endif
    const unsigned b0 = B[g * 8 + t], b1 = B[g * 8 + t + 4];
#if F16
    mma_f16(d, a0, a1, a2, a3, b0, b1);
#else
    mma_bf16(d, a0, a1, a2, a3, b0, b1);
#endif
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}
// tf32: A[16][8], B stored [n][k] (8 x 8), one f32 per word.
extern "C" __global__ void __launch_bounds__(32) mma_tf(const Params p) {
    const unsigned* A = reinterpret_cast<const unsigned*>(p.a);
    const unsigned* B = reinterpret_cast<const unsigned*>(p.b);
    float* D = reinterpret_cast<float*>(p.c);
    const unsigned lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    float d[4] = {1.f, 1.f, 1.f, 1.f};  // C = 1 everywhere
    mma_tf32(d, A[g * 8 + t], A[(g + 8) * 8 + t], A[g * 8 + t + 4], A[(g + 8) * 8 + t + 4],
             B[g * 8 + t], B[g * 8 + t + 4]);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}
)";

// A tiled "rotate" over two tiles of 128 values through one shared array: the trailing
// barrier of the loop is what keeps a fast warp from overwriting the tile while slower warps
// still read it (the gemm_mma k-loop shape).
const char* kSharedSrc = R"(
struct Params { unsigned long long a, b, c; unsigned n; };
extern "C" __global__ void __launch_bounds__(128) rotate(const Params p) {
    __shared__ float s[128];
    const float* in = reinterpret_cast<const float*>(p.a);
    float* out = reinterpret_cast<float*>(p.c);
    const unsigned t = threadIdx.x;
    for (unsigned tile = 0; tile < 2; ++tile) {
#ifdef HALF_WRITE
        if (t < 64) s[t] = in[tile * 128 + t];
#else
        s[t] = in[tile * 128 + t];
#endif
        __syncthreads();
        out[tile * 128 + t] = s[(t + 37) % 128];
#ifndef NO_TRAILING_SYNC
        __syncthreads();
#endif
    }
#ifdef OOB_GLOBAL
    if (t == 0) out[p.n] = 1.0f;
#endif
#ifdef OOB_SHARED
    if (t == 0) s[p.n] = 1.0f;
#endif
}
)";

// Defects the emulator must name.
const char* kDefectSrc = R"(
struct Params { unsigned long long a, b, c; unsigned n; };
extern "C" __global__ void divergent_shfl(const Params p) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else v = __shfl_xor_sync(0xffffffffu, v, 2);
    reinterpret_cast<float*>(p.c)[threadIdx.x] = v;
}
extern "C" __global__ void partial_mask(const Params p) {
    float v = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
    reinterpret_cast<float*>(p.c)[threadIdx.x] = v;
}
extern "C" __global__ void exited_lane(const Params p) {
    if (threadIdx.x == 5) return;
    float v = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    reinterpret_cast<float*>(p.c)[threadIdx.x] = v;
}
extern "C" __global__ void divergent_barrier(const Params p) {
    if (threadIdx.x < 64) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    reinterpret_cast<float*>(p.c)[threadIdx.x] = 1.0f;
}
extern "C" __global__ void barrier_after_exit(const Params p) {
    if (threadIdx.x >= 96) return;
    __syncthreads();
    reinterpret_cast<float*>(p.c)[threadIdx.x] = 1.0f;
}
extern "C" __global__ void shfl_vs_barrier(const Params p) {
    float v = 1.0f;
    if (threadIdx.x == 0) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    reinterpret_cast<float*>(p.c)[threadIdx.x] = v;
}
extern "C" __global__ void spin(const Params p) {
    volatile unsigned x = 0;
    while (x == 0) {
    }
    reinterpret_cast<float*>(p.c)[threadIdx.x] = 1.0f;
}
extern "C" __global__ void shfl_sum(const Params p) {
    float v = threadIdx.x;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    reinterpret_cast<float*>(p.c)[threadIdx.x] = v;
}
)";

const char* kCvtSrc = R"(
struct Params { unsigned long long a, b, c; unsigned n; };
extern "C" __global__ void cvt(const Params p) {
    const unsigned i = threadIdx.x;
    if (i >= p.n) return;
    const float x = reinterpret_cast<const float*>(p.a)[i];
    unsigned* o = reinterpret_cast<unsigned*>(p.c) + 5 * i;
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    o[0] = h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    o[1] = h;
    float back;
    asm("cvt.f32.f16 %0, %1;" : "=f"(back) : "h"(h));
    o[2] = __float_as_uint(back);
    unsigned t;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(t) : "f"(x));
    o[3] = t;
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x));
    o[4] = __float_as_uint(e);
}
)";

// cp.async: 64 threads copy two 256-float tiles through a double buffer, 16 bytes each per
// stage; ldmatrix + mma: one warp multiplies a 16x16 by a 16x8 bf16 tile staged in shared memory.
const char* kAsyncSrc = R"(
struct Params { unsigned long long a, b, c; unsigned n; };
__device__ __forceinline__ void cp16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(gmem));
}
extern "C" __global__ void __launch_bounds__(64) pipeline(const Params p) {
    __shared__ __align__(16) float buf[2][256];
    const float* in = reinterpret_cast<const float*>(p.a);
    float* out = reinterpret_cast<float*>(p.c);
    const unsigned t = threadIdx.x;
    cp16(&buf[0][4 * t], in + 4 * t);
    asm volatile("cp.async.commit_group;");
    cp16(&buf[1][4 * t], in + 256 + 4 * t);
    asm volatile("cp.async.commit_group;");
#ifdef WRONG_WAIT
    asm volatile("cp.async.wait_group 2;");  // waits for nothing: stage 0 has not landed
#elif !defined(NO_WAIT)
    asm volatile("cp.async.wait_group 1;");  // stage 0 landed, stage 1 may be in flight
#endif
    __syncthreads();
    for (unsigned i = t; i < 256; i += 64) out[i] = buf[0][(i + 7) % 256];
#ifndef NO_WAIT
    asm volatile("cp.async.wait_all;");
#endif
    __syncthreads();
    for (unsigned i = t; i < 256; i += 64) out[256 + i] = buf[1][(i + 7) % 256];
#ifdef MISALIGNED
    if (t == 0) cp16(&buf[0][1], in);
    asm volatile("cp.async.wait_all;");
#endif
}
extern "C" __global__ void __launch_bounds__(32) zfill(const Params p) {
    __shared__ __align__(16) float s[4];
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(&s[0]));
    if (threadIdx.x == 0) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" :: "r"(a), "l"(p.a), "r"(8u));
        asm volatile("cp.async.wait_all;");
        for (int i = 0; i < 4; ++i) reinterpret_cast<float*>(p.c)[i] = s[i];
    }
}
extern "C" __global__ void __launch_bounds__(32) never_waited(const Params p) {
    __shared__ __align__(16) float s[4];
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(&s[0]));
    if (threadIdx.x == 0) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(a), "l"(p.a));
}
// A [16][16] bf16 row-major, B [16][8] bf16 k-major (row k holds 8 n values), D [16][8] f32.
extern "C" __global__ void __launch_bounds__(32) ldsm_mma(const Params p) {
    __shared__ __align__(16) unsigned short As[16][16];
    __shared__ __align__(16) unsigned short Bs[16][8];
    const unsigned short* A = reinterpret_cast<const unsigned short*>(p.a);
    const unsigned short* B = reinterpret_cast<const unsigned short*>(p.b);
    const unsigned lane = threadIdx.x;
    for (unsigned i = lane; i < 256; i += 32) As[i / 16][i % 16] = A[i];
    for (unsigned i = lane; i < 128; i += 32) Bs[i / 8][i % 8] = B[i];
    __syncthreads();
    // Matrix i = lane / 8: rows (i % 2) * 8 + lane % 8, columns (i / 2) * 8.
    unsigned a0, a1, a2, a3, b0, b1;
    const unsigned arow = (lane / 8 % 2) * 8 + lane % 8, acol = (lane / 16) * 8;
#ifdef MISALIGNED_LDSM
    const unsigned aa = static_cast<unsigned>(__cvta_generic_to_shared(&As[arow][acol + 1]));
#else
    const unsigned aa = static_cast<unsigned>(__cvta_generic_to_shared(&As[arow][acol]));
#endif
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(aa));
    const unsigned ba = static_cast<unsigned>(__cvta_generic_to_shared(&Bs[lane % 16][0]));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(b0), "=r"(b1) : "r"(ba));
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    float* D = reinterpret_cast<float*>(p.c);
    const unsigned g = lane >> 2, t = lane & 3;
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
    unsigned* R = reinterpret_cast<unsigned*>(p.c) + 128;  // the raw A fragments
    R[lane * 4 + 0] = a0;
    R[lane * 4 + 1] = a1;
    R[lane * 4 + 2] = a2;
    R[lane * 4 + 3] = a3;
}
)";

// ---- host references -----------------------------------------------------------------------

float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// Independent of the emulator's bit tricks: nearest-even in double arithmetic via nextafter.
uint16_t ref_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    const uint16_t lo = uint16_t(u >> 16);
    if (std::isinf(x)) return lo;
    const double a = bf16_to_f32(lo), b = bf16_to_f32(uint16_t(lo + 1));
    const double d1 = std::fabs(double(x) - a), d2 = std::fabs(b - double(x));
    if (d1 < d2 || (d1 == d2 && (lo & 1) == 0)) return lo;
    return uint16_t(lo + 1);
}
uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

void test_mma() {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> U(-2.f, 2.f);
    for (int f16 = 0; f16 < 2; ++f16) {
        for (int swap = 0; swap < 2; ++swap) {
            std::vector<std::string> defs = {"-DF16=" + std::to_string(f16)};
            if (swap) defs.push_back("-DSWAP_A12");
            void* m = build("mma.cu", kMmaSrc, defs);
            if (!m) {
                check(false, "mma module builds");
                continue;
            }
            // 16-bit values with exact products; A [16][16] and B [16][8].
            float A[16][16], B[16][8];
            std::vector<unsigned> wa(16 * 8), wb(8 * 8);
            auto enc = [&](float v, float& exact) -> uint16_t {
                if (f16) {  // small integers / 4: exact in f16
                    const float q = std::round(v * 4) / 4;
                    exact = q;
                    _Float16 h = _Float16(q);
                    uint16_t b;
                    std::memcpy(&b, &h, 2);
                    return b;
                }
                const uint16_t b = ref_bf16(v);
                exact = bf16_to_f32(b);
                return b;
            };
            for (int r = 0; r < 16; ++r) {
                for (int k = 0; k < 16; k += 2) {
                    uint16_t lo = enc(U(rng), A[r][k]), hi = enc(U(rng), A[r][k + 1]);
                    wa[r * 8 + k / 2] = lo | (unsigned(hi) << 16);  // smaller k in the low half
                }
            }
            for (int n = 0; n < 8; ++n) {
                for (int k = 0; k < 16; k += 2) {
                    uint16_t lo = enc(U(rng), B[k][n]), hi = enc(U(rng), B[k + 1][n]);
                    wb[n * 8 + k / 2] = lo | (unsigned(hi) << 16);
                }
            }
            Dev da(wa.size() * 4), db(wb.size() * 4), dc(16 * 8 * 4);
            da.put(wa);
            db.put(wb);
            const int rc = launch(m, "mma16", 1, 32, Params{da.p, db.p, dc.p, 0});
            const std::vector<float> D = dc.get<float>();
            double worst = 0;
            for (int r = 0; r < 16; ++r) {
                for (int n = 0; n < 8; ++n) {
                    double s = 0;
                    for (int k = 0; k < 16; ++k) s += double(A[r][k]) * B[k][n];
                    worst = std::max(worst, std::fabs(s - D[r * 8 + n]));
                }
            }
            const std::string what = std::string(f16 ? "f16" : "bf16") + " m16n8k16 mma";
            if (!swap) {
                check(rc == 0 && worst < 1e-4, what + " matches the f64 product (max err " +
                                                   std::to_string(worst) + ")");
            } else {
                check(rc == 0 && worst > 1e-2,
                      what + " with fragment registers a1/a2 swapped is caught (max err " +
                          std::to_string(worst) + ")");
            }
        }
    }
    // tf32: operands with bits below the 10-bit mantissa set, which the tensor core ignores.
    void* m = build("mma_tf.cu", kMmaSrc, {"-DF16=0"});
    if (!m) {
        check(false, "tf32 module builds");
        return;
    }
    std::vector<float> A(16 * 8), B(8 * 8);
    for (auto& v : A) v = U(rng);
    for (auto& v : B) v = U(rng);
    Dev da(A.size() * 4), db(B.size() * 4), dc(16 * 8 * 4);
    da.put(A);
    db.put(B);
    const int rc = launch(m, "mma_tf", 1, 32, Params{da.p, db.p, dc.p, 0});
    const std::vector<float> D = dc.get<float>();
    auto trunc = [](float v) {
        uint32_t u = f32_bits(v) & 0xffffe000u;
        float f;
        std::memcpy(&f, &u, 4);
        return double(f);
    };
    double worst = 0, worst_untrunc = 0;
    for (int r = 0; r < 16; ++r) {
        for (int n = 0; n < 8; ++n) {
            double s = 1, su = 1;
            for (int k = 0; k < 8; ++k) {
                s += trunc(A[r * 8 + k]) * trunc(B[n * 8 + k]);
                su += double(A[r * 8 + k]) * B[n * 8 + k];
            }
            worst = std::max(worst, std::fabs(s - D[r * 8 + n]));
            worst_untrunc = std::max(worst_untrunc, std::fabs(su - D[r * 8 + n]));
        }
    }
    check(rc == 0 && worst < 1e-5 && worst_untrunc > 1e-6,
          "tf32 m16n8k8 mma reads 19-bit operands (err " + std::to_string(worst) +
              " vs truncated, " + std::to_string(worst_untrunc) + " vs full f32)");
}

void test_shared() {
    std::vector<float> in(256);
    for (int i = 0; i < 256; ++i) in[i] = float(i) * 0.5f + 1.0f;
    auto run = [&](std::vector<std::string> defs, std::vector<float>& out, std::string& msg) {
        void* m = build("rotate.cu", kSharedSrc, defs);
        if (!m) return -1;
        Dev da(256 * 4), dc(256 * 4);
        da.put(in);
        dc.put(std::vector<float>(256, std::nanf("")));
        const int rc = launch(m, "rotate", 1, 128, Params{da.p, 0, dc.p, 256}, &msg);
        out = dc.get<float>();
        return rc;
    };
    auto correct = [&](const std::vector<float>& out) {
        for (unsigned tile = 0; tile < 2; ++tile) {
            for (unsigned t = 0; t < 128; ++t) {
                if (out[tile * 128 + t] != in[tile * 128 + (t + 37) % 128]) return false;
            }
        }
        return true;
    };
    std::vector<float> out;
    std::string msg;
    int rc = run({}, out, msg);
    check(rc == 0 && correct(out), "tiled shared-memory kernel with its barriers is correct");

    rc = run({"-DNO_TRAILING_SYNC"}, out, msg);
    const bool caught = rc != 0 || !correct(out);
    if (g_schedule.rfind("warp-serial", 0) == 0) {
        check(caught, "a removed trailing __syncthreads is caught (wrong results)");
    } else {
        std::printf("  info  removed trailing __syncthreads under %s: %s\n", g_schedule.c_str(),
                    caught ? "caught" : "not caught (warp-serial is the schedule that must)");
    }

    rc = run({"-DHALF_WRITE"}, out, msg);
    bool nan = false;
    for (float v : out) nan |= std::isnan(v);
    check(rc == 0 && nan, "a read of shared memory no thread wrote yields the NaN poison");

    if (asan_active()) {
        check(dies_with_report([&] { run({"-DOOB_GLOBAL"}, out, msg); }),
              "an out-of-bounds global write is reported by AddressSanitizer");
        check(dies_with_report([&] { run({"-DOOB_SHARED"}, out, msg); }),
              "an out-of-bounds shared-memory write is reported by the sanitizers");
    } else if (const char* r = std::getenv("CUDA_EMU_REQUIRE_ASAN"); r && *r) {
        check(false, "out-of-bounds cases need the ASan runtime (run --asan)");
    } else {
        std::printf("  SKIP  out-of-bounds cases: no ASan runtime (tools/cuda-emu/run --asan)\n");
    }
}

void test_defects() {
    void* m = build("defects.cu", kDefectSrc, {});
    if (!m) {
        check(false, "defect kernels build");
        return;
    }
    Dev dc(256 * 4);
    struct Case {
        const char* kernel;
        unsigned threads;
        const char* needle;
    };
    for (const Case& c : {Case{"divergent_shfl", 32, "divergent warp collectives"},
                          Case{"partial_mask", 32, "member mask 0x0000ffff"},
                          Case{"exited_lane", 32, "exited"},
                          Case{"divergent_barrier", 128, "divergent barriers"},
                          Case{"barrier_after_exit", 128, "already exited"},
                          Case{"shfl_vs_barrier", 32, "deadlock"}}) {
        std::string msg;
        const int rc = launch(m, c.kernel, 2, c.threads, Params{0, 0, dc.p, 0}, &msg);
        const bool named = msg.find(c.needle) != std::string::npos &&
                           msg.find(c.kernel) != std::string::npos &&
                           msg.find("block (") != std::string::npos;
        check(rc == 719 && named, std::string(c.kernel) + " is reported: " + msg);
    }
    std::string msg;
    const int rc = launch(m, "shfl_sum", 1, 64, Params{0, 0, dc.p, 0}, &msg);
    const std::vector<float> out = dc.get<float>();
    bool ok = rc == 0;
    for (unsigned t = 0; t < 64; ++t) ok &= out[t] == float(t < 32 ? 496 : 32 * 32 + 496);
    check(ok, "a full-warp butterfly sum is exact in every lane");

    // An infinite loop: the watchdog ends the process, naming the kernel, instead of a hang.
    {
        int fds[2];
        if (pipe(fds) == 0) {
            const pid_t pid = fork();
            if (pid == 0) {
                dup2(fds[1], 2);
                setenv("CUDA_EMU_TIMEOUT_S", "1", 1);
                launch(m, "spin", 1, 32, Params{0, 0, dc.p, 0});
                _exit(0);
            }
            close(fds[1]);
            std::string err;
            char buf[4096];
            ssize_t r;
            while ((r = read(fds[0], buf, sizeof buf)) > 0) err.append(buf, size_t(r));
            close(fds[0]);
            int status = 0;
            waitpid(pid, &status, 0);
            check(!(WIFEXITED(status) && WEXITSTATUS(status) == 0) &&
                      err.find("kernel `spin`") != std::string::npos,
                  "a kernel that never returns is ended by the watchdog, naming it");
        }
    }

    std::string log;
    void* bad = build("unknown.cu", R"(
extern "C" __global__ void k(float* p) {
    asm volatile("red.global.add.f32 [%0], %1;" :: "l"(p), "f"(1.0f));
})",
                      {}, &log);
    check(!bad && log.find("red.global.add.f32") != std::string::npos &&
              log.find("unknown.cu") != std::string::npos,
          "an unknown PTX instruction is a compile error naming it and its line: " + log);
    void* missing = nullptr;
    check(launch(m, "no_such_kernel", 1, 32, Params{}) == -1 && !missing,
          "cuModuleGetFunction of a missing kernel fails");
}

void test_cvt() {
    void* m = build("cvt.cu", kCvtSrc, {});
    if (!m) {
        check(false, "cvt module builds");
        return;
    }
    // value, bf16, f16, tf32, ex2 (bit patterns worked out by hand from the formats).
    struct V {
        float x;
        uint16_t bf, h;
        uint32_t tf, e;
    };
    const float nan = std::nanf("");
    const std::vector<V> vs = {
        {1.0f, 0x3f80, 0x3c00, 0x3f800000u, 0x40000000u},
        {1.00390625f, 0x3f80, 0x3c04, 0x3f808000u, 0},             // bf16 tie -> even
        {1.01171875f, 0x3f82, 0x3c0c, 0x3f818000u, 0},             // bf16 tie -> even (up)
        {1.00048828125f, 0x3f80, 0x3c00, 0x3f802000u, 0},          // tf32 tie -> away; f16 tie -> even
        {65504.0f, 0x4780, 0x7bff, 0x477fe000u, 0x7f800000u},      // f16 max
        {65520.0f, 0x4780, 0x7c00, 0x47800000u, 0x7f800000u},      // f16 tie -> inf; tf32 tie -> away
        {5.9604644775390625e-8f, 0x3380, 0x0001, 0x33800000u, 0},  // 2^-24: f16 subnormal 1
        {2.98023223876953125e-8f, 0x3300, 0x0000, 0x33000000u, 0}, // 2^-25: tie -> 0
        {8.940696716308594e-8f, 0x33c0, 0x0002, 0x33c00000u, 0},   // 1.5 * 2^-24 -> 2
        {-2.0f, 0xc000, 0xc000, 0xc0000000u, 0x3e800000u},
        {-INFINITY, 0xff80, 0xfc00, 0xff800000u, 0x00000000u},
        {nan, 0x7fff, 0x7fff, 0x7fffffffu, 0},
        {1e-40f, 0x0001, 0x0000, 0x00012000u, 0x3f800000u},        // subnormal: ex2 flushes to 1
        {-130.0f, 0xc302, 0xd810, 0xc3020000u, 0x00000000u},       // 2^-130 flushed to +0
    };
    std::vector<float> in;
    for (const V& v : vs) in.push_back(v.x);
    Dev da(in.size() * 4), dc(in.size() * 20);
    da.put(in);
    const int rc = launch(m, "cvt", 1, 32, Params{da.p, 0, dc.p, unsigned(in.size())});
    const std::vector<uint32_t> o = dc.get<uint32_t>();
    for (size_t i = 0; i < vs.size(); ++i) {
        const V& v = vs[i];
        char buf[256];
        std::snprintf(buf, sizeof buf, "cvt of %a: bf16 %04x f16 %04x tf32 %08x ex2 %08x", v.x,
                      o[5 * i], o[5 * i + 1], o[5 * i + 3], o[5 * i + 4]);
        bool ok = rc == 0 && o[5 * i] == v.bf && o[5 * i + 1] == v.h && o[5 * i + 3] == v.tf;
        ok &= ref_bf16(v.x) == v.bf || std::isnan(v.x);  // the table agrees with the reference
        if (v.e || v.x == 1.0f || v.x == -INFINITY || v.x == -130.0f) ok &= o[5 * i + 4] == v.e;
        if (std::isnan(v.x)) ok &= std::isnan(bf16_to_f32(0)) == false && o[5 * i + 4] != 0;
        // cvt.f32.f16 of the f16 result is exact.
        if (!std::isnan(v.x)) {
            _Float16 h;
            uint16_t hb = uint16_t(o[5 * i + 1]);
            std::memcpy(&h, &hb, 2);
            ok &= f32_bits(float(h)) == o[5 * i + 2];
        }
        check(ok, buf);
    }
}

void test_async() {
    std::vector<float> in(512);
    for (int i = 0; i < 512; ++i) in[i] = float(i) * 0.25f - 3.0f;
    auto run = [&](std::vector<std::string> defs, const char* kernel, unsigned threads,
                   std::vector<float>& out, std::string& msg) {
        out.assign(512, std::nanf(""));
        void* m = build("async.cu", kAsyncSrc, defs);
        if (!m) return -1;
        Dev da(512 * 4), dc(512 * 4);
        da.put(in);
        dc.put(std::vector<float>(512, std::nanf("")));
        const int rc = launch(m, kernel, 1, threads, Params{da.p, 0, dc.p, 0}, &msg);
        out = dc.get<float>();
        return rc;
    };
    auto correct = [&](const std::vector<float>& out) {
        for (unsigned st = 0; st < 2; ++st) {
            for (unsigned i = 0; i < 256; ++i) {
                if (out[st * 256 + i] != in[st * 256 + (i + 7) % 256]) return false;
            }
        }
        return true;
    };
    std::vector<float> out;
    std::string msg;
    int rc = run({}, "pipeline", 64, out, msg);
    check(rc == 0 && correct(out), "a double-buffered cp.async pipeline with the right waits is correct");
    rc = run({"-DNO_WAIT"}, "pipeline", 64, out, msg);
    check(rc == 719 || (rc == 0 && !correct(out)),
          "reading cp.async data without a wait is caught: " + msg);
    rc = run({"-DWRONG_WAIT"}, "pipeline", 64, out, msg);
    bool nan = false;
    for (int i = 0; i < 256; ++i) nan |= std::isnan(out[i]);
    check(rc == 0 && nan, "cp.async.wait_group with the wrong count reads poison (NaN)");
    rc = run({"-DMISALIGNED"}, "pipeline", 64, out, msg);
    check(rc == 719 && msg.find("not 16-byte aligned") != std::string::npos,
          "a misaligned cp.async destination is reported: " + msg);
    rc = run({}, "zfill", 32, out, msg);
    check(rc == 0 && out[0] == in[0] && out[1] == in[1] && out[2] == 0.0f && out[3] == 0.0f,
          "cp.async with a source size zero-fills the rest");
    rc = run({}, "never_waited", 32, out, msg);
    check(rc == 719 && msg.find("never") != std::string::npos,
          "a thread that exits with copies in flight is reported: " + msg);

    // ldmatrix.x4 gives exactly the m16n8k16 A fragments, x2.trans the B fragments.
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> U(-2.f, 2.f);
    std::vector<uint16_t> A(256), B(128);
    for (auto& v : A) v = ref_bf16(U(rng));
    for (auto& v : B) v = ref_bf16(U(rng));
    for (int mis = 0; mis < 2; ++mis) {
        void* m = build("ldsm.cu", kAsyncSrc, mis ? std::vector<std::string>{"-DMISALIGNED_LDSM"}
                                                  : std::vector<std::string>{});
        if (!m) {
            check(false, "ldmatrix module builds");
            return;
        }
        Dev da(512), db(256), dc(128 * 4 + 128 * 4);
        da.put(A);
        db.put(B);
        const int r2 = launch(m, "ldsm_mma", 1, 32, Params{da.p, db.p, dc.p, 0}, &msg);
        if (mis) {
            check(r2 == 719 && msg.find("ldmatrix") != std::string::npos,
                  "a misaligned ldmatrix row address is reported: " + msg);
            continue;
        }
        const std::vector<uint32_t> raw = dc.get<uint32_t>();
        std::vector<float> D(128);
        std::memcpy(D.data(), raw.data(), 512);
        bool frag_ok = r2 == 0;
        for (unsigned l = 0; l < 32; ++l) {
            for (unsigned i = 0; i < 4; ++i) {
                const unsigned row = (i % 2) * 8 + l / 4, col = (i / 2) * 8 + 2 * (l % 4);
                const uint32_t want = A[row * 16 + col] | (uint32_t(A[row * 16 + col + 1]) << 16);
                frag_ok &= raw[128 + l * 4 + i] == want;
            }
        }
        double worst = 0;
        for (int r = 0; r < 16; ++r) {
            for (int n = 0; n < 8; ++n) {
                double s2 = 0;
                for (int k = 0; k < 16; ++k) s2 += double(bf16_to_f32(A[r * 16 + k])) * bf16_to_f32(B[k * 8 + n]);
                worst = std::max(worst, std::fabs(s2 - D[r * 8 + n]));
            }
        }
        check(frag_ok, "ldmatrix.x4 delivers each lane's row l/4, elements 2(l%4), 2(l%4)+1");
        check(r2 == 0 && worst < 1e-4,
              "ldmatrix.x4 + ldmatrix.x2.trans + mma matches the f64 product (max err " +
                  std::to_string(worst) + ")");
    }
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    cuInit(0);
    const char* s = std::getenv("CUDA_EMU_SCHEDULE");
    g_schedule = s && *s ? s : "warp-serial";
    std::printf("cuda-emu selftest (schedule %s, %s)\n", g_schedule.c_str(),
                asan_active() ? "ASan runtime present" : "no ASan runtime");
    test_mma();
    test_shared();
    test_defects();
    test_cvt();
    test_async();
    std::printf("cuda-emu selftest: %d failure(s)\n", g_failures);
    return g_failures ? 1 : 0;
}
