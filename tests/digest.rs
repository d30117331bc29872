//! `Params::digest`: a real 64-bit digest of the element type, names, shapes and every bit
//! of every value.

use metagrad::meta::{MetaConfig, MetaLearner};
use metagrad::nn::{Conv4, Mlp, Model, Params};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashSet;

fn small() -> Params<f32> {
    Mlp::new(vec![3, 5, 2]).init(7)
}

/// Rebuilds `p` with `f` applied to its (name, tensor) pairs in order.
fn rebuilt<F: metagrad::Float>(
    p: &Params<F>,
    mut f: impl FnMut(usize, &str, &ArrayD<F>) -> (String, ArrayD<F>),
) -> Params<F> {
    let mut out = Params::new();
    for (i, (n, t)) in p.iter().enumerate() {
        let (n, t) = f(i, n, t);
        out.push(n, t);
    }
    out
}

#[test]
fn every_single_bit_of_every_value_changes_the_digest() {
    for p in [small(), Conv4::omniglot(5).init(1)] {
        let d = p.digest();
        assert_eq!(p.clone().digest(), d, "deterministic");
        let mut seen = HashSet::new();
        for ti in 0..p.len() {
            let n = p.tensors()[ti].len();
            // Every bit of a few values in each tensor (all of them for small tensors).
            for vi in (0..n).step_by((n / 7).max(1)) {
                for bit in 0..32 {
                    let mut q = p.clone();
                    let v = &mut q.tensors_mut()[ti].as_slice_mut().unwrap()[vi];
                    *v = f32::from_bits(v.to_bits() ^ (1 << bit));
                    let dq = q.digest();
                    assert_ne!(dq, d, "tensor {ti} value {vi} bit {bit}");
                    assert!(seen.insert(dq), "two one-bit changes collide");
                }
            }
        }
    }
    // f64 values too, including the low bits an f32 widening would leave zero.
    let p = small().cast::<f64>();
    let d = p.digest();
    for bit in 0..64 {
        let mut q = p.clone();
        let v = &mut q.tensors_mut()[0].as_slice_mut().unwrap()[0];
        *v = f64::from_bits(v.to_bits() ^ (1 << bit));
        assert_ne!(q.digest(), d, "bit {bit}");
    }
}

#[test]
fn sign_flips_do_not_cancel() {
    let p = small();
    let d = p.digest();
    let flip = |q: &mut Params<f32>, ti: usize, vi: usize| {
        let v = &mut q.tensors_mut()[ti].as_slice_mut().unwrap()[vi];
        *v = -*v;
    };
    let mut two = p.clone();
    flip(&mut two, 0, 0);
    flip(&mut two, 0, 1);
    assert_ne!(two.digest(), d);
    let mut apart = p.clone();
    flip(&mut apart, 0, 3);
    flip(&mut apart, 2, 4);
    assert_ne!(apart.digest(), d);
    assert_ne!(apart.digest(), two.digest());
    // Swapping two different values is a change too.
    let mut swapped = p.clone();
    swapped.tensors_mut()[0].as_slice_mut().unwrap().swap(0, 1);
    assert_ne!(
        p.tensors()[0].as_slice().unwrap()[0],
        p.tensors()[0].as_slice().unwrap()[1]
    );
    assert_ne!(swapped.digest(), d);
}

#[test]
fn names_order_shapes_and_the_float_type_are_hashed() {
    let p = small();
    let d = p.digest();
    // A renamed parameter.
    let renamed = rebuilt(&p, |i, n, t| {
        (if i == 1 { "l0.bias".into() } else { n.into() }, t.clone())
    });
    assert_ne!(renamed.digest(), d);
    // Two parameters in another order (same names, same tensors).
    let mut reordered = Params::new();
    let order = [1, 0, 2, 3];
    for &i in &order {
        reordered.push(p.names()[i].clone(), p.tensors()[i].clone());
    }
    assert_ne!(reordered.digest(), d);
    // The same values in another shape.
    let reshaped = rebuilt(&p, |i, n, t| {
        let t = if i == 0 {
            let v: Vec<f32> = t.iter().copied().collect();
            ArrayD::from_shape_vec(IxDyn(&[t.len()]), v).unwrap()
        } else {
            t.clone()
        };
        (n.into(), t)
    });
    assert_ne!(reshaped.digest(), d);
    // Values moved across the boundary between two tensors (same flat stream).
    let mut a = Params::<f32>::new();
    a.push(
        "x",
        ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, 2.0]).unwrap(),
    );
    a.push("y", ArrayD::from_shape_vec(IxDyn(&[1]), vec![3.0]).unwrap());
    let mut b = Params::<f32>::new();
    b.push("x", ArrayD::from_shape_vec(IxDyn(&[1]), vec![1.0]).unwrap());
    b.push(
        "y",
        ArrayD::from_shape_vec(IxDyn(&[2]), vec![2.0, 3.0]).unwrap(),
    );
    assert_ne!(a.digest(), b.digest());
    // The same values as f64.
    assert_ne!(p.cast::<f64>().digest(), d);
    // An empty set has a digest, and it differs by type.
    assert_ne!(Params::<f32>::new().digest(), Params::<f64>::new().digest());
}

#[test]
fn a_thousand_initialisations_give_a_thousand_digests_with_no_constant_bit() {
    let model = Mlp::sinusoid();
    let digests: Vec<u64> = (0..1000u64)
        .map(|seed| Model::<f32>::init(&model, seed).digest())
        .collect();
    let distinct: HashSet<_> = digests.iter().collect();
    assert_eq!(distinct.len(), 1000);
    let (all_and, all_or) = digests
        .iter()
        .fold((u64::MAX, 0u64), |(a, o), &d| (a & d, o | d));
    assert_eq!(all_and, 0, "bits set in every digest: {all_and:064b}");
    assert_eq!(
        all_or,
        u64::MAX,
        "bits clear in every digest: {:064b}",
        !all_or
    );
    // Each bit is set in roughly half of them (binomial(1000, 1/2): 5 sd is about 80).
    for bit in 0..64 {
        let ones = digests.iter().filter(|&&d| d >> bit & 1 == 1).count();
        assert!(
            (420..=580).contains(&ones),
            "bit {bit} set in {ones} of 1000"
        );
    }
}

#[test]
fn learners_of_other_seeds_differ_and_the_same_seed_agrees() {
    let a = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 3);
    let b = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 3);
    let c = MetaLearner::<f32, _>::new(Mlp::sinusoid(), MetaConfig::maml(1, 0.01), 4);
    assert_eq!(a.params, b.params);
    assert_eq!(a.params.digest(), b.params.digest());
    assert_ne!(a.params.digest(), c.params.digest());
}
