//! MAML and its family on one shared adaptation loop.
//!
//! | method | [`InnerRule`] | meta-gradient |
//! | --- | --- | --- |
//! | MAML | [`InnerRule::Sgd`] | second order ([`Order::Second`]) or first order |
//! | Meta-SGD | [`InnerRule::MetaSgd`]: a learned rate per parameter element | as MAML |
//! | ANIL | [`InnerRule::HeadOnly`]: only the head adapts | as MAML |
//! | MAML++ | [`InnerRule::PerTensorPerStep`] (LSLR), plus [`MetaConfig::multi_step_loss`], [`Order::Annealed`], per-step batch norm ([`NormKind::Batch`](crate::nn::NormKind)) | |
//! | Reptile | [`InnerRule::Sgd`] via [`MetaLearner::reptile_step`] | `θ − φ` |
//! | iMAML | [`InnerRule::Sgd`] on the regularised support loss ([`MetaConfig::implicit`], see [`imaml`]) | `(I + H/λ)⁻¹ ∇L_Q(φ*)` by conjugate gradient |
//!
//! One episode ([`InnerLoop::episode`]) is the same for all: adapt on the support set
//! ([`InnerLoop::adapt`]: take the gradient of the support loss with respect to the
//! adapted parameters — recorded on the tape for second order, as constants for first
//! order — and apply the update rule), then score the query set. The meta-batch runs
//! through [`map_tasks`], one tape per task, and the meta-gradient is
//! reduced in task order, so results do not depend on the number of threads.
//!
//! ```
//! use metagrad::data::SinusoidSampler;
//! use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
//! use metagrad::nn::{Mlp, NormMode};
//! let mut learner = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 0);
//! let mut opt = Optimizer::adam(1e-3);
//! let batch = SinusoidSampler::new(10, 10, 7).unwrap().sample_batch(4).unwrap();
//! let tasks = Task::from_sinusoid(&batch);
//! let stats = learner.meta_step(&tasks, &mut opt).unwrap();
//! assert!(stats.loss.is_finite());
//! let (loss, _) = learner.evaluate_task(&tasks[0], 5, NormMode::Transductive).unwrap();
//! assert!(loss.is_finite());
//! ```

mod adapt;
mod config;
mod episode;
mod evaluate;
pub mod imaml;
mod optim;
mod ranks;
mod task;

pub use adapt::Adapted;
pub use config::{InnerRule, Memory, MetaConfig, NonFinite, Order};
pub use episode::{adapted_indices, last_step_only, EpisodeRun, InnerLoop};
pub use imaml::{CgStats, Imaml};
pub use optim::{Optimizer, OuterRule};
pub use task::{Targets, Task};

use crate::dist::{get_array, get_vec, put_array, put_vec, Comm, Wire};
use crate::map_fn::{accumulate_in_order, map_tasks};
use crate::nn::{Ctx, Model, NormMode, NormState, Observed, Params};
use crate::tape::meter::Meter;
use crate::{Error, Float, Result, Tape, Var};
use ndarray::{ArrayD, IxDyn};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// What one meta-step measured (before its update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean query loss after adaptation.
    pub loss: f64,
    /// Mean query accuracy after adaptation (classification only).
    pub accuracy: Option<f64>,
    /// Whether the meta-gradient was second order.
    pub second_order: bool,
    /// Whether the step was skipped because its loss or update was not finite (under
    /// [`NonFinite::Skip`]); nothing changed then, and `loss` says what was measured.
    pub skipped: bool,
    /// iMAML's conjugate gradient, the worst over the meta-batch (`None` for the other
    /// methods, and for first-order iMAML, which runs none).
    pub cg: Option<CgStats>,
}

/// How many tasks ran at once in a learner's last meta-step (or Reptile step), and the
/// per-task memory figure that chose it under a
/// [memory budget](MetaConfig::with_memory_budget). See [`MetaLearner::concurrency`].
///
/// It describes the schedule only: results are bitwise the same at any concurrency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Concurrency {
    /// At most this many tasks (or task chunks) ran at once: the smallest of
    /// [`MetaConfig::parallel_iterations`], the memory budget's share
    /// (`budget / task_bytes`, at least 1), the rayon pool's threads and the number of
    /// tasks. When the step had no figure yet, its first task ran alone before the
    /// others ran at this concurrency. 0 before the first step.
    pub tasks: usize,
    /// The measured memory of one task: the most bytes of tensor values its tapes held
    /// at once, the largest over the step's tasks. `None` without a memory budget (no
    /// task is measured then).
    pub task_bytes: Option<u64>,
}

/// What a per-task memory figure was measured on: a figure is reused only for a step
/// of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    reptile: bool,
    second_order: bool,
    memory: Memory,
    implicit: bool,
    inner_steps: usize,
    /// Tasks per tape, and the elements of the first group's inputs.
    chunk: usize,
    elements: usize,
}

