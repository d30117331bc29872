//! Every tape op passes first- and second-order checks in f64 against central
//! differences, plus closed forms and the structural properties of gradients.

// Inputs are written `&[x.clone()]` for uniformity with multi-input checks.
#![allow(clippy::cloned_ref_to_slice_refs)]

use metagrad::check::{gradcheck, gradgradcheck, hvp, max_abs_diff};
use metagrad::{Tape, Var};
use ndarray::{arr1, ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random input in [-2, 2] with every element at least 0.1 away from zero (ReLU kinks).
fn rnd(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let v: f64 = rng.gen_range(0.1..2.0);
        if rng.gen_bool(0.5) {
            v
        } else {
            -v
        }
    })
}

/// Random positive input in [0.5, 2].
fn pos(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.gen_range(0.5..2.0))
}

/// gradcheck and gradgradcheck of `f`, and gradgradcheck of `f²` so that linear ops
/// get a non-zero second derivative that runs through their backward rule's backward.
fn check<Fun>(name: &str, f: Fun, inputs: &[ArrayD<f64>])
where
    Fun: Fn(&mut Tape<f64>, &[Var]) -> Var + Copy,
{
    let r = gradcheck(f, inputs);
    assert!(r.passed(), "{name}: gradcheck {r}");
    let r = gradgradcheck(f, inputs);
    assert!(r.passed(), "{name}: gradgradcheck {r}");
    let sq = move |t: &mut Tape<f64>, v: &[Var]| {
        let y = f(t, v);
        t.mul(y, y)
    };
    let r = gradgradcheck(sq, inputs);
    assert!(r.passed(), "{name}: gradgradcheck of its square {r}");
}

#[test]
fn elementwise_binary_with_broadcasting() {
    let cases: [(&[usize], &[usize]); 4] = [
        (&[3, 4], &[3, 4]),
        (&[3, 4], &[4]),
        (&[2, 1, 3], &[4, 1]),
        (&[], &[2, 3]),
    ];
    for (k, (sa, sb)) in cases.iter().enumerate() {
        let (a, b) = (rnd(sa, k as u64), rnd(sb, 100 + k as u64));
        check("add", |t, v| t.add(v[0], v[1]), &[a.clone(), b.clone()]);
        check("sub", |t, v| t.sub(v[0], v[1]), &[a.clone(), b.clone()]);
        check("mul", |t, v| t.mul(v[0], v[1]), &[a.clone(), b.clone()]);
        check("div", |t, v| t.div(v[0], v[1]), &[a.clone(), b.clone()]);
    }
}

#[test]
fn elementwise_unary() {
    let x = rnd(&[3, 5], 1);
    let p = pos(&[3, 5], 2);
    check("neg", |t, v| t.neg(v[0]), &[x.clone()]);
    check("add_scalar", |t, v| t.add_scalar(v[0], 1.5), &[x.clone()]);
    check("mul_scalar", |t, v| t.mul_scalar(v[0], -0.7), &[x.clone()]);
    check("powi 3", |t, v| t.powi(v[0], 3), &[x.clone()]);
    check("powi -2", |t, v| t.powi(v[0], -2), &[x.clone()]);
    check("powi 0", |t, v| t.powi(v[0], 0), &[x.clone()]);
    check("square", |t, v| t.square(v[0]), &[x.clone()]);
    check("exp", |t, v| t.exp(v[0]), &[x.clone()]);
    check("ln", |t, v| t.ln(v[0]), &[p.clone()]);
    check("sqrt", |t, v| t.sqrt(v[0]), &[p.clone()]);
    check("tanh", |t, v| t.tanh(v[0]), &[x.clone()]);
    check("sigmoid", |t, v| t.sigmoid(v[0]), &[x.clone()]);
    check("relu", |t, v| t.relu(v[0]), &[x.clone()]);
    let m: Vec<bool> = (0..15).map(|i| i % 3 != 0).collect();
    let m = &m;
    check("mask", move |t, v| t.mask(v[0], m.clone()), &[x.clone()]);
    check(
        "maximum",
        |t, v| t.maximum(v[0], v[1]),
        &[x.clone(), rnd(&[3, 5], 3)],
    );
    let c: Vec<bool> = (0..15).map(|i| i % 2 == 0).collect();
    let c = &c;
    check(
        "where",
        move |t, v| t.where_(c, v[0], v[1]),
        &[x, rnd(&[3, 5], 4)],
    );
}

#[test]
fn reductions() {
    let x = rnd(&[2, 3, 4], 5);
    check("sum", |t, v| t.sum(v[0]), &[x.clone()]);
    check("mean", |t, v| t.mean(v[0]), &[x.clone()]);
    check(
        "sum_axes keepdim",
        |t, v| t.sum_axes(v[0], &[0, 2], true),
        &[x.clone()],
    );
    check(
        "sum_axes",
        |t, v| t.sum_axes(v[0], &[1], false),
        &[x.clone()],
    );
    check(
        "mean_axes",
        |t, v| t.mean_axes(v[0], &[2], false),
        &[x.clone()],
    );
    check("sum_to", |t, v| t.sum_to(v[0], &[3, 1]), &[x.clone()]);
    check(
        "broadcast_to",
        |t, v| t.broadcast_to(v[0], &[2, 3, 4]),
        &[rnd(&[3, 1], 6)],
    );
    check("max_axis", |t, v| t.max_axis(v[0], 1, false), &[x.clone()]);
    check("max_axis keepdim", |t, v| t.max_axis(v[0], 2, true), &[x]);
}

