//! Batched products of small matrices in one call: `c[b] = a[b] · b[b]` for every batch
//! element, register-blocked with explicit AVX-512 or AVX2 fused multiply-adds (chosen at
//! run time), without the blocked kernels' set-up per product.
//!
//! Every output element is one chain of fused multiply-adds over the inner index in
//! order, starting from zero, whatever the tiling, the instruction set or the thread
//! count: the result depends only on the operands (the portable loop computes the same
//! chain with `mul_add`). A product is never skipped, so NaN and infinities propagate as
//! the formula says (`0 · NaN` is NaN).

use crate::Float;
use std::any::TypeId;
use std::mem::MaybeUninit;

/// One operand of a batched product after transposition: element `(b, i, p)` lies at
/// `ptr + b·sb + i·s0 + p·s1` (element strides).
#[derive(Debug)]
pub(crate) struct Operand<F> {
    pub ptr: *const F,
    pub sb: isize,
    pub s0: isize,
    pub s1: isize,
}

impl<F> Clone for Operand<F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F> Copy for Operand<F> {}

impl<F> Operand<F> {
    /// The operand with its last two axes swapped.
    pub fn transposed(self) -> Self {
        Operand {
            s0: self.s1,
            s1: self.s0,
            ..self
        }
    }

    fn cast<G>(self) -> Operand<G> {
        Operand {
            ptr: self.ptr.cast(),
            sb: self.sb,
            s0: self.s0,
            s1: self.s1,
        }
    }
}

/// Most output rows one tile holds in registers.
const MAX_ROWS: usize = 6;

/// How a product is laid out for the kernels: `c = a b` with `c`'s element `(b, i, j)` at
/// `b·m·n + i·cs0 + j·cs1` of the output.
#[derive(Clone, Copy, Debug)]
struct Plan<F> {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: Operand<F>,
    b: Operand<F>,
    cs0: usize,
    cs1: usize,
    /// Whether `b` is copied into a row-contiguous buffer first (its rows are strided).
    pack: bool,
}

impl<F> Plan<F> {
    fn cast<G>(self) -> Plan<G> {
        Plan {
            a: self.a.cast(),
            b: self.b.cast(),
            batch: self.batch,
            m: self.m,
            n: self.n,
            k: self.k,
            cs0: self.cs0,
            cs1: self.cs1,
            pack: self.pack,
        }
    }
}

