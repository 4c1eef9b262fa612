// fpf-run: runs one configuration (model, prompt, backend, precision, attention, batch) for --reps repetitions,
// checks that the repetitions are bit-identical and writes an experiment JSON in the seed schema.
//
//   fpf-run --model DIR (--prompt-ids 1,2,3 | --prompt-text-file F [--prompt-tokens 6000]) [--steps 30]
//           [--layers 1,2,4,12,last] [--positions -3,-2,-1] [--topk 10] [--backend cpu] [--precision fp32]
//           [--attention flash|eager] [--batch-size N] [--reps 3] [--out F] [--tokenizer DIR]
//
// --prompt-ids are used as given (no chat template); several sequences are separated by ';' ("1,2,3;7,8").
// --prompt-text-file (text or PDF) is cut to exactly --prompt-tokens tokens and wrapped with a summary request in
// Qwen3's chat template; with --batch-size N the N-1 neighbours come from other documents of fpf's corpus.
// Sequence 0 is the measured one.
// Exit codes: 0 ok, 1 repetitions differ (the report names where; every rep is kept in F.nondeterministic.json),
// 2 bad input or usage.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <fpf/engine/describe.hpp>
#include <fpf/engine/dispatch.hpp>
#include <fpf/engine/engine.hpp>
#include <fpf/experiment/json.hpp>
#include <fpf/experiment/runner.hpp>
#include <fpf/engine/prompting.hpp>
#include <fpf/taps/parse.hpp>
#include <fpf/text/prompt.hpp>

