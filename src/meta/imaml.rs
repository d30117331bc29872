//! Implicit MAML (iMAML; Rajeswaran, Finn, Kakade and Levine, NeurIPS 2019): the
//! meta-gradient from the end point of the inner loop alone, by conjugate gradient.
//!
//! The inner problem is regularised towards the meta-parameters θ,
//!
//! ```text
//! φ* = argmin_φ  L_S(φ) + λ/2 ‖φ − θ‖²,
//! ```
//!
//! and solved approximately by `n` gradient steps from φ = θ, none of them recorded
//! ([`solve_inner`]). At the solution, `∇L_S(φ*) + λ(φ* − θ) = 0`, so by the implicit
//! function theorem `dφ*/dθ = (I + H/λ)⁻¹` with `H = ∇²L_S(φ*)`, and the meta-gradient
//! of the query loss is
//!
//! ```text
//! dL_Q(φ*(θ))/dθ = (I + H/λ)⁻¹ ∇L_Q(φ*).
//! ```
//!
//! That linear system is solved by [`conjugate_gradient`] with `K` Hessian-vector
//! products, each one the tape's second-order gradient of `∇L_S · v`. Memory does not
//! grow with `n`: one inner step's tape lives at a time, and the last tape holds one
//! recorded support gradient for the Hessian-vector products.
//!
//! Parameters that do not adapt (the body under [`InnerRule::HeadOnly`], a model's
//! [`inner_frozen`](Model::inner_frozen) ones) enter `L_S` and `L_Q` directly; their
//! meta-gradient is `∂L_Q/∂b − (1/λ) ∂(∇_φ L_S · x)/∂b`, `x` the CG solution, one more
//! mixed second-order product.
//!
//! Switch it on with [`MetaConfig::imaml`] (or [`MetaConfig::implicit`]); everything
//! else — the meta-batch mapper and its task-order reduction, MPI, the non-finite policy,
//! checkpoints, evaluation ([`MetaLearner::evaluate_task`] adapts with the same regularised
//! inner solver) — is the family's. Under [`Order::First`](super::Order) (or early in
//! [`Order::Annealed`](super::Order)) the CG is skipped and the meta-gradient is the
//! query gradient at φ* (first-order iMAML).
//!
//! ```
//! use metagrad::data::SinusoidSampler;
//! use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
//! use metagrad::nn::Mlp;
//! // λ = 2, 5 CG steps, 10 inner steps of rate 0.01.
//! let config = MetaConfig::imaml(10, 0.01, 2.0, 5);
//! let mut learner = MetaLearner::<f64, _>::new(Mlp::sinusoid(), config, 0);
//! let mut opt = Optimizer::adam(1e-3);
//! let batch = SinusoidSampler::new(10, 10, 7).unwrap().sample_batch(4).unwrap();
//! let stats = learner.meta_step(&Task::from_sinusoid(&batch), &mut opt).unwrap();
//! let cg = stats.cg.expect("iMAML reports its conjugate gradient");
//! assert!(cg.iterations <= 5 && cg.residual.is_finite());
//! ```

use super::{adapted_indices, all_finite, observed_finite, BatchResult, GroupResult};
use super::{InnerRule, MetaConfig, MetaLearner, Targets, Task};
use crate::nn::{Ctx, Model, NormMode};
use crate::{Error, Float, Result, Tape, Var};
use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

/// iMAML's settings: the regularisation strength λ and the conjugate gradient that solves
/// for the meta-gradient. The inner solver's step count and rate are
/// [`MetaConfig::inner_steps`] and [`MetaConfig::inner_lr`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Imaml {
    /// λ: how strongly the inner problem is pulled towards θ (`λ/2 ‖φ − θ‖²`); the paper
    /// uses 2 on Omniglot. Must be finite and positive.
    pub lambda: f64,
    /// `K`: the most conjugate-gradient iterations (Hessian-vector products) per task; the
    /// paper uses 5.
    pub cg_steps: usize,
    /// δ ≥ 0 added to the Hessian's diagonal: CG solves `(I + (H + δI)/λ) x = ∇L_Q`.
    /// It keeps the system positive definite where the support loss is not convex
    /// (0: the exact system).
    #[serde(default)]
    pub damping: f64,
    /// Relative residual `‖∇L_Q − A x‖ / ‖∇L_Q‖` at which CG stops early. When set, a
    /// task whose CG ends above it after [`Imaml::cg_steps`] iterations is a failed task,
    /// handled by [`MetaConfig::on_non_finite`] (an [`Error::NotConverged`], or a skipped
    /// step). `None`: always run `K` iterations and only report the residual.
    #[serde(default)]
    pub tolerance: Option<f64>,
}

