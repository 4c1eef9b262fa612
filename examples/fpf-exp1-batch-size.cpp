// fpf-exp1-batch-size: experiment 1 of the seed plan, batch size 1, 2, 4. Sequence 0 is exp0's prompt (a corpus
// document cut to exactly N tokens + the summary request, through Qwen3's chat template); its neighbours are the
// same request on the next documents of the corpus (cycling), each cut to N tokens as well. Every batch size runs
// --reps bit-checked repetitions (all sequences compared; sequence 0's signals stored); batch 1 is the reference
// baseline, fused from OUT_DIR/reference_baseline.json (fpf-exp0-reference) when that file exists for this hardware,
// else run here too. Flash attention, as the reference. Writes OUT_DIR/batch_size_experiment.json.
//
//   fpf-exp1-batch-size --model AWQ_DIR [--out-dir results] [--batch-sizes 2,4] [--prompt-tokens 6000] [--steps 30] [--reps 3]
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
  CLI::App app{"fpf-exp1-batch-size: batch size 1, 2, 4 (experiment 1)"};
  fpf::examples::RunOptions run;
  fpf::examples::PromptOptions prompt_opts;
  std::string out_dir = "results";
  std::string batch_text = "2,4";
  fpf::examples::add_run_options(app, run);
  fpf::examples::describe_reference_model(app);
  fpf::examples::add_prompt_options(app, prompt_opts);
  app.add_option("--out-dir", out_dir, "where batch_size_experiment.json is written (and reference_baseline.json read)");
  app.add_option("--batch-sizes", batch_text, "batch sizes besides the reference's 1");
  if (auto code = fpf::examples::parse(app, "fpf-exp1-batch-size", argc, argv)) return *code;

  return fpf::run_main("fpf-exp1-batch-size", [&] {
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
    std::vector<int> batches;
    int max_b = 1;
    for (int b : fpf::taps::parse_int_list(batch_text, "--batch-sizes")) {
      if (b < 2 || b > 64) throw fpf::Error("--batch-sizes", "batch sizes must be in 2..64 (batch 1 is the reference)");
      batches.push_back(b);
      max_b = std::max(max_b, b);
    }
    std::vector<std::vector<std::int32_t>> all{fpf::engine_ids(prompt.ids)};
    for (int b = 1; b < max_b; ++b) all.push_back(fpf::engine_ids(corpus.prompt(static_cast<std::size_t>(b)).ids));

    fpf::experiment::ExperimentFile file;
    file.experiment_metadata = fpf::describe_experiment(cfg, r.model_name, "batch_size", "batch_size", spec, steps,
                                                        static_cast<std::int64_t>(prompt.length()));
    file.experiment_metadata.date_created = fpf::experiment::utc_timestamp();
    std::string hw;
    // One engine (one copy of the weights) for every batch size.
    fpf::with_setup_for(model_dir, backend, "flash", [&]<class S>() {
      fpf::Engine<S> engine(model_dir, fpf::EngineOptions{precision});
      auto run_one = [&](int bs) {
        const std::vector<std::vector<std::int32_t>> prompts(all.begin(), all.begin() + bs);
        auto conf = fpf::examples::configuration<S>(run, precision, bs, "_bs" + std::to_string(bs), std::int64_t{bs});
        hw = conf.hardware;
        fpf::examples::run_and_add(file, std::move(conf), engine, prompts, r, run, tok, "");
      };
      for (int bs : batches) run_one(bs);
      if (!fpf::examples::fuse_reference_from(file, out_dir, std::int64_t{1}, hw, "bs1")) run_one(1);
      return 0;
    });
    fpf::examples::write_experiment_file(file, out_dir, "batch_size_experiment.json");
    return fpf::kExitOk;
  });
}
