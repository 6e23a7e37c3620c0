// optim.wgsl — fused optimizers (src/ops/optim.rs). The CUDA twin is kernels/cuda/optim.cu:
// the same math in the same order, the same per-thread work split and indexing. WGSL has no
// device pointers, so where CUDA passes a table of up to 32 tensors in one launch, the host
// records one dispatch per tensor into one command buffer and submits it once (block0 = 0).
//
// Math (f32; h[] are host-computed step scalars, see src/ops/optim.rs `OptHyper`):
//   SGD:   d = g (+ wd·p); momentum: b = (t == 1 ? d : μ·b + (1−τ)·d), d = nesterov ? d+μ·b : b;
//          p = p − lr·d
//   Adam:  Adam g += wd·p | AdamW p *= 1 − lr·wd; m = m + (1−β1)(g−m); v = v·β2 + (1−β2)·g·g;
//          p = p − (lr/(1−β1^t))·m/(√v/√(1−β2^t) + ε)
//   Row-wise Adagrad: per row r, g += wd·p (optional); s[r] += Σ g²/D; p −= lr/(√s[r]+ε)·g
//   With an f32 master copy the master is updated and the param receives its rounding.
//
// Launch geometry: 256 threads per workgroup.
//   sgd_main / adam_main: thread t owns the element pair k = 2t, 2t+1 (for a 16-bit param
//     exactly one u32 word: one writer per word); ⌈⌈n/2⌉/256⌉ workgroups, folded by the host.
//   adagrad_main: one workgroup per row; thread t owns column pairs c = t, t + 256, …, a fixed
//     workgroup-memory tree sums Σ g² (deterministic). A 16-bit param needs an even D here (a
//     word must not straddle two rows' workgroups); the host rejects odd D for 16-bit params.
//
// Memory traffic as in optim.cu (f32 Adam 28 B/element, SGD+momentum 20 B, Adagrad 12 B).
//
// Variants (overrides): DT_P, DT_G dtype codes (0 f32, 1 bf16, 2 f16); HAS_MASTER.

override DT_P: u32 = 0u;
override DT_G: u32 = 0u;
override HAS_MASTER: bool = false;

const WG: u32 = 256u;
const F_SGD_MOMENTUM: u32 = 1u;
const F_SGD_NESTEROV: u32 = 2u;
const F_SGD_FIRST: u32 = 4u;
const F_WEIGHT_DECAY: u32 = 8u;
const F_ADAM_DECOUPLED: u32 = 16u;

struct OptParams {
    h0: vec4<f32>,
    h1: vec4<f32>,
    flags: u32, n: u32, dim: u32, _p0: u32,
}

@group(0) @binding(0) var<uniform> P: OptParams;
@group(0) @binding(1) var<storage, read_write> ps: array<u32>;
@group(0) @binding(2) var<storage, read> gs: array<u32>;
@group(0) @binding(3) var<storage, read_write> s1: array<f32>;
@group(0) @binding(4) var<storage, read_write> s2: array<f32>;
@group(0) @binding(5) var<storage, read_write> master: array<f32>;

var<workgroup> red: array<f32, 256>;

fn h(i: u32) -> f32 {
    if (i < 4u) {
        return P.h0[i];
    }
    return P.h1[i - 4u];
}

fn load_g(k: u32) -> f32 {
    return decode(gs[word_of(k, DT_G)], k, DT_G);
}

// The value being updated: the master when present, else the param (word w already read).
fn load_p(k: u32, w: u32) -> f32 {
    if (HAS_MASTER) {
        return master[k];
    }
    return decode(w, k, DT_P);
}

fn flag_on(f: u32) -> bool {
    return (P.flags & f) != 0u;
}

fn sgd_elem(k: u32, pv: f32) -> f32 {
    var d = load_g(k);
    if (flag_on(F_WEIGHT_DECAY)) {
        d += h(3u) * pv;
    }
    if (flag_on(F_SGD_MOMENTUM)) {
        var b = d;
        if (!flag_on(F_SGD_FIRST)) {
            b = h(1u) * s1[k] + h(2u) * d;
        }
        s1[k] = b;
        if (flag_on(F_SGD_NESTEROV)) {
            d = d + h(1u) * b;
        } else {
            d = b;
        }
    }
    return pv - h(0u) * d;
}

