// fpf-synth: the checkpoint it writes opens as a Hugging Face checkpoint (config.json, sharded safetensors and
// index, tokenizer files), the CPU engine runs it with finite signals, the same seed writes the same bytes, and bad
// arguments exit 2.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <fpf/fpf.hpp>

#include "program_util.hpp"

namespace fs = std::filesystem;
using namespace fpf;

namespace {

using fpf::testing::slurp;

int synth(const std::string& args) {
  return fpf::testing::run_program("fpf-synth", args, "/dev/null", fs::path(FPF_BINARY_DIR) / "test-tmp" / "synth-stderr.txt");
}

fs::path tmp(const std::string& name) {
  const fs::path d = fs::path(FPF_BINARY_DIR) / "test-tmp" / "synth" / name;
  fs::remove_all(d);
  return d;
}

}  // namespace

TEST_CASE("fpf-synth writes a sharded HF checkpoint that the engine runs") {
  for (const char* shape : {"tiny-moe", "tiny-dense"}) {
    CAPTURE(shape);
    const fs::path dir = tmp(shape);
    REQUIRE(synth(std::string("--shape ") + shape + " --out " + dir.string() + " --seed 3 --max-shard-gb 0.0002") == 0);
    CHECK(fs::exists(dir / "config.json"));
    CHECK(fs::exists(dir / "model.safetensors.index.json"));
    int shards = 0;
    for (const auto& e : fs::directory_iterator(dir)) shards += e.path().extension() == ".safetensors";
    CHECK(shards >= 2);  // 0.0002 GB per shard: several shards, named model-0000k-of-0000n
    CHECK(fs::exists(dir / ("model-00001-of-0000" + std::to_string(shards) + ".safetensors")));
    if (fs::exists(fs::path(FPF_SOURCE_DIR) / "data" / "qwen3-tokenizer" / "tokenizer.json")) CHECK(fs::exists(dir / "tokenizer.json"));
    const io::ModelConfig cfg = io::load_config(dir);
    CHECK(cfg.dtype == "bfloat16");
    Engine<Setup<quant::Dense, attn::Flash<>, par::Single, cpu::Backend>> engine(dir);
    taps::TapSpec spec;
    spec.layers = {1, cfg.num_hidden_layers};
    const auto out = engine.generate({{1, 2, 3, 4, 5, 6, 7, 8}}, 3, spec).at(0);
    for (const auto& st : out.steps) {
      for (const auto& [l, by_pos] : st.hidden_states)
        for (const auto& [p, v] : by_pos)
          for (float x : v) REQUIRE(std::isfinite(x));
      for (const auto& [p, t] : st.logprobs) REQUIRE(std::isfinite(t.log_probs.at(0)));
    }
  }
}

TEST_CASE("fpf-synth: the same seed writes the same bytes, another seed other weights") {
  const fs::path a = tmp("seed-a"), b = tmp("seed-b"), c = tmp("seed-c");
  REQUIRE(synth("--shape tiny-moe --out " + a.string() + " --seed 5") == 0);
  REQUIRE(synth("--shape tiny-moe --out " + b.string() + " --seed 5") == 0);
  REQUIRE(synth("--shape tiny-moe --out " + c.string() + " --seed 6") == 0);
  const std::string shard = "model-00001-of-00001.safetensors";
  CHECK(slurp(a / shard) == slurp(b / shard));
  CHECK(slurp(a / shard) != slurp(c / shard));
  CHECK(slurp(a / "config.json") == slurp(c / "config.json"));
}

TEST_CASE("fpf-synth: bad arguments exit 2") {
  const fs::path d = tmp("bad");
  CHECK(synth("--shape qwen9-1t --out " + d.string()) == 2);
  CHECK(synth("--shape tiny-moe") == 2);
  CHECK(synth("--shape tiny-moe --out " + d.string() + " --dtype int3") == 2);
  CHECK(synth("--shape tiny-moe --out " + d.string() + " --layers -1") == 2);
  CHECK(synth("--shape tiny-moe --out " + d.string() + " --max-shard-gb 0") == 2);
  CHECK(synth("--shape tiny-moe --out " + d.string() + " --seed x") == 2);
  REQUIRE(synth("--shape tiny-moe --out " + d.string()) == 0);
  CHECK(synth("--shape tiny-moe --out " + d.string()) == 2);  // not empty, no --force
  CHECK(synth("--shape tiny-moe --out " + d.string() + " --force") == 0);
}
