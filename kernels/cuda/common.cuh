// recfuse CUDA common helpers.
//
// NVRTC has no <cuda_bf16.h>, <cuda_fp16.h> or <mma.h>, and recfuse ships no CUDA headers, so
// this file is self-contained: the host prepends its text to every kernel source before
// compiling (there is no #include anywhere). Everything here is a small __forceinline__
// helper; nothing launches on its own.
//
// * Storage dtypes, as the host's `DType` codes: 0 = f32, 1 = bf16, 2 = f16. 16-bit values
//   travel as raw `unsigned short` bit patterns; arithmetic is always f32.
// * Conversions: bf16 -> f32 is exact (a 16-bit shift); f16 -> f32 is exact (`cvt.f32.f16`);
//   f32 -> bf16/f16 round to nearest even (`cvt.rn.*`), matching the `half` crate on the host.
// * Activations: the same formulas as `src/ops/gemm.rs` (`act_f32`, `act_grad_f32`), in f32
//   (GELU in its exact erf form, not the tanh approximation).
// * Tensor-core MMA: `mma.sync.aligned` m16n8k16 (bf16, f16) and m16n8k8 (tf32) with f32
//   accumulators, through inline PTX.

#define RF_F32 0
#define RF_BF16 1
#define RF_F16 2

#define RF_ACT_NONE 0
#define RF_ACT_RELU 1
#define RF_ACT_GELU 2
#define RF_ACT_SIGMOID 3

// ---------------------------------------------------------------------------------------------
// 16-bit <-> f32 conversions.

__device__ __forceinline__ float rf_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned)h) << 16);
}

__device__ __forceinline__ unsigned short rf_f32_to_bf16(float x) {
#if __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    // cvt.rn.bf16.f32 needs sm_80; before that, round to nearest even by hand.
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
#endif
}

__device__ __forceinline__ float rf_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short rf_f32_to_f16(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// f32 -> tf32 (round to nearest, ties away: what the tensor cores' TF32 path expects).
__device__ __forceinline__ unsigned rf_f32_to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// ---------------------------------------------------------------------------------------------
// Loads and stores. `base` is a device address; `i` an element index (the host has checked
// that every index a kernel can form fits in 32 bits).

// Operand load with the dtype fixed at compile time (the hot loop of a GEMM). Read-only path:
// operands are never written by the kernel that reads them.
template <int DT>
__device__ __forceinline__ float rf_load_f32(const void* base, unsigned i) {
    if constexpr (DT == RF_F32) {
        return __ldg(static_cast<const float*>(base) + i);
    } else if constexpr (DT == RF_BF16) {
        return rf_bf16_to_f32(__ldg(static_cast<const unsigned short*>(base) + i));
    } else {
        static_assert(DT == RF_F16, "unknown dtype code");
        return rf_f16_to_f32(__ldg(static_cast<const unsigned short*>(base) + i));
    }
}

// Raw 16-bit pattern (tensor-core operands are fed as bits, no conversion).
__device__ __forceinline__ unsigned rf_load_bits16(const void* base, unsigned i) {
    return __ldg(static_cast<const unsigned short*>(base) + i);
}

// Loads and stores whose dtype is a runtime (but block-uniform) value: for tensors touched
// once per output element (epilogue operands, element-wise kernels), where the branch is free
// next to the memory access and compiling every dtype combination would multiply variants.
// Plain (coherent) loads: the output may be read back (accumulate) by the same thread.
__device__ __forceinline__ float rf_load_dyn(unsigned long long base, unsigned dt, unsigned i) {
    if (dt == RF_F32) {
        return reinterpret_cast<const float*>(base)[i];
    } else if (dt == RF_BF16) {
        return rf_bf16_to_f32(reinterpret_cast<const unsigned short*>(base)[i]);
    } else {
        return rf_f16_to_f32(reinterpret_cast<const unsigned short*>(base)[i]);
    }
}

__device__ __forceinline__ void rf_store_dyn(unsigned long long base, unsigned dt, unsigned i,
                                             float v) {
    if (dt == RF_F32) {
        reinterpret_cast<float*>(base)[i] = v;
    } else if (dt == RF_BF16) {
        reinterpret_cast<unsigned short*>(base)[i] = rf_f32_to_bf16(v);
    } else {
        reinterpret_cast<unsigned short*>(base)[i] = rf_f32_to_f16(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Activations (ids shared with `Activation::id` on the host).

__device__ __forceinline__ float rf_act(unsigned act, float z) {
    switch (act) {
        case RF_ACT_RELU:
            // NaN stays NaN (PyTorch's rule; fmaxf drops it): a bit test, fast-math proof.
            return (z > 0.0f || (__float_as_uint(z) & 0x7fffffffu) > 0x7f800000u) ? z : 0.0f;
        case RF_ACT_GELU:
            return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
        case RF_ACT_SIGMOID:
            return 1.0f / (1.0f + expf(-z));
        default:
            return z;
    }
}

// d act / dz evaluated at the pre-activation z.
__device__ __forceinline__ float rf_act_grad(unsigned act, float z) {
    switch (act) {
        case RF_ACT_RELU:
            return z > 0.0f ? 1.0f : 0.0f;
        case RF_ACT_GELU: {
            const float cdf = 0.5f * (1.0f + erff(z * 0.70710678118654752f));
            const float pdf = expf(-0.5f * z * z) * 0.3989422804014327f;
            return cdf + z * pdf;
        }
        case RF_ACT_SIGMOID: {
            const float s = 1.0f / (1.0f + expf(-z));
            return s * (1.0f - s);
        }
        default:
            return 1.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Warp-level tensor-core MMA, D = A·B + D, f32 accumulators. Register contents follow the PTX
// ISA "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8" tables; with g = lane >> 2 and
// t = lane & 3, and counting A and B in 32-bit words along k (two 16-bit elements or one tf32
// per word), both shapes use the same word positions:
//   a0 = A[g][t]   a1 = A[g+8][t]   a2 = A[g][t+4]   a3 = A[g+8][t+4]
//   b0 = B[t][g]   b1 = B[t+4][g]          (B indexed [k-word][n])
//   d0 = D[g][2t]  d1 = D[g][2t+1]  d2 = D[g+8][2t]  d3 = D[g+8][2t+1]
// For 16-bit types the lower half of each word holds the element with the smaller k.

__device__ __forceinline__ void rf_mma_bf16_16816(float (&d)[4], unsigned a0, unsigned a1,
                                                  unsigned a2, unsigned a3, unsigned b0,
                                                  unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void rf_mma_f16_16816(float (&d)[4], unsigned a0, unsigned a1,
                                                 unsigned a2, unsigned a3, unsigned b0,
                                                 unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void rf_mma_tf32_1688(float (&d)[4], unsigned a0, unsigned a1,
                                                 unsigned a2, unsigned a3, unsigned b0,
                                                 unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
