//! Array helpers below the tape: row-major slices, vectorised loops and their
//! instruction-set dispatch. The tape and the ops both build on these; nothing here knows
//! of either.

pub(crate) mod simd;

use crate::Float;
use ndarray::{ArrayD, IxDyn};

/// The elements of a row-major array as a slice (every tape value is row-major).
pub(crate) fn flat<F>(a: &ArrayD<F>) -> &[F] {
    a.as_slice()
        .expect("metagrad: tape values are stored in row-major layout")
}

/// `acc += x` elementwise (one length), vectorised.
pub(crate) fn add_assign<F: Float>(acc: &mut [F], x: &[F]) {
    assert_eq!(acc.len(), x.len(), "metagrad::add_assign: lengths differ");
    simd::dispatch(
        #[inline(always)]
        || acc.iter_mut().zip(x).for_each(|(a, &v)| *a += v),
    )
}

/// An array of the given shape from a row-major vector.
#[track_caller]
pub(crate) fn from_vec<F: Float>(shape: &[usize], v: Vec<F>) -> ArrayD<F> {
    let n = v.len();
    ArrayD::from_shape_vec(IxDyn(shape), v)
        .unwrap_or_else(|_| panic!("metagrad: {n} values for shape {shape:?}"))
}

/// Row-major layout, copying only when needed.
pub(crate) fn standard<F: Float>(a: ArrayD<F>) -> ArrayD<F> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned()
    }
}
