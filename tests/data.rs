//! Tests of the data module: sinusoid tasks, the episode sampler, the area resize
//! and the Omniglot loader (on the real data at `../shared/data/omniglot`).
//!
//! Run with `cargo test --release --test data`.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use metagrad::data::omniglot::{self, Part};
use metagrad::data::{
    cast, resize_area, EpisodeSampler, EpisodeSpec, ImageCollection, Omniglot, SinusoidConfig,
    SinusoidSampler, SinusoidTask,
};
use metagrad::Error;
use ndarray::{arr2, Array2, Array3, ArrayView2};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `numpy.rot90(image, 1)`, written out with indices: `out[i][j] = src[j][W-1-i]`.
fn rot90(src: ArrayView2<f32>) -> Array2<f32> {
    let (h, w) = src.dim();
    assert_eq!(h, w);
    Array2::from_shape_fn((h, w), |(i, j)| src[[j, w - 1 - i]])
}

/// Example `index` of class `class` of a one-channel image collection, as `[H, W]`.
fn image(collection: &ImageCollection, class: usize, index: usize) -> Option<Array2<f32>> {
    let example = collection.example(class, index)?;
    Some(
        example
            .index_axis_move(ndarray::Axis(0), 0)
            .into_dimensionality()
            .unwrap(),
    )
}

/// A fresh, empty temporary folder unique to this process and test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("metagrad-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A valid 8-bit grayscale PNG of the given size.
fn png_bytes(width: u32, height: u32, value: u8) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer
            .write_image_data(&vec![value; (width * height) as usize])
            .unwrap();
    }
    out
}

/// 20 classes of 10 images, 3×3 pixels; every pixel of image `i` holds `i`, so an
/// episode row tells which stored image it is (class = id / 10).
fn toy_collection() -> ImageCollection {
    let images = Array3::from_shape_fn((200, 3, 3), |(i, _, _)| i as f32);
    ImageCollection::from_class_sizes(images, &[10; 20]).unwrap()
}

// ---------------------------------------------------------------------------
// Sinusoid
// ---------------------------------------------------------------------------

#[test]
fn sinusoid_task_shapes_ranges_and_targets() {
    let mut sampler = SinusoidSampler::new(5, 7, 3).unwrap();
    for _ in 0..200 {
        let task = sampler.sample_task();
        assert_eq!(task.x_support.shape(), &[5, 1]);
        assert_eq!(task.y_support.shape(), &[5, 1]);
        assert_eq!(task.x_query.shape(), &[7, 1]);
        assert_eq!(task.y_query.shape(), &[7, 1]);
        assert!((0.1..=5.0).contains(&task.amplitude));
        assert!((0.0..=std::f32::consts::PI).contains(&task.phase));
        for (x, y) in task
            .x_support
            .iter()
            .zip(&task.y_support)
            .chain(task.x_query.iter().zip(&task.y_query))
        {
            assert!((-5.0..=5.0).contains(x));
            assert_eq!(*y, task.amplitude * (x - task.phase).sin());
        }
    }
}

#[test]
fn sinusoid_batch_is_stacked_tasks_and_reproducible() {
    let batch = SinusoidSampler::new(10, 4, 11)
        .unwrap()
        .sample_batch(6)
        .unwrap();
    assert_eq!(batch.xs.shape(), &[6, 10, 1]);
    assert_eq!(batch.ys.shape(), &[6, 10, 1]);
    assert_eq!(batch.xq.shape(), &[6, 4, 1]);
    assert_eq!(batch.yq.shape(), &[6, 4, 1]);
    assert_eq!(batch.len(), 6);

    // Same seed, task by task: identical.
    let mut again = SinusoidSampler::new(10, 4, 11).unwrap();
    for t in 0..6 {
        assert_eq!(batch.task(t).unwrap(), again.sample_task());
    }
    assert!(batch.task(6).is_none());

    // Another seed: different tasks.
    let other = SinusoidSampler::new(10, 4, 12)
        .unwrap()
        .sample_batch(6)
        .unwrap();
    assert_ne!(batch.xs, other.xs);
    assert_ne!(batch.amplitudes, other.amplitudes);

    // Tasks differ from each other within a batch.
    assert_ne!(batch.amplitudes[0], batch.amplitudes[1]);
}

