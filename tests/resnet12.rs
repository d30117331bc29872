//! The second-order MAML meta-gradient through ResNet-12 against PyTorch, in f64.
//!
//! `tests/fixtures/resnet12_maml.json` is written by `tests/fixtures/make_resnet12.py`
//! (its docstring says what it computes and how to rerun it): a small ResNet-12 (widths
//! 4-6-8-10, 16×16 RGB, 5 ways) with random parameters, two 5-way 1-shot tasks with two
//! queries per class, and for 1 and 2 inner SGD steps of 0.1 the meta-loss, PyTorch's
//! second-order meta-gradient (`autograd.grad(create_graph=True)` through the inner
//! loop) and its first-order one. The script checks its own second-order gradient
//! against central differences (recorded in the fixture, read back below).

use metagrad::map_fn::map_tasks;
use metagrad::meta::{MetaConfig, MetaLearner, Order, Targets, Task};
use metagrad::ndarray::{Array1, ArrayD, IxDyn};
use metagrad::nn::{Ctx, Model, NormMode, Params, ResNet12};
use metagrad::serde_json::{self, Value};
use metagrad::Tape;
use std::path::Path;

/// The tolerance on each gradient element, relative to the larger of its PyTorch value
/// and a floor of 1e-6 × the largest element of the whole gradient (so that elements
/// that are zero up to rounding are compared absolutely at that floor).
const GRAD_TOL: f64 = 1e-9;
/// The tolerance on the meta-loss, relative.
const LOSS_TOL: f64 = 1e-12;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resnet12_maml.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the fixture is JSON")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("an array of integers")
        .iter()
        .map(|x| x.as_u64().expect("an integer") as usize)
        .collect()
}

/// `{shape, data}` as an array.
fn tensor(v: &Value) -> ArrayD<f64> {
    ArrayD::from_shape_vec(IxDyn(&usizes(&v["shape"])), floats(&v["data"]))
        .expect("data fits the shape")
}

/// The fixture's network: `ResNet12` with the widths, size and channels it was made for.
fn model(f: &Value) -> ResNet12 {
    let m = &f["model"];
    let widths = usizes(&m["widths"]);
    let net = ResNet12 {
        in_channels: m["in_channels"].as_u64().unwrap() as usize,
        image_size: m["image_size"].as_u64().unwrap() as usize,
        widths: [widths[0], widths[1], widths[2], widths[3]],
        ways: m["ways"].as_u64().unwrap() as usize,
        ..ResNet12::new(5, 16)
    };
    assert_eq!(
        net,
        ResNet12 {
            in_channels: 3,
            image_size: 16,
            widths: [4, 6, 8, 10],
            ways: 5,
            ..ResNet12::new(5, 16)
        },
        "the fixture's network is the one this test is written for"
    );
    assert_eq!(
        (m["slope"].as_f64(), m["eps"].as_f64()),
        (Some(net.slope), Some(net.eps))
    );
    net
}

fn tasks(f: &Value) -> Vec<Task<f64>> {
    f["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Task {
            support_x: tensor(&t["support_x"]),
            support_y: Targets::Classes(usizes(&t["support_y"])),
            query_x: tensor(&t["query_x"]),
            query_y: Targets::Classes(usizes(&t["query_y"])),
        })
        .collect()
}

/// A learner for `config` holding the fixture's parameters, placed by name: every one of
/// metagrad's parameters is in the fixture with its shape, and nothing else is.
fn learner(f: &Value, config: MetaConfig) -> MetaLearner<f64, ResNet12> {
    let net = model(f);
    let names = net.net().unwrap().param_names();
    let mut l = MetaLearner::<f64, _>::new(net, config, 0);
    assert_eq!(l.params.names(), &names[..]);
    let given = f["params"].as_array().unwrap();
    assert_eq!(given.len(), names.len(), "the fixture's parameter count");
    let mut p = Params::new();
    for (name, init) in l.params.iter() {
        let entry = given
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("the fixture has no parameter `{name}`"));
        let value = tensor(entry);
        assert_eq!(value.shape(), init.shape(), "the shape of `{name}`");
        p.push(name, value);
    }
    l.set_params(p).unwrap();
    l
}

