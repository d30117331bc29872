//! Omniglot (Lake et al., 2015): 1623 handwritten characters from 50 alphabets,
//! 20 drawings each, loaded from the official layout.
//!
//! [`Omniglot::load`] takes a path to either
//!
//! * a folder holding the extracted parts `images_background/` and/or
//!   `images_evaluation/` (each `<Alphabet>/<characterNN>/*.png`), or
//! * a folder holding the official archives `images_background.zip` and/or
//!   `images_evaluation.zip` (no need to unzip), or
//! * one of those part folders or archives directly.
//!
//! The 105×105 black-and-white drawings are resized to 28×28 by area averaging
//! ([`resize_area`]) and stored as `f32` in `[0, 1]` with **ink high** (ink = 1,
//! background = 0), all in one contiguous `[n_images, 28, 28]` array. Decoding
//! and resizing run in parallel; loading all 32,460 images from the zips takes
//! about half a second in release mode on two cores.
//!
//! Characters are ordered deterministically (part, then alphabet, then character,
//! each sorted by name), and so are the drawings of a character, so splits and
//! episodes are reproducible from a seed. Two splits are provided:
//!
//! * [`Omniglot::split_maml`]: the split of the MAML code — all characters shuffled
//!   with a seed, the first 1200 for meta-training (the last `validation` of them
//!   held out for validation), the remaining 423 for testing;
//! * [`Omniglot::split_official`]: background for training, evaluation for testing.
//!
//! Rotation augmentation (each 90° rotation a new class, as in MAML) is available
//! through [`ImageCollection::with_rotations`] or [`OmniglotSplits::with_rotations`].
//!
//! # Example
//!
//! ```no_run
//! use metagrad::data::{omniglot, EpisodeSampler, EpisodeSpec, Omniglot};
//!
//! let path = omniglot::default_path().expect("set METAGRAD_OMNIGLOT to the Omniglot folder");
//! let data = Omniglot::load(&path)?;
//! assert_eq!(data.num_characters(), 1623);
//!
//! let splits = data.split_maml(0, 100)?.with_rotations()?;
//! assert_eq!(splits.train.num_classes(), 4 * 1100);
//! let mut sampler = EpisodeSampler::new(&splits.train, EpisodeSpec::new(5, 1, 15), 42)?;
//! let batch = sampler.sample_batch(32)?;
//! assert_eq!(batch.xs.shape(), &[32, 5, 1, 28, 28]);
//! # Ok::<(), metagrad::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ndarray::{Array2, Array4, ArrayView2, ArrayView3, Axis};
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::{rng_from_seed, Collection, Examples, ImageCollection};
use crate::{Error, Result};

/// Side of the original Omniglot drawings, in pixels.
pub const SOURCE_SIZE: usize = 105;

/// Side of the loaded images with [`Omniglot::load`], as in MAML.
pub const DEFAULT_IMAGE_SIZE: usize = 28;

/// Number of characters used for meta-training (and validation) in the MAML split.
pub const MAML_META_TRAIN: usize = 1200;

/// Environment variable read by [`default_path`].
pub const ENV_VAR: &str = "METAGRAD_OMNIGLOT";

/// Where to get the data, used in [`Error::NotFound`] hints.
const HINT: &str = "Omniglot was not found there. Download python/images_background.zip and \
    python/images_evaluation.zip from https://github.com/brendenlake/omniglot, then either \
    unzip them or point at the folder holding the zips (examples also read the \
    METAGRAD_OMNIGLOT environment variable).";

/// One of the two official parts of Omniglot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// `images_background`: 30 alphabets, 964 characters (the official training part).
    Background,
    /// `images_evaluation`: 20 alphabets, 659 characters (the official test part).
    Evaluation,
}

impl Part {
    /// Both parts, in loading order.
    pub const ALL: [Part; 2] = [Part::Background, Part::Evaluation];

    /// Folder name of the part, e.g. `images_background`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Part::Background => "images_background",
            Part::Evaluation => "images_evaluation",
        }
    }

    /// Archive name of the part, e.g. `images_background.zip`.
    pub fn zip_name(self) -> &'static str {
        match self {
            Part::Background => "images_background.zip",
            Part::Evaluation => "images_evaluation.zip",
        }
    }

    /// The part whose folder or archive is called `name`, if any.
    fn from_file_name(name: &str) -> Option<Part> {
        Part::ALL
            .into_iter()
            .find(|p| name == p.dir_name() || name == p.zip_name())
    }
}

