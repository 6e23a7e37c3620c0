// What a translated CUDA kernel sees: the CUDA language extensions and device builtins the
// recfuse kernels use, as host C++ over the cuda-emu runtime (libcudaemu.so).
//
// The translator (src/translate.cpp) force-includes this header and rewrites only what C++
// cannot express (inline PTX, `__shared__` declarations, kernel entry points); everything
// else compiles as written. Anything a kernel uses that is not defined here is a compile error
// naming it — the emulator never guesses.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "ptx_table.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
#define __CUDACC__ 1
#define __CUDACC_RTC__ 1

namespace emu {

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

// Indices of the thread currently running on this OS thread (one block per OS thread at a
// time; the scheduler rewrites thread_idx at every fiber switch).
struct Indices {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};

// A register operand of an inline PTX instruction: the address of an lvalue for outputs
// ("=x" / "+x"), or the value itself for inputs.
struct Reg {
    void* ptr;
    std::uint64_t val;
    unsigned bytes;
};

// A kernel entry point as the fake driver finds it (dlsym "cuda_emu_kernel_<name>").
struct KernelInfo {
    const char* name;
    void (*body)(void** params);
    unsigned max_threads;       // __launch_bounds__ first argument (1024 when absent)
    std::size_t static_smem;    // bytes of the __shared__ declarations in the kernel body
};

using ResolveFn = void (*)(const unsigned char* ins, unsigned char* outs, const void* ctx);

// The kernels this module holds after preprocessing: every entry point registers itself from a
// static initialiser (an entry point sits inside the same #if as its kernel). Hidden visibility
// keeps one list per module.
struct ModuleKernels {
    const KernelInfo* k[64];
    unsigned n;
};
inline ModuleKernels& module_kernels() {
    static ModuleKernels m{};
    return m;
}
struct Registrar {
    explicit Registrar(const KernelInfo* k) {
        ModuleKernels& m = module_kernels();
        if (m.n < 64) m.k[m.n++] = k;
    }
};

}  // namespace emu

extern "C" {
emu::Indices* emu_indices();
void emu_syncthreads(const char* file, int line);
// A warp collective: every lane deposits `in_bytes` of input; when all 32 lanes have arrived
// at the same site, `resolve` (called once, by the last lane) turns the 32 inputs (stride
// in_bytes) into 32 outputs (stride out_bytes), and each lane receives its own.
void emu_collective(const char* what, const char* file, int line, unsigned mask, const void* in,
                    unsigned in_bytes, void* out, unsigned out_bytes, emu::ResolveFn resolve,
                    const void* ctx);
void emu_ptx(int op, const char* file, int line, emu::Reg* regs, int n);
void* emu_shared_static(const void* key, std::size_t bytes, std::size_t align, const char* name);
void* emu_shared_dynamic(std::size_t align);
std::size_t emu_cvta_shared(const void* p);
[[noreturn]] void emu_trap(const char* file, int line, const char* what);
}

#define threadIdx (static_cast<const ::emu::uint3&>(emu_indices()->thread_idx))
#define blockIdx (static_cast<const ::emu::uint3&>(emu_indices()->block_idx))
#define blockDim (static_cast<const ::emu::dim3&>(emu_indices()->block_dim))
#define gridDim (static_cast<const ::emu::dim3&>(emu_indices()->grid_dim))
#define warpSize 32

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu_syncthreads(file, line);
}

// A shared-memory pointer as the 32-bit shared-window address cp.async and ldmatrix take.
inline std::size_t __cvta_generic_to_shared(const void* p) { return emu_cvta_shared(p); }

inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu_trap(file, line, "__trap()");
}

// ---- vector types ------------------------------------------------------------------------
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- bit casts and arithmetic intrinsics -------------------------------------------------
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
// Correctly rounded on the GPU; IEEE division is correctly rounded on the host too.
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// The GPU's fast division is approximate (2 ulp); the host's exact quotient is within it.
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }

// Read-only cached load: an ordinary load on the host (ASan checks it like any other).
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

// CUDA's integer/float min and max overloads, including mixed signedness (which converts to
// unsigned, as the usual arithmetic conversions do there too).
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point<C>::value) {
        return std::fmin(C(a), C(b));
    } else {
        return C(b) < C(a) ? C(b) : C(a);
    }
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point<C>::value) {
        return std::fmax(C(a), C(b));
    } else {
        return C(a) < C(b) ? C(b) : C(a);
    }
}

