// gemm.wgsl — the GEMM core: one strided, batched matrix product with a fused epilogue.
//
// What it computes (src/ops/gemm.rs is the authority; the CPU backend computes the same):
//   for g < batch, i < m, j < n:
//     acc = Σ_k A(g,i,k)·B(g,k,j)        f32 accumulation, k in increasing order per element
//     z   = alpha·acc + bias[bias_off + g·bias_bs + j]   [HAS_BIAS]
//     pre(g,i,j) = z                      [HAS_PRE]
//   plain (GATED = false), for j < n:
//     y   = act(z(j))·mul(g,i,j) + residual(g,i,j) + C_old(g,i,j)
//                                                 [HAS_MUL] [HAS_RES] [ACCUMULATE]
//   gated (GATED = true, the GDCN pair epilogue; ACT = none, n even), for j < n/2:
//     y   = mul(g,i,j)·z(2j)·σ(z(2j+1)) + residual(g,i,j) + C_old(g,i,j)
//     (columns 2j, 2j+1 are the interleaved (cross, gate) pair; only n/2 outputs exist)
//     C(g,i,j) = y
//   Order of the f32 operations, as on the CPU: y = f(z); y = y·mul; y = y + residual;
//   y = y + C_old.
// X(g,i,j) lives at element off + g·bs + i·rs + j·cs of its buffer (a `MatView`); all offsets
// and strides are u32 in the uniform `P` (the host rejects anything larger, and every in-bounds
// index is < 2^31). Strides let one kernel serve x·Wᵀ, dZ·W and dZᵀ·X with no transposes.
// C, mul and residual share C's view (c_*, n/2 columns when gated); pre has its own (n columns).
//
// Outputs are always written as f32 words, C at the "out" view (o_*) and pre at the "pre out"
// view (q_*): for an f32 C (or pre) that is its own view in its own buffer; for a 16-bit C or
// pre the host binds an f32 scratch buffer with a compact [batch, m, n_out] view instead
// (n_out = n/2 for a gated C, else n) and a second pass (elementwise.wgsl: pack_main) rounds
// it into the 16-bit tensor one whole u32 word per thread (two threads must never
// read-modify-write the same word), adding C_old there when accumulating. ACCUMULATE is
// therefore only ever set here for an f32 C read in place.
//
// Launch geometry (mirrored by kernels/cuda/gemm.cu):
//   workgroup = WG_X × WG_Y = 16 × 16 = 256 threads; it owns a BM × BN = 64 × 64 tile of C;
//   thread (tx, ty) = local_invocation_id.xy owns rows ty·4 .. ty·4+3 and cols tx·4 .. tx·4+3
//   of the tile (a 4 × 4 micro-tile, four vec4 accumulators). The column block starts at a
//   multiple of 4, so with GATED a thread holds whole (cross, gate) pairs: columns (0,1) and
//   (2,3) of its micro-tile, i.e. outputs tx·2 and tx·2+1 of the tile's 32 gated outputs.
//   grid = (tiles_n, tiles_m, batch) = (⌈n/64⌉, ⌈m/64⌉, batch), i.e. workgroup_id.z = g; when a
//   dimension exceeds maxComputeWorkgroupsPerDimension the host folds the same linear order
//   (x fastest) into a bigger grid and the surplus workgroups return at once.
//   k loop: BK = 16 per step. Each step stages the 64 × 16 A tile and the 16 × 64 B tile in
//   workgroup memory, transposed to k-major (As[k][m], Bs[k][n]) so the inner product reads
//   four consecutive floats per operand; rows are padded by 4 floats (keeps the 16-byte
//   alignment CUDA's float4 reads want, and moves the transposed stores off one bank).
//   Global → workgroup loads give consecutive threads consecutive addresses along whichever of
//   the operand's two axes has stride 1 (k for x·Wᵀ's A, m for dZᵀ's A, ...): a uniform branch.
//   Edges (m, n, k not multiples of the tile) are zero-filled on load and masked on store.
//
// Variants (pipeline-overridable constants, one pipeline each, cached by the host):
//   DT_A, DT_B, DT_BIAS, DT_RES, DT_MUL  storage dtype codes (0 f32, 1 bf16, 2 f16) of inputs
//   ACT                          0 none, 1 relu, 2 gelu (erf form), 3 sigmoid
//   HAS_BIAS, HAS_RES, HAS_MUL, HAS_PRE, ACCUMULATE, GATED
//   WG_X, WG_Y, BK               tile geometry (BM = 4·WG_Y, BN = 4·WG_X); the host always
//                                passes 16, 16, 16 and checks the derived workgroup size and
//                                memory against the device limits before dispatching.
//
// Memory traffic, per batch entry (s = bytes per element):
//   minimum:  (m·k + k·n + m·n_out)·s, plus m·n_out·s more for each of residual, mul and an
//   accumulated C, and m·n·s for pre;
//   this kernel: every workgroup reads its 64-row strip of A and 64-col strip of B once, so
//   global reads are m·n·k·(1/64 + 1/64)·s = m·n·k·s/32 (a naive kernel reads 2·m·n·k·s).
//   FLOPs 2·m·n·k; per k step a workgroup does 2·64·64·16 = 131072 FLOPs on 2·64·16 = 2048
//   staged elements (64 FLOPs per element loaded); per thread per k: 8 workgroup-memory reads
//   feed 16 FMAs. Workgroup memory: 2·16·(64+4)·4 B = 8704 B.

