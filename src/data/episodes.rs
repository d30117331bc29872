//! N-way K-shot Q-query episodes over a labelled [`Collection`] of examples of any shape.
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
//! An example of shape `S` (`[C, H, W]` or `[D]`) makes support images `[N*K, ...S]`.
//!
//! Transforms (normalisation, augmentation) are off by default; see
//! [`EpisodeSampler::with_transforms`] and the [`transform`](super::transform) module.
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

use ndarray::{Array1, Array2, ArrayD, ArrayViewMut1, Axis, IxDyn};
use rand::seq::{index, SliceRandom};
use rand::Rng;
use rand::SeedableRng;
use rayon::prelude::*;

use super::collection::Collection;
use super::transform::Transforms;
use super::{rng_from_seed, SamplerRng};
use crate::{Error, Result};

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
    pub fn validate(&self, collection: &Collection) -> Result<()> {
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
        let (class, smallest) = collection.smallest_class().unwrap_or((0, 0));
        if shots.checked_add(queries).is_none_or(|n| n > smallest) {
            return Err(Error::Config(format!(
                "shots + queries = {shots} + {queries} exceeds the number of examples in \
                 the smallest class ({smallest}, class {class}: {})",
                collection.class_name(class).unwrap_or_default()
            )));
        }
        Ok(())
    }
}

/// One N-way K-shot task.
#[derive(Clone, Debug, PartialEq)]
pub struct Episode {
    /// Support examples, shape `[N*K, ...S]` (images: `[N*K, C, H, W]`), grouped by class.
    pub xs: ArrayD<f32>,
    /// Support labels in `0..N`, shape `[N*K]`.
    pub ys: Array1<usize>,
    /// Query examples, shape `[N*Q, ...S]`, grouped by class in the same order.
    pub xq: ArrayD<f32>,
    /// Query labels, shape `[N*Q]`.
    pub yq: Array1<usize>,
    /// The collection class behind each label: `classes[label]`, length `N`.
    pub classes: Vec<usize>,
}

/// A meta-batch of `T` episodes, stacked along dimension 0.
#[derive(Clone, Debug, PartialEq)]
pub struct EpisodeBatch {
    /// Support examples, shape `[T, N*K, ...S]`.
    pub xs: ArrayD<f32>,
    /// Support labels, shape `[T, N*K]`.
    pub ys: Array2<usize>,
    /// Query examples, shape `[T, N*Q, ...S]`.
    pub xq: ArrayD<f32>,
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
    /// For each position: `K + Q` distinct example indices within its class
    /// (the first `K` for support, the rest for query).
    examples: Vec<Vec<usize>>,
    /// Seed of the task's random transforms (drawn only when there are some).
    transform_seed: Option<u64>,
}

/// Draws seeded N-way K-shot episodes from a [`Collection`].
///
/// Classes are drawn without replacement, examples within a class without
/// replacement, and labels are randomly permuted per task. The same seed gives
/// the same sequence of episodes, whatever the number of threads.
#[derive(Clone, Debug)]
pub struct EpisodeSampler<'a> {
    collection: &'a Collection,
    spec: EpisodeSpec,
    rng: SamplerRng,
    transforms: Transforms,
}

impl<'a> EpisodeSampler<'a> {
    /// A sampler of `spec`-shaped tasks from `collection`, seeded with `seed`.
    ///
    /// Errors with [`Error::Config`] when the tasks cannot be drawn (see
    /// [`EpisodeSpec::validate`]).
    pub fn new(collection: &'a Collection, spec: EpisodeSpec, seed: u64) -> Result<Self> {
        Self::with_rng(collection, spec, rng_from_seed(seed))
    }

    /// Like [`new`](Self::new), with a caller-provided random number generator.
    pub fn with_rng(
        collection: &'a Collection,
        spec: EpisodeSpec,
        rng: SamplerRng,
    ) -> Result<Self> {
        spec.validate(collection)?;
        Ok(EpisodeSampler {
            collection,
            spec,
            rng,
            transforms: Transforms::default(),
        })
    }

    /// The same sampler, transforming every example it copies (see the
    /// [`transform`](super::transform) module). Random augmentation draws one seed per
    /// task from the sampler's generator, so the episodes that follow differ from those of
    /// a sampler without it; normalisation alone draws nothing.
    ///
    /// Errors with [`Error::Config`] when the transforms do not fit the examples (see
    /// [`Transforms::validate`]); the sampler is then dropped, not changed.
    pub fn with_transforms(mut self, transforms: Transforms) -> Result<Self> {
        transforms.validate(self.collection.example_shape())?;
        self.transforms = transforms;
        Ok(self)
    }

    /// The transforms applied to every example.
    pub fn transforms(&self) -> &Transforms {
        &self.transforms
    }

    /// The task shape.
    pub fn spec(&self) -> EpisodeSpec {
        self.spec
    }

