// recfuse fused in-batch softmax (src/ops/inbatch_softmax.rs, spec
// shared/spec/inbatch_softmax.md): forward statistics, query gradients, candidate gradients.
// The B×N logit matrix is never stored: every kernel recomputes 64×64 logit tiles from the
// embeddings and consumes them on the spot. CPU semantics: src/cpu/softmax.rs.
//
// Math (one device's B rows over N columns; f32 arithmetic for every storage dtype):
//   û_i = u_i / max(‖u_i‖, ε),  v̂_j = v_j / max(‖v_j‖, ε)      (only with IBS_L2; else û = u)
//   dot_ij = ⟨û_i, v̂_j⟩          s_ij = κ·dot_ij − lq_j           (lq = 0 without IBS_LOGQ)
//   j ∈ D_i  ⇔  row i active (target t = t(i) ≠ IBS_NONE) and valid_j and
//               (j = t  or  (id_j ≠ id_t  and  not (cq_j ≥ 0 and cq_j = rq_i)))
//              (the id test only with IBS_IDS, the query-id test only with IBS_QID)
//   Base 2 with log2(e) folded into κ: x_ij = dot_ij·κ₂ − lq_j·log2 e, κ₂ = κ·log2 e, so
//   x_ij = s_ij·log2 e and LSE_i = ln 2·(m_i + log2 Σ_{j∈D_i} 2^(x_ij − m_i)).
//   forward:  LSE_i (−∞ for an inactive row), s_i,t(i) = κ·dot_i,t − lq_t (0 when inactive).
//   backward: P_ij = 1[j∈D_i]·2^(x_ij − LSE_i·log2 e),  G_ij = a_i·(P_ij − δ_j,t(i))
//             (G_i· = 0 for an inactive row or a_i = 0)
//             ∂L/∂û_i = κ·Σ_j G_ij v̂_j   ∂L/∂v̂_j = κ·Σ_i G_ij û_i   dκ_i = Σ_j G_ij dot_ij
//             L2 backward on what is returned: g ← (g − û⟨û, g⟩)/n, or g/ε where n = ε
//             (n = max(‖·‖, ε), the clamped norm).
//
// Layouts: q [B, d] (dtype Q_DT), c [N, d] (C_DT), both row-major with d contiguous. Host
// metadata, uploaded per call: target u32 [B] (IBS_NONE = 0xFFFFFFFF: inactive; otherwise
// < N, and valid, checked on the host), coef f32 [B] (a_i), lse f32 [B], row_qid i64 [B],
// log_q f32 [N], ids i64 [N], valid u8 [N], col_qid i64 [N] (the optional ones absent as 0
// addresses with their flag clear). Norms f32: qnorm [B], cnorm [col_hi − col_lo] (column j at
// j − col_lo). Outputs f32: lse/s_target [B]; out [E, d] (dq: E = B; dc: E = col_hi − col_lo,
// column j at row j − col_lo); dk [B]. All element indices are < 2^31 (checked on the host:
// B·d, N·d, splits·E·d ≤ 2^31 − 1), so 32-bit unsigned index arithmetic is exact.
//
// Launch geometry. Tile kernels: 256 threads (tx = tid & 15, ty = tid >> 4); a block owns one
// 64-wide tile of the "owned" axis (grid.x) and loops over tiles_per_split consecutive 64-wide
// tiles of the other axis (grid.y = splits: the looped axis split across blocks so that a small
// B, or a small column range, still fills the GPU; the split count depends on the shape only).
//   ibs_forward     owned rows, looped columns [0, N). Per column tile:
//     (1) logit tile: thread (tx, ty) accumulates dot for rows ty·4..ty·4+3 × columns
//         tx·4..tx·4+3, d streamed in chunks of 16 through shared memory (As[k][row],
//         Bs[k][col], k-major, padded 64 → 68 floats, read as float4), inputs converted to
//         f32 and multiplied by 1/n (L2) on the way in;
//     (2) mask + online log-sum-exp: per row and thread a running (max m, sum s) in f32 over
//         its columns (one exp2 per logit, one per row per tile for the rescale); the target
//         logit's owner writes s_target.
//     End: the 16 threads of a row (a half-warp) combine their (m, s) with a fixed xor tree;
//     (m, s) for (split, row) goes to ws (float2 [splits, B]).
//   ibs_combine     one thread per row combines the splits' (m, s) in split order → LSE.
//   ibs_grad_rows   owned rows, looped columns [0, N): (1) as forward; (2) G tile → shared
//     Gs[col][row] (16 KiB), dκ partials per thread; (3) dQ̂_blk += G·V̂_tile: for each 64-wide
//     chunk of d, thread (tx, ty) accumulates rows ty·4.. × features tx·4.. with the 64 columns
//     streamed in chunks of 16 (Bs[col][feature] staged, Gs read as float4), then adds its 4×4
//     into ws (f32 [splits, B, d]; the block's own slice, read-modify-write by the same thread
//     each time: deterministic, no atomics). End: dκ per row (fixed xor tree) → dk_ws.
//   ibs_grad_cols   owned columns [col_lo, col_hi), looped rows [0, B): the same with the
//     roles swapped: the logit tile is computed as dot[col][row] (As = v̂ of the owned columns,
//     Bs = û of the row tile), Gs[row][col], and dV̂_blk += Gᵀ·Û_tile into ws [splits, E, d].
//     Every column sums its rows in one fixed order (inside a tile the 64 rows in order into
//     a register, then that tile's sum into ws, row tiles in order): the two-pass deterministic
//     backward (rows, then columns), no float atomics.
//   ibs_finish_rows / ibs_finish_cols   one warp per output row e: g = κ·Σ_splits ws (split
//     order), then the L2 backward (two passes over d: ⟨û, g⟩, then the write), → out; rows
//     also sum the dκ partials → dk. With one split the host points ws at out itself: each
//     element is read and then written by the same lane.
//   ibs_norms       one warp per row of q (rows [0, B)) then of c (columns [col_lo, col_hi)):
//     n = max(sqrt(Σ x²), ε), lanes strided over d, a fixed xor tree.
//   256 threads everywhere; the aux kernels use 8 warps (or 256 rows) per block.
//
// Variants (-D defines, listed by `compile_variants()`): Q_DT, C_DT = storage dtype codes of
// q and c (0 f32, 1 bf16, 2 f16): 9 modules, each holding all seven kernels. The metadata and
// the IBS_* feature flags are runtime (block-uniform) fields: metadata are staged in shared
// memory once per tile and read once per logit (the mask), next to 2d multiply-adds. No mma.sync variant yet (the 16-bit inputs run the same FFMA
// tiles after conversion).
//
// Resources (ptxas, sm_90, NVRTC 13.0; tests/cuda_compile.rs prints the current numbers):
//   ibs_forward    57 registers, 12 816 B static shared (As + Bs 2·16·68·4 = 8704, metadata
//                  64·60 = 3840, Gs one row 272): 4 blocks (32 warps) per SM.
//   ibs_grad_*     71 registers (__launch_bounds__(256, 3): with the plain bound ptxas chose
//                  48 registers and spilled the dκ accumulators), 29 952 B (+ Gs 64·68·4 =
//                  17 408): 3 blocks (24 warps) per SM.
//   aux kernels    26–32 registers, no shared memory.
//   Everything below the 48 KiB static limit: no opt-in.
//
// Cost (B rows, N columns, d features). Useful FLOPs: forward 2BNd, backward 6BNd (one
// recompute + two products) = 8·B·N·d for fused forward + backward, the number to report.
// Executed: 2BNd forward + 4BNd in each gradient kernel (each recomputes its logits) = 10BNd,
// plus one exp2 per logit per kernel. With FFMA tiles the exp2 is cheap: per logit 2d FLOP =
// d FFMA (128 at d = 128, one SM-clock at 128 FFMA/clk) against one SFU ex2 (16/clk): ≈ 6 %.
// Traffic per 64×64 tile, from L2 (s = bytes per input element):
//   forward   2·64·d·s loaded for 2·64·64·d FLOP: 16 FLOP/B at f32, 32 at bf16/f16.
//   gradients 3·64·d·s loaded (the looped tile twice: phases 1 and 3) + 2·64·d·4 B of ws
//             read-modify-write, for 4·64·64·d FLOP: 12.8 FLOP/B at f32, 18 at 16 bits. The ws
//             slice of a block is 64·d·4 B (32 KiB at d = 128), reused every tile: L2-resident.
//   Blocks are issued x-fastest, so all row blocks of one split sweep the same column tiles
//   together and share them in L2. DRAM: the compulsory (B + N)·d·s bytes, O(B + N) metadata,
//   the f32 outputs and the split workspaces (≤ 64 MiB, O(B·d) or O(len·d)) — never O(B·N).
//   When c does not fit in L2 (N·d·s ≳ 40 MiB on an H200) it streams from DRAM about once
//   per wave of resident row blocks.

