//! Nothing silent at the level of a training run: a non-finite step never reaches the
//! parameters (refused or skipped, leaving every piece of state bitwise as it was), a
//! request that cannot make sense is refused before anything changes, and evaluation
//! reports a non-finite result as an error.

use metagrad::meta::Targets;
use metagrad::meta::{InnerRule, MetaConfig, MetaLearner, NonFinite, Optimizer, Task};
use metagrad::nn::{Mlp, Model, NormKind, NormMode};
use metagrad::{Error, Float};
use ndarray::{ArrayD, IxDyn};

mod common;
use common::{image_tasks, sinusoid_tasks, small_conv, state};

/// Trains two clean steps (so Adam has momentum that a bad step could apply), then
/// returns the learner and optimiser.
fn trained<F: Float, M: Model<F> + Clone>(
    model: M,
    tasks: &[Task<F>],
    reptile: bool,
) -> (MetaLearner<F, M>, Optimizer<F>) {
    let mut l = MetaLearner::new(model, MetaConfig::maml(1, 0.01), 0);
    let mut opt = Optimizer::adam(1e-3);
    for _ in 0..2 {
        if reptile {
            l.reptile_step(tasks, &mut opt).unwrap();
        } else {
            l.meta_step(tasks, &mut opt).unwrap();
        }
    }
    (l, opt)
}

fn poison<F: Float>(a: &mut ArrayD<F>, at: usize, v: F) {
    *a.iter_mut().nth(at).unwrap() = v;
}

#[test]
fn a_nan_support_point_is_refused_and_changes_nothing() {
    let clean = sinusoid_tasks::<f32>(6, 1);
    for reptile in [false, true] {
        let (mut l, mut opt) = trained(Mlp::sinusoid(), &clean, reptile);
        let mut bad = sinusoid_tasks::<f32>(6, 2);
        poison(&mut bad[4].support_x, 3, f32::NAN);
        let before = state(&l, &opt);
        let r = if reptile {
            l.reptile_step(&bad, &mut opt)
        } else {
            l.meta_step(&bad, &mut opt)
        };
        match r {
            Err(Error::NonFinite {
                during,
                step,
                tasks,
                param,
                data,
            }) => {
                assert_eq!(during, if reptile { "reptile_step" } else { "meta_step" });
                assert_eq!(step, 2);
                // Sinusoid tasks run in chunks; the culprit is still named alone.
                assert_eq!(tasks, vec![4]);
                assert_eq!(param.as_deref(), Some("l0.w"), "first parameter affected");
                // And the data that caused it.
                assert_eq!(data.as_deref(), Some("task 4: support_x[3, 0] = NaN"));
            }
            r => panic!("expected a non-finite error, got {r:?}"),
        }
        assert!(
            before == state(&l, &opt),
            "a refused step changed the state"
        );
        let msg = l.meta_step(&bad, &mut opt).unwrap_err().to_string();
        assert!(
            msg.contains("meta-step 2")
                && msg.contains("[4]")
                && msg.contains("nothing was changed"),
            "{msg}"
        );
        // The run goes on as if the bad batch never came.
        l.meta_step(&clean, &mut opt).unwrap();
        assert_eq!(l.step, 3);
        assert!(l
            .params
            .tensors()
            .iter()
            .all(|p| p.iter().all(|v| v.is_finite())));
    }
}

#[test]
fn a_nan_query_pixel_under_batch_norm_is_refused_and_changes_nothing() {
    let clean: Vec<Task<f32>> = image_tasks(4, 3);
    let (mut l, mut opt) = trained(
        small_conv(3, NormKind::Batch { per_step: None }),
        &clean,
        false,
    );
    let mut bad = image_tasks::<f32>(4, 4);
    poison(&mut bad[1].query_x, 17, f32::NAN);
    poison(&mut bad[3].query_x, 0, f32::INFINITY);
    let before = state(&l, &opt);
    match l.meta_step(&bad, &mut opt) {
        Err(Error::NonFinite { tasks, param, .. }) => {
            assert_eq!(tasks, vec![1, 3]);
            assert!(param.is_some());
        }
        r => panic!("expected a non-finite error, got {r:?}"),
    }
    assert!(
        before == state(&l, &opt),
        "running statistics or parameters changed"
    );
}

