// embedding.wgsl — the embedding bags of src/ops/embedding.rs. The CUDA twin is
// kernels/cuda/embedding.cu: the same data layout (meta words, batch words, flat tables with
// word-aligned rows), the same grids, the same per-thread work and the same order of f32
// additions; its header has the math and the cost model.
//
// emb_fwd_main — thread q owns output elements 2q, 2q + 1 of out [B, total_dim]: for a 16-bit
//   out exactly the u32 word q (one writer per word). 256 threads per workgroup, the grid
//   folded over (x, y, z) by the host.
// emb_grad_main / emb_update_main — one workgroup of 64 per touched row (segment); lane l owns
//   the row's column pairs m = l, l + 64, …: for a 16-bit table the word (base / 2 + m), which
//   belongs to this row only (rows start on words). Row-wise Adagrad's Σ g² is reduced with
//   the fixed workgroup-memory tree of the CUDA kernel.
//
// Variants (overrides): DT_W (table/out dtype), DT_DY (dy dtype): 0 f32, 1 bf16, 2 f16.

override DT_W: u32 = 0u;
override DT_DY: u32 = 0u;

const FWD_WG: u32 = 256u;
const LANES: u32 = 64u;

struct FwdParams {
    b: u32, n_tables: u32, total_dim: u32, n_out: u32,
    col_at: u32, bag_at: u32, idx_at: u32, wgt_at: u32,
}

@group(0) @binding(0) var<uniform> F: FwdParams;
@group(0) @binding(1) var<storage, read> f_meta: array<u32>;
@group(0) @binding(2) var<storage, read> f_batch: array<u32>;
@group(0) @binding(3) var<storage, read> f_w: array<u32>;
@group(0) @binding(4) var<storage, read_write> f_out: array<u32>;

fn pool(k: u32) -> f32 {
    let s = k / F.total_dim;
    let col = k % F.total_dim;
    let t = f_meta[F.col_at + col];
    let elem_off = f_meta[6u * t];
    let pitch = f_meta[6u * t + 1u];
    let c = col - f_meta[6u * t + 2u];
    let bag = t * F.b + s;
    let lo = f_batch[F.bag_at + bag];
    let hi = f_batch[F.bag_at + bag + 1u];
    var acc = 0.0;
    for (var j = lo; j < hi; j++) {
        let wj = bitcast<f32>(f_batch[F.wgt_at + j]);
        let e = elem_off + f_batch[F.idx_at + j] * pitch + c;
        acc += wj * decode(f_w[word_of(e, DT_W)], e, DT_W);
    }
    return acc;
}

@compute @workgroup_size(256, 1, 1)
fn emb_fwd_main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let q = linear_workgroup(wid, nwg) * FWD_WG + li;
    let k0 = 2u * q;
    if (k0 >= F.n_out) {
        return;
    }
    if (DT_W == DT_F32) {
        for (var h = 0u; h < 2u; h++) {
            let k = k0 + h;
            if (k < F.n_out) {
                f_out[k] = bitcast<u32>(pool(k));
            }
        }
        return;
    }
    var word = f_out[q];
    for (var h = 0u; h < 2u; h++) {
        let k = k0 + h;
        if (k < F.n_out) {
            word = put_half(word, k, encode16(pool(k), DT_W));
        }
    }
    f_out[q] = word;
}

struct RowParams {
    total_dim: u32, segments: u32, seg_table_at: u32, seg_row_at: u32,
    seg_off_at: u32, occ_bag_at: u32, occ_wgt_at: u32, mode: u32,
    decay: u32, lr: f32, eps: f32, wd: f32,
}

@group(0) @binding(0) var<uniform> R: RowParams;
@group(0) @binding(1) var<storage, read> r_meta: array<u32>;
@group(0) @binding(2) var<storage, read> r_batch: array<u32>;
@group(0) @binding(3) var<storage, read> r_dy: array<u32>;
@group(0) @binding(4) var<storage, read_write> r_w: array<u32>;
@group(0) @binding(5) var<storage, read_write> r_state: array<f32>;

var<workgroup> part: array<f32, 64>;
var<workgroup> mult_s: f32;

struct Row {
    base: u32, col_off: u32, dim: u32, state_row: u32, lo: u32, hi: u32,
}

