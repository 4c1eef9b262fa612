// Quantized layouts on hand-built tensors: every expected value below is worked out by hand from the published
// formats (docs/formats.md §2-§4, §8), not taken from fpf's output. Each test writes a tiny checkpoint (config.json
// with a quantization_config + model.safetensors) and reads one module through the policy, as the model binder does.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <fpf/core/error.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/quant/awq.hpp>
#include <fpf/quant/gptq.hpp>
#include <fpf/quant/nf4.hpp>

using namespace fpf;
namespace fs = std::filesystem;

namespace {

// A checkpoint under construction: tensors with their bytes, and the quantization_config text.
struct TinyCkpt {
  fs::path dir;
  std::vector<std::vector<std::byte>> bytes;
  std::vector<io::TensorToWrite> tensors;

  explicit TinyCkpt(const std::string& name) : dir(fs::path(FPF_BINARY_DIR) / "test_quant" / name) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  template <class T>
  void add(const std::string& name, DType dtype, std::vector<std::int64_t> shape, const std::vector<T>& v) {
    std::vector<std::byte> b(v.size() * sizeof(T));
    if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
    bytes.push_back(std::move(b));
    tensors.push_back({name, dtype, std::move(shape), {}});
  }
  void i32(const std::string& n, std::vector<std::int64_t> s, const std::vector<std::uint32_t>& v) { add(n, DType::I32, s, v); }
  void u8(const std::string& n, std::vector<std::int64_t> s, const std::vector<std::uint8_t>& v) { add(n, DType::U8, s, v); }
  void f32(const std::string& n, std::vector<std::int64_t> s, const std::vector<float>& v) { add(n, DType::F32, s, v); }
  void f16(const std::string& n, std::vector<std::int64_t> s, const std::vector<float>& v) {
    std::vector<std::uint16_t> h;
    for (float x : v) h.push_back(f32_to_f16(x));
    add(n, DType::F16, s, h);
  }
  void bf16(const std::string& n, std::vector<std::int64_t> s, const std::vector<float>& v) {
    std::vector<std::uint16_t> h;
    for (float x : v) h.push_back(f32_to_bf16(x));
    add(n, DType::BF16, s, h);
  }
  void text(const std::string& n, const std::string& s) {
    add(n, DType::U8, {static_cast<std::int64_t>(s.size())}, std::vector<char>(s.begin(), s.end()));
  }

  // Writes config.json ({"quantization_config": qc}) and model.safetensors.
  void write(const std::string& quantization_config) {
    std::ofstream(dir / "config.json") << "{\"model_type\": \"qwen3\", \"quantization_config\": " << quantization_config << "}\n";
    for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].bytes = bytes[i];
    io::write_safetensors(dir / "model.safetensors", tensors);
  }
};

// Reads `module` ([out, in]) through Policy from the checkpoint, as load_weights_f32 would; dense dtype float16.
template <class Policy>
std::vector<float> read_linear(const TinyCkpt& c, const std::string& module, std::int64_t out, std::int64_t in,
                               const std::string& dense_dtype = "float16") {
  const io::Checkpoint ckpt = io::Checkpoint::open(c.dir);
  io::ModelConfig cfg;
  cfg.file = c.dir / "config.json";
  cfg.model_type = "qwen3";
  cfg.dtype = dense_dtype;
  model::WeightReader r(ckpt, cfg);
  return Policy::linear_f32(r, module, out, in);
}

