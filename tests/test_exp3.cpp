// fpf-exp3-quantization end to end on the embedded model quantized by fpf-synth --from (AWQ, GPTQ, NF4): with and
// without exp0's reference_baseline.json in the out dir, quantization_experiment.json reads back with the three
// methods, each bit-exact over its reps; a checkpoint of the wrong scheme is exit 2.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include <fpf/experiment/json.hpp>

#include "program_util.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kWork = fs::path(FPF_BINARY_DIR) / "test-tmp" / "exp3";

using fpf::testing::slurp;

int run(const std::string& program, const std::string& args, const std::string& log) {
  return fpf::testing::run_program(program, args, kWork / (log + ".stdout"), kWork / (log + ".stderr"));
}

// The embedded model in each scheme, made once per test case (CTest runs the test cases in parallel processes, so
// each has its own directory).
fs::path checkpoints(const std::string& tag) {
  const fs::path d = kWork / ("models-" + tag);
  if (fs::exists(d / "moe_real_vocab-nf4" / "config.json")) return d;  // made by an earlier subcase
  fs::remove_all(d);
  const std::string src = std::string(FPF_SOURCE_DIR) + "/tests/fixtures/models/moe_real_vocab";
  for (const std::string scheme : {"awq", "gptq", "nf4"})
    REQUIRE(run("fpf-synth", "--from " + src + " --quant " + scheme + " --out " + (d / ("moe_real_vocab-" + scheme)).string(),
                "synth-" + tag + "-" + scheme) == 0);
  return d;
}

const std::string kRun = " --prompt-tokens 300 --steps 4";

void check_file(const fs::path& file, const std::string& reference_id) {
  const auto f = fpf::experiment::read_experiment(file);
  CHECK(f.experiment_metadata.experiment_type == "quantization");
  CHECK(f.experiment_metadata.variable_tested == "quant_method");
  CHECK(f.experiment_metadata.decode_steps == 4);
  REQUIRE(f.configurations.size() == 3);
  std::set<std::string> values, quantization;
  for (const auto& c : f.configurations) {
    CAPTURE(c.config_id);
    REQUIRE(std::holds_alternative<std::string>(c.variable_value));
    values.insert(std::get<std::string>(c.variable_value));
    quantization.insert(c.fixed_params.quantization);
    CHECK(c.fixed_params.attention_impl == "flash");
    CHECK(c.batch_size == 1);
    REQUIRE(c.determinism.has_value());
    CHECK(c.determinism->bit_exact);
    CHECK(c.determinism->reps_compared == 3);
    if (std::get<std::string>(c.variable_value) == "awq") CHECK(c.config_id == reference_id);
  }
  CHECK(values == std::set<std::string>{"awq", "bnb", "gptq"});
  CHECK(quantization == std::set<std::string>{"awq", "gptq", "nf4"});
  // Three reps per configuration, the last one with the signals; one prompt for all.
  CHECK(f.runs.size() == 9);
  std::set<std::string> prompts;
  std::set<std::int32_t> first_tokens;
  for (const auto& r : f.runs) {
    prompts.insert(r.prompt_text);
    if (r.has_signals()) {
      REQUIRE(r.decode_steps.size() == 4);
      CHECK(r.decode_steps[0].hidden_states.at(1).at(-1).size() == 32);
    }
  }
  CHECK(prompts.size() == 1);
  // The methods change the weights, so the signals differ between configurations (fingerprints over all values).
  std::set<std::string> prints;
  for (const auto& c : f.configurations) prints.insert(c.determinism->signals_fnv1a64);
  CHECK(prints.size() == 3);
}

}  // namespace

TEST_CASE("fpf-exp3-quantization: GPTQ and NF4 run here, the AWQ reference fused from exp0 or run here") {
  static bool fresh = (fs::remove_all(kWork / "models-run"), true);  // once per process: never a stale checkpoint
  (void)fresh;
  const fs::path models = checkpoints("run");
  const std::string ckpts = " --gptq " + (models / "moe_real_vocab-gptq").string() + " --nf4 " + (models / "moe_real_vocab-nf4").string();

  SUBCASE("fused from reference_baseline.json") {
    const fs::path out = kWork / "fused";
    fs::remove_all(out);
    REQUIRE(run("fpf-exp0-reference", "--model " + (models / "moe_real_vocab-awq").string() + kRun + " --out-dir " + out.string(),
                "exp0") == 0);
    REQUIRE(run("fpf-exp3-quantization",
                "--model " + (models / "moe_real_vocab-awq").string() + ckpts + kRun + " --out-dir " + out.string(), "exp3-fused") == 0);
    CHECK(slurp(kWork / "exp3-fused.stdout").find("awq: reference configuration fused from") != std::string::npos);
    check_file(out / "quantization_experiment.json", "cpu_reference");
  }
  SUBCASE("no reference: the AWQ configuration runs here") {
    const fs::path out = kWork / "alone";
    fs::remove_all(out);
    REQUIRE(run("fpf-exp3-quantization",
                "--model " + (models / "moe_real_vocab-awq").string() + ckpts + kRun + " --out-dir " + out.string(), "exp3-alone") == 0);
    check_file(out / "quantization_experiment.json", "cpu_awq");
  }
  SUBCASE("a reference made on the dense checkpoint is not fused") {
    const fs::path out = kWork / "dense-ref";
    fs::remove_all(out);
    const std::string dense = std::string(FPF_SOURCE_DIR) + "/tests/fixtures/models/moe_real_vocab";
    REQUIRE(run("fpf-exp0-reference", "--model " + dense + kRun + " --out-dir " + out.string(), "exp0-dense") == 0);
    // Same model name, so only the quantization tells the two references apart.
    REQUIRE(run("fpf-exp3-quantization",
                "--model " + (models / "moe_real_vocab-awq").string() + ckpts + kRun + " --model-name moe_real_vocab --out-dir " +
                    out.string(), "exp3-dense") == 0);
    CHECK(slurp(kWork / "exp3-dense.stderr").find("fixed_params.quantization: is 'dense', not awq") != std::string::npos);
    check_file(out / "quantization_experiment.json", "cpu_awq");
  }
}

TEST_CASE("fpf-exp3-quantization: checkpoints of the wrong scheme or a missing option exit 2") {
  fs::remove_all(kWork / "models-bad");
  const fs::path models = checkpoints("bad");
  const fs::path out = kWork / "bad";
  const std::string awq = (models / "moe_real_vocab-awq").string(), gptq = (models / "moe_real_vocab-gptq").string(), nf4 = (models / "moe_real_vocab-nf4").string();
  CHECK(run("fpf-exp3-quantization", "--model " + awq + " --gptq " + nf4 + " --nf4 " + nf4 + kRun + " --out-dir " +
                                         out.string(), "bad1") == 2);
  CHECK(slurp(kWork / "bad1.stderr").find("--gptq must name the gptq checkpoint; this one's scheme is nf4") != std::string::npos);
  CHECK(run("fpf-exp3-quantization", "--model " + gptq + " --gptq " + gptq + " --nf4 " + nf4 + kRun + " --out-dir " +
                                         out.string(), "bad2") == 2);
  CHECK(slurp(kWork / "bad2.stderr").find("--model must name the awq checkpoint; this one's scheme is gptq") != std::string::npos);
  CHECK(run("fpf-exp3-quantization", "--model " + awq + " --gptq " + gptq + kRun, "bad3") == 2);  // --nf4 missing
  CHECK_FALSE(fs::exists(out / "quantization_experiment.json"));
}
