//! A CTR trainer on the public API, the whole step on the device:
//! `cargo run --release --example train_ctr` (16–26 s on a shared 2-core CPU, once built).
//!
//! The data is synthetic, drawn from a known logit model with first-order terms and planted 2-
//! and 3-way field interactions, so the best possible test AUC (the Bayes oracle: the AUC of
//! the true click probabilities on the same test labels) is known and printed next to the
//! model's. Eight categorical fields, one value per field per sample (a one-row bag). Every
//! step trains on a fresh batch drawn from the model (a stream: no epochs, no overfitting).
//!
//! The model: per-field embedding bags (`ops::embedding::EmbeddingBags`, one launch over all
//! tables) → a GDCN stack (`ops::gated_cross::GatedCross`) → a linear head (`ops::linear`) →
//! BCE-with-logits (`ops::bce`). Dense parameters (cross layers, head) are trained with Adam
//! over a `params::Parameters` set (`ops::optim::Adam`); the embedding tables with the fused
//! sparse backward + row-wise Adagrad update, which touches only the batch's rows. A
//! no-cross-layer baseline (the same embeddings straight into the head, trained the same way)
//! shows what the cross layers add. `--hiformer` adds a Hiformer layer over the fields as
//! tokens, beside the cross stack (its output concatenated with the cross stack's).
//!
//! Embedding widths come from FDO (GDCN paper §4), as `EmbeddingBags::from_fdo` intends: a
//! short warm-up run trains the GDCN model at a uniform width; `ops::fdo::analyse` runs PCA on
//! each trained table and picks the smallest width keeping 95 % of its variance; `from_fdo`
//! builds the real model's bags at those per-field widths, warm-started with each table's
//! projection onto its principal directions. The GDCN model and the baseline both start from
//! these bags; their dense layers start fresh.
//!
//! What crosses to the host in a training step: the batch (one upload of the lookup indices
//! and offsets, built by `EmbeddingBags::batch`, and one of the labels) and, every
//! `LOG_EVERY` steps, the 4-byte running loss (accumulated on the device with `Tensor::add_`).
//! Nothing else: `tests/train_step.rs` counts the transfers of such a step on every GPU
//! backend, and this example counts them over each run too (`Device::host_transfer_count`).
//! Evaluation downloads the test logits once per test batch.
//!
//! Flags: `--backend cpu|wgpu|cuda|auto` (default cpu; `auto` is `Device::auto()`),
//! `--software` (let `wgpu` use a software adapter such as Mesa lavapipe: slow),
//! `--steps N` (training steps per model, default 4000; the warm-up is 3/8 of it),
//! `--smoke` (a few steps on small batches, for CI: checks that the loss fell and every number
//! is finite), `--hiformer`. The exit code is non-zero when the smoke check fails, when a full
//! run's GDCN test AUC is more than 0.01 below the oracle's, or when a training step on a GPU
//! made a host transfer beyond its input and the logged loss.

use std::process::ExitCode;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recfuse::ops::bce::{bce_with_logits, Reduction};
use recfuse::ops::embedding::{BagBatch, EmbeddingBags, Pooling, TableSpec};
use recfuse::ops::fdo;
use recfuse::ops::gated_cross::{GatedCross, Init, PackedCross, SavePolicy};
use recfuse::ops::glue;
use recfuse::ops::hiformer::{HiformerLayer, LayerConfig, LayerParams};
use recfuse::ops::linear::{self, Linear, LinearParams};
use recfuse::ops::optim::{Adam, AdamConfig, RowwiseAdagradConfig};
use recfuse::params::{prefixed, Parameters};
use recfuse::{DType, Device, Error, Result, Tensor, WgpuOptions};

