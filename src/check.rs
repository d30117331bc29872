//! Gradient checks against central finite differences, as PyTorch's `gradcheck` and
//! `gradgradcheck` do, and a Hessian-vector product helper.
//!
//! The checks run in `f64`. A function under test takes a tape and its inputs (placed as
//! parameters) and returns a tensor; non-scalar outputs are reduced with a fixed random
//! weighting, so every output element is checked.
//!
//! [`gradcheck`] checks the gradient in both of its forms: computed without a graph
//! (`create_graph = false`, where ops may run fused kernels) and recorded
//! (`create_graph = true`, the tape-op form that higher derivatives differentiate).
//! [`gradgradcheck`] then checks the derivative of the recorded form.
//!
//! ```
//! use metagrad::check::{gradcheck, gradgradcheck};
//! use ndarray::arr2;
//! let x = arr2(&[[0.3, -1.2], [2.0, 0.5]]).into_dyn();
//! let r = gradcheck(|t, v| { let y = t.tanh(v[0]); t.mul(y, v[0]) }, &[x.clone()]);
//! assert!(r.passed(), "{r}");
//! let r = gradgradcheck(|t, v| { let y = t.tanh(v[0]); t.mul(y, v[0]) }, &[x]);
//! assert!(r.passed(), "{r}");
//! ```

use crate::{Float, Tape, Var};
use ndarray::{ArrayD, Zip};
use rand::{Rng, SeedableRng};
use std::fmt;

/// Step and tolerances of a check: an element passes when
/// `|analytic − numeric| ≤ atol + rtol · |numeric|`.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Central-difference step.
    pub eps: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
    /// Seed of the random output weighting and directions.
    pub seed: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            eps: 1e-6,
            atol: 1e-5,
            rtol: 1e-4,
            seed: 0,
        }
    }
}

/// The outcome of a check: the worst element and how far off it was.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Which input holds the worst element.
    pub worst_input: usize,
    /// Its flat (row-major) index in that input.
    pub worst_index: usize,
    /// The analytic derivative there.
    pub analytic: f64,
    /// The central-difference estimate there.
    pub numeric: f64,
    /// `|analytic − numeric| / max(|analytic|, |numeric|)` there.
    pub rel_err: f64,
    /// Whether the worst element's analytic derivative came from the recorded form of the
    /// backward pass (`create_graph = true`) rather than the unrecorded one.
    pub worst_recorded: bool,
    /// The largest `|analytic − numeric|` over all elements.
    pub max_abs_err: f64,
    /// How many (element, form) pairs were checked: each element's derivative is
    /// checked in both forms of the backward pass.
    pub checked: usize,
    /// Whether every element was within tolerance.
    pub ok: bool,
}

impl CheckReport {
    /// Whether every element was within tolerance.
    pub fn passed(&self) -> bool {
        self.ok
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} over {} checks (elements × both backward forms); worst: input {} element {} \
             ({} form): analytic {:.10e}, numeric {:.10e}, relative error {:.3e} (max abs \
             error {:.3e})",
            if self.ok { "passed" } else { "FAILED" },
            self.checked,
            self.worst_input,
            self.worst_index,
            if self.worst_recorded {
                "recorded"
            } else {
                "unrecorded"
            },
            self.analytic,
            self.numeric,
            self.rel_err,
            self.max_abs_err
        )
    }
}

/// A fixed pseudo-random tensor in [-1, 1] of the given shape.
fn random_like(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(shape, || rng.gen_range(-1.0..1.0))
}

/// Reduces `out` to a scalar with a fixed random weighting.
fn project(t: &mut Tape<f64>, out: Var, seed: u64) -> Var {
    if t.value(out).len() == 1 {
        return t.sum(out);
    }
    let w = t.constant(random_like(t.shape(out), seed ^ 0x9e37_79b9));
    let p = t.mul(out, w);
    t.sum(p)
}

/// Checks the first derivatives of `f` at `inputs` against central differences, with
/// default options.
pub fn gradcheck<Fun>(f: Fun, inputs: &[ArrayD<f64>]) -> CheckReport
where
    Fun: Fn(&mut Tape<f64>, &[Var]) -> Var,
{
    gradcheck_with(f, inputs, CheckOptions::default())
}

