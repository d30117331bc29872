//! Meta-training step timings for the standard MAML workloads, mirroring
//! `../shared/ref/maml_torch.py` and `maml_jax.py` exactly (shapes, hyper-parameters,
//! what one timed step contains).
//!
//! ```text
//! cargo bench --bench maml_step -- [--only NAME ...] [--steps N] [--warmup N] [--threads N] [--task-chunk N] [--memory-budget MiB] [--alone] [--eval-tasks N]
//! # across processes: build with the feature, then start the binary with mpirun
//! cargo bench --features mpi --bench maml_step --no-run
//! mpirun -np 2 target/release/deps/maml_step-* --threads 1 --only W2-omni5w1s-1step-SO
//! ```
//!
//! Under `mpirun`, rank 0 prints, adding the bytes each rank sent and received per step.
//!
//! Memory against inner steps: `W2-omni5w1s-{5,16,50}step-SO` (MAML) beside
//! `W2-omni5w1s-{5,16,50}step-iMAML` (iMAML, λ = 2, 5 CG steps, inner rate 0.1); the
//! peak resident set is printed per workload. For a clean figure per workload, run each
//! in its own process (`--only NAME`).
//!
//! The field's larger workloads: `W4-mini5w1s-{5,25}step-SO` (MAML's miniImageNet
//! setting: 3×84×84, Conv-4 with 32 filters, meta-batch 4, inner rate 0.01) and
//! `W5-cifarfs5w1s-resnet12-1step-{SO,FO}` (ResNet-12 on 3×32×32, meta-batch 4). The
//! `-recompute` variants of W4 run with `Memory::Recompute` beside the stored path (the
//! same learner stepped on the same tasks, alternating step by step) and print both
//! medians, fractions of peak and peak resident sets (each from one untimed step on a
//! trimmed heap, the recomputing one first), the ratios, and whether the two stayed
//! bitwise equal; `--alone` runs them without the stored path, for a peak resident set
//! it cannot touch.
//!
//! `--memory-budget MiB` bounds the tasks in flight by memory
//! (`MetaConfig::with_memory_budget`): the lines then say how many tasks ran at once and
//! the measured bytes per task (`MetaLearner::concurrency`).
//!
//! Evaluation speed: `W4-mini5w1s-eval600-10step` times the evaluation protocol
//! (`metagrad::eval::evaluate`) on 600 held-out tasks of W4's shapes (`--eval-tasks N` for
//! fewer), each adapted with 10 first-order inner steps at 0.01, batch norm transductive
//! (batch statistics of the support set, then of the query set, as the reference's
//! `training=True` batch norm), mirroring `benches/eval_torch.py`. One repetition is the
//! whole protocol; `--steps` repetitions are timed (the median is printed) after one
//! untimed evaluation of as many tasks as threads; the 600 tasks' data is made before the
//! timer. It runs only when named with `--only` (one repetition takes minutes).
//!
//! One timed step: every task's inner loop, query loss and meta-gradient, plus the outer
//! Adam step; task data is made before the timer starts; f32; the median of `--steps`
//! steps after `--warmup` steps. For each workload a human line like the reference
//! script's and one JSON line are printed.
//!
//! Beside each median: the fraction of the machine's matrix-product peak that the step
//! reaches. The peak is measured at start-up with `--threads` threads: the `gemm` crate's
//! kernel (the one the library calls) on square f32 products, n = 512 and 1024, the best
//! of several repeats. The step's work is counted as the multiply-adds of its matrix
//! products (convolutions or linear layers), see [`step_flops`].

use metagrad::dist::Comm;
use metagrad::eval::{evaluate, DEFAULT_EVAL_TASKS};
use metagrad::map_fn::with_threads;
use metagrad::meta::{Imaml, Memory, MetaConfig, MetaLearner, Optimizer, Order, Targets, Task};
use metagrad::nn::{Conv4, Mlp, Model, NormMode, ResNet12};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// The network and data of a workload.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Sinusoids, MLP 1-40-40-1.
    Sinusoid,
    /// Omniglot-shaped 1×28×28 images, Conv-4 with 64 filters.
    Omniglot,
    /// miniImageNet-shaped 3×84×84 images, Conv-4 with 32 filters (MAML's setting).
    Mini,
    /// CIFAR-FS-shaped 3×32×32 images, ResNet-12 (64-160-320-640).
    ResNet12,
}

impl Kind {
    /// Image channels and size (`None` for sinusoids).
    fn image(self) -> Option<(usize, usize)> {
        match self {
            Kind::Sinusoid => None,
            Kind::Omniglot => Some((1, 28)),
            Kind::Mini => Some((3, 84)),
            Kind::ResNet12 => Some((3, 32)),
        }
    }
}