/// `out[b] = a[b] · b[b]` for `batch` products `[m, k] · [k, n]`, `out` row-major
/// `[batch, m, n]`; every element of `out` is written (it may start uninitialised).
///
/// # Safety
/// `a` and `b` must describe `batch` readable `[m, k]` and `[k, n]` operands (every
/// element offset in bounds of one allocation), none overlapping `out`.
pub(crate) unsafe fn batched_matmul<F: Float>(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: Operand<F>,
    b: Operand<F>,
    out: &mut [MaybeUninit<F>],
) {
    assert_eq!(
        out.len(),
        batch * m * n,
        "metagrad::batched_matmul: output size"
    );
    if out.is_empty() {
        return;
    }
    if k == 0 {
        out.iter_mut().for_each(|v| {
            v.write(F::zero());
        });
        return;
    }
    let is = |t: TypeId| TypeId::of::<F>() == t;
    let lanes = if is(TypeId::of::<f32>()) { 16 } else { 8 };
    let plan = plan(batch, (m, n, k), a, b, lanes);
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let o = out.as_mut_ptr().cast::<F>();
        // SAFETY: `F` is the type each branch casts to (its `TypeId` was compared), the
        // CPU has the instruction set each kernel is compiled for (detected just above),
        // and the plan describes the caller's operands and `out`'s `batch·m·n` elements.
        unsafe {
            if is(TypeId::of::<f32>()) && avx512 {
                return avx512_f32::run(plan.cast(), o.cast());
            }
            if is(TypeId::of::<f64>()) && avx512 {
                return avx512_f64::run(plan.cast(), o.cast());
            }
            if is(TypeId::of::<f32>()) && avx2 {
                return avx2_f32::run(plan.cast(), o.cast());
            }
            if is(TypeId::of::<f64>()) && avx2 {
                return avx2_f64::run(plan.cast(), o.cast());
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { portable(plan, out) }
}

/// Chooses the orientation: `c = a b` row by row, or `cᵀ = bᵀ aᵀ` written transposed,
/// whichever costs fewer vector multiply-adds plus copies of strided `b` rows.
fn plan<F>(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: Operand<F>,
    b: Operand<F>,
    lanes: usize,
) -> Plan<F> {
    // Copying a `b` whose columns are contiguous runs on block transposes, a quarter of
    // the cost of copying element by element.
    let pack_cost = |op: &Operand<F>, cols: usize| match (op.s1, op.s0) {
        (1, _) => 0,
        (_, 1) => k * cols / 4,
        _ => k * cols,
    };
    let cost = |rows: usize, cols: usize, b: &Operand<F>| {
        k * rows * cols.div_ceil(lanes) + pack_cost(b, cols)
    };
    let (pack, tpack) = (b.s1 != 1, a.s0 != 1);
    if cost(n, m, &a.transposed()) < cost(m, n, &b) {
        Plan {
            batch,
            m: n,
            n: m,
            k,
            a: b.transposed(),
            b: a.transposed(),
            cs0: 1,
            cs1: n,
            pack: tpack,
        }
    } else {
        Plan {
            batch,
            m,
            n,
            k,
            a,
            b,
            cs0: n,
            cs1: 1,
            pack,
        }
    }
}

/// Splits `m` rows into `ceil(m / MAX_ROWS)` tiles whose sizes differ by at most one.
fn row_tiles(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let tiles = m.div_ceil(MAX_ROWS);
    let (base, extra) = (m / tiles, m % tiles);
    (0..tiles).map(move |t| {
        let start = t * base + t.min(extra);
        (start, base + usize::from(t < extra))
    })
}

/// The plan with plain loops (`mul_add` chains in the kernels' order).
///
/// # Safety
/// As [`batched_matmul`], for the plan's operands.
unsafe fn portable<F: Float>(p: Plan<F>, out: &mut [MaybeUninit<F>]) {
    let mn = p.m * p.n;
    for bi in 0..p.batch {
        let ab = p.a.ptr.wrapping_offset(bi as isize * p.a.sb);
        let bb = p.b.ptr.wrapping_offset(bi as isize * p.b.sb);
        for i in 0..p.m {
            for j in 0..p.n {
                let mut acc = F::zero();
                for q in 0..p.k {
                    let (q, i, j) = (q as isize, i as isize, j as isize);
                    // SAFETY: i < m, j < n, q < k: elements of this batch's operands.
                    let (x, y) = unsafe {
                        (
                            *ab.offset(i * p.a.s0 + q * p.a.s1),
                            *bb.offset(q * p.b.s0 + j * p.b.s1),
                        )
                    };
                    acc = x.mul_add(y, acc);
                }
                out[bi * mn + i * p.cs0 + j * p.cs1].write(acc);
            }
        }
    }
}

/// The kernels for one element type and instruction set.
macro_rules! simd_kernels {
    (
        $name:ident, $feature:literal, $t:ty, $v:ty, lanes: $lanes:literal, max_vecs: $max_vecs:literal,
        zero: $zero:ident, splat: $splat:ident, fma: $fma:ident, store: $store:ident,
        transpose: $transpose:path, tblock: $tblock:literal,
        load: |$lp:ident| $load:expr,
        mask: $mask:ty = |$kn:ident| $make_mask:expr,
        load_masked: |$mp:ident, $mm:ident| $load_masked:expr,
        store_masked: |$sp:ident, $sm:ident, $sx:ident| $store_masked:expr $(,)?
    ) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use super::{row_tiles, Plan};
            #[allow(unused_imports)]
            use super::{transpose4x4_f64, transpose8x8_f32};
            #[allow(unused_imports)]
            use std::arch::x86_64::*;

            const LANES: usize = $lanes;

            /// A full vector from `$lp`.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn load($lp: *const $t) -> $v {
                // SAFETY: the caller passes `LANES` readable elements.
                unsafe { $load }
            }

            /// The mask of the first `$kn` (1..=`LANES`) lanes.
            #[inline]
            #[target_feature(enable = $feature)]
            fn make_mask($kn: usize) -> $mask {
                $make_mask
            }

            /// The lanes of `$mp` that mask `$mm` selects, zeros elsewhere; only those
            /// elements are read.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn load_masked($mp: *const $t, $mm: $mask) -> $v {
                // SAFETY: the caller passes readable elements where the mask is set; the
                // other lanes are not accessed.
                unsafe { $load_masked }
            }

            /// Writes the lanes of `$sx` that mask `$sm` selects to `$sp`; only those
            /// elements are accessed.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn store_masked($sp: *mut $t, $sm: $mask, $sx: $v) {
                // SAFETY: the caller passes writable elements where the mask is set; the
                // other lanes are not accessed.
                unsafe { $store_masked }
            }

            /// Rows `i0..i0 + R` and columns `j0..j0 + cols` of one product, `V` vectors
            /// wide (the last one holding `cols - (V - 1)·LANES` columns): for each `q` in
            /// order, `acc[r][v] = fma(a[r, q], b[q, v], acc[r][v])`.
            ///
            /// # Safety
            /// `a` points at row `i0` of this batch element's `a` (strides `s0`, `s1`), `b`
            /// at column `j0` of row 0 of a row-contiguous `b` with row stride `bs0`, and
            /// `out` at this batch element's output; all of `R` rows, `k` inner elements
            /// and `cols` columns are in bounds.
            #[inline]
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn tile<const R: usize, const V: usize>(
                k: usize,
                a: *const $t,
                (s0, s1): (isize, isize),
                b: *const $t,
                bs0: isize,
                cols: usize,
                out: *mut $t,
                (i0, j0, cs0, cs1): (usize, usize, usize, usize),
            ) {
                let tail = cols - (V - 1) * LANES;
                let mask = make_mask(tail);
                let mut acc = [[$zero(); V]; R];
                let rows: [*const $t; R] =
                    std::array::from_fn(|r| a.wrapping_offset(r as isize * s0));
                let (mut qa, mut bp) = (0isize, b);
                for _ in 0..k {
                    // SAFETY: columns j0.. of row q, `tail` of them in the last vector
                    // (the caller's contract).
                    let bv: [$v; V] = std::array::from_fn(|v| unsafe {
                        if v + 1 < V {
                            load(bp.add(v * LANES))
                        } else {
                            load_masked(bp.add(v * LANES), mask)
                        }
                    });
                    for (accr, row) in acc.iter_mut().zip(&rows) {
                        // SAFETY: row i0 + r < m, column q < k of `a`.
                        let x = $splat(unsafe { *row.offset(qa) });
                        for (c, &y) in accr.iter_mut().zip(&bv) {
                            *c = $fma(x, y, *c);
                        }
                    }
                    qa += s1;
                    bp = bp.wrapping_offset(bs0);
                }
                for (r, accr) in acc.iter().enumerate() {
                    let row = (i0 + r) * cs0 + j0 * cs1;
                    // SAFETY: output rows i0 + r < m and columns j0 + c < cols (the
                    // caller's contract); `buf` holds 4 ≥ V vectors.
                    unsafe {
                        if cs1 == 1 {
                            for (v, &x) in accr.iter().enumerate() {
                                let o = out.add(row + v * LANES);
                                if v + 1 < V {
                                    $store(o, x);
                                } else {
                                    store_masked(o, mask, x);
                                }
                            }
                        } else {
                            let mut buf = [0.0 as $t; LANES * 4];
                            for (v, &x) in accr.iter().enumerate() {
                                $store(buf.as_mut_ptr().add(v * LANES), x);
                            }
                            for (c, &x) in buf[..cols].iter().enumerate() {
                                *out.add(row + c * cs1) = x;
                            }
                        }
                    }
                }
            }

            /// Copies `b` (`[k, n]`, element `(q, j)` at `b + q·s0 + j·s1`) into `dst`
            /// row-major. Where its columns are contiguous (`s0 == 1`), blocks of
            /// `TBLOCK × TBLOCK` go through an in-register transpose.
            ///
            /// # Safety
            /// Every element of `b` is readable and `dst` holds `k·n` writable elements.
            #[target_feature(enable = $feature)]
            unsafe fn pack(b: *const $t, s0: isize, s1: isize, k: usize, n: usize, dst: *mut $t) {
                const TBLOCK: usize = $tblock;
                let (mut jb, mut qb) = (0, 0);
                if s0 == 1 {
                    (jb, qb) = (n - n % TBLOCK, k - k % TBLOCK);
                    for j in (0..jb).step_by(TBLOCK) {
                        for q in (0..qb).step_by(TBLOCK) {
                            // SAFETY: columns j..j + TBLOCK ≤ n and rows q..q + TBLOCK ≤ k
                            // of `b`, and the same block of `dst`.
                            unsafe {
                                $transpose(
                                    b.offset(j as isize * s1 + q as isize),
                                    s1,
                                    dst.add(q * n + j),
                                    n,
                                )
                            };
                        }
                    }
                }
                // What the blocks left: the last rows of the blocked columns, then the
                // columns after them (all of `b` without blocks).
                for q in qb..k {
                    for j in 0..jb {
                        // SAFETY: element (q, j) of `b` and of `dst`.
                        unsafe {
                            *dst.add(q * n + j) = *b.offset(q as isize * s0 + j as isize * s1)
                        };
                    }
                }
                for j in jb..n {
                    for q in 0..k {
                        // SAFETY: element (q, j) of `b` and of `dst`.
                        unsafe {
                            *dst.add(q * n + j) = *b.offset(q as isize * s0 + j as isize * s1)
                        };
                    }
                }
            }

            /// Runs a plan.
            ///
            /// # Safety
            /// The CPU supports the instruction set; the plan's operands are readable and
            /// `out` holds `batch·m·n` writable elements that overlap neither.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn run(p: Plan<$t>, out: *mut $t) {
                let (m, n, k) = (p.m, p.n, p.k);
                let vecs = n.div_ceil(LANES);
                // Column tiles of at most `$max_vecs` vectors, sizes differing by at most
                // one vector.
                let ctiles = vecs.div_ceil($max_vecs);
                let mut packed: Vec<$t> = if p.pack { vec![0.0; k * n] } else { Vec::new() };
                for bi in 0..p.batch {
                    let ab = p.a.ptr.wrapping_offset(bi as isize * p.a.sb);
                    let mut bb = p.b.ptr.wrapping_offset(bi as isize * p.b.sb);
                    let mut bs0 = p.b.s0;
                    if p.pack {
                        // SAFETY: `b` is this batch element's `[k, n]` operand and `packed`
                        // holds `k·n` elements.
                        unsafe { pack(bb, p.b.s0, p.b.s1, k, n, packed.as_mut_ptr()) };
                        bb = packed.as_ptr();
                        bs0 = n as isize;
                    }
                    // SAFETY: this batch element's block of `batch·m·n` output elements.
                    let ob = unsafe { out.add(bi * m * n) };
                    for (i0, rows) in row_tiles(m) {
                        let ai = ab.wrapping_offset(i0 as isize * p.a.s0);
                        let (vbase, vextra) = (vecs / ctiles, vecs % ctiles);
                        let mut j0 = 0;
                        for ct in 0..ctiles {
                            let v = vbase + usize::from(ct < vextra);
                            let cols = (v * LANES).min(n - j0);
                            let bj = bb.wrapping_add(j0);
                            let s = (p.a.s0, p.a.s1);
                            let o = (i0, j0, p.cs0, p.cs1);
                            // SAFETY: rows i0..i0 + rows ≤ m, columns j0..j0 + cols ≤ n, `b`
                            // row-contiguous (packed where it was not).
                            unsafe {
                                dispatch!(rows, v, tile, (k, ai, s, bj, bs0, cols, ob, o));
                            }
                            j0 += cols;
                        }
                    }
                }
            }
        }
    };
}

