// inbatch_softmax.wgsl — the fused in-batch softmax (src/ops/inbatch_softmax.rs is the authority,
// src/cpu/softmax.rs computes the same; the CUDA twin kernels/cuda/inbatch_softmax.cu uses the
// same geometry). The B×N logit matrix is never stored: every kernel recomputes 64×64 logit
// tiles in registers and consumes them at once.
//
// Math (rows i < B of this call, columns j < N, d the embedding width):
//   û_i = u_i / n_i,  v̂_j = c_j / m_j      n, m = max(‖·‖, ε) when L2, else no division
//   s_ij = κ·⟨û_i, v̂_j⟩ − lq_j                                            (lq only with LOGQ)
//   j ∈ D_i ⇔ valid_j [VALID] ∧ (j = t_i ∨ (id_j ≠ id_{t_i} [IDS]
//                                  ∧ ¬(cq_j ≥ 0 ∧ cq_j = rq_i) [QID]))
//   LSE_i = log Σ_{j∈D_i} exp s_ij          (online, base 2: x = s·log2 e, running (max, sum))
//   P_ij = 1[j∈D_i]·exp(s_ij − LSE_i),   G_ij = a_i·(P_ij − δ_{j,t_i})
//   dQ̂_i = κ·Σ_j G_ij v̂_j,   dV̂_j = κ·Σ_i G_ij û_i,   dκ_i = Σ_j G_ij·⟨û_i, v̂_j⟩
//   L2 backward (l2_finish_main): g ← (g − û⟨û, g⟩)/n, or g/ε where the norm was clamped.
//   A row with t_i = 0xffffffff is inactive: LSE = −inf (written as its bit pattern; WGSL
//   arithmetic may assume no infinities, so the kernels use a finite sentinel and a zero sum
//   to mean "empty"), s_t stays 0, and a_i = 0 makes its gradients zero.
//
// Layouts (every tensor binding is array<u32>, see common.wgsl):
//   q  [B, d] row-major, dtype DT_Q;  c  [N, d] row-major, dtype DT_C (raw, un-normalised)
//   norms  f32 [B + N]: n_i at i, m_j at B + j (written by row_norms_main; only with L2)
//   rowm   8 words per row: t, id_{t} (lo, hi), rq (lo, hi), a (f32 bits), LSE (f32 bits), 0
//   colm   8 words per column: lq (f32 bits), valid (0/1), id (lo, hi), cq (lo, hi), 0, 0
//          (i64 ids are two u32 words; cq ≥ 0 ⇔ hi word as i32 ≥ 0)
//   fwd:  part f32 [S, B, 2] = (running max in log2 units, sum) per row and column split;
//         s_t f32 [B] (host-zeroed; written by the one thread that meets column t_i)
//   gq:   part f32 [S, B, d] raw Σ_j G_ij v̂_j per split; dkp f32 [S, B]
//   gc:   dc f32 [len, d] (len = col_end − col_beg), raw Σ_i G_ij û_i, then l2_finish_main
//
// Launch geometry (fwd_main, gq_main, gc_main; mirrored by the CUDA twin):
//   workgroup 16 × 16 = 256 threads; one 64-row × 64-column logit tile at a time; thread
//   (tx, ty) owns rows ty·4 .. ty·4+3 and columns tx·4 .. tx·4+3 of it (a 4 × 4 sub-tile of
//   dot products). d is streamed in chunks of 16 through workgroup memory, both operands
//   k-major (Qs[k][row], Cs[k][col], rows padded to 68 floats), the L2 division and the
//   16-bit decode fused into these loads; zero-filled past B, col_end and d.
//   fwd_main, gq_main: grid = row_blocks × S (linear, row block fastest), row_blocks = ⌈B/64⌉.
//     Split s owns column tiles [s·T, min((s+1)·T, tiles)), tiles = ⌈N/64⌉, where the host
//     picks S = min(⌈512 / row_blocks⌉, ⌈tiles/4⌉) (≥ 1; a small B still makes ≥ 512
//     workgroups, and each split keeps ≥ 4 tiles), T = ⌈tiles/S⌉, then S = ⌈tiles/T⌉.
//   gc_main: grid = ⌈len/64⌉ column tiles; each loops over ALL row blocks in ascending order.
//   fwd: each thread keeps an online (max, sum) for its 4 rows over its columns of all its
//     tiles; at the end the 16 threads of a row combine in tx order through workgroup memory.
//   gq/gc: after the logit tile, G (64 × 64 f32) goes to workgroup memory, then a second
//     64 × 64 × 64 product per 64-wide chunk of d, the other operand staged in 16-row chunks:
//     gq: dQ̂[rows, d-chunk] += G · V̂[tile columns, d-chunk]   (thread: 4 rows × 4 d)
//     gc: dV̂[cols, d-chunk] += Gᵀ · Û[block rows, d-chunk]     (thread: 4 columns × 4 d)
//     The first two d-chunks (d ≤ 128) accumulate in registers across tiles / row blocks;
//     further chunks read-modify-write the workgroup's own rows of the output (no other
//     workgroup touches them).
//   Small passes (256 threads, 1-D, folded grid): row_norms_main (one thread per row),
//   fwd_combine_main (one per row: S partials combined in split order → LSE),
//   gq_reduce_main (one per dq element: Σ over splits in order; and dκ rows),
//   l2_finish_main (one per row: ×κ, then the L2 backward in place).
//   Determinism: every sum has a fixed order (k ascending, tiles ascending, row blocks
//   ascending, tx ascending, splits ascending), so two runs give identical bits. No atomics.
//
// Variants (pipeline-overridable constants): DT_Q, DT_C, DT_X dtype codes (0 f32, 1 bf16,
//   2 f16). The features are run-time bits of the uniform `flags` instead (F_L2, F_LOGQ,
//   F_IDS, F_VALID, F_QID; l2_finish_main: `l2`): they are uniform branches, cheap on every
//   GPU, and as overrides they would multiply the pipelines to compile by 32 (seconds each
//   on a software adapter). Absent metadata is never read.
//
// Workgroup memory: fwd 2·16·68·4 = 8704 B (reused for the row reduction); gq/gc 8704 B +
//   64·64·4 = 16384 B for G, 25088 B in all (the host checks the device limit).
//
// FLOPs and memory traffic (s = bytes per stored element):
//   counted as 8·B·N·d for fused forward + backward (2 forward, 6 backward: logits, dQ, dV);
//   executed 10·B·N·d, because the two deterministic backward passes (gq, gc) each recompute
//   the logits (2 + 4 + 4).
//   Embedding reads: every 64 × 64 logit tile reads 64·d·s of each operand: B·N·d·s/32 per
//   logit recompute (like a 64 × 64-tiled GEMM), and the G product reads N·d·s·⌈B/64⌉ (gq) or
//   B·d·s·⌈len/64⌉ (gc) more. Per-row/-column metadata: 32·(B + N) B per call; partials:
//   S·B·8 B (fwd), S·B·d·4 B (gq, plus a read-modify-write of (d − 128)·4 B per row and
//   tile for d > 128). The logits cost 4·B·N bytes nowhere: nothing O(B·N) exists.

