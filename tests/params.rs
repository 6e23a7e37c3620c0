//! The `Parameters` trait: PyTorch `state_dict` names for every layer, `to_device` / clone /
//! `zeros_like` on every backend, and the whole-model optimizers (`Adam<P>`, `Sgd<P>`) against
//! the per-tensor `adam_step` / `sgd_step` they wrap, on fresh random gradients.

mod common;

use common::{assert_close, backends, rng, uniform};
use recfuse::ops::gated_cross::{CrossMode, GatedCross, Init};
use recfuse::ops::hiformer::{HeteroAttentionLayer, HiformerLayer, LayerConfig};
use recfuse::ops::linear::LinearParams;
use recfuse::ops::optim::{
    adam_step, sgd_step, Adam, AdamConfig, AdamParam, Sgd, SgdConfig, SgdParam,
};
use recfuse::params::{prefixed, Parameters};
use recfuse::{DType, Device, Error, Tensor};

fn names<P: Parameters>(p: &P) -> Vec<String> {
    p.named_tensors().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn state_dict_names_follow_pytorch() {
    let dev = Device::cpu();
    let lin = LinearParams::init(5, 3, true, DType::F32, 1, &dev).unwrap();
    assert_eq!(names(&lin), ["weight", "bias"]);
    assert_eq!(lin.weight.shape(), &[3, 5]);

    let gdcn = GatedCross::new(4, 2).init(Init::Gdcn, 2, &dev).unwrap();
    assert_eq!(
        names(&gdcn),
        [
            "w.0.weight",
            "b.0",
            "wg.0.weight",
            "w.1.weight",
            "b.1",
            "wg.1.weight"
        ]
    );
    let mut lr = GatedCross::new(4, 1);
    lr.rank = Some(2);
    let lr_w = lr.init(Init::Gdcn, 2, &dev).unwrap();
    assert_eq!(names(&lr_w), ["w.0.u", "w.0.v", "b.0", "wg.0.u", "wg.0.v"]);

    let mut v2 = GatedCross::new(4, 2);
    v2.mode = CrossMode::DcnV2;
    assert_eq!(
        names(&v2.init(Init::DcnV2, 3, &dev).unwrap()),
        ["kernels.0", "bias.0", "kernels.1", "bias.1"]
    );
    v2.rank = Some(2);
    // TorchRec's LowRankCrossNet: W_kernels [D, r] (our u), V_kernels [r, D] (our v).
    let v2_lr = v2.init(Init::DcnV2, 3, &dev).unwrap();
    assert_eq!(
        v2_lr.get("W_kernels.0").map(|t| t.shape().to_vec()),
        Some(vec![4, 2])
    );
    assert_eq!(
        v2_lr.get("V_kernels.0").map(|t| t.shape().to_vec()),
        Some(vec![2, 4])
    );
    assert_eq!(
        names(&v2.init(Init::DcnV2, 3, &dev).unwrap()),
        [
            "W_kernels.0",
            "V_kernels.0",
            "bias.0",
            "W_kernels.1",
            "V_kernels.1",
            "bias.1"
        ]
    );

    let cfg = LayerConfig::new(3, 8, 2, 4, 4, 16);
    let het = HeteroAttentionLayer { cfg: cfg.clone() }
        .init(4, &dev)
        .unwrap();
    let hn = names(&het);
    assert_eq!(&hn[..3], ["wq", "wk", "wv"]);
    let hi = HiformerLayer {
        cfg,
        rank_qk: 3,
        rank_v: 2,
    }
    .init(5, &dev)
    .unwrap();
    let hin = names(&hi);
    assert_eq!(&hin[..4], ["qkv.a", "qkv.rq", "qkv.rk", "qkv.rv"]);
    for want in [
        "wo",
        "bo",
        "w1",
        "b1",
        "w2",
        "b2",
        "ln1.weight",
        "ln1.bias",
        "ln2.weight",
        "ln2.bias",
    ] {
        assert!(
            hin.iter().any(|n| n == want),
            "hiformer lacks {want}: {hin:?}"
        );
        assert!(hn.iter().any(|n| n == want), "hetero lacks {want}: {hn:?}");
    }
    // Every name is unique and get() finds each tensor.
    for p in [&hn, &hin] {
        let mut s = p.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), p.len());
    }
    assert!(hi.get("qkv.a").is_some() && hi.get("nope").is_none());
    let pre = prefixed("head", lin.named_tensors());
    assert_eq!(pre[0].0, "head.weight");
}

