//! The composed feature-token layers against a whole-layer f64 reference built from the
//! reference blocks; finite differences for the input and every weight; pruning; a group map;
//! and the structural check: the heterogeneous layer equals the Hiformer layer whose A·R is
//! block-diagonal with the per-token weights.

mod common;

use common::{assert_close, backends, finite_diff, rng};
use recfuse::cpu::reference::{self, AttnDims, LinearDims};
use recfuse::ops::hiformer::{
    HeteroAttentionLayer, HiformerLayer, LayerConfig, LayerParams, QkvParams,
};
use recfuse::ops::lowrank_qkv::QkvWeights;
use recfuse::Activation;
use recfuse::{DType, Device, Error, Tensor};

/// f64 values of every parameter, in a fixed order.
fn params_f64(p: &LayerParams) -> Vec<Vec<f64>> {
    let mut v = Vec::new();
    match &p.qkv {
        QkvParams::PerToken { wq, wk, wv } => {
            for t in [wq, wk, wv] {
                v.push(t.to_f64_vec().unwrap());
            }
        }
        QkvParams::LowRank(w) => {
            for t in [&w.a, &w.rq, &w.rk, &w.rv] {
                v.push(t.to_f64_vec().unwrap());
            }
        }
    }
    for t in [
        &p.wo, &p.bo, &p.w1, &p.b1, &p.w2, &p.b2, &p.ln1_g, &p.ln1_b, &p.ln2_g, &p.ln2_b,
    ] {
        v.push(t.to_f64_vec().unwrap());
    }
    v
}

/// Per-token linear in f64 with a group map: y[b, t] = x[b, xt0 + t]·W[g(wt0 + t)]ᵀ + bias.
#[allow(clippy::too_many_arguments)]
fn toklin(
    x: &[f64],
    b: usize,
    xl: usize,
    xt0: usize,
    wt0: usize,
    count: usize,
    inp: usize,
    out: usize,
    w: &[f64],
    bias: Option<&[f64]>,
    map: &dyn Fn(usize) -> usize,
) -> Vec<f64> {
    let mut y = vec![0.0; b * count * out];
    for bb in 0..b {
        for t in 0..count {
            let g = map(wt0 + t);
            let xs: Vec<f64> = x[(bb * xl + xt0 + t) * inp..][..inp].to_vec();
            let bs: Option<Vec<f64>> = bias.map(|bi| bi[g * out..][..out].to_vec());
            let (yt, _) = reference::linear_forward(
                LinearDims {
                    rows: 1,
                    groups: 1,
                    inp,
                    out,
                },
                &xs,
                &w[g * out * inp..][..out * inp],
                bs.as_deref(),
                None,
                Activation::None,
            );
            y[(bb * count + t) * out..][..out].copy_from_slice(&yt);
        }
    }
    y
}

