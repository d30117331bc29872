//! Sinusoid regression tasks, as in the MAML paper (Finn et al., 2017, section 5.1).
//!
//! Each task is a sine wave `y = A·sin(x − φ)` with amplitude `A ~ U[0.1, 5]` and
//! phase `φ ~ U[0, π]`; inputs are drawn from `x ~ U[−5, 5]`. A task comes with
//! `K` support points (to adapt on) and `Q` query points (to evaluate the adapted
//! model on). All arrays have a trailing feature dimension of 1, so `x` and `y`
//! are column vectors ready for a dense layer.
//!
//! # Example
//!
//! ```
//! use metagrad::data::SinusoidSampler;
//!
//! let mut sampler = SinusoidSampler::new(10, 10, 0)?; // K = 10, Q = 10, seed 0
//! let task = sampler.sample_task();
//! assert_eq!(task.x_support.shape(), &[10, 1]);
//! // The targets are the true function at the inputs.
//! let x = task.x_query[[3, 0]];
//! assert!((task.y_query[[3, 0]] - task.eval(x)).abs() < 1e-6);
//!
//! // A meta-batch of 25 tasks: dimension 0 is the task.
//! let batch = sampler.sample_batch(25)?;
//! assert_eq!(batch.xs.shape(), &[25, 10, 1]);
//! assert_eq!(batch.amplitudes.len(), 25);
//!
//! // The true curve on a grid, e.g. for a plot.
//! let (grid_x, grid_y) = task.curve(100);
//! assert_eq!(grid_x.shape(), &[100, 1]);
//! assert_eq!(grid_y.shape(), &[100, 1]);
//! # Ok::<(), metagrad::Error>(())
//! ```

use ndarray::{Array1, Array2, Array3, Axis};
use rand::distributions::{Distribution, Uniform};
use rand::Rng as _;

use super::{rng_from_seed, SamplerRng};
use crate::{Error, Result};

/// The ranges tasks are drawn from; [`Default`] gives the MAML paper's values.
#[derive(Clone, Debug, PartialEq)]
pub struct SinusoidConfig {
    /// Amplitude range `[low, high]` (MAML: `[0.1, 5.0]`).
    pub amplitude: (f32, f32),
    /// Phase range `[low, high]` in radians (MAML: `[0, π]`).
    pub phase: (f32, f32),
    /// Input range `[low, high]` (MAML: `[−5, 5]`).
    pub x_range: (f32, f32),
}

impl Default for SinusoidConfig {
    fn default() -> Self {
        SinusoidConfig {
            amplitude: (0.1, 5.0),
            phase: (0.0, std::f32::consts::PI),
            x_range: (-5.0, 5.0),
        }
    }
}

impl SinusoidConfig {
    /// Checks that every range is finite with `low <= high`.
    pub fn validate(&self) -> Result<()> {
        for (name, (low, high)) in [
            ("amplitude", self.amplitude),
            ("phase", self.phase),
            ("x_range", self.x_range),
        ] {
            if !(low.is_finite() && high.is_finite() && low <= high) {
                return Err(Error::Config(format!(
                    "sinusoid {name} range must be finite with low <= high, got [{low}, {high}]"
                )));
            }
        }
        Ok(())
    }
}

/// One sine-wave regression task with its support and query points.
#[derive(Clone, Debug, PartialEq)]
pub struct SinusoidTask {
    /// The amplitude `A`.
    pub amplitude: f32,
    /// The phase `φ`, in radians.
    pub phase: f32,
    /// Support inputs, shape `[K, 1]`.
    pub x_support: Array2<f32>,
    /// Support targets `A·sin(x − φ)`, shape `[K, 1]`.
    pub y_support: Array2<f32>,
    /// Query inputs, shape `[Q, 1]`.
    pub x_query: Array2<f32>,
    /// Query targets, shape `[Q, 1]`.
    pub y_query: Array2<f32>,
}

impl SinusoidTask {
    /// Draws a task from `config` using `rng`: `k` support and `q` query points.
    ///
    /// `config` is assumed valid (see [`SinusoidConfig::validate`]); an invalid
    /// range is clamped to its lower end instead of panicking.
    pub fn sample(rng: &mut SamplerRng, config: &SinusoidConfig, k: usize, q: usize) -> Self {
        let amplitude = uniform(rng, config.amplitude);
        let phase = uniform(rng, config.phase);
        let mut task = SinusoidTask {
            amplitude,
            phase,
            x_support: Array2::zeros((k, 1)),
            y_support: Array2::zeros((k, 1)),
            x_query: Array2::zeros((q, 1)),
            y_query: Array2::zeros((q, 1)),
        };
        task.x_support
            .mapv_inplace(|_| uniform(rng, config.x_range));
        task.x_query.mapv_inplace(|_| uniform(rng, config.x_range));
        task.y_support = task.eval_array(&task.x_support);
        task.y_query = task.eval_array(&task.x_query);
        task
    }

