//! The dataset loaders on files written by the real tools (`tests/fixtures/make_datasets.py`:
//! Python's pickle with numpy 1 and 2, `numpy.savez`, Pillow's PNG and JPEG encoders), the
//! per-episode transforms, and bad input: every failure a typed error naming the file.
//!
//! Run with `cargo test --release --test datasets`.

use std::path::{Path, PathBuf};

use metagrad::data::{
    load_image_pickle, Augment, Benchmark, Collection, EpisodeSampler, EpisodeSpec, ImageFolder,
    Normalize, Split, Transforms,
};
use metagrad::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets")
}

/// The pixel values of the fixture script.
fn value(c: usize, i: usize, y: usize, x: usize, k: usize) -> u8 {
    ((c * 50 + i * 13 + y * 7 + x * 3 + k * 31) % 256) as u8
}

/// Checks that class `c` of `coll` holds `per_class` images whose pixels are
/// `value(first + c, i, ...)`, exactly.
fn check_exact(coll: &Collection, first: usize, per_class: usize) {
    let [ch, h, w] = coll.example_shape()[..] else {
        panic!("not an image collection: {:?}", coll.example_shape())
    };
    assert_eq!(ch, 3);
    for c in 0..coll.num_classes() {
        assert_eq!(coll.class_len(c), Some(per_class), "class {c}");
        for i in 0..per_class {
            let ex = coll.example(c, i).unwrap();
            for k in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let want = f32::from(value(first + c, i, y, x, k)) / 255.0;
                        assert_eq!(ex[[k, y, x]], want, "class {c} image {i} at {k},{y},{x}");
                    }
                }
            }
        }
    }
}

/// A fresh temporary folder for this test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("metagrad-datasets-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// Every loader on the real tools' files
// ---------------------------------------------------------------------------

#[test]
fn mini_imagenet_renmengye_cache_numpy2_protocols_5_and_4() {
    let splits = Benchmark::MiniImageNet
        .load(fixtures().join("mini-imagenet-cache"))
        .unwrap();
    assert_eq!(splits.train.num_classes(), 3);
    assert_eq!(splits.validation.num_classes(), 2);
    assert_eq!(splits.test.num_classes(), 2);
    assert_eq!(splits.train.example_shape(), &[3, 16, 16]);
    assert_eq!(splits.train.class_name(0).as_deref(), Some("n00001000"));
    assert_eq!(splits.test.class_name(1).as_deref(), Some("n00001006"));
    // Bytes stay bytes: 12 images of 16x16x3.
    assert_eq!(splits.train.examples().memory_bytes(), 12 * 16 * 16 * 3);
    check_exact(&splits.train, 0, 4);
    check_exact(&splits.validation, 3, 4);
    check_exact(&splits.test, 5, 4);
}

#[test]
fn mini_imagenet_metaoptnet_python2_numpy1() {
    let splits = Benchmark::MiniImageNet
        .load(fixtures().join("mini-imagenet-metaoptnet"))
        .unwrap();
    assert_eq!(splits.train.num_classes(), 3);
    assert_eq!(
        splits.validation.class_name(0).as_deref(),
        Some("n00001003")
    );
    check_exact(&splits.train, 0, 4);
    check_exact(&splits.validation, 3, 4);
    check_exact(&splits.test, 5, 4);
}

#[test]
fn tiered_imagenet_npz_and_labels_numpy1() {
    let splits = Benchmark::TieredImageNet
        .load(fixtures().join("tiered-imagenet"))
        .unwrap();
    assert_eq!(splits.train.num_classes(), 3);
    assert_eq!(splits.train.class_name(2).as_deref(), Some("label 2"));
    check_exact(&splits.train, 0, 3);
    check_exact(&splits.validation, 3, 3);
    check_exact(&splits.test, 5, 3);
}

