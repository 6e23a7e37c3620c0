//! `RECFUSE_DEVICE` that is not UTF-8 is rejected by name, not ignored; and two wgpu devices on
//! one adapter describe themselves differently, so a `DeviceMismatch` between them is readable.
//! (Its own test binary: it sets an environment variable, which no other thread may read then.
//! Named `wgpu_*` so the emulated-CUDA pass, which has no use for it, skips it.)

use recfuse::{Device, Error, Tensor, WgpuOptions};

#[test]
fn non_utf8_device_override_and_distinct_wgpu_devices() {
    use std::os::unix::ffi::OsStringExt;
    let saved = std::env::var_os("RECFUSE_DEVICE");
    std::env::set_var(
        "RECFUSE_DEVICE",
        std::ffi::OsString::from_vec(vec![b'c', 0xff, b'u']),
    );
    let got = Device::auto();
    match saved {
        Some(v) => std::env::set_var("RECFUSE_DEVICE", v),
        None => std::env::remove_var("RECFUSE_DEVICE"),
    }
    match got {
        Err(Error::InvalidArgument {
            arg: "RECFUSE_DEVICE",
            ..
        }) => {}
        other => panic!("non-UTF-8 RECFUSE_DEVICE: {:?}", other.map(|(_, why)| why)),
    }

    recfuse::prepare_headless();
    let opts = WgpuOptions {
        allow_software: true,
    };
    match (Device::wgpu(&opts), Device::wgpu(&opts)) {
        (Ok(a), Ok(b)) => {
            assert_ne!(a.describe(), b.describe());
            let x = Tensor::zeros(&[2], recfuse::DType::F32, &a).unwrap();
            let mut y = Tensor::zeros(&[2], recfuse::DType::F32, &b).unwrap();
            match y.axpy(1.0, &x) {
                Err(Error::DeviceMismatch {
                    expected, actual, ..
                }) => assert_ne!(expected, actual),
                other => panic!("two wgpu devices mixed: {other:?}"),
            }
            eprintln!(
                "[recfuse tests] two wgpu devices: {} / {}",
                a.describe(),
                b.describe()
            );
        }
        (a, _) => {
            let required = std::env::var("RECFUSE_REQUIRE").unwrap_or_default();
            assert!(
                !required.split(',').any(|b| b.trim() == "wgpu"),
                "RECFUSE_REQUIRE has wgpu, but it did not open: {:?}",
                a.err()
            );
            eprintln!(
                "[recfuse tests] wgpu absent, distinct-description check not run: {:?}",
                a.err()
            );
        }
    }
}
