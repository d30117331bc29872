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
//! [`crate::nn::batch_norm`] and its [`NormMode`](crate::nn::NormMode); this op is the
//! batch-statistics case.

use super::broadcast::sum_slice;
use super::{flat, from_vec};
use crate::tape::op::{Gather, NONE};
use crate::tape::{Op, Tape, Var};
use crate::Float;
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
    /// [`crate::nn::batch_norm`], which takes the train / transductive / inductive choice
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
        self.check_batch_norm("batch_norm_batch_stats", x, gamma, beta);
        let sx = self.shape(x);
        let shape = sx.to_vec();
        let (n, c, p) = ncp(&shape);
        let xs = flat(self.value(x));
        let (stats, scale, shift) = self.batch_stats(xs, (n, c, p), gamma, beta, eps);
        let mut out = Vec::with_capacity(xs.len());
        for (i, plane) in xs.chunks_exact(p.max(1)).enumerate().take(n * c) {
            let (a, b) = (scale[i % c], shift[i % c]);
            out.extend(plane.iter().map(|&v| v * a + b));
        }
        let stats = Arc::new(stats);
        let op = Op::BatchNorm {
            x,
            gamma,
            beta,
            eps,
            stats: stats.clone(),
            pool: None,
        };
        let y = self.push(from_vec(&shape, out), op, &[x, gamma, beta]);
        (y, stats)
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
        self.check_batch_norm("batch_norm_relu_max_pool2d", x, gamma, beta);
        let shape = self.shape(x).to_vec();
        super::conv::check_pool("batch_norm_relu_max_pool2d", &shape, k, stride);
        let (n, c, p) = ncp(&shape);
        let xs = flat(self.value(x));
        let (stats, scale, shift) = self.batch_stats(xs, (n, c, p), gamma, beta, eps);
        let (value, map) =
            super::conv::max_pool(xs, &shape, k, stride, true, |ch| (scale[ch], shift[ch]));
        let stats = Arc::new(stats);
        let op = Op::BatchNorm {
            x,
            gamma,
            beta,
            eps,
            stats: stats.clone(),
            pool: Some(Arc::new(map)),
        };
        (self.push(value, op, &[x, gamma, beta]), stats)
    }

    #[track_caller]
    fn check_batch_norm(&self, name: &str, x: Var, gamma: Var, beta: Var) {
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
        stats: &BatchStats,
        pool: Option<&Arc<Gather>>,
        g: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        if self.is_recording() {
            let g = match pool {
                Some(map) => self.scatter_add(g, map.clone()),
                None => g,
            };
            return self.batch_norm_vjp_graph(x, gamma, eps, g, need);
        }
        let shape = self.shape(x).to_vec();
        let (n, c, p) = ncp(&shape);
        let p = p.max(1);
        let (xs, gs) = (flat(self.value(x)), flat(self.value(g)));
        let gam = flat(self.value(gamma));
        let count = (n * p) as f64;
        let mu: Vec<F> = stats.mean.iter().map(|&m| F::c(m)).collect();
        let inv: Vec<f64> = stats.var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
        // Σ g and Σ g·(x − mean) per channel, over the full map or the pooled elements.
        let (mut sg, mut sgx) = (vec![0.0; c], vec![0.0; c]);
        match pool {
            None => {
                for (i, (gp, xp)) in gs.chunks_exact(p).zip(xs.chunks_exact(p)).enumerate() {
                    sg[i % c] += sum_slice(gp).f64();
                    sgx[i % c] += dot_dev(gp, xp, mu[i % c]).f64();
                }
            }
            Some(map) => {
                let q = gs.len() / (n * c).max(1); // pooled elements per plane
                for (i, (gp, sp)) in gs.chunks_exact(q).zip(map.src.chunks_exact(q)).enumerate() {
                    let j = i % c;
                    let (mut a, mut b) = (F::zero(), F::zero());
                    for (&gv, &si) in gp.iter().zip(sp) {
                        if si != NONE {
                            a += gv;
                            b += gv * (xs[si] - mu[j]);
                        }
                    }
                    sg[j] += a.f64();
                    sgx[j] += b.f64();
                }
            }
        }
        let dx = need[0].then(|| {
            // dx = γ·inv·(g − Σg/m − x̂·Σ(g·x̂)/m), x̂ = (x − mean)·inv,
            //    = k·g + e·(x − mean) + f.
            let k: Vec<f64> = (0..c).map(|j| gam[j].f64() * inv[j]).collect();
            let e: Vec<F> = (0..c)
                .map(|j| F::c(-k[j] * inv[j] * inv[j] * sgx[j] / count))
                .collect();
            let f: Vec<F> = (0..c).map(|j| F::c(-k[j] * sg[j] / count)).collect();
            let k: Vec<F> = k.into_iter().map(F::c).collect();
            let mut out = Vec::with_capacity(xs.len());
            match pool {
                None => {
                    for (i, (gp, xp)) in gs.chunks_exact(p).zip(xs.chunks_exact(p)).enumerate() {
                        let j = i % c;
                        let (kj, ej, fj, mj) = (k[j], e[j], f[j], mu[j]);
                        out.extend(
                            gp.iter()
                                .zip(xp)
                                .map(|(&gv, &xv)| kj * gv + ej * (xv - mj) + fj),
                        );
                    }
                }
                Some(map) => {
                    for (i, xp) in xs.chunks_exact(p).enumerate() {
                        let j = i % c;
                        let (ej, fj, mj) = (e[j], f[j], mu[j]);
                        out.extend(xp.iter().map(|&xv| ej * (xv - mj) + fj));
                    }
                    // g is zero but at each window's maximum.
                    let q = gs.len() / (n * c).max(1);
                    for (i, (gp, sp)) in gs.chunks_exact(q).zip(map.src.chunks_exact(q)).enumerate()
                    {
                        let kj = k[i % c];
                        for (&gv, &si) in gp.iter().zip(sp) {
                            if si != NONE {
                                out[si] += kj * gv;
                            }
                        }
                    }
                }
            }
            from_vec(&shape, out)
        });
        let dgamma =
            need[1].then(|| from_vec(&[c], (0..c).map(|j| F::c(sgx[j] * inv[j])).collect()));
        let dbeta = need[2].then(|| from_vec(&[c], sg.iter().map(|&s| F::c(s)).collect()));
        [dx, dgamma, dbeta].map(|a| a.map(|a| self.constant(a)))
    }

    /// The backward rule written with tape ops (differentiable again).
    fn batch_norm_vjp_graph(
        &mut self,
        x: Var,
        gamma: Var,
        eps: f64,
        g: Var,
        need: [bool; 3],
    ) -> [Option<Var>; 3] {
        let shape = self.shape(x).to_vec();
        let axes: Vec<usize> = (0..shape.len()).filter(|&a| a != 1).collect();
        let mut cs = vec![1; shape.len()];
        cs[1] = shape[1];
        let mean = self.mean_axes(x, &axes, true);
        let xc = self.sub(x, mean);
        let sq = self.square(xc);
        let var = self.mean_axes(sq, &axes, true);
        let ve = self.add_scalar(var, eps);
        let sd = self.sqrt(ve);
        let xh = self.div(xc, sd);
        let dx = need[0].then(|| {
            let gr = self.reshape(gamma, &cs);
            let gxh = self.mul(g, gr);
            let m1 = self.mean_axes(gxh, &axes, true);
            let p = self.mul(gxh, xh);
            let m2 = self.mean_axes(p, &axes, true);
            let t1 = self.sub(gxh, m1);
            let t2 = self.mul(xh, m2);
            let t3 = self.sub(t1, t2);
            self.div(t3, sd)
        });
        let dgamma = need[1].then(|| {
            let p = self.mul(g, xh);
            self.sum_axes(p, &axes, false)
        });
        let dbeta = need[2].then(|| self.sum_axes(g, &axes, false));
        [dx, dgamma, dbeta]
    }
}
