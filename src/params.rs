//! Parameters: one trait every layer's tensors implement, so a trainer can hand a whole model
//! to an optimizer, a checkpoint or another device without listing tensors by hand.
//!
//! Names are PyTorch `state_dict` keys where a PyTorch layer exists (`nn.Linear`'s
//! `weight`/`bias`, the official GDCN layer's `w.{i}.weight`, `wg.{i}.weight`, `b.{i}`,
//! TorchRec's `kernels.{i}`/`bias.{i}` for DCN-V2), and recfuse's field names elsewhere. A
//! composite model prefixes its parts' names with [`prefixed`].
//!
//! ```
//! use recfuse::params::Parameters;
//! use recfuse::ops::linear::LinearParams;
//! use recfuse::{Device, DType};
//! let dev = Device::cpu();
//! let head = LinearParams::init(16, 1, true, DType::F32, 7, &dev)?;
//! let names: Vec<String> = head.named_tensors().into_iter().map(|(n, _)| n).collect();
//! assert_eq!(names, ["weight", "bias"]);
//! assert_eq!(head.num_elements(), 17);
//! // Optimizer state shaped like the parameters, in f32, on the same device.
//! let m = head.zeros_like(Some(DType::F32))?;
//! assert!(m.named_tensors().iter().all(|(_, t)| t.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0)));
//! # Ok::<(), recfuse::Error>(())
//! ```

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::gated_cross::{BranchWeight, CrossLayerWeights, PackedCross, PackedCrossLayer};
use crate::ops::hiformer::{LayerParams, QkvParams};
use crate::ops::lowrank_qkv::QkvWeights;
use crate::tensor::Tensor;

/// A set of named tensors: a layer's parameters, its gradients (same type, same names) or an
/// optimizer's state.
///
/// The order of [`named_tensors`](Self::named_tensors) and
/// [`named_tensors_mut`](Self::named_tensors_mut) is the same and fixed, so two values of one
/// type (parameters and their gradients) can be zipped by position; the names let a
/// checkpoint or an optimizer check that they line up.
pub trait Parameters {
    /// Every tensor with its name.
    fn named_tensors(&self) -> Vec<(String, &Tensor)>;

    /// Every tensor with its name, mutably (same order as `named_tensors`).
    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)>;

    /// A value of the same structure whose tensors are `f(name, tensor)`.
    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self>
    where
        Self: Sized;

    /// A copy on `device` (one explicit transfer per tensor).
    fn to_device(&self, device: &Device) -> Result<Self>
    where
        Self: Sized,
    {
        self.try_map(&mut |_, t| t.to_device(device))
    }

    /// A deep copy on the same device (device-side copies on the GPUs).
    fn try_clone(&self) -> Result<Self>
    where
        Self: Sized,
    {
        self.try_map(&mut |_, t| t.try_clone())
    }

    /// Zeros shaped like every tensor, in `dtype` (or each tensor's own dtype), on the same
    /// device: gradients, or optimizer state (`Some(DType::F32)`).
    fn zeros_like(&self, dtype: Option<DType>) -> Result<Self>
    where
        Self: Sized,
    {
        self.try_map(&mut |_, t| Tensor::zeros(t.shape(), dtype.unwrap_or(t.dtype()), &t.device()))
    }

    /// The total number of elements.
    fn num_elements(&self) -> usize {
        self.named_tensors().iter().map(|(_, t)| t.numel()).sum()
    }

    /// The tensor called `name`, if there is one.
    fn get(&self, name: &str) -> Option<&Tensor> {
        self.named_tensors()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }
}

/// `prefix.name` for every name (`name` alone when the prefix is empty): how a model made of
/// parts names its tensors, as PyTorch does for submodules.
pub fn prefixed<T>(prefix: &str, named: Vec<(String, T)>) -> Vec<(String, T)> {
    if prefix.is_empty() {
        return named;
    }
    named
        .into_iter()
        .map(|(n, t)| (format!("{prefix}.{n}"), t))
        .collect()
}

/// Checks that two parameter sets have the same names, shapes and devices in the same order,
/// naming the first difference: what an optimizer needs of parameters, gradients and state.
pub(crate) fn check_aligned(
    op: &'static str,
    arg: &'static str,
    want: &[(String, &Tensor)],
    got: &[(String, &Tensor)],
) -> Result<()> {
    if want.len() != got.len() {
        return Err(Error::invalid(
            op,
            arg,
            format!("{} tensors, expected {}", got.len(), want.len()),
        ));
    }
    for ((wn, wt), (gn, gt)) in want.iter().zip(got) {
        if wn != gn {
            return Err(Error::invalid(
                op,
                arg,
                format!("tensor `{gn}` where `{wn}` was expected"),
            ));
        }
        if wt.shape() != gt.shape() {
            return Err(Error::shape(
                op,
                arg,
                format!("{wn}: {:?}", wt.shape()),
                gt.shape(),
            ));
        }
        crate::ops::backend::same_device(op, arg, &wt.device(), gt)?;
    }
    Ok(())
}

