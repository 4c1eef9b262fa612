// fpf-exp4-attention: experiment 4 of the seed plan, flash vs eager attention. The prompt is exp0's (a corpus
// document cut to exactly N tokens + the summary request, through Qwen3's chat template); the eager configuration
// runs --reps bit-checked repetitions; the flash one is the reference baseline, fused from
// OUT_DIR/reference_baseline.json (fpf-exp0-reference) when that file exists for this hardware, else run here too.
// Writes OUT_DIR/attention_experiment.json.
//
//   fpf-exp4-attention --model DIR [--out-dir results] [--prompt-tokens 6000] [--steps 30] [--reps 3]
//                      [--backend cpu|cuda] [--precision fp32|bf16|fp16] [--document NAME] [--corpus-dir DIR]
//                      [--tokenizer DIR] [--layers 1,2,4,12,last] [--positions -3,-2,-1] [--topk 10] [--hardware L]
//
// Exit codes: 0 ok, 1 some configuration's repetitions differ, 2 bad input or usage.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <string>

#include <fpf/engine/describe.hpp>
#include <fpf/engine/dispatch.hpp>
#include <fpf/engine/engine.hpp>
#include <fpf/engine/prompting.hpp>
#include <fpf/experiment/fuse.hpp>
#include <fpf/experiment/json.hpp>
#include <fpf/experiment/runner.hpp>
#include <fpf/taps/parse.hpp>
#include <fpf/text/prompt.hpp>

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  CLI::App app{"fpf-exp4-attention: flash vs eager attention (experiment 4)"};
  std::string model_dir, out_dir = "results", backend = "cpu", precision_text, document, corpus_dir, tokenizer_dir,
                         layers_text, positions_text = "-3,-2,-1", hardware, model_name;
  std::size_t prompt_tokens = 6000;
  int steps = 30, reps = 3, topk = 10;
  app.add_option("--model", model_dir, "checkpoint directory (config.json + safetensors)")->required();
  app.add_option("--out-dir", out_dir, "where attention_experiment.json is written (and reference_baseline.json read)");
  app.add_option("--prompt-tokens", prompt_tokens, "document tokens in the prompt (the chat template adds a few)");
  app.add_option("--steps", steps, "greedy decode steps");
  app.add_option("--reps", reps, "repetitions, compared bit for bit");
  app.add_option("--backend", backend, "cpu | cuda");
  app.add_option("--precision", precision_text, "fp32 | bf16 | fp16 (default: cpu fp32, cuda the checkpoint dtype)");
  app.add_option("--document", document, "corpus document for the prompt (default: the first one)");
  app.add_option("--corpus-dir", corpus_dir, "documents (.txt, .pdf) to build prompts from (default: fpf's corpus)");
  app.add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json (default: the model's, else fpf's copy)");
  app.add_option("--layers", layers_text, "1-based blocks to tap; 'last' = the last block (default 1,2,4,12,last)");
  app.add_option("--positions", positions_text, "positions from the end of the sequence fed so far");
  app.add_option("--topk", topk, "top-k logprobs per position");
  app.add_option("--hardware", hardware, "hardware label for the configurations (default: the CPU or GPU name)");
  app.add_option("--model-name", model_name, "model name recorded in the file (default: the directory name)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "fpf-exp4-attention: error: %s\n", e.what());
    return fpf::kExitBadInput;
  }

  return fpf::run_main("fpf-exp4-attention", [&] {
    const fpf::io::ModelConfig cfg = fpf::io::load_config(model_dir);
    fpf::taps::TapSpec spec;
    spec.layers = layers_text.empty() ? fpf::taps::default_layers(cfg.num_hidden_layers)
                                      : fpf::taps::parse_layers(layers_text, cfg.num_hidden_layers);
    spec.positions = fpf::taps::parse_int_list(positions_text, "--positions");
    spec.topk = topk;
    if (precision_text.empty())
      precision_text = backend == "cuda" ? (cfg.dtype == "bfloat16" ? "bf16" : cfg.dtype == "float16" ? "fp16" : "fp32") : "fp32";
    const fpf::Precision precision = fpf::parse_precision(precision_text);
    if (reps < 1) throw fpf::Error("--reps", "must be at least 1");

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

    fpf::experiment::ExperimentFile file;
    file.experiment_metadata = fpf::describe_experiment(cfg, model_name, "attention", "attention_impl", spec, steps,
                                                        static_cast<std::int64_t>(prompt.length()));
    file.experiment_metadata.date_created = fpf::experiment::utc_timestamp();
    std::string hw;
    // One configuration per attention policy; the engine (and its weights) lives only while its configuration runs.
    auto run_one = [&](const std::string& attention, const std::string& suffix) {
      fpf::with_setup_for(model_dir, backend, attention, [&]<class S>() {
        fpf::Engine<S> engine(model_dir, fpf::EngineOptions{precision});
        auto conf = fpf::describe_configuration("", backend, precision, S::attention::name, S::quant::name, 1);
        if (!hardware.empty()) conf.hardware = hardware;
        hw = conf.hardware;
        conf.config_id = (backend == "cpu" ? std::string("cpu") : conf.hardware) + suffix;
        conf.variable_value = attention;
        std::fprintf(stderr, "%s: prompt %zu tokens, %d steps x %d reps on %s\n", conf.config_id.c_str(), prompt.length(),
                     steps, reps, conf.hardware.c_str());
        auto result = fpf::experiment::run_configuration(
            conf,
            [&](int) {
              auto seqs = engine.generate(prompts, steps, spec);
              fpf::attach_text(tok, seqs);
              return seqs;
            },
            fpf::experiment::RunOptions{reps});
        const auto& c = result.configuration;
        std::printf("%s: %s, %.3f s per rep\n", c.config_id.c_str(),
                    c.determinism->bit_exact ? "reps bit-identical" : c.determinism->first_difference.c_str(),
                    c.timing->runtime_seconds_mean);
        fpf::experiment::add_result(file, std::move(result));
        return 0;
      });
    };
    run_one("eager", "_eager");
    const fs::path ref = fs::path(out_dir) / "reference_baseline.json";
    bool fused = false;
    if (fs::exists(ref)) {
      try {
        fpf::experiment::ExperimentFile with_ref = file;  // fuse_reference may throw half-way
        fpf::experiment::fuse_reference(with_ref, fpf::experiment::read_experiment(ref), std::string("flash"), ref.string(), hw);
        file = std::move(with_ref);
        fused = true;
        std::printf("flash: reference configuration fused from %s\n", ref.string().c_str());
      } catch (const fpf::Error& e) {
        std::fprintf(stderr, "not fusing %s (%s); running flash here\n", ref.string().c_str(), e.what());
      }
    }
    if (!fused) run_one("flash", "_flash");
    fs::create_directories(out_dir);
    const fs::path out = fs::path(out_dir) / "attention_experiment.json";
    fpf::experiment::write_checked(out, file);
    std::printf("wrote %s\n", out.string().c_str());
    return fpf::kExitOk;
  });
}
