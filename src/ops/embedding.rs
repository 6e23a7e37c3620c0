//! Embedding bags: the first layer of every recommender, in the table-batched layout of
//! FBGEMM's `SplitTableBatchedEmbeddingBagsCodegen` / TorchRec's `EmbeddingBagCollection`.
//!
//! Many tables (each with its own row count and width) live in **one** flat weight buffer;
//! one launch pools every (table, sample) bag into a `[B, Σ dim_t]` output — the tables'
//! pooled vectors side by side, in table order, ready to concatenate with dense features.
//!
//! A batch is FBGEMM's layout: `indices` of every table concatenated, and `offsets` of length
//! `T·B + 1`, table-major: bag (t, b) is `indices[offsets[t·B + b] .. offsets[t·B + b + 1]]`,
//! each index a row of table t. Pooling is a sum or a mean (an empty bag pools to zeros, as in
//! PyTorch), and sum pooling takes optional per-sample weights (one per index).
//!
//! The backward never materialises a dense gradient unless asked: [`EmbeddingBags::update_sgd`]
//! and [`EmbeddingBags::update_rowwise_adagrad`] compute each touched row's gradient and apply
//! the optimizer to it in the same kernel (FBGEMM's fused backward), touching only the rows in
//! the batch. The gradient of a row is a segment reduction over its occurrences, sorted on the
//! host when the batch is built ([`EmbeddingBags::batch`]): a fixed order, no float atomics, so
//! every update is deterministic. [`EmbeddingBags::backward_dense`] returns the whole-table f32
//! gradient instead, for any dense optimizer in [`crate::ops::optim`].
//!
//! Widths can come straight from FDO: [`EmbeddingBags::from_fdo`] projects each trained table
//! onto its principal directions ([`crate::ops::fdo`]) and builds the bags at those widths.
//!
//! ```
//! use recfuse::ops::embedding::{EmbeddingBags, Pooling, TableSpec};
//! use recfuse::{DType, Device};
//! let dev = Device::cpu();
//! // Two tables: 10 rows × 4 and 7 rows × 3; batch of 2 samples.
//! let specs = [TableSpec::new("user", 10, 4), TableSpec::new("item", 7, 3)];
//! let mut bags = EmbeddingBags::new(&specs, Pooling::Sum, DType::F32, 0, &dev)?;
//! // bags (t, b): (0,0) = {1, 2}, (0,1) = {}, (1,0) = {6}, (1,1) = {0, 0}
//! let batch = bags.batch(&[1, 2, 6, 0, 0], &[0, 2, 2, 3, 5], None)?;
//! let y = bags.forward(&batch)?;
//! assert_eq!(y.shape(), &[2, 7]);
//! // One SGD step on the rows of the batch only.
//! let dy = recfuse::Tensor::full(&[2, 7], 1.0, DType::F32, &dev)?;
//! bags.update_sgd(&batch, &dy, 0.1, 0.0)?;
//! # Ok::<(), recfuse::Error>(())
//! ```

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend;
use crate::ops::fdo::{self, FieldPca};
use crate::ops::optim::RowwiseAdagradConfig;
use crate::tensor::Tensor;

/// Largest element / word index the kernels form (they index in 32 bits; one bit of headroom).
pub(crate) const MAX_INDEX: usize = (1 << 31) - 1;

/// Words of one table's entry in the layout block the kernels read.
pub(crate) const TABLE_WORDS: usize = 6;

/// One table of an [`EmbeddingBags`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    /// The table's name: its checkpoint key is `embedding_bags.{name}.weight` (TorchRec's).
    pub name: String,
    pub rows: usize,
    pub dim: usize,
}

impl TableSpec {
    /// The table's checkpoint key, `embedding_bags.{name}.weight`: TorchRec's
    /// `EmbeddingBagCollection` state-dict name (one `[rows, dim]` tensor per table).
    ///
    /// ```
    /// use recfuse::ops::embedding::TableSpec;
    /// assert_eq!(TableSpec::new("user", 10, 4).checkpoint_key(), "embedding_bags.user.weight");
    /// ```
    pub fn checkpoint_key(&self) -> String {
        format!("embedding_bags.{}.weight", self.name)
    }

