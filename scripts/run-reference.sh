#!/usr/bin/env bash
# Builds fpf and runs experiment 0 (the reference baseline) with the CPU reference backend on the AWQ checkpoint of
# the embedded tiny Qwen3-MoE model: AWQ is the seed's reference configuration, which exp0 and every other
# experiment run on. The AWQ checkpoint is made here at run time by fpf-synth --from (a few seconds; not committed:
# it carries the tied 151936-token embedding, ~10 MB) into results/models/moe_real_vocab-awq, with group size 16
# (its in_features are 16, 32 and 64; the published checkpoints use 128). Then: a 6000-token chat prompt from
# fpf's corpus, 30 greedy steps, 3 repetitions checked bit for bit, written to results/reference_baseline.json,
# analysed by fpf-compare.
# Usage: scripts/run-reference.sh [build-dir] [extra fpf-exp0-reference options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
build=${1:-build}
shift || true
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPF_BUILD_TESTS=OFF -DFPF_BUILD_BENCHMARKS=OFF
cmake --build "$build" -j "$(nproc)" --target fpf-synth fpf-exp0-reference fpf-compare
model=results/models/moe_real_vocab-awq
"$build/bin/fpf-synth" --from tests/fixtures/models/moe_real_vocab --quant awq --group-size 16 --out "$model" --force
"$build/bin/fpf-exp0-reference" --model "$model" --out-dir results "$@"
"$build/bin/fpf-compare" results/reference_baseline.json --output results/analysis_results.json
