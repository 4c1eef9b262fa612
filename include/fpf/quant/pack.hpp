#pragma once
// Round-to-nearest quantization of a dense fp32 weight [N = out, K = in] into each scheme's stored layout (the
// inverse of awq.hpp / gptq.hpp / nf4.hpp), for fpf-synth and the tests. No calibration: one scale (and zero) per
// group from the group's range, which is all the issue asks ("round-to-nearest per group is enough").
//
// Choices that differ from the original tools, and why:
// - AWQ: the range always includes 0 (GPTQ's quantizer does this; AutoAWQ's does not). Otherwise a group of
//   same-signed weights gets a clamped zero and errors far beyond one step.
// - AWQ/GPTQ: the scale is rounded UP to the stored dtype, and q is computed with that stored scale, so every weight
//   dequantizes within half a step of its value (a scale rounded down could push the group's extreme out of 0..15).
// - GPTQ: symmetric (sym: true, zero 8, as Qwen's GPTQ-Int4 and AutoGPTQ's default), so v1 never has to store a
//   zero of -1 (formats.md §8). Act-order uses a given permutation; the default orders input channels by the sum of
//   squares of their weights, descending (a stand-in for the Hessian diagonal that calibration would provide).
// - NF4: as bitsandbytes' quantize_4bit (absmax per block of 64 over the valid elements, nearest code, ties to the
//   lower index, odd counts padded with code 7) and, for double quantization, offset = mean(absmax) and 8-bit
//   blockwise quantization of absmax - offset with the signed dynamic map in blocks of 256.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/quant/awq.hpp>
#include <fpf/quant/gptq.hpp>
#include <fpf/quant/nf4.hpp>

