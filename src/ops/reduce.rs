//! Reductions: sums and means over all elements or over axes, the broadcast pair
//! `sum_to` / `broadcast_to`, the sum of the others along the last axis, and max over an
//! axis.

use super::{flat, from_vec};
use crate::tape::op::Gather;
use crate::tape::{Op, Tape, Var};
use crate::Float;
use ndarray::IxDyn;
use std::sync::Arc;

impl<F: Float> Tape<F> {
    /// Sums `a` down to `shape` over the dimensions that broadcasting would expand: the
    /// adjoint of [`Tape::broadcast_to`]. `shape` must broadcast to `a`'s shape.
    ///
    /// # Panics
    /// If `shape` does not broadcast to the shape of `a`.
    #[track_caller]
    pub fn sum_to(&mut self, a: Var, shape: &[usize]) -> Var {
        let x = self.value(a);
        if x.shape() == shape {
            return a;
        }
        let r = x.ndim();
        let ok = shape.len() <= r
            && shape
                .iter()
                .zip(&x.shape()[r - shape.len()..])
                .all(|(&t, &s)| t == s || t == 1);
        assert!(
            ok,
            "metagrad::sum_to: shape {shape:?} does not broadcast to {:?}",
            x.shape()
        );
        let value = if shape.iter().product::<usize>() == 1 {
            from_vec(shape, vec![super::broadcast::sum_slice(flat(x))])
        } else {
            from_vec(shape, super::broadcast::sum_to(flat(x), x.shape(), shape))
        };
        self.push(value, Op::SumTo(a, shape.to_vec()), &[a])
    }

    /// Broadcasts `a` to `shape` (numpy rules): the adjoint of [`Tape::sum_to`].
    ///
    /// # Panics
    /// If `a`'s shape does not broadcast to `shape`.
    #[track_caller]
    pub fn broadcast_to(&mut self, a: Var, shape: &[usize]) -> Var {
        let x = self.value(a);
        if x.shape() == shape {
            return a;
        }
        if x.broadcast(IxDyn(shape)).is_none() {
            panic!(
                "metagrad::broadcast_to: shape {:?} does not broadcast to {shape:?}",
                x.shape()
            );
        }
        let value = from_vec(
            shape,
            super::broadcast::broadcast(flat(x), x.shape(), shape),
        );
        self.push(value, Op::BroadcastTo(a, shape.to_vec()), &[a])
    }

    /// Sum of all elements, as a 0-dimensional tensor.
    pub fn sum(&mut self, a: Var) -> Var {
        self.sum_to(a, &[])
    }

    /// Mean of all elements, as a 0-dimensional tensor.
    pub fn mean(&mut self, a: Var) -> Var {
        let n = self.value(a).len();
        let s = self.sum(a);
        self.mul_scalar(s, 1.0 / n as f64)
    }

    /// Sum over the given axes; with `keepdim` they stay as size-1 axes.
    ///
    /// # Panics
    /// If an axis is out of range.
    #[track_caller]
    pub fn sum_axes(&mut self, a: Var, axes: &[usize], keepdim: bool) -> Var {
        let shape = self.shape(a).to_vec();
        let mut kept = shape.clone();
        for &ax in axes {
            assert!(
                ax < shape.len(),
                "metagrad::sum_axes: axis {ax} out of range for shape {shape:?}"
            );
            kept[ax] = 1;
        }
        let s = self.sum_to(a, &kept);
        if keepdim {
            s
        } else {
            let out: Vec<usize> = shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !axes.contains(i))
                .map(|(_, &d)| d)
                .collect();
            self.reshape(s, &out)
        }
    }

    /// Mean over the given axes; with `keepdim` they stay as size-1 axes.
    #[track_caller]
    pub fn mean_axes(&mut self, a: Var, axes: &[usize], keepdim: bool) -> Var {
        let shape = self.shape(a);
        let n: usize = axes
            .iter()
            .map(|&ax| shape.get(ax).copied().unwrap_or(1))
            .product();
        let s = self.sum_axes(a, axes, keepdim);
        self.mul_scalar(s, 1.0 / n as f64)
    }

    /// For each element, the sum of the other elements along the last axis:
    /// `out[.., i] = Σ_{k≠i} a[.., k]`, summed directly (prefix plus suffix sums), so it
    /// is accurate where `Σₖ a[.., k] − a[.., i]` would cancel. Linear and self-adjoint.
    /// (Log-softmax's backward rule uses it; a 0-dimensional `a` is one row of one.)
    pub fn sum_others(&mut self, a: Var) -> Var {
        let x = self.value(a);
        let k = x.shape().last().copied().unwrap_or(1);
        let mut out = vec![F::zero(); x.len()];
        if k > 0 {
            for (row, o) in flat(x).chunks_exact(k).zip(out.chunks_exact_mut(k)) {
                let mut acc = F::zero();
                for (v, o) in row.iter().zip(o.iter_mut()) {
                    *o = acc;
                    acc += *v;
                }
                let mut acc = F::zero();
                for (v, o) in row.iter().zip(o.iter_mut()).rev() {
                    *o += acc;
                    acc += *v;
                }
            }
        }
        let value = from_vec(x.shape(), out);
        self.push(value, Op::SumOthers(a), &[a])
    }

    /// Maximum over one axis (the gradient goes to the first maximal element; a NaN on the
    /// axis makes the maximum NaN, as IEEE 754-2019 `maximum`).
    ///
    /// # Panics
    /// If the axis is out of range or has length zero.
    #[track_caller]
    pub fn max_axis(&mut self, a: Var, axis: usize, keepdim: bool) -> Var {
        let shape = self.shape(a).to_vec();
        assert!(
            axis < shape.len() && shape[axis] > 0,
            "metagrad::max_axis: axis {axis} out of range or empty for shape {shape:?}"
        );
        let x = flat(self.value(a));
        let (outer, len) = (shape[..axis].iter().product::<usize>(), shape[axis]);
        let inner: usize = shape[axis + 1..].iter().product();
        let mut src = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let base = o * len * inner + i;
                let mut best = base;
                for k in 1..len {
                    let j = base + k * inner;
                    if F::beats(x[j], x[best]) {
                        best = j;
                    }
                }
                src.push(best);
            }
        }
        let mut out_shape = shape.clone();
        out_shape[axis] = 1;
        let idx = Gather {
            src,
            in_shape: shape.clone(),
            out_shape: out_shape.clone(),
        };
        let m = self.gather(a, Arc::new(idx));
        if keepdim {
            m
        } else {
            out_shape.remove(axis);
            self.reshape(m, &out_shape)
        }
    }
}
