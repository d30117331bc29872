//! One episode, the path every method shares: adapt on the support set with the inner
//! loop, then score the query set.

use super::{InnerRule, Targets, Task};
use crate::nn::{Ctx, Model, Observed};
use crate::{Float, Tape, Var};
use ndarray::ArrayD;

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
            let grads = self.support_grads(t, &fast, &adapted, s, x, y, ctx);
            self.update(t, &mut fast, &adapted, &grads, rates, s);
            trajectory.push(fast.clone());
        }
        trajectory
    }

    /// Inner step `s`'s forward pass on the support set and the gradient of its loss with
    /// respect to the adapted parameters (recorded for second order).
    #[allow(clippy::too_many_arguments)]
    fn support_grads<F: Float>(
        &self,
        t: &mut Tape<F>,
        fast: &[Var],
        adapted: &[usize],
        s: usize,
        x: Var,
        y: &Targets<F>,
        ctx: &mut Ctx<'_, F>,
    ) -> Vec<Var>
    where
        M: Model<F>,
    {
        ctx.step = s;
        ctx.record_context = true;
        let out = self.model.forward(t, fast, x, ctx);
        ctx.record_context = false;
        let loss = y.loss(t, out);
        let wrt: Vec<Var> = adapted.iter().map(|&i| fast[i]).collect();
        t.grad(loss, &wrt, self.create_graph)
    }

    /// Inner step `s`'s update of the adapted parameters by the rule, from their
    /// gradients `grads` (in `adapted` order).
    fn update<F: Float>(
        &self,
        t: &mut Tape<F>,
        fast: &mut [Var],
        adapted: &[usize],
        grads: &[Var],
        rates: &[Var],
        s: usize,
    ) {
        for (k, (&i, &g)) in adapted.iter().zip(grads).enumerate() {
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
    }

    /// The weighted query loss with parameters `p` (after a support pass for networks
    /// that need context), and the network's query output.
    #[allow(clippy::too_many_arguments)]
    fn score<F: Float>(
        &self,
        t: &mut Tape<F>,
        p: &[Var],
        xs: Var,
        xq: Var,
        y: &Targets<F>,
        weight: f64,
        ctx: &mut Ctx<'_, F>,
    ) -> (Var, Var)
    where
        M: Model<F>,
    {
        ctx.step = self.steps;
        if self.model.needs_context() {
            ctx.record_context = true;
            self.model.forward(t, p, xs, ctx);
            ctx.record_context = false;
        }
        let out = self.model.forward(t, p, xq, ctx);
        let l = y.loss(t, out);
        (t.mul_scalar(l, weight), out)
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
            if !is_scored(weights, s) {
                continue;
            }
            let p = &trajectory[(s + 1).min(trajectory.len() - 1)];
            let (l, out) = self.score(t, p, xs, xq, &task.query_y, w, ctx);
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

/// What [`InnerLoop::episode_recompute`] computed: the values and adjoints the stored
/// path reads off its one tape.
pub(crate) struct EpisodeGrads<F> {
    /// The episode's loss, as [`InnerLoop::episode`]'s tape holds it.
    pub loss: f64,
    /// The network's query output after the last scored step.
    pub query_out: ArrayD<F>,
    /// The adjoint of each starting network parameter (`None`: nothing flowed into it).
    pub net: Vec<Option<ArrayD<F>>>,
    /// The adjoint of each learned rate.
    pub rates: Vec<Option<ArrayD<F>>>,
}

/// One inner step on a tape of its own: its parameters before the step and the learned
/// rates as leaves, then the step as [`InnerLoop::adapt`] records it.
struct Segment<F: Float> {
    t: Tape<F>,
    /// The network's parameters before the step (leaves).
    net: Vec<Var>,
    /// The learned rates (leaves).
    rates: Vec<Var>,
    /// The inner gradients (in adapted order).
    grads: Vec<Var>,
    /// The adapted parameters after the step (in adapted order).
    next: Vec<Var>,
}

/// A context for a pass whose statistics are not filed (a rebuilt step, or a query pass
/// whose statistics are filed later in the stored path's order): the same mode, running
/// statistics and noise key, nothing observed, no TaskNorm context.
fn scratch<'a, F: Float>(ctx: &Ctx<'a, F>) -> Ctx<'a, F> {
    let mut c = Ctx::new(ctx.mode);
    c.step = ctx.step;
    c.running = ctx.running;
    c.noise = ctx.noise;
    c
}

/// The taken values of `vars` on `t` (`None` stays `None`).
fn take_all<F: Float>(t: &mut Tape<F>, vars: &[Option<Var>]) -> Vec<Option<ArrayD<F>>> {
    vars.iter().map(|v| v.map(|v| t.take(v))).collect()
}