/// Rows per field (the fields' cardinalities).
const CARDS: [usize; 8] = [40, 60, 100, 30, 150, 50, 80, 120];
/// Rank of the planted interaction vectors.
const RANK: usize = 4;
/// Intrinsic dimension of each field's planted vectors (what FDO should roughly find, plus
/// one for the first-order term): fields outside every interaction have only a scalar effect.
const INTRINSIC: [usize; 8] = [4, 2, 4, 2, 4, 3, 1, 1];
/// Planted 2-way and 3-way interactions (field indices).
const PAIRS: [(usize, usize); 3] = [(0, 1), (2, 3), (4, 5)];
const TRIPLES: [(usize, usize, usize); 2] = [(0, 2, 4), (1, 3, 5)];
/// Width of every table in the FDO warm-up.
const WARM_DIM: usize = 8;
/// FDO's explained-variance ratio.
const FDO_RATIO: f64 = 0.95;
const CROSS_LAYERS: usize = 3;
/// Adam's learning rate for the dense layers (decayed linearly to 10 %), and row-wise
/// Adagrad's for the embedding rows.
const DENSE_LR: f32 = 3e-3;
const EMB_LR: f32 = 0.3;
const LOG_EVERY: usize = 500;

/// The planted logit model: `logit = b + Σ_f a_f[x_f] + 0.35·Σ_pairs ⟨z_i, z_j⟩ +
/// 0.3·Σ_triples Σ_r z_i,r·z_j,r·z_k,r`, with `a_f[x] ~ N(0, 0.3²)` and `z_f[x] ∈ R^RANK` a
/// field mean plus a point of an `INTRINSIC[f]`-dimensional subspace.
struct Planted {
    bias: f64,
    first: Vec<Vec<f64>>,
    z: Vec<Vec<[f64; RANK]>>,
}

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl Planted {
    fn new(seed: u64) -> Planted {
        let mut rng = StdRng::seed_from_u64(seed);
        let first = CARDS
            .iter()
            .map(|&n| (0..n).map(|_| 0.3 * normal(&mut rng)).collect())
            .collect();
        let z = CARDS
            .iter()
            .zip(INTRINSIC)
            .map(|(&n, k)| {
                // A random RANK × k basis; each row is mean + basis · N(0, I_k).
                let basis: Vec<[f64; RANK]> = (0..k)
                    .map(|_| std::array::from_fn(|_| normal(&mut rng) / (k as f64).sqrt()))
                    .collect();
                // A non-zero mean gives every interaction lower-order marginals (as in real
                // logs); a pure zero-mean 3-way term has no gradient signal to start from.
                let mean: [f64; RANK] = std::array::from_fn(|_| 0.7 * normal(&mut rng));
                (0..n)
                    .map(|_| {
                        let g: Vec<f64> = (0..k).map(|_| normal(&mut rng)).collect();
                        std::array::from_fn(|r| {
                            mean[r] + (0..k).map(|j| basis[j][r] * g[j]).sum::<f64>()
                        })
                    })
                    .collect()
            })
            .collect();
        Planted {
            bias: -0.5,
            first,
            z,
        }
    }

    fn logit(&self, x: &[u32]) -> f64 {
        let z = |f: usize| &self.z[f][x[f] as usize];
        let mut l = self.bias;
        for (f, &v) in x.iter().enumerate() {
            l += self.first[f][v as usize];
        }
        for &(i, j) in &PAIRS {
            l += 0.35 * (0..RANK).map(|r| z(i)[r] * z(j)[r]).sum::<f64>();
        }
        for &(i, j, k) in &TRIPLES {
            l += 0.3 * (0..RANK).map(|r| z(i)[r] * z(j)[r] * z(k)[r]).sum::<f64>();
        }
        l
    }

    /// `n` samples: field values (row-major `[n, F]`), labels drawn from σ(logit), and the true
    /// click probabilities.
    fn sample(&self, n: usize, rng: &mut StdRng) -> Data {
        let mut x = Vec::with_capacity(n * CARDS.len());
        let mut y = Vec::with_capacity(n);
        let mut p = Vec::with_capacity(n);
        for _ in 0..n {
            let row: Vec<u32> = CARDS
                .iter()
                .map(|&c| rng.random_range(0..c as u32))
                .collect();
            let prob = 1.0 / (1.0 + (-self.logit(&row)).exp());
            y.push(if rng.random::<f64>() < prob { 1.0 } else { 0.0 });
            p.push(prob);
            x.extend(row);
        }
        Data { x, y, p }
    }
}

