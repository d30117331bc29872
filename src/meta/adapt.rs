//! Adapt, then predict: a learner's model adapted to one task, for users.
//!
//! [`MetaLearner::adapt`] runs the inner loop on a support set, exactly as evaluation
//! does, and returns an [`Adapted`] model: its fast weights and what its norms need
//! (the running statistics for [`NormMode::Inductive`], the support set for TaskNorm's
//! context). [`Adapted::logits`], [`Adapted::probabilities`] and [`Adapted::predict`]
//! then run new inputs through it in the chosen [`NormMode`]; on an episode's query set
//! they give the very values [`MetaLearner::evaluate_task`] scores.
//!
//! ```
//! use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Targets, Task};
//! use metagrad::ndarray::{ArrayD, IxDyn};
//! use metagrad::nn::{Conv4, NormMode};
//!
//! // A small Conv-4 for 3-way tasks on 16×16 images, meta-trained for a few steps.
//! let net = Conv4 { image_size: 16, filters: 8, ..Conv4::omniglot(3) };
//! let image = |k: usize, n: usize| {
//!     ArrayD::from_shape_fn(IxDyn(&[n, 1, 16, 16]), |i| ((i[0] + k) * (i[2] + 1) % 7) as f32 / 7.0)
//! };
//! let task = Task {
//!     support_x: image(0, 3),
//!     support_y: Targets::Classes(vec![0, 1, 2]),
//!     query_x: image(1, 6),
//!     query_y: Targets::Classes(vec![0, 1, 2, 0, 1, 2]),
//! };
//! let mut learner = MetaLearner::new(net, MetaConfig::maml(1, 0.4), 0);
//! let mut opt = Optimizer::adam(1e-3);
//! for _ in 0..3 {
//!     learner.meta_step(std::slice::from_ref(&task), &mut opt)?;
//! }
//!
//! // Adapt to the episode's support set with 5 steps, then predict its queries,
//! // normalising with the running statistics (inductive: no query statistics used).
//! let adapted = learner.adapt(&task.support_x, &task.support_y, 5, NormMode::Inductive)?;
//! let probabilities = adapted.probabilities(&task.query_x)?;
//! let classes = adapted.predict(&task.query_x)?;
//! println!("predicted {classes:?}, p = {probabilities:.3}");
//! assert_eq!(probabilities.shape(), &[6, 3]);
//!
//! // The same values as evaluation's.
//! let (loss, accuracy) = learner.evaluate_task(&task, 5, NormMode::Inductive)?;
//! let hits = classes.iter().zip([0, 1, 2, 0, 1, 2]).filter(|(c, y)| **c == Some(*y)).count();
//! assert_eq!(accuracy, Some(hits as f64 / 6.0));
//! assert_eq!(adapted.loss(&task.query_x, &task.query_y)?.to_bits(), loss.to_bits());
//! # Ok::<(), metagrad::Error>(())
//! ```

use super::{imaml, MetaLearner, Targets, Task};
use crate::map_fn::map_tasks;
use crate::nn::{Ctx, Model, NormMode, Params};
use crate::{Error, Float, Result, Tape, Var};
use ndarray::{ArrayD, Axis};

/// A learner's model adapted to one task's support set (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Adapted<'l, F: Float, M> {
    learner: &'l MetaLearner<F, M>,
    params: Params<F>,
    support_x: ArrayD<F>,
    steps: usize,
    mode: NormMode,
}

impl<F: Float, M: Model<F>> MetaLearner<F, M> {
    /// Adapts the model to a support set with `steps` inner steps (the learner's rule,
    /// rate and learned rates; iMAML's regularised solver under
    /// [`MetaConfig::implicit`](super::MetaConfig)), normalising as `mode` says, and
    /// returns the adapted model. Nothing in the learner changes.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty support set or an inner rate that is not finite;
    /// [`Error::Task`] if the support set does not fit the model (a label out of range,
    /// inputs of the wrong shape: the message names the layer);
    /// [`Error::NonFinite`] if the adapted weights are not finite.
    pub fn adapt(
        &self,
        support_x: &ArrayD<F>,
        support_y: &Targets<F>,
        steps: usize,
        mode: NormMode,
    ) -> Result<Adapted<'_, F, M>> {
        self.config.validate()?;
        // A task whose query set is the support set: the checks of evaluation apply.
        let task = Task {
            support_x: support_x.clone(),
            support_y: support_y.clone(),
            query_x: support_x.clone(),
            query_y: support_y.clone(),
        };
        task.validate()?;
        self.check_outputs(std::slice::from_ref(&task))?;
        let fast = map_tasks(1, 1, |_| self.adapt_unchecked(&task, steps, mode))?
            .pop()
            .expect("one task");
        let names = &self.params.names()[..self.network_len()];
        let mut params = Params::new();
        for (name, value) in names.iter().zip(fast) {
            if !value.iter().all(|v| v.is_finite()) {
                return Err(Error::NonFinite {
                    during: "adapt",
                    step: self.meta_batches(),
                    tasks: vec![0],
                    param: Some(name.clone()),
                    data: task.first_non_finite().map(|d| format!("task 0: {d}")),
                });
            }
            params.push(name.clone(), value);
        }
        Ok(Adapted {
            learner: self,
            params,
            support_x: support_x.clone(),
            steps,
            mode,
        })
    }

    fn adapt_unchecked(&self, task: &Task<F>, steps: usize, mode: NormMode) -> Vec<ArrayD<F>> {
        let mut ctx = Ctx::new(mode).with_running(&self.norm);
        let net_len = self.network_len();
        if let Some(im) = &self.config.implicit {
            return imaml::solve_inner(
                &self.model,
                self.config.rule,
                self.config.inner_lr,
                im.lambda,
                steps,
                &self.params.tensors()[..net_len],
                &task.support_x,
                &task.support_y,
                &mut ctx,
            );
        }
        let mut t = Tape::new();
        let theta = self.params.place(&mut t);
        let (net, rates) = theta.split_at(net_len);
        let xs = t.constant(task.support_x.clone());
        let inner = self.inner_loop(steps, false);
        let trajectory = inner.adapt(&mut t, net, rates, xs, &task.support_y, &mut ctx);
        let last = trajectory.last().expect("the start at least");
        last.iter().map(|&v| t.value(v).clone()).collect()
    }
}

