//! Embedding bags on every backend and dtype: pooled forward (sum, mean, per-sample weights,
//! empty bags, repeated rows, odd widths), the dense gradient, and the fused sparse SGD and
//! row-wise Adagrad updates, each against f64 host math from the stored table values; untouched
//! rows stay bit-identical; updates are repeatable bit for bit; NaN propagates; bad input is a
//! typed error naming the argument; a step makes no host copies beyond the batch upload.

mod common;

use common::{assert_close, backends, random_tensor, rng, tolerance};
use rand::Rng;
use recfuse::ops::embedding::{BagBatch, EmbeddingBags, Pooling, TableSpec};
use recfuse::ops::fdo;
use recfuse::ops::optim::RowwiseAdagradConfig;
use recfuse::{DType, Device, Error, Tensor};

/// One random problem: tables (exact stored values), a batch in FBGEMM layout.
struct Problem {
    specs: Vec<TableSpec>,
    tables: Vec<Vec<f64>>,
    b: usize,
    indices: Vec<i64>,
    offsets: Vec<i64>,
    psw: Option<Vec<f32>>,
}

fn specs() -> Vec<TableSpec> {
    // A single-row table (every lookup collides), odd widths (16-bit row padding), a prime.
    vec![
        TableSpec::new("a", 5, 3),
        TableSpec::new("b", 1, 8),
        TableSpec::new("c", 13, 1),
        TableSpec::new("d", 37, 17),
    ]
}

fn make_bags(
    r: &mut impl Rng,
    specs: &[TableSpec],
    dt: DType,
    pooling: Pooling,
    dev: &Device,
) -> (EmbeddingBags, Vec<Vec<f64>>) {
    let made: Vec<(Tensor, Vec<f64>)> = specs
        .iter()
        .map(|s| random_tensor(r, &[s.rows, s.dim], 1.0, dt, dev))
        .collect();
    let refs: Vec<&Tensor> = made.iter().map(|(t, _)| t).collect();
    let bags = EmbeddingBags::from_tables(specs, &refs, pooling).unwrap();
    (bags, made.into_iter().map(|(_, v)| v).collect())
}

fn make_batch(r: &mut impl Rng, specs: &[TableSpec], b: usize, weighted: bool) -> Problem {
    let mut indices = Vec::new();
    let mut offsets = vec![0i64];
    for s in specs {
        for _ in 0..b {
            let n = r.random_range(0..5usize);
            for _ in 0..n {
                indices.push(r.random_range(0..s.rows) as i64);
            }
            offsets.push(indices.len() as i64);
        }
    }
    let psw = weighted.then(|| {
        (0..indices.len())
            .map(|_| r.random_range(-2.0..2.0))
            .collect()
    });
    Problem {
        specs: specs.to_vec(),
        tables: Vec::new(),
        b,
        indices,
        offsets,
        psw,
    }
}

impl Problem {
    fn bag(&self, t: usize, s: usize) -> std::ops::Range<usize> {
        let k = t * self.b + s;
        self.offsets[k] as usize..self.offsets[k + 1] as usize
    }

    /// The weight of lookup j in its bag (per-sample weight, × 1/n for mean pooling).
    fn weight(&self, pooling: Pooling, t: usize, s: usize, j: usize) -> f64 {
        let w = self.psw.as_ref().map_or(1.0, |p| p[j] as f64);
        match pooling {
            Pooling::Mean => w / self.bag(t, s).len() as f64,
            Pooling::Sum => w,
        }
    }

    fn total_dim(&self) -> usize {
        self.specs.iter().map(|s| s.dim).sum()
    }

    fn col_off(&self, t: usize) -> usize {
        self.specs[..t].iter().map(|s| s.dim).sum()
    }

    fn forward(&self, pooling: Pooling) -> Vec<f64> {
        let td = self.total_dim();
        let mut out = vec![0.0; self.b * td];
        for (t, sp) in self.specs.iter().enumerate() {
            for s in 0..self.b {
                for j in self.bag(t, s) {
                    let w = self.weight(pooling, t, s, j);
                    let row = self.indices[j] as usize;
                    for c in 0..sp.dim {
                        out[s * td + self.col_off(t) + c] += w * self.tables[t][row * sp.dim + c];
                    }
                }
            }
        }
        out
    }

