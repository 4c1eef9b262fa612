#!/usr/bin/env bash
# fpf-compare --all against the seed's Python compare_experiments.py on the same eight real-size experiment files
# (hidden 2048, key 512, 5 layers, 3 positions, 30 steps, 4 configurations on 2 hardware types), on the GPU machine
# (it has Python and numpy), in one command.
#
#   here:  scripts/device-compare-bench.sh --stage [BUILD_DIR]   copies fpf-compare, bench_experiment and the two
#                                                                shared libraries they need into .carry/compare-bench
#   there: bash scripts/device-compare-bench.sh [OUT_DIR]       (device `run` with carry [".carry"])
#
# Two file sets:
#   A  fpf's layout: signals in the last rep only, layers 1,2,4,12,48 (Qwen3-30B-A3B). The seed's script reads rep 0
#      and layer_39, finds nothing and prints zeros, so its time is mostly json.load.
#   B  the seed's layout: every rep carries signals and the last layer is 39, so the script computes its distances.
# fpf-compare analyses every layer in both. Each tool runs on warm page cache; fpf 3 times (median), Python once.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=.carry/compare-bench

if [ "${1:-}" = "--stage" ]; then
  build=${2:-build-exp}
  mkdir -p "$carry"
  cp "$build/bin/fpf-compare" "$build/bin/bench_experiment" "$carry/"
  for lib in $(ldd "$build/bin/fpf-compare" "$build/bin/bench_experiment" | awk '/boost_json|benchmark/ {print $3}' | sort -u); do
    cp -L "$lib" "$carry/"
  done
  ls -la "$carry"
  exit 0
fi

out=${1:-${OUT:-/tmp/compare-bench-out}}
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/$carry${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
work=$(mktemp -d /tmp/fpf-compare-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
python=${PYTHON:-python3}
seed_common="$PWD/tests/fixtures/experiment/seed_common"
seed_script="$PWD/scripts/seed_compare_experiments.py"

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }  # bc may be missing there
median3() { printf '%s\n' "$@" | sort -g | sed -n 2p; }

{
  echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
  echo "python: $($python --version 2>&1), numpy $($python -c 'import numpy; print(numpy.__version__)')"
} | tee "$out/summary.txt"

"$carry/bench_experiment" --benchmark_min_time=1 --benchmark_filter='Write|Read' 2>&1 | grep -E '^BM_|^Benchmark' \
  | tee -a "$out/summary.txt"

for set in ${SETS:-A B}; do
  dir="$work/$set"
  if [ "$set" = A ]; then "$carry/bench_experiment" --write-files "$dir" >/dev/null
  else "$carry/bench_experiment" --write-files "$dir" --all-reps --layers 1,2,4,12,39 >/dev/null; fi
  mb=$(du -sm "$dir" | cut -f1)
  cat "$dir"/*.json >/dev/null  # warm the page cache for both tools

  times=()
  for i in 1 2 3; do
    t0=$(now)
    "$carry/fpf-compare" --all --experiment-dir "$dir" --output "$work/fpf_$set.json" >"$out/fpf_$set.log"
    times+=("$(calc "$(now) - $t0")")
  done
  fpf=$(median3 "${times[@]}")
  t0=$(now)
  taskset -c 0 "$carry/fpf-compare" --all --experiment-dir "$dir" --output "$work/fpf1_$set.json" >/dev/null
  fpf1=$(calc "$(now) - $t0")

  t0=$(now)
  set +e
  (cd "$work" && PYTHONPATH="$seed_common" PYTHONUNBUFFERED=1 $python "$seed_script" --all --experiment-dir "$dir" \
     --output "$work/seed_$set.json" >"$out/seed_$set.log" 2>&1)
  rc=$?
  set -e
  py=$(calc "$(now) - $t0")
  {
    echo "set $set: 8 files, $mb MB"
    echo "  fpf-compare --all (parallel over files): ${fpf} s (median of 3: ${times[*]})"
    echo "  fpf-compare --all on one core:           ${fpf1} s"
    echo "  seed compare_experiments.py --all:       ${py} s (exit $rc)"
    echo "  speedup: $(calc "$py / $fpf")x (one core: $(calc "$py / $fpf1")x)"
  } | tee -a "$out/summary.txt"
  tail -3 "$out/seed_$set.log" | sed 's/^/  seed: /' | tee -a "$out/summary.txt"
done
