//! The bad-input matrix (issue 11), kept in CI: inputs that used to panic or abort the process
//! must come back as typed errors naming the caller's argument, on every backend present.
//! (NaN propagation lives with each op's tests, e.g. `tests/linear.rs`.)

mod common;

use recfuse::ops::gated_cross::{GatedCross, Init};
use recfuse::{DType, Error, Tensor};

/// 2^46 f32 = 256 TiB: beyond any machine, and beyond a 47-bit address space, so the request
/// fails even where the OS overcommits memory.
const HUGE: usize = 1 << 46;

#[test]
fn huge_allocations_are_errors_not_aborts() {
    let mut ran = Vec::new();
    for be in common::backends() {
        let dev = &be.device;
        for dtype in DType::ALL {
            match Tensor::zeros(&[HUGE], dtype, dev) {
                Err(Error::OutOfMemory { arg: "shape", .. }) => {}
                // A GPU backend may refuse the size before allocating (a buffer-size limit).
                Err(Error::InvalidArgument { .. } | Error::Backend { .. }) if be.name != "cpu" => {}
                other => panic!("{}: zeros of 2^46 {dtype:?}: {other:?}", be.name),
            }
            match Tensor::full(&[HUGE], 1.5, dtype, dev) {
                Err(Error::OutOfMemory { arg: "shape", .. }) => {}
                Err(Error::InvalidArgument { .. } | Error::Backend { .. }) if be.name != "cpu" => {}
                other => panic!("{}: full of 2^46 {dtype:?}: {other:?}", be.name),
            }
            // Byte counts past isize::MAX (element count still fits usize).
            match Tensor::zeros(&[1 << 62], dtype, dev) {
                Err(Error::OutOfMemory { .. }) => {}
                other => panic!("{}: zeros of 2^62 {dtype:?}: {other:?}", be.name),
            }
            // Element counts past usize.
            match Tensor::zeros(&[1 << 40, 1 << 40], dtype, dev) {
                Err(Error::InvalidArgument { arg: "shape", .. }) => {}
                other => panic!("{}: zeros of 2^80 {dtype:?}: {other:?}", be.name),
            }
            // The device still works afterwards.
            let t = Tensor::full(&[3], 2.0, dtype, dev).unwrap();
            assert_eq!(t.to_f64_vec().unwrap(), vec![2.0; 3], "{}", be.name);
        }
        let net = GatedCross::new(1 << 24, 1);
        match net.init(Init::Gdcn, 0, dev) {
            Err(Error::OutOfMemory { arg: "width", .. }) => {}
            other => panic!(
                "{}: GatedCross::init width 2^24: {:?}",
                be.name,
                other.map(|_| ())
            ),
        }
        ran.push(be.name);
    }
    eprintln!("[recfuse tests] huge allocations checked on: {ran:?}");
}

/// Saved state from another configuration's forward (another width, GDCN into DCN-V2, low rank
/// into full rank) is rejected by name; it used to index out of bounds (CPU) or compute garbage.
#[test]
fn gated_cross_saved_state_of_another_config_is_rejected() {
    use recfuse::ops::gated_cross::{CrossMode, SavePolicy};
    for be in common::backends() {
        let dev = &be.device;
        let mut r = common::rng("saved-mismatch");
        let base = GatedCross::new(8, 2);
        let others = [
            GatedCross::new(12, 2),
            GatedCross {
                mode: CrossMode::DcnV2,
                ..base.clone()
            },
            GatedCross {
                rank: Some(3),
                ..base.clone()
            },
            GatedCross {
                gate_bias: true,
                ..base.clone()
            },
        ];
        for (maker, user) in [(&base, &others[0]), (&others[0], &base)]
            .into_iter()
            .chain(others[1..].iter().map(|o| (&base, o)))
            .chain(others[1..].iter().map(|o| (o, &base)))
        {
            let pm = maker
                .pack(&maker.init(Init::Gdcn, 1, dev).unwrap(), dev)
                .unwrap();
            let (x, _) = common::random_tensor(&mut r, &[4, maker.width], 1.0, DType::F32, dev);
            let (_, saved) = maker.forward(&x, &pm, SavePolicy::SaveAll).unwrap();
            let pu = user
                .pack(&user.init(Init::Gdcn, 2, dev).unwrap(), dev)
                .unwrap();
            let (dy, _) = common::random_tensor(&mut r, &[4, user.width], 1.0, DType::F32, dev);
            match user.backward(&pu, &saved, &dy) {
                Err(Error::InvalidArgument { arg: "saved", .. }) => {}
                other => panic!(
                    "{}: saved of {maker:?} into {user:?}: {:?}",
                    be.name,
                    other.map(|_| ())
                ),
            }
        }
    }
}

