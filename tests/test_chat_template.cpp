// Qwen3 chat template against transformers' apply_chat_template (goldens from
// tests/fixtures/tokenizer/make_goldens.py): text and ids, thinking on/off/unset, with and without a system message.
#include <fpf/text/chat_template.hpp>
#include <fpf/text/tokenizer.hpp>

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using fpf::text::TokenId;
const fs::path kSource = FPF_SOURCE_DIR;

const fpf::text::Tokenizer& qwen3() {
  static const auto tok = fpf::text::Tokenizer::from_dir(kSource / "data/qwen3-tokenizer");
  return tok;
}

std::vector<TokenId> to_ids(const boost::json::value& v) {
  std::vector<TokenId> ids;
  for (const auto& x : v.as_array()) ids.push_back(x.to_number<TokenId>());
  return ids;
}

}  // namespace

TEST_CASE("chat template: text and ids identical to transformers' apply_chat_template") {
  const auto g = boost::json::parse(fpf::text::detail::read_file(kSource / "tests/fixtures/tokenizer/goldens.json"));
  const auto& cases = g.at("chat").as_array();
  REQUIRE(cases.size() >= 12);
  int thinking_off = 0, thinking_on = 0, with_system = 0;
  for (const auto& c : cases) {
    fpf::text::ChatRequest r;
    if (!c.at("system").is_null()) r.system = std::string(c.at("system").as_string());
    r.user = std::string(c.at("user").as_string());
    r.add_generation_prompt = c.at("add_generation_prompt").as_bool();
    if (!c.at("enable_thinking").is_null()) r.enable_thinking = c.at("enable_thinking").as_bool();
    const std::string want(c.at("text").as_string());
    const std::string got = fpf::text::apply_chat_template(r);
    INFO(want);
    CHECK(got == want);
    const auto parts = fpf::text::chat_parts(r);
    CHECK(parts.before_user + r.user + parts.after_user == got);
    // Ids: those apply_chat_template(tokenize=True) returned.
    REQUIRE(c.at("ids").is_array());
    CHECK(qwen3().encode(got) == to_ids(c.at("ids")));
    thinking_off += r.enable_thinking == false;
    thinking_on += r.enable_thinking == true;
    with_system += r.system.has_value();
  }
  CHECK(thinking_off > 0);
  CHECK(thinking_on > 0);
  CHECK(with_system > 0);
}

TEST_CASE("chat template: the Qwen3 example of formats.md") {
  const auto text = fpf::text::apply_chat_template({std::nullopt, "Hello", true, false});
  CHECK(text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  CHECK(qwen3().encode(text) ==
        std::vector<TokenId>{151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271});
}

TEST_CASE("chat template: tokenizer_config.json must hold the Qwen3 template") {
  const auto config = kSource / "data/qwen3-tokenizer/tokenizer_config.json";
  CHECK_NOTHROW(fpf::text::check_qwen3_chat_template(config));

  const fs::path dir = fs::path(FPF_BINARY_DIR) / "test_chat_template";
  fs::create_directories(dir);
  const auto write_config = [&](const std::string& name, const boost::json::value& v) {
    std::ofstream(dir / name) << boost::json::serialize(v);
    return dir / name;
  };
  auto cfg = boost::json::parse(fpf::text::detail::read_file(config));
  const std::string original(cfg.at("chat_template").as_string());

  // Qwen2.5's template puts a default system prompt in front when none is given: rejected.
  auto qwen25 = cfg;
  qwen25.as_object()["chat_template"] = "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, "
                                        "created by Alibaba Cloud.<|im_end|>\\n' }}{%- endif %}" + original;
  CHECK_THROWS_WITH(fpf::text::check_qwen3_chat_template(write_config("qwen25.json", qwen25)),
                    doctest::Contains("not the Qwen3 chat template"));

  auto no_thinking_switch = cfg;
  std::string edited = original;
  edited.erase(edited.find("{%- if enable_thinking"), std::string("{%- if enable_thinking").size());
  no_thinking_switch.as_object()["chat_template"] = edited;
  CHECK_THROWS_AS(fpf::text::check_qwen3_chat_template(write_config("edited.json", no_thinking_switch)), fpf::Error);

  auto missing = cfg;
  missing.as_object().erase("chat_template");
  CHECK_THROWS_WITH(fpf::text::check_qwen3_chat_template(write_config("missing.json", missing)),
                    doctest::Contains("chat_template: missing"));
  CHECK_THROWS_WITH(fpf::text::check_qwen3_chat_template(dir / "absent.json"), doctest::Contains("cannot open file"));
}
