//! The meta-training loop, so that users do not write it again: periodic validation on a
//! fixed set of tasks (mean and 95% interval), keeping the best model, early stopping, an
//! outer learning-rate schedule, checkpoints with a bit-for-bit resume, a CSV or
//! JSON-lines log of every step, and progress on the terminal.
//!
//! Tasks come from any [`TaskSource`]: an [`EpisodeSampler`], a [`SinusoidSampler`], or
//! a generator of your own through [`from_fn`]. The trainer owns nothing else: it drives
//! your [`MetaLearner`] and [`Optimizer`].
//!
//! ```
//! use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection};
//! use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
//! use metagrad::nn::Conv4;
//! use metagrad::train::{Metric, Trainer};
//! # let images = ndarray::Array3::from_shape_fn((60, 16, 16), |(i, r, c)| ((i * 7 + r * 3 + c) % 5) as f32);
//! # let (train, val) = (ImageCollection::from_class_sizes(images.clone(), &[6; 10])?, ImageCollection::from_class_sizes(images, &[6; 10])?);
//! # let dir = std::env::temp_dir().join(format!("metagrad-doc-train-{}", std::process::id()));
//!
//! let model = Conv4 { image_size: 16, filters: 4, ..Conv4::omniglot(5) };
//! let mut learner = MetaLearner::<f32, _>::new(model, MetaConfig::maml(1, 0.4), 0);
//! let mut opt = Optimizer::adam(1e-3);
//! let spec = EpisodeSpec::new(5, 1, 2);
//! let validation = Task::from_episodes(&EpisodeSampler::new(&val, spec, 99)?.sample_batch(20)?);
//! let mut tasks = EpisodeSampler::new(&train, spec, 1)?;
//!
//! let summary = Trainer::new(6, 2)                   // 6 meta-steps of 2 tasks
//!     .validate_every(3, validation, 1)              // 20 fixed tasks, 1 inner step
//!     .keep_best(Metric::Accuracy)                   // best.json in the directory
//!     .checkpoint_dir(&dir)                          // last.json too, for --resume
//!     .log(dir.join("log.csv"))                      // every step and validation
//!     .run(&mut learner, &mut opt, &mut tasks)?;
//! println!("best {:?} at step {:?}", summary.best, summary.best_step);
//! assert_eq!(summary.steps, 6);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), metagrad::Error>(())
//! ```
//!
//! # Resuming
//! With [`Trainer::resume`], the run continues from `last.json` in the checkpoint
//! directory: parameters, optimiser, statistics, the task source's random state, the
//! schedule's position, the best score and the patience counter, so the rest of the run
//! is bit for bit what an uninterrupted one would have done. The log keeps its history:
//! rows written after that checkpoint (by a run that was then killed) are dropped, the
//! resumed run appends, and its times continue from the last row kept. The rows kept are
//! read back exactly into [`Summary::history`], so that a curve drawn from it covers the
//! whole run. The checkpoint's configuration replaces the learner's (a note on stderr says
//! what changes), except for `parallel_iterations`, `memory`, `memory_budget` and
//! `on_non_finite`, which are this run's choice; a checkpoint taken with another
//! meta-batch size is refused.
//!
//! # Under MPI
//! Every rank runs the loop (each computes its share of every meta-batch); only the root
//! rank prints and writes files.

use crate::checkpoint::Checkpoint;
use crate::data::{EpisodeSampler, SamplerRng, SinusoidSampler};
use crate::eval::{confidence_interval, evaluate};
use crate::meta::{CgStats, MetaLearner, NonFinite, Optimizer, StepStats, Task};
use crate::nn::{Model, NormMode};
use crate::{Error, Float, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where meta-batches come from: the trainer asks for one per step, and saves and
/// restores the source's random state with its checkpoints.
pub trait TaskSource<F> {
    /// The next meta-batch of `tasks` tasks.
    ///
    /// # Errors
    /// Whatever drawing the tasks can fail with.
    fn next_batch(&mut self, tasks: usize) -> Result<Vec<Task<F>>>;
    /// The random state from which the next batches follow.
    fn rng(&self) -> SamplerRng;
    /// Continues from a saved random state.
    ///
    /// # Errors
    /// Whatever rebuilding the source can fail with.
    fn set_rng(&mut self, rng: SamplerRng) -> Result<()>;
}

impl<F: Float> TaskSource<F> for EpisodeSampler<'_> {
    fn next_batch(&mut self, tasks: usize) -> Result<Vec<Task<F>>> {
        Ok(Task::from_episodes(&self.sample_batch(tasks)?))
    }
    fn rng(&self) -> SamplerRng {
        EpisodeSampler::rng(self).clone()
    }
    fn set_rng(&mut self, rng: SamplerRng) -> Result<()> {
        let transforms = self.transforms().clone();
        *self = EpisodeSampler::with_rng(self.collection(), self.spec(), rng)?
            .with_transforms(transforms)?;
        Ok(())
    }
}

