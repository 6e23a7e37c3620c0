//! Checkpoints (safetensors, PyTorch names): bit-exact round trips on every backend, dtype
//! conversion against an independent rounding reference, strict-mode errors, IO and corrupt
//! files, optimizer and embedding-bag state that resumes training bit-identically, and the
//! PyTorch fixture (tests/fixtures/torch_checkpoint.safetensors, made by
//! scripts/make-checkpoint-fixture.py) loading into recfuse's layers with torch's outputs.

mod common;

use common::{assert_close, backends, rng, tolerance, uniform};
use half::{bf16, f16};
use rand::Rng;
use recfuse::checkpoint::{Checkpoint, FileDType, RestoreOptions};
use recfuse::error::ShapeMismatch;
use recfuse::ops::embedding::{EmbeddingBags, Pooling, TableSpec};
use recfuse::ops::gated_cross::{CrossMode, GatedCross, Init, SavePolicy};
use recfuse::ops::linear::{self, Linear, LinearParams};
use recfuse::ops::optim::{Adam, AdamConfig, OptimizerState, RowwiseAdagradConfig, Sgd, SgdConfig};
use recfuse::params::{prefixed, Parameters};
use recfuse::{DType, Device, Error, Tensor};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/torch_checkpoint.safetensors"
);

fn bits<P: Parameters + ?Sized>(p: &P) -> Vec<(String, Vec<u8>)> {
    p.named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_bytes().expect("download")))
        .collect()
}

fn temp_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "recfuse-ckpt-{}-{tag}-{:?}.safetensors",
        std::process::id(),
        std::thread::current().id()
    ))
}

/// A composite model: a GDCN stack, its low-rank and DCN-V2 variants and a head, each under a
/// prefix (as PyTorch names submodules).
struct Model {
    gdcn: Vec<recfuse::ops::gated_cross::CrossLayerWeights>,
    lowrank: Vec<recfuse::ops::gated_cross::CrossLayerWeights>,
    dcnv2: Vec<recfuse::ops::gated_cross::CrossLayerWeights>,
    head: LinearParams,
}

impl Model {
    fn new(dtype: DType, seed: u64, dev: &Device) -> Model {
        let mut g = GatedCross::new(5, 2);
        g.dtype = dtype;
        g.gate_bias = true;
        let mut lr = GatedCross::new(6, 1);
        lr.dtype = dtype;
        lr.rank = Some(3);
        let mut v2 = GatedCross::new(4, 2);
        v2.dtype = dtype;
        v2.mode = CrossMode::DcnV2;
        Model {
            gdcn: g.init(Init::Gdcn, seed, dev).unwrap(),
            lowrank: lr.init(Init::Gdcn, seed + 1, dev).unwrap(),
            dcnv2: v2.init(Init::DcnV2, seed + 2, dev).unwrap(),
            head: LinearParams::init(5, 3, true, dtype, seed + 3, dev).unwrap(),
        }
    }

    fn parts(&mut self) -> [(&'static str, &mut dyn Parameters); 4] {
        [
            ("cross", &mut self.gdcn),
            ("lowrank", &mut self.lowrank),
            ("dcnv2", &mut self.dcnv2),
            ("head", &mut self.head),
        ]
    }
}

impl Parameters for Model {
    fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = prefixed("cross", self.gdcn.named_tensors());
        v.extend(prefixed("lowrank", self.lowrank.named_tensors()));
        v.extend(prefixed("dcnv2", self.dcnv2.named_tensors()));
        v.extend(prefixed("head", self.head.named_tensors()));
        v
    }
    fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = prefixed("cross", self.gdcn.named_tensors_mut());
        v.extend(prefixed("lowrank", self.lowrank.named_tensors_mut()));
        v.extend(prefixed("dcnv2", self.dcnv2.named_tensors_mut()));
        v.extend(prefixed("head", self.head.named_tensors_mut()));
        v
    }
    fn try_map(
        &self,
        f: &mut dyn FnMut(&str, &Tensor) -> recfuse::Result<Tensor>,
    ) -> recfuse::Result<Self> {
        Ok(Model {
            gdcn: self.gdcn.try_map(&mut |n, t| f(&format!("cross.{n}"), t))?,
            lowrank: self
                .lowrank
                .try_map(&mut |n, t| f(&format!("lowrank.{n}"), t))?,
            dcnv2: self
                .dcnv2
                .try_map(&mut |n, t| f(&format!("dcnv2.{n}"), t))?,
            head: self.head.try_map(&mut |n, t| f(&format!("head.{n}"), t))?,
        })
    }
}

