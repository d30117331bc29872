//! Losses: log-softmax and softmax (numerically stable), mean-squared error, and softmax
//! cross-entropy with dense labels and with sparse integer labels.
//!
//! Both cross-entropies are built from [`Tape::log_softmax`], whose backward rule is
//! written in tape ops, and a linear read-out (a product with the labels, or a gather at
//! the label indices, whose adjoint is a scatter-add). So both have true second
//! derivatives: the Hessian of either with respect to the logits is `diag(p) − p pᵀ` per
//! row (over the batch size), never a silent zero.

use super::{flat, from_vec};
use crate::tape::op::Gather;
use crate::tape::{Op, Tape, Var};
use crate::Float;
use std::sync::Arc;

impl<F: Float> Tape<F> {
    /// `log(softmax(a))` along the last axis, computed as `a − max − ln Σ exp(a − max)`:
    /// finite for logits of any size.
    ///
    /// # Panics
    /// If `a` is 0-dimensional or its last axis is empty.
    #[track_caller]
    pub fn log_softmax(&mut self, a: Var) -> Var {
        let x = self.value(a);
        let k = *x.shape().last().unwrap_or(&0);
        assert!(
            k > 0,
            "metagrad::log_softmax: needs a non-empty last axis, got shape {:?}",
            x.shape()
        );
        let mut out = flat(x).to_vec();
        for row in out.chunks_exact_mut(k) {
            let m = row.iter().copied().fold(F::neg_infinity(), F::max);
            let lse = row.iter().map(|&v| (v - m).exp()).sum::<F>().ln() + m;
            row.iter_mut().for_each(|v| *v -= lse);
        }
        let value = from_vec(x.shape(), out);
        self.push(value, Op::LogSoftmax(a), &[a])
    }

    /// `softmax(a)` along the last axis (`exp` of [`Tape::log_softmax`]).
    #[track_caller]
    pub fn softmax(&mut self, a: Var) -> Var {
        let l = self.log_softmax(a);
        self.exp(l)
    }

    /// Mean-squared error `mean((pred − target)²)`.
    ///
    /// # Panics
    /// If the shapes differ.
    #[track_caller]
    pub fn mse(&mut self, pred: Var, target: Var) -> Var {
        assert!(
            self.shape(pred) == self.shape(target),
            "metagrad::mse: prediction {:?} and target {:?} differ in shape",
            self.shape(pred),
            self.shape(target)
        );
        let d = self.sub(pred, target);
        let d2 = self.square(d);
        self.mean(d2)
    }

    /// Softmax cross-entropy with dense labels, averaged over rows:
    /// `−(1/N) Σᵢ Σₖ labels[i,k] · log_softmax(logits)[i,k]` for `logits, labels: [N, K]`.
    /// Labels may be one-hot or any probability rows; they may be tape values themselves.
    ///
    /// # Panics
    /// If the shapes differ or are not 2-D.
    #[track_caller]
    pub fn cross_entropy(&mut self, logits: Var, labels: Var) -> Var {
        let (sl, sy) = (self.shape(logits), self.shape(labels));
        assert!(
            sl.len() == 2 && sl == sy,
            "metagrad::cross_entropy: logits {sl:?} and labels {sy:?} must both be [N, K]"
        );
        let n = sl[0];
        let lp = self.log_softmax(logits);
        let prod = self.mul(labels, lp);
        let s = self.sum(prod);
        self.mul_scalar(s, -1.0 / n as f64)
    }

    /// Softmax cross-entropy with sparse integer labels, averaged over rows:
    /// `−(1/N) Σᵢ log_softmax(logits)[i, labels[i]]` for `logits: [N, K]`.
    ///
    /// Equal in value, gradient and Hessian to [`Tape::cross_entropy`] with one-hot labels.
    ///
    /// # Panics
    /// If `logits` is not 2-D, `labels` has not `N` entries, or a label is not below `K`.
    #[track_caller]
    pub fn sparse_cross_entropy(&mut self, logits: Var, labels: &[usize]) -> Var {
        let s = self.shape(logits);
        assert!(
            s.len() == 2 && s[0] == labels.len(),
            "metagrad::sparse_cross_entropy: logits {s:?} must be [N, K] with N = {} labels",
            labels.len()
        );
        let (n, k) = (s[0], s[1]);
        if let Some((i, &bad)) = labels.iter().enumerate().find(|(_, &y)| y >= k) {
            panic!(
                "metagrad::sparse_cross_entropy: label {bad} at row {i} is out of range for \
                 {k} classes (logits {s:?})"
            );
        }
        let map = Gather {
            src: labels.iter().enumerate().map(|(i, &y)| i * k + y).collect(),
            in_shape: vec![n, k],
            out_shape: vec![n],
        };
        let lp = self.log_softmax(logits);
        let picked = self.gather(lp, Arc::new(map));
        let s = self.sum(picked);
        self.mul_scalar(s, -1.0 / n as f64)
    }
}