impl<F: Float> TaskSource<F> for SinusoidSampler {
    fn next_batch(&mut self, tasks: usize) -> Result<Vec<Task<F>>> {
        Ok(Task::from_sinusoid(&self.sample_batch(tasks)?))
    }
    fn rng(&self) -> SamplerRng {
        SinusoidSampler::rng(self).clone()
    }
    fn set_rng(&mut self, rng: SamplerRng) -> Result<()> {
        SinusoidSampler::set_rng(self, rng);
        Ok(())
    }
}

/// A task source from a function of a seeded generator: see [`from_fn`].
pub struct FromFn<G> {
    rng: SamplerRng,
    draw: G,
}

/// Tasks from your own generator: `draw(rng, n)` returns a meta-batch of `n` tasks,
/// drawing every random choice from `rng` (seeded with `seed`), so that a resumed run
/// continues with the same tasks.
///
/// ```
/// use metagrad::meta::{Targets, Task};
/// use metagrad::ndarray::Array2;
/// use metagrad::rand::Rng;
/// use metagrad::train::{from_fn, TaskSource};
///
/// // 2-D points of two classes around a random centre per task.
/// let mut source = from_fn(7, |rng, n| {
///     Ok((0..n)
///         .map(|_| {
///             let c: f64 = rng.gen_range(-1.0..1.0);
///             let points = |k: usize| Array2::from_shape_fn((k, 2), |(i, j)| c + (i % 2) as f64 + 0.1 * j as f64).into_dyn();
///             let labels = |k: usize| Targets::Classes((0..k).map(|i| i % 2).collect());
///             Task { support_x: points(4), support_y: labels(4), query_x: points(6), query_y: labels(6) }
///         })
///         .collect())
/// });
/// let batch: Vec<Task<f64>> = source.next_batch(3)?;
/// assert_eq!(batch.len(), 3);
/// # Ok::<(), metagrad::Error>(())
/// ```
pub fn from_fn<F, G>(seed: u64, draw: G) -> FromFn<G>
where
    G: FnMut(&mut SamplerRng, usize) -> Result<Vec<Task<F>>>,
{
    FromFn {
        rng: crate::data::rng_from_seed(seed),
        draw,
    }
}

impl<F, G> TaskSource<F> for FromFn<G>
where
    G: FnMut(&mut SamplerRng, usize) -> Result<Vec<Task<F>>>,
{
    fn next_batch(&mut self, tasks: usize) -> Result<Vec<Task<F>>> {
        (self.draw)(&mut self.rng, tasks)
    }
    fn rng(&self) -> SamplerRng {
        self.rng.clone()
    }
    fn set_rng(&mut self, rng: SamplerRng) -> Result<()> {
        self.rng = rng;
        Ok(())
    }
}

/// What "best" means for [`Trainer::keep_best`] and [`Trainer::early_stopping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// The mean validation accuracy, higher is better (classification).
    Accuracy,
    /// The mean validation loss, lower is better.
    Loss,
}

/// The outer learning rate as a function of the meta-step: `lr(step) = base · factor`,
/// with `base` the optimiser's rate when training started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub enum Schedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Multiplied by `gamma` every `every` steps.
    Step {
        /// Steps between decays.
        every: u64,
        /// The factor of each decay.
        gamma: f64,
    },
    /// Cosine annealing from the base rate to `min_lr` over the run's steps.
    Cosine {
        /// The rate at the last step.
        min_lr: f64,
    },
}

impl Schedule {
    /// The rate at `step` (0-based) of a run of `total` steps starting from `base`.
    pub fn lr(&self, base: f64, step: u64, total: u64) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((step / every.max(1)) as i32),
            Schedule::Cosine { min_lr } => {
                let t = step as f64 / total.max(1) as f64;
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A line redrawn in place on a terminal, plain lines otherwise (the default).
    #[default]
    Auto,
    /// Plain lines: every twentieth of the run and after each validation.
    Lines,
    /// Nothing.
    Off,
}

/// One validation: the mean over the fixed validation tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// The meta-step after which it ran.
    pub step: u64,
    /// Mean query accuracy (classification; a diverged task counts as 0), else `None`.
    pub accuracy: Option<f64>,
    /// Half-width of the 95% interval of the accuracy, or of the loss for regression.
    pub ci95: f64,
    /// Mean query loss over the tasks whose adaptation stayed finite.
    pub loss: f64,
    /// Tasks whose adaptation diverged.
    pub diverged: usize,
}

