//! Helpers shared by the integration tests.

use metagrad::meta::{MetaLearner, Optimizer};
use metagrad::nn::Model;
use metagrad::Float;
use std::fmt::Debug;

/// Everything a step or a run could change, for bitwise comparison: parameters,
/// normalisation statistics, step and skip counters, optimiser state.
pub fn state<F: Float, M: Model<F> + Clone>(
    l: &MetaLearner<F, M>,
    opt: &Optimizer<F>,
) -> impl PartialEq + Debug {
    (
        l.params.clone(),
        l.norm.clone(),
        l.step,
        l.skipped_steps,
        opt.clone(),
    )
}
