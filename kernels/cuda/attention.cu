// recfuse attention core for many short sequences of feature tokens (heterogeneous attention,
// Hiformer; src/ops/attention.rs, spec /work/shared/spec/hetero_attention.md):
//
//   S_ij = scale·⟨q_i, k_j⟩ (+ bias[h, i, j]),  key j masked (mask[b, j] == 0) -> S_ij = −∞
//   P_ij = softmax_j(S_i·),  O_i = Σ_j P_ij v_j,  LSE_i = log Σ_j exp S_ij
//   backward (FlashAttention-2 form, P recomputed from LSE):
//   D_i = dO_i·O_i,  dP_ij = dO_i·v_j,  dS_ij = P_ij (dP_ij − D_i)
//   dQ_i = scale·Σ_j dS_ij k_j,  dK_j = scale·Σ_i dS_ij q_i,  dV_j = Σ_i P_ij dO_i,
//   d bias[h, i, j] = Σ_b dS_bhij (fixed order).
// A row whose keys are all masked has O = 0, LSE = −∞ and zero gradients, never NaN. A masked key
// is never read (its K and V are staged as 0); a NaN score of a valid key makes its row NaN.
//
// Layouts (row-major, element indices): Q [B, Lq, H, dk], K [B, L, H, dk], V [B, L, H, dv],
// O and dO [B, Lq, H, dv], LSE [B, H, Lq], bias and d bias [H, Lq, L], mask [B, L] (non-zero =
// valid); dQ/dK/dV like Q/K/V. Query pruning is just Lq < L (the queries are the last Lq
// tokens; nothing here depends on a query's position). Every tensor's storage dtype is a
// runtime field (codes 0 f32, 1 bf16, 2 f16): row vectors are widened to f32 as they are
// loaded (the dtype test hoisted out of the unrolled loop) and tiles as they are staged, so one
// compiled module serves every dtype mix. All arithmetic is f32; exponentials are exp2f of
// scores pre-multiplied by log2(e) (folded into q or k: scale·log2 e per element, once).
//
// Variants: the head dims are compile-time buckets -DDK ∈ {16, 32, 64}, -DDV ∈ {16, 32, 64,
// 128}, the smallest ≥ the runtime d_k, d_v, with 2·DK + DV ≤ 192 (so (64, 128) is not built:
// its backward spills). 11 modules, all in the compile check. Per-thread row vectors live in
// registers as float[DK] / float[DV] with every index static; the runtime dims p.dk_ ≤ DK,
// p.dv_ ≤ DV guard global loads and stores, and the padding is zero, so it adds nothing to any
// dot product. The paper's shape (16, 64) is exact.
//
// Launch geometry (the WGSL twin, kernels/wgsl/attention.wgsl, has the same shape: one
// workgroup per (b, h), threads over query rows, key tiles of 32, online softmax):
//   attn_fwd   grid (B·H): block x = b·H + h owns sample b, head h. T = min(32·⌈Lq/32⌉, 128)
//              threads; thread t owns query rows i = t, t + T, ... (⌈Lq/T⌉ passes, uniform over
//              the block; one pass for Lq ≤ 128). Per pass the block walks key tiles of 32:
//              all T threads stage K[j0..j0+32) and V[...) (f32, zero-padded past L and past
//              dk/dv) and the tile's key-valid flags in shared memory, __syncthreads; then each
//              thread, for the nj = min(32, L − j0) keys of the tile, writes its row's scores
//              s_j (log2 domain, −∞ for a masked key) to its own column of the dynamic
//              shared-memory array sc[32][T] (column t: no bank conflicts, no sync) and takes
//              the tile max, then updates its online softmax (running max m and sum l):
//                  m' = max(m, max_j s_j);  α = 2^(m − m');  l = α·l + Σ_j 2^(s_j − m');
//                  acc = α·acc + Σ_j 2^(s_j − m')·v_j
//              (a tile where m' is still −∞ is skipped, so −∞ − −∞ never occurs). At the end
//              O_i = acc / l, LSE_i = (m + log2 l)·ln 2; l = 0 (no valid key) gives O = 0,
//              LSE = −∞. One sample's scores never leave the chip; nothing B·H·L² is stored.
//   attn_bwd   grid (B·H), same block ownership, T = min(32·⌈L/32⌉, 128) threads (L ≥ Lq).
//              Phase 1, threads over query rows (passes as above): thread i holds
//              q_i·scale·log2 e, dO_i and dq_i in registers, computes D_i = dO_i·O_i (stored
//              to the f32 workspace dws[B, H, Lq]), then walks the same staged key tiles:
//              P_ij = 2^(s_ij − LSE_i·log2 e), dS_ij, dq_i += dS_ij·k_j; writes dQ_i = scale·dq_i.
//              The last tile's __syncthreads makes dws visible to the block. Phase 2, threads
//              over keys j = t, t + T, ...: two walks over query tiles of 32 rows staged in
//              shared memory (Q, dO, LSE_i·log2 e with +∞ for an all-masked row so that P = 0,
//              and D_i): pass A holds k_j·scale·log2 e and dv_j: dv_j += P_ij·dO_i; pass B
//              holds k_j, v_j and dk_j: dk_j += dS_ij·q_i. Splitting A and B recomputes s_ij
//              once more (+d_k FLOPs per pair) but caps the registers at 2·DK + DV instead of
//              2·(DK + DV). Every dQ/dK/dV element of (b, h) is written by this one block,
//              exactly once: no atomics, a fixed summation order.
//   attn_dbias_partial / attn_dbias_finish — only with a bias: d bias[h, i, j] = Σ_b dS_bhij.
//              grid (H·⌈Lq/8⌉, S): block (h, 8-row tile, split s) sums samples
//              b ∈ [s·bps, min(B, (s+1)·bps)) in increasing order; T = min(32·⌈L/32⌉, 128)
//              threads over keys j (passes). Per sample the block stages its ≤ 8 query rows
//              (q·scale·log2 e, dO, LSE·log2 e, D from dws) in shared memory, each thread loads
//              k_j, v_j into registers and updates its 8 accumulators. With S = 1 it stores
//              d bias directly; otherwise f32 partials dbias_ws[s, h, i, j], and
//              attn_dbias_finish (one thread per (h, i, j)) adds s = 0..S−1 in order. S and bps
//              depend only on (B, H, Lq) (host: dbias_splits, ≈ 1024 blocks), so every bit of
//              d bias is the same on every run and every GPU. (Per (h, row) alone would be
//              H·Lq = 152 blocks at the paper shape, each re-reading all of K and V.)
//
// Registers and spills: the kernels are __launch_bounds__(128, 1). With one block per SM as
// the declared minimum, ptxas stops trading a few bytes of spill for occupancy (it did so at
// 96–168 registers with a plain (128)); the real occupancy is what the register count gives.
// Where a shared-memory row feeds two products (k_j for s_ij and dq_i, q_i for s_ij and dk_j)
// the second use re-reads it through a volatile pointer, so ptxas does not keep the row in DK
// more registers between them.
//
// Shared memory: static tile_a[32][DK] (K, then Q tiles), tile_b[32][DV] (V, then dO tiles),
// two [32] vectors: 32·(DK + DV + 2)·4 bytes, 10.5 KiB at (16, 64), 20.6 KiB at most; attn_fwd
// adds 32·T·4 bytes of dynamic sc (8 KiB at T = 64, 16 KiB at T = 128): < 48 KiB everywhere, no
// opt-in. Every warp reads the same tile element at a time (a broadcast); staging writes are
// consecutive words: no bank conflicts.
//
// Memory traffic (s = element size; paper shape B = 1024, Lq = L = 38, H = 4, dk = 16, dv = 64):
//   attn_fwd   reads Q, K, V once (K/V once per pass), the bias once per sample (H·Lq·L,
//              L2-resident), the mask; writes O and the f32 LSE:
//              B·H·(Lq·dk + L·dk + L·dv + Lq·dv)·s + 4·B·H·Lq ≈ 50 MB in bf16 (≈ 10 µs at
//              4.8 TB/s). FLOPs 2·B·H·Lq·L·(dk + dv) ≈ 0.95 GFLOP (f32 FFMA, ≈ 15 µs at 67
//              TFLOP/s): balanced, so tensor cores would not help at these 38-token shapes.
//   attn_bwd   reads Q, K, V, O, dO, LSE once per phase (L2-resident within a block), writes
//              dQ, dK, dV and 4·B·H·Lq bytes of D; FLOPs ≈ 2·B·H·Lq·L·(5·dk + 3·dv) ≈ 3.2 GFLOP.
//   dbias      K and V are re-read once per 8-row tile: ⌈Lq/8⌉·B·H·L·(dk + dv)·s ≈ 125 MB from
//              L2 at the paper shape, plus S·H·Lq·L·4 bytes of partials written and read.
//
// Index arithmetic is unsigned 32-bit: the host checks that every tensor (and workspace) has
// < 2^31 elements, so every index formed for an in-range (b, h, i, j, c) is exact.