#ifndef Q_DT
#error "Q_DT (dtype code of q) must be defined"
#endif
#ifndef C_DT
#error "C_DT (dtype code of c) must be defined"
#endif

#define IBS_NONE 0xFFFFFFFFu
#define IBS_T 64      // tile width (rows and columns)
#define IBS_K 16      // d chunk of the logit tile / looped-axis chunk of the products
#define IBS_LD 68     // padded row of the staging tiles (float4 aligned)

#define IBS_LOGQ 1u
#define IBS_IDS 2u
#define IBS_VALID 4u
#define IBS_QID 8u
#define IBS_L2 16u

#define IBS_LOG2E 1.4426950408889634f
#define IBS_LN2 0.6931471805599453f
#define IBS_NEG_INF __int_as_float(0xff800000)  // no <math.h> under NVRTC

// Mirrors `IbsParams` in src/cuda/softmax.rs field for field (#[repr(C)], 176 bytes).
struct IbsParams {
    unsigned long long q, c;                                // embeddings
    unsigned long long target, row_qid, coef, lse, s_target;  // per row
    unsigned long long log_q, ids, valid, col_qid;          // per column (0 = absent)
    unsigned long long qnorm, cnorm;                        // clamped norms (IBS_L2)
    unsigned long long ws, dk_ws, out, dk;                  // workspaces and outputs
    unsigned b, n, d;
    unsigned col_lo, col_hi;  // column range: [0, N) except for ibs_grad_cols / finish_cols
    unsigned splits, tiles_per_split;
    unsigned flags;           // IBS_*
    float kappa, eps;
};
static_assert(sizeof(IbsParams) == 176, "IbsParams layout must match the host");

