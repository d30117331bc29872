//! Matrix multiplication, 2-D and batched.

use super::from_vec;
use super::small_matmul::{batched_matmul, Operand};
use crate::tape::{Op, Tape, Var};
use crate::Float;
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayD, ArrayView2, ArrayViewMut2, Axis, Ix2, Ix3};
use std::any::TypeId;

/// Products up to this many multiply-adds skip the blocked kernels, whose set-up costs
/// more than the arithmetic at the sizes of sinusoid MLPs.
pub(crate) const SMALL: usize = 2048;

/// `c = a b + beta·c` for small products, without the blocked kernels' set-up: an axpy
/// loop when rows of `b` are contiguous, dot products when rows of `a` and columns of `b`
/// are, plain loops otherwise. `c` has contiguous rows.
fn small_gemm<F: Float>(
    a: ArrayView2<'_, F>,
    b: ArrayView2<'_, F>,
    c: &mut ArrayViewMut2<'_, F>,
    beta: F,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { small_gemm_avx512(a, b, c, beta) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { small_gemm_avx2(a, b, c, beta) };
        }
    }
    small_gemm_body(a, b, c, beta)
}

/// [`small_gemm_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn small_gemm_avx512<F: Float>(
    a: ArrayView2<'_, F>,
    b: ArrayView2<'_, F>,
    c: &mut ArrayViewMut2<'_, F>,
    beta: F,
) {
    small_gemm_body(a, b, c, beta)
}

/// [`small_gemm_body`] compiled for AVX2 with FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_gemm_avx2<F: Float>(
    a: ArrayView2<'_, F>,
    b: ArrayView2<'_, F>,
    c: &mut ArrayViewMut2<'_, F>,
    beta: F,
) {
    small_gemm_body(a, b, c, beta)
}

#[inline(always)]
fn small_gemm_body<F: Float>(
    a: ArrayView2<'_, F>,
    b: ArrayView2<'_, F>,
    c: &mut ArrayViewMut2<'_, F>,
    beta: F,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (sa0, sa1) = (a.strides()[0], a.strides()[1]);
    let (sb0, sb1) = (b.strides()[0], b.strides()[1]);
    // SAFETY: every offset below is that of an element (i, p) with i < m, p < k of `a`, or
    // (p, j) with p < k, j < n of `b`, so it lies inside the view's allocation; the
    // slices made from raw parts span elements of one row (stride 1) or one column
    // (stride 1) of a view. `c` is a distinct, mutably borrowed array.
    let at = |i: usize, p: usize| unsafe { *pa.offset(i as isize * sa0 + p as isize * sa1) };
    for i in 0..m {
        let mut crow = c.row_mut(i);
        let crow = crow.as_slice_mut().expect("row-contiguous output");
        if beta == F::zero() {
            crow.fill(F::zero());
        } else if beta != F::one() {
            crow.iter_mut().for_each(|v| *v *= beta);
        }
        if sb1 == 1 {
            for p in 0..k {
                let aip = at(i, p);
                let brow = unsafe { std::slice::from_raw_parts(pb.offset(p as isize * sb0), n) };
                crow.iter_mut().zip(brow).for_each(|(c, &b)| *c += aip * b);
            }
        } else if sa1 == 1 && sb0 == 1 {
            let arow = unsafe { std::slice::from_raw_parts(pa.offset(i as isize * sa0), k) };
            for (j, cj) in crow.iter_mut().enumerate() {
                let bcol = unsafe { std::slice::from_raw_parts(pb.offset(j as isize * sb1), k) };
                *cj += dot(arow, bcol);
            }
        } else {
            for (j, cj) in crow.iter_mut().enumerate() {
                let mut acc = F::zero();
                for p in 0..k {
                    acc += at(i, p) * unsafe { *pb.offset(p as isize * sb0 + j as isize * sb1) };
                }
                *cj += acc;
            }
        }
    }
}

