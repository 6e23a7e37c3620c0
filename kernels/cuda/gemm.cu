// recfuse GEMM core: one strided, batched GEMM with a fused epilogue (src/ops/gemm.rs).
//
// Math, for g < batch, i < m, j < n (f32 accumulation whatever the storage dtypes):
//     acc        = Σ_k A(g,i,k) · B(g,k,j)
//     z(j)       = alpha · acc + bias[g·bias_bs + j]                 (bias optional; the
//                  host offsets the bias address for a run starting past weight set 0)
//     pre(g,i,j) = z(j), at pre_view                                 (pre optional)
//     y          = act(z(j)) · mul(g,i,j) + residual(g,i,j) + [accumulate] C(g,i,j)
//     C(g,i,j)   = y, rounded to C's dtype (round to nearest even for bf16/f16)
// (mul defaults to 1, residual to 0; the old C is read before it is written.)
// Gated (GEMM_FLAG_GATED, the GDCN cross layer; act = none, n even): the GEMM columns come in
// (cross, gate) pairs (2j, 2j+1) of interleaved packed weights, and only n/2 outputs exist:
//     y(g,i,j)   = mul(g,i,j) · z(2j) · σ(z(2j+1)) + residual(g,i,j) + [accumulate] C(g,i,j)
// for j < n/2. pre still receives all n columns (through pre_view); C, mul and residual are
// indexed at column j through c_view.
// X(g,i,j) is element off + g·bs + i·rs + j·cs of its tensor (a MatView), so x·Wᵀ, dZ·W and
// dZᵀ·X all run without a transpose in memory. Every element index the kernel forms is one
// the host proved to be < the tensor's element count ≤ 2^31 − 1, so 32-bit unsigned index
// arithmetic is exact; rows/cols beyond m, n, k never form an address.
//
// Column pairs: in both kernels every thread's accumulators cover whole column pairs
// (2j, 2j+1) of one row, so the gated epilogue needs no data exchange between threads:
//   gemm_ffma  thread (tx, ty) owns columns col0 + 4tx .. col0 + 4tx + 3, i.e. the two pairs
//              starting at col0 + 4tx and col0 + 4tx + 2 (col0 is a multiple of 64);
//   gemm_mma   the m16n8 C fragment gives lane (g, t) the columns 2t and 2t+1 of an n8 tile
//              (d0, d1 in row g; d2, d3 in row g+8), and every n8 tile starts at an even
//              column, so (d0, d1) and (d2, d3) are each exactly one pair.
// `gemm_epilogue_pair` below therefore takes the accumulators of columns (c, c+1), c even:
// gated, it writes output j = c/2; otherwise it is the plain epilogue for columns c and c+1
// (the latter only when c + 1 < n: a plain n may be odd). Because n is even when gated,
// c < n implies c + 1 < n there.
// Index arithmetic to keep parallel with the WGSL twin (kernels/wgsl/gemm.wgsl) and the CPU
// (src/cpu/fast.rs::gemm): z columns 2j, 2j+1 -> pre at pre_view(g,i,2j), pre_view(g,i,2j+1);
// output j -> C, mul, residual at c_view(g,i,j).
//
// Variants (selected by -D defines; the host lists them in `compile_variants()`):
//   A_DT, B_DT   storage dtype codes of A and B (0 f32, 1 bf16, 2 f16), compiled in because
//                they are read K/64 (or K/128) times per output; the dtypes of C, bias,
//                mul, residual and pre are runtime fields, touched once per output element.
//   GEMM_MMA = 0 `gemm_ffma`: f32 FFMA tiles, any A/B dtype mix (converted on load).
//   GEMM_MMA = 1 `gemm_mma` with mma.sync m16n8k16 bf16 (A_DT = B_DT = 1).
//   GEMM_MMA = 2 `gemm_mma` with mma.sync m16n8k16 f16  (A_DT = B_DT = 2).
//   GEMM_MMA = 3 `gemm_mma` with mma.sync m16n8k8 tf32  (A_DT = B_DT = 0, opt-in).
//
// gemm_ffma — geometry shared with the WGSL twin (kernels/wgsl/gemm.wgsl):
//   block tile 64×64, BK = 16, 256 threads as 16×16; thread (tx, ty) owns the 4×4 micro-tile
//   rows ty·4..ty·4+3, cols tx·4..tx·4+3. grid = (⌈m/64⌉, ⌈n/64⌉, batch).
//   A and B tiles are staged in shared memory k-major (As[k][m], Bs[k][n]) so each thread
//   reads its 4 rows / 4 cols as one float4. Global loads walk whichever of the two tile axes
//   has stride 1 in memory, so both x·Wᵀ (k contiguous) and dZᵀ·X (m contiguous) coalesce.
//   Traffic: per 16-deep k step a block loads 2·64·16 elements and issues 64·64·16 FMAs, i.e.
//   16 FLOP per f32 byte from global (L2), so A is read ⌈n/64⌉ times and B ⌈m/64⌉ times in
//   total; from shared memory each thread does 16 FMAs per 8 floats read.
//
// gemm_mma — 128×128 block tile, BK = 32 elements (16-bit) or 16 (tf32), i.e. 16 32-bit
//   words along k in both cases. 256 threads = 8 warps as 2 (m) × 4 (n); each warp owns a
//   64×32 sub-tile = 4×4 MMA tiles of 16×8, 64 f32 accumulators per thread.
//   Shared memory holds A as As[m][kword] and B as Bs[n][kword] (k contiguous for both, which
//   is what the row.col fragments want), one 32-bit word per pair of 16-bit elements or per
//   tf32 value, rows padded 16 → 20 words: fragment loads at word g·20 + t hit 32 distinct
//   banks (g·20 mod 32 = 0, 20, 8, 28, 16, 4, 24, 12). 2·128·20·4 = 20 KiB static shared.
//   No cp.async pipeline or ldmatrix yet: loads are plain, bounds-checked and converted once
//   (tf32 rounding, 16-bit packing) on the way into shared memory.
//   Traffic: A is read ⌈n/128⌉ times, B ⌈m/128⌉ times; per k-word step a warp issues 16 MMAs
//   for 4 A + 4 B fragment loads (24 LDS.32 per thread).
//   Occupancy (ptxas, sm_90, NVRTC 13.0, with the pair epilogue; tests/cuda_compile.rs prints
//   the current numbers): 128 registers for bf16, f16 and tf32 → 2 blocks (16 warps) per SM
//   (tf32 used 167, i.e. 1 block, with the earlier per-element epilogue). gemm_ffma: 48
//   registers (12288 per block), 8.5 KiB shared → 5 blocks (40 warps) per SM.
//
// gemm_mma_v2 — version 2 of gemm_mma for 16-bit operands (GEMM_MMA 1, 2), selected by the
//   host (RECFUSE_GEMM_MMA_VERSION=2; default 1 until an H200 run has raced them) when both
//   operands have k contiguous and 16-byte aligned rows (offsets, row and batch strides
//   multiples of 8 elements): otherwise the host keeps version 1, the scalar fallback.
//   Same 128×128 block tile, 8 warps as 2 × 4, warp tile 64×32, same epilogue; BK = 32.
//   Global → shared by cp.async.cg 16-byte chunks (8 elements), zero-filled past m, n and k,
//   in a 3-stage pipeline (wait_group 1: tile kt lands while kt+1 is in flight and kt+2 is
//   issued). Shared rows are 64 B = 4 chunks, chunk c of row r stored at c ^ ((r >> 1) & 3):
//   the 8 row addresses of one ldmatrix phase then cover all 32 banks (rows r, r+1 differ by
//   16 words; the XOR spreads the four row pairs over the four chunk columns). Fragments come
//   from ldmatrix.x4 (A: one m16k16 tile; B: two n8k16 tiles per instruction).
//   Per k-tile and warp: 4 ldmatrix.x4 (A) + 2 ldmatrix.x4 (B) per k16 step for 16 MMAs,
//   against 32 + 16 LDS.32 in version 1; global loads are 2 × 16 B per thread and operand
//   instead of 8 × 2 scalar 16-bit loads. 3 · 2 · 128 · 64 B = 48 KiB static shared (4 blocks
//   per SM) and 98 registers (ptxas, NVRTC 13.0) → 2 blocks (16 warps) per SM, as version 1:
//   the limiter moves from LSU issue to tensor-core issue and latency.
//   Predicted (not measured: no GPU run yet): ~45–60% of the bf16 dense peak (~989 TFLOP/s)
//   on large aligned GEMMs, against an estimated 15–30% for version 1 (docs/BENCHMARKS.md).
//
// Epilogue (both kernels): `gemm_epilogue_pair` below, once per column pair, bounds-checked.
// The gated flag, bias, mul, residual and pre are runtime (block-uniform) switches, not
// variants: the epilogue runs once per output and its branches cost nothing next to the
// memory traffic, while compiling them in would multiply the 12 variants. Epilogue traffic
// per row of C: pre n elements written; C written (and read when accumulating), mul and
// residual read, n/2 elements each when gated, n otherwise. In gemm_mma one epilogue step of
// a warp covers 8 rows × 4 column pairs: gated, 4 consecutive outputs per row (16 B of f32);
// plain, 8 consecutive columns per row. Partial coalescing in both cases (no smem restage).

