//! The `fewshot` example, run briefly on every fixture dataset and on `--synthetic`, as CI
//! does: it must load the data, train, evaluate in both batch-norm modes and print one
//! `RESULT {json}` line. Cargo builds the examples before running tests.
//!
//! Run with `cargo test --release --test fewshot_example`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>/examples/fewshot`, beside this test's own binary.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join("fewshot");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release --example fewshot` (cargo test \
         builds examples)",
        path.display()
    );
    path
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets")
}

/// Runs the example with `args` and a tiny budget; returns its RESULT json.
fn run(args: &[&str]) -> serde_json::Value {
    let small = [
        "--steps",
        "2",
        "--eval-tasks",
        "3",
        "--filters",
        "4",
        "--meta-batch",
        "2",
        "--threads",
        "2",
    ];
    let out = Command::new(example())
        .args(args)
        .args(small)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed:\n{stdout}\n{stderr}");
    let results: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("RESULT "))
        .collect();
    assert_eq!(results.len(), 1, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&results[0]["RESULT ".len()..]).unwrap();
    let tests = json["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 2);
    for t in tests {
        let acc = t["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{t}");
        assert_eq!(t["tasks"], 3);
    }
    json
}

#[test]
fn fewshot_runs_on_every_fixture_dataset() {
    let tiny = [
        "--ways",
        "2",
        "--shots",
        "1",
        "--queries",
        "2",
        "--inner-steps",
        "1",
        "--test-steps",
        "1",
    ];
    for (dataset, dir) in [
        ("mini-imagenet", "mini-imagenet-cache"),
        ("mini-imagenet", "mini-imagenet-metaoptnet"),
        ("mini-imagenet", "ravi"),
        ("tiered-imagenet", "tiered-imagenet"),
        ("cifar-fs", "cifar-fs"),
        ("cifar-fs", "cifar-fs-folder"),
        ("fc100", "fc100"),
    ] {
        let data = fixtures().join(dir);
        let mut args = vec!["--dataset", dataset, "--data", data.to_str().unwrap()];
        args.extend(tiny);
        let json = run(&args);
        assert_eq!(json["test_classes"], 2, "{dir}");
        assert_eq!(json["dataset"], dataset.replace('-', ""), "{dir}");
    }
}

#[test]
fn fewshot_runs_on_synthetic_data_with_augmentation() {
    let json = run(&[
        "--dataset",
        "cifar-fs",
        "--synthetic",
        "--augment",
        "--normalize",
        "--queries",
        "3",
    ]);
    assert_eq!(json["image_shape"], serde_json::json!([3, 32, 32]));
    assert_eq!(json["augment"], true);
    let json = run(&[
        "--dataset",
        "mini-imagenet",
        "--synthetic",
        "--queries",
        "2",
        "--inner-steps",
        "1",
        "--test-steps",
        "1",
    ]);
    assert_eq!(json["image_shape"], serde_json::json!([3, 84, 84]));
    assert_eq!(json["ways"], 5);
}

#[test]
fn fewshot_names_the_expected_files_when_data_is_missing() {
    let out = Command::new(example())
        .args([
            "--dataset",
            "tiered-imagenet",
            "--data",
            "/nonexistent/tiered",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("_images.npz") && stderr.contains("MetaOptNet"),
        "{stderr}"
    );
}
