#pragma once
// Qwen3's chat template for the conversations fpf sends: an optional system message, one user message, the
// generation prompt, and enable_thinking. The text is the one transformers' apply_chat_template renders from the
// Jinja template in tokenizer_config.json (checked against HF renderings in tests/test_chat_template.cpp):
//   [<|im_start|>system\n{system}<|im_end|>\n]
//   <|im_start|>user\n{user}<|im_end|>\n
//   [<|im_start|>assistant\n                      if add_generation_prompt
//    [<think>\n\n</think>\n\n]]                    only if enable_thinking is given and false
// The template injects no default system prompt. Tools and multi-turn histories are not rendered here.
#include <fpf/core/error.hpp>
#include <fpf/text/tokenizer.hpp>

#include <boost/json.hpp>

#include <array>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace fpf::text {

struct ChatRequest {
  std::optional<std::string> system;  // a system message first when set (an empty one still renders)
  std::string user;
  bool add_generation_prompt = true;
  std::optional<bool> enable_thinking;  // unset = the template's default, which is thinking on
};

// The rendering split around the user's content: apply_chat_template(r) == before_user + r.user + after_user.
// The prompt builder uses it to put a document's exact tokens between the two.
struct ChatParts {
  std::string before_user;
  std::string after_user;
};

inline ChatParts chat_parts(const ChatRequest& r) {
  ChatParts p;
  if (r.system) p.before_user = "<|im_start|>system\n" + *r.system + "<|im_end|>\n";
  p.before_user += "<|im_start|>user\n";
  p.after_user = "<|im_end|>\n";
  if (r.add_generation_prompt) {
    p.after_user += "<|im_start|>assistant\n";
    if (r.enable_thinking == false) p.after_user += "<think>\n\n</think>\n\n";
  }
  return p;
}

inline std::string apply_chat_template(const ChatRequest& r) {
  const ChatParts p = chat_parts(r);
  return p.before_user + r.user + p.after_user;
}

// Throws fpf::Error unless tokenizer_config.json holds a chat template that renders what chat_parts() writes: the
// Qwen3 template. It looks for the template's statements for each piece, written as in Qwen3's file, and rejects
// templates that add a default system prompt (as Qwen2.5's does).
inline void check_qwen3_chat_template(const std::filesystem::path& tokenizer_config) {
  const std::string file = tokenizer_config.string();
  boost::system::error_code ec;
  const auto root = boost::json::parse(detail::read_file(tokenizer_config), ec);
  if (ec) throw Error(file, "not valid JSON: " + ec.message());
  const auto* tmpl = root.is_object() ? root.get_object().if_contains("chat_template") : nullptr;
  if (!tmpl || !tmpl->is_string()) throw Error(file + ": chat_template", "missing (expected Qwen3's template)");
  const std::string_view t = tmpl->get_string();
  static constexpr std::array<std::string_view, 4> kStatements = {
      R"({{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }})",
      R"({{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }})",
      R"({{- '<|im_start|>assistant\n' }})",
      R"({%- if enable_thinking is defined and enable_thinking is false %})",
  };
  for (const auto s : kStatements)
    if (t.find(s) == std::string_view::npos)
      throw Error(file + ": chat_template", "not the Qwen3 chat template (lacks " + std::string(s) + ")");
  if (t.find(R"({{- '<think>\n\n</think>\n\n' }})") == std::string_view::npos ||
      t.find("You are Qwen") != std::string_view::npos)
    throw Error(file + ": chat_template", "not the Qwen3 chat template");
}

}  // namespace fpf::text
