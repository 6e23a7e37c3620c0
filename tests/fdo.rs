//! FDO (PCA per field): eigen-pairs checked against an independently computed covariance,
//! the smallest-k rule, the explained-variance curve, and the warm-start projection, on every
//! backend the table can live on.

mod common;

use common::{backends, rng};
use rand::Rng;
use recfuse::ops::fdo;
use recfuse::{DType, Error, Tensor};

/// A table whose rows are `Σ_c a_c · s_c · basis_c + offset`, with chosen scales.
fn synthetic(r: &mut impl Rng, n: usize, d: usize, scales: &[f64]) -> Vec<f32> {
    // A random orthonormal basis by Gram–Schmidt.
    let mut basis: Vec<Vec<f64>> = Vec::new();
    while basis.len() < scales.len() {
        let mut v: Vec<f64> = (0..d).map(|_| r.random_range(-1.0..1.0)).collect();
        for b in &basis {
            let dot: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-3 {
            basis.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    let offset: Vec<f64> = (0..d).map(|_| r.random_range(-0.5..0.5)).collect();
    (0..n)
        .flat_map(|_| {
            let coef: Vec<f64> = scales
                .iter()
                .map(|s| s * r.random_range(-1.0..1.0))
                .collect();
            (0..d)
                .map(|j| {
                    (offset[j] + coef.iter().zip(&basis).map(|(c, b)| c * b[j]).sum::<f64>()) as f32
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn eigenpairs_and_k_on_every_backend() {
    let (n, d) = (400, 12);
    let scales = [4.0, 2.0, 1.0, 0.5, 0.25, 0.1];
    let mut r = rng("fdo");
    let data = synthetic(&mut r, n, d, &scales);
    // Independent covariance (two-pass, f64).
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| data[i * d + j] as f64).sum::<f64>() / n as f64)
        .collect();
    let cov = |i: usize, j: usize| {
        (0..n)
            .map(|rw| (data[rw * d + i] as f64 - mean[i]) * (data[rw * d + j] as f64 - mean[j]))
            .sum::<f64>()
            / (n - 1) as f64
    };
    let trace: f64 = (0..d).map(|i| cov(i, i)).sum();
    for be in backends() {
        let t = Tensor::from_f32(&data, &[n, d], DType::F32, &be.device).unwrap();
        let pca = fdo::analyse(&t, 0.9).unwrap();
        let rel = if be.name == "cpu" { 1e-9 } else { 1e-4 };
        let total: f64 = pca.eigenvalues.iter().sum();
        assert!(
            (total - trace).abs() <= rel * trace * 10.0,
            "{}: Σλ {total} vs trace {trace}",
            be.name
        );
        assert!(
            pca.eigenvalues.windows(2).all(|w| w[0] >= w[1]),
            "descending"
        );
        for c in 0..d {
            let v = &pca.all_directions[c * d..c * d + d];
            let norm: f64 = v.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-9, "unit direction");
            // Σ v = λ v, against the independent covariance.
            for i in 0..d {
                let sv: f64 = (0..d).map(|j| cov(i, j) * v[j]).sum();
                assert!(
                    (sv - pca.eigenvalues[c] * v[i]).abs() <= rel * 10.0 * trace,
                    "{}: Σv ≠ λv (component {c})",
                    be.name
                );
            }
        }
        // Smallest k: the curve reaches 0.9 at k and not before.
        assert!(pca.explained[pca.k - 1] >= 0.9 - 1e-12);
        assert!(pca.k == 1 || pca.explained[pca.k - 2] < 0.9);
        // The data has 6 directions: 100 % is reached by k = 6.
        assert_eq!(
            pca.k_for(0.999_999),
            6,
            "{}: rank of the synthetic table",
            be.name
        );
        assert_eq!(pca.directions.len(), pca.k * d);

        // Projection with every direction is a rotation of the centred data: norms agree.
        let full = fdo::FieldPca {
            k: d,
            directions: pca.all_directions.clone(),
            ..pca.clone()
        };
        let proj = fdo::project(&t, &full).unwrap().to_f64_vec().unwrap();
        for i in 0..n {
            let a: f64 = (0..d)
                .map(|j| (data[i * d + j] as f64 - pca.mean[j]).powi(2))
                .sum();
            let b: f64 = proj[i * d..i * d + d].iter().map(|x| x * x).sum();
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + a),
                "{}: row {i} norm {a} vs {b}",
                be.name
            );
        }
    }
}

#[test]
fn bad_input() {
    let dev = recfuse::Device::cpu();
    let t = Tensor::zeros(&[1, 4], DType::F32, &dev).unwrap();
    assert!(matches!(
        fdo::analyse(&t, 0.8).unwrap_err(),
        Error::Shape { arg: "table", .. }
    ));
    let t = Tensor::zeros(&[5, 4], DType::F32, &dev).unwrap();
    assert!(matches!(
        fdo::analyse(&t, 1.5).unwrap_err(),
        Error::InvalidArgument { arg: "ratio", .. }
    ));
    let t = Tensor::full(&[5, 4], f32::NAN, DType::F32, &dev).unwrap();
    assert!(matches!(
        fdo::analyse(&t, 0.8).unwrap_err(),
        Error::InvalidArgument { arg: "table", .. }
    ));
    // A constant table has no variance: one component "explains" it; no NaN.
    let t = Tensor::full(&[5, 4], 2.0, DType::F32, &dev).unwrap();
    let p = fdo::analyse(&t, 0.8).unwrap();
    assert!(p.explained.iter().all(|e| e.is_finite()));
}

/// A table with a large mean and a small spread (mean 10, sd 0.01, n = 20000): every backend
/// must agree with an f64 two-pass covariance (the GPUs used to form EᵀE − nμμᵀ in f32, which
/// put the top eigenvalue 24% off and the smallest at exactly 0). And `project` with `k`
/// changed by `k_for` uses that many directions (it used to index past `directions`).
#[test]
fn large_mean_small_spread_and_changed_k() {
    let (n, d) = (20_000usize, 6usize);
    let mut r = rng("fdo-offset");
    let sds = [0.02, 0.015, 0.012, 0.01, 0.008, 0.005];
    let v: Vec<f32> = (0..n * d)
        .map(|i| {
            let u: f64 = r.random_range(-1.0..1.0);
            (10.0 + sds[i % d] * 3f64.sqrt() * u) as f32
        })
        .collect();
    // f64 reference: two-pass covariance of the f32 values, then its eigenvalues' sum and the
    // diagonal (the variances along the coordinate axes, which the columns' independence makes
    // the eigenvalues up to sampling noise in the off-diagonal).
    let x: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64)
        .collect();
    let var: Vec<f64> = (0..d)
        .map(|j| {
            (0..n)
                .map(|i| (x[i * d + j] - mean[j]).powi(2))
                .sum::<f64>()
                / (n - 1) as f64
        })
        .collect();
    let trace: f64 = var.iter().sum();
    for be in backends() {
        let t = Tensor::from_f32(&v, &[n, d], DType::F32, &be.device).unwrap();
        let pca = fdo::analyse(&t, 0.5).unwrap();
        let got: f64 = pca.eigenvalues.iter().sum();
        assert!(
            (got - trace).abs() <= 1e-4 * trace,
            "{}: Σλ = {got:e}, trace {trace:e}",
            be.name
        );
        let smallest = *pca.eigenvalues.last().unwrap();
        let want_small = var.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(
            (smallest - want_small).abs() <= 0.05 * want_small,
            "{}: smallest λ {smallest:e} vs ≈ {want_small:e}",
            be.name
        );
        for (j, m) in mean.iter().enumerate() {
            assert!((pca.mean[j] - m).abs() <= 1e-5 * m, "{}: mean {j}", be.name);
        }
        let mut p = pca.clone();
        p.k = pca.k_for(1.0);
        assert_eq!(p.k, d);
        let out = fdo::project(&t, &p).unwrap();
        assert_eq!(out.shape(), &[n, d]);
        p.k = d + 1;
        assert!(matches!(
            fdo::project(&t, &p),
            Err(Error::InvalidArgument { arg: "pca.k", .. })
        ));
    }
}
