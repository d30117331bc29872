//! iMAML: the implicit meta-gradient against a closed form, against MAML unrolled through
//! the regularised inner loop, and against finite differences; thread- and rank-count
//! independence, the non-finite and non-convergence policy, refusals, checkpoints.

mod common;

use common::{image_tasks, on_ranks, small_conv, state};
use metagrad::checkpoint::Checkpoint;
use metagrad::data::rng_from_seed;
use metagrad::dist::Comm;
use metagrad::map_fn::with_threads;
use metagrad::meta::{
    Imaml, InnerRule, MetaConfig, MetaLearner, NonFinite, Optimizer, Order, Targets, Task,
};
use metagrad::nn::layers::linear;
use metagrad::nn::{Ctx, Mlp, Model, NormKind, NormMode, Params};
use metagrad::{Error, Tape, Var};
use ndarray::{Array2, ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

fn uniform(rng: &mut ChaCha8Rng, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.gen_range(-1.0..1.0))
}

/// A regression task with `d` inputs: `k` support and `q` query rows.
fn regression_task(d: usize, k: usize, q: usize, seed: u64) -> Task<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Task {
        support_x: uniform(&mut rng, &[k, d]),
        support_y: Targets::Values(uniform(&mut rng, &[k, 1])),
        query_x: uniform(&mut rng, &[q, d]),
        query_y: Targets::Values(uniform(&mut rng, &[q, 1])),
    }
}

/// A `c`-way classification task with `d` inputs, `k` support and `q` query rows.
fn classification_task(d: usize, c: usize, k: usize, q: usize, seed: u64) -> Task<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Task {
        support_x: uniform(&mut rng, &[k, d]),
        support_y: Targets::Classes((0..k).map(|i| i % c).collect()),
        query_x: uniform(&mut rng, &[q, d]),
        query_y: Targets::Classes((0..q).map(|i| (i * 7 + 1) % c).collect()),
    }
}