#[test]
fn sinusoid_curve_and_errors() {
    let task = SinusoidTask::sample(
        &mut metagrad::data::rng_from_seed(0),
        &SinusoidConfig::default(),
        3,
        3,
    );
    let (x, y) = task.curve(101);
    assert_eq!(x.shape(), &[101, 1]);
    assert_eq!(x[[0, 0]], -5.0);
    assert_eq!(x[[100, 0]], 5.0);
    assert!((x[[50, 0]]).abs() < 1e-6);
    assert_eq!(y[[50, 0]], task.eval(x[[50, 0]]));

    assert!(matches!(
        SinusoidSampler::new(0, 5, 0),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        SinusoidSampler::new(5, 0, 0),
        Err(Error::Config(_))
    ));
    let bad = SinusoidConfig {
        amplitude: (5.0, 0.1),
        ..SinusoidConfig::default()
    };
    assert!(matches!(
        SinusoidSampler::with_config(bad, 5, 5, 0),
        Err(Error::Config(_))
    ));
    let mut ok = SinusoidSampler::new(5, 5, 0).unwrap();
    assert!(matches!(ok.sample_batch(0), Err(Error::Config(_))));

    // f64 conversion.
    let batch = ok.sample_batch(2).unwrap();
    let xs64: ndarray::Array3<f64> = cast(&batch.xs);
    assert_eq!(xs64[[1, 2, 0]], batch.xs[[1, 2, 0]] as f64);
}

// ---------------------------------------------------------------------------
// Episode sampler
// ---------------------------------------------------------------------------

#[test]
fn episodes_have_distinct_classes_and_exact_counts() {
    let collection = toy_collection();
    let (n, k, q) = (5, 2, 3);
    let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(n, k, q), 5).unwrap();
    for _ in 0..100 {
        let ep = sampler.sample();
        assert_eq!(ep.xs.shape(), &[n * k, 1, 3, 3]);
        assert_eq!(ep.xq.shape(), &[n * q, 1, 3, 3]);
        assert_eq!(ep.ys.len(), n * k);
        assert_eq!(ep.yq.len(), n * q);
        assert_eq!(ep.classes.len(), n);

        // Labels are exactly 0..N, each with K support and Q query examples.
        for label in 0..n {
            assert_eq!(ep.ys.iter().filter(|&&y| y == label).count(), k);
            assert_eq!(ep.yq.iter().filter(|&&y| y == label).count(), q);
        }
        // No class twice in a task.
        let classes: BTreeSet<usize> = ep.classes.iter().copied().collect();
        assert_eq!(classes.len(), n);

        // Every example comes from the class its label names, and no image is used twice.
        let mut seen = HashSet::new();
        for (xs, ys) in [(&ep.xs, &ep.ys), (&ep.xq, &ep.yq)] {
            for (row, &label) in ys.iter().enumerate() {
                let id = xs[[row, 0, 0, 0]] as usize;
                assert!(xs
                    .slice(ndarray::s![row, 0, .., ..])
                    .iter()
                    .all(|&v| v == id as f32));
                assert_eq!(id / 10, ep.classes[label], "image {id} has label {label}");
                assert!(seen.insert(id), "image {id} used twice in one task");
            }
        }
    }
}

#[test]
fn episode_labels_are_permuted_across_tasks() {
    let collection = toy_collection();
    let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(5, 1, 1), 9).unwrap();
    let label_orders: HashSet<Vec<usize>> = (0..30).map(|_| sampler.sample().ys.to_vec()).collect();
    // 5! = 120 possible orders; 30 tasks must show several of them.
    assert!(
        label_orders.len() > 5,
        "labels are not permuted: {label_orders:?}"
    );

    // The label of a given class changes across tasks, too.
    let collection = ImageCollection::from_class_sizes(
        Array3::from_shape_fn((8, 1, 1), |(i, _, _)| i as f32),
        &[2, 2, 2, 2],
    )
    .unwrap();
    let mut sampler = EpisodeSampler::new(&collection, EpisodeSpec::new(4, 1, 1), 1).unwrap();
    let label_of_class0: HashSet<usize> = (0..30)
        .map(|_| {
            let ep = sampler.sample();
            ep.classes.iter().position(|&c| c == 0).unwrap()
        })
        .collect();
    assert!(label_of_class0.len() > 1);
}

