//! Gated cross layers (GDCN) and DCN-V2 on every backend present, against the f64 reference of
//! exactly `x0 * (x@Wcᵀ + b) * sigmoid(x@Wgᵀ) + x`; finite differences; SaveAll ≡ Recompute;
//! determinism; deep bf16 stacks; typed errors.

mod common;

use common::{assert_close, backends, finite_diff, rng, Backend};
use rand::Rng;
use recfuse::cpu::reference::{self, RefBranch, RefCrossGrads, RefCrossLayer};
use recfuse::ops::gated_cross::{
    BranchWeight, CrossLayerWeights, CrossMode, GatedCross, SavePolicy,
};
use recfuse::{DType, Device, Error, Tensor};

/// A generator of random tensors (and their f64 values) of a given shape and scale.
type RandTensor<'a> = dyn FnMut(&[usize], f32) -> (Tensor, Vec<f64>) + 'a;

/// Random weights in PyTorch layout (rounded to the config's dtype) and their f64 values.
fn random_weights(
    net: &GatedCross,
    r: &mut impl Rng,
    dev: &Device,
) -> (Vec<CrossLayerWeights>, Vec<RefCrossLayer>) {
    let d = net.width;
    let mut t = |shape: &[usize], scale: f32| {
        let (t, v) = common::random_tensor(r, shape, scale, net.dtype, dev);
        (t, v)
    };
    let ws = 1.0 / (d as f32).sqrt();
    let mut out = (Vec::new(), Vec::new());
    for _ in 0..net.layers {
        let branch = |t: &mut RandTensor<'_>| match net.rank {
            None => {
                let (w, wv) = t(&[d, d], ws);
                (BranchWeight::Full(w), RefBranch::Full(wv))
            }
            Some(rk) => {
                let (u, uv) = t(&[d, rk], 1.0 / (rk as f32).sqrt());
                let (v, vv) = t(&[rk, d], ws);
                (
                    BranchWeight::LowRank { u, v },
                    RefBranch::LowRank {
                        u: uv,
                        v: vv,
                        r: rk,
                    },
                )
            }
        };
        let (wc, wcv) = branch(&mut t);
        let (bc, bcv) = t(&[d], 0.5);
        let (wg, wgv) = if net.mode == CrossMode::Gated {
            let (a, b) = branch(&mut t);
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        let (bg, bgv) = if net.gate_bias {
            let (a, b) = t(&[d], 0.5);
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        out.0.push(CrossLayerWeights {
            w_c: wc,
            b_c: bc,
            w_g: wg,
            b_g: bg,
        });
        out.1.push(RefCrossLayer {
            wc: wcv,
            bc: bcv,
            wg: wgv,
            bg: bgv,
        });
    }
    out
}

fn branch_vals(b: &BranchWeight) -> RefBranch {
    match b {
        BranchWeight::Full(w) => RefBranch::Full(w.to_f64_vec().unwrap()),
        BranchWeight::LowRank { u, v } => RefBranch::LowRank {
            u: u.to_f64_vec().unwrap(),
            v: v.to_f64_vec().unwrap(),
            r: v.shape()[0],
        },
    }
}

fn assert_branch(what: &str, got: &RefBranch, want: &RefBranch, tol: f64) {
    match (got, want) {
        (RefBranch::Full(g), RefBranch::Full(w)) => assert_close(what, g, w, tol),
        (RefBranch::LowRank { u: gu, v: gv, .. }, RefBranch::LowRank { u: wu, v: wv, .. }) => {
            assert_close(&format!("{what}.u"), gu, wu, tol);
            assert_close(&format!("{what}.v"), gv, wv, tol);
        }
        _ => panic!("{what}: rank mismatch"),
    }
}

/// Error budget for an L-layer stack: each layer adds one rounding of C (and of U, V, Δ in
/// backward) in the storage dtype, so the policy's per-op tolerance grows with depth.
fn stack_tol(dtype: DType, d: usize, layers: usize) -> f64 {
    common::tolerance(dtype, d) * (1.0 + 0.5 * layers as f64)
}

fn check(be: &Backend, net: &GatedCross, rows: usize, policy: SavePolicy) {
    let dev = &be.device;
    let what = format!("{} {net:?} rows={rows} {policy:?}", be.name);
    let mut r = rng(&what);
    let (weights, refl) = random_weights(net, &mut r, dev);
    let params = net.pack(&weights, dev).unwrap();
    let (x0, x0v) = common::random_tensor(&mut r, &[rows, net.width], 1.0, net.dtype, dev);
    let (y, saved) = net
        .forward(&x0, &params, policy)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let y_ref = reference::gated_cross_forward(rows, net.width, &x0v, &refl);
    let tol = stack_tol(net.dtype, net.width, net.layers);
    assert_close(&format!("{what} y"), &y.to_f64_vec().unwrap(), &y_ref, tol);

    let (dy, dyv) = common::random_tensor(&mut r, &[rows, net.width], 1.0, net.dtype, dev);
    // Poisoned packed gradients: overwrite mode must write every element it owns.
    let mut grads = net.zero_grads(&params).unwrap();
    for l in &mut grads.layers {
        l.w = Tensor::poisoned(l.w.shape(), l.w.dtype(), dev).unwrap();
        l.b = Tensor::poisoned(l.b.shape(), l.b.dtype(), dev).unwrap();
        // A packed low-rank gated U has structural zeros the kernels never write: keep them 0.
        if net.rank.is_none() || net.mode == CrossMode::DcnV2 {
            if let Some(u) = &mut l.u {
                *u = Tensor::poisoned(u.shape(), u.dtype(), dev).unwrap();
            }
        }
    }
    let dx = net
        .backward_into(&params, &saved, &dy, &mut grads, false)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (dx_ref, g_ref) = reference::gated_cross_backward(rows, net.width, &x0v, &refl, &dyv);
    let gtol = stack_tol(net.dtype, rows.max(net.width), net.layers);
    assert_close(
        &format!("{what} dx0"),
        &dx.to_f64_vec().unwrap(),
        &dx_ref,
        gtol,
    );
    let got = net.unpack_grads(&grads).unwrap();
    for (l, (g, want)) in got.iter().zip(&g_ref).enumerate() {
        let RefCrossGrads { wc, bc, wg, bg } = want;
        assert_branch(
            &format!("{what} layer {l} dW_c"),
            &branch_vals(&g.w_c),
            wc,
            gtol,
        );
        assert_close(
            &format!("{what} layer {l} db_c"),
            &g.b_c.to_f64_vec().unwrap(),
            bc,
            gtol,
        );
        if let (Some(gg), Some(w)) = (&g.w_g, wg) {
            assert_branch(&format!("{what} layer {l} dW_g"), &branch_vals(gg), w, gtol);
        }
        assert_eq!(g.w_g.is_some(), wg.is_some());
        if let (Some(gb), Some(w)) = (&g.b_g, bg) {
            assert_close(
                &format!("{what} layer {l} db_g"),
                &gb.to_f64_vec().unwrap(),
                w,
                gtol,
            );
        }
        assert_eq!(g.b_g.is_some(), bg.is_some());
    }
}

fn cfg(width: usize, layers: usize, dtype: DType) -> GatedCross {
    GatedCross {
        dtype,
        ..GatedCross::new(width, layers)
    }
}

#[test]
fn gated_every_dtype_odd_shapes() {
    for be in backends() {
        for dtype in DType::ALL {
            for (rows, d, l) in [(1, 7, 1), (37, 61, 3), (5, 189, 2)] {
                check(&be, &cfg(d, l, dtype), rows, SavePolicy::SaveAll);
            }
        }
    }
}

#[test]
fn depth_8_and_16() {
    for be in backends() {
        check(&be, &cfg(24, 8, DType::F32), 9, SavePolicy::SaveAll);
        check(&be, &cfg(16, 16, DType::F32), 5, SavePolicy::Recompute);
    }
}

#[test]
fn dcn_v2_low_rank_and_gate_bias() {
    for be in backends() {
        for dtype in [DType::F32, DType::BF16] {
            let base = cfg(29, 3, dtype);
            check(
                &be,
                &GatedCross {
                    mode: CrossMode::DcnV2,
                    ..base.clone()
                },
                13,
                SavePolicy::SaveAll,
            );
            check(
                &be,
                &GatedCross {
                    rank: Some(5),
                    ..base.clone()
                },
                13,
                SavePolicy::SaveAll,
            );
            check(
                &be,
                &GatedCross {
                    rank: Some(4),
                    mode: CrossMode::DcnV2,
                    ..base.clone()
                },
                13,
                SavePolicy::Recompute,
            );
            check(
                &be,
                &GatedCross {
                    gate_bias: true,
                    ..base.clone()
                },
                13,
                SavePolicy::Recompute,
            );
            check(
                &be,
                &GatedCross {
                    gate_bias: true,
                    rank: Some(3),
                    ..base.clone()
                },
                13,
                SavePolicy::Recompute,
            );
        }
    }
}

/// SaveAll and Recompute must give identical bits, and so must two runs.
#[test]
fn save_policies_agree_and_runs_are_deterministic() {
    for be in backends() {
        for net in [
            cfg(37, 3, DType::BF16),
            GatedCross {
                rank: Some(6),
                ..cfg(33, 2, DType::F32)
            },
        ] {
            let dev = &be.device;
            let mut r = rng("policies");
            let (weights, _) = random_weights(&net, &mut r, dev);
            let params = net.pack(&weights, dev).unwrap();
            let (x0, _) = common::random_tensor(&mut r, &[67, net.width], 1.0, net.dtype, dev);
            let (dy, _) = common::random_tensor(&mut r, &[67, net.width], 1.0, net.dtype, dev);
            let run = |policy| {
                let (y, saved) = net.forward(&x0, &params, policy).unwrap();
                let (dx, g) = net.backward(&params, &saved, &dy).unwrap();
                let mut bits = vec![y.to_bytes().unwrap(), dx.to_bytes().unwrap()];
                for l in &g.layers {
                    bits.push(l.w.to_bytes().unwrap());
                    bits.push(l.b.to_bytes().unwrap());
                    if let Some(u) = &l.u {
                        bits.push(u.to_bytes().unwrap());
                    }
                }
                bits
            };
            let a = run(SavePolicy::SaveAll);
            assert!(
                a == run(SavePolicy::SaveAll),
                "{}: two runs differ",
                be.name
            );
            assert!(
                a == run(SavePolicy::Recompute),
                "{}: SaveAll and Recompute differ",
                be.name
            );
        }
    }
}

#[test]
fn deep_bf16_stack_stays_finite() {
    for be in backends() {
        let net = cfg(64, 16, DType::BF16);
        let dev = &be.device;
        let weights = net
            .init(recfuse::ops::gated_cross::Init::Gdcn, 3, dev)
            .unwrap();
        let params = net.pack(&weights, dev).unwrap();
        let mut r = rng("deep bf16");
        let (x0, _) = common::random_tensor(&mut r, &[32, 64], 1.0, DType::BF16, dev);
        let (y, saved) = net.forward(&x0, &params, SavePolicy::SaveAll).unwrap();
        assert!(
            y.to_f32_vec().unwrap().iter().all(|v| v.is_finite()),
            "{}: y not finite",
            be.name
        );
        let dy = Tensor::full(&[32, 64], 1e-2, DType::BF16, dev).unwrap();
        let (dx, g) = net.backward(&params, &saved, &dy).unwrap();
        assert!(
            dx.to_f32_vec().unwrap().iter().all(|v| v.is_finite()),
            "{}: dx not finite",
            be.name
        );
        for l in &g.layers {
            assert!(
                l.w.to_f32_vec().unwrap().iter().all(|v| v.is_finite()),
                "{}: dW not finite",
                be.name
            );
        }
    }
}

/// The reference backward against central differences of the reference forward (so the
/// oracle the backends are held to is itself checked), for every mode.
#[test]
fn reference_backward_matches_finite_differences() {
    let (rows, d) = (3, 4);
    let mut r = rng("fd");
    let mut u = |n: usize, s: f64| (0..n).map(|_| r.random_range(-s..s)).collect::<Vec<f64>>();
    let x0 = u(rows * d, 1.0);
    let dy = u(rows * d, 1.0);
    for (gated, low, gate_bias) in [
        (true, false, false),
        (true, true, true),
        (false, false, false),
        (false, true, false),
    ] {
        let br = |u: &mut dyn FnMut(usize, f64) -> Vec<f64>| {
            if low {
                RefBranch::LowRank {
                    u: u(d * 2, 0.7),
                    v: u(2 * d, 0.7),
                    r: 2,
                }
            } else {
                RefBranch::Full(u(d * d, 0.7))
            }
        };
        let layers: Vec<RefCrossLayer> = (0..2)
            .map(|_| RefCrossLayer {
                wc: br(&mut u),
                bc: u(d, 0.5),
                wg: gated.then(|| br(&mut u)),
                bg: gate_bias.then(|| u(d, 0.5)),
            })
            .collect();
        let loss = |x0: &[f64], layers: &[RefCrossLayer]| {
            reference::gated_cross_forward(rows, d, x0, layers)
                .iter()
                .zip(&dy)
                .map(|(a, b)| a * b)
                .sum::<f64>()
        };
        let (dx, grads) = reference::gated_cross_backward(rows, d, &x0, &layers, &dy);
        let h = 1e-5;
        assert_close(
            "dx0 vs fd",
            &dx,
            &finite_diff(&x0, h, |x| loss(x, &layers)),
            1e-7,
        );
        // Perturb one parameter vector of layer 0 at a time.
        let fd_of = |get: &dyn Fn(&mut RefCrossLayer) -> &mut Vec<f64>| {
            let mut ls = layers.clone();
            let v = get(&mut ls[0]).clone();
            finite_diff(&v, h, |p| {
                let mut ls2 = ls.clone();
                *get(&mut ls2[0]) = p.to_vec();
                loss(&x0, &ls2)
            })
        };
        assert_close("db_c vs fd", &grads[0].bc, &fd_of(&|l| &mut l.bc), 1e-7);
        let first = |b: &mut RefBranch| -> *mut Vec<f64> {
            match b {
                RefBranch::Full(w) => w,
                RefBranch::LowRank { u, .. } => u,
            }
        };
        // SAFETY: the pointer comes from a live &mut borrow of the same layer and is turned
        // straight back into a unique reference with that borrow's lifetime.
        let fd_wc = fd_of(&|l| unsafe { &mut *first(&mut l.wc) });
        match &grads[0].wc {
            RefBranch::Full(g) | RefBranch::LowRank { u: g, .. } => {
                assert_close("dW_c vs fd", g, &fd_wc, 1e-7)
            }
        }
        if gated {
            // SAFETY: as above.
            let fd_wg = fd_of(&|l| unsafe { &mut *first(l.wg.as_mut().unwrap()) });
            match grads[0].wg.as_ref().unwrap() {
                RefBranch::Full(g) | RefBranch::LowRank { u: g, .. } => {
                    assert_close("dW_g vs fd", g, &fd_wg, 1e-7)
                }
            }
        }
        if low {
            let fd_v = fd_of(&|l| match &mut l.wc {
                RefBranch::LowRank { v, .. } => v,
                RefBranch::Full(w) => w,
            });
            match &grads[0].wc {
                RefBranch::LowRank { v, .. } => assert_close("dV_c vs fd", v, &fd_v, 1e-7),
                RefBranch::Full(_) => unreachable!(),
            }
        }
        if gate_bias {
            assert_close(
                "db_g vs fd",
                grads[0].bg.as_ref().unwrap(),
                &fd_of(&|l| l.bg.as_mut().unwrap()),
                1e-7,
            );
        }
    }
}

/// Every backend's f32 gradients against finite differences of the f64 forward.
#[test]
fn backend_gradients_match_finite_differences() {
    for be in backends() {
        let net = GatedCross {
            rank: Some(2),
            gate_bias: true,
            ..cfg(5, 2, DType::F32)
        };
        let dev = &be.device;
        let mut r = rng("fd backend");
        let (weights, refl) = random_weights(&net, &mut r, dev);
        let params = net.pack(&weights, dev).unwrap();
        let (x0, x0v) = common::random_tensor(&mut r, &[3, 5], 1.0, DType::F32, dev);
        let (dy, dyv) = common::random_tensor(&mut r, &[3, 5], 1.0, DType::F32, dev);
        let (_, saved) = net.forward(&x0, &params, SavePolicy::SaveAll).unwrap();
        let (dx, grads) = net.backward(&params, &saved, &dy).unwrap();
        let loss = |x: &[f64], ls: &[RefCrossLayer]| {
            reference::gated_cross_forward(3, 5, x, ls)
                .iter()
                .zip(&dyv)
                .map(|(a, b)| a * b)
                .sum::<f64>()
        };
        assert_close(
            &format!("{} dx0 vs fd", be.name),
            &dx.to_f64_vec().unwrap(),
            &finite_diff(&x0v, 1e-5, |x| loss(x, &refl)),
            1e-5,
        );
        let got = net.unpack_grads(&grads).unwrap();
        let fd_bg = finite_diff(refl[1].bg.as_ref().unwrap(), 1e-5, |p| {
            let mut ls = refl.clone();
            ls[1].bg = Some(p.to_vec());
            loss(&x0v, &ls)
        });
        assert_close(
            &format!("{} db_g vs fd", be.name),
            &got[1].b_g.as_ref().unwrap().to_f64_vec().unwrap(),
            &fd_bg,
            1e-5,
        );
    }
}

#[test]
fn pack_unpack_round_trip() {
    let dev = Device::cpu();
    for net in [
        cfg(7, 2, DType::F32),
        GatedCross {
            rank: Some(3),
            gate_bias: true,
            ..cfg(7, 2, DType::F32)
        },
        GatedCross {
            mode: CrossMode::DcnV2,
            ..cfg(7, 1, DType::F32)
        },
    ] {
        let mut r = rng("pack");
        let (weights, refl) = random_weights(&net, &mut r, &dev);
        let back = net
            .unpack_grads(&net.pack(&weights, &dev).unwrap())
            .unwrap();
        for (b, want) in back.iter().zip(&refl) {
            assert_branch("w_c", &branch_vals(&b.w_c), &want.wc, 0.0);
            assert_close("b_c", &b.b_c.to_f64_vec().unwrap(), &want.bc, 0.0);
            if let Some(wg) = &want.wg {
                assert_branch("w_g", &branch_vals(b.w_g.as_ref().unwrap()), wg, 0.0);
            }
        }
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let dev = Device::cpu();
    let net = cfg(8, 2, DType::F32);
    let params = net
        .pack(
            &net.init(recfuse::ops::gated_cross::Init::DcnV2, 1, &dev)
                .unwrap(),
            &dev,
        )
        .unwrap();
    let x = Tensor::zeros(&[4, 7], DType::F32, &dev).unwrap();
    let e = net.forward(&x, &params, SavePolicy::SaveAll).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x0", .. }), "{e}");
    let x = Tensor::zeros(&[4, 8], DType::BF16, &dev).unwrap();
    let e = net.forward(&x, &params, SavePolicy::SaveAll).unwrap_err();
    assert!(matches!(e, Error::DType { arg: "x0", .. }), "{e}");
    let e = cfg(8, 3, DType::F32)
        .forward(
            &Tensor::zeros(&[4, 8], DType::F32, &dev).unwrap(),
            &params,
            SavePolicy::SaveAll,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "params", .. }),
        "{e}"
    );
    let e = cfg(8, 0, DType::F32)
        .init(recfuse::ops::gated_cross::Init::Gdcn, 0, &dev)
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "layers", .. }),
        "{e}"
    );
    let x = Tensor::zeros(&[4, 8], DType::F32, &dev).unwrap();
    let (_, saved) = net.forward(&x, &params, SavePolicy::SaveAll).unwrap();
    let e = net
        .backward(
            &params,
            &saved,
            &Tensor::zeros(&[5, 8], DType::F32, &dev).unwrap(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "dy", .. }), "{e}");
    let lowrank = GatedCross {
        rank: Some(2),
        ..net.clone()
    };
    let e = lowrank
        .pack(
            &net.init(recfuse::ops::gated_cross::Init::Gdcn, 1, &dev)
                .unwrap(),
            &dev,
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "w_c", .. }),
        "{e}"
    );
}