impl Imaml {
    /// λ and `K` CG steps, no damping, no tolerance.
    pub fn new(lambda: f64, cg_steps: usize) -> Self {
        Imaml {
            lambda,
            cg_steps,
            damping: 0.0,
            tolerance: None,
        }
    }

    /// The same with damping δ.
    pub fn with_damping(mut self, damping: f64) -> Self {
        self.damping = damping;
        self
    }

    /// The same with a convergence tolerance on CG's relative residual.
    pub fn with_tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = Some(tolerance);
        self
    }

    /// Checks the settings together with the rest of the configuration.
    ///
    /// # Errors
    /// [`Error::Config`] for λ that is not finite and positive, zero CG steps, a damping
    /// or tolerance that is negative or not finite, a rule with learned inner rates
    /// ([`InnerRule::MetaSgd`], [`InnerRule::PerTensorPerStep`]: the regularised inner
    /// problem has no learning rate to learn) or MAML++'s multi-step loss (only the end
    /// point of the inner loop enters the implicit meta-gradient).
    pub fn validate(&self, config: &MetaConfig) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("iMAML: {what}")));
        if !(self.lambda.is_finite() && self.lambda > 0.0) {
            return bad(format!(
                "λ is {}; it must be a finite positive number",
                self.lambda
            ));
        }
        if self.cg_steps == 0 {
            return bad("cg_steps is 0; conjugate gradient needs at least one step".into());
        }
        if !(self.damping.is_finite() && self.damping >= 0.0) {
            return bad(format!(
                "the damping is {}; it must be finite and not negative",
                self.damping
            ));
        }
        if let Some(tol) = self.tolerance.filter(|t| !(t.is_finite() && *t >= 0.0)) {
            return bad(format!(
                "the tolerance is {tol}; it must be finite and not negative"
            ));
        }
        if matches!(
            config.rule,
            InnerRule::MetaSgd | InnerRule::PerTensorPerStep
        ) {
            return bad(format!(
                "learned inner rates ({:?}) are not defined for iMAML: its inner problem is \
                 argmin L_S(φ) + λ/2‖φ − θ‖², whose solution does not depend on the solver's \
                 rates; use InnerRule::Sgd or InnerRule::HeadOnly",
                config.rule
            ));
        }
        if config.multi_step_loss.is_some() {
            return bad(
                "MAML++'s multi-step loss is not defined for iMAML: only the end point of \
                 the inner loop enters the implicit meta-gradient"
                    .into(),
            );
        }
        Ok(())
    }
}

impl MetaConfig {
    /// iMAML with `inner_steps` gradient steps of rate `inner_lr` on the regularised
    /// support loss, regularisation λ = `lambda`, and `cg_steps` conjugate-gradient steps
    /// (the paper's Omniglot settings: `imaml(16, 0.1, 2.0, 5)`; see the
    /// [module docs](crate::meta::imaml)).
    pub fn imaml(inner_steps: usize, inner_lr: f64, lambda: f64, cg_steps: usize) -> Self {
        MetaConfig::maml(inner_steps, inner_lr).implicit(Imaml::new(lambda, cg_steps))
    }

    /// The same configuration with iMAML's implicit meta-gradient.
    pub fn implicit(mut self, imaml: Imaml) -> Self {
        self.implicit = Some(imaml);
        self
    }
}

