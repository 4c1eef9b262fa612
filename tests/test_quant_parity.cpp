// Quantized fixtures (tests/fixtures/quant/NAME): fpf's dequantized weights against an independent PyTorch
// dequantization written from the published formats (tests/fixtures/make_quant_fixtures.py, run on the GPU machine),
// bit for bit, and the CPU fp32 engine against Hugging Face fp32 running those dequantized weights (tokens identical,
// signals within 1e-4 relative L2).
//
// The quantized checkpoints themselves are written by fpf's quantizer: run
//   fpf_tests -tc='quant fixtures: write*' --no-skip
// then make_quant_fixtures.py on the GPU machine for dequant.safetensors and reference.json.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include <fpf/fpf.hpp>
#include <fpf/quant/awq.hpp>
#include <fpf/quant/gptq.hpp>
#include <fpf/quant/nf4.hpp>
#include <fpf/quant/rewrite.hpp>

#include "reference_signals.hpp"

using namespace fpf;
namespace fs = std::filesystem;

namespace {

struct QuantFixture {
  std::string name, source;
  quant::QuantizeOptions options;
  bool spell_4x = false;  // rewrite config.json in transformers 4.x spellings
};

std::vector<QuantFixture> quant_fixtures() {
  std::vector<QuantFixture> v;
  quant::QuantizeOptions o;
  o.group_size = 8;
  o.scheme = quant::Scheme::Awq;
  v.push_back({"awq_moe_sparse_step", "moe_sparse_step", o, false});
  o.scheme = quant::Scheme::GptqActOrder;
  v.push_back({"gptq_actorder_moe_sparse_step", "moe_sparse_step", o, true});
  o.scheme = quant::Scheme::Gptq;
  o.gptq_v2 = true;
  v.push_back({"gptq_v2_moe_no_norm", "moe_no_norm", o, false});
  quant::QuantizeOptions n;
  n.scheme = quant::Scheme::Nf4;
  n.max_shard_bytes = 40000;
  v.push_back({"nf4_moe_bf16_sharded", "moe_bf16_sharded", n, true});
  return v;
}

fs::path quant_dir(const std::string& name) { return fs::path(FPF_SOURCE_DIR) / "tests/fixtures/quant" / name; }

// transformers 4.x names: num_experts, top-level rope_theta, torch_dtype.
void respell_4x(const fs::path& config) {
  boost::json::object o = boost::json::parse(io::json::read_text_file(config)).as_object();
  auto rename = [&](const char* from, const char* to) {
    if (!o.contains(from)) return;
    const boost::json::value v = o.at(from);  // a copy: inserting may move the object's storage
    o.erase(from);
    o[to] = v;
  };
  rename("num_local_experts", "num_experts");
  rename("dtype", "torch_dtype");
  if (o.contains("rope_parameters")) {
    const boost::json::value theta = o.at("rope_parameters").as_object().at("rope_theta");
    o.erase("rope_parameters");
    o["rope_theta"] = theta;
    o["rope_scaling"] = nullptr;
  }
  o["transformers_version"] = "4.51.0";
  std::ofstream(config) << boost::json::serialize(o) << "\n";
}

template <class Quant>
void check_fixture(const std::string& name) {
  const fs::path dir = quant_dir(name);
  if (!fs::exists(dir / "reference.json") || !fs::exists(dir / "dequant.safetensors")) {
    WARN_MESSAGE(false, name << ": no reference.json / dequant.safetensors yet (run make_quant_fixtures.py)");
    return;
  }
  // 1. Dequantized weights bit-identical to the PyTorch dequantization.
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  const io::ModelConfig cfg = io::load_config(dir);
  const io::Checkpoint ref = io::Checkpoint::open(dir / "dequant.safetensors");
  model::WeightReader r(ckpt, cfg);
  int compared = 0;
  for (const std::string& t : ref.names()) {
    const io::TensorInfo& info = ref.get(t);
    REQUIRE(info.dtype == DType::F32);
    REQUIRE(info.shape.size() == 2);
    const std::string module = t.substr(0, t.size() - std::string(".weight").size());
    const std::vector<float> got = Quant::linear_f32(r, module, info.shape[0], info.shape[1]);
    const std::vector<float> want = model::WeightReader::widen(info, 0, static_cast<std::size_t>(info.numel()));
    const std::size_t differ = testing::bit_differences(got, want);
    CAPTURE(module);
    CHECK(differ == 0);
    ++compared;
  }
  CHECK(compared > 0);

  // 2. The engine against HF fp32 on the dequantized weights.
  const testing::Reference reference = testing::load_reference("../quant/" + name);
  Engine<Setup<Quant, attn::Eager, par::Single, cpu::Backend>> engine(dir);
  const auto got = engine.generate({reference.signals.prompt_ids}, reference.steps, reference.spec).at(0);
  REQUIRE(got.steps.size() == reference.signals.steps.size());
  double worst = 0;
  for (std::size_t s = 0; s < got.steps.size(); ++s) {
    const auto& g = got.steps[s];
    const auto& w = reference.signals.steps[s];
    CAPTURE(s);
    REQUIRE(g.token_id == w.token_id);
    for (const auto& [layer, by_pos] : w.hidden_states)
      for (const auto& [pos, values] : by_pos) {
        const double eh = testing::rel_l2(g.hidden_states.at(layer).at(pos), values);
        const double ek = testing::rel_l2(g.key_vectors.at(layer).at(pos), w.key_vectors.at(layer).at(pos));
        CHECK(eh <= 1e-4);
        CHECK(ek <= 1e-4);
        worst = std::max({worst, eh, ek});
      }
    for (const auto& [pos, topk] : w.logprobs) {
      CHECK(g.logprobs.at(pos).token_ids == topk.token_ids);
      const double e = testing::rel_l2(g.logprobs.at(pos).log_probs, topk.log_probs);
      CHECK(e <= 1e-4);
      worst = std::max(worst, e);
    }
  }
  MESSAGE(name << ": " << compared << " Linear weights bit-identical to PyTorch; max rel L2 vs HF " << worst);
}

}  // namespace