impl Validation {
    fn score(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Accuracy => self.accuracy,
            Metric::Loss => Some(-self.loss).filter(|v| !v.is_nan()),
        }
    }
}

/// One meta-step of a run, as the log holds it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct StepRecord {
    /// Meta-batches consumed after this step (1 for the first step of a run).
    pub step: u64,
    /// Mean query loss after adaptation (what was measured, for a skipped step).
    pub loss: f64,
    /// Mean query accuracy after adaptation (classification).
    pub accuracy: Option<f64>,
    /// Whether the meta-gradient was second order.
    pub second_order: bool,
    /// Whether the step was skipped (see `MetaConfig::on_non_finite`).
    pub skipped: bool,
    /// iMAML's conjugate gradient, the worst over the meta-batch.
    pub cg: Option<CgStats>,
    /// The outer learning rate of the step.
    pub lr: f64,
    /// Seconds of training when the step ended, from the start of the run (the time
    /// before a resume included).
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Summary {
    /// Meta-batches consumed in all (steps taken plus skipped), the resumed part included.
    pub steps: u64,
    /// Where this call started: 0, or the step of the checkpoint it resumed from.
    pub first_step: u64,
    /// Steps skipped because they were not finite (see `MetaConfig::on_non_finite`).
    pub skipped: u64,
    /// Every validation, the resumed part included.
    pub validations: Vec<Validation>,
    /// The best validation score (accuracy, or loss) and the step it came from.
    pub best: Option<f64>,
    /// The step of the best validation.
    pub best_step: Option<u64>,
    /// Whether early stopping ended the run before its last step.
    pub stopped_early: bool,
    /// The statistics of the last step.
    pub last: Option<StepStats>,
    /// Every step, in order. After a resume, the steps before it are read back (bit for
    /// bit) from the log; without a [`log`](Trainer::log) there is no such record, and
    /// the history starts at [`first_step`](Self::first_step). Under MPI only the root
    /// rank, which writes the log, reads it back.
    pub history: Vec<StepRecord>,
    /// Seconds this call spent training (validation and checkpoints included).
    pub seconds: f64,
    /// The mean training query loss over the last tenth of the run's steps (at least one;
    /// skipped steps left out), from the history: where training ended (NaN when the
    /// history has no such step).
    pub final_loss: f64,
    /// The same for the training query accuracy (classification; `None` also when the
    /// history has no step that was not skipped).
    pub final_accuracy: Option<f64>,
}

/// The trainer's own state, saved in each checkpoint's `extras` under `"trainer"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainerState {
    base_lr: f64,
    validations: Vec<Validation>,
    best: Option<f64>,
    best_step: Option<u64>,
    since_best: u64,
    /// Tasks per meta-batch (absent from checkpoints of version 0.2.0).
    #[serde(default)]
    meta_batch: Option<usize>,
}

/// A meta-training loop, configured with the builder methods and started with
/// [`Trainer::run`]. See the [module docs](self) for an example.
pub struct Trainer<F> {
    steps: u64,
    meta_batch: usize,
    validation: Vec<Task<F>>,
    validate_every: u64,
    validation_steps: usize,
    validation_mode: NormMode,
    best_by: Option<Metric>,
    patience: Option<u64>,
    schedule: Schedule,
    dir: Option<PathBuf>,
    save_every: u64,
    resume: bool,
    log: Option<PathBuf>,
    progress: Progress,
    name: String,
    last_name: String,
    best_name: String,
}

/// The checkpoint of the last step, in the checkpoint directory.
pub const LAST_CHECKPOINT: &str = "last.json";
/// The checkpoint of the best validation, in the checkpoint directory.
pub const BEST_CHECKPOINT: &str = "best.json";

impl<F: Float> Trainer<F> {
    /// A run of `steps` meta-steps of `meta_batch` tasks (counted in meta-batches drawn,
    /// skipped steps included, so that a resumed run draws the same tasks).
    pub fn new(steps: u64, meta_batch: usize) -> Self {
        Trainer {
            steps,
            meta_batch,
            validation: Vec::new(),
            validate_every: 0,
            validation_steps: 1,
            validation_mode: NormMode::Inductive,
            best_by: None,
            patience: None,
            schedule: Schedule::Constant,
            dir: None,
            save_every: 0,
            resume: false,
            log: None,
            progress: Progress::Auto,
            name: "meta-train".into(),
            last_name: LAST_CHECKPOINT.into(),
            best_name: BEST_CHECKPOINT.into(),
        }
    }