/// The whole layer in f64.
fn layer_ref(
    c: &LayerConfig,
    lowrank: Option<(usize, usize)>,
    b: usize,
    x: &[f64],
    p: &[Vec<f64>],
) -> Vec<f64> {
    let (l, d, h, dk, dv, df) = (c.tokens, c.width, c.heads, c.dk, c.dv, c.dff);
    let lq = c.task_tokens.unwrap_or(l);
    let q0 = l - lq;
    let map = |t: usize| c.group_map.as_ref().map_or(t, |m| m[t]);
    let (q, k, v, rest) = match lowrank {
        None => (
            toklin(x, b, l, q0, q0, lq, d, h * dk, &p[0], None, &map),
            toklin(x, b, l, 0, 0, l, d, h * dk, &p[1], None, &map),
            toklin(x, b, l, 0, 0, l, d, h * dv, &p[2], None, &map),
            &p[3..],
        ),
        Some((rqk, rv)) => {
            let rt = 2 * rqk + rv;
            let (z, _) = reference::linear_forward(
                LinearDims {
                    rows: b,
                    groups: 1,
                    inp: l * d,
                    out: rt,
                },
                x,
                &p[0],
                None,
                None,
                Activation::None,
            );
            let part = |off: usize, r: usize, rm: &[f64], n: usize| {
                let zs: Vec<f64> = (0..b)
                    .flat_map(|i| z[i * rt + off..][..r].to_vec())
                    .collect();
                reference::linear_forward(
                    LinearDims {
                        rows: b,
                        groups: 1,
                        inp: r,
                        out: n,
                    },
                    &zs,
                    rm,
                    None,
                    None,
                    Activation::None,
                )
                .0
            };
            (
                part(0, rqk, &p[1], lq * h * dk),
                part(rqk, rqk, &p[2], l * h * dk),
                part(2 * rqk, rv, &p[3], l * h * dv),
                &p[4..],
            )
        }
    };
    let (wo, bo, w1, b1, w2, b2, g1, be1, g2, be2) = (
        &rest[0], &rest[1], &rest[2], &rest[3], &rest[4], &rest[5], &rest[6], &rest[7], &rest[8],
        &rest[9],
    );
    let scale = c.scale.map_or(1.0 / (dk as f64).sqrt(), f64::from);
    let (o, _) = reference::attention_forward(
        AttnDims {
            b,
            lq,
            l,
            h,
            dk,
            dv,
        },
        &q,
        &k,
        &v,
        None,
        None,
        scale,
    );
    let proj = toklin(&o, b, lq, 0, q0, lq, h * dv, d, wo, Some(bo), &map);
    let xq: Vec<f64> = (0..b)
        .flat_map(|i| x[(i * l + q0) * d..][..lq * d].to_vec())
        .collect();
    let ln_t = if c.per_token_ln { lq } else { 1 };
    let y = reference::layernorm_forward(b * lq, d, &proj, Some(&xq), g1, be1, ln_t, c.eps as f64);
    let hpre = toklin(&y, b, lq, 0, q0, lq, d, df, w1, Some(b1), &map);
    let hact: Vec<f64> = hpre
        .iter()
        .map(|&z| reference::act(Activation::Gelu, z))
        .collect();
    let f = toklin(&hact, b, lq, 0, q0, lq, df, d, w2, Some(b2), &map);
    reference::layernorm_forward(b * lq, d, &f, Some(&y), g2, be2, ln_t, c.eps as f64)
}

/// Every parameter replaced by fresh random values (init's zero biases and unit gains would
/// hide bias and affine bugs).
fn randomize(p: LayerParams, r: &mut impl rand::Rng) -> LayerParams {
    let f = |t: Tensor, r: &mut dyn rand::RngCore| {
        let n = t.numel();
        let v: Vec<f32> = (0..n)
            .map(|_| 0.5 * (r.next_u32() as f32 / u32::MAX as f32 - 0.5))
            .collect();
        Tensor::from_f32(&v, t.shape(), t.dtype(), &t.device()).unwrap()
    };
    let qkv = match p.qkv {
        QkvParams::PerToken { wq, wk, wv } => QkvParams::PerToken {
            wq: f(wq, r),
            wk: f(wk, r),
            wv: f(wv, r),
        },
        QkvParams::LowRank(w) => QkvParams::LowRank(QkvWeights {
            a: f(w.a, r),
            rq: f(w.rq, r),
            rk: f(w.rk, r),
            rv: f(w.rv, r),
        }),
    };
    let one_ish = |t: Tensor, r: &mut dyn rand::RngCore| {
        let v: Vec<f32> = (0..t.numel())
            .map(|_| 0.75 + 0.5 * (r.next_u32() as f32 / u32::MAX as f32))
            .collect();
        Tensor::from_f32(&v, t.shape(), t.dtype(), &t.device()).unwrap()
    };
    LayerParams {
        qkv,
        wo: f(p.wo, r),
        bo: f(p.bo, r),
        w1: f(p.w1, r),
        b1: f(p.b1, r),
        w2: f(p.w2, r),
        b2: f(p.b2, r),
        ln1_g: one_ish(p.ln1_g, r),
        ln1_b: f(p.ln1_b, r),
        ln2_g: one_ish(p.ln2_g, r),
        ln2_b: f(p.ln2_b, r),
    }
}

fn small(task: Option<usize>, map: Option<Vec<usize>>, per_token_ln: bool) -> LayerConfig {
    LayerConfig {
        task_tokens: task,
        group_map: map,
        per_token_ln,
        ..LayerConfig::new(3, 4, 2, 2, 3, 5)
    }
}

enum Kind {
    Hetero,
    Hiformer(usize, usize),
}