    /// Per-table dense gradients of Σ dy ⊙ forward.
    fn grads(&self, pooling: Pooling, dy: &[f64]) -> Vec<Vec<f64>> {
        let td = self.total_dim();
        let mut g: Vec<Vec<f64>> = self
            .specs
            .iter()
            .map(|s| vec![0.0; s.rows * s.dim])
            .collect();
        for (t, sp) in self.specs.iter().enumerate() {
            for s in 0..self.b {
                for j in self.bag(t, s) {
                    let w = self.weight(pooling, t, s, j);
                    let row = self.indices[j] as usize;
                    for c in 0..sp.dim {
                        g[t][row * sp.dim + c] += w * dy[s * td + self.col_off(t) + c];
                    }
                }
            }
        }
        g
    }

    fn touched(&self, t: usize) -> Vec<bool> {
        let mut on = vec![false; self.specs[t].rows];
        for s in 0..self.b {
            for j in self.bag(t, s) {
                on[self.indices[j] as usize] = true;
            }
        }
        on
    }

    fn batch(&self, bags: &EmbeddingBags) -> BagBatch {
        bags.batch(&self.indices, &self.offsets, self.psw.as_deref())
            .unwrap()
    }
}

fn tables_of(bags: &EmbeddingBags) -> Vec<Vec<f64>> {
    (0..bags.specs().len())
        .map(|t| bags.table(t).unwrap().to_f64_vec().unwrap())
        .collect()
}

fn bits_of(bags: &EmbeddingBags) -> Vec<Vec<u8>> {
    (0..bags.specs().len())
        .map(|t| bags.table(t).unwrap().to_bytes().unwrap())
        .collect()
}

#[test]
fn forward_matches_f64_for_every_pooling_and_dtype() {
    let mut r = rng("embedding-forward");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for (pooling, weighted) in [
                (Pooling::Sum, false),
                (Pooling::Sum, true),
                (Pooling::Mean, false),
            ] {
                for b in [1usize, 7, 33] {
                    let what = format!("{} {dt} {pooling:?} weighted={weighted} B={b}", be.name);
                    let (bags, tables) = make_bags(&mut r, &specs(), dt, pooling, dev);
                    let mut p = make_batch(&mut r, &specs(), b, weighted);
                    p.tables = tables;
                    let batch = p.batch(&bags);
                    assert_eq!(batch.batch_size(), b);
                    assert_eq!(batch.lookups(), p.indices.len());
                    let mut out = Tensor::poisoned(&[b, bags.output_dim()], dt, dev).unwrap();
                    bags.forward_into(&batch, &mut out).unwrap();
                    let want = p.forward(pooling);
                    assert_close(
                        &what,
                        &out.to_f64_vec().unwrap(),
                        &want,
                        tolerance(dt, 4) * if weighted { 2.0 } else { 1.0 },
                    );
                }
            }
        }
    }
}

