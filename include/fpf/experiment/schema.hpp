#pragma once
// The experiment file, as C++ types. Field names and nesting follow the seed mega-plan's "Uniform JSON Schema"
// (experiment_metadata / configurations / runs / decode_steps) so the seed's Python analysis can read fpf's files;
// the fields a researcher needs that the seed lacks (fpf commit, GPU, library versions, build flags, timing summary,
// the determinism verdict) are extras that the seed's script ignores. docs/experiments.md lists every field.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <fpf/taps/signals.hpp>

namespace fpf::experiment {

struct ExtractionConfig {
  std::vector<int> layers;     // 1-based blocks, "last" already resolved (written as "layer_k")
  std::vector<int> positions;  // negative, counted from the end (written as "pos_-3")
  int hidden_dim = 0;
  int key_dim = 0;
  int top_k_logprobs = 0;
  friend bool operator==(const ExtractionConfig&, const ExtractionConfig&) = default;
};

struct Metadata {
  std::string experiment_type;  // e.g. "batch_size"
  std::string variable_tested;  // e.g. "batch_size"
  std::string model;
  std::string model_size;
  std::string architecture;
  std::int64_t sequence_length = 0;
  int decode_steps = 0;
  ExtractionConfig extraction_config;
  std::string date_created;  // "YYYY-MM-DD HH:MM:SS" (UTC)
  friend bool operator==(const Metadata&, const Metadata&) = default;
};

// The tested variable's value in one configuration: a number (batch size 2), a string ("eager", "12.1"), a bool
// (compile) or null (the reference experiment tests nothing).
using VariableValue = std::variant<std::monostate, bool, std::int64_t, double, std::string>;

struct FixedParams {
  bool compile = false;
  std::string attention_impl;
  std::string quantization;
  int tp_size = 1;
  int ep_size = 1;
  bool concurrent_streams = false;
  friend bool operator==(const FixedParams&, const FixedParams&) = default;
};

// Runtime over the repetitions of one configuration. variance is the population variance (mean squared deviation
// from the mean, numpy's default), as the seed asks for "variance from average".
struct Timing {
  int reps = 0;
  double runtime_seconds_mean = 0;
  double runtime_seconds_variance = 0;
  friend bool operator==(const Timing&, const Timing&) = default;
};

// The runner's verdict: were all repetitions bit-identical, and the FNV-1a 64 fingerprint of the stored signals
// (equal fingerprints on two machines mean bit-identical signals without comparing the files).
struct Determinism {
  int reps_compared = 0;
  bool bit_exact = false;
  std::string signals_fnv1a64;   // 16 lowercase hex digits (empty when the reps differ)
  std::string first_difference;  // where the reps first differ (empty when they agree)
  friend bool operator==(const Determinism&, const Determinism&) = default;
};

struct Configuration {
  std::string config_id;  // e.g. "H100_bs1"; runs link to it
  std::string hardware;   // e.g. "H100-80GB"; the analysis groups by this string
  std::string provider;
  VariableValue variable_value;
  // Library versions, written flat beside the other fields as the seed does ("cuda_version": "12.8"). Every
  // configuration key that ends in "_version" lands here when read: cuda_version, cublaslt_version, nccl_version,
  // torch_version, ...
  std::map<std::string, std::string> versions;
  FixedParams fixed_params;
  // fpf extras; empty strings / 0 mean "not recorded" and are not written.
  std::string fpf_commit;
  std::string gpu_name;
  std::string gpu_driver;
  std::string compiler;
  std::string build_flags;
  std::string backend;    // "cpu" | "cuda"
  std::string precision;  // "fp32" | "bf16" | "fp16"
  int batch_size = 0;
  std::optional<Timing> timing;
  std::optional<Determinism> determinism;
  friend bool operator==(const Configuration&, const Configuration&) = default;
};

// One repetition of one configuration. decode_steps carries the signals only for the rep that stores them (the
// last rep, when all reps agreed); the other reps keep their timing and an empty decode_steps.
struct Run {
  std::string config_id;
  int rep_id = 0;
  std::string timestamp;  // "YYYY-MM-DD HH:MM:SS" (UTC), when the rep started
  double runtime_seconds = 0;
  std::string prompt_text;
  std::vector<std::int32_t> prompt_ids;  // fpf extra, not written when empty
  std::vector<taps::StepSignals> decode_steps;
  bool has_signals() const noexcept { return !decode_steps.empty(); }
};

struct ExperimentFile {
  Metadata experiment_metadata;
  std::vector<Configuration> configurations;
  std::vector<Run> runs;

  const Configuration* find_configuration(const std::string& config_id) const {
    for (const auto& c : configurations)
      if (c.config_id == config_id) return &c;
    return nullptr;
  }
};

// The signal names used in decode_steps, in file order.
enum class Signal { hidden_states, key_vectors, logprobs };

inline const char* signal_name(Signal s) noexcept {
  switch (s) {
    case Signal::hidden_states: return "hidden_states";
    case Signal::key_vectors: return "key_vectors";
    case Signal::logprobs: return "logprobs";
  }
  return "?";
}

inline std::optional<Signal> parse_signal(const std::string& s) noexcept {
  for (Signal x : {Signal::hidden_states, Signal::key_vectors, Signal::logprobs})
    if (s == signal_name(x)) return x;
  return std::nullopt;
}

}  // namespace fpf::experiment