    pub fn new(name: impl Into<String>, rows: usize, dim: usize) -> TableSpec {
        TableSpec {
            name: name.into(),
            rows,
            dim,
        }
    }
}

/// How a bag's rows are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Σ w_i·E[idx_i] (w_i = 1 without per-sample weights).
    Sum,
    /// (1/n)·Σ E[idx_i] over the bag's n rows; an empty bag gives zeros.
    Mean,
}

/// Where table t lives in the flat buffer and in the output. Rows are `pitch` elements apart:
/// `dim` rounded up to even for 16-bit tables, so every row starts on a 32-bit word (the WGSL
/// kernels store whole words, and the CUDA twin keeps the same layout); the pad element is
/// zero and never read into an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableLayout {
    pub elem_off: usize,
    pub pitch: usize,
    pub col_off: usize,
    pub dim: usize,
    pub rows_off: usize,
    pub rows: usize,
}

/// A collection of embedding tables in one flat buffer, on one device.
#[derive(Debug)]
pub struct EmbeddingBags {
    specs: Vec<TableSpec>,
    pooling: Pooling,
    layout: Vec<TableLayout>,
    /// `[T·6 layout words | total_dim column → table words]`, what the GPU kernels read (raw
    /// bits in an f32 tensor), uploaded once; `None` on the CPU, which reads `layout`.
    meta: Option<Tensor>,
    weights: Tensor,
    total_dim: usize,
    total_rows: usize,
}

/// What changes a bag's update: the optimizer applied to each touched row.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowUpdate {
    /// w ← w − lr·(g + wd·w).
    Sgd { lr: f32, weight_decay: f32 },
    /// FBGEMM's exact row-wise Adagrad: g' = g + wd·w; s ← s + mean(g'²); w ← w − lr·g'/(√s + ε).
    RowwiseAdagrad {
        lr: f32,
        eps: f32,
        weight_decay: f32,
    },
}

/// Word offsets of a batch's sections in its packed buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sections {
    pub bag_off: usize,
    pub idx: usize,
    pub wgt: usize,
    pub seg_table: usize,
    pub seg_row: usize,
    pub seg_off: usize,
    pub occ_bag: usize,
    pub occ_wgt: usize,
    pub words: usize,
}

/// One batch of lookups, validated and prepared for one [`EmbeddingBags`]: the forward CSR
/// (bags in table-major order) and the backward segments (each touched row once, with its
/// occurrences in a fixed order). Build it once per step with [`EmbeddingBags::batch`]; on a
/// GPU it is one upload, used by both the forward and the update.
#[derive(Debug)]
pub struct BagBatch {
    pub(crate) batch: usize,
    pub(crate) nnz: usize,
    pub(crate) segments: usize,
    /// Every section, packed as u32 words (f32 values as their bits).
    pub(crate) words: Vec<u32>,
    pub(crate) at: Sections,
    /// The same words on the device (GPU backends).
    pub(crate) device_words: Option<Tensor>,
    /// Row counts of the tables it was built for (checked by every use).
    table_rows: Vec<usize>,
    device: Device,
}

impl BagBatch {
    /// Number of samples B.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Number of lookups (indices) over every table.
    pub fn lookups(&self) -> usize {
        self.nnz
    }

    /// Number of distinct (table, row) pairs the batch touches: the rows an update writes.
    pub fn touched_rows(&self) -> usize {
        self.segments
    }

    pub(crate) fn word(&self, section: usize, i: usize) -> u32 {
        self.words[section + i]
    }

    pub(crate) fn f32_at(&self, section: usize, i: usize) -> f32 {
        f32::from_bits(self.words[section + i])
    }
}

/// A validated call, as the backends see it.
pub(crate) struct EmbPlan<'a> {
    pub batch: &'a BagBatch,
    pub layout: &'a [TableLayout],
    pub meta: Option<&'a Tensor>,
    pub total_dim: usize,
}

impl EmbPlan<'_> {
    /// Offset of the column → table map in the layout words.
    pub(crate) fn col_at(&self) -> usize {
        self.layout.len() * TABLE_WORDS
    }
}

fn too_big(op: &'static str, arg: &'static str, what: &str) -> Error {
    Error::invalid(
        op,
        arg,
        format!("{what} exceeds {MAX_INDEX}, the kernels' 32-bit index range"),
    )
}