/// Where one Omniglot character comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Character {
    /// The official part it belongs to.
    pub part: Part,
    /// Alphabet folder name, e.g. `Latin`.
    pub alphabet: String,
    /// Character folder name, e.g. `character01`.
    pub name: String,
}

/// The Omniglot images, one class per character, in one contiguous array.
#[derive(Clone, Debug)]
pub struct Omniglot {
    collection: ImageCollection,
    characters: Vec<Character>,
    image_size: usize,
}

/// A meta-train / validation / test split of Omniglot characters.
#[derive(Clone, Debug)]
pub struct OmniglotSplits {
    /// Meta-training classes.
    pub train: ImageCollection,
    /// Validation classes (no class when the split has no validation part).
    pub validation: ImageCollection,
    /// Meta-test classes.
    pub test: ImageCollection,
    /// Character index (into [`Omniglot::characters`]) of each class of `train`.
    pub train_characters: Vec<usize>,
    /// Character index of each class of `validation`.
    pub validation_characters: Vec<usize>,
    /// Character index of each class of `test`.
    pub test_characters: Vec<usize>,
}

impl OmniglotSplits {
    /// The same split with every class augmented by 90°, 180° and 270° rotations
    /// (see [`ImageCollection::with_rotations`]). The `*_characters` lists keep
    /// describing the unrotated classes: rotated class `c + r × n` comes from
    /// character `*_characters[c]`.
    pub fn with_rotations(self) -> Result<Self> {
        Ok(OmniglotSplits {
            train: self.train.with_rotations()?,
            validation: self.validation.with_rotations()?,
            test: self.test.with_rotations()?,
            ..self
        })
    }
}

