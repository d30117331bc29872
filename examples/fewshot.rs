//! MAML on any few-shot image benchmark, or on your own folder of images.
//!
//! ```text
//! cargo run --release --example fewshot -- --dataset mini-imagenet --data ~/data/mini-imagenet
//! cargo run --release --example fewshot -- --dataset cifar-fs --data ~/data/cifar-fs --augment
//! cargo run --release --example fewshot -- --dataset folder --data ~/my-images --image-size 64
//! cargo run --release --example fewshot -- --dataset mini-imagenet --synthetic --steps 5 --eval-tasks 10
//! ```
//!
//! `--dataset` is one of `omniglot`, `mini-imagenet`, `tiered-imagenet`, `cifar-fs`, `fc100`
//! and `folder`; `--data` is the folder holding it (see `docs/datasets.md` for the files
//! each one needs and where to get them; a missing or wrong folder says so too).
//! `--synthetic` writes a small dataset with the real layout and image shapes into a
//! temporary folder (random class-coloured images) and trains on it, so the example runs
//! with no download.
//!
//! The defaults are MAML's settings for each dataset (Finn et al. 2017): for the 84×84 and
//! 32×32 colour datasets, Conv-4 with 32 filters, 5 inner steps at 0.01 in training and 10
//! at test, meta-batch 4, 15 queries, 60,000 steps; for Omniglot, 64 filters, 1 inner step
//! at 0.4 (3 at test), meta-batch 32, training classes augmented with rotations. Every
//! setting is a flag. Evaluation is the 600-task protocol on the test classes, in both
//! batch-norm modes (inductive and transductive). `--augment` turns on MetaOptNet's
//! augmentation of training episodes (random crop with padding, colour jitter, flips);
//! `--normalize` the dataset's per-channel normalisation. Ends with one `RESULT {json}`.

mod common;

use clap::{Parser, ValueEnum};
use metagrad::data::{
    Augment, Benchmark, Collection, EpisodeSampler, EpisodeSpec, ImageFolder, Normalize, Omniglot,
    Split, Transforms,
};
use metagrad::eval::evaluate_episodes;
use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Order};
use metagrad::nn::{Conv4, NormMode};
use metagrad::train::Trainer;
use rand::Rng;
use serde_json::json;
use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Seed of the test episodes, independent of `--seed`.
const TEST_SEED: u64 = 20_170_310;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dataset {
    Omniglot,
    MiniImagenet,
    TieredImagenet,
    CifarFs,
    Fc100,
    Folder,
}

