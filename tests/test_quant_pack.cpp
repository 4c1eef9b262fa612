// quantize (pack.hpp) and the checkpoint rewriter (rewrite.hpp): small layouts checked against words packed by hand,
// round trips within the format's step, and a whole fixture rewritten in each scheme and read back by the binder.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <fpf/fpf.hpp>
#include <fpf/quant/awq.hpp>
#include <fpf/quant/gptq.hpp>
#include <fpf/quant/nf4.hpp>
#include <fpf/quant/pack.hpp>
#include <fpf/quant/rewrite.hpp>

using namespace fpf;
namespace fs = std::filesystem;

namespace {

// Deterministic weights with varied magnitudes: uniform in [-1, 1) times a per-row scale.
std::vector<float> weights(std::int64_t N, std::int64_t K, std::uint64_t seed) {
  std::vector<float> w(static_cast<std::size_t>(N * K));
  std::uint64_t x = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t k = 0; k < K; ++k) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const float u = static_cast<float>(x >> 40) / static_cast<float>(1ull << 24) * 2.0f - 1.0f;
      w[static_cast<std::size_t>(n * K + k)] = u * (0.01f + 0.5f * static_cast<float>(n % 5));
    }
  return w;
}

std::uint32_t u32(std::int32_t v) { return static_cast<std::uint32_t>(v); }

}  // namespace

TEST_CASE("quant pack: AWQ words packed by hand (range -5..10, scale 1, zero 5, interleaved order)") {
  // K = 4, N = 8, one group. Rows: -5, 10, n - 5 (column n), 0. lo = -5, hi = 10: s = 15 / 15 = 1, z = 5.
  std::vector<float> w(32);
  for (int n = 0; n < 8; ++n) {
    w[n * 4 + 0] = -5, w[n * 4 + 1] = 10, w[n * 4 + 2] = static_cast<float>(n - 5), w[n * 4 + 3] = 0;
  }
  const quant::AwqPacked p = quant::quantize_awq(w, 8, 4, -1);
  // q = w + 5: row 0 all 0, row 1 all 15, row 2 column n -> n, row 3 all 5. Row 2 packs column ORDER[i] into
  // slot i: nibbles 0,2,4,6,1,3,5,7 from the least significant.
  CHECK(u32(p.qweight.at(0)) == 0x00000000u);
  CHECK(u32(p.qweight.at(1)) == 0xFFFFFFFFu);
  CHECK(u32(p.qweight.at(2)) == 0x75316420u);
  CHECK(u32(p.qweight.at(3)) == 0x55555555u);
  CHECK(u32(p.qzeros.at(0)) == 0x55555555u);
  CHECK(p.scales == std::vector<float>(8, 1.0f));
}

TEST_CASE("quant pack: GPTQ symmetric words packed by hand, v1 and v2 zeros") {
  // K = 8, N = 8, one group. Column n: -7.5, then -3..3. amax 7.5: s = 2 * 7.5 / 15 = 1, z = 8.
  // q = round(w) + 8: round(-7.5) = -8 (half to even) -> 0; -3..3 -> 5..11. Sequential along K: 0xBA987650.
  std::vector<float> w(64);
  for (int n = 0; n < 8; ++n)
    for (int k = 0; k < 8; ++k) w[n * 8 + k] = k == 0 ? -7.5f : static_cast<float>(k - 4);
  const quant::GptqPacked v1 = quant::quantize_gptq(w, 8, 8, 8, false);
  for (int n = 0; n < 8; ++n) CHECK(u32(v1.qweight.at(n)) == 0xBA987650u);
  CHECK(u32(v1.qzeros.at(0)) == 0x77777777u);  // v1 stores z - 1
  CHECK(v1.g_idx == std::vector<std::int32_t>(8, 0));
  CHECK(v1.scales == std::vector<float>(8, 1.0f));
  const quant::GptqPacked v2 = quant::quantize_gptq(w, 8, 8, 8, true);
  CHECK(u32(v2.qzeros.at(0)) == 0x88888888u);
}

