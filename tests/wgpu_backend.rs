//! The wgpu backend against the f64 reference: `linear` forward and backward for every storage
//! dtype and activation, plain and grouped, on shapes that break tiled kernels (1, primes, one
//! past the 64-wide tile), plus gradient accumulation, fully written (NaN-poisoned) outputs,
//! determinism and activation accuracy.
//!
//! Needs an adapter; a software one (Mesa lavapipe) is accepted. Without one every test prints
//! `SKIPPED: wgpu unavailable: <reason>` and passes, unless `RECFUSE_REQUIRE` names `wgpu`.

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recfuse::cpu::reference::{self, LinearDims};
use recfuse::ops::linear::{self, Linear, LinearGrads};
use recfuse::{Activation, DType, Device, Tensor, WgpuOptions};

const ACTS: [Activation; 4] = [
    Activation::None,
    Activation::Relu,
    Activation::Gelu,
    Activation::Sigmoid,
];

/// (rows, in, out): 1×1×1, primes around the tile, one past the 64-wide tile.
const SHAPES: [(usize, usize, usize); 4] = [(1, 1, 1), (7, 37, 129), (37, 61, 7), (129, 64, 65)];

/// One device for the whole binary, so shader modules and pipelines compile once. Every test
/// that finds none says so.
fn device() -> Option<Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    let dev = DEV.get_or_init(|| {
        let d = Device::wgpu(&WgpuOptions {
            allow_software: true,
        })
        .map_err(|e| e.to_string());
        if let Ok(d) = &d {
            eprintln!("wgpu adapter: {}", d.describe());
        }
        d
    });
    match dev {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            let required = std::env::var("RECFUSE_REQUIRE").is_ok_and(|v| v.contains("wgpu"));
            assert!(!required, "RECFUSE_REQUIRE asks for wgpu, but: {e}");
            eprintln!("SKIPPED: wgpu unavailable: {e}");
            None
        }
    }
}

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A tensor of random values on `dev`, and the values it actually stores, widened to f64.
fn random(rng: &mut StdRng, shape: &[usize], dtype: DType, dev: &Device) -> (Tensor, Vec<f64>) {
    let n = shape.iter().product();
    let t = Tensor::from_f32(&uniform(rng, n), shape, dtype, dev).expect("upload");
    let v = t.to_f64_vec().expect("download");
    (t, v)
}

fn tolerance(dtype: DType, k: usize) -> f64 {
    match dtype {
        DType::F32 => 1e-5 * (k.max(1) as f64).sqrt(),
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// max|got − ref| ≤ tol·(max|ref| + 1e-3), and no NaN anywhere.
fn assert_close(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    let got = got.to_f64_vec().expect("download");
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())) + 1e-3;
    let mut worst = (0.0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: NaN at element {i} (ref {w})");
        let e = (g - w).abs();
        if e > worst.0 {
            worst = (e, i);
        }
    }
    let (err, at) = worst;
    assert!(
        err <= tol * scale,
        "{what}: max error {err:.3e} at element {at} (got {}, ref {}) exceeds {tol:.1e}·{scale:.3e}",
        got[at],
        want[at]
    );
}

#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    rows: usize,
    groups: Option<usize>,
    inp: usize,
    out: usize,
    act: Activation,
    bias: bool,
    residual: bool,
}

impl Case {
    fn dims(&self) -> LinearDims {
        LinearDims {
            rows: self.rows,
            groups: self.groups.unwrap_or(1),
            inp: self.inp,
            out: self.out,
        }
    }

    fn x_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![self.rows, g, self.inp],
            None => vec![self.rows, self.inp],
        }
    }

    fn w_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![g, self.out, self.inp],
            None => vec![self.out, self.inp],
        }
    }

    fn b_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![g, self.out],
            None => vec![self.out],
        }
    }

    fn y_shape(&self) -> Vec<usize> {
        match self.groups {
            Some(g) => vec![self.rows, g, self.out],
            None => vec![self.rows, self.out],
        }
    }
}

