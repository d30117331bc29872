//! Elementwise loops compiled for the widest vector instructions the CPU has.
//!
//! [`dispatch`] runs a closure inside a function compiled for AVX-512 or AVX2 (checked at
//! run time), so the loops inlined into it vectorise with those instructions instead of
//! the baseline's SSE2. Only the instructions change, never the arithmetic: each element
//! is computed by the same IEEE operations in the same order on every path, so the
//! results are bitwise the same.

/// Runs `body` compiled for AVX-512 or AVX2 where the CPU supports them.
#[inline(always)]
pub(crate) fn dispatch<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { avx512(body) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(body) };
        }
    }
    body()
}

/// `body` compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn avx512<R>(body: impl FnOnce() -> R) -> R {
    body()
}

/// `body` compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
    body()
}

/// Appends `f(x)` for each element of `x` to `out` (vectorisable: no index checks).
#[inline(always)]
pub(crate) fn push_map<T: Copy, U>(out: &mut Vec<U>, x: &[T], f: impl Fn(T) -> U) {
    out.reserve(x.len());
    let len = out.len();
    for (o, &v) in out.spare_capacity_mut().iter_mut().zip(x) {
        o.write(f(v));
    }
    // SAFETY: the loop wrote `x.len()` elements after `len` (the capacity allows them).
    unsafe { out.set_len(len + x.len()) };
}

/// Appends `f(x, y)` for each pair of elements of `x` and `y` (one length) to `out`.
#[inline(always)]
pub(crate) fn push_zip<T: Copy, U: Copy, V>(
    out: &mut Vec<V>,
    x: &[T],
    y: &[U],
    f: impl Fn(T, U) -> V,
) {
    assert_eq!(x.len(), y.len(), "metagrad::push_zip: lengths differ");
    out.reserve(x.len());
    let len = out.len();
    for ((o, &p), &q) in out.spare_capacity_mut().iter_mut().zip(x).zip(y) {
        o.write(f(p, q));
    }
    // SAFETY: the loop wrote `x.len()` elements after `len` (the capacity allows them).
    unsafe { out.set_len(len + x.len()) };
}

/// `f(x)` for each element, into a new vector, vectorised with [`dispatch`].
#[inline(always)]
pub(crate) fn map<T: Copy, U>(x: &[T], f: impl Fn(T) -> U) -> Vec<U> {
    dispatch(
        #[inline(always)]
        || {
            let mut out = Vec::with_capacity(x.len());
            push_map(&mut out, x, f);
            out
        },
    )
}

/// `f(x, y)` for each pair of elements of two slices of one length, into a new vector,
/// vectorised with [`dispatch`].
#[inline(always)]
pub(crate) fn zip_map<T: Copy, U: Copy, V>(x: &[T], y: &[U], f: impl Fn(T, U) -> V) -> Vec<V> {
    dispatch(
        #[inline(always)]
        || {
            let mut out = Vec::with_capacity(x.len());
            push_zip(&mut out, x, y, f);
            out
        },
    )
}