#[test]
fn shape_ops() {
    let x = rnd(&[2, 3, 4], 7);
    check("reshape", |t, v| t.reshape(v[0], &[6, 4]), &[x.clone()]);
    check("permute", |t, v| t.permute(v[0], &[2, 0, 1]), &[x.clone()]);
    check("transpose", |t, v| t.transpose(v[0]), &[x.clone()]);
    check(
        "slice_axis",
        |t, v| t.slice_axis(v[0], 2, 1, 3),
        &[x.clone()],
    );
    check(
        "index_select",
        |t, v| t.index_select(v[0], 1, &[2, 0, 2]),
        &[x.clone()],
    );
    check(
        "concat",
        |t, v| t.concat(&[v[0], v[1]], 1),
        &[x.clone(), rnd(&[2, 2, 4], 8)],
    );
    check(
        "stack",
        |t, v| t.stack(&[v[0], v[1]], 1),
        &[x.clone(), rnd(&[2, 3, 4], 9)],
    );
    // scatter_add as the adjoint of a row gather with repeats.
    check(
        "scatter_add",
        |t, v| {
            let shape = t.shape(v[0]).to_vec();
            let map =
                std::sync::Arc::new(metagrad::tape::op::Gather::select(&[5, 4], 0, &[1, 1, 3]));
            assert_eq!(shape, vec![3, 4]);
            t.scatter_add(v[0], map)
        },
        &[rnd(&[3, 4], 10)],
    );
}

#[test]
fn matmul_plain_transposed_and_batched() {
    check(
        "matmul",
        |t, v| t.matmul(v[0], v[1]),
        &[rnd(&[3, 4], 11), rnd(&[4, 2], 12)],
    );
    check(
        "matmul ta",
        |t, v| t.matmul_t(v[0], v[1], true, false),
        &[rnd(&[4, 3], 13), rnd(&[4, 2], 14)],
    );
    check(
        "matmul tb",
        |t, v| t.matmul_t(v[0], v[1], false, true),
        &[rnd(&[3, 4], 15), rnd(&[2, 4], 16)],
    );
    check(
        "matmul ta tb",
        |t, v| t.matmul_t(v[0], v[1], true, true),
        &[rnd(&[4, 3], 17), rnd(&[2, 4], 18)],
    );
    check(
        "batched matmul",
        |t, v| t.matmul(v[0], v[1]),
        &[rnd(&[2, 3, 4], 19), rnd(&[2, 4, 2], 20)],
    );
    check(
        "batched matmul ta tb",
        |t, v| t.matmul_t(v[0], v[1], true, true),
        &[rnd(&[2, 4, 3], 21), rnd(&[2, 2, 4], 22)],
    );
}

#[test]
fn convolution_forward_and_its_adjoints() {
    for &(stride, pad, h, k) in &[
        (1, 1, 5, 3),
        (2, 0, 6, 3),
        (2, 1, 5, 3),
        (1, 0, 4, 2),
        (3, 2, 7, 3),
        (1, 2, 4, 3),
        (1, 2, 6, 5),
    ] {
        let x = rnd(&[2, 2, h, h], 30 + h as u64);
        let w = rnd(&[3, 2, k, k], 40 + k as u64);
        check(
            "conv2d",
            move |t, v| t.conv2d(v[0], v[1], stride, pad),
            &[x.clone(), w.clone()],
        );
        check(
            "conv2d_bias",
            move |t, v| t.conv2d_bias(v[0], v[1], v[2], stride, pad),
            &[x.clone(), w.clone(), rnd(&[3], 45 + h as u64)],
        );
        // The adjoints on their own, as ops of two inputs.
        let mut t = Tape::<f64>::new();
        let (xv, wv) = (t.param(x.clone()), t.param(w.clone()));
        let y = t.conv2d(xv, wv, stride, pad);
        let gy = rnd(t.shape(y), 50);
        let geom = match t.op(y) {
            metagrad::tape::Op::Conv2d(_, _, g) => *g,
            op => panic!("unexpected op {op:?}"),
        };
        check(
            "conv2d_input_grad",
            move |t, v| t.conv2d_input_grad(v[0], v[1], geom),
            &[gy.clone(), w.clone()],
        );
        check(
            "conv2d_weight_grad",
            move |t, v| t.conv2d_weight_grad(v[0], v[1], geom),
            &[x.clone(), gy.clone()],
        );
    }
}

/// Direct-loop reference convolution (stride 1, zero padding `p`).
fn naive_conv(x: &ArrayD<f64>, w: &ArrayD<f64>, p: usize) -> ArrayD<f64> {
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (o, k) = (w.shape()[0], w.shape()[2]);
    let (ho, wo) = (h + 2 * p + 1 - k, wd + 2 * p + 1 - k);
    ArrayD::from_shape_fn(IxDyn(&[n, o, ho, wo]), |ix| {
        let mut s = 0.0;
        for ci in 0..c {
            for i in 0..k {
                for j in 0..k {
                    let (r, q) = (ix[2] + i, ix[3] + j);
                    if r >= p && q >= p && r - p < h && q - p < wd {
                        s += x[[ix[0], ci, r - p, q - p]] * w[[ix[1], ci, i, j]];
                    }
                }
            }
        }
        s
    })
}

