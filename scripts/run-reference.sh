#!/usr/bin/env bash
# Builds fpf and runs experiment 0 (the reference baseline) on the embedded tiny Qwen3-MoE model with the CPU
# reference backend: a 6000-token chat prompt from fpf's corpus, 30 greedy steps, 3 repetitions checked bit for
# bit, written to results/reference_baseline.json, then analysed by fpf-compare.
# Usage: scripts/run-reference.sh [build-dir] [extra fpf-exp0-reference options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
build=${1:-build}
shift || true
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPF_BUILD_TESTS=OFF -DFPF_BUILD_BENCHMARKS=OFF
cmake --build "$build" -j "$(nproc)" --target fpf-exp0-reference fpf-compare
"$build/bin/fpf-exp0-reference" --model tests/fixtures/models/moe_real_vocab --out-dir results "$@"
"$build/bin/fpf-compare" results/reference_baseline.json --output results/analysis_results.json
