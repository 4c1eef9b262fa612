#pragma once
// What an experiment file says about the model and the machine: the seed's experiment_metadata fields derived from
// config.json (never hard-coded: hidden 2048 and 48 blocks for Qwen3-30B-A3B come from its config), and the
// configuration's hardware, compiler, build and library fields for the run at hand.
#include <cstdint>
#include <cstdio>
#include <cctype>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

#include <boost/version.hpp>

#if defined(__CUDACC__)
#include <cublasLt.h>
#include <cuda_runtime.h>
#endif

#include <fpf/engine/options.hpp>
#include <fpf/experiment/schema.hpp>
#include <fpf/io/config.hpp>
#include <fpf/taps/signals.hpp>

#ifndef FPF_GIT_COMMIT
#define FPF_GIT_COMMIT ""
#endif
#ifndef FPF_BUILD_FLAGS
#define FPF_BUILD_FLAGS ""
#endif

namespace fpf {

// Total parameter count implied by config.json (embeddings, attention, MLP/experts, norms, lm_head).
inline std::int64_t parameter_count(const io::ModelConfig& c) {
  const std::int64_t H = c.hidden_size, D = c.head_dim, V = c.vocab_size;
  const std::int64_t nq = std::int64_t{c.num_attention_heads} * D, nkv = std::int64_t{c.num_key_value_heads} * D;
  std::int64_t n = V * H * (c.tie_word_embeddings ? 1 : 2) + H;  // embed, lm_head, final norm
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    n += 2 * H * nq + 2 * H * nkv + 2 * D + 2 * H;  // q, o, k, v; q/k norms; two RMSNorms
    n += c.is_moe_layer(l) ? std::int64_t{c.num_experts} * (3 * H * c.moe_intermediate_size + H)
                           : 3 * H * std::int64_t{c.intermediate_size};
  }
  return n;
}

// "30.5B", "596.0M", "0.3M": the size as people name models.
inline std::string size_label(std::int64_t params) {
  char buf[32];
  if (params >= 1'000'000'000)
    std::snprintf(buf, sizeof buf, "%.1fB", static_cast<double>(params) / 1e9);
  else
    std::snprintf(buf, sizeof buf, "%.1fM", static_cast<double>(params) / 1e6);
  return buf;
}

inline experiment::Metadata describe_experiment(const io::ModelConfig& cfg, std::string model_name,
                                                std::string experiment_type, std::string variable_tested,
                                                const taps::TapSpec& spec, int steps, std::int64_t sequence_length) {
  experiment::Metadata m;
  m.experiment_type = std::move(experiment_type);
  m.variable_tested = std::move(variable_tested);
  m.model = std::move(model_name);
  m.model_size = size_label(parameter_count(cfg));
  m.architecture = cfg.is_moe() ? "MoE" : "Dense";
  m.sequence_length = sequence_length;
  m.decode_steps = steps;
  m.extraction_config = {spec.layers, spec.positions, cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, spec.topk};
  return m;
}

// The CPU's model name from /proc/cpuinfo ("CPU" where it cannot be read).
inline std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos && colon + 2 <= line.size()) return "CPU " + line.substr(colon + 2);
    }
  return "CPU";
}

// The NVIDIA kernel driver's version ("580.159.04"), from /proc/driver/nvidia/version; empty where absent.
inline std::string nvidia_driver_version() {
  std::ifstream f("/proc/driver/nvidia/version");
  std::string line;
  std::getline(f, line);
  // "NVRM version: NVIDIA UNIX [Open ]Kernel Module [for x86_64 ] 580.159.04  Release Build ...": the first word
  // after "Kernel Module" that starts with a digit.
  const auto k = line.find("Kernel Module");
  if (k == std::string::npos) return "";
  std::istringstream words(line.substr(k + 13));
  for (std::string w; words >> w;)
    if (std::isdigit(static_cast<unsigned char>(w[0]))) return w;
  return "";
}

#if defined(__CUDACC__)
// The current GPU: name (also the configuration's hardware label), driver, CUDA runtime and cuBLASLt versions.
inline void describe_gpu(experiment::Configuration& c) {
  int dev = 0, runtime = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return;
  c.gpu_name = prop.name;
  c.hardware = prop.name;
  c.gpu_driver = nvidia_driver_version();
  cudaRuntimeGetVersion(&runtime);
  c.versions["cuda_version"] = std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  c.versions["cublaslt_version"] = std::to_string(cublasLtGetVersion());
}
#endif

inline std::string compiler_name() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "g++ " __VERSION__;
#else
  return "unknown";
#endif
}

// The fields every configuration carries about how this binary was built and what it ran.
inline experiment::Configuration describe_configuration(std::string config_id, std::string_view backend,
                                                        Precision precision, std::string_view attention,
                                                        std::string_view quantization, int batch_size) {
  experiment::Configuration c;
  c.config_id = std::move(config_id);
  c.provider = "local";
  c.backend = std::string(backend);
  c.precision = std::string(precision_name(precision));
  c.batch_size = batch_size;
  c.fixed_params.attention_impl = std::string(attention);
  c.fixed_params.quantization = std::string(quantization);
  c.fpf_commit = FPF_GIT_COMMIT;
  c.compiler = compiler_name();
  c.build_flags = FPF_BUILD_FLAGS;
  c.versions["boost_version"] = BOOST_LIB_VERSION;
  if (backend == "cpu") c.hardware = cpu_name();
#if defined(__CUDACC__)
  if (backend == "cuda") describe_gpu(c);
#endif
  return c;
}

// The prefix of a configuration id: "cpu", or the GPU's name as one word ("NVIDIA H100 80GB HBM3" -> "H100-80GB-HBM3").
inline std::string config_prefix(const experiment::Configuration& c) {
  if (c.backend == "cpu") return "cpu";
  std::string s = c.hardware;
  if (s.rfind("NVIDIA ", 0) == 0) s = s.substr(7);
  for (char& ch : s)
    if (ch == ' ') ch = '-';
  return s.empty() ? c.backend : s;
}

}  // namespace fpf
