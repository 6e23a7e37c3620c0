// recfuse embedding bags (src/ops/embedding.rs): table-batched pooled lookups and the sparse
// backward fused with the optimizer. The WGSL twin is kernels/wgsl/embedding.wgsl (same grid,
// same indexing, same order of f32 additions); the CPU twin is src/cpu/embedding.rs.
//
// Data (all prepared by the host; every index fits 31 bits, checked there):
//   meta  — u32 words: per table t, 6 words (elem_off, pitch, col_off, dim, rows_off, rows),
//           then the column → table map (total_dim words). Uploaded once per collection.
//   batch — u32 words, one upload per step: bag_off [T·B + 1] (bag (t, s) = lookups
//           bag_off[t·B+s] .. bag_off[t·B+s+1]), idx [nnz] (row of the bag's table), wgt [nnz]
//           (f32 bits: per-sample weight, × 1/n for mean pooling), then the backward segments:
//           seg_table [U], seg_row [U], seg_off [U + 1] (each touched row once, increasing),
//           occ_bag [nnz] (sample of each occurrence), occ_wgt [nnz] (its weight).
//   w     — the flat table buffer: row r of table t at elem_off + r·pitch; pitch = dim, or dim
//           rounded up to even for 16-bit tables, so rows start on 32-bit words (the WGSL twin
//           writes whole words; the pad element is never read into an output).
//
// emb_fwd — out[s, col] = Σ_{j ∈ bag(t, s)} wgt[j] · W_t[idx[j], col − col_off_t], t = table of
//   col, summed in increasing j. Thread q owns output elements 2q, 2q+1 (one u32 word of a
//   16-bit out in WGSL), 256 threads per block. Adjacent threads read adjacent columns of the
//   same rows: coalesced gathers.
//   Cost per step: FLOPs 2·nnz·d̄ (d̄ the mean width); bytes ≈ nnz·d̄·s_w (the gathered rows,
//   each read once per bag they occur in) + B·total_dim·s_out + (T·B + 2·nnz)·4 (metadata,
//   re-read from L1/L2 by the columns of a bag). Memory-bound by the random row gathers: a
//   row of 64 f32 is 256 B, two full 128-B lines, so gathers run near streaming bandwidth; we
//   predict ≈ 60–75% of the H200's 4.8 TB/s at B = 65536, 26 tables, d = 64, 1 lookup each
//   (prediction, not measured: no GPU run yet).
//
// emb_grad / emb_update — one block of 64 threads per touched row u (segment): the row's
//   gradient g[c] = Σ_{k ∈ seg(u)} occ_wgt[k] · dy[occ_bag[k], col_off + c] in increasing k
//   (fixed order: deterministic, no atomics; every row has exactly one writer block). Lane l
//   owns the column pairs m = l, l + 64, … (columns 2m, 2m + 1).
//   emb_grad writes g into the zeroed f32 dense gradient. emb_update applies, in the same
//   kernel (FBGEMM's fused backward):
//     mode 0, SGD:               g' = g (+ wd·w);  w ← w − lr·g'
//     mode 1, row-wise Adagrad:  g' = g (+ wd·w);  s_r ← s_r + (Σ_c g'²)/dim;
//                                w ← w − lr/(√s_r + ε) · g'
//   The Σ g'² is each lane's partial over its pairs (in m order, then column order), reduced
//   over the 64 lanes with a fixed shared-memory tree (halving strides); the gradient is
//   recomputed in the second pass rather than kept (no per-dim register array: any width).
//   Bytes per touched row: occurrences × dim × s_dy (the dy gathers, twice for Adagrad) +
//   2·dim·s_w; FLOPs ≈ 2·occ·dim. Memory/latency-bound; long segments (hot rows) serialise
//   inside one block, as FBGEMM's non-split path does (a prediction: ≈ 30–50% of HBM
//   bandwidth on skewed batches; not measured).

// Mirrors `EmbFwdParams` in src/cuda/embedding.rs (#[repr(C)], 80 bytes).
struct EmbFwdParams {
    unsigned long long meta, batch, w, out;
    unsigned b, n_tables, total_dim, n_out;
    unsigned col_at, bag_at, idx_at, wgt_at;
    unsigned w_dt, pad0_, pad1_, pad2_;
};
static_assert(sizeof(EmbFwdParams) == 80, "EmbFwdParams layout must match the host");

// Mirrors `EmbRowParams` in src/cuda/embedding.rs (#[repr(C)], 104 bytes).
struct EmbRowParams {
    unsigned long long meta, batch, dy, w, state;  // w: the f32 gradient for emb_grad
    unsigned total_dim, segments, seg_table_at, seg_row_at;
    unsigned seg_off_at, occ_bag_at, occ_wgt_at, dy_dt;
    unsigned w_dt, mode, decay, pad_;
    float lr, eps, wd, pad2_;
};
static_assert(sizeof(EmbRowParams) == 104, "EmbRowParams layout must match the host");

#define RF_EMB_FWD_THREADS 256
#define RF_EMB_LANES 64

