//! The closed set of primitive operations a tape records.
//!
//! Every variant has exactly one backward rule in `vjp.rs`, written with the tape's
//! own ops; the `match` there is exhaustive, so an op without a rule does not compile,
//! and every rule is itself differentiable. (The two batch-norm ops' rules also have a
//! fused form, which the backward pass asks for when it creates no graph; see
//! [`crate::ops::norm`].) Composite operations (softmax, cross-entropy, group norm,
//! max-pool, ...) are built from these in [`crate::ops`].
//!
//! This module imports nothing from the layers above the tape: the payloads the ops carry
//! ([`Gather`], [`ConvGeom`], [`BatchStats`], [`BatchNorm`], [`BatchNormGrad`]) are
//! defined here.

use super::Var;
use std::sync::Arc;

/// Marks an output element of a [`Gather`] that reads no input element (it is zero).
pub const NONE: usize = usize::MAX;

/// A fixed index map between two flat, row-major tensors: output element `i` reads input
/// element `src[i]` (or is zero where `src[i] == NONE`).
///
/// Gathering with it is a linear map whose adjoint is scatter-adding with it, and vice
/// versa, so slicing, padding, index selection, max-pool and max over an axis are all one
/// differentiable-to-any-order pair of primitives.
#[derive(Debug)]
pub struct Gather {
    /// For each output element, the flat input element it reads.
    pub src: Vec<usize>,
    /// The input shape.
    pub in_shape: Vec<usize>,
    /// The output shape.
    pub out_shape: Vec<usize>,
}

/// Geometry of a 2-D convolution (NCHW input, OIHW weight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (both directions).
    pub pad: usize,
}

impl ConvGeom {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Whether some dimension is zero: then the convolution and both its adjoints are
    /// sums over nothing or tensors of nothing, all zeros.
    pub fn is_empty(&self) -> bool {
        [self.n, self.c, self.h, self.w, self.o, self.kh, self.kw].contains(&0)
    }
}

/// What a batch norm's forward pass measured, per channel: the mean and the **biased**
/// variance (divided by the element count, the one the normalisation divides by; the
/// running statistics in [`crate::nn`] keep unbiased estimates instead).
#[derive(Debug)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel biased (divide-by-count) variance.
    pub var: Vec<f64>,
}

/// The payload of [`Op::BatchNorm`]: batch normalisation of `x` with the batch's own
/// per-channel statistics, the affine map `gamma`, `beta`, and with `pool` ReLU and
/// max-pooling fused in.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// Input `[N, C, ...]`.
    pub x: Var,
    /// Per-channel scale `[C]`.
    pub gamma: Var,
    /// Per-channel shift `[C]`.
    pub beta: Var,
    /// Added to the variance.
    pub eps: f64,
    /// The statistics the forward pass used.
    pub stats: Arc<BatchStats>,
    /// For ReLU and max-pooling fused in: each output element's source in `x`.
    pub pool: Option<Arc<Gather>>,
}

/// The payload of [`Op::BatchNormGrad`]: the input gradient of a [`BatchNorm`] (without
/// pooling) for the upstream gradient `g`.
#[derive(Debug, Clone)]
pub struct BatchNormGrad {
    /// The batch norm's input `[N, C, ...]`.
    pub x: Var,
    /// Its per-channel scale `[C]`.
    pub gamma: Var,
    /// The upstream gradient, shaped like `x`.
    pub g: Var,
    /// Added to the variance.
    pub eps: f64,
    /// The statistics of `x`.
    pub stats: Arc<BatchStats>,
}

