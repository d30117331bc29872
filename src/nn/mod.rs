//! Networks as functions of explicit parameters: [`Params`], layers, normalisation with
//! an explicit mode, and the ready-made [`Mlp`] and [`Conv4`].

pub mod layers;
pub mod models;
pub mod norm;
mod params;

pub use models::{Conv4, Downsample, Mlp, Model, NormKind, Targets};
pub use norm::{Ctx, NormMode, NormState, Observed, RunningStats};
pub use params::Params;