/// A plain list of named tensors: what [`crate::checkpoint::Checkpoint::tensors`] returns, and
/// the simplest way to group ad-hoc parameters.
impl Parameters for Vec<(String, Tensor)> {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        self.iter().map(|(n, t)| (n.clone(), t)).collect()
    }
    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        self.iter_mut().map(|(n, t)| (n.clone(), t)).collect()
    }
    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        self.iter()
            .map(|(n, t)| Ok((n.clone(), f(n, t)?)))
            .collect()
    }
}

/// The names of one cross branch's weight: `{base}.weight` (full rank) or `{base}.u`,
/// `{base}.v` (`W ≈ U·V`); TorchRec's DCN-V2 names when ungated.
fn branch_names(gated: bool, branch: &str, i: usize, w: &BranchWeight) -> Vec<String> {
    match (gated, w) {
        (true, BranchWeight::Full(_)) => vec![format!("{branch}.{i}.weight")],
        (true, BranchWeight::LowRank { .. }) => {
            vec![format!("{branch}.{i}.u"), format!("{branch}.{i}.v")]
        }
        (false, BranchWeight::Full(_)) => vec![format!("kernels.{i}")],
        (false, BranchWeight::LowRank { .. }) => {
            vec![format!("W_kernels.{i}"), format!("V_kernels.{i}")]
        }
    }
}

fn branch_tensors(w: &BranchWeight) -> Vec<&Tensor> {
    match w {
        BranchWeight::Full(t) => vec![t],
        BranchWeight::LowRank { u, v } => vec![u, v],
    }
}

fn branch_tensors_mut(w: &mut BranchWeight) -> Vec<&mut Tensor> {
    match w {
        BranchWeight::Full(t) => vec![t],
        BranchWeight::LowRank { u, v } => vec![u, v],
    }
}

fn branch_map(
    names: &[String],
    w: &BranchWeight,
    f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>,
) -> Result<BranchWeight> {
    Ok(match w {
        BranchWeight::Full(t) => BranchWeight::Full(f(&names[0], t)?),
        BranchWeight::LowRank { u, v } => BranchWeight::LowRank {
            u: f(&names[0], u)?,
            v: f(&names[1], v)?,
        },
    })
}

/// Cross layers in PyTorch layout, named as the official GDCN layer names them (`w.{i}.weight`,
/// `wg.{i}.weight`, `b.{i}`; a gate bias, which that layer lacks, is `bg.{i}`; a low-rank
/// branch `w.{i}.u` `[D, r]` and `w.{i}.v` `[r, D]`), or, ungated, as TorchRec's `CrossNet`
/// (`kernels.{i}`, `bias.{i}`) and `LowRankCrossNet` (`W_kernels.{i}`, `V_kernels.{i}`).
impl Parameters for Vec<CrossLayerWeights> {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.iter().enumerate() {
            let gated = l.w_g.is_some();
            out.extend(
                branch_names(gated, "w", i, &l.w_c)
                    .into_iter()
                    .zip(branch_tensors(&l.w_c)),
            );
            out.push((bias_name(gated, i), &l.b_c));
            if let Some(wg) = &l.w_g {
                out.extend(
                    branch_names(true, "wg", i, wg)
                        .into_iter()
                        .zip(branch_tensors(wg)),
                );
            }
            if let Some(bg) = &l.b_g {
                out.push((format!("bg.{i}"), bg));
            }
        }
        out
    }

    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.iter_mut().enumerate() {
            let gated = l.w_g.is_some();
            let names = branch_names(gated, "w", i, &l.w_c);
            out.extend(names.into_iter().zip(branch_tensors_mut(&mut l.w_c)));
            out.push((bias_name(gated, i), &mut l.b_c));
            if let Some(wg) = &mut l.w_g {
                let names = branch_names(true, "wg", i, wg);
                out.extend(names.into_iter().zip(branch_tensors_mut(wg)));
            }
            if let Some(bg) = &mut l.b_g {
                out.push((format!("bg.{i}"), bg));
            }
        }
        out
    }

    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        self.iter()
            .enumerate()
            .map(|(i, l)| {
                let gated = l.w_g.is_some();
                Ok(CrossLayerWeights {
                    w_c: branch_map(&branch_names(gated, "w", i, &l.w_c), &l.w_c, f)?,
                    b_c: f(&bias_name(gated, i), &l.b_c)?,
                    w_g: l
                        .w_g
                        .as_ref()
                        .map(|wg| branch_map(&branch_names(true, "wg", i, wg), wg, f))
                        .transpose()?,
                    b_g: l
                        .b_g
                        .as_ref()
                        .map(|bg| f(&format!("bg.{i}"), bg))
                        .transpose()?,
                })
            })
            .collect()
    }
}

fn bias_name(gated: bool, i: usize) -> String {
    if gated {
        format!("b.{i}")
    } else {
        format!("bias.{i}")
    }
}

