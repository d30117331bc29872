//! The backward pass: [`Tape::grad`] and [`Tape::vjp`].

use super::vjp::{self, Form};
use super::{Op, Tape, Var};
use crate::Float;
use ndarray::ArrayD;

impl<F: Float> Tape<F> {
    /// Gradients of the one-element tensor `output` with respect to each of `wrt`.
    ///
    /// With `create_graph = true` the backward pass is recorded on this tape, so the
    /// returned gradients can be differentiated again (second-order MAML, Hessian-vector
    /// products). With `create_graph = false` it records nothing: the gradients come back
    /// as constants and the tape keeps only them (the fast path for first-order methods and
    /// plain training).
    ///
    /// A `wrt` that `output` does not depend on gets a gradient of zeros.
    ///
    /// # Panics
    /// If `output` has more than one element (use [`Tape::vjp`]), or if a `wrt` is a
    /// constant (place it with [`Tape::param`]).
    #[track_caller]
    pub fn grad(&mut self, output: Var, wrt: &[Var], create_graph: bool) -> Vec<Var> {
        let shape = self.shape(output).to_vec();
        assert!(
            shape.iter().product::<usize>() == 1,
            "metagrad::grad: output must have one element, got shape {shape:?}; \
             reduce it first (sum, mean) or use Tape::vjp with a seed"
        );
        let start = self.len();
        let seed = self.constant(ArrayD::ones(shape));
        self.backward_filled(&[(output, seed)], wrt, create_graph, start)
    }

    /// Vector-Jacobian products: the gradients of `sum(output * seed)` with respect to each
    /// of `wrt`. See [`Tape::grad`] for `create_graph`.
    ///
    /// # Panics
    /// If `seed` and `output` differ in shape, or a `wrt` is a constant.
    #[track_caller]
    pub fn vjp(&mut self, output: Var, seed: Var, wrt: &[Var], create_graph: bool) -> Vec<Var> {
        assert!(
            self.shape(seed) == self.shape(output),
            "metagrad::vjp: seed shape {:?} differs from output shape {:?}",
            self.shape(seed),
            self.shape(output)
        );
        let start = self.len();
        self.backward_filled(&[(output, seed)], wrt, create_graph, start)
    }

    /// Vector-Jacobian products of several outputs at once: the gradients of
    /// `Σⱼ sum(outputs[j] * seeds[j])` with respect to each of `wrt`, in one backward pass.
    /// See [`Tape::grad`] for `create_graph`; a `wrt` that no output depends on gets a
    /// gradient of zeros.
    ///
    /// ```
    /// use metagrad::Tape;
    /// use ndarray::arr1;
    /// let mut t = Tape::<f64>::new();
    /// let x = t.param(arr1(&[1.0, 2.0]).into_dyn());
    /// let y = t.square(x);                         // x²
    /// let z = t.mul_scalar(x, 3.0);                // 3x
    /// let sy = t.constant(arr1(&[1.0, 1.0]).into_dyn());
    /// let sz = t.constant(arr1(&[2.0, 0.0]).into_dyn());
    /// let g = t.grad_seeded(&[y, z], &[sy, sz], &[x], false)[0];
    /// assert_eq!(t.value(g).as_slice().unwrap(), &[2.0 + 6.0, 4.0]);
    /// ```
    ///
    /// # Panics
    /// If `outputs` and `seeds` differ in length, an output appears twice, a seed's shape
    /// differs from its output's, or a `wrt` is a constant.
    #[track_caller]
    pub fn grad_seeded(
        &mut self,
        outputs: &[Var],
        seeds: &[Var],
        wrt: &[Var],
        create_graph: bool,
    ) -> Vec<Var> {
        let pairs = self.seed_pairs(outputs, seeds);
        let start = self.len();
        self.backward_filled(&pairs, wrt, create_graph, start)
    }

