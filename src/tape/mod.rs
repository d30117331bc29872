//! The reverse-mode autodiff tape.
//!
//! A [`Tape`] is an arena of nodes in the order they were computed; a [`Var`] is an index
//! into it. Each node holds its value (a row-major `ndarray` array) and the [`Op`] that
//! produced it. [`Tape::grad`] walks the tape backwards and applies each op's backward rule
//! (`vjp.rs`); the rules are written with the same tape ops users call, so with
//! `create_graph = true` the gradients are ordinary tape values that can be differentiated
//! again (Hessian-vector products, MAML meta-gradients through the inner update).
//!
//! A tape holds plain arrays and no shared pointers, so it is `Send`: one tape per task
//! runs inside a rayon worker.
//!
//! A tape counts the bytes of the values it holds ([`Tape::bytes`]) and their high-water
//! mark ([`Tape::peak_bytes`]): the figure the meta-learners use to bound the tasks in
//! flight by memory ([`MetaConfig::memory_budget`](crate::meta::MetaConfig::memory_budget)).
//!
//! ```
//! use metagrad::Tape;
//! use ndarray::arr1;
//! let mut t = Tape::<f64>::new();
//! let x = t.param(arr1(&[2.0]).into_dyn());
//! let y = t.powi(x, 3);                       // x³
//! let y = t.sum(y);
//! let g = t.grad(y, &[x], true)[0];           // 3x² = 12, recorded on the tape
//! let gs = t.sum(g);
//! let h = t.grad(gs, &[x], false)[0];         // 6x = 12
//! assert_eq!(t.value(g)[[0]], 12.0);
//! assert_eq!(t.value(h)[[0]], 12.0);
//! ```

mod grad;
pub(crate) mod meter;
pub mod op;
mod vjp;

use crate::Float;
use meter::Meter;
use ndarray::{ArrayD, IxDyn};
pub use op::Op;

/// A handle to a value on a [`Tape`]: an index, cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Var(pub(crate) usize);

impl Var {
    /// The node's position on its tape.
    pub fn index(self) -> usize {
        self.0
    }
}

#[derive(Debug)]
struct Node<F> {
    value: ArrayD<F>,
    op: Op,
    requires_grad: bool,
}

/// A reverse-mode autodiff tape over tensors of element type `F` (`f32` or `f64`).
#[derive(Debug)]
pub struct Tape<F: Float> {
    nodes: Vec<Node<F>>,
    recording: bool,
    /// An empty array, cloned (without allocating) into nodes whose values are freed.
    empty: ArrayD<F>,
    /// Bytes of the values held now, and their high-water mark.
    bytes: usize,
    peak: usize,
    /// Where the bytes are reported as well: the meter of the task that made the tape
    /// (see [`meter`]), if it is measured.
    meter: Option<Meter>,
}

/// The bytes of an array's elements.
fn size_of_value<F>(a: &ArrayD<F>) -> usize {
    a.len() * std::mem::size_of::<F>()
}

impl<F: Float> Default for Tape<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Float> Tape<F> {
    /// An empty tape that records operations.
    pub fn new() -> Self {
        Tape {
            nodes: Vec::with_capacity(256),
            recording: true,
            empty: ArrayD::zeros(IxDyn(&[0])),
            bytes: 0,
            peak: 0,
            meter: Meter::current(),
        }
    }

    /// The bytes of the values the tape holds now (elements only: not the nodes' own
    /// bookkeeping, nor the temporary buffers inside ops).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The most bytes of values the tape has held at once since it was made (the
    /// high-water mark of [`Tape::bytes`]).
    ///
    /// ```
    /// use metagrad::Tape;
    /// use ndarray::Array1;
    /// let mut t = Tape::<f32>::new();
    /// let x = t.param(Array1::zeros(1000).into_dyn());
    /// let y = t.square(x);
    /// assert_eq!(t.bytes(), 8000);
    /// let _ = t.take(y);
    /// assert_eq!((t.bytes(), t.peak_bytes()), (4000, 8000));
    /// ```
    pub fn peak_bytes(&self) -> usize {
        self.peak
    }

    /// Counts `n` bytes more.
    fn grow(&mut self, n: usize) {
        self.bytes += n;
        self.peak = self.peak.max(self.bytes);
        if let Some(m) = &self.meter {
            m.grow(n);
        }
    }

    /// Counts `n` bytes fewer.
    fn shrink(&mut self, n: usize) {
        self.bytes -= n;
        if let Some(m) = &self.meter {
            m.shrink(n);
        }
    }

    /// Replaces the value of node `i` with an empty array, returning it.
    fn vacate(&mut self, i: usize) -> ArrayD<F> {
        let a = std::mem::replace(&mut self.nodes[i].value, self.empty.clone());
        self.shrink(size_of_value(&a));
        a
    }

