// elementwise.wgsl — the small passes around the GEMM core. All three are memory-bound; each
// thread owns one u32 word of its output (one f32 element, or two 16-bit elements), so no two
// threads ever read-modify-write the same word and no atomics are needed.
//
// Launch geometry (all entry points): 256 threads per workgroup, one thread per output word,
// grid = ⌈words/256⌉ workgroups folded into (x, y, z) by the host when it exceeds
// maxComputeWorkgroupsPerDimension; the linear order is x fastest.
//
// pack_main — finishes a GEMM whose C (or pre) is 16-bit (or whose sibling output is):
//   dst(e) = round_dt(src(compact index of e) [+ dst_old(e) if ACCUMULATE])   for e in the view
//   dst(e) unchanged                                                          otherwise
//   `src` is the f32 scratch the GEMM wrote as a compact [batch, m, n] array; the host passes
//   the C view as three (stride, size, compact stride) triples sorted by decreasing stride, and
//   checks that they nest (each stride exceeds the span of the smaller ones), so the greedy
//   division below recovers (g, i, j) exactly and decides view membership.
//   Traffic: 4 B read per element of the view + one read and one write per output word.
//
// act_backward_main — dz(e) = dy(e)·act'(pre(e)) for e < numel (pre absent: act' = 1).
//   Traffic: (s_dy + s_pre + s_dz)·numel bytes, plus an old-word read for 16-bit dz.
//
// col_sum_main — out(j) = Σ_{i<rows} x(i·cols + j) [+ out_old(j)], i ascending: the same
//   order every run, hence bit-deterministic (no atomics). A thread owns one word of out, i.e.
//   one or two columns. Traffic: rows·cols·s_x reads (threads of a workgroup read consecutive
//   columns of one row together, so the reads coalesce) + cols·s_out.
//
// Variants (overrides): DT_DST, DT_DY, DT_PRE, DT_X dtype codes (0 f32, 1 bf16, 2 f16);
// ACT; HAS_PRE; ACCUMULATE; SKIP_ODD (col_sum: odd columns count as 0, the gate-bias slots of
// a GDCN without one).

override DT_DST: u32 = 0u;
override DT_DY: u32 = 0u;
override DT_PRE: u32 = 0u;
override DT_X: u32 = 0u;
override ACT: u32 = 0u;
override HAS_PRE: bool = false;
override ACCUMULATE: bool = false;
override SKIP_ODD: bool = false;

const WG: u32 = 256u;

// Output word of this thread; a folded grid overshoots, so callers bound it by their word count.
fn word_id(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return linear_workgroup(wid, nwg) * WG + li;
}

// ---------------------------------------------------------------- pack_main

struct PackParams {
    numel: u32, nwords: u32, off: u32, _pad: u32,
    // (tensor stride, size, compact stride) of the three view axes, by decreasing stride;
    // an axis of size 1 has stride 0 and is skipped.
    s0: u32, n0: u32, q0: u32, _p0: u32,
    s1: u32, n1: u32, q1: u32, _p1: u32,
    s2: u32, n2: u32, q2: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> PK: PackParams;
@group(0) @binding(1) var<storage, read> pk_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> pk_dst: array<u32>;

// Compact scratch index of tensor element e, or 0xffffffff when e is not in the view.
fn view_slot(e: u32) -> u32 {
    if (e < PK.off) {
        return 0xffffffffu;
    }
    var r = e - PK.off;
    var slot = 0u;
    let s = array<u32, 3>(PK.s0, PK.s1, PK.s2);
    let n = array<u32, 3>(PK.n0, PK.n1, PK.n2);
    let q = array<u32, 3>(PK.q0, PK.q1, PK.q2);
    for (var d = 0u; d < 3u; d++) {
        if (s[d] == 0u) {
            continue;
        }
        let idx = r / s[d];
        if (idx >= n[d]) {
            return 0xffffffffu;
        }
        r -= idx * s[d];
        slot += idx * q[d];
    }
    return select(0xffffffffu, slot, r == 0u);
}

fn packed_value(e: u32, old: f32) -> f32 {
    let slot = view_slot(e);
    var v = bitcast<f32>(pk_src[slot]);
    if (ACCUMULATE) {
        v += old;
    }
    return v;
}

@compute @workgroup_size(256, 1, 1)
fn pack_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = word_id(wid, nwg, li);
    if (w >= PK.nwords) {
        return;
    }
    let old = pk_dst[w];
    if (DT_DST == DT_F32) {
        if (view_slot(w) == 0xffffffffu) {
            return;
        }
        pk_dst[w] = bitcast<u32>(packed_value(w, bitcast<f32>(old)));
        return;
    }
    var word = old;
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if (e >= PK.numel || view_slot(e) == 0xffffffffu) {
            continue;
        }
        let v = packed_value(e, decode(old, e, DT_DST));
        word = put_half(word, e, encode16(v, DT_DST));
    }
    pk_dst[w] = word;
}

// ---------------------------------------------------------------- act_backward_main

struct ActParams {
    numel: u32, nwords: u32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> AB: ActParams;
@group(0) @binding(1) var<storage, read> ab_dy: array<u32>;
@group(0) @binding(2) var<storage, read> ab_pre: array<u32>;
@group(0) @binding(3) var<storage, read_write> ab_dz: array<u32>;

fn dz_value(e: u32) -> f32 {
    let dy = decode(ab_dy[word_of(e, DT_DY)], e, DT_DY);
    if (!HAS_PRE) {
        return dy;
    }
    let z = decode(ab_pre[word_of(e, DT_PRE)], e, DT_PRE);
    return dy * act_grad(ACT, z);
}

@compute @workgroup_size(256, 1, 1)
fn act_backward_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = word_id(wid, nwg, li);
    if (w >= AB.nwords) {
        return;
    }
    if (DT_DST == DT_F32) {
        ab_dz[w] = bitcast<u32>(dz_value(w));
        return;
    }
    var word = ab_dz[w];
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if (e < AB.numel) {
            word = put_half(word, e, encode16(dz_value(e), DT_DST));
        }
    }
    ab_dz[w] = word;
}

// ---------------------------------------------------------------- col_sum_main

struct ColParams {
    rows: u32, cols: u32, nwords: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> CS: ColParams;
@group(0) @binding(1) var<storage, read> cs_x: array<u32>;
@group(0) @binding(2) var<storage, read_write> cs_out: array<u32>;

fn column_sum(j: u32) -> f32 {
    var s = 0.0;
    if (SKIP_ODD && (j & 1u) == 1u) {
        return s;
    }
    for (var i = 0u; i < CS.rows; i++) {
        let e = i * CS.cols + j;
        s += decode(cs_x[word_of(e, DT_X)], e, DT_X);
    }
    return s;
}

@compute @workgroup_size(256, 1, 1)
fn col_sum_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = word_id(wid, nwg, li);
    if (w >= CS.nwords) {
        return;
    }
    if (DT_DST == DT_F32) {
        var s = column_sum(w);
        if (ACCUMULATE) {
            s += bitcast<f32>(cs_out[w]);
        }
        cs_out[w] = bitcast<u32>(s);
        return;
    }
    let old = cs_out[w];
    var word = old;
    for (var h = 0u; h < 2u; h++) {
        let j = 2u * w + h;
        if (j < CS.cols) {
            var s = column_sum(j);
            if (ACCUMULATE) {
                s += decode(old, j, DT_DST);
            }
            word = put_half(word, j, encode16(s, DT_DST));
        }
    }
    cs_out[w] = word;
}