    /// The true function `A·sin(x − φ)` at one point.
    pub fn eval(&self, x: f32) -> f32 {
        self.amplitude * (x - self.phase).sin()
    }

    /// The true function applied elementwise to an array of inputs (any shape `[n, 1]` works).
    pub fn eval_array(&self, x: &Array2<f32>) -> Array2<f32> {
        x.mapv(|v| self.eval(v))
    }

    /// The true curve on `n` evenly spaced points of the MAML input range `[−5, 5]`,
    /// as `(x, y)`, both of shape `[n, 1]`; handy for plots.
    pub fn curve(&self, n: usize) -> (Array2<f32>, Array2<f32>) {
        self.curve_on(n, (-5.0, 5.0))
    }

    /// The true curve on `n` evenly spaced points of `[low, high]` (both ends included
    /// when `n >= 2`), as `(x, y)`, both of shape `[n, 1]`.
    pub fn curve_on(&self, n: usize, (low, high): (f32, f32)) -> (Array2<f32>, Array2<f32>) {
        let x = Array1::linspace(low, high, n).insert_axis(Axis(1));
        let y = self.eval_array(&x);
        (x, y)
    }
}

/// A meta-batch of `T` sinusoid tasks, stacked along dimension 0.
#[derive(Clone, Debug, PartialEq)]
pub struct SinusoidBatch {
    /// Support inputs, shape `[T, K, 1]`.
    pub xs: Array3<f32>,
    /// Support targets, shape `[T, K, 1]`.
    pub ys: Array3<f32>,
    /// Query inputs, shape `[T, Q, 1]`.
    pub xq: Array3<f32>,
    /// Query targets, shape `[T, Q, 1]`.
    pub yq: Array3<f32>,
    /// Amplitude of each task, shape `[T]`.
    pub amplitudes: Array1<f32>,
    /// Phase of each task, shape `[T]`.
    pub phases: Array1<f32>,
}

impl SinusoidBatch {
    /// Stacks tasks into a batch. All tasks must have the same `K` and `Q`
    /// (otherwise [`Error::Config`]); an empty slice gives an empty batch with `K = Q = 0`.
    pub fn from_tasks(tasks: &[SinusoidTask]) -> Result<Self> {
        let (k, q) = tasks
            .first()
            .map_or((0, 0), |t| (t.x_support.nrows(), t.x_query.nrows()));
        let t = tasks.len();
        let mut batch = SinusoidBatch {
            xs: Array3::zeros((t, k, 1)),
            ys: Array3::zeros((t, k, 1)),
            xq: Array3::zeros((t, q, 1)),
            yq: Array3::zeros((t, q, 1)),
            amplitudes: Array1::zeros(t),
            phases: Array1::zeros(t),
        };
        for (i, task) in tasks.iter().enumerate() {
            let shapes = [
                &task.x_support,
                &task.y_support,
                &task.x_query,
                &task.y_query,
            ]
            .map(|a| a.dim());
            if shapes != [(k, 1), (k, 1), (q, 1), (q, 1)] {
                return Err(Error::Config(format!(
                    "sinusoid task {i} has support/query shapes {shapes:?}, \
                     expected K = {k} and Q = {q} like task 0"
                )));
            }
            batch.xs.index_axis_mut(Axis(0), i).assign(&task.x_support);
            batch.ys.index_axis_mut(Axis(0), i).assign(&task.y_support);
            batch.xq.index_axis_mut(Axis(0), i).assign(&task.x_query);
            batch.yq.index_axis_mut(Axis(0), i).assign(&task.y_query);
            batch.amplitudes[i] = task.amplitude;
            batch.phases[i] = task.phase;
        }
        Ok(batch)
    }

    /// Number of tasks `T`.
    pub fn len(&self) -> usize {
        self.xs.len_of(Axis(0))
    }

    /// Whether the batch holds no task.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Task `i` of the batch (a copy), or `None` when `i >= T`.
    pub fn task(&self, i: usize) -> Option<SinusoidTask> {
        (i < self.len()).then(|| SinusoidTask {
            amplitude: self.amplitudes[i],
            phase: self.phases[i],
            x_support: self.xs.index_axis(Axis(0), i).to_owned(),
            y_support: self.ys.index_axis(Axis(0), i).to_owned(),
            x_query: self.xq.index_axis(Axis(0), i).to_owned(),
            y_query: self.yq.index_axis(Axis(0), i).to_owned(),
        })
    }
}

