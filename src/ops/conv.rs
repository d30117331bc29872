//! Convolution and pooling on NCHW tensors.
//!
//! `conv2d`, its input adjoint `conv2d_input_grad` (a transposed convolution) and its
//! weight adjoint `conv2d_weight_grad` are three readings of one trilinear form
//! `<g, conv(x, w)>`, so the backward rule of each is the other two and every order of
//! derivative stays within the three (`conv2d_bias` adds a bias on the way out). Each
//! runs as im2col / col2im plus one matrix product per group of samples, their columns
//! side by side. Pooling is a [`Gather`] with a computed index map, so its backward (a
//! scatter-add) and double backward (a gather) come from the shape ops.

use super::broadcast::sum_slice;
use super::{flat, from_vec};
use crate::ops::linalg::{gemm, SMALL};
use crate::tape::op::{ConvGeom, Gather, NONE};
use crate::tape::{Op, Tape, Var};
use crate::Float;
use ndarray::{ArrayD, ArrayView2, ArrayViewMut2, IxDyn};
use std::any::TypeId;
use std::cell::RefCell;
use std::sync::Arc;

/// The output columns `lo..hi` whose input column `ow·stride + j − pad` lies inside
/// `0..w`, for kernel column `j`.
fn valid_cols(wo: usize, w: usize, stride: usize, pad: usize, j: usize) -> (usize, usize) {
    let lo = if pad > j {
        (pad - j).div_ceil(stride)
    } else {
        0
    };
    let hi = if w + pad > j {
        ((w + pad - j - 1) / stride + 1).min(wo)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// How many samples one matrix product takes: their columns stand side by side, so that
/// the product is wide (about [`PRODUCT_COLUMNS`] columns) instead of one narrow product
/// per sample, whose last, partial block of columns runs a slow remainder kernel. Depends
/// on the shapes only, so results do not depend on the number of threads.
///
/// A sample whose own product is small enough for [`gemm`]'s plain loops
/// ([`SMALL`] multiply-adds) gets a product of its own: otherwise the last, partial group
/// could take the plain loops while the others take the blocked kernels (which fuse the
/// multiply-add), and a sample's bits would depend on the batch size.
fn samples_per_product(g: &ConvGeom) -> usize {
    let hw = (g.ho() * g.wo()).max(1);
    if g.o * g.c * g.kh * g.kw * hw <= SMALL {
        return 1;
    }
    (PRODUCT_COLUMNS / hw).clamp(1, g.n.max(1))
}

/// The target width of a convolution's matrix product, in output positions. Measured on
/// the Conv-4 workloads (`maml_step`, W2 first order, one thread): 256–512 columns 8–12%
/// faster than one product per sample, 1024 and 2048 slower again (the column buffer
/// outgrows the cache).
const PRODUCT_COLUMNS: usize = 512;

/// Row length of the forward op's column buffer for `cols` columns: rounded up to 16, so
/// that the matrix product's kernels can read the columns in place instead of packing a
/// copy. The extra columns' products are dropped. (The adjoints' products take their
/// operands differently and gain nothing from it.)
fn col_stride(cols: usize) -> usize {
    cols.div_ceil(16) * 16
}

/// Runs `f(first, count, ld, cols, wide)` for each group of samples that shares one
/// matrix product, in order: samples `first..first + count`, `ld` columns per row
/// (`count·Ho·Wo`, rounded up to 16 with `padded`), and the scratch `cols`
/// (`[C·kh·kw, ld]`) and `wide` (`[O, ld]`), both starting on 64-byte lines.
fn for_each_group<F: Float>(
    g: &ConvGeom,
    padded: bool,
    mut f: impl FnMut(usize, usize, usize, &mut [F], &mut [F]),
) {
    let (hw, ckk) = (g.ho() * g.wo(), g.c * g.kh * g.kw);
    let width = |count: usize| {
        if padded {
            col_stride(count * hw)
        } else {
            count * hw
        }
    };
    let per = samples_per_product(g);
    let cl = col_stride(ckk * width(per));
    with_scratch(cl + g.o * width(per), |buf: &mut [F]| {
        let (cols, wide) = buf.split_at_mut(cl);
        for first in (0..g.n).step_by(per) {
            let count = per.min(g.n - first);
            let ld = width(count);
            f(
                first,
                count,
                ld,
                &mut cols[..ckk * ld],
                &mut wide[..g.o * ld],
            );
        }
    });
}

/// Scratch buffers up to this many elements are kept per thread between calls; larger
/// ones are allocated for the call.
const SCRATCH_KEPT: usize = 1 << 22;

/// Runs `f` on a scratch buffer of `len` elements whose contents are left over from
/// earlier calls (any values; the caller writes before it reads). For `f32` and `f64`
/// the buffer is kept per thread between calls: every step of a run has the same shapes,
/// so the convolutions then allocate, zero and fault in no column buffers after the
/// first step.
fn with_scratch<F: Float, R>(len: usize, f: impl FnOnce(&mut [F]) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    }
    let plain =
        TypeId::of::<F>() == TypeId::of::<f32>() || TypeId::of::<F>() == TypeId::of::<f64>();
    if !plain || len > SCRATCH_KEPT {
        return f(&mut vec![F::zero(); len]);
    }
    SCRATCH.with(|cell| {
        let Ok(mut buf) = cell.try_borrow_mut() else {
            return f(&mut vec![F::zero(); len]);
        };
        // Eight words more than needed, so that the slice can start on a 64-byte line.
        let words = (len * std::mem::size_of::<F>()).div_ceil(8) + 8;
        if buf.len() < words {
            buf.resize(words, 0);
        }
        let skip = buf.as_ptr().align_offset(64).min(7);
        // SAFETY: `F` is `f32` or `f64` (checked above), for which every bit pattern is a
        // value, and whose alignment `u64` storage satisfies; the slice starts `skip ≤ 7`
        // words in and spans `len · size_of::<F>() ≤ 8 · (words − 8)` bytes, inside the
        // buffer, which stays mutably borrowed for the call.
        let scratch =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().add(skip).cast::<F>(), len) };
        f(scratch)
    })
}

