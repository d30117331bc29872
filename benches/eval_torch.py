"""Evaluation speed with plain PyTorch on CPU: the few-shot evaluation protocol on W4's
shapes, the counterpart of `maml_step`'s `W4-mini5w1s-eval600-10step`.

W4's shapes, from the reference script `maml_torch.py` (imported, not copied): RGB 84x84,
Conv-4 with 32 filters (conv3x3 -> BN with batch statistics and affine -> ReLU ->
maxpool2), flatten 800 -> linear 5; 5-way 1-shot, 15 queries per class; inner lr 0.01.

Per task: `--steps` (10) inner SGD steps at 0.01 on the support set, first order (the
reference's `adapt(..., second_order=False)`: a test-time adaptation needs no graph for an
outer gradient), then the query forward pass under `torch.no_grad()`, its loss and its
accuracy.  Batch norm always uses the batch's statistics (the reference's
`training=True`): transductive on the query set, as metagrad's `NormMode::Transductive`.
Tasks run one after another (the usual Python loop), each op on `--threads` threads.
float32, fixed seed; every task's data is generated before the timer.

Timed: the whole protocol, every task's adaptation and query pass (after one untimed
warm-up task), `--repeat` times (default 1); the median is printed in the format that
`maml_torch.py` prints, so `benches/compare.sh` reads it, with the accuracy, its 95%
confidence interval (1.96 * sample std / sqrt(n), as `metagrad::eval`) and the peak
resident set.

Usage: python benches/eval_torch.py [--threads 2] [--tasks 600] [--steps 10] [--repeat 1]
The reference folder is $METAGRAD_REF (default: ../shared/ref beside the repository).
"""
import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.environ.get("METAGRAD_REF") or os.path.join(ROOT, "..", "shared", "ref")
sys.path.insert(0, os.path.abspath(REF))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from maml_torch import (  # noqa: E402
    adapt,
    conv4_rgb_init,
    conv_fwd_rgb,
    omniglot_batch,
    peak_rss_mib,
)

NAME = "W4-mini5w1s-eval600-10step"
N_WAY, K_SHOT, N_QUERY, INNER_LR = 5, 1, 15, 0.01


def rss_mib():
    """The current resident set, MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def evaluate_task(params, xs, ys, xq, yq, steps):
    fast = adapt(params, conv_fwd_rgb, F.cross_entropy, xs, ys, INNER_LR, steps,
                 second_order=False)
    with torch.no_grad():
        out = conv_fwd_rgb(fast, xq)
        loss = F.cross_entropy(out, yq).item()
        acc = (out.argmax(dim=1) == yq).float().mean().item()
    return loss, acc


def protocol(params, batch, steps, n):
    xs, ys, xq, yq = batch
    return [evaluate_task(params, xs[t], ys[t], xq[t], yq[t], steps) for t in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=600)
    ap.add_argument("--steps", type=int, default=10, help="inner steps per task")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions of the protocol")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}  num_threads={torch.get_num_threads()}  "
          f"interop={torch.get_num_interop_threads()}  "
          f"cpu_capability={torch.backends.cpu.get_cpu_capability()}  "
          f"mkldnn={torch.backends.mkldnn.is_available()}  reference={os.path.abspath(REF)}",
          flush=True)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    params = conv4_rgb_init(gen, N_WAY)
    t0 = time.perf_counter()
    batch = omniglot_batch(gen, a.tasks, N_WAY, K_SHOT, N_QUERY, c=3, hw=84)
    made = time.perf_counter() - t0
    data_mib = sum(b.numel() * b.element_size() for b in batch) / 2**20
    # One untimed warm-up task.
    evaluate_task(params, batch[0][0], batch[1][0], batch[2][0], batch[3][0], a.steps)
    base = rss_mib()
    times = []
    for _ in range(max(1, a.repeat)):
        t0 = time.perf_counter()
        results = protocol(params, batch, a.steps, a.tasks)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n = len(results)
    accs = [r[1] for r in results]
    mean = sum(accs) / n
    ci = 1.96 * statistics.stdev(accs) / math.sqrt(n) if n > 1 else float("nan")
    loss = sum(r[0] for r in results) / n
    print(f"{NAME:24s} median {med:9.5f} s/protocol  min {min(times):9.5f}  "
          f"max {max(times):9.5f}  tasks/s {n / med:9.1f}  per task {1e3 * med / n:.2f} ms  "
          f"(tasks={n}, repetitions={len(times)}, inner steps={a.steps} at {INNER_LR}, "
          f"first order, batch norm: batch statistics (transductive), "
          f"threads={a.threads}, process peak RSS {peak_rss_mib():.0f} MiB with the task "
          f"data's {data_mib:.0f} MiB; {base:.0f} MiB before the timer)", flush=True)
    print(f"{'':24s} accuracy {100 * mean:.1f}% ± {100 * ci:.1f}% ({n} tasks, {a.steps} "
          f"steps), mean query loss {loss:.4f}; task data made in {made:.1f} s, before the timer")


if __name__ == "__main__":
    main()
