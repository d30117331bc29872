//! Fast loops for broadcasting: binary ops, `broadcast_to` and `sum_to` run as a nest of
//! at most a few merged dimensions with a contiguous (or constant) innermost loop,
//! instead of a generic n-dimensional iterator.

use crate::array::simd::{push_map, push_zip};
use crate::Float;

/// Element strides of an input of shape `shape` viewed at the output shape `out`
/// (numpy alignment from the right), 0 along broadcast dimensions.
fn expanded_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - shape.len();
    let mut strides = vec![0; out.len()];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        if shape[i] != 1 {
            strides[pad + i] = s;
        }
        s *= shape[i];
    }
    strides
}

/// `(len, stride per operand)` for each dimension of `out`, with size-1 dimensions
/// dropped and adjacent dimensions merged where every operand steps through them as one.
fn merged<const K: usize>(out: &[usize], strides: [&[usize]; K]) -> Vec<(usize, [usize; K])> {
    let mut dims: Vec<(usize, [usize; K])> = Vec::with_capacity(out.len());
    for (i, &len) in out.iter().enumerate() {
        if len == 1 {
            continue;
        }
        let st: [usize; K] = std::array::from_fn(|k| strides[k][i]);
        if let Some(last) = dims.last_mut() {
            // Merge into the previous (outer) dimension when it is this one repeated.
            if (0..K).all(|k| last.1[k] == st[k] * len) {
                last.0 *= len;
                last.1 = st;
                continue;
            }
        }
        dims.push((len, st));
    }
    if dims.is_empty() {
        dims.push((1, [0; K]));
    }
    dims
}

/// Calls `inner(offsets)` for each index of the outer dimensions (all but the last) in
/// row-major order, with each operand's element offset at that index.
#[inline(always)]
fn for_outer<const K: usize>(dims: &[(usize, [usize; K])], mut inner: impl FnMut([usize; K])) {
    let outer = &dims[..dims.len() - 1];
    let count: usize = outer.iter().map(|d| d.0).product();
    let mut idx = [0usize; 16];
    let mut idx_vec;
    let idx: &mut [usize] = if outer.len() <= idx.len() {
        &mut idx[..outer.len()]
    } else {
        idx_vec = vec![0; outer.len()];
        &mut idx_vec
    };
    let mut off = [0usize; K];
    for _ in 0..count {
        inner(off);
        // Odometer step: the last outer dimension fastest.
        for d in (0..outer.len()).rev() {
            let (len, st) = outer[d];
            idx[d] += 1;
            if idx[d] < len {
                for k in 0..K {
                    off[k] += st[k];
                }
                break;
            }
            idx[d] = 0;
            for k in 0..K {
                off[k] -= st[k] * (len - 1);
            }
        }
    }
}

/// `f(a, b)` elementwise with numpy broadcasting to `out_shape`, row-major.
pub(crate) fn binary<F: Float>(
    a: &[F],
    sa: &[usize],
    b: &[F],
    sb: &[usize],
    out_shape: &[usize],
    f: impl Fn(F, F) -> F,
) -> Vec<F> {
    let (ea, eb) = (
        expanded_strides(sa, out_shape),
        expanded_strides(sb, out_shape),
    );
    let dims = merged(out_shape, [&ea, &eb]);
    let total = out_shape.iter().product();
    crate::array::simd::dispatch(
        #[inline(always)]
        || {
            let mut out = Vec::with_capacity(total);
            let (n, [sa, sb]) = dims[dims.len() - 1];
            for_outer(
                &dims,
                #[inline(always)]
                |[oa, ob]| match (sa, sb) {
                    (1, 1) => push_zip(&mut out, &a[oa..oa + n], &b[ob..ob + n], &f),
                    (1, 0) => {
                        let y = b[ob];
                        push_map(&mut out, &a[oa..oa + n], |x| f(x, y));
                    }
                    (0, 1) => {
                        let x = a[oa];
                        push_map(&mut out, &b[ob..ob + n], |y| f(x, y));
                    }
                    _ => out.extend((0..n).map(|i| f(a[oa + i * sa], b[ob + i * sb]))),
                },
            );
            out
        },
    )
}

