//! Values that other libraries get silently wrong: softmax, log-softmax and both
//! cross-entropies at large logits (against closed forms, which finite differences cannot
//! see), and NaN, which every op must propagate rather than hide.

use metagrad::check::hvp;
use metagrad::{Float, Tape, Var};
use ndarray::{ArrayD, IxDyn};

fn arr<F: Float>(shape: &[usize], v: &[f64]) -> ArrayD<F> {
    ArrayD::from_shape_vec(IxDyn(shape), v.iter().map(|&x| F::c(x)).collect()).unwrap()
}

/// `|got − want| ≤ ulps · ε · scale` elementwise (exact equality for infinities).
#[track_caller]
fn close<F: Float>(what: &str, got: &[F], want: &[f64], scale: f64, ulps: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let eps = F::epsilon().f64();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_finite() {
            (g.f64() - w).abs() <= ulps * eps * scale
        } else {
            g.f64() == w
        };
        assert!(
            ok,
            "{what}[{i}]: got {:e}, want {w:e} (scale {scale:e}, {ulps} ulps of {eps:e})",
            g.f64()
        );
    }
}

/// Loss, gradient and Hessian-vector product (direction `v`) of both cross-entropies at
/// `logits: [1, K]` with label `y`; checks the sparse and the dense (one-hot) forms are
/// equal, and returns the sparse one.
fn ce_both<F: Float>(logits: &[f64], y: usize, v: &[f64]) -> (F, Vec<F>, Vec<F>) {
    let k = logits.len();
    let x = arr::<F>(&[1, k], logits);
    let dir = arr::<F>(&[1, k], v);
    let mut onehot = vec![0.0; k];
    onehot[y] = 1.0;
    let labels = arr::<F>(&[1, k], &onehot);
    let sparse = move |t: &mut Tape<F>, p: &[Var]| t.sparse_cross_entropy(p[0], &[y]);
    let dense = |t: &mut Tape<F>, p: &[Var]| {
        let l = t.constant(labels.clone());
        t.cross_entropy(p[0], l)
    };
    let run = |f: &dyn Fn(&mut Tape<F>, &[Var]) -> Var| {
        let mut t = Tape::new();
        let p = t.param(x.clone());
        let l = f(&mut t, &[p]);
        let g = t.grad(l, &[p], false)[0];
        let h = hvp(f, std::slice::from_ref(&x), std::slice::from_ref(&dir));
        let flat = |a: &ArrayD<F>| a.iter().copied().collect::<Vec<F>>();
        (
            t.value(l).iter().copied().next().unwrap(),
            flat(t.value(g)),
            flat(&h[0]),
        )
    };
    let s = run(&sparse);
    let d = run(&dense);
    let same = |a: &[F], b: &[F]| a.iter().zip(b).all(|(p, q)| p == q);
    assert!(
        s.0 == d.0 && same(&s.1, &d.1) && same(&s.2, &d.2),
        "sparse {s:?} and dense {d:?} cross-entropies differ at logits {logits:?}"
    );
    s
}

fn log_softmax_of<F: Float>(logits: &[f64]) -> (Vec<F>, Vec<F>) {
    let k = logits.len();
    let mut t = Tape::<F>::new();
    let x = t.constant(arr(&[1, k], logits));
    let l = t.log_softmax(x);
    let s = t.softmax(x);
    (
        t.value(l).iter().copied().collect(),
        t.value(s).iter().copied().collect(),
    )
}

fn ties<F: Float>(magnitudes: &[f64]) {
    let ln2 = std::f64::consts::LN_2;
    for &m in magnitudes {
        for m in [m, -m] {
            let (lp, p) = log_softmax_of::<F>(&[m, m]);
            close("tie log_softmax", &lp, &[-ln2, -ln2], ln2, 2.0);
            close("tie softmax", &p, &[0.5, 0.5], 1.0, 2.0);
            let (l, g, h) = ce_both::<F>(&[m, m], 0, &[1.0, 0.0]);
            close("tie loss", &[l], &[ln2], ln2, 2.0);
            close("tie gradient", &g, &[-0.5, 0.5], 0.5, 2.0);
            // H = diag(p) − ppᵀ = [[¼, −¼], [−¼, ¼]].
            close("tie Hv", &h, &[0.25, -0.25], 0.25, 4.0);
        }
    }
}

#[test]
fn ties_at_any_magnitude_f32() {
    ties::<f32>(&[0.0, 100.0, 1e4, 1e8, 1e16, 1e30, 3e38]);
}

#[test]
fn ties_at_any_magnitude_f64() {
    ties::<f64>(&[0.0, 100.0, 1e4, 1e8, 1e16, 1e30, 1e300, 1.7e308]);
}

