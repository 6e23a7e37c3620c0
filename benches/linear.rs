//! `ops::linear` benchmarks on every backend present: `cargo bench --bench linear`.
//!
//! Groups are named `backend/linear/dtype/shape` with two functions each, `fwd` (forward) and
//! `fwd_bwd` (forward, then backward into preallocated gradient buffers), so a full id reads
//! `cpu/linear/f32/m4096_k1024_n1024/fwd`. `scripts/baselines/linear.py` prints PyTorch's
//! numbers under the same names.
//!
//! Every layer has a bias and an exact-GELU epilogue (`F.gelu(F.linear(x, w, b))` in PyTorch).
//!
//! **Throughput is FLOP/s.** Each group sets `Throughput::Elements(flops)`, so criterion's
//! "elem/s" is FLOP/s, counting only the matrix products (the epilogue and the bias reduction
//! are O(M·N), noise next to them):
//! * `fwd`: `2·M·K·N` (grouped: `2·B·G·K·N`),
//! * `fwd_bwd`: `6·M·K·N` (forward, `dX = dZ·W` and `dW = dZᵀ·X`).
//!
//! Timing uses `iter_custom`: a batch of iterations is enqueued back to back and closed by one
//! `device.synchronize()`, so GPU numbers are completion times, not enqueue times. The public
//! `forward` allocates `y` and `pre` each call, and that allocation is inside the timing (as
//! PyTorch's allocation is in its numbers).
//!
//! Backends: the CPU always; a *hardware* wgpu adapter (a software one such as lavapipe only with
//! `RECFUSE_BENCH_SOFTWARE=1`, named `wgpu-sw`); CUDA when `Device::cuda(0)` opens. The first
//! lines printed name the backends that run and why the others were skipped. Before a group is
//! registered it runs once at a small shape; an op a backend does not support yet is skipped
//! with its error instead of aborting the run.
//!
//! Shapes, `(M, K, N)` for plain layers and `B` tokens × `G` groups × `K → N` for the grouped
//! (per-token weights) layer:
//! * every backend: f32 `4096×1024×1024`, grouped f32 `B=1024, G=38, 128→128`;
//! * GPUs also: bf16 `4096×1024×1024`, bf16 `8192×4096×4096`, grouped bf16.
//!
//! Defaults are small so a CPU run takes a few minutes on two cores: 10 samples, 1 s warm-up,
//! 5 s measurement, flat sampling. criterion's own flags override them
//! (`cargo bench --bench linear -- --measurement-time 2 cpu/`), and a positional argument
//! filters by name.

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use recfuse::ops::linear::{self, Linear, LinearGrads};
use recfuse::{Activation, DType, Device, Tensor};

/// One benchmarked layer shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// Rows (plain) or tokens `B` (grouped).
    m: usize,
    /// Groups `G`; `None` for a plain layer.
    groups: Option<usize>,
    k: usize,
    n: usize,
}

impl Shape {
    const fn plain(m: usize, k: usize, n: usize) -> Shape {
        Shape {
            m,
            groups: None,
            k,
            n,
        }
    }

    const fn grouped(b: usize, g: usize, k: usize, n: usize) -> Shape {
        Shape {
            m: b,
            groups: Some(g),
            k,
            n,
        }
    }

    fn name(&self) -> String {
        match self.groups {
            None => format!("m{}_k{}_n{}", self.m, self.k, self.n),
            Some(g) => format!("grouped_b{}_g{}_k{}_n{}", self.m, g, self.k, self.n),
        }
    }

    /// Multiply-adds of one forward product, times two.
    fn fwd_flops(&self) -> u64 {
        2 * (self.m * self.groups.unwrap_or(1) * self.k * self.n) as u64
    }

    fn x_shape(&self) -> Vec<usize> {
        match self.groups {
            None => vec![self.m, self.k],
            Some(g) => vec![self.m, g, self.k],
        }
    }

    fn w_shape(&self) -> Vec<usize> {
        match self.groups {
            None => vec![self.n, self.k],
            Some(g) => vec![g, self.n, self.k],
        }
    }

    fn b_shape(&self) -> Vec<usize> {
        match self.groups {
            None => vec![self.n],
            Some(g) => vec![g, self.n],
        }
    }

    fn y_shape(&self) -> Vec<usize> {
        match self.groups {
            None => vec![self.m, self.n],
            Some(g) => vec![self.m, g, self.n],
        }
    }

    /// The same kind of layer at a size that runs in milliseconds anywhere (support probe).
    fn tiny(&self) -> Shape {
        Shape {
            m: 8,
            groups: self.groups.map(|_| 3),
            k: 16,
            n: 8,
        }
    }
}

