//! The standard few-shot evaluation protocol: adapt to each of many held-out tasks
//! (600 by default, [`DEFAULT_EVAL_TASKS`]) and report the mean query accuracy with a 95%
//! confidence interval.
//!
//! The interval is `1.96 · s / √n`, where `s` is the **sample** standard deviation of the
//! per-task accuracies (divisor `n − 1`) and `n` the number of tasks — the normal
//! approximation used throughout the few-shot literature. Tasks run in parallel through
//! the learner's [`Comm`](crate::dist::Comm) (its ranks, each with the meta-batch mapper on
//! its threads), and every result is gathered and summed in task order, so a report does
//! not depend on the number of threads or ranks.
//!
//! **A diverged task is a result, not a fault.** When a task's adaptation produces a
//! non-finite query loss (NaN or ±∞) — the model, in this mode, with this test-time rate,
//! fails on that task — the protocol counts it and carries on:
//! - its accuracy is **0**: all its queries count as misses, so leaving a task out can never
//!   inflate the mean accuracy, and the confidence interval includes it;
//! - the mean loss is taken over the finite tasks only, with the number of diverged tasks
//!   beside it ([`EvalReport::diverged`], listed in [`EvalReport::diverged_tasks`]).
//!
//! A single task evaluated alone with [`MetaLearner::evaluate_task`] still returns
//! [`Error::NonFinite`], and training keeps its all-or-nothing guard: only the protocol
//! reports divergence as a result.
//!
//! The batch-norm mode is part of the result: transductive batch norm (query statistics)
//! typically scores a few points higher than inductive (running statistics), so it is
//! always stated — see [`NormMode`].
//!
//! ```
//! use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection};
//! use metagrad::eval::evaluate_episodes;
//! use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
//! use metagrad::nn::{Conv4, NormMode};
//! use ndarray::Array3;
//!
//! let images = Array3::from_shape_fn((40, 16, 16), |(i, r, c)| ((i * 7 + r * 3 + c) % 5) as f32);
//! let collection = ImageCollection::from_class_sizes(images, &[4; 10])?;
//! let model = Conv4 { image_size: 16, filters: 4, ..Conv4::omniglot(5) };
//! let mut learner = MetaLearner::<f32, _>::new(model, MetaConfig::maml(1, 0.4), 0);
//! let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 0)?;
//! // One meta-step collects running statistics, which inductive batch norm needs.
//! let tasks = Task::from_episodes(&sampler.sample_batch(2)?);
//! learner.meta_step(&tasks, &mut Optimizer::adam(1e-3))?;
//! let report = evaluate_episodes(&learner, &mut sampler, 10, 1, NormMode::Inductive, usize::MAX)?;
//! assert_eq!(report.tasks, 10);
//! println!("{report}"); // e.g. "24.0% ± 5.1% (10 tasks, 1 step, batch norm: inductive)"
//! # Ok::<(), metagrad::Error>(())
//! ```

use crate::data::EpisodeSampler;
use crate::dist::Wire;
use crate::meta::{MetaLearner, Task};
use crate::nn::{Model, NormMode};
use crate::{Error, Float, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The number of test tasks of the standard protocol.
pub const DEFAULT_EVAL_TASKS: usize = 600;

/// Episodes drawn and evaluated at a time by [`evaluate_episodes`] (bounds memory; the
/// results do not depend on it).
const EPISODE_CHUNK: usize = 64;

/// The outcome of the evaluation protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Number of tasks evaluated.
    pub tasks: usize,
    /// Inner steps taken on each support set.
    pub steps: usize,
    /// How batch norms normalised the support and query sets.
    pub mode: NormMode,
    /// Whether the network has batch norm at all (if not, `mode` changes nothing).
    pub batch_norm: bool,
    /// Mean query accuracy over tasks, in `[0, 1]`; a diverged task counts as 0 (all its
    /// queries missed).
    pub mean_accuracy: f64,
    /// Half-width of the 95% confidence interval of `mean_accuracy`: `1.96 · s / √n`
    /// with `s` the sample standard deviation (NaN for fewer than two tasks).
    pub ci95: f64,
    /// Mean query loss over the tasks whose loss is finite (NaN if every task diverged).
    pub mean_loss: f64,
    /// The query accuracy of each task, in task order (0 for a diverged task).
    pub accuracies: Vec<f64>,
    /// Number of tasks whose adaptation diverged (non-finite query loss): counted as
    /// misses in the accuracy, left out of `mean_loss`.
    #[serde(default)]
    pub diverged: usize,
    /// The indices of the diverged tasks, in order (numbered as evaluated).
    #[serde(default)]
    pub diverged_tasks: Vec<usize>,
}