#[test]
fn dense_gradient_matches_f64_and_is_zero_elsewhere() {
    let mut r = rng("embedding-grad");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for pooling in [Pooling::Sum, Pooling::Mean] {
                let what = format!("{} {dt} {pooling:?}", be.name);
                let (bags, tables) = make_bags(&mut r, &specs(), dt, pooling, dev);
                let mut p = make_batch(&mut r, &specs(), 9, pooling == Pooling::Sum);
                p.tables = tables;
                let batch = p.batch(&bags);
                let (dy, dyv) = random_tensor(&mut r, &[9, bags.output_dim()], 1.0, dt, dev);
                let grad = bags.backward_dense(&batch, &dy).unwrap();
                assert_eq!(grad.dtype(), DType::F32);
                let want = p.grads(pooling, &dyv);
                for (t, w) in want.iter().enumerate() {
                    let got = bags.table_of(&grad, t).unwrap().to_f64_vec().unwrap();
                    // f32 sums of ≤ 36 f32 products: the f32 policy for every storage dtype.
                    assert_close(
                        &format!("{what} table {t}"),
                        &got,
                        w,
                        tolerance(DType::F32, 36),
                    );
                    let touched = p.touched(t);
                    let dim = p.specs[t].dim;
                    for (row, on) in touched.iter().enumerate() {
                        if !on {
                            assert!(
                                got[row * dim..(row + 1) * dim].iter().all(|&v| v == 0.0),
                                "{what} table {t} row {row}: untouched but nonzero"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// One fused step's reference from the stored values before it, f64.
#[allow(clippy::too_many_arguments)]
fn check_update(
    what: &str,
    p: &Problem,
    grads: &[Vec<f64>],
    before: &[Vec<f64>],
    before_bits: &[Vec<u8>],
    after: &EmbeddingBags,
    new_rows: impl Fn(usize, usize, &[f64], &[f64]) -> Vec<f64>,
    dt: DType,
) {
    let after_vals = tables_of(after);
    let after_bits = bits_of(after);
    for t in 0..p.specs.len() {
        let dim = p.specs[t].dim;
        let touched = p.touched(t);
        let mut want = before[t].clone();
        for (row, on) in touched.iter().enumerate() {
            if *on {
                let g = &grads[t][row * dim..(row + 1) * dim];
                let w = &before[t][row * dim..(row + 1) * dim];
                want[row * dim..(row + 1) * dim].copy_from_slice(&new_rows(t, row, w, g));
            } else {
                let s = dt.size();
                assert_eq!(
                    &after_bits[t][row * dim * s..(row + 1) * dim * s],
                    &before_bits[t][row * dim * s..(row + 1) * dim * s],
                    "{what} table {t} row {row}: untouched row changed"
                );
            }
        }
        assert_close(
            &format!("{what} table {t}"),
            &after_vals[t],
            &want,
            tolerance(dt, 36) * 2.0,
        );
    }
}

#[test]
fn fused_sgd_updates_only_the_batch_rows() {
    let mut r = rng("embedding-sgd");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for (pooling, wd) in [(Pooling::Sum, 0.0f32), (Pooling::Mean, 0.05)] {
                let what = format!("{} {dt} {pooling:?} wd={wd}", be.name);
                let (mut bags, _) = make_bags(&mut r, &specs(), dt, pooling, dev);
                let p0 = make_batch(&mut r, &specs(), 11, false);
                let batch = p0.batch(&bags);
                let (dy, dyv) = random_tensor(&mut r, &[11, bags.output_dim()], 1.0, dt, dev);
                let before = tables_of(&bags);
                let before_bits = bits_of(&bags);
                let lr = 0.3f32;
                bags.update_sgd(&batch, &dy, lr, wd).unwrap();
                let grads = p0.grads(pooling, &dyv);
                check_update(
                    &what,
                    &p0,
                    &grads,
                    &before,
                    &before_bits,
                    &bags,
                    |_, _, w, g| {
                        w.iter()
                            .zip(g)
                            .map(|(&w, &g)| w - lr as f64 * (g + wd as f64 * w))
                            .collect()
                    },
                    dt,
                );
            }
        }
    }
}

#[test]
fn fused_rowwise_adagrad_matches_fbgemm_over_two_steps() {
    let mut r = rng("embedding-adagrad");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for wd in [0.0f32, 0.02] {
                let what = format!("{} {dt} wd={wd}", be.name);
                let (mut bags, _) = make_bags(&mut r, &specs(), dt, Pooling::Sum, dev);
                let mut state = bags.rowwise_adagrad_state().unwrap();
                let cfg = RowwiseAdagradConfig {
                    lr: 0.2,
                    eps: 1e-6,
                    weight_decay: wd,
                };
                for step in 0..2 {
                    let what = format!("{what} step {step}");
                    let p0 = make_batch(&mut r, &specs(), 8, true);
                    let batch = p0.batch(&bags);
                    let (dy, dyv) = random_tensor(&mut r, &[8, bags.output_dim()], 1.0, dt, dev);
                    let before = tables_of(&bags);
                    let before_bits = bits_of(&bags);
                    let s_before = state.to_f64_vec().unwrap();
                    bags.update_rowwise_adagrad(&batch, &dy, &cfg, &mut state)
                        .unwrap();
                    let gp = p0;
                    let grads = gp.grads(Pooling::Sum, &dyv);
                    let rows_off: Vec<usize> = (0..gp.specs.len())
                        .map(|t| gp.specs[..t].iter().map(|s| s.rows).sum())
                        .collect();
                    let mut s_want = s_before.clone();
                    check_update(
                        &what,
                        &gp,
                        &grads,
                        &before,
                        &before_bits,
                        &bags,
                        |t, row, w, g| {
                            let g: Vec<f64> =
                                g.iter().zip(w).map(|(&g, &w)| g + wd as f64 * w).collect();
                            let sq: f64 = g.iter().map(|v| v * v).sum::<f64>() / g.len() as f64;
                            let s = s_before[rows_off[t] + row] + sq;
                            let mult = cfg.lr as f64 / (s.sqrt() + cfg.eps as f64);
                            w.iter().zip(&g).map(|(&w, &g)| w - mult * g).collect()
                        },
                        dt,
                    );
                    for t in 0..gp.specs.len() {
                        let dim = gp.specs[t].dim;
                        for (row, on) in gp.touched(t).iter().enumerate() {
                            if *on {
                                let g = &grads[t][row * dim..(row + 1) * dim];
                                let w = &before[t][row * dim..(row + 1) * dim];
                                let sq: f64 = g
                                    .iter()
                                    .zip(w)
                                    .map(|(&g, &w)| (g + wd as f64 * w).powi(2))
                                    .sum::<f64>()
                                    / dim as f64;
                                s_want[rows_off[t] + row] += sq;
                            }
                        }
                    }
                    assert_close(
                        &format!("{what} state"),
                        &state.to_f64_vec().unwrap(),
                        &s_want,
                        tolerance(DType::F32, 36) * 4.0,
                    );
                }
            }
        }
    }
}

#[test]
fn updates_are_repeatable_bit_for_bit() {
    let mut r = rng("embedding-repeat");
    for be in backends() {
        let dev = &be.device;
        for dt in [DType::F32, DType::BF16] {
            let (bags0, tables) = make_bags(&mut r, &specs(), dt, Pooling::Sum, dev);
            let p = make_batch(&mut r, &specs(), 16, true);
            let (dy, _) = random_tensor(&mut r, &[16, bags0.output_dim()], 1.0, dt, dev);
            let cfg = RowwiseAdagradConfig {
                lr: 0.1,
                eps: 1e-8,
                weight_decay: 0.0,
            };
            let run = || {
                let refs: Vec<Tensor> = tables
                    .iter()
                    .zip(specs())
                    .map(|(v, s)| {
                        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                        Tensor::from_f32(&f, &[s.rows, s.dim], dt, dev).unwrap()
                    })
                    .collect();
                let refs: Vec<&Tensor> = refs.iter().collect();
                let mut bags = EmbeddingBags::from_tables(&specs(), &refs, Pooling::Sum).unwrap();
                let mut state = bags.rowwise_adagrad_state().unwrap();
                let batch = p.batch(&bags);
                bags.update_rowwise_adagrad(&batch, &dy, &cfg, &mut state)
                    .unwrap();
                let y = bags.forward(&batch).unwrap();
                (
                    bits_of(&bags),
                    state.to_bytes().unwrap(),
                    y.to_bytes().unwrap(),
                )
            };
            assert!(run() == run(), "{} {dt}: two runs differ", be.name);
        }
    }
}

#[test]
fn nan_in_a_row_or_in_dy_propagates() {
    for be in backends() {
        let dev = &be.device;
        let specs = [TableSpec::new("x", 4, 2), TableSpec::new("y", 3, 3)];
        let mut t0 = vec![0.5f32; 8];
        t0[2] = f32::NAN; // row 1, column 0 of table x
        let a = Tensor::from_f32(&t0, &[4, 2], DType::F32, dev).unwrap();
        let b = Tensor::full(&[3, 3], 0.25, DType::F32, dev).unwrap();
        let mut bags = EmbeddingBags::from_tables(&specs, &[&a, &b], Pooling::Sum).unwrap();
        // bags: x: s0 = {1, 2}, s1 = {3}; y: s0 = {0}, s1 = {2}
        let batch = bags
            .batch(&[1, 2, 3, 0, 2], &[0, 2, 3, 4, 5], None)
            .unwrap();
        let y = bags.forward(&batch).unwrap().to_f32_vec().unwrap();
        assert!(y[0].is_nan(), "{}: sample 0 column 0 must be NaN", be.name);
        assert!(
            y.iter().enumerate().all(|(i, v)| i == 0 || v.is_finite()),
            "{}: only sample 0 column 0 holds the NaN row: {y:?}",
            be.name
        );
        let mut dyv = vec![1.0f32; 10];
        dyv[5 + 3] = f32::NAN; // sample 1, table y column 1
        let dy = Tensor::from_f32(&dyv, &[2, 5], DType::F32, dev).unwrap();
        bags.update_sgd(&batch, &dy, 0.1, 0.0).unwrap();
        let ty = bags.table(1).unwrap().to_f32_vec().unwrap();
        assert!(ty[2 * 3 + 1].is_nan(), "{}: table y row 2 col 1", be.name);
        assert!(
            ty.iter().enumerate().all(|(i, v)| i == 7 || v.is_finite()),
            "{}: {ty:?}",
            be.name
        );
    }
}

#[test]
fn fdo_widths_build_the_bags() {
    let mut r = rng("embedding-fdo");
    for be in backends() {
        let dev = &be.device;
        // Rank-2 tables in 6 dims plus tiny noise: FDO keeps 2 of 6.
        let mut tables = Vec::new();
        for _ in 0..2 {
            let (u, _) = random_tensor(&mut r, &[40, 2], 1.0, DType::F32, &Device::cpu());
            let u = u.to_f32_vec().unwrap();
            let v: Vec<f32> = (0..12).map(|_| r.random_range(-1.0..1.0)).collect();
            let mut e = vec![0f32; 40 * 6];
            for i in 0..40 {
                for j in 0..6 {
                    e[i * 6 + j] =
                        u[i * 2] * v[j] + u[i * 2 + 1] * v[6 + j] + r.random_range(-1e-4..1e-4);
                }
            }
            tables.push(Tensor::from_f32(&e, &[40, 6], DType::F32, dev).unwrap());
        }
        let pcas: Vec<_> = tables
            .iter()
            .map(|t| fdo::analyse(t, 0.99).unwrap())
            .collect();
        assert!(pcas.iter().all(|p| p.k == 2), "{}", be.name);
        let refs: Vec<&Tensor> = tables.iter().collect();
        let bags = EmbeddingBags::from_fdo(&["f0", "f1"], &refs, &pcas, Pooling::Sum).unwrap();
        assert_eq!(bags.output_dim(), 4);
        for t in 0..2 {
            let want = fdo::project(&tables[t], &pcas[t])
                .unwrap()
                .to_f64_vec()
                .unwrap();
            let got = bags.table(t).unwrap().to_f64_vec().unwrap();
            assert_eq!(got, want, "{}: table {t} is the projection", be.name);
        }
    }
}

#[test]
fn a_step_makes_no_host_copies_beyond_the_batch_upload() {
    let mut r = rng("embedding-transfers");
    for be in backends() {
        let dev = &be.device;
        let (mut bags, _) = make_bags(&mut r, &specs(), DType::F32, Pooling::Sum, dev);
        let mut state = bags.rowwise_adagrad_state().unwrap();
        let p = make_batch(&mut r, &specs(), 6, false);
        let dy = Tensor::full(&[6, bags.output_dim()], 0.5, DType::F32, dev).unwrap();
        let before = dev.host_transfer_count();
        let batch = p.batch(&bags);
        let after_batch = dev.host_transfer_count();
        let y = bags.forward(&batch).unwrap();
        bags.update_sgd(&batch, &dy, 0.1, 0.0).unwrap();
        let cfg = RowwiseAdagradConfig {
            lr: 0.1,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        bags.update_rowwise_adagrad(&batch, &dy, &cfg, &mut state)
            .unwrap();
        let _grad = bags.backward_dense(&batch, &dy).unwrap();
        let after = dev.host_transfer_count();
        if be.name == "cpu" {
            assert_eq!(after, before, "cpu makes no device copies");
        } else {
            assert_eq!(
                after_batch - before,
                1,
                "{}: the batch is one upload",
                be.name
            );
            assert_eq!(
                after, after_batch,
                "{}: forward + updates copy nothing",
                be.name
            );
        }
        drop(y);
    }
}

fn expect_invalid(what: &str, res: recfuse::Result<impl std::fmt::Debug>, arg: &str) {
    match res {
        Err(Error::InvalidArgument { arg: a, .. } | Error::Shape { arg: a, .. }) if a == arg => {}
        Err(Error::DType { arg: a, .. } | Error::DeviceMismatch { arg: a, .. }) if a == arg => {}
        other => panic!("{what}: expected an error naming `{arg}`, got {other:?}"),
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    for be in backends() {
        let dev = &be.device;
        let sp = [TableSpec::new("x", 4, 2), TableSpec::new("y", 3, 3)];
        let mut bags = EmbeddingBags::new(&sp, Pooling::Mean, DType::F32, 7, dev).unwrap();
        let n = &be.name;
        expect_invalid(n, bags.batch(&[4, 0], &[0, 1, 1, 2, 2], None), "indices");
        expect_invalid(n, bags.batch(&[-1, 0], &[0, 1, 1, 2, 2], None), "indices");
        expect_invalid(n, bags.batch(&[0, 0], &[0, 1, 2, 2], None), "offsets");
        expect_invalid(n, bags.batch(&[0, 0], &[0, 2, 1, 2, 2], None), "offsets");
        expect_invalid(n, bags.batch(&[0, 0], &[0, 1, 1, 2, 3], None), "offsets");
        expect_invalid(n, bags.batch(&[0, 0], &[1, 1, 1, 2, 2], None), "offsets");
        expect_invalid(
            n,
            bags.batch(&[0, 0], &[0, 1, 1, 2, 2], Some(&[1.0, 2.0])),
            "per_sample_weights",
        );
        let batch = bags.batch(&[0, 2], &[0, 1, 1, 2, 2], None).unwrap();
        let dy_bad = Tensor::zeros(&[2, 4], DType::F32, dev).unwrap();
        expect_invalid(n, bags.update_sgd(&batch, &dy_bad, 0.1, 0.0), "dy");
        let dy = Tensor::zeros(&[2, 5], DType::F32, dev).unwrap();
        expect_invalid(n, bags.update_sgd(&batch, &dy, -0.1, 0.0), "lr");
        expect_invalid(n, bags.update_sgd(&batch, &dy, f32::NAN, 0.0), "lr");
        let cfg = RowwiseAdagradConfig {
            lr: 0.1,
            eps: 0.0,
            weight_decay: 0.0,
        };
        let mut st = bags.rowwise_adagrad_state().unwrap();
        expect_invalid(
            n,
            bags.update_rowwise_adagrad(&batch, &dy, &cfg, &mut st),
            "eps",
        );
        let cfg = RowwiseAdagradConfig { eps: 1e-8, ..cfg };
        let mut st_bad = Tensor::zeros(&[6], DType::F32, dev).unwrap();
        expect_invalid(
            n,
            bags.update_rowwise_adagrad(&batch, &dy, &cfg, &mut st_bad),
            "state",
        );
        let mut out_bad = Tensor::zeros(&[2, 5], DType::BF16, dev).unwrap();
        expect_invalid(n, bags.forward_into(&batch, &mut out_bad), "out");
        // A batch built for other tables.
        let other = EmbeddingBags::new(
            &[TableSpec::new("x", 9, 2), TableSpec::new("y", 3, 3)],
            Pooling::Mean,
            DType::F32,
            7,
            dev,
        )
        .unwrap();
        let foreign = other.batch(&[8, 2], &[0, 1, 1, 2, 2], None).unwrap();
        expect_invalid(n, bags.forward(&foreign), "batch");
        // Constructors.
        expect_invalid(
            n,
            EmbeddingBags::new(
                &[TableSpec::new("x", 0, 2)],
                Pooling::Sum,
                DType::F32,
                0,
                dev,
            ),
            "tables",
        );
        expect_invalid(
            n,
            EmbeddingBags::new(
                &[TableSpec::new("x", 2, 2), TableSpec::new("x", 2, 2)],
                Pooling::Sum,
                DType::F32,
                0,
                dev,
            ),
            "tables",
        );
        expect_invalid(
            n,
            EmbeddingBags::new(
                &[TableSpec::new("x", 1 << 20, 1 << 12)],
                Pooling::Sum,
                DType::F32,
                0,
                dev,
            ),
            "tables",
        );
        let t = Tensor::zeros(&[3, 2], DType::F32, dev).unwrap();
        expect_invalid(
            n,
            EmbeddingBags::from_tables(&sp[..1], &[&t], Pooling::Sum),
            "tables",
        );
        expect_invalid(n, bags.table(2), "t");
    }
}
