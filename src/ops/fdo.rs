//! FDO — field-level dimension optimisation (GDCN paper, §4): PCA on each field's trained
//! embedding table chooses that field's width.
//!
//! For a table `E: [n_f, d]`: centre, covariance `Σ = (E − μ)ᵀ(E − μ)/(n_f − 1)`, symmetric
//! eigendecomposition (nalgebra), eigenvalues sorted descending. The field's width is the
//! smallest k whose cumulative explained variance reaches `ratio` (the paper: 0.8 kept 23 % of
//! the parameters on Criteo at equal AUC). The top-k directions let a trainer warm-start the
//! reduced table with `project` instead of retraining from scratch.
//!
//! When the table lives on a GPU, `EᵀE` and the column sums run there (the GEMM core, batch
//! axis as the reduction, deterministic); the d×d correction `− n·μμᵀ` and the eigensolver run
//! on the host in f64.
//!
//! ```
//! use recfuse::ops::fdo;
//! use recfuse::{DType, Device, Tensor};
//! // Four 3-d embeddings lying on a line: one direction explains everything.
//! let e = Tensor::from_f32(&[1., 2., 3., 2., 4., 6., -1., -2., -3., 0., 0., 0.], &[4, 3], DType::F32, &Device::cpu())?;
//! let f = fdo::analyse(&e, 0.95)?;
//! assert_eq!(f.k, 1);
//! assert!((f.explained[0] - 1.0).abs() < 1e-9);
//! let reduced = fdo::project(&e, &f)?; // [4, 1] warm start
//! assert_eq!(reduced.shape(), &[4, 1]);
//! # Ok::<(), recfuse::Error>(())
//! ```

use nalgebra::{DMatrix, SymmetricEigen};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::backend;
use crate::ops::gemm::{Gemm, MatView};
use crate::tensor::Tensor;

const OP: &str = "fdo::analyse";

/// PCA of one field's embedding table.
#[derive(Clone, Debug)]
pub struct FieldPca {
    /// Smallest width whose cumulative explained variance reaches the requested ratio.
    pub k: usize,
    /// Eigenvalues of the covariance, descending (the variance along each direction).
    pub eigenvalues: Vec<f64>,
    /// Cumulative explained-variance ratio after 1, 2, …, d components (the whole curve).
    pub explained: Vec<f64>,
    /// Column means μ of the table.
    pub mean: Vec<f64>,
    /// The top-k principal directions, `[k, d]` row-major (unit rows).
    pub directions: Vec<f64>,
    /// All d directions, `[d, d]` row-major, in eigenvalue order (for other ratios).
    pub all_directions: Vec<f64>,
}

impl FieldPca {
    /// The width for another explained-variance ratio, from the same curve.
    pub fn k_for(&self, ratio: f64) -> usize {
        smallest_k(&self.explained, ratio)
    }
}

fn smallest_k(explained: &[f64], ratio: f64) -> usize {
    // A tiny slack so a ratio of exactly 1.0 is reached despite rounding in the cumulative sum.
    explained
        .iter()
        .position(|&e| e >= ratio - 1e-12)
        .map_or(explained.len(), |i| i + 1)
}

