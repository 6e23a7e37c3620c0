// recfuse fused multi-tensor optimizers (src/ops/optim.rs). The WGSL twin is
// kernels/wgsl/optim.wgsl (same per-thread work split and indexing; one dispatch per tensor
// there, since WGSL has no device pointers).
//
// Math (f32; the order of operations is `OptHyper::elem` / cpu::optim on the host; h[] are
// host-computed scalars of the step, so the step count never needs a device round trip):
//   SGD (torch.optim.SGD):  d = g (+ wd·p);  momentum: b = (t == 1 ? d : μ·b + (1−τ)·d),
//                           d = nesterov ? d + μ·b : b;   p = p − lr·d
//   Adam / AdamW (torch.optim.Adam / AdamW, amsgrad off): Adam g += wd·p; AdamW p *= 1 − lr·wd;
//                           m = m + (1−β1)(g − m);  v = v·β2 + (1−β2)·g·g;
//                           p = p − (lr/(1−β1^t))·m/(√v/√(1−β2^t) + ε)
//   Row-wise Adagrad (FBGEMM exact_rowwise_adagrad): per row r of a [rows, D] table,
//                           g += wd·p (L2, optional);  s[r] += Σ_j g_j²/D;
//                           p_j −= lr/(√s[r] + ε)·g_j
//   With an f32 master copy, the master is the value updated and the 16-bit param receives its
//   rounding. States are f32; param bf16/f16/f32, grad any dtype (runtime codes, as gemm_aux.cu).
//
// Multi-tensor layout: the kernel parameter block carries up to OPT_MAX_TENSORS (32) tensor
// entries by value (addresses, sizes, dtypes, first block) — 1.8 KB, under the 4 KB parameter
// limit — as PyTorch's multi_tensor_apply does, so a step uploads nothing. Tensor i owns blocks
// [block0_i, block0_{i+1}); a block picks its entry with a fully unrolled scan over constant
// indices (no dynamically indexed parameter memory, hence no local-memory copy).
//
// Launch geometry: 256 threads per block.
//   sgd_step / adam_step: local block b of tensor i, thread t: element pair k = 2(256b + t),
//     k+1; blocks per tensor ⌈⌈n/2⌉/256⌉. n < 2^31 per tensor, so 2t + 1 fits 32 bits.
//   rowwise_adagrad_step: one block per row; thread t owns column pairs c = t, t + 256, …
//     (columns 2c, 2c+1), sums their g² in that order, then a fixed shared-memory tree
//     (deterministic; no atomics); every thread reads the total, thread 0 writes s[r].
//
// Memory traffic per element (f32 param/grad/state; the limiter is HBM bandwidth):
//   SGD + momentum:  p r/w 8 + g 4 + b r/w 8 = 20 B;  plain SGD: 12 B.
//   Adam:            p 8 + g 4 + m 8 + v 8   = 28 B;  bf16 param + bf16 grad + f32 master:
//                    4 + 2 + 8 + 16 = 30 B.
//   Row-wise Adagrad: p 8 + g 4 = 12 B (+8 B per row of state) — FBGEMM's point: state is
//                    1/D of Adam's.
//   At ~90% of the H200's 4.8 TB/s, Adam over 10^8 f32 parameters: 2.8 GB → ≈ 0.65 ms.
//   Compute is a handful of FLOP + one sqrt per element: far under the FLOP/byte balance.

#define OPT_MAX_TENSORS 32
#define OPT_THREADS 256

#define OPT_SGD_MOMENTUM 1u
#define OPT_SGD_NESTEROV 2u
#define OPT_SGD_FIRST 4u
#define OPT_WEIGHT_DECAY 8u
#define OPT_ADAM_DECOUPLED 16u

// Mirrors `OptEntry` in src/cuda/optim.rs (#[repr(C)], 56 bytes).
struct OptEntry {
    unsigned long long p, g, s1, s2, m;  // s1, s2, m = 0 when absent
    unsigned n;       // elements (SGD, Adam) or rows (Adagrad)
    unsigned dim;     // row length (Adagrad), 1 otherwise
    unsigned block0;  // first block of this tensor
    unsigned dts;     // param dtype | grad dtype << 8
};
static_assert(sizeof(OptEntry) == 56, "OptEntry layout must match the host");

// Mirrors `OptParams` in src/cuda/optim.rs (#[repr(C)], 1840 bytes).
struct OptParams {
    float h[8];
    unsigned flags, count, pad0_, pad1_;
    OptEntry e[OPT_MAX_TENSORS];
};
static_assert(sizeof(OptParams) == 1840, "OptParams layout must match the host");

// The entry owning this block, selected with constant indices only.
__device__ __forceinline__ OptEntry opt_entry(const OptParams& p) {
    OptEntry sel = p.e[0];
#pragma unroll
    for (unsigned j = 1; j < OPT_MAX_TENSORS; ++j) {
        if (j < p.count && p.e[j].block0 <= blockIdx.x) {
            sel = p.e[j];
        }
    }
    return sel;
}

