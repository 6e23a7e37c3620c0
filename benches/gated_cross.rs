//! Gated cross stacks (GDCN) and DCN-V2 on every backend present:
//! `cargo bench --bench gated_cross`.
//!
//! Groups are `backend/gated_cross/dtype/b{B}_d{D}_l{L}` (and `.../dcn_v2/...`) with `fwd` and
//! `fwd_bwd` (forward with `SavePolicy::SaveAll`, then backward into preallocated gradients);
//! `scripts/baselines/gated_cross.py` prints PyTorch's numbers (the official GDCN layer, eager and
//! `torch.compile`) under the same names.
//!
//! **Throughput is FLOP/s** (`Throughput::Elements`), the spec's count: forward 4·B·D²·L gated
//! (2·B·D²·L DCN-V2), backward twice that. Fractions of the roofline use the spec's bytes:
//! forward ≈ (5BD + 2D²)·s per layer, backward ≈ (15BD + 6D²)·s.
//!
//! Shapes: CPU (4096, 189, 3), (4096, 624, 3) gated and (4096, 624, 3) DCN-V2 — plus
//! (16384, 624, 3) and (65536, 1024, 3) with `RECFUSE_BENCH_LARGE=1`; GPUs all of the issue's
//! (B, D, L) ∈ {(4096, 189, 3), (4096, 624, 3), (16384, 624, 3), (65536, 1024, 3)} in bf16 and
//! (16384, 624, 3) in f32 and DCN-V2.

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use recfuse::ops::gated_cross::{CrossMode, GatedCross, Init, PackedCross, SavePolicy};
use recfuse::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug)]
struct Case {
    mode: CrossMode,
    dtype: DType,
    b: usize,
    d: usize,
    l: usize,
}

const fn gated(dtype: DType, b: usize, d: usize, l: usize) -> Case {
    Case {
        mode: CrossMode::Gated,
        dtype,
        b,
        d,
        l,
    }
}

const fn dcn(dtype: DType, b: usize, d: usize, l: usize) -> Case {
    Case {
        mode: CrossMode::DcnV2,
        dtype,
        b,
        d,
        l,
    }
}

const CPU_CASES: &[Case] = &[
    gated(DType::F32, 4096, 189, 3),
    gated(DType::F32, 4096, 624, 3),
    dcn(DType::F32, 4096, 624, 3),
];
const LARGE_CPU_CASES: &[Case] = &[
    gated(DType::F32, 16384, 624, 3),
    gated(DType::F32, 65536, 1024, 3),
];
const GPU_CASES: &[Case] = &[
    gated(DType::BF16, 4096, 189, 3),
    gated(DType::BF16, 4096, 624, 3),
    gated(DType::BF16, 16384, 624, 3),
    gated(DType::BF16, 65536, 1024, 3),
    dcn(DType::BF16, 16384, 624, 3),
    gated(DType::F32, 16384, 624, 3),
];

impl Case {
    fn name(&self) -> String {
        let op = if self.mode == CrossMode::Gated {
            "gated_cross"
        } else {
            "dcn_v2"
        };
        format!(
            "{op}/{}/b{}_d{}_l{}",
            self.dtype.name(),
            self.b,
            self.d,
            self.l
        )
    }
    fn fwd_flops(&self) -> u64 {
        let per = if self.mode == CrossMode::Gated { 4 } else { 2 };
        (per * self.b * self.d * self.d * self.l) as u64
    }
    fn net(&self) -> GatedCross {
        GatedCross {
            mode: self.mode,
            dtype: self.dtype,
            ..GatedCross::new(self.d, self.l)
        }
    }
    fn tiny(&self) -> Case {
        Case {
            b: 8,
            d: 7,
            l: 2,
            ..*self
        }
    }
}

struct Stack {
    net: GatedCross,
    params: PackedCross,
    grads: PackedCross,
    x0: Tensor,
    dy: Tensor,
}

impl Stack {
    fn new(dev: &Device, c: Case) -> recfuse::Result<Stack> {
        let net = c.net();
        let params = net.pack(&net.init(Init::Gdcn, 1, dev)?, dev)?;
        let grads = net.zero_grads(&params)?;
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut rand = |n: usize| {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect::<Vec<f32>>()
        };
        let x0 = Tensor::from_f32(&rand(c.b * c.d), &[c.b, c.d], c.dtype, dev)?;
        let dy = Tensor::from_f32(&rand(c.b * c.d), &[c.b, c.d], c.dtype, dev)?;
        Ok(Stack {
            net,
            params,
            grads,
            x0,
            dy,
        })
    }

    fn forward(&self) -> recfuse::Result<()> {
        let (y, saved) = self
            .net
            .forward(&self.x0, &self.params, SavePolicy::SaveAll)?;
        black_box((y, saved));
        Ok(())
    }

    fn forward_backward(&mut self) -> recfuse::Result<()> {
        let (y, saved) = self
            .net
            .forward(&self.x0, &self.params, SavePolicy::SaveAll)?;
        let dx = self
            .net
            .backward_into(&self.params, &saved, &self.dy, &mut self.grads, false)?;
        black_box((y, dx));
        Ok(())
    }
}

fn bench_case(c: &mut Criterion, label: &str, dev: &Device, case: Case) {
    let group_name = format!("{label}/{}", case.name());
    if let Err(e) = Stack::new(dev, case.tiny()).and_then(|mut s| s.forward_backward()) {
        println!("recfuse bench: SKIPPED {group_name}: {e}");
        return;
    }
    let mut group = c.benchmark_group(&group_name);
    group.sampling_mode(SamplingMode::Flat);
    let stack: RefCell<Option<Stack>> = RefCell::new(None);
    let with = |f: &mut dyn FnMut(&mut Stack)| {
        let mut slot = stack.borrow_mut();
        let s = slot.get_or_insert_with(|| {
            Stack::new(dev, case).unwrap_or_else(|e| panic!("{group_name}: setup: {e}"))
        });
        f(s)
    };
    group.throughput(Throughput::Elements(case.fwd_flops()));
    group.bench_function("fwd", |b| {
        with(&mut |s| b.iter_custom(|iters| common::timed(dev, iters, || s.forward())))
    });
    group.throughput(Throughput::Elements(3 * case.fwd_flops()));
    group.bench_function("fwd_bwd", |b| {
        with(&mut |s| b.iter_custom(|iters| common::timed(dev, iters, || s.forward_backward())))
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
