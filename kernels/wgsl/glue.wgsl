// glue.wgsl — the glue kernels of src/ops/glue.rs (concat / split / slice / sum / broadcast).
// The CUDA twin is kernels/cuda/glue.cu: same grid, same indexing, same order of f32 additions.
//
// copy3_main — dst[o, a, c] = src[o, a, c] for o < outer, a < mid, c < inner; element
//   (o, a, c) is at off + o·s_outer + a·s_mid + c on each side. Bits are copied (no dtype
//   conversion). The host guarantees that the destination rows r = o·mid + a are disjoint and
//   increase in address and that every index fits 31 bits.
//   Geometry: 256 threads per workgroup, 1-D (folded over (x, y, z) by the host); thread t owns
//   row r = t / ppr, slot j = t mod ppr, ppr = ⌊inner/2⌋ + 1.
//   f32: slot j is the element pair c = 2j, 2j + 1 of the row (as in CUDA).
//   16-bit: slot j is the j-th u32 word the row touches; a row that starts at an odd element
//   shares its first word with the previous row when the two rows are adjacent — that word is
//   then written by the previous row's thread (which fills both halves), so every word has
//   exactly one writer and no thread read-modify-writes a word another thread writes.
//
// sum_mid_main — out[o, c] = Σ_{a = 0, 1, …} x[o, a, c] (contiguous x [outer, mid, inner],
//   out [outer, inner]) in f32 in increasing a, one rounding on the store. Thread t owns the
//   output pair k = 2t, 2t + 1 (one u32 word of a 16-bit out).
//
// Variants (overrides): copy3: WIDE (f32 elements); sum_mid: DT_X, DT_OUT dtype codes.

override WIDE: bool = true;
override DT_X: u32 = 0u;
override DT_OUT: u32 = 0u;

const WG: u32 = 256u;

struct Copy3Params {
    mid: u32, inner: u32, rows: u32, ppr: u32,
    s_off: u32, s_outer: u32, s_mid: u32, d_off: u32,
    d_outer: u32, d_mid: u32, _p0: u32, _p1: u32,
}

struct SumMidParams {
    mid: u32, inner: u32, n_out: u32, pairs: u32,
}

@group(0) @binding(0) var<uniform> C: Copy3Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

fn src_row(r: u32) -> u32 {
    return C.s_off + (r / C.mid) * C.s_outer + (r % C.mid) * C.s_mid;
}

fn dst_row(r: u32) -> u32 {
    return C.d_off + (r / C.mid) * C.d_outer + (r % C.mid) * C.d_mid;
}

fn src_half(e: u32) -> u32 {
    return (src[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu;
}

@compute @workgroup_size(256, 1, 1)
fn copy3_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = linear_workgroup(wid, nwg) * WG + li;
    if (t >= C.rows * C.ppr) {
        return;
    }
    let r = t / C.ppr;
    let j = t % C.ppr;
    let s0 = src_row(r);
    let d0 = dst_row(r);
    if (WIDE) {
        for (var h = 0u; h < 2u; h++) {
            let c = 2u * j + h;
            if (c < C.inner) {
                dst[d0 + c] = src[s0 + c];
            }
        }
        return;
    }
    let w = (d0 >> 1u) + j;
    let d_end = d0 + C.inner;
    if (2u * w >= d_end) {
        return;
    }
    // The first word, shared with an adjacent previous row, belongs to that row's thread.
    if (j == 0u && (d0 & 1u) == 1u && r > 0u && dst_row(r - 1u) + C.inner == d0) {
        return;
    }
    let old = dst[w];
    var word = old;
    for (var h = 0u; h < 2u; h++) {
        let e = 2u * w + h;
        if (e >= d0 && e < d_end) {
            word = put_half(word, e, src_half(s0 + (e - d0)));
        } else if (e == d_end && r + 1u < C.rows && dst_row(r + 1u) == d_end) {
            word = put_half(word, e, src_half(src_row(r + 1u)));
        }
    }
    if (word != old) {
        dst[w] = word;
    }
}

@group(0) @binding(0) var<uniform> S: SumMidParams;
@group(0) @binding(1) var<storage, read> sx: array<u32>;
@group(0) @binding(2) var<storage, read_write> sout: array<u32>;

fn sum_at(k: u32) -> f32 {
    let o = k / S.inner;
    let c = k % S.inner;
    var i = o * S.mid * S.inner + c;
    var s = 0.0;
    for (var a = 0u; a < S.mid; a++) {
        s += decode(sx[word_of(i, DT_X)], i, DT_X);
        i += S.inner;
    }
    return s;
}

@compute @workgroup_size(256, 1, 1)
fn sum_mid_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = linear_workgroup(wid, nwg) * WG + li;
    if (t >= S.pairs) {
        return;
    }
    let k0 = 2u * t;
    if (DT_OUT == DT_F32) {
        for (var h = 0u; h < 2u; h++) {
            let k = k0 + h;
            if (k < S.n_out) {
                sout[k] = bitcast<u32>(sum_at(k));
            }
        }
        return;
    }
    var word = sout[t];
    for (var h = 0u; h < 2u; h++) {
        let k = k0 + h;
        if (k < S.n_out) {
            word = put_half(word, k, encode16(sum_at(k), DT_OUT));
        }
    }
    sout[t] = word;
}