impl Omniglot {
    /// Loads every part found at `path` (see the [module docs](self) for the
    /// accepted layouts) as 28×28 images.
    ///
    /// Errors: [`Error::NotFound`] when `path` or the data is missing,
    /// [`Error::Zip`] for an unreadable archive, [`Error::Image`] for an
    /// undecodable PNG, [`Error::Layout`] for an unexpected folder structure or
    /// image size, [`Error::Io`] for other file-system failures.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, &[], DEFAULT_IMAGE_SIZE)
    }

    /// Loads the given parts (all parts found when `parts` is empty) as
    /// `image_size`×`image_size` images.
    ///
    /// A requested part that is missing is an [`Error::NotFound`]; a zero
    /// `image_size` is an [`Error::Config`]. Other errors as for [`load`](Self::load).
    pub fn load_with(path: impl AsRef<Path>, parts: &[Part], image_size: usize) -> Result<Self> {
        if image_size == 0 {
            return Err(Error::Config(
                "Omniglot image_size must be at least 1".into(),
            ));
        }
        let sources = locate(path.as_ref(), parts)?;
        let mut characters = Vec::new();
        let mut raw_images = Vec::new();
        let mut ranges = Vec::new();
        for (part, source) in sources {
            let listed = match &source {
                Source::Folder(dir) => list_folder(dir)?,
                Source::Zip(file) => list_zip(file, part)?,
            };
            for character in listed {
                let start = raw_images.len();
                raw_images.extend(character.images);
                ranges.push(start..raw_images.len());
                characters.push(Character {
                    part,
                    alphabet: character.alphabet,
                    name: character.name,
                });
            }
        }
        let images = decode_all(&raw_images, image_size)?;
        let names = characters
            .iter()
            .map(|c| format!("{}/{}", c.alphabet, c.name))
            .collect();
        let collection =
            Collection::from_ranges(Examples::F32(Arc::new(images)), false, ranges, Some(names))?;
        Ok(Omniglot {
            collection,
            characters,
            image_size,
        })
    }

    /// The characters, in class order.
    pub fn characters(&self) -> &[Character] {
        &self.characters
    }

    /// Number of characters (classes).
    pub fn num_characters(&self) -> usize {
        self.characters.len()
    }

    /// Number of images.
    pub fn num_images(&self) -> usize {
        self.collection.num_images()
    }

    /// Side of the images in pixels (28 with [`load`](Self::load)).
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// All images, `[n_images, size, size]`, ink = 1, background = 0.
    pub fn images(&self) -> ArrayView3<'_, f32> {
        match self.collection.examples() {
            // Stored as [n, 1, size, size].
            Examples::F32(a) => a
                .view()
                .index_axis_move(Axis(1), 0)
                .into_dimensionality()
                .expect("Omniglot images are [n, 1, size, size]"),
            Examples::U8(_) => unreachable!("Omniglot images are stored as f32"),
        }
    }

    /// The images of character `character`, `[n_drawings, size, size]`, or `None`
    /// if there is no such character.
    pub fn character_images(&self, character: usize) -> Option<ArrayView3<'_, f32>> {
        let range = self.collection.class_range(character)?;
        Some(self.images().slice_move(ndarray::s![range, .., ..]))
    }

    /// All characters as one collection, one class per character (no rotation).
    pub fn collection(&self) -> &ImageCollection {
        &self.collection
    }

    /// Indices of the characters of `part`.
    pub fn part_characters(&self, part: Part) -> Vec<usize> {
        (0..self.characters.len())
            .filter(|&c| self.characters[c].part == part)
            .collect()
    }

    /// The MAML split: all characters shuffled with `seed`, the first 1200 for
    /// meta-training of which the last `validation` are held out for validation,
    /// the rest (423 with both parts loaded) for testing.
    ///
    /// Errors with [`Error::Config`] when fewer than 1200 characters are loaded or
    /// `validation > 1200`.
    pub fn split_maml(&self, seed: u64, validation: usize) -> Result<OmniglotSplits> {
        self.split_random(seed, MAML_META_TRAIN, validation)
    }

    /// Like [`split_maml`](Self::split_maml) with `meta_train` instead of 1200
    /// characters for meta-training (validation included).
    pub fn split_random(
        &self,
        seed: u64,
        meta_train: usize,
        validation: usize,
    ) -> Result<OmniglotSplits> {
        let n = self.num_characters();
        if meta_train > n {
            return Err(Error::Config(format!(
                "the split wants {meta_train} meta-training characters, but only {n} are loaded"
            )));
        }
        if validation > meta_train {
            return Err(Error::Config(format!(
                "validation = {validation} characters exceeds meta-training = {meta_train}"
            )));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng_from_seed(seed));
        let train_end = meta_train - validation;
        self.split(
            order[..train_end].to_vec(),
            order[train_end..meta_train].to_vec(),
            order[meta_train..].to_vec(),
        )
    }

    /// The official split: background characters for meta-training, evaluation
    /// characters for testing, no validation.
    ///
    /// Errors with [`Error::Config`] unless both parts are loaded.
    pub fn split_official(&self) -> Result<OmniglotSplits> {
        let train = self.part_characters(Part::Background);
        let test = self.part_characters(Part::Evaluation);
        if train.is_empty() || test.is_empty() {
            return Err(Error::Config(format!(
                "the official split needs both parts, but {} background and {} evaluation \
                 characters are loaded",
                train.len(),
                test.len()
            )));
        }
        self.split(train, Vec::new(), test)
    }

    fn split(
        &self,
        train: Vec<usize>,
        validation: Vec<usize>,
        test: Vec<usize>,
    ) -> Result<OmniglotSplits> {
        Ok(OmniglotSplits {
            train: self.collection.subset(&train)?,
            validation: self.collection.subset(&validation)?,
            test: self.collection.subset(&test)?,
            train_characters: train,
            validation_characters: validation,
            test_characters: test,
        })
    }
}

/// Convenience for examples and tests: where the Omniglot data probably is.
///
/// Returns the path in the `METAGRAD_OMNIGLOT` environment variable when it is
/// set (even if nothing is there, so that loading reports what is missing),
/// otherwise `../shared/data/omniglot` relative to the current directory if that
/// folder exists, otherwise `None`. The library itself never guesses a path.
pub fn default_path() -> Option<PathBuf> {
    if let Some(value) = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(value));
    }
    let fallback = Path::new("..").join("shared").join("data").join("omniglot");
    fallback.is_dir().then_some(fallback)
}

