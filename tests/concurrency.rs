//! The memory bound on tasks in flight ([`MetaConfig::memory_budget`]): the meta-gradient,
//! loss, accuracy, batch-norm statistics and the state after three meta-steps are bitwise
//! the same whether the budget lets one task, two tasks or any number run at once, on 1
//! and 2 threads (MAML second and first order, stored and recomputed inner loops, Meta-SGD,
//! iMAML, task chunks on one tape, Reptile); the chosen concurrency drops to one task
//! under a tiny budget and rises under a large one, and the scheduler honours it; the
//! field stays out of old configurations and checkpoints; ranks under a budget end each
//! step bitwise as one process.

mod common;
use common::{image_tasks, sinusoid_tasks, small_conv};

use metagrad::checkpoint::Checkpoint;
use metagrad::data::rng_from_seed;
use metagrad::map_fn::with_threads;
use metagrad::meta::{Imaml, InnerRule, Memory, MetaConfig, MetaLearner, Optimizer, Order, Task};
use metagrad::nn::{Conv4, Ctx, Mlp, Model, NormKind, Observed, Params};
use metagrad::{Error, Tape, Var};
use ndarray::ArrayD;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn bits(arrays: &[ArrayD<f32>]) -> Vec<Vec<u32>> {
    arrays
        .iter()
        .map(|a| a.iter().map(|v| v.to_bits()).collect())
        .collect()
}

fn observed_bits(o: &[Observed<f32>]) -> Vec<(usize, usize, Vec<u32>, Vec<u32>)> {
    o.iter()
        .map(|o| {
            let b = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect();
            (o.layer, o.step, b(&o.mean), b(&o.var))
        })
        .collect()
}

/// A budget: none, or one that fits `tasks` tasks of `per_task` bytes (and half a task
/// more, so that rounding cannot tip it).
#[derive(Debug, Clone, Copy)]
enum Budget {
    Unbounded,
    Tasks(u64),
}

impl Budget {
    fn bytes(self, per_task: u64) -> Option<u64> {
        match self {
            Budget::Unbounded => None,
            Budget::Tasks(k) => Some(k * per_task + per_task / 2),
        }
    }
}

/// The per-task figure of `base`'s meta-gradients (or Reptile steps) on `tasks`
/// (measured on one thread).
fn per_task<M: Model<f32> + Clone>(
    base: &MetaLearner<f32, M>,
    tasks: &[Task<f32>],
    reptile: bool,
) -> u64 {
    let mut l = base.clone();
    l.config.memory_budget = Some(u64::MAX);
    with_threads(1, || match reptile {
        false => drop(l.meta_gradient(tasks).unwrap()),
        true => drop(l.reptile_step(tasks, &mut Optimizer::adam(1e-3)).unwrap()),
    });
    l.concurrency().task_bytes.expect("measured under a budget")
}

/// The meta-gradient and its statistics, then three meta-steps (or Reptile steps) with
/// Adam and the state they leave, under `budget` on `threads` threads; and the largest
/// concurrency the learner reported.
fn run<M: Model<f32> + Clone>(
    base: &MetaLearner<f32, M>,
    batches: &[Vec<Task<f32>>],
    budget: Option<u64>,
    threads: usize,
    reptile: bool,
) -> (impl PartialEq + std::fmt::Debug, usize) {
    let mut l = base.clone();
    l.config.memory_budget = budget;
    with_threads(threads, || {
        let first = (!reptile).then(|| {
            let (g, stats, observed) = l.meta_gradient(&batches[0]).unwrap();
            (
                bits(&g),
                stats.loss.to_bits(),
                stats.accuracy.map(f64::to_bits),
                stats.second_order,
                observed_bits(&observed),
            )
        });
        let mut most = l.concurrency().tasks;
        let mut opt = Optimizer::adam(1e-3);
        let mut steps = Vec::new();
        for batch in batches {
            let s = match reptile {
                false => l.meta_step(batch, &mut opt).unwrap(),
                true => l.reptile_step(batch, &mut opt).unwrap(),
            };
            most = most.max(l.concurrency().tasks);
            steps.push((
                s.loss.to_bits(),
                s.accuracy.map(f64::to_bits),
                s.second_order,
                s.skipped,
                s.cg.map(|c| (c.iterations, c.residual.to_bits(), c.unconverged)),
            ));
        }
        let digest = l.params.digest();
        ((first, steps, digest, common::state(&l, &opt)), most)
    })
}