#ifndef DK
#error "DK (padded d_k bucket) must be defined"
#endif
#ifndef DV
#error "DV (padded d_v bucket) must be defined"
#endif

#define RF_ATTN_TILE 32
#define RF_ATTN_MAX_THREADS 128
#define RF_ATTN_DBIAS_ROWS 8
#define RF_LOG2E 1.4426950408889634f
#define RF_LN2 0.6931471805599453f
#define RF_INF __int_as_float(0x7f800000)

// Mirrors `AttnParams` in src/cuda/attention.rs (#[repr(C)], 184 bytes).
struct AttnParams {
    unsigned long long q, k, v;
    unsigned long long bias, mask;   // 0 when absent
    unsigned long long o, lse, d_o;  // forward outputs; backward inputs
    unsigned long long dq, dk, dv;   // backward outputs
    unsigned long long dws;          // f32 [B, H, Lq]: D_i (backward)
    unsigned long long dbias;        // [H, Lq, L] (backward with a bias)
    unsigned long long dbias_ws;     // f32 [S, H, Lq, L] partials when S > 1
    unsigned b, lq, l, h;
    unsigned dk_, dv_;               // runtime head dims, ≤ DK, DV
    float scale;                     // softmax scale
    float scale2;                    // scale·log2(e)
    unsigned splits, b_per_split;    // d bias split over the batch
    unsigned qkv_dt, o_dt, lse_dt, do_dt, bias_dt, mask_dt, dbias_dt;
    unsigned pad_;
};
static_assert(sizeof(AttnParams) == 184, "AttnParams layout must match the host");