#ifndef A_DT
#error "A_DT (dtype code of A) must be defined"
#endif
#ifndef B_DT
#error "B_DT (dtype code of B) must be defined"
#endif
#ifndef GEMM_MMA
#error "GEMM_MMA (0 ffma, 1 bf16 mma, 2 f16 mma, 3 tf32 mma) must be defined"
#endif

// Mirrors `GemmParams` in src/cuda/gemm.rs field for field (#[repr(C)], 176 bytes).
struct GemmParams {
    unsigned long long a, b, c, bias, residual, pre, mul;  // device addresses; 0 = absent
    unsigned m, n, k, batch;
    unsigned a_off, a_rs, a_cs, a_bs;
    unsigned b_off, b_rs, b_cs, b_bs;
    unsigned c_off, c_rs, c_cs, c_bs;          // C, mul and residual share this layout
    unsigned pre_off, pre_rs, pre_cs, pre_bs;  // pre (n columns even when gated)
    unsigned bias_bs;
    float alpha;
    unsigned act;    // RF_ACT_*
    unsigned flags;  // GEMM_FLAG_*
    unsigned c_dt, bias_dt, res_dt, pre_dt, mul_dt;
    unsigned pad_;
};
static_assert(sizeof(GemmParams) == 176, "GemmParams layout must match the host");