impl Probe {
    fn new<F: Float>(
        config: &MetaConfig,
        reptile: bool,
        second_order: bool,
        group: &[Task<F>],
    ) -> Self {
        Probe {
            reptile,
            second_order,
            memory: config.memory,
            implicit: config.implicit.is_some(),
            inner_steps: config.inner_steps,
            chunk: group.len(),
            elements: group
                .iter()
                .map(|t| t.support_x.len() + t.query_x.len())
                .sum(),
        }
    }
}

/// The learner's record of its schedule: the last per-task figure (and what it was
/// measured on) and the last step's concurrency.
#[derive(Debug, Default)]
struct Schedule(Mutex<(Option<(Probe, u64)>, Concurrency)>);

impl Schedule {
    fn lock(&self) -> MutexGuard<'_, (Option<(Probe, u64)>, Concurrency)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clone for Schedule {
    fn clone(&self) -> Self {
        Schedule(Mutex::new(*self.lock()))
    }
}

/// An error of the tasks after the first `offset` of a batch (run apart), renumbered
/// as the batch's.
fn shift_task_error(e: Error, offset: usize) -> Error {
    match e {
        Error::Task { index, message } => Error::Task {
            index: index + offset,
            message,
        },
        e => e,
    }
}

/// What one tape computed for a group of tasks: the meta-gradient (or, for Reptile, the
/// adapted parameters), the summed loss, and what it observed.
struct GroupResult<F: Float> {
    result: Vec<ArrayD<F>>,
    loss: f64,
    accuracy: Option<f64>,
    observed: Vec<Observed<F>>,
    /// Whether the loss and every tensor of `result` are finite (and, for iMAML, its
    /// conjugate gradient converged where a tolerance asks for it).
    finite: bool,
    /// iMAML's conjugate gradient (the worst over the group).
    cg: Option<CgStats>,
}

