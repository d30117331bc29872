//! Errors that point at their cause: non-finite data named by task, array and position;
//! labels checked before a step; tasks of different shapes in one meta-batch; what a
//! restore changes; the user's state in a checkpoint.

use metagrad::checkpoint::Checkpoint;
use metagrad::data::{
    rng_from_seed, EpisodeSampler, EpisodeSpec, ImageCollection, SinusoidSampler,
};
use metagrad::map_fn::with_threads;
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Targets, Task};
use metagrad::nn::{Conv4, Mlp, NormKind, NormMode};
use metagrad::serde_json::json;
use metagrad::Error;
use ndarray::{Array3, ArrayD};
use rand::Rng;

fn small_conv() -> Conv4 {
    Conv4 {
        image_size: 16,
        filters: 3,
        norm: NormKind::Batch { per_step: None },
        ..Conv4::omniglot(3)
    }
}

fn collection() -> ImageCollection {
    let mut rng = rng_from_seed(3);
    let images = Array3::from_shape_simple_fn((6 * 7, 16, 16), || rng.gen_range(0.0..1.0f32));
    ImageCollection::from_class_sizes(images, &[7; 6]).unwrap()
}

fn episodes<F: metagrad::Float>(spec: EpisodeSpec, n: usize, seed: u64) -> Vec<Task<F>> {
    let c = collection();
    let mut s = EpisodeSampler::new(&c, spec, seed).unwrap();
    Task::from_episodes(&s.sample_batch(n).unwrap())
}

fn set(a: &mut ArrayD<f32>, index: &[usize], v: f32) {
    a[ndarray::IxDyn(index)] = v;
}

#[test]
fn non_finite_data_is_named_by_task_array_and_position() {
    let mut tasks = episodes::<f32>(EpisodeSpec::new(3, 1, 2), 4, 1);
    set(&mut tasks[2].query_x, &[4, 0, 7, 9], f32::NAN);
    let mut l = MetaLearner::new(small_conv(), MetaConfig::maml(1, 0.1), 0);
    let before = l.params.clone();
    let err = l.meta_step(&tasks, &mut Optimizer::adam(1e-3)).unwrap_err();
    match &err {
        Error::NonFinite { tasks, data, .. } => {
            assert_eq!(tasks, &vec![2]);
            assert_eq!(data.as_deref(), Some("task 2: query_x[4, 0, 7, 9] = NaN"));
        }
        e => panic!("expected NonFinite, got {e:?}"),
    }
    assert!(
        err.to_string()
            .contains("the data is not finite: task 2: query_x[4, 0, 7, 9] = NaN"),
        "{err}"
    );
    assert_eq!(l.params, before);

    // Regression targets, and infinities, in a Reptile step.
    let mut sines = Task::<f32>::from_sinusoid(
        &SinusoidSampler::new(5, 5, 2)
            .unwrap()
            .sample_batch(3)
            .unwrap(),
    );
    if let Targets::Values(v) = &mut sines[1].support_y {
        set(v, &[3, 0], f32::INFINITY);
    }
    let mut m = MetaLearner::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 0);
    let err = m
        .reptile_step(&sines, &mut Optimizer::sgd(0.1))
        .unwrap_err();
    assert!(
        err.to_string().contains("task 1: support_y[3, 0] = inf"),
        "{err}"
    );

    // A step that fails for another reason names no data.
    let mut huge = episodes::<f32>(EpisodeSpec::new(3, 1, 2), 2, 2);
    huge[0].support_x.mapv_inplace(|v| v * 1e30);
    let mut l = MetaLearner::new(
        Conv4 {
            norm: NormKind::None,
            ..small_conv()
        },
        MetaConfig::maml(2, 1e10),
        0,
    );
    match l.meta_step(&huge, &mut Optimizer::adam(1e-3)) {
        Err(Error::NonFinite { data, .. }) => assert_eq!(data, None),
        r => panic!("expected NonFinite, got {r:?}"),
    }

    // Evaluation: bad data is an error of the protocol (not a diverged task), named.
    let l = MetaLearner::new(small_conv(), MetaConfig::maml(1, 0.1), 0);
    let mut eval = episodes::<f32>(EpisodeSpec::new(3, 1, 2), 3, 4);
    set(&mut eval[1].support_x, &[2, 0, 0, 1], f32::NEG_INFINITY);
    let err = metagrad::eval::evaluate(&l, &eval, 1, NormMode::Transductive, 2).unwrap_err();
    assert!(
        err.to_string()
            .contains("task 1: support_x[2, 0, 0, 1] = -inf"),
        "{err}"
    );
}