#[test]
fn two_ties_and_a_huge_negative_f64() {
    let ln2 = std::f64::consts::LN_2;
    let (lp, p) = log_softmax_of::<f64>(&[1e30, 1e30, -1e30]);
    close("log_softmax", &lp, &[-ln2, -ln2, -2e30], 2e30, 2.0);
    close("log_softmax", &lp[..2], &[-ln2, -ln2], ln2, 2.0);
    close("softmax", &p, &[0.5, 0.5, 0.0], 1.0, 1.0);
    let (l, g, h) = ce_both::<f64>(&[1e30, 1e30, -1e30], 0, &[1.0, -1.0, 5.0]);
    close("loss", &[l], &[ln2], ln2, 2.0);
    close("gradient", &g, &[-0.5, 0.5, 0.0], 0.5, 2.0);
    // (diag(p) − ppᵀ) v with p = (½, ½, 0), v = (1, −1, 5): (½ − 0·¼, −½ + 0, 0).
    close("Hv", &h, &[0.5, -0.5, 0.0], 0.5, 4.0);
}

/// One dominant logit: `[m, 0]` with label 0 has loss `ln(1 + e^{−m})`, gradient
/// `(−q, q)` with `q = e^{−m}/(1 + e^{−m})`, and Hessian `q(1 − q)[[1, −1], [−1, 1]]` —
/// all far below the rounding error of `p ≈ 1`.
fn dominant<F: Float>(ms: &[f64]) {
    for &m in ms {
        let e = (-m).exp();
        let q = e / (1.0 + e);
        let (l, g, h) = ce_both::<F>(&[m, 0.0], 0, &[1.0, 0.0]);
        let loss = e.ln_1p();
        close("dominant loss", &[l], &[loss], loss, 4.0);
        close("dominant gradient", &g, &[-q, q], q, 4.0);
        let hq = q * (1.0 - q);
        close("dominant Hv", &h, &[hq, -hq], hq, 8.0);
        // The other label: loss ≈ m, gradient (1 − q', …) stays accurate too.
        let (l, g, _) = ce_both::<F>(&[m, 0.0], 1, &[1.0, 0.0]);
        close("dominant other loss", &[l], &[m + loss], m + loss, 4.0);
        close(
            "dominant other gradient",
            &g,
            &[1.0 - q, -(1.0 - q)],
            1.0,
            4.0,
        );
    }
}

#[test]
fn one_dominant_logit_f32() {
    // e^{−m} stays a normal f32 up to m ≈ 87; e^{−100} is subnormal (scale-relative
    // error grows there), so stop at 80.
    dominant::<f32>(&[1.0, 10.0, 30.0, 80.0]);
}

#[test]
fn one_dominant_logit_f64() {
    dominant::<f64>(&[1.0, 10.0, 40.0, 100.0, 300.0, 700.0]);
}

#[test]
fn one_class_has_zero_loss_gradient_and_curvature() {
    for m in [0.0, -5.0, 1e30] {
        let (l, g, h) = ce_both::<f64>(&[m], 0, &[1.0]);
        assert_eq!((l, g[0], h[0]), (0.0, 0.0, 0.0), "logit {m}");
        let (l, g, h) = ce_both::<f32>(&[m], 0, &[1.0]);
        assert_eq!((l, g[0], h[0]), (0.0, 0.0, 0.0), "logit {m}");
    }
}

#[test]
fn mixed_huge_rows_stay_finite_and_exact() {
    // Differences that overflow: log-softmax saturates at −MAX instead of −∞, so a zero
    // label times it stays zero (0 · −∞ would be NaN in the dense loss).
    let row = [1.5e308, -1.5e308, 0.0];
    let (lp, p) = log_softmax_of::<f64>(&row);
    assert_eq!(lp[0], 0.0);
    assert_eq!(lp[1], -f64::MAX);
    close("lp", &lp[2..], &[-1.5e308], 1.5e308, 2.0);
    assert_eq!(p, vec![1.0, 0.0, 0.0]);
    let (l, g, h) = ce_both::<f64>(&row, 0, &[1.0, 2.0, 3.0]);
    assert_eq!((l, g.clone(), h.clone()), (0.0, vec![0.0; 3], vec![0.0; 3]));
    let (l, g, _) = ce_both::<f64>(&row, 2, &[1.0, 2.0, 3.0]);
    close("loss", &[l], &[1.5e308], 1.5e308, 2.0);
    assert_eq!(g, vec![1.0, 0.0, -1.0]);

    let row = [3e38, -3e38, 1e38, -1e38];
    let (lp, _) = log_softmax_of::<f32>(&row);
    assert!(lp.iter().all(|v| v.is_finite()), "{lp:?}");
    assert_eq!(lp[0], 0.0);
    let (l, g, h) = ce_both::<f32>(&row, 2, &[1.0, 0.0, 0.0, 1.0]);
    close("f32 loss", &[l], &[2e38], 2e38, 2.0);
    assert_eq!(g, vec![1.0, 0.0, -1.0, 0.0]);
    assert!(h.iter().all(|v| *v == 0.0), "{h:?}");
    // The true loss 4e38 of label 3 is beyond f32: it saturates at the largest finite.
    let (l, _, _) = ce_both::<f32>(&row, 3, &[1.0, 0.0, 0.0, 1.0]);
    assert_eq!(l, f32::MAX);

    // Several rows of different scales in one batch: each row as accurate as alone.
    let mut t = Tape::<f64>::new();
    let x = t.param(arr(&[3, 2], &[1e30, 1e30, 0.0, 0.0, 100.0, 0.0]));
    let l = t.sparse_cross_entropy(x, &[0, 1, 0]);
    let want = (2.0 * std::f64::consts::LN_2 + (-100f64).exp().ln_1p()) / 3.0;
    close("batch loss", &[t.item(l)], &[want], want, 4.0);
}

