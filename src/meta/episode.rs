//! One episode, the path every method shares: adapt on the support set with the inner
//! loop, then score the query set.

use super::{InnerRule, Targets, Task};
use crate::nn::{Ctx, Model};
use crate::{Float, Tape, Var};

/// The inner loop: which model adapts, by which rule and rate, for how many steps, and
/// whether the updates are recorded (second order) or not (first order, evaluation).
///
/// ```
/// use metagrad::meta::{InnerLoop, InnerRule, Targets};
/// use metagrad::ndarray::{ArrayD, IxDyn};
/// use metagrad::nn::{Ctx, Mlp, Model, NormMode};
/// use metagrad::Tape;
/// let model = Mlp::new(vec![1, 8, 1]);
/// let mut t = Tape::<f64>::new();
/// let p = model.init(0).place(&mut t);
/// let x = t.constant(ArrayD::from_elem(IxDyn(&[4, 1]), 0.5));
/// let y = Targets::Values(ArrayD::zeros(IxDyn(&[4, 1])));
/// let inner = InnerLoop { model: &model, rule: InnerRule::Sgd, lr: 0.1, steps: 3, create_graph: true };
/// let trajectory = inner.adapt(&mut t, &p, &[], x, &y, &mut Ctx::new(NormMode::Transductive));
/// assert_eq!(trajectory.len(), 4); // the start and the parameters after each step
/// ```
#[derive(Debug, Clone, Copy)]
pub struct InnerLoop<'m, M: ?Sized> {
    /// The network that adapts.
    pub model: &'m M,
    /// The update rule.
    pub rule: InnerRule,
    /// The inner learning rate α (for the rules without learned rates).
    pub lr: f64,
    /// Inner steps.
    pub steps: usize,
    /// Record the updates, so that the adapted parameters can be differentiated with
    /// respect to the starting ones through the updates (second order); without it the
    /// inner gradients are constants (first order).
    pub create_graph: bool,
}

/// What [`InnerLoop::episode`] built on the tape.
#[derive(Debug, Clone)]
pub struct EpisodeRun {
    /// The query loss: the weighted sum over the scored steps.
    pub loss: Var,
    /// The network's query output after the last scored step.
    pub query_out: Var,
    /// The parameters after each inner step (index 0 is the start).
    pub trajectory: Vec<Vec<Var>>,
}

impl<M: ?Sized> InnerLoop<'_, M> {
    /// `steps` updates of the adapted parameters, starting at `start`, on inputs `x` with
    /// targets `y`. Returns the parameters after each step (index 0 is the start).
    ///
    /// Only the parameters [`adapted_indices`] selects change. `rates` are the learned
    /// inner rates, one per adapted parameter in that order: shaped like the parameter for
    /// [`InnerRule::MetaSgd`], shape `[k]` for [`InnerRule::PerTensorPerStep`] (steps past
    /// `k` reuse the last rate); empty otherwise.
    pub fn adapt<F: Float>(
        &self,
        t: &mut Tape<F>,
        start: &[Var],
        rates: &[Var],
        x: Var,
        y: &Targets<F>,
        ctx: &mut Ctx<'_, F>,
    ) -> Vec<Vec<Var>>
    where
        M: Model<F>,
    {
        let adapted = adapted_indices(self.model, self.rule, start.len());
        let mut trajectory = vec![start.to_vec()];
        let mut fast = start.to_vec();
        for s in 0..self.steps {
            ctx.step = s;
            ctx.record_context = true;
            let out = self.model.forward(t, &fast, x, ctx);
            ctx.record_context = false;
            let loss = y.loss(t, out);
            let wrt: Vec<Var> = adapted.iter().map(|&i| fast[i]).collect();
            let grads = t.grad(loss, &wrt, self.create_graph);
            for (k, (&i, &g)) in adapted.iter().zip(&grads).enumerate() {
                let step = match self.rule {
                    InnerRule::Sgd | InnerRule::HeadOnly => t.mul_scalar(g, self.lr),
                    InnerRule::MetaSgd => t.mul(rates[k], g),
                    InnerRule::PerTensorPerStep => {
                        // Steps beyond the learned ones (longer adaptation at test time)
                        // reuse the last step's rate.
                        let s = s.min(t.shape(rates[k])[0] - 1);
                        let r = t.slice_axis(rates[k], 0, s, s + 1);
                        let r = t.reshape(r, &[]);
                        t.mul(r, g)
                    }
                };
                fast[i] = t.sub(fast[i], step);
            }
            trajectory.push(fast.clone());
        }
        trajectory
    }

    /// One episode: adapt `net` (with learned `rates`) on the task's support set, then
    /// run the query set after each inner step whose weight is not zero (and always
    /// after the last) and sum the weighted query losses. `weights[s]` weighs the query
    /// loss after step `s + 1` (with no inner steps, the one weight is for the start).
    /// For networks that [need context](Model::needs_context), each query pass follows a
    /// pass over the support set with the same parameters.
    ///
    /// # Panics
    /// If `weights` is empty.
    pub fn episode<F: Float>(
        &self,
        t: &mut Tape<F>,
        net: &[Var],
        rates: &[Var],
        task: &Task<F>,
        weights: &[f64],
        ctx: &mut Ctx<'_, F>,
    ) -> EpisodeRun
    where
        M: Model<F>,
    {
        let xs = t.constant(task.support_x.clone());
        let xq = t.constant(task.query_x.clone());
        let trajectory = self.adapt(t, net, rates, xs, &task.support_y, ctx);
        let mut scored: Option<(Var, Var)> = None;
        for (s, &w) in weights.iter().enumerate() {
            if w == 0.0 && s + 1 < weights.len() {
                continue;
            }
            let p = &trajectory[(s + 1).min(trajectory.len() - 1)];
            ctx.step = self.steps;
            if self.model.needs_context() {
                ctx.record_context = true;
                self.model.forward(t, p, xs, ctx);
                ctx.record_context = false;
            }
            let out = self.model.forward(t, p, xq, ctx);
            let l = task.query_y.loss(t, out);
            let l = t.mul_scalar(l, w);
            let total = match scored {
                None => l,
                Some((acc, _)) => t.add(acc, l),
            };
            scored = Some((total, out));
        }
        let (loss, query_out) = scored.expect("metagrad::InnerLoop::episode: no weights");
        EpisodeRun {
            loss,
            query_out,
            trajectory,
        }
    }
}

/// The parameters the inner loop adapts under `rule`: the head for
/// [`InnerRule::HeadOnly`], otherwise all but the model's [`Model::inner_frozen`] ones.
pub fn adapted_indices<F: Float, M: Model<F> + ?Sized>(
    model: &M,
    rule: InnerRule,
    len: usize,
) -> Vec<usize> {
    match rule {
        InnerRule::HeadOnly => model.head(),
        _ => {
            let frozen = model.inner_frozen();
            (0..len).filter(|i| !frozen.contains(i)).collect()
        }
    }
}

/// Weights that score only the query loss after the last of `steps` inner steps.
pub fn last_step_only(steps: usize) -> Vec<f64> {
    let mut w = vec![0.0; steps.max(1)];
    *w.last_mut().expect("at least one weight") = 1.0;
    w
}
