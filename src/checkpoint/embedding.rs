//! Embedding bags in a checkpoint: one `[rows, dim]` tensor per table under TorchRec's
//! `EmbeddingBagCollection` name `embedding_bags.{table}.weight` (recfuse packs the tables
//! into one padded buffer; the file never shows the packing), and the row-wise Adagrad state
//! as `optim.momentum1.embedding_bags.{table}.weight`, `[rows]` f32 (FBGEMM's name for it).

use safetensors::Dtype;

use super::{convert, join, Checkpoint, RestoreOptions, RestoreReport, Wanted, OPTIM_NAMESPACE};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend;
use crate::ops::embedding::EmbeddingBags;
use crate::tensor::Tensor;

/// The checkpoint key of table `t`'s row-wise Adagrad state.
fn state_key(table_key: &str) -> String {
    format!("{OPTIM_NAMESPACE}.momentum1.{table_key}")
}

fn check_state(op: &'static str, bags: &EmbeddingBags, s: &Tensor) -> Result<()> {
    if s.shape() != [bags.total_rows()] {
        return Err(Error::shape(
            op,
            "rowwise_adagrad_state",
            format!("[{}] (one per row of every table)", bags.total_rows()),
            s.shape(),
        ));
    }
    if s.dtype() != DType::F32 {
        return Err(Error::DType {
            op,
            arg: "rowwise_adagrad_state",
            expected: "f32".into(),
            actual: s.dtype(),
        });
    }
    backend::same_device(op, "rowwise_adagrad_state", &bags.device(), s)
}