fn adam_elem(k: u32, p0: f32) -> f32 {
    var pv = p0;
    var g = load_g(k);
    if (flag_on(F_ADAM_DECOUPLED)) {
        if (flag_on(F_WEIGHT_DECAY)) {
            pv *= h(7u);
        }
    } else if (flag_on(F_WEIGHT_DECAY)) {
        g += h(6u) * pv;
    }
    let m = s1[k] + h(2u) * (g - s1[k]);
    let v = s2[k] * h(3u) + h(4u) * g * g;
    s1[k] = m;
    s2[k] = v;
    let denom = sqrt(v) / h(1u) + h(5u);
    return pv - h(0u) * (m / denom);
}

// Updates elements k0, k0+1 (< n) with `which` (0 SGD, 1 Adam); one writer per param word.
fn update_pair(k0: u32, n: u32, which: u32) {
    if (DT_P == DT_F32) {
        for (var hh = 0u; hh < 2u; hh++) {
            let k = k0 + hh;
            if (k < n) {
                let pv = load_p(k, ps[k]);
                var nv: f32;
                if (which == 0u) { nv = sgd_elem(k, pv); } else { nv = adam_elem(k, pv); }
                if (HAS_MASTER) {
                    master[k] = nv;
                }
                ps[k] = bitcast<u32>(nv);
            }
        }
        return;
    }
    let w = k0 >> 1u;
    let old = ps[w];
    var word = old;
    for (var hh = 0u; hh < 2u; hh++) {
        let k = k0 + hh;
        if (k < n) {
            let pv = load_p(k, old);
            var nv: f32;
            if (which == 0u) { nv = sgd_elem(k, pv); } else { nv = adam_elem(k, pv); }
            if (HAS_MASTER) {
                master[k] = nv;
            }
            word = put_half(word, k, encode16(nv, DT_P));
        }
    }
    ps[w] = word;
}

@compute @workgroup_size(256, 1, 1)
fn sgd_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = linear_workgroup(wid, nwg) * WG + li;
    if (2u * t < P.n) {
        update_pair(2u * t, P.n, 0u);
    }
}

@compute @workgroup_size(256, 1, 1)
fn adam_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = linear_workgroup(wid, nwg) * WG + li;
    if (2u * t < P.n) {
        update_pair(2u * t, P.n, 1u);
    }
}

fn adagrad_g(k: u32, pv: f32) -> f32 {
    var g = load_g(k);
    if (flag_on(F_WEIGHT_DECAY)) {
        g += h(2u) * pv;
    }
    return g;
}

@compute @workgroup_size(256, 1, 1)
fn adagrad_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    // Uniform control flow for the barriers: every thread of the workgroup reaches them.
    let row = linear_workgroup(wid, nwg);
    let live = row < P.n;
    let base = row * P.dim;
    let cpairs = (P.dim + 1u) / 2u;
    var acc = 0.0;
    if (live) {
        for (var c = li; c < cpairs; c += WG) {
            for (var hh = 0u; hh < 2u; hh++) {
                let j = 2u * c + hh;
                if (j < P.dim) {
                    let k = base + j;
                    let g = adagrad_g(k, load_p(k, ps[word_of(k, DT_P)]));
                    acc += g * g;
                }
            }
        }
    }
    red[li] = acc;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off >> 1u) {
        if (li < off) {
            red[li] = red[li] + red[li + off];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red[0]);
    if (!live) {
        return;
    }
    let s = s1[row] + total / f32(P.dim);
    let mult = h(0u) / (sqrt(s) + h(1u));
    for (var c = li; c < cpairs; c += WG) {
        let k0 = base + 2u * c;
        let both = 2u * c + 1u < P.dim;
        if (DT_P == DT_F32) {
            for (var hh = 0u; hh < 2u; hh++) {
                if (hh == 0u || both) {
                    let k = k0 + hh;
                    let pv = load_p(k, ps[k]);
                    let nv = pv - mult * adagrad_g(k, pv);
                    if (HAS_MASTER) {
                        master[k] = nv;
                    }
                    ps[k] = bitcast<u32>(nv);
                }
            }
        } else {
            // D is even for 16-bit params (host check), so k0 is even: one whole word.
            let w = k0 >> 1u;
            let old = ps[w];
            var word = old;
            for (var hh = 0u; hh < 2u; hh++) {
                if (hh == 0u || both) {
                    let k = k0 + hh;
                    let pv = load_p(k, old);
                    let nv = pv - mult * adagrad_g(k, pv);
                    if (HAS_MASTER) {
                        master[k] = nv;
                    }
                    word = put_half(word, k, encode16(nv, DT_P));
                }
            }
            ps[w] = word;
        }
    }
    workgroupBarrier();
    if (li == 0u) {
        s1[row] = s;
    }
}
