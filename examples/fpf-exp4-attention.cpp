// fpf-exp4-attention: experiment 4 of the seed plan, flash vs eager attention. The prompt is exp0's (a corpus
// document cut to exactly N tokens + the summary request, through Qwen3's chat template); the eager configuration
// runs --reps bit-checked repetitions; the flash one is the reference baseline, fused from
// OUT_DIR/reference_baseline.json (fpf-exp0-reference) when that file exists for this hardware, else run here too.
// Writes OUT_DIR/attention_experiment.json.
//
//   fpf-exp4-attention --model AWQ_DIR [--out-dir results] [--prompt-tokens 6000] [--steps 30] [--reps 3]
//                      [--backend cpu|cuda] [--precision fp32|bf16|fp16] [--document NAME] [--corpus-dir DIR]
//                      [--tokenizer DIR] [--layers 1,2,4,12,last] [--positions -3,-2,-1] [--topk 10] [--hardware L]
//
// Exit codes: 0 ok, 1 some configuration's repetitions differ, 2 bad input or usage.
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
#include <fpf/text/prompt.hpp>

#include "common/cli.hpp"
#include "common/experiment.hpp"

int main(int argc, char** argv) {
  CLI::App app{"fpf-exp4-attention: flash vs eager attention (experiment 4)"};
  fpf::examples::RunOptions run;
  fpf::examples::PromptOptions prompt_opts;
  std::string out_dir = "results";
  fpf::examples::add_run_options(app, run);
  fpf::examples::describe_reference_model(app);
  fpf::examples::add_prompt_options(app, prompt_opts);
  app.add_option("--out-dir", out_dir, "where attention_experiment.json is written (and reference_baseline.json read)");
  if (auto code = fpf::examples::parse(app, "fpf-exp4-attention", argc, argv)) return *code;

  return fpf::run_main("fpf-exp4-attention", [&] {
    const fpf::examples::Resolved r = fpf::examples::resolve(run);
    const auto& cfg = r.cfg;
    const auto& spec = r.spec;
    const fpf::Precision precision = r.precision;
    const std::string& model_dir = run.model_dir;
    const std::string& backend = run.backend;
    const int steps = run.steps;
    const auto corpus = fpf::examples::load_corpus(prompt_opts, model_dir);
    const auto& tok = corpus.tok;
    const fpf::text::Prompt prompt = corpus.prompt();
    const std::vector<std::vector<std::int32_t>> prompts{fpf::engine_ids(prompt.ids)};

    fpf::experiment::ExperimentFile file;
    file.experiment_metadata = fpf::describe_experiment(cfg, r.model_name, "attention", "attention_impl", spec, steps,
                                                        static_cast<std::int64_t>(prompt.length()));
    file.experiment_metadata.date_created = fpf::experiment::utc_timestamp();
    std::string hw;
    // One configuration per attention policy; the engine (and its weights) lives only while its configuration runs.
    auto run_one = [&](const std::string& attention, const std::string& suffix) {
      fpf::with_setup_for(model_dir, backend, attention, [&]<class S>() {
        fpf::Engine<S> engine(model_dir, fpf::EngineOptions{precision});
        auto conf = fpf::examples::configuration<S>(run, precision, 1, suffix, attention);
        hw = conf.hardware;
        fpf::examples::run_and_add(file, std::move(conf), engine, prompts, r, run, tok, "");
        return 0;
      });
    };
    run_one("eager", "_eager");
    if (!fpf::examples::fuse_reference_from(file, out_dir, std::string("flash"), hw, "flash")) run_one("flash", "_flash");
    fpf::examples::write_experiment_file(file, out_dir, "attention_experiment.json");
    return fpf::kExitOk;
  });
}