#[test]
fn the_skip_policy_skips_counts_and_changes_nothing_else() {
    let clean = sinusoid_tasks::<f32>(4, 5);
    let (mut l, mut opt) = trained(Mlp::sinusoid(), &clean, false);
    l.config.on_non_finite = NonFinite::Skip;
    let mut bad = sinusoid_tasks::<f32>(4, 6);
    poison(bad[0].query_y_values(), 0, f32::NAN);
    let (params, norm, step, opt0) = (l.params.clone(), l.norm.clone(), l.step, opt.clone());
    let stats = l.meta_step(&bad, &mut opt).unwrap();
    assert!(stats.skipped && stats.loss.is_nan());
    assert_eq!(l.skipped_steps, 1);
    assert!(params == l.params && norm == l.norm && step == l.step && opt0 == opt);
    let stats = l.reptile_step(&bad, &mut opt).unwrap();
    assert!(stats.skipped);
    assert_eq!(l.skipped_steps, 2);
    assert!(params == l.params && opt0 == opt);
    let stats = l.meta_step(&clean, &mut opt).unwrap();
    assert!(!stats.skipped && l.step == step + 1);
}

/// Sets one query target of a regression task.
trait QueryValues {
    fn query_y_values(&mut self) -> &mut ArrayD<f32>;
}
impl QueryValues for Task<f32> {
    fn query_y_values(&mut self) -> &mut ArrayD<f32> {
        match &mut self.query_y {
            Targets::Values(v) => v,
            _ => unreachable!(),
        }
    }
}

#[test]
fn an_update_that_overflows_is_refused_even_with_finite_gradients() {
    // Huge targets: the loss and gradients are finite in f32, but SGD with a huge rate
    // would take the parameters past the largest float.
    let mut tasks = sinusoid_tasks::<f32>(2, 7);
    for t in &mut tasks {
        t.query_y_values().mapv_inplace(|v| v * 1e15);
    }
    let mut l = MetaLearner::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.0), 0);
    let (_, stats, _) = l.meta_gradient(&tasks).unwrap();
    assert!(stats.loss.is_finite());
    let mut opt = Optimizer::sgd(1e30);
    let before = state(&l, &opt);
    match l.meta_step(&tasks, &mut opt) {
        Err(Error::NonFinite { tasks, param, .. }) => {
            assert!(tasks.is_empty(), "every task was finite: {tasks:?}");
            assert!(param.is_some());
        }
        r => panic!("expected a non-finite error, got {r:?}"),
    }
    assert!(before == state(&l, &opt));
}

#[test]
fn degenerate_requests_are_refused_before_any_state_changes() {
    let clean = sinusoid_tasks::<f32>(4, 8);
    let (mut l, mut opt) = trained(Mlp::sinusoid(), &clean, false);
    let before = state(&l, &opt);
    let config = |r: metagrad::Result<_>, what: &str, needle: &str| match r {
        Err(Error::Config(m)) => assert!(m.contains(needle), "{what}: {m}"),
        r => panic!("{what}: expected a configuration error, got {r:?}"),
    };
    config(
        l.meta_step(&[], &mut opt),
        "empty batch",
        "empty meta-batch",
    );
    config(
        l.reptile_step(&[], &mut opt),
        "empty batch",
        "empty meta-batch",
    );

    let mut t = clean.clone();
    t[2].query_x = ArrayD::zeros(IxDyn(&[0, 1]));
    t[2].query_y = Targets::Values(ArrayD::zeros(IxDyn(&[0, 1])));
    config(l.meta_step(&t, &mut opt), "empty query", "task 2");
    config(
        l.meta_step(&t, &mut opt),
        "empty query",
        "query set is empty",
    );

    let mut t = clean.clone();
    t[0].support_x = ArrayD::zeros(IxDyn(&[0, 1]));
    t[0].support_y = Targets::Values(ArrayD::zeros(IxDyn(&[0, 1])));
    config(
        l.meta_step(&t, &mut opt),
        "empty support",
        "support set is empty",
    );

    let mut t = clean.clone();
    t[3] = sinusoid_tasks::<f32>(1, 9).remove(0);
    t[3].query_x = ArrayD::zeros(IxDyn(&[7, 1]));
    t[3].query_y = Targets::Values(ArrayD::zeros(IxDyn(&[7, 1])));
    // Tasks of different shapes are no longer degenerate: each runs on its own tape (on
    // copies here, so that the state checked below stays untouched).
    let (mut l2, mut opt2) = (l.clone(), opt.clone());
    assert!(!l2.meta_step(&t, &mut opt2).unwrap().skipped);
    assert_eq!(l2.step, l.step + 1);

    let mut t = clean.clone();
    t[1].support_y = Targets::Values(ArrayD::zeros(IxDyn(&[4, 1])));
    config(l.meta_step(&t, &mut opt), "targets vs inputs", "5 inputs");

    let mut nan_lr = Optimizer::adam(f64::NAN);
    config(
        l.meta_step(&clean, &mut nan_lr),
        "NaN outer rate",
        "learning rate",
    );
    let mut inf_clip = opt.clone().with_clip_norm(f64::INFINITY);
    config(
        l.meta_step(&clean, &mut inf_clip),
        "infinite clip",
        "clipping norm",
    );
    let saved = l.config.clone();
    l.config.inner_lr = f64::INFINITY;
    config(
        l.meta_step(&clean, &mut opt),
        "infinite inner rate",
        "inner learning rate",
    );
    l.config = saved.clone();
    l.config.inner_steps = 0;
    config(
        l.reptile_step(&clean, &mut opt),
        "Reptile without steps",
        "inner step",
    );
    l.config = saved;
    assert!(
        before == state(&l, &opt),
        "a refused request changed the state"
    );

    // set_params refuses a wrong layout and non-finite values with the crate's error.
    let mut p = l.params.clone();
    poison(&mut p.tensors_mut()[1], 0, f32::NAN);
    assert!(matches!(l.set_params(p), Err(Error::Config(m)) if m.contains("l0.b")));
    let other = MetaLearner::<f32, _>::new(Mlp::new(vec![1, 3, 1]), MetaConfig::maml(1, 0.01), 0);
    assert!(matches!(l.set_params(other.params), Err(Error::Config(_))));
    assert!(before == state(&l, &opt));
}

