// recfuse LayerNorm (src/ops/layernorm.rs; the residual add happens before, in x's dtype):
//
//   forward, per row r of width d, t = r mod T (T = 1: shared affine, T tokens: per token):
//     μ_r = Σ_c x_rc / d,  σ²_r = Σ_c (x_rc − μ_r)² / d  (centred: two passes, f32),
//     rstd_r = 1 / √(σ²_r + ε),  y_rc = (x_rc − μ_r)·rstd_r·γ[t, c] + β[t, c]
//   backward, x̂ = (x − μ)·rstd, g = γ[t]·dy:
//     dx_rc  = rstd_r·(g_rc − mean_c(g_r·) − x̂_rc·mean_c(g_r·x̂_r·))
//     dγ[t, c] = Σ_{r ≡ t (mod T)} dy_rc·x̂_rc,   dβ[t, c] = Σ_{r ≡ t (mod T)} dy_rc
//
// Layouts: x, y, dy, dx [rows, d] row-major; mean, rstd [rows]; γ, β, dγ, dβ [T, d] with
// rows = G·T (x is [..., T, d], so row r = g·T + t). Storage dtypes are runtime fields
// (codes 0 f32, 1 bf16, 2 f16, as in gemm_aux.cu); statistics and arithmetic are f32.
//
// ln_fwd, ln_bwd_dx — one warp per row, 8 warps (256 threads) per block, grid-stride over rows
//   (row = (blockIdx.x·8 + warp) + k·gridDim.x·8). Lane l holds elements c = l + 32u,
//   u < LN_VPL = 8, in registers (the whole row for d ≤ 256; wider rows re-read the rest from
//   global memory in each pass, which L1 serves). Row sums are xor-butterfly warp reductions,
//   whose result is bitwise the same on every lane. Each warp reads its row once per pass in
//   32-lane runs: coalesced. No shared memory, no __syncthreads.
//   Traffic: forward reads x (s_x·d per row) and γ, β (T·d, L2-resident), writes y (s_y·d)
//   and 8 bytes of statistics per row; backward reads x, dy, γ, mean, rstd and writes dx:
//   (s_x + s_dy + s_dx)·d + 8 bytes per row. A few FLOP per element: memory-bound.
//
// ln_bwd_param_partial / ln_bwd_param_finish — dγ, dβ, deterministic (no atomics; the order
//   depends only on (G, T·d)), the col_sum scheme of gemm_aux.cu on the [G, T·d] view of dy
//   (column j = t·d + c, row g):
//   partial  grid (⌈T·d/32⌉, S), block (32, 8): block (sx, s) owns columns sx·32 .. sx·32+31
//            and groups [s·gps, min(G, (s+1)·gps)); thread (tx, ty) sums groups ty, ty+8, ...
//            of that range in increasing order for column tx (a warp reads 32 consecutive
//            columns of one row: coalesced), then ty = 0 adds the 8 partials in order ty = 0..7.
//            With S = 1 it stores dγ, dβ; otherwise f32 partials ws[s·T·d + j] (dγ) and
//            ws[(S + s)·T·d + j] (dβ).
//   finish   one thread per column adds s = 0..S−1 in order and stores.
//   The host picks S like col_sum (≈ 1024 blocks, G/256 at most). Traffic: x and dy read once
//   more, (s_x + s_dy)·rows·d, plus 8 bytes of statistics per row (reused from L1 by the 32
//   columns of a strip).
//
// Index arithmetic is unsigned 32-bit: the host checks rows·d < 2^31.

#define LN_VPL 8
#define LN_WARPS 8

// Mirrors `LnParams` in src/cuda/layernorm.rs (#[repr(C)], 160 bytes).
struct LnParams {
    unsigned long long x, gamma, beta, y, mean, rstd, dy, dx, dgamma, dbeta, ws;
    unsigned rows, d, tokens, groups;  // groups = rows / tokens
    unsigned splits, groups_per_split;
    float eps;
    unsigned x_dt, g_dt, b_dt, y_dt, dy_dt, dx_dt, dg_dt, db_dt, mean_dt, rstd_dt;
    float inv_d;  // 1/d, rounded on the host (an IEEE division here is a called slow path)
};
static_assert(sizeof(LnParams) == 160, "LnParams layout must match the host");