impl Checkpoint {
    /// Copies every table of `bags` in as `prefix.embedding_bags.{table}.weight` (`[rows,
    /// dim]`, the bags' dtype; one download of the packed buffer), and with
    /// `rowwise_adagrad_state` (the `[total_rows]` f32 state of
    /// [`EmbeddingBags::update_rowwise_adagrad`]) each table's rows of it as
    /// `optim.momentum1.{table key}`.
    ///
    /// ```
    /// use recfuse::checkpoint::Checkpoint;
    /// use recfuse::ops::embedding::{EmbeddingBags, Pooling, TableSpec};
    /// use recfuse::{DType, Device};
    /// let dev = Device::cpu();
    /// let specs = [TableSpec::new("user", 10, 4), TableSpec::new("item", 7, 3)];
    /// let bags = EmbeddingBags::new(&specs, Pooling::Sum, DType::F32, 0, &dev)?;
    /// let state = bags.rowwise_adagrad_state()?;
    /// let mut ckpt = Checkpoint::new();
    /// ckpt.add_embedding_bags("", &bags, Some(&state))?;
    /// assert_eq!(ckpt.shape("embedding_bags.item.weight"), Some(&[7, 3][..]));
    /// assert_eq!(ckpt.shape("optim.momentum1.embedding_bags.user.weight"), Some(&[10][..]));
    ///
    /// // Restored into bags initialised differently: the same tables.
    /// let mut other = EmbeddingBags::new(&specs, Pooling::Sum, DType::F32, 5, &dev)?;
    /// ckpt.restore_embedding_bags("", &mut other, None)?;
    /// assert_eq!(other.table(1)?.to_vec::<f32>()?, bags.table(1)?.to_vec::<f32>()?);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn add_embedding_bags(
        &mut self,
        prefix: &str,
        bags: &EmbeddingBags,
        rowwise_adagrad_state: Option<&Tensor>,
    ) -> Result<()> {
        const OP: &str = "Checkpoint::add_embedding_bags";
        let state = match rowwise_adagrad_state {
            Some(s) => {
                check_state(OP, bags, s)?;
                Some(s.to_bytes()?)
            }
            None => None,
        };
        let flat = bags.weights().to_bytes()?;
        let es = bags.dtype().size();
        for (spec, l) in bags.specs().iter().zip(bags.layout()) {
            let key = join(prefix, &spec.checkpoint_key());
            let mut data = Vec::with_capacity(l.rows * l.dim * es);
            for r in 0..l.rows {
                let start = (l.elem_off + r * l.pitch) * es;
                data.extend_from_slice(&flat[start..start + l.dim * es]);
            }
            if let Some(s) = &state {
                let rows = &s[l.rows_off * 4..(l.rows_off + l.rows) * 4];
                self.put_raw(
                    OP,
                    "rowwise_adagrad_state",
                    state_key(&key),
                    Dtype::F32,
                    vec![l.rows],
                    rows.to_vec(),
                )?;
            }
            let dtype = convert::file_dtype(bags.dtype());
            self.put_raw(OP, "bags", key, dtype, vec![l.rows, l.dim], data)?;
        }
        Ok(())
    }

    /// Strict [`Self::restore_embedding_bags_with`].
    pub fn restore_embedding_bags(
        &self,
        prefix: &str,
        bags: &mut EmbeddingBags,
        rowwise_adagrad_state: Option<&mut Tensor>,
    ) -> Result<RestoreReport> {
        self.restore_embedding_bags_with(
            prefix,
            bags,
            rowwise_adagrad_state,
            &RestoreOptions::default(),
        )
    }

    /// Writes the checkpoint's tables (`prefix.embedding_bags.{table}.weight`, converted to
    /// the bags' dtype) into `bags` in place, and with `rowwise_adagrad_state` its
    /// `optim.momentum1.*` rows: one host→device copy of the packed buffer (and one of the
    /// state). Strictly, the keys owned are `prefix.embedding_bags.*` (and, with a state,
    /// `optim.momentum1.prefix.embedding_bags.*`); without a state, saved Adagrad rows are
    /// left alone.
    pub fn restore_embedding_bags_with(
        &self,
        prefix: &str,
        bags: &mut EmbeddingBags,
        rowwise_adagrad_state: Option<&mut Tensor>,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        const OP: &str = "Checkpoint::restore_embedding_bags";
        if let Some(s) = &rowwise_adagrad_state {
            check_state(OP, bags, s)?;
        }
        let with_state = rowwise_adagrad_state.is_some();
        let keys: Vec<String> = bags
            .specs()
            .iter()
            .map(|s| join(prefix, &s.checkpoint_key()))
            .collect();
        let mut wanted = Vec::new();
        for (key, l) in keys.iter().zip(bags.layout()) {
            wanted.push(Wanted {
                key: key.clone(),
                shape: vec![l.rows, l.dim],
                float: true,
            });
            if with_state {
                wanted.push(Wanted {
                    key: state_key(key),
                    shape: vec![l.rows],
                    float: true,
                });
            }
        }
        let table_scope = join(prefix, "embedding_bags.");
        let state_scope = state_key(&table_scope);
        let in_scope =
            |k: &str| k.starts_with(&table_scope) || (with_state && k.starts_with(&state_scope));
        let report = self.check(OP, "bags", &wanted, &in_scope, opts)?;

        // The packed buffer: built from zeros (the pad elements) when every table is there,
        // else from the current weights so that absent tables keep their values.
        let es = bags.dtype().size();
        let all = keys.iter().all(|k| self.contains(k));
        let mut flat = if all {
            vec![0u8; bags.weights().size_in_bytes()]
        } else {
            bags.weights().to_bytes()?
        };
        let mut wrote = false;
        for (key, l) in keys.iter().zip(bags.layout()) {
            let Some((dtype, _, data)) = self.raw(key) else {
                continue;
            };
            let rows =
                convert::convert(dtype, data, bags.dtype()).ok_or_else(|| Error::Malformed {
                    op: OP,
                    arg: "checkpoint",
                    reason: format!("`{key}` is {dtype:?}, not a float tensor"),
                })?;
            for r in 0..l.rows {
                let dst = (l.elem_off + r * l.pitch) * es;
                let src = r * l.dim * es;
                flat[dst..dst + l.dim * es].copy_from_slice(&rows[src..src + l.dim * es]);
            }
            wrote = true;
        }
        if wrote {
            bags.weights_mut().write_bytes(&flat)?;
        }

        if let Some(state) = rowwise_adagrad_state {
            let skeys: Vec<String> = keys.iter().map(|k| state_key(k)).collect();
            let all = skeys.iter().all(|k| self.contains(k));
            let mut host = if all {
                vec![0u8; state.size_in_bytes()]
            } else {
                state.to_bytes()?
            };
            let mut wrote = false;
            for (key, l) in skeys.iter().zip(bags.layout()) {
                let Some((dtype, _, data)) = self.raw(key) else {
                    continue;
                };
                let rows =
                    convert::convert(dtype, data, DType::F32).ok_or_else(|| Error::Malformed {
                        op: OP,
                        arg: "checkpoint",
                        reason: format!("`{key}` is {dtype:?}, not a float tensor"),
                    })?;
                host[l.rows_off * 4..(l.rows_off + l.rows) * 4].copy_from_slice(&rows);
                wrote = true;
            }
            if wrote {
                state.write_bytes(&host)?;
            }
        }
        Ok(report)
    }
}
