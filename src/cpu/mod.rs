//! The CPU backend: `fast` is the blocked, multi-threaded path used when a tensor lives on the
//! CPU; `reference` is the naive f64 oracle the tests compare every backend against.

pub(crate) mod attention;
pub(crate) mod bce;
pub(crate) mod embedding;
pub(crate) mod fast;
pub(crate) mod glue;
pub(crate) mod inplace;
pub(crate) mod layernorm;
pub(crate) mod optim;
pub mod reference;
pub(crate) mod softmax;
