//! Normalisation layers, with the training-versus-transductive choice made explicit.
//!
//! In few-shot learning, normalising a query set with its own batch statistics is
//! *transductive*: the prediction for one query example then depends on the other query
//! examples, which typically inflates accuracy by a few points. So every batch-norm call
//! takes a [`NormMode`] and there is no default:
//!
//! | mode | statistics used | running statistics |
//! | --- | --- | --- |
//! | [`NormMode::Train`] | the batch's own | updated (by the caller, from [`Observed`]) |
//! | [`NormMode::Transductive`] | the batch's own | untouched |
//! | [`NormMode::Inductive`] | the running ones only | untouched |
//!
//! Group norm, layer norm and instance norm normalise each example on its own and keep no
//! running statistics: **they give the same output in every mode**, and are never
//! transductive. TaskNorm-I ([`task_norm`]) normalises with a learned blend of the support
//! set's statistics and each example's own, so evaluation is non-transductive without the
//! collapse running statistics suffer under MAML.
//!
//! Per-channel statistics go by these names, each for one job:
//!
//! | type | holds | variance |
//! | --- | --- | --- |
//! | [`BatchStats`](crate::tape::op::BatchStats) | what a fused batch-norm op normalised with (on the tape) | biased (÷ n) |
//! | [`ChannelStats`] | what a batch norm in [`NormMode::Train`] reports | unbiased (÷ n − 1) |
//! | [`Observed`] | the same, filed by layer and inner step for the learner | unbiased |
//! | [`RunningStats`] | one layer's running averages (at one inner step) | unbiased |
//! | [`NormState`] | every layer's [`RunningStats`], what a checkpoint saves | unbiased |

use crate::{Float, Tape, Var};
use serde::{Deserialize, Serialize};

/// A normalisation layer's learnable per-channel affine map `γ · x̂ + β` (`gamma` and
/// `beta`, tape variables of shape `[C]`) and the `eps` added to its variances: what every
/// normalisation below takes besides its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Per-channel scale γ, `[C]`.
    pub gamma: Var,
    /// Per-channel shift β, `[C]`.
    pub beta: Var,
    /// Added to the variance before its square root.
    pub eps: f64,
}

/// Which normalisation a layer applies (see the [module docs](self) for the modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    /// No normalisation.
    None,
    /// Batch norm; the mode comes with every forward call. `per_step = Some(k)` keeps
    /// separate running statistics and affine weights for each of `k` inner steps (MAML++
    /// BNRS + BNWB; use inner steps + 1 so the query pass has its own set).
    Batch {
        /// Number of per-step sets, or `None` for one shared set.
        per_step: Option<usize>,
    },
    /// Group norm with this many groups (mode-independent).
    Group {
        /// Number of channel groups.
        groups: usize,
    },
    /// Layer norm: group norm with one group (mode-independent).
    Layer,
    /// Instance norm: group norm with one group per channel (mode-independent).
    Instance,
    /// TaskNorm-I: support-set statistics blended with instance statistics.
    TaskNorm,
}

/// Which statistics a batch norm uses (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormMode {
    /// Batch statistics; the batch's statistics are reported so that running statistics
    /// can be updated.
    Train,
    /// Batch statistics of the batch at hand, nothing updated. Transductive when the
    /// batch is a query set.
    Transductive,
    /// Running statistics only; the batch's own statistics are never used.
    Inductive,
}

impl std::fmt::Display for NormMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NormMode::Train => "train",
            NormMode::Transductive => "transductive",
            NormMode::Inductive => "inductive",
        })
    }
}

/// Running mean and variance of one batch-norm layer (at one inner step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "F: Float")]
pub struct RunningStats<F> {
    /// Per-channel mean.
    pub mean: Vec<F>,
    /// Per-channel (unbiased) variance.
    pub var: Vec<F>,
    /// How many batches have been folded in.
    pub updates: u64,
}

/// Batch statistics seen by a batch norm in [`NormMode::Train`].
#[derive(Debug, Clone, PartialEq)]
pub struct Observed<F> {
    /// Which norm layer.
    pub layer: usize,
    /// Which inner step (0 unless statistics are kept per step).
    pub step: usize,
    /// Per-channel batch mean.
    pub mean: Vec<F>,
    /// Per-channel unbiased batch variance.
    pub var: Vec<F>,
}

/// The running statistics of every batch-norm layer of a network, per inner step when
/// kept per step (MAML++).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "F: Float")]
pub struct NormState<F> {
    /// Weight of a new batch in the running average.
    pub momentum: f64,
    /// `stats[layer][step]`.
    pub stats: Vec<Vec<RunningStats<F>>>,
}