template <class Policy>
std::string error_of(const TinyCkpt& c, const std::string& module, std::int64_t out, std::int64_t in) {
  try {
    read_linear<Policy>(c, module, out, in);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

const std::string kAwqG1 = R"({"quant_method": "awq", "bits": 4, "group_size": 1, "zero_point": true, "version": "gemm"})";
const std::string kAwqG2 = R"({"quant_method": "awq", "bits": 4, "group_size": 2, "zero_point": true, "version": "GEMM"})";

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// AWQ
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("quant awq: all 8 nibble slots in the interleaved order [0,2,4,6,1,3,5,7], zeros per column") {
  // K = 2 inputs, N = 8 outputs, G = 1: each input row is its own group.
  TinyCkpt c("awq_nibbles");
  // Row 0: slot i holds value i, and slot i is column ORDER[i]: columns 0..7 get q = 0,4,1,5,2,6,3,7.
  // Row 1: slot i holds 8 + i: q = 8,12,9,13,10,14,11,15.
  c.i32("m.qweight", {2, 1}, {0x76543210u, 0xFEDCBA98u});
  // Zeros row 0: all 0. Row 1: slot i holds 7 - i: columns 0..7 get z = 7,3,6,2,5,1,4,0.
  c.i32("m.qzeros", {2, 1}, {0x00000000u, 0x01234567u});
  // Row 1 scales: negative, zero and fractional values.
  c.f16("m.scales", {2, 8}, {1, 1, 1, 1, 1, 1, 1, 1, /**/ 0.5f, -0.25f, 0, 2, 1, 1, 1, -1});
  c.write(kAwqG1);
  const std::vector<float> w = read_linear<quant::Awq<4>>(c, "m", 8, 2);
  // W[n, k] = (q - z) * s, laid out [out=8, in=2]. Row 1: q - z = 1,9,3,11,5,13,7,15.
  const std::vector<float> expected{0, 0.5f,  4, -2.25f, 1, 0,  5, 22,
                                    2, 5,     6, 13,     3, 7,  7, -15};
  CHECK(w == expected);
}

TEST_CASE("quant awq: group edges (G = 2 over K = 4), negative scales") {
  TinyCkpt c("awq_groups");
  // Row k has q = k + 1 in every column; group 0 (rows 0,1): z = 0, s = 0.25; group 1 (rows 2,3): z = 8, s = -3.
  c.i32("m.qweight", {4, 1}, {0x11111111u, 0x22222222u, 0x33333333u, 0x44444444u});
  c.i32("m.qzeros", {2, 1}, {0x00000000u, 0x88888888u});
  c.f16("m.scales", {2, 8}, {0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f, -3, -3, -3, -3, -3, -3, -3, -3});
  c.write(kAwqG2);
  const std::vector<float> w = read_linear<quant::Awq<4>>(c, "m", 8, 4);
  // k = 0,1: (1 - 0) * 0.25, (2 - 0) * 0.25; k = 2,3: (3 - 8) * -3 = 15, (4 - 8) * -3 = 12.
  for (int n = 0; n < 8; ++n) {
    CAPTURE(n);
    CHECK(w[n * 4 + 0] == 0.25f);
    CHECK(w[n * 4 + 1] == 0.5f);
    CHECK(w[n * 4 + 2] == 15.0f);
    CHECK(w[n * 4 + 3] == 12.0f);
  }
}

TEST_CASE("quant awq: group_size -1 is one group over K; BF16 scales widen exactly") {
  TinyCkpt c("awq_g_minus1");
  c.i32("m.qweight", {2, 1}, {0xFFFFFFFFu, 0x00000000u});
  c.i32("m.qzeros", {1, 1}, {0x11111111u});
  // 1.0078125 = 1 + 2^-7, exact in bf16; (15 - 1) * 1.0078125 = 14.109375 and (0 - 1) * 1.0078125.
  c.bf16("m.scales", {1, 8}, std::vector<float>(8, 1.0078125f));
  c.write(R"({"quant_method": "awq", "w_bit": 4, "q_group_size": -1, "zero_point": true, "version": "gemm"})");
  const std::vector<float> w = read_linear<quant::Awq<4>>(c, "m", 8, 2);
  for (int n = 0; n < 8; ++n) {
    CHECK(w[n * 2 + 0] == 14.109375f);
    CHECK(w[n * 2 + 1] == -1.0078125f);
  }
}

TEST_CASE("quant awq: a module without qweight is dense (router, lm_head, modules_to_not_convert)") {
  TinyCkpt c("awq_dense_fallback");
  c.f16("mlp.gate.weight", {2, 3}, {1, 2, 3, -4, 0.5f, 0});
  c.write(kAwqG1);
  CHECK(read_linear<quant::Awq<4>>(c, "mlp.gate", 2, 3) == std::vector<float>{1, 2, 3, -4, 0.5f, 0});
}

// ------------------------------------------------------------------------------------------------------------
// GPTQ
// ------------------------------------------------------------------------------------------------------------
namespace {
// K = 8, N = 8, one group. Column 0: q[k] = k; column 1: q[k] = 8 + k; columns 2..7: q = 0.
// The stored zero of column j is j (qzeros word 0x76543210: nibble j = j, sequential).
TinyCkpt gptq_nibbles(const std::string& name, const std::string& format_field) {
  TinyCkpt c(name);
  c.i32("m.qweight", {1, 8}, {0x76543210u, 0xFEDCBA98u, 0, 0, 0, 0, 0, 0});
  c.i32("m.qzeros", {1, 1}, {0x76543210u});
  c.f16("m.scales", {1, 8}, std::vector<float>(8, 1.0f));
  c.i32("m.g_idx", {8}, {0, 0, 0, 0, 0, 0, 0, 0});
  c.write(R"({"quant_method": "gptq", "bits": 4, "group_size": 8, "desc_act": false, "sym": true)" + format_field + "}");
  return c;
}
}  // namespace

TEST_CASE("quant gptq: sequential nibbles along K, zeros v1 (stored + 1) vs v2 (as stored)") {
  SUBCASE("v1 (checkpoint_format gptq)") {
    const std::vector<float> w = read_linear<quant::Gptq<4>>(gptq_nibbles("gptq_v1", R"(, "checkpoint_format": "gptq")"), "m", 8, 8);
    // z_true = j + 1. Column 0: k - 1; column 1: 8 + k - 2; column j >= 2: 0 - (j + 1).
    CHECK(std::vector<float>(w.begin(), w.begin() + 8) == std::vector<float>{-1, 0, 1, 2, 3, 4, 5, 6});
    CHECK(std::vector<float>(w.begin() + 8, w.begin() + 16) == std::vector<float>{6, 7, 8, 9, 10, 11, 12, 13});
    CHECK(w[2 * 8 + 0] == -3);
    CHECK(w[7 * 8 + 5] == -8);
  }
  SUBCASE("v1 when checkpoint_format is absent") {
    const std::vector<float> w = read_linear<quant::Gptq<4>>(gptq_nibbles("gptq_v1_default", ""), "m", 8, 8);
    CHECK(w[0] == -1);
    CHECK(w[7 * 8 + 0] == -8);
  }
  SUBCASE("v2 (checkpoint_format gptq_v2)") {
    const std::vector<float> w = read_linear<quant::Gptq<4>>(gptq_nibbles("gptq_v2", R"(, "checkpoint_format": "gptq_v2")"), "m", 8, 8);
    CHECK(std::vector<float>(w.begin(), w.begin() + 8) == std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7});
    CHECK(std::vector<float>(w.begin() + 8, w.begin() + 16) == std::vector<float>{7, 8, 9, 10, 11, 12, 13, 14});
    CHECK(w[2 * 8 + 0] == -2);
    CHECK(w[7 * 8 + 5] == -7);
  }
  SUBCASE("GPTQModel's \"format\" spelling") {
    const std::vector<float> w = read_linear<quant::Gptq<4>>(gptq_nibbles("gptq_format_key", R"(, "format": "gptq_v2")"), "m", 8, 8);
    CHECK(w[0] == 0);
  }
}

TEST_CASE("quant gptq: v1 stored nibble 0xF masks then adds 1 (reads 16)") {
  TinyCkpt c("gptq_v1_f");
  c.i32("m.qweight", {1, 8}, std::vector<std::uint32_t>(8, 0u));
  c.i32("m.qzeros", {1, 1}, {0xF0000000u});  // column 7 stores 0xF, the others 0
  c.f16("m.scales", {1, 8}, std::vector<float>(8, 0.5f));
  c.i32("m.g_idx", {8}, std::vector<std::uint32_t>(8, 0u));
  c.write(R"({"quant_method": "gptq", "bits": 4, "group_size": -1, "checkpoint_format": "gptq"})");
  const std::vector<float> w = read_linear<quant::Gptq<4>>(c, "m", 8, 8);
  CHECK(w[0 * 8 + 3] == -0.5f);  // (0 - 1) * 0.5
  CHECK(w[7 * 8 + 3] == -8.0f);  // (0 - 16) * 0.5
}

TEST_CASE("quant gptq: act-order g_idx permutation picks each input channel's group") {
  // K = 16, N = 8, G = 4 -> 4 groups, each of 4 channels, scattered over K.
  TinyCkpt c("gptq_act_order");
  c.i32("m.qweight", {2, 8}, std::vector<std::uint32_t>(16, 0x88888888u));        // q = 8 everywhere
  c.i32("m.qzeros", {4, 1}, {0x00000000u, 0x11111111u, 0x22222222u, 0x33333333u});  // v2: group g has z = g
  std::vector<float> s;  // s[g, n] = g + 1 + n
  for (int g = 0; g < 4; ++g)
    for (int n = 0; n < 8; ++n) s.push_back(static_cast<float>(g + 1 + n));
  c.f16("m.scales", {4, 8}, s);
  c.i32("m.g_idx", {16}, {3, 0, 2, 1, 1, 0, 3, 2, 0, 3, 1, 2, 2, 1, 0, 3});
  c.write(R"({"quant_method": "gptq", "bits": 4, "group_size": 4, "desc_act": true, "checkpoint_format": "gptq_v2"})");
  const std::vector<float> w = read_linear<quant::Gptq<4>>(c, "m", 8, 16);
  // W[n, k] = (8 - g) * (g + 1 + n), g = g_idx[k]. Column 0 per group: 8, 14, 18, 20; column 7: 64, 63, 60, 55.
  CHECK(std::vector<float>(w.begin(), w.begin() + 16) ==
        std::vector<float>{20, 8, 18, 14, 14, 8, 20, 18, 8, 20, 14, 18, 18, 14, 8, 20});
  CHECK(std::vector<float>(w.begin() + 7 * 16, w.end()) ==
        std::vector<float>{55, 64, 60, 63, 63, 64, 55, 60, 64, 55, 63, 60, 60, 63, 64, 55});
}

TEST_CASE("quant gptq: without g_idx (desc_act false) groups are k / G; ceil(K / G) groups; BF16 scales") {
  // K = 24, G = 16: groups [0, 16) and [16, 24) (the last one partial, as AutoGPTQ allows).
  TinyCkpt c("gptq_no_g_idx");
  c.i32("m.qweight", {3, 8}, std::vector<std::uint32_t>(24, 0x99999999u));  // q = 9
  c.i32("m.qzeros", {2, 1}, {0x33333333u, 0x44444444u});                      // v1: z = 4, then 5
  std::vector<float> s(8, 0.75f);
  s.resize(16, -0.125f);
  c.bf16("m.scales", {2, 8}, s);
  c.write(R"({"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": false})");
  const std::vector<float> w = read_linear<quant::Gptq<4>>(c, "m", 8, 24);
  for (int n = 0; n < 8; ++n) {
    CHECK(w[n * 24 + 0] == 3.75f);     // (9 - 4) * 0.75
    CHECK(w[n * 24 + 15] == 3.75f);
    CHECK(w[n * 24 + 16] == -0.5f);    // (9 - 5) * -0.125
    CHECK(w[n * 24 + 23] == -0.5f);
  }
}

// ------------------------------------------------------------------------------------------------------------
// bitsandbytes NF4
// ------------------------------------------------------------------------------------------------------------
namespace {
std::vector<float> nf4_code() { return std::vector<float>(std::begin(quant::kNf4Code), std::end(quant::kNf4Code)); }
const std::string kBnb = R"({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4"})";
}  // namespace

