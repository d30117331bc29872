#!/usr/bin/env bash
# Runs the reference PyTorch (and, for W1, JAX) MAML workloads and metagrad's
# `maml_step` bench back to back, workload by workload, on the same threads, and prints
# the ratio of median step times. Machines are noisy: compare ratios from one run.
#
#   benches/compare.sh [--threads N] [--steps N] [--only NAME ...] [--no-jax] [--eval-tasks N]
#
# W4-mini5w1s-eval600-10step is the evaluation protocol instead of a training step: 600
# tasks (--eval-tasks N for fewer) of W4's shapes, each adapted with 10 first-order steps at
# 0.01 (batch norm with batch statistics, transductive), timed whole, once, on each side:
# benches/eval_torch.py against maml_step's workload of that name (--steps 1).
#
# Environment:
#   METAGRAD_REF       folder with maml_torch.py and maml_jax.py   (default ../shared/ref)
#   METAGRAD_REF_VENV  Python virtual environment for the references (default
#                      ${TMPDIR:-/tmp}/metagrad-refvenv); created on first use, and
#                      torch, jax, jaxlib and numpy are installed into it with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; steps=20; jax=1; only=(); eval_tasks=600
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --no-jax) jax=0; shift ;;
    --eval-tasks) eval_tasks="$2"; shift 2 ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do only+=("$1"); shift; done ;;
    *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
