//! The fused in-batch softmax loss on every backend present:
//! `cargo bench --bench inbatch_softmax`.
//!
//! Groups are `backend/inbatch_softmax/dtype/b{B}_n{N}_d{d}` with `fwd` (`InBatchSoftmax::
//! forward`: per-row statistics and the loss) and `fwd_bwd` (forward, then `backward`: query and
//! candidate gradients). `scripts/baselines/inbatch_softmax.py` prints PyTorch's numbers (the
//! naive loss on materialised logits, eager and `torch.compile`) under the same names.
//!
//! Realistic two-tower settings, the same on both sides: B queries, N columns (row i targets
//! column i; columns B..N are extra negatives), L2-normalised queries and candidates, κ = 20,
//! logQ correction and accidental-hit removal. Item ids follow a fixed popularity-skewed
//! formula, `id_j = ⌊(N/2)·frac(j·0.6180339887498949)²⌋` (small ids are popular, so ids repeat
//! and accidental hits occur), and `logQ_j = ln(number of columns with id_j)`.
//!
//! **Throughput is FLOP/s** (`Throughput::Elements`), the count: `fwd` 2·B·N·d (the
//! logit GEMM), `fwd_bwd` 8·B·N·d (forward, recomputed logits and the two gradient products).
//! The same count is used for PyTorch, so ratios are inverse time ratios.
//!
//! **Peak extra memory** is *computed from the shapes, not measured* (there is no allocator
//! hook): each group prints one `recfuse bench: extra memory` line. The fused loss keeps O(B)
//! statistics (LSE, target logit, p, target index: 16 B per row; backward adds the row
//! coefficients, 4 B per row) plus the gradients it returns, `dq` `[B, d]` (f32, and a copy in
//! the queries' dtype when that is not f32) and the f32 column gradient `dc` `[N, d]`; never
//! the B×N logits. Backend workspace beyond that (the CPU seam's f32, normalised copies of q and
//! c; CUDA's split partials) is named in the line but not in the total.
//!
//! Shapes: CPU f32 (B, N, d) = (1024, 8192, 64) (plus the GPU shape with
//! `RECFUSE_BENCH_LARGE=1`); GPUs (8192, 65536, 128) in bf16 and f32.

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use recfuse::ops::inbatch_softmax::{Columns, InBatchSoftmax, RowKind, Rows};
use recfuse::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    b: usize,
    n: usize,
    d: usize,
}

const fn case(dtype: DType, b: usize, n: usize, d: usize) -> Case {
    Case { dtype, b, n, d }
}

const CPU_CASES: &[Case] = &[case(DType::F32, 1024, 8192, 64)];
const LARGE_CPU_CASES: &[Case] = &[case(DType::F32, 8192, 65536, 128)];
const GPU_CASES: &[Case] = &[
    case(DType::BF16, 8192, 65536, 128),
    case(DType::F32, 8192, 65536, 128),
];

/// κ = 1/τ: a typical learned two-tower temperature (τ = 0.05).
const KAPPA: f32 = 20.0;

impl Case {
    fn name(&self) -> String {
        format!(
            "inbatch_softmax/{}/b{}_n{}_d{}",
            self.dtype.name(),
            self.b,
            self.n,
            self.d
        )
    }

    fn fwd_flops(&self) -> u64 {
        2 * (self.b * self.n * self.d) as u64
    }

    fn tiny(&self) -> Case {
        Case {
            b: 8,
            n: 24,
            d: 16,
            ..*self
        }
    }

    /// (forward bytes, forward+backward bytes) the fused loss allocates beyond its inputs.
    fn extra_bytes(&self) -> (u64, u64) {
        let (b, n, d) = (self.b as u64, self.n as u64, self.d as u64);
        let stats = 16 * b;
        let dq = 4 * b * d
            + if self.dtype == DType::F32 {
                0
            } else {
                self.dtype.size() as u64 * b * d
            };
        (stats, stats + 4 * b + dq + 4 * n * d)
    }
}

/// The item id of column j (popularity-skewed; `scripts/baselines/inbatch_softmax.py` uses the
/// same formula).
fn item_id(j: usize, n: usize) -> i64 {
    let f = (j as f64 * 0.618_033_988_749_894_9).fract();
    ((n / 2) as f64 * f * f).floor() as i64
}

struct Problem {
    loss: InBatchSoftmax,
    q: Tensor,
    c: Tensor,
    target: Vec<u32>,
    kind: Vec<RowKind>,
    weight: Vec<f32>,
    ids: Vec<i64>,
    log_q: Vec<f32>,
}

