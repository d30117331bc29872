//! The semantics of the normalisation modes: which outputs depend on which examples,
//! and which modes touch running statistics.

use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
use metagrad::nn::{Conv4, Ctx, Downsample, Model, NormKind, NormMode, NormState, Params};
use metagrad::{Tape, Var};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn conv(norm: NormKind) -> Conv4 {
    Conv4 {
        in_channels: 1,
        image_size: 16,
        filters: 4,
        ways: 3,
        norm,
        downsample: Downsample::MaxPool,
        eps: 1e-5,
    }
}

fn images(n: usize, seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(&[n, 1, 16, 16]), || rng.gen_range(0.0..1.0))
}

/// Running statistics with one (fake) update, so inductive mode has something to use.
fn trained_state(model: &Conv4) -> NormState<f64> {
    let mut s = NormState::new(&<Conv4 as Model<f64>>::batch_norm_channels(model), 1, 0.1);
    for layer in &mut s.stats {
        layer[0].mean = vec![0.1; 4];
        layer[0].var = vec![0.5; 4];
        layer[0].updates = 1;
    }
    s
}

/// Query outputs for `query`, after a context pass over `support` where the model wants one.
fn query_outputs(
    model: &Conv4,
    params: &Params<f64>,
    running: &NormState<f64>,
    mode: NormMode,
    support: &ArrayD<f64>,
    query: &ArrayD<f64>,
) -> ArrayD<f64> {
    let mut t = Tape::new();
    let p: Vec<Var> = params.place_const(&mut t);
    let mut ctx = Ctx::new(mode).with_running(running);
    if Model::<f64>::needs_context(model) {
        let s = t.constant(support.clone());
        ctx.record_context = true;
        model.forward(&mut t, &p, s, &mut ctx);
        ctx.record_context = false;
    }
    let q = t.constant(query.clone());
    let out = model.forward(&mut t, &p, q, &mut ctx);
    t.value(out).clone()
}

/// Largest change in the outputs of examples 1.. when example 0 of the query set changes.
fn leak_into_other_examples(norm: NormKind, mode: NormMode) -> f64 {
    let model = conv(norm);
    let params: Params<f64> = model.init(1);
    let running = trained_state(&model);
    let support = images(3, 2);
    let query = images(6, 3);
    let mut changed = query.clone();
    for v in changed.slice_mut(ndarray::s![0, .., .., ..]).iter_mut() {
        *v = 1.0 - *v;
    }
    let a = query_outputs(&model, &params, &running, mode, &support, &query);
    let b = query_outputs(&model, &params, &running, mode, &support, &changed);
    let rows = |x: &ArrayD<f64>| x.slice(ndarray::s![1.., ..]).to_owned();
    assert!(
        (&a.slice(ndarray::s![0, ..]) - &b.slice(ndarray::s![0, ..]))
            .iter()
            .any(|d| d.abs() > 1e-9),
        "the changed example's own output must change"
    );
    (&rows(&a) - &rows(&b))
        .iter()
        .fold(0.0, |m, d| m.max(d.abs()))
}

#[test]
fn transductive_batch_norm_lets_one_query_example_change_the_others() {
    let leak = leak_into_other_examples(NormKind::Batch { per_step: None }, NormMode::Transductive);
    assert!(
        leak > 1e-6,
        "transductive batch norm should couple query examples ({leak:e})"
    );
}

#[test]
fn inductive_batch_norm_group_layer_instance_and_task_norm_do_not() {
    let cases = [
        (NormKind::Batch { per_step: None }, NormMode::Inductive),
        (NormKind::Group { groups: 2 }, NormMode::Transductive),
        (NormKind::Layer, NormMode::Transductive),
        (NormKind::Instance, NormMode::Transductive),
        (NormKind::TaskNorm, NormMode::Transductive),
    ];
    for (norm, mode) in cases {
        let leak = leak_into_other_examples(norm, mode);
        assert!(
            leak < 1e-12,
            "{norm:?} in {mode} mode couples query examples ({leak:e})"
        );
    }
}

