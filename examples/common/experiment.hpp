#pragma once
// What the experiment mains (fpf-exp1/3/4) share: one configuration run and added to the file, the reference
// baseline fused from fpf-exp0-reference's file when it fits, and the checked write of the result.
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <fpf/engine/describe.hpp>
#include <fpf/engine/engine.hpp>
#include <fpf/engine/prompting.hpp>
#include <fpf/experiment/fuse.hpp>
#include <fpf/experiment/json.hpp>
#include <fpf/experiment/runner.hpp>
#include <fpf/text/tokenizer.hpp>

#include "cli.hpp"

namespace fpf::examples {

// The configuration of setup S: config id = the hardware/backend prefix + suffix, the experiment's variable value,
// and --hardware when given.
template <class S>
experiment::Configuration configuration(const RunOptions& run, Precision precision, int batch, const std::string& suffix,
                                        experiment::VariableValue value) {
  auto conf = describe_configuration("", run.backend, precision, S::attention::name, S::quant::name, batch);
  if (!run.hardware.empty()) conf.hardware = run.hardware;
  conf.config_id = config_prefix(conf) + suffix;
  conf.variable_value = std::move(value);
  return conf;
}

// run.reps bit-checked repetitions of engine.generate(prompts), the verdict printed, the result added to file.
template <class E>
void run_and_add(experiment::ExperimentFile& file, experiment::Configuration conf, E& engine,
                 const std::vector<std::vector<std::int32_t>>& prompts, const Resolved& r, const RunOptions& run,
                 const text::Tokenizer& tok, const std::string& what) {
  std::fprintf(stderr, "%s: %sprompt %zu tokens, %d steps x %d reps on %s\n", conf.config_id.c_str(), what.c_str(),
               prompts.at(0).size(), run.steps, run.reps, conf.hardware.c_str());
  auto result = experiment::run_configuration(
      std::move(conf),
      [&](int) {
        auto seqs = engine.generate(prompts, run.steps, r.spec);
        attach_text(tok, seqs);
        return seqs;
      },
      experiment::RunOptions{run.reps});
  const auto& c = result.configuration;
  std::printf("%s: %s, %.3f s per rep\n", c.config_id.c_str(),
              c.determinism->bit_exact ? "reps bit-identical" : c.determinism->first_difference.c_str(),
              c.timing->runtime_seconds_mean);
  experiment::add_result(file, std::move(result));
}

// Fuses OUT_DIR/reference_baseline.json into file as the configuration with variable value `value` when it exists
// for hardware `hw` (and passes `check`, which throws to refuse it); says why not otherwise. Returns whether it did.
inline bool fuse_reference_from(experiment::ExperimentFile& file, const std::string& out_dir, experiment::VariableValue value,
                                const std::string& hw, const std::string& label,
                                const std::function<void(const experiment::ExperimentFile&, const std::string&)>& check = {}) {
  const std::filesystem::path ref = std::filesystem::path(out_dir) / "reference_baseline.json";
  if (!std::filesystem::exists(ref)) return false;
  try {
    const experiment::ExperimentFile reference = experiment::read_experiment(ref);
    if (check) check(reference, ref.string());
    experiment::ExperimentFile with_ref = file;  // fuse_reference may throw half-way
    experiment::fuse_reference(with_ref, reference, std::move(value), ref.string(), hw);
    file = std::move(with_ref);
    std::printf("%s: reference configuration fused from %s\n", label.c_str(), ref.string().c_str());
    return true;
  } catch (const Error& e) {
    std::fprintf(stderr, "not fusing %s (%s); running %s here\n", ref.string().c_str(), e.what(), label.c_str());
    return false;
  }
}

// Writes OUT_DIR/name (checked, atomically) and says so.
inline void write_experiment_file(const experiment::ExperimentFile& file, const std::string& out_dir, const std::string& name) {
  std::filesystem::create_directories(out_dir);
  const std::filesystem::path out = std::filesystem::path(out_dir) / name;
  experiment::write_checked(out, file);
  std::printf("wrote %s\n", out.string().c_str());
}

}  // namespace fpf::examples
