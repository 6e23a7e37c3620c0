// layernorm.wgsl — LayerNorm over rows (src/ops/layernorm.rs is the authority; the CPU backend,
// src/cpu/layernorm.rs, computes the same in f32). The residual add happens before, in x's
// dtype, so x here is already x + r.
//
// Math, row r of width d, token t = r mod tokens (tokens = 1: one shared γ/β of shape [d];
// otherwise γ, β are [tokens, d] and x is [..., tokens, d]):
//   μ_r    = Σ_c x_rc / d                      variance = Σ_c (x_rc − μ_r)² / d    (two passes, f32)
//   rstd_r = 1 / √(variance + eps)
//   y_rc   = (x_rc − μ_r)·rstd_r·γ_tc + β_tc
//   backward, with x̂ = (x − μ)·rstd and g = dy·γ:
//   a_r    = Σ_c g_rc / d                      b_r = Σ_c g_rc·x̂_rc / d
//   dx_rc  = rstd_r·(g_rc − a_r − x̂_rc·b_r)
//   dγ_tc  = Σ_{r ≡ t mod tokens} dy_rc·x̂_rc    dβ_tc = Σ_{r ≡ t} dy_rc       (r ascending)
// Layout: x, y, dy, dx are [rows, d] row-major (element r·d + c); mean, rstd are [rows] f32;
// γ, β, dγ, dβ are [tokens, d] (element t·d + c); the backward's scratch `ab` holds a_r, b_r
// at words 2r, 2r+1 (f32).
//
// Kernels and launch geometry (the CUDA twin kernels/cuda/layernorm.cu has the same passes):
//   ln_stats_main     one workgroup of WG = 64 threads per row, grid = rows (folded by the host
//                     when large; linear order x fastest). Thread τ sums c = τ, τ+64, ...; the 64
//                     partials are combined by a fixed binary tree in workgroup memory (strides
//                     32, 16, ..., 1), so the result is the same every run. Once for μ, once for
//                     the centred sum of squares. Thread 0 writes mean_r, rstd_r.
//   ln_apply_main     one thread per output word of y (256 per workgroup): one f32 element, or
//                     the two 16-bit elements of the word — a row of odd width shares a word
//                     with the next row, so threads own words, never rows.
//   ln_bwd_rows_main  one workgroup of 64 per row, the same tree: a_r and b_r into `ab`.
//   ln_dx_main        one thread per output word of dx.
//   ln_dparams_main   one thread per element pair k = 2τ, 2τ+1 of the flattened [tokens, d]
//                     dγ and dβ (a whole word of each, whatever their dtypes), looping over its
//                     rows r = t, t + tokens, ... in increasing order: deterministic column sums.
//   Workgroup memory: 64 f32 (256 B) in the two row kernels, none elsewhere.
//
// Variants (overrides): dtype codes (0 f32, 1 bf16, 2 f16) DT_X (x), DT_G (γ), DT_B (β),
// DT_DY, DT_DST (y or dx), DT_MEAN, DT_RSTD (read in backward), DT_DG, DT_DB (dγ, dβ).
//
// Memory traffic (s = bytes per element of x): forward reads x three times (sum, centred sum,
// apply: 3·rows·d·s; a row is re-read while cache-resident on a GPU), γ/β once per row, writes
// y once and 8 B of statistics per row. Backward reads x, dy, γ twice (row sums, then dx) and
// x, dy once more for the column sums; writes dx, dγ, dβ once and 8 B of scratch per row.

override DT_X: u32 = 0u;
override DT_G: u32 = 0u;
override DT_B: u32 = 0u;
override DT_DY: u32 = 0u;
override DT_DST: u32 = 0u;
override DT_MEAN: u32 = 0u;
override DT_RSTD: u32 = 0u;
override DT_DG: u32 = 0u;
override DT_DB: u32 = 0u;

const WG: u32 = 64u;
const EW: u32 = 256u;

