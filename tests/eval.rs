//! The evaluation protocol: the interval formula, thread independence, chance level, and
//! diverged tasks counted as results.

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
        diverged: 0,
        diverged_tasks: Vec::new(),
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
    let report = EvalReport {
        diverged: 2,
        diverged_tasks: vec![3, 9],
        ..report
    };
    assert_eq!(
        report.to_string(),
        "98.7% ± 0.3% (1 task, 1 step, no batch norm, 2 diverged, counted as misses)"
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

/// Eight tasks, one of which (task 5) is made to diverge: its support inputs are scaled by 1e8
/// so that, without normalisation, the inner steps at a large rate blow up.
#[test]
fn a_diverged_task_is_counted_as_misses_and_left_out_of_the_loss() {
    let collection = noise_collection(10, 4, 5);
    let learner =
        MetaLearner::<f32, _>::new(small_conv4(5, NormKind::None), MetaConfig::maml(1, 0.4), 2);
    let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 3), 3).unwrap();
    let mut tasks = Task::<f32>::from_episodes(&sampler.sample_batch(8).unwrap());
    tasks[5].support_x.mapv_inplace(|v| v * 1e8);
    let steps = 3;

    // Alone, each task gives its own result; task 5 alone is an error.
    let alone: Vec<_> = tasks
        .iter()
        .map(|t| learner.evaluate_task(t, steps, NormMode::Transductive))
        .collect();
    for (i, r) in alone.iter().enumerate() {
        if i == 5 {
            assert!(
                matches!(r, Err(metagrad::Error::NonFinite { .. })),
                "task 5 should diverge: {r:?}"
            );
        } else {
            let (loss, acc) = r.as_ref().unwrap();
            assert!(loss.is_finite() && acc.is_some(), "task {i}: {r:?}");
        }
    }

    // The protocol reports it and carries on.
    let report = evaluate(&learner, &tasks, steps, NormMode::Transductive, usize::MAX).unwrap();
    assert_eq!(report.tasks, 8);
    assert_eq!(report.diverged, 1);
    assert_eq!(report.diverged_tasks, vec![5]);
    // Accuracy rule: the diverged task's queries are all misses, and it stays in the mean.
    let want_acc: Vec<f64> = alone
        .iter()
        .map(|r| r.as_ref().map_or(0.0, |(_, a)| a.unwrap()))
        .collect();
    assert_eq!(report.accuracies, want_acc);
    assert_eq!(report.accuracies[5], 0.0);
    let mean_acc = want_acc.iter().sum::<f64>() / 8.0;
    assert!((report.mean_accuracy - mean_acc).abs() < 1e-15);
    assert_eq!(
        (report.mean_accuracy, report.ci95),
        confidence_interval(&want_acc)
    );
    // Loss rule: the mean over the 7 finite tasks.
    let finite: Vec<f64> = alone.iter().flatten().map(|(l, _)| *l).collect();
    assert_eq!(finite.len(), 7);
    let mean_loss = finite.iter().sum::<f64>() / 7.0;
    assert!(report.mean_loss.is_finite());
    assert!((report.mean_loss - mean_loss).abs() <= 1e-12 * mean_loss.abs());
    assert!(report.to_string().contains("1 diverged"), "{report}");

    // The same for any thread count and concurrency bound.
    for threads in [1, 2] {
        let again = with_threads(threads, || {
            evaluate(&learner, &tasks, steps, NormMode::Transductive, 3).unwrap()
        });
        assert_eq!(again, report, "{threads} thread(s)");
    }

    // Every task diverged: accuracy 0, loss NaN (no finite task), nothing aborts.
    let all_bad: Vec<_> = (0..3).map(|_| tasks[5].clone()).collect();
    let report = evaluate(&learner, &all_bad, steps, NormMode::Transductive, 2).unwrap();
    assert_eq!((report.diverged, report.mean_accuracy), (3, 0.0));
    assert!(report.mean_loss.is_nan());
}
