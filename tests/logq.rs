//! The streaming logQ estimator against known probabilities: on a Zipf stream of B ids per
//! step, `log_q` must converge to `ln(B·p_i)` — the log expected count among the columns, what
//! `Columns::log_q` means — for tail items seen once in many steps *and* head items seen many
//! times in every step (a per-step cap at one occurrence gave `ln 1 = 0` for those).
//! Host-only: the estimator has no device state, so no backend is involved.

mod common;

use rand::Rng;
use recfuse::dist::LogQEstimator;

/// Zipf(s) probabilities over `n` items, item 0 the most popular.
fn zipf(n: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-s)).collect();
    let z: f64 = w.iter().sum();
    w.into_iter().map(|v| v / z).collect()
}

/// `steps` steps of `batch` i.i.d. draws from `p`.
fn stream(rng: &mut impl Rng, p: &[f64], batch: usize, steps: usize, mut f: impl FnMut(&[i64])) {
    let cdf: Vec<f64> = p
        .iter()
        .scan(0.0, |a, v| {
            *a += v;
            Some(*a)
        })
        .collect();
    let mut ids = vec![0i64; batch];
    for _ in 0..steps {
        for id in ids.iter_mut() {
            let u: f64 = rng.random::<f64>() * cdf[cdf.len() - 1];
            *id = cdf.partition_point(|&c| c < u).min(p.len() - 1) as i64;
        }
        f(&ids);
    }
}

#[test]
fn log_q_converges_to_the_log_expected_count_per_batch_on_a_zipf_stream() {
    let mut rng = common::rng("logq zipf stream");
    let (items, batch, steps, alpha) = (1000usize, 1024usize, 3000usize, 0.004f32);
    let p = zipf(items, 1.1);
    // Every bucket its own item: the test measures the estimator, not hash collisions.
    let mut est = LogQEstimator::new(1 << 20, alpha).unwrap();
    stream(&mut rng, &p, batch, steps, |ids| est.update(ids));

    // The estimate averages ~2/α occurrences: relative (≈ log) noise σ ≈ √(α/2). Items with at
    // least 3/α expected occurrences have forgotten their start-up (weight e⁻³ left).
    let sigma = (alpha as f64 / 2.0).sqrt();
    let ids: Vec<i64> = (0..items as i64).collect();
    let lq = est.log_q(&ids);
    let mut tested = 0;
    let (mut abs_sum, mut signed_sum, mut worst) = (0.0f64, 0.0f64, (0.0f64, 0usize));
    let mut heavy = 0;
    for i in 0..items {
        let expected = batch as f64 * p[i];
        if expected * steps as f64 * (alpha as f64) < 3.0 {
            continue;
        }
        tested += 1;
        if expected >= 10.0 {
            heavy += 1;
        }
        let err = lq[i] as f64 - expected.ln();
        abs_sum += err.abs();
        signed_sum += err;
        if err.abs() > worst.0 {
            worst = (err.abs(), i);
        }
    }
    let n = tested as f64;
    eprintln!(
        "[recfuse tests] logq: {tested} items tested ({heavy} with ≥ 10 per batch), \
         head ln q̂ = {:.4} vs ln(B·p) = {:.4}; mean |err| {:.4}, mean err {:+.5}, worst {:.4} \
         (item {}), σ ≈ {sigma:.4}",
        lq[0],
        (batch as f64 * p[0]).ln(),
        abs_sum / n,
        signed_sum / n,
        worst.0,
        worst.1
    );
    // The stream covers head items far above one per batch and tail items far below it.
    assert!(heavy >= 10, "only {heavy} items with ≥ 10 per batch");
    assert!(tested >= 300, "only {tested} items tested");
    assert!(
        batch as f64 * p[tested - 1] < 0.5,
        "no item below one per batch"
    );
    // 6σ for the worst of ~400 items (20 seeds: ≤ 3.9σ); the mean |err| of a Gaussian is 0.8σ; the mean signed
    // error (a bias) is far below σ for an unbiased estimator.
    assert!(
        worst.0 < 6.0 * sigma,
        "item {}: |ln q̂ − ln(B·p)| = {:.4} > 6σ = {:.4}",
        worst.1,
        worst.0,
        6.0 * sigma
    );
    assert!(
        abs_sum / n < 1.1 * sigma,
        "mean |err| {:.4} > 1.1σ",
        abs_sum / n
    );
    assert!(
        (signed_sum / n).abs() < 0.25 * sigma,
        "bias {:+.5} > 0.25σ",
        signed_sum / n
    );
}

#[test]
fn exact_rates_are_recovered_from_the_first_sighting_on() {
    // Deterministic streams: k copies every step → q = k; one copy every m steps → q = 1/m.
    let mut est = LogQEstimator::new(1 << 12, 0.1).unwrap();
    for t in 0..60 {
        let mut ids = vec![5i64; 37];
        ids.extend([6i64; 2]);
        if t % 3 == 2 {
            ids.push(7);
        }
        est.update(&ids);
        let q = est.q(&[5, 6]);
        assert!(
            (q[0] - 37.0).abs() < 1e-3 && (q[1] - 2.0).abs() < 1e-4,
            "{q:?}"
        );
    }
    let q = est.q(&[7, 8]);
    assert!(
        (q[0] - 1.0 / 3.0).abs() < 1e-4,
        "every-3rd-step item: {}",
        q[0]
    );
    // Never seen in 60 steps: below one occurrence in 60 steps.
    assert!((q[1] - 1.0 / 61.0).abs() < 1e-6, "unseen: {}", q[1]);
    // The log is the log of the count.
    assert!((est.log_q(&[5])[0] - 37f32.ln()).abs() < 1e-4);
}
