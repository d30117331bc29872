//! The harness the examples share, so that each example file holds only its own story.
//!
//! - Running: [`main`] builds the thread pool, runs the example and turns the outcome into
//!   the exit code.
//! - The Omniglot examples (`omniglot`, `norm_modes`): the flags they both take
//!   ([`OmniglotArgs`]), finding and splitting the data, the Conv-4 and the report on the
//!   fixed test episodes.
//! - Long runs (`omniglot`, `sinusoid`): the non-finite policy and the legend of the plots.
//!   Their loop, checkpoints, log and progress are `metagrad::train::Trainer`'s.
//!
//! Not an example: Cargo builds `examples/*.rs` and `examples/*/main.rs`, and this folder
//! has no `main.rs`. Each example includes it with `mod common;`.

// Every example uses only part of this module.
#![allow(dead_code)]

use clap::Args;
use metagrad::data::{omniglot, EpisodeSampler, EpisodeSpec, ImageCollection, Omniglot};
use metagrad::eval::{evaluate_episodes, EvalReport};
use metagrad::meta::{MetaLearner, NonFinite};
use metagrad::nn::{Conv4, NormKind, NormMode};
use plotters::coord::CoordTranslate;
use plotters::prelude::*;
use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

// ---- running an example ----

/// The job's communicator: MPI's world when started by `mpirun` and built with
/// `--features mpi`, the single process otherwise (set by [`main`]).
static COMM: std::sync::OnceLock<metagrad::dist::Comm> = std::sync::OnceLock::new();

/// The job's communicator (see [`main`]).
pub fn comm() -> &'static metagrad::dist::Comm {
    COMM.get_or_init(metagrad::dist::Comm::local)
}

/// Whether this process writes files: rank 0 (the only process without MPI).
pub fn writes_files() -> bool {
    comm().is_root()
}

/// Silences this process's stdout and stderr (ranks other than 0 under MPI: every rank
/// computes the same thing, and rank 0 reports it).
fn silence() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: duplicating a valid descriptor over the standard ones.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