/// Covariance of `table` in f64 (centred), computed where the table lives.
fn covariance(table: &Tensor, n: usize, d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let dev = table.device();
    if dev == Device::Cpu {
        let v = table.to_f64_vec()?;
        let mut mean = vec![0.0; d];
        for r in 0..n {
            for j in 0..d {
                mean[j] += v[r * d + j];
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut cov = vec![0.0; d * d];
        for r in 0..n {
            let row = &v[r * d..r * d + d];
            for i in 0..d {
                let ci = row[i] - mean[i];
                for j in i..d {
                    cov[i * d + j] += ci * (row[j] - mean[j]);
                }
            }
        }
        for i in 0..d {
            for j in i..d {
                let c = cov[i * d + j] / (n - 1) as f64;
                cov[i * d + j] = c;
                cov[j * d + i] = c;
            }
        }
        return Ok((cov, mean));
    }
    // On a GPU, two passes: the column means, then (E − 1μᵀ)ᵀ(E − 1μᵀ) in f32 on the centred
    // table. (EᵀE − nμμᵀ would cancel catastrophically: with mean 10 and sd 0.01 the top
    // eigenvalue came out 24% off and the smallest exactly 0.)
    let mut mu = Tensor::zeros(&[d], DType::F32, &dev)?;
    backend::col_sum(&dev, table, n, d, &mut mu, false, false)?;
    mu.scale(1.0 / n as f32)?;
    let mut centred = table.to_dtype(DType::F32)?;
    centred.axpy(-1.0, &crate::ops::glue::sum_backward(&mu, 0, n)?)?;
    let mut gram = Tensor::zeros(&[d, d], DType::F32, &dev)?;
    let g = Gemm::plain(
        d,
        d,
        n,
        &centred,
        MatView::new(0, 1, d, 0),
        &centred,
        MatView::new(0, d, 1, 0),
    );
    g.check(OP, &gram, None)?;
    backend::gemm(&dev, &g, &mut gram, None)?;
    let gram = gram.to_f64_vec()?;
    let mean: Vec<f64> = mu.to_f64_vec()?;
    let cov = gram.iter().map(|g| g / (n - 1) as f64).collect();
    Ok((cov, mean))
}

/// PCA of one field's table `[n_f, d]`, choosing k for `ratio` ∈ (0, 1].
pub fn analyse(table: &Tensor, ratio: f64) -> Result<FieldPca> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(Error::invalid(
            OP,
            "ratio",
            format!("{ratio} is not in (0, 1]"),
        ));
    }
    let s = table.shape();
    if s.len() != 2 || s[1] == 0 {
        return Err(Error::shape(OP, "table", "[n_f, d] with d ≥ 1", s));
    }
    let (n, d) = (s[0], s[1]);
    if n < 2 {
        return Err(Error::shape(
            OP,
            "table",
            "at least 2 rows for a covariance",
            s,
        ));
    }
    let (cov, mean) = covariance(table, n, d)?;
    if cov.iter().any(|c| !c.is_finite()) {
        return Err(Error::invalid(
            OP,
            "table",
            "contains NaN or infinite values",
        ));
    }
    let eig = SymmetricEigen::new(DMatrix::from_row_slice(d, d, &cov));
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    // Covariances are PSD; clamp the eigensolver's tiny negative round-off to 0.
    let eigenvalues: Vec<f64> = order.iter().map(|&i| eig.eigenvalues[i].max(0.0)).collect();
    let total: f64 = eigenvalues.iter().sum();
    let mut run = 0.0;
    let explained: Vec<f64> = eigenvalues
        .iter()
        .map(|&e| {
            run += e;
            if total > 0.0 {
                run / total
            } else {
                1.0
            }
        })
        .collect();
    let mut all_directions = vec![0.0; d * d];
    for (r, &i) in order.iter().enumerate() {
        // Fix each direction's sign (largest component positive) so results are reproducible.
        let col = eig.eigenvectors.column(i);
        let big = (0..d)
            .max_by(|&a, &b| col[a].abs().total_cmp(&col[b].abs()))
            .unwrap_or(0);
        let sign = if col[big] < 0.0 { -1.0 } else { 1.0 };
        for j in 0..d {
            all_directions[r * d + j] = sign * col[j];
        }
    }
    let k = smallest_k(&explained, ratio);
    Ok(FieldPca {
        k,
        eigenvalues,
        explained,
        mean,
        directions: all_directions[..k * d].to_vec(),
        all_directions,
    })
}

/// PCA of every field; `analyse` per table.
pub fn analyse_all(tables: &[Tensor], ratio: f64) -> Result<Vec<FieldPca>> {
    tables.iter().map(|t| analyse(t, ratio)).collect()
}

/// Warm start for the reduced table: `(E − μ)·Dₖᵀ`, `[n_f, k]`, on the table's device and in
/// its dtype.
pub fn project(table: &Tensor, pca: &FieldPca) -> Result<Tensor> {
    const P_OP: &str = "fdo::project";
    let s = table.shape();
    let d = pca.mean.len();
    if s.len() != 2 || s[1] != d {
        return Err(Error::shape(P_OP, "table", format!("[n_f, {d}]"), s));
    }
    let (n, k) = (s[0], pca.k);
    // `k` may have been changed (e.g. to `k_for` another ratio): take the first k of all d
    // directions, which every FieldPca keeps.
    if k == 0 || k > d {
        return Err(Error::invalid(
            P_OP,
            "pca.k",
            format!("{k} is not in 1..={d} (the table width)"),
        ));
    }
    if pca.all_directions.len() != d * d {
        return Err(Error::shape(
            P_OP,
            "pca.all_directions",
            format!("[{d} × {d}]"),
            &[pca.all_directions.len()],
        ));
    }
    let dirs_k = &pca.all_directions[..k * d];
    let dev = table.device();
    // Fold the centring into a bias: (E − μ)·Dᵀ = E·Dᵀ − μ·Dᵀ.
    let dirs: Vec<f32> = dirs_k.iter().map(|&v| v as f32).collect();
    let shift: Vec<f32> = (0..k)
        .map(|r| -(0..d).map(|j| pca.mean[j] * dirs_k[r * d + j]).sum::<f64>() as f32)
        .collect();
    let w = Tensor::from_f32(&dirs, &[k, d], table.dtype(), &dev)?;
    let b = Tensor::from_f32(&shift, &[k], table.dtype(), &dev)?;
    let mut out = Tensor::zeros(&[n, k], table.dtype(), &dev)?;
    let g = Gemm {
        bias: Some((&b, 0)),
        ..Gemm::plain(
            n,
            k,
            d,
            table,
            MatView::new(0, d, 1, 0),
            &w,
            MatView::new(0, 1, d, 0),
        )
    };
    g.check(P_OP, &out, None)?;
    backend::gemm(&dev, &g, &mut out, None)?;
    Ok(out)
}
