//! A whole CTR training step — embedding bags forward → GDCN stack → linear head → BCE →
//! backward → Adam on the dense parameters + fused sparse row-wise Adagrad on the embedding
//! rows — on every backend:
//! * on a GPU backend it makes **no host transfer** except the explicitly read loss scalar
//!   (`Device::host_transfer_count` before and after each step; building the batch is the
//!   step's input upload and is counted separately);
//! * its numbers (the loss of every step, every parameter and embedding row after every step)
//!   match the same steps on the CPU backend;
//! * the first step's loss matches an f64 host evaluation of the model (pooling, the GDCN
//!   recurrence, the head, BCE) from the stored parameter values.

mod common;

use common::{assert_close_scaled, backends, rng};
use rand::Rng;
use recfuse::ops::bce::{bce_with_logits, Reduction};
use recfuse::ops::embedding::{BagBatch, EmbeddingBags, Pooling, TableSpec};
use recfuse::ops::gated_cross::{GatedCross, Init, PackedCross, SavePolicy};
use recfuse::ops::linear::{self, Linear, LinearParams};
use recfuse::ops::optim::{Adam, AdamConfig, RowwiseAdagradConfig};
use recfuse::params::{prefixed, Parameters};
use recfuse::{DType, Device, Result, Tensor};

/// Field widths as FDO would pick them (uneven), and cardinalities (one single-row table).
const SPECS: [(usize, usize); 4] = [(13, 3), (7, 2), (29, 4), (1, 1)];
const B: usize = 24;
const LAYERS: usize = 2;
const STEPS: usize = 3;
const LR: f32 = 0.01;

/// The dense parameters (and gradients): packed cross layers and the head.
struct Dense {
    cross: PackedCross,
    head: LinearParams,
}

impl Parameters for Dense {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = prefixed("cross", self.cross.named_tensors());
        v.extend(prefixed("head", self.head.named_tensors()));
        v
    }
    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = prefixed("cross", self.cross.named_tensors_mut());
        v.extend(prefixed("head", self.head.named_tensors_mut()));
        v
    }
    fn try_map(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let cross = self
            .cross
            .try_map(&mut |n, t| f(&format!("cross.{n}"), t))?;
        let head = self.head.try_map(&mut |n, t| f(&format!("head.{n}"), t))?;
        Ok(Dense { cross, head })
    }
}

struct Ctr {
    bags: EmbeddingBags,
    state: Tensor,
    adagrad: RowwiseAdagradConfig,
    net: GatedCross,
    dense: Dense,
    adam: Adam<Dense>,
}

impl Ctr {
    /// The same initial model on every device (every initialiser is seeded on the host).
    fn new(seed: u64, dev: &Device) -> Ctr {
        let specs: Vec<TableSpec> = SPECS
            .iter()
            .enumerate()
            .map(|(i, &(rows, dim))| TableSpec::new(format!("f{i}"), rows, dim))
            .collect();
        let bags = EmbeddingBags::new(&specs, Pooling::Sum, DType::F32, seed, dev).unwrap();
        let d = bags.output_dim();
        let net = GatedCross::new(d, LAYERS);
        let cross = net
            .pack(&net.init(Init::Gdcn, seed + 1, dev).unwrap(), dev)
            .unwrap();
        let head = LinearParams::init(d, 1, true, DType::F32, seed + 2, dev).unwrap();
        let dense = Dense { cross, head };
        // ε well above f32 round-off of the gradients: Adam's first step is then not a sign
        // function, so backends whose gradients differ in the last bit agree on the update.
        let cfg = AdamConfig {
            eps: 1e-4,
            ..AdamConfig::adam(LR)
        };
        let adam = Adam::new(&dense, cfg, false).unwrap();
        Ctr {
            state: bags.rowwise_adagrad_state().unwrap(),
            adagrad: RowwiseAdagradConfig {
                lr: 0.05,
                eps: 1e-4,
                weight_decay: 0.0,
            },
            bags,
            net,
            dense,
            adam,
        }
    }

    /// One training step; the loss stays on the device.
    fn step(&mut self, batch: &BagBatch, labels: &Tensor) -> Result<Tensor> {
        let emb = self.bags.forward(batch)?;
        let (y, saved) = self
            .net
            .forward(&emb, &self.dense.cross, SavePolicy::SaveAll)?;
        let h = &self.dense.head;
        let cfg = Linear::default();
        let logits = linear::forward(&y, &h.weight, h.bias.as_ref(), None, &cfg)?.y;
        let mut dlogits = Tensor::zeros(logits.shape(), DType::F32, &logits.device())?;
        let loss = bce_with_logits(&logits, labels, None, Reduction::Mean, Some(&mut dlogits))?;
        let gh = linear::backward(&y, &h.weight, None, &dlogits, &cfg, true)?;
        let (d_emb, g_cross) = self.net.backward(&self.dense.cross, &saved, &gh.dx)?;
        let grads = Dense {
            cross: g_cross,
            head: LinearParams {
                weight: gh.dw,
                bias: gh.db,
            },
        };
        self.adam.step(&mut self.dense, &grads)?;
        self.bags
            .update_rowwise_adagrad(batch, &d_emb, &self.adagrad, &mut self.state)?;
        Ok(loss)
    }

