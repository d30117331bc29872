//! `Memory::Recompute` (the inner steps' graphs rebuilt during the outer backward) against
//! `Memory::Stored`: the meta-gradient, loss, accuracy, batch-norm statistics and the
//! state after a few meta-steps are bitwise the same, for MAML (second and first order),
//! MAML++ (per-step batch norm, per-tensor per-step rates, multi-step loss, annealed
//! order), Meta-SGD and ANIL at 1, 5 and 25 inner steps, for task chunks on one tape, for
//! TaskNorm, and on 1 and 2 threads.

mod common;
use common::{image_tasks, sinusoid_tasks, small_conv};

use metagrad::map_fn::with_threads;
use metagrad::meta::{InnerRule, Memory, MetaConfig, MetaLearner, Optimizer, Order, Task};
use metagrad::nn::{Mlp, Model, NormKind, Observed};
use metagrad::Float;
use ndarray::ArrayD;

/// Every bit of every value (widening to f64 is exact and keeps the sign of zero).
fn bits<F: Float>(arrays: &[ArrayD<F>]) -> Vec<Vec<u64>> {
    arrays
        .iter()
        .map(|a| a.iter().map(|v| v.f64().to_bits()).collect())
        .collect()
}

fn observed_bits<F: Float>(o: &[Observed<F>]) -> Vec<(usize, usize, Vec<u64>, Vec<u64>)> {
    o.iter()
        .map(|o| {
            let b = |v: &[F]| v.iter().map(|x| x.f64().to_bits()).collect();
            (o.layer, o.step, b(&o.mean), b(&o.var))
        })
        .collect()
}

/// The meta-gradient, statistics and observed batch-norm statistics under `memory`, then
/// the state after `steps` meta-steps with Adam, on `threads` threads.
fn run<F: Float, M: Model<F> + Clone + Sync>(
    base: &MetaLearner<F, M>,
    memory: Memory,
    tasks: &[Vec<Task<F>>],
    threads: usize,
) -> impl PartialEq + std::fmt::Debug {
    let mut l = base.clone();
    l.config.memory = memory;
    with_threads(threads, || {
        let (g, stats, observed) = l.meta_gradient(&tasks[0]).unwrap();
        let first = (
            bits(&g),
            stats.loss.to_bits(),
            stats.accuracy.map(f64::to_bits),
            stats.second_order,
            observed_bits(&observed),
        );
        let mut opt = Optimizer::adam(1e-3);
        let mut losses = Vec::new();
        for batch in tasks {
            let s = l.meta_step(batch, &mut opt).unwrap();
            losses.push((
                s.loss.to_bits(),
                s.accuracy.map(f64::to_bits),
                s.second_order,
            ));
        }
        let digest = l.params.digest();
        (first, losses, digest, common::state(&l, &opt))
    })
}

/// Recompute against Stored, bitwise, on 1 and 2 threads (and the two thread counts
/// against each other).
fn assert_same<F: Float, M: Model<F> + Clone + Sync>(
    name: &str,
    base: &MetaLearner<F, M>,
    tasks: &[Vec<Task<F>>],
) {
    let stored = run(base, Memory::Stored, tasks, 1);
    for threads in [1, 2] {
        let recomputed = run(base, Memory::Recompute, tasks, threads);
        assert!(
            recomputed == stored,
            "{name}: Recompute on {threads} threads differs from Stored"
        );
    }
    assert!(
        run(base, Memory::Stored, tasks, 2) == stored,
        "{name}: Stored differs between 1 and 2 threads"
    );
}

/// The configurations tested, at `steps` inner steps.
fn configs(steps: usize) -> Vec<(&'static str, NormKind, MetaConfig)> {
    let lr = if steps > 5 { 0.05 } else { 0.2 };
    let maml = MetaConfig::maml(steps, lr);
    let mut maml_pp = MetaConfig::maml(steps, lr).with_rule(InnerRule::PerTensorPerStep);
    maml_pp.multi_step_loss = Some(2);
    maml_pp.order = Order::Annealed {
        first_order_steps: 1,
    };
    let bn = NormKind::Batch { per_step: None };
    vec![
        ("MAML", bn, maml.clone()),
        (
            "MAML first order",
            bn,
            maml.clone().with_order(Order::First),
        ),
        ("MAML++", NormKind::Batch { per_step: Some(3) }, maml_pp),
        ("Meta-SGD", bn, maml.clone().with_rule(InnerRule::MetaSgd)),
        (
            "Meta-SGD first order",
            bn,
            maml.clone()
                .with_rule(InnerRule::MetaSgd)
                .with_order(Order::First),
        ),
        ("ANIL", bn, maml.with_rule(InnerRule::HeadOnly)),
    ]
}

fn conv_family<F: Float>(steps: usize, seed: u64) {
    // Three meta-steps of two tasks each; the first batch also gives the meta-gradient.
    let tasks: Vec<Vec<Task<F>>> = (0..3).map(|i| image_tasks(2, seed + i)).collect();
    for (name, norm, config) in configs(steps) {
        let base = MetaLearner::<F, _>::new(small_conv(2, norm), config, seed);
        assert_same(&format!("{name}, {steps} steps"), &base, &tasks);
    }
}

