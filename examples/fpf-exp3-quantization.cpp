// fpf-exp3-quantization: experiment 3 of the seed plan, the quantization method. The prompt is exp0's (a corpus
// document cut to exactly N tokens + the summary request, through Qwen3's chat template); the GPTQ and the
// bitsandbytes-NF4 checkpoints each run --reps bit-checked repetitions, each dispatched by its own config.json's
// quantization_config; the AWQ checkpoint (--model, the reference configuration of every experiment) is the reference
// baseline, fused from OUT_DIR/reference_baseline.json (fpf-exp0-reference on the same --model) when that file
// exists for this hardware and measured AWQ, else run here too. Flash attention, batch 1, as the reference.
// variable_value is the seed's quant_method: "awq" (the baseline: it sorts first, which is how the seed's analysis
// picks a baseline), "gptq", "bnb". Writes OUT_DIR/quantization_experiment.json.
//
//   fpf-exp3-quantization --model AWQ_DIR --gptq DIR --nf4 DIR [--out-dir results] [--prompt-tokens 6000]
//                         [--steps 30] [--reps 3] [--backend cpu|cuda] [--precision fp32|bf16|fp16]
//                         [--document NAME] [--corpus-dir DIR] [--tokenizer DIR] [--layers 1,2,4,12,last]
//                         [--positions -3,-2,-1] [--topk 10] [--hardware L]
//
// The three checkpoints must be the same model (same config.json apart from quantization_config): the experiment
// compares methods, not models. Exit codes: 0 ok, 1 some configuration's repetitions differ, 2 bad input or usage
// (e.g. --gptq pointing at a checkpoint that is not GPTQ).
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
#include <fpf/quant/config.hpp>
#include <fpf/text/prompt.hpp>

#include "common/cli.hpp"
#include "common/experiment.hpp"

namespace fs = std::filesystem;