fn run(
    be: &common::Backend,
    c: &LayerConfig,
    kind: &Kind,
    b: usize,
    fd: bool,
) -> recfuse::Result<()> {
    let dev = &be.device;
    let what = format!("{} {c:?}", be.name);
    let mut r = rng(&what);
    let (x, xv) = common::random_tensor(&mut r, &[b, c.tokens, c.width], 1.0, c.dtype, dev);
    let (lowrank, params, out) = match kind {
        Kind::Hetero => {
            let layer = HeteroAttentionLayer { cfg: c.clone() };
            let p = randomize(layer.init(7, dev)?, &mut r);
            let (z, s) = layer.forward(&x, &p, None)?;
            let lq = c.task_tokens.unwrap_or(c.tokens);
            let (dz, _) = common::random_tensor(&mut r, &[b, lq, c.width], 1.0, c.dtype, dev);
            let (dx, g) = layer.backward(&p, &s, &dz)?;
            (None, p, (z, dz, dx, g))
        }
        Kind::Hiformer(rqk, rv) => {
            let layer = HiformerLayer {
                cfg: c.clone(),
                rank_qk: *rqk,
                rank_v: *rv,
            };
            let p = randomize(layer.init(7, dev)?, &mut r);
            let (z, s) = layer.forward(&x, &p, None)?;
            let lq = c.task_tokens.unwrap_or(c.tokens);
            let (dz, _) = common::random_tensor(&mut r, &[b, lq, c.width], 1.0, c.dtype, dev);
            let (dx, g) = layer.backward(&p, &s, &dz)?;
            (Some((*rqk, *rv)), p, (z, dz, dx, g))
        }
    };
    let (z, dz, dx, grads) = out;
    let pv = params_f64(&params);
    let z_ref = layer_ref(c, lowrank, b, &xv, &pv);
    let tol = common::tolerance(c.dtype, 64) * 20.0;
    assert_close(&format!("{what} z"), &z.to_f64_vec()?, &z_ref, tol);
    if fd {
        let dzv = dz.to_f64_vec()?;
        let loss = |x: &[f64], p: &[Vec<f64>]| {
            layer_ref(c, lowrank, b, x, p)
                .iter()
                .zip(&dzv)
                .map(|(a, g)| a * g)
                .sum::<f64>()
        };
        let h = 1e-5;
        assert_close(
            &format!("{what} dx"),
            &dx.to_f64_vec()?,
            &finite_diff(&xv, h, |x| loss(x, &pv)),
            2e-4,
        );
        let gv = params_f64(&grads);
        for (i, g) in gv.iter().enumerate() {
            let fdg = finite_diff(&pv[i], h, |w| {
                let mut p2 = pv.clone();
                p2[i] = w.to_vec();
                loss(&xv, &p2)
            });
            assert_close(&format!("{what} param #{i}"), g, &fdg, 2e-4);
        }
    }
    Ok(())
}

#[test]
fn hetero_layer_gradients_match_finite_differences() {
    for be in backends() {
        for c in [
            small(None, None, false),
            small(Some(1), None, true),
            small(None, Some(vec![0, 1, 0]), false),
        ] {
            if !common::supported(
                &be,
                "HeteroAttentionLayer",
                run(&be, &c, &Kind::Hetero, 2, true),
            ) {
                break;
            }
        }
    }
}

#[test]
fn hiformer_layer_gradients_match_finite_differences() {
    for be in backends() {
        for c in [small(None, None, false), small(Some(2), None, false)] {
            if !common::supported(
                &be,
                "HiformerLayer",
                run(&be, &c, &Kind::Hiformer(3, 4), 2, true),
            ) {
                break;
            }
        }
    }
}

#[test]
fn paper_shaped_layers_every_dtype() {
    // Paper head dims (d_k = 16 ≠ d_v = 64) at L = 38 tokens, small batch.
    for be in backends() {
        for dtype in DType::ALL {
            let c = LayerConfig {
                dtype,
                ..LayerConfig::new(38, 32, 4, 16, 64, 64)
            };
            if !common::supported(
                &be,
                "HeteroAttentionLayer",
                run(&be, &c, &Kind::Hetero, 3, false),
            ) {
                break;
            }
            let c = LayerConfig {
                task_tokens: Some(2),
                ..c
            };
            if !common::supported(
                &be,
                "HiformerLayer",
                run(&be, &c, &Kind::Hiformer(16, 48), 3, false),
            ) {
                break;
            }
        }
    }
}