#[test]
fn round_trip_is_bit_exact_on_every_backend() {
    for be in backends() {
        for dtype in DType::ALL {
            let dev = &be.device;
            let mut saved = Model::new(dtype, 11, dev);
            let mut ckpt = Checkpoint::new();
            for (prefix, part) in saved.parts() {
                ckpt.add(prefix, &*part).unwrap();
            }
            // PyTorch names under the prefixes.
            for key in [
                "cross.w.0.weight",
                "cross.b.1",
                "cross.wg.1.weight",
                "cross.bg.0",
                "lowrank.w.0.u",
                "lowrank.wg.0.v",
                "dcnv2.kernels.1",
                "dcnv2.bias.0",
                "head.weight",
                "head.bias",
            ] {
                assert!(ckpt.contains(key), "{}: {key} missing", be.name);
            }
            assert_eq!(ckpt.len(), saved.named_tensors().len());
            let want = bits(&saved);

            // Through memory and through a file: both give the same bits back.
            let bytes = ckpt.to_bytes().unwrap();
            let path = temp_path(&format!("{}-{dtype}", be.name));
            ckpt.save(&path).unwrap();
            let from_file = Checkpoint::load(&path).unwrap();
            std::fs::remove_file(&path).ok();
            assert_eq!(
                from_file.to_bytes().unwrap(),
                bytes,
                "file and memory differ"
            );

            for (how, c) in [
                ("bytes", Checkpoint::from_bytes(&bytes).unwrap()),
                ("file", from_file),
            ] {
                // Restored part by part (each strict in its own scope) into other weights.
                let mut other = Model::new(dtype, 99, dev);
                assert_ne!(bits(&other), want, "the fresh model must differ");
                let n = other.named_tensors().len() as u64;
                let before = dev.host_transfer_count();
                for (prefix, part) in other.parts() {
                    let r = c.restore(prefix, part).unwrap();
                    assert!(r.missing.is_empty() && r.unexpected.is_empty());
                }
                let copies = dev.host_transfer_count() - before;
                if be.name != "cpu" {
                    // One host→device write per tensor, nothing else (no reallocation, no
                    // readback).
                    assert_eq!(copies, n, "{}: {copies} transfers for {n} tensors", be.name);
                }
                assert_eq!(bits(&other), want, "{} {dtype} via {how}", be.name);

                // The whole composite model at once, no prefix.
                let mut whole = Model::new(dtype, 7, dev);
                c.restore("", &mut whole).unwrap();
                assert_eq!(bits(&whole), want);
            }
        }
        eprintln!(
            "[checkpoint] round trip bit-exact on {} (f32, bf16, f16)",
            be.name
        );
    }
}

// ---------------------------------------------------------------------------------------
// dtype conversion against an independent reference

/// x rounded to nearest, ties to even, into a binary format with `p` significand bits,
/// minimum normal exponent `emin` and largest finite `max`: by scaling to an integer
/// significand in f64 (exact: powers of two) and rounding that integer, with IEEE overflow
/// (|x| at or past the midpoint between `max` and the next power step goes to ∞).
fn round_ref(x: f64, p: i32, emin: i32, max: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let e = (((x.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023).max(emin);
    let ulp = 2f64.powi(e - (p - 1));
    let r = (x / ulp).round_ties_even() * ulp;
    let overflow = max + 2f64.powi(((max.to_bits() >> 52) & 0x7ff) as i32 - 1023 - p);
    if r.abs() >= overflow || r.abs() > max {
        return f64::INFINITY.copysign(x);
    }
    if r == 0.0 {
        return 0.0f64.copysign(x);
    }
    r
}

fn reference(x: f64, d: DType) -> f64 {
    match d {
        DType::F32 => round_ref(x, 24, -126, f32::MAX as f64),
        DType::BF16 => round_ref(x, 8, -126, bf16::MAX.to_f64()),
        DType::F16 => round_ref(x, 11, -14, 65504.0),
    }
}

/// f64 test values: random magnitudes over each format's range (normal and subnormal), exact
/// ties, the double-rounding traps (a 16-bit tie plus a hair that an f32 step would lose),
/// overflow edges and specials.
fn f64_values(r: &mut impl Rng) -> Vec<f64> {
    let mut v = vec![
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e300,
        -1e300,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        f32::MAX as f64 * (1.0 + 2f64.powi(-25)),
        f32::MAX as f64 * (1.0 + 2f64.powi(-23)),
        2f64.powi(-149) * 0.5,
        2f64.powi(-149) * 0.75,
        2f64.powi(-133) * 0.5,
        2f64.powi(-25),
        2f64.powi(-24) * 1.5,
        5e-324,
    ];
    for _ in 0..400 {
        let m: f64 = r.random_range(1.0..2.0);
        let e = r.random_range(-150..130);
        let s = if r.random() { 1.0 } else { -1.0 };
        v.push(s * m * 2f64.powi(e));
    }
    // Ties and near-ties of every 16-bit format, at assorted exponents: a representable
    // value, plus half an ulp, plus or minus a hair below f32's resolution.
    for (p, lo, hi) in [(8, -125, 127), (11, -14, 15)] {
        for _ in 0..100 {
            let e = r.random_range(lo..hi);
            let ulp = 2f64.powi(e - (p - 1));
            let k: u32 = r.random_range(1u32 << (p - 1)..1u32 << p);
            let base = f64::from(k) * ulp;
            let hair = ulp * 2f64.powi(-30);
            v.extend([
                base + ulp / 2.0,
                base + ulp / 2.0 + hair,
                base + ulp / 2.0 - hair,
            ]);
            v.extend([-(base + ulp / 2.0 + hair)]);
        }
    }
    v.push(f64::NAN);
    v
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::F32 => t
            .to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::BF16 => t
            .to_vec::<bf16>()
            .unwrap()
            .into_iter()
            .map(|b| f64::from(f32::from_bits(u32::from(b.to_bits()) << 16)))
            .collect(),
        DType::F16 => t
            .to_vec::<f16>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
    }
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a == b && a.is_sign_negative() == b.is_sign_negative())
}

