//! Networks composed from layers that know themselves.
//!
//! A [`Seq`] lists named [`Layer`]s; [`Net::new`] checks it against an input shape and
//! compiles it once. From the composition alone the net knows everything a meta-learner
//! asks a [`Model`] for, with no index lists written by hand:
//!
//! - each layer **names its parameters** (`{path}.w`, `{path}.gamma.s3`, ...), so
//!   parameters are selected by name ([`Net::select`]: ANIL adapts `head.*`);
//! - each norm layer **files its own statistics**: the batch-norm index and per-step
//!   set it reads and reports, its running statistics and its TaskNorm context;
//! - each layer **checks its input**, and panics with the net's label, the layer's path,
//!   the shape it expected and the one it got;
//! - the hooks come from the composition: the head (the last layer with parameters,
//!   or [`Net::with_head`]), the frozen per-step affine weights, the batch-norm channels,
//!   the number of per-step sets, whether TaskNorm needs context, whether tasks batch,
//!   and the output width.
//!
//! A network with per-step batch norm (MAML++) in a few lines:
//!
//! ```
//! use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Targets, Task};
//! use metagrad::ndarray::{ArrayD, IxDyn};
//! use metagrad::nn::{Model, Net, NormKind, Seq};
//!
//! let steps = 2;
//! // One set of batch-norm statistics and affine weights per inner step, plus the query's.
//! let norm = NormKind::Batch { per_step: Some(steps + 1) };
//! let block = |width| Seq::new().conv("conv", width, 3).norm("norm", norm).relu().max_pool(2);
//! let net = Net::new(
//!     &[1, 12, 12],
//!     Seq::new()
//!         .block("b0", block(8))
//!         .block("b1", block(8))
//!         .flatten()
//!         .linear("head", 3),
//! )?;
//! assert_eq!(<Net as Model<f32>>::norm_steps(&net), 3);
//! assert!(net.param_names().contains(&"b1.norm.gamma.s2".to_string()));
//!
//! let task = Task {
//!     support_x: ArrayD::from_shape_fn(IxDyn(&[3, 1, 12, 12]), |i| (i[0] + i[2]) as f32 / 9.0),
//!     support_y: Targets::Classes(vec![0, 1, 2]),
//!     query_x: ArrayD::from_shape_fn(IxDyn(&[3, 1, 12, 12]), |i| (i[0] * i[3]) as f32 / 30.0),
//!     query_y: Targets::Classes(vec![0, 1, 2]),
//! };
//! let mut learner = MetaLearner::new(net, MetaConfig::maml(steps, 0.1), 0);
//! let stats = learner.meta_step(&[task], &mut Optimizer::adam(1e-3))?;
//! assert!(stats.loss.is_finite());
//! # Ok::<(), metagrad::Error>(())
//! ```

use super::init::{normal, uniform};
use super::norm::{group_norm, task_norm, Affine, Ctx, NormKind};
use super::Model;
use super::Params;
use crate::{Error, Float, Result, Tape, Var};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// How a [`Layer::Linear`] is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinearInit {
    /// Weight and bias uniform in ±1/√in, as PyTorch's `nn.Linear` ([`Mlp`](super::Mlp)).
    Uniform,
    /// Weight normal with standard deviation 1/√in, bias zero (the heads of
    /// [`Conv4`](super::Conv4) and [`ResNet12`](super::ResNet12)).
    Normal,
}

