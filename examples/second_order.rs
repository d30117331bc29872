//! Second derivatives through the tape, checked against finite differences (in `f64`).
//!
//! ```text
//! cargo run --release --example second_order
//! ```
//!
//! Part 1: the Hessian-vector product `H·v` of softmax cross-entropy with respect to the
//! logits, for dense one-hot labels ([`Tape::cross_entropy`]) and for sparse integer labels
//! ([`Tape::sparse_cross_entropy`]), by [`metagrad::check::hvp`], against the central
//! difference of the gradient along `v`, `(∇L(x + εv) − ∇L(x − εv)) / 2ε`, and against the
//! closed form `(diag(p) − p pᵀ) v / N` per row. The HVP norm is printed too: a silent zero
//! (as TensorFlow's fused cross-entropies once returned) would show there.
//!
//! Part 2: the second-order MAML meta-gradient of a tiny MLP on one sinusoid task, against
//! the central difference of the adapt-then-evaluate query loss along random directions;
//! the first-order (FOMAML) meta-gradient for contrast.
//!
//! Ends with one line `RESULT {json}`.

use metagrad::check::{hvp, max_abs_diff};
use metagrad::data::SinusoidSampler;
use metagrad::meta::{MetaConfig, MetaLearner, Order, Task};
use metagrad::nn::{Mlp, NormMode};
use metagrad::{Tape, Var};
use ndarray::{Array2, ArrayD, Ix2};
use ndarray_rand::rand_distr::StandardNormal;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::error::Error;
use std::time::Instant;

/// Rows (examples) and classes of the random logits.
const N: usize = 16;
const K: usize = 10;
/// Step of the central differences.
const EPS: f64 = 1e-5;

fn norm(a: &ArrayD<f64>) -> f64 {
    a.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn gaussian(rng: &mut ChaCha8Rng, shape: &[usize], scale: f64) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(shape, || scale * rng.sample::<f64, _>(StandardNormal))
}

/// The gradient of `loss` at `x` (first order only).
fn gradient(loss: &dyn Fn(&mut Tape<f64>, Var) -> Var, x: &ArrayD<f64>) -> ArrayD<f64> {
    let mut t = Tape::new();
    let v = t.param(x.clone());
    let l = loss(&mut t, v);
    let g = t.grad(l, &[v], false)[0];
    t.value(g).clone()
}

/// `(∇L(x + εv) − ∇L(x − εv)) / 2ε`.
fn fd_hvp(
    loss: &dyn Fn(&mut Tape<f64>, Var) -> Var,
    x: &ArrayD<f64>,
    v: &ArrayD<f64>,
) -> ArrayD<f64> {
    let up = gradient(loss, &(x + &(v * EPS)));
    let down = gradient(loss, &(x - &(v * EPS)));
    (up - down) / (2.0 * EPS)
}

/// The closed form: row i of `H v` is `(p_i ⊙ v_i − p_i (p_i · v_i)) / N`.
fn exact_hvp(x: &ArrayD<f64>, v: &ArrayD<f64>) -> ArrayD<f64> {
    let x = x.view().into_dimensionality::<Ix2>().expect("[N, K]");
    let v = v.view().into_dimensionality::<Ix2>().expect("[N, K]");
    let n = x.nrows() as f64;
    let mut out = Array2::<f64>::zeros(x.raw_dim());
    for ((xr, vr), mut or) in x.outer_iter().zip(v.outer_iter()).zip(out.outer_iter_mut()) {
        let m = xr.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let e = xr.mapv(|z| (z - m).exp());
        let p = &e / e.sum();
        let pv = p.dot(&vr);
        or.assign(&((&p * &vr - &p * pv) / n));
    }
    out.into_dyn()
}

