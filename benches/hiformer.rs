//! Heterogeneous attention and Hiformer layers on every backend present:
//! `cargo bench --bench hiformer`.
//!
//! Groups are `backend/hetero_layer/dtype/b{B}_l{L}_d{d}` (`HeteroAttentionLayer`: per-token
//! Q/K/V projections) and `backend/hiformer_layer/dtype/b{B}_l{L}_d{d}` (`HiformerLayer`: the
//! low-rank composite Q/K/V), each with `fwd` (forward, keeping what backward needs) and
//! `fwd_bwd` (forward, then backward: `dx` and every parameter gradient).
//! `scripts/baselines/hiformer.py` prints PyTorch's numbers (einsum per-token projections +
//! `F.scaled_dot_product_attention`, eager and `torch.compile`) under the same names.
//!
//! Paper shapes (Gui et al. 2023): L = 38 tokens, d = 128, H = 4 heads, d_k = 16, d_v = 64,
//! FFN d_f = 512, ranks r_k = r_q = 128, r_v = 1024; no mask, no pruning, one weight set per
//! token, shared LayerNorm affine, exact GELU, scale 1/√d_k.
//!
//! **Throughput is FLOP/s** (`Throughput::Elements`), the spec's cost model (matrix products
//! only; softmax, LayerNorm, GELU and bias are O(B·L·d) noise), the same formula as the
//! PyTorch script:
//! * projections: heterogeneous `2·B·L·d·H·(2·d_k + d_v)`; Hiformer
//!   `2·B·L·d·(2·r_k + r_v) + 2·B·(2·r_k·L·H·d_k + r_v·L·H·d_v)` (down, then up);
//! * attention `2·B·H·L²·(d_k + d_v)`; output projection `2·B·L·H·d_v·d`; FFN `4·B·L·d·d_f`;
//! * `fwd_bwd` = 3 × forward (every product has two gradient products; attention's recompute
//!   of P is not counted).
//!
//! At B = 1024 that is 17.5 GFLOP (heterogeneous) and 48.1 GFLOP (Hiformer) per forward, the
//! spec's numbers.
//!
//! Shapes: GPUs B ∈ {1024, 4096} in bf16 and B = 1024 in f32; the CPU B = 256 f32 only (a
//! Hiformer fwd_bwd there is ≈ 36 GFLOP, seconds per call on two cores, so larger batches would
//! make a CPU run take many minutes; `RECFUSE_BENCH_LARGE=1` adds B = 1024).

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use recfuse::ops::hiformer::{HeteroAttentionLayer, HiformerLayer, LayerConfig, LayerParams};
use recfuse::{DType, Device, Tensor};

/// Paper shapes.
const L: usize = 38;
const D: usize = 128;
const H: usize = 4;
const DK: usize = 16;
const DV: usize = 64;
const DF: usize = 512;
const RK: usize = 128;
const RV: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Hetero,
    Hiformer,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    kind: Kind,
    dtype: DType,
    b: usize,
    /// Tokens, width, heads, d_k, d_v, d_f, r_k, r_v (the paper's, or a tiny probe).
    dims: [usize; 8],
}

const PAPER: [usize; 8] = [L, D, H, DK, DV, DF, RK, RV];

const fn case(kind: Kind, dtype: DType, b: usize) -> Case {
    Case {
        kind,
        dtype,
        b,
        dims: PAPER,
    }
}

const CPU_CASES: &[Case] = &[
    case(Kind::Hetero, DType::F32, 256),
    case(Kind::Hiformer, DType::F32, 256),
];
const LARGE_CPU_CASES: &[Case] = &[
    case(Kind::Hetero, DType::F32, 1024),
    case(Kind::Hiformer, DType::F32, 1024),
];
const GPU_CASES: &[Case] = &[
    case(Kind::Hetero, DType::BF16, 1024),
    case(Kind::Hetero, DType::BF16, 4096),
    case(Kind::Hetero, DType::F32, 1024),
    case(Kind::Hiformer, DType::BF16, 1024),
    case(Kind::Hiformer, DType::BF16, 4096),
    case(Kind::Hiformer, DType::F32, 1024),
];

impl Case {
    fn name(&self) -> String {
        let op = match self.kind {
            Kind::Hetero => "hetero_layer",
            Kind::Hiformer => "hiformer_layer",
        };
        let [l, d, ..] = self.dims;
        format!("{op}/{}/b{}_l{l}_d{d}", self.dtype.name(), self.b)
    }