/// Forward and backward of one case against the reference.
fn check_case(dev: &Device, c: Case, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = format!("{c:?}");
    let (x, xv) = random(&mut rng, &c.x_shape(), c.dtype, dev);
    let (w, wv) = random(&mut rng, &c.w_shape(), c.dtype, dev);
    let b = c.bias.then(|| random(&mut rng, &c.b_shape(), c.dtype, dev));
    let r = c
        .residual
        .then(|| random(&mut rng, &c.y_shape(), c.dtype, dev));
    let cfg = Linear {
        activation: c.act,
        ..Default::default()
    };
    let fwd = linear::forward(
        &x,
        &w,
        b.as_ref().map(|b| &b.0),
        r.as_ref().map(|r| &r.0),
        &cfg,
    )
    .unwrap_or_else(|e| panic!("{name}: forward: {e}"));
    let (y_ref, pre_ref) = reference::linear_forward(
        c.dims(),
        &xv,
        &wv,
        b.as_ref().map(|b| b.1.as_slice()),
        r.as_ref().map(|r| r.1.as_slice()),
        c.act,
    );
    let tol_f = tolerance(c.dtype, c.inp);
    assert_close(&format!("{name} y"), &fwd.y, &y_ref, tol_f);
    // The backward pass differentiates at the pre-activation the device stored.
    let pre_dev = match &fwd.pre {
        Some(p) => {
            assert_close(&format!("{name} pre"), p, &pre_ref, tol_f);
            p.to_f64_vec().expect("download")
        }
        None => {
            assert_eq!(c.act, Activation::None, "{name}: pre missing");
            pre_ref
        }
    };

    let (dy, dyv) = random(&mut rng, &c.y_shape(), c.dtype, dev);
    let g = linear::backward(&x, &w, fwd.pre.as_ref(), &dy, &cfg, true)
        .unwrap_or_else(|e| panic!("{name}: backward: {e}"));
    let (dx_ref, dw_ref, db_ref) =
        reference::linear_backward(c.dims(), &xv, &wv, &pre_dev, &dyv, c.act);
    assert_close(
        &format!("{name} dx"),
        &g.dx,
        &dx_ref,
        tolerance(c.dtype, c.out),
    );
    assert_close(
        &format!("{name} dw"),
        &g.dw,
        &dw_ref,
        tolerance(c.dtype, c.rows),
    );
    let db = g.db.as_ref().expect("db asked for");
    assert_close(
        &format!("{name} db"),
        db,
        &db_ref,
        tolerance(c.dtype, c.rows),
    );
}

fn sweep(dtype: DType) {
    let Some(dev) = device() else { return };
    let di = DType::ALL.iter().position(|&d| d == dtype).unwrap_or(0);
    let t0 = std::time::Instant::now();
    let mut n = 0;
    for (si, &(rows, inp, out)) in SHAPES.iter().enumerate() {
        for grouped in [false, true] {
            // Every dtype meets every activation both plain and grouped.
            let act = ACTS[(si + usize::from(grouped) + di) % 4];
            let case = Case {
                dtype,
                rows,
                groups: grouped.then_some(3),
                inp,
                out,
                act,
                bias: si != 1,
                residual: si != 2,
            };
            check_case(&dev, case, (si * 2 + usize::from(grouped)) as u64);
            n += 1;
        }
    }
    eprintln!(
        "{dtype}: {n} forward+backward cases on {} in {:.1?}",
        dev.describe(),
        t0.elapsed()
    );
}

#[test]
fn linear_f32() {
    sweep(DType::F32);
}

#[test]
fn linear_bf16() {
    sweep(DType::BF16);
}

#[test]
fn linear_f16() {
    sweep(DType::F16);
}

#[test]
fn linear_f32_large() {
    let Some(dev) = device() else { return };
    let t0 = std::time::Instant::now();
    let case = Case {
        dtype: DType::F32,
        rows: 1823,
        groups: None,
        inp: 781,
        out: 16,
        act: Activation::Gelu,
        bias: true,
        residual: true,
    };
    check_case(&dev, case, 99);
    eprintln!("f32 1823×781→16: {:.1?}", t0.elapsed());
}

