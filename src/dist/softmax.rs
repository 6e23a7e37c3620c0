//! The in-batch softmax across W ranks.
//!
//! Forward: one `all_gather` of each rank's packed candidate rows (embedding, id, log q, the
//! owning query id), one tiny `all_reduce` of (Σw, Σwℓ); then the fused loss of this rank's
//! rows over all N columns, laid out rank-major: `[V_0 | … | V_{W−1} | X_0 | … | X_{W−1}]`.
//!
//! Backward (default): each rank computes the gradient of all N columns from its own rows, and
//! one `reduce_scatter(SUM)` in f32 returns each owner the sum for its own columns. With
//! `owner_computes`, ranks instead all-gather their rows' (query, LSE, a_i, target, …) — half
//! the bytes — and each computes its own columns' gradients from every row, in a fixed order:
//! bitwise reproducible from run to run with no dependence on a reduction's arrival order.
//!
//! **Loss-scaling convention.** `CrossForward::loss` is this rank's share
//! `Σ_{i ∈ rank} w_i ℓ_i / Z` with the *global* `Z = Σ_all w`; the shares sum to the global
//! loss, and the returned gradients are exactly those of the global loss (for this rank's
//! queries and its own candidates). A DDP-style trainer that averages parameter gradients over
//! ranks must therefore multiply the loss (or these gradients) by W before its all-reduce-mean.

use super::Communicator;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::inbatch_softmax::{
    Columns, InBatchSoftmax, Reduction, RowKind, Rows, SoftmaxForward,
};
use crate::tensor::Tensor;

const OP: &str = "CrossDeviceSoftmax";

/// One rank's batch.
#[derive(Clone, Copy, Debug)]
pub struct CrossBatch<'a> {
    /// `[B_r, d]` queries.
    pub queries: &'a Tensor,
    /// `[B_r, d]` their positive items (row i's target).
    pub positives: &'a Tensor,
    pub pos_ids: &'a [i64],
    pub pos_log_q: Option<&'a [f32]>,
    /// `[M_r, d]` extra negatives (uniform or hard: mixed negative sampling).
    pub negatives: Option<&'a Tensor>,
    pub neg_ids: &'a [i64],
    pub neg_log_q: Option<&'a [f32]>,
    pub kind: &'a [RowKind],
    pub weight: &'a [f32],
    /// Per-row query (user) ids for same-user masking.
    pub query_ids: Option<&'a [i64]>,
}

/// The cross-device loss: the single-device loss options plus how backward communicates.
#[derive(Clone, Debug, Default)]
pub struct CrossDeviceSoftmax {
    pub loss: InBatchSoftmax,
    /// Owner-computes backward (deterministic, half the bytes; see the module docs).
    pub owner_computes: bool,
}

/// What forward produced and keeps for backward.
#[derive(Debug)]
pub struct CrossForward {
    /// This rank's share of the loss (the shares sum to the global loss).
    pub loss: f64,
    /// The global loss (all ranks), for logging.
    pub global_loss: f64,
    /// The global normaliser Z.
    pub z: f64,
    cols: Gathered,
    target: Vec<u32>,
    stats: SoftmaxForward,
}

/// Gradients for this rank.
#[derive(Debug)]
pub struct CrossGrads {
    /// `[B_r, d]` query gradients (queries' dtype).
    pub dq: Tensor,
    /// `[B_r, d]` f32 gradients of this rank's positives (summed over every rank's rows).
    pub d_pos: Tensor,
    /// `[M_r, d]` f32 gradients of this rank's extra negatives.
    pub d_neg: Option<Tensor>,
    /// ∂L/∂κ of the global loss (identical on every rank).
    pub dkappa: f32,
}

#[derive(Debug)]
struct Gathered {
    emb: Tensor,
    ids: Vec<i64>,
    log_q: Option<Vec<f32>>,
    qid: Option<Vec<i64>>,
    pos_counts: Vec<usize>,
    neg_counts: Vec<usize>,
}

/// A little-endian byte writer/reader for the packed messages.
struct Packer(Vec<u8>);
impl Packer {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
}
struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn u64(&mut self) -> Result<u64> {
        if self.0.len() < 8 {
            return Err(Error::invalid(OP, "message", "truncated"));
        }
        let (h, t) = self.0.split_at(8);
        self.0 = t;
        let mut a = [0u8; 8];
        a.copy_from_slice(h);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u64()? as usize;
        if self.0.len() < n {
            return Err(Error::invalid(OP, "message", "truncated"));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h.to_vec())
    }
}

fn dtype_code(d: DType) -> u64 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

