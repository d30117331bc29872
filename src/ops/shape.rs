//! Shape ops: reshape, permute, slicing and selection (through [`Gather`]), concat and
//! stack, and the gather / scatter-add pair.

use super::{flat, from_vec, standard};
use crate::tape::op::{Gather, NONE};
use crate::tape::{Op, Tape, Var};
use crate::Float;
use ndarray::IxDyn;
use std::sync::Arc;

impl Gather {
    /// The index map that selects `indices` along `axis` of a tensor of shape `shape`
    /// (slicing is selecting a range).
    ///
    /// # Panics
    /// If an index is out of range.
    #[track_caller]
    pub fn select(shape: &[usize], axis: usize, indices: &[usize]) -> Gather {
        assert!(
            axis < shape.len(),
            "metagrad::select: axis {axis} out of range for shape {shape:?}"
        );
        let len = shape[axis];
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            panic!("metagrad::select: index {bad} out of range for axis {axis} of shape {shape:?}");
        }
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let mut src = Vec::with_capacity(outer * indices.len() * inner);
        for o in 0..outer {
            for &k in indices {
                let base = (o * len + k) * inner;
                src.extend(base..base + inner);
            }
        }
        let mut out_shape = shape.to_vec();
        out_shape[axis] = indices.len();
        Gather {
            src,
            in_shape: shape.to_vec(),
            out_shape,
        }
    }
}

impl<F: Float> Tape<F> {
    /// The same elements in a new shape (row-major order).
    ///
    /// # Panics
    /// If the element counts differ.
    #[track_caller]
    pub fn reshape(&mut self, a: Var, shape: &[usize]) -> Var {
        let x = self.value(a);
        if x.shape() == shape {
            return a;
        }
        assert!(
            x.len() == shape.iter().product::<usize>(),
            "metagrad::reshape: cannot reshape {:?} ({} elements) to {shape:?}",
            x.shape(),
            x.len()
        );
        let value = from_vec(shape, flat(x).to_vec());
        self.push(value, Op::Reshape(a, shape.to_vec()), &[a])
    }