/// Resizes an image by area averaging: each output pixel is the area-weighted mean
/// of the source pixels its footprint covers (fractional overlaps included), so a
/// constant image stays constant and the total mass scales by the area ratio.
///
/// Errors with [`Error::Config`] when a source or target side is zero.
///
/// ```
/// use ndarray::arr2;
/// let image = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]);
/// let small = metagrad::data::resize_area(image.view(), 2, 2)?;
/// // Output (0, 0) covers [0, 1.5)², i.e. 1 + half of 2 + half of 4 + a quarter of 5.
/// assert!((small[[0, 0]] - (1.0 + 1.0 + 2.0 + 1.25) / 2.25).abs() < 1e-6);
/// # Ok::<(), metagrad::Error>(())
/// ```
pub fn resize_area(image: ArrayView2<'_, f32>, height: usize, width: usize) -> Result<Array2<f32>> {
    let (src_h, src_w) = image.dim();
    if src_h == 0 || src_w == 0 || height == 0 || width == 0 {
        return Err(Error::Config(format!(
            "cannot resize a {src_h}x{src_w} image to {height}x{width}: sides must be non-zero"
        )));
    }
    if height
        .checked_mul(width)
        .is_none_or(|n| n > isize::MAX as usize / 4)
    {
        return Err(Error::Config(format!(
            "cannot resize to {height}x{width}: too many pixels"
        )));
    }
    let resizer = AreaResizer::new((src_h, src_w), (height, width));
    let mut out = vec![0.0; height * width];
    resizer.resize(
        |y, row| {
            for (r, &v) in row.iter_mut().zip(image.row(y)) {
                *r = v;
            }
        },
        &mut out,
    );
    Ok(Array2::from_shape_vec((height, width), out).expect("buffer of height * width pixels"))
}

/// Precomputed separable weights for area-averaging resizes between two fixed sizes.
pub(crate) struct AreaResizer {
    /// For each source row: the output rows it contributes to, with weights.
    row_targets: Vec<Vec<(usize, f32)>>,
    /// For each output column: the first source column it covers and the weights
    /// of the consecutive source columns from there.
    cols: Vec<(usize, Vec<f32>)>,
    src_w: usize,
    dst_h: usize,
}

impl AreaResizer {
    pub(crate) fn new((src_h, src_w): (usize, usize), (dst_h, dst_w): (usize, usize)) -> Self {
        let mut row_targets = vec![Vec::new(); src_h];
        for (i, weights) in area_weights(src_h, dst_h).into_iter().enumerate() {
            for (y, w) in weights {
                row_targets[y].push((i, w));
            }
        }
        let cols = area_weights(src_w, dst_w)
            .into_iter()
            .map(|weights| {
                let first = weights.first().map_or(0, |&(x, _)| x);
                (first, weights.into_iter().map(|(_, w)| w).collect())
            })
            .collect();
        AreaResizer {
            row_targets,
            cols,
            src_w,
            dst_h,
        }
    }

    /// Resizes a source image into `out` (row-major, `dst_h × dst_w`).
    ///
    /// `source_row(y, buffer)` writes source row `y` (`src_w` pixels) into `buffer`,
    /// so callers can convert pixels on the fly. Two passes: source rows are
    /// blended into `dst_h` full-width rows, which are then shrunk to `dst_w`.
    pub(crate) fn resize(&self, mut source_row: impl FnMut(usize, &mut [f32]), out: &mut [f32]) {
        let mut row = vec![0.0f32; self.src_w];
        let mut tall = vec![0.0f32; self.dst_h * self.src_w];
        for (y, targets) in self.row_targets.iter().enumerate() {
            source_row(y, &mut row);
            for &(i, w) in targets {
                let tall_row = &mut tall[i * self.src_w..(i + 1) * self.src_w];
                for (t, &v) in tall_row.iter_mut().zip(&row) {
                    *t += w * v;
                }
            }
        }
        let dst_w = self.cols.len();
        for (out_row, tall_row) in out
            .chunks_exact_mut(dst_w)
            .zip(tall.chunks_exact(self.src_w))
        {
            for (o, (first, weights)) in out_row.iter_mut().zip(&self.cols) {
                *o = tall_row[*first..]
                    .iter()
                    .zip(weights)
                    .map(|(&v, &w)| v * w)
                    .sum();
            }
        }
    }
}

