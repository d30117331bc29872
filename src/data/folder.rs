//! Your own images: a folder of class subfolders, `root/<class>/*.{png,jpg,jpeg}`, with
//! optional split files.
//!
//! [`ImageFolder`] decodes PNG and JPEG files in parallel, resizes every image to one
//! size by area averaging (the same resampling every run; no resampling for images
//! already of that size) and keeps them as bytes `[C, H, W]` in a [`Collection`] whose
//! classes are named after their folders. Classes and images are sorted by name, so
//! the result is the same on every machine.
//!
//! Which classes to load:
//!
//! * [`load`](ImageFolder::load): every class subfolder;
//! * [`load_class_list`](ImageFolder::load_class_list): the classes named in a text file,
//!   one per line (the split files of CIFAR-FS by Bertinetto et al.);
//! * [`load_csv`](ImageFolder::load_csv): the images of a `filename,label` CSV with a
//!   header (Ravi & Larochelle's miniImageNet `train.csv`, `val.csv`, `test.csv`), found
//!   in `root/images/<filename>`, `root/<label>/<filename>` or `root/<filename>`.
//!
//! # Example: your own folder
//!
//! ```
//! use metagrad::data::{EpisodeSampler, EpisodeSpec, ImageFolder};
//!
//! // A folder with two classes of three 5x4 PNG images each.
//! let root = std::env::temp_dir().join(format!("metagrad-doc-folder-{}", std::process::id()));
//! for class in ["cat", "dog"] {
//!     std::fs::create_dir_all(root.join(class))?;
//!     for i in 0..3u8 {
//!         let file = std::fs::File::create(root.join(class).join(format!("{i}.png")))?;
//!         let mut encoder = png::Encoder::new(file, 5, 4);
//!         encoder.set_color(png::ColorType::Rgb);
//!         let mut writer = encoder.write_header().unwrap();
//!         writer.write_image_data(&[40 * i; 5 * 4 * 3]).unwrap();
//!     }
//! }
//!
//! // Loaded as 8x8 colour images.
//! let collection = ImageFolder::new(&root, 8, 8).load()?;
//! assert_eq!(collection.num_classes(), 2);
//! assert_eq!(collection.class_name(1).as_deref(), Some("dog"));
//! assert_eq!(collection.example_shape(), &[3, 8, 8]);
//!
//! let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(2, 1, 2), 0)?;
//! assert_eq!(sampler.sample().xs.shape(), &[2, 3, 8, 8]);
//! std::fs::remove_dir_all(&root)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::collection::{Collection, Examples};
use super::formats::{decode_image, read_file};
use crate::{Error, Result};

/// A folder of class subfolders of PNG and JPEG images; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    size: (usize, usize),
    channels: usize,
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn layout(path: &Path, message: String) -> Error {
    Error::Layout {
        path: path.to_path_buf(),
        message,
    }
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name == "__MACOSX" || name == "Thumbs.db"
}

fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
}

impl ImageFolder {
    /// The folder at `root`, loaded as colour images resized to `height × width`.
    pub fn new(root: impl AsRef<Path>, height: usize, width: usize) -> Self {
        ImageFolder {
            root: root.as_ref().to_path_buf(),
            size: (height, width),
            channels: 3,
        }
    }

    /// Loads one-channel (gray) images instead: `0.299 R + 0.587 G + 0.114 B`.
    pub fn grayscale(mut self) -> Self {
        self.channels = 1;
        self
    }

    /// Every class subfolder.
    ///
    /// Errors: [`Error::NotFound`] for a missing root, [`Error::Layout`] for a root without
    /// class folders, an empty class folder or a file that is not a PNG or JPEG image,
    /// [`Error::Image`] for an image that cannot be decoded, [`Error::Config`] for a zero
    /// size.
    pub fn load(&self) -> Result<Collection> {
        let classes = self.class_dirs()?;
        self.load_classes(classes.into_iter().collect())
    }