#[test]
fn one_inner_step_is_bitwise_the_stored_path_f32() {
    conv_family::<f32>(1, 10);
}

#[test]
fn five_inner_steps_are_bitwise_the_stored_path_f32() {
    conv_family::<f32>(5, 20);
}

#[test]
fn twenty_five_inner_steps_are_bitwise_the_stored_path_f32() {
    conv_family::<f32>(25, 30);
}

#[test]
fn five_inner_steps_are_bitwise_the_stored_path_f64() {
    conv_family::<f64>(5, 40);
}

#[test]
fn twenty_five_inner_steps_are_bitwise_the_stored_path_f64() {
    conv_family::<f64>(25, 50);
}

#[test]
fn task_chunks_on_one_tape_are_bitwise_the_stored_path() {
    let tasks: Vec<Vec<Task<f32>>> = (0..3).map(|i| sinusoid_tasks(5, 60 + i)).collect();
    for rule in [
        InnerRule::Sgd,
        InnerRule::MetaSgd,
        InnerRule::PerTensorPerStep,
        InnerRule::HeadOnly,
    ] {
        for order in [Order::Second, Order::First] {
            for steps in [1, 5, 25] {
                let mut config = MetaConfig::maml(steps, 0.01)
                    .with_rule(rule)
                    .with_order(order);
                config.multi_step_loss = (rule == InnerRule::PerTensorPerStep).then_some(2);
                for chunk in [1, 2] {
                    config.task_chunk = chunk;
                    let base = MetaLearner::<f32, _>::new(Mlp::sinusoid(), config.clone(), 61);
                    let name = format!("MLP {rule:?} {order:?} {steps} steps, chunks of {chunk}");
                    assert_same(&name, &base, &tasks);
                }
            }
        }
    }
}

#[test]
fn task_norm_and_group_norm_are_bitwise_the_stored_path() {
    let tasks: Vec<Vec<Task<f32>>> = (0..2).map(|i| image_tasks(2, 70 + i)).collect();
    for norm in [NormKind::TaskNorm, NormKind::Group { groups: 1 }] {
        for steps in [1, 5] {
            let mut config = MetaConfig::maml(steps, 0.2);
            config.multi_step_loss = Some(3);
            let base = MetaLearner::<f32, _>::new(small_conv(2, norm), config, 71);
            assert_same(&format!("{norm:?}, {steps} steps"), &base, &tasks);
        }
    }
}

#[test]
fn the_mode_is_kept_out_of_checkpoints_and_old_configurations_read_as_stored() {
    let config = MetaConfig::maml(5, 0.01);
    let json = metagrad::serde_json::to_value(&config).unwrap();
    assert!(json.get("memory").is_none(), "the default is not written");
    let back: MetaConfig = metagrad::serde_json::from_value(json).unwrap();
    assert_eq!(back.memory, Memory::Stored);
    let recompute = config.with_memory(Memory::Recompute);
    let json = metagrad::serde_json::to_value(&recompute).unwrap();
    assert_eq!(json["memory"], "Recompute");
    let back: MetaConfig = metagrad::serde_json::from_value(json).unwrap();
    assert_eq!(back, recompute);
}

#[test]
fn a_non_finite_step_is_refused_or_skipped_the_same_way() {
    use metagrad::meta::NonFinite;
    let mut tasks: Vec<Task<f32>> = image_tasks(3, 80);
    tasks[1].query_x[[2, 0, 3, 4]] = f32::NAN;
    let base = MetaLearner::<f32, _>::new(
        small_conv(2, NormKind::Batch { per_step: None }),
        MetaConfig::maml(3, 0.2),
        81,
    );
    let outcome = |memory: Memory, policy: NonFinite| {
        let mut l = base.clone();
        l.config.memory = memory;
        l.config.on_non_finite = policy;
        let mut opt = Optimizer::adam(1e-3);
        let r = l.meta_step(&tasks, &mut opt);
        let r = r.map(|s| (s.loss.to_bits(), s.skipped));
        (format!("{r:?}"), common::state(&l, &opt))
    };
    for policy in [NonFinite::Error, NonFinite::Skip] {
        let stored = outcome(Memory::Stored, policy);
        assert!(
            stored.0.contains("NonFinite") || stored.0.contains("true"),
            "{policy:?}: {}",
            stored.0
        );
        assert!(outcome(Memory::Recompute, policy) == stored, "{policy:?}");
    }
}

#[test]
fn a_restore_keeps_the_learners_memory_mode() {
    use metagrad::checkpoint::Checkpoint;
    use metagrad::data::rng_from_seed;
    let saved = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(2, 0.01), 0);
    let checkpoint = Checkpoint::capture(&saved, &Optimizer::adam(1e-3), &rng_from_seed(0));
    let config = MetaConfig::maml(2, 0.01).with_memory(Memory::Recompute);
    let mut learner = MetaLearner::<f32, _>::new(Mlp::sinusoid(), config, 1);
    assert!(checkpoint.config_changes(&learner.config).is_empty());
    checkpoint.restore(&mut learner).unwrap();
    assert_eq!(learner.config.memory, Memory::Recompute);
    assert_eq!(learner.params, saved.params);
}
