// fpf-exp0-reference: experiment 0 of the seed plan, the reference baseline every other experiment reuses.
// Builds the prompt (a corpus document cut to exactly N tokens + a summary request, through Qwen3's chat
// template), runs the reference configuration (batch 1, flash attention, single device) for --reps repetitions,
// checks them bit for bit and writes OUT_DIR/reference_baseline.json.
//
//   fpf-exp0-reference --model AWQ_DIR [--out-dir results] [--prompt-tokens 6000] [--steps 30] [--reps 3]
//                      [--backend cpu] [--precision fp32] [--document NAME] [--corpus-dir DIR] [--tokenizer DIR]
//                      [--layers 1,2,4,12,last] [--positions -3,-2,-1] [--topk 10] [--hardware LABEL]
//
// Exit codes: 0 ok, 1 the repetitions differ (where is printed; every rep kept in *.nondeterministic.json),
// 2 bad input or usage.
#include <cstdio>
#include <filesystem>
#include <string>

#include <fpf/engine/describe.hpp>
#include <fpf/engine/dispatch.hpp>
#include <fpf/engine/engine.hpp>
#include <fpf/engine/prompting.hpp>
#include <fpf/experiment/json.hpp>
#include <fpf/experiment/runner.hpp>
#include <fpf/text/prompt.hpp>

#include "common/cli.hpp"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  CLI::App app{"fpf-exp0-reference: the reference baseline (experiment 0)"};
  fpf::examples::RunOptions run;
  fpf::examples::PromptOptions prompt_opts;
  std::string out_dir = "results";
  fpf::examples::add_run_options(app, run);
  fpf::examples::describe_reference_model(app);
  fpf::examples::add_prompt_options(app, prompt_opts);
  app.add_option("--out-dir", out_dir, "where reference_baseline.json is written");
  if (auto code = fpf::examples::parse(app, "fpf-exp0-reference", argc, argv)) return *code;

  return fpf::run_main("fpf-exp0-reference", [&] {
    const fpf::examples::Resolved r = fpf::examples::resolve(run);
    const auto& cfg = r.cfg;
    const auto& spec = r.spec;
    const fpf::Precision precision = r.precision;
    const auto corpus = fpf::examples::load_corpus(prompt_opts, run.model_dir);
    const fpf::text::Prompt prompt = corpus.prompt();
    const std::vector<std::vector<std::int32_t>> prompts{fpf::engine_ids(prompt.ids)};
    const std::string& model_dir = run.model_dir;
    const std::string& backend = run.backend;
    const int steps = run.steps, reps = run.reps;

    // The seed's reference: batch 1, flash attention, no graph capture, no concurrent load, one device.
    return fpf::with_setup_for(model_dir, backend, "flash", [&]<class S>() {
      fpf::Engine<S> engine(model_dir, fpf::EngineOptions{precision});
      auto meta = fpf::describe_experiment(cfg, r.model_name, "reference", "none", spec, steps,
                                           static_cast<std::int64_t>(prompt.length()));
      auto conf = fpf::describe_configuration("", backend, precision, S::attention::name, S::quant::name, 1);
      if (!run.hardware.empty()) conf.hardware = run.hardware;
      conf.config_id = fpf::config_prefix(conf) + "_reference";
      fs::create_directories(out_dir);
      const fs::path out = fs::path(out_dir) / "reference_baseline.json";
      std::fprintf(stderr, "prompt: %zu tokens (%zu from %s); %d steps x %d reps on %s\n", prompt.length(),
                   corpus.spec.document_tokens, prompt.document.c_str(), steps, reps, conf.hardware.c_str());
      const auto file = fpf::experiment::run_experiment(
          meta, conf,
          [&](int) {
            auto seqs = engine.generate(prompts, steps, spec);
            fpf::attach_text(corpus.tok, seqs);
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
