//! Dtype conversion of checkpoint data into a parameter's storage dtype, on the host.
//!
//! Every conversion is one correctly rounded step, round to nearest, ties to even (IEEE 754's
//! default), overflow to ±∞, NaN kept NaN:
//! * same dtype: the bytes unchanged (bit-exact, NaN payloads included);
//! * F32, BF16, F16 → wider or equal: exact;
//! * F32 → BF16 / F16, BF16 ↔ F16 (widened to f32 exactly first): `half`'s
//!   round-to-nearest-even;
//! * F64 → F32: Rust's `as f32` (round to nearest even);
//! * F64 → BF16 / F16: rounded to f32 *to odd* first, then to nearest even. Going through a
//!   plain f32 rounding would round twice (a value just above a 16-bit tie would land on the
//!   tie, then round to even, downwards); rounding to odd keeps the sticky information, and
//!   with f32's 13+ extra bits the second rounding is then the correct single one.

use half::{bf16, f16};
use safetensors::Dtype;

use crate::dtype::DType;

/// The widest f32 not above |x| in magnitude, with its last bit set when x is not exactly an
/// f32 ("round to odd"): the sticky rounding that makes a following narrower rounding exact.
pub(crate) fn f64_to_f32_odd(x: f64) -> f32 {
    let r = x as f32;
    if x.is_nan() || f64::from(r) == x {
        return r;
    }
    // r is the nearest f32 (or ±∞ past the range); step to the one on x's side of zero…
    let bits = r.to_bits();
    let toward_zero = if f64::from(r).abs() > x.abs() {
        // |r| > |x| ≥ 0, so r is not zero: one ulp towards zero (∞ steps to the largest f32).
        bits - 1
    } else {
        bits
    };
    // …and set the last bit (the truncated value is inexact).
    f32::from_bits(toward_zero | 1)
}

pub(crate) fn f64_to_bf16(x: f64) -> bf16 {
    bf16::from_f32(f64_to_f32_odd(x))
}

pub(crate) fn f64_to_f16(x: f64) -> f16 {
    f16::from_f32(f64_to_f32_odd(x))
}

/// True for the file dtypes that convert to a parameter.
pub(crate) fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F64 | Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

/// The safetensors dtype a storage dtype is saved as.
pub(crate) fn file_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
    }
}

/// Widens float file data exactly to f64; `None` for a non-float dtype.
pub(crate) fn to_f64(src: Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    Some(match src {
        Dtype::F64 => bytemuck::pod_collect_to_vec(bytes),
        Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
        Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
        Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
        _ => return None,
    })
}

fn to_f32_exact(src: Dtype, bytes: &[u8]) -> Vec<f32> {
    match src {
        Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)
            .into_iter()
            .map(f32::from)
            .collect(),
        Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
            .into_iter()
            .map(f32::from)
            .collect(),
        _ => bytemuck::pod_collect_to_vec(bytes),
    }
}

/// File data of dtype `src` as little-endian bytes of `dst` (the rules in the module docs);
/// `None` when `src` is not a float dtype.
pub(crate) fn convert(src: Dtype, bytes: &[u8], dst: DType) -> Option<Vec<u8>> {
    if !is_float(src) {
        return None;
    }
    if src == file_dtype(dst) {
        return Some(bytes.to_vec());
    }
    let out = if src == Dtype::F64 {
        let v: Vec<f64> = bytemuck::pod_collect_to_vec(bytes);
        match dst {
            DType::F32 => {
                bytemuck::cast_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()).to_vec()
            }
            DType::BF16 => {
                bytemuck::cast_slice(&v.iter().map(|&x| f64_to_bf16(x)).collect::<Vec<_>>())
                    .to_vec()
            }
            DType::F16 => {
                bytemuck::cast_slice(&v.iter().map(|&x| f64_to_f16(x)).collect::<Vec<_>>()).to_vec()
            }
        }
    } else {
        let v = to_f32_exact(src, bytes);
        match dst {
            DType::F32 => bytemuck::cast_slice(&v).to_vec(),
            DType::BF16 => {
                bytemuck::cast_slice(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
                    .to_vec()
            }
            DType::F16 => {
                bytemuck::cast_slice(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>())
                    .to_vec()
            }
        }
    };
    Some(out)
}