#[test]
fn episodes_are_reproducible() {
    let collection = toy_collection();
    let spec = EpisodeSpec::new(4, 3, 2);
    let a = EpisodeSampler::new(&collection, spec, 77)
        .unwrap()
        .sample_batch(16)
        .unwrap();
    let b = EpisodeSampler::new(&collection, spec, 77)
        .unwrap()
        .sample_batch(16)
        .unwrap();
    // Bitwise equality of the images, plus labels and classes.
    let bits = |x: &ndarray::ArrayD<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.xs), bits(&b.xs));
    assert_eq!(bits(&a.xq), bits(&b.xq));
    assert_eq!(a, b);

    let c = EpisodeSampler::new(&collection, spec, 78)
        .unwrap()
        .sample_batch(16)
        .unwrap();
    assert_ne!(a.xs, c.xs);
    assert_ne!(a.classes, c.classes);

    // A batch holds the same tasks as one-by-one sampling.
    let mut one_by_one = EpisodeSampler::new(&collection, spec, 77).unwrap();
    for t in 0..16 {
        assert_eq!(a.episode(t).unwrap(), one_by_one.sample());
    }
    assert!(a.episode(16).is_none());
    assert_eq!(a.xs.shape(), &[16, 12, 1, 3, 3]);
    assert_eq!(a.ys.shape(), &[16, 12]);
    assert_eq!(a.xq.shape(), &[16, 8, 1, 3, 3]);
    assert_eq!(a.yq.shape(), &[16, 8]);
    assert_eq!(a.classes.shape(), &[16, 4]);
}

#[test]
fn episode_configuration_errors() {
    let collection = toy_collection(); // 20 classes of 10
    let message = |spec| match EpisodeSampler::new(&collection, spec, 0) {
        Err(Error::Config(m)) => m,
        other => panic!("expected Error::Config, got {other:?}"),
    };
    let m = message(EpisodeSpec::new(21, 1, 1));
    assert!(m.contains("21") && m.contains("20"), "{m}");
    let m = message(EpisodeSpec::new(5, 6, 5));
    assert!(
        m.contains('6') && m.contains('5') && m.contains("10"),
        "{m}"
    );
    message(EpisodeSpec::new(0, 1, 1));
    message(EpisodeSpec::new(5, 0, 1));
    let m = message(EpisodeSpec::new(5, 1, 0)); // no query set: no meta-loss
    assert!(m.contains("queries = 0"), "{m}");
    message(EpisodeSpec::new(5, usize::MAX, 1)); // overflow of shots + queries
                                                 // Exactly all examples of a class is fine.
    assert!(EpisodeSampler::new(&collection, EpisodeSpec::new(20, 5, 5), 0).is_ok());

    let mut ok = EpisodeSampler::new(&collection, EpisodeSpec::new(2, 1, 1), 0).unwrap();
    assert!(matches!(ok.sample_batch(0), Err(Error::Config(_))));
    assert!(matches!(ok.sample_batch(usize::MAX), Err(Error::Config(_))));

    // Bad collections.
    let images = Array3::<f32>::zeros((10, 2, 2));
    assert!(matches!(
        ImageCollection::from_class_sizes(images.clone(), &[5, 4]),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        ImageCollection::new(images.clone(), vec![0..5, 5..11]),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        ImageCollection::new(images.clone(), vec![0..3, 3..3]),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        ImageCollection::new(Array3::zeros((4, 2, 3)), vec![0..2, 2..4])
            .unwrap()
            .with_rotations(),
        Err(Error::Config(_))
    ));
    let c = ImageCollection::new(images, vec![0..5, 5..10]).unwrap();
    assert!(matches!(c.subset(&[0, 2]), Err(Error::Config(_))));
}