#define GEMM_FLAG_ACCUMULATE 1u
#define GEMM_FLAG_GATED 2u

// z of GEMM column `col` in row i (alpha, bias), stored to pre when asked for.
__device__ __forceinline__ float gemm_z(const GemmParams& p, unsigned g, unsigned i,
                                        unsigned col, float acc) {
    float z = p.alpha * acc;
    if (p.bias) {
        z += rf_load_dyn(p.bias, p.bias_dt, g * p.bias_bs + col);
    }
    if (p.pre) {
        rf_store_dyn(p.pre, p.pre_dt, p.pre_off + g * p.pre_bs + i * p.pre_rs + col * p.pre_cs,
                     z);
    }
    return z;
}

// y = v · mul + residual + [accumulate] C at output (g, i, j) of c_view, then C = y.
__device__ __forceinline__ void gemm_store(const GemmParams& p, unsigned g, unsigned i,
                                           unsigned j, float y) {
    const unsigned idx = p.c_off + g * p.c_bs + i * p.c_rs + j * p.c_cs;
    if (p.mul) {
        y *= rf_load_dyn(p.mul, p.mul_dt, idx);
    }
    if (p.residual) {
        y += rf_load_dyn(p.residual, p.res_dt, idx);
    }
    if (p.flags & GEMM_FLAG_ACCUMULATE) {
        y += rf_load_dyn(p.c, p.c_dt, idx);
    }
    rf_store_dyn(p.c, p.c_dt, idx, y);
}

// The epilogue of GEMM columns c and c+1 of row i (the caller checks i < m and c < n; c is
// even). Gated: output c/2 = z(c)·σ(z(c+1)) (c + 1 < n because n is even). Plain: outputs c
// and, if c + 1 < n, c + 1.
__device__ __forceinline__ void gemm_epilogue_pair(const GemmParams& p, unsigned g, unsigned i,
                                                   unsigned c, float acc0, float acc1) {
    const float z0 = gemm_z(p, g, i, c, acc0);
    if (p.flags & GEMM_FLAG_GATED) {
        const float z1 = gemm_z(p, g, i, c + 1u, acc1);
        gemm_store(p, g, i, c >> 1, z0 * rf_act(RF_ACT_SIGMOID, z1));
    } else {
        gemm_store(p, g, i, c, rf_act(p.act, z0));
        if (c + 1u < p.n) {
            gemm_store(p, g, i, c + 1u, rf_act(p.act, gemm_z(p, g, i, c + 1u, acc1)));
        }
    }
}

