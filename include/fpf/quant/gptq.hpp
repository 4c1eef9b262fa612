#pragma once
// quant::Gptq: the AutoGPTQ / GPTQModel layout (docs/formats.md §3), with and without act-order, both zero-point
// conventions.
//
// Per quantized Linear with K = in_features (K % 8 == 0), N = out_features (N % 8 == 0), group size G,
// ng = ceil(K / G) groups (G = -1: one group):
//   <module>.qweight  I32 [K/8, N]    packs along K, sequentially: nibble j of qweight[r, n] is q[8r + j, n]
//   <module>.qzeros   I32 [ng, N/8]   packs along N, sequentially: nibble j of qzeros[g, c] is the zero of column 8c + j
//   <module>.scales   F16/BF16/F32 [ng, N]  (the dtype of the weights that were quantized, formats.md §8)
//   <module>.g_idx    I32 [K]         group of input channel k; non-monotone with act-order (desc_act). Absent in
//                                     some old checkpoints: then only desc_act false is readable, with g_idx = k / G.
// Zero points: checkpoint_format "gptq" (v1, the default) stores z - 1, so z = stored + 1; "gptq_v2" stores z.
// v1 unpacking masks the nibble, then adds 1 (AutoGPTQ's qlinear_cuda torch path): a stored nibble 0xF reads 16.
// (A true zero of 0 cannot be stored in v1: packing -1 sets all higher nibbles of its word; formats.md §8.)
// Dequantization in fp32: W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n], one rounding; returned [out, in].
// The zero point and act-order are read from the checkpoint at load time, not from the type (docs/quantization.md).
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fpf/quant/common.hpp>
#include <fpf/quant/config.hpp>
#include <fpf/quant/dense.hpp>
#include <fpf/quant/packed.hpp>

namespace fpf::quant {

constexpr int gptq_nibble(std::int32_t word, int j) noexcept {
  return static_cast<int>((static_cast<std::uint32_t>(word) >> (4 * j)) & 0xFu);
}

// qweight [K/8, N], qzeros [ng, N/8], scales [ng, N] (fp32), g_idx [K] (each in [0, ng)) -> W [N, K] row-major.
inline std::vector<float> dequant_gptq(std::span<const std::int32_t> qweight, std::span<const std::int32_t> qzeros,
                                       std::span<const float> scales, std::span<const std::int32_t> g_idx,
                                       std::int64_t K, std::int64_t N, bool zeros_v2) {
  const std::int64_t P = N / 8;
  const int zero_offset = zeros_v2 ? 0 : 1;
  std::vector<float> w(static_cast<std::size_t>(N * K));
  for (std::int64_t k = 0; k < K; ++k) {
    const std::int64_t g = g_idx[static_cast<std::size_t>(k)];
    for (std::int64_t n = 0; n < N; ++n) {
      const int q = gptq_nibble(qweight[static_cast<std::size_t>((k / 8) * N + n)], static_cast<int>(k % 8));
      const int z = gptq_nibble(qzeros[static_cast<std::size_t>(g * P + n / 8)], static_cast<int>(n % 8)) + zero_offset;
      w[static_cast<std::size_t>(n * K + k)] = static_cast<float>(q - z) * scales[static_cast<std::size_t>(g * N + n)];
    }
  }
  return w;
}

template <int Bits = 4>
struct Gptq {
  static_assert(Bits == 4, "fpf reads 4-bit GPTQ checkpoints");
  static constexpr std::string_view name = "gptq";
  static constexpr int bits = Bits;

  static bool quantized(const model::WeightReader& r, const std::string& module) { return r.has(module + ".qweight"); }

  static bool stores(const model::WeightReader& r, const std::string& module) {
    return quantized(r, module) || Dense::stores(r, module);
  }

  // The checked tensors of one quantized module (g_idx read, or k / G when the file has none).
  struct Source {
    const io::TensorInfo *qweight, *qzeros, *scales;
    std::vector<std::int32_t> g_idx;
    std::int64_t K, N, G, ng;
    bool zeros_v2;
  };