impl Problem {
    fn new(dev: &Device, c: Case) -> recfuse::Result<Problem> {
        assert!(c.b <= c.n, "row i targets column i");
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut rand = |n: usize| {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect::<Vec<f32>>()
        };
        let q = Tensor::from_f32(&rand(c.b * c.d), &[c.b, c.d], c.dtype, dev)?;
        let emb = Tensor::from_f32(&rand(c.n * c.d), &[c.n, c.d], c.dtype, dev)?;
        let ids: Vec<i64> = (0..c.n).map(|j| item_id(j, c.n)).collect();
        let mut count: HashMap<i64, u32> = HashMap::new();
        for &id in &ids {
            *count.entry(id).or_default() += 1;
        }
        let log_q = ids.iter().map(|id| (count[id] as f32).ln()).collect();
        Ok(Problem {
            loss: InBatchSoftmax {
                kappa: KAPPA,
                l2_normalize: true,
                remove_accidental_hits: true,
                ..Default::default()
            },
            q,
            c: emb,
            target: (0..c.b as u32).collect(),
            kind: vec![RowKind::Pos; c.b],
            weight: vec![1.0; c.b],
            ids,
            log_q,
        })
    }

    fn rows(&self) -> Rows<'_> {
        Rows {
            queries: &self.q,
            target: &self.target,
            kind: &self.kind,
            weight: &self.weight,
            query_ids: None,
        }
    }

    fn cols(&self) -> Columns<'_> {
        Columns {
            emb: &self.c,
            log_q: Some(&self.log_q),
            ids: Some(&self.ids),
            valid: None,
            query_ids: None,
        }
    }

    fn forward(&self) -> recfuse::Result<()> {
        black_box(self.loss.forward(&self.rows(), &self.cols(), None)?);
        Ok(())
    }

    fn forward_backward(&self) -> recfuse::Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        let fwd = self.loss.forward(&rows, &cols, None)?;
        black_box(self.loss.backward(&rows, &cols, &fwd)?);
        Ok(())
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn bench_case(c: &mut Criterion, label: &str, dev: &Device, case: Case) {
    let group_name = format!("{label}/{}", case.name());
    if let Err(e) = Problem::new(dev, case.tiny()).and_then(|p| p.forward_backward()) {
        println!("recfuse bench: SKIPPED {group_name}: {e}");
        return;
    }
    let (fwd_bytes, all_bytes) = case.extra_bytes();
    let workspace = match label {
        "cpu" => format!(
            "the CPU seam also holds f32 L2-normalised copies of q and c, {:.1} MiB",
            mib(4 * ((case.b + case.n) * (case.d + 1)) as u64)
        ),
        "cuda" => "CUDA's column-split partials and norms are workspace on top".to_string(),
        _ => "backend workspace on top".to_string(),
    };
    println!(
        "recfuse bench: extra memory {group_name} (computed from shapes, not measured): \
         fwd {:.2} MiB (O(B) statistics), fwd_bwd {:.2} MiB (+ dq [B, d], f32 dc [N, d]); \
         the B×N logits ({:.1} MiB in f32) never exist; not counted: {workspace}",
        mib(fwd_bytes),
        mib(all_bytes),
        mib(4 * (case.b * case.n) as u64),
    );
    let mut group = c.benchmark_group(&group_name);
    group.sampling_mode(SamplingMode::Flat);
    let problem: RefCell<Option<Problem>> = RefCell::new(None);
    let with = |f: &mut dyn FnMut(&Problem)| {
        let mut slot = problem.borrow_mut();
        let p = slot.get_or_insert_with(|| {
            Problem::new(dev, case).unwrap_or_else(|e| panic!("{group_name}: setup: {e}"))
        });
        f(p)
    };
    group.throughput(Throughput::Elements(case.fwd_flops()));
    group.bench_function("fwd", |b| {
        with(&mut |p| b.iter_custom(|iters| common::timed(dev, iters, || p.forward())))
    });
    group.throughput(Throughput::Elements(4 * case.fwd_flops()));
    group.bench_function("fwd_bwd", |b| {
        with(&mut |p| b.iter_custom(|iters| common::timed(dev, iters, || p.forward_backward())))
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    for (label, dev) in &common::backends() {
        let mut cases: Vec<Case> = if label == "cpu" {
            CPU_CASES.to_vec()
        } else {
            GPU_CASES.to_vec()
        };
        if label == "cpu" && common::large() {
            cases.extend_from_slice(LARGE_CPU_CASES);
        }
        for case in cases {
            bench_case(&mut c, label, dev, case);
        }
    }
    c.final_summary();
}
