//! Losses: log-softmax and softmax (numerically stable), mean-squared error, and softmax
//! cross-entropy with dense labels and with sparse integer labels.
//!
//! Both cross-entropies are built from [`Tape::log_softmax`], whose backward rule is
//! written in tape ops (with [`Tape::softmax`] and [`Tape::sum_others`], so that it stays
//! accurate where one class dominates), and a linear read-out (a product with the labels, or a gather at
//! the label indices, whose adjoint is a scatter-add). So both have true second
//! derivatives: the Hessian of either with respect to the logits is `diag(p) − p pᵀ` per
//! row (over the batch size), never a silent zero.

use super::{flat, from_vec};
use crate::tape::op::Gather;
use crate::tape::{Op, Tape, Var};
use crate::Float;
use std::sync::Arc;

impl<F: Float> Tape<F> {
    /// `log(softmax(a))` along the last axis, accurate to a few ulps for logits of any
    /// finite size.
    ///
    /// Each row is computed as `(a − m) − ln(1 + s)` with `m` the row's maximum (at its
    /// first position `j`) and `s = Σ_{k≠j} exp(a_k − m)` summed without the `1` of the
    /// maximum itself, so neither a large `m` (`[1e30, 1e30, −1e30]` gives
    /// `[−ln 2, −ln 2, −2e30]`) nor a dominant logit (`[100, 0]` gives `−3.7e−44` first,
    /// not 0) loses the small terms. Where `a_k − m` overflows (logits of both signs near
    /// the type's limit), it saturates at `−F::MAX`: the true value lies beyond it, its
    /// softmax is exactly 0, and a zero label times it stays 0 rather than `0 · −∞ = NaN`.
    /// A NaN anywhere in a row makes the whole row NaN; `+∞` gives NaN as well (∞ − ∞).
    ///
    /// # Panics
    /// If `a` is 0-dimensional or its last axis is empty.
    #[track_caller]
    pub fn log_softmax(&mut self, a: Var) -> Var {
        let value = self.softmax_rows("log_softmax", a, |row, s| {
            // `ln(1 + s) ≤ ln k` is far below half an ulp of `F::MAX`: saturated entries
            // stay put.
            let lse = s.ln_1p();
            row.iter_mut().for_each(|v| *v -= lse);
        });
        self.push(value, Op::LogSoftmax(a), &[a])
    }

    /// `softmax(a)` along the last axis, computed as `exp(a − m) / (1 + s)` with the
    /// terms of [`Tape::log_softmax`]: rows sum to 1 within rounding and tiny
    /// probabilities keep their full precision, for logits of any finite size.
    ///
    /// # Panics
    /// As [`Tape::log_softmax`].
    #[track_caller]
    pub fn softmax(&mut self, a: Var) -> Var {
        let value = self.softmax_rows("softmax", a, |row, s| {
            let z = F::one() + s;
            row.iter_mut().for_each(|v| *v = v.exp() / z);
        });
        self.push(value, Op::Softmax(a), &[a])
    }

    /// The rows of `a` (along the last axis) shifted by their maximum `m` (saturating at
    /// `−F::MAX`), each passed to `finish` with `s = Σ_{k≠j} exp(a_k − m)` for the first
    /// maximal position `j`.
    #[track_caller]
    fn softmax_rows(&self, name: &str, a: Var, finish: impl Fn(&mut [F], F)) -> ndarray::ArrayD<F> {
        let x = self.value(a);
        let k = *x.shape().last().unwrap_or(&0);
        assert!(
            k > 0,
            "metagrad::{name}: needs a non-empty last axis, got shape {:?}",
            x.shape()
        );
        let lowest = -F::max_value();
        let mut out = flat(x).to_vec();
        for row in out.chunks_exact_mut(k) {
            let mut j = 0;
            for (i, &v) in row.iter().enumerate() {
                if F::beats(v, row[j]) {
                    j = i;
                }
            }
            let m = row[j];
            let mut s = F::zero();
            for (i, v) in row.iter_mut().enumerate() {
                let d = *v - m;
                // A finite logit whose distance to the maximum overflows saturates.
                *v = if d == F::neg_infinity() && v.is_finite() && m.is_finite() {
                    lowest
                } else {
                    d
                };
                if i != j {
                    s += v.exp();
                }
            }
            finish(row, s);
        }
        from_vec(x.shape(), out)
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
        let (n, k) = (sl[0], sl[1]);
        assert!(
            k > 0,
            "metagrad::cross_entropy: logits {sl:?} and labels {sy:?} have no classes"
        );
        let lp = self.log_softmax(logits);
        let prod = self.mul(labels, lp);
        mean_of_rows(self, prod, n)
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
        assert!(
            k > 0,
            "metagrad::sparse_cross_entropy: logits {s:?} have no classes"
        );
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
        mean_of_rows(self, picked, n)
    }
}

/// `−Σ terms / n`, scaled before summing so that a finite mean never overflows on the way
/// (f32 `[[1.7e38, −1.7e38]] × 2` has a finite loss); NaN for no rows (the mean of
/// nothing).
fn mean_of_rows<F: Float>(t: &mut Tape<F>, terms: Var, n: usize) -> Var {
    if n == 0 {
        let s = t.sum(terms); // zero: a sum over nothing
        return t.mul_scalar(s, f64::NAN);
    }
    let scaled = t.mul_scalar(terms, -1.0 / n as f64);
    t.sum(scaled)
}
