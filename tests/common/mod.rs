//! Helpers shared by the integration tests (each binary uses some of them).
#![allow(dead_code)]

use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection, SinusoidSampler};
use metagrad::dist::{Comm, Transport};
use metagrad::meta::{MetaLearner, Optimizer, Task};
use metagrad::nn::{Conv4, Downsample, Model, NormKind};
use metagrad::Float;
use ndarray::Array3;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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

/// A small Conv-4 on 1×16×16 inputs: `filters` filters, 3 ways, max-pooling.
pub fn small_conv(filters: usize, norm: NormKind) -> Conv4 {
    Conv4 {
        in_channels: 1,
        image_size: 16,
        filters,
        ways: 3,
        norm,
        downsample: Downsample::MaxPool,
        eps: 1e-5,
    }
}

/// `n` three-way one-shot tasks with two queries per class on random 16×16 "images"
/// (6 classes of 5).
pub fn image_tasks<F: Float>(n: usize, seed: u64) -> Vec<Task<F>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images = Array3::from_shape_simple_fn((6 * 5, 16, 16), || rng.gen_range(0.0..1.0f32));
    let coll = ImageCollection::from_class_sizes(images, &[5; 6]).unwrap();
    let mut s = EpisodeSampler::new(&coll, EpisodeSpec::new(3, 1, 2), seed).unwrap();
    (0..n).map(|_| Task::from_episode(&s.sample())).collect()
}

/// `n` sinusoid tasks of 5 support and 5 query points.
pub fn sinusoid_tasks<F: Float>(n: usize, seed: u64) -> Vec<Task<F>> {
    let batch = SinusoidSampler::new(5, 5, seed)
        .unwrap()
        .sample_batch(n)
        .unwrap();
    Task::from_sinusoid(&batch)
}
