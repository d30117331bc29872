//! Batch normalisation with the batch's own statistics, as one fused primitive.
//!
//! `y = (x − mean) / sqrt(var + eps) · gamma + beta`, statistics per channel (axis 1) over
//! every other axis. Written with the elementwise ops it takes about eight passes over the
//! activation forward and fifteen backward, and those passes were a third of a Conv-4
//! meta-training step; fused, it takes three forward and two backward.
//!
//! Its backward rule has two forms with one meaning, and the backward pass says which one
//! it wants (the `Form` in `tape/vjp.rs`, where the two calls stand side by side):
//! - recorded (`batch_norm_vjp_recorded`; `create_graph = true`, e.g. the inner-loop
//!   gradient of second-order MAML): the input gradient as one differentiable primitive,
//!   [`Op::BatchNormGrad`], and the other two as sums in tape ops;
//! - fused (`batch_norm_vjp_fused`; the outer backward pass, first-order methods, plain
//!   training): two loops over the batch, returning constants.
//!
//! `batch_norm_grad`'s own rule has the same two forms: its formula in tape ops (third
//! order) or fused (the outer backward pass of second-order MAML). Each form takes the
//! op's payload ([`BatchNorm`], [`BatchNormGrad`]). The input-gradient formula that the
//! fused rule and the `batch_norm_grad` primitive share is written once (`XHat::input_grad`),
//! and so is the walk over the pooled map (`pooled_planes`).
//!
//! Which statistics to use is the caller's choice, made explicit by
//! [`crate::nn::norm::batch_norm`] and its [`NormMode`](crate::nn::NormMode); this op is the
//! batch-statistics case.

use super::broadcast::sum_slice;
use super::{flat, from_vec};
/// The statistics a batch norm's forward pass returns; defined with the op that carries
/// them, in the tape.
pub use crate::tape::op::BatchStats;
use crate::tape::op::{BatchNorm, BatchNormGrad, Gather, NONE};
use crate::tape::{Op, Tape, Var};
use crate::Float;
use ndarray::{ArrayD, IxDyn};
use std::sync::Arc;

/// `(N, C, P)`: batch, channels, and elements per channel plane.
fn ncp(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product())
}

/// `Σ (x − mu)²` with eight running partial sums (vectorises).
fn sum_sq_dev<F: Float>(x: &[F], mu: F) -> F {
    let mut acc = [F::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            let d = c[k] - mu;
            acc[k] += d * d;
        }
    }
    let mut s = acc.iter().fold(F::zero(), |a, &b| a + b);
    for &v in rest {
        s += (v - mu) * (v - mu);
    }
    s
}

/// `Σ g · (x − mu)` with eight running partial sums.
fn dot_dev<F: Float>(g: &[F], x: &[F], mu: F) -> F {
    let mut acc = [F::zero(); 8];
    let (gc, xc) = (g.chunks_exact(8), x.chunks_exact(8));
    let (gr, xr) = (gc.remainder(), xc.remainder());
    for (a, b) in gc.zip(xc) {
        for k in 0..8 {
            acc[k] += a[k] * (b[k] - mu);
        }
    }
    let mut s = acc.iter().fold(F::zero(), |a, &b| a + b);
    for (&a, &b) in gr.iter().zip(xr) {
        s += a * (b - mu);
    }
    s
}

impl<F: Float> Tape<F> {
    /// Batch normalisation of `x: [N, C, ...]` with **the batch's own** per-channel
    /// statistics (over every axis but 1) and a per-channel affine map `gamma`, `beta`
    /// (`[C]` each): `(x − mean) / sqrt(var + eps) · gamma + beta`, `var` biased.
    ///
    /// Returns the output and the statistics used. This is the batch-statistics case of
    /// [`crate::nn::norm::batch_norm`], which takes the train / transductive / inductive choice
    /// explicitly; call that unless you are building a layer.
    ///
    /// # Panics
    /// If `x` has fewer than two axes or `gamma`, `beta` are not `[C]`.
    #[track_caller]
    pub fn batch_norm_batch_stats(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f64,
    ) -> (Var, Arc<BatchStats>) {
        self.batch_norm_fused("batch_norm_batch_stats", x, gamma, beta, eps, None)
    }

