#pragma once
// Shared by the quant policies: the checkpoint's quantization_config (parsed once per load), checked reads of the
// quant tensors with their own dtypes (config.json's dtype only governs the dense float tensors), and little-endian
// element access that does not assume alignment.
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/model/weights.hpp>
#include <fpf/quant/config.hpp>

namespace fpf::quant::detail {

inline std::string tensor_where(const io::TensorInfo& t) { return t.file.string() + ": tensor '" + t.name + "'"; }

// The checkpoint's quantization_config, which must name `method` (the setup's scheme).
inline const QuantConfig& config_for(model::WeightReader& r, Method method) {
  struct Cached {
    std::optional<QuantConfig> qc;
  };
  const Cached& c = r.memo<Cached>([&] { return Cached{load_quant_config(r.config().file)}; });
  const std::string file = r.config().file.string();
  if (!c.qc)
    throw Error(file + ": quantization_config", "missing: the checkpoint stores quantized modules but config.json "
                                                "does not say how (a " + std::string(method_name(method)) +
                                                    " setup needs it)");
  if (c.qc->method != method)
    throw Error(c.qc->where("quant_method"), "'" + std::string(method_name(c.qc->method)) +
                                                 "' checkpoint, but the setup reads " + std::string(method_name(method)));
  return *c.qc;
}

inline std::string dtypes_str(std::initializer_list<DType> dtypes) {
  std::string s;
  for (DType d : dtypes) s += (s.empty() ? "" : " or ") + std::string(dtype_name(d));
  return s;
}

// A quant tensor that must exist (why: what implies it, for the message), with this shape and one of these dtypes.
inline const io::TensorInfo& need(model::WeightReader& r, const std::string& name, const std::vector<std::int64_t>& shape,
                                  std::initializer_list<DType> dtypes, const std::string& why) {
  const io::TensorInfo* t = r.checkpoint().find(name);
  if (t == nullptr) throw Error(r.checkpoint().dir().string() + ": tensor '" + name + "'", "missing (" + why + ")");
  bool ok = false;
  for (DType d : dtypes) ok = ok || t->dtype == d;
  if (!ok)
    throw Error(tensor_where(*t), "dtype " + std::string(dtype_name(t->dtype)) + ", expected " + dtypes_str(dtypes));
  if (t->shape != shape)
    throw Error(tensor_where(*t), "shape " + io::detail::shape_str(t->shape) + ", expected " +
                                      io::detail::shape_str(shape) + " (" + why + ")");
  r.mark_used(name);
  return *t;
}

inline std::vector<std::int32_t> read_i32(const io::TensorInfo& t) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(t.numel()));
  if (!v.empty()) std::memcpy(v.data(), t.bytes.data(), v.size() * sizeof(std::int32_t));  // little-endian host
  return v;
}

inline std::vector<std::uint8_t> read_u8(const io::TensorInfo& t) {
  std::vector<std::uint8_t> v(t.bytes.size());
  if (!v.empty()) std::memcpy(v.data(), t.bytes.data(), v.size());
  return v;
}

// Float tensor widened to fp32 (exact for F16/BF16/F32).
inline std::vector<float> read_f32(const io::TensorInfo& t) {
  return model::WeightReader::widen(t, 0, static_cast<std::size_t>(t.numel()));
}

inline std::string i64s(std::int64_t v) { return std::to_string(v); }

// Little-endian u32 element i of a tensor's bytes (no alignment assumed).
inline std::uint32_t u32_at(const std::byte* base, std::int64_t i) {
  std::uint32_t v;
  std::memcpy(&v, base + i * 4, 4);
  return v;
}

}  // namespace fpf::quant::detail
