//! Few-shot sinusoid regression with second-order MAML, as in Finn et al. (2017),
//! section 5.1 — no downloaded data needed.
//!
//! ```text
//! cargo run --release --example sinusoid              # full run (a few minutes on 2 cores)
//! cargo run --release --example sinusoid -- --quick   # smoke run (seconds)
//! cargo run --release --example sinusoid -- --checkpoint-dir runs/ckpt           # checkpointed
//! cargo run --release --example sinusoid -- --checkpoint-dir runs/ckpt --resume  # continue it
//! ```
//!
//! Setup as in the paper: an MLP 1-40-40-1 with ReLU, tasks `y = A·sin(x − φ)` with
//! `A ~ U[0.1, 5]`, `φ ~ U[0, π]`, `x ~ U[−5, 5]`; one inner SGD step of rate 0.01 during
//! meta-training, meta-batch 25, Adam with rate 1e-3 on the second-order meta-gradient.
//! As in the paper, one model is meta-trained per shot count (K = 5 and K = 10; K support
//! and K query points per training task). Each model is then tested on 600 fixed test
//! tasks with K support points and 100 query points each: the query MSE before adaptation
//! and after 1, 5 and 10 inner SGD steps of rate 0.01.
//!
//! Writes `sinusoid.svg` (three test tasks per K: the true curve, the K support points, the
//! prediction before adaptation and after 1 and 10 steps) to `--out`, and ends with one
//! line `RESULT {json}`.
//!
//! Each model is meta-trained by `metagrad::train::Trainer`, which logs every step to
//! `--out/train-k{K}.csv`. With `--checkpoint-dir DIR`, each model's state (learner, Adam,
//! the task sampler's generator) is saved atomically to `DIR/checkpoint-k{K}.json` every
//! `--save-every` meta-steps and when its training ends. `--resume` continues each model
//! from its checkpoint up to the same `--steps` (a model with no checkpoint yet starts
//! from step 0; a finished one is only evaluated), reading the steps before the resume
//! back from its log: the trained models, their test results and training curves are
//! bitwise those of a run that was never interrupted.

mod common;

