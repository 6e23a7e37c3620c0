//! CPU fused BCE-with-logits (`ops::bce`): per-element f32 math shared with the GPU kernels
//! (`bce_elem`), the loss summed in f64 in index order (deterministic).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::bce::{bce_elem, BceArgs};
use crate::tensor::{CpuStorage, Tensor};

pub(crate) fn bce(a: &BceArgs<'_>, dlogits: Option<&mut Tensor>, loss: &mut Tensor) -> Result<()> {
    const OP: &str = "bce_with_logits(cpu)";
    let host = |arg: &'static str, t: &Tensor| {
        t.cpu()
            .map(|s| s.to_f32())
            .ok_or_else(|| Error::invalid(OP, arg, "not on the cpu"))
    };
    let x = host("logits", a.logits)?;
    let y = host("targets", a.targets)?;
    let w = match a.weight {
        Some(t) => Some(host("weight", t)?),
        None => None,
    };
    let per: Vec<(f32, f32)> = (0..x.len())
        .into_par_iter()
        .with_min_len(4096)
        .map(|i| {
            let (l, g) = bce_elem(x[i], y[i]);
            let wi = w.as_ref().map_or(1.0, |w| w[i]);
            (wi * l, wi * g * a.scale)
        })
        .collect();
    let total: f64 = per.iter().map(|&(l, _)| f64::from(l)).sum();
    let out = loss
        .cpu_mut()
        .ok_or_else(|| Error::invalid(OP, "loss", "not on the cpu"))?;
    *out = CpuStorage::F32(vec![(total * f64::from(a.scale)) as f32]);
    if let Some(g) = dlogits {
        let dt = g.dtype();
        let gs = g
            .cpu_mut()
            .ok_or_else(|| Error::invalid(OP, "dlogits", "not on the cpu"))?;
        let gv: Vec<f32> = per.iter().map(|&(_, g)| g).collect();
        *gs = CpuStorage::from_f32(dt, &gv);
    }
    Ok(())
}