/// Maps thinner than the padding (a 1-row input under 3×3 padding 1, a 2-row input under
/// 5×5 padding 2) against the direct formula, and max-pooling of windows whose maximum is
/// −∞, which plain max-pooling keeps (only the ReLU variant reads nothing there).
#[test]
fn thin_maps_and_infinite_windows() {
    for (shape, k, p) in [
        ([1, 2, 1, 3], 3, 1),
        ([2, 1, 2, 5], 5, 2),
        ([1, 1, 3, 1], 3, 1),
    ] {
        let x = rnd(&shape, 99);
        let w = rnd(&[2, shape[1], k, k], 100);
        let mut t = Tape::<f64>::new();
        let (xv, wv) = (t.constant(x.clone()), t.constant(w.clone()));
        let y = t.conv2d(xv, wv, 1, p);
        let d = max_abs_diff(t.value(y), &naive_conv(&x, &w, p));
        assert!(d < 1e-12, "{shape:?} k {k}: {d}");
        check(
            "conv2d on a thin map",
            move |t, v| t.conv2d(v[0], v[1], 1, p),
            &[x, w],
        );
    }
    let mut t = Tape::<f64>::new();
    let x = t.constant(ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), f64::NEG_INFINITY));
    let y = t.max_pool2d(x, 2, 2);
    assert_eq!(t.value(y)[[0, 0, 0, 0]], f64::NEG_INFINITY);
    let y = t.relu_max_pool2d(x, 2, 2);
    assert_eq!(t.value(y)[[0, 0, 0, 0]], 0.0);
}

/// Many-channel 3×3 convolutions equal the direct formula, and their adjoints pass the
/// gradient checks.
#[test]
fn many_channel_convolutions() {
    for (h, wd) in [(8, 8), (9, 11), (14, 14), (17, 16)] {
        let x = rnd(&[2, 8, h, wd], 90 + h as u64);
        let w = rnd(&[9, 8, 3, 3], 91);
        let mut t = Tape::<f64>::new();
        let (xv, wv) = (t.constant(x.clone()), t.constant(w.clone()));
        let y = t.conv2d(xv, wv, 1, 1);
        let d = max_abs_diff(t.value(y), &naive_conv(&x, &w, 1));
        assert!(d < 1e-12, "{h}x{wd}: {d}");
    }
    let x = rnd(&[1, 8, 8, 9], 92);
    let w = rnd(&[8, 8, 3, 3], 93);
    check(
        "conv2d, 8 channels",
        |t, v| t.conv2d(v[0], v[1], 1, 1),
        &[x.clone(), w.clone()],
    );
    let mut t = Tape::<f64>::new();
    let (xv, wv) = (t.param(x.clone()), t.param(w.clone()));
    let y = t.conv2d(xv, wv, 1, 1);
    let geom = match t.op(y) {
        metagrad::tape::Op::Conv2d(_, _, g) => *g,
        op => panic!("unexpected op {op:?}"),
    };
    let gy = rnd(t.shape(y), 94);
    check(
        "conv2d_input_grad, 8 channels",
        move |t, v| t.conv2d_input_grad(v[0], v[1], geom),
        &[gy, w],
    );
}

#[test]
fn pooling() {
    let x = rnd(&[2, 2, 7, 7], 60);
    check(
        "max_pool2d 7->3",
        |t, v| t.max_pool2d(v[0], 2, 2),
        &[x.clone()],
    );
    check(
        "max_pool2d 3x3 stride 1",
        |t, v| t.max_pool2d(v[0], 3, 1),
        &[rnd(&[1, 2, 5, 5], 61)],
    );
    check(
        "relu_max_pool2d 7->3",
        |t, v| t.relu_max_pool2d(v[0], 2, 2),
        &[x.clone()],
    );
    check(
        "relu_max_pool2d 3x3 stride 2",
        |t, v| t.relu_max_pool2d(v[0], 3, 2),
        &[x.clone()],
    );
    // The fused op is ReLU after max-pooling, in value and in gradient (on an input
    // shifted so that some windows have no positive element).
    let w = rnd(&[2, 2, 3, 3], 62);
    let shifted = x.mapv(|v| v - 1.0);
    let run = |fused: bool| {
        let mut t = Tape::<f64>::new();
        let xv = t.param(shifted.clone());
        let y = if fused {
            t.relu_max_pool2d(xv, 2, 2)
        } else {
            let p = t.max_pool2d(xv, 2, 2);
            t.relu(p)
        };
        let wv = t.constant(w.clone());
        let l = t.mul(y, wv);
        let l = t.sum(l);
        let g = t.grad(l, &[xv], false)[0];
        (t.value(y).clone(), t.value(g).clone())
    };
    let ((y1, g1), (y2, g2)) = (run(true), run(false));
    assert_eq!(y1, y2);
    assert_eq!(g1, g2);
    assert!(y1.iter().any(|&v| v == 0.0) && y1.iter().any(|&v| v > 0.0));
    check("avg_pool2d", |t, v| t.avg_pool2d(v[0], 2, 2), &[x.clone()]);
    check("global_avg_pool", |t, v| t.global_avg_pool(v[0]), &[x]);
}

