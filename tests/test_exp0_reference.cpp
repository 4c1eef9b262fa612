// fpf-exp0-reference end to end on the embedded model: a chat-template prompt of exactly N document tokens from the
// default corpus, 3 repetitions checked bit for bit, reference_baseline.json readable by the experiment reader.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include <fpf/experiment/json.hpp>

namespace fs = std::filesystem;

TEST_CASE("fpf-exp0-reference: writes a bit-checked reference_baseline.json on the embedded model") {
  const fs::path out = fs::path(FPF_BINARY_DIR) / "test-tmp" / "exp0";
  fs::remove_all(out);
  const std::string cmd = std::string(FPF_BINARY_DIR) + "/bin/fpf-exp0-reference --model " + FPF_SOURCE_DIR +
                          "/tests/fixtures/models/moe_real_vocab --prompt-tokens 400 --steps 5 --out-dir " +
                          out.string() + " > " + (out.parent_path() / "exp0.stdout").string();
  REQUIRE(std::system(cmd.c_str()) == 0);

  const auto file = fpf::experiment::read_experiment(out / "reference_baseline.json");
  CHECK(file.experiment_metadata.experiment_type == "reference");
  CHECK(file.experiment_metadata.decode_steps == 5);
  CHECK(file.experiment_metadata.extraction_config.layers == std::vector<int>{1, 2, 3});  // 1,2,4,12,last on 3 blocks
  CHECK(file.experiment_metadata.extraction_config.hidden_dim == 32);
  CHECK(file.experiment_metadata.extraction_config.key_dim == 32);
  REQUIRE(file.configurations.size() == 1);
  const auto& conf = file.configurations[0];
  CHECK(conf.fixed_params.attention_impl == "flash");
  CHECK(conf.batch_size == 1);
  REQUIRE(conf.determinism.has_value());
  CHECK(conf.determinism->bit_exact);
  REQUIRE(file.runs.size() == 3);
  CHECK_FALSE(file.runs[0].has_signals());  // only the last rep keeps the signals
  REQUIRE(file.runs[2].decode_steps.size() == 5);
  // The prompt: the chat template around exactly 400 document tokens and the summary request.
  CHECK(file.runs[2].prompt_ids.size() > 400);
  CHECK(file.runs[2].prompt_text.rfind("<|im_start|>user\n", 0) == 0);
  CHECK(file.experiment_metadata.sequence_length == static_cast<std::int64_t>(file.runs[2].prompt_ids.size()));
  for (const auto& st : file.runs[2].decode_steps) {
    CHECK(st.hidden_states.at(3).at(-1).size() == 32);
    CHECK(st.logprobs.at(-1).token_ids.size() == 10);
    CHECK(st.logprobs.at(-1).token_ids[0] == st.token_id);  // greedy = the top logprob
  }
}