// ---- warp shuffles -------------------------------------------------------------------------
namespace emu {

template <class T>
struct ShflIn {
    T v;
    int arg;    // lane mask (xor), source lane (idx) or delta (up/down)
    int width;
};

enum ShflKind { SHFL_XOR, SHFL_IDX, SHFL_UP, SHFL_DOWN };

template <class T, int K>
void shfl_resolve(const unsigned char* ins, unsigned char* outs, const void*) {
    const auto* in = reinterpret_cast<const ShflIn<T>*>(ins);
    auto* out = reinterpret_cast<T*>(outs);
    for (int l = 0; l < 32; ++l) {
        const int w = in[l].width;
        const int seg = l / w * w;  // first lane of l's segment
        int src = l;
        if (K == SHFL_XOR) {
            src = l ^ in[l].arg;
            if (src >= seg + w) src = l;
        } else if (K == SHFL_IDX) {
            src = seg + (in[l].arg % w + w) % w;
        } else if (K == SHFL_UP) {
            src = l - in[l].arg;
            if (src < seg) src = l;
        } else {
            src = l + in[l].arg;
            if (src >= seg + w) src = l;
        }
        out[l] = in[src].v;
    }
}

template <class T, int K>
inline T shfl(const char* what, unsigned mask, T v, int arg, int width, const char* file,
              int line) {
    static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                  "__shfl_*_sync: 32- or 64-bit values only");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
        emu_trap(file, line, "__shfl_*_sync: width must be a power of two in 1..32");
    }
    ShflIn<T> in{v, arg, width};
    T out;
    emu_collective(what, file, line, mask, &in, sizeof in, &out, sizeof out,
                   &shfl_resolve<T, K>, nullptr);
    return out;
}

}  // namespace emu

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu::shfl<T, emu::SHFL_XOR>("__shfl_xor_sync", mask, v, lane_mask, width, file, line);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu::shfl<T, emu::SHFL_IDX>("__shfl_sync", mask, v, src_lane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu::shfl<T, emu::SHFL_UP>("__shfl_up_sync", mask, v, int(delta), width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu::shfl<T, emu::SHFL_DOWN>("__shfl_down_sync", mask, v, int(delta), width, file,
                                        line);
}

// ---- what the translator emits ---------------------------------------------------------------
namespace emu {

constexpr unsigned reg_bytes(char c) {
    return c == 'h' ? 2 : (c == 'r' || c == 'f') ? 4 : (c == 'l' || c == 'd') ? 8 : 0;
}

// An output (or read-write) operand: the instruction writes through the address.
template <char C, class T>
inline Reg reg_ref(T& x) {
    static_assert(!std::is_const<T>::value, "asm output operand must be a modifiable lvalue");
    static_assert(sizeof(T) == reg_bytes(C), "asm operand size does not match its constraint");
    return Reg{static_cast<void*>(&x), 0, sizeof(T)};
}

// An input operand, by value.
template <char C, class T>
inline Reg reg_val(const T& x) {
    static_assert(std::is_trivially_copyable<T>::value, "asm input operand must be a scalar");
    static_assert(sizeof(T) == reg_bytes(C), "asm operand size does not match its constraint");
    if constexpr (C == 'f') {
        static_assert(std::is_same<T, float>::value, "\"f\" operands are f32 values");
    }
    Reg r{nullptr, 0, sizeof(T)};
    std::memcpy(&r.val, &x, sizeof(T));
    return r;
}

// `__shared__ T name;` becomes a reference into the current block's fresh, poisoned copy.
template <class T>
inline T& shared_static(const void* key, std::size_t align, const char* name) {
    std::size_t a = align > alignof(T) ? align : alignof(T);
    return *static_cast<T*>(emu_shared_static(key, sizeof(T), a, name));
}

template <class T>
inline T* shared_dynamic(std::size_t align) {
    std::size_t a = align > alignof(T) ? align : alignof(T);
    return static_cast<T*>(emu_shared_dynamic(a));
}

// kernelParams[i] points at the i-th argument (cuLaunchKernel's contract).
template <class... A, std::size_t... I>
inline void invoke_impl(void (*f)(A...), void** kp, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(kp[I])...);
}
template <class... A>
inline void invoke(void (*f)(A...), void** kp) {
    invoke_impl(f, kp, std::index_sequence_for<A...>{});
}

}  // namespace emu
