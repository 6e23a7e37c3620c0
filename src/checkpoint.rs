//! Checkpoints: named tensors in the [safetensors] format, under PyTorch `state_dict` names, so
//! a PyTorch model's weights load into recfuse and recfuse's load into PyTorch
//! (`safetensors.torch.load_file` + `load_state_dict`). See `docs/CHECKPOINTS.md` for every
//! layer's names and the Python side.
//!
//! A [`Checkpoint`] is a host-side map from names to tensors (dtype, shape, little-endian
//! bytes). [`Checkpoint::add`] copies in anything that implements [`Parameters`] (one download
//! per tensor, stored in the tensor's own dtype), under an optional prefix (`prefix.name`, as
//! PyTorch names submodules); [`Checkpoint::save`] / [`Checkpoint::load`] and
//! [`Checkpoint::to_bytes`] / [`Checkpoint::from_bytes`] move it to and from a file or memory.
//! [`Checkpoint::restore`] writes it back into existing parameters **in place** — one
//! host→device copy per tensor into the tensor's own buffer, no reallocation — after checking
//! every name and shape first (nothing is written unless everything matches).
//!
//! Restoring converts the file's dtype (F64, F32, BF16, F16) to each parameter's dtype with a
//! single correct rounding, to nearest, ties to even (the same dtype is copied bit for bit;
//! see [`FileDType`]).
//!
//! Embedding bags ([`Checkpoint::add_embedding_bags`]) are saved one `[rows, dim]` tensor per
//! table as TorchRec names them, `embedding_bags.{table}.weight`; optimizer state
//! ([`Checkpoint::add_optimizer`]) under the reserved `optim.` namespace:
//! `optim.{kind}.{parameter}` (`exp_avg`, `exp_avg_sq`, `momentum_buffer`, `master`,
//! `momentum1` for the bags' row-wise Adagrad) and the step count as an I64 scalar
//! `optim.step` (`optim.step.{prefix}` for an optimizer over prefixed parameters).
//!
//! ```
//! use recfuse::checkpoint::Checkpoint;
//! use recfuse::ops::linear::LinearParams;
//! use recfuse::params::Parameters;
//! use recfuse::{DType, Device};
//! let dev = Device::cpu();
//! let head = LinearParams::init(4, 2, true, DType::F32, 7, &dev)?;
//! let mut ckpt = Checkpoint::new();
//! ckpt.add("head", &head)?;
//! assert_eq!(ckpt.names().collect::<Vec<_>>(), ["head.bias", "head.weight"]);
//! let bytes = ckpt.to_bytes()?; // what `save` writes: a safetensors file
//!
//! // A freshly initialised layer takes the saved weights, bit for bit.
//! let mut other = LinearParams::init(4, 2, true, DType::F32, 99, &dev)?;
//! Checkpoint::from_bytes(&bytes)?.restore("head", &mut other)?;
//! assert_eq!(other.weight.to_vec::<f32>()?, head.weight.to_vec::<f32>()?);
//! # Ok::<(), recfuse::Error>(())
//! ```
//!
//! [safetensors]: https://github.com/huggingface/safetensors

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::Dtype;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result, ShapeMismatch};
use crate::params::Parameters;
use crate::tensor::Tensor;

mod convert;
mod embedding;
mod optim;

// The format is little-endian; recfuse's tensors hold native-endian bytes.
#[cfg(target_endian = "big")]
compile_error!("recfuse checkpoints assume a little-endian host");

/// The reserved namespace of optimizer state: model restores never count its keys as
/// unexpected, and PyTorch users drop it before `load_state_dict`.
pub const OPTIM_NAMESPACE: &str = "optim";

/// The dtype of a tensor in a checkpoint file.
///
/// Float tensors convert to any parameter dtype on restore: the same dtype bit for bit,
/// widening exactly, narrowing by one rounding to nearest, ties to even (F64 → BF16/F16 rounds
/// once, not via a rounded f32), overflowing to ±∞, NaN kept NaN. Other dtypes (a PyTorch
/// file's integer buffers, the step count) load and save unchanged but never restore into a
/// parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileDType {
    /// IEEE binary64 (torch.float64): reference outputs; restores with one rounding.
    F64,
    /// IEEE binary32 (torch.float32).
    F32,
    /// bfloat16 (torch.bfloat16).
    BF16,
    /// IEEE binary16 (torch.float16).
    F16,
    /// Signed 64-bit integers (torch.int64): indices, offsets, step counts.
    I64,
    /// Any other safetensors dtype, by its safetensors name (`"I32"`, `"BOOL"`, …).
    Other(String),
}