fn norm(a: &[ArrayD<f64>]) -> f64 {
    a.iter()
        .map(|x| x.iter().map(|v| v * v).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

fn distance(a: &[ArrayD<f64>], b: &[ArrayD<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).iter().map(|v| v * v).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting (small dense systems).
fn solve(mut a: Array2<f64>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[[i, c]].abs().total_cmp(&a[[j, c]].abs()))
            .unwrap();
        for k in 0..n {
            a.swap([c, k], [p, k]);
        }
        b.swap(c, p);
        for r in c + 1..n {
            let f = a[[r, c]] / a[[c, c]];
            for k in c..n {
                a[[r, k]] -= f * a[[c, k]];
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| a[[r, k]] * x[k]).sum();
        x[r] = (b[r] - s) / a[[r, r]];
    }
    x
}

/// Rows `[x, 1]`: the linear model `w·x + b` as `z·φ` with `φ = [w, b]`.
fn augmented(x: &ArrayD<f64>) -> Array2<f64> {
    let (n, d) = (x.shape()[0], x.shape()[1]);
    Array2::from_shape_fn((n, d + 1), |(i, j)| if j < d { x[[i, j]] } else { 1.0 })
}

fn values(y: &Targets<f64>) -> Vec<f64> {
    match y {
        Targets::Values(v) => v.iter().copied().collect(),
        _ => unreachable!("regression targets"),
    }
}

/// Mean-squared error `1/n ‖Z φ − y‖²`: its Hessian `2/n ZᵀZ` and gradient
/// `2/n Zᵀ(Zφ − y)`.
fn mse_hessian(z: &Array2<f64>) -> Array2<f64> {
    z.t().dot(z) * (2.0 / z.nrows() as f64)
}

fn mse_gradient(z: &Array2<f64>, y: &[f64], phi: &[f64]) -> Vec<f64> {
    let n = z.nrows() as f64;
    let r: Vec<f64> = (0..z.nrows())
        .map(|i| (0..phi.len()).map(|j| z[[i, j]] * phi[j]).sum::<f64>() - y[i])
        .collect();
    (0..phi.len())
        .map(|j| 2.0 / n * (0..z.nrows()).map(|i| z[[i, j]] * r[i]).sum::<f64>())
        .collect()
}

/// Linear regression with a quadratic support loss: `φ* = (H_S + λI)⁻¹ (2/n Z_Sᵀ y_S + λθ)`
/// and the meta-gradient `λ (H_S + λI)⁻¹ ∇L_Q(φ*)` in closed form. iMAML, with the inner
/// problem solved to convergence and CG run to convergence, must give it to rounding.
#[test]
fn closed_form_linear_regression() {
    let (d, lambda) = (3, 0.5);
    let task = regression_task(d, 6, 8, 1);
    let model = Mlp::new(vec![d, 1]);
    let config = MetaConfig::imaml(1500, 0.1, lambda, 20)
        .implicit(Imaml::new(lambda, 20).with_tolerance(1e-14));
    let learner = MetaLearner::<f64, _>::new(model, config, 3);
    let (g, stats, _) = learner.meta_gradient(std::slice::from_ref(&task)).unwrap();

    // The closed form, with φ = [w, b].
    let p = learner.params.tensors();
    let theta: Vec<f64> = p[0].iter().chain(p[1].iter()).copied().collect();
    let (zs, zq) = (augmented(&task.support_x), augmented(&task.query_x));
    let (ys, yq) = (values(&task.support_y), values(&task.query_y));
    let mut a = mse_hessian(&zs);
    for i in 0..=d {
        a[[i, i]] += lambda;
    }
    let rhs: Vec<f64> = mse_gradient(&zs, &ys, &vec![0.0; d + 1])
        .iter()
        .zip(&theta)
        .map(|(g0, th)| -g0 + lambda * th)
        .collect();
    let phi = solve(a.clone(), rhs);
    let gq = mse_gradient(&zq, &yq, &phi);
    let exact: Vec<f64> = solve(a, gq.clone()).iter().map(|v| lambda * v).collect();
    let got: Vec<f64> = g[0].iter().chain(g[1].iter()).copied().collect();

    let scale = exact.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let err = got
        .iter()
        .zip(&exact)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        err <= 1e-12 * scale,
        "iMAML {got:?} vs closed form {exact:?}"
    );
    // The implicit correction matters here: the plain query gradient at φ* is far off.
    let naive = gq
        .iter()
        .zip(&exact)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(naive > 1e-2 * scale, "the test problem is too easy");
    // The query loss at φ*.
    let lq = {
        let n = zq.nrows() as f64;
        (0..zq.nrows())
            .map(|i| {
                let e = (0..=d).map(|j| zq[[i, j]] * phi[j]).sum::<f64>() - yq[i];
                e * e
            })
            .sum::<f64>()
            / n
    };
    assert!((stats.loss - lq).abs() <= 1e-12 * lq.max(1.0));
    let cg = stats.cg.unwrap();
    assert!(cg.residual <= 1e-14 && cg.unconverged == 0, "{cg:?}");
    assert!(cg.iterations <= d + 3, "{cg:?}");
    assert!(stats.second_order);
}

/// MAML's meta-gradient, differentiating through `steps` recorded steps of
/// `φ ← φ − α (∇L_S(φ) + λ (φ − θ))`.
fn unrolled<M: Model<f64>>(
    model: &M,
    theta: &Params<f64>,
    task: &Task<f64>,
    lr: f64,
    lambda: f64,
    steps: usize,
) -> Vec<ArrayD<f64>> {
    let mut t = Tape::new();
    let th = theta.place(&mut t);
    let xs = t.constant(task.support_x.clone());
    let xq = t.constant(task.query_x.clone());
    let mut ctx = Ctx::new(NormMode::Transductive);
    let mut phi = th.clone();
    for _ in 0..steps {
        let out = model.forward(&mut t, &phi, xs, &mut ctx);
        let l = task.support_y.loss(&mut t, out);
        let g = t.grad(l, &phi, true);
        for i in 0..phi.len() {
            let d = t.sub(phi[i], th[i]);
            let r = t.mul_scalar(d, lambda);
            let s = t.add(g[i], r);
            let s = t.mul_scalar(s, lr);
            phi[i] = t.sub(phi[i], s);
        }
    }
    let out = model.forward(&mut t, &phi, xq, &mut ctx);
    let l = task.query_y.loss(&mut t, out);
    let g = t.grad(l, &th, false);
    g.iter().map(|&v| t.value(v).clone()).collect()
}

/// On a convex inner problem (softmax regression), MAML through `T` steps of the
/// regularised loss converges to iMAML's meta-gradient as `T` grows.
#[test]
fn unrolled_maml_converges_to_implicit() {
    let (lr, lambda) = (0.3, 1.0);
    let task = classification_task(4, 3, 9, 12, 2);
    let model = Mlp::new(vec![4, 3]);
    let config = MetaConfig::imaml(400, lr, lambda, 40)
        .implicit(Imaml::new(lambda, 40).with_tolerance(1e-13));
    let learner = MetaLearner::<f64, _>::new(model.clone(), config, 5);
    let (implicit, _, _) = learner.meta_gradient(std::slice::from_ref(&task)).unwrap();
    let scale = norm(&implicit);
    let diffs: Vec<f64> = [1, 2, 4, 8, 16, 32, 64]
        .iter()
        .map(|&steps| {
            let g = unrolled(&model, &learner.params, &task, lr, lambda, steps);
            distance(&g, &implicit) / scale
        })
        .collect();
    let shown: Vec<String> = diffs.iter().map(|d| format!("{d:.1e}")).collect();
    eprintln!("relative distance to iMAML's meta-gradient for T = 1, 2, 4, …, 64: {shown:?}");
    for w in diffs.windows(2) {
        assert!(w[1] < w[0], "the differences do not fall: {diffs:?}");
    }
    assert!(diffs[0] > 1e-2, "already equal at T = 1: {diffs:?}");
    assert!(diffs[diffs.len() - 1] < 1e-8, "no convergence: {diffs:?}");
}

/// A tanh network `d → h → c` (smooth, so central differences are clean).
#[derive(Debug, Clone)]
struct TanhNet {
    sizes: [usize; 3],
}

impl Model<f64> for TanhNet {
    fn init(&self, seed: u64) -> Params<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let [d, h, c] = self.sizes;
        let mut p = Params::new();
        p.push("l0.w", uniform(&mut rng, &[h, d]));
        p.push("l0.b", uniform(&mut rng, &[h]) * 0.1);
        p.push("l1.w", uniform(&mut rng, &[c, h]));
        p.push("l1.b", uniform(&mut rng, &[c]) * 0.1);
        p
    }

    fn forward(&self, t: &mut Tape<f64>, p: &[Var], x: Var, _: &mut Ctx<'_, f64>) -> Var {
        let h = linear(t, x, p[0], p[1]);
        let h = t.tanh(h);
        linear(t, h, p[2], p[3])
    }

    fn head(&self) -> Vec<usize> {
        vec![2, 3]
    }
}

