//! Networks as functions of explicit parameters: [`Params`], layers composed into a
//! [`Net`], normalisation with an explicit mode, and the ready-made [`Mlp`], [`Conv4`],
//! [`Conv6`] and [`ResNet12`].
//!
//! ```
//! use metagrad::nn::{Conv4, Ctx, Model, NormKind, NormMode, Params};
//! use metagrad::Tape;
//! use ndarray::{ArrayD, IxDyn};
//!
//! let net = Conv4 { norm: NormKind::Group { groups: 4 }, ..Conv4::omniglot(5) };
//! let params: Params<f32> = net.init(0);           // named tensors, outside any tape
//! let mut t = Tape::new();
//! let p = params.place(&mut t);                    // as differentiable leaves
//! let x = t.constant(ArrayD::zeros(IxDyn(&[3, 1, 28, 28])));
//! // Every forward call states its norm mode (group norm ignores it: no running statistics).
//! let logits = net.forward(&mut t, &p, x, &mut Ctx::new(NormMode::Transductive));
//! assert_eq!(t.shape(logits), &[3, 5]);
//! let loss = t.sparse_cross_entropy(logits, &[0, 3, 4]);
//! let grads = t.grad(loss, &p, true);              // recorded: second order available
//! assert_eq!(grads.len(), params.len());
//! ```

pub mod init;
pub mod layers;
pub mod models;
pub mod net;
pub mod norm;
pub(crate) mod params;

pub use models::{Conv4, Conv6, Downsample, Mlp, Model, ResNet12};
pub use net::{Layer, LinearInit, Net, Seq};
pub use norm::{Affine, Ctx, NormKind, NormMode, NormState, Observed, RunningStats};
pub use params::Params;
