//! The field's image benchmarks in the formats people have on disk: miniImageNet,
//! tieredImageNet, CIFAR-FS and FC100.
//!
//! [`Benchmark::load`] reads the meta-training, validation and test splits from a
//! folder, recognising the format from the file names (see [`Benchmark::layouts`] and
//! `docs/datasets.md`):
//!
//! | dataset | files in the folder |
//! |---|---|
//! | miniImageNet | `mini-imagenet-cache-{train,val,test}.pkl` (renmengye), or `miniImageNet_category_split_{train_phase_train,val,test}.pickle` (MetaOptNet), or `images/` with `{train,val,test}.csv` (Ravi & Larochelle) |
//! | tieredImageNet | `{train,val,test}_images.npz` with `{train,val,test}_labels.pkl` (MetaOptNet) |
//! | CIFAR-FS | `CIFAR_FS_{train,val,test}.pickle` (MetaOptNet), or `data/<class>/*.png` with `splits/bertinetto/{train,val,test}.txt` |
//! | FC100 | `FC100_{train,val,test}.pickle` (MetaOptNet) |
//!
//! Pickled images stay as the `uint8` `N×H×W×3` array of the file (seen as `[3, H, W]`);
//! classes are named by their wnid or category name when the file has them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::collection::{rows_of_labels, Collection, Examples};
use super::folder::ImageFolder;
use super::formats::{self, entry, image_array_of, labels, pickle::Value, take_image_array};
use super::transform::Normalize;
use crate::{Error, Result};

/// Meta-training, validation and test classes of a dataset.
#[derive(Clone, Debug)]
pub struct Splits {
    /// Meta-training classes.
    pub train: Collection,
    /// Validation classes.
    pub validation: Collection,
    /// Meta-test classes.
    pub test: Collection,
}

/// One of the three splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Meta-training classes.
    Train,
    /// Validation classes.
    Validation,
    /// Meta-test classes.
    Test,
}

impl Split {
    /// All three, in order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// `train`, `val` or `test`, as in the file names.
    pub fn short_name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "val",
            Split::Test => "test",
        }
    }
}

/// An image benchmark of few-shot classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Benchmark {
    /// miniImageNet (Vinyals et al. 2016; split of Ravi & Larochelle 2017): 100 classes of
    /// 600 images, 84×84, split 64/16/20.
    MiniImageNet,
    /// tieredImageNet (Ren et al. 2018): 608 classes, 84×84, split 351/97/160.
    TieredImageNet,
    /// CIFAR-FS (Bertinetto et al. 2019): 100 CIFAR-100 classes of 600 images, 32×32,
    /// split 64/16/20.
    CifarFs,
    /// FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 32×32, 60/20/20.
    Fc100,
}

