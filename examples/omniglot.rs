//! Meta-trains MAML (or, with `--method imaml`, iMAML) on Omniglot (Finn et al. 2017,
//! sec. 5.2) and evaluates it with the
//! standard protocol: mean query accuracy over 600 test tasks ± 95% confidence interval.
//!
//! ```text
//! cargo run --release --example omniglot -- --help
//! cargo run --release --example omniglot                        # 5-way 1-shot, 2000 meta-steps
//! cargo run --release --example omniglot -- --steps 20 --meta-batch 4 --eval-tasks 50   # smoke run
//! cargo run --release --example omniglot -- --checkpoint-dir runs/ckpt            # checkpointed
//! cargo run --release --example omniglot -- --checkpoint-dir runs/ckpt --resume   # continue it
//! ```
//!
//! Data: `--data DIR`, or the `METAGRAD_OMNIGLOT` environment variable, or
//! `../shared/data/omniglot` (a folder with `images_background.zip` and
//! `images_evaluation.zip`, or their extracted folders).
//!
//! Setup as in MAML: the MAML split (1200 characters shuffled with `--split-seed` for
//! meta-training, of which 100 are held out for validation and unused here; the other 423
//! for testing), meta-training classes augmented with 90° rotations, Conv-4 with 64
//! filters and max-pooling, `--inner-steps` inner SGD steps of rate `--inner-lr` during
//! meta-training and `--test-steps` at test time, Adam on the (second-order unless
//! `--first-order`) meta-gradient.
//!
//! Batch norm at test time: by default the model is evaluated **both** inductively
//! (running statistics) and transductively (each query set normalised with its own
//! statistics, which lets query examples inform each other) on the same test episodes,
//! and both results are printed with their mode; `--eval-mode inductive` or
//! `--eval-mode transductive` picks one. MAML's published Omniglot figures used the
//! transductive mode. See `examples/norm_modes.rs`.
//!
//! Cost: with the defaults (64 filters, meta-batch 32, second order) one meta-step takes
//! about 1.32 s on 2 cores (`cargo bench --bench maml_step`, W2, 2026-12-02), so the
//! default 2000 steps come to about 45 minutes by that figure; `--first-order`, `--meta-batch 8` or
//! `--filters 32` make it several times cheaper.
//!
//! iMAML (Rajeswaran et al. 2019): `--method imaml` takes the implicit meta-gradient
//! instead, by `--cg-steps` conjugate-gradient steps with regularisation `--imaml-lambda`
//! (see `docs/imaml.md`). The paper's Omniglot settings:
//!
//! ```text
//! cargo run --release --example omniglot -- --method imaml --imaml-lambda 2 --cg-steps 5 \
//!     --cg-damping 4 --inner-steps 16 --inner-lr 0.1 --test-steps 16
//! ```
//!
//! Meta-trains with `metagrad::train::Trainer`, which writes the log of every step
//! (`curve.csv`: the trainer's CSV log, with loss, accuracy, learning rate and seconds) to
//! `--out`, and the curve drawn from it (`curve.svg`). With `--checkpoint-dir`, it saves
//! `checkpoint.json` there atomically every `--save-every` steps and at the end, and
//! `--resume` continues from it bit for bit, the log and the curve covering the whole run.
//! Ends with one line `RESULT {json}`.

mod common;

