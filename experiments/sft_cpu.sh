#!/bin/bash
# The CPU-sized SmolLM2 GSM8K run of docs/results/sft/cpu (a 2-core machine, 1 torch thread per job):
#   experiments/sft_cpu.sh DATA_DIR OUT_DIR [FRAMEWORK ...]   (default: fedavg split kd)
# 3 clients x 16 rows, 2 rounds, batch 8, 24 held-out rows answered with up to 128 new tokens. The
# untrained model's round 0 first, then the three frameworks side by side. One SmolLM2 training
# process at batch 8 x 320 tokens peaks at ~6.6 GB in fp32 on a CPU; recomputing activations in the
# backward pass (train.gradient_checkpointing: ~2.2 GB, same gradients) lets three fit in 24 GB.
set -u
DATA=$1; OUT=$2; shift 2; HERE=$(dirname "$0"); mkdir -p "$OUT"
FRAMEWORKS=${*:-fedavg split kd}
CPU="--set data.private_size=48 --set fed.rounds=2 --set data.public_size=32 --set data.test_size=24 --set train.eval_batch_size=8
     --set eval.max_new_tokens=128 --set eval.samples=3 --set train.threads=1 --set train.batch_size=8
     --set train.gradient_checkpointing=true"
export OMP_NUM_THREADS=1
run() {
  fw=$1; shift
  python3 -m fedtune run --config "$HERE/sft.toml" --framework $fw --data "$DATA" --out "$OUT/$fw" \
    --log-every 1 $CPU "$@" > "$OUT/$fw.log" 2>&1
}
[ -f "$OUT/before/before.json" ] || python3 "$HERE/sft_before.py" "$HERE/sft.toml" "$OUT/before" --set data.path="$DATA" $CPU > "$OUT/before.log" 2>&1
for fw in $FRAMEWORKS; do run $fw & done
wait
