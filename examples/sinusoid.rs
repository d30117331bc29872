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
//! With `--checkpoint-dir DIR`, each model's state — learner, Adam, and the task sampler's
//! generator — is saved atomically to `DIR/checkpoint-k{K}.json` every `--save-every`
//! meta-steps and when its training ends, with its training curve so far in
//! `DIR/progress-k{K}.json`. `--resume` continues each model from its checkpoint up to the
//! same `--steps` (a model with no checkpoint yet starts from step 0; a finished one is
//! only evaluated): the trained models, their test results and training curves are
//! bitwise those of a run that was never interrupted.

mod common;

use clap::Parser;
use metagrad::checkpoint::Checkpoint;
use metagrad::data::{SinusoidBatch, SinusoidSampler};
use metagrad::eval::confidence_interval;
use metagrad::map_fn::map_tasks;
use metagrad::meta::{InnerLoop, InnerRule, MetaConfig, MetaLearner, Optimizer, Task};
use metagrad::nn::{Ctx, Mlp, Model, NormMode};
use metagrad::Tape;
use ndarray::ArrayD;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::error::Error;
use std::path::{Path, PathBuf};
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
    /// Output directory for the plot.
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

/// The training curve of one model so far, saved beside its checkpoint so that a resumed
/// run reports the same curve as an uninterrupted one. Floats are stored as their IEEE-754
/// bits, so they read back exactly.
#[derive(Serialize, Deserialize)]
struct Progress {
    /// The meta-step the matching checkpoint was saved at.
    step: u64,
    /// Tasks per meta-batch of the run (a resumed run must use the same).
    meta_batch: usize,
    /// The reported means so far (`f64::to_bits`).
    curve_bits: Vec<u64>,
    /// Sum of the losses since the last reported mean (`f64::to_bits`).
    window_sum_bits: u64,
    /// Number of losses in that sum.
    window_len: usize,
}

/// Where one model's checkpoint and progress files go.
struct CheckpointFiles {
    checkpoint: PathBuf,
    progress: PathBuf,
}

impl CheckpointFiles {
    fn new(dir: &Path, k: usize) -> Self {
        CheckpointFiles {
            checkpoint: dir.join(format!("checkpoint-k{k}.json")),
            progress: dir.join(format!("progress-k{k}.json")),
        }
    }
}

/// One meta-trained model: the learner, its training curve (means of the post-update
/// query MSE), and the meta-step its training started from in this run.
struct Trained {
    learner: Learner,
    curve: Vec<f64>,
    resumed_from: u64,
}

