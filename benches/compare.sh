#!/usr/bin/env bash
# Runs the reference PyTorch (and, for W1, JAX) MAML workloads and metagrad's
# `maml_step` bench back to back, workload by workload, on the same threads, and prints
# the ratio of median step times. Machines are noisy: compare ratios from one run.
#
#   benches/compare.sh [--threads N] [--steps N] [--only NAME ...] [--no-jax]
#
# Environment:
#   METAGRAD_REF       folder with maml_torch.py and maml_jax.py   (default ../shared/ref)
#   METAGRAD_REF_VENV  Python virtual environment for the references (default
#                      ${TMPDIR:-/tmp}/metagrad-refvenv); created on first use, and
#                      torch, jax, jaxlib and numpy are installed into it with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; steps=20; jax=1; only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --no-jax) jax=0; shift ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do only+=("$1"); shift; done ;;
    *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
ref="${METAGRAD_REF:-../shared/ref}"
venv="${METAGRAD_REF_VENV:-${TMPDIR:-/tmp}/metagrad-refvenv}"
[ -f "$ref/maml_torch.py" ] || { echo "compare.sh: no maml_torch.py in $ref (set METAGRAD_REF)" >&2; exit 1; }
if ! "$venv/bin/python" -c "import torch, jax, numpy" 2>/dev/null; then
  echo "compare.sh: installing the references' dependencies (torch, jax, jaxlib, numpy) into $venv with pip ..."
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch jax jaxlib numpy
fi
[ ${#only[@]} -gt 0 ] || only=(W1-sin-1step-SO W1-sin-5step-SO W2-omni5w1s-1step-SO W2-omni5w1s-5step-SO W2-omni5w1s-1step-FO W3-omni20w1s-1step-SO)
cpus=$(seq -s, 0 $((threads - 1)))
echo "building the bench ..."
cargo bench --bench maml_step --no-run -q 2>/dev/null || cargo bench --bench maml_step --no-run
median() { awk -v w="$1" '$1 == w && $2 == "median" { print $3; exit }'; }
printf '\n%-24s %12s %12s %12s %10s %10s\n' workload "torch s" "jax s" "metagrad s" "vs torch" "vs jax"
for w in "${only[@]}"; do
  t=$("$venv/bin/python" "$ref/maml_torch.py" --threads "$threads" --steps "$steps" --only "$w" 2>/dev/null | median "$w")
  j="-"
  if [ "$jax" = 1 ] && [ "${w#W1}" != "$w" ]; then
    j=$(taskset -c "$cpus" "$venv/bin/python" "$ref/maml_jax.py" --steps "$steps" --only "$w" 2>/dev/null | median "$w")
  fi
  m=$(cargo bench -q --bench maml_step -- --threads "$threads" --steps "$steps" --only "$w" 2>/dev/null | median "$w")
  rt=$(awk -v a="$t" -v b="$m" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else print "-" }')
  rj=$(awk -v a="$j" -v b="$m" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else print "-" }')
  printf '%-24s %12s %12s %12s %10s %10s\n' "$w" "$t" "$j" "$m" "$rt" "$rj"
done
echo "(ratios > 1 mean metagrad is faster; $threads threads each, median of $steps steps)"
