//! The meta-batch mapper, after TensorFlow's `map_fn`: tensors stacked along dimension 0
//! are unpacked into one slice per task, a function runs on each task's slices on its own
//! tape, and the outputs are stacked in order. Tasks run in parallel on the current rayon
//! thread pool, at most `parallel_iterations` at once. Gradients flow back through it, to
//! the stacked inputs and to the shared parameters the function captures, and are reduced
//! in task order: outputs and gradients are bitwise identical whatever the number of
//! threads and whatever the bound. A task that panics is reported as
//! [`Error::Task`] with its index.
//!
//! ```
//! use metagrad::map_fn::MapFn;
//! use ndarray::{arr2, arr1};
//! // Three tasks, each a row of `x`; the function is sum(w * x_i)².
//! let x = arr2(&[[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0]]).into_dyn();
//! let w = arr1(&[0.5, -1.0]).into_dyn();
//! let out = MapFn::new(2)
//!     .map_vjp(&[x], &[w], |t, xs, ps| {
//!         let p = t.mul(xs[0], ps[0]);
//!         let s = t.sum(p);
//!         t.square(s)
//!     }, None)
//!     .unwrap();
//! assert_eq!(out.outputs.shape(), &[3]);
//! assert_eq!(out.param_grads[0].shape(), &[2]);   // summed over tasks, in task order
//! assert_eq!(out.input_grads[0].shape(), &[3, 2]); // one slice per task
//! ```

use crate::{Error, Float, Result, Tape, Var};
use ndarray::{ArrayD, Axis, IxDyn};
use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Runs `f(0), …, f(n − 1)` on the current rayon pool with at most `parallel_iterations`
/// running at once, and returns the results in index order. A panic inside a task becomes
/// [`Error::Task`] with the lowest failing index, and its message is not printed (it is in
/// the error; panics outside tasks still reach the panic hook installed before). The
/// building block of [`MapFn`] and the meta-learners.
pub fn map_tasks<T, Fun>(n: usize, parallel_iterations: usize, f: Fun) -> Result<Vec<T>>
where
    T: Send,
    Fun: Fn(usize) -> T + Sync,
{
    quiet_task_panics();
    let run = |i: usize| {
        let outer = IN_TASK.with(|t| t.replace(true));
        let r = catch_unwind(AssertUnwindSafe(|| f(i)));
        IN_TASK.with(|t| t.set(outer));
        r.map_err(|e| Error::Task {
            index: i,
            message: panic_message(e),
        })
    };
    let workers = parallel_iterations
        .max(1)
        .min(rayon::current_num_threads())
        .min(n);
    if workers <= 1 {
        return (0..n).map(run).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<T>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    rayon::scope(|s| {
        for _ in 0..workers {
            s.spawn(|_| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = run(i);
                *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every task ran")
        })
        .collect()
}

/// The reduction behind every meta-batch: `acc[j] += scale · part[j]` for each task's
/// `part`, in task order. Task results are gathered by index before it runs, so a sum
/// never depends on which thread ran which task, or when.
///
/// # Panics
/// If a part's tensor differs in shape from the accumulator's.
pub fn accumulate_in_order<'a, F, I, P>(acc: &mut [ArrayD<F>], parts: I, scale: F)
where
    F: Float,
    I: IntoIterator<Item = &'a P>,
    P: AsRef<[ArrayD<F>]> + ?Sized + 'a,
{
    for part in parts {
        for (a, p) in acc.iter_mut().zip(part.as_ref()) {
            a.zip_mut_with(p, |a, &p| *a += scale * p);
        }
    }
}

thread_local! {
    /// Whether this thread is running a task whose panic becomes an [`Error::Task`].
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Installs (once) a panic hook that stays quiet for panics inside tasks: their message is
/// returned as [`Error::Task`], so printing it as well would report one error twice. Every
/// other panic goes to the hook that was installed before.
fn quiet_task_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_TASK.with(Cell::get) {
                previous(info)
            }
        }));
    });
}

fn panic_message(e: Box<dyn Any + Send>) -> String {
    if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else {
        "task panicked".to_string()
    }
}

/// Runs `f` with a rayon pool of `threads` threads (for tests and benches that compare
/// thread counts; a program normally sets `RAYON_NUM_THREADS` or builds its own pool).
///
/// # Panics
/// If the pool cannot be built.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("metagrad::with_threads: cannot build a rayon pool")
        .install(f)
}

/// The results of [`MapFn::map_vjp`].
#[derive(Debug, Clone)]
pub struct MapOutput<F> {
    /// The per-task outputs stacked along a new dimension 0.
    pub outputs: ArrayD<F>,
    /// Gradients with respect to each stacked input, shaped like it.
    pub input_grads: Vec<ArrayD<F>>,
    /// Gradients with respect to each shared parameter, summed over tasks in order.
    pub param_grads: Vec<ArrayD<F>>,
}

/// A `map_fn` with a concurrency bound (TensorFlow's `parallel_iterations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFn {
    /// At most this many tasks run at once (further bounded by the pool's threads).
    pub parallel_iterations: usize,
}

impl MapFn {
    /// A mapper running at most `parallel_iterations` tasks at once (0 is taken as 1).
    pub fn new(parallel_iterations: usize) -> Self {
        MapFn {
            parallel_iterations: parallel_iterations.max(1),
        }
    }