/// Every budget (one task, two tasks, unbounded) on 1 and 2 threads against the unbounded
/// run on one thread, bitwise; on 2 threads the budget of one task runs one at a time and
/// the others two.
fn assert_same<M: Model<f32> + Clone>(
    name: &str,
    base: &MetaLearner<f32, M>,
    batches: &[Vec<Task<f32>>],
    reptile: bool,
) {
    let bytes = per_task(base, &batches[0], reptile);
    assert!(bytes > 0, "{name}: no bytes measured");
    let (reference, _) = run(base, batches, None, 1, reptile);
    for threads in [1, 2] {
        for budget in [Budget::Tasks(1), Budget::Tasks(2), Budget::Unbounded] {
            let (got, most) = run(base, batches, budget.bytes(bytes), threads, reptile);
            assert!(
                got == reference,
                "{name}: {budget:?} on {threads} threads differs from the unbounded run on one"
            );
            let expected = match budget {
                Budget::Tasks(k) => (k as usize).min(threads),
                Budget::Unbounded => threads,
            };
            assert_eq!(most, expected, "{name}: {budget:?} on {threads} threads");
        }
    }
}

#[test]
fn every_budget_gives_bitwise_the_same_steps() {
    let batches: Vec<Vec<Task<f32>>> = (0..3).map(|i| image_tasks(4, 10 + i)).collect();
    let maml = MetaConfig::maml(2, 0.2);
    let configs = [
        ("MAML", maml.clone()),
        ("MAML first order", maml.clone().with_order(Order::First)),
        (
            "MAML recomputed",
            maml.clone().with_memory(Memory::Recompute),
        ),
        (
            "MAML first order recomputed",
            maml.clone()
                .with_order(Order::First)
                .with_memory(Memory::Recompute),
        ),
        ("Meta-SGD", maml.clone().with_rule(InnerRule::MetaSgd)),
        ("iMAML", maml.clone().implicit(Imaml::new(2.0, 3))),
    ];
    for (name, config) in configs {
        let base = MetaLearner::new(
            small_conv(2, NormKind::Batch { per_step: None }),
            config,
            11,
        );
        assert_same(name, &base, &batches, false);
    }
    let base = MetaLearner::new(
        small_conv(2, NormKind::Batch { per_step: None }),
        MetaConfig::maml(2, 0.2),
        12,
    );
    assert_same("Reptile", &base, &batches, true);
}

#[test]
fn task_chunks_under_a_budget_give_bitwise_the_same_steps() {
    let batches: Vec<Vec<Task<f32>>> = (0..3).map(|i| sinusoid_tasks(6, 20 + i)).collect();
    for chunk in [1, 2] {
        let mut config = MetaConfig::maml(2, 0.01);
        config.task_chunk = chunk;
        let base = MetaLearner::new(Mlp::sinusoid(), config, 21);
        assert_same(&format!("MLP, chunks of {chunk}"), &base, &batches, false);
    }
}