/// [`gradcheck`] with explicit step, tolerances and seed.
pub fn gradcheck_with<Fun>(f: Fun, inputs: &[ArrayD<f64>], opts: CheckOptions) -> CheckReport
where
    Fun: Fn(&mut Tape<f64>, &[Var]) -> Var,
{
    let eval = |xs: &[ArrayD<f64>]| -> f64 {
        let mut t = Tape::new();
        let vars: Vec<Var> = xs.iter().map(|x| t.param(x.clone())).collect();
        let out = f(&mut t, &vars);
        let s = project(&mut t, out, opts.seed);
        t.item(s)
    };
    // The gradient both ways: without a graph (ops may run fused kernels) and recorded
    // (the tape-op form that higher derivatives differentiate). Both must match.
    let analytic = |create_graph: bool| -> Vec<ArrayD<f64>> {
        let mut t = Tape::new();
        let vars: Vec<Var> = inputs.iter().map(|x| t.param(x.clone())).collect();
        let out = f(&mut t, &vars);
        let s = project(&mut t, out, opts.seed);
        let grads = t.grad(s, &vars, create_graph);
        grads.iter().map(|g| t.value(*g).clone()).collect()
    };
    let forms = [analytic(false), analytic(true)];

    let mut report = CheckReport {
        worst_input: 0,
        worst_index: 0,
        analytic: 0.0,
        numeric: 0.0,
        rel_err: 0.0,
        worst_recorded: false,
        max_abs_err: 0.0,
        checked: 0,
        ok: true,
    };
    let mut worst_ratio = -1.0;
    let mut xs: Vec<ArrayD<f64>> = inputs.to_vec();
    for i in 0..inputs.len() {
        for j in 0..inputs[i].len() {
            let orig = xs[i].as_slice().expect("row-major")[j];
            xs[i].as_slice_mut().expect("row-major")[j] = orig + opts.eps;
            let up = eval(&xs);
            xs[i].as_slice_mut().expect("row-major")[j] = orig - opts.eps;
            let down = eval(&xs);
            xs[i].as_slice_mut().expect("row-major")[j] = orig;
            let num = (up - down) / (2.0 * opts.eps);
            for (recorded, form) in [false, true].into_iter().zip(&forms) {
                let ana = form[i].as_slice().expect("row-major")[j];
                let err = (ana - num).abs();
                let ratio = err / (opts.atol + opts.rtol * num.abs());
                report.checked += 1;
                report.max_abs_err = report.max_abs_err.max(err);
                if ratio.is_nan() || ratio > 1.0 {
                    report.ok = false;
                }
                if ratio > worst_ratio || ratio.is_nan() {
                    worst_ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
                    report.worst_input = i;
                    report.worst_index = j;
                    report.worst_recorded = recorded;
                    report.analytic = ana;
                    report.numeric = num;
                    report.rel_err = err / ana.abs().max(num.abs()).max(f64::MIN_POSITIVE);
                }
            }
        }
    }
    report
}

/// Checks the second derivatives of `f` at `inputs`: the gradient of
/// `Σᵢ <∇ᵢ f, vᵢ>` (random fixed directions `vᵢ`), computed by differentiating the
/// recorded backward pass, against central differences of that recorded gradient.
pub fn gradgradcheck<Fun>(f: Fun, inputs: &[ArrayD<f64>]) -> CheckReport
where
    Fun: Fn(&mut Tape<f64>, &[Var]) -> Var,
{
    gradgradcheck_with(f, inputs, CheckOptions::default())
}

/// [`gradgradcheck`] with explicit step, tolerances and seed.
pub fn gradgradcheck_with<Fun>(f: Fun, inputs: &[ArrayD<f64>], opts: CheckOptions) -> CheckReport
where
    Fun: Fn(&mut Tape<f64>, &[Var]) -> Var,
{
    let dirs: Vec<ArrayD<f64>> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| random_like(x.shape(), opts.seed.wrapping_add(1 + i as u64)))
        .collect();
    let h = |t: &mut Tape<f64>, vars: &[Var]| -> Var {
        let out = f(t, vars);
        let s = project(t, out, opts.seed);
        let grads = t.grad(s, vars, true);
        dot_with(t, &grads, &dirs)
    };
    gradcheck_with(h, inputs, opts)
}

/// The Hessian-vector product `H v` of the scalar function `f` at `inputs`, by
/// differentiating its recorded gradient: `∇ (∇f · v)`.
///
/// # Panics
/// If `f` does not return a one-element tensor or `v` does not match `inputs` in shapes.
pub fn hvp<F, Fun>(f: Fun, inputs: &[ArrayD<F>], v: &[ArrayD<F>]) -> Vec<ArrayD<F>>
where
    F: Float,
    Fun: Fn(&mut Tape<F>, &[Var]) -> Var,
{
    assert!(
        inputs.len() == v.len() && inputs.iter().zip(v).all(|(x, d)| x.shape() == d.shape()),
        "metagrad::hvp: directions must match the inputs in number and shape"
    );
    let mut t = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|x| t.param(x.clone())).collect();
    let out = f(&mut t, &vars);
    let grads = t.grad(out, &vars, true);
    let total = dot_with(&mut t, &grads, v);
    let hv = t.grad(total, &vars, false);
    hv.iter().map(|h| t.value(*h).clone()).collect()
}

/// `Σᵢ sum(gradsᵢ · dirsᵢ)` on the tape: a directional derivative that can be
/// differentiated again.
fn dot_with<F: Float>(t: &mut Tape<F>, grads: &[Var], dirs: &[ArrayD<F>]) -> Var {
    let mut total = t.scalar(0.0);
    for (g, d) in grads.iter().zip(dirs) {
        let dv = t.constant(d.clone());
        let p = t.mul(*g, dv);
        let p = t.sum(p);
        total = t.add(total, p);
    }
    total
}

/// Largest absolute elementwise difference of two arrays of one shape.
///
/// # Panics
/// If the shapes differ.
pub fn max_abs_diff<F: Float>(a: &ArrayD<F>, b: &ArrayD<F>) -> f64 {
    assert_eq!(
        a.shape(),
        b.shape(),
        "metagrad::max_abs_diff: shapes differ"
    );
    let mut m = 0.0f64;
    Zip::from(a)
        .and(b)
        .for_each(|&x, &y| m = m.max((x - y).abs().f64()));
    m
}
