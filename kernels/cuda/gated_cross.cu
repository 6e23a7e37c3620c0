// recfuse element-wise kernels of the cross-layer backward (src/ops/backend.rs,
// src/ops/gated_cross.rs): the part of a (gated) cross layer's backward that is not a GEMM.
//
// gate_backward — per element k < n = rows·D of the layer's [rows, D] tensors:
//   gated (GDCN), with (u, v) = (pre[2k], pre[2k+1]) the interleaved (cross, gate) pair:
//       s          = σ(v) = 1 / (1 + exp(−v))
//       ΔU         = Ḡ·c0·s                 -> delta[2k]
//       ΔV         = ΔU·u·(1 − s)           -> delta[2k+1]     (= Ḡ·c0·u·s·(1−s))
//       dX0       += Ḡ·u·s                  -> dx0[k] (read, add, write)
//   DCN-V2 (not gated), u = pre[k]:
//       ΔU         = Ḡ·c0                   -> delta[k]
//       dX0       += Ḡ·u                    -> dx0[k]
//   Layouts: gbar (Ḡ), c0 and dx0 are contiguous [rows, D] (element k); pre and delta are
//   contiguous [rows, P], P = 2D (gated, pairs at 2k, 2k+1) or D. The (rows, D) structure never
//   matters: the math is per element k, so the kernel walks the flat index.
//   The operation order matches src/cpu/fast.rs::gate_backward ((Ḡ·c0)·s, then ·u, then
//   ·(1−s); dX0 + (Ḡ·u)·s); σ uses expf, as the GEMM epilogue's sigmoid does.
//
// elementwise_add — out[k] = a[k] (+ b[k]) for k < n (host function `add`): the f32 gradient
//   accumulator's initialisation from dy (a cast, b absent) and the final dx = dX0 + Ḡ
//   (rounded to the output dtype).
//
// Every tensor's storage dtype is a runtime field (codes 0 f32, 1 bf16, 2 f16), as in
// gemm_aux.cu: each element is touched once, so the block-uniform branch is free next to the
// memory access and one module serves every dtype mix. All arithmetic is f32.
//
// Launch geometry (both kernels): 1-D, 256 threads per block, one thread per element k with a
// grid-stride loop; the host launches min(⌈n/256⌉, 32·SMs) blocks. n and the pre/delta
// element counts (2n when gated) are < 2^31, and the stride < 2^31, so 32-bit unsigned index
// arithmetic (2k + 1 included) is exact and `k += stride` cannot wrap.
//
// Memory traffic (bytes, s_X = element size of X; no reuse, so both run at the memory roofline):
//   gate_backward    n·(s_gbar + s_c0 + 2·s_dx0) + p·n·(s_pre + s_delta), p = 2 gated else 1:
//                    with f32 Ḡ/dX0 and bf16 c0/pre/delta, 22 B per element gated, 18 B
//                    DCN-V2. Consecutive threads touch consecutive k (and the pairs 2k, 2k+1:
//                    a warp covers one contiguous 128-element span), so every access
//                    coalesces.
//   elementwise_add  n·(s_a + s_b + s_out).
//   Compute is a few FLOP (plus one expf when gated) per element: far below the H200's
//   FLOP/byte balance.

// Mirrors `GateBackwardParams` in src/cuda/gemm.rs (#[repr(C)], 72 bytes).
struct GateBackwardParams {
    unsigned long long gbar, c0, pre, delta, dx0;
    unsigned n;      // rows·D
    unsigned gated;  // 1: GDCN pairs, 0: DCN-V2
    unsigned gbar_dt, c0_dt, pre_dt, delta_dt, dx0_dt;
    unsigned pad_;
};
static_assert(sizeof(GateBackwardParams) == 72, "GateBackwardParams layout must match the host");

extern "C" __global__ void __launch_bounds__(256) gate_backward(const GateBackwardParams p) {
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned k = blockIdx.x * blockDim.x + threadIdx.x; k < p.n; k += stride) {
        const float g = rf_load_dyn(p.gbar, p.gbar_dt, k);
        const float c = rf_load_dyn(p.c0, p.c0_dt, k);
        float dx = rf_load_dyn(p.dx0, p.dx0_dt, k);
        if (p.gated) {
            const float u = rf_load_dyn(p.pre, p.pre_dt, 2u * k);
            const float s = rf_act(RF_ACT_SIGMOID, rf_load_dyn(p.pre, p.pre_dt, 2u * k + 1u));
            const float du = g * c * s;
            rf_store_dyn(p.delta, p.delta_dt, 2u * k, du);
            rf_store_dyn(p.delta, p.delta_dt, 2u * k + 1u, du * u * (1.0f - s));
            dx += g * u * s;
        } else {
            const float u = rf_load_dyn(p.pre, p.pre_dt, k);
            rf_store_dyn(p.delta, p.delta_dt, k, g * c);
            dx += g * u;
        }
        rf_store_dyn(p.dx0, p.dx0_dt, k, dx);
    }
}

// Mirrors `AddParams` in src/cuda/gemm.rs (#[repr(C)], 40 bytes).
struct AddParams {
    unsigned long long a, b, out;  // b = 0 when absent (a plain cast)
    unsigned n;
    unsigned a_dt, b_dt, out_dt;
};
static_assert(sizeof(AddParams) == 40, "AddParams layout must match the host");

extern "C" __global__ void __launch_bounds__(256) elementwise_add(const AddParams p) {
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned k = blockIdx.x * blockDim.x + threadIdx.x; k < p.n; k += stride) {
        float v = rf_load_dyn(p.a, p.a_dt, k);
        if (p.b) {
            v += rf_load_dyn(p.b, p.b_dt, k);
        }
        rf_store_dyn(p.out, p.out_dt, k, v);
    }
}