// 2^x on the SFU (ex2.approx.ftz: 2 ulp; 2^−∞ = +0).
__device__ __forceinline__ float ibs_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <int G_ROWS>
struct IbsSmem {
    float As[IBS_K][IBS_LD];  // owned-axis vectors, k-major
    float Bs[IBS_K][IBS_LD];  // looped-axis vectors, k-major (phase 1) / [chunk][feature] (3)
    float Gs[G_ROWS][IBS_LD];  // G[looped][owned] (gradient kernels; 1 row in the forward)
    // The current 64 rows.
    long long r_id[IBS_T];   // ids[t(i)] (IBS_IDS)
    long long r_qid[IBS_T];  // row query id (IBS_QID)
    unsigned r_t[IBS_T];     // target, IBS_NONE when inactive or past B
    float r_a[IBS_T];        // a_i (gradients)
    float r_lse2[IBS_T];     // LSE_i·log2 e (gradients)
    float r_inv[IBS_T];      // 1/n_i (1 without L2)
    // The current 64 columns.
    long long c_id[IBS_T];
    long long c_qid[IBS_T];
    float c_lq2[IBS_T];      // lq_j·log2 e
    unsigned c_ok[IBS_T];    // in [col_lo, col_hi) and valid
    float c_inv[IBS_T];
};