/// Sample `n` (`[C, H, W]`) of the input `xs`.
fn sample<'a, F>(xs: &'a [F], g: &ConvGeom, n: usize) -> &'a [F] {
    let len = g.c * g.h * g.w;
    &xs[n * len..(n + 1) * len]
}

/// Copies samples `first..first + count` of an output-shaped `gs` (`[N, O, Ho·Wo]`) into
/// `wide` as `[O, count·Ho·Wo]`: each channel's planes side by side.
fn side_by_side<F: Copy>(gs: &[F], g: &ConvGeom, first: usize, count: usize, wide: &mut [F]) {
    let hw = g.ho() * g.wo();
    for (o, row) in wide.chunks_exact_mut(count * hw).enumerate() {
        for (s, dst) in row.chunks_exact_mut(hw).enumerate() {
            let from = ((first + s) * g.o + o) * hw;
            dst.copy_from_slice(&gs[from..from + hw]);
        }
    }
}

/// `(d, lo, hi, wrap)`: see [`shift`].
type Shift = (isize, usize, usize, std::ops::Range<usize>);

/// For a stride-1 convolution whose output is the input's size, kernel offset `(i, j)`
/// reads the input shifted by `d = (i − pad)·W + (j − pad)` flat elements: output element
/// `q` reads `q + d`, in range for `q` in `lo..hi`, except the `|j − pad|` columns at the
/// left or right edge that wrap around to a neighbouring row. `None` if the geometry is
/// not of that kind.
fn shift(g: &ConvGeom, i: usize, j: usize) -> Option<Shift> {
    if g.stride != 1 || g.ho() != g.h || g.wo() != g.w || g.pad >= g.w || g.pad >= g.h {
        return None;
    }
    let hw = (g.h * g.w) as isize;
    let (di, dj) = (i as isize - g.pad as isize, j as isize - g.pad as isize);
    let d = di * g.w as isize + dj;
    let lo = (-d).clamp(0, hw) as usize;
    let hi = (hw - d).clamp(0, hw) as usize;
    // Output columns whose input column falls outside the row.
    let wrap = if dj < 0 {
        0..(-dj) as usize
    } else {
        g.w - dj as usize..g.w
    };
    Some((d, lo, hi.max(lo), wrap))
}

