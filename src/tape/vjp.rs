//! Backward rules, one per [`Op`], side by side.
//!
//! Each rule maps the upstream gradient `g` of an op's output `y` to the gradients of the
//! op's inputs, using only the tape's own ops. Differentiating a rule's result again
//! therefore uses the rules of those ops: second and higher order gradients need nothing
//! more. The `match` is exhaustive: a new [`Op`] variant without a rule does not compile.
//!
//! A rule may also have a fused form, which computes its gradients directly and returns
//! them as constants; the backward pass says which [`Form`] it wants. The two batch-norm
//! ops have one (their forms stand side by side at the end of the `match`); every other
//! rule has one form that serves both.

use super::{Op, Tape, Var};
use crate::Float;

/// Which form of a backward rule the backward pass wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Form {
    /// `create_graph = true`: the rule written in tape ops and recorded, so that its
    /// result can be differentiated again.
    Recorded,
    /// `create_graph = false`: nothing is recorded, so a rule may compute its result
    /// directly (fused loops) and return constants.
    Fused,
}

/// Appends `(input, gradient)` pairs for the inputs of `op` that `need` selects, with the
/// rule in the given form. The tape records exactly when `form` is [`Form::Recorded`].
pub(super) fn vjp<F: Float>(
    t: &mut Tape<F>,
    op: &Op,
    form: Form,
    y: Var,
    g: Var,
    need: &dyn Fn(Var) -> bool,
    out: &mut Vec<(Var, Var)>,
) {
    debug_assert_eq!(t.is_recording(), form == Form::Recorded);
    // `put!(input, |t| gradient)`: computes the gradient only for inputs that need one.
    macro_rules! put {
        ($v:expr, &mut |$t:ident| $body:expr) => {{
            let v: Var = $v;
            if need(v) {
                let $t: &mut Tape<F> = &mut *t;
                let gv = $body;
                out.push((v, gv));
            }
        }};
        ($v:expr, &mut |_| $body:expr) => {{
            let v: Var = $v;
            if need(v) {
                out.push((v, $body));
            }
        }};
    }
    match op {
        Op::Leaf => {}
        Op::Add(a, b) => {
            put!(*a, &mut |t| sum_like(t, g, *a));
            put!(*b, &mut |t| sum_like(t, g, *b));
        }
        Op::Sub(a, b) => {
            put!(*a, &mut |t| sum_like(t, g, *a));
            put!(*b, &mut |t| {
                let n = t.neg(g);
                sum_like(t, n, *b)
            });
        }
        Op::Mul(a, b) => {
            put!(*a, &mut |t| {
                let p = t.mul(g, *b);
                sum_like(t, p, *a)
            });
            put!(*b, &mut |t| {
                let p = t.mul(g, *a);
                sum_like(t, p, *b)
            });
        }
        Op::Div(a, b) => {
            // y = a / b: dy/da = 1 / b, dy/db = -y / b.
            put!(*a, &mut |t| {
                let q = t.div(g, *b);
                sum_like(t, q, *a)
            });
            put!(*b, &mut |t| {
                let gy = t.mul(g, y);
                let q = t.div(gy, *b);
                let n = t.neg(q);
                sum_like(t, n, *b)
            });
        }
        Op::Neg(a) => put!(*a, &mut |t| t.neg(g)),
        Op::AddScalar(a, _) => put!(*a, &mut |_| g),
        Op::MulScalar(a, c) => put!(*a, &mut |t| t.mul_scalar(g, *c)),
        Op::Powi(a, n) => put!(*a, &mut |t| match *n {
            0 => {
                let s = t.shape(*a).to_vec();
                t.zeros(&s) // d(a⁰)/da is exactly zero, not a missing rule
            }
            1 => g,
            2 => {
                let d = t.mul_scalar(*a, 2.0);
                t.mul(g, d)
            }
            n => {
                let p = t.powi(*a, n - 1);
                let p = t.mul_scalar(p, n as f64);
                t.mul(g, p)
            }
        }),
        Op::Exp(a) => put!(*a, &mut |t| t.mul(g, y)),
        Op::Ln(a) => put!(*a, &mut |t| t.div(g, *a)),
        Op::Sqrt(a) => put!(*a, &mut |t| {
            let q = t.div(g, y);
            t.mul_scalar(q, 0.5)
        }),
        Op::Tanh(a) => put!(*a, &mut |t| {
            // dy/da = 1 - y²
            let y2 = t.square(y);
            let d = t.neg(y2);
            let d = t.add_scalar(d, 1.0);
            t.mul(g, d)
        }),
        Op::Sigmoid(a) => put!(*a, &mut |t| {
            // dy/da = y (1 - y)
            let ny = t.neg(y);
            let one_minus = t.add_scalar(ny, 1.0);
            let d = t.mul(y, one_minus);
            t.mul(g, d)
        }),
        Op::Mask(a, m) => put!(*a, &mut |t| t.mask_shared(g, m.clone())),
        Op::SumOthers(a) => put!(*a, &mut |t| t.sum_others(g)),
        Op::SumTo(a, _) => put!(*a, &mut |t| broadcast_like(t, g, *a)),
        Op::BroadcastTo(a, _) => put!(*a, &mut |t| sum_like(t, g, *a)),
        Op::Reshape(a, _) => put!(*a, &mut |t| reshape_like(t, g, *a)),
        Op::Permute(a, perm) => put!(*a, &mut |t| {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            t.permute(g, &inv)
        }),
        Op::Concat(vs, axis) => {
            let mut offset = 0;
            for v in vs {
                let len = t.shape(*v)[*axis];
                put!(*v, &mut |t| t.slice_axis(g, *axis, offset, offset + len));
                offset += len;
            }
        }
        Op::Gather(a, idx) => put!(*a, &mut |t| t.scatter_add(g, idx.clone())),
        Op::ScatterAdd(a, idx) => put!(*a, &mut |t| t.gather(g, idx.clone())),
        Op::MatMul { a, b, ta, tb } => {
            // y = op(a) op(b), op = transpose where the flag is set.
            let (a, b, ta, tb) = (*a, *b, *ta, *tb);
            put!(a, &mut |t| {
                if ta {
                    t.matmul_t(b, g, tb, true)
                } else {
                    t.matmul_t(g, b, false, !tb)
                }
            });
            put!(b, &mut |t| {
                if tb {
                    t.matmul_t(g, a, true, ta)
                } else {
                    t.matmul_t(a, g, !ta, false)
                }
            });
        }
        // The three convolution ops are one trilinear form <g, conv(x, w)> read three
        // ways, so each one's adjoints are the other two.
        Op::Conv2d(x, w, geom) => {
            put!(*x, &mut |t| t.conv2d_input_grad(g, *w, *geom));
            put!(*w, &mut |t| t.conv2d_weight_grad(*x, g, *geom));
        }
        // With a bias: its gradient is `g` summed over N, H, W. Fused, that sum is taken
        // while the weight adjoint has each block of `g` in cache.
        Op::Conv2dBias(x, w, b, geom) => {
            put!(*x, &mut |t| t.conv2d_input_grad(g, *w, *geom));
            if form == Form::Fused && need(*w) && need(*b) && !geom.is_empty() {
                let [dw, db] = t.conv2d_weight_bias_grad_fused(*x, g, *geom);
                out.extend([(*w, dw), (*b, db)]);
            } else {
                put!(*w, &mut |t| t.conv2d_weight_grad(*x, g, *geom));
                put!(*b, &mut |t| t.sum_axes(g, &[0, 2, 3], false));
            }
        }
        Op::Conv2dInputGrad(gy, w, geom) => {
            put!(*gy, &mut |t| t.conv2d_geom(g, *w, *geom));
            put!(*w, &mut |t| t.conv2d_weight_grad(g, *gy, *geom));
        }
        Op::Conv2dWeightGrad(x, gy, geom) => {
            put!(*x, &mut |t| t.conv2d_input_grad(*gy, g, *geom));
            put!(*gy, &mut |t| t.conv2d_geom(*x, g, *geom));
        }
        // Softmax's Jacobian is diag(p) − ppᵀ per row. Both rules write `1 − pᵢ` as
        // `Σ_{k≠i} pₖ` and `Σg − gᵢ` as `Σ_{k≠i} gₖ` (sum_others), never as a
        // difference: where one class dominates (p ≈ 1), `g − p Σg` would cancel the tiny
        // true gradient to zero, and every Hessian-vector product with it.
        Op::LogSoftmax(a) => put!(*a, &mut |t| {
            // g − p Σg = g ⊙ (1 − p) − p ⊙ Σ_{k≠i} g.
            let p = t.softmax(*a);
            let q = t.sum_others(p);
            let own = t.mul(g, q);
            let others = t.sum_others(g);
            let rest = t.mul(p, others);
            t.sub(own, rest)
        }),
        Op::Softmax(a) => put!(*a, &mut |t| {
            // p ⊙ (g − Σ pg) = p ⊙ (g ⊙ (1 − p) − Σ_{k≠i} pg), p = y. The formula is
            // unchanged, term for term, by adding a constant to each row of g, so g is
            // first shifted by its value at the row's most likely class: where g is
            // nearly constant over the likely classes, the two terms would otherwise be
            // large and cancel.
            let g = shift_by_most_likely(t, g, y);
            let q = t.sum_others(y);
            let own = t.mul(g, q);
            let pg = t.mul(y, g);
            let rest = t.sum_others(pg);
            let d = t.sub(own, rest);
            t.mul(y, d)
        }),
        // Batch norm's two forms: one `batch_norm_grad` primitive and sums in tape ops, or
        // two fused loops over the batch.
        Op::BatchNorm(bn) => {
            let ins = [bn.x, bn.gamma, bn.beta];
            let grads = match form {
                Form::Recorded => t.batch_norm_vjp_recorded(bn, g, ins.map(need)),
                Form::Fused => t.batch_norm_vjp_fused(bn, g, ins.map(need)),
            };
            put_all(out, ins, grads);
        }
        // And its gradient's two forms: the formula in tape ops (third order), or fused.
        Op::BatchNormGrad(bg) => {
            let ins = [bg.x, bg.gamma, bg.g];
            let grads = match form {
                Form::Recorded => t.batch_norm_grad_vjp_recorded(bg, g, ins.map(need)),
                Form::Fused => t.batch_norm_grad_vjp_fused(bg, g, ins.map(need)),
            };
            put_all(out, ins, grads);
        }
    }
}