impl fmt::Display for EvalReport {
    /// `98.7% ± 0.3% (600 tasks, 3 steps, batch norm: inductive)`, with
    /// `, 2 diverged, counted as misses` before the closing parenthesis when tasks diverged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{:.1}% ± {:.1}% ({} task{}, {} step{}, ",
            100.0 * self.mean_accuracy,
            100.0 * self.ci95,
            self.tasks,
            plural(self.tasks),
            self.steps,
            plural(self.steps),
        )?;
        if self.batch_norm {
            write!(f, "batch norm: {}", self.mode)?;
        } else {
            write!(f, "no batch norm")?;
        }
        if self.diverged > 0 {
            write!(f, ", {} diverged, counted as misses", self.diverged)?;
        }
        write!(f, ")")
    }
}

/// Mean and 95% confidence half-width `1.96 · s / √n` of `values`, with `s` the sample
/// standard deviation (divisor `n − 1`). The mean is NaN for no values, the half-width NaN
/// for fewer than two. Sums run in order, so the result is deterministic.
pub fn confidence_interval(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, 1.96 * var.sqrt() / (n as f64).sqrt())
}

/// One task's evaluation as it crosses between ranks: the result, or the error's kind and
/// message (every rank then reports the same error).
struct Outcome(Result<(f64, Option<f64>)>);

impl Wire for Outcome {
    fn put(&self, out: &mut Vec<u8>) {
        match &self.0 {
            Ok(r) => {
                0u8.put(out);
                r.put(out);
            }
            Err(Error::NonFinite {
                step, param, data, ..
            }) => {
                1u8.put(out);
                step.put(out);
                param.put(out);
                data.put(out);
            }
            Err(Error::Task { message, .. }) => {
                2u8.put(out);
                message.put(out);
            }
            Err(Error::Config(m)) => {
                3u8.put(out);
                m.put(out);
            }
            Err(e) => {
                3u8.put(out);
                e.to_string().put(out);
            }
        }
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        Ok(Outcome(match u8::get(input)? {
            0 => Ok(<(f64, Option<f64>)>::get(input)?),
            1 => Err(Error::NonFinite {
                during: "evaluate",
                step: u64::get(input)?,
                tasks: vec![0],
                param: Option::get(input)?,
                data: Option::get(input)?,
            }),
            2 => Err(Error::Task {
                index: 0,
                message: String::get(input)?,
            }),
            3 => Err(Error::Config(String::get(input)?)),
            t => {
                return Err(Error::Config(format!(
                    "malformed message between ranks: evaluation outcome tag {t}"
                )))
            }
        }))
    }
}

/// One task's score under the protocol: its query loss and accuracy, or `None` if its
/// adaptation diverged (non-finite query loss).
type Score = Option<(f64, f64)>;

/// The score of each task after `steps` inner steps, in task order. A diverged task is a
/// score (`None`), not an error; other errors are numbered in the whole evaluation.
fn per_task<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    tasks: &[Task<F>],
    steps: usize,
    mode: NormMode,
    parallel_iterations: usize,
    first_index: usize,
) -> Result<Vec<Score>> {
    check_running_stats(learner, mode)?;
    // Tasks split across the learner's ranks (one process: all of them here).
    let results = learner.comm().map(tasks.len(), parallel_iterations, |i| {
        Outcome(learner.evaluate_task(&tasks[i], steps, mode))
    })?;
    results
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let index = i + first_index;
            match o.0 {
                Ok((loss, Some(acc))) => Ok(Some((loss, acc))),
                Ok((_, None)) => Err(Error::Config(format!(
                    "task {index} has no accuracy (a regression task?); the evaluation \
                     protocol is for classification — use MetaLearner::evaluate_task for losses"
                ))),
                // Data that is not finite is the caller's fault, not a result.
                Err(Error::NonFinite {
                    during,
                    step,
                    param,
                    data: Some(d),
                    ..
                }) => Err(Error::NonFinite {
                    during,
                    step,
                    tasks: vec![index],
                    param,
                    data: Some(d.replacen("task 0", &format!("task {index}"), 1)),
                }),
                // The adaptation diverged: a result of the protocol (see the module docs).
                Err(Error::NonFinite { .. }) => Ok(None),
                Err(Error::Task { message, .. }) => Err(Error::Task { index, message }),
                Err(Error::Config(m)) => Err(Error::Config(format!("task {index}: {m}"))),
                Err(e) => Err(e),
            }
        })
        .collect()
}