#[test]
fn fused_batch_norm() {
    for shape in [&[4, 3, 2, 3][..], &[5, 2]] {
        let c = shape[1];
        let inputs = [rnd(shape, 80), rnd(&[c], 81), rnd(&[c], 82)];
        check(
            "batch_norm_batch_stats",
            |t, v| t.batch_norm_batch_stats(v[0], v[1], v[2], 1e-5).0,
            &inputs,
        );
        // Weighted by another function of x, so that the second derivative in x runs
        // through both forms of the backward rule.
        check(
            "batch_norm_batch_stats times tanh(x)",
            |t, v| {
                let y = t.batch_norm_batch_stats(v[0], v[1], v[2], 1e-5).0;
                let w = t.tanh(v[0]);
                t.mul(y, w)
            },
            &inputs,
        );
    }
}

/// The gradient of a batch norm, recorded with `create_graph` (one `batch_norm_grad`
/// primitive), checked as a function in its own right: its gradient is batch norm's
/// second derivative and its gradgradcheck the third.
#[test]
fn batch_norm_gradient_to_third_order() {
    let inputs = [rnd(&[3, 2, 2, 2], 95), rnd(&[2], 96), rnd(&[2], 97)];
    let w = rnd(&[3, 2, 2, 2], 98);
    let f = move |t: &mut Tape<f64>, v: &[Var]| {
        let y = t.batch_norm_batch_stats(v[0], v[1], v[2], 1e-3).0;
        let wv = t.constant(w.clone());
        let l = t.mul(y, wv);
        let l = t.sum(l);
        let g = t.grad(l, &[v[0], v[1]], true);
        // dx weighted by tanh(x), plus dgamma: both gradients, non-linearly.
        let th = t.tanh(v[0]);
        let a = t.mul(g[0], th);
        let a = t.sum(a);
        let b = t.sum(g[1]);
        t.add(a, b)
    };
    let r = gradcheck(f.clone(), &inputs);
    assert!(r.passed(), "second derivative: {r}");
    let r = gradgradcheck(f, &inputs);
    assert!(r.passed(), "third derivative: {r}");
}

/// Batch norm, ReLU and max-pooling fused in one op: gradient checks, and the same values
/// and gradients (both backward forms) as the three ops one after another, with a
/// negative scale in one channel so that pooling picks minima of `x` there.
#[test]
fn fused_batch_norm_relu_max_pool() {
    let x = rnd(&[3, 2, 5, 4], 87);
    let (ga, be) = (
        arr1(&[1.3, -0.7]).into_dyn(),
        arr1(&[-0.5, -0.4]).into_dyn(),
    );
    check(
        "batch_norm_relu_max_pool2d",
        |t, v| t.batch_norm_relu_max_pool2d(v[0], v[1], v[2], 1e-5, 2, 2).0,
        &[x.clone(), ga.clone(), be.clone()],
    );
    let w = rnd(&[3, 2, 2, 2], 88);
    let run = |fused: bool, create_graph: bool| {
        let mut t = Tape::<f64>::new();
        let (xv, gv, bv) = (t.param(x.clone()), t.param(ga.clone()), t.param(be.clone()));
        let y = if fused {
            t.batch_norm_relu_max_pool2d(xv, gv, bv, 1e-5, 2, 2).0
        } else {
            let y = t.batch_norm_batch_stats(xv, gv, bv, 1e-5).0;
            t.relu_max_pool2d(y, 2, 2)
        };
        let wv = t.constant(w.clone());
        let l = t.mul(y, wv);
        let l = t.sum(l);
        let g = t.grad(l, &[xv, gv, bv], create_graph);
        let mut out = vec![t.value(y).clone()];
        out.extend(g.iter().map(|&v| t.value(v).clone()));
        out
    };
    let reference = run(false, false);
    assert!(
        reference[0].iter().any(|&v| v == 0.0),
        "some windows are cut by the ReLU"
    );
    for cg in [false, true] {
        for (a, b) in run(true, cg).iter().zip(&reference) {
            assert!(
                max_abs_diff(a, b) < 1e-12,
                "create_graph {cg}: {}",
                max_abs_diff(a, b)
            );
        }
    }
}