/// 1-D area weights from `src` to `dst` samples: output `i` covers the source
/// interval `[i·s, (i+1)·s)` with `s = src / dst`, and source sample `p` (the
/// interval `[p, p+1)`) gets weight `overlap / s`. Each output's weights sum to 1.
fn area_weights(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|i| {
            let lo = i as f64 * scale;
            let hi = ((i + 1) as f64 * scale).min(src as f64);
            let first = lo.floor() as usize;
            let last = (hi.ceil() as usize).min(src);
            (first..last)
                .filter_map(|p| {
                    let overlap = hi.min(p as f64 + 1.0) - lo.max(p as f64);
                    (overlap > 1e-9).then(|| (p, (overlap / scale) as f32))
                })
                .collect()
        })
        .collect()
}

/// Where a part's images are.
enum Source {
    /// An extracted part folder (`.../images_background`).
    Folder(PathBuf),
    /// A part archive (`.../images_background.zip`).
    Zip(PathBuf),
}

/// Finds the requested parts (all present ones when `parts` is empty) at `root`.
fn locate(root: &Path, parts: &[Part]) -> Result<Vec<(Part, Source)>> {
    if !root.exists() {
        return Err(Error::NotFound {
            path: root.to_path_buf(),
            hint: HINT.into(),
        });
    }
    let wanted: Vec<Part> = if parts.is_empty() {
        Part::ALL.to_vec()
    } else {
        let mut p = parts.to_vec();
        p.sort();
        p.dedup();
        p
    };

    // `root` may be one part's folder or archive itself.
    let own_name = root.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if let Some(part) = Part::from_file_name(own_name) {
        let is_zip = root.is_file();
        let holds_parts = Part::ALL.iter().any(|p| root.join(p.dir_name()).is_dir());
        if is_zip || !holds_parts {
            if !wanted.contains(&part) {
                return Err(Error::NotFound {
                    path: root.with_file_name(wanted[0].zip_name()),
                    hint: HINT.into(),
                });
            }
            let source = if is_zip {
                Source::Zip(root.to_path_buf())
            } else {
                Source::Folder(root.to_path_buf())
            };
            return Ok(vec![(part, source)]);
        }
    }
    if root.is_file() {
        return Err(Error::Layout {
            path: root.to_path_buf(),
            message: "expected a folder, images_background.zip or images_evaluation.zip".into(),
        });
    }

    let mut found = Vec::new();
    for &part in &wanted {
        let dir = root.join(part.dir_name());
        let zip = root.join(part.zip_name());
        // An extracted folder wins over an archive next to it.
        if dir.is_dir() {
            found.push((part, Source::Folder(dir)));
        } else if zip.is_file() {
            found.push((part, Source::Zip(zip)));
        } else if !parts.is_empty() {
            return Err(Error::NotFound {
                path: zip,
                hint: HINT.into(),
            });
        }
    }
    if found.is_empty() {
        return Err(Error::NotFound {
            path: root.join(Part::Background.zip_name()),
            hint: format!(
                "Neither images_background(.zip) nor images_evaluation(.zip) is in {}. {HINT}",
                root.display()
            ),
        });
    }
    Ok(found)
}

/// One image before decoding: a name for error messages and where its bytes are.
struct RawImage {
    /// File path, or `archive.zip!inner/path.png` inside an archive.
    name: String,
    data: RawData,
}

enum RawData {
    /// A PNG file on disk, read during the parallel decode.
    File(PathBuf),
    /// PNG bytes already read from an archive.
    Bytes(Vec<u8>),
}

/// A character with its drawings, in file-name order.
struct RawCharacter {
    alphabet: String,
    name: String,
    images: Vec<RawImage>,
}

/// Whether a folder or archive entry name should be skipped (hidden files,
/// macOS metadata).
fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name == "__MACOSX"
}

