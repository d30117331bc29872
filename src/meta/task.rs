//! One few-shot task as the meta-learners take it.

use crate::data::{cast, Episode, EpisodeBatch, SinusoidBatch};
use crate::{Error, Float, Result, Tape, Var};
use ndarray::{ArrayD, Axis, Dimension, IxDyn};

/// Task targets: class indices or class-probability rows (softmax cross-entropy), or
/// values (mean-squared error).
#[derive(Debug, Clone, PartialEq)]
pub enum Targets<F> {
    /// Class indices, one per example (sparse labels).
    Classes(Vec<usize>),
    /// One row of class probabilities per example, `[N, K]`: one-hot or soft labels
    /// (dense labels). One-hot rows give the same loss, gradients and meta-gradients as
    /// [`Targets::Classes`].
    Probabilities(ArrayD<F>),
    /// Regression targets, shaped like the network's output.
    Values(ArrayD<F>),
    /// Regression targets of several tasks stacked along dimension 0 (a task batch):
    /// the loss is the *sum* over tasks of each task's mean-squared error, so its
    /// gradient with respect to stacked per-task parameters is each task's own gradient.
    StackedValues(ArrayD<F>),
}

impl<F: Float> Targets<F> {
    /// The task loss: softmax cross-entropy for classes (sparse) and probabilities
    /// (dense), mean-squared error for values.
    ///
    /// # Panics
    /// If the output does not fit the targets (the tape op's shape panic).
    #[track_caller]
    pub fn loss(&self, t: &mut Tape<F>, output: Var) -> Var {
        match self {
            Targets::Classes(c) => t.sparse_cross_entropy(output, c),
            Targets::Probabilities(p) => {
                let y = t.constant(p.clone());
                t.cross_entropy(output, y)
            }
            Targets::Values(v) => {
                let y = t.constant(v.clone());
                t.mse(output, y)
            }
            Targets::StackedValues(v) => {
                let per_task = v.len() / v.shape().first().copied().unwrap_or(1).max(1);
                let y = t.constant(v.clone());
                let d = t.sub(output, y);
                let d2 = t.square(d);
                let s = t.sum(d2);
                t.mul_scalar(s, 1.0 / per_task.max(1) as f64)
            }
        }
    }

    /// Number of examples (rows) the targets cover.
    pub fn len(&self) -> usize {
        match self {
            Targets::Classes(c) => c.len(),
            Targets::Probabilities(v) | Targets::Values(v) => {
                v.shape().first().copied().unwrap_or(1)
            }
            Targets::StackedValues(v) => v.shape().get(1).copied().unwrap_or(1),
        }
    }

    /// The targets' shape (`[N]` for class indices).
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Targets::Classes(c) => vec![c.len()],
            Targets::Probabilities(v) | Targets::Values(v) | Targets::StackedValues(v) => {
                v.shape().to_vec()
            }
        }
    }

    /// Whether `other` has the same kind and shape.
    fn same_shape(&self, other: &Targets<F>) -> bool {
        match (self, other) {
            (Targets::Classes(a), Targets::Classes(b)) => a.len() == b.len(),
            (Targets::Probabilities(a), Targets::Probabilities(b))
            | (Targets::Values(a), Targets::Values(b))
            | (Targets::StackedValues(a), Targets::StackedValues(b)) => a.shape() == b.shape(),
            _ => false,
        }
    }

    /// The targets as an array, unless they are class indices.
    pub fn values(&self) -> Option<&ArrayD<F>> {
        match self {
            Targets::Classes(_) => None,
            Targets::Probabilities(v) | Targets::Values(v) | Targets::StackedValues(v) => Some(v),
        }
    }

    /// Whether the targets cover no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fraction of rows whose arg-max is the class (for [`Targets::Probabilities`], the
    /// row's most probable class); `None` for regression. A row with a NaN output counts
    /// as a miss.
    pub fn accuracy(&self, output: &ArrayD<F>) -> Option<f64> {
        let argmax = |row: &[F]| (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        // The predicted class of an output row; none where the row holds a NaN.
        let predicted = |row: &[F]| (!row.iter().any(|v| v.is_nan())).then(|| argmax(row));
        let k = output.shape()[1].max(1);
        let rows = output.as_slice()?.chunks_exact(k);
        let hits = match self {
            Targets::Classes(c) => rows
                .zip(c)
                .filter(|(row, &y)| predicted(row) == Some(y))
                .count(),
            Targets::Probabilities(p) => {
                let labels = p.as_slice()?.chunks_exact(p.shape()[1].max(1));
                rows.zip(labels)
                    .filter(|(row, y)| predicted(row) == Some(argmax(y)))
                    .count()
            }
            Targets::Values(_) | Targets::StackedValues(_) => return None,
        };
        Some(hits as f64 / self.len().max(1) as f64)
    }
}