/// LayerNorm: eps ≤ 0 or NaN is rejected; backward with statistics of another call (another row
/// count) or dy on another device is a typed error, not a CPU index panic or a host round trip.
#[test]
fn layernorm_scalars_and_saved_state_are_checked() {
    use recfuse::ops::layernorm::LayerNorm;
    let backends = common::backends();
    for be in &backends {
        let dev = &be.device;
        let mut r = common::rng("ln-bad");
        let (x, _) = common::random_tensor(&mut r, &[6, 10], 1.0, DType::F32, dev);
        let (g, _) = common::random_tensor(&mut r, &[10], 1.0, DType::F32, dev);
        let (b, _) = common::random_tensor(&mut r, &[10], 1.0, DType::F32, dev);
        for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
            match (LayerNorm { eps }).forward(&x, None, &g, &b) {
                Err(Error::InvalidArgument { arg: "eps", .. }) => {}
                other => panic!("{}: eps {eps}: {:?}", be.name, other.map(|_| ())),
            }
        }
        let ln = LayerNorm::default();
        let mut fwd = ln.forward(&x, None, &g, &b).unwrap();
        let (x2, _) = common::random_tensor(&mut r, &[3, 10], 1.0, DType::F32, dev);
        let other = ln.forward(&x2, None, &g, &b).unwrap();
        fwd.mean = other.mean;
        let (dy, _) = common::random_tensor(&mut r, &[6, 10], 1.0, DType::F32, dev);
        match ln.backward(&g, &b, &fwd, &dy) {
            Err(Error::Shape {
                arg: "fwd.mean", ..
            }) => {}
            other => panic!("{}: mean of another call: {:?}", be.name, other.map(|_| ())),
        }
        fwd.mean = Tensor::zeros(&[6], DType::F32, dev).unwrap();
        fwd.rstd = Tensor::zeros(&[6], DType::BF16, dev).unwrap();
        match ln.backward(&g, &b, &fwd, &dy) {
            Err(Error::DType {
                arg: "fwd.rstd", ..
            }) => {}
            other => panic!("{}: bf16 rstd: {:?}", be.name, other.map(|_| ())),
        }
        for other_be in backends.iter().filter(|o| o.name != be.name) {
            let fwd = ln.forward(&x, None, &g, &b).unwrap();
            let dy_elsewhere = dy.to_device(&other_be.device).unwrap();
            match ln.backward(&g, &b, &fwd, &dy_elsewhere) {
                Err(Error::DeviceMismatch { arg: "dy", .. }) => {}
                other => panic!(
                    "{}: dy on {}: {:?}",
                    be.name,
                    other_be.name,
                    other.map(|_| ())
                ),
            }
        }
    }
}