TEST_CASE("quant pack: GPTQ act-order g_idx from the permutation") {
  // K = 8, G = 4, channels quantized in the order 7,6,5,4,3,2,1,0: channels 7..4 form group 0, 3..0 group 1.
  const std::vector<float> w = weights(8, 8, 3);
  const std::vector<std::int64_t> perm{7, 6, 5, 4, 3, 2, 1, 0};
  const quant::GptqPacked p = quant::quantize_gptq(w, 8, 8, 4, true, DType::F16, perm);
  CHECK(p.g_idx == std::vector<std::int32_t>{1, 1, 1, 1, 0, 0, 0, 0});
  // Default permutation: by descending sum of squares over the outputs. Column 2 largest, then 0, then the rest.
  std::vector<float> v(16, 0.0f);  // N = 2, K = 8
  v[2] = 3, v[8 + 2] = 1, v[0] = 2, v[5] = 0.5f;
  CHECK(quant::act_order_permutation(v, 2, 8) == std::vector<std::int64_t>{2, 0, 5, 1, 3, 4, 6, 7});
}

TEST_CASE("quant pack: NF4 codes by hand, high nibble first, padding nibble 7") {
  // [1, 3] = 1.0, -0.5, 0.0: absmax 1; codes 15, 2 (-0.525 is nearer than -0.395), 7; pad 7.
  const quant::Nf4Packed p = quant::quantize_nf4(std::vector<float>{1.0f, -0.5f, 0.0f}, 1, 3, false, DType::F32);
  CHECK(p.weight == std::vector<std::uint8_t>{0xF2, 0x77});
  CHECK(p.absmax == std::vector<float>{1.0f});
  CHECK(p.state_json() == R"({"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[1,3]})");
}

TEST_CASE("quant pack: the signed dynamic map has bitsandbytes' shape") {
  const std::vector<float> m = quant::bnb_dynamic_map_signed();
  REQUIRE(m.size() == 256);
  CHECK(m.front() < -0.99f);
  CHECK(m.back() == 1.0f);
  CHECK(std::is_sorted(m.begin(), m.end()));
  CHECK(std::count(m.begin(), m.end(), 0.0f) == 1);
  // 127 negatives, 0 at index 127, 127 positives and 1.0. Smallest magnitude: 1e-6 * (0.1 + 1) / 2 = 5.5e-7.
  CHECK(m[127] == 0.0f);
  CHECK(std::fabs(m[126] + 5.5e-7f) < 1e-12f);
  CHECK(std::fabs(m[128] - 5.5e-7f) < 1e-12f);
}

