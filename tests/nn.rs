//! Networks composed from layers: shape errors that name the layer, hooks that come from
//! the composition, statistics filed by the layers (and a refusal when a hand-written
//! model files none), dropout masks seeded per task, step and layer, and adapt-then-predict.

use metagrad::meta::{MetaConfig, MetaLearner, Optimizer, Targets, Task};
use metagrad::nn::{
    Affine, Conv4, Conv6, Ctx, Mlp, Model, Net, NormKind, NormMode, Params, ResNet12, Seq,
};
use metagrad::{Error, Tape, Var};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn noise(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.gen_range(-1.0..1.0))
}

fn image_task(ways: usize, channels: usize, size: usize, seed: u64) -> Task<f64> {
    let classes: Vec<usize> = (0..ways).collect();
    Task {
        support_x: noise(&[ways, channels, size, size], seed),
        support_y: Targets::Classes(classes.clone()),
        query_x: noise(&[2 * ways, channels, size, size], seed + 1),
        query_y: Targets::Classes(classes.iter().chain(&classes).copied().collect()),
    }
}

/// The panic message of `f`.
fn panic_text(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let e = std::panic::catch_unwind(f).expect_err("should panic");
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn forward<M: Model<f64>>(model: &M, x: ArrayD<f64>, ctx: &mut Ctx<'_, f64>) -> ArrayD<f64> {
    let mut t = Tape::new();
    let p = model.init(0).place(&mut t);
    let x = t.constant(x);
    let y = model.forward(&mut t, &p, x, ctx);
    t.value(y).clone()
}

#[test]
fn a_conv4_fed_the_wrong_image_size_names_the_layer_and_both_shapes() {
    let model = Conv4 {
        in_channels: 3,
        image_size: 84,
        filters: 4,
        ..Conv4::omniglot(5)
    };
    let msg = panic_text(|| {
        forward(
            &model,
            ArrayD::zeros(IxDyn(&[2, 3, 28, 28])),
            &mut Ctx::new(NormMode::Train),
        );
    });
    assert!(msg.contains("Conv4"), "{msg}");
    assert!(msg.contains("layer `b0.conv`"), "{msg}");
    assert!(
        msg.contains("expects input [N, 3, 84, 84], got [2, 3, 28, 28]"),
        "{msg}"
    );
    // A 16×16 input to a 28×28 net no longer runs silently either.
    let msg = panic_text(|| {
        forward(
            &Conv4::omniglot(5),
            ArrayD::zeros(IxDyn(&[2, 1, 16, 16])),
            &mut Ctx::new(NormMode::Train),
        );
    });
    assert!(msg.contains("got [2, 1, 16, 16]"), "{msg}");
    // Through the learner it is a task error with the same words, and nothing changes.
    let mut learner = MetaLearner::new(model, MetaConfig::maml(1, 0.1), 0);
    let before = learner.params.digest();
    let err = learner
        .meta_step(&[image_task(5, 3, 28, 1)], &mut Optimizer::adam(1e-3))
        .unwrap_err();
    match &err {
        Error::Task { index: 0, message } => {
            assert!(message.contains("layer `b0.conv`"), "{message}")
        }
        e => panic!("expected a task error, got {e}"),
    }
    assert_eq!(learner.params.digest(), before);
}

#[test]
fn compositions_that_cannot_fit_their_input_are_refused_when_built() {
    let err = Net::new(&[1, 8, 8], Seq::new().linear("fc", 3)).unwrap_err();
    assert!(err.to_string().contains("fc"), "{err}");
    let err = ResNet12 {
        image_size: 8,
        ..ResNet12::new(5, 32)
    }
    .net()
    .unwrap_err();
    assert!(err.to_string().contains("ResNet12"), "{err}");
    let err = Net::new(&[4], Seq::new().linear("fc", 3).dropout(1.0)).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[test]
fn hooks_come_from_the_composition() {
    let steps = 2;
    let norm = NormKind::Batch {
        per_step: Some(steps + 1),
    };
    let block = |w| {
        Seq::new()
            .conv("conv", w, 3)
            .norm("norm", norm)
            .relu()
            .max_pool(2)
    };
    let net = Net::new(
        &[1, 8, 8],
        Seq::new()
            .block("b0", block(3))
            .block("b1", block(5))
            .flatten()
            .linear("head", 4),
    )
    .unwrap();
    let names = net.param_names();
    assert_eq!(names.len(), 2 * (2 + 2 * 3) + 2);
    assert_eq!(
        &names[..4],
        [
            "b0.conv.w",
            "b0.conv.b",
            "b0.norm.gamma.s0",
            "b0.norm.beta.s0"
        ]
    );
    let m: &dyn Model<f32> = &net;
    assert_eq!(m.batch_norm_channels(), vec![3, 5]);
    assert_eq!(m.norm_steps(), 3);
    assert_eq!(m.outputs(), Some(4));
    let named = |idx: Vec<usize>| idx.iter().map(|&i| names[i].clone()).collect::<Vec<_>>();
    assert_eq!(named(m.head()), ["head.w", "head.b"]);
    let frozen = named(m.inner_frozen());
    assert_eq!(frozen.len(), 12);
    assert!(frozen.iter().all(|n| n.contains(".norm.")), "{frozen:?}");
    assert_eq!(named(net.select("b1.*")).len(), 8);
    assert_eq!(net.select("*").len(), names.len());
    assert_eq!(named(net.select("head")), ["head.w", "head.b"]);
    let init = <Net as Model<f32>>::init(&net, 0);
    assert_eq!(net.param_count(), init.num_elements());
    assert_eq!(init.names(), &names[..]);
    // The head chosen by name; a name that selects nothing is refused.
    let net = net.with_head("b1").unwrap();
    assert_eq!(named(<Net as Model<f32>>::head(&net)).len(), 8);
    assert!(net.with_head("nothing").is_err());
}

/// A hand-written model that declares a batch norm; `file` says whether its forward pass
/// files the statistics (through the one-call plumbing) or forgets to.
struct HandBn {
    file: bool,
}

impl Model<f64> for HandBn {
    fn init(&self, _seed: u64) -> Params<f64> {
        let mut p = Params::new();
        p.push("w", noise(&[4, 3], 7));
        p.push("gamma", ArrayD::ones(IxDyn(&[4])));
        p.push("beta", ArrayD::zeros(IxDyn(&[4])));
        p.push("head", noise(&[2, 4], 8));
        p
    }
    fn forward(&self, t: &mut Tape<f64>, p: &[Var], x: Var, ctx: &mut Ctx<'_, f64>) -> Var {
        let h = t.matmul_t(x, p[0], false, true);
        let affine = Affine {
            gamma: p[1],
            beta: p[2],
            eps: 1e-5,
        };
        let h = if self.file {
            ctx.batch_norm(t, h, 0, &[affine])
        } else {
            metagrad::nn::norm::batch_norm(t, h, affine, ctx.mode, None).0
        };
        let h = t.relu(h);
        t.matmul_t(h, p[3], false, true)
    }
    fn head(&self) -> Vec<usize> {
        vec![3]
    }
    fn batch_norm_channels(&self) -> Vec<usize> {
        vec![4]
    }
}

fn vector_task(seed: u64) -> Task<f64> {
    Task {
        support_x: noise(&[4, 3], seed),
        support_y: Targets::Classes(vec![0, 1, 0, 1]),
        query_x: noise(&[6, 3], seed + 1),
        query_y: Targets::Classes(vec![0, 1, 0, 1, 1, 0]),
    }
}

#[test]
fn a_model_that_declares_batch_norm_but_files_nothing_is_refused_at_its_first_step() {
    let tasks = [vector_task(1), vector_task(3)];
    let mut forgetful = MetaLearner::new(HandBn { file: false }, MetaConfig::maml(1, 0.1), 0);
    let before = forgetful.params.digest();
    let mut opt = Optimizer::adam(1e-3);
    let err = forgetful.meta_step(&tasks, &mut opt).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{msg}");
    assert!(
        msg.contains("filed no statistics") && msg.contains("Ctx::batch_norm"),
        "{msg}"
    );
    assert_eq!(
        forgetful.params.digest(),
        before,
        "a refused step changes nothing"
    );
    assert_eq!(forgetful.meta_batches(), 0);
    // The same model through Ctx::batch_norm trains, and its running statistics move.
    let mut filing = MetaLearner::new(HandBn { file: true }, MetaConfig::maml(1, 0.1), 0);
    filing.meta_step(&tasks, &mut opt).unwrap();
    let running = &filing.norm.stats[0][0];
    assert!(running.mean.iter().any(|&m| m != 0.0), "{:?}", running.mean);
    // In a mode that files nothing by design, the forgetful model is not refused.
    let config = MetaConfig {
        train_mode: NormMode::Transductive,
        ..MetaConfig::maml(1, 0.1)
    };
    let mut transductive = MetaLearner::new(HandBn { file: false }, config, 0);
    transductive.meta_step(&tasks, &mut opt).unwrap();
}

/// A small net with dropout and DropBlock, in f64.
fn dropout_net() -> Net {
    Net::new(
        &[2, 8, 8],
        Seq::new()
            .conv("c0", 4, 3)
            .leaky_relu(0.1)
            .drop_block(0.3, 3)
            .max_pool(2)
            .flatten()
            .linear("l0", 6)
            .leaky_relu(0.1)
            .dropout(0.4)
            .linear("head", 3),
    )
    .unwrap()
}

#[test]
fn dropout_masks_are_seeded_per_task_step_and_layer_and_off_in_evaluation() {
    let net = dropout_net();
    let x = noise(&[3, 2, 8, 8], 5);
    let run = |noise: Option<u64>, step: usize| {
        let mut ctx = Ctx::new(NormMode::Train);
        ctx.noise = noise;
        ctx.step = step;
        forward(&net, x.clone(), &mut ctx)
    };
    let off = run(None, 0);
    assert_eq!(
        run(Some(1), 0),
        run(Some(1), 0),
        "the same key, the same masks"
    );
    assert_ne!(
        run(Some(1), 0),
        run(Some(2), 0),
        "another task, other masks"
    );
    assert_ne!(
        run(Some(1), 0),
        run(Some(1), 1),
        "another inner step, other masks"
    );
    assert_ne!(run(Some(1), 0), off);
    // Without a key (evaluation) the layers are the identity: the same net without them.
    let plain = Net::new(
        &[2, 8, 8],
        Seq::new()
            .conv("c0", 4, 3)
            .leaky_relu(0.1)
            .max_pool(2)
            .flatten()
            .linear("l0", 6)
            .leaky_relu(0.1)
            .linear("head", 3),
    )
    .unwrap();
    assert_eq!(
        forward(&plain, x.clone(), &mut Ctx::new(NormMode::Train)),
        off
    );
}

fn dropout_tasks() -> Vec<Task<f64>> {
    (0..3).map(|i| image_task(3, 2, 8, 10 + 2 * i)).collect()
}

#[test]
fn dropout_meta_steps_do_not_depend_on_the_thread_count() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut l = MetaLearner::new(dropout_net(), MetaConfig::maml(2, 0.1), 1);
            let mut opt = Optimizer::adam(1e-2);
            for _ in 0..3 {
                l.meta_step(&dropout_tasks(), &mut opt).unwrap();
            }
            l.params.digest()
        })
    };
    assert_eq!(run(1), run(2));
    assert_eq!(run(1), run(3));
}