impl FileDType {
    fn of(d: Dtype) -> FileDType {
        match d {
            Dtype::F64 => FileDType::F64,
            Dtype::F32 => FileDType::F32,
            Dtype::BF16 => FileDType::BF16,
            Dtype::F16 => FileDType::F16,
            Dtype::I64 => FileDType::I64,
            other => FileDType::Other(format!("{other:?}")),
        }
    }
}

/// One stored tensor: what safetensors calls a view, owned.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// How a restore treats names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreOptions {
    /// true (the default): every parameter must be in the checkpoint, and every checkpoint
    /// key in the restored scope must be a parameter, or the restore fails with
    /// [`Error::CheckpointMismatch`] listing them. false: the tensors present are restored,
    /// the others kept, and the lists come back in the [`RestoreReport`]. Shape mismatches
    /// fail either way (as in PyTorch).
    pub strict: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { strict: true }
    }
}

impl RestoreOptions {
    /// Restore what is there, report the rest (PyTorch's `strict=False`).
    pub fn non_strict() -> Self {
        RestoreOptions { strict: false }
    }
}

/// What a restore did (PyTorch's `_IncompatibleKeys`, plus the keys written).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Checkpoint keys written into parameters (or read: a step count).
    pub restored: Vec<String>,
    /// Parameters the checkpoint lacks (kept as they were; empty after a strict restore).
    pub missing: Vec<String>,
    /// Checkpoint keys in the restored scope that no parameter took (empty after a strict
    /// restore).
    pub unexpected: Vec<String>,
}

/// Named tensors on the host, saved as a safetensors file (module docs: names, dtypes).
///
/// ```
/// use recfuse::checkpoint::{Checkpoint, FileDType};
/// let mut ckpt = Checkpoint::new();
/// ckpt.insert_f64("x", &[2], &[0.5, -1.0])?;
/// let back = Checkpoint::from_bytes(&ckpt.to_bytes()?)?;
/// assert_eq!(back.dtype("x"), Some(FileDType::F64));
/// assert_eq!(back.to_f64_vec("x")?, vec![0.5, -1.0]);
/// // A corrupt file is an error, never a panic.
/// assert!(matches!(Checkpoint::from_bytes(b"not a checkpoint"), Err(recfuse::Error::Malformed { .. })));
/// # Ok::<(), recfuse::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

/// `prefix.name`, or `name` for an empty prefix.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// The names, shapes and dtypes a restore wants, checked against a checkpoint in one pass.
pub(crate) struct Wanted {
    pub key: String,
    pub shape: Vec<usize>,
    /// Needs a float tensor (a parameter) rather than an integer (a step count).
    pub float: bool,
}

impl Checkpoint {
    /// An empty checkpoint (metadata `format = pt`, as `safetensors.torch` writes).
    pub fn new() -> Checkpoint {
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        Checkpoint {
            entries: BTreeMap::new(),
            metadata,
        }
    }

    fn put(&mut self, op: &'static str, arg: &'static str, key: String, e: Entry) -> Result<()> {
        if self.entries.contains_key(&key) {
            return Err(Error::invalid(
                op,
                arg,
                format!("tensor `{key}` is already in the checkpoint"),
            ));
        }
        self.entries.insert(key, e);
        Ok(())
    }

    /// Copies every tensor of `params` in (one download each, in its own dtype) as
    /// `prefix.name` (`name` when `prefix` is empty). A name already present is an error.
    pub fn add<P: Parameters + ?Sized>(&mut self, prefix: &str, params: &P) -> Result<()> {
        const OP: &str = "Checkpoint::add";
        for (name, t) in params.named_tensors() {
            self.insert_as(OP, "params", join(prefix, &name), t)?;
        }
        Ok(())
    }

    /// Copies one tensor in under `name`.
    pub fn insert(&mut self, name: impl Into<String>, tensor: &Tensor) -> Result<()> {
        self.insert_as("Checkpoint::insert", "name", name.into(), tensor)
    }

