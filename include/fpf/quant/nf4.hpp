#pragma once
// quant::Nf4: bitsandbytes 4-bit NF4 as transformers saves it (docs/formats.md §4, §8).
//
// Per quantized Linear with weight [N, K], n = N * K elements, blocksize B (64), nb = ceil(n / B):
//   <module>.weight                                     U8  [(n+1)/2, 1]  nibbles of the row-major flattened
//                                                                         weight; element 2i is the HIGH nibble of
//                                                                         byte i, 2i+1 the low one (odd n: pad 7)
//   <module>.weight.absmax                              F32 [nb], or U8 [nb] with double quantization
//   <module>.weight.quant_map                           F32 [16]  the NF4 code (checked against kNf4Code)
//   <module>.weight.nested_absmax                       F32 [ceil(nb / 256)]   (double quant only)
//   <module>.weight.nested_quant_map                    F32 [256]              (double quant only)
//   <module>.weight.quant_state.bitsandbytes__nf4       U8  JSON: quant_type, blocksize, dtype, shape,
//                                                             nested_blocksize, nested_dtype, nested_offset
// Dequantization, as bitsandbytes computes it:
//   absmax[b] = fp32(fp32(nested_quant_map[absmax_u8[b]] * nested_absmax[b / 256]) + nested_offset)
//               (a multiply, then an add, each rounded to fp32: not one fused multiply-add)
//   W[i]      = round_to_dtype(fp32(quant_map[code_i] * absmax[i / B])), dtype from the quant state (e.g. bf16)
// then widened to fp32 exactly. Whether a module is nested is read from its own quant state, not from a type
// parameter (docs/quantization.md). A module is NF4 iff its weight is U8 and the quant state entry exists;
// otherwise it is dense (llm_int8_skip_modules, lm_head, embeddings).
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include <fpf/io/json_util.hpp>
#include <fpf/quant/common.hpp>
#include <fpf/quant/config.hpp>
#include <fpf/quant/dense.hpp>
#include <fpf/quant/packed.hpp>

