//! Fused optimizers on every backend: 5-step trajectories (a fresh random gradient each step)
//! of SGD (momentum, dampening, weight decay, Nesterov), Adam, AdamW and row-wise Adagrad,
//! several ragged tensors per launch, every param dtype with and without an f32 master copy,
//! against f64 host implementations of the PyTorch / FBGEMM updates.

mod common;

use common::{assert_close, assert_close_scaled, backends, random_tensor, rng, uniform};
use recfuse::ops::optim::{
    adam_step, rowwise_adagrad_step, sgd_step, AdamConfig, AdamParam, RowwiseAdagradConfig,
    RowwiseAdagradParam, SgdConfig, SgdParam,
};
use recfuse::{DType, Device, Error, Tensor};

const SIZES: [usize; 4] = [1, 31, 33, 1001];
const STEPS: u64 = 5;

/// The stored param is the rounding of the updated value: one rounding of the dtype (relative
/// to the largest element) on top of f32 noise.
fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// State tolerance: f32 math on the same inputs is ~1e-5; without a master copy a 16-bit param
/// is rounded every step (in the reference too), and a one-ulp difference in that rounding
/// feeds the weight-decay term.
fn state_tol(dt: DType, master: bool) -> f64 {
    if dt == DType::F32 || master {
        1e-5
    } else {
        tol(dt)
    }
}

/// Rounds the f64 reference param to the storage dtype, as storing a 16-bit param does.
fn round_to(dt: DType, master: bool, p: &mut [f64]) {
    if master {
        return;
    }
    for v in p.iter_mut() {
        *v = match dt {
            DType::F32 => *v as f32 as f64,
            DType::BF16 => half::bf16::from_f32(*v as f32).to_f64(),
            DType::F16 => half::f16::from_f32(*v as f32).to_f64(),
        };
    }
}

/// torch.optim.SGD._single_tensor_sgd in f64.
fn sgd_ref(p: &mut [f64], g: &[f64], buf: &mut Option<Vec<f64>>, c: &SgdConfig) {
    let (lr, mu, damp, wd) = (
        c.lr as f64,
        c.momentum as f64,
        c.dampening as f64,
        c.weight_decay as f64,
    );
    let d: Vec<f64> = p.iter().zip(g).map(|(p, g)| g + wd * p).collect();
    let d = if mu != 0.0 {
        let b = match buf.take() {
            None => d.clone(),
            Some(b) => b
                .iter()
                .zip(&d)
                .map(|(b, d)| mu * b + (1.0 - damp) * d)
                .collect(),
        };
        let out = if c.nesterov {
            d.iter().zip(&b).map(|(d, b)| d + mu * b).collect()
        } else {
            b.clone()
        };
        *buf = Some(b);
        out
    } else {
        d
    };
    for (p, d) in p.iter_mut().zip(&d) {
        *p -= lr * d;
    }
}