/// `backward_into(accumulate = true)` adds into dW and db and overwrites dX.
#[test]
fn backward_accumulates() {
    let Some(dev) = device() else { return };
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(100 + i as u64);
        let c = Case {
            dtype,
            rows: 37,
            groups: Some(2),
            inp: 19,
            out: 67,
            act: Activation::Sigmoid,
            bias: true,
            residual: false,
        };
        let name = format!("accumulate {dtype}");
        let (x, xv) = random(&mut rng, &c.x_shape(), dtype, &dev);
        let (w, wv) = random(&mut rng, &c.w_shape(), dtype, &dev);
        let (b, _) = random(&mut rng, &c.b_shape(), dtype, &dev);
        let cfg = Linear {
            activation: c.act,
            ..Default::default()
        };
        let fwd = linear::forward(&x, &w, Some(&b), None, &cfg).expect("forward");
        let pre = fwd.pre.as_ref().expect("pre");
        let prev = pre.to_f64_vec().expect("download");
        let (dy, dyv) = random(&mut rng, &c.y_shape(), dtype, &dev);
        let (dx0, _) = random(&mut rng, &c.x_shape(), dtype, &dev);
        let (dw0, dw0v) = random(&mut rng, &c.w_shape(), dtype, &dev);
        let (db0, db0v) = random(&mut rng, &c.b_shape(), dtype, &dev);
        let mut grads = LinearGrads {
            dx: dx0,
            dw: dw0,
            db: Some(db0),
        };
        linear::backward_into(&x, &w, Some(pre), &dy, &cfg, &mut grads, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (dx_ref, dw_ref, db_ref) =
            reference::linear_backward(c.dims(), &xv, &wv, &prev, &dyv, c.act);
        let dw_want: Vec<f64> = dw_ref.iter().zip(&dw0v).map(|(a, b)| a + b).collect();
        let db_want: Vec<f64> = db_ref.iter().zip(&db0v).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("{name} dx"),
            &grads.dx,
            &dx_ref,
            tolerance(dtype, c.out),
        );
        assert_close(
            &format!("{name} dw"),
            &grads.dw,
            &dw_want,
            tolerance(dtype, c.rows),
        );
        let db = grads.db.as_ref().expect("db");
        assert_close(
            &format!("{name} db"),
            db,
            &db_want,
            tolerance(dtype, c.rows),
        );
    }
}

/// Gradients written into NaN-filled buffers (accumulate = false) must overwrite every element;
/// the weight and bias reductions must give identical bits on a second run.
#[test]
fn poisoned_outputs_are_overwritten_and_deterministic() {
    let Some(dev) = device() else { return };
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(200 + i as u64);
        // Odd element counts everywhere, so the last 16-bit word is half padding.
        let c = Case {
            dtype,
            rows: 65,
            groups: None,
            inp: 33,
            out: 7,
            act: Activation::Relu,
            bias: true,
            residual: true,
        };
        let name = format!("poisoned {dtype}");
        let (x, xv) = random(&mut rng, &c.x_shape(), dtype, &dev);
        let (w, wv) = random(&mut rng, &c.w_shape(), dtype, &dev);
        let (b, bv) = random(&mut rng, &c.b_shape(), dtype, &dev);
        let (r, rv) = random(&mut rng, &c.y_shape(), dtype, &dev);
        let cfg = Linear {
            activation: c.act,
            ..Default::default()
        };
        let fwd = linear::forward(&x, &w, Some(&b), Some(&r), &cfg).expect("forward");
        let (y_ref, _) = reference::linear_forward(c.dims(), &xv, &wv, Some(&bv), Some(&rv), c.act);
        assert_close(
            &format!("{name} y"),
            &fwd.y,
            &y_ref,
            tolerance(dtype, c.inp),
        );
        let pre = fwd.pre.as_ref().expect("pre");
        let prev = pre.to_f64_vec().expect("download");
        let (dy, dyv) = random(&mut rng, &c.y_shape(), dtype, &dev);
        let run = || {
            let mut grads = LinearGrads {
                dx: Tensor::poisoned(&c.x_shape(), dtype, &dev).expect("alloc"),
                dw: Tensor::poisoned(&c.w_shape(), dtype, &dev).expect("alloc"),
                db: Some(Tensor::poisoned(&c.b_shape(), dtype, &dev).expect("alloc")),
            };
            linear::backward_into(&x, &w, Some(pre), &dy, &cfg, &mut grads, false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            grads
        };
        let g1 = run();
        let g2 = run();
        let (dx_ref, dw_ref, db_ref) =
            reference::linear_backward(c.dims(), &xv, &wv, &prev, &dyv, c.act);
        assert_close(
            &format!("{name} dx"),
            &g1.dx,
            &dx_ref,
            tolerance(dtype, c.out),
        );
        assert_close(
            &format!("{name} dw"),
            &g1.dw,
            &dw_ref,
            tolerance(dtype, c.rows),
        );
        let (db1, db2) = (g1.db.expect("db"), g2.db.expect("db"));
        assert_close(
            &format!("{name} db"),
            &db1,
            &db_ref,
            tolerance(dtype, c.rows),
        );
        assert_eq!(
            g1.dw.to_bytes().expect("download"),
            g2.dw.to_bytes().expect("download"),
            "{name}: dw differs between runs"
        );
        assert_eq!(
            db1.to_bytes().expect("download"),
            db2.to_bytes().expect("download"),
            "{name}: db differs between runs"
        );
    }
}