struct Data {
    x: Vec<u32>,
    y: Vec<f32>,
    p: Vec<f64>,
}

impl Data {
    fn len(&self) -> usize {
        self.y.len()
    }

    /// The bags' input for samples `ids` (FBGEMM layout, table-major: bag (t, b) holds the one
    /// value of field t of sample b) and the labels `[B, 1]`: the step's two uploads.
    fn batch(&self, bags: &EmbeddingBags, ids: &[usize]) -> Result<(BagBatch, Tensor)> {
        let f = CARDS.len();
        let mut indices = Vec::with_capacity(f * ids.len());
        for t in 0..f {
            indices.extend(ids.iter().map(|&s| i64::from(self.x[s * f + t])));
        }
        let offsets: Vec<i64> = (0..=indices.len() as i64).collect();
        let batch = bags.batch(&indices, &offsets, None)?;
        let y: Vec<f32> = ids.iter().map(|&s| self.y[s]).collect();
        let labels = Tensor::from_slice(&y, &[ids.len(), 1], &bags.device())?;
        Ok((batch, labels))
    }
}

/// AUC by the rank-sum (Mann–Whitney) formula, ties counted half.
fn auc(scores: &[f64], labels: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut pos) = (0.0, 0.0);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if labels[k] > 0.5 {
                rank_sum += avg_rank;
                pos += 1.0;
            }
        }
        i = j + 1;
    }
    let neg = scores.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// The optional Hiformer branch: the pooled embeddings projected to F tokens of width `HF_D`,
/// one Hiformer layer, flattened.
const HF_D: usize = 8;

struct HiformerBranch {
    layer: HiformerLayer,
}

/// The dense parameters of one model (and, the same type, their gradients): what Adam steps.
struct Dense {
    cross: Option<PackedCross>,
    /// Projection of the pooled embeddings to the Hiformer's tokens, and the layer.
    tokens: Option<LinearParams>,
    hiformer: Option<LayerParams>,
    head: LinearParams,
}

impl Parameters for Dense {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = Vec::new();
        if let Some(c) = &self.cross {
            v.extend(prefixed("cross", c.named_tensors()));
        }
        if let Some(t) = &self.tokens {
            v.extend(prefixed("tokens", t.named_tensors()));
        }
        if let Some(h) = &self.hiformer {
            v.extend(prefixed("hiformer", h.named_tensors()));
        }
        v.extend(prefixed("head", self.head.named_tensors()));
        v
    }

    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = Vec::new();
        if let Some(c) = &mut self.cross {
            v.extend(prefixed("cross", c.named_tensors_mut()));
        }
        if let Some(t) = &mut self.tokens {
            v.extend(prefixed("tokens", t.named_tensors_mut()));
        }
        if let Some(h) = &mut self.hiformer {
            v.extend(prefixed("hiformer", h.named_tensors_mut()));
        }
        v.extend(prefixed("head", self.head.named_tensors_mut()));
        v
    }

    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let cross = match &self.cross {
            Some(c) => Some(c.try_map(&mut |n, t| f(&format!("cross.{n}"), t))?),
            None => None,
        };
        let tokens = match &self.tokens {
            Some(p) => Some(p.try_map(&mut |n, t| f(&format!("tokens.{n}"), t))?),
            None => None,
        };
        let hiformer = match &self.hiformer {
            Some(p) => Some(p.try_map(&mut |n, t| f(&format!("hiformer.{n}"), t))?),
            None => None,
        };
        let head = self.head.try_map(&mut |n, t| f(&format!("head.{n}"), t))?;
        Ok(Dense {
            cross,
            tokens,
            hiformer,
            head,
        })
    }
}