#if GEMM_MMA == 0
// ---------------------------------------------------------------------------------------------
// gemm_ffma

#define FF_BM 64
#define FF_BN 64
#define FF_BK 16
// +4 floats per row: keeps float4 alignment and spreads the k-major tile stores over banks.
#define FF_PAD 4

extern "C" __global__ void __launch_bounds__(256) gemm_ffma(const GemmParams p) {
    __shared__ __align__(16) float As[FF_BK][FF_BM + FF_PAD];
    __shared__ __align__(16) float Bs[FF_BK][FF_BN + FF_PAD];

    const unsigned tx = threadIdx.x;
    const unsigned ty = threadIdx.y;
    const unsigned tid = ty * 16u + tx;
    const unsigned g = blockIdx.z;
    const unsigned row0 = blockIdx.x * FF_BM;
    const unsigned col0 = blockIdx.y * FF_BN;
    const void* A = reinterpret_cast<const void*>(p.a);
    const void* B = reinterpret_cast<const void*>(p.b);
    const unsigned a_base = p.a_off + g * p.a_bs;
    const unsigned b_base = p.b_off + g * p.b_bs;
    // Let consecutive threads walk the axis that is contiguous in memory.
    const bool a_walk_k = p.a_cs == 1u || p.a_rs != 1u;
    const bool b_walk_n = p.b_cs == 1u || p.b_rs != 1u;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    for (unsigned k0 = 0; k0 < p.k; k0 += FF_BK) {
#pragma unroll
        for (unsigned l = 0; l < 4; ++l) {
            const unsigned e = tid + l * 256u;
            const unsigned mi = a_walk_k ? e / FF_BK : e % FF_BM;
            const unsigned ki = a_walk_k ? e % FF_BK : e / FF_BM;
            const unsigned gi = row0 + mi;
            const unsigned gk = k0 + ki;
            float v = 0.0f;
            if (gi < p.m && gk < p.k) {
                v = rf_load_f32<A_DT>(A, a_base + gi * p.a_rs + gk * p.a_cs);
            }
            As[ki][mi] = v;
        }
#pragma unroll
        for (unsigned l = 0; l < 4; ++l) {
            const unsigned e = tid + l * 256u;
            const unsigned ni = b_walk_n ? e % FF_BN : e / FF_BK;
            const unsigned ki = b_walk_n ? e / FF_BN : e % FF_BK;
            const unsigned gk = k0 + ki;
            const unsigned gj = col0 + ni;
            float v = 0.0f;
            if (gk < p.k && gj < p.n) {
                v = rf_load_f32<B_DT>(B, b_base + gk * p.b_rs + gj * p.b_cs);
            }
            Bs[ki][ni] = v;
        }
        __syncthreads();

#pragma unroll
        for (unsigned kk = 0; kk < FF_BK; ++kk) {
            const float4 a4 = *reinterpret_cast<const float4*>(&As[kk][ty * 4u]);
            const float4 b4 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4u]);
            const float a[4] = {a4.x, a4.y, a4.z, a4.w};
            const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

    // Columns col0 + 4tx + {0, 1} and {2, 3}: two whole pairs (col0 + 4tx is even).
#pragma unroll
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned r = row0 + ty * 4u + i;
#pragma unroll
        for (unsigned jp = 0; jp < 2; ++jp) {
            const unsigned c = col0 + tx * 4u + jp * 2u;
            if (r < p.m && c < p.n) {
                gemm_epilogue_pair(p, g, r, c, acc[i][2 * jp], acc[i][2 * jp + 1]);
            }
        }
    }
}

#else
// ---------------------------------------------------------------------------------------------
// gemm_mma

