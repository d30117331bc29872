//! Ready networks: the sinusoid MLP and Conv-4, and the [`Model`] trait they share.

use super::init::{normal, uniform};
use super::layers::{conv2d, flatten, linear};
use super::norm::{
    batch_norm, batch_norm_relu_max_pool2d, group_norm, task_norm, Affine, Ctx, Observed,
};
use super::Params;
use crate::{Float, Tape, Var};
use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A network as a function of explicit parameters: what the meta-learners adapt.
///
/// A model holds no weights. [`Model::init`] makes them, and [`Model::forward`] computes
/// the output from the parameters it is given as tape variables — the meta-parameters, or
/// the adapted ones after any number of inner steps — so that every output is
/// differentiable with respect to them, to any order.
///
/// # What `forward` must do with [`Ctx`]
/// - **`ctx.mode`**: pass it to every batch norm ([`batch_norm`] takes it); it decides between the batch's statistics and the running ones. Layers
///   without running statistics (group, layer, instance norm) ignore it.
/// - **`ctx.observed`**: in [`NormMode::Train`](super::NormMode), push the batch
///   statistics each batch norm used, in layer order ([`Observed`], with `layer` as in
///   [`Model::batch_norm_channels`] and `step` = `ctx.step` for per-step statistics). The
///   learner folds them into its running statistics after a successful step.
/// - **`ctx.step`**: the inner step being run (0-based); select per-step weights or
///   statistics with it when [`Model::norm_steps`] is above 1.
/// - **`ctx.running`**: the learner's running statistics; read them in inductive mode.
/// - **`ctx.record_context`**, **`ctx.context`**: only for models whose
///   [`Model::needs_context`] is true (TaskNorm): when recording, store each norm's
///   context statistics in `ctx.context[layer]`; otherwise read them from there.
///
/// A model without normalisation can ignore `ctx` entirely:
///
/// ```
/// use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
/// use metagrad::meta::Targets;
/// use metagrad::nn::{Ctx, Model, Params};
/// use metagrad::ndarray::{ArrayD, IxDyn};
/// use metagrad::{Tape, Var};
///
/// /// `y = tanh(x · w + b) · v`: one hidden layer of `h` units, one input, one output.
/// struct TanhNet {
///     h: usize,
/// }
///
/// impl Model<f64> for TanhNet {
///     fn init(&self, seed: u64) -> Params<f64> {
///         let mut p = Params::new();
///         let k = seed as f64 + 1.0;
///         let ramp = |n: usize, s: f64| ArrayD::from_shape_fn(IxDyn(&[1, n]), |i| s * (i[1] as f64 - 0.5 * n as f64) / n as f64);
///         p.push("w", ramp(self.h, k));
///         p.push("b", ArrayD::zeros(IxDyn(&[self.h])));
///         p.push("v", ramp(self.h, 0.5).reversed_axes());
///         p
///     }
///     fn forward(&self, t: &mut Tape<f64>, p: &[Var], x: Var, _ctx: &mut Ctx<'_, f64>) -> Var {
///         let z = t.matmul(x, p[0]);
///         let z = t.add(z, p[1]);
///         let a = t.tanh(z);
///         t.matmul(a, p[2])
///     }
///     fn head(&self) -> Vec<usize> {
///         vec![2]
///     }
/// }
///
/// let points = |n: usize, phase: f64| {
///     let x = ArrayD::from_shape_fn(IxDyn(&[n, 1]), |i| i[0] as f64 / n as f64 - 0.5);
///     let y = x.mapv(|x| (3.0 * x + phase).sin());
///     (x, Targets::Values(y))
/// };
/// let tasks: Vec<Task<f64>> = (0..4)
///     .map(|i| {
///         let (support_x, support_y) = points(5, i as f64);
///         let (query_x, query_y) = points(7, i as f64);
///         Task { support_x, support_y, query_x, query_y }
///     })
///     .collect();
/// let mut learner = MetaLearner::new(TanhNet { h: 8 }, MetaConfig::maml(2, 0.1), 0);
/// let mut opt = Optimizer::adam(1e-2);
/// let first = learner.meta_step(&tasks, &mut opt)?.loss;
/// for _ in 0..50 {
///     learner.meta_step(&tasks, &mut opt)?;
/// }
/// assert!(learner.meta_step(&tasks, &mut opt)?.loss < first);
/// # Ok::<(), metagrad::Error>(())
/// ```
pub trait Model<F: Float>: Send + Sync {
    /// Freshly initialised parameters, seeded.
    fn init(&self, seed: u64) -> Params<F>;
    /// The network's output for input `x`, with parameters `p` in [`Model::init`]'s order
    /// (see the trait's docs for what to do with `ctx`).
    fn forward(&self, t: &mut Tape<F>, p: &[Var], x: Var, ctx: &mut Ctx<'_, F>) -> Var;
    /// Indices (into the parameters) of the output head, the only part ANIL adapts.
    fn head(&self) -> Vec<usize>;
    /// Channel counts of the batch-norm layers, in order (empty without batch norm).
    fn batch_norm_channels(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Indices of parameters the inner loop never adapts (per-step batch-norm affine
    /// weights in MAML++, which already differ from step to step).
    fn inner_frozen(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Whether batch-norm statistics and affine weights are kept per inner step; the
    /// number of sets.
    fn norm_steps(&self) -> usize {
        1
    }
    /// Whether the network normalises with context statistics (TaskNorm): a query pass
    /// must then follow a pass over the support set with the same parameters.
    fn needs_context(&self) -> bool {
        false
    }
    /// Whether [`Model::forward`] also takes a stack of tasks: input `[T, N, ...]` with
    /// every parameter stacked along a leading task dimension `T`, computing each task
    /// with its own parameters in one pass (as `vmap` would). The meta-learners then run
    /// small tasks in chunks on one tape ([`MetaConfig::task_chunk`](crate::meta::MetaConfig)).
    fn batches_tasks(&self) -> bool {
        false
    }
    /// The width of the network's output — the number of classes, for a classifier — when
    /// it is known without running the network. The meta-learners then check class
    /// labels against it before a step, and refuse a label out of range with an error
    /// naming the task and the label instead of running the task.
    fn outputs(&self) -> Option<usize> {
        None
    }
}

/// A multi-layer perceptron with ReLU between layers; `sizes = [1, 40, 40, 1]` is the
/// sinusoid network of the MAML paper. Parameters `l{i}.w: [out, in]`, `l{i}.b: [out]`,
/// initialised uniform in ±1/√in as PyTorch does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mlp {
    /// Layer widths, input first.
    pub sizes: Vec<usize>,
}

impl Mlp {
    /// The sinusoid network 1-40-40-1.
    pub fn sinusoid() -> Self {
        Mlp {
            sizes: vec![1, 40, 40, 1],
        }
    }
}

impl<F: Float> Model<F> for Mlp {
    fn init(&self, seed: u64) -> Params<F> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p = Params::new();
        for (i, w) in self.sizes.windows(2).enumerate() {
            let bound = 1.0 / (w[0] as f64).sqrt();
            p.push(format!("l{i}.w"), uniform(&mut rng, &[w[1], w[0]], bound));
            p.push(format!("l{i}.b"), uniform(&mut rng, &[w[1]], bound));
        }
        p
    }

    fn forward(&self, t: &mut Tape<F>, p: &[Var], x: Var, _ctx: &mut Ctx<'_, F>) -> Var {
        let layers = self.sizes.len() - 1;
        let batched = t.shape(x).len() == 3;
        let mut h = x;
        for i in 0..layers {
            h = if batched {
                // A stack of tasks: x [T, N, in], w [T, out, in], b [T, out].
                let y = t.matmul_t(h, p[2 * i], false, true);
                let s = t.shape(p[2 * i + 1]).to_vec();
                let b = t.reshape(p[2 * i + 1], &[s[0], 1, s[1]]);
                t.add(y, b)
            } else {
                linear(t, h, p[2 * i], p[2 * i + 1])
            };
            if i + 1 < layers {
                h = t.relu(h);
            }
        }
        h
    }

    fn head(&self) -> Vec<usize> {
        let n = 2 * (self.sizes.len() - 1);
        vec![n - 2, n - 1]
    }

    fn batches_tasks(&self) -> bool {
        true
    }

    fn outputs(&self) -> Option<usize> {
        self.sizes.last().copied()
    }
}

/// The normalisation in each Conv-4 block.
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

/// How Conv-4 shrinks its feature maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Downsample {
    /// Stride-1 convolutions, each block followed by 2×2 max-pooling (28→14→7→3→1).
    MaxPool,
    /// Stride-2 convolutions and a global average pool at the end, as in the original
    /// MAML Omniglot network.
    Strided,
}

/// Conv-4: four blocks of 3×3 conv → norm → ReLU (→ 2×2 max-pool; ReLU and pool are
/// computed together by [`Tape::relu_max_pool2d`], and with batch statistics the norm
/// too, by [`Tape::batch_norm_relu_max_pool2d`]), then a linear head of
/// `ways` outputs. Parameters per block `b{i}.conv.w`, `b{i}.conv.b`, then the norm's
/// (`b{i}.norm.gamma`, `b{i}.norm.beta`, per step with a `.s{k}` suffix; TaskNorm adds
/// `b{i}.norm.scale`, `b{i}.norm.offset`); then `head.w: [ways, features]`, `head.b`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv4 {
    /// Input channels (1 for Omniglot).
    pub in_channels: usize,
    /// Input height and width.
    pub image_size: usize,
    /// Filters per convolution (64 in MAML).
    pub filters: usize,
    /// Output classes.
    pub ways: usize,
    /// Normalisation in each block.
    pub norm: NormKind,
    /// Max-pooling or strided convolutions.
    pub downsample: Downsample,
    /// Added to variances before the square root.
    pub eps: f64,
}

