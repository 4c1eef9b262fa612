#pragma once
// The seed's four analyses (seeds/001, analysis/compare_experiments.py), with its definitions:
//   1. reproducibility: every pair of repetitions of a configuration, bit-exact;
//   2. cross-hardware baseline: same variable value on different hardware ("noise floor");
//   3. within-hardware detectability: each value against the smallest value on the same hardware;
//   4. cross-hardware detectability: different values on different hardware, ratio to the baseline mean,
//      detectable when the ratio is >= 1.5;
// and the summary's classification (detectable pairs > 75% Strong, > 50% Moderate, else Weak), plus the seed's
// other summary (seeds/002): signal-to-noise = largest within-hardware distance / baseline mean, > 10 Strong,
// > 3 Moderate, > 1 Weak, else Not Detectable.
//
// A distance between two runs is the seed's: the L2 distance of each (step, position) vector, reduced by max
// (its analyses use 'max'); mean, median and std are reported too, and the per-step series.
//
// Where fpf differs from the seed's script (DESIGN.md, "The seed's analysis script, read closely"):
// - it analyses the repetition that carries the signals (the last), not rep 0, which the storage rule leaves empty;
// - it takes the layers from the file and reports every one (the headline is the last layer), not "layer_39";
// - hardware pairs: every pair of hardware names, not only the first two in sorted order;
// - a baseline of exactly 0 (two GPUs computing identical bits) is reported as such; detectability then means
//   "distance > 0" instead of dividing by zero, and a file with no baseline at all is "n/a", not "Weak".
#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include <fpf/compare/policies.hpp>
#include <fpf/experiment/schema.hpp>

namespace fpf::analysis {

using experiment::Configuration;
using experiment::ExperimentFile;
using experiment::Run;
using experiment::Signal;
using experiment::VariableValue;

inline constexpr double kDetectabilityRatio = 1.5;

// ---- variable values: printing, equality and order like Python's (1 == 1.0) --------------------------------
inline std::string value_label(const VariableValue& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::monostate>)
          return "null";
        else if constexpr (std::is_same_v<T, bool>)
          return x ? "true" : "false";
        else if constexpr (std::is_same_v<T, std::int64_t>)
          return std::to_string(x);
        else if constexpr (std::is_same_v<T, double>) {
          char buf[32];
          return std::string(buf, std::to_chars(buf, buf + sizeof buf, x).ptr);
        } else
          return x;
      },
      v);
}

namespace analysis_detail {
inline std::optional<double> numeric(const VariableValue& v) {
  if (auto i = std::get_if<std::int64_t>(&v)) return double(*i);
  if (auto d = std::get_if<double>(&v)) return *d;
  if (auto b = std::get_if<bool>(&v)) return *b ? 1.0 : 0.0;
  return std::nullopt;
}
}  // namespace analysis_detail

inline bool value_equal(const VariableValue& a, const VariableValue& b) {
  auto x = analysis_detail::numeric(a), y = analysis_detail::numeric(b);
  if (x && y) return *x == *y;
  return a == b;
}
// Numbers (and bools) by value, before strings; strings lexicographically; null first.
inline bool value_less(const VariableValue& a, const VariableValue& b) {
  auto x = analysis_detail::numeric(a), y = analysis_detail::numeric(b);
  if (x && y) return *x < *y;
  auto rank = [](const VariableValue& v) {
    return std::holds_alternative<std::monostate>(v) ? 0 : std::holds_alternative<std::string>(v) ? 2 : 1;
  };
  if (rank(a) != rank(b)) return rank(a) < rank(b);
  if (rank(a) == 2) return std::get<std::string>(a) < std::get<std::string>(b);
  return false;
}

// ---- distances between two runs -----------------------------------------------------------------------------
struct Stats {
  double mean = 0, max = 0, median = 0, std = 0;  // over all (step, position) distances; std is the population std
  std::size_t count = 0;
};

inline Stats stats_of(std::vector<double> v) {
  Stats s;
  s.count = v.size();
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x, s.max = std::max(s.max, x);
  s.mean = sum / double(v.size());
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  s.std = std::sqrt(ss / double(v.size()));
  std::sort(v.begin(), v.end());
  std::size_t n = v.size();
  s.median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
  return s;
}

struct RunDistance {
  Stats stats;                       // stats.max is the seed's distance
  std::vector<double> per_step_max;  // max over positions, one per step
  bool bit_exact = true;             // every compared vector bit-identical
};

