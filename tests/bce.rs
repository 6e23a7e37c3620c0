//! Fused BCE-with-logits on every backend against an f64 PyTorch-formula reference: loss and
//! dlogits, weights on/off, mean/sum, every dtype, ragged sizes, NaN propagation, bad input.

mod common;

use common::{assert_close, assert_close_scaled, backends, random_tensor, rng, tolerance};
use rand::Rng;
use recfuse::ops::bce::{bce_with_logits, bce_with_logits_value, Reduction};
use recfuse::{DType, Error, Tensor};

/// PyTorch: ℓ = w·(max(x,0) − x·y + log1p(exp(−|x|))), ∂ = w·(σ(x) − y), scaled by 1/N for Mean.
fn reference(x: &[f64], y: &[f64], w: Option<&[f64]>, red: Reduction) -> (f64, Vec<f64>) {
    let n = x.len() as f64;
    let s = if red == Reduction::Mean { 1.0 / n } else { 1.0 };
    let mut total = 0.0;
    let mut g = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let wi = w.map_or(1.0, |w| w[i]);
        total += wi * (x[i].max(0.0) - x[i] * y[i] + (-x[i].abs()).exp().ln_1p());
        g.push(wi * (1.0 / (1.0 + (-x[i]).exp()) - y[i]) * s);
    }
    (total * s, g)
}

#[test]
fn bce_matches_f64_reference() {
    let mut r = rng("bce");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for &n in &[1usize, 31, 33, 1001, 70_001] {
                for weighted in [false, true] {
                    for red in [Reduction::Mean, Reduction::Sum] {
                        let what = format!("{} {dt} n={n} w={weighted} {red:?}", be.name);
                        let (x, xv) = random_tensor(&mut r, &[n], 8.0, dt, dev);
                        let yh: Vec<f32> = (0..n).map(|_| r.random_range(0.0..1.0)).collect();
                        let y = Tensor::from_f32(&yh, &[n], dt, dev).unwrap();
                        let yv = y.to_f64_vec().unwrap();
                        let (w, wv) = random_tensor(&mut r, &[n], 1.0, dt, dev);
                        let wopt = weighted.then_some(&w);
                        let mut g = Tensor::poisoned(&[n], dt, dev).unwrap();
                        let loss = bce_with_logits(&x, &y, wopt, red, Some(&mut g)).unwrap();
                        assert_eq!(loss.shape(), &[] as &[usize]);
                        let (want_l, want_g) =
                            reference(&xv, &yv, weighted.then_some(wv.as_slice()), red);
                        let got_l = loss.to_f64_vec().unwrap()[0];
                        // The loss is an f32 sum of n terms whatever the input dtype.
                        let tl = tolerance(DType::F32, n) * 4.0;
                        let scale = want_l.abs().max(1e-3);
                        assert!(
                            (got_l - want_l).abs() / scale <= tl,
                            "{what}: loss {got_l} want {want_l}"
                        );
                        // Mean gradients over large n are ~1/n: f16 stores them as subnormals,
                        // whose absolute quantum (2^-24) sets the error floor.
                        let f16_floor = if dt == DType::F16 {
                            2f64.powi(-24) / tolerance(dt, 1)
                        } else {
                            0.0
                        };
                        // Each gradient w·(σ(x) − y)·s is a difference of two terms that can
                        // cancel (σ ≈ y), so its rounding is set by the terms, not the result: one
                        // element at n = 1 flaked at 2.7e-5 of a 8.3e-4 result (2e-8 absolute).
                        let s = if red == Reduction::Mean {
                            1.0 / n as f64
                        } else {
                            1.0
                        };
                        let terms = (0..n).fold(0f64, |m, i| {
                            let wi = if weighted { wv[i].abs() } else { 1.0 };
                            let sig = 1.0 / (1.0 + (-xv[i]).exp());
                            m.max(wi * sig.max(yv[i].abs()) * s)
                        });
                        let floor = f16_floor.max(terms);
                        assert_close_scaled(
                            &format!("{what} dlogits"),
                            &g.to_f64_vec().unwrap(),
                            &want_g,
                            tolerance(dt, 1),
                            floor,
                        );
                        // The loss-only form gives the same value, bit for bit.
                        let l2 = bce_with_logits_value(&x, &y, wopt, red, None).unwrap();
                        assert_eq!(l2 as f64, got_l, "{what}: loss-only pass differs");
                    }
                }
            }
        }
    }
}

/// Large |x| is stable (no inf/NaN), and the loss is deterministic run to run.
#[test]
fn stable_and_deterministic() {
    for be in backends() {
        let dev = &be.device;
        let xs = [-100.0f32, -30.0, 30.0, 100.0, 0.0];
        let ys = [1.0f32, 0.0, 1.0, 0.0, 0.5];
        let x = Tensor::from_slice(&xs, &[5], dev).unwrap();
        let y = Tensor::from_slice(&ys, &[5], dev).unwrap();
        let mut g = Tensor::poisoned(&[5], DType::F32, dev).unwrap();
        let l = bce_with_logits_value(&x, &y, None, Reduction::Sum, Some(&mut g)).unwrap();
        let xd: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        let yd: Vec<f64> = ys.iter().map(|&v| v as f64).collect();
        let (want, wg) = reference(&xd, &yd, None, Reduction::Sum);
        assert!(
            (l as f64 - want).abs() <= 1e-5 * want,
            "{}: {l} vs {want}",
            be.name
        );
        assert_close(be.name, &g.to_f64_vec().unwrap(), &wg, 1e-6);
        let again = bce_with_logits_value(&x, &y, None, Reduction::Sum, None).unwrap();
        assert_eq!(l.to_bits(), again.to_bits(), "{}", be.name);
    }
}

#[test]
fn nan_in_logits_or_targets_reaches_the_loss() {
    for be in backends() {
        let dev = &be.device;
        for (xs, ys) in [
            ([0.5f32, f32::NAN], [1.0f32, 0.0]),
            ([0.5, 1.0], [f32::NAN, 0.0]),
        ] {
            let x = Tensor::from_slice(&xs, &[2], dev).unwrap();
            let y = Tensor::from_slice(&ys, &[2], dev).unwrap();
            let l = bce_with_logits_value(&x, &y, None, Reduction::Mean, None).unwrap();
            assert!(l.is_nan(), "{}: {xs:?} {ys:?} gave {l}", be.name);
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    for be in backends() {
        let dev = &be.device;
        let x = Tensor::zeros(&[4], DType::F32, dev).unwrap();
        let bad = Tensor::zeros(&[5], DType::F32, dev).unwrap();
        let r = |res: recfuse::Result<Tensor>| res.err();
        assert!(matches!(
            r(bce_with_logits(&x, &bad, None, Reduction::Mean, None)),
            Some(Error::Shape { arg: "targets", .. })
        ));
        assert!(matches!(
            r(bce_with_logits(&x, &x, Some(&bad), Reduction::Mean, None)),
            Some(Error::Shape { arg: "weight", .. })
        ));
        let mut g = Tensor::zeros(&[5], DType::F32, dev).unwrap();
        assert!(matches!(
            r(bce_with_logits(&x, &x, None, Reduction::Mean, Some(&mut g))),
            Some(Error::Shape { arg: "dlogits", .. })
        ));
        if be.name != "cpu" {
            let host = Tensor::zeros(&[4], DType::F32, &recfuse::Device::cpu()).unwrap();
            assert!(matches!(
                r(bce_with_logits(&x, &host, None, Reduction::Mean, None)),
                Some(Error::DeviceMismatch { arg: "targets", .. })
            ));
        }
    }
}
