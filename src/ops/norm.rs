//! Batch normalisation with the batch's own statistics, as one fused primitive.
//!
//! `y = (x − mean) / sqrt(var + eps) · gamma + beta`, statistics per channel (axis 1) over
//! every other axis. Written with the elementwise ops it takes about eight passes over the
//! activation forward and fifteen backward, and those passes were a third of a Conv-4
//! meta-training step; fused, it takes three forward and two backward.
//!
//! Its backward rule has two forms with one meaning:
//! - while the tape is recording (`create_graph = true`, e.g. the inner-loop gradient of
//!   second-order MAML), it is written with the tape's own ops, recomputing the normalised
//!   input from `x`, so the gradient can be differentiated again;
//! - otherwise (the outer backward pass, first-order methods, plain training) it runs as two
//!   fused loops and returns constants.
//!
//! Which statistics to use is the caller's choice, made explicit by
//! [`crate::nn::norm::batch_norm`] and its [`NormMode`](crate::nn::NormMode); this op is the
//! batch-statistics case.

use super::broadcast::sum_slice;
use super::{flat, from_vec};
use crate::tape::op::{Gather, NONE};
use crate::tape::{Op, Tape, Var};
use crate::Float;
use ndarray::{ArrayD, IxDyn};
use std::sync::Arc;

