//! Per-episode transforms of images: normalisation and augmentation, seeded.
//!
//! [`Transforms`] are given to an [`EpisodeSampler`](super::EpisodeSampler) with
//! [`with_transforms`](super::EpisodeSampler::with_transforms) and applied to every example
//! copied into an episode, after the bytes became `f32` in `[0, 1]`:
//!
//! 1. augmentation ([`Augment`], MetaOptNet's: random crop with zero padding, colour
//!    jitter, horizontal flip), when set;
//! 2. normalisation by per-channel mean and standard deviation ([`Normalize`], with each
//!    benchmark's constants), when set.
//!
//! Both are off by default. Every random choice of an example comes from a generator
//! seeded by the task's seed (drawn from the sampler's generator) and the example's row in
//! the task, so episodes do not depend on the number of threads, and a sampler without
//! augmentation draws exactly the episodes it drew before augmentation existed.
//!
//! Rotations by 90° as new classes are not a transform of examples but of classes: see
//! [`Collection::with_rotations`](super::Collection::with_rotations).

use rand::Rng;

use super::SamplerRng;
use crate::{Error, Result};

/// Normalisation by per-channel mean and standard deviation: `(x - mean[c]) / std[c]`, on
/// values in `[0, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// Mean of each channel.
    pub mean: Vec<f32>,
    /// Standard deviation of each channel.
    pub std: Vec<f32>,
}

/// Channel means of miniImageNet and tieredImageNet on the 0..255 scale (MetaOptNet).
const IMAGENET_MEAN: [f32; 3] = [120.395_86, 115.593_61, 104.540_13];
/// Channel standard deviations of miniImageNet and tieredImageNet on the 0..255 scale.
const IMAGENET_STD: [f32; 3] = [70.681_88, 68.276_35, 72.545_06];
/// Channel means of CIFAR-FS and FC100 on the 0..255 scale (MetaOptNet).
const CIFAR_MEAN: [f32; 3] = [129.377_32, 124.105_84, 112.477_59];
/// Channel standard deviations of CIFAR-FS and FC100 on the 0..255 scale.
const CIFAR_STD: [f32; 3] = [68.209_48, 65.431_24, 70.458_67];

impl Normalize {
    /// Normalisation with the given constants (on the `[0, 1]` scale).
    ///
    /// Errors with [`Error::Config`] when the lengths differ, are zero, or a value is not
    /// finite or a standard deviation not positive.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Self> {
        if mean.is_empty() || mean.len() != std.len() {
            return Err(Error::Config(format!(
                "normalisation needs one mean and one standard deviation per channel, got {} \
                 and {}",
                mean.len(),
                std.len()
            )));
        }
        if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::Config(format!(
                "normalisation constants must be finite with positive deviations, got mean \
                 {mean:?} and std {std:?}"
            )));
        }
        Ok(Normalize { mean, std })
    }

    fn from_255(mean: [f32; 3], std: [f32; 3]) -> Self {
        Normalize {
            mean: mean.iter().map(|m| m / 255.0).collect(),
            std: std.iter().map(|s| s / 255.0).collect(),
        }
    }

    /// miniImageNet's constants (MetaOptNet): mean `[120.40, 115.59, 104.54] / 255`,
    /// std `[70.68, 68.28, 72.55] / 255`.
    pub fn mini_imagenet() -> Self {
        Self::from_255(IMAGENET_MEAN, IMAGENET_STD)
    }

    /// tieredImageNet's constants (MetaOptNet): those of miniImageNet.
    pub fn tiered_imagenet() -> Self {
        Self::mini_imagenet()
    }

    /// CIFAR-FS's constants (MetaOptNet): mean `[129.38, 124.11, 112.48] / 255`,
    /// std `[68.21, 65.43, 70.46] / 255`.
    pub fn cifar_fs() -> Self {
        Self::from_255(CIFAR_MEAN, CIFAR_STD)
    }

    /// FC100's constants (MetaOptNet): those of CIFAR-FS.
    pub fn fc100() -> Self {
        Self::cifar_fs()
    }
}

/// MetaOptNet's augmentation of training images: a random crop of the image padded with
/// `crop_padding` zeros on each side, colour jitter, and a horizontal flip with probability
/// one half.
///
/// Colour jitter scales brightness by a factor drawn uniformly in `[1 - b, 1 + b]`, then
/// contrast (blend with the mean gray level) by one in `[1 - c, 1 + c]`, then saturation
/// (blend with each pixel's gray level, colour images only) by one in `[1 - s, 1 + s]`,
/// clamping to `[0, 1]` after each; the order is fixed (torchvision draws it at random).
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Zeros added on each side before a random crop of the original size (0: no crop).
    pub crop_padding: usize,
    /// Whether to flip horizontally with probability one half.
    pub flip: bool,
    /// Brightness jitter `b` (0: none).
    pub brightness: f32,
    /// Contrast jitter `c` (0: none).
    pub contrast: f32,
    /// Saturation jitter `s` (0: none).
    pub saturation: f32,
}

impl Augment {
    /// MetaOptNet's settings: the given crop padding (8 for 84×84 images, 4 for 32×32),
    /// flips, and jitter 0.4 for brightness, contrast and saturation.
    pub fn metaoptnet(crop_padding: usize) -> Self {
        Augment {
            crop_padding,
            flip: true,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
        }
    }
}