/// Without a gate bias the packed bias keeps (b_c, 0) pairs: its gradient's gate slots must stay
/// exactly 0 (overwrite and accumulate), or an optimizer on the packed form trains a gate bias
/// that `unpack_grads` then drops. Regression test: the backward used to fill them.
#[test]
fn packed_grads_keep_missing_gate_bias_zero() {
    for be in backends() {
        let dev = &be.device;
        for net in [
            cfg(13, 2, DType::F32),
            GatedCross {
                rank: Some(4),
                ..cfg(13, 2, DType::BF16)
            },
        ] {
            let what = format!("{} {net:?}", be.name);
            let mut r = rng(&what);
            let (weights, _) = random_weights(&net, &mut r, dev);
            let params = net.pack(&weights, dev).unwrap();
            let (x0, _) = common::random_tensor(&mut r, &[9, net.width], 1.0, net.dtype, dev);
            let (_, saved) = net.forward(&x0, &params, SavePolicy::SaveAll).unwrap();
            let (dy, _) = common::random_tensor(&mut r, &[9, net.width], 1.0, net.dtype, dev);
            let mut grads = net.zero_grads(&params).unwrap();
            for l in &mut grads.layers {
                l.b = Tensor::poisoned(l.b.shape(), l.b.dtype(), dev).unwrap();
            }
            net.backward_into(&params, &saved, &dy, &mut grads, false)
                .unwrap();
            net.backward_into(&params, &saved, &dy, &mut grads, true)
                .unwrap();
            for (l, g) in grads.layers.iter().enumerate() {
                let b = g.b.to_f64_vec().unwrap();
                assert_eq!(b.len(), 2 * net.width);
                for j in 0..net.width {
                    assert_eq!(b[2 * j + 1], 0.0, "{what} layer {l} gate-bias slot {j}");
                    assert!(
                        b[2 * j] != 0.0 && b[2 * j].is_finite(),
                        "{what} layer {l} db_c {j}"
                    );
                }
            }
        }
    }
}
