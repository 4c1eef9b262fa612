// Batching and checkpoint-layout invariance of the CPU reference engine.
#include <doctest/doctest.h>

#include <boost/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fpf/fpf.hpp>

#include "reference_signals.hpp"

using namespace fpf;
namespace fs = std::filesystem;

namespace {

using CpuEager = Setup<quant::Dense, attn::Eager, par::Single, cpu::Backend>;


std::vector<std::int32_t> ramp(std::int32_t start, std::size_t n, std::int32_t vocab) {
  std::vector<std::int32_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::int32_t>((start + 37 * static_cast<std::int32_t>(i)) % vocab);
  return v;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::path(FPF_BINARY_DIR) / "test-tmp" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("engine batch: each sequence of a batch is bit-identical to running it alone (fp32 CPU)") {
  const fs::path dir = testing::fixture_dir("moe_sparse_step");
  Engine<CpuEager> engine(dir);
  const std::int32_t V = static_cast<std::int32_t>(engine.config().vocab_size);
  // Different lengths, including one shorter than the 3 tapped positions.
  const std::vector<std::vector<std::int32_t>> prompts{ramp(5, 14, V), ramp(100, 2, V), ramp(7, 9, V), ramp(300, 21, V)};
  taps::TapSpec spec{{1, 2, 3, 4, 5}, {-3, -2, -1}, 10};

  const auto batched = engine.generate(prompts, 5, spec);
  REQUIRE(batched.size() == prompts.size());
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    CAPTURE(b);
    const auto alone = engine.generate({prompts[b]}, 5, spec).at(0);
    CHECK(batched[b].steps == alone.steps);
  }
  // The 2-token prompt has no position -3 at step 0 and gains it at step 1.
  CHECK(batched[1].steps[0].logprobs.count(-3) == 0);
  CHECK(batched[1].steps[1].logprobs.count(-3) == 1);
}

TEST_CASE("engine: earlier positions keep the values computed when they were processed") {
  Engine<CpuEager> engine(testing::fixture_dir("dense_tied"));
  const auto run = engine.generate({ramp(3, 6, 384)}, 4, taps::TapSpec{{1, 4}, {-3, -2, -1}, 5}).at(0);
  for (std::size_t s = 1; s < run.steps.size(); ++s) {
    CHECK(run.steps[s].hidden_states.at(4).at(-2) == run.steps[s - 1].hidden_states.at(4).at(-1));
    CHECK(run.steps[s].key_vectors.at(1).at(-3) == run.steps[s - 1].key_vectors.at(1).at(-2));
    CHECK(run.steps[s].logprobs.at(-2) == run.steps[s - 1].logprobs.at(-1));
  }
}

TEST_CASE("engine: fused expert tensors (transformers 5 in-memory layout) give the same signals as per-expert") {
  const fs::path src = testing::fixture_dir("moe_no_norm");
  const io::ModelConfig cfg = io::load_config(src);
  const io::Checkpoint ckpt = io::Checkpoint::open(src);
  const std::int64_t E = cfg.num_experts, I = cfg.moe_intermediate_size, H = cfg.hidden_size;

  // Rebuild the checkpoint with gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I].
  std::vector<io::TensorToWrite> out;
  std::vector<std::vector<std::byte>> storage;
  for (const std::string& name : ckpt.names()) {
    if (name.find(".mlp.experts.") != std::string::npos) continue;
    const io::TensorInfo& t = *ckpt.find(name);
    out.push_back({t.name, t.dtype, t.shape, t.bytes});
  }
  storage.reserve(static_cast<std::size_t>(2 * cfg.num_hidden_layers));
  for (int l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
    std::vector<std::byte> gate_up, down;
    for (std::int64_t e = 0; e < E; ++e) {
      for (const char* proj : {"gate_proj", "up_proj"}) {
        auto b = ckpt.get(p + std::to_string(e) + "." + proj + ".weight").bytes;
        gate_up.insert(gate_up.end(), b.begin(), b.end());
      }
      auto b = ckpt.get(p + std::to_string(e) + ".down_proj.weight").bytes;
      down.insert(down.end(), b.begin(), b.end());
    }
    storage.push_back(std::move(gate_up));
    out.push_back({p + "gate_up_proj", DType::F32, {E, 2 * I, H}, storage.back()});
    storage.push_back(std::move(down));
    out.push_back({p + "down_proj", DType::F32, {E, H, I}, storage.back()});
  }
  const fs::path dst = fresh_dir("fused_experts");
  io::write_safetensors(dst / "model.safetensors", out);
  fs::copy_file(src / "config.json", dst / "config.json");

  const testing::Reference ref = testing::load_reference("moe_no_norm");
  const auto a = Engine<CpuEager>(src).generate({ref.signals.prompt_ids}, 4, ref.spec).at(0);
  const auto b = Engine<CpuEager>(dst).generate({ref.signals.prompt_ids}, 4, ref.spec).at(0);
  CHECK(a.steps == b.steps);
}

TEST_CASE("engine: a config.json in transformers 4.x spelling loads the same model") {
  const fs::path src = testing::fixture_dir("moe_bf16_sharded");
  // transformers 5 wrote: rope_parameters.rope_theta, num_local_experts, dtype. Rewrite as 4.x did.
  boost::json::object cfg = boost::json::parse(slurp(src / "config.json")).as_object();
  cfg["rope_theta"] = cfg.at("rope_parameters").at("rope_theta");
  cfg.erase("rope_parameters");
  cfg["num_experts"] = cfg.at("num_local_experts");
  cfg.erase("num_local_experts");
  cfg["torch_dtype"] = cfg.at("dtype");
  cfg.erase("dtype");
  cfg["transformers_version"] = "4.51.0";
  const fs::path dst = fresh_dir("config_4x");
  for (const auto& e : fs::directory_iterator(src))
    if (e.path().filename() != "config.json") fs::copy_file(e.path(), dst / e.path().filename());
  std::ofstream(dst / "config.json") << boost::json::serialize(cfg);

  const testing::Reference ref = testing::load_reference("moe_bf16_sharded");
  const auto a = Engine<CpuEager>(src).generate({ref.signals.prompt_ids}, 3, ref.spec).at(0);
  const auto b = Engine<CpuEager>(dst).generate({ref.signals.prompt_ids}, 3, ref.spec).at(0);
  CHECK(a.steps == b.steps);
  CHECK(a.steps[0].token_id == ref.signals.steps[0].token_id);
}
