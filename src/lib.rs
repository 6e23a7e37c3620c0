//! # recfuse
//!
//! Hand-written GPU kernels for the layers modern recommender models spend their time in, on
//! three backends: CUDA (NVRTC-compiled at first use, through `cudarc`), WGSL (through `wgpu`)
//! and a multi-threaded CPU fallback. Forward and backward are separate calls; the caller owns
//! autograd, memory and streams.
//!
//! ```
//! use recfuse::{ops::linear::{self, Linear}, Activation, DType, Device, Tensor};
//! // Device::auto() picks CUDA, then a hardware wgpu adapter, then the CPU, and says why.
//! let (dev, why) = Device::auto()?;
//! println!("{why}");
//! let x = Tensor::from_f32(&[0.5; 8 * 16], &[8, 16], DType::F32, &dev)?;
//! let w = Tensor::from_f32(&[0.25; 4 * 16], &[4, 16], DType::F32, &dev)?;
//! let cfg = Linear { activation: Activation::Gelu, ..Default::default() };
//! let fwd = linear::forward(&x, &w, None, None, &cfg)?;
//! assert_eq!(fwd.y.shape(), &[8, 4]);
//! # Ok::<(), recfuse::Error>(())
//! ```
//!
//! A CTR training step (embedding bags → GDCN → head → BCE → backward → Adam + the fused
//! sparse row-wise Adagrad update) that stays on the device: the batch's lookups and labels
//! are its only uploads, and the loss is a device scalar (the README shows the same code;
//! `examples/train_ctr.rs` is the whole trainer).
//!
//! ```
//! use recfuse::ops::{bce::{bce_with_logits, Reduction}, gated_cross::{GatedCross, Init, SavePolicy}};
//! use recfuse::ops::{embedding::{EmbeddingBags, Pooling, TableSpec}, linear::{self, Linear, LinearParams}};
//! use recfuse::ops::optim::{Adam, AdamConfig, RowwiseAdagradConfig};
//! use recfuse::{DType, Device, Tensor};
//! let dev = Device::auto()?.0;
//! let specs: Vec<_> = (0..8).map(|f| TableSpec::new(format!("f{f}"), 1000, 16)).collect();
//! let mut bags = EmbeddingBags::new(&specs, Pooling::Sum, DType::F32, 0, &dev)?;
//! let net = GatedCross::new(bags.output_dim(), 3);
//! let mut cross = net.pack(&net.init(Init::Gdcn, 1, &dev)?, &dev)?;
//! let mut head = LinearParams::init(net.width, 1, true, DType::F32, 2, &dev)?;
//! let mut opt_c = Adam::new(&cross, AdamConfig::adam(1e-3), false)?;
//! let mut opt_h = Adam::new(&head, AdamConfig::adam(1e-3), false)?;
//! let (mut ada, ada_cfg) = (bags.rowwise_adagrad_state()?, RowwiseAdagradConfig { lr: 0.1, eps: 1e-8, weight_decay: 0.0 });
//! # let (b, indices, offsets): (usize, Vec<i64>, Vec<i64>) = (4, (0..32).map(|i| i * 7 % 1000).collect(), (0..=32).collect());
//! # let labels = Tensor::from_f32(&[1.0, 0.0, 0.0, 1.0], &[b, 1], DType::F32, &dev)?;
//! // One step; `indices` / `offsets` are the FBGEMM table-batched layout, `labels` is [B, 1].
//! let batch = bags.batch(&indices, &offsets, None)?;
//! let emb = bags.forward(&batch)?;
//! let (y, saved) = net.forward(&emb, &cross, SavePolicy::SaveAll)?;
//! let logits = linear::forward(&y, &head.weight, head.bias.as_ref(), None, &Linear::default())?.y;
//! let mut dlogits = Tensor::zeros(logits.shape(), DType::F32, &dev)?;
//! let loss = bce_with_logits(&logits, &labels, None, Reduction::Mean, Some(&mut dlogits))?;
//! let gh = linear::backward(&y, &head.weight, None, &dlogits, &Linear::default(), true)?;
//! let (d_emb, g_cross) = net.backward(&cross, &saved, &gh.dx)?;
//! opt_c.step(&mut cross, &g_cross)?;
//! opt_h.step(&mut head, &LinearParams { weight: gh.dw, bias: gh.db })?;
//! bags.update_rowwise_adagrad(&batch, &d_emb, &ada_cfg, &mut ada)?;
//! # assert!(loss.to_vec::<f32>()?[0].is_finite());
//! # Ok::<(), recfuse::Error>(())
//! ```

pub mod checkpoint;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod interop;
pub mod ops;
pub mod params;
pub mod tensor;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use checkpoint::Checkpoint;
pub use device::{prepare_headless, Device, WgpuOptions};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use ops::Activation;
pub use tensor::Tensor;