#[test]
fn soft_labels_at_large_logits() {
    // Dense labels (½, ½) on a tie: loss ln 2 (the entropy), gradient exactly zero.
    let mut t = Tape::<f32>::new();
    let x = t.param(arr(&[1, 2], &[1e20, 1e20]));
    let y = t.constant(arr(&[1, 2], &[0.5, 0.5]));
    let l = t.cross_entropy(x, y);
    close::<f32>(
        "loss",
        &[t.item(l) as f32],
        &[std::f64::consts::LN_2],
        0.7,
        1.0,
    );
    let g = t.grad(l, &[x], false)[0];
    assert!(t.value(g).iter().all(|v| *v == 0.0), "{:?}", t.value(g));
}

#[test]
fn new_primitives_pass_their_gradient_checks() {
    use metagrad::check::{gradcheck, gradgradcheck};
    let x = arr::<f64>(&[2, 3], &[0.3, -1.2, 0.05, 2.0, -0.4, 1.1]);
    for (name, f) in [
        (
            "softmax",
            (|t: &mut Tape<f64>, v: &[Var]| t.softmax(v[0])) as fn(&mut _, &[Var]) -> Var,
        ),
        ("sum_others", |t, v| {
            let s = t.sum_others(v[0]);
            t.mul(s, s)
        }),
        ("log_softmax", |t, v| t.log_softmax(v[0])),
    ] {
        let r = gradcheck(f, std::slice::from_ref(&x));
        assert!(r.passed(), "{name}: {r}");
        let r = gradgradcheck(f, std::slice::from_ref(&x));
        assert!(r.passed(), "{name}: {r}");
    }
    let mut t = Tape::<f64>::new();
    let a = t.constant(x.clone());
    let s = t.sum_others(a);
    let got: Vec<f64> = t.value(s).iter().copied().collect();
    close(
        "sum_others",
        &got,
        &[-1.15, 0.35, -0.9, 0.7, 3.1, 1.6],
        2.0,
        2.0,
    );
}

// ---- NaN is never hidden -------------------------------------------------------------

fn has_nan<F: Float>(a: &ArrayD<F>) -> bool {
    a.iter().any(|v| v.is_nan())
}

#[test]
fn relu_max_and_pooling_keep_nan() {
    let nan = f64::NAN;
    let mut t = Tape::<f32>::new();
    let x = t.param(arr(&[1, 4], &[nan, -1.0, 2.0, 0.0]));
    let r = t.relu(x);
    let v: Vec<f32> = t.value(r).iter().copied().collect();
    assert!(v[0].is_nan() && v[1..] == [0.0, 2.0, 0.0], "relu {v:?}");
    let s = t.sum(r);
    let g = t.grad(s, &[x], false)[0];
    assert_eq!(t.value(g).iter().filter(|v| v.is_nan()).count(), 0);

    // maximum: NaN on either side wins.
    let a = t.constant(arr(&[3], &[nan, 1.0, 3.0]));
    let b = t.constant(arr(&[3], &[0.0, nan, 2.0]));
    let m = t.maximum(a, b);
    let v: Vec<f32> = t.value(m).iter().copied().collect();
    assert!(
        v[0].is_nan() && v[1].is_nan() && v[2] == 3.0,
        "maximum {v:?}"
    );

    // max over an axis: NaN anywhere on the axis, first or last.
    for pos in 0..4 {
        let mut row = [1.0, 5.0, -2.0, 0.5];
        row[pos] = nan;
        let a = t.constant(arr(&[1, 4], &row));
        let m = t.max_axis(a, 1, false);
        assert!(t.item(m).is_nan(), "max_axis with NaN at {pos}");
    }

    // Max-pooling and its ReLU form, NaN at every position of a 2×2 window (fast path)
    // and of a 3×3 window (general path).
    for (k, hw) in [(2usize, 4usize), (3, 3)] {
        for pos in 0..k * k {
            let mut img = vec![-1.0; hw * hw];
            let (i, j) = (pos / k, pos % k);
            img[i * hw + j] = nan;
            let x = t.param(arr(&[1, 1, hw, hw], &img));
            for relu in [false, true] {
                let p = if relu {
                    t.relu_max_pool2d(x, k, k)
                } else {
                    t.max_pool2d(x, k, k)
                };
                assert!(
                    t.value(p).iter().next().unwrap().is_nan(),
                    "pool k={k} relu={relu} NaN at {pos}: {:?}",
                    t.value(p)
                );
            }
        }
    }
}

