//! MAML family: second-order meta-gradients against finite differences, first-order
//! semantics, non-zero meta-gradients, the inner step, and learning on sinusoids.

use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection, SinusoidSampler};
use metagrad::meta::{InnerLoop, InnerRule, MetaConfig, MetaLearner, Optimizer, Order, Task};
use metagrad::nn::{Conv4, Ctx, Downsample, Mlp, Model, NormKind, NormMode, Params};
use metagrad::Tape;
use ndarray::{Array3, ArrayD};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A small Conv-4 (16×16 inputs, 3 filters, 3 ways) with batch norm.
fn small_conv(norm: NormKind) -> Conv4 {
    Conv4 {
        in_channels: 1,
        image_size: 16,
        filters: 3,
        ways: 3,
        norm,
        downsample: Downsample::MaxPool,
        eps: 1e-5,
    }
}

/// Three-way one-shot tasks with two queries per class on random 16×16 "images".
fn image_tasks(n: usize, seed: u64) -> Vec<Task<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images = Array3::from_shape_simple_fn((6 * 5, 16, 16), || rng.gen_range(0.0..1.0f32));
    let coll = ImageCollection::from_class_sizes(images, &[5; 6]).unwrap();
    let mut s = EpisodeSampler::new(&coll, EpisodeSpec::new(3, 1, 2), seed).unwrap();
    (0..n).map(|_| Task::from_episode(&s.sample())).collect()
}

fn random_direction(p: &Params<f64>, seed: u64) -> Vec<ArrayD<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    p.tensors()
        .iter()
        .map(|t| ArrayD::from_shape_simple_fn(t.shape(), || rng.gen_range(-1.0..1.0)))
        .collect()
}

fn shifted(p: &Params<f64>, d: &[ArrayD<f64>], eps: f64) -> Params<f64> {
    let mut q = p.clone();
    for (t, d) in q.tensors_mut().iter_mut().zip(d) {
        t.zip_mut_with(d, |a, &b| *a += eps * b);
    }
    q
}

fn dot(a: &[ArrayD<f64>], b: &[ArrayD<f64>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x * y).sum()).sum()
}

/// The meta-gradient along `d` and the central difference of the meta-loss along `d`.
fn directional<M: Model<f64> + Clone>(
    learner: &MetaLearner<f64, M>,
    tasks: &[Task<f64>],
    d: &[ArrayD<f64>],
) -> (f64, f64) {
    let (g, _, _) = learner.meta_gradient(tasks).unwrap();
    let eps = 1e-6;
    let loss_at = |s: f64| {
        let mut l = learner.clone();
        l.params = shifted(&learner.params, d, s);
        l.meta_gradient(tasks).unwrap().1.loss
    };
    let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
    (dot(&g, d), fd)
}

#[test]
fn second_order_meta_gradient_matches_finite_differences_through_conv4_batch_norm() {
    let tasks = image_tasks(2, 1);
    for steps in [1, 2] {
        let config = MetaConfig::maml(steps, 0.3);
        let learner =
            MetaLearner::<f64, _>::new(small_conv(NormKind::Batch { per_step: None }), config, 2);
        let d = random_direction(&learner.params, 3);
        let (so, fd) = directional(&learner, &tasks, &d);
        let rel = (so - fd).abs() / fd.abs();
        assert!(
            rel < 1e-6,
            "{steps} steps: second order {so} vs finite difference {fd} (rel {rel:e})"
        );

        // First order is a different (biased) direction.
        let mut fo = learner.clone();
        fo.config.order = Order::First;
        let (g_fo, _, _) = fo.meta_gradient(&tasks).unwrap();
        let rel_fo = (dot(&g_fo, &d) - fd).abs() / fd.abs();
        assert!(
            rel_fo > 1e-3,
            "{steps} steps: first order unexpectedly exact (rel {rel_fo:e})"
        );
    }
}

#[test]
fn first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters() {
    let tasks = image_tasks(1, 4);
    let task = &tasks[0];
    let config = MetaConfig::maml(2, 0.3).with_order(Order::First);
    let learner =
        MetaLearner::<f64, _>::new(small_conv(NormKind::Batch { per_step: None }), config, 5);
    let (g_fo, _, _) = learner.meta_gradient(&tasks).unwrap();

    // Adapt, take the adapted values as fresh parameters, differentiate the query loss.
    let mut t = Tape::new();
    let theta = learner.params.place(&mut t);
    let xs = t.constant(task.support_x.clone());
    let mut ctx = Ctx::new(NormMode::Train);
    let traj = InnerLoop {
        model: &learner.model,
        rule: InnerRule::Sgd,
        lr: 0.3,
        steps: 2,
        create_graph: false,
    }
    .adapt(&mut t, &theta, &[], xs, &task.support_y, &mut ctx);
    let phi: Vec<ArrayD<f64>> = traj[2].iter().map(|v| t.value(*v).clone()).collect();
    let mut t2 = Tape::new();
    let p2: Vec<_> = phi.into_iter().map(|a| t2.param(a)).collect();
    let xq = t2.constant(task.query_x.clone());
    let out = learner
        .model
        .forward(&mut t2, &p2, xq, &mut Ctx::new(NormMode::Train));
    let l = task.query_y.loss(&mut t2, out);
    let g = t2.grad(l, &p2, false);
    for (i, (a, b)) in g_fo.iter().zip(&g).enumerate() {
        let diff = metagrad::check::max_abs_diff(a, t2.value(*b));
        assert!(diff < 1e-12, "parameter {i}: {diff}");
    }
}