impl CrossDeviceSoftmax {
    fn check(&self, b: &CrossBatch<'_>) -> Result<(usize, usize, usize)> {
        let qs = b.queries.shape();
        if qs.len() != 2 {
            return Err(Error::shape(OP, "queries", "[B_r, d]", qs));
        }
        let (br, d) = (qs[0], qs[1]);
        if b.positives.shape() != [br, d] {
            return Err(Error::shape(
                OP,
                "positives",
                format!("[{br}, {d}]"),
                b.positives.shape(),
            ));
        }
        if b.positives.dtype() != b.queries.dtype() {
            return Err(Error::DType {
                op: OP,
                arg: "positives",
                expected: b.queries.dtype().to_string(),
                actual: b.positives.dtype(),
            });
        }
        let mr = match b.negatives {
            Some(n) => {
                if n.shape().len() != 2 || n.shape()[1] != d {
                    return Err(Error::shape(
                        OP,
                        "negatives",
                        format!("[M_r, {d}]"),
                        n.shape(),
                    ));
                }
                if n.dtype() != b.queries.dtype() {
                    return Err(Error::DType {
                        op: OP,
                        arg: "negatives",
                        expected: b.queries.dtype().to_string(),
                        actual: n.dtype(),
                    });
                }
                n.shape()[0]
            }
            None => 0,
        };
        let len = |arg: &'static str, got: usize, want: usize| {
            if got != want {
                Err(Error::shape(OP, arg, format!("[{want}]"), &[got]))
            } else {
                Ok(())
            }
        };
        len("pos_ids", b.pos_ids.len(), br)?;
        len("neg_ids", b.neg_ids.len(), mr)?;
        len("kind", b.kind.len(), br)?;
        len("weight", b.weight.len(), br)?;
        if let Some(v) = b.pos_log_q {
            len("pos_log_q", v.len(), br)?;
        }
        if let Some(v) = b.neg_log_q {
            len("neg_log_q", v.len(), mr)?;
        }
        if let Some(v) = b.query_ids {
            len("query_ids", v.len(), br)?;
        }
        // With extra negatives, logQ is given for both kinds of column or for neither; with
        // none, `neg_log_q` has nothing to describe.
        if mr > 0 && b.pos_log_q.is_some() != b.neg_log_q.is_some() {
            return Err(Error::invalid(
                OP,
                "neg_log_q",
                "give log q for positives and negatives, or for neither",
            ));
        }
        Ok((br, mr, d))
    }

    fn gather(
        &self,
        comm: &dyn Communicator,
        b: &CrossBatch<'_>,
        br: usize,
        mr: usize,
        d: usize,
    ) -> Result<Gathered> {
        let mut p = Packer(Vec::new());
        for v in [
            br as u64,
            mr as u64,
            d as u64,
            dtype_code(b.queries.dtype()),
            b.pos_log_q.is_some() as u64,
            b.query_ids.is_some() as u64,
        ] {
            p.u64(v);
        }
        p.bytes(&b.positives.to_bytes()?);
        p.bytes(&match b.negatives {
            Some(n) => n.to_bytes()?,
            None => Vec::new(),
        });
        p.bytes(bytemuck::cast_slice(b.pos_ids));
        p.bytes(bytemuck::cast_slice(b.neg_ids));
        p.bytes(bytemuck::cast_slice(b.pos_log_q.unwrap_or(&[])));
        p.bytes(bytemuck::cast_slice(b.neg_log_q.unwrap_or(&[])));
        p.bytes(bytemuck::cast_slice(b.query_ids.unwrap_or(&[])));
        let all = comm.all_gather_bytes(&p.0)?;
        let me = [
            br as u64,
            mr as u64,
            d as u64,
            dtype_code(b.queries.dtype()),
            b.pos_log_q.is_some() as u64,
            b.query_ids.is_some() as u64,
        ];
        let (mut pos_emb, mut neg_emb) = (Vec::new(), Vec::new());
        let (mut pos_ids, mut neg_ids, mut pos_lq, mut neg_lq, mut qid) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut pos_counts, mut neg_counts) = (Vec::new(), Vec::new());
        for (r, msg) in all.iter().enumerate() {
            let mut rd = Reader(msg);
            let h: Vec<u64> = (0..6).map(|_| rd.u64()).collect::<Result<_>>()?;
            if h[2..] != me[2..] {
                return Err(Error::invalid(
                    OP,
                    "batch",
                    format!(
                        "rank {r} sent (d, dtype, logq, qid) = {:?}, this rank has {:?}",
                        &h[2..],
                        &me[2..]
                    ),
                ));
            }
            pos_counts.push(h[0] as usize);
            neg_counts.push(h[1] as usize);
            pos_emb.extend(rd.bytes()?);
            neg_emb.extend(rd.bytes()?);
            pos_ids.extend(bytemuck::pod_collect_to_vec::<u8, i64>(&rd.bytes()?));
            neg_ids.extend(bytemuck::pod_collect_to_vec::<u8, i64>(&rd.bytes()?));
            pos_lq.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&rd.bytes()?));
            neg_lq.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&rd.bytes()?));
            qid.extend(bytemuck::pod_collect_to_vec::<u8, i64>(&rd.bytes()?));
        }
        let n = pos_ids.len() + neg_ids.len();
        pos_emb.extend(neg_emb);
        let host = crate::tensor::CpuStorage::from_bytes(b.queries.dtype(), &pos_emb);
        if host.len() != n * d {
            return Err(Error::invalid(
                OP,
                "batch",
                "gathered embeddings do not match the gathered ids",
            ));
        }
        let emb = Tensor::from_f32(
            &host.to_f32(),
            &[n, d],
            b.queries.dtype(),
            &b.queries.device(),
        )?;
        let n_neg = neg_ids.len();
        pos_ids.extend(neg_ids);
        pos_lq.extend(neg_lq);
        qid.extend(std::iter::repeat_n(-1, n_neg));
        Ok(Gathered {
            emb,
            ids: pos_ids,
            log_q: b.pos_log_q.map(|_| pos_lq),
            qid: b.query_ids.map(|_| qid),
            pos_counts,
            neg_counts,
        })
    }

    fn columns<'a>(&self, g: &'a Gathered) -> Columns<'a> {
        Columns {
            emb: &g.emb,
            log_q: g.log_q.as_deref(),
            ids: Some(&g.ids),
            valid: None,
            query_ids: g.qid.as_deref(),
        }
    }

    /// Forward on this rank (every rank calls it, collectively).
    pub fn forward(&self, comm: &dyn Communicator, batch: &CrossBatch<'_>) -> Result<CrossForward> {
        let (br, mr, d) = self.check(batch)?;
        let cols = self.gather(comm, batch, br, mr, d)?;
        let offset: usize = cols.pos_counts[..comm.rank()].iter().sum();
        let target: Vec<u32> = (0..br).map(|i| (offset + i) as u32).collect();
        let rows = Rows {
            queries: batch.queries,
            target: &target,
            kind: batch.kind,
            weight: batch.weight,
            query_ids: batch.query_ids,
        };
        // Σ w ℓ locally (z = 1), then one all-reduce of (Σw, Σwℓ) for the global normaliser.
        let mut stats = self.loss.forward(&rows, &self.columns(&cols), Some(1.0))?;
        let local_wl = match self.loss.reduction {
            Reduction::Mean => stats.loss,
            Reduction::Sum => stats.loss,
        };
        let mut sums = [stats.weight_sum as f32, local_wl as f32];
        comm.all_reduce_sum(&mut sums)?;
        let z = match self.loss.reduction {
            Reduction::Mean => sums[0] as f64,
            Reduction::Sum => 1.0,
        };
        let z_safe = if z > 0.0 { z } else { 1.0 };
        stats.z = z_safe;
        stats.loss = local_wl / z_safe;
        Ok(CrossForward {
            loss: stats.loss,
            global_loss: sums[1] as f64 / z_safe,
            z: z_safe,
            cols,
            target,
            stats,
        })
    }

    /// Backward on this rank (collective).
    pub fn backward(
        &self,
        comm: &dyn Communicator,
        batch: &CrossBatch<'_>,
        fwd: &CrossForward,
    ) -> Result<CrossGrads> {
        let (br, mr, d) = self.check(batch)?;
        let g = &fwd.cols;
        let cols = self.columns(g);
        let rows = Rows {
            queries: batch.queries,
            target: &fwd.target,
            kind: batch.kind,
            weight: batch.weight,
            query_ids: batch.query_ids,
        };
        let (dq, dk_local) = self.loss.query_grads(&rows, &cols, &fwd.stats)?;
        let world = comm.world_size();
        let n_pos: usize = g.pos_counts.iter().sum();
        let pos_off = |r: usize| g.pos_counts[..r].iter().sum::<usize>();
        let neg_off = |r: usize| n_pos + g.neg_counts[..r].iter().sum::<usize>();
        let own: Vec<f32> = if self.owner_computes {
            self.owner_columns(
                comm,
                batch,
                fwd,
                br,
                d,
                pos_off(comm.rank())..pos_off(comm.rank()) + br,
                neg_off(comm.rank())..neg_off(comm.rank()) + mr,
            )?
        } else {
            let a = self.loss.coeffs(&rows, &cols, &fwd.stats)?;
            let n = g.ids.len();
            let dc = self
                .loss
                .column_grads(&rows, &cols, &fwd.stats.lse, &a, 0..n)?
                .to_f32_vec()?;
            // Owner-major order [V_0, X_0 | V_1, X_1 | …] so block r of the reduce-scatter is
            // exactly rank r's columns.
            let mut send = Vec::with_capacity(dc.len());
            let mut counts = Vec::with_capacity(world);
            for r in 0..world {
                send.extend_from_slice(&dc[pos_off(r) * d..(pos_off(r) + g.pos_counts[r]) * d]);
                send.extend_from_slice(&dc[neg_off(r) * d..(neg_off(r) + g.neg_counts[r]) * d]);
                counts.push((g.pos_counts[r] + g.neg_counts[r]) * d);
            }
            comm.reduce_scatter_sum(&send, &counts)?
        };
        let mut dk = [dk_local];
        comm.all_reduce_sum(&mut dk)?;
        let dev = batch.queries.device();
        Ok(CrossGrads {
            dq,
            d_pos: Tensor::from_f32(&own[..br * d], &[br, d], DType::F32, &dev)?,
            d_neg: if batch.negatives.is_some() {
                Some(Tensor::from_f32(
                    &own[br * d..],
                    &[mr, d],
                    DType::F32,
                    &dev,
                )?)
            } else {
                None
            },
            dkappa: dk[0],
        })
    }

    /// Owner-computes: gather every rank's rows (query, target, kind, weight, qid, LSE, a_i)
    /// and compute this rank's own columns from all of them.
    #[allow(clippy::too_many_arguments)]
    fn owner_columns(
        &self,
        comm: &dyn Communicator,
        batch: &CrossBatch<'_>,
        fwd: &CrossForward,
        br: usize,
        d: usize,
        pos: std::ops::Range<usize>,
        neg: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let cols = self.columns(&fwd.cols);
        let rows = Rows {
            queries: batch.queries,
            target: &fwd.target,
            kind: batch.kind,
            weight: batch.weight,
            query_ids: batch.query_ids,
        };
        let a = self.loss.coeffs(&rows, &cols, &fwd.stats)?;
        let kinds: Vec<u8> = batch
            .kind
            .iter()
            .map(|k| (*k == RowKind::Ntr) as u8)
            .collect();
        let mut p = Packer(Vec::new());
        p.u64(br as u64);
        p.bytes(&batch.queries.to_bytes()?);
        p.bytes(bytemuck::cast_slice(&fwd.target));
        p.bytes(&kinds);
        p.bytes(bytemuck::cast_slice(batch.weight));
        p.bytes(bytemuck::cast_slice(batch.query_ids.unwrap_or(&[])));
        p.bytes(bytemuck::cast_slice(&fwd.stats.lse));
        p.bytes(bytemuck::cast_slice(&a));
        let all = comm.all_gather_bytes(&p.0)?;
        let (mut q, mut t, mut k, mut w, mut qid, mut lse, mut aa) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for msg in &all {
            let mut rd = Reader(msg);
            rd.u64()?;
            q.extend(rd.bytes()?);
            t.extend(bytemuck::pod_collect_to_vec::<u8, u32>(&rd.bytes()?));
            k.extend(
                rd.bytes()?
                    .into_iter()
                    .map(|b| if b == 1 { RowKind::Ntr } else { RowKind::Pos }),
            );
            w.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&rd.bytes()?));
            qid.extend(bytemuck::pod_collect_to_vec::<u8, i64>(&rd.bytes()?));
            lse.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&rd.bytes()?));
            aa.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&rd.bytes()?));
        }
        let b_all = t.len();
        let host = crate::tensor::CpuStorage::from_bytes(batch.queries.dtype(), &q);
        let qt = Tensor::from_f32(
            &host.to_f32(),
            &[b_all, d],
            batch.queries.dtype(),
            &batch.queries.device(),
        )?;
        let rows_all = Rows {
            queries: &qt,
            target: &t,
            kind: &k,
            weight: &w,
            query_ids: batch.query_ids.map(|_| qid.as_slice()),
        };
        let mut own = self
            .loss
            .column_grads(&rows_all, &cols, &lse, &aa, pos)?
            .to_f32_vec()?;
        own.extend(
            self.loss
                .column_grads(&rows_all, &cols, &lse, &aa, neg)?
                .to_f32_vec()?,
        );
        Ok(own)
    }
}