    /// Validates every `every` steps (and after the last) on the fixed `tasks`, adapting
    /// with `inner_steps` steps. Batch norm runs inductively unless
    /// [`validation_mode`](Self::validation_mode) says otherwise.
    pub fn validate_every(mut self, every: u64, tasks: Vec<Task<F>>, inner_steps: usize) -> Self {
        self.validate_every = every;
        self.validation = tasks;
        self.validation_steps = inner_steps;
        self
    }

    /// The batch-norm mode of validation (default [`NormMode::Inductive`]).
    pub fn validation_mode(mut self, mode: NormMode) -> Self {
        self.validation_mode = mode;
        self
    }

    /// Saves the best model by `metric` as `best.json` in the checkpoint directory.
    pub fn keep_best(mut self, metric: Metric) -> Self {
        self.best_by = Some(metric);
        self
    }

    /// Stops after `patience` validations without improvement of `metric`.
    pub fn early_stopping(mut self, metric: Metric, patience: u64) -> Self {
        self.best_by.get_or_insert(metric);
        self.patience = Some(patience);
        self
    }

    /// The outer learning-rate schedule (default constant).
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Writes `last.json` (every [`save_every`](Self::save_every) steps and at the end)
    /// and `best.json` here, atomically.
    pub fn checkpoint_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// The file names of the last and the best checkpoint in the checkpoint directory
    /// (default [`LAST_CHECKPOINT`] and [`BEST_CHECKPOINT`]), so that several runs can
    /// share a directory.
    pub fn checkpoint_names(mut self, last: impl Into<String>, best: impl Into<String>) -> Self {
        self.last_name = last.into();
        self.best_name = best.into();
        self
    }

    /// Steps between checkpoints of the last step (0: only at the end).
    pub fn save_every(mut self, steps: u64) -> Self {
        self.save_every = steps;
        self
    }

