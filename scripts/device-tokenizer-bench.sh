#!/usr/bin/env bash
# Tokenizer goldens and the fpf-vs-Hugging-Face encode benchmark, in one command on the GPU machine (it has Python
# with tokenizers/transformers but not fpf's build dependencies, so fpf's benchmark is built here and carried).
#
#   here:  bash scripts/device-tokenizer-bench.sh --prepare [build-dir]
#          builds bench_tokenizer and copies it with its non-system shared libraries to .carry/tok (git-ignored)
#   there: bash scripts/device-tokenizer-bench.sh          (run from the repository root, .carry/tok carried)
#          writes to ${OUT:-out/tokenizer}: goldens.json (tests/fixtures/tokenizer/make_goldens.py),
#          bench_fpf.json (Google Benchmark) and bench_hf.json (HF tokenizers), both encoding the same document
#          (data/corpus/*.txt joined) on one pinned core.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  build=${2:-build-tok}
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" --target bench_tokenizer
  rm -rf .carry/tok && mkdir -p .carry/tok
  cp "$build/bin/bench_tokenizer" .carry/tok/
  # Everything but the C/C++ runtime travels beside the binary (its RUNPATH is $ORIGIN).
  ldd "$build/bin/bench_tokenizer" | awk '/=>/ {print $3}' |
    grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' | xargs -r cp -L -t .carry/tok/
  ls -la .carry/tok
  exit 0
fi

out=${OUT:-out/tokenizer}
mkdir -p "$out"
core=${FPF_BENCH_CORE:-2}
export RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
doc=/tmp/fpf_bench_doc.txt
python3 - "$doc" <<'EOF'
import pathlib, sys
files = sorted(pathlib.Path("data/corpus").glob("*.txt"))
pathlib.Path(sys.argv[1]).write_bytes(b"\n\n".join(f.read_bytes() for f in files))
EOF
lscpu | grep -E 'Model name|^CPU\(s\)' || true
pin() { if command -v taskset >/dev/null; then taskset -c "$core" "$@"; else "$@"; fi; }

python3 tests/fixtures/tokenizer/make_goldens.py --out "$out/goldens.json"

LD_LIBRARY_PATH=.carry/tok FPF_TOKENIZER_DIR=data/qwen3-tokenizer FPF_BENCH_DOC=$doc \
  pin .carry/tok/bench_tokenizer --benchmark_out="$out/bench_fpf.json" --benchmark_out_format=json

pin python3 - "$doc" "$out/bench_hf.json" <<'EOF'
import json, statistics, sys, time
import tokenizers
from tokenizers import Tokenizer
doc = open(sys.argv[1], encoding="utf-8", newline="").read()
size = len(doc.encode("utf-8"))
path = "data/qwen3-tokenizer/tokenizer.json"
def timed(tok):
    t0 = time.perf_counter()
    ids = tok.encode(doc, add_special_tokens=False).ids
    return time.perf_counter() - t0, ids
cold = []
for _ in range(5):  # a fresh tokenizer each time: empty BPE cache, like BM_EncodeCold
    seconds, ids = timed(Tokenizer.from_file(path))
    cold.append(seconds)
tok = Tokenizer.from_file(path)
timed(tok)
warm = [timed(tok)[0] for _ in range(10)]  # cache warm, like BM_EncodeWarm
# Paragraph by paragraph (the document cut at blank lines), like BM_EncodeParagraphs.
paragraphs = [p for p in doc.split("\n\n") if p]
para = []
for _ in range(5):
    t0 = time.perf_counter()
    for p in paragraphs:
        tok.encode(p, add_special_tokens=False)
    para.append(time.perf_counter() - t0)
res = {"tokenizers": tokenizers.__version__, "bytes": size, "tokens": len(ids), "paragraphs": len(paragraphs),
       "cold_MBps_median": size / 1e6 / statistics.median(cold), "warm_MBps_median": size / 1e6 / statistics.median(warm),
       "paragraphs_MBps_median": size / 1e6 / statistics.median(para), "cold_s": cold, "warm_s": warm,
       "paragraphs_s": para}
json.dump(res, open(sys.argv[2], "w"), indent=1)
print(f"HF tokenizers {tokenizers.__version__}: {size} bytes, {len(ids)} tokens; whole document: "
      f"cold {res['cold_MBps_median']:.2f} MB/s, warm {res['warm_MBps_median']:.2f} MB/s; {len(paragraphs)} "
      f"paragraphs: {res['paragraphs_MBps_median']:.2f} MB/s (median, one core, MB = 10^6 bytes)")
EOF