/// The fused batch norm equals the same formula written with elementwise ops, in value,
/// in its fast first-order gradient and in its recorded (differentiable) gradient.
#[test]
fn fused_batch_norm_matches_the_elementwise_formula() {
    let (x, ga, be) = (rnd(&[6, 3, 4, 4], 83), rnd(&[3], 84), rnd(&[3], 85));
    let w = rnd(&[6, 3, 4, 4], 86);
    let run = |fused: bool, create_graph: bool| {
        let mut t = Tape::<f64>::new();
        let (xv, gv, bv) = (t.param(x.clone()), t.param(ga.clone()), t.param(be.clone()));
        let y = if fused {
            t.batch_norm_batch_stats(xv, gv, bv, 1e-5).0
        } else {
            let mean = t.mean_axes(xv, &[0, 2, 3], true);
            let xc = t.sub(xv, mean);
            let sq = t.square(xc);
            let var = t.mean_axes(sq, &[0, 2, 3], true);
            let ve = t.add_scalar(var, 1e-5);
            let sd = t.sqrt(ve);
            let xh = t.div(xc, sd);
            let g4 = t.reshape(gv, &[1, 3, 1, 1]);
            let b4 = t.reshape(bv, &[1, 3, 1, 1]);
            let s = t.mul(xh, g4);
            t.add(s, b4)
        };
        let wv = t.constant(w.clone());
        let l = t.mul(y, wv);
        let l = t.sum(l);
        let g = t.grad(l, &[xv, gv, bv], create_graph);
        let mut out = vec![t.value(y).clone()];
        out.extend(g.iter().map(|&v| t.value(v).clone()));
        out
    };
    let reference = run(false, false);
    for (fused, cg) in [(true, false), (true, true)] {
        for (a, b) in run(fused, cg).iter().zip(&reference) {
            assert!(
                max_abs_diff(a, b) < 1e-12,
                "create_graph {cg}: {}",
                max_abs_diff(a, b)
            );
        }
    }
}

#[test]
fn losses() {
    let logits = rnd(&[4, 5], 70);
    let target = rnd(&[4, 5], 71);
    check("log_softmax", |t, v| t.log_softmax(v[0]), &[logits.clone()]);
    check("softmax", |t, v| t.softmax(v[0]), &[logits.clone()]);
    check("mse", |t, v| t.mse(v[0], v[1]), &[logits.clone(), target]);
    // Dense labels that are probability rows, differentiated in both arguments.
    let soft = {
        let mut t = Tape::<f64>::new();
        let s = t.constant(rnd(&[4, 5], 72));
        let p = t.softmax(s);
        t.value(p).clone()
    };
    check(
        "cross_entropy",
        |t, v| t.cross_entropy(v[0], v[1]),
        &[logits.clone(), soft],
    );
    check(
        "sparse_cross_entropy",
        |t, v| t.sparse_cross_entropy(v[0], &[0, 4, 2, 4]),
        &[logits],
    );
}

#[test]
fn closed_form_second_derivative_of_cube() {
    let mut t = Tape::<f64>::new();
    let x = t.param(ndarray::arr1(&[-1.5, 0.5, 2.0]).into_dyn());
    let y = t.powi(x, 3);
    let s = t.sum(y);
    let g = t.grad(s, &[x], true)[0];
    let gs = t.sum(g);
    let h = t.grad(gs, &[x], false)[0];
    for (i, &xi) in [-1.5f64, 0.5, 2.0].iter().enumerate() {
        assert_eq!(t.value(g)[[i]], 3.0 * xi * xi);
        assert!((t.value(h)[[i]] - 6.0 * xi).abs() < 1e-12);
    }
}

fn one_hot(labels: &[usize], k: usize) -> ArrayD<f64> {
    let mut y = ArrayD::zeros(IxDyn(&[labels.len(), k]));
    for (i, &l) in labels.iter().enumerate() {
        y[[i, l]] = 1.0;
    }
    y
}

#[test]
fn cross_entropy_hessian_is_diag_p_minus_ppt() {
    let logits = rnd(&[3, 4], 80);
    let labels = [1usize, 3, 0];
    let n = 3.0;
    // Softmax probabilities.
    let p = {
        let mut t = Tape::<f64>::new();
        let l = t.constant(logits.clone());
        let s = t.softmax(l);
        t.value(s).clone()
    };
    for basis in 0..12 {
        let mut e = ArrayD::zeros(IxDyn(&[3, 4]));
        e.as_slice_mut().unwrap()[basis] = 1.0;
        let (row, col) = (basis / 4, basis % 4);
        for sparse in [false, true] {
            let hv = hvp(
                |t, v| {
                    if sparse {
                        t.sparse_cross_entropy(v[0], &labels)
                    } else {
                        let y = t.constant(one_hot(&labels, 4));
                        t.cross_entropy(v[0], y)
                    }
                },
                &[logits.clone()],
                &[e.clone()],
            );
            for i in 0..3 {
                for j in 0..4 {
                    let expect = if i == row {
                        let d = if j == col { p[[i, j]] } else { 0.0 };
                        (d - p[[i, j]] * p[[i, col]]) / n
                    } else {
                        0.0
                    };
                    assert!(
                        (hv[0][[i, j]] - expect).abs() < 1e-12,
                        "sparse={sparse} H[{i},{j};{row},{col}] = {} expected {expect}",
                        hv[0][[i, j]]
                    );
                }
            }
        }
    }
}

#[test]
fn dense_and_sparse_cross_entropy_agree_on_one_hot_labels() {
    let logits = rnd(&[6, 5], 90);
    let labels = [4usize, 0, 2, 2, 1, 3];
    let dir = rnd(&[6, 5], 91);
    let run = |sparse: bool| {
        let f = |t: &mut Tape<f64>, v: &[Var]| {
            if sparse {
                t.sparse_cross_entropy(v[0], &labels)
            } else {
                let y = t.constant(one_hot(&labels, 5));
                t.cross_entropy(v[0], y)
            }
        };
        let mut t = Tape::new();
        let x = t.param(logits.clone());
        let l = f(&mut t, &[x]);
        let g = t.grad(l, &[x], false)[0];
        let hv = hvp(f, &[logits.clone()], &[dir.clone()]);
        (t.item(l), t.value(g).clone(), hv[0].clone())
    };
    let (ld, gd, hd) = run(false);
    let (ls, gs, hs) = run(true);
    assert!((ld - ls).abs() < 1e-12, "values {ld} vs {ls}");
    assert!(max_abs_diff(&gd, &gs) < 1e-12);
    assert!(max_abs_diff(&hd, &hs) < 1e-12);
    assert!(
        hd.iter().any(|&v| v.abs() > 1e-3),
        "the Hessian-vector product is not zero"
    );
}