// Rows r0..r0+63 (threads 0..63).
template <int G_ROWS, bool BWD>
__device__ __forceinline__ void ibs_fill_rows(const IbsParams& p, IbsSmem<G_ROWS>& sm,
                                              unsigned r0) {
    const unsigned k = threadIdx.x;
    if (k >= IBS_T) {
        return;
    }
    const unsigned i = r0 + k;
    unsigned t = IBS_NONE;
    long long rid = 0, rq = 0;
    float a = 0.0f, lse2 = 0.0f, inv = 1.0f;
    if (i < p.b) {
        t = reinterpret_cast<const unsigned*>(p.target)[i];
        if (BWD) {
            a = reinterpret_cast<const float*>(p.coef)[i];
            lse2 = reinterpret_cast<const float*>(p.lse)[i] * IBS_LOG2E;
            if (a == 0.0f) {
                t = IBS_NONE;  // a zero row of G, as on the CPU
            }
        }
        if (t != IBS_NONE && (p.flags & IBS_IDS)) {
            rid = reinterpret_cast<const long long*>(p.ids)[t];
        }
        if (p.flags & IBS_QID) {
            rq = reinterpret_cast<const long long*>(p.row_qid)[i];
        }
        if (p.flags & IBS_L2) {
            inv = __frcp_rn(reinterpret_cast<const float*>(p.qnorm)[i]);
        }
    }
    sm.r_t[k] = t;
    sm.r_id[k] = rid;
    sm.r_qid[k] = rq;
    sm.r_a[k] = a;
    sm.r_lse2[k] = lse2;
    sm.r_inv[k] = inv;
}

// Columns c0..c0+63 (threads 0..63); only [col_lo, col_hi) are in range.
template <int G_ROWS>
__device__ __forceinline__ void ibs_fill_cols(const IbsParams& p, IbsSmem<G_ROWS>& sm,
                                              unsigned c0) {
    const unsigned k = threadIdx.x;
    if (k >= IBS_T) {
        return;
    }
    const unsigned j = c0 + k;
    unsigned ok = 0u;
    long long id = 0, cq = -1;
    float lq2 = 0.0f, inv = 1.0f;
    if (j < p.col_hi) {
        ok = (p.flags & IBS_VALID) ? reinterpret_cast<const unsigned char*>(p.valid)[j] != 0 : 1u;
        if (p.flags & IBS_IDS) {
            id = reinterpret_cast<const long long*>(p.ids)[j];
        }
        if (p.flags & IBS_QID) {
            cq = reinterpret_cast<const long long*>(p.col_qid)[j];
        }
        if (p.flags & IBS_LOGQ) {
            lq2 = reinterpret_cast<const float*>(p.log_q)[j] * IBS_LOG2E;
        }
        if (p.flags & IBS_L2) {
            inv = __frcp_rn(reinterpret_cast<const float*>(p.cnorm)[j - p.col_lo]);
        }
    }
    sm.c_ok[k] = ok;
    sm.c_id[k] = id;
    sm.c_qid[k] = cq;
    sm.c_lq2[k] = lq2;
    sm.c_inv[k] = inv;
}

// Is (row ri, column ci) of the current tiles in D_i? (j: global column, t: the row's target.)
template <int G_ROWS>
__device__ __forceinline__ bool ibs_domain(const IbsParams& p, const IbsSmem<G_ROWS>& sm,
                                           unsigned ri, unsigned ci, unsigned j, unsigned t) {
    if (t == IBS_NONE || !sm.c_ok[ci]) {
        return false;
    }
    if (j == t) {
        return true;
    }
    if ((p.flags & IBS_IDS) && sm.c_id[ci] == sm.r_id[ri]) {
        return false;
    }
    if ((p.flags & IBS_QID) && sm.c_qid[ci] >= 0 && sm.c_qid[ci] == sm.r_qid[ri]) {
        return false;
    }
    return true;
}

// 64 vectors base..base+63 of x ([*, d], dtype DT), features k0..k0+15, scaled by inv[·],
// into dst[k][vector]; zero past `end` or d. Thread (tx, ty) loads vectors ty + 16l, feature
// k0 + tx: 16 consecutive threads read 16 consecutive features of one vector.
template <int DT>
__device__ __forceinline__ void ibs_stage_kmajor(float (&dst)[IBS_K][IBS_LD], const void* x,
                                                 unsigned base, unsigned end, unsigned k0,
                                                 unsigned d, const float* inv, unsigned tx,
                                                 unsigned ty) {
    const unsigned k = k0 + tx;
#pragma unroll
    for (unsigned l = 0; l < 4; ++l) {
        const unsigned o = ty + 16u * l;
        const unsigned g = base + o;
        float v = 0.0f;
        if (g < end && k < d) {
            v = rf_load_f32<DT>(x, g * d + k) * inv[o];
        }
        dst[tx][o] = v;
    }
}