    /// [`Tape::batch_norm_batch_stats`], then ReLU and `k × k` max-pooling with the given
    /// stride (as [`Tape::relu_max_pool2d`]), as one op: the normalised map is never
    /// stored, only the pooled one, and the backward pass reads the pooled gradient
    /// directly. `x` is `[N, C, H, W]`.
    ///
    /// The layer of the same name that takes a [`NormMode`](crate::nn::NormMode) and calls
    /// it is [`crate::nn::norm::batch_norm_relu_max_pool2d`].
    ///
    /// # Panics
    /// As [`Tape::batch_norm_batch_stats`] and [`Tape::max_pool2d`].
    #[track_caller]
    pub fn batch_norm_relu_max_pool2d(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f64,
        k: usize,
        stride: usize,
    ) -> (Var, Arc<BatchStats>) {
        let name = "batch_norm_relu_max_pool2d";
        self.batch_norm_fused(name, x, gamma, beta, eps, Some((k, stride)))
    }

    /// The forward pass of both: statistics, then the affine map, or the affine map, ReLU
    /// and max-pooling (`pool = Some((k, stride))`) in one pass.
    #[track_caller]
    fn batch_norm_fused(
        &mut self,
        name: &str,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f64,
        pool: Option<(usize, usize)>,
    ) -> (Var, Arc<BatchStats>) {
        self.check_norm_affine(name, x, gamma, beta);
        let shape = self.shape(x).to_vec();
        if let Some((k, stride)) = pool {
            super::conv::check_pool(name, &shape, k, stride);
        }
        let (n, c, p) = ncp(&shape);
        let xs = flat(self.value(x));
        let (stats, scale, shift) = self.batch_stats(xs, (n, c, p), gamma, beta, eps);
        let (value, map) = match pool {
            None => {
                let mut out = Vec::with_capacity(xs.len());
                for (i, plane) in xs.chunks_exact(p.max(1)).enumerate().take(n * c) {
                    let (a, b) = (scale[i % c], shift[i % c]);
                    out.extend(plane.iter().map(|&v| v * a + b));
                }
                (from_vec(&shape, out), None)
            }
            Some((k, stride)) => {
                let affine = |ch: usize| (scale[ch], shift[ch]);
                // A NaN in the channel makes its statistics, and so every value, NaN.
                let (value, map) =
                    super::conv::max_pool::<F, false>(xs, &shape, k, stride, true, affine);
                (value, Some(Arc::new(map)))
            }
        };
        let stats = Arc::new(stats);
        let op = Op::BatchNorm(BatchNorm {
            x,
            gamma,
            beta,
            eps,
            stats: stats.clone(),
            pool: map,
        });
        (self.push(value, op, &[x, gamma, beta]), stats)
    }

    /// Panics unless `x` is `[N, C, ...]` and `gamma`, `beta` are `[C]`, naming the op
    /// and the shapes (shared by every normalisation layer).
    #[track_caller]
    pub(crate) fn check_norm_affine(&self, name: &str, x: Var, gamma: Var, beta: Var) {
        let (sx, sg, sb) = (self.shape(x), self.shape(gamma), self.shape(beta));
        assert!(
            sx.len() >= 2 && sg == [sx[1]] && sb == [sx[1]],
            "metagrad::{name}: input {sx:?} needs gamma and beta of shape [{}], got {sg:?} \
             and {sb:?}",
            sx.get(1).copied().unwrap_or(0)
        );
    }

    /// Per-channel mean and biased variance of `xs` (`[N, C, P]`, two passes), and the
    /// per-channel `scale = gamma / sqrt(var + eps)`, `shift = beta − mean · scale`.
    fn batch_stats(
        &self,
        xs: &[F],
        (n, c, p): (usize, usize, usize),
        gamma: Var,
        beta: Var,
        eps: f64,
    ) -> (BatchStats, Vec<F>, Vec<F>) {
        let (gs, bs) = (flat(self.value(gamma)), flat(self.value(beta)));
        let count = (n * p) as f64;
        let mut mean = vec![0.0; c];
        for (i, plane) in xs.chunks_exact(p.max(1)).enumerate().take(n * c) {
            mean[i % c] += sum_slice(plane).f64();
        }
        mean.iter_mut().for_each(|m| *m /= count);
        let mut var = vec![0.0; c];
        for (i, plane) in xs.chunks_exact(p.max(1)).enumerate().take(n * c) {
            var[i % c] += sum_sq_dev(plane, F::c(mean[i % c])).f64();
        }
        var.iter_mut().for_each(|v| *v /= count);
        let scale: Vec<F> = (0..c)
            .map(|k| F::c(gs[k].f64() / (var[k] + eps).sqrt()))
            .collect();
        let shift: Vec<F> = (0..c)
            .map(|k| F::c(bs[k].f64() - mean[k] * scale[k].f64()))
            .collect();
        (BatchStats { mean, var }, scale, shift)
    }

