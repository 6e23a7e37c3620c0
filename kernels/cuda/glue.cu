// recfuse glue kernels (src/ops/glue.rs: concat / split / slice / sum / broadcast). The WGSL
// twin is kernels/wgsl/glue.wgsl (same grid, same indexing, same order of f32 additions).
//
// copy3 — dst[o, a, c] = src[o, a, c] for o < outer, a < mid, c < inner, where element
//   (o, a, c) is at off + o·s_outer + a·s_mid + c on each side (inner contiguous). Concat and
//   split are copies into / out of a column range, slice's backward writes into a column range,
//   broadcast is a source with s_mid = 0. The bits are copied (no dtype conversion: a NaN
//   payload survives). The host guarantees that the destination rows r = o·mid + a are
//   disjoint and increase in address, and that every index fits 31 bits.
//   Geometry: 1-D, 256 threads per block; thread t owns row r = t / ppr and the element pair
//   c = 2j, 2j + 1 of it (j = t mod ppr, ppr = ⌊inner/2⌋ + 1: the WGSL twin needs the extra
//   thread per row when a 16-bit row starts at an odd element). FLOPs 0; bytes 2·rows·inner·s:
//   memory-bound, coalesced along c; at ~85% of the H200's 4.8 TB/s a 65536 × 1024 bf16 concat
//   part moves 256 MiB in ≈ 66 µs (prediction, not measured).
//
// sum_mid — out[o, c] = Σ_{a = 0, 1, …} x[o, a, c] over contiguous x [outer, mid, inner] and
//   out [outer, inner], in f32 in increasing a (the CPU's order), one rounding on the store.
//   Thread t owns the output pair k = 2t, 2t + 1 (one u32 word of a 16-bit out in WGSL).
//   Bytes: outer·mid·inner·s_x + outer·inner·s_out, FLOPs outer·mid·inner: memory-bound when
//   outer·inner/2 threads fill the GPU (≥ ~66k); a sum over a long axis with few outputs is
//   latency-bound (each thread walks mid elements): fine for glue, not for a batch reduction
//   (bias gradients use the split col_sum of gemm_aux.cu).

struct Copy3Params {
    unsigned long long src, dst;
    unsigned mid, inner, rows, ppr;
    unsigned s_off, s_outer, s_mid;
    unsigned d_off, d_outer, d_mid;
    unsigned elem_bytes;  // 4 or 2
    unsigned pad_;
};
static_assert(sizeof(Copy3Params) == 64, "Copy3Params layout must match the host");

extern "C" __global__ void __launch_bounds__(256) copy3(const Copy3Params p) {
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= p.rows * p.ppr) {
        return;
    }
    const unsigned r = t / p.ppr, j = t % p.ppr;
    const unsigned o = r / p.mid, a = r % p.mid;
    const unsigned s0 = p.s_off + o * p.s_outer + a * p.s_mid;
    const unsigned d0 = p.d_off + o * p.d_outer + a * p.d_mid;
    for (unsigned h = 0; h < 2u; ++h) {
        const unsigned c = 2u * j + h;
        if (c >= p.inner) {
            return;
        }
        if (p.elem_bytes == 4u) {
            reinterpret_cast<unsigned*>(p.dst)[d0 + c] =
                reinterpret_cast<const unsigned*>(p.src)[s0 + c];
        } else {
            reinterpret_cast<unsigned short*>(p.dst)[d0 + c] =
                reinterpret_cast<const unsigned short*>(p.src)[s0 + c];
        }
    }
}

struct SumMidParams {
    unsigned long long x, out;
    unsigned mid, inner, n_out, x_dt;
    unsigned out_dt, pad0_, pad1_, pad2_;
};
static_assert(sizeof(SumMidParams) == 48, "SumMidParams layout must match the host");

extern "C" __global__ void __launch_bounds__(256) sum_mid(const SumMidParams p) {
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    for (unsigned h = 0; h < 2u; ++h) {
        const unsigned k = 2u * t + h;
        if (k >= p.n_out) {
            return;
        }
        const unsigned o = k / p.inner, c = k % p.inner;
        // outer·mid·inner < 2^31 (checked by the host): no 32-bit product here wraps.
        unsigned i = o * p.mid * p.inner + c;
        float s = 0.0f;
        for (unsigned a = 0; a < p.mid; ++a, i += p.inner) {
            s += rf_load_dyn(p.x, p.x_dt, i);
        }
        rf_store_dyn(p.out, p.out_dt, k, s);
    }
}