struct Workload {
    name: &'static str,
    kind: Kind,
    meta_batch: usize,
    inner_steps: usize,
    second_order: bool,
    ways: usize,
    shots: usize,
    queries: usize,
    inner_lr: f64,
    /// iMAML's settings (the meta-gradient by conjugate gradient), or MAML.
    imaml: Option<Imaml>,
    /// What the inner loop keeps. A `Recompute` workload runs beside its stored path,
    /// step by step alternating, and prints both.
    memory: Memory,
}

/// iMAML with the paper's Omniglot settings, λ = 2 and 5 CG steps, and damping δ = 1 (the
/// damping changes the work only where CG stops early).
const PAPER_IMAML: Option<Imaml> = Some(Imaml {
    lambda: 2.0,
    cg_steps: 5,
    damping: 1.0,
    tolerance: None,
});

/// MAML's miniImageNet setting (W4), the base of the W4 and W5 rows.
const W4: Workload = Workload {
    name: "W4-mini5w1s-5step-SO",
    kind: Kind::Mini,
    meta_batch: 4,
    inner_steps: 5,
    second_order: true,
    ways: 5,
    shots: 1,
    queries: 15,
    inner_lr: 0.01,
    imaml: None,
    memory: Memory::Stored,
};

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "W1-sin-1step-SO",
        kind: Kind::Sinusoid,
        meta_batch: 25,
        inner_steps: 1,
        second_order: true,
        ways: 0,
        shots: 10,
        queries: 10,
        inner_lr: 0.01,
        imaml: None,
        memory: Memory::Stored,
    },
    Workload {
        name: "W1-sin-5step-SO",
        kind: Kind::Sinusoid,
        meta_batch: 25,
        inner_steps: 5,
        second_order: true,
        ways: 0,
        shots: 10,
        queries: 10,
        inner_lr: 0.01,
        imaml: None,
        memory: Memory::Stored,
    },
    Workload {
        name: "W2-omni5w1s-1step-SO",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 1,
        second_order: true,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.4,
        imaml: None,
        memory: Memory::Stored,
    },
    Workload {
        name: "W2-omni5w1s-5step-SO",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 5,
        second_order: true,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.4,
        imaml: None,
        memory: Memory::Stored,
    },
    Workload {
        name: "W2-omni5w1s-1step-FO",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 1,
        second_order: false,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.4,
        imaml: None,
        memory: Memory::Stored,
    },
    Workload {
        name: "W3-omni20w1s-1step-SO",
        kind: Kind::Omniglot,
        meta_batch: 16,
        inner_steps: 1,
        second_order: true,
        ways: 20,
        shots: 1,
        queries: 5,
        inner_lr: 0.4,
        imaml: None,
        memory: Memory::Stored,
    },
    // MAML's miniImageNet setting (W4) and ResNet-12 on CIFAR-FS (W5).
    W4,
    Workload {
        name: "W4-mini5w1s-25step-SO",
        inner_steps: 25,
        ..W4
    },
    Workload {
        name: "W4-mini5w1s-5step-SO-recompute",
        memory: Memory::Recompute,
        ..W4
    },
    Workload {
        name: "W4-mini5w1s-25step-SO-recompute",
        inner_steps: 25,
        memory: Memory::Recompute,
        ..W4
    },
    Workload {
        name: "W5-cifarfs5w1s-resnet12-1step-SO",
        kind: Kind::ResNet12,
        inner_steps: 1,
        ..W4
    },
    Workload {
        name: "W5-cifarfs5w1s-resnet12-1step-FO",
        kind: Kind::ResNet12,
        inner_steps: 1,
        second_order: false,
        ..W4
    },
    // Memory against inner steps: MAML records every step, iMAML none.
    Workload {
        name: "W2-omni5w1s-16step-SO",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 16,
        second_order: true,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.4,
        imaml: None,
        memory: Memory::Stored,
    },
    Workload {
        name: "W2-omni5w1s-50step-SO",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 50,
        second_order: true,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.4,
        imaml: None,
        memory: Memory::Stored,
    },
    Workload {
        name: "W2-omni5w1s-5step-iMAML",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 5,
        second_order: true,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.1,
        imaml: PAPER_IMAML,
        memory: Memory::Stored,
    },
    Workload {
        name: "W2-omni5w1s-16step-iMAML",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 16,
        second_order: true,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.1,
        imaml: PAPER_IMAML,
        memory: Memory::Stored,
    },
    Workload {
        name: "W2-omni5w1s-50step-iMAML",
        kind: Kind::Omniglot,
        meta_batch: 32,
        inner_steps: 50,
        second_order: true,
        ways: 5,
        shots: 1,
        queries: 15,
        inner_lr: 0.1,
        imaml: PAPER_IMAML,
        memory: Memory::Stored,
    },
];