// 16 vectors base..base+15 of x, features d0..d0+63, scaled, into dst[vector][feature]; zero
// past `end` or d. Thread tid loads vector (tid >> 6) + 4l, feature d0 + (tid & 63): a warp
// reads 32 consecutive features of one vector (coalesced).
template <int DT>
__device__ __forceinline__ void ibs_stage_rowmajor(float (&dst)[IBS_K][IBS_LD], const void* x,
                                                   unsigned base, unsigned end, unsigned d0,
                                                   unsigned d, const float* inv,
                                                   unsigned tid) {
    const unsigned f = tid & 63u;
    const unsigned k = d0 + f;
#pragma unroll
    for (unsigned l = 0; l < 4; ++l) {
        const unsigned r = (tid >> 6) + 4u * l;
        const unsigned g = base + r;
        float v = 0.0f;
        if (g < end && k < d) {
            v = rf_load_f32<DT>(x, g * d + k) * inv[r];
        }
        dst[r][f] = v;
    }
}

// acc[a][b] += Σ_kk A[kk][ty·4 + a]·B[kk][tx·4 + b] over 16 k-steps.
__device__ __forceinline__ void ibs_mac16(float (&acc)[4][4], const float (&A)[IBS_K][IBS_LD],
                                          const float (&B)[IBS_K][IBS_LD], unsigned tx,
                                          unsigned ty) {
#pragma unroll
    for (unsigned kk = 0; kk < IBS_K; ++kk) {
        const float4 a4 = *reinterpret_cast<const float4*>(&A[kk][ty * 4u]);
        const float4 b4 = *reinterpret_cast<const float4*>(&B[kk][tx * 4u]);
        const float av[4] = {a4.x, a4.y, a4.z, a4.w};
        const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
        }
    }
}

// (m, s) ⊕ (m2, s2) in base 2, both maxima possibly −∞ (then s = 0).
__device__ __forceinline__ void ibs_lse_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == IBS_NEG_INF) {
        return;  // both empty
    }
    s = s * ibs_ex2(m - mn) + s2 * ibs_ex2(m2 - mn);
    m = mn;
}