#if GEMM_MMA == 1
static_assert(A_DT == RF_BF16 && B_DT == RF_BF16, "bf16 MMA needs bf16 A and B");
#define MM_ELEMS_PER_WORD 2
#elif GEMM_MMA == 2
static_assert(A_DT == RF_F16 && B_DT == RF_F16, "f16 MMA needs f16 A and B");
#define MM_ELEMS_PER_WORD 2
#elif GEMM_MMA == 3
static_assert(A_DT == RF_F32 && B_DT == RF_F32, "tf32 MMA needs f32 A and B");
#define MM_ELEMS_PER_WORD 1
#else
#error "unknown GEMM_MMA"
#endif

#define MM_BM 128
#define MM_BN 128
#define MM_KW 16                              // 32-bit words along k per tile
#define MM_BK (MM_KW * MM_ELEMS_PER_WORD)     // elements along k per tile
#define MM_LDW (MM_KW + 4)                    // padded row length in words

// One shared-memory word: elements k and k+1 (16-bit, the smaller k in the low half) or one
// tf32 value, zero where (row, k) falls outside the matrix.
template <int DT>
__device__ __forceinline__ unsigned mm_load_word(const void* base, unsigned idx, unsigned k_stride,
                                                 bool row_ok, unsigned gk, unsigned kdim) {
    if constexpr (DT == RF_F32) {
        return (row_ok && gk < kdim) ? rf_f32_to_tf32(rf_load_f32<RF_F32>(base, idx)) : 0u;
    } else {
        const unsigned lo = (row_ok && gk < kdim) ? rf_load_bits16(base, idx) : 0u;
        const unsigned hi = (row_ok && gk + 1u < kdim) ? rf_load_bits16(base, idx + k_stride) : 0u;
        return lo | (hi << 16);
    }
}

__device__ __forceinline__ void mm_mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                       unsigned a3, unsigned b0, unsigned b1) {
#if GEMM_MMA == 1
    rf_mma_bf16_16816(d, a0, a1, a2, a3, b0, b1);
#elif GEMM_MMA == 2
    rf_mma_f16_16816(d, a0, a1, a2, a3, b0, b1);
#else
    rf_mma_tf32_1688(d, a0, a1, a2, a3, b0, b1);
#endif
}

