//! In-place device ops on `Tensor` (copy_from, fill, scale, axpy, add_) on every backend, every
//! dtype, ragged sizes, against f64 arithmetic on the values the tensors hold; outputs start
//! NaN-poisoned where the op does not read them.

mod common;

use common::{assert_close, backends, random_tensor, rng};
use recfuse::{DType, Error, Tensor};

const SIZES: [usize; 5] = [1, 31, 33, 1001, 4099];

/// f32 arithmetic then one rounding: within one unit roundoff of the dtype (plus f32 noise).
fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-6,
        other => 2.0 * other.epsilon(),
    }
}

#[test]
fn inplace_ops_match_f64_on_every_backend() {
    let mut r = rng("inplace");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for xdt in [dt, DType::F32] {
                for &n in &SIZES {
                    let what = format!("{} {dt} x:{xdt} n={n}", be.name);
                    let (x, xv) = random_tensor(&mut r, &[n], 2.0, xdt, dev);
                    let (y0, yv) = random_tensor(&mut r, &[n], 2.0, dt, dev);

                    // copy_from (same dtype only): exact.
                    if xdt == dt {
                        let mut y = Tensor::poisoned(&[n], dt, dev).unwrap();
                        y.copy_from(&x).unwrap();
                        assert_eq!(y.to_bytes().unwrap(), x.to_bytes().unwrap(), "{what} copy");
                    }

                    // fill over poison.
                    let mut y = Tensor::poisoned(&[n], dt, dev).unwrap();
                    y.fill(-1.25).unwrap();
                    assert_eq!(y.to_f64_vec().unwrap(), vec![-1.25; n], "{what} fill");

                    // scale
                    let mut y = y0.try_clone().unwrap();
                    y.scale(-0.37).unwrap();
                    let want: Vec<f64> = yv.iter().map(|v| -0.37 * v).collect();
                    assert_close(
                        &format!("{what} scale"),
                        &y.to_f64_vec().unwrap(),
                        &want,
                        tol(dt),
                    );

                    // axpy
                    let mut y = y0.try_clone().unwrap();
                    y.axpy(0.75, &x).unwrap();
                    let want: Vec<f64> = yv.iter().zip(&xv).map(|(a, b)| a + 0.75 * b).collect();
                    assert_close(
                        &format!("{what} axpy"),
                        &y.to_f64_vec().unwrap(),
                        &want,
                        tol(dt),
                    );

                    // add_
                    let mut y = y0.try_clone().unwrap();
                    y.add_(&x).unwrap();
                    let want: Vec<f64> = yv.iter().zip(&xv).map(|(a, b)| a + b).collect();
                    assert_close(
                        &format!("{what} add_"),
                        &y.to_f64_vec().unwrap(),
                        &want,
                        tol(dt),
                    );
                }
            }
        }
    }
}

/// A 16-bit tensor of odd length: the last word's other half is padding that must not leak,
/// and the neighbouring element of a pair must not be clobbered (checked by exact values).
#[test]
fn inplace_ops_touch_only_their_elements() {
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            let mut y = Tensor::from_f32(&[1.0, 2.0, 3.0], &[3], dt, dev).unwrap();
            y.scale(2.0).unwrap();
            assert_eq!(
                y.to_f32_vec().unwrap(),
                vec![2.0, 4.0, 6.0],
                "{} {dt}",
                be.name
            );
            let x = Tensor::from_f32(&[1.0, 1.0, 1.0], &[3], dt, dev).unwrap();
            y.axpy(-2.0, &x).unwrap();
            assert_eq!(
                y.to_f32_vec().unwrap(),
                vec![0.0, 2.0, 4.0],
                "{} {dt}",
                be.name
            );
        }
    }
}

/// NaN propagates as in PyTorch: scale by 0 keeps a NaN; a NaN in x reaches y.
#[test]
fn nan_propagates() {
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            let mut y = Tensor::from_f32(&[f32::NAN, 1.0], &[2], dt, dev).unwrap();
            y.scale(0.0).unwrap();
            let v = y.to_f32_vec().unwrap();
            assert!(v[0].is_nan() && v[1] == 0.0, "{} {dt}: {v:?}", be.name);
            let x = Tensor::from_f32(&[1.0, f32::NAN], &[2], dt, dev).unwrap();
            y.add_(&x).unwrap();
            let v = y.to_f32_vec().unwrap();
            assert!(v[0].is_nan() && v[1].is_nan(), "{} {dt}: {v:?}", be.name);
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors_naming_the_argument() {
    for be in backends() {
        let dev = &be.device;
        let mut y = Tensor::zeros(&[2, 3], DType::F32, dev).unwrap();
        let wrong_shape = Tensor::zeros(&[3, 2], DType::F32, dev).unwrap();
        let wrong_dtype = Tensor::zeros(&[2, 3], DType::BF16, dev).unwrap();
        assert!(matches!(
            y.axpy(1.0, &wrong_shape),
            Err(Error::Shape { arg: "x", .. })
        ));
        assert!(matches!(
            y.add_(&wrong_shape),
            Err(Error::Shape { arg: "x", .. })
        ));
        assert!(matches!(
            y.copy_from(&wrong_shape),
            Err(Error::Shape { arg: "src", .. })
        ));
        assert!(matches!(
            y.copy_from(&wrong_dtype),
            Err(Error::DType { arg: "src", .. })
        ));
        assert!(matches!(
            y.axpy(f32::NAN, &wrong_dtype),
            Err(Error::InvalidArgument { arg: "a", .. })
        ));
        assert!(matches!(
            y.scale(f32::INFINITY),
            Err(Error::InvalidArgument { arg: "a", .. })
        ));
        if be.name != "cpu" {
            let host = Tensor::zeros(&[2, 3], DType::F32, &recfuse::Device::cpu()).unwrap();
            assert!(matches!(
                y.add_(&host),
                Err(Error::DeviceMismatch { arg: "x", .. })
            ));
            assert!(matches!(
                y.copy_from(&host),
                Err(Error::DeviceMismatch { arg: "src", .. })
            ));
        }
    }
}

/// The ops run on the device: no tensor data crosses to the host.
#[test]
fn inplace_ops_do_not_copy_to_the_host() {
    for be in backends() {
        let dev = &be.device;
        let x = Tensor::full(&[1000], 1.0, DType::F32, dev).unwrap();
        let mut y = Tensor::zeros(&[1000], DType::BF16, dev).unwrap();
        let before = dev.host_transfer_count();
        y.fill(2.0).unwrap();
        y.scale(0.5).unwrap();
        y.axpy(2.0, &x).unwrap();
        y.add_(&x).unwrap();
        dev.synchronize().unwrap();
        assert_eq!(dev.host_transfer_count(), before, "{}", be.name);
        assert_eq!(y.to_f32_vec().unwrap(), vec![4.0; 1000], "{}", be.name);
        if be.name != "cpu" {
            assert!(
                dev.host_transfer_count() > before,
                "{}: the counter counts",
                be.name
            );
        }
    }
}