use clap::{Parser, ValueEnum};
use common::{OmniglotArgs, TEST_SEED};
use metagrad::checkpoint::Checkpoint;
use metagrad::data::EpisodeSampler;
use metagrad::meta::{Imaml, MetaConfig, MetaLearner, Optimizer, Order};
use metagrad::nn::{NormKind, NormMode};
use metagrad::train::{StepRecord, Trainer};
use plotters::prelude::*;
use serde_json::json;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Name of the checkpoint file inside `--checkpoint-dir`.
const CHECKPOINT_FILE: &str = "checkpoint.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Norm {
    /// Batch norm (one set of running statistics and affine weights).
    Batch,
    /// Group norm (`--groups` groups); the same in every mode.
    Group,
    /// Layer norm; the same in every mode.
    Layer,
    /// Instance norm; the same in every mode.
    Instance,
    /// TaskNorm-I: support-set statistics blended with each example's own.
    Tasknorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// MAML: differentiate through the inner loop.
    Maml,
    /// iMAML: the implicit meta-gradient at the end point of a regularised inner loop, by
    /// conjugate gradient.
    Imaml,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EvalMode {
    /// Running statistics only: each query prediction depends on that query alone.
    Inductive,
    /// Each batch's own statistics, query sets included (transductive).
    Transductive,
    /// Both, on the same test episodes, so the transductive gap is measured.
    Both,
}

#[derive(Parser, Debug)]
#[command(
    about = "MAML or iMAML on Omniglot: meta-train a Conv-4, then evaluate on 600 test tasks"
)]
struct Args {
    // The data, the task, the inner loop, the evaluation, the seed and the threads: the
    // flags shared with the norm_modes example.
    #[command(flatten)]
    setup: OmniglotArgs,
    /// Tasks per meta-batch.
    #[arg(long, default_value_t = 32)]
    meta_batch: usize,
    /// Meta-training steps in total (a resumed run continues up to this count).
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// First-order MAML (inner gradients treated as constants); with iMAML, the query
    /// gradient at the adapted parameters (no conjugate gradient).
    #[arg(long)]
    first_order: bool,
    /// The meta-learning method.
    #[arg(long, value_enum, default_value_t = Method::Maml)]
    method: Method,
    /// iMAML's λ: how strongly the inner problem is pulled towards the meta-parameters.
    #[arg(long, default_value_t = 2.0)]
    imaml_lambda: f64,
    /// iMAML's conjugate-gradient steps per task.
    #[arg(long, default_value_t = 5)]
    cg_steps: usize,
    /// iMAML's damping δ, added to the Hessian's diagonal: CG solves (I + (H + δI)/λ) x =
    /// ∇L_Q. With λ = 2, δ = 4 is the authors' code's system up to scale (theirs is
    /// 2v + Hv/3 with its --cg_damping 1, which is 2(I + H/6)).
    #[arg(long, default_value_t = 4.0)]
    cg_damping: f64,
    /// iMAML: a conjugate gradient that ends above this relative residual fails its task
    /// (an error, or a skipped step with --skip-non-finite); by default none is required.
    #[arg(long)]
    cg_tolerance: Option<f64>,
    /// Normalisation in each Conv-4 block.
    #[arg(long, value_enum, default_value_t = Norm::Batch)]
    norm: Norm,
    /// Filters per convolution (64 in MAML; smaller for smoke runs).
    #[arg(long, default_value_t = 64)]
    filters: usize,
    /// How batch norm normalises at test time.
    #[arg(long, value_enum, default_value_t = EvalMode::Both)]
    eval_mode: EvalMode,
    /// Save checkpoints here (atomically) every --save-every steps and at the end.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Meta-steps between checkpoints.
    #[arg(long, default_value_t = 500)]
    save_every: u64,
    /// Continue from the checkpoint in --checkpoint-dir.
    #[arg(long, requires = "checkpoint_dir")]
    resume: bool,
    /// Skip (and count) meta-steps whose loss or update is not finite, instead of
    /// stopping with an error; nothing non-finite reaches the parameters either way.
    #[arg(long)]
    skip_non_finite: bool,
    /// Seed of the character split (keeps the test classes fixed across --seed).
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Output directory for curve.csv (the log of every step) and curve.svg.
    #[arg(long, default_value = "runs/omniglot")]
    out: PathBuf,
}

/// Moving average over a window of `w` points ending at each point.
fn smooth(values: &[f64], w: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= w {
            sum -= values[i - w];
        }
        out.push(sum / (i + 1).min(w) as f64);
    }
    out
}