    /// Every parameter (dense, by name, then the flat embedding weights), downloaded.
    fn snapshot(&self) -> Vec<(String, Vec<f64>)> {
        let mut v: Vec<(String, Vec<f64>)> = self
            .dense
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_f64_vec().unwrap()))
            .collect();
        v.push((
            "embedding weights".into(),
            self.bags.weights().to_f64_vec().unwrap(),
        ));
        v.push(("adagrad state".into(), self.state.to_f64_vec().unwrap()));
        v
    }
}

/// A batch in FBGEMM layout: per (field, sample) bag 0–3 random rows (empty bags and repeated
/// rows included), and random 0/1 labels.
struct HostBatch {
    indices: Vec<i64>,
    offsets: Vec<i64>,
    labels: Vec<f32>,
}

fn host_batch(r: &mut impl Rng) -> HostBatch {
    let mut indices = Vec::new();
    let mut offsets = vec![0i64];
    for &(rows, _) in &SPECS {
        for _ in 0..B {
            for _ in 0..r.random_range(0..4usize) {
                indices.push(r.random_range(0..rows) as i64);
            }
            offsets.push(indices.len() as i64);
        }
    }
    let labels = (0..B)
        .map(|_| if r.random::<bool>() { 1.0 } else { 0.0 })
        .collect();
    HostBatch {
        indices,
        offsets,
        labels,
    }
}

/// The f64 loss of the model as stored: sum pooling, `C_{l+1} = C_0 ⊙ (C_l·W_cᵀ + b_c) ⊙
/// σ(C_l·W_gᵀ + b_g) + C_l` read off the packed layout (row 2j of `w` is W_c's row j, row
/// 2j+1 W_g's; `b` interleaved the same way), the head, mean BCE.
fn f64_loss(m: &Ctr, hb: &HostBatch) -> f64 {
    let d = m.bags.output_dim();
    let mut x0 = vec![0.0; B * d];
    let w = m.bags.weights().to_f64_vec().unwrap();
    let (mut elem, mut col) = (0usize, 0usize);
    for (t, &(rows, dim)) in SPECS.iter().enumerate() {
        for s in 0..B {
            let bag = t * B + s;
            for j in hb.offsets[bag]..hb.offsets[bag + 1] {
                let row = hb.indices[j as usize] as usize;
                for c in 0..dim {
                    x0[s * d + col + c] += w[elem + row * dim + c];
                }
            }
        }
        elem += rows * dim;
        col += dim;
    }
    let mut c = x0.clone();
    for pl in &m.dense.cross.layers {
        let (pw, pb) = (pl.w.to_f64_vec().unwrap(), pl.b.to_f64_vec().unwrap());
        let mut next = vec![0.0; B * d];
        for s in 0..B {
            let cr = &c[s * d..s * d + d];
            for j in 0..d {
                let dot = |row: usize| (0..d).map(|i| cr[i] * pw[row * d + i]).sum::<f64>();
                let u = dot(2 * j) + pb[2 * j];
                let v = dot(2 * j + 1) + pb[2 * j + 1];
                next[s * d + j] = x0[s * d + j] * u / (1.0 + (-v).exp()) + cr[j];
            }
        }
        c = next;
    }
    let hw = m.dense.head.weight.to_f64_vec().unwrap();
    let hbias = m.dense.head.bias.as_ref().unwrap().to_f64_vec().unwrap()[0];
    let mut loss = 0.0;
    for s in 0..B {
        let x = (0..d).map(|i| c[s * d + i] * hw[i]).sum::<f64>() + hbias;
        let y = f64::from(hb.labels[s]);
        loss += x.max(0.0) - x * y + (-x.abs()).exp().ln_1p();
    }
    loss / B as f64
}

