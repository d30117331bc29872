//! The configuration of meta-training: the inner rule, the order of the meta-gradient,
//! the policy for non-finite steps, and [`MetaConfig`] that holds them. It sits below the
//! learner and the episode loop, which both read it.

use super::imaml::Imaml;
use crate::nn::NormMode;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the inner loop updates the adapted parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InnerRule {
    /// `φ ← φ − α ∇L` for every parameter (MAML, Reptile).
    Sgd,
    /// `φ ← φ − α ⊙ ∇L` with a learned rate per parameter element (Meta-SGD).
    MetaSgd,
    /// `φ ← φ − α[l, s] ∇L` with a learned rate per parameter tensor `l` and inner step
    /// `s` (MAML++'s "per-layer per-step" rates, LSLR: one per weight and one per bias).
    /// Checkpoints written with its former name `PerLayerPerStep` still load.
    #[serde(alias = "PerLayerPerStep")]
    PerTensorPerStep,
    /// `φ ← φ − α ∇L` for the head only; the body is shared (ANIL).
    HeadOnly,
}

/// Which meta-gradient to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Differentiate through the inner updates (exact MAML).
    Second,
    /// Treat the inner gradients as constants (FOMAML): the meta-gradient is the query
    /// gradient at the adapted parameters.
    First,
    /// First order for the first `first_order_steps` meta-steps, then second order
    /// (MAML++'s derivative-order annealing).
    Annealed {
        /// Meta-steps taken at first order.
        first_order_steps: u64,
    },
}

impl Order {
    /// Whether meta-step `step` uses second order.
    pub fn second_order_at(self, step: u64) -> bool {
        match self {
            Order::Second => true,
            Order::First => false,
            Order::Annealed { first_order_steps } => step >= first_order_steps,
        }
    }
}

/// Hyper-parameters of meta-training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaConfig {
    /// Inner SGD steps during meta-training.
    pub inner_steps: usize,
    /// Inner learning rate α (the initial value where it is learned).
    pub inner_lr: f64,
    /// The inner update rule.
    pub rule: InnerRule,
    /// First or second order.
    pub order: Order,
    /// MAML++ multi-step loss: the meta-loss weighs the query loss after every inner step,
    /// annealing to the last step only over this many meta-steps.
    pub multi_step_loss: Option<u64>,
    /// How batch norms normalise during meta-training (usually [`NormMode::Train`]).
    pub train_mode: NormMode,
    /// At most this many tasks (or task chunks) run at once.
    pub parallel_iterations: usize,
    /// For models that [batch tasks](crate::nn::Model::batches_tasks): how many tasks share one tape
    /// and run as one batched computation. Small tasks (sinusoids) are dominated by
    /// per-op overhead, which this divides by the chunk size. `0` (the default) means
    /// half the meta-batch, rounded up: two chunks, enough to keep two cores busy; set it
    /// smaller to spread a meta-batch over more cores. The chunking depends only on this
    /// number and the meta-batch size, never on the thread count, so results stay
    /// thread-independent.
    pub task_chunk: usize,
    /// What a meta-step does when a task's loss or the meta-gradient is not finite
    /// (NaN or ±∞): refuse with [`Error::NonFinite`] (the
    /// default) or skip the step and count it. Either way, nothing non-finite ever
    /// reaches the parameters.
    #[serde(default)]
    pub on_non_finite: NonFinite,
    /// iMAML: take the implicit meta-gradient at the end point of a regularised inner
    /// loop instead of differentiating through it (see [`imaml`](super::imaml)). `None` (the default,
    /// and what checkpoints without the field read as): the rule's own meta-gradient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implicit: Option<Imaml>,
    /// What the inner loop keeps for the outer backward pass: every inner step's graph
    /// ([`Memory::Stored`], the default, and what configurations and checkpoints without
    /// the field read as) or only each step's parameters, the graphs rebuilt during the
    /// outer backward ([`Memory::Recompute`]). The meta-gradient, loss and statistics are
    /// bitwise the same either way; like [`parallel_iterations`](Self::parallel_iterations)
    /// it is the machine's choice, so a checkpoint's restore keeps the learner's.
    #[serde(default, skip_serializing_if = "Memory::is_stored")]
    pub memory: Memory,
    /// A bound, in bytes, on the memory the tasks in flight hold together: at most
    /// `budget / per_task` tasks (or task chunks) run at once, and never more than
    /// [`parallel_iterations`](Self::parallel_iterations). `None` (the default, and what
    /// configurations and checkpoints without the field read as): no bound but
    /// `parallel_iterations`. See [`with_memory_budget`](Self::with_memory_budget).
    ///
    /// Like `parallel_iterations` and [`memory`](Self::memory) it is the machine's
    /// choice and changes no result, so a checkpoint's restore keeps the learner's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<u64>,
}

