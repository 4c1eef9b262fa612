#!/usr/bin/env bash
# On the GPU machine: fpf-run --backend cuda on a fixture (bf16 default and fp32 eager), then on the synthesized real
# shape: an exp0-like run (6000-token prompt, 30 steps, 3 reps, all default taps, JSON) timed end to end, and the
# batch-effect comparison of fpf-cuda-bench (1 rep, batch 1/2/4, eager and flash).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
BIN=.carry/bin
M=/dev/shm/qwen3-30b-a3b
F=tests/fixtures/models/moe_real_vocab
P=$(python3 -c "import json; print(','.join(map(str, json.load(open('$F/reference.json'))['prompt_ids'])))")
$BIN/fpf-run --model $F --prompt-ids "$P" --steps 8 --backend cuda --reps 3 --out "$OUT/fixture_bf16.json"
$BIN/fpf-run --model $F --prompt-ids "$P" --steps 8 --backend cuda --precision fp32 --attention eager --reps 3 --out "$OUT/fixture_fp32.json"
[ -f $M/config.json ] || $BIN/fpf-synth --shape qwen3-30b-a3b --out $M --seed 0 --force
IDS=$(python3 -c "
s=0x1234567; ids=[]
for _ in range(6000):
    s=(s*6364136223846793005+1442695040888963407)%2**64; ids.append((s>>33)%150000)
print(','.join(map(str,ids)))")
for A in eager flash; do
  /usr/bin/time -f "exp0-like fpf-run $A: %e s wall, %M KB max RSS" $BIN/fpf-run --model $M --prompt-ids "$IDS" --steps 30 \
    --backend cuda --attention $A --reps 3 --out "$OUT/exp0_like_$A.json" 2>&1 | tail -3
done
$BIN/fpf-cuda-bench --model $M --prompt-tokens 6000 --steps 30 --reps 1 --batch 1,2,4 --attention eager,flash \
  --json "$OUT/batch.jsonl" 2>&1 | tee "$OUT/batch.log" | grep -E "bs[124]|seq0 vs"
