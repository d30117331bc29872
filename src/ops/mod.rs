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
mod small_matmul;

pub(crate) use crate::array::{flat, from_vec, standard};