/// What conjugate gradient did, for one task or, in [`StepStats`](super::StepStats), the
/// worst over a meta-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgStats {
    /// Iterations (Hessian-vector products) used; over a meta-batch, the most any task
    /// used.
    pub iterations: usize,
    /// The relative residual `‖b − A x‖ / ‖b‖` CG ended with (its recurrence's residual;
    /// 0 when `b = 0`); over a meta-batch, the largest. NaN when CG met a value that is
    /// not finite.
    pub residual: f64,
    /// Tasks that ended above [`Imaml::tolerance`] (always 0 without a tolerance).
    pub unconverged: usize,
}

impl CgStats {
    /// The worst of two: most iterations, largest residual (NaN wins), unconverged
    /// tasks summed.
    pub fn worst(self, other: CgStats) -> CgStats {
        let residual = if self.residual.is_nan() || other.residual.is_nan() {
            f64::NAN
        } else {
            self.residual.max(other.residual)
        };
        CgStats {
            iterations: self.iterations.max(other.iterations),
            residual,
            unconverged: self.unconverged + other.unconverged,
        }
    }

    /// The worst over many (`None` for none).
    pub fn fold(stats: impl IntoIterator<Item = CgStats>) -> Option<CgStats> {
        stats.into_iter().reduce(CgStats::worst)
    }
}

fn dot<F: Float>(a: &[ArrayD<F>], b: &[ArrayD<F>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            a.iter()
                .zip(b.iter())
                .fold(0.0, |s, (&x, &y)| s + x.f64() * y.f64())
        })
        .sum()
}

/// `y += a · x`, tensor by tensor.
fn axpy<F: Float>(y: &mut [ArrayD<F>], a: f64, x: &[ArrayD<F>]) {
    let a = F::c(a);
    for (y, x) in y.iter_mut().zip(x) {
        Zip::from(y).and(x).for_each(|y, &x| *y += a * x);
    }
}

/// Solves `A x = b` for a symmetric positive-definite `A`, given as the product `apply(v)
/// = A v` on lists of tensors, by conjugate gradient from `x = 0`: at most `steps`
/// iterations, stopping early once the relative residual `‖b − A x‖ / ‖b‖` is at most
/// `tolerance` (when given). Inner products are summed in `f64`, in a fixed order.
///
/// It also stops, reporting what it reached, where the curvature `pᵀA p` along a search
/// direction is not positive (`A` is not positive definite there) — and where it is not
/// finite, reporting a NaN residual. [`CgStats::unconverged`] is 1 when a tolerance is
/// given and the residual ended above it (or is NaN).
///
/// ```
/// use metagrad::meta::imaml::conjugate_gradient;
/// use metagrad::ndarray::{arr1, ArrayD};
/// // A = diag(1, 4): x = (1, 0.5) for b = (1, 2), in two steps.
/// let a = |v: &[ArrayD<f64>]| vec![&v[0] * &arr1(&[1.0, 4.0]).into_dyn()];
/// let (x, stats) = conjugate_gradient(a, &[arr1(&[1.0, 2.0]).into_dyn()], 10, Some(1e-12));
/// assert!((x[0][0] - 1.0).abs() < 1e-12 && (x[0][1] - 0.5).abs() < 1e-12);
/// assert_eq!((stats.iterations, stats.unconverged), (2, 0));
/// ```
pub fn conjugate_gradient<F: Float>(
    mut apply: impl FnMut(&[ArrayD<F>]) -> Vec<ArrayD<F>>,
    b: &[ArrayD<F>],
    steps: usize,
    tolerance: Option<f64>,
) -> (Vec<ArrayD<F>>, CgStats) {
    let mut x: Vec<ArrayD<F>> = b.iter().map(|b| ArrayD::zeros(b.raw_dim())).collect();
    let mut r = b.to_vec();
    let mut p = b.to_vec();
    let mut rr = dot(&r, &r);
    let b_norm = rr.sqrt();
    let tol = tolerance.unwrap_or(0.0);
    let relative = |rr: f64| {
        if b_norm > 0.0 {
            rr.sqrt() / b_norm
        } else {
            rr.sqrt()
        }
    };
    let mut iterations = 0;
    while iterations < steps && relative(rr) > tol {
        let ap = apply(&p);
        let curvature = dot(&p, &ap);
        if !curvature.is_finite() {
            rr = f64::NAN;
            break;
        }
        if curvature <= 0.0 {
            break;
        }
        let alpha = rr / curvature;
        axpy(&mut x, alpha, &p);
        axpy(&mut r, -alpha, &ap);
        let next = dot(&r, &r);
        let beta = next / rr;
        for (p, r) in p.iter_mut().zip(&r) {
            let beta = F::c(beta);
            Zip::from(p).and(r).for_each(|p, &r| *p = r + beta * *p);
        }
        rr = next;
        iterations += 1;
    }
    let residual = relative(rr);
    let unconverged = match tolerance {
        // A NaN residual is above every tolerance.
        Some(tol) => usize::from(residual.is_nan() || residual > tol),
        None => 0,
    };
    (
        x,
        CgStats {
            iterations,
            residual,
            unconverged,
        },
    )
}

