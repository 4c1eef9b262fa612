// fpf-synth --quant: every scheme written from the tiny shapes (directly, and --from a dense checkpoint) is read by
// its CPU policy and run by the engine; each dequantized weight lies within half a quantization step of the dense
// weight it came from; the bytes do not depend on --threads; the streamed shard writer writes what
// write_sharded_checkpoint writes; bad arguments exit 2 with one line.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include <unistd.h>

#include <fpf/fpf.hpp>
#include <fpf/quant/rewrite.hpp>

#include "program_util.hpp"

namespace fs = std::filesystem;
using namespace fpf;

namespace {

// Per process: CTest runs the test cases in parallel.
const fs::path kStderr =
    fs::path(FPF_BINARY_DIR) / "test-tmp" / ("synth-quant-stderr-" + std::to_string(::getpid()) + ".txt");

using fpf::testing::slurp;

int synth(const std::string& args) { return fpf::testing::run_program("fpf-synth", args, "/dev/null", kStderr); }

fs::path tmp(const std::string& name) {
  const fs::path d = fs::path(FPF_BINARY_DIR) / "test-tmp" / "synth-quant" / name;
  fs::remove_all(d);
  return d;
}

// Every file of a directory, by name.
std::map<std::string, std::string> files_of(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = slurp(e.path());
  return out;
}

std::vector<io::TensorToWrite> tensors_of(const io::Checkpoint& ckpt) {
  std::vector<io::TensorToWrite> out;
  for (const std::string& name : ckpt.names()) {
    const io::TensorInfo& t = ckpt.get(name);
    out.push_back({t.name, t.dtype, t.shape, t.bytes});
  }
  return out;
}

float at(const io::TensorInfo& t, std::size_t i) { return load_as_f32(t.bytes.data(), t.dtype, i); }

std::int32_t i32_at(const io::TensorInfo& t, std::size_t i) {
  std::int32_t v;
  std::memcpy(&v, t.bytes.data() + 4 * i, 4);
  return v;
}

template <class Quant>
void run_engine(const fs::path& dir) {
  const io::ModelConfig cfg = io::load_config(dir);
  Engine<Setup<Quant, attn::Flash<>, par::Single, cpu::Backend>> engine(dir);
  taps::TapSpec spec;
  spec.layers = {1, cfg.num_hidden_layers};
  const auto out = engine.generate({{1, 2, 3, 4, 5, 6, 7, 8}}, 3, spec).at(0);
  REQUIRE(out.steps.size() == 3);
  for (const auto& st : out.steps) {
    for (const auto& [l, by_pos] : st.hidden_states)
      for (const auto& [p, v] : by_pos)
        for (float x : v) REQUIRE(std::isfinite(x));
    for (const auto& [p, t] : st.logprobs) REQUIRE(std::isfinite(t.log_probs.at(0)));
  }
}

// Reads every quantized Linear of `qdir` through Quant::linear_f32 and checks it against the dense weights of
// `ddir` within half a step: AWQ/GPTQ |W - w| <= |s|/2 (the group's stored scale; one rounding in (q - z) * s adds
// an ulp of the result); NF4 <= half the widest gap of the code (-1 to -0.6961928: 0.3038072 / 2) times the
// block's absmax, plus the stored absmax's own error under double quantization, plus the rounding of the result
// to the model dtype. Returns the number of Linears checked.
template <class Quant>
int check_half_step(const fs::path& ddir, const fs::path& qdir, quant::Scheme scheme) {
  const io::Checkpoint dck = io::Checkpoint::open(ddir), qck = io::Checkpoint::open(qdir);
  const io::ModelConfig qcfg = io::load_config(qdir);
  model::WeightReader qr(qck, qcfg);
  quant::QuantizeOptions o;
  o.scheme = scheme;
  const auto linears = quant::quantized_linears(tensors_of(dck), o);
  const auto qc = quant::load_quant_config(qdir);
  REQUIRE(qc);
  int checked = 0;
  for (const auto& [module, K] : linears) {
    CAPTURE(module);
    const io::TensorInfo& dw = dck.get(module + ".weight");
    const std::int64_t N = dw.shape.at(0);
    REQUIRE(dw.shape.at(1) == K);
    const std::vector<float> q = Quant::linear_f32(qr, module, N, K);
    REQUIRE(q.size() == static_cast<std::size_t>(N * K));
    std::vector<float> absmax;  // NF4: the stored (resolved) absmax per block of 64
    if (scheme == quant::Scheme::Nf4) absmax = quant::Nf4::source(qr, module, N, K).absmax;
    bool differs = false;
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t k = 0; k < K; ++k) {
        const std::size_t i = static_cast<std::size_t>(n * K + k);
        const float w = at(dw, i), d = q[i];
        differs = differs || d != w;
        double bound = 0;
        if (scheme == quant::Scheme::Nf4) {
          const std::size_t b = i / 64;
          float true_absmax = 0;
          for (std::size_t j = b * 64; j < std::min<std::size_t>(static_cast<std::size_t>(N * K), b * 64 + 64); ++j)
            true_absmax = std::max(true_absmax, std::fabs(at(dw, j)));
          bound = 0.1519036 * true_absmax + std::fabs(absmax.at(b) - true_absmax) + std::fabs(d) * 0x1p-8 + 1e-7;
        } else {
          const io::TensorInfo& s = qck.get(module + ".scales");
          std::int64_t g = k / (qc->group_size > 0 ? qc->group_size : K);
          if (scheme != quant::Scheme::Awq) g = i32_at(qck.get(module + ".g_idx"), static_cast<std::size_t>(k));
          bound = 0.5 * std::fabs(at(s, static_cast<std::size_t>(g * N + n))) + std::fabs(d) * 0x1p-23;
        }
        if (!(std::fabs(static_cast<double>(d) - w) <= bound)) {
          CAPTURE(n);
          CAPTURE(k);
          CAPTURE(w);
          CAPTURE(d);
          REQUIRE(std::fabs(static_cast<double>(d) - w) <= bound);
        }
      }
    CHECK(differs);  // it was quantized, not copied
    ++checked;
  }
  return checked;
}

