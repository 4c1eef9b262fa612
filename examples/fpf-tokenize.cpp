// fpf-tokenize: Qwen3 tokenization from the command line (DESIGN.md "Programs").
//   fpf-tokenize --tokenizer DIR (--text-file F | --text S) [--chat [--system S]] [--no-thinking]
//       prints {"ids":[...]}; --chat wraps the text as one user message in the chat template with the generation
//       prompt (--no-thinking: enable_thinking=false). F may be a PDF when built with poppler-cpp.
//   fpf-tokenize --tokenizer DIR --text-file F --prompt-tokens N [--system S] [--no-thinking]
//       the experiment prompt: the first N tokens of F plus a summary request, through the chat template; prints
//       {"ids":[...],"document_tokens":N,"prompt_tokens":M,"text_reencodes":true|false}
//   fpf-tokenize --tokenizer DIR --decode [--ids 1,2,3]
//       prints the text of the ids given, or of those read from stdin ({"ids":[...]}, [...] or numbers).
// Exit codes: 0 ok, 2 bad input (invalid UTF-8, malformed tokenizer.json, unknown id, usage).
#include <fpf/core/error.hpp>
#include <fpf/text/chat_template.hpp>
#include <fpf/text/prompt.hpp>
#include <fpf/text/tokenizer.hpp>

#include <CLI/CLI.hpp>
#include <boost/json.hpp>

#include <cstdio>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using fpf::text::TokenId;

TokenId parse_id(const boost::json::value& v, const std::string& where) {
  if (v.is_int64() && v.get_int64() >= 0 && v.get_int64() <= 0xFFFFFFFFll) return static_cast<TokenId>(v.get_int64());
  if (v.is_uint64() && v.get_uint64() <= 0xFFFFFFFFull) return static_cast<TokenId>(v.get_uint64());
  throw fpf::Error(where, "expected token ids (non-negative integers), got " + boost::json::serialize(v));
}

// Ids from {"ids":[...]}, [...], or numbers separated by commas and/or whitespace.
std::vector<TokenId> parse_ids(const std::string& input, const std::string& where) {
  std::vector<TokenId> ids;
  const auto first = input.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (input[first] == '{' || input[first] == '[')) {
    boost::system::error_code ec;
    const auto v = boost::json::parse(input, ec);
    if (ec) throw fpf::Error(where, "not valid JSON: " + ec.message());
    const boost::json::value* list = &v;
    if (v.is_object()) {
      list = v.get_object().if_contains("ids");
      if (!list) throw fpf::Error(where, "expected {\"ids\": [...]}");
    }
    if (!list->is_array()) throw fpf::Error(where, "expected a list of token ids");
    for (const auto& x : list->get_array()) ids.push_back(parse_id(x, where));
    return ids;
  }
  std::string token;
  std::istringstream in(input);
  while (std::getline(in, token, ',')) {
    std::istringstream words(token);
    for (std::string w; words >> w;) {
      std::size_t used = 0;
      unsigned long long n = 0;
      try {
        n = std::stoull(w, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != w.size() || w[0] == '-' || n > 0xFFFFFFFFull)
        throw fpf::Error(where, "'" + w + "' is not a token id");
      ids.push_back(static_cast<TokenId>(n));
    }
  }
  return ids;
}

void print_ids(const std::vector<TokenId>& ids, const std::string& extra = "") {
  std::string out = "{\"ids\":[";
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(ids[i]);
  }
  out += ']' + extra + "}\n";
  std::fwrite(out.data(), 1, out.size(), stdout);
}

}  // namespace