/// iMAML's inner solver: `steps` gradient steps of rate `lr` on the regularised support
/// loss `L_S(φ) + λ/2 ‖φ − θ‖²` from `φ = θ`, none of them recorded (each step's tape is
/// dropped before the next), on inputs `x` with targets `y`. Only the parameters
/// [`adapted_indices`] selects under `rule` move; the others stay at θ. Batch norms
/// normalise as `ctx` says (inner step `s` sets `ctx.step = s`), and their observed
/// statistics accumulate in `ctx`. Returns φ.
///
/// # Panics
/// As the model's forward pass (inputs that do not fit).
#[allow(clippy::too_many_arguments)]
pub fn solve_inner<F: Float, M: Model<F> + ?Sized>(
    model: &M,
    rule: InnerRule,
    lr: f64,
    lambda: f64,
    steps: usize,
    theta: &[ArrayD<F>],
    x: &ArrayD<F>,
    y: &Targets<F>,
    ctx: &mut Ctx<'_, F>,
) -> Vec<ArrayD<F>> {
    let adapted = adapted_indices(model, rule, theta.len());
    let (lr, lambda) = (F::c(lr), F::c(lambda));
    let mut phi = theta.to_vec();
    for s in 0..steps {
        let mut t = Tape::new();
        let p: Vec<Var> = phi.iter().map(|a| t.param(a.clone())).collect();
        let xs = t.constant(x.clone());
        ctx.context.clear(); // statistics of the previous step's tape
        ctx.step = s;
        ctx.record_context = true;
        let out = model.forward(&mut t, &p, xs, ctx);
        ctx.record_context = false;
        let loss = y.loss(&mut t, out);
        let wrt: Vec<Var> = adapted.iter().map(|&i| p[i]).collect();
        let grads = t.grad(loss, &wrt, false);
        for (&i, g) in adapted.iter().zip(grads) {
            Zip::from(&mut phi[i])
                .and(t.value(g))
                .and(&theta[i])
                .for_each(|f, &g, &th| *f = *f - lr * (g + lambda * (*f - th)));
        }
    }
    phi
}

/// The query pass at parameters `p` (after a pass over the support set for networks that
/// need context): the loss and the output.
fn query<F: Float, M: Model<F> + ?Sized>(
    model: &M,
    t: &mut Tape<F>,
    p: &[Var],
    task: &Task<F>,
    xs: Var,
    ctx: &mut Ctx<'_, F>,
) -> (Var, Var) {
    let xq = t.constant(task.query_x.clone());
    ctx.context.clear();
    if model.needs_context() {
        ctx.record_context = true;
        model.forward(t, p, xs, ctx);
        ctx.record_context = false;
    }
    let out = model.forward(t, p, xq, ctx);
    (task.query_y.loss(t, out), out)
}