fn part1(rng: &mut ChaCha8Rng) -> serde_json::Value {
    println!("== Part 1: Hessian-vector products of softmax cross-entropy (f64) ==");
    let logits = gaussian(rng, &[N, K], 2.0);
    let labels: Vec<usize> = (0..N).map(|_| rng.gen_range(0..K)).collect();
    let mut onehot = ArrayD::<f64>::zeros(vec![N, K]);
    for (i, &y) in labels.iter().enumerate() {
        onehot[[i, y]] = 1.0;
    }
    let v = gaussian(rng, &[N, K], 1.0);
    println!("logits [{N}, {K}] ~ N(0, 2²), random labels, direction v ~ N(0, 1), ε = {EPS:e}");

    let dense = {
        let onehot = onehot.clone();
        move |t: &mut Tape<f64>, x: Var| {
            let y = t.constant(onehot.clone());
            t.cross_entropy(x, y)
        }
    };
    let sparse = {
        let labels = labels.clone();
        move |t: &mut Tape<f64>, x: Var| t.sparse_cross_entropy(x, &labels)
    };
    let exact = exact_hvp(&logits, &v);
    let mut out = serde_json::Map::new();
    let mut hvps = Vec::new();
    for (name, loss) in [
        (
            "dense one-hot labels",
            &dense as &dyn Fn(&mut Tape<f64>, Var) -> Var,
        ),
        ("sparse integer labels", &sparse),
    ] {
        let hv = hvp(
            |t: &mut Tape<f64>, xs: &[Var]| loss(t, xs[0]),
            std::slice::from_ref(&logits),
            std::slice::from_ref(&v),
        )
        .remove(0);
        let fd = fd_hvp(loss, &logits, &v);
        let err_fd = max_abs_diff(&hv, &fd);
        let err_exact = max_abs_diff(&hv, &exact);
        let n = norm(&hv);
        println!(
            "{name:<22}: ‖Hv‖ = {n:.6e}   max|Hv − FD| = {err_fd:.3e}   max|Hv − closed form| \
             = {err_exact:.3e}"
        );
        out.insert(
            if name.starts_with("dense") { "dense" } else { "sparse" }.into(),
            json!({ "hvp_norm": n, "max_abs_diff_fd": err_fd, "max_abs_diff_closed_form": err_exact }),
        );
        hvps.push(hv);
    }
    let dense_vs_sparse = max_abs_diff(&hvps[0], &hvps[1]);
    println!("dense vs sparse HVP   : max|Hv_dense − Hv_sparse| = {dense_vs_sparse:.3e}");
    println!(
        "(A zero ‖Hv‖ would be a silent failure: TensorFlow's sparse_softmax_cross_entropy_with_logits \
         once returned an all-zero Hessian here — tensorflow/tensorflow#5876 — and its dense \
         softmax_cross_entropy_with_logits did too before a fix, #7403.)"
    );
    let ok = hvps.iter().all(|h| norm(h) > 1e-3)
        && out
            .values()
            .all(|r| r["max_abs_diff_fd"].as_f64().unwrap_or(f64::INFINITY) < 1e-7);
    println!("part 1: {}", if ok { "OK" } else { "MISMATCH" });
    json!({
        "n": N, "k": K, "eps": EPS,
        "dense": out["dense"], "sparse": out["sparse"],
        "max_abs_diff_dense_vs_sparse": dense_vs_sparse,
        "ok": ok,
    })
}