TEST_CASE("quant pack: quantize -> dequantize round trips within half a step") {
  const std::int64_t N = 24, K = 64;
  const std::vector<float> w = weights(N, K, 7);
  SUBCASE("AWQ, F16 and BF16 scales") {
    for (DType sd : {DType::F16, DType::BF16}) {
      const quant::AwqPacked p = quant::quantize_awq(w, N, K, 16, sd);
      const std::vector<float> d = quant::dequant_awq(p.qweight, p.qzeros, p.scales, K, N, 16);
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t k = 0; k < K; ++k) {
          const float s = p.scales[static_cast<std::size_t>((k / 16) * N + n)];
          REQUIRE(std::fabs(d[n * K + k] - w[n * K + k]) <= 0.5f * s * 1.0001f);
        }
    }
  }
  SUBCASE("GPTQ v1/v2, with and without act-order, K not a multiple of G") {
    for (bool v2 : {false, true})
      for (bool act : {false, true}) {
        const std::vector<std::int64_t> perm = act ? quant::act_order_permutation(w, N, K) : std::vector<std::int64_t>{};
        const quant::GptqPacked p = quant::quantize_gptq(w, N, K, 24, v2, DType::BF16, perm);  // 3 groups, last 16 wide
        CHECK(p.groups == 3);
        const std::vector<float> d = quant::dequant_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, K, N, v2);
        for (std::int64_t n = 0; n < N; ++n)
          for (std::int64_t k = 0; k < K; ++k) {
            const float s = p.scales[static_cast<std::size_t>(p.g_idx[static_cast<std::size_t>(k)] * N + n)];
            REQUIRE(std::fabs(d[n * K + k] - w[n * K + k]) <= 0.5f * s * 1.0001f);
          }
      }
  }
  SUBCASE("NF4, plain and double quant, odd count and partial blocks") {
    const std::int64_t n2 = 7, k2 = 45;  // 315 elements: 5 blocks of 64, the last partial, odd count
    const std::vector<float> v = weights(n2, k2, 11);
    for (bool dq : {false, true}) {
      const quant::Nf4Packed p = quant::quantize_nf4(v, n2, k2, dq, DType::BF16);
      const std::vector<float> absmax =
          dq ? quant::nf4_absmax_from_double_quant(p.absmax_q, p.nested_absmax, p.nested_quant_map, 256, p.nested_offset)
             : p.absmax;
      const std::vector<float> code(std::begin(quant::kNf4Code), std::end(quant::kNf4Code));
      const std::vector<float> d = quant::dequant_nf4(p.weight, absmax, code, n2 * k2, 64, DType::BF16);
      for (std::int64_t i = 0; i < n2 * k2; ++i) {
        float true_absmax = 0;
        for (std::int64_t j = (i / 64) * 64; j < std::min(n2 * k2, (i / 64 + 1) * 64); ++j) true_absmax = std::max(true_absmax, std::fabs(v[j]));
        // Half the widest NF4 gap (1 - 0.7229568 = 0.277) of the block's absmax, plus the absmax's own error under
        // double quant, plus bf16 rounding of the result.
        const float bound = 0.1386f * true_absmax + std::fabs(absmax[i / 64] - true_absmax) + std::fabs(d[i]) * 0.004f + 1e-7f;
        REQUIRE(std::fabs(d[i] - v[i]) <= bound);
      }
    }
  }
}

namespace {
fs::path rewritten(const std::string& fixture, const std::string& tag, const quant::QuantizeOptions& o) {
  const fs::path dst = fs::path(FPF_BINARY_DIR) / "test_quant" / ("rewrite_" + fixture + "_" + tag);
  quant::quantize_checkpoint(fs::path(FPF_SOURCE_DIR) / "tests/fixtures/models" / fixture, dst, o);
  return dst;
}

template <class Quant>
model::WeightsF32 load(const fs::path& dir) {
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  const io::ModelConfig cfg = io::load_config(dir);
  return model::load_weights_f32<Quant>(ckpt, cfg);
}

// Largest |a - b| / max|b| over a Linear.
double rel_max_err(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0, e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(b[i])));
    e = std::max(e, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return e / m;
}
}  // namespace