// The seed's compare_runs for one signal and layer (layer ignored for logprobs): L2 per (step, position), steps
// zipped, positions from the file. Vectors missing on one side are skipped, as the seed does.
inline RunDistance compare_runs(const Run& a, const Run& b, Signal signal, int layer) {
  RunDistance r;
  std::vector<double> all;
  std::size_t steps = std::min(a.decode_steps.size(), b.decode_steps.size());
  for (std::size_t s = 0; s < steps; ++s) {
    const auto &x = a.decode_steps[s], &y = b.decode_steps[s];
    double step_max = 0;
    auto add = [&](const std::vector<float>& u, const std::vector<float>& v) {
      if (u.size() != v.size()) return;
      double d = compare::l2(u, v);
      r.bit_exact = r.bit_exact && compare::bit_exact(u, v);
      all.push_back(d);
      step_max = std::max(step_max, d);
    };
    if (signal == Signal::logprobs) {
      for (const auto& [pos, tx] : x.logprobs)
        if (auto ty = y.logprobs.find(pos); ty != y.logprobs.end()) add(tx.log_probs, ty->second.log_probs);
    } else {
      const auto& mx = signal == Signal::hidden_states ? x.hidden_states : x.key_vectors;
      const auto& my = signal == Signal::hidden_states ? y.hidden_states : y.key_vectors;
      auto lx = mx.find(layer), ly = my.find(layer);
      if (lx != mx.end() && ly != my.end())
        for (const auto& [pos, u] : lx->second)
          if (auto v = ly->second.find(pos); v != ly->second.end()) add(u, v->second);
    }
    r.per_step_max.push_back(step_max);
  }
  r.stats = stats_of(std::move(all));
  return r;
}

// ---- results --------------------------------------------------------------------------------------------------
struct RepPair {
  int rep_a = 0, rep_b = 0;
  bool bit_exact = true;
  double max_distance = 0;  // over all layers (and the signal)
};

struct Reproducibility {
  std::string config_id;
  int runs = 0;               // repetitions in the file
  int runs_with_signals = 0;  // repetitions that carry signals
  std::vector<RepPair> pairs;
  std::optional<experiment::Determinism> runner;  // the runner's verdict, when the file records it
  // true/false when checkable (pairs in the file, or the runner's verdict); nullopt when only one rep has signals
  // and no verdict is recorded.
  std::optional<bool> is_exact;
  double max_distance = 0;
};

struct Comparison {
  std::string config_a, config_b;
  std::string hardware_a, hardware_b;
  VariableValue value_a, value_b;
  RunDistance distance;
  // cross-hardware detectability only:
  std::optional<double> ratio;  // distance / baseline mean; nullopt when the baseline is 0
  bool detectable = false;
};

struct Baseline {
  std::vector<Comparison> pairs;  // one per variable value present on two hardware types
  double mean = 0, std = 0, min = 0, max = 0;
  bool available() const { return !pairs.empty(); }
  bool zero() const { return available() && mean == 0; }
};

struct WithinHardware {
  std::string hardware;
  std::string baseline_config;
  VariableValue baseline_value;
  std::vector<Comparison> comparisons;  // baseline vs each other configuration
};

struct CrossHardware {
  std::vector<Comparison> comparisons;
  int detectable_count = 0, total_count = 0;
  double percentage = 0;
  bool zero_baseline = false;  // classified by distance > 0
  bool available = false;      // baseline and at least one comparison
};

// The analyses for one layer (or for logprobs, layer 0).
struct LayerAnalysis {
  int layer = 0;
  Baseline baseline;
  std::vector<WithinHardware> within;
  CrossHardware cross;
  double max_signal = 0;      // largest within-hardware distance
  std::optional<double> snr;  // max_signal / baseline mean; nullopt when the baseline is missing or 0
};

struct Classification {
  std::string status;     // seed 001: "Strong" | "Moderate" | "Weak" | "n/a"
  std::string snr_class;  // seed 002: "Strong" | "Moderate" | "Weak" | "Not Detectable" | "n/a"
};

struct ExperimentAnalysis {
  std::string file;
  std::string experiment_type, variable;
  Signal signal = Signal::key_vectors;
  std::vector<int> layers;  // analysed layers (the file's); {0} for logprobs
  std::vector<std::string> hardware;
  std::vector<Reproducibility> reproducibility;
  bool all_exact = true;
  std::vector<LayerAnalysis> per_layer;  // same order as layers; the headline is the last
  const LayerAnalysis& headline() const { return per_layer.back(); }
  Classification classification;
};