// Element index of (b, t, h, c = 0) in a [B, T, H, d] tensor.
__device__ __forceinline__ unsigned attn_row(const AttnParams& p, unsigned b, unsigned t,
                                             unsigned tokens, unsigned hh, unsigned d) {
    return ((b * tokens + t) * p.h + hh) * d;
}

// r[c] = base[idx0 + c]·mul for c < n (dtype dt), 0 for n ≤ c < N or when !ok. The dtype test
// is hoisted out of the unrolled loop (one straight-line copy per storage width).
template <int N>
__device__ __forceinline__ void attn_load_row(float (&r)[N], unsigned long long base,
                                              unsigned dt, unsigned idx0, unsigned n, float mul,
                                              bool ok) {
#pragma unroll
    for (int c = 0; c < N; ++c) {
        r[c] = 0.0f;
    }
    if (!ok) {
        return;
    }
    if (dt == RF_F32) {
        const float* src = reinterpret_cast<const float*>(base) + idx0;
#pragma unroll
        for (int c = 0; c < N; ++c) {
            if ((unsigned)c < n) {
                r[c] = src[c] * mul;
            }
        }
    } else {
        const unsigned short* src = reinterpret_cast<const unsigned short*>(base) + idx0;
        const bool bf = dt == RF_BF16;
#pragma unroll
        for (int c = 0; c < N; ++c) {
            if ((unsigned)c < n) {
                const unsigned short h = src[c];
                r[c] = (bf ? rf_bf16_to_f32(h) : rf_f16_to_f32(h)) * mul;
            }
        }
    }
}