#[test]
fn rotated_classes_are_rotated_images() {
    // 2 classes of 2 images, 3×3, all pixels distinct.
    let images = Array3::from_shape_fn((4, 3, 3), |(i, y, x)| (i * 9 + y * 3 + x) as f32);
    let base = ImageCollection::from_class_sizes(images, &[2, 2]).unwrap();
    let rotated = base.with_rotations().unwrap();
    assert_eq!(rotated.num_classes(), 8);
    assert_eq!(rotated.num_images(), 16);
    for c in 0..2 {
        for j in 0..2 {
            let mut expected = image(&base, c, j).unwrap();
            for r in 0..4 {
                let class = c + r * 2;
                assert_eq!(rotated.class_rotation(class), Some(r as u8));
                assert_eq!(
                    image(&rotated, class, j).unwrap(),
                    expected,
                    "class {c} turn {r}"
                );
                expected = rot90(expected.view());
            }
        }
    }
    assert_eq!(
        image(&base, 0, 0).unwrap(),
        arr2(&[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])
    );
    // numpy.rot90 of that image.
    assert_eq!(
        image(&rotated, 2, 0).unwrap(),
        arr2(&[[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]])
    );
    assert!(image(&rotated, 8, 0).is_none());
    assert!(image(&rotated, 0, 2).is_none());

    // Episodes from the rotated collection carry the rotated pixels.
    let mut sampler = EpisodeSampler::new(&rotated, EpisodeSpec::new(8, 1, 1), 3).unwrap();
    let ep = sampler.sample();
    for row in 0..8 {
        let class = ep.classes[ep.ys[row]];
        let img = ep.xs.slice(ndarray::s![row, 0, .., ..]).to_owned();
        let found = (0..2).any(|j| image(&rotated, class, j).unwrap() == img);
        assert!(found, "row {row} is not an image of class {class}");
    }
}

// ---------------------------------------------------------------------------
// Area resize
// ---------------------------------------------------------------------------

#[test]
fn resize_area_hand_computed_3x3_to_2x2() {
    let image = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]);
    let out = resize_area(image.view(), 2, 2).unwrap();
    // Output pixel (0,0) covers [0,1.5)²: weights 1, .5 / .5, .25 over an area of 2.25.
    let expected = arr2(&[
        [
            (1.0 + 2.0 * 0.5 + 4.0 * 0.5 + 5.0 * 0.25) / 2.25,
            (2.0 * 0.5 + 3.0 + 5.0 * 0.25 + 6.0 * 0.5) / 2.25,
        ],
        [
            (4.0 * 0.5 + 5.0 * 0.25 + 7.0 + 8.0 * 0.5) / 2.25,
            (5.0 * 0.25 + 6.0 * 0.5 + 8.0 * 0.5 + 9.0) / 2.25,
        ],
    ]);
    for (a, b) in out.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-5, "{out} vs {expected}");
    }
    // Mass is preserved up to the area ratio.
    assert!((out.sum() * 2.25 - image.sum()).abs() < 1e-4);
}

#[test]
fn resize_area_properties() {
    // Integral factor: plain block means.
    let image = Array2::from_shape_fn((4, 4), |(y, x)| (y * 4 + x) as f32);
    let out = resize_area(image.view(), 2, 2).unwrap();
    assert_eq!(out, arr2(&[[2.5, 4.5], [10.5, 12.5]]));

    // Omniglot's 105 → 28: constants stay constant, mass scales by (105/28)².
    let constant = Array2::from_elem((105, 105), 0.7f32);
    let out = resize_area(constant.view(), 28, 28).unwrap();
    assert!(out.iter().all(|&v| (v - 0.7).abs() < 1e-5));
    let image = Array2::from_shape_fn((105, 105), |(y, x)| ((y * 31 + x * 17) % 11) as f32 / 10.0);
    let out = resize_area(image.view(), 28, 28).unwrap();
    let scale = (105.0f32 / 28.0).powi(2);
    assert!((out.sum() * scale - image.sum()).abs() / image.sum() < 1e-5);

    // Same size: identity.
    assert_eq!(resize_area(image.view(), 105, 105).unwrap(), image);
    // Non-square and upsampling work; zero sides are errors.
    assert_eq!(resize_area(image.view(), 10, 30).unwrap().dim(), (10, 30));
    assert!(matches!(
        resize_area(image.view(), 0, 3),
        Err(Error::Config(_))
    ));
}

// ---------------------------------------------------------------------------
// Omniglot on the real data
// ---------------------------------------------------------------------------

fn omniglot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/omniglot")
}

/// The full dataset, loaded once for all tests; `None` (with a message) only
/// when the data folder is missing.
fn omniglot() -> Option<&'static Omniglot> {
    static DATA: OnceLock<Option<Omniglot>> = OnceLock::new();
    DATA.get_or_init(|| {
        let path = omniglot_path();
        if !path.exists() {
            // CI always has the data beside the clone: missing there is a failure.
            assert!(
                std::env::var_os("CI").is_none(),
                "Omniglot not found at {} (CI must have ../shared)",
                path.display()
            );
            eprintln!("SKIPPED: Omniglot not found at {}", path.display());
            return None;
        }
        let start = Instant::now();
        let data = Omniglot::load(&path).expect("loading Omniglot");
        eprintln!(
            "loaded {} Omniglot images ({} characters) in {:.2?}",
            data.num_images(),
            data.num_characters(),
            start.elapsed()
        );
        Some(data)
    })
    .as_ref()
}