/// Names of conv biases followed by a per-channel normalisation: the loss is exactly
/// invariant to them, so their gradient is zero in exact arithmetic.
fn cancelled_by_norm(name: &str, norm: NormKind) -> bool {
    name.ends_with("conv.b")
        && !matches!(
            norm,
            NormKind::None | NormKind::Group { .. } | NormKind::Layer
        )
}

#[test]
fn every_meta_parameter_receives_a_meta_gradient() {
    let tasks = image_tasks(2, 6);
    let configs = [
        (
            "MAML",
            NormKind::Batch { per_step: None },
            MetaConfig::maml(2, 0.3),
        ),
        (
            "Meta-SGD",
            NormKind::Batch { per_step: None },
            MetaConfig::maml(2, 0.3).with_rule(InnerRule::MetaSgd),
        ),
        (
            "ANIL",
            NormKind::Batch { per_step: None },
            MetaConfig::maml(2, 0.3).with_rule(InnerRule::HeadOnly),
        ),
        ("MAML++", NormKind::Batch { per_step: Some(3) }, {
            let mut c = MetaConfig::maml(2, 0.3).with_rule(InnerRule::PerTensorPerStep);
            c.multi_step_loss = Some(100);
            c.order = Order::Annealed {
                first_order_steps: 0,
            };
            c
        }),
        (
            "group norm",
            NormKind::Group { groups: 1 },
            MetaConfig::maml(1, 0.3),
        ),
        ("TaskNorm", NormKind::TaskNorm, MetaConfig::maml(1, 0.3)),
    ];
    for (name, norm, config) in configs {
        let learner = MetaLearner::<f64, _>::new(small_conv(norm), config, 7);
        let (g, stats, _) = learner.meta_gradient(&tasks).unwrap();
        assert!(stats.second_order);
        for ((pname, _), gi) in learner.params.iter().zip(&g) {
            let norm2 = gi.iter().map(|v| v * v).sum::<f64>().sqrt();
            if cancelled_by_norm(pname, norm) {
                assert!(
                    norm2 < 1e-9,
                    "{name}: {pname} should be invariant, gradient norm {norm2:e}"
                );
            } else {
                assert!(norm2 > 1e-8, "{name}: {pname} has a zero meta-gradient");
            }
        }
    }
    // The MLP has no normalisation: every tensor, rates included.
    let batch = SinusoidSampler::new(5, 5, 8)
        .unwrap()
        .sample_batch(3)
        .unwrap();
    let tasks = Task::<f64>::from_sinusoid(&batch);
    for rule in [
        InnerRule::Sgd,
        InnerRule::MetaSgd,
        InnerRule::PerTensorPerStep,
    ] {
        let learner = MetaLearner::<f64, _>::new(
            Mlp::sinusoid(),
            MetaConfig::maml(2, 0.01).with_rule(rule),
            9,
        );
        let (g, _, _) = learner.meta_gradient(&tasks).unwrap();
        for ((pname, _), gi) in learner.params.iter().zip(&g) {
            assert!(
                gi.iter().any(|v| v.abs() > 1e-10),
                "{rule:?}: {pname} has a zero meta-gradient"
            );
        }
    }
}

#[test]
fn one_inner_step_lowers_the_support_loss() {
    let tasks = image_tasks(3, 10);
    let learner = MetaLearner::<f64, _>::new(
        small_conv(NormKind::Batch { per_step: None }),
        MetaConfig::maml(1, 0.01),
        11,
    );
    for task in &tasks {
        let mut t = Tape::new();
        let theta = learner.params.place(&mut t);
        let xs = t.constant(task.support_x.clone());
        let mut ctx = Ctx::new(NormMode::Transductive);
        let traj = InnerLoop {
            model: &learner.model,
            rule: InnerRule::Sgd,
            lr: 0.01,
            steps: 1,
            create_graph: false,
        }
        .adapt(&mut t, &theta, &[], xs, &task.support_y, &mut ctx);
        let loss_with = |t: &mut Tape<f64>, p: &[metagrad::Var]| {
            let out = learner
                .model
                .forward(t, p, xs, &mut Ctx::new(NormMode::Transductive));
            let l = task.support_y.loss(t, out);
            t.item(l)
        };
        let before = loss_with(&mut t, &traj[0]);
        let after = loss_with(&mut t, &traj[1]);
        assert!(after < before, "support loss rose: {before} -> {after}");
    }
}