impl<M: ?Sized> InnerLoop<'_, M> {
    /// Step `k` as a segment: `net` with the adapted entries replaced by `point` (their
    /// values after `k` steps), and `rates`, as leaves. The inner gradients come from
    /// `inner_grads` as constants when given (first order: the update is all the outer
    /// backward needs), otherwise from a support pass filed in `ctx`.
    #[allow(clippy::too_many_arguments)]
    fn segment<F: Float>(
        &self,
        net: &[ArrayD<F>],
        adapted: &[usize],
        point: &[ArrayD<F>],
        rates: &[ArrayD<F>],
        support: (&ArrayD<F>, &Targets<F>),
        k: usize,
        inner_grads: Option<&[ArrayD<F>]>,
        ctx: &mut Ctx<'_, F>,
    ) -> Segment<F>
    where
        M: Model<F>,
    {
        let mut t = Tape::new();
        let mut values: Vec<&ArrayD<F>> = net.iter().collect();
        for (&i, a) in adapted.iter().zip(point) {
            values[i] = a;
        }
        let leaves: Vec<Var> = values.into_iter().map(|a| t.param(a.clone())).collect();
        let rate_leaves: Vec<Var> = rates.iter().map(|a| t.param(a.clone())).collect();
        let mut fast = leaves.clone();
        let grads = match inner_grads {
            Some(g) => g.iter().map(|g| t.constant(g.clone())).collect(),
            None => {
                let xs = t.constant(support.0.clone());
                ctx.context.clear();
                self.support_grads(&mut t, &fast, adapted, k, xs, support.1, ctx)
            }
        };
        self.update(&mut t, &mut fast, adapted, &grads, &rate_leaves, k);
        Segment {
            t,
            net: leaves,
            rates: rate_leaves,
            grads,
            next: adapted.iter().map(|&i| fast[i]).collect(),
        }
    }

    /// [`InnerLoop::episode`] and the gradient of its loss with respect to the starting
    /// parameters `net` and the learned `rates`, without keeping the inner steps' graphs
    /// ([`Memory::Recompute`](super::Memory::Recompute)): bitwise the loss, query output,
    /// statistics filed in `ctx` and gradients of `episode` followed by one backward pass.
    ///
    /// The inner loop runs forward keeping each step's parameters; each scored query loss
    /// is differentiated on a tape of its own, from the last to the first (the order the
    /// stored tape's backward pass meets them); then the steps are walked backwards, each
    /// rebuilt on a fresh tape from its parameters (the last step's tape is kept from the
    /// forward run) and differentiated from the adjoints of its results, onto the
    /// adjoints its inputs already hold ([`Tape::grad_seeded_onto`]): the query losses'
    /// for the adapted parameters, everything after it for the frozen ones and the rates.
    ///
    /// # Panics
    /// If there are no inner steps, or `weights` does not have one weight per step.
    pub(crate) fn episode_recompute<F: Float>(
        &self,
        net: &[ArrayD<F>],
        rates: &[ArrayD<F>],
        task: &Task<F>,
        weights: &[f64],
        ctx: &mut Ctx<'_, F>,
    ) -> EpisodeGrads<F>
    where
        M: Model<F>,
    {
        let steps = self.steps;
        assert!(
            steps > 0 && weights.len() == steps,
            "metagrad::InnerLoop::episode_recompute: {} weights for {steps} steps",
            weights.len()
        );
        let adapted = adapted_indices(self.model, self.rule, net.len());
        let mut frozen = vec![true; net.len()];
        adapted.iter().for_each(|&i| frozen[i] = false);
        let support = (&task.support_x, &task.support_y);

        // Forward: `points[k]` holds the adapted parameters after k steps; first order
        // keeps each step's inner gradient too, second order the last step's tape.
        let mut points: Vec<Vec<ArrayD<F>>> =
            vec![adapted.iter().map(|&i| net[i].clone()).collect()];
        let mut inner_grads: Vec<Vec<ArrayD<F>>> = Vec::new();
        let mut last: Option<Segment<F>> = None;
        for k in 0..steps {
            let seg = self.segment(net, &adapted, &points[k], rates, support, k, None, ctx);
            points.push(seg.next.iter().map(|&v| seg.t.value(v).clone()).collect());
            if !self.create_graph {
                inner_grads.push(seg.grads.iter().map(|&v| seg.t.value(v).clone()).collect());
            } else if k + 1 == steps {
                last = Some(seg);
            }
        }

        // The scored query losses, from the last: their values, the adjoints of the
        // adapted parameters they read (`from_query[k]` for the parameters after k steps),
        // and the frozen parameters' adjoints (`shared`) folded in that order.
        let mut shared: Vec<Option<ArrayD<F>>> = vec![None; net.len()];
        let mut from_query: Vec<Option<Vec<Option<ArrayD<F>>>>> = vec![None; steps + 1];
        let mut losses: Vec<ArrayD<F>> = Vec::new();
        let mut observed: Vec<Vec<Observed<F>>> = Vec::new();
        let mut query_out = None;
        for s in (0..steps).rev().filter(|&s| is_scored(weights, s)) {
            let k = s + 1;
            let mut t = Tape::new();
            let mut values: Vec<&ArrayD<F>> = net.iter().collect();
            for (&i, a) in adapted.iter().zip(&points[k]) {
                values[i] = a;
            }
            let p: Vec<Var> = values.into_iter().map(|a| t.param(a.clone())).collect();
            let xs = t.constant(task.support_x.clone());
            let xq = t.constant(task.query_x.clone());
            let mut qctx = scratch(ctx);
            let (l, out) = self.score(&mut t, &p, xs, xq, &task.query_y, weights[s], &mut qctx);
            if query_out.is_none() {
                query_out = Some(t.value(out).clone());
            }
            losses.push(t.value(l).clone());
            observed.push(qctx.observed);
            let seed = t.constant(ArrayD::ones(t.shape(l)));
            let onto: Vec<Option<Var>> = (0..net.len())
                .map(|i| match frozen[i] {
                    true => shared[i].take().map(|a| t.constant(a)),
                    false => None,
                })
                .collect();
            let g = t.grad_seeded_onto(&[l], &[seed], &p, &onto, false);
            let mut g = take_all(&mut t, &g);
            for (i, gi) in g.iter_mut().enumerate() {
                if frozen[i] {
                    shared[i] = gi.take();
                }
            }
            from_query[k] = Some(adapted.iter().map(|&i| g[i].take()).collect());
        }

        // The steps, from the last: each one's adjoints of its results seed its rebuilt
        // tape, onto what its inputs already hold.
        let mut adj: Vec<Option<ArrayD<F>>> = from_query[steps]
            .take()
            .unwrap_or_else(|| vec![None; adapted.len()]);
        let mut rate_adj: Vec<Option<ArrayD<F>>> = vec![None; rates.len()];
        for k in (0..steps).rev() {
            let mut seg = match last.take() {
                Some(seg) => seg,
                None => {
                    let given = (!self.create_graph).then(|| &inner_grads[k][..]);
                    let mut c = scratch(ctx);
                    self.segment(net, &adapted, &points[k], rates, support, k, given, &mut c)
                }
            };
            let t = &mut seg.t;
            let (mut outs, mut seeds) = (Vec::new(), Vec::new());
            for (j, a) in adj.iter_mut().enumerate() {
                if let Some(a) = a.take() {
                    outs.push(seg.next[j]);
                    seeds.push(t.constant(a));
                }
            }
            let mut queried = from_query[k].take();
            let mut onto: Vec<Option<Var>> = Vec::with_capacity(net.len() + rates.len());
            let mut j = 0;
            for (i, &f) in frozen.iter().enumerate() {
                let a = if f {
                    shared[i].take()
                } else {
                    j += 1;
                    queried.as_mut().and_then(|q| q[j - 1].take())
                };
                onto.push(a.map(|a| t.constant(a)));
            }
            for r in rate_adj.iter_mut() {
                onto.push(r.take().map(|a| t.constant(a)));
            }
            let wrt: Vec<Var> = seg.net.iter().chain(&seg.rates).copied().collect();
            let g = t.grad_seeded_onto(&outs, &seeds, &wrt, &onto, false);
            let mut g = take_all(t, &g).into_iter();
            let mut j = 0;
            for (i, &f) in frozen.iter().enumerate() {
                let gi = g.next().expect("one adjoint per leaf");
                if f {
                    shared[i] = gi;
                } else {
                    adj[j] = gi;
                    j += 1;
                }
            }
            rate_adj = g.collect();
        }

        // The query passes' statistics in the stored path's order (after the steps'),
        // and the loss summed as its tape sums it.
        observed
            .into_iter()
            .rev()
            .for_each(|o| ctx.observed.extend(o));
        let mut t = Tape::new();
        let mut total: Option<Var> = None;
        for l in losses.into_iter().rev() {
            let l = t.constant(l);
            total = Some(match total {
                None => l,
                Some(acc) => t.add(acc, l),
            });
        }
        let loss = t.item(total.expect("the last step is always scored"));
        let mut adj = adj.into_iter();
        let net_adj = frozen
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                if f {
                    shared[i].take()
                } else {
                    adj.next().expect("adapted")
                }
            })
            .collect();
        EpisodeGrads {
            loss,
            query_out: query_out.expect("the last step is always scored"),
            net: net_adj,
            rates: rate_adj,
        }
    }
}

/// Whether the query loss after step `s + 1` is scored: its weight is not zero, or it is
/// the last.
fn is_scored(weights: &[f64], s: usize) -> bool {
    weights[s] != 0.0 || s + 1 == weights.len()
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