TEST_CASE("quant nf4: high nibble first, odd element count, rounding to the quant state's dtype") {
  // Weight [1, 5]: codes 0, 15, 7, 10, 3 (+ padding nibble 7); one block, absmax 2.
  auto make = [](const std::string& name, const std::string& dtype) {
    TinyCkpt c(name);
    c.u8("m.weight", {3, 1}, {0x0F, 0x7A, 0x37});
    c.f32("m.weight.absmax", {1}, {2.0f});
    c.f32("m.weight.quant_map", {16}, nf4_code());
    c.text("m.weight.quant_state.bitsandbytes__nf4",
           R"({"quant_type": "nf4", "blocksize": 64, "dtype": ")" + dtype + R"(", "shape": [1, 5]})");
    c.write(kBnb);
    return c;
  };
  SUBCASE("float32") {
    // -1 * 2, 1 * 2, 0, 0.24611230194568634 * 2, -0.39491748809814453 * 2 (times 2 is exact)
    CHECK(read_linear<quant::Nf4>(make("nf4_order_f32", "float32"), "m", 1, 5) ==
          std::vector<float>{-2, 2, 0, 0.4922246038913727f, -0.7898349761962891f});
  }
  SUBCASE("bfloat16") {
    // 0.4922246... = 1.9688984 * 2^-2 -> 8 significant bits: 252/128 * 2^-2 = 0.4921875;
    // 0.7898349... = 1.5796699 * 2^-1 -> 202/128 * 2^-1 = 0.7890625.
    CHECK(read_linear<quant::Nf4>(make("nf4_order_bf16", "bfloat16"), "m", 1, 5) ==
          std::vector<float>{-2, 2, 0, 0.4921875f, -0.7890625f});
  }
}

