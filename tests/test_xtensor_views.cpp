#include <doctest/doctest.h>

#include <xtensor/xmath.hpp>
#include <xtensor/xview.hpp>

#include <fpf/core/xtensor.hpp>
#include <fpf/fpf.hpp>

#include "reference_signals.hpp"

TEST_CASE("xtensor: checkpoint tensors and key vectors as arrays") {
  const auto ckpt = fpf::io::Checkpoint::open(fpf::testing::fixture_dir("moe_bf16_sharded"));
  const fpf::io::TensorInfo& t = ckpt.get("model.layers.0.self_attn.k_proj.weight");
  const xt::xarray<float> w = fpf::to_xarray(t);
  REQUIRE(w.dimension() == 2);
  CHECK(static_cast<std::int64_t>(w.shape()[0]) == t.shape[0]);
  CHECK(w(3, 5) == fpf::load_as_f32(t.bytes.data(), t.dtype, static_cast<std::size_t>(3 * t.shape[1] + 5)));

  // Keys of layer 1 viewed as [kv_heads, head_dim]: per-head norms by xtensor reductions, writes go to the signal.
  using S = fpf::Setup<fpf::quant::Dense, fpf::attn::Eager, fpf::par::Single, fpf::cpu::Backend>;
  fpf::Engine<S> engine(fpf::testing::fixture_dir("moe_bf16_sharded"));
  auto run = engine.generate({{1, 2, 3, 4}}, 1, fpf::taps::TapSpec{{1}, {-1}, 1});
  std::vector<float>& k = run[0].steps[0].key_vectors.at(1).at(-1);
  auto heads = fpf::as_heads(k, static_cast<std::size_t>(engine.config().head_dim));
  CHECK(heads.shape()[0] == static_cast<std::size_t>(engine.config().num_key_value_heads));
  const xt::xtensor<float, 1> norms = xt::sqrt(xt::sum(heads * heads, {1}));
  for (float n : norms) CHECK(n > 0.0f);
  heads(0, 0) = 42.0f;  // a view, not a copy
  CHECK(k[0] == 42.0f);
}