ref="${METAGRAD_REF:-../shared/ref}"
venv="${METAGRAD_REF_VENV:-${TMPDIR:-/tmp}/metagrad-refvenv}"
[ -f "$ref/maml_torch.py" ] || { echo "compare.sh: no maml_torch.py in $ref (set METAGRAD_REF)" >&2; exit 1; }
# PyTorch always; JAX (and numpy) unless --no-jax.
mods="torch"; pkgs=(torch)
[ "$jax" = 0 ] || { mods="torch, jax, numpy"; pkgs=(torch jax jaxlib numpy); }
if ! "$venv/bin/python" -c "import $mods" 2>/dev/null; then
  echo "compare.sh: installing the references' dependencies (${pkgs[*]}) into $venv with pip ..."
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q "${pkgs[@]}"
fi
[ ${#only[@]} -gt 0 ] || only=(W1-sin-1step-SO W1-sin-5step-SO W2-omni5w1s-1step-SO W2-omni5w1s-5step-SO W2-omni5w1s-1step-FO W3-omni20w1s-1step-SO
  W4-mini5w1s-5step-SO W4-mini5w1s-25step-SO W4-mini5w1s-5step-SO-recompute W4-mini5w1s-25step-SO-recompute
  W5-cifarfs5w1s-resnet12-1step-SO W5-cifarfs5w1s-resnet12-1step-FO W4-mini5w1s-eval600-10step)
evalw=W4-mini5w1s-eval600-10step
cpus=$(seq -s, 0 $((threads - 1)))
echo "building the bench ..."
bench=$(cargo bench --bench maml_step --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[ -x "$bench" ] || { echo "compare.sh: cannot find the maml_step binary" >&2; exit 1; }
tmp=$(mktemp -d)
# run NAME CMD...: runs CMD, keeps its output in $tmp/NAME and its peak resident set (MiB)
# in $tmp/NAME.rss.
run() {
  local name="$1"; shift
  /usr/bin/time -f '%M' -o "$tmp/$name.kb" "$@" > "$tmp/$name" 2>/dev/null || true
  awk '{ printf "%.0f", $1 / 1024 }' "$tmp/$name.kb" > "$tmp/$name.rss" 2>/dev/null || echo - > "$tmp/$name.rss"
}
median() { awk -v w="$1" '$1 == w && $2 == "median" { print $3; exit }' "$2"; }
# json KEY FILE: a number from the bench's JSON line.
json() { sed -n "s/.*\"$1\":\([0-9.e+-]*\).*/\1/p" "$2" | head -1; }
# acc FILE: the accuracy line of an evaluation run, up to its closing parenthesis.
acc() { sed -n 's/^ *accuracy \([^)]*)\).*/\1/p' "$1" | head -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else print "-" }'; }
peak=""
printf '\n%-26s %10s %10s %11s %9s %9s %10s %10s %8s\n' workload "torch s" "jax s" "metagrad s" "vs torch" "vs jax" "torch MiB" "ours MiB" "of peak"
for w in "${only[@]}"; do
  if [ "$w" = "$evalw" ]; then
    # The evaluation protocol: one timed repetition of the whole protocol on each side.
    run torch env METAGRAD_REF="$ref" "$venv/bin/python" benches/eval_torch.py --threads "$threads" --tasks "$eval_tasks" --steps 10
  else
    # A -recompute workload is its stored workload in another memory mode: the same
    # reference run.
    run torch "$venv/bin/python" "$ref/maml_torch.py" --threads "$threads" --steps "$steps" --only "${w%-recompute}"
  fi
  j="-"
  if [ "$jax" = 1 ] && [ "${w#W1}" != "$w" ]; then
    run jax taskset -c "$cpus" "$venv/bin/python" "$ref/maml_jax.py" --steps "$steps" --only "$w"
    j=$(median "$w" "$tmp/jax")
  fi
  if [ "$w" = "$evalw" ]; then
    run ours "$bench" --threads "$threads" --steps 1 --warmup 0 --eval-tasks "$eval_tasks" --only "$w"
  else
    run ours "$bench" --threads "$threads" --steps "$steps" --only "$w"
  fi
  t=$(median "${w%-recompute}" "$tmp/torch"); m=$(median "$w" "$tmp/ours")
  # Our peak resident set is the bench's own figure for the workload: the process's
  # maximum also holds the start-up peak measurement's buffers.
  rss=$(json peak_rss_mb "$tmp/ours" | awk '{ printf "%.0f", $1 }')
  frac=$(json fraction_of_peak "$tmp/ours" | awk '{ printf "%.1f%%", 100 * $1 }')
  peak="$peak $(json peak_gflops "$tmp/ours" | awk '{ printf "%.0f", $1 }')"
  printf '%-26s %10s %10s %11s %9s %9s %10s %10s %8s\n' "$w" "$t" "$j" "$m" "$(ratio "$t" "$m")" "$(ratio "$j" "$m")" "$(cat "$tmp/torch.rss")" "${rss:--}" "${frac:--}"
  # Memory::Recompute runs beside its stored path, alternating: both figures.
  sm=$(json stored_median_s "$tmp/ours")
  if [ -n "$sm" ]; then
    srss=$(json stored_peak_rss_mb "$tmp/ours" | awk '{ printf "%.0f", $1 }')
    sfrac=$(json stored_fraction_of_peak "$tmp/ours" | awk '{ printf "%.1f%%", 100 * $1 }')
    same=$(sed -n 's/.*"bitwise_equal":\([a-z]*\).*/\1/p' "$tmp/ours" | head -1)
    printf '%-26s %10s %10s %11.5f %9s %9s %10s %10s %8s  (its stored path, alternating; recompute/stored time %s, bitwise equal: %s)\n' \
      "  stored path" "" "" "$sm" "$(ratio "$t" "$sm")" "" "" "$srss" "$sfrac" "$(ratio "$m" "$sm")" "$same"
  fi
  # The evaluation protocol: each side's accuracy on the random tasks (chance is 20%).
  if [ "$w" = "$evalw" ]; then
    printf '%-26s ours %s; torch %s\n' "  accuracy" "$(acc "$tmp/ours")" "$(acc "$tmp/torch")"
  fi
done
echo "of peak: the fraction of the $threads-thread matrix-product peak that maml_step measured at its start (GFLOP/s per run:$peak)"
rm -rf "$tmp"
echo "(ratios > 1 mean metagrad is faster; $threads threads each, median of $steps steps;"
echo " torch MiB = peak resident set of the whole process, from /usr/bin/time; ours = the"
echo " workload's own peak resident set, as maml_step reports it; a -recompute workload"
echo " runs with Memory::Recompute beside its stored path, step by step alternating, each"
echo " one's peak resident set from one untimed step on a trimmed heap; $evalw:"
echo " seconds for the whole protocol on $eval_tasks tasks, one repetition each, both MiB"
echo " figures with the tasks' data, made before the timer)"