    /// Continues from `last.json` in the checkpoint directory when there is one (a note
    /// on stderr says when there is none, and the run starts from step 0). Without it, an
    /// existing `last.json` is overwritten by the new run, and a note says so.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// Logs every step and validation to `path`: JSON lines if it ends in `.jsonl` or
    /// `.json`, CSV otherwise.
    pub fn log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// How progress is shown (default [`Progress::Auto`]).
    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// The name that starts each progress line (default `meta-train`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    fn check(&self) -> Result<()> {
        if self.meta_batch == 0 {
            return Err(Error::Config("a meta-batch needs at least one task".into()));
        }
        if self.validate_every > 0 && self.validation.is_empty() {
            return Err(Error::Config(
                "validation every few steps needs at least one validation task".into(),
            ));
        }
        if self.best_by.is_some() && self.validate_every == 0 {
            return Err(Error::Config(
                "keeping the best model or stopping early needs validation \
                 (Trainer::validate_every)"
                    .into(),
            ));
        }
        if self.best_by == Some(Metric::Accuracy) && self.validation.iter().any(Task::is_regression)
        {
            return Err(Error::Config(
                "the best model by accuracy needs classification tasks; use Metric::Loss \
                 for regression"
                    .into(),
            ));
        }
        if self.last_name.is_empty() || self.best_name.is_empty() {
            return Err(Error::Config("checkpoint names cannot be empty".into()));
        }
        if self.resume && self.dir.is_none() {
            return Err(Error::Config(
                "resuming needs a checkpoint directory (Trainer::checkpoint_dir)".into(),
            ));
        }
        Ok(())
    }

    /// Meta-trains `learner` with `opt` on tasks from `source` (see the [module
    /// docs](self)). Returns what the run did; the learner and optimiser hold the last
    /// step's state (the best one is in `best.json`).
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration that cannot work (no validation tasks to
    /// validate on, no directory to resume from, a best model by accuracy on regression
    /// tasks, a checkpoint of another meta-batch size); whatever a step, the task source,
    /// a checkpoint or the log returns. A step's error leaves the last checkpoint as it
    /// was.
    pub fn run<M, S>(
        &self,
        learner: &mut MetaLearner<F, M>,
        opt: &mut Optimizer<F>,
        source: &mut S,
    ) -> Result<Summary>
    where
        M: Model<F> + Debug,
        S: TaskSource<F> + ?Sized,
    {
        self.check()?;
        let root = learner.comm().is_root();
        let note = |message: String| {
            if root {
                eprintln!("{}: {message}", self.name);
            }
        };
        let mut state = TrainerState {
            base_lr: opt.lr,
            validations: Vec::new(),
            best: None,
            best_step: None,
            since_best: 0,
            meta_batch: Some(self.meta_batch),
        };
        let last_path = self.dir.as_ref().map(|d| d.join(&self.last_name));
        match &last_path {
            Some(path) if self.resume && path.exists() => {
                let saved = self.restore(path, learner, opt, source, &note)?;
                // A checkpoint without the trainer's state (one the user took) continues
                // with its own optimiser's rate.
                state = saved.unwrap_or(TrainerState {
                    base_lr: opt.lr,
                    ..state
                });
                state.meta_batch = Some(self.meta_batch);
            }
            Some(path) if self.resume => note(format!(
                "no checkpoint at {}; starting from step 0",
                path.display()
            )),
            Some(path) if path.exists() => note(format!(
                "{} exists and will be overwritten by this new run (resume to continue it \
                 instead)",
                path.display()
            )),
            _ => {}
        }
        let first = learner.meta_batches();
        let (mut log, mut history, seconds_before) = match &self.log {
            Some(path) => {
                // The root rank rewrites the log: only it reads it back.
                let kept = if root {
                    Log::read(path, first)
                } else {
                    Vec::new()
                };
                let history = kept.iter().filter_map(StepRecord::from_row).collect();
                let seconds = kept
                    .iter()
                    .filter_map(|r| number(&r["seconds"]))
                    .fold(0.0, f64::max);
                let log = if root {
                    Some(Log::create(path, &kept)?)
                } else {
                    None
                };
                (log, history, seconds)
            }
            None => (None, Vec::new(), 0.0),
        };
        let mode = if root { self.progress } else { Progress::Off };
        let mut shown = Shown::new(mode, &self.name, first, self.steps);
        let save = |learner: &MetaLearner<F, M>,
                    opt: &Optimizer<F>,
                    source: &S,
                    state: &TrainerState,
                    file: &str|
         -> Result<()> {
            let (Some(dir), true) = (&self.dir, root) else {
                return Ok(());
            };
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.clone(),
                source,
            })?;
            let extras = serde_json::json!({ "trainer": state });
            Checkpoint::capture(learner, opt, &source.rng())
                .with_extras(extras)
                .save(dir.join(file))
        };

        let mut last = None;
        let mut stopped_early = false;
        let t0 = Instant::now();
        for step in first..self.steps {
            opt.lr = self.schedule.lr(state.base_lr, step, self.steps);
            let tasks = source.next_batch(self.meta_batch)?;
            let stats = learner.meta_step(&tasks, opt)?;
            last = Some(stats);
            let done = step + 1;
            let record = StepRecord {
                step: done,
                loss: stats.loss,
                accuracy: stats.accuracy,
                second_order: stats.second_order,
                skipped: stats.skipped,
                cg: stats.cg,
                lr: opt.lr,
                seconds: seconds_before + t0.elapsed().as_secs_f64(),
            };
            if let Some(log) = log.as_mut() {
                log.write(record.row())?;
            }
            history.push(record);
            shown.step(&record);
            let validate =
                self.validate_every > 0 && (done % self.validate_every == 0 || done == self.steps);
            if validate {
                let v = self.validate(learner, done)?;
                if let Some(log) = log.as_mut() {
                    log.write(v.row(seconds_before + t0.elapsed().as_secs_f64()))?;
                }
                shown.validation(&v);
                if let Some(metric) = self.best_by {
                    let better = match (v.score(metric), state.best) {
                        (Some(s), Some(b)) => s > b,
                        (Some(_), None) => true,
                        (None, _) => false,
                    };
                    if better {
                        state.best = v.score(metric);
                        state.best_step = Some(done);
                        state.since_best = 0;
                        state.validations.push(v);
                        save(learner, opt, source, &state, &self.best_name)?;
                    } else {
                        state.since_best += 1;
                        state.validations.push(v);
                    }
                } else {
                    state.validations.push(v);
                }
                if self.patience.is_some_and(|p| state.since_best >= p) && done < self.steps {
                    stopped_early = true;
                    shown.note(&format!(
                        "stopping early at step {done}: {} validations without improvement",
                        state.since_best
                    ));
                    break;
                }
            }
            if self.save_every > 0 && done % self.save_every == 0 && done < self.steps {
                save(learner, opt, source, &state, &self.last_name)?;
                shown.note(&format!("checkpoint saved at step {done}"));
            }
        }
        save(learner, opt, source, &state, &self.last_name)?;
        if let Some(path) = &last_path {
            note(format!(
                "checkpoint saved: {} (step {})",
                path.display(),
                learner.meta_batches()
            ));
        }
        // The last tenth of the run's steps, skipped ones left out.
        let tail = (learner.meta_batches() / 10).max(1) as usize;
        let mut recent: Vec<&StepRecord> = history
            .iter()
            .rev()
            .filter(|r| !r.skipped)
            .take(tail)
            .collect();
        recent.reverse();
        let final_loss = recent.iter().map(|r| r.loss).sum::<f64>() / recent.len() as f64;
        let final_accuracy = recent
            .iter()
            .map(|r| r.accuracy)
            .sum::<Option<f64>>()
            .filter(|_| !recent.is_empty())
            .map(|a| a / recent.len() as f64);
        shown.finish(
            learner.meta_batches() - first,
            learner.skipped_steps,
            first,
            final_loss,
            final_accuracy,
        );
        Ok(Summary {
            steps: learner.meta_batches(),
            first_step: first,
            skipped: learner.skipped_steps,
            best: state.best.map(|b| match self.best_by {
                Some(Metric::Loss) => -b,
                _ => b,
            }),
            best_step: state.best_step,
            validations: state.validations,
            stopped_early,
            last,
            history,
            seconds: t0.elapsed().as_secs_f64(),
            final_loss,
            final_accuracy,
        })
    }

    /// Restores the learner, optimiser and task source from the checkpoint at `path`,
    /// noting what it changes; returns the trainer's saved state, if it has one.
    fn restore<M, S>(
        &self,
        path: &Path,
        learner: &mut MetaLearner<F, M>,
        opt: &mut Optimizer<F>,
        source: &mut S,
        note: &dyn Fn(String),
    ) -> Result<Option<TrainerState>>
    where
        M: Model<F> + Debug,
        S: TaskSource<F> + ?Sized,
    {
        let checkpoint = Checkpoint::<F>::load(path)?;
        let saved: Option<TrainerState> = checkpoint
            .extras
            .get("trainer")
            .and_then(|t| serde_json::from_value(t.clone()).ok());
        if let Some(m) = saved.as_ref().and_then(|s| s.meta_batch) {
            if m != self.meta_batch {
                return Err(Error::Config(format!(
                    "{} was trained with meta-batches of {m} tasks, this run asks for {}: \
                     resume with the same size (or start a new run)",
                    path.display(),
                    self.meta_batch
                )));
            }
        }
        // Whether a non-finite step is skipped or refused is this run's choice.
        let policy: NonFinite = learner.config.on_non_finite;
        let changes: Vec<String> = checkpoint
            .config_changes(&learner.config)
            .into_iter()
            .filter(|c| !c.starts_with("on_non_finite:"))
            .collect();
        if !changes.is_empty() {
            note(format!(
                "the checkpoint's configuration replaces this run's: {}",
                changes.join(", ")
            ));
        }
        let given_lr = opt.lr;
        let (o, rng) = checkpoint.restore(learner)?;
        learner.config.on_non_finite = policy;
        *opt = o;
        source.set_rng(rng)?;
        let base_lr = saved.as_ref().map_or(opt.lr, |s| s.base_lr);
        if base_lr != given_lr {
            note(format!(
                "continuing with the checkpoint's outer learning rate {base_lr} (this run \
                 gave {given_lr})"
            ));
        }
        learner.check_ranks()?;
        note(format!(
            "resumed from {} at step {}",
            path.display(),
            learner.meta_batches()
        ));
        Ok(saved)
    }

    /// The validation tasks' mean after `step`.
    fn validate<M: Model<F>>(&self, learner: &MetaLearner<F, M>, step: u64) -> Result<Validation> {
        let (steps, mode) = (self.validation_steps, self.validation_mode);
        if self.validation.iter().all(Task::is_regression) {
            // Regression: the mean loss and its interval; a diverged task is counted.
            let mut losses = Vec::new();
            let mut diverged = 0;
            for task in &self.validation {
                match learner.evaluate_task(task, steps, mode) {
                    Ok((loss, _)) => losses.push(loss),
                    Err(Error::NonFinite { data: None, .. }) => diverged += 1,
                    Err(e) => return Err(e),
                }
            }
            let (loss, ci95) = confidence_interval(&losses);
            return Ok(Validation {
                step,
                accuracy: None,
                ci95,
                loss,
                diverged,
            });
        }
        let r = evaluate(learner, &self.validation, steps, mode, usize::MAX)?;
        Ok(Validation {
            step,
            accuracy: Some(r.mean_accuracy),
            ci95: r.ci95,
            loss: r.mean_loss,
            diverged: r.diverged,
        })
    }
}

