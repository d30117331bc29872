//! Checkpoints: everything needed to resume meta-training bit for bit.
//!
//! A [`Checkpoint`] holds the meta-parameters, the running normalisation statistics, the
//! outer optimiser with its state (Adam moments), the meta-step count and the count of
//! skipped meta-steps, the [`MetaConfig`], and the state of the task sampler's random
//! number generator ([`EpisodeSampler::rng`](crate::data::EpisodeSampler::rng),
//! [`SinusoidSampler::rng`](crate::data::SinusoidSampler::rng)). Resuming from one gives
//! **bitwise** the same parameters as a run that was never interrupted (see
//! `tests/checkpoint.rs`).
//!
//! # File format
//!
//! One JSON document (via serde_json) with a header — `"format": "metagrad-checkpoint"`,
//! `"version"` ([`FORMAT_VERSION`]), `"float"` (`"f32"` or `"f64"`), `"model"` (a
//! description of the network, its `Debug` form) — then `step`, `skipped_steps` (from
//! version 2), `config`, `rng`, and the tensors. Tensors are stored as their IEEE-754 bit
//! patterns, 8 (f32) or 16 (f64) lowercase hex digits per element, most significant digit
//! first (`3f800000` is `1.0f32`): serde_json's default float parser is best-effort and
//! does not read every `f64` back exactly, while bit patterns always round-trip. The scalar
//! hyper-parameters (learning rates, betas) stay readable numbers; [`Checkpoint::save`]
//! checks that the written text reads back to exactly what was saved, and fails — before
//! touching any file — when it would not.
//!
//! ## Versions
//!
//! This build writes version [`FORMAT_VERSION`] (2) and reads every version from
//! [`OLDEST_FORMAT_VERSION`] (1) on, so a long run checkpointed by an older metagrad still
//! resumes after an upgrade. A file of a newer version than this build knows is refused
//! with [`Error::Checkpoint`] naming both versions.
//!
//! - **Version 1** (metagrad before the non-finite step policy): the fields above without
//!   `skipped_steps`. It loads with [`Checkpoint::skipped_steps`] = 0 — runs then could
//!   not skip steps — and [`Checkpoint::file_version`] = `Some(1)`; saving it again writes
//!   version 2.
//! - **Version 2**: adds `"skipped_steps"` (an integer, required), the number of
//!   meta-steps skipped because their update was not finite
//!   ([`MetaLearner::skipped_steps`]). The `config` may hold `on_non_finite`; a version-1
//!   `config` lacks it and reads as the default. Everything else is as in version 1.
//!
//! # Atomic writes
//!
//! [`Checkpoint::save`] writes to a fresh temporary file in the target's directory
//! (`.NAME.tmp.PID.N`, created exclusively), flushes it to disk (`sync_all`), then renames
//! it over the target and syncs the directory. A crash at any point leaves either the old
//! complete checkpoint or the new complete one, never a partial file (at worst a stray
//! `.NAME.tmp.*` file, which is never read); on an error the temporary file is removed.
//! Concurrent saves to the same path each use their own temporary file; the last rename
//! wins.
//!
//! # Example
//!
//! ```
//! use metagrad::checkpoint::Checkpoint;
//! use metagrad::data::rng_from_seed;
//! use metagrad::meta::{MetaConfig, MetaLearner, Optimizer};
//! use metagrad::nn::Mlp;
//! let dir = std::env::temp_dir().join(format!("metagrad-doc-ckpt-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("checkpoint.json");
//!
//! let learner = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 0);
//! let opt = Optimizer::adam(1e-3);
//! Checkpoint::capture(&learner, &opt, &rng_from_seed(7)).save(&path)?;
//!
//! // Later, in a fresh process: build the same model, then restore into it.
//! let mut fresh = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 1);
//! let (opt2, rng) = Checkpoint::load(&path)?.restore(&mut fresh)?;
//! assert_eq!(fresh.params, learner.params);
//! assert_eq!(opt2, opt);
//! assert_eq!(rng, rng_from_seed(7));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), metagrad::Error>(())
//! ```

