//! The training loop: bit-for-bit resume with its history, the best model kept, early
//! stopping, the schedule, the logs, and refused configurations.

use metagrad::checkpoint::Checkpoint;
use metagrad::data::SinusoidSampler;
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
use metagrad::nn::Mlp;
use metagrad::train::{
    from_fn, Metric, Progress, Schedule, TaskSource, Trainer, BEST_CHECKPOINT, LAST_CHECKPOINT,
};
use metagrad::{Error, Result};
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("metagrad-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn learner() -> MetaLearner<f32, Mlp> {
    MetaLearner::new(Mlp::new(vec![1, 16, 1]), MetaConfig::maml(1, 0.01), 0)
}

fn validation() -> Vec<Task<f32>> {
    Task::from_sinusoid(
        &SinusoidSampler::new(5, 10, 99)
            .unwrap()
            .sample_batch(6)
            .unwrap(),
    )
}

fn trainer(steps: u64, d: &Path) -> Trainer<f32> {
    Trainer::new(steps, 4)
        .validate_every(3, validation(), 2)
        .keep_best(Metric::Loss)
        .schedule(Schedule::Cosine { min_lr: 1e-4 })
        .checkpoint_dir(d)
        .save_every(4)
        .log(d.join("log.csv"))
        .progress(Progress::Off)
}

/// A task source that fails once it has given `fail_after` batches: a run killed there.
struct Failing {
    inner: SinusoidSampler,
    given: usize,
    fail_after: usize,
}

impl TaskSource<f32> for Failing {
    fn next_batch(&mut self, tasks: usize) -> Result<Vec<Task<f32>>> {
        if self.given == self.fail_after {
            return Err(Error::Config("killed".into()));
        }
        self.given += 1;
        self.inner.next_batch(tasks)
    }
    fn rng(&self) -> metagrad::data::SamplerRng {
        TaskSource::<f32>::rng(&self.inner)
    }
    fn set_rng(&mut self, rng: metagrad::data::SamplerRng) -> Result<()> {
        TaskSource::<f32>::set_rng(&mut self.inner, rng)
    }
}