// The tile loop shared by the forward and both gradient kernels. ROWS_OWNED: the block owns 64
// rows and loops over column tiles (forward, query gradients); otherwise it owns 64 columns of
// [col_lo, col_hi) and loops over row tiles (candidate gradients). BWD: gradient kernel.
template <bool ROWS_OWNED, bool BWD>
__device__ __forceinline__ void ibs_tiles(const IbsParams& p, IbsSmem<BWD ? IBS_T : 1>& sm) {
    static_assert(ROWS_OWNED || BWD, "the forward owns rows");
    constexpr int G_ROWS = BWD ? IBS_T : 1;
    constexpr int O_DT = ROWS_OWNED ? Q_DT : C_DT;
    constexpr int T_DT = ROWS_OWNED ? C_DT : Q_DT;
    const unsigned tid = threadIdx.x;
    const unsigned tx = tid & 15u;
    const unsigned ty = tid >> 4;
    const void* O = reinterpret_cast<const void*>(ROWS_OWNED ? p.q : p.c);
    const void* T = reinterpret_cast<const void*>(ROWS_OWNED ? p.c : p.q);
    const unsigned o0 = (ROWS_OWNED ? 0u : p.col_lo) + blockIdx.x * IBS_T;
    const unsigned o_end = ROWS_OWNED ? p.b : p.col_hi;
    const unsigned t_lo = ROWS_OWNED ? p.col_lo : 0u;
    const unsigned t_end = ROWS_OWNED ? p.col_hi : p.b;
    const unsigned ntiles = (t_end - t_lo + IBS_T - 1u) / IBS_T;
    const unsigned tile_begin = blockIdx.y * p.tiles_per_split;
    const unsigned tile_stop = min(ntiles, tile_begin + p.tiles_per_split);
    const float* o_inv = ROWS_OWNED ? sm.r_inv : sm.c_inv;
    const float* t_inv = ROWS_OWNED ? sm.c_inv : sm.r_inv;
    // Row offset of this split's slice of ws: [splits, E, d], E = owned extent.
    const unsigned e_count = ROWS_OWNED ? p.b : p.col_hi - p.col_lo;
    const unsigned o_rel0 = o0 - (ROWS_OWNED ? 0u : p.col_lo);

    if (ROWS_OWNED) {
        ibs_fill_rows<G_ROWS, BWD>(p, sm, o0);
    } else {
        ibs_fill_cols<G_ROWS>(p, sm, o0);
    }
    const float k2 = p.kappa * IBS_LOG2E;

    float run_m[4], run_s[4], dk[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        run_m[a] = IBS_NEG_INF;
        run_s[a] = 0.0f;
        dk[a] = 0.0f;
    }

    for (unsigned tile = tile_begin; tile < tile_stop; ++tile) {
        const unsigned t0 = t_lo + tile * IBS_T;
        // Everyone is done with the previous tile's looped-axis metadata, Bs and Gs (and the
        // owned metadata written before the loop is visible after the next barrier).
        __syncthreads();
        if (ROWS_OWNED) {
            ibs_fill_cols<G_ROWS>(p, sm, t0);
        } else {
            ibs_fill_rows<G_ROWS, BWD>(p, sm, t0);
        }
        __syncthreads();

        // (1) dot[o][t] for o = ty·4 + a, t = tx·4 + b.
        float acc[4][4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                acc[a][b] = 0.0f;
            }
        }
        for (unsigned k0 = 0; k0 < p.d; k0 += IBS_K) {
            ibs_stage_kmajor<O_DT>(sm.As, O, o0, o_end, k0, p.d, o_inv, tx, ty);
            ibs_stage_kmajor<T_DT>(sm.Bs, T, t0, t_end, k0, p.d, t_inv, tx, ty);
            __syncthreads();
            ibs_mac16(acc, sm.As, sm.Bs, tx, ty);
            __syncthreads();
        }

        // (2) mask, logits, and the online LSE (forward) or G (gradients).
#pragma unroll
        for (unsigned a = 0; a < 4; ++a) {
            float x[4];
#pragma unroll
            for (unsigned b = 0; b < 4; ++b) {
                const unsigned oi = ty * 4u + a;
                const unsigned ti = tx * 4u + b;
                const unsigned ri = ROWS_OWNED ? oi : ti;
                const unsigned ci = ROWS_OWNED ? ti : oi;
                const unsigned j = (ROWS_OWNED ? t0 : o0) + ci;
                const unsigned t = sm.r_t[ri];
                const bool dom = ibs_domain<G_ROWS>(p, sm, ri, ci, j, t);
                const float xl = fmaf(acc[a][b], k2, -sm.c_lq2[ci]);
                if (!BWD) {
                    x[b] = dom ? xl : IBS_NEG_INF;
                    if (dom && j == t) {
                        // The one writer of this row's target logit, in natural units.
                        const float lq =
                            (p.flags & IBS_LOGQ) ? reinterpret_cast<const float*>(p.log_q)[j]
                                                 : 0.0f;
                        reinterpret_cast<float*>(p.s_target)[(ROWS_OWNED ? o0 : t0) + ri] =
                            p.kappa * acc[a][b] - lq;
                    }
                } else {
                    float g = 0.0f;
                    if (t != IBS_NONE && j < p.col_hi) {
                        const float pij = dom ? ibs_ex2(xl - sm.r_lse2[ri]) : 0.0f;
                        g = sm.r_a[ri] * (pij - (j == t ? 1.0f : 0.0f));
                    }
                    dk[a] = fmaf(g, acc[a][b], dk[a]);
                    x[b] = g;
                }
            }
            if (!BWD) {
                const float lmax = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
                const float mn = fmaxf(run_m[a], lmax);
                if (mn != IBS_NEG_INF) {
                    run_s[a] = run_s[a] * ibs_ex2(run_m[a] - mn) + ibs_ex2(x[0] - mn) +
                               ibs_ex2(x[1] - mn) + ibs_ex2(x[2] - mn) + ibs_ex2(x[3] - mn);
                    run_m[a] = mn;
                }
            } else {
#pragma unroll
                for (unsigned b = 0; b < 4; ++b) {
                    sm.Gs[tx * 4u + b][ty * 4u + a] = x[b];
                }
            }
        }

        if (BWD) {
            // (3) out[o][f] += Σ_t G[o][t]·X_T[t][f] for the owned 64 × 64-feature chunks.
            __syncthreads();  // Gs complete
            for (unsigned d0 = 0; d0 < p.d; d0 += IBS_T) {
                float acc2[4][4];
#pragma unroll
                for (int a = 0; a < 4; ++a) {
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        acc2[a][b] = 0.0f;
                    }
                }
                for (unsigned kc = 0; kc < IBS_T && t0 + kc < t_end; kc += IBS_K) {
                    ibs_stage_rowmajor<T_DT>(sm.Bs, T, t0 + kc, t_end, d0, p.d, t_inv + kc,
                                             tid);
                    __syncthreads();
                    ibs_mac16(acc2, *reinterpret_cast<const float(*)[IBS_K][IBS_LD]>(&sm.Gs[kc]),
                              sm.Bs, tx, ty);
                    __syncthreads();
                }
                float* ws = reinterpret_cast<float*>(p.ws);
#pragma unroll
                for (unsigned a = 0; a < 4; ++a) {
                    const unsigned o = ty * 4u + a;
                    if (o0 + o < o_end) {
                        const unsigned row = (blockIdx.y * e_count + o_rel0 + o) * p.d;
#pragma unroll
                        for (unsigned b = 0; b < 4; ++b) {
                            const unsigned f = d0 + tx * 4u + b;
                            if (f < p.d) {
                                ws[row + f] += acc2[a][b];
                            }
                        }
                    }
                }
            }
        }
    }

    // Per-row partials: the 16 threads of a row (lanes tx = 0..15 of one half-warp) combine
    // with a fixed xor tree (commutative merges: every lane ends with the same bits).
