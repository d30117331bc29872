//! Throughput of the f32 kernels the meta-learners spend their time in: matrix products and
//! the 3×3 convolutions of the Omniglot 4-block conv net, forward and backward.
//!
//! ```text
//! cargo bench --bench ops                   # full run (~1 min)
//! cargo bench --bench ops -- --quick        # fewer repetitions, fewer/smaller cases
//! cargo bench --bench ops -- --reps 20      # repetitions per case (median is reported)
//! cargo bench --bench ops -- --no-kernels   # skip the raw gemm-kernel comparison
//! ```
//!
//! Everything runs on one thread: the library parallelises across tasks, not inside an op
//! (the gemm kernels are called without threading). Each case is warmed up, then timed
//! `reps` times; the median is printed in a table and as one JSON line per case.
//!
//! * `matmul`: `Tape::matmul` of two constant `n × n` matrices (includes the output
//!   allocation and the tape push), GFLOP/s = 2·m·n·k / t.
//! * `conv2d_fwd`: `Tape::conv2d`, 3×3 kernel, stride 1, pad 1; GFLOP/s = 2·N·O·C·9·Ho·Wo / t.
//! * `conv2d_bwd`: the two adjoint ops called directly, `conv2d_input_grad(gy, w)` and
//!   `conv2d_weight_grad(x, gy)` (what `tape.grad` runs for a conv2d node with
//!   `create_graph = false`); GFLOP/s = 2 × the forward count / t.
//! * `gemm_kernel`: the raw kernels side by side, `ndarray::linalg::general_mat_mul`
//!   (matrixmultiply) and the `gemm` crate, on the square shapes and on the per-sample
//!   products the conv ops make (`fwd`: W[O×C9]·cols[C9×HW]; `dx`: Wᵀ·gy; `dw`: gy·colsᵀ
//!   accumulated into the output).

use metagrad::tape::op::ConvGeom;
use metagrad::Tape;
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewMut2, IxDyn};
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Opts {
    reps: usize,
    quick: bool,
    kernels: bool,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        reps: 0,
        quick: false,
        kernels: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--no-kernels" => o.kernels = false,
            "--reps" => {
                o.reps = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--reps takes a positive integer")
            }
            "--threads" => {
                let n: usize = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--threads takes a positive integer");
                if n != 1 {
                    eprintln!("note: every op here is single-threaded; --threads {n} ignored");
                }
            }
            // `cargo bench` passes `--bench` to every bench binary.
            "--bench" => {}
            other => eprintln!("note: ignoring argument {other:?}"),
        }
    }
    if o.reps == 0 {
        o.reps = if o.quick { 3 } else { 7 };
    }
    o
}

/// Deterministic values in [-1, 1).
fn filled(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).expect("shape")
}

