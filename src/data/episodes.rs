//! N-way K-shot Q-query episodes over a labelled image collection.
//!
//! An [`ImageCollection`] keeps all images in one contiguous `[n_images, H, W]`
//! array and describes each class as a range of rows in it. Classes can be
//! augmented with 90° rotations ([`ImageCollection::with_rotations`]): each
//! rotation becomes a new class, applied on the fly when an episode is built, so
//! no image is stored twice.
//!
//! An [`EpisodeSampler`] draws tasks from a collection: `N` distinct classes, and
//! from each class `K + Q` distinct images (`K` support, `Q` query). The classes of
//! a task get the labels `0..N` in a random order, so a model cannot memorise a
//! class-to-label mapping. Sampling is seeded: the same seed gives bit-identical
//! episodes.
//!
//! Within an episode, examples are grouped by class: support rows
//! `p*K .. (p+1)*K` and query rows `p*Q .. (p+1)*Q` hold the `p`-th sampled class,
//! whose label is `ys[p*K]` (= `yq[p*Q]`). `classes[label]` names the collection class.
//!
//! # Example
//!
//! ```
//! use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection};
//! use ndarray::Array3;
//!
//! // 10 classes of 6 images each, 4x4 pixels; image i is filled with the value i.
//! let images = Array3::from_shape_fn((60, 4, 4), |(i, _, _)| i as f32);
//! let collection = ImageCollection::from_class_sizes(images, &[6; 10])?;
//!
//! // 5-way 1-shot 3-query tasks, seed 1.
//! let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 1)?;
//! let episode = sampler.sample();
//! assert_eq!(episode.xs.shape(), &[5, 1, 4, 4]);
//! assert_eq!(episode.xq.shape(), &[15, 1, 4, 4]);
//!
//! // A meta-batch of 8 tasks, stacked along dimension 0.
//! let batch = sampler.sample_batch(8)?;
//! assert_eq!(batch.xs.shape(), &[8, 5, 1, 4, 4]);
//! assert_eq!(batch.ys.shape(), &[8, 5]);
//!
//! // Asking for more classes than exist is an error, not a panic.
//! assert!(EpisodeSampler::new(&collection, EpisodeSpec::new(11, 1, 1), 1).is_err());
//! # Ok::<(), metagrad::Error>(())
//! ```

use std::ops::Range;
use std::sync::Arc;

use ndarray::parallel::prelude::*;
use ndarray::{
    Array1, Array2, Array3, Array4, Array5, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2,
    ArrayViewMut4, Axis,
};
use rand::seq::{index, SliceRandom};

use super::{rng_from_seed, SamplerRng};
use crate::{Error, Result};

/// One class of a collection: a range of rows of the image array, seen under a rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Class {
    /// Rows of the image array holding this class's images.
    range: Range<usize>,
    /// Counter-clockwise quarter turns applied to every image (0..4).
    quarter_turns: u8,
}

/// Labelled images: one contiguous `[n_images, H, W]` array plus the rows of each class.
///
/// Cloning is cheap: the image array is shared (reference-counted), so the
/// collections of a train/validation/test split all point at the same memory.
#[derive(Clone, Debug)]
pub struct ImageCollection {
    images: Arc<Array3<f32>>,
    classes: Vec<Class>,
}

impl ImageCollection {
    /// A collection from an image array and the row range of each class.
    ///
    /// Errors with [`Error::Config`] when a range is empty or reaches past the
    /// last image. Ranges may appear in any order (and may even overlap).
    pub fn new(images: Array3<f32>, class_ranges: Vec<Range<usize>>) -> Result<Self> {
        Self::from_shared(Arc::new(images), class_ranges)
    }

    /// Like [`new`](Self::new), for an image array that is already shared.
    pub fn from_shared(images: Arc<Array3<f32>>, class_ranges: Vec<Range<usize>>) -> Result<Self> {
        // Keep the promise of one contiguous, row-major array.
        let images = if images.is_standard_layout() {
            images
        } else {
            Arc::new(images.as_standard_layout().into_owned())
        };
        let n = images.len_of(Axis(0));
        for (c, range) in class_ranges.iter().enumerate() {
            if range.start >= range.end || range.end > n {
                return Err(Error::Config(format!(
                    "class {c} has image range {range:?}, which is empty or reaches past \
                     the {n} images of the collection"
                )));
            }
        }
        let classes = class_ranges
            .into_iter()
            .map(|range| Class {
                range,
                quarter_turns: 0,
            })
            .collect();
        Ok(ImageCollection { images, classes })
    }