/// One layer of a [`Seq`]: a closed set of building blocks.
///
/// The input width of a linear layer, the input channels of a convolution and a norm
/// layer's channels are not written down: [`Net::new`] infers them from the shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Layer {
    /// `x · wᵀ + b`; parameters `w: [out, in]`, `b: [out]`.
    Linear {
        /// Output width.
        out: usize,
        /// Initialisation.
        init: LinearInit,
    },
    /// 2-D convolution, NCHW; parameters `w: [out, in, k, k]` (He-normal) and, with
    /// `bias`, `b: [out]` (zeros).
    Conv {
        /// Output channels.
        out: usize,
        /// Kernel size (square).
        kernel: usize,
        /// Stride (both directions).
        stride: usize,
        /// Zero padding (both directions).
        pad: usize,
        /// Whether a per-channel bias is added.
        bias: bool,
    },
    /// Normalisation over the channel axis 1 ([`NormKind`]); parameters `gamma`, `beta`
    /// (per step: `gamma.s{k}`, `beta.s{k}`; TaskNorm adds scalars `scale`, `offset`).
    Norm {
        /// Which normalisation.
        kind: NormKind,
        /// Added to variances before the square root.
        eps: f64,
    },
    /// `max(x, 0)`.
    Relu,
    /// `x` for `x > 0`, `slope · x` otherwise.
    LeakyRelu {
        /// The slope for negative inputs (0.1 in ResNet-12).
        slope: f64,
    },
    /// Max-pooling over `size × size` windows.
    MaxPool {
        /// Window size.
        size: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling over `size × size` windows.
    AvgPool {
        /// Window size.
        size: usize,
        /// Stride.
        stride: usize,
    },
    /// The mean over all spatial positions: `[N, C, H, W]` → `[N, C]`.
    GlobalAvgPool,
    /// `[N, ...]` → `[N, rest]`.
    Flatten,
    /// Dropout at rate `p` in meta-training only (see [`Ctx::noise`]).
    Dropout {
        /// The probability of dropping an element.
        p: f64,
    },
    /// DropBlock (Ghiasi et al., 2018) at rate `p` with square blocks, in meta-training
    /// only (see [`Ctx::noise`]); the kept elements are rescaled by the fraction kept.
    DropBlock {
        /// The fraction of elements to drop.
        p: f64,
        /// Block size (clamped to the feature map).
        size: usize,
    },
    /// A nested sequence; its layers' names are prefixed with this layer's name.
    Seq(Seq),
    /// `body(x) + shortcut(x)` (an empty shortcut is the identity).
    Residual {
        /// The main path.
        body: Seq,
        /// The shortcut path.
        shortcut: Seq,
    },
}

/// A sequence of named layers, built by chaining.
///
/// Names matter only for layers with parameters; the layers without any are added
/// unnamed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Seq {
    /// The layers in order, with their names.
    pub layers: Vec<(String, Layer)>,
}

impl Seq {
    /// An empty sequence.
    pub fn new() -> Self {
        Seq::default()
    }

    /// Appends `layer` under `name`.
    pub fn push(mut self, name: impl Into<String>, layer: Layer) -> Self {
        self.layers.push((name.into(), layer));
        self
    }

    /// A linear layer of width `out`, initialised as PyTorch does ([`LinearInit::Uniform`]).
    pub fn linear(self, name: impl Into<String>, out: usize) -> Self {
        self.push(
            name,
            Layer::Linear {
                out,
                init: LinearInit::Uniform,
            },
        )
    }

    /// A `kernel × kernel` convolution to `out` channels with stride 1, "same" padding
    /// (`kernel / 2`) and a bias.
    pub fn conv(self, name: impl Into<String>, out: usize, kernel: usize) -> Self {
        self.push(
            name,
            Layer::Conv {
                out,
                kernel,
                stride: 1,
                pad: kernel / 2,
                bias: true,
            },
        )
    }

    /// A norm layer with `eps = 1e-5`.
    pub fn norm(self, name: impl Into<String>, kind: NormKind) -> Self {
        self.push(name, Layer::Norm { kind, eps: 1e-5 })
    }

    /// ReLU.
    pub fn relu(self) -> Self {
        self.push("", Layer::Relu)
    }

    /// Leaky ReLU with the given negative slope.
    pub fn leaky_relu(self, slope: f64) -> Self {
        self.push("", Layer::LeakyRelu { slope })
    }

    /// `size × size` max-pooling with stride `size`.
    pub fn max_pool(self, size: usize) -> Self {
        self.push("", Layer::MaxPool { size, stride: size })
    }

    /// `size × size` average pooling with stride `size`.
    pub fn avg_pool(self, size: usize) -> Self {
        self.push("", Layer::AvgPool { size, stride: size })
    }

    /// Global average pooling.
    pub fn global_avg_pool(self) -> Self {
        self.push("", Layer::GlobalAvgPool)
    }

    /// Flattening to `[N, features]`.
    pub fn flatten(self) -> Self {
        self.push("", Layer::Flatten)
    }

    /// Dropout at rate `p`.
    pub fn dropout(self, p: f64) -> Self {
        self.push("", Layer::Dropout { p })
    }

    /// DropBlock at rate `p` with blocks of `size × size`.
    pub fn drop_block(self, p: f64, size: usize) -> Self {
        self.push("", Layer::DropBlock { p, size })
    }