// ---- the analyses ---------------------------------------------------------------------------------------------
namespace analysis_detail {

// The run an analysis uses for a configuration: the last repetition that carries signals.
inline const Run* analysed_run(const ExperimentFile& f, const std::string& config_id) {
  const Run* best = nullptr;
  for (const Run& r : f.runs)
    if (r.config_id == config_id && r.has_signals() && (!best || r.rep_id >= best->rep_id)) best = &r;
  return best;
}

inline std::vector<const Configuration*> configs_on(const ExperimentFile& f, const std::string& hw) {
  std::vector<const Configuration*> v;
  for (const auto& c : f.configurations)
    if (c.hardware == hw) v.push_back(&c);
  return v;
}

inline Comparison make_comparison(const Configuration& a, const Configuration& b, const RunDistance& d) {
  return Comparison{a.config_id, b.config_id, a.hardware, b.hardware, a.variable_value, b.variable_value, d};
}

}  // namespace analysis_detail

inline std::vector<Reproducibility> analyze_reproducibility(const ExperimentFile& f, Signal signal,
                                                            const std::vector<int>& layers) {
  std::vector<Reproducibility> out;
  for (const auto& c : f.configurations) {
    Reproducibility r;
    r.config_id = c.config_id;
    r.runner = c.determinism;
    std::vector<const Run*> runs;
    for (const Run& run : f.runs)
      if (run.config_id == c.config_id) {
        ++r.runs;
        if (run.has_signals()) runs.push_back(&run);
      }
    r.runs_with_signals = int(runs.size());
    for (std::size_t i = 0; i < runs.size(); ++i)
      for (std::size_t j = i + 1; j < runs.size(); ++j) {
        RepPair p{runs[i]->rep_id, runs[j]->rep_id};
        for (int layer : layers) {
          RunDistance d = compare_runs(*runs[i], *runs[j], signal, layer);
          p.bit_exact = p.bit_exact && d.bit_exact;
          p.max_distance = std::max(p.max_distance, d.stats.max);
        }
        r.max_distance = std::max(r.max_distance, p.max_distance);
        r.pairs.push_back(p);
      }
    if (!r.pairs.empty()) {
      r.is_exact = std::all_of(r.pairs.begin(), r.pairs.end(), [](const RepPair& p) { return p.bit_exact; });
      if (r.runner && !r.runner->bit_exact) r.is_exact = false;
    } else if (r.runner) {
      r.is_exact = r.runner->bit_exact;
    }
    out.push_back(std::move(r));
  }
  return out;
}

inline std::vector<std::string> hardware_types(const ExperimentFile& f) {
  std::set<std::string> s;
  for (const auto& c : f.configurations) s.insert(c.hardware);
  return {s.begin(), s.end()};
}

inline Baseline analyze_baseline(const ExperimentFile& f, Signal signal, int layer) {
  using namespace analysis_detail;
  Baseline b;
  auto hw = hardware_types(f);
  for (std::size_t i = 0; i < hw.size(); ++i)
    for (std::size_t j = i + 1; j < hw.size(); ++j)
      for (const Configuration* c1 : configs_on(f, hw[i])) {
        const Configuration* c2 = nullptr;
        for (const Configuration* c : configs_on(f, hw[j]))
          if (value_equal(c->variable_value, c1->variable_value)) {
            c2 = c;
            break;
          }
        if (!c2) continue;
        const Run *r1 = analysed_run(f, c1->config_id), *r2 = analysed_run(f, c2->config_id);
        if (!r1 || !r2) continue;
        b.pairs.push_back(make_comparison(*c1, *c2, compare_runs(*r1, *r2, signal, layer)));
      }
  if (b.available()) {
    std::vector<double> v;
    for (const auto& p : b.pairs) v.push_back(p.distance.stats.max);
    Stats s = stats_of(v);
    b.mean = s.mean;
    b.std = s.std;
    b.max = s.max;
    b.min = *std::min_element(v.begin(), v.end());
  }
  return b;
}

inline std::vector<WithinHardware> analyze_within_hardware(const ExperimentFile& f, Signal signal, int layer) {
  using namespace analysis_detail;
  std::vector<WithinHardware> out;
  for (const std::string& hw : hardware_types(f)) {
    auto configs = configs_on(f, hw);
    std::stable_sort(configs.begin(), configs.end(), [](const Configuration* a, const Configuration* b) {
      return value_less(a->variable_value, b->variable_value);
    });
    if (configs.size() < 2) continue;
    const Run* base = analysed_run(f, configs[0]->config_id);
    if (!base) continue;
    WithinHardware w{hw, configs[0]->config_id, configs[0]->variable_value, {}};
    for (std::size_t i = 1; i < configs.size(); ++i)
      if (const Run* r = analysed_run(f, configs[i]->config_id))
        w.comparisons.push_back(make_comparison(*configs[0], *configs[i], compare_runs(*base, *r, signal, layer)));
    out.push_back(std::move(w));
  }
  return out;
}

