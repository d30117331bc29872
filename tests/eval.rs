//! The evaluation protocol: the interval formula, thread independence, chance level.

use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection};
use metagrad::eval::{confidence_interval, evaluate, evaluate_episodes, EvalReport};
use metagrad::map_fn::with_threads;
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
use metagrad::nn::{Conv4, Mlp, NormKind, NormMode};
use ndarray::Array3;
use rand::Rng;

#[test]
fn confidence_interval_matches_hand_computed_values() {
    // Mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; sample variance 5 / 3;
    // half-width 1.96 * sqrt(5/3) / sqrt(4) = 0.98 * sqrt(5/3).
    let (mean, ci) = confidence_interval(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(mean, 2.5);
    assert!((ci - 0.98 * (5.0f64 / 3.0).sqrt()).abs() < 1e-12, "{ci}");
    assert!((ci - 1.265_174_6).abs() < 1e-6, "{ci}");

    // Accuracies of 0 and 1: mean 0.5, s = sqrt(0.5), n = 2: 1.96 * sqrt(0.5) / sqrt(2) = 0.98.
    let (mean, ci) = confidence_interval(&[0.0, 1.0]);
    assert_eq!(mean, 0.5);
    assert!((ci - 0.98).abs() < 1e-12, "{ci}");

    // No spread, no interval; too few values, no interval.
    assert_eq!(confidence_interval(&[0.7; 5]), (0.7, 0.0));
    let (mean, ci) = confidence_interval(&[0.25]);
    assert_eq!(mean, 0.25);
    assert!(ci.is_nan());
    let (mean, ci) = confidence_interval(&[]);
    assert!(mean.is_nan() && ci.is_nan());
}

#[test]
fn report_displays_accuracy_interval_and_mode() {
    let report = EvalReport {
        tasks: 600,
        steps: 3,
        mode: NormMode::Inductive,
        batch_norm: true,
        mean_accuracy: 0.9871,
        ci95: 0.0031,
        mean_loss: 0.05,
        accuracies: Vec::new(),
    };
    assert_eq!(
        report.to_string(),
        "98.7% ± 0.3% (600 tasks, 3 steps, batch norm: inductive)"
    );
    let report = EvalReport {
        batch_norm: false,
        tasks: 1,
        steps: 1,
        ..report
    };
    assert_eq!(
        report.to_string(),
        "98.7% ± 0.3% (1 task, 1 step, no batch norm)"
    );
}

/// `classes` classes of `per_class` random 16×16 images: no image says anything about
/// another, so no model can beat chance on it.
fn noise_collection(classes: usize, per_class: usize, seed: u64) -> ImageCollection {
    let mut rng = metagrad::data::rng_from_seed(seed);
    let images = Array3::from_shape_simple_fn((classes * per_class, 16, 16), || rng.gen::<f32>());
    ImageCollection::from_class_sizes(images, &vec![per_class; classes]).unwrap()
}

fn small_conv4(ways: usize, norm: NormKind) -> Conv4 {
    Conv4 {
        filters: 8,
        image_size: 16,
        norm,
        ..Conv4::omniglot(ways)
    }
}

#[test]
fn report_does_not_depend_on_threads() {
    let collection = noise_collection(12, 6, 1);
    let mut learner = MetaLearner::<f32, _>::new(
        small_conv4(5, NormKind::Batch { per_step: None }),
        MetaConfig::maml(1, 0.4),
        0,
    );
    // Untrained, there are no running statistics for inductive batch norm: an error, not
    // a panic per task.
    let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 9).unwrap();
    let err = evaluate_episodes(&learner, &mut sampler, 4, 1, NormMode::Inductive, 2).unwrap_err();
    assert!(err.to_string().contains("running statistics"), "{err}");
    // Two meta-steps collect them.
    let mut train = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 1).unwrap();
    let mut opt = Optimizer::adam(1e-3);
    for _ in 0..2 {
        let tasks = Task::from_episodes(&train.sample_batch(4).unwrap());
        learner.meta_step(&tasks, &mut opt).unwrap();
    }
    let run = |threads: usize, mode: NormMode| {
        with_threads(threads, || {
            let mut sampler =
                EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 9).unwrap();
            evaluate_episodes(&learner, &mut sampler, 70, 2, mode, usize::MAX).unwrap()
        })
    };
    for mode in [NormMode::Inductive, NormMode::Transductive] {
        let one = run(1, mode);
        let two = run(2, mode);
        assert_eq!(one, two, "{mode}");
        assert_eq!(one.tasks, 70);
        assert_eq!(one.accuracies.len(), 70);
        assert_eq!(one.mode, mode);
        assert!(one.batch_norm);
        // A bound on concurrency changes nothing either.
        let bounded = with_threads(2, || {
            let mut sampler =
                EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 9).unwrap();
            evaluate_episodes(&learner, &mut sampler, 70, 2, mode, 1).unwrap()
        });
        assert_eq!(one, bounded);
    }

    // The slice form gives the same as the sampler form on the same episodes.
    let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 9).unwrap();
    let tasks = Task::<f32>::from_episodes(&sampler.sample_batch(70).unwrap());
    let from_slice = with_threads(2, || {
        evaluate(&learner, &tasks, 2, NormMode::Inductive, usize::MAX).unwrap()
    });
    assert_eq!(from_slice, run(1, NormMode::Inductive));
}

#[test]
fn an_untrained_model_scores_near_chance() {
    let collection = noise_collection(20, 8, 2);
    for norm in [
        NormKind::Batch { per_step: None },
        NormKind::Group { groups: 2 },
    ] {
        let learner = MetaLearner::<f32, _>::new(small_conv4(5, norm), MetaConfig::maml(1, 0.4), 3);
        let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 5), 4).unwrap();
        // Untrained, batch norm has only the transductive mode (no running statistics).
        let report = evaluate_episodes(
            &learner,
            &mut sampler,
            300,
            1,
            NormMode::Transductive,
            usize::MAX,
        )
        .unwrap();
        // 300 tasks of 25 queries: the standard error of the mean is about 0.8 points.
        assert!(
            (report.mean_accuracy - 0.2).abs() < 0.04,
            "{norm:?}: {report}"
        );
        assert!(report.ci95 > 0.0 && report.ci95 < 0.03, "{report}");
        assert!(report.mean_loss.is_finite());
        assert!(report.accuracies.iter().all(|a| (0.0..=1.0).contains(a)));
    }
}

#[test]
fn regression_tasks_and_empty_sets_are_errors() {
    let learner = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 0);
    let batch = metagrad::data::SinusoidSampler::new(5, 5, 0)
        .unwrap()
        .sample_batch(2)
        .unwrap();
    let tasks = Task::<f32>::from_sinusoid(&batch);
    let err = evaluate(&learner, &tasks, 1, NormMode::Inductive, 2).unwrap_err();
    assert!(matches!(err, metagrad::Error::Config(_)), "{err}");
    let err = evaluate(&learner, &tasks[..0], 1, NormMode::Inductive, 2).unwrap_err();
    assert!(matches!(err, metagrad::Error::Config(_)), "{err}");
}
