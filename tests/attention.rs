//! The attention core against the f64 reference (plain softmax Jacobian, no LSE trick):
//! d_k ≠ d_v, L ∈ {37, 38, 61}, masks (some keys, all keys), bias, query pruning, every dtype;
//! finite differences; typed errors.

mod common;

use common::{assert_close, backends, finite_diff, random_tensor, rng};
use recfuse::cpu::reference::{self, AttnDims};
use recfuse::ops::attention::Attention;
use recfuse::{DType, Error, Tensor};

#[allow(clippy::too_many_arguments)]
fn check(
    be: &common::Backend,
    d: AttnDims,
    dtype: DType,
    with_bias: bool,
    mask_kind: u8,
) -> recfuse::Result<()> {
    let dev = &be.device;
    let what = format!(
        "{} {d:?} {dtype} bias={with_bias} mask={mask_kind}",
        be.name
    );
    let mut r = rng(&what);
    let (q, qv) = random_tensor(&mut r, &[d.b, d.lq, d.h, d.dk], 1.0, dtype, dev);
    let (k, kv) = random_tensor(&mut r, &[d.b, d.l, d.h, d.dk], 1.0, dtype, dev);
    let (v, vv) = random_tensor(&mut r, &[d.b, d.l, d.h, d.dv], 1.0, dtype, dev);
    let bias = with_bias.then(|| random_tensor(&mut r, &[d.h, d.lq, d.l], 0.5, dtype, dev));
    // Mask kinds: 0 none; 1 every third key of sample 0 masked; 2 sample 0 fully masked.
    let mask: Option<Vec<bool>> = match mask_kind {
        0 => None,
        1 => Some((0..d.b * d.l).map(|i| !(i < d.l && i % 3 == 0)).collect()),
        _ => Some((0..d.b * d.l).map(|i| i >= d.l).collect()),
    };
    let mask_t = mask.as_ref().map(|m| {
        let f: Vec<f32> = m.iter().map(|&x| x as u8 as f32).collect();
        Tensor::from_f32(&f, &[d.b, d.l], DType::F32, dev).unwrap()
    });
    let att = Attention::default();
    let scale = 1.0 / (d.dk.max(1) as f64).sqrt();
    let fwd = att.forward(&q, &k, &v, bias.as_ref().map(|b| &b.0), mask_t.as_ref())?;
    let (o_ref, lse_ref) = reference::attention_forward(
        d,
        &qv,
        &kv,
        &vv,
        bias.as_ref().map(|b| b.1.as_slice()),
        mask.as_deref(),
        scale,
    );
    let tol = common::tolerance(dtype, d.l.max(d.dk));
    assert_close(
        &format!("{what} O"),
        &fwd.o.to_f64_vec().unwrap(),
        &o_ref,
        tol,
    );
    let lse = fwd.lse.to_f64_vec().unwrap();
    for (g, w) in lse.iter().zip(&lse_ref) {
        if w.is_infinite() {
            assert!(
                g.is_infinite() && *g < 0.0,
                "{what}: all-masked row must have LSE = −∞"
            );
        } else {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{what}: LSE {g} vs {w}"
            );
        }
    }
    let (d_o, dov) = random_tensor(&mut r, &[d.b, d.lq, d.h, d.dv], 1.0, dtype, dev);
    let g = att
        .backward(
            &q,
            &k,
            &v,
            bias.as_ref().map(|b| &b.0),
            mask_t.as_ref(),
            &fwd,
            &d_o,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (dq, dk, dv, db) = reference::attention_backward(
        d,
        &qv,
        &kv,
        &vv,
        bias.as_ref().map(|b| b.1.as_slice()),
        mask.as_deref(),
        scale,
        &dov,
    );
    let gtol = common::tolerance(dtype, d.l * d.b) * 4.0;
    assert_close(
        &format!("{what} dQ"),
        &g.dq.to_f64_vec().unwrap(),
        &dq,
        gtol,
    );
    assert_close(
        &format!("{what} dK"),
        &g.dk.to_f64_vec().unwrap(),
        &dk,
        gtol,
    );
    assert_close(
        &format!("{what} dV"),
        &g.dv.to_f64_vec().unwrap(),
        &dv,
        gtol,
    );
    if let Some(gb) = &g.dbias {
        assert_close(
            &format!("{what} dbias"),
            &gb.to_f64_vec().unwrap(),
            &db,
            gtol,
        );
    }
    assert_eq!(g.dbias.is_some(), with_bias);
    Ok(())
}