/// One task's implicit meta-gradient, loss, accuracy, statistics and CG report.
fn run_task<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    task: &Task<F>,
    index: usize,
    imaml: &Imaml,
    second_order: bool,
) -> GroupResult<F> {
    let config = &learner.config;
    let model = &learner.model;
    let theta = learner.params.tensors();
    let net_len = learner.net_len;
    let adapted = adapted_indices(model, config.rule, net_len);
    let fixed: Vec<usize> = (0..net_len).filter(|i| !adapted.contains(i)).collect();
    let mut ctx = learner.train_ctx(index);
    let steps = config.inner_steps;
    let phi = solve_inner(
        model,
        config.rule,
        config.inner_lr,
        imaml.lambda,
        steps,
        &theta[..net_len],
        &task.support_x,
        &task.support_y,
        &mut ctx,
    );

    // One tape: θ for the parameters that do not adapt, φ* (as leaves) for those that do.
    let mut t = Tape::new();
    let p: Vec<Var> = (0..net_len)
        .map(|i| {
            let v = if adapted.contains(&i) {
                &phi[i]
            } else {
                &theta[i]
            };
            t.param(v.clone())
        })
        .collect();
    let xs = t.constant(task.support_x.clone());
    ctx.step = steps;
    let (lq, out) = query(model, &mut t, &p, task, xs, &mut ctx);
    let loss = t.item(lq);
    let accuracy = task.query_y.accuracy(t.value(out));
    let phi_vars: Vec<Var> = adapted.iter().map(|&i| p[i]).collect();
    let fixed_vars: Vec<Var> = fixed.iter().map(|&i| p[i]).collect();
    let wrt: Vec<Var> = phi_vars.iter().chain(&fixed_vars).copied().collect();
    let gq = t.grad(lq, &wrt, false);
    let mut gq: Vec<ArrayD<F>> = gq.into_iter().map(|g| t.take(g)).collect();
    let gq_fixed = gq.split_off(adapted.len());
    let b = gq;

    let (x, fixed_grads, cg) = if second_order {
        // The support loss at φ*, its gradient recorded for Hessian-vector products. This
        // pass is not an inner step: its batch statistics are not observed.
        let observed = ctx.observed.len();
        ctx.context.clear();
        ctx.record_context = true;
        let out_s = model.forward(&mut t, &p, xs, &mut ctx);
        ctx.record_context = false;
        ctx.observed.truncate(observed);
        let ls = task.support_y.loss(&mut t, out_s);
        let gs = t.grad(ls, &phi_vars, true);
        // ∂(∇L_S · v)/∂wrt, with the scratch nodes dropped again afterwards.
        let mark = t.len();
        let mixed = |t: &mut Tape<F>, v: &[ArrayD<F>], wrt: &[Var]| -> Vec<ArrayD<F>> {
            let mut s: Option<Var> = None;
            for (&g, v) in gs.iter().zip(v) {
                let c = t.constant(v.clone());
                let gv = t.mul(g, c);
                let gv = t.sum(gv);
                s = Some(match s {
                    None => gv,
                    Some(acc) => t.add(acc, gv),
                });
            }
            let Some(s) = s else {
                return wrt
                    .iter()
                    .map(|&w| ArrayD::zeros(t.shape(w).to_vec()))
                    .collect();
            };
            let h = t.grad(s, wrt, false);
            let h = h.into_iter().map(|h| t.take(h)).collect();
            t.truncate(mark);
            h
        };
        // A v = v + (H v + δ v) / λ
        let (lambda, damping) = (F::c(imaml.lambda), F::c(imaml.damping));
        let inv = F::one() / lambda;
        let apply = |v: &[ArrayD<F>]| -> Vec<ArrayD<F>> {
            let hv = mixed(&mut t, v, &phi_vars);
            hv.into_iter()
                .zip(v)
                .map(|(mut hv, v)| {
                    Zip::from(&mut hv)
                        .and(v)
                        .for_each(|h, &v| *h = v + (*h + damping * v) * inv);
                    hv
                })
                .collect()
        };
        let (x, cg) = conjugate_gradient(apply, &b, imaml.cg_steps, imaml.tolerance);
        // Parameters that do not adapt: ∂L_Q/∂θ_j − (1/λ) ∂(∇_φ L_S · x)/∂θ_j.
        let mut fixed_grads = gq_fixed;
        if !fixed.is_empty() {
            let cross = mixed(&mut t, &x, &fixed_vars);
            for (g, c) in fixed_grads.iter_mut().zip(cross) {
                Zip::from(g).and(&c).for_each(|g, &c| *g -= c * inv);
            }
        }
        (x, fixed_grads, Some(cg))
    } else {
        (b, gq_fixed, None)
    };

    let mut result: Vec<Option<ArrayD<F>>> = vec![None; learner.params.len()];
    for (&i, g) in adapted.iter().zip(x) {
        result[i] = Some(g);
    }
    for (&i, g) in fixed.iter().zip(fixed_grads) {
        result[i] = Some(g);
    }
    let result: Vec<ArrayD<F>> = result
        .into_iter()
        .zip(learner.params.tensors())
        .map(|(g, p)| g.unwrap_or_else(|| ArrayD::zeros(p.raw_dim())))
        .collect();
    let cg_ok = cg.is_none_or(|c| c.residual.is_finite() && c.unconverged == 0);
    GroupResult {
        finite: loss.is_finite()
            && cg_ok
            && result.iter().all(all_finite)
            && observed_finite(&ctx.observed),
        result,
        loss,
        accuracy,
        observed: ctx.observed,
        cg,
    }
}