impl<F: Float> NormState<F> {
    /// Fresh statistics (mean 0, variance 1, no updates) for layers of the given channel
    /// counts, with `steps` sets each.
    pub fn new(channels: &[usize], steps: usize, momentum: f64) -> Self {
        let stats = channels
            .iter()
            .map(|&c| {
                (0..steps.max(1))
                    .map(|_| RunningStats {
                        mean: vec![F::zero(); c],
                        var: vec![F::one(); c],
                        updates: 0,
                    })
                    .collect()
            })
            .collect();
        NormState { momentum, stats }
    }

    /// The statistics of a layer at an inner step (the last set if `step` is beyond it).
    pub fn get(&self, layer: usize, step: usize) -> &RunningStats<F> {
        let s = &self.stats[layer];
        &s[step.min(s.len() - 1)]
    }

    /// Folds observed batch statistics in, in the given order.
    pub fn update(&mut self, observed: &[Observed<F>]) {
        let m = F::c(self.momentum);
        for o in observed {
            let s = &mut self.stats[o.layer];
            let last = s.len() - 1;
            let r = &mut s[o.step.min(last)];
            for (rm, &bm) in r.mean.iter_mut().zip(&o.mean) {
                *rm = (F::one() - m) * *rm + m * bm;
            }
            for (rv, &bv) in r.var.iter_mut().zip(&o.var) {
                *rv = (F::one() - m) * *rv + m * bv;
            }
            r.updates += 1;
        }
    }
}

/// Per-forward context: the norm mode (always explicit), the inner step, the running
/// statistics to read, and what the forward pass observed or recorded.
#[derive(Debug)]
pub struct Ctx<'a, F: Float> {
    /// How batch norms normalise.
    pub mode: NormMode,
    /// The inner-loop step (selects per-step statistics and affine weights).
    pub step: usize,
    /// Running statistics, needed for [`NormMode::Inductive`].
    pub running: Option<&'a NormState<F>>,
    /// Batch statistics seen in [`NormMode::Train`], in order.
    pub observed: Vec<Observed<F>>,
    /// TaskNorm context statistics per norm layer: `(mean, variance, context size)`.
    pub context: Vec<Option<(Var, Var, usize)>>,
    /// Whether this forward pass is over the context (support) set, whose statistics
    /// TaskNorm records for later passes.
    pub record_context: bool,
    /// The key of this task's random masks (dropout, DropBlock), or `None` to leave
    /// them off, as in evaluation. The meta-learners set it in meta-training from the
    /// meta-step and the task's index in the meta-batch; a layer draws its mask from
    /// the key, [`Ctx::step`] and its own index in the net, so masks do not depend on
    /// the thread count, and the recorded backward reuses the forward's masks.
    pub noise: Option<u64>,
}

impl<'a, F: Float> Ctx<'a, F> {
    /// A context for the given mode, step 0, no running statistics.
    pub fn new(mode: NormMode) -> Self {
        Ctx {
            mode,
            step: 0,
            running: None,
            observed: Vec::new(),
            context: Vec::new(),
            record_context: false,
            noise: None,
        }
    }

    /// With running statistics to read (and, in inductive mode, to use).
    pub fn with_running(mut self, running: &'a NormState<F>) -> Self {
        self.running = Some(running);
        self
    }

    /// Batch norm number `layer` (in [`Model::batch_norm_channels`] order) in one
    /// call: it picks the affine set of the current inner step (`sets[min(step, len −
    /// 1)]`; one set when statistics are not kept per step), normalises as
    /// [`Ctx::mode`] says with the matching running statistics, and files what it
    /// observed in [`NormMode::Train`].
    ///
    /// # Panics
    /// If `sets` is empty, and as [`batch_norm`].
    ///
    /// [`Model::batch_norm_channels`]: super::Model::batch_norm_channels
    #[track_caller]
    pub fn batch_norm(&mut self, t: &mut Tape<F>, x: Var, layer: usize, sets: &[Affine]) -> Var {
        let s = self.set(sets);
        let running = self.running.map(|r| r.get(layer, s));
        let (y, obs) = batch_norm(t, x, sets[s], self.mode, running);
        self.file(layer, s, obs);
        y
    }

    /// [`Ctx::batch_norm`], then ReLU and `k × k` max-pooling with stride `k`, fused as
    /// [`batch_norm_relu_max_pool2d`].
    ///
    /// # Panics
    /// As [`Ctx::batch_norm`] and [`Tape::max_pool2d`].
    #[track_caller]
    pub fn batch_norm_relu_max_pool2d(
        &mut self,
        t: &mut Tape<F>,
        x: Var,
        layer: usize,
        sets: &[Affine],
        k: usize,
    ) -> Var {
        let s = self.set(sets);
        let running = self.running.map(|r| r.get(layer, s));
        let (y, obs) = batch_norm_relu_max_pool2d(t, x, sets[s], self.mode, running, k);
        self.file(layer, s, obs);
        y
    }