fn layout_of(op: &'static str, specs: &[TableSpec], dtype: DType) -> Result<Vec<TableLayout>> {
    if specs.is_empty() {
        return Err(Error::invalid(op, "tables", "at least one table"));
    }
    let (mut elems, mut cols, mut rows) = (0usize, 0usize, 0usize);
    let mut out = Vec::with_capacity(specs.len());
    for (t, s) in specs.iter().enumerate() {
        if s.rows == 0 || s.dim == 0 {
            return Err(Error::invalid(
                op,
                "tables",
                format!(
                    "table {t} (`{}`) is {} × {}: rows and dim must be ≥ 1",
                    s.name, s.rows, s.dim
                ),
            ));
        }
        if specs[..t].iter().any(|o| o.name == s.name) {
            return Err(Error::invalid(
                op,
                "tables",
                format!("two tables are named `{}` (names key checkpoints)", s.name),
            ));
        }
        let pitch = if dtype == DType::F32 {
            s.dim
        } else {
            s.dim + (s.dim & 1)
        };
        let size = s
            .rows
            .checked_mul(pitch)
            .ok_or_else(|| too_big(op, "tables", "a table's element count"))?;
        out.push(TableLayout {
            elem_off: elems,
            pitch,
            col_off: cols,
            dim: s.dim,
            rows_off: rows,
            rows: s.rows,
        });
        elems = elems
            .checked_add(size)
            .filter(|&e| e <= MAX_INDEX)
            .ok_or_else(|| too_big(op, "tables", "the tables' total element count"))?;
        cols = cols
            .checked_add(s.dim)
            .filter(|&c| c <= MAX_INDEX)
            .ok_or_else(|| too_big(op, "tables", "the total width"))?;
        rows = rows
            .checked_add(s.rows)
            .filter(|&r| r <= MAX_INDEX)
            .ok_or_else(|| too_big(op, "tables", "the total row count"))?;
    }
    Ok(out)
}

fn meta_words(layout: &[TableLayout]) -> Vec<u32> {
    let total_dim: usize = layout.iter().map(|l| l.dim).sum();
    let mut w = Vec::with_capacity(layout.len() * TABLE_WORDS + total_dim);
    for l in layout {
        // Every value was checked to be ≤ MAX_INDEX by layout_of.
        w.extend([l.elem_off, l.pitch, l.col_off, l.dim, l.rows_off, l.rows].map(|v| v as u32));
    }
    for (t, l) in layout.iter().enumerate() {
        w.extend(std::iter::repeat_n(t as u32, l.dim));
    }
    w
}

/// Raw u32 words in an f32 tensor on a GPU device (the kernels read them as words); `None` on
/// the CPU, whose kernels read the host copy.
fn words_on(words: &[u32], dev: &Device) -> Result<Option<Tensor>> {
    if *dev == Device::Cpu {
        return Ok(None);
    }
    if words.is_empty() {
        // Bindings need a buffer even when there is nothing to read.
        return Ok(Some(Tensor::zeros(&[1], DType::F32, dev)?));
    }
    let bits: &[f32] = bytemuck::cast_slice(words);
    Ok(Some(Tensor::from_slice(bits, &[words.len()], dev)?))
}

impl EmbeddingBags {
    /// Tables initialised like TorchRec's default: uniform in ±√(1/rows), from `seed`
    /// (deterministic, the same values on every device).
    pub fn new(
        specs: &[TableSpec],
        pooling: Pooling,
        dtype: DType,
        seed: u64,
        device: &Device,
    ) -> Result<EmbeddingBags> {
        const OP: &str = "EmbeddingBags::new";
        let layout = layout_of(OP, specs, dtype)?;
        let n = layout.last().map_or(0, |l| l.elem_off + l.rows * l.pitch);
        let mut host = Vec::new();
        host.try_reserve_exact(n).map_err(|_| {
            Error::invalid(OP, "tables", format!("cannot allocate {n} host elements"))
        })?;
        host.resize(n, 0f32);
        let mut rng = crate::ops::init::SplitMix(seed ^ 0x6a09_e667_f3bc_c909);
        for l in &layout {
            let bound = (1.0 / l.rows as f64).sqrt();
            for r in 0..l.rows {
                for c in 0..l.dim {
                    host[l.elem_off + r * l.pitch + c] = ((rng.unit() * 2.0 - 1.0) * bound) as f32;
                }
            }
        }
        let weights = Tensor::from_f32(&host, &[n], dtype, device)?;
        Self::assemble(specs, pooling, layout, weights)
    }