    // The backward rule of `Op::BatchNorm`, in its two forms.

    /// The backward rule of [`Tape::batch_norm_batch_stats`] (and, with a pool, of
    /// [`Tape::batch_norm_relu_max_pool2d`], whose upstream gradient `g` is the pooled
    /// map's), recorded: `(dx, dgamma, dbeta)`, each only where `need` says so. `dx` is one
    /// differentiable [`Op::BatchNormGrad`], `dgamma` and `dbeta` are sums in tape ops.
    pub(crate) fn batch_norm_vjp_recorded(
        &mut self,
        bn: &BatchNorm,
        g: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        let g = match &bn.pool {
            Some(map) => self.scatter_add(g, map.clone()),
            None => g,
        };
        let axes = not_channel_axes(self.shape(bn.x).len());
        let dx = need[0].then(|| {
            self.batch_norm_grad(BatchNormGrad {
                x: bn.x,
                gamma: bn.gamma,
                g,
                eps: bn.eps,
                stats: bn.stats.clone(),
            })
        });
        let dgamma = need[1].then(|| {
            let c = self.shape(bn.gamma)[0];
            let ones = self.constant(ArrayD::ones(IxDyn(&[c])));
            let zeros = self.zeros(&[c]);
            let xh = self.batch_norm_batch_stats(bn.x, ones, zeros, bn.eps).0;
            let p = self.mul(g, xh);
            self.sum_axes(p, &axes, false)
        });
        let dbeta = need[2].then(|| self.sum_axes(g, &axes, false));
        [dx, dgamma, dbeta]
    }

    /// The same rule, fused: per channel `Σg` and `Σg·(x − mean)` in one pass (over the
    /// pooled gradient's elements with a pool), then `dx` in a second; `dgamma` and `dbeta`
    /// follow from the sums. Returns constants.
    pub(crate) fn batch_norm_vjp_fused(
        &mut self,
        bn: &BatchNorm,
        g: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        let shape = self.shape(bn.x).to_vec();
        let (gam, gs) = (flat(self.value(bn.gamma)), flat(self.value(g)));
        let xh = XHat::new(flat(self.value(bn.x)), &shape, &bn.stats, bn.eps);
        let pool = bn.pool.as_deref();
        let (sg, sgx) = xh.sums(gs, pool);
        let dx = need[0].then(|| from_vec(&shape, xh.input_grad(gam, gs, pool, &sg, &sgx)));
        let c = xh.c;
        let dgamma =
            need[1].then(|| from_vec(&[c], (0..c).map(|j| F::c(sgx[j] * xh.inv[j])).collect()));
        let dbeta = need[2].then(|| from_vec(&[c], sg.iter().map(|&s| F::c(s)).collect()));
        [dx, dgamma, dbeta].map(|a| a.map(|a| self.constant(a)))
    }

    /// The input gradient of batch norm with batch statistics, as one primitive:
    /// `dx = γ·inv·(g − mean(g) − x̂·mean(g·x̂))` per channel, `x̂ = (x − mean)·inv`,
    /// `inv = 1 / sqrt(var + eps)`, for the upstream gradient `g` (shaped like `x`).
    /// Recorded as the backward of a batch norm when a graph is created (the inner loop
    /// of second-order MAML), so that the outer backward pass differentiates one op
    /// instead of a dozen. Its value is the fused rule's `dx`, computed by the same code.
    fn batch_norm_grad(&mut self, op: BatchNormGrad) -> Var {
        let shape = self.shape(op.x).to_vec();
        let (gam, gs) = (flat(self.value(op.gamma)), flat(self.value(op.g)));
        let xh = XHat::new(flat(self.value(op.x)), &shape, &op.stats, op.eps);
        let (sg, sgx) = xh.sums(gs, None);
        let value = from_vec(&shape, xh.input_grad(gam, gs, None, &sg, &sgx));
        let ins = [op.x, op.gamma, op.g];
        self.push(value, Op::BatchNormGrad(op), &ins)
    }

