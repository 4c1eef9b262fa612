#!/usr/bin/env bash
# One GPU-machine session's measurements for docs/cuda.md: CUDA tests, the kernel bench, then fpf-cuda-bench at
# the real shape on the bf16 checkpoint (batch 1/2/4, eager and flash) and on AWQ, GPTQ and NF4 (batch 1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT" /work && ln -sfn "$PWD" /work/main 2>/dev/null  # the tests find their fixtures by the build's path
export LD_LIBRARY_PATH=$PWD/.carry/lib:${LD_LIBRARY_PATH:-}
B=.carry/bin
$B/fpf_cuda_tests 2>&1 | grep -E "FAILED|ERROR|test cases|Status" | head -20
$B/fpf-cuda-kernel-bench
OUT=$OUT scripts/device-cuda-real.sh --batch ${BATCH:-1,2,4} 2>&1 | grep -v "tokens seq0" | tail -12
rm -rf /dev/shm/qwen3-30b-a3b
SCHEMES="${SCHEMES:-awq gptq nf4}" OUT=$OUT scripts/device-quant-real.sh 2>&1 | grep -E "decode bytes|loaded|bs1:|synth"
