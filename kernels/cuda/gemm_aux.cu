// recfuse GEMM-core helpers for the backward pass of a fused GEMM (src/ops/backend.rs):
//
// act_backward:   dz[i] = dy[i] · act'(pre[i])       (act'(·) = 1 when pre is absent)
// col_sum:        out[j] (+)= Σ_{i < rows} x[i·cols + j]       (bias gradient; with skip_odd
//                 the odd columns count as 0: the gate-bias slots of a GDCN without one)
//
// Storage dtypes of every tensor are runtime fields (codes 0 f32, 1 bf16, 2 f16): each element
// is touched once, so a block-uniform branch costs nothing next to the memory access, and one
// compiled module serves every dtype combination. Arithmetic is f32.
//
// act_backward — element-wise, grid-stride loop over n < 2^31, 256 threads per block.
//   Traffic: reads dy and pre, writes dz: (s_dy + s_pre + s_dz)·n bytes, no reuse; it runs at
//   the memory roofline if anything does (GELU's erff/expf are ~40 FLOP per element, far below
//   the H200's FLOP/byte balance).
//
// col_sum — deterministic: no atomics, and a summation order that depends only on
//   (rows, cols), never on scheduling. Two kernels:
//   col_sum_partial  grid (⌈cols/32⌉, splits), block (32, 8). Block (sx, s) owns columns
//                    sx·32..sx·32+31 and rows [s·rps, min(rows, (s+1)·rps)); thread (tx, ty)
//                    sums rows ty, ty+8, ty+16, ... of that range in increasing order for
//                    column tx (a warp reads 32 consecutive columns of one row: coalesced),
//                    then thread ty = 0 adds the 8 partials in order ty = 0..7. With one split
//                    it finishes in place (accumulate, round, store); otherwise it writes f32
//                    partials ws[s·cols + j].
//   col_sum_finish   one thread per column adds ws[0..splits) in order, then finishes.
//   The host picks splits = min(⌈rows/256⌉, max(1, 1024/⌈cols/32⌉), 1024) so a tall, narrow
//   gradient (the usual bias shape) still fills the GPU with ~1024 blocks.
//   Traffic: s_x·rows·cols bytes read once, plus 8·splits·cols bytes of f32 workspace.

// Mirrors `ActBackwardParams` in src/cuda/gemm.rs (#[repr(C)], 48 bytes).
struct ActBackwardParams {
    unsigned long long dy, pre, dz;  // pre = 0 when absent
    unsigned n;
    unsigned act;
    unsigned dy_dt, pre_dt, dz_dt;
    unsigned pad_;
};
static_assert(sizeof(ActBackwardParams) == 48, "ActBackwardParams layout must match the host");

extern "C" __global__ void __launch_bounds__(256) act_backward(const ActBackwardParams p) {
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        float d = rf_load_dyn(p.dy, p.dy_dt, i);
        if (p.pre) {
            d *= rf_act_grad(p.act, rf_load_dyn(p.pre, p.pre_dt, i));
        }
        rf_store_dyn(p.dz, p.dz_dt, i, d);
        // i + stride cannot wrap: n < 2^31 and stride < 2^31 (checked on the host).
    }
}

// Mirrors `ColSumParams` in src/cuda/gemm.rs (#[repr(C)], 56 bytes).
struct ColSumParams {
    unsigned long long x, out, ws;  // ws: f32 workspace [splits, cols]; 0 when splits == 1
    unsigned rows, cols;
    unsigned splits, rows_per_split;
    unsigned x_dt, out_dt;
    unsigned accumulate;
    unsigned skip_odd;  // odd columns of x count as zeros (structural zeros, e.g. no gate bias)
};
static_assert(sizeof(ColSumParams) == 56, "ColSumParams layout must match the host");

__device__ __forceinline__ void col_sum_store(const ColSumParams& p, unsigned j, float s) {
    if (p.skip_odd && (j & 1u)) {
        s = 0.0f;
    }
    if (p.accumulate) {
        s += rf_load_dyn(p.out, p.out_dt, j);
    }
    rf_store_dyn(p.out, p.out_dt, j, s);
}

extern "C" __global__ void __launch_bounds__(256) col_sum_partial(const ColSumParams p) {
    __shared__ float part[8][33];
    const unsigned tx = threadIdx.x;  // 0..31: column within the strip
    const unsigned ty = threadIdx.y;  // 0..7: row lane
    const unsigned j = blockIdx.x * 32u + tx;
    const unsigned s = blockIdx.y;
    const unsigned r0 = s * p.rows_per_split;
    const unsigned r1 = min(p.rows, r0 + p.rows_per_split);

    float acc = 0.0f;
    if (j < p.cols) {
        for (unsigned r = r0 + ty; r < r1; r += 8u) {
            acc += rf_load_dyn(p.x, p.x_dt, r * p.cols + j);
        }
    }
    part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && j < p.cols) {
        float total = part[0][tx];
#pragma unroll
        for (int q = 1; q < 8; ++q) {
            total += part[q][tx];
        }
        if (p.splits == 1u) {
            col_sum_store(p, j, total);
        } else {
            reinterpret_cast<float*>(p.ws)[s * p.cols + j] = total;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) col_sum_finish(const ColSumParams p) {
    const unsigned j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.cols) {
        return;
    }
    const float* ws = reinterpret_cast<const float*>(p.ws);
    float total = 0.0f;
    for (unsigned s = 0; s < p.splits; ++s) {
        total += ws[s * p.cols + j];
    }
    col_sum_store(p, j, total);
}