    /// A nested sequence under `name`.
    pub fn block(self, name: impl Into<String>, seq: Seq) -> Self {
        self.push(name, Layer::Seq(seq))
    }

    /// A residual block under `name`: `body(x) + shortcut(x)`.
    pub fn residual(self, name: impl Into<String>, body: Seq, shortcut: Seq) -> Self {
        self.push(name, Layer::Residual { body, shortcut })
    }
}

/// How one parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Uniform(f64),
    Normal(f64),
    Zeros,
    Ones,
}

#[derive(Debug, Clone, PartialEq)]
struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// A norm layer's compiled form.
#[derive(Debug, Clone, PartialEq)]
struct NormPlan {
    kind: NormKind,
    eps: f64,
    channels: usize,
    /// `(gamma, beta)` parameter indices, one pair per per-step set.
    sets: Vec<(usize, usize)>,
    /// TaskNorm's `(scale, offset)` parameter indices.
    blend: Option<(usize, usize)>,
    /// Index among the net's batch norms (running statistics, [`super::Observed`]).
    batch: Option<usize>,
    /// Index among the net's TaskNorms (context statistics).
    context: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Linear {
        w: usize,
        b: usize,
    },
    Conv {
        w: usize,
        b: Option<usize>,
        stride: usize,
        pad: usize,
    },
    Norm(NormPlan),
    Relu,
    LeakyRelu(f64),
    MaxPool(usize, usize),
    AvgPool(usize, usize),
    GlobalAvgPool,
    Flatten,
    Dropout {
        p: f64,
        id: u64,
    },
    DropBlock {
        p: f64,
        size: usize,
        id: u64,
    },
    Residual {
        body: Vec<Step>,
        shortcut: Vec<Step>,
    },
}

/// A compiled layer: its path, the per-example input shape it accepts, and what it does.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    path: String,
    input: Vec<usize>,
    op: Op,
}

/// What compiling a [`Seq`] produced.
#[derive(Debug, Clone, Default, PartialEq)]
struct Plan {
    steps: Vec<Step>,
    params: Vec<ParamSpec>,
    batch_channels: Vec<usize>,
    norm_steps: Option<usize>,
    frozen: Vec<usize>,
    contexts: usize,
    noise_layers: u64,
    output: Vec<usize>,
}

/// A network composed of [`Layer`]s: a [`Model`] whose hooks come from its composition.
///
/// See the [module docs](self) for an example. [`Mlp`](super::Mlp),
/// [`Conv4`](super::Conv4), [`Conv6`](super::Conv6) and [`ResNet12`](super::ResNet12) are
/// built from it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "NetSpec", into = "NetSpec")]
pub struct Net {
    spec: NetSpec,
    plan: Plan,
}

/// The serialised form of a [`Net`]: its description; the plan is compiled again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NetSpec {
    label: String,
    input: Vec<usize>,
    layers: Seq,
    head: Option<String>,
}

impl TryFrom<NetSpec> for Net {
    type Error = Error;
    fn try_from(spec: NetSpec) -> Result<Net> {
        let plan = compile(&spec)?;
        Ok(Net { spec, plan })
    }
}

impl From<Net> for NetSpec {
    fn from(net: Net) -> NetSpec {
        net.spec
    }
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("label", &self.spec.label)
            .field("input", &self.spec.input)
            .field("layers", &self.spec.layers)
            .field("head", &self.spec.head)
            .finish()
    }
}

impl Net {
    /// Compiles `layers` for inputs of per-example shape `input` (`[C, H, W]` for
    /// images, `[features]` for vectors).
    ///
    /// # Errors
    /// [`Error::Config`] naming the layer when the layers do not fit the shapes (a
    /// convolution on vectors, a pool larger than its feature map, a linear layer on
    /// feature maps that were not flattened), when a rate is outside `[0, 1)`, when
    /// batch norms keep different numbers of per-step sets, or when the net has no
    /// parameters.
    pub fn new(input: &[usize], layers: Seq) -> Result<Net> {
        Net::try_from(NetSpec {
            label: "Net".to_string(),
            input: input.to_vec(),
            layers,
            head: None,
        })
    }

