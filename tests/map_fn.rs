//! The meta-batch mapper: order, gradients, thread-count independence, and errors.

// Inputs are written `&[w.clone()]` for uniformity with multi-input calls.
#![allow(clippy::cloned_ref_to_slice_refs)]

use metagrad::check::max_abs_diff;
use metagrad::map_fn::{with_threads, MapFn};
use metagrad::{Error, Tape, Var};
use ndarray::{ArrayD, Axis, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rnd(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.gen_range(-1.0..1.0))
}

/// A small per-task network: tanh(x W) summed against y, squared.
fn task_fn(t: &mut Tape<f64>, xs: &[Var], ps: &[Var]) -> Var {
    let h = t.matmul(xs[0], ps[0]);
    let h = t.tanh(h);
    let h = t.mul(h, xs[1]);
    let s = t.sum_axes(h, &[0], false);
    t.square(s)
}

#[test]
fn map_vjp_equals_a_sequential_loop_bitwise_for_any_threads_and_bound() {
    let x = rnd(&[13, 5, 4], 1);
    let y = rnd(&[13, 5, 3], 2);
    let w = rnd(&[4, 3], 3);
    let seed = rnd(&[13, 3], 4);
    // The reference: a plain loop, gradients summed in task order.
    let mut outs = Vec::new();
    let mut gx = Vec::new();
    let mut gw = ArrayD::<f64>::zeros(IxDyn(&[4, 3]));
    for i in 0..13 {
        let mut t = Tape::new();
        let xi = t.param(x.index_axis(Axis(0), i).to_owned());
        let yi = t.param(y.index_axis(Axis(0), i).to_owned());
        let wv = t.param(w.clone());
        let out = task_fn(&mut t, &[xi, yi], &[wv]);
        let s = t.constant(seed.index_axis(Axis(0), i).to_owned());
        let g = t.vjp(out, s, &[xi, yi, wv], false);
        outs.push(t.value(out).clone());
        gx.push(t.value(g[0]).clone());
        gw += t.value(g[2]);
    }
    for threads in [1, 2, 8] {
        for bound in [1, 2, 5, 64] {
            let r = with_threads(threads, || {
                MapFn::new(bound)
                    .map_vjp(&[x.clone(), y.clone()], &[w.clone()], task_fn, Some(&seed))
                    .unwrap()
            });
            for (i, o) in outs.iter().enumerate() {
                assert_eq!(
                    &r.outputs.index_axis(Axis(0), i).to_owned(),
                    o,
                    "output {i}"
                );
                assert_eq!(&r.input_grads[0].index_axis(Axis(0), i).to_owned(), &gx[i]);
            }
            assert_eq!(r.param_grads[0], gw, "threads {threads}, bound {bound}");
            let fwd = with_threads(threads, || {
                MapFn::new(bound)
                    .map(&[x.clone(), y.clone()], &[w.clone()], task_fn)
                    .unwrap()
            });
            assert_eq!(fwd, r.outputs);
        }
    }
}

#[test]
fn gradients_through_the_mapper_match_finite_differences() {
    let x = rnd(&[4, 3, 2], 5);
    let y = rnd(&[4, 3, 2], 6);
    let w = rnd(&[2, 2], 7);
    let seed = rnd(&[4, 2], 8);
    let m = MapFn::new(2);
    let r = m
        .map_vjp(&[x.clone(), y.clone()], &[w.clone()], task_fn, Some(&seed))
        .unwrap();
    let total = |w: &ArrayD<f64>, x: &ArrayD<f64>| -> f64 {
        let o = m
            .map(&[x.clone(), y.clone()], &[w.clone()], task_fn)
            .unwrap();
        (&o * &seed).sum()
    };
    let eps = 1e-6;
    let mut fd_w = ArrayD::zeros(w.raw_dim());
    for j in 0..w.len() {
        let (mut a, mut b) = (w.clone(), w.clone());
        a.as_slice_mut().unwrap()[j] += eps;
        b.as_slice_mut().unwrap()[j] -= eps;
        fd_w.as_slice_mut().unwrap()[j] = (total(&a, &x) - total(&b, &x)) / (2.0 * eps);
    }
    assert!(max_abs_diff(&fd_w, &r.param_grads[0]) < 1e-7);
    let mut fd_x = ArrayD::zeros(x.raw_dim());
    for j in 0..x.len() {
        let (mut a, mut b) = (x.clone(), x.clone());
        a.as_slice_mut().unwrap()[j] += eps;
        b.as_slice_mut().unwrap()[j] -= eps;
        fd_x.as_slice_mut().unwrap()[j] = (total(&w, &a) - total(&w, &b)) / (2.0 * eps);
    }
    assert!(max_abs_diff(&fd_x, &r.input_grads[0]) < 1e-7);
}

#[test]
fn mismatched_task_counts_are_a_clear_error() {
    let err = MapFn::new(2)
        .map(&[rnd(&[3, 2], 9), rnd(&[4, 2], 10)], &[], |t, xs, _| {
            t.sum(xs[0])
        })
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("input 1 has shape [4, 2]")),
        "{err}"
    );
}

#[test]
fn a_task_panic_surfaces_with_its_index() {
    let err = MapFn::new(4)
        .map(&[rnd(&[5, 2], 11)], &[], |t, xs, _| {
            let v = t.value(xs[0])[[0]];
            if v > 0.0 {
                let bad = t.zeros(&[3]);
                t.add(xs[0], bad) // shapes [2] and [3]
            } else {
                t.sum(xs[0])
            }
        })
        .unwrap_err();
    match err {
        Error::Task { index, message } => {
            let x = rnd(&[5, 2], 11);
            let first = (0..5).find(|&i| x[[i, 0]] > 0.0).unwrap();
            assert_eq!(index, first);
            assert!(
                message.contains("metagrad::add: shapes [2] and [3]"),
                "{message}"
            );
        }
        e => panic!("unexpected {e}"),
    }
}
