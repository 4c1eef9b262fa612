// Encode/decode throughput of fpf::text::Tokenizer on one core (bytes_per_second = input MB/s).
// BM_EncodeParagraphs counts the whole document's bytes, blank lines included, per pass.
// The document is FPF_BENCH_DOC if set, else the default corpus (data/corpus/*.txt, sorted, joined by "\n\n"), the
// same text scripts/device-tokenizer-bench.sh gives Hugging Face `tokenizers`.
// FPF_TOKENIZER_DIR overrides the tokenizer directory (default: data/qwen3-tokenizer of the source tree).
#include <fpf/text/tokenizer.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace {

std::filesystem::path env_or(const char* name, const std::filesystem::path& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::filesystem::path(v) : fallback;
}

const fpf::text::Tokenizer& tokenizer() {
  static const auto tok =
      fpf::text::Tokenizer::from_dir(env_or("FPF_TOKENIZER_DIR", std::filesystem::path(FPF_SOURCE_DIR) / "data/qwen3-tokenizer"));
  return tok;
}

const std::string& document() {
  static const std::string doc = [] {
    if (const char* path = std::getenv("FPF_BENCH_DOC"); path && *path) return fpf::text::detail::read_file(path);
    std::vector<std::filesystem::path> files;
    for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(FPF_SOURCE_DIR) / "data/corpus"))
      if (e.path().extension() == ".txt") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    std::string joined;
    for (const auto& f : files) joined += (joined.empty() ? "" : "\n\n") + fpf::text::detail::read_file(f);
    return joined;
  }();
  return doc;
}

// Cache warm: the steady state when many prompts are built from similar text.
void BM_EncodeWarm(benchmark::State& state) {
  const auto& tok = tokenizer();
  const auto& doc = document();
  std::vector<fpf::text::TokenId> ids;
  for (auto _ : state) {
    ids.clear();
    tok.encode_into(doc, ids);
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * doc.size()));
  state.counters["tokens"] = static_cast<double>(ids.size());
}
BENCHMARK(BM_EncodeWarm)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// Cache cleared before every pass: the first encode of a document.
void BM_EncodeCold(benchmark::State& state) {
  const auto& tok = tokenizer();
  const auto& doc = document();
  std::vector<fpf::text::TokenId> ids;
  for (auto _ : state) {
    state.PauseTiming();
    tok.clear_cache();
    ids.clear();
    state.ResumeTiming();
    tok.encode_into(doc, ids);
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * doc.size()));
}
BENCHMARK(BM_EncodeCold)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// The document cut at blank lines and encoded paragraph by paragraph (many short calls, as when encoding messages).
void BM_EncodeParagraphs(benchmark::State& state) {
  const auto& tok = tokenizer();
  const auto& doc = document();
  std::vector<std::string_view> paragraphs;
  for (std::size_t pos = 0; pos < doc.size();) {
    const auto end = std::min(doc.find("\n\n", pos), doc.size());
    if (end > pos) paragraphs.push_back(std::string_view(doc).substr(pos, end - pos));
    pos = end + 2;
  }
  std::vector<fpf::text::TokenId> ids;
  for (auto _ : state) {
    for (const auto p : paragraphs) {
      ids.clear();
      tok.encode_into(p, ids);
      benchmark::DoNotOptimize(ids.data());
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * doc.size()));
  state.counters["paragraphs"] = static_cast<double>(paragraphs.size());
}
BENCHMARK(BM_EncodeParagraphs)->Unit(benchmark::kMillisecond)->MinTime(2.0);

void BM_Decode(benchmark::State& state) {
  const auto& tok = tokenizer();
  const auto ids = tok.encode(document());
  for (auto _ : state) benchmark::DoNotOptimize(tok.decode(ids));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * document().size()));
}
BENCHMARK(BM_Decode)->Unit(benchmark::kMillisecond);

void BM_Load(benchmark::State& state) {
  const auto dir = env_or("FPF_TOKENIZER_DIR", std::filesystem::path(FPF_SOURCE_DIR) / "data/qwen3-tokenizer");
  for (auto _ : state) benchmark::DoNotOptimize(fpf::text::Tokenizer::from_dir(dir));
}
BENCHMARK(BM_Load)->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
