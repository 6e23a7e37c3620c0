//! Hiformer's low-rank composite Q/K/V projection on every backend (it runs on the GEMM core,
//! so every backend with the GEMM has it), against f64 products; gradients against finite
//! differences; pruned queries; every dtype.

mod common;

use common::{assert_close, backends, finite_diff, random_tensor, rng};
use recfuse::cpu::reference::{self, LinearDims};
use recfuse::ops::lowrank_qkv::{LowRankQkv, QkvWeights};
use recfuse::{Activation, DType, Error, Tensor};

fn mm(x: &[f64], w: &[f64], rows: usize, inp: usize, out: usize) -> Vec<f64> {
    reference::linear_forward(
        LinearDims {
            rows,
            groups: 1,
            inp,
            out,
        },
        x,
        w,
        None,
        None,
        Activation::None,
    )
    .0
}

/// (Q, K, V) in f64 from x and the weights.
fn qkv_ref(c: &LowRankQkv, b: usize, x: &[f64], w: &[Vec<f64>; 4]) -> Vec<f64> {
    let (ld, r, rv) = (c.tokens * c.width, c.rank_qk, c.rank_v);
    let rt = 2 * r + rv;
    let z = mm(x, &w[0], b, ld, rt);
    let part = |off: usize, rr: usize, m: &[f64], n: usize| {
        let zs: Vec<f64> = (0..b)
            .flat_map(|i| z[i * rt + off..][..rr].to_vec())
            .collect();
        mm(&zs, m, b, rr, n)
    };
    let mut out = part(0, r, &w[1], c.q_tokens * c.heads * c.dk);
    out.extend(part(r, r, &w[2], c.tokens * c.heads * c.dk));
    out.extend(part(2 * r, rv, &w[3], c.tokens * c.heads * c.dv));
    out
}

fn check(be: &common::Backend, c: &LowRankQkv, b: usize, dtype: DType, fd: bool) {
    let dev = &be.device;
    let what = format!("{} {c:?} {dtype}", be.name);
    let mut r = rng(&what);
    let ld = c.tokens * c.width;
    let rt = 2 * c.rank_qk + c.rank_v;
    let (x, xv) = random_tensor(&mut r, &[b, c.tokens, c.width], 1.0, dtype, dev);
    let (a, av) = random_tensor(&mut r, &[rt, ld], 0.3, dtype, dev);
    let (rq, rqv) = random_tensor(
        &mut r,
        &[c.q_tokens * c.heads * c.dk, c.rank_qk],
        0.3,
        dtype,
        dev,
    );
    let (rk, rkv) = random_tensor(
        &mut r,
        &[c.tokens * c.heads * c.dk, c.rank_qk],
        0.3,
        dtype,
        dev,
    );
    let (rv, rvv) = random_tensor(
        &mut r,
        &[c.tokens * c.heads * c.dv, c.rank_v],
        0.3,
        dtype,
        dev,
    );
    let w = QkvWeights { a, rq, rk, rv };
    let wv = [av, rqv, rkv, rvv];
    let out = c.forward(&x, &w).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut got = out.q.to_f64_vec().unwrap();
    got.extend(out.k.to_f64_vec().unwrap());
    got.extend(out.v.to_f64_vec().unwrap());
    let want = qkv_ref(c, b, &xv, &wv);
    assert_close(
        &format!("{what} qkv"),
        &got,
        &want,
        common::tolerance(dtype, ld) * 4.0,
    );
    let (dq, dqv) = random_tensor(&mut r, out.q.shape(), 1.0, dtype, dev);
    let (dk, dkv) = random_tensor(&mut r, out.k.shape(), 1.0, dtype, dev);
    let (dv, dvv) = random_tensor(&mut r, out.v.shape(), 1.0, dtype, dev);
    let p = |t: &Tensor| Tensor::poisoned(t.shape(), t.dtype(), dev).unwrap();
    let mut g = QkvWeights {
        a: p(&w.a),
        rq: p(&w.rq),
        rk: p(&w.rk),
        rv: p(&w.rv),
    };
    let dx = c
        .backward(&x, &w, &out, &dq, &dk, &dv, &mut g, false)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut dout = dqv.clone();
    dout.extend(&dkv);
    dout.extend(&dvv);
    let loss = |x: &[f64], w: &[Vec<f64>; 4]| {
        qkv_ref(c, b, x, w)
            .iter()
            .zip(&dout)
            .map(|(a, g)| a * g)
            .sum::<f64>()
    };
    let tol = if fd {
        1e-4
    } else {
        common::tolerance(dtype, b * ld) * 8.0
    };
    if fd {
        assert_close(
            &format!("{what} dx"),
            &dx.to_f64_vec().unwrap(),
            &finite_diff(&xv, 1e-5, |x| loss(x, &wv)),
            tol,
        );
        for (i, t) in [&g.a, &g.rq, &g.rk, &g.rv].into_iter().enumerate() {
            let fdw = finite_diff(&wv[i], 1e-5, |p| {
                let mut w2 = wv.clone();
                w2[i] = p.to_vec();
                loss(&xv, &w2)
            });
            assert_close(
                &format!("{what} dW#{i}"),
                &t.to_f64_vec().unwrap(),
                &fdw,
                tol,
            );
        }
    } else {
        for t in [&dx, &g.a, &g.rq, &g.rk, &g.rv] {
            assert!(
                t.to_f32_vec().unwrap().iter().all(|v| v.is_finite()),
                "{what}: unwritten gradient"
            );
        }
    }
}

fn cfg(tokens: usize, q_tokens: usize) -> LowRankQkv {
    LowRankQkv {
        tokens,
        width: 4,
        heads: 2,
        dk: 3,
        dv: 5,
        q_tokens,
        rank_qk: 6,
        rank_v: 7,
    }
}

#[test]
fn matches_reference_and_finite_differences() {
    for be in backends() {
        check(&be, &cfg(3, 3), 2, DType::F32, true);
        check(&be, &cfg(5, 2), 3, DType::F32, true);
        for dtype in [DType::BF16, DType::F16] {
            check(&be, &cfg(7, 7), 9, dtype, false);
        }
    }
}

#[test]
fn bad_input() {
    let dev = recfuse::Device::cpu();
    let c = cfg(3, 3);
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    let w = QkvWeights {
        a: z(&[19, 12]),
        rq: z(&[18, 6]),
        rk: z(&[18, 6]),
        rv: z(&[30, 7]),
    };
    assert!(matches!(
        c.forward(&z(&[2, 3, 5]), &w).unwrap_err(),
        Error::Shape { arg: "x", .. }
    ));
    let w2 = QkvWeights {
        a: z(&[18, 12]),
        ..w
    };
    assert!(matches!(
        c.forward(&z(&[2, 3, 4]), &w2).unwrap_err(),
        Error::Shape { arg: "w.a", .. }
    ));
    let bad = LowRankQkv { q_tokens: 4, ..c };
    assert!(matches!(
        bad.forward(&z(&[2, 3, 4]), &w2).unwrap_err(),
        Error::InvalidArgument {
            arg: "q_tokens",
            ..
        }
    ));
}
