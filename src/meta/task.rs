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
