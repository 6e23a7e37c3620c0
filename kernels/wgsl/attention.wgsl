// attention.wgsl — the attention core of the heterogeneous-attention and Hiformer layers
// (src/ops/attention.rs is the authority; src/cpu/attention.rs computes the same in f32).
//
// Math (per sample b, head h, query row i, key j; scale = 1/√d_k unless given):
//   S_ij = scale·⟨Q_i, K_j⟩ (+ bias_hij)          key j valid when mask(b, j) ≠ 0 (no mask: all)
//   P_ij = exp(S_ij − LSE_i) over valid j,  LSE_i = log Σ_valid exp(S_ij)
//   O_i  = Σ_j P_ij·V_j
//   A row with no valid key gives O_i = 0 and LSE_i = −∞ (f32 bits 0xff800000), never NaN. A
//   masked key is never read (staged as 0); a NaN score of a valid key makes its row NaN.
//   Backward (FlashAttention-2 form, P recomputed from LSE):
//   D_i = ⟨dO_i, O_i⟩   dP_ij = ⟨dO_i, V_j⟩   dS_ij = P_ij·(dP_ij − D_i)
//   dV_j = Σ_i P_ij·dO_i   dK_j = scale·Σ_i dS_ij·Q_i   dQ_i = scale·Σ_j dS_ij·K_j
//   dbias_hij = Σ_b dS_ij (b ascending; rows with no valid key contribute exactly 0)
//
// Layouts (all dense row-major; element index → word as in common.wgsl):
//   Q, dQ  [B, Lq, H, DK]: ((b·Lq + i)·H + h)·DK + c      K, dK [B, L, H, DK]: ((b·L + j)·H + h)·DK + c
//   O, dO  [B, Lq, H, DV]: ((b·Lq + i)·H + h)·DV + c      V, dV [B, L, H, DV]: ((b·L + j)·H + h)·DV + c
//   LSE    [B, H, Lq]    : r = (b·H + h)·Lq + i           bias, dbias [H, Lq, L]: (h·Lq + i)·L + j
//   mask   [B, L]        : b·L + j
//   stats  (f32 scratch) : word 2r = D_r, word 2r+1 = LSE_r (bits kept, −∞ included)
//   Lq ≤ L: with query pruning the queries are the last Lq tokens, but the kernels never need
//   to know which tokens they are (bias is already [H, Lq, L]).
//
// Tiling (the CUDA twin kernels/cuda/attention.cu follows the same structure):
//   QT query rows × KT keys per tile; the host picks QT = KT = t, the largest t in
//   {32, 16, 8, 4, 2, 1} whose workgroup arrays (below) fit the adapter's
//   maxComputeWorkgroupStorageSize (32 at the paper's DK = 16, DV = 64 on 32 KiB; 16 on the
//   WebGPU default of 16 KiB). Every workgroup has WG = 64 threads; every per-element phase is
//   a strided loop `for (t = tid; t < N; t += WG)` over a flattened tile index (row-major, last
//   index fastest), so a given flat index t is always handled by the same thread (tid = t mod
//   WG) — that is what lets accumulators live in workgroup memory (or, for dK/dV, in global
//   f32 memory) without extra barriers. Key tiles are streamed with an online softmax
//   whatever L is (one tile when L ≤ KT); edges (L, Lq not multiples of the tile) are
//   zero-filled and masked.
//
// attn_forward_main — one workgroup per (query block qb, head h, sample b):
//   grid = (⌈Lq/QT⌉, H, B), linear id = qb + nqb·(h + H·b) (folded by the host when large).
//   Stage Qs[QT][DK]; Oacc[QT][DV] = 0; m_i = −3e38 (finite "−∞"); l_i = 0. Per key tile k0:
//     1. load Ks[KT][DK], Vs[KT][DV], valid[KT] (j < L and mask ≠ 0)              barrier
//     2. S[i][j] = scale·⟨Qs_i, Ks_j⟩ + bias, over (i, j) ∈ QT×KT                   barrier
//     3. per row i (thread i): m' = max(m, max_valid S_i·); S[i][j] = valid ? exp(S − m') : 0;
//        α_i = exp(m − m'); l = α·l + Σ_j S[i][j]; m = m'                          barrier
//     4. Oacc[i][c] = α_i·Oacc[i][c] + Σ_{j: S≠0} S[i][j]·Vs[j][c], over (i, c) ∈ QT×DV  barrier
//   Finally O_i = l > 0 ? Oacc_i / l : 0 and LSE_i = l > 0 ? m + log l : −∞ (l ≥ 1 whenever a
//   valid key exists, so l = 0 means "all masked"). O is written as f32 words to `o_out` (O
//   itself when f32; for 16-bit O compact f32 scratch that cast_main then rounds, one whole
//   output word per thread).
//   Workgroup memory (f32): QT·DK + KT·DK + KT·DV + QT·KT + QT·DV + 3·QT + KT.
//
// attn_bw_stats_main — the FA-2 preprocess, one thread per LSE row r (256 per workgroup):
//   stats[2r] = ⟨dO_r, O_r⟩, stats[2r+1] = LSE_r. A row is "valid" when its LSE is finite.
//
// attn_backward_main — one workgroup per (head h, sample b), which owns the whole sequence
//   of (b, h): grid = (H, B), linear id = h + H·b. For each query block q0 (ascending):
//     load Qs, dOs, D, LSE, row-valid; dQacc[QT][DK] = 0                           barrier
//     per key tile k0 (ascending):
//       load Ks, Vs, valid                                                          barrier
//       P[i][j] = exp(scale·⟨Q_i, K_j⟩ + bias − LSE_i), dS[i][j] = P·(⟨dO_i, V_j⟩ − D_i)
//         (both 0 unless the row and the key are valid)                             barrier
//       dV[j][c] (+)= Σ_i P[i][j]·dOs[i][c]           (j, c) ∈ KT×DV   global f32, "=" when q0 = 0
//       dK[j][c] (+)= scale·Σ_i dS[i][j]·Qs[i][c]     (j, c) ∈ KT×DK   global f32, "=" when q0 = 0
//       dQacc[i][c] += Σ_j dS[i][j]·Ks[j][c]          (i, c) ∈ QT×DK   workgroup       barrier
//     dQ_i = scale·dQacc_i.
//   Every dK/dV element is written by one workgroup and, inside it, always by the same thread,
//   so the read-modify-writes need no atomics and the sums have a fixed order (deterministic).
//   The three gradients go to one f32 scratch buffer (regions at dq_off, dk_off, dv_off, so the
//   kernel binds 8 storage buffers, the WebGPU baseline) that cast_main rounds into dQ, dK, dV.
//   Workgroup memory (f32): 2·QT·DK + QT·DV + KT·DK + KT·DV + 2·QT·KT + 3·QT + KT.
//
// attn_dbias_main — one workgroup per (query block qb, head h): grid = (⌈Lq/QT⌉, H).
//   Per key tile: dB[QT][KT] = 0; for b = 0 .. B−1 in order: reload the query block of b and
//   the key tile (barrier), dB[i][j] += dS_ij recomputed as above by the thread owning (i, j)
//   (barrier); then write dbias (f32 words: the tensor itself, or scratch for cast_main).
//   Fixed order over b → deterministic.
//   Workgroup memory (f32): QT·DK + QT·DV + KT·DK + KT·DV + QT·KT + 3·QT + KT.
//
// cast_main — dst(e) = round_dt(src[src_off + e]) for e < numel, one thread per output word
//   (256 per workgroup), so two threads never share a 16-bit word.
//
// Variants (overrides): QT, KT, DK, DV and the array lengths QK_LEN = QT·DK, QV_LEN = QT·DV,
//   KK_LEN = KT·DK, KV_LEN = KT·DV, S_LEN = QT·KT and the divisors DK_DIV, DV_DIV (the host
//   passes each at least 1, so DK = 0 or DV = 0 still compiles); DT_QKV (Q, K, V), DT_BIAS, DT_MASK, DT_O, DT_DO, DT_LSE,
//   DT_DST dtype codes (0 f32, 1 bf16, 2 f16); HAS_BIAS, HAS_MASK.
//
// Memory traffic (s = bytes per element of Q/K/V, forward):
//   minimum: B·H·(Lq·DK + L·DK + L·DV + Lq·DV)·s + 4·B·H·Lq (+ bias H·Lq·L, mask B·L);
//   this kernel: each workgroup reads its Q block once and all of K, V of (b, h) once, so
//   K and V are read ⌈Lq/QT⌉ times (twice at the paper's L = 38 with QT = 32), and the bias
//   once. Backward reads Q, dO once per (b, h) and K, V ⌈Lq/QT⌉ times, writes each
//   gradient once (+ one f32 read-modify-write of dK/dV per extra query block) and rounds
//   through the scratch (4 B read + s written per element); dbias rereads Q, dO, K, V once
//   per key tile. Nothing of size B·H·Lq·L is ever stored.

