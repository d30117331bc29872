//! The crate's one error type for everything the caller can act on: files, data,
//! configurations, checkpoints, failed tasks and non-finite steps. (Shape misuse in tape
//! ops is a programming error and panics instead, naming the op and both shapes.)

use std::fmt;
use std::path::PathBuf;

/// Errors from data loading, task sampling, configuration, checkpoints, tasks and
/// non-finite steps.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error, with the path it concerns.
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A path that does not exist; `hint` says how to get the data.
    NotFound {
        /// The missing path.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },
    /// A zip archive that cannot be read.
    Zip {
        /// The archive.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An image that cannot be decoded or has an unexpected format.
    Image {
        /// The image file (inside a zip: `archive.zip!inner/path.png`).
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A data folder or archive whose layout is not the expected one.
    Layout {
        /// The folder or archive.
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// A data file whose contents are not what was expected: a truncated or corrupt pickle
    /// or `.npy`, an unsupported protocol or dtype, an array of the wrong rank or size, a
    /// label count that differs from the example count.
    Format {
        /// The file (inside an archive: `archive.npz!inner.npy`).
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// A configuration value that cannot be used (e.g. more ways than classes).
    Config(String),
    /// A checkpoint that is corrupt or does not match the model.
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A meta-step or an evaluation whose result is not finite (NaN or ±∞). The
    /// learner, its optimiser and its statistics were left exactly as they were.
    NonFinite {
        /// What was running: `"meta_step"`, `"reptile_step"`, `"apply"` or `"evaluate"`.
        during: &'static str,
        /// The meta-batch it happened at: [`MetaLearner::meta_batches`](crate::meta::MetaLearner::meta_batches),
        /// steps taken plus steps skipped before it (0-based).
        step: u64,
        /// Indices (in the batch given) of the tasks whose loss or gradient is not
        /// finite; empty when every task was finite and only the combined update was not.
        tasks: Vec<usize>,
        /// The first parameter (or running statistic) whose update is not finite, when
        /// one is known.
        param: Option<String>,
        /// When the data is the cause: the first failing task whose inputs or targets hold
        /// a value that is not finite, the array and the position, e.g.
        /// `"task 3: query_x[2, 0, 5, 7] = NaN"`. The data is scanned only after a step
        /// failed.
        data: Option<String>,
    },
    /// An iMAML meta-step whose conjugate gradient ended above the configured tolerance
    /// ([`Imaml::tolerance`](crate::meta::Imaml::tolerance)) in some task, everything else
    /// being finite; refused under [`NonFinite::Error`](crate::meta::NonFinite) like a
    /// non-finite step. The learner, its optimiser and its statistics were left exactly
    /// as they were.
    NotConverged {
        /// What was running (`"meta_step"`).
        during: &'static str,
        /// The meta-batch it happened at (as in [`Error::NonFinite`]).
        step: u64,
        /// Indices (in the batch given) of the tasks that failed.
        tasks: Vec<usize>,
        /// The largest relative residual `‖b − A x‖ / ‖b‖` reached.
        residual: f64,
        /// The tolerance it had to reach.
        tolerance: f64,
    },
    /// A task of the meta-batch mapper failed (panicked); `message` is its panic message.
    Task {
        /// Index of the failing task along dimension 0.
        index: usize,
        /// The panic message.
        message: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "I/O error on {}: {source}", path.display()),
            Error::NotFound { path, hint } => {
                write!(f, "{} does not exist. {hint}", path.display())
            }
            Error::Zip { path, message } => {
                write!(f, "cannot read zip archive {}: {message}", path.display())
            }
            Error::Image { path, message } => write!(f, "cannot decode image {path}: {message}"),
            Error::Layout { path, message } => {
                write!(f, "unexpected layout in {}: {message}", path.display())
            }
            Error::Format { path, message } => {
                write!(f, "cannot read {}: {message}", path.display())
            }
            Error::Config(message) => write!(f, "invalid configuration: {message}"),
            Error::Checkpoint { path, message } => {
                write!(f, "bad checkpoint {}: {message}", path.display())
            }
            Error::NonFinite {
                during,
                step,
                tasks,
                param,
                data,
            } => {
                write!(
                    f,
                    "{during} at meta-step {step}: not finite (NaN or infinity)"
                )?;
                if !tasks.is_empty() {
                    write!(f, " in the loss or gradient of task(s) {tasks:?}")?;
                }
                if let Some(d) = data {
                    write!(f, "; the data is not finite: {d}")?;
                }
                if let Some(p) = param {
                    write!(f, "; first parameter affected: {p}")?;
                }
                write!(f, "; nothing was changed")
            }
            Error::NotConverged {
                during,
                step,
                tasks,
                residual,
                tolerance,
            } => write!(
                f,
                "{during} at meta-step {step}: iMAML's conjugate gradient did not converge in \
                 task(s) {tasks:?} (relative residual {residual:.3e} above the tolerance \
                 {tolerance:.3e}); nothing was changed"
            ),
            Error::Task { index, message } => write!(f, "task {index} failed: {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