/// The second-order meta-gradient through dropout and DropBlock matches central
/// differences of the meta-loss: the masks are the same in every pass of the step
/// (seeded by the step, the task and the inner step), and the recorded backward uses
/// the forward's masks.
#[test]
fn the_second_order_backward_reuses_the_forward_masks() {
    let tasks = dropout_tasks();
    let mut l = MetaLearner::new(dropout_net(), MetaConfig::maml(2, 0.1), 1);
    let (grad, stats, _) = l.meta_gradient(&tasks).unwrap();
    let base = l.params.clone();
    let loss_at = |l: &mut MetaLearner<f64, Net>, p: &Params<f64>| {
        l.set_params(p.clone()).unwrap();
        l.meta_gradient(&tasks).unwrap().1.loss
    };
    let h = 1e-6;
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for (k, g) in grad.iter().enumerate() {
        for e in [0, g.len() / 2, g.len() - 1] {
            let mut plus = base.clone();
            plus.tensors_mut()[k].as_slice_mut().unwrap()[e] += h;
            let mut minus = base.clone();
            minus.tensors_mut()[k].as_slice_mut().unwrap()[e] -= h;
            let fd = (loss_at(&mut l, &plus) - loss_at(&mut l, &minus)) / (2.0 * h);
            let an = g.as_slice().unwrap()[e];
            let err = (fd - an).abs() / (1e-6 + an.abs().max(fd.abs()));
            worst = worst.max(err);
            checked += 1;
        }
    }
    assert!(stats.loss.is_finite());
    assert!(checked >= 12);
    assert!(worst < 1e-5, "worst relative error {worst:e}");
    // Different masks would give a different loss: the check is not vacuous.
    let plain = MetaLearner::new(dropout_net(), MetaConfig::maml(2, 0.1), 1);
    let (_, other, _) = plain.meta_gradient(&tasks).unwrap();
    assert_eq!(other.loss, stats.loss, "same learner state, same masks");
    let mut later = MetaLearner::new(dropout_net(), MetaConfig::maml(2, 0.1), 1);
    later.meta_step(&tasks, &mut Optimizer::sgd(0.0)).unwrap();
    let (_, moved, _) = later.meta_gradient(&tasks).unwrap();
    assert_ne!(moved.loss, stats.loss, "the next meta-step draws new masks");
}