/// What the inner loop keeps for the outer backward pass of a second-order (or
/// first-order) meta-gradient ([`MetaConfig::memory`]).
///
/// Both modes give bitwise the same meta-gradient, loss, accuracy and batch-norm
/// statistics, for every inner rule, order and number of steps, on any number of
/// threads: the recomputed graphs are the same ops on the same values, and their
/// adjoints are added in the order one backward pass over the stored graphs adds them
/// ([`Tape::grad_seeded_onto`](crate::Tape::grad_seeded_onto)).
///
/// ```
/// use metagrad::meta::{Memory, MetaConfig};
/// let config = MetaConfig::maml(25, 0.01).with_memory(Memory::Recompute);
/// assert_eq!(config.memory, Memory::Recompute);
/// assert_eq!(MetaConfig::maml(1, 0.01).memory, Memory::Stored);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Memory {
    /// Keep every inner step's graph (activations and the recorded inner backward) on one
    /// tape until the outer backward: memory grows with the inner steps, each graph is
    /// built once.
    #[default]
    Stored,
    /// Gradient checkpointing of the inner loop: run it forward keeping only each step's
    /// parameters (the fast weights; for first order, also each step's inner gradient),
    /// score the query set, then walk the steps backwards, rebuilding each step's graph
    /// on a fresh tape from its stored parameters and back-propagating the adjoint of
    /// its result. Memory is about one step's graph whatever the number of steps; the
    /// time is about one more forward pass and inner backward per step but the last
    /// (first order rebuilds nothing: its updates need only the stored gradients).
    /// Not used by iMAML, whose memory is already flat in the steps, nor by Reptile and
    /// evaluation, which have no outer backward.
    Recompute,
}

impl Memory {
    /// Whether this is [`Memory::Stored`] (the default).
    pub fn is_stored(&self) -> bool {
        *self == Memory::Stored
    }
}

/// What [`MetaLearner::meta_step`](super::MetaLearner::meta_step) and [`MetaLearner::reptile_step`](super::MetaLearner::reptile_step) do with a step
/// whose loss or update is not finite. In both cases the learner's parameters, running
/// statistics, step counter and the optimiser's state stay exactly as they were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NonFinite {
    /// Return [`Error::NonFinite`], naming the meta-step, the
    /// tasks and the first parameter affected.
    #[default]
    Error,
    /// Skip the step, count it in [`MetaLearner::skipped_steps`](super::MetaLearner::skipped_steps), and report it in
    /// [`StepStats::skipped`](super::StepStats::skipped) (as PyTorch's gradient scaler skips steps with
    /// non-finite gradients in mixed precision).
    Skip,
}

fn default_task_chunk() -> usize {
    0
}

impl MetaConfig {
    /// Second-order MAML with `inner_steps` SGD steps of rate `inner_lr`.
    pub fn maml(inner_steps: usize, inner_lr: f64) -> Self {
        MetaConfig {
            inner_steps,
            inner_lr,
            rule: InnerRule::Sgd,
            order: Order::Second,
            multi_step_loss: None,
            train_mode: NormMode::Train,
            parallel_iterations: usize::MAX,
            task_chunk: default_task_chunk(),
            on_non_finite: NonFinite::Error,
            implicit: None,
            memory: Memory::Stored,
            memory_budget: None,
        }
    }