/// Calls `$f::<R, V>(args)` for run-time `rows` (1..=6) and `vecs` (1..=4).
macro_rules! dispatch {
    ($rows:expr, $vecs:expr, $f:ident, $args:tt) => {
        match ($rows, $vecs) {
            (1, 1) => dispatch!(@call $f, 1, 1, $args),
            (1, 2) => dispatch!(@call $f, 1, 2, $args),
            (1, 3) => dispatch!(@call $f, 1, 3, $args),
            (1, _) => dispatch!(@call $f, 1, 4, $args),
            (2, 1) => dispatch!(@call $f, 2, 1, $args),
            (2, 2) => dispatch!(@call $f, 2, 2, $args),
            (2, 3) => dispatch!(@call $f, 2, 3, $args),
            (2, _) => dispatch!(@call $f, 2, 4, $args),
            (3, 1) => dispatch!(@call $f, 3, 1, $args),
            (3, 2) => dispatch!(@call $f, 3, 2, $args),
            (3, 3) => dispatch!(@call $f, 3, 3, $args),
            (3, _) => dispatch!(@call $f, 3, 4, $args),
            (4, 1) => dispatch!(@call $f, 4, 1, $args),
            (4, 2) => dispatch!(@call $f, 4, 2, $args),
            (4, 3) => dispatch!(@call $f, 4, 3, $args),
            (4, _) => dispatch!(@call $f, 4, 4, $args),
            (5, 1) => dispatch!(@call $f, 5, 1, $args),
            (5, 2) => dispatch!(@call $f, 5, 2, $args),
            (5, 3) => dispatch!(@call $f, 5, 3, $args),
            (5, _) => dispatch!(@call $f, 5, 4, $args),
            (_, 1) => dispatch!(@call $f, 6, 1, $args),
            (_, 2) => dispatch!(@call $f, 6, 2, $args),
            (_, 3) => dispatch!(@call $f, 6, 3, $args),
            (_, _) => dispatch!(@call $f, 6, 4, $args),
        }
    };
    (@call $f:ident, $r:literal, $v:literal, ($($arg:expr),*)) => {
        $f::<$r, $v>($($arg),*)
    };
}

