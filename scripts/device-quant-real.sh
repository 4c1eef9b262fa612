#!/usr/bin/env bash
# Real-shape quantized runs on the GPU machine (device tool): for each scheme, fpf-synth writes Qwen3-30B-A3B
# quantized straight from its seeded bf16 weights into /dev/shm (AWQ/GPTQ group 128, NF4 double-quant bf16), then
# fpf-cuda-bench runs it (6k-token prefill + 30 steps, 3 reps, batch 1) and the checkpoint is removed (RAM).
#   SCHEMES="awq gptq nf4" scripts/device-quant-real.sh [bench args...]      logs under $OUT (or ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
BIN=${BIN:-.carry/bin}
rc=0
for s in ${SCHEMES:-awq gptq nf4}; do
  M=/dev/shm/qwen3-30b-a3b-$s
  /usr/bin/time -f "synth $s: %e s, max RSS %M KB" "$BIN/fpf-synth" --shape qwen3-30b-a3b --quant "$s" --out "$M" --seed 0 --force \
    > "$OUT/synth-$s.log" 2>&1 || { tail -5 "$OUT/synth-$s.log"; rc=1; continue; }
  tail -1 "$OUT/synth-$s.log"; du -sh "$M"
  "$BIN/fpf-cuda-bench" --model "$M" --batch 1 --json "$OUT/bench-$s.jsonl" "$@" 2>&1 | tee "$OUT/bench-$s.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  rm -rf "$M"
done
exit $rc