/// [`shift`] for every kernel offset, row by row.
fn shifts(g: &ConvGeom) -> Vec<Option<Shift>> {
    (0..g.kh * g.kw)
        .map(|ij| shift(g, ij / g.kw, ij % g.kw))
        .collect()
}

/// Unfolds one sample `[C, H, W]` into columns `[C·kh·kw, Ho·Wo]`, rows `ld` apart
/// (elements past `Ho·Wo` in a row are left as they are).
fn im2col<F: Float>(x: &[F], g: &ConvGeom, cols: &mut [F], ld: usize) {
    let (ho, wo, s, p) = (g.ho(), g.wo(), g.stride, g.pad);
    let hw = ho * wo;
    let shifts = shifts(g);
    let mut rows = cols.chunks_mut(ld);
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &mut rows.next().expect("im2col rows")[..hw];
                if let Some((d, lo, hi, wrap)) = shifts[i * g.kw + j].clone() {
                    // One block copy of the shifted plane, then zeros at the edges.
                    row[..lo].fill(F::zero());
                    row[hi..].fill(F::zero());
                    let from = (lo as isize + d) as usize;
                    row[lo..hi].copy_from_slice(&plane[from..from + hi - lo]);
                    if !wrap.is_empty() {
                        for r in row.chunks_exact_mut(wo) {
                            r[wrap.clone()].fill(F::zero());
                        }
                    }
                    continue;
                }
                let (lo, hi) = valid_cols(wo, g.w, s, p, j);
                for oh in 0..ho {
                    let dst = &mut row[oh * wo..(oh + 1) * wo];
                    let ih = oh * s + i;
                    if ih < p || ih - p >= g.h {
                        dst.fill(F::zero());
                        continue;
                    }
                    let src = &plane[(ih - p) * g.w..(ih - p + 1) * g.w];
                    dst[..lo].fill(F::zero());
                    dst[hi..].fill(F::zero());
                    if lo < hi {
                        let first = lo * s + j - p;
                        if s == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (k, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[first + k * s];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds columns `[C·kh·kw, Ho·Wo]` (rows `ld` apart) back into one sample `[C, H, W]`
/// that starts as zeros, adding overlaps (the adjoint of [`im2col`]). The columns are
/// scratch: entries that fall outside the input are zeroed on the way.
fn col2im<F: Float>(cols: &mut [F], g: &ConvGeom, x: &mut [F], ld: usize) {
    let (ho, wo, s, p) = (g.ho(), g.wo(), g.stride, g.pad);
    let hw = ho * wo;
    let shifts = shifts(g);
    let mut rows = cols.chunks_mut(ld);
    for c in 0..g.c {
        let plane = &mut x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &mut rows.next().expect("col2im rows")[..hw];
                if let Some((d, lo, hi, wrap)) = shifts[i * g.kw + j].clone() {
                    if !wrap.is_empty() {
                        for r in row.chunks_exact_mut(wo) {
                            r[wrap.clone()].fill(F::zero());
                        }
                    }
                    let from = (lo as isize + d) as usize;
                    plane[from..from + hi - lo]
                        .iter_mut()
                        .zip(&row[lo..hi])
                        .for_each(|(d, &v)| *d += v);
                    continue;
                }
                let (lo, hi) = valid_cols(wo, g.w, s, p, j);
                if lo >= hi {
                    continue;
                }
                for oh in 0..ho {
                    let ih = oh * s + i;
                    if ih < p || ih - p >= g.h {
                        continue;
                    }
                    let dst = &mut plane[(ih - p) * g.w..(ih - p + 1) * g.w];
                    let src = &row[oh * wo + lo..oh * wo + hi];
                    let first = lo * s + j - p;
                    if s == 1 {
                        dst[first..first + hi - lo]
                            .iter_mut()
                            .zip(src)
                            .for_each(|(d, &v)| *d += v);
                    } else {
                        for (k, &v) in src.iter().enumerate() {
                            dst[first + k * s] += v;
                        }
                    }
                }
            }
        }
    }
}

fn mat<F>(data: &[F], rows: usize, cols: usize) -> ArrayView2<'_, F> {
    ArrayView2::from_shape((rows, cols), data).expect("matrix view")
}

fn mat_mut<F>(data: &mut [F], rows: usize, cols: usize) -> ArrayViewMut2<'_, F> {
    ArrayViewMut2::from_shape((rows, cols), data).expect("matrix view")
}