TEST_CASE("quant rewrite: a fixture in each scheme loads through its policy, close to the dense weights") {
  const std::string fixture = "moe_sparse_step";  // dense and MoE layers, router, untied lm_head, fp32
  const model::WeightsF32 dense = load<quant::Dense>(fs::path(FPF_SOURCE_DIR) / "tests/fixtures/models" / fixture);
  auto check = [&](const model::WeightsF32& q, double tol, bool router_quantized) {
    CHECK(q.embed == dense.embed);
    CHECK(q.lm_head == dense.lm_head);  // lm_head is never quantized
    for (std::size_t l = 0; l < dense.layers.size(); ++l) {
      CAPTURE(l);
      const auto& a = q.layers[l];
      const auto& b = dense.layers[l];
      CHECK(a.input_norm == b.input_norm);
      using P = std::pair<const model::LinearF32*, const model::LinearF32*>;
      for (auto [x, y] : std::initializer_list<P>{{&a.q, &b.q}, {&a.k, &b.k}, {&a.v, &b.v}, {&a.o, &b.o}}) {
        CHECK(x->w != y->w);
        CHECK(rel_max_err(x->w, y->w) < tol);
      }
      if (b.moe) {
        CHECK((a.router.w == b.router.w) == !router_quantized);
        for (std::size_t e = 0; e < b.experts.size(); ++e) CHECK(rel_max_err(a.experts[e].down.w, b.experts[e].down.w) < tol);
      } else {
        CHECK(rel_max_err(a.mlp.up.w, b.mlp.up.w) < tol);
      }
    }
  };
  // 4 bits over groups of 8: a step is at most range / 15 of the group, so under 2 * max|w| / 15 of the matrix.
  quant::QuantizeOptions o;
  o.group_size = 8;
  SUBCASE("awq") {
    o.scheme = quant::Scheme::Awq;
    const fs::path dir = rewritten(fixture, "awq", o);
    check(load<quant::Awq<4>>(dir), 0.07, false);
    const auto qc = quant::load_quant_config(dir);
    REQUIRE(qc);
    CHECK(qc->method == quant::Method::Awq);
    CHECK(qc->group_size == 8);
    CHECK(qc->modules_to_not_convert == std::vector<std::string>{"lm_head", "model.layers.1.mlp.gate"});
  }
  SUBCASE("gptq v1, act-order, sharded") {
    o.scheme = quant::Scheme::GptqActOrder;
    o.max_shard_bytes = 40000;
    const fs::path dir = rewritten(fixture, "gptq_actorder", o);
    CHECK(fs::exists(dir / "model.safetensors.index.json"));
    check(load<quant::Gptq<4>>(dir), 0.07, false);
    const auto qc = quant::load_quant_config(dir);
    CHECK(qc->desc_act);
    CHECK(!qc->zeros_v2);
  }
  SUBCASE("gptq v2") {
    o.scheme = quant::Scheme::Gptq;
    o.gptq_v2 = true;
    check(load<quant::Gptq<4>>(rewritten(fixture, "gptq_v2", o)), 0.07, false);
  }
  SUBCASE("nf4 with double quant (router quantized too)") {
    o.scheme = quant::Scheme::Nf4;
    check(load<quant::Nf4>(rewritten(fixture, "nf4", o)), 0.15, true);
  }
  SUBCASE("a group size that does not divide an in_features names the tensor") {
    o.scheme = quant::Scheme::Awq;
    o.group_size = 16;  // expert down_proj has in_features 24
    try {
      rewritten(fixture, "awq_g16", o);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("down_proj.weight") != std::string::npos);
      CHECK(std::string(e.what()).find("does not divide in_features 24") != std::string::npos);
    }
  }
}