override QT: u32 = 32u;
override KT: u32 = 32u;
override DK: u32 = 16u;
override DV: u32 = 64u;
override QK_LEN: u32 = QT * DK;
override QV_LEN: u32 = QT * DV;
override KK_LEN: u32 = KT * DK;
override KV_LEN: u32 = KT * DV;
override S_LEN: u32 = QT * KT;
// Divisors for flat tile indices: max(DK, 1), max(DV, 1) (a constant zero divisor is a
// pipeline-creation error even in a loop that never runs).
override DK_DIV: u32 = DK;
override DV_DIV: u32 = DV;

override DT_QKV: u32 = 0u;
override DT_BIAS: u32 = 0u;
override DT_MASK: u32 = 0u;
override DT_O: u32 = 0u;
override DT_DO: u32 = 0u;
override DT_LSE: u32 = 0u;
override DT_DST: u32 = 0u;
override HAS_BIAS: bool = false;
override HAS_MASK: bool = false;

const WG: u32 = 64u;
const EW: u32 = 256u;
// The running max before any valid key: finite, so m − m' never forms inf − inf.
const NEG_BIG: f32 = -3.0e38;
const NEG_INF_BITS: u32 = 0xff800000u;
const NAN_BITS: u32 = 0x7fc00000u;

// max that keeps a NaN (WGSL's max may return either operand), so a NaN score row is not
// read as all masked.
fn nan_max(a: f32, b: f32) -> f32 {
    return select(max(a, b), bitcast<f32>(NAN_BITS), is_nan_f32(a) || is_nan_f32(b));
}