/// Panics unless a `k × k` pooling window with the given stride fits `s` (`[N, C, H, W]`).
#[track_caller]
pub(crate) fn check_pool(name: &str, s: &[usize], k: usize, stride: usize) {
    assert!(
        s.len() == 4 && k > 0 && stride > 0 && s[2] >= k && s[3] >= k,
        "metagrad::{name}: window {k} with stride {stride} does not fit input {s:?} \
         (expected [N, C, H, W])"
    );
}

/// Max-pooling of `a·x + b` (`(a, b) = affine(channel)`) over `x` of shape `s`
/// (`[N, C, H, W]`): the pooled values and the [`Gather`] of each window's first maximal
/// element. With `NAN_AWARE`, a NaN in a window wins, so it is never hidden; without, the
/// caller guarantees that a NaN anywhere makes every value of its channel NaN (batch norm:
/// a NaN input poisons the channel's statistics, and so `a` and `b`), so the first element
/// of the window carries it and the scan keeps one comparison per element. With `relu`, a
/// window whose maximum is not positive reads nothing (zero): the pooled ReLU; a NaN
/// maximum is kept.
pub(crate) fn max_pool<F: Float, const NAN_AWARE: bool>(
    xs: &[F],
    s: &[usize],
    k: usize,
    stride: usize,
    relu: bool,
    affine: impl Fn(usize) -> (F, F),
) -> (ArrayD<F>, Gather) {
    let (c, h, w) = (s[1], s[2], s[3]);
    let (ho, wo) = ((h - k) / stride + 1, (w - k) / stride + 1);
    let len = s[0] * c * ho * wo;
    let (mut src, mut out) = (vec![NONE; len], vec![F::zero(); len]);

    let planes = src
        .chunks_exact_mut(ho * wo)
        .zip(out.chunks_exact_mut(ho * wo));
    for (plane, (src, out)) in planes.enumerate() {
        let (a, b) = affine(plane % c);
        let base = plane * h * w;
        let rows = src.chunks_exact_mut(wo).zip(out.chunks_exact_mut(wo));
        for (oh, (src, out)) in rows.enumerate() {
            let row0 = base + oh * stride * w;
            // Branch-free arg-max (the comparisons are unpredictable) in which NaN wins;
            // with the ReLU, a maximum that is not positive reads nothing.
            let put = |best: usize, v: F, sd: &mut usize, od: &mut F| {
                let keep = !relu || v > F::zero() || v.is_nan();
                *sd = if keep { best } else { NONE };
                *od = if keep { v } else { F::zero() };
            };
            if k == 2 && stride == 2 {
                let (r0, r1) = (&xs[row0..row0 + w], &xs[row0 + w..row0 + 2 * w]);
                let windows = r0.chunks_exact(2).zip(r1.chunks_exact(2));
                let dst = src.iter_mut().zip(out.iter_mut());
                for (ow, ((p, q), (sd, od))) in windows.zip(dst).enumerate() {
                    let j = row0 + 2 * ow;
                    let (mut best, mut v) = (j, p[0] * a + b);
                    for (idx, x) in [(j + 1, p[1]), (j + w, q[0]), (j + w + 1, q[1])] {
                        let y = x * a + b;
                        let gt = if NAN_AWARE { F::beats(y, v) } else { y > v };
                        best = if gt { idx } else { best };
                        v = if gt { y } else { v };
                    }
                    put(best, v, sd, od);
                }
                continue;
            }
            for (ow, (sd, od)) in src.iter_mut().zip(out.iter_mut()).enumerate() {
                let first = row0 + ow * stride;
                let (mut best, mut v) = (first, xs[first] * a + b);
                for i in 0..k {
                    let row = first + i * w;
                    for (j, &x) in xs[row..row + k].iter().enumerate() {
                        let y = x * a + b;
                        let gt = if NAN_AWARE { F::beats(y, v) } else { y > v };
                        best = if gt { row + j } else { best };
                        v = if gt { y } else { v };
                    }
                }
                put(best, v, sd, od);
            }
        }
    }
    let out_shape = vec![s[0], c, ho, wo];
    let value = from_vec(&out_shape, out);
    let map = Gather {
        src,
        in_shape: s.to_vec(),
        out_shape,
    };
    (value, map)
}