/// Appends the gradients a multi-input rule computed (`None` where not needed).
fn put_all<const N: usize>(out: &mut Vec<(Var, Var)>, ins: [Var; N], grads: [Option<Var>; N]) {
    out.extend(
        ins.into_iter()
            .zip(grads)
            .filter_map(|(v, gv)| Some((v, gv?))),
    );
}

/// `g` minus, in each row (last axis), its value where `p` is largest (a constant index
/// map, so the shift is linear in `g` and differentiable again).
fn shift_by_most_likely<F: Float>(t: &mut Tape<F>, g: Var, p: Var) -> Var {
    let shape = t.shape(p).to_vec();
    let k = shape.last().copied().unwrap_or(1).max(1);
    let src: Vec<usize> = crate::array::flat(t.value(p))
        .chunks_exact(k)
        .enumerate()
        .map(|(r, row)| {
            let best = (0..k).fold(0, |b, j| if F::beats(row[j], row[b]) { j } else { b });
            r * k + best
        })
        .collect();
    let mut out_shape = shape.clone();
    if let Some(last) = out_shape.last_mut() {
        *last = 1;
    }
    let map = super::op::Gather {
        src,
        in_shape: shape,
        out_shape,
    };
    let at_best = t.gather(g, std::sync::Arc::new(map));
    t.sub(g, at_best)
}

/// `g` summed down to the shape of `like` (undoing broadcasting).
fn sum_like<F: Float>(t: &mut Tape<F>, g: Var, like: Var) -> Var {
    let shape = t.shape(like).to_vec();
    t.sum_to(g, &shape)
}

/// `g` broadcast up to the shape of `like`.
fn broadcast_like<F: Float>(t: &mut Tape<F>, g: Var, like: Var) -> Var {
    let shape = t.shape(like).to_vec();
    t.broadcast_to(g, &shape)
}

/// `g` reshaped to the shape of `like`.
fn reshape_like<F: Float>(t: &mut Tape<F>, g: Var, like: Var) -> Var {
    let shape = t.shape(like).to_vec();
    t.reshape(g, &shape)
}