#[test]
fn linear_init_is_pytorch_uniform() {
    let dev = Device::cpu();
    let (inp, out) = (64, 32);
    let p = LinearParams::init(inp, out, true, DType::F32, 9, &dev).unwrap();
    let bound = 1.0 / (inp as f32).sqrt();
    let w = p.weight.to_vec::<f32>().unwrap();
    assert!(w.iter().all(|v| v.abs() <= bound));
    // Not constant, roughly centred, roughly the U(−b, b) variance b²/3.
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let var = w.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / w.len() as f32;
    assert!(mean.abs() < 0.1 * bound, "mean {mean}");
    assert!(
        (var / (bound * bound / 3.0) - 1.0).abs() < 0.15,
        "var {var}"
    );
    let q = LinearParams::init(inp, out, true, DType::F32, 10, &dev).unwrap();
    assert_ne!(w, q.weight.to_vec::<f32>().unwrap(), "seed must matter");
    let g = LinearParams::init_grouped(3, inp, out, false, DType::BF16, 9, &dev).unwrap();
    assert_eq!(g.weight.shape(), &[3, out, inp]);
    assert!(g.bias.is_none());
}

#[test]
fn to_device_clone_and_zeros_like_round_trip() {
    let host = Device::cpu();
    let cfg = LayerConfig::new(3, 8, 2, 4, 4, 16);
    let p = HiformerLayer {
        cfg,
        rank_qk: 3,
        rank_v: 2,
    }
    .init(11, &host)
    .unwrap();
    for be in backends() {
        let on = p.to_device(&be.device).unwrap();
        let back = on.try_clone().unwrap().to_device(&host).unwrap();
        for ((n, a), (m, b)) in p.named_tensors().into_iter().zip(back.named_tensors()) {
            assert_eq!(n, m);
            assert_eq!(a.shape(), b.shape());
            assert_eq!(
                a.to_vec::<f32>().unwrap(),
                b.to_vec::<f32>().unwrap(),
                "{}: {n} changed in the round trip",
                be.name
            );
        }
        let z = on.zeros_like(Some(DType::BF16)).unwrap();
        for (n, t) in z.named_tensors() {
            assert_eq!(t.dtype(), DType::BF16, "{n}");
            assert!(t.to_f64_vec().unwrap().iter().all(|&v| v == 0.0), "{n}");
        }
        assert_eq!(z.num_elements(), p.num_elements());
    }
}

fn random_like<P: Parameters>(p: &P, r: &mut impl rand::Rng) -> P {
    p.try_map(&mut |_, t| {
        Tensor::from_f32(
            &uniform(r, t.numel(), 1.0),
            t.shape(),
            t.dtype(),
            &t.device(),
        )
    })
    .unwrap()
}