    /// Bags over existing tables (`[rows_t, dim_t]` each, one dtype, one device), copied into
    /// the flat buffer on their device.
    pub fn from_tables(
        specs: &[TableSpec],
        tables: &[&Tensor],
        pooling: Pooling,
    ) -> Result<EmbeddingBags> {
        const OP: &str = "EmbeddingBags::from_tables";
        let Some(first) = tables.first() else {
            return Err(Error::invalid(OP, "tables", "at least one table"));
        };
        if tables.len() != specs.len() {
            return Err(Error::invalid(
                OP,
                "tables",
                format!("{} tensors for {} specs", tables.len(), specs.len()),
            ));
        }
        let (dtype, dev) = (first.dtype(), first.device());
        for (s, t) in specs.iter().zip(tables) {
            if t.shape() != [s.rows, s.dim] {
                return Err(Error::shape(
                    OP,
                    "tables",
                    format!("[{}, {}] (table `{}`)", s.rows, s.dim, s.name),
                    t.shape(),
                ));
            }
            if t.dtype() != dtype {
                return Err(Error::DType {
                    op: OP,
                    arg: "tables",
                    expected: format!("{dtype} (every table alike)"),
                    actual: t.dtype(),
                });
            }
            backend::same_device(OP, "tables", &dev, t)?;
        }
        let layout = layout_of(OP, specs, dtype)?;
        let n = layout.last().map_or(0, |l| l.elem_off + l.rows * l.pitch);
        let mut weights = Tensor::zeros(&[n], dtype, &dev)?;
        for (l, t) in layout.iter().zip(tables) {
            crate::ops::glue::write_rows(&mut weights, l.elem_off, l.pitch, t)?;
        }
        Self::assemble(specs, pooling, layout, weights)
    }

    /// FDO: projects each trained full-width table onto its top-k principal directions
    /// (`fdo::project`, the warm start of the GDCN paper's §4) and builds the bags at those
    /// per-field widths (`pcas[t].k`), on the tables' device.
    ///
    /// ```
    /// use recfuse::ops::{embedding::{EmbeddingBags, Pooling}, fdo};
    /// use recfuse::{DType, Device, Tensor};
    /// let dev = Device::cpu();
    /// // A 5 × 3 table whose rows lie on one line: FDO keeps one dimension.
    /// let t = Tensor::from_f32(&[1., 2., 3., 2., 4., 6., 0., 0., 0., -1., -2., -3., 3., 6., 9.], &[5, 3], DType::F32, &dev)?;
    /// let pca = fdo::analyse(&t, 0.95)?;
    /// let bags = EmbeddingBags::from_fdo(&["f0"], &[&t], &[pca], Pooling::Sum)?;
    /// assert_eq!(bags.output_dim(), 1);
    /// # Ok::<(), recfuse::Error>(())
    /// ```
    pub fn from_fdo(
        names: &[&str],
        tables: &[&Tensor],
        pcas: &[FieldPca],
        pooling: Pooling,
    ) -> Result<EmbeddingBags> {
        const OP: &str = "EmbeddingBags::from_fdo";
        if names.len() != tables.len() || pcas.len() != tables.len() {
            return Err(Error::invalid(
                OP,
                "pcas",
                format!(
                    "{} names, {} tables and {} PCAs: one of each per field",
                    names.len(),
                    tables.len(),
                    pcas.len()
                ),
            ));
        }
        let projected: Vec<Tensor> = tables
            .iter()
            .zip(pcas)
            .map(|(t, p)| fdo::project(t, p))
            .collect::<Result<_>>()?;
        let specs: Vec<TableSpec> = names
            .iter()
            .zip(&projected)
            .map(|(n, t)| TableSpec::new(*n, t.shape()[0], t.shape()[1]))
            .collect();
        let refs: Vec<&Tensor> = projected.iter().collect();
        Self::from_tables(&specs, &refs, pooling)
    }