#[test]
fn meta_gradient_is_bitwise_identical_across_thread_counts_and_bounds() {
    let batch = SinusoidSampler::new(10, 10, 12)
        .unwrap()
        .sample_batch(9)
        .unwrap();
    let tasks = Task::<f32>::from_sinusoid(&batch);
    let base = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(2, 0.01), 13);
    let reference = {
        let mut l = base.clone();
        l.config.parallel_iterations = 1;
        l.meta_gradient(&tasks).unwrap().0
    };
    for threads in [1, 2, 8] {
        for bound in [1, 3, usize::MAX] {
            let mut l = base.clone();
            l.config.parallel_iterations = bound;
            let g = metagrad::map_fn::with_threads(threads, || l.meta_gradient(&tasks).unwrap().0);
            assert_eq!(g, reference, "threads {threads}, bound {bound}");
        }
    }
}

#[test]
fn a_few_hundred_meta_steps_of_maml_learn_to_adapt_on_sinusoids() {
    let mut learner = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 0);
    let mut opt = Optimizer::adam(1e-3);
    let mut sampler = SinusoidSampler::new(10, 10, 1).unwrap();
    for _ in 0..1000 {
        let tasks = Task::from_sinusoid(&sampler.sample_batch(25).unwrap());
        learner.meta_step(&tasks, &mut opt).unwrap();
    }
    let test = Task::<f32>::from_sinusoid(
        &SinusoidSampler::new(10, 50, 99)
            .unwrap()
            .sample_batch(100)
            .unwrap(),
    );
    let mse = |steps: usize| -> f64 {
        test.iter()
            .map(|t| {
                learner
                    .evaluate_task(t, steps, NormMode::Transductive)
                    .unwrap()
                    .0
            })
            .sum::<f64>()
            / test.len() as f64
    };
    let (pre, post) = (mse(0), mse(10));
    assert!(
        post < 0.5 * pre,
        "post-adaptation MSE {post} not well below pre-adaptation {pre}"
    );
}

#[test]
fn reptile_step_moves_towards_adapted_parameters() {
    let batch = SinusoidSampler::new(10, 10, 14)
        .unwrap()
        .sample_batch(4)
        .unwrap();
    let tasks = Task::<f64>::from_sinusoid(&batch);
    let mut learner = MetaLearner::<f64, _>::new(Mlp::sinusoid(), MetaConfig::maml(3, 0.01), 15);
    let before = learner.params.clone();
    let stats = learner
        .reptile_step(&tasks, &mut Optimizer::sgd(1.0))
        .unwrap();
    assert!(stats.loss.is_finite());
    assert_ne!(before, learner.params);
    // With SGD at rate 1 the initialisation becomes the mean adapted parameters: a second
    // adaptation from there changes the support loss less than from the original point.
    assert_eq!(learner.step, 1);
}

#[test]
fn a_panicking_task_is_reported_with_its_index() {
    let r = metagrad::map_fn::map_tasks(6, 4, |i| {
        if i == 3 {
            panic!("bad data in this task");
        }
        i * 2
    });
    match r {
        Err(metagrad::Error::Task { index, message }) => {
            assert_eq!(index, 3);
            assert!(message.contains("bad data"), "{message}");
        }
        other => panic!("expected a task error, got {other:?}"),
    }
}

#[test]
fn evaluation_with_more_steps_than_training_uses_learned_rates() {
    let batch = SinusoidSampler::new(10, 10, 16)
        .unwrap()
        .sample_batch(2)
        .unwrap();
    let tasks = Task::<f64>::from_sinusoid(&batch);
    let learner = MetaLearner::<f64, _>::new(
        Mlp::sinusoid(),
        MetaConfig::maml(2, 0.01).with_rule(InnerRule::PerTensorPerStep),
        17,
    );
    let (l0, _) = learner
        .evaluate_task(&tasks[0], 0, NormMode::Transductive)
        .unwrap();
    let (l5, _) = learner
        .evaluate_task(&tasks[0], 5, NormMode::Transductive)
        .unwrap();
    assert!(l5 < l0);
}

#[test]
fn batched_task_chunks_give_the_per_task_meta_gradient() {
    let batch = SinusoidSampler::new(10, 10, 18)
        .unwrap()
        .sample_batch(11)
        .unwrap();
    let tasks = Task::<f64>::from_sinusoid(&batch);
    for rule in [
        InnerRule::Sgd,
        InnerRule::MetaSgd,
        InnerRule::PerTensorPerStep,
        InnerRule::HeadOnly,
    ] {
        for order in [Order::Second, Order::First] {
            let mut learner = MetaLearner::<f64, _>::new(
                Mlp::sinusoid(),
                MetaConfig::maml(3, 0.02).with_rule(rule).with_order(order),
                19,
            );
            learner.config.task_chunk = 1;
            let (g1, s1, _) = learner.meta_gradient(&tasks).unwrap();
            learner.config.task_chunk = 4;
            let (g4, s4, _) = learner.meta_gradient(&tasks).unwrap();
            assert!(
                (s1.loss - s4.loss).abs() < 1e-12,
                "{rule:?} {order:?}: loss {} vs {}",
                s1.loss,
                s4.loss
            );
            for (a, b) in g1.iter().zip(&g4) {
                let d = metagrad::check::max_abs_diff(a, b);
                assert!(
                    d < 1e-12,
                    "{rule:?} {order:?}: meta-gradients differ by {d:e}"
                );
            }
        }
    }
}
