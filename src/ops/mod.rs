//! Public operations. Each op validates its arguments (typed errors naming the argument and the
//! expected vs actual shape), then dispatches to the backend the tensors live on.

pub mod attention;
pub(crate) mod backend;
pub mod bce;
pub mod embedding;
pub mod fdo;
pub mod gated_cross;
pub(crate) mod gemm;
pub mod glue;
pub mod hiformer;
pub mod inbatch_softmax;
pub(crate) mod init;
pub(crate) mod inplace;
pub mod layernorm;
pub mod linear;
pub mod lowrank_qkv;
pub mod optim;

pub use gemm::Activation;
