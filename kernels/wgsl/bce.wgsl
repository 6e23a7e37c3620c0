// bce.wgsl — fused BCE-with-logits, forward + backward in one pass (src/ops/bce.rs). The CUDA
// twin is kernels/cuda/bce.cu: same work split, indexing and summation tree.
//
// Math, per element i < n (x logit, y target, w weight or 1, s = 1 or 1/n for Mean):
//   e = exp(−|x|);  log1p(e) = log(1+e)·e/((1+e)−1)  (e when 1+e rounds to 1; WGSL has no log1p)
//   ℓ_i = w·(max(x,0) − x·y + log1p(e));  g_i = w·(σ(x) − y)·s,  σ from the same e
//   L   = s·Σ ℓ_i
//
// partial_main: P = min(⌈⌈n/2⌉/256⌉, 256) workgroups × 256 threads; thread t owns element
//   pairs q = t, t + 256·P, … (for 16-bit dlogits, pair q is word q: one writer per word),
//   sums its ℓ in order, then a fixed workgroup-memory tree (halving strides); thread 0 writes
//   partial(workgroup). finish_main: one workgroup, thread t loads partial(t) (0 beyond P), the
//   same tree, thread 0 writes loss = s·Σ. No atomics: deterministic.
//
// Memory traffic: n·(s_x + s_y + s_w + s_g) bytes in one pass; memory bound.
//
// Variants (overrides): DT_X, DT_Y, DT_W, DT_G dtype codes (0 f32, 1 bf16, 2 f16); HAS_W; HAS_G.

override DT_X: u32 = 0u;
override DT_Y: u32 = 0u;
override DT_W: u32 = 0u;
override DT_G: u32 = 0u;
override HAS_W: bool = false;
override HAS_G: bool = false;

const WG: u32 = 256u;

struct BceParams {
    n: u32, nblocks: u32, scale: f32, _p0: u32,
}

@group(0) @binding(0) var<uniform> P: BceParams;
@group(0) @binding(1) var<storage, read> xs: array<u32>;
@group(0) @binding(2) var<storage, read> ys: array<u32>;
@group(0) @binding(3) var<storage, read> ws: array<u32>;
@group(0) @binding(4) var<storage, read_write> gs: array<u32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;

@group(0) @binding(1) var<storage, read> fin_partial: array<f32>;
@group(0) @binding(2) var<storage, read_write> fin_loss: array<f32>;

var<workgroup> red: array<f32, 256>;

fn block_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off >> 1u) {
        if (li < off) {
            red[li] = red[li] + red[li + off];
        }
        workgroupBarrier();
    }
    return red[0];
}

// (w·ℓ, w·(σ − y)·s) of element i.
fn bce_at(i: u32) -> vec2<f32> {
    let x = decode(xs[word_of(i, DT_X)], i, DT_X);
    let y = decode(ys[word_of(i, DT_Y)], i, DT_Y);
    var w = 1.0;
    if (HAS_W) {
        w = decode(ws[word_of(i, DT_W)], i, DT_W);
    }
    let e = exp(-abs(x));
    let u = 1.0 + e;
    var l1p = e;
    if (u != 1.0) {
        l1p = log(u) * (e / (u - 1.0));
    }
    let loss = max(x, 0.0) - x * y + l1p;
    let sg = select(e / u, 1.0 / u, x >= 0.0);
    return vec2<f32>(w * loss, w * (sg - y) * P.scale);
}

@compute @workgroup_size(256, 1, 1)
fn partial_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let pairs = (P.n + 1u) / 2u;
    let stride = P.nblocks * WG;
    var acc = 0.0;
    for (var q = wid.x * WG + li; q < pairs; q += stride) {
        let i0 = 2u * q;
        let both = i0 + 1u < P.n;
        let a = bce_at(i0);
        var b = vec2<f32>(0.0);
        acc += a.x;
        if (both) {
            b = bce_at(i0 + 1u);
            acc += b.x;
        }
        if (HAS_G) {
            if (DT_G == DT_F32) {
                gs[i0] = bitcast<u32>(a.y);
                if (both) {
                    gs[i0 + 1u] = bitcast<u32>(b.y);
                }
            } else {
                var word = put_half(gs[q], i0, encode16(a.y, DT_G));
                if (both) {
                    word = put_half(word, i0 + 1u, encode16(b.y, DT_G));
                }
                gs[q] = word;
            }
        }
    }
    let total = block_sum(li, acc);
    if (li == 0u) {
        partials[wid.x] = total;
    }
}

@compute @workgroup_size(256, 1, 1)
fn finish_main(@builtin(local_invocation_index) li: u32) {
    var v = 0.0;
    if (li < P.nblocks) {
        v = fin_partial[li];
    }
    let total = block_sum(li, v);
    if (li == 0u) {
        fin_loss[0] = total * P.scale;
    }
}