fn part2(rng: &mut ChaCha8Rng) -> Result<serde_json::Value, Box<dyn Error>> {
    println!();
    println!(
        "== Part 2: MAML meta-gradient vs central difference of the adapt-then-evaluate loss =="
    );
    let sizes = vec![1, 16, 16, 1];
    let (inner_steps, inner_lr) = (2usize, 0.05);
    let directions = 5usize;
    let batch = SinusoidSampler::new(10, 10, 3)?.sample_batch(1)?;
    let task = Task::<f64>::from_sinusoid(&batch).remove(0);
    let model = Mlp::new(sizes);
    let second =
        MetaLearner::<f64, _>::new(model.clone(), MetaConfig::maml(inner_steps, inner_lr), 1);
    let first = MetaLearner::<f64, _>::new(
        model.clone(),
        MetaConfig::maml(inner_steps, inner_lr).with_order(Order::First),
        1,
    );
    println!(
        "MLP {:?} ({} parameters), one sinusoid task (A = {:.3}, phase = {:.3}), K = 10 support, \
         10 query, {inner_steps} inner SGD steps of lr {inner_lr}, ε = {EPS:e}, {directions} \
         random unit directions",
        model.sizes,
        second.params.num_elements(),
        batch.amplitudes[0],
        batch.phases[0]
    );
    let (g2, _, _) = second.meta_gradient(std::slice::from_ref(&task))?;
    let (g1, _, _) = first.meta_gradient(std::slice::from_ref(&task))?;

    // The meta-loss as a function of the meta-parameters, evaluated without any tape
    // bookkeeping for derivatives: adapt on the support set, then the query MSE.
    let meta_loss = |shift: &[ArrayD<f64>], scale: f64| -> f64 {
        let mut l = second.clone();
        for (p, d) in l.params.tensors_mut().iter_mut().zip(shift) {
            p.scaled_add(scale, d);
        }
        l.evaluate_task(&task, inner_steps, NormMode::Transductive)
            .expect("a finite loss near the learned parameters")
            .0
    };
    let dot = |a: &[ArrayD<f64>], b: &[ArrayD<f64>]| -> f64 {
        a.iter().zip(b).map(|(x, y)| (x * y).sum()).sum()
    };
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE);
    let mut rows = Vec::new();
    let (mut worst2, mut worst1) = (0.0f64, f64::INFINITY);
    for i in 0..directions {
        let mut d: Vec<ArrayD<f64>> = second
            .params
            .tensors()
            .iter()
            .map(|p| gaussian(rng, p.shape(), 1.0))
            .collect();
        let nd = dot(&d, &d).sqrt();
        d.iter_mut().for_each(|x| *x /= nd);
        let fd = (meta_loss(&d, EPS) - meta_loss(&d, -EPS)) / (2.0 * EPS);
        let (a2, a1) = (dot(&g2, &d), dot(&g1, &d));
        let (r2, r1) = (rel(a2, fd), rel(a1, fd));
        worst2 = worst2.max(r2);
        worst1 = worst1.min(r1);
        println!(
            "direction {i}: central difference {fd:+.10e}   second order {a2:+.10e} (rel. err \
             {r2:.2e})   first order {a1:+.10e} (rel. err {r1:.2e})"
        );
        rows.push(json!({ "fd": fd, "second_order": a2, "first_order": a1,
                          "rel_err_second_order": r2, "rel_err_first_order": r1 }));
    }
    let diff: Vec<ArrayD<f64>> = g2.iter().zip(&g1).map(|(a, b)| a - b).collect();
    let gap = dot(&diff, &diff).sqrt() / dot(&g2, &g2).sqrt();
    println!(
        "worst relative error, second order: {worst2:.2e}; best relative error, first order: \
         {worst1:.2e}; ‖g_2nd − g_1st‖ / ‖g_2nd‖ = {gap:.3e}"
    );
    let ok = worst2 < 1e-5 && worst1 > 10.0 * worst2;
    println!("part 2: {}", if ok { "OK" } else { "MISMATCH" });
    Ok(json!({
        "mlp": model.sizes, "params": second.params.num_elements(),
        "inner_steps": inner_steps, "inner_lr": inner_lr, "eps": EPS,
        "directions": rows,
        "max_rel_err_second_order": worst2,
        "min_rel_err_first_order": worst1,
        "rel_gap_first_vs_second": gap,
        "ok": ok,
    }))
}

fn main() -> Result<(), Box<dyn Error>> {
    let start = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let p1 = part1(&mut rng);
    let p2 = part2(&mut rng)?;
    let elapsed = start.elapsed().as_secs_f64();
    println!("wall-clock time: {:.1} ms", 1e3 * elapsed);
    let result = json!({
        "example": "second_order",
        "hvp_cross_entropy": p1,
        "maml_meta_gradient": p2,
        "ok": p1["ok"].as_bool() == Some(true) && p2["ok"].as_bool() == Some(true),
        "wall_seconds": elapsed,
    });
    println!("RESULT {result}");
    Ok(())
}