    /// Reorders axes: output axis `i` is input axis `perm[i]`.
    ///
    /// # Panics
    /// If `perm` is not a permutation of the axes.
    #[track_caller]
    pub fn permute(&mut self, a: Var, perm: &[usize]) -> Var {
        let x = self.value(a);
        let mut seen = vec![false; x.ndim()];
        let ok = perm.len() == x.ndim()
            && perm
                .iter()
                .all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
        assert!(
            ok,
            "metagrad::permute: {perm:?} is not a permutation of the axes of shape {:?}",
            x.shape()
        );
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return a;
        }
        let value = standard(x.view().permuted_axes(IxDyn(perm)).to_owned());
        self.push(value, Op::Permute(a, perm.to_vec()), &[a])
    }

    /// Swaps the last two axes.
    ///
    /// # Panics
    /// If `a` has fewer than two axes.
    #[track_caller]
    pub fn transpose(&mut self, a: Var) -> Var {
        let r = self.shape(a).len();
        assert!(
            r >= 2,
            "metagrad::transpose: needs at least 2 axes, got shape {:?}",
            self.shape(a)
        );
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permute(a, &perm)
    }

    /// Elements `start..end` along `axis`.
    ///
    /// # Panics
    /// If the range is out of bounds.
    #[track_caller]
    pub fn slice_axis(&mut self, a: Var, axis: usize, start: usize, end: usize) -> Var {
        let shape = self.shape(a).to_vec();
        assert!(
            axis < shape.len() && start <= end && end <= shape[axis],
            "metagrad::slice_axis: range {start}..{end} on axis {axis} out of bounds for shape {shape:?}"
        );
        if start == 0 && end == shape[axis] {
            return a;
        }
        let idx: Vec<usize> = (start..end).collect();
        self.gather(a, Arc::new(Gather::select(&shape, axis, &idx)))
    }

    /// The entries `indices` along `axis` (repeats allowed); gathering rows when `axis`
    /// is 0. Its adjoint is [`Tape::scatter_add`].
    ///
    /// # Panics
    /// If an index is out of range.
    #[track_caller]
    pub fn index_select(&mut self, a: Var, axis: usize, indices: &[usize]) -> Var {
        let shape = self.shape(a).to_vec();
        self.gather(a, Arc::new(Gather::select(&shape, axis, indices)))
    }

    /// `out[i] = a[idx.src[i]]` over flat row-major elements (zero where the index is
    /// [`NONE`]): the primitive behind slicing, selection, padding and pooling.
    ///
    /// # Panics
    /// If `a`'s shape is not the map's input shape.
    #[track_caller]
    pub fn gather(&mut self, a: Var, idx: Arc<Gather>) -> Var {
        let x = self.value(a);
        assert!(
            x.shape() == idx.in_shape.as_slice(),
            "metagrad::gather: tensor of shape {:?}, index map for shape {:?}",
            x.shape(),
            idx.in_shape
        );
        let xs = flat(x);
        let v = idx
            .src
            .iter()
            .map(|&s| if s == NONE { F::zero() } else { xs[s] })
            .collect();
        let value = from_vec(&idx.out_shape, v);
        self.push(value, Op::Gather(a, idx), &[a])
    }

    /// The adjoint of [`Tape::gather`]: zeros of the map's input shape, with
    /// `out[idx.src[i]] += a[i]`.
    ///
    /// # Panics
    /// If `a`'s shape is not the map's output shape.
    #[track_caller]
    pub fn scatter_add(&mut self, a: Var, idx: Arc<Gather>) -> Var {
        let x = self.value(a);
        assert!(
            x.shape() == idx.out_shape.as_slice(),
            "metagrad::scatter_add: tensor of shape {:?}, index map from shape {:?}",
            x.shape(),
            idx.out_shape
        );
        let mut out = vec![F::zero(); idx.in_shape.iter().product()];
        for (&s, &v) in idx.src.iter().zip(flat(x)) {
            if s != NONE {
                out[s] += v;
            }
        }
        let value = from_vec(&idx.in_shape, out);
        self.push(value, Op::ScatterAdd(a, idx), &[a])
    }

    /// Concatenates tensors along `axis`; all other dimensions must agree.
    ///
    /// # Panics
    /// If `parts` is empty or the shapes disagree off `axis`.
    #[track_caller]
    pub fn concat(&mut self, parts: &[Var], axis: usize) -> Var {
        assert!(
            !parts.is_empty(),
            "metagrad::concat: no tensors to concatenate"
        );
        let first = self.shape(parts[0]).to_vec();
        assert!(
            axis < first.len(),
            "metagrad::concat: axis {axis} out of range for shape {first:?}"
        );
        let mut total = 0;
        for &p in parts {
            let s = self.shape(p);
            let ok = s.len() == first.len()
                && s.iter()
                    .zip(&first)
                    .enumerate()
                    .all(|(i, (a, b))| i == axis || a == b);
            assert!(
                ok,
                "metagrad::concat: shapes {first:?} and {s:?} differ off axis {axis}"
            );
            total += s[axis];
        }
        if parts.len() == 1 {
            return parts[0];
        }
        let outer: usize = first[..axis].iter().product();
        let inner: usize = first[axis + 1..].iter().product();
        let mut out = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for &p in parts {
                let chunk = self.shape(p)[axis] * inner;
                out.extend_from_slice(&flat(self.value(p))[o * chunk..(o + 1) * chunk]);
            }
        }
        let mut shape = first;
        shape[axis] = total;
        let value = from_vec(&shape, out);
        self.push(value, Op::Concat(parts.to_vec(), axis), parts)
    }

    /// Stacks tensors of one shape along a new axis `axis`.
    ///
    /// # Panics
    /// If `parts` is empty or the shapes differ.
    #[track_caller]
    pub fn stack(&mut self, parts: &[Var], axis: usize) -> Var {
        assert!(!parts.is_empty(), "metagrad::stack: no tensors to stack");
        let shape = self.shape(parts[0]).to_vec();
        assert!(
            axis <= shape.len(),
            "metagrad::stack: axis {axis} out of range for shape {shape:?}"
        );
        let mut expanded = shape.clone();
        expanded.insert(axis, 1);
        let parts: Vec<Var> = parts
            .iter()
            .map(|&p| {
                assert!(
                    self.shape(p) == shape.as_slice(),
                    "metagrad::stack: shapes {shape:?} and {:?} differ",
                    self.shape(p)
                );
                self.reshape(p, &expanded)
            })
            .collect();
        self.concat(&parts, axis)
    }
}
