//! Layers as plain functions of explicit parameters, so one network function runs with
//! meta-parameters and with adapted parameters alike.

use crate::{Float, Tape, Var};

/// `x @ wᵀ + b` for `x: [N, in]`, `w: [out, in]`, `b: [out]` (PyTorch's layout).
///
/// # Panics
/// If the shapes do not fit.
#[track_caller]
pub fn linear<F: Float>(t: &mut Tape<F>, x: Var, w: Var, b: Var) -> Var {
    let y = t.matmul_t(x, w, false, true);
    t.add(y, b)
}

/// Convolution plus a per-output-channel bias: `x: [N, C, H, W]`, `w: [O, C, k, k]`,
/// `b: [O]`.
///
/// # Panics
/// If the shapes do not fit.
#[track_caller]
pub fn conv2d<F: Float>(t: &mut Tape<F>, x: Var, w: Var, b: Var, stride: usize, pad: usize) -> Var {
    t.conv2d_bias(x, w, b, stride, pad)
}

/// `[N, ...]` → `[N, rest]`.
pub fn flatten<F: Float>(t: &mut Tape<F>, x: Var) -> Var {
    let s = t.shape(x);
    let n = s[0];
    let rest = s[1..].iter().product();
    t.reshape(x, &[n, rest])
}