// One pooled output element k of out[B, total_dim].
__device__ __forceinline__ float rf_emb_pool(const EmbFwdParams& p, unsigned k) {
    const unsigned* meta = reinterpret_cast<const unsigned*>(p.meta);
    const unsigned* bt = reinterpret_cast<const unsigned*>(p.batch);
    const unsigned s = k / p.total_dim, col = k % p.total_dim;
    const unsigned t = meta[p.col_at + col];
    const unsigned elem_off = meta[6u * t], pitch = meta[6u * t + 1u];
    const unsigned c = col - meta[6u * t + 2u];
    const unsigned bag = t * p.b + s;
    const unsigned lo = bt[p.bag_at + bag], hi = bt[p.bag_at + bag + 1u];
    float acc = 0.0f;
    for (unsigned j = lo; j < hi; ++j) {
        const float wj = __uint_as_float(bt[p.wgt_at + j]);
        acc += wj * rf_load_dyn(p.w, p.w_dt, elem_off + bt[p.idx_at + j] * pitch + c);
    }
    return acc;
}

extern "C" __global__ void __launch_bounds__(RF_EMB_FWD_THREADS) emb_fwd(const EmbFwdParams p) {
    const unsigned q = blockIdx.x * RF_EMB_FWD_THREADS + threadIdx.x;
    for (unsigned h = 0; h < 2u; ++h) {
        const unsigned k = 2u * q + h;
        if (k >= p.n_out) {
            return;
        }
        rf_store_dyn(p.out, p.w_dt, k, rf_emb_pool(p, k));
    }
}

// Where segment u's row lives and which occurrences feed it.
struct RfEmbRow {
    unsigned base, col_off, dim, state_row, lo, hi;
};

__device__ __forceinline__ RfEmbRow rf_emb_row(const EmbRowParams& p, unsigned u) {
    const unsigned* meta = reinterpret_cast<const unsigned*>(p.meta);
    const unsigned* bt = reinterpret_cast<const unsigned*>(p.batch);
    const unsigned t = bt[p.seg_table_at + u], row = bt[p.seg_row_at + u];
    RfEmbRow r;
    r.base = meta[6u * t] + row * meta[6u * t + 1u];
    r.col_off = meta[6u * t + 2u];
    r.dim = meta[6u * t + 3u];
    r.state_row = meta[6u * t + 4u] + row;
    r.lo = bt[p.seg_off_at + u];
    r.hi = bt[p.seg_off_at + u + 1u];
    return r;
}

// g[c] of the row: its occurrences' weighted dy, in increasing occurrence.
__device__ __forceinline__ float rf_emb_grad(const EmbRowParams& p, const RfEmbRow& r,
                                             unsigned c) {
    const unsigned* bt = reinterpret_cast<const unsigned*>(p.batch);
    float g = 0.0f;
    for (unsigned k = r.lo; k < r.hi; ++k) {
        const float wk = __uint_as_float(bt[p.occ_wgt_at + k]);
        g += wk * rf_load_dyn(p.dy, p.dy_dt, bt[p.occ_bag_at + k] * p.total_dim + r.col_off + c);
    }
    return g;
}

extern "C" __global__ void __launch_bounds__(RF_EMB_LANES) emb_grad(const EmbRowParams p) {
    const unsigned u = blockIdx.x;
    if (u >= p.segments) {
        return;
    }
    const RfEmbRow r = rf_emb_row(p, u);
    float* grad = reinterpret_cast<float*>(p.w);
    for (unsigned m = threadIdx.x; 2u * m < r.dim; m += RF_EMB_LANES) {
        for (unsigned h = 0; h < 2u; ++h) {
            const unsigned c = 2u * m + h;
            if (c < r.dim) {
                grad[r.base + c] = rf_emb_grad(p, r, c);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(RF_EMB_LANES) emb_update(const EmbRowParams p) {
    __shared__ float part[RF_EMB_LANES];
    __shared__ float mult_s[1];
    const unsigned u = blockIdx.x;
    if (u >= p.segments) {
        return;
    }
    const unsigned lane = threadIdx.x;
    const RfEmbRow r = rf_emb_row(p, u);
    float mult = p.lr;
    if (p.mode == 1u) {
        float sq = 0.0f;
        for (unsigned m = lane; 2u * m < r.dim; m += RF_EMB_LANES) {
            for (unsigned h = 0; h < 2u; ++h) {
                const unsigned c = 2u * m + h;
                if (c < r.dim) {
                    float g = rf_emb_grad(p, r, c);
                    if (p.decay) {
                        g += p.wd * rf_load_dyn(p.w, p.w_dt, r.base + c);
                    }
                    sq += g * g;
                }
            }
        }
        part[lane] = sq;
        __syncthreads();
        for (unsigned off = RF_EMB_LANES / 2; off > 0; off >>= 1) {
            if (lane < off) {
                part[lane] += part[lane + off];
            }
            __syncthreads();
        }
        if (lane == 0) {
            float* state = reinterpret_cast<float*>(p.state);
            const float st = state[r.state_row] + part[0] / static_cast<float>(r.dim);
            state[r.state_row] = st;
            mult_s[0] = p.lr / (sqrtf(st) + p.eps);
        }
        __syncthreads();
        mult = mult_s[0];
    }
    for (unsigned m = lane; 2u * m < r.dim; m += RF_EMB_LANES) {
        for (unsigned h = 0; h < 2u; ++h) {
            const unsigned c = 2u * m + h;
            if (c < r.dim) {
                const float w = rf_load_dyn(p.w, p.w_dt, r.base + c);
                float g = rf_emb_grad(p, r, c);
                if (p.decay) {
                    g += p.wd * w;
                }
                rf_store_dyn(p.w, p.w_dt, r.base + c, w - mult * g);
            }
        }
    }
}