/// Transposes an 8 × 8 block: row `r` of `src` (8 elements at `src + r·stride`) becomes
/// column `r` of `dst` (rows `dst + c·dst_stride`).
///
/// # Safety
/// The CPU supports AVX; the 64 source and destination elements are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8_f32(src: *const f32, stride: isize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract: rows r < 8 of 8 elements.
    let r: [__m256; 8] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.offset(i as isize * stride)) });
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (c, &v) in out.iter().enumerate() {
        // SAFETY: the caller's contract: rows c < 8 of 8 elements.
        unsafe { _mm256_storeu_ps(dst.add(c * dst_stride), v) };
    }
}

/// Transposes a 4 × 4 block, as [`transpose8x8_f32`].
///
/// # Safety
/// The CPU supports AVX; the 16 source and destination elements are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose4x4_f64(src: *const f64, stride: isize, dst: *mut f64, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract: rows r < 4 of 4 elements.
    let r: [__m256d; 4] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_pd(src.offset(i as isize * stride)) });
    let t0 = _mm256_unpacklo_pd(r[0], r[1]);
    let t1 = _mm256_unpackhi_pd(r[0], r[1]);
    let t2 = _mm256_unpacklo_pd(r[2], r[3]);
    let t3 = _mm256_unpackhi_pd(r[2], r[3]);
    let out = [
        _mm256_permute2f128_pd::<0x20>(t0, t2),
        _mm256_permute2f128_pd::<0x20>(t1, t3),
        _mm256_permute2f128_pd::<0x31>(t0, t2),
        _mm256_permute2f128_pd::<0x31>(t1, t3),
    ];
    for (c, &v) in out.iter().enumerate() {
        // SAFETY: the caller's contract: rows c < 4 of 4 elements.
        unsafe { _mm256_storeu_pd(dst.add(c * dst_stride), v) };
    }
}