    /// The classes named in `list`, a text file of class names (one per line; blank
    /// lines ignored), in the file's order.
    ///
    /// Errors as [`load`](Self::load), plus [`Error::NotFound`] for a missing list and
    /// [`Error::Layout`] naming the list for a class it names that has no folder.
    pub fn load_class_list(&self, list: impl AsRef<Path>) -> Result<Collection> {
        let list = list.as_ref();
        let text = String::from_utf8(read_file(list, "the class list does not exist")?)
            .map_err(|_| layout(list, "the class list is not UTF-8 text".into()))?;
        let all = self.class_dirs()?;
        let mut classes = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let name = line.trim();
            if name.is_empty() {
                continue;
            }
            let dir = all.get(name).ok_or_else(|| {
                layout(
                    list,
                    format!(
                        "line {} names the class {name:?}, which has no folder in {}",
                        n + 1,
                        self.root.display()
                    ),
                )
            })?;
            classes.push((name.to_string(), dir.clone()));
        }
        if classes.is_empty() {
            return Err(layout(list, "the class list names no class".into()));
        }
        self.load_classes(classes)
    }

    /// The images of a `filename,label` CSV with a header line; classes in order of first
    /// appearance, images in the file's order.
    ///
    /// Errors as [`load`](Self::load), plus [`Error::NotFound`] for a missing CSV and
    /// [`Error::Layout`] naming the CSV for a bad header or line, or an image it names
    /// that is in none of the places searched.
    pub fn load_csv(&self, csv: impl AsRef<Path>) -> Result<Collection> {
        let csv = csv.as_ref();
        let text = String::from_utf8(read_file(csv, "the split CSV does not exist")?)
            .map_err(|_| layout(csv, "the CSV is not UTF-8 text".into()))?;
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, header)) if header.trim() == "filename,label" => {}
            other => {
                return Err(layout(
                    csv,
                    format!(
                        "expected the header line \"filename,label\", found {:?}",
                        other.map(|(_, l)| l)
                    ),
                ))
            }
        }
        self.check_root()?;
        let mut order: Vec<String> = Vec::new();
        let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for (n, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let Some((file, label)) = line.trim().split_once(',') else {
                return Err(layout(
                    csv,
                    format!("line {}: expected filename,label, found {line:?}", n + 1),
                ));
            };
            let candidates = [
                self.root.join("images").join(file),
                self.root.join(label).join(file),
                self.root.join(file),
            ];
            let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
                layout(
                    csv,
                    format!(
                        "line {} names the image {file:?}, which is not in {}/images/, \
                         {}/{label}/ or {}/",
                        n + 1,
                        self.root.display(),
                        self.root.display(),
                        self.root.display()
                    ),
                )
            })?;
            if !files.contains_key(label) {
                order.push(label.to_string());
            }
            files
                .entry(label.to_string())
                .or_default()
                .push(path.clone());
        }
        if order.is_empty() {
            return Err(layout(csv, "the CSV lists no image".into()));
        }
        let classes = order
            .into_iter()
            .map(|name| {
                let f = files.remove(&name).unwrap_or_default();
                (name, f)
            })
            .collect();
        self.decode(classes)
    }

    fn check_root(&self) -> Result<()> {
        if !self.root.is_dir() {
            return Err(Error::NotFound {
                path: self.root.clone(),
                hint: "expected a folder of class subfolders of PNG or JPEG images".into(),
            });
        }
        let (h, w) = self.size;
        if h == 0 || w == 0 || h.saturating_mul(w) > 1 << 24 {
            return Err(Error::Config(format!(
                "images cannot be resized to {h}x{w}"
            )));
        }
        Ok(())
    }

    /// Class folders by name.
    fn class_dirs(&self) -> Result<BTreeMap<String, PathBuf>> {
        self.check_root()?;
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&self.root).map_err(|e| io_error(&self.root, e))? {
            let entry = entry.map_err(|e| io_error(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_hidden(&name) && entry.path().is_dir() {
                out.insert(name, entry.path());
            }
        }
        if out.is_empty() {
            return Err(layout(
                &self.root,
                "no class folders (expected <root>/<class>/*.png|jpg|jpeg)".into(),
            ));
        }
        Ok(out)
    }

    /// Lists each class folder's images, then decodes them.
    fn load_classes(&self, classes: Vec<(String, PathBuf)>) -> Result<Collection> {
        let mut listed = Vec::with_capacity(classes.len());
        for (name, dir) in classes {
            let mut files = Vec::new();
            for entry in fs::read_dir(&dir).map_err(|e| io_error(&dir, e))? {
                let entry = entry.map_err(|e| io_error(&dir, e))?;
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if is_hidden(&file_name) {
                    continue;
                }
                let path = entry.path();
                if !(path.is_file() && is_image(&file_name)) {
                    return Err(layout(
                        &path,
                        "not a PNG or JPEG image (.png, .jpg, .jpeg); class folders hold \
                         only images"
                            .into(),
                    ));
                }
                files.push(path);
            }
            if files.is_empty() {
                return Err(layout(&dir, "class folder without images".into()));
            }
            files.sort();
            listed.push((name, files));
        }
        self.decode(listed)
    }

    /// Decodes every image in parallel into one `[n, C, H, W]` byte array.
    fn decode(&self, classes: Vec<(String, Vec<PathBuf>)>) -> Result<Collection> {
        let (h, w) = self.size;
        let c = self.channels;
        let files: Vec<PathBuf> = classes.iter().flat_map(|(_, f)| f.clone()).collect();
        let mut pixels = vec![0u8; files.len() * c * h * w];
        pixels
            .par_chunks_mut(c * h * w)
            .zip(files.par_iter())
            .try_for_each(|(out, path)| {
                let bytes = read_file(path, "the image disappeared")?;
                decode_image(&bytes, &path.display().to_string(), (h, w), c, out)
            })?;
        let mut start = 0;
        let mut ranges = Vec::new();
        let mut names = Vec::new();
        for (name, f) in classes {
            ranges.push(start..start + f.len());
            start += f.len();
            names.push(name);
        }
        let array = ArrayD::from_shape_vec(IxDyn(&[files.len(), c, h, w]), pixels)
            .expect("n * c * h * w bytes");
        Collection::from_ranges(Examples::U8(Arc::new(array)), false, ranges, Some(names))
    }
}