fn random_direction(p: &Params<f64>, seed: u64) -> Vec<ArrayD<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    p.tensors()
        .iter()
        .map(|t| uniform(&mut rng, t.shape()))
        .collect()
}

fn shifted(p: &Params<f64>, d: &[ArrayD<f64>], eps: f64) -> Params<f64> {
    let mut q = p.clone();
    for (t, d) in q.tensors_mut().iter_mut().zip(d) {
        t.zip_mut_with(d, |a, &b| *a += eps * b);
    }
    q
}

/// The whole iMAML meta-gradient against central differences of `L_Q(φ*(θ))`, with the
/// inner problem solved to convergence (the evaluation path, which adapts with the same
/// solver): all parameters adapting, and the head only (the body's meta-gradient then
/// comes from the mixed second-order term).
#[test]
fn finite_differences_of_the_implicit_meta_gradient() {
    let steps = 300;
    for rule in [InnerRule::Sgd, InnerRule::HeadOnly] {
        let model = TanhNet { sizes: [3, 5, 3] };
        let config = MetaConfig::imaml(steps, 0.2, 2.0, 60)
            .implicit(Imaml::new(2.0, 60).with_tolerance(1e-13))
            .with_rule(rule);
        let mut learner = MetaLearner::<f64, _>::new(model, config, 7);
        let tasks = [
            classification_task(3, 3, 6, 9, 11),
            classification_task(3, 3, 6, 9, 12),
        ];
        let (g, stats, _) = learner.meta_gradient(&tasks).unwrap();
        assert_eq!(stats.cg.unwrap().unconverged, 0);
        let base = learner.params.clone();
        for k in 0..3 {
            let d = random_direction(&base, 100 + k);
            let analytic: f64 = g.iter().zip(&d).map(|(a, b)| (a * b).sum()).sum::<f64>();
            let eps = 1e-5;
            let mut loss_at = |s: f64| {
                learner.set_params(shifted(&base, &d, s)).unwrap();
                let total: f64 = tasks
                    .iter()
                    .map(|t| {
                        learner
                            .evaluate_task(t, steps, NormMode::Transductive)
                            .unwrap()
                            .0
                    })
                    .sum();
                total / tasks.len() as f64
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            learner.set_params(base.clone()).unwrap();
            let err = (analytic - numeric).abs() / analytic.abs().max(1e-3);
            assert!(
                err < 1e-6,
                "{rule:?}, direction {k}: analytic {analytic:.12e}, central difference \
                 {numeric:.12e} (relative error {err:.2e})"
            );
        }
    }
}

/// The same steps, bitwise, on 1 and 2 threads: a Conv-4 with batch norm (one task per
/// tape) and an MLP on regression tasks (tasks grouped in chunks).
#[test]
fn thread_count_does_not_change_the_bits() {
    let run = |threads: usize| {
        with_threads(threads, || {
            let config = MetaConfig::imaml(3, 0.1, 2.0, 3);
            let mut l = MetaLearner::<f32, _>::new(
                small_conv(3, NormKind::Batch { per_step: None }),
                config,
                0,
            );
            let mut opt = Optimizer::adam(1e-2);
            let mut cg = Vec::new();
            for s in 0..2 {
                let stats = l.meta_step(&image_tasks(4, s), &mut opt).unwrap();
                cg.push(stats.cg.unwrap());
            }
            let config = MetaConfig::imaml(3, 0.05, 1.0, 4);
            let mut m = MetaLearner::<f32, _>::new(Mlp::new(vec![2, 8, 1]), config, 1);
            let mut opt2 = Optimizer::adam(1e-2);
            let tasks: Vec<Task<f32>> = (0..5)
                .map(|i| {
                    let t = regression_task(2, 4, 6, 20 + i);
                    Task {
                        support_x: t.support_x.mapv(|v| v as f32),
                        support_y: Targets::Values(ArrayD::from_elem(IxDyn(&[4, 1]), 0.5)),
                        query_x: t.query_x.mapv(|v| v as f32),
                        query_y: Targets::Values(ArrayD::from_elem(IxDyn(&[6, 1]), -0.5)),
                    }
                })
                .collect();
            m.meta_step(&tasks, &mut opt2).unwrap();
            (
                format!("{:?}", state(&l, &opt)),
                format!("{:?}", state(&m, &opt2)),
                cg,
            )
        })
    };
    let (one, two) = (run(1), run(2));
    assert_eq!(one.0, two.0);
    assert_eq!(one.1, two.1);
    assert_eq!(one.2, two.2);
    assert!(one
        .2
        .iter()
        .all(|c| c.iterations > 0 && c.residual.is_finite()));
}

/// A NaN in a task: refused (the default) or skipped, and nothing changes either way.
#[test]
fn non_finite_tasks_follow_the_policy() {
    let mut tasks: Vec<Task<f64>> = (0..3).map(|i| regression_task(2, 4, 5, i)).collect();
    tasks[1].support_x[[0, 0]] = f64::NAN;
    let model = Mlp::new(vec![2, 4, 1]);
    let mut l = MetaLearner::<f64, _>::new(model.clone(), MetaConfig::imaml(4, 0.1, 2.0, 3), 0);
    let mut opt = Optimizer::adam(1e-2);
    let before = format!("{:?}", state(&l, &opt));
    match l.meta_step(&tasks, &mut opt) {
        Err(Error::NonFinite { tasks, .. }) => assert_eq!(tasks, vec![1]),
        other => panic!("expected Error::NonFinite, got {other:?}"),
    }
    assert_eq!(format!("{:?}", state(&l, &opt)), before);

    let config = MetaConfig::imaml(4, 0.1, 2.0, 3).with_non_finite(NonFinite::Skip);
    let mut l = MetaLearner::<f64, _>::new(model, config, 0);
    let params = l.params.clone();
    let stats = l.meta_step(&tasks, &mut opt).unwrap();
    assert!(stats.skipped && l.skipped_steps == 1 && l.step == 0);
    assert_eq!(l.params, params);
}

/// A CG that cannot reach its tolerance in the steps it has: refused with
/// `Error::NotConverged` naming the residual, or skipped; nothing changes. The same
/// without a tolerance is a step, and reports the residual it reached.
#[test]
fn unconverged_cg_follows_the_policy() {
    let tasks: Vec<Task<f64>> = (0..2).map(|i| classification_task(3, 3, 6, 6, i)).collect();
    let model = TanhNet { sizes: [3, 6, 3] };
    let strict = Imaml::new(2.0, 1).with_tolerance(1e-10);
    let mut l = MetaLearner::<f64, _>::new(
        model.clone(),
        MetaConfig::imaml(5, 0.1, 2.0, 1).implicit(strict),
        0,
    );
    let mut opt = Optimizer::adam(1e-2);
    let before = format!("{:?}", state(&l, &opt));
    match l.meta_step(&tasks, &mut opt) {
        Err(Error::NotConverged {
            tasks,
            residual,
            tolerance,
            ..
        }) => {
            assert_eq!(tasks, vec![0, 1]);
            assert!(residual > tolerance && residual.is_finite());
        }
        other => panic!("expected Error::NotConverged, got {other:?}"),
    }
    assert_eq!(format!("{:?}", state(&l, &opt)), before);

    l.config.on_non_finite = NonFinite::Skip;
    let stats = l.meta_step(&tasks, &mut opt).unwrap();
    let cg = stats.cg.unwrap();
    assert!(
        stats.skipped && cg.unconverged == 2 && cg.iterations == 1,
        "{stats:?}"
    );
    assert_eq!(l.skipped_steps, 1);

    // Without a tolerance: the step is taken and the residual reported.
    let mut l = MetaLearner::<f64, _>::new(model, MetaConfig::imaml(5, 0.1, 2.0, 1), 0);
    let stats = l.meta_step(&tasks, &mut opt).unwrap();
    let cg = stats.cg.unwrap();
    assert!(!stats.skipped && l.step == 1);
    assert!(cg.iterations == 1 && cg.residual > 1e-10 && cg.unconverged == 0);
}

/// Settings that cannot make sense are refused before anything changes: learned inner
/// rates, λ ≤ 0, no CG steps, MAML++'s multi-step loss.
#[test]
fn refuses_what_imaml_does_not_define() {
    let tasks = vec![regression_task(2, 4, 5, 0)];
    let model = Mlp::new(vec![2, 4, 1]);
    let base = MetaConfig::imaml(3, 0.1, 2.0, 3);
    let mut multi = base.clone();
    multi.multi_step_loss = Some(10);
    let cases = [
        (
            base.clone().with_rule(InnerRule::MetaSgd),
            "not defined for iMAML",
        ),
        (
            base.clone().with_rule(InnerRule::PerTensorPerStep),
            "not defined for iMAML",
        ),
        (base.clone().implicit(Imaml::new(0.0, 3)), "λ"),
        (base.clone().implicit(Imaml::new(2.0, 0)), "cg_steps"),
        (
            base.clone().implicit(Imaml::new(2.0, 3).with_damping(-1.0)),
            "damping",
        ),
        (multi, "multi-step loss"),
    ];
    for (config, says) in cases {
        let mut l = MetaLearner::<f64, _>::new(model.clone(), config, 0);
        let mut opt = Optimizer::adam(1e-2);
        let before = format!("{:?}", state(&l, &opt));
        match l.meta_step(&tasks, &mut opt) {
            Err(Error::Config(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("expected Error::Config saying {says:?}, got {other:?}"),
        }
        assert_eq!(format!("{:?}", state(&l, &opt)), before);
    }
}

/// First-order iMAML is the query gradient at φ*, with no CG.
#[test]
fn first_order_is_the_query_gradient_at_the_solution() {
    let task = regression_task(3, 6, 8, 4);
    let model = Mlp::new(vec![3, 1]);
    let config = MetaConfig::imaml(50, 0.1, 1.0, 5).with_order(Order::First);
    let l = MetaLearner::<f64, _>::new(model, config, 0);
    let (g, stats, _) = l.meta_gradient(std::slice::from_ref(&task)).unwrap();
    assert!(stats.cg.is_none() && !stats.second_order);
    let second = MetaLearner::<f64, _>::new(
        l.model.clone(),
        l.config.clone().with_order(Order::Second),
        0,
    );
    let (g2, _, _) = second.meta_gradient(std::slice::from_ref(&task)).unwrap();
    // (I + H/λ) x = b: the second-order meta-gradient is the first-order one, shrunk.
    assert!(norm(&g2) < norm(&g) && distance(&g, &g2) > 1e-3 * norm(&g));
}

/// The iMAML configuration goes into checkpoints; a run resumed from one continues
/// bitwise; checkpoints without the field (older files, MAML runs) read as MAML.
#[test]
fn checkpoints_keep_the_implicit_configuration() {
    let dir = std::env::temp_dir().join(format!("metagrad-imaml-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("checkpoint.json");
    let tasks: Vec<Task<f64>> = (0..2).map(|i| regression_task(2, 4, 5, i)).collect();
    let model = Mlp::new(vec![2, 4, 1]);
    let imaml = Imaml::new(1.5, 4).with_damping(0.25).with_tolerance(0.5);
    let config = MetaConfig::imaml(3, 0.1, 1.5, 4).implicit(imaml);
    let mut l = MetaLearner::<f64, _>::new(model.clone(), config.clone(), 0);
    let mut opt = Optimizer::adam(1e-2);
    l.meta_step(&tasks, &mut opt).unwrap();
    Checkpoint::capture(&l, &opt, &rng_from_seed(1))
        .save(&path)
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"implicit\""));

    let mut fresh = MetaLearner::<f64, _>::new(model.clone(), MetaConfig::maml(1, 0.5), 9);
    let (mut opt2, _) = Checkpoint::load(&path)
        .unwrap()
        .restore(&mut fresh)
        .unwrap();
    assert_eq!(fresh.config, config);
    l.meta_step(&tasks, &mut opt).unwrap();
    fresh.meta_step(&tasks, &mut opt2).unwrap();
    assert_eq!(
        format!("{:?}", state(&l, &opt)),
        format!("{:?}", state(&fresh, &opt2))
    );

    // MAML checkpoints do not mention the field, and older files load without it.
    let maml = MetaLearner::<f64, _>::new(model, MetaConfig::maml(1, 0.5), 0);
    Checkpoint::capture(&maml, &opt, &rng_from_seed(1))
        .save(&path)
        .unwrap();
    assert!(!std::fs::read_to_string(&path).unwrap().contains("implicit"));
    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1.json");
    assert_eq!(Checkpoint::<f32>::load(old).unwrap().config.implicit, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every rank of a 3-rank job ends bitwise as one process, with the same CG report.
#[test]
fn ranks_end_bitwise_equal_to_one_process() {
    let batches: Vec<Vec<Task<f32>>> = (0..2).map(|s| image_tasks(5, 10 + s)).collect();
    let train = |comm: Comm| {
        let config = MetaConfig::imaml(3, 0.1, 2.0, 3);
        let mut l = MetaLearner::<f32, _>::new(
            small_conv(3, NormKind::Batch { per_step: None }),
            config,
            0,
        )
        .with_comm(comm)
        .unwrap();
        let mut opt = Optimizer::adam(1e-2);
        let cg: Vec<_> = batches
            .iter()
            .map(|b| l.meta_step(b, &mut opt).unwrap().cg)
            .collect();
        (format!("{:?}", state(&l, &opt)), cg)
    };
    let one = train(Comm::local());
    let ranks = on_ranks(3, train);
    for r in ranks {
        assert_eq!(r, one);
    }
}
