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

/// CUDA: a caller's `CudaSlice` becomes a tensor without a copy and comes back as one; a raw
/// pointer is borrowed (written in place, never freed); a caller's stream carries every launch;
/// bad pointers, lengths and dtypes are typed errors.
#[cfg(feature = "cuda")]
#[test]
fn cuda_slices_raw_pointers_and_streams() {
    use cudarc::driver::DevicePtr;
    use recfuse::cuda::interop::CUDA_PTR_ALIGN;
    let mut rng = common::rng("interop-cuda");
    let mut ran = Vec::new();
    for be in common::backends() {
        let Some(c) = be.device.as_cuda() else {
            continue;
        };
        let dev = &be.device;
        let stream = c.stream().clone();
        let x = common::uniform(&mut rng, 12, 1.0);
        let y0 = common::uniform(&mut rng, 12, 1.0);
        let want: Vec<f64> = y0
            .iter()
            .zip(&x)
            .map(|(&y, &x)| y as f64 + 0.5 * x as f64)
            .collect();

        // Owned hand-over both ways; the pointer is the same allocation throughout.
        let xs = stream.clone_htod(&x).unwrap();
        let (xp, g) = xs.device_ptr(&stream);
        drop(g);
        let xt = Tensor::from_cuda_slice(dev, xs, &[3, 4]).unwrap();
        assert_eq!(
            xt.cuda_ptr(),
            Some(xp),
            "{}: no copy on the way in",
            be.name
        );
        assert_eq!(xt.to_vec::<f32>().unwrap(), x);
        let mut yt = Tensor::from_slice(&y0, &[3, 4], dev).unwrap();
        yt.axpy(0.5, &xt).unwrap();
        let ys = yt.into_cuda_slice::<f32>().unwrap();
        let (yp, g) = ys.device_ptr(&stream);
        drop(g);
        let got: Vec<f64> = stream
            .clone_dtoh(&ys)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        common::assert_close("axpy into a handed-back slice", &got, &want, 1e-6);
        assert_ne!(yp, 0);

        // A slice written on another stream is ordered before recfuse reads it.
        let other = c.context().new_stream().unwrap();
        let zs = other.clone_htod(&x).unwrap();
        let zt = Tensor::from_cuda_slice(dev, zs, &[12]).unwrap();
        assert_eq!(zt.to_vec::<f32>().unwrap(), x);

        // Borrowed raw memory: written in place, still valid (and ours) after the tensor drops.
        let mine = stream.clone_htod(&y0).unwrap();
        let (p, g) = mine.device_ptr(&stream);
        drop(g);
        // SAFETY: `mine` holds 12 f32, outlives the tensor, and is used on recfuse's stream only.
        let mut rt = unsafe { Tensor::from_raw_cuda(dev, p, &[3, 4], DType::F32) }.unwrap();
        assert_eq!(rt.cuda_ptr(), Some(p));
        rt.axpy(0.5, &xt).unwrap();
        drop(rt);
        // SAFETY: as above.
        let rt2 = unsafe { Tensor::from_raw_cuda(dev, p, &[12], DType::F32) }.unwrap();
        match rt2.into_cuda_slice::<f32>() {
            Err(Error::InvalidArgument { arg: "self", .. }) => {}
            other => panic!(
                "{}: borrowed memory handed out as owned: {other:?}",
                be.name
            ),
        }
        let got: Vec<f64> = stream
            .clone_dtoh(&mine)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        common::assert_close("axpy into borrowed memory", &got, &want, 1e-6);
        drop(mine); // freed once, by its owner: a double free is a recorded driver error
        c.synchronize().unwrap();
        c.context()
            .check_err()
            .unwrap_or_else(|e| panic!("{}: driver error after the hand-overs: {e}", be.name));

        // Typed errors, nothing wrapped.
        let s = stream.clone_htod(&x).unwrap();
        match Tensor::from_cuda_slice(dev, s, &[5]) {
            Err(Error::Shape { arg: "slice", .. }) => {}
            other => panic!("{}: wrong length accepted: {other:?}", be.name),
        }
        // SAFETY: both calls are rejected before the pointer is used.
        unsafe {
            match Tensor::from_raw_cuda(dev, p + 2, &[4], DType::BF16) {
                Err(Error::InvalidArgument { arg: "ptr", .. }) => {}
                other => panic!("{}: misaligned pointer accepted: {other:?}", be.name),
            }
            assert!(Tensor::from_raw_cuda(dev, 0, &[4], DType::F32).is_err());
            assert!(Tensor::from_raw_cuda(&Device::cpu(), p, &[4], DType::F32).is_err());
        }
        assert_eq!(CUDA_PTR_ALIGN, 16);
        let t = Tensor::from_slice(&x, &[12], dev).unwrap();
        assert!(matches!(
            t.into_cuda_slice::<half::bf16>(),
            Err(Error::DType { .. })
        ));
        assert!(Tensor::from_slice(&x, &[12], &Device::cpu())
            .unwrap()
            .into_cuda_slice::<f32>()
            .is_err());

        // The caller's stream carries recfuse's work; results agree with the default device.
        let mine = c.context().new_stream().unwrap();
        let sdev = Device::cuda_on_stream(mine.clone()).unwrap();
        assert!(std::sync::Arc::ptr_eq(
            sdev.as_cuda().unwrap().stream(),
            &mine
        ));
        let a = Tensor::from_slice(&x, &[3, 4], &sdev).unwrap();
        let mut b = Tensor::from_slice(&y0, &[3, 4], &sdev).unwrap();
        b.axpy(0.5, &a).unwrap();
        common::assert_close(
            "axpy on the caller's stream",
            &b.to_f64_vec().unwrap(),
            &want,
            1e-6,
        );
        // Tensors of two recfuse devices (two streams) do not mix silently.
        match b.axpy(1.0, &xt) {
            Err(Error::DeviceMismatch {
                expected, actual, ..
            }) => assert_ne!(expected, actual, "the two devices must read differently"),
            other => panic!("{}: tensors of two streams mixed: {other:?}", be.name),
        }
        ran.push(be.name);
    }
    eprintln!(
        "[recfuse tests] CUDA interop ran on: {ran:?} (none means no CUDA backend was present)"
    );
}