// base[idx0 + c] = r[c]·mul for c < n, rounded to dtype dt.
template <int N>
__device__ __forceinline__ void attn_store_row(const float (&r)[N], unsigned long long base,
                                               unsigned dt, unsigned idx0, unsigned n,
                                               float mul) {
    if (dt == RF_F32) {
        float* dst = reinterpret_cast<float*>(base) + idx0;
#pragma unroll
        for (int c = 0; c < N; ++c) {
            if ((unsigned)c < n) {
                dst[c] = r[c] * mul;
            }
        }
    } else {
        unsigned short* dst = reinterpret_cast<unsigned short*>(base) + idx0;
        const bool bf = dt == RF_BF16;
#pragma unroll
        for (int c = 0; c < N; ++c) {
            if ((unsigned)c < n) {
                dst[c] = bf ? rf_f32_to_bf16(r[c] * mul) : rf_f32_to_f16(r[c] * mul);
            }
        }
    }
}

// Key j of sample b is in range and kept by the mask.
__device__ __forceinline__ bool attn_key_ok(const AttnParams& p, unsigned b, unsigned j) {
    return j < p.l && (!p.mask || rf_load_dyn(p.mask, p.mask_dt, b * p.l + j) != 0.0f);
}

// max that keeps a NaN: fmaxf drops it, which would read a NaN score row as all masked.
__device__ __forceinline__ float attn_nan_max(float a, float b) {
    return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}

// Stages keys j0..j0+31 of (b, hh): K into ta[32][DK], V into tb[32][DV] (f32; zero past L, past
// dk/dv and for a masked key, which is never read: a NaN there reaches no output),
// valid[jj] = 1 for an in-range key that the mask keeps, else 0.
__device__ __forceinline__ void attn_stage_keys(const AttnParams& p, unsigned b, unsigned hh,
                                                unsigned j0, float (*ta)[DK], float (*tb)[DV],
                                                float* valid) {
    const unsigned t = threadIdx.x, nt = blockDim.x;
    for (unsigned e = t; e < RF_ATTN_TILE * DK; e += nt) {
        const unsigned jj = e / DK, c = e % DK, j = j0 + jj;
        ta[jj][c] = (c < p.dk_ && attn_key_ok(p, b, j))
                        ? rf_load_dyn(p.k, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dk_) + c)
                        : 0.0f;
    }
    for (unsigned e = t; e < RF_ATTN_TILE * DV; e += nt) {
        const unsigned jj = e / DV, c = e % DV, j = j0 + jj;
        tb[jj][c] = (c < p.dv_ && attn_key_ok(p, b, j))
                        ? rf_load_dyn(p.v, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dv_) + c)
                        : 0.0f;
    }
    for (unsigned jj = t; jj < RF_ATTN_TILE; jj += nt) {
        valid[jj] = attn_key_ok(p, b, j0 + jj) ? 1.0f : 0.0f;
    }
}

// Stages query rows i0..i0+31 of (b, hh): Q·qmul into ta, dO into tb, lse2[ii] = LSE·log2 e
// (+∞ for a padding row or an all-masked row, so that 2^(s − lse2) = 0), dd[ii] = D_i.
// dws is read with plain loads: attn_bwd wrote it (before a __syncthreads) or an earlier kernel.
__device__ __forceinline__ void attn_stage_queries(const AttnParams& p, unsigned b, unsigned hh,
                                                   unsigned i0, unsigned rows, float qmul,
                                                   float (*ta)[DK], float (*tb)[DV],
                                                   float* lse2, float* dd) {
    const unsigned t = threadIdx.x, nt = blockDim.x;
    for (unsigned e = t; e < rows * DK; e += nt) {
        const unsigned ii = e / DK, c = e % DK, i = i0 + ii;
        ta[ii][c] = (i < p.lq && c < p.dk_)
                        ? rf_load_dyn(p.q, p.qkv_dt, attn_row(p, b, i, p.lq, hh, p.dk_) + c) * qmul
                        : 0.0f;
    }
    for (unsigned e = t; e < rows * DV; e += nt) {
        const unsigned ii = e / DV, c = e % DV, i = i0 + ii;
        tb[ii][c] = (i < p.lq && c < p.dv_)
                        ? rf_load_dyn(p.d_o, p.do_dt, attn_row(p, b, i, p.lq, hh, p.dv_) + c)
                        : 0.0f;
    }
    for (unsigned ii = t; ii < rows; ii += nt) {
        const unsigned i = i0 + ii;
        float l2 = RF_INF;
        float dval = 0.0f;
        if (i < p.lq) {
            const unsigned r = (b * p.h + hh) * p.lq + i;
            const float lse = rf_load_dyn(p.lse, p.lse_dt, r);
            if (lse != -RF_INF) {
                l2 = lse * RF_LOG2E;
                dval = reinterpret_cast<const float*>(p.dws)[r];
            }
        }
        lse2[ii] = l2;
        dd[ii] = dval;
    }
}

