#!/usr/bin/env bash
# Thread scaling of the meta-batch mapper: runs `cargo bench --bench maml_step` for each
# workload at 1, 2, 4, 8 and 16 threads (those up to the machine's core count, or the
# list given with --threads) and prints seconds per step, tasks per second and the
# speed-up over one thread. One prepared script, for a many-core machine that is lent
# for a few minutes: it builds first, then runs everything in one go.
#
#   benches/scaling.sh [--steps N] [--threads "1 2 4 8 16"] [--only NAME ...]
#
# The bench's results do not depend on the thread count (the mapper reduces in task
# order); only the time does.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=10; threads=""; only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do only+=("$1"); shift; done ;;
    *) echo "scaling.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cores=$(nproc)
if [ -z "$threads" ]; then
  for t in 1 2 4 8 16; do [ "$t" -le "$cores" ] && threads="$threads $t"; done
fi
[ ${#only[@]} -gt 0 ] || only=(W1-sin-1step-SO W1-sin-5step-SO W2-omni5w1s-1step-SO W2-omni5w1s-5step-SO W2-omni5w1s-1step-FO W3-omni20w1s-1step-SO)
echo "building the bench ..."
bench=$(cargo bench --bench maml_step --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[ -x "$bench" ] || { echo "scaling.sh: cannot find the maml_step binary" >&2; exit 1; }
echo "machine: $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
printf '%-24s %8s %12s %12s %9s\n' workload threads "s/step" "tasks/s" speed-up
for w in "${only[@]}"; do
  s="$steps"; [ "${w#W1}" != "$w" ] && s=$((steps * 50))
  base=""
  for t in $threads; do
    line=$("$bench" --only "$w" --steps "$s" --warmup 3 --threads "$t" | grep '^{')
    med=$(echo "$line" | sed 's/.*"median_s":\([0-9.e-]*\).*/\1/')
    tps=$(echo "$line" | sed 's/.*"tasks_per_s":\([0-9.e-]*\).*/\1/')
    [ -n "$base" ] || base="$med"
    printf '%-24s %8s %12.5f %12.1f %8.2fx\n' "$w" "$t" "$med" "$tps" "$(awk -v a="$base" -v b="$med" 'BEGIN { print a / b }')"
  done
done