#[test]
fn group_layer_instance_and_task_norm_are_the_same_in_every_mode() {
    for norm in [
        NormKind::Group { groups: 2 },
        NormKind::Layer,
        NormKind::Instance,
        NormKind::TaskNorm,
    ] {
        let model = conv(norm);
        let params: Params<f64> = model.init(4);
        let running = NormState::new(&[], 1, 0.1);
        let (s, q) = (images(3, 5), images(4, 6));
        let outs: Vec<_> = [NormMode::Train, NormMode::Transductive, NormMode::Inductive]
            .into_iter()
            .map(|m| query_outputs(&model, &params, &running, m, &s, &q))
            .collect();
        assert_eq!(outs[0], outs[1], "{norm:?}");
        assert_eq!(outs[0], outs[2], "{norm:?}");
    }
}

#[test]
fn only_training_mode_reports_batch_statistics() {
    let model = conv(NormKind::Batch { per_step: None });
    let params: Params<f64> = model.init(7);
    let running = trained_state(&model);
    for (mode, expect) in [
        (NormMode::Train, 4),
        (NormMode::Transductive, 0),
        (NormMode::Inductive, 0),
    ] {
        let mut t = Tape::new();
        let p = params.place_const(&mut t);
        let x = t.constant(images(5, 8));
        let mut ctx = Ctx::new(mode).with_running(&running);
        model.forward(&mut t, &p, x, &mut ctx);
        assert_eq!(ctx.observed.len(), expect, "{mode}");
    }
}

#[test]
fn meta_training_updates_running_statistics_and_evaluation_does_not() {
    let model = conv(NormKind::Batch { per_step: None });
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let task = |rng: &mut ChaCha8Rng| Task {
        support_x: ArrayD::from_shape_simple_fn(IxDyn(&[3, 1, 16, 16]), || {
            rng.gen_range(0.0..1.0f32)
        }),
        support_y: metagrad::meta::Targets::Classes(vec![0, 1, 2]),
        query_x: ArrayD::from_shape_simple_fn(IxDyn(&[3, 1, 16, 16]), || {
            rng.gen_range(0.0..1.0f32)
        }),
        query_y: metagrad::meta::Targets::Classes(vec![2, 1, 0]),
    };
    let tasks = vec![task(&mut rng), task(&mut rng)];
    let mut learner = MetaLearner::<f32, _>::new(model, MetaConfig::maml(1, 0.1), 10);
    let fresh = learner.norm.clone();
    learner
        .meta_step(&tasks, &mut Optimizer::adam(1e-3))
        .unwrap();
    assert_ne!(
        learner.norm, fresh,
        "training mode folds in batch statistics"
    );
    assert!(learner.norm.stats.iter().all(|l| l[0].updates > 0));
    let after_training = learner.norm.clone();
    for mode in [NormMode::Transductive, NormMode::Inductive] {
        learner.evaluate_task(&tasks[0], 3, mode).unwrap();
        assert_eq!(
            learner.norm, after_training,
            "evaluation in {mode} mode changed statistics"
        );
    }
    // A learner whose training mode is transductive never touches them.
    let mut t = learner.clone();
    t.config.train_mode = NormMode::Transductive;
    t.meta_step(&tasks, &mut Optimizer::adam(1e-3)).unwrap();
    assert_eq!(t.norm, after_training);
}

#[test]
#[should_panic(expected = "inductive mode needs running statistics")]
fn inductive_mode_without_running_statistics_fails_loudly() {
    let model = conv(NormKind::Batch { per_step: None });
    let params: Params<f64> = model.init(11);
    let fresh = NormState::new(&[4; 4], 1, 0.1);
    query_outputs(
        &model,
        &params,
        &fresh,
        NormMode::Inductive,
        &images(3, 12),
        &images(3, 13),
    );
}
