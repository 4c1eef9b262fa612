// Fusing the reference baseline into an experiment, and merging files from two machines (C++ API).
#include <doctest/doctest.h>

#include <string>

#include <fpf/experiment/fuse.hpp>

#include "fixtures/experiment/synthetic.hpp"

using namespace fpf;
using namespace fpf::experiment;

namespace {

ExperimentFile reference(const std::string& hw) {
  ExperimentFile f = testing::synthetic_file();
  f.experiment_metadata.experiment_type = "reference";
  f.experiment_metadata.variable_tested = "none";
  testing::add_config(f, hw + "_reference", hw, std::monostate{}, testing::two_hardware_signal(0, 1));
  return f;
}

ExperimentFile batch_size(const std::string& hw) {
  ExperimentFile f = testing::synthetic_file();
  for (std::int64_t v : {2, 4})
    testing::add_config(f, hw + "_bs" + std::to_string(v), hw, v, testing::two_hardware_signal(0, v));
  return f;
}

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("fuse: the reference configuration joins the experiment with the baseline value") {
  ExperimentFile exp = batch_size("H100");
  fuse_reference(exp, reference("H100"), std::int64_t(1));
  REQUIRE(exp.configurations.size() == 3);
  const Configuration& ref = exp.configurations[2];
  CHECK(ref.config_id == "H100_reference");
  CHECK(std::get<std::int64_t>(ref.variable_value) == 1);
  CHECK(exp.runs.size() == 9);
  CHECK(exp.runs[8].config_id == "H100_reference");
  CHECK(exp.runs[8].decode_steps.size() == 2);
  CHECK(exp.experiment_metadata.experiment_type == "batch_size");  // the experiment's metadata stays
}

TEST_CASE("fuse: only the named hardware's reference; mismatches are errors naming the field") {
  ExperimentFile both = reference("H100");
  ExperimentFile h200 = reference("H200");
  both.configurations.push_back(h200.configurations[0]);
  for (const auto& r : h200.runs) both.runs.push_back(r);

  ExperimentFile exp = batch_size("H200");
  fuse_reference(exp, both, std::int64_t(1), "reference_baseline.json", "H200");
  CHECK(exp.configurations.size() == 3);
  CHECK(exp.configurations[2].hardware == "H200");

  ExperimentFile again = exp;
  CHECK(error_of([&] { fuse_reference(again, both, std::int64_t(1), "ref.json", "H200"); }) ==
        "ref.json: configurations[1].config_id: \"H200_reference\" is already in the experiment");
  CHECK(error_of([&] { fuse_reference(again, both, std::int64_t(1), "ref.json", "A100"); }) ==
        "ref.json: has no configuration on hardware \"A100\"");

  ExperimentFile other = reference("H100");
  other.experiment_metadata.extraction_config.layers = {1, 2};
  ExperimentFile e2 = batch_size("H100");
  CHECK(error_of([&] { fuse_reference(e2, other, std::int64_t(1), "ref.json"); }) ==
        "ref.json: experiment_metadata.extraction_config.layers: is [1,2], the experiment has [1,3]");

  ExperimentFile prompt = reference("H100");
  for (auto& r : prompt.runs) r.prompt_text = "another prompt";
  CHECK(error_of([&] { fuse_reference(e2, prompt, std::int64_t(1), "ref.json"); }) ==
        "ref.json: runs[0].prompt_text: differs from the prompt of the experiment's runs (H100_bs2)");
}

TEST_CASE("merge: two machines' files become one; conflicting ids are errors") {
  ExperimentFile a = batch_size("H100"), b = batch_size("H200");
  fuse_reference(a, reference("H100"), std::int64_t(1));
  fuse_reference(b, reference("H200"), std::int64_t(1));
  ExperimentFile m = merge({a, b}, {"h100.json", "h200.json"});
  CHECK(m.configurations.size() == 6);
  CHECK(m.runs.size() == 18);
  CHECK(m.configurations[3].config_id == "H200_bs2");

  ExperimentFile c = batch_size("H200");
  c.runs[2].decode_steps[0].key_vectors[3][-1][0] = 42.0f;  // same id, different data
  CHECK(error_of([&] {
          merge({b, c}, {"h200.json", "c.json"});
        }) == "c.json: configurations[0].config_id: \"H200_bs2\" is also in an earlier file with different contents");

  ExperimentFile d = batch_size("H200");
  d.experiment_metadata.variable_tested = "compile";
  CHECK(error_of([&] {
          merge({a, d}, {"a.json", "d.json"});
        }) == "d.json: experiment_metadata.variable_tested: is compile, a.json has batch_size");
}