/// What is done to each example of an episode; nothing by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transforms {
    /// Random augmentation, first.
    pub augment: Option<Augment>,
    /// Per-channel normalisation, last.
    pub normalize: Option<Normalize>,
}

impl Transforms {
    /// Whether nothing is done.
    pub fn is_identity(&self) -> bool {
        self.augment.is_none() && self.normalize.is_none()
    }

    /// Checks that the transforms fit examples of shape `example_shape`.
    ///
    /// Errors with [`Error::Config`] when augmentation is asked of examples that are not
    /// images `[C, H, W]`, when jitter factors are negative or not finite, or when the
    /// normalisation has another number of channels than the images (a `[D]` example
    /// counts as one channel).
    pub fn validate(&self, example_shape: &[usize]) -> Result<()> {
        if let Some(a) = &self.augment {
            if example_shape.len() != 3 {
                return Err(Error::Config(format!(
                    "augmentation needs images [C, H, W], these examples are {example_shape:?}"
                )));
            }
            let jitter = [a.brightness, a.contrast, a.saturation];
            if jitter.iter().any(|j| !(j.is_finite() && *j >= 0.0)) {
                return Err(Error::Config(format!(
                    "colour jitter must be finite and non-negative, got {jitter:?}"
                )));
            }
        }
        if let Some(n) = &self.normalize {
            Normalize::new(n.mean.clone(), n.std.clone())?;
            let channels = if example_shape.len() == 3 {
                example_shape[0]
            } else {
                1
            };
            if n.mean.len() != channels {
                return Err(Error::Config(format!(
                    "normalisation has {} channels, the examples {example_shape:?} have {channels}",
                    n.mean.len()
                )));
            }
        }
        Ok(())
    }

    /// Transforms one example in place (`example_shape` validated); `rng` is the example's
    /// own generator and `scratch` a buffer of any size.
    pub(crate) fn apply(
        &self,
        example: &mut [f32],
        example_shape: &[usize],
        rng: &mut SamplerRng,
        scratch: &mut Vec<f32>,
    ) {
        if let (Some(a), &[c, h, w]) = (&self.augment, example_shape) {
            augment(a, example, (c, h, w), rng, scratch);
        }
        if let Some(n) = &self.normalize {
            let plane = example.len() / n.mean.len();
            for ((values, &m), &s) in example.chunks_exact_mut(plane).zip(&n.mean).zip(&n.std) {
                for v in values {
                    *v = (*v - m) / s;
                }
            }
        }
    }
}

/// Crop with padding, jitter and flip of one `[C, H, W]` image.
fn augment(
    a: &Augment,
    image: &mut [f32],
    (c, h, w): (usize, usize, usize),
    rng: &mut SamplerRng,
    scratch: &mut Vec<f32>,
) {
    let p = a.crop_padding;
    if p > 0 {
        // Offsets of the crop in the padded image: out[i][j] = src[i + dy - p][j + dx - p].
        let dy = rng.gen_range(0..=2 * p);
        let dx = rng.gen_range(0..=2 * p);
        scratch.clear();
        scratch.extend_from_slice(image);
        // Output columns j with a source column x = j + dx - p inside the image.
        let j0 = p.saturating_sub(dx);
        let j1 = (w + p).saturating_sub(dx).min(w);
        for k in 0..c {
            for i in 0..h {
                let out = &mut image[(k * h + i) * w..(k * h + i + 1) * w];
                let y = (i + dy).wrapping_sub(p);
                if y >= h || j0 >= j1 {
                    out.fill(0.0);
                    continue;
                }
                let src = &scratch[(k * h + y) * w..(k * h + y + 1) * w];
                out[..j0].fill(0.0);
                out[j0..j1].copy_from_slice(&src[j0 + dx - p..j1 + dx - p]);
                out[j1..].fill(0.0);
            }
        }
    }
    let factor = |rng: &mut SamplerRng, j: f32| {
        if j > 0.0 {
            rng.gen_range((1.0 - j).max(0.0)..=1.0 + j)
        } else {
            1.0
        }
    };
    let brightness = factor(rng, a.brightness);
    let contrast = factor(rng, a.contrast);
    let saturation = factor(rng, a.saturation);
    let plane = h * w;
    if brightness != 1.0 {
        for v in image.iter_mut() {
            *v = (*v * brightness).clamp(0.0, 1.0);
        }
    }
    let gray = |image: &[f32], i: usize| {
        if c == 3 {
            0.299 * image[i] + 0.587 * image[plane + i] + 0.114 * image[2 * plane + i]
        } else {
            image[i]
        }
    };
    if contrast != 1.0 {
        let mean = (0..plane).map(|i| gray(image, i)).sum::<f32>() / plane as f32;
        for v in image.iter_mut() {
            *v = ((*v - mean) * contrast + mean).clamp(0.0, 1.0);
        }
    }
    if saturation != 1.0 && c == 3 {
        for i in 0..plane {
            let g = gray(image, i);
            for k in 0..3 {
                let v = &mut image[k * plane + i];
                *v = ((*v - g) * saturation + g).clamp(0.0, 1.0);
            }
        }
    }
    if a.flip && rng.gen_bool(0.5) {
        for row in image.chunks_exact_mut(w) {
            row.reverse();
        }
    }
}