// Bias of (hh, i, j) times log2 e (0 without a bias). i < Lq and j < L.
__device__ __forceinline__ float attn_bias2(const AttnParams& p, unsigned hh, unsigned i,
                                            unsigned j) {
    return p.bias ? rf_load_dyn(p.bias, p.bias_dt, (hh * p.lq + i) * p.l + j) * RF_LOG2E : 0.0f;
}

// Dynamic shared memory: sc[32·T] f32, the scores of the current key tile, column t = thread.
extern "C" __global__ void __launch_bounds__(RF_ATTN_MAX_THREADS, 1) attn_fwd(const AttnParams p) {
    __shared__ float ta[RF_ATTN_TILE][DK];
    __shared__ float tb[RF_ATTN_TILE][DV];
    __shared__ float valid[RF_ATTN_TILE];
    extern __shared__ float sc[];
    const unsigned b = blockIdx.x / p.h, hh = blockIdx.x % p.h;
    const unsigned t = threadIdx.x, nt = blockDim.x;
    const unsigned passes = (p.lq + nt - 1) / nt;

    for (unsigned pass = 0; pass < passes; ++pass) {
        const unsigned i = pass * nt + t;
        const bool row = i < p.lq;
        float q[DK], acc[DV];
        attn_load_row(q, p.q, p.qkv_dt, attn_row(p, b, i, p.lq, hh, p.dk_), p.dk_, p.scale2, row);
#pragma unroll
        for (int c = 0; c < DV; ++c) {
            acc[c] = 0.0f;
        }
        float m = -RF_INF;  // running max, log2 domain
        float lsum = 0.0f;  // running Σ 2^(s − m)

        for (unsigned j0 = 0; j0 < p.l; j0 += RF_ATTN_TILE) {
            const unsigned nj = min(RF_ATTN_TILE, p.l - j0);  // keys in this tile
            attn_stage_keys(p, b, hh, j0, ta, tb, valid);
            __syncthreads();
            if (row) {
                float mt = -RF_INF;
#pragma unroll 2
                for (unsigned jj = 0; jj < nj; ++jj) {
                    float s = -RF_INF;
                    if (valid[jj] != 0.0f) {  // block-uniform
                        s = attn_bias2(p, hh, i, j0 + jj);
#pragma unroll
                        for (int c = 0; c < DK; ++c) {
                            s = fmaf(q[c], ta[jj][c], s);
                        }
                    }
                    sc[jj * nt + t] = s;
                    mt = attn_nan_max(mt, s);
                }
                const float mn = attn_nan_max(m, mt);
                if (mn != -RF_INF) {  // else: no valid key so far, nothing to add
                    const float alpha = exp2f(m - mn);  // m = −∞ -> 0
                    lsum *= alpha;
#pragma unroll
                    for (int c = 0; c < DV; ++c) {
                        acc[c] *= alpha;
                    }
#pragma unroll 2
                    for (unsigned jj = 0; jj < nj; ++jj) {
                        const float pj = exp2f(sc[jj * nt + t] - mn);  // masked: 2^−∞ = 0
                        lsum += pj;
#pragma unroll
                        for (int c = 0; c < DV; ++c) {
                            acc[c] = fmaf(pj, tb[jj][c], acc[c]);
                        }
                    }
                    m = mn;
                }
            }
            __syncthreads();  // the tile is overwritten by the next stage
        }

        if (row) {
            // lsum ≥ 1 once any key was valid (the max contributes 2^0); 0 when none was.
            const bool dead = lsum == 0.0f;
            // __fdividef (≤ 2 ulp for lsum in [1, L]): IEEE division's slow path is a called
            // subroutine whose register saves show up as a stack frame.
            attn_store_row(acc, p.o, p.o_dt, attn_row(p, b, i, p.lq, hh, p.dv_), p.dv_,
                           dead ? 0.0f : __fdividef(1.0f, lsum));
            rf_store_dyn(p.lse, p.lse_dt, (b * p.h + hh) * p.lq + i,
                         dead ? -RF_INF : (m + log2f(lsum)) * RF_LN2);
        }
    }
}

