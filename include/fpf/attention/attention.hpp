#pragma once
// Attention policies. Both compute softmax(q k^T * scale) v for one query token against the n cached keys it may
// see (causal: its own position and all earlier ones), for every query head; query head h reads KV head
// h / (num_heads / num_kv_heads) (GQA, Hugging Face's repeat_kv). They differ only in the order of operations:
//   attn::Eager  materializes all n scores, softmax in fp32, then P.V        (HF "eager")
//   attn::Flash  walks the keys in tiles of Bc with an online softmax          (FlashAttention-2's algorithm)
// so they agree to fp32 rounding but not bit for bit: that difference is what experiment 4 measures.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <string_view>
#include <vector>

#include <fpf/backend/cpu/ops.hpp>

namespace fpf::attn {

// One query token's view of a KV cache: keys/values are row-major [n, num_kv_heads * head_dim].
struct CpuArgs {
  const float* q;      // [num_heads * head_dim]
  const float* keys;   // [n, num_kv_heads * head_dim]
  const float* values; // [n, num_kv_heads * head_dim]
  int n;               // keys visible to this query
  int num_heads, num_kv_heads, head_dim;
  float scale;         // head_dim^-0.5
  float* out;          // [num_heads * head_dim]
};

struct Eager {
  static constexpr std::string_view name = "eager";

  static void cpu(const CpuArgs& a) {
    const int group = a.num_heads / a.num_kv_heads;
    const int kv_stride = a.num_kv_heads * a.head_dim;
    std::vector<float> p(static_cast<std::size_t>(a.n));
    for (int h = 0; h < a.num_heads; ++h) {
      const float* q = a.q + h * a.head_dim;
      const int kvh = h / group;
      for (int j = 0; j < a.n; ++j)
        p[j] = cpu::dot(q, a.keys + static_cast<std::size_t>(j) * kv_stride + kvh * a.head_dim, a.head_dim) * a.scale;
      cpu::softmax(p.data(), p.size());
      float* o = a.out + h * a.head_dim;
      std::fill(o, o + a.head_dim, 0.0f);
      for (int j = 0; j < a.n; ++j) {
        const float* v = a.values + static_cast<std::size_t>(j) * kv_stride + kvh * a.head_dim;
        for (int d = 0; d < a.head_dim; ++d) o[d] += p[j] * v[d];
      }
    }
  }
};

template <int Bc = 16>
struct Flash {
  static_assert(Bc > 0);
  static constexpr std::string_view name = "flash";
  static constexpr int block_keys = Bc;

  static void cpu(const CpuArgs& a) {
    const int group = a.num_heads / a.num_kv_heads;
    const int kv_stride = a.num_kv_heads * a.head_dim;
    float s[Bc];
    for (int h = 0; h < a.num_heads; ++h) {
      const float* q = a.q + h * a.head_dim;
      const int kvh = h / group;
      float* acc = a.out + h * a.head_dim;  // unnormalized output, rescaled whenever the running max grows
      std::fill(acc, acc + a.head_dim, 0.0f);
      float m = -INFINITY, l = 0.0f;
      for (int j0 = 0; j0 < a.n; j0 += Bc) {
        const int nb = std::min(Bc, a.n - j0);
        float tile_max = -INFINITY;
        for (int j = 0; j < nb; ++j) {
          s[j] = cpu::dot(q, a.keys + static_cast<std::size_t>(j0 + j) * kv_stride + kvh * a.head_dim, a.head_dim) *
                 a.scale;
          tile_max = std::max(tile_max, s[j]);
        }
        const float m_new = std::max(m, tile_max);
        const float correction = std::exp(m - m_new);  // exp(-inf) = 0 on the first tile
        l *= correction;
        for (int d = 0; d < a.head_dim; ++d) acc[d] *= correction;
        for (int j = 0; j < nb; ++j) {
          const float pj = std::exp(s[j] - m_new);
          l += pj;
          const float* v = a.values + static_cast<std::size_t>(j0 + j) * kv_stride + kvh * a.head_dim;
          for (int d = 0; d < a.head_dim; ++d) acc[d] += pj * v[d];
        }
        m = m_new;
      }
      const float inv_l = 1.0f / l;
      for (int d = 0; d < a.head_dim; ++d) acc[d] *= inv_l;
    }
  }
};

// What the engine needs of an attention policy. Backends add their own kernels beside cpu().
template <class A>
concept AttentionKernel = requires(const CpuArgs& args) {
  { A::name } -> std::convertible_to<std::string_view>;
  { A::cpu(args) };
};

}  // namespace fpf::attn
