//! One labelled collection for examples of any shape: `[C, H, W]` images or `[D]` vectors.
//!
//! A [`Collection`] keeps every example in one contiguous array (its [`Examples`]) and
//! describes each class by the rows of that array it owns, together with the class's name.
//! Images that arrive as bytes stay bytes (`u8`, a quarter of the memory of `f32`) until
//! an episode is drawn; computed values (Omniglot's resized drawings, feature vectors)
//! are stored as `f32`. Bytes become `f32` in `[0, 1]` (`v / 255`) when copied into an
//! episode.
//!
//! Byte images may be stored channels-last (`[n, H, W, C]`, as numpy pickles hold them):
//! they are seen, and sampled, as `[C, H, W]` all the same, with no copy at load time.
//!
//! Classes can be augmented with 90° rotations ([`Collection::with_rotations`]): each
//! rotation is a new class, applied when an episode is built, so no example is stored
//! twice. Clones, subsets and rotated collections share the stored array.
//!
//! # Example: your own `[D]` data in memory
//!
//! ```
//! use metagrad::data::{Collection, EpisodeSampler, EpisodeSpec};
//! use ndarray::Array2;
//!
//! // 6 classes of 8 feature vectors of dimension 5 (rows grouped by class).
//! let features = Array2::from_shape_fn((48, 5), |(i, d)| (i / 8) as f32 + 0.01 * d as f32);
//! let labels: Vec<usize> = (0..48).map(|i| i / 8).collect();
//! let collection = Collection::from_labels(features.into_dyn(), &labels)?;
//! assert_eq!(collection.example_shape(), &[5]);
//! assert_eq!(collection.num_classes(), 6);
//!
//! let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(3, 2, 4), 0)?;
//! let batch = sampler.sample_batch(2)?;
//! assert_eq!(batch.xs.shape(), &[2, 6, 5]);   // [tasks, N*K, D]
//! assert_eq!(batch.xq.shape(), &[2, 12, 5]);
//! # Ok::<(), metagrad::Error>(())
//! ```

use std::ops::Range;
use std::sync::Arc;

use ndarray::{Array3, ArrayD, Axis, IxDyn};

use crate::{Error, Result};

/// The stored examples of a [`Collection`], `[n, ...]`, shared between collections.
#[derive(Clone, Debug)]
pub enum Examples {
    /// Bytes (images as decoded), turned into `v / 255` when sampled.
    U8(Arc<ArrayD<u8>>),
    /// Computed values, copied as they are.
    F32(Arc<ArrayD<f32>>),
}