/// A task: a support set to adapt on and a query set to evaluate on.
#[derive(Debug, Clone, PartialEq)]
pub struct Task<F> {
    /// Support inputs (`[K, ...]`).
    pub support_x: ArrayD<F>,
    /// Support targets.
    pub support_y: Targets<F>,
    /// Query inputs (`[Q, ...]`).
    pub query_x: ArrayD<F>,
    /// Query targets.
    pub query_y: Targets<F>,
}

impl<F: Float> Task<F> {
    /// Whether the targets are regression values.
    pub fn is_regression(&self) -> bool {
        matches!(self.support_y, Targets::Values(_)) && matches!(self.query_y, Targets::Values(_))
    }

    /// Checks that the task can produce a meaningful loss: non-empty support and query
    /// sets, as many targets as inputs in each, and dense labels shaped `[N, K]`.
    ///
    /// # Errors
    /// [`Error::Config`] saying what is wrong.
    pub fn validate(&self) -> Result<()> {
        for (set, x, y) in [
            ("support", &self.support_x, &self.support_y),
            ("query", &self.query_x, &self.query_y),
        ] {
            let n = x.shape().first().copied().unwrap_or(0);
            if n == 0 {
                return Err(Error::Config(format!(
                    "the {set} set is empty (inputs of shape {:?}); every task needs at least \
                     one {set} example",
                    x.shape()
                )));
            }
            if y.len() != n {
                return Err(Error::Config(format!(
                    "the {set} set has {n} inputs (shape {:?}) but {} targets",
                    x.shape(),
                    y.len()
                )));
            }
            if let Targets::Probabilities(p) = y {
                if p.ndim() != 2 || p.shape()[1] == 0 {
                    return Err(Error::Config(format!(
                        "the {set} set's class probabilities must be [N, K] with K > 0, \
                         got {:?}",
                        p.shape()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether `other` has this task's shapes (without allocating: it runs every step).
    fn same_layout(&self, other: &Task<F>) -> bool {
        self.support_x.shape() == other.support_x.shape()
            && self.query_x.shape() == other.query_x.shape()
            && self.support_y.same_shape(&other.support_y)
            && self.query_y.same_shape(&other.query_y)
    }

    /// Checks a meta-batch before it changes anything: at least one task, every task
    /// [valid](Task::validate), and all tasks with the first one's kind of targets.
    ///
    /// Tasks of different shapes (1-shot and 5-shot episodes, say) may share a meta-batch:
    /// each runs on its own tape, and the meta-gradient is reduced in task order as
    /// always, so the result does not depend on the threads or ranks.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first task that is wrong and how.
    pub fn validate_batch(tasks: &[Task<F>]) -> Result<()> {
        let Some(first) = tasks.first() else {
            return Err(Error::Config(
                "an empty meta-batch: a meta-step needs at least one task".into(),
            ));
        };
        let kind = |t: &Task<F>| [&t.support_y, &t.query_y].map(std::mem::discriminant);
        let k0 = kind(first);
        for (i, task) in tasks.iter().enumerate() {
            task.validate().map_err(|e| match e {
                Error::Config(m) => Error::Config(format!("task {i} of the meta-batch: {m}")),
                e => e,
            })?;
            if kind(task) != k0 {
                return Err(Error::Config(format!(
                    "task {i} of the meta-batch has another kind of targets than task 0 \
                     ({:?} vs {:?}); classification and regression tasks cannot share a \
                     meta-batch",
                    [&task.support_y, &task.query_y].map(kind_name),
                    [&first.support_y, &first.query_y].map(kind_name)
                )));
            }
        }
        Ok(())
    }

    /// Checks the targets against a network with `outputs` outputs: every class label
    /// below `outputs`, and class-probability rows `outputs` wide.
    ///
    /// # Errors
    /// [`Error::Config`] naming the set, the position and the label.
    pub fn check_outputs(&self, outputs: usize) -> Result<()> {
        for (set, y) in [("support_y", &self.support_y), ("query_y", &self.query_y)] {
            match y {
                Targets::Classes(c) => {
                    if let Some((i, &l)) = c.iter().enumerate().find(|(_, &l)| l >= outputs) {
                        return Err(Error::Config(format!(
                            "{set}[{i}] is label {l}, out of range for a network with \
                             {outputs} outputs (labels 0..{outputs})"
                        )));
                    }
                }
                Targets::Probabilities(p) if p.shape().get(1) != Some(&outputs) => {
                    return Err(Error::Config(format!(
                        "{set} holds class-probability rows of shape {:?}, but the network \
                         has {outputs} outputs",
                        p.shape()
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The first value of the task's data that is not finite (NaN or ±∞), named by array
    /// and position: `"query_x[2, 0, 5, 7] = NaN"`. The meta-learners look for it only
    /// after a step failed, so healthy steps pay nothing.
    pub fn first_non_finite(&self) -> Option<String> {
        let arrays: [(&str, Option<&ArrayD<F>>); 4] = [
            ("support_x", Some(&self.support_x)),
            ("support_y", self.support_y.values()),
            ("query_x", Some(&self.query_x)),
            ("query_y", self.query_y.values()),
        ];
        arrays.into_iter().find_map(|(name, a)| {
            let a = a?;
            a.indexed_iter()
                .find(|(_, v)| !v.is_finite())
                .map(|(at, v)| format!("{name}{:?} = {v}", at.slice()))
        })
    }

    /// How many tasks of `tasks` share one tape: `task_chunk` (0: half the meta-batch,
    /// rounded up) for models that [batch tasks](crate::nn::Model::batches_tasks) when
    /// every task is a regression task of the same shapes, else 1. It depends only on these, never on the
    /// thread count, so results stay thread-independent.
    pub fn chunk_size(tasks: &[Task<F>], task_chunk: usize, model_batches: bool) -> usize {
        let one_layout = tasks.iter().all(|t| t.same_layout(&tasks[0]));
        if model_batches && one_layout && tasks.iter().all(Task::is_regression) {
            match task_chunk {
                0 => tasks.len().div_ceil(2).max(1),
                c => c,
            }
        } else {
            1
        }
    }

    /// Regression tasks of equal shapes stacked along a new dimension 0, as one task
    /// whose targets are [`Targets::StackedValues`] (for models that batch tasks).
    ///
    /// # Panics
    /// If a task is not a regression task or the shapes differ.
    pub fn stack(tasks: &[Task<F>]) -> Task<F> {
        let stack = |get: &dyn Fn(&Task<F>) -> &ArrayD<F>| -> ArrayD<F> {
            let first = tasks.first().map(|t| get(t).shape());
            if let Some(shape) = first.filter(|s| tasks.iter().all(|t| get(t).shape() == *s)) {
                // The common case, one shape: the elements one task after another.
                let mut values = Vec::with_capacity(tasks.len() * get(&tasks[0]).len());
                for t in tasks {
                    let a = get(t);
                    match a.as_slice() {
                        Some(s) => values.extend_from_slice(s),
                        None => values.extend(a.iter().copied()),
                    }
                }
                let mut stacked = Vec::with_capacity(shape.len() + 1);
                stacked.push(tasks.len());
                stacked.extend_from_slice(shape);
                return ArrayD::from_shape_vec(IxDyn(&stacked), values)
                    .expect("tasks of one shape");
            }
            let views: Vec<_> = tasks.iter().map(|t| get(t).view()).collect();
            ndarray::stack(Axis(0), &views).expect("tasks of one shape")
        };
        fn values<F>(y: &Targets<F>) -> &ArrayD<F> {
            match y {
                Targets::Values(v) => v,
                _ => panic!("metagrad::Task::stack: only regression tasks can be stacked"),
            }
        }
        Task {
            support_x: stack(&|t| &t.support_x),
            support_y: Targets::StackedValues(stack(&|t| values(&t.support_y))),
            query_x: stack(&|t| &t.query_x),
            query_y: Targets::StackedValues(stack(&|t| values(&t.query_y))),
        }
    }

    /// One regression task per row of a sinusoid meta-batch.
    pub fn from_sinusoid(batch: &SinusoidBatch) -> Vec<Task<F>> {
        (0..batch.len())
            .map(|i| Task {
                support_x: cast(&batch.xs.index_axis(Axis(0), i)).into_dyn(),
                support_y: Targets::Values(cast(&batch.ys.index_axis(Axis(0), i)).into_dyn()),
                query_x: cast(&batch.xq.index_axis(Axis(0), i)).into_dyn(),
                query_y: Targets::Values(cast(&batch.yq.index_axis(Axis(0), i)).into_dyn()),
            })
            .collect()
    }

    /// A classification task from one episode (sparse labels).
    pub fn from_episode(e: &Episode) -> Task<F> {
        Task {
            support_x: cast(&e.xs).into_dyn(),
            support_y: Targets::Classes(e.ys.to_vec()),
            query_x: cast(&e.xq).into_dyn(),
            query_y: Targets::Classes(e.yq.to_vec()),
        }
    }

    /// One classification task per episode of a meta-batch.
    pub fn from_episodes(batch: &EpisodeBatch) -> Vec<Task<F>> {
        (0..batch.len())
            .map(|i| Task {
                support_x: cast(&batch.xs.index_axis(Axis(0), i)).into_dyn(),
                support_y: Targets::Classes(batch.ys.index_axis(Axis(0), i).to_vec()),
                query_x: cast(&batch.xq.index_axis(Axis(0), i)).into_dyn(),
                query_y: Targets::Classes(batch.yq.index_axis(Axis(0), i).to_vec()),
            })
            .collect()
    }
}

fn kind_name<F>(y: &Targets<F>) -> &'static str {
    match y {
        Targets::Classes(_) => "classes",
        Targets::Probabilities(_) => "probabilities",
        Targets::Values(_) => "values",
        Targets::StackedValues(_) => "stacked values",
    }
}