struct AttnParams {
    b: u32, lq: u32, l: u32, h: u32,
    // ⌈Lq/QT⌉, scale as f32 bits, LSE rows B·H·Lq.
    nqb: u32, scale_bits: u32, rows: u32, _p0: u32,
    // Word offsets of dQ, dK, dV in the backward's f32 scratch.
    dq_off: u32, dk_off: u32, dv_off: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> A: AttnParams;
@group(0) @binding(1) var<storage, read> at_q: array<u32>;
@group(0) @binding(2) var<storage, read> at_k: array<u32>;
@group(0) @binding(3) var<storage, read> at_v: array<u32>;
@group(0) @binding(4) var<storage, read> at_bias: array<u32>;
@group(0) @binding(5) var<storage, read> at_mask: array<u32>;
// attn_forward_main
@group(0) @binding(6) var<storage, read_write> at_o: array<u32>;
@group(0) @binding(7) var<storage, read_write> at_lse: array<u32>;
// attn_backward_main, attn_dbias_main
@group(0) @binding(6) var<storage, read> bw_stats: array<u32>;
@group(0) @binding(7) var<storage, read> bw_do: array<u32>;
@group(0) @binding(8) var<storage, read_write> bw_out: array<u32>;

fn load_q(e: u32) -> f32 {
    return decode(at_q[word_of(e, DT_QKV)], e, DT_QKV);
}

fn load_k(e: u32) -> f32 {
    return decode(at_k[word_of(e, DT_QKV)], e, DT_QKV);
}

fn load_v(e: u32) -> f32 {
    return decode(at_v[word_of(e, DT_QKV)], e, DT_QKV);
}

fn load_bias(h: u32, i: u32, j: u32) -> f32 {
    let e = (h * A.lq + i) * A.l + j;
    return decode(at_bias[word_of(e, DT_BIAS)], e, DT_BIAS);
}

fn key_valid(b: u32, j: u32) -> bool {
    if (!HAS_MASK) {
        return true;
    }
    let e = b * A.l + j;
    return decode(at_mask[word_of(e, DT_MASK)], e, DT_MASK) != 0.0;
}

fn q_index(b: u32, i: u32, h: u32, c: u32, width: u32) -> u32 {
    return ((b * A.lq + i) * A.h + h) * width + c;
}

fn k_index(b: u32, j: u32, h: u32, c: u32, width: u32) -> u32 {
    return ((b * A.l + j) * A.h + h) * width + c;
}

// ---------------------------------------------------------------- attn_forward_main

var<workgroup> fq: array<f32, QK_LEN>;
var<workgroup> fk: array<f32, KK_LEN>;
var<workgroup> fv: array<f32, KV_LEN>;
var<workgroup> fs: array<f32, S_LEN>;
var<workgroup> fo: array<f32, QV_LEN>;
var<workgroup> fm: array<f32, QT>;
var<workgroup> fl: array<f32, QT>;
var<workgroup> fa: array<f32, QT>;
var<workgroup> fkv: array<f32, KT>;

@compute @workgroup_size(64, 1, 1)
fn attn_forward_main(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lin = linear_workgroup(wid, nwg);
    let qb = lin % A.nqb;
    let rest = lin / A.nqb;
    let h = rest % A.h;
    let b = rest / A.h;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    if (b >= A.b) {
        return;
    }
    let scale = bitcast<f32>(A.scale_bits);
    let q0 = qb * QT;
    let nq = min(QT, A.lq - q0);

    for (var t = tid; t < QT * DK; t += WG) {
        let i = t / DK_DIV;
        var x = 0.0;
        if (i < nq) {
            x = load_q(q_index(b, q0 + i, h, t % DK_DIV, DK));
        }
        fq[t] = x;
    }
    for (var t = tid; t < QT * DV; t += WG) {
        fo[t] = 0.0;
    }
    for (var i = tid; i < QT; i += WG) {
        fm[i] = NEG_BIG;
        fl[i] = 0.0;
    }

    for (var k0 = 0u; k0 < A.l; k0 += KT) {
        let nk = min(KT, A.l - k0);
        // 1. the key tile (a masked key is never read: a NaN there reaches no output)
        for (var t = tid; t < KT * DK; t += WG) {
            let j = t / DK_DIV;
            var x = 0.0;
            if (j < nk && key_valid(b, k0 + j)) {
                x = load_k(k_index(b, k0 + j, h, t % DK_DIV, DK));
            }
            fk[t] = x;
        }
        for (var t = tid; t < KT * DV; t += WG) {
            let j = t / DV_DIV;
            var x = 0.0;
            if (j < nk && key_valid(b, k0 + j)) {
                x = load_v(k_index(b, k0 + j, h, t % DV_DIV, DV));
            }
            fv[t] = x;
        }
        for (var j = tid; j < KT; j += WG) {
            fkv[j] = select(0.0, 1.0, j < nk && key_valid(b, k0 + j));
        }
        workgroupBarrier();
        // 2. scores
        for (var t = tid; t < QT * KT; t += WG) {
            let i = t / KT;
            let j = t % KT;
            var s = 0.0;
            if (i < nq && fkv[j] != 0.0) {
                var dot = 0.0;
                for (var c = 0u; c < DK; c++) {
                    dot += fq[i * DK + c] * fk[j * DK + c];
                }
                s = scale * dot;
                if (HAS_BIAS) {
                    s += load_bias(h, q0 + i, k0 + j);
                }
            }
            fs[t] = s;
        }
        workgroupBarrier();
        // 3. online softmax, one thread per query row
        for (var i = tid; i < QT; i += WG) {
            let m_old = fm[i];
            var mx = m_old;
            for (var j = 0u; j < KT; j++) {
                if (fkv[j] != 0.0) {
                    mx = nan_max(mx, fs[i * KT + j]);
                }
            }
            var sum = 0.0;
            for (var j = 0u; j < KT; j++) {
                var p = 0.0;
                if (fkv[j] != 0.0) {
                    p = exp(fs[i * KT + j] - mx);
                }
                fs[i * KT + j] = p;
                sum += p;
            }
            let alpha = exp(m_old - mx);
            fa[i] = alpha;
            fl[i] = fl[i] * alpha + sum;
            fm[i] = mx;
        }
        workgroupBarrier();
        // 4. rescale and accumulate P̃·V
        for (var t = tid; t < QT * DV; t += WG) {
            let i = t / DV_DIV;
            let c = t % DV_DIV;
            var acc = fo[t] * fa[i];
            for (var j = 0u; j < KT; j++) {
                let p = fs[i * KT + j];
                // Skipped when 0 (as on the CPU): a masked key's V may hold anything.
                if (p != 0.0) {
                    acc += p * fv[j * DV + c];
                }
            }
            fo[t] = acc;
        }
        workgroupBarrier();
    }

    // A NaN score made the running max NaN (nan_max keeps it): that row's O and LSE are NaN,
    // written as bits because WGSL arithmetic need not carry a NaN through.
    for (var t = tid; t < QT * DV; t += WG) {
        let i = t / DV_DIV;
        if (i < nq) {
            let l = fl[i];
            var bits = bitcast<u32>(select(0.0, fo[t] / l, l > 0.0));
            if (is_nan_f32(fm[i])) {
                bits = NAN_BITS;
            }
            at_o[q_index(b, q0 + i, h, t % DV_DIV, DV)] = bits;
        }
    }
    for (var i = tid; i < nq; i += WG) {
        let l = fl[i];
        var bits = NEG_INF_BITS;
        if (l > 0.0) {
            bits = bitcast<u32>(fm[i] + log(l));
        }
        if (is_nan_f32(fm[i])) {
            bits = NAN_BITS;
        }
        at_lse[(b * A.h + h) * A.lq + q0 + i] = bits;
    }
}

// ---------------------------------------------------------------- attn_bw_stats_main

@group(0) @binding(1) var<storage, read> st_o: array<u32>;
@group(0) @binding(2) var<storage, read> st_do: array<u32>;
@group(0) @binding(3) var<storage, read> st_lse: array<u32>;
@group(0) @binding(4) var<storage, read_write> st_out: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn attn_bw_stats_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = linear_workgroup(wid, nwg) * EW + li;
    if (r >= A.rows) {
        return;
    }
    let i = r % A.lq;
    let bh = r / A.lq;
    let h = bh % A.h;
    let b = bh / A.h;
    var dd = 0.0;
    for (var c = 0u; c < DV; c++) {
        let e = q_index(b, i, h, c, DV);
        let go = decode(st_do[word_of(e, DT_DO)], e, DT_DO);
        let o = decode(st_o[word_of(e, DT_O)], e, DT_O);
        dd += go * o;
    }
    let lse = decode(st_lse[word_of(r, DT_LSE)], r, DT_LSE);
    st_out[2u * r] = bitcast<u32>(dd);
    st_out[2u * r + 1u] = bitcast<u32>(lse);
}