override DT_Q: u32 = 0u;
override DT_C: u32 = 0u;
override DT_X: u32 = 0u;

const TILE: u32 = 64u;
const DK: u32 = 16u;
// Padded row of a staged operand chunk, and where the second operand starts.
const LD: u32 = 68u;
const CS_OFF: u32 = 1088u;
const STAGE_LEN: u32 = 2176u;
const NONE: u32 = 0xffffffffu;
const NEG_BIG: f32 = -1.0e30;
const NEG_INF_BITS: u32 = 0xff800000u;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
const ROW_WORDS: u32 = 8u;
const COL_WORDS: u32 = 8u;
const WG1: u32 = 256u;
// Bits of SmParams.flags.
const F_L2: u32 = 1u;
const F_LOGQ: u32 = 2u;
const F_IDS: u32 = 4u;
const F_VALID: u32 = 8u;
const F_QID: u32 = 16u;

struct SmParams {
    b: u32, n: u32, d: u32, splits: u32,
    col_beg: u32, col_end: u32, col_tiles: u32, tiles_per_split: u32,
    row_blocks: u32, kappa: f32, flags: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> P: SmParams;
@group(0) @binding(1) var<storage, read> q_buf: array<u32>;
@group(0) @binding(2) var<storage, read> c_buf: array<u32>;
@group(0) @binding(3) var<storage, read> norms: array<f32>;
@group(0) @binding(4) var<storage, read> rowm: array<u32>;
@group(0) @binding(5) var<storage, read> colm: array<u32>;
@group(0) @binding(6) var<storage, read_write> out_a: array<u32>;
@group(0) @binding(7) var<storage, read_write> out_b: array<u32>;

var<workgroup> stage: array<f32, STAGE_LEN>;
var<workgroup> gs: array<f32, 4096>;

// This thread's 4 × 4 dot products of the current tile: acc[r][c] = ⟨û_{row r}, v̂_{col c}⟩.
var<private> acc: array<vec4<f32>, 4>;
// Metadata of this thread's 4 rows (t = NONE: inactive or past B) ...
var<private> r_t: array<u32, 4>;
var<private> r_tid: array<vec2<u32>, 4>;
var<private> r_qid: array<vec2<u32>, 4>;
var<private> r_a: array<f32, 4>;
var<private> r_lse: array<f32, 4>;
// ... and of its 4 columns of the current tile (c_in: column < col_end).
var<private> c_in: array<bool, 4>;
var<private> c_lq: array<f32, 4>;
var<private> c_valid: array<bool, 4>;
var<private> c_id: array<vec2<u32>, 4>;
var<private> c_qid: array<vec2<u32>, 4>;

fn has(bit: u32) -> bool {
    return (P.flags & bit) != 0u;
}

// û(i, k), zero outside [B, d].
fn q_unit(i: u32, k: u32) -> f32 {
    if (i >= P.b || k >= P.d) {
        return 0.0;
    }
    let e = i * P.d + k;
    var x = decode(q_buf[word_of(e, DT_Q)], e, DT_Q);
    if (has(F_L2)) {
        x = x / norms[i];
    }
    return x;
}

// v̂(j, k), zero outside [col_end, d].
fn c_unit(j: u32, k: u32) -> f32 {
    if (j >= P.col_end || k >= P.d) {
        return 0.0;
    }
    let e = j * P.d + k;
    var x = decode(c_buf[word_of(e, DT_C)], e, DT_C);
    if (has(F_L2)) {
        x = x / norms[P.b + j];
    }
    return x;
}

fn load_rows(row0: u32, ty: u32) {
    for (var r = 0u; r < 4u; r += 1u) {
        let i = row0 + ty * 4u + r;
        r_t[r] = NONE;
        r_a[r] = 0.0;
        r_lse[r] = 0.0;
        r_tid[r] = vec2<u32>(0u, 0u);
        r_qid[r] = vec2<u32>(0u, 0u);
        if (i < P.b) {
            let w = i * ROW_WORDS;
            r_t[r] = rowm[w];
            r_tid[r] = vec2<u32>(rowm[w + 1u], rowm[w + 2u]);
            r_qid[r] = vec2<u32>(rowm[w + 3u], rowm[w + 4u]);
            r_a[r] = bitcast<f32>(rowm[w + 5u]);
            r_lse[r] = bitcast<f32>(rowm[w + 6u]);
        }
    }
}

fn load_cols(col0: u32, tx: u32) {
    for (var c = 0u; c < 4u; c += 1u) {
        let j = col0 + tx * 4u + c;
        c_in[c] = j < P.col_end;
        c_lq[c] = 0.0;
        c_valid[c] = true;
        c_id[c] = vec2<u32>(0u, 0u);
        c_qid[c] = vec2<u32>(0u, 0u);
        if (j < P.col_end) {
            let w = j * COL_WORDS;
            if (has(F_LOGQ)) {
                c_lq[c] = bitcast<f32>(colm[w]);
            }
            if (has(F_VALID)) {
                c_valid[c] = colm[w + 1u] != 0u;
            }
            if (has(F_IDS)) {
                c_id[c] = vec2<u32>(colm[w + 2u], colm[w + 3u]);
            }
            if (has(F_QID)) {
                c_qid[c] = vec2<u32>(colm[w + 4u], colm[w + 5u]);
            }
        }
    }
}

// Is column j (this thread's column c) in the domain of this thread's row r?
fn in_domain(r: u32, c: u32, j: u32) -> bool {
    if (!c_in[c] || r_t[r] == NONE) {
        return false;
    }
    if (has(F_VALID) && !c_valid[c]) {
        return false;
    }
    if (j == r_t[r]) {
        return true;
    }
    if (has(F_IDS) && all(c_id[c] == r_tid[r])) {
        return false;
    }
    if (has(F_QID) && bitcast<i32>(c_qid[c].y) >= 0 && all(c_qid[c] == r_qid[r])) {
        return false;
    }
    return true;
}

fn logit(dot: f32, c: u32) -> f32 {
    var s = P.kappa * dot;
    if (has(F_LOGQ)) {
        s = s - c_lq[c];
    }
    return s;
}

// G of this thread's (row r, column c) with dot product `dot`.
fn grad_of(r: u32, c: u32, j: u32, dot: f32) -> f32 {
    if (r_a[r] == 0.0 || r_t[r] == NONE || !c_in[c]) {
        return 0.0;
    }
    var p = 0.0;
    if (in_domain(r, c, j)) {
        p = exp2((logit(dot, c) - r_lse[r]) * LOG2E);
    }
    return r_a[r] * (p - select(0.0, 1.0, j == r_t[r]));
}

// acc ← the 64 × 64 dot products of rows row0.. and columns col0.., d in chunks of 16.
// Ends with a barrier, so `stage` is free afterwards.
fn dot_tile(tid: u32, tx: u32, ty: u32, row0: u32, col0: u32) {
    for (var r = 0u; r < 4u; r += 1u) {
        acc[r] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < P.d; k0 += DK) {
        // Consecutive threads read consecutive k of one row (the stride-1 axis).
        for (var e = tid; e < TILE * DK; e += 256u) {
            let kk = e % DK;
            let mm = e / DK;
            stage[kk * LD + mm] = q_unit(row0 + mm, k0 + kk);
            stage[CS_OFF + kk * LD + mm] = c_unit(col0 + mm, k0 + kk);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < DK; kk += 1u) {
            let ab = kk * LD + ty * 4u;
            let a = vec4<f32>(stage[ab], stage[ab + 1u], stage[ab + 2u], stage[ab + 3u]);
            let bb = CS_OFF + kk * LD + tx * 4u;
            let b = vec4<f32>(stage[bb], stage[bb + 1u], stage[bb + 2u], stage[bb + 3u]);
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }
}

// (max, sum) ⊕ (max, sum) in log2 units; a zero sum is the empty set.
fn lse_merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    if (b.y == 0.0) {
        return a;
    }
    if (a.y == 0.0) {
        return b;
    }
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp2(a.x - m) + b.y * exp2(b.x - m));
}