#[test]
fn huge_logits_stay_finite() {
    let mut t = Tape::<f32>::new();
    let x = t.param(ndarray::arr2(&[[1e4f32, 0.0, -1e4], [5e3, 1e4, 1e4]]).into_dyn());
    let l = t.sparse_cross_entropy(x, &[2, 0]);
    let g = t.grad(l, &[x], true)[0];
    let gs = t.square(g);
    let gs = t.sum(gs);
    let h = t.grad(gs, &[x], false)[0];
    assert!(t.item(l).is_finite() && t.item(l) > 1e4);
    assert!(t.value(g).iter().all(|v| v.is_finite()));
    assert!(t.value(h).iter().all(|v| v.is_finite()));
}

fn mlp_loss(t: &mut Tape<f64>, v: &[Var], x: &ArrayD<f64>, y: &ArrayD<f64>) -> Var {
    let x = t.constant(x.clone());
    let y = t.constant(y.clone());
    let h = t.matmul_t(x, v[0], false, true);
    let h = t.add(h, v[1]);
    let h = t.tanh(h);
    let o = t.matmul_t(h, v[2], false, true);
    let o = t.add(o, v[3]);
    t.mse(o, y)
}

#[test]
fn mlp_hessian_vector_product_matches_differences_of_the_gradient_and_is_symmetric() {
    let (x, y) = (rnd(&[8, 3], 100), rnd(&[8, 2], 101));
    let params = vec![
        rnd(&[6, 3], 102),
        rnd(&[6], 103),
        rnd(&[2, 6], 104),
        rnd(&[2], 105),
    ];
    let u: Vec<ArrayD<f64>> = params
        .iter()
        .enumerate()
        .map(|(i, p)| rnd(p.shape(), 200 + i as u64))
        .collect();
    let v: Vec<ArrayD<f64>> = params
        .iter()
        .enumerate()
        .map(|(i, p)| rnd(p.shape(), 300 + i as u64))
        .collect();
    let f = |t: &mut Tape<f64>, vars: &[Var]| mlp_loss(t, vars, &x, &y);
    let hv = hvp(f, &params, &v);
    // Central differences of the gradient along v.
    let grad_at = |ps: &[ArrayD<f64>]| -> Vec<ArrayD<f64>> {
        let mut t = Tape::new();
        let vars: Vec<Var> = ps.iter().map(|p| t.param(p.clone())).collect();
        let l = f(&mut t, &vars);
        t.grad(l, &vars, false)
            .iter()
            .map(|g| t.value(*g).clone())
            .collect()
    };
    let eps = 1e-5;
    let shift =
        |s: f64| -> Vec<ArrayD<f64>> { params.iter().zip(&v).map(|(p, d)| p + &(d * s)).collect() };
    let (gp, gm) = (grad_at(&shift(eps)), grad_at(&shift(-eps)));
    for i in 0..params.len() {
        let fd = (&gp[i] - &gm[i]) / (2.0 * eps);
        assert!(
            max_abs_diff(&fd, &hv[i]) < 1e-7,
            "param {i}: {}",
            max_abs_diff(&fd, &hv[i])
        );
    }
    // uᵀ H v = vᵀ H u.
    let hu = hvp(f, &params, &u);
    let dot = |a: &[ArrayD<f64>], b: &[ArrayD<f64>]| -> f64 {
        a.iter().zip(b).map(|(p, q)| (p * q).sum()).sum()
    };
    let (uhv, vhu) = (dot(&u, &hv), dot(&v, &hu));
    assert!(
        (uhv - vhu).abs() < 1e-10 * uhv.abs().max(1.0),
        "{uhv} vs {vhu}"
    );
    assert!(uhv.abs() > 1e-6);
}

#[test]
fn broadcast_gradients_keep_input_shapes() {
    let mut t = Tape::<f32>::new();
    let a = t.param(ArrayD::ones(IxDyn(&[2, 1, 3])));
    let b = t.param(ArrayD::ones(IxDyn(&[4, 1])));
    let c = t.param(ArrayD::ones(IxDyn(&[])));
    let p = t.mul(a, b);
    let p = t.add(p, c);
    let m = t.mean_axes(p, &[1], true);
    let s = t.sum(m);
    let g = t.grad(s, &[a, b, c], false);
    assert_eq!(t.shape(g[0]), &[2, 1, 3]);
    assert_eq!(t.shape(g[1]), &[4, 1]);
    assert_eq!(t.shape(g[2]), &[] as &[usize]);
    assert_eq!(t.value(g[2]).sum(), 6.0);
}

