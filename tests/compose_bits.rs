//! `Mlp` and `Conv4` are compositions of layers; they keep the parameter names, the bits
//! and the checkpoints they had as hand-written networks. The digests below were taken
//! from the hand-written networks (the commit before composition) after three MAML,
//! Meta-SGD and Reptile steps from the same seeds; each must come out the same.

use metagrad::meta::{InnerRule, MetaConfig, MetaLearner, Optimizer, Targets, Task};
use metagrad::nn::{Conv4, Downsample, Mlp, Model, NormKind, Params};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn sine_tasks(n: usize, seed: u64) -> Vec<Task<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, ph) = (rng.gen_range(0.1..5.0f32), rng.gen_range(0.0..3.0f32));
            let mut pts = |k: usize| {
                let x =
                    ArrayD::from_shape_simple_fn(IxDyn(&[k, 1]), || rng.gen_range(-5.0..5.0f32));
                let y = x.mapv(|x| a * (x - ph).sin());
                (x, Targets::Values(y))
            };
            let (support_x, support_y) = pts(10);
            let (query_x, query_y) = pts(10);
            Task {
                support_x,
                support_y,
                query_x,
                query_y,
            }
        })
        .collect()
}

fn image_tasks(n: usize, channels: usize, size: usize, seed: u64) -> Vec<Task<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut x = |k: usize| {
                ArrayD::from_shape_simple_fn(IxDyn(&[k, channels, size, size]), || {
                    rng.gen_range(-1.0..1.0f32)
                })
            };
            Task {
                support_x: x(3),
                support_y: Targets::Classes(vec![0, 1, 2]),
                query_x: x(6),
                query_y: Targets::Classes(vec![0, 1, 2, 0, 1, 2]),
            }
        })
        .collect()
}

/// One digest over the parameters and the running statistics.
fn state<M: Model<f32>>(l: &MetaLearner<f32, M>) -> u64 {
    let mut p: Params<f32> = l.params.clone();
    for (i, layer) in l.norm.stats.iter().enumerate() {
        for (s, r) in layer.iter().enumerate() {
            p.push(
                format!("running{i}.{s}.mean"),
                ArrayD::from_shape_vec(IxDyn(&[r.mean.len()]), r.mean.clone()).unwrap(),
            );
            p.push(
                format!("running{i}.{s}.var"),
                ArrayD::from_shape_vec(IxDyn(&[r.var.len()]), r.var.clone()).unwrap(),
            );
        }
    }
    p.digest()
}

/// Three steps of each method; the digests after each method, and the names.
fn run<M: Model<f32> + Clone>(
    model: M,
    tasks: &[Task<f32>],
    config: MetaConfig,
) -> (Vec<u64>, Vec<String>) {
    let mut out = Vec::new();
    let names = model.init(0).names().to_vec();
    for method in ["maml", "meta-sgd", "reptile"] {
        let config = match method {
            "meta-sgd" => config.clone().with_rule(InnerRule::MetaSgd),
            _ => config.clone(),
        };
        let mut l = MetaLearner::new(model.clone(), config, 3);
        let mut opt = Optimizer::adam(1e-3);
        for _ in 0..3 {
            if method == "reptile" {
                l.reptile_step(tasks, &mut opt).unwrap();
            } else {
                l.meta_step(tasks, &mut opt).unwrap();
            }
        }
        out.push(state(&l));
    }
    (out, names)
}

fn conv(norm: NormKind, downsample: Downsample) -> Conv4 {
    Conv4 {
        in_channels: 2,
        image_size: 16,
        filters: 4,
        ways: 3,
        norm,
        downsample,
        eps: 1e-5,
    }
}

fn cases() -> Vec<(String, Vec<u64>, Vec<String>)> {
    let mut out = Vec::new();
    let (d, n) = run(
        Mlp::sinusoid(),
        &sine_tasks(4, 1),
        MetaConfig::maml(2, 0.01),
    );
    out.push(("mlp".to_string(), d, n));
    let images = image_tasks(3, 2, 16, 2);
    for (label, norm, down) in [
        (
            "conv-batch",
            NormKind::Batch { per_step: None },
            Downsample::MaxPool,
        ),
        (
            "conv-batch-per-step",
            NormKind::Batch { per_step: Some(3) },
            Downsample::MaxPool,
        ),
        (
            "conv-group",
            NormKind::Group { groups: 2 },
            Downsample::MaxPool,
        ),
        ("conv-layer", NormKind::Layer, Downsample::MaxPool),
        ("conv-instance", NormKind::Instance, Downsample::MaxPool),
        ("conv-tasknorm", NormKind::TaskNorm, Downsample::MaxPool),
        ("conv-none", NormKind::None, Downsample::MaxPool),
        (
            "conv-batch-strided",
            NormKind::Batch { per_step: None },
            Downsample::Strided,
        ),
    ] {
        let mut config = MetaConfig::maml(2, 0.1);
        if label == "conv-batch-per-step" {
            config.multi_step_loss = Some(100);
        }
        let (d, n) = run(conv(norm, down), &images, config);
        out.push((label.to_string(), d, n));
    }
    out
}

#[test]
fn print_digests() {
    for (label, d, n) in cases() {
        println!(
            "(\"{label}\", [{:#018x}, {:#018x}, {:#018x}], {:?}),",
            d[0],
            d[1],
            d[2],
            n.join(",")
        );
    }
}