TEST_CASE("quant nf4: fp16 rounding of code * absmax") {
  TinyCkpt c("nf4_f16");
  c.u8("m.weight", {1, 1}, {0xE1});  // codes 14, 1
  c.f32("m.weight.absmax", {1}, {1.0f});
  c.f32("m.weight.quant_map", {16}, nf4_code());
  c.text("m.weight.quant_state.bitsandbytes__nf4", R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2, 1]})");
  c.write(kBnb);
  // 0.7229568 = 1.4459137 * 2^-1 -> 11 significant bits: 1481/1024 * 2^-1 = 0.72314453125;
  // 0.6961928 = 1.3923856 * 2^-1 -> 1426/1024 * 2^-1 = 0.6962890625.
  CHECK(read_linear<quant::Nf4>(c, "m", 2, 1) == std::vector<float>{0.72314453125f, -0.6962890625f});
}

TEST_CASE("quant nf4: a partial last block takes its own absmax") {
  // Weight [2, 35] = 70 elements, blocksize 64: block 0 = elements 0..63, block 1 = 64..69 (row 1, columns 29..34).
  TinyCkpt c("nf4_partial_block");
  c.u8("m.weight", {35, 1}, std::vector<std::uint8_t>(35, 0xFF));  // code 15 = 1.0 everywhere
  c.f32("m.weight.absmax", {2}, {1.5f, -4.0f});
  c.f32("m.weight.quant_map", {16}, nf4_code());
  c.text("m.weight.quant_state.bitsandbytes__nf4", R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 35]})");
  c.write(kBnb);
  const std::vector<float> w = read_linear<quant::Nf4>(c, "m", 2, 35);
  CHECK(w[35 + 28] == 1.5f);   // element 63
  CHECK(w[35 + 29] == -4.0f);  // element 64
  CHECK(w[69] == -4.0f);
}