// ---------------------------------------------------------------- backward (shared)

var<workgroup> bq: array<f32, QK_LEN>;
var<workgroup> bdo: array<f32, QV_LEN>;
var<workgroup> bk: array<f32, KK_LEN>;
var<workgroup> bv: array<f32, KV_LEN>;
var<workgroup> bd: array<f32, QT>;
var<workgroup> blse: array<f32, QT>;
var<workgroup> bok: array<f32, QT>;
var<workgroup> bkv: array<f32, KT>;
// attn_backward_main only
var<workgroup> bp: array<f32, S_LEN>;
var<workgroup> bds: array<f32, S_LEN>;
var<workgroup> bdq: array<f32, QK_LEN>;
// attn_dbias_main only
var<workgroup> bdb: array<f32, S_LEN>;

// Row i of the query block has a valid key: its LSE is not ±∞ (a NaN LSE is a live row whose
// gradients are NaN).
fn bw_row_live(b: u32, h: u32, q0: u32, i: u32, nq: u32) -> bool {
    if (i >= nq) {
        return false;
    }
    let r = (b * A.h + h) * A.lq + q0 + i;
    return (bw_stats[2u * r + 1u] & 0x7fffffffu) != 0x7f800000u;
}

// Query rows q0 .. q0+nq−1 of (b, h): Q, dO, D, LSE and whether the row has a valid key (a row
// without one is never read: zeros, so a NaN there reaches no gradient).
fn bw_load_queries(b: u32, h: u32, q0: u32, nq: u32, tid: u32) {
    for (var t = tid; t < QT * DK; t += WG) {
        let i = t / DK_DIV;
        var x = 0.0;
        if (bw_row_live(b, h, q0, i, nq)) {
            x = load_q(q_index(b, q0 + i, h, t % DK_DIV, DK));
        }
        bq[t] = x;
    }
    for (var t = tid; t < QT * DV; t += WG) {
        let i = t / DV_DIV;
        var x = 0.0;
        if (bw_row_live(b, h, q0, i, nq)) {
            let e = q_index(b, q0 + i, h, t % DV_DIV, DV);
            x = decode(bw_do[word_of(e, DT_DO)], e, DT_DO);
        }
        bdo[t] = x;
    }
    for (var i = tid; i < QT; i += WG) {
        var dd = 0.0;
        var lse = 0.0;
        var ok = 0.0;
        if (bw_row_live(b, h, q0, i, nq)) {
            let r = (b * A.h + h) * A.lq + q0 + i;
            let bits = bw_stats[2u * r + 1u];
            {
                dd = bitcast<f32>(bw_stats[2u * r]);
                lse = bitcast<f32>(bits);
                ok = 1.0;
            }
        }
        bd[i] = dd;
        blse[i] = lse;
        bok[i] = ok;
    }
    workgroupBarrier();
}