#[test]
fn whole_model_optimizers_match_the_per_tensor_steps() {
    let mut r = rng("params::optim");
    for be in backends() {
        let dev = &be.device;
        for dt in [DType::F32, DType::BF16] {
            let mut gc = GatedCross::new(6, 2);
            gc.dtype = dt;
            let p0 = gc.init(Init::Gdcn, 3, dev).unwrap();
            let master = dt != DType::F32;
            let cfg = AdamConfig::adamw(0.01);
            let mut p = p0.try_clone().unwrap();
            let mut opt = Adam::new(&p, cfg, master).unwrap();
            // The reference: the per-tensor API on separate state.
            let mut q = p0.try_clone().unwrap();
            let mut m = q.zeros_like(Some(DType::F32)).unwrap();
            let mut v = q.zeros_like(Some(DType::F32)).unwrap();
            let mut ms = q.try_map(&mut |_, t| t.to_dtype(DType::F32)).unwrap();
            for step in 1..=3u64 {
                let g = random_like(&p, &mut r);
                opt.step(&mut p, &g).unwrap();
                let gt = g.named_tensors();
                let mut list: Vec<AdamParam<'_>> = q
                    .named_tensors_mut()
                    .into_iter()
                    .zip(&gt)
                    .zip(m.named_tensors_mut().into_iter().zip(v.named_tensors_mut()))
                    .zip(ms.named_tensors_mut())
                    .map(
                        |((((_, param), (_, grad)), ((_, m), (_, v))), (_, ms))| AdamParam {
                            param,
                            grad,
                            exp_avg: m,
                            exp_avg_sq: v,
                            master: if master { Some(ms) } else { None },
                        },
                    )
                    .collect();
                adam_step(&mut list, &cfg, step).unwrap();
            }
            assert_eq!(opt.steps(), 3);
            for ((n, a), (_, b)) in p.named_tensors().into_iter().zip(q.named_tensors()) {
                let (a, b) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
                assert_close(&format!("{} {dt:?} adam {n}", be.name), &a, &b, 0.0);
            }
            // And the parameters did move.
            let moved = p.named_tensors()[0].1.to_f64_vec().unwrap();
            assert_ne!(moved, p0.named_tensors()[0].1.to_f64_vec().unwrap());

            let mut scfg = SgdConfig::new(0.05);
            scfg.momentum = 0.9;
            scfg.weight_decay = 1e-3;
            let lin0 = LinearParams::init(7, 3, true, dt, 4, dev).unwrap();
            let mut lin = lin0.try_clone().unwrap();
            let mut sgd = Sgd::new(&lin, scfg, false).unwrap();
            let mut lq = lin0.try_clone().unwrap();
            let mut buf = lq.zeros_like(Some(DType::F32)).unwrap();
            for step in 1..=3u64 {
                let g = random_like(&lin, &mut r);
                sgd.step(&mut lin, &g).unwrap();
                let gt = g.named_tensors();
                let mut list: Vec<SgdParam<'_>> = lq
                    .named_tensors_mut()
                    .into_iter()
                    .zip(&gt)
                    .zip(buf.named_tensors_mut())
                    .map(|(((_, param), (_, grad)), (_, b))| SgdParam {
                        param,
                        grad,
                        momentum_buffer: Some(b),
                        master: None,
                    })
                    .collect();
                sgd_step(&mut list, &scfg, step).unwrap();
            }
            for ((n, a), (_, b)) in lin.named_tensors().into_iter().zip(lq.named_tensors()) {
                let (a, b) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
                assert_close(&format!("{} {dt:?} sgd {n}", be.name), &a, &b, 0.0);
            }
        }
    }
}

#[test]
fn misaligned_grads_are_typed_errors() {
    let dev = Device::cpu();
    let mut p = LinearParams::init(4, 2, true, DType::F32, 1, &dev).unwrap();
    let mut opt = Adam::new(&p, AdamConfig::adam(0.1), false).unwrap();
    let wrong = LinearParams::init(3, 2, true, DType::F32, 1, &dev).unwrap();
    match opt.step(&mut p, &wrong) {
        Err(e @ Error::Shape { .. }) | Err(e @ Error::InvalidArgument { .. }) => {
            let s = e.to_string();
            assert!(s.contains("grads"), "{s}");
        }
        other => panic!("expected a shape error naming grads, got {other:?}"),
    }
    let no_bias = LinearParams::init(4, 2, false, DType::F32, 1, &dev).unwrap();
    assert!(opt.step(&mut p, &no_bias).is_err());
    assert_eq!(opt.steps(), 0, "a rejected step must not count");
}