#[test]
fn cifar_fs_numpy2_protocol5_and_fc100_python2() {
    for (benchmark, dir) in [
        (Benchmark::CifarFs, "cifar-fs"),
        (Benchmark::Fc100, "fc100"),
    ] {
        let splits = benchmark.load(fixtures().join(dir)).unwrap();
        assert_eq!(splits.train.example_shape(), &[3, 16, 16]);
        check_exact(&splits.train, 0, 5);
        check_exact(&splits.validation, 3, 5);
        check_exact(&splits.test, 5, 5);
    }
}

#[test]
fn every_protocol_and_numpy_version() {
    for numpy in [1, 2] {
        for protocol in [2, 4, 5] {
            let path = fixtures().join(format!("pickles/np{numpy}-p{protocol}.pkl"));
            let c = load_image_pickle(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.num_classes(), 2, "{}", path.display());
            assert_eq!(c.class_name(1).as_deref(), Some("b"));
            check_exact(&c, 0, 2);
        }
    }
    // Labels as an int64 numpy array.
    let c = load_image_pickle(fixtures().join("pickles/int-array-labels.pkl")).unwrap();
    check_exact(&c, 0, 2);
}

#[test]
fn ravi_csv_split_of_jpegs() {
    let dir = fixtures().join("ravi");
    let splits = Benchmark::MiniImageNet.load(&dir).unwrap();
    assert_eq!(splits.train.num_classes(), 3);
    assert_eq!(splits.validation.num_classes(), 2);
    assert_eq!(splits.test.num_classes(), 2);
    assert_eq!(splits.train.example_shape(), &[3, 84, 84]);
    assert_eq!(splits.train.class_name(2).as_deref(), Some("n00001002"));
    // The JPEGs are 10x10; at their own size they are close to the values written.
    let c = ImageFolder::new(&dir, 10, 10)
        .load_csv(dir.join("val.csv"))
        .unwrap();
    let ex = c.example(1, 2).unwrap();
    let mut total = 0.0f32;
    for k in 0..3 {
        for y in 0..10 {
            for x in 0..10 {
                let want = f32::from(value(4, 2, y, x, k)) / 255.0;
                total += (ex[[k, y, x]] - want).abs();
            }
        }
    }
    // JPEG is lossy (chroma subsampled), and the test pattern is all edges: compare means.
    let mean = total / 300.0;
    assert!(mean < 0.06, "JPEG pixels too far from the source: {mean}");
}

#[test]
fn cifar_fs_bertinetto_folder_with_class_lists() {
    let splits = Benchmark::CifarFs
        .load(fixtures().join("cifar-fs-folder"))
        .unwrap();
    assert_eq!(splits.train.num_classes(), 3);
    assert_eq!(splits.validation.class_name(1).as_deref(), Some("eagle"));
    assert_eq!(splits.test.example_shape(), &[3, 32, 32]);
}

#[test]
fn folder_of_png_and_jpeg_classes() {
    let root = fixtures().join("folder");
    // dog's images are 8x8: at 8x8 its PNGs are exact (image 1 is gray: L = the
    // ITU-R 601 luma of the colour image, the same for the three channels).
    let c = ImageFolder::new(&root, 8, 8).load().unwrap();
    assert_eq!(c.num_classes(), 3);
    let names: Vec<String> = (0..3).map(|i| c.class_name(i).unwrap()).collect();
    assert_eq!(names, ["cat", "dog", "fox"]);
    let ex = c.example(1, 0).unwrap();
    for k in 0..3 {
        for y in 0..8 {
            for x in 0..8 {
                assert_eq!(ex[[k, y, x]], f32::from(value(1, 0, y, x, k)) / 255.0);
            }
        }
    }
    let gray = c.example(1, 1).unwrap();
    assert_eq!(
        gray.slice(ndarray::s![0, .., ..]),
        gray.slice(ndarray::s![2, .., ..])
    );
    // Resizing is deterministic, and grayscale loading gives one channel.
    let a = ImageFolder::new(&root, 5, 7).load().unwrap();
    let b = ImageFolder::new(&root, 5, 7).load().unwrap();
    assert_eq!(a.example(2, 2), b.example(2, 2));
    let g = ImageFolder::new(&root, 5, 7).grayscale().load().unwrap();
    assert_eq!(g.example_shape(), &[1, 5, 7]);
    // A constant image stays constant after resizing.
    let dir = temp_dir("constant");
    std::fs::create_dir_all(dir.join("one")).unwrap();
    image_file(&dir.join("one/a.png"), 13, 9, 77);
    let c = ImageFolder::new(&dir, 4, 6).load().unwrap();
    assert!(c.example(0, 0).unwrap().iter().all(|&v| v == 77.0 / 255.0));
}