namespace {

// The checkpoint's scheme must be the one its option names (dispatch would happily run a dense or AWQ dir as "gptq").
void require_scheme(const std::string& dir, const char* option, std::string_view want) {
  const std::string_view have = fpf::quant::policy_name(fpf::quant::load_quant_config(dir));
  if (have != want)
    throw fpf::Error((fs::path(dir) / "config.json").string() + ": quantization_config",
                     std::string(option) + " must name the " + std::string(want) + " checkpoint; this one's scheme is " +
                         std::string(have));
}

// The model's shape (config.json without quantization_config) must match the reference's: same layers, widths,
// vocabulary, RoPE. Compared through what the engine reads.
void require_same_model(const fpf::io::ModelConfig& ref, const std::string& dir, const char* option) {
  const fpf::io::ModelConfig c = fpf::io::load_config(dir);
  auto field = [&](const char* name, auto a, auto b) {
    if (a != b)
      throw fpf::Error((fs::path(dir) / "config.json").string() + ": " + name,
                       std::string(option) + " is a different model than --model (" + std::to_string(b) + " vs " +
                           std::to_string(a) + ")");
  };
  field("hidden_size", ref.hidden_size, c.hidden_size);
  field("num_hidden_layers", ref.num_hidden_layers, c.num_hidden_layers);
  field("num_attention_heads", ref.num_attention_heads, c.num_attention_heads);
  field("num_key_value_heads", ref.num_key_value_heads, c.num_key_value_heads);
  field("head_dim", ref.head_dim, c.head_dim);
  field("vocab_size", ref.vocab_size, c.vocab_size);
  field("num_experts", ref.num_experts, c.num_experts);
  field("moe_intermediate_size", ref.moe_intermediate_size, c.moe_intermediate_size);
  field("intermediate_size", ref.intermediate_size, c.intermediate_size);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fpf-exp3-quantization: GPTQ and bitsandbytes NF4 against the AWQ reference (experiment 3)"};
  fpf::examples::RunOptions run;
  fpf::examples::PromptOptions prompt_opts;
  std::string out_dir = "results", gptq_dir, nf4_dir;
  fpf::examples::add_run_options(app, run);
  app.get_option("--model")->description(
      "the AWQ checkpoint: the reference configuration (fpf-exp0-reference's --model); must be AWQ here");
  fpf::examples::add_prompt_options(app, prompt_opts);
  app.add_option("--gptq", gptq_dir, "the GPTQ checkpoint of the same model")->required();
  app.add_option("--nf4", nf4_dir, "the bitsandbytes NF4 checkpoint of the same model")->required();
  app.add_option("--out-dir", out_dir,
                 "where quantization_experiment.json is written (and reference_baseline.json read)");
  if (auto code = fpf::examples::parse(app, "fpf-exp3-quantization", argc, argv)) return *code;

  return fpf::run_main("fpf-exp3-quantization", [&] {
    const fpf::examples::Resolved r = fpf::examples::resolve(run);
    const auto& cfg = r.cfg;
    const auto& spec = r.spec;
    const fpf::Precision precision = r.precision;
    const std::string& model_dir = run.model_dir;
    const std::string& backend = run.backend;
    const int steps = run.steps;
    require_scheme(model_dir, "--model", "awq");
    require_scheme(gptq_dir, "--gptq", "gptq");
    require_scheme(nf4_dir, "--nf4", "nf4");
    require_same_model(cfg, gptq_dir, "--gptq");
    require_same_model(cfg, nf4_dir, "--nf4");
    // One prompt for all three: built with --model's tokenizer (or --tokenizer), so every configuration sees the
    // same token ids whatever tokenizer files the other checkpoints carry.
    const auto corpus = fpf::examples::load_corpus(prompt_opts, model_dir);
    const auto& tok = corpus.tok;
    const fpf::text::Prompt prompt = corpus.prompt();
    const std::vector<std::vector<std::int32_t>> prompts{fpf::engine_ids(prompt.ids)};

    fpf::experiment::ExperimentFile file;
    // The metadata's model is the reference's (--model), as in every experiment file: fuse_reference checks it.
    file.experiment_metadata = fpf::describe_experiment(cfg, r.model_name, "quantization", "quant_method", spec, steps,
                                                        static_cast<std::int64_t>(prompt.length()));
    file.experiment_metadata.date_created = fpf::experiment::utc_timestamp();
    std::string hw;
    // One configuration per checkpoint; its engine (and weights) lives only while the configuration runs.
    auto run_one = [&](const std::string& dir, const std::string& method, const std::string& suffix) {
      fpf::with_setup_for(dir, backend, "flash", [&]<class S>() {
        fpf::Engine<S> engine(dir, fpf::EngineOptions{precision});
        auto conf = fpf::examples::configuration<S>(run, precision, 1, suffix, method);
        hw = conf.hardware;
        fpf::examples::run_and_add(file, std::move(conf), engine, prompts, r, run, tok, dir + ", ");
        return 0;
      });
    };
    run_one(gptq_dir, "gptq", "_gptq");
    run_one(nf4_dir, "bnb", "_bnb-nf4");
    // A reference measured on a dense (or other) checkpoint is not the AWQ baseline, whatever its model name.
    auto awq_only = [&](const fpf::experiment::ExperimentFile& reference, const std::string& where) {
      for (std::size_t i = 0; i < reference.configurations.size(); ++i)
        if (const auto& c = reference.configurations[i]; c.hardware == hw && c.fixed_params.quantization != "awq")
          throw fpf::Error(where + ": configurations[" + std::to_string(i) + "].fixed_params.quantization",
                           "is '" + c.fixed_params.quantization + "', not awq");
    };
    if (!fpf::examples::fuse_reference_from(file, out_dir, std::string("awq"), hw, "awq", awq_only))
      run_one(model_dir, "awq", "_awq");
    fpf::examples::write_experiment_file(file, out_dir, "quantization_experiment.json");
    return fpf::kExitOk;
  });
}
