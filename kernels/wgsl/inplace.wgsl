// inplace.wgsl — the in-place element-wise update of src/ops/inplace.rs (Tensor::copy_from,
// fill, scale, axpy, add_). The CUDA twin is kernels/cuda/inplace.cu: same work split, same
// indexing, same order of f32 operations.
//
// axpby_main — for every element k < n of y (and x, same size):
//     y(k) = α·y(k) + β·x(k)   (READ_Y and HAS_X)     y(k) = α·y(k)   (READ_Y only)
//     y(k) = β·x(k)            (HAS_X only)           y(k) = c        (neither: fill)
//   f32 arithmetic, one rounding on the store; y and x may have different storage dtypes.
//
// Launch geometry: 256 threads per workgroup; thread t owns the element pair k = 2t, 2t+1,
// which for 16-bit y is exactly one u32 word (no two threads read-modify-write a word, no
// atomics); grid = ⌈⌈n/2⌉/256⌉ workgroups, folded into (x, y, z) by the host when it exceeds
// maxComputeWorkgroupsPerDimension (x fastest).
//
// Memory traffic: n·(s_y·(1 + READ_Y) + s_x) bytes (f32 axpy: 12 B/element); memory bound.
//
// Variants (overrides): DT_Y, DT_X dtype codes (0 f32, 1 bf16, 2 f16); READ_Y; HAS_X.

override DT_Y: u32 = 0u;
override DT_X: u32 = 0u;
override READ_Y: bool = false;
override HAS_X: bool = false;

const WG: u32 = 256u;

struct AxpbyParams {
    n: u32, pairs: u32, alpha: f32, beta: f32,
    fill: f32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> P: AxpbyParams;
@group(0) @binding(1) var<storage, read> xs: array<u32>;
@group(0) @binding(2) var<storage, read_write> ys: array<u32>;

fn value_at(k: u32, yword: u32) -> f32 {
    if (READ_Y) {
        var v = P.alpha * decode(yword, k, DT_Y);
        if (HAS_X) {
            v += P.beta * decode(xs[word_of(k, DT_X)], k, DT_X);
        }
        return v;
    }
    if (HAS_X) {
        return P.beta * decode(xs[word_of(k, DT_X)], k, DT_X);
    }
    return P.fill;
}

@compute @workgroup_size(256, 1, 1)
fn axpby_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = linear_workgroup(wid, nwg) * WG + li;
    if (t >= P.pairs) {
        return;
    }
    let k0 = 2u * t;
    if (DT_Y == DT_F32) {
        for (var h = 0u; h < 2u; h++) {
            let k = k0 + h;
            if (k < P.n) {
                ys[k] = bitcast<u32>(value_at(k, ys[k]));
            }
        }
        return;
    }
    let old = ys[t];
    var word = old;
    for (var h = 0u; h < 2u; h++) {
        let k = k0 + h;
        if (k < P.n) {
            word = put_half(word, k, encode16(value_at(k, old), DT_Y));
        }
    }
    ys[t] = word;
}
