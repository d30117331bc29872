//! metagrad: few-shot meta-learning on CPU tensors.
#![warn(missing_docs)]

pub mod data;
pub mod error;

pub use error::{Error, Result};