// Sum of stage[base + row·16 + x] over x = 0..15 in order, for the row reduction.
fn row_sum16(base: u32) -> f32 {
    var s = 0.0;
    for (var x = 0u; x < 16u; x += 1u) {
        s += stage[base + x];
    }
    return s;
}

// ---------------------------------------------------------------- forward

@compute @workgroup_size(16, 16, 1)
fn fwd_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lin = linear_workgroup(wid, nwg);
    // Uniform per workgroup: the barriers below stay in uniform control flow.
    if (lin >= P.row_blocks * P.splits) {
        return;
    }
    let rb = lin % P.row_blocks;
    let split = lin / P.row_blocks;
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let row0 = rb * TILE;
    load_rows(row0, ty);
    var m: array<f32, 4>;
    var s: array<f32, 4>;
    for (var r = 0u; r < 4u; r += 1u) {
        m[r] = NEG_BIG;
        s[r] = 0.0;
    }
    let t_beg = split * P.tiles_per_split;
    let t_end = min(t_beg + P.tiles_per_split, P.col_tiles);
    for (var t = t_beg; t < t_end; t += 1u) {
        let col0 = P.col_beg + t * TILE;
        dot_tile(tid, tx, ty, row0, col0);
        load_cols(col0, tx);
        for (var r = 0u; r < 4u; r += 1u) {
            for (var c = 0u; c < 4u; c += 1u) {
                let j = col0 + tx * 4u + c;
                if (!in_domain(r, c, j)) {
                    continue;
                }
                let sv = logit(acc[r][c], c);
                if (j == r_t[r]) {
                    out_b[row0 + ty * 4u + r] = bitcast<u32>(sv);
                }
                let x = sv * LOG2E;
                if (x > m[r]) {
                    s[r] = s[r] * exp2(m[r] - x) + 1.0;
                    m[r] = x;
                } else {
                    s[r] += exp2(x - m[r]);
                }
            }
        }
    }
    // The 16 threads of a row combine in tx order.
    for (var r = 0u; r < 4u; r += 1u) {
        let slot = (ty * 4u + r) * 16u + tx;
        stage[slot] = m[r];
        stage[1024u + slot] = s[r];
    }
    workgroupBarrier();
    let i = row0 + tid;
    if (tid < TILE && i < P.b) {
        var ms = vec2<f32>(NEG_BIG, 0.0);
        for (var x = 0u; x < 16u; x += 1u) {
            let slot = tid * 16u + x;
            ms = lse_merge(ms, vec2<f32>(stage[slot], stage[1024u + slot]));
        }
        let w = (split * P.b + i) * 2u;
        out_a[w] = bitcast<u32>(ms.x);
        out_a[w + 1u] = bitcast<u32>(ms.y);
    }
}