/// Inductive batch norm needs running statistics: say so once, instead of a panic per task.
fn check_running_stats<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    mode: NormMode,
) -> Result<()> {
    let has_bn = !learner.model.batch_norm_channels().is_empty();
    let missing = learner.norm.stats.iter().flatten().all(|s| s.updates == 0);
    if mode == NormMode::Inductive && has_bn && missing {
        return Err(Error::Config(
            "inductive batch norm needs running statistics, and this learner has none yet \
             (it was never meta-trained with NormMode::Train); train it first, or evaluate \
             with NormMode::Transductive knowingly"
                .into(),
        ));
    }
    Ok(())
}

fn report<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    scores: &[Score],
    steps: usize,
    mode: NormMode,
) -> EvalReport {
    // A diverged task missed every query.
    let accuracies: Vec<f64> = scores.iter().map(|s| s.map_or(0.0, |s| s.1)).collect();
    let (mean_accuracy, ci95) = confidence_interval(&accuracies);
    let losses: Vec<f64> = scores.iter().flatten().map(|s| s.0).collect();
    let mean_loss = losses.iter().sum::<f64>() / losses.len() as f64;
    let diverged_tasks: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].is_none()).collect();
    EvalReport {
        tasks: scores.len(),
        steps,
        mode,
        batch_norm: !learner.model.batch_norm_channels().is_empty(),
        mean_accuracy,
        ci95,
        mean_loss,
        accuracies,
        diverged: diverged_tasks.len(),
        diverged_tasks,
    }
}

/// Evaluates `learner` on `tasks`: adapts to each support set with `steps` inner steps
/// (batch norms in `mode`) and measures the query set, running at most
/// `parallel_iterations` tasks at once. Nothing in the learner changes.
///
/// A task whose adaptation diverges is counted in the report, never an error: see the
/// [module docs](self) for how it enters the accuracy and the loss.
///
/// # Errors
/// [`Error::Config`] for no tasks, a task without accuracy (regression), or inductive
/// batch norm without running statistics (an untrained learner); [`Error::Task`] for a
/// label out of range or if a task panics (e.g. inputs of the wrong shape);
/// [`Error::NonFinite`] for a task whose data is not finite.
pub fn evaluate<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    tasks: &[Task<F>],
    steps: usize,
    mode: NormMode,
    parallel_iterations: usize,
) -> Result<EvalReport> {
    if tasks.is_empty() {
        return Err(Error::Config("evaluation needs at least one task".into()));
    }
    let results = per_task(learner, tasks, steps, mode, parallel_iterations, 0)?;
    Ok(report(learner, &results, steps, mode))
}

/// The protocol on `n_tasks` episodes drawn from `sampler` (use [`DEFAULT_EVAL_TASKS`]
/// for the standard 600). Episodes are drawn in order, a chunk at a time, so memory stays
/// bounded; the report is the same as [`evaluate`] on the same episodes. Seed the sampler
/// the same way to compare models or modes on identical tasks.
///
/// # Errors
/// As [`evaluate`].
pub fn evaluate_episodes<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    sampler: &mut EpisodeSampler<'_>,
    n_tasks: usize,
    steps: usize,
    mode: NormMode,
    parallel_iterations: usize,
) -> Result<EvalReport> {
    if n_tasks == 0 {
        return Err(Error::Config("evaluation needs at least one task".into()));
    }
    let mut results = Vec::with_capacity(n_tasks);
    while results.len() < n_tasks {
        let chunk = EPISODE_CHUNK.min(n_tasks - results.len());
        let tasks = Task::from_episodes(&sampler.sample_batch(chunk)?);
        let done = results.len();
        results.extend(per_task(
            learner,
            &tasks,
            steps,
            mode,
            parallel_iterations,
            done,
        )?);
    }
    Ok(report(learner, &results, steps, mode))
}