extern "C" __global__ void __launch_bounds__(RF_ATTN_MAX_THREADS, 1) attn_bwd(const AttnParams p) {
    __shared__ float ta[RF_ATTN_TILE][DK];
    __shared__ float tb[RF_ATTN_TILE][DV];
    __shared__ float va[RF_ATTN_TILE];
    __shared__ float vb[RF_ATTN_TILE];
    const unsigned b = blockIdx.x / p.h, hh = blockIdx.x % p.h;
    const unsigned t = threadIdx.x, nt = blockDim.x;

    // ---- Phase 1: threads over query rows -> D_i, dQ_i.
    const unsigned row_passes = (p.lq + nt - 1) / nt;
    for (unsigned pass = 0; pass < row_passes; ++pass) {
        const unsigned i = pass * nt + t;
        const bool row = i < p.lq;
        const unsigned r = (b * p.h + hh) * p.lq + i;
        float lse2 = -RF_INF;
        float dsum = 0.0f;  // D_i
        float q[DK], dq[DK], go[DV];
        attn_load_row(q, p.q, p.qkv_dt, attn_row(p, b, i, p.lq, hh, p.dk_), p.dk_, p.scale2, row);
        attn_load_row(go, p.d_o, p.do_dt, attn_row(p, b, i, p.lq, hh, p.dv_), p.dv_, 1.0f, row);
        if (row) {
            // D_i = dO_i·O_i with both re-read element by element (dO from L1): holding O as a
            // second [DV] register row would cost DV registers at the kernel's peak.
            const unsigned e0 = attn_row(p, b, i, p.lq, hh, p.dv_);
#pragma unroll 4
            for (unsigned c = 0; c < p.dv_; ++c) {
                dsum = fmaf(rf_load_dyn(p.d_o, p.do_dt, e0 + c), rf_load_dyn(p.o, p.o_dt, e0 + c),
                            dsum);
            }
        }
#pragma unroll
        for (int c = 0; c < DK; ++c) {
            dq[c] = 0.0f;
        }
        if (row) {
            lse2 = rf_load_dyn(p.lse, p.lse_dt, r) * RF_LOG2E;
            reinterpret_cast<float*>(p.dws)[r] = dsum;
        }
        const bool live = row && lse2 != -RF_INF;  // an all-masked row keeps dQ = 0

        for (unsigned j0 = 0; j0 < p.l; j0 += RF_ATTN_TILE) {
            const unsigned nj = min(RF_ATTN_TILE, p.l - j0);
            attn_stage_keys(p, b, hh, j0, ta, tb, va);
            __syncthreads();
            if (live) {
#pragma unroll 2
                for (unsigned jj = 0; jj < nj; ++jj) {
                    if (va[jj] == 0.0f) {
                        continue;  // masked key: P = 0 (block-uniform branch)
                    }
                    float s = attn_bias2(p, hh, i, j0 + jj);
#pragma unroll
                    for (int c = 0; c < DK; ++c) {
                        s = fmaf(q[c], ta[jj][c], s);
                    }
                    float dp = 0.0f;
#pragma unroll
                    for (int c = 0; c < DV; ++c) {
                        dp = fmaf(go[c], tb[jj][c], dp);
                    }
                    const float ds = exp2f(s - lse2) * (dp - dsum);
                    const volatile float* kr = ta[jj];  // re-read, do not keep K alive
#pragma unroll
                    for (int c = 0; c < DK; ++c) {
                        dq[c] = fmaf(ds, kr[c], dq[c]);
                    }
                }
            }
            __syncthreads();
        }
        if (row) {
            attn_store_row(dq, p.dq, p.qkv_dt, attn_row(p, b, i, p.lq, hh, p.dk_), p.dk_, p.scale);
        }
    }
    // The last tile loop ended with a __syncthreads, so every D_i of (b, h) is now visible.

    // ---- Phase 2: threads over keys -> dV_j (pass A), dK_j (pass B).
    const unsigned key_passes = (p.l + nt - 1) / nt;
    for (unsigned pass = 0; pass < key_passes; ++pass) {
        const unsigned j = pass * nt + t;
        bool keep = j < p.l;
        if (keep && p.mask) {
            keep = rf_load_dyn(p.mask, p.mask_dt, b * p.l + j) != 0.0f;
        }
        float k[DK];
        attn_load_row(k, p.k, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dk_), p.dk_, p.scale2, keep);

        // Pass A: dV_j = Σ_i P_ij dO_i.
        {
            float dv[DV];
#pragma unroll
            for (int c = 0; c < DV; ++c) {
                dv[c] = 0.0f;
            }
            for (unsigned i0 = 0; i0 < p.lq; i0 += RF_ATTN_TILE) {
                const unsigned ni = min(RF_ATTN_TILE, p.lq - i0);
                attn_stage_queries(p, b, hh, i0, ni, 1.0f, ta, tb, va, vb);
                __syncthreads();
                if (keep) {
#pragma unroll 2
                    for (unsigned ii = 0; ii < ni; ++ii) {
                        float s = attn_bias2(p, hh, i0 + ii, j);
#pragma unroll
                        for (int c = 0; c < DK; ++c) {
                            s = fmaf(ta[ii][c], k[c], s);
                        }
                        const float pij = exp2f(s - va[ii]);  // dead row: 2^−∞ = 0
#pragma unroll
                        for (int c = 0; c < DV; ++c) {
                            dv[c] = fmaf(pij, tb[ii][c], dv[c]);
                        }
                    }
                }
                __syncthreads();
            }
            if (j < p.l) {
                attn_store_row(dv, p.dv, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dv_), p.dv_, 1.0f);
            }
        }

        // Pass B: dK_j = scale·Σ_i dS_ij q_i.
        {
            float v[DV], dk[DK];
            attn_load_row(v, p.v, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dv_), p.dv_, 1.0f, keep);