/// One model: embedding bags + optional cross stack + optional Hiformer branch + head, with
/// their optimizers.
struct Model {
    bags: EmbeddingBags,
    adagrad: RowwiseAdagradConfig,
    adagrad_state: Tensor,
    cross: Option<GatedCross>,
    hiformer: Option<HiformerBranch>,
    dense: Dense,
    adam: Adam<Dense>,
    /// The dense learning rate before decay.
    lr: f32,
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    emb: Tensor,
    cross: Option<(Tensor, recfuse::ops::gated_cross::CrossSaved)>,
    tok: Option<(Tensor, recfuse::ops::hiformer::LayerSaved, Tensor)>,
    /// The head's input when it is a concatenation (with the Hiformer branch).
    concat: Option<Tensor>,
}

impl Saved {
    /// What the head saw: the concatenation, else the cross output, else the embeddings.
    fn head_in(&self) -> &Tensor {
        match (&self.concat, &self.cross) {
            (Some(c), _) => c,
            (None, Some((y, _))) => y,
            (None, None) => &self.emb,
        }
    }
}

fn missing(what: &str) -> Error {
    Error::InvalidArgument {
        op: "train_ctr",
        arg: "model",
        reason: format!("{what} is missing"),
    }
}

impl Model {
    fn new(
        bags: EmbeddingBags,
        with_cross: bool,
        with_hiformer: bool,
        lr: f32,
        seed: u64,
    ) -> Result<Model> {
        let dev = bags.device();
        let d = bags.output_dim();
        let f = bags.specs().len();
        let (cross, packed) = if with_cross {
            let net = GatedCross::new(d, CROSS_LAYERS);
            let w = net.init(Init::Gdcn, seed, &dev)?;
            let p = net.pack(&w, &dev)?;
            (Some(net), Some(p))
        } else {
            (None, None)
        };
        let (hiformer, tokens, hf_params) = if with_hiformer {
            let cfg = LayerConfig::new(f, HF_D, 2, 4, 4, 2 * HF_D);
            let layer = HiformerLayer {
                cfg,
                rank_qk: 16,
                rank_v: 16,
            };
            let p = layer.init(seed + 1, &dev)?;
            let t = LinearParams::init(d, f * HF_D, true, DType::F32, seed + 2, &dev)?;
            (Some(HiformerBranch { layer }), Some(t), Some(p))
        } else {
            (None, None, None)
        };
        let head_in = d + if with_hiformer { f * HF_D } else { 0 };
        let head = LinearParams::init(head_in, 1, true, DType::F32, seed + 3, &dev)?;
        let dense = Dense {
            cross: packed,
            tokens,
            hiformer: hf_params,
            head,
        };
        let adam = Adam::new(&dense, AdamConfig::adam(lr), false)?;
        Ok(Model {
            adagrad_state: bags.rowwise_adagrad_state()?,
            adagrad: RowwiseAdagradConfig {
                lr: EMB_LR,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            bags,
            cross,
            hiformer,
            dense,
            adam,
            lr,
        })
    }

    /// Logits `[B, 1]` and what backward needs. `policy` Recompute for evaluation (less kept).
    fn forward(&self, batch: &BagBatch, policy: SavePolicy) -> Result<(Tensor, Saved)> {
        let emb = self.bags.forward(batch)?;
        let cross = match (&self.cross, &self.dense.cross) {
            (Some(net), Some(p)) => Some(net.forward(&emb, p, policy)?),
            (None, _) => None,
            (Some(_), None) => return Err(missing("the cross parameters")),
        };
        let tok = match (&self.hiformer, &self.dense.tokens, &self.dense.hiformer) {
            (Some(hf), Some(tp), Some(hp)) => {
                let b = emb.shape()[0];
                let f = hf.layer.cfg.tokens;
                let t =
                    linear::forward(&emb, &tp.weight, tp.bias.as_ref(), None, &Linear::default())?
                        .y
                        .reshape(&[b, f, HF_D])?;
                let (z, saved) = hf.layer.forward(&t, hp, None)?;
                Some((t, saved, z.reshape(&[b, f * HF_D])?))
            }
            (None, _, _) => None,
            _ => return Err(missing("the Hiformer parameters")),
        };
        let concat = match &tok {
            Some((_, _, z)) => Some(glue::concat(&[cross.as_ref().map_or(&emb, |(y, _)| y), z])?),
            None => None,
        };
        let s = Saved {
            emb,
            cross,
            tok,
            concat,
        };
        let h = &self.dense.head;
        let cfg = Linear::default();
        let logits = linear::forward(s.head_in(), &h.weight, h.bias.as_ref(), None, &cfg)?.y;
        Ok((logits, s))
    }

    /// One training step, all on the device: forward, BCE, backward, Adam on the dense
    /// parameters, fused sparse row-wise Adagrad on the embedding rows of the batch. The loss
    /// is added to `loss_sum` (a device scalar); nothing is read back.
    fn step(&mut self, batch: &BagBatch, labels: &Tensor, loss_sum: &mut Tensor) -> Result<()> {
        let (logits, s) = self.forward(batch, SavePolicy::SaveAll)?;
        let mut dlogits = Tensor::zeros(logits.shape(), DType::F32, &logits.device())?;
        let loss = bce_with_logits(&logits, labels, None, Reduction::Mean, Some(&mut dlogits))?;
        loss_sum.add_(&loss)?;
        let cfg = Linear::default();
        let h = &self.dense.head;
        let gh = linear::backward(s.head_in(), &h.weight, None, &dlogits, &cfg, true)?;
        // Split the head's input gradient between the cross stack and the Hiformer branch.
        let d = self.bags.output_dim();
        let (d_body, d_tok) = match &s.tok {
            Some((_, _, z)) => {
                let mut parts = glue::split(&gh.dx, &[d, z.shape()[1]])?.into_iter();
                let a = parts.next().ok_or_else(|| missing("a split part"))?;
                (a, parts.next())
            }
            None => (gh.dx, None),
        };
        let (mut d_emb, g_cross) = match (&self.cross, &self.dense.cross, &s.cross) {
            (Some(net), Some(p), Some((_, saved))) => {
                let (dx, g) = net.backward(p, saved, &d_body)?;
                (dx, Some(g))
            }
            (None, _, _) => (d_body, None),
            _ => return Err(missing("the cross state")),
        };
        let (g_tokens, g_hf) = match (
            &self.hiformer,
            &self.dense.tokens,
            &self.dense.hiformer,
            &s.tok,
            d_tok,
        ) {
            (Some(hf), Some(tp), Some(hp), Some((t, saved, _)), Some(dz)) => {
                let b = t.shape()[0];
                let f = hf.layer.cfg.tokens;
                let dz = dz.reshape(&[b, f, HF_D])?;
                let (dt, g_hf) = hf.layer.backward(hp, saved, &dz)?;
                let dt = dt.reshape(&[b, f * HF_D])?;
                let gt = linear::backward(&s.emb, &tp.weight, None, &dt, &cfg, true)?;
                d_emb.add_(&gt.dx)?;
                (
                    Some(LinearParams {
                        weight: gt.dw,
                        bias: gt.db,
                    }),
                    Some(g_hf),
                )
            }
            (None, ..) => (None, None),
            _ => return Err(missing("the Hiformer state")),
        };
        let grads = Dense {
            cross: g_cross,
            tokens: g_tokens,
            hiformer: g_hf,
            head: LinearParams {
                weight: gh.dw,
                bias: gh.db,
            },
        };
        self.adam.step(&mut self.dense, &grads)?;
        self.bags
            .update_rowwise_adagrad(batch, &d_emb, &self.adagrad, &mut self.adagrad_state)
    }

    /// Test logits, in batches (one download per batch: evaluation, not training).
    fn predict(&self, data: &Data, batch: usize) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(data.len());
        let ids: Vec<usize> = (0..data.len()).collect();
        for chunk in ids.chunks(batch) {
            let (b, _) = data.batch(&self.bags, chunk)?;
            let (logits, _) = self.forward(&b, SavePolicy::Recompute)?;
            out.extend(logits.to_f64_vec()?);
        }
        Ok(out)
    }
}