TEST_CASE("quant rewrite: the engine on a quantized checkpoint equals the engine on its dequantized weights") {
  // The binder end to end: Engine<Awq/Gptq/Nf4> on the quantized files against Engine<Dense> on a dense checkpoint
  // holding the same dequantized fp32 weights must be bit-identical (same ops on the same numbers).
  const std::string fixture = "moe_sparse_step";
  quant::QuantizeOptions o;
  o.group_size = 8;
  o.scheme = quant::Scheme::Nf4;
  const fs::path qdir = rewritten(fixture, "nf4_engine", o);
  const model::WeightsF32 w = load<quant::Nf4>(qdir);

  // Dense copy: every Linear replaced by its dequantized fp32 weight.
  const fs::path ddir = fs::path(FPF_BINARY_DIR) / "test_quant" / "rewrite_nf4_engine_dense";
  fs::create_directories(ddir);
  fs::copy_file(fs::path(FPF_SOURCE_DIR) / "tests/fixtures/models" / fixture / "config.json", ddir / "config.json",
                fs::copy_options::overwrite_existing);
  const io::Checkpoint src = io::Checkpoint::open(fs::path(FPF_SOURCE_DIR) / "tests/fixtures/models" / fixture);
  std::vector<io::TensorToWrite> out;
  std::vector<std::vector<float>> keep;
  auto put = [&](const std::string& name, const model::LinearF32& lin) {
    keep.push_back(lin.w);
    out.push_back({name, DType::F32, {lin.out, lin.in}, std::as_bytes(std::span<const float>(keep.back()))});
  };
  keep.reserve(1000);
  for (std::size_t l = 0; l < w.layers.size(); ++l) {
    const auto& L = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l);
    put(p + ".self_attn.q_proj.weight", L.q), put(p + ".self_attn.k_proj.weight", L.k);
    put(p + ".self_attn.v_proj.weight", L.v), put(p + ".self_attn.o_proj.weight", L.o);
    if (L.moe) {
      put(p + ".mlp.gate.weight", L.router);
      for (std::size_t e = 0; e < L.experts.size(); ++e) {
        const std::string x = p + ".mlp.experts." + std::to_string(e);
        put(x + ".gate_proj.weight", L.experts[e].gate), put(x + ".up_proj.weight", L.experts[e].up);
        put(x + ".down_proj.weight", L.experts[e].down);
      }
    } else {
      put(p + ".mlp.gate_proj.weight", L.mlp.gate), put(p + ".mlp.up_proj.weight", L.mlp.up);
      put(p + ".mlp.down_proj.weight", L.mlp.down);
    }
  }
  for (const std::string& n : src.names())
    if (n.find("_proj.weight") == std::string::npos && n.find("mlp.gate.weight") == std::string::npos) {
      const io::TensorInfo& t = src.get(n);
      out.push_back({n, t.dtype, t.shape, t.bytes});
    }
  io::write_safetensors(ddir / "model.safetensors", out);

  using Q = Setup<quant::Nf4, attn::Eager, par::Single, cpu::Backend>;
  using D = Setup<quant::Dense, attn::Eager, par::Single, cpu::Backend>;
  taps::TapSpec spec;
  spec.layers = {1, 2, 5};
  spec.positions = {-2, -1};
  const std::vector<std::int32_t> prompt{3, 17, 42, 99, 5, 250, 7, 1};
  Engine<Q> eq(qdir);
  Engine<D> ed(ddir);
  const auto a = eq.generate({prompt}, 4, spec).at(0);
  const auto b = ed.generate({prompt}, 4, spec).at(0);
  REQUIRE(a.steps.size() == b.steps.size());
  for (std::size_t s = 0; s < a.steps.size(); ++s) {
    CHECK(a.steps[s].token_id == b.steps[s].token_id);
    CHECK(a.steps[s].hidden_states == b.steps[s].hidden_states);
    CHECK(a.steps[s].key_vectors == b.steps[s].key_vectors);
  }
}

TEST_CASE("quant pack: nearest NF4 code at the midpoints (ties to the lower code)") {
  // Midpoint of codes 7 (0.0) and 8 (0.07958029955625534) is 0.03979015.
  CHECK(quant::nearest_nf4(0.0397f) == 7);
  CHECK(quant::nearest_nf4(0.0399f) == 8);
  CHECK(quant::nearest_nf4(0.0f) == 7);
  CHECK(quant::nearest_nf4(-1.5f) == 0);
  CHECK(quant::nearest_nf4(2.0f) == 15);
  CHECK(quant::nearest_nf4(-0.5f) == 2);  // -0.525 is nearer than -0.395
  CHECK(quant::nearest_nf4(0.86f) == 14);  // midpoint of 0.7229568 and 1.0 is 0.8614784
  CHECK(quant::nearest_nf4(0.8615f) == 15);
}