override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
override BK: u32 = 16u;
override BM: u32 = WG_Y * 4u;
override BN: u32 = WG_X * 4u;
override AS_LEN: u32 = BK * (BM + 4u);
override BS_LEN: u32 = BK * (BN + 4u);

override DT_A: u32 = 0u;
override DT_B: u32 = 0u;
override DT_BIAS: u32 = 0u;
override DT_RES: u32 = 0u;
override ACT: u32 = 0u;
override HAS_BIAS: bool = false;
override HAS_RES: bool = false;
override DT_MUL: u32 = 0u;
override HAS_MUL: bool = false;
override HAS_PRE: bool = false;
override ACCUMULATE: bool = false;
override GATED: bool = false;

const PAD: u32 = 4u;

struct GemmParams {
    m: u32, n: u32, k: u32, batch: u32,
    a_off: u32, a_rs: u32, a_cs: u32, a_bs: u32,
    b_off: u32, b_rs: u32, b_cs: u32, b_bs: u32,
    // C's own view: residual and mul reads.
    c_off: u32, c_rs: u32, c_cs: u32, c_bs: u32,
    // Where C is written (C's view, or compact [batch, m, n_out] scratch).
    o_off: u32, o_rs: u32, o_cs: u32, o_bs: u32,
    // Where pre is written (pre's view, or compact [batch, m, n] scratch).
    q_off: u32, q_rs: u32, q_cs: u32, q_bs: u32,
    bias_bs: u32, alpha_bits: u32, tiles_n: u32, tiles_m: u32,
    // First bias element (a run of weight sets that starts past set 0).
    bias_off: u32,
}

@group(0) @binding(0) var<uniform> P: GemmParams;
@group(0) @binding(1) var<storage, read> a_buf: array<u32>;
@group(0) @binding(2) var<storage, read> b_buf: array<u32>;
@group(0) @binding(3) var<storage, read> bias_buf: array<u32>;
@group(0) @binding(4) var<storage, read> res_buf: array<u32>;
@group(0) @binding(5) var<storage, read> mul_buf: array<u32>;
@group(0) @binding(6) var<storage, read_write> c_out: array<u32>;
@group(0) @binding(7) var<storage, read_write> pre_out: array<u32>;

var<workgroup> As: array<f32, AS_LEN>;
var<workgroup> Bs: array<f32, BS_LEN>;

fn load_a(e: u32) -> f32 {
    return decode(a_buf[word_of(e, DT_A)], e, DT_A);
}

fn load_b(e: u32) -> f32 {
    return decode(b_buf[word_of(e, DT_B)], e, DT_B);
}

fn load_bias(e: u32) -> f32 {
    return decode(bias_buf[word_of(e, DT_BIAS)], e, DT_BIAS);
}

fn load_res(e: u32) -> f32 {
    return decode(res_buf[word_of(e, DT_RES)], e, DT_RES);
}

fn load_mul(e: u32) -> f32 {
    return decode(mul_buf[word_of(e, DT_MUL)], e, DT_MUL);
}

// z = alpha·acc + bias of GEMM column gn, written to pre when requested.
fn pre_activation(acc: f32, alpha: f32, g: u32, gm: u32, gn: u32) -> f32 {
    var z = alpha * acc;
    if (HAS_BIAS) {
        z += load_bias(P.bias_off + g * P.bias_bs + gn);
    }
    if (HAS_PRE) {
        pre_out[P.q_off + g * P.q_bs + gm * P.q_rs + gn * P.q_cs] = bitcast<u32>(z);
    }
    return z;
}