/// A recorded operation: what produced a node, and from which nodes.
#[derive(Debug, Clone)]
pub enum Op {
    /// A parameter or constant placed on the tape by the user.
    Leaf,
    /// `a + b`, numpy broadcasting.
    Add(Var, Var),
    /// `a - b`, numpy broadcasting.
    Sub(Var, Var),
    /// `a * b`, numpy broadcasting.
    Mul(Var, Var),
    /// `a / b`, numpy broadcasting.
    Div(Var, Var),
    /// `-a`.
    Neg(Var),
    /// `a + c` for a scalar `c`.
    AddScalar(Var, f64),
    /// `a * c` for a scalar `c`.
    MulScalar(Var, f64),
    /// `a^n` for an integer `n`.
    Powi(Var, i32),
    /// `exp(a)`.
    Exp(Var),
    /// `ln(a)`.
    Ln(Var),
    /// `sqrt(a)`.
    Sqrt(Var),
    /// `tanh(a)`.
    Tanh(Var),
    /// `1 / (1 + exp(-a))`.
    Sigmoid(Var),
    /// `a` where the mask is true, zero elsewhere (same shape). Linear in `a`; the mask
    /// is a constant, so a ReLU's second derivative is zero.
    Mask(Var, Arc<Vec<bool>>),
    /// For each element, the sum of the *other* elements along the last axis
    /// (`Σₖ aₖ − aᵢ` without the cancellation). Linear and self-adjoint.
    SumOthers(Var),
    /// Sum over broadcast dimensions down to the target shape (the adjoint of
    /// [`Op::BroadcastTo`]).
    SumTo(Var, Vec<usize>),
    /// Broadcast to a larger shape (the adjoint of [`Op::SumTo`]).
    BroadcastTo(Var, Vec<usize>),
    /// Same elements, new shape.
    Reshape(Var, Vec<usize>),
    /// Axes reordered: output axis `i` is input axis `perm[i]`.
    Permute(Var, Vec<usize>),
    /// Concatenation along an axis.
    Concat(Vec<Var>, usize),
    /// `out[i] = a[src[i]]`.
    Gather(Var, Arc<Gather>),
    /// `out[src[i]] += a[i]` into zeros of the gather's input shape.
    ScatterAdd(Var, Arc<Gather>),
    /// `op(a) @ op(b)` for 2-D or batched 3-D operands; the flags transpose the last two
    /// axes of an operand.
    MatMul {
        /// Left operand.
        a: Var,
        /// Right operand.
        b: Var,
        /// Transpose `a`.
        ta: bool,
        /// Transpose `b`.
        tb: bool,
    },
    /// 2-D convolution `conv(x, w)`, NCHW.
    Conv2d(Var, Var, ConvGeom),
    /// [`Op::Conv2d`] with a bias `b: [O]` added to each output channel on the way out:
    /// `conv(x, w) + b`, one op instead of a convolution and a broadcast add (which made
    /// a pass of its own over the output). Operands `x, w, b`.
    Conv2dBias(Var, Var, Var, ConvGeom),
    /// The convolution's adjoint in its input, `conv_input_grad(g, w)`: the transposed
    /// convolution of `g` with `w`, of the input's shape.
    Conv2dInputGrad(Var, Var, ConvGeom),
    /// The convolution's adjoint in its weight, `conv_weight_grad(x, g)`, of the
    /// weight's shape.
    Conv2dWeightGrad(Var, Var, ConvGeom),
    /// Log-softmax along the last axis.
    LogSoftmax(Var),
    /// Softmax along the last axis.
    Softmax(Var),
    /// Batch normalisation with the batch's own statistics, optionally followed by ReLU
    /// and max-pooling, as one op (see [`crate::ops::norm`]).
    BatchNorm(BatchNorm),
    /// The input gradient of [`Op::BatchNorm`] for an upstream gradient: the op its
    /// backward rule records when a graph is created (see [`crate::ops::norm`]).
    BatchNormGrad(BatchNormGrad),
}

impl Op {
    /// The op's name, used in panic messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Leaf => "leaf",
            Op::Add(..) => "add",
            Op::Sub(..) => "sub",
            Op::Mul(..) => "mul",
            Op::Div(..) => "div",
            Op::Neg(..) => "neg",
            Op::AddScalar(..) => "add_scalar",
            Op::MulScalar(..) => "mul_scalar",
            Op::Powi(..) => "powi",
            Op::Exp(..) => "exp",
            Op::Ln(..) => "ln",
            Op::Sqrt(..) => "sqrt",
            Op::Tanh(..) => "tanh",
            Op::Sigmoid(..) => "sigmoid",
            Op::Mask(..) => "mask",
            Op::SumOthers(..) => "sum_others",
            Op::SumTo(..) => "sum_to",
            Op::BroadcastTo(..) => "broadcast_to",
            Op::Reshape(..) => "reshape",
            Op::Permute(..) => "permute",
            Op::Concat(..) => "concat",
            Op::Gather(..) => "gather",
            Op::ScatterAdd(..) => "scatter_add",
            Op::MatMul { .. } => "matmul",
            Op::Conv2d(..) => "conv2d",
            Op::Conv2dBias(..) => "conv2d_bias",
            Op::Conv2dInputGrad(..) => "conv2d_input_grad",
            Op::Conv2dWeightGrad(..) => "conv2d_weight_grad",
            Op::LogSoftmax(..) => "log_softmax",
            Op::Softmax(..) => "softmax",
            Op::BatchNorm(BatchNorm { pool: None, .. }) => "batch_norm_batch_stats",
            Op::BatchNorm(_) => "batch_norm_relu_max_pool2d",
            Op::BatchNormGrad(_) => "batch_norm_grad",
        }
    }
}
