// CPU reference engine benchmarks:
//   BM_DecodeStep/<fixture>  latency of one greedy decode step (one token through every layer + lm_head + top-k)
//   BM_Memcpy                 memcpy of a 1 GiB buffer (bytes read + written per second)
//   BM_GemvF32/<rows>         fp32 W[rows, 4096] x vector (the op behind every decode matvec), weight bytes read
//                             per second, and that as a fraction of the memcpy bandwidth measured in the same run;
//                             65536 rows = 1 GiB of weights, out of cache like a real model's
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include <fpf/fpf.hpp>

namespace {

using namespace fpf;
using CpuEager = Setup<quant::Dense, attn::Eager, par::Single, cpu::Backend>;

std::filesystem::path fixture(const char* name) {
  return std::filesystem::path(FPF_SOURCE_DIR) / "tests" / "fixtures" / "models" / name;
}

void BM_DecodeStep(benchmark::State& state, const char* name) {
  const auto dir = fixture(name);
  const io::ModelConfig cfg = io::load_config(dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  cpu::Backend::Model<CpuEager> model(ckpt, cfg, EngineOptions{});
  taps::TapSpec spec;
  spec.layers = {1, cfg.num_hidden_layers};
  std::vector<std::int32_t> prompt(32);
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<std::int32_t>((7 * i + 3) % cfg.vocab_size);
  std::int32_t token = 1;
  int fed = 0;
  for (auto _ : state) {
    if (fed == 0 || fed >= 160) {  // keep the KV cache between 32 and 160 positions
      state.PauseTiming();
      model.reset(1);
      Chunk c{prompt, 0};
      model.forward(std::span<const Chunk>(&c, 1), spec);
      fed = static_cast<int>(prompt.size());
      state.ResumeTiming();
    }
    Chunk c{std::span<const std::int32_t>(&token, 1), fed};
    auto cap = model.forward(std::span<const Chunk>(&c, 1), spec);
    token = cap[0].at(fed).argmax;
    ++fed;
  }
  state.counters["layers"] = cfg.num_hidden_layers;
  state.counters["hidden"] = cfg.hidden_size;
}

constexpr std::size_t kCopyBytes = std::size_t{1} << 30;  // far beyond any last-level cache

// memcpy bandwidth, best of several copies, counting bytes read plus bytes written (STREAM "Copy" convention):
// the memory traffic a bandwidth-bound GEMV is measured against.
double memcpy_bandwidth() {
  static const double bw = [] {
    std::vector<char> a(kCopyBytes, 1), b(kCopyBytes, 2);
    double best = 0;
    for (int i = 0; i < 5; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      std::memcpy(b.data(), a.data(), kCopyBytes);
      benchmark::DoNotOptimize(b.data());
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * static_cast<double>(kCopyBytes) / s);
    }
    return best;
  }();
  return bw;
}

void BM_Memcpy(benchmark::State& state) {
  std::vector<char> a(kCopyBytes, 1), b(kCopyBytes, 2);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), kCopyBytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(2 * static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(kCopyBytes));
}

void BM_GemvF32(benchmark::State& state) {
  const std::size_t rows = static_cast<std::size_t>(state.range(0)), cols = 4096;
  std::vector<float> W(rows * cols), x(cols), y(rows);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  for (float& v : W) v = u(rng);
  for (float& v : x) v = u(rng);
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    cpu::matvec(W.data(), x.data(), y.data(), rows, cols);
    benchmark::DoNotOptimize(y.data());
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double bytes = static_cast<double>(W.size() * sizeof(float)) * static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["fraction_of_memcpy"] = bytes / seconds / memcpy_bandwidth();
}

}  // namespace

BENCHMARK_CAPTURE(BM_DecodeStep, dense_tied, "dense_tied")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeStep, moe_sparse_step, "moe_sparse_step")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeStep, moe_bf16_sharded, "moe_bf16_sharded")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Memcpy)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemvF32)->Arg(1024)->Arg(65536)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