/// Writes a constant RGB PNG.
fn image_file(path: &Path, w: u32, h: u32, v: u8) {
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(file, w, h);
    encoder.set_color(png::ColorType::Rgb);
    let mut writer = encoder.write_header().unwrap();
    writer
        .write_image_data(&vec![v; (w * h * 3) as usize])
        .unwrap();
}

// ---------------------------------------------------------------------------
// Episodes over byte images, and transforms
// ---------------------------------------------------------------------------

#[test]
fn episodes_of_colour_images_and_their_transforms() {
    let splits = Benchmark::CifarFs
        .load(fixtures().join("cifar-fs"))
        .unwrap();
    let spec = EpisodeSpec::new(3, 2, 3);
    let plain = EpisodeSampler::new(&splits.train, spec, 4)
        .unwrap()
        .sample_batch(2)
        .unwrap();
    assert_eq!(plain.xs.shape(), &[2, 6, 3, 16, 16]);
    assert_eq!(plain.xq.shape(), &[2, 9, 3, 16, 16]);
    // Every example is one of its class's images.
    let ep = plain.episode(0).unwrap();
    for row in 0..6 {
        let class = ep.classes[ep.ys[row]];
        let x = ep.xs.index_axis(ndarray::Axis(0), row).to_owned();
        assert!((0..5).any(|i| splits.train.example(class, i).unwrap() == x));
    }

    // Normalisation draws nothing: same episodes, normalised.
    let norm = Normalize::cifar_fs();
    let normalized = EpisodeSampler::new(&splits.train, spec, 4)
        .unwrap()
        .with_transforms(Transforms {
            normalize: Some(norm.clone()),
            ..Transforms::default()
        })
        .unwrap()
        .sample_batch(2)
        .unwrap();
    assert_eq!(normalized.classes, plain.classes);
    let (a, b) = (plain.xs[[1, 2, 1, 13, 4]], normalized.xs[[1, 2, 1, 13, 4]]);
    assert_eq!(b, (a - norm.mean[1]) / norm.std[1]);

    // Augmentation: seeded, independent of the thread count, different from plain.
    let augmented = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            EpisodeSampler::new(&splits.train, spec, 4)
                .unwrap()
                .with_transforms(Transforms {
                    augment: Some(Augment::metaoptnet(2)),
                    normalize: None,
                })
                .unwrap()
                .sample_batch(4)
                .unwrap()
        })
    };
    let one = augmented(1);
    let three = augmented(3);
    let bits = |x: &ndarray::ArrayD<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&one.xs), bits(&three.xs));
    assert_eq!(bits(&one.xq), bits(&three.xq));
    assert_eq!(one.classes.row(0), plain.classes.row(0));
    assert_ne!(
        one.xs.slice(ndarray::s![0, .., .., .., ..]),
        plain.xs.slice(ndarray::s![0, .., .., .., ..])
    );
    assert!(one.xs.iter().all(|v| (0.0..=1.0).contains(v)));

    // Flip only: every example is an image of its class, or its mirror.
    let flipped = EpisodeSampler::new(&splits.train, spec, 9)
        .unwrap()
        .with_transforms(Transforms {
            augment: Some(Augment {
                crop_padding: 0,
                flip: true,
                brightness: 0.0,
                contrast: 0.0,
                saturation: 0.0,
            }),
            normalize: None,
        })
        .unwrap()
        .sample_batch(8)
        .unwrap();
    let mut mirrored = 0;
    for t in 0..8 {
        let ep = flipped.episode(t).unwrap();
        for row in 0..6 {
            let class = ep.classes[ep.ys[row]];
            let x = ep.xs.index_axis(ndarray::Axis(0), row).to_owned();
            let found = (0..5).find_map(|i| {
                let img = splits.train.example(class, i).unwrap();
                let mut m = img.clone();
                m.invert_axis(ndarray::Axis(2));
                if img == x {
                    Some(false)
                } else if m == x {
                    Some(true)
                } else {
                    None
                }
            });
            mirrored += usize::from(found.expect("an image of the class or its mirror"));
        }
    }
    assert!(mirrored > 5 && mirrored < 43, "{mirrored} of 48 mirrored");

    // Transforms that do not fit are refused.
    let vectors = Collection::from_labels(
        ndarray::Array2::<f32>::zeros((4, 3)).into_dyn(),
        &[0, 0, 1, 1],
    )
    .unwrap();
    let s = EpisodeSampler::new(&vectors, EpisodeSpec::new(2, 1, 1), 0).unwrap();
    assert!(matches!(
        s.clone().with_transforms(Transforms {
            augment: Some(Augment::metaoptnet(1)),
            normalize: None
        }),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        s.with_transforms(Transforms {
            augment: None,
            normalize: Some(Normalize::cifar_fs())
        }),
        Err(Error::Config(_))
    ));
}