#[test]
fn adapted_models_predict_as_evaluate_task_scores() {
    let model = Conv4 {
        in_channels: 2,
        image_size: 16,
        filters: 4,
        ..Conv4::omniglot(3)
    };
    let mut learner = MetaLearner::<f64, _>::new(model, MetaConfig::maml(1, 0.2), 0);
    let mut opt = Optimizer::adam(1e-3);
    let tasks: Vec<_> = (0..2).map(|i| image_task(3, 2, 16, 40 + 2 * i)).collect();
    for _ in 0..2 {
        learner.meta_step(&tasks, &mut opt).unwrap();
    }
    let task = image_task(3, 2, 16, 90);
    for mode in [NormMode::Transductive, NormMode::Inductive] {
        let (loss, acc) = learner.evaluate_task(&task, 3, mode).unwrap();
        let adapted = learner
            .adapt(&task.support_x, &task.support_y, 3, mode)
            .unwrap();
        assert_eq!(adapted.loss(&task.query_x, &task.query_y).unwrap(), loss);
        let predictions = adapted.predict(&task.query_x).unwrap();
        let Targets::Classes(labels) = &task.query_y else {
            unreachable!()
        };
        let right = predictions
            .iter()
            .zip(labels)
            .filter(|(p, y)| **p == Some(**y))
            .count();
        assert_eq!(Some(right as f64 / labels.len() as f64), acc, "{mode}");
        let probs = adapted.probabilities(&task.query_x).unwrap();
        assert_eq!(probs.shape(), [6, 3]);
        for row in probs.outer_iter() {
            assert!((row.sum() - 1.0).abs() < 1e-12);
        }
        assert_eq!(adapted.logits(&task.query_x).unwrap().shape(), [6, 3]);
    }
    // Wrong input for the adapted model: an error naming the layer, not a panic.
    let adapted = learner
        .adapt(&task.support_x, &task.support_y, 1, NormMode::Transductive)
        .unwrap();
    let err = adapted.logits(&noise(&[2, 2, 8, 8], 3)).unwrap_err();
    assert!(err.to_string().contains("b0.conv"), "{err}");
}