/// The largest error of `got` against the fixture's gradient `want` (a list of
/// `{name, data}` in metagrad's order), relative as [`GRAD_TOL`] says, with where it is.
fn max_error(names: &[String], got: &[ArrayD<f64>], want: &Value) -> (f64, String) {
    let want = want.as_array().unwrap();
    assert_eq!(want.len(), got.len());
    let scale = want
        .iter()
        .flat_map(|g| floats(&g["data"]))
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = 1e-6 * scale;
    let mut worst = (0.0, String::new());
    for ((name, g), w) in names.iter().zip(got).zip(want) {
        assert_eq!(
            w["name"],
            name.as_str(),
            "the fixture's gradients are in metagrad's order"
        );
        let w = floats(&w["data"]);
        assert_eq!(g.len(), w.len(), "the gradient of `{name}`");
        for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
            let e = (a - b).abs() / b.abs().max(floor);
            assert!(e.is_finite(), "{name}[{i}]: {a} against {b}");
            if e > worst.0 {
                worst = (e, format!("{name}[{i}]: metagrad {a:e}, torch {b:e}"));
            }
        }
    }
    worst
}

fn norm(gs: &[ArrayD<f64>]) -> f64 {
    gs.iter()
        .flat_map(|g| g.iter())
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
}

fn from_fixture(gs: &Value) -> Vec<ArrayD<f64>> {
    gs.as_array()
        .unwrap()
        .iter()
        .map(|g| Array1::from(floats(&g["data"])).into_dyn())
        .collect()
}

fn flat(gs: &[ArrayD<f64>]) -> Vec<ArrayD<f64>> {
    gs.iter()
        .map(|g| g.clone().into_shape_with_order(IxDyn(&[g.len()])).unwrap())
        .collect()
}

fn difference(a: &[ArrayD<f64>], b: &[ArrayD<f64>]) -> Vec<ArrayD<f64>> {
    a.iter().zip(b).map(|(a, b)| a - b).collect()
}

#[test]
fn the_fixture_checked_itself_against_finite_differences() {
    let f = fixture();
    for case in f["cases"].as_array().unwrap() {
        let check = &case["fd_check"];
        let worst = check["max_rel_err"].as_f64().unwrap();
        println!(
            "inner_steps {}: the fixture's largest central-difference error {worst:.2e}",
            case["inner_steps"]
        );
        assert!(worst < 1e-6, "the fixture's own check: {check}");
        assert!(check["coordinates"].as_array().unwrap().len() >= 9);
    }
}

#[test]
fn second_order_meta_gradient_matches_pytorch() {
    let f = fixture();
    let tasks = tasks(&f);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let steps = case["inner_steps"].as_u64().unwrap() as usize;
        let lr = case["inner_lr"].as_f64().unwrap();
        let l = learner(&f, MetaConfig::maml(steps, lr));
        let (grads, stats, observed) = l.meta_gradient(&tasks).unwrap();
        assert!(stats.second_order);
        // Every batch norm reports its statistics: 16 layers, (steps + 1) passes, 2 tasks.
        assert_eq!(observed.len(), 16 * (steps + 1) * tasks.len());
        let loss = case["loss"].as_f64().unwrap();
        let loss_err = (stats.loss - loss).abs() / loss.abs();
        let (err, at) = max_error(l.params.names(), &grads, &case["grad_so"]);
        println!(
            "inner_steps {steps}: loss {:.15} (torch {loss:.15}, rel err {loss_err:.2e}); \
             second-order gradient max rel err {err:.2e} at {at}",
            stats.loss
        );
        assert!(
            loss_err < LOSS_TOL,
            "loss {} against torch {loss}",
            stats.loss
        );
        assert!(
            err < GRAD_TOL,
            "second order, {steps} inner steps: error {err:e} at {at}"
        );
    }
}