    /// [`Tape::grad_seeded`] added onto running adjoints: `onto[i]` (when `Some`) is the
    /// adjoint `wrt[i]` has already received from outside this tape, and the result is
    /// that plus this tape's contributions, or `None` for a `wrt` that received nothing
    /// from either (so that no `0 + x`, which turns `-0` into `+0`, is ever computed).
    ///
    /// The sum is folded in the order one backward pass over a longer tape would fold
    /// it: `((onto + c₁) + c₂) + …`, the contributions `cₖ` in the reverse order of the
    /// nodes that make them. This is what makes gradient checkpointing exact: cut a tape
    /// into segments, run the segments backwards from the last, pass each segment's
    /// adjoints of its inputs as the seeds of the previous segment's outputs and the
    /// adjoints of values shared by all segments (weights used at every step) as `onto`,
    /// and every adjoint is bitwise the one the whole tape gives.
    ///
    /// ```
    /// use metagrad::Tape;
    /// use ndarray::arr1;
    /// // The whole tape: y = x·w, z = Σ y·w, both gradients in one pass.
    /// let (x0, w0) = (arr1(&[0.3f32, -1.7]).into_dyn(), arr1(&[1.1f32, 0.9]).into_dyn());
    /// let mut t = Tape::new();
    /// let (x, w) = (t.param(x0.clone()), t.param(w0.clone()));
    /// let y = t.mul(x, w);
    /// let z = t.mul(y, w);
    /// let z = t.sum(z);
    /// let whole = t.grad(z, &[x, w], false);
    /// // In two segments: the second from y (a leaf there), then the first, seeded with
    /// // y's adjoint and adding onto w's.
    /// let mut t2 = Tape::new();
    /// let (y2, w2) = (t2.param(t.value(y).clone()), t2.param(w0.clone()));
    /// let z2 = t2.mul(y2, w2);
    /// let z2 = t2.sum(z2);
    /// let g2 = t2.grad(z2, &[y2, w2], false);
    /// let mut t1 = Tape::new();
    /// let (x1, w1) = (t1.param(x0), t1.param(w0));
    /// let y1 = t1.mul(x1, w1);
    /// let seed = t1.constant(t2.value(g2[0]).clone());
    /// let onto = t1.constant(t2.value(g2[1]).clone());
    /// let g1 = t1.grad_seeded_onto(&[y1], &[seed], &[x1, w1], &[None, Some(onto)], false);
    /// assert_eq!(t1.value(g1[0].unwrap()), t.value(whole[0]));
    /// assert_eq!(t1.value(g1[1].unwrap()), t.value(whole[1]));
    /// ```
    ///
    /// # Panics
    /// As [`Tape::grad_seeded`], and if `onto` and `wrt` differ in length, an `onto` and
    /// its `wrt` differ in shape, or a `wrt` is also an output.
    #[track_caller]
    pub fn grad_seeded_onto(
        &mut self,
        outputs: &[Var],
        seeds: &[Var],
        wrt: &[Var],
        onto: &[Option<Var>],
        create_graph: bool,
    ) -> Vec<Option<Var>> {
        let pairs = self.seed_pairs(outputs, seeds);
        assert!(
            onto.len() == wrt.len(),
            "metagrad::grad_seeded_onto: {} running adjoints for {} wrt",
            onto.len(),
            wrt.len()
        );
        for (i, (w, a)) in wrt.iter().zip(onto).enumerate() {
            if let Some(a) = a {
                assert!(
                    self.shape(*a) == self.shape(*w),
                    "metagrad::grad_seeded_onto: onto[{i}] has shape {:?}, wrt[{i}] {:?}",
                    self.shape(*a),
                    self.shape(*w)
                );
            }
            assert!(
                !outputs.contains(w),
                "metagrad::grad_seeded_onto: wrt[{i}] (Var {}) is also an output",
                w.0
            );
        }
        let start = self.len();
        self.backward(&pairs, wrt, onto, create_graph, start, false)
    }

    /// Checks outputs against seeds and pairs them.
    #[track_caller]
    fn seed_pairs(&self, outputs: &[Var], seeds: &[Var]) -> Vec<(Var, Var)> {
        assert!(
            outputs.len() == seeds.len(),
            "metagrad::grad_seeded: {} outputs and {} seeds",
            outputs.len(),
            seeds.len()
        );
        for (i, (o, s)) in outputs.iter().zip(seeds).enumerate() {
            assert!(
                self.shape(*s) == self.shape(*o),
                "metagrad::grad_seeded: seed {i} has shape {:?}, output {i} {:?}",
                self.shape(*s),
                self.shape(*o)
            );
            assert!(
                !outputs[..i].contains(o),
                "metagrad::grad_seeded: output {i} (Var {}) appears twice",
                o.0
            );
        }
        outputs.iter().copied().zip(seeds.iter().copied()).collect()
    }

    /// [`Tape::backward`] with no running adjoints, a `wrt` that receives nothing getting
    /// zeros.
    fn backward_filled(
        &mut self,
        seeds: &[(Var, Var)],
        wrt: &[Var],
        create_graph: bool,
        start: usize,
    ) -> Vec<Var> {
        self.backward(seeds, wrt, &[], create_graph, start, true)
            .into_iter()
            .map(|g| g.expect("zeros filled in"))
            .collect()
    }