impl StepRecord {
    /// The log's row.
    fn row(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "step", "step": self.step, "loss": finite_or_null(self.loss),
            "accuracy": self.accuracy, "second_order": self.second_order,
            "skipped": self.skipped, "cg_iterations": self.cg.map(|c| c.iterations),
            "cg_residual": self.cg.map(|c| finite_or_null(c.residual)),
            "cg_unconverged": self.cg.map(|c| c.unconverged), "lr": self.lr,
            "seconds": self.seconds,
        })
    }

    /// Reads a step row of the log back (none for a validation row).
    fn from_row(row: &serde_json::Value) -> Option<StepRecord> {
        if row["kind"] != "step" {
            return None;
        }
        let cg = match (
            row["cg_iterations"].as_u64(),
            row["cg_unconverged"].as_u64(),
        ) {
            (Some(iterations), Some(unconverged)) => Some(CgStats {
                iterations: iterations as usize,
                residual: number(&row["cg_residual"]).unwrap_or(f64::NAN),
                unconverged: unconverged as usize,
            }),
            _ => None,
        };
        Some(StepRecord {
            step: row["step"].as_u64()?,
            loss: number(&row["loss"])?,
            accuracy: number(&row["accuracy"]),
            second_order: row["second_order"].as_bool().unwrap_or(false),
            skipped: row["skipped"].as_bool().unwrap_or(false),
            cg,
            lr: number(&row["lr"]).unwrap_or(f64::NAN),
            seconds: number(&row["seconds"]).unwrap_or(0.0),
        })
    }
}

