//! Glue ops (concat / split / slice / write_slice / sum / their backwards) on every backend and
//! dtype, on ragged, odd-offset shapes (16-bit rows that start mid-word), against host index
//! arithmetic. Copies are exact (compared bit for bit, NaN payloads included); sums against
//! f64. Destinations start NaN-poisoned where the op writes them.

mod common;

use common::{assert_close, backends, random_tensor, rng, tolerance};
use rand::Rng;
use recfuse::ops::glue::{
    concat, concat_into, slice, slice_backward, split, sum, sum_backward, write_slice,
};
use recfuse::{DType, Error, Tensor};

/// Host model of a row-major tensor for the index arithmetic.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn unravel(mut k: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for i in (0..shape.len()).rev() {
        idx[i] = k % shape[i];
        k /= shape[i];
    }
    idx
}

/// The raw 16/32-bit words of a tensor, element by element (exact comparison incl. NaN bits).
fn bits(t: &Tensor) -> Vec<u32> {
    let b = t.to_bytes().unwrap();
    match t.dtype() {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => b
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
    }
}

#[test]
fn concat_split_and_slices_are_exact_on_every_backend() {
    let mut r = rng("glue-copy");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for &(rows, ref widths) in &[
                (1usize, vec![1usize]),
                (3, vec![1, 2, 3]),
                (7, vec![5, 1, 4, 3]),
                (33, vec![3, 16, 7, 1, 9]),
                (2, vec![63, 64, 65]),
            ] {
                let what = format!("{} {dt} rows={rows} widths={widths:?}", be.name);
                let parts: Vec<(Tensor, Vec<f64>)> = widths
                    .iter()
                    .map(|&w| random_tensor(&mut r, &[rows, w], 3.0, dt, dev))
                    .collect();
                let refs: Vec<&Tensor> = parts.iter().map(|(t, _)| t).collect();
                let total: usize = widths.iter().sum();
                // concat over poison: every element written, each from the right part.
                let mut out = Tensor::poisoned(&[rows, total], dt, dev).unwrap();
                concat_into(&refs, &mut out).unwrap();
                let got = bits(&out);
                let part_bits: Vec<Vec<u32>> = refs.iter().map(|t| bits(t)).collect();
                for i in 0..rows {
                    let mut c0 = 0;
                    for (p, &w) in widths.iter().enumerate() {
                        for c in 0..w {
                            assert_eq!(
                                got[i * total + c0 + c],
                                part_bits[p][i * w + c],
                                "{what}: concat row {i} part {p} col {c}"
                            );
                        }
                        c0 += w;
                    }
                }
                assert_eq!(
                    bits(&concat(&refs).unwrap()),
                    got,
                    "{what}: concat vs concat_into"
                );
                // split undoes concat exactly.
                let back = split(&out, widths).unwrap();
                for (p, t) in back.iter().enumerate() {
                    assert_eq!(t.shape(), &[rows, widths[p]], "{what}: split shape {p}");
                    assert_eq!(bits(t), part_bits[p], "{what}: split part {p}");
                }
            }
            // slice / slice_backward / write_slice along every axis of a rank-3 tensor.
            let shape = [3usize, 5, 7];
            let (x, _) = random_tensor(&mut r, &shape, 3.0, dt, dev);
            let xb = bits(&x);
            let st = strides(&shape);
            for axis in 0..3 {
                let dim = shape[axis];
                let start = r.random_range(0..dim);
                let len = r.random_range(1..=dim - start);
                let what = format!("{} {dt} axis={axis} start={start} len={len}", be.name);
                let s = slice(&x, axis, start, len).unwrap();
                let mut sshape = shape.to_vec();
                sshape[axis] = len;
                assert_eq!(s.shape(), sshape.as_slice(), "{what}: slice shape");
                let sb = bits(&s);
                for (k, &v) in sb.iter().enumerate() {
                    let mut idx = unravel(k, &sshape);
                    idx[axis] += start;
                    let src: usize = idx.iter().zip(&st).map(|(i, s)| i * s).sum();
                    assert_eq!(v, xb[src], "{what}: slice element {k}");
                }
                // write_slice into poison leaves the rest poisoned and writes exactly the box.
                let mut dst = Tensor::poisoned(&shape, dt, dev).unwrap();
                let nan_bits = bits(&dst)[0];
                write_slice(&mut dst, axis, start, &s).unwrap();
                let db = bits(&dst);
                for (k, &v) in db.iter().enumerate() {
                    let idx = unravel(k, &shape);
                    let inside = idx[axis] >= start && idx[axis] < start + len;
                    let want = if inside { xb[k] } else { nan_bits };
                    assert_eq!(v, want, "{what}: write_slice element {k} (inside={inside})");
                }
                // slice_backward: zeros outside, dy inside.
                let dx = slice_backward(&s, &shape, axis, start).unwrap();
                let dxv = dx.to_f64_vec().unwrap();
                let xv = x.to_f64_vec().unwrap();
                for (k, &v) in dxv.iter().enumerate() {
                    let idx = unravel(k, &shape);
                    let inside = idx[axis] >= start && idx[axis] < start + len;
                    assert_eq!(
                        v,
                        if inside { xv[k] } else { 0.0 },
                        "{what}: slice_backward {k}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_nan_payload_is_copied_bit_for_bit() {
    for be in backends() {
        let dev = &be.device;
        let x = Tensor::from_slice(
            &[1.0f32, f32::from_bits(0x7fc0_1234), -0.0, 2.0],
            &[2, 2],
            dev,
        )
        .unwrap();
        let s = slice(&x, 1, 1, 1).unwrap();
        assert_eq!(bits(&s), vec![0x7fc0_1234, 2.0f32.to_bits()], "{}", be.name);
        let y = sum(&x, 1).unwrap().to_vec::<f32>().unwrap();
        assert!(y[0].is_nan() && y[1] == 2.0, "{}: sum {y:?}", be.name);
    }
}

#[test]
fn sums_and_broadcasts_match_f64_on_every_backend() {
    let mut r = rng("glue-sum");
    for be in backends() {
        let dev = &be.device;
        for dt in DType::ALL {
            for shape in [vec![7usize], vec![4, 9], vec![3, 5, 7], vec![2, 1, 33, 3]] {
                let (x, xv) = random_tensor(&mut r, &shape, 2.0, dt, dev);
                let st = strides(&shape);
                for axis in 0..shape.len() {
                    let what = format!("{} {dt} shape={shape:?} axis={axis}", be.name);
                    let y = sum(&x, axis).unwrap();
                    let mut yshape = shape.clone();
                    yshape.remove(axis);
                    assert_eq!(y.shape(), yshape.as_slice(), "{what}: sum shape");
                    let n_out: usize = yshape.iter().product();
                    let want: Vec<f64> = (0..n_out)
                        .map(|k| {
                            let mut idx = unravel(k, &yshape);
                            idx.insert(axis, 0);
                            (0..shape[axis])
                                .map(|a| {
                                    idx[axis] = a;
                                    xv[idx.iter().zip(&st).map(|(i, s)| i * s).sum::<usize>()]
                                })
                                .sum()
                        })
                        .collect();
                    assert_close(
                        &format!("{what}: sum"),
                        &y.to_f64_vec().unwrap(),
                        &want,
                        tolerance(dt, shape[axis]),
                    );
                    // Broadcast back: every copy of y along the axis, exactly.
                    let b = sum_backward(&y, axis, shape[axis]).unwrap();
                    assert_eq!(b.shape(), shape.as_slice(), "{what}: broadcast shape");
                    let bb = bits(&b);
                    let yb = bits(&y);
                    let yst = strides(&yshape);
                    for (k, &v) in bb.iter().enumerate() {
                        let mut idx = unravel(k, &shape);
                        idx.remove(axis);
                        let src: usize = idx.iter().zip(&yst).map(|(i, s)| i * s).sum();
                        assert_eq!(v, yb[src], "{what}: broadcast element {k}");
                    }
                }
            }
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    for be in backends() {
        let dev = &be.device;
        let a = Tensor::zeros(&[2, 3], DType::F32, dev).unwrap();
        let b = Tensor::zeros(&[3, 3], DType::F32, dev).unwrap();
        let h = Tensor::zeros(&[2, 3], DType::BF16, dev).unwrap();
        let name = be.name;
        assert!(
            matches!(
                concat(&[]),
                Err(Error::InvalidArgument { arg: "parts", .. })
            ),
            "{name}"
        );
        assert!(
            matches!(concat(&[&a, &b]), Err(Error::Shape { arg: "parts", .. })),
            "{name}"
        );
        assert!(
            matches!(concat(&[&a, &h]), Err(Error::DType { arg: "parts", .. })),
            "{name}"
        );
        assert!(matches!(
            split(&a, &[1, 1]),
            Err(Error::InvalidArgument { arg: "widths", .. })
        ));
        assert!(matches!(
            slice(&a, 2, 0, 1),
            Err(Error::InvalidArgument { arg: "axis", .. })
        ));
        assert!(matches!(
            slice(&a, 1, 2, 2),
            Err(Error::InvalidArgument { arg: "start", .. })
        ));
        assert!(matches!(
            slice(&a, 1, usize::MAX, 2),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            sum(&a, 5),
            Err(Error::InvalidArgument { arg: "axis", .. })
        ));
        let mut out = Tensor::zeros(&[2, 5], DType::F32, dev).unwrap();
        assert!(matches!(
            concat_into(&[&a, &a], &mut out),
            Err(Error::Shape { arg: "out", .. })
        ));
        let mut dst = Tensor::zeros(&[2, 3], DType::F32, dev).unwrap();
        assert!(matches!(
            write_slice(&mut dst, 1, 0, &h),
            Err(Error::DType { arg: "src", .. })
        ));
        assert!(matches!(
            write_slice(&mut dst, 0, 0, &b),
            Err(Error::InvalidArgument { .. })
        ));
        // Zero-size pieces are fine.
        let e = Tensor::zeros(&[2, 0], DType::F32, dev).unwrap();
        assert_eq!(concat(&[&a, &e]).unwrap().shape(), &[2, 3], "{name}");
        assert_eq!(
            sum(&e, 1).unwrap().to_vec::<f32>().unwrap(),
            vec![0.0, 0.0],
            "{name}"
        );
    }
}