impl<F: Float> Tape<F> {
    /// 2-D convolution (cross-correlation, as in every deep-learning library) of
    /// `x: [N, C, H, W]` with `w: [O, C, kh, kw]`, equal stride and zero padding in both
    /// directions; returns `[N, O, Ho, Wo]` with `Ho = (H + 2·pad − kh) / stride + 1`.
    ///
    /// # Panics
    /// If the shapes are not 4-D, the channels differ, the stride is zero, or the kernel
    /// is larger than the padded input.
    #[track_caller]
    pub fn conv2d(&mut self, x: Var, w: Var, stride: usize, pad: usize) -> Var {
        let geom = self.conv_geom("conv2d", x, w, stride, pad);
        self.conv2d_geom(x, w, geom)
    }

    /// [`Tape::conv2d`] plus a bias `b: [O]` for each output channel, as one op: the bias
    /// is added while the product is written out, instead of in a pass of its own.
    ///
    /// # Panics
    /// As [`Tape::conv2d`], and if `b` is not `[O]`.
    #[track_caller]
    pub fn conv2d_bias(&mut self, x: Var, w: Var, b: Var, stride: usize, pad: usize) -> Var {
        let geom = self.conv_geom("conv2d_bias", x, w, stride, pad);
        assert!(
            self.shape(b) == [geom.o],
            "metagrad::conv2d_bias: bias {:?} does not fit weight {:?} (expected [{}])",
            self.shape(b),
            self.shape(w),
            geom.o
        );
        let value = self.conv_forward(x, w, Some(b), geom);
        self.push(value, Op::Conv2dBias(x, w, b, geom), &[x, w, b])
    }

    /// The geometry of `conv2d(x, w)`, after checking the shapes.
    #[track_caller]
    fn conv_geom(&self, name: &str, x: Var, w: Var, stride: usize, pad: usize) -> ConvGeom {
        let (sx, sw) = (self.shape(x), self.shape(w));
        assert!(
            sx.len() == 4 && sw.len() == 4 && sx[1] == sw[1],
            "metagrad::{name}: input {sx:?} (N, C, H, W) and weight {sw:?} (O, C, kh, kw) \
             do not match"
        );
        assert!(
            stride > 0 && sx[2] + 2 * pad >= sw[2] && sx[3] + 2 * pad >= sw[3],
            "metagrad::{name}: kernel {sw:?} with stride {stride} and padding {pad} does not \
             fit input {sx:?}"
        );
        ConvGeom {
            n: sx[0],
            c: sx[1],
            h: sx[2],
            w: sx[3],
            o: sw[0],
            kh: sw[2],
            kw: sw[3],
            stride,
            pad,
        }
    }