fn is_png(name: &str) -> bool {
    !is_hidden(name) && name.to_ascii_lowercase().ends_with(".png")
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Sorted (name, path) of the entries of `dir` that are folders (`want_dirs`) or PNG files.
fn sorted_entries(dir: &Path, want_dirs: bool) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = if want_dirs {
            !is_hidden(&name) && path.is_dir()
        } else {
            is_png(&name) && path.is_file()
        };
        if keep {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Lists an extracted part folder: `<Alphabet>/<character>/*.png`.
fn list_folder(part_dir: &Path) -> Result<Vec<RawCharacter>> {
    let alphabets = sorted_entries(part_dir, true)?;
    if alphabets.is_empty() {
        return Err(Error::Layout {
            path: part_dir.to_path_buf(),
            message: "no alphabet folders (expected <Alphabet>/<characterNN>/*.png)".into(),
        });
    }
    let mut characters = Vec::new();
    for (alphabet, alphabet_dir) in alphabets {
        let chars = sorted_entries(&alphabet_dir, true)?;
        if chars.is_empty() {
            return Err(Error::Layout {
                path: alphabet_dir,
                message: "alphabet folder without character folders".into(),
            });
        }
        for (name, char_dir) in chars {
            let files = sorted_entries(&char_dir, false)?;
            if files.is_empty() {
                return Err(Error::Layout {
                    path: char_dir,
                    message: "character folder without PNG images".into(),
                });
            }
            let images = files
                .into_iter()
                .map(|(_, path)| RawImage {
                    name: path.display().to_string(),
                    data: RawData::File(path),
                })
                .collect();
            characters.push(RawCharacter {
                alphabet: alphabet.clone(),
                name,
                images,
            });
        }
    }
    Ok(characters)
}

/// Reads a part archive: entries `[<part>/]<Alphabet>/<character>/*.png`.
///
/// The archive is read sequentially (zip readers cannot be shared between
/// threads); decoding happens later, in parallel.
fn list_zip(zip_path: &Path, part: Part) -> Result<Vec<RawCharacter>> {
    let zip_error = |message: String| Error::Zip {
        path: zip_path.to_path_buf(),
        message,
    };
    // Reading the whole archive at once (15 MB for Omniglot) is faster than seeking in the file.
    let contents = fs::read(zip_path).map_err(|e| io_error(zip_path, e))?;
    let mut archive =
        zip::ZipArchive::new(Cursor::new(contents)).map_err(|e| zip_error(e.to_string()))?;

    // alphabet -> character -> (file name, entry name, bytes); BTreeMaps keep names sorted.
    type Files = Vec<(String, String, Vec<u8>)>;
    let mut tree: BTreeMap<String, BTreeMap<String, Files>> = BTreeMap::new();
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| zip_error(format!("entry {i}: {e}")))?;
        let full_name = entry
            .name()
            .map_err(|e| zip_error(format!("entry {i}: {e}")))?
            .into_owned();
        let mut parts: Vec<&str> = full_name.split('/').filter(|s| !s.is_empty()).collect();
        if parts.iter().any(|p| is_hidden(p)) {
            continue;
        }
        if parts.first() == Some(&part.dir_name()) {
            parts.remove(0);
        }
        if entry.is_dir() {
            // Register folders too, so that an empty alphabet or character is noticed.
            match parts.as_slice() {
                [alphabet] => {
                    tree.entry(alphabet.to_string()).or_default();
                }
                [alphabet, character] => {
                    tree.entry(alphabet.to_string())
                        .or_default()
                        .entry(character.to_string())
                        .or_default();
                }
                _ => {}
            }
            continue;
        }
        let Some(file_name) = parts.last().filter(|n| is_png(n)) else {
            continue; // not an image: ignore (e.g. a README)
        };
        let [alphabet, character, _] = parts.as_slice() else {
            return Err(Error::Layout {
                path: PathBuf::from(format!("{}!{full_name}", zip_path.display())),
                message: format!(
                    "PNG at an unexpected depth; expected {}/<Alphabet>/<characterNN>/<file>.png",
                    part.dir_name()
                ),
            });
        };
        // The declared size is only a capacity hint; don't trust it with memory.
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 20) as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| zip_error(format!("cannot read {full_name}: {e}")))?;
        tree.entry(alphabet.to_string())
            .or_default()
            .entry(character.to_string())
            .or_default()
            .push((file_name.to_string(), full_name.clone(), bytes));
    }

    if tree.is_empty() {
        return Err(Error::Layout {
            path: zip_path.to_path_buf(),
            message: format!(
                "no alphabets (expected {}/<Alphabet>/<characterNN>/*.png)",
                part.dir_name()
            ),
        });
    }
    let mut characters = Vec::new();
    for (alphabet, chars) in tree {
        if chars.is_empty() {
            return Err(Error::Layout {
                path: PathBuf::from(format!("{}!{alphabet}", zip_path.display())),
                message: "alphabet folder without character folders".into(),
            });
        }
        for (name, mut files) in chars {
            if files.is_empty() {
                return Err(Error::Layout {
                    path: PathBuf::from(format!("{}!{alphabet}/{name}", zip_path.display())),
                    message: "character folder without PNG images".into(),
                });
            }
            files.sort();
            let images = files
                .into_iter()
                .map(|(_, entry_name, bytes)| RawImage {
                    name: format!("{}!{entry_name}", zip_path.display()),
                    data: RawData::Bytes(bytes),
                })
                .collect();
            characters.push(RawCharacter {
                alphabet: alphabet.clone(),
                name,
                images,
            });
        }
    }
    Ok(characters)
}

