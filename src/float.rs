//! The one float bound every tensor in metagrad uses: `f32` for speed, `f64` for
//! gradient checks.

use ndarray::{LinalgScalar, ScalarOperand};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// A floating-point element type: implemented for `f32` and `f64`.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + LinalgScalar
    + ScalarOperand
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + Serialize
    + DeserializeOwned
    + 'static
{
    /// Converts an `f64` constant to this type (rounding for `f32`): `F::c(0.5)`. Short
    /// because constants are written inside formulas, where `F::from_f64(0.5).unwrap()`
    /// would hide the maths (and `FromPrimitive::from_f64` is already taken).
    fn c(v: f64) -> Self;
    /// Widens to `f64`.
    fn f64(self) -> f64;
    /// IEEE 754-2019 `maximum`: the larger of the two, and NaN if either is NaN (Rust's
    /// `max` returns the other operand instead, which would hide a NaN).
    #[inline]
    fn maximum(self, other: Self) -> Self {
        if self > other || self.is_nan() {
            self
        } else {
            other
        }
    }
    /// Whether `new` replaces `best` in a first-maximum scan that propagates NaN: when
    /// it is larger, or when it is NaN (so the scan ends on a NaN if there is one).
    #[inline]
    fn beats(new: Self, best: Self) -> bool {
        new > best || new.is_nan()
    }
}

impl Float for f32 {
    #[inline]
    fn c(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    #[inline]
    fn c(v: f64) -> Self {
        v
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
}