// Keys k0 .. k0+nk−1 of (b, h): K, V and validity (a masked key is never read: zeros).
fn bw_load_keys(b: u32, h: u32, k0: u32, nk: u32, tid: u32) {
    for (var t = tid; t < KT * DK; t += WG) {
        let j = t / DK_DIV;
        var x = 0.0;
        if (j < nk && key_valid(b, k0 + j)) {
            x = load_k(k_index(b, k0 + j, h, t % DK_DIV, DK));
        }
        bk[t] = x;
    }
    for (var t = tid; t < KT * DV; t += WG) {
        let j = t / DV_DIV;
        var x = 0.0;
        if (j < nk && key_valid(b, k0 + j)) {
            x = load_v(k_index(b, k0 + j, h, t % DV_DIV, DV));
        }
        bv[t] = x;
    }
    for (var j = tid; j < KT; j += WG) {
        bkv[j] = select(0.0, 1.0, j < nk && key_valid(b, k0 + j));
    }
    workgroupBarrier();
}

// (P, dS) of row i, key j of the loaded query block × key tile; both 0 unless the row and
// the key are valid.
fn score_grad(h: u32, q0: u32, k0: u32, i: u32, j: u32, scale: f32) -> vec2<f32> {
    if (bok[i] == 0.0 || bkv[j] == 0.0) {
        return vec2<f32>(0.0, 0.0);
    }
    var dot = 0.0;
    for (var c = 0u; c < DK; c++) {
        dot += bq[i * DK + c] * bk[j * DK + c];
    }
    var s = scale * dot;
    if (HAS_BIAS) {
        s += load_bias(h, q0 + i, k0 + j);
    }
    if (is_nan_f32(blse[i])) {
        let nan = bitcast<f32>(NAN_BITS);
        return vec2<f32>(nan, nan);
    }
    let p = exp(s - blse[i]);
    var dp = 0.0;
    for (var c = 0u; c < DV; c++) {
        dp += bdo[i * DV + c] * bv[j * DV + c];
    }
    return vec2<f32>(p, p * (dp - bd[i]));
}

