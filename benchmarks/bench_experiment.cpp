// Experiment file throughput: writing and reading a real-size file (Qwen3-30B-A3B: hidden 2048, key 512, layers
// 1,2,4,12,48, positions -3..-1, top-10, 30 decode steps, 4 configurations x 3 reps, signals in the last rep).
//
//   bench_experiment                       Google Benchmark: write and read MB/s
//   bench_experiment --write-files DIR [--all-reps] [--layers 1,2,4,12,48]
//                                          writes the seed's eight experiment files of that size into DIR (for
//                                          scripts/device-compare-bench.sh); --all-reps stores signals in every rep
//                                          (what the seed's script compares) instead of the last only.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>

#include <fpf/analysis/analysis.hpp>
#include <fpf/experiment/json.hpp>

using namespace fpf;
using namespace fpf::experiment;

namespace {

// Deterministic values with the magnitudes of real signals: xorshift noise, hashed from the coordinates.
float noise(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  std::uint64_t x =
      a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E5ull) * 0xBF58476D1CE4E5B9ull ^ c * 0x94D049BB133111EBull;
  x ^= x >> 31;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 29;
  return float(double(x >> 11) / double(1ull << 53) * 2.0 - 1.0);  // [-1, 1)
}

struct Shape {
  std::vector<int> layers{1, 2, 4, 12, 48};
  bool all_reps = false;
};

// Configuration (hardware h, value v): base signal, plus 1e-3 noise per hardware and 1e-2 per variable value.
ExperimentFile real_size_file(const std::string& experiment, const Shape& shape) {
  ExperimentFile f;
  auto& m = f.experiment_metadata;
  m = Metadata{experiment,
               experiment,
               "Qwen3-30B-A3B",
               "30B",
               "MoE",
               6000,
               30,
               ExtractionConfig{shape.layers, {-3, -2, -1}, 2048, 512, 10},
               "2026-11-23 04:00:00"};
  const char* hardware[] = {"H100-80GB", "H200"};
  for (int h = 0; h < 2; ++h)
    for (std::int64_t v : {1, 2}) {
      Configuration c;
      c.config_id = std::string(h ? "H200" : "H100") + "_v" + std::to_string(v);
      c.hardware = hardware[h];
      c.provider = "bench";
      c.variable_value = v;
      c.versions["cuda_version"] = "13.0";
      c.fixed_params = {false, "flash_attention_2", "awq-int4", 1, 1, false};
      f.configurations.push_back(c);
      for (int rep = 0; rep < 3; ++rep) {
        Run r{c.config_id, rep, "2026-11-23 04:00:00", 1.25 + rep, "Provide a summary of the document."};
        if (rep == 2 || shape.all_reps)
          for (int s = 0; s < 30; ++s) {
            taps::StepSignals st;
            st.step = s;
            st.token_id = 1000 + s;
            st.token_text = " tok";
            auto vec = [&](int sig, int layer, int pos, int dim) {
              std::vector<float> out(static_cast<std::size_t>(dim), 0.0f);
              for (int i = 0; i < dim; ++i) {
                std::uint64_t id = (std::uint64_t(s) << 40) ^ (std::uint64_t(layer) << 24) ^ std::uint64_t(i);
                float base = 4.0f * noise(id, std::uint64_t(sig), std::uint64_t(pos + 8));
                out[std::size_t(i)] =
                    base + 1e-3f * float(h) * noise(id, 7, 1) + 1e-2f * float(v - 1) * noise(id, 9, 2);
              }
              return out;
            };
            for (int layer : shape.layers)
              for (int pos : {-3, -2, -1}) {
                st.hidden_states[layer][pos] = vec(0, layer, pos, 2048);
                st.key_vectors[layer][pos] = vec(1, layer, pos, 512);
              }
            for (int pos : {-3, -2, -1}) {
              taps::TopK t;
              for (int k = 0; k < 10; ++k) {
                t.token_ids.push_back(100 + k);
                t.log_probs.push_back(-0.5f * float(k) - 0.1f * std::fabs(noise(std::uint64_t(s), std::uint64_t(k),
                                                                                std::uint64_t(pos + 8 + h + 4 * v))));
              }
              st.logprobs[pos] = t;
            }
            r.decode_steps.push_back(std::move(st));
          }
        f.runs.push_back(std::move(r));
      }
    }
  return f;
}

const ExperimentFile& bench_file() {
  static const ExperimentFile f = real_size_file("batch_size", Shape{});
  return f;
}

void BM_WriteExperiment(benchmark::State& state) {
  const ExperimentFile& f = bench_file();
  std::size_t bytes = 0;
  for (auto _ : state) {
    std::string text = to_json_text(f);
    bytes = text.size();
    benchmark::DoNotOptimize(text.data());
  }
  state.SetBytesProcessed(std::int64_t(bytes) * state.iterations());
  state.counters["file_MB"] = double(bytes) / 1e6;
}
BENCHMARK(BM_WriteExperiment)->Unit(benchmark::kMillisecond)->MinTime(1.0)->UseRealTime();

void BM_WriteExperimentFile(benchmark::State& state) {
  const ExperimentFile& f = bench_file();
  std::filesystem::path p = std::filesystem::temp_directory_path() / "fpf_bench_experiment.json";
  std::size_t bytes = to_json_text(f).size();
  for (auto _ : state) write_experiment(p, f);
  std::filesystem::remove(p);
  state.SetBytesProcessed(std::int64_t(bytes) * state.iterations());
}
BENCHMARK(BM_WriteExperimentFile)->Unit(benchmark::kMillisecond)->MinTime(1.0)->UseRealTime();

void BM_ReadExperiment(benchmark::State& state) {
  const std::string text = to_json_text(bench_file());
  for (auto _ : state) {
    ExperimentFile g = parse_experiment(text, "bench.json");
    benchmark::DoNotOptimize(g.runs.data());
  }
  state.SetBytesProcessed(std::int64_t(text.size()) * state.iterations());
}
BENCHMARK(BM_ReadExperiment)->Unit(benchmark::kMillisecond)->MinTime(1.0)->UseRealTime();

void BM_AnalyzeExperiment(benchmark::State& state) {
  const ExperimentFile& f = bench_file();
  for (auto _ : state) {
    auto a = analysis::analyze_experiment(f, Signal::key_vectors, "bench.json");
    benchmark::DoNotOptimize(a.per_layer.data());
  }
}
BENCHMARK(BM_AnalyzeExperiment)->Unit(benchmark::kMillisecond);

int write_files(int argc, char** argv) {
  std::filesystem::path dir = argv[2];
  Shape shape;
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--all-reps")
      shape.all_reps = true;
    else if (a == "--layers" && i + 1 < argc) {
      shape.layers.clear();
      std::stringstream ss(argv[++i]);
      for (std::string t; std::getline(ss, t, ',');) shape.layers.push_back(std::stoi(t));
    } else {
      std::cerr << "unknown option " << a << "\n";
      return 2;
    }
  }
  std::filesystem::create_directories(dir);
  for (const std::string& name : analysis::seed_experiment_files()) {
    std::string type = name.substr(0, name.size() - std::strlen("_experiment.json"));
    write_experiment(dir / name, real_size_file(type, shape));
    std::cout << (dir / name).string() << " " << std::filesystem::file_size(dir / name) << " bytes\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "--write-files")
    return fpf::run_main("bench_experiment", [&] { return write_files(argc, argv); });
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