namespace {

std::vector<std::vector<std::int32_t>> parse_prompts(const std::string& text) {
  std::vector<std::vector<std::int32_t>> prompts;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find(';', start), text.size());
    std::vector<std::int32_t> ids;
    for (int v : fpf::taps::parse_int_list(std::string_view(text).substr(start, end - start), "--prompt-ids"))
      ids.push_back(v);
    prompts.push_back(std::move(ids));
    start = end + 1;
  }
  return prompts;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fpf-run: one configuration, N bit-checked repetitions, one experiment JSON"};
  std::string model_dir, prompt_ids, prompt_file, tokenizer_dir, layers_text, positions_text = "-3,-2,-1", backend = "cpu", precision_text,
                         attention = "flash", out = "fpf-run.json", model_name;
  int steps = 30, topk = 10, batch_size = 0, reps = 3;
  std::size_t prompt_tokens = 6000;
  app.add_option("--model", model_dir, "checkpoint directory (config.json + safetensors)")->required();
  auto* ids_opt = app.add_option("--prompt-ids", prompt_ids, "token ids, comma-separated; ';' between sequences");
  auto* file_opt = app.add_option("--prompt-text-file", prompt_file, "document (text or PDF) to build the prompt from");
  ids_opt->excludes(file_opt);
  app.add_option("--prompt-tokens", prompt_tokens, "document tokens in a --prompt-text-file prompt");
  app.add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json (default: the model's, else fpf's copy)");
  app.add_option("--steps", steps, "greedy decode steps");
  app.add_option("--layers", layers_text, "1-based blocks to tap; 'last' = the last block (default 1,2,4,12,last)");
  app.add_option("--positions", positions_text, "positions from the end of the sequence fed so far");
  app.add_option("--topk", topk, "top-k logprobs per position");
  app.add_option("--backend", backend, "cpu | cuda");
  app.add_option("--precision", precision_text, "fp32 | bf16 | fp16 (default: cpu fp32, cuda the checkpoint dtype)");
  app.add_option("--attention", attention, "flash | eager");
  app.add_option("--batch-size", batch_size, "sequences decoded together (default: the number of prompts)");
  app.add_option("--reps", reps, "repetitions, compared bit for bit");
  app.add_option("--out", out, "experiment JSON to write");
  app.add_option("--model-name", model_name, "model name recorded in the file (default: the directory name)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "fpf-run: error: %s\n", e.what());
    return fpf::kExitBadInput;
  }

  return fpf::run_main("fpf-run", [&] {
    const fpf::io::ModelConfig cfg = fpf::io::load_config(model_dir);
    fpf::taps::TapSpec spec;
    spec.layers = layers_text.empty() ? fpf::taps::default_layers(cfg.num_hidden_layers)
                                      : fpf::taps::parse_layers(layers_text, cfg.num_hidden_layers);
    spec.positions = fpf::taps::parse_int_list(positions_text, "--positions");
    spec.topk = topk;
    if (precision_text.empty())  // the CPU computes in fp32 only; the GPU in the checkpoint's dtype by default
      precision_text = backend == "cuda" ? (cfg.dtype == "bfloat16" ? "bf16" : cfg.dtype == "float16" ? "fp16" : "fp32") : "fp32";
    const fpf::Precision precision = fpf::parse_precision(precision_text);
    if (prompt_ids.empty() == prompt_file.empty())
      throw fpf::Error("--prompt-ids", "give either --prompt-ids or --prompt-text-file");
    // The tokenizer gives prompts from text and token_text in the output; with --prompt-ids it is optional.
    if (tokenizer_dir.empty() && std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json"))
      tokenizer_dir = model_dir;
    if (tokenizer_dir.empty() && !prompt_file.empty()) tokenizer_dir = fpf::text::default_tokenizer_dir().string();
    std::optional<fpf::text::Tokenizer> tok;
    if (!tokenizer_dir.empty()) tok = fpf::text::Tokenizer::from_dir(tokenizer_dir);

    std::vector<std::vector<std::int32_t>> prompts;
    if (!prompt_ids.empty()) {
      prompts = parse_prompts(prompt_ids);
      if (batch_size == 0) batch_size = static_cast<int>(prompts.size());
      if (batch_size != static_cast<int>(prompts.size()))
        throw fpf::Error("--batch-size", std::to_string(batch_size) + " sequences asked for, " +
                                             std::to_string(prompts.size()) + " prompts given in --prompt-ids");
    } else {
      if (batch_size == 0) batch_size = 1;
      std::vector<fpf::text::Document> docs{fpf::text::load_document(prompt_file)};
      for (auto& d : fpf::text::load_corpus(fpf::text::default_corpus_dir()))
        if (static_cast<int>(docs.size()) < batch_size && d.text != docs[0].text) docs.push_back(std::move(d));
      fpf::text::PromptSpec pspec;
      pspec.document_tokens = prompt_tokens;
      for (const auto& p : fpf::text::build_batch(*tok, docs, pspec, static_cast<std::size_t>(batch_size)))
        prompts.push_back(fpf::engine_ids(p.ids));
    }
    if (reps < 1) throw fpf::Error("--reps", "must be at least 1");
    if (model_name.empty()) model_name = std::filesystem::path(model_dir).lexically_normal().filename().string();
    if (model_name.empty()) model_name = std::filesystem::absolute(model_dir).parent_path().filename().string();

    return fpf::with_setup_for(model_dir, backend, attention, [&]<class S>() {
      fpf::Engine<S> engine(model_dir, fpf::EngineOptions{precision});
      auto meta = fpf::describe_experiment(cfg, model_name, "single_run", "none", spec, steps,
                                           static_cast<std::int64_t>(prompts[0].size()));
      const std::string config_id = backend + "_" + precision_text + "_" + attention + "_bs" + std::to_string(batch_size);
      auto conf = fpf::describe_configuration(config_id, backend, precision, S::attention::name, S::quant::name,
                                              batch_size);
      const auto file = fpf::experiment::run_experiment(
          meta, conf,
          [&](int) {
            auto seqs = engine.generate(prompts, steps, spec);
            if (tok) fpf::attach_text(*tok, seqs);
            return seqs;
          },
          out, fpf::experiment::RunOptions{reps});
      const auto& det = *file.configurations.at(0).determinism;
      std::printf("%s: %d reps bit-identical (signals fnv1a64 %s); tokens:", config_id.c_str(), reps,
                  det.signals_fnv1a64.c_str());
      for (const auto& st : file.runs.back().decode_steps) std::printf(" %d", st.token_id);
      std::printf("\nwrote %s\n", out.c_str());
      return fpf::kExitOk;
    });
  });
}