struct CombineParams {
    b: u32, splits: u32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> FC: CombineParams;
@group(0) @binding(1) var<storage, read> fc_part: array<u32>;
@group(0) @binding(2) var<storage, read_write> fc_lse: array<u32>;

// LSE_i from the S partial (max, sum) pairs of row i, combined in split order.
@compute @workgroup_size(256, 1, 1)
fn fwd_combine_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = linear_workgroup(wid, nwg) * WG1 + lid.x;
    if (i >= FC.b) {
        return;
    }
    var ms = vec2<f32>(NEG_BIG, 0.0);
    for (var sp = 0u; sp < FC.splits; sp += 1u) {
        let w = (sp * FC.b + i) * 2u;
        ms = lse_merge(ms, vec2<f32>(bitcast<f32>(fc_part[w]), bitcast<f32>(fc_part[w + 1u])));
    }
    if (ms.y > 0.0) {
        fc_lse[i] = bitcast<u32>((ms.x + log2(ms.y)) * LN2);
    } else {
        fc_lse[i] = NEG_INF_BITS;
    }
}

// ---------------------------------------------------------------- backward, queries

// One 64 × 64 × 64 product on a d-chunk: o[r] = Σ_{kk<64} gs[kk·64 + ty·4 + r] · B(kk, tx·4..),
// B(kk, dd) staged from `from_cols ? v̂(base + kk, d0 + dd) : û(base + kk, d0 + dd)`.
// Starts and ends with `stage` free (barrier-separated).
fn g_product(tid: u32, tx: u32, ty: u32, from_cols: bool, base: u32, d0: u32) -> array<vec4<f32>, 4> {
    var o: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < TILE; k0 += DK) {
        // Consecutive threads read consecutive d of one row.
        for (var e = tid; e < DK * TILE; e += 256u) {
            let dd = e % TILE;
            let kk = e / TILE;
            if (from_cols) {
                stage[kk * LD + dd] = c_unit(base + k0 + kk, d0 + dd);
            } else {
                stage[kk * LD + dd] = q_unit(base + k0 + kk, d0 + dd);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < DK; kk += 1u) {
            let gb = (k0 + kk) * TILE + ty * 4u;
            let g = vec4<f32>(gs[gb], gs[gb + 1u], gs[gb + 2u], gs[gb + 3u]);
            let vb = kk * LD + tx * 4u;
            let v = vec4<f32>(stage[vb], stage[vb + 1u], stage[vb + 2u], stage[vb + 3u]);
            o[0] += g.x * v;
            o[1] += g.y * v;
            o[2] += g.z * v;
            o[3] += g.w * v;
        }
        workgroupBarrier();
    }
    return o;
}