/// The evaluation protocol on W4's shapes: `inner_steps` first-order
/// test-time steps per task, no meta-batch (the number of tasks is `--eval-tasks`, 600 by
/// default). Run by [`run_eval`], only when named with `--only`.
const EVAL: Workload = Workload {
    name: "W4-mini5w1s-eval600-10step",
    inner_steps: 10,
    second_order: false,
    ..W4
};

/// Floating-point operations of one meta-step's matrix products (2 per multiply-add),
/// counted from the network's layers and the workload's shape.
///
/// Per example, `fwd` is the forward pass of every layer (the convolutions of the Conv-4
/// or the ResNet-12, shortcuts included, or the linear layers of the MLP; the small
/// linear heads of the convolutional networks are left out), `dw` the weight adjoints
/// (as much as `fwd`) and `dx` the input adjoints (as much as `fwd` but for the layers
/// whose input is data). One inner step costs `S·(fwd + dx + dw)` for `S` support
/// examples; the query pass costs `Q·(fwd + dx + dw)`. Second order adds the backward
/// pass through each inner step: every recorded adjoint has two adjoints of its own size,
/// and the support forward pass its own backward, `3·S·(dx + dw)` per step. iMAML's inner
/// steps are first order; it adds one recorded support pass at the solution and, per CG
/// step, a Hessian-vector product counted like a second-order step's backward,
/// `3·S·(dx + dw)`. Elementwise work, norms and pooling are not counted, nor the work
/// that `Memory::Recompute` repeats (see [`recomputed_flops`]).
fn step_flops(w: &Workload) -> f64 {
    let (fwd, dx, dw) = layer_flops(w.kind);
    let (s, q) = examples(w);
    let steps = w.inner_steps as f64;
    let mut per_task = steps * s * (fwd + dx + dw) + q * (fwd + dx + dw);
    if let Some(imaml) = w.imaml {
        per_task += s * (fwd + dx + dw) + imaml.cg_steps as f64 * 3.0 * s * (dx + dw);
    } else if w.second_order {
        per_task += steps * 3.0 * s * (dx + dw);
    }
    per_task * w.meta_batch as f64
}

/// What `Memory::Recompute` adds to [`step_flops`]: every inner step but the last is
/// run a second time, forward and (second order) its recorded inner backward.
fn recomputed_flops(w: &Workload) -> f64 {
    if w.memory != Memory::Recompute || !w.second_order {
        return 0.0;
    }
    let (fwd, dx, dw) = layer_flops(w.kind);
    let (s, _) = examples(w);
    w.inner_steps.saturating_sub(1) as f64 * s * (fwd + dx + dw) * w.meta_batch as f64
}

/// Matrix-product work of evaluating one task, counted as [`step_flops`] counts it:
/// `inner_steps` first-order support steps, `S·(fwd + dx + dw)` each, and the query set's
/// forward pass, `Q·fwd` (no backward).
fn eval_flops(w: &Workload) -> f64 {
    let (fwd, dx, dw) = layer_flops(w.kind);
    let (s, q) = examples(w);
    w.inner_steps as f64 * s * (fwd + dx + dw) + q * fwd
}

/// Support and query examples per task.
fn examples(w: &Workload) -> (f64, f64) {
    match w.kind {
        Kind::Sinusoid => (w.shots as f64, w.queries as f64),
        _ => ((w.ways * w.shots) as f64, (w.ways * w.queries) as f64),
    }
}

/// Per example: the forward pass's matrix-product work, the input adjoints' and the
/// weight adjoints'.
fn layer_flops(kind: Kind) -> (f64, f64, f64) {
    // (cost, whether its input is data) per layer.
    let mut layers: Vec<(usize, bool)> = Vec::new();
    match kind {
        Kind::Sinusoid => layers.extend([(2 * 40, true), (2 * 40 * 40, false), (2 * 40, false)]),
        Kind::Omniglot | Kind::Mini => {
            let (mut c, mut size) = kind.image().expect("images");
            let filters = if kind == Kind::Omniglot { 64 } else { 32 };
            for b in 0..4 {
                layers.push((2 * filters * c * 9 * size * size, b == 0));
                c = filters;
                size /= 2;
            }
        }
        Kind::ResNet12 => {
            let (mut c, mut size) = kind.image().expect("images");
            for (b, width) in [64usize, 160, 320, 640].into_iter().enumerate() {
                let area = size * size;
                layers.push((2 * width * c * 9 * area, b == 0)); // conv1
                layers.push((2 * width * width * 9 * area, false)); // conv2
                layers.push((2 * width * width * 9 * area, false)); // conv3
                layers.push((2 * width * c * area, b == 0)); // 1×1 shortcut
                c = width;
                size /= 2;
            }
        }
    }
    let fwd = layers.iter().map(|l| l.0).sum::<usize>() as f64;
    let first = layers.iter().filter(|l| l.1).map(|l| l.0).sum::<usize>() as f64;
    (fwd, fwd - first, fwd)
}