#[test]
fn omniglot_counts_shape_and_values() {
    let Some(data) = omniglot() else { return };
    assert_eq!(data.num_characters(), 1623);
    assert_eq!(data.part_characters(Part::Background).len(), 964);
    assert_eq!(data.part_characters(Part::Evaluation).len(), 659);
    assert_eq!(data.num_images(), 32_460);
    assert_eq!(data.image_size(), 28);
    assert_eq!(data.images().shape(), &[32_460, 28, 28]);
    assert!(data.images().is_standard_layout());
    for c in 0..data.num_characters() {
        assert_eq!(data.collection().class_len(c), Some(20));
        assert_eq!(data.character_images(c).unwrap().shape(), &[20, 28, 28]);
    }
    let alphabets: BTreeSet<&str> = data
        .characters()
        .iter()
        .map(|c| c.alphabet.as_str())
        .collect();
    assert_eq!(alphabets.len(), 50);
    let first = &data.characters()[0];
    assert_eq!(
        (first.part, first.alphabet.as_str(), first.name.as_str()),
        (Part::Background, "Alphabet_of_the_Magi", "character01")
    );

    let images = data.images();
    assert!(images.iter().all(|&v| (0.0..=1.0).contains(&v)));
    let mean = images.mean().unwrap();
    let max = images.iter().copied().fold(0.0f32, f32::max);
    eprintln!("Omniglot pixel mean {mean:.4}, max {max}");
    assert!(
        mean < 0.3 && mean > 0.01,
        "ink must be high and sparse, mean = {mean}"
    );
    assert!(max > 0.99, "max = {max}");
    // Every image has some ink; the border is mostly background.
    for img in images.outer_iter() {
        assert!(img.sum() > 0.5);
    }
}

#[test]
fn omniglot_rotation_classes() {
    let Some(data) = omniglot() else { return };
    let n = data.num_characters();
    let rotated = data.collection().with_rotations().unwrap();
    assert_eq!(rotated.num_classes(), 4 * n);
    for c in [0, 17, 963, 964, 1622] {
        for j in [0, 19] {
            let original = data
                .character_images(c)
                .unwrap()
                .index_axis(ndarray::Axis(0), j)
                .to_owned();
            assert_eq!(image(&rotated, c, j).unwrap(), original);
            assert_eq!(image(&rotated, c + n, j).unwrap(), rot90(original.view()));
            assert_eq!(
                image(&rotated, c + 2 * n, j).unwrap(),
                rot90(rot90(original.view()).view())
            );
        }
    }
}