/// In-batch softmax: invalid scalars (κ_max with a learned κ, ε with L2) and forward statistics
/// that are not this call's (fewer rows, a short `s_target`, z = 0) are typed errors; d = 0 runs
/// (it used to panic in the CPU backward); a NaN query in a not-to-recommend row gives a NaN
/// loss on every backend (the log(1 − p) clamp used to swallow it).
#[test]
fn inbatch_softmax_scalars_and_saved_state_are_checked() {
    use recfuse::ops::inbatch_softmax::{Columns, InBatchSoftmax, RowKind, Rows};
    for be in common::backends() {
        let dev = &be.device;
        let mut r = common::rng("softmax-bad");
        let (b, n, d) = (4usize, 6usize, 5usize);
        let (q, _) = common::random_tensor(&mut r, &[b, d], 1.0, DType::F32, dev);
        let (c, _) = common::random_tensor(&mut r, &[n, d], 1.0, DType::F32, dev);
        let target = [0u32, 1, 2, 3];
        let kind = [RowKind::Pos, RowKind::Ntr, RowKind::Pos, RowKind::Pos];
        let weight = [1.0f32, 0.5, 1.0, 2.0];
        let ids: Vec<i64> = (0..n as i64).collect();
        let rows = Rows {
            queries: &q,
            target: &target,
            kind: &kind,
            weight: &weight,
            query_ids: None,
        };
        let cols = Columns {
            emb: &c,
            log_q: None,
            ids: Some(&ids),
            valid: None,
            query_ids: None,
        };
        let ok = InBatchSoftmax::default();
        let bad = [
            (
                InBatchSoftmax {
                    learn_kappa: true,
                    kappa_max: -1.0,
                    ..ok.clone()
                },
                "kappa_max",
            ),
            (
                InBatchSoftmax {
                    l2_normalize: true,
                    eps: 0.0,
                    ..ok.clone()
                },
                "eps",
            ),
        ];
        for (cfg, arg) in &bad {
            match cfg.forward(&rows, &cols, None) {
                Err(Error::InvalidArgument { arg: a, .. }) if a == *arg => {}
                other => panic!("{}: {arg}: {:?}", be.name, other.map(|_| ())),
            }
        }
        let fwd = ok.forward(&rows, &cols, None).unwrap();
        assert!(fwd.loss.is_finite());
        let mut short = fwd.clone();
        short.lse.pop();
        let mut short_t = fwd.clone();
        short_t.s_target.truncate(2);
        let mut zero_z = fwd.clone();
        zero_z.z = 0.0;
        for (f, arg) in [
            (&short, "fwd.lse"),
            (&short_t, "fwd.s_target"),
            (&zero_z, "fwd.z"),
        ] {
            match ok.backward(&rows, &cols, f) {
                Err(Error::Shape { arg: a, .. } | Error::InvalidArgument { arg: a, .. })
                    if a == arg => {}
                other => panic!("{}: {arg}: {:?}", be.name, other.map(|_| ())),
            }
        }

        // d = 0: every logit is 0; forward and backward run and return empty gradients.
        let q0 = Tensor::zeros(&[b, 0], DType::F32, dev).unwrap();
        let c0 = Tensor::zeros(&[n, 0], DType::F32, dev).unwrap();
        let rows0 = Rows {
            queries: &q0,
            ..rows
        };
        let cols0 = Columns { emb: &c0, ..cols };
        let f0 = ok.forward(&rows0, &cols0, None).unwrap();
        let want = (weight[0] + weight[2] + weight[3]) as f64 * (n as f64).ln()
            - weight[1] as f64 * (1.0 - 1.0 / n as f64).ln();
        let want = want / weight.iter().map(|&w| w as f64).sum::<f64>();
        assert!(
            (f0.loss - want).abs() < 1e-5 * want,
            "{}: d = 0 loss {}",
            be.name,
            f0.loss
        );
        let g0 = ok.backward(&rows0, &cols0, &f0).unwrap();
        assert_eq!(g0.dq.shape(), &[b, 0]);
        assert_eq!(g0.dc.shape(), &[n, 0]);

        // NaN in the NTR row's query.
        let mut qv = q.to_f32_vec().unwrap();
        qv[d + 2] = f32::NAN;
        let qn = Tensor::from_f32(&qv, &[b, d], DType::F32, dev).unwrap();
        let rows_n = Rows {
            queries: &qn,
            ..rows
        };
        let fwd_n = ok.forward(&rows_n, &cols, None).unwrap();
        assert!(
            fwd_n.loss.is_nan(),
            "{}: NTR NaN query gave loss {}",
            be.name,
            fwd_n.loss
        );
        // The backward must not fail on it either (which gradients are NaN, against the
        // reference: tests/inbatch_softmax.rs, nan_inputs_are_nan_exactly_where_the_reference_is).
        ok.backward(&rows_n, &cols, &fwd_n).unwrap();
    }
}

/// LowRankQkv backward with `out` (and matching dq/dk/dv) from a bigger batch than `x`: a typed
/// error naming `out.z` (it used to read the first rows silently).
#[test]
fn lowrank_qkv_backward_rejects_another_batch() {
    use recfuse::ops::lowrank_qkv::{LowRankQkv, QkvWeights};
    for be in common::backends() {
        let dev = &be.device;
        let mut r = common::rng("qkv-bad");
        let c = LowRankQkv {
            tokens: 3,
            width: 4,
            heads: 2,
            dk: 3,
            dv: 5,
            q_tokens: 3,
            rank_qk: 6,
            rank_v: 7,
        };
        let mut t = |s: &[usize]| common::random_tensor(&mut r, s, 0.5, DType::F32, dev).0;
        let w = QkvWeights {
            a: t(&[19, 12]),
            rq: t(&[18, 6]),
            rk: t(&[18, 6]),
            rv: t(&[30, 7]),
        };
        let (x_small, x_big) = (t(&[2, 3, 4]), t(&[5, 3, 4]));
        let out = c.forward(&x_big, &w).unwrap();
        let (dq, dk, dv) = (t(out.q.shape()), t(out.k.shape()), t(out.v.shape()));
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, dev).unwrap();
        let mut grads = QkvWeights {
            a: z(&[19, 12]),
            rq: z(&[18, 6]),
            rk: z(&[18, 6]),
            rv: z(&[30, 7]),
        };
        match c.backward(&x_small, &w, &out, &dq, &dk, &dv, &mut grads, false) {
            Err(Error::Shape { arg: "out.z", .. }) => {}
            other => panic!(
                "{}: out of a bigger batch: {:?}",
                be.name,
                other.map(|_| ())
            ),
        }
        // The right batch still works.
        c.backward(&x_big, &w, &out, &dq, &dk, &dv, &mut grads, false)
            .unwrap();
    }
}