/// Decodes and resizes every image in parallel into one `[n, 1, size, size]` array.
fn decode_all(raw: &[RawImage], size: usize) -> Result<ndarray::ArrayD<f32>> {
    let resizer = AreaResizer::new((SOURCE_SIZE, SOURCE_SIZE), (size, size));
    let mut pixels = vec![0.0f32; raw.len() * size * size];
    pixels
        .par_chunks_mut(size * size)
        .zip(raw.par_iter())
        .try_for_each(|(out, image)| {
            let png = match &image.data {
                RawData::Bytes(bytes) => DecodedPng::new(bytes, &image.name)?,
                RawData::File(path) => {
                    let bytes = fs::read(path).map_err(|e| io_error(path, e))?;
                    DecodedPng::new(&bytes, &image.name)?
                }
            };
            resizer.resize(|y, row| png.ink_row(y, row), out);
            // Rounding in the weights can push values a hair outside [0, 1].
            for v in out.iter_mut() {
                *v = v.clamp(0.0, 1.0);
            }
            Ok::<(), Error>(())
        })?;
    Ok(Array4::from_shape_vec((raw.len(), 1, size, size), pixels)
        .expect("buffer of n * size * size")
        .into_dyn())
}

/// One decoded Omniglot PNG, rows kept in their decoded form.
struct DecodedPng {
    buffer: Vec<u8>,
    line_size: usize,
    samples: Samples,
}

/// How pixels are stored in a [`DecodedPng`] row.
#[derive(Clone, Copy)]
enum Samples {
    /// Grayscale packed at 1, 2, 4 or 8 bits per pixel (Omniglot: 1 bit), unpacked here.
    Gray { bits: u8 },
    /// 8-bit samples with `channels` per pixel (gray+alpha, RGB, RGBA), expanded by `png`.
    Color8 { channels: usize },
}

impl DecodedPng {
    /// Decodes a `105 × 105` PNG of any colour type and bit depth.
    ///
    /// An undecodable file is an [`Error::Image`]; another size is an [`Error::Layout`].
    fn new(bytes: &[u8], name: &str) -> Result<Self> {
        let image_error = |message: String| Error::Image {
            path: name.to_string(),
            message,
        };
        let mut decoder = png::Decoder::new(Cursor::new(bytes));
        let header = decoder
            .read_header_info()
            .map_err(|e| image_error(e.to_string()))?;
        let (width, height) = header.size();
        if (width as usize, height as usize) != (SOURCE_SIZE, SOURCE_SIZE) {
            return Err(Error::Layout {
                path: PathBuf::from(name),
                message: format!(
                    "image is {width}x{height}, Omniglot images are {SOURCE_SIZE}x{SOURCE_SIZE}"
                ),
            });
        }
        // Plain grayscale (Omniglot's 1-bit format) is unpacked by `ink_row`, which is
        // much faster than expanding to 8 bits first; anything else is normalised to
        // 8-bit samples by the decoder.
        let gray_bits = header.bit_depth as u8;
        let packed_gray = header.color_type == png::ColorType::Grayscale && gray_bits <= 8;
        if !packed_gray {
            decoder.set_transformations(png::Transformations::normalize_to_color8());
        }
        let mut reader = decoder
            .read_info()
            .map_err(|e| image_error(e.to_string()))?;
        let buffer_size = reader
            .output_buffer_size()
            .ok_or_else(|| image_error("image too large".into()))?;
        let mut buffer = vec![0u8; buffer_size];
        let frame = reader
            .next_frame(&mut buffer)
            .map_err(|e| image_error(e.to_string()))?;
        let samples = if packed_gray {
            Samples::Gray { bits: gray_bits }
        } else {
            let channels = match frame.color_type {
                png::ColorType::Grayscale => 1,
                png::ColorType::GrayscaleAlpha => 2,
                png::ColorType::Rgb => 3,
                png::ColorType::Rgba => 4,
                png::ColorType::Indexed => {
                    return Err(image_error("palette image was not expanded".into()));
                }
            };
            if frame.bit_depth != png::BitDepth::Eight {
                return Err(image_error(format!(
                    "unsupported bit depth {:?} after expansion",
                    frame.bit_depth
                )));
            }
            Samples::Color8 { channels }
        };
        let row_bytes = match samples {
            Samples::Gray { bits } => (SOURCE_SIZE * bits as usize).div_ceil(8),
            Samples::Color8 { channels } => SOURCE_SIZE * channels,
        };
        if frame.line_size < row_bytes
            || buffer.len() < frame.line_size * (SOURCE_SIZE - 1) + row_bytes
        {
            return Err(image_error(
                "decoded buffer is smaller than the image".into(),
            ));
        }
        Ok(DecodedPng {
            buffer,
            line_size: frame.line_size,
            samples,
        })
    }