namespace fpf::quant {

namespace detail {

// The smallest value of dtype that is >= x (x > 0 finite). fp32 passes through.
inline float round_up_to_dtype(float x, DType dtype) {
  const float r = round_to_dtype(x, dtype);
  if (r >= x) return r;
  if (dtype == DType::BF16) return bf16_to_f32(static_cast<std::uint16_t>(f32_to_bf16(r) + 1));
  if (dtype == DType::F16) return f16_to_f32(static_cast<std::uint16_t>(f32_to_f16(r) + 1));
  return r;
}

inline void check_dense(std::span<const float> w, std::int64_t N, std::int64_t K, const char* what) {
  if (N < 1 || K < 1 || static_cast<std::int64_t>(w.size()) != N * K)
    throw Error(what, "weight of " + std::to_string(w.size()) + " values is not [" + std::to_string(N) + ", " +
                          std::to_string(K) + "]");
}

inline bool is_scale_dtype(DType d) { return d == DType::F16 || d == DType::BF16 || d == DType::F32; }

inline int round_clamp_q(float x) {  // torch.round: half to even (the default rounding mode)
  const float r = std::nearbyint(x);
  return static_cast<int>(std::clamp(r, 0.0f, 15.0f));
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------------
// AWQ GEMM
// ---------------------------------------------------------------------------------------------------------------
struct AwqPacked {
  std::int64_t K = 0, N = 0, G = 0;
  std::vector<std::int32_t> qweight;  // [K, N/8]
  std::vector<std::int32_t> qzeros;   // [K/G, N/8]
  std::vector<float> scales;          // [K/G, N], values exactly representable in scale_dtype
  DType scale_dtype = DType::F16;
};

// w: [N, K] row-major fp32. G = -1: one group over K.
inline AwqPacked quantize_awq(std::span<const float> w, std::int64_t N, std::int64_t K, std::int64_t G,
                              DType scale_dtype = DType::F16) {
  detail::check_dense(w, N, K, "quantize_awq");
  if (G == -1) G = K;
  if (G < 1 || K % G != 0)
    throw Error("quantize_awq", "group size " + std::to_string(G) + " does not divide in_features " + std::to_string(K));
  if (N % 8 != 0) throw Error("quantize_awq", "out_features " + std::to_string(N) + " is not a multiple of 8");
  if (!detail::is_scale_dtype(scale_dtype)) throw Error("quantize_awq", "scale dtype must be F16, BF16 or F32");
  AwqPacked p{K, N, G, {}, {}, {}, scale_dtype};
  const std::int64_t ng = K / G, P = N / 8;
  p.scales.assign(static_cast<std::size_t>(ng * N), 0.0f);
  std::vector<int> zeros(static_cast<std::size_t>(ng * N));
  std::vector<int> q(static_cast<std::size_t>(K * N));  // [K, N]
  for (std::int64_t g = 0; g < ng; ++g)
    for (std::int64_t n = 0; n < N; ++n) {
      float lo = 0.0f, hi = 0.0f;
      for (std::int64_t k = g * G; k < (g + 1) * G; ++k) {
        lo = std::min(lo, w[static_cast<std::size_t>(n * K + k)]);
        hi = std::max(hi, w[static_cast<std::size_t>(n * K + k)]);
      }
      const float s = detail::round_up_to_dtype(std::max((hi - lo) / 15.0f, 1e-5f), scale_dtype);
      const int z = detail::round_clamp_q(-lo / s);
      p.scales[static_cast<std::size_t>(g * N + n)] = s;
      zeros[static_cast<std::size_t>(g * N + n)] = z;
      for (std::int64_t k = g * G; k < (g + 1) * G; ++k)
        q[static_cast<std::size_t>(k * N + n)] = detail::round_clamp_q(std::nearbyint(w[static_cast<std::size_t>(n * K + k)] / s) + static_cast<float>(z));
    }
  // Pack 8 columns per word: logical column 8c + kAwqOrder[i] goes to nibble slot i.
  auto pack_row = [&](const std::vector<int>& v, std::int64_t row, std::int64_t c) {
    std::uint32_t word = 0;
    for (int i = 0; i < 8; ++i)
      word |= static_cast<std::uint32_t>(v[static_cast<std::size_t>(row * N + 8 * c + kAwqOrder[i])]) << (4 * i);
    return std::bit_cast<std::int32_t>(word);
  };
  for (std::int64_t k = 0; k < K; ++k)
    for (std::int64_t c = 0; c < P; ++c) p.qweight.push_back(pack_row(q, k, c));
  for (std::int64_t g = 0; g < ng; ++g)
    for (std::int64_t c = 0; c < P; ++c) p.qzeros.push_back(pack_row(zeros, g, c));
  return p;
}

// ---------------------------------------------------------------------------------------------------------------
// GPTQ (symmetric)
// ---------------------------------------------------------------------------------------------------------------
struct GptqPacked {
  std::int64_t K = 0, N = 0, G = 0, groups = 0;
  std::vector<std::int32_t> qweight;  // [K/8, N]
  std::vector<std::int32_t> qzeros;   // [groups, N/8]
  std::vector<float> scales;          // [groups, N]
  std::vector<std::int32_t> g_idx;    // [K]
  DType scale_dtype = DType::F16;
  bool zeros_v2 = false;
};

// The default act-order permutation: input channels by descending sum of squared weights, ties to the lower index.
inline std::vector<std::int64_t> act_order_permutation(std::span<const float> w, std::int64_t N, std::int64_t K) {
  std::vector<double> energy(static_cast<std::size_t>(K), 0.0);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t k = 0; k < K; ++k) {
      const double x = w[static_cast<std::size_t>(n * K + k)];
      energy[static_cast<std::size_t>(k)] += x * x;
    }
  std::vector<std::int64_t> perm(static_cast<std::size_t>(K));
  std::iota(perm.begin(), perm.end(), std::int64_t{0});
  std::stable_sort(perm.begin(), perm.end(), [&](std::int64_t a, std::int64_t b) {
    return energy[static_cast<std::size_t>(a)] > energy[static_cast<std::size_t>(b)];
  });
  return perm;
}

// w: [N, K]. perm empty: no act-order (g_idx[k] = k / G); else perm[i] = the input channel quantized i-th, and the
// groups are consecutive runs of G in that order. ceil(K / G) groups (the last may be partial, as AutoGPTQ allows).
inline GptqPacked quantize_gptq(std::span<const float> w, std::int64_t N, std::int64_t K, std::int64_t G,
                                bool zeros_v2, DType scale_dtype = DType::F16, std::span<const std::int64_t> perm = {}) {
  detail::check_dense(w, N, K, "quantize_gptq");
  if (G == -1) G = K;
  if (G < 1) throw Error("quantize_gptq", "group size must be -1 or positive, got " + std::to_string(G));
  if (K % 8 != 0 || N % 8 != 0)
    throw Error("quantize_gptq", "in_features " + std::to_string(K) + " and out_features " + std::to_string(N) +
                                     " must be multiples of 8");
  if (!detail::is_scale_dtype(scale_dtype)) throw Error("quantize_gptq", "scale dtype must be F16, BF16 or F32");
  std::vector<std::int64_t> order(static_cast<std::size_t>(K));
  if (perm.empty()) {
    std::iota(order.begin(), order.end(), std::int64_t{0});
  } else {
    if (static_cast<std::int64_t>(perm.size()) != K) throw Error("quantize_gptq", "permutation length differs from K");
    order.assign(perm.begin(), perm.end());
    std::vector<std::int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    for (std::int64_t k = 0; k < K; ++k)
      if (sorted[static_cast<std::size_t>(k)] != k) throw Error("quantize_gptq", "not a permutation of 0..K-1");
  }
  const std::int64_t ng = (K + G - 1) / G;
  GptqPacked p{K, N, G, ng, {}, {}, {}, std::vector<std::int32_t>(static_cast<std::size_t>(K)), scale_dtype, zeros_v2};
  for (std::int64_t i = 0; i < K; ++i) p.g_idx[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = static_cast<std::int32_t>(i / G);
  p.scales.assign(static_cast<std::size_t>(ng * N), 0.0f);
  std::vector<int> q(static_cast<std::size_t>(K * N));  // [K, N]
  for (std::int64_t g = 0; g < ng; ++g)
    for (std::int64_t n = 0; n < N; ++n) {
      float amax = 0.0f;
      for (std::int64_t i = g * G; i < std::min(K, (g + 1) * G); ++i)
        amax = std::max(amax, std::fabs(w[static_cast<std::size_t>(n * K + order[static_cast<std::size_t>(i)])]));
      // AutoGPTQ: an all-zero group gets the range [-1, 1].
      const float s = detail::round_up_to_dtype(amax == 0.0f ? 2.0f / 15.0f : 2.0f * amax / 15.0f, scale_dtype);
      p.scales[static_cast<std::size_t>(g * N + n)] = s;
      for (std::int64_t i = g * G; i < std::min(K, (g + 1) * G); ++i) {
        const std::int64_t k = order[static_cast<std::size_t>(i)];
        q[static_cast<std::size_t>(k * N + n)] = detail::round_clamp_q(std::nearbyint(w[static_cast<std::size_t>(n * K + k)] / s) + 8.0f);
      }
    }
  for (std::int64_t r = 0; r < K / 8; ++r)
    for (std::int64_t n = 0; n < N; ++n) {
      std::uint32_t word = 0;
      for (int j = 0; j < 8; ++j) word |= static_cast<std::uint32_t>(q[static_cast<std::size_t>((8 * r + j) * N + n)]) << (4 * j);
      p.qweight.push_back(std::bit_cast<std::int32_t>(word));
    }
  // Symmetric: z = 8 everywhere; v1 stores z - 1 = 7 in every nibble.
  const std::uint32_t zword = zeros_v2 ? 0x88888888u : 0x77777777u;
  p.qzeros.assign(static_cast<std::size_t>(ng * (N / 8)), std::bit_cast<std::int32_t>(zword));
  return p;
}

// ---------------------------------------------------------------------------------------------------------------
// bitsandbytes NF4
// ---------------------------------------------------------------------------------------------------------------

// bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): the 256-entry code of 8-bit
// blockwise quantization, used for the nested absmax. Computed in fp32 as torch does (linspace, means, scale);
// the loader reads whatever map the file stores, so a last-bit difference from bitsandbytes' own table would not
// affect reading.
inline std::vector<float> bnb_dynamic_map_signed() {
  std::vector<float> data;
  const int max_exponent_bits = 7, non_sign_bits = 7;
  for (int i = 0; i < max_exponent_bits; ++i) {
    const int items = (1 << (i + non_sign_bits - max_exponent_bits)) + 1;
    std::vector<float> b(static_cast<std::size_t>(items));
    const float start = 0.1f, end = 1.0f, step = (end - start) / static_cast<float>(items - 1);
    for (int j = 0; j < items; ++j)  // torch.linspace: from the start for the first half, from the end after
      b[static_cast<std::size_t>(j)] = j < items / 2 ? start + step * static_cast<float>(j)
                                                     : end - step * static_cast<float>(items - j - 1);
    const float scale = static_cast<float>(std::pow(10.0, -(max_exponent_bits - 1) + i));
    for (int j = 0; j + 1 < items; ++j) {
      const float mean = (b[static_cast<std::size_t>(j)] + b[static_cast<std::size_t>(j) + 1]) / 2.0f;
      data.push_back(scale * mean);
      data.push_back(-(scale * mean));
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  return data;  // 2 * (1 + 2 + ... + 64) + 2 = 256 entries
}

// Index of the code value nearest to x (ties to the lower index). code is sorted ascending.
inline int nearest_code(std::span<const float> code, float x) {
  int best = 0;
  float best_d = std::fabs(x - code[0]);
  for (int i = 1; i < static_cast<int>(code.size()); ++i) {
    const float d = std::fabs(x - code[static_cast<std::size_t>(i)]);
    if (d < best_d) best = i, best_d = d;
  }
  return best;
}

// The NF4 code nearest to x (ties to the lower index) by comparing with the midpoints between neighbours: 15
// comparisons instead of 16 distances (fpf-synth quantizes ~30e9 weights for the real shape).
inline int nearest_nf4(float x) {
  static const auto mids = [] {
    std::array<float, 15> m{};
    for (int i = 0; i < 15; ++i) m[static_cast<std::size_t>(i)] = (kNf4Code[i] + kNf4Code[i + 1]) / 2.0f;
    return m;
  }();
  int c = 0;
  for (float m : mids) c += x > m;  // x exactly on a midpoint stays with the lower code
  return c;
}

struct Nf4Packed {
  std::int64_t N = 0, K = 0, blocksize = 64;
  DType dtype = DType::F32;             // the quant state's dtype: dequantized weights are rounded to it
  std::vector<std::uint8_t> weight;     // [(n+1)/2, 1]
  std::vector<float> absmax;            // [nb] fp32 (without double quant)
  bool nested = false;
  std::vector<std::uint8_t> absmax_q;   // [nb] (double quant)
  std::vector<float> nested_absmax;     // [ceil(nb / nested_blocksize)]
  std::vector<float> nested_quant_map;  // [256]
  std::int64_t nested_blocksize = 256;
  float nested_offset = 0.0f;

  // The quant_state.bitsandbytes__nf4 JSON, with the fields bitsandbytes' QuantState.as_dict(packed=True) writes.
  std::string state_json() const {
    boost::json::object o;
    o["quant_type"] = "nf4";
    o["blocksize"] = blocksize;
    o["dtype"] = dtype == DType::BF16 ? "bfloat16" : dtype == DType::F16 ? "float16" : "float32";
    o["shape"] = boost::json::array{N, K};
    if (nested) {
      o["nested_blocksize"] = nested_blocksize;
      o["nested_dtype"] = "float32";
      o["nested_offset"] = static_cast<double>(nested_offset);
    }
    return boost::json::serialize(o);
  }
};

// w: [N, K] row-major, flattened.
inline Nf4Packed quantize_nf4(std::span<const float> w, std::int64_t N, std::int64_t K, bool double_quant,
                              DType dtype, std::int64_t blocksize = 64) {
  detail::check_dense(w, N, K, "quantize_nf4");
  if (blocksize < 1) throw Error("quantize_nf4", "blocksize must be positive");
  Nf4Packed p;
  p.N = N, p.K = K, p.blocksize = blocksize, p.dtype = dtype, p.nested = double_quant;
  const std::int64_t n = N * K, nb = (n + blocksize - 1) / blocksize;
  p.absmax.assign(static_cast<std::size_t>(nb), 0.0f);
  p.weight.assign(static_cast<std::size_t>((n + 1) / 2), 0x77);  // the padding nibble of an odd count is 7 (0.0)
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::int64_t lo = b * blocksize, hi = std::min(n, lo + blocksize);
    float amax = 0.0f;
    for (std::int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(w[static_cast<std::size_t>(i)]));
    p.absmax[static_cast<std::size_t>(b)] = amax;
    for (std::int64_t i = lo; i < hi; ++i) {
      const int c = amax == 0.0f ? 7 : nearest_nf4(w[static_cast<std::size_t>(i)] / amax);
      std::uint8_t& byte = p.weight[static_cast<std::size_t>(i / 2)];
      byte = (i % 2 == 0) ? static_cast<std::uint8_t>((byte & 0x0F) | (c << 4)) : static_cast<std::uint8_t>((byte & 0xF0) | c);
    }
  }
  if (double_quant) {
    double sum = 0.0;
    for (float a : p.absmax) sum += a;
    p.nested_offset = static_cast<float>(sum / static_cast<double>(nb));
    p.nested_quant_map = bnb_dynamic_map_signed();
    const std::int64_t nnb = (nb + p.nested_blocksize - 1) / p.nested_blocksize;
    p.nested_absmax.assign(static_cast<std::size_t>(nnb), 0.0f);
    p.absmax_q.assign(static_cast<std::size_t>(nb), 0);
    for (std::int64_t j = 0; j < nnb; ++j) {
      const std::int64_t lo = j * p.nested_blocksize, hi = std::min(nb, lo + p.nested_blocksize);
      float amax = 0.0f;
      for (std::int64_t b = lo; b < hi; ++b) amax = std::max(amax, std::fabs(p.absmax[static_cast<std::size_t>(b)] - p.nested_offset));
      p.nested_absmax[static_cast<std::size_t>(j)] = amax;
      for (std::int64_t b = lo; b < hi; ++b) {
        const float x = amax == 0.0f ? 0.0f : (p.absmax[static_cast<std::size_t>(b)] - p.nested_offset) / amax;
        p.absmax_q[static_cast<std::size_t>(b)] = static_cast<std::uint8_t>(nearest_code(p.nested_quant_map, x));
      }
    }
    p.absmax.clear();
  }
  return p;
}

}  // namespace fpf::quant