#[test]
fn dtype_conversion_rounds_once_to_nearest_even() {
    let mut r = rng("checkpoint dtype conversion");
    let xs = f64_values(&mut r);
    let n = xs.len();
    for be in backends() {
        let dev = &be.device;
        let mut ckpt = Checkpoint::new();
        ckpt.insert_f64("src.f64", &[n], &xs).unwrap();
        // 16- and 32-bit sources: random bit patterns (every exponent, ties included) plus
        // the f64 values' own roundings.
        let f32s: Vec<f32> = (0..n)
            .map(|i| match i % 3 {
                0 => f32::from_bits(r.random::<u32>() & 0xbfff_ffff), // finite, any exponent < 2
                1 => f32::from_bits((r.random::<u32>() & 0xffff_0000) | 0x8000), // a bf16 tie
                _ => xs[i] as f32,
            })
            .collect();
        let bf16s: Vec<bf16> = (0..n).map(|_| bf16::from_bits(r.random())).collect();
        let f16s: Vec<f16> = (0..n).map(|_| f16::from_bits(r.random())).collect();
        ckpt.insert("src.f32", &Tensor::from_slice(&f32s, &[n], dev).unwrap())
            .unwrap();
        ckpt.insert("src.bf16", &Tensor::from_slice(&bf16s, &[n], dev).unwrap())
            .unwrap();
        ckpt.insert("src.f16", &Tensor::from_slice(&f16s, &[n], dev).unwrap())
            .unwrap();
        let ckpt = Checkpoint::from_bytes(&ckpt.to_bytes().unwrap()).unwrap();
        assert_eq!(ckpt.dtype("src.f64"), Some(FileDType::F64));
        assert_eq!(ckpt.dtype("src.bf16"), Some(FileDType::BF16));
        let exact: [(&str, Vec<f64>); 4] = [
            ("f64", xs.clone()),
            ("f32", f32s.iter().map(|&x| f64::from(x)).collect()),
            (
                "bf16",
                bf16s
                    .iter()
                    .map(|b| f64::from(f32::from_bits(u32::from(b.to_bits()) << 16)))
                    .collect(),
            ),
            ("f16", f16s.iter().map(|&h| f64::from(h)).collect()),
        ];
        for (src, vals) in &exact {
            assert!(
                ckpt.to_f64_vec(&format!("src.{src}"))
                    .unwrap()
                    .iter()
                    .zip(vals)
                    .all(|(a, b)| same(*a, *b)),
                "to_f64_vec widens {src} exactly"
            );
            for dst in DType::ALL {
                let mut p = vec![(src.to_string(), Tensor::zeros(&[n], dst, dev).unwrap())];
                ckpt.restore_with("src", &mut p, &RestoreOptions::non_strict())
                    .unwrap();
                let got = as_f64(&p[0].1);
                for (i, (&g, &x)) in got.iter().zip(vals).enumerate() {
                    let want = reference(x, dst);
                    assert!(
                        same(g, want),
                        "{}: {src} → {dst}: element {i}: {x:e} became {g:e}, correctly rounded is {want:e}",
                        be.name
                    );
                }
                // Same dtype: bit for bit (NaN payloads included).
                if *src == dst.name() {
                    let orig = ckpt.tensor(&format!("src.{src}"), dst, dev).unwrap();
                    assert_eq!(p[0].1.to_bytes().unwrap(), orig.to_bytes().unwrap());
                }
            }
        }
        eprintln!(
            "[checkpoint] dtype conversion ({n} values × 4 sources × 3 targets) on {}",
            be.name
        );
    }
}

// ---------------------------------------------------------------------------------------
// strict mode, IO, corrupt files