    #[track_caller]
    pub(crate) fn conv2d_geom(&mut self, x: Var, w: Var, g: ConvGeom) -> Var {
        let value = self.conv_forward(x, w, None, g);
        self.push(value, Op::Conv2d(x, w, g), &[x, w])
    }

    /// The value of `conv(x, w)`, plus `b` per output channel if given.
    fn conv_forward(&self, x: Var, w: Var, b: Option<Var>, g: ConvGeom) -> ArrayD<F> {
        let bias = b.map(|b| flat(self.value(b)));
        if g.is_empty() {
            // Nothing to sum (a zero channel or kernel dimension, or no samples): the
            // output is the bias alone.
            let mut out = ArrayD::zeros(IxDyn(&[g.n, g.o, g.ho(), g.wo()]));
            if let Some(b) = bias {
                for mut sample in out.outer_iter_mut() {
                    for (mut plane, &bo) in sample.outer_iter_mut().zip(b) {
                        plane.fill(bo);
                    }
                }
            }
            return out;
        }
        let (hw, ckk) = (g.ho() * g.wo(), g.c * g.kh * g.kw);
        let (xs, ws) = (flat(self.value(x)), flat(self.value(w)));
        let mut out = Vec::with_capacity(g.n * g.o * hw);
        for_each_group(&g, true, |first, count, ld, cols, wide| {
            for s in 0..count {
                im2col(sample(xs, &g, first + s), &g, &mut cols[s * hw..], ld);
            }
            gemm(
                mat(ws, g.o, ckk),
                mat(cols, ckk, ld),
                false,
                false,
                &mut mat_mut(wide, g.o, ld),
                F::zero(),
            );
            // `wide` is `[O, count·Ho·Wo]`; the output is `[count, O, Ho·Wo]`.
            for s in 0..count {
                for (o, row) in wide.chunks_exact(ld).enumerate() {
                    let row = &row[s * hw..(s + 1) * hw];
                    let bo = bias.map_or(F::zero(), |b| b[o]);
                    let len = out.len();
                    let spare = &mut out.spare_capacity_mut()[..hw];
                    spare.iter_mut().zip(row).for_each(|(d, &v)| {
                        d.write(if bias.is_some() { v + bo } else { v });
                    });
                    // SAFETY: the `hw` elements past the length were written just above
                    // (the capacity holds the whole output).
                    unsafe { out.set_len(len + hw) };
                }
            }
        });
        from_vec(&[g.n, g.o, g.ho(), g.wo()], out)
    }

    /// The adjoint of [`Tape::conv2d`] in its input: the transposed convolution of
    /// `gy: [N, O, Ho, Wo]` with `w: [O, C, kh, kw]`, shaped like the input `[N, C, H, W]`.
    #[track_caller]
    pub fn conv2d_input_grad(&mut self, gy: Var, w: Var, g: ConvGeom) -> Var {
        let (hw, ckk) = (g.ho() * g.wo(), g.c * g.kh * g.kw);
        assert!(
            self.shape(gy) == [g.n, g.o, g.ho(), g.wo()] && self.shape(w) == [g.o, g.c, g.kh, g.kw],
            "metagrad::conv2d_input_grad: gradient {:?} and weight {:?} do not fit {g:?}",
            self.shape(gy),
            self.shape(w)
        );
        if g.is_empty() {
            let value = ArrayD::zeros(IxDyn(&[g.n, g.c, g.h, g.w]));
            return self.push(value, Op::Conv2dInputGrad(gy, w, g), &[gy, w]);
        }
        let (gs, ws) = (flat(self.value(gy)), flat(self.value(w)));
        let mut out = vec![F::zero(); g.n * g.c * g.h * g.w];
        for_each_group(&g, false, |first, count, ld, cols, wide| {
            side_by_side(gs, &g, first, count, wide);
            gemm(
                mat(ws, g.o, ckk),
                mat(wide, g.o, ld),
                true,
                false,
                &mut mat_mut(cols, ckk, ld),
                F::zero(),
            );
            let xo = &mut out[first * g.c * g.h * g.w..];
            for (s, xo) in xo.chunks_exact_mut(g.c * g.h * g.w).take(count).enumerate() {
                col2im(&mut cols[s * hw..], &g, xo, ld);
            }
        });
        let value = from_vec(&[g.n, g.c, g.h, g.w], out);
        self.push(value, Op::Conv2dInputGrad(gy, w, g), &[gy, w])
    }

