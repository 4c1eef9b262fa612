// quant::Packed4 (the GPU form of every 4-bit scheme): repacking only moves codes and widens scales, so the packed
// weights dequantize bit for bit to the independent PyTorch dequantization of each fixture (and so to the policy's
// linear_f32), act-order permutation included; plus hand-built cases for the permutation and row concatenation.
#include <doctest/doctest.h>

#include <bit>
#include <filesystem>
#include <string>
#include <vector>

#include <fpf/fpf.hpp>
#include <fpf/quant/awq.hpp>
#include <fpf/quant/gptq.hpp>
#include <fpf/quant/nf4.hpp>
#include <fpf/quant/packed.hpp>

#include "reference_signals.hpp"

using namespace fpf;
namespace fs = std::filesystem;

namespace {

template <class Quant>
void check_packed(const std::string& name, bool expect_perm) {
  const fs::path dir = fs::path(FPF_SOURCE_DIR) / "tests/fixtures/quant" / name;
  REQUIRE(fs::exists(dir / "dequant.safetensors"));
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  const io::ModelConfig cfg = io::load_config(dir);
  const io::Checkpoint ref = io::Checkpoint::open(dir / "dequant.safetensors");
  model::WeightReader r(ckpt, cfg);
  int compared = 0, permuted = 0;
  for (const std::string& t : ref.names()) {
    const io::TensorInfo& info = ref.get(t);
    const std::string module = t.substr(0, t.size() - std::string(".weight").size());
    if (!Quant::quantized(r, module)) continue;
    const quant::Packer packer = Quant::packer(r, module, info.shape[0], info.shape[1]);
    const quant::Packed4 p = packer();
    REQUIRE(p.N == info.shape[0]);
    REQUIRE(p.K == info.shape[1]);
    REQUIRE(p.words.size() == static_cast<std::size_t>(p.N * p.K / 8));
    REQUIRE(p.scales.size() == static_cast<std::size_t>(p.scale_count()));
    permuted += !p.perm.empty();
    const std::vector<float> got = quant::dequantize(p);
    const std::vector<float> want = model::WeightReader::widen(info, 0, static_cast<std::size_t>(info.numel()));
    const std::size_t differ = testing::bit_differences(got, want);
    CAPTURE(module);
    CHECK(differ == 0);
    ++compared;
  }
  CHECK(compared > 0);
  CHECK((permuted > 0) == expect_perm);
  MESSAGE(name << ": " << compared << " packed modules bit-identical to PyTorch (" << permuted << " permuted)");
}

}  // namespace

TEST_CASE("packed: every fixture module dequantizes bit for bit to the PyTorch reference") {
  check_packed<quant::Awq<4>>("awq_moe_sparse_step", false);
  check_packed<quant::Gptq<4>>("gptq_actorder_moe_sparse_step", true);
  check_packed<quant::Gptq<4>>("gptq_v2_moe_no_norm", false);
  check_packed<quant::Nf4>("nf4_moe_bf16_sharded", false);
  check_packed<quant::Awq<4>>("synth_awq_tiny_moe", false);
  check_packed<quant::Gptq<4>>("synth_gptq_tiny_moe", false);
  check_packed<quant::Gptq<4>>("synth_gptq_actorder_tiny_moe", true);
  check_packed<quant::Nf4>("synth_nf4_tiny_moe", false);
}

TEST_CASE("packed: group permutation") {
  std::vector<std::int32_t> perm;
  // k / G: identity, no permutation stored.
  CHECK(quant::group_permutation({0, 0, 1, 1, 2}, 2, perm));
  CHECK(perm.empty());
  // Act-order: channels of group 0 are 3 and 1, of group 1 are 0 and 4, of group 2 is 2 (partial last group).
  CHECK(quant::group_permutation({1, 0, 2, 0, 1}, 2, perm));
  CHECK(perm == std::vector<std::int32_t>{1, 3, 0, 4, 2});
  // Groups of unequal sizes cannot be runs of G.
  CHECK_FALSE(quant::group_permutation({0, 0, 0, 1, 1, 1}, 2, perm));
}

TEST_CASE("packed: rows of modules sharing an input concatenate when their packing agrees") {
  quant::Packed4 a, b;
  a.N = 2, a.K = 8, a.G = 8, a.words = {0x76543210u, 0xFEDCBA98u}, a.scales = {1.0f, 0.5f}, a.zeros = {8, 0};
  b.N = 1, b.K = 8, b.G = 8, b.words = {0x11111111u}, b.scales = {-2.0f}, b.zeros = {1};
  const quant::Packed4 c = quant::concat_rows({&a, &b});
  CHECK(c.N == 3);
  const std::vector<float> w = quant::dequantize(c);
  // Row 0: (k - 8) * 1; row 1: (8 + k) * 0.5; row 2: (1 - 1) * -2 = 0 (a zero times a negative scale: -0).
  for (int k = 0; k < 8; ++k) {
    CHECK(w[static_cast<std::size_t>(k)] == static_cast<float>(k - 8));
    CHECK(w[static_cast<std::size_t>(8 + k)] == static_cast<float>(8 + k) * 0.5f);
    CHECK(w[static_cast<std::size_t>(16 + k)] == 0.0f);
  }
  b.perm = {7, 6, 5, 4, 3, 2, 1, 0};
  CHECK_FALSE(quant::can_concat({&a, &b}));
  CHECK_THROWS_AS(quant::concat_rows({&a, &b}), Error);
}