struct SchemeCase {
  const char* arg;
  quant::Scheme scheme;
  quant::Method method;
};
const SchemeCase kSchemes[] = {{"awq", quant::Scheme::Awq, quant::Method::Awq},
                               {"gptq", quant::Scheme::Gptq, quant::Method::Gptq},
                               {"gptq-actorder", quant::Scheme::GptqActOrder, quant::Method::Gptq},
                               {"nf4", quant::Scheme::Nf4, quant::Method::Bnb4}};

}  // namespace

TEST_CASE("fpf-synth --quant: each scheme on tiny-moe and tiny-dense is read by its policy within half a step") {
  for (const std::string shape : {"tiny-moe", "tiny-dense"}) {
    CAPTURE(shape);
    const fs::path dense = tmp(shape + "-dense");
    REQUIRE(synth("--shape " + shape + " --seed 11 --out " + dense.string()) == 0);
    const io::ModelConfig dcfg = io::load_config(dense);
    for (const SchemeCase& sc : kSchemes) {
      const std::string scheme = sc.arg;
      CAPTURE(scheme);
      const fs::path dir = tmp(std::string(shape) + "-" + sc.arg);
      REQUIRE(synth(std::string("--shape ") + shape + " --seed 11 --quant " + sc.arg + " --out " + dir.string()) == 0);
      const auto qc = quant::load_quant_config(dir);
      REQUIRE(qc);
      CHECK(qc->method == sc.method);
      const std::string policy(quant::policy_name(qc));
      // The dense part of config.json is the dense checkpoint's: same model.
      const io::ModelConfig qcfg = io::load_config(dir);
      CHECK(qcfg.hidden_size == dcfg.hidden_size);
      CHECK(qcfg.num_hidden_layers == dcfg.num_hidden_layers);
      CHECK(qcfg.dtype == dcfg.dtype);
      int checked = 0;
      // 128 does not divide the tiny in_features (tiny-moe 32, 64, 128; tiny-dense 64, 128): the largest common
      // divisor below 128 is taken.
      const int group = shape == "tiny-moe" ? 32 : 64;
      if (sc.scheme == quant::Scheme::Awq) {
        CHECK(qc->group_size == group);
        checked = check_half_step<quant::Awq<4>>(dense, dir, sc.scheme);
        run_engine<quant::Awq<4>>(dir);
      } else if (sc.scheme == quant::Scheme::Nf4) {
        checked = check_half_step<quant::Nf4>(dense, dir, sc.scheme);
        run_engine<quant::Nf4>(dir);
      } else {
        CHECK(qc->group_size == group);
        CHECK(qc->desc_act == (sc.scheme == quant::Scheme::GptqActOrder));
        checked = check_half_step<quant::Gptq<4>>(dense, dir, sc.scheme);
        run_engine<quant::Gptq<4>>(dir);
      }
      const int per_layer = std::string(shape) == "tiny-moe" ? 4 + 3 * dcfg.num_experts + (sc.scheme == quant::Scheme::Nf4)
                                                              : 4 + 3;
      CHECK(checked == per_layer * dcfg.num_hidden_layers);
    }
  }
}

