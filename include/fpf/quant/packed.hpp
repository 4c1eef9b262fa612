#pragma once
// quant::Packed4: one device-friendly form for every 4-bit scheme, what the CUDA kernels read.
//
// The three file layouts pack along different axes (AWQ: 8 output columns per int32 in an interleaved order; GPTQ:
// 8 input channels per int32, groups through g_idx; NF4: the flattened [out, in] weight, two codes per byte, high
// nibble first). A GEMV wants each output row's codes contiguous along K, so at load time every scheme is repacked
// into one layout, as exllama and Marlin repack GPTQ:
//
//   words  u32 [N, K/8]   nibble i (bits 4i..4i+3) of words[n, c] is the code at stored position k' = 8c + i
//   perm   i32 [K]        optional (GPTQ act-order): stored position k' holds input channel perm[k'], chosen so that
//                         the groups become contiguous: group(k') = k' / G
//   Affine (AWQ, GPTQ):   w = (q - zero[n, g]) * scale[n, g]            g = k' / G, ng = ceil(K / G) groups per row
//                         q - zero is an exact small integer, scale is the file's scale widened exactly to fp32:
//                         one rounding, the CPU reference's formula
//   Nf4:                  w = round_to(nf4_dtype, code[q] * absmax[b])  b = (n * K + k') / G over the flattened weight
//                         (bitsandbytes blocks run across rows); absmax already resolved from double quantization
//
// Repacking only moves codes and widens scales; dequantize(packed) is bit-identical to the policy's linear_f32
// (tests/test_quant_packed.cpp checks it on every fixture module). The codes of a module are produced by the
// policy's `packer`, which does all checks and tensor lookups at once (WeightReader is not thread-safe) and returns
// a closure doing the pure repacking work, so a loader can run the closures of many modules on worker threads.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>

namespace fpf::quant {

struct Packed4 {
  enum class Code : int { Affine = 0, Nf4 = 1 };
  Code code = Code::Affine;
  DType nf4_dtype = DType::F32;  // Nf4: the quant state's dtype each weight is rounded to
  std::int64_t N = 0, K = 0, G = 0;
  std::vector<std::uint32_t> words;  // [N, K/8]
  std::vector<float> scales;         // Affine: [N, ceil(K/G)]; Nf4: [ceil(N*K/G)]
  std::vector<std::uint8_t> zeros;   // Affine: [N, ceil(K/G)]; Nf4: empty
  std::vector<std::int32_t> perm;    // empty (identity) or [K]

  std::int64_t groups_per_row() const { return (K + G - 1) / G; }
  std::int64_t scale_count() const { return code == Code::Affine ? N * groups_per_row() : (N * K + G - 1) / G; }