#pragma unroll
            for (int c = 0; c < DK; ++c) {
                dk[c] = 0.0f;
            }
            for (unsigned i0 = 0; i0 < p.lq; i0 += RF_ATTN_TILE) {
                const unsigned ni = min(RF_ATTN_TILE, p.lq - i0);
                attn_stage_queries(p, b, hh, i0, ni, 1.0f, ta, tb, va, vb);
                __syncthreads();
                if (keep) {
#pragma unroll 2
                    for (unsigned ii = 0; ii < ni; ++ii) {
                        float s = attn_bias2(p, hh, i0 + ii, j);
#pragma unroll
                        for (int c = 0; c < DK; ++c) {
                            s = fmaf(ta[ii][c], k[c], s);
                        }
                        float dp = 0.0f;
#pragma unroll
                        for (int c = 0; c < DV; ++c) {
                            dp = fmaf(tb[ii][c], v[c], dp);
                        }
                        const float ds = exp2f(s - va[ii]) * (dp - vb[ii]);
                        const volatile float* qr = ta[ii];
#pragma unroll
                        for (int c = 0; c < DK; ++c) {
                            dk[c] = fmaf(ds, qr[c], dk[c]);
                        }
                    }
                }
                __syncthreads();
            }
            if (j < p.l) {
                attn_store_row(dk, p.dk, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dk_), p.dk_,
                               p.scale);
            }
        }
    }
}

