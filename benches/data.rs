//! Speed and memory of the data path at miniImageNet's size, on data generated here (in a
//! temporary folder, removed at the end; nothing is committed).
//!
//! ```text
//! cargo bench --bench data            # about a minute on 2 cores, 1.3 GB of disk
//! cargo bench --bench data -- --quick # 3,840 images instead of 38,400
//! ```
//!
//! Measures:
//! 1. loading 38,400 84×84×3 images from a pickle in numpy 2's protocol-5 form (renmengye's
//!    `mini-imagenet-cache-train.pkl` layout, 813 MB), and the peak memory of that load;
//! 2. decoding the same number of JPEG files in parallel (a folder of 64 classes);
//! 3. sampling a W4 meta-batch (4 tasks of 5-way 1-shot 15-query = 80 images each), without
//!    and with augmentation (MetaOptNet's, plus normalisation);
//! 4. one W4 training step of MAML's miniImageNet Conv-4 (32 filters, 5 inner steps), to
//!    put the sampling time in proportion.
//!
//! Peak memory is the process's resident high-water mark (`VmHWM`), reset before each phase
//! through `/proc/self/clear_refs`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use metagrad::data::{
    load_image_pickle, Augment, EpisodeSampler, EpisodeSpec, ImageFolder, Normalize, Transforms,
};
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Task};
use metagrad::nn::Conv4;
use rayon::prelude::*;

const SIDE: usize = 84;
const CLASSES: usize = 64;

/// Resident memory high-water mark in MiB, from /proc/self/status.
fn peak_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the high-water mark to the current resident size.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Pixel `j` of image `i`: a class colour plus a pattern, cheap to compute.
fn pixel(i: usize, j: usize, per_class: usize) -> u8 {
    let c = i / per_class;
    ((c * 37 + (j % 3) * 71 + (j / 3) % SIDE + i * 13) % 256) as u8
}

fn text(out: &mut Vec<u8>, t: &str) {
    out.push(0x8c);
    out.push(t.len() as u8);
    out.extend(t.as_bytes());
}

/// Writes renmengye's cache layout as numpy 2 pickles it with protocol 5, streaming the
/// pixels image by image so that the writer holds no copy of the data.
fn write_pickle(path: &Path, n: usize, per_class: usize) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut head = vec![0x80, 5, b'}', b'('];
    text(&mut head, "image_data");
    text(&mut head, "numpy._core.numeric");
    text(&mut head, "_frombuffer");
    head.extend([0x93, b'(', 0x96]);
    head.extend(((n * SIDE * SIDE * 3) as u64).to_le_bytes());
    out.write_all(&head)?;
    let mut image = vec![0u8; SIDE * SIDE * 3];
    for i in 0..n {
        for (j, p) in image.iter_mut().enumerate() {
            *p = pixel(i, j, per_class);
        }
        out.write_all(&image)?;
    }
    let mut tail = Vec::new();
    text(&mut tail, "numpy");
    text(&mut tail, "dtype");
    tail.push(0x93);
    text(&mut tail, "u1");
    tail.extend([0x89, 0x88, 0x87, b'R', b'(', b'K', 3]);
    text(&mut tail, "|");
    tail.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb(");
    for d in [n, SIDE, SIDE, 3] {
        tail.push(b'J');
        tail.extend((d as i32).to_le_bytes());
    }
    tail.push(b't');
    text(&mut tail, "C");
    tail.extend([b't', b'R']);
    text(&mut tail, "class_dict");
    tail.extend([b'}', b'(']);
    for c in 0..n / per_class {
        text(&mut tail, &format!("n{c:08}"));
        tail.extend([b']', b'(']);
        for i in c * per_class..(c + 1) * per_class {
            tail.push(b'J');
            tail.extend((i as i32).to_le_bytes());
        }
        tail.push(b'e');
    }
    tail.extend([b'u', b'u', b'.']);
    out.write_all(&tail)?;
    out.flush()
}