__device__ __forceinline__ float ln_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

extern "C" __global__ void __launch_bounds__(256) ln_fwd(const LnParams p) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned stride = gridDim.x * LN_WARPS;
    const float inv_d = p.inv_d;
    // `row` is warp-uniform, so every shuffle below has all 32 lanes present.
    for (unsigned row = blockIdx.x * LN_WARPS + (threadIdx.x >> 5); row < p.rows; row += stride) {
        const unsigned base = row * p.d;
        float v[LN_VPL];
        float sum = 0.0f;
#pragma unroll
        for (int u = 0; u < LN_VPL; ++u) {
            const unsigned c = lane + 32u * u;
            v[u] = c < p.d ? rf_load_dyn(p.x, p.x_dt, base + c) : 0.0f;
            sum += v[u];
        }
        for (unsigned c = lane + 32u * LN_VPL; c < p.d; c += 32u) {
            sum += rf_load_dyn(p.x, p.x_dt, base + c);
        }
        const float mu = ln_warp_sum(sum) * inv_d;
        float sq = 0.0f;
#pragma unroll
        for (int u = 0; u < LN_VPL; ++u) {
            const unsigned c = lane + 32u * u;
            const float z = v[u] - mu;
            sq += c < p.d ? z * z : 0.0f;
        }
        for (unsigned c = lane + 32u * LN_VPL; c < p.d; c += 32u) {
            const float z = rf_load_dyn(p.x, p.x_dt, base + c) - mu;
            sq += z * z;
        }
        const float rstd = 1.0f / sqrtf(ln_warp_sum(sq) * inv_d + p.eps);
        const unsigned goff = (row % p.tokens) * p.d;
#pragma unroll
        for (int u = 0; u < LN_VPL; ++u) {
            const unsigned c = lane + 32u * u;
            if (c < p.d) {
                const float yv = (v[u] - mu) * rstd * rf_load_dyn(p.gamma, p.g_dt, goff + c) +
                                 rf_load_dyn(p.beta, p.b_dt, goff + c);
                rf_store_dyn(p.y, p.y_dt, base + c, yv);
            }
        }
        for (unsigned c = lane + 32u * LN_VPL; c < p.d; c += 32u) {
            const float yv =
                (rf_load_dyn(p.x, p.x_dt, base + c) - mu) * rstd * rf_load_dyn(p.gamma, p.g_dt, goff + c) +
                rf_load_dyn(p.beta, p.b_dt, goff + c);
            rf_store_dyn(p.y, p.y_dt, base + c, yv);
        }
        if (lane == 0) {
            rf_store_dyn(p.mean, p.mean_dt, row, mu);
            rf_store_dyn(p.rstd, p.rstd_dt, row, rstd);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) ln_bwd_dx(const LnParams p) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned stride = gridDim.x * LN_WARPS;
    const float inv_d = p.inv_d;
    for (unsigned row = blockIdx.x * LN_WARPS + (threadIdx.x >> 5); row < p.rows; row += stride) {
        const unsigned base = row * p.d;
        const unsigned goff = (row % p.tokens) * p.d;
        const float mu = rf_load_dyn(p.mean, p.mean_dt, row);
        const float rstd = rf_load_dyn(p.rstd, p.rstd_dt, row);
        float gd[LN_VPL], xh[LN_VPL];
        float a = 0.0f, bsum = 0.0f;
#pragma unroll
        for (int u = 0; u < LN_VPL; ++u) {
            const unsigned c = lane + 32u * u;
            gd[u] = 0.0f;
            xh[u] = 0.0f;
            if (c < p.d) {
                gd[u] = rf_load_dyn(p.dy, p.dy_dt, base + c) * rf_load_dyn(p.gamma, p.g_dt, goff + c);
                xh[u] = (rf_load_dyn(p.x, p.x_dt, base + c) - mu) * rstd;
            }
            a += gd[u];
            bsum = fmaf(gd[u], xh[u], bsum);
        }
        for (unsigned c = lane + 32u * LN_VPL; c < p.d; c += 32u) {
            const float g = rf_load_dyn(p.dy, p.dy_dt, base + c) * rf_load_dyn(p.gamma, p.g_dt, goff + c);
            a += g;
            bsum = fmaf(g, (rf_load_dyn(p.x, p.x_dt, base + c) - mu) * rstd, bsum);
        }
        a = ln_warp_sum(a) * inv_d;
        bsum = ln_warp_sum(bsum) * inv_d;
#pragma unroll
        for (int u = 0; u < LN_VPL; ++u) {
            const unsigned c = lane + 32u * u;
            if (c < p.d) {
                rf_store_dyn(p.dx, p.dx_dt, base + c, rstd * (gd[u] - a - xh[u] * bsum));
            }
        }
        for (unsigned c = lane + 32u * LN_VPL; c < p.d; c += 32u) {
            const float g = rf_load_dyn(p.dy, p.dy_dt, base + c) * rf_load_dyn(p.gamma, p.g_dt, goff + c);
            const float x = (rf_load_dyn(p.x, p.x_dt, base + c) - mu) * rstd;
            rf_store_dyn(p.dx, p.dx_dt, base + c, rstd * (g - a - x * bsum));
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) ln_bwd_param_partial(const LnParams p) {
    __shared__ float part_g[8][33];
    __shared__ float part_b[8][33];
    const unsigned tx = threadIdx.x;  // 0..31: column within the strip
    const unsigned ty = threadIdx.y;  // 0..7: group lane
    const unsigned cols = p.tokens * p.d;
    const unsigned j = blockIdx.x * 32u + tx;
    const unsigned s = blockIdx.y;
    const unsigned g0 = s * p.groups_per_split;
    const unsigned g1 = min(p.groups, g0 + p.groups_per_split);

    float acc_g = 0.0f, acc_b = 0.0f;
    if (j < cols) {
        const unsigned t = j / p.d;
        for (unsigned g = g0 + ty; g < g1; g += 8u) {
            const unsigned row = g * p.tokens + t;
            const unsigned e = g * cols + j;  // = row·d + c
            const float dyv = rf_load_dyn(p.dy, p.dy_dt, e);
            const float xh = (rf_load_dyn(p.x, p.x_dt, e) - rf_load_dyn(p.mean, p.mean_dt, row)) *
                             rf_load_dyn(p.rstd, p.rstd_dt, row);
            acc_g = fmaf(dyv, xh, acc_g);
            acc_b += dyv;
        }
    }
    part_g[ty][tx] = acc_g;
    part_b[ty][tx] = acc_b;
    __syncthreads();
    if (ty == 0 && j < cols) {
        float tg = part_g[0][tx], tb = part_b[0][tx];
#pragma unroll
        for (int q = 1; q < 8; ++q) {
            tg += part_g[q][tx];
            tb += part_b[q][tx];
        }
        if (p.splits == 1u) {
            rf_store_dyn(p.dgamma, p.dg_dt, j, tg);
            rf_store_dyn(p.dbeta, p.db_dt, j, tb);
        } else {
            float* ws = reinterpret_cast<float*>(p.ws);
            ws[s * cols + j] = tg;
            ws[(p.splits + s) * cols + j] = tb;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) ln_bwd_param_finish(const LnParams p) {
    const unsigned cols = p.tokens * p.d;
    const unsigned j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) {
        return;
    }
    const float* ws = reinterpret_cast<const float*>(p.ws);
    float tg = 0.0f, tb = 0.0f;
    for (unsigned s = 0; s < p.splits; ++s) {
        tg += ws[s * cols + j];
        tb += ws[(p.splits + s) * cols + j];
    }
    rf_store_dyn(p.dgamma, p.dg_dt, j, tg);
    rf_store_dyn(p.dbeta, p.db_dt, j, tb);
}