fn row_of(u: u32) -> Row {
    let t = r_batch[R.seg_table_at + u];
    let row = r_batch[R.seg_row_at + u];
    var r: Row;
    r.base = r_meta[6u * t] + row * r_meta[6u * t + 1u];
    r.col_off = r_meta[6u * t + 2u];
    r.dim = r_meta[6u * t + 3u];
    r.state_row = r_meta[6u * t + 4u] + row;
    r.lo = r_batch[R.seg_off_at + u];
    r.hi = r_batch[R.seg_off_at + u + 1u];
    return r;
}

fn row_grad(r: Row, c: u32) -> f32 {
    var g = 0.0;
    for (var k = r.lo; k < r.hi; k++) {
        let wk = bitcast<f32>(r_batch[R.occ_wgt_at + k]);
        let i = r_batch[R.occ_bag_at + k] * R.total_dim + r.col_off + c;
        g += wk * decode(r_dy[word_of(i, DT_DY)], i, DT_DY);
    }
    return g;
}

@compute @workgroup_size(64, 1, 1)
fn emb_grad_main(
    @builtin(local_invocation_index) lane: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let u = linear_workgroup(wid, nwg);
    if (u >= R.segments) {
        return;
    }
    let r = row_of(u);
    for (var m = lane; 2u * m < r.dim; m += LANES) {
        for (var h = 0u; h < 2u; h++) {
            let c = 2u * m + h;
            if (c < r.dim) {
                r_w[r.base + c] = bitcast<u32>(row_grad(r, c));
            }
        }
    }
}

// Element c of the row (the word w holding it already read for 16-bit tables).
fn w_elem(r: Row, c: u32, w: u32) -> f32 {
    if (DT_W == DT_F32) {
        return bitcast<f32>(r_w[r.base + c]);
    }
    return decode(w, r.base + c, DT_W);
}

// g' of column c: the gradient plus the optional L2 decay of the old weight.
fn decayed(r: Row, c: u32, wv: f32) -> f32 {
    var g = row_grad(r, c);
    if (R.decay != 0u) {
        g += R.wd * wv;
    }
    return g;
}

@compute @workgroup_size(64, 1, 1)
fn emb_update_main(
    @builtin(local_invocation_index) lane: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let u = linear_workgroup(wid, nwg);
    if (u >= R.segments) {
        return;
    }
    let r = row_of(u);
    var mult = R.lr;
    if (R.mode == 1u) {
        var sq = 0.0;
        for (var m = lane; 2u * m < r.dim; m += LANES) {
            var word = 0u;
            if (DT_W != DT_F32) {
                word = r_w[(r.base >> 1u) + m];
            }
            for (var h = 0u; h < 2u; h++) {
                let c = 2u * m + h;
                if (c < r.dim) {
                    let g = decayed(r, c, w_elem(r, c, word));
                    sq += g * g;
                }
            }
        }
        part[lane] = sq;
        workgroupBarrier();
        for (var off = LANES / 2u; off > 0u; off >>= 1u) {
            if (lane < off) {
                part[lane] += part[lane + off];
            }
            workgroupBarrier();
        }
        if (lane == 0u) {
            let st = r_state[r.state_row] + part[0] / f32(r.dim);
            r_state[r.state_row] = st;
            mult_s = R.lr / (sqrt(st) + R.eps);
        }
        workgroupBarrier();
        mult = mult_s;
    }
    for (var m = lane; 2u * m < r.dim; m += LANES) {
        if (DT_W == DT_F32) {
            for (var h = 0u; h < 2u; h++) {
                let c = 2u * m + h;
                if (c < r.dim) {
                    let wv = bitcast<f32>(r_w[r.base + c]);
                    r_w[r.base + c] = bitcast<u32>(wv - mult * decayed(r, c, wv));
                }
            }
        } else {
            let wi = (r.base >> 1u) + m;
            var word = r_w[wi];
            let old = word;
            for (var h = 0u; h < 2u; h++) {
                let c = 2u * m + h;
                if (c < r.dim) {
                    let wv = decode(old, r.base + c, DT_W);
                    word = put_half(word, r.base + c, encode16(wv - mult * decayed(r, c, wv), DT_W));
                }
            }
            r_w[wi] = word;
        }
    }
}