use crate::data::SamplerRng;
use crate::meta::{MetaConfig, MetaLearner, Optimizer, OuterRule};
use crate::nn::{Model, NormState, Params, RunningStats};
use crate::{Error, Float, Result};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The version of the file format this build writes (and the newest it reads); see
/// [Versions](self#versions).
pub const FORMAT_VERSION: u32 = 2;

/// The oldest file format version this build still reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// The value of the `"format"` field that marks a metagrad checkpoint.
const FORMAT_NAME: &str = "metagrad-checkpoint";

/// The state of a meta-training run (see the [module docs](self)).
///
/// Build one with [`Checkpoint::capture`], write it with [`Checkpoint::save`], read it
/// with [`Checkpoint::load`] and put it back with [`Checkpoint::restore`].
#[derive(Debug, Clone)]
pub struct Checkpoint<F: Float> {
    /// Description of the network the parameters belong to: its `Debug` form, e.g.
    /// `Mlp { sizes: [1, 40, 40, 1] }`. [`restore`](Self::restore) refuses a learner
    /// whose model describes itself differently.
    pub model: String,
    /// The meta-parameters (network weights, then any learned inner rates).
    pub params: Params<F>,
    /// Running batch-norm statistics.
    pub norm: NormState<F>,
    /// The outer optimiser with its state.
    pub optimizer: Optimizer<F>,
    /// Meta-steps taken.
    pub step: u64,
    /// Meta-steps skipped because their update was not finite
    /// ([`MetaLearner::skipped_steps`]); 0 when read from a version-1 file.
    pub skipped_steps: u64,
    /// The meta-training hyper-parameters.
    pub config: MetaConfig,
    /// The state of the task sampler's random number generator, so that resuming draws
    /// the same tasks an uninterrupted run would.
    pub rng: SamplerRng,
    /// The user's own state, saved and restored with the rest: any serde value (a
    /// validation history, a best score, a schedule's position), `null` when unused.
    /// Build it with [`serde_json::to_value`] and read it back with
    /// [`serde_json::from_value`] (both re-exported as [`crate::serde_json`]).
    pub extras: serde_json::Value,
    /// Where this checkpoint was loaded from (not stored in the file); named in
    /// [`restore`](Self::restore)'s errors.
    origin: Option<PathBuf>,
    /// The format version of the file this checkpoint was loaded from (not stored).
    file_version: Option<u32>,
}

/// Name of a float type in the file header.
fn float_name<F: Float>() -> &'static str {
    match std::mem::size_of::<F>() {
        4 => "f32",
        _ => "f64",
    }
}

/// The description of a model stored in checkpoints: its `Debug` form.
pub fn describe_model<M: Debug>(model: &M) -> String {
    format!("{model:?}")
}

impl<F: Float> Checkpoint<F> {
    /// Snapshot of a learner (parameters, running statistics, step and skipped-step
    /// counts, config), its outer optimiser, and the task sampler's random number
    /// generator.
    pub fn capture<M: Model<F> + Debug>(
        learner: &MetaLearner<F, M>,
        optimizer: &Optimizer<F>,
        rng: &SamplerRng,
    ) -> Self {
        Checkpoint {
            model: describe_model(&learner.model),
            params: learner.params.clone(),
            norm: learner.norm.clone(),
            optimizer: optimizer.clone(),
            step: learner.step,
            skipped_steps: learner.skipped_steps,
            config: learner.config.clone(),
            rng: rng.clone(),
            extras: serde_json::Value::Null,
            origin: None,
            file_version: None,
        }
    }

    /// The same checkpoint with `extras` as the user's own state (see
    /// [`Checkpoint::extras`]).
    pub fn with_extras(mut self, extras: serde_json::Value) -> Self {
        self.extras = extras;
        self
    }