#[test]
fn omniglot_splits() {
    let Some(data) = omniglot() else { return };
    let s = data.split_maml(0, 100).unwrap();
    assert_eq!(s.train.num_classes(), 1100);
    assert_eq!(s.validation.num_classes(), 100);
    assert_eq!(s.test.num_classes(), 423);
    let all: BTreeSet<usize> = s
        .train_characters
        .iter()
        .chain(&s.validation_characters)
        .chain(&s.test_characters)
        .copied()
        .collect();
    assert_eq!(all.len(), 1623, "splits overlap or miss characters");
    // The split collections share the one image array.
    assert!(s
        .train
        .examples()
        .same_storage(data.collection().examples()));
    // Class c of a split is its character's images.
    let c = s.test_characters[5];
    assert_eq!(
        image(&s.test, 5, 3).unwrap(),
        data.character_images(c)
            .unwrap()
            .index_axis(ndarray::Axis(0), 3)
    );

    let no_val = data.split_maml(0, 0).unwrap();
    assert_eq!(
        (
            no_val.train.num_classes(),
            no_val.validation.num_classes(),
            no_val.test.num_classes()
        ),
        (1200, 0, 423)
    );
    // The first 1200 are the same characters whatever the validation size.
    assert_eq!(no_val.train_characters[..1100], s.train_characters[..]);

    // Reproducible; another seed shuffles differently.
    let again = data.split_maml(0, 100).unwrap();
    assert_eq!(again.train_characters, s.train_characters);
    assert_eq!(again.test_characters, s.test_characters);
    let other = data.split_maml(1, 100).unwrap();
    assert_ne!(other.train_characters, s.train_characters);

    let official = data.split_official().unwrap();
    assert_eq!(official.train.num_classes(), 964);
    assert_eq!(official.validation.num_classes(), 0);
    assert_eq!(official.test.num_classes(), 659);
    assert!(official
        .train_characters
        .iter()
        .all(|&c| data.characters()[c].part == Part::Background));

    assert!(matches!(
        data.split_random(0, 2000, 0),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        data.split_random(0, 100, 101),
        Err(Error::Config(_))
    ));

    // Episodes from the rotated MAML training split.
    let rotated = s.with_rotations().unwrap();
    assert_eq!(rotated.train.num_classes(), 4400);
    assert_eq!(rotated.test.num_classes(), 4 * 423);
    let mut sampler = EpisodeSampler::new(&rotated.train, EpisodeSpec::new(5, 1, 15), 0).unwrap();
    let batch = sampler.sample_batch(32).unwrap();
    assert_eq!(batch.xs.shape(), &[32, 5, 1, 28, 28]);
    assert_eq!(batch.xq.shape(), &[32, 75, 1, 28, 28]);
    assert!(EpisodeSampler::new(&rotated.train, EpisodeSpec::new(5, 10, 11), 0).is_err());
}

#[test]
fn omniglot_folder_layout_matches_zip() {
    let Some(data) = omniglot() else { return };
    // Extract two characters of the evaluation archive into a folder layout.
    let dir = temp_dir("folder-layout");
    let zip_path = omniglot_path().join("images_evaluation.zip");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();
    let wanted = [
        "images_evaluation/Angelic/character01/",
        "images_evaluation/ULOG/character26/",
    ];
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        if entry.is_file() && wanted.iter().any(|w| name.starts_with(w)) {
            let target = dir.join(&name);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            std::fs::write(target, bytes).unwrap();
        }
    }
    let small = Omniglot::load(&dir).unwrap();
    assert_eq!(small.num_characters(), 2);
    assert_eq!(small.num_images(), 40);
    // Also accepted: the part folder itself.
    let same = Omniglot::load(dir.join("images_evaluation")).unwrap();
    assert_eq!(same.images(), small.images());

    for (i, ch) in small.characters().iter().enumerate() {
        let full = data
            .characters()
            .iter()
            .position(|c| c == ch)
            .expect("character exists in the full load");
        assert_eq!(
            small.character_images(i).unwrap(),
            data.character_images(full).unwrap()
        );
    }
    assert_eq!(small.characters()[1].alphabet, "ULOG");

    // At full resolution pixels are exactly 0 or 1, and resizing them gives the 28×28 images.
    let full_size = Omniglot::load_with(&dir, &[], 105).unwrap();
    assert_eq!(full_size.images().shape(), &[40, 105, 105]);
    assert!(full_size.images().iter().all(|&v| v == 0.0 || v == 1.0));
    for (big, small_image) in full_size
        .images()
        .outer_iter()
        .zip(small.images().outer_iter())
    {
        let resized = resize_area(big, 28, 28).unwrap();
        for (a, b) in resized.iter().zip(small_image) {
            assert!((a.clamp(0.0, 1.0) - b).abs() < 1e-6);
        }
    }
    assert_eq!(small.characters()[1].part, Part::Evaluation);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn omniglot_single_part_and_zip_path() {
    let Some(data) = omniglot() else { return };
    // Only the evaluation part, given as the archive itself.
    let eval = Omniglot::load(omniglot_path().join("images_evaluation.zip")).unwrap();
    assert_eq!(eval.num_characters(), 659);
    assert_eq!(eval.num_images(), 13_180);
    let offset = data.part_characters(Part::Evaluation)[0];
    assert_eq!(offset, 964);
    assert_eq!(
        eval.images(),
        data.images().slice(ndarray::s![964 * 20.., .., ..])
    );
    assert_eq!(eval.characters(), &data.characters()[964..]);
    // The same, asking for the part explicitly.
    let eval2 = Omniglot::load_with(omniglot_path(), &[Part::Evaluation], 28).unwrap();
    assert_eq!(eval2.images(), eval.images());

    assert!(matches!(eval.split_official(), Err(Error::Config(_))));
    assert!(matches!(eval.split_maml(0, 100), Err(Error::Config(_))));
}

