#pragma once
// Combining experiment files.
// - fuse_reference: an experiment main reuses the reference configuration(s) of reference_baseline.json
//   (experiment 0) as its baseline, as the seed's json_reader does ("fused json").
// - merge: runs made on two machines (H100 and H200, say) become one file, so the cross-hardware analyses see both.
#include <string>
#include <vector>

#include <fpf/core/error.hpp>
#include <fpf/experiment/schema.hpp>

namespace fpf::experiment {

namespace fuse_detail {

// Throws unless the two files measured the same thing: same model, extraction config and step count.
inline void check_compatible(const Metadata& a, const Metadata& b, const std::string& b_name) {
  auto differ = [&](const char* field, const std::string& x, const std::string& y) {
    throw Error(b_name + ": experiment_metadata." + field, "is " + y + ", the experiment has " + x);
  };
  if (a.model != b.model) differ("model", a.model, b.model);
  if (a.decode_steps != b.decode_steps)
    differ("decode_steps", std::to_string(a.decode_steps), std::to_string(b.decode_steps));
  const ExtractionConfig &x = a.extraction_config, &y = b.extraction_config;
  auto list = [](const std::vector<int>& v) {
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
    return s + "]";
  };
  if (x.layers != y.layers) differ("extraction_config.layers", list(x.layers), list(y.layers));
  if (x.positions != y.positions) differ("extraction_config.positions", list(x.positions), list(y.positions));
  if (x.hidden_dim != y.hidden_dim)
    differ("extraction_config.hidden_dim", std::to_string(x.hidden_dim), std::to_string(y.hidden_dim));
  if (x.key_dim != y.key_dim) differ("extraction_config.key_dim", std::to_string(x.key_dim), std::to_string(y.key_dim));
  if (x.top_k_logprobs != y.top_k_logprobs)
    differ("extraction_config.top_k_logprobs", std::to_string(x.top_k_logprobs), std::to_string(y.top_k_logprobs));
}

inline bool same_runs(const Run& a, const Run& b) {
  auto same_steps = [](const taps::StepSignals& x, const taps::StepSignals& y) {
    return x.step == y.step && x.token_id == y.token_id && x.token_text == y.token_text &&
           x.hidden_states == y.hidden_states && x.key_vectors == y.key_vectors && x.logprobs == y.logprobs;
  };
  return a.config_id == b.config_id && a.rep_id == b.rep_id && a.timestamp == b.timestamp &&
         a.runtime_seconds == b.runtime_seconds && a.prompt_text == b.prompt_text && a.prompt_ids == b.prompt_ids &&
         std::equal(a.decode_steps.begin(), a.decode_steps.end(), b.decode_steps.begin(), b.decode_steps.end(),
                    same_steps);
}

}  // namespace fuse_detail

// Copies the reference file's configurations (only those on `hardware`, when not empty) and their runs into
// `experiment`, giving them `baseline_value` as variable_value (e.g. batch_size 1 for the batch-size experiment).
// The reference must have measured the same model with the same extraction config, and its prompt must be the
// experiment's prompt (checked against the experiment's runs when both have one).
inline void fuse_reference(ExperimentFile& experiment, const ExperimentFile& reference,
                           const VariableValue& baseline_value,
                           const std::string& reference_name = "reference_baseline.json",
                           const std::string& hardware = {}) {
  fuse_detail::check_compatible(experiment.experiment_metadata, reference.experiment_metadata, reference_name);
  std::size_t taken = 0;
  for (std::size_t ci = 0; ci < reference.configurations.size(); ++ci) {
    Configuration c = reference.configurations[ci];
    if (!hardware.empty() && c.hardware != hardware) continue;
    if (experiment.find_configuration(c.config_id))
      throw Error(reference_name + ": configurations[" + std::to_string(ci) + "].config_id",
                  "\"" + c.config_id + "\" is already in the experiment");
    c.variable_value = baseline_value;
    experiment.configurations.push_back(c);
    ++taken;
    for (std::size_t ri = 0; ri < reference.runs.size(); ++ri) {
      const Run& r = reference.runs[ri];
      if (r.config_id != c.config_id) continue;
      for (const Run& mine : experiment.runs)
        if (!mine.prompt_text.empty() && !r.prompt_text.empty() && mine.prompt_text != r.prompt_text)
          throw Error(reference_name + ": runs[" + std::to_string(ri) + "].prompt_text",
                      "differs from the prompt of the experiment's runs (" + mine.config_id + ")");
      experiment.runs.push_back(r);
    }
  }
  if (!taken)
    throw Error(reference_name,
                hardware.empty() ? "has no configuration" : "has no configuration on hardware \"" + hardware + "\"");
}

// Merges files into one: the first file's metadata, every configuration and run. All files must have measured the
// same experiment (type, variable, model, extraction config). A config_id present in two files must carry the same
// configuration and runs (it is kept once); otherwise that is an error.
inline ExperimentFile merge(const std::vector<ExperimentFile>& files, const std::vector<std::string>& names) {
  if (files.empty()) throw Error("merge", "no input files");
  ExperimentFile out;
  out.experiment_metadata = files[0].experiment_metadata;
  for (std::size_t fi = 0; fi < files.size(); ++fi) {
    const ExperimentFile& f = files[fi];
    const std::string& name = names.at(fi);
    const Metadata& m = f.experiment_metadata;
    if (m.experiment_type != out.experiment_metadata.experiment_type)
      throw Error(name + ": experiment_metadata.experiment_type",
                  "is " + m.experiment_type + ", " + names[0] + " has " + out.experiment_metadata.experiment_type);
    if (m.variable_tested != out.experiment_metadata.variable_tested)
      throw Error(name + ": experiment_metadata.variable_tested",
                  "is " + m.variable_tested + ", " + names[0] + " has " + out.experiment_metadata.variable_tested);
    fuse_detail::check_compatible(out.experiment_metadata, m, name);
    for (std::size_t ci = 0; ci < f.configurations.size(); ++ci) {
      const Configuration& c = f.configurations[ci];
      const Configuration* have = out.find_configuration(c.config_id);
      if (!have) {
        out.configurations.push_back(c);
        for (const Run& r : f.runs)
          if (r.config_id == c.config_id) out.runs.push_back(r);
        continue;
      }
      // Present already: accept only an identical copy (e.g. the same fused reference in both files).
      bool same = *have == c;
      std::vector<const Run*> mine, theirs;
      for (const Run& r : out.runs)
        if (r.config_id == c.config_id) mine.push_back(&r);
      for (const Run& r : f.runs)
        if (r.config_id == c.config_id) theirs.push_back(&r);
      same = same && mine.size() == theirs.size();
      for (std::size_t i = 0; same && i < mine.size(); ++i) same = fuse_detail::same_runs(*mine[i], *theirs[i]);
      if (!same)
        throw Error(name + ": configurations[" + std::to_string(ci) + "].config_id",
                    "\"" + c.config_id + "\" is also in an earlier file with different contents");
    }
  }
  return out;
}

}  // namespace fpf::experiment