    #[track_caller]
    fn set(&self, sets: &[Affine]) -> usize {
        assert!(
            !sets.is_empty(),
            "metagrad::Ctx::batch_norm: no affine set given"
        );
        self.step.min(sets.len() - 1)
    }

    fn file(&mut self, layer: usize, step: usize, obs: Option<ChannelStats<F>>) {
        if let Some((mean, var)) = obs {
            self.observed.push(Observed {
                layer,
                step,
                mean,
                var,
            });
        }
    }
}

/// Shape `[1, C, 1, ...]` for broadcasting per-channel values over `x`.
fn channel_shape(x_shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; x_shape.len()];
    s[1] = x_shape[1];
    s
}

/// `(x − mean) / sqrt(var + eps) · gamma + beta`, with per-channel gamma and beta,
/// computed as `x · scale + shift` so that only two passes touch the full-size tensor.
fn normalise<F: Float>(
    t: &mut Tape<F>,
    x: Var,
    mean: Var,
    var: Var,
    gamma: Var,
    beta: Var,
    eps: f64,
) -> Var {
    let cs = channel_shape(t.shape(x));
    let ve = t.add_scalar(var, eps);
    let sd = t.sqrt(ve);
    let g = t.reshape(gamma, &cs);
    let b = t.reshape(beta, &cs);
    let scale = t.div(g, sd); // statistics-shaped, small
    let ms = t.mul(mean, scale);
    let shift = t.sub(b, ms);
    let y = t.mul(x, scale);
    t.add(y, shift)
}

/// Per-channel `(mean, unbiased variance)` of a batch, as a batch norm in
/// [`NormMode::Train`] reports it (the model files it as an [`Observed`]).
pub type ChannelStats<F> = (Vec<F>, Vec<F>);

/// Batch normalisation over every axis but the channel axis 1 (`[N, C]` or
/// `[N, C, H, W]`), with learnable per-channel `gamma` and `beta`.
///
/// Returns the output and, in [`NormMode::Train`], the batch's statistics (to fold into
/// the running statistics with [`NormState::update`]).
///
/// # Panics
/// In [`NormMode::Inductive`] when `running` is `None` or has never been updated: there
/// are no statistics to normalise with, and silently using the batch's own would be
/// transductive.
#[track_caller]
pub fn batch_norm<F: Float>(
    t: &mut Tape<F>,
    x: Var,
    affine: Affine,
    mode: NormMode,
    running: Option<&RunningStats<F>>,
) -> (Var, Option<ChannelStats<F>>) {
    let Affine { gamma, beta, eps } = affine;
    t.check_norm_affine("batch_norm", x, gamma, beta);
    let shape = t.shape(x).to_vec();
    let cs = channel_shape(&shape);
    match mode {
        NormMode::Inductive => {
            let r = match running {
                Some(r) if r.updates > 0 => r,
                _ => panic!(
                    "metagrad::batch_norm: inductive mode needs running statistics, and none \
                     have been collected; meta-train with NormMode::Train first, or choose \
                     NormMode::Transductive knowingly"
                ),
            };
            let m = t.constant(crate::array::from_vec(&cs, r.mean.clone()));
            let v = t.constant(crate::array::from_vec(&cs, r.var.clone()));
            (normalise(t, x, m, v, gamma, beta, eps), None)
        }
        NormMode::Train | NormMode::Transductive => {
            let (y, stats) = t.batch_norm_batch_stats(x, gamma, beta, eps);
            (y, observed(mode, &shape, &stats))
        }
    }
}

/// [`batch_norm`], then ReLU and `k × k` max-pooling with stride `k` (`x: [N, C, H, W]`).
/// With batch statistics the three run as one fused op (the tape op of the same name,
/// [`Tape::batch_norm_relu_max_pool2d`]); the result is the same as the three layers one
/// after another.
///
/// # Panics
/// As [`batch_norm`] and [`Tape::max_pool2d`].
#[track_caller]
pub fn batch_norm_relu_max_pool2d<F: Float>(
    t: &mut Tape<F>,
    x: Var,
    affine: Affine,
    mode: NormMode,
    running: Option<&RunningStats<F>>,
    k: usize,
) -> (Var, Option<ChannelStats<F>>) {
    match mode {
        NormMode::Inductive => {
            let (y, obs) = batch_norm(t, x, affine, mode, running);
            (t.relu_max_pool2d(y, k, k), obs)
        }
        NormMode::Train | NormMode::Transductive => {
            let shape = t.shape(x).to_vec();
            let Affine { gamma, beta, eps } = affine;
            let (y, stats) = t.batch_norm_relu_max_pool2d(x, gamma, beta, eps, k, k);
            (y, observed(mode, &shape, &stats))
        }
    }
}