#[test]
fn fused_batch_norm_pooling_keeps_nan() {
    let mut t = Tape::<f32>::new();
    let mut x = vec![0.5; 2 * 2 * 4 * 4];
    x[5] = f64::NAN; // sample 0, channel 0
    let x = t.param(arr(&[2, 2, 4, 4], &x));
    let gamma = t.param(arr(&[2], &[1.0, -1.0]));
    let beta = t.param(arr(&[2], &[0.0, 0.0]));
    let y = t.batch_norm_relu_max_pool2d(x, gamma, beta, 1e-5, 2, 2);
    // Channel 0's batch statistics are NaN, so all of channel 0 is NaN, nothing else.
    let v = t.value(y.0).clone();
    for n in 0..2 {
        for c in 0..2 {
            let plane = v.index_axis(ndarray::Axis(0), n);
            let plane = plane.index_axis(ndarray::Axis(0), c);
            assert_eq!(
                plane.iter().all(|v| v.is_nan()),
                c == 0,
                "n={n} c={c}: {plane:?}"
            );
        }
    }
}

#[test]
fn losses_and_reductions_keep_nan() {
    let nan = f64::NAN;
    let mut t = Tape::<f64>::new();
    let x = t.param(arr(&[2, 3], &[nan, 1.0, 2.0, 0.0, 1.0, 2.0]));
    let l = t.log_softmax(x);
    let v = t.value(l).clone();
    let v: Vec<f64> = v.iter().copied().collect();
    assert!(v[..3].iter().all(|v| v.is_nan()) && v[3..].iter().all(|v| v.is_finite()));
    for loss in [t.sparse_cross_entropy(x, &[1, 1]), {
        let y = t.constant(arr(&[2, 3], &[0.0, 1.0, 0.0, 0.0, 1.0, 0.0]));
        t.cross_entropy(x, y)
    }] {
        assert!(t.item(loss).is_nan());
        let g = t.grad(loss, &[x], false)[0];
        assert!(has_nan(t.value(g)));
    }
    let s = t.sum(x);
    assert!(t.item(s).is_nan());
    let y = t.constant(arr(&[2, 3], &[0.0; 6]));
    let m = t.mse(x, y);
    assert!(t.item(m).is_nan());
}

/// Batch-norm statistics of f32 activations far from zero, with planes whose means
/// differ (so the per-plane parts must be combined correctly): the mean and variance
/// agree with a two-pass f64 reference to f32 accuracy, relative to the variance.
#[test]
fn batch_norm_statistics_are_accurate_far_from_zero() {
    let (n, c, p) = (6, 3, 49);
    let mut state = 12345u64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let v: Vec<f32> = (0..n * c * p)
        .map(|i| {
            let (sample, ch) = (i / (c * p), (i / p) % c);
            (1e4 * (ch + 1) as f64 + 3.0 * sample as f64 + uniform()) as f32
        })
        .collect();
    let mut t = Tape::<f32>::new();
    let x = t.constant(ArrayD::from_shape_vec(IxDyn(&[n, c, 7, 7]), v.clone()).unwrap());
    let (g, b) = (
        t.constant(ArrayD::ones(IxDyn(&[c]))),
        t.constant(ArrayD::zeros(IxDyn(&[c]))),
    );
    let (_, stats) = t.batch_norm_batch_stats(x, g, b, 1e-5);
    for ch in 0..c {
        let xs: Vec<f64> = (0..n)
            .flat_map(|s| {
                v[(s * c + ch) * p..(s * c + ch + 1) * p]
                    .iter()
                    .map(|&x| x as f64)
            })
            .collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            (stats.mean[ch] - mean).abs() <= 1e-6 * mean.abs(),
            "channel {ch} mean"
        );
        assert!(
            (stats.var[ch] - var).abs() <= 1e-4 * var,
            "channel {ch}: variance {} vs {var}",
            stats.var[ch]
        );
    }
}
