#!/usr/bin/env bash
# Runs `clawrl-tui sim` over methods x preferences x seeds (each on a fresh in-process clawrl)
# and prints its report. The numbers in docs/LEARNING.md come from this script. Every run is
# --deterministic (one seed, one result) and checks the held-out set every 12 interactions.
#   scripts/learning.sh OUT_DIR "combined prompt" "no-lists no-preamble" "1 2 3" [extra sim args]
set -euo pipefail
out=${1:?output folder}; methods=${2:-"rl opd combined prompt"}
prefs=${3:-"no-lists no-preamble"}; seeds=${4:-"1 2 3"}; shift $(( $# < 4 ? $# : 4 ))
bin="${CLAWRL_BIN:-$(dirname "$0")/../target/release/clawrl-tui}"
mkdir -p "$out"
for m in $methods; do for p in $prefs; do for s in $seeds; do
  run="$out/$p-$m-s$s"
  [ -f "$run/report.md" ] || "$bin" sim --preference "$p" --method "$m" --seed "$s" --out "$run" --deterministic --eval-every 12 "$@" > "$run.log" 2>&1 \
    || echo "run failed (exit $?): $run.log"
  echo "== $p $m seed $s"; grep -E "held-out|change|quality|looping|first visible|during|drift|trained|rollback|wall|prompt memory|judge:" "$run/report.md" || true
done; done; done