#[test]
fn first_order_meta_gradient_matches_pytorch_and_differs_from_second_order() {
    let f = fixture();
    let tasks = tasks(&f);
    for case in f["cases"].as_array().unwrap() {
        let steps = case["inner_steps"].as_u64().unwrap() as usize;
        let lr = case["inner_lr"].as_f64().unwrap();
        let l = learner(&f, MetaConfig::maml(steps, lr).with_order(Order::First));
        let (grads, stats, _) = l.meta_gradient(&tasks).unwrap();
        assert!(!stats.second_order);
        let loss = case["loss"].as_f64().unwrap();
        assert!((stats.loss - loss).abs() / loss.abs() < LOSS_TOL);
        let (err, at) = max_error(l.params.names(), &grads, &case["grad_fo"]);
        // The first-order gradient is far from the second-order one, so the check above
        // would catch a meta-gradient that silently dropped the second-order terms.
        let so = from_fixture(&case["grad_so"]);
        let apart = norm(&difference(&flat(&grads), &so)) / norm(&so);
        let fixture_apart = case["so_fo_rel_diff"].as_f64().unwrap();
        println!(
            "inner_steps {steps}: first-order gradient max rel err {err:.2e} at {at}; \
             ||FO - SO|| / ||SO|| = {apart:.4} (torch {fixture_apart:.4})"
        );
        assert!(
            err < GRAD_TOL,
            "first order, {steps} inner steps: error {err:e} at {at}"
        );
        assert!(apart > 0.5, "||FO - SO|| / ||SO|| = {apart}");
    }
}

/// An image of the wrong size is refused by the first layer, named in the message: in a
/// forward pass (a panic, caught quietly by the task mapper) and in a meta-gradient (the
/// task's error).
#[test]
fn a_wrong_image_size_is_refused_naming_the_layer() {
    let f = fixture();
    let net = model(&f);
    let params = <ResNet12 as Model<f64>>::init(&net, 0);
    let forward = |size: usize| {
        map_tasks(1, 1, |_| {
            let mut t = Tape::<f64>::new();
            let p = params.place(&mut t);
            let x = t.constant(ArrayD::zeros(IxDyn(&[2, 3, size, size])));
            let y = net.forward(&mut t, &p, x, &mut Ctx::new(NormMode::Transductive));
            t.shape(y).to_vec()
        })
    };
    assert_eq!(forward(16).unwrap(), [vec![2, 5]]);
    match forward(20) {
        Err(metagrad::Error::Task { message, .. }) => assert!(
            message.contains("layer `b0`")
                && message.contains("expects input [N, 3, 16, 16], got [2, 3, 20, 20]"),
            "{message}"
        ),
        r => panic!("expected the forward pass to panic naming the layer, got {r:?}"),
    }

    let mut tasks = tasks(&f);
    tasks[1].query_x = ArrayD::zeros(IxDyn(&[10, 3, 32, 32]));
    let l = learner(&f, MetaConfig::maml(1, 0.1));
    match l.meta_gradient(&tasks) {
        Err(metagrad::Error::Task { index: 1, message }) => assert!(
            message.contains("layer `b0`") && message.contains("got [10, 3, 32, 32]"),
            "{message}"
        ),
        r => panic!(
            "expected task 1 to fail naming the layer, got {:?}",
            r.map(|r| r.1)
        ),
    }

    // And a network too small for four poolings is refused when it is built.
    let small = ResNet12 {
        image_size: 8,
        ..net
    };
    let e = small.net().unwrap_err().to_string();
    assert!(
        e.contains("layer `b3`") && e.contains("pool does not fit"),
        "{e}"
    );
}