impl Validation {
    /// The log's row, at `seconds` of training.
    fn row(&self, seconds: f64) -> serde_json::Value {
        serde_json::json!({
            "kind": "validation", "step": self.step, "loss": finite_or_null(self.loss),
            "accuracy": self.accuracy, "ci95": finite_or_null(self.ci95),
            "diverged": self.diverged, "seconds": seconds,
        })
    }
}

/// A number of a log row: a JSON number, or a non-finite one written as its name.
fn number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::String(s) => s.parse().ok(),
        v => v.as_f64(),
    }
}

/// The log file: one row per step and per validation, CSV or JSON lines.
struct Log {
    path: PathBuf,
    file: std::fs::File,
    json: bool,
}

const CSV_HEADER: &str = "kind,step,loss,accuracy,ci95,diverged,second_order,skipped,\
                          cg_iterations,cg_residual,cg_unconverged,lr,seconds";

/// Whether the log at `path` is JSON lines (else CSV).
fn is_json(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    )
}

impl Log {
    /// The rows of the log at `path` that a run resumed after `first` steps keeps: those
    /// up to that step (later ones were written by a run stopped after its last
    /// checkpoint). None for a new run or a log that cannot be read. A CSV row is read by
    /// its file's header, so a log with other columns reads too.
    fn read(path: &Path, first: u64) -> Vec<serde_json::Value> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) if first > 0 => text,
            _ => return Vec::new(),
        };
        let json = is_json(path);
        let mut header: Vec<&str> = Vec::new();
        let mut rows = Vec::new();
        for line in text.lines() {
            let row = if json {
                serde_json::from_str(line).ok()
            } else if line.starts_with("kind,") {
                header = line.split(',').collect();
                None
            } else {
                let cells = header.iter().zip(line.split(','));
                Some(serde_json::Value::Object(
                    cells.map(|(k, c)| (k.to_string(), csv_cell(c))).collect(),
                ))
            };
            if let Some(row) = row.filter(|r| r["step"].as_u64().is_some_and(|s| s <= first)) {
                rows.push(row);
            }
        }
        rows
    }

    /// Creates the log at `path` with the rows `kept` (see [`read`](Self::read)).
    fn create(path: &Path, kept: &[serde_json::Value]) -> Result<Log> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::File::create(path).map_err(io)?;
        let mut log = Log {
            path: path.to_path_buf(),
            file,
            json: is_json(path),
        };
        if !log.json {
            writeln!(log.file, "{CSV_HEADER}").map_err(io)?;
        }
        for row in kept {
            log.write(row.clone())?;
        }
        Ok(log)
    }

    fn write(&mut self, row: serde_json::Value) -> Result<()> {
        let line = if self.json {
            row.to_string()
        } else {
            let cell = |k: &str| match &row[k] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            CSV_HEADER
                .split(',')
                .map(cell)
                .collect::<Vec<_>>()
                .join(",")
        };
        writeln!(self.file, "{line}").map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// A CSV cell as the JSON value it was written from: empty is null, then booleans,
/// integers and numbers (exactly: both are written shortest-round-trip), else text.
fn csv_cell(cell: &str) -> serde_json::Value {
    match cell {
        "" => serde_json::Value::Null,
        "true" => true.into(),
        "false" => false.into(),
        _ => cell
            .parse::<u64>()
            .map(Into::into)
            .or_else(|_| cell.parse::<f64>().map(|v| serde_json::json!(v)))
            .ok()
            .filter(|v| !v.is_null())
            .unwrap_or_else(|| cell.into()),
    }
}

/// JSON has no NaN: a non-finite number is written as its name.
fn finite_or_null(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::json!(v.to_string())
    }
}