// The warp tile's epilogue (both gemm_mma versions): fragment (d0, d1) is row gq, columns
// (2tq, 2tq+1) of the n8 tile; (d2, d3) the same columns of row gq + 8: one whole column pair
// each (the tile's first column is even). r0 / c0: this lane's first row and column.
__device__ __forceinline__ void mm_epilogue(const GemmParams& p, unsigned g, unsigned r0,
                                            unsigned c0, const float (&acc)[4][4][4]) {
#pragma unroll
    for (unsigned mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (unsigned ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (unsigned h = 0; h < 2; ++h) {
                const unsigned r = r0 + mi * 16u + h * 8u;
                const unsigned c = c0 + ni * 8u;
                if (r < p.m && c < p.n) {
                    gemm_epilogue_pair(p, g, r, c, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gemm_mma(const GemmParams p) {
    __shared__ __align__(16) unsigned As[MM_BM * MM_LDW];
    __shared__ __align__(16) unsigned Bs[MM_BN * MM_LDW];

    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31u;
    const unsigned warp = tid >> 5;
    const unsigned wm = warp & 1u;   // warp row: 64 rows each
    const unsigned wn = warp >> 1;   // warp col: 32 cols each
    const unsigned gq = lane >> 2;   // PTX "groupID"
    const unsigned tq = lane & 3u;   // PTX "threadID_in_group"
    const unsigned g = blockIdx.z;
    const unsigned row0 = blockIdx.x * MM_BM;
    const unsigned col0 = blockIdx.y * MM_BN;
    const void* A = reinterpret_cast<const void*>(p.a);
    const void* B = reinterpret_cast<const void*>(p.b);
    const unsigned a_base = p.a_off + g * p.a_bs;
    const unsigned b_base = p.b_off + g * p.b_bs;
    const bool a_walk_k = p.a_cs == 1u || p.a_rs != 1u;
    const bool b_walk_k = p.b_rs == 1u && p.b_cs != 1u;

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                acc[mi][ni][q] = 0.0f;
            }
        }
    }

    for (unsigned k0 = 0; k0 < p.k; k0 += MM_BK) {
        // 128 rows × 16 words per operand = 2048 words, 8 per thread.
#pragma unroll
        for (unsigned l = 0; l < 8; ++l) {
            const unsigned e = tid + l * 256u;
            const unsigned mi = a_walk_k ? e / MM_KW : e % MM_BM;
            const unsigned wi = a_walk_k ? e % MM_KW : e / MM_BM;
            const unsigned gi = row0 + mi;
            const unsigned gk = k0 + wi * MM_ELEMS_PER_WORD;
            const bool ok = gi < p.m;
            const unsigned idx = ok && gk < p.k ? a_base + gi * p.a_rs + gk * p.a_cs : 0u;
            As[mi * MM_LDW + wi] = mm_load_word<A_DT>(A, idx, p.a_cs, ok, gk, p.k);
        }
#pragma unroll
        for (unsigned l = 0; l < 8; ++l) {
            const unsigned e = tid + l * 256u;
            const unsigned ni = b_walk_k ? e / MM_KW : e % MM_BN;
            const unsigned wi = b_walk_k ? e % MM_KW : e / MM_BN;
            const unsigned gj = col0 + ni;
            const unsigned gk = k0 + wi * MM_ELEMS_PER_WORD;
            const bool ok = gj < p.n;
            const unsigned idx = ok && gk < p.k ? b_base + gk * p.b_rs + gj * p.b_cs : 0u;
            Bs[ni * MM_LDW + wi] = mm_load_word<B_DT>(B, idx, p.b_rs, ok, gk, p.k);
        }
        __syncthreads();

#pragma unroll
        for (unsigned kw = 0; kw < MM_KW; kw += 8u) {
            unsigned bf[4][2];
#pragma unroll
            for (unsigned ni = 0; ni < 4; ++ni) {
                const unsigned* brow = &Bs[(wn * 32u + ni * 8u + gq) * MM_LDW + kw];
                bf[ni][0] = brow[tq];
                bf[ni][1] = brow[tq + 4u];
            }
#pragma unroll
            for (unsigned mi = 0; mi < 4; ++mi) {
                const unsigned* arow = &As[(wm * 64u + mi * 16u + gq) * MM_LDW + kw];
                const unsigned a0 = arow[tq];
                const unsigned a1 = arow[8u * MM_LDW + tq];
                const unsigned a2 = arow[tq + 4u];
                const unsigned a3 = arow[8u * MM_LDW + tq + 4u];
#pragma unroll
                for (unsigned ni = 0; ni < 4; ++ni) {
                    mm_mma(acc[mi][ni], a0, a1, a2, a3, bf[ni][0], bf[ni][1]);
                }
            }
        }
        __syncthreads();
    }

    mm_epilogue(p, g, row0 + wm * 64u + gq, col0 + wn * 32u + tq * 2u, acc);
}
#endif

#if GEMM_MMA == 1 || GEMM_MMA == 2
#define V2_BK 32         // elements along k per tile: 64 B = 4 chunks of 16 B per row
#define V2_STAGES 3
#define V2_ROW_U16 32    // a shared row holds one tile row's 32 elements

// Element offset of chunk `c` (0..3) of row `r` in a [128][32] u16 stage, XOR-swizzled.
__device__ __forceinline__ unsigned v2_at(unsigned r, unsigned c) {
    return r * V2_ROW_U16 + ((c ^ ((r >> 1) & 3u)) << 3);
}

__device__ __forceinline__ void v2_cp16(unsigned short* dst, const unsigned short* src,
                                        unsigned bytes) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(bytes));
}

// Issues the copies of k-tile `kt` of A (rows row0..+127) and B (columns col0..+127) into
// `as` / `bs`: 2 chunks per thread and operand; rows past m / n and k past its end read 0 bytes
// (zero fill), with the operand base as a harmless aligned address.
__device__ __forceinline__ void v2_load(const GemmParams& p, unsigned short* as,
                                        unsigned short* bs, unsigned kt, unsigned row0,
                                        unsigned col0, unsigned a_base, unsigned b_base) {
    const unsigned short* A = reinterpret_cast<const unsigned short*>(p.a);
    const unsigned short* B = reinterpret_cast<const unsigned short*>(p.b);
#pragma unroll
    for (unsigned l = 0; l < 2; ++l) {
        const unsigned e = threadIdx.x + l * 256u;
        const unsigned r = e >> 2, c = e & 3u;
        const unsigned gk = kt * V2_BK + c * 8u;
        const unsigned kb = gk < p.k ? min(16u, (p.k - gk) * 2u) : 0u;
        const unsigned gi = row0 + r, gj = col0 + r;
        const bool a_ok = gi < p.m && kb > 0u, b_ok = gj < p.n && kb > 0u;
        v2_cp16(as + v2_at(r, c), a_ok ? A + a_base + gi * p.a_rs + gk : A, a_ok ? kb : 0u);
        v2_cp16(bs + v2_at(r, c), b_ok ? B + b_base + gj * p.b_cs + gk : B, b_ok ? kb : 0u);
    }
}

extern "C" __global__ void __launch_bounds__(256) gemm_mma_v2(const GemmParams p) {
    __shared__ __align__(128) unsigned short As[V2_STAGES][128 * V2_ROW_U16];
    __shared__ __align__(128) unsigned short Bs[V2_STAGES][128 * V2_ROW_U16];

    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31u;
    const unsigned warp = tid >> 5;
    const unsigned wm = warp & 1u;
    const unsigned wn = warp >> 1;
    const unsigned gq = lane >> 2;
    const unsigned tq = lane & 3u;
    const unsigned g = blockIdx.z;
    const unsigned row0 = blockIdx.x * 128u;
    const unsigned col0 = blockIdx.y * 128u;
    const unsigned a_base = p.a_off + g * p.a_bs;
    const unsigned b_base = p.b_off + g * p.b_bs;
    const unsigned ktiles = (p.k + V2_BK - 1u) / V2_BK;

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                acc[mi][ni][q] = 0.0f;
            }
        }
    }

    // Prologue: tiles 0 .. STAGES-2 in flight (a group per tile, empty past the end).
