#!/usr/bin/env bash
# Where a batch-1 decode step of the real shape spends its time, on the GPU machine (device tool): synthesizes
# Qwen3-30B-A3B (bf16, or QUANT=awq|gptq|nf4) into /dev/shm, times it with fpf-cuda-bench (flash, batch 1), then
# runs ncu (kernel durations only, clocks left alone) over decode step 5 with graphs off, one line per kernel in
# $OUT/ncu.csv; scripts/ncu_summary.py sums them per kernel. ncu runs each kernel alone, between idle gaps, so
# small kernels read longer than inside a graph (the sum was 7.4 ms for a 5.95 ms step): a ranking, not a budget.
#   scripts/device-profile-decode.sh [bench args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
B=${BIN:-.carry/bin}
M=/dev/shm/qwen3-30b-a3b${QUANT:+-$QUANT}
if [ ! -f "$M/config.json" ]; then
  /usr/bin/time -f "synth: %e s" "$B/fpf-synth" --shape qwen3-30b-a3b ${QUANT:+--quant $QUANT} --out "$M" --seed 0 --force > "$OUT/synth.log" 2>&1 ||
    { tail -5 "$OUT/synth.log"; exit 1; }
  tail -1 "$OUT/synth.log"
fi
"$B/fpf-cuda-bench" --model "$M" --attention flash --batch 1 "$@" 2>&1 | tee "$OUT/bench.log" | grep -E "bs1|roofline|HBM"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
FPF_NCU_STEP=5 FPF_CUDA_GRAPHS=0 timeout 300 "$NCU" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
  --csv --print-units base "$B/fpf-cuda-bench" --model "$M" --attention flash --batch 1 --reps 1 --steps 7 > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc $? lines $(wc -l < "$OUT/ncu.csv")"; tail -3 "$OUT/ncu.err"
