//! Real MPI jobs (`cargo test --release --features mpi`): the examples under
//! `mpirun -np 1, 2, 3` (oversubscribed) end with bitwise the parameters of a run without
//! MPI, after training, after a resume on another number of ranks, after evaluation, and
//! after a rank is killed and the run resumed from its last checkpoint.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An example binary built beside this test (cargo test builds the examples).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(path.exists(), "{} is not built", path.display());
    path
}

/// `mpirun -np N bin args` (or `bin args` alone for `None`); the RESULT line's JSON.
fn run(np: Option<usize>, bin: &Path, args: &[&str]) -> serde_json::Value {
    let out = command(np, bin, args)
        .output()
        .expect("cannot start mpirun");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{np:?} ranks: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in\n{stdout}"));
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("RESULT ")).count(),
        1,
        "only rank 0 prints"
    );
    serde_json::from_str(line).unwrap()
}

fn command(np: Option<usize>, bin: &Path, args: &[&str]) -> Command {
    let mut c = match np {
        None => Command::new(bin),
        Some(n) => {
            // A hung job fails the test instead of stalling CI.
            let mut c = Command::new("timeout");
            c.args(["300", "mpirun", "-np", &n.to_string(), "--oversubscribe"])
                .arg(bin);
            c
        }
    };
    c.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("metagrad-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sinusoid_digests(r: &serde_json::Value) -> Vec<String> {
    r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["params_digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sinusoid_under_mpirun_is_bitwise_one_process() {
    let bin = example("sinusoid");
    let out = tmp("sine");
    let o = out.to_str().unwrap();
    let args = [
        "--quick",
        "--steps",
        "40",
        "--test-tasks",
        "5",
        "--meta-batch",
        "7",
        "--threads",
        "1",
        "--out",
        o,
    ];
    let want = run(None, &bin, &args);
    for np in [1, 2, 3] {
        let got = run(Some(np), &bin, &args);
        assert_eq!(got["ranks"], np);
        assert_eq!(
            sinusoid_digests(&got),
            sinusoid_digests(&want),
            "{np} ranks"
        );
        assert_eq!(
            got["results"][0]["test_mse_after_steps"],
            want["results"][0]["test_mse_after_steps"]
        );
        if np > 1 {
            let bytes = got["bytes_sent_received"][0].as_u64().unwrap();
            assert!(bytes > 0, "{np} ranks exchanged nothing");
        }
    }
}

fn omniglot_data() -> Option<PathBuf> {
    let d = std::env::var_os("METAGRAD_OMNIGLOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/data/omniglot"));
    d.join("images_background.zip").exists().then_some(d)
}

#[test]
fn omniglot_train_resume_on_other_rank_counts_and_evaluate_bitwise() {
    let Some(data) = omniglot_data() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no Omniglot data under CI"
        );
        eprintln!("skipped: no Omniglot data");
        return;
    };
    let bin = example("omniglot");
    let out = tmp("omni");
    let common = |steps: &'static str, dir: &Path| -> Vec<String> {
        [
            "--data",
            data.to_str().unwrap(),
            "--steps",
            steps,
            "--filters",
            "4",
            "--meta-batch",
            "5",
            "--queries",
            "2",
            "--eval-tasks",
            "7",
            "--threads",
            "1",
            "--out",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let as_refs = |v: &[String]| {
        v.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\u{0}")
    };
    let go = |np: Option<usize>, args: &[String]| {
        let joined = as_refs(args);
        let refs: Vec<&str> = joined.split('\u{0}').collect();
        run(np, &bin, &refs)
    };
    let straight = go(None, &common("4", &out.join("a")));
    let fields = |r: &serde_json::Value| {
        (
            r["params_digest"].clone(),
            r["meta_steps"].clone(),
            r["tests"].clone(),
        )
    };
    // Trained on 2 ranks, 2 steps, checkpointed; resumed to 4 steps on 3 ranks.
    let ck = out.join("ck");
    let mut first = common("2", &out.join("b"));
    first.extend(["--checkpoint-dir".into(), ck.to_str().unwrap().into()]);
    go(Some(2), &first);
    let mut resumed = common("4", &out.join("b"));
    resumed.extend([
        "--checkpoint-dir".into(),
        ck.to_str().unwrap().into(),
        "--resume".into(),
    ]);
    let r = go(Some(3), &resumed);
    assert_eq!(r["ranks"], 3);
    assert_eq!(
        fields(&r).0,
        fields(&straight).0,
        "parameters after resume on 3 ranks"
    );
    assert_eq!(fields(&r).1, fields(&straight).1);
    assert_eq!(
        fields(&r).2,
        fields(&straight).2,
        "evaluation split across 3 ranks"
    );
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_bitwise() {
    let bin = example("sinusoid");
    let out = tmp("kill");
    let o = out.to_str().unwrap();
    let ck = out.join("ck");
    let c = ck.to_str().unwrap();
    let base = [
        "--quick",
        "--train-k",
        "5",
        "--steps",
        "3000",
        "--test-tasks",
        "5",
        "--threads",
        "1",
        "--out",
        o,
        "--checkpoint-dir",
        c,
        "--save-every",
        "100",
    ];
    let want = sinusoid_digests(&run(None, &bin, &base[..11]));

    let mut job = command(Some(2), &bin, &base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = ck.join("checkpoint-k5.json");
    let t0 = Instant::now();
    while !checkpoint.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Kill one rank (a process whose command line starts with the example, unlike
    // mpirun's and timeout's) with SIGKILL.
    let ranks = String::from_utf8(
        Command::new("pgrep")
            .args(["-f", &format!("^{} --quick --train-k 5", bin.display())])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let victim = ranks
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .find(|&p| p as u32 != job.id())
        .expect("a rank process");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let status = job.wait().unwrap();
    assert!(!status.success(), "the job must end when a rank dies");
    // The last checkpoint is intact, and the run resumes from it (on one rank) bitwise.
    metagrad::checkpoint::Checkpoint::<f32>::load(&checkpoint).expect("an intact checkpoint");
    let mut resume = base.to_vec();
    resume.push("--resume");
    let got = run(None, &bin, &resume);
    assert_eq!(sinusoid_digests(&got), want);
}

#[test]
fn ranks_started_with_different_commands_are_refused() {
    let bin = example("sinusoid");
    let out = tmp("mpmd");
    let b = bin.to_str().unwrap();
    let o = out.to_str().unwrap();
    // MPMD: rank 0 with seed 0, rank 1 with seed 1.
    let args = |seed: &'static str| ["--quick", "--steps", "5", "--seed", seed, "--out", o];
    let mut c = Command::new("timeout");
    c.args(["120", "mpirun", "--oversubscribe", "-np", "1", b])
        .args(args("0"))
        .args([":", "-np", "1", b])
        .args(args("1"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ranks with different seeds ran");
    assert_ne!(out.status.code(), Some(124), "the job hung");
    assert!(
        text.contains("command line") && text.contains("rank 1"),
        "{text}"
    );
}
