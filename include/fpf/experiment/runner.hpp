#pragma once
// The experiment runner: runs one configuration N times (default 3), times each repetition, checks that all
// repetitions produced bit-identical signals, and stores the signals of the last repetition only when they did.
// It knows nothing about the engine: a repetition is any callable `rep_index -> taps::SequenceSignals` (or a
// `std::vector<taps::SequenceSignals>` for a batch, sequence 0 being the measured one).
//
// A main is: build Metadata + Configuration, then
//     auto file = fpf::experiment::run_experiment(meta, config, [&](int rep) { return engine.decode(...); }, out);
// which writes `out` and returns the file; on nondeterminism it writes every rep's signals to
// "<out>.nondeterministic.json" for inspection and throws fpf::CheckFailed (exit 1 under fpf::run_main).
#include <chrono>
#include <concepts>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include <fpf/compare/signals.hpp>
#include <fpf/core/error.hpp>
#include <fpf/experiment/json.hpp>
#include <fpf/experiment/schema.hpp>
#include <fpf/taps/signals.hpp>

namespace fpf::experiment {

struct RunOptions {
  int reps = 3;
  bool progress = true;  // a progress line on stderr, drawn only when stderr is a terminal
};

// "YYYY-MM-DD HH:MM:SS" in UTC, the seed's timestamp format.
inline std::string utc_timestamp(std::chrono::system_clock::time_point t = std::chrono::system_clock::now()) {
  std::time_t tt = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

template <class F>
concept RepFunction = std::invocable<F&, int> &&
    (std::same_as<std::invoke_result_t<F&, int>, taps::SequenceSignals> ||
     std::same_as<std::invoke_result_t<F&, int>, std::vector<taps::SequenceSignals>>);

// The first pair of repetitions whose signals differ.
struct RepDivergence {
  int rep_a = 0, rep_b = 0;
  std::size_t sequence = 0;  // batch index; 0 is the measured sequence
  compare::Divergence where;
  std::string describe(const std::string& config_id) const {
    return config_id + ": rep " + std::to_string(rep_a) + " and rep " + std::to_string(rep_b) + " differ" +
           (sequence ? " in batch sequence " + std::to_string(sequence) : std::string()) + " at " + where.describe();
  }
};

struct ConfigurationResult {
  Configuration configuration;  // timing and determinism filled in
  std::vector<Run> runs;        // one per rep: signals in the last rep only, or in every rep when they differ
  std::optional<RepDivergence> divergence;
};

namespace runner_detail {

inline std::vector<taps::SequenceSignals> as_batch(taps::SequenceSignals s) {
  std::vector<taps::SequenceSignals> v;
  v.push_back(std::move(s));
  return v;
}
inline std::vector<taps::SequenceSignals> as_batch(std::vector<taps::SequenceSignals> v) { return v; }

// One line on stderr, redrawn in place: "H100_bs1 rep 2/3 [##########----------] last 12.3 s".
class Progress {
 public:
  Progress(const std::string& label, int total, bool enabled)
      : label_(label), total_(total), on_(enabled && ::isatty(::fileno(stderr))) {}
  void show(int done, double last_seconds) {
    if (!on_) return;
    const int width = 30;
    int filled = total_ ? width * done / total_ : width;
    std::fprintf(stderr, "\r%s rep %d/%d [%s%s]", label_.c_str(), done, total_, std::string(filled, '#').c_str(),
                 std::string(width - filled, '-').c_str());
    if (done) std::fprintf(stderr, " last %.1f s", last_seconds);
    if (done == total_) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  std::string label_;
  int total_;
  bool on_;
};

}  // namespace runner_detail

// Runs `config` opt.reps times. Never throws for nondeterminism: the result says where the reps differ.
template <RepFunction F>
ConfigurationResult run_configuration(Configuration config, F&& rep_fn, const RunOptions& opt = {}) {
  if (opt.reps < 1) throw Error("reps", "must be at least 1, got " + std::to_string(opt.reps));
  std::vector<std::vector<taps::SequenceSignals>> outputs;
  ConfigurationResult result;
  runner_detail::Progress progress(config.config_id, opt.reps, opt.progress);
  progress.show(0, 0);
  double sum = 0;
  for (int rep = 0; rep < opt.reps; ++rep) {
    Run run;
    run.config_id = config.config_id;
    run.rep_id = rep;
    run.timestamp = utc_timestamp();
    auto t0 = std::chrono::steady_clock::now();
    outputs.push_back(runner_detail::as_batch(rep_fn(rep)));
    run.runtime_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (outputs.back().empty()) throw Error(config.config_id, "rep " + std::to_string(rep) + " returned no sequence");
    run.prompt_text = outputs.back()[0].prompt_text;
    run.prompt_ids = outputs.back()[0].prompt_ids;
    sum += run.runtime_seconds;
    result.runs.push_back(std::move(run));
    progress.show(rep + 1, result.runs.back().runtime_seconds);
  }

  // Every rep against rep 0 (bit-identity is transitive), every sequence of the batch.
  for (int rep = 1; rep < opt.reps && !result.divergence; ++rep) {
    const auto &a = outputs[0], &b = outputs[std::size_t(rep)];
    for (std::size_t s = 0; s < std::max(a.size(), b.size()) && !result.divergence; ++s) {
      if (s >= a.size() || s >= b.size()) {
        result.divergence = RepDivergence{0, rep, s, compare::Divergence{0, "batch size"}};
      } else if (auto d = compare::first_divergence(a[s].steps, b[s].steps)) {
        result.divergence = RepDivergence{0, rep, s, *d};
      } else if (a[s].prompt_ids != b[s].prompt_ids) {
        result.divergence = RepDivergence{0, rep, s, compare::Divergence{0, "prompt_ids"}};
      }
    }
  }

  const double mean = sum / opt.reps;
  double var = 0;
  for (const Run& r : result.runs) var += (r.runtime_seconds - mean) * (r.runtime_seconds - mean);
  config.timing = Timing{opt.reps, mean, var / opt.reps};

  if (!result.divergence) {
    // All reps agree: keep the last rep's signals only.
    result.runs.back().decode_steps = std::move(outputs.back()[0].steps);
    config.determinism =
        Determinism{opt.reps, true, compare::hex64(compare::fingerprint(result.runs.back().decode_steps))};
  } else {
    // Keep every rep's signals so the difference can be inspected (fpf-compare shows it per rep pair).
    for (int rep = 0; rep < opt.reps; ++rep)
      result.runs[std::size_t(rep)].decode_steps = std::move(outputs[std::size_t(rep)][0].steps);
    config.determinism = Determinism{opt.reps, false, "", result.divergence->describe(config.config_id)};
  }
  result.configuration = std::move(config);
  return result;
}

// Adds a configuration's result to a file (checks that the config_id is new).
inline void add_result(ExperimentFile& file, ConfigurationResult result) {
  if (file.find_configuration(result.configuration.config_id))
    throw Error(result.configuration.config_id, "configuration already in the experiment file");
  file.configurations.push_back(std::move(result.configuration));
  for (Run& r : result.runs) file.runs.push_back(std::move(r));
}

// The path the runner writes a nondeterministic result to: "x.json" -> "x.nondeterministic.json".
inline std::filesystem::path nondeterministic_path(const std::filesystem::path& out) {
  std::filesystem::path p = out;
  p.replace_extension(".nondeterministic.json");
  return p;
}

// Writes `file` to `out` when every configuration's reps agreed (or carry no verdict). Otherwise writes it to
// nondeterministic_path(out), for inspection, and throws fpf::CheckFailed naming, per failing configuration, the
// first differing rep pair, step, signal, layer, position and the max difference.
inline void write_checked(const std::filesystem::path& out, const ExperimentFile& file) {
  std::string failures;
  for (const Configuration& c : file.configurations)
    if (c.determinism && !c.determinism->bit_exact)
      failures += (failures.empty() ? "" : "; ") + c.determinism->first_difference;
  if (failures.empty()) return write_experiment(out, file);
  std::filesystem::path keep = nondeterministic_path(out);
  write_experiment(keep, file);
  throw CheckFailed("nondeterminism: " + failures + "; all reps' signals kept in " + keep.string());
}

// Runs one configuration and writes the experiment file to `out` (write_checked): the whole of a `fpf-run`-style
// main. A main with several configurations calls run_configuration and add_result for each, fuse_reference for
// the baseline, then write_checked.
template <RepFunction F>
ExperimentFile run_experiment(Metadata meta, Configuration config, F&& rep_fn, const std::filesystem::path& out,
                              const RunOptions& opt = {}) {
  if (meta.date_created.empty()) meta.date_created = utc_timestamp();
  ExperimentFile file;
  file.experiment_metadata = std::move(meta);
  add_result(file, run_configuration(std::move(config), std::forward<F>(rep_fn), opt));
  write_checked(out, file);
  return file;
}

}  // namespace fpf::experiment