    /// The spec's forward cost model (see the module docs).
    fn fwd_flops(&self) -> u64 {
        let [l, d, h, dk, dv, df, rk, rv] = self.dims.map(|v| v as u64);
        let b = self.b as u64;
        let proj = match self.kind {
            Kind::Hetero => 2 * b * l * d * h * (2 * dk + dv),
            Kind::Hiformer => {
                2 * b * l * d * (2 * rk + rv) + 2 * b * (2 * rk * l * h * dk + rv * l * h * dv)
            }
        };
        let attention = 2 * b * h * l * l * (dk + dv);
        let output = 2 * b * l * h * dv * d;
        let ffn = 4 * b * l * d * df;
        proj + attention + output + ffn
    }

    fn cfg(&self) -> LayerConfig {
        let [l, d, h, dk, dv, df, ..] = self.dims;
        LayerConfig {
            dtype: self.dtype,
            ..LayerConfig::new(l, d, h, dk, dv, df)
        }
    }

    fn tiny(&self) -> Case {
        Case {
            b: 3,
            dims: [5, 8, 2, 4, 6, 16, 6, 7],
            ..*self
        }
    }
}

enum Net {
    Hetero(HeteroAttentionLayer),
    Hiformer(HiformerLayer),
}

struct Layer {
    net: Net,
    params: LayerParams,
    x: Tensor,
    dz: Tensor,
}

impl Layer {
    fn new(dev: &Device, c: Case) -> recfuse::Result<Layer> {
        let cfg = c.cfg();
        let net = match c.kind {
            Kind::Hetero => Net::Hetero(HeteroAttentionLayer { cfg }),
            Kind::Hiformer => Net::Hiformer(HiformerLayer {
                cfg,
                rank_qk: c.dims[6],
                rank_v: c.dims[7],
            }),
        };
        let params = match &net {
            Net::Hetero(n) => n.init(1, dev)?,
            Net::Hiformer(n) => n.init(1, dev)?,
        };
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut rand = |n: usize| {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect::<Vec<f32>>()
        };
        let shape = [c.b, c.dims[0], c.dims[1]];
        let numel = shape.iter().product();
        let x = Tensor::from_f32(&rand(numel), &shape, c.dtype, dev)?;
        let dz = Tensor::from_f32(&rand(numel), &shape, c.dtype, dev)?;
        Ok(Layer { net, params, x, dz })
    }

    fn forward(&self) -> recfuse::Result<()> {
        let out = match &self.net {
            Net::Hetero(n) => n.forward(&self.x, &self.params, None)?,
            Net::Hiformer(n) => n.forward(&self.x, &self.params, None)?,
        };
        black_box(out);
        Ok(())
    }

    fn forward_backward(&self) -> recfuse::Result<()> {
        let grads = match &self.net {
            Net::Hetero(n) => {
                let (_z, saved) = n.forward(&self.x, &self.params, None)?;
                n.backward(&self.params, &saved, &self.dz)?
            }
            Net::Hiformer(n) => {
                let (_z, saved) = n.forward(&self.x, &self.params, None)?;
                n.backward(&self.params, &saved, &self.dz)?
            }
        };
        black_box(grads);
        Ok(())
    }
}

fn bench_case(c: &mut Criterion, label: &str, dev: &Device, case: Case) {
    let group_name = format!("{label}/{}", case.name());
    if let Err(e) = Layer::new(dev, case.tiny()).and_then(|l| l.forward_backward()) {
        println!("recfuse bench: SKIPPED {group_name}: {e}");
        return;
    }
    let mut group = c.benchmark_group(&group_name);
    group.sampling_mode(SamplingMode::Flat);
    let layer: RefCell<Option<Layer>> = RefCell::new(None);
    let with = |f: &mut dyn FnMut(&Layer)| {
        let mut slot = layer.borrow_mut();
        let l = slot.get_or_insert_with(|| {
            Layer::new(dev, case).unwrap_or_else(|e| panic!("{group_name}: setup: {e}"))
        });
        f(l)
    };
    group.throughput(Throughput::Elements(case.fwd_flops()));
    group.bench_function("fwd", |b| {
        with(&mut |l| b.iter_custom(|iters| common::timed(dev, iters, || l.forward())))
    });
    group.throughput(Throughput::Elements(3 * case.fwd_flops()));
    group.bench_function("fwd_bwd", |b| {
        with(&mut |l| b.iter_custom(|iters| common::timed(dev, iters, || l.forward_backward())))
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
