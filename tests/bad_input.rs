//! The bad-input matrix (issue 11), kept in CI: inputs that used to panic or abort the process
//! must come back as typed errors naming the caller's argument, on every backend present.
//! (NaN propagation lives with each op's tests, e.g. `tests/linear.rs`.)

mod common;

use recfuse::ops::gated_cross::{GatedCross, Init};
use recfuse::{DType, Error, Tensor};

/// 2^46 f32 = 256 TiB: beyond any machine, and beyond a 47-bit address space, so the request
/// fails even where the OS overcommits memory.
const HUGE: usize = 1 << 46;

#[test]
fn huge_allocations_are_errors_not_aborts() {
    let mut ran = Vec::new();
    for be in common::backends() {
        let dev = &be.device;
        for dtype in DType::ALL {
            match Tensor::zeros(&[HUGE], dtype, dev) {
                Err(Error::OutOfMemory { arg: "shape", .. }) => {}
                // A GPU backend may refuse the size before allocating (a buffer-size limit).
                Err(Error::InvalidArgument { .. } | Error::Backend { .. }) if be.name != "cpu" => {}
                other => panic!("{}: zeros of 2^46 {dtype:?}: {other:?}", be.name),
            }
            match Tensor::full(&[HUGE], 1.5, dtype, dev) {
                Err(Error::OutOfMemory { arg: "shape", .. }) => {}
                Err(Error::InvalidArgument { .. } | Error::Backend { .. }) if be.name != "cpu" => {}
                other => panic!("{}: full of 2^46 {dtype:?}: {other:?}", be.name),
            }
            // Byte counts past isize::MAX (element count still fits usize).
            match Tensor::zeros(&[1 << 62], dtype, dev) {
                Err(Error::OutOfMemory { .. }) => {}
                other => panic!("{}: zeros of 2^62 {dtype:?}: {other:?}", be.name),
            }
            // Element counts past usize.
            match Tensor::zeros(&[1 << 40, 1 << 40], dtype, dev) {
                Err(Error::InvalidArgument { arg: "shape", .. }) => {}
                other => panic!("{}: zeros of 2^80 {dtype:?}: {other:?}", be.name),
            }
            // The device still works afterwards.
            let t = Tensor::full(&[3], 2.0, dtype, dev).unwrap();
            assert_eq!(t.to_f64_vec().unwrap(), vec![2.0; 3], "{}", be.name);
        }
        let net = GatedCross::new(1 << 24, 1);
        match net.init(Init::Gdcn, 0, dev) {
            Err(Error::OutOfMemory { arg: "width", .. }) => {}
            other => panic!(
                "{}: GatedCross::init width 2^24: {:?}",
                be.name,
                other.map(|_| ())
            ),
        }
        ran.push(be.name);
    }
    eprintln!("[recfuse tests] huge allocations checked on: {ran:?}");
}