    /// A collection whose classes are consecutive blocks of rows with the given sizes
    /// (class 0 = the first `sizes[0]` images, and so on).
    ///
    /// Errors with [`Error::Config`] when a size is zero or the sizes do not add up
    /// to the number of images.
    pub fn from_class_sizes(images: Array3<f32>, sizes: &[usize]) -> Result<Self> {
        let n = images.len_of(Axis(0));
        let total = sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s));
        if total != Some(n) {
            return Err(Error::Config(format!(
                "class sizes add up to {}, but the collection has {n} images",
                total.map_or_else(|| "more than usize::MAX".to_string(), |t| t.to_string())
            )));
        }
        let mut start = 0;
        let ranges = sizes
            .iter()
            .map(|&s| {
                let range = start..start + s;
                start += s;
                range
            })
            .collect();
        Self::new(images, ranges)
    }

    /// Number of classes (rotated copies count as classes of their own).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Number of images over all classes (rotated copies counted separately).
    pub fn num_images(&self) -> usize {
        self.classes.iter().map(|c| c.range.len()).sum()
    }

    /// Height and width of every image.
    pub fn image_shape(&self) -> (usize, usize) {
        let (_, h, w) = self.images.dim();
        (h, w)
    }

    /// The whole stored image array `[n_stored, H, W]`, shared by all classes (unrotated).
    pub fn images(&self) -> ArrayView3<'_, f32> {
        self.images.view()
    }

    /// The shared image array itself.
    pub fn shared_images(&self) -> &Arc<Array3<f32>> {
        &self.images
    }

    /// Number of images in class `class`, or `None` if there is no such class.
    pub fn class_len(&self, class: usize) -> Option<usize> {
        self.classes.get(class).map(|c| c.range.len())
    }

    /// Rows of [`images`](Self::images) holding class `class`, or `None` if there is no such class.
    pub fn class_range(&self, class: usize) -> Option<Range<usize>> {
        self.classes.get(class).map(|c| c.range.clone())
    }

    /// Counter-clockwise quarter turns (0 to 3) applied to class `class`'s images.
    pub fn class_rotation(&self, class: usize) -> Option<u8> {
        self.classes.get(class).map(|c| c.quarter_turns)
    }

    /// Size of the smallest class (0 for a collection without classes).
    pub fn min_class_len(&self) -> usize {
        self.classes
            .iter()
            .map(|c| c.range.len())
            .min()
            .unwrap_or(0)
    }

    /// Image `index` of class `class` as seen in episodes (rotation applied),
    /// or `None` if either index is out of range.
    pub fn image(&self, class: usize, index: usize) -> Option<Array2<f32>> {
        let c = self.classes.get(class)?;
        if index >= c.range.len() {
            return None;
        }
        let (h, w) = self.image_shape();
        let mut out = Array2::zeros((h, w));
        self.copy_image(c, index, out.view_mut());
        Some(out)
    }

    /// A collection of the given classes, in the given order (they become classes
    /// `0..classes.len()`). The image array is shared, not copied.
    ///
    /// Errors with [`Error::Config`] for a class index out of range.
    pub fn subset(&self, classes: &[usize]) -> Result<Self> {
        let picked = classes
            .iter()
            .map(|&c| {
                self.classes.get(c).cloned().ok_or_else(|| {
                    Error::Config(format!(
                        "class {c} does not exist (the collection has {} classes)",
                        self.classes.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ImageCollection {
            images: Arc::clone(&self.images),
            classes: picked,
        })
    }

    /// Class augmentation with rotations, as in MAML: every class is followed by
    /// copies rotated by 90°, 180° and 270° counter-clockwise, each a class of its own.
    ///
    /// The result has `4 × num_classes` classes, ordered by rotation: class
    /// `c + r × num_classes` is class `c` turned `r` quarter turns (like
    /// `numpy.rot90(image, r)`). Rotations are applied when images are copied into
    /// episodes, so no memory is added. Errors with [`Error::Config`] for
    /// non-square images.
    pub fn with_rotations(&self) -> Result<Self> {
        let (h, w) = self.image_shape();
        if h != w {
            return Err(Error::Config(format!(
                "rotation augmentation needs square images, these are {h}x{w}"
            )));
        }
        let classes = (0..4u8)
            .flat_map(|r| {
                self.classes.iter().map(move |c| Class {
                    range: c.range.clone(),
                    quarter_turns: (c.quarter_turns + r) % 4,
                })
            })
            .collect();
        Ok(ImageCollection {
            images: Arc::clone(&self.images),
            classes,
        })
    }

    /// Copies image `index` of class `c`, rotated, into `out` (shape `[H, W]`).
    fn copy_image(&self, c: &Class, index: usize, mut out: ArrayViewMut2<'_, f32>) {
        let src: ArrayView2<'_, f32> = self.images.index_axis(Axis(0), c.range.start + index);
        // The rotations of numpy.rot90 (counter-clockwise), as zero-copy views.
        let view = match c.quarter_turns {
            1 => {
                // out[i][j] = src[j][W-1-i]
                let mut v = src.reversed_axes();
                v.invert_axis(Axis(0));
                v
            }
            2 => {
                // out[i][j] = src[H-1-i][W-1-j]
                let mut v = src;
                v.invert_axis(Axis(0));
                v.invert_axis(Axis(1));
                v
            }
            3 => {
                // out[i][j] = src[H-1-j][i]
                let mut v = src.reversed_axes();
                v.invert_axis(Axis(1));
                v
            }
            _ => src,
        };
        out.assign(&view);
    }
}

/// The shape of a task: `ways` classes (`N`), `shots` support (`K`) and `queries`
/// query (`Q`) examples per class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EpisodeSpec {
    /// Number of classes per task (`N`).
    pub ways: usize,
    /// Support examples per class (`K`).
    pub shots: usize,
    /// Query examples per class (`Q`), at least one: a task without a query set has
    /// no meta-loss.
    pub queries: usize,
}

impl EpisodeSpec {
    /// An `N`-way `K`-shot task with `Q` query examples per class.
    pub fn new(ways: usize, shots: usize, queries: usize) -> Self {
        EpisodeSpec {
            ways,
            shots,
            queries,
        }
    }

    /// Checks that tasks of this shape can be drawn from `collection`.
    ///
    /// Errors with [`Error::Config`] naming the values when `ways`, `shots` or `queries`
    /// is zero, `ways` exceeds the number of classes, or `shots + queries` exceeds the
    /// size of the smallest class.
    pub fn validate(&self, collection: &ImageCollection) -> Result<()> {
        let EpisodeSpec {
            ways,
            shots,
            queries,
        } = *self;
        if ways == 0 || shots == 0 || queries == 0 {
            return Err(Error::Config(format!(
                "episodes need at least 1 way, 1 shot and 1 query per class, got ways = \
                 {ways}, shots = {shots}, queries = {queries} (a task without a query set \
                 has no meta-loss)"
            )));
        }
        let classes = collection.num_classes();
        if ways > classes {
            return Err(Error::Config(format!(
                "ways = {ways} exceeds the number of classes in the collection ({classes})"
            )));
        }
        let smallest = collection.min_class_len();
        if shots.checked_add(queries).is_none_or(|n| n > smallest) {
            return Err(Error::Config(format!(
                "shots + queries = {shots} + {queries} exceeds the number of examples in \
                 the smallest class ({smallest})"
            )));
        }
        Ok(())
    }
}

/// One N-way K-shot task.
#[derive(Clone, Debug, PartialEq)]
pub struct Episode {
    /// Support images, shape `[N*K, 1, H, W]`, grouped by class.
    pub xs: Array4<f32>,
    /// Support labels in `0..N`, shape `[N*K]`.
    pub ys: Array1<usize>,
    /// Query images, shape `[N*Q, 1, H, W]`, grouped by class in the same order.
    pub xq: Array4<f32>,
    /// Query labels, shape `[N*Q]`.
    pub yq: Array1<usize>,
    /// The collection class behind each label: `classes[label]`, length `N`.
    pub classes: Vec<usize>,
}

/// A meta-batch of `T` episodes, stacked along dimension 0.
#[derive(Clone, Debug, PartialEq)]
pub struct EpisodeBatch {
    /// Support images, shape `[T, N*K, 1, H, W]`.
    pub xs: Array5<f32>,
    /// Support labels, shape `[T, N*K]`.
    pub ys: Array2<usize>,
    /// Query images, shape `[T, N*Q, 1, H, W]`.
    pub xq: Array5<f32>,
    /// Query labels, shape `[T, N*Q]`.
    pub yq: Array2<usize>,
    /// The collection class behind each label, shape `[T, N]`.
    pub classes: Array2<usize>,
}

impl EpisodeBatch {
    /// Number of tasks `T`.
    pub fn len(&self) -> usize {
        self.xs.len_of(Axis(0))
    }

    /// Whether the batch holds no task.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Task `t` of the batch (a copy), or `None` when `t >= T`.
    pub fn episode(&self, t: usize) -> Option<Episode> {
        (t < self.len()).then(|| Episode {
            xs: self.xs.index_axis(Axis(0), t).to_owned(),
            ys: self.ys.row(t).to_owned(),
            xq: self.xq.index_axis(Axis(0), t).to_owned(),
            yq: self.yq.row(t).to_owned(),
            classes: self.classes.row(t).to_vec(),
        })
    }
}

/// What one task is made of, drawn before any pixel is copied.
struct TaskPlan {
    /// Collection class of each sampled position `p` (distinct).
    classes: Vec<usize>,
    /// Label of each sampled position (a permutation of `0..N`).
    labels: Vec<usize>,
    /// For each position: `K + Q` distinct image indices within its class
    /// (the first `K` for support, the rest for query).
    examples: Vec<Vec<usize>>,
}

/// Draws seeded N-way K-shot episodes from an [`ImageCollection`].
///
/// Classes are drawn without replacement, examples within a class without
/// replacement, and labels are randomly permuted per task. The same seed gives
/// the same sequence of episodes, whatever the number of threads.
#[derive(Clone, Debug)]
pub struct EpisodeSampler<'a> {
    collection: &'a ImageCollection,
    spec: EpisodeSpec,
    rng: SamplerRng,
}

impl<'a> EpisodeSampler<'a> {
    /// A sampler of `spec`-shaped tasks from `collection`, seeded with `seed`.
    ///
    /// Errors with [`Error::Config`] when the tasks cannot be drawn (see
    /// [`EpisodeSpec::validate`]).
    pub fn new(collection: &'a ImageCollection, spec: EpisodeSpec, seed: u64) -> Result<Self> {
        Self::with_rng(collection, spec, rng_from_seed(seed))
    }

    /// Like [`new`](Self::new), with a caller-provided random number generator.
    pub fn with_rng(
        collection: &'a ImageCollection,
        spec: EpisodeSpec,
        rng: SamplerRng,
    ) -> Result<Self> {
        spec.validate(collection)?;
        Ok(EpisodeSampler {
            collection,
            spec,
            rng,
        })
    }

    /// The task shape.
    pub fn spec(&self) -> EpisodeSpec {
        self.spec
    }

    /// The collection episodes are drawn from.
    pub fn collection(&self) -> &'a ImageCollection {
        self.collection
    }

    /// The random number generator's current state: saved in a checkpoint, it lets
    /// [`with_rng`](Self::with_rng) continue with exactly the episodes this sampler would
    /// draw next.
    pub fn rng(&self) -> &SamplerRng {
        &self.rng
    }

    /// Draws the next episode.
    pub fn sample(&mut self) -> Episode {
        let plan = self.plan();
        let EpisodeSpec {
            ways,
            shots,
            queries,
        } = self.spec;
        let (h, w) = self.collection.image_shape();
        let mut episode = Episode {
            xs: Array4::zeros((ways * shots, 1, h, w)),
            ys: Array1::zeros(ways * shots),
            xq: Array4::zeros((ways * queries, 1, h, w)),
            yq: Array1::zeros(ways * queries),
            classes: classes_by_label(&plan),
        };
        self.fill(
            &plan,
            episode.xs.view_mut(),
            episode.ys.view_mut(),
            episode.xq.view_mut(),
            episode.yq.view_mut(),
        );
        episode
    }

    /// Draws the next `tasks` episodes as one stacked batch.
    ///
    /// Gives the same tasks as `tasks` calls of [`sample`](Self::sample); the pixels
    /// are copied in parallel. Errors with [`Error::Config`] when `tasks` is zero or
    /// the batch would be too large to allocate.
    pub fn sample_batch(&mut self, tasks: usize) -> Result<EpisodeBatch> {
        if tasks == 0 {
            return Err(Error::Config(
                "an episode meta-batch needs at least one task, got 0".into(),
            ));
        }
        let EpisodeSpec {
            ways,
            shots,
            queries,
        } = self.spec;
        let (h, w) = self.collection.image_shape();
        let too_big = || {
            Error::Config(format!(
                "a batch of {tasks} tasks of {ways} ways x ({shots} + {queries}) examples \
                 of {h}x{w} pixels is too large"
            ))
        };
        let largest = [tasks, ways, shots.max(queries), h, w]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        match largest {
            Some(n) if n <= isize::MAX as usize / std::mem::size_of::<f32>() => {}
            _ => return Err(too_big()),
        }

        // Draw every plan sequentially (reproducible), then copy pixels in parallel.
        let plans: Vec<TaskPlan> = (0..tasks).map(|_| self.plan()).collect();
        let mut batch = EpisodeBatch {
            xs: Array5::zeros((tasks, ways * shots, 1, h, w)),
            ys: Array2::zeros((tasks, ways * shots)),
            xq: Array5::zeros((tasks, ways * queries, 1, h, w)),
            yq: Array2::zeros((tasks, ways * queries)),
            classes: Array2::zeros((tasks, ways)),
        };
        for (mut row, plan) in batch.classes.outer_iter_mut().zip(&plans) {
            row.assign(&Array1::from(classes_by_label(plan)));
        }
        batch
            .xs
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(batch.ys.axis_iter_mut(Axis(0)).into_par_iter())
            .zip(batch.xq.axis_iter_mut(Axis(0)).into_par_iter())
            .zip(batch.yq.axis_iter_mut(Axis(0)).into_par_iter())
            .zip(plans.par_iter())
            .for_each(|((((xs, ys), xq), yq), plan)| self.fill(plan, xs, ys, xq, yq));
        Ok(batch)
    }

    /// Draws which classes, labels and images make up the next task.
    fn plan(&mut self) -> TaskPlan {
        let EpisodeSpec {
            ways,
            shots,
            queries,
        } = self.spec;
        let rng = &mut self.rng;
        let classes = index::sample(rng, self.collection.num_classes(), ways).into_vec();
        let mut labels: Vec<usize> = (0..ways).collect();
        labels.shuffle(rng);
        let examples = classes
            .iter()
            .map(|&c| {
                let len = self.collection.classes[c].range.len();
                index::sample(rng, len, shots + queries).into_vec()
            })
            .collect();
        TaskPlan {
            classes,
            labels,
            examples,
        }
    }

    /// Copies the images and labels of `plan` into one task's arrays.
    fn fill(
        &self,
        plan: &TaskPlan,
        mut xs: ArrayViewMut4<'_, f32>,
        mut ys: ArrayViewMut1<'_, usize>,
        mut xq: ArrayViewMut4<'_, f32>,
        mut yq: ArrayViewMut1<'_, usize>,
    ) {
        let (k, q) = (self.spec.shots, self.spec.queries);
        for (p, (&c, examples)) in plan.classes.iter().zip(&plan.examples).enumerate() {
            let class = &self.collection.classes[c];
            let label = plan.labels[p];
            let (support, query) = examples.split_at(k);
            for (j, &e) in support.iter().enumerate() {
                let row = p * k + j;
                let mut image = xs.index_axis_mut(Axis(0), row);
                self.collection
                    .copy_image(class, e, image.index_axis_mut(Axis(0), 0));
                ys[row] = label;
            }
            for (j, &e) in query.iter().enumerate() {
                let row = p * q + j;
                let mut image = xq.index_axis_mut(Axis(0), row);
                self.collection
                    .copy_image(class, e, image.index_axis_mut(Axis(0), 0));
                yq[row] = label;
            }
        }
    }
}

/// `classes[label]`: the collection class behind each label of a plan.
fn classes_by_label(plan: &TaskPlan) -> Vec<usize> {
    let mut out = vec![0; plan.classes.len()];
    for (&c, &label) in plan.classes.iter().zip(&plan.labels) {
        out[label] = c;
    }
    out
}
