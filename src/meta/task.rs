//! One few-shot task as the meta-learners take it.

use crate::data::{cast, Episode, EpisodeBatch, SinusoidBatch};
use crate::nn::Targets;
use crate::Float;
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

    /// A classification task from one episode.
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