/// Meta-trains one model with `k` support (and `k` query) points per training task, up to
/// `steps` meta-steps in all; with `files`, saves checkpoints there, and resumes from them
/// under `--resume`.
fn train(
    args: &Args,
    steps: u64,
    k: usize,
    files: Option<&CheckpointFiles>,
) -> Result<Trained, Box<dyn Error>> {
    let policy = common::non_finite(args.skip_non_finite);
    let config = MetaConfig::maml(TRAIN_INNER_STEPS, INNER_LR).with_non_finite(policy);
    let mut learner = Learner::new(Mlp::sinusoid(), config.clone(), args.seed)
        .with_comm(common::comm().clone())?;
    let mut opt = Optimizer::adam(META_LR);
    let mut sampler = SinusoidSampler::new(k, k, args.seed.wrapping_add(1 + k as u64))?;
    let mut window = (0.0, 0usize);
    let mut curve = Vec::new();

    if let Some(files) = files.filter(|f| args.resume && f.checkpoint.exists()) {
        let checkpoint = Checkpoint::<f32>::load(&files.checkpoint)?;
        let mut saved = checkpoint.config.clone();
        saved.parallel_iterations = config.parallel_iterations;
        saved.on_non_finite = config.on_non_finite;
        if saved != config {
            eprintln!(
                "note: K={k}: the checkpoint was trained with {saved:?}; continuing with it \
                 rather than with {config:?}"
            );
        }
        let (o, rng) = checkpoint.restore(&mut learner)?;
        learner.config.on_non_finite = policy; // this run's choice, not the saved one
        opt = o;
        sampler.set_rng(rng);
        let progress = std::fs::read_to_string(&files.progress)
            .ok()
            .and_then(|text| serde_json::from_str::<Progress>(&text).ok());
        match progress {
            Some(p) if p.step == learner.meta_batches() => {
                if p.meta_batch != args.meta_batch {
                    return Err(format!(
                        "K={k}: the checkpoint was trained with --meta-batch {}; resume with \
                         the same value (this run has {})",
                        p.meta_batch, args.meta_batch
                    )
                    .into());
                }
                curve = p.curve_bits.into_iter().map(f64::from_bits).collect();
                window = (f64::from_bits(p.window_sum_bits), p.window_len);
            }
            _ => eprintln!(
                "note: K={k}: {} is missing or not from step {}; the training curve restarts \
                 here (the model does not)",
                files.progress.display(),
                learner.step
            ),
        }
        eprintln!(
            "meta-train K={k}: resumed from {} at meta-step {}",
            files.checkpoint.display(),
            learner.step
        );
    } else if let Some(files) = files {
        if args.resume {
            eprintln!(
                "note: K={k}: no checkpoint at {}; training this model from step 0",
                files.checkpoint.display()
            );
        } else if files.checkpoint.exists() {
            common::note_overwrite(&files.checkpoint);
        }
    }

    // Under MPI every rank restored its own file: check they still agree.
    learner.check_ranks()?;
    // Counted in meta-batches drawn, so that skipped steps resume bit for bit.
    let first = learner.meta_batches();
    let total = steps.max(first);
    let report_every = (total / 20).max(1);
    let bar = common::progress_bar(format!("meta-train K={k}"), first, total)?;
    let save = |learner: &Learner,
                opt: &Optimizer<f32>,
                sampler: &SinusoidSampler,
                curve: &[f64],
                window: (f64, usize)|
     -> Result<(), Box<dyn Error>> {
        let Some(files) = files else {
            return Ok(());
        };
        let progress = Progress {
            step: learner.meta_batches(),
            meta_batch: args.meta_batch,
            curve_bits: curve.iter().map(|v| v.to_bits()).collect(),
            window_sum_bits: window.0.to_bits(),
            window_len: window.1,
        };
        if !common::writes_files() {
            return Ok(());
        }
        common::write_replace(&files.progress, &serde_json::to_string(&progress)?)?;
        Checkpoint::capture(learner, opt, sampler.rng()).save(&files.checkpoint)?;
        Ok(())
    };
    let t0 = Instant::now();
    for step in first + 1..=total {
        let batch = sampler.sample_batch(args.meta_batch)?;
        let tasks = Task::<f32>::from_sinusoid(&batch);
        let stats = learner.meta_step(&tasks, &mut opt)?;
        if stats.skipped {
            let message = format!(
                "meta-train K={k}: step {step} skipped, its loss or update was not finite \
                 ({} skipped so far)",
                learner.skipped_steps
            );
            common::say(bar.as_ref(), message);
        } else {
            window.0 += stats.loss;
            window.1 += 1;
        }
        if let Some(bar) = &bar {
            bar.inc(1);
            if step % 50 == 0 || step == total {
                bar.set_message(format!("query MSE {:.4}", window.0 / window.1 as f64));
            }
        }
        if step % report_every == 0 || step == total {
            let mean = window.0 / window.1 as f64;
            curve.push(mean);
            if bar.is_none() {
                eprintln!(
                    "meta-train K={k}: step {step:>6}/{total}  post-update query MSE \
                     (mean of last {}) {mean:.4}  [{:.1}s]",
                    window.1,
                    t0.elapsed().as_secs_f64()
                );
            }
            window = (0.0, 0);
        }
        if files.is_some() && step % args.save_every.max(1) == 0 && step < total {
            save(&learner, &opt, &sampler, &curve, window)?;
            let message = format!("meta-train K={k}: checkpoint saved at step {step}");
            common::say(bar.as_ref(), message);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let trained = total - first;
    eprintln!(
        "meta-train K={k}: {trained} steps in {:.1}s ({:.2} ms/step), final post-update \
         query MSE {:.4}{}",
        t0.elapsed().as_secs_f64(),
        1e3 * t0.elapsed().as_secs_f64() / trained.max(1) as f64,
        curve.last().copied().unwrap_or(f64::NAN),
        if first > 0 {
            format!(" (resumed at step {first} of {total})")
        } else {
            String::new()
        }
    );
    save(&learner, &opt, &sampler, &curve, window)?;
    if let Some(files) = files {
        eprintln!(
            "meta-train K={k}: checkpoint saved: {} (step {})",
            files.checkpoint.display(),
            learner.step
        );
    }
    Ok(Trained {
        learner,
        curve,
        resumed_from: first,
    })
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

/// Predictions on `grid` (`[n, 1]`) after adapting on the task's support set, one curve
/// per entry of `steps`.
fn predict_curves(
    learner: &Learner,
    task: &Task<f32>,
    grid: &ArrayD<f32>,
    steps: &[usize],
) -> Vec<Vec<f32>> {
    let mut t = Tape::new();
    let theta = learner.params.place(&mut t);
    let mut ctx = Ctx::new(NormMode::Transductive);
    let xs = t.constant(task.support_x.clone());
    let most = steps.iter().copied().max().unwrap_or(0);
    let inner = InnerLoop {
        model: &learner.model,
        rule: InnerRule::Sgd,
        lr: INNER_LR,
        steps: most,
        create_graph: false,
    };
    let traj = inner.adapt(&mut t, &theta, &[], xs, &task.support_y, &mut ctx);
    let xg = t.constant(grid.clone());
    t.no_grad(|t| {
        steps
            .iter()
            .map(|&s| {
                let out = learner.model.forward(t, &traj[s], xg, &mut ctx);
                t.value(out).iter().copied().collect()
            })
            .collect()
    })
}

/// One row of panels per trained model: three test tasks each.
fn plot(
    path: &std::path::Path,
    rows: &[(usize, &Learner, &SinusoidBatch, &[Task<f32>])],
) -> Result<(), Box<dyn Error>> {
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
    for (r, (k, learner, batch, tasks)) in rows.iter().enumerate() {
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
    let files: Vec<Option<CheckpointFiles>> = args
        .train_k
        .iter()
        .map(|&k| {
            args.checkpoint_dir
                .as_ref()
                .map(|d| CheckpointFiles::new(d, k))
        })
        .collect();
    if let Some(dir) = &args.checkpoint_dir {
        std::fs::create_dir_all(dir)?;
        if args.resume && !files.iter().flatten().any(|f| f.checkpoint.exists()) {
            let names: Vec<String> = files
                .iter()
                .flatten()
                .filter_map(|f| f.checkpoint.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            return Err(metagrad::Error::NotFound {
                path: files
                    .iter()
                    .flatten()
                    .next()
                    .map_or(dir.clone(), |f| f.checkpoint.clone()),
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

    let mut results = Vec::new();
    let mut models = Vec::new();
    let mut resumed_from = Vec::new();
    for (&k, files) in args.train_k.iter().zip(&files) {
        let t0 = Instant::now();
        let trained = train(&args, steps, k, files.as_ref())?;
        let (learner, curve) = (trained.learner, trained.curve);
        resumed_from.push(trained.resumed_from);
        let train_s = t0.elapsed().as_secs_f64();
        let batch =
            SinusoidSampler::new(k, TEST_QUERY, TEST_SEED + k as u64)?.sample_batch(n_test)?;
        let tasks = Task::<f32>::from_sinusoid(&batch);
        let t1 = Instant::now();
        let mse = evaluate(&learner, &tasks)?;
        let eval_s = t1.elapsed().as_secs_f64();
        results.push((k, mse, curve, train_s, eval_s));
        models.push((k, learner, batch, tasks));
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
    for (k, mse, _, _, _) in &results {
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
    let rows: Vec<(usize, &Learner, &SinusoidBatch, &[Task<f32>])> = models
        .iter()
        .map(|(k, l, b, t)| (*k, l, b, t.as_slice()))
        .collect();
    if common::writes_files() {
        plot(&svg, &rows)?;
    }
    println!("plot: {}", svg.display());

    let elapsed = start.elapsed().as_secs_f64();
    println!("total wall-clock time: {elapsed:.1}s");
    let per_k: Vec<_> = results
        .iter()
        .zip(&resumed_from)
        .zip(&models)
        .map(
            |(((k, mse, curve, train_s, eval_s), first), (_, learner, _, _))| {
                let by_steps: Vec<_> = EVAL_STEPS
                    .iter()
                    .zip(mse)
                    .map(|(s, st)| {
                        json!({ "inner_steps": s, "mse": st.mean, "ci95": st.ci,
                            "median": st.median, "diverged": st.diverged })
                    })
                    .collect();
                let mut entry = json!({
                    "k": k,
                    "meta_trained_k": k,
                    "test_mse_after_steps": by_steps,
                    "train_curve_post_update_mse": curve,
                    "train_seconds": train_s,
                    "eval_seconds": eval_s,
                    "skipped_steps": learner.skipped_steps,
                    "params_digest": format!("{:016x}", learner.params.digest()),
                });
                if args.checkpoint_dir.is_some() {
                    entry["resumed_from_step"] = json!(first);
                }
                entry
            },
        )
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