impl Benchmark {
    /// Its name on the command line: `mini-imagenet`, `tiered-imagenet`, `cifar-fs`, `fc100`.
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::MiniImageNet => "mini-imagenet",
            Benchmark::TieredImageNet => "tiered-imagenet",
            Benchmark::CifarFs => "cifar-fs",
            Benchmark::Fc100 => "fc100",
        }
    }

    /// The benchmark called `name` (see [`name`](Self::name)).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Benchmark::MiniImageNet,
            Benchmark::TieredImageNet,
            Benchmark::CifarFs,
            Benchmark::Fc100,
        ]
        .into_iter()
        .find(|b| b.name() == name)
    }

    /// Side of its images: 84 or 32.
    pub fn image_size(self) -> usize {
        match self {
            Benchmark::MiniImageNet | Benchmark::TieredImageNet => 84,
            Benchmark::CifarFs | Benchmark::Fc100 => 32,
        }
    }

    /// Its per-channel normalisation constants (MetaOptNet's).
    pub fn normalize(self) -> Normalize {
        match self {
            Benchmark::MiniImageNet => Normalize::mini_imagenet(),
            Benchmark::TieredImageNet => Normalize::tiered_imagenet(),
            Benchmark::CifarFs => Normalize::cifar_fs(),
            Benchmark::Fc100 => Normalize::fc100(),
        }
    }

    /// MetaOptNet's crop padding for augmentation: 8 at 84×84, 4 at 32×32.
    pub fn crop_padding(self) -> usize {
        self.image_size() / 10
    }

    /// The layouts accepted, and where people get the files.
    pub fn layouts(self) -> &'static str {
        match self {
            Benchmark::MiniImageNet => {
                "expected one of: mini-imagenet-cache-{train,val,test}.pkl (renmengye's \
                 few-shot-ssl-public, linked from its README); \
                 miniImageNet_category_split_{train_phase_train,val,test}.pickle (MetaOptNet's \
                 README); or images/ with train.csv, val.csv, test.csv (Ravi & Larochelle's \
                 split files from twitter/meta-learning-lstm, images from ImageNet)"
            }
            Benchmark::TieredImageNet => {
                "expected {train,val,test}_images.npz and {train,val,test}_labels.pkl \
                 (MetaOptNet's tieredImageNet, linked from its README)"
            }
            Benchmark::CifarFs => {
                "expected CIFAR_FS_{train,val,test}.pickle (MetaOptNet's README), or data/<class>/*.png \
                 with splits/bertinetto/{train,val,test}.txt (Bertinetto et al.'s R2D2 \
                 repository's script)"
            }
            Benchmark::Fc100 => {
                "expected FC100_{train,val,test}.pickle (MetaOptNet's README)"
            }
        }
    }

    /// Loads the three splits from the folder `dir`.
    ///
    /// Errors: [`Error::NotFound`] (naming the files expected and where to get them) when
    /// `dir` holds no known layout; [`Error::Format`] naming the file for a corrupt or
    /// unexpected file; [`Error::Layout`], [`Error::Image`] for folder layouts.
    pub fn load(self, dir: impl AsRef<Path>) -> Result<Splits> {
        let dir = dir.as_ref();
        Ok(Splits {
            train: self.load_split(dir, Split::Train)?,
            validation: self.load_split(dir, Split::Validation)?,
            test: self.load_split(dir, Split::Test)?,
        })
    }

    /// Loads one split from the folder `dir` (errors as [`load`](Self::load)).
    pub fn load_split(self, dir: impl AsRef<Path>, split: Split) -> Result<Collection> {
        let dir = dir.as_ref();
        let s = split.short_name();
        let not_found = |path: PathBuf| Error::NotFound {
            path,
            hint: format!("{} data not found: {}.", self.name(), self.layouts()),
        };
        if !dir.is_dir() {
            return Err(not_found(dir.to_path_buf()));
        }
        // Any square size is accepted (downscaled copies, small test files).
        let side = None;
        match self {
            Benchmark::MiniImageNet => {
                let cache = dir.join(format!("mini-imagenet-cache-{s}.pkl"));
                let phase = if split == Split::Train {
                    "train_phase_train"
                } else {
                    s
                };
                let metaopt = dir.join(format!("miniImageNet_category_split_{phase}.pickle"));
                let csv = dir.join(format!("{s}.csv"));
                if cache.is_file() {
                    load_class_dict_pickle(&cache, side)
                } else if metaopt.is_file() {
                    load_labelled_pickle(&metaopt, side)
                } else if csv.is_file() {
                    ImageFolder::new(dir, 84, 84).load_csv(&csv)
                } else {
                    Err(not_found(cache))
                }
            }
            Benchmark::TieredImageNet => {
                let images = dir.join(format!("{s}_images.npz"));
                let labels_file = dir.join(format!("{s}_labels.pkl"));
                if !images.is_file() {
                    return Err(not_found(images));
                }
                if !labels_file.is_file() {
                    return Err(not_found(labels_file));
                }
                load_npz_with_labels(&images, &labels_file, side)
            }
            Benchmark::CifarFs | Benchmark::Fc100 => {
                let prefix = if self == Benchmark::CifarFs {
                    "CIFAR_FS"
                } else {
                    "FC100"
                };
                let file = dir.join(format!("{prefix}_{s}.pickle"));
                let list = dir
                    .join("splits")
                    .join("bertinetto")
                    .join(format!("{s}.txt"));
                if file.is_file() {
                    load_labelled_pickle(&file, side)
                } else if self == Benchmark::CifarFs && list.is_file() {
                    ImageFolder::new(dir.join("data"), 32, 32).load_class_list(&list)
                } else {
                    Err(not_found(file))
                }
            }
        }
    }
}