namespace {
// nested_quant_map[i] = (i - 128) / 128, exact.
std::vector<float> linear_map() {
  std::vector<float> m;
  for (int i = 0; i < 256; ++i) m.push_back(static_cast<float>(i - 128) / 128.0f);
  return m;
}
}  // namespace

TEST_CASE("quant nf4: double quantization, nested blocks (partial) and the offset") {
  // Weight [7, 10] = 70 elements, blocksize 32 -> 3 blocks; nested blocksize 2 -> nested blocks {0, 1}, {2}.
  TinyCkpt c("nf4_double_quant");
  c.u8("m.weight", {35, 1}, std::vector<std::uint8_t>(35, 0xFF));  // code 15 = 1.0
  c.u8("m.weight.absmax", {3}, {255, 0, 192});
  c.f32("m.weight.quant_map", {16}, nf4_code());
  c.f32("m.weight.nested_absmax", {2}, {2.0f, 0.5f});
  c.f32("m.weight.nested_quant_map", {256}, linear_map());
  c.text("m.weight.quant_state.bitsandbytes__nf4",
         R"({"quant_type": "nf4", "blocksize": 32, "dtype": "bfloat16", "shape": [7, 10], "nested_blocksize": 2,)"
         R"( "nested_dtype": "float32", "nested_offset": 0.5})");
  c.write(kBnb);
  const std::vector<float> w = read_linear<quant::Nf4>(c, "m", 7, 10);
  // absmax: 127/128 * 2 + 0.5 = 2.484375 (1.0011111b * 2, exact in bf16); -1 * 2 + 0.5 = -1.5; 64/128 * 0.5 + 0.5 = 0.75.
  CHECK(w[0] == 2.484375f);
  CHECK(w[31] == 2.484375f);
  CHECK(w[32] == -1.5f);
  CHECK(w[63] == -1.5f);
  CHECK(w[64] == 0.75f);
  CHECK(w[69] == 0.75f);
}

