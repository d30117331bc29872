//! How much does transductive batch norm inflate few-shot accuracy? Measured, not asserted.
//!
//! ```text
//! cargo run --release --example norm_modes                      # 4 min on 2 idle cores (243 s on 2026-11-29)
//! cargo run --release --example norm_modes -- --steps 20 --eval-tasks 50   # smoke run
//! ```
//!
//! Meta-trains one Conv-4 with batch norm on Omniglot 5-way 1-shot (second-order MAML,
//! short run), then evaluates that **same trained model** on the **same test episodes**
//! twice: with transductive batch norm (each support and query set normalised with its own
//! statistics, so query examples inform each other's predictions) and with inductive batch
//! norm (running statistics only). Separately, with the same budget, the same training
//! episodes and the same initialisation seed, meta-trains and evaluates Conv-4 with group
//! norm and with TaskNorm-I, which are non-transductive by construction. Prints a table of
//! accuracy ± 95% CI, the paired transductive − inductive difference on identical
//! episodes, and ends with `RESULT {json}`.
//!
//! The budget is small by default (300 meta-steps of 8 tasks, 32 filters). Measured on 2
//! cores: 692 s of CPU time; the batch-norm model scored 80.8% ± 0.9% transductive and
//! 20.4% ± 0.2% inductive (chance: with running statistics the inner steps at rate 0.4
//! blow up, and one of the 600 tasks diverged outright), group norm 36.1% ± 0.9%,
//! TaskNorm-I 71.0% ± 1.0%. A diverged task counts as all misses. The size of the gap
//! depends on how far training got, so compare runs with the same flags.

mod common;

use clap::Parser;
use common::{OmniglotArgs, TEST_SEED};
use metagrad::data::{EpisodeSampler, ImageCollection};
use metagrad::eval::{confidence_interval, EvalReport};
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer};
use metagrad::nn::{Conv4, NormKind, NormMode};
use metagrad::train::{Progress, Trainer};
use serde_json::json;
use std::error::Error;
use std::process::ExitCode;
use std::time::Instant;

/// The character split: the omniglot example's default `--split-seed`.
const SPLIT_SEED: u64 = 0;

#[derive(Parser, Debug)]
#[command(about = "Transductive vs inductive batch norm, group norm and TaskNorm on Omniglot")]
struct Args {
    // The data, the task, the inner loop, the evaluation, the seed and the threads: the
    // flags shared with the omniglot example.
    #[command(flatten)]
    setup: OmniglotArgs,
    /// Meta-training steps per model.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Tasks per meta-batch.
    #[arg(long, default_value_t = 8)]
    meta_batch: usize,
    /// Filters per convolution (64 in MAML).
    #[arg(long, default_value_t = 32)]
    filters: usize,
}

/// One meta-trained model: its learner and what training cost.
struct Trained {
    learner: MetaLearner<f32, Conv4>,
    seconds: f64,
    final_accuracy: f64,
}

/// Meta-trains a Conv-4 with `norm` from the same initialisation seed on the same training
/// episodes as every other model.
fn train(
    args: &Args,
    name: &str,
    norm: NormKind,
    train: &ImageCollection,
) -> Result<Trained, Box<dyn Error>> {
    let model = args.setup.conv4(args.filters, norm);
    let config = MetaConfig::maml(args.setup.inner_steps, args.setup.inner_lr);
    let mut learner = MetaLearner::<f32, _>::new(model, config, args.setup.seed);
    let mut opt = Optimizer::adam(args.setup.outer_lr);
    let mut sampler =
        EpisodeSampler::new(train, args.setup.spec(), args.setup.seed.wrapping_add(1))?;
    let t0 = Instant::now();
    let summary = Trainer::new(args.steps, args.meta_batch)
        .name(format!("  {name}"))
        .progress(Progress::Lines)
        .run(&mut learner, &mut opt, &mut sampler)?;
    Ok(Trained {
        learner,
        seconds: t0.elapsed().as_secs_f64(),
        final_accuracy: summary.final_accuracy.unwrap_or(f64::NAN),
    })
}

/// The test report of a trained model, batch norm in `mode`, and its seconds. Every model
/// and mode sees the same test episodes.
fn evaluate(
    args: &Args,
    trained: &Trained,
    test: &ImageCollection,
    mode: NormMode,
) -> Result<(EvalReport, f64), Box<dyn Error>> {
    let t0 = Instant::now();
    let report = args.setup.test_report(&trained.learner, test, mode)?;
    Ok((report, t0.elapsed().as_secs_f64()))
}

fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    let data = args.setup.data_folder()?;
    let start = Instant::now();
    if args.setup.eval_tasks < 2 || args.steps == 0 || args.meta_batch == 0 {
        return Err("need --eval-tasks >= 2, --steps >= 1 and --meta-batch >= 1".into());
    }
    args.setup.check_groups(args.filters)?;
    let split = common::load_maml_split(&data, SPLIT_SEED)?;
    let (train_set, test_set) = (split.train, split.test);
    println!(
        "Omniglot {}-way {}-shot ({} queries/class): Conv-4 with {} filters, second-order MAML, \
         {} inner step(s) of lr {} (test: {}), Adam lr {}, {} meta-steps of {} tasks per \
         model, seed {}; {} test tasks (seed {TEST_SEED}, identical for every row); {} thread(s)",
        args.setup.ways,
        args.setup.shots,
        args.setup.queries,
        args.filters,
        args.setup.inner_steps,
        args.setup.inner_lr,
        args.setup.test_steps,
        args.setup.outer_lr,
        args.steps,
        args.meta_batch,
        args.setup.seed,
        args.setup.eval_tasks,
        rayon::current_num_threads()
    );

    let mut rows: Vec<(String, &'static str, EvalReport, f64, f64)> = Vec::new();
    let mut trained_info = Vec::new();

    eprintln!("meta-training with batch norm ...");
    let bn = train(
        args,
        "batch norm",
        NormKind::Batch { per_step: None },
        &train_set,
    )?;
    let (trans, trans_s) = evaluate(args, &bn, &test_set, NormMode::Transductive)?;
    let (ind, ind_s) = evaluate(args, &bn, &test_set, NormMode::Inductive)?;
    trained_info.push(("batch", bn.seconds, bn.final_accuracy));
    rows.push((
        "batch norm".into(),
        "transductive",
        trans,
        bn.seconds,
        trans_s,
    ));
    rows.push((
        "batch norm (same model)".into(),
        "inductive",
        ind,
        bn.seconds,
        ind_s,
    ));

    let others = [
        (
            format!("group norm ({} groups)", args.setup.groups),
            "group",
            NormKind::Group {
                groups: args.setup.groups,
            },
        ),
        ("TaskNorm-I".to_string(), "tasknorm", NormKind::TaskNorm),
    ];
    for (name, key, kind) in others {
        eprintln!("meta-training with {name} ...");
        let m = train(args, &name, kind, &train_set)?;
        // The mode is irrelevant without batch norm; inductive is stated for clarity.
        let (r, s) = evaluate(args, &m, &test_set, NormMode::Inductive)?;
        trained_info.push((key, m.seconds, m.final_accuracy));
        rows.push((
            name,
            "n/a (per-example / support statistics)",
            r,
            m.seconds,
            s,
        ));
    }

    println!();
    println!(
        "{:<26} {:<40} {:>16} {:>6} {:>9} {:>9}",
        "normalisation", "test-time mode", "accuracy", "tasks", "diverged", "train s"
    );
    for (name, mode, r, train_s, _) in &rows {
        println!(
            "{:<26} {:<40} {:>16} {:>6} {:>9} {:>9.0}",
            name,
            mode,
            format!("{:.1}% ± {:.1}%", 100.0 * r.mean_accuracy, 100.0 * r.ci95),
            r.tasks,
            r.diverged,
            train_s
        );
    }
    // Paired difference on identical episodes: the transductive gap of one model.
    let diffs: Vec<f64> = rows[0]
        .2
        .accuracies
        .iter()
        .zip(&rows[1].2.accuracies)
        .map(|(t, i)| t - i)
        .collect();
    let (gap, gap_ci) = confidence_interval(&diffs);
    println!();
    println!(
        "transductive − inductive batch norm, same model, same {} episodes: {:+.1} ± {:.1} \
         points (paired, 95% CI)",
        diffs.len(),
        100.0 * gap,
        100.0 * gap_ci
    );
    println!(
        "(A task whose adaptation diverged — non-finite query loss — counts as all misses in \
         the accuracy and is left out of the mean loss.)"
    );
    println!(
        "(Transductive batch norm lets the 75 query examples of a task share statistics, so a \
         prediction depends on the other queries; inductive uses only running statistics \
         gathered during meta-training. Group norm and TaskNorm-I never look across query \
         examples.)"
    );
    let wall = start.elapsed().as_secs_f64();
    println!("total wall-clock time: {wall:.1}s");

    let json_rows: Vec<_> = rows
        .iter()
        .map(|(name, mode, r, train_s, eval_s)| {
            json!({
                "norm": name,
                "mode": mode,
                "accuracy": r.mean_accuracy,
                "ci95": r.ci95,
                "loss": r.mean_loss,
                "tasks": r.tasks,
                "diverged": r.diverged,
                "test_steps": r.steps,
                "train_seconds": train_s,
                "eval_seconds": eval_s,
            })
        })
        .collect();
    let training: Vec<_> = trained_info
        .iter()
        .map(|(k, s, a)| json!({ "norm": k, "seconds": s, "final_train_accuracy": a }))
        .collect();
    let result = json!({
        "example": "norm_modes",
        "ways": args.setup.ways,
        "shots": args.setup.shots,
        "queries": args.setup.queries,
        "filters": args.filters,
        "meta_steps": args.steps,
        "meta_batch": args.meta_batch,
        "inner_steps": args.setup.inner_steps,
        "test_steps": args.setup.test_steps,
        "inner_lr": args.setup.inner_lr,
        "outer_lr": args.setup.outer_lr,
        "seed": args.setup.seed,
        "test_seed": TEST_SEED,
        "threads": rayon::current_num_threads(),
        "rows": json_rows,
        "transductive_minus_inductive": { "mean": gap, "ci95": gap_ci, "tasks": diffs.len() },
        "training": training,
        "wall_seconds": wall,
    });
    println!("RESULT {result}");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::main(args.setup.threads, || run(&args))
}