TEST_CASE("fpf-synth --quant: --from a dense checkpoint writes the same tensors as quantizing in memory") {
  const fs::path dense = tmp("from-dense"), direct = tmp("from-direct"), from = tmp("from-from");
  REQUIRE(synth("--shape tiny-moe --seed 4 --out " + dense.string()) == 0);
  for (const char* scheme : {"awq", "gptq-actorder", "nf4"}) {
    CAPTURE(scheme);
    fs::remove_all(direct);
    fs::remove_all(from);
    REQUIRE(synth("--shape tiny-moe --seed 4 --quant " + std::string(scheme) + " --out " + direct.string()) == 0);
    REQUIRE(synth("--from " + dense.string() + " --quant " + scheme + " --out " + from.string()) == 0);
    // One shard each: a safetensors file orders its data by dtype size and name, so the bytes are equal whatever
    // order the tensors were produced in.
    const std::string shard = "model-00001-of-00001.safetensors";
    REQUIRE(fs::exists(direct / shard));
    CHECK(slurp(direct / shard) == slurp(from / shard));
    const auto a = quant::load_quant_config(direct), b = quant::load_quant_config(from);
    REQUIRE(a);
    REQUIRE(b);
    CHECK(a->method == b->method);
    CHECK(a->group_size == b->group_size);
    CHECK(a->modules_to_not_convert == b->modules_to_not_convert);
    CHECK(fs::exists(from / "generation_config.json"));
  }
}

TEST_CASE("fpf-synth --quant: the bytes do not depend on --threads (several shards)") {
  for (const char* scheme : {"awq", "gptq-actorder", "nf4"}) {
    CAPTURE(scheme);
    const fs::path one = tmp(std::string("threads1-") + scheme), three = tmp(std::string("threads3-") + scheme);
    const std::string common = " --shape tiny-moe --seed 9 --max-shard-gb 0.00005 --quant " + std::string(scheme);
    REQUIRE(synth("--threads 1 --out " + one.string() + common) == 0);
    REQUIRE(synth("--threads 3 --out " + three.string() + common) == 0);
    const auto a = files_of(one), b = files_of(three);
    CHECK(a.size() > 4);  // config, generation config, index and several shards
    CHECK(a.count("model.safetensors.index.json") == 1);
    CHECK(a == b);
  }
}

TEST_CASE("ShardedCheckpointWriter writes what write_sharded_checkpoint writes") {
  const fs::path src = tmp("writer-src");
  REQUIRE(synth("--shape tiny-moe --seed 2 --out " + src.string()) == 0);
  const io::Checkpoint ckpt = io::Checkpoint::open(src);
  std::vector<io::TensorToWrite> t = tensors_of(ckpt);
  for (std::size_t limit : {std::size_t{20000}, std::size_t{100000}, std::size_t{1} << 30}) {
    CAPTURE(limit);
    const fs::path a = tmp("writer-a"), b = tmp("writer-b");
    io::write_sharded_checkpoint(a, t, limit);
    {
      io::ShardedCheckpointWriter w(b, limit);
      for (const io::TensorToWrite& x : t) w.add(x);
      w.finish();
    }
    CHECK(files_of(a) == files_of(b));
  }
  // Unfinished: its temporary shards are removed.
  const fs::path c = tmp("writer-c");
  {
    io::ShardedCheckpointWriter w(c, 20000);
    for (const io::TensorToWrite& x : t) w.add(x);
  }
  CHECK(fs::is_empty(c));
  io::ShardedCheckpointWriter w(c, 20000);
  w.add(t[0]);
  CHECK_THROWS_WITH_AS(w.add(t[0]), doctest::Contains("duplicate name"), Error);
}

TEST_CASE("quant::resolve_group_size: 128, else the largest common divisor below it; a request must divide") {
  using L = std::vector<std::pair<std::string, std::int64_t>>;
  CHECK(quant::resolve_group_size(L{{"a", 2048}, {"b", 768}}, std::nullopt) == 128);
  CHECK(quant::resolve_group_size(L{{"a", 64}, {"b", 32}, {"c", 128}}, std::nullopt) == 32);
  CHECK(quant::resolve_group_size(L{{"a", 32}, {"b", 16}, {"c", 64}}, std::nullopt) == 16);
  CHECK(quant::resolve_group_size(L{{"a", 192}, {"b", 384}}, std::nullopt) == 96);
  CHECK(quant::resolve_group_size(L{{"a", 64}}, std::int64_t{-1}) == -1);
  CHECK(quant::resolve_group_size(L{{"a", 64}, {"b", 32}}, std::int64_t{16}) == 16);
  CHECK_THROWS_WITH_AS(quant::resolve_group_size(L{{"a", 64}, {"m.k_proj", 48}}, std::int64_t{32}, "--group-size"),
                       "--group-size: 32 does not divide in_features 48 of m.k_proj", Error);
  CHECK_THROWS_WITH_AS(quant::resolve_group_size(L{{"a", 64}}, std::int64_t{0}, "--group-size"),
                       doctest::Contains("--group-size: must be -1"), Error);
}