// The value being updated: the f32 master when present, else the parameter itself.
__device__ __forceinline__ float opt_load_p(const OptEntry& e, unsigned k) {
    return e.m ? reinterpret_cast<const float*>(e.m)[k] : rf_load_dyn(e.p, e.dts & 0xffu, k);
}

__device__ __forceinline__ void opt_store_p(const OptEntry& e, unsigned k, float v) {
    if (e.m) {
        reinterpret_cast<float*>(e.m)[k] = v;
    }
    rf_store_dyn(e.p, e.dts & 0xffu, k, v);
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS) sgd_step(const OptParams p) {
    const OptEntry e = opt_entry(p);
    const unsigned t = (blockIdx.x - e.block0) * OPT_THREADS + threadIdx.x;
    const bool wd = p.flags & OPT_WEIGHT_DECAY;
    for (unsigned h = 0; h < 2u; ++h) {
        const unsigned k = 2u * t + h;
        if (k >= e.n) {
            return;
        }
        const float pv = opt_load_p(e, k);
        float d = rf_load_dyn(e.g, e.dts >> 8, k);
        if (wd) {
            d += p.h[3] * pv;
        }
        if (p.flags & OPT_SGD_MOMENTUM) {
            float* buf = reinterpret_cast<float*>(e.s1);
            const float b = (p.flags & OPT_SGD_FIRST) ? d : p.h[1] * buf[k] + p.h[2] * d;
            buf[k] = b;
            d = (p.flags & OPT_SGD_NESTEROV) ? d + p.h[1] * b : b;
        }
        opt_store_p(e, k, pv - p.h[0] * d);
    }
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS) adam_step(const OptParams p) {
    const OptEntry e = opt_entry(p);
    const unsigned t = (blockIdx.x - e.block0) * OPT_THREADS + threadIdx.x;
    const bool wd = p.flags & OPT_WEIGHT_DECAY;
    const bool decoupled = p.flags & OPT_ADAM_DECOUPLED;
    float* ms = reinterpret_cast<float*>(e.s1);
    float* vs = reinterpret_cast<float*>(e.s2);
    for (unsigned h = 0; h < 2u; ++h) {
        const unsigned k = 2u * t + h;
        if (k >= e.n) {
            return;
        }
        float pv = opt_load_p(e, k);
        float g = rf_load_dyn(e.g, e.dts >> 8, k);
        if (decoupled) {
            if (wd) {
                pv *= p.h[7];
            }
        } else if (wd) {
            g += p.h[6] * pv;
        }
        const float m = ms[k] + p.h[2] * (g - ms[k]);
        const float v = vs[k] * p.h[3] + p.h[4] * g * g;
        ms[k] = m;
        vs[k] = v;
        const float denom = sqrtf(v) / p.h[1] + p.h[5];
        opt_store_p(e, k, pv - p.h[0] * (m / denom));
    }
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS) rowwise_adagrad_step(
    const OptParams p) {
    __shared__ float red[OPT_THREADS];
    const OptEntry e = opt_entry(p);
    const unsigned row = blockIdx.x - e.block0;
    const unsigned base = row * e.dim;  // rows·dim < 2^31 (checked by the host)
    const unsigned cpairs = (e.dim + 1u) / 2u;
    const bool l2 = p.flags & OPT_WEIGHT_DECAY;
    float acc = 0.0f;
    for (unsigned c = threadIdx.x; c < cpairs; c += OPT_THREADS) {
        for (unsigned h = 0; h < 2u; ++h) {
            const unsigned j = 2u * c + h;
            if (j < e.dim) {
                float g = rf_load_dyn(e.g, e.dts >> 8, base + j);
                if (l2) {
                    g += p.h[2] * opt_load_p(e, base + j);
                }
                acc += g * g;
            }
        }
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned off = OPT_THREADS / 2; off > 0; off >>= 1) {
        if (threadIdx.x < off) {
            red[threadIdx.x] += red[threadIdx.x + off];
        }
        __syncthreads();
    }
    float* st = reinterpret_cast<float*>(e.s1);
    const float s = st[row] + red[0] / (float)e.dim;
    const float mult = p.h[0] / (sqrtf(s) + p.h[1]);
    for (unsigned c = threadIdx.x; c < cpairs; c += OPT_THREADS) {
        for (unsigned h = 0; h < 2u; ++h) {
            const unsigned j = 2u * c + h;
            if (j < e.dim) {
                const float pv = opt_load_p(e, base + j);
                float g = rf_load_dyn(e.g, e.dts >> 8, base + j);
                if (l2) {
                    g += p.h[2] * pv;
                }
                opt_store_p(e, base + j, pv - mult * g);
            }
        }
    }
    // Every thread read st[row] above; the write waits until they all have.
    __syncthreads();
    if (threadIdx.x == 0) {
        st[row] = s;
    }
}