#[test]
fn evaluation_reports_errors_instead_of_numbers_or_panics() {
    let tasks: Vec<Task<f32>> = image_tasks(2, 10);
    let (l, _) = trained(
        small_conv(3, NormKind::Batch { per_step: None }),
        &tasks,
        false,
    );
    let (loss, acc) = l.evaluate_task(&tasks[0], 2, NormMode::Inductive).unwrap();
    assert!(loss.is_finite() && acc.is_some());

    let mut nan = tasks[0].clone();
    poison(&mut nan.support_x, 5, f32::NAN);
    assert!(matches!(
        l.evaluate_task(&nan, 2, NormMode::Inductive),
        Err(Error::NonFinite {
            during: "evaluate",
            ..
        })
    ));
    let mut bad_label = tasks[0].clone();
    bad_label.query_y = Targets::Classes(vec![0, 1, 2, 0, 1, 7]);
    match l.evaluate_task(&bad_label, 2, NormMode::Inductive) {
        Err(Error::Task { message, .. }) => assert!(message.contains("label 7"), "{message}"),
        r => panic!("expected a task error, got {r:?}"),
    }
    let mut empty = tasks[0].clone();
    empty.query_x = ArrayD::zeros(IxDyn(&[0, 1, 16, 16]));
    empty.query_y = Targets::Classes(vec![]);
    assert!(matches!(
        l.evaluate_task(&empty, 2, NormMode::Inductive),
        Err(Error::Config(_))
    ));
    // The protocol names the task within the whole evaluation.
    let mut set = image_tasks::<f32>(3, 11);
    poison(&mut set[2].query_x, 0, f32::NAN);
    match metagrad::eval::evaluate(&l, &set, 2, NormMode::Inductive, 2) {
        Err(Error::NonFinite { tasks, .. }) => assert_eq!(tasks, vec![2]),
        r => panic!("expected a non-finite error, got {r:?}"),
    }
}

/// One-hot dense labels give the same meta-gradient as sparse labels (and the same
/// step), through second-order MAML on a Conv-4 with batch norm.
#[test]
fn dense_and_sparse_targets_give_the_same_meta_gradient() {
    let sparse: Vec<Task<f64>> = image_tasks(3, 12);
    let one_hot = |y: &Targets<f64>| match y {
        Targets::Classes(c) => {
            let mut p = ArrayD::zeros(IxDyn(&[c.len(), 3]));
            for (i, &k) in c.iter().enumerate() {
                p[[i, k]] = 1.0;
            }
            Targets::Probabilities(p)
        }
        _ => unreachable!(),
    };
    let dense: Vec<Task<f64>> = sparse
        .iter()
        .map(|t| Task {
            support_y: one_hot(&t.support_y),
            query_y: one_hot(&t.query_y),
            ..t.clone()
        })
        .collect();
    for rule in [InnerRule::Sgd, InnerRule::MetaSgd] {
        let l = MetaLearner::new(
            small_conv(3, NormKind::Batch { per_step: None }),
            MetaConfig::maml(2, 0.1).with_rule(rule),
            3,
        );
        let (gs, ss, _) = l.meta_gradient(&sparse).unwrap();
        let (gd, sd, _) = l.meta_gradient(&dense).unwrap();
        assert_eq!(ss.accuracy, sd.accuracy);
        assert!((ss.loss - sd.loss).abs() <= 1e-15 * ss.loss.abs());
        for (a, b) in gs.iter().zip(&gd) {
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(b)
                .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-13 * scale.max(1e-300),
                "meta-gradients differ by {diff:e}"
            );
            assert!(scale > 0.0);
        }
    }
}