    // The backward rule of `Op::BatchNormGrad`, in its two forms. With `m` elements per
    // channel, `c = mean(g·x̂)`, `B = mean(gy·x̂)`, `S = mean(gy)`,
    // `A = mean(gy·g) − mean(g)·S`, for the upstream gradient `gy`:
    //
    // - `dx = γ·inv²·(−c·gy − B·(g − mean(g)) + (3cB − A)·x̂ + c·S)`,
    // - `dg = γ·inv·(gy − S − x̂·B)` (the input-gradient formula applied to `gy`: the map
    //   `g ↦ dx` is self-adjoint),
    // - `dgamma = m·inv·(A − c·B)`.

    /// The backward rule of [`Op::BatchNormGrad`] for the upstream gradient `gy`,
    /// recorded: `(dx, dgamma, dg)` written with tape ops, recomputing the statistics from
    /// `x`, so that they can be differentiated again (third order).
    pub(crate) fn batch_norm_grad_vjp_recorded(
        &mut self,
        op: &BatchNormGrad,
        gy: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        let BatchNormGrad {
            x, gamma, g, eps, ..
        } = *op;
        let shape = self.shape(x).to_vec();
        let axes = not_channel_axes(shape.len());
        let mut chan = vec![1; shape.len()];
        chan[1] = shape[1];
        let mean = |t: &mut Self, v: Var| t.mean_axes(v, &axes, true);
        let mu = mean(self, x);
        let xc = self.sub(x, mu);
        let sq = self.square(xc);
        let var = mean(self, sq);
        let ve = self.add_scalar(var, eps);
        let sd = self.sqrt(ve);
        let inv = self.powi(sd, -1);
        let xh = self.mul(xc, inv);
        let gr = self.reshape(gamma, &chan);
        let gbar = mean(self, g);
        let gx = self.mul(g, xh);
        let cc = mean(self, gx);
        let yx = self.mul(gy, xh);
        let b = mean(self, yx);
        let s = mean(self, gy);
        let gc = self.sub(g, gbar); // g − ḡ
        let ygc = self.mul(gy, gc);
        let a = mean(self, ygc); // mean(gy·g) − ḡ·S
        let dx = need[0].then(|| {
            let gi = self.mul(gr, inv);
            let gi2 = self.mul(gi, inv);
            let t1 = self.mul(cc, gy);
            let t2 = self.mul(b, gc);
            let cb = self.mul(cc, b);
            let cb3 = self.mul_scalar(cb, 3.0);
            let k = self.sub(cb3, a);
            let t3 = self.mul(k, xh);
            let cs = self.mul(cc, s);
            let u = self.add(t1, t2);
            let u = self.sub(t3, u);
            let u = self.add(u, cs);
            self.mul(gi2, u)
        });
        let dgamma = need[1].then(|| {
            // Σ gy·dx/γ = Σ gy·inv·(g − ḡ − x̂·c).
            let xcc = self.mul(xh, cc);
            let u = self.sub(gc, xcc);
            let u = self.mul(u, inv);
            let u = self.mul(gy, u);
            self.sum_axes(u, &axes, false)
        });
        let dg = need[2].then(|| {
            let gi = self.mul(gr, inv);
            let xb = self.mul(xh, b);
            let u = self.sub(gy, s);
            let u = self.sub(u, xb);
            self.mul(gi, u)
        });
        [dx, dgamma, dg]
    }

