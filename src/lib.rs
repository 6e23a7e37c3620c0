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