/// A model that counts how many forward passes are under way at once (each one held
/// for a few milliseconds, so that passes of tasks running together overlap).
#[derive(Debug, Clone)]
struct Watched {
    inner: Conv4,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Model<f32> for Watched {
    fn init(&self, seed: u64) -> Params<f32> {
        self.inner.init(seed)
    }
    fn forward(&self, t: &mut Tape<f32>, p: &[Var], x: Var, ctx: &mut Ctx<'_, f32>) -> Var {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let y = self.inner.forward(t, p, x, ctx);
        self.now.fetch_sub(1, Ordering::SeqCst);
        y
    }
    fn head(&self) -> Vec<usize> {
        Model::<f32>::head(&self.inner)
    }
    fn batch_norm_channels(&self) -> Vec<usize> {
        Model::<f32>::batch_norm_channels(&self.inner)
    }
    fn inner_frozen(&self) -> Vec<usize> {
        Model::<f32>::inner_frozen(&self.inner)
    }
    fn norm_steps(&self) -> usize {
        Model::<f32>::norm_steps(&self.inner)
    }
    fn needs_context(&self) -> bool {
        Model::<f32>::needs_context(&self.inner)
    }
    fn batches_tasks(&self) -> bool {
        Model::<f32>::batches_tasks(&self.inner)
    }
    fn outputs(&self) -> Option<usize> {
        Model::<f32>::outputs(&self.inner)
    }
}

#[test]
fn a_tiny_budget_runs_one_task_at_a_time_and_a_large_one_more() {
    let tasks = image_tasks(4, 30);
    let model = Watched {
        inner: small_conv(2, NormKind::Batch { per_step: None }),
        now: Arc::default(),
        most: Arc::default(),
    };
    let base = MetaLearner::new(model, MetaConfig::maml(1, 0.2), 31);
    // What the scheduler did over two steps under `budget`, on two threads: the largest
    // number of forward passes at once, and what the learner reported after each step.
    let schedule = |budget: Option<u64>| {
        let mut l = base.clone();
        l.config.memory_budget = budget;
        l.model.most.store(0, Ordering::SeqCst);
        let mut opt = Optimizer::adam(1e-3);
        let reported: Vec<_> = with_threads(2, || {
            (0..2)
                .map(|_| {
                    l.meta_step(&tasks, &mut opt).unwrap();
                    l.concurrency()
                })
                .collect()
        });
        (l.model.most.load(Ordering::SeqCst), reported)
    };
    let (most, reported) = schedule(Some(1));
    assert_eq!(most, 1, "a budget of one byte let tasks overlap");
    for c in &reported {
        assert_eq!(c.tasks, 1, "{c:?}");
        assert!(c.task_bytes.unwrap() > 1000, "{c:?}");
    }
    let (most, reported) = schedule(Some(1 << 40));
    assert_eq!(most, 2, "a budget of 1 TiB ran one task at a time");
    assert!(reported.iter().all(|c| c.tasks == 2), "{reported:?}");
    // The figure is the same on both steps (same tasks), and the same as under the tiny
    // budget: the schedule does not change what a task holds.
    assert_eq!(reported[0].task_bytes, reported[1].task_bytes);
    let bytes = reported[0].task_bytes.unwrap();
    // One task and a half: one at a time; two and a half: two.
    let (most, reported) = schedule(Some(bytes + bytes / 2));
    assert_eq!((most, reported[1].tasks), (1, 1));
    let (most, reported) = schedule(Some(2 * bytes + bytes / 2));
    assert_eq!((most, reported[1].tasks), (2, 2));
    // parallel_iterations still bounds a large budget.
    let mut capped = base.clone();
    capped.config.parallel_iterations = 1;
    capped.config.memory_budget = Some(1 << 40);
    with_threads(2, || capped.meta_gradient(&tasks).unwrap());
    assert_eq!(capped.concurrency().tasks, 1);
    // Without a budget nothing is measured, and all the threads run tasks.
    let (most, reported) = schedule(None);
    assert_eq!(most, 2);
    assert_eq!(reported[1].task_bytes, None);
    assert_eq!(reported[1].tasks, 2);
}

#[test]
fn the_recomputed_inner_loop_measures_less_per_task() {
    let tasks = image_tasks(2, 40);
    let base = MetaLearner::new(
        small_conv(2, NormKind::Batch { per_step: None }),
        MetaConfig::maml(10, 0.1),
        41,
    );
    let stored = per_task(&base, &tasks, false);
    let mut recompute = base.clone();
    recompute.config.memory = Memory::Recompute;
    let recomputed = per_task(&recompute, &tasks, false);
    assert!(
        recomputed * 2 < stored,
        "10 inner steps: recomputed {recomputed} bytes, stored {stored}"
    );
    // A new kind of step (here: first order) is measured afresh.
    let mut first = base.clone();
    first.config.memory_budget = Some(u64::MAX);
    with_threads(1, || first.meta_gradient(&tasks).unwrap());
    first.config.order = Order::First;
    with_threads(1, || first.meta_gradient(&tasks).unwrap());
    let first_order = first.concurrency().task_bytes.unwrap();
    assert!(first_order < stored, "first {first_order}, second {stored}");
}

#[test]
fn the_budget_is_kept_out_of_old_configurations_and_checkpoints() {
    let config = MetaConfig::maml(5, 0.01);
    let json = metagrad::serde_json::to_value(&config).unwrap();
    assert!(
        json.get("memory_budget").is_none(),
        "the default is not written"
    );
    let back: MetaConfig = metagrad::serde_json::from_value(json).unwrap();
    assert_eq!(back.memory_budget, None);
    assert_eq!(back, config);
    let bounded = config.clone().with_memory_budget(3 << 30);
    let json = metagrad::serde_json::to_value(&bounded).unwrap();
    assert_eq!(json["memory_budget"], 3u64 << 30);
    let back: MetaConfig = metagrad::serde_json::from_value(json).unwrap();
    assert_eq!(back, bounded);
    // A restore keeps the learner's budget, and does not list it as a change.
    let saved = MetaLearner::<f32, _>::new(Mlp::sinusoid(), config.with_memory_budget(1), 0);
    let checkpoint = Checkpoint::capture(&saved, &Optimizer::adam(1e-3), &rng_from_seed(0));
    let mut learner = MetaLearner::<f32, _>::new(Mlp::sinusoid(), bounded.clone(), 1);
    assert!(checkpoint.config_changes(&learner.config).is_empty());
    checkpoint.restore(&mut learner).unwrap();
    assert_eq!(learner.config.memory_budget, Some(3 << 30));
    assert_eq!(learner.params, saved.params);
}

#[test]
fn a_budget_of_zero_bytes_is_refused() {
    let config = MetaConfig::maml(1, 0.01).with_memory_budget(0);
    assert!(matches!(config.validate(), Err(Error::Config(_))));
    let mut l = MetaLearner::<f32, _>::new(Mlp::sinusoid(), config, 0);
    let before = l.params.clone();
    let r = l.meta_step(&sinusoid_tasks(2, 50), &mut Optimizer::adam(1e-3));
    assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
    assert_eq!(l.params, before);
    assert!(MetaConfig::maml(1, 0.01)
        .with_memory_budget(1)
        .validate()
        .is_ok());
}

#[test]
fn a_budget_across_ranks_gives_bitwise_one_process() {
    // Five tasks, so that three ranks hold blocks of different sizes.
    let batches: Vec<Vec<Task<f32>>> = (0..3).map(|i| image_tasks(5, 60 + i)).collect();
    let base = MetaLearner::new(
        small_conv(2, NormKind::Batch { per_step: None }),
        MetaConfig::maml(1, 0.2),
        61,
    );
    for reptile in [false, true] {
        let (want, _) = run(&base, &batches, None, 1, reptile);
        for size in [2, 3] {
            for budget in [Some(1), Some(u64::MAX)] {
                let got = common::on_ranks(size, |comm| {
                    let l = base.clone().with_comm(comm).unwrap();
                    run(&l, &batches, budget, 2, reptile).0
                });
                for (rank, g) in got.iter().enumerate() {
                    assert!(
                        *g == want,
                        "reptile={reptile}, budget {budget:?}: rank {rank} of {size} differs"
                    );
                }
            }
        }
    }
}

/// A rank whose block of a step is empty (fewer tasks than ranks) measures nothing; the
/// next step of the same kind must still be bounded by a real figure, not by 0 bytes.
#[test]
fn a_rank_without_tasks_keeps_the_bound() {
    let one = image_tasks(1, 70);
    let five = image_tasks(5, 71);
    let base = MetaLearner::new(
        small_conv(2, NormKind::Batch { per_step: None }),
        MetaConfig::maml(1, 0.2),
        72,
    );
    // Room for one task and a half: one task at a time.
    let budget = Budget::Tasks(1).bytes(per_task(&base, &five, false));
    let got = common::on_ranks(3, |comm| {
        let mut l = base.clone().with_comm(comm).unwrap();
        l.config.memory_budget = budget;
        with_threads(2, || {
            let mut opt = Optimizer::adam(1e-3);
            // One task for three ranks: ranks 1 and 2 run nothing.
            l.meta_step(&one, &mut opt).unwrap();
            l.meta_step(&five, &mut opt).unwrap();
            l.concurrency()
        })
    });
    for (rank, c) in got.iter().enumerate() {
        assert_eq!(c.tasks, 1, "rank {rank}: {c:?}");
        assert!(c.task_bytes.is_some_and(|b| b > 0), "rank {rank}: {c:?}");
    }
}