#[test]
fn labels_out_of_range_are_refused_before_the_step() {
    let mut tasks = episodes::<f32>(EpisodeSpec::new(3, 1, 2), 4, 5);
    tasks[3].support_y = Targets::Classes(vec![0, 5, 1]);
    let mut l = MetaLearner::new(small_conv(), MetaConfig::maml(1, 0.1), 0);
    let before = l.params.clone();
    for r in [
        l.meta_step(&tasks, &mut Optimizer::adam(1e-3)).map(|_| ()),
        l.reptile_step(&tasks, &mut Optimizer::adam(1e-3))
            .map(|_| ()),
        l.meta_gradient(&tasks).map(|_| ()),
    ] {
        match r {
            Err(Error::Task { index, message }) => {
                assert_eq!(index, 3);
                assert_eq!(
                    message,
                    "support_y[1] is label 5, out of range for a network with 3 outputs \
                     (labels 0..3)"
                );
            }
            r => panic!("expected a task error, got {r:?}"),
        }
    }
    assert_eq!((l.params.clone(), l.step), (before, 0));
    // Dense labels of the wrong width too.
    let mut dense = episodes::<f32>(EpisodeSpec::new(3, 1, 2), 1, 6);
    dense[0].query_y = Targets::Probabilities(ArrayD::zeros(ndarray::IxDyn(&[6, 4])));
    let err = l
        .evaluate_task(&dense[0], 1, NormMode::Transductive)
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "query_y holds class-probability rows of shape [6, 4], but the network has 3 outputs"
        ),
        "{err}"
    );
}

#[test]
fn tasks_of_different_shapes_share_a_meta_batch_reduced_in_task_order() {
    // 1-shot and 3-shot tasks, 2 and 4 queries, interleaved.
    let one = episodes::<f64>(EpisodeSpec::new(3, 1, 2), 3, 7);
    let three = episodes::<f64>(EpisodeSpec::new(3, 3, 4), 3, 8);
    let mixed: Vec<Task<f64>> = [&one[0], &three[0], &three[1], &one[1], &one[2], &three[2]]
        .into_iter()
        .cloned()
        .collect();
    let l = MetaLearner::<f64, _>::new(small_conv(), MetaConfig::maml(1, 0.1), 0);
    let (g, stats, _) = with_threads(2, || l.meta_gradient(&mixed)).unwrap();
    let (g1, _, _) = with_threads(1, || l.meta_gradient(&mixed)).unwrap();
    assert_eq!(g, g1, "thread-independent");
    // The same as each task alone, summed in task order and divided by the count.
    let mut sum: Vec<ArrayD<f64>> = l
        .params
        .tensors()
        .iter()
        .map(|p| ArrayD::zeros(p.raw_dim()))
        .collect();
    let mut loss = 0.0;
    for t in &mixed {
        let (gt, st, _) = l.meta_gradient(std::slice::from_ref(t)).unwrap();
        for (s, x) in sum.iter_mut().zip(&gt) {
            s.zip_mut_with(x, |a, &b| *a += b);
        }
        loss += st.loss;
    }
    let inv = 1.0 / mixed.len() as f64;
    sum.iter_mut().for_each(|s| s.mapv_inplace(|v| v * inv));
    assert_eq!(g, sum);
    assert_eq!(stats.loss, loss / mixed.len() as f64);
    // And a real step takes it.
    let mut l = l;
    l.meta_step(&mixed, &mut Optimizer::adam(1e-3)).unwrap();
    assert_eq!(l.step, 1);
    // Classification and regression still cannot share a batch.
    let sine = Task::<f64>::from_sinusoid(
        &SinusoidSampler::new(5, 5, 1)
            .unwrap()
            .sample_batch(1)
            .unwrap(),
    );
    let err = l
        .meta_gradient(&[mixed[0].clone(), sine[0].clone()])
        .unwrap_err();
    assert!(err.to_string().contains("another kind of targets"), "{err}");
}

#[test]
fn a_restore_says_what_it_changes_and_keeps_the_users_state() {
    let dir = std::env::temp_dir().join(format!("metagrad-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.json");
    let saved = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 0);
    let history = json!({ "best": 0.25, "validation": [0.5, 0.25] });
    Checkpoint::capture(&saved, &Optimizer::adam(1e-3), &rng_from_seed(0))
        .with_extras(history.clone())
        .save(&path)
        .unwrap();

    let mut config = MetaConfig::maml(5, 0.4);
    config.parallel_iterations = 3;
    let mut resumed = MetaLearner::<f32, _>::new(Mlp::sinusoid(), config, 0);
    let loaded = Checkpoint::<f32>::load(&path).unwrap();
    assert_eq!(loaded.extras, history);
    assert_eq!(
        loaded.config_changes(&resumed.config),
        vec!["inner_lr: 0.4 -> 0.01", "inner_steps: 5 -> 1"]
    );
    assert!(loaded.config_changes(&saved.config).is_empty());
    loaded.restore(&mut resumed).unwrap();
    assert_eq!(
        (resumed.config.inner_steps, resumed.config.inner_lr),
        (1, 0.01)
    );
    assert_eq!(resumed.config.parallel_iterations, 3);

    // A checkpoint without extras reads them as null.
    Checkpoint::capture(&saved, &Optimizer::adam(1e-3), &rng_from_seed(0))
        .save(&path)
        .unwrap();
    assert!(Checkpoint::<f32>::load(&path).unwrap().extras.is_null());
    std::fs::remove_dir_all(&dir).unwrap();
}