impl<F: Float> Wire for GroupResult<F> {
    fn put(&self, out: &mut Vec<u8>) {
        self.result.len().put(out);
        self.result.iter().for_each(|a| put_array(a, out));
        self.loss.put(out);
        self.accuracy.put(out);
        self.finite.put(out);
        self.cg
            .map(|c| ((c.iterations, c.unconverged), c.residual))
            .put(out);
        self.observed.len().put(out);
        for o in &self.observed {
            (o.layer, o.step).put(out);
            put_vec(&o.mean, out);
            put_vec(&o.var, out);
        }
    }
    fn get(input: &mut &[u8]) -> Result<Self> {
        let n = usize::get(input)?;
        let result = (0..n).map(|_| get_array(input)).collect::<Result<_>>()?;
        let (loss, accuracy, finite) = (f64::get(input)?, Option::get(input)?, bool::get(input)?);
        let cg = Option::<((usize, usize), f64)>::get(input)?.map(
            |((iterations, unconverged), residual)| CgStats {
                iterations,
                residual,
                unconverged,
            },
        );
        let k = usize::get(input)?;
        let observed = (0..k)
            .map(|_| {
                let (layer, step) = <(usize, usize)>::get(input)?;
                Ok(Observed {
                    layer,
                    step,
                    mean: get_vec(input)?,
                    var: get_vec(input)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GroupResult {
            result,
            loss,
            accuracy,
            observed,
            finite,
            cg,
        })
    }
}

/// Group results folded in task order.
struct Reduced<F: Float> {
    sums: Vec<ArrayD<F>>,
    stats: StepStats,
    observed: Vec<Observed<F>>,
}

/// A meta-batch's update, ready to be applied, and the tasks that were not finite.
struct BatchResult<F: Float> {
    update: Vec<ArrayD<F>>,
    stats: StepStats,
    observed: Vec<Observed<F>>,
    bad_tasks: Vec<usize>,
}

/// Whether every value is finite, without short-circuiting (so that the scan vectorises).
fn finite<F: Float>(values: &[F]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
}

fn all_finite<F: Float>(a: &ArrayD<F>) -> bool {
    match a.as_slice_memory_order() {
        Some(s) => finite(s),
        None => a.iter().all(|v| v.is_finite()),
    }
}

fn observed_finite<F: Float>(observed: &[Observed<F>]) -> bool {
    observed.iter().all(|o| finite(&o.mean) && finite(&o.var))
}

/// The first running statistic that is not finite, named.
fn first_non_finite_stats<F: Float>(norm: &NormState<F>) -> Option<String> {
    norm.stats.iter().enumerate().find_map(|(layer, steps)| {
        steps.iter().enumerate().find_map(|(step, r)| {
            let bad = !(finite(&r.mean) && finite(&r.var));
            bad.then(|| format!("running statistics of batch norm {layer} (inner step {step})"))
        })
    })
}

/// A non-finite step's error with the data named when the data is the cause: the first
/// failing task whose inputs or targets are not finite (scanned only on this failure path).
fn name_data_cause<F: Float>(e: Error, tasks: &[Task<F>]) -> Error {
    match e {
        Error::NonFinite {
            during,
            step,
            tasks: bad,
            param,
            data: None,
        } => {
            let data = bad.iter().find_map(|&i| {
                let d = tasks.get(i)?.first_non_finite()?;
                Some(format!("task {i}: {d}"))
            });
            Error::NonFinite {
                during,
                step,
                tasks: bad,
                param,
                data,
            }
        }
        e => e,
    }
}

/// An error of a task run alone, renumbered as task `index` of its batch.
fn reindex(e: Error, index: usize) -> Error {
    match e {
        Error::Task { message, .. } => Error::Task { index, message },
        e => e,
    }
}

/// A chunk of tasks as one batched computation: each meta-parameter is broadcast to a
/// stack of `c` per-task copies, and the loss is the sum of the tasks' losses, so the
/// inner gradient of each copy is its task's own.
fn stack_params<F: Float>(t: &mut Tape<F>, net: &[Var], c: usize) -> Vec<Var> {
    net.iter()
        .map(|&p| {
            let shape = t.shape(p).to_vec();
            let mut one = vec![1];
            one.extend(&shape);
            let p1 = t.reshape(p, &one);
            one[0] = c;
            t.broadcast_to(p1, &one)
        })
        .collect()
}

/// A meta-learner: a network, its meta-parameters (network weights, then any learned
/// inner rates, named `inner_lr.<param>`), running normalisation statistics, and the
/// configuration.
#[derive(Debug, Clone)]
pub struct MetaLearner<F: Float, M> {
    /// The network.
    pub model: M,
    /// All meta-parameters: the network's first, then the learned inner rates.
    pub params: Params<F>,
    /// Running batch-norm statistics.
    pub norm: NormState<F>,
    /// Hyper-parameters.
    pub config: MetaConfig,
    /// Meta-steps taken (applied updates; skipped steps do not count).
    pub step: u64,
    /// Meta-steps skipped because their update was not finite (under
    /// [`NonFinite::Skip`]).
    pub skipped_steps: u64,
    net_len: usize,
    comm: Comm,
    schedule: Schedule,
}

impl<F: Float, M: Model<F>> MetaLearner<F, M> {
    /// A learner with freshly initialised parameters (seeded) and learned rates
    /// initialised to `config.inner_lr`.
    pub fn new(model: M, config: MetaConfig, seed: u64) -> Self {
        let mut params = model.init(seed);
        let net_len = params.len();
        let net: Vec<(String, Vec<usize>)> = adapted_indices(&model, config.rule, net_len)
            .into_iter()
            .map(|i| {
                (
                    params.names()[i].clone(),
                    params.tensors()[i].shape().to_vec(),
                )
            })
            .collect();
        let lr = F::c(config.inner_lr);
        for (name, shape) in net {
            match config.rule {
                InnerRule::MetaSgd => {
                    params.push(format!("inner_lr.{name}"), ArrayD::from_elem(shape, lr))
                }
                InnerRule::PerTensorPerStep => params.push(
                    format!("inner_lr.{name}"),
                    ArrayD::from_elem(IxDyn(&[config.inner_steps.max(1)]), lr),
                ),
                InnerRule::Sgd | InnerRule::HeadOnly => {}
            }
        }
        let norm = NormState::new(&model.batch_norm_channels(), model.norm_steps(), 0.1);
        MetaLearner {
            model,
            params,
            norm,
            config,
            step: 0,
            skipped_steps: 0,
            net_len,
            comm: Comm::local(),
            schedule: Schedule::default(),
        }
    }

    /// How many tasks ran at once in the last meta-step (or Reptile step or
    /// meta-gradient), and, under a [memory budget](MetaConfig::with_memory_budget), the
    /// per-task figure that chose it. A budget below one task's need shows here as
    /// `tasks: 1`.
    pub fn concurrency(&self) -> Concurrency {
        self.schedule.lock().1
    }

    /// Runs `f(0), …, f(n − 1)` (each a group of tasks) across the ranks and the rayon
    /// pool, at most [`MetaConfig::parallel_iterations`] at once and, under a memory
    /// budget, at most as many as the budget holds by the per-task figure. Without a
    /// figure for this kind of step ([`Probe`]), the first group runs alone and is
    /// measured (on one process; across ranks, where the ranks must make the same
    /// exchanges, the whole step runs one group at a time). The results come back in
    /// order, so they do not depend on the schedule.
    fn map_groups<T: crate::dist::Wire + Send>(
        &self,
        n: usize,
        probe: Probe,
        f: impl Fn(usize) -> T + Sync,
    ) -> Result<Vec<T>> {
        let bound = self.config.parallel_iterations.max(1);
        let in_flight = |k: usize| k.min(rayon::current_num_threads()).min(n).max(1);
        let Some(budget) = self.config.memory_budget else {
            let out = self.comm.map(n, bound, f)?;
            self.schedule.lock().1 = Concurrency {
                tasks: in_flight(bound),
                task_bytes: None,
            };
            return Ok(out);
        };
        let known = match self.schedule.lock().0 {
            Some((p, bytes)) if p == probe => Some(bytes),
            _ => None,
        };
        let share = |per_task: u64| {
            let k = budget / per_task.max(1);
            usize::try_from(k).unwrap_or(usize::MAX).clamp(1, bound)
        };
        let largest = AtomicU64::new(0);
        let measured = |i: usize| {
            let meter = Meter::new();
            let r = meter.measure(|| f(i));
            largest.fetch_max(meter.peak() as u64, Ordering::Relaxed);
            r
        };
        let (out, k) = match known {
            Some(per_task) => {
                let k = share(per_task);
                (self.comm.map(n, k, measured)?, k)
            }
            None if self.comm.size() == 1 && n > 1 => {
                let mut out = map_tasks(1, 1, |_| measured(0))?;
                let k = share(largest.load(Ordering::Relaxed));
                let rest =
                    map_tasks(n - 1, k, |i| measured(i + 1)).map_err(|e| shift_task_error(e, 1))?;
                out.extend(rest);
                (out, k)
            }
            None => (self.comm.map(n, 1, measured)?, 1),
        };
        // A rank whose block of this step is empty measured nothing: it keeps the figure
        // it had (or none), never a figure of 0 bytes, which would lift the bound.
        let per_task = Some(largest.load(Ordering::Relaxed))
            .filter(|&b| b > 0)
            .or(known);
        let mut schedule = self.schedule.lock();
        if let Some(bytes) = per_task {
            schedule.0 = Some((probe, bytes));
        }
        schedule.1 = Concurrency {
            tasks: in_flight(k),
            task_bytes: per_task,
        };
        Ok(out)
    }

    /// Replaces the meta-parameters (e.g. from a checkpoint).
    ///
    /// # Errors
    /// [`Error::Config`] naming the first name or shape that
    /// differs, or the first parameter that is not finite; the learner is then unchanged.
    pub fn set_params(&mut self, params: Params<F>) -> Result<()> {
        self.params.check_same_layout(&params)?;
        if let Some(i) = params.tensors().iter().position(|p| !all_finite(p)) {
            return Err(Error::Config(format!(
                "parameter {} holds a value that is not finite",
                params.names()[i]
            )));
        }
        self.params = params;
        Ok(())
    }

    /// Meta-batches consumed: steps taken plus steps skipped. A training loop that draws
    /// one meta-batch per step counts with this, so that a resumed run draws the same
    /// batches as an uninterrupted one even when some steps were skipped.
    pub fn meta_batches(&self) -> u64 {
        self.step + self.skipped_steps
    }

    /// Number of network parameter tensors (the learned rates follow them).
    pub fn network_len(&self) -> usize {
        self.net_len
    }

    /// MAML++ multi-step-loss weights for the query losses after steps 1..=n.
    fn step_weights(&self) -> Vec<f64> {
        let n = self.config.inner_steps.max(1);
        let Some(anneal) = self.config.multi_step_loss else {
            let mut w = vec![0.0; n];
            w[n - 1] = 1.0;
            return w;
        };
        let base = 1.0 / n as f64;
        let decay = base * (self.step as f64 / anneal.max(1) as f64);
        let min_w = 0.03 / n as f64;
        let mut w: Vec<f64> = (0..n).map(|_| (base - decay).max(min_w)).collect();
        let rest: f64 = w[..n - 1].iter().sum();
        w[n - 1] = 1.0 - rest;
        w
    }

    /// The inner loop as configured, for `steps` steps, recorded or not.
    fn inner_loop(&self, steps: usize, create_graph: bool) -> InnerLoop<'_, M> {
        InnerLoop {
            model: &self.model,
            rule: self.config.rule,
            lr: self.config.inner_lr,
            steps,
            create_graph,
        }
    }

    /// One meta-training step over a meta-batch of tasks: adapt on each support set, take
    /// the meta-gradient of the mean query loss (second order unless configured
    /// otherwise), fold in batch-norm statistics in task order, and apply `opt`.
    ///
    /// The step is all or nothing. It is refused before anything runs when it cannot make
    /// sense, and it is not applied when any task's loss or gradient, the update, the new
    /// parameters, the optimiser's state or the running statistics would not be finite:
    /// the parameters, running statistics, step counter and `opt` then stay bitwise as
    /// they were. What happens instead is [`MetaConfig::on_non_finite`]'s choice: an error
    /// (the default) or a skipped step, counted in [`MetaLearner::skipped_steps`] and
    /// flagged in [`StepStats::skipped`].
    ///
    /// # Errors
    /// - [`Error::Config`] for an empty meta-batch, a task with an
    ///   empty support or query set, tasks with different kinds of targets, a learning rate that is
    ///   not finite (see [`Task::validate_batch`], [`MetaConfig::validate`],
    ///   [`Optimizer::validate`]);
    /// - [`Error::NonFinite`] naming the meta-step, the tasks
    ///   and the first parameter affected (under [`NonFinite::Error`]), and, when a
    ///   failing task's data holds a NaN or infinity, the first such value by task, array
    ///   and position;
    /// - [`Error::Task`] for a class label out of range of the model's
    ///   [outputs](Model::outputs) (checked before anything runs), or if a task panics.
    pub fn meta_step(&mut self, tasks: &[Task<F>], opt: &mut Optimizer<F>) -> Result<StepStats> {
        self.check_request(tasks, opt)?;
        let batch = self.meta_batch(tasks)?;
        self.commit("meta_step", batch, opt)
            .map_err(|e| name_data_cause(e, tasks))
    }

    /// The meta-gradient of the mean query loss over `tasks` (no update), with the step's
    /// statistics and the batch-norm statistics observed, in task order. The values are
    /// returned as computed, finite or not ([`MetaLearner::meta_step`] checks them).
    ///
    /// # Errors
    /// [`Error::Config`] for a batch that cannot make sense (as
    /// [`MetaLearner::meta_step`]); [`Error::Task`] if a task panics.
    #[allow(clippy::type_complexity)]
    pub fn meta_gradient(
        &self,
        tasks: &[Task<F>],
    ) -> Result<(Vec<ArrayD<F>>, StepStats, Vec<Observed<F>>)> {
        Task::validate_batch(tasks)?;
        self.config.validate()?;
        self.check_outputs(tasks)?;
        let b = self.meta_batch(tasks)?;
        Ok((b.update, b.stats, b.observed))
    }

    /// Refuses a request that cannot produce a meaningful step, before any state changes.
    fn check_request(&self, tasks: &[Task<F>], opt: &Optimizer<F>) -> Result<()> {
        Task::validate_batch(tasks)?;
        self.config.validate()?;
        opt.validate()?;
        self.check_outputs(tasks)
    }

    /// Class labels against the network's output width, where the model states it
    /// ([`Model::outputs`]): a label out of range is refused before anything runs.
    fn check_outputs(&self, tasks: &[Task<F>]) -> Result<()> {
        let Some(outputs) = self.model.outputs() else {
            return Ok(());
        };
        for (index, task) in tasks.iter().enumerate() {
            task.check_outputs(outputs).map_err(|e| match e {
                Error::Config(message) => Error::Task { index, message },
                e => e,
            })?;
        }
        Ok(())
    }

    /// The context of meta-training task `index` of this step: the training norm mode,
    /// the running statistics, and the key of the task's dropout masks (from the step
    /// and the index, never from the thread that runs it).
    pub(crate) fn train_ctx(&self, index: usize) -> Ctx<'_, F> {
        let mut ctx = Ctx::new(self.config.train_mode).with_running(&self.norm);
        ctx.noise = Some(crate::nn::net::mix(&[self.step, index as u64]));
        ctx
    }

    /// Runs one group of tasks on one tape (a single task, or a chunk of regression
    /// tasks batched as one computation): the gradient of the sum of their meta-losses,
    /// that sum, the accuracy (single tasks), and the statistics observed.
    fn run_group(&self, group: &[Task<F>], first: usize, second_order: bool) -> GroupResult<F> {
        if let Some(imaml) = &self.config.implicit {
            return imaml::run_group(self, group, first, imaml, second_order);
        }
        if self.config.memory == Memory::Recompute && self.config.inner_steps > 0 {
            return self.run_group_recompute(group, first, second_order);
        }
        let mut t = Tape::new();
        let theta = self.params.place(&mut t);
        let mut ctx = self.train_ctx(first);
        let inner = self.inner_loop(self.config.inner_steps, second_order);
        let weights = self.step_weights();
        let (net, rates) = theta.split_at(self.net_len);
        let (loss, acc) = if group.len() == 1 {
            let run = inner.episode(&mut t, net, rates, &group[0], &weights, &mut ctx);
            (run.loss, group[0].query_y.accuracy(t.value(run.query_out)))
        } else {
            let stacked = stack_params(&mut t, net, group.len());
            let batch = Task::stack(group);
            let run = inner.episode(&mut t, &stacked, rates, &batch, &weights, &mut ctx);
            (run.loss, None)
        };
        let value = t.item(loss);
        let grads = t.grad(loss, &theta, false);
        let grads: Vec<ArrayD<F>> = grads.into_iter().map(|g| t.take(g)).collect();
        Self::group_result(grads, value, acc, ctx.observed)
    }

    /// [`MetaLearner::run_group`] under [`Memory::Recompute`]: the same result, bitwise,
    /// from [`InnerLoop::episode_recompute`]. A chunk of tasks starts from the stacked
    /// copies of the parameters, whose adjoints are then taken back through the stacking.
    fn run_group_recompute(
        &self,
        group: &[Task<F>],
        first: usize,
        second_order: bool,
    ) -> GroupResult<F> {
        let mut ctx = self.train_ctx(first);
        let inner = self.inner_loop(self.config.inner_steps, second_order);
        let weights = self.step_weights();
        let (net, rates) = self.params.tensors().split_at(self.net_len);
        let zeros_for =
            |g: Option<ArrayD<F>>, p: &ArrayD<F>| g.unwrap_or_else(|| ArrayD::zeros(p.raw_dim()));
        let (run, acc, net_grads) = if group.len() == 1 {
            let mut run = inner.episode_recompute(net, rates, &group[0], &weights, &mut ctx);
            let acc = group[0].query_y.accuracy(&run.query_out);
            let net_grads = std::mem::take(&mut run.net);
            (run, acc, net_grads)
        } else {
            let mut t = Tape::new();
            let theta: Vec<Var> = net.iter().map(|p| t.param(p.clone())).collect();
            let stacked = stack_params(&mut t, &theta, group.len());
            let start: Vec<ArrayD<F>> = stacked.iter().map(|&v| t.value(v).clone()).collect();
            let batch = Task::stack(group);
            let mut run = inner.episode_recompute(&start, rates, &batch, &weights, &mut ctx);
            let (mut outs, mut seeds) = (Vec::new(), Vec::new());
            for (&v, a) in stacked.iter().zip(std::mem::take(&mut run.net)) {
                if let Some(a) = a {
                    outs.push(v);
                    seeds.push(t.constant(a));
                }
            }
            let onto = vec![None; theta.len()];
            let g = t.grad_seeded_onto(&outs, &seeds, &theta, &onto, false);
            let net_grads = g.into_iter().map(|g| g.map(|g| t.take(g))).collect();
            (run, None, net_grads)
        };
        let grads: Vec<ArrayD<F>> = net_grads
            .into_iter()
            .chain(run.rates)
            .zip(self.params.tensors())
            .map(|(g, p)| zeros_for(g, p))
            .collect();
        Self::group_result(grads, run.loss, acc, ctx.observed)
    }

    /// A group's result, checked for finiteness.
    fn group_result(
        grads: Vec<ArrayD<F>>,
        value: f64,
        acc: Option<f64>,
        observed: Vec<Observed<F>>,
    ) -> GroupResult<F> {
        GroupResult {
            finite: value.is_finite() && grads.iter().all(all_finite) && observed_finite(&observed),
            result: grads,
            loss: value,
            accuracy: acc,
            observed,
            cg: None,
        }
    }

    /// The meta-gradient over a (validated) meta-batch, and which tasks were not finite.
    fn meta_batch(&self, tasks: &[Task<F>]) -> Result<BatchResult<F>> {
        let second_order = self.config.order.second_order_at(self.step);
        let chunk = Task::chunk_size(tasks, self.config.task_chunk, self.model.batches_tasks());
        let groups: Vec<&[Task<F>]> = tasks.chunks(chunk).collect();
        let probe = Probe::new(&self.config, false, second_order, groups[0]);
        let per_group = self.map_groups(groups.len(), probe, |i| {
            self.run_group(groups[i], i * chunk, second_order)
        })?;
        // A chunk that is not finite is rerun task by task to name the culprits (only on
        // this failure path).
        let mut bad = Vec::new();
        for (i, r) in per_group.iter().enumerate() {
            if r.finite {
                continue;
            }
            if chunk == 1 {
                bad.push(i);
                continue;
            }
            for (k, task) in tasks
                .iter()
                .enumerate()
                .skip(i * chunk)
                .take(groups[i].len())
            {
                let one = std::slice::from_ref(task);
                let r = map_tasks(1, 1, |_| self.run_group(one, k, second_order))
                    .map_err(|e| reindex(e, k))?;
                if !r[0].finite {
                    bad.push(k);
                }
            }
        }
        let n = tasks.len();
        let zeros = self
            .params
            .tensors()
            .iter()
            .map(|p| ArrayD::zeros(p.raw_dim()));
        let b = Self::reduce(zeros.collect(), per_group, n, F::one());
        self.check_filed(&b.observed)?;
        let inv = F::c(1.0 / n as f64);
        let mut update = b.sums;
        update.iter_mut().for_each(|g| g.mapv_inplace(|v| v * inv));
        Ok(BatchResult {
            update,
            stats: StepStats {
                second_order,
                ..b.stats
            },
            observed: b.observed,
            bad_tasks: bad,
        })
    }

    /// Refuses a step of a model that declares batch norms but filed no statistics in
    /// [`NormMode::Train`]: its running statistics would stay empty, and inductive
    /// evaluation would later fail for a reason that is not the real one.
    fn check_filed(&self, observed: &[Observed<F>]) -> Result<()> {
        let channels = self.model.batch_norm_channels();
        if self.config.train_mode == NormMode::Train && observed.is_empty() && !channels.is_empty()
        {
            return Err(Error::Config(format!(
                "the model declares {} batch norms (Model::batch_norm_channels: {channels:?}) \
                 but its forward pass filed no statistics in NormMode::Train; file them with \
                 Ctx::batch_norm (or push an Observed for each batch norm into ctx.observed)",
                channels.len()
            )));
        }
        Ok(())
    }

    /// Folds per-group results in task order into `sums` (`sum += scale · result`, the
    /// mapper's reduction), the losses and accuracies summed and averaged over `n` tasks,
    /// the statistics appended.
    fn reduce(
        mut sums: Vec<ArrayD<F>>,
        per_group: Vec<GroupResult<F>>,
        n: usize,
        scale: F,
    ) -> Reduced<F> {
        accumulate_in_order(&mut sums, per_group.iter().map(|r| &r.result), scale);
        let cg = CgStats::fold(per_group.iter().filter_map(|r| r.cg));
        let (mut loss, mut acc, mut has_acc) = (0.0, 0.0, false);
        let mut observed = Vec::new();
        // Each entry's loss is the sum over its tasks (one task, or a chunk).
        for r in per_group {
            loss += r.loss;
            if let Some(a) = r.accuracy {
                acc += a;
                has_acc = true;
            }
            observed.extend(r.observed);
        }
        let n = n.max(1) as f64;
        Reduced {
            sums,
            stats: StepStats {
                loss: loss / n,
                accuracy: has_acc.then_some(acc / n),
                second_order: false,
                skipped: false,
                cg,
            },
            observed,
        }
    }

    /// Applies a meta-batch's update with `opt` if everything it touches stays finite;
    /// otherwise changes nothing and follows [`MetaConfig::on_non_finite`].
    fn commit(
        &mut self,
        during: &'static str,
        batch: BatchResult<F>,
        opt: &mut Optimizer<F>,
    ) -> Result<StepStats> {
        let param = if batch.bad_tasks.is_empty() && batch.stats.loss.is_finite() {
            match self.try_apply(&batch.update, &batch.observed, opt) {
                Ok(()) => return Ok(batch.stats),
                Err(param) => param,
            }
        } else {
            let names = self.params.names();
            let bad = batch.update.iter().position(|g| !all_finite(g));
            bad.map(|i| names[i].clone())
        };
        match self.config.on_non_finite {
            NonFinite::Error => {
                let step = self.meta_batches();
                let e = imaml::not_converged(&self.config, during, step, &batch, param.is_some());
                Err(e.unwrap_or(Error::NonFinite {
                    during,
                    step,
                    tasks: batch.bad_tasks,
                    param,
                    data: None,
                }))
            }
            NonFinite::Skip => {
                self.skipped_steps += 1;
                Ok(StepStats {
                    skipped: true,
                    ..batch.stats
                })
            }
        }
    }

    /// Applies a meta-gradient (or any update direction, e.g. from
    /// [`MetaLearner::meta_gradient`] combined across processes) with `opt`, folds in the
    /// observed batch-norm statistics and counts the step — all or nothing: if the update,
    /// the new parameters, the optimiser's new state or the new statistics are not
    /// finite, nothing changes.
    ///
    /// # Errors
    /// [`Error::NonFinite`] (`during: "apply"`) naming the first
    /// parameter affected; [`Error::Config`] for an update that does
    /// not match the parameters or an optimiser that cannot step
    /// ([`Optimizer::validate`]).
    pub fn apply(
        &mut self,
        update: &[ArrayD<F>],
        observed: &[Observed<F>],
        opt: &mut Optimizer<F>,
    ) -> Result<()> {
        opt.validate()?;
        let fits = update.len() == self.params.len()
            && update
                .iter()
                .zip(self.params.tensors())
                .all(|(u, p)| u.shape() == p.shape());
        if !fits {
            return Err(Error::Config(format!(
                "an update of {} tensors does not match the learner's {} parameters",
                update.len(),
                self.params.len()
            )));
        }
        if let Some(o) = observed.iter().find(|o| {
            self.norm.stats.get(o.layer).is_none_or(|steps| {
                let r = &steps[o.step.min(steps.len() - 1)];
                o.mean.len() != r.mean.len() || o.var.len() != r.var.len()
            })
        }) {
            return Err(Error::Config(format!(
                "observed statistics for batch norm {} (inner step {}, {} channels) do not \
                 match the learner's running statistics",
                o.layer,
                o.step,
                o.mean.len()
            )));
        }
        if let Some(n) = opt.state_len().filter(|&n| n != self.params.len()) {
            return Err(Error::Config(format!(
                "the optimiser holds state for {n} tensors, the learner has {}",
                self.params.len()
            )));
        }
        self.try_apply(update, observed, opt)
            .map_err(|param| Error::NonFinite {
                during: "apply",
                step: self.meta_batches(),
                tasks: Vec::new(),
                param,
                data: None,
            })
    }

    /// The all-or-nothing update: tried on copies, committed only if everything stays
    /// finite; otherwise the first thing that does not, by name.
    fn try_apply(
        &mut self,
        update: &[ArrayD<F>],
        observed: &[Observed<F>],
        opt: &mut Optimizer<F>,
    ) -> std::result::Result<(), Option<String>> {
        // A non-finite update component always makes the new parameters or the
        // optimiser's state non-finite, so the results alone are checked; the update is
        // scanned only to name the parameter when something failed.
        let mut tensors = self.params.tensors().to_vec();
        let (mut next_opt, mut norm) = (opt.clone(), self.norm.clone());
        next_opt.step(&mut tensors, update);
        norm.update(observed);
        let failed = !tensors.iter().all(all_finite)
            || next_opt.first_non_finite_state().is_some()
            || first_non_finite_stats(&norm).is_some();
        if failed {
            let names = self.params.names();
            return Err(update
                .iter()
                .position(|g| !all_finite(g))
                .or_else(|| tensors.iter().position(|p| !all_finite(p)))
                .or_else(|| next_opt.first_non_finite_state())
                .map(|i| names[i].clone())
                .or_else(|| first_non_finite_stats(&norm)));
        }
        for (p, t) in self.params.tensors_mut().iter_mut().zip(tensors) {
            *p = t;
        }
        self.norm = norm;
        *opt = next_opt;
        self.step += 1;
        Ok(())
    }

    /// One Reptile step (Nichol et al., 2018): adapt on each support set with `steps`
    /// plain SGD steps (first order), then move the initialisation towards the mean
    /// adapted parameters by giving `opt` the direction `θ − mean(φ)`. All or nothing,
    /// as [`MetaLearner::meta_step`].
    ///
    /// # Errors
    /// As [`MetaLearner::meta_step`], and [`Error::Config`] for
    /// zero inner steps (the direction would be zero, and Adam's momentum alone would
    /// move the parameters).
    pub fn reptile_step(&mut self, tasks: &[Task<F>], opt: &mut Optimizer<F>) -> Result<StepStats> {
        self.check_request(tasks, opt)?;
        if self.config.inner_steps == 0 {
            return Err(Error::Config(
                "a Reptile step needs at least one inner step (MetaConfig::inner_steps is 0)"
                    .into(),
            ));
        }
        let steps = self.config.inner_steps;
        let probe = Probe::new(&self.config, true, false, &tasks[..1]);
        let per_task = self.map_groups(tasks.len(), probe, |i| {
            let task = &tasks[i];
            let mut t = Tape::new();
            let theta = self.params.place(&mut t);
            let net = &theta[..self.net_len];
            let mut ctx = self.train_ctx(i);
            let inner = InnerLoop {
                rule: InnerRule::Sgd,
                ..self.inner_loop(steps, false)
            };
            let run = inner.episode(&mut t, net, &[], task, &last_step_only(steps), &mut ctx);
            let last = run.trajectory.last().expect("trajectory");
            let acc = task.query_y.accuracy(t.value(run.query_out));
            // φ for the network; the learned rates (if any) do not move.
            let phi: Vec<ArrayD<F>> = last
                .iter()
                .map(|v| t.value(*v).clone())
                .chain(self.params.tensors()[self.net_len..].iter().cloned())
                .collect();
            let loss = t.item(run.loss);
            GroupResult {
                finite: loss.is_finite()
                    && phi.iter().all(all_finite)
                    && observed_finite(&ctx.observed),
                result: phi,
                loss,
                accuracy: acc,
                observed: ctx.observed,
                cg: None,
            }
        })?;
        let bad = (0..tasks.len()).filter(|&i| !per_task[i].finite).collect();
        let n = tasks.len();
        let inv = F::c(1.0 / n as f64);
        // θ − mean(φ), accumulated as θ − Σ φ/n in task order.
        let theta = self.params.tensors().to_vec();
        let mut b = Self::reduce(theta, per_task, n, -inv);
        // The learned inner rates (if any) are not Reptile's to move: exactly zero, not
        // θ − Σθ/n, whose rounding Adam would scale up into a real step.
        b.sums[self.net_len..]
            .iter_mut()
            .for_each(|d| d.fill(F::zero()));
        let batch = BatchResult {
            update: b.sums,
            stats: b.stats,
            observed: b.observed,
            bad_tasks: bad,
        };
        self.commit("reptile_step", batch, opt)
            .map_err(|e| name_data_cause(e, tasks))
    }
}