/// A seeded source of sinusoid tasks with fixed `K` (support) and `Q` (query) sizes.
///
/// The same seed always yields the same sequence of tasks and batches. The generator's
/// state ([`rng`](Self::rng)) is all a sampler remembers between draws, so saving it in a
/// [`Checkpoint`](crate::checkpoint::Checkpoint) and restoring it with
/// [`with_rng`](Self::with_rng) or [`set_rng`](Self::set_rng) continues with exactly the
/// tasks an uninterrupted run would draw:
///
/// ```
/// use metagrad::data::{SinusoidConfig, SinusoidSampler};
///
/// let mut sampler = SinusoidSampler::new(5, 5, 0)?;
/// sampler.sample_batch(25)?;
/// let saved = sampler.rng().clone(); // e.g. Checkpoint::capture(&learner, &opt, sampler.rng())
///
/// let mut resumed = SinusoidSampler::with_rng(SinusoidConfig::default(), 5, 5, saved)?;
/// assert_eq!(resumed.sample_batch(25)?, sampler.sample_batch(25)?);
/// # Ok::<(), metagrad::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SinusoidSampler {
    config: SinusoidConfig,
    k_support: usize,
    k_query: usize,
    rng: SamplerRng,
}

impl SinusoidSampler {
    /// A sampler with the MAML ranges, `k_support` support and `k_query` query points per task.
    ///
    /// Errors with [`Error::Config`] when either count is zero.
    pub fn new(k_support: usize, k_query: usize, seed: u64) -> Result<Self> {
        Self::with_config(SinusoidConfig::default(), k_support, k_query, seed)
    }

    /// A sampler with custom ranges. Errors with [`Error::Config`] for an invalid
    /// range or a zero count.
    pub fn with_config(
        config: SinusoidConfig,
        k_support: usize,
        k_query: usize,
        seed: u64,
    ) -> Result<Self> {
        Self::with_rng(config, k_support, k_query, rng_from_seed(seed))
    }

    /// A sampler that continues from the generator state `rng`, e.g. one saved with
    /// [`rng`](Self::rng) in a [`Checkpoint`](crate::checkpoint::Checkpoint): with the
    /// same `config`, `k_support` and `k_query` it draws exactly the tasks the saved
    /// sampler would have drawn next. Errors as [`with_config`](Self::with_config).
    pub fn with_rng(
        config: SinusoidConfig,
        k_support: usize,
        k_query: usize,
        rng: SamplerRng,
    ) -> Result<Self> {
        config.validate()?;
        if k_support == 0 || k_query == 0 {
            return Err(Error::Config(format!(
                "sinusoid tasks need at least one support and one query point, \
                 got K = {k_support}, Q = {k_query}"
            )));
        }
        Ok(SinusoidSampler {
            config,
            k_support,
            k_query,
            rng,
        })
    }

    /// The state of the sampler's random number generator: what to store in a
    /// [`Checkpoint`](crate::checkpoint::Checkpoint) so that a resumed run draws the
    /// same tasks.
    pub fn rng(&self) -> &SamplerRng {
        &self.rng
    }

    /// Replaces the generator state, e.g. with one restored from a
    /// [`Checkpoint`](crate::checkpoint::Checkpoint); the next draws are those of the
    /// sampler the state was saved from (given the same config, `K` and `Q`).
    pub fn set_rng(&mut self, rng: SamplerRng) {
        self.rng = rng;
    }

    /// The ranges tasks are drawn from.
    pub fn config(&self) -> &SinusoidConfig {
        &self.config
    }

    /// Number of support points per task (`K`).
    pub fn k_support(&self) -> usize {
        self.k_support
    }

    /// Number of query points per task (`Q`).
    pub fn k_query(&self) -> usize {
        self.k_query
    }

    /// Draws the next task.
    pub fn sample_task(&mut self) -> SinusoidTask {
        SinusoidTask::sample(&mut self.rng, &self.config, self.k_support, self.k_query)
    }

    /// Draws the next `tasks` tasks as one stacked batch (`[T, K, 1]` arrays).
    ///
    /// Equivalent to stacking `tasks` calls of [`sample_task`](Self::sample_task).
    /// Errors with [`Error::Config`] when `tasks` is zero.
    pub fn sample_batch(&mut self, tasks: usize) -> Result<SinusoidBatch> {
        if tasks == 0 {
            return Err(Error::Config(
                "a sinusoid meta-batch needs at least one task, got 0".into(),
            ));
        }
        let list: Vec<SinusoidTask> = (0..tasks).map(|_| self.sample_task()).collect();
        SinusoidBatch::from_tasks(&list)
    }
}

/// A draw from `U[low, high]`; a degenerate (or invalid) range yields `low`.
fn uniform(rng: &mut SamplerRng, (low, high): (f32, f32)) -> f32 {
    if low < high {
        Uniform::new_inclusive(low, high).sample(rng)
    } else {
        // Keep the RNG stream aligned with the non-degenerate case.
        let _: f32 = rng.gen();
        low
    }
}