/// The implicit meta-gradient of a group of tasks: each task on its own tape, one after
/// another, summed in task order (so the result depends on the grouping, which depends
/// only on the configuration, never on the thread count).
pub(super) fn run_group<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    group: &[Task<F>],
    first: usize,
    imaml: &Imaml,
    second_order: bool,
) -> GroupResult<F> {
    let mut tasks = group.iter().enumerate();
    let (_, task) = tasks.next().expect("a group holds at least one task");
    let mut sum = run_task(learner, task, first, imaml, second_order);
    for (k, task) in tasks {
        let r = run_task(learner, task, first + k, imaml, second_order);
        for (s, g) in sum.result.iter_mut().zip(&r.result) {
            Zip::from(s).and(g).for_each(|s, &g| *s += g);
        }
        sum.loss += r.loss;
        sum.accuracy = match (sum.accuracy, r.accuracy) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        sum.observed.extend(r.observed);
        sum.finite &= r.finite;
        sum.cg = match (sum.cg, r.cg) {
            (Some(a), Some(b)) => Some(a.worst(b)),
            (a, b) => a.or(b),
        };
    }
    sum
}

/// Evaluation under iMAML: adapt with the regularised inner solver for `steps` steps,
/// then score the query set.
pub(super) fn evaluate<F: Float, M: Model<F>>(
    learner: &MetaLearner<F, M>,
    imaml: &Imaml,
    task: &Task<F>,
    steps: usize,
    mode: NormMode,
) -> (f64, Option<f64>) {
    let mut ctx = Ctx::new(mode).with_running(&learner.norm);
    let net_len = learner.net_len;
    let phi = solve_inner(
        &learner.model,
        learner.config.rule,
        learner.config.inner_lr,
        imaml.lambda,
        steps,
        &learner.params.tensors()[..net_len],
        &task.support_x,
        &task.support_y,
        &mut ctx,
    );
    let mut t = Tape::new();
    let p: Vec<Var> = phi.into_iter().map(|a| t.constant(a)).collect();
    let xs = t.constant(task.support_x.clone());
    ctx.step = steps;
    let (loss, out) = query(&learner.model, &mut t, &p, task, xs, &mut ctx);
    (t.item(loss), task.query_y.accuracy(t.value(out)))
}

/// The error for a step refused under [`NonFinite::Error`](super::NonFinite) because some
/// task's conjugate gradient ended above the tolerance while everything else was finite;
/// `None` when the step failed for another reason (then it is [`Error::NonFinite`]).
pub(super) fn not_converged<F: Float>(
    config: &MetaConfig,
    during: &'static str,
    step: u64,
    batch: &BatchResult<F>,
    param_not_finite: bool,
) -> Option<Error> {
    let cg = batch.stats.cg?;
    let tolerance = config.implicit?.tolerance?;
    let finite = cg.residual.is_finite() && batch.stats.loss.is_finite() && !param_not_finite;
    (cg.unconverged > 0 && finite).then(|| Error::NotConverged {
        during,
        step,
        tasks: batch.bad_tasks.clone(),
        residual: cg.residual,
        tolerance,
    })
}
