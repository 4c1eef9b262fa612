#pragma once
// What fpf's programs share on the command line: the options every run takes (model, taps, backend, precision,
// reps, labels), the corpus-prompt options of the experiment mains, and their resolution into engine inputs.
// (Programs only: the library itself does not depend on CLI11.)
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <fpf/core/error.hpp>
#include <fpf/engine/options.hpp>
#include <fpf/io/config.hpp>
#include <fpf/taps/parse.hpp>
#include <fpf/taps/signals.hpp>
#include <fpf/text/prompt.hpp>

namespace fpf::examples {

struct RunOptions {
  std::string model_dir, backend = "cpu", precision, layers, positions = "-3,-2,-1", hardware, model_name;
  int steps = 30, reps = 3, topk = 10;
};

inline void add_run_options(CLI::App& app, RunOptions& o) {
  app.add_option("--model", o.model_dir, "checkpoint directory (config.json + safetensors)")->required();
  app.add_option("--steps", o.steps, "greedy decode steps");
  app.add_option("--reps", o.reps, "repetitions, compared bit for bit");
  app.add_option("--backend", o.backend, "cpu | cuda");
  app.add_option("--precision", o.precision, "fp32 | bf16 | fp16 (default: cpu fp32, cuda the checkpoint dtype)");
  app.add_option("--layers", o.layers, "1-based blocks to tap; 'last' = the last block (default 1,2,4,12,last)");
  app.add_option("--positions", o.positions, "positions from the end of the sequence fed so far");
  app.add_option("--topk", o.topk, "top-k logprobs per position");
  app.add_option("--hardware", o.hardware, "hardware label for the configurations (default: the CPU or GPU name)");
  app.add_option("--model-name", o.model_name, "model name recorded in the file (default: the directory name)");
}

// The experiment mains' --model: the seed runs exp0 and every other experiment on the AWQ checkpoint (its reference
// configuration); any checkpoint runs, its scheme read from config.json and recorded in fixed_params.quantization.
inline void describe_reference_model(CLI::App& app) {
  app.get_option("--model")->description(
      "the AWQ checkpoint: the reference configuration every experiment runs on (another scheme runs too and is "
      "recorded as such in fixed_params.quantization)");
}

struct PromptOptions {
  std::size_t tokens = 6000;
  std::string document, corpus_dir, tokenizer_dir;
};

inline void add_prompt_options(CLI::App& app, PromptOptions& o) {
  app.add_option("--prompt-tokens", o.tokens, "document tokens in the prompt (the chat template adds a few)");
  app.add_option("--document", o.document, "corpus document for the prompt (default: the first one)");
  app.add_option("--corpus-dir", o.corpus_dir, "documents (.txt, .pdf) to build prompts from (default: fpf's corpus)");
  app.add_option("--tokenizer", o.tokenizer_dir, "folder with tokenizer.json (default: the model's, else fpf's copy)");
}

// Parses the command line: nullopt to go on, else the exit code (0 after --help; 2 after one line on a usage error).
inline std::optional<int> parse(CLI::App& app, const char* program, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return kExitBadInput;
  }
  return std::nullopt;
}

// The run options checked and resolved against the model's config.json.
struct Resolved {
  io::ModelConfig cfg;
  taps::TapSpec spec;
  Precision precision;
  std::string model_name;
};

inline Resolved resolve(const RunOptions& o) {
  Resolved r{io::load_config(o.model_dir), {}, Precision::fp32, o.model_name};
  r.spec.layers = o.layers.empty() ? taps::default_layers(r.cfg.num_hidden_layers)
                                   : taps::parse_layers(o.layers, r.cfg.num_hidden_layers);
  r.spec.positions = taps::parse_int_list(o.positions, "--positions");
  r.spec.topk = o.topk;
  // The CPU computes in fp32 only; the GPU in the checkpoint's dtype unless told otherwise.
  std::string precision = o.precision;
  if (precision.empty())
    precision = o.backend != "cuda"              ? "fp32"
                : r.cfg.dtype == "bfloat16" ? "bf16"
                : r.cfg.dtype == "float16"  ? "fp16"
                                            : "fp32";
  r.precision = parse_precision(precision);
  if (o.reps < 1) throw Error("--reps", "must be at least 1");
  if (o.steps < 1) throw Error("--steps", "must be at least 1");
  namespace fs = std::filesystem;
  if (r.model_name.empty()) r.model_name = fs::path(o.model_dir).lexically_normal().filename().string();
  if (r.model_name.empty()) r.model_name = fs::absolute(o.model_dir).parent_path().filename().string();
  return r;
}

// The tokenizer folder: the explicit one, else the model's own (tokenizer.json beside config.json), else fpf's copy.
inline std::filesystem::path tokenizer_dir(const std::string& model_dir, const std::string& explicit_dir) {
  if (!explicit_dir.empty()) return explicit_dir;
  if (std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json")) return model_dir;
  return text::default_tokenizer_dir();
}

// The corpus the experiment mains build prompts from: sequence 0 is the chosen document, batch neighbours the
// documents after it (cycling), each cut to exactly `tokens` tokens.
struct Corpus {
  text::Tokenizer tok;
  std::vector<text::Document> docs;
  std::size_t first = 0;  // index of --document
  text::PromptSpec spec;

  text::Prompt prompt(std::size_t offset = 0) const {
    return text::build_prompt(tok, docs[(first + offset) % docs.size()], spec);
  }
};

inline Corpus load_corpus(const PromptOptions& o, const std::string& model_dir) {
  Corpus c{text::Tokenizer::from_dir(tokenizer_dir(model_dir, o.tokenizer_dir)),
           text::load_corpus(o.corpus_dir.empty() ? text::default_corpus_dir() : std::filesystem::path(o.corpus_dir)),
           0, {}};
  c.spec.document_tokens = o.tokens;
  if (!o.document.empty()) {
    std::size_t i = 0;
    while (i < c.docs.size() && c.docs[i].name != o.document) ++i;
    if (i == c.docs.size()) throw Error("--document", "'" + o.document + "' is not in the corpus");
    c.first = i;
  }
  return c;
}

}  // namespace fpf::examples