    fn insert_as(
        &mut self,
        op: &'static str,
        arg: &'static str,
        key: String,
        t: &Tensor,
    ) -> Result<()> {
        if self.entries.contains_key(&key) {
            return Err(Error::invalid(
                op,
                arg,
                format!("tensor `{key}` is already in the checkpoint"),
            ));
        }
        let e = Entry {
            dtype: convert::file_dtype(t.dtype()),
            shape: t.shape().to_vec(),
            data: t.to_bytes()?,
        };
        self.put(op, arg, key, e)
    }

    /// Stores host f64 data (e.g. a reference output) under `name`, as F64.
    pub fn insert_f64(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f64],
    ) -> Result<()> {
        self.insert_host(
            "Checkpoint::insert_f64",
            name.into(),
            Dtype::F64,
            shape,
            bytemuck::cast_slice(data),
            data.len(),
        )
    }

    /// Stores host i64 data (indices, a step count) under `name`, as I64.
    pub fn insert_i64(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[i64],
    ) -> Result<()> {
        self.insert_host(
            "Checkpoint::insert_i64",
            name.into(),
            Dtype::I64,
            shape,
            bytemuck::cast_slice(data),
            data.len(),
        )
    }

    fn insert_host(
        &mut self,
        op: &'static str,
        key: String,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
        len: usize,
    ) -> Result<()> {
        if numel(shape) != Some(len) {
            return Err(Error::shape(
                op,
                "data",
                format!("{:?} elements for shape {shape:?}", numel(shape)),
                &[len],
            ));
        }
        let e = Entry {
            dtype,
            shape: shape.to_vec(),
            data: bytes.to_vec(),
        };
        self.put(op, "name", key, e)
    }

    /// Removes a tensor; true when it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name).is_some()
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when a tensor is stored under `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored dtype of `name`.
    pub fn dtype(&self, name: &str) -> Option<FileDType> {
        self.entries.get(name).map(|e| FileDType::of(e.dtype))
    }

    /// The file's string metadata (`format = pt` by default; kept from a loaded file).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Sets one metadata entry (saved in the file header).
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    fn entry(&self, op: &'static str, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| Error::CheckpointMismatch {
                op,
                arg: "name",
                missing: vec![name.to_string()],
                unexpected: Vec::new(),
                shapes: Vec::new(),
            })
    }

    /// A float tensor's values widened exactly to f64 (for reference data in tests and
    /// fixtures).
    pub fn to_f64_vec(&self, name: &str) -> Result<Vec<f64>> {
        const OP: &str = "Checkpoint::to_f64_vec";
        let e = self.entry(OP, name)?;
        convert::to_f64(e.dtype, &e.data).ok_or_else(|| Error::Malformed {
            op: OP,
            arg: "name",
            reason: format!("`{name}` is {:?}, not a float tensor", e.dtype),
        })
    }

    /// An I64 tensor's values (indices, offsets, step counts).
    pub fn to_i64_vec(&self, name: &str) -> Result<Vec<i64>> {
        const OP: &str = "Checkpoint::to_i64_vec";
        let e = self.entry(OP, name)?;
        if e.dtype != Dtype::I64 {
            return Err(Error::Malformed {
                op: OP,
                arg: "name",
                reason: format!("`{name}` is {:?}, not I64", e.dtype),
            });
        }
        Ok(bytemuck::pod_collect_to_vec(&e.data))
    }

    /// A float tensor as a new [`Tensor`] of `dtype` on `device` (converted as a restore
    /// converts; one upload): for inputs stored next to weights.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        const OP: &str = "Checkpoint::tensor";
        let e = self.entry(OP, name)?;
        let bytes = convert::convert(e.dtype, &e.data, dtype).ok_or_else(|| Error::Malformed {
            op: OP,
            arg: "name",
            reason: format!("`{name}` is {:?}, not a float tensor", e.dtype),
        })?;
        let mut t = Tensor::zeros(&e.shape, dtype, device)?;
        t.write_bytes(&bytes)?;
        Ok(t)
    }

    /// Every float tensor in `prefix`'s scope (as [`Self::restore`] scopes it) as a new tensor
    /// of `dtype` on `device`, named without the prefix: ad-hoc parameters, or a look at a
    /// file whose layout no recfuse type has. Non-float tensors are left out.
    ///
    /// ```
    /// use recfuse::checkpoint::Checkpoint;
    /// use recfuse::{DType, Device};
    /// let mut ckpt = Checkpoint::new();
    /// ckpt.insert_f64("enc.w", &[2], &[1.0, 2.0])?;
    /// ckpt.insert_i64("enc.steps", &[1], &[3])?;
    /// let ts = ckpt.tensors("enc", DType::BF16, &Device::cpu())?;
    /// assert_eq!(ts.len(), 1);
    /// assert_eq!(ts[0].0, "w");
    /// assert_eq!(ts[0].1.to_f32_vec()?, vec![1.0, 2.0]);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn tensors(
        &self,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        let scope = model_scope(prefix);
        self.entries
            .iter()
            .filter(|(k, e)| scope(k) && convert::is_float(e.dtype))
            .map(|(k, _)| {
                let name = if prefix.is_empty() {
                    k.as_str()
                } else {
                    &k[prefix.len() + 1..]
                };
                Ok((name.to_string(), self.tensor(k, dtype, device)?))
            })
            .collect()
    }

    /// The safetensors file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        safetensors::serialize(
            self.entries.iter().map(|(k, e)| (k.as_str(), e)),
            Some(self.header_metadata()),
        )
        .map_err(|e| Error::Malformed {
            op: "Checkpoint::to_bytes",
            arg: "self",
            reason: e.to_string(),
        })
    }

    fn header_metadata(&self) -> std::collections::HashMap<String, String> {
        self.metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Parses a safetensors file's bytes (validated: a truncated or corrupt file is
    /// [`Error::Malformed`], never a panic).
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        Self::parse("Checkpoint::from_bytes", "bytes", bytes)
    }

    fn parse(op: &'static str, arg: &'static str, bytes: &[u8]) -> Result<Checkpoint> {
        let bad = |e: safetensors::SafeTensorError| Error::Malformed {
            op,
            arg,
            reason: e.to_string(),
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(bad)?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(bad)?;
        let mut out = Checkpoint {
            entries: BTreeMap::new(),
            metadata: meta
                .metadata()
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        for (name, view) in st.iter() {
            let e = Entry {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            out.entries.insert(name.to_string(), e);
        }
        Ok(out)
    }

    /// Writes the checkpoint to `path` (through a temporary file in the same directory,
    /// renamed into place, so an existing checkpoint is never left half-written).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        const OP: &str = "Checkpoint::save";
        let path = path.as_ref();
        // An empty parent ("x.safetensors") is the current directory.
        let full;
        let target = if path.parent().is_some_and(|p| p.as_os_str().is_empty()) {
            full = Path::new(".").join(path);
            full.as_path()
        } else {
            path
        };
        safetensors::serialize_to_file(
            self.entries.iter().map(|(k, e)| (k.as_str(), e)),
            Some(self.header_metadata()),
            target,
        )
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => Error::Io {
                op: OP,
                arg: "path",
                path: path.to_path_buf(),
                source,
            },
            other => Error::Malformed {
                op: OP,
                arg: "self",
                reason: other.to_string(),
            },
        })
    }

    /// Reads a safetensors file (PyTorch's `safetensors.torch.save_file` output or
    /// [`Self::save`]'s).
    pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
        const OP: &str = "Checkpoint::load";
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            op: OP,
            arg: "path",
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(OP, "path", &bytes)
    }

    /// Strict [`Self::restore_with`]: every parameter `prefix.name` must be in the checkpoint
    /// with its shape, and every checkpoint key under `prefix.` must be a parameter (with an
    /// empty prefix: every key outside the `optim.` namespace).
    pub fn restore<P: Parameters + ?Sized>(
        &self,
        prefix: &str,
        params: &mut P,
    ) -> Result<RestoreReport> {
        self.restore_with(prefix, params, &RestoreOptions::default())
    }

    /// Writes the checkpoint's `prefix.name` tensors into `params` in place, converted to
    /// each parameter's dtype (module docs), one host→device copy per tensor. Every name and
    /// shape is checked before anything is written.
    pub fn restore_with<P: Parameters + ?Sized>(
        &self,
        prefix: &str,
        params: &mut P,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        const OP: &str = "Checkpoint::restore";
        let mut targets: Vec<(String, &mut Tensor)> = params
            .named_tensors_mut()
            .into_iter()
            .map(|(n, t)| (join(prefix, &n), t))
            .collect();
        let wanted: Vec<Wanted> = targets
            .iter()
            .map(|(k, t)| Wanted {
                key: k.clone(),
                shape: t.shape().to_vec(),
                float: true,
            })
            .collect();
        let scope = model_scope(prefix);
        let report = self.check(OP, "params", &wanted, &*scope, opts)?;
        self.write_targets(OP, &mut targets)?;
        Ok(report)
    }

    /// Converts and writes every checked entry present into its target tensor (after `check`).
    pub(crate) fn write_targets(
        &self,
        op: &'static str,
        targets: &mut [(String, &mut Tensor)],
    ) -> Result<()> {
        for (key, t) in targets.iter_mut() {
            let Some(e) = self.entries.get(key.as_str()) else {
                continue;
            };
            let bytes =
                convert::convert(e.dtype, &e.data, t.dtype()).ok_or_else(|| Error::Malformed {
                    op,
                    arg: "checkpoint",
                    reason: format!("`{key}` is {:?}, not a float tensor", e.dtype),
                })?;
            t.write_bytes(&bytes)?;
        }
        Ok(())
    }

    /// Checks `wanted` against the checkpoint; keys for which `in_scope` holds and nobody
    /// wants are unexpected. Errors per `opts` (shape and dtype problems always).
    pub(crate) fn check(
        &self,
        op: &'static str,
        arg: &'static str,
        wanted: &[Wanted],
        in_scope: &dyn Fn(&str) -> bool,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        let mut seen = BTreeSet::new();
        let mut report = RestoreReport::default();
        let mut shapes = Vec::new();
        for w in wanted {
            if !seen.insert(w.key.as_str()) {
                return Err(Error::invalid(
                    op,
                    arg,
                    format!("two tensors are named `{}`", w.key),
                ));
            }
            let Some(e) = self.entries.get(&w.key) else {
                report.missing.push(w.key.clone());
                continue;
            };
            if e.shape != w.shape {
                shapes.push(ShapeMismatch {
                    name: w.key.clone(),
                    expected: w.shape.clone(),
                    found: e.shape.clone(),
                });
                continue;
            }
            let ok = if w.float {
                convert::is_float(e.dtype)
            } else {
                matches!(e.dtype, Dtype::I64 | Dtype::U64)
            };
            if !ok {
                return Err(Error::Malformed {
                    op,
                    arg: "checkpoint",
                    reason: format!(
                        "`{}` is {:?}; expected {}",
                        w.key,
                        e.dtype,
                        if w.float {
                            "F64, F32, BF16 or F16 (a parameter)"
                        } else {
                            "I64 (a step count)"
                        }
                    ),
                });
            }
            report.restored.push(w.key.clone());
        }
        report.unexpected = self
            .entries
            .keys()
            .filter(|k| in_scope(k) && !seen.contains(k.as_str()))
            .cloned()
            .collect();
        let names_bad = opts.strict && !(report.missing.is_empty() && report.unexpected.is_empty());
        if names_bad || !shapes.is_empty() {
            return Err(Error::CheckpointMismatch {
                op,
                arg,
                missing: if opts.strict {
                    report.missing
                } else {
                    Vec::new()
                },
                unexpected: if opts.strict {
                    report.unexpected
                } else {
                    Vec::new()
                },
                shapes,
            });
        }
        Ok(report)
    }

    /// Raw access for the sibling modules.
    pub(crate) fn raw(&self, key: &str) -> Option<(Dtype, &[usize], &[u8])> {
        self.entries
            .get(key)
            .map(|e| (e.dtype, e.shape.as_slice(), e.data.as_slice()))
    }

    pub(crate) fn put_raw(
        &mut self,
        op: &'static str,
        arg: &'static str,
        key: String,
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<()> {
        self.put(op, arg, key, Entry { dtype, shape, data })
    }
}

/// The keys a model restore under `prefix` owns: `prefix.*`, or with no prefix everything
/// outside the optimizer namespace.
fn model_scope(prefix: &str) -> Box<dyn Fn(&str) -> bool + '_> {
    if prefix.is_empty() {
        Box::new(|k: &str| {
            !(k == OPTIM_NAMESPACE
                || k.strip_prefix(OPTIM_NAMESPACE)
                    .is_some_and(|r| r.starts_with('.')))
        })
    } else {
        Box::new(move |k: &str| k.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')))
    }
}