#pragma unroll
    for (unsigned s = 0; s + 1u < V2_STAGES; ++s) {
        if (s < ktiles) v2_load(p, As[s], Bs[s], s, row0, col0, a_base, b_base);
        asm volatile("cp.async.commit_group;");
    }
    for (unsigned kt = 0; kt < ktiles; ++kt) {
        asm volatile("cp.async.wait_group 1;");  // tile kt has landed (this thread's copies)
        __syncthreads();  // ... and every thread's; stage (kt-1) % 3 is no longer read
        const unsigned nt = kt + V2_STAGES - 1u;
        if (nt < ktiles) {
            v2_load(p, As[nt % V2_STAGES], Bs[nt % V2_STAGES], nt, row0, col0, a_base, b_base);
        }
        asm volatile("cp.async.commit_group;");
        const unsigned short* as = As[kt % V2_STAGES];
        const unsigned short* bs = Bs[kt % V2_STAGES];
#pragma unroll
        for (unsigned kc = 0; kc < 4u; kc += 2u) {  // two k16 steps: chunks (0,1), (2,3)
            unsigned bf[4][2];
#pragma unroll
            for (unsigned np = 0; np < 2; ++np) {
                // Matrices: (n 0-7, chunk kc), (n 0-7, kc+1), (n 8-15, kc), (n 8-15, kc+1).
                const unsigned r = wn * 32u + np * 16u + (lane >> 4) * 8u + (lane & 7u);
                const unsigned c = kc + ((lane >> 3) & 1u);
                const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(bs + v2_at(r, c)));
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(bf[2 * np][0]), "=r"(bf[2 * np][1]), "=r"(bf[2 * np + 1][0]),
                               "=r"(bf[2 * np + 1][1])
                             : "r"(addr));
            }
#pragma unroll
            for (unsigned mi = 0; mi < 4; ++mi) {
                // Matrices: (rows 0-7, kc), (rows 8-15, kc), (rows 0-7, kc+1), (rows 8-15, kc+1).
                const unsigned r = wm * 64u + mi * 16u + (lane & 15u);
                const unsigned c = kc + (lane >> 4);
                const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(as + v2_at(r, c)));
                unsigned a0, a1, a2, a3;
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3)
                             : "r"(addr));
#pragma unroll
                for (unsigned ni = 0; ni < 4; ++ni) {
                    mm_mma(acc[mi][ni], a0, a1, a2, a3, bf[ni][0], bf[ni][1]);
                }
            }
        }
    }
    asm volatile("cp.async.wait_all;");  // only empty groups remain; retire them

    mm_epilogue(p, g, row0 + wm * 64u + gq, col0 + wn * 32u + tq * 2u, acc);
}
#endif

