//! A task's memory meter: the bytes of values held by all the tapes a piece of work
//! makes, together, and their high-water mark. A [`Tape`](super::Tape) made on a thread
//! inside [`Meter::measure`] reports to that meter for its whole life (wherever it is
//! then used), so the figure covers work that keeps several tapes alive at once
//! (gradient checkpointing's segments, iMAML's solver).

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
struct Cells {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// Bytes held now and at most by the tapes made inside [`Meter::measure`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Meter(Arc<Cells>);

thread_local! {
    /// The meter that tapes made on this thread report to.
    static CURRENT: RefCell<Option<Meter>> = const { RefCell::new(None) };
}

/// Puts the previous meter back when a measured closure ends (or unwinds).
struct Restore(Option<Meter>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

impl Meter {
    /// A meter at zero.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The meter tapes made now on this thread report to.
    pub(super) fn current() -> Option<Meter> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Runs `f` with every tape it makes on this thread reporting to this meter. Nested
    /// calls (a rayon worker that runs another task while it waits) measure separately:
    /// the outer meter is put back when the inner call ends.
    pub(crate) fn measure<R>(&self, f: impl FnOnce() -> R) -> R {
        let previous = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        let _restore = Restore(previous);
        f()
    }

    pub(super) fn grow(&self, n: usize) {
        let live = self.0.live.fetch_add(n, Ordering::Relaxed) + n;
        self.0.peak.fetch_max(live, Ordering::Relaxed);
    }

    pub(super) fn shrink(&self, n: usize) {
        self.0.live.fetch_sub(n, Ordering::Relaxed);
    }

    /// The most bytes held at once so far.
    pub(crate) fn peak(&self) -> usize {
        self.0.peak.load(Ordering::Relaxed)
    }
}