@compute @workgroup_size(16, 16, 1)
fn gq_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lin = linear_workgroup(wid, nwg);
    if (lin >= P.row_blocks * P.splits) {
        return;
    }
    let rb = lin % P.row_blocks;
    let split = lin / P.row_blocks;
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let row0 = rb * TILE;
    load_rows(row0, ty);
    var dk: array<f32, 4>;
    // Register accumulators of d-chunks 0 and 1 (d < 128) across this split's tiles.
    var keep0: array<vec4<f32>, 4>;
    var keep1: array<vec4<f32>, 4>;
    let t_beg = split * P.tiles_per_split;
    let t_end = min(t_beg + P.tiles_per_split, P.col_tiles);
    for (var t = t_beg; t < t_end; t += 1u) {
        let col0 = P.col_beg + t * TILE;
        dot_tile(tid, tx, ty, row0, col0);
        load_cols(col0, tx);
        for (var r = 0u; r < 4u; r += 1u) {
            for (var c = 0u; c < 4u; c += 1u) {
                let j = col0 + tx * 4u + c;
                let dot = acc[r][c];
                let g = grad_of(r, c, j, dot);
                dk[r] += g * dot;
                // k-major for the product below: gs[column][row].
                gs[(tx * 4u + c) * TILE + ty * 4u + r] = g;
            }
        }
        workgroupBarrier();
        for (var d0 = 0u; d0 < P.d; d0 += TILE) {
            let o = g_product(tid, tx, ty, true, col0, d0);
            let chunk = d0 / TILE;
            if (chunk == 0u) {
                for (var r = 0u; r < 4u; r += 1u) {
                    keep0[r] += o[r];
                }
            } else if (chunk == 1u) {
                for (var r = 0u; r < 4u; r += 1u) {
                    keep1[r] += o[r];
                }
            } else {
                for (var r = 0u; r < 4u; r += 1u) {
                    let i = row0 + ty * 4u + r;
                    for (var c = 0u; c < 4u; c += 1u) {
                        let k = d0 + tx * 4u + c;
                        if (i < P.b && k < P.d) {
                            let w = (split * P.b + i) * P.d + k;
                            var v = o[r][c];
                            if (t != t_beg) {
                                v = bitcast<f32>(out_a[w]) + v;
                            }
                            out_a[w] = bitcast<u32>(v);
                        }
                    }
                }
            }
        }
        // gs is rewritten by the next tile.
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r += 1u) {
        let i = row0 + ty * 4u + r;
        for (var c = 0u; c < 4u; c += 1u) {
            let k = tx * 4u + c;
            if (i < P.b && k < P.d) {
                out_a[(split * P.b + i) * P.d + k] = bitcast<u32>(keep0[r][c]);
            }
            if (i < P.b && TILE + k < P.d) {
                out_a[(split * P.b + i) * P.d + TILE + k] = bitcast<u32>(keep1[r][c]);
            }
        }
    }
    // dκ: the 16 threads of a row sum in tx order.
    for (var r = 0u; r < 4u; r += 1u) {
        stage[(ty * 4u + r) * 16u + tx] = dk[r];
    }
    workgroupBarrier();
    let i = row0 + tid;
    if (tid < TILE && i < P.b) {
        out_b[split * P.b + i] = bitcast<u32>(row_sum16(tid * 16u));
    }
}