    /// The outputs of `f` on every task's slices, stacked along dimension 0.
    ///
    /// # Errors
    /// [`Error::Config`] if the inputs disagree on dimension 0 or the tasks' outputs differ
    /// in shape; [`Error::Task`] if a task panics.
    pub fn map<F, Fun>(
        &self,
        elems: &[ArrayD<F>],
        params: &[ArrayD<F>],
        f: Fun,
    ) -> Result<ArrayD<F>>
    where
        F: Float,
        Fun: Fn(&mut Tape<F>, &[Var], &[Var]) -> Var + Sync,
    {
        let n = task_count(elems)?;
        let outs = map_tasks(n, self.parallel_iterations, |i| {
            let mut t = Tape::new();
            t.no_grad(|t| {
                let xs: Vec<Var> = elems
                    .iter()
                    .map(|e| t.constant(e.index_axis(Axis(0), i).to_owned()))
                    .collect();
                let ps: Vec<Var> = params.iter().map(|p| t.constant(p.clone())).collect();
                let out = f(t, &xs, &ps);
                t.take(out)
            })
        })?;
        stack(&outs)
    }

    /// The outputs, and the vector-Jacobian product with `seed` (the upstream gradient of
    /// the stacked outputs; `None` means ones, i.e. the gradient of their sum): gradients
    /// for the stacked inputs and for the shared parameters.
    ///
    /// # Errors
    /// As [`MapFn::map`], and [`Error::Config`] if `seed` is not shaped like the outputs.
    pub fn map_vjp<F, Fun>(
        &self,
        elems: &[ArrayD<F>],
        params: &[ArrayD<F>],
        f: Fun,
        seed: Option<&ArrayD<F>>,
    ) -> Result<MapOutput<F>>
    where
        F: Float,
        Fun: Fn(&mut Tape<F>, &[Var], &[Var]) -> Var + Sync,
    {
        let n = task_count(elems)?;
        if let Some(s) = seed {
            if s.shape().first() != Some(&n) {
                return Err(Error::Config(format!(
                    "map_vjp: seed of shape {:?} for {n} tasks",
                    s.shape()
                )));
            }
        }
        let per_task = map_tasks(n, self.parallel_iterations, |i| {
            let mut t = Tape::new();
            let xs: Vec<Var> = elems
                .iter()
                .map(|e| t.param(e.index_axis(Axis(0), i).to_owned()))
                .collect();
            let ps: Vec<Var> = params.iter().map(|p| t.param(p.clone())).collect();
            let out = f(&mut t, &xs, &ps);
            let seed_i = match seed {
                Some(s) => s.index_axis(Axis(0), i).to_owned(),
                None => ArrayD::ones(t.shape(out)),
            };
            if seed_i.shape() != t.shape(out) {
                panic!(
                    "map_vjp: seed slice of shape {:?} for an output of shape {:?}",
                    seed_i.shape(),
                    t.shape(out)
                );
            }
            let sv = t.constant(seed_i);
            let wrt: Vec<Var> = xs.iter().chain(&ps).copied().collect();
            let grads = t.vjp(out, sv, &wrt, false);
            let grads: Vec<ArrayD<F>> = grads.into_iter().map(|g| t.take(g)).collect();
            (t.take(out), grads)
        })?;
        let outputs = stack(&per_task.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>())?;
        let k = elems.len();
        let input_grads = (0..k)
            .map(|j| {
                stack(
                    &per_task
                        .iter()
                        .map(|(_, g)| g[j].clone())
                        .collect::<Vec<_>>(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut param_grads: Vec<ArrayD<F>> =
            params.iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
        accumulate_in_order(
            &mut param_grads,
            per_task.iter().map(|(_, g)| &g[k..]),
            F::one(),
        );
        Ok(MapOutput {
            outputs,
            input_grads,
            param_grads,
        })
    }
}

fn task_count<F>(elems: &[ArrayD<F>]) -> Result<usize> {
    let Some(first) = elems.first() else {
        return Err(Error::Config("map_fn: no input tensors to map over".into()));
    };
    let n = *first
        .shape()
        .first()
        .ok_or_else(|| Error::Config("map_fn: inputs must have a dimension 0 to unpack".into()))?;
    for (j, e) in elems.iter().enumerate() {
        if e.shape().first() != Some(&n) {
            return Err(Error::Config(format!(
                "map_fn: input {j} has shape {:?}, but input 0 has {n} tasks along dimension 0",
                e.shape()
            )));
        }
    }
    Ok(n)
}

fn stack<F: Float>(parts: &[ArrayD<F>]) -> Result<ArrayD<F>> {
    let Some(first) = parts.first() else {
        return Ok(ArrayD::zeros(IxDyn(&[0])));
    };
    let mut shape = vec![parts.len()];
    shape.extend_from_slice(first.shape());
    let mut data = Vec::with_capacity(first.len() * parts.len());
    for (i, p) in parts.iter().enumerate() {
        if p.shape() != first.shape() {
            return Err(Error::Config(format!(
                "map_fn: task {i} returned shape {:?}, task 0 returned {:?}",
                p.shape(),
                first.shape()
            )));
        }
        data.extend(p.iter().copied());
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), data).expect("stack shape"))
}