// ---------------------------------------------------------------- attn_backward_main

@compute @workgroup_size(64, 1, 1)
fn attn_backward_main(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lin = linear_workgroup(wid, nwg);
    let h = lin % A.h;
    let b = lin / A.h;
    if (b >= A.b) {
        return;
    }
    let scale = bitcast<f32>(A.scale_bits);
    for (var qb = 0u; qb < A.nqb; qb++) {
        let q0 = qb * QT;
        let nq = min(QT, A.lq - q0);
        for (var t = tid; t < QT * DK; t += WG) {
            bdq[t] = 0.0;
        }
        bw_load_queries(b, h, q0, nq, tid);
        for (var k0 = 0u; k0 < A.l; k0 += KT) {
            let nk = min(KT, A.l - k0);
            bw_load_keys(b, h, k0, nk, tid);
            for (var t = tid; t < QT * KT; t += WG) {
                let pd = score_grad(h, q0, k0, t / KT, t % KT, scale);
                bp[t] = pd.x;
                bds[t] = pd.y;
            }
            workgroupBarrier();
            for (var t = tid; t < KT * DV; t += WG) {
                let j = t / DV_DIV;
                if (j < nk) {
                    let c = t % DV_DIV;
                    var acc = 0.0;
                    // A masked key's gradients stay exactly 0 (P = dS = 0 would still meet a
                    // NaN query as 0 · NaN).
                    if (bkv[j] != 0.0) {
                        for (var i = 0u; i < QT; i++) {
                            acc += bp[i * KT + j] * bdo[i * DV + c];
                        }
                    }
                    let e = A.dv_off + k_index(b, k0 + j, h, c, DV);
                    if (qb > 0u) {
                        acc += bitcast<f32>(bw_out[e]);
                    }
                    bw_out[e] = bitcast<u32>(acc);
                }
            }
            for (var t = tid; t < KT * DK; t += WG) {
                let j = t / DK_DIV;
                if (j < nk) {
                    let c = t % DK_DIV;
                    var acc = 0.0;
                    if (bkv[j] != 0.0) {
                        for (var i = 0u; i < QT; i++) {
                            acc += bds[i * KT + j] * bq[i * DK + c];
                        }
                    }
                    acc *= scale;
                    let e = A.dk_off + k_index(b, k0 + j, h, c, DK);
                    if (qb > 0u) {
                        acc += bitcast<f32>(bw_out[e]);
                    }
                    bw_out[e] = bitcast<u32>(acc);
                }
            }
            for (var t = tid; t < QT * DK; t += WG) {
                let i = t / DK_DIV;
                let c = t % DK_DIV;
                var acc = bdq[t];
                for (var j = 0u; j < KT; j++) {
                    acc += bds[i * KT + j] * bk[j * DK + c];
                }
                bdq[t] = acc;
            }
            workgroupBarrier();
        }
        for (var t = tid; t < QT * DK; t += WG) {
            let i = t / DK_DIV;
            if (i < nq) {
                let e = A.dq_off + q_index(b, q0 + i, h, t % DK_DIV, DK);
                bw_out[e] = bitcast<u32>(scale * bdq[t]);
            }
        }
        workgroupBarrier();
    }
}