TEST_CASE("quant nf4: double-quant absmax is a multiply then an add, each rounded (not a fused multiply-add)") {
  // nested_quant_map[1] = 0.1f, nested_absmax = 3, offset = -0.3f. fp32(0.1f * 3) = 0.300000011920928955078125,
  // which is exactly 0.3f, so the absmax is 0 and so is every weight. One FMA would give 0.1f * 3 - 0.3f exactly =
  // -7.45e-9 instead.
  TinyCkpt c("nf4_two_roundings");
  c.u8("m.weight", {1, 1}, {0xFF});
  c.u8("m.weight.absmax", {1}, {1});
  c.f32("m.weight.quant_map", {16}, nf4_code());
  c.f32("m.weight.nested_absmax", {1}, {3.0f});
  std::vector<float> map(256, 0.0f);
  map[1] = 0.1f;
  c.f32("m.weight.nested_quant_map", {256}, map);
  c.text("m.weight.quant_state.bitsandbytes__nf4",
         R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [1, 2], "nested_blocksize": 256,)"
         R"( "nested_dtype": "float32", "nested_offset": -0.30000001192092896})");
  c.write(kBnb);
  CHECK(read_linear<quant::Nf4>(c, "m", 1, 2) == std::vector<float>{0.0f, 0.0f});
  CHECK(quant::nf4_absmax_from_double_quant(std::vector<std::uint8_t>{1}, std::vector<float>{3.0f}, map, 256, -0.3f)[0] == 0.0f);
}

TEST_CASE("quant nf4: a module without quant state is dense (llm_int8_skip_modules)") {
  TinyCkpt c("nf4_dense_fallback");
  c.bf16("lm_head.weight", {2, 2}, {1.5f, -2, 0.25f, 8});
  c.write(kBnb);
  const io::Checkpoint ckpt = io::Checkpoint::open(c.dir);
  CHECK(read_linear<quant::Nf4>(c, "lm_head", 2, 2, "bfloat16") == std::vector<float>{1.5f, -2, 0.25f, 8});
}

// ------------------------------------------------------------------------------------------------------------
// Bad input: fpf::Error naming the file and the field or tensor (programs exit 2 through fpf::run_main)
// ------------------------------------------------------------------------------------------------------------
namespace {
TinyCkpt awq_2x8(const std::string& name, const std::string& qc, bool with_scales = true) {
  TinyCkpt c(name);
  c.i32("m.qweight", {2, 1}, {0, 0});
  c.i32("m.qzeros", {2, 1}, {0, 0});
  if (with_scales) c.f16("m.scales", {2, 8}, std::vector<float>(16, 1.0f));
  c.write(qc);
  return c;
}
}  // namespace

TEST_CASE("quant bad input: unknown quant_method, unsupported bits/version/format, each naming file and field") {
  const std::string cfg = (fs::path(FPF_BINARY_DIR) / "test_quant" / "bad_method" / "config.json").string();
  auto err = [](const std::string& name, const std::string& qc) { return error_of<quant::Awq<4>>(awq_2x8(name, qc), "m", 8, 2); };
  const std::string e = err("bad_method", R"({"quant_method": "fp8", "bits": 4, "group_size": 1})");
  CHECK(contains(e, cfg + ": quantization_config.quant_method"));
  CHECK(contains(e, "unknown quant_method 'fp8'"));
  CHECK(contains(err("bad_bits", R"({"quant_method": "awq", "bits": 8, "group_size": 1})"), "quantization_config.bits: 8-bit"));
  CHECK(contains(err("bad_version", R"({"quant_method": "awq", "bits": 4, "group_size": 1, "version": "gemv"})"),
                 "quantization_config.version: 'gemv' is not supported"));
  CHECK(contains(err("bad_group", R"({"quant_method": "awq", "bits": 4, "group_size": 0})"), "quantization_config.group_size"));
  CHECK(contains(err("no_group", R"({"quant_method": "awq", "bits": 4})"), "quantization_config.group_size: missing"));
  CHECK(contains(error_of<quant::Gptq<4>>(gptq_nibbles("bad_format", R"(, "checkpoint_format": "marlin")"), "m", 8, 8),
                 "quantization_config.checkpoint_format: 'marlin' is not supported"));
  CHECK(contains(err("bnb_8bit", R"({"quant_method": "bitsandbytes", "load_in_8bit": true})"), "quantization_config.load_in_8bit"));
  // exit code 2 through the programs' wrapper
  CHECK(run_main("test", [&] { return read_linear<quant::Awq<4>>(awq_2x8("exit2", R"({"quant_method": "x"})"), "m", 8, 2).empty() ? 0 : 0; }) ==
        kExitBadInput);
}