/// What a training run reports.
struct Trained {
    /// Mean loss of the first and the last logging window.
    first: f32,
    last: f32,
    /// Host↔device copies over the run beyond the two input uploads per step and the one
    /// loss read per log line (always 0 on the CPU, which has no transfers to count).
    extra_transfers: u64,
}

/// Trains `model` for `steps` steps on fresh batches of `batch` samples from `planted`.
fn train(
    name: &str,
    model: &mut Model,
    planted: &Planted,
    steps: usize,
    batch: usize,
    rng: &mut StdRng,
) -> Result<Trained> {
    let dev = model.bags.device();
    // The per-thread transfer counter (`Device::host_transfer_count`) proves the step stays
    // on the device: only the batch goes up, only the logged loss comes down.
    let transfers0 = dev.host_transfer_count();
    let mut expected = 0u64;
    let mut loss_sum = Tensor::zeros(&[], DType::F32, &dev)?;
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    let t0 = Instant::now();
    let mut window = 0;
    let every = LOG_EVERY.min((steps / 4).max(1));
    for step in 1..=steps {
        // A fresh batch from the planted model every step (a stream, as production CTR
        // training reads one pass over new logs): no epochs, nothing to overfit.
        let data = planted.sample(batch, rng);
        let ids: Vec<usize> = (0..batch).collect();
        let (b, labels) = data.batch(&model.bags, &ids)?;
        // Linear decay of the dense learning rate to 10 % over the run (Adam's config is a
        // plain host value: changing it costs nothing on the device).
        let frac = (step - 1) as f32 / steps as f32;
        model.adam.cfg.lr = model.lr * (1.0 - 0.9 * frac);
        model.step(&b, &labels, &mut loss_sum)?;
        expected += 2;
        window += 1;
        if step % every == 0 || step == steps {
            // The one read of a training step, every `every` steps: the window's mean loss.
            let mean = loss_sum.to_vec::<f32>()?[0] / window as f32;
            loss_sum.fill(0.0)?;
            expected += 1;
            window = 0;
            if first.is_nan() {
                first = mean;
            }
            last = mean;
            let sps = step as f64 / t0.elapsed().as_secs_f64();
            println!("{name:<10} step {step:>5}/{steps}  {sps:>7.1} steps/s  loss {mean:.4}");
        }
    }
    let transfers = dev.host_transfer_count() - transfers0;
    let extra_transfers = if dev == Device::Cpu {
        0
    } else {
        transfers.saturating_sub(expected) + expected.saturating_sub(transfers)
    };
    Ok(Trained {
        first,
        last,
        extra_transfers,
    })
}

