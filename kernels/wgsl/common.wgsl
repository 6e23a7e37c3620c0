// common.wgsl — helpers shared by every recfuse WGSL module. The Rust side prepends this file
// to each kernel file before creating the shader module (WGSL has no #include).
//
// Storage convention: every tensor is bound as `array<u32>`.
//   f32  : element e is word e (bitcast).
//   bf16 : element e is half (e & 1) of word e >> 1 (little-endian: even e = low 16 bits);
//          value = the high 16 bits of an f32.
//   f16  : same packing, IEEE binary16.
// 16-bit values are decoded and encoded with integer bit operations rather than
// unpack2x16float/pack2x16float: WGSL leaves their rounding, subnormal and overflow behaviour to
// the implementation, and we want the exact round-to-nearest-even results of the `half` crate
// that the CPU backend produces.

const DT_F32: u32 = 0u;
const DT_BF16: u32 = 1u;
const DT_F16: u32 = 2u;

const ACT_NONE: u32 = 0u;
const ACT_RELU: u32 = 1u;
const ACT_GELU: u32 = 2u;
const ACT_SIGMOID: u32 = 3u;

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// Round-to-nearest-even, NaN kept quiet: bit-identical to half::bf16::from_f32.
fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return ((b >> 16u) | 0x40u) & 0xffffu;
    }
    var h = b >> 16u;
    // Round up when the dropped half is > 1/2 ulp, or exactly 1/2 with an odd kept lsb.
    if ((b & 0x8000u) != 0u && (b & 0x17fffu) != 0u) {
        h = h + 1u;
    }
    return h & 0xffffu;
}

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let ex = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if (ex == 0u) {
        // Zero or subnormal: man · 2^-24 is exact in f32.
        let mag = f32(man) * 5.9604644775390625e-8;
        return bitcast<f32>(bitcast<u32>(mag) | sign);
    }
    if (ex == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (man << 13u));
    }
    return bitcast<f32>(sign | ((ex + 112u) << 23u) | (man << 13u));
}

// Round-to-nearest-even with overflow to ±inf and gradual underflow: bit-identical to
// half::f16::from_f32.
fn f32_to_f16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let ex = b & 0x7f800000u;
    let man = b & 0x007fffffu;
    if (ex == 0x7f800000u) {
        let nan_bit = select(0u, 0x200u, man != 0u);
        return sign | 0x7c00u | nan_bit | (man >> 13u);
    }
    let half_exp = i32(ex >> 23u) - 127 + 15;
    if (half_exp >= 31) {
        return sign | 0x7c00u;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return sign;
        }
        let m = man | 0x00800000u;
        let shift = u32(14 - half_exp);
        var hm = m >> shift;
        let round_bit = 1u << (shift - 1u);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            hm = hm + 1u;
        }
        return sign | hm;
    }
    let r = sign | (u32(half_exp) << 10u) | (man >> 13u);
    // A carry out of the mantissa correctly bumps the exponent (up to inf).
    if ((man & 0x1000u) != 0u && (man & 0x2fffu) != 0u) {
        return r + 1u;
    }
    return r;
}

// The word holding element e of a tensor of dtype dt.
fn word_of(e: u32, dt: u32) -> u32 {
    return select(e >> 1u, e, dt == DT_F32);
}

// NaN by its bits: WGSL lets comparisons and max/min treat NaN as any value.
fn is_nan_f32(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// Element e of dtype dt, given the word that holds it.
fn decode(w: u32, e: u32, dt: u32) -> f32 {
    if (dt == DT_F32) {
        return bitcast<f32>(w);
    }
    let h = (w >> ((e & 1u) * 16u)) & 0xffffu;
    if (dt == DT_BF16) {
        return bf16_to_f32(h);
    }
    return f16_to_f32(h);
}

// The 16 bits of x rounded to the 16-bit dtype dt.
fn encode16(x: f32, dt: u32) -> u32 {
    if (dt == DT_BF16) {
        return f32_to_bf16(x);
    }
    return f32_to_f16(x);
}

// Replaces half (e & 1) of word w with the 16-bit value h.
fn put_half(w: u32, e: u32, h: u32) -> u32 {
    let sh = (e & 1u) * 16u;
    return (w & ~(0xffffu << sh)) | (h << sh);
}

// erf in f32, max abs error 6e-8 on a dense grid (checked against f64 in the Rust tests of the
// CPU port `erf_wgsl_port`). |x| < 0.921875: x + x·P(x²); up to 4: 1 − exp(−(a + a·Q(a)));
// beyond: ±1 (erfc(4) ≈ 1.5e-8 is below half an f32 ulp of 1). Coefficients: least-squares fits
// on Chebyshev nodes in 40-digit arithmetic, weighted by the absolute error they cause in erf.
fn erf_f32(x: f32) -> f32 {
    let a = abs(x);
    if (a < 0.921875) {
        let s = x * x;
        var r = -0.0005830423324368894;
        r = fma(r, s, 0.0049553378485143185);
        r = fma(r, s, -0.02673408016562462);
        r = fma(r, s, 0.11280588060617447);
        r = fma(r, s, -0.3761230409145355);
        r = fma(r, s, 0.12837906181812286);
        return fma(r, x, x);
    }
    if (a >= 4.0) {
        return sign(x);
    }
    var q = 1.2231272194185294e-05;
    q = fma(q, a, -0.0003324876888655126);
    q = fma(q, a, 0.003680496709421277);
    q = fma(q, a, -0.0238396767526865);
    q = fma(q, a, 0.1063237115740776);
    q = fma(q, a, 0.635100781917572);
    q = fma(q, a, 0.12866047024726868);
    q = fma(q, a, a);
    let r = 1.0 - exp(-q);
    return select(r, -r, x < 0.0);
}

fn act_fwd(act: u32, z: f32) -> f32 {
    switch act {
        case 1u: {
            // NaN stays NaN (PyTorch's rule; `max` may drop it). A bit test, because WGSL lets
            // implementations assume NaN away in float comparisons.
            let is_nan = (bitcast<u32>(z) & 0x7fffffffu) > 0x7f800000u;
            return select(0.0, z, z > 0.0 || is_nan);
        }
        case 2u: {
            return 0.5 * z * (1.0 + erf_f32(z * 0.70710678118654752));
        }
        case 3u: {
            return 1.0 / (1.0 + exp(-z));
        }
        default: {
            return z;
        }
    }
}

// d act / dz at z.
fn act_grad(act: u32, z: f32) -> f32 {
    switch act {
        case 1u: {
            return select(0.0, 1.0, z > 0.0);
        }
        case 2u: {
            let cdf = 0.5 * (1.0 + erf_f32(z * 0.70710678118654752));
            let pdf = exp(-0.5 * z * z) * 0.3989422804014327;
            return cdf + z * pdf;
        }
        case 3u: {
            let s = 1.0 / (1.0 + exp(-z));
            return s * (1.0 - s);
        }
        default: {
            return 1.0;
        }
    }
}

// Linear workgroup index when a 1-D grid was split over (x, y, z) to respect
// maxComputeWorkgroupsPerDimension; (x, y, z) = (i, 0, 0) in the common case.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}