    /// The same rule, fused: the five per-channel sums it needs in one pass, then `dx` and
    /// `dg` each as a per-channel affine map of `(gy, g, x − mean)` in one more. Returns
    /// constants.
    pub(crate) fn batch_norm_grad_vjp_fused(
        &mut self,
        op: &BatchNormGrad,
        gy: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        let shape = self.shape(op.x).to_vec();
        let (gam, gs, ys) = (
            flat(self.value(op.gamma)),
            flat(self.value(op.g)),
            flat(self.value(gy)),
        );
        let xh = XHat::new(flat(self.value(op.x)), &shape, &op.stats, op.eps);
        let (xs, c, p, m) = (xh.xs, xh.c, xh.p, xh.count);
        // Per channel: Σg, Σg·(x−μ), Σgy, Σgy·(x−μ), Σgy·g.
        let mut acc = vec![[0.0f64; 5]; c];
        for (i, ((xp, gp), yp)) in xs
            .chunks_exact(p)
            .zip(gs.chunks_exact(p))
            .zip(ys.chunks_exact(p))
            .enumerate()
        {
            let j = i % c;
            let mu = xh.mu[j];
            let mut s = [F::zero(); 5];
            for ((&xv, &gv), &yv) in xp.iter().zip(gp).zip(yp) {
                let d = xv - mu;
                s[0] += gv;
                s[1] += gv * d;
                s[2] += yv;
                s[3] += yv * d;
                s[4] += yv * gv;
            }
            for (a, v) in acc[j].iter_mut().zip(s) {
                *a += v.f64();
            }
        }
        // Per-channel constants, so that each output is an affine map of (gy, g, x − μ).
        let mut cx = vec![[F::zero(); 4]; c]; // dx = a·gy + b·g + d·(x−μ) + e
        let mut cg = vec![[F::zero(); 3]; c]; // dg = a·gy + d·(x−μ) + e
        let mut dgamma = vec![F::zero(); c];
        for j in 0..c {
            let [sg, sgx, sy, syx, syg] = acc[j];
            let inv = xh.inv[j];
            let gbar = sg / m;
            let cc = inv * sgx / m;
            let b = inv * syx / m;
            let s = sy / m;
            let a = syg / m - gbar * s;
            let gi2 = gam[j].f64() * inv * inv;
            // dx = γ inv² (−c gy − B (g − ḡ) + (3cB − A) x̂ + c S), x̂ = inv (x − μ).
            cx[j] = [
                F::c(-gi2 * cc),
                F::c(-gi2 * b),
                F::c(gi2 * (3.0 * cc * b - a) * inv),
                F::c(gi2 * (b * gbar + cc * s)),
            ];
            // dg = γ inv (gy − S − x̂ B).
            let gi = gam[j].f64() * inv;
            cg[j] = [F::c(gi), F::c(-gi * b * inv), F::c(-gi * s)];
            dgamma[j] = F::c(m * inv * (a - cc * b));
        }
        let dx = need[0].then(|| {
            let mut out = Vec::with_capacity(xs.len());
            for (i, ((xp, gp), yp)) in xs
                .chunks_exact(p)
                .zip(gs.chunks_exact(p))
                .zip(ys.chunks_exact(p))
                .enumerate()
            {
                let j = i % c;
                let ([a, b, d, e], mu) = (cx[j], xh.mu[j]);
                out.extend(
                    xp.iter()
                        .zip(gp)
                        .zip(yp)
                        .map(|((&xv, &gv), &yv)| a * yv + b * gv + d * (xv - mu) + e),
                );
            }
            from_vec(&shape, out)
        });
        let dg = need[2].then(|| {
            let mut out = Vec::with_capacity(xs.len());
            for (i, (xp, yp)) in xs.chunks_exact(p).zip(ys.chunks_exact(p)).enumerate() {
                let j = i % c;
                let ([a, d, e], mu) = (cg[j], xh.mu[j]);
                out.extend(
                    xp.iter()
                        .zip(yp)
                        .map(|(&xv, &yv)| a * yv + d * (xv - mu) + e),
                );
            }
            from_vec(&shape, out)
        });
        let dgamma = need[1].then(|| from_vec(&[c], dgamma));
        [dx, dgamma, dg].map(|a| a.map(|a| self.constant(a)))
    }
}

/// The axes a batch norm reduces over: all but the channel axis 1.
fn not_channel_axes(rank: usize) -> Vec<usize> {
    (0..rank).filter(|&a| a != 1).collect()
}

/// The normalised input `x̂ = (x − mean)·inv` as the fused backward loops read it, without
/// storing it: `x` as `N·C` planes of `p` elements and, per channel, the mean (in `F`) and
/// `inv = 1 / sqrt(var + eps)` from the forward pass's [`BatchStats`].
struct XHat<'a, F> {
    /// `x`, row-major.
    xs: &'a [F],
    /// Batch size.
    n: usize,
    /// Channels.
    c: usize,
    /// Elements per plane (at least 1).
    p: usize,
    /// Per-channel mean, in `F`.
    mu: Vec<F>,
    /// Per-channel `1 / sqrt(var + eps)`.
    inv: Vec<f64>,
    /// Elements per channel, `N·p`.
    count: f64,
}

impl<'a, F: Float> XHat<'a, F> {
    fn new(xs: &'a [F], shape: &[usize], stats: &BatchStats, eps: f64) -> Self {
        let (n, c, p) = ncp(shape);
        let p = p.max(1);
        XHat {
            xs,
            n,
            c,
            p,
            mu: stats.mean.iter().map(|&m| F::c(m)).collect(),
            inv: stats.var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect(),
            count: (n * p) as f64,
        }
    }