// d bias partial sums: block (x = h·⌈Lq/8⌉ + row tile, y = split s), threads over keys. Per
// sample the block stages its 8 query rows (q·scale·log2 e, dO, LSE·log2 e, D) in shared
// memory; D comes from dws, written by attn_bwd (queued before it on the same stream).
extern "C" __global__ void __launch_bounds__(RF_ATTN_MAX_THREADS, 1)
    attn_dbias_partial(const AttnParams p) {
    __shared__ float qs[RF_ATTN_DBIAS_ROWS][DK];
    __shared__ float gs[RF_ATTN_DBIAS_ROWS][DV];
    __shared__ float l2s[RF_ATTN_DBIAS_ROWS];
    __shared__ float dds[RF_ATTN_DBIAS_ROWS];
    const unsigned tiles = (p.lq + RF_ATTN_DBIAS_ROWS - 1) / RF_ATTN_DBIAS_ROWS;
    const unsigned hh = blockIdx.x / tiles;
    const unsigned i0 = (blockIdx.x % tiles) * RF_ATTN_DBIAS_ROWS;
    const unsigned nr = min(RF_ATTN_DBIAS_ROWS, p.lq - i0);  // rows in this tile
    const unsigned s = blockIdx.y;
    const unsigned b0 = s * p.b_per_split;
    const unsigned b1 = min(p.b, b0 + p.b_per_split);
    const unsigned t = threadIdx.x, nt = blockDim.x;
    const unsigned key_passes = (p.l + nt - 1) / nt;

    for (unsigned pass = 0; pass < key_passes; ++pass) {
        const unsigned j = pass * nt + t;
        const bool key = j < p.l;
        float acc[RF_ATTN_DBIAS_ROWS];
        float bias2[RF_ATTN_DBIAS_ROWS];
#pragma unroll
        for (int r = 0; r < RF_ATTN_DBIAS_ROWS; ++r) {
            acc[r] = 0.0f;
            bias2[r] = (key && (unsigned)r < nr) ? attn_bias2(p, hh, i0 + r, j) : 0.0f;
        }
        for (unsigned b = b0; b < b1; ++b) {
            attn_stage_queries(p, b, hh, i0, nr, p.scale2, qs, gs, l2s, dds);
            bool keep = key;
            if (keep && p.mask) {
                keep = rf_load_dyn(p.mask, p.mask_dt, b * p.l + j) != 0.0f;
            }
            float k[DK], v[DV];
            attn_load_row(k, p.k, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dk_), p.dk_, 1.0f, keep);
            attn_load_row(v, p.v, p.qkv_dt, attn_row(p, b, j, p.l, hh, p.dv_), p.dv_, 1.0f, keep);
            __syncthreads();
            if (keep) {  // a masked key has P = 0, so dS = 0
#pragma unroll
                for (int r = 0; r < RF_ATTN_DBIAS_ROWS; ++r) {
                    if ((unsigned)r < nr) {  // block-uniform
                        float sc = bias2[r];
#pragma unroll
                        for (int c = 0; c < DK; ++c) {
                            sc = fmaf(qs[r][c], k[c], sc);
                        }
                        float dp = 0.0f;
#pragma unroll
                        for (int c = 0; c < DV; ++c) {
                            dp = fmaf(gs[r][c], v[c], dp);
                        }
                        // A dead row has l2s = +∞: P = 0.
                        acc[r] += exp2f(sc - l2s[r]) * (dp - dds[r]);
                    }
                }
            }
            __syncthreads();  // the rows are restaged for the next sample
        }
        if (key) {
#pragma unroll
            for (int r = 0; r < RF_ATTN_DBIAS_ROWS; ++r) {
                if ((unsigned)r < nr) {
                    const unsigned e = (hh * p.lq + i0 + r) * p.l + j;
                    if (p.splits == 1u) {
                        rf_store_dyn(p.dbias, p.dbias_dt, e, acc[r]);
                    } else {
                        reinterpret_cast<float*>(p.dbias_ws)[s * (p.h * p.lq * p.l) + e] = acc[r];
                    }
                }
            }
        }
    }
}

// One thread per d bias element e < H·Lq·L: Σ_{s < S} partials in order.
extern "C" __global__ void __launch_bounds__(256) attn_dbias_finish(const AttnParams p) {
    const unsigned n = p.h * p.lq * p.l;
    const unsigned e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) {
        return;
    }
    const float* ws = reinterpret_cast<const float*>(p.dbias_ws);
    float total = 0.0f;
    for (unsigned s = 0; s < p.splits; ++s) {
        total += ws[s * n + e];
    }
    rf_store_dyn(p.dbias, p.dbias_dt, e, total);
}