impl Examples {
    /// The stored shape `[n, ...]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            Examples::U8(a) => a.shape(),
            Examples::F32(a) => a.shape(),
        }
    }

    /// Number of stored rows (examples).
    pub fn len(&self) -> usize {
        self.shape()[0]
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the stored values take.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Examples::U8(a) => a.len(),
            Examples::F32(a) => a.len() * 4,
        }
    }

    /// Whether `self` and `other` are the same stored array (not a copy).
    pub fn same_storage(&self, other: &Examples) -> bool {
        match (self, other) {
            (Examples::U8(a), Examples::U8(b)) => Arc::ptr_eq(a, b),
            (Examples::F32(a), Examples::F32(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The rows of the stored array that make up a class.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rows {
    Range(Range<usize>),
    List(Arc<[usize]>),
}

impl Rows {
    fn len(&self) -> usize {
        match self {
            Rows::Range(r) => r.len(),
            Rows::List(l) => l.len(),
        }
    }

    /// The stored row of the class's `index`-th example (`index < len`).
    fn row(&self, index: usize) -> usize {
        match self {
            Rows::Range(r) => r.start + index,
            Rows::List(l) => l[index],
        }
    }
}

/// One class: its rows, the rotation it is seen under and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Class {
    rows: Rows,
    /// Counter-clockwise quarter turns applied to every example (0..4).
    quarter_turns: u8,
    name: Arc<str>,
}

/// Labelled examples of one shape: a shared array of examples plus the rows, rotation and
/// name of each class. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Collection {
    examples: Examples,
    /// Stored as `[n, H, W, C]`, seen as `[C, H, W]`.
    channels_last: bool,
    /// The shape of one example as sampled: `[C, H, W]` or `[D]` (or any other).
    example_shape: Vec<usize>,
    classes: Vec<Class>,
}

/// The earlier name of [`Collection`], from when it held only grayscale images.
pub type ImageCollection = Collection;

impl Collection {
    /// A collection of grayscale images `[n, H, W]` (seen as `[1, H, W]`) and the row range
    /// of each class. Classes are named by their index.
    ///
    /// Errors with [`Error::Config`] when a range is empty or reaches past the last image.
    /// Ranges may appear in any order (and may even overlap).
    pub fn new(images: Array3<f32>, class_ranges: Vec<Range<usize>>) -> Result<Self> {
        let (n, h, w) = images.dim();
        let images = images
            .into_shape_clone(IxDyn(&[n, 1, h, w]))
            .expect("same number of elements");
        Self::from_ranges(Examples::F32(Arc::new(images)), false, class_ranges, None)
    }

    /// A collection of grayscale images `[n, H, W]` whose classes are consecutive blocks
    /// of rows with the given sizes (class 0 = the first `sizes[0]` images, and so on).
    ///
    /// Errors with [`Error::Config`] when a size is zero or the sizes do not add up to the
    /// number of images.
    pub fn from_class_sizes(images: Array3<f32>, sizes: &[usize]) -> Result<Self> {
        let n = images.len_of(Axis(0));
        Self::new(images, ranges_of_sizes(sizes, n)?)
    }

    /// A collection of `f32` examples of any shape, `[n, ...]`, from the label of each row:
    /// labels `0..L`, each used at least once; class `c` holds the rows labelled `c`, in
    /// row order, and is named `c`.
    ///
    /// Errors with [`Error::Config`] when the lengths differ or a label in `0..L` is unused.
    pub fn from_labels(examples: ArrayD<f32>, labels: &[usize]) -> Result<Self> {
        let rows = rows_of_labels(labels, examples.shape().first().copied().unwrap_or(0))?;
        Self::from_rows(Examples::F32(Arc::new(examples)), false, rows, None)
    }

    /// The general constructor: stored examples `[n, ...]`, whether they are images stored
    /// channels-last (`[n, H, W, C]`, seen as `[C, H, W]`), the stored rows of each class,
    /// and optionally the name of each class (default: its index).
    ///
    /// Errors with [`Error::Config`] when a class is empty or names a row past the end,
    /// when the names do not match the classes in number, or when `channels_last` is asked
    /// of an array that is not `[n, H, W, C]`. A standard-layout copy is made only when
    /// the array given is not in standard layout.
    pub fn from_rows(
        examples: Examples,
        channels_last: bool,
        class_rows: Vec<Vec<usize>>,
        names: Option<Vec<String>>,
    ) -> Result<Self> {
        let rows = class_rows
            .into_iter()
            .map(|r| Rows::List(r.into()))
            .collect();
        Self::build(examples, channels_last, rows, names)
    }

    /// Like [`from_rows`](Self::from_rows), each class being a range of rows.
    pub fn from_ranges(
        examples: Examples,
        channels_last: bool,
        class_ranges: Vec<Range<usize>>,
        names: Option<Vec<String>>,
    ) -> Result<Self> {
        let rows = class_ranges.into_iter().map(Rows::Range).collect();
        Self::build(examples, channels_last, rows, names)
    }

    fn build(
        examples: Examples,
        channels_last: bool,
        rows: Vec<Rows>,
        names: Option<Vec<String>>,
    ) -> Result<Self> {
        let examples = standard(examples);
        let shape = examples.shape().to_vec();
        if shape.len() < 2 {
            return Err(Error::Config(format!(
                "examples must be stored as [n, ...] with at least one dimension per example, \
                 got shape {shape:?}"
            )));
        }
        let example_shape = if channels_last {
            match shape[1..] {
                [h, w, c] => vec![c, h, w],
                _ => {
                    return Err(Error::Config(format!(
                        "channels-last images must be stored as [n, H, W, C], got shape {shape:?}"
                    )))
                }
            }
        } else {
            shape[1..].to_vec()
        };
        let n = shape[0];
        let names = match names {
            Some(names) if names.len() != rows.len() => {
                return Err(Error::Config(format!(
                    "{} class names for {} classes",
                    names.len(),
                    rows.len()
                )))
            }
            Some(names) => names,
            None => (0..rows.len()).map(|c| c.to_string()).collect(),
        };
        let mut classes = Vec::with_capacity(rows.len());
        for (c, (rows, name)) in rows.into_iter().zip(names).enumerate() {
            let bad = match &rows {
                Rows::Range(r) => r.start >= r.end || r.end > n,
                Rows::List(l) => l.is_empty() || l.iter().any(|&i| i >= n),
            };
            if bad {
                return Err(Error::Config(format!(
                    "class {c} ({name}) has no rows, or rows past the {n} examples of the \
                     collection"
                )));
            }
            classes.push(Class {
                rows,
                quarter_turns: 0,
                name: name.into(),
            });
        }
        Ok(Collection {
            examples,
            channels_last,
            example_shape,
            classes,
        })
    }

    /// Number of classes (rotated copies count as classes of their own).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Number of examples over all classes (rotated copies counted separately).
    pub fn num_images(&self) -> usize {
        self.classes.iter().map(|c| c.rows.len()).sum()
    }

    /// The shape of one example as sampled: `[C, H, W]` for images, `[D]` for vectors.
    pub fn example_shape(&self) -> &[usize] {
        &self.example_shape
    }

    /// Number of values in one example.
    pub fn example_len(&self) -> usize {
        self.example_shape.iter().product()
    }

    /// Height and width of every image (the last two dimensions of an example; for a
    /// `[D]` example, `(1, D)`).
    pub fn image_shape(&self) -> (usize, usize) {
        match self.example_shape[..] {
            [.., h, w] => (h, w),
            [d] => (1, d),
            [] => (1, 1),
        }
    }

    /// The stored examples, shared by all classes (unrotated, in stored layout).
    pub fn examples(&self) -> &Examples {
        &self.examples
    }

    /// Whether the stored images are channels-last (`[n, H, W, C]`).
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Number of examples in class `class`, or `None` if there is no such class.
    pub fn class_len(&self, class: usize) -> Option<usize> {
        self.classes.get(class).map(|c| c.rows.len())
    }

    /// Stored rows holding class `class` when they are one range, or `None` if there is no
    /// such class or its rows are a list (see [`class_rows`](Self::class_rows)).
    pub fn class_range(&self, class: usize) -> Option<Range<usize>> {
        match &self.classes.get(class)?.rows {
            Rows::Range(r) => Some(r.clone()),
            Rows::List(_) => None,
        }
    }

    /// Stored rows holding class `class`, in the class's order.
    pub fn class_rows(&self, class: usize) -> Option<Vec<usize>> {
        let c = self.classes.get(class)?;
        Some((0..c.rows.len()).map(|i| c.rows.row(i)).collect())
    }

    /// The name of class `class` (rotated copies: the name followed by `@90`, `@180`,
    /// `@270`).
    pub fn class_name(&self, class: usize) -> Option<String> {
        let c = self.classes.get(class)?;
        Some(match c.quarter_turns {
            0 => c.name.to_string(),
            r => format!("{}@{}", c.name, 90 * u32::from(r)),
        })
    }

    /// Counter-clockwise quarter turns (0 to 3) applied to class `class`'s examples.
    pub fn class_rotation(&self, class: usize) -> Option<u8> {
        self.classes.get(class).map(|c| c.quarter_turns)
    }

    /// Size of the smallest class (0 for a collection without classes).
    pub fn min_class_len(&self) -> usize {
        self.classes.iter().map(|c| c.rows.len()).min().unwrap_or(0)
    }

    /// The smallest class: its index and size.
    pub(crate) fn smallest_class(&self) -> Option<(usize, usize)> {
        self.classes
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.rows.len()))
            .min_by_key(|&(_, len)| len)
    }

    /// Example `index` of class `class` as seen in episodes (`f32`, rotation applied,
    /// no transform), or `None` if either index is out of range.
    pub fn example(&self, class: usize, index: usize) -> Option<ArrayD<f32>> {
        let c = self.classes.get(class)?;
        if index >= c.rows.len() {
            return None;
        }
        let mut out = ArrayD::zeros(IxDyn(&self.example_shape));
        self.copy_example(
            class,
            index,
            out.as_slice_mut().expect("a fresh array is contiguous"),
        );
        Some(out)
    }

    /// A collection of the given classes, in the given order (they become classes
    /// `0..classes.len()`). The stored array is shared, not copied.
    ///
    /// Errors with [`Error::Config`] for a class index out of range.
    pub fn subset(&self, classes: &[usize]) -> Result<Self> {
        let picked = classes
            .iter()
            .map(|&c| {
                self.classes.get(c).cloned().ok_or_else(|| {
                    Error::Config(format!(
                        "class {c} does not exist (the collection has {} classes)",
                        self.classes.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Collection {
            classes: picked,
            ..self.clone()
        })
    }

    /// Class augmentation with rotations, as in MAML: every class is followed by copies
    /// rotated by 90°, 180° and 270° counter-clockwise, each a class of its own.
    ///
    /// The result has `4 × num_classes` classes, ordered by rotation: class
    /// `c + r × num_classes` is class `c` turned `r` quarter turns (like
    /// `numpy.rot90(image, r)` on each channel). Rotations are applied when examples are
    /// copied into episodes, so no memory is added. Errors with [`Error::Config`] unless
    /// the examples are square images `[C, H, H]`.
    pub fn with_rotations(&self) -> Result<Self> {
        match self.example_shape[..] {
            [_, h, w] if h == w => {}
            _ => {
                return Err(Error::Config(format!(
                    "rotation augmentation needs square images [C, H, H], these examples are {:?}",
                    self.example_shape
                )))
            }
        }
        let classes = (0..4u8)
            .flat_map(|r| {
                self.classes.iter().map(move |c| Class {
                    quarter_turns: (c.quarter_turns + r) % 4,
                    ..c.clone()
                })
            })
            .collect();
        Ok(Collection {
            classes,
            ..self.clone()
        })
    }

    /// Copies example `index` of class `class` (both in range), rotated, as `f32` into
    /// `out` (`example_len` values, in `example_shape` order).
    pub(crate) fn copy_example(&self, class: usize, index: usize, out: &mut [f32]) {
        let c = &self.classes[class];
        let row = c.rows.row(index);
        let len = self.example_len();
        match (&self.examples, c.quarter_turns, self.channels_last) {
            (Examples::F32(a), 0, false) => {
                let flat = a.as_slice().expect("standard layout");
                out.copy_from_slice(&flat[row * len..(row + 1) * len]);
            }
            (Examples::U8(a), 0, false) => {
                let flat = a.as_slice().expect("standard layout");
                for (o, &v) in out.iter_mut().zip(&flat[row * len..(row + 1) * len]) {
                    *o = f32::from(v) / 255.0;
                }
            }
            (Examples::F32(a), turns, _) => {
                let flat = a.as_slice().expect("standard layout");
                self.copy_image(turns, &flat[row * len..(row + 1) * len], |v| v, out);
            }
            (Examples::U8(a), turns, _) => {
                let flat = a.as_slice().expect("standard layout");
                let to_f32 = |v: u8| f32::from(v) / 255.0;
                self.copy_image(turns, &flat[row * len..(row + 1) * len], to_f32, out);
            }
        }
    }

    /// Copies one stored image `src` (`[C, H, W]` or channels-last `[H, W, C]`) into `out`
    /// as `[C, H, W]`, turned `turns` quarter turns counter-clockwise.
    fn copy_image<T: Copy>(
        &self,
        turns: u8,
        src: &[T],
        to_f32: impl Fn(T) -> f32,
        out: &mut [f32],
    ) {
        let [ch, h, w] = self.example_shape[..] else {
            unreachable!("only images [C, H, W] are rotated or stored channels-last")
        };
        if turns == 0 && self.channels_last {
            // The common case of pickled images: [H, W, C] to [C, H, W], plane by plane.
            for (k, plane) in out.chunks_exact_mut(h * w).enumerate() {
                for (o, pixel) in plane.iter_mut().zip(src[k..].iter().step_by(ch)) {
                    *o = to_f32(*pixel);
                }
            }
            return;
        }
        // Stored offset of the source pixel (channel k, row y, column x).
        let offset = |k: usize, y: usize, x: usize| {
            if self.channels_last {
                (y * w + x) * ch + k
            } else {
                (k * h + y) * w + x
            }
        };
        // The rotations of numpy.rot90 (counter-clockwise): out[i][j] = src[y][x].
        let source = |i: usize, j: usize| match turns {
            1 => (j, w - 1 - i),
            2 => (h - 1 - i, w - 1 - j),
            3 => (h - 1 - j, i),
            _ => (i, j),
        };
        for (k, plane) in out.chunks_exact_mut(h * w).enumerate() {
            for (i, out_row) in plane.chunks_exact_mut(w).enumerate() {
                for (j, o) in out_row.iter_mut().enumerate() {
                    let (y, x) = source(i, j);
                    *o = to_f32(src[offset(k, y, x)]);
                }
            }
        }
    }
}

/// The examples in standard layout (copied only when they are not).
fn standard(examples: Examples) -> Examples {
    match examples {
        Examples::U8(a) if !a.is_standard_layout() => {
            Examples::U8(Arc::new(a.as_standard_layout().into_owned()))
        }
        Examples::F32(a) if !a.is_standard_layout() => {
            Examples::F32(Arc::new(a.as_standard_layout().into_owned()))
        }
        e => e,
    }
}

/// Consecutive row ranges of the given sizes, which must add up to `n`.
pub(crate) fn ranges_of_sizes(sizes: &[usize], n: usize) -> Result<Vec<Range<usize>>> {
    let total = sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s));
    if total != Some(n) {
        return Err(Error::Config(format!(
            "class sizes add up to {}, but the collection has {n} examples",
            total.map_or_else(|| "more than usize::MAX".to_string(), |t| t.to_string())
        )));
    }
    let mut start = 0;
    Ok(sizes
        .iter()
        .map(|&s| {
            let range = start..start + s;
            start += s;
            range
        })
        .collect())
}

/// The rows of each label `0..L` (in row order) of `n` rows labelled `labels`.
pub(crate) fn rows_of_labels(labels: &[usize], n: usize) -> Result<Vec<Vec<usize>>> {
    if labels.len() != n {
        return Err(Error::Config(format!(
            "{} labels for {n} examples",
            labels.len()
        )));
    }
    let classes = labels.iter().max().map_or(0, |&m| m + 1);
    if classes > n {
        return Err(Error::Config(format!(
            "label {} is larger than the number of examples ({n}), so some label below it \
             is unused",
            classes - 1
        )));
    }
    let mut rows = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        rows[l].push(i);
    }
    if let Some(c) = rows.iter().position(Vec::is_empty) {
        return Err(Error::Config(format!(
            "label {c} is unused; labels must be 0..{classes} with every label used"
        )));
    }
    Ok(rows)
}
