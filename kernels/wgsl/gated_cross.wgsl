// gated_cross.wgsl — the elementwise half of a cross layer's backward (gate_backward_main) and
// the elementwise sum / cast around it (add_main). The CUDA backend's counterparts live in
// kernels/cuda/gated_cross.cu.
//
// gate_backward_main (src/ops/backend.rs: gate_backward; CPU: src/cpu/fast.rs):
//   for k < N = rows·D, with (u, v) = (pre(2k), pre(2k+1)) when GATED, u = pre(k) otherwise:
//     GATED:   s = σ(v);  Δ(2k) = Ḡ(k)·c0(k)·s;  Δ(2k+1) = Δ(2k)·u·(1−s);  dX0(k) += Ḡ(k)·u·s
//     DCN-V2:             Δ(k)  = Ḡ(k)·c0(k);                           dX0(k) += Ḡ(k)·u
//   Layout: Ḡ, c0, dX0 are [rows, D] row-major, pre and Δ are [rows, P] with P = 2D (the
//   interleaved (u, v) pairs of the packed weights) or D; all contiguous, so the row
//   structure never matters and k runs over the flat index. All math in f32; every tensor may
//   be f32, bf16 or f16 (dX0 is read, added to and rounded once).
//   Thread t owns the element pair k = 2t, 2t+1: that is whole u32 words of every output (one
//   word of a 16-bit dX0 or of a 16-bit DCN-V2 Δ, two of a 16-bit gated Δ, two, or four, f32
//   words), so no two threads ever read-modify-write the same word and no atomics are needed.
//   A trailing odd element keeps the other half of its last 16-bit word intact.
//   Traffic per k: (s_g + s_c0 + P/D·s_pre + P/D·s_Δ + 2·s_dx0) bytes, one pass.
//
// add_main: out(e) = a(e) [+ b(e)] for e < numel, any dtypes (with no b it is a cast).
//   Thread t owns output word t (one f32 element or two 16-bit ones).
//   Traffic: (s_a + s_b + s_out)·numel bytes.
//
// Launch geometry (both): 256 threads per workgroup, grid = ⌈threads/256⌉ workgroups folded into
// (x, y, z) by the host when it exceeds maxComputeWorkgroupsPerDimension (x fastest).
//
// Variants (overrides): DT_G, DT_C0, DT_PRE, DT_DELTA, DT_DX0, DT_A, DT_B, DT_DST dtype codes
// (0 f32, 1 bf16, 2 f16); GATED; HAS_B.

override DT_G: u32 = 0u;
override DT_C0: u32 = 0u;
override DT_PRE: u32 = 0u;
override DT_DELTA: u32 = 0u;
override DT_DX0: u32 = 0u;
override GATED: bool = false;
override DT_A: u32 = 0u;
override DT_B: u32 = 0u;
override DT_DST: u32 = 0u;
override HAS_B: bool = false;

const WG: u32 = 256u;

fn thread_id(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return linear_workgroup(wid, nwg) * WG + li;
}

// ---------------------------------------------------------------- gate_backward_main

