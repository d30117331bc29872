//! Tasks and data: sinusoid regression, N-way K-shot episodes, Omniglot.
//!
//! Everything here produces `f32` arrays whose dimension 0 indexes the task of a
//! meta-batch, so a batch can be fed straight into a per-task mapper. Use [`cast`]
//! to get another float type (e.g. `f64`).
//!
//! * [`sinusoid`]: the sine-wave regression tasks of the MAML paper
//!   ([`SinusoidSampler`], [`SinusoidTask`], [`SinusoidBatch`]).
//! * [`collection`]: one labelled collection for examples of any shape, `[C, H, W]` images
//!   (bytes kept as bytes) or `[D]` vectors, with class names ([`Collection`]).
//! * [`episodes`]: a seeded N-way K-shot Q-query sampler over a collection
//!   ([`EpisodeSampler`], [`Episode`], [`EpisodeBatch`]).
//! * [`folder`]: your own images, a folder of class subfolders with optional split files
//!   ([`ImageFolder`]).
//! * [`benchmarks`]: miniImageNet, tieredImageNet, CIFAR-FS and FC100 in the formats people
//!   have on disk: numpy pickles (numpy 1 and 2, protocols 2 to 5), `.npz`, image folders
//!   ([`Benchmark`], [`Splits`]).
//! * [`transform`]: per-episode normalisation and augmentation, seeded ([`Transforms`]).
//! * [`omniglot`]: the Omniglot loader (official folders or zips), with the MAML
//!   split and the official split ([`Omniglot`]).
//!
//! All sampling is reproducible: the same seed gives bit-identical tasks.
//!
//! # Example
//!
//! ```
//! use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection, SinusoidSampler};
//! use ndarray::Array3;
//!
//! // A meta-batch of 4 sinusoid tasks, 5 support and 10 query points each.
//! let mut sines = SinusoidSampler::new(5, 10, 42)?;
//! let batch = sines.sample_batch(4)?;
//! assert_eq!(batch.xs.shape(), &[4, 5, 1]);
//! assert_eq!(batch.yq.shape(), &[4, 10, 1]);
//!
//! // 3-way 1-shot 2-query episodes over a toy collection: 4 classes of 3 images, 2x2 pixels.
//! let images = Array3::<f32>::zeros((12, 2, 2));
//! let collection = ImageCollection::from_class_sizes(images, &[3, 3, 3, 3])?;
//! let mut episodes = EpisodeSampler::new(&collection, EpisodeSpec::new(3, 1, 2), 7)?;
//! let batch = episodes.sample_batch(2)?;
//! assert_eq!(batch.xs.shape(), &[2, 3, 1, 2, 2]);
//! assert_eq!(batch.yq.shape(), &[2, 6]);
//! # Ok::<(), metagrad::Error>(())
//! ```

pub mod benchmarks;
pub mod collection;
pub mod episodes;
pub mod folder;
mod formats;
pub mod omniglot;
pub mod sinusoid;
pub mod transform;

pub use benchmarks::{load_image_pickle, Benchmark, Split, Splits};
pub use collection::{Collection, Examples, ImageCollection};
pub use episodes::{Episode, EpisodeBatch, EpisodeSampler, EpisodeSpec};
pub use folder::ImageFolder;
pub use omniglot::{resize_area, Omniglot, OmniglotSplits, Part};
pub use sinusoid::{SinusoidBatch, SinusoidConfig, SinusoidSampler, SinusoidTask};
pub use transform::{Augment, Normalize, Transforms};

use ndarray::{Array, ArrayBase, Data, Dimension};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The random number generator used by every sampler of this module.
///
/// ChaCha8 is portable and its output is fixed for a given seed, so tasks are
/// reproducible across platforms and runs.
pub type SamplerRng = ChaCha8Rng;

/// Creates the module's [`SamplerRng`] from a `u64` seed.
pub fn rng_from_seed(seed: u64) -> SamplerRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Converts an `f32` array (any dimension) to another float type, e.g. `f64`.
///
/// ```
/// let a = ndarray::arr1(&[0.5f32, 2.0]);
/// let b: ndarray::Array1<f64> = metagrad::data::cast(&a);
/// assert_eq!(b, ndarray::arr1(&[0.5f64, 2.0]));
/// ```
pub fn cast<F, S, D>(array: &ArrayBase<S, D>) -> Array<F, D>
where
    F: num_traits::Float,
    S: Data<Elem = f32>,
    D: Dimension,
{
    // Converting an f32 to any float type cannot fail; NaN is only a formal fallback.
    array.mapv(|v| F::from(v).unwrap_or_else(F::nan))
}