    /// The backward pass from each `(output, seed)`, onto the running adjoints `onto`
    /// (empty, or one per `wrt`); nodes from `start` on are scratch when not creating a
    /// graph. A `wrt` that receives nothing is `None`, or zeros when `zeros` is set.
    fn backward(
        &mut self,
        seeds: &[(Var, Var)],
        wrt: &[Var],
        onto: &[Option<Var>],
        create_graph: bool,
        start: usize,
        zeros: bool,
    ) -> Vec<Option<Var>> {
        for (i, w) in wrt.iter().enumerate() {
            assert!(
                self.requires_grad(*w),
                "metagrad::grad: wrt[{i}] (Var {}) is a constant, not a parameter; \
                 place it on the tape with Tape::param",
                w.0
            );
        }
        let n = seeds.iter().map(|(o, _)| o.0 + 1).max().unwrap_or(0);
        let size = wrt.iter().map(|w| w.0 + 1).fold(n, usize::max);

        // Which nodes lie on a path from some `wrt` to `output`.
        let mut needed = vec![false; n];
        for w in wrt {
            if w.0 < n {
                needed[w.0] = true;
            }
        }
        let first = wrt.iter().map(|w| w.0).min().unwrap_or(n);
        for i in first..n {
            if !needed[i] && self.nodes[i].requires_grad {
                let mut any = false;
                self.nodes[i].op.for_each_input(|v| any |= needed[v.0]);
                needed[i] = any;
            }
        }

        // The form of the backward rules, and the tape records exactly when it is
        // `Recorded`. Without a graph to keep, the backward pass's own nodes are scratch:
        // each one's value is freed as soon as nothing holds it, so peak memory stays near
        // the forward pass's. `holds` counts the `grads` entries holding each scratch node.
        let recording = self.recording;
        let form = if recording && create_graph {
            Form::Recorded
        } else {
            Form::Fused
        };
        self.recording = form == Form::Recorded;
        let scratch = form == Form::Fused;
        let mut holds: Vec<u32> = Vec::new();
        let mut grads: Vec<Option<Var>> = vec![None; size];
        for &(output, seed) in seeds {
            grads[output.0] = Some(seed);
            hold(&mut holds, start, seed);
        }
        for (w, a) in wrt.iter().zip(onto) {
            if let Some(a) = *a {
                grads[w.0] = Some(a);
                hold(&mut holds, start, a);
            }
        }
        let mut contribs = Vec::with_capacity(4);
        for i in (first..n).rev() {
            if !needed[i] {
                continue;
            }
            let Some(g) = grads[i] else { continue };
            if matches!(self.nodes[i].op, Op::Leaf) {
                continue;
            }
            let consumed = !wrt.contains(&Var(i));
            if consumed {
                grads[i] = None; // leaves and other `wrt` keep theirs for the result
            }
            // Borrow the op out of its node while its rule records new nodes.
            let op = std::mem::replace(&mut self.nodes[i].op, Op::Leaf);
            contribs.clear();
            let before = self.len();
            vjp::vjp(
                self,
                &op,
                form,
                Var(i),
                g,
                &|v: Var| needed[v.0],
                &mut contribs,
            );
            self.nodes[i].op = op;
            for &(input, gi) in contribs.iter() {
                let new = match grads[input.0] {
                    None => gi,
                    // A scratch sum that nothing else holds is added to in place.
                    Some(prev)
                        if scratch
                            && prev != gi
                            && prev.0 >= start
                            && held(&holds, start, prev) == 1
                            && self.shape(prev) == self.shape(gi) =>
                    {
                        self.add_assign(prev, gi);
                        holds[prev.0 - start] -= 1; // held again just below
                        prev
                    }
                    Some(prev) => {
                        let sum = self.add(prev, gi);
                        if scratch {
                            self.release(&mut holds, start, prev);
                        }
                        sum
                    }
                };
                grads[input.0] = Some(new);
                hold(&mut holds, start, new);
            }
            if scratch {
                if consumed {
                    self.release(&mut holds, start, g);
                }
                // Intermediates of this rule (and contributions folded into sums).
                for k in before..self.len() {
                    if held(&holds, start, Var(k)) == 0 {
                        self.free(Var(k));
                    }
                }
            }
        }
        self.recording = recording;

        let result: Vec<Option<Var>> = wrt.iter().map(|w| grads[w.0]).collect();
        if create_graph && recording {
            return result
                .into_iter()
                .zip(wrt)
                .map(|(g, w)| match g {
                    None if zeros => Some(self.zeros_like(*w)),
                    g => g,
                })
                .collect();
        }
        // Nothing to keep but the gradients themselves: move them out, drop the
        // backward pass's intermediate nodes, and put the gradients back as constants.
        let mut taken: Vec<(Var, ArrayD<F>)> = Vec::with_capacity(wrt.len());
        let mut values = Vec::with_capacity(wrt.len());
        for (g, w) in result.iter().zip(wrt) {
            let value = match g {
                None if zeros => Some(ArrayD::zeros(self.shape(*w))),
                None => None,
                Some(g) => Some(match taken.iter().find(|(v, _)| v == g) {
                    Some((_, a)) => a.clone(),
                    None if g.0 >= start => {
                        let a = self.take(*g);
                        taken.push((*g, a.clone()));
                        a
                    }
                    None => self.value(*g).clone(),
                }),
            };
            values.push(value);
        }
        drop(taken);
        self.truncate(start);
        values
            .into_iter()
            .map(|a| a.map(|a| self.constant(a)))
            .collect()
    }