// The shared tail: y·mul + residual + C_old, stored to output column j.
fn finish(y0: f32, g: u32, gm: u32, j: u32) {
    var y = y0;
    let ci = P.c_off + g * P.c_bs + gm * P.c_rs + j * P.c_cs;
    if (HAS_MUL) {
        y *= load_mul(ci);
    }
    if (HAS_RES) {
        y += load_res(ci);
    }
    let oi = P.o_off + g * P.o_bs + gm * P.o_rs + j * P.o_cs;
    if (ACCUMULATE) {
        y += bitcast<f32>(c_out[oi]);
    }
    c_out[oi] = bitcast<u32>(y);
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn gemm_main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lin = linear_workgroup(wid, nwg);
    let tile_n = lin % P.tiles_n;
    let rest = lin / P.tiles_n;
    let tile_m = rest % P.tiles_m;
    let g = rest / P.tiles_m;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    if (g >= P.batch) {
        return;
    }
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * WG_X + tx;
    let nt = WG_X * WG_Y;
    let row0 = tile_m * BM;
    let col0 = tile_n * BN;
    let a_base = P.a_off + g * P.a_bs;
    let b_base = P.b_off + g * P.b_bs;
    let a_kfast = P.a_cs == 1u;
    let b_kfast = P.b_rs == 1u;

    // Function-scope variables start zeroed.
    var acc: array<vec4<f32>, 4>;

    for (var k0 = 0u; k0 < P.k; k0 += BK) {
        for (var e = tid; e < BM * BK; e += nt) {
            var mm: u32;
            var kk: u32;
            if (a_kfast) {
                kk = e % BK;
                mm = e / BK;
            } else {
                mm = e % BM;
                kk = e / BM;
            }
            let gm = row0 + mm;
            let gk = k0 + kk;
            var v = 0.0;
            if (gm < P.m && gk < P.k) {
                v = load_a(a_base + gm * P.a_rs + gk * P.a_cs);
            }
            As[kk * (BM + PAD) + mm] = v;
        }
        for (var e = tid; e < BN * BK; e += nt) {
            var nn: u32;
            var kk: u32;
            if (b_kfast) {
                kk = e % BK;
                nn = e / BK;
            } else {
                nn = e % BN;
                kk = e / BN;
            }
            let gn = col0 + nn;
            let gk = k0 + kk;
            var v = 0.0;
            if (gn < P.n && gk < P.k) {
                v = load_b(b_base + gk * P.b_rs + gn * P.b_cs);
            }
            Bs[kk * (BN + PAD) + nn] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let ao = kk * (BM + PAD) + ty * 4u;
            let bo = kk * (BN + PAD) + tx * 4u;
            let bv = vec4<f32>(Bs[bo], Bs[bo + 1u], Bs[bo + 2u], Bs[bo + 3u]);
            acc[0] = fma(vec4<f32>(As[ao]), bv, acc[0]);
            acc[1] = fma(vec4<f32>(As[ao + 1u]), bv, acc[1]);
            acc[2] = fma(vec4<f32>(As[ao + 2u]), bv, acc[2]);
            acc[3] = fma(vec4<f32>(As[ao + 3u]), bv, acc[3]);
        }
        workgroupBarrier();
    }

    let alpha = bitcast<f32>(P.alpha_bits);
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + ty * 4u + i;
        if (gm >= P.m) {
            break;
        }
        if (GATED) {
            // Pairs (0, 1) and (2, 3) of the micro-tile; n is even, so gn < n implies gn+1 < n.
            for (var j = 0u; j < 4u; j += 2u) {
                let gn = col0 + tx * 4u + j;
                if (gn >= P.n) {
                    break;
                }
                let zc = pre_activation(acc[i][j], alpha, g, gm, gn);
                let zg = pre_activation(acc[i][j + 1u], alpha, g, gm, gn + 1u);
                finish(zc * act_fwd(ACT_SIGMOID, zg), g, gm, gn / 2u);
            }
        } else {
            for (var j = 0u; j < 4u; j++) {
                let gn = col0 + tx * 4u + j;
                if (gn >= P.n) {
                    break;
                }
                let z = pre_activation(acc[i][j], alpha, g, gm, gn);
                finish(act_fwd(ACT, z), g, gm, gn);
            }
        }
    }
}