struct ReduceParams {
    b: u32, d: u32, splits: u32, threads: u32,
}

@group(0) @binding(0) var<uniform> GR: ReduceParams;
@group(0) @binding(1) var<storage, read> gr_part: array<u32>;
@group(0) @binding(2) var<storage, read> gr_dkp: array<u32>;
@group(0) @binding(3) var<storage, read_write> gr_dq: array<u32>;
@group(0) @binding(4) var<storage, read_write> gr_dk: array<u32>;

// dq[e] = Σ_s part[s][e] and dk[i] = Σ_s dkp[s][i], splits in order.
@compute @workgroup_size(256, 1, 1)
fn gq_reduce_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let e = linear_workgroup(wid, nwg) * WG1 + lid.x;
    if (e >= GR.threads) {
        return;
    }
    let numel = GR.b * GR.d;
    if (e < numel) {
        var v = 0.0;
        for (var sp = 0u; sp < GR.splits; sp += 1u) {
            v += bitcast<f32>(gr_part[sp * numel + e]);
        }
        gr_dq[e] = bitcast<u32>(v);
    }
    if (e < GR.b) {
        var v = 0.0;
        for (var sp = 0u; sp < GR.splits; sp += 1u) {
            v += bitcast<f32>(gr_dkp[sp * GR.b + e]);
        }
        gr_dk[e] = bitcast<u32>(v);
    }
}

