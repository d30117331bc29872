//! The initialisers of the ready-made networks, for models of your own: the same
//! draws, in the same order, give the same bits.
//!
//! ```
//! use metagrad::nn::init::{he_normal, uniform};
//! use metagrad::rand::SeedableRng;
//! use metagrad::rand_chacha::ChaCha8Rng;
//!
//! let mut rng = ChaCha8Rng::seed_from_u64(0);
//! // A linear layer 40 -> 10 as Mlp initialises it: uniform in ±1/√40.
//! let w = uniform::<f32>(&mut rng, &[10, 40], 1.0 / 40f64.sqrt());
//! // A 3×3 convolution 3 -> 32 as Conv4 initialises it: He-normal, std √(2 / (3·3·3)).
//! let k = he_normal::<f32>(&mut rng, &[32, 3, 3, 3]);
//! assert_eq!((w.shape(), k.shape()), (&[10, 40][..], &[32, 3, 3, 3][..]));
//! ```

use crate::Float;
use ndarray::{ArrayD, IxDyn};
use ndarray_rand::rand_distr::{StandardNormal, Uniform};
use rand::Rng;

/// Values drawn uniformly from `[-bound, bound)` in row-major order ([`Mlp`](super::Mlp)'s
/// weights and biases use `bound = 1/√in`, as PyTorch's `nn.Linear` does).
pub fn uniform<F: Float>(rng: &mut (impl Rng + ?Sized), shape: &[usize], bound: f64) -> ArrayD<F> {
    let d = Uniform::new(-bound, bound);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || F::c(rng.sample(d)))
}

/// Values drawn from a normal distribution of mean 0 and standard deviation `std`, in
/// row-major order.
pub fn normal<F: Float>(rng: &mut (impl Rng + ?Sized), shape: &[usize], std: f64) -> ArrayD<F> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let z: f64 = rng.sample(StandardNormal);
        F::c(z * std)
    })
}

/// He (Kaiming) normal initialisation of a weight `[out, in, ...]`: standard deviation
/// `√(2 / fan_in)` with `fan_in` the product of every dimension after the first
/// ([`Conv4`](super::Conv4)'s convolutions).
pub fn he_normal<F: Float>(rng: &mut (impl Rng + ?Sized), shape: &[usize]) -> ArrayD<F> {
    let fan_in: usize = shape.iter().skip(1).product();
    normal(rng, shape, (2.0 / fan_in.max(1) as f64).sqrt())
}
