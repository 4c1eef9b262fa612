#pragma once
// Rotary position embedding, non-interleaved ("rotate_half"): dimension i pairs with i + head_dim/2.
// inv_freq[i] = 1 / theta^(2i/head_dim) and angle = pos * inv_freq[i] are formed in fp32 as transformers does;
// every backend uses the same fp32 table, so RoPE never separates two backends.
#include <cmath>
#include <cstdint>
#include <vector>

namespace fpf::model {

inline std::vector<float> rope_inv_freq(double theta, int head_dim) {
  std::vector<float> inv(static_cast<std::size_t>(head_dim / 2));
  for (int i = 0; i < head_dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[static_cast<std::size_t>(i)] = 1.0f / static_cast<float>(std::pow(theta, static_cast<double>(exponent)));
  }
  return inv;
}

// Rotates one head's vector x[head_dim] in place for absolute position pos.
inline void apply_rope(float* x, const std::vector<float>& inv_freq, std::int64_t pos) noexcept {
  const std::size_t half = inv_freq.size();
  for (std::size_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq[i];
    const float c = std::cos(angle), s = std::sin(angle);
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c - x2 * s;         // q * cos + rotate_half(q) * sin, first half:  rotate_half = -x2
    x[i + half] = x2 * c + x1 * s;  // second half: rotate_half = x1
  }
}

}  // namespace fpf::model
