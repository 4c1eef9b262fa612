#pragma once
// The CPU reference ops, fp32 throughout. Each op has one fixed summation order that does not depend on how many
// rows or sequences are processed together, so a sequence's numbers never depend on its batch neighbours.
// These are the ops every other backend is tested against.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace fpf::cpu {

// dot(a, b) with 8 interleaved fp32 partial sums combined pairwise: a fixed order that the compiler can vectorize
// without -ffast-math.
inline float dot(const float* a, const float* b, std::size_t n) noexcept {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// y[o] = sum_i W[o, i] x[i]; W row-major [out, in] (PyTorch's Linear layout).
inline void matvec(const float* W, const float* x, float* y, std::size_t out, std::size_t in) noexcept {
  for (std::size_t o = 0; o < out; ++o) y[o] = dot(W + o * in, x, in);
}

// RMSNorm as Hugging Face computes it in fp32: x * rsqrt(mean(x^2) + eps) * weight. The mean of squares is
// accumulated in double so the result is the correctly rounded fp32 mean for every realistic width.
inline void rmsnorm(const float* x, const float* weight, float* y, std::size_t n, float eps) noexcept {
  double ss = 0.0;
  for (std::size_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float mean = static_cast<float>(ss / static_cast<double>(n));
  const float inv = 1.0f / std::sqrt(mean + eps);
  for (std::size_t i = 0; i < n; ++i) y[i] = weight[i] * (x[i] * inv);
}

inline float silu(float x) noexcept { return x / (1.0f + std::exp(-x)); }

// In-place softmax over n values (max-subtracted, fp32 sums in index order).
inline void softmax(float* x, std::size_t n) noexcept {
  const float m = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (std::size_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
  for (std::size_t i = 0; i < n; ++i) x[i] /= sum;
}

// Index of the largest value; ties go to the lowest index (DESIGN.md "Signals": greedy decoding).
inline std::int32_t argmax(std::span<const float> x) noexcept {
  return static_cast<std::int32_t>(std::max_element(x.begin(), x.end()) - x.begin());  // first maximum
}

// The k largest values' indices, sorted by value descending, ties to the lower index.
inline std::vector<std::int32_t> topk_indices(std::span<const float> x, std::size_t k) {
  std::vector<std::int32_t> idx(x.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<std::int32_t>(i);
  k = std::min(k, idx.size());
  std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(),
                    [&](std::int32_t a, std::int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  idx.resize(k);
  return idx;
}

// log_softmax over the whole vector: (x - max) - log(sum exp(x - max)), the sum taken in double.
inline void log_softmax(std::span<const float> x, std::span<float> out) noexcept {
  const float m = *std::max_element(x.begin(), x.end());
  double sum = 0.0;
  for (float v : x) sum += std::exp(static_cast<double>(v - m));
  const float logsum = static_cast<float>(std::log(sum));
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = (x[i] - m) - logsum;
}

}  // namespace fpf::cpu