struct GateParams {
    // N = rows·D elements of Ḡ, c0 and dX0; pairs = ⌈N/2⌉ threads.
    numel: u32, pairs: u32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> GB: GateParams;
@group(0) @binding(1) var<storage, read> gb_g: array<u32>;
@group(0) @binding(2) var<storage, read> gb_c0: array<u32>;
@group(0) @binding(3) var<storage, read> gb_pre: array<u32>;
@group(0) @binding(4) var<storage, read_write> gb_delta: array<u32>;
@group(0) @binding(5) var<storage, read_write> gb_dx0: array<u32>;

fn gb_load(e: u32, which: u32) -> f32 {
    switch which {
        case 0u: {
            return decode(gb_g[word_of(e, DT_G)], e, DT_G);
        }
        case 1u: {
            return decode(gb_c0[word_of(e, DT_C0)], e, DT_C0);
        }
        default: {
            return decode(gb_pre[word_of(e, DT_PRE)], e, DT_PRE);
        }
    }
}

// Stores f32 values v0, v1 at Δ elements e, e+1 (e even; e+1 only when `both`).
fn store_delta(e: u32, v0: f32, v1: f32, both: bool) {
    if (DT_DELTA == DT_F32) {
        gb_delta[e] = bitcast<u32>(v0);
        if (both) {
            gb_delta[e + 1u] = bitcast<u32>(v1);
        }
        return;
    }
    let w = e >> 1u;
    var word = put_half(gb_delta[w], e, encode16(v0, DT_DELTA));
    if (both) {
        word = put_half(word, e + 1u, encode16(v1, DT_DELTA));
    }
    gb_delta[w] = word;
}

// dX0(e) += d0, dX0(e+1) += d1 (e even; e+1 only when `both`), rounded once.
fn accumulate_dx0(e: u32, d0: f32, d1: f32, both: bool) {
    if (DT_DX0 == DT_F32) {
        gb_dx0[e] = bitcast<u32>(bitcast<f32>(gb_dx0[e]) + d0);
        if (both) {
            gb_dx0[e + 1u] = bitcast<u32>(bitcast<f32>(gb_dx0[e + 1u]) + d1);
        }
        return;
    }
    let w = e >> 1u;
    let old = gb_dx0[w];
    var word = put_half(old, e, encode16(decode(old, e, DT_DX0) + d0, DT_DX0));
    if (both) {
        word = put_half(word, e + 1u, encode16(decode(old, e + 1u, DT_DX0) + d1, DT_DX0));
    }
    gb_dx0[w] = word;
}

@compute @workgroup_size(256, 1, 1)
fn gate_backward_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = thread_id(wid, nwg, li);
    if (t >= GB.pairs) {
        return;
    }
    let k0 = 2u * t;
    let both = k0 + 1u < GB.numel;
    var dx = vec2<f32>(0.0);
    var du = vec2<f32>(0.0);
    var dv = vec2<f32>(0.0);
    for (var h = 0u; h < 2u; h++) {
        let k = k0 + h;
        if (h == 1u && !both) {
            break;
        }
        let g = gb_load(k, 0u);
        let c = gb_load(k, 1u);
        if (GATED) {
            let u = gb_load(2u * k, 2u);
            let s = act_fwd(ACT_SIGMOID, gb_load(2u * k + 1u, 2u));
            du[h] = g * c * s;
            dv[h] = du[h] * u * (1.0 - s);
            dx[h] = g * u * s;
        } else {
            let u = gb_load(k, 2u);
            du[h] = g * c;
            dx[h] = g * u;
        }
    }
    if (GATED) {
        // Δ elements 4t .. 4t+3 = (u, v) of k0, then of k0+1.
        store_delta(2u * k0, du[0], dv[0], true);
        if (both) {
            store_delta(2u * k0 + 2u, du[1], dv[1], true);
        }
    } else {
        store_delta(k0, du[0], du[1], both);
    }
    accumulate_dx0(k0, dx[0], dx[1], both);
}

// ---------------------------------------------------------------- add_main

struct AddParams {
    numel: u32, nwords: u32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> AD: AddParams;
@group(0) @binding(1) var<storage, read> ad_a: array<u32>;
@group(0) @binding(2) var<storage, read> ad_b: array<u32>;
@group(0) @binding(3) var<storage, read_write> ad_out: array<u32>;

fn sum_at(e: u32) -> f32 {
    var v = decode(ad_a[word_of(e, DT_A)], e, DT_A);
    if (HAS_B) {
        v += decode(ad_b[word_of(e, DT_B)], e, DT_B);
    }
    return v;
}

@compute @workgroup_size(256, 1, 1)
fn add_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = thread_id(wid, nwg, li);
    if (w >= AD.nwords) {
        return;
    }
    if (DT_DST == DT_F32) {
        ad_out[w] = bitcast<u32>(sum_at(w));
        return;
    }
    var word = ad_out[w];
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if (e < AD.numel) {
            word = put_half(word, e, encode16(sum_at(e), DT_DST));
        }
    }
    ad_out[w] = word;
}