fn dims(b: usize, lq: usize, l: usize) -> AttnDims {
    AttnDims {
        b,
        lq,
        l,
        h: 2,
        dk: 16,
        dv: 64,
    }
}

#[test]
fn paper_head_dims_odd_token_counts_every_dtype() {
    for be in backends() {
        for dtype in DType::ALL {
            for l in [37, 38, 61] {
                if !common::supported(&be, "attention", check(&be, dims(3, l, l), dtype, false, 0))
                {
                    break;
                }
            }
        }
    }
}

/// Ragged head dims inside every compiled (d_k, d_v) bucket of the CUDA kernel (zero padding
/// up to the bucket), with a bias and a partial mask; combinations a backend does not compile
/// report `Unsupported`.
#[test]
fn every_head_dim_bucket() {
    for be in backends() {
        for dk in [9, 20, 40] {
            for dv in [5, 24, 50, 100] {
                let d = AttnDims {
                    b: 2,
                    lq: 7,
                    l: 11,
                    h: 2,
                    dk,
                    dv,
                };
                common::supported(&be, "attention", check(&be, d, DType::F32, true, 1));
            }
        }
    }
}

#[test]
fn masks_bias_and_pruning() {
    for be in backends() {
        let tiny = AttnDims {
            b: 2,
            lq: 1,
            l: 1,
            h: 1,
            dk: 3,
            dv: 5,
        };
        let cases = [
            (dims(3, 38, 38), DType::F32, true, 1),
            (dims(3, 38, 38), DType::F32, true, 2), // sample 0 has no valid key
            (dims(4, 2, 37), DType::F32, true, 1),  // pruned: the last 2 tokens as queries
            (tiny, DType::BF16, false, 0),
            // Zero head widths are legal: scores from the bias alone; an empty O.
            (
                AttnDims {
                    b: 2,
                    lq: 3,
                    l: 4,
                    h: 2,
                    dk: 0,
                    dv: 3,
                },
                DType::F32,
                true,
                1,
            ),
            (
                AttnDims {
                    b: 2,
                    lq: 3,
                    l: 4,
                    h: 2,
                    dk: 2,
                    dv: 0,
                },
                DType::F32,
                true,
                0,
            ),
        ];
        for (d, dt, bias, mask) in cases {
            if !common::supported(&be, "attention", check(&be, d, dt, bias, mask)) {
                break;
            }
        }
    }
}