    /// Writes row `y` as ink values (ink = 1, white = 0) into `out` (105 pixels).
    ///
    /// Colour is averaged to gray; transparency is composited over white.
    fn ink_row(&self, y: usize, out: &mut [f32]) {
        let row = &self.buffer[y * self.line_size..(y + 1) * self.line_size];
        match self.samples {
            Samples::Gray { bits: 8 } => {
                for (o, &gray) in out.iter_mut().zip(row) {
                    *o = 1.0 - f32::from(gray) / 255.0;
                }
            }
            Samples::Gray { bits: 1 } => {
                // Omniglot's format: 8 pixels per byte, looked up 8 at a time.
                let table = one_bit_ink_table();
                for (chunk, &byte) in out.chunks_mut(8).zip(row) {
                    chunk.copy_from_slice(&table[usize::from(byte)][..chunk.len()]);
                }
            }
            Samples::Gray { bits } => {
                // Pixels are packed most significant bits first; `bits` is 1, 2 or 4.
                let bits = usize::from(bits);
                let max = ((1u16 << bits) - 1) as u8;
                let scale = 1.0 / f32::from(max);
                for (x, o) in out.iter_mut().enumerate() {
                    let offset = x * bits;
                    let sample = (row[offset >> 3] >> (8 - bits - (offset & 7))) & max;
                    *o = 1.0 - f32::from(sample) * scale;
                }
            }
            Samples::Color8 { channels } => {
                for (o, px) in out.iter_mut().zip(row.chunks_exact(channels)) {
                    let (gray, alpha) = match *px {
                        [g] => (f32::from(g), 255.0),
                        [g, a] => (f32::from(g), f32::from(a)),
                        [r, g, b] => ((f32::from(r) + f32::from(g) + f32::from(b)) / 3.0, 255.0),
                        [r, g, b, a, ..] => (
                            (f32::from(r) + f32::from(g) + f32::from(b)) / 3.0,
                            f32::from(a),
                        ),
                        [] => (255.0, 255.0),
                    };
                    let a = alpha / 255.0;
                    let white = (gray / 255.0) * a + (1.0 - a);
                    *o = 1.0 - white;
                }
            }
        }
    }
}

/// Ink values of the 8 pixels packed in each possible byte of a 1-bit grayscale
/// row (most significant bit first; bit 1 = white = no ink).
fn one_bit_ink_table() -> &'static [[f32; 8]; 256] {
    static TABLE: OnceLock<[[f32; 8]; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [[0.0; 8]; 256];
        for (byte, pixels) in table.iter_mut().enumerate() {
            for (k, ink) in pixels.iter_mut().enumerate() {
                *ink = if (byte >> (7 - k)) & 1 == 1 { 0.0 } else { 1.0 };
            }
        }
        table
    })
}