/// The WGSL activations (erf by polynomial, exp) elementwise: with in = out = 1 and w = 1,
/// y = act(x) and, with dy = 1, dx = act'(x) exactly up to the kernels' own f32 error.
#[test]
fn activations_are_f32_accurate() {
    let Some(dev) = device() else { return };
    let n = 4097;
    let xs: Vec<f32> = (0..n)
        .map(|i| -6.0 + 12.0 * i as f32 / (n - 1) as f32)
        .collect();
    let x = Tensor::from_f32(&xs, &[n, 1], DType::F32, &dev).expect("upload");
    let w = Tensor::from_f32(&[1.0], &[1, 1], DType::F32, &dev).expect("upload");
    let dy = Tensor::full(&[n, 1], 1.0, DType::F32, &dev).expect("upload");
    for act in ACTS {
        let cfg = Linear {
            activation: act,
            ..Default::default()
        };
        let fwd = linear::forward(&x, &w, None, None, &cfg).expect("forward");
        let g = linear::backward(&x, &w, fwd.pre.as_ref(), &dy, &cfg, false).expect("backward");
        let y = fwd.y.to_f32_vec().expect("download");
        let dx = g.dx.to_f32_vec().expect("download");
        for (i, &xi) in xs.iter().enumerate() {
            let z = f64::from(xi);
            let (want_y, want_d) = (reference::act(act, z), reference::act_grad(act, z));
            let ey = (f64::from(y[i]) - want_y).abs();
            let ed = (f64::from(dx[i]) - want_d).abs();
            assert!(
                ey <= 1e-6 * want_y.abs().max(1.0),
                "{}({xi}) = {} on the device, {want_y} in f64",
                act.name(),
                y[i]
            );
            assert!(
                ed <= 1e-6 * want_d.abs().max(1.0),
                "{}'({xi}) = {} on the device, {want_d} in f64",
                act.name(),
                dx[i]
            );
        }
    }
}

/// Where the f32 arithmetic is the same sequence of operations on both backends, the stored
/// bits must be identical to the CPU backend's: a k = 1 forward (z = x·1, y = z + residual,
/// one rounding) exercises the shaders' bf16/f16 round-to-nearest-even (ties, subnormals,
/// overflow to inf) against the `half` crate, and the bias gradient is an in-order column sum
/// on both.
#[test]
fn rounding_and_column_sums_match_the_cpu_bitwise() {
    let Some(dev) = device() else { return };
    let cpu = Device::cpu();
    let mut rng = StdRng::seed_from_u64(300);
    let n = 3001;
    // Magnitudes 2^-30 .. 2^20: f16 subnormals, underflow to zero and overflow to inf included.
    let mut wide = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m: f32 = rng.random_range(1.0f32..2.0);
                let e: i32 = rng.random_range(-30..21);
                let s = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
                s * m * 2f32.powi(e)
            })
            .collect()
    };
    let (xs, rs, dys) = (wide(n), wide(n), wide(n * 3));
    for dtype in DType::ALL {
        let run = |d: &Device| {
            let x = Tensor::from_f32(&xs, &[n, 1], dtype, d).expect("upload");
            let w = Tensor::from_f32(&[1.0], &[1, 1], dtype, d).expect("upload");
            let r = Tensor::from_f32(&rs, &[n, 1], dtype, d).expect("upload");
            let y = linear::forward(&x, &w, None, Some(&r), &Linear::default())
                .expect("forward")
                .y;
            // db = column sums of dy over n rows (activation none: dz is dy itself).
            let w3 = Tensor::from_f32(&[0.5; 9], &[3, 3], dtype, d).expect("upload");
            let dy = Tensor::from_f32(&dys, &[n, 3], dtype, d).expect("upload");
            let x3 = Tensor::from_f32(&vec![0.25; n * 3], &[n, 3], dtype, d).expect("upload");
            let g =
                linear::backward(&x3, &w3, None, &dy, &Linear::default(), true).expect("backward");
            (
                y.to_f32_vec().expect("download"),
                g.db.expect("db").to_bytes().expect("download"),
            )
        };
        let (y_gpu, db_gpu) = run(&dev);
        let (y_cpu, db_cpu) = run(&cpu);
        // Equal as numbers: every bit but the sign of a zero sum (the GPU accumulator starts at
        // +0, so -0·1 accumulates to +0 there and stays -0 in the CPU's gemm).
        if let Some(i) = y_gpu
            .iter()
            .zip(&y_cpu)
            .position(|(g, c)| g != c && !(g.is_nan() && c.is_nan()))
        {
            panic!(
                "{dtype}: y[{i}] = x {:e} + residual {:e} rounds to {:e} on the device, {:e} on the cpu",
                xs[i], rs[i], y_gpu[i], y_cpu[i]
            );
        }
        assert_eq!(db_gpu, db_cpu, "{dtype}: column sums differ from the CPU");
    }
}
