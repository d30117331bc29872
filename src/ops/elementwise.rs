//! Elementwise ops: arithmetic with numpy-style broadcasting, scalar ops, and
//! nonlinearities.

use super::{flat, from_vec};
use crate::tape::{Op, Tape, Var};
use crate::Float;
use std::sync::Arc;

/// The numpy broadcast of two shapes, or `None` when they are incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

impl<F: Float> Tape<F> {
    #[track_caller]
    fn binary(&mut self, name: &str, a: Var, b: Var, f: impl Fn(F, F) -> F, op: Op) -> Var {
        let (x, y) = (self.value(a), self.value(b));
        let value = if x.shape() == y.shape() {
            from_vec(x.shape(), crate::array::simd::zip_map(flat(x), flat(y), f))
        } else {
            let shape = broadcast_shapes(x.shape(), y.shape()).unwrap_or_else(|| {
                panic!(
                    "metagrad::{name}: shapes {:?} and {:?} do not broadcast",
                    x.shape(),
                    y.shape()
                )
            });
            let v = super::broadcast::binary(flat(x), x.shape(), flat(y), y.shape(), &shape, f);
            from_vec(&shape, v)
        };
        self.push(value, op, &[a, b])
    }

    fn unary(&mut self, a: Var, f: impl Fn(F) -> F, op: Op) -> Var {
        let x = self.value(a);
        let value = from_vec(x.shape(), crate::array::simd::map(flat(x), f));
        self.push(value, op, &[a])
    }

    /// `a + b`, broadcasting as numpy does.
    ///
    /// # Panics
    /// If the shapes do not broadcast; the message names the op and both shapes.
    #[track_caller]
    pub fn add(&mut self, a: Var, b: Var) -> Var {
        self.binary("add", a, b, |p, q| p + q, Op::Add(a, b))
    }

    /// `a - b`, broadcasting.
    #[track_caller]
    pub fn sub(&mut self, a: Var, b: Var) -> Var {
        self.binary("sub", a, b, |p, q| p - q, Op::Sub(a, b))
    }

    /// `a * b` elementwise, broadcasting.
    #[track_caller]
    pub fn mul(&mut self, a: Var, b: Var) -> Var {
        self.binary("mul", a, b, |p, q| p * q, Op::Mul(a, b))
    }

    /// `a / b` elementwise, broadcasting.
    #[track_caller]
    pub fn div(&mut self, a: Var, b: Var) -> Var {
        self.binary("div", a, b, |p, q| p / q, Op::Div(a, b))
    }

    /// `-a`.
    pub fn neg(&mut self, a: Var) -> Var {
        self.unary(a, |p| -p, Op::Neg(a))
    }

    /// `a + c` for a scalar `c`.
    pub fn add_scalar(&mut self, a: Var, c: f64) -> Var {
        let k = F::c(c);
        self.unary(a, |p| p + k, Op::AddScalar(a, c))
    }

    /// `a * c` for a scalar `c`.
    pub fn mul_scalar(&mut self, a: Var, c: f64) -> Var {
        let k = F::c(c);
        self.unary(a, |p| p * k, Op::MulScalar(a, c))
    }

    /// `aⁿ` for an integer `n`.
    pub fn powi(&mut self, a: Var, n: i32) -> Var {
        match n {
            2 => self.unary(a, |p| p * p, Op::Powi(a, n)),
            -1 => self.unary(a, |p| p.recip(), Op::Powi(a, n)),
            _ => self.unary(a, |p| p.powi(n), Op::Powi(a, n)),
        }
    }

    /// `a²`.
    pub fn square(&mut self, a: Var) -> Var {
        self.powi(a, 2)
    }

    /// `exp(a)`.
    pub fn exp(&mut self, a: Var) -> Var {
        self.unary(a, |p| p.exp(), Op::Exp(a))
    }

    /// `ln(a)` (natural logarithm).
    pub fn ln(&mut self, a: Var) -> Var {
        self.unary(a, |p| p.ln(), Op::Ln(a))
    }

    /// `sqrt(a)`.
    pub fn sqrt(&mut self, a: Var) -> Var {
        self.unary(a, |p| p.sqrt(), Op::Sqrt(a))
    }

    /// `tanh(a)`.
    pub fn tanh(&mut self, a: Var) -> Var {
        self.unary(a, |p| p.tanh(), Op::Tanh(a))
    }

