//! The [`Model`] trait, and the ready networks built as [`Net`] compositions: the
//! sinusoid [`Mlp`], [`Conv4`], [`Conv6`] and [`ResNet12`].

use super::net::{Layer, LinearInit, Net, Seq};
use super::norm::Ctx;
pub use super::norm::NormKind;
use super::Params;
use crate::{Float, Tape, Var};
use serde::{Deserialize, Serialize};
use std::fmt;

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
///   statistics each batch norm used, in layer order ([`Observed`](super::Observed), with
///   `layer` as in [`Model::batch_norm_channels`] and `step` = `ctx.step` for per-step
///   statistics). The learner folds them into its running statistics after a successful
///   step, and refuses a step in which a model that declares batch norms filed none.
///   [`Ctx::batch_norm`] does all of this, and the two items below, in one call.
/// - **`ctx.step`**: the inner step being run (0-based); select per-step weights or
///   statistics with it when [`Model::norm_steps`] is above 1.
/// - **`ctx.running`**: the learner's running statistics; read them in inductive mode.
/// - **`ctx.record_context`**, **`ctx.context`**: only for models whose
///   [`Model::needs_context`] is true (TaskNorm): when recording, store each norm's
///   context statistics in `ctx.context[layer]`; otherwise read them from there.
///
/// Networks composed from layers ([`Net`]) do all of it themselves. A hand-written
/// model without normalisation can ignore `ctx` entirely:
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
/// initialised uniform in ±1/√in as PyTorch does; with a `norm`, each hidden layer is
/// followed by it (parameters `n{i}.gamma`, `n{i}.beta`) before the ReLU.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Mlp {
    /// Layer widths, input first.
    pub sizes: Vec<usize>,
    /// The normalisation after each hidden layer: [`NormKind::None`] or
    /// [`NormKind::Batch`] (the others normalise feature maps).
    #[serde(default = "no_norm")]
    pub norm: NormKind,
}

fn no_norm() -> NormKind {
    NormKind::None
}

impl Mlp {
    /// An MLP with these layer widths (input first) and no normalisation.
    pub fn new(sizes: Vec<usize>) -> Self {
        Mlp {
            sizes,
            norm: NormKind::None,
        }
    }

    /// The sinusoid network 1-40-40-1.
    pub fn sinusoid() -> Self {
        Mlp::new(vec![1, 40, 40, 1])
    }

    /// The composition.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) for fewer than two sizes, a zero width or
    /// a norm that does not apply to vectors.
    pub fn net(&self) -> crate::Result<Net> {
        if self.sizes.len() < 2 {
            return Err(crate::Error::Config(format!(
                "metagrad::Mlp: sizes {:?} need an input and an output width",
                self.sizes
            )));
        }
        let layers = self.sizes.len() - 1;
        let mut seq = Seq::new();
        for (i, &out) in self.sizes[1..].iter().enumerate() {
            seq = seq.linear(format!("l{i}"), out);
            if i + 1 < layers {
                if self.norm != NormKind::None {
                    seq = seq.norm(format!("n{i}"), self.norm);
                }
                seq = seq.relu();
            }
        }
        labelled(format!("{self:?}"), &self.sizes[..1], seq)
    }
}

/// `Mlp { sizes: [..] }`, with the norm only when there is one: checkpoints describe a
/// model by this form, and those saved before the norm existed still fit.
impl fmt::Debug for Mlp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Mlp");
        d.field("sizes", &self.sizes);
        if self.norm != NormKind::None {
            d.field("norm", &self.norm);
        }
        d.finish()
    }
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

/// Conv-4: four blocks of 3×3 conv → norm → ReLU (→ 2×2 max-pool), then a linear head
/// of `ways` outputs, for any input size and channel count. Parameters per block
/// `b{i}.conv.w`, `b{i}.conv.b`, then the norm's (`b{i}.norm.gamma`, `b{i}.norm.beta`,
/// per step with a `.s{k}` suffix; TaskNorm adds `b{i}.norm.scale`, `b{i}.norm.offset`);
/// then `head.w: [ways, features]`, `head.b`. (Batch norm, ReLU and pooling run as one
/// fused op, [`Tape::batch_norm_relu_max_pool2d`].)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv4 {
    /// Input channels (1 for Omniglot, 3 for colour images).
    pub in_channels: usize,
    /// Input height and width.
    pub image_size: usize,
    /// Filters per convolution (64 in MAML's Omniglot network, 32 in its miniImageNet one).
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

    /// The MAML miniImageNet network for `ways` classes: 84×84 RGB inputs, 32 filters,
    /// batch norm, max-pooling (84→42→21→10→5, 800 features).
    pub fn mini_imagenet(ways: usize) -> Self {
        Conv4 {
            in_channels: 3,
            image_size: 84,
            filters: 32,
            ..Conv4::omniglot(ways)
        }
    }

    /// The head's input width.
    ///
    /// # Panics
    /// If the input is too small for the blocks (see [`Conv4::net`]).
    pub fn features(&self) -> usize {
        match self.net() {
            Ok(net) => net.plan_features(),
            Err(e) => panic!("{e}"),
        }
    }

    /// The composition.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) when the image is too small for four
    /// blocks (with max-pooling, 16×16 is the least), or the norm does not fit the
    /// filters (groups that do not divide them).
    pub fn net(&self) -> crate::Result<Net> {
        conv_net(
            &format!("{self:?}"),
            [self.in_channels, self.image_size, self.filters, self.ways],
            self.norm,
            self.eps,
            4,
            self.downsample,
        )
    }
}

