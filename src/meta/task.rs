//! One few-shot task as the meta-learners take it.

use crate::data::{cast, Episode, EpisodeBatch, SinusoidBatch};
use crate::nn::Targets;
use crate::{Error, Float, Result};
use ndarray::{ArrayD, Axis};

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

    /// The shapes of the task's inputs and targets (for comparing tasks of a batch).
    fn layout(&self) -> [Vec<usize>; 4] {
        let targets = |y: &Targets<F>| match y {
            Targets::Classes(c) => vec![c.len()],
            Targets::Probabilities(v) | Targets::Values(v) | Targets::StackedValues(v) => {
                v.shape().to_vec()
            }
        };
        [
            self.support_x.shape().to_vec(),
            targets(&self.support_y),
            self.query_x.shape().to_vec(),
            targets(&self.query_y),
        ]
    }

    /// Checks a meta-batch before it changes anything: at least one task, every task
    /// [valid](Task::validate), and all tasks of the first one's shapes and kind of
    /// target.
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
        let (layout, k0) = (first.layout(), kind(first));
        for (i, task) in tasks.iter().enumerate() {
            task.validate().map_err(|e| match e {
                Error::Config(m) => Error::Config(format!("task {i} of the meta-batch: {m}")),
                e => e,
            })?;
            if kind(task) != k0 {
                return Err(Error::Config(format!(
                    "task {i} of the meta-batch has another kind of targets than task 0 \
                     ({:?} vs {:?})",
                    [&task.support_y, &task.query_y].map(kind_name),
                    [&first.support_y, &first.query_y].map(kind_name)
                )));
            }
            let l = task.layout();
            if l != layout {
                return Err(Error::Config(format!(
                    "task {i} of the meta-batch has shapes {l:?} (support inputs, support \
                     targets, query inputs, query targets), but task 0 has {layout:?}"
                )));
            }
        }
        Ok(())
    }

    /// Regression tasks of equal shapes stacked along a new dimension 0, as one task
    /// whose targets are [`Targets::StackedValues`] (for models that batch tasks).
    ///
    /// # Panics
    /// If a task is not a regression task or the shapes differ.
    pub fn stack(tasks: &[Task<F>]) -> Task<F> {
        let stack = |get: &dyn Fn(&Task<F>) -> &ArrayD<F>| -> ArrayD<F> {
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
