//! CPU in-place element-wise update (`ops::inplace`): widen, apply `Axpby` per element in
//! parallel, round once on the store.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::inplace::Axpby;
use crate::tensor::{CpuStorage, Tensor};

pub(crate) fn axpby(x: Option<&Tensor>, k: &Axpby, y: &mut Tensor) -> Result<()> {
    const OP: &str = "axpby(cpu)";
    let xv = match x {
        Some(t) => Some(
            t.cpu()
                .ok_or_else(|| Error::invalid(OP, "x", "not on the cpu"))?
                .to_f32(),
        ),
        None => None,
    };
    let dtype = y.dtype();
    let ys = y
        .cpu_mut()
        .ok_or_else(|| Error::invalid(OP, "self", "not on the cpu"))?;
    let mut v = if k.read_y {
        ys.to_f32()
    } else {
        vec![0.0; ys.len()]
    };
    v.par_iter_mut()
        .with_min_len(4096)
        .enumerate()
        .for_each(|(i, yv)| *yv = k.apply(*yv, xv.as_ref().map(|x| x[i])));
    *ys = CpuStorage::from_f32(dtype, &v);
    Ok(())
}