/// Conv-6: Conv-4 with two more blocks of 3×3 conv → norm → ReLU, without pooling, as
/// in CloserLookFewShot; parameters named as [`Conv4`]'s (`b4.*`, `b5.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv6 {
    /// Input channels.
    pub in_channels: usize,
    /// Input height and width.
    pub image_size: usize,
    /// Filters per convolution.
    pub filters: usize,
    /// Output classes.
    pub ways: usize,
    /// Normalisation in each block.
    pub norm: NormKind,
    /// Added to variances before the square root.
    pub eps: f64,
}

impl Conv6 {
    /// The composition.
    ///
    /// # Errors
    /// As [`Conv4::net`].
    pub fn net(&self) -> crate::Result<Net> {
        conv_net(
            &format!("{self:?}"),
            [self.in_channels, self.image_size, self.filters, self.ways],
            self.norm,
            self.eps,
            6,
            Downsample::MaxPool,
        )
    }
}

/// `blocks` conv blocks (the first four pooled or strided), then the head.
fn conv_net(
    label: &str,
    [channels, size, filters, ways]: [usize; 4],
    norm: NormKind,
    eps: f64,
    blocks: usize,
    downsample: Downsample,
) -> crate::Result<Net> {
    let mut seq = Seq::new();
    for b in 0..blocks {
        let shrinks = b < 4;
        let stride = if shrinks && downsample == Downsample::Strided {
            2
        } else {
            1
        };
        let mut block = Seq::new().push(
            "conv",
            Layer::Conv {
                out: filters,
                kernel: 3,
                stride,
                pad: 1,
                bias: true,
            },
        );
        if norm != NormKind::None {
            block = block.push("norm", Layer::Norm { kind: norm, eps });
        }
        block = block.relu();
        if shrinks && downsample == Downsample::MaxPool {
            block = block.max_pool(2);
        }
        seq = seq.block(format!("b{b}"), block);
    }
    seq = match downsample {
        Downsample::MaxPool => seq.flatten(),
        Downsample::Strided => seq.global_avg_pool(),
    };
    let seq = seq.push(
        "head",
        Layer::Linear {
            out: ways,
            init: LinearInit::Normal,
        },
    );
    labelled(label.to_string(), &[channels, size, size], seq)
}

/// ResNet-12 as MetaOptNet defines it (Lee et al., 2019): four residual blocks of widths
/// `widths` (64-160-320-640), each three 3×3 convolutions without bias, each followed by
/// batch norm, with LeakyReLU(0.1) after the first two; a 1×1 convolution with batch
/// norm as the shortcut; the sum; LeakyReLU(0.1); 2×2 max-pooling; optionally dropout
/// (first two blocks) and DropBlock (last two); then global average pooling and a
/// linear head.
///
/// Parameters per block `b{i}.conv{1,2,3}.w`, `b{i}.norm{1,2,3}.{gamma,beta}`,
/// `b{i}.shortcut.conv.w`, `b{i}.shortcut.norm.{gamma,beta}`, then `head.w`, `head.b`:
/// the order of the reference script's W5 (`../shared/ref/maml_torch.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNet12 {
    /// Input channels.
    pub in_channels: usize,
    /// Input height and width (32 for CIFAR-FS and FC100, 84 for miniImageNet).
    pub image_size: usize,
    /// The blocks' widths.
    pub widths: [usize; 4],
    /// Output classes.
    pub ways: usize,
    /// Normalisation after each convolution (batch norm in MetaOptNet).
    pub norm: NormKind,
    /// The negative slope of the leaky ReLUs.
    pub slope: f64,
    /// Dropout rate after the first two blocks and DropBlock rate after the last two
    /// (0: none; MetaOptNet uses 0.1). Active in meta-training only.
    pub drop_rate: f64,
    /// DropBlock's block size (5 in MetaOptNet; clamped to the feature map).
    pub drop_block_size: usize,
    /// Added to variances before the square root.
    pub eps: f64,
}

