#pragma once
// quant::Awq: AutoAWQ's GEMM layout (docs/formats.md §2), as AutoAWQ and transformers' AWQ integration save it.
//
// Per quantized Linear with K = in_features, N = out_features, group size G (K % G == 0, N % 8 == 0):
//   <module>.qweight  I32 [K, N/8]     8 output columns per int32, in AWQ's interleaved nibble order
//   <module>.qzeros   I32 [K/G, N/8]   same packing; zeros stored as is (no GPTQ-v1 off-by-one)
//   <module>.scales   F16 [K/G, N]     (BF16/F32 accepted: the fp32 formula below is the same for any float dtype)
// Nibble slot i (bits 4i..4i+3) of packed column c holds logical column 8c + kAwqOrder[i]; so column 8c + j sits in
// slot kAwqReverseOrder[j].
// Dequantization in fp32: W[n, k] = (q[k, n] - z[k/G, n]) * s[k/G, n], q - z an exact small integer, s widened
// exactly, one rounding in the product. The result is returned transposed to PyTorch's [out, in].
// A module without `qweight` (router, lm_head, modules_to_not_convert) is read as dense.
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

inline constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};         // slot i -> column offset
inline constexpr int kAwqReverseOrder[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // column offset j -> slot

// The 4-bit value of logical column offset j (0..7) in an AWQ-packed word.
constexpr int awq_nibble(std::int32_t word, int j) noexcept {
  return static_cast<int>((static_cast<std::uint32_t>(word) >> (4 * kAwqReverseOrder[j])) & 0xFu);
}

// qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N] (widened to fp32) -> W [N, K] row-major.
inline std::vector<float> dequant_awq(std::span<const std::int32_t> qweight, std::span<const std::int32_t> qzeros,
                                      std::span<const float> scales, std::int64_t K, std::int64_t N, std::int64_t G) {
  const std::int64_t P = N / 8;
  std::vector<float> w(static_cast<std::size_t>(N * K));
  for (std::int64_t k = 0; k < K; ++k) {
    const std::int64_t g = k / G;
    for (std::int64_t c = 0; c < P; ++c) {
      const std::int32_t qword = qweight[static_cast<std::size_t>(k * P + c)];
      const std::int32_t zword = qzeros[static_cast<std::size_t>(g * P + c)];
      for (int j = 0; j < 8; ++j) {
        const std::int64_t n = 8 * c + j;
        const int q_minus_z = awq_nibble(qword, j) - awq_nibble(zword, j);
        w[static_cast<std::size_t>(n * K + k)] = static_cast<float>(q_minus_z) * scales[static_cast<std::size_t>(g * N + n)];
      }
    }
  }
  return w;
}

// Bits is a template parameter because it changes the packing arithmetic (only 4 exists in AWQ GEMM checkpoints);
// the group size is read from quantization_config at load time: it is a property of the file, not of the
// experiment, and making it a type would mean dispatching on a value read from disk (docs/quantization.md).
template <int Bits = 4>
struct Awq {
  static_assert(Bits == 4, "AWQ GEMM checkpoints are 4-bit");
  static constexpr std::string_view name = "awq";
  static constexpr int bits = Bits;

  static bool quantized(const model::WeightReader& r, const std::string& module) { return r.has(module + ".qweight"); }

  static bool stores(const model::WeightReader& r, const std::string& module) {
    return quantized(r, module) || Dense::stores(r, module);
  }

  // The checked tensors of one quantized module.
  struct Source {
    const io::TensorInfo *qweight, *qzeros, *scales;
    std::int64_t K, N, G;
  };

  static Source source(model::WeightReader& r, const std::string& module, std::int64_t out, std::int64_t in) {
    const QuantConfig& qc = detail::config_for(r, Method::Awq);
    const std::int64_t K = in, N = out, G = qc.group_for(K);
    using detail::i64s;
    if (K % G != 0)
      throw Error(qc.where("group_size"), i64s(G) + " does not divide in_features " + i64s(K) + " of " + module);
    const std::string qweight = module + ".qweight";
    if (N % 8 != 0)
      throw Error(detail::tensor_where(r.checkpoint().get(qweight)),
                  "out_features " + i64s(N) + " is not a multiple of 8 (AWQ packs 8 output columns per int32)");
    const std::string why =
        "AWQ module " + module + ": in_features " + i64s(K) + ", out_features " + i64s(N) + ", group size " + i64s(G);
    const io::TensorInfo& qw = detail::need(r, qweight, {K, N / 8}, {DType::I32}, why);
    const io::TensorInfo& qz = detail::need(r, module + ".qzeros", {K / G, N / 8}, {DType::I32}, why);
    const io::TensorInfo& sc = detail::need(r, module + ".scales", {K / G, N}, {DType::F16, DType::BF16, DType::F32}, why);
    return {&qw, &qz, &sc, K, N, G};
  }

  static std::vector<float> linear_f32(model::WeightReader& r, const std::string& module, std::int64_t out,
                                       std::int64_t in) {
    if (!quantized(r, module)) return Dense::linear_f32(r, module, out, in);
    const Source s = source(r, module, out, in);
    return dequant_awq(detail::read_i32(*s.qweight), detail::read_i32(*s.qzeros), detail::read_f32(*s.scales), s.K, s.N,
                       s.G);
  }

  // Repacked for the GPU (packed.hpp): codes transposed to [N, K/8] in sequential order, zeros [N, K/G], scales
  // widened and transposed. Needs K % 8 == 0 (one group per 8-code word also needs G % 8 == 0).
  static Packer packer(model::WeightReader& r, const std::string& module, std::int64_t out, std::int64_t in) {
    const Source s = source(r, module, out, in);
    if (s.K % 8 != 0 || s.G % 8 != 0)
      throw Error(detail::tensor_where(*s.qweight), "the GPU kernels need in_features and the group size to be "
                                                    "multiples of 8 (got " + detail::i64s(s.K) + ", " + detail::i64s(s.G) + ")");
    return [s] {
      const std::int64_t K = s.K, N = s.N, G = s.G, P = N / 8, W = K / 8, ng = K / G;
      const std::byte* qw = s.qweight->bytes.data();
      const std::byte* qz = s.qzeros->bytes.data();
      using detail::u32_at;
      Packed4 p;
      p.code = Packed4::Code::Affine;
      p.N = N, p.K = K, p.G = G;
      p.words.assign(static_cast<std::size_t>(N * W), 0u);
      // An 8 x 8 nibble transpose per (input word w, packed column c): the 8 source words hold input channels
      // 8w..8w+7 of columns 8c..8c+7; the 8 output words hold columns 8c+j, channels 8w..8w+7.
      for (std::int64_t w = 0; w < W; ++w)
        for (std::int64_t c = 0; c < P; ++c) {
          std::uint32_t out[8] = {};
          for (int i = 0; i < 8; ++i) {  // input channel 8w + i
            const std::uint32_t src = u32_at(qw, (8 * w + i) * P + c);
            for (int j = 0; j < 8; ++j)
              out[j] |= static_cast<std::uint32_t>(awq_nibble(static_cast<std::int32_t>(src), j)) << (4 * i);
          }
          for (int j = 0; j < 8; ++j) p.words[static_cast<std::size_t>((8 * c + j) * W + w)] = out[j];
        }
      const std::vector<float> sc = detail::read_f32(*s.scales);  // [ng, N]
      p.scales.resize(static_cast<std::size_t>(N * ng));
      p.zeros.resize(static_cast<std::size_t>(N * ng));
      for (std::int64_t g = 0; g < ng; ++g)
        for (std::int64_t n = 0; n < N; ++n) {
          p.scales[static_cast<std::size_t>(n * ng + g)] = sc[static_cast<std::size_t>(g * N + n)];
          p.zeros[static_cast<std::size_t>(n * ng + g)] =
              static_cast<std::uint8_t>(awq_nibble(static_cast<std::int32_t>(u32_at(qz, g * P + n / 8)), static_cast<int>(n % 8)));
        }
      return p;
    };
  }
};

}  // namespace fpf::quant
