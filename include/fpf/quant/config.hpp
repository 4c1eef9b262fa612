#pragma once
// config.json's `quantization_config` for the three quantized layouts fpf reads (docs/formats.md §2.5, §3.5, §4.4):
// AWQ GEMM (AutoAWQ / transformers AwqConfig), GPTQ (AutoGPTQ / GPTQModel) and bitsandbytes 4-bit NF4 (transformers
// BitsAndBytesConfig). Only what changes how tensors are read is interpreted; every other key is accepted and
// ignored (damp_percent, true_sequential, meta, ...). Errors name the file and the field:
//   "<dir>/config.json: quantization_config.group_size: 96 does not divide in_features 2048 of ..."
//
// Which modules are quantized is decided per module from what the checkpoint stores (formats.md §8: tools match
// skip lists differently), so the skip lists are kept for writers and reports, not used to route tensors.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include <fpf/core/error.hpp>
#include <fpf/io/json_util.hpp>

namespace fpf::quant {

enum class Method { Awq, Gptq, Bnb4 };

constexpr std::string_view method_name(Method m) noexcept {
  switch (m) {
    case Method::Awq: return "awq";
    case Method::Gptq: return "gptq";
    case Method::Bnb4: return "bitsandbytes";
  }
  return "?";
}

struct QuantConfig {
  std::filesystem::path file;  // the config.json it came from (named in errors)
  Method method = Method::Awq;
  int bits = 4;
  int group_size = -1;  // AWQ/GPTQ: -1 = one group spanning all of in_features (both tools' convention)
  // AWQ
  bool zero_point = true;
  std::string version = "gemm";  // lower-cased; only "gemm" is read
  // GPTQ
  bool desc_act = false;          // act-order; the tensors' g_idx is what dequantization follows
  bool sym = true;                // informational: zeros are read from qzeros either way
  bool static_groups = false;
  bool zeros_v2 = false;          // checkpoint_format "gptq_v2": zeros stored as is; "gptq" (v1): stored zero + 1
  std::string checkpoint_format = "gptq";
  // bitsandbytes
  std::string bnb_quant_type = "nf4";
  bool bnb_double_quant = false;     // informational: each module's quant_state says whether it is nested
  std::string bnb_compute_dtype;     // "bfloat16", "float16", "float32" or empty
  // AWQ/GPTQ modules_to_not_convert, bitsandbytes llm_int8_skip_modules (null -> empty)
  std::vector<std::string> modules_to_not_convert;

  // "<file>: quantization_config.<field>"
  std::string where(std::string_view field) const {
    return file.string() + ": quantization_config" + (field.empty() ? "" : "." + std::string(field));
  }

  // The group size for a Linear with `in_features` inputs (-1 -> in_features).
  std::int64_t group_for(std::int64_t in_features) const { return group_size == -1 ? in_features : group_size; }
};

namespace detail {

class QcReader {
 public:
  QcReader(const boost::json::object& o, const QuantConfig& qc) : o_(o), qc_(qc) {}

  const boost::json::value* get(std::string_view key) const {
    const boost::json::value* v = o_.if_contains(boost::json::string_view(key.data(), key.size()));
    return (v == nullptr || v->is_null()) ? nullptr : v;
  }
  // The first of the spellings present (writers disagree: AutoAWQ "w_bit"/"q_group_size", transformers "bits"...).
  const boost::json::value* first(std::initializer_list<std::string_view> keys, std::string_view* used) const {
    for (std::string_view k : keys)
      if (const boost::json::value* v = get(k)) {
        *used = k;
        return v;
      }
    *used = *keys.begin();
    return nullptr;
  }
  std::optional<std::int64_t> integer(std::initializer_list<std::string_view> keys, std::string_view* used) const {
    const boost::json::value* v = first(keys, used);
    if (v == nullptr) return std::nullopt;
    if (v->is_int64()) return v->get_int64();
    if (v->is_uint64() && v->get_uint64() < (1ull << 62)) return static_cast<std::int64_t>(v->get_uint64());
    throw Error(qc_.where(*used), "must be an integer, got " + io::json::brief(*v));
  }
  bool boolean(std::initializer_list<std::string_view> keys, bool dflt) const {
    std::string_view used;
    const boost::json::value* v = first(keys, &used);
    if (v == nullptr) return dflt;
    if (!v->is_bool()) throw Error(qc_.where(used), "must be true or false, got " + io::json::brief(*v));
    return v->get_bool();
  }
  std::optional<std::string> string(std::initializer_list<std::string_view> keys, std::string_view* used) const {
    const boost::json::value* v = first(keys, used);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) throw Error(qc_.where(*used), "must be a string, got " + io::json::brief(*v));
    return std::string(v->get_string());
  }
  std::vector<std::string> string_list(std::string_view key) const {
    std::vector<std::string> out;
    const boost::json::value* v = get(key);
    if (v == nullptr) return out;
    if (!v->is_array()) throw Error(qc_.where(key), "must be a list of module names or null, got " + io::json::brief(*v));
    for (const boost::json::value& e : v->get_array()) {
      if (!e.is_string()) throw Error(qc_.where(key), "must hold strings only, got " + io::json::brief(e));
      out.emplace_back(e.get_string());
    }
    return out;
  }

 private:
  const boost::json::object& o_;
  const QuantConfig& qc_;
};

inline std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return s;
}

}  // namespace detail