TEST_CASE("quant bad input: group size not dividing K, wrong packed shapes, missing scales, wrong dtype") {
  CHECK(contains(error_of<quant::Awq<4>>(awq_2x8("awq_g_indivisible", R"({"quant_method": "awq", "bits": 4, "group_size": 3})"), "m", 8, 2),
                 "quantization_config.group_size: 3 does not divide in_features 2 of m"));
  {  // qzeros for G = 1 but config says G = 2: shape [2, 1] vs expected [1, 1]
    const std::string e = error_of<quant::Awq<4>>(awq_2x8("awq_shape", kAwqG2), "m", 8, 2);
    CHECK(contains(e, "model.safetensors: tensor 'm.qzeros'"));
    CHECK(contains(e, "shape [2, 1], expected [1, 1]"));
  }
  {  // the reader asks for N = 16: qweight [2, 1] vs [2, 2]
    const std::string e = error_of<quant::Awq<4>>(awq_2x8("awq_shape_n", kAwqG1), "m", 16, 2);
    CHECK(contains(e, "tensor 'm.qweight'"));
    CHECK(contains(e, "expected [2, 2]"));
  }
  {
    const std::string e = error_of<quant::Awq<4>>(awq_2x8("awq_no_scales", kAwqG1, false), "m", 8, 2);
    CHECK(contains(e, "tensor 'm.scales'"));
    CHECK(contains(e, "missing"));
  }
  {
    TinyCkpt c("awq_scales_i32");
    c.i32("m.qweight", {2, 1}, {0, 0});
    c.i32("m.qzeros", {2, 1}, {0, 0});
    c.i32("m.scales", {2, 8}, std::vector<std::uint32_t>(16, 0));
    c.write(kAwqG1);
    CHECK(contains(error_of<quant::Awq<4>>(c, "m", 8, 2), "tensor 'm.scales': dtype I32, expected F16 or BF16 or F32"));
  }
  {  // N not a multiple of 8
    TinyCkpt c("awq_n6");
    c.i32("m.qweight", {2, 1}, {0, 0});
    c.write(kAwqG1);
    CHECK(contains(error_of<quant::Awq<4>>(c, "m", 6, 2), "out_features 6 is not a multiple of 8"));
  }
  {  // no quantization_config at all
    TinyCkpt c("awq_no_qc");
    c.i32("m.qweight", {2, 1}, {0, 0});
    c.write("null");
    CHECK(contains(error_of<quant::Awq<4>>(c, "m", 8, 2), "config.json: quantization_config: missing"));
  }
  // the scheme of the setup against the checkpoint's
  CHECK(contains(error_of<quant::Gptq<4>>(awq_2x8("awq_read_as_gptq", kAwqG1), "m", 8, 8),
                 "quantization_config.quant_method: 'awq' checkpoint, but the setup reads gptq"));
}

TEST_CASE("quant bad input: GPTQ g_idx out of range, act-order without g_idx") {
  {
    TinyCkpt c("gptq_g_idx_range");
    c.i32("m.qweight", {1, 8}, std::vector<std::uint32_t>(8, 0));
    c.i32("m.qzeros", {2, 1}, {0, 0});
    c.f16("m.scales", {2, 8}, std::vector<float>(16, 1.0f));
    c.i32("m.g_idx", {8}, {0, 1, 0, 1, 2, 0, 0, 0});
    c.write(R"({"quant_method": "gptq", "bits": 4, "group_size": 4})");
    CHECK(contains(error_of<quant::Gptq<4>>(c, "m", 8, 8), "tensor 'm.g_idx': g_idx[4] = 2 is not a group index in [0, 2)"));
  }
  {
    TinyCkpt c("gptq_act_order_no_g_idx");
    c.i32("m.qweight", {1, 8}, std::vector<std::uint32_t>(8, 0));
    c.i32("m.qzeros", {2, 1}, {0, 0});
    c.f16("m.scales", {2, 8}, std::vector<float>(16, 1.0f));
    c.write(R"({"quant_method": "gptq", "bits": 4, "group_size": 4, "desc_act": true})");
    CHECK(contains(error_of<quant::Gptq<4>>(c, "m", 8, 8), "tensor 'm.g_idx': missing"));
  }
}