/// Writes `n` JPEG files (quality 90) into `dir/<class>/`, in parallel.
fn write_jpegs(dir: &Path, n: usize, per_class: usize) {
    (0..n).into_par_iter().for_each(|i| {
        let class = dir.join(format!("n{:08}", i / per_class));
        std::fs::create_dir_all(&class).unwrap();
        let pixels: Vec<u8> = (0..SIDE * SIDE * 3)
            .map(|j| pixel(i, j, per_class))
            .collect();
        let encoder =
            jpeg_encoder::Encoder::new_file(class.join(format!("{i:06}.jpg")), 90).unwrap();
        encoder
            .encode(
                &pixels,
                SIDE as u16,
                SIDE as u16,
                jpeg_encoder::ColorType::Rgb,
            )
            .unwrap();
    });
}

/// Mean seconds of `f` over `reps` runs (after one warm-up run).
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    std::hint::black_box(f());
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let per_class = if quick { 60 } else { 600 };
    let n = CLASSES * per_class;
    let dir = std::env::temp_dir().join(format!("metagrad-bench-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let threads = rayon::current_num_threads();
    println!("data bench: {n} images of {SIDE}x{SIDE}x3 in {CLASSES} classes; {threads} thread(s)");

    // 1. The pickle.
    let pickle = dir.join("mini-imagenet-cache-train.pkl");
    let t = Instant::now();
    write_pickle(&pickle, n, per_class).unwrap();
    let bytes = std::fs::metadata(&pickle).unwrap().len();
    println!(
        "  wrote the pickle ({:.0} MB) in {:.1}s",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    reset_peak();
    let before = peak_mb();
    let t = Instant::now();
    let collection = load_image_pickle(&pickle).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let load_peak = peak_mb();
    let data_mb = collection.examples().memory_bytes() as f64 / (1u64 << 20) as f64;
    println!(
        "pickle load: {load_s:.2}s for {} images; u8 data {data_mb:.0} MiB; peak resident {:.0} \
         MiB (before the load: {before:.0} MiB)",
        collection.num_images(),
        load_peak
    );
    std::fs::remove_file(&pickle).unwrap();

    // 3. Sampling a W4 meta-batch, and a W4 step.
    let spec = EpisodeSpec::new(5, 1, 15);
    let mut plain = EpisodeSampler::new(&collection, spec, 1).unwrap();
    let sample_s = time(200, || plain.sample_batch(4).unwrap());
    let mut augmented = EpisodeSampler::new(&collection, spec, 1)
        .unwrap()
        .with_transforms(Transforms {
            augment: Some(Augment::metaoptnet(8)),
            normalize: Some(Normalize::mini_imagenet()),
        })
        .unwrap();
    let augment_s = time(100, || augmented.sample_batch(4).unwrap());
    let model = Conv4 {
        in_channels: 3,
        image_size: SIDE,
        filters: 32,
        ..Conv4::omniglot(5)
    };
    let mut learner = MetaLearner::<f32, _>::new(model, MetaConfig::maml(5, 0.01), 0);
    let mut opt = Optimizer::adam(1e-3);
    let step_s = time(2, || {
        let tasks = Task::<f32>::from_episodes(&plain.sample_batch(4).unwrap());
        learner.meta_step(&tasks, &mut opt).unwrap()
    });
    println!(
        "sample a W4 meta-batch (4 x 80 images): {:.2} ms plain, {:.2} ms augmented + \
         normalised; one W4 MAML step (Conv-4 32 filters, 5 inner steps, second order): {:.2} s \
         -> sampling is {:.3}% / {:.3}% of a step",
        sample_s * 1e3,
        augment_s * 1e3,
        step_s,
        100.0 * sample_s / step_s,
        100.0 * augment_s / step_s
    );
    drop(plain);
    drop(augmented);
    drop(collection);

    // 2. Decoding JPEGs in parallel.
    let jpegs = dir.join("jpegs");
    let t = Instant::now();
    write_jpegs(&jpegs, n, per_class);
    println!("  wrote {n} JPEGs in {:.1}s", t.elapsed().as_secs_f64());
    reset_peak();
    let before = peak_mb();
    let t = Instant::now();
    let decoded = ImageFolder::new(&jpegs, SIDE, SIDE).load().unwrap();
    let decode_s = t.elapsed().as_secs_f64();
    println!(
        "JPEG folder load: {decode_s:.2}s for {} images ({:.0} images/s on {threads} thread(s)); \
         peak resident {:.0} MiB (before the load: {before:.0} MiB)",
        decoded.num_images(),
        decoded.num_images() as f64 / decode_s,
        peak_mb()
    );
    drop(decoded);
    std::fs::remove_dir_all(&dir).unwrap();
}