  int nibble(std::int64_t n, std::int64_t kk) const {
    return static_cast<int>((words[static_cast<std::size_t>(n * (K / 8) + kk / 8)] >> (4 * (kk % 8))) & 0xFu);
  }
};

// A packer: checks done, tensors located; calling it does the repacking (pure, thread-safe).
using Packer = std::function<Packed4()>;

// bitsandbytes get_4bit_type("nf4"), index 0..15 (formats.md §4.2).
inline constexpr float kNf4Code[16] = {-1.0f,
                                       -0.6961928009986877f,
                                       -0.5250730514526367f,
                                       -0.39491748809814453f,
                                       -0.28444138169288635f,
                                       -0.18477343022823334f,
                                       -0.09105003625154495f,
                                       0.0f,
                                       0.07958029955625534f,
                                       0.16093020141124725f,
                                       0.24611230194568634f,
                                       0.33791524171829224f,
                                       0.44070982933044434f,
                                       0.5626170039176941f,
                                       0.7229568362236023f,
                                       1.0f};

// fp32 value rounded to dtype (round to nearest even) and widened back: what storing in that dtype keeps.
inline float round_to_dtype(float x, DType dtype) noexcept {
  switch (dtype) {
    case DType::BF16: return bf16_to_f32(f32_to_bf16(x));
    case DType::F16: return f16_to_f32(f32_to_f16(x));
    default: return x;
  }
}

// The packed weight as fp32 [N, K] in the module's own input order (undoing perm): the CUDA kernels' values.
inline std::vector<float> dequantize(const Packed4& p) {
  std::vector<float> w(static_cast<std::size_t>(p.N * p.K));
  const std::int64_t ng = p.groups_per_row();
  for (std::int64_t n = 0; n < p.N; ++n)
    for (std::int64_t kk = 0; kk < p.K; ++kk) {
      const int q = p.nibble(n, kk);
      float v;
      if (p.code == Packed4::Code::Affine) {
        const std::size_t g = static_cast<std::size_t>(n * ng + kk / p.G);
        v = static_cast<float>(q - static_cast<int>(p.zeros[g])) * p.scales[g];
      } else {
        v = round_to_dtype(kNf4Code[q] * p.scales[static_cast<std::size_t>((n * p.K + kk) / p.G)], p.nf4_dtype);
      }
      const std::int64_t k = p.perm.empty() ? kk : p.perm[static_cast<std::size_t>(kk)];
      w[static_cast<std::size_t>(n * p.K + k)] = v;
    }
  return w;
}

// Rows of several modules with the same input (q/k/v, gate/up) as one Packed4, when their codes can share one
// kernel launch: same K, code, group size and permutation, and (Nf4) blocks that do not cross a module boundary.
inline bool can_concat(const std::vector<const Packed4*>& parts) {
  if (parts.empty()) return false;
  const Packed4& a = *parts.front();
  for (const Packed4* p : parts) {
    if (p->K != a.K || p->code != a.code || p->G != a.G || p->perm != a.perm || p->nf4_dtype != a.nf4_dtype) return false;
    if (p->code == Packed4::Code::Nf4 && (p->N * p->K) % p->G != 0) return false;
  }
  return true;
}

inline Packed4 concat_rows(const std::vector<const Packed4*>& parts) {
  if (!can_concat(parts)) throw Error("quant::concat_rows", "modules with different packing cannot share rows");
  Packed4 out = *parts.front();
  for (std::size_t i = 1; i < parts.size(); ++i) {
    const Packed4& p = *parts[i];
    out.N += p.N;
    out.words.insert(out.words.end(), p.words.begin(), p.words.end());
    out.scales.insert(out.scales.end(), p.scales.begin(), p.scales.end());
    out.zeros.insert(out.zeros.end(), p.zeros.begin(), p.zeros.end());
  }
  return out;
}

// Stable order of input channels by group, and whether it makes the groups contiguous runs of G (k' / G): true for
// every g_idx GPTQ writes (desc_act or not). Returns an empty perm when g_idx is already k / G.
inline bool group_permutation(const std::vector<std::int32_t>& g_idx, std::int64_t G, std::vector<std::int32_t>& perm) {
  const std::int64_t K = static_cast<std::int64_t>(g_idx.size());
  bool identity = true;
  for (std::int64_t k = 0; k < K && identity; ++k) identity = g_idx[static_cast<std::size_t>(k)] == k / G;
  perm.clear();
  if (identity) return true;
  std::int32_t groups = 0;
  for (std::int32_t g : g_idx) groups = std::max(groups, g + 1);
  std::vector<std::int64_t> start(static_cast<std::size_t>(groups) + 1, 0);
  for (std::int32_t g : g_idx) ++start[static_cast<std::size_t>(g) + 1];
  for (std::int32_t g = 0; g < groups; ++g) start[static_cast<std::size_t>(g) + 1] += start[static_cast<std::size_t>(g)];
  perm.resize(static_cast<std::size_t>(K));
  std::vector<std::int64_t> fill(start.begin(), start.end() - 1);
  for (std::int64_t k = 0; k < K; ++k) perm[static_cast<std::size_t>(fill[static_cast<std::size_t>(g_idx[static_cast<std::size_t>(k)])]++)] = static_cast<std::int32_t>(k);
  for (std::int64_t kk = 0; kk < K; ++kk)
    if (g_idx[static_cast<std::size_t>(perm[static_cast<std::size_t>(kk)])] != kk / G) return false;
  return true;
}

}  // namespace fpf::quant