fn format_error(path: &Path, message: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads a pickle of images in either of the two forms of the benchmarks: renmengye's
/// `{'image_data': uint8 N×H×W×3, 'class_dict': {name: [row, ...]}}` (classes sorted by
/// name), or MetaOptNet's `{'data': uint8 N×H×W×3, 'labels': [int, ...]}` with an optional
/// `catname2label` (one class per distinct label, in increasing order). Images stay bytes,
/// seen as `[3, H, W]`.
///
/// Errors: [`Error::NotFound`] for a missing file, [`Error::Format`] naming the file and
/// what was expected for anything else.
pub fn load_image_pickle(path: impl AsRef<Path>) -> Result<Collection> {
    let path = path.as_ref();
    let value = formats::load_pickle(path, "the pickle does not exist")?;
    if value.get("image_data").is_some() {
        class_dict_collection(value, path, None)
    } else {
        labelled_collection(value, path, None)
    }
}

/// renmengye's cache: `{'image_data': uint8 N×84×84×3, 'class_dict': {wnid: [indices]}}`;
/// classes sorted by wnid.
fn load_class_dict_pickle(path: &Path, side: Option<usize>) -> Result<Collection> {
    class_dict_collection(formats::load_pickle(path, "")?, path, side)
}

fn class_dict_collection(mut value: Value, path: &Path, side: Option<usize>) -> Result<Collection> {
    let images = take_image_array(&mut value, "image_data", path, side)?;
    let n = images.shape()[0];
    let Value::Dict(classes) = entry(&value, "class_dict", path)? else {
        return Err(format_error(
            path,
            "class_dict: expected a dict from class name to image indices".into(),
        ));
    };
    let mut named = Vec::new();
    for (k, v) in classes {
        let name = k
            .text()
            .ok_or_else(|| format_error(path, "class_dict: a key is not a string".into()))?;
        let rows = labels(v, &format!("class_dict[{name:?}]"), path)?;
        if let Some(r) = rows.iter().find(|&&r| r as u64 >= n as u64) {
            return Err(format_error(
                path,
                format!("class_dict[{name:?}] names image {r}, but image_data holds {n}"),
            ));
        }
        if rows.is_empty() {
            return Err(format_error(
                path,
                format!("class_dict[{name:?}] lists no image"),
            ));
        }
        named.push((name, rows.into_iter().map(|r| r as usize).collect()));
    }
    if named.is_empty() {
        return Err(format_error(path, "class_dict is empty".into()));
    }
    named.sort_by(|a: &(String, Vec<usize>), b| a.0.cmp(&b.0));
    let (names, rows): (Vec<String>, Vec<Vec<usize>>) = named.into_iter().unzip();
    Collection::from_rows(Examples::U8(Arc::new(images)), true, rows, Some(names))
}

/// MetaOptNet's pickles: `{'data': uint8 N×H×W×3, 'labels': [int], 'catname2label'?}`.
fn load_labelled_pickle(path: &Path, side: Option<usize>) -> Result<Collection> {
    labelled_collection(formats::load_pickle(path, "")?, path, side)
}

fn labelled_collection(mut value: Value, path: &Path, side: Option<usize>) -> Result<Collection> {
    let images = take_image_array(&mut value, "data", path, side)?;
    let raw = labels(entry(&value, "labels", path)?, "labels", path)?;
    let names = value.get("catname2label").and_then(|d| match d {
        Value::Dict(items) => Some(
            items
                .iter()
                .filter_map(|(k, v)| Some((v.ints_one()?, k.text()?)))
                .collect::<Vec<(i64, String)>>(),
        ),
        _ => None,
    });
    labelled(images, raw, names.unwrap_or_default(), path)
}

impl Value {
    /// An int value.
    fn ints_one(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// MetaOptNet's tieredImageNet: `images` of an `.npz`, labels of a pickle (`labels`, or
/// the original `label_specific`, with names in `label_specific_str`).
fn load_npz_with_labels(
    images: &Path,
    labels_file: &Path,
    side: Option<usize>,
) -> Result<Collection> {
    let array = formats::load_npz(images, "images", "")?;
    let inner = PathBuf::from(format!("{}!images.npy", images.display()));
    let data = image_array_of(array, "images", &inner, side)?;
    let value = formats::load_pickle(labels_file, "")?;
    let key = if value.get("labels").is_some() {
        "labels"
    } else {
        "label_specific"
    };
    let raw = labels(entry(&value, key, labels_file)?, key, labels_file)?;
    let names = match value.get("label_specific_str") {
        Some(Value::List(l)) => l
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i as i64, v.text()?)))
            .collect(),
        _ => Vec::new(),
    };
    labelled(data, raw, names, labels_file)
}

/// A collection from images `[N, H, W, C]` and a label per image (any integers): one
/// class per distinct label, in increasing order.
fn labelled(
    images: ndarray::ArrayD<u8>,
    raw: Vec<i64>,
    names: Vec<(i64, String)>,
    path: &Path,
) -> Result<Collection> {
    let n = images.shape()[0];
    if raw.len() != n {
        return Err(format_error(
            path,
            format!(
                "{} labels for {n} images; expected one label per image",
                raw.len()
            ),
        ));
    }
    let mut distinct = raw.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let dense: Vec<usize> = raw
        .iter()
        .map(|l| distinct.binary_search(l).expect("a label of the list"))
        .collect();
    let rows = rows_of_labels(&dense, n).map_err(|e| format_error(path, e.to_string()))?;
    let class_names = distinct
        .iter()
        .map(|l| {
            names
                .iter()
                .find(|(k, _)| k == l)
                .map_or_else(|| format!("label {l}"), |(_, name)| name.clone())
        })
        .collect();
    Collection::from_rows(
        Examples::U8(Arc::new(images)),
        true,
        rows,
        Some(class_names),
    )
}