simd_kernels!(
    avx512_f32, "avx512f,avx2,fma", f32, __m512, lanes: 16, max_vecs: 4,
    zero: _mm512_setzero_ps, splat: _mm512_set1_ps, fma: _mm512_fmadd_ps, store: _mm512_storeu_ps,
    transpose: transpose8x8_f32, tblock: 8,
    load: |p| _mm512_loadu_ps(p),
    mask: u16 = |n| ((1u32 << n) - 1) as u16,
    load_masked: |p, m| _mm512_maskz_loadu_ps(m, p),
    store_masked: |p, m, x| _mm512_mask_storeu_ps(p, m, x),
);
simd_kernels!(
    avx512_f64, "avx512f,avx2,fma", f64, __m512d, lanes: 8, max_vecs: 4,
    zero: _mm512_setzero_pd, splat: _mm512_set1_pd, fma: _mm512_fmadd_pd, store: _mm512_storeu_pd,
    transpose: transpose4x4_f64, tblock: 4,
    load: |p| _mm512_loadu_pd(p),
    mask: u8 = |n| ((1u32 << n) - 1) as u8,
    load_masked: |p, m| _mm512_maskz_loadu_pd(m, p),
    store_masked: |p, m, x| _mm512_mask_storeu_pd(p, m, x),
);
simd_kernels!(
    avx2_f32, "avx2,fma", f32, __m256, lanes: 8, max_vecs: 2,
    zero: _mm256_setzero_ps, splat: _mm256_set1_ps, fma: _mm256_fmadd_ps, store: _mm256_storeu_ps,
    transpose: transpose8x8_f32, tblock: 8,
    load: |p| _mm256_loadu_ps(p),
    mask: __m256i = |n| _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    ),
    load_masked: |p, m| _mm256_maskload_ps(p, m),
    store_masked: |p, m, x| _mm256_maskstore_ps(p, m, x),
);
simd_kernels!(
    avx2_f64, "avx2,fma", f64, __m256d, lanes: 4, max_vecs: 2,
    zero: _mm256_setzero_pd, splat: _mm256_set1_pd, fma: _mm256_fmadd_pd, store: _mm256_storeu_pd,
    transpose: transpose4x4_f64, tblock: 4,
    load: |p| _mm256_loadu_pd(p),
    mask: __m256i = |n| _mm256_cmpgt_epi64(
        _mm256_set1_epi64x(n as i64),
        _mm256_setr_epi64x(0, 1, 2, 3),
    ),
    load_masked: |p, m| _mm256_maskload_pd(p, m),
    store_masked: |p, m, x| _mm256_maskstore_pd(p, m, x),
);

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random value in [-2, 2), with a NaN, infinities and zeros
    /// sprinkled in when `special` is set.
    fn value(i: usize, special: bool) -> f64 {
        let h = (i as u64 + 1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(17);
        match h % 97 {
            0 if special => f64::NAN,
            1 if special => f64::INFINITY,
            2 if special => f64::NEG_INFINITY,
            3..=9 => 0.0,
            _ => (h >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0,
        }
    }

    fn same<F: Float>(x: F, y: F) -> bool {
        (x.is_nan() && y.is_nan()) || x.f64().to_bits() == y.f64().to_bits()
    }

    /// Every instruction set this CPU has, and the portable loop, give the same bits.
    fn agree<F: Float>() {
        let dims = [0, 1, 2, 3, 5, 7, 8, 9, 10, 16, 17, 31, 33, 40, 65];
        let mut case = 0;
        for &m in &dims {
            for &n in &dims {
                for &k in &[0, 1, 3, 10, 40] {
                    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                        case += 1;
                        let batch = 1 + case % 3;
                        let special = case % 4 == 0;
                        let a: Vec<F> = (0..batch * m * k)
                            .map(|i| F::c(value(i + case * 7919, special)))
                            .collect();
                        let b: Vec<F> = (0..batch * k * n)
                            .map(|i| F::c(value(i + case * 104_729 + 1, special)))
                            .collect();
                        // Stored as [rows, cols] or, transposed, as [cols, rows].
                        let op = |ptr: *const F, rows: usize, cols: usize, t: bool| {
                            let (s0, s1) = if t { (1, rows) } else { (cols, 1) };
                            Operand {
                                ptr,
                                sb: (rows * cols) as isize,
                                s0: s0 as isize,
                                s1: s1 as isize,
                            }
                        };
                        let (oa, ob) = (op(a.as_ptr(), m, k, ta), op(b.as_ptr(), k, n, tb));
                        let mut want = vec![F::zero(); batch * m * n];
                        let mut got = vec![F::zero(); batch * m * n];
                        // The definition, element by element.
                        for bi in 0..batch {
                            for i in 0..m {
                                for j in 0..n {
                                    let mut acc = F::zero();
                                    for q in 0..k {
                                        // SAFETY: elements of `a` and `b`.
                                        let (x, y) = unsafe {
                                            (
                                                *oa.ptr.offset(
                                                    bi as isize * oa.sb
                                                        + i as isize * oa.s0
                                                        + q as isize * oa.s1,
                                                ),
                                                *ob.ptr.offset(
                                                    bi as isize * ob.sb
                                                        + q as isize * ob.s0
                                                        + j as isize * ob.s1,
                                                ),
                                            )
                                        };
                                        acc = x.mul_add(y, acc);
                                    }
                                    want[bi * m * n + i * n + j] = acc;
                                }
                            }
                        }
                        // SAFETY: the operands are `a` and `b` as laid out above.
                        unsafe { batched_matmul(batch, (m, n, k), oa, ob, uninit(&mut got)) };
                        let ok = want.iter().zip(&got).all(|(&x, &y)| same(x, y));
                        assert!(
                            ok,
                            "[{batch}; {m}x{k}{}]·[{k}x{n}{}]",
                            if ta { "ᵀ" } else { "" },
                            if tb { "ᵀ" } else { "" }
                        );
                        if out_is_empty(batch, m, n) || k == 0 {
                            continue;
                        }
                        let is = |t: TypeId| TypeId::of::<F>() == t;
                        let lanes = if is(TypeId::of::<f32>()) { 16 } else { 8 };
                        let p = plan(batch, (m, n, k), oa, ob, lanes);
                        let mut other = vec![F::zero(); batch * m * n];
                        // SAFETY: the plan describes `a` and `b`.
                        unsafe { portable(p, uninit(&mut other)) };
                        assert!(want.iter().zip(&other).all(|(&x, &y)| same(x, y)));
                        #[cfg(target_arch = "x86_64")]
                        if std::arch::is_x86_feature_detected!("avx2")
                            && std::arch::is_x86_feature_detected!("fma")
                        {
                            let mut avx2 = vec![F::zero(); batch * m * n];
                            let p = plan(batch, (m, n, k), oa, ob, lanes / 2);
                            // SAFETY: AVX2 and FMA detected; the plan describes `a`, `b`.
                            unsafe {
                                if is(TypeId::of::<f32>()) {
                                    avx2_f32::run(p.cast(), avx2.as_mut_ptr().cast());
                                } else {
                                    avx2_f64::run(p.cast(), avx2.as_mut_ptr().cast());
                                }
                            }
                            let ok = want.iter().zip(&avx2).all(|(&x, &y)| same(x, y));
                            assert!(ok, "AVX2 [{batch}; {m}x{k}]·[{k}x{n}] {ta} {tb}");
                        }
                    }
                }
            }
        }
    }

    fn uninit<F>(v: &mut [F]) -> &mut [MaybeUninit<F>] {
        // SAFETY: `MaybeUninit<F>` has `F`'s layout, and only initialised values are
        // written through the result.
        unsafe { &mut *(v as *mut [F] as *mut [MaybeUninit<F>]) }
    }

    fn out_is_empty(batch: usize, m: usize, n: usize) -> bool {
        batch * m * n == 0
    }

    #[test]
    fn kernels_agree_bitwise_with_the_definition_f32() {
        agree::<f32>();
    }

    #[test]
    fn kernels_agree_bitwise_with_the_definition_f64() {
        agree::<f64>();
    }
}