    /// What [`restore`](Self::restore) would change in a learner whose configuration is
    /// `current`: one line per field that differs, `"inner_lr: 0.4 -> 0.01"`, sorted
    /// by field name (`parallel_iterations`, `memory` and `memory_budget`, the machine's choices, are kept by `restore` and never listed). Empty when the configurations agree. Log it before restoring, so
    /// that a resumed run says which flags of its command line the checkpoint overrides.
    pub fn config_changes(&self, current: &MetaConfig) -> Vec<String> {
        let as_map = |c: &MetaConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let (old, new) = (as_map(current), as_map(&self.config));
        new.iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "parallel_iterations" | "memory" | "memory_budget"
                )
            })
            .filter(|(k, v)| old.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                let was = old
                    .get(k.as_str())
                    .map_or("(unset)".into(), |o| o.to_string());
                format!("{k}: {was} -> {v}")
            })
            .collect()
    }

    /// Where this checkpoint was loaded from, if it was.
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// The format version of the file this checkpoint was loaded from, if it was (e.g.
    /// `Some(1)` for a checkpoint written by an older metagrad); `None` for one made with
    /// [`capture`](Self::capture). [`save`](Self::save) always writes [`FORMAT_VERSION`].
    pub fn file_version(&self) -> Option<u32> {
        self.file_version
    }

    /// Whether the checkpoint fits `learner`: the same model description, the same
    /// parameter names and shapes, the same batch-norm layout.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] saying what differs.
    pub fn check_matches<M: Model<F> + Debug>(&self, learner: &MetaLearner<F, M>) -> Result<()> {
        self.mismatch(learner).map_or(Ok(()), |message| {
            Err(Error::Checkpoint {
                path: self
                    .origin
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("(checkpoint in memory)")),
                message,
            })
        })
    }

    /// What differs between the checkpoint and `learner`, if anything.
    fn mismatch<M: Model<F> + Debug>(&self, learner: &MetaLearner<F, M>) -> Option<String> {
        let here = describe_model(&learner.model);
        let layout = match learner.params.layout_difference(&self.params) {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if here != self.model {
            let detail = match layout {
                Err(e) => format!(" ({e} in the checkpoint)"),
                Ok(()) => String::new(),
            };
            return Some(format!(
                "the checkpoint is for a different model: it was saved from `{}`, but the \
                 learner is `{here}`{detail}",
                self.model
            ));
        }
        if let Err(e) = layout {
            return Some(format!(
                "the checkpoint's parameters do not fit the learner: {e} in the checkpoint \
                 (saved with inner rule {:?}, the learner uses {:?})",
                self.config.rule, learner.config.rule
            ));
        }
        let shape = |n: &NormState<F>| -> Vec<Vec<usize>> {
            n.stats
                .iter()
                .map(|l| l.iter().map(|s| s.mean.len()).collect())
                .collect()
        };
        let (mine, theirs) = (shape(&learner.norm), shape(&self.norm));
        if mine != theirs {
            return Some(format!(
                "the checkpoint's batch-norm statistics have layout {theirs:?} (channels per \
                 layer and step), the learner's {mine:?}"
            ));
        }
        None
    }

    /// Puts the checkpoint into `learner` — parameters, running statistics, step and
    /// skipped-step counts, and configuration (keeping the learner's `parallel_iterations`, `memory` and `memory_budget`,
    /// which do not change results) — and returns the optimiser and the random number
    /// generator to continue with. The checkpoint's configuration replaces the learner's:
    /// [`config_changes`](Self::config_changes) lists what that changes, and the
    /// [trainer](crate::train) prints it when it resumes. [`extras`](Self::extras) are the caller's to read.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the checkpoint does not fit the learner (see
    /// [`check_matches`](Self::check_matches)); the learner is then unchanged.
    pub fn restore<M: Model<F> + Debug>(
        self,
        learner: &mut MetaLearner<F, M>,
    ) -> Result<(Optimizer<F>, SamplerRng)> {
        self.check_matches(learner)?;
        let (parallel_iterations, memory, memory_budget) = (
            learner.config.parallel_iterations,
            learner.config.memory,
            learner.config.memory_budget,
        );
        learner.params = self.params;
        learner.norm = self.norm;
        learner.step = self.step;
        learner.skipped_steps = self.skipped_steps;
        learner.config = MetaConfig {
            parallel_iterations,
            memory,
            memory_budget,
            ..self.config
        };
        Ok((self.optimizer, self.rng))
    }

    /// Writes the checkpoint to `path` atomically (see the [module docs](self)).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if the checkpoint cannot be serialised so that it reads back
    /// exactly (e.g. a NaN hyper-parameter), before any file is touched; [`Error::Io`]
    /// naming the file if writing or renaming fails (the target is then left as it was).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = self.to_json(path)?;
        write_atomic(path, text.as_bytes())
    }

    /// The checkpoint as JSON text, checked to read back to exactly this checkpoint.
    fn to_json(&self, path: &Path) -> Result<String> {
        let fail = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let file = FileRepr::from_checkpoint(self);
        let text = serde_json::to_string(&file)
            .map_err(|e| fail(format!("cannot serialise the checkpoint: {e}")))?;
        // serde_json writes NaN and infinities as `null` and reads some numbers back with
        // a one-ulp error: make sure what is written loads back as it is.
        let again = serde_json::from_str::<FileRepr>(&text)
            .ok()
            .and_then(|f| serde_json::to_string(&f).ok());
        if again.as_deref() != Some(text.as_str()) {
            return Err(fail(
                "the checkpoint would not read back exactly (a hyper-parameter or the \
                 configuration holds NaN, an infinity, or a number serde_json cannot \
                 round-trip); nothing was written"
                    .to_string(),
            ));
        }
        Ok(text)
    }

    /// Reads a checkpoint written by [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::NotFound`] if there is no file at `path`; [`Error::Io`] if it cannot be
    /// read; [`Error::Checkpoint`] naming the path if it is not a checkpoint, is corrupt or
    /// truncated, has a format version this build does not read (newer than
    /// [`FORMAT_VERSION`], or older than [`OLDEST_FORMAT_VERSION`]), or holds another float
    /// type than `F`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    path: path.to_path_buf(),
                    hint: "No checkpoint has been saved there (check the path, or start \
                           without resuming)."
                        .to_string(),
                }
            } else {
                Error::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let fail = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            fail(format!(
                "not a readable checkpoint ({} bytes; corrupt or truncated?): {e}",
                bytes.len()
            ))
        })?;
        match value.get("format").and_then(|v| v.as_str()) {
            Some(FORMAT_NAME) => {}
            _ => {
                return Err(fail(format!(
                    "not a metagrad checkpoint (no \"format\": \"{FORMAT_NAME}\" field)"
                )))
            }
        }
        let version = match value.get("version").and_then(|v| v.as_u64()) {
            Some(v)
                if (u64::from(OLDEST_FORMAT_VERSION)..=u64::from(FORMAT_VERSION)).contains(&v) =>
            {
                v as u32
            }
            Some(v) if v > u64::from(FORMAT_VERSION) => {
                return Err(fail(format!(
                    "format version {v} was written by a newer metagrad; this build reads \
                     versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION} (upgrade metagrad \
                     to resume from it)"
                )))
            }
            Some(v) => {
                return Err(fail(format!(
                    "format version {v} is not one this build reads (versions \
                     {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})"
                )))
            }
            None => {
                return Err(fail(
                    "the format version is missing (or not a whole number)".to_string(),
                ))
            }
        };
        let float = value.get("float").and_then(|v| v.as_str()).unwrap_or("?");
        if float != float_name::<F>() {
            return Err(fail(format!(
                "the checkpoint holds {float} tensors, but {} was asked for",
                float_name::<F>()
            )));
        }
        let file: FileRepr = serde_json::from_value(value)
            .map_err(|e| fail(format!("malformed checkpoint: {e}")))?;
        let mut checkpoint = file.into_checkpoint().map_err(fail)?;
        checkpoint.origin = Some(path.to_path_buf());
        checkpoint.file_version = Some(version);
        Ok(checkpoint)
    }
}