    /// Drops one hold on a scratch node, freeing its value when none is left.
    fn release(&mut self, holds: &mut [u32], start: usize, v: Var) {
        if v.0 >= start {
            let h = &mut holds[v.0 - start];
            *h = h.saturating_sub(1);
            if *h == 0 {
                self.free(v);
            }
        }
    }

    /// `value(acc) += value(g)` in place (distinct nodes of one shape).
    fn add_assign(&mut self, acc: Var, g: Var) {
        let (lo, hi) = self.nodes.split_at_mut(acc.0.max(g.0));
        let (acc, g) = if acc.0 < g.0 {
            (&mut lo[acc.0].value, &hi[0].value)
        } else {
            (&mut hi[0].value, &lo[g.0].value)
        };
        let acc = acc
            .as_slice_mut()
            .expect("metagrad: tape values are stored in row-major layout");
        crate::array::add_assign(acc, crate::array::flat(g));
    }

    /// Replaces a scratch node's value with an empty array.
    fn free(&mut self, v: Var) {
        self.vacate(v.0);
    }

    fn zeros_like(&mut self, v: Var) -> Var {
        let shape = self.shape(v).to_vec();
        self.zeros(&shape)
    }
}

/// Adds a hold on `v` if it is a scratch node (index `start` or later).
fn hold(holds: &mut Vec<u32>, start: usize, v: Var) {
    if v.0 >= start {
        let k = v.0 - start;
        if holds.len() <= k {
            holds.resize(k + 1, 0);
        }
        holds[k] += 1;
    }
}

/// The holds on `v` (forward nodes, before `start`, are never freed: reported as held).
fn held(holds: &[u32], start: usize, v: Var) -> u32 {
    if v.0 < start {
        1
    } else {
        holds.get(v.0 - start).copied().unwrap_or(0)
    }
}

impl Op {
    /// Calls `f` on each node this op reads.
    pub fn for_each_input(&self, mut f: impl FnMut(Var)) {
        match self {
            Op::Concat(vs, _) => vs.iter().for_each(|&v| f(v)),
            Op::BatchNorm(bn) => [bn.x, bn.gamma, bn.beta].into_iter().for_each(f),
            Op::BatchNormGrad(bg) => [bg.x, bg.gamma, bg.g].into_iter().for_each(f),
            Op::Conv2dBias(x, w, b, _) => [*x, *w, *b].into_iter().for_each(f),
            op => {
                let (a, b) = op.operands();
                a.into_iter().chain(b).for_each(f);
            }
        }
    }

    /// Up to two operands (every op of at most two; `for_each_input` lists the others).
    fn operands(&self) -> (Option<Var>, Option<Var>) {
        match self {
            Op::Leaf
            | Op::Concat(..)
            | Op::BatchNorm(_)
            | Op::BatchNormGrad(_)
            | Op::Conv2dBias(..) => (None, None),
            Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Div(a, b) => (Some(*a), Some(*b)),
            Op::MatMul { a, b, .. } => (Some(*a), Some(*b)),
            Op::Conv2d(a, b, _) | Op::Conv2dInputGrad(a, b, _) | Op::Conv2dWeightGrad(a, b, _) => {
                (Some(*a), Some(*b))
            }
            Op::Neg(a)
            | Op::AddScalar(a, _)
            | Op::MulScalar(a, _)
            | Op::Powi(a, _)
            | Op::Exp(a)
            | Op::Ln(a)
            | Op::Sqrt(a)
            | Op::Tanh(a)
            | Op::Sigmoid(a)
            | Op::Mask(a, _)
            | Op::SumOthers(a)
            | Op::SumTo(a, _)
            | Op::BroadcastTo(a, _)
            | Op::Reshape(a, _)
            | Op::Permute(a, _)
            | Op::Gather(a, _)
            | Op::ScatterAdd(a, _)
            | Op::LogSoftmax(a)
            | Op::Softmax(a) => (Some(*a), None),
        }
    }
}