    /// The same net under another label, the name its panic messages give.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.spec.label = label.into();
        self
    }

    /// The same net with the head (what ANIL adapts, [`Model::head`]) chosen by name:
    /// the parameters under `prefix`. By default the head is the last layer with
    /// parameters.
    ///
    /// # Errors
    /// [`Error::Config`] if no parameter is under `prefix`.
    pub fn with_head(mut self, prefix: &str) -> Result<Self> {
        self.spec.head = Some(prefix.to_string());
        if self.select(prefix).is_empty() {
            return Err(Error::Config(format!(
                "metagrad::Net::with_head: no parameter is named `{prefix}` or `{prefix}.*`; \
                 the parameters are {:?}",
                self.param_names()
            )));
        }
        Ok(self)
    }

    /// The per-example input shape.
    pub fn input(&self) -> &[usize] {
        &self.spec.input
    }

    /// The per-example output shape.
    pub fn output(&self) -> &[usize] {
        &self.plan.output
    }

    /// The input width of the last layer (a classifier's head: its features).
    pub(crate) fn plan_features(&self) -> usize {
        self.plan
            .steps
            .last()
            .map_or(0, |s| s.input.iter().product())
    }

    /// The parameters' names, in [`Model::init`]'s order.
    pub fn param_names(&self) -> Vec<String> {
        self.plan.params.iter().map(|p| p.name.clone()).collect()
    }

    /// The number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.plan
            .params
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }

    /// Indices of the parameters selected by a pattern: a name, a prefix ending in
    /// `.*` (or a bare prefix: `head` selects `head.w` and `head.b`), or `*` for all.
    pub fn select(&self, pattern: &str) -> Vec<usize> {
        select(&self.param_names(), pattern)
    }

    fn fail(&self, step: &Step, got: &[usize]) -> ! {
        panic!(
            "metagrad::{}: layer `{}` ({}) expects input [N, {}], got {:?}",
            self.spec.label,
            if step.path.is_empty() {
                "-"
            } else {
                &step.path
            },
            op_name(&step.op),
            dims(&step.input),
            got
        )
    }

    fn run<F: Float>(
        &self,
        t: &mut Tape<F>,
        p: &[Var],
        x: Var,
        ctx: &mut Ctx<'_, F>,
        steps: &[Step],
    ) -> Var {
        let mut h = x;
        let mut i = 0;
        while i < steps.len() {
            let step = &steps[i];
            let shape = t.shape(h).to_vec();
            let lead = shape.len().saturating_sub(step.input.len());
            let stacks = matches!(step.op, Op::Linear { .. } | Op::Relu | Op::LeakyRelu(_));
            if lead == 0 || lead > 1 + stacks as usize || shape[lead..] != step.input[..] {
                self.fail(step, &shape);
            }
            let next = |k: usize| steps.get(i + k).map(|s| &s.op);
            let mut used = 1;
            h = match &step.op {
                Op::Linear { w, b } => {
                    if lead == 2 {
                        // A stack of tasks: x [T, N, in], w [T, out, in], b [T, out].
                        let y = t.matmul_t(h, p[*w], false, true);
                        let s = t.shape(p[*b]).to_vec();
                        let b = t.reshape(p[*b], &[s[0], 1, s[1]]);
                        t.add(y, b)
                    } else {
                        super::layers::linear(t, h, p[*w], p[*b])
                    }
                }
                Op::Conv { w, b, stride, pad } => match b {
                    Some(b) => t.conv2d_bias(h, p[*w], p[*b], *stride, *pad),
                    None => t.conv2d(h, p[*w], *stride, *pad),
                },
                Op::Norm(n) => {
                    // Batch norm, ReLU and 2×2 max-pooling run as one op.
                    let fused = matches!(n.kind, NormKind::Batch { .. })
                        && next(1) == Some(&Op::Relu)
                        && matches!(next(2), Some(Op::MaxPool(s, k)) if s == k);
                    if fused {
                        let Some(Op::MaxPool(size, _)) = next(2) else {
                            unreachable!()
                        };
                        used = 3;
                        let sets = affine_sets(n, p);
                        ctx.batch_norm_relu_max_pool2d(t, h, n.batch.unwrap(), &sets, *size)
                    } else {
                        self.norm(t, p, h, ctx, n)
                    }
                }
                Op::Relu => match next(1) {
                    // ReLU and max-pooling commute: one gather does both.
                    Some(Op::MaxPool(size, stride)) => {
                        used = 2;
                        t.relu_max_pool2d(h, *size, *stride)
                    }
                    _ => t.relu(h),
                },
                Op::LeakyRelu(slope) => t.leaky_relu(h, *slope),
                Op::MaxPool(size, stride) => t.max_pool2d(h, *size, *stride),
                Op::AvgPool(size, stride) => t.avg_pool2d(h, *size, *stride),
                Op::GlobalAvgPool => t.global_avg_pool(h),
                Op::Flatten => super::layers::flatten(t, h),
                Op::Dropout { p: rate, id } => match ctx.noise {
                    Some(key) if *rate > 0.0 => {
                        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[key, ctx.step as u64, *id]));
                        let keep = (0..shape.iter().product::<usize>())
                            .map(|_| rng.gen::<f64>() >= *rate)
                            .collect();
                        t.dropout(h, keep, 1.0 / (1.0 - rate))
                    }
                    _ => h,
                },
                Op::DropBlock { p: rate, size, id } => match ctx.noise {
                    Some(key) if *rate > 0.0 => {
                        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[key, ctx.step as u64, *id]));
                        let (keep, scale) = drop_block_mask(&shape, *rate, *size, &mut rng);
                        t.dropout(h, keep, scale)
                    }
                    _ => h,
                },
                Op::Residual { body, shortcut } => {
                    let a = self.run(t, p, h, ctx, body);
                    let b = if shortcut.is_empty() {
                        h
                    } else {
                        self.run(t, p, h, ctx, shortcut)
                    };
                    t.add(a, b)
                }
            };
            i += used;
        }
        h
    }

    fn norm<F: Float>(
        &self,
        t: &mut Tape<F>,
        p: &[Var],
        h: Var,
        ctx: &mut Ctx<'_, F>,
        n: &NormPlan,
    ) -> Var {
        let sets = affine_sets(n, p);
        match n.kind {
            NormKind::None => h,
            NormKind::Batch { .. } => ctx.batch_norm(t, h, n.batch.unwrap(), &sets),
            NormKind::Group { groups } => group_norm(t, h, sets[0], groups),
            NormKind::Layer => group_norm(t, h, sets[0], 1),
            NormKind::Instance => group_norm(t, h, sets[0], n.channels),
            NormKind::TaskNorm => {
                let c = n.context.unwrap();
                if ctx.context.len() <= c {
                    ctx.context.resize(c + 1, None);
                }
                let context = if ctx.record_context {
                    None
                } else {
                    Some(ctx.context[c].unwrap_or_else(|| {
                        panic!(
                            "metagrad::{}: TaskNorm needs a pass over the support set \
                             (Ctx::record_context) before other passes",
                            self.spec.label
                        )
                    }))
                };
                let (scale, offset) = n.blend.unwrap();
                let (y, used) = task_norm(t, h, sets[0], (p[scale], p[offset]), context);
                if ctx.record_context {
                    ctx.context[c] = Some(used);
                }
                y
            }
        }
    }
}

