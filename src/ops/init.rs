//! Seeded initialisers shared by the layers: the same seed gives the same weights on every
//! platform and backend (the values are drawn on the host, then uploaded once).

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// SplitMix64: a tiny, well-mixed generator, so initial weights need no dependency in the
/// library and never change with a dependency's version.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    /// A uniform draw in [0, 1) with 53 random bits.
    pub(crate) fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `U(−bound, bound)` tensors.
pub(crate) struct Uniform {
    rng: SplitMix,
    bound: f64,
}

impl Uniform {
    pub(crate) fn new(seed: u64, bound: f32) -> Uniform {
        Uniform {
            rng: SplitMix(seed ^ 0xbb67_ae85_84ca_a73b),
            bound: f64::from(bound),
        }
    }

    pub(crate) fn tensor(
        &mut self,
        op: &'static str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid(op, "shape", format!("{shape:?} overflows usize")))?;
        let mut host = Vec::new();
        host.try_reserve_exact(n).map_err(|_| {
            Error::invalid(op, "shape", format!("cannot allocate {n} host elements"))
        })?;
        host.extend((0..n).map(|_| ((self.rng.unit() * 2.0 - 1.0) * self.bound) as f32));
        Tensor::from_f32(&host, shape, dtype, device)
    }
}
