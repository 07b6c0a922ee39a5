#!/usr/bin/env bash
# Runs `clawrl-tui sim` over methods x preferences x seeds (each on a fresh in-process clawrl)
# and prints one line per run. The numbers in docs/LEARNING.md come from this script.
#   scripts/learning.sh OUT_DIR "combined prompt" "no-lists no-preamble" "1 2 3" [extra sim args]
set -euo pipefail
out=${1:?output folder}; methods=${2:-"rl opd combined prompt"}
prefs=${3:-"no-lists no-preamble"}; seeds=${4:-"1 2 3"}; shift $(( $# < 4 ? $# : 4 ))
bin="${CLAWRL_BIN:-$(dirname "$0")/../target/release/clawrl-tui}"
mkdir -p "$out"
for m in $methods; do for p in $prefs; do for s in $seeds; do
  run="$out/$p-$m-s$s"
  [ -f "$run/report.md" ] || "$bin" sim --preference "$p" --method "$m" --seed "$s" --out "$run" "$@" > "$run.log" 2>&1
  echo "== $p $m seed $s"; grep -E "held-out|during|drift|rollback|wall|prompt memory|judge:" "$run/report.md"
done; done; done
