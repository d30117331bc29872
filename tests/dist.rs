//! Meta-training split across ranks gives bitwise the result of one process. The ranks
//! here are threads of one process joined by an in-memory transport (the same `Comm` code
//! path as MPI; `tests/mpi.rs` runs real `mpirun` jobs with `--features mpi`).

use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageCollection, SinusoidSampler};
use metagrad::dist::Comm;
use metagrad::meta::{InnerRule, MetaConfig, MetaLearner, Optimizer, Targets, Task};
use metagrad::nn::{Conv4, Downsample, Mlp, Model, NormKind, NormMode};
use metagrad::Error;
use ndarray::Array3;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Debug;

mod common;
use common::{on_ranks, state};

fn small_conv() -> Conv4 {
    Conv4 {
        in_channels: 1,
        image_size: 16,
        filters: 4,
        ways: 3,
        norm: NormKind::Batch { per_step: Some(2) },
        downsample: Downsample::MaxPool,
        eps: 1e-5,
    }
}

fn image_batches(batches: usize, tasks: usize) -> Vec<Vec<Task<f32>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let images = Array3::from_shape_simple_fn((6 * 5, 16, 16), || rng.gen_range(0.0..1.0f32));
    let coll = ImageCollection::from_class_sizes(images, &[5; 6]).unwrap();
    let mut s = EpisodeSampler::new(&coll, EpisodeSpec::new(3, 1, 2), 9).unwrap();
    (0..batches)
        .map(|_| {
            (0..tasks)
                .map(|_| Task::from_episode(&s.sample()))
                .collect()
        })
        .collect()
}

fn train<M: Model<f32> + Clone + Debug>(
    model: M,
    config: MetaConfig,
    batches: &[Vec<Task<f32>>],
    comm: Comm,
    reptile: bool,
) -> (MetaLearner<f32, M>, Optimizer<f32>) {
    let mut l = MetaLearner::new(model, config, 0).with_comm(comm).unwrap();
    let mut opt = Optimizer::adam(1e-3);
    for b in batches {
        if reptile {
            l.reptile_step(b, &mut opt).unwrap();
        } else {
            l.meta_step(b, &mut opt).unwrap();
        }
    }
    (l, opt)
}

#[test]
fn every_rank_ends_bitwise_equal_to_one_process() {
    let batches = image_batches(3, 5);
    for (rule, reptile) in [
        (InnerRule::Sgd, false),
        (InnerRule::MetaSgd, false),
        (InnerRule::Sgd, true),
    ] {
        let config = MetaConfig::maml(2, 0.1).with_rule(rule);
        let (l, o) = train(
            small_conv(),
            config.clone(),
            &batches,
            Comm::local(),
            reptile,
        );
        let want = state(&l, &o);
        // 2 and 3 ranks, and 7 ranks for 5 tasks (two idle).
        for size in [2, 3, 7] {
            let got = on_ranks(size, |comm| {
                let (l, o) = train(small_conv(), config.clone(), &batches, comm, reptile);
                state(&l, &o)
            });
            for (rank, g) in got.iter().enumerate() {
                assert!(
                    *g == want,
                    "{rule:?} reptile={reptile}: rank {rank} of {size} differs from one process"
                );
            }
        }
    }
}

#[test]
fn sinusoid_chunks_split_across_ranks_bitwise() {
    let mut sampler = SinusoidSampler::new(5, 5, 3).unwrap();
    let batches: Vec<Vec<Task<f32>>> = (0..4)
        .map(|_| Task::from_sinusoid(&sampler.sample_batch(8).unwrap()))
        .collect();
    let mut config = MetaConfig::maml(1, 0.01);
    config.task_chunk = 3; // groups of 3, 3, 2 tasks
    let (l, o) = train(
        Mlp::sinusoid(),
        config.clone(),
        &batches,
        Comm::local(),
        false,
    );
    let want = state(&l, &o);
    for size in [2, 4] {
        let got = on_ranks(size, |comm| {
            let (l, o) = train(
                Mlp::sinusoid(),
                config.clone(),
                &batches,
                comm.clone(),
                false,
            );
            (state(&l, &o), comm.traffic())
        });
        for (g, (sent, received)) in &got {
            assert!(*g == want);
            assert!(*sent > 0 && *received > 0, "the ranks exchanged nothing");
        }
    }
}

#[test]
fn evaluation_splits_tasks_and_reports_the_same_numbers() {
    let batches = image_batches(2, 4);
    let (l, _) = train(
        small_conv(),
        MetaConfig::maml(1, 0.1),
        &batches,
        Comm::local(),
        false,
    );
    let tasks = image_batches(1, 9).remove(0);
    let want = metagrad::eval::evaluate(&l, &tasks, 2, NormMode::Inductive, 4).unwrap();
    let got = on_ranks(3, |comm| {
        let mut d = MetaLearner::new(small_conv(), MetaConfig::maml(1, 0.1), 0);
        d.params = l.params.clone();
        d.norm = l.norm.clone();
        d.step = l.step;
        let d = d.with_comm(comm).unwrap();
        metagrad::eval::evaluate(&d, &tasks, 2, NormMode::Inductive, 4).unwrap()
    });
    for r in got {
        assert_eq!(r.accuracies, want.accuracies);
        assert_eq!(
            (r.mean_accuracy, r.ci95, r.mean_loss),
            (want.mean_accuracy, want.ci95, want.mean_loss)
        );
    }
}

#[test]
fn a_panicking_task_is_the_same_error_on_every_rank() {
    let mut batch = image_batches(1, 6).remove(0);
    batch[4].query_y = Targets::Classes(vec![0, 1, 2, 0, 1, 9]); // label out of range
    let got = on_ranks(3, |comm| {
        let mut l = MetaLearner::new(small_conv(), MetaConfig::maml(1, 0.1), 0)
            .with_comm(comm)
            .unwrap();
        let before = l.params.clone();
        let r = l.meta_step(&batch, &mut Optimizer::adam(1e-3));
        (r, before == l.params)
    });
    for (r, unchanged) in got {
        match r {
            Err(Error::Task { index, message }) => {
                assert_eq!(index, 4);
                assert!(message.contains("label 9"), "{message}");
            }
            r => panic!("expected Error::Task, got {r:?}"),
        }
        assert!(unchanged);
    }
}

#[test]
fn ranks_started_differently_are_refused_naming_the_difference() {
    let got = on_ranks(2, |comm| {
        let seed = comm.rank() as u64; // a different seed on rank 1
        MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), seed)
            .with_comm(comm)
            .map(|_| ())
    });
    for r in got {
        match r {
            Err(Error::Config(m)) => {
                assert!(m.contains("parameters") && m.contains("rank 1"), "{m}")
            }
            r => panic!("expected a configuration error, got {r:?}"),
        }
    }
    let got = on_ranks(2, |comm| {
        let steps = 1 + comm.rank(); // a different configuration on rank 1
        MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(steps, 0.01), 0)
            .with_comm(comm)
            .map(|_| ())
    });
    for r in got {
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("configuration")));
    }
    let got = on_ranks(2, |comm| {
        let fields = [("meta-batch", (32 + comm.rank()).to_string())];
        comm.check_same(&fields)
    });
    for r in got {
        assert!(
            matches!(&r, Err(Error::Config(m)) if m.contains("meta-batch") && m.contains("\"33\"")),
            "{r:?}"
        );
    }
}
