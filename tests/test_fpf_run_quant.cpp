// fpf-run picks the quantization policy from the checkpoint's quantization_config and records it.
#include <doctest/doctest.h>

#include <boost/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace fs = std::filesystem;

namespace {
boost::json::value read_json(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return boost::json::parse(ss.str());
}
}  // namespace

TEST_CASE("fpf-run: quantized checkpoints run with their own scheme and give Hugging Face's tokens") {
  const fs::path quant = fs::path(FPF_SOURCE_DIR) / "tests" / "fixtures" / "quant";
  const fs::path tmp = fs::path(FPF_BINARY_DIR) / "test-tmp" / "fpf-run-quant";
  fs::create_directories(tmp);
  for (const auto& [name, scheme] : {std::pair{"awq_moe_sparse_step", "awq"}, {"gptq_actorder_moe_sparse_step", "gptq"},
                                     {"gptq_v2_moe_no_norm", "gptq"}, {"nf4_moe_bf16_sharded", "nf4"}}) {
    CAPTURE(name);
    const boost::json::object ref = read_json(quant / name / "reference.json").as_object();
    std::string ids;
    for (const auto& v : ref.at("prompt_ids").as_array()) ids += (ids.empty() ? "" : ",") + std::to_string(v.as_int64());
    const fs::path out = tmp / (std::string(name) + ".json");
    const std::string cmd = std::string(FPF_BINARY_DIR) + "/bin/fpf-run --model " + (quant / name).string() +
                            " --prompt-ids " + ids + " --steps " + std::to_string(ref.at("tokens").as_array().size()) +
                            " --reps 2 --out " + out.string() + " > /dev/null";
    REQUIRE(std::system(cmd.c_str()) == 0);
    const boost::json::object file = read_json(out).as_object();
    CHECK(file.at("configurations").at(0).at("fixed_params").at("quantization").as_string() == scheme);
    const auto& steps = file.at("runs").as_array().back().at("decode_steps").as_array();
    const auto& tokens = ref.at("tokens").as_array();
    REQUIRE(steps.size() == tokens.size());
    for (std::size_t s = 0; s < steps.size(); ++s) CHECK(steps[s].at("token_id").as_int64() == tokens[s].as_int64());
  }
}