    /// Per channel `Σg` and `Σg·(x − mean)`, for `g` shaped like `x` or, with a pool, the
    /// pooled map's gradient (summed over the elements that read `x`).
    fn sums(&self, gs: &[F], pool: Option<&Gather>) -> (Vec<f64>, Vec<f64>) {
        let (c, p) = (self.c, self.p);
        let (mut sg, mut sgx) = (vec![0.0; c], vec![0.0; c]);
        match pool {
            None => {
                for (i, (gp, xp)) in gs.chunks_exact(p).zip(self.xs.chunks_exact(p)).enumerate() {
                    sg[i % c] += sum_slice(gp).f64();
                    sgx[i % c] += dot_dev(gp, xp, self.mu[i % c]).f64();
                }
            }
            Some(map) => {
                for (j, read) in pooled_planes(gs, map, self.n * c, c) {
                    let (mut a, mut b) = (F::zero(), F::zero());
                    for (gv, si) in read {
                        a += gv;
                        b += gv * (self.xs[si] - self.mu[j]);
                    }
                    sg[j] += a.f64();
                    sgx[j] += b.f64();
                }
            }
        }
        (sg, sgx)
    }

    /// The input gradient `dx = γ·inv·(g − Σg/m − x̂·Σ(g·x̂)/m)` per channel, from the
    /// [`sums`](Self::sums) `Σg` and `Σg·(x − mean)` of the same `g` and `pool`: written as
    /// `dx = k·g + e·(x − mean) + f`, where with a pool `g` is zero but at each window's
    /// maximum.
    fn input_grad(
        &self,
        gam: &[F],
        gs: &[F],
        pool: Option<&Gather>,
        sg: &[f64],
        sgx: &[f64],
    ) -> Vec<F> {
        let (c, p, m) = (self.c, self.p, self.count);
        let k: Vec<f64> = (0..c).map(|j| gam[j].f64() * self.inv[j]).collect();
        let e: Vec<F> = (0..c)
            .map(|j| F::c(-k[j] * self.inv[j] * self.inv[j] * sgx[j] / m))
            .collect();
        let f: Vec<F> = (0..c).map(|j| F::c(-k[j] * sg[j] / m)).collect();
        let k: Vec<F> = k.into_iter().map(F::c).collect();
        let mut out = Vec::with_capacity(self.xs.len());
        match pool {
            None => {
                for (i, (gp, xp)) in gs.chunks_exact(p).zip(self.xs.chunks_exact(p)).enumerate() {
                    let j = i % c;
                    let (kj, ej, fj, mj) = (k[j], e[j], f[j], self.mu[j]);
                    out.extend(
                        gp.iter()
                            .zip(xp)
                            .map(|(&gv, &xv)| kj * gv + ej * (xv - mj) + fj),
                    );
                }
            }
            Some(map) => {
                for (i, xp) in self.xs.chunks_exact(p).enumerate() {
                    let j = i % c;
                    let (ej, fj, mj) = (e[j], f[j], self.mu[j]);
                    out.extend(xp.iter().map(|&xv| ej * (xv - mj) + fj));
                }
                for (j, read) in pooled_planes(gs, map, self.n * c, c) {
                    let kj = k[j];
                    for (gv, si) in read {
                        out[si] += kj * gv;
                    }
                }
            }
        }
        out
    }
}

/// The pooled map's gradient `gs` plane by plane, for each of the `planes` planes in order:
/// its channel, and the `(g, source in x)` pairs of its elements that read an element of
/// `x` (a window's maximum; a window the ReLU cut reads none).
fn pooled_planes<'a, F: Float>(
    gs: &'a [F],
    map: &'a Gather,
    planes: usize,
    c: usize,
) -> impl Iterator<Item = (usize, impl Iterator<Item = (F, usize)> + 'a)> + 'a {
    let q = (gs.len() / planes.max(1)).max(1); // pooled elements per plane
    let rows = gs.chunks_exact(q).zip(map.src.chunks_exact(q));
    rows.enumerate().map(move |(i, (gp, sp))| {
        let read = gp.iter().zip(sp).filter(|&(_, &si)| si != NONE);
        (i % c, read.map(|(&gv, &si)| (gv, si)))
    })
}