    /// The collection episodes are drawn from.
    pub fn collection(&self) -> &'a Collection {
        self.collection
    }

    /// The random number generator's current state: saved in a checkpoint, it lets
    /// [`with_rng`](Self::with_rng) continue with exactly the episodes this sampler would
    /// draw next.
    pub fn rng(&self) -> &SamplerRng {
        &self.rng
    }

    /// Shape `[rows, ...S]` of a task's support (`rows = N*K`) or query (`N*Q`) set.
    fn set_shape(&self, rows: usize) -> Vec<usize> {
        let mut shape = vec![rows];
        shape.extend_from_slice(self.collection.example_shape());
        shape
    }

    /// Draws the next episode.
    pub fn sample(&mut self) -> Episode {
        let plan = self.plan();
        let EpisodeSpec {
            ways,
            shots,
            queries,
        } = self.spec;
        let mut episode = Episode {
            xs: ArrayD::zeros(IxDyn(&self.set_shape(ways * shots))),
            ys: Array1::zeros(ways * shots),
            xq: ArrayD::zeros(IxDyn(&self.set_shape(ways * queries))),
            yq: Array1::zeros(ways * queries),
            classes: classes_by_label(&plan),
        };
        self.fill(
            &plan,
            episode.xs.as_slice_mut().expect("contiguous"),
            episode.ys.view_mut(),
            episode.xq.as_slice_mut().expect("contiguous"),
            episode.yq.view_mut(),
        );
        episode
    }

    /// Draws the next `tasks` episodes as one stacked batch.
    ///
    /// Gives the same tasks as `tasks` calls of [`sample`](Self::sample); the examples
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
        let shape = self.collection.example_shape().to_vec();
        let largest = [tasks, ways, shots.max(queries)]
            .iter()
            .chain(&shape)
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        match largest {
            Some(n) if n <= isize::MAX as usize / std::mem::size_of::<f32>() => {}
            _ => {
                return Err(Error::Config(format!(
                    "a batch of {tasks} tasks of {ways} ways x ({shots} + {queries}) examples \
                     of shape {shape:?} is too large"
                )))
            }
        }

        // Draw every plan sequentially (reproducible), then copy examples in parallel.
        let plans: Vec<TaskPlan> = (0..tasks).map(|_| self.plan()).collect();
        let batch_shape = |rows: usize| {
            let mut s = vec![tasks];
            s.extend(self.set_shape(rows));
            s
        };
        let mut batch = EpisodeBatch {
            xs: ArrayD::zeros(IxDyn(&batch_shape(ways * shots))),
            ys: Array2::zeros((tasks, ways * shots)),
            xq: ArrayD::zeros(IxDyn(&batch_shape(ways * queries))),
            yq: Array2::zeros((tasks, ways * queries)),
            classes: Array2::zeros((tasks, ways)),
        };
        for (mut row, plan) in batch.classes.outer_iter_mut().zip(&plans) {
            row.assign(&Array1::from(classes_by_label(plan)));
        }
        let len = self.collection.example_len();
        let xs = batch.xs.as_slice_mut().expect("contiguous");
        let xq = batch.xq.as_slice_mut().expect("contiguous");
        xs.par_chunks_mut((ways * shots * len).max(1))
            .zip(batch.ys.axis_iter_mut(Axis(0)).into_par_iter())
            .zip(xq.par_chunks_mut((ways * queries * len).max(1)))
            .zip(batch.yq.axis_iter_mut(Axis(0)).into_par_iter())
            .zip(plans.par_iter())
            .for_each(|((((xs, ys), xq), yq), plan)| self.fill(plan, xs, ys, xq, yq));
        Ok(batch)
    }

    /// Draws which classes, labels and examples make up the next task.
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
                let len = self
                    .collection
                    .class_len(c)
                    .expect("a sampled class exists");
                index::sample(rng, len, shots + queries).into_vec()
            })
            .collect();
        // Only random transforms draw, so that other samplers keep their episodes.
        let transform_seed = self.transforms.augment.is_some().then(|| rng.gen());
        TaskPlan {
            classes,
            labels,
            examples,
            transform_seed,
        }
    }

    /// Copies the examples and labels of `plan` into one task's arrays (`xs` and `xq`
    /// flat, example after example).
    fn fill(
        &self,
        plan: &TaskPlan,
        xs: &mut [f32],
        mut ys: ArrayViewMut1<'_, usize>,
        xq: &mut [f32],
        mut yq: ArrayViewMut1<'_, usize>,
    ) {
        let (k, q) = (self.spec.shots, self.spec.queries);
        let len = self.collection.example_len();
        let shape = self.collection.example_shape();
        let mut scratch = Vec::new();
        // Example `e` of class `c` into `out`, transformed with the generator of task row `row`.
        let mut copy = |c: usize, e: usize, row: usize, out: &mut [f32]| {
            self.collection.copy_example(c, e, out);
            if !self.transforms.is_identity() {
                let mut rng = SamplerRng::seed_from_u64(plan.transform_seed.unwrap_or(0));
                rng.set_stream(row as u64);
                self.transforms.apply(out, shape, &mut rng, &mut scratch);
            }
        };
        let support_rows = plan.classes.len() * k;
        for (p, (&c, examples)) in plan.classes.iter().zip(&plan.examples).enumerate() {
            let label = plan.labels[p];
            let (support, query) = examples.split_at(k);
            for (j, &e) in support.iter().enumerate() {
                let row = p * k + j;
                copy(c, e, row, &mut xs[row * len..(row + 1) * len]);
                ys[row] = label;
            }
            for (j, &e) in query.iter().enumerate() {
                let row = p * q + j;
                copy(
                    c,
                    e,
                    support_rows + row,
                    &mut xq[row * len..(row + 1) * len],
                );
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