    /// The logistic sigmoid `1 / (1 + exp(-a))`.
    pub fn sigmoid(&mut self, a: Var) -> Var {
        self.unary(a, |p| F::one() / (F::one() + (-p).exp()), Op::Sigmoid(a))
    }

    /// `a` where `mask` is true and zero elsewhere; `mask` has one entry per element
    /// (row-major). The mask is a constant: no gradient flows into it.
    ///
    /// # Panics
    /// If the mask's length differs from the number of elements.
    #[track_caller]
    pub fn mask(&mut self, a: Var, mask: Vec<bool>) -> Var {
        self.mask_shared(a, Arc::new(mask))
    }

    #[track_caller]
    pub(crate) fn mask_shared(&mut self, a: Var, mask: Arc<Vec<bool>>) -> Var {
        let x = self.value(a);
        assert!(
            mask.len() == x.len(),
            "metagrad::mask: mask of {} entries for a tensor of shape {:?}",
            mask.len(),
            x.shape()
        );
        let v =
            crate::array::simd::zip_map(flat(x), &mask[..], |p, m| if m { p } else { F::zero() });
        let value = from_vec(x.shape(), v);
        self.push(value, Op::Mask(a, mask), &[a])
    }

    /// `max(a, 0)`, with NaN kept as NaN (IEEE 754-2019 `maximum`, as PyTorch does; Rust's
    /// `f32::max` would turn it into 0 and hide it). Its derivative is the step function
    /// (taken as 0 at 0) and its second derivative is zero wherever it exists: a ReLU
    /// network's Hessian comes only from the other ops (losses, products).
    pub fn relu(&mut self, a: Var) -> Var {
        let m = crate::array::simd::map(flat(self.value(a)), |p| p > F::zero() || p.is_nan());
        self.mask(a, m)
    }

    /// Leaky ReLU: `a` where `a > 0` (or NaN, which stays NaN), `slope · a` elsewhere.
    /// Built from two masks, so that its derivative is the step function between
    /// `slope` and 1 and its second derivative is zero, as for [`Tape::relu`].
    pub fn leaky_relu(&mut self, a: Var, slope: f64) -> Var {
        let pos = crate::array::simd::map(flat(self.value(a)), |p| p > F::zero() || p.is_nan());
        let neg = pos.iter().map(|&p| !p).collect();
        let kept = self.mask(a, pos);
        let low = self.mask(a, neg);
        let low = self.mul_scalar(low, slope);
        self.add(kept, low)
    }

    /// Dropout with a fixed mask: `a · scale` where `keep` is true, zero elsewhere
    /// (`scale = 1 / (1 − p)` for dropout at rate `p`; DropBlock rescales by the
    /// fraction kept). The mask is a constant of the recorded graph, so every derivative
    /// of any order, and the second-order backward of a meta-gradient, uses exactly the
    /// mask of the forward pass.
    ///
    /// # Panics
    /// If `keep` does not have one entry per element.
    #[track_caller]
    pub fn dropout(&mut self, a: Var, keep: Vec<bool>, scale: f64) -> Var {
        let kept = self.mask(a, keep);
        self.mul_scalar(kept, scale)
    }

    /// Elementwise select: `a` where `cond` is true, `b` elsewhere (same shapes; `cond` is
    /// a constant, row-major).
    ///
    /// # Panics
    /// If `a` and `b` differ in shape or `cond` in length.
    #[track_caller]
    pub fn where_(&mut self, cond: &[bool], a: Var, b: Var) -> Var {
        assert!(
            self.shape(a) == self.shape(b),
            "metagrad::where_: shapes {:?} and {:?} differ",
            self.shape(a),
            self.shape(b)
        );
        let ma = self.mask(a, cond.to_vec());
        let mb = self.mask(b, cond.iter().map(|c| !c).collect());
        self.add(ma, mb)
    }

    /// Elementwise maximum of two tensors of the same shape (ties take `a`; NaN in either
    /// gives NaN, as IEEE 754-2019 `maximum`). The gradient goes to the selected element.
    #[track_caller]
    pub fn maximum(&mut self, a: Var, b: Var) -> Var {
        assert!(
            self.shape(a) == self.shape(b),
            "metagrad::maximum: shapes {:?} and {:?} differ",
            self.shape(a),
            self.shape(b)
        );
        let cond: Vec<bool> = flat(self.value(a))
            .iter()
            .zip(flat(self.value(b)))
            .map(|(&p, &q)| !F::beats(q, p))
            .collect();
        self.where_(&cond, a, b)
    }
}
