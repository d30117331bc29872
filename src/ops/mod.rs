//! The tape's user-facing operations, by theme, as methods on [`Tape`](crate::Tape).
//!
//! Each method checks shapes (panicking with the op's name and both shapes), computes the
//! value, and records a primitive [`Op`](crate::tape::Op) — or is a composite of other
//! methods, differentiable to any order because its parts are.
//!
//! | module | ops |
//! | --- | --- |
//! | [`elementwise`] | add, sub, mul, div (broadcasting), neg, scalar ops, exp, ln, sqrt, powi, square, tanh, sigmoid, relu, mask, where, maximum |
//! | [`reduce`] | sum, mean (all or over axes, keepdim), sum_to, broadcast_to, max over an axis |
//! | [`shape`] | reshape, permute, transpose, slice, index_select, concat, stack, gather, scatter_add |
//! | [`linalg`] | matmul (2-D and batched) |
//! | [`conv`] | conv2d, max-pool, average pool, global average pool |
//! | [`loss`] | log_softmax, softmax, mse, cross-entropy with dense and with sparse labels |
//! | [`norm`] | batch normalisation with the batch's statistics (fused) |

mod broadcast;
pub mod conv;
pub mod elementwise;
pub mod linalg;
pub mod loss;
pub mod norm;
pub mod reduce;
pub mod shape;
mod simd;
mod small_matmul;

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