namespace fpf::quant {

inline constexpr std::string_view kNf4StateSuffix = ".quant_state.bitsandbytes__nf4";

// Element i's 4-bit code: high nibble for even i, low nibble for odd i.
constexpr int nf4_code_index(std::span<const std::uint8_t> packed, std::size_t i) noexcept {
  const std::uint8_t byte = packed[i / 2];
  return (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
}

// Double quantization: the fp32 block scales from their 8-bit codes. Two roundings, in this order.
inline std::vector<float> nf4_absmax_from_double_quant(std::span<const std::uint8_t> absmax_codes,
                                                       std::span<const float> nested_absmax,
                                                       std::span<const float> nested_quant_map,
                                                       std::int64_t nested_blocksize, float nested_offset) {
  std::vector<float> absmax(absmax_codes.size());
  for (std::size_t b = 0; b < absmax.size(); ++b) {
    const float scaled = nested_quant_map[absmax_codes[b]] * nested_absmax[b / static_cast<std::size_t>(nested_blocksize)];
    absmax[b] = scaled + nested_offset;  // -ffp-contract=off (fpf's CMake) keeps these two roundings apart
  }
  return absmax;
}

// n weights from packed nibbles: code[c] * absmax[i / blocksize] in fp32, rounded to dtype.
inline std::vector<float> dequant_nf4(std::span<const std::uint8_t> packed, std::span<const float> absmax,
                                      std::span<const float> code, std::int64_t n, std::int64_t blocksize, DType dtype) {
  std::vector<float> w(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < w.size(); ++i)
    w[i] = round_to_dtype(code[static_cast<std::size_t>(nf4_code_index(packed, i))] * absmax[i / static_cast<std::size_t>(blocksize)],
                          dtype);
  return w;
}

// The non-tensor fields bitsandbytes packs into the quant_state blob.
struct Nf4State {
  std::int64_t blocksize = 64;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  bool nested = false;
  std::int64_t nested_blocksize = 256;
  float nested_offset = 0.0f;
};

namespace detail {

inline std::optional<DType> torch_dtype_name(std::string s) {
  if (s.rfind("torch.", 0) == 0) s = s.substr(6);
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  if (s == "float32") return DType::F32;
  return std::nullopt;
}

inline Nf4State parse_nf4_state(const io::TensorInfo& blob) {
  const std::string where = tensor_where(blob);
  const std::string_view text(reinterpret_cast<const char*>(blob.bytes.data()), blob.bytes.size());
  const boost::json::value v = io::json::parse(text, where);
  if (!v.is_object()) throw Error(where, "must hold a JSON object, got " + io::json::kind_name(v));
  const boost::json::object& o = v.get_object();
  auto field = [&](std::string_view k) { return where + ": field " + std::string(k); };
  auto get = [&](std::string_view k) -> const boost::json::value* {
    const boost::json::value* x = o.if_contains(boost::json::string_view(k.data(), k.size()));
    return (x == nullptr || x->is_null()) ? nullptr : x;
  };
  auto need = [&](std::string_view k) -> const boost::json::value& {
    const boost::json::value* x = get(k);
    if (x == nullptr) throw Error(field(k), "missing (required)");
    return *x;
  };
  auto positive_int = [&](std::string_view k) {
    const boost::json::value& x = need(k);
    if (!x.is_int64() || x.get_int64() < 1) throw Error(field(k), "must be a positive integer, got " + io::json::brief(x));
    return x.get_int64();
  };
  auto dtype_field = [&](std::string_view k) {
    const boost::json::value& x = need(k);
    const std::optional<DType> d = x.is_string() ? torch_dtype_name(std::string(x.get_string())) : std::nullopt;
    if (!d) throw Error(field(k), "must be bfloat16, float16 or float32, got " + io::json::brief(x));
    return *d;
  };

  Nf4State s;
  const boost::json::value& qt = need("quant_type");
  if (!qt.is_string() || qt.get_string() != "nf4")
    throw Error(field("quant_type"), "must be \"nf4\", got " + io::json::brief(qt));
  s.blocksize = positive_int("blocksize");
  s.dtype = dtype_field("dtype");
  const boost::json::value& sh = need("shape");
  if (!sh.is_array()) throw Error(field("shape"), "must be a list of dimensions, got " + io::json::brief(sh));
  for (const boost::json::value& d : sh.get_array()) {
    if (!d.is_int64() || d.get_int64() < 0) throw Error(field("shape"), "must hold non-negative integers, got " + io::json::brief(sh));
    s.shape.push_back(d.get_int64());
  }
  s.nested = get("nested_blocksize") != nullptr || get("nested_offset") != nullptr;
  if (s.nested) {
    s.nested_blocksize = positive_int("nested_blocksize");
    if (get("nested_dtype") != nullptr && dtype_field("nested_dtype") != DType::F32)
      throw Error(field("nested_dtype"), "must be float32 (bitsandbytes keeps nested absmax in fp32)");
    const boost::json::value& off = need("nested_offset");
    if (!off.is_number()) throw Error(field("nested_offset"), "must be a number, got " + io::json::brief(off));
    s.nested_offset = static_cast<float>(off.to_number<double>());  // an fp32 value printed by Python: exact
  }
  return s;
}

}  // namespace detail

struct Nf4 {
  static constexpr std::string_view name = "nf4";

  static bool quantized(const model::WeightReader& r, const std::string& module) {
    const io::TensorInfo* w = r.checkpoint().find(module + ".weight");
    return w != nullptr && w->dtype == DType::U8 && r.has(module + ".weight" + std::string(kNf4StateSuffix));
  }

  static bool stores(const model::WeightReader& r, const std::string& module) { return Dense::stores(r, module); }

  // The checked tensors of one module; `dense` when it is not NF4-quantized (then nothing else is set).
  struct Source {
    bool dense = false;
    const io::TensorInfo* packed = nullptr;
    std::vector<float> absmax;  // resolved from double quantization
    std::vector<float> code;
    Nf4State state;
    std::int64_t n = 0;
  };

  static Source source(model::WeightReader& r, const std::string& module, std::int64_t out, std::int64_t in) {
    const std::string wname = module + ".weight";
    if (!quantized(r, module)) {
      const io::TensorInfo* w = r.checkpoint().find(wname);
      if (w != nullptr && w->dtype == DType::U8)
        throw Error(detail::tensor_where(*w),
                    r.has(wname + ".quant_state.bitsandbytes__fp4")
                        ? "bitsandbytes FP4 is not supported (nf4 only)"
                        : "U8 weight without its quant state '" + wname + std::string(kNf4StateSuffix) + "'");
      return Source{true};
    }
    detail::config_for(r, Method::Bnb4);
    using detail::i64s;
    const std::int64_t n = out * in;
    const io::TensorInfo& blob = r.checkpoint().get(wname + std::string(kNf4StateSuffix));
    if (blob.dtype != DType::U8 || blob.shape.size() != 1)
      throw Error(detail::tensor_where(blob), "must be a U8 vector of JSON text, got " +
                                                  std::string(dtype_name(blob.dtype)) + " " + io::detail::shape_str(blob.shape));
    r.mark_used(blob.name);
    const Nf4State st = detail::parse_nf4_state(blob);
    if (st.shape != std::vector<std::int64_t>{out, in})
      throw Error(detail::tensor_where(blob) + ": field shape", io::detail::shape_str(st.shape) + ", expected " +
                                                                 io::detail::shape_str({out, in}) + " for " + module);
    const std::int64_t nb = (n + st.blocksize - 1) / st.blocksize;
    const std::string why = "NF4 module " + module + ": " + i64s(out) + " x " + i64s(in) + " weights, blocksize " +
                            i64s(st.blocksize) + (st.nested ? ", double quantization" : "");
    const io::TensorInfo& packed = detail::need(r, wname, {(n + 1) / 2, 1}, {DType::U8}, why);
    const io::TensorInfo& qmap = detail::need(r, wname + ".quant_map", {16}, {DType::F32}, why);
    const std::vector<float> code = detail::read_f32(qmap);
    for (int i = 0; i < 16; ++i)
      if (code[static_cast<std::size_t>(i)] != kNf4Code[i])
        throw Error(detail::tensor_where(qmap), "entry " + std::to_string(i) + " is " + std::to_string(code[static_cast<std::size_t>(i)]) +
                                                    ", not the NF4 code value " + std::to_string(kNf4Code[i]));
    std::vector<float> absmax;
    if (st.nested) {
      const std::int64_t nnb = (nb + st.nested_blocksize - 1) / st.nested_blocksize;
      const io::TensorInfo& a = detail::need(r, wname + ".absmax", {nb}, {DType::U8}, why);
      const io::TensorInfo& na = detail::need(r, wname + ".nested_absmax", {nnb}, {DType::F32}, why);
      const io::TensorInfo& nm = detail::need(r, wname + ".nested_quant_map", {256}, {DType::F32}, why);
      absmax = nf4_absmax_from_double_quant(detail::read_u8(a), detail::read_f32(na), detail::read_f32(nm),
                                            st.nested_blocksize, st.nested_offset);
    } else {
      absmax = detail::read_f32(detail::need(r, wname + ".absmax", {nb}, {DType::F32}, why));
    }
    Source s;
    s.packed = &packed;
    s.absmax = std::move(absmax);
    s.code = code;
    s.state = st;
    s.n = n;
    return s;
  }

  static std::vector<float> linear_f32(model::WeightReader& r, const std::string& module, std::int64_t out,
                                       std::int64_t in) {
    const Source s = source(r, module, out, in);
    if (s.dense) return Dense::linear_f32(r, module, out, in);
    return dequant_nf4(detail::read_u8(*s.packed), s.absmax, s.code, s.n, s.state.blocksize, s.state.dtype);
  }

  // Repacked for the GPU (packed.hpp): codes [N, K/8] (the same order, 8 per word, low nibble first), the resolved
  // absmax as scales over the flattened weight. Needs K and the blocksize to be multiples of 8.
  static Packer packer(model::WeightReader& r, const std::string& module, std::int64_t out, std::int64_t in) {
    Source s = source(r, module, out, in);
    if (s.dense) throw Error(module, "not an NF4 module");
    if (in % 8 != 0 || s.state.blocksize % 8 != 0)
      throw Error(detail::tensor_where(*s.packed), "the GPU kernels need in_features and the blocksize to be multiples of 8 (got " +
                                                       detail::i64s(in) + ", " + detail::i64s(s.state.blocksize) + ")");
    return [s = std::move(s), out, in] {
      Packed4 p;
      p.code = Packed4::Code::Nf4;
      p.nf4_dtype = s.state.dtype;
      p.N = out, p.K = in, p.G = s.state.blocksize;
      const std::size_t words = static_cast<std::size_t>(out * in / 8);
      p.words.resize(words);
      const std::byte* b = s.packed->bytes.data();
      for (std::size_t w = 0; w < words; ++w) {
        std::uint32_t v = 0;
        for (int j = 0; j < 4; ++j) {
          const auto byte = static_cast<std::uint32_t>(b[4 * w + static_cast<std::size_t>(j)]);
          v |= ((byte >> 4) & 0xFu) << (8 * j);      // element 2j: high nibble
          v |= (byte & 0xFu) << (8 * j + 4);         // element 2j + 1: low nibble
        }
        p.words[w] = v;
      }
      p.scales = s.absmax;
      return p;
    };
  }
};

}  // namespace fpf::quant