// ---------------------------------------------------------------- backward, columns

@compute @workgroup_size(16, 16, 1)
fn gc_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let ct = linear_workgroup(wid, nwg);
    if (ct >= P.col_tiles) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let col0 = P.col_beg + ct * TILE;
    load_cols(col0, tx);
    var keep0: array<vec4<f32>, 4>;
    var keep1: array<vec4<f32>, 4>;
    // Row blocks in ascending order: the same bits every run.
    for (var rb = 0u; rb < P.row_blocks; rb += 1u) {
        let row0 = rb * TILE;
        load_rows(row0, ty);
        dot_tile(tid, tx, ty, row0, col0);
        for (var r = 0u; r < 4u; r += 1u) {
            for (var c = 0u; c < 4u; c += 1u) {
                let j = col0 + tx * 4u + c;
                // k-major for the product below: gs[row][column].
                gs[(ty * 4u + r) * TILE + tx * 4u + c] = grad_of(r, c, j, acc[r][c]);
            }
        }
        workgroupBarrier();
        for (var d0 = 0u; d0 < P.d; d0 += TILE) {
            // Thread (tx, ty): columns ty·4.. of the tile, d = d0 + tx·4...
            let o = g_product(tid, tx, ty, false, row0, d0);
            let chunk = d0 / TILE;
            if (chunk == 0u) {
                for (var r = 0u; r < 4u; r += 1u) {
                    keep0[r] += o[r];
                }
            } else if (chunk == 1u) {
                for (var r = 0u; r < 4u; r += 1u) {
                    keep1[r] += o[r];
                }
            } else {
                for (var r = 0u; r < 4u; r += 1u) {
                    let j = col0 + ty * 4u + r;
                    for (var c = 0u; c < 4u; c += 1u) {
                        let k = d0 + tx * 4u + c;
                        if (j < P.col_end && k < P.d) {
                            let w = (j - P.col_beg) * P.d + k;
                            var v = o[r][c];
                            if (rb != 0u) {
                                v = bitcast<f32>(out_a[w]) + v;
                            }
                            out_a[w] = bitcast<u32>(v);
                        }
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r += 1u) {
        let j = col0 + ty * 4u + r;
        for (var c = 0u; c < 4u; c += 1u) {
            let k = tx * 4u + c;
            if (j < P.col_end && k < P.d) {
                out_a[(j - P.col_beg) * P.d + k] = bitcast<u32>(keep0[r][c]);
            }
            if (j < P.col_end && TILE + k < P.d) {
                out_a[(j - P.col_beg) * P.d + TILE + k] = bitcast<u32>(keep1[r][c]);
            }
        }
    }
}

// ---------------------------------------------------------------- row norms, L2 backward

struct NormParams {
    rows: u32, d: u32, x_row0: u32, out_off: u32,
    eps: f32, kappa: f32, l2: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> RN: NormParams;
@group(0) @binding(1) var<storage, read> rn_x: array<u32>;
@group(0) @binding(2) var<storage, read_write> rn_out: array<f32>;

fn rn_load(e: u32) -> f32 {
    return decode(rn_x[word_of(e, DT_X)], e, DT_X);
}

// norms[out_off + r] = max(‖x_{x_row0 + r}‖, ε), the squares summed in k order.
@compute @workgroup_size(256, 1, 1)
fn row_norms_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = linear_workgroup(wid, nwg) * WG1 + lid.x;
    if (r >= RN.rows) {
        return;
    }
    let base = (RN.x_row0 + r) * RN.d;
    var s = 0.0;
    for (var k = 0u; k < RN.d; k += 1u) {
        let x = rn_load(base + k);
        s += x * x;
    }
    // WGSL's max may drop a NaN (and with it the NaN of this row's gradient).
    let n = sqrt(s);
    rn_out[RN.out_off + r] = select(max(n, RN.eps), n, is_nan_f32(n));
}

@group(0) @binding(1) var<storage, read> lf_x: array<u32>;
@group(0) @binding(2) var<storage, read> lf_norms: array<f32>;
@group(0) @binding(3) var<storage, read_write> lf_g: array<u32>;

fn lf_load(e: u32) -> f32 {
    return decode(lf_x[word_of(e, DT_X)], e, DT_X);
}

// g_r ← κ·g_r, then (L2) (g − û⟨û, g⟩)/n, or g/ε where n was clamped; in place, f32 [rows, d].
// x is the raw embedding tensor (row x_row0 + r), n = norms[out_off + r].
@compute @workgroup_size(256, 1, 1)
fn l2_finish_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = linear_workgroup(wid, nwg) * WG1 + lid.x;
    if (r >= RN.rows) {
        return;
    }
    let gb = r * RN.d;
    if (RN.l2 == 0u) {
        for (var k = 0u; k < RN.d; k += 1u) {
            lf_g[gb + k] = bitcast<u32>(bitcast<f32>(lf_g[gb + k]) * RN.kappa);
        }
        return;
    }
    let xb = (RN.x_row0 + r) * RN.d;
    let n = lf_norms[RN.out_off + r];
    var proj = 0.0;
    for (var k = 0u; k < RN.d; k += 1u) {
        let g = bitcast<f32>(lf_g[gb + k]) * RN.kappa;
        lf_g[gb + k] = bitcast<u32>(g);
        proj += (lf_load(xb + k) / n) * g;
    }
    if (n <= RN.eps) {
        for (var k = 0u; k < RN.d; k += 1u) {
            lf_g[gb + k] = bitcast<u32>(bitcast<f32>(lf_g[gb + k]) / RN.eps);
        }
        return;
    }
    for (var k = 0u; k < RN.d; k += 1u) {
        let u = lf_load(xb + k) / n;
        lf_g[gb + k] = bitcast<u32>((bitcast<f32>(lf_g[gb + k]) - u * proj) / n);
    }
}
