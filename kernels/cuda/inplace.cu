// recfuse in-place element-wise update (src/ops/inplace.rs: Tensor::copy_from, fill, scale,
// axpy, add_). The WGSL twin is kernels/wgsl/inplace.wgsl (same work split and indexing).
//
// axpby — for every element k < n of y (and x, same size):
//     y[k] = α·y[k] + β·x[k]     (READ_Y and x present: axpy α = 1, add_ α = β = 1)
//     y[k] = α·y[k]              (READ_Y, no x: scale; a NaN in y stays NaN for α = 0)
//     y[k] = β·x[k]              (x only: copy_from, β = 1, exact: 1·x is x bit for bit)
//     y[k] = c                   (neither: fill)
//   Arithmetic in f32, one rounding on the store; the order of operations is that of
//   `Axpby::apply` on the CPU. y and x may have different storage dtypes (runtime codes 0 f32,
//   1 bf16, 2 f16, as in gemm_aux.cu: each element is touched once, so the block-uniform branch
//   costs nothing next to the memory access).
//
// Launch geometry: 1-D, 256 threads per block; thread t (global) owns the element pair
// k = 2t, 2t+1 (the word a WGSL thread owns for 16-bit storage), grid = ⌈⌈n/2⌉/256⌉ blocks.
// n < 2^31 (checked by the host), so 2t + 1 fits 32-bit unsigned arithmetic.
//
// Memory traffic: n·(s_y·(1 + READ_Y) + s_x) bytes — axpy on f32: 12 B/element; fill on
// bf16: 2 B/element. No reuse: the limiter is HBM bandwidth. A warp covers 64 consecutive
// elements (two per thread: 8-byte f32 pairs, 4-byte 16-bit pairs), so accesses coalesce into
// full sectors; at ~90% of the H200's 4.8 TB/s an f32 axpy over 10^8 elements takes ≈ 0.28 ms.

// Mirrors `AxpbyParams` in src/cuda/inplace.rs (#[repr(C)], 48 bytes).
struct AxpbyParams {
    unsigned long long y, x;  // x = 0 when absent
    float alpha, beta, fill;
    unsigned n;
    unsigned y_dt, x_dt;
    unsigned read_y;
    unsigned pad_;
};
static_assert(sizeof(AxpbyParams) == 48, "AxpbyParams layout must match the host");

extern "C" __global__ void __launch_bounds__(256) axpby(const AxpbyParams p) {
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    for (unsigned h = 0; h < 2u; ++h) {
        const unsigned k = 2u * t + h;
        if (k >= p.n) {
            return;
        }
        float v;
        if (p.read_y) {
            v = p.alpha * rf_load_dyn(p.y, p.y_dt, k);
            if (p.x) {
                v += p.beta * rf_load_dyn(p.x, p.x_dt, k);
            }
        } else if (p.x) {
            v = p.beta * rf_load_dyn(p.x, p.x_dt, k);
        } else {
            v = p.fill;
        }
        rf_store_dyn(p.y, p.y_dt, k, v);
    }
}