/// torch.optim.Adam / AdamW (_single_tensor_adam) in f64.
fn adam_ref(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], c: &AdamConfig, t: u64) {
    let (lr, b1, b2, eps, wd) = (
        c.lr as f64,
        c.beta1 as f64,
        c.beta2 as f64,
        c.eps as f64,
        c.weight_decay as f64,
    );
    for i in 0..p.len() {
        let mut gi = g[i];
        if c.decoupled_weight_decay {
            p[i] *= 1.0 - lr * wd;
        } else {
            gi += wd * p[i];
        }
        m[i] += (1.0 - b1) * (gi - m[i]);
        v[i] = v[i] * b2 + (1.0 - b2) * gi * gi;
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        let denom = v[i].sqrt() / bc2.sqrt() + eps;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

/// FBGEMM exact row-wise Adagrad (L2 weight decay) in f64.
fn adagrad_ref(p: &mut [f64], g: &[f64], s: &mut [f64], dim: usize, c: &RowwiseAdagradConfig) {
    for (r, st) in s.iter_mut().enumerate() {
        let row = r * dim..(r + 1) * dim;
        let gi: Vec<f64> = row
            .clone()
            .map(|k| g[k] + c.weight_decay as f64 * p[k])
            .collect();
        *st += gi.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let mult = c.lr as f64 / (st.sqrt() + c.eps as f64);
        for (k, gk) in row.zip(&gi) {
            p[k] -= mult * gk;
        }
    }
}

struct Case {
    param: Tensor,
    master: Option<Tensor>,
    s1: Tensor,
    s2: Tensor,
    p: Vec<f64>,
    m1: Vec<f64>,
    m2: Vec<f64>,
    buf: Option<Vec<f64>>,
    shape: Vec<usize>,
}

fn make_cases(
    r: &mut rand::rngs::StdRng,
    dev: &Device,
    dt: DType,
    master: bool,
    shapes: &[Vec<usize>],
    state_shape: impl Fn(&[usize]) -> Vec<usize>,
) -> Vec<Case> {
    shapes
        .iter()
        .map(|shape| {
            let (param, p) = random_tensor(r, shape, 1.0, dt, dev);
            let master_t = master.then(|| {
                Tensor::from_f32(
                    &p.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    shape,
                    DType::F32,
                    dev,
                )
                .unwrap()
            });
            let ss = state_shape(shape);
            let sn: usize = ss.iter().product();
            Case {
                param,
                master: master_t,
                s1: Tensor::zeros(&ss, DType::F32, dev).unwrap(),
                s2: Tensor::zeros(&ss, DType::F32, dev).unwrap(),
                p,
                m1: vec![0.0; sn],
                m2: vec![0.0; sn],
                buf: None,
                shape: shape.clone(),
            }
        })
        .collect()
}

/// Random gradients for every case (in `gdt`), plus the exact f64 values they hold.
///
/// With `l2: Some(wd)`, every effective gradient `g + wd·p` is kept at least 1e-3 from zero
/// (`Some(0.0)` for decoupled or no weight decay): Adam's first step is `g / (|g| + eps)`,
/// which turns the f32 rounding of `g + wd·p` (≈ 4e-9) into an O(1) error in the update when
/// |g + wd·p| is near eps. That point is ill-conditioned in any precision, so the test stays
/// away from it rather than widening the tolerance for every other element.
fn grads(
    r: &mut rand::rngs::StdRng,
    dev: &Device,
    cases: &[Case],
    gdt: DType,
    l2: Option<f64>,
) -> Vec<(Tensor, Vec<f64>)> {
    cases
        .iter()
        .map(|c| {
            let n = c.shape.iter().product();
            let mut g = uniform(r, n, 1.0);
            if let Some(wd) = l2 {
                for (gk, pk) in g.iter_mut().zip(&c.p) {
                    while (*gk as f64 + wd * pk).abs() < 1e-3 {
                        *gk = uniform(r, 1, 1.0)[0];
                    }
                }
            }
            let t = Tensor::from_f32(&g, &c.shape, gdt, dev).unwrap();
            let v = t.to_f64_vec().unwrap();
            (t, v)
        })
        .collect()
}

/// Compares params (and masters) with the error measured against at least `floor`: the
/// stored value is `p − lr·u` in f32, so its rounding is set by max(|p|, lr), not by |p|
/// alone (a param that the trajectory drove close to zero keeps an O(lr·ε) error).
fn check(what: &str, cases: &[Case], dt: DType, floor: f64) {
    for (i, c) in cases.iter().enumerate() {
        let got = c.param.to_f64_vec().unwrap();
        assert_close_scaled(
            &format!("{what} tensor {i} param"),
            &got,
            &c.p,
            tol(dt),
            floor,
        );
        if let Some(m) = &c.master {
            assert_close_scaled(
                &format!("{what} tensor {i} master"),
                &m.to_f64_vec().unwrap(),
                &c.p,
                1e-5,
                floor,
            );
        }
    }
}

#[test]
fn sgd_trajectories_match_pytorch() {
    let mut r = rng("sgd");
    let shapes: Vec<Vec<usize>> = SIZES.iter().map(|&n| vec![n]).collect();
    let cfgs = [
        SgdConfig::new(0.1),
        SgdConfig {
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 0.01,
            ..SgdConfig::new(0.05)
        },
        SgdConfig {
            momentum: 0.8,
            nesterov: true,
            weight_decay: 0.02,
            ..SgdConfig::new(0.05)
        },
    ];
    for be in backends() {
        for dt in DType::ALL {
            for master in [false, true] {
                if master && dt == DType::F32 {
                    continue;
                }
                for cfg in &cfgs {
                    let what = format!("{} sgd {dt} master={master} {cfg:?}", be.name);
                    let mut cases =
                        make_cases(&mut r, &be.device, dt, master, &shapes, |s| s.to_vec());
                    for step in 1..=STEPS {
                        let gs = grads(&mut r, &be.device, &cases, dt, None);
                        for (c, (_, gv)) in cases.iter_mut().zip(&gs) {
                            sgd_ref(&mut c.p, gv, &mut c.buf, cfg);
                            round_to(dt, master, &mut c.p);
                        }
                        let mut ps: Vec<SgdParam<'_>> = cases
                            .iter_mut()
                            .zip(&gs)
                            .map(|(c, (g, _))| SgdParam {
                                param: &mut c.param,
                                grad: g,
                                momentum_buffer: Some(&mut c.s1),
                                master: c.master.as_mut(),
                            })
                            .collect();
                        sgd_step(&mut ps, cfg, step).unwrap();
                    }
                    check(&what, &cases, dt, cfg.lr as f64);
                }
            }
        }
    }
}

#[test]
fn adam_and_adamw_trajectories_match_pytorch() {
    let mut r = rng("adam");
    let shapes: Vec<Vec<usize>> = SIZES.iter().map(|&n| vec![n]).collect();
    let cfgs = [
        AdamConfig::adam(1e-2),
        AdamConfig {
            weight_decay: 0.1,
            ..AdamConfig::adam(1e-2)
        },
        AdamConfig {
            weight_decay: 0.1,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            ..AdamConfig::adamw(1e-2)
        },
    ];
    for be in backends() {
        for dt in DType::ALL {
            for master in [false, true] {
                if master && dt == DType::F32 {
                    continue;
                }
                for cfg in &cfgs {
                    let what = format!("{} adam {dt} master={master} {cfg:?}", be.name);
                    let mut cases =
                        make_cases(&mut r, &be.device, dt, master, &shapes, |s| s.to_vec());
                    let l2 = if cfg.decoupled_weight_decay {
                        0.0
                    } else {
                        cfg.weight_decay as f64
                    };
                    for step in 1..=STEPS {
                        // Gradients in f32 even for 16-bit params (the mixed-dtype path).
                        let gs = grads(&mut r, &be.device, &cases, DType::F32, Some(l2));
                        for (c, (_, gv)) in cases.iter_mut().zip(&gs) {
                            adam_ref(&mut c.p, gv, &mut c.m1, &mut c.m2, cfg, step);
                            round_to(dt, master, &mut c.p);
                        }
                        let mut ps: Vec<AdamParam<'_>> = cases
                            .iter_mut()
                            .zip(&gs)
                            .map(|(c, (g, _))| AdamParam {
                                param: &mut c.param,
                                grad: g,
                                exp_avg: &mut c.s1,
                                exp_avg_sq: &mut c.s2,
                                master: c.master.as_mut(),
                            })
                            .collect();
                        adam_step(&mut ps, cfg, step).unwrap();
                    }
                    check(&what, &cases, dt, cfg.lr as f64);
                    for (i, c) in cases.iter().enumerate() {
                        // exp_avg is a sum of O(1) gradients that may cancel: its rounding
                        // is set by the gradients' scale (1), not by its own value.
                        assert_close_scaled(
                            &format!("{what} {i} exp_avg"),
                            &c.s1.to_f64_vec().unwrap(),
                            &c.m1,
                            state_tol(dt, master),
                            1.0,
                        );
                        assert_close(
                            &format!("{what} {i} exp_avg_sq"),
                            &c.s2.to_f64_vec().unwrap(),
                            &c.m2,
                            state_tol(dt, master),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rowwise_adagrad_trajectories_match_fbgemm() {
    let mut r = rng("adagrad");
    let shapes = [
        vec![1, 1],
        vec![3, 32],
        vec![33, 2],
        vec![7, 300],
        vec![5, 64],
    ];
    let cfgs = [
        RowwiseAdagradConfig {
            lr: 0.1,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        RowwiseAdagradConfig {
            lr: 0.05,
            eps: 1e-4,
            weight_decay: 0.01,
        },
    ];
    for be in backends() {
        for dt in DType::ALL {
            for master in [false, true] {
                if master && dt == DType::F32 {
                    continue;
                }
                // WGSL needs an even row length for 16-bit tables (documented); [1, 1] is f32 only there.
                let shapes: Vec<Vec<usize>> = shapes
                    .iter()
                    .filter(|s| !(be.name == "wgpu" && dt != DType::F32 && s[1] % 2 == 1))
                    .cloned()
                    .collect();
                for cfg in &cfgs {
                    let what = format!("{} adagrad {dt} master={master} {cfg:?}", be.name);
                    let mut cases =
                        make_cases(&mut r, &be.device, dt, master, &shapes, |s| vec![s[0]]);
                    for step in 1..=STEPS {
                        let gs = grads(&mut r, &be.device, &cases, dt, None);
                        for (c, (_, gv)) in cases.iter_mut().zip(&gs) {
                            adagrad_ref(&mut c.p, gv, &mut c.m1, c.shape[1], cfg);
                            round_to(dt, master, &mut c.p);
                        }
                        let mut ps: Vec<RowwiseAdagradParam<'_>> = cases
                            .iter_mut()
                            .zip(&gs)
                            .map(|(c, (g, _))| RowwiseAdagradParam {
                                param: &mut c.param,
                                grad: g,
                                state: &mut c.s1,
                                master: c.master.as_mut(),
                            })
                            .collect();
                        rowwise_adagrad_step(&mut ps, cfg, step).unwrap();
                    }
                    check(&what, &cases, dt, cfg.lr as f64);
                    for (i, c) in cases.iter().enumerate() {
                        assert_close(
                            &format!("{what} {i} state"),
                            &c.s1.to_f64_vec().unwrap(),
                            &c.m1,
                            state_tol(dt, master),
                        );
                    }
                }
            }
        }
    }
}

/// More tensors than one CUDA launch's table (32): the chunking is exercised.
#[test]
fn many_tensors_in_one_step() {
    let mut r = rng("many");
    let shapes: Vec<Vec<usize>> = (0..70).map(|i| vec![1 + (i * 7) % 19]).collect();
    let cfg = SgdConfig {
        momentum: 0.9,
        ..SgdConfig::new(0.1)
    };
    for be in backends() {
        let mut cases = make_cases(&mut r, &be.device, DType::F32, false, &shapes, |s| {
            s.to_vec()
        });
        for step in 1..=2 {
            let gs = grads(&mut r, &be.device, &cases, DType::F32, None);
            for (c, (_, gv)) in cases.iter_mut().zip(&gs) {
                sgd_ref(&mut c.p, gv, &mut c.buf, &cfg);
            }
            let mut ps: Vec<SgdParam<'_>> = cases
                .iter_mut()
                .zip(&gs)
                .map(|(c, (g, _))| SgdParam {
                    param: &mut c.param,
                    grad: g,
                    momentum_buffer: Some(&mut c.s1),
                    master: None,
                })
                .collect();
            sgd_step(&mut ps, &cfg, step).unwrap();
        }
        check(
            &format!("{} 70 tensors", be.name),
            &cases,
            DType::F32,
            cfg.lr as f64,
        );
    }
}

/// A step on a GPU backend copies no tensor data between host and device.
#[test]
fn a_step_stays_on_the_device() {
    let mut r = rng("transfers");
    for be in backends() {
        let dev = &be.device;
        let (mut w, _) = random_tensor(&mut r, &[4, 64], 1.0, DType::BF16, dev);
        let (g, _) = random_tensor(&mut r, &[4, 64], 1.0, DType::BF16, dev);
        let mut master = Tensor::zeros(&[4, 64], DType::F32, dev).unwrap();
        let mut m = Tensor::zeros(&[4, 64], DType::F32, dev).unwrap();
        let mut v = Tensor::zeros(&[4, 64], DType::F32, dev).unwrap();
        let mut s = Tensor::zeros(&[4], DType::F32, dev).unwrap();
        let before = dev.host_transfer_count();
        for step in 1..=3 {
            let mut ps = [AdamParam {
                param: &mut w,
                grad: &g,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                master: Some(&mut master),
            }];
            adam_step(&mut ps, &AdamConfig::adamw(1e-3), step).unwrap();
            let mut ps = [SgdParam {
                param: &mut w,
                grad: &g,
                momentum_buffer: Some(&mut m),
                master: None,
            }];
            sgd_step(
                &mut ps,
                &SgdConfig {
                    momentum: 0.5,
                    ..SgdConfig::new(0.1)
                },
                step,
            )
            .unwrap();
            let mut ps = [RowwiseAdagradParam {
                param: &mut w,
                grad: &g,
                state: &mut s,
                master: None,
            }];
            rowwise_adagrad_step(
                &mut ps,
                &RowwiseAdagradConfig {
                    lr: 0.1,
                    eps: 1e-8,
                    weight_decay: 0.0,
                },
                step,
            )
            .unwrap();
        }
        dev.synchronize().unwrap();
        assert_eq!(
            dev.host_transfer_count(),
            before,
            "{}: a step copied tensor data",
            be.name
        );
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    for be in backends() {
        let dev = &be.device;
        let mut w = Tensor::zeros(&[4], DType::F32, dev).unwrap();
        let g_bad = Tensor::zeros(&[5], DType::F32, dev).unwrap();
        let g = Tensor::zeros(&[4], DType::F32, dev).unwrap();
        let mut m16 = Tensor::zeros(&[4], DType::BF16, dev).unwrap();
        let mut v = Tensor::zeros(&[4], DType::F32, dev).unwrap();
        let cfg = SgdConfig {
            momentum: 0.9,
            ..SgdConfig::new(0.1)
        };
        let e = sgd_step(
            &mut [SgdParam {
                param: &mut w,
                grad: &g_bad,
                momentum_buffer: None,
                master: None,
            }],
            &SgdConfig::new(0.1),
            1,
        );
        assert!(matches!(e, Err(Error::Shape { arg: "grad", .. })), "{e:?}");
        let e = sgd_step(
            &mut [SgdParam {
                param: &mut w,
                grad: &g,
                momentum_buffer: None,
                master: None,
            }],
            &cfg,
            1,
        );
        assert!(
            matches!(
                e,
                Err(Error::InvalidArgument {
                    arg: "momentum_buffer",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = sgd_step(
            &mut [SgdParam {
                param: &mut w,
                grad: &g,
                momentum_buffer: None,
                master: None,
            }],
            &SgdConfig::new(0.1),
            0,
        );
        assert!(
            matches!(e, Err(Error::InvalidArgument { arg: "step", .. })),
            "{e:?}"
        );
        let e = adam_step(
            &mut [AdamParam {
                param: &mut w,
                grad: &g,
                exp_avg: &mut m16,
                exp_avg_sq: &mut v,
                master: None,
            }],
            &AdamConfig::adam(0.1),
            1,
        );
        assert!(
            matches!(e, Err(Error::DType { arg: "exp_avg", .. })),
            "{e:?}"
        );
        let e = adam_step(
            &mut [AdamParam {
                param: &mut w,
                grad: &g,
                exp_avg: &mut v,
                exp_avg_sq: &mut m16,
                master: None,
            }],
            &AdamConfig {
                beta1: 1.0,
                ..AdamConfig::adam(0.1)
            },
            1,
        );
        assert!(
            matches!(e, Err(Error::InvalidArgument { arg: "beta1", .. })),
            "{e:?}"
        );
        let mut s = Tensor::zeros(&[4], DType::F32, dev).unwrap();
        let e = rowwise_adagrad_step(
            &mut [RowwiseAdagradParam {
                param: &mut w,
                grad: &g,
                state: &mut s,
                master: None,
            }],
            &RowwiseAdagradConfig {
                lr: 0.1,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            1,
        );
        assert!(matches!(e, Err(Error::Shape { arg: "param", .. })), "{e:?}");
        if be.name != "cpu" {
            let host = Tensor::zeros(&[4], DType::F32, &Device::cpu()).unwrap();
            let e = sgd_step(
                &mut [SgdParam {
                    param: &mut w,
                    grad: &host,
                    momentum_buffer: None,
                    master: None,
                }],
                &SgdConfig::new(0.1),
                1,
            );
            assert!(
                matches!(e, Err(Error::DeviceMismatch { arg: "grad", .. })),
                "{e:?}"
            );
        }
    }
}