/// The log without its wall-clock column.
fn rows(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

#[test]
fn a_killed_run_resumes_bit_for_bit_with_its_history() {
    let whole = dir("whole");
    let mut l = learner();
    let mut opt = Optimizer::adam(1e-2);
    let mut tasks = SinusoidSampler::new(5, 5, 1).unwrap();
    let want = trainer(10, &whole)
        .run(&mut l, &mut opt, &mut tasks)
        .unwrap();
    assert_eq!(want.steps, 10);
    assert_eq!(want.validations.len(), 4, "after steps 3, 6, 9 and 10");

    // Killed while drawing the 7th batch: the last checkpoint is from step 4, the log
    // has rows up to step 6.
    let killed = dir("killed");
    let mut source = Failing {
        inner: SinusoidSampler::new(5, 5, 1).unwrap(),
        given: 0,
        fail_after: 6,
    };
    let err = trainer(10, &killed)
        .run(&mut learner(), &mut Optimizer::adam(1e-2), &mut source)
        .unwrap_err();
    assert!(err.to_string().contains("killed"));
    assert_eq!(
        Checkpoint::<f32>::load(killed.join(LAST_CHECKPOINT))
            .unwrap()
            .step,
        4
    );
    assert!(rows(&killed.join("log.csv"))
        .iter()
        .any(|r| r.starts_with("step,6,")));

    // Resumed: another learner and optimiser (the checkpoint sets them), a fresh source.
    let mut resumed = MetaLearner::new(Mlp::new(vec![1, 16, 1]), MetaConfig::maml(3, 0.5), 7);
    let mut opt2 = Optimizer::adam(5.0);
    let mut tasks2 = SinusoidSampler::new(5, 5, 12345).unwrap();
    let got = trainer(10, &killed)
        .resume(true)
        .run(&mut resumed, &mut opt2, &mut tasks2)
        .unwrap();
    assert_eq!(resumed.params, l.params, "parameters bitwise");
    assert_eq!(opt2, opt, "optimiser bitwise");
    assert_eq!(resumed.config, l.config);
    assert_eq!(got.validations, want.validations, "the whole history");
    // Every step, those before the resume read back from the log bit for bit.
    assert_eq!(got.first_step, 4);
    assert_eq!(got.history.len(), 10);
    let no_time = |s: &metagrad::train::Summary| {
        s.history
            .iter()
            .map(|r| (r.step, r.loss.to_bits(), r.skipped, r.lr.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(no_time(&got), no_time(&want));
    assert_eq!(got.final_loss.to_bits(), want.final_loss.to_bits());
    // The resumed run's times continue from the rows kept.
    let seconds: Vec<f64> = got.history.iter().map(|r| r.seconds).collect();
    assert!(seconds.windows(2).all(|w| w[0] <= w[1]), "{seconds:?}");
    assert_eq!((got.best, got.best_step), (want.best, want.best_step));
    assert_eq!(rows(&killed.join("log.csv")), rows(&whole.join("log.csv")));
    for d in [whole, killed] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn the_best_model_is_kept_and_the_log_says_what_happened() {
    let d = dir("best");
    let mut l = learner();
    let mut opt = Optimizer::adam(1e-2);
    let s = trainer(12, &d)
        .run(
            &mut l,
            &mut opt,
            &mut SinusoidSampler::new(5, 5, 2).unwrap(),
        )
        .unwrap();
    let best_step = s.best_step.unwrap();
    let best = s.validations.iter().find(|v| v.step == best_step).unwrap();
    assert_eq!(s.best, Some(best.loss));
    assert!(s.validations.iter().all(|v| v.loss >= best.loss));
    let saved = Checkpoint::<f32>::load(d.join(BEST_CHECKPOINT)).unwrap();
    assert_eq!(saved.step, best_step);
    // The best model scores what its validation said.
    let mut again = learner();
    saved.restore(&mut again).unwrap();
    let losses: Vec<f64> = validation()
        .iter()
        .map(|t| {
            again
                .evaluate_task(t, 2, metagrad::nn::NormMode::Inductive)
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(losses.iter().sum::<f64>() / losses.len() as f64, best.loss);

    // The log: a header, 12 steps and 4 validations, with the cosine schedule's rates.
    let text = std::fs::read_to_string(d.join("log.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "kind,step,loss,accuracy,ci95,diverged,second_order,skipped,cg_iterations,\
         cg_residual,cg_unconverged,lr,seconds"
    );
    assert_eq!(lines.iter().filter(|l| l.starts_with("step,")).count(), 12);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("validation,"))
            .count(),
        4
    );
    let lr: Vec<f64> = lines
        .iter()
        .filter(|l| l.starts_with("step,"))
        .map(|l| l.split(',').nth(11).unwrap().parse().unwrap())
        .collect();
    assert_eq!(lr[0], 1e-2);
    let cosine = Schedule::Cosine { min_lr: 1e-4 };
    for (i, &r) in lr.iter().enumerate() {
        assert_eq!(r, cosine.lr(1e-2, i as u64, 12));
    }
    assert!(lr.windows(2).all(|w| w[1] < w[0]));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn early_stopping_ends_a_run_that_stopped_improving() {
    // An outer rate of zero: the model never changes, so validation never improves.
    let mut l = learner();
    let s = Trainer::new(100, 2)
        .validate_every(2, validation(), 1)
        .early_stopping(Metric::Loss, 3)
        .progress(Progress::Off)
        .run(
            &mut l,
            &mut Optimizer::sgd(0.0),
            &mut SinusoidSampler::new(5, 5, 3).unwrap(),
        )
        .unwrap();
    assert!(s.stopped_early);
    assert_eq!(
        s.steps, 8,
        "the first validation sets the best, three more do not beat it"
    );
    assert_eq!(s.best_step, Some(2));
    assert_eq!(s.validations.len(), 4);
}

#[test]
fn schedules_and_json_lines() {
    let step = Schedule::Step {
        every: 10,
        gamma: 0.5,
    };
    assert_eq!(
        [0, 9, 10, 25].map(|s| step.lr(0.1, s, 100)),
        [0.1, 0.1, 0.05, 0.025]
    );
    let cos = Schedule::Cosine { min_lr: 0.0 };
    assert_eq!(cos.lr(0.1, 0, 100), 0.1);
    assert!((cos.lr(0.1, 50, 100) - 0.05).abs() < 1e-15);
    assert_eq!(Schedule::Constant.lr(0.1, 77, 100), 0.1);

    let d = dir("jsonl");
    let mut source = from_fn(5, |rng, n| {
        let mut s = SinusoidSampler::new(5, 5, 0)?;
        s.set_rng(rng.clone());
        let batch = s.sample_batch(n)?;
        *rng = s.rng().clone();
        Ok(Task::from_sinusoid(&batch))
    });
    let jsonl = |steps: u64, resume: bool| {
        Trainer::new(steps, 2)
            .log(d.join("log.jsonl"))
            .checkpoint_dir(&d)
            .resume(resume)
            .progress(Progress::Off)
    };
    let straight = jsonl(5, false)
        .run(&mut learner(), &mut Optimizer::adam(1e-3), &mut source)
        .unwrap();
    // Three steps, then resumed to five: the history is read back from JSON lines.
    let mut source = from_fn(5, |rng, n| {
        let mut s = SinusoidSampler::new(5, 5, 0)?;
        s.set_rng(rng.clone());
        let batch = s.sample_batch(n)?;
        *rng = s.rng().clone();
        Ok(Task::from_sinusoid(&batch))
    });
    jsonl(3, false)
        .run(&mut learner(), &mut Optimizer::adam(1e-3), &mut source)
        .unwrap();
    let resumed = jsonl(5, true)
        .run(&mut learner(), &mut Optimizer::adam(1e-3), &mut source)
        .unwrap();
    assert_eq!(resumed.first_step, 3);
    let losses = |s: &metagrad::train::Summary| {
        s.history
            .iter()
            .map(|r| (r.step, r.loss.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&resumed), losses(&straight));
    let text = std::fs::read_to_string(d.join("log.jsonl")).unwrap();
    let rows: Vec<metagrad::serde_json::Value> = text
        .lines()
        .map(|l| metagrad::serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[2]["step"], 3);
    assert_eq!(rows[2]["kind"], "step");
    assert!(rows[2]["loss"].as_f64().unwrap().is_finite());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn configurations_that_cannot_work_are_refused_before_any_step() {
    let mut l = learner();
    let before = l.params.clone();
    let mut src = SinusoidSampler::new(5, 5, 0).unwrap();
    let mut opt = Optimizer::adam(1e-3);
    let cases: Vec<(Trainer<f32>, &str)> = vec![
        (Trainer::new(3, 0), "at least one task"),
        (
            Trainer::new(3, 2).validate_every(1, Vec::new(), 1),
            "validation task",
        ),
        (
            Trainer::new(3, 2).keep_best(Metric::Loss),
            "needs validation",
        ),
        (
            Trainer::new(3, 2)
                .validate_every(1, validation(), 1)
                .keep_best(Metric::Accuracy),
            "classification",
        ),
        (Trainer::new(3, 2).resume(true), "checkpoint directory"),
    ];
    for (t, needle) in cases {
        match t.progress(Progress::Off).run(&mut l, &mut opt, &mut src) {
            Err(Error::Config(m)) => assert!(m.contains(needle), "{m}"),
            r => panic!("expected a configuration error about {needle}, got {r:?}"),
        }
    }
    assert_eq!((l.params, l.step), (before, 0));
}

#[test]
fn runs_share_a_directory_by_name_and_a_resume_keeps_the_meta_batch() {
    let d = dir("names");
    for (k, last) in [(5, "run-k5.json"), (10, "run-k10.json")] {
        let s = Trainer::new(3, 2)
            .checkpoint_dir(&d)
            .checkpoint_names(last, format!("best-k{k}.json"))
            .progress(Progress::Off)
            .run(
                &mut learner(),
                &mut Optimizer::adam(1e-3),
                &mut SinusoidSampler::new(k, k, 1).unwrap(),
            )
            .unwrap();
        assert_eq!(s.steps, 3);
        assert_eq!(Checkpoint::<f32>::load(d.join(last)).unwrap().step, 3);
    }
    assert!(!d.join(LAST_CHECKPOINT).exists());
    // Resumed with meta-batches of another size: the tasks would differ from an
    // uninterrupted run's, so the resume is refused before any step.
    let mut l = learner();
    let err = Trainer::new(6, 3)
        .checkpoint_dir(&d)
        .checkpoint_names("run-k5.json", "best-k5.json")
        .resume(true)
        .progress(Progress::Off)
        .run(
            &mut l,
            &mut Optimizer::adam(1e-3),
            &mut SinusoidSampler::new(5, 5, 1).unwrap(),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("meta-batches of 2 tasks, this run asks for 3"),
        "{err}"
    );
    assert_eq!(l.step, 0);
    // Empty names are refused.
    let err = Trainer::<f32>::new(1, 1)
        .checkpoint_names("", "b.json")
        .progress(Progress::Off)
        .run(
            &mut l,
            &mut Optimizer::adam(1e-3),
            &mut SinusoidSampler::new(5, 5, 1).unwrap(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("cannot be empty"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_resume_from_a_users_checkpoint_keeps_its_rate_and_this_runs_policy() {
    use metagrad::meta::NonFinite;
    // A checkpoint taken by hand after 2 steps at rate 0.05, without the trainer's state.
    let d = dir("user");
    std::fs::create_dir_all(&d).unwrap();
    let mut l = learner();
    let mut opt = Optimizer::adam(0.05);
    let mut tasks = SinusoidSampler::new(5, 5, 1).unwrap();
    for _ in 0..2 {
        l.meta_step(
            &Task::from_sinusoid(&tasks.sample_batch(2).unwrap()),
            &mut opt,
        )
        .unwrap();
    }
    Checkpoint::capture(&l, &opt, tasks.rng())
        .save(d.join(LAST_CHECKPOINT))
        .unwrap();
    let mut want = l.clone();
    for _ in 0..2 {
        want.meta_step(
            &Task::from_sinusoid(&tasks.sample_batch(2).unwrap()),
            &mut opt,
        )
        .unwrap();
    }

    let mut resumed = MetaLearner::new(
        Mlp::new(vec![1, 16, 1]),
        MetaConfig::maml(1, 0.01).with_non_finite(NonFinite::Skip),
        3,
    );
    let mut opt2 = Optimizer::adam(1.0);
    let s = Trainer::new(4, 2)
        .checkpoint_dir(&d)
        .resume(true)
        .progress(Progress::Off)
        .run(
            &mut resumed,
            &mut opt2,
            &mut SinusoidSampler::new(5, 5, 99).unwrap(),
        )
        .unwrap();
    assert_eq!((s.first_step, s.steps), (2, 4));
    assert_eq!(opt2.lr, 0.05, "the checkpoint's rate, not this run's");
    assert_eq!(resumed.params, want.params, "bit for bit");
    assert_eq!(
        resumed.config.on_non_finite,
        NonFinite::Skip,
        "this run's policy"
    );
    assert_eq!(
        s.history.len(),
        2,
        "no log: the history starts at the resume"
    );
    assert_eq!(s.history[0].step, 3);
    std::fs::remove_dir_all(&d).unwrap();
}