impl ResNet12 {
    /// MetaOptNet's ResNet-12 for `ways` classes on `image_size`² RGB images, with batch
    /// norm and without dropout (the W5 workload's network).
    pub fn new(ways: usize, image_size: usize) -> Self {
        ResNet12 {
            in_channels: 3,
            image_size,
            widths: [64, 160, 320, 640],
            ways,
            norm: NormKind::Batch { per_step: None },
            slope: 0.1,
            drop_rate: 0.0,
            drop_block_size: 5,
            eps: 1e-5,
        }
    }

    /// The composition.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) when the image is too small for four
    /// poolings (16×16 is the least) or a rate is outside `[0, 1)`.
    pub fn net(&self) -> crate::Result<Net> {
        let label = format!("{self:?}");
        let conv = |out, kernel| Layer::Conv {
            out,
            kernel,
            stride: 1,
            pad: kernel / 2,
            bias: false,
        };
        let norm = Layer::Norm {
            kind: self.norm,
            eps: self.eps,
        };
        let mut seq = Seq::new();
        for (b, &width) in self.widths.iter().enumerate() {
            let body = Seq::new()
                .push("conv1", conv(width, 3))
                .push("norm1", norm.clone())
                .leaky_relu(self.slope)
                .push("conv2", conv(width, 3))
                .push("norm2", norm.clone())
                .leaky_relu(self.slope)
                .push("conv3", conv(width, 3))
                .push("norm3", norm.clone());
            let shortcut = Seq::new()
                .push("conv", conv(width, 1))
                .push("norm", norm.clone());
            let mut block = Seq::new()
                .residual("", body, shortcut)
                .leaky_relu(self.slope)
                .max_pool(2);
            if self.drop_rate > 0.0 {
                block = if b < 2 {
                    block.dropout(self.drop_rate)
                } else {
                    block.drop_block(self.drop_rate, self.drop_block_size)
                };
            }
            seq = seq.block(format!("b{b}"), block);
        }
        let seq = seq.global_avg_pool().push(
            "head",
            Layer::Linear {
                out: self.ways,
                init: LinearInit::Normal,
            },
        );
        labelled(
            label,
            &[self.in_channels, self.image_size, self.image_size],
            seq,
        )
    }
}

/// [`Net::new`] under a label, which its errors give too.
fn labelled(label: String, input: &[usize], seq: Seq) -> crate::Result<Net> {
    match Net::new(input, seq) {
        Ok(net) => Ok(net.with_label(label)),
        Err(crate::Error::Config(m)) => Err(crate::Error::Config(m.replacen(
            "metagrad::Net:",
            &format!("metagrad::{label}:"),
            1,
        ))),
        Err(e) => Err(e),
    }
}

/// The ready networks are their compositions: each `Model` method asks the net.
macro_rules! composed {
    ($($ty:ty),*) => {$(
        impl<F: Float> Model<F> for $ty {
            fn init(&self, seed: u64) -> Params<F> {
                self.built().init(seed)
            }
            fn forward(&self, t: &mut Tape<F>, p: &[Var], x: Var, ctx: &mut Ctx<'_, F>) -> Var {
                self.built().forward(t, p, x, ctx)
            }
            fn head(&self) -> Vec<usize> {
                <Net as Model<F>>::head(&self.built())
            }
            fn batch_norm_channels(&self) -> Vec<usize> {
                <Net as Model<F>>::batch_norm_channels(&self.built())
            }
            fn inner_frozen(&self) -> Vec<usize> {
                <Net as Model<F>>::inner_frozen(&self.built())
            }
            fn norm_steps(&self) -> usize {
                <Net as Model<F>>::norm_steps(&self.built())
            }
            fn needs_context(&self) -> bool {
                <Net as Model<F>>::needs_context(&self.built())
            }
            fn batches_tasks(&self) -> bool {
                <Net as Model<F>>::batches_tasks(&self.built())
            }
            fn outputs(&self) -> Option<usize> {
                <Net as Model<F>>::outputs(&self.built())
            }
        }

        impl $ty {
            /// The composition, for the `Model` methods: built once per thread and
            /// kept while the configuration stays the same (its fields are public), so
            /// that a small network's forward pass does not pay for compiling it.
            ///
            /// # Panics
            /// With the configuration error when the network cannot be built.
            fn built(&self) -> std::rc::Rc<Net> {
                type Last = std::cell::RefCell<Option<($ty, std::rc::Rc<Net>)>>;
                thread_local! {
                    static LAST: Last = const { std::cell::RefCell::new(None) };
                }
                LAST.with(|last| {
                    if let Some((model, net)) = &*last.borrow() {
                        if model == self {
                            return net.clone();
                        }
                    }
                    let net = std::rc::Rc::new(self.net().unwrap_or_else(|e| panic!("{e}")));
                    *last.borrow_mut() = Some((self.clone(), net.clone()));
                    net
                })
            }
        }
    )*};
}

composed!(Mlp, Conv4, Conv6, ResNet12);