impl<F: Float, M: Model<F>> Adapted<'_, F, M> {
    /// The adapted network parameters (fast weights), named as the model's.
    pub fn params(&self) -> &Params<F> {
        &self.params
    }

    /// The norm mode the model adapted and predicts in.
    pub fn mode(&self) -> NormMode {
        self.mode
    }

    /// The inner steps it adapted with.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The network's output for inputs `x` (logits, for a classifier), computed as
    /// evaluation's query pass computes it: with the last inner step's norm sets, in
    /// this model's [`NormMode`] (in [`NormMode::Transductive`] the batch norms use the
    /// statistics of `x` itself), after a pass over the support set for TaskNorm's
    /// context.
    ///
    /// # Errors
    /// [`Error::Task`] if `x` does not fit the model (the message names the layer, the
    /// shape it expects and the one it got).
    pub fn logits(&self, x: &ArrayD<F>) -> Result<ArrayD<F>> {
        let run = |_| {
            let mut t = Tape::new();
            let p = self.params.place(&mut t);
            let out = self.query(&mut t, &p, x);
            t.take(out)
        };
        Ok(map_tasks(1, 1, run)?.pop().expect("one task"))
    }

    /// Class probabilities for inputs `x`: the softmax of [`Adapted::logits`] along the
    /// last axis.
    ///
    /// # Errors
    /// As [`Adapted::logits`].
    pub fn probabilities(&self, x: &ArrayD<F>) -> Result<ArrayD<F>> {
        let run = |_| {
            let mut t = Tape::new();
            let p = self.params.place(&mut t);
            let out = self.query(&mut t, &p, x);
            let s = t.softmax(out);
            t.take(s)
        };
        Ok(map_tasks(1, 1, run)?.pop().expect("one task"))
    }

    /// The predicted class of each input: the index of the largest logit, or `None`
    /// where the output row holds a NaN (nothing is predicted from it).
    ///
    /// # Errors
    /// As [`Adapted::logits`].
    pub fn predict(&self, x: &ArrayD<F>) -> Result<Vec<Option<usize>>> {
        let logits = self.logits(x)?;
        let n = logits.shape().first().copied().unwrap_or(0);
        let width = logits.len() / n.max(1);
        let rows = logits
            .into_shape_with_order((n, width))
            .map_err(|e| Error::Config(format!("metagrad::Adapted::predict: {e}")))?;
        Ok(rows
            .axis_iter(Axis(0))
            .map(|row| {
                if row.iter().any(|v| v.is_nan()) {
                    return None;
                }
                Some((0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b }))
            })
            .collect())
    }

    /// The loss on a labelled set `(x, y)`, as [`MetaLearner::evaluate_task`] computes
    /// it on a query set.
    ///
    /// # Errors
    /// As [`Adapted::logits`], and [`Error::Config`] if `y` does not match `x`.
    pub fn loss(&self, x: &ArrayD<F>, y: &Targets<F>) -> Result<f64> {
        if y.len() != x.shape().first().copied().unwrap_or(0) {
            return Err(Error::Config(format!(
                "metagrad::Adapted::loss: {} targets for {} inputs",
                y.len(),
                x.shape().first().copied().unwrap_or(0)
            )));
        }
        let run = |_| {
            let mut t = Tape::new();
            let p = self.params.place(&mut t);
            let out = self.query(&mut t, &p, x);
            let l = y.loss(&mut t, out);
            t.item(l)
        };
        Ok(map_tasks(1, 1, run)?.pop().expect("one task"))
    }

    /// The query pass of an episode (see `InnerLoop::episode`).
    fn query(&self, t: &mut Tape<F>, p: &[Var], x: &ArrayD<F>) -> Var {
        let learner = self.learner;
        let mut ctx = Ctx::new(self.mode).with_running(&learner.norm);
        ctx.step = self.steps;
        if learner.model.needs_context() {
            let xs = t.constant(self.support_x.clone());
            ctx.record_context = true;
            learner.model.forward(t, p, xs, &mut ctx);
            ctx.record_context = false;
        }
        let xv = t.constant(x.clone());
        learner.model.forward(t, p, xv, &mut ctx)
    }
}