#pragma unroll
    for (unsigned a = 0; a < 4; ++a) {
        const unsigned o = ty * 4u + a;
        if (!BWD) {
            float m = run_m[a], s = run_s[a];
#pragma unroll
            for (unsigned off = 8; off > 0; off >>= 1) {
                const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m, off);
                const float s2 = __shfl_xor_sync(0xFFFFFFFFu, s, off);
                ibs_lse_merge(m, s, m2, s2);
            }
            if (tx == 0 && o0 + o < p.b) {
                reinterpret_cast<float2*>(p.ws)[blockIdx.y * p.b + o0 + o] = make_float2(m, s);
            }
        } else if (ROWS_OWNED) {
            float v = dk[a];
#pragma unroll
            for (unsigned off = 8; off > 0; off >>= 1) {
                v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
            }
            if (tx == 0 && o0 + o < p.b) {
                reinterpret_cast<float*>(p.dk_ws)[blockIdx.y * p.b + o0 + o] = v;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) ibs_forward(const IbsParams p) {
    __shared__ __align__(16) IbsSmem<1> sm;
    ibs_tiles<true, false>(p, sm);
}

extern "C" __global__ void __launch_bounds__(256, 3) ibs_grad_rows(const IbsParams p) {
    __shared__ __align__(16) IbsSmem<IBS_T> sm;
    ibs_tiles<true, true>(p, sm);
}

extern "C" __global__ void __launch_bounds__(256, 3) ibs_grad_cols(const IbsParams p) {
    __shared__ __align__(16) IbsSmem<IBS_T> sm;
    ibs_tiles<false, true>(p, sm);
}

// LSE_i from the splits' (m, s) pairs, in split order; −∞ for an empty domain.
extern "C" __global__ void __launch_bounds__(256) ibs_combine(const IbsParams p) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.b) {
        return;
    }
    const float2* ws = reinterpret_cast<const float2*>(p.ws);
    float m = IBS_NEG_INF;
    for (unsigned s = 0; s < p.splits; ++s) {
        m = fmaxf(m, ws[s * p.b + i].x);
    }
    float sum = 0.0f;
    if (m != IBS_NEG_INF) {
        for (unsigned s = 0; s < p.splits; ++s) {
            const float2 v = ws[s * p.b + i];
            if (v.y > 0.0f) {
                sum += v.y * exp2f(v.x - m);
            }
        }
    }
    reinterpret_cast<float*>(p.lse)[i] = sum > 0.0f ? (m + log2f(sum)) * IBS_LN2 : IBS_NEG_INF;
}

