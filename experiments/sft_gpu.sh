#!/bin/bash
# The SmolLM2 GSM8K measurements of docs/results/sft, on a CUDA GPU:
#   experiments/sft_gpu.sh DATA_DIR OUT_DIR
# (fedtune importable; on a CPU drop train.bf16 and use the CPU setting in experiments/sft.toml)
set -u
DATA=$1; OUT=$2; HERE=$(dirname "$0"); mkdir -p "$OUT"
python3 "$HERE/sft_before.py" "$HERE/sft.toml" "$OUT/before" --set data.path="$DATA" --set train.bf16=true
for fw in fedavg kd split; do
  python3 -m fedtune run --config "$HERE/sft.toml" --framework $fw --data "$DATA" --out "$OUT/$fw" --quiet \
    --set train.bf16=true 2>&1 | tail -4
done
