#!/usr/bin/env bash
# kd over a long horizon (docs/results/kd-long/README.md): the CPU case-study setting of
# experiments/cpu.toml's kd point with 400 public rows (MiniLM-L6, Banking77, 3 clients x 200
# private rows, 400 test rows, seed 0), 25 rounds, bf16, with clients distilling the server's
# knowledge (kd.client_kd_weight = 0.5, the default) and without (0). Runs land in runs/kd-long/;
# a finished run is skipped, a stopped one resumed.
# Usage: experiments/kd_long.sh && python experiments/kd_long_report.py runs/kd-long --out docs/results/kd-long
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/kd-long}
COMMON=(--model minilm --framework kd --rounds 25 --set data.private_size=600 --set data.public_size=400
        --set data.test_size=400 --set train.head_lr=5e-2 --set kd.client_eval_size=100
        --set train.precision=bf16 --set train.threads=1)
run() {  # NAME ARGS...
  local name=$1; shift
  [[ -f $OUT/$name/summary.json ]] && return 0
  if [[ -f $OUT/$name/checkpoint.pt ]]; then
    $PY -m fedtune run --resume "$OUT/$name" --set fed.rounds=25
  else
    $PY -m fedtune run --out "$OUT/$name" "${COMMON[@]}" "$@"
  fi
}
run kd-seed0
run kd-noclientkd-seed0 --set kd.client_kd_weight=0