#[test]
fn rotations_of_channels_last_colour_images() {
    let c = load_image_pickle(fixtures().join("pickles/np2-p4.pkl")).unwrap();
    let r = c.with_rotations().unwrap();
    assert_eq!(r.num_classes(), 8);
    assert_eq!(r.class_name(2).as_deref(), Some("a@90"));
    let src = c.example(0, 1).unwrap();
    let rot = r.example(2, 1).unwrap();
    // numpy.rot90 per channel: out[i][j] = src[j][W-1-i].
    for k in 0..3 {
        for i in 0..6 {
            for j in 0..6 {
                assert_eq!(rot[[k, i, j]], src[[k, j, 5 - i]]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Bad input: typed errors that name the file and what was expected
// ---------------------------------------------------------------------------

/// The error's message, checked to name `file`.
fn names_file(e: &Error, file: &str) -> String {
    let m = e.to_string();
    assert!(m.contains(file), "{m:?} does not name {file:?}");
    m
}

fn format_error(result: metagrad::Result<Collection>, file: &str, expect: &str) {
    match result {
        Err(e @ Error::Format { .. }) => {
            let m = names_file(&e, file);
            assert!(m.contains(expect), "{m:?} does not say {expect:?}");
        }
        other => panic!("expected Error::Format about {file}, got {other:?}"),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bad_pickles_are_format_errors() {
    let dir = temp_dir("pickles");
    let good = std::fs::read(fixtures().join("pickles/np2-p5.pkl")).unwrap();
    // 1. truncated
    let p = write(&dir, "truncated.pkl", &good[..good.len() / 2]);
    format_error(load_image_pickle(&p), "truncated.pkl", "truncated");
    // 2. corrupt: not a pickle at all
    let p = write(
        &dir,
        "corrupt.pkl",
        b"PK\x03\x04 this is a zip, not a pickle",
    );
    format_error(load_image_pickle(&p), "corrupt.pkl", "not supported");
    // 3. unsupported protocol
    let mut six = good.clone();
    six[1] = 6;
    let p = write(&dir, "protocol6.pkl", &six);
    format_error(load_image_pickle(&p), "protocol6.pkl", "protocol 6");
    // 4. unsupported dtype
    format_error(
        load_image_pickle(fixtures().join("pickles/complex-images.pkl")),
        "complex-images.pkl",
        "not supported",
    );
    // 5. images of another dtype
    format_error(
        load_image_pickle(fixtures().join("pickles/float-images.pkl")),
        "float-images.pkl",
        "expected dtype uint8",
    );
    // 6. wrong rank
    format_error(
        load_image_pickle(fixtures().join("pickles/rank3-images.pkl")),
        "rank3-images.pkl",
        "expected images",
    );
    // 7. label count differs from image count
    format_error(
        load_image_pickle(fixtures().join("pickles/short-labels.pkl")),
        "short-labels.pkl",
        "3 labels for 4 images",
    );
    // 8. out-of-band buffers
    let p = write(&dir, "oob.pkl", b"\x80\x05\x97.");
    format_error(load_image_pickle(&p), "oob.pkl", "out-of-band");
    // 9. a dict without the keys
    let p = write(&dir, "nokeys.pkl", b"\x80\x04}\x94.");
    format_error(load_image_pickle(&p), "nokeys.pkl", "the key \"data\"");
    // 10. a class_dict index past the images
    let mut bad_index = std::fs::read(fixtures().join("pickles/np2-p2.pkl")).unwrap();
    // class "b" lists rows 2 and 3 (BININT1 'K' 3): make it 9.
    let at = bad_index
        .windows(2)
        .rposition(|w| w == b"K\x03")
        .expect("the row 3 of class b");
    bad_index[at + 1] = 9;
    let p = write(&dir, "index.pkl", &bad_index);
    format_error(load_image_pickle(&p), "index.pkl", "names image 9");
    // 11. labels that are not integers
    let p = write(
        &dir,
        "strlabels.pkl",
        b"\x80\x02}(X\x04\x00\x00\x00dataNX\x06\x00\x00\x00labelsX\x01\x00\x00\x00xu.",
    );
    format_error(load_image_pickle(&p), "strlabels.pkl", "data");
    // 12. a missing file
    assert!(matches!(
        load_image_pickle(dir.join("absent.pkl")),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn bad_npz_files_are_format_errors() {
    let dir = temp_dir("npz");
    let tiered = fixtures().join("tiered-imagenet");
    for f in [
        "train_labels.pkl",
        "val_images.npz",
        "val_labels.pkl",
        "test_images.npz",
        "test_labels.pkl",
    ] {
        std::fs::copy(tiered.join(f), dir.join(f)).unwrap();
    }
    // 13. a truncated archive
    let good = std::fs::read(tiered.join("train_images.npz")).unwrap();
    write(&dir, "train_images.npz", &good[..good.len() - 100]);
    match Benchmark::TieredImageNet.load_split(&dir, Split::Train) {
        Err(e @ Error::Format { .. }) => {
            names_file(&e, "train_images.npz");
        }
        other => panic!("expected Error::Format, got {other:?}"),
    }
    // 14. an archive without `images`
    let mut zip = zip::ZipWriter::new(std::fs::File::create(dir.join("train_images.npz")).unwrap());
    zip.start_file("pictures.npy", zip::write::SimpleFileOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut zip, b"\x93NUMPY").unwrap();
    zip.finish().unwrap();
    match Benchmark::TieredImageNet.load_split(&dir, Split::Train) {
        Err(e @ Error::Format { .. }) => {
            let m = names_file(&e, "train_images.npz");
            assert!(m.contains("no array \"images\""), "{m}");
        }
        other => panic!("expected Error::Format, got {other:?}"),
    }
}

#[test]
fn bad_folders_and_split_files() {
    let dir = temp_dir("folders");
    // 15. an empty folder
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    match ImageFolder::new(&empty, 8, 8).load() {
        Err(e @ Error::Layout { .. }) => {
            let m = names_file(&e, "empty");
            assert!(m.contains("no class folders"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 16. an empty class folder
    let root = dir.join("emptyclass");
    std::fs::create_dir_all(root.join("a")).unwrap();
    match ImageFolder::new(&root, 8, 8).load() {
        Err(e @ Error::Layout { .. }) => {
            names_file(&e, "emptyclass/a");
        }
        other => panic!("{other:?}"),
    }
    // 17. a non-image file in a class folder
    let root = dir.join("readme");
    std::fs::create_dir_all(root.join("a")).unwrap();
    image_file(&root.join("a/0.png"), 4, 4, 1);
    write(&root, "a/notes.txt", b"hello");
    match ImageFolder::new(&root, 8, 8).load() {
        Err(e @ Error::Layout { .. }) => {
            let m = names_file(&e, "notes.txt");
            assert!(m.contains("not a PNG or JPEG"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 18. a corrupt PNG
    let root = dir.join("badpng");
    write(&root, "a/0.png", b"\x89PNG\r\n\x1a\n garbage");
    match ImageFolder::new(&root, 8, 8).load() {
        Err(e @ Error::Image { .. }) => {
            names_file(&e, "0.png");
        }
        other => panic!("{other:?}"),
    }
    // 19. a corrupt JPEG (a real one, truncated)
    let root = dir.join("badjpg");
    let jpg = std::fs::read(fixtures().join("folder/cat/2.jpg")).unwrap();
    write(&root, "a/0.jpg", &jpg[..jpg.len() / 3]);
    match ImageFolder::new(&root, 8, 8).load() {
        Err(e @ Error::Image { .. }) => {
            names_file(&e, "0.jpg");
        }
        other => panic!("{other:?}"),
    }
    // 20. a file named .png that is no image at all
    let root = dir.join("fakepng");
    write(&root, "a/0.png", b"just text");
    match ImageFolder::new(&root, 8, 8).load() {
        Err(e @ Error::Image { .. }) => {
            let m = names_file(&e, "0.png");
            assert!(m.contains("not a PNG or JPEG"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 21. a CSV naming a missing image
    let ravi = fixtures().join("ravi");
    let csv = write(&dir, "missing.csv", b"filename,label\nnope.jpg,n00001000\n");
    match ImageFolder::new(&ravi, 8, 8).load_csv(&csv) {
        Err(e @ Error::Layout { .. }) => {
            let m = names_file(&e, "missing.csv");
            assert!(m.contains("nope.jpg"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 22. a CSV without its header
    let csv = write(&dir, "header.csv", b"n0000100000000001.jpg,n00001000\n");
    match ImageFolder::new(&ravi, 8, 8).load_csv(&csv) {
        Err(e @ Error::Layout { .. }) => {
            let m = names_file(&e, "header.csv");
            assert!(m.contains("filename,label"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 23. a class list naming a missing class
    let list = write(&dir, "classes.txt", b"cat\nwolf\n");
    match ImageFolder::new(fixtures().join("folder"), 8, 8).load_class_list(&list) {
        Err(e @ Error::Layout { .. }) => {
            let m = names_file(&e, "classes.txt");
            assert!(m.contains("wolf"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 24. a missing split: the train file without the val file
    let mini = dir.join("mini");
    std::fs::create_dir_all(&mini).unwrap();
    std::fs::copy(
        fixtures().join("mini-imagenet-cache/mini-imagenet-cache-train.pkl"),
        mini.join("mini-imagenet-cache-train.pkl"),
    )
    .unwrap();
    assert!(Benchmark::MiniImageNet
        .load_split(&mini, Split::Train)
        .is_ok());
    match Benchmark::MiniImageNet.load(&mini) {
        Err(e @ Error::NotFound { .. }) => {
            let m = names_file(&e, "mini-imagenet-cache-val.pkl");
            assert!(m.contains("renmengye"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // 25. a --data folder with nothing known in it names the expected files
    match Benchmark::Fc100.load(&empty) {
        Err(e @ Error::NotFound { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("FC100_train.pickle") && m.contains("MetaOptNet"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    // 26. a class with fewer examples than shots plus queries names the class
    let c = ImageFolder::new(fixtures().join("folder"), 8, 8)
        .load()
        .unwrap();
    match EpisodeSampler::new(&c, EpisodeSpec::new(2, 2, 2), 0) {
        Err(Error::Config(m)) => assert!(m.contains("cat") && m.contains("2 + 2"), "{m}"),
        other => panic!("{other:?}"),
    }
}