#[derive(Parser, Debug)]
#[command(about = "MAML on Omniglot, miniImageNet, tieredImageNet, CIFAR-FS, FC100 or a folder")]
struct Args {
    /// Which dataset.
    #[arg(long, value_enum)]
    dataset: Dataset,
    /// The folder holding it (see docs/datasets.md).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Generate a small dataset with the real layout instead (no download).
    #[arg(long)]
    synthetic: bool,
    /// MetaOptNet's augmentation of training episodes.
    #[arg(long)]
    augment: bool,
    /// The dataset's per-channel normalisation (MetaOptNet's constants).
    #[arg(long)]
    normalize: bool,
    /// Side of the images of a folder dataset.
    #[arg(long, default_value_t = 84)]
    image_size: usize,
    /// Classes per task (N).
    #[arg(long, default_value_t = 5)]
    ways: usize,
    /// Support examples per class (K).
    #[arg(long, default_value_t = 1)]
    shots: usize,
    /// Query examples per class.
    #[arg(long, default_value_t = 15)]
    queries: usize,
    /// Inner SGD steps in training [default: 5; Omniglot 1].
    #[arg(long)]
    inner_steps: Option<usize>,
    /// Inner SGD steps at test time [default: 10; Omniglot 3].
    #[arg(long)]
    test_steps: Option<usize>,
    /// Inner learning rate [default: 0.01; Omniglot 0.4].
    #[arg(long)]
    inner_lr: Option<f64>,
    /// Outer (Adam) learning rate.
    #[arg(long, default_value_t = 1e-3)]
    outer_lr: f64,
    /// Tasks per meta-batch [default: 4; Omniglot 32].
    #[arg(long)]
    meta_batch: Option<usize>,
    /// Meta-training steps.
    #[arg(long, default_value_t = 60_000)]
    steps: u64,
    /// Filters per convolution [default: 32; Omniglot 64].
    #[arg(long)]
    filters: Option<usize>,
    /// First-order MAML.
    #[arg(long)]
    first_order: bool,
    /// Test tasks.
    #[arg(long, default_value_t = 600)]
    eval_tasks: usize,
    /// Seed of initialisation and training episodes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// The training and test classes, and what describes them.
struct Data {
    train: Collection,
    validation_classes: usize,
    test: Collection,
    normalize: Option<Normalize>,
    crop_padding: usize,
    source: String,
}

fn benchmark(dataset: Dataset) -> Option<Benchmark> {
    match dataset {
        Dataset::MiniImagenet => Some(Benchmark::MiniImageNet),
        Dataset::TieredImagenet => Some(Benchmark::TieredImageNet),
        Dataset::CifarFs => Some(Benchmark::CifarFs),
        Dataset::Fc100 => Some(Benchmark::Fc100),
        Dataset::Omniglot | Dataset::Folder => None,
    }
}

/// Loads the dataset from `dir`.
fn load(args: &Args, dir: &Path) -> Result<Data, Box<dyn Error>> {
    if let Some(b) = benchmark(args.dataset) {
        let splits = b.load(dir)?;
        return Ok(Data {
            train: splits.train,
            validation_classes: splits.validation.num_classes(),
            test: splits.test,
            normalize: Some(b.normalize()),
            crop_padding: b.crop_padding(),
            source: dir.display().to_string(),
        });
    }
    match args.dataset {
        Dataset::Omniglot => {
            let data = Omniglot::load(dir)?;
            // The MAML split needs all 1623 characters; smaller (synthetic) sets keep its
            // proportions: 1100 train, 100 validation, the rest test.
            let n = data.num_characters();
            let splits = if n >= 1200 {
                data.split_maml(0, 100)?
            } else {
                let meta_train = n * 1200 / 1623;
                data.split_random(0, meta_train, meta_train / 12)?
            };
            Ok(Data {
                train: splits.train.with_rotations()?,
                validation_classes: splits.validation.num_classes(),
                test: splits.test,
                normalize: None,
                crop_padding: 3,
                source: dir.display().to_string(),
            })
        }
        _ => {
            // A folder: Ravi-style CSV splits, class lists, or 60/20/20% of the classes.
            let s = args.image_size;
            let folder = ImageFolder::new(dir, s, s);
            let (train, validation, test) = if dir.join("train.csv").is_file() {
                (
                    folder.load_csv(dir.join("train.csv"))?,
                    folder.load_csv(dir.join("val.csv"))?,
                    folder.load_csv(dir.join("test.csv"))?,
                )
            } else if dir.join("train.txt").is_file() {
                (
                    folder.load_class_list(dir.join("train.txt"))?,
                    folder.load_class_list(dir.join("val.txt"))?,
                    folder.load_class_list(dir.join("test.txt"))?,
                )
            } else {
                let all = folder.load()?;
                let n = all.num_classes();
                let (a, b) = (n * 6 / 10, n * 8 / 10);
                let ids: Vec<usize> = (0..n).collect();
                (
                    all.subset(&ids[..a])?,
                    all.subset(&ids[a..b])?,
                    all.subset(&ids[b..])?,
                )
            };
            Ok(Data {
                train,
                validation_classes: validation.num_classes(),
                test,
                normalize: None,
                crop_padding: s / 10,
                source: dir.display().to_string(),
            })
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    let start = Instant::now();
    let omniglot = args.dataset == Dataset::Omniglot;
    let inner_steps = args.inner_steps.unwrap_or(if omniglot { 1 } else { 5 });
    let test_steps = args.test_steps.unwrap_or(if omniglot { 3 } else { 10 });
    let inner_lr = args.inner_lr.unwrap_or(if omniglot { 0.4 } else { 0.01 });
    let meta_batch = args.meta_batch.unwrap_or(if omniglot { 32 } else { 4 });
    let filters = args.filters.unwrap_or(if omniglot { 64 } else { 32 });
    if args.eval_tasks < 2 || meta_batch == 0 || filters == 0 {
        return Err("need --eval-tasks >= 2, --meta-batch >= 1 and --filters >= 1".into());
    }

    let synthetic_dir;
    let dir = if args.synthetic {
        synthetic_dir = std::env::temp_dir().join(format!(
            "metagrad-fewshot-synthetic-{}-{}",
            std::process::id(),
            format!("{:?}", args.dataset).to_lowercase()
        ));
        synthetic::write(args.dataset, &synthetic_dir, args.image_size)?;
        synthetic_dir.clone()
    } else {
        match &args.data {
            Some(d) => d.clone(),
            None => {
                let hint = benchmark(args.dataset).map_or(
                    match args.dataset {
                        Dataset::Omniglot => "images_background.zip and images_evaluation.zip \
                            from https://github.com/brendenlake/omniglot"
                            .to_string(),
                        _ => "a folder of class subfolders of PNG/JPEG images".to_string(),
                    },
                    |b| b.layouts().to_string(),
                );
                return Err(format!(
                    "--data FOLDER is needed (or --synthetic to try without a download): {hint}"
                )
                .into());
            }
        }
    };
    let data = load(args, &dir)?;
    // Check the task shape against both splits before any training.
    let spec = EpisodeSpec::new(args.ways, args.shots, args.queries);
    spec.validate(&data.train)?;
    spec.validate(&data.test)?;
    let load_s = start.elapsed().as_secs_f64();
    let shape = data.train.example_shape().to_vec();
    let [channels, side, width] = shape[..] else {
        return Err(format!("expected images [C, H, W], found {shape:?}").into());
    };
    if side != width {
        return Err(format!("Conv-4 needs square images, these are {side}x{width}").into());
    }
    println!(
        "{:?} from {}: {} training classes ({} examples), {} validation classes (unused), {} \
         test classes; images {channels}x{side}x{side}, stored as {} ({} MB); loaded in {load_s:.2}s",
        args.dataset,
        data.source,
        data.train.num_classes(),
        data.train.num_images(),
        data.validation_classes,
        data.test.num_classes(),
        match data.train.examples() {
            metagrad::data::Examples::U8(_) => "u8",
            metagrad::data::Examples::F32(_) => "f32",
        },
        data.train.examples().memory_bytes() / 1_000_000
    );

    let normalize = if args.normalize {
        data.normalize.clone()
    } else {
        None
    };
    let train_transforms = Transforms {
        augment: args.augment.then(|| Augment::metaoptnet(data.crop_padding)),
        normalize: normalize.clone(),
    };
    let test_transforms = Transforms {
        augment: None,
        normalize,
    };
    let model = Conv4 {
        in_channels: channels,
        image_size: side,
        filters,
        ..Conv4::omniglot(args.ways)
    };
    let order = if args.first_order {
        Order::First
    } else {
        Order::Second
    };
    let config = MetaConfig::maml(inner_steps, inner_lr).with_order(order);
    let mut learner = MetaLearner::<f32, _>::new(model, config, args.seed);
    let mut opt = Optimizer::adam(args.outer_lr);
    let mut sampler = EpisodeSampler::new(&data.train, spec, args.seed.wrapping_add(1))?
        .with_transforms(train_transforms)?;
    println!(
        "{}-way {}-shot, {} queries; Conv-4 with {filters} filters, {} MAML, {inner_steps} \
         inner step(s) at {inner_lr} (test: {test_steps}), Adam {}, meta-batch {meta_batch}, \
         {} steps, augmentation {}, normalisation {}; {} thread(s)",
        args.ways,
        args.shots,
        args.queries,
        if args.first_order {
            "first-order"
        } else {
            "second-order"
        },
        args.outer_lr,
        args.steps,
        if args.augment { "on" } else { "off" },
        if args.normalize { "on" } else { "off" },
        rayon::current_num_threads()
    );

    let summary = Trainer::new(args.steps, meta_batch).run(&mut learner, &mut opt, &mut sampler)?;

    let t1 = Instant::now();
    let mut reports = Vec::new();
    for mode in [NormMode::Inductive, NormMode::Transductive] {
        // The same test episodes for every mode.
        let mut test = EpisodeSampler::new(&data.test, spec, TEST_SEED)?
            .with_transforms(test_transforms.clone())?;
        let report = evaluate_episodes(
            &learner,
            &mut test,
            args.eval_tasks,
            test_steps,
            mode,
            usize::MAX,
        )?;
        println!("test: {report}");
        reports.push(report);
    }
    let eval_s = t1.elapsed().as_secs_f64();
    let result = json!({
        "example": "fewshot",
        "dataset": format!("{:?}", args.dataset).to_lowercase(),
        "synthetic": args.synthetic,
        "data": data.source,
        "method": if args.first_order { "fomaml" } else { "maml-second-order" },
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "image_shape": shape,
        "filters": filters,
        "meta_batch": meta_batch,
        "meta_steps": args.steps,
        "inner_steps": inner_steps,
        "test_steps": test_steps,
        "inner_lr": inner_lr,
        "outer_lr": args.outer_lr,
        "augment": args.augment,
        "normalize": args.normalize,
        "seed": args.seed,
        "threads": rayon::current_num_threads(),
        "train_classes": data.train.num_classes(),
        "test_classes": data.test.num_classes(),
        "train_final_accuracy": summary.final_accuracy,
        "tests": reports.iter().map(|r| json!({
            "mode": r.mode.to_string(),
            "tasks": r.tasks,
            "accuracy": r.mean_accuracy,
            "ci95": r.ci95,
            "loss": r.mean_loss,
            "seed": TEST_SEED,
        })).collect::<Vec<_>>(),
        "load_seconds": load_s,
        "train_seconds": summary.seconds,
        "eval_seconds": eval_s,
        "wall_seconds": start.elapsed().as_secs_f64(),
    });
    println!("RESULT {result}");
    if args.synthetic {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Small datasets with the real layout and image shapes: each class a random colour, each
/// image that colour plus noise, so that there is something to learn.
mod synthetic {
    use super::*;
    use metagrad::data::rng_from_seed;

    /// Classes per split and images per class.
    const CLASSES: [(Split, usize); 3] =
        [(Split::Train, 8), (Split::Validation, 5), (Split::Test, 6)];
    const PER_CLASS: usize = 20;

    /// `n` images `side × side × 3` (bytes, channels last) of class colours, and labels.
    fn images(first_class: usize, classes: usize, side: usize) -> (Vec<u8>, Vec<usize>) {
        let mut rng = rng_from_seed(first_class as u64);
        let mut pixels = Vec::with_capacity(classes * PER_CLASS * side * side * 3);
        let mut labels = Vec::new();
        for c in 0..classes {
            let colour: [u8; 3] = rng.gen();
            for _ in 0..PER_CLASS {
                for _ in 0..side * side {
                    for &v in &colour {
                        pixels.push(v.saturating_add(rng.gen_range(0..40)));
                    }
                }
                labels.push(first_class + c);
            }
        }
        (pixels, labels)
    }

    /// A short string (`SHORT_BINUNICODE`).
    fn text(out: &mut Vec<u8>, t: &str) {
        out.push(0x8c);
        out.push(t.len() as u8);
        out.extend(t.as_bytes());
    }

    /// An int (`BININT`).
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }

    /// A uint8 array as numpy 2 pickles it in protocol 5:
    /// `numpy._core.numeric._frombuffer(bytearray, dtype('u1'), shape, 'C')`.
    fn array(out: &mut Vec<u8>, pixels: &[u8], shape: &[usize]) {
        text(out, "numpy._core.numeric");
        text(out, "_frombuffer");
        out.extend([0x93, b'(', 0x96]);
        out.extend((pixels.len() as u64).to_le_bytes());
        out.extend(pixels);
        text(out, "numpy");
        text(out, "dtype");
        out.push(0x93);
        text(out, "u1");
        out.extend([0x89, 0x88, 0x87, b'R', b'(', b'K', 3]);
        text(out, "|");
        out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb(");
        for &d in shape {
            int(out, d);
        }
        out.push(b't');
        text(out, "C");
        out.extend([b't', b'R']);
    }

    /// A list of ints.
    fn int_list(out: &mut Vec<u8>, values: impl Iterator<Item = usize>) {
        out.extend([b']', b'(']);
        for v in values {
            int(out, v);
        }
        out.push(b'e');
    }

    /// A protocol-5 pickle of a dict: `key` → what `write` writes.
    type Entry<'a> = (&'a str, Box<dyn Fn(&mut Vec<u8>) + 'a>);
    fn dict(entries: Vec<Entry<'_>>) -> Vec<u8> {
        let mut p = vec![0x80, 5, b'}', b'('];
        for (key, write) in entries {
            text(&mut p, key);
            write(&mut p);
        }
        p.extend([b'u', b'.']);
        p
    }

    /// MetaOptNet's `{'data': images, 'labels': [int]}`.
    fn labelled(pixels: &[u8], shape: [usize; 4], labels: &[usize]) -> Vec<u8> {
        dict(vec![
            ("data", Box::new(move |p| array(p, pixels, &shape))),
            (
                "labels",
                Box::new(move |p| int_list(p, labels.iter().copied())),
            ),
        ])
    }

    /// renmengye's `{'image_data': images, 'class_dict': {wnid: [row]}}`.
    fn cache(pixels: &[u8], shape: [usize; 4], labels: &[usize]) -> Vec<u8> {
        dict(vec![
            ("image_data", Box::new(move |p| array(p, pixels, &shape))),
            (
                "class_dict",
                Box::new(move |p| {
                    p.extend([b'}', b'(']);
                    let mut classes = labels.to_vec();
                    classes.dedup();
                    for c in classes {
                        text(p, &format!("n{c:08}"));
                        let rows = labels.iter().enumerate().filter(|(_, &l)| l == c);
                        int_list(p, rows.map(|(i, _)| i));
                    }
                    p.push(b'u');
                }),
            ),
        ])
    }

    /// Writes an 8-bit PNG (`channels` 1 or 3) of `pixels` (channels last).
    fn png(path: &Path, side: usize, channels: usize, pixels: &[u8]) -> Result<(), Box<dyn Error>> {
        let file = std::fs::File::create(path)?;
        let mut e = png::Encoder::new(std::io::BufWriter::new(file), side as u32, side as u32);
        e.set_color(if channels == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        e.write_header()?.write_image_data(pixels)?;
        Ok(())
    }

    /// Writes a synthetic `dataset` into `dir` (replacing what is there).
    pub fn write(dataset: Dataset, dir: &Path, folder_side: usize) -> Result<(), Box<dyn Error>> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let mut first = 0;
        for (split, classes) in CLASSES {
            let s = split.short_name();
            let side = match dataset {
                Dataset::CifarFs | Dataset::Fc100 => 32,
                Dataset::Folder => folder_side,
                _ => 84,
            };
            let (pixels, labels) = images(first, classes, side);
            let n = labels.len();
            match dataset {
                Dataset::MiniImagenet => {
                    std::fs::write(
                        dir.join(format!("mini-imagenet-cache-{s}.pkl")),
                        cache(&pixels, [n, side, side, 3], &labels),
                    )?;
                }
                Dataset::CifarFs | Dataset::Fc100 => {
                    let prefix = if dataset == Dataset::CifarFs {
                        "CIFAR_FS"
                    } else {
                        "FC100"
                    };
                    std::fs::write(
                        dir.join(format!("{prefix}_{s}.pickle")),
                        labelled(&pixels, [n, side, side, 3], &labels),
                    )?;
                }
                Dataset::TieredImagenet => {
                    // numpy.savez: a zip holding images.npy.
                    let file = std::fs::File::create(dir.join(format!("{s}_images.npz")))?;
                    let mut zip = zip::ZipWriter::new(file);
                    zip.start_file("images.npy", zip::write::SimpleFileOptions::default())?;
                    let mut header = format!(
                        "{{'descr': '|u1', 'fortran_order': False, 'shape': ({n}, {side}, {side}, 3), }}"
                    );
                    while (10 + header.len() + 1) % 64 != 0 {
                        header.push(' ');
                    }
                    header.push('\n');
                    zip.write_all(b"\x93NUMPY\x01\x00")?;
                    zip.write_all(&(header.len() as u16).to_le_bytes())?;
                    zip.write_all(header.as_bytes())?;
                    zip.write_all(&pixels)?;
                    zip.finish()?;
                    let labels_only = dict(vec![(
                        "labels",
                        Box::new(|p: &mut Vec<u8>| int_list(p, labels.iter().copied())),
                    )]);
                    std::fs::write(dir.join(format!("{s}_labels.pkl")), labels_only)?;
                }
                Dataset::Folder => {
                    // Class folders, and the classes of this split listed in `{split}.txt`.
                    let mut names: Vec<String> =
                        labels.iter().map(|l| format!("class{l:03}")).collect();
                    names.dedup();
                    std::fs::write(dir.join(format!("{s}.txt")), names.join("\n"))?;
                    let bytes = side * side * 3;
                    for (i, &l) in labels.iter().enumerate() {
                        let class = dir.join(format!("class{l:03}"));
                        std::fs::create_dir_all(&class)?;
                        png(
                            &class.join(format!("{i:04}.png")),
                            side,
                            3,
                            &pixels[i * bytes..(i + 1) * bytes],
                        )?;
                    }
                }
                Dataset::Omniglot => {
                    // 105x105 gray drawings in images_background/<alphabet>/<character>/.
                    let (pixels, labels) = images(first, classes * 3, 105);
                    for (i, &l) in labels.iter().enumerate() {
                        let character = dir
                            .join("images_background")
                            .join(format!("Alphabet_{s}"))
                            .join(format!("character{l:03}"));
                        std::fs::create_dir_all(&character)?;
                        let gray: Vec<u8> = pixels[i * 105 * 105 * 3..(i + 1) * 105 * 105 * 3]
                            .chunks_exact(3)
                            .map(|p| p[0])
                            .collect();
                        png(&character.join(format!("{i:04}.png")), 105, 1, &gray)?;
                    }
                    first += classes * 2;
                }
            }
            first += classes;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::main(args.threads, || run(&args))
}