/// Per-channel statistics saved by the forward pass: mean, then biased variance.
#[derive(Debug)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel biased (divide-by-count) variance.
    pub var: Vec<f64>,
}

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
                let (value, map) = super::conv::max_pool(xs, &shape, k, stride, true, affine);
                (value, Some(Arc::new(map)))
            }
        };
        let stats = Arc::new(stats);
        let op = Op::BatchNorm {
            x,
            gamma,
            beta,
            eps,
            stats: stats.clone(),
            pool: map,
        };
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

    /// The backward rule of [`Tape::batch_norm_batch_stats`] (and, with `pool`, of
    /// [`Tape::batch_norm_relu_max_pool2d`], whose upstream gradient `g` is the pooled
    /// map's): `(dx, dgamma, dbeta)`, each only where `need` says so. See the module docs
    /// for its two forms.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn batch_norm_vjp(
        &mut self,
        x: Var,
        gamma: Var,
        eps: f64,
        stats: &Arc<BatchStats>,
        pool: Option<&Arc<Gather>>,
        g: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        if self.is_recording() {
            // Recorded: dx as one differentiable primitive, dgamma and dbeta as sums.
            let g = match pool {
                Some(map) => self.scatter_add(g, map.clone()),
                None => g,
            };
            let axes = not_channel_axes(self.shape(x).len());
            let dx = need[0].then(|| self.batch_norm_grad(x, gamma, g, eps, stats.clone()));
            let dgamma = need[1].then(|| {
                let c = self.shape(gamma)[0];
                let ones = self.constant(ArrayD::ones(IxDyn(&[c])));
                let zeros = self.zeros(&[c]);
                let xh = self.batch_norm_batch_stats(x, ones, zeros, eps).0;
                let p = self.mul(g, xh);
                self.sum_axes(p, &axes, false)
            });
            let dbeta = need[2].then(|| self.sum_axes(g, &axes, false));
            return [dx, dgamma, dbeta];
        }
        let shape = self.shape(x).to_vec();
        let (n, c, p) = ncp(&shape);
        let p = p.max(1);
        let (xs, gs) = (flat(self.value(x)), flat(self.value(g)));
        let gam = flat(self.value(gamma));
        let cs = ChannelConsts::new(stats, eps, n * p);
        // Σ g and Σ g·(x − mean) per channel, over the full map or the pooled elements.
        let (sg, sgx) = match pool {
            None => sums(xs, gs, &cs.mu, c, p),
            Some(map) => {
                let (mut sg, mut sgx) = (vec![0.0; c], vec![0.0; c]);
                let q = (gs.len() / (n * c).max(1)).max(1); // pooled elements per plane
                for (i, (gp, sp)) in gs.chunks_exact(q).zip(map.src.chunks_exact(q)).enumerate() {
                    let j = i % c;
                    let (mut a, mut b) = (F::zero(), F::zero());
                    for (&gv, &si) in gp.iter().zip(sp) {
                        if si != NONE {
                            a += gv;
                            b += gv * (xs[si] - cs.mu[j]);
                        }
                    }
                    sg[j] += a.f64();
                    sgx[j] += b.f64();
                }
                (sg, sgx)
            }
        };
        let dx = need[0].then(|| {
            let (k, e, f) = cs.dx_coefficients(gam, &sg, &sgx);
            let out = match pool {
                None => dx_values(xs, gs, &cs.mu, (&k, &e, &f), c, p),
                Some(map) => {
                    let mut out = Vec::with_capacity(xs.len());
                    for (i, xp) in xs.chunks_exact(p).enumerate() {
                        let j = i % c;
                        let (ej, fj, mj) = (e[j], f[j], cs.mu[j]);
                        out.extend(xp.iter().map(|&xv| ej * (xv - mj) + fj));
                    }
                    // g is zero but at each window's maximum.
                    let q = (gs.len() / (n * c).max(1)).max(1);
                    for (i, (gp, sp)) in gs.chunks_exact(q).zip(map.src.chunks_exact(q)).enumerate()
                    {
                        let kj = k[i % c];
                        for (&gv, &si) in gp.iter().zip(sp) {
                            if si != NONE {
                                out[si] += kj * gv;
                            }
                        }
                    }
                    out
                }
            };
            from_vec(&shape, out)
        });
        let dgamma =
            need[1].then(|| from_vec(&[c], (0..c).map(|j| F::c(sgx[j] * cs.inv[j])).collect()));
        let dbeta = need[2].then(|| from_vec(&[c], sg.iter().map(|&s| F::c(s)).collect()));
        [dx, dgamma, dbeta].map(|a| a.map(|a| self.constant(a)))
    }

    /// The input gradient of batch norm with batch statistics, as one primitive:
    /// `dx = γ·inv·(g − mean(g) − x̂·mean(g·x̂))` per channel, `x̂ = (x − mean)·inv`,
    /// `inv = 1 / sqrt(var + eps)`, for the upstream gradient `g` (shaped like `x`).
    /// Recorded as the backward of a batch norm when a graph is created (the inner loop
    /// of second-order MAML), so that the outer backward pass differentiates one op
    /// instead of a dozen.
    fn batch_norm_grad(
        &mut self,
        x: Var,
        gamma: Var,
        g: Var,
        eps: f64,
        stats: Arc<BatchStats>,
    ) -> Var {
        let shape = self.shape(x).to_vec();
        let (n, c, p) = ncp(&shape);
        let p = p.max(1);
        let (xs, gs) = (flat(self.value(x)), flat(self.value(g)));
        let gam = flat(self.value(gamma));
        let cs = ChannelConsts::new(&stats, eps, n * p);
        let (sg, sgx) = sums(xs, gs, &cs.mu, c, p);
        let (k, e, f) = cs.dx_coefficients(gam, &sg, &sgx);
        let value = from_vec(&shape, dx_values(xs, gs, &cs.mu, (&k, &e, &f), c, p));
        let op = Op::BatchNormGrad {
            x,
            gamma,
            g,
            eps,
            stats,
        };
        self.push(value, op, &[x, gamma, g])
    }

    /// The backward rule of [`Tape::batch_norm_grad`] for the upstream gradient `gy`:
    /// `(dx, dgamma, dg)`. With `m` elements per channel, `c = mean(g·x̂)`,
    /// `B = mean(gy·x̂)`, `S = mean(gy)`, `A = mean(gy·g) − mean(g)·S`:
    ///
    /// - `dx = γ·inv²·(−c·gy − B·(g − mean(g)) + (3cB − A)·x̂ + c·S)`,
    /// - `dg = γ·inv·(gy − S − x̂·B)`,
    /// - `dgamma = m·inv·(A − c·B)`.
    ///
    /// Fused when not recording; written with tape ops when recording.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn batch_norm_grad_vjp(
        &mut self,
        x: Var,
        gamma: Var,
        g: Var,
        eps: f64,
        stats: &BatchStats,
        gy: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        if self.is_recording() {
            return self.batch_norm_grad_vjp_graph(x, gamma, g, eps, gy, need);
        }
        let shape = self.shape(x).to_vec();
        let (n, c, p) = ncp(&shape);
        let p = p.max(1);
        let (xs, gs, ys) = (
            flat(self.value(x)),
            flat(self.value(g)),
            flat(self.value(gy)),
        );
        let gam = flat(self.value(gamma));
        let cs = ChannelConsts::new(stats, eps, n * p);
        let m = cs.count;
        // Per channel: Σg, Σg·(x−μ), Σgy, Σgy·(x−μ), Σgy·g.
        let mut acc = vec![[0.0f64; 5]; c];
        for (i, ((xp, gp), yp)) in xs
            .chunks_exact(p)
            .zip(gs.chunks_exact(p))
            .zip(ys.chunks_exact(p))
            .enumerate()
        {
            let j = i % c;
            let mu = cs.mu[j];
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
            let inv = cs.inv[j];
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
                let ([a, b, d, e], mu) = (cx[j], cs.mu[j]);
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
                let ([a, d, e], mu) = (cg[j], cs.mu[j]);
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

    /// [`Tape::batch_norm_grad_vjp`] written with tape ops (differentiable again).
    fn batch_norm_grad_vjp_graph(
        &mut self,
        x: Var,
        gamma: Var,
        g: Var,
        eps: f64,
        gy: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
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
}

/// The axes a batch norm reduces over: all but the channel axis 1.
fn not_channel_axes(rank: usize) -> Vec<usize> {
    (0..rank).filter(|&a| a != 1).collect()
}

/// Per-channel constants of a batch norm's backward pass.
struct ChannelConsts<F> {
    /// Mean, in `F`.
    mu: Vec<F>,
    /// `1 / sqrt(var + eps)`.
    inv: Vec<f64>,
    /// Elements per channel.
    count: f64,
}

impl<F: Float> ChannelConsts<F> {
    fn new(stats: &BatchStats, eps: f64, count: usize) -> Self {
        ChannelConsts {
            mu: stats.mean.iter().map(|&m| F::c(m)).collect(),
            inv: stats.var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect(),
            count: count as f64,
        }
    }

    /// `dx = k·g + e·(x − mean) + f` per channel, from `Σg` and `Σg·(x − mean)`:
    /// `dx = γ·inv·(g − Σg/m − x̂·Σ(g·x̂)/m)`, `x̂ = (x − mean)·inv`.
    #[allow(clippy::type_complexity)]
    fn dx_coefficients(&self, gam: &[F], sg: &[f64], sgx: &[f64]) -> (Vec<F>, Vec<F>, Vec<F>) {
        let c = self.mu.len();
        let k: Vec<f64> = (0..c).map(|j| gam[j].f64() * self.inv[j]).collect();
        let e = (0..c)
            .map(|j| F::c(-k[j] * self.inv[j] * self.inv[j] * sgx[j] / self.count))
            .collect();
        let f = (0..c).map(|j| F::c(-k[j] * sg[j] / self.count)).collect();
        (k.into_iter().map(F::c).collect(), e, f)
    }
}

/// Per channel `Σ g` and `Σ g·(x − mean)` over `[N, C, P]` maps.
fn sums<F: Float>(xs: &[F], gs: &[F], mu: &[F], c: usize, p: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut sg, mut sgx) = (vec![0.0; c], vec![0.0; c]);
    for (i, (gp, xp)) in gs.chunks_exact(p).zip(xs.chunks_exact(p)).enumerate() {
        sg[i % c] += sum_slice(gp).f64();
        sgx[i % c] += dot_dev(gp, xp, mu[i % c]).f64();
    }
    (sg, sgx)
}

/// `k·g + e·(x − mean) + f` per channel over `[N, C, P]` maps.
fn dx_values<F: Float>(
    xs: &[F],
    gs: &[F],
    mu: &[F],
    (k, e, f): (&[F], &[F], &[F]),
    c: usize,
    p: usize,
) -> Vec<F> {
    let mut out = Vec::with_capacity(xs.len());
    for (i, (gp, xp)) in gs.chunks_exact(p).zip(xs.chunks_exact(p)).enumerate() {
        let j = i % c;
        let (kj, ej, fj, mj) = (k[j], e[j], f[j], mu[j]);
        out.extend(
            gp.iter()
                .zip(xp)
                .map(|(&gv, &xv)| kj * gv + ej * (xv - mj) + fj),
        );
    }
    out
}