    /// Places a differentiable leaf (a parameter or an input to differentiate by) on the
    /// tape. The array is stored in row-major layout.
    pub fn param(&mut self, value: ArrayD<F>) -> Var {
        self.leaf(value, true)
    }

    /// Places a constant on the tape: gradients never flow into it.
    pub fn constant(&mut self, value: ArrayD<F>) -> Var {
        self.leaf(value, false)
    }

    /// A constant scalar (a 0-dimensional tensor).
    pub fn scalar(&mut self, v: f64) -> Var {
        self.constant(ArrayD::from_elem(IxDyn(&[]), F::c(v)))
    }

    /// A constant tensor of zeros.
    pub fn zeros(&mut self, shape: &[usize]) -> Var {
        self.constant(ArrayD::zeros(IxDyn(shape)))
    }

    fn leaf(&mut self, value: ArrayD<F>, requires_grad: bool) -> Var {
        let value = if value.is_standard_layout() {
            value
        } else {
            value.as_standard_layout().into_owned()
        };
        self.grow(size_of_value(&value));
        self.nodes.push(Node {
            value,
            op: Op::Leaf,
            requires_grad,
        });
        Var(self.nodes.len() - 1)
    }

    /// A constant holding the current value of `v`: gradients stop there
    /// (`stop_gradient`, `detach`).
    pub fn detach(&mut self, v: Var) -> Var {
        let value = self.value(v).clone();
        self.constant(value)
    }

    /// Records a node computed by an op. The value must be row-major; the node requires a
    /// gradient when recording is on and any input requires one.
    pub(crate) fn push(&mut self, value: ArrayD<F>, op: Op, inputs: &[Var]) -> Var {
        debug_assert!(
            value.is_standard_layout(),
            "{} produced a strided array",
            op.name()
        );
        let requires_grad = self.recording && inputs.iter().any(|v| self.requires_grad(*v));
        let op = if requires_grad { op } else { Op::Leaf };
        self.grow(size_of_value(&value));
        self.nodes.push(Node {
            value,
            op,
            requires_grad,
        });
        Var(self.nodes.len() - 1)
    }

    /// The value of `v`.
    #[track_caller]
    pub fn value(&self, v: Var) -> &ArrayD<F> {
        match self.nodes.get(v.0) {
            Some(n) => &n.value,
            None => panic!(
                "metagrad: Var({}) is not on this tape (it has {} nodes); \
                 a Var belongs to the tape that made it",
                v.0,
                self.nodes.len()
            ),
        }
    }

    /// The shape of `v`.
    #[track_caller]
    pub fn shape(&self, v: Var) -> &[usize] {
        self.value(v).shape()
    }

    /// The single element of a one-element tensor (a loss), as `f64`.
    #[track_caller]
    pub fn item(&self, v: Var) -> f64 {
        let a = self.value(v);
        assert!(
            a.len() == 1,
            "metagrad::item: expected a one-element tensor, got shape {:?}",
            a.shape()
        );
        a.iter().next().copied().unwrap_or_else(F::zero).f64()
    }

    /// Whether gradients flow into `v`.
    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// The op that produced `v`.
    pub fn op(&self, v: Var) -> &Op {
        &self.nodes[v.0].op
    }

    /// Number of nodes on the tape.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tape is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether new ops are recorded for differentiation.
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Runs `f` with recording off: ops compute values but record nothing to
    /// differentiate (like `torch.no_grad`). For evaluation and plain inference.
    pub fn no_grad<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let was = std::mem::replace(&mut self.recording, false);
        let r = f(self);
        self.recording = was;
        r
    }

    /// Removes the value of `v` from the tape and returns it (the node keeps an empty
    /// array). For taking results out of a tape that is about to be dropped.
    pub fn take(&mut self, v: Var) -> ArrayD<F> {
        self.vacate(v.0)
    }

    /// Drops every node after the first `len` (values computed since a checkpoint of
    /// [`Tape::len`]).
    pub(crate) fn truncate(&mut self, len: usize) {
        let dropped: usize = self
            .nodes
            .get(len..)
            .unwrap_or_default()
            .iter()
            .map(|n| size_of_value(&n.value))
            .sum();
        self.shrink(dropped);
        self.nodes.truncate(len);
    }
}

impl<F: Float> Drop for Tape<F> {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.shrink(self.bytes);
        }
    }
}

// A tape must move into a rayon worker.
#[allow(dead_code)]
fn assert_send<F: Float>() {
    fn is_send<T: Send>() {}
    is_send::<Tape<F>>();
}