/// A dot product with sixteen running sums (so the loop vectorises).
#[inline(always)]
fn dot<F: Float>(x: &[F], y: &[F]) -> F {
    let mut acc = [F::zero(); 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (p, q) in xc.zip(yc) {
        for l in 0..16 {
            acc[l] += p[l] * q[l];
        }
    }
    let mut s = acc.iter().fold(F::zero(), |s, &v| s + v);
    for (&p, &q) in xr.iter().zip(yr) {
        s += p * q;
    }
    s
}

/// Products with at most this many multiply-adds per batch element run on
/// [`batched_matmul`], one call for the whole batch; larger ones on the blocked kernels.
const BATCHED_SMALL: usize = 64 * 64 * 64;

/// `c = op(a) op(b) + beta·c` into a row-major output, `op` transposing where the flag is
/// set (the views may be strided or transposed; no copy is made).
///
/// `f32` and `f64` run on the `gemm` crate's kernels (AVX-512 / AVX2+FMA chosen at run
/// time, single-threaded: the library parallelises across tasks); any other `Float` falls
/// back to `ndarray`'s `general_mat_mul`.
pub(crate) fn gemm<F: Float>(
    a: ArrayView2<'_, F>,
    b: ArrayView2<'_, F>,
    ta: bool,
    tb: bool,
    c: &mut ArrayViewMut2<'_, F>,
    beta: F,
) {
    let a = if ta { a.reversed_axes() } else { a };
    let b = if tb { b.reversed_axes() } else { b };
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert!(
        k == k2 && c.dim() == (m, n),
        "metagrad::gemm: [{m}x{k}]·[{k2}x{n}] into {:?}",
        c.dim()
    );
    if k == 0 || m == 0 || n == 0 {
        c.mapv_inplace(|v| v * beta);
        return;
    }
    if m * n * k <= SMALL && c.strides()[1] == 1 {
        small_gemm(a, b, c, beta);
        return;
    }
    let is = |t: TypeId| TypeId::of::<F>() == t;
    if !(is(TypeId::of::<f32>()) || is(TypeId::of::<f64>())) {
        general_mat_mul(F::one(), &a, &b, beta, c);
        return;
    }
    let (sa, sb) = (a.strides(), b.strides());
    let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
    let read_dst = beta != F::zero();
    // SAFETY: `F` is `f32` or `f64` (checked above), which `gemm::gemm` supports. The
    // pointers and element strides describe the three views, whose shapes agree (asserted);
    // `c` is borrowed mutably, so it overlaps neither input. The gemm crate computes
    // `dst = alpha·dst + beta·lhs·rhs`, reading `dst` only when `read_dst` is set, so our
    // `beta` is its `alpha` and its `beta` is one.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs,
            c_rs,
            read_dst,
            a.as_ptr(),
            sa[1],
            sa[0],
            b.as_ptr(),
            sb[1],
            sb[0],
            beta,
            F::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

impl<F: Float> Tape<F> {
    /// Matrix product `a @ b` of 2-D tensors `[m, k] @ [k, n]`, or batched 3-D tensors
    /// `[B, m, k] @ [B, k, n]`.
    ///
    /// # Panics
    /// If the ranks or inner dimensions do not match; the message gives both shapes.
    #[track_caller]
    pub fn matmul(&mut self, a: Var, b: Var) -> Var {
        self.matmul_t(a, b, false, false)
    }

    /// `op(a) @ op(b)`, where `op` swaps the last two axes of an operand whose flag is
    /// set; no transposed copy is made.
    ///
    /// # Panics
    /// If the ranks or inner dimensions do not match.
    #[track_caller]
    pub fn matmul_t(&mut self, a: Var, b: Var, ta: bool, tb: bool) -> Var {
        let (x, y) = (self.value(a), self.value(b));
        let (sa, sb) = (x.shape(), y.shape());
        let dims = |s: &[usize], t: bool| {
            let r = s.len();
            if t {
                (s[r - 1], s[r - 2])
            } else {
                (s[r - 2], s[r - 1])
            }
        };
        let ok_rank =
            (sa.len() == 2 && sb.len() == 2) || (sa.len() == 3 && sb.len() == 3 && sa[0] == sb[0]);
        assert!(
            ok_rank,
            "metagrad::matmul: shapes {sa:?} and {sb:?}: need two 2-D tensors or two 3-D \
             tensors with the same batch size"
        );
        let ((m, k), (k2, n)) = (dims(sa, ta), dims(sb, tb));
        assert!(
            k == k2,
            "metagrad::matmul: inner dimensions differ: shapes {sa:?}{} and {sb:?}{}",
            if ta { "ᵀ" } else { "" },
            if tb { "ᵀ" } else { "" }
        );
        let batch = if sa.len() == 3 { sa[0] } else { 1 };
        if m * n * k <= BATCHED_SMALL {
            let operand = |v: &ArrayD<F>, t: bool| {
                let s = v.shape();
                let r = s.len();
                let (rows, cols) = (s[r - 2], s[r - 1]);
                let op = Operand {
                    ptr: v.as_ptr(),
                    sb: (rows * cols) as isize,
                    s0: cols as isize,
                    s1: 1,
                };
                if t {
                    op.transposed()
                } else {
                    op
                }
            };
            let (oa, ob) = (operand(x, ta), operand(y, tb));
            let len = batch * m * n;
            let mut out = Vec::with_capacity(len);
            // SAFETY: the operands describe the row-major values `x` and `y` (shapes
            // checked above), which `out`, a new vector, does not overlap; the kernel
            // writes all `len` elements, so they are initialised when the length is set.
            unsafe {
                batched_matmul(
                    batch,
                    (m, n, k),
                    oa,
                    ob,
                    &mut out.spare_capacity_mut()[..len],
                );
                out.set_len(len);
            }
            let shape: &[usize] = if sa.len() == 2 {
                &[m, n]
            } else {
                &[batch, m, n]
            };
            let value = from_vec(shape, out);
            return self.push(value, Op::MatMul { a, b, ta, tb }, &[a, b]);
        }
        let value = if sa.len() == 2 {
            let mut out = from_vec(&[m, n], vec![F::zero(); m * n]);
            let mut c = out.view_mut().into_dimensionality::<Ix2>().expect("2-D");
            let av = x.view().into_dimensionality::<Ix2>().expect("2-D");
            let bv = y.view().into_dimensionality::<Ix2>().expect("2-D");
            gemm(av, bv, ta, tb, &mut c, F::zero());
            out
        } else {
            let batch = sa[0];
            let mut out = from_vec(&[batch, m, n], vec![F::zero(); batch * m * n]);
            {
                let mut o3 = out.view_mut().into_dimensionality::<Ix3>().expect("3-D");
                let a3 = x.view().into_dimensionality::<Ix3>().expect("3-D");
                let b3 = y.view().into_dimensionality::<Ix3>().expect("3-D");
                for i in 0..batch {
                    let mut c = o3.index_axis_mut(Axis(0), i);
                    gemm(
                        a3.index_axis(Axis(0), i),
                        b3.index_axis(Axis(0), i),
                        ta,
                        tb,
                        &mut c,
                        F::zero(),
                    );
                }
            }
            out
        };
        self.push(value, Op::MatMul { a, b, ta, tb }, &[a, b])
    }
}

#[cfg(test)]
mod tests {
    use crate::Tape;
    use ndarray::{ArrayD, IxDyn};

    /// Products on both sides of [`super::BATCHED_SMALL`] (the batched kernel and the
    /// blocked kernels), with every transposition, agree with the definition summed in
    /// `f64`; a NaN in one operand reaches exactly its row (or column) of the product.
    #[test]
    fn both_kernels_match_the_definition_and_keep_nan() {
        for (m, n, k) in [(10, 40, 40), (70, 66, 65)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let sa = if ta { [2, k, m] } else { [2, m, k] };
                let sb = if tb { [2, n, k] } else { [2, k, n] };
                let mut a = ArrayD::from_shape_fn(IxDyn(&sa), |i| {
                    ((i[0] * 7 + i[1] * 3 + i[2]) % 13) as f32 * 0.25 - 1.5
                });
                let b = ArrayD::from_shape_fn(IxDyn(&sb), |i| {
                    ((i[0] * 5 + i[1] + i[2] * 11) % 17) as f32 * 0.125 - 1.0
                });
                // A NaN at row 3, inner index 2 of batch element 1.
                let nan_at = if ta { [1, 2, 3] } else { [1, 3, 2] };
                a[IxDyn(&nan_at)] = f32::NAN;
                let mut t = Tape::<f32>::new();
                let (va, vb) = (t.constant(a.clone()), t.constant(b.clone()));
                let y = t.matmul_t(va, vb, ta, tb);
                let y = t.value(y);
                assert_eq!(y.shape(), &[2, m, n]);
                for bi in 0..2 {
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|p| {
                                    let x = if ta { a[[bi, p, i]] } else { a[[bi, i, p]] };
                                    let z = if tb { b[[bi, j, p]] } else { b[[bi, p, j]] };
                                    x as f64 * z as f64
                                })
                                .sum();
                            let got = y[[bi, i, j]];
                            if bi == 1 && i == 3 {
                                assert!(got.is_nan(), "({m},{n},{k}) {ta} {tb}: NaN lost");
                            } else {
                                let tol = 1e-5 * (k as f64) * 4.0;
                                assert!(
                                    (got as f64 - want).abs() <= tol,
                                    "({m},{n},{k}) {ta} {tb} at {bi},{i},{j}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