// ---------------------------------------------------------------- attn_dbias_main

@compute @workgroup_size(64, 1, 1)
fn attn_dbias_main(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lin = linear_workgroup(wid, nwg);
    let qb = lin % A.nqb;
    let h = lin / A.nqb;
    if (h >= A.h) {
        return;
    }
    let scale = bitcast<f32>(A.scale_bits);
    let q0 = qb * QT;
    let nq = min(QT, A.lq - q0);
    for (var k0 = 0u; k0 < A.l; k0 += KT) {
        let nk = min(KT, A.l - k0);
        for (var t = tid; t < QT * KT; t += WG) {
            bdb[t] = 0.0;
        }
        for (var b = 0u; b < A.b; b++) {
            bw_load_queries(b, h, q0, nq, tid);
            bw_load_keys(b, h, k0, nk, tid);
            // dS straight into the accumulator (P is not needed): no P or dS tiles here.
            for (var t = tid; t < QT * KT; t += WG) {
                bdb[t] += score_grad(h, q0, k0, t / KT, t % KT, scale).y;
            }
            // The next sample's loads overwrite what score_grad read.
            workgroupBarrier();
        }
        for (var t = tid; t < QT * KT; t += WG) {
            let i = t / KT;
            let j = t % KT;
            if (i < nq && j < nk) {
                bw_out[(h * A.lq + q0 + i) * A.l + k0 + j] = bitcast<u32>(bdb[t]);
            }
        }
        workgroupBarrier();
    }
}

// ---------------------------------------------------------------- cast_main

struct CastParams {
    numel: u32, nwords: u32, src_off: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> CP: CastParams;
@group(0) @binding(1) var<storage, read> cp_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> cp_dst: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn cast_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = linear_workgroup(wid, nwg) * EW + li;
    if (w >= CP.nwords) {
        return;
    }
    if (DT_DST == DT_F32) {
        cp_dst[w] = cp_src[CP.src_off + w];
        return;
    }
    // A trailing odd element keeps the other half of the last word.
    var word = cp_dst[w];
    for (var k = 0u; k < 2u; k++) {
        let e = 2u * w + k;
        if (e < CP.numel) {
            word = put_half(word, e, encode16(bitcast<f32>(cp_src[CP.src_off + e]), DT_DST));
        }
    }
    cp_dst[w] = word;
}