    fn assemble(
        specs: &[TableSpec],
        pooling: Pooling,
        layout: Vec<TableLayout>,
        weights: Tensor,
    ) -> Result<EmbeddingBags> {
        let meta = words_on(&meta_words(&layout), &weights.device())?;
        let total_dim = layout.iter().map(|l| l.dim).sum();
        let total_rows = layout.iter().map(|l| l.rows).sum();
        Ok(EmbeddingBags {
            specs: specs.to_vec(),
            pooling,
            layout,
            meta,
            weights,
            total_dim,
            total_rows,
        })
    }

    pub fn specs(&self) -> &[TableSpec] {
        &self.specs
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype()
    }

    pub fn device(&self) -> Device {
        self.weights.device()
    }

    /// Σ dim_t: the width of the pooled output.
    pub fn output_dim(&self) -> usize {
        self.total_dim
    }

    /// Σ rows_t: the length of the row-wise Adagrad state.
    pub fn total_rows(&self) -> usize {
        self.total_rows
    }

    /// Where every table lives in the flat buffer (for checkpoints, which move whole tables).
    pub(crate) fn layout(&self) -> &[TableLayout] {
        &self.layout
    }

    /// Column range of table t in the pooled output.
    pub fn columns(&self, t: usize) -> Option<std::ops::Range<usize>> {
        self.layout.get(t).map(|l| l.col_off..l.col_off + l.dim)
    }

    /// The flat weight buffer (rows of table t start at its element offset, `pitch` apart;
    /// see the module docs). For dense optimizers together with [`Self::backward_dense`].
    pub fn weights(&self) -> &Tensor {
        &self.weights
    }

    /// Mutable access to the flat weights (e.g. for a dense optimizer step).
    pub fn weights_mut(&mut self) -> &mut Tensor {
        &mut self.weights
    }

    /// Table t as its own `[rows, dim]` tensor (a device copy: for checkpoints and FDO).
    pub fn table(&self, t: usize) -> Result<Tensor> {
        self.table_of(&self.weights, t)
    }

    /// Table t's block of any flat tensor laid out like [`Self::weights`] (e.g. the gradient
    /// of [`Self::backward_dense`]), as a `[rows, dim]` tensor (a device copy).
    pub fn table_of(&self, flat: &Tensor, t: usize) -> Result<Tensor> {
        const OP: &str = "EmbeddingBags::table_of";
        let l = self.layout.get(t).ok_or_else(|| {
            Error::invalid(OP, "t", format!("{t} ≥ {} tables", self.layout.len()))
        })?;
        if flat.shape() != [self.weights.numel()] {
            return Err(Error::shape(
                OP,
                "flat",
                format!("[{}] (the bags' flat layout)", self.weights.numel()),
                flat.shape(),
            ));
        }
        backend::same_device(OP, "flat", &self.device(), flat)?;
        crate::ops::glue::read_rows(flat, l.elem_off, l.pitch, l.rows, l.dim)
    }

    /// Overwrites table t with `src` (`[rows, dim]`, the bags' dtype and device).
    pub fn set_table(&mut self, t: usize, src: &Tensor) -> Result<()> {
        const OP: &str = "EmbeddingBags::set_table";
        let l = *self.layout.get(t).ok_or_else(|| {
            Error::invalid(OP, "t", format!("{t} ≥ {} tables", self.layout.len()))
        })?;
        if src.shape() != [l.rows, l.dim] {
            return Err(Error::shape(
                OP,
                "src",
                format!("[{}, {}]", l.rows, l.dim),
                src.shape(),
            ));
        }
        if src.dtype() != self.dtype() {
            return Err(Error::DType {
                op: OP,
                arg: "src",
                expected: self.dtype().to_string(),
                actual: src.dtype(),
            });
        }
        backend::same_device(OP, "src", &self.device(), src)?;
        crate::ops::glue::write_rows(&mut self.weights, l.elem_off, l.pitch, src)
    }

    /// Zeros for the row-wise Adagrad state: `[total_rows]` f32 on the bags' device.
    pub fn rowwise_adagrad_state(&self) -> Result<Tensor> {
        Tensor::zeros(&[self.total_rows], DType::F32, &self.device())
    }

