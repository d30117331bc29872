//! Checkpoints: exact round trips, atomic writes, clear errors, and bitwise resume.

use metagrad::checkpoint::Checkpoint;
use metagrad::data::{rng_from_seed, Rng, SinusoidBatch, SinusoidConfig, SinusoidTask};
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
use metagrad::nn::{Conv4, Mlp, Model, NormState};
use metagrad::{Error, Float};
use ndarray::ArrayD;
use rand::{Rng as _, RngCore};
use std::path::{Path, PathBuf};

/// A fresh, empty directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "metagrad-test-checkpoint-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The file names in a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Draws a sinusoid meta-batch from a caller-held generator (so it can be checkpointed).
fn sinusoid_tasks<F: Float>(rng: &mut Rng, tasks: usize) -> Vec<Task<F>> {
    let config = SinusoidConfig::default();
    let list: Vec<SinusoidTask> = (0..tasks)
        .map(|_| SinusoidTask::sample(rng, &config, 10, 10))
        .collect();
    Task::from_sinusoid(&SinusoidBatch::from_tasks(&list).unwrap())
}

/// A learner and optimiser after a few meta-steps, so that every part of the state
/// (parameters, Adam moments, step counts, generator) is non-trivial.
fn trained<F: Float>(steps: usize) -> (MetaLearner<F, Mlp>, Optimizer<F>, Rng) {
    let mut learner = MetaLearner::<F, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 3);
    let mut opt = Optimizer::adam(1e-3);
    let mut rng = rng_from_seed(11);
    for _ in 0..steps {
        let tasks = sinusoid_tasks(&mut rng, 4);
        learner.meta_step(&tasks, &mut opt).unwrap();
    }
    (learner, opt, rng)
}

fn assert_bitwise<F: Float>(a: &[ArrayD<F>], b: &[ArrayD<F>]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.shape(), y.shape());
        for (u, v) in x.iter().zip(y) {
            assert_eq!(u.f64().to_bits(), v.f64().to_bits(), "{u} vs {v}");
        }
    }
}