fn affine_sets(n: &NormPlan, p: &[Var]) -> Vec<Affine> {
    n.sets
        .iter()
        .map(|&(g, b)| Affine {
            gamma: p[g],
            beta: p[b],
            eps: n.eps,
        })
        .collect()
}

impl<F: Float> Model<F> for Net {
    fn init(&self, seed: u64) -> Params<F> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p = Params::new();
        for spec in &self.plan.params {
            let value = match spec.init {
                Init::Uniform(bound) => uniform(&mut rng, &spec.shape, bound),
                Init::Normal(std) => normal(&mut rng, &spec.shape, std),
                Init::Zeros => ArrayD::zeros(IxDyn(&spec.shape)),
                Init::Ones => ArrayD::from_elem(IxDyn(&spec.shape), F::one()),
            };
            p.push(spec.name.clone(), value);
        }
        p
    }

    fn forward(&self, t: &mut Tape<F>, p: &[Var], x: Var, ctx: &mut Ctx<'_, F>) -> Var {
        assert!(
            p.len() == self.plan.params.len(),
            "metagrad::{}: {} parameters given, the net has {}",
            self.spec.label,
            p.len(),
            self.plan.params.len()
        );
        self.run(t, p, x, ctx, &self.plan.steps)
    }

    fn head(&self) -> Vec<usize> {
        match &self.spec.head {
            Some(prefix) => self.select(prefix),
            None => {
                // The last layer with parameters: the parameters after the last break in
                // the path prefix.
                let names = self.param_names();
                let last = names.last().map(|n| owner(n)).unwrap_or_default();
                (0..names.len())
                    .filter(|&i| owner(&names[i]) == last)
                    .collect()
            }
        }
    }

    fn batch_norm_channels(&self) -> Vec<usize> {
        self.plan.batch_channels.clone()
    }

    fn inner_frozen(&self) -> Vec<usize> {
        self.plan.frozen.clone()
    }

    fn norm_steps(&self) -> usize {
        self.plan.norm_steps.unwrap_or(1)
    }

    fn needs_context(&self) -> bool {
        self.plan.contexts > 0
    }

    fn batches_tasks(&self) -> bool {
        fn batchable(steps: &[Step]) -> bool {
            steps.iter().all(|s| {
                matches!(s.op, Op::Linear { .. } | Op::Relu | Op::LeakyRelu(_))
                    || matches!(s.op, Op::Dropout { p, .. } if p == 0.0)
            })
        }
        batchable(&self.plan.steps)
    }

    fn outputs(&self) -> Option<usize> {
        match self.plan.steps.last().map(|s| &s.op) {
            Some(Op::Linear { .. }) => self.plan.output.first().copied(),
            _ => None,
        }
    }
}