use clap::Parser;
use metagrad::data::{SinusoidBatch, SinusoidSampler};
use metagrad::eval::confidence_interval;
use metagrad::map_fn::map_tasks;
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
use metagrad::nn::{Mlp, NormMode};
use metagrad::train::{StepRecord, Summary, Trainer};
use ndarray::ArrayD;
use plotters::prelude::*;
use serde_json::json;
use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Inner learning rate, for training and testing (the paper's α).
const INNER_LR: f64 = 0.01;
/// Outer (Adam) learning rate (the paper's β).
const META_LR: f64 = 1e-3;
/// Inner steps during meta-training.
const TRAIN_INNER_STEPS: usize = 1;
/// Inner steps at which the test MSE is reported (0 = before adaptation).
const EVAL_STEPS: [usize; 4] = [0, 1, 5, 10];
/// Query points per test task.
const TEST_QUERY: usize = 100;
/// Seed of the test tasks: fixed, independent of `--seed`, so runs are comparable.
const TEST_SEED: u64 = 20_170_309;

#[derive(Parser, Debug)]
#[command(about = "Second-order MAML on sinusoid regression (Finn et al. 2017, sec. 5.1)")]
struct Args {
    /// Meta-training steps per model [default: 70000, as in the paper; 300 with --quick]
    /// (a resumed run continues up to this count).
    #[arg(long)]
    steps: Option<u64>,
    /// Tasks per meta-batch.
    #[arg(long, default_value_t = 25)]
    meta_batch: usize,
    /// Shot counts to meta-train a model for (each model is tested with its own K).
    #[arg(long, value_delimiter = ',', default_values_t = vec![5, 10])]
    train_k: Vec<usize>,
    /// Number of test tasks per K [default: 600; 100 with --quick].
    #[arg(long)]
    test_tasks: Option<usize>,
    /// Skip (and count) meta-steps whose loss or update is not finite, instead of
    /// stopping with an error; nothing non-finite reaches the parameters either way.
    #[arg(long)]
    skip_non_finite: bool,
    /// Seed of initialisation and training tasks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Output directory for the plot and the training logs (train-k{K}.csv).
    #[arg(long, default_value = "runs/sinusoid")]
    out: PathBuf,
    /// Smoke run (CI): fewer meta-steps and test tasks unless given explicitly.
    #[arg(long)]
    quick: bool,
    /// Save checkpoints here (atomically), one per K, every --save-every steps and at the
    /// end of each model's training.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Meta-steps between checkpoints.
    #[arg(long, default_value_t = 5000)]
    save_every: u64,
    /// Continue from the checkpoints in --checkpoint-dir.
    #[arg(long, requires = "checkpoint_dir")]
    resume: bool,
}

type Learner = MetaLearner<f32, Mlp>;

/// Test MSE after some inner steps: mean ± 95% CI (the evaluation protocol's
/// [`confidence_interval`]) and median over the tasks, and how many tasks' adaptation
/// diverged (non-finite MSE; left out of the mean, not the median).
#[derive(Debug, Clone, Copy)]
struct Stat {
    mean: f64,
    ci: f64,
    median: f64,
    diverged: usize,
}

fn stat(losses: &[f64]) -> Stat {
    let finite: Vec<f64> = losses.iter().copied().filter(|v| v.is_finite()).collect();
    let (mean, ci) = confidence_interval(&finite);
    let mut sorted = losses.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Stat {
        mean,
        ci,
        median: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        diverged: losses.len() - finite.len(),
    }
}

/// One meta-trained model, its run, its test tasks and its test MSE.
struct Trained {
    k: usize,
    learner: Learner,
    summary: Summary,
    batch: SinusoidBatch,
    tasks: Vec<Task<f32>>,
    mse: Vec<Stat>,
    train_s: f64,
    eval_s: f64,
}

/// Meta-trains one model with `k` support (and `k` query) points per training task, up to
/// `steps` meta-steps in all; with `--checkpoint-dir`, saves checkpoints there, and
/// resumes from them under `--resume`.
fn train(args: &Args, steps: u64, k: usize) -> Result<(Learner, Summary), Box<dyn Error>> {
    let config = MetaConfig::maml(TRAIN_INNER_STEPS, INNER_LR)
        .with_non_finite(common::non_finite(args.skip_non_finite));
    let mut learner =
        Learner::new(Mlp::sinusoid(), config, args.seed).with_comm(common::comm().clone())?;
    let mut sampler = SinusoidSampler::new(k, k, args.seed.wrapping_add(1 + k as u64))?;
    let mut trainer = Trainer::new(steps, args.meta_batch)
        .name(format!("meta-train K={k}"))
        .log(args.out.join(format!("train-k{k}.csv")));
    if let Some(dir) = &args.checkpoint_dir {
        trainer = trainer
            .checkpoint_dir(dir)
            .checkpoint_names(format!("checkpoint-k{k}.json"), format!("best-k{k}.json"))
            .save_every(args.save_every.max(1))
            .resume(args.resume);
    }
    let summary = trainer.run(&mut learner, &mut Optimizer::adam(META_LR), &mut sampler)?;
    Ok((learner, summary))
}

/// The training curve: the mean post-update query MSE over each twentieth of the run
/// (skipped steps left out), from the whole history, resumed or not.
fn curve(history: &[StepRecord], total: u64) -> Vec<f64> {
    let every = (total / 20).max(1);
    let (mut curve, mut window) = (Vec::new(), (0.0, 0usize));
    for r in history {
        if !r.skipped {
            window = (window.0 + r.loss, window.1 + 1);
        }
        if r.step % every == 0 || r.step == total {
            curve.push(window.0 / window.1 as f64);
            window = (0.0, 0);
        }
    }
    curve
}

/// Test-set query MSE (mean, 95% CI) after each of [`EVAL_STEPS`] inner steps.
fn evaluate(learner: &Learner, tasks: &[Task<f32>]) -> Result<Vec<Stat>, Box<dyn Error>> {
    EVAL_STEPS
        .iter()
        .map(|&s| {
            let losses = map_tasks(tasks.len(), usize::MAX, |i| {
                match learner.evaluate_task(&tasks[i], s, NormMode::Transductive) {
                    Ok((mse, _)) => Ok(mse),
                    // The adaptation diverged on this task: counted, left out of the mean.
                    Err(metagrad::Error::NonFinite { .. }) => Ok(f64::INFINITY),
                    Err(e) => Err(e),
                }
            })?
            .into_iter()
            .collect::<Result<Vec<f64>, _>>()?;
            Ok(stat(&losses))
        })
        .collect()
}

/// Predictions on `grid` (`[n, 1]`) after adapting on the task's support set with each
/// of `steps` inner steps (NaN where the adaptation diverged).
fn predict_curves(
    learner: &Learner,
    task: &Task<f32>,
    grid: &ArrayD<f32>,
    steps: &[usize],
) -> Vec<Vec<f32>> {
    let mode = NormMode::Transductive;
    let predict = |s| -> metagrad::Result<Vec<f32>> {
        let adapted = learner.adapt(&task.support_x, &task.support_y, s, mode)?;
        Ok(adapted.logits(grid)?.iter().copied().collect())
    };
    let diverged = vec![f32::NAN; grid.len()];
    steps
        .iter()
        .map(|&s| predict(s).unwrap_or_else(|_| diverged.clone()))
        .collect()
}

/// One row of panels per trained model: three test tasks each.
fn plot(path: &std::path::Path, rows: &[Trained]) -> Result<(), Box<dyn Error>> {
    let panels = 3usize;
    let root =
        SVGBackend::new(path, (420 * panels as u32, 340 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows.len(), panels));
    let steps = [0usize, 1, 10];
    let colours = [
        RGBColor(150, 200, 150),
        RGBColor(40, 160, 40),
        RGBColor(0, 90, 0),
    ];
    for (
        r,
        Trained {
            k,
            learner,
            batch,
            tasks,
            ..
        },
    ) in rows.iter().enumerate()
    {
        for c in 0..panels {
            let area = &areas[r * panels + c];
            let truth = batch.task(c).ok_or("too few test tasks to plot")?;
            let (gx, gy) = truth.curve(200);
            let grid = gx.clone().into_dyn();
            let preds = predict_curves(learner, &tasks[c], &grid, &steps);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "MAML, K={k}: A={:.2}, phase={:.2}",
                        truth.amplitude, truth.phase
                    ),
                    ("sans-serif", 16),
                )
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(30)
                .build_cartesian_2d(-5.0f32..5.0f32, -5.5f32..5.5f32)?;
            chart.configure_mesh().max_light_lines(0).draw()?;
            chart
                .draw_series(LineSeries::new(
                    gx.iter().zip(gy.iter()).map(|(&x, &y)| (x, y)),
                    RED.stroke_width(2),
                ))?
                .label("ground truth")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
            for ((s, pred), colour) in steps.iter().zip(&preds).zip(colours) {
                let label = match s {
                    0 => "pre-update".to_string(),
                    1 => "1 grad step".to_string(),
                    n => format!("{n} grad steps"),
                };
                chart
                    .draw_series(DashedLineSeries::new(
                        gx.iter().zip(pred).map(|(&x, &y)| (x, y)),
                        6,
                        3,
                        colour.stroke_width(2),
                    ))?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                    });
            }
            chart
                .draw_series(
                    truth
                        .x_support
                        .iter()
                        .zip(truth.y_support.iter())
                        .map(|(&x, &y)| TriangleMarker::new((x, y), 6, MAGENTA.filled())),
                )?
                .label(format!("{k} support points"))
                .legend(|(x, y)| TriangleMarker::new((x + 8, y), 5, MAGENTA.filled()));
            if c == 0 {
                common::legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
            }
        }
    }
    root.present()?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::main(args.threads, || run(args))
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let start = Instant::now();
    let steps = args.steps.unwrap_or(if args.quick { 300 } else { 70_000 });
    let n_test = args
        .test_tasks
        .unwrap_or(if args.quick { 100 } else { 600 });
    if args.train_k.is_empty() || args.train_k.contains(&0) || n_test < 3 || args.meta_batch == 0 {
        return Err(
            "need --train-k of positive counts, --test-tasks >= 3, --meta-batch >= 1".into(),
        );
    }
    if let Some(dir) = args.checkpoint_dir.as_ref().filter(|_| args.resume) {
        let names: Vec<String> = args
            .train_k
            .iter()
            .map(|k| format!("checkpoint-k{k}.json"))
            .collect();
        if !names.iter().any(|n| dir.join(n).exists()) {
            return Err(metagrad::Error::NotFound {
                path: dir.join(&names[0]),
                hint: format!(
                    "--resume: no checkpoint of this run has been saved in {} (looked for {}); \
                     check --checkpoint-dir and --train-k, or start without --resume.",
                    dir.display(),
                    names.join(", ")
                ),
            }
            .into());
        }
    }
    std::fs::create_dir_all(&args.out)?;
    println!(
        "Second-order MAML on sinusoid regression: MLP 1-40-40-1 (ReLU), {steps} meta-steps \
         per model, meta-batch {}, {TRAIN_INNER_STEPS} inner SGD step(s) of lr {INNER_LR}, \
         Adam lr {META_LR}, seed {}, {} thread(s){}",
        args.meta_batch,
        args.seed,
        rayon::current_num_threads(),
        if args.quick { " [--quick]" } else { "" }
    );
    println!(
        "One model meta-trained per K (K support + K query points per training task); each is \
         tested on {n_test} fixed test tasks (seed {TEST_SEED}) with K support and \
         {TEST_QUERY} query points, adapting with SGD lr {INNER_LR}."
    );

    let mut models = Vec::new();
    for &k in &args.train_k {
        let t0 = Instant::now();
        let (learner, summary) = train(&args, steps, k)?;
        let train_s = t0.elapsed().as_secs_f64();
        let batch =
            SinusoidSampler::new(k, TEST_QUERY, TEST_SEED + k as u64)?.sample_batch(n_test)?;
        let tasks = Task::<f32>::from_sinusoid(&batch);
        let t1 = Instant::now();
        let mse = evaluate(&learner, &tasks)?;
        let eval_s = t1.elapsed().as_secs_f64();
        models.push(Trained {
            k,
            learner,
            summary,
            batch,
            tasks,
            mse,
            train_s,
            eval_s,
        });
    }

    println!();
    println!(
        "Test query MSE (mean ± 95% CI over test tasks; median in brackets; tasks whose \
         adaptation diverged are counted and left out of the mean) after n inner steps of SGD \
         lr {INNER_LR}:"
    );
    print!("{:<26}", "");
    for s in EVAL_STEPS {
        print!(
            " {:>35}",
            format!("{s} step{}", if s == 1 { "" } else { "s" })
        );
    }
    println!();
    for Trained { k, mse, .. } in &models {
        print!("{:<26}", format!("K={k} (meta-trained K={k})"));
        for st in mse {
            let div = if st.diverged > 0 {
                format!(" {} diverged", st.diverged)
            } else {
                String::new()
            };
            print!(
                " {:>35}",
                format!("{:.4} ± {:.4} [{:.4}]{div}", st.mean, st.ci, st.median)
            );
        }
        println!();
    }
    println!(
        "Reference (Finn et al. 2017, sec. 5.1, Figs. 2-3 — curves, no table): after one \
         gradient step MAML's MSE is far below that of a model pretrained on all tasks and \
         fine-tuned the same way, and it keeps decreasing with more steps without overfitting \
         the K points."
    );

    let svg = args.out.join("sinusoid.svg");
    if common::writes_files() {
        plot(&svg, &models)?;
    }
    println!("plot: {}", svg.display());

    let elapsed = start.elapsed().as_secs_f64();
    println!("total wall-clock time: {elapsed:.1}s");
    let per_k: Vec<_> = models
        .iter()
        .map(|m| {
            let by_steps: Vec<_> = EVAL_STEPS
                .iter()
                .zip(&m.mse)
                .map(|(s, st)| {
                    json!({ "inner_steps": s, "mse": st.mean, "ci95": st.ci,
                        "median": st.median, "diverged": st.diverged })
                })
                .collect();
            let mut entry = json!({
                "k": m.k,
                "meta_trained_k": m.k,
                "test_mse_after_steps": by_steps,
                "train_curve_post_update_mse": curve(&m.summary.history, m.summary.steps),
                "train_seconds": m.train_s,
                "eval_seconds": m.eval_s,
                "skipped_steps": m.learner.skipped_steps,
                "params_digest": format!("{:016x}", m.learner.params.digest()),
            });
            if args.checkpoint_dir.is_some() {
                entry["resumed_from_step"] = json!(m.summary.first_step);
            }
            entry
        })
        .collect();
    let mut result = json!({
        "example": "sinusoid",
        "method": "maml-second-order",
        "quick": args.quick,
        "meta_steps": steps,
        "meta_batch": args.meta_batch,
        "inner_lr": INNER_LR,
        "meta_lr": META_LR,
        "train_inner_steps": TRAIN_INNER_STEPS,
        "seed": args.seed,
        "threads": rayon::current_num_threads(),
        "ranks": common::comm().size(),
        "bytes_sent_received": common::comm().traffic(),
        "test_tasks": n_test,
        "test_query_points": TEST_QUERY,
        "test_seed": TEST_SEED,
        "results": per_k,
        "plot": svg.display().to_string(),
        "wall_seconds": elapsed,
    });
    // Only checkpointed runs carry these keys, so the default run's output is unchanged.
    if let Some(dir) = &args.checkpoint_dir {
        result["checkpoint_dir"] = json!(dir.display().to_string());
        result["resumed"] = json!(args.resume);
    }
    println!("RESULT {result}");
    Ok(())
}