TEST_CASE("fpf-synth --quant: bad arguments exit 2 with one line naming the option or file") {
  const fs::path d = tmp("bad"), dense = tmp("bad-dense"), awq = tmp("bad-awq");
  auto err = [] {
    std::string e = slurp(kStderr);
    CHECK(std::count(e.begin(), e.end(), '\n') == 1);
    return e;
  };
  CHECK(synth("--shape tiny-moe --quant int3 --out " + d.string()) == 2);
  CHECK(err().find("--quant: unknown scheme 'int3'") != std::string::npos);
  CHECK(synth("--shape tiny-moe --quant awq --group-size 48 --out " + d.string()) == 2);
  CHECK(err().find("--group-size: 48 does not divide in_features") != std::string::npos);
  CHECK_FALSE(fs::exists(d));  // checked before anything is written
  CHECK(synth("--shape tiny-dense --quant gptq --group-size 0 --out " + d.string()) == 2);
  CHECK(err().find("--group-size: must be -1") != std::string::npos);
  CHECK(synth("--shape tiny-moe --quant nf4 --group-size 64 --out " + d.string()) == 2);
  CHECK(err().find("--group-size: not used by nf4") != std::string::npos);
  CHECK(synth("--shape tiny-moe --group-size 64 --out " + d.string()) == 2);
  CHECK(err().find("--group-size: only applies with --quant") != std::string::npos);
  CHECK(synth("--quant awq --out " + d.string()) == 2);
  CHECK(err().find("--shape: required") != std::string::npos);
  // --from: no config.json, no --quant, with --shape, an already quantized checkpoint, the output is the source.
  fs::create_directories(dense);
  CHECK(synth("--from " + dense.string() + " --quant awq --out " + d.string()) == 2);
  CHECK(err().find((dense / "config.json").string() + ": missing") != std::string::npos);
  REQUIRE(synth("--shape tiny-moe --out " + dense.string() + " --force") == 0);
  CHECK(synth("--from " + dense.string() + " --out " + d.string()) == 2);
  CHECK(err().find("--from: needs --quant") != std::string::npos);
  CHECK(synth("--from " + dense.string() + " --shape tiny-moe --quant awq --out " + d.string()) == 2);
  CHECK(synth("--from " + dense.string() + " --quant awq --group-size 48 --out " + d.string()) == 2);
  CHECK(err().find("--group-size: 48 does not divide in_features") != std::string::npos);
  CHECK(synth("--from " + dense.string() + " --quant awq --out " + dense.string()) == 2);
  REQUIRE(synth("--from " + dense.string() + " --quant awq --out " + awq.string()) == 0);
  CHECK(synth("--from " + awq.string() + " --quant gptq --out " + d.string()) == 2);
  CHECK(err().find("quantization_config: present") != std::string::npos);
  CHECK(synth("--from " + dense.string() + " --quant awq --out " + awq.string()) == 2);  // not empty, no --force
  CHECK(synth("--from " + dense.string() + " --quant awq --out " + awq.string() + " --force") == 0);
}

TEST_CASE("quantize_checkpoint, now streamed shard by shard, still writes the committed sharded NF4 fixture's bytes") {
  // tests/fixtures/quant/nf4_moe_bf16_sharded was written by the unstreamed quantize_checkpoint (test_quant_parity.cpp
  // "quant fixtures: write", NF4 with 40000-byte shards); its weights and index must come out identical.
  const fs::path fixture = fs::path(FPF_SOURCE_DIR) / "tests/fixtures/quant/nf4_moe_bf16_sharded";
  const fs::path dst = tmp("nf4-fixture");
  quant::QuantizeOptions o;
  o.scheme = quant::Scheme::Nf4;
  o.max_shard_bytes = 40000;
  o.threads = 2;
  quant::quantize_checkpoint(fs::path(FPF_SOURCE_DIR) / "tests/fixtures/models/moe_bf16_sharded", dst, o);
  int shards = 0;
  for (const auto& e : fs::directory_iterator(fixture)) {
    const std::string f = e.path().filename().string();
    if (f.rfind("model-", 0) != 0 && f != "model.safetensors.index.json") continue;
    CAPTURE(f);
    shards += f.rfind("model-", 0) == 0;
    CHECK(slurp(e.path()) == slurp(dst / f));
  }
  CHECK(shards == 7);
  int written = 0;
  for (const auto& e : fs::directory_iterator(dst)) written += e.path().filename().string().rfind("model-", 0) == 0;
  CHECK(written == shards);
}