#[test]
fn all_masked_rows_are_zero_not_nan() {
    let be = &backends()[0];
    let dev = &be.device;
    let q = Tensor::full(&[1, 3, 1, 4], 1.0, DType::F32, dev).unwrap();
    let v = Tensor::full(&[1, 3, 1, 2], 5.0, DType::F32, dev).unwrap();
    let mask = Tensor::zeros(&[1, 3], DType::F32, dev).unwrap();
    let att = Attention::default();
    let fwd = att.forward(&q, &q, &v, None, Some(&mask)).unwrap();
    assert!(fwd.o.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
    let d_o = Tensor::full(&[1, 3, 1, 2], 1.0, DType::F32, dev).unwrap();
    let g = att
        .backward(&q, &q, &v, None, Some(&mask), &fwd, &d_o)
        .unwrap();
    for t in [&g.dq, &g.dk, &g.dv] {
        assert!(t.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
    }
}

/// The reference backward against central differences of the reference forward.
#[test]
fn reference_matches_finite_differences() {
    let d = AttnDims {
        b: 2,
        lq: 2,
        l: 3,
        h: 2,
        dk: 3,
        dv: 2,
    };
    let mut r = rng("attn fd");
    let mut n = |s: usize| {
        common::uniform(&mut r, s, 1.0)
            .into_iter()
            .map(f64::from)
            .collect::<Vec<f64>>()
    };
    let (q, k, v, bias, go) = (
        n(2 * 2 * 2 * 3),
        n(2 * 3 * 2 * 3),
        n(2 * 3 * 2 * 2),
        n(2 * 2 * 3),
        n(2 * 2 * 2 * 2),
    );
    let mask = vec![true, false, true, true, true, true];
    let loss = |q: &[f64], k: &[f64], v: &[f64], b: &[f64]| {
        let (o, _) = reference::attention_forward(d, q, k, v, Some(b), Some(&mask), 0.7);
        o.iter().zip(&go).map(|(a, g)| a * g).sum::<f64>()
    };
    let (dq, dk, dv, db) =
        reference::attention_backward(d, &q, &k, &v, Some(&bias), Some(&mask), 0.7, &go);
    let h = 1e-6;
    assert_close(
        "dq",
        &dq,
        &finite_diff(&q, h, |x| loss(x, &k, &v, &bias)),
        1e-6,
    );
    assert_close(
        "dk",
        &dk,
        &finite_diff(&k, h, |x| loss(&q, x, &v, &bias)),
        1e-6,
    );
    assert_close(
        "dv",
        &dv,
        &finite_diff(&v, h, |x| loss(&q, &k, x, &bias)),
        1e-6,
    );
    assert_close(
        "dbias",
        &db,
        &finite_diff(&bias, h, |x| loss(&q, &k, &v, x)),
        1e-6,
    );
}

#[test]
fn bad_input() {
    let dev = recfuse::Device::cpu();
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    let att = Attention::default();
    let e = att
        .forward(
            &t(&[2, 3, 2, 4]),
            &t(&[2, 3, 2, 5]),
            &t(&[2, 3, 2, 6]),
            None,
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "k", .. }), "{e}");
    let e = att
        .forward(
            &t(&[2, 4, 2, 4]),
            &t(&[2, 3, 2, 4]),
            &t(&[2, 3, 2, 6]),
            None,
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "q", .. }), "{e}");
    let e = att
        .forward(
            &t(&[2, 3, 2, 4]),
            &t(&[2, 3, 2, 4]),
            &t(&[2, 3, 2, 6]),
            Some(&t(&[2, 3, 4])),
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "bias", .. }), "{e}");
    let e = att
        .forward(
            &t(&[2, 3, 2, 4]),
            &t(&[2, 3, 2, 4]),
            &t(&[2, 3, 2, 6]),
            None,
            Some(&t(&[3, 3])),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "mask", .. }), "{e}");
}