TEST_CASE("quant rewrite: quantize_tensors on in-memory tensors splits fused experts per expert") {
  // transformers-5 fused experts of one layer: gate_up_proj [E = 2, 2I = 16, H = 8] (gate rows first), down_proj
  // [2, 8, 8]; a router and a norm pass through (AWQ keeps the router dense).
  const std::vector<float> gu = weights(2 * 16, 8, 21), down = weights(2 * 8, 8, 22), gate = weights(2, 8, 23);
  const std::vector<float> norm(8, 1.0f);
  auto tw = [](const char* name, std::vector<std::int64_t> shape, const std::vector<float>& v) {
    return io::TensorToWrite{name, DType::F32, std::move(shape), std::as_bytes(std::span<const float>(v))};
  };
  const std::vector<io::TensorToWrite> dense{
      tw("model.layers.0.mlp.experts.gate_up_proj", {2, 16, 8}, gu), tw("model.layers.0.mlp.experts.down_proj", {2, 8, 8}, down),
      tw("model.layers.0.mlp.gate.weight", {2, 8}, gate), tw("model.layers.0.input_layernorm.weight", {8}, norm)};
  quant::QuantizeOptions o;
  o.scheme = quant::Scheme::Awq;
  o.group_size = 8;
  const quant::QuantizedTensors q = quant::quantize_tensors(dense, DType::F32, false, o);
  std::vector<std::string> names;
  for (const io::TensorToWrite& t : q.tensors()) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  std::vector<std::string> want{"model.layers.0.input_layernorm.weight", "model.layers.0.mlp.gate.weight"};
  for (const char* e : {"0", "1"})
    for (const char* p : {"down_proj", "gate_proj", "up_proj"})
      for (const char* t : {"qweight", "qzeros", "scales"})
        want.push_back(std::string("model.layers.0.mlp.experts.") + e + "." + p + "." + t);
  std::sort(want.begin(), want.end());
  CHECK(names == want);
  CHECK(q.skip == std::vector<std::string>{"lm_head", "model.layers.0.mlp.gate"});
  // The worker count changes nothing: same tensors, same order, same bytes with 1 and 3 threads.
  for (unsigned threads : {1u, 3u}) {
    quant::QuantizeOptions ot = o;
    ot.threads = threads;
    const quant::QuantizedTensors r = quant::quantize_tensors(dense, DType::F32, false, ot);
    REQUIRE(r.tensors().size() == q.tensors().size());
    for (std::size_t i = 0; i < r.tensors().size(); ++i) {
      CHECK(r.tensors()[i].name == q.tensors()[i].name);
      CHECK(std::equal(r.tensors()[i].bytes.begin(), r.tensors()[i].bytes.end(), q.tensors()[i].bytes.begin(),
                       q.tensors()[i].bytes.end()));
    }
  }
  // Expert 1's up_proj is rows 8..15 of its [16, 8] slice: dequantized within half a step of those rows.
  for (const io::TensorToWrite& t : q.tensors())
    if (t.name == "model.layers.0.mlp.experts.1.up_proj.qweight") {
      auto find = [&](const std::string& n) -> const io::TensorToWrite& {
        for (const io::TensorToWrite& x : q.tensors())
          if (x.name == n) return x;
        throw std::runtime_error(n);
      };
      auto i32 = [](const io::TensorToWrite& x) {
        std::vector<std::int32_t> v(x.bytes.size() / 4);
        std::memcpy(v.data(), x.bytes.data(), x.bytes.size());
        return v;
      };
      const io::TensorToWrite& sc = find("model.layers.0.mlp.experts.1.up_proj.scales");
      std::vector<float> s(8);
      for (std::size_t i = 0; i < 8; ++i) s[i] = load_as_f32(sc.bytes.data(), sc.dtype, i);
      const std::vector<float> d =
          quant::dequant_awq(i32(t), i32(find("model.layers.0.mlp.experts.1.up_proj.qzeros")), s, 8, 8, 8);
      for (std::size_t n = 0; n < 8; ++n)
        for (std::size_t k = 0; k < 8; ++k)
          CHECK(std::fabs(d[n * 8 + k] - gu[(16 + 8 + n) * 8 + k]) <= 0.5f * s[n] * 1.0001f);
    }
}