    /// The same with the tasks in flight bounded by memory: at most `budget_bytes`
    /// together ([`MetaConfig::memory_budget`]).
    ///
    /// The learner measures what one task holds — the bytes of the tensor values on its
    /// tapes at their peak ([`Tape::peak_bytes`](crate::Tape::peak_bytes), for all the
    /// tapes a task keeps at once), less under [`Memory::Recompute`] — and runs
    /// `budget_bytes / per_task` tasks at once, at least one and at most
    /// [`parallel_iterations`](Self::parallel_iterations) (and the pool's threads). Until
    /// it has a figure for the step's kind (order, memory mode, inner steps, task chunk
    /// and task size), the first task runs alone and is measured; every step refreshes
    /// the figure with its largest task. A budget below one task's need still runs one
    /// task at a time: the step is never refused.
    /// [`MetaLearner::concurrency`](super::MetaLearner::concurrency) says what was
    /// chosen.
    ///
    /// The figure counts tensor values only: the temporary buffers inside ops (a
    /// convolution's unfolded input), what ops keep beside their values (max-pooling's
    /// index maps, ReLU's masks), what a task holds off its tapes (the recomputing
    /// inner loop's per-step parameters, iMAML's conjugate-gradient vectors), the
    /// parameters and the allocator's own overhead come on top, so leave room for them.
    /// A figure is reused for steps of the same kind; tasks whose sizes change from step
    /// to step are measured again (their first task alone) at every change.
    ///
    /// The budget bounds meta-steps, [`meta_gradient`](super::MetaLearner::meta_gradient)
    /// and Reptile steps. Evaluation ([`crate::eval::evaluate`]) takes its own bound on
    /// the tasks at once. Across MPI ranks, a step of a kind not yet measured runs one
    /// task at a time on every rank (the ranks must make the same exchanges); a rank
    /// whose block of a step is empty keeps the figure it had.
    ///
    /// The results (meta-gradient, loss, accuracy, statistics, parameters) are bitwise
    /// the same at any concurrency: tasks are reduced in their order, whatever ran when.
    ///
    /// ```
    /// use metagrad::data::SinusoidSampler;
    /// use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
    /// use metagrad::nn::Mlp;
    /// let config = MetaConfig::maml(1, 0.01).with_memory_budget(1 << 30); // 1 GiB
    /// let mut learner = MetaLearner::<f32, _>::new(Mlp::sinusoid(), config, 0);
    /// let mut opt = Optimizer::adam(1e-3);
    /// let batch = SinusoidSampler::new(10, 10, 7).unwrap().sample_batch(4).unwrap();
    /// learner.meta_step(&Task::from_sinusoid(&batch), &mut opt).unwrap();
    /// let c = learner.concurrency();
    /// assert!(c.task_bytes.unwrap() > 0);
    /// assert!(c.tasks >= 1);
    /// ```
    pub fn with_memory_budget(mut self, budget_bytes: u64) -> Self {
        self.memory_budget = Some(budget_bytes);
        self
    }

    /// The same with another inner-loop memory mode.
    pub fn with_memory(mut self, memory: Memory) -> Self {
        self.memory = memory;
        self
    }

    /// The same with another inner rule.
    pub fn with_rule(mut self, rule: InnerRule) -> Self {
        self.rule = rule;
        self
    }

    /// The same with another order.
    pub fn with_order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// The same with another policy for non-finite steps.
    pub fn with_non_finite(mut self, policy: NonFinite) -> Self {
        self.on_non_finite = policy;
        self
    }

    /// Checks that the configuration can produce meaningful steps.
    ///
    /// # Errors
    /// [`Error::Config`] for an inner learning rate that is not
    /// finite, a [memory budget](Self::memory_budget) of zero bytes, or iMAML settings
    /// that cannot be used ([`Imaml::validate`]).
    pub fn validate(&self) -> Result<()> {
        if !self.inner_lr.is_finite() {
            return Err(Error::Config(format!(
                "the inner learning rate is {}; it must be a finite number",
                self.inner_lr
            )));
        }
        if self.memory_budget == Some(0) {
            return Err(Error::Config(
                "the memory budget is 0 bytes; give a positive number of bytes, or None \
                 for no bound (a budget below one task's need runs one task at a time)"
                    .into(),
            ));
        }
        match &self.implicit {
            Some(imaml) => imaml.validate(self),
            None => Ok(()),
        }
    }
}