/// A NaN in one input makes NaN exactly the outputs the f64 reference makes NaN, and leaves the
/// others equal to it, on every backend: the forward reads only unmasked keys (a NaN in a
/// masked key's K or V never reaches O), while the backward products run dense over every key
/// (a masked key has P = 0, and 0 · NaN is NaN), as a materialised implementation's do. A
/// fully masked sample stays exactly 0. Samples: 0 with every third key masked, 1 fully
/// masked, 2 unmasked.
#[test]
fn nan_inputs_are_nan_exactly_where_the_reference_is() {
    let d = AttnDims {
        b: 3,
        lq: 5,
        l: 7,
        h: 2,
        dk: 8,
        dv: 6,
    };
    let mask: Vec<bool> = (0..d.b * d.l)
        .map(|i| match i / d.l {
            0 => i % 3 != 0,
            1 => false,
            _ => true,
        })
        .collect();
    let at = |bb: usize, t: usize, hh: usize, c: usize, w: usize, len: usize| {
        ((bb * len + t) * d.h + hh) * w + c
    };
    // (what, tensor index 0 = q, 1 = k, 2 = v, 3 = bias, 4 = dO; element)
    let cases: Vec<(&str, usize, usize)> = vec![
        ("a query of sample 0", 0, at(0, 2, 1, 3, d.dk, d.lq)),
        (
            "a query of the masked sample",
            0,
            at(1, 1, 0, 0, d.dk, d.lq),
        ),
        ("an unmasked key", 1, at(2, 4, 0, 5, d.dk, d.l)),
        ("a masked key", 1, at(0, 3, 1, 2, d.dk, d.l)),
        ("an unmasked value", 2, at(0, 1, 0, 4, d.dv, d.l)),
        ("a masked value", 2, at(0, 6, 1, 1, d.dv, d.l)),
        ("a bias entry", 3, (d.lq + 2) * d.l + 4),
        ("an output gradient", 4, at(2, 0, 1, 2, d.dv, d.lq)),
    ];
    let scale = 1.0 / (d.dk as f64).sqrt();
    let mut wrong = Vec::new();
    for be in backends() {
        let dev = &be.device;
        for (what, which, e) in &cases {
            let what = format!("{}: NaN in {what}", be.name);
            let mut r = rng("attention nan");
            let shapes: [Vec<usize>; 5] = [
                vec![d.b, d.lq, d.h, d.dk],
                vec![d.b, d.l, d.h, d.dk],
                vec![d.b, d.l, d.h, d.dv],
                vec![d.h, d.lq, d.l],
                vec![d.b, d.lq, d.h, d.dv],
            ];
            let mut vals: Vec<Vec<f32>> = shapes
                .iter()
                .map(|s| common::uniform(&mut r, s.iter().product(), 1.0))
                .collect();
            vals[*which][*e] = f32::NAN;
            let t: Vec<Tensor> = vals
                .iter()
                .zip(&shapes)
                .map(|(v, s)| Tensor::from_f32(v, s, DType::F32, dev).unwrap())
                .collect();
            let f64s: Vec<Vec<f64>> = vals
                .iter()
                .map(|v| v.iter().map(|&x| x as f64).collect())
                .collect();
            let mf: Vec<f32> = mask.iter().map(|&x| x as u8 as f32).collect();
            let mask_t = Tensor::from_f32(&mf, &[d.b, d.l], DType::F32, dev).unwrap();
            let att = Attention::default();
            let fwd = att
                .forward(&t[0], &t[1], &t[2], Some(&t[3]), Some(&mask_t))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let g = att
                .backward(&t[0], &t[1], &t[2], Some(&t[3]), Some(&mask_t), &fwd, &t[4])
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let (o, lse) = reference::attention_forward(
                d,
                &f64s[0],
                &f64s[1],
                &f64s[2],
                Some(&f64s[3]),
                Some(&mask),
                scale,
            );
            let (dq, dk, dv, db) = reference::attention_backward(
                d,
                &f64s[0],
                &f64s[1],
                &f64s[2],
                Some(&f64s[3]),
                Some(&mask),
                scale,
                &f64s[4],
            );
            let dbias = g.dbias.as_ref().expect("a bias gradient");
            for (name, got, want) in [
                ("O", &fwd.o, &o),
                ("LSE", &fwd.lse, &lse),
                ("dQ", &g.dq, &dq),
                ("dK", &g.dk, &dk),
                ("dV", &g.dv, &dv),
                ("dbias", dbias, &db),
            ] {
                let got = got.to_f64_vec().unwrap();
                let bad: Vec<usize> = (0..got.len())
                    .filter(|&i| {
                        let (g, w) = (got[i], want[i]);
                        g.is_nan() != w.is_nan()
                            || (w.is_finite() && (g - w).abs() > 1e-4 * (1.0 + w.abs()))
                            || (w.is_infinite() && g != w)
                    })
                    .collect();
                if let Some(&i) = bad.first() {
                    wrong.push(format!(
                        "{what}: {name}: {} of {} elements differ, first [{i}] is {}, the reference's {}",
                        bad.len(),
                        got.len(),
                        got[i],
                        want[i]
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
