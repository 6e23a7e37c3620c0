//! Interop with caller-owned memory and handles. CPU: zero-copy `from_vec` / `into_vec` and the
//! borrowed host views, with their typed errors. GPU backends: the handles recfuse exposes, and
//! the typed errors of the host-only views on device tensors.

mod common;

use half::bf16;
use recfuse::{DType, Device, Error, Tensor};

#[test]
fn from_vec_into_vec_round_trip_without_a_copy() {
    let mut rng = common::rng("interop-vec");
    let data = common::uniform(&mut rng, 24, 1.0);
    let owned = data.clone();
    let ptr = owned.as_ptr();
    let t = Tensor::from_vec(owned, &[4, 6]).unwrap();
    assert_eq!(t.shape(), &[4, 6]);
    assert_eq!(t.dtype(), DType::F32);
    assert_eq!(
        t.as_slice::<f32>().unwrap().as_ptr(),
        ptr,
        "storage is the caller's vector"
    );
    let back = t.into_vec::<f32>().unwrap();
    assert_eq!(
        back.as_ptr(),
        ptr,
        "into_vec hands the same allocation back"
    );
    assert_eq!(back, data);

    let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
    let t = Tensor::from_vec(h.clone(), &[24]).unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    assert_eq!(t.to_vec::<bf16>().unwrap(), h);
    assert_eq!(t.into_vec::<bf16>().unwrap(), h);
}

#[test]
fn from_vec_tensor_runs_an_op_and_mutable_view_writes_in_place() {
    let mut rng = common::rng("interop-op");
    let x = common::uniform(&mut rng, 16, 1.0);
    let y0 = common::uniform(&mut rng, 16, 1.0);
    let xt = Tensor::from_vec(x.clone(), &[16]).unwrap();
    let mut yt = Tensor::from_vec(y0.clone(), &[16]).unwrap();
    yt.axpy(0.5, &xt).unwrap();
    let want: Vec<f64> = y0
        .iter()
        .zip(&x)
        .map(|(&y, &x)| y as f64 + 0.5 * x as f64)
        .collect();
    common::assert_close(
        "axpy on from_vec tensors",
        &yt.to_f64_vec().unwrap(),
        &want,
        1e-6,
    );
    yt.as_mut_slice::<f32>().unwrap()[3] = f32::NAN;
    assert!(yt.into_vec::<f32>().unwrap()[3].is_nan());
}

#[test]
fn interop_errors_are_typed() {
    match Tensor::from_vec(vec![1.0f32; 5], &[2, 3]) {
        Err(Error::Shape { arg: "data", .. }) => {}
        other => panic!("expected a shape error, got {other:?}"),
    }
    match Tensor::from_vec(vec![1.0f32; 1], &[usize::MAX, 2]) {
        Err(Error::InvalidArgument { arg: "shape", .. }) => {}
        other => panic!("expected an overflow error, got {other:?}"),
    }
    let t = Tensor::from_vec(vec![1.0f32; 4], &[4]).unwrap();
    match t.as_slice::<bf16>() {
        Err(Error::DType {
            actual: DType::BF16,
            ..
        }) => {}
        other => panic!("expected a dtype error, got {other:?}"),
    }
    match t.into_vec::<bf16>() {
        Err(Error::DType {
            op: "Tensor::into_vec",
            actual: DType::BF16,
            ..
        }) => {}
        other => panic!("expected a dtype error, got {other:?}"),
    }
}

/// On a GPU device the host views are typed errors, `into_vec` is a download, and the
/// backend handles are reachable from `Device`.
#[test]
fn gpu_tensors_and_handles() {
    let mut rng = common::rng("interop-gpu");
    let mut ran = Vec::new();
    for be in common::backends() {
        if be.device == Device::Cpu {
            continue;
        }
        let data = common::uniform(&mut rng, 10, 1.0);
        let mut t = Tensor::from_slice(&data, &[10], &be.device).unwrap();
        match t.as_slice::<f32>() {
            Err(Error::DeviceMismatch { .. }) => {}
            other => panic!("{}: expected a device mismatch, got {other:?}", be.name),
        }
        assert!(t.as_mut_slice::<f32>().is_err());
        assert_eq!(t.into_vec::<f32>().unwrap(), data);
        if let Some(c) = be.device.as_cuda() {
            assert_eq!(c.context().ordinal(), c.ordinal());
            // A cudarc buffer on recfuse's stream is ordered with recfuse's work.
            let s = c.stream().clone_htod(&data).unwrap();
            assert_eq!(c.stream().clone_dtoh(&s).unwrap(), data);
        }
        if let Some(w) = be.device.as_wgpu() {
            assert!(w.device().limits().max_storage_buffer_binding_size > 0);
            w.queue().submit([]);
        }
        ran.push(be.name);
    }
    eprintln!("[recfuse tests] interop GPU checks ran on: {ran:?} (none means no GPU backend was present)");
}
