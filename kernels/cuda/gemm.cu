// recfuse GEMM core: one strided, batched GEMM with a fused epilogue (src/ops/gemm.rs).
//
// Math, for g < batch, i < m, j < n (f32 accumulation whatever the storage dtypes):
//     acc        = Σ_k A(g,i,k) · B(g,k,j)
//     z          = alpha · acc + bias[g·bias_bs + j]                 (bias optional)
//     pre(g,i,j) = z                                                 (pre optional)
//     y          = act(z) + residual(g,i,j) + [accumulate] C(g,i,j)  (old C read first)
//     C(g,i,j)   = y, rounded to C's dtype (round to nearest even for bf16/f16)
// X(g,i,j) is element off + g·bs + i·rs + j·cs of its tensor (a MatView), so x·Wᵀ, dZ·W and
// dZᵀ·X all run without a transpose in memory. Every element index the kernel forms is one
// the host proved to be < the tensor's element count ≤ 2^31 − 1, so 32-bit unsigned index
// arithmetic is exact; rows/cols beyond m, n, k never form an address.
//
// Variants (selected by -D defines; the host lists them in `compile_variants()`):
//   A_DT, B_DT   storage dtype codes of A and B (0 f32, 1 bf16, 2 f16), compiled in because
//                they are read K/64 (or K/128) times per output; the dtypes of C, bias,
//                residual and pre are runtime fields, touched once per output element.
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
//   Occupancy (ptxas, sm_90, NVRTC 13.0): 128 registers for bf16/f16 → 2 blocks (16 warps) per
//   SM; 167 for tf32 → 1 block per SM. gemm_ffma: 64 registers, 8.5 KiB shared → 4 blocks.
//
// Epilogue (both kernels): `gemm_epilogue` below, once per output element, bounds-checked.

#ifndef A_DT
#error "A_DT (dtype code of A) must be defined"
#endif
#ifndef B_DT
#error "B_DT (dtype code of B) must be defined"
#endif
#ifndef GEMM_MMA
#error "GEMM_MMA (0 ffma, 1 bf16 mma, 2 f16 mma, 3 tf32 mma) must be defined"
#endif

// Mirrors `GemmParams` in src/cuda/gemm.rs field for field (#[repr(C)], 144 bytes).
struct GemmParams {
    unsigned long long a, b, c, bias, residual, pre;  // device addresses; 0 = absent
    unsigned m, n, k, batch;
    unsigned a_off, a_rs, a_cs, a_bs;
    unsigned b_off, b_rs, b_cs, b_bs;
    unsigned c_off, c_rs, c_cs, c_bs;  // C, residual and pre share this layout
    unsigned bias_bs;
    float alpha;
    unsigned act;    // RF_ACT_*
    unsigned flags;  // GEMM_FLAG_*
    unsigned c_dt, bias_dt, res_dt, pre_dt;
};
static_assert(sizeof(GemmParams) == 144, "GemmParams layout must match the host");

#define GEMM_FLAG_ACCUMULATE 1u

__device__ __forceinline__ void gemm_epilogue(const GemmParams& p, unsigned g, unsigned i,
                                              unsigned j, float acc) {
    const unsigned idx = p.c_off + g * p.c_bs + i * p.c_rs + j * p.c_cs;
    float z = p.alpha * acc;
    if (p.bias) {
        z += rf_load_dyn(p.bias, p.bias_dt, g * p.bias_bs + j);
    }
    if (p.pre) {
        rf_store_dyn(p.pre, p.pre_dt, idx, z);
    }
    float y = rf_act(p.act, z);
    if (p.residual) {
        y += rf_load_dyn(p.residual, p.res_dt, idx);
    }
    if (p.flags & GEMM_FLAG_ACCUMULATE) {
        y += rf_load_dyn(p.c, p.c_dt, idx);
    }
    rf_store_dyn(p.c, p.c_dt, idx, y);
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

#pragma unroll
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned r = row0 + ty * 4u + i;
#pragma unroll
        for (unsigned j = 0; j < 4; ++j) {
            const unsigned c = col0 + tx * 4u + j;
            if (r < p.m && c < p.n) {
                gemm_epilogue(p, g, r, c, acc[i][j]);
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

#pragma unroll
    for (unsigned mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (unsigned ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (unsigned q = 0; q < 4; ++q) {
                const unsigned r = row0 + wm * 64u + mi * 16u + gq + (q >> 1) * 8u;
                const unsigned c = col0 + wn * 32u + ni * 8u + tq * 2u + (q & 1u);
                if (r < p.m && c < p.n) {
                    gemm_epilogue(p, g, r, c, acc[mi][ni][q]);
                }
            }
        }
    }
}
#endif
