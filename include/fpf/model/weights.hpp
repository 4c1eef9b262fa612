#pragma once
// WeightReader: reads tensors from a checkpoint with the checks every loader needs (dtype agrees with config.json,
// shape agrees with what the config implies) and remembers what it read, so that tensors nobody asked for are
// reported instead of silently ignored.
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <typeindex>
#include <vector>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>
#include <fpf/io/config.hpp>
#include <fpf/io/safetensors.hpp>

namespace fpf::model {

// The float dtype config.json announces ("dtype" / "torch_dtype"); nullopt when it names none.
inline std::optional<DType> config_float_dtype(const io::ModelConfig& cfg) {
  if (cfg.dtype == "bfloat16") return DType::BF16;
  if (cfg.dtype == "float16") return DType::F16;
  if (cfg.dtype == "float32") return DType::F32;
  return std::nullopt;
}

class WeightReader {
 public:
  WeightReader(const io::Checkpoint& ckpt, const io::ModelConfig& cfg)
      : ckpt_(ckpt), cfg_(cfg), float_dtype_(config_float_dtype(cfg)) {}

  const io::Checkpoint& checkpoint() const { return ckpt_; }
  const io::ModelConfig& config() const { return cfg_; }
  bool has(std::string_view name) const { return ckpt_.find(name) != nullptr; }

  // The tensor, checked for shape and dtype (expected dtype nullopt: any float type, matching config.json).
  const io::TensorInfo& tensor(std::string_view name, const std::vector<std::int64_t>& shape,
                               std::optional<DType> dtype = std::nullopt) {
    const io::TensorInfo& t = ckpt_.get(name);
    const std::string where = t.file.string() + ": tensor '" + t.name + "'";
    if (t.shape != shape)
      throw Error(where, "shape " + io::detail::shape_str(t.shape) + " disagrees with " + cfg_.file.string() + " (expects " +
                             io::detail::shape_str(shape) + ")");
    if (dtype) {
      if (t.dtype != *dtype)
        throw Error(where, "dtype " + std::string(dtype_name(t.dtype)) + ", expected " + std::string(dtype_name(*dtype)));
    } else if (!is_float(t.dtype)) {
      throw Error(where, "dtype " + std::string(dtype_name(t.dtype)) + " is not a float type");
    } else if (float_dtype_ && t.dtype != *float_dtype_) {
      throw Error(where, "dtype " + std::string(dtype_name(t.dtype)) + " disagrees with " + cfg_.file.string() +
                             " field dtype (\"" + cfg_.dtype + "\")");
    }
    used_.insert(t.name);
    return t;
  }

  // The tensor widened to fp32 (exact for F16/BF16/F32).
  std::vector<float> f32(std::string_view name, const std::vector<std::int64_t>& shape) {
    const io::TensorInfo& t = tensor(name, shape);
    return widen(t, 0, static_cast<std::size_t>(t.numel()));
  }

  // count elements starting at element offset, widened to fp32 (for slicing fused tensors).
  static std::vector<float> widen(const io::TensorInfo& t, std::size_t offset, std::size_t count) {
    std::vector<float> out(count);
    for (std::size_t i = 0; i < count; ++i) out[i] = load_as_f32(t.bytes.data(), t.dtype, offset + i);
    return out;
  }

  void mark_used(std::string_view name) { used_.insert(std::string(name)); }

  // State a loader derives once per checkpoint and reuses for every module (e.g. a quant policy's parsed
  // quantization_config), keyed by its type: make() runs on the first call only.
  template <class T, class Make>
  const T& memo(Make&& make) {
    auto it = memo_.find(std::type_index(typeid(T)));
    if (it == memo_.end()) it = memo_.emplace(std::type_index(typeid(T)), std::make_shared<T>(make())).first;
    return *static_cast<const T*>(it->second.get());
  }

  // Every tensor in the checkpoint must have been read, except those named in `ignorable`.
  void check_all_used(const std::set<std::string>& ignorable = {}) const {
    for (const std::string& n : ckpt_.names())
      if (!used_.count(n) && !ignorable.count(n)) {
        const io::TensorInfo* t = ckpt_.find(n);
        throw Error(t->file.string() + ": tensor '" + n + "'",
                    "unknown tensor name (not part of a " + cfg_.model_type + " model with this config)");
      }
  }

 private:
  const io::Checkpoint& ckpt_;
  const io::ModelConfig& cfg_;
  std::optional<DType> float_dtype_;
  std::set<std::string> used_;
  std::map<std::type_index, std::shared_ptr<void>> memo_;
};

}  // namespace fpf::model