  static Source source(model::WeightReader& r, const std::string& module, std::int64_t out, std::int64_t in) {
    const QuantConfig& qc = detail::config_for(r, Method::Gptq);
    const std::int64_t K = in, N = out, G = qc.group_for(K);
    const std::int64_t ng = (K + G - 1) / G;
    using detail::i64s;
    const std::string qweight = module + ".qweight";
    if (K % 8 != 0 || N % 8 != 0)
      throw Error(detail::tensor_where(r.checkpoint().get(qweight)),
                  "in_features " + i64s(K) + " and out_features " + i64s(N) +
                      " must be multiples of 8 (GPTQ packs 8 values per int32)");
    const std::string why =
        "GPTQ module " + module + ": in_features " + i64s(K) + ", out_features " + i64s(N) + ", group size " + i64s(G);
    const io::TensorInfo& qw = detail::need(r, qweight, {K / 8, N}, {DType::I32}, why);
    const io::TensorInfo& qz = detail::need(r, module + ".qzeros", {ng, N / 8}, {DType::I32}, why);
    const io::TensorInfo& sc = detail::need(r, module + ".scales", {ng, N}, {DType::F16, DType::BF16, DType::F32}, why);

    std::vector<std::int32_t> g_idx;
    const std::string g_name = module + ".g_idx";
    if (r.has(g_name)) {
      const io::TensorInfo& gi = detail::need(r, g_name, {K}, {DType::I32}, why);
      g_idx = detail::read_i32(gi);
      for (std::size_t k = 0; k < g_idx.size(); ++k)
        if (g_idx[k] < 0 || g_idx[k] >= ng)
          throw Error(detail::tensor_where(gi), "g_idx[" + std::to_string(k) + "] = " + std::to_string(g_idx[k]) +
                                                    " is not a group index in [0, " + i64s(ng) + ")");
    } else {
      if (qc.desc_act)
        throw Error(r.checkpoint().dir().string() + ": tensor '" + g_name + "'",
                    "missing (" + qc.where("desc_act") + " is true: act-order needs g_idx)");
      g_idx.resize(static_cast<std::size_t>(K));
      for (std::int64_t k = 0; k < K; ++k) g_idx[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k / G);
    }
    return {&qw, &qz, &sc, std::move(g_idx), K, N, G, ng, qc.zeros_v2};
  }

  static std::vector<float> linear_f32(model::WeightReader& r, const std::string& module, std::int64_t out,
                                       std::int64_t in) {
    if (!quantized(r, module)) return Dense::linear_f32(r, module, out, in);
    const Source s = source(r, module, out, in);
    return dequant_gptq(detail::read_i32(*s.qweight), detail::read_i32(*s.qzeros), detail::read_f32(*s.scales), s.g_idx,
                        s.K, s.N, s.zeros_v2);
  }

  // Repacked for the GPU (packed.hpp): codes [N, K/8] (qweight transposed), with act-order the input channels
  // stably sorted by group (perm), zeros with the v1 offset applied, scales widened. Needs G % 8 == 0 and groups
  // that are contiguous runs of G after sorting (what GPTQ writes).
  static Packer packer(model::WeightReader& r, const std::string& module, std::int64_t out, std::int64_t in) {
    Source s = source(r, module, out, in);
    std::vector<std::int32_t> perm;
    if (s.G % 8 != 0)
      throw Error(detail::tensor_where(*s.qweight), "the GPU kernels need the group size to be a multiple of 8 (got " +
                                                        detail::i64s(s.G) + ")");
    if (!group_permutation(s.g_idx, s.G, perm))
      throw Error(detail::tensor_where(*s.qweight), "g_idx groups are not runs of group_size " + detail::i64s(s.G) +
                                                        " in any order: not supported by the GPU kernels");
    return [s = std::move(s), perm = std::move(perm)] {
      const std::int64_t K = s.K, N = s.N, W = K / 8, ng = s.ng, P = N / 8;
      const std::byte* qw = s.qweight->bytes.data();
      const std::byte* qz = s.qzeros->bytes.data();
      using detail::u32_at;
      Packed4 p;
      p.code = Packed4::Code::Affine;
      p.N = N, p.K = K, p.G = s.G;
      p.perm = perm;
      p.words.assign(static_cast<std::size_t>(N * W), 0u);
      if (perm.empty()) {
        for (std::int64_t w = 0; w < W; ++w)
          for (std::int64_t n = 0; n < N; ++n) p.words[static_cast<std::size_t>(n * W + w)] = u32_at(qw, w * N + n);
      } else {
        for (std::int64_t kk = 0; kk < K; ++kk) {
          const std::int64_t k = perm[static_cast<std::size_t>(kk)];
          for (std::int64_t n = 0; n < N; ++n)
            p.words[static_cast<std::size_t>(n * W + kk / 8)] |=
                static_cast<std::uint32_t>(gptq_nibble(static_cast<std::int32_t>(u32_at(qw, (k / 8) * N + n)), static_cast<int>(k % 8)))
                << (4 * (kk % 8));
        }
      }
      const std::vector<float> sc = detail::read_f32(*s.scales);  // [ng, N]
      const int zero_offset = s.zeros_v2 ? 0 : 1;
      p.scales.resize(static_cast<std::size_t>(N * ng));
      p.zeros.resize(static_cast<std::size_t>(N * ng));
      for (std::int64_t g = 0; g < ng; ++g)
        for (std::int64_t n = 0; n < N; ++n) {
          p.scales[static_cast<std::size_t>(n * ng + g)] = sc[static_cast<std::size_t>(g * N + n)];
          p.zeros[static_cast<std::size_t>(n * ng + g)] = static_cast<std::uint8_t>(
              gptq_nibble(static_cast<std::int32_t>(u32_at(qz, g * P + n / 8)), static_cast<int>(n % 8)) + zero_offset);
        }
      return p;
    };
  }
};

}  // namespace fpf::quant