const CPU_CASES: &[(DType, Shape)] = &[
    (DType::F32, Shape::plain(4096, 1024, 1024)),
    (DType::F32, Shape::grouped(1024, 38, 128, 128)),
];

const GPU_CASES: &[(DType, Shape)] = &[
    (DType::F32, Shape::plain(4096, 1024, 1024)),
    (DType::BF16, Shape::plain(4096, 1024, 1024)),
    (DType::BF16, Shape::plain(8192, 4096, 4096)),
    (DType::F32, Shape::grouped(1024, 38, 128, 128)),
    (DType::BF16, Shape::grouped(1024, 38, 128, 128)),
];

fn cfg() -> Linear {
    Linear {
        activation: Activation::Gelu,
        ..Default::default()
    }
}

/// Inputs and gradient buffers of one layer, resident on the device.
struct Layer {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    dy: Tensor,
    grads: LinearGrads,
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

impl Layer {
    fn new(dev: &Device, dtype: DType, s: Shape) -> recfuse::Result<Layer> {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let numel = |shape: &[usize]| shape.iter().product::<usize>();
        let (xs, ws, bs, ys) = (s.x_shape(), s.w_shape(), s.b_shape(), s.y_shape());
        let wscale = 1.0 / (s.k as f32).sqrt();
        let x = Tensor::from_f32(&random(&mut rng, numel(&xs), 1.0), &xs, dtype, dev)?;
        let w = Tensor::from_f32(&random(&mut rng, numel(&ws), wscale), &ws, dtype, dev)?;
        let b = Tensor::from_f32(&random(&mut rng, numel(&bs), 0.1), &bs, dtype, dev)?;
        let dy = Tensor::from_f32(&random(&mut rng, numel(&ys), 1.0), &ys, dtype, dev)?;
        let grads = LinearGrads {
            dx: Tensor::zeros(&xs, dtype, dev)?,
            dw: Tensor::zeros(&ws, dtype, dev)?,
            db: Some(Tensor::zeros(&bs, dtype, dev)?),
        };
        Ok(Layer { x, w, b, dy, grads })
    }

    fn forward(&self) -> recfuse::Result<linear::LinearForward> {
        linear::forward(&self.x, &self.w, Some(&self.b), None, &cfg())
    }

    fn forward_backward(&mut self) -> recfuse::Result<()> {
        let f = self.forward()?;
        linear::backward_into(
            &self.x,
            &self.w,
            f.pre.as_ref(),
            &self.dy,
            &cfg(),
            &mut self.grads,
            false,
        )?;
        black_box(&f.y);
        Ok(())
    }
}

fn bench_case(c: &mut Criterion, label: &str, dev: &Device, dtype: DType, s: Shape) {
    let group_name = format!("{label}/linear/{}/{}", dtype.name(), s.name());
    // Probe support at a tiny shape so an unimplemented dtype or layout skips, not aborts.
    if let Err(e) = Layer::new(dev, dtype, s.tiny()).and_then(|mut l| l.forward_backward()) {
        println!("recfuse bench: SKIPPED {group_name}: {e}");
        return;
    }
    let mut group = c.benchmark_group(&group_name);
    group.sampling_mode(SamplingMode::Flat);
    // The layer is built on first use, so groups filtered out by name never allocate.
    let layer: RefCell<Option<Layer>> = RefCell::new(None);
    let with_layer = |f: &mut dyn FnMut(&mut Layer)| {
        let mut slot = layer.borrow_mut();
        let l = slot.get_or_insert_with(|| {
            Layer::new(dev, dtype, s).unwrap_or_else(|e| panic!("{group_name}: setup: {e}"))
        });
        f(l)
    };
    group.throughput(Throughput::Elements(s.fwd_flops()));
    group.bench_function("fwd", |b| {
        with_layer(&mut |l| {
            b.iter_custom(|iters| {
                common::timed(dev, iters, || l.forward().map(|f| drop(black_box(f))))
            })
        })
    });
    group.throughput(Throughput::Elements(3 * s.fwd_flops()));
    group.bench_function("fwd_bwd", |b| {
        with_layer(&mut |l| {
            b.iter_custom(|iters| common::timed(dev, iters, || l.forward_backward()))
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let run = common::backends();
    for (label, dev) in &run {
        let cases = if label == "cpu" { CPU_CASES } else { GPU_CASES };
        for &(dtype, shape) in cases {
            bench_case(&mut c, label, dev, dtype, shape);
        }
    }
    c.final_summary();
}