    /// The adjoint of [`Tape::conv2d`] in its weight: `Σₙ gyₙ · im2col(xₙ)ᵀ`, shaped like
    /// the weight `[O, C, kh, kw]`.
    #[track_caller]
    pub fn conv2d_weight_grad(&mut self, x: Var, gy: Var, g: ConvGeom) -> Var {
        let value = self.weight_grad(x, gy, g, None);
        self.push(value, Op::Conv2dWeightGrad(x, gy, g), &[x, gy])
    }

    /// The backward rule of [`Tape::conv2d_bias`] in its weight and bias, fused (no graph
    /// is recorded): the weight adjoint, and the bias gradient `Σ gy` over N, H, W summed
    /// from each block of `gy` while the adjoint has it in cache (in f64 per block, so its
    /// last bits may differ from the recorded form's `sum_axes`). Returns constants.
    /// Not for an empty geometry (the caller takes the recorded form's ops there).
    pub(crate) fn conv2d_weight_bias_grad_fused(
        &mut self,
        x: Var,
        gy: Var,
        g: ConvGeom,
    ) -> [Var; 2] {
        let mut sums = vec![0.0f64; g.o];
        let dw = self.weight_grad(x, gy, g, Some(&mut sums));
        let db = from_vec(&[g.o], sums.into_iter().map(F::c).collect());
        [self.constant(dw), self.constant(db)]
    }

    /// The value of [`Tape::conv2d_weight_grad`]; with `sums`, also adds each output
    /// channel's sum of `gy` to it.
    #[track_caller]
    fn weight_grad(&self, x: Var, gy: Var, g: ConvGeom, mut sums: Option<&mut [f64]>) -> ArrayD<F> {
        let (hw, ckk) = (g.ho() * g.wo(), g.c * g.kh * g.kw);
        assert!(
            self.shape(gy) == [g.n, g.o, g.ho(), g.wo()] && self.shape(x) == [g.n, g.c, g.h, g.w],
            "metagrad::conv2d_weight_grad: input {:?} and gradient {:?} do not fit {g:?}",
            self.shape(x),
            self.shape(gy)
        );
        if g.is_empty() {
            return ArrayD::zeros(IxDyn(&[g.o, g.c, g.kh, g.kw]));
        }
        let (xs, gs) = (flat(self.value(x)), flat(self.value(gy)));
        // The transpose `[C·kh·kw, O]` is accumulated: the matrix kernels then pack the
        // narrow `gy` operand instead of the columns (measured faster).
        let mut outt = vec![F::zero(); ckk * g.o];
        for_each_group(&g, false, |first, count, ld, cols, wide| {
            side_by_side(gs, &g, first, count, wide);
            if let Some(sums) = sums.as_deref_mut() {
                for (sum, row) in sums.iter_mut().zip(wide.chunks_exact(ld)) {
                    *sum += sum_slice(row).f64();
                }
            }
            for s in 0..count {
                im2col(sample(xs, &g, first + s), &g, &mut cols[s * hw..], ld);
            }
            gemm(
                mat(cols, ckk, ld),
                mat(wide, g.o, ld),
                false,
                true,
                &mut mat_mut(&mut outt, ckk, g.o),
                F::one(),
            );
        });
        let out: Vec<F> = (0..g.o * ckk)
            .map(|i| outt[(i % ckk) * g.o + i / ckk])
            .collect();
        from_vec(&[g.o, g.c, g.kh, g.kw], out)
    }