// Parses the `quantization_config` object of a config.json (given as the whole config.json's text). nullopt when the
// key is absent or null (a dense checkpoint).
inline std::optional<QuantConfig> parse_quant_config(std::string_view config_json_text,
                                                     const std::filesystem::path& file_for_errors) {
  const std::string file = file_for_errors.string();
  const boost::json::value root = io::json::parse(config_json_text, file);
  if (!root.is_object()) throw Error(file, "must be a JSON object, got " + io::json::kind_name(root));
  const boost::json::value* qv = root.get_object().if_contains("quantization_config");
  if (qv == nullptr || qv->is_null()) return std::nullopt;

  QuantConfig qc;
  qc.file = file_for_errors;
  if (!qv->is_object()) throw Error(qc.where(""), "must be an object, got " + io::json::brief(*qv));
  const detail::QcReader r(qv->get_object(), qc);
  std::string_view key;

  const std::optional<std::string> method = r.string({"quant_method"}, &key);
  if (!method) throw Error(qc.where("quant_method"), "missing (required)");
  const std::string m = detail::lower(*method);
  if (m == "awq") qc.method = Method::Awq;
  else if (m == "gptq") qc.method = Method::Gptq;
  else if (m == "bitsandbytes") qc.method = Method::Bnb4;
  else
    throw Error(qc.where("quant_method"),
                "unknown quant_method '" + *method + "' (fpf reads awq, gptq and bitsandbytes)");

  auto read_bits_and_group = [&](std::initializer_list<std::string_view> bits_keys,
                                 std::initializer_list<std::string_view> group_keys) {
    const std::optional<std::int64_t> bits = r.integer(bits_keys, &key);
    if (!bits) throw Error(qc.where(key), "missing (required)");
    if (*bits != 4) throw Error(qc.where(key), std::to_string(*bits) + "-bit weights are not supported (4 only)");
    qc.bits = 4;
    const std::optional<std::int64_t> g = r.integer(group_keys, &key);
    if (!g) throw Error(qc.where(key), "missing (required)");
    if (*g != -1 && (*g < 1 || *g > (1 << 30)))
      throw Error(qc.where(key), "must be -1 (one group per column) or a positive group size, got " + std::to_string(*g));
    qc.group_size = static_cast<int>(*g);
  };

  switch (qc.method) {
    case Method::Awq: {
      read_bits_and_group({"bits", "w_bit"}, {"group_size", "q_group_size"});
      qc.zero_point = r.boolean({"zero_point"}, true);
      if (!qc.zero_point)
        throw Error(qc.where("zero_point"), "false is not supported (AWQ GEMM checkpoints store zero points)");
      if (const auto v = r.string({"version"}, &key)) qc.version = detail::lower(*v);
      if (qc.version != "gemm")
        throw Error(qc.where("version"), "'" + qc.version + "' is not supported (fpf reads the AWQ GEMM layout)");
      qc.modules_to_not_convert = r.string_list("modules_to_not_convert");
      break;
    }
    case Method::Gptq: {
      read_bits_and_group({"bits"}, {"group_size"});
      qc.desc_act = r.boolean({"desc_act"}, false);
      qc.sym = r.boolean({"sym"}, true);
      qc.static_groups = r.boolean({"static_groups"}, false);
      // GPTQModel may spell it "format"; absent means v1, as AutoGPTQ reads it.
      if (const auto v = r.string({"checkpoint_format", "format"}, &key)) qc.checkpoint_format = detail::lower(*v);
      if (qc.checkpoint_format == "gptq") qc.zeros_v2 = false;
      else if (qc.checkpoint_format == "gptq_v2") qc.zeros_v2 = true;
      else
        throw Error(qc.where(key), "'" + qc.checkpoint_format + "' is not supported (gptq or gptq_v2)");
      if (const auto v = r.string({"pack_dtype"}, &key); v && *v != "int32")
        throw Error(qc.where("pack_dtype"), "'" + *v + "' is not supported (int32 packing only)");
      qc.modules_to_not_convert = r.string_list("modules_to_not_convert");
      break;
    }
    case Method::Bnb4: {
      if (r.boolean({"load_in_8bit", "_load_in_8bit"}, false))
        throw Error(qc.where("load_in_8bit"), "true is not supported (fpf reads 4-bit NF4 checkpoints)");
      if (!r.boolean({"load_in_4bit", "_load_in_4bit"}, false))
        throw Error(qc.where("load_in_4bit"), "must be true (fpf reads 4-bit NF4 checkpoints)");
      if (const auto v = r.string({"bnb_4bit_quant_type"}, &key)) qc.bnb_quant_type = *v;
      if (qc.bnb_quant_type != "nf4")
        throw Error(qc.where("bnb_4bit_quant_type"), "'" + qc.bnb_quant_type + "' is not supported (nf4 only)");
      qc.bnb_double_quant = r.boolean({"bnb_4bit_use_double_quant"}, false);
      if (const auto v = r.string({"bnb_4bit_compute_dtype"}, &key)) qc.bnb_compute_dtype = *v;
      qc.modules_to_not_convert = r.string_list("llm_int8_skip_modules");
      qc.bits = 4;
      break;
    }
  }
  return qc;
}

// The quant policy name (quant::Dense/Awq/Gptq/Nf4 ::name) that reads a checkpoint with this config: for run-time
// dispatch from a model directory to a Setup.
inline std::string_view policy_name(const std::optional<QuantConfig>& qc) {
  if (!qc) return "dense";
  switch (qc->method) {
    case Method::Awq: return "awq";
    case Method::Gptq: return "gptq";
    case Method::Bnb4: return "nf4";
  }
  return "dense";
}

// Reads <dir>/config.json (or the given file). nullopt for a dense checkpoint.
inline std::optional<QuantConfig> load_quant_config(const std::filesystem::path& config_json_or_dir) {
  std::error_code ec;
  const std::filesystem::path file = std::filesystem::is_directory(config_json_or_dir, ec)
                                         ? config_json_or_dir / "config.json"
                                         : config_json_or_dir;
  return parse_quant_config(io::json::read_text_file(file), file);
}

}  // namespace fpf::quant