// Clamped norms: warps [0, B) take q's rows, warps [B, B + col_hi − col_lo) c's columns.
extern "C" __global__ void __launch_bounds__(256) ibs_norms(const IbsParams p) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned w = blockIdx.x * 8u + (threadIdx.x >> 5);
    const bool is_q = w < p.b;
    if (!is_q && w - p.b >= p.col_hi - p.col_lo) {
        return;
    }
    const unsigned row = is_q ? w : p.col_lo + (w - p.b);
    float ss = 0.0f;
    for (unsigned k = lane; k < p.d; k += 32u) {
        const float v = is_q ? rf_load_f32<Q_DT>(reinterpret_cast<const void*>(p.q), row * p.d + k)
                             : rf_load_f32<C_DT>(reinterpret_cast<const void*>(p.c), row * p.d + k);
        ss = fmaf(v, v, ss);
    }
#pragma unroll
    for (unsigned off = 16; off > 0; off >>= 1) {
        ss += __shfl_xor_sync(0xFFFFFFFFu, ss, off);
    }
    if (lane == 0) {
        // fmaxf would drop a NaN norm (and with it the NaN of this row's gradient).
        const float r = sqrtf(ss);
        const float n = r != r ? r : fmaxf(r, p.eps);
        if (is_q) {
            reinterpret_cast<float*>(p.qnorm)[w] = n;
        } else {
            reinterpret_cast<float*>(p.cnorm)[w - p.b] = n;
        }
    }
}

// out[e] = L2-backward(κ·Σ_s ws[s][e]) for one warp per owned row e < E (rows: E = B, x = q;
// columns: E = col_hi − col_lo, x = c at column col_lo + e). ws may be out itself (one split):
// every element is read, then written, by the same lane, and ws is not read through the
// read-only path.
template <bool ROWS>
__device__ __forceinline__ void ibs_finish(const IbsParams& p) {
    constexpr int X_DT = ROWS ? Q_DT : C_DT;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned e = blockIdx.x * 8u + (threadIdx.x >> 5);
    const unsigned e_count = ROWS ? p.b : p.col_hi - p.col_lo;
    if (e >= e_count) {
        return;
    }
    const void* x = reinterpret_cast<const void*>(ROWS ? p.q : p.c);
    const unsigned xrow = (ROWS ? e : p.col_lo + e) * p.d;
    const float* ws = reinterpret_cast<const float*>(p.ws);
    float* out = reinterpret_cast<float*>(p.out);
    const unsigned split_stride = e_count * p.d;
    const bool l2 = (p.flags & IBS_L2) != 0;
    float nrm = 1.0f;
    float proj = 0.0f;
    if (l2) {
        nrm = reinterpret_cast<const float*>(ROWS ? p.qnorm : p.cnorm)[e];
        for (unsigned k = lane; k < p.d; k += 32u) {
            float g = 0.0f;
            for (unsigned s = 0; s < p.splits; ++s) {
                g += ws[s * split_stride + e * p.d + k];
            }
            g *= p.kappa;
            proj = fmaf(rf_load_f32<X_DT>(x, xrow + k) / nrm, g, proj);
        }
#pragma unroll
        for (unsigned off = 16; off > 0; off >>= 1) {
            proj += __shfl_xor_sync(0xFFFFFFFFu, proj, off);
        }
    }
    for (unsigned k = lane; k < p.d; k += 32u) {
        float g = 0.0f;
        for (unsigned s = 0; s < p.splits; ++s) {
            g += ws[s * split_stride + e * p.d + k];
        }
        g *= p.kappa;
        if (l2) {
            g = nrm <= p.eps ? g / p.eps : (g - rf_load_f32<X_DT>(x, xrow + k) / nrm * proj) / nrm;
        }
        out[e * p.d + k] = g;
    }
    if (ROWS && lane == 0) {
        const float* dk_ws = reinterpret_cast<const float*>(p.dk_ws);
        float v = 0.0f;
        for (unsigned s = 0; s < p.splits; ++s) {
            v += dk_ws[s * p.b + e];
        }
        reinterpret_cast<float*>(p.dk)[e] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256) ibs_finish_rows(const IbsParams p) {
    ibs_finish<true>(p);
}

extern "C" __global__ void __launch_bounds__(256) ibs_finish_cols(const IbsParams p) {
    ibs_finish<false>(p);
}
