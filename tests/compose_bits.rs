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

/// Taken at commit 46ca3e6 (hand-written `Mlp` and `Conv4`) by running `cases` there:
/// (label, the digests after MAML, Meta-SGD and Reptile, the parameter names).
#[rustfmt::skip]
const BEFORE: [(&str, [u64; 3], &str); 9] = [
    ("mlp", [0x10603cf45be9cf98, 0x57aa71a656d90ac1, 0x237a28562c1351b7], "l0.w,l0.b,l1.w,l1.b,l2.w,l2.b"),
    ("conv-batch", [0x342a5c5f4d624231, 0x145ef91c3091f762, 0x96881640f3da8ea9], "b0.conv.w,b0.conv.b,b0.norm.gamma,b0.norm.beta,b1.conv.w,b1.conv.b,b1.norm.gamma,b1.norm.beta,b2.conv.w,b2.conv.b,b2.norm.gamma,b2.norm.beta,b3.conv.w,b3.conv.b,b3.norm.gamma,b3.norm.beta,head.w,head.b"),
    ("conv-batch-per-step", [0x495f1e7ec0cc20d5, 0x3a5b0da922303767, 0xb03fdcd3a36d7e43], "b0.conv.w,b0.conv.b,b0.norm.gamma.s0,b0.norm.beta.s0,b0.norm.gamma.s1,b0.norm.beta.s1,b0.norm.gamma.s2,b0.norm.beta.s2,b1.conv.w,b1.conv.b,b1.norm.gamma.s0,b1.norm.beta.s0,b1.norm.gamma.s1,b1.norm.beta.s1,b1.norm.gamma.s2,b1.norm.beta.s2,b2.conv.w,b2.conv.b,b2.norm.gamma.s0,b2.norm.beta.s0,b2.norm.gamma.s1,b2.norm.beta.s1,b2.norm.gamma.s2,b2.norm.beta.s2,b3.conv.w,b3.conv.b,b3.norm.gamma.s0,b3.norm.beta.s0,b3.norm.gamma.s1,b3.norm.beta.s1,b3.norm.gamma.s2,b3.norm.beta.s2,head.w,head.b"),
    ("conv-group", [0x318adeb24cbff659, 0xf9a940d7ec75af57, 0x7b86166f3b56f2cd], "b0.conv.w,b0.conv.b,b0.norm.gamma,b0.norm.beta,b1.conv.w,b1.conv.b,b1.norm.gamma,b1.norm.beta,b2.conv.w,b2.conv.b,b2.norm.gamma,b2.norm.beta,b3.conv.w,b3.conv.b,b3.norm.gamma,b3.norm.beta,head.w,head.b"),
    ("conv-layer", [0x1d6cb917914ae79d, 0xf9bc65148ca2345f, 0x4a61a2a798fd21c7], "b0.conv.w,b0.conv.b,b0.norm.gamma,b0.norm.beta,b1.conv.w,b1.conv.b,b1.norm.gamma,b1.norm.beta,b2.conv.w,b2.conv.b,b2.norm.gamma,b2.norm.beta,b3.conv.w,b3.conv.b,b3.norm.gamma,b3.norm.beta,head.w,head.b"),
    ("conv-instance", [0x716c42601c0aea5a, 0x7668c54045c1cec4, 0x3f177f2e45ae0c10], "b0.conv.w,b0.conv.b,b0.norm.gamma,b0.norm.beta,b1.conv.w,b1.conv.b,b1.norm.gamma,b1.norm.beta,b2.conv.w,b2.conv.b,b2.norm.gamma,b2.norm.beta,b3.conv.w,b3.conv.b,b3.norm.gamma,b3.norm.beta,head.w,head.b"),
    ("conv-tasknorm", [0x169c6900d6f6abe8, 0xe1d7c1f14ffedc3b, 0x7a540920cdf7c97a], "b0.conv.w,b0.conv.b,b0.norm.gamma,b0.norm.beta,b0.norm.scale,b0.norm.offset,b1.conv.w,b1.conv.b,b1.norm.gamma,b1.norm.beta,b1.norm.scale,b1.norm.offset,b2.conv.w,b2.conv.b,b2.norm.gamma,b2.norm.beta,b2.norm.scale,b2.norm.offset,b3.conv.w,b3.conv.b,b3.norm.gamma,b3.norm.beta,b3.norm.scale,b3.norm.offset,head.w,head.b"),
    ("conv-none", [0x92904eecec35a979, 0x22f535892f4ca943, 0x3e2e49821b220d8a], "b0.conv.w,b0.conv.b,b1.conv.w,b1.conv.b,b2.conv.w,b2.conv.b,b3.conv.w,b3.conv.b,head.w,head.b"),
    ("conv-batch-strided", [0xed94f8ab470f975d, 0x44f2ae77cef1b574, 0xc112175e6df0146e], "b0.conv.w,b0.conv.b,b0.norm.gamma,b0.norm.beta,b1.conv.w,b1.conv.b,b1.norm.gamma,b1.norm.beta,b2.conv.w,b2.conv.b,b2.norm.gamma,b2.norm.beta,b3.conv.w,b3.conv.b,b3.norm.gamma,b3.norm.beta,head.w,head.b"),
];

#[test]
fn compositions_keep_the_hand_written_networks_bits_and_names() {
    let got = cases();
    assert_eq!(got.len(), BEFORE.len());
    for ((label, digests, names), (want_label, want_digests, want_names)) in got.iter().zip(BEFORE)
    {
        assert_eq!(label, want_label);
        assert_eq!(names.join(","), want_names, "{label}: parameter names");
        for (method, (d, w)) in ["MAML", "Meta-SGD", "Reptile"]
            .iter()
            .zip(digests.iter().zip(want_digests))
        {
            assert_eq!(
                *d, w,
                "{label}: {method} digest after 3 steps: {d:#018x}, was {w:#018x}"
            );
        }
    }
}