impl Conv4 {
    /// The MAML Omniglot network for `ways` classes: 28×28 inputs, 64 filters, batch norm
    /// (one set), max-pooling.
    pub fn omniglot(ways: usize) -> Self {
        Conv4 {
            in_channels: 1,
            image_size: 28,
            filters: 64,
            ways,
            norm: NormKind::Batch { per_step: None },
            downsample: Downsample::MaxPool,
            eps: 1e-5,
        }
    }

    fn norm_param_count(&self) -> usize {
        match self.norm {
            NormKind::None => 0,
            NormKind::Batch { per_step } => 2 * per_step.unwrap_or(1),
            NormKind::Group { .. } | NormKind::Layer | NormKind::Instance => 2,
            NormKind::TaskNorm => 4,
        }
    }

    fn block_params(&self) -> usize {
        2 + self.norm_param_count()
    }

    /// The head's input width.
    pub fn features(&self) -> usize {
        match self.downsample {
            Downsample::Strided => self.filters,
            Downsample::MaxPool => {
                let mut s = self.image_size;
                for _ in 0..4 {
                    s /= 2;
                }
                self.filters * s.max(1) * s.max(1)
            }
        }
    }
}

impl<F: Float> Model<F> for Conv4 {
    fn init(&self, seed: u64) -> Params<F> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p = Params::new();
        let mut cin = self.in_channels;
        let f = self.filters;
        let ones = || ArrayD::from_elem(IxDyn(&[f]), F::one());
        let zeros = || ArrayD::zeros(IxDyn(&[f]));
        for b in 0..4 {
            let std = (2.0 / (cin * 9) as f64).sqrt();
            p.push(
                format!("b{b}.conv.w"),
                normal(&mut rng, &[f, cin, 3, 3], std),
            );
            p.push(format!("b{b}.conv.b"), zeros());
            match self.norm {
                NormKind::None => {}
                NormKind::Batch { per_step: Some(k) } => {
                    for s in 0..k {
                        p.push(format!("b{b}.norm.gamma.s{s}"), ones());
                        p.push(format!("b{b}.norm.beta.s{s}"), zeros());
                    }
                }
                NormKind::Batch { per_step: None }
                | NormKind::Group { .. }
                | NormKind::Layer
                | NormKind::Instance => {
                    p.push(format!("b{b}.norm.gamma"), ones());
                    p.push(format!("b{b}.norm.beta"), zeros());
                }
                NormKind::TaskNorm => {
                    p.push(format!("b{b}.norm.gamma"), ones());
                    p.push(format!("b{b}.norm.beta"), zeros());
                    p.push(format!("b{b}.norm.scale"), ArrayD::zeros(IxDyn(&[])));
                    p.push(format!("b{b}.norm.offset"), ArrayD::zeros(IxDyn(&[])));
                }
            }
            cin = f;
        }
        let feat = self.features();
        p.push(
            "head.w",
            normal(&mut rng, &[self.ways, feat], (1.0 / feat as f64).sqrt()),
        );
        p.push("head.b", ArrayD::zeros(IxDyn(&[self.ways])));
        p
    }

    fn forward(&self, t: &mut Tape<F>, p: &[Var], x: Var, ctx: &mut Ctx<'_, F>) -> Var {
        let bp = self.block_params();
        if ctx.context.len() < 4 {
            ctx.context.resize(4, None);
        }
        let stride = match self.downsample {
            Downsample::MaxPool => 1,
            Downsample::Strided => 2,
        };
        // A block's parameters: conv weight and bias, then the norm's γ and β.
        let affine = |q: &[Var]| Affine {
            gamma: q[2],
            beta: q[3],
            eps: self.eps,
        };
        let mut h = x;
        for b in 0..4 {
            let q = &p[b * bp..(b + 1) * bp];
            h = conv2d(t, h, q[0], q[1], stride, 1);
            let max_pool = self.downsample == Downsample::MaxPool;
            // Batch norm with max-pooling runs norm, ReLU and pool as one op.
            let mut pooled = false;
            h = match self.norm {
                NormKind::None => h,
                NormKind::Batch { per_step } => {
                    let s = per_step.map_or(0, |k| ctx.step.min(k - 1));
                    let affine = Affine {
                        gamma: q[2 + 2 * s],
                        beta: q[3 + 2 * s],
                        eps: self.eps,
                    };
                    let running = ctx.running.map(|r| r.get(b, s));
                    let (y, obs) = if max_pool {
                        pooled = true;
                        batch_norm_relu_max_pool2d(t, h, affine, ctx.mode, running, 2)
                    } else {
                        batch_norm(t, h, affine, ctx.mode, running)
                    };
                    if let Some((mean, var)) = obs {
                        ctx.observed.push(Observed {
                            layer: b,
                            step: s,
                            mean,
                            var,
                        });
                    }
                    y
                }
                NormKind::Group { groups } => group_norm(t, h, affine(q), groups),
                NormKind::Layer => group_norm(t, h, affine(q), 1),
                NormKind::Instance => group_norm(t, h, affine(q), self.filters),
                NormKind::TaskNorm => {
                    let context = if ctx.record_context {
                        None
                    } else {
                        Some(ctx.context[b].unwrap_or_else(|| {
                            panic!(
                                "metagrad::Conv4: TaskNorm needs a pass over the support set \
                                 (Ctx::record_context) before other passes"
                            )
                        }))
                    };
                    let (y, used) = task_norm(t, h, affine(q), (q[4], q[5]), context);
                    if ctx.record_context {
                        ctx.context[b] = Some(used);
                    }
                    y
                }
            };
            // ReLU and max-pooling commute (ReLU is monotone): one gather does both.
            if !pooled {
                h = if max_pool {
                    t.relu_max_pool2d(h, 2, 2)
                } else {
                    t.relu(h)
                };
            }
        }
        let h = match self.downsample {
            Downsample::MaxPool => flatten(t, h),
            Downsample::Strided => t.global_avg_pool(h),
        };
        let n = p.len();
        linear(t, h, p[n - 2], p[n - 1])
    }

    fn outputs(&self) -> Option<usize> {
        Some(self.ways)
    }

    fn head(&self) -> Vec<usize> {
        let n = 4 * self.block_params() + 2;
        vec![n - 2, n - 1]
    }

    fn inner_frozen(&self) -> Vec<usize> {
        match self.norm {
            NormKind::Batch { per_step: Some(_) } => {
                let bp = self.block_params();
                (0..4).flat_map(|b| b * bp + 2..(b + 1) * bp).collect()
            }
            _ => Vec::new(),
        }
    }

    fn batch_norm_channels(&self) -> Vec<usize> {
        match self.norm {
            NormKind::Batch { .. } => vec![self.filters; 4],
            _ => Vec::new(),
        }
    }

    fn norm_steps(&self) -> usize {
        match self.norm {
            NormKind::Batch { per_step: Some(k) } => k,
            _ => 1,
        }
    }

    fn needs_context(&self) -> bool {
        self.norm == NormKind::TaskNorm
    }
}