struct LnParams {
    rows: u32, d: u32, tokens: u32, eps_bits: u32,
    // Elements and words of y (or dx); element pairs of dγ/dβ.
    numel: u32, nwords: u32, npairs: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> LN: LnParams;
@group(0) @binding(1) var<storage, read> ln_x: array<u32>;
// ln_stats_main
@group(0) @binding(2) var<storage, read_write> st_mean: array<u32>;
@group(0) @binding(3) var<storage, read_write> st_rstd: array<u32>;
// ln_apply_main
@group(0) @binding(2) var<storage, read> ap_gamma: array<u32>;
@group(0) @binding(3) var<storage, read> ap_beta: array<u32>;
@group(0) @binding(4) var<storage, read> ap_mean: array<u32>;
@group(0) @binding(5) var<storage, read> ap_rstd: array<u32>;
@group(0) @binding(6) var<storage, read_write> ap_y: array<u32>;
// backward (all three)
@group(0) @binding(2) var<storage, read> bw_gamma: array<u32>;
@group(0) @binding(3) var<storage, read> bw_mean: array<u32>;
@group(0) @binding(4) var<storage, read> bw_rstd: array<u32>;
@group(0) @binding(5) var<storage, read> bw_dy: array<u32>;
// ln_bwd_rows_main
@group(0) @binding(6) var<storage, read_write> br_ab: array<u32>;
// ln_dx_main
@group(0) @binding(6) var<storage, read> dx_ab: array<u32>;
@group(0) @binding(7) var<storage, read_write> dx_out: array<u32>;
// ln_dparams_main
@group(0) @binding(6) var<storage, read_write> dp_dg: array<u32>;
@group(0) @binding(7) var<storage, read_write> dp_db: array<u32>;

var<workgroup> red: array<f32, WG>;

fn load_x(e: u32) -> f32 {
    return decode(ln_x[word_of(e, DT_X)], e, DT_X);
}

fn load_dy(e: u32) -> f32 {
    return decode(bw_dy[word_of(e, DT_DY)], e, DT_DY);
}

fn load_gamma_bw(e: u32) -> f32 {
    return decode(bw_gamma[word_of(e, DT_G)], e, DT_G);
}

fn load_mean_bw(r: u32) -> f32 {
    return decode(bw_mean[word_of(r, DT_MEAN)], r, DT_MEAN);
}

fn load_rstd_bw(r: u32) -> f32 {
    return decode(bw_rstd[word_of(r, DT_RSTD)], r, DT_RSTD);
}

// The sum of the 64 threads' values v, by a fixed tree (called in uniform control flow).
fn row_sum(v: f32, tid: u32) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            red[tid] += red[tid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // red is written again by the next call.
    workgroupBarrier();
    return total;
}

// ---------------------------------------------------------------- forward

@compute @workgroup_size(64, 1, 1)
fn ln_stats_main(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = linear_workgroup(wid, nwg);
    // Uniform per workgroup, so the barriers in row_sum stay in uniform control flow.
    if (r >= LN.rows) {
        return;
    }
    let base = r * LN.d;
    var s = 0.0;
    for (var c = tid; c < LN.d; c += WG) {
        s += load_x(base + c);
    }
    let mean = row_sum(s, tid) / f32(LN.d);
    var q = 0.0;
    for (var c = tid; c < LN.d; c += WG) {
        let t = load_x(base + c) - mean;
        q += t * t;
    }
    let variance = row_sum(q, tid) / f32(LN.d);
    if (tid == 0u) {
        st_mean[r] = bitcast<u32>(mean);
        st_rstd[r] = bitcast<u32>(1.0 / sqrt(variance + bitcast<f32>(LN.eps_bits)));
    }
}

fn y_value(e: u32) -> f32 {
    let r = e / LN.d;
    let c = e % LN.d;
    let a = (r % LN.tokens) * LN.d + c;
    let g = decode(ap_gamma[word_of(a, DT_G)], a, DT_G);
    let b = decode(ap_beta[word_of(a, DT_B)], a, DT_B);
    let m = bitcast<f32>(ap_mean[r]);
    let inv = bitcast<f32>(ap_rstd[r]);
    return (load_x(e) - m) * inv * g + b;
}

@compute @workgroup_size(256, 1, 1)
fn ln_apply_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = linear_workgroup(wid, nwg) * EW + li;
    if (w >= LN.nwords) {
        return;
    }
    if (DT_DST == DT_F32) {
        ap_y[w] = bitcast<u32>(y_value(w));
        return;
    }
    var word = ap_y[w];
    for (var k = 0u; k < 2u; k++) {
        let e = 2u * w + k;
        if (e < LN.numel) {
            word = put_half(word, e, encode16(y_value(e), DT_DST));
        }
    }
    ap_y[w] = word;
}