/// Progress on stderr.
struct Shown {
    mode: Progress,
    terminal: bool,
    name: String,
    total: u64,
    every: u64,
    /// Sums over the steps since the last line: loss, accuracy, steps, the largest CG
    /// residual.
    window: (f64, f64, usize, Option<f64>),
    last_draw: Instant,
    start: Instant,
}

impl Shown {
    fn new(mode: Progress, name: &str, first: u64, total: u64) -> Shown {
        Shown {
            mode,
            terminal: mode == Progress::Auto && std::io::stderr().is_terminal(),
            name: name.to_string(),
            total,
            every: (total.saturating_sub(first) / 20).max(1),
            window: (0.0, 0.0, 0, None),
            last_draw: Instant::now(),
            start: Instant::now(),
        }
    }

    fn step(&mut self, r: &StepRecord) {
        if self.mode == Progress::Off {
            return;
        }
        let step = r.step;
        if !r.skipped {
            self.window.0 += r.loss;
            self.window.1 += r.accuracy.unwrap_or(f64::NAN);
            self.window.2 += 1;
        } else {
            self.note(&format!(
                "step {step} skipped: its loss or update was not finite"
            ));
        }
        if let Some(cg) = r.cg {
            self.window.3 = Some(self.window.3.map_or(cg.residual, |w| w.max(cg.residual)));
        }
        let due = if self.terminal {
            self.last_draw.elapsed().as_millis() >= 200 || step == self.total
        } else {
            step.is_multiple_of(self.every) || step == self.total
        };
        if !due {
            return;
        }
        let n = self.window.2.max(1) as f64;
        let acc = self.window.1 / n;
        let line = format!(
            "{}: step {step}/{} loss {:.4}{}{} [{:.0}s]",
            self.name,
            self.total,
            self.window.0 / n,
            if acc.is_nan() {
                String::new()
            } else {
                format!(" accuracy {:.1}%", 100.0 * acc)
            },
            self.window
                .3
                .map_or(String::new(), |r| format!(" CG residual <= {r:.2e}")),
            self.start.elapsed().as_secs_f64()
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            self.last_draw = Instant::now();
        } else {
            eprintln!("{line}");
            self.window = (0.0, 0.0, 0, None);
        }
    }

    fn validation(&mut self, v: &Validation) {
        let what = match v.accuracy {
            Some(a) => format!("accuracy {:.1}% ± {:.1}%", 100.0 * a, 100.0 * v.ci95),
            None => format!("loss {:.4} ± {:.4}", v.loss, v.ci95),
        };
        let diverged = if v.diverged > 0 {
            format!(", {} diverged", v.diverged)
        } else {
            String::new()
        };
        self.note(&format!("validation at step {}: {what}{diverged}", v.step));
    }

    fn note(&mut self, message: &str) {
        match self.mode {
            Progress::Off => {}
            _ if self.terminal => eprintln!("\r\x1b[2K{}: {message}", self.name),
            _ => eprintln!("{}: {message}", self.name),
        }
    }

    /// The last line: `steps` taken by this call after `first`, and where training ended.
    fn finish(&mut self, steps: u64, skipped: u64, first: u64, loss: f64, accuracy: Option<f64>) {
        if self.terminal {
            eprintln!();
        }
        let seconds = self.start.elapsed().as_secs_f64();
        let mut line = format!("{steps} steps in {seconds:.1}s");
        if steps > 0 {
            line.push_str(&format!(" ({:.2} ms/step)", 1e3 * seconds / steps as f64));
        }
        if !loss.is_nan() {
            line.push_str(&format!(", final loss {loss:.4}"));
        }
        if let Some(a) = accuracy {
            line.push_str(&format!(" accuracy {:.1}%", 100.0 * a));
        }
        if skipped > 0 {
            line.push_str(&format!(" ({skipped} skipped in all)"));
        }
        if first > 0 {
            line.push_str(&format!(" (resumed at step {first} of {})", self.total));
        }
        self.note(&line);
    }
}