TEST_CASE("quant fixtures: write tests/fixtures/quant from the dense fixtures" * doctest::skip()) {
  for (const QuantFixture& f : quant_fixtures()) {
    const fs::path dst = quant_dir(f.name);
    quant::quantize_checkpoint(testing::fixture_dir(f.source), dst, f.options);
    if (f.spell_4x) respell_4x(dst / "config.json");
    std::ofstream(dst / "source.json") << R"({"source": ")" << f.source << R"(", "generator": "quant::quantize_checkpoint"})" << "\n";
  }
}

TEST_CASE("quant parity: AWQ fixture, bit-identical dequant and HF parity") { check_fixture<quant::Awq<4>>("awq_moe_sparse_step"); }
TEST_CASE("quant parity: GPTQ act-order v1 fixture (4.x config spellings)") {
  check_fixture<quant::Gptq<4>>("gptq_actorder_moe_sparse_step");
}
TEST_CASE("quant parity: GPTQ v2 fixture") { check_fixture<quant::Gptq<4>>("gptq_v2_moe_no_norm"); }
TEST_CASE("quant parity: NF4 double-quant bf16 sharded fixture (4.x config spellings)") {
  check_fixture<quant::Nf4>("nf4_moe_bf16_sharded");
}

// fpf-synth --shape tiny-moe --quant S --seed 3 (bf16 weights quantized by fpf-synth itself), dequantized by the
// independent PyTorch script and run by HF on the GPU machine: fpf-synth's files read back bit for bit.
TEST_CASE("quant parity: fpf-synth tiny-moe checkpoints in every scheme") {
  check_fixture<quant::Awq<4>>("synth_awq_tiny_moe");
  check_fixture<quant::Gptq<4>>("synth_gptq_tiny_moe");
  check_fixture<quant::Gptq<4>>("synth_gptq_actorder_tiny_moe");
  check_fixture<quant::Nf4>("synth_nf4_tiny_moe");
}