/// `a` broadcast to `out_shape`, row-major.
pub(crate) fn broadcast<F: Float>(a: &[F], sa: &[usize], out_shape: &[usize]) -> Vec<F> {
    let ea = expanded_strides(sa, out_shape);
    let dims = merged(out_shape, [&ea]);
    let mut out = Vec::with_capacity(out_shape.iter().product());
    let (n, [s]) = dims[dims.len() - 1];
    for_outer(&dims, |[oa]| match s {
        1 => out.extend_from_slice(&a[oa..oa + n]),
        0 => out.extend(std::iter::repeat_n(a[oa], n)),
        _ => out.extend((0..n).map(|i| a[oa + i * s])),
    });
    out
}

/// The sum of a slice with eight running partial sums, so the loop vectorises (a plain
/// left-to-right float sum cannot be reordered by the compiler).
#[inline(always)]
pub(crate) fn sum_slice<F: Float>(x: &[F]) -> F {
    let mut acc = [F::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    let mut total =
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rest {
        total += v;
    }
    total
}

/// Sums `x` (shape `sx`) down to `target`, a shape that broadcasts to `sx`.
pub(crate) fn sum_to<F: Float>(x: &[F], sx: &[usize], target: &[usize]) -> Vec<F> {
    let contiguous = expanded_strides(sx, sx);
    let eo = expanded_strides(target, sx);
    let dims = merged(sx, [&contiguous, &eo]);
    let mut out = vec![F::zero(); target.iter().product()];
    let (n, [sx, so]) = dims[dims.len() - 1];
    crate::array::simd::dispatch(
        #[inline(always)]
        || {
            for_outer(
                &dims,
                #[inline(always)]
                |[ox, oo]| match (sx, so) {
                    (1, 0) => out[oo] += sum_slice(&x[ox..ox + n]),
                    (1, 1) => out[oo..oo + n]
                        .iter_mut()
                        .zip(&x[ox..ox + n])
                        .for_each(|(o, &v)| *o += v),
                    _ => (0..n).for_each(|i| out[oo + i * so] += x[ox + i * sx]),
                },
            )
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn arr(shape: &[usize], start: f64) -> ArrayD<f64> {
        let n: usize = shape.iter().product();
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..n).map(|i| start + i as f64 * 0.5).collect(),
        )
        .unwrap()
    }

    #[test]
    fn loops_agree_with_ndarray() {
        let cases: [(&[usize], &[usize]); 6] = [
            (&[2, 3, 4, 5], &[1, 3, 1, 1]),
            (&[2, 3, 4], &[4]),
            (&[2, 1, 3], &[4, 1]),
            (&[3, 4], &[]),
            (&[5, 1], &[1, 5]),
            (&[2, 3, 4], &[2, 1, 4]),
        ];
        for (sa, sb) in cases {
            let (a, b) = (arr(sa, 1.0), arr(sb, -2.0));
            let expect = &a * &b;
            let out_shape = expect.shape().to_vec();
            let got = binary(
                a.as_slice().unwrap(),
                sa,
                b.as_slice().unwrap(),
                sb,
                &out_shape,
                |x, y| x * y,
            );
            assert_eq!(
                got,
                expect.iter().copied().collect::<Vec<_>>(),
                "{sa:?} {sb:?}"
            );
            let bb = broadcast(b.as_slice().unwrap(), sb, &out_shape);
            let expect_b: Vec<f64> = b
                .broadcast(IxDyn(&out_shape))
                .unwrap()
                .iter()
                .copied()
                .collect();
            assert_eq!(bb, expect_b);
            // Summing the broadcast back multiplies by the repeat count.
            let s = sum_to(&bb, &out_shape, sb);
            let reps = out_shape.iter().product::<usize>() / b.len().max(1);
            let expect_s: Vec<f64> = b.iter().map(|v| v * reps as f64).collect();
            assert_eq!(s, expect_s, "{sb:?} from {out_shape:?}");
        }
    }
}
