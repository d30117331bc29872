//! metagrad: few-shot meta-learning on CPU tensors.
#![warn(missing_docs)]

pub mod alloc;
pub mod check;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
mod float;
pub mod map_fn;
pub mod meta;
pub mod nn;
pub mod ops;
pub mod tape;

/// The `ndarray` crate (version 0.16) that every tensor in metagrad's API is made of:
/// build inputs and read results with it, so that your arrays are metagrad's arrays.
pub use ndarray;

pub use alloc::tune_allocator;
pub use error::{Error, Result};
pub use float::Float;
pub use tape::{Tape, Var};
