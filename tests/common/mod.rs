//! Helpers shared by the integration tests (each binary uses some of them).
#![allow(dead_code)]

use metagrad::dist::{Comm, Transport};
use metagrad::meta::{MetaLearner, Optimizer};
use metagrad::nn::Model;
use metagrad::Float;
use std::fmt::Debug;
use std::sync::{Arc, Barrier, Mutex};

/// Everything a step or a run could change, for bitwise comparison: parameters,
/// normalisation statistics, step and skip counters, optimiser state.
pub fn state<F: Float, M: Model<F> + Clone>(
    l: &MetaLearner<F, M>,
    opt: &Optimizer<F>,
) -> impl PartialEq + Debug {
    (
        l.params.clone(),
        l.norm.clone(),
        l.step,
        l.skipped_steps,
        opt.clone(),
    )
}

/// `size` ranks as threads: an all-gather is "write my slot, wait, read all, wait".
pub struct Threads {
    rank: usize,
    shared: Arc<(Barrier, Mutex<Vec<Vec<u8>>>)>,
}

impl Transport for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.1.lock().unwrap().len()
    }
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        let (barrier, slots) = &*self.shared;
        slots.lock().unwrap()[self.rank] = mine.to_vec();
        barrier.wait();
        let all = slots.lock().unwrap().clone();
        barrier.wait();
        all
    }
    fn abort(&self, code: i32) -> ! {
        panic!("aborted with {code}")
    }
    fn name(&self) -> &'static str {
        "threads"
    }
}

/// Runs `job` on `size` thread-ranks and returns each rank's result.
pub fn on_ranks<T: Send>(size: usize, job: impl Fn(Comm) -> T + Sync) -> Vec<T> {
    let shared = Arc::new((Barrier::new(size), Mutex::new(vec![Vec::new(); size])));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let t = Threads {
                    rank,
                    shared: shared.clone(),
                };
                let job = &job;
                s.spawn(move || job(Comm::new(Arc::new(t))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
