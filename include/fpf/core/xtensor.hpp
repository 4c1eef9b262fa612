#pragma once
// xtensor views of fpf's data, for researchers who want array maths (slicing, norms, reductions) on weights and
// signals in C++. Kept out of fpf.hpp: include it where you use it (xtensor is a heavy include).
#include <cstddef>
#include <vector>

#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>

#include <fpf/core/dtype.hpp>
#include <fpf/io/safetensors.hpp>

namespace fpf {

// A checkpoint tensor as an fp32 array of its shape (float and integer dtypes widened by value; copies).
inline xt::xarray<float> to_xarray(const io::TensorInfo& t) {
  std::vector<std::size_t> shape(t.shape.begin(), t.shape.end());
  xt::xarray<float> a = xt::xarray<float>::from_shape(shape);
  for (std::size_t i = 0; i < a.size(); ++i) a.flat(i) = load_as_f32(t.bytes.data(), t.dtype, i);
  return a;
}

// A signal vector (hidden state, key vector) viewed in place as a 1-D array; with heads, as [heads, head_dim].
inline auto as_xtensor(std::vector<float>& v) { return xt::adapt(v, {v.size()}); }
inline auto as_heads(std::vector<float>& v, std::size_t head_dim) {
  return xt::adapt(v, std::vector<std::size_t>{v.size() / head_dim, head_dim});
}

}  // namespace fpf
