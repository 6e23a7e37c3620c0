//! Optimizer state in a checkpoint: `optim.{kind}.{prefix.}{parameter}` for every state
//! tensor (f32) and the step count as an I64 scalar, `optim.step` (`optim.step.{prefix}` for
//! an optimizer over prefixed parameters), so a resumed run takes bit-identical steps.

use safetensors::Dtype;

use super::{join, Checkpoint, RestoreOptions, RestoreReport, Wanted, OPTIM_NAMESPACE};
use crate::error::{Error, Result};
use crate::ops::optim::OptimizerState;

/// The state kinds the dense optimizers keep: a strict restore owns every key of these kinds
/// under its prefix, so an Adam checkpoint restored into SGD fails instead of half-loading.
const DENSE_KINDS: [&str; 4] = ["exp_avg", "exp_avg_sq", "momentum_buffer", "master"];

fn step_key(prefix: &str) -> String {
    if prefix.is_empty() {
        format!("{OPTIM_NAMESPACE}.step")
    } else {
        format!("{OPTIM_NAMESPACE}.step.{prefix}")
    }
}

fn state_key(kind: &str, prefix: &str, name: &str) -> String {
    format!("{OPTIM_NAMESPACE}.{kind}.{}", join(prefix, name))
}

impl Checkpoint {
    /// Copies an optimizer's state in: every state tensor as `optim.{kind}.{prefix.}{name}`
    /// (`prefix` is the one its parameters were added under) and its step count as
    /// `optim.step` (`optim.step.{prefix}`).
    ///
    /// ```
    /// use recfuse::checkpoint::Checkpoint;
    /// use recfuse::ops::linear::LinearParams;
    /// use recfuse::ops::optim::{Adam, AdamConfig, OptimizerState};
    /// use recfuse::params::Parameters;
    /// use recfuse::{DType, Device};
    /// let dev = Device::cpu();
    /// let mut p = LinearParams::init(3, 2, true, DType::F32, 1, &dev)?;
    /// let mut g = p.zeros_like(None)?;
    /// g.weight.fill(0.5)?;
    /// let mut opt = Adam::new(&p, AdamConfig::adam(0.1), false)?;
    /// opt.step(&mut p, &g)?;
    /// let mut ckpt = Checkpoint::new();
    /// ckpt.add("", &p)?;
    /// ckpt.add_optimizer("", &opt)?;
    /// assert!(ckpt.contains("optim.exp_avg_sq.weight") && ckpt.contains("optim.step"));
    ///
    /// // A fresh optimizer resumes where the saved one stopped.
    /// let mut resumed = Adam::new(&p, AdamConfig::adam(0.1), false)?;
    /// ckpt.restore_optimizer("", &mut resumed)?;
    /// assert_eq!(resumed.steps(), 1);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn add_optimizer<O: OptimizerState + ?Sized>(
        &mut self,
        prefix: &str,
        opt: &O,
    ) -> Result<()> {
        const OP: &str = "Checkpoint::add_optimizer";
        let steps = i64::try_from(opt.steps()).map_err(|_| {
            Error::invalid(
                OP,
                "opt",
                format!("{} steps do not fit an I64", opt.steps()),
            )
        })?;
        self.put_raw(
            OP,
            "prefix",
            step_key(prefix),
            Dtype::I64,
            Vec::new(),
            steps.to_le_bytes().to_vec(),
        )?;
        for (kind, name, t) in opt.state_tensors() {
            self.insert_as(OP, "opt", state_key(kind, prefix, &name), t)?;
        }
        Ok(())
    }

    /// Strict [`Self::restore_optimizer_with`].
    pub fn restore_optimizer<O: OptimizerState + ?Sized>(
        &self,
        prefix: &str,
        opt: &mut O,
    ) -> Result<RestoreReport> {
        self.restore_optimizer_with(prefix, opt, &RestoreOptions::default())
    }

    /// Writes the saved state into `opt`'s tensors in place (one host→device copy each) and
    /// sets its step count. Strictly, the keys owned are the step and every
    /// `optim.{exp_avg, exp_avg_sq, momentum_buffer, master}.{prefix.}*`; non-strict, a
    /// missing step count keeps the current one (the report lists it).
    pub fn restore_optimizer_with<O: OptimizerState + ?Sized>(
        &self,
        prefix: &str,
        opt: &mut O,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        const OP: &str = "Checkpoint::restore_optimizer";
        let step = step_key(prefix);
        let mut targets: Vec<(String, &mut crate::Tensor)> = opt
            .state_tensors_mut()
            .into_iter()
            .map(|(kind, name, t)| (state_key(kind, prefix, &name), t))
            .collect();
        let mut wanted = vec![Wanted {
            key: step.clone(),
            shape: Vec::new(),
            float: false,
        }];
        wanted.extend(targets.iter().map(|(k, t)| Wanted {
            key: k.clone(),
            shape: t.shape().to_vec(),
            float: true,
        }));
        let scopes: Vec<String> = DENSE_KINDS
            .iter()
            .map(|kind| {
                let base = format!("{OPTIM_NAMESPACE}.{kind}.");
                if prefix.is_empty() {
                    base
                } else {
                    format!("{base}{prefix}.")
                }
            })
            .collect();
        let in_scope = |k: &str| k == step || scopes.iter().any(|s| k.starts_with(s.as_str()));
        let report = self.check(OP, "opt", &wanted, &in_scope, opts)?;
        self.write_targets(OP, &mut targets)?;
        drop(targets);
        if let Some((dtype, _, data)) = self.raw(&step) {
            let bytes: [u8; 8] = data.try_into().map_err(|_| Error::Malformed {
                op: OP,
                arg: "checkpoint",
                reason: format!("`{step}` holds {} bytes, not one 64-bit count", data.len()),
            })?;
            let steps = match dtype {
                Dtype::I64 => {
                    u64::try_from(i64::from_le_bytes(bytes)).map_err(|_| Error::Malformed {
                        op: OP,
                        arg: "checkpoint",
                        reason: format!("`{step}` is negative"),
                    })?
                }
                _ => u64::from_le_bytes(bytes),
            };
            opt.set_steps(steps);
        }
        Ok(report)
    }
}