/// The parameter counts the README lists, from the compositions and worked out by hand
/// (weights + biases + batch-norm affine weights + head).
#[test]
fn ready_networks_have_the_parameter_counts_the_readme_lists() {
    let count = |net: Net| net.param_count();
    // 1·40+40 + 40·40+40 + 40+1.
    assert_eq!(count(Mlp::sinusoid().net().unwrap()), 1_761);
    // 64·9+64 + 3·(64·64·9+64) + 4·128 + 64·5+5.
    assert_eq!(count(Conv4::omniglot(5).net().unwrap()), 112_261);
    // 32·3·9+32 + 3·(32·32·9+32) + 4·64 + 800·5+5.
    assert_eq!(count(Conv4::mini_imagenet(5).net().unwrap()), 32_901);
    // 64·3·9+64 + 5·(64·64·9+64) + 6·128 + 1600·5+5.
    let conv6 = Conv6 {
        in_channels: 3,
        image_size: 84,
        filters: 64,
        ways: 5,
        norm: NormKind::Batch { per_step: None },
        eps: 1e-5,
    };
    assert_eq!(count(conv6.net().unwrap()), 195_205);
    // Per block: 9·in·w + 2·9·w² + in·w (shortcut) + 4·2w (norms); head 640·5+5. Global
    // pooling makes the count independent of the image size.
    assert_eq!(count(ResNet12::new(5, 84).net().unwrap()), 12_427_525);
    assert_eq!(count(ResNet12::new(5, 32).net().unwrap()), 12_427_525);
}
