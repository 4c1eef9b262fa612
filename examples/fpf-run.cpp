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

#include "common/cli.hpp"

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
  fpf::examples::RunOptions run;
  std::string prompt_ids, prompt_file, tokenizer_dir, attention = "flash", out = "fpf-run.json";
  int batch_size = 0;
  std::size_t prompt_tokens = 6000;
  fpf::examples::add_run_options(app, run);
  auto* ids_opt = app.add_option("--prompt-ids", prompt_ids, "token ids, comma-separated; ';' between sequences");
  auto* file_opt = app.add_option("--prompt-text-file", prompt_file, "document (text or PDF) to build the prompt from");
  ids_opt->excludes(file_opt);
  app.add_option("--prompt-tokens", prompt_tokens, "document tokens in a --prompt-text-file prompt");
  app.add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json (default: the model's, else fpf's copy)");
  app.add_option("--attention", attention, "flash | eager");
  app.add_option("--batch-size", batch_size, "sequences decoded together (default: the number of prompts)");
  app.add_option("--out", out, "experiment JSON to write");
  if (auto code = fpf::examples::parse(app, "fpf-run", argc, argv)) return *code;

  return fpf::run_main("fpf-run", [&] {
    const fpf::examples::Resolved r = fpf::examples::resolve(run);
    const auto& cfg = r.cfg;
    const auto& spec = r.spec;
    const fpf::Precision precision = r.precision;
    const std::string& model_dir = run.model_dir;
    const std::string& backend = run.backend;
    const int steps = run.steps, reps = run.reps;
    if (prompt_ids.empty() == prompt_file.empty())
      throw fpf::Error("--prompt-ids", "give either --prompt-ids or --prompt-text-file");
    // The tokenizer gives prompts from text and token_text in the output; with --prompt-ids it is optional.
    std::optional<fpf::text::Tokenizer> tok;
    if (!prompt_file.empty() || !tokenizer_dir.empty() ||
        std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json"))
      tok = fpf::text::Tokenizer::from_dir(fpf::examples::tokenizer_dir(model_dir, tokenizer_dir));

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

    return fpf::with_setup_for(model_dir, backend, attention, [&]<class S>() {
      fpf::Engine<S> engine(model_dir, fpf::EngineOptions{precision});
      auto meta = fpf::describe_experiment(cfg, r.model_name, "single_run", "none", spec, steps,
                                           static_cast<std::int64_t>(prompts[0].size()));
      const std::string config_id = backend + "_" + std::string(fpf::precision_name(precision)) + "_" + attention +
                                    "_bs" + std::to_string(batch_size);
      auto conf = fpf::describe_configuration(config_id, backend, precision, S::attention::name, S::quant::name,
                                              batch_size);
      if (!run.hardware.empty()) conf.hardware = run.hardware;
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