// ---------------------------------------------------------------- backward

@compute @workgroup_size(64, 1, 1)
fn ln_bwd_rows_main(
    @builtin(local_invocation_index) tid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = linear_workgroup(wid, nwg);
    if (r >= LN.rows) {
        return;
    }
    let base = r * LN.d;
    let goff = (r % LN.tokens) * LN.d;
    let m = load_mean_bw(r);
    let inv = load_rstd_bw(r);
    var a = 0.0;
    var b = 0.0;
    for (var c = tid; c < LN.d; c += WG) {
        let gd = load_dy(base + c) * load_gamma_bw(goff + c);
        a += gd;
        b += gd * (load_x(base + c) - m) * inv;
    }
    let sa = row_sum(a, tid) / f32(LN.d);
    let sb = row_sum(b, tid) / f32(LN.d);
    if (tid == 0u) {
        br_ab[2u * r] = bitcast<u32>(sa);
        br_ab[2u * r + 1u] = bitcast<u32>(sb);
    }
}

fn dx_value(e: u32) -> f32 {
    let r = e / LN.d;
    let c = e % LN.d;
    let m = load_mean_bw(r);
    let inv = load_rstd_bw(r);
    let a = bitcast<f32>(dx_ab[2u * r]);
    let b = bitcast<f32>(dx_ab[2u * r + 1u]);
    let xh = (load_x(e) - m) * inv;
    let g = load_dy(e) * load_gamma_bw((r % LN.tokens) * LN.d + c);
    return inv * (g - a - xh * b);
}

@compute @workgroup_size(256, 1, 1)
fn ln_dx_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = linear_workgroup(wid, nwg) * EW + li;
    if (w >= LN.nwords) {
        return;
    }
    if (DT_DST == DT_F32) {
        dx_out[w] = bitcast<u32>(dx_value(w));
        return;
    }
    var word = dx_out[w];
    for (var k = 0u; k < 2u; k++) {
        let e = 2u * w + k;
        if (e < LN.numel) {
            word = put_half(word, e, encode16(dx_value(e), DT_DST));
        }
    }
    dx_out[w] = word;
}

// (dγ, dβ) of flattened parameter element k = t·d + c, rows in increasing order.
fn param_grads(k: u32) -> vec2<f32> {
    let t = k / LN.d;
    let c = k % LN.d;
    var dg = 0.0;
    var db = 0.0;
    for (var r = t; r < LN.rows; r += LN.tokens) {
        let e = r * LN.d + c;
        let dy = load_dy(e);
        dg += dy * (load_x(e) - load_mean_bw(r)) * load_rstd_bw(r);
        db += dy;
    }
    return vec2<f32>(dg, db);
}

// Element k (even) and, when `both`, k+1 of dγ (which = 0) or dβ (which = 1).
fn store_pair(which: u32, k: u32, v0: f32, v1: f32, both: bool) {
    let dt = select(DT_DG, DT_DB, which == 1u);
    if (dt == DT_F32) {
        if (which == 0u) {
            dp_dg[k] = bitcast<u32>(v0);
            if (both) {
                dp_dg[k + 1u] = bitcast<u32>(v1);
            }
        } else {
            dp_db[k] = bitcast<u32>(v0);
            if (both) {
                dp_db[k + 1u] = bitcast<u32>(v1);
            }
        }
        return;
    }
    var word: u32;
    if (which == 0u) {
        word = dp_dg[k >> 1u];
    } else {
        word = dp_db[k >> 1u];
    }
    word = put_half(word, k, encode16(v0, dt));
    if (both) {
        word = put_half(word, k + 1u, encode16(v1, dt));
    }
    if (which == 0u) {
        dp_dg[k >> 1u] = word;
    } else {
        dp_db[k >> 1u] = word;
    }
}

@compute @workgroup_size(256, 1, 1)
fn ln_dparams_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let p = linear_workgroup(wid, nwg) * EW + li;
    if (p >= LN.npairs) {
        return;
    }
    let k = 2u * p;
    let both = k + 1u < LN.tokens * LN.d;
    let g0 = param_grads(k);
    var g1 = vec2<f32>(0.0, 0.0);
    if (both) {
        g1 = param_grads(k + 1u);
    }
    store_pair(0u, k, g0.x, g1.x, both);
    store_pair(1u, k, g0.y, g1.y, both);
}
