//! metagrad: few-shot meta-learning on CPU tensors.
#![warn(missing_docs)]

pub mod alloc;
mod array;
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
pub mod train;

/// The `ndarray` crate (version 0.16) that every tensor in metagrad's API is made of:
/// build inputs and read results with it, so that your arrays are metagrad's arrays.
pub use ndarray;

/// The `rand` crate (0.8) behind every seeded generator in metagrad's API.
pub use rand;

/// The `rand_chacha` crate (0.3) of [`data::SamplerRng`], the samplers' generator (with
/// its `serde1` feature, so that a generator can be saved in a checkpoint).
pub use rand_chacha;

/// The `serde_json` crate (1.x) of [`checkpoint::Checkpoint::extras`].
pub use serde_json;

pub use alloc::tune_allocator;
pub use error::{Error, Result};
pub use float::Float;
pub use tape::{Tape, Var};

// The Rust examples of the README and the design notes compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/design.md")]
struct DesignDoctests;