#[test]
fn ctr_step_stays_on_device_and_matches_cpu() {
    let mut r = rng("train_step");
    let seed = r.random::<u32>() as u64;
    let batches: Vec<HostBatch> = (0..STEPS).map(|_| host_batch(&mut r)).collect();

    // The CPU run: the reference for the other backends, and checked against f64 itself.
    let cpu = Device::cpu();
    let mut reference = Ctr::new(seed, &cpu);
    let mut cpu_losses = Vec::new();
    let mut cpu_params = Vec::new();
    for (k, hb) in batches.iter().enumerate() {
        let want = (k == 0).then(|| f64_loss(&reference, hb));
        let batch = reference
            .bags
            .batch(&hb.indices, &hb.offsets, None)
            .unwrap();
        let labels = Tensor::from_slice(&hb.labels, &[B, 1], &cpu).unwrap();
        let loss = reference
            .step(&batch, &labels)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()[0];
        if let Some(want) = want {
            let err = (f64::from(loss) - want).abs() / want.abs();
            assert!(
                err < 1e-5,
                "cpu step 1 loss {loss} vs f64 {want}: relative error {err:.2e}"
            );
        }
        cpu_losses.push(loss);
        cpu_params.push(reference.snapshot());
    }
    // The model learns: repeated steps on the first batch lower its loss (a sign error in any
    // backward pass or update would raise it).
    {
        let mut m = Ctr::new(seed, &cpu);
        let hb = &batches[0];
        let batch = m.bags.batch(&hb.indices, &hb.offsets, None).unwrap();
        let labels = Tensor::from_slice(&hb.labels, &[B, 1], &cpu).unwrap();
        let l: Vec<f32> = (0..20)
            .map(|_| m.step(&batch, &labels).unwrap().to_vec::<f32>().unwrap()[0])
            .collect();
        assert!(l[19] < 0.9 * l[0], "loss on one batch did not fall: {l:?}");
    }

    let mut ran = Vec::new();
    for be in backends() {
        let dev = &be.device;
        let gpu = *dev != Device::Cpu;
        let mut m = Ctr::new(seed, dev);
        for (k, hb) in batches.iter().enumerate() {
            let what = format!("{} step {}", be.name, k + 1);
            let t0 = dev.host_transfer_count();
            let batch = m.bags.batch(&hb.indices, &hb.offsets, None).unwrap();
            let labels = Tensor::from_slice(&hb.labels, &[B, 1], dev).unwrap();
            let t1 = dev.host_transfer_count();
            let loss = m.step(&batch, &labels).unwrap();
            let t2 = dev.host_transfer_count();
            let loss = loss.to_vec::<f32>().unwrap()[0];
            let t3 = dev.host_transfer_count();
            if gpu {
                assert_eq!(
                    t1 - t0,
                    2,
                    "{what}: the input is two uploads (lookups, labels)"
                );
                assert_eq!(t2 - t1, 0, "{what}: the step itself made host transfers");
                assert_eq!(t3 - t2, 1, "{what}: reading the loss is one download");
            } else {
                assert_eq!(t3, t0, "{what}: the CPU backend counts no transfers");
            }
            let want = cpu_losses[k];
            assert!(
                (loss - want).abs() <= 1e-5 * want.abs(),
                "{what}: loss {loss} vs cpu {want}"
            );
            for ((name, got), (_, want)) in m.snapshot().iter().zip(&cpu_params[k]) {
                // f32 results of differently ordered sums; parameter updates are O(lr), so
                // their error is measured against at least lr.
                let floor = if name == "adagrad state" {
                    0.0
                } else {
                    f64::from(LR)
                };
                assert_close_scaled(&format!("{what} {name}"), got, want, 2e-5, floor);
            }
        }
        eprintln!(
            "[recfuse tests] train_step: {} ran {STEPS} steps{}",
            be.name,
            if gpu {
                " with no host transfer inside a step"
            } else {
                ""
            }
        );
        ran.push(be.name);
    }
    eprintln!("[recfuse tests] train_step ran on: {}", ran.join(", "));
}

/// The Hiformer layer (`train_ctr --hiformer`) trains on the device too: forward and backward
/// make no host transfer on a GPU backend, and match the CPU backend.
#[test]
fn hiformer_step_stays_on_device() {
    use recfuse::ops::hiformer::{HiformerLayer, LayerConfig};
    let mut r = rng("train_step hiformer");
    let (b, l, d) = (5, 4, 8);
    let layer = HiformerLayer {
        cfg: LayerConfig::new(l, d, 2, 4, 4, 16),
        rank_qk: 8,
        rank_v: 8,
    };
    let seed = r.random::<u32>() as u64;
    let x: Vec<f32> = (0..b * l * d).map(|_| r.random_range(-1.0..1.0)).collect();
    let dz: Vec<f32> = (0..b * l * d).map(|_| r.random_range(-1.0..1.0)).collect();
    let run = |dev: &Device| {
        let p = layer.init(seed, dev).unwrap();
        let xt = Tensor::from_slice(&x, &[b, l, d], dev).unwrap();
        let dzt = Tensor::from_slice(&dz, &[b, l, d], dev).unwrap();
        let t0 = dev.host_transfer_count();
        let (z, saved) = layer.forward(&xt, &p, None).unwrap();
        let (dx, g) = layer.backward(&p, &saved, &dzt).unwrap();
        let moved = dev.host_transfer_count() - t0;
        (
            moved,
            z.to_f64_vec().unwrap(),
            dx.to_f64_vec().unwrap(),
            g.w1.to_f64_vec().unwrap(),
        )
    };
    let want = run(&Device::cpu());
    let mut ran = Vec::new();
    for be in backends() {
        let got = run(&be.device);
        assert_eq!(
            got.0, 0,
            "{}: the Hiformer step made host transfers",
            be.name
        );
        assert_close_scaled(
            &format!("{} hiformer z", be.name),
            &got.1,
            &want.1,
            1e-4,
            0.0,
        );
        assert_close_scaled(
            &format!("{} hiformer dx", be.name),
            &got.2,
            &want.2,
            1e-4,
            0.0,
        );
        assert_close_scaled(
            &format!("{} hiformer dw1", be.name),
            &got.3,
            &want.3,
            1e-4,
            0.0,
        );
        ran.push(be.name);
    }
    eprintln!(
        "[recfuse tests] train_step hiformer ran on: {}",
        ran.join(", ")
    );
}