/// Packed cross layers (the kernel layout the optimizers step on): `layers.{i}.w`,
/// `layers.{i}.u` (low rank), `layers.{i}.b`. For checkpoints, unpack to the PyTorch layout
/// first ([`crate::ops::gated_cross::GatedCross::unpack_grads`]).
impl Parameters for PackedCross {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            out.push((format!("layers.{i}.w"), &l.w));
            out.extend(l.u.iter().map(|u| (format!("layers.{i}.u"), u)));
            out.push((format!("layers.{i}.b"), &l.b));
        }
        out
    }

    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.push((format!("layers.{i}.w"), &mut l.w));
            out.extend(l.u.iter_mut().map(|u| (format!("layers.{i}.u"), u)));
            out.push((format!("layers.{i}.b"), &mut l.b));
        }
        out
    }

    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(PackedCrossLayer {
                    w: f(&format!("layers.{i}.w"), &l.w)?,
                    u: l.u
                        .as_ref()
                        .map(|u| f(&format!("layers.{i}.u"), u))
                        .transpose()?,
                    b: f(&format!("layers.{i}.b"), &l.b)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PackedCross { layers })
    }
}

/// A heterogeneous-attention / Hiformer layer: `wq`, `wk`, `wv` (per token) or `qkv.a`,
/// `qkv.rq`, `qkv.rk`, `qkv.rv` (low rank), then `wo`, `bo`, `w1`, `b1`, `w2`, `b2`,
/// `ln1.weight`, `ln1.bias`, `ln2.weight`, `ln2.bias` (no PyTorch reference layer exists, so
/// these are recfuse's field names in `nn.LayerNorm`'s style).
impl Parameters for LayerParams {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let qkv: Vec<(&str, &Tensor)> = match &self.qkv {
            QkvParams::PerToken { wq, wk, wv } => vec![("wq", wq), ("wk", wk), ("wv", wv)],
            QkvParams::LowRank(q) => vec![
                ("qkv.a", &q.a),
                ("qkv.rq", &q.rq),
                ("qkv.rk", &q.rk),
                ("qkv.rv", &q.rv),
            ],
        };
        let rest: [(&str, &Tensor); 10] = [
            ("wo", &self.wo),
            ("bo", &self.bo),
            ("w1", &self.w1),
            ("b1", &self.b1),
            ("w2", &self.w2),
            ("b2", &self.b2),
            ("ln1.weight", &self.ln1_g),
            ("ln1.bias", &self.ln1_b),
            ("ln2.weight", &self.ln2_g),
            ("ln2.bias", &self.ln2_b),
        ];
        qkv.into_iter()
            .chain(rest)
            .map(|(n, t)| (n.to_string(), t))
            .collect()
    }

    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let qkv: Vec<(&str, &mut Tensor)> = match &mut self.qkv {
            QkvParams::PerToken { wq, wk, wv } => vec![("wq", wq), ("wk", wk), ("wv", wv)],
            QkvParams::LowRank(q) => vec![
                ("qkv.a", &mut q.a),
                ("qkv.rq", &mut q.rq),
                ("qkv.rk", &mut q.rk),
                ("qkv.rv", &mut q.rv),
            ],
        };
        let rest: [(&str, &mut Tensor); 10] = [
            ("wo", &mut self.wo),
            ("bo", &mut self.bo),
            ("w1", &mut self.w1),
            ("b1", &mut self.b1),
            ("w2", &mut self.w2),
            ("b2", &mut self.b2),
            ("ln1.weight", &mut self.ln1_g),
            ("ln1.bias", &mut self.ln1_b),
            ("ln2.weight", &mut self.ln2_g),
            ("ln2.bias", &mut self.ln2_b),
        ];
        qkv.into_iter()
            .chain(rest)
            .map(|(n, t)| (n.to_string(), t))
            .collect()
    }

    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let qkv = match &self.qkv {
            QkvParams::PerToken { wq, wk, wv } => QkvParams::PerToken {
                wq: f("wq", wq)?,
                wk: f("wk", wk)?,
                wv: f("wv", wv)?,
            },
            QkvParams::LowRank(q) => QkvParams::LowRank(QkvWeights {
                a: f("qkv.a", &q.a)?,
                rq: f("qkv.rq", &q.rq)?,
                rk: f("qkv.rk", &q.rk)?,
                rv: f("qkv.rv", &q.rv)?,
            }),
        };
        Ok(LayerParams {
            qkv,
            wo: f("wo", &self.wo)?,
            bo: f("bo", &self.bo)?,
            w1: f("w1", &self.w1)?,
            b1: f("b1", &self.b1)?,
            w2: f("w2", &self.w2)?,
            b2: f("b2", &self.b2)?,
            ln1_g: f("ln1.weight", &self.ln1_g)?,
            ln1_b: f("ln1.bias", &self.ln1_b)?,
            ln2_g: f("ln2.weight", &self.ln2_g)?,
            ln2_b: f("ln2.bias", &self.ln2_b)?,
        })
    }
}