#[test]
fn backward_without_create_graph_records_nothing() {
    let mut t = Tape::<f32>::new();
    let w = t.param(ArrayD::from_elem(IxDyn(&[3, 3]), 0.5));
    let x = t.constant(ArrayD::from_elem(IxDyn(&[4, 3]), 1.0));
    let h = t.matmul(x, w);
    let h = t.tanh(h);
    let l = t.sum(h);
    let before = t.len();
    let g = t.grad(l, &[w], false);
    assert_eq!(t.len(), before + 1, "only the gradient itself is kept");
    assert!(!t.requires_grad(g[0]), "the gradient is a constant");
    let g2 = t.grad(l, &[w], true);
    assert!(
        t.len() > before + 2,
        "create_graph records the backward pass"
    );
    assert!(t.requires_grad(g2[0]));
    assert_eq!(t.value(g[0]), t.value(g2[0]));
}

#[test]
fn unconnected_inputs_get_zero_gradients() {
    let mut t = Tape::<f64>::new();
    let a = t.param(ArrayD::ones(IxDyn(&[2])));
    let b = t.param(ArrayD::ones(IxDyn(&[3])));
    let s = t.sum(a);
    let g = t.grad(s, &[a, b], false);
    assert_eq!(t.value(g[1]), &ArrayD::<f64>::zeros(IxDyn(&[3])));
}

#[test]
#[should_panic(expected = "metagrad::add: shapes [2, 3] and [4] do not broadcast")]
fn shape_misuse_names_the_op_and_both_shapes() {
    let mut t = Tape::<f32>::new();
    let a = t.constant(ArrayD::zeros(IxDyn(&[2, 3])));
    let b = t.constant(ArrayD::zeros(IxDyn(&[4])));
    t.add(a, b);
}

#[test]
#[should_panic(
    expected = "metagrad::conv2d_bias: bias [3] does not fit weight [4, 1, 3, 3] (expected [4])"
)]
fn conv_bias_misuse_names_both_shapes() {
    let mut t = Tape::<f32>::new();
    let x = t.constant(ArrayD::zeros(IxDyn(&[1, 1, 5, 5])));
    let w = t.constant(ArrayD::zeros(IxDyn(&[4, 1, 3, 3])));
    let b = t.constant(ArrayD::zeros(IxDyn(&[3])));
    t.conv2d_bias(x, w, b, 1, 1);
}

#[test]
#[should_panic(expected = "metagrad::matmul: inner dimensions differ: shapes [2, 3] and [4, 5]")]
fn matmul_misuse_names_both_shapes() {
    let mut t = Tape::<f32>::new();
    let a = t.constant(ArrayD::zeros(IxDyn(&[2, 3])));
    let b = t.constant(ArrayD::zeros(IxDyn(&[4, 5])));
    t.matmul(a, b);
}

#[test]
#[should_panic(expected = "label 7 at row 1 is out of range for 5 classes")]
fn out_of_range_sparse_label_panics_clearly() {
    let mut t = Tape::<f32>::new();
    let a = t.param(ArrayD::zeros(IxDyn(&[2, 5])));
    t.sparse_cross_entropy(a, &[0, 7]);
}

#[test]
fn tape_is_send() {
    fn is_send<T: Send>() {}
    is_send::<Tape<f32>>();
    let h = std::thread::spawn(|| {
        let mut t = Tape::<f32>::new();
        let x = t.param(ArrayD::ones(IxDyn(&[2])));
        let s = t.sum(x);
        t.item(s)
    });
    assert_eq!(h.join().unwrap(), 2.0);
}

#[test]
fn the_checks_catch_a_wrong_derivative() {
    // x · stop_gradient(x) has derivative x on the tape but 2x numerically.
    let x = rnd(&[4], 400);
    let r = gradcheck(
        |t, v| {
            let d = t.detach(v[0]);
            t.mul(v[0], d)
        },
        &[x.clone()],
    );
    assert!(!r.passed(), "gradcheck must fail: {r}");
    // d/dx of the recorded gradient (which is 2x·w for x²) is right; a detached one is not.
    let r = gradgradcheck(
        |t, v| {
            let d = t.detach(v[0]);
            let y = t.mul(v[0], d);
            t.mul(y, v[0])
        },
        &[x],
    );
    assert!(!r.passed(), "gradgradcheck must fail: {r}");
}

/// Batches whose samples share a matrix product in groups, with a last, partial group
/// (7 samples of 12×12 or 5×5, 3×3 kernel): the forward op equals the direct formula, and
/// the two adjoints satisfy `<gy, conv(x, w)> = <conv_input_grad(gy, w), x> =
/// <conv_weight_grad(x, gy), w>`.
#[test]
fn grouped_samples_match_the_direct_formula_and_the_adjoint_identity() {
    for (n, h, seed) in [(7, 12, 200), (40, 5, 210), (3, 30, 220)] {
        let x = rnd(&[n, 3, h, h], seed);
        let w = rnd(&[4, 3, 3, 3], seed + 1);
        let mut t = Tape::<f64>::new();
        let (xv, wv) = (t.param(x.clone()), t.param(w.clone()));
        let y = t.conv2d(xv, wv, 1, 1);
        let d = max_abs_diff(t.value(y), &naive_conv(&x, &w, 1));
        assert!(d < 1e-12, "N {n}, {h}x{h}: {d}");
        let gy = rnd(t.shape(y), seed + 2);
        let geom = match t.op(y) {
            metagrad::tape::Op::Conv2d(_, _, g) => *g,
            op => panic!("unexpected op {op:?}"),
        };
        let gv = t.constant(gy.clone());
        let dx = t.conv2d_input_grad(gv, wv, geom);
        let dw = t.conv2d_weight_grad(xv, gv, geom);
        let dot = |a: &ArrayD<f64>, b: &ArrayD<f64>| (a * b).sum();
        let (lhs, via_x, via_w) = (
            dot(&gy, t.value(y)),
            dot(t.value(dx), &x),
            dot(t.value(dw), &w),
        );
        let tol = 1e-10 * lhs.abs().max(1.0);
        assert!((lhs - via_x).abs() < tol, "N {n}: {lhs} vs {via_x}");
        assert!((lhs - via_w).abs() < tol, "N {n}: {lhs} vs {via_w}");
    }
}