inline CrossHardware analyze_cross_hardware(const ExperimentFile& f, const Baseline& baseline, Signal signal, int layer,
                                            double criterion = kDetectabilityRatio) {
  using namespace analysis_detail;
  CrossHardware x;
  if (!baseline.available()) return x;  // nothing to compare against
  x.zero_baseline = baseline.zero();
  auto hw = hardware_types(f);
  for (std::size_t i = 0; i < hw.size(); ++i)
    for (std::size_t j = i + 1; j < hw.size(); ++j)
      for (const Configuration* c1 : configs_on(f, hw[i])) {
        const Run* r1 = analysed_run(f, c1->config_id);
        if (!r1) continue;
        for (const Configuration* c2 : configs_on(f, hw[j])) {
          if (value_equal(c1->variable_value, c2->variable_value)) continue;  // that pair is in the baseline
          const Run* r2 = analysed_run(f, c2->config_id);
          if (!r2) continue;
          Comparison c = make_comparison(*c1, *c2, compare_runs(*r1, *r2, signal, layer));
          double d = c.distance.stats.max;
          if (x.zero_baseline) {
            c.detectable = d > 0;
          } else {
            c.ratio = d / baseline.mean;
            c.detectable = *c.ratio >= criterion;
          }
          x.detectable_count += c.detectable;
          ++x.total_count;
          x.comparisons.push_back(std::move(c));
        }
      }
  x.available = x.total_count > 0;
  if (x.total_count) x.percentage = 100.0 * x.detectable_count / x.total_count;
  return x;
}

inline Classification classify(const LayerAnalysis& l) {
  Classification c;
  if (!l.cross.available)
    c.status = "n/a";
  else if (l.cross.percentage > 75)
    c.status = "Strong";
  else if (l.cross.percentage > 50)
    c.status = "Moderate";
  else
    c.status = "Weak";

  if (!l.baseline.available())
    c.snr_class = "n/a";
  else if (l.baseline.zero())
    c.snr_class = l.max_signal > 0 ? "Strong" : "Not Detectable";
  else if (*l.snr > 10)
    c.snr_class = "Strong";
  else if (*l.snr > 3)
    c.snr_class = "Moderate";
  else if (*l.snr > 1)
    c.snr_class = "Weak";
  else
    c.snr_class = "Not Detectable";
  return c;
}

// All analyses of one experiment file for one signal, every layer of the file.
inline ExperimentAnalysis analyze_experiment(const ExperimentFile& f, Signal signal, const std::string& file_name) {
  ExperimentAnalysis a;
  a.file = file_name;
  a.experiment_type = f.experiment_metadata.experiment_type;
  a.variable = f.experiment_metadata.variable_tested;
  a.signal = signal;
  a.hardware = hardware_types(f);
  if (signal == Signal::logprobs) {
    a.layers = {0};
  } else {
    a.layers = f.experiment_metadata.extraction_config.layers;
    std::sort(a.layers.begin(), a.layers.end());
    if (a.layers.empty()) a.layers = {0};
  }
  a.reproducibility = analyze_reproducibility(f, signal, a.layers);
  for (const auto& r : a.reproducibility)
    if (r.is_exact == false) a.all_exact = false;
  for (int layer : a.layers) {
    LayerAnalysis l;
    l.layer = layer;
    l.baseline = analyze_baseline(f, signal, layer);
    l.within = analyze_within_hardware(f, signal, layer);
    l.cross = analyze_cross_hardware(f, l.baseline, signal, layer);
    for (const auto& w : l.within)
      for (const auto& c : w.comparisons) l.max_signal = std::max(l.max_signal, c.distance.stats.max);
    if (l.baseline.available() && !l.baseline.zero()) l.snr = l.max_signal / l.baseline.mean;
    a.per_layer.push_back(std::move(l));
  }
  a.classification = classify(a.headline());
  return a;
}

// The seed's --all file list, in its order.
inline const std::vector<std::string>& seed_experiment_files() {
  static const std::vector<std::string> files = {
      "batch_size_experiment.json",         "compile_experiment.json",
      "quantization_experiment.json",       "attention_experiment.json",
      "concurrent_streams_experiment.json", "tensor_parallel_experiment.json",
      "expert_parallel_experiment.json",    "cuda_version_experiment.json"};
  return files;
}

inline std::string layer_label(int layer) { return layer ? "layer_" + std::to_string(layer) : "logprobs"; }

}  // namespace fpf::analysis
