#!/usr/bin/env bash
# The experiments on the GPU machine (device tool) at the real shape: fpf-synth writes Qwen3-30B-A3B as AWQ (the
# reference configuration), GPTQ and bitsandbytes NF4 into /dev/shm, then exp0 (timed), exp4, exp1 and exp3 run with
# --backend cuda and write their JSON under $OUT/results. Binaries in .carry/bin (built with FPF_WITH_POPPLER=OFF).
#   scripts/device-cuda-experiments.sh          logs and results under $OUT (or ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
R=$OUT/results
mkdir -p "$R"
export LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
B=${BIN:-.carry/bin}
for s in awq gptq nf4; do
  [ -f /dev/shm/q-$s/config.json ] || "$B/fpf-synth" --shape qwen3-30b-a3b --quant $s --out /dev/shm/q-$s --seed 0 --force \
    --tokenizer data/qwen3-tokenizer > /dev/null 2>&1 || { echo "synth $s failed"; exit 1; }
done
rc=0
/usr/bin/time -f "fpf-exp0-reference wall %e s, max RSS %M KB" "$B/fpf-exp0-reference" --model /dev/shm/q-awq --backend cuda \
  --out-dir "$R" --hardware h100 || rc=1
"$B/fpf-exp4-attention" --model /dev/shm/q-awq --backend cuda --out-dir "$R" --hardware h100 || rc=1
"$B/fpf-exp1-batch-size" --model /dev/shm/q-awq --backend cuda --out-dir "$R" --hardware h100 || rc=1
"$B/fpf-exp3-quantization" --model /dev/shm/q-awq --gptq /dev/shm/q-gptq --nf4 /dev/shm/q-nf4 --backend cuda --out-dir "$R" \
  --hardware h100 || rc=1
ls -la "$R"
exit $rc