/// Median seconds of one call of `run`, over `reps` samples after a warm-up. `run` gets a
/// fresh input from `setup` each time (set up outside the timed region); samples of very
/// short calls repeat the call so that each sample lasts at least ~2 ms.
fn time_it<S, R>(reps: usize, mut setup: impl FnMut() -> S, mut run: impl FnMut(S) -> R) -> f64 {
    // Warm-up, and a first estimate of the cost of one call.
    let s = setup();
    let t0 = Instant::now();
    black_box(run(s));
    let first = t0.elapsed();
    let inner = if first < Duration::from_micros(2000) {
        (Duration::from_micros(2000).as_secs_f64() / first.as_secs_f64().max(1e-7)).ceil() as usize
    } else {
        1
    };
    black_box(run(setup()));
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let inputs: Vec<S> = (0..inner).map(|_| setup()).collect();
            let t = Instant::now();
            for s in inputs {
                black_box(run(s));
            }
            t.elapsed().as_secs_f64() / inner as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn report(fields: &str, label: &str, flops: f64, median: f64) {
    let gflops = flops / median / 1e9;
    println!(
        "{label:<58} {:>11.3} ms {gflops:>8.1} GFLOP/s",
        median * 1e3
    );
    println!("{{{fields},\"median_s\":{median:.6e},\"gflops\":{gflops:.2},\"threads\":1}}");
}

fn bench_matmul(o: &Opts, n: usize) {
    let (a, b) = (filled(&[n, n], 1), filled(&[n, n], 2));
    let reps = if n >= 1024 { o.reps.min(5) } else { o.reps };
    let med = time_it(
        reps,
        || {
            let mut t = Tape::<f32>::new();
            let (x, y) = (t.constant(a.clone()), t.constant(b.clone()));
            (t, x, y)
        },
        |(mut t, x, y)| {
            let z = t.matmul(x, y);
            black_box(t.value(z));
            t
        },
    );
    let flops = 2.0 * (n * n * n) as f64;
    report(
        &format!("\"bench\":\"matmul\",\"m\":{n},\"n\":{n},\"k\":{n}"),
        &format!("matmul {n}x{n}x{n}"),
        flops,
        med,
    );
}

fn geom(batch: usize, cin: usize, cout: usize, hw: usize) -> ConvGeom {
    ConvGeom {
        n: batch,
        c: cin,
        h: hw,
        w: hw,
        o: cout,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    }
}

fn bench_conv(o: &Opts, batch: usize, cin: usize, cout: usize, hw: usize) {
    let g = geom(batch, cin, cout, hw);
    let x = filled(&[batch, cin, hw, hw], 3);
    let w = filled(&[cout, cin, 3, 3], 4);
    let gy = filled(&[batch, cout, g.ho(), g.wo()], 5);
    let fwd_flops = 2.0 * (batch * cout * cin * 9 * g.ho() * g.wo()) as f64;
    let fields = format!("\"batch\":{batch},\"cin\":{cin},\"cout\":{cout},\"hw\":{hw}");
    let label = format!("N={batch:<2} {cin:>2}->{cout} {hw}x{hw}");

    let med = time_it(
        o.reps,
        || {
            let mut t = Tape::<f32>::new();
            let (xv, wv) = (t.constant(x.clone()), t.constant(w.clone()));
            (t, xv, wv)
        },
        |(mut t, xv, wv)| {
            let y = t.conv2d(xv, wv, 1, 1);
            black_box(t.value(y));
            t
        },
    );
    report(
        &format!("\"bench\":\"conv2d_fwd\",{fields}"),
        &format!("conv2d_fwd {label}"),
        fwd_flops,
        med,
    );

    let med = time_it(
        o.reps,
        || {
            let mut t = Tape::<f32>::new();
            let (xv, wv, gv) = (
                t.constant(x.clone()),
                t.constant(w.clone()),
                t.constant(gy.clone()),
            );
            (t, xv, wv, gv)
        },
        |(mut t, xv, wv, gv)| {
            let dx = t.conv2d_input_grad(gv, wv, g);
            let dw = t.conv2d_weight_grad(xv, gv, g);
            black_box((t.value(dx), t.value(dw)));
            t
        },
    );
    report(
        &format!("\"bench\":\"conv2d_bwd\",\"method\":\"adjoint_ops\",{fields}"),
        &format!("conv2d_bwd {label} (dx+dw)"),
        2.0 * fwd_flops,
        med,
    );
}

/// `c = op(a)·op(b) + beta·c` with matrixmultiply, as ndarray calls it.
fn k_ndarray(a: ArrayView2<f32>, b: ArrayView2<f32>, c: &mut ArrayViewMut2<f32>, beta: f32) {
    general_mat_mul(1.0, &a, &b, beta, c);
}

/// The same with the `gemm` crate (strided, no threading).
fn k_gemm(a: ArrayView2<f32>, b: ArrayView2<f32>, c: &mut ArrayViewMut2<f32>, beta: f32) {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    assert!(b.nrows() == k && c.dim() == (m, n));
    let (sa, sb, sc) = (a.strides(), b.strides(), c.strides().to_vec());
    // SAFETY: the pointers and strides describe three valid, non-overlapping views.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            sc[1],
            sc[0],
            beta != 0.0,
            a.as_ptr(),
            sa[1],
            sa[0],
            b.as_ptr(),
            sb[1],
            sb[0],
            beta,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A `[r, c]` matrix, or `[c, r]` when `swap` is set.
fn mat2(swap: bool, r: usize, c: usize, seed: u64) -> Array2<f32> {
    let shape = if swap { [c, r] } else { [r, c] };
    filled(&shape, seed).into_dimensionality().expect("2-D")
}

type Kernel = fn(ArrayView2<f32>, ArrayView2<f32>, &mut ArrayViewMut2<f32>, f32);

/// `op(A)[m×k] · op(B)[k×n]`, operands stored transposed where `ta` / `tb` is set.
fn bench_kernels(o: &Opts, tag: &str, m: usize, k: usize, n: usize, ta: bool, tb: bool) {
    let a = mat2(ta, m, k, 6);
    let b = mat2(tb, k, n, 7);
    let beta = if tag.starts_with("dw") { 1.0 } else { 0.0 };
    let mut c = Array2::<f32>::zeros((m, n));
    let flops = 2.0 * (m * n * k) as f64;
    let reps = if flops > 1e9 { o.reps.min(5) } else { o.reps };
    let mut results = Vec::new();
    for (name, kern) in [("ndarray", k_ndarray as Kernel), ("gemm", k_gemm as Kernel)] {
        let av = if ta { a.t() } else { a.view() };
        let bv = if tb { b.t() } else { b.view() };
        let med = time_it(
            reps,
            || (),
            |()| {
                kern(av, bv, &mut c.view_mut(), beta);
            },
        );
        report(
            &format!(
                "\"bench\":\"gemm_kernel\",\"kernel\":\"{name}\",\"shape\":\"{tag}\",\
                 \"m\":{m},\"n\":{n},\"k\":{k},\"ta\":{ta},\"tb\":{tb},\"beta\":{beta}"
            ),
            &format!(
                "kernel {name:<7} {tag:<10} {m}x{k}{} . {k}x{n}{}",
                if ta { "T" } else { "" },
                if tb { "T" } else { "" }
            ),
            flops,
            med,
        );
        results.push(med);
    }
    println!(
        "{:<58} gemm/ndarray speed-up {:.2}x",
        "",
        results[0] / results[1]
    );
}

fn check_kernels_agree() {
    for &(m, k, n, ta, tb, beta) in &[
        (7, 5, 3, false, false, 0.0f32),
        (64, 576, 196, true, false, 0.0),
        (64, 196, 576, false, true, 1.0),
        (33, 17, 65, true, true, 1.0),
    ] {
        let a = mat2(ta, m, k, 8);
        let b = mat2(tb, k, n, 9);
        let c0 = mat2(false, m, n, 10);
        let (av, bv) = (
            if ta { a.t() } else { a.view() },
            if tb { b.t() } else { b.view() },
        );
        let (mut c1, mut c2) = (c0.clone(), c0.clone());
        k_ndarray(av, bv, &mut c1.view_mut(), beta);
        k_gemm(av, bv, &mut c2.view_mut(), beta);
        let err = (&c1 - &c2).iter().fold(0f32, |e, d| e.max(d.abs()));
        assert!(
            err < 1e-3,
            "kernels disagree on {m}x{k}x{n}: max |diff| = {err}"
        );
    }
}

fn main() {
    let o = parse_args();
    let start = Instant::now();
    println!(
        "metagrad ops bench: f32, single thread, median of {} reps{}",
        o.reps,
        if o.quick { " (quick)" } else { "" }
    );

    let sizes: &[usize] = if o.quick {
        &[64, 256]
    } else {
        &[64, 256, 1024]
    };
    for &n in sizes {
        bench_matmul(&o, n);
    }

    let batches: &[usize] = if o.quick { &[5] } else { &[5, 75] };
    for &batch in batches {
        for &(cin, hw) in &[(1, 28), (64, 28), (64, 14), (64, 7)] {
            bench_conv(&o, batch, cin, 64, hw);
        }
    }

    if o.kernels {
        check_kernels_agree();
        let sq: &[usize] = if o.quick {
            &[64, 256]
        } else {
            &[64, 256, 1024]
        };
        for &n in sq {
            bench_kernels(&o, "square", n, n, n, false, false);
        }
        bench_kernels(&o, "fc_head", 75, 64, 5, false, false);
        for &(cin, hw) in &[(1, 28), (64, 28), (64, 14), (64, 7)] {
            if o.quick && hw != 28 {
                continue;
            }
            let (ckk, p) = (cin * 9, hw * hw);
            bench_kernels(&o, &format!("fwd{hw}c{cin}"), 64, ckk, p, false, false);
            bench_kernels(&o, &format!("dx{hw}c{cin}"), ckk, 64, p, true, false);
            bench_kernels(&o, &format!("dw{hw}c{cin}"), 64, p, ckk, false, true);
        }
    }
    println!("total {:.1} s", start.elapsed().as_secs_f64());
}