/// Two panels: query loss and query accuracy per meta-step (raw and smoothed).
fn plot(path: &Path, curve: &[StepRecord], title: &str) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    // f64 on both axes: plotters 0.3.7 can loop forever computing u64 light key points.
    let last = curve.last().map_or(1.0, |p| p.step.max(1) as f64);
    let window = (curve.len() / 50).max(1);
    let series: [(&str, Vec<f64>); 2] = [
        ("query loss", curve.iter().map(|p| p.loss).collect()),
        (
            "query accuracy",
            curve
                .iter()
                .map(|p| p.accuracy.unwrap_or(f64::NAN))
                .collect(),
        ),
    ];
    let first = curve.first().map_or(0.0, |p| p.step as f64);
    for (area, (name, ys)) in panels.iter().zip(series) {
        // Axes scaled to the data (98-99% accuracy is not a flat line at the top), with a
        // margin; non-finite points (skipped steps) are left out of the range.
        let finite = ys.iter().copied().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let (y_min, y_max) = (lo - pad, hi + pad);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{title}: {name}"), ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(first..last.max(first + 1.0), y_min..y_max)?;
        chart
            .configure_mesh()
            .x_desc("meta-step")
            .max_light_lines(0)
            .draw()?;
        chart.draw_series(LineSeries::new(
            curve.iter().zip(&ys).map(|(p, &y)| (p.step as f64, y)),
            RGBColor(170, 200, 230).stroke_width(1),
        ))?;
        chart
            .draw_series(LineSeries::new(
                curve
                    .iter()
                    .zip(smooth(&ys, window))
                    .map(|(p, y)| (p.step as f64, y)),
                BLUE.stroke_width(2),
            ))?
            .label(format!("moving average ({window} steps)"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
        common::legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    root.present()?;
    Ok(())
}

fn norm_kind(args: &Args) -> NormKind {
    match args.norm {
        Norm::Batch => NormKind::Batch { per_step: None },
        Norm::Group => NormKind::Group {
            groups: args.setup.groups,
        },
        Norm::Layer => NormKind::Layer,
        Norm::Instance => NormKind::Instance,
        Norm::Tasknorm => NormKind::TaskNorm,
    }
}

fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    let data = args.setup.data_folder()?;
    let start = Instant::now();
    if args.setup.ways == 0
        || args.setup.shots == 0
        || args.meta_batch == 0
        || args.setup.eval_tasks < 2
    {
        return Err("need --ways, --shots, --meta-batch >= 1 and --eval-tasks >= 2".into());
    }
    if args.norm == Norm::Group {
        args.setup.check_groups(args.filters)?;
    }
    let t0 = Instant::now();
    let split = common::load_maml_split(&data, args.split_seed)?;
    let (train, test) = (split.train, split.test);
    eprintln!(
        "loaded {} characters ({} images) from {} in {:.1}s; meta-train {} classes \
         (1100 characters x 4 rotations), test {} characters",
        split.characters,
        split.images,
        data.display(),
        t0.elapsed().as_secs_f64(),
        train.num_classes(),
        test.num_classes()
    );

    let spec = args.setup.spec();
    let model = args.setup.conv4(args.filters, norm_kind(args));
    let order = if args.first_order {
        Order::First
    } else {
        Order::Second
    };
    let policy = common::non_finite(args.skip_non_finite);
    let mut config = MetaConfig::maml(args.setup.inner_steps, args.setup.inner_lr)
        .with_order(order)
        .with_non_finite(policy);
    if args.method == Method::Imaml {
        config = config.implicit(Imaml {
            lambda: args.imaml_lambda,
            cg_steps: args.cg_steps,
            damping: args.cg_damping,
            tolerance: args.cg_tolerance,
        });
    }
    config.validate()?;
    let method = match (args.method, args.first_order) {
        (Method::Maml, false) => "MAML",
        (Method::Maml, true) => "first-order MAML",
        (Method::Imaml, false) => "iMAML",
        (Method::Imaml, true) => "first-order iMAML",
    };
    let mut learner = MetaLearner::<f32, _>::new(model, config.clone(), args.setup.seed)
        .with_comm(common::comm().clone())?;
    let mut opt = Optimizer::adam(args.setup.outer_lr);
    let eval_modes = match args.eval_mode {
        EvalMode::Inductive => vec![NormMode::Inductive],
        EvalMode::Transductive => vec![NormMode::Transductive],
        EvalMode::Both => vec![NormMode::Inductive, NormMode::Transductive],
    };
    let has_bn = args.norm == Norm::Batch;
    if let Some(imaml) = &config.implicit {
        println!(
            "iMAML: λ = {}, {} CG steps, damping {}, tolerance {}; the inner solver takes \
             {} unrecorded steps on the regularised support loss",
            imaml.lambda,
            imaml.cg_steps,
            imaml.damping,
            imaml
                .tolerance
                .map_or("none".to_string(), |t| t.to_string()),
            config.inner_steps
        );
    }

    let csv_path = args.out.join("curve.csv");
    let svg_path = args.out.join("curve.svg");
    let checkpoint_path = args
        .checkpoint_dir
        .as_ref()
        .map(|d| d.join(CHECKPOINT_FILE));
    if let Some(path) = checkpoint_path
        .as_ref()
        .filter(|p| args.resume && !p.exists())
    {
        Checkpoint::<f32>::load(path)?; // says that there is nothing to resume
    }

    let n_params = learner.params.num_elements();
    println!(
        "{method} on Omniglot: {}-way {}-shot ({} queries/class), Conv-4 ({} filters, {:?} \
         norm, {n_params} parameters), {} order, {} inner step(s) of lr {} (test: {} steps), \
         Adam lr {}, meta-batch {}, {} meta-steps, seed {}, {} thread(s)",
        args.setup.ways,
        args.setup.shots,
        args.setup.queries,
        args.filters,
        args.norm,
        if args.first_order { "first" } else { "second" },
        learner.config.inner_steps,
        learner.config.inner_lr,
        args.setup.test_steps,
        opt.lr,
        args.meta_batch,
        args.steps,
        args.setup.seed,
        rayon::current_num_threads()
    );
    if has_bn {
        let modes: Vec<String> = eval_modes.iter().map(|m| m.to_string()).collect();
        println!(
            "batch norm at test time: {} (inductive = running statistics; transductive = \
             each query set's own statistics, which lets query examples inform each other)",
            modes.join(" and ")
        );
    } else {
        println!("no batch norm: --eval-mode changes nothing");
    }

    // ---- meta-training ----
    let mut sampler = EpisodeSampler::new(&train, spec, args.setup.seed.wrapping_add(1))?;
    let mut trainer = Trainer::new(args.steps, args.meta_batch).log(&csv_path);
    if let Some(dir) = &args.checkpoint_dir {
        trainer = trainer
            .checkpoint_dir(dir)
            .checkpoint_names(CHECKPOINT_FILE, "best.json")
            .save_every(args.save_every.max(1))
            .resume(args.resume);
    }
    let summary = trainer.run(&mut learner, &mut opt, &mut sampler)?;
    let title = format!(
        "{method} Omniglot {}-way {}-shot",
        args.setup.ways, args.setup.shots
    );
    if !summary.history.is_empty() && common::writes_files() {
        plot(&svg_path, &summary.history, &title)?;
    }

    // ---- evaluation ----
    let t_eval = Instant::now();
    let mut reports = Vec::new();
    for &mode in eval_modes
        .iter()
        .take(if has_bn { eval_modes.len() } else { 1 })
    {
        // The same test episodes for every mode.
        reports.push(args.setup.test_report(&learner, &test, mode)?);
    }
    let report = &reports[0];
    let eval_s = t_eval.elapsed().as_secs_f64();
    println!();
    for r in &reports {
        println!(
            "test accuracy, {}-way {}-shot, {} meta-steps: {r}",
            args.setup.ways, args.setup.shots, learner.step
        );
    }
    println!(
        "  (mean query accuracy over {} test tasks of {} queries each, ± 1.96 x sample std / \
         sqrt(tasks); a task whose adaptation diverged counts as all misses; evaluated in \
         {eval_s:.1}s)",
        report.tasks,
        args.setup.ways * args.setup.queries
    );
    if args.method == Method::Imaml {
        println!(
            "Reference (Rajeswaran et al. 2019, Table 2): iMAML with gradient descent as the \
             inner solver, 5-way 1-shot 99.16 ± 0.35%, 5-shot 99.67 ± 0.12%; 20-way 1-shot \
             94.46 ± 0.42%, 5-shot 98.69 ± 0.1% (λ = 2, 5 CG steps, 16 inner steps, 25 for \
             20-way; the authors' code asks for at least 20000 meta-steps)."
        );
    } else {
        println!(
            "Reference (Finn et al. 2017, Table 1): MAML 5-way 1-shot 98.7 ± 0.4%, 5-shot \
             99.9 ± 0.1%; 20-way 1-shot 95.8 ± 0.3%, 5-shot 98.9 ± 0.2% (after 60k \
             meta-steps, with transductive batch norm)."
        );
    }
    println!("curve: {} and {}", csv_path.display(), svg_path.display());

    let wall = start.elapsed().as_secs_f64();
    println!("total wall-clock time: {wall:.1}s");
    let result = json!({
        "example": "omniglot",
        "method": match (args.method, args.first_order) {
            (Method::Maml, true) => "fomaml",
            (Method::Maml, false) => "maml-second-order",
            (Method::Imaml, true) => "imaml-first-order",
            (Method::Imaml, false) => "imaml",
        },
        "imaml": learner.config.implicit.map(|i| json!({
            "lambda": i.lambda, "cg_steps": i.cg_steps, "damping": i.damping,
            "tolerance": i.tolerance,
        })),
        "ways": args.setup.ways,
        "shots": args.setup.shots,
        "queries": args.setup.queries,
        "norm": format!("{:?}", args.norm).to_lowercase(),
        "filters": args.filters,
        "meta_steps": learner.step,
        "skipped_steps": learner.skipped_steps,
        "params_digest": format!("{:016x}", learner.params.digest()),
        "ranks": common::comm().size(),
        "bytes_sent_received": common::comm().traffic(),
        "meta_batch": args.meta_batch,
        "inner_steps": learner.config.inner_steps,
        "inner_lr": learner.config.inner_lr,
        "outer_lr": opt.lr,
        "seed": args.setup.seed,
        "split_seed": args.split_seed,
        "threads": rayon::current_num_threads(),
        "resumed": args.resume,
        "test": {
            "tasks": report.tasks,
            "steps": report.steps,
            "mode": if report.batch_norm { report.mode.to_string() } else { "n/a (no batch norm)".to_string() },
            "accuracy": report.mean_accuracy,
            "ci95": report.ci95,
            "loss": report.mean_loss,
            "diverged": report.diverged,
            "seed": TEST_SEED,
        },
        "tests": reports.iter().map(|r| json!({
            "mode": if r.batch_norm { r.mode.to_string() } else { "n/a (no batch norm)".to_string() },
            "accuracy": r.mean_accuracy,
            "ci95": r.ci95,
            "loss": r.mean_loss,
            "diverged": r.diverged,
        })).collect::<Vec<_>>(),
        "train_final_loss": summary.final_loss,
        "train_final_accuracy": summary.final_accuracy,
        "train_seconds_this_run": summary.seconds,
        "eval_seconds": eval_s,
        "wall_seconds": wall,
        "curve_csv": csv_path.display().to_string(),
        "curve_svg": svg_path.display().to_string(),
        "checkpoint": checkpoint_path.as_ref().map(|p| p.display().to_string()),
    });
    println!("RESULT {result}");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::main(args.setup.threads, || run(&args))
}