/// `len` zeroed f32 mapped straight from the kernel and returned to it on drop, so that
/// the peak measurement's buffers leave no trace in the workloads' peak resident set
/// (the tuned allocator would keep them).
struct Pages {
    ptr: *mut f32,
    len: usize,
}

impl Pages {
    fn new(len: usize) -> Self {
        // SAFETY: an anonymous private mapping of the requested size; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 4,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "maml_step: mmap failed");
        Pages {
            ptr: ptr.cast(),
            len,
        }
    }
}

impl std::ops::Deref for Pages {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: the mapping holds `len` f32 (zero-initialised by the kernel) and lives
        // as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for Pages {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len * 4) };
    }
}

// SAFETY: `Pages` owns its mapping exclusively, like a `Vec<f32>`.
unsafe impl Send for Pages {}
// SAFETY: shared access only reads.
unsafe impl Sync for Pages {}

/// The matrix-product peak of this machine on `threads` threads, in GFLOP/s: each
/// thread runs its own square f32 product with the `gemm` crate's single-threaded kernel
/// at the same time (the way the library runs: tasks in parallel, each product on one
/// thread), n = 512 and 1024; the best of several repeats of the total rate.
fn matmul_peak(threads: usize) -> f64 {
    use rayon::prelude::*;
    let mut best = 0.0f64;
    for n in [512usize, 1024] {
        let (mut a, mut b) = (Pages::new(n * n), Pages::new(n * n));
        a.fill(1.0);
        b.fill(0.5);
        let mut cs: Vec<Pages> = (0..threads).map(|_| Pages::new(n * n)).collect();
        for _ in 0..if n == 512 { 20 } else { 6 } {
            let t0 = Instant::now();
            cs.par_iter_mut().with_max_len(1).for_each(|c| {
                // SAFETY: three distinct n×n row-major buffers, described by their strides.
                unsafe {
                    gemm::gemm(
                        n,
                        n,
                        n,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        n as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
            let dt = t0.elapsed().as_secs_f64();
            std::hint::black_box(&cs);
            best = best.max(threads as f64 * 2.0 * (n * n * n) as f64 / dt / 1e9);
        }
    }
    best
}

/// Sinusoid tasks exactly as the reference makes them: amplitude U[0.1, 5], phase
/// U[0, π], x U[−5, 5].
fn sinusoid_tasks(rng: &mut ChaCha8Rng, w: &Workload) -> Vec<Task<f32>> {
    (0..w.meta_batch)
        .map(|_| {
            let amp = rng.gen_range(0.1..5.0f32);
            let phase = rng.gen_range(0.0..std::f32::consts::PI);
            let mut points = |n: usize| {
                let x =
                    ArrayD::from_shape_simple_fn(IxDyn(&[n, 1]), || rng.gen_range(-5.0..5.0f32));
                let y = x.mapv(|v| amp * (v - phase).sin());
                (x, y)
            };
            let (xs, ys) = points(w.shots);
            let (xq, yq) = points(w.queries);
            Task {
                support_x: xs,
                support_y: Targets::Values(ys),
                query_x: xq,
                query_y: Targets::Values(yq),
            }
        })
        .collect()
}

/// Image tasks as the reference makes them (`omniglot_batch`): standard-normal images
/// of the workload's channels and size, labels `0..N` each repeated `K` (or `Q`) times.
fn image_tasks(rng: &mut ChaCha8Rng, w: &Workload) -> Vec<Task<f32>> {
    image_tasks_n(rng, w, w.meta_batch)
}

/// `n` image tasks of the workload's shapes, as [`image_tasks`] makes them.
fn image_tasks_n(rng: &mut ChaCha8Rng, w: &Workload, n: usize) -> Vec<Task<f32>> {
    let (c, hw) = w.kind.image().expect("an image workload");
    (0..n)
        .map(|_| {
            let mut images = |n: usize| {
                ArrayD::from_shape_simple_fn(IxDyn(&[n, c, hw, hw]), || {
                    rng.sample::<f32, _>(rand_distr_normal())
                })
            };
            let labels = |per: usize| {
                (0..w.ways)
                    .flat_map(|c| std::iter::repeat_n(c, per))
                    .collect::<Vec<_>>()
            };
            Task {
                support_x: images(w.ways * w.shots),
                support_y: Targets::Classes(labels(w.shots)),
                query_x: images(w.ways * w.queries),
                query_y: Targets::Classes(labels(w.queries)),
            }
        })
        .collect()
}

/// W4's network: Conv-4 with 32 filters on 3×84×84 images (an 800 → `ways` head).
fn mini_conv4(ways: usize) -> Conv4 {
    Conv4 {
        in_channels: 3,
        image_size: 84,
        filters: 32,
        ways,
        ..Conv4::omniglot(ways)
    }
}

fn rand_distr_normal() -> ndarray_rand::rand_distr::StandardNormal {
    ndarray_rand::rand_distr::StandardNormal
}

/// Resets the kernel's peak-resident-set counter for this process (Linux), after handing
/// the memory the allocator keeps (see `tune_allocator`) back to the kernel, so that a
/// workload's peak does not start from the previous workload's.
fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set since the last reset, in MiB (Linux; 0 elsewhere).
fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// A memory figure of `/proc/self/status` (in kB there), in MiB (Linux; 0 elsewhere).
fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// How every workload is run: the command line's settings and the job's communicator.
struct Settings {
    steps: usize,
    warmup: usize,
    threads: usize,
    chunk: Option<usize>,
    /// `--memory-budget`, in bytes.
    budget: Option<u64>,
    /// Run `-recompute` workloads without their stored path beside them.
    alone: bool,
    comm: Comm,
    /// The matrix-product peak on `threads` threads, GFLOP/s.
    peak: f64,
}

/// What a workload's timed steps measured, for one memory mode.
struct Measured {
    times: Vec<f64>,
    losses: Vec<f64>,
    /// Peak resident set, MiB.
    rss: f64,
}

impl Measured {
    fn new(steps: usize) -> Self {
        Measured {
            times: Vec::with_capacity(steps),
            losses: Vec::with_capacity(steps),
            rss: 0.0,
        }
    }

    /// Median, least and most seconds per step.
    fn summary(&self) -> (f64, f64, f64) {
        let mut sorted = self.times.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
        };
        (median, sorted[0], sorted[n - 1])
    }
}

fn run<M: Model<f32> + Clone + std::fmt::Debug>(
    w: &Workload,
    model: M,
    make: &mut dyn FnMut() -> Vec<Task<f32>>,
    settings: &Settings,
) {
    let Settings {
        steps,
        warmup,
        threads,
        chunk,
        budget,
        alone,
        ref comm,
        peak,
    } = *settings;
    let mut config = MetaConfig::maml(w.inner_steps, w.inner_lr).with_memory(w.memory);
    if let Some(c) = chunk {
        config.task_chunk = c;
    }
    config.memory_budget = budget;
    if !w.second_order {
        config = config.with_order(Order::First);
    }
    if let Some(imaml) = w.imaml {
        config = config.implicit(imaml);
    }
    let mut learner = MetaLearner::<f32, _>::new(model, config, 0)
        .with_comm(comm.clone())
        .expect("every rank runs the same workload");
    let mut opt = Optimizer::adam(1e-3);
    // Under Recompute, the stored path beside it: the same learner, stepped on the same
    // tasks, alternating step by step.
    let mut stored = (w.memory == Memory::Recompute && !alone).then(|| {
        let mut l = learner.clone();
        l.config.memory = Memory::Stored;
        (l, opt.clone(), Measured::new(steps))
    });
    let mut ours = Measured::new(steps);
    let mut bitwise = true;
    if let Some((l, o, m)) = stored.as_mut() {
        // Peak memory first, one step of each from a trimmed heap, the recomputing one
        // first so that nothing the stored path leaves behind counts against it. The
        // timed steps then run without trimming, as training does (the tuned allocator
        // keeps freed memory for the next step).
        let tasks = make();
        reset_peak_rss();
        learner.meta_step(&tasks, &mut opt).expect("meta-step");
        ours.rss = peak_rss_mb();
        reset_peak_rss();
        l.meta_step(&tasks, o).expect("meta-step");
        m.rss = peak_rss_mb();
    } else {
        reset_peak_rss();
    }
    let mut traffic = comm.traffic();
    for i in 0..warmup + steps {
        if i == warmup {
            traffic = comm.traffic();
        }
        let tasks = make();
        let timed = i >= warmup;
        if let Some((l, o, m)) = stored.as_mut() {
            let t0 = Instant::now();
            let stats = std::hint::black_box(l.meta_step(&tasks, o).expect("meta-step"));
            let dt = t0.elapsed().as_secs_f64();
            if timed {
                m.times.push(dt);
                m.losses.push(stats.loss);
            }
        }
        let t0 = Instant::now();
        let stats = std::hint::black_box(learner.meta_step(&tasks, &mut opt).expect("meta-step"));
        let dt = t0.elapsed().as_secs_f64();
        if timed {
            ours.times.push(dt);
            ours.losses.push(stats.loss);
        }
        if let Some((l, o, _)) = stored.as_ref() {
            bitwise &=
                l.params.digest() == learner.params.digest() && l.norm == learner.norm && *o == opt;
        }
    }
    if stored.is_none() {
        ours.rss = peak_rss_mb();
    }
    let (median, min, max) = ours.summary();
    let rss = ours.rss;
    let losses = &ours.losses;
    let (sent, received) = comm.traffic();
    let per_step = |now: u64, then: u64| (now - then) as f64 / steps as f64;
    let (sent, received) = (per_step(sent, traffic.0), per_step(received, traffic.1));
    let concurrency = learner.concurrency();
    let check = check_cost(&learner, &opt, &make());
    let exchange = exchange_cost(&learner, comm, w.meta_batch);
    let tps = w.meta_batch as f64 / median;
    if !comm.is_root() {
        return;
    }
    if comm.size() > 1 {
        println!(
            "{:24} ranks={}  bytes per step and rank: sent {:.0}, received {:.0}; the \
             exchange alone: {:.2} ms",
            "",
            comm.size(),
            sent,
            received,
            exchange * 1e3
        );
    }
    println!(
        "{:24} median {median:9.5} s/step  min {min:9.5}  max {max:9.5}  tasks/s {tps:9.1}  (steps={steps}, warmup={warmup}, meta_batch={}, threads={threads}, first/last loss {:.4}/{:.4}, peak RSS {rss:.0} MiB)",
        w.name, w.meta_batch, losses[0], losses[losses.len() - 1]
    );
    let gflop = step_flops(w) / 1e9;
    let fraction = gflop / median / peak;
    let fmt_gflop = |g: f64| {
        if g < 1.0 {
            format!("{g:.4}")
        } else {
            format!("{g:.1}")
        }
    };
    println!(
        "{:24} {} GFLOP/step in matrix products: {:.1} GFLOP/s = {:.1}% of the {:.0} GFLOP/s peak on {threads} threads",
        "",
        fmt_gflop(gflop),
        gflop / median,
        100.0 * fraction,
        peak
    );
    let mut json = serde_json::json!({
        "workload": w.name, "median_s": median, "min_s": min, "max_s": max,
        "tasks_per_s": tps, "threads": threads, "steps": steps, "peak_rss_mb": rss,
        "check_s": check, "ranks": comm.size(), "gflop_per_step": gflop,
        "peak_gflops": peak, "fraction_of_peak": fraction,
        "bytes_sent_per_step": sent, "bytes_received_per_step": received,
        "memory": format!("{:?}", w.memory),
        "tasks_in_flight": concurrency.tasks,
    });
    if let Some(b) = budget {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let task = concurrency.task_bytes.map_or(0.0, mib);
        println!(
            "{:24} memory budget {:.0} MiB: {} tasks at once, {task:.0} MiB of tensor values per task",
            "",
            mib(b),
            concurrency.tasks
        );
        let o = json.as_object_mut().expect("an object");
        o.insert("memory_budget_mb".into(), mib(b).into());
        o.insert("task_mb".into(), task.into());
    }
    if let Some((_, _, m)) = &stored {
        let (s_median, s_min, s_max) = m.summary();
        let s_fraction = gflop / s_median / peak;
        let extra = recomputed_flops(w) / 1e9;
        println!(
            "{:24} recomputed as well: {} GFLOP/step (the inner steps but the last, forward and inner backward), not counted above",
            "",
            fmt_gflop(extra)
        );
        println!(
            "{:24} stored path, alternating: median {s_median:9.5} s/step  min {s_min:9.5}  max {s_max:9.5}  {:.1}% of peak  peak RSS {:.0} MiB",
            "",
            100.0 * s_fraction,
            m.rss
        );
        println!(
            "{:24} recompute / stored: time {:.3}×, peak RSS {:.3}×; parameters, statistics and optimiser bitwise equal after every step: {}",
            "",
            median / s_median,
            rss / m.rss,
            if bitwise { "yes" } else { "NO" }
        );
        let o = json.as_object_mut().expect("an object");
        o.insert("recomputed_gflop_per_step".into(), extra.into());
        o.insert("stored_median_s".into(), s_median.into());
        o.insert("stored_peak_rss_mb".into(), m.rss.into());
        o.insert("stored_fraction_of_peak".into(), s_fraction.into());
        o.insert("bitwise_equal".into(), bitwise.into());
    }
    println!(
        "{:24} non-finite check {:8.1} µs/step = {:.3}% of the median step",
        "",
        check * 1e6,
        100.0 * check / median
    );
    println!("{json}");
}

/// The evaluation protocol, timed: `eval::evaluate` on `n_tasks` random tasks of the
/// workload's shapes (made before the timer), `w.inner_steps` first-order steps at
/// `w.inner_lr`, batch norm transductive, as many tasks at once as threads. One untimed
/// evaluation of as many tasks as threads first, then `steps` timed repetitions of the
/// whole protocol.
fn run_eval(w: &Workload, n_tasks: usize, settings: &Settings) {
    let Settings {
        steps,
        threads,
        ref comm,
        peak,
        ..
    } = *settings;
    let mode = NormMode::Transductive;
    let config = MetaConfig::maml(w.inner_steps, w.inner_lr).with_order(Order::First);
    let learner = MetaLearner::<f32, _>::new(mini_conv4(w.ways), config, 0)
        .with_comm(comm.clone())
        .expect("every rank runs the same workload");
    let t0 = Instant::now();
    let tasks = image_tasks_n(&mut ChaCha8Rng::seed_from_u64(0), w, n_tasks);
    let made = t0.elapsed().as_secs_f64();
    let data_mb = tasks
        .iter()
        .map(|t| (t.support_x.len() + t.query_x.len()) * 4)
        .sum::<usize>() as f64
        / (1024.0 * 1024.0);
    let warm = &tasks[..threads.min(n_tasks)];
    evaluate(&learner, warm, w.inner_steps, mode, usize::MAX).expect("evaluation");
    reset_peak_rss();
    let base_mb = status_mb("VmRSS:");
    let mut times = Vec::with_capacity(steps);
    let mut report = None;
    for _ in 0..steps {
        let t0 = Instant::now();
        let r = std::hint::black_box(
            evaluate(&learner, &tasks, w.inner_steps, mode, usize::MAX).expect("evaluation"),
        );
        times.push(t0.elapsed().as_secs_f64());
        report = Some(r);
    }
    let rss = peak_rss_mb();
    let report = report.expect("at least one repetition");
    let m = Measured {
        times,
        losses: Vec::new(),
        rss,
    };
    let (median, min, max) = m.summary();
    if !comm.is_root() {
        return;
    }
    let per_task = median / n_tasks as f64;
    let tps = n_tasks as f64 / median;
    println!(
        "{:24} median {median:9.5} s/protocol  min {min:9.5}  max {max:9.5}  tasks/s {tps:9.1}  per task {:.2} ms  (tasks={n_tasks}, repetitions={steps}, inner steps={} at {}, first order, batch norm: {mode}, threads={threads}, peak RSS {rss:.0} MiB with the task data's {data_mb:.0} MiB; {:.0} MiB before the timer)",
        w.name,
        per_task * 1e3,
        w.inner_steps,
        w.inner_lr,
        base_mb,
    );
    println!(
        "{:24} accuracy {report}, mean query loss {:.4}; task data made in {made:.1} s, before the timer",
        "", report.mean_loss
    );
    let gflop = eval_flops(w) * n_tasks as f64 / 1e9;
    let fraction = gflop / median / peak;
    println!(
        "{:24} {:.1} GFLOP/protocol in matrix products ({:.2} per task): {:.1} GFLOP/s = {:.1}% of the {:.0} GFLOP/s peak on {threads} threads",
        "",
        gflop,
        gflop / n_tasks as f64,
        gflop / median,
        100.0 * fraction,
        peak
    );
    let json = serde_json::json!({
        "workload": w.name, "median_s": median, "min_s": min, "max_s": max,
        "tasks": n_tasks, "per_task_ms": per_task * 1e3, "tasks_per_s": tps,
        "repetitions": steps, "inner_steps": w.inner_steps, "inner_lr": w.inner_lr,
        "order": "first", "norm_mode": mode.to_string(), "threads": threads,
        "ranks": comm.size(), "peak_rss_mb": rss, "task_data_mb": data_mb,
        "rss_before_timer_mb": base_mb, "gflop_per_protocol": gflop, "peak_gflops": peak,
        "fraction_of_peak": fraction, "mean_accuracy": report.mean_accuracy,
        "ci95": report.ci95, "mean_loss": report.mean_loss, "diverged": report.diverged,
    });
    println!("{json}");
}

/// The time of one step's exchange alone (median of repeats): every task's gradient (as
/// many 4-byte floats as the model has parameters) all-gathered across the ranks.
fn exchange_cost<M: Model<f32> + Clone>(
    learner: &MetaLearner<f32, M>,
    comm: &Comm,
    tasks: usize,
) -> f64 {
    if comm.size() == 1 {
        return 0.0;
    }
    let words = learner.params.num_elements().div_ceil(2);
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let t0 = Instant::now();
            let all = comm.map(tasks, 1, |_| vec![0u64; words]).expect("exchange");
            std::hint::black_box(all);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// What `meta_step` spends on its guarantees, per step (median of repeats): validating
/// the request, the finiteness scan of every task's meta-gradient, and applying the update
/// all or nothing (on copies, with a scan of the results) instead of in place.
fn check_cost<M: Model<f32> + Clone>(
    learner: &MetaLearner<f32, M>,
    opt: &Optimizer<f32>,
    tasks: &[Task<f32>],
) -> f64 {
    let update: Vec<ArrayD<f32>> = learner
        .params
        .tensors()
        .iter()
        .map(|p| ArrayD::zeros(p.raw_dim()))
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let repeats = 21;
    let mut costs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let (mut guarded, mut o1) = (learner.clone(), opt.clone());
        let (mut plain, mut o2) = (learner.params.clone(), opt.clone());
        let t0 = Instant::now();
        Task::validate_batch(tasks).expect("valid tasks");
        learner.config.validate().expect("valid config");
        opt.validate().expect("valid optimiser");
        // One scan per group of tasks sharing a tape, as meta_step does.
        let chunk = Task::chunk_size(
            tasks,
            learner.config.task_chunk,
            learner.model.batches_tasks(),
        );
        for _ in tasks.chunks(chunk) {
            let finite = update.iter().all(|g| g.iter().all(|v| v.is_finite()));
            std::hint::black_box(finite);
        }
        guarded.apply(&update, &[], &mut o1).expect("finite update");
        let guarded_s = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        o2.step(plain.tensors_mut(), &update);
        let plain_s = t0.elapsed().as_secs_f64();
        std::hint::black_box((&guarded, &plain));
        costs.push((guarded_s - plain_s).max(0.0));
    }
    median(costs)
}

fn main() {
    let mut only: Vec<String> = Vec::new();
    let (mut steps, mut warmup, mut threads) = (20usize, 3usize, 2usize);
    let mut chunk = None;
    let mut budget = None;
    let mut alone = false;
    let mut eval_tasks = DEFAULT_EVAL_TASKS;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> usize {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("maml_step: {what} needs a number");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--only" => only.extend(args.next()),
            "--steps" => steps = num("--steps").max(1),
            "--warmup" => warmup = num("--warmup"),
            "--threads" => threads = num("--threads").max(1),
            "--task-chunk" => chunk = Some(num("--task-chunk").max(1)),
            "--memory-budget" => budget = Some((num("--memory-budget").max(1) as u64) << 20),
            "--alone" => alone = true,
            "--eval-tasks" => eval_tasks = num("--eval-tasks").max(1),
            "--bench" => {}
            other if !other.starts_with("--") && !only.is_empty() => only.push(other.to_string()),
            other => {
                eprintln!("maml_step: unknown argument {other}; usage: cargo bench --bench maml_step -- [--only NAME ...] [--steps N] [--warmup N] [--threads N] [--task-chunk N] [--memory-budget MiB] [--alone] [--eval-tasks N]");
                std::process::exit(2);
            }
        }
    }
    for name in &only {
        if !WORKLOADS.iter().chain([&EVAL]).any(|w| w.name == name) {
            eprintln!(
                "maml_step: unknown workload {name}; known: {}",
                WORKLOADS
                    .iter()
                    .chain([&EVAL])
                    .map(|w| w.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            std::process::exit(2);
        }
    }
    let tuned = metagrad::tune_allocator();
    let comm = Comm::from_env().unwrap_or_else(|e| {
        eprintln!("maml_step: {e}");
        std::process::exit(2)
    });
    if comm.is_root() {
        println!("metagrad maml_step  threads={threads}  steps={steps}  warmup={warmup}  allocator tuned={tuned}");
    }
    let peak = with_threads(threads, || matmul_peak(threads));
    if comm.is_root() {
        println!("matrix-product peak on {threads} threads (gemm kernel, n = 512 and 1024, best of several): {peak:.0} GFLOP/s");
    }
    let t0 = Instant::now();
    let settings = Settings {
        steps,
        warmup,
        threads,
        chunk,
        budget,
        alone,
        comm,
        peak,
    };
    let comm = &settings.comm;
    with_threads(threads, || {
        for w in WORKLOADS
            .iter()
            .filter(|w| only.is_empty() || only.iter().any(|n| n == w.name))
        {
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            let rng = &mut rng;
            match w.kind {
                Kind::Sinusoid => run(
                    w,
                    Mlp::sinusoid(),
                    &mut || sinusoid_tasks(rng, w),
                    &settings,
                ),
                Kind::Omniglot => run(
                    w,
                    Conv4::omniglot(w.ways),
                    &mut || image_tasks(rng, w),
                    &settings,
                ),
                Kind::Mini => run(
                    w,
                    mini_conv4(w.ways),
                    &mut || image_tasks(rng, w),
                    &settings,
                ),
                Kind::ResNet12 => run(
                    w,
                    ResNet12::new(w.ways, 32),
                    &mut || image_tasks(rng, w),
                    &settings,
                ),
            }
        }
        if only.iter().any(|n| n == EVAL.name) {
            run_eval(&EVAL, eval_tasks, &settings);
        }
    });
    if comm.is_root() {
        println!(
            "total wall {:.1} s  ranks={}",
            t0.elapsed().as_secs_f64(),
            comm.size()
        );
    }
}