/// Hetero ≡ Hiformer with A = I and R = blockdiag(per-token W).
#[test]
fn hetero_equals_block_diagonal_hiformer() {
    let dev = Device::cpu();
    let c = LayerConfig::new(3, 4, 2, 2, 3, 5);
    let (l, d, h, dk, dv) = (c.tokens, c.width, c.heads, c.dk, c.dv);
    let hetero = HeteroAttentionLayer { cfg: c.clone() };
    let p = hetero.init(11, &dev).unwrap();
    let QkvParams::PerToken { wq, wk, wv } = &p.qkv else {
        unreachable!()
    };
    let blockdiag = |w: &Tensor, out: usize| {
        let v = w.to_f32_vec().unwrap();
        let mut m = vec![0f32; l * out * l * d];
        for t in 0..l {
            for o in 0..out {
                for i in 0..d {
                    m[(t * out + o) * (l * d) + t * d + i] = v[(t * out + o) * d + i];
                }
            }
        }
        Tensor::from_f32(&m, &[l * out, l * d], DType::F32, &dev).unwrap()
    };
    let ld = l * d;
    let mut a = vec![0f32; 3 * ld * ld];
    for blk in 0..3 {
        for i in 0..ld {
            a[(blk * ld + i) * ld + i] = 1.0;
        }
    }
    let copy = |t: &Tensor| t.try_clone().unwrap();
    let p_hi = LayerParams {
        qkv: QkvParams::LowRank(QkvWeights {
            a: Tensor::from_f32(&a, &[3 * ld, ld], DType::F32, &dev).unwrap(),
            rq: blockdiag(wq, h * dk),
            rk: blockdiag(wk, h * dk),
            rv: blockdiag(wv, h * dv),
        }),
        wo: copy(&p.wo),
        bo: copy(&p.bo),
        w1: copy(&p.w1),
        b1: copy(&p.b1),
        w2: copy(&p.w2),
        b2: copy(&p.b2),
        ln1_g: copy(&p.ln1_g),
        ln1_b: copy(&p.ln1_b),
        ln2_g: copy(&p.ln2_g),
        ln2_b: copy(&p.ln2_b),
    };
    let hi = HiformerLayer {
        cfg: c.clone(),
        rank_qk: ld,
        rank_v: ld,
    };
    let mut r = rng("structural");
    let (x, _) = common::random_tensor(&mut r, &[5, l, d], 1.0, DType::F32, &dev);
    let (z1, s1) = hetero.forward(&x, &p, None).unwrap();
    let (z2, s2) = hi.forward(&x, &p_hi, None).unwrap();
    assert_close(
        "hetero vs hiformer z",
        &z2.to_f64_vec().unwrap(),
        &z1.to_f64_vec().unwrap(),
        1e-5,
    );
    let dz = Tensor::full(&[5, l, d], 0.3, DType::F32, &dev).unwrap();
    let (dx1, _) = hetero.backward(&p, &s1, &dz).unwrap();
    let (dx2, _) = hi.backward(&p_hi, &s2, &dz).unwrap();
    assert_close(
        "hetero vs hiformer dx",
        &dx2.to_f64_vec().unwrap(),
        &dx1.to_f64_vec().unwrap(),
        1e-5,
    );
}

#[test]
fn bad_input() {
    let dev = Device::cpu();
    let layer = HeteroAttentionLayer {
        cfg: LayerConfig::new(3, 4, 2, 2, 3, 5),
    };
    let p = layer.init(1, &dev).unwrap();
    let e = layer
        .forward(
            &Tensor::zeros(&[2, 4, 4], DType::F32, &dev).unwrap(),
            &p,
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
    let bad = HeteroAttentionLayer {
        cfg: LayerConfig {
            task_tokens: Some(4),
            ..layer.cfg.clone()
        },
    };
    assert!(matches!(
        bad.init(1, &dev).unwrap_err(),
        Error::InvalidArgument {
            arg: "task_tokens",
            ..
        }
    ));
    let hi = HiformerLayer {
        cfg: layer.cfg.clone(),
        rank_qk: 2,
        rank_v: 2,
    };
    let e = hi
        .forward(
            &Tensor::zeros(&[2, 3, 4], DType::F32, &dev).unwrap(),
            &p,
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "params.qkv",
                ..
            }
        ),
        "{e}"
    );
}
