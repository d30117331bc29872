//! Named parameter tensors that live outside any tape.

use crate::{Float, Tape, Var};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

/// An ordered set of named tensors: a network's parameters, or learned inner learning
/// rates. Serialisable with serde, so it can be saved and loaded. A training step places
/// them on a tape with [`Params::place`]; the network functions take the resulting
/// [`Var`]s in the same order, so they run the same with the meta-parameters and with
/// adapted ("fast") parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "F: Float")]
pub struct Params<F> {
    names: Vec<String>,
    tensors: Vec<ArrayD<F>>,
}

impl<F: Float> Default for Params<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Float> Params<F> {
    /// An empty set.
    pub fn new() -> Self {
        Params {
            names: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Appends a tensor under a new name.
    ///
    /// # Panics
    /// If the name is already taken.
    #[track_caller]
    pub fn push(&mut self, name: impl Into<String>, tensor: ArrayD<F>) {
        let name = name.into();
        assert!(
            !self.names.contains(&name),
            "metagrad::Params::push: duplicate parameter name {name:?}"
        );
        self.names.push(name);
        self.tensors.push(tensor.as_standard_layout().into_owned());
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of scalar elements.
    pub fn num_elements(&self) -> usize {
        self.tensors.iter().map(|t| t.len()).sum()
    }

    /// The names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[ArrayD<F>] {
        &self.tensors
    }

    /// The tensors, mutably (an optimiser's update).
    pub fn tensors_mut(&mut self) -> &mut [ArrayD<F>] {
        &mut self.tensors
    }

    /// Position of a name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The tensor of a name.
    pub fn get(&self, name: &str) -> Option<&ArrayD<F>> {
        self.index_of(name).map(|i| &self.tensors[i])
    }

    /// `(name, tensor)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ArrayD<F>)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.tensors.iter())
    }

    /// Places every tensor on the tape as a differentiable parameter.
    pub fn place(&self, t: &mut Tape<F>) -> Vec<Var> {
        self.tensors.iter().map(|p| t.param(p.clone())).collect()
    }

    /// Places every tensor on the tape as a constant (evaluation without gradients).
    pub fn place_const(&self, t: &mut Tape<F>) -> Vec<Var> {
        self.tensors.iter().map(|p| t.constant(p.clone())).collect()
    }

    /// A 64-bit digest of the whole set: the element type, then every parameter's name,
    /// shape and values, in order. It is FNV-1a taken byte by byte over that stream (names
    /// as UTF-8 after their length, lengths and dimensions as little-endian `u64`, values as
    /// their little-endian IEEE bytes, so `f32` parameters are hashed as 4 bytes each).
    ///
    /// Equal for bitwise-equal parameter sets; a change to any bit of any value, a renamed,
    /// reordered or reshaped parameter, or another float type changes it (up to the 2⁻⁶⁴
    /// chance of a collision). Use it to compare runs, thread counts and ranks at a glance;
    /// where both sets are at hand, compare the sets themselves (`==`).
    ///
    /// Digests printed by versions before 0.2 hashed only the values, widened to `f64`,
    /// and differ from these.
    pub fn digest(&self) -> u64 {
        let mut h = Digest::new();
        h.str(std::any::type_name::<F>());
        h.u64(self.len() as u64);
        for (name, t) in self.iter() {
            h.str(name);
            h.u64(t.ndim() as u64);
            t.shape().iter().for_each(|&d| h.u64(d as u64));
            h.floats(t.iter().copied());
        }
        h.finish()
    }

    /// Whether `other` has the same names and shapes.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) saying the first difference.
    pub fn check_same_layout(&self, other: &Params<F>) -> crate::Result<()> {
        match self.layout_difference(other) {
            Some(m) => Err(crate::Error::Config(m)),
            None => Ok(()),
        }
    }

    /// The first difference in names or shapes between `self` and `other`.
    pub(crate) fn layout_difference(&self, other: &Params<F>) -> Option<String> {
        if self.names != other.names {
            return Some(format!(
                "parameter names differ: expected {:?}, found {:?}",
                self.names, other.names
            ));
        }
        for ((n, a), b) in self.names.iter().zip(&self.tensors).zip(&other.tensors) {
            if a.shape() != b.shape() {
                return Some(format!(
                    "parameter {n} has shape {:?}, expected {:?}",
                    b.shape(),
                    a.shape()
                ));
            }
        }
        None
    }

    /// The same names with every tensor converted to another float type (e.g. to `f64`
    /// for gradient checks).
    pub fn cast<G: Float>(&self) -> Params<G> {
        Params {
            names: self.names.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| t.mapv(|v| G::c(v.f64())))
                .collect(),
        }
    }
}

/// FNV-1a (64-bit), fed byte by byte: the digest behind [`Params::digest`] and the ranks'
/// fingerprint.
pub(crate) struct Digest(u64);

impl Digest {
    pub(crate) fn new() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// A string, after its length (so that no two sequences of strings run together).
    pub(crate) fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }

    /// Each value's own little-endian IEEE bytes: 4 for `f32`, 8 for `f64`.
    pub(crate) fn floats<F: Float>(&mut self, values: impl IntoIterator<Item = F>) {
        for v in values {
            match std::mem::size_of::<F>() {
                // SAFETY: `Float` is implemented for `f32` and `f64` only, and the size
                // says which: a 4-byte float has a `u32`'s size and bits, an 8-byte one a `u64`'s.
                4 => self.bytes(&unsafe { std::mem::transmute_copy::<F, u32>(&v) }.to_le_bytes()),
                8 => self.bytes(&unsafe { std::mem::transmute_copy::<F, u64>(&v) }.to_le_bytes()),
                n => unreachable!("a {n}-byte float"),
            }
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}