/// Counter making temporary file names unique within a process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` through a synced temporary file in the same directory and a
/// rename, so that `path` is always either the old or the new complete file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| Error::Checkpoint {
        path: path.to_path_buf(),
        message: "a checkpoint path must name a file".to_string(),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    // Create a temporary file that did not exist before (never clobber another writer's).
    let (tmp, mut file) = loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{}.tmp.{}.{n}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&tmp)(e)),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.flush())
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp));
    drop(file);
    let renamed = written.and_then(|()| fs::rename(&tmp, path).map_err(io(path)));
    if let Err(e) = renamed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename itself durable (directories cannot be opened for syncing on Windows).
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The on-disk representation: versions 1 and 2 share every structure below; version 2
// adds `FileRepr::skipped_steps`.

/// Elements of a tensor as IEEE-754 bit patterns in hex.
fn encode<'a, F: Float>(values: impl IntoIterator<Item = &'a F>) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let wide = std::mem::size_of::<F>() == 8;
    let mut out = Vec::new();
    for v in values {
        let (bits, digits) = if wide {
            (v.f64().to_bits(), 16)
        } else {
            (u64::from((v.f64() as f32).to_bits()), 8)
        };
        for i in (0..digits).rev() {
            out.push(HEX[((bits >> (4 * i)) & 0xf) as usize]);
        }
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Inverse of [`encode`]; `Err` if the text is not `len` elements of `F`.
fn decode<F: Float>(text: &str, len: usize, what: &str) -> std::result::Result<Vec<F>, String> {
    let digits = 2 * std::mem::size_of::<F>();
    if text.len() != len * digits {
        return Err(format!(
            "{what}: {} hex digits, expected {} ({len} elements of {} digits)",
            text.len(),
            len * digits,
            digits
        ));
    }
    let bytes = text.as_bytes();
    bytes
        .chunks_exact(digits)
        .map(|chunk| {
            let s = std::str::from_utf8(chunk).map_err(|_| format!("{what}: not hex"))?;
            let bits = u64::from_str_radix(s, 16).map_err(|_| format!("{what}: not hex: {s:?}"))?;
            Ok(if digits == 16 {
                F::c(f64::from_bits(bits))
            } else {
                F::c(f64::from(f32::from_bits(bits as u32)))
            })
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
struct TensorRepr {
    shape: Vec<usize>,
    bits: String,
}

impl TensorRepr {
    fn new<F: Float>(a: &ArrayD<F>) -> Self {
        TensorRepr {
            shape: a.shape().to_vec(),
            bits: encode(a.iter()),
        }
    }

    fn array<F: Float>(&self, what: &str) -> std::result::Result<ArrayD<F>, String> {
        let len = self.shape.iter().product();
        let data = decode(&self.bits, len, what)?;
        ArrayD::from_shape_vec(IxDyn(&self.shape), data).map_err(|e| format!("{what}: {e}"))
    }
}

#[derive(Serialize, Deserialize)]
struct NamedTensorRepr {
    name: String,
    #[serde(flatten)]
    tensor: TensorRepr,
}

#[derive(Serialize, Deserialize)]
struct StatsRepr {
    channels: usize,
    mean: String,
    var: String,
    updates: u64,
}

#[derive(Serialize, Deserialize)]
struct NormRepr {
    momentum: f64,
    stats: Vec<Vec<StatsRepr>>,
}

#[derive(Serialize, Deserialize)]
enum RuleRepr {
    Sgd,
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        m: Vec<TensorRepr>,
        v: Vec<TensorRepr>,
    },
}

#[derive(Serialize, Deserialize)]
struct OptimizerRepr {
    lr: f64,
    clip_norm: Option<f64>,
    steps: u64,
    rule: RuleRepr,
}

#[derive(Serialize, Deserialize)]
struct FileRepr {
    format: String,
    version: u32,
    float: String,
    model: String,
    step: u64,
    /// Required from version 2 on, absent in version 1 (checked in `into_checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skipped_steps: Option<u64>,
    config: MetaConfig,
    rng: SamplerRng,
    /// The user's state (absent when null, and in files written before it existed).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    extras: serde_json::Value,
    params: Vec<NamedTensorRepr>,
    norm: NormRepr,
    optimizer: OptimizerRepr,
}

impl FileRepr {
    fn from_checkpoint<F: Float>(c: &Checkpoint<F>) -> Self {
        let rule = match &c.optimizer.rule {
            OuterRule::Sgd => RuleRepr::Sgd,
            OuterRule::Adam {
                beta1,
                beta2,
                eps,
                m,
                v,
            } => RuleRepr::Adam {
                beta1: *beta1,
                beta2: *beta2,
                eps: *eps,
                m: m.iter().map(TensorRepr::new).collect(),
                v: v.iter().map(TensorRepr::new).collect(),
            },
        };
        FileRepr {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            float: float_name::<F>().to_string(),
            model: c.model.clone(),
            step: c.step,
            skipped_steps: Some(c.skipped_steps),
            config: c.config.clone(),
            rng: c.rng.clone(),
            extras: c.extras.clone(),
            params: c
                .params
                .iter()
                .map(|(name, t)| NamedTensorRepr {
                    name: name.to_string(),
                    tensor: TensorRepr::new(t),
                })
                .collect(),
            norm: NormRepr {
                momentum: c.norm.momentum,
                stats: c
                    .norm
                    .stats
                    .iter()
                    .map(|layer| {
                        layer
                            .iter()
                            .map(|s| StatsRepr {
                                channels: s.mean.len(),
                                mean: encode(&s.mean),
                                var: encode(&s.var),
                                updates: s.updates,
                            })
                            .collect()
                    })
                    .collect(),
            },
            optimizer: OptimizerRepr {
                lr: c.optimizer.lr,
                clip_norm: c.optimizer.clip_norm,
                steps: c.optimizer.steps,
                rule,
            },
        }
    }

    fn into_checkpoint<F: Float>(self) -> std::result::Result<Checkpoint<F>, String> {
        let skipped_steps = match (self.version, self.skipped_steps) {
            (1, None) => 0,
            (1, Some(_)) => {
                return Err(
                    "a version-1 checkpoint cannot hold \"skipped_steps\" (added in \
                            version 2)"
                        .to_string(),
                )
            }
            (_, Some(n)) => n,
            (v, None) => {
                return Err(format!(
                    "malformed checkpoint: missing field `skipped_steps` (required from \
                     format version 2 on; the file says version {v})"
                ))
            }
        };
        let mut params = Params::new();
        for p in &self.params {
            if params.index_of(&p.name).is_some() {
                return Err(format!("parameter {} appears twice", p.name));
            }
            let what = format!("parameter {}", p.name);
            params.push(p.name.clone(), p.tensor.array(&what)?);
        }
        let mut stats = Vec::new();
        for (l, layer) in self.norm.stats.iter().enumerate() {
            let mut sets = Vec::new();
            for (s, st) in layer.iter().enumerate() {
                let what = format!("batch-norm statistics of layer {l}, step {s}");
                sets.push(RunningStats {
                    mean: decode(&st.mean, st.channels, &what)?,
                    var: decode(&st.var, st.channels, &what)?,
                    updates: st.updates,
                });
            }
            stats.push(sets);
        }
        let tensors =
            |ts: &[TensorRepr], what: &str| -> std::result::Result<Vec<ArrayD<F>>, String> {
                ts.iter()
                    .enumerate()
                    .map(|(i, t)| t.array(&format!("{what} {i}")))
                    .collect()
            };
        let rule = match &self.optimizer.rule {
            RuleRepr::Sgd => OuterRule::Sgd,
            RuleRepr::Adam {
                beta1,
                beta2,
                eps,
                m,
                v,
            } => OuterRule::Adam {
                beta1: *beta1,
                beta2: *beta2,
                eps: *eps,
                m: tensors(m, "Adam first moment")?,
                v: tensors(v, "Adam second moment")?,
            },
        };
        Ok(Checkpoint {
            model: self.model,
            params,
            norm: NormState {
                momentum: self.norm.momentum,
                stats,
            },
            optimizer: Optimizer {
                lr: self.optimizer.lr,
                clip_norm: self.optimizer.clip_norm,
                steps: self.optimizer.steps,
                rule,
            },
            step: self.step,
            skipped_steps,
            config: self.config,
            rng: self.rng,
            extras: self.extras,
            origin: None,
            file_version: None,
        })
    }
}