TEST_CASE("quant bad input: NF4 quant state fields, shapes, code table") {
  auto nf4 = [](const std::string& name, const std::string& state, std::vector<float> code, std::int64_t absmax_len) {
    TinyCkpt c(name);
    c.u8("m.weight", {2, 1}, {0, 0});
    c.f32("m.weight.absmax", {absmax_len}, std::vector<float>(static_cast<std::size_t>(absmax_len), 1.0f));
    c.f32("m.weight.quant_map", {16}, code);
    c.text("m.weight.quant_state.bitsandbytes__nf4", state);
    c.write(kBnb);
    return c;
  };
  const std::string ok = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 2]})";
  CHECK(read_linear<quant::Nf4>(nf4("nf4_ok", ok, nf4_code(), 1), "m", 2, 2).size() == 4);
  CHECK(contains(error_of<quant::Nf4>(nf4("nf4_shape", ok, nf4_code(), 1), "m", 4, 1),
                 "quant_state.bitsandbytes__nf4': field shape: [2, 2], expected [4, 1]"));
  CHECK(contains(error_of<quant::Nf4>(nf4("nf4_dtype", R"({"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2, 2]})", nf4_code(), 1), "m", 2, 2),
                 "field dtype: must be bfloat16, float16 or float32"));
  CHECK(contains(error_of<quant::Nf4>(nf4("nf4_no_blocksize", R"({"quant_type": "nf4", "dtype": "float32", "shape": [2, 2]})", nf4_code(), 1), "m", 2, 2),
                 "field blocksize: missing"));
  CHECK(contains(error_of<quant::Nf4>(nf4("nf4_absmax_len", ok, nf4_code(), 2), "m", 2, 2), "tensor 'm.weight.absmax'"));
  std::vector<float> fp4 = nf4_code();
  fp4[3] = 0.25f;
  CHECK(contains(error_of<quant::Nf4>(nf4("nf4_code", ok, fp4, 1), "m", 2, 2), "tensor 'm.weight.quant_map': entry 3"));
  CHECK(contains(error_of<quant::Nf4>(nf4("nf4_json", "{not json", nf4_code(), 1), "m", 2, 2), "not valid JSON"));
  {  // double quant announced, nested tensors absent
    const std::string nested = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 2], "nested_blocksize": 256, "nested_offset": 0.1})";
    CHECK(contains(error_of<quant::Nf4>(nf4("nf4_nested_missing", nested, nf4_code(), 1), "m", 2, 2),
                   "tensor 'm.weight.absmax': dtype F32, expected U8"));
  }
  {
    TinyCkpt c("nf4_u8_without_state");
    c.u8("m.weight", {2, 1}, {0, 0});
    c.write(kBnb);
    CHECK(contains(error_of<quant::Nf4>(c, "m", 2, 2), "U8 weight without its quant state"));
  }
}

TEST_CASE("quant bad input: a dense setup on a quantized module says so; GPTQ pack_dtype") {
  CHECK(contains(error_of<quant::Dense>(awq_2x8("dense_reads_awq", kAwqG1), "m", 8, 2),
                 "tensor 'm.qweight': the module is stored quantized (AWQ/GPTQ)"));
  {
    TinyCkpt c("dense_reads_nf4");
    c.u8("m.weight", {2, 1}, {0, 0});
    c.text("m.weight.quant_state.bitsandbytes__nf4", "{}");
    c.write(kBnb);
    CHECK(contains(error_of<quant::Dense>(c, "m", 2, 2), "stored quantized (bitsandbytes NF4)"));
  }
  CHECK(contains(error_of<quant::Gptq<4>>(gptq_nibbles("gptq_pack_int16", R"(, "pack_dtype": "int16")"), "m", 8, 8),
                 "quantization_config.pack_dtype: 'int16' is not supported"));
}

TEST_CASE("quant config: policy names for run-time dispatch") {
  const fs::path f = fs::path(FPF_BINARY_DIR) / "test_quant" / "config.json";
  CHECK(quant::policy_name(quant::parse_quant_config(R"({"model_type": "qwen3"})", f)) == "dense");
  CHECK(quant::policy_name(quant::parse_quant_config(R"({"quantization_config": null})", f)) == "dense");
  CHECK(quant::policy_name(quant::parse_quant_config(
            R"({"quantization_config": {"quant_method": "AWQ", "bits": 4, "group_size": 128}})", f)) == "awq");
  CHECK(quant::policy_name(quant::parse_quant_config(
            R"({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})", f)) == "gptq");
  CHECK(quant::policy_name(quant::parse_quant_config(
            R"({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true}})", f)) == "nf4");
  CHECK(quant::Awq<4>::name == "awq");
  CHECK(quant::Gptq<4>::name == "gptq");
  CHECK(quant::Nf4::name == "nf4");
}
