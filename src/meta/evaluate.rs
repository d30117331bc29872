//! Evaluating a learner on one task: adapt on the support set, score the query set.

use super::{imaml, last_step_only, MetaLearner, Task};
use crate::map_fn::map_tasks;
use crate::nn::{Ctx, Model, NormMode};
use crate::{Error, Float, Result, Tape};

impl<F: Float, M: Model<F>> MetaLearner<F, M> {
    /// Adapts to one task's support set with `steps` inner steps (which may differ from
    /// training) and returns the query loss and accuracy (`None` for regression). `mode`
    /// is how batch norms normalise; it is required because it changes what is measured
    /// (see [`NormMode`]). Nothing is updated.
    ///
    /// # Errors
    /// [`Error::Config`] for a task with an empty support or query
    /// set ([`Task::validate`]) or an inner rate that is not finite;
    /// [`Error::Task`] (index 0) if the task does not fit the model
    /// (a label out of range, inputs of the wrong shape);
    /// [`Error::NonFinite`] if the loss is not finite.
    pub fn evaluate_task(
        &self,
        task: &Task<F>,
        steps: usize,
        mode: NormMode,
    ) -> Result<(f64, Option<f64>)> {
        task.validate()?;
        self.config.validate()?;
        self.check_outputs(std::slice::from_ref(task))?;
        let (loss, acc) = map_tasks(1, 1, |_| self.evaluate_unchecked(task, steps, mode))?
            .pop()
            .expect("one task");
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                during: "evaluate",
                step: self.meta_batches(),
                tasks: vec![0],
                param: None,
                data: task.first_non_finite().map(|d| format!("task 0: {d}")),
            });
        }
        Ok((loss, acc))
    }

    fn evaluate_unchecked(
        &self,
        task: &Task<F>,
        steps: usize,
        mode: NormMode,
    ) -> (f64, Option<f64>) {
        if let Some(imaml) = &self.config.implicit {
            return imaml::evaluate(self, imaml, task, steps, mode);
        }
        let mut t = Tape::new();
        let theta = self.params.place(&mut t);
        let (net, rates) = theta.split_at(self.net_len);
        let mut ctx = Ctx::new(mode).with_running(&self.norm);
        let inner = self.inner_loop(steps, false);
        let run = inner.episode(&mut t, net, rates, task, &last_step_only(steps), &mut ctx);
        (
            t.item(run.loss),
            task.query_y.accuracy(t.value(run.query_out)),
        )
    }
}