/// A convolution with nothing to sum (zero input channels, or a zero-width kernel) is its
/// bias alone, and the bias gradient is the upstream gradient summed over N, H, W, with
/// and without a graph.
#[test]
fn conv_bias_over_an_empty_sum_is_the_bias() {
    for (xs, ws) in [([2, 0, 4, 4], [3, 0, 3, 3]), ([2, 1, 4, 4], [3, 1, 0, 3])] {
        for create_graph in [false, true] {
            let mut t = Tape::<f64>::new();
            let x = t.param(ArrayD::zeros(IxDyn(&xs)));
            let w = t.param(ArrayD::zeros(IxDyn(&ws)));
            let b = t.param(ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0, 2.0, 3.0]).unwrap());
            let pad = if ws[2] == 0 { 0 } else { 1 };
            let y = t.conv2d_bias(x, w, b, 1, pad);
            let ys = t.shape(y).to_vec();
            assert_eq!(ys[..2], [2, 3], "{xs:?} {ws:?}");
            for (o, plane) in t.value(y).axis_iter(ndarray::Axis(1)).enumerate() {
                assert!(
                    plane.iter().all(|&v| v == (o + 1) as f64),
                    "{xs:?} {ws:?}: {plane}"
                );
            }
            let s = t.sum(y);
            let g = t.grad(s, &[w, b], create_graph);
            let per_channel = (ys[0] * ys[2] * ys[3]) as f64;
            assert_eq!(t.value(g[1]).as_slice().unwrap(), &[per_channel; 3]);
            assert_eq!(t.shape(g[0]), ws);
        }
    }
}

/// A sample's convolution does not depend on the batch it comes in: the same bits for
/// sample 20 alone, in a batch of 21 (a partial last group) and in a batch of 40, for a
/// small convolution (whose products could take either kernel) and a larger one.
#[test]
fn a_samples_convolution_is_the_same_bits_in_any_batch() {
    for (c, o, h) in [(1, 2, 5), (4, 8, 9)] {
        let x40 = rnd(&[40, c, h, h], 300);
        let w = rnd(&[o, c, 3, 3], 301);
        let run = |n: usize, first: usize| {
            let mut t = Tape::<f64>::new();
            let x = x40
                .slice(ndarray::s![first..first + n, .., .., ..])
                .to_owned();
            let (xv, wv) = (t.constant(x.into_dyn()), t.constant(w.clone()));
            let y = t.conv2d(xv, wv, 1, 1);
            t.value(y)
                .index_axis(ndarray::Axis(0), 20 - first)
                .to_owned()
        };
        let alone = run(1, 20);
        assert_eq!(run(21, 0), alone, "C {c}: batch of 21");
        assert_eq!(run(40, 0), alone, "C {c}: batch of 40");
    }
}

#[test]
fn leaky_relu_and_dropout_with_a_fixed_mask() {
    let x = rnd(&[3, 4], 90);
    check("leaky_relu", |t, v| t.leaky_relu(v[0], 0.1), &[x.clone()]);
    check(
        "leaky_relu slope 2",
        |t, v| t.leaky_relu(v[0], 2.0),
        &[x.clone()],
    );
    // A fixed mask that keeps two elements in three, rescaled by 3/2.
    let drop = |t: &mut Tape<f64>, v: &[Var]| {
        let keep = (0..12).map(|i| i % 3 != 1).collect();
        t.dropout(v[0], keep, 1.5)
    };
    check("dropout", drop, &[x.clone()]);
    // Values: the slope below zero; dropped elements are zero, kept ones rescaled.
    let mut t = Tape::<f64>::new();
    let v = t.param(x.clone());
    let l = t.leaky_relu(v, 0.1);
    let d = drop(&mut t, &[v]);
    for (i, ((&a, &lr), &dr)) in x.iter().zip(t.value(l)).zip(t.value(d)).enumerate() {
        assert_eq!(lr, if a > 0.0 { a } else { 0.1 * a });
        assert_eq!(dr, if i % 3 != 1 { 1.5 * a } else { 0.0 });
    }
    // NaN stays NaN through both.
    let mut t = Tape::<f64>::new();
    let v = t.param(arr1(&[f64::NAN, 1.0]).into_dyn());
    let l = t.leaky_relu(v, 0.1);
    let d = t.dropout(v, vec![true, true], 2.0);
    assert!(t.value(l)[0].is_nan() && t.value(d)[0].is_nan());
}