struct Args {
    backend: String,
    software: bool,
    steps: Option<usize>,
    smoke: bool,
    hiformer: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        backend: "cpu".into(),
        software: false,
        steps: None,
        smoke: false,
        hiformer: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => a.backend = it.next().ok_or("--backend needs a value")?,
            "--software" => a.software = true,
            "--smoke" => a.smoke = true,
            "--hiformer" => a.hiformer = true,
            "--steps" => {
                let v = it.next().ok_or("--steps needs a value")?;
                a.steps = Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &usize| n > 0)
                        .ok_or(format!("--steps {v}: not a positive integer"))?,
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn open(args: &Args) -> Result<Device> {
    let opts = WgpuOptions {
        allow_software: args.software,
    };
    match args.backend.as_str() {
        "cpu" => Ok(Device::cpu()),
        "wgpu" => Device::wgpu(&opts),
        "cuda" => Device::cuda(0),
        "auto" => {
            let (d, why) = Device::auto()?;
            println!("Device::auto(): {why}");
            Ok(d)
        }
        other => Err(Error::InvalidArgument {
            op: "train_ctr",
            arg: "--backend",
            reason: format!("`{other}` is not one of cpu, wgpu, cuda, auto"),
        }),
    }
}

fn run(args: &Args) -> Result<bool> {
    let dev = open(args)?;
    println!("device: {}", dev.describe());
    // Sizes: the full run fits in well under a minute on a 2-core CPU; the smoke run in
    // seconds (and in a minute or two on the emulated CUDA device).
    let (n_test, batch, default_steps) = if args.smoke {
        (2_000, 64, 40)
    } else {
        (100_000, 512, 4_000)
    };
    let steps = args.steps.unwrap_or(default_steps);
    let warm_steps = (steps * 3 / 8).max(1);
    let planted = Planted::new(7);
    let mut rng = StdRng::seed_from_u64(11);
    let test_set = planted.sample(n_test, &mut rng);
    let ctr = test_set.y.iter().sum::<f32>() / n_test as f32;
    // The Bayes-optimal log loss: what a perfect model's training loss approaches.
    let oracle_loss = test_set
        .p
        .iter()
        .zip(&test_set.y)
        .map(|(&p, &y)| if y > 0.5 { -p.ln() } else { -(1.0 - p).ln() })
        .sum::<f64>()
        / n_test as f64;
    println!(
        "data: {} fields (rows {CARDS:?}), planted pairs {PAIRS:?}, triples {TRIPLES:?}; \
         a fresh batch of {batch} per step, {n_test} test samples; CTR {ctr:.3}, oracle log loss \
         {oracle_loss:.4}",
        CARDS.len()
    );
    let t_start = Instant::now();

    // 1. FDO warm-up: the GDCN model at a uniform width. Small initial rows (the default
    //    ±√(1/rows) scaled by 0.1) so the PCA sees what training put there, not the init.
    let names: Vec<String> = (0..CARDS.len()).map(|f| format!("field{f}")).collect();
    let specs: Vec<TableSpec> = names
        .iter()
        .zip(CARDS)
        .map(|(n, rows)| TableSpec::new(n.clone(), rows, WARM_DIM))
        .collect();
    let mut warm_bags = EmbeddingBags::new(&specs, Pooling::Sum, DType::F32, 1, &dev)?;
    warm_bags.weights_mut().scale(0.1)?;
    let mut warm = Model::new(warm_bags, true, false, DENSE_LR, 2)?;
    let w = train(
        "fdo-warmup",
        &mut warm,
        &planted,
        warm_steps,
        batch,
        &mut rng,
    )?;

    // 2. FDO: PCA of every trained table picks its width.
    let tables: Vec<Tensor> = (0..CARDS.len())
        .map(|t| warm.bags.table(t))
        .collect::<Result<_>>()?;
    let pcas = fdo::analyse_all(&tables, FDO_RATIO)?;
    let widths: Vec<usize> = pcas.iter().map(|p| p.k).collect();
    println!(
        "FDO ({:.0} % variance): widths {widths:?} (warm-up {WARM_DIM} each: total {} → {})",
        FDO_RATIO * 100.0,
        WARM_DIM * CARDS.len(),
        widths.iter().sum::<usize>()
    );
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let table_refs: Vec<&Tensor> = tables.iter().collect();
    let fdo_bags = || EmbeddingBags::from_fdo(&name_refs, &table_refs, &pcas, Pooling::Sum);

    // 3. The real models from the FDO bags.
    let label = if args.hiformer { "gdcn+hifo" } else { "gdcn" };
    let mut gdcn = Model::new(fdo_bags()?, true, args.hiformer, DENSE_LR, 3)?;
    let g = train(label, &mut gdcn, &planted, steps, batch, &mut rng)?;
    let mut base = Model::new(fdo_bags()?, false, false, DENSE_LR, 4)?;
    let b = train("baseline", &mut base, &planted, steps, batch, &mut rng)?;
    let train_s = t_start.elapsed().as_secs_f64();

    // 4. Test AUC against the oracle on the same labels.
    let eval_batch = 4096.min(n_test);
    let g_logits = gdcn.predict(&test_set, eval_batch)?;
    let b_logits = base.predict(&test_set, eval_batch)?;
    let g_auc = auc(&g_logits, &test_set.y);
    let b_auc = auc(&b_logits, &test_set.y);
    let o_auc = auc(&test_set.p, &test_set.y);
    println!();
    println!("{:<34} | {:>8} | {:>10}", "model", "test AUC", "vs oracle");
    println!("{:-<34}-+-{:-<8}-+-{:-<10}", "", "", "");
    let cross_name = format!(
        "GDCN ({CROSS_LAYERS} layers{})",
        if args.hiformer { " + Hiformer" } else { "" }
    );
    for (name, a) in [
        (cross_name.as_str(), g_auc),
        ("baseline (no cross layer)", b_auc),
        ("Bayes oracle (true probabilities)", o_auc),
    ] {
        println!("{name:<34} | {a:>8.4} | {:>+10.4}", a - o_auc);
    }
    println!(
        "{} on {}: {steps} steps × batch {batch} per model ({warm_steps} warm-up); training \
         {train_s:.1} s, total {:.1} s",
        if args.smoke { "smoke run" } else { "full run" },
        dev.describe(),
        t_start.elapsed().as_secs_f64()
    );
    let extra = w.extra_transfers + g.extra_transfers + b.extra_transfers;
    if dev != Device::Cpu {
        println!(
            "host transfers in training beyond the batch uploads and the logged losses: {extra}"
        );
    }
    if extra != 0 {
        println!("FAILED: a training step copied data between the host and the device");
        return Ok(false);
    }
    let (g_first, g_last, b_first, b_last) = (g.first, g.last, b.first, b.last);
    let finite = [w.last, g_first, g_last, b_first, b_last]
        .iter()
        .all(|v| v.is_finite())
        && g_logits.iter().chain(&b_logits).all(|v| v.is_finite());
    if !finite {
        println!("FAILED: a loss or a test logit is not finite");
        return Ok(false);
    }
    if args.smoke {
        let fell = g_last < g_first && b_last < b_first;
        println!(
            "smoke: loss {g_first:.4} → {g_last:.4} (GDCN), {b_first:.4} → {b_last:.4} (baseline): {}",
            if fell { "fell, ok" } else { "did NOT fall" }
        );
        return Ok(fell);
    }
    let ok = o_auc - g_auc <= 0.01;
    println!(
        "GDCN AUC is {:.4} below the oracle: {}",
        o_auc - g_auc,
        if ok {
            "within 0.01, ok"
        } else {
            "NOT within 0.01"
        }
    );
    Ok(ok)
}

fn main() -> ExitCode {
    // Before any adapter is enumerated: silences Mesa's device_select layer on a headless box.
    recfuse::prepare_headless();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "{e}\nusage: train_ctr [--backend cpu|wgpu|cuda|auto] [--software] [--steps N] [--smoke] [--hiformer]"
            );
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            if args.backend == "wgpu" && !args.software {
                eprintln!(
                    "(pass --software to let wgpu use a software adapter such as Mesa lavapipe)"
                );
            }
            ExitCode::FAILURE
        }
    }
}