    /// Max-pooling of `x: [N, C, H, W]` with a `k × k` window and the given stride, no
    /// padding (rows and columns that do not fill a window are dropped, as in PyTorch).
    /// The gradient goes to the first maximal element of each window.
    ///
    /// # Panics
    /// If `x` is not 4-D, `k` or `stride` is zero, or the window is larger than the input.
    #[track_caller]
    pub fn max_pool2d(&mut self, x: Var, k: usize, stride: usize) -> Var {
        self.max_pool_gather("max_pool2d", x, k, stride, false)
    }

    /// `relu(max_pool2d(x))`, which equals max-pooling the ReLU (ReLU is monotone), as one
    /// gather: a window whose maximum is not positive reads no element. The same values
    /// and gradients as the two ops, in one pass over `x`.
    ///
    /// # Panics
    /// As [`Tape::max_pool2d`].
    #[track_caller]
    pub fn relu_max_pool2d(&mut self, x: Var, k: usize, stride: usize) -> Var {
        self.max_pool_gather("relu_max_pool2d", x, k, stride, true)
    }

    /// Max-pooling as a [`Gather`] of each window's first maximal element; with `relu`,
    /// windows whose maximum is not positive read nothing (zero).
    #[track_caller]
    fn max_pool_gather(&mut self, name: &str, x: Var, k: usize, stride: usize, relu: bool) -> Var {
        let s = self.shape(x).to_vec();
        check_pool(name, &s, k, stride);
        let (value, map) = max_pool::<F, true>(flat(self.value(x)), &s, k, stride, relu, |_| {
            (F::one(), F::zero())
        });
        self.push(value, Op::Gather(x, Arc::new(map)), &[x])
    }

    /// Average pooling of `x: [N, C, H, W]` with a `k × k` window and the given stride, no
    /// padding.
    ///
    /// # Panics
    /// As [`Tape::max_pool2d`].
    #[track_caller]
    pub fn avg_pool2d(&mut self, x: Var, k: usize, stride: usize) -> Var {
        let (idx, out_shape) = self.pool_windows("avg_pool2d", x, k, stride);
        let mut win_shape = out_shape;
        win_shape.push(k * k);
        let map = Gather {
            src: idx,
            in_shape: self.shape(x).to_vec(),
            out_shape: win_shape,
        };
        let windows = self.gather(x, Arc::new(map));
        self.mean_axes(windows, &[4], false)
    }

    /// Global average pooling: `[N, C, H, W]` → `[N, C]`.
    ///
    /// # Panics
    /// If `x` is not 4-D.
    #[track_caller]
    pub fn global_avg_pool(&mut self, x: Var) -> Var {
        assert!(
            self.shape(x).len() == 4,
            "metagrad::global_avg_pool: expected [N, C, H, W], got {:?}",
            self.shape(x)
        );
        self.mean_axes(x, &[2, 3], false)
    }

    /// Flat input indices of every pooling window, window by window, and the output shape.
    #[track_caller]
    fn pool_windows(
        &self,
        name: &str,
        x: Var,
        k: usize,
        stride: usize,
    ) -> (Vec<usize>, Vec<usize>) {
        let s = self.shape(x);
        check_pool(name, s, k, stride);
        let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
        let (ho, wo) = ((h - k) / stride + 1, (w - k) / stride + 1);
        let mut idx = Vec::with_capacity(n * c * ho * wo * k * k);
        for plane in 0..n * c {
            for oh in 0..ho {
                for ow in 0..wo {
                    for i in 0..k {
                        let row = plane * h * w + (oh * stride + i) * w + ow * stride;
                        idx.extend(row..row + k);
                    }
                }
            }
        }
        (idx, vec![n, c, ho, wo])
    }
}