#[test]
fn strict_mode_mismatches_are_typed_errors_and_write_nothing() {
    let dev = Device::cpu();
    let src = LinearParams::init(8, 5, true, DType::F32, 1, &dev).unwrap();
    let mut ckpt = Checkpoint::new();
    ckpt.add("head", &src).unwrap();
    assert!(matches!(
        ckpt.add("head", &src),
        Err(Error::InvalidArgument { arg: "params", .. })
    ));

    // Missing: the checkpoint lacks the bias.
    let mut no_bias = ckpt.clone();
    assert!(no_bias.remove("head.bias"));
    let mut dst = LinearParams::init(8, 5, true, DType::F32, 2, &dev).unwrap();
    let before = bits(&dst);
    match no_bias.restore("head", &mut dst) {
        Err(Error::CheckpointMismatch {
            missing,
            unexpected,
            shapes,
            arg,
            ..
        }) => {
            assert_eq!(missing, ["head.bias"]);
            assert!(unexpected.is_empty() && shapes.is_empty());
            assert_eq!(arg, "params");
        }
        other => panic!("expected a missing-key error, got {other:?}"),
    }
    assert_eq!(bits(&dst), before, "a failed restore wrote something");
    // Non-strict: the weight is restored, the bias kept and reported.
    let rep = no_bias
        .restore_with("head", &mut dst, &RestoreOptions::non_strict())
        .unwrap();
    assert_eq!(rep.missing, ["head.bias"]);
    assert_eq!(rep.restored, ["head.weight"]);
    assert_eq!(
        dst.weight.to_bytes().unwrap(),
        src.weight.to_bytes().unwrap()
    );
    assert_eq!(dst.bias.as_ref().unwrap().to_bytes().unwrap(), before[1].1);

    // Unexpected: an extra key in the restored scope (one outside it is not).
    let mut extra = ckpt.clone();
    extra.insert_f64("head.scale", &[1], &[2.0]).unwrap();
    extra.insert_f64("other.thing", &[1], &[2.0]).unwrap();
    let mut dst = LinearParams::init(8, 5, true, DType::F32, 3, &dev).unwrap();
    let err = extra.restore("head", &mut dst).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::CheckpointMismatch {
            missing,
            unexpected,
            ..
        } => {
            assert!(missing.is_empty());
            assert_eq!(unexpected, ["head.scale"]);
        }
        other => panic!("expected an unexpected-key error, got {other:?}"),
    }
    assert!(
        msg.contains("`params`") && msg.contains("head.scale"),
        "{msg}"
    );
    let rep = extra
        .restore_with("head", &mut dst, &RestoreOptions::non_strict())
        .unwrap();
    assert_eq!(rep.unexpected, ["head.scale"]);
    assert_eq!(bits(&dst), bits(&src));
    // With no prefix every key outside `optim.` is in scope.
    let mut whole = vec![(
        "head.weight".to_string(),
        Tensor::zeros(&[5, 8], DType::F32, &dev).unwrap(),
    )];
    match extra.restore("", &mut whole) {
        Err(Error::CheckpointMismatch { unexpected, .. }) => {
            assert_eq!(unexpected, ["head.bias", "head.scale", "other.thing"])
        }
        other => panic!("{other:?}"),
    }

    // Shape mismatch: always an error, strict or not, naming both shapes.
    let mut narrow = LinearParams::init(7, 5, true, DType::F32, 4, &dev).unwrap();
    let before = bits(&narrow);
    for opts in [RestoreOptions::default(), RestoreOptions::non_strict()] {
        match ckpt.restore_with("head", &mut narrow, &opts) {
            Err(Error::CheckpointMismatch { shapes, .. }) => assert_eq!(
                shapes,
                [ShapeMismatch {
                    name: "head.weight".into(),
                    expected: vec![5, 7],
                    found: vec![5, 8]
                }]
            ),
            other => panic!("expected a shape error, got {other:?}"),
        }
    }
    assert_eq!(bits(&narrow), before);

    // An integer tensor where a parameter is wanted.
    let mut ints = Checkpoint::new();
    ints.insert_i64("w", &[2], &[1, 2]).unwrap();
    let mut p = vec![(
        "w".to_string(),
        Tensor::zeros(&[2], DType::F32, &dev).unwrap(),
    )];
    assert!(matches!(
        ints.restore("", &mut p),
        Err(Error::Malformed {
            arg: "checkpoint",
            ..
        })
    ));
    // Data that does not fill its shape.
    assert!(matches!(
        ints.insert_f64("x", &[3], &[1.0]),
        Err(Error::Shape { arg: "data", .. })
    ));

    // An Adam checkpoint restored into SGD with momentum: unexpected moments, missing buffer.
    let mut opt = Adam::new(&src, AdamConfig::adam(0.1), false).unwrap();
    opt.set_steps(3);
    let mut oc = Checkpoint::new();
    oc.add_optimizer("head", &opt).unwrap();
    assert!(oc.contains("optim.step.head") && oc.contains("optim.exp_avg.head.weight"));
    let mut sgd = Sgd::new(
        &src,
        SgdConfig {
            momentum: 0.9,
            ..SgdConfig::new(0.1)
        },
        false,
    )
    .unwrap();
    match oc.restore_optimizer("head", &mut sgd) {
        Err(Error::CheckpointMismatch {
            missing,
            unexpected,
            ..
        }) => {
            assert_eq!(
                missing,
                [
                    "optim.momentum_buffer.head.weight",
                    "optim.momentum_buffer.head.bias"
                ]
            );
            assert_eq!(unexpected.len(), 4, "{unexpected:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sgd.steps(), 0, "a failed restore set the step");
}

#[test]
fn io_errors_name_the_path() {
    let missing = std::env::temp_dir().join("recfuse-no-such-dir/ckpt.safetensors");
    match Checkpoint::load(&missing) {
        Err(e @ Error::Io { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("`path`") && msg.contains("recfuse-no-such-dir"),
                "{msg}"
            );
            let Error::Io { path, source, .. } = e else {
                unreachable!()
            };
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an IO error, got {other:?}"),
    }
    let mut c = Checkpoint::new();
    c.insert_f64("x", &[1], &[1.0]).unwrap();
    assert!(matches!(
        c.save(&missing),
        Err(Error::Io { arg: "path", .. })
    ));
    // A directory is not a checkpoint file.
    assert!(matches!(
        Checkpoint::load(std::env::temp_dir()),
        Err(Error::Io { .. })
    ));
}

#[test]
fn corrupt_files_are_errors_not_panics() {
    let mut r = rng("checkpoint corruption");
    let dev = Device::cpu();
    let mut c = Checkpoint::new();
    c.add(
        "m",
        &LinearParams::init(4, 3, true, DType::BF16, 5, &dev).unwrap(),
    )
    .unwrap();
    c.insert_f64("y", &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let good = c.to_bytes().unwrap();
    assert!(Checkpoint::from_bytes(&good).is_ok());
    // Every truncation fails.
    for len in 0..good.len() {
        assert!(
            matches!(
                Checkpoint::from_bytes(&good[..len]),
                Err(Error::Malformed { arg: "bytes", .. })
            ),
            "a file truncated to {len} bytes parsed"
        );
    }
    // Garbage, an absurd header length, and random byte flips: never a panic.
    assert!(Checkpoint::from_bytes(&[0xff; 64]).is_err());
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(Checkpoint::from_bytes(&huge).is_err());
    let mut parsed = 0;
    for _ in 0..2000 {
        let mut b = good.clone();
        for _ in 0..r.random_range(1..4) {
            let i = r.random_range(0..b.len());
            b[i] = r.random();
        }
        if let Ok(c) = Checkpoint::from_bytes(&b) {
            parsed += 1;
            // Whatever parsed must restore or fail cleanly too.
            let mut p = LinearParams::init(4, 3, true, DType::F32, 6, &dev).unwrap();
            let _ = c.restore_with("m", &mut p, &RestoreOptions::non_strict());
        }
    }
    // And a file on disk.
    let path = temp_path("corrupt");
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert!(matches!(
        Checkpoint::load(&path),
        Err(Error::Malformed { arg: "path", .. })
    ));
    std::fs::remove_file(&path).ok();
    eprintln!("[checkpoint] corruption: {parsed}/2000 random flips still parsed (data bytes), none panicked");
}

// ---------------------------------------------------------------------------------------
// resuming training bit-identically

/// The gradient of step `s`: a fixed function of (seed, s), so two runs see the same ones.
fn grads_at<P: Parameters>(p: &P, seed: u64, s: u64) -> P {
    use rand::SeedableRng;
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ (s * 0x9e37_79b9));
    p.try_map(&mut |_, t| {
        Tensor::from_f32(
            &uniform(&mut r, t.numel(), 1.0),
            t.shape(),
            DType::F32,
            &t.device(),
        )
    })
    .unwrap()
}

fn resume_check<O, P, F>(
    be: &str,
    make_params: impl Fn(u64) -> P,
    make_opt: F,
    step: fn(&mut O, &mut P, &P),
) where
    O: OptimizerState,
    P: Parameters,
    F: Fn(&P) -> O,
{
    let (n, m, seed) = (3u64, 4u64, 77u64);
    // Uninterrupted: n + m steps.
    let mut pa = make_params(1);
    let mut oa = make_opt(&pa);
    for s in 0..n + m {
        let g = grads_at(&pa, seed, s);
        step(&mut oa, &mut pa, &g);
    }
    // Interrupted after n: save, restore into fresh objects, m more.
    let mut pb = make_params(1);
    let mut ob = make_opt(&pb);
    for s in 0..n {
        let g = grads_at(&pb, seed, s);
        step(&mut ob, &mut pb, &g);
    }
    let mut ckpt = Checkpoint::new();
    ckpt.add("model", &pb).unwrap();
    ckpt.add_optimizer("model", &ob).unwrap();
    let ckpt = Checkpoint::from_bytes(&ckpt.to_bytes().unwrap()).unwrap();
    drop((pb, ob));
    let mut pc = make_params(2); // other weights: the restore must set every one
    let mut oc = make_opt(&pc); // step 0, zero state
    ckpt.restore("model", &mut pc).unwrap();
    let rep = ckpt.restore_optimizer("model", &mut oc).unwrap();
    assert!(rep.restored.contains(&"optim.step.model".to_string()));
    assert_eq!(oc.steps(), n);
    for s in n..n + m {
        let g = grads_at(&pc, seed, s);
        step(&mut oc, &mut pc, &g);
    }
    assert_eq!(
        bits(&pc),
        bits(&pa),
        "{be}: parameters after resuming differ"
    );
    let state = |o: &O| -> Vec<Vec<u8>> {
        o.state_tensors()
            .iter()
            .map(|(_, _, t)| t.to_bytes().unwrap())
            .collect()
    };
    assert_eq!(
        state(&oc),
        state(&oa),
        "{be}: optimizer state after resuming differs"
    );
    assert_eq!(oc.steps(), oa.steps());
}

#[test]
fn optimizers_resume_bit_identically() {
    for be in backends() {
        let dev = be.device.clone();
        // Adam with bf16 parameters and f32 masters, over a composite model.
        let d = dev.clone();
        resume_check(
            be.name,
            move |seed| Model::new(DType::BF16, seed, &d),
            |p| {
                Adam::new(
                    p,
                    AdamConfig {
                        weight_decay: 0.01,
                        ..AdamConfig::adamw(0.05)
                    },
                    true,
                )
                .unwrap()
            },
            |o, p, g| o.step(p, g).unwrap(),
        );
        // AdamW on f32 without masters.
        let d = dev.clone();
        resume_check(
            be.name,
            move |seed| LinearParams::init(6, 4, true, DType::F32, seed, &d).unwrap(),
            |p| Adam::new(p, AdamConfig::adamw(0.01), false).unwrap(),
            |o, p, g| o.step(p, g).unwrap(),
        );
        // SGD with Nesterov momentum (its first step is special: the step count matters).
        let d = dev.clone();
        resume_check(
            be.name,
            move |seed| Model::new(DType::F16, seed, &d),
            |p| {
                let cfg = SgdConfig {
                    momentum: 0.9,
                    nesterov: true,
                    weight_decay: 1e-3,
                    ..SgdConfig::new(0.05)
                };
                Sgd::new(p, cfg, true).unwrap()
            },
            |o, p, g| o.step(p, g).unwrap(),
        );
        eprintln!(
            "[checkpoint] Adam / AdamW / SGD resume bit-identically on {}",
            be.name
        );
    }
}

fn bag_batches(
    r: &mut impl Rng,
    specs: &[TableSpec],
    b: usize,
    steps: usize,
) -> Vec<(Vec<i64>, Vec<i64>, Vec<f32>)> {
    let width: usize = specs.iter().map(|s| s.dim).sum();
    (0..steps)
        .map(|_| {
            let (mut idx, mut off) = (Vec::new(), vec![0i64]);
            for s in specs {
                for _ in 0..b {
                    for _ in 0..r.random_range(0..4) {
                        idx.push(r.random_range(0..s.rows as i64));
                    }
                    off.push(idx.len() as i64);
                }
            }
            (idx, off, uniform(r, b * width, 1.0))
        })
        .collect()
}

#[test]
fn embedding_bags_and_rowwise_adagrad_resume_bit_identically() {
    let mut r = rng("checkpoint embedding bags");
    let specs = [
        TableSpec::new("user", 9, 3),
        TableSpec::new("item", 5, 4),
        TableSpec::new("ad", 7, 1),
    ];
    let b = 4;
    let (n, m) = (3, 3);
    let batches = bag_batches(&mut r, &specs, b, n + m);
    let cfg = RowwiseAdagradConfig {
        lr: 0.1,
        eps: 1e-6,
        weight_decay: 0.01,
    };
    for be in backends() {
        let dev = &be.device;
        for dtype in [DType::F32, DType::BF16] {
            let run =
                |bags: &mut EmbeddingBags, state: &mut Tensor, range: std::ops::Range<usize>| {
                    for (idx, off, dy) in &batches[range] {
                        let batch = bags.batch(idx, off, None).unwrap();
                        let dy = Tensor::from_f32(dy, &[b, bags.output_dim()], dtype, dev).unwrap();
                        bags.update_rowwise_adagrad(&batch, &dy, &cfg, state)
                            .unwrap();
                    }
                };
            let mut ba = EmbeddingBags::new(&specs, Pooling::Sum, dtype, 1, dev).unwrap();
            let mut sa = ba.rowwise_adagrad_state().unwrap();
            run(&mut ba, &mut sa, 0..n + m);

            let mut bb = EmbeddingBags::new(&specs, Pooling::Sum, dtype, 1, dev).unwrap();
            let mut sb = bb.rowwise_adagrad_state().unwrap();
            run(&mut bb, &mut sb, 0..n);
            let mut ckpt = Checkpoint::new();
            ckpt.add_embedding_bags("sparse", &bb, Some(&sb)).unwrap();
            assert_eq!(
                ckpt.shape("sparse.embedding_bags.item.weight"),
                Some(&[5, 4][..])
            );
            assert_eq!(
                ckpt.shape("optim.momentum1.sparse.embedding_bags.ad.weight"),
                Some(&[7][..])
            );
            // Each table as its own tensor, equal to table(t).
            for (t, spec) in specs.iter().enumerate() {
                let key = format!("sparse.{}", spec.checkpoint_key());
                let saved = ckpt.tensor(&key, dtype, dev).unwrap();
                assert_eq!(
                    saved.to_bytes().unwrap(),
                    bb.table(t).unwrap().to_bytes().unwrap()
                );
            }
            let ckpt = Checkpoint::from_bytes(&ckpt.to_bytes().unwrap()).unwrap();

            let mut bc = EmbeddingBags::new(&specs, Pooling::Sum, dtype, 2, dev).unwrap();
            let mut sc = bc.rowwise_adagrad_state().unwrap();
            let before = dev.host_transfer_count();
            ckpt.restore_embedding_bags("sparse", &mut bc, Some(&mut sc))
                .unwrap();
            if be.name != "cpu" {
                assert_eq!(
                    dev.host_transfer_count() - before,
                    2,
                    "one write for the tables, one for the state"
                );
            }
            run(&mut bc, &mut sc, n..n + m);
            assert_eq!(
                bc.weights().to_bytes().unwrap(),
                ba.weights().to_bytes().unwrap(),
                "{} {dtype}: tables",
                be.name
            );
            assert_eq!(
                sc.to_bytes().unwrap(),
                sa.to_bytes().unwrap(),
                "{} {dtype}: Adagrad state",
                be.name
            );

            // Strict scope: a missing table is named; without a state the momentum1 rows are
            // ignored; non-strict keeps the absent table.
            let mut partial = ckpt.clone();
            partial.remove("sparse.embedding_bags.item.weight");
            let mut bd = EmbeddingBags::new(&specs, Pooling::Sum, dtype, 3, dev).unwrap();
            let item_before = bd.table(1).unwrap().to_bytes().unwrap();
            match partial.restore_embedding_bags("sparse", &mut bd, None) {
                Err(Error::CheckpointMismatch { missing, .. }) => {
                    assert_eq!(missing, ["sparse.embedding_bags.item.weight"])
                }
                other => panic!("{other:?}"),
            }
            let rep = partial
                .restore_embedding_bags_with("sparse", &mut bd, None, &RestoreOptions::non_strict())
                .unwrap();
            assert_eq!(rep.restored.len(), 2);
            assert_eq!(bd.table(1).unwrap().to_bytes().unwrap(), item_before);
            assert_eq!(
                bd.table(0).unwrap().to_bytes().unwrap(),
                bb.table(0).unwrap().to_bytes().unwrap()
            );
        }
        eprintln!(
            "[checkpoint] embedding bags + row-wise Adagrad resume bit-identically on {}",
            be.name
        );
    }
}

// ---------------------------------------------------------------------------------------
// PyTorch interop

fn fixture() -> Checkpoint {
    Checkpoint::load(FIXTURE)
        .expect("tests/fixtures/torch_checkpoint.safetensors (scripts/make-checkpoint-fixture.py)")
}

fn fixture_tables() -> [TableSpec; 2] {
    [TableSpec::new("user", 6, 4), TableSpec::new("item", 5, 3)]
}

/// recfuse's outputs for the fixture's three modules, from whatever weights `ckpt` holds.
fn forward_all(ckpt: &Checkpoint, dev: &Device) -> [(Vec<f64>, &'static str, usize); 3] {
    // nn.Linear(8, 5)
    let mut lin = LinearParams::init(8, 5, true, DType::F32, 0, dev).unwrap();
    ckpt.restore("linear", &mut lin).unwrap();
    let x = ckpt.tensor("inputs.linear_x", DType::F32, dev).unwrap();
    let y_lin = linear::forward(&x, &lin.weight, lin.bias.as_ref(), None, &Linear::default())
        .unwrap()
        .y;
    // The official GDCN layer: w.{i}.weight, wg.{i}.weight, b.{i}.
    let net = GatedCross::new(6, 2);
    let mut w = net.init(Init::Gdcn, 0, dev).unwrap();
    ckpt.restore("gdcn", &mut w).unwrap();
    let x0 = ckpt.tensor("inputs.gdcn_x", DType::F32, dev).unwrap();
    let (y_gdcn, _) = net
        .forward(&x0, &net.pack(&w, dev).unwrap(), SavePolicy::SaveAll)
        .unwrap();
    // TorchRec's EmbeddingBagCollection names.
    let mut bags = EmbeddingBags::new(&fixture_tables(), Pooling::Sum, DType::F32, 0, dev).unwrap();
    ckpt.restore_embedding_bags("ebc", &mut bags, None).unwrap();
    let idx = ckpt.to_i64_vec("inputs.ebc_indices").unwrap();
    let off = ckpt.to_i64_vec("inputs.ebc_offsets").unwrap();
    let y_ebc = bags
        .forward(&bags.batch(&idx, &off, None).unwrap())
        .unwrap();
    [
        (y_lin.to_f64_vec().unwrap(), "linear_y", 8),
        (y_gdcn.to_f64_vec().unwrap(), "gdcn_y", 12),
        (y_ebc.to_f64_vec().unwrap(), "ebc_y", 4),
    ]
}

#[test]
fn pytorch_fixture_loads_and_reproduces_torch_outputs() {
    let ckpt = fixture();
    assert_eq!(ckpt.dtype("gdcn.w.0.weight"), Some(FileDType::F32));
    assert_eq!(ckpt.dtype("outputs.gdcn_y"), Some(FileDType::F64));
    assert_eq!(ckpt.dtype("inputs.ebc_indices"), Some(FileDType::I64));
    for be in backends() {
        for (got, name, k) in forward_all(&ckpt, &be.device) {
            let want = ckpt.to_f64_vec(&format!("outputs.{name}")).unwrap();
            assert_close(
                &format!("{}: {name} vs torch (f64)", be.name),
                &got,
                &want,
                tolerance(DType::F32, k),
            );
        }
        eprintln!("[checkpoint] PyTorch fixture (nn.Linear, official GDCN, EmbeddingBagCollection) reproduced on {}", be.name);
    }
}

/// Writes a recfuse checkpoint for the PyTorch side to check (scripts/make-checkpoint-fixture.py
/// --verify) when `RECFUSE_CHECKPOINT_OUT` names a path; always checks its names.
#[test]
fn recfuse_writes_a_checkpoint_pytorch_loads() {
    let dev = Device::cpu();
    let mut r = rng("checkpoint for pytorch");
    let lin = LinearParams::init(8, 5, true, DType::F32, r.random(), &dev).unwrap();
    let net = GatedCross::new(6, 2);
    let w = net.init(Init::Gdcn, r.random(), &dev).unwrap();
    let bags = EmbeddingBags::new(
        &fixture_tables(),
        Pooling::Sum,
        DType::F32,
        r.random(),
        &dev,
    )
    .unwrap();
    let mut ckpt = Checkpoint::new();
    ckpt.add("linear", &lin).unwrap();
    ckpt.add("gdcn", &w).unwrap();
    ckpt.add_embedding_bags("ebc", &bags, Some(&bags.rowwise_adagrad_state().unwrap()))
        .unwrap();
    ckpt.add_optimizer(
        "linear",
        &Adam::new(&lin, AdamConfig::adam(0.1), false).unwrap(),
    )
    .unwrap();
    ckpt.set_metadata("table_order", "user,item");
    // The inputs the fixture uses, fresh values.
    let tor = fixture();
    let (b, x_lin, x_gdcn) = (4, uniform(&mut r, 32, 1.0), uniform(&mut r, 24, 1.0));
    ckpt.insert(
        "inputs.linear_x",
        &Tensor::from_slice(&x_lin, &[b, 8], &dev).unwrap(),
    )
    .unwrap();
    ckpt.insert(
        "inputs.gdcn_x",
        &Tensor::from_slice(&x_gdcn, &[b, 6], &dev).unwrap(),
    )
    .unwrap();
    for k in ["inputs.ebc_indices", "inputs.ebc_offsets"] {
        let v = tor.to_i64_vec(k).unwrap();
        ckpt.insert_i64(k, &[v.len()], &v).unwrap();
    }
    for (y, name, _) in forward_all(&ckpt, &dev) {
        let shape = tor.shape(&format!("outputs.{name}")).unwrap().to_vec();
        ckpt.insert_f64(format!("outputs.{name}"), &shape, &y)
            .unwrap();
    }
    // Exactly the state_dict keys torch's modules have (the fixture's), plus optimizer state.
    let model_keys: Vec<&str> = ckpt.names().filter(|k| !k.starts_with("optim.")).collect();
    let torch_keys: Vec<&str> = tor.names().collect();
    assert_eq!(model_keys, torch_keys, "recfuse's names are PyTorch's");
    for k in tor.names() {
        assert_eq!(ckpt.shape(k), tor.shape(k), "{k}");
    }
    match std::env::var_os("RECFUSE_CHECKPOINT_OUT") {
        Some(path) => {
            ckpt.save(&path).unwrap();
            eprintln!("[checkpoint] wrote {path:?}: check it with scripts/make-checkpoint-fixture.py --verify");
        }
        None => eprintln!(
            "[checkpoint] RECFUSE_CHECKPOINT_OUT unset: not writing the checkpoint for PyTorch"
        ),
    }
}
