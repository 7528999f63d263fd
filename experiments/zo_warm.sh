#!/usr/bin/env bash
# zo from a warm start (docs/results/zo/README.md, "From a warm start"): one fedavg round makes
# the start; zo and fedavg then continue from it (model.init_from). One process at a time.
# Usage: experiments/zo_warm.sh [STEP...]   (default: every step; runs land in runs/zo-warm/)
#        SEED=1 OUT=runs/zo-warm-seed1 experiments/zo_warm.sh start fedavg zo-3e-4-long   (another seed)
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/zo-warm}
SEED=${SEED:-0}
COMMON=(--model minilm --clients 2 --set data.max_labels=10 --set data.private_size=200
        --set data.public_size=100 --set data.test_size=200 --set data.max_length=40
        --set train.batch_size=4 --set train.threads=1 --set seed=$SEED --quiet)
run() {  # NAME ARGS...: skipped when the run already finished
  local name=$1; shift
  [[ -f $OUT/$name/summary.json ]] && return 0
  /usr/bin/time -f "$name: %U s user CPU" nice -n 10 $PY -m fedtune run --out "$OUT/$name" "${COMMON[@]}" "$@"
}
steps=("${@:-start fedavg zo-1e-4 zo-3e-4-long zo-1e-3 zo-3e-3}")
for s in ${steps[@]}; do
  case $s in
    start)   run start --framework fedavg --rounds 1 ;;
    fedavg)  run fedavg --framework fedavg --rounds 2 --set model.init_from=$OUT/start ;;
    zo-1e-3) run zo-1e-3 --framework zo --rounds 2 --set zo.steps=200 --set zo.lr=1e-3 --set model.init_from=$OUT/start ;;
    zo-3e-3) run zo-3e-3 --framework zo --rounds 2 --set zo.steps=200 --set zo.lr=3e-3 --set model.init_from=$OUT/start ;;
    zo-1e-4) run zo-1e-4 --framework zo --rounds 2 --set zo.steps=200 --set zo.lr=1e-4 --set model.init_from=$OUT/start ;;
    zo-3e-4-long) run zo-3e-4-long --framework zo --rounds 5 --set zo.steps=200 --set zo.lr=3e-4 --set model.init_from=$OUT/start ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