// ---------------------------------------------------------------------------
// Omniglot errors
// ---------------------------------------------------------------------------

#[test]
fn omniglot_missing_path_is_not_found_with_hint() {
    let missing = std::env::temp_dir().join("metagrad-surely-missing-omniglot-folder");
    match Omniglot::load(&missing) {
        Err(Error::NotFound { path, hint }) => {
            assert_eq!(path, missing);
            assert!(
                hint.contains("https://github.com/brendenlake/omniglot"),
                "{hint}"
            );
            assert!(
                hint.contains("images_background.zip") && hint.contains("images_evaluation.zip")
            );
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    // An existing folder without any part.
    let empty = temp_dir("empty");
    assert!(matches!(
        Omniglot::load(&empty),
        Err(Error::NotFound { .. })
    ));
    // A requested part that is missing.
    std::fs::create_dir_all(empty.join("images_background/A/character01")).unwrap();
    std::fs::write(
        empty.join("images_background/A/character01/x.png"),
        png_bytes(105, 105, 255),
    )
    .unwrap();
    assert!(Omniglot::load(&empty).is_ok());
    assert!(matches!(
        Omniglot::load_with(&empty, &[Part::Evaluation], 28),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        Omniglot::load_with(&empty, &[], 0),
        Err(Error::Config(_))
    ));
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn omniglot_corrupt_zip() {
    let dir = temp_dir("corrupt-zip");
    std::fs::write(
        dir.join("images_background.zip"),
        b"this is not a zip archive at all",
    )
    .unwrap();
    match Omniglot::load(&dir) {
        Err(Error::Zip { path, message }) => {
            assert_eq!(path, dir.join("images_background.zip"));
            assert!(!message.is_empty());
        }
        other => panic!("expected Error::Zip, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn omniglot_corrupt_png_in_folder_and_zip() {
    let dir = temp_dir("corrupt-png");
    let char_dir = dir.join("images_background/Alpha/character01");
    std::fs::create_dir_all(&char_dir).unwrap();
    std::fs::write(char_dir.join("0001_01.png"), png_bytes(105, 105, 0)).unwrap();
    std::fs::write(char_dir.join("0001_02.png"), b"\x89PNG garbage").unwrap();
    match Omniglot::load(&dir) {
        Err(Error::Image { path, .. }) => assert!(path.ends_with("0001_02.png"), "{path}"),
        other => panic!("expected Error::Image, got {other:?}"),
    }

    // The same inside an archive: the error names `archive.zip!inner/path.png`.
    let zip_dir = temp_dir("corrupt-png-zip");
    let zip_path = zip_dir.join("images_evaluation.zip");
    {
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        writer
            .start_file("images_evaluation/Beta/character01/0002_01.png", options)
            .unwrap();
        writer.write_all(&png_bytes(105, 105, 255)).unwrap();
        writer
            .start_file("images_evaluation/Beta/character01/0002_02.png", options)
            .unwrap();
        writer.write_all(b"not a png").unwrap();
        writer.finish().unwrap();
    }
    match Omniglot::load(&zip_dir) {
        Err(Error::Image { path, message }) => {
            assert!(
                path.ends_with(
                    "images_evaluation.zip!images_evaluation/Beta/character01/0002_02.png"
                ),
                "{path}"
            );
            assert!(!message.is_empty());
        }
        other => panic!("expected Error::Image, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&zip_dir).unwrap();
}

#[test]
fn omniglot_wrong_layout() {
    let expect_layout = |dir: &Path, what: &str| match Omniglot::load(dir) {
        Err(Error::Layout { path, message }) => eprintln!("{what}: {} — {message}", path.display()),
        other => panic!("{what}: expected Error::Layout, got {other:?}"),
    };
    let dir = temp_dir("layout");
    let part = dir.join("images_background");

    // No alphabets.
    std::fs::create_dir_all(&part).unwrap();
    expect_layout(&dir, "no alphabets");

    // A character folder without PNGs.
    let char_dir = part.join("Alpha/character01");
    std::fs::create_dir_all(&char_dir).unwrap();
    std::fs::write(char_dir.join("notes.txt"), "hello").unwrap();
    expect_layout(&dir, "character without PNGs");

    // PNGs in the wrong place: straight in the alphabet folder, no character folders.
    std::fs::remove_dir_all(&part).unwrap();
    std::fs::create_dir_all(part.join("Alpha")).unwrap();
    std::fs::write(part.join("Alpha/0001_01.png"), png_bytes(105, 105, 255)).unwrap();
    expect_layout(&dir, "alphabet without characters");

    // An image of the wrong size.
    std::fs::create_dir_all(&char_dir).unwrap();
    std::fs::write(char_dir.join("0001_01.png"), png_bytes(105, 105, 255)).unwrap();
    std::fs::write(char_dir.join("0001_02.png"), png_bytes(28, 28, 255)).unwrap();
    match Omniglot::load(&dir) {
        Err(Error::Layout { path, message }) => {
            assert!(path.ends_with("0001_02.png"), "{}", path.display());
            assert!(message.contains("28x28"), "{message}");
        }
        other => panic!("expected Error::Layout, got {other:?}"),
    }

    // A zip with PNGs at the wrong depth.
    let zip_dir = temp_dir("layout-zip");
    {
        let mut writer = zip::ZipWriter::new(
            std::fs::File::create(zip_dir.join("images_background.zip")).unwrap(),
        );
        writer
            .start_file(
                "images_background/0001_01.png",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
        writer.write_all(&png_bytes(105, 105, 255)).unwrap();
        writer.finish().unwrap();
    }
    expect_layout(&zip_dir, "zip with a PNG at the wrong depth");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&zip_dir).unwrap();
}

#[test]
fn default_path_prefers_env_var() {
    // Only reads the environment; never sets it (tests run in parallel).
    if let Some(value) = std::env::var_os(omniglot::ENV_VAR) {
        if !value.is_empty() {
            assert_eq!(omniglot::default_path(), Some(PathBuf::from(value)));
        }
    }
}

/// FNV-1a 64 over bytes, continuing from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The digest of `tests/fixtures/omniglot_first_batch.json`: f32 bits of xs then xq,
/// then ys, yq and classes as u64, all little-endian.
fn batch_digest(b: &metagrad::data::EpisodeBatch) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for v in b.xs.iter().chain(b.xq.iter()) {
        h = fnv1a(h, &v.to_bits().to_le_bytes());
    }
    for v in b.ys.iter().chain(b.yq.iter()).chain(b.classes.iter()) {
        h = fnv1a(h, &(*v as u64).to_le_bytes());
    }
    format!("{h:016x}")
}

#[test]
fn omniglot_maml_first_meta_batch_is_bitwise_unchanged() {
    let Some(data) = omniglot() else { return };
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/omniglot_first_batch.json"),
    )
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let splits = data.split_maml(0, 100).unwrap().with_rotations().unwrap();
    // The omniglot example's defaults: seed 0 draws training episodes from seed 1.
    let mut train = EpisodeSampler::with_rng(
        &splits.train,
        EpisodeSpec::new(5, 1, 15),
        metagrad::data::rng_from_seed(1),
    )
    .unwrap();
    let batch = train.sample_batch(32).unwrap();
    assert_eq!(batch.xs.shape(), &[32, 5, 1, 28, 28]);
    let values = |key: &str| -> Vec<f64> {
        fixture[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let classes: Vec<f64> = batch.classes.row(0).iter().map(|&c| c as f64).collect();
    assert_eq!(classes, values("train_classes_0"));
    let ys: Vec<f64> = batch.ys.row(0).iter().map(|&c| c as f64).collect();
    assert_eq!(ys, values("train_ys_0"));
    let row: Vec<f32> = batch.xs.slice(ndarray::s![0, 0, 0, 10, ..]).to_vec();
    let expected: Vec<f32> = values("train_xs_0_row_10")
        .iter()
        .map(|&v| v as f32)
        .collect();
    assert_eq!(row, expected);
    assert_eq!(
        batch_digest(&batch),
        fixture["train_digest"].as_str().unwrap()
    );

    let mut test =
        EpisodeSampler::new(&splits.test, EpisodeSpec::new(5, 1, 15), 20_170_310).unwrap();
    let batch = test.sample_batch(64).unwrap();
    assert_eq!(
        batch_digest(&batch),
        fixture["test_digest"].as_str().unwrap()
    );
}