fn round_trip<F: Float>(name: &str) {
    let dir = temp_dir(name);
    let path = dir.join("checkpoint.json");
    let (learner, opt, rng) = trained::<F>(3);
    let saved = Checkpoint::capture(&learner, &opt, &rng);
    saved.save(&path).unwrap();
    let loaded = Checkpoint::<F>::load(&path).unwrap();
    assert_eq!(loaded.origin(), Some(path.as_path()));
    assert_eq!(loaded.model, saved.model);
    assert_eq!(loaded.params, saved.params);
    assert_bitwise(loaded.params.tensors(), saved.params.tensors());
    assert_eq!(loaded.norm, saved.norm);
    assert_eq!(loaded.optimizer, saved.optimizer);
    assert_eq!(loaded.step, 3);
    assert_eq!(loaded.config, saved.config);
    assert_eq!(loaded.rng, saved.rng);
    // Saving what was loaded writes the same bytes.
    let again = dir.join("again.json");
    loaded.save(&again).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn round_trip_is_exact_f32() {
    round_trip::<f32>("rt32");
}

#[test]
fn round_trip_is_exact_f64() {
    round_trip::<f64>("rt64");
}

/// Every bit pattern survives, including values serde_json's default float parser would
/// read back one ulp off, subnormals, signed zeros and extremes.
#[test]
fn awkward_floats_round_trip_bitwise() {
    let dir = temp_dir("awkward");
    let path = dir.join("c.json");
    let mut bits = rng_from_seed(5);
    for wide in [false, true] {
        if wide {
            let (mut learner, opt, rng) = trained::<f64>(0);
            let specials = [
                0.0,
                -0.0,
                f64::MIN_POSITIVE / 3.0,
                f64::MAX,
                f64::MIN,
                0.1 + 0.2,
            ];
            for t in learner.params.tensors_mut() {
                for (i, v) in t.iter_mut().enumerate() {
                    *v = if i < specials.len() {
                        specials[i]
                    } else {
                        f64::from_bits(bits.next_u64() & !(0x7ff << 52) | (0x3fe << 52))
                    };
                }
            }
            Checkpoint::capture(&learner, &opt, &rng)
                .save(&path)
                .unwrap();
            let loaded = Checkpoint::<f64>::load(&path).unwrap();
            assert_bitwise(loaded.params.tensors(), learner.params.tensors());
        } else {
            let (mut learner, opt, rng) = trained::<f32>(0);
            for t in learner.params.tensors_mut() {
                for v in t.iter_mut() {
                    // Any finite f32.
                    *v = f32::from_bits(bits.gen::<u32>() & 0xff7f_ffff);
                }
            }
            Checkpoint::capture(&learner, &opt, &rng)
                .save(&path)
                .unwrap();
            let loaded = Checkpoint::<f32>::load(&path).unwrap();
            assert_bitwise(loaded.params.tensors(), learner.params.tensors());
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_leaves_no_temporary_files_and_replaces_the_target() {
    let dir = temp_dir("atomic");
    let path = dir.join("checkpoint.json");
    let (mut learner, mut opt, mut rng) = trained::<f32>(1);
    Checkpoint::capture(&learner, &opt, &rng)
        .save(&path)
        .unwrap();
    let first = std::fs::read(&path).unwrap();
    assert_eq!(listing(&dir), ["checkpoint.json"]);

    // Overwrite with a newer state: the target is the new complete file, nothing else.
    let tasks = sinusoid_tasks(&mut rng, 4);
    learner.meta_step(&tasks, &mut opt).unwrap();
    Checkpoint::capture(&learner, &opt, &rng)
        .save(&path)
        .unwrap();
    assert_eq!(listing(&dir), ["checkpoint.json"]);
    let second = std::fs::read(&path).unwrap();
    assert_ne!(first, second);
    assert_eq!(Checkpoint::<f32>::load(&path).unwrap().step, 2);

    // Concurrent saves to the same target: each uses its own temporary file, and the
    // target always holds one complete checkpoint.
    let snapshots: Vec<_> = (0..4)
        .map(|_| Checkpoint::capture(&learner, &opt, &rng))
        .collect();
    std::thread::scope(|s| {
        for c in &snapshots {
            s.spawn(|| {
                for _ in 0..5 {
                    c.save(&path).unwrap();
                }
            });
        }
        s.spawn(|| {
            for _ in 0..20 {
                let c = Checkpoint::<f32>::load(&path).unwrap();
                assert_eq!(c.step, 2);
            }
        });
    });
    assert_eq!(listing(&dir), ["checkpoint.json"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn failed_save_keeps_the_old_checkpoint() {
    let dir = temp_dir("failed");
    let path = dir.join("checkpoint.json");
    let (learner, opt, rng) = trained::<f32>(1);
    Checkpoint::capture(&learner, &opt, &rng)
        .save(&path)
        .unwrap();
    let before = std::fs::read(&path).unwrap();

    // A NaN learning rate cannot be written as JSON that reads back: the save fails
    // before any file is touched.
    let mut bad = opt.clone();
    bad.lr = f64::NAN;
    let err = Checkpoint::capture(&learner, &bad, &rng)
        .save(&path)
        .unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(listing(&dir), ["checkpoint.json"]);

    // A failing rename (the target is a non-empty directory) cleans up its temporary file.
    let blocked = dir.join("blocked");
    std::fs::create_dir_all(blocked.join("inside")).unwrap();
    let err = Checkpoint::capture(&learner, &opt, &rng)
        .save(&blocked)
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(listing(&dir), ["blocked", "checkpoint.json"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_or_truncated_files_are_checkpoint_errors_naming_the_path() {
    let dir = temp_dir("corrupt");
    let path = dir.join("checkpoint.json");
    let (learner, opt, rng) = trained::<f32>(1);
    Checkpoint::capture(&learner, &opt, &rng)
        .save(&path)
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let broken = dir.join("broken.json");
    for cut in [0, 1, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&broken, &bytes[..cut]).unwrap();
        let err = Checkpoint::<f32>::load(&broken).unwrap_err();
        match &err {
            Error::Checkpoint { path: p, .. } => assert_eq!(p, &broken),
            other => panic!("truncated at {cut}: expected Error::Checkpoint, got {other:?}"),
        }
        assert!(err.to_string().contains("broken.json"), "{err}");
    }

    // A flipped hex digit count inside a tensor (still valid JSON).
    let text = String::from_utf8(bytes.clone()).unwrap();
    let at = text.find("\"bits\":\"").unwrap() + 8;
    let mut edited = text.clone();
    edited.remove(at);
    std::fs::write(&broken, edited).unwrap();
    let err = Checkpoint::<f32>::load(&broken).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("l0.w"), "{err}");

    // Another file format, another version, another float type.
    std::fs::write(&broken, "{\"hello\": 1}").unwrap();
    let err = Checkpoint::<f32>::load(&broken).unwrap_err();
    assert!(
        err.to_string().contains("not a metagrad checkpoint"),
        "{err}"
    );
    std::fs::write(&broken, text.replacen("\"version\":1", "\"version\":99", 1)).unwrap();
    let err = Checkpoint::<f32>::load(&broken).unwrap_err();
    assert!(err.to_string().contains("version 99"), "{err}");
    let err = Checkpoint::<f64>::load(&path).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("f32"), "{err}");

    // A missing file.
    let err = Checkpoint::<f32>::load(dir.join("missing.json")).unwrap_err();
    match &err {
        Error::NotFound { path: p, .. } => assert!(p.ends_with("missing.json")),
        other => panic!("expected Error::NotFound, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_different_model_is_refused_with_the_parameter_named() {
    let dir = temp_dir("mismatch");
    let path = dir.join("checkpoint.json");

    // Mlp 1-40-40-1 into 1-20-1.
    let (learner, opt, rng) = trained::<f32>(1);
    Checkpoint::capture(&learner, &opt, &rng)
        .save(&path)
        .unwrap();
    let small = Mlp {
        sizes: vec![1, 20, 1],
    };
    let mut other = MetaLearner::<f32, _>::new(small, MetaConfig::maml(1, 0.01), 0);
    let before = other.params.clone();
    let err = Checkpoint::<f32>::load(&path)
        .unwrap()
        .restore(&mut other)
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Checkpoint { .. }), "{message}");
    assert!(message.contains("different model"), "{message}");
    assert!(message.contains("checkpoint.json"), "{message}");
    assert!(
        message.contains("[1, 40, 40, 1]") && message.contains("[1, 20, 1]"),
        "{message}"
    );
    assert_eq!(other.params, before, "a refused restore changes nothing");

    // Conv-4 5-way into Conv-4 20-way: the head's shapes are named.
    let tiny = |ways| Conv4 {
        filters: 4,
        image_size: 16,
        ..Conv4::omniglot(ways)
    };
    let five = MetaLearner::<f32, _>::new(tiny(5), MetaConfig::maml(1, 0.4), 0);
    Checkpoint::capture(&five, &Optimizer::adam(1e-3), &rng)
        .save(&path)
        .unwrap();
    let mut twenty = MetaLearner::<f32, _>::new(tiny(20), MetaConfig::maml(1, 0.4), 0);
    let err = Checkpoint::<f32>::load(&path)
        .unwrap()
        .restore(&mut twenty)
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Checkpoint { .. }), "{message}");
    assert!(message.contains("different model"), "{message}");
    assert!(
        message.contains("head.w") && message.contains("[5, 4]") && message.contains("[20, 4]"),
        "{message}"
    );

    // Same model, another inner rule (Meta-SGD adds learned rates): the names differ.
    let mut meta_sgd = MetaLearner::<f32, _>::new(
        tiny(5),
        MetaConfig::maml(1, 0.4).with_rule(metagrad::meta::InnerRule::MetaSgd),
        0,
    );
    let err = Checkpoint::<f32>::load(&path)
        .unwrap()
        .restore(&mut meta_sgd)
        .unwrap_err();
    assert!(err.to_string().contains("inner_lr"), "{err}");

    // The right model restores.
    let mut again = MetaLearner::<f32, _>::new(tiny(5), MetaConfig::maml(1, 0.4), 9);
    Checkpoint::<f32>::load(&path)
        .unwrap()
        .restore(&mut again)
        .unwrap();
    assert_eq!(again.params, five.params);
    assert_eq!(again.norm, five.norm);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `steps` MAML meta-steps from the given state.
fn run<F: Float, M: Model<F>>(
    learner: &mut MetaLearner<F, M>,
    opt: &mut Optimizer<F>,
    rng: &mut Rng,
    steps: usize,
) {
    for _ in 0..steps {
        let tasks = sinusoid_tasks(&mut *rng, 4);
        learner.meta_step(&tasks, opt).unwrap();
    }
}

/// THE test: interrupting a run with a checkpoint changes nothing, bit for bit.
#[test]
fn resume_is_bitwise_identical_to_an_uninterrupted_run() {
    const STEPS: usize = 20;
    let dir = temp_dir("resume");
    let path = dir.join("checkpoint.json");
    let fresh = || MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 42);

    // Straight through.
    let mut straight = fresh();
    let mut opt = Optimizer::adam(1e-3);
    let mut rng = rng_from_seed(7);
    run(&mut straight, &mut opt, &mut rng, STEPS);

    // Half, save, drop everything.
    {
        let mut learner = fresh();
        let mut opt = Optimizer::adam(1e-3);
        let mut rng = rng_from_seed(7);
        run(&mut learner, &mut opt, &mut rng, STEPS / 2);
        Checkpoint::capture(&learner, &opt, &rng)
            .save(&path)
            .unwrap();
    }
    // A fresh learner (another initialisation seed), restored, the other half.
    let mut resumed = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 0);
    let (mut opt2, mut rng2) = Checkpoint::<f32>::load(&path)
        .unwrap()
        .restore(&mut resumed)
        .unwrap();
    assert_eq!(resumed.step, (STEPS / 2) as u64);
    run(&mut resumed, &mut opt2, &mut rng2, STEPS - STEPS / 2);

    assert_eq!(resumed.step, straight.step);
    assert!(
        resumed.params == straight.params,
        "parameters differ after resuming"
    );
    assert_bitwise(resumed.params.tensors(), straight.params.tensors());
    assert_eq!(opt2, opt);
    assert_eq!(rng2, rng);
    assert_ne!(
        straight.params,
        fresh().params,
        "training moved the parameters"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Batch-norm running statistics are part of the state as well.
#[test]
fn norm_state_round_trips() {
    let dir = temp_dir("norm");
    let path = dir.join("c.json");
    let model = Conv4 {
        filters: 3,
        image_size: 8,
        ..Conv4::omniglot(2)
    };
    let mut learner = MetaLearner::<f64, _>::new(model, MetaConfig::maml(1, 0.4), 0);
    let mut stats = NormState::<f64>::new(&[3; 4], 1, 0.1);
    for (l, layer) in stats.stats.iter_mut().enumerate() {
        for s in layer.iter_mut() {
            s.mean = vec![0.1 * l as f64 + 1e-300, -0.3, 1.0 / 3.0];
            s.updates = 7 + l as u64;
        }
    }
    learner.norm = stats;
    Checkpoint::capture(&learner, &Optimizer::sgd(0.1), &rng_from_seed(0))
        .save(&path)
        .unwrap();
    let loaded = Checkpoint::<f64>::load(&path).unwrap();
    assert_eq!(loaded.norm, learner.norm);
    std::fs::remove_dir_all(&dir).unwrap();
}
