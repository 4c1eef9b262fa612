// fpf-exp0-reference: experiment 0 of the seed plan, the reference baseline every other experiment reuses.
// Builds the prompt (a corpus document cut to exactly N tokens + a summary request, through Qwen3's chat
// template), runs the reference configuration (batch 1, flash attention, single device) for --reps repetitions,
// checks them bit for bit and writes OUT_DIR/reference_baseline.json.
//
//   fpf-exp0-reference --model DIR [--out-dir results] [--prompt-tokens 6000] [--steps 30] [--reps 3]
//                      [--backend cpu] [--precision fp32] [--document NAME] [--corpus-dir DIR] [--tokenizer DIR]
//                      [--layers 1,2,4,12,last] [--positions -3,-2,-1] [--topk 10] [--hardware LABEL]
//
// Exit codes: 0 ok, 1 the repetitions differ (where is printed; every rep kept in *.nondeterministic.json),
// 2 bad input or usage.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <string>

#include <fpf/engine/describe.hpp>
#include <fpf/engine/dispatch.hpp>
#include <fpf/engine/engine.hpp>
#include <fpf/engine/prompting.hpp>
#include <fpf/experiment/json.hpp>
#include <fpf/experiment/runner.hpp>
#include <fpf/taps/parse.hpp>
#include <fpf/text/prompt.hpp>

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  CLI::App app{"fpf-exp0-reference: the reference baseline (experiment 0)"};
  std::string model_dir, out_dir = "results", backend = "cpu", precision_text = "fp32", document, corpus_dir,
                         tokenizer_dir, layers_text, positions_text = "-3,-2,-1", hardware, model_name;
  std::size_t prompt_tokens = 6000;
  int steps = 30, reps = 3, topk = 10;
  app.add_option("--model", model_dir, "checkpoint directory (config.json + safetensors)")->required();
  app.add_option("--out-dir", out_dir, "where reference_baseline.json is written");
  app.add_option("--prompt-tokens", prompt_tokens, "document tokens in the prompt (the chat template adds a few)");
  app.add_option("--steps", steps, "greedy decode steps");
  app.add_option("--reps", reps, "repetitions, compared bit for bit");
  app.add_option("--backend", backend, "cpu | cuda");
  app.add_option("--precision", precision_text, "fp32 | bf16 | fp16");
  app.add_option("--document", document, "corpus document for the prompt (default: the first one)");
  app.add_option("--corpus-dir", corpus_dir, "documents (.txt, .pdf) to build prompts from (default: fpf's corpus)");
  app.add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json (default: the model's, else fpf's copy)");
  app.add_option("--layers", layers_text, "1-based blocks to tap; 'last' = the last block (default 1,2,4,12,last)");
  app.add_option("--positions", positions_text, "positions from the end of the sequence fed so far");
  app.add_option("--topk", topk, "top-k logprobs per position");
  app.add_option("--hardware", hardware, "hardware label for the configuration (default: the CPU or GPU name)");
  app.add_option("--model-name", model_name, "model name recorded in the file (default: the directory name)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "fpf-exp0-reference: error: %s\n", e.what());
    return fpf::kExitBadInput;
  }

  return fpf::run_main("fpf-exp0-reference", [&] {
    const fpf::io::ModelConfig cfg = fpf::io::load_config(model_dir);
    fpf::taps::TapSpec spec;
    spec.layers = layers_text.empty() ? fpf::taps::default_layers(cfg.num_hidden_layers)
                                      : fpf::taps::parse_layers(layers_text, cfg.num_hidden_layers);
    spec.positions = fpf::taps::parse_int_list(positions_text, "--positions");
    spec.topk = topk;
    const fpf::Precision precision = fpf::parse_precision(precision_text);

    if (tokenizer_dir.empty())
      tokenizer_dir = fs::exists(fs::path(model_dir) / "tokenizer.json") ? model_dir
                                                                         : fpf::text::default_tokenizer_dir().string();
    const auto tok = fpf::text::Tokenizer::from_dir(tokenizer_dir);
    const auto docs = fpf::text::load_corpus(corpus_dir.empty() ? fpf::text::default_corpus_dir() : fs::path(corpus_dir));
    const fpf::text::Document* doc = &docs.at(0);
    if (!document.empty()) {
      doc = nullptr;
      for (const auto& d : docs)
        if (d.name == document) doc = &d;
      if (!doc) throw fpf::Error("--document", "'" + document + "' is not in the corpus");
    }
    fpf::text::PromptSpec pspec;
    pspec.document_tokens = prompt_tokens;
    const fpf::text::Prompt prompt = fpf::text::build_prompt(tok, *doc, pspec);
    const std::vector<std::vector<std::int32_t>> prompts{fpf::engine_ids(prompt.ids)};
    if (model_name.empty()) model_name = fs::path(model_dir).lexically_normal().filename().string();
    if (model_name.empty()) model_name = fs::absolute(model_dir).parent_path().filename().string();

    // The seed's reference: batch 1, flash attention, no graph capture, no concurrent load, one device.
    return fpf::with_setup_for(model_dir, backend, "flash", [&]<class S>() {
      fpf::Engine<S> engine(model_dir, fpf::EngineOptions{precision});
      auto meta = fpf::describe_experiment(cfg, model_name, "reference", "none", spec, steps,
                                           static_cast<std::int64_t>(prompt.length()));
      auto conf = fpf::describe_configuration("", backend, precision, S::attention::name, S::quant::name, 1);
      if (!hardware.empty()) conf.hardware = hardware;
      conf.config_id = (backend == "cpu" ? std::string("cpu") : conf.hardware) + "_reference";
      fs::create_directories(out_dir);
      const fs::path out = fs::path(out_dir) / "reference_baseline.json";
      std::fprintf(stderr, "prompt: %zu tokens (%zu from %s); %d steps x %d reps on %s\n", prompt.length(),
                   prompt_tokens, doc->name.c_str(), steps, reps, conf.hardware.c_str());
      const auto file = fpf::experiment::run_experiment(
          meta, conf,
          [&](int) {
            auto seqs = engine.generate(prompts, steps, spec);
            fpf::attach_text(tok, seqs);
            return seqs;
          },
          out, fpf::experiment::RunOptions{reps});
      const auto& c = file.configurations.at(0);
      std::printf("%s: %d reps bit-identical (signals fnv1a64 %s), %.3f s per rep\n", c.config_id.c_str(), reps,
                  c.determinism->signals_fnv1a64.c_str(), c.timing->runtime_seconds_mean);
      std::string generated;
      for (const auto& st : file.runs.back().decode_steps) generated += st.token_text;
      std::printf("generated: %s\nwrote %s\n", generated.c_str(), out.c_str());
      return fpf::kExitOk;
    });
  });
}