int main(int argc, char** argv) {
  return fpf::run_main("fpf-tokenize", [&]() -> int {
    CLI::App app{"Qwen3 tokenizer: text to token ids (optionally through the chat template) and back"};
    std::string dir, text_file, text, system, ids_arg;
    bool chat = false, no_thinking = false, decode = false;
    std::size_t prompt_tokens = 0;
    app.add_option("--tokenizer", dir, "folder with tokenizer.json (and tokenizer_config.json for --chat)")->required();
    auto* file_opt = app.add_option("--text-file", text_file, "UTF-8 text file (or PDF) to encode");
    auto* text_opt = app.add_option("--text", text, "text to encode");
    file_opt->excludes(text_opt);
    auto* chat_opt = app.add_flag("--chat", chat, "wrap as one user message in the chat template, with the generation prompt");
    auto* prompt_opt = app.add_option("--prompt-tokens", prompt_tokens,
                                      "build the experiment prompt from the first N tokens of --text-file")
                           ->needs(file_opt)
                           ->excludes(chat_opt);
    app.add_option("--system", system, "system message (with --chat or --prompt-tokens)");
    app.add_flag("--no-thinking", no_thinking, "enable_thinking=false in the chat template");
    auto* decode_opt = app.add_flag("--decode", decode, "print the text of token ids (--ids or stdin)");
    app.add_option("--ids", ids_arg, "token ids to decode, e.g. 1,2,3")->needs(decode_opt);
    decode_opt->excludes(file_opt)->excludes(text_opt)->excludes(chat_opt)->excludes(prompt_opt);
    try {
      app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
      return app.exit(e);
    } catch (const CLI::ParseError& e) {
      std::fprintf(stderr, "fpf-tokenize: usage: %s (see --help)\n", e.what());
      return fpf::kExitBadInput;
    }
    const bool have_system = app.count("--system") > 0;
    if (!decode && !app.count("--text-file") && !app.count("--text"))
      throw fpf::Error("usage", "give --text-file F or --text S (or --decode)");
    if ((no_thinking || have_system) && !chat && !prompt_tokens)
      throw fpf::Error("usage", "--no-thinking and --system go with --chat or --prompt-tokens");

    const auto tok = fpf::text::Tokenizer::from_dir(dir);
    if (decode) {
      const std::string input = app.count("--ids") ? ids_arg
                                                   : std::string(std::istreambuf_iterator<char>(std::cin), {});
      const std::string text_out = tok.decode(parse_ids(input, app.count("--ids") ? "--ids" : "stdin"));
      std::fwrite(text_out.data(), 1, text_out.size(), stdout);
      return fpf::kExitOk;
    }

    const std::optional<std::string> system_msg = have_system ? std::optional(system) : std::nullopt;
    const std::optional<bool> thinking = no_thinking ? std::optional(false) : std::nullopt;
    fpf::text::Document doc{"--text", text};
    if (app.count("--text-file")) {
      doc = fpf::text::load_document(text_file);
    } else {
      fpf::text::check_utf8(text, "--text");
    }
    if (prompt_tokens) {
      if (!std::filesystem::exists(std::filesystem::path(dir) / "tokenizer_config.json"))
        throw fpf::Error(dir, "no tokenizer_config.json (needed for the chat template)");
      fpf::text::check_qwen3_chat_template(std::filesystem::path(dir) / "tokenizer_config.json");
      fpf::text::PromptSpec spec;
      spec.document_tokens = prompt_tokens;
      spec.system = system_msg;
      spec.enable_thinking = thinking;
      const auto p = fpf::text::build_prompt(tok, doc, spec);
      print_ids(p.ids, ",\"document_tokens\":" + std::to_string(p.document_end - p.document_begin) +
                           ",\"prompt_tokens\":" + std::to_string(p.length()) +
                           ",\"text_reencodes\":" + (p.text_reencodes ? "true" : "false"));
      return fpf::kExitOk;
    }
    if (chat) {
      fpf::text::check_qwen3_chat_template(std::filesystem::path(dir) / "tokenizer_config.json");
      print_ids(tok.encode(fpf::text::apply_chat_template({system_msg, doc.text, true, thinking})));
    } else {
      print_ids(tok.encode(doc.text));
    }
    return fpf::kExitOk;
  });
}