    /// Validates and prepares one batch (FBGEMM layout, see the module docs): `offsets` has
    /// `T·B + 1` entries starting at 0 and ending at `indices.len()`; `per_sample_weights`,
    /// sum pooling only, has one weight per index. On a GPU this is the step's one upload of
    /// lookup data.
    pub fn batch(
        &self,
        indices: &[i64],
        offsets: &[i64],
        per_sample_weights: Option<&[f32]>,
    ) -> Result<BagBatch> {
        const OP: &str = "EmbeddingBags::batch";
        let t_count = self.layout.len();
        let nnz = indices.len();
        if offsets.is_empty() || (offsets.len() - 1) % t_count != 0 {
            return Err(Error::shape(
                OP,
                "offsets",
                format!("T·B + 1 entries with T = {t_count} tables"),
                &[offsets.len()],
            ));
        }
        let b = (offsets.len() - 1) / t_count;
        if offsets[0] != 0 || offsets[offsets.len() - 1] != nnz as i64 {
            return Err(Error::invalid(
                OP,
                "offsets",
                format!(
                    "must start at 0 and end at indices.len() = {nnz} (got {} … {})",
                    offsets[0],
                    offsets[offsets.len() - 1]
                ),
            ));
        }
        if let Some(k) = offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(Error::invalid(
                OP,
                "offsets",
                format!(
                    "decrease at {k}: {} > {} (offsets must be non-decreasing)",
                    offsets[k],
                    offsets[k + 1]
                ),
            ));
        }
        if let Some(w) = per_sample_weights {
            if self.pooling != Pooling::Sum {
                return Err(Error::invalid(
                    OP,
                    "per_sample_weights",
                    "only with Pooling::Sum (as PyTorch's EmbeddingBag)",
                ));
            }
            if w.len() != nnz {
                return Err(Error::shape(
                    OP,
                    "per_sample_weights",
                    format!("[{nnz}] (one per index)"),
                    &[w.len()],
                ));
            }
        }
        // Sections: bag_off [T·B + 1], idx [nnz], wgt [nnz], seg_table [U], seg_row [U],
        // seg_off [U + 1], occ_bag [nnz], occ_wgt [nnz].
        let n_bags = t_count * b;
        let words_fixed = (n_bags + 1)
            .checked_add(
                nnz.checked_mul(4)
                    .ok_or_else(|| too_big(OP, "indices", "4·nnz"))?,
            )
            .filter(|&w| w <= MAX_INDEX)
            .ok_or_else(|| too_big(OP, "indices", "the batch's word count"))?;
        if b.checked_mul(self.total_dim).is_none_or(|n| n > MAX_INDEX) {
            return Err(too_big(OP, "offsets", "B · output width"));
        }
        let mut idx = Vec::with_capacity(nnz);
        let mut wgt = Vec::with_capacity(nnz);
        // (flat row, position) per lookup, and each lookup's sample.
        let mut occ: Vec<(u32, u32)> = Vec::with_capacity(nnz);
        let mut sample_of = vec![0u32; nnz];
        for t in 0..t_count {
            let l = &self.layout[t];
            for s in 0..b {
                let bag = t * b + s;
                let (lo, hi) = (offsets[bag] as usize, offsets[bag + 1] as usize);
                let scale = match self.pooling {
                    Pooling::Mean if hi > lo => 1.0 / (hi - lo) as f32,
                    _ => 1.0,
                };
                for (j, &ix) in indices.iter().enumerate().take(hi).skip(lo) {
                    if ix < 0 || ix as u64 >= l.rows as u64 {
                        return Err(Error::invalid(
                            OP,
                            "indices",
                            format!(
                                "indices[{j}] = {ix} is outside table {t} (`{}`, {} rows)",
                                self.specs[t].name, l.rows
                            ),
                        ));
                    }
                    idx.push(ix as u32);
                    wgt.push(per_sample_weights.map_or(1.0, |w| w[j]) * scale);
                    occ.push(((l.rows_off + ix as usize) as u32, j as u32));
                    sample_of[j] = s as u32;
                }
            }
        }
        // Segments: each touched (table, row) once, in increasing flat row; occurrences in
        // increasing lookup position (a stable order, hence a fixed summation order).
        occ.sort_unstable();
        let mut seg_table = Vec::new();
        let mut seg_row = Vec::new();
        let mut seg_off = Vec::new();
        let mut occ_bag = Vec::with_capacity(nnz);
        let mut occ_wgt = Vec::with_capacity(nnz);
        let mut table = 0usize;
        for (k, &(flat, j)) in occ.iter().enumerate() {
            if k == 0 || occ[k - 1].0 != flat {
                while self.layout[table].rows_off + self.layout[table].rows <= flat as usize {
                    table += 1;
                }
                seg_table.push(table as u32);
                seg_row.push(flat - self.layout[table].rows_off as u32);
                seg_off.push(k as u32);
            }
            occ_bag.push(sample_of[j as usize]);
            occ_wgt.push(wgt[j as usize]);
        }
        seg_off.push(nnz as u32);
        let u = seg_table.len();
        let total = words_fixed
            .checked_add(3 * u + 1)
            .filter(|&w| w <= MAX_INDEX)
            .ok_or_else(|| too_big(OP, "indices", "the batch's word count"))?;
        let mut at = Sections::default();
        let mut words: Vec<u32> = Vec::with_capacity(total);
        let put = |words: &mut Vec<u32>, v: &mut dyn Iterator<Item = u32>| -> usize {
            let start = words.len();
            words.extend(v);
            start
        };
        at.bag_off = put(&mut words, &mut offsets.iter().map(|&o| o as u32));
        at.idx = put(&mut words, &mut idx.iter().copied());
        at.wgt = put(&mut words, &mut wgt.iter().map(|w| w.to_bits()));
        at.seg_table = put(&mut words, &mut seg_table.iter().copied());
        at.seg_row = put(&mut words, &mut seg_row.iter().copied());
        at.seg_off = put(&mut words, &mut seg_off.iter().copied());
        at.occ_bag = put(&mut words, &mut occ_bag.iter().copied());
        at.occ_wgt = put(&mut words, &mut occ_wgt.iter().map(|w| w.to_bits()));
        at.words = words.len();
        let dev = self.device();
        let device_words = words_on(&words, &dev)?;
        Ok(BagBatch {
            batch: b,
            nnz,
            segments: u,
            words,
            at,
            device_words,
            table_rows: self.layout.iter().map(|l| l.rows).collect(),
            device: dev,
        })
    }

    fn check_batch(&self, op: &'static str, batch: &BagBatch) -> Result<()> {
        let rows: Vec<usize> = self.layout.iter().map(|l| l.rows).collect();
        if batch.table_rows != rows {
            return Err(Error::invalid(
                op,
                "batch",
                format!(
                    "built for tables with {:?} rows, these bags have {rows:?}",
                    batch.table_rows
                ),
            ));
        }
        if batch.device != self.device() {
            return Err(Error::DeviceMismatch {
                op,
                arg: "batch",
                expected: self.device().describe(),
                actual: batch.device.describe(),
            });
        }
        Ok(())
    }

    fn plan<'a>(&'a self, batch: &'a BagBatch) -> EmbPlan<'a> {
        EmbPlan {
            batch,
            layout: &self.layout,
            meta: self.meta.as_ref(),
            total_dim: self.total_dim,
        }
    }

    /// Pooled embeddings `[B, output_dim]` in the tables' dtype (f32 accumulation).
    pub fn forward(&self, batch: &BagBatch) -> Result<Tensor> {
        let mut out = Tensor::zeros(&[batch.batch, self.total_dim], self.dtype(), &self.device())?;
        self.forward_into(batch, &mut out)?;
        Ok(out)
    }

    /// [`Self::forward`] into a caller-owned `[B, output_dim]` tensor of the tables' dtype
    /// (every element is written).
    pub fn forward_into(&self, batch: &BagBatch, out: &mut Tensor) -> Result<()> {
        const OP: &str = "EmbeddingBags::forward";
        self.check_batch(OP, batch)?;
        let want = [batch.batch, self.total_dim];
        if out.shape() != want {
            return Err(Error::shape(OP, "out", format!("{want:?}"), out.shape()));
        }
        if out.dtype() != self.dtype() {
            return Err(Error::DType {
                op: OP,
                arg: "out",
                expected: format!("{} (the tables' dtype)", self.dtype()),
                actual: out.dtype(),
            });
        }
        backend::same_device(OP, "out", &self.device(), out)?;
        if out.numel() == 0 {
            return Ok(());
        }
        backend::embedding_forward(&self.device(), &self.plan(batch), &self.weights, out)
    }

    fn check_dy(&self, op: &'static str, batch: &BagBatch, dy: &Tensor) -> Result<()> {
        self.check_batch(op, batch)?;
        let want = [batch.batch, self.total_dim];
        if dy.shape() != want {
            return Err(Error::shape(op, "dy", format!("{want:?}"), dy.shape()));
        }
        backend::same_device(op, "dy", &self.device(), dy)
    }

    /// The f32 gradient of the whole flat weight buffer (zeros outside the batch's rows and
    /// in the pad elements), for a dense optimizer on [`Self::weights_mut`]. Prefer the fused
    /// sparse updates: this touches every weight.
    pub fn backward_dense(&self, batch: &BagBatch, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "EmbeddingBags::backward_dense";
        self.check_dy(OP, batch, dy)?;
        let mut grad = Tensor::zeros(&[self.weights.numel()], DType::F32, &self.device())?;
        if batch.segments == 0 {
            return Ok(grad);
        }
        backend::embedding_grad(&self.device(), &self.plan(batch), dy, &mut grad)?;
        Ok(grad)
    }

    /// Backward fused with SGD on the batch's rows only: `w ← w − lr·(g + weight_decay·w)`
    /// for every touched row (FBGEMM's `EXACT_SGD`; decay applies to touched rows only).
    pub fn update_sgd(
        &mut self,
        batch: &BagBatch,
        dy: &Tensor,
        lr: f32,
        weight_decay: f32,
    ) -> Result<()> {
        const OP: &str = "EmbeddingBags::update_sgd";
        self.check_dy(OP, batch, dy)?;
        scalar(OP, "lr", lr)?;
        scalar(OP, "weight_decay", weight_decay)?;
        let upd = RowUpdate::Sgd { lr, weight_decay };
        self.update(batch, dy, upd, None)
    }

    /// Backward fused with exact row-wise Adagrad (FBGEMM `EXACT_ROWWISE_ADAGRAD`, the same
    /// formula as [`crate::ops::optim::rowwise_adagrad_step`]) on the batch's rows only;
    /// `state` is `[total_rows]` f32 ([`Self::rowwise_adagrad_state`]).
    pub fn update_rowwise_adagrad(
        &mut self,
        batch: &BagBatch,
        dy: &Tensor,
        cfg: &RowwiseAdagradConfig,
        state: &mut Tensor,
    ) -> Result<()> {
        const OP: &str = "EmbeddingBags::update_rowwise_adagrad";
        self.check_dy(OP, batch, dy)?;
        scalar(OP, "lr", cfg.lr)?;
        scalar(OP, "eps", cfg.eps)?;
        scalar(OP, "weight_decay", cfg.weight_decay)?;
        if cfg.eps <= 0.0 {
            return Err(Error::invalid(
                OP,
                "eps",
                format!("{} must be > 0", cfg.eps),
            ));
        }
        if state.shape() != [self.total_rows] || state.dtype() != DType::F32 {
            return Err(Error::shape(
                OP,
                "state",
                format!("[{}] f32 (one per row of every table)", self.total_rows),
                state.shape(),
            ));
        }
        backend::same_device(OP, "state", &self.device(), state)?;
        let upd = RowUpdate::RowwiseAdagrad {
            lr: cfg.lr,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        };
        self.update(batch, dy, upd, Some(state))
    }

    fn update(
        &mut self,
        batch: &BagBatch,
        dy: &Tensor,
        upd: RowUpdate,
        state: Option<&mut Tensor>,
    ) -> Result<()> {
        if batch.segments == 0 {
            return Ok(());
        }
        let dev = self.device();
        let plan = EmbPlan {
            batch,
            layout: &self.layout,
            meta: self.meta.as_ref(),
            total_dim: self.total_dim,
        };
        backend::embedding_update(&dev, &plan, upd, dy, &mut self.weights, state)
    }
}

fn scalar(op: &'static str, arg: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            arg,
            format!("{v} must be finite and ≥ 0"),
        ))
    }
}

/// The lanes of one row's update: the kernels give each of a row's column pairs to lane
/// `m mod LANES` and reduce the lanes' partial sums of squares with a fixed tree; the CPU
/// follows the same order so every backend rounds the same sums.
pub(crate) const LANES: usize = 64;