/// The layer a parameter belongs to: its name without the last component (and without a
/// per-step suffix).
fn owner(name: &str) -> &str {
    let base = match name.rsplit_once('.') {
        Some((head, last)) if last.starts_with('s') && last[1..].parse::<usize>().is_ok() => head,
        _ => name,
    };
    base.rsplit_once('.').map_or("", |(owner, _)| owner)
}

fn select(names: &[String], pattern: &str) -> Vec<usize> {
    let prefix = pattern.strip_suffix(".*").unwrap_or(pattern);
    (0..names.len())
        .filter(|&i| {
            let n = &names[i];
            pattern == "*"
                || n == prefix
                || (n.starts_with(prefix) && n.as_bytes().get(prefix.len()) == Some(&b'.'))
        })
        .collect()
}

fn dims(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn op_name(op: &Op) -> String {
    match op {
        Op::Linear { .. } => "linear".into(),
        Op::Conv { stride, pad, .. } => format!("conv, stride {stride}, padding {pad}"),
        Op::Norm(n) => format!("norm {:?}", n.kind),
        Op::Relu => "relu".into(),
        Op::LeakyRelu(_) => "leaky_relu".into(),
        Op::MaxPool(s, _) => format!("max_pool {s}×{s}"),
        Op::AvgPool(s, _) => format!("avg_pool {s}×{s}"),
        Op::GlobalAvgPool => "global_avg_pool".into(),
        Op::Flatten => "flatten".into(),
        Op::Dropout { .. } => "dropout".into(),
        Op::DropBlock { .. } => "drop_block".into(),
        Op::Residual { .. } => "residual".into(),
    }
}

/// A 64-bit mix of several words (SplitMix64 steps), for per-task, per-step, per-layer
/// seeds that do not depend on the order in which tasks run.
pub(crate) fn mix(words: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &w in words {
        h ^= w;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

/// A DropBlock keep-mask for `[N, C, H, W]` and the rescaling of the kept elements:
/// block corners are drawn per example and channel with probability
/// `γ = p / s² · HW / ((H − s + 1)(W − s + 1))`, each dropping an `s × s` block
/// (s clamped to the map); the kept elements are scaled by total / kept.
fn drop_block_mask(shape: &[usize], p: f64, size: usize, rng: &mut ChaCha8Rng) -> (Vec<bool>, f64) {
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let s = size.min(h).min(w).max(1);
    let (vh, vw) = (h - s + 1, w - s + 1);
    let gamma = p / (s * s) as f64 * (h * w) as f64 / (vh * vw) as f64;
    let mut keep = vec![true; n * c * h * w];
    for map in keep.chunks_mut(h * w) {
        for i in 0..vh {
            for j in 0..vw {
                if rng.gen::<f64>() < gamma {
                    for di in 0..s {
                        for dj in 0..s {
                            map[(i + di) * w + j + dj] = false;
                        }
                    }
                }
            }
        }
    }
    let kept = keep.iter().filter(|&&k| k).count();
    let scale = if kept == 0 {
        0.0
    } else {
        keep.len() as f64 / kept as f64
    };
    (keep, scale)
}

/// Compiles a net: infers every layer's input shape, lays out the parameters and
/// registers the norm layers.
fn compile(spec: &NetSpec) -> Result<Plan> {
    let mut plan = Plan::default();
    let mut shape = spec.input.clone();
    if shape.is_empty() || shape.contains(&0) {
        return Err(Error::Config(format!(
            "metagrad::Net: input shape {:?} must be non-empty, without zeros",
            spec.input
        )));
    }
    plan.steps = compile_seq(&spec.layers, "", &mut shape, &mut plan)?;
    plan.output = shape;
    if plan.params.is_empty() {
        return Err(Error::Config(
            "metagrad::Net: the net has no parameters to learn".into(),
        ));
    }
    if let Some(head) = &spec.head {
        let names: Vec<String> = plan.params.iter().map(|p| p.name.clone()).collect();
        if select(&names, head).is_empty() {
            return Err(Error::Config(format!(
                "metagrad::Net: the head `{head}` names no parameter"
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for p in &plan.params {
        if !seen.insert(p.name.as_str()) {
            return Err(Error::Config(format!(
                "metagrad::Net: two parameters are named `{}`; give the layers distinct names",
                p.name
            )));
        }
    }
    Ok(plan)
}

fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{name}"),
    }
}

fn compile_seq(
    seq: &Seq,
    prefix: &str,
    shape: &mut Vec<usize>,
    plan: &mut Plan,
) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for (name, layer) in &seq.layers {
        let path = join(prefix, name);
        let input = shape.clone();
        let bad = |what: String| {
            Err(Error::Config(format!(
                "metagrad::Net: layer `{}` on input [N, {}]: {what}",
                if path.is_empty() { "-" } else { &path },
                dims(&input)
            )))
        };
        let param = |plan: &mut Plan, suffix: &str, shape: Vec<usize>, init: Init| {
            plan.params.push(ParamSpec {
                name: join(&path, suffix),
                shape,
                init,
            });
            plan.params.len() - 1
        };
        let op = match layer {
            Layer::Linear { out, init } => {
                if input.len() != 1 {
                    return bad("a linear layer takes vectors; flatten or pool first".into());
                }
                let inp = input[0];
                let (wi, bi) = match init {
                    LinearInit::Uniform => {
                        let bound = 1.0 / (inp as f64).sqrt();
                        (Init::Uniform(bound), Init::Uniform(bound))
                    }
                    LinearInit::Normal => (Init::Normal((1.0 / inp as f64).sqrt()), Init::Zeros),
                };
                let w = param(plan, "w", vec![*out, inp], wi);
                let b = param(plan, "b", vec![*out], bi);
                *shape = vec![*out];
                Op::Linear { w, b }
            }
            Layer::Conv {
                out,
                kernel,
                stride,
                pad,
                bias,
            } => {
                if input.len() != 3 {
                    return bad("a convolution takes [C, H, W] feature maps".into());
                }
                if *stride == 0 || *kernel == 0 || *out == 0 {
                    return bad("kernel, stride and output channels must be positive".into());
                }
                let (c, h, w) = (input[0], input[1] + 2 * pad, input[2] + 2 * pad);
                if h < *kernel || w < *kernel {
                    return bad(format!("a {kernel}×{kernel} kernel does not fit"));
                }
                let std = (2.0 / (c * kernel * kernel) as f64).sqrt();
                let wi = param(
                    plan,
                    "w",
                    vec![*out, c, *kernel, *kernel],
                    Init::Normal(std),
                );
                let b = bias.then(|| param(plan, "b", vec![*out], Init::Zeros));
                *shape = vec![*out, (h - kernel) / stride + 1, (w - kernel) / stride + 1];
                Op::Conv {
                    w: wi,
                    b,
                    stride: *stride,
                    pad: *pad,
                }
            }
            Layer::Norm { kind, eps } => {
                let channels = input[0];
                let image = input.len() == 3;
                let mut n = NormPlan {
                    kind: *kind,
                    eps: *eps,
                    channels,
                    sets: Vec::new(),
                    blend: None,
                    batch: None,
                    context: None,
                };
                let pair = |plan: &mut Plan, suffix: &str| {
                    let g = param(plan, &format!("gamma{suffix}"), vec![channels], Init::Ones);
                    let b = param(plan, &format!("beta{suffix}"), vec![channels], Init::Zeros);
                    (g, b)
                };
                match kind {
                    NormKind::None => {}
                    NormKind::Batch { per_step } => {
                        match per_step {
                            Some(0) => {
                                return bad("per-step batch norm needs at least one set".into())
                            }
                            Some(k) => {
                                for s in 0..*k {
                                    let set = pair(plan, &format!(".s{s}"));
                                    plan.frozen.extend([set.0, set.1]);
                                    n.sets.push(set);
                                }
                            }
                            None => n.sets.push(pair(plan, "")),
                        }
                        let k = per_step.unwrap_or(1);
                        if plan.batch_channels.is_empty() {
                            plan.norm_steps = Some(k);
                        } else if plan.norm_steps != Some(k) {
                            return bad(format!(
                                "batch norms must keep the same number of per-step sets \
                                 (an earlier one keeps {}, this one {k})",
                                plan.norm_steps.unwrap_or(1)
                            ));
                        }
                        n.batch = Some(plan.batch_channels.len());
                        plan.batch_channels.push(channels);
                    }
                    NormKind::Group { groups } => {
                        if !image {
                            return bad("group norm takes [C, H, W] feature maps".into());
                        }
                        if *groups == 0 || !channels.is_multiple_of(*groups) {
                            return bad(format!(
                                "{channels} channels do not split into {groups} groups"
                            ));
                        }
                        n.sets.push(pair(plan, ""));
                    }
                    NormKind::Layer | NormKind::Instance => {
                        if !image {
                            return bad(format!("{kind:?} norm takes [C, H, W] feature maps"));
                        }
                        n.sets.push(pair(plan, ""));
                    }
                    NormKind::TaskNorm => {
                        if !image {
                            return bad("TaskNorm takes [C, H, W] feature maps".into());
                        }
                        n.sets.push(pair(plan, ""));
                        let s = param(plan, "scale", vec![], Init::Zeros);
                        let o = param(plan, "offset", vec![], Init::Zeros);
                        n.blend = Some((s, o));
                        n.context = Some(plan.contexts);
                        plan.contexts += 1;
                    }
                }
                Op::Norm(n)
            }
            Layer::Relu => Op::Relu,
            Layer::LeakyRelu { slope } => Op::LeakyRelu(*slope),
            Layer::MaxPool { size, stride } | Layer::AvgPool { size, stride } => {
                if input.len() != 3 {
                    return bad("pooling takes [C, H, W] feature maps".into());
                }
                if *size == 0 || *stride == 0 || input[1] < *size || input[2] < *size {
                    return bad(format!("a {size}×{size} pool does not fit"));
                }
                *shape = vec![
                    input[0],
                    (input[1] - size) / stride + 1,
                    (input[2] - size) / stride + 1,
                ];
                match layer {
                    Layer::MaxPool { .. } => Op::MaxPool(*size, *stride),
                    _ => Op::AvgPool(*size, *stride),
                }
            }
            Layer::GlobalAvgPool => {
                if input.len() != 3 {
                    return bad("global pooling takes [C, H, W] feature maps".into());
                }
                *shape = vec![input[0]];
                Op::GlobalAvgPool
            }
            Layer::Flatten => {
                *shape = vec![input.iter().product()];
                Op::Flatten
            }
            Layer::Dropout { p } | Layer::DropBlock { p, .. } => {
                if !(0.0..1.0).contains(p) {
                    return bad(format!("the rate {p} is outside [0, 1)"));
                }
                let id = plan.noise_layers;
                plan.noise_layers += 1;
                match layer {
                    Layer::Dropout { .. } => Op::Dropout { p: *p, id },
                    Layer::DropBlock { size, .. } => {
                        if input.len() != 3 || *size == 0 {
                            return bad(
                                "DropBlock takes [C, H, W] feature maps and a block size above 0"
                                    .into(),
                            );
                        }
                        Op::DropBlock {
                            p: *p,
                            size: *size,
                            id,
                        }
                    }
                    _ => unreachable!(),
                }
            }
            Layer::Seq(inner) => {
                steps.extend(compile_seq(inner, &path, shape, plan)?);
                continue;
            }
            Layer::Residual { body, shortcut } => {
                let mut a = input.clone();
                let body = compile_seq(body, &path, &mut a, plan)?;
                let mut b = input.clone();
                let shortcut = compile_seq(shortcut, &join(&path, "shortcut"), &mut b, plan)?;
                if a != b {
                    return bad(format!(
                        "the body gives [N, {}] and the shortcut [N, {}]; they must match",
                        dims(&a),
                        dims(&b)
                    ));
                }
                *shape = a;
                Op::Residual { body, shortcut }
            }
        };
        steps.push(Step { path, input, op });
    }
    Ok(steps)
}