/// Runs an example: joins the MPI job when started by `mpirun` (only rank 0 then prints
/// and writes files), builds the global thread pool (`threads` = 0: one thread per core),
/// then `run`, and exits with 0 on success; with 2, after printing the error, when an input
/// is missing (no Omniglot data, or a path that does not exist: the data or a checkpoint to
/// resume); with 1 after any other error.
pub fn main(threads: usize, run: impl FnOnce() -> Result<(), Box<dyn Error>>) -> ExitCode {
    match metagrad::dist::Comm::from_env() {
        Ok(c) => {
            // Every rank must run the same command (but for its thread count).
            let mut words = std::env::args().skip(1).peekable();
            let mut command = Vec::new();
            while let Some(w) = words.next() {
                if w == "--threads" {
                    words.next();
                } else if !w.starts_with("--threads=") {
                    command.push(w);
                }
            }
            if let Err(e) = c.check_same(&[("the command line", command.join(" "))]) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            if !c.is_root() {
                silence();
            }
            let _ = COMM.set(c);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    if threads > 0 {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
        {
            eprintln!("error: cannot build a pool of {threads} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let not_found = matches!(
                e.downcast_ref::<metagrad::Error>(),
                Some(metagrad::Error::NotFound { .. })
            );
            let code = if not_found || e.is::<NoOmniglot>() {
                2
            } else {
                1
            };
            if comm().size() > 1 {
                // The other ranks may be waiting in an exchange: end the whole job.
                comm().abort(code);
            }
            ExitCode::from(code as u8)
        }
    }
}

// ---- the Omniglot examples ----

/// Seed of the test episodes: fixed, independent of `--seed`, so that runs, models and
/// batch-norm modes are scored on the same episodes.
pub const TEST_SEED: u64 = 20_170_310;
/// Validation characters held out of the 1200 meta-training characters (MAML split).
const VALIDATION: usize = 100;

/// The flags both Omniglot examples take: the data, the task, the inner loop, the outer
/// rate, the evaluation, the seed and the threads. Each example adds its budget
/// (`--steps`, `--meta-batch`, `--filters`) and its own flags.
#[derive(Args, Debug)]
pub struct OmniglotArgs {
    /// Omniglot folder [default: $METAGRAD_OMNIGLOT, else ../shared/data/omniglot].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Classes per task (N).
    #[arg(long, default_value_t = 5)]
    pub ways: usize,
    /// Support examples per class (K).
    #[arg(long, default_value_t = 1)]
    pub shots: usize,
    /// Query examples per class.
    #[arg(long, default_value_t = 15)]
    pub queries: usize,
    /// Inner SGD steps during meta-training.
    #[arg(long, default_value_t = 1)]
    pub inner_steps: usize,
    /// Inner SGD steps at test time.
    #[arg(long, default_value_t = 3)]
    pub test_steps: usize,
    /// Inner learning rate α.
    #[arg(long, default_value_t = 0.4)]
    pub inner_lr: f64,
    /// Outer (Adam) learning rate β.
    #[arg(long, default_value_t = 1e-3)]
    pub outer_lr: f64,
    /// Groups of each group-norm layer.
    #[arg(long, default_value_t = 4)]
    pub groups: usize,
    /// Test tasks per evaluation.
    #[arg(long, default_value_t = 600)]
    pub eval_tasks: usize,
    /// Seed of initialisation and training episodes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Omniglot split as in MAML, ready for episodes.
pub struct MamlSplit {
    /// Meta-training classes: 1100 characters × 4 rotations.
    pub train: ImageCollection,
    /// Test classes: the other 423 characters.
    pub test: ImageCollection,
    /// Characters loaded (1623).
    pub characters: usize,
    /// Images loaded.
    pub images: usize,
}

impl OmniglotArgs {
    /// The Omniglot folder: `--data`, else `$METAGRAD_OMNIGLOT`, else
    /// `../shared/data/omniglot` when it exists; an error (exit code 2) when none is given.
    pub fn data_folder(&self) -> Result<PathBuf, NoOmniglot> {
        self.data
            .clone()
            .or_else(omniglot::default_path)
            .ok_or(NoOmniglot)
    }

    /// `--groups` must divide the filters, whenever a group norm is trained.
    pub fn check_groups(&self, filters: usize) -> Result<(), Box<dyn Error>> {
        if self.groups == 0 || !filters.is_multiple_of(self.groups) {
            return Err(format!("--groups {} must divide --filters {filters}", self.groups).into());
        }
        Ok(())
    }

    /// `--ways`-way `--shots`-shot episodes with `--queries` queries per class.
    pub fn spec(&self) -> EpisodeSpec {
        EpisodeSpec::new(self.ways, self.shots, self.queries)
    }

    /// MAML's Conv-4 for `--ways` classes, with `filters` filters and `norm` in each block.
    pub fn conv4(&self, filters: usize, norm: NormKind) -> Conv4 {
        Conv4 {
            filters,
            norm,
            ..Conv4::omniglot(self.ways)
        }
    }

    /// The evaluation protocol on the fixed test episodes ([`TEST_SEED`]): `--eval-tasks`
    /// tasks, each adapted with `--test-steps` inner steps, batch norm in `mode`. A fresh
    /// sampler each time, so every call sees the same episodes.
    pub fn test_report(
        &self,
        learner: &MetaLearner<f32, Conv4>,
        test: &ImageCollection,
        mode: NormMode,
    ) -> metagrad::Result<EvalReport> {
        let mut sampler = EpisodeSampler::new(test, self.spec(), TEST_SEED)?;
        evaluate_episodes(
            learner,
            &mut sampler,
            self.eval_tasks,
            self.test_steps,
            mode,
            usize::MAX,
        )
    }
}

/// Loads Omniglot from `data` and splits its characters as in MAML (shuffled with
/// `split_seed`; [`VALIDATION`] of the meta-training characters held out and unused); the
/// meta-training classes are augmented with 90° rotations.
pub fn load_maml_split(data: &Path, split_seed: u64) -> metagrad::Result<MamlSplit> {
    let omniglot = Omniglot::load(data)?;
    let splits = omniglot.split_maml(split_seed, VALIDATION)?;
    Ok(MamlSplit {
        train: splits.train.with_rotations()?,
        test: splits.test,
        characters: omniglot.num_characters(),
        images: omniglot.num_images(),
    })
}

/// No Omniglot folder was given or found; says where to get the data.
#[derive(Debug)]
pub struct NoOmniglot;

impl fmt::Display for NoOmniglot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no Omniglot data. Download python/images_background.zip and \
             python/images_evaluation.zip from https://github.com/brendenlake/omniglot into a \
             folder (unzipping is optional), then pass --data FOLDER or set {}=FOLDER \
             (default when present: ../shared/data/omniglot).",
            omniglot::ENV_VAR
        )
    }
}

impl Error for NoOmniglot {}

// ---- long runs ----

/// What a meta-step whose loss or update is not finite does: `--skip-non-finite` skips
/// (and counts) it; otherwise the run stops with the error. Nothing non-finite reaches the
/// parameters either way.
pub fn non_finite(skip: bool) -> NonFinite {
    if skip {
        NonFinite::Skip
    } else {
        NonFinite::Error
    }
}

/// Draws the legend of `chart` at `position`, in the examples' style.
pub fn legend<'a, 'svg: 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'svg>, CT>,
    position: SeriesLabelPosition,
) -> Result<(), Box<dyn Error>> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()?;
    Ok(())
}
