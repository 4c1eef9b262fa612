#!/usr/bin/env bash
# The real-shape run on the GPU machine (device tool): binaries built on the dev machine are carried in .carry/bin
# (with libboost_json 1.81 in .carry/lib). Synthesizes Qwen3-30B-A3B in bf16 (57 GB) into /dev/shm (seeded: the
# same bytes every time), runs fpf-cuda-bench (6k-token prefill + 30 steps, 3 reps, batch 1/2/4, eager and flash),
# then Hugging Face transformers on the same checkpoint and prompt (batch 1) when HF=1.
#   scripts/device-cuda-real.sh [bench args...]      logs under $OUT (or ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
BIN=${BIN:-.carry/bin}
M=${MODEL:-/dev/shm/qwen3-30b-a3b}
LAYERS=${LAYERS:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ ! -f "$M/config.json" ]; then
  /usr/bin/time -v "$BIN/fpf-synth" --shape qwen3-30b-a3b --out "$M" --seed 0 --force ${LAYERS:+--layers $LAYERS} \
    2> "$OUT/synth.time" | tee "$OUT/synth.log" || { tail -20 "$OUT/synth.time"; exit 1; }
  grep -E "Elapsed|Maximum resident" "$OUT/synth.time"
fi
ls "$M" | head -3; du -sh "$M"
"$BIN/fpf-cuda-bench" --model "$M" --json "$OUT/bench.jsonl" "$@" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "${HF:-0}" = 1 ]; then
  PYTHONUNBUFFERED=1 python3 scripts/device-cuda-hf.py "$M" 6000 30 3 2>&1 | grep -v Warning | tee "$OUT/hf.log"
fi
exit $rc
