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
//! rows written after that checkpoint (by a run that was then killed) are dropped, and
//! the resumed run appends.
//!
//! # Under MPI
//! Every rank runs the loop (each computes its share of every meta-batch); only the root
//! rank prints and writes files.

use crate::checkpoint::Checkpoint;
use crate::data::{EpisodeSampler, SamplerRng, SinusoidSampler};
use crate::eval::{confidence_interval, evaluate};
use crate::meta::{MetaLearner, Optimizer, StepStats, Task};
use crate::nn::{Model, NormMode};
use crate::{Error, Float, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
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

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Meta-batches consumed in all (steps taken plus skipped), the resumed part included.
    pub steps: u64,
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
    /// The mean training query loss over the last tenth of this call's steps (at least
    /// one; skipped steps left out): where training ended.
    pub final_loss: f64,
    /// The same for the training query accuracy (classification).
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

    /// Steps between checkpoints of the last step (0: only at the end).
    pub fn save_every(mut self, steps: u64) -> Self {
        self.save_every = steps;
        self
    }

    /// Continues from `last.json` in the checkpoint directory when there is one.
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
    /// tasks); whatever a step, the task source, a checkpoint or the log returns. A step's
    /// error leaves the last checkpoint as it was.
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
        let mut state = TrainerState {
            base_lr: opt.lr,
            validations: Vec::new(),
            best: None,
            best_step: None,
            since_best: 0,
        };
        let last_path = self.dir.as_ref().map(|d| d.join(LAST_CHECKPOINT));
        if let Some(path) = last_path.as_ref().filter(|p| self.resume && p.exists()) {
            let checkpoint = Checkpoint::<F>::load(path)?;
            let saved: Option<TrainerState> = checkpoint
                .extras
                .get("trainer")
                .and_then(|t| serde_json::from_value(t.clone()).ok());
            let changes = checkpoint.config_changes(&learner.config);
            if root && !changes.is_empty() {
                eprintln!(
                    "{}: the checkpoint's configuration replaces this run's: {}",
                    self.name,
                    changes.join(", ")
                );
            }
            let (o, rng) = checkpoint.restore(learner)?;
            *opt = o;
            source.set_rng(rng)?;
            if let Some(s) = saved {
                state = s;
            }
            learner.check_ranks()?;
            if root {
                eprintln!(
                    "{}: resumed from {} at step {}",
                    self.name,
                    path.display(),
                    learner.meta_batches()
                );
            }
        }
        let first = learner.meta_batches();
        let mut log = match (&self.log, root) {
            (Some(path), true) => Some(Log::open(path, first)?),
            _ => None,
        };
        let mut shown = Shown::new(self.progress, &self.name, first, self.steps);
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
        let mut recent: VecDeque<StepStats> = VecDeque::new();
        let tail = (self.steps.saturating_sub(first) / 10).max(1) as usize;
        let mut stopped_early = false;
        let t0 = Instant::now();
        for step in first..self.steps {
            opt.lr = self.schedule.lr(state.base_lr, step, self.steps);
            let tasks = source.next_batch(self.meta_batch)?;
            let stats = learner.meta_step(&tasks, opt)?;
            last = Some(stats);
            if !stats.skipped {
                recent.push_back(stats);
                if recent.len() > tail {
                    recent.pop_front();
                }
            }
            let done = step + 1;
            if let Some(log) = log.as_mut() {
                log.step(done, &stats, opt.lr, t0.elapsed().as_secs_f64())?;
            }
            shown.step(done, &stats);
            let validate =
                self.validate_every > 0 && (done % self.validate_every == 0 || done == self.steps);
            if validate {
                let v = self.validate(learner, done)?;
                if let Some(log) = log.as_mut() {
                    log.validation(&v, t0.elapsed().as_secs_f64())?;
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
                        save(learner, opt, source, &state, BEST_CHECKPOINT)?;
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
                save(learner, opt, source, &state, LAST_CHECKPOINT)?;
            }
        }
        save(learner, opt, source, &state, LAST_CHECKPOINT)?;
        shown.finish(learner.meta_batches(), learner.skipped_steps);
        Ok(Summary {
            steps: learner.meta_batches(),
            skipped: learner.skipped_steps,
            best: state.best.map(|b| match self.best_by {
                Some(Metric::Loss) => -b,
                _ => b,
            }),
            best_step: state.best_step,
            validations: state.validations,
            stopped_early,
            last,
            final_loss: recent.iter().map(|s| s.loss).sum::<f64>() / recent.len() as f64,
            final_accuracy: recent
                .iter()
                .map(|s| s.accuracy)
                .sum::<Option<f64>>()
                .map(|a| a / recent.len() as f64),
        })
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

/// The log file: one row per step and per validation, CSV or JSON lines.
struct Log {
    path: PathBuf,
    file: std::fs::File,
    json: bool,
}

const CSV_HEADER: &str = "kind,step,loss,accuracy,ci95,diverged,second_order,skipped,lr,seconds";

impl Log {
    /// Opens `path` for a run starting after `first` steps: rows of later steps (written
    /// by a run that was stopped after its last checkpoint) are dropped, the rest kept.
    fn open(path: &Path, first: u64) -> Result<Log> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let json = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("jsonl" | "json")
        );
        let mut kept = String::new();
        if first > 0 {
            if let Ok(text) = std::fs::read_to_string(path) {
                for line in text.lines() {
                    if Self::row_step(line, json).is_some_and(|s| s <= first) {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = std::fs::File::create(path).map_err(io)?;
        if !json {
            writeln!(file, "{CSV_HEADER}").map_err(io)?;
        }
        file.write_all(kept.as_bytes()).map_err(io)?;
        Ok(Log {
            path: path.to_path_buf(),
            file,
            json,
        })
    }

    /// The step of a data row (none for the header or a line that is not a row).
    fn row_step(line: &str, json: bool) -> Option<u64> {
        if json {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            v.get("step")?.as_u64()
        } else {
            line.split(',').nth(1)?.parse().ok()
        }
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

    fn step(&mut self, step: u64, s: &StepStats, lr: f64, seconds: f64) -> Result<()> {
        self.write(serde_json::json!({
            "kind": "step", "step": step, "loss": finite_or_null(s.loss),
            "accuracy": s.accuracy, "second_order": s.second_order, "skipped": s.skipped,
            "lr": lr, "seconds": seconds,
        }))
    }

    fn validation(&mut self, v: &Validation, seconds: f64) -> Result<()> {
        self.write(serde_json::json!({
            "kind": "validation", "step": v.step, "loss": finite_or_null(v.loss),
            "accuracy": v.accuracy, "ci95": finite_or_null(v.ci95), "diverged": v.diverged,
            "seconds": seconds,
        }))
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
    window: (f64, f64, usize),
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
            window: (0.0, 0.0, 0),
            last_draw: Instant::now(),
            start: Instant::now(),
        }
    }

    fn step(&mut self, step: u64, s: &StepStats) {
        if self.mode == Progress::Off {
            return;
        }
        if !s.skipped {
            self.window.0 += s.loss;
            self.window.1 += s.accuracy.unwrap_or(f64::NAN);
            self.window.2 += 1;
        } else {
            self.note(&format!(
                "step {step} skipped: its loss or update was not finite"
            ));
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
            "{}: step {step}/{} loss {:.4}{} [{:.0}s]",
            self.name,
            self.total,
            self.window.0 / n,
            if acc.is_nan() {
                String::new()
            } else {
                format!(" accuracy {:.1}%", 100.0 * acc)
            },
            self.start.elapsed().as_secs_f64()
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            self.last_draw = Instant::now();
        } else {
            eprintln!("{line}");
            self.window = (0.0, 0.0, 0);
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

    fn finish(&mut self, steps: u64, skipped: u64) {
        if self.terminal {
            eprintln!();
        }
        let skipped = if skipped > 0 {
            format!(" ({skipped} skipped)")
        } else {
            String::new()
        };
        self.note(&format!(
            "{steps} steps{skipped} in {:.1}s",
            self.start.elapsed().as_secs_f64()
        ));
    }
}