/// The batch statistics to report in [`NormMode::Train`]: mean and unbiased variance.
fn observed<F: Float>(
    mode: NormMode,
    shape: &[usize],
    stats: &crate::ops::norm::BatchStats,
) -> Option<ChannelStats<F>> {
    (mode == NormMode::Train).then(|| {
        let n = shape.iter().product::<usize>() / shape[1];
        let unbias = n as f64 / (n.max(2) - 1) as f64;
        let m = stats.mean.iter().map(|&m| F::c(m)).collect();
        let v = stats.var.iter().map(|&v| F::c(v * unbias)).collect();
        (m, v)
    })
}

/// Group normalisation of `[N, C, ...]`: channels split into `groups` groups, each
/// example and group normalised by its own statistics, then a per-channel affine map.
/// It keeps no running statistics and gives the same output in every [`NormMode`].
/// `groups = 1` is layer norm, `groups = C` is instance norm.
///
/// # Panics
/// If `C` is not divisible by `groups`.
#[track_caller]
pub fn group_norm<F: Float>(t: &mut Tape<F>, x: Var, affine: Affine, groups: usize) -> Var {
    let Affine { gamma, beta, eps } = affine;
    t.check_norm_affine("group_norm", x, gamma, beta);
    let shape = t.shape(x).to_vec();
    assert!(
        groups > 0 && shape[1].is_multiple_of(groups),
        "metagrad::group_norm: {} channels (input {shape:?}) do not split into {groups} groups",
        shape[1]
    );
    let n = shape[0];
    let per = shape.iter().product::<usize>() / (n * groups);
    let xg = t.reshape(x, &[n, groups, per]);
    let mean = t.mean_axes(xg, &[2], true);
    let xc = t.sub(xg, mean);
    let sq = t.square(xc);
    let var = t.mean_axes(sq, &[2], true);
    let ve = t.add_scalar(var, eps);
    let sd = t.sqrt(ve);
    let xh = t.div(xc, sd);
    let xh = t.reshape(xh, &shape);
    let cs = channel_shape(&shape);
    let g = t.reshape(gamma, &cs);
    let b = t.reshape(beta, &cs);
    let y = t.mul(xh, g);
    t.add(y, b)
}

/// TaskNorm-I (Bronskill et al., 2020): normalises `x: [N, C, H, W]` with a blend of
/// context statistics (the support set's, per channel) and instance statistics (each
/// example's own, per channel), `α = sigmoid(scale · |context| + offset)` learned:
///
/// `μ = α μ_ctx + (1 − α) μ_inst`,
/// `σ² = α (σ²_ctx + (μ_ctx − μ)²) + (1 − α)(σ²_inst + (μ_inst − μ)²)`.
///
/// With `context = None` this pass *is* the context pass: the batch's statistics are the
/// context, and they are returned for later passes (the query set) to use. A query
/// example's output then depends only on itself and the support set: not transductive.
/// `blend` is `(scale, offset)`, 0-dimensional parameters.
#[track_caller]
pub fn task_norm<F: Float>(
    t: &mut Tape<F>,
    x: Var,
    affine: Affine,
    (scale, offset): (Var, Var),
    context: Option<(Var, Var, usize)>,
) -> (Var, (Var, Var, usize)) {
    let Affine { gamma, beta, eps } = affine;
    t.check_norm_affine("task_norm", x, gamma, beta);
    let shape = t.shape(x).to_vec();
    assert!(
        shape.len() == 4,
        "metagrad::task_norm: expected [N, C, H, W], got {shape:?}"
    );
    let ctx = context.unwrap_or_else(|| {
        let mean = t.mean_axes(x, &[0, 2, 3], true);
        let xc = t.sub(x, mean);
        let sq = t.square(xc);
        let var = t.mean_axes(sq, &[0, 2, 3], true);
        (mean, var, shape[0])
    });
    let (mc, vc, size) = ctx;
    let mi = t.mean_axes(x, &[2, 3], true);
    let xci = t.sub(x, mi);
    let sqi = t.square(xci);
    let vi = t.mean_axes(sqi, &[2, 3], true);
    // α = sigmoid(scale · size + offset)
    let a = t.mul_scalar(scale, size as f64);
    let a = t.add(a, offset);
    let alpha = t.sigmoid(a);
    let na = t.neg(alpha);
    let beta_w = t.add_scalar(na, 1.0); // 1 − α
    let p = t.mul(alpha, mc);
    let q = t.mul(beta_w, mi);
    let mu = t.add(p, q);
    let dc = t.sub(mc, mu);
    let dc = t.square(dc);
    let dc = t.add(vc, dc);
    let dc = t.mul(alpha, dc);
    let di = t.sub(mi, mu);
    let di = t.square(di);
    let di = t.add(vi, di);
    let di = t.mul(beta_w, di);
    let var = t.add(dc, di);
    (normalise(t, x, mu, var, gamma, beta, eps), ctx)
}
